#!/usr/bin/env bash
# Live VM backup, side by side in one run: `rime backup --vm` against virtnbdbackup 1.9, both in
# libvirt's pull mode (checkpoint + NBD export) on a running VM, full then incremental, and the
# restore of the newest backup by each (`rime restore --volume NAME.vda --format qcow2`,
# `virtnbdrestore`).
#
# The VM: a 4 GiB qcow2 disk (vda, virtio) holding a bare ext4 filesystem about half full of mixed
# files (bench/gen_data.py: binaries from /usr, generated text and sources, large random files),
# written on the host before the VM starts; the free blocks hold old random bytes (the raw image is
# filled with random data and made with `mkfs.ext4 -E nodiscard`, like a reused disk). The domain is
# TCG, 128 MiB, with no guest OS (SeaBIOS finds nothing to boot and waits), so there is no guest
# agent: both tools take crash-consistent backups, nothing frozen.
#
# Three identical VMs, each with its own copy of the disk: one for Rime, one for virtnbdbackup with
# its defaults (no compression), one for virtnbdbackup --compress (lz4). They cannot share one VM:
# virtnbdbackup refuses a domain holding any checkpoint it did not create ("Foreign checkpoint
# found: [rime...]"), and a full virtnbdbackup deletes all its own checkpoints. Each writes the same
# change (CHANGE_MIB of new random data, at the same offsets inside used file data, through QEMU's
# qemu-io on the running device) between the full and the incremental backup.
#
# Compression: Rime's default (zstd level 3, 64 KiB chunks, deduplicated); virtnbdbackup's default
# is none (a sparse stream of the allocated extents), `-z` is lz4 (level 2 as 1.9 reports it).
# Rime reads only the blocks ext4 uses (through the export), virtnbdbackup every allocated extent
# of the qcow2, old garbage in free blocks included.
#
# Per round: fresh repository / output directories, all checkpoints of the VMs deleted first; full
# backups, the change, incremental backups, restores (the tools' order turns every round). Page
# caches are dropped before each timed run. Per run: wall seconds, CPU seconds of the tool's
# process tree (/usr/bin/time; virtnbdrestore's qemu-nbd forks away and is not counted) and of the
# VM's QEMU, "bytes read" as the tool reports it (Rime: read_bytes; virtnbdbackup: "N bytes of
# data extents to backup"), "QEMU read" what the VM's QEMU process read (rchar of /proc/PID/io,
# the same measure for both), the repository / output size (du -sb) and its growth. Rime's qcow2
# restore is a raw restore and a `qemu-img convert`; the raw restore alone is timed too. Medians
# over the rounds, then ratios. In the last round (VERIFY=all: every round) each restored disk is
# checked against its VM's disk as it is then: e2fsck -fn clean, same file names, sizes and SHA-1.
# Last, one more change and a Rime incremental under strace: the programs it runs and their times.
#
#   sudo bash bench/vm_live.sh [WORKDIR]      # from the repository root
#
# Environment: RIME (default target/release/rime), ROUNDS (3), DISK_GIB (4), FILL_MIB (2048: the
# files' share, split binaries/text/random 40/30/30), CHANGE_MIB (40), VERIFY (last|all|none),
# KEEP (1: leave the disks, repositories and outputs in WORKDIR; about 7 x DISK_GIB GiB at the
# peak). Needs root, libvirtd (qemu:///system), qemu-img, qemu-storage-daemon (FUSE export),
# e2fsprogs, util-linux (unshare), strace, python3, virtnbdbackup.
set -euo pipefail
RIME=${RIME:-$PWD/target/release/rime}
ROOT=$PWD
W=${1:-/var/lib/libvirt/images/rime-vm-bench}
ROUNDS=${ROUNDS:-3}
DISK_GIB=${DISK_GIB:-4}
FILL_MIB=${FILL_MIB:-2048}
CHANGE_MIB=${CHANGE_MIB:-40}
VERIFY=${VERIFY:-last}
PREFIX=rime-vmlive-bench
TOOLS=(rime vnb vnbz)
export LIBVIRT_DEFAULT_URI=qemu:///system
QDEV=/machine/peripheral/virtio-disk0/virtio-backend

log() { printf '[vm_live %(%H:%M:%S)T] %s\n' -1 "$*" >&2; }
[[ $(id -u) == 0 ]] || { log "run as root"; exit 1; }
[[ -x $RIME ]] || { log "no rime binary at $RIME"; exit 1; }
virsh uri >/dev/null || { log "libvirtd is not running"; exit 1; }
command -v virtnbdbackup >/dev/null || { log "virtnbdbackup is not installed"; exit 1; }

drop() { sync; echo 3 > /proc/sys/vm/drop_caches; }
now() { date +%s.%N; }
dom() { echo "$PREFIX-$1"; }

cleanup() {
    qsd_stop
    for t in "${TOOLS[@]}"; do
        virsh -q destroy "$(dom "$t")" >/dev/null 2>&1 || true
        virsh -q undefine "$(dom "$t")" --checkpoints-metadata --nvram --managed-save >/dev/null 2>&1 || true
    done
}
# At the end, the disks, repositories and restored images go (about 7 times DISK_GIB); the
# figures, logs and file lists stay in $W. KEEP=1 keeps everything.
at_exit() {
    cleanup
    [[ ${KEEP:-0} == 1 || ! -d $W ]] || (cd "$W" && rm -rf disk-*.qcow2 disk.raw base.qcow2 repo-rime out-* restore-* change export.img)
}
trap at_exit EXIT
qsd_stop() {
    if [[ -s $W/qsd.pid ]]; then
        local p; p=$(cat "$W/qsd.pid")
        kill "$p" 2>/dev/null || true
        for _ in $(seq 50); do kill -0 "$p" 2>/dev/null || break; sleep 0.1; done
        rm -f "$W/qsd.pid"
    fi
}

qemu_rchar() { awk '/^rchar/ {print $2}' "/proc/$(cat "/run/libvirt/qemu/$(dom "$1").pid")/io"; }
delete_checkpoints() { # TOOL: every checkpoint of its VM, bitmaps included
    local d; d=$(dom "$1")
    # children before parents: the newest first
    for c in $(virsh checkpoint-list "$d" --name --topological | tac); do
        virsh -q checkpoint-delete "$d" "$c" >/dev/null
    done
}

# ---------------------------------------------------------------------------------------- setup
cleanup
rm -rf "$W"; mkdir -p "$W/mnt" "$W/change"; chmod 755 "$W" "$W/change"
free_gib=$(( $(df -B1 --output=avail "$W" | tail -1) >> 30 ))
(( free_gib >= DISK_GIB * 7 )) || { log "$W: $free_gib GiB free, about $((DISK_GIB * 7)) GiB needed"; exit 1; }
cd "$W"
log "disk: $DISK_GIB GiB of random bytes, ext4 (nodiscard), $FILL_MIB MiB of files"
dd if=/dev/urandom of=disk.raw bs=4M count=$((DISK_GIB * 256)) status=none
mkfs.ext4 -q -F -E nodiscard disk.raw
# Where the change goes: CHANGE_MIB in writes of 4 KiB to 1 MiB, each inside one extent of a
# file (FIEMAP), no two overlapping; the same offsets every round, new data every round.
cat >plan.py <<'EOF'
import array, fcntl, os, random, struct, sys
mnt, total = sys.argv[1], int(sys.argv[2]) << 20
FS_IOC_FIEMAP, HDR, EXT = 0xC020660B, 32, 56
extents = []
for dp, _, fs in os.walk(mnt):
    for f in fs:
        p = os.path.join(dp, f)
        if os.path.islink(p) or not os.path.isfile(p):
            continue
        with open(p, "rb") as fh:
            n = 512
            buf = bytearray(HDR + n * EXT)
            struct.pack_into("<QQIIII", buf, 0, 0, (1 << 64) - 1, 1, 0, n, 0)  # FIEMAP_FLAG_SYNC
            fcntl.ioctl(fh.fileno(), FS_IOC_FIEMAP, buf)
            count = struct.unpack_from("<I", buf, 20)[0]
            for i in range(count):
                _, phys, length = struct.unpack_from("<QQQ", buf, HDR + i * EXT)
                flags = struct.unpack_from("<I", buf, HDR + i * EXT + 40)[0]
                if not flags & 0xA0E and length >= 4096:  # not unknown, delalloc, encoded, inline, unwritten
                    extents.append((phys, length))
rng = random.Random(42)
taken, done = [], 0
weights = [l for _, l in extents]
while done < total:
    size = min(rng.choice([4, 16, 64, 256, 1024]) << 10, total - done)
    phys, length = rng.choices(extents, weights=weights)[0]
    if length < size:
        continue
    off = phys + rng.randrange(0, (length - size) // 4096 + 1) * 4096
    if any(off < o + l and o < off + size for o, l in taken):
        continue
    taken.append((off, size))
    done += size
for o, l in sorted(taken):
    print(o, l)
EOF
# Mounted in a mount namespace of its own: a namespace another program creates meanwhile would
# otherwise hold a copy of the mount, and the filesystem would stay mounted (its journal not
# empty, its last writes not in the image) after our umount.
unshare -m --propagation private bash -euo pipefail -c '
    mount -o loop disk.raw mnt
    python3 "$1/bench/gen_data.py" mnt/data --binaries "$2" --text "$3" --random "$3" 2>&1 | sed "s/^/  /" >&2
    sync
    python3 plan.py mnt "$4" >change.plan
    echo "$(df -B1 --output=used mnt | tail -1 | tr -d " ") $(find mnt -type f | wc -l)" >fs.stats
    umount mnt' _ "$ROOT" $((FILL_MIB * 4 / 10)) $((FILL_MIB * 3 / 10)) "$CHANGE_MIB"
read -r used_df nfiles <fs.stats
# unmounted for good: the journal is empty, nothing for a mount (or Rime) to replay
jstart=$(dumpe2fs -h disk.raw 2>/dev/null | awk -F: '/^Journal start/ {gsub(/ /, "", $2); print $2}')
[[ $jstart == 0 ]] || { log "the new filesystem's journal is not empty (start $jstart)"; exit 1; }
e2fsck -fn disk.raw >/dev/null 2>&1 || { log "e2fsck finds errors in the new filesystem"; exit 1; }
qemu-img convert -O qcow2 disk.raw base.qcow2
rm -f disk.raw
[[ -s change.plan ]] || { log "no extent found for the change"; exit 1; }
log "$(wc -l <change.plan) writes planned; $nfiles files, df used $used_df bytes"
for t in "${TOOLS[@]}"; do
    cp --sparse=always base.qcow2 "disk-$t.qcow2"
    cat >"$t.xml" <<EOF
<domain type='qemu'><name>$(dom "$t")</name><memory unit='MiB'>128</memory><vcpu>1</vcpu>
<os><type arch='x86_64' machine='pc'>hvm</type></os><features><acpi/></features>
<devices><disk type='file' device='disk'><driver name='qemu' type='qcow2'/><source file='$W/disk-$t.qcow2'/><target dev='vda' bus='virtio'/></disk></devices></domain>
EOF
    virsh -q define "$t.xml" >/dev/null
    virsh -q start "$(dom "$t")" >/dev/null
done
rm -f base.qcow2
qcow2_bytes=$(stat -c %s disk-rime.qcow2)

# Writes the change into each VM's disk through its QEMU, new random data from seed $1.
change() {
    rm -rf change/*; mkdir -p change
    python3 - change.plan "$1" change <<'EOF'
import os, random, sys
rng = random.Random(1000 + int(sys.argv[2]))
for i, line in enumerate(open(sys.argv[1])):
    with open(os.path.join(sys.argv[3], f"c{i:04d}"), "wb") as f:
        f.write(rng.randbytes(int(line.split()[1])))
EOF
    chmod 644 change/*
    local i=0 off len t n0 n1 qlog
    declare -A before=()
    for t in "${TOOLS[@]}"; do before[$t]=$(grep -c '^wrote ' "/var/log/libvirt/qemu/$(dom "$t").log" || true); done
    while read -r off len; do
        for t in "${TOOLS[@]}"; do
            virsh qemu-monitor-command "$(dom "$t")" --hmp \
                "qemu-io -d $QDEV \"write -s $W/change/c$(printf %04d $i) $off $len\"" >/dev/null
        done
        i=$((i + 1))
    done <change.plan
    # qemu-io prints to QEMU's stdout (the domain's log): every write must be there. The flush
    # puts the new qcow2 metadata in the file, for qemu-img -U in the verification.
    for t in "${TOOLS[@]}"; do
        virsh qemu-monitor-command "$(dom "$t")" --hmp "qemu-io -d $QDEV flush" >/dev/null
        qlog=/var/log/libvirt/qemu/$(dom "$t").log
        n1=$(grep -c '^wrote ' "$qlog" || true)
        (( n1 - before[$t] == i )) || { log "qemu-io: $((n1 - before[$t])) of $i writes done on $t"; tail -5 "$qlog" >&2; exit 1; }
    done
}

# ---------------------------------------------------------------------------------- backups
RES=$W/results.tsv
: >"$RES"
# round tool phase seconds read qemu_read size added cpu qemu_cpu load
record() { printf '%s\n' "$(IFS=$'\t'; echo "$*")" >>"$RES"; }
# CPU seconds (user + system) of the command's process tree, as /usr/bin/time wrote them to $1
cpu_of() { awk '{printf "%.2f", $1 + $2}' "$1"; }
# CPU seconds of the VM's QEMU so far (utime + stime)
qemu_cpu() { awk -v hz="$(getconf CLK_TCK)" '{printf "%.2f", ($14 + $15) / hz}' "/proc/$(cat "/run/libvirt/qemu/$(dom "$1").pid")/stat"; }
load() { cut -d' ' -f1 /proc/loadavg; }
TIME=(/usr/bin/time -f '%U %S' -o "$W/cpu.tmp")

# One backup by TOOL at LEVEL (full|inc) of round R; records its figures.
backup() {
    local t=$1 level=$2 r=$3 d q0 c0 la t0 t1 before size read added
    d=$(dom "$t")
    case $t in rime) before=$(du -sb repo-rime | cut -f1) ;; *) before=$(du -sb "out-$t" 2>/dev/null | cut -f1 || echo 0) ;; esac
    drop
    q0=$(qemu_rchar "$t"); c0=$(qemu_cpu "$t"); la=$(load)
    case $t in
        rime)
            t0=$(now)
            "${TIME[@]}" "$RIME" --repo repo-rime backup --vm "$d" --json >"rime-$level.json" 2>"rime-$level.log"
            t1=$(now)
            read -r read mode < <(python3 -c '
import json, sys
m = json.load(open(sys.argv[1]))["manifest"]
v = m["volumes"][0]
modes = [dk["mode"] for dm in m["vms"]["domains"] for dk in dm["live"]["disks"]]
print(v["read_bytes"], ",".join(modes))' "rime-$level.json")
            [[ $mode == "$level"* ]] || log "WARNING: rime did a $mode backup where $level was expected (round $r)"
            ;;
        vnb|vnbz)
            local z=(); [[ $t == vnbz ]] && z=(--compress)
            [[ $level == full ]] && rm -rf "out-$t"
            t0=$(now)
            "${TIME[@]}" virtnbdbackup -d "$d" -l "$level" "${z[@]}" -o "out-$t" >"$t-$level.log" 2>&1
            t1=$(now)
            # the data file this run wrote (vda.full.data / vda.inc.virtnbdbackup.N.data)
            # what it says it reads: "N bytes of data extents to backup"
            read=$(grep -ao '[0-9]* bytes of data extents to backup' "$t-$level.log" | awk '{print $1}')
            ;;
    esac
    local q1; q1=$(qemu_rchar "$t")
    case $t in rime) size=$(du -sb repo-rime | cut -f1) ;; *) size=$(du -sb "out-$t" | cut -f1) ;; esac
    added=$((size - before))
    local secs; secs=$(echo "$t1 - $t0" | bc)
    local cpu qcpu; cpu=$(cpu_of cpu.tmp); qcpu=$(echo "$(qemu_cpu "$t") - $c0" | bc)
    record "$r" "$t" "$level" "$secs" "$read" "$((q1 - q0))" "$size" "$added" "$cpu" "$qcpu" "$la"
    log "round $r $t $level: ${secs}s (CPU ${cpu}s, QEMU ${qcpu}s, load $la), read $read, QEMU read $((q1 - q0)), repository $size (+$added)"
}

restore() { # TOOL ROUND
    local t=$1 r=$2 t0 t1
    rm -rf "restore-$t"; mkdir -p "restore-$t"
    drop
    local la; la=$(load)
    case $t in
        rime|rimeraw)
            # rime's qcow2 restore writes a raw image, then converts it with qemu-img; the raw
            # restore alone (rimeraw) shows what the conversion costs.
            local snap fmt=qcow2; snap=$(python3 -c 'import json,sys; print(json.load(open(sys.argv[1]))["manifest"]["id"])' rime-inc.json)
            [[ $t == rimeraw ]] && fmt=raw
            t0=$(now)
            "${TIME[@]}" "$RIME" --repo repo-rime restore "$snap" "restore-$t/vda.$fmt" --volume "$(dom rime).vda" --format $fmt \
                >"restore-$t.log" 2>&1
            t1=$(now)
            ;;
        vnb|vnbz)
            t0=$(now)
            "${TIME[@]}" virtnbdrestore -i "out-$t" -o "restore-$t" -n -L "$W/restore-$t.vlog" >"restore-$t.log" 2>&1
            t1=$(now)
            ;;
    esac
    local img; img=$(find "restore-$t" -name '*.qcow2' -o -name '*.raw' | head -1)
    [[ -n $img ]] || { log "no image restored by $t"; ls -l "restore-$t" >&2; exit 1; }
    local secs; secs=$(echo "$t1 - $t0" | bc)
    local cpu; cpu=$(cpu_of cpu.tmp)
    record "$r" "$t" restore "$secs" 0 0 "$(stat -c %s "$img")" 0 "$cpu" 0 "$la"
    log "round $r $t restore: ${secs}s (CPU ${cpu}s, load $la) -> $img ($(qemu-img info -U --output=json "$img" | python3 -c 'import json,sys; i=json.load(sys.stdin); print(i["format"], i["virtual-size"], "virtual,", i["actual-size"], "allocated")'))"
}

# Lists path, size and SHA-1 of every file of the ext4 filesystem in image $1 (qcow2 or raw;
# also a running VM's disk: no lock taken) into $2, after e2fsck -fn. The image is seen as a raw
# file through qemu-storage-daemon's FUSE export, read-only; no copy is made.
fsums() {
    local fmt; fmt=$(qemu-img info -U --output=json "$1" | python3 -c 'import json,sys; print(json.load(sys.stdin)["format"])')
    : >export.img
    qemu-storage-daemon --blockdev "driver=file,node-name=f,filename=$1,read-only=on,locking=off" \
        --blockdev "driver=$fmt,node-name=d,file=f,read-only=on" \
        --export "type=fuse,id=e,node-name=d,mountpoint=$W/export.img" --pidfile "$W/qsd.pid" --daemonize
    e2fsck -fn export.img >check.fsck 2>&1 || { log "e2fsck finds errors in $1:"; cat check.fsck >&2; qsd_stop; return 1; }
    unshare -m --propagation private bash -euo pipefail -c '
        mount -o ro,noload,loop export.img mnt
        (cd mnt && find . -type f -printf "%p %s\n" | sort && find . -type f -print0 | sort -z | xargs -0 sha1sum)
        umount mnt' >"$2"
    qsd_stop
    rm -f export.img
}
verify_vms() { # the VMs' disks as they are now (the last incremental's data)
    local t
    for t in "${TOOLS[@]}"; do fsums "disk-$t.qcow2" "sums-vm-$t"; done
    cmp -s sums-vm-rime sums-vm-vnb && cmp -s sums-vm-rime sums-vm-vnbz || { log "the three VMs' disks differ"; exit 1; }
}
verify_restore() { # TOOL: its restored disk against its VM's
    local t=$1
    fsums "$(find "restore-$t" -name '*.qcow2' | head -1)" "sums-restore-$t"
    if cmp -s "sums-vm-$t" "sums-restore-$t"; then
        log "verify $t: the restored disk holds the same $(grep -c '^[0-9a-f]\{40\} ' "sums-vm-$t") files as the VM's disk, e2fsck -fn clean"
    else
        log "verify $t: DIFFERENT from the VM's disk:"; diff "sums-vm-$t" "sums-restore-$t" | head -20 >&2; exit 1
    fi
}

round() { # R SEED: fresh repository and output directories; full, change, incremental, restore
    local r=$1 seed=$2 t
    for t in "${TOOLS[@]}"; do delete_checkpoints "$t"; done
    rm -rf repo-rime out-vnb out-vnbz restore-*
    "$RIME" --repo repo-rime init >/dev/null
    # the order of the tools turns every round
    local order=("${TOOLS[@]:$(( (r - 1) % 3 ))}" "${TOOLS[@]:0:$(( (r - 1) % 3 ))}")
    for t in "${order[@]}"; do backup "$t" full "$r"; done
    log "change: $CHANGE_MIB MiB into each VM"
    change "$seed"
    for t in "${order[@]}"; do backup "$t" inc "$r"; done
    local check=0
    if [[ $VERIFY == all || ( $VERIFY == last && $r == "$ROUNDS" ) ]]; then check=1; verify_vms; fi
    # one restored image on the disk at a time; a backup's output goes once restored (the
    # repository of Rime's stays for the profile)
    for t in "${order[@]}"; do
        restore "$t" "$r"
        (( check )) && verify_restore "$t"
        rm -rf "restore-$t"
        [[ $t == rime ]] || rm -rf "out-$t"
    done
    restore rimeraw "$r"; rm -rf restore-rimeraw
}

# This host is shared: another program may stop these VMs under a round (a test of
# `rime vm stop --all` managed-saves every domain of the host). A round whose VMs did not run
# throughout, under the same QEMU process, is thrown away and run again.
qemu_pids() { local t; for t in "${TOOLS[@]}"; do cat "/run/libvirt/qemu/$(dom "$t").pid" 2>/dev/null || echo none; echo; done | tr -s '\n' ' '; }
runs() { [[ $(virsh domstate "$(dom "$1")" 2>/dev/null) == running* ]]; }
running_again() { # each VM running again: by whoever stopped it (within a minute), else started here
    local t i
    for t in "${TOOLS[@]}"; do
        for i in $(seq 60); do runs "$t" && break; sleep 1; done
        runs "$t" || virsh -q start "$(dom "$t")" >/dev/null 2>&1 || true
        runs "$t" || { log "$(dom "$t") does not run again: $(virsh domstate "$(dom "$t")" --reason 2>&1)"; exit 1; }
    done
}
for r in $(seq 1 "$ROUNDS"); do
    rc=disturbed
    for try in 1 2 3; do
        log "round $r of $ROUNDS$( ((try > 1)) && echo " (try $try)")"
        pids=$(qemu_pids)
        # new data for every change, also in a round run again (else the second incremental
        # would write what the VMs' disks already hold, and Rime deduplicate it)
        set +e; ( set -e; round "$r" $((r * 10 + try)) ); rc=$?; set -e
        [[ $(qemu_pids) == "$pids" ]] && break
        log "round $r: a VM was stopped by another program meanwhile (QEMU pids $pids-> $(qemu_pids)); the round again"
        grep -v "^$r"$'\t' "$RES" >"$RES.tmp" || true; mv "$RES.tmp" "$RES"
        rc=disturbed
        running_again
    done
    [[ $rc == 0 ]] || { log "round $r failed ($rc)"; exit 1; }
done

print_table() {
echo
echo "VM disk: $DISK_GIB GiB qcow2 ($qcow2_bytes bytes), ext4 with $nfiles files, $used_df bytes used (df);"
echo "change: $CHANGE_MIB MiB in $(wc -l <change.plan) writes; $ROUNDS rounds, medians; crash-consistent (no guest agent)"
python3 - "$RES" <<'EOF'
import statistics, sys
rows = [l.rstrip("\n").split("\t") for l in open(sys.argv[1]) if l.strip()]
# columns: 0 round, 1 tool, 2 phase, 3 seconds, 4 read, 5 qemu_read, 6 size, 7 added, 8 cpu, 9 qemu_cpu, 10 load
med = {}
for tool in ("rime", "rimeraw", "vnb", "vnbz"):
    for phase in ("full", "inc", "restore"):
        rs = [r for r in rows if r[1] == tool and r[2] == phase]
        if rs:
            med[tool, phase] = [None] * 3 + [statistics.median(float(r[i]) for r in rs) for i in range(3, 11)]
name = {"rime": "rime backup --vm", "vnb": "virtnbdbackup", "vnbz": "virtnbdbackup -z"}
rname = {"rime": "rime restore --format qcow2", "rimeraw": "(rime restore --format raw)",
         "vnb": "virtnbdrestore", "vnbz": "virtnbdrestore (of -z)"}
MiB = 1 << 20
print()
print("| phase | tool | seconds | CPU s (tool) | CPU s (QEMU) | bytes read (tool) | QEMU read | repository / output | added | load |")
print("|---|---|---|---|---|---|---|---|---|---|")
for phase in ("full", "inc"):
    for tool in ("rime", "vnb", "vnbz"):
        m = med[tool, phase]
        print(f"| {phase} | {name[tool]} | {m[3]:.2f} | {m[8]:.1f} | {m[9]:.1f} | {m[4] / MiB:.1f} MiB | {m[5] / MiB:.1f} MiB "
              f"| {m[6] / MiB:.1f} MiB | {m[7] / MiB:.1f} MiB | {m[10]:.1f} |")
for tool in ("rime", "rimeraw", "vnb", "vnbz"):
    m = med[tool, "restore"]
    print(f"| restore | {rname[tool]} | {m[3]:.2f} | {m[8]:.1f}{'*' if tool.startswith('vnb') else ''} | | | | image {m[6] / MiB:.1f} MiB | | {m[10]:.1f} |")
print("\n(* without the forked qemu-nbd that writes the image; load: 1-minute load average at the start)")
print()
print("| ratio (virtnbdbackup / Rime) | time | CPU (tool) | QEMU read | repository / output | added |")
print("|---|---|---|---|---|---|")
for phase in ("full", "inc", "restore"):
    r = med["rime", phase]
    for tool in ("vnb", "vnbz"):
        v = med[tool, phase]
        f = lambda i: f"{v[i] / r[i]:.2f}" if r[i] else ""
        if phase == "restore":
            print(f"| {phase}: {rname[tool]} / rime | {f(3)} | | | image {f(6)} | |")
        else:
            print(f"| {phase}: {name[tool]} / rime | {f(3)} | {f(8)} | {f(5)} | {f(6)} | {f(7)} |")
print()
print("per run (round tool phase seconds read qemu_read size added cpu qemu_cpu load):")
for r in rows:
    print("  " + " ".join(r))
EOF
}
print_table

# -------------------------------------------------------------------------------- profile
# Where an incremental of Rime's spends its time: one more change, then `rime backup --vm` under
# strace (execve only): the programs it runs, how long each took. Not in the table.
log "profile: one more change and a traced rime incremental"
change $(((ROUNDS + 1) * 10))
drop
t0=$(now)
strace -f --seccomp-bpf -tt -e trace=execve -s 400 -o profile.strace \
    "$RIME" --repo repo-rime backup --vm "$(dom rime)" --json >profile.json 2>profile.log
t1=$(now)
python3 - profile.strace profile.json "$(echo "$t1 - $t0" | bc)" >profile.txt <<'EOF'
import collections, json, re, sys
def secs(t):
    h, m, s = t.split(":")
    return int(h) * 3600 + int(m) * 60 + float(s)
start, argv, end, first = {}, {}, {}, None
for line in open(sys.argv[1]):
    m = re.match(r"(\d+) +(\S+) (.*)", line)
    if not m:
        continue
    pid, t, rest = int(m[1]), secs(m[2]), m[3]
    first = t if first is None else first
    if rest.startswith("execve(") and rest.rstrip().endswith("= 0"):
        start[pid] = t
        argv[pid] = re.findall(r'"((?:[^"\\]|\\.)*)"', rest.split("[", 1)[1].split("]", 1)[0])
    elif rest.startswith("+++ exited"):
        end[pid] = t
main = min(start, key=start.get)
total = end.get(main, max(end.values())) - first
by = collections.defaultdict(lambda: [0, 0.0])
lines = []
for pid in sorted(start, key=start.get):
    if pid == main:
        continue
    a, d = argv[pid], end.get(pid, start[pid]) - start[pid]
    prog = a[0].rsplit("/", 1)[-1]
    by[prog][0] += 1
    by[prog][1] += d
    sub = " ".join(x for x in a[1:] if not x.startswith("<"))[:110]
    lines.append(f"  +{start[pid] - first:6.2f}s {d:6.3f}s {prog} {sub}")
m = json.load(open(sys.argv[2]))["manifest"]
v = m["volumes"][0]
modes = [dk["mode"] for dm in m["vms"]["domains"] for dk in dm["live"]["disks"]]
print(f"traced rime incremental ({','.join(modes)}): {float(sys.argv[3]):.2f}s wall (under strace), "
      f"manifest duration {m['duration']:.2f}s, read {v['read_bytes']} bytes, added {v['added_bytes']}")
for prog, (n, d) in sorted(by.items(), key=lambda x: -x[1][1]):
    print(f"  {n:3d} x {prog}: {d:.2f}s in all")
print(f"  the rest (Rime itself: NBD reads, mapping, hashing, writing): {total - sum(d for _, d in by.values()):.2f}s")
print("  timeline (start, duration, command):")
print("\n".join(lines))
EOF
echo
cat profile.txt
