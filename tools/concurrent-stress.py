#!/usr/bin/env python3
"""Concurrency stress test for unionfs-rs, with kernel overlayfs as the oracle. Run as root.

1. Builds two lower layers (a few hundred files and directories, nested 3-5 deep, whiteouts,
   an opaque directory in the upper lower, symlinks, a lower hard link), an empty upper and a
   workdir, all under --dir (default /var/tmp/stress/run-SEED).
2. Mounts unionfs-rs over them (`mount L1:L2 UPPER MERGED --workdir WORK --log-file LOG`).
3. Runs --workers processes for --seconds doing random operations on the merged dir with plain
   syscalls: create/write/append/truncate/read, unlink, mkdir, rmdir, rename of files and
   directories (cross-directory, over existing targets, RENAME_EXCHANGE and RENAME_NOREPLACE
   through renameat2), hard links, symlinks, chmod, user.* xattrs, listdir, stat, deep path walks
   (an openat chain 4+ levels down while others move ancestors). Every operation is timed by a
   watchdog in the parent (an op stuck > --hang-secs is a failure).
   Content checks: each worker owns files named wWkK (some start in the lowers, so their first
   write is a copy-up); only the owner writes or moves them, so their content is known and is
   verified after every owned write and on every read by the owner. Files named aN are only ever
   replaced whole by rename(2) of a self-describing temp file (header with length and sha256),
   so every reader can verify them: a torn or mixed file is a bug.
   Errors legitimate under concurrency (ENOENT, EEXIST, ENOTEMPTY, ENOTDIR, EISDIR, EXDEV,
   EINVAL, ENODATA for absent xattrs) are counted. Anything else is a failure (EIO, EBADF,
   ENOMEM, ENOTCONN, ...); ESTALE is counted and fails the run when seen 3 times or more.
4. After the workers stop: records the merged tree through the mount (type, mode, size, nlink,
   symlink target, content sha256, user.* xattrs), checks the owned files, unmounts, checks the
   daemon exited, mounts the same upper with kernel overlayfs (fresh workdir) and compares, then
   remounts unionfs-rs and compares again. Every mount is unmounted on every path.

Usage: tools/concurrent-stress.py [--workers 4] [--seconds 20] [--seed N] [--bin PATH]
                                  [--keep] [--dir DIR] [--mount-opt ARG ...] [--hang-secs 10]
Exit status: 0 clean, 1 failures (details printed), 2 setup error.
"""
import argparse
import collections
import ctypes
import errno
import hashlib
import json
import multiprocessing as mp
import os
import random
import shutil
import signal
import stat
import subprocess
import sys
import time
import traceback

EXPECTED = {errno.ENOENT, errno.EEXIST, errno.ENOTEMPTY, errno.ENOTDIR, errno.EISDIR,
            errno.EXDEV, errno.EINVAL}
ESTALE_LIMIT = 3
MAX_DEPTH = 10          # parents deeper than this are not used as targets (keeps paths short)

libc = ctypes.CDLL(None, use_errno=True)
AT_FDCWD = -100
RENAME_NOREPLACE = 1
RENAME_EXCHANGE = 2


def renameat2(src, dst, flags):
    libc.renameat2.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p,
                               ctypes.c_uint]
    r = libc.renameat2(AT_FDCWD, os.fsencode(src), AT_FDCWD, os.fsencode(dst), flags)
    if r != 0:
        e = ctypes.get_errno()
        raise OSError(e, os.strerror(e), src, None, dst)


def log(*a):
    print(*a, flush=True)


# ----------------------------------------------------------------------------------------------
# layers

def rbytes(rnd, n):
    return rnd.randbytes(n)


def build_layers(root, seed, nworkers):
    """Returns the manifest: lower dirs, lower files, owned files' initial placement/content."""
    rnd = random.Random(seed * 7919 + 1)
    L1, L2 = os.path.join(root, "L1"), os.path.join(root, "L2")
    for d in (L1, L2):
        os.makedirs(d)
    counter = {"d": 0, "f": 0}

    def nd():
        counter["d"] += 1
        return f"d{counter['d']}"

    def nf():
        counter["f"] += 1
        return f"f{counter['f']}"

    dirs = [""]            # relative dirs in L2 (all merged-visible unless whited out)
    files = []

    def fill(rel, depth):
        for _ in range(rnd.randint(2, 5)):
            name = nf()
            size = rnd.choice([0, 10, 100, 1000, 4096, 5000, 20000, 70000])
            with open(os.path.join(L2, rel, name), "wb") as f:
                f.write(rbytes(rnd, size))
            files.append(os.path.join(rel, name))
        if depth <= 0:
            return
        for _ in range(rnd.randint(1, 2) if depth > 1 else 1):
            name = nd()
            sub = os.path.join(rel, name)
            os.mkdir(os.path.join(L2, sub))
            dirs.append(sub)
            fill(sub, depth - 1)

    for _ in range(8):
        name = nd()
        os.mkdir(os.path.join(L2, name))
        dirs.append(name)
        fill(name, rnd.randint(3, 5))
    # L2 symlinks and a hard link pair
    for i in range(6):
        rel = os.path.join(rnd.choice(dirs), f"l{900 + i}")
        os.symlink(rnd.choice(["../f1", "/etc/hostname", "nowhere", "d1", "."]), os.path.join(L2, rel))
    hl_src = files[3]
    hl_dst = os.path.join(os.path.dirname(files[5]), nf())
    os.link(os.path.join(L2, hl_src), os.path.join(L2, hl_dst))
    files.append(hl_dst)

    # L1: mirrors part of the L2 dirs (merged dirs), overrides some files, whiteouts, opaque dir
    whiteouts = []
    l1dirs = set([""])
    for d in dirs[1:]:
        if rnd.random() < 0.6 and os.path.dirname(d) in l1dirs:
            os.mkdir(os.path.join(L1, d))
            l1dirs.add(d)
    hidden = set()
    for rel in files:
        parent = os.path.dirname(rel)
        if parent not in l1dirs:
            continue
        r = rnd.random()
        if r < 0.2:
            with open(os.path.join(L1, rel), "wb") as f:
                f.write(rbytes(rnd, rnd.choice([0, 50, 3000, 9000])))
        elif r < 0.3:
            os.mknod(os.path.join(L1, rel), stat.S_IFCHR | 0o600, 0)
            whiteouts.append(rel)
            hidden.add(rel)
    # a whiteout over a whole L2 subdir, and an opaque dir in L1 over an L2 dir with content
    candidates = [d for d in dirs[1:] if d.count("/") >= 1 and os.path.dirname(d) in l1dirs
                  and d not in l1dirs]
    wd = candidates[0]
    os.mknod(os.path.join(L1, wd), stat.S_IFCHR | 0o600, 0)
    whiteouts.append(wd)
    ocands = [d for d in dirs[1:] if d.count("/") >= 1 and os.path.dirname(d) in l1dirs
              and d not in l1dirs and d != wd and not d.startswith(wd + "/")]
    od = ocands[0]
    os.mkdir(os.path.join(L1, od))
    os.setxattr(os.path.join(L1, od), "trusted.overlay.opaque", b"y")
    with open(os.path.join(L1, od, "f_opq"), "wb") as f:
        f.write(b"opaque dir file\n")
    l1dirs.add(od)
    # L1-only dirs and files
    for i in range(4):
        parent = rnd.choice(sorted(l1dirs))
        name = nd()
        os.mkdir(os.path.join(L1, parent, name))
        l1dirs.add(os.path.join(parent, name))
        for _ in range(3):
            with open(os.path.join(L1, parent, name, nf()), "wb") as f:
                f.write(rbytes(rnd, rnd.randint(0, 8000)))
    os.symlink("d1", os.path.join(L1, "l950"))
    # the pin dir: merged (in both lowers), 300 names p* that no operation touches (200 from L2,
    # 100 from L1) and 50 L2 names hidden by L1 whiteouts; workers churn other names in it while
    # others list it: every listing must show exactly the pinned names (no loss, no duplicate)
    pin = "d0pin"
    os.mkdir(os.path.join(L1, pin))
    os.mkdir(os.path.join(L2, pin))
    pinned, pin_hidden = [], []
    for i in range(250):
        n = f"p{i:04}_" + "x" * 30
        with open(os.path.join(L2, pin, n), "wb") as f:
            f.write(b"p" * (i % 7))
        if i >= 200:
            os.mknod(os.path.join(L1, pin, n), stat.S_IFCHR | 0o600, 0)
            pin_hidden.append(n)
        else:
            pinned.append(n)
    for i in range(250, 350):
        n = f"p{i:04}_" + "y" * 30
        with open(os.path.join(L1, pin, n), "wb") as f:
            f.write(b"q")
        pinned.append(n)
    l1dirs.add(pin)
    # owned files: k0 in L2, k1 in L1 (visible places), k2.. created by the owner
    owned = {}
    visible = [d for d in sorted(l1dirs) if not _under(d, [wd, od])]
    for w in range(nworkers):
        for k, layer in ((0, L2), (1, L1)):
            parent = rnd.choice(visible)
            if layer == L2 and not os.path.isdir(os.path.join(L2, parent)):
                parent = ""
            data = rbytes(rnd, rnd.choice([0, 100, 5000, 40000]))
            rel = os.path.join(parent, f"w{w}k{k}")
            with open(os.path.join(layer, rel), "wb") as f:
                f.write(data)
            owned[f"w{w}k{k}"] = {"path": rel, "sha": sha(data), "size": len(data)}
    # make sure the opaque dir and the whited-out dir hide things: their L2 contents are not
    # visible; recompute the visible dir list from the union of both layers
    merged_dirs = []
    for layer in (L1, L2):
        for dp, dns, fns in os.walk(layer):
            rel = os.path.relpath(dp, layer)
            rel = "" if rel == "." else rel
            if rel not in merged_dirs and not _under(rel, [wd]) and not _under_strict(rel, od, L1):
                merged_dirs.append(rel)
    return {"dirs": merged_dirs, "owned": owned, "whiteouts": whiteouts, "opaque": od,
            "pin": pin, "pinned": pinned, "pin_hidden": pin_hidden}


def _under(rel, tops):
    return any(rel == t or rel.startswith(t + "/") for t in tops)


def _under_strict(rel, od, L1):
    # below the opaque dir only what L1 has is visible
    if rel.startswith(od + "/"):
        return not os.path.isdir(os.path.join(L1, rel))
    return False


def sha(b):
    return hashlib.sha256(b).hexdigest()


# ----------------------------------------------------------------------------------------------
# workers

def sc_content(rnd, tag):
    """Self-checking content: header with length and hash of the payload."""
    payload = tag.encode() + rnd.randbytes(rnd.choice([0, 10, 500, 4096, 9000, 66000]))
    return b"SC %d %s\n" % (len(payload), sha(payload).encode()) + payload


def sc_check(data):
    """None if data is a valid self-checking file (or empty = not yet written), else a reason."""
    if not data.startswith(b"SC "):
        return "no SC header: %r" % data[:40]
    nl = data.find(b"\n")
    try:
        _, n, h = data[:nl].split(b" ")
        n = int(n)
    except ValueError:
        return "bad header %r" % data[:80]
    payload = data[nl + 1:]
    if len(payload) != n:
        return f"length {len(payload)} != header {n}"
    if sha(payload).encode() != h:
        return "payload hash mismatch"
    return None


class Worker:
    def __init__(self, wid, merged, seed, manifest, deadline, slot, resfile, nworkers):
        self.wid = wid
        self.m = merged
        self.rnd = random.Random(seed * 1000 + wid)
        self.deadline = deadline
        self.slot = slot           # (start_time Array, desc Array) for the watchdog
        self.resfile = resfile
        self.nworkers = nworkers
        self.ops = collections.Counter()
        self.expected = collections.Counter()
        self.estale = []
        self.failures = []
        self.dirs = set(manifest["dirs"])          # relative paths believed to be dirs
        self.files = set()                         # relative paths believed to be non-dirs
        self.owned = {}                            # name -> {"path", "data"} (data: bytes)
        for name, o in manifest["owned"].items():
            if name.startswith(f"w{wid}k"):
                self.owned[name] = {"path": o["path"], "data": None, "sha": o["sha"],
                                    "size": o["size"]}
        self.n = 0
        # a hot set shared by all workers (same seed): two top-level dirs where picks
        # concentrate, so that workers meet on the same names (copy-up races etc.)
        tops = sorted(d for d in manifest["dirs"] if d and "/" not in d)
        self.hot = random.Random(seed).sample([t for t in tops if t != manifest["pin"]],
                                              min(2, len(tops) - 1)) + [manifest["pin"]]
        self.pin = manifest["pin"]
        self.pinned = set(manifest["pinned"])
        self.pin_hidden = set(manifest["pin_hidden"])
        self.held = []                             # (fd, path, content at open) of a* files

    # -- helpers
    def p(self, rel):
        return os.path.join(self.m, rel) if rel else self.m

    def fail(self, kind, msg):
        if len(self.failures) < 200:
            self.failures.append({"worker": self.wid, "op": kind, "msg": msg,
                                  "t": round(time.time(), 3)})

    def owned_by_other(self, rel):
        b = os.path.basename(rel)
        return b.startswith("w") and "k" in b and not b.startswith(f"w{self.wid}k")

    def is_owned_name(self, rel):
        b = os.path.basename(rel)
        return b.startswith("w") and "k" in b

    def newname(self, prefix):
        self.n += 1
        return f"{prefix}{self.rnd.randint(0, 40) if prefix in 'suh' else self.wid * 100000 + self.n}"

    def in_hot(self, rel):
        return any(rel == h or rel.startswith(h + "/") for h in self.hot) and rel.count("/") <= 2

    def pick_dir(self, max_depth=MAX_DEPTH):
        ds = [d for d in self.dirs if d.count("/") < max_depth] or [""]
        if self.rnd.random() < 0.4:
            ds = [d for d in ds if self.in_hot(d)] or ds
        return self.rnd.choice(ds)

    def pick_file(self, classes):
        fs = [f for f in self.files if os.path.basename(f)[:1] in classes
              and not self.is_owned_name(f)]
        if not fs:
            return None
        if self.rnd.random() < 0.4:
            fs = [f for f in fs if self.in_hot(os.path.dirname(f))] or fs
        return self.rnd.choice(fs)

    def forget(self, rel):
        self.dirs.discard(rel)
        self.files.discard(rel)
        pre = rel + "/"
        self.dirs = {d for d in self.dirs if not d.startswith(pre)}
        self.files = {f for f in self.files if not f.startswith(pre)}

    def moved(self, src, dst, isdir):
        if isdir:
            pre = src + "/"
            self.dirs = {dst + d[len(src):] if d.startswith(pre) else d for d in self.dirs}
            self.files = {dst + f[len(src):] if f.startswith(pre) else f for f in self.files}
            self.dirs.discard(src)
            self.dirs.add(dst)
        else:
            self.files.discard(src)
            self.files.add(dst)

    def scan(self, rel, depth):
        try:
            names = os.listdir(self.p(rel))
        except NotADirectoryError:
            self.dirs.discard(rel)
            return
        for n in names:
            c = os.path.join(rel, n)
            if n.startswith(("d", "u")):
                self.dirs.add(c)
                if depth > 0 and self.rnd.random() < 0.5:
                    try:
                        self.scan(c, depth - 1)
                    except OSError as e:
                        if e.errno not in EXPECTED:
                            raise
            else:
                self.files.add(c)

    # -- the loop
    def run(self):
        ops = [
            (6, "create", self.op_create), (6, "write", self.op_write), (4, "append", self.op_append),
            (3, "truncate", self.op_truncate), (8, "read", self.op_read), (4, "unlink", self.op_unlink),
            (4, "mkdir", self.op_mkdir), (3, "rmdir", self.op_rmdir),
            (5, "rename_file", self.op_rename_file), (5, "rename_dir", self.op_rename_dir),
            (3, "rename_over", self.op_rename_over), (3, "exchange", self.op_exchange),
            (2, "noreplace", self.op_noreplace),
            (4, "atomic_replace", self.op_atomic), (3, "link", self.op_link),
            (3, "symlink", self.op_symlink), (2, "readlink", self.op_readlink),
            (3, "chmod", self.op_chmod), (3, "setxattr", self.op_setxattr),
            (2, "getxattr", self.op_getxattr), (1, "removexattr", self.op_removexattr),
            (5, "listdir", self.op_listdir), (6, "stat", self.op_stat),
            (4, "deepwalk", self.op_deepwalk), (3, "scan", self.op_scan),
            (10, "owned", self.op_owned), (1, "fsync", self.op_fsync),
            (3, "hold", self.op_hold), (3, "held_check", self.op_held_check),
            (2, "owned_link", self.op_owned_link), (3, "pinlist", self.op_pinlist),
            (4, "pinchurn", self.op_pinchurn),
        ]
        only = os.environ.get("STRESS_OPS")
        if only:
            keep = set(only.split(","))
            ops = [o for o in ops if o[1] in keep]
        weights = [w for w, _, _ in ops]
        try:
            self.scan("", 3)
        except OSError as e:
            self.fail("initial-scan", repr(e))
        self.owned_setup()
        while time.time() < self.deadline.value and not self.deadline_stop():
            _, kind, fn = self.rnd.choices(ops, weights)[0]
            self.timed(kind, fn)
        self.write_results()

    def deadline_stop(self):
        return False

    def timed(self, kind, fn, *args):
        start, desc = self.slot
        desc.value = kind.encode()[:200]
        start.value = time.time()
        self.ops[kind] += 1
        try:
            fn(*args)
        except OSError as e:
            self.classify(kind, e)
        except Exception as e:          # a bug of this tool, or a wrong value seen
            self.fail(kind, "exception: " + "".join(traceback.format_exception_only(type(e), e)).strip())
        finally:
            start.value = 0.0

    def setdesc(self, s):
        self.slot[1].value = s.encode()[:200]

    def classify(self, kind, e, extra=None):
        en = e.errno
        if en in EXPECTED or (en == errno.ENODATA and "xattr" in kind):
            self.expected[f"{kind}:{errno.errorcode.get(en, en)}"] += 1
            return
        if en == errno.ESTALE:
            self.estale.append(f"{kind}: {e}")
            self.expected[f"{kind}:ESTALE"] += 1
            return
        self.fail(kind, f"{errno.errorcode.get(en, en)}: {e}" + (f" ({extra})" if extra else ""))

    # -- owned files (content checked)
    def owned_setup(self):
        # k0, k1 exist in the lowers; create k2..k4 as new upper files
        for k in range(2, 5):
            name = f"w{self.wid}k{k}"
            parent = self.pick_dir(4)
            data = self.rnd.randbytes(self.rnd.choice([0, 100, 7000]))
            for _ in range(20):
                try:
                    with open(self.p(os.path.join(parent, name)), "xb") as f:
                        f.write(data)
                    break
                except OSError as e:
                    if e.errno not in EXPECTED:
                        self.fail("owned-create", repr(e))
                        break
                    parent = self.pick_dir(4) if self.rnd.random() < 0.5 else ""
            else:
                continue
            self.owned[name] = {"path": os.path.join(parent, name), "data": data,
                                "sha": sha(data), "size": len(data)}

    def locate(self, name):
        """Finds an owned file after a directory move (others move its ancestors)."""
        o = self.owned[name]
        if os.path.lexists(self.p(o["path"])):
            return o["path"]
        for attempt in range(6):
            for dp, dns, fns in os.walk(self.m):
                if name in fns:
                    rel = os.path.relpath(os.path.join(dp, name), self.m)
                    o["path"] = rel
                    return rel
            time.sleep(0.05)
        self.fail("owned-locate", f"{name} (last at {o['path']}) not found anywhere in the tree")
        return None

    def expect_data(self, o):
        if o["data"] is None:       # lower file not yet read by us: read it once and check sha
            with open(self.p(o["path"]), "rb") as f:
                d = f.read()
            if o["sha"] is not None and sha(d) != o["sha"]:
                self.fail("owned-initial", f"{o['path']}: lower content differs (size {len(d)} "
                          f"want {o['size']})")
            o["data"] = d
        return o["data"]

    def verify(self, name, when):
        o = self.owned[name]
        want = o["data"]
        for attempt in range(3):
            try:
                with open(self.p(o["path"]), "rb") as f:
                    got = f.read()
                st = os.stat(self.p(o["path"]))
                break
            except FileNotFoundError:
                if self.locate(name) is None:
                    return
        else:
            return
        if o.get("ino") is None:
            o["ino"] = st.st_ino
        elif st.st_ino != o["ino"] and when not in ("replace",):
            self.fail("owned-ino", f"{o['path']} after {when}: st_ino {st.st_ino} != "
                      f"{o['ino']} before (no replace in between)")
            o["ino"] = st.st_ino
        if when == "replace":
            o["ino"] = st.st_ino
        if got != want:
            first = next((i for i in range(min(len(got), len(want))) if got[i] != want[i]),
                         min(len(got), len(want)))
            self.fail("owned-verify", f"{o['path']} after {when}: content differs: got "
                      f"{len(got)} bytes, want {len(want)}, first difference at {first}")
            o["data"] = got         # report once per divergence
        elif st.st_size != len(want):
            self.fail("owned-verify", f"{o['path']} after {when}: st_size {st.st_size} != {len(want)}")

    def op_owned(self):
        if not self.owned:
            return
        name = self.rnd.choice(sorted(self.owned))
        if self.locate(name) is None:
            return
        o = self.owned[name]
        cur = self.expect_data(o)
        path = self.p(o["path"])
        what = self.rnd.choice(["overwrite", "append", "pwrite", "truncate", "replace", "move",
                                "verify", "verify", "chmod"])
        self.setdesc(f"owned {what} {o['path']}")
        self.ops[f"owned_{what}"] += 1
        try:
            if what == "overwrite":
                data = self.rnd.randbytes(self.rnd.choice([0, 1, 4095, 4096, 12345, 70000]))
                # No O_CREAT: if an ancestor moved, the old path must not make a second file.
                fd = os.open(path, os.O_WRONLY | os.O_TRUNC)
                try:
                    os.write(fd, data)
                finally:
                    os.close(fd)
                o["data"] = data
            elif what == "append":
                add = self.rnd.randbytes(self.rnd.randint(1, 9000))
                fd = os.open(path, os.O_WRONLY | os.O_APPEND)
                try:
                    os.write(fd, add)
                finally:
                    os.close(fd)
                o["data"] = cur + add
            elif what == "pwrite":
                off = self.rnd.randint(0, len(cur) + 5000)
                add = self.rnd.randbytes(self.rnd.randint(1, 6000))
                fd = os.open(path, os.O_RDWR)
                try:
                    os.pwrite(fd, add, off)
                finally:
                    os.close(fd)
                base = cur + b"\0" * max(0, off - len(cur))
                o["data"] = base[:off] + add + base[off + len(add):]
            elif what == "truncate":
                n = self.rnd.randint(0, len(cur) + 9000)
                if self.rnd.random() < 0.5:
                    os.truncate(path, n)
                else:
                    fd = os.open(path, os.O_RDWR)
                    try:
                        os.ftruncate(fd, n)
                    finally:
                        os.close(fd)
                o["data"] = cur[:n] + b"\0" * max(0, n - len(cur))
            elif what == "replace":
                data = self.rnd.randbytes(self.rnd.choice([0, 300, 5000]))
                tmp = os.path.join(os.path.dirname(path), f"t{self.wid}_{self.n}")
                self.n += 1
                with open(tmp, "wb") as f:
                    f.write(data)
                try:
                    # An exchange, not rename(2): if an ancestor moved, the old path must not
                    # get a second file (the exchange needs the target to be there).
                    renameat2(tmp, path, RENAME_EXCHANGE)
                finally:
                    try:
                        os.unlink(tmp)
                    except OSError:
                        pass
                o["data"] = data
            elif what == "move":
                parent = self.pick_dir(6)
                dst = os.path.join(parent, name)
                os.rename(path, self.p(dst))
                o["path"] = dst
            elif what == "chmod":
                os.chmod(path, self.rnd.choice([0o644, 0o600, 0o640]))
            self.verify(name, what)
        except OSError as e:
            if e.errno == errno.ENOENT:
                # an ancestor moved under us; the op may or may not have happened: learn the
                # real content (the op is atomic for these cases except move/replace)
                self.expected[f"owned_{what}:ENOENT"] += 1
                o["ino"] = None
                if self.locate(name):
                    try:
                        with open(self.p(o["path"]), "rb") as f:
                            o["data"] = f.read()
                    except OSError:
                        o["data"] = None
                        o["sha"] = None
                return
            self.classify(f"owned_{what}", e, o["path"])

    # -- random operations
    def op_create(self):
        parent = self.pick_dir()
        rel = os.path.join(parent, self.newname("s"))
        self.setdesc(f"create {rel}")
        with open(self.p(rel), "wb") as f:
            f.write(self.rnd.randbytes(self.rnd.choice([0, 100, 4096, 20000])))
        self.files.add(rel)

    def op_write(self):
        rel = self.pick_file("sf")
        if not rel:
            return
        self.setdesc(f"write {rel}")
        fd = os.open(self.p(rel), os.O_WRONLY)
        try:
            os.pwrite(fd, self.rnd.randbytes(self.rnd.randint(1, 8000)), self.rnd.randint(0, 30000))
        finally:
            os.close(fd)

    def op_append(self):
        rel = self.pick_file("sf")
        if not rel:
            return
        self.setdesc(f"append {rel}")
        with open(self.p(rel), "ab") as f:
            f.write(self.rnd.randbytes(self.rnd.randint(1, 3000)))

    def op_truncate(self):
        rel = self.pick_file("sf")
        if not rel:
            return
        self.setdesc(f"truncate {rel}")
        os.truncate(self.p(rel), self.rnd.randint(0, 20000))

    def op_read(self):
        rel = self.pick_file("sfahw")
        if self.rnd.random() < 0.3:
            rel = self.pick_file("a") or rel
        if not rel:
            return
        self.setdesc(f"read {rel}")
        try:
            with open(self.p(rel), "rb") as f:
                data = f.read()
        except FileNotFoundError:
            self.files.discard(rel)
            raise
        if os.path.basename(rel).startswith("a"):
            why = sc_check(data)
            if why:
                self.fail("read-sc", f"{rel}: {why} ({len(data)} bytes)")

    def op_unlink(self):
        rel = self.pick_file("sfahlt")
        if not rel:
            return
        self.setdesc(f"unlink {rel}")
        try:
            os.unlink(self.p(rel))
        finally:
            self.files.discard(rel)

    def op_mkdir(self):
        rel = os.path.join(self.pick_dir(), self.newname("u"))
        self.setdesc(f"mkdir {rel}")
        os.mkdir(self.p(rel))
        self.dirs.add(rel)

    def op_rmdir(self):
        rel = self.pick_dir()
        if not rel:
            return
        self.setdesc(f"rmdir {rel}")
        os.rmdir(self.p(rel))
        self.forget(rel)

    def op_rename_file(self):
        rel = self.pick_file("sfahl")
        if not rel:
            return
        cls = os.path.basename(rel)[0]
        dst = os.path.join(self.pick_dir(), self.newname(cls) if cls in "sh" else
                           (f"{cls}{self.rnd.randint(1, 300)}" if cls in "fl" else self.newname("a")))
        if cls == "a":
            dst = os.path.join(os.path.dirname(dst), f"a{self.rnd.randint(0, 30)}")
        self.setdesc(f"rename {rel} -> {dst}")
        os.rename(self.p(rel), self.p(dst))
        self.moved(rel, dst, False)

    def op_rename_dir(self):
        src = self.pick_dir()
        # (The pin dir stays where it is: with redirect_dir=on a lower directory can move.)
        if not src or src == self.pin:
            return
        parent = self.pick_dir()
        dst = os.path.join(parent, self.newname("u"))
        if self.rnd.random() < 0.3:     # keep the name: moves d* too (EXDEV when merged/lower)
            dst = os.path.join(parent, os.path.basename(src))
        self.setdesc(f"rename_dir {src} -> {dst}")
        os.rename(self.p(src), self.p(dst))
        self.moved(src, dst, True)

    def op_rename_over(self):
        if self.rnd.random() < 0.5:
            src = self.pick_file("sfh")
            if not src:
                return
            cls = os.path.basename(src)[0]
            dst = self.pick_file(cls)
            if not dst or dst == src:
                return
            self.setdesc(f"rename_over {src} -> {dst}")
            os.rename(self.p(src), self.p(dst))
            self.moved(src, dst, False)
        else:                           # directory over an (empty?) directory
            src = self.pick_dir()
            dst = self.pick_dir()
            if not src or not dst or src == dst or self.pin in (src, dst):
                return
            self.setdesc(f"rename_over_dir {src} -> {dst}")
            os.rename(self.p(src), self.p(dst))
            self.forget(dst)
            self.moved(src, dst, True)

    def op_exchange(self):
        if self.rnd.random() < 0.5:
            a = self.pick_file("sfhl")
            if not a:
                return
            b = self.pick_file(os.path.basename(a)[0])
            isdir = False
        else:
            a, b = self.pick_dir(), self.pick_dir()
            isdir = True
            # (The pin dir stays where it is: with redirect_dir=on a lower directory can move.)
            if self.pin in (a, b):
                return
        if not a or not b or a == b:
            return
        self.setdesc(f"exchange {a} <-> {b}")
        renameat2(self.p(a), self.p(b), RENAME_EXCHANGE)
        if isdir:
            tmp = "\0tmp"
            self.moved(a, tmp, True)
            self.moved(b, a, True)
            self.moved(tmp, b, True)

    def op_noreplace(self):
        src = self.pick_file("sh") if self.rnd.random() < 0.6 else self.pick_dir()
        if not src:
            return
        cls = os.path.basename(src)[0]
        dst = os.path.join(self.pick_dir(), self.newname(cls if cls in "sh" else "u"))
        self.setdesc(f"noreplace {src} -> {dst}")
        renameat2(self.p(src), self.p(dst), RENAME_NOREPLACE)
        self.moved(src, dst, os.path.basename(src)[0] in "du")

    def op_atomic(self):
        parent = self.pick_dir()
        tmp = os.path.join(parent, f"t{self.wid}_{self.n}")
        self.n += 1
        dstdir = parent if self.rnd.random() < 0.7 else self.pick_dir()
        dst = os.path.join(dstdir, f"a{self.rnd.randint(0, 30)}")
        self.setdesc(f"atomic {tmp} -> {dst}")
        with open(self.p(tmp), "wb") as f:
            f.write(sc_content(self.rnd, f"w{self.wid}"))
        try:
            os.rename(self.p(tmp), self.p(dst))
            self.files.add(dst)
        except OSError:
            try:
                os.unlink(self.p(tmp))
            except OSError:
                pass
            raise

    def op_link(self):
        src = self.pick_file("sfa")
        if self.rnd.random() < 0.2 and self.owned:
            o = self.owned[self.rnd.choice(sorted(self.owned))]
            src = o["path"]
        if not src:
            return
        dst = os.path.join(self.pick_dir(), self.newname("h"))
        self.setdesc(f"link {src} -> {dst}")
        os.link(self.p(src), self.p(dst))
        self.files.add(dst)

    def op_symlink(self):
        dst = os.path.join(self.pick_dir(), f"l{self.rnd.randint(1, 300)}")
        target = self.rnd.choice(["s1", "../d1", "/etc/hostname", "x" * self.rnd.randint(1, 200),
                                  self.pick_dir()])
        self.setdesc(f"symlink {dst}")
        os.symlink(target, self.p(dst))
        self.files.add(dst)

    def op_readlink(self):
        rel = self.pick_file("l")
        if not rel:
            return
        self.setdesc(f"readlink {rel}")
        os.readlink(self.p(rel))

    def op_chmod(self):
        if self.rnd.random() < 0.5:
            rel = self.pick_file("sfah")
            mode = self.rnd.choice([0o644, 0o600, 0o755, 0o444, 0o640])
        else:
            rel = self.pick_dir()
            mode = self.rnd.choice([0o755, 0o700, 0o775, 0o750])
        if not rel:
            return
        self.setdesc(f"chmod {rel}")
        os.chmod(self.p(rel), mode)

    def _xattr_target(self):
        if self.rnd.random() < 0.5:
            return self.pick_file("sfah")
        return self.pick_dir()

    def op_setxattr(self):
        rel = self._xattr_target()
        if rel is None:
            return
        self.setdesc(f"setxattr {rel}")
        os.setxattr(self.p(rel), f"user.k{self.rnd.randint(0, 5)}",
                    self.rnd.randbytes(self.rnd.randint(0, 100)), follow_symlinks=False)

    def op_getxattr(self):
        rel = self._xattr_target()
        if rel is None:
            return
        self.setdesc(f"getxattr {rel}")
        for n in os.listxattr(self.p(rel), follow_symlinks=False):
            if n.startswith("trusted.overlay.") and not n.startswith("trusted.overlay.overlay."):
                self.fail("getxattr", f"{rel}: private xattr {n} visible")
            if n.startswith("user."):
                try:
                    os.getxattr(self.p(rel), n, follow_symlinks=False)
                except OSError as e:
                    self.classify("getxattr", e)
        os.getxattr(self.p(rel), f"user.k{self.rnd.randint(0, 5)}", follow_symlinks=False)

    def op_removexattr(self):
        rel = self._xattr_target()
        if rel is None:
            return
        self.setdesc(f"removexattr {rel}")
        os.removexattr(self.p(rel), f"user.k{self.rnd.randint(0, 5)}", follow_symlinks=False)

    def op_listdir(self):
        rel = self.pick_dir()
        self.setdesc(f"listdir {rel}")
        names = os.listdir(self.p(rel))
        if len(names) != len(set(names)):
            dup = [n for n, c in collections.Counter(names).items() if c > 1]
            self.fail("listdir", f"{rel}: duplicate names {dup[:5]}")
        for n in names:
            if n.startswith(".wh.") or n in ("work", "index"):
                pass
        for n in names:
            c = os.path.join(rel, n)
            (self.dirs if n[:1] in "du" else self.files).add(c)

    def op_stat(self):
        if self.rnd.random() < 0.5:
            rel = self.pick_file("sfahlw") or ""
        else:
            rel = self.pick_dir()
        self.setdesc(f"stat {rel}")
        st = os.lstat(self.p(rel))
        b = os.path.basename(rel)
        if not b:
            return
        if stat.S_ISCHR(st.st_mode) and st.st_rdev == 0:
            self.fail("stat", f"{rel}: a whiteout is visible through the mount")
        if b[:1] in "du" and not stat.S_ISDIR(st.st_mode):
            self.fail("stat", f"{rel}: dir-class name is not a dir (mode {st.st_mode:o})")
        if b[:1] in "sfahw" and stat.S_ISDIR(st.st_mode):
            self.fail("stat", f"{rel}: file-class name is a dir")

    def op_deepwalk(self):
        deep = [f for f in self.files if f.count("/") >= 3]
        if not deep:
            deep = [d for d in self.dirs if d.count("/") >= 3]
            if not deep:
                return
        rel = self.rnd.choice(deep)
        parts = rel.split("/")
        self.setdesc(f"deepwalk {rel}")
        if self.rnd.random() < 0.5:
            try:
                fd = os.open(self.p(rel), os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
            except OSError as e:
                if e.errno == errno.ELOOP:      # the last component is a symlink (l*)
                    self.expected["deepwalk:ELOOP"] += 1
                    return
                raise
            try:
                st = os.fstat(fd)
                if stat.S_ISREG(st.st_mode):
                    os.read(fd, 65536)
            finally:
                os.close(fd)
            return
        # openat chain, with a pause in the middle so ancestors get moved under us
        fds = [os.open(self.m, os.O_RDONLY | os.O_DIRECTORY)]
        try:
            for i, part in enumerate(parts[:-1]):
                fds.append(os.open(part, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW,
                                   dir_fd=fds[-1]))
                if i == 1:
                    time.sleep(0.002)
            os.fstat(fds[-1])
            os.listdir(fds[-1])
            fd = os.open(parts[-1], os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK, dir_fd=fds[-1])
            try:
                st = os.fstat(fd)
                if stat.S_ISREG(st.st_mode):
                    data = os.read(fd, 1 << 20)
                    if parts[-1].startswith("a"):
                        why = sc_check(data) if len(data) < (1 << 20) else None
                        if why:
                            self.fail("deepwalk-sc", f"{rel}: {why}")
            finally:
                os.close(fd)
        except OSError as e:
            if e.errno == errno.ELOOP:          # the last component became a symlink (l*)
                self.expected["deepwalk:ELOOP"] += 1
                return
            raise
        finally:
            for fd in fds:
                os.close(fd)

    def op_scan(self):
        rel = self.pick_dir(3)
        self.setdesc(f"scan {rel}")
        # forget what is under rel, then relearn it
        self.scan(rel, 3)

    def op_hold(self):
        """Open an a* file and keep it open: a* files are never written in place, so what the
        fd reads later (after others replaced or unlinked the name, and new files took its
        inode number) must be exactly what it read now."""
        if len(self.held) >= 8:
            fd, rel, _ = self.held.pop(0)
            os.close(fd)
        rel = self.pick_file("a")
        if not rel:
            return
        self.setdesc(f"hold {rel}")
        fd = os.open(self.p(rel), os.O_RDONLY)
        try:
            data = os.pread(fd, 1 << 21, 0)
        except OSError:
            os.close(fd)
            raise
        why = sc_check(data)
        if why:
            self.fail("hold-sc", f"{rel}: {why}")
        self.held.append((fd, rel, data))

    def op_held_check(self):
        if not self.held:
            return
        fd, rel, data = self.rnd.choice(self.held)
        self.setdesc(f"held_check {rel}")
        got = os.pread(fd, 1 << 21, 0)
        st = os.fstat(fd)
        if got != data:
            self.fail("held-check", f"fd opened on {rel}: now reads {len(got)} bytes "
                      f"({sc_check(got) or 'valid SC'}), read {len(data)} at open")
        elif st.st_size != len(data):
            self.fail("held-check", f"fd opened on {rel}: fstat size {st.st_size} != {len(data)}")
        if self.rnd.random() < 0.3:
            os.listxattr(fd)

    def op_owned_link(self):
        """Hard link one of our files and check both names are one inode."""
        if not self.owned:
            return
        name = self.rnd.choice(sorted(self.owned))
        o = self.owned[name]
        src = o["path"]
        self.n += 1
        dst = os.path.join(os.path.dirname(src), f"h{self.wid}x{self.n}")
        self.setdesc(f"owned_link {src} -> {dst}")
        os.link(self.p(src), self.p(dst))
        self.files.add(dst)
        a, b = os.lstat(self.p(src)), os.lstat(self.p(dst))
        if a.st_ino != b.st_ino or a.st_nlink < 2 or b.st_nlink < 2:
            self.fail("owned-link", f"{src} ino {a.st_ino} nlink {a.st_nlink} / {dst} ino "
                      f"{b.st_ino} nlink {b.st_nlink} right after link()")
        if o.get("ino") is not None and a.st_ino != o["ino"]:
            self.fail("owned-ino", f"{src}: st_ino {a.st_ino} != {o['ino']} after link()")

    def op_pinlist(self):
        self.setdesc(f"pinlist {self.pin}")
        if self.rnd.random() < 0.5:
            names = os.listdir(self.p(self.pin))
        else:
            with os.scandir(self.p(self.pin)) as it:
                names = []
                for e in it:
                    names.append(e.name)
                    if len(names) % 50 == 0:
                        time.sleep(0.001)       # let the churn happen mid-listing
        c = collections.Counter(names)
        dup = [n for n, k in c.items() if k > 1]
        missing = self.pinned - set(names)
        shown = self.pin_hidden & set(names)
        if dup or missing or shown:
            ms = sorted(missing)
            self.fail("pinlist", f"{self.pin}: {len(names)} names; duplicates {sorted(dup)[:5]} "
                      f"({len(dup)}), pinned missing {len(missing)} (from {ms[:1]} to {ms[-1:]}; "
                      f"{sum(1 for n in missing if 'y' in n)} of them L1's), "
                      f"whited-out shown {sorted(shown)[:5]}; listing order: "
                      + " ".join(n[:5] for n in names))

    def op_pinchurn(self):
        # create or remove a non-pinned name in the pin dir (including names that were
        # whiteouts-only in a lower: never the pinned or hidden p* names)
        n = f"s{self.rnd.randint(0, 60)}"
        rel = os.path.join(self.pin, n)
        self.setdesc(f"pinchurn {rel}")
        r = self.rnd.random()
        if r < 0.45:
            with open(self.p(rel), "wb") as f:
                f.write(b"c")
            self.files.add(rel)
        elif r < 0.9:
            os.unlink(self.p(rel))
        else:
            d = os.path.join(self.pin, f"u{self.rnd.randint(0, 60)}")
            if self.rnd.random() < 0.5:
                os.mkdir(self.p(d))
                self.dirs.add(d)
            else:
                os.rmdir(self.p(d))

    def op_fsync(self):
        rel = self.pick_file("sf")
        if not rel:
            return
        self.setdesc(f"fsync {rel}")
        fd = os.open(self.p(rel), os.O_RDWR)
        try:
            os.write(fd, b"x")
            os.fsync(fd)
        finally:
            os.close(fd)

    def write_results(self):
        owned = {}
        for name, o in self.owned.items():
            d = o["data"]
            owned[name] = {"path": o["path"], "sha": sha(d) if d is not None else o["sha"],
                           "size": len(d) if d is not None else o["size"]}
        res = {"worker": self.wid, "ops": dict(self.ops), "expected": dict(self.expected),
               "estale": self.estale, "failures": self.failures, "owned": owned}
        with open(self.resfile + ".tmp", "w") as f:
            json.dump(res, f)
        os.rename(self.resfile + ".tmp", self.resfile)


def worker_main(wid, merged, seed, manifest, deadline, start, desc, resfile, nworkers):
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    w = Worker(wid, merged, seed, manifest, deadline, (start, desc), resfile, nworkers)
    try:
        w.run()
    except Exception:
        w.fail("worker", traceback.format_exc())
        w.write_results()


# ----------------------------------------------------------------------------------------------
# mounts

def mountinfo_entry(mp):
    with open("/proc/self/mountinfo") as f:
        for line in f:
            parts = line.split()
            if parts[4] == mp:
                return parts
    return None


def is_mounted(mp):
    return mountinfo_entry(mp) is not None


def fuse_abort(mp):
    e = mountinfo_entry(mp)
    if not e:
        return
    minor = e[2].split(":")[1]
    try:
        with open(f"/sys/fs/fuse/connections/{minor}/abort", "w") as f:
            f.write("1")
        log(f"  aborted FUSE connection {minor} of {mp}")
    except OSError as ex:
        log(f"  could not abort FUSE connection {minor}: {ex}")


class Mounts:
    """Tracks our mounts so that every path unmounts them."""
    def __init__(self):
        self.active = []

    def add(self, mp):
        self.active.append(mp)

    def umount(self, mp, fuse=True, lazy_ok=True):
        ok = True
        if is_mounted(mp):
            cmd = ["fusermount3", "-u", mp] if fuse else ["umount", mp]
            r = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
            if r.returncode != 0 and is_mounted(mp):
                ok = False
                log(f"  {' '.join(cmd)} failed: {r.stderr.strip()}")
                if lazy_ok:
                    subprocess.run(["umount", "-l", mp], capture_output=True)
        if mp in self.active:
            self.active.remove(mp)
        return ok

    def cleanup(self):
        for mp in list(self.active):
            if is_mounted(mp):
                r = subprocess.run(["umount", mp], capture_output=True)
                if r.returncode != 0:
                    fuse_abort(mp)
                    subprocess.run(["umount", "-l", mp], capture_output=True)
            self.active.remove(mp)


def daemon_pid(binary, merged):
    r = subprocess.run([binary, "stats", merged], capture_output=True, text=True, timeout=20)
    for line in r.stdout.splitlines():
        if line.startswith("pid:"):
            return int(line.split()[1])
    return None


def mount_unionfs(a, mounts, lowers, upper, merged, work, logfile):
    cmd = [a.bin, "mount", lowers, upper, merged, "--workdir", work, "--log-file", logfile,
           *a.mount_opt]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
    if r.returncode != 0:
        raise RuntimeError(f"mount failed ({r.returncode}): {' '.join(cmd)}\n{r.stderr}")
    mounts.add(merged)
    pid = daemon_pid(a.bin, merged)
    return pid


def wait_exit(pid, secs):
    end = time.time() + secs
    while time.time() < end:
        if not os.path.exists(f"/proc/{pid}"):
            return True
        try:
            with open(f"/proc/{pid}/stat") as f:
                if f.read().split(")")[-1].split()[0] == "Z":
                    return True
        except OSError:
            return True
        time.sleep(0.05)
    return False


# ----------------------------------------------------------------------------------------------
# tree recording / comparing

def record_tree(root):
    tree = {}
    errors = []
    for dp, dns, fns in os.walk(root, onerror=lambda e: errors.append(repr(e))):
        dns.sort()
        for n in sorted(dns + fns) + ([""] if dp == root else []):
            p = os.path.join(dp, n) if n else dp
            rel = os.path.relpath(p, root)
            try:
                st = os.lstat(p)
            except OSError as e:
                errors.append(f"lstat {rel}: {e}")
                continue
            ent = {"type": stat.S_IFMT(st.st_mode), "mode": oct(stat.S_IMODE(st.st_mode))}
            if stat.S_ISREG(st.st_mode):
                ent["size"] = st.st_size
                ent["nlink"] = st.st_nlink
                try:
                    with open(p, "rb") as f:
                        ent["sha"] = sha(f.read())
                except OSError as e:
                    errors.append(f"read {rel}: {e}")
            elif stat.S_ISLNK(st.st_mode):
                ent["target"] = os.readlink(p)
            elif stat.S_ISCHR(st.st_mode) or stat.S_ISBLK(st.st_mode):
                ent["rdev"] = st.st_rdev
            try:
                xs = {}
                for x in sorted(os.listxattr(p, follow_symlinks=False)):
                    if x.startswith("user.") or x.startswith("trusted.overlay"):
                        xs[x] = os.getxattr(p, x, follow_symlinks=False).hex()
                if xs:
                    ent["xattrs"] = xs
            except OSError as e:
                if e.errno not in (errno.ENOTSUP,):
                    errors.append(f"xattrs {rel}: {e}")
            tree[rel] = ent
    return tree, errors


def diff_trees(a, b, an, bn, limit=40):
    out = []
    for k in sorted(set(a) | set(b)):
        if k not in a:
            out.append(f"only in {bn}: {k} {b[k]}")
        elif k not in b:
            out.append(f"only in {an}: {k} {a[k]}")
        elif a[k] != b[k]:
            diffs = {f: (a[k].get(f), b[k].get(f)) for f in set(a[k]) | set(b[k])
                     if a[k].get(f) != b[k].get(f)}
            out.append(f"differs: {k}: " + ", ".join(f"{f} {an}={x} {bn}={y}"
                                                       for f, (x, y) in sorted(diffs.items())))
    return out


def check_owned(tree, results, label):
    fails = []
    byname = collections.defaultdict(list)
    for rel, e in tree.items():
        byname[os.path.basename(rel)].append(rel)
    for res in results:
        for name, o in res["owned"].items():
            where = byname.get(name, [])
            if len(where) != 1:
                fails.append(f"{label}: owned {name} found at {where} (expected exactly one, "
                             f"last known {o['path']})")
                continue
            e = tree[where[0]]
            if o["sha"] is not None and (e.get("sha") != o["sha"] or e.get("size") != o["size"]):
                fails.append(f"{label}: owned {name} at {where[0]}: size {e.get('size')} sha "
                             f"{str(e.get('sha'))[:12]} but its owner wrote size {o['size']} "
                             f"sha {o['sha'][:12]}")
    return fails


def check_upper(upper, redirects=False):
    """Things in upper no overlayfs would write (redirects only with redirect_dir=on)."""
    allowed = ["trusted.overlay.opaque", "trusted.overlay.whiteout"]
    if redirects:
        allowed.append("trusted.overlay.redirect")
    notes = []
    for dp, dns, fns in os.walk(upper):
        for n in dns + fns:
            p = os.path.join(dp, n)
            st = os.lstat(p)
            if stat.S_ISCHR(st.st_mode) and st.st_rdev != 0:
                notes.append(f"upper: char device {os.path.relpath(p, upper)} rdev {st.st_rdev}")
            try:
                for x in os.listxattr(p, follow_symlinks=False):
                    if x.startswith("trusted.overlay.") and x not in allowed:
                        notes.append(f"upper: {os.path.relpath(p, upper)} has {x}")
            except OSError:
                pass
    return notes


# ----------------------------------------------------------------------------------------------
# main

def check_quota(upper, work):
    """With a quota (a state file in WORK/unionfs), after a clean unmount: the usage it
    recorded must be what upper and WORK/work hold (allocated bytes and inodes, each inode
    once), as a fresh quotacheck would find."""
    state = os.path.join(work, "unionfs", "quota")
    if not os.path.exists(state):
        return []
    rec = {}
    with open(state) as f:
        for line in f:
            k, _, v = line.strip().partition("=")
            if v and not k.startswith("#"):
                rec[k] = v
    seen = set()
    used_bytes = used_inodes = 0
    for top in (upper, os.path.join(work, "work")):
        if not os.path.isdir(top):
            continue
        todo = [top]
        while todo:
            p = todo.pop()
            try:
                st = os.lstat(p)
            except FileNotFoundError:
                continue
            if (st.st_dev, st.st_ino) not in seen:
                seen.add((st.st_dev, st.st_ino))
                used_bytes += st.st_blocks * 512
                used_inodes += 1
            if stat.S_ISDIR(st.st_mode):
                todo += [os.path.join(p, n) for n in os.listdir(p)]
    out = []
    if rec.get("clean") != "1":
        out.append(f"quota: state not marked clean after a clean unmount: {rec}")
    rb, ri = int(rec.get("used_bytes", -1)), int(rec.get("used_inodes", -1))
    log(f"  quota: recorded {rb} bytes / {ri} inodes; scan {used_bytes} / {used_inodes}")
    if (rb, ri) != (used_bytes, used_inodes):
        out.append(f"quota: recorded usage {rb} bytes / {ri} inodes, but upper + work hold "
                   f"{used_bytes} / {used_inodes}")
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--workers", type=int, default=4)
    ap.add_argument("--seconds", type=float, default=20)
    ap.add_argument("--seed", type=int, default=None)
    ap.add_argument("--bin", default="/tmp/tgt-stress/release/unionfs-rs")
    ap.add_argument("--keep", action="store_true", help="keep the scratch dir on failure")
    ap.add_argument("--dir", default=None, help="scratch dir (default /var/tmp/stress/run-SEED)")
    ap.add_argument("--hang-secs", type=float, default=10)
    ap.add_argument("--mount-opt", action="append", default=[],
                    help="extra argument for `unionfs-rs mount` (repeatable), e.g. "
                         "--mount-opt=--passthrough=off")
    ap.add_argument("--ops", default=None,
                    help="only these kinds of operation (comma-separated names as the summary "
                         "lists them, e.g. create,write,unlink): to narrow a failure down")
    a = ap.parse_args()
    if a.ops:
        os.environ["STRESS_OPS"] = a.ops

    def on_term(signum, frame):
        raise KeyboardInterrupt(f"signal {signum}")
    signal.signal(signal.SIGTERM, on_term)
    if os.geteuid() != 0:
        sys.exit("concurrent-stress: run as root")
    if a.seed is None:
        a.seed = random.randrange(1 << 30)
    root = a.dir or f"/var/tmp/stress/run-{a.seed}"
    if os.path.exists(root):
        for mnt in ("merged", "merged2"):
            if is_mounted(os.path.join(root, mnt)):
                sys.exit(f"{root}/{mnt} is mounted; unmount it first")
        shutil.rmtree(root)
    os.makedirs(root)
    L1, L2 = f"{root}/L1", f"{root}/L2"
    upper, work, merged = f"{root}/upper", f"{root}/work", f"{root}/merged"
    work2, merged2, work3 = f"{root}/work2", f"{root}/merged2", f"{root}/work3"
    logfile = f"{root}/daemon.log"
    for d in (upper, work, merged, merged2, work2):
        os.makedirs(d)
    log(f"concurrent-stress: seed {a.seed}, {a.workers} workers, {a.seconds}s, dir {root}, "
        f"bin {a.bin} {' '.join(a.mount_opt)}")
    manifest = build_layers(root, a.seed, a.workers)
    with open(f"{root}/manifest.json", "w") as f:
        json.dump(manifest, f)
    log(f"  layers: {len(manifest['dirs'])} merged dirs, whiteouts {len(manifest['whiteouts'])}, "
        f"opaque dir {manifest['opaque']}")
    lowers = f"{L1}:{L2}"
    mounts = Mounts()
    failures = []
    results = []
    procs = []
    summary_ok = False
    try:
        pid = mount_unionfs(a, mounts, lowers, upper, merged, work, logfile)
        log(f"  unionfs-rs mounted, daemon pid {pid}")
        # ---- workers
        deadline = mp.Value("d", time.time() + a.seconds, lock=False)
        slots = []
        for w in range(a.workers):
            start = mp.Value("d", 0.0, lock=False)
            desc = mp.Array("c", 256, lock=False)
            resfile = f"{root}/result-{w}.json"
            pr = mp.Process(target=worker_main, args=(w, merged, a.seed, manifest, deadline,
                                                      start, desc, resfile, a.workers))
            pr.start()
            procs.append(pr)
            slots.append((start, desc, resfile))
        hangs = {}
        daemon_dead = False
        end = time.time() + a.seconds + a.hang_secs + 20
        while any(p.is_alive() for p in procs) and time.time() < end:
            time.sleep(0.2)
            now = time.time()
            for w, (start, desc, _) in enumerate(slots):
                s = start.value
                if s and now - s > a.hang_secs and (w, s) not in hangs:
                    hangs[(w, s)] = desc.value.decode(errors="replace")
                    log(f"  HANG: worker {w} stuck {now - s:.1f}s in: {hangs[(w, s)]}")
            if pid and not daemon_dead and not os.path.exists(f"/proc/{pid}"):
                daemon_dead = True
                failures.append(f"daemon {pid} died during the run")
                log("  daemon died!")
        stuck = [p for p in procs if p.is_alive()]
        if stuck or hangs:
            dump = []
            for w, (start, desc, _) in enumerate(slots):
                if start.value:
                    dump.append(f"worker {w} (pid {procs[w].pid}) in {desc.value.decode()} for "
                                f"{time.time() - start.value:.1f}s; kernel stack:\n"
                                + _read(f"/proc/{procs[w].pid}/stack"))
            if pid and os.path.exists(f"/proc/{pid}"):
                for t in sorted(os.listdir(f"/proc/{pid}/task")):
                    dump.append(f"daemon thread {t} {_read(f'/proc/{pid}/task/{t}/comm').strip()} "
                                f"wchan={_read(f'/proc/{pid}/task/{t}/wchan')}\n"
                                + _read(f"/proc/{pid}/task/{t}/stack"))
            with open(f"{root}/hang-dump.txt", "w") as f:
                f.write("\n".join(dump))
            for (w, s), d in hangs.items():
                failures.append(f"hang: worker {w} op stuck > {a.hang_secs}s: {d}")
            if stuck:
                failures.append(f"{len(stuck)} workers still running {a.hang_secs + 20}s after the "
                                f"deadline (stacks in {root}/hang-dump.txt)")
                fuse_abort(merged)
                for p in stuck:
                    p.kill()
        for p in procs:
            p.join(10)
        for w, (_, _, resfile) in enumerate(slots):
            try:
                with open(resfile) as f:
                    results.append(json.load(f))
            except (OSError, ValueError):
                failures.append(f"worker {w} wrote no results (exit code {procs[w].exitcode})")
        # ---- summary of the run
        ops = collections.Counter()
        exp = collections.Counter()
        estale = []
        for r in results:
            ops.update(r["ops"])
            exp.update(r["expected"])
            estale += r["estale"]
            for f in r["failures"]:
                failures.append(f"worker {f['worker']} {f['op']}: {f['msg']}")
        log(f"  ops ({sum(v for k, v in ops.items() if not k.startswith('owned_'))} total): "
            + ", ".join(f"{k} {v}" for k, v in sorted(ops.items())))
        log("  expected errors: " + ", ".join(f"{k} {v}" for k, v in sorted(exp.items())))
        if len(estale) >= ESTALE_LIMIT:
            failures.append(f"ESTALE reached the user {len(estale)} times: {estale[:5]}")
        elif estale:
            log(f"  note: ESTALE {len(estale)}x: {estale}")
        # ---- record and compare
        if is_mounted(merged) and not daemon_dead and not (stuck):
            tree_a, errs = record_tree(merged)
            failures += [f"recording the unionfs-rs tree: {e}" for e in errs]
            failures += check_owned(tree_a, results, "unionfs-rs")
            if not mounts.umount(merged):
                failures.append("fusermount3 -u of the unionfs-rs mount failed")
            if pid and not wait_exit(pid, 60):
                failures.append(f"daemon {pid} still running 60s after unmount")
                os.kill(pid, signal.SIGKILL)
            leftovers = os.listdir(os.path.join(work, "work")) if os.path.isdir(
                os.path.join(work, "work")) else []
            if leftovers:
                log(f"  note: {work}/work not empty after clean unmount: {leftovers[:10]}")
            for n in check_upper(upper, any("redirect_dir=on" in o for o in a.mount_opt)):
                failures.append(n)
            failures += check_quota(upper, work)
            # kernel overlayfs on the same upper
            r = subprocess.run(["mount", "-t", "overlay", "overlay", "-o",
                                f"lowerdir={lowers},upperdir={upper},workdir={work2}", merged2],
                               capture_output=True, text=True)
            if r.returncode != 0:
                failures.append(f"kernel overlay mount failed: {r.stderr.strip()}")
            else:
                mounts.add(merged2)
                tree_k, errs = record_tree(merged2)
                failures += [f"recording the kernel tree: {e}" for e in errs]
                mounts.umount(merged2, fuse=False)
                d = diff_trees(tree_a, tree_k, "unionfs", "kernel")
                log(f"  tree compare unionfs-rs (live) vs kernel overlayfs: {len(tree_a)} vs "
                    f"{len(tree_k)} entries, {len(d)} differences")
                failures += [f"tree live-vs-kernel: {x}" for x in d[:40]]
                failures += check_owned(tree_k, results, "kernel")
                # remount unionfs-rs
                pid2 = mount_unionfs(a, mounts, lowers, upper, merged, work, logfile)
                tree_c, errs = record_tree(merged)
                failures += [f"recording the remounted tree: {e}" for e in errs]
                if not mounts.umount(merged):
                    failures.append("fusermount3 -u of the remount failed")
                if pid2 and not wait_exit(pid2, 60):
                    failures.append(f"remount daemon {pid2} still running 60s after unmount")
                    os.kill(pid2, signal.SIGKILL)
                d = diff_trees(tree_c, tree_k, "remount", "kernel")
                log(f"  tree compare unionfs-rs (remount) vs kernel overlayfs: {len(d)} differences")
                failures += [f"tree remount-vs-kernel: {x}" for x in d[:40]]
                with open(f"{root}/trees.json", "w") as f:
                    json.dump({"live": tree_a, "kernel": tree_k, "remount": tree_c}, f)
        else:
            failures.append("mount not usable after the run: tree compare skipped")
        summary_ok = True
    except (Exception, KeyboardInterrupt):
        failures.append("tool error: " + traceback.format_exc())
    finally:
        for p in procs:
            if p.is_alive():
                p.kill()
                p.join(5)
        mounts.cleanup()
    try:
        with open(logfile) as f:
            warn = [l.rstrip() for l in f if any(w in l for w in ("WARN", "ERROR", "panic", "warn",
                                                                    "error"))]
        if warn:
            log(f"  daemon log: {len(warn)} warning/error lines, e.g.:")
            for l in warn[:15]:
                log("    " + l)
    except OSError:
        pass
    if failures:
        log(f"FAIL: {len(failures)} failures (seed {a.seed}):")
        for f in failures[:80]:
            log("  - " + f)
        if not a.keep:
            shutil.rmtree(root, ignore_errors=True)
        else:
            log(f"  scratch kept in {root}")
        sys.exit(1)
    log(f"OK (seed {a.seed})")
    if not a.keep:
        shutil.rmtree(root, ignore_errors=True)


def _read(p):
    try:
        with open(p) as f:
            return f.read()
    except OSError as e:
        return f"<{e}>"


if __name__ == "__main__":
    main()
