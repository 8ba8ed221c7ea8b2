#!/usr/bin/env bash
# Image explorer figures (docs/PERFORMANCE.md, "Image explorer"): on a 4 GiB ext4 image about
# half full, the time and repository bytes read to list the root, to extract one 10 MiB file and
# to extract the whole tree, next to a full `rime restore` followed by a loop mount and `cp -a`.
# Page caches are dropped before every step (cold reads). Run as root from the repository root:
#   cargo build --release -p rime && bash bench/explorer.sh [WORKDIR]
set -euo pipefail
RIME=${RIME:-$PWD/target/release/rime}
W=${1:-/tmp/rime-explorer-bench}
rm -rf "$W"; mkdir -p "$W"
cd "$W"
export RIME_REPO=$W/repo

drop() { sync; echo 3 > /proc/sys/vm/drop_caches 2>/dev/null || true; }
now() { date +%s.%N; }

# 4 GiB ext4, ~2 GiB used: 32 directories of 60 x 1 MiB random files, one 10 MiB file, and
# 2000 small text files.
truncate -s 4G vol.img
mkfs.ext4 -q -F vol.img
mkdir -p mnt
mount -o loop vol.img mnt
for d in $(seq -w 1 32); do
  mkdir -p "mnt/data/d$d"
  for f in $(seq -w 1 60); do head -c 1048576 /dev/urandom > "mnt/data/d$d/f$f.bin"; done
done
head -c 10485760 /dev/urandom > mnt/ten-mib.bin
mkdir -p mnt/etc
for i in $(seq 1 2000); do seq 1 $((i % 300 + 10)) > "mnt/etc/conf-$i.txt"; done
used=$(df -B1 --output=used mnt | tail -1)
umount mnt

"$RIME" init >/dev/null
t0=$(now); snap=$("$RIME" backup --json vol.img | python3 -c 'import json,sys; print(json.load(sys.stdin)["snapshot"])'); t1=$(now)
repo_bytes=$(du -sb repo | cut -f1)
echo "image: 4 GiB ext4, $used bytes used; backup $(echo "$t1 - $t0" | bc) s; repository $repo_bytes bytes"

measure() { # label, command...
  local label=$1; shift
  drop
  local a b out
  a=$(now); out=$("$@"); b=$(now)
  local read
  read=$(echo "$out" | python3 -c 'import json,sys; print(json.load(sys.stdin).get("repo_bytes_read",""))' 2>/dev/null || echo "")
  printf '%-40s %8.2f s  %14s bytes read from the repository\n' "$label" "$(echo "$b - $a" | bc)" "$read"
}

measure "ls /" "$RIME" ls --json "$snap" /
measure "extract one 10 MiB file" "$RIME" extract --json "$snap" /ten-mib.bin --to out-one
rm -rf out-one
measure "extract the whole tree" "$RIME" extract --json "$snap" / --to out-all

drop
a=$(now)
"$RIME" restore "$snap" restored.img >/dev/null
b=$(now)
mount -o loop,ro restored.img mnt
mkdir -p out-cp
cp -a mnt/. out-cp/
umount mnt
c=$(now)
printf '%-40s %8.2f s  (restore %.2f s + mount and cp -a %.2f s)  %14s bytes read\n' "full restore + loop mount + cp -a" \
  "$(echo "$c - $a" | bc)" "$(echo "$b - $a" | bc)" "$(echo "$c - $b" | bc)" "$repo_bytes"
diff -r out-all out-cp >/dev/null && echo "extract / and restore+cp -a give the same tree"
