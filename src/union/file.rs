//! Open files and attribute changes (kernel fs/overlayfs/file.c, inode.c): opening for write
//! or truncating copies up first; a read-only open reads the layer that holds the file.

use std::ffi::OsString;
use std::os::fd::{AsFd, OwnedFd};
use std::sync::Arc;
use std::sync::atomic::Ordering;

use nix::errno::Errno;
use nix::fcntl::{AtFlags, OFlag};
use nix::sys::stat::{Mode, UtimensatFlags};
use nix::sys::time::TimeSpec;
use nix::unistd::{Gid, Uid};

use super::{Attr, Ctx, Error, LayerRef, Result, Union};
use crate::layer;

/// An open file handle.
#[derive(Debug)]
pub struct OpenFile {
    /// Node id.
    pub ino: u64,
    /// The backing file in its layer.
    pub fd: OwnedFd,
    /// Opened for writing (so it is in upper).
    pub writable: bool,
    /// The backing file is the upper layer's (safe to change through).
    pub in_upper: bool,
}

/// pwrite all of `data` at `off` (a short count only after a later chunk fails).
pub(crate) fn pwrite_all(fd: std::os::fd::BorrowedFd<'_>, data: &[u8], off: u64) -> Result<usize> {
    let mut done = 0;
    while done < data.len() {
        match nix::sys::uio::pwrite(fd, &data[done..], off as i64 + done as i64) {
            Ok(n) => done += n,
            Err(Errno::EINTR) => {}
            Err(e) if done == 0 => return Err(Error::new(e, "write")),
            Err(_) => break,
        }
    }
    Ok(done)
}

/// A time to set.
#[derive(Debug, Clone, Copy)]
pub enum SetTime {
    /// The current time.
    Now,
    /// A given time (sec, nsec).
    At(i64, i64),
}

/// Attribute changes of one setattr call.
#[derive(Debug, Clone, Copy, Default)]
pub struct SetAttr {
    /// New permission bits.
    pub mode: Option<u32>,
    /// New owner.
    pub uid: Option<u32>,
    /// New group.
    pub gid: Option<u32>,
    /// New size.
    pub size: Option<u64>,
    /// New atime.
    pub atime: Option<SetTime>,
    /// New mtime.
    pub mtime: Option<SetTime>,
    /// Handle the change came through (ftruncate).
    pub fh: Option<u64>,
}

fn ts(t: Option<SetTime>) -> TimeSpec {
    match t {
        None => TimeSpec::new(0, libc::UTIME_OMIT),
        Some(SetTime::Now) => TimeSpec::new(0, libc::UTIME_NOW),
        Some(SetTime::At(s, ns)) => TimeSpec::new(s, ns),
    }
}

impl Union {
    /// open(2) of an existing file; `flags` as the kernel passes them. Returns a handle id.
    pub fn open(&self, ino: u64, flags: i32) -> Result<u64> {
        let node = self.node(ino)?;
        if node.is_dir() {
            return Err(Error::new(Errno::EISDIR, "open of a directory"));
        }
        let f = OFlag::from_bits_truncate(flags);
        let acc = f & OFlag::O_ACCMODE;
        let writable = acc == OFlag::O_WRONLY || acc == OFlag::O_RDWR || f.contains(OFlag::O_TRUNC);
        if writable {
            self.copy_up(&node)?;
        }
        let st = node.state();
        let (dir, name) = self.open_parent_in(&node, st.top())?;
        let keep = f
            & (OFlag::O_ACCMODE
                | OFlag::O_APPEND
                | OFlag::O_SYNC
                | OFlag::O_DSYNC
                | OFlag::O_DIRECT
                | OFlag::O_NONBLOCK
                | OFlag::O_NOATIME
                | OFlag::O_TRUNC);
        let fd = nix::fcntl::openat(
            dir.as_fd(),
            name.as_os_str(),
            keep | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC | OFlag::O_NOCTTY,
            Mode::empty(),
        )
        .or_else(|e| {
            if e == Errno::EPERM && keep.contains(OFlag::O_NOATIME) {
                nix::fcntl::openat(
                    dir.as_fd(),
                    name.as_os_str(),
                    (keep - OFlag::O_NOATIME) | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC,
                    Mode::empty(),
                )
            } else {
                Err(e)
            }
        })
        .ctx("open")?;
        Ok(self.add_handle(ino, fd, writable, st.upper))
    }

    /// Register an open backing fd; returns its handle id.
    pub fn add_handle(&self, ino: u64, fd: OwnedFd, writable: bool, in_upper: bool) -> u64 {
        let fh = self.fh_seq.fetch_add(1, Ordering::Relaxed);
        self.files.insert(
            fh,
            Arc::new(OpenFile {
                ino,
                fd,
                writable,
                in_upper,
            }),
        );
        fh
    }

    /// An open upper-layer handle of node `ino` (`fh` first if it is one): how an unlinked
    /// but still open file is reached.
    pub(crate) fn upper_handle_of(&self, ino: u64, fh: Option<u64>) -> Option<Arc<OpenFile>> {
        if let Some(f) = fh.and_then(|fh| self.handle(fh).ok())
            && f.ino == ino
            && f.in_upper
        {
            return Some(f);
        }
        self.files
            .iter()
            .find(|e| e.ino == ino && e.in_upper)
            .map(|e| e.value().clone())
    }

    /// setattr of an unlinked file through one of its open handles.
    fn setattr_unlinked(&self, node: &super::Node, a: &SetAttr) -> Result<Attr> {
        let f = self
            .upper_handle_of(node.ino, a.fh)
            .ok_or(Error::new(Errno::ENOENT, "setattr of a removed file"))?;
        let fd = f.fd.as_fd();
        if a.uid.is_some() || a.gid.is_some() {
            nix::unistd::fchown(fd, a.uid.map(Uid::from_raw), a.gid.map(Gid::from_raw))
                .ctx("fchown")?;
        }
        if let Some(mode) = a.mode {
            nix::sys::stat::fchmod(fd, Mode::from_bits_truncate(mode & 0o7777)).ctx("fchmod")?;
        }
        if let Some(size) = a.size {
            let mut known = node.io_lock.lock();
            let before = nix::sys::stat::fstat(fd).ctx("fstat")?;
            if self.quota.is_some() {
                self.sync_known(&mut known, &before);
            }
            nix::unistd::ftruncate(fd, size as i64).ctx("ftruncate")?;
            if self.quota.is_some() {
                let after = nix::sys::stat::fstat(fd).ctx("fstat")?;
                self.account(
                    super::charge::alloc(&after) - super::charge::alloc(&before),
                    0,
                );
                *known = Some((super::charge::alloc(&after), after.st_size));
            }
        }
        if a.atime.is_some() || a.mtime.is_some() {
            nix::sys::stat::futimens(fd, &ts(a.atime), &ts(a.mtime)).ctx("futimens")?;
        }
        let fs = nix::sys::stat::fstat(fd).ctx("fstat")?;
        Ok(self.attr_for(node, &node.state(), &fs))
    }

    /// The open file behind a handle.
    pub fn handle(&self, fh: u64) -> Result<Arc<OpenFile>> {
        self.files
            .get(&fh)
            .map(|f| f.clone())
            .ok_or(Error::new(Errno::EBADF, "file handle"))
    }

    /// read(2): up to `size` bytes at `off`.
    pub fn read(&self, fh: u64, off: u64, size: u32) -> Result<Vec<u8>> {
        let f = self.handle(fh)?;
        let mut buf = vec![0u8; size as usize];
        let n = layer::sys::pread_full(f.fd.as_fd(), &mut buf, off as i64).ctx("read")?;
        buf.truncate(n);
        Ok(buf)
    }

    /// write(2) of `data` at `off` (within the quota, if one is set).
    pub fn write(&self, fh: u64, off: u64, data: &[u8]) -> Result<usize> {
        let f = self.handle(fh)?;
        // A write drops security.capability on disk: keep the xattr cache honest.
        if let Some(node) = self.nodes.get(f.ino) {
            let has_cap = node.xattrs.lock().as_ref().is_some_and(|c| {
                c.iter()
                    .any(|(n, _)| n.as_encoded_bytes() == b"security.capability")
            });
            if has_cap {
                node.invalidate_xattrs();
            }
        }
        match &self.quota {
            Some(q) if f.in_upper => {
                // One writer at a time per inode keeps the before/after accounting exact.
                let node = self.node(f.ino)?;
                let mut known = node.io_lock.lock();
                let r = self.quota_write(q, f.fd.as_fd(), off, data, &mut known);
                drop(known);
                self.mark_unsettled(f.ino);
                r
            }
            _ => pwrite_all(f.fd.as_fd(), data, off),
        }
    }

    /// release(2): drop a handle. The last close of an unlinked upper file frees its space.
    pub fn release(&self, fh: u64) {
        let Some((_, f)) = self.files.remove(&fh) else {
            return;
        };
        if self.quota.is_some()
            && f.in_upper
            && !self.files.iter().any(|e| e.ino == f.ino && e.in_upper)
            && let Ok(st) = nix::sys::stat::fstat(f.fd.as_fd())
        {
            if let Some(node) = self.nodes.get(f.ino) {
                let mut known = node.io_lock.lock();
                self.sync_known(&mut known, &st);
                if st.st_nlink == 0 {
                    *known = None;
                }
            }
            if st.st_nlink == 0 {
                self.account(-super::charge::alloc(&st), -1);
            }
        }
    }

    /// fsync / fdatasync of an open file.
    pub fn fsync(&self, fh: u64, datasync: bool) -> Result<()> {
        let f = self.handle(fh)?;
        if self.volatile {
            return Ok(());
        }
        let r = if datasync {
            nix::unistd::fdatasync(f.fd.as_fd()).ctx("fdatasync")
        } else {
            nix::unistd::fsync(f.fd.as_fd()).ctx("fsync")
        };
        // After a sync the allocation is final: settle it.
        if let (Some(_), Some(node)) = (&self.quota, self.nodes.get(f.ino))
            && f.in_upper
        {
            self.settle_node(&node);
        }
        r
    }

    /// fallocate on an open file (space reserved against the quota first).
    pub fn fallocate(&self, fh: u64, off: u64, len: u64, mode: i32) -> Result<()> {
        let f = self.handle(fh)?;
        match &self.quota {
            Some(q) if f.in_upper && len > 0 => {
                let node = self.node(f.ino)?;
                let mut known = node.io_lock.lock();
                let r = self.quota_fallocate(q, f.fd.as_fd(), (off, len, mode), &mut known);
                drop(known);
                self.mark_unsettled(f.ino);
                r
            }
            _ => super::charge::fallocate(f.fd.as_fd(), off, len, mode),
        }
    }

    /// lseek SEEK_DATA / SEEK_HOLE on an open file.
    pub fn lseek(&self, fh: u64, off: i64, whence: i32) -> Result<i64> {
        let f = self.handle(fh)?;
        let w = match whence {
            libc::SEEK_DATA => nix::unistd::Whence::SeekData,
            libc::SEEK_HOLE => nix::unistd::Whence::SeekHole,
            libc::SEEK_SET => nix::unistd::Whence::SeekSet,
            libc::SEEK_END => nix::unistd::Whence::SeekEnd,
            _ => return Err(Error::new(Errno::EINVAL, "lseek whence")),
        };
        nix::unistd::lseek(f.fd.as_fd(), off, w).ctx("lseek")
    }

    /// readlink(2).
    pub fn readlink(&self, ino: u64) -> Result<OsString> {
        let node = self.node(ino)?;
        if node.kind != libc::S_IFLNK {
            return Err(Error::new(Errno::EINVAL, "readlink of a non-symlink"));
        }
        let st = node.state();
        let (dir, name) = self.open_parent_in(&node, st.top())?;
        nix::fcntl::readlinkat(dir.as_fd(), name.as_os_str()).ctx("readlink")
    }

    /// setattr: chown, chmod, truncate, utimens — copying up first, as the kernel does.
    pub fn setattr(&self, ino: u64, a: &SetAttr) -> Result<Attr> {
        let (uid, gid) = self.disk_ids(a.uid, a.gid)?;
        let a = &SetAttr { uid, gid, ..*a };
        let node = self.node(ino)?;
        // chmod rewrites ACL xattrs, chown drops security.capability: reload xattrs next time.
        node.invalidate_xattrs();
        if node.st.lock().unlinked {
            return self.setattr_unlinked(&node, a);
        }
        self.copy_up(&node)?;
        let st = node.state();
        let (dir, name) = self.open_parent_in(&node, LayerRef::Upper)?;
        // The root has no name in a parent: it is `dir` itself.
        let is_root = name.is_empty();
        if a.uid.is_some() || a.gid.is_some() {
            let (uid, gid) = (a.uid.map(Uid::from_raw), a.gid.map(Gid::from_raw));
            if is_root {
                nix::unistd::fchown(dir.as_fd(), uid, gid).ctx("chown")?;
            } else {
                nix::unistd::fchownat(
                    dir.as_fd(),
                    name.as_os_str(),
                    uid,
                    gid,
                    AtFlags::AT_SYMLINK_NOFOLLOW,
                )
                .ctx("chown")?;
            }
        }
        if let Some(mode) = a.mode {
            layer::sys::chmod_at(dir.as_fd(), &name, mode & 0o7777).ctx("chmod")?;
        }
        if let Some(size) = a.size {
            if node.is_dir() {
                return Err(Error::new(Errno::EISDIR, "truncate of a directory"));
            }
            let via =
                a.fh.and_then(|fh| self.handle(fh).ok())
                    .filter(|f| f.writable);
            let mut known = node.io_lock.lock();
            let before = match &self.quota {
                Some(_) => layer::stat_at(dir.as_fd(), &name).ok(),
                None => None,
            };
            if let Some(b) = &before {
                self.sync_known(&mut known, b);
            }
            match via {
                Some(f) => nix::unistd::ftruncate(f.fd.as_fd(), size as i64).ctx("ftruncate")?,
                None => {
                    let fd = nix::fcntl::openat(
                        dir.as_fd(),
                        name.as_os_str(),
                        OFlag::O_WRONLY | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC | OFlag::O_NONBLOCK,
                        Mode::empty(),
                    )
                    .ctx("truncate: open")?;
                    nix::unistd::ftruncate(fd.as_fd(), size as i64).ctx("truncate")?;
                }
            }
            // Growing is sparse (nothing allocated); shrinking frees blocks.
            if let (Some(b), Ok(a)) = (before, layer::stat_at(dir.as_fd(), &name)) {
                self.account(super::charge::alloc(&a) - super::charge::alloc(&b), 0);
                *known = Some((super::charge::alloc(&a), a.st_size));
                drop(known);
                self.mark_unsettled(node.ino);
            }
        }
        if a.atime.is_some() || a.mtime.is_some() {
            if is_root {
                nix::sys::stat::futimens(dir.as_fd(), &ts(a.atime), &ts(a.mtime)).ctx("utimens")?;
            } else {
                nix::sys::stat::utimensat(
                    dir.as_fd(),
                    name.as_os_str(),
                    &ts(a.atime),
                    &ts(a.mtime),
                    UtimensatFlags::NoFollowSymlink,
                )
                .ctx("utimens")?;
            }
        }
        let fs = layer::stat_at(dir.as_fd(), &name).ctx("stat")?;
        Ok(self.attr_for(&node, &st, &fs))
    }
}
