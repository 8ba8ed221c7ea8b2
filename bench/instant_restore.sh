#!/usr/bin/env bash
# Instant recovery (issue 11): the time from `rime vm instant-restore SNAPSHOT --vm NAME --as NEW`
# to the VM running from the repository, per disk size, and the time `--finish` then takes to copy
# the disk to a local qcow2 while the VM runs.
#
# Each VM has one sparse qcow2 disk of the given size holding DATA_MIB of random data spread over
# it (at its start, middle and end), is backed up shut off with `rime backup --vm`, and is then
# started instantly ROUNDS times under new names (each cancelled again), and once more to finish.
# The VMs are 64 MiB guests without an OS under TCG.
#
#   sudo bench/instant_restore.sh      # prints a Markdown table; figures go to docs/PERFORMANCE.md
#
# Environment: INSTANT_WORK (default bench/work/instant), INSTANT_SIZES_GIB (default "4 16"),
# INSTANT_DATA_MIB (default 96), INSTANT_ROUNDS (default 3; the median is printed), RIME (default
# target/release/rime, built if missing). Needs root, a running libvirtd (qemu:///system),
# qemu-img, qemu-io, python3.
set -euo pipefail

BENCH=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
ROOT=$(dirname "$BENCH")
W=${INSTANT_WORK:-$BENCH/work/instant}
SIZES=${INSTANT_SIZES_GIB:-"4 16"}
DATA_MIB=${INSTANT_DATA_MIB:-96}
ROUNDS=${INSTANT_ROUNDS:-3}
RIME=${RIME:-$ROOT/target/release/rime}
PREFIX="rime-bench-instant"

log() { printf '[instant %(%H:%M:%S)T] %s\n' -1 "$*" >&2; }
[[ $(id -u) == 0 ]] || { log "run as root"; exit 1; }
virsh -c qemu:///system uri >/dev/null || { log "libvirtd is not running"; exit 1; }
[[ -x $RIME ]] || (cd "$ROOT" && cargo build --release -q -p rime)
export LIBVIRT_DEFAULT_URI=qemu:///system
rime() { "$RIME" --repo "$W/repo" "$@"; }

NAMES=()
teardown() {
    for n in "${NAMES[@]}"; do
        rime vm instant-restore --cancel "$n" >/dev/null 2>&1 || true
        virsh -q destroy "$n" >/dev/null 2>&1 || true
        virsh -q undefine "$n" --nvram >/dev/null 2>&1 || true
    done
    NAMES=()
}
trap teardown EXIT

median() { python3 -c 'import sys, statistics; print("%.2f" % statistics.median(float(x) for x in sys.argv[1:]))' "$@"; }
field() { python3 -c 'import json, sys; print(json.load(sys.stdin)[sys.argv[1]])' "$1"; }

rm -rf "$W" && mkdir -p "$W" && chmod 755 "$W" "$BENCH/work" 2>/dev/null || true
rime init >/dev/null

echo "| disk size | data | backup | instant-restore → running (median of $ROUNDS) | runs | --finish (copy while running) |"
echo "|---|---|---|---|---|---|"
for gib in $SIZES; do
    src="$PREFIX-src-$gib"
    disk="$W/disk-$gib.qcow2"
    qemu-img create -q -f qcow2 "$disk" "${gib}G"
    third=$((DATA_MIB / 3))
    for at in 0 $((gib * 512)) $((gib * 1024 - third)); do
        head -c $((third << 20)) /dev/urandom > "$W/chunk.bin"
        qemu-io -f qcow2 -c "write -s $W/chunk.bin ${at}M ${third}M" "$disk" >/dev/null
    done
    rm -f "$W/chunk.bin"
    cat > "$W/src.xml" <<EOF
<domain type='qemu'><name>$src</name><memory unit='MiB'>64</memory><vcpu>1</vcpu>
<os><type arch='x86_64' machine='pc'>hvm</type></os><features><acpi/></features>
<devices><disk type='file' device='disk'><driver name='qemu' type='qcow2'/><source file='$disk'/><target dev='vda' bus='virtio'/></disk></devices></domain>
EOF
    virsh -q define "$W/src.xml" >/dev/null
    NAMES+=("$src")
    t0=$(date +%s.%N)
    rime backup --vm "$src" --json > "$W/backup.json"
    backup_s=$(python3 -c "print('%.1f' % ($(date +%s.%N) - $t0))")
    snap=$(field snapshot < "$W/backup.json")
    times=()
    for r in $(seq "$ROUNDS"); do
        name="$PREFIX-$gib-$r"
        NAMES+=("$name")
        s=$(rime vm instant-restore "$snap" --vm "$src" --as "$name" --json | field seconds_to_running)
        state=$(virsh -q domstate "$name")
        [[ $state == running ]] || { log "$name is $state"; exit 1; }
        log "${gib} GiB round $r: running after $s s"
        times+=("$(printf '%.2f' "$s")")
        rime vm instant-restore --cancel "$name" >/dev/null
    done
    name="$PREFIX-$gib-finish"
    NAMES+=("$name")
    rime vm instant-restore "$snap" --vm "$src" --as "$name" --json >/dev/null
    mkdir -p "$W/finished-$gib" && chmod 755 "$W/finished-$gib"
    finish_s=$(rime vm instant-restore --finish "$name" --to "$W/finished-$gib" --json | field seconds)
    state=$(virsh -q domstate "$name")
    echo "| $gib GiB | $DATA_MIB MiB | ${backup_s} s | $(median "${times[@]}") s | ${times[*]} | $(printf '%.1f' "$finish_s") s ($state) |"
    teardown
    rm -f "$disk" "$W/finished-$gib"/*
done
