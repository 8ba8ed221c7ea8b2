#!/usr/bin/env bash
# What the crash-consistency checks of the ext used-block map cost, each side by side with the
# same backup without it, alternating A B A B in one run:
#
#  1. journal replay: an online backup (through `rime serve`) of a 4 GiB ext4 copy whose 128 MiB
#     journal is full (taken with `cp --reflink` while data=journal writes ran), against the
#     same filesystem after the kernel replayed and emptied its journal;
#  2. the inode cross-check on the benchmark volume (bench/run.sh's base.img, 4 GiB ext4 with
#     metadata_csum, about half full): --cross-check always against never; and on an ext3 image
#     of the same files, where it runs by default: auto against never.
#
#   sudo bench/crash_maps.sh        # prints a table; figures go to docs/PERFORMANCE.md by hand
#
# Environment: BENCH_WORK (default bench/work, shared with run.sh), BENCH_ROUNDS (default 5),
# RIME (default: target/release/rime, built if missing), BENCH_BASELINE=REV (also time a clean,
# unchanged backup of the benchmark volume with rime built from REV, e.g. the commit before the
# checks, against this one). Needs root (loop mounts, drop_caches),
# xfsprogs (the reflink host), e2fsprogs, python3.
set -euo pipefail

BENCH=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
ROOT=$(dirname "$BENCH")
WORK=${BENCH_WORK:-$BENCH/work}
ROUNDS=${BENCH_ROUNDS:-5}
RIME=${RIME:-$ROOT/target/release/rime}
GIB=$((1 << 30))

log() { printf '[crash-maps %(%H:%M:%S)T] %s\n' -1 "$*" >&2; }
[[ $(id -u) == 0 ]] || { log "run as root"; exit 1; }
[[ -x $RIME ]] || (cd "$ROOT" && cargo build --release -q -p rime)
mkdir -p "$WORK"
cd "$WORK"
# A private copy: a rebuild during the run must not change what is measured.
cp "$RIME" "$WORK/cm-rime"
RIME=$WORK/cm-rime
if [[ -n ${BENCH_BASELINE:-} ]]; then
    log "building the baseline rime $BENCH_BASELINE"
    rm -rf "$WORK/cm-baseline-src"
    mkdir -p "$WORK/cm-baseline-src"
    git -C "$ROOT" archive "$BENCH_BASELINE" | tar -x -C "$WORK/cm-baseline-src"
    (cd "$WORK/cm-baseline-src" && CARGO_TARGET_DIR=$WORK/cm-baseline-target cargo build --release -q -p rime)
    cp "$WORK/cm-baseline-target/release/rime" "$WORK/cm-rime-baseline"
fi

cleanup() {
    for m in "$WORK"/cm-live "$WORK"/cm-host; do mountpoint -q "$m" && umount "$m"; done
    [[ -n ${SAVED_EXPIRE:-} ]] && echo "$SAVED_EXPIRE" >/proc/sys/vm/dirty_expire_centisecs
    [[ -n ${SERVE_PID:-} ]] && kill "$SERVE_PID" 2>/dev/null
    true
}
trap cleanup EXIT

# Seconds of one command's wall time, caches dropped first.
timed() {
    sync
    echo 3 >/proc/sys/vm/drop_caches
    /usr/bin/time -f %e -o "$WORK/cm-time" "$@" >"$WORK/cm-out" 2>"$WORK/cm-err" || {
        cat "$WORK/cm-err" >&2
        return 1
    }
    cat "$WORK/cm-time"
}

median() { sort -g | awk '{v[NR] = $1} END {print (NR % 2) ? v[(NR + 1) / 2] : (v[NR / 2] + v[NR / 2 + 1]) / 2}'; }

# A full backup of $@ into a fresh repository; prints seconds. Deleting the last repository
# frees GiBs, whose discards the filesystem issues in the background: let them finish first.
backup() {
    rm -rf "$WORK/cm-repo"
    sync
    sleep 3
    "${BIN:-$RIME}" --repo "$WORK/cm-repo" init >/dev/null
    timed "${BIN:-$RIME}" --repo "$WORK/cm-repo" backup --json "$@"
}

# The same with the baseline build.
baseline_backup() { BIN=$WORK/cm-rime-baseline backup "$@"; }

# ---------------------------------------------------------------------------------------------
# The volumes
# ---------------------------------------------------------------------------------------------
if [[ ! -f base.img ]]; then
    log "building bench/run.sh's data set and base.img (4 GiB ext4)"
    [[ -f staging.complete ]] || { python3 "$BENCH/gen_data.py" staging && touch staging.complete; }
    truncate -s $((4 * GIB)) base.img.tmp
    mkfs.ext4 -q -F -L rimebench -E root_owner=0:0 -d staging base.img.tmp
    mv base.img.tmp base.img
fi
if [[ ! -f base-ext3.img ]]; then
    log "base-ext3.img: the same files on ext3"
    truncate -s $((4 * GIB)) base-ext3.img.tmp
    mkfs.ext3 -q -F -E root_owner=0:0 -d staging base-ext3.img.tmp
    mv base-ext3.img.tmp base-ext3.img
fi

# The full journal: a reflink host, an ext4 with a 128 MiB journal mounted data=journal with
# writeback held off, 400 MiB written in fsync'd 4 MiB steps, and an instant copy.
mkdir -p cm-host cm-live
if [[ ! -f cm-host.img ]]; then truncate -s $((12 * GIB)) cm-host.img && mkfs.xfs -q -m reflink=1 cm-host.img; fi
mountpoint -q cm-host || mount -o loop cm-host.img cm-host
if [[ ! -f cm-host/full.img ]]; then
    log "filling a 128 MiB journal"
    rm -f cm-host/live.img
    truncate -s $((4 * GIB)) cm-host/live.img
    mkfs.ext4 -q -F -J size=128 cm-host/live.img
    SAVED_EXPIRE=$(cat /proc/sys/vm/dirty_expire_centisecs)
    echo 360000 >/proc/sys/vm/dirty_expire_centisecs
    mount -o loop,data=journal,commit=600 cm-host/live.img cm-live
    python3 - "$WORK/cm-live" <<'EOF'
import os, random, sys
rng = random.Random(7)
root = sys.argv[1]
for i in range(100):
    with open(os.path.join(root, f"f{i:03d}"), "wb") as f:
        f.write(rng.randbytes(4 << 20))
        f.flush()
        os.fsync(f.fileno())
EOF
    cp --reflink=always cm-host/live.img cm-host/full.img
    umount cm-live
    echo "$SAVED_EXPIRE" >/proc/sys/vm/dirty_expire_centisecs
    SAVED_EXPIRE=
    cp --reflink=always cm-host/full.img cm-host/replayed.img
    mount -o loop cm-host/replayed.img cm-live && umount cm-live
fi
log_blocks=$(debugfs -c -R logdump cm-host/full.img 2>/dev/null | awk '
    /Journal starts at block/ {start = $5 + 0}
    /end of journal/ {for (i = 1; i <= NF; i++) if ($i == "block") end = $(i + 1) + 0}
    END {print (end >= start) ? end - start : end + 32768 - 1 - start}')

# Online backup of $1 through rime serve; prints seconds.
online_backup() {
    rm -f "$WORK/cm-control.sock"
    "$RIME" serve "$1" --control "$WORK/cm-control.sock" --state-dir "$WORK/cm-cbt" --spill-dir "$WORK" \
        --nbd "unix:$WORK/cm-nbd.sock" 2>"$WORK/cm-serve.log" &
    SERVE_PID=$!
    for _ in $(seq 100); do [[ -S $WORK/cm-control.sock ]] && break; sleep 0.1; done
    backup --mode online "$1"
    kill "$SERVE_PID"
    wait "$SERVE_PID" 2>/dev/null || true
    SERVE_PID=
}

# The time the journal read itself took inside an online backup (rime's debug log).
journal_seconds() {
    RIME_LOG=rime_volume=debug online_backup cm-host/full.img >/dev/null
    sed 's/\x1b\[[0-9;]*m//g' "$WORK/cm-err" | grep -o 'journal read .*seconds=[0-9.]*' | grep -o '[0-9.]*$'
}

# ---------------------------------------------------------------------------------------------
# Rounds: each pair A B, then B A in the next round
# ---------------------------------------------------------------------------------------------
declare -A T
pair() { # key-a key-b command-a... -- command-b...
    local ka=$1 kb=$2
    shift 2
    local -a a=() b=()
    while [[ $1 != -- ]]; do a+=("$1"); shift; done
    shift
    b=("$@")
    if ((round % 2)); then
        T[$ka]+="$("${a[@]}") "
        T[$kb]+="$("${b[@]}") "
    else
        T[$kb]+="$("${b[@]}") "
        T[$ka]+="$("${a[@]}") "
    fi
}
for round in $(seq "$ROUNDS"); do
    log "round $round of $ROUNDS"
    pair journal replayed online_backup cm-host/full.img -- online_backup cm-host/replayed.img
    T[scan]+="$(journal_seconds) "
    map_full=$(jq -r '.manifest.volumes[0].map' "$WORK/cm-out")
    pair always never backup --cross-check always base.img -- backup --cross-check never base.img
    pair ext3auto ext3never backup base-ext3.img -- backup --cross-check never base-ext3.img
    if [[ -n ${BENCH_BASELINE:-} ]]; then
        pair now before backup base.img -- baseline_backup base.img
    fi
done
backup base-ext3.img >/dev/null
map_ext3=$(jq -r '.manifest.volumes[0].map' "$WORK/cm-out")

m() { tr ' ' '\n' <<<"${T[$1]}" | grep . | median; }
ratio() { awk -v a="$(m "$1")" -v b="$(m "$2")" 'BEGIN {printf "%.3f", a / b}'; }
cat <<EOF

Median of $ROUNDS rounds, wall seconds, page cache dropped before each run (rime $(git -C "$ROOT" rev-parse --short HEAD)):

| backup | with the check | without | ratio |
|---|---:|---:|---:|
| online, 4 GiB ext4, 128 MiB journal ($log_blocks log blocks live) vs the same after replay | $(m journal) | $(m replayed) | $(ratio journal replayed) |
| of which the journal read itself (median, s) | $(m scan) | | |
| benchmark volume (ext4, metadata_csum): --cross-check always vs never | $(m always) | $(m never) | $(ratio always never) |
| benchmark files on ext3: default (cross-check on) vs never | $(m ext3auto) | $(m ext3never) | $(ratio ext3auto ext3never) |

$(if [[ -n ${BENCH_BASELINE:-} ]]; then echo "| clean benchmark volume (no journal to replay): this rime vs $BENCH_BASELINE | $(m now) | $(m before) | $(ratio now before) |"; fi)

map of the full-journal copy: $map_full
map of the ext3 volume: $map_ext3
EOF
