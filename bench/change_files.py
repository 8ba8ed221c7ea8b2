#!/usr/bin/env python3
"""Change a fraction of the files under a mounted filesystem, reproducibly.

usage: change_files.py MOUNTPOINT [--fraction 0.01] [--seed 42]

Picks `fraction` of the regular files (sorted list, fixed seed) and overwrites, in place, a
random span of each with new random bytes: a tenth of the file, at least 4 KiB (or the whole
file when it is smaller), at a random offset. Sizes do not change, so the filesystem keeps the
same blocks for the data; its metadata (inode times, journal) changes as it would in real use.
Prints one line: files total, files changed, bytes overwritten.
"""

import argparse
import math
import os
import random


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("mountpoint")
    ap.add_argument("--fraction", type=float, default=0.01)
    ap.add_argument("--seed", type=int, default=42)
    a = ap.parse_args()
    files = []
    for dirpath, dirnames, filenames in os.walk(a.mountpoint):
        dirnames.sort()
        if dirpath == a.mountpoint and "lost+found" in dirnames:
            dirnames.remove("lost+found")
        for name in sorted(filenames):
            p = os.path.join(dirpath, name)
            if os.path.isfile(p) and not os.path.islink(p) and os.path.getsize(p) > 0:
                files.append(p)
    rng = random.Random(a.seed)
    pick = rng.sample(files, max(1, math.ceil(len(files) * a.fraction)))
    changed = 0
    for p in pick:
        size = os.path.getsize(p)
        span = min(size, max(4096, size // 10))
        off = rng.randint(0, size - span)
        with open(p, "r+b") as f:
            f.seek(off)
            left = span
            while left:
                n = min(left, 1 << 20)
                f.write(rng.randbytes(n))
                left -= n
        changed += span
    print(f"{len(files)} {len(pick)} {changed}")


if __name__ == "__main__":
    main()
