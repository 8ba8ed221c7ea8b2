#!/usr/bin/env bash
# Each VM's interruption (stopped to running again) in a `--vm-aware` backup of one volume holding
# three VMs (issue 10), at two volume sizes, side by side:
#
#   rime after-snapshot   rime backup --vm-aware (the default): saved all at once, started again
#                         right after the one snapshot, then the volume is imaged;
#   rime after-backup     the same with --vm-resume after-backup: started once all data is written
#                         (what the product Rime modernises did with its resume scripts run after
#                         the backup);
#   virsh script          what an administrator writes without Rime: `virsh managedsave` each VM
#                         in turn, back up the volume (the same rime backup, offline of VMs), then
#                         `virsh start` each in turn.
#
# The volume is an ext4 image served by `rime serve` and mounted through its FUSE file, FILL_PCT %
# full of random files, the three VMs' qcow2 disks on it; the VMs are 64 MiB guests without an OS
# under TCG. Every run is a full backup into a new repository. Modes alternate within each round;
# the median over rounds is printed.
#
#   sudo bench/vms.sh        # prints a Markdown table; figures go to docs/PERFORMANCE.md
#
# Environment: VMS_WORK (default bench/work/vms), VMS_SIZES_MIB (default "1024 8192"),
# VMS_FILL_PCT (default 50), VMS_ROUNDS (default 3), RIME (default target/release/rime, built if
# missing). Needs root, a running libvirtd (qemu:///system), qemu-img, e2fsprogs, fuse3, python3.
set -euo pipefail

BENCH=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
ROOT=$(dirname "$BENCH")
W=${VMS_WORK:-$BENCH/work/vms}
SIZES=${VMS_SIZES_MIB:-"1024 8192"}
FILL_PCT=${VMS_FILL_PCT:-50}
ROUNDS=${VMS_ROUNDS:-3}
RIME=${RIME:-$ROOT/target/release/rime}
PREFIX="rime-bench-vm"

log() { printf '[vms %(%H:%M:%S)T] %s\n' -1 "$*" >&2; }
[[ $(id -u) == 0 ]] || { log "run as root"; exit 1; }
virsh -c qemu:///system uri >/dev/null || { log "libvirtd is not running"; exit 1; }
[[ -x $RIME ]] || (cd "$ROOT" && cargo build --release -q -p rime)
export LIBVIRT_DEFAULT_URI=qemu:///system

SERVE_PID="" LOOP="" MNT=""
teardown() {
    for n in 1 2 3; do
        virsh -q destroy "$PREFIX-$n" 2>/dev/null || true
        virsh -q undefine "$PREFIX-$n" --managed-save 2>/dev/null || true
    done
    [[ -n $MNT ]] && { umount "$MNT" 2>/dev/null || umount -l "$MNT" || true; }
    [[ -n $LOOP ]] && { losetup -d "$LOOP" 2>/dev/null || true; }
    [[ -n $SERVE_PID ]] && { kill "$SERVE_PID" 2>/dev/null || true; wait "$SERVE_PID" 2>/dev/null || true; }
    fusermount3 -u -z "$W/fuse" 2>/dev/null || true
    SERVE_PID="" LOOP="" MNT=""
}
trap teardown EXIT

now() { date +%s.%N; }

setup() { # SIZE_MIB
    teardown
    rm -rf "$W" && mkdir -p "$W/fuse" "$W/mnt" && chmod 755 "$W" "$BENCH/work" 2>/dev/null || true
    truncate -s "${1}M" "$W/vol.img"
    mkfs.ext4 -q -F "$W/vol.img"
    "$RIME" serve "$W/vol.img" --fuse "$W/fuse" --control "$W/ctl.sock" --state-dir "$W/cbt" --spill-dir "$W" >"$W/serve.log" 2>&1 &
    SERVE_PID=$!
    for _ in $(seq 100); do [[ -S $W/ctl.sock && -e $W/fuse/vol.img ]] && break; sleep 0.1; done
    LOOP=$(losetup --find --show "$W/fuse/vol.img")
    MNT=$W/mnt
    mount "$LOOP" "$MNT" && chmod 755 "$MNT"
    local fill=$(( $1 * FILL_PCT / 100 ))
    log "filling $fill MiB of random files into a $1 MiB volume"
    mkdir -p "$MNT/data"
    local left=$fill i=0
    while (( left > 0 )); do
        local n=$(( left < 256 ? left : 256 ))
        head -c "${n}M" /dev/urandom >"$MNT/data/f$i"
        left=$(( left - n )); i=$(( i + 1 ))
    done
    sync
    for n in 1 2 3; do
        qemu-img create -q -f qcow2 "$MNT/vm$n.qcow2" 1G
        cat >"$W/vm$n.xml" <<EOF
<domain type='qemu'><name>$PREFIX-$n</name><memory unit='MiB'>64</memory><vcpu>1</vcpu>
<os><type arch='x86_64' machine='pc'>hvm</type></os><features><acpi/></features>
<devices><disk type='file' device='disk'><driver name='qemu' type='qcow2'/><source file='$MNT/vm$n.qcow2'/><target dev='vda' bus='virtio'/></disk></devices></domain>
EOF
        virsh -q define "$W/vm$n.xml" >/dev/null
        virsh -q start "$PREFIX-$n" >/dev/null
    done
}

# Prints "ms1 ms2 ms3 backup_seconds" for one run of MODE, into a new repository (a full backup:
# its length is what an after-backup resume adds to each VM's interruption).
run_mode() {
    local mode=$1
    rm -rf "$W/repo" && "$RIME" --repo "$W/repo" init >/dev/null
    case $mode in
        after-snapshot|after-backup)
            local t0; t0=$(now)
            "$RIME" --repo "$W/repo" backup --vm-aware "$MNT" --vm-resume "$mode" --json >"$W/out.json" 2>"$W/err.log"
            python3 - "$W/out.json" "$t0" "$(now)" "$PREFIX" <<'EOF'
import json, sys
m = json.load(open(sys.argv[1]))["manifest"]
by = {d["name"]: d["interruption_ms"] for d in m["vms"]["domains"]}
print(" ".join(f"{by[f'{sys.argv[4]}-{n}']:.0f}" for n in (1, 2, 3)), f"{float(sys.argv[3]) - float(sys.argv[2]):.2f}")
EOF
            ;;
        script)
            declare -A stop start
            local t0; t0=$(now)
            for n in 1 2 3; do stop[$n]=$(now); virsh -q managedsave "$PREFIX-$n" >/dev/null; done
            "$RIME" --repo "$W/repo" backup "$MNT" >/dev/null 2>"$W/err.log"
            for n in 1 2 3; do virsh -q start "$PREFIX-$n" >/dev/null; start[$n]=$(now); done
            python3 -c "import sys; a=sys.argv[1:]; print(' '.join(f'{(float(a[i+3])-float(a[i]))*1000:.0f}' for i in range(3)), f'{float(a[7])-float(a[6]):.2f}')" \
                "${stop[1]}" "${stop[2]}" "${stop[3]}" "${start[1]}" "${start[2]}" "${start[3]}" "$t0" "$(now)"
            ;;
    esac
}

echo "| volume | used | mode | VM 1 (ms) | VM 2 (ms) | VM 3 (ms) | backup (s) |"
echo "|---|---|---|---|---|---|---|"
for size in $SIZES; do
    setup "$size"
    declare -A results=()
    for r in $(seq "$ROUNDS"); do
        for mode in after-snapshot after-backup script; do
            line=$(run_mode "$mode")
            log "size $size MiB round $r $mode: $line"
            results[$mode]+="$line;"
        done
    done
    for mode in after-snapshot after-backup script; do
        python3 - "$size" "$FILL_PCT" "$mode" "${results[$mode]}" <<'EOF'
import statistics, sys
size, fill, mode, runs = sys.argv[1], sys.argv[2], sys.argv[3], [r.split() for r in sys.argv[4].split(";") if r]
med = [statistics.median(float(r[i]) for r in runs) for i in range(4)]
label = {"after-snapshot": "rime --vm-aware (resume after snapshot)", "after-backup": "rime --vm-aware --vm-resume after-backup", "script": "virsh managedsave, backup, virsh start"}[mode]
print(f"| {int(size)//1024 if int(size) >= 1024 else size} {'GiB' if int(size) >= 1024 else 'MiB'} | {fill}% | {label} | {med[0]:.0f} | {med[1]:.0f} | {med[2]:.0f} | {med[3]:.1f} |")
EOF
    done
done
