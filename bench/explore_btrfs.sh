#!/usr/bin/env bash
# btrfs image explorer figures: a ~1 GiB tree (large random files, medium files, thousands of
# small text files) in a 2 GiB btrfs image, once plain and once written with compress=zstd.
# Each image is backed up into a temporary repository; then `rime extract / --to` is timed
# against `cp -a` from the kernel's read-only loop mount of the same image, page caches dropped
# before each, and the two trees are compared. Both write to a fresh tmpfs, so that the figures
# are those of reading (on a disk filesystem that has just deleted a large tree, creating the
# copy's inodes dominates, and penalises whichever copy runs first). Run as root from the
# repository root:
#   cargo build --release -p rime && bash bench/explore_btrfs.sh [WORKDIR]
set -euo pipefail
RIME=${RIME:-$PWD/target/release/rime}
W=${1:-/tmp/rime-explore-btrfs-bench}
rm -rf "$W"; mkdir -p "$W"
cd "$W"

drop() { sync; echo 3 > /proc/sys/vm/drop_caches; }
cleanup() {
  mountpoint -q "$W/mnt" && umount "$W/mnt" || true
  mountpoint -q "$W/out" && umount "$W/out" || true
}
fresh_out() { mountpoint -q "$W/out" && umount "$W/out"; mkdir -p "$W/out"; mount -t tmpfs -o size=3G tmpfs "$W/out"; }
trap cleanup EXIT
now() { date +%s.%N; }

# The tree: 8 x 64 MiB random files, 8 directories of 40 x 1 MiB (half random, half text),
# 3000 small text files (most inline), 20 x 4 MiB text files. About 1.1 GiB.
fill() { # dir
  local m=$1
  mkdir -p "$m/big" "$m/small"
  for i in $(seq 1 8); do head -c $((64 << 20)) /dev/urandom > "$m/big/r$i.bin"; done
  for d in $(seq -w 1 8); do
    mkdir -p "$m/mid/d$d"
    for f in $(seq -w 1 20); do head -c 1048576 /dev/urandom > "$m/mid/d$d/r$f.bin"; done
    for f in $(seq -w 1 20); do head -c 786432 /dev/urandom | base64 -w 100 > "$m/mid/d$d/t$f.txt"; done
  done
  for i in $(seq 1 3000); do seq 1 $((i % 400 + 5)) > "$m/small/s$i.txt"; done
  for i in $(seq 1 20); do head -c 3145728 /dev/urandom | base64 -w 76 > "$m/small/big$i.txt"; done
}

run() { # label, mount options
  local label=$1 opts=$2
  local img=$W/$label.img repo=$W/repo-$label
  truncate -s 2G "$img"
  mkfs.btrfs -q -f "$img"
  mkdir -p "$W/mnt"
  mount -o "loop${opts:+,$opts}" "$img" "$W/mnt"
  fill "$W/mnt"
  local used
  used=$(df -B1 --output=used "$W/mnt" | tail -1)
  umount "$W/mnt"
  "$RIME" --repo "$repo" init >/dev/null
  "$RIME" --repo "$repo" backup "$img" >/dev/null

  fresh_out
  drop
  local a b c d
  a=$(now)
  "$RIME" --repo "$repo" extract latest / --to "$W/out/rime" >/dev/null
  b=$(now)
  mount -o loop,ro "$img" "$W/mnt"
  local same=no
  diff -r "$W/mnt" "$W/out/rime" >/dev/null && same=yes
  fresh_out
  drop
  c=$(now)
  cp -a "$W/mnt/." "$W/out/cp/"
  d=$(now)
  umount "$W/mnt" "$W/out"
  local tr tc
  tr=$(echo "$b - $a" | bc)
  tc=$(echo "$d - $c" | bc)
  printf '%-6s %5d MiB used  rime extract %6.2f s  cp -a %6.2f s  ratio %.2f  same tree: %s\n' \
    "$label" $((used >> 20)) "$tr" "$tc" "$(echo "$tr / $tc" | bc -l)" "$same"
  rm -rf "$repo" "$img"
}

run plain ""
run zstd "compress=zstd"
