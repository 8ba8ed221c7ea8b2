#!/usr/bin/env bash
# LVM figures (docs/PERFORMANCE.md, "Disks with LVM"): the RHEL-style disk of issue 18, backed up
# by Rime and, side by side in the same run, by restic reading the same image (`--stdin`, what an
# administrator does with a disk restic cannot look inside).
#
# The disk: 4 GiB GPT; partition 1: 512 MiB XFS /boot; partition 2: an LVM PV with VG rhel, LV
# root (2 GiB XFS holding 176 MiB of files) and LV swap (1 GiB, 200 MiB of stale pages under a
# fresh header); the rest of the PV unallocated and full of stale bytes. Page caches are dropped
# before every timed run. Run as root from the repository root:
#   cargo build --release -p rime && bash bench/lvm.sh [WORKDIR]
set -euo pipefail
RIME=${RIME:-$PWD/target/release/rime}
W=${1:-/tmp/rime-lvm-bench}
ROUNDS=${ROUNDS:-3}
command -v restic >/dev/null || { apt-get update -qq && apt-get install -y -qq restic >/dev/null; }
rm -rf "$W"; mkdir -p "$W"
cd "$W"
MiB=$((1 << 20))
drop() { sync; echo 3 > /proc/sys/vm/drop_caches 2>/dev/null || true; }
now() { date +%s.%N; }
loops=()
cleanup() { for l in "${loops[@]}"; do losetup -d "$l" 2>/dev/null || true; done; }
trap cleanup EXIT
range_loop() { local l; l=$(losetup -f --show -o "$1" --sizelimit "$2" disk.img); loops+=("$l"); echo "$l"; }

truncate -s 4G disk.img
printf 'label: gpt\n,512M,L\n,,E6D6D379-F507-44C2-A23C-238F2A3DF928\n' | sfdisk -q disk.img
read -r p1 p1len p2 p2len < <(sfdisk -J disk.img | python3 -c '
import json,sys; p=json.load(sys.stdin)["partitiontable"]["partitions"]
print(p[0]["start"]*512, p[0]["size"]*512, p[1]["start"]*512, p[1]["size"]*512)')
# Stale bytes over the whole PV first: unallocated extents and swap pages hold old data.
head -c "$p2len" /dev/urandom | dd of=disk.img bs=4M seek="$p2" oflag=seek_bytes conv=notrunc status=none
pv=$(range_loop "$p2" "$p2len")
export LVM_SUPPRESS_FD_WARNINGS=1
cfg="devices { filter=[\"a|^$pv\$|\",\"r|.*|\"] global_filter=[\"a|^$pv\$|\",\"r|.*|\"] use_devicesfile=0 } backup { backup=0 archive=0 }"
pvcreate -q -ff -y --config "$cfg" "$pv"
vgcreate -q --config "$cfg" -s 4m rhel "$pv"
vgcfgbackup -q --config "$cfg" -f vg.txt rhel
python3 - <<'EOF'
t = open("vg.txt").read()
def lv(name, uid, pe, count):
    return (f'{name} {{\nid = "{uid}"\nstatus = ["READ", "WRITE", "VISIBLE"]\nflags = []\nsegment_count = 1\n'
            f'segment1 {{\nstart_extent = 0\nextent_count = {count}\ntype = "striped"\nstripe_count = 1\n'
            f'stripes = ["pv0", {pe}]\n}}\n}}\n')
lvs = lv("root", "r00tLV-aaaa-bbbb-cccc-dddd-eeee-ffff01", 0, 512) + lv("swap", "swapLV-aaaa-bbbb-cccc-dddd-eeee-ffff02", 512, 256)
i = t.rindex("}")
open("vg.txt", "w").write(t[:i] + "logical_volumes {\n" + lvs + "}\n" + t[i:])
EOF
vgcfgrestore -q --config "$cfg" --force -f vg.txt rhel 2>/dev/null || vgcfgrestore -q --config "$cfg" --force -f vg.txt rhel 2>&1 | grep -v mapper
pe_start=$(pvs --config "$cfg" --noheadings --units b --nosuffix -o pe_start "$pv" 2>/dev/null | tr -d ' ')
root=$(range_loop $((p2 + pe_start)) $((512 * 4 * MiB)))
swap=$(range_loop $((p2 + pe_start + 512 * 4 * MiB)) $((256 * 4 * MiB)))
boot=$(range_loop "$p1" "$p1len")
dd if=/dev/zero of="$swap" bs=1M seek=200 count=824 status=none   # 200 MiB stale, the rest never used
mkswap -q "$swap" >/dev/null 2>&1 || mkswap "$swap" >/dev/null
mkdir -p mnt
mkfs.xfs -q -f -K "$root"; mount "$root" mnt
python3 "$OLDPWD/bench/gen_data.py" mnt/data --binaries 60 --text 56 --random 60 >/dev/null
umount mnt
mkfs.xfs -q -f -K "$boot"; mount "$boot" mnt
python3 "$OLDPWD/bench/gen_data.py" mnt/data --binaries 20 --text 4 --random 16 >/dev/null
umount mnt
xfs_used() { xfs_db -r -c 'sb 0' -c 'p dblocks fdblocks blocksize' "$1" | awk '{v[$1]=$3} END {print (v["dblocks"]-v["fdblocks"])*v["blocksize"]}'; }
files_used() { mount -o ro "$1" mnt; df -B1 --output=used mnt | tail -1 | tr -d ' '; umount mnt; }
used=$(( $(xfs_used "$root") + $(xfs_used "$boot") ))
files=$(( $(files_used "$root") + $(files_used "$boot") ))
cleanup; loops=()

echo "disk: 4 GiB; the filesystems use $used bytes (XFS's count, internal logs included; $files in df's)"
export RIME_REPO=$W/rime-repo RESTIC_REPOSITORY=$W/restic-repo RESTIC_PASSWORD=bench RESTIC_CACHE_DIR=$W/restic-cache
printf '%-8s %5s %9s %14s %14s\n' tool round seconds "bytes read" "bytes added"
for round in $(seq 1 "$ROUNDS"); do
  rm -rf "$RIME_REPO" "$RESTIC_REPOSITORY" "$RESTIC_CACHE_DIR"
  "$RIME" init >/dev/null
  restic init -q >/dev/null
  drop
  t0=$(now); out=$("$RIME" backup --json disk.img); t1=$(now)
  read -r rread radded < <(echo "$out" | python3 -c '
import json,sys; v=json.load(sys.stdin)["manifest"]["volumes"][0]; print(v["read_bytes"], v["added_bytes"])')
  rt=$(echo "$t1 - $t0" | bc)
  drop
  t0=$(now); restic backup -q --host bench --stdin --stdin-filename disk.img < disk.img; t1=$(now)
  st=$(echo "$t1 - $t0" | bc)
  sadded=$(du -sb "$RESTIC_REPOSITORY" | cut -f1)
  printf '%-8s %5s %9.2f %14s %14s\n' rime "$round" "$rt" "$rread" "$radded"
  printf '%-8s %5s %9.2f %14s %14s\n' restic "$round" "$st" "$(stat -c %s disk.img)" "$sadded"
  echo "ratio restic/rime time: $(echo "scale=2; $st / $rt" | bc); rime read / used: $(echo "scale=3; $rread / $used" | bc)"
done
echo "$out" | python3 -c '
import json,sys
v=json.load(sys.stdin)["manifest"]["volumes"][0]
for p in v["partitions"]:
    print("partition", p["number"], p["map"])
    for l in (p.get("lvm") or {}).get("logical_volumes", []):
        print("  ", l["path"], l["filesystem"], l["map"])'
