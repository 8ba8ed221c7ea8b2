#!/usr/bin/env bash
# Freeze window and gate-closed time of one backup, per snapshot provider (issue 9), for one and
# for three volumes at two sizes, side by side with the script administrators write without
# Rime: freeze every filesystem, copy the image files, thaw (`cp --reflink=always` where the
# storage can clone, as a storage-native script would; a plain sparse `cp` for the volumes that
# Rime serves, as a dd/partclone script does). Each volume is an ext4 image FILL_PCT % full of
# files, loop-mounted (so it is in use and its filesystem is frozen by Rime's fsfreeze writer):
#
#   rime-serve      images served by `rime serve`, mounted through its FUSE file;
#   reflink         images on an XFS (reflink=1) loop mount, each cloned (FICLONE);
#   btrfs-snapshot  images in one btrfs subvolume, taken by one read-only subvolume snapshot.
#
#   sudo bench/consistency.sh      # prints a Markdown table; figures go to docs/PERFORMANCE.md
#
# Environment: CONS_WORK (default bench/work/consistency), CONS_SIZES_MIB (default "256 4096"),
# CONS_FILL_PCT (how full each volume's filesystem is, default 25), CONS_ROUNDS (default 3; the median is printed), RIME (default:
# target/release/rime, built if missing). Needs root, xfsprogs, btrfs-progs, e2fsprogs, fuse3,
# python3.
set -euo pipefail

BENCH=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
ROOT=$(dirname "$BENCH")
W=${CONS_WORK:-$BENCH/work/consistency}
SIZES=${CONS_SIZES_MIB:-"256 4096"}
FILL_PCT=${CONS_FILL_PCT:-25}
ROUNDS=${CONS_ROUNDS:-3}
RIME=${RIME:-$ROOT/target/release/rime}

log() { printf '[consistency %(%H:%M:%S)T] %s\n' -1 "$*" >&2; }
[[ $(id -u) == 0 ]] || { log "run as root"; exit 1; }
[[ -x $RIME ]] || (cd "$ROOT" && cargo build --release -q -p rime)

MOUNTS=() LOOPS=() PIDS=()
teardown() {
    for m in "${MOUNTS[@]}"; do fsfreeze -u "$m" 2>/dev/null || true; done
    # Inner filesystems first, each with its loop device, so the host filesystem is let go.
    for ((i = ${#MOUNTS[@]} - 1; i >= 0; i--)); do
        umount "${MOUNTS[$i]}" 2>/dev/null || umount -l "${MOUNTS[$i]}" || true
        losetup -d "${LOOPS[$i]}" 2>/dev/null || true
    done
    for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done
    wait 2>/dev/null || true
    MOUNTS=() LOOPS=() PIDS=()
}
trap teardown EXIT

# What a killed earlier run left under $W: its mounts (deepest first) and loop devices.
clean_stale() {
    local m l
    for m in $(awk -v w="$W" 'index($2, w) == 1 {print $2}' /proc/mounts | sort -r); do umount -l "$m" || true; done
    for l in $(losetup --list --noheadings --output NAME,BACK-FILE | awk -v w="$W" 'index($2, w) == 1 {print $1}'); do losetup -d "$l" || true; done
    pkill -f "rime serve $W/" 2>/dev/null || true
}

now() { date +%s.%N; }
ms_since() { python3 -c "import sys; print(f'{(float(sys.argv[2]) - float(sys.argv[1])) * 1000:.1f}')" "$1" "$(now)"; }

mount_loop() { # FILE DIR: loop-mounts FILE at DIR
    local dev
    dev=$(losetup --find --show "$1")
    LOOPS+=("$dev")
    mkdir -p "$2"
    mount "$dev" "$2"
    MOUNTS+=("$2")
}

make_host() { # PROVIDER SIZE_MIB COUNT: prints the directory the images go in
    local host=$W/host size=$(($2 * $3 + 1024))
    mkdir -p "$host"
    case $1 in
    reflink)
        truncate -s "${size}M" "$W/xfs.img"
        mkfs.xfs -q -f -m reflink=1 "$W/xfs.img"
        mount_loop "$W/xfs.img" "$host"
        echo "$host" ;;
    btrfs-snapshot)
        truncate -s "${size}M" "$W/btrfs.img"
        mkfs.btrfs -q -f "$W/btrfs.img" >/dev/null
        mount_loop "$W/btrfs.img" "$host"
        btrfs -q subvolume create "$host/vms"
        echo "$host/vms" ;;
    rime-serve) echo "$host" ;;
    esac
}

# One case: PROVIDER SIZE_MIB COUNT. Prints "rime_freeze rime_gate rime_total peer_freeze peer_total".
run_case() {
    local provider=$1 size=$2 count=$3 dir i img vols=() mnts=()
    clean_stale
    rm -rf "$W"; mkdir -p "$W"
    dir=$(make_host "$provider" "$size" "$count")
    for ((i = 1; i <= count; i++)); do
        img=$dir/vm$i.img
        truncate -s "${size}M" "$img"
        mkfs.ext4 -q -F "$img"
        if [[ $provider == rime-serve ]]; then
            mkdir -p "$W/serve$i/fuse"
            "$RIME" serve "$img" --control "$W/serve$i/ctl.sock" --fuse "$W/serve$i/fuse" \
                --state-dir "$W/serve$i/state" 2>"$W/serve$i/log" &
            PIDS+=($!)
            for _ in $(seq 100); do [[ -S $W/serve$i/ctl.sock ]] && break; sleep 0.1; done
            mount_loop "$W/serve$i/fuse/vm$i.img" "$W/mnt$i"
        else
            mount_loop "$img" "$W/mnt$i"
        fi
        head -c "$((size * FILL_PCT / 100))M" /dev/urandom >"$W/mnt$i/data.bin"
        mnts+=("$W/mnt$i")
        vols+=("$img")
    done
    sync
    "$RIME" --repo "$W/repo" init >/dev/null
    local t0 forced=()
    [[ $count == 1 && $provider == btrfs-snapshot ]] && forced=(--provider btrfs-snapshot)
    t0=$(now)
    "$RIME" --repo "$W/repo" backup --json --mode online "${forced[@]}" "${vols[@]}" >"$W/backup.json"
    local total
    total=$(ms_since "$t0")
    local rime
    rime=$(python3 - "$W/backup.json" "$provider" <<'PY'
import json, sys
m = json.load(open(sys.argv[1]))["manifest"]
used = {v["provider"] for v in m["volumes"]}
assert used == {sys.argv[2]}, f"expected {sys.argv[2]}, the backup used {used}"
c = m["consistency"]
assert sum(w["kind"] == "fsfreeze" for w in c["writers"]) == len(m["volumes"]), c["writers"]
gate = c.get("gate_closed_ms")
print(f'{c["freeze_window_ms"]:.1f} {"-" if gate is None else f"{gate:.1f}"}')
PY
    )
    # The peer: freeze all, copy, thaw.
    local copy=(cp --sparse=always)
    [[ $provider != rime-serve ]] && copy=(cp --reflink=always)
    mkdir -p "$dir/peer"
    t0=$(now)
    for m in "${mnts[@]}"; do fsfreeze -f "$m"; done
    for img in "${vols[@]}"; do "${copy[@]}" "$img" "$dir/peer/$(basename "$img")"; done
    for m in "${mnts[@]}"; do fsfreeze -u "$m"; done
    local peer
    peer=$(ms_since "$t0")
    if [[ $provider == rime-serve ]]; then
        # A copy made under freeze is the whole backup; else the clones still have to be read.
        echo "$rime $total $peer $peer"
    else
        local t1
        t1=$(now)
        cat "$dir"/peer/*.img >/dev/null
        echo "$rime $total $peer $(python3 -c "import sys; print(f'{float(sys.argv[1]) + float(sys.argv[2]):.1f}')" "$peer" "$(ms_since "$t1")")"
    fi
    teardown
}

median() { python3 -c "import statistics, sys; v=[x for x in sys.argv[1:] if x != '-']; print(f'{statistics.median(map(float, v)):.1f}' if v else '-')" "$@"; }

echo "| provider | volumes | size each | Rime freeze window | gate closed | Rime backup total | script freeze window | script total | freeze window, script / Rime |"
echo "|---|---|---|---|---|---|---|---|---|"
for provider in rime-serve reflink btrfs-snapshot; do
    for size in $SIZES; do
        for count in 1 3; do
            f=() g=() t=() pf=() pt=()
            for ((r = 1; r <= ROUNDS; r++)); do
                log "$provider, $count x $size MiB, round $r"
                read -r a b c d e < <(run_case "$provider" "$size" "$count")
                f+=("$a") g+=("$b") t+=("$c") pf+=("$d") pt+=("$e")
            done
            F=$(median "${f[@]}") PF=$(median "${pf[@]}")
            ratio=$(python3 -c "import sys; print(f'x{float(sys.argv[2]) / float(sys.argv[1]):.1f}')" "$F" "$PF")
            echo "| $provider | $count | $size MiB | $F ms | $(median "${g[@]}") ms | $(median "${t[@]}") ms | $PF ms | $(median "${pt[@]}") ms | $ratio |"
        done
    done
done
