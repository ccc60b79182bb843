//! Tree snapshots (lstat walk, never following symlinks) and their comparison.

use super::*;

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Kind {
    File,
    Dir,
    Symlink,
    Fifo,
    Socket,
    CharDev,
    BlockDev,
    /// Character device 0/0 (only seen in on-disk layers; the merged view hides them).
    Whiteout,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Content {
    /// Small files are kept verbatim (readable diffs).
    Bytes(Vec<u8>),
    /// Hash over the non-zero 4 KiB blocks and their offsets, so holes and written zeros compare
    /// equal and sparse files can be hashed without reading their holes.
    Hash(u64),
    Error(i32),
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mtime {
    /// A time that came from a layer description (kept exactly: sec, nsec).
    Old(i64, i64),
    /// Set while the test ran.
    Recent,
    /// Exact, for `MtimePolicy::Exact`.
    Exact(i64, i64),
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Node {
    pub kind: Kind,
    /// Permission bits incl. suid/sgid/sticky (`st_mode & 0o7777`). `None` for whiteouts.
    pub mode: Option<u32>,
    pub uid: Option<u32>,
    pub gid: Option<u32>,
    /// Size of non-directories (directory sizes are filesystem-internal).
    pub size: Option<u64>,
    pub content: Option<Content>,
    pub target: Option<String>,
    /// (major, minor) for devices
    pub rdev: Option<(u32, u32)>,
    pub xattrs: Result<BTreeMap<String, Vec<u8>>, i32>,
    pub nlink: Option<u64>,
    /// Lexicographically first path of this inode's names in the tree, when it has more than one
    /// name in the tree.
    pub link_group: Option<String>,
    pub mtime: Option<Mtime>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum XattrPolicy {
    /// Record every xattr.
    All,
    /// Drop the overlay-private namespace (`trusted.overlay.*`, or `user.overlay.*` in userxattr
    /// mode).
    NoPrivate(OvlNs),
    /// On-disk upper form: keep overlay xattrs except the kernel's optional bookkeeping
    /// ([`IGNORED_UPPER_XATTRS`]).
    UpperForm,
    /// Ignore xattrs entirely.
    None,
}

/// Overlay xattrs that kernel overlayfs writes as optional bookkeeping and that an
/// implementation of the on-disk format need not write (DESIGN.md section 2: "do not write
/// origin, index, metacopy or impure unless in the kernel's exact format"):
/// - `origin`: file handle of the lower inode a copy-up came from (used for constant st_ino and
///   the index feature; the kernel ignores a missing or stale one when index=off);
/// - `impure`: marks a directory containing copied-up or moved entries so readdir knows to
///   compute d_ino from origin (the kernel re-marks on demand);
/// - `uuid`: per-upper-layer uuid the kernel stores on the upper root (6.6+) to identify the
///   layer in file handles.
///
/// `opaque` and `redirect` are NOT ignored: they change what the merged view shows.
pub const IGNORED_UPPER_XATTRS: &[&str] = &["origin", "impure", "uuid"];

pub(super) fn ignored_upper_xattr(name: &str) -> bool {
    for ns in ["trusted.overlay.", "user.overlay."] {
        if let Some(rest) = name.strip_prefix(ns) {
            return IGNORED_UPPER_XATTRS.contains(&rest);
        }
    }
    false
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum MtimePolicy {
    Ignore,
    /// Old(exact) vs Recent, see [`BASE_TIME`].
    Normalized,
    Exact,
}

#[derive(Clone, Copy, Debug)]
pub struct SnapOpts {
    pub xattrs: XattrPolicy,
    pub mtime: MtimePolicy,
    /// Record nlink of directories. Off for merged views: kernel overlayfs reports 1 for merged
    /// directories (it does not count subdirectories across layers), a reporting choice rather
    /// than a property of the tree.
    pub dir_nlink: bool,
    /// Treat char devices 0/0 as whiteouts and compare them by type only. The kernel reuses one
    /// whiteout inode (hard-linked from the work dir, kernel >= 5.8), so mode/owner/nlink/times of
    /// a whiteout are those of a shared inode and not part of the format.
    pub whiteouts: bool,
    /// Read and hash regular file contents.
    pub contents: bool,
    /// Record directory mtimes (subject to `mtime`).
    pub dir_mtime: bool,
}

impl SnapOpts {
    /// For merged views: all xattrs recorded (private ones must not be visible: check with
    /// [`private_xattrs`]), mtimes normalized, no directory nlink.
    pub fn merged() -> SnapOpts {
        SnapOpts {
            xattrs: XattrPolicy::All,
            mtime: MtimePolicy::Normalized,
            dir_nlink: false,
            whiteouts: false,
            contents: true,
            dir_mtime: true,
        }
    }
    /// For an upper directory on disk (after unmount).
    pub fn upper() -> SnapOpts {
        SnapOpts {
            xattrs: XattrPolicy::UpperForm,
            mtime: MtimePolicy::Normalized,
            dir_nlink: true,
            whiteouts: true,
            contents: true,
            dir_mtime: true,
        }
    }
    /// Exact, for an upper layer: like [`SnapOpts::exact`] except that whiteouts compare by type
    /// only (their nlink drops when a mount cleans the shared whiteout out of the work dir).
    pub fn exact_upper() -> SnapOpts {
        SnapOpts {
            whiteouts: true,
            ..SnapOpts::exact()
        }
    }
    /// Everything exact: to check that nothing at all changed on disk.
    pub fn exact() -> SnapOpts {
        SnapOpts {
            xattrs: XattrPolicy::All,
            mtime: MtimePolicy::Exact,
            dir_nlink: true,
            whiteouts: false,
            contents: true,
            dir_mtime: true,
        }
    }

    /// Debugging aid, never set in CI: `UNIONFS_DIFF_RELAX=dir-mtime` stops differential runs
    /// from comparing directory mtimes, so that other differences are not masked by that one.
    pub fn relaxed_from_env(mut self) -> SnapOpts {
        if std::env::var("UNIONFS_DIFF_RELAX").is_ok_and(|v| v.split(',').any(|x| x == "dir-mtime"))
        {
            self.dir_mtime = false;
        }
        self
    }
}

/// Relative path ("" for the root) → node.
#[derive(Clone, Debug, PartialEq, Eq, Default)]
pub struct Snapshot {
    pub nodes: BTreeMap<String, Node>,
    /// Entries that could not be read, with errno.
    pub errors: BTreeMap<String, i32>,
    /// Names that readdir listed but lstat did not find (ENOENT). Not part of the tree and not
    /// compared by [`diff_snapshots`]: kernel overlayfs lists the whiteouts of a lower directory
    /// that is not merged with anything below (its readdir goes straight to the real directory).
    /// unionfs-rs must list none (checked by `Differential`).
    pub phantoms: std::collections::BTreeSet<String>,
}

/// Walk `root` with lstat (never following symlinks) and record every entry.
pub fn snapshot(root: &Path, opts: &SnapOpts) -> Snapshot {
    let mut snap = Snapshot::default();
    let mut inodes: HashMap<(u64, u64), Vec<String>> = HashMap::new();
    walk_snapshot(root, "", opts, &mut snap, &mut inodes);
    for names in inodes.values() {
        if names.len() > 1 {
            let first = names.iter().min().unwrap().clone();
            for n in names {
                if let Some(node) = snap.nodes.get_mut(n) {
                    node.link_group = Some(first.clone());
                }
            }
        }
    }
    snap
}

pub fn snapshot_merged(root: &Path) -> Snapshot {
    snapshot(root, &SnapOpts::merged())
}

pub fn snapshot_upper(root: &Path) -> Snapshot {
    snapshot(root, &SnapOpts::upper())
}

pub(super) fn walk_snapshot(
    root: &Path,
    rel: &str,
    opts: &SnapOpts,
    snap: &mut Snapshot,
    inodes: &mut HashMap<(u64, u64), Vec<String>>,
) {
    let full = if rel.is_empty() {
        root.to_path_buf()
    } else {
        root.join(rel)
    };
    let md = match fs::symlink_metadata(&full) {
        Ok(m) => m,
        // Listed by readdir but absent (see `Snapshot::phantoms`).
        Err(e) if e.raw_os_error() == Some(libc::ENOENT) && !rel.is_empty() => {
            snap.phantoms.insert(rel.to_string());
            return;
        }
        Err(e) => {
            snap.errors
                .insert(rel.to_string(), e.raw_os_error().unwrap_or(libc::EIO));
            return;
        }
    };
    let ft = md.file_type();
    let rdev = (libc::major(md.rdev()), libc::minor(md.rdev()));
    let mut kind = if ft.is_dir() {
        Kind::Dir
    } else if ft.is_file() {
        Kind::File
    } else if ft.is_symlink() {
        Kind::Symlink
    } else if ft.is_fifo() {
        Kind::Fifo
    } else if ft.is_socket() {
        Kind::Socket
    } else if ft.is_char_device() {
        Kind::CharDev
    } else {
        Kind::BlockDev
    };
    if opts.whiteouts && kind == Kind::CharDev && rdev == (0, 0) {
        kind = Kind::Whiteout;
    }
    let is_dir = kind == Kind::Dir;
    let wh = kind == Kind::Whiteout;
    let xattrs = if wh || opts.xattrs == XattrPolicy::None {
        Ok(BTreeMap::new())
    } else {
        read_xattrs(&full).map(|m| {
            m.into_iter()
                .filter(|(k, _)| match opts.xattrs {
                    XattrPolicy::All => true,
                    XattrPolicy::NoPrivate(ns) => !k.starts_with(ns.prefix()),
                    XattrPolicy::UpperForm => !ignored_upper_xattr(k),
                    XattrPolicy::None => false,
                })
                .collect()
        })
    };
    let mtime = if wh || (is_dir && !opts.dir_mtime) {
        None
    } else {
        match opts.mtime {
            MtimePolicy::Ignore => None,
            MtimePolicy::Exact => Some(Mtime::Exact(md.mtime(), md.mtime_nsec())),
            MtimePolicy::Normalized => Some(if md.mtime() < OLD_TIME_CUTOFF {
                Mtime::Old(md.mtime(), md.mtime_nsec())
            } else {
                Mtime::Recent
            }),
        }
    };
    let node = Node {
        kind,
        mode: (!wh).then_some(md.mode() & 0o7777),
        uid: (!wh).then_some(md.uid()),
        gid: (!wh).then_some(md.gid()),
        size: (!is_dir && !wh).then_some(md.size()),
        content: (kind == Kind::File && opts.contents).then(|| hash_file(&full, md.size())),
        target: if kind == Kind::Symlink {
            Some(match fs::read_link(&full) {
                Ok(t) => t.to_string_lossy().into_owned(),
                Err(e) => format!("<readlink error {e}>"),
            })
        } else {
            None
        },
        rdev: matches!(kind, Kind::CharDev | Kind::BlockDev).then_some(rdev),
        xattrs,
        nlink: if wh || (is_dir && !opts.dir_nlink) {
            None
        } else {
            Some(md.nlink())
        },
        link_group: None,
        mtime,
    };
    if !is_dir && !wh {
        inodes
            .entry((md.dev(), md.ino()))
            .or_default()
            .push(rel.to_string());
    }
    snap.nodes.insert(rel.to_string(), node);
    if is_dir {
        match fs::read_dir(&full) {
            Ok(rd) => {
                let mut names = Vec::new();
                for e in rd {
                    match e {
                        Ok(e) => names.push(e.file_name()),
                        Err(err) => {
                            snap.errors.insert(
                                format!("{rel}/<readdir>"),
                                err.raw_os_error().unwrap_or(libc::EIO),
                            );
                        }
                    }
                }
                names.sort();
                for n in names {
                    let child = if rel.is_empty() {
                        n.to_string_lossy().into_owned()
                    } else {
                        format!("{rel}/{}", n.to_string_lossy())
                    };
                    walk_snapshot(root, &child, opts, snap, inodes);
                }
            }
            Err(e) => {
                snap.errors
                    .insert(rel.to_string(), e.raw_os_error().unwrap_or(libc::EIO));
            }
        }
    }
}

/// All xattrs of `p` (not following symlinks), name → value.
pub fn read_xattrs(p: &Path) -> Result<BTreeMap<String, Vec<u8>>, i32> {
    let c = cstr(p);
    let mut buf = vec![0u8; 4096];
    let n = loop {
        let n = unsafe { libc::llistxattr(c.as_ptr(), buf.as_mut_ptr().cast(), buf.len()) };
        if n >= 0 {
            break n as usize;
        }
        let e = errno();
        if e == libc::ERANGE {
            buf.resize(buf.len() * 4, 0);
            continue;
        }
        return Err(e);
    };
    let mut out = BTreeMap::new();
    for name in buf[..n].split(|&b| b == 0).filter(|s| !s.is_empty()) {
        let name_s = String::from_utf8_lossy(name).into_owned();
        let v = lgetxattr(p, &name_s)?;
        out.insert(name_s, v);
    }
    Ok(out)
}

pub fn lgetxattr(p: &Path, name: &str) -> Result<Vec<u8>, i32> {
    let c = cstr(p);
    let n = CString::new(name).unwrap();
    let mut buf = vec![0u8; 1024];
    loop {
        let r =
            unsafe { libc::lgetxattr(c.as_ptr(), n.as_ptr(), buf.as_mut_ptr().cast(), buf.len()) };
        if r >= 0 {
            buf.truncate(r as usize);
            return Ok(buf);
        }
        let e = errno();
        if e == libc::ERANGE && buf.len() < (1 << 20) {
            buf.resize(buf.len() * 8, 0);
            continue;
        }
        return Err(e);
    }
}

pub(super) const SMALL_FILE: u64 = 512;

pub(super) fn hash_file(p: &Path, size: u64) -> Content {
    let mut f = match fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NOFOLLOW | libc::O_NONBLOCK)
        .open(p)
    {
        Ok(f) => f,
        Err(e) => return Content::Error(e.raw_os_error().unwrap_or(libc::EIO)),
    };
    if size <= SMALL_FILE {
        let mut v = Vec::new();
        return match f.read_to_end(&mut v) {
            Ok(_) => Content::Bytes(v),
            Err(e) => Content::Error(e.raw_os_error().unwrap_or(libc::EIO)),
        };
    }
    match hash_sparse(&mut f) {
        Ok(h) => Content::Hash(h),
        Err(e) => Content::Error(e.raw_os_error().unwrap_or(libc::EIO)),
    }
}

pub(super) const BLK: u64 = 4096;

/// Hash of (offset, block) for every non-zero 4 KiB block, plus the length actually read.
/// Uses SEEK_DATA/SEEK_HOLE to skip holes where the filesystem supports it.
pub(super) fn hash_sparse(f: &mut fs::File) -> io::Result<u64> {
    use std::os::unix::fs::FileExt;
    use std::os::unix::io::AsRawFd;
    let fd = f.as_raw_fd();
    let end = f.metadata()?.len();
    let mut h = DefaultHasher::new();
    let mut next_block = 0u64; // first offset not yet hashed
    let mut pos = 0u64;
    let mut buf = vec![0u8; 1 << 20];
    let mut total = 0u64;
    while pos < end {
        let data = unsafe { libc::lseek(fd, pos as libc::off_t, libc::SEEK_DATA) };
        let (seg_start, seg_end) = if data < 0 {
            let e = errno();
            if e == libc::ENXIO {
                break; // no more data
            }
            (pos, end) // SEEK_DATA unsupported: everything is data
        } else {
            let hole = unsafe { libc::lseek(fd, data, libc::SEEK_HOLE) };
            let hole = if hole < 0 { end as i64 } else { hole };
            (data as u64, (hole as u64).min(end))
        };
        if seg_end <= seg_start {
            pos = seg_start.max(pos + 1);
            continue;
        }
        let mut off = (seg_start / BLK * BLK).max(next_block);
        while off < seg_end {
            let want = ((seg_end - off).div_ceil(BLK) * BLK).min(buf.len() as u64) as usize;
            let n = f.read_at(&mut buf[..want], off)?;
            if n == 0 {
                break;
            }
            total = total.max(off + n as u64);
            for (i, chunk) in buf[..n].chunks(BLK as usize).enumerate() {
                if chunk.iter().any(|&b| b != 0) {
                    h.write_u64(off + (i as u64) * BLK);
                    h.write(chunk);
                }
            }
            off += n as u64;
        }
        next_block = off;
        pos = seg_end.max(off);
    }
    h.write_u64(end);
    let _ = total;
    Ok(h.finish())
}

/// Names of overlay-private xattrs visible in `snap` (must be empty for a merged view).
pub fn private_xattrs(snap: &Snapshot, ns: OvlNs) -> Vec<String> {
    let mut v = Vec::new();
    for (p, n) in &snap.nodes {
        if let Ok(x) = &n.xattrs {
            for k in x.keys() {
                if k.starts_with("trusted.overlay.") || k.starts_with(ns.prefix()) {
                    v.push(format!("{p}: {k}"));
                }
            }
        }
    }
    v
}

/// Human-readable differences between two snapshots (empty = equal).
pub fn diff_snapshots(a_name: &str, a: &Snapshot, b_name: &str, b: &Snapshot) -> Vec<String> {
    let mut out = Vec::new();
    let keys: std::collections::BTreeSet<&String> = a.nodes.keys().chain(b.nodes.keys()).collect();
    for k in keys {
        let shown = if k.is_empty() { "<root>" } else { k.as_str() };
        match (a.nodes.get(k), b.nodes.get(k)) {
            (Some(x), Some(y)) if x == y => {}
            (Some(x), Some(y)) => {
                let mut fields = Vec::new();
                macro_rules! f {
                    ($field:ident) => {
                        if x.$field != y.$field {
                            fields.push(format!(
                                "{}: {a_name}={:?} {b_name}={:?}",
                                stringify!($field),
                                x.$field,
                                y.$field
                            ));
                        }
                    };
                }
                f!(kind);
                if x.mode != y.mode {
                    fields.push(format!(
                        "mode: {a_name}={:?} {b_name}={:?}",
                        x.mode.map(|m| format!("{m:o}")),
                        y.mode.map(|m| format!("{m:o}"))
                    ));
                }
                f!(uid);
                f!(gid);
                f!(size);
                f!(content);
                f!(target);
                f!(rdev);
                f!(xattrs);
                f!(nlink);
                f!(link_group);
                f!(mtime);
                out.push(format!("{shown}: {}", fields.join("; ")));
            }
            (Some(x), None) => out.push(format!("{shown}: only in {a_name}: {x:?}")),
            (None, Some(y)) => out.push(format!("{shown}: only in {b_name}: {y:?}")),
            (None, None) => unreachable!(),
        }
    }
    if a.errors != b.errors {
        out.push(format!(
            "walk errors: {a_name}={:?} {b_name}={:?}",
            a.errors, b.errors
        ));
    }
    out
}

/// Panic with a readable diff unless the snapshots are equal.
#[track_caller]
pub fn assert_same_tree(what: &str, a_name: &str, a: &Snapshot, b_name: &str, b: &Snapshot) {
    let d = diff_snapshots(a_name, a, b_name, b);
    assert!(
        d.is_empty(),
        "{what}: trees differ ({} entries):\n  {}",
        d.len(),
        d.join("\n  ")
    );
}

/// Snapshot with the private namespace dropped (after checking there was nothing to drop).
pub fn strip_private(mut s: Snapshot, ns: OvlNs) -> Snapshot {
    for n in s.nodes.values_mut() {
        if let Ok(x) = &mut n.xattrs {
            x.retain(|k, _| !k.starts_with(ns.prefix()) && !k.starts_with("trusted.overlay."));
        }
    }
    s
}
