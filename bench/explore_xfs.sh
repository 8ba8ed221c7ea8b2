#!/usr/bin/env bash
# XFS explorer speed (docs/EXPLORER.md, "XFS"): on a 2 GiB XFS v5 image holding a ~1 GiB tree
# (24 x 32 MiB random files, one 64 MiB file written in scattered pieces, 8000 small text
# files in 40 directories), `rime extract / --to` from the repository against `cp -a` from the
# kernel's read-only loop mount of the same image. Page caches are dropped before each. Run as
# root from the repository root:
#   cargo build --release -p rime && bash bench/explore_xfs.sh [WORKDIR]
set -euo pipefail
RIME=${RIME:-$PWD/target/release/rime}
W=${1:-/tmp/rime-explore-xfs-bench}
if mountpoint -q "$W/mnt" 2>/dev/null; then umount "$W/mnt"; fi
rm -rf "$W"; mkdir -p "$W"
cd "$W"
export RIME_REPO=$W/repo

drop() { sync; echo 3 > /proc/sys/vm/drop_caches; }
now() { date +%s.%N; }

truncate -s 2G vol.img
mkfs.xfs -q vol.img
mkdir -p mnt
mount -o loop vol.img mnt
mkdir -p mnt/big
for f in $(seq -w 1 24); do head -c 33554432 /dev/urandom > "mnt/big/f$f.bin"; done
# 64 MiB in 1 MiB pieces written out of order: several extents, no holes.
for i in $(seq 0 63 | shuf --random-source=<(yes)); do
  head -c 1048576 /dev/urandom | dd of=mnt/scattered.bin bs=1M seek="$i" conv=notrunc status=none
done
for d in $(seq -w 1 40); do
  mkdir -p "mnt/small/d$d"
  for i in $(seq 1 200); do seq 1 $(((i * 7 + 10#$d) % 900 + 10)) > "mnt/small/d$d/conf-$i.txt"; done
done
used=$(df -B1 --output=used mnt | tail -1)
umount mnt

"$RIME" init >/dev/null
"$RIME" backup --json vol.img >backup.json
snap=$(python3 -c 'import json; print(json.load(open("backup.json"))["snapshot"])')
echo "image: 2 GiB XFS v5, $used bytes used, snapshot $snap"

drop
a=$(now)
"$RIME" extract "$snap" / --to out-rime >/dev/null
b=$(now)
rime_s=$(echo "$b - $a" | bc)

mount -o loop,ro vol.img mnt
drop
a=$(now)
mkdir -p out-cp
cp -a mnt/. out-cp/
b=$(now)
cp_s=$(echo "$b - $a" | bc)
umount mnt

printf 'rime extract / --to   %7.2f s\n' "$rime_s"
printf 'cp -a from loop mount %7.2f s\n' "$cp_s"
printf 'ratio                 %7.2f\n' "$(echo "scale=4; $rime_s / $cp_s" | bc)"
diff -r out-rime out-cp >/dev/null && echo "both copies hold the same tree"
