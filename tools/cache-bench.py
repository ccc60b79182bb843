#!/usr/bin/env python3
"""End-to-end page cache benchmark (issue 6): unionfs-rs with its page cache against the same
binary with `--cache-size 0`, in one run, rotating targets within each round.

Workloads (each on a fresh mount, kernel caches dropped first):
  seq-read     cold sequential read of a 1 GiB lower file (dd, 1 MiB blocks)       MB/s
  rand-read    4 KiB random reads of a 1 GiB lower file (fio psync, 8000 reads)  IOPS
  burst        a 32 MiB write, smaller than the dirty limit (dd, no sync)   seconds of writing
  burst+sync   the same burst, then fsync                                         seconds
  sustained    a 2 GiB write, far over the dirty limit, then fsync                  MB/s
  peak RSS     the daemon's VmHWM after the sustained write                          MiB

Targets: cache (256 MiB budget, readahead 128 KiB), cache-ra1m (readahead 1 MiB), cache-ra0
(readahead off) and nocache (--cache-size 0), all with --passthrough off (as root the kernel
would otherwise read and write upper files itself, past the cache). Run as root. Prints a
Markdown table of medians and the ratio of each cached target to nocache.

Usage: tools/cache-bench.py [--rounds N] [--bin PATH] [--dir DIR] [--only w1,w2]
"""
import argparse
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

TARGETS = {
    "cache": [],
    "cache-ra1m": ["--readahead-kb", "1024"],
    "cache-ra0": ["--readahead-kb", "0"],
    "nocache": ["--cache-size", "0"],
}
GIB = 1 << 30
MIB = 1 << 20


def sh(*args, **kw):
    return subprocess.run(args, check=True, **kw)


def drop_caches():
    os.sync()
    with open("/proc/sys/vm/drop_caches", "w") as f:
        f.write("3\n")


class Mount:
    def __init__(self, binary, root, extra):
        self.root = root
        self.merged = os.path.join(root, "merged")
        self.upper = os.path.join(root, "upper")
        self.work = os.path.join(root, "work")
        for d in (self.upper, self.work):
            shutil.rmtree(d, ignore_errors=True)
            os.makedirs(d)
        os.makedirs(self.merged, exist_ok=True)
        sh(binary, "mount", os.path.join(root, "lower"), self.upper, self.merged,
           "--workdir", self.work, "--passthrough", "off", *extra)
        out = subprocess.run([binary, "stats", self.merged], capture_output=True, text=True,
                             check=True).stdout
        self.pid = int(re.search(r"^pid: (\d+)", out, re.M).group(1))

    def rss_peak_mib(self):
        with open(f"/proc/{self.pid}/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
        return float("nan")

    def close(self):
        subprocess.run(["fusermount3", "-u", self.merged], check=False)
        for _ in range(600):
            if not os.path.exists(f"/proc/{self.pid}"):
                break
            time.sleep(0.05)


def seq_read(m):
    t = time.perf_counter()
    sh("dd", f"if={m.merged}/big", "of=/dev/null", "bs=1M", stderr=subprocess.DEVNULL)
    return GIB / MIB / (time.perf_counter() - t)


def rand_read(m):
    out = subprocess.run(
        ["fio", "--name=r", f"--filename={m.merged}/big", "--rw=randread", "--bs=4k",
         "--ioengine=psync", "--number_ios=8000", "--size=1g", "--randrepeat=1",
         "--output-format=terse", "--terse-version=3", "--readonly"],
        capture_output=True, text=True, check=True).stdout
    return float(out.split(";")[7])  # read IOPS


def burst(m, sync):
    data = os.urandom(MIB)
    fd = os.open(f"{m.merged}/burst", os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    t = time.perf_counter()
    for _ in range(32):
        os.write(fd, data)
    if sync:
        os.fsync(fd)
    el = time.perf_counter() - t
    os.close(fd)
    return el


def sustained(m):
    data = os.urandom(4 * MIB)
    fd = os.open(f"{m.merged}/sustained", os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    t = time.perf_counter()
    for _ in range(2 * GIB // len(data)):
        os.write(fd, data)
    os.fsync(fd)
    el = time.perf_counter() - t
    os.close(fd)
    return 2 * GIB / MIB / el


WORKLOADS = {
    "seq-read": ("cold sequential read 1 GiB (MB/s)", seq_read, True),
    "rand-read": ("cold random 4k read (IOPS)", rand_read, True),
    "burst": ("32 MiB write burst, no sync (s)", lambda m: burst(m, False), False),
    "burst+sync": ("32 MiB write burst + fsync (s)", lambda m: burst(m, True), False),
    "sustained": ("2 GiB write + fsync (MB/s)", sustained, True),
}


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--bin", default=os.path.join(os.path.dirname(__file__), "..", "target",
                                                  "release", "unionfs-rs"))
    ap.add_argument("--dir", default="/var/tmp")
    ap.add_argument("--only", default="")
    a = ap.parse_args()
    if os.geteuid() != 0:
        sys.exit("cache-bench: run as root (drop_caches, mounts)")
    binary = os.path.abspath(a.bin)
    only = [w for w in a.only.split(",") if w] or list(WORKLOADS)
    root = tempfile.mkdtemp(prefix="cachebench.", dir=a.dir)
    os.makedirs(os.path.join(root, "lower"))
    with open(os.path.join(root, "lower", "big"), "wb") as f:
        for _ in range(GIB // (4 * MIB)):
            f.write(os.urandom(4 * MIB))
    res = {(w, t): [] for w in only for t in TARGETS}
    rss = {t: [] for t in TARGETS}
    try:
        for r in range(a.rounds):
            order = list(TARGETS)[r % len(TARGETS):] + list(TARGETS)[:r % len(TARGETS)]
            for w in only:
                for t in order:
                    if w in ("burst", "burst+sync", "sustained") and t in ("cache-ra1m", "cache-ra0"):
                        continue  # readahead does not touch writes
                    drop_caches()
                    m = Mount(binary, root, TARGETS[t])
                    try:
                        v = WORKLOADS[w][1](m)
                        if w == "sustained":
                            rss[t].append(m.rss_peak_mib())
                    finally:
                        m.close()
                    res[(w, t)].append(v)
                    print(f"round {r + 1} {w:11} {t:11} {v:10.3f}", file=sys.stderr)
    finally:
        shutil.rmtree(root, ignore_errors=True)
    cpu = open("/proc/cpuinfo").read()
    model = re.search(r"model name\s*:\s*(.*)", cpu)
    print(f"\nMachine: {os.uname().release}, {os.cpu_count()} vCPU "
          f"{model.group(1) if model else ''}; median of {a.rounds} rounds\n")
    cols = [t for t in TARGETS]
    print("| workload | " + " | ".join(cols) + " | cache vs nocache |")
    print("|---" * (len(cols) + 2) + "|")
    for w in only:
        label, _, higher = WORKLOADS[w]
        med = {t: statistics.median(res[(w, t)]) for t in cols if res[(w, t)]}
        cells = [f"{med[t]:,.3f}" if t in med else "—" for t in cols]
        ratio = med["cache"] / med["nocache"] if higher else med["nocache"] / med["cache"]
        print(f"| {label} | " + " | ".join(cells) + f" | {ratio:.2f}× |")
    if any(rss.values()):
        cells = [f"{statistics.median(rss[t]):.1f}" if rss[t] else "—" for t in cols]
        print("| daemon peak RSS after sustained write (MiB) | " + " | ".join(cells) + " | |")


if __name__ == "__main__":
    main()
