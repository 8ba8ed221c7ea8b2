#!/usr/bin/env python3
"""Fill a staging directory with the benchmark's mixed data set (deterministic where the
inputs are: generated text and random files come from fixed seeds; binaries and real sources
are whatever this machine has under /usr and ~/.cargo/registry/src).

usage: gen_data.py STAGING_DIR [--binaries MiB] [--text MiB] [--random MiB]

Layout of STAGING_DIR:
  bin/      regular files copied from /usr, binary directories first (ELF executables and
            libraries); if /usr holds less than the share, it is copied again with every
            file prefixed by a small random header (so repeats are varied, not identical)
  src/      real source: /usr/include and ~/.cargo/registry/src
  text/     generated prose, log files and C-like source from a Zipf-distributed vocabulary
  random/   incompressible files (seeded PRNG), 1 to 64 MiB each
"""

import argparse
import os
import random
import shutil
import sys

MiB = 1 << 20


def copy_tree_budget(roots, dest, budget, prefix_rng=None, skip=()):
    """Copies regular files under `roots` (sorted walk) into dest/ until `budget` bytes are
    used; returns the bytes copied."""
    used = 0
    for root in roots:
        if not os.path.isdir(root):
            continue
        for dirpath, dirnames, filenames in os.walk(root):
            dirnames[:] = sorted(d for d in dirnames if os.path.join(dirpath, d) not in skip)
            for name in sorted(filenames):
                src = os.path.join(dirpath, name)
                try:
                    st = os.lstat(src)
                except OSError:
                    continue
                if not os.path.isfile(src) or os.path.islink(src) or st.st_size == 0:
                    continue
                size = st.st_size
                if used + size > budget:
                    if budget - used < 64 * 1024:
                        return used
                    continue  # try smaller files to top the share up
                rel = os.path.relpath(src, "/")
                dst = os.path.join(dest, rel)
                os.makedirs(os.path.dirname(dst), exist_ok=True)
                try:
                    if prefix_rng is None:
                        shutil.copyfile(src, dst)
                    else:
                        with open(src, "rb") as f, open(dst, "wb") as g:
                            g.write(prefix_rng.randbytes(prefix_rng.randint(1, 4095)))
                            shutil.copyfileobj(f, g, 4 * MiB)
                except OSError:
                    continue
                used += os.path.getsize(dst)
    return used


def binaries(dest, budget):
    order = [
        "/usr/bin", "/usr/sbin", "/usr/libexec", "/usr/lib/x86_64-linux-gnu", "/usr/lib/llvm-14",
        "/usr/lib/gcc", "/usr/lib/jvm", "/usr/local/bin", "/usr/local/lib", "/usr/lib",
    ]
    used, rnd = 0, 0
    while used < budget:
        target = dest if rnd == 0 else os.path.join(dest, f"copy{rnd}")
        rng = None if rnd == 0 else random.Random(1000 + rnd)
        got = 0
        for root in order:
            # /usr/lib last, without the subdirectories already taken above
            skip = set(order) - {root} if root == "/usr/lib" else ()
            got += copy_tree_budget([root], target, budget - used - got, rng, skip=skip)
        if got == 0:
            break
        used += got
        rnd += 1
    return used


def make_vocabulary(rng, n=20000):
    syll = ["ka", "to", "ri", "ne", "sa", "mo", "lu", "pe", "di", "ga", "ve", "zo", "tha", "str",
            "ion", "er", "an", "ou", "ble", "ment", "ing", "ed", "pro", "con", "re", "de"]
    words = set()
    while len(words) < n:
        words.add("".join(rng.choice(syll) for _ in range(rng.choice([1, 2, 2, 3, 3, 4]))))
    words = sorted(words)
    rng.shuffle(words)
    weights = [1.0 / (i + 1) for i in range(len(words))]  # Zipf
    cum, total = [], 0.0
    for w in weights:
        total += w
        cum.append(total)
    return words, cum


def prose(rng, words, cum, size):
    out, n = [], 0
    while n < size:
        para = []
        for _ in range(rng.randint(3, 9)):
            s = rng.choices(words, cum_weights=cum, k=rng.randint(6, 24))
            s[0] = s[0].capitalize()
            para.append(" ".join(s) + rng.choice([".", ".", ".", "?", "!"]))
        p = " ".join(para) + "\n\n"
        out.append(p)
        n += len(p)
    return "".join(out)[:size]


def logfile(rng, words, cum, size):
    out, n, t = [], 0, 1_700_000_000
    levels = ["INFO", "INFO", "INFO", "DEBUG", "WARN", "ERROR"]
    while n < size:
        t += rng.randint(0, 3)
        ip = ".".join(str(rng.randint(1, 254)) for _ in range(4))
        msg = " ".join(rng.choices(words, cum_weights=cum, k=rng.randint(3, 12)))
        line = f"{t}.{rng.randint(0, 999999):06d} {rng.choice(levels):5} [{rng.choice(words[:50])}] {ip} pid={rng.randint(100, 65000)} {msg} latency_ms={rng.random() * 500:.3f}\n"
        out.append(line)
        n += len(line)
    return "".join(out)[:size]


def csource(rng, words, cum, size):
    out, n = [], 0
    types = ["int", "uint64_t", "size_t", "char *", "struct buf *", "void", "bool", "double"]
    while n < size:
        name = "_".join(rng.choices(words[:2000], k=2))
        args = ", ".join(f"{rng.choice(types)} {rng.choice(words[:500])}" for _ in range(rng.randint(0, 4)))
        body = []
        for _ in range(rng.randint(2, 15)):
            a, b = rng.choices(words[:800], k=2)
            body.append(rng.choice([
                f"    if ({a} > {rng.randint(0, 4096)}) {{\n        return {b};\n    }}\n",
                f"    {a} = {b} + {rng.randint(1, 64)};\n",
                f"    for (size_t i = 0; i < {a}; i++) {{\n        {b}[i] ^= {a};\n    }}\n",
                f"    /* {' '.join(rng.choices(words, cum_weights=cum, k=8))} */\n",
                f"    {b}({a}, {rng.randint(0, 100)});\n",
            ]))
        f = f"\nstatic {rng.choice(types)} {name}({args or 'void'})\n{{\n{''.join(body)}}}\n"
        out.append(f)
        n += len(f)
    return "".join(out)[:size]


def text(dest, budget, rng):
    home = os.path.expanduser("~")
    used = copy_tree_budget(["/usr/include", os.path.join(home, ".cargo/registry/src")],
                            os.path.join(dest, "..", "src"), budget // 3)
    words, cum = make_vocabulary(rng)
    kinds = [("doc", prose, ".txt"), ("log", logfile, ".log"), ("code", csource, ".c")]
    i = 0
    while used < budget:
        kind, fn, ext = kinds[i % 3]
        size = min(budget - used, int(rng.lognormvariate(10.5, 1.6)) + 200)  # median ~36 KiB
        d = os.path.join(dest, kind, f"{i // 500:03d}")
        os.makedirs(d, exist_ok=True)
        with open(os.path.join(d, f"{kind}{i:06d}{ext}"), "w") as f:
            f.write(fn(rng, words, cum, size))
        used += size
        i += 1
    return used


def random_files(dest, budget, rng):
    os.makedirs(dest, exist_ok=True)
    used, i = 0, 0
    while used < budget:
        size = min(budget - used, rng.choice([1, 2, 4, 8, 16, 32, 64]) * MiB + rng.randint(0, MiB))
        with open(os.path.join(dest, f"blob{i:04d}.bin"), "wb") as f:
            left = size
            while left:
                n = min(left, MiB)
                f.write(rng.randbytes(n))
                left -= n
        used += size
        i += 1
    return used


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("dest")
    ap.add_argument("--binaries", type=int, default=1100)
    ap.add_argument("--text", type=int, default=540)
    ap.add_argument("--random", type=int, default=400)
    a = ap.parse_args()
    os.makedirs(a.dest, exist_ok=True)
    b = binaries(os.path.join(a.dest, "bin"), a.binaries * MiB)
    t = text(os.path.join(a.dest, "text"), a.text * MiB, random.Random(7))
    r = random_files(os.path.join(a.dest, "random"), a.random * MiB, random.Random(11))
    print(f"binaries {b / MiB:.0f} MiB, text {t / MiB:.0f} MiB, random {r / MiB:.0f} MiB", file=sys.stderr)


if __name__ == "__main__":
    main()
