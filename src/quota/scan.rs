//! quotacheck: recompute usage by walking a tree (never following symlinks), counting each
//! inode once (hard links) and its allocated bytes (st_blocks × 512).

use std::collections::HashSet;
use std::os::fd::{AsFd, OwnedFd};

use nix::errno::Errno;

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

/// Iterative, with a bounded number of open directories ([`crate::layer::walk`]): upper is
/// built by the mount's users, and a chain of directories 100,000 deep must not overflow the
/// stack or run out of descriptors at the next mount.
fn walk(dir: &OwnedFd, t: &mut Totals, progress: &mut dyn FnMut(u64)) -> Result<(), Errno> {
    crate::layer::walk::walk(dir.as_fd(), false, &mut |v| {
        let crate::layer::walk::Visit::Entry { dir, name, .. } = v else {
            return Ok(true);
        };
        let st = match crate::layer::stat_at(dir, name) {
            Ok(st) => st,
            Err(Errno::ENOENT) => return Ok(false),
            Err(e) => return Err(e),
        };
        t.add(&st);
        if t.inodes % 10_000 == 0 {
            progress(t.inodes);
        }
        Ok(st.st_mode & libc::S_IFMT == libc::S_IFDIR)
    })
}
