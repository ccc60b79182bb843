#!/usr/bin/env python3
"""Long-run memory soak (issue 5: "RSS <= 32 MiB plus the configured cache budget, flat over a
long run"): one mount per target serves CYCLES rounds of a mixed workload, and the daemon's
resident memory is sampled after each round.

Each round, on the same mount:
  churn     2000 small files (1-8 KiB) in 20 new directories: written, chmod'ed, 1 in 10 given a
            user xattr, 1 in 10 a second name, 1 in 4 renamed to another directory, all read
            back and checked, then `rm -rf` of the round's tree
  walk      every directory listed and every file lstat'ed (what find/ls -lR/du do), 1 in 50
            files' xattrs listed
  copy-up   100 lower files appended to (copied up), 100 other lower files unlinked (whiteouts),
            different ones every round
  big       a 32 MiB file written, read back and unlinked
Every 10th round (and after the last) the kernel's dentries and inodes are dropped
(drop_caches=2), which makes it FORGET every node it held: the daemon's node table must shrink
back with it.

Targets: unionfs-rs (defaults: passthrough as root), unionfs-rs+quota (--size 64G: quota
accounting, and our page cache instead of passthrough) and, where installed, fuse-overlayfs
for reference. Prints per target the RSS after each 10th round, the slope of RSS over the second
half of the rounds (MiB per round; flat = no growth), peak RSS (VmHWM) and the node count
after the final drop. Run as root.

Usage: tools/soak.py [--cycles N] [--bin PATH] [--dir DIR] [--targets a,b] [--files N]
"""
import argparse
import hashlib
import os
import random
import re
import shutil
import subprocess
import sys
import time

MIB = 1 << 20


def sh(*args, **kw):
    return subprocess.run(args, check=True, **kw)


def drop_dentries():
    with open("/proc/sys/vm/drop_caches", "w") as f:
        f.write("2\n")


def make_layers(root, nfiles):
    """Two lowers: 50 dirs x N/50 files in L2, a third of them overridden in L1."""
    stamp = os.path.join(root, f".layers-{nfiles}")
    if os.path.exists(stamp):
        return
    for d in ("L1", "L2"):
        shutil.rmtree(os.path.join(root, d), ignore_errors=True)
    rnd = random.Random(1)
    per_dir = max(1, nfiles // 50)
    for i in range(50):
        for layer in ("L1", "L2"):
            os.makedirs(os.path.join(root, layer, f"d{i:02}"), exist_ok=True)
        for j in range(per_dir):
            name = f"d{i:02}/f{j:04}"
            with open(os.path.join(root, "L2", name), "wb") as f:
                f.write(rnd.randbytes(rnd.randint(100, 4000)))
            if j % 3 == 0:
                with open(os.path.join(root, "L1", name), "wb") as f:
                    f.write(rnd.randbytes(rnd.randint(100, 4000)))
    open(stamp, "w").close()


class Target:
    def __init__(self, name, root, layers, binary):
        self.name = name
        self.root = root
        self.merged = os.path.join(root, "merged")
        self.upper = os.path.join(root, "upper")
        self.work = os.path.join(root, "work")
        self.binary = binary
        for d in (self.upper, self.work):
            shutil.rmtree(d, ignore_errors=True)
            os.makedirs(d)
        os.makedirs(self.merged, exist_ok=True)
        lowers = f"{layers}/L1:{layers}/L2"
        if name.startswith("unionfs-rs"):
            extra = ["--size", "64G"] if name == "unionfs-rs+quota" else []
            sh(binary, "mount", lowers, self.upper, self.merged, "--workdir", self.work, *extra)
            out = subprocess.run([binary, "stats", self.merged], capture_output=True,
                                 text=True, check=True).stdout
            self.pid = int(re.search(r"^pid: (\d+)", out, re.M).group(1))
        else:
            sh("fuse-overlayfs", "-o",
               f"lowerdir={lowers},upperdir={self.upper},workdir={self.work}", self.merged)
            self.pid = self._find_pid()

    def _find_pid(self):
        for p in os.listdir("/proc"):
            if not p.isdigit() or int(p) == os.getpid():
                continue
            try:
                with open(f"/proc/{p}/cmdline", "rb") as f:
                    if self.merged.encode() in f.read():
                        return int(p)
            except OSError:
                pass
        raise RuntimeError(f"{self.name}: daemon not found")

    def status(self, key):
        with open(f"/proc/{self.pid}/status") as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1]) / 1024
        return float("nan")

    def stats(self):
        if not self.name.startswith("unionfs-rs"):
            return {}
        out = subprocess.run([self.binary, "stats", self.merged], capture_output=True,
                             text=True, check=True).stdout
        return {k: v for k, v in re.findall(r"^(\w+): (\d+)$", out, re.M)}

    def close(self):
        subprocess.run(["fusermount3", "-u", self.merged], check=False)
        for _ in range(600):
            if not os.path.exists(f"/proc/{self.pid}"):
                break
            time.sleep(0.05)


def churn(m, cycle):
    rnd = random.Random(cycle)
    top = os.path.join(m, f"churn{cycle}")
    dirs = [os.path.join(top, f"s{i:02}") for i in range(20)]
    for d in dirs:
        os.makedirs(d)
    want = {}
    for i in range(2000):
        p = os.path.join(dirs[i % 20], f"f{i:04}")
        data = rnd.randbytes(rnd.randint(1024, 8192))
        with open(p, "wb") as f:
            f.write(data)
        os.chmod(p, 0o640)
        if i % 10 == 0:
            os.setxattr(p, "user.soak", str(i).encode())
        if i % 10 == 5:
            os.link(p, p + ".ln")
        if i % 4 == 0:
            q = os.path.join(dirs[(i + 7) % 20], f"r{i:04}")
            os.rename(p, q)
            p = q
        want[p] = hashlib.sha1(data).digest()
    for p, h in want.items():
        with open(p, "rb") as f:
            if hashlib.sha1(f.read()).digest() != h:
                raise RuntimeError(f"content mismatch: {p}")
    sh("rm", "-rf", top)


def walk(m):
    n = 0
    for dirpath, dirnames, filenames in os.walk(m):
        for fn in filenames:
            p = os.path.join(dirpath, fn)
            os.lstat(p)
            n += 1
            if n % 50 == 0:
                os.listxattr(p, follow_symlinks=False)
    return n


def copy_up(m, cycle, names):
    k = len(names)
    for i in range(100):
        with open(os.path.join(m, names[(cycle * 200 + i) % k]), "ab") as f:
            f.write(b"x")
    for i in range(100, 200):
        try:
            os.unlink(os.path.join(m, names[(cycle * 200 + i) % k]))
        except FileNotFoundError:
            pass  # a later round wrapped around to a file already removed


def big(m):
    p = os.path.join(m, "big")
    block = os.urandom(MIB)
    with open(p, "wb") as f:
        for _ in range(32):
            f.write(block)
    with open(p, "rb") as f:
        while f.read(MIB):
            pass
    os.unlink(p)


def slope(ys):
    n = len(ys)
    if n < 2:
        return float("nan")
    mx = (n - 1) / 2
    my = sum(ys) / n
    num = sum((i - mx) * (y - my) for i, y in enumerate(ys))
    den = sum((i - mx) ** 2 for i in range(n))
    return num / den


def run_target(name, a, binary, layers, names):
    root = os.path.join(a.dir, "t-" + name.replace("+", "-"))
    os.makedirs(root, exist_ok=True)
    t = Target(name, root, layers, binary)
    rss, rows = [], []
    t0 = time.time()
    try:
        for c in range(a.cycles):
            churn(t.merged, c)
            walk(t.merged)
            copy_up(t.merged, c, names)
            big(t.merged)
            r = t.status("VmRSS")
            rss.append(r)
            if (c + 1) % 10 == 0 or c + 1 == a.cycles:
                st = t.stats()
                drop_dentries()
                time.sleep(1)
                st2 = t.stats()
                rows.append((c + 1, r, st.get("nodes", "-"), st2.get("nodes", "-"),
                             t.status("VmRSS"), st.get("listing_entries_kept", "-"),
                             st.get("cache_bytes", "-"), round(time.time() - t0)))
                print(f"  {name} round {c + 1}: RSS {r:.1f} MiB, nodes {rows[-1][2]} -> "
                      f"{rows[-1][3]} after drop, RSS then {rows[-1][4]:.1f}", file=sys.stderr)
        peak = t.status("VmHWM")
    finally:
        t.close()
        shutil.rmtree(root, ignore_errors=True)
    half = rss[len(rss) // 2:]
    return {"rss": rss, "rows": rows, "peak": peak, "slope": slope(half),
            "secs": time.time() - t0}


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--cycles", type=int, default=60)
    ap.add_argument("--bin", default=os.path.join(os.path.dirname(__file__), "..", "target",
                                                  "release", "unionfs-rs"))
    ap.add_argument("--dir", default="/var/tmp/unionfs-soak")
    ap.add_argument("--targets", default="unionfs-rs,unionfs-rs+quota,fuse-overlayfs")
    ap.add_argument("--files", type=int, default=20000, help="lower files (default 20000)")
    a = ap.parse_args()
    if os.geteuid() != 0:
        sys.exit("soak: run as root (mounts, drop_caches)")
    binary = os.path.abspath(a.bin)
    if not os.access(binary, os.X_OK):
        sys.exit(f"soak: {binary} not found (cargo build --release)")
    targets = [t for t in a.targets.split(",") if t]
    if "fuse-overlayfs" in targets and not shutil.which("fuse-overlayfs"):
        print("soak: fuse-overlayfs not installed, skipped", file=sys.stderr)
        targets.remove("fuse-overlayfs")
    layers = os.path.join(a.dir, "layers")
    os.makedirs(layers, exist_ok=True)
    make_layers(layers, a.files)
    names = sorted(os.path.relpath(os.path.join(dp, f), os.path.join(layers, "L2"))
                   for dp, _, fs in os.walk(os.path.join(layers, "L2")) for f in fs)
    results = {}
    for name in targets:
        print(f"soak: {name}, {a.cycles} rounds", file=sys.stderr)
        results[name] = run_target(name, a, binary, layers, names)
    print(f"\nsoak: {a.cycles} rounds per target over {len(names)} lower files "
          f"({os.cpu_count()} CPUs, kernel {os.uname().release})\n")
    print("| target | RSS after round 1 | RSS at half | RSS at end | slope, 2nd half "
          "(MiB/round) | peak (VmHWM) | nodes before / after the last drop | minutes |")
    print("|---|---:|---:|---:|---:|---:|---|---:|")
    for name, r in results.items():
        rss = r["rss"]
        last = r["rows"][-1]
        print(f"| {name} | {rss[0]:.1f} | {rss[len(rss) // 2]:.1f} | {rss[-1]:.1f} | "
              f"{r['slope']:+.3f} | {r['peak']:.1f} | {last[2]} / {last[3]} | "
              f"{r['secs'] / 60:.1f} |")
    print("\nper 10 rounds: round, RSS MiB, nodes, nodes after drop_caches=2, RSS after it, "
          "kept listing entries, cache bytes, seconds")
    for name, r in results.items():
        for row in r["rows"]:
            print(f"  {name:18} " + "  ".join(
                f"{v:.1f}" if isinstance(v, float) else str(v) for v in row))


if __name__ == "__main__":
    main()
