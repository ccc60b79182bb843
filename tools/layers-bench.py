#!/usr/bin/env python3
"""Scaling with the number of layers and with directory size, end to end through the mount.

For 2, 8 and 32 lower layers (and kernel overlayfs over the same layers, in the same run), and
for directories of 1,000 and 10,000 entries, measure on a fresh mount (the kernel's caches of
the mount empty, the layer filesystem's warm):
  lookup  - lstat of every file of `dir`, all in the bottom layer, each a first lookup
            (through every layer above it), per file
  readdir - a full listing of the merged `dir` (names only, os.scandir), per entry
  stat2   - the same lstat of every file again (served from the kernel's caches), per file

Usage: tools/layers-bench.py [--bin target/release/unionfs-rs] [--rounds 5] [--dir /var/tmp/lb]
Run as root (mounts). Prints a markdown table of medians (µs per file or entry) and the
ratio to kernel overlayfs.
"""

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import time


def build(root, layers, files):
    """`layers` lowers: the bottom one holds dir/f0..f{files-1}; every other one holds dir/ with
    10 files of its own (so `dir` is merged in every layer)."""
    lowers = []
    for i in range(layers):
        d = os.path.join(root, f"l{i}", "dir")
        os.makedirs(d)
        if i == layers - 1:
            for f in range(files):
                open(os.path.join(d, f"f{f}"), "w").close()
        else:
            for f in range(10):
                open(os.path.join(d, f"x{i}_{f}"), "w").close()
        lowers.append(os.path.join(root, f"l{i}"))
    return lowers


def mount(kind, binary, lowers, root):
    upper, work, merged = (os.path.join(root, n) for n in ("upper", "work", "merged"))
    for d in (upper, work):
        shutil.rmtree(d, ignore_errors=True)
        os.makedirs(d)
    os.makedirs(merged, exist_ok=True)
    if kind == "overlay":
        opts = f"lowerdir={':'.join(lowers)},upperdir={upper},workdir={work}"
        subprocess.run(["mount", "-t", "overlay", "overlay", "-o", opts, merged], check=True)
    else:
        subprocess.run([binary, "mount", ":".join(lowers), upper, merged, "--workdir", work],
                       check=True)
    return merged


def umount(kind, merged):
    if kind == "overlay":
        subprocess.run(["umount", merged], check=True)
    else:
        subprocess.run(["fusermount3", "-u", merged], check=True)
        time.sleep(0.1)


def measure(merged, files):
    d = os.path.join(merged, "dir")
    names = [f"f{f}" for f in range(files)]
    t0 = time.perf_counter()
    for n in names:
        os.lstat(os.path.join(d, n))
    t1 = time.perf_counter()
    entries = sum(1 for _ in os.scandir(d))
    t2 = time.perf_counter()
    for n in names:
        os.lstat(os.path.join(d, n))
    t3 = time.perf_counter()
    return {
        "lookup": (t1 - t0) / files * 1e6,
        "readdir": (t2 - t1) / entries * 1e6,
        "stat2": (t3 - t2) / files * 1e6,
    }


def main():
    here = os.path.dirname(os.path.abspath(__file__))
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--bin", default=os.path.join(here, "..", "target", "release", "unionfs-rs"))
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--dir", default="/var/tmp/layers-bench")
    a = ap.parse_args()
    if os.geteuid() != 0:
        sys.exit("layers-bench: run as root (it mounts)")
    if not os.access(a.bin, os.X_OK):
        sys.exit(f"layers-bench: no binary at {a.bin} (cargo build --release)")
    rows = []
    cases = [(2, 1000), (8, 1000), (32, 1000), (2, 10000), (32, 10000)]
    try:
        for layers, files in cases:
            root = os.path.join(a.dir, f"{layers}x{files}")
            shutil.rmtree(root, ignore_errors=True)
            os.makedirs(root)
            lowers = build(root, layers, files)
            res = {"overlay": [], "unionfs-rs": []}
            # Round 0 warms the layer filesystem's caches and is not counted; the order of
            # the two targets alternates.
            for r in range(a.rounds + 1):
                kinds = ("overlay", "unionfs-rs") if r % 2 else ("unionfs-rs", "overlay")
                for kind in kinds:
                    m = mount(kind, a.bin, lowers, root)
                    try:
                        got = measure(m, files)
                    finally:
                        umount(kind, m)
                    if r > 0:
                        res[kind].append(got)
            med = {k: {m: statistics.median(r[m] for r in v) for m in v[0]}
                   for k, v in res.items()}
            rows.append((layers, files, med))
            print(f"layers-bench: {layers} lowers, {files} files: "
                  + ", ".join(f"{k} " + " ".join(f"{m}={x:.2f}" for m, x in v.items())
                              for k, v in med.items()), file=sys.stderr)
    finally:
        shutil.rmtree(a.dir, ignore_errors=True)
    print("| lowers | files in dir | first lstat, µs/file (overlay · unionfs-rs · ratio) "
          "| listing, µs/entry | second lstat, µs/file |")
    print("|---:|---:|---|---|---|")
    for layers, files, med in rows:
        cells = []
        for m in ("lookup", "readdir", "stat2"):
            o, u = med["overlay"][m], med["unionfs-rs"][m]
            cells.append(f"{o:.2f} · {u:.2f} · {u / o:.2f}×")
        print(f"| {layers} | {files} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
