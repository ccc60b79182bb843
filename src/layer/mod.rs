//! One directory tree, accessed fd-relative and symlink-safe beneath its root.
//!
//! Every path the daemon resolves inside a layer goes through [`Layer::open_dir`], which uses
//! `openat2(RESOLVE_BENEATH | RESOLVE_NO_SYMLINKS | RESOLVE_NO_MAGICLINKS | RESOLVE_NO_XDEV)`
//! (or, on kernels without openat2, an `O_NOFOLLOW` walk one component at a time). The last
//! component of an operation is always handled with an `*at` call on that directory fd with
//! `AT_SYMLINK_NOFOLLOW` semantics, so nothing stored in a layer (symlinks, `..`) can make the
//! daemon touch a file outside the layer. This module knows nothing of unions.

pub mod sys;
pub mod walk;

use std::ffi::{OsStr, OsString};
use std::io;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};

use nix::errno::Errno;
use nix::fcntl::{OFlag, OpenHow, ResolveFlag};
use nix::sys::stat::{FileStat, Mode};

/// A path relative to a layer root, as a list of single components (never `.` or `..`).
pub type RelPath = [OsString];

static NO_OPENAT2: AtomicBool = AtomicBool::new(false);

/// How directories are opened for use (never through a symlink).
const DIR_FLAGS: OFlag = OFlag::O_RDONLY
    .union(OFlag::O_DIRECTORY)
    .union(OFlag::O_CLOEXEC)
    .union(OFlag::O_NOFOLLOW);

/// One directory tree (a lower, the upper, or the work directory).
#[derive(Debug)]
pub struct Layer {
    root: OwnedFd,
    /// Where the layer was opened from (for messages only; never used to resolve).
    pub path: PathBuf,
    /// st_dev of the layer root.
    pub dev: u64,
}

impl Layer {
    /// Open a layer root directory.
    pub fn open(path: &Path) -> io::Result<Layer> {
        let root = nix::fcntl::open(
            path,
            OFlag::O_RDONLY | OFlag::O_DIRECTORY | OFlag::O_CLOEXEC,
            Mode::empty(),
        )
        .map_err(|e| io_err(e, format!("open {}", path.display())))?;
        let st = nix::sys::stat::fstat(&root)?;
        Ok(Layer {
            root,
            path: path.to_path_buf(),
            dev: st.st_dev,
        })
    }

    /// The root directory fd.
    pub fn root(&self) -> BorrowedFd<'_> {
        self.root.as_fd()
    }

    /// Open the directory at `rel` beneath the root (never following a symlink).
    /// `rel` empty opens (a new fd on) the root itself.
    pub fn open_dir(&self, rel: &RelPath) -> Result<OwnedFd, Errno> {
        self.open_beneath(rel, DIR_FLAGS)
    }

    /// The directory `rel` below directory `base`, itself a directory of this layer (opened
    /// beneath it, as [`Layer::open_dir`] does beneath the root).
    pub fn open_dir_below(&self, base: BorrowedFd<'_>, rel: &RelPath) -> Result<OwnedFd, Errno> {
        open_beneath(base, rel, DIR_FLAGS)
    }

    fn open_beneath(&self, rel: &RelPath, flags: OFlag) -> Result<OwnedFd, Errno> {
        open_beneath(self.root.as_fd(), rel, flags)
    }
}

/// Open `rel` beneath directory `base`: never through a symlink, `..` or another mount.
fn open_beneath(base: BorrowedFd<'_>, rel: &RelPath, flags: OFlag) -> Result<OwnedFd, Errno> {
    // One openat2 for the whole path, unless it is too long to name (deep trees are walked
    // a component at a time).
    let long = rel.iter().map(|c| c.len() + 1).sum::<usize>() > 3072;
    if !NO_OPENAT2.load(Ordering::Relaxed) && !long {
        let path = join(rel);
        let how = OpenHow::new().flags(flags).resolve(
            ResolveFlag::RESOLVE_BENEATH
                | ResolveFlag::RESOLVE_NO_SYMLINKS
                | ResolveFlag::RESOLVE_NO_MAGICLINKS
                | ResolveFlag::RESOLVE_NO_XDEV,
        );
        match nix::fcntl::openat2(base, path.as_os_str(), how) {
            Err(Errno::ENOSYS) => NO_OPENAT2.store(true, Ordering::Relaxed),
            // A symlink in the way is "not a directory" for our purposes.
            Err(Errno::ELOOP) => return Err(Errno::ENOTDIR),
            Err(Errno::EXDEV) => return Err(Errno::ENOENT),
            r => return r,
        }
    }
    // Fallback: walk one component at a time with O_NOFOLLOW.
    let mut cur = nix::fcntl::openat(
        base,
        ".",
        OFlag::O_PATH | OFlag::O_DIRECTORY | OFlag::O_CLOEXEC,
        Mode::empty(),
    )?;
    for (i, comp) in rel.iter().enumerate() {
        let last = i + 1 == rel.len();
        let f = if last {
            flags
        } else {
            OFlag::O_PATH | OFlag::O_DIRECTORY | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC
        };
        cur = match nix::fcntl::openat(cur.as_fd(), comp.as_os_str(), f, Mode::empty()) {
            Err(Errno::ELOOP) => return Err(Errno::ENOTDIR),
            r => r?,
        };
    }
    if rel.is_empty() {
        cur = nix::fcntl::openat(base, ".", flags, Mode::empty())?;
    }
    Ok(cur)
}

/// An io::Error carrying an errno and what we were doing.
pub fn io_err(e: Errno, what: impl std::fmt::Display) -> io::Error {
    io::Error::new(io::Error::from(e).kind(), format!("{what}: {e}"))
}

/// Join components with `/` (only for openat2 beneath a root, which re-checks every step).
fn join(rel: &RelPath) -> OsString {
    if rel.is_empty() {
        return OsString::from(".");
    }
    let mut v = Vec::with_capacity(rel.iter().map(|c| c.len() + 1).sum());
    for (i, c) in rel.iter().enumerate() {
        if i > 0 {
            v.push(b'/');
        }
        v.extend_from_slice(c.as_bytes());
    }
    std::ffi::OsStr::from_bytes(&v).to_os_string()
}

/// lstat of `name` in `dir` (name may be empty: the directory itself).
pub fn stat_at(dir: BorrowedFd<'_>, name: &OsStr) -> Result<FileStat, Errno> {
    if name.is_empty() {
        nix::sys::stat::fstat(dir)
    } else {
        nix::sys::stat::fstatat(dir, name, nix::fcntl::AtFlags::AT_SYMLINK_NOFOLLOW)
    }
}

/// Check that a name is one plain component.
pub fn valid_name(name: &OsStr) -> bool {
    let b = name.as_bytes();
    !b.is_empty() && b != b"." && b != b".." && !b.contains(&b'/') && !b.contains(&0)
}
