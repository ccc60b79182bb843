//! quotacheck: recompute usage by walking a tree (never following symlinks), counting each
//! inode once (hard links) and its allocated bytes (st_blocks × 512).

use std::collections::HashSet;
use std::ffi::OsStr;
use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;

use nix::dir::{Dir, Type};
use nix::errno::Errno;
use nix::fcntl::OFlag;
use nix::sys::stat::Mode;

/// Running totals of a scan.
#[derive(Debug, Default)]
pub struct Totals {
    /// Allocated bytes.
    pub bytes: u64,
    /// Inodes.
    pub inodes: u64,
    seen: HashSet<(u64, u64)>,
}

impl Totals {
    fn add(&mut self, st: &nix::sys::stat::FileStat) {
        if st.st_nlink > 1 && !self.seen.insert((st.st_dev, st.st_ino)) {
            return;
        }
        self.bytes += st.st_blocks as u64 * 512;
        self.inodes += 1;
    }
}

/// Add the directory `dir` itself and everything below it. `progress` is called with the
/// number of inodes counted so far every 10,000 entries.
pub fn scan_dir(dir: &OwnedFd, t: &mut Totals, progress: &mut dyn FnMut(u64)) -> Result<(), Errno> {
    let st = nix::sys::stat::fstat(dir.as_fd())?;
    t.add(&st);
    walk(dir, t, progress)
}

fn walk(dir: &OwnedFd, t: &mut Totals, progress: &mut dyn FnMut(u64)) -> Result<(), Errno> {
    let dup = nix::unistd::dup(dir.as_fd())?;
    let mut d = Dir::from_fd(dup)?;
    let mut subdirs = Vec::new();
    for e in d.iter() {
        let e = e?;
        let name = e.file_name().to_bytes();
        if name == b"." || name == b".." {
            continue;
        }
        let name = OsStr::from_bytes(name);
        let st = match crate::layer::stat_at(dir.as_fd(), name) {
            Ok(st) => st,
            Err(Errno::ENOENT) => continue,
            Err(e) => return Err(e),
        };
        t.add(&st);
        if t.inodes % 10_000 == 0 {
            progress(t.inodes);
        }
        let is_dir = match e.file_type() {
            Some(Type::Directory) => true,
            Some(_) => false,
            None => st.st_mode & libc::S_IFMT == libc::S_IFDIR,
        };
        if is_dir {
            subdirs.push(name.to_os_string());
        }
    }
    drop(d);
    for s in subdirs {
        let sub = match nix::fcntl::openat(
            dir.as_fd(),
            s.as_os_str(),
            OFlag::O_RDONLY | OFlag::O_DIRECTORY | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC,
            Mode::empty(),
        ) {
            Ok(f) => f,
            Err(Errno::ENOENT) => continue,
            Err(e) => return Err(e),
        };
        walk(&sub, t, progress)?;
    }
    Ok(())
}
