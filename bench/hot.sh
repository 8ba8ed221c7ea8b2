#!/usr/bin/env bash
# Hot-backup figures for `rime serve`: fio write throughput and latency through rime serve's
# NBD server against qemu-nbd and against the raw image file, idle and during a backup; the
# peak size of the difference store; and an incremental backup after 1% of the blocks changed
# (in 64 KiB runs, and scattered as single 4 KiB blocks), its time and bytes read against a full.
#
#   sudo bench/hot.sh            # prints a Markdown report; also saved as $HOT_WORK/report.md
#
# Environment: HOT_WORK (default bench/work/hot), HOT_SIZE_MIB (volume size, default 2048),
# HOT_RUNTIME (seconds per fio run, default 8), CARGO_TARGET_DIR (as bench/run.sh).
# Needs fio (with its nbd engine), qemu-utils, python3. Runs everything on unix sockets.
set -euo pipefail

BENCH=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
ROOT=$(dirname "$BENCH")
W=${HOT_WORK:-$BENCH/work/hot}
SIZE_MIB=${HOT_SIZE_MIB:-2048}
RUNTIME=${HOT_RUNTIME:-8}
if [[ -z ${CARGO_TARGET_DIR:-} ]]; then
    if [[ -d /work ]]; then CARGO_TARGET_DIR=/work/target-bench; else CARGO_TARGET_DIR=$ROOT/target; fi
fi
export CARGO_TARGET_DIR
command -v fio >/dev/null || apt-get install -y -qq fio >/dev/null
command -v qemu-nbd >/dev/null || apt-get install -y -qq qemu-utils >/dev/null
(cd "$ROOT" && cargo build --release -q -p rime)
RIME=$CARGO_TARGET_DIR/release/rime

PIDS=()
cleanup() { for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done; wait 2>/dev/null || true; }
trap cleanup EXIT

rm -rf "$W"; mkdir -p "$W"
VOL=$W/vol.img
echo "making a ${SIZE_MIB} MiB volume of random data" >&2
head -c "${SIZE_MIB}M" /dev/urandom > "$VOL"
sync

ctl() { # one control-socket request; prints the reply
    python3 - "$W/ctl.sock" "$1" <<'PY'
import socket, sys
s = socket.socket(socket.AF_UNIX); s.connect(sys.argv[1]); f = s.makefile('rwb')
f.write(sys.argv[2].encode() + b'\n'); f.flush(); print(f.readline().decode().strip())
PY
}
status_field() { ctl '{"op":"status"}' | python3 -c "import json,sys; print(json.load(sys.stdin)['status']$1)"; }
wait_sock() { for _ in $(seq 200); do [[ -S $1 ]] && return 0; sleep 0.05; done; echo "no socket $1" >&2; exit 1; }

# fio_run LABEL PATTERN TARGET: PATTERN rand|seq; TARGET raw|nbd:SOCKET. Appends a TSV row.
fio_run() {
    local label=$1 pattern=$2 target=$3 args
    if [[ $pattern == rand ]]; then args=(--rw=randwrite --bs=4k --iodepth=16); else args=(--rw=write --bs=1M --iodepth=4); fi
    if [[ $target == raw ]]; then
        args+=(--ioengine=psync --filename="$VOL" --iodepth=1)
    else
        args+=(--ioengine=nbd --uri="nbd+unix:///?socket=${target#nbd:}")
    fi
    sync
    fio --name=hot --thread --time_based --runtime="$RUNTIME" --size="${SIZE_MIB}M" --randrepeat=0 \
        "${args[@]}" --output-format=json --output="$W/fio.json" >/dev/null
    python3 - "$label" "$pattern" "$W/fio.json" >> "$W/fio.tsv" <<'PY'
import json, sys
label, pattern, path = sys.argv[1:]
text = open(path).read()
w = json.loads(text[text.index('{'):])['jobs'][0]['write']  # the nbd engine prints a line first
clat = w['clat_ns']
p99 = clat.get('percentile', {}).get('99.000000', 0) / 1000
print(f"{label}\t{pattern}\t{w['bw'] / 1024:.1f}\t{w['iops']:.0f}\t{clat['mean'] / 1000:.1f}\t{p99:.0f}")
PY
}

: > "$W/fio.tsv"
# --- raw file ---------------------------------------------------------------------------------
for p in rand seq; do fio_run "raw file" $p raw; done
# Under load: a concurrent full sequential read of the image (what a backup does to the disk).
reader() { while true; do dd if="$VOL" of=/dev/null bs=4M status=none; done; }
reader & RP=$!; PIDS+=($RP)
for p in rand seq; do fio_run "raw file, during a full read" $p raw; done
kill $RP; wait $RP 2>/dev/null || true

# --- qemu-nbd ---------------------------------------------------------------------------------
qemu-nbd -f raw --cache=writeback --aio=threads --shared=8 -t -k "$W/qnbd.sock" "$VOL" & QP=$!; PIDS+=($QP)
wait_sock "$W/qnbd.sock"
for p in rand seq; do fio_run "qemu-nbd" $p "nbd:$W/qnbd.sock"; done
reader & RP=$!; PIDS+=($RP)
for p in rand seq; do fio_run "qemu-nbd, during a full read" $p "nbd:$W/qnbd.sock"; done
kill $RP; wait $RP 2>/dev/null || true
kill $QP; wait $QP 2>/dev/null || true

# --- rime serve -------------------------------------------------------------------------------
"$RIME" serve "$VOL" --nbd "unix:$W/rime.sock" --control "$W/ctl.sock" --state-dir "$W/state" \
    --spill-dir "$W" --store-cap 16G 2>"$W/serve.log" & SP=$!; PIDS+=($SP)
wait_sock "$W/ctl.sock"
for p in rand seq; do fio_run "rime serve" $p "nbd:$W/rime.sock"; done

"$RIME" --repo "$W/repo" init >/dev/null
"$RIME" --repo "$W/repo2" init >/dev/null
# During a backup: each fio run gets its own online backup (one thread, so it outlasts fio).
backup_during() {
    "$RIME" --repo "$W/repo" backup --json --mode online "$W/ctl.sock" --threads 1 >"$W/during-$1.json" 2>"$W/during-$1.err" & BP=$!
    for _ in $(seq 600); do [[ $(status_field "['state']") == active ]] && break; sleep 0.05; done
    fio_run "rime serve, during an online backup" "$1" "nbd:$W/rime.sock"
    if kill -0 $BP 2>/dev/null; then echo "yes" > "$W/outlasted-$1"; else echo "no" > "$W/outlasted-$1"; fi
    wait $BP || { echo "backup during fio failed: $(cat "$W/during-$1.err")" >&2; exit 1; }
}
backup_during rand
backup_during seq
PEAK=$(status_field "['peak_store']")
COW=$(status_field "['cow_blocks']")

# --- incremental after 1% of the blocks changed -------------------------------------------------
timed_backup() { # REPO NAME: a quiet online backup; prints seconds
    local t0 t1
    t0=$(date +%s.%N)
    "$RIME" --repo "$1" backup --json --mode online "$W/ctl.sock" >"$W/$2.json"
    t1=$(date +%s.%N)
    python3 -c "print(f'{$t1 - $t0:.2f}')"
}
change() { # BS: overwrite 1% of the volume's 4 KiB blocks with random data, in writes of BS
    local bs=$1 n
    n=$(( SIZE_MIB * 256 / 100 * 4096 / $(numfmt --from=iec "$bs") ))
    fio --name=change --thread --ioengine=nbd --uri="nbd+unix:///?socket=$W/rime.sock" --rw=randwrite \
        --bs="$bs" --size="${SIZE_MIB}M" --number_ios="$n" --norandommap=0 --randrepeat=0 \
        --output-format=json --output="$W/change.json" >/dev/null
}
base_t=$(timed_backup "$W/repo" base)              # incremental from the last during-load backup
change 64K
inc_runs_t=$(timed_backup "$W/repo" incr-runs)
full_t=$(timed_backup "$W/repo2" full)             # no base in repo2: a full backup
change 4K
inc_scat_t=$(timed_backup "$W/repo2" incr-scattered)

kill -TERM $SP; wait $SP 2>/dev/null || true

python3 - "$W" "$SIZE_MIB" "$RUNTIME" "$PEAK" "$COW" "$full_t" "$inc_runs_t" "$inc_scat_t" <<'PY' | tee "$W/report.md"
import json, sys, os, subprocess, platform
W, size_mib, runtime, peak, cow, full_t, inc_runs_t, inc_scat_t = sys.argv[1:]
size = int(size_mib) << 20
rows = [l.rstrip('\n').split('\t') for l in open(f'{W}/fio.tsv')]
fig = {(r[0], r[1]): r for r in rows}
def vol(name):
    return json.load(open(f'{W}/{name}.json'))['manifest']['volumes'][0]
rev = subprocess.run(['git', 'rev-parse', '--short', 'HEAD'], capture_output=True, text=True).stdout.strip()
fio_v = subprocess.run(['fio', '--version'], capture_output=True, text=True).stdout.strip()
qemu_v = subprocess.run(['qemu-nbd', '--version'], capture_output=True, text=True).stdout.split('\n')[0]
print(f"Run of {subprocess.run(['date', '-u', '+%Y-%m-%d %H:%M UTC'], capture_output=True, text=True).stdout.strip()}, rime {rev}, {os.cpu_count()} cores, kernel {platform.release()}; {fio_v}, {qemu_v}.")
print(f"Volume: a {size_mib} MiB raw image of random data on the local disk, served over a unix socket. fio: {runtime} s per run,")
print("random = 4 KiB random writes at queue depth 16, sequential = 1 MiB writes at queue depth 4, both with fio's nbd engine")
print("(libnbd); the raw file is written with psync at queue depth 1. Writes land in the page cache in every case (no flush).")
print("\"During\" runs: for rime serve an online backup (`--threads 1`) of the same volume runs, with the snapshot active")
print("for the whole fio run (every first write to a block copies its old contents to the difference store); for qemu-nbd")
print("and the raw file, which have no snapshots, a concurrent full sequential read of the image stands in for the backup.")
print()
print("| target | pattern | MiB/s | IOPS | mean latency µs | p99 latency µs |")
print("|---|---|---:|---:|---:|---:|")
for r in rows:
    print(f"| {r[0]} | {'random 4 KiB' if r[1] == 'rand' else 'sequential 1 MiB'} | {r[2]} | {r[3]} | {r[4]} | {r[5]} |")
print()
def ratio(a, b, p):
    return float(fig[(a, p)][2]) / float(fig[(b, p)][2])
outl = {p: open(f'{W}/outlasted-{p}').read().strip() for p in ('rand', 'seq')}
print("| ratio | random 4 KiB | sequential 1 MiB | target |")
print("|---|---:|---:|---|")
print(f"| rime serve / qemu-nbd, idle | {ratio('rime serve', 'qemu-nbd', 'rand'):.2f}x | {ratio('rime serve', 'qemu-nbd', 'seq'):.2f}x | ≥ 0.9x |")
print(f"| rime serve during an online backup / qemu-nbd idle | {ratio('rime serve, during an online backup', 'qemu-nbd', 'rand'):.2f}x | {ratio('rime serve, during an online backup', 'qemu-nbd', 'seq'):.2f}x | ≥ 0.5x |")
print(f"| rime serve during an online backup / qemu-nbd during a full read | {ratio('rime serve, during an online backup', 'qemu-nbd, during a full read', 'rand'):.2f}x | {ratio('rime serve, during an online backup', 'qemu-nbd, during a full read', 'seq'):.2f}x | |")
print()
print(f"Backup outlasted the fio run: random {outl['rand']}, sequential {outl['seq']}. Peak difference store: "
      f"{int(peak) / 2**20:.0f} MiB ({int(cow)} blocks copied before being overwritten, over both runs).")
print()
full, runs, scat = vol('full'), vol('incr-runs'), vol('incr-scattered')
print(f"Incremental backups (quiet volume, online, default settings) after 1% of the {size // 4096} blocks were overwritten:")
print()
print("| backup | time | read from the volume | % of the volume | added to the repository |")
print("|---|---:|---:|---:|---:|")
for name, v, t in (("full (no changed-block base)", full, full_t), ("incremental, 1% changed in 64 KiB runs", runs, inc_runs_t), ("incremental, 1% changed as scattered 4 KiB blocks", scat, inc_scat_t)):
    print(f"| {name} | {t} s | {v['read_bytes'] / 2**20:.1f} MiB | {100 * v['read_bytes'] / size:.2f} % | {v['added_bytes'] / 2**20:.1f} MiB |")
PY
