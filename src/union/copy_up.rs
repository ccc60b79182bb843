//! Atomic copy-up (kernel fs/overlayfs/copy_up.c): build the object in `workdir/work`, copy
//! data (reflink, then copy_file_range, then read/write; holes kept), owner, mode, xattrs and
//! times, then rename it into place. Parents first. A crash leaves the old view or the new one.

use std::ffi::{OsStr, OsString};
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};

use nix::errno::Errno;
use nix::fcntl::{AtFlags, OFlag, RenameFlags};
use nix::sys::stat::{FileStat, Mode, SFlag, UtimensatFlags};
use nix::sys::time::TimeSpec;
use nix::unistd::{Gid, Uid, Whence};

use super::{Ctx, Error, LayerRef, Node, Result, Union};
use crate::layer::{self, sys};

impl Union {
    /// Make sure `node` exists in the upper layer under its name (copying it and its parents
    /// up, or waiting for a pending commit of an earlier copy-up).
    pub fn copy_up(&self, node: &Node) -> Result<()> {
        let (upper, metacopy) = {
            let st = node.st.lock();
            (st.upper, st.data.is_some())
        };
        if upper {
            self.commits.wait_node(node.ino);
            if metacopy {
                self.copy_up_data(node)?;
            }
            return Ok(());
        }
        self.copy_up_as(node, false, false).map(|_| ())
    }

    /// Copy `node` up for an operation on the file itself (open for writing, setattr): a
    /// regular file's commit may be deferred (see `commit.rs`). The returned guard keeps the
    /// copy this thread's until dropped, which hands it to the committer: hold it through
    /// the operation.
    pub(crate) fn copy_up_for_use(&self, node: &Node) -> Result<Option<super::commit::Staged>> {
        let (upper, metacopy) = {
            let st = node.st.lock();
            (st.upper, st.data.is_some())
        };
        if upper {
            if metacopy {
                self.copy_up_data(node)?;
            }
            return Ok(None);
        }
        self.copy_up_as(node, true, false)
    }

    /// [`Union::copy_up_for_use`] for an open with O_TRUNC: a lower regular file's data is not
    /// copied (the open empties the copy at once), only its metadata, as kernel overlayfs
    /// copies up for O_TRUNC.
    pub(crate) fn copy_up_for_truncate(
        &self,
        node: &Node,
    ) -> Result<Option<super::commit::Staged>> {
        if node.st.lock().upper || node.kind != libc::S_IFREG {
            return self.copy_up_for_use(node);
        }
        self.copy_up_as(node, true, true)
    }

    /// Give metacopy file `node` in upper (kernel overlayfs `metacopy=on`: its metadata was
    /// copied up alone) its data, before anything changes it, renames or links it, as the
    /// kernel does before a write: copied from the lower data file into the upper file in
    /// place (its times kept), synced, and only then the metacopy mark removed — a crash
    /// before that leaves the mark, and the data is read from below as before.
    fn copy_up_data(&self, node: &Node) -> Result<()> {
        let _g = node.copy_lock.lock();
        let st = node.state();
        let Some(d) = st.data.clone() else {
            return Ok(());
        };
        let (udir, name) = self.open_parent_in(node, LayerRef::Upper)?;
        let (ddir, dname) = self.data_parent(node, &d)?;
        let dst = nix::fcntl::openat(
            udir.as_fd(),
            name.as_os_str(),
            OFlag::O_WRONLY | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC,
            Mode::empty(),
        )
        .ctx("data copy-up: open upper file")?;
        self.check_opened(node, LayerRef::Upper, dst.as_fd())?;
        let src = open_source(ddir.as_fd(), &dname).ctx("data copy-up: open lower data")?;
        let before = nix::sys::stat::fstat(dst.as_fd()).ctx("data copy-up: stat")?;
        let data = nix::sys::stat::fstat(src.as_fd()).ctx("data copy-up: stat data")?;
        let res = self.reserve(0, super::charge::alloc(&data) as u64)?;
        // As much as the file shows (the kernel set its size at the copy-up).
        let mut span = data;
        span.st_size = before.st_size;
        let durable = !self.volatile;
        let keep_times = || {
            nix::sys::stat::futimens(
                dst.as_fd(),
                &TimeSpec::new(before.st_atime, before.st_atime_nsec),
                &TimeSpec::new(before.st_mtime, before.st_mtime_nsec),
            )
        };
        let copied = (|| -> Result<()> {
            copy_data(src.as_fd(), dst.as_fd(), &span, durable, &self.reflink)?;
            nix::unistd::ftruncate(dst.as_fd(), before.st_size).ctx("data copy-up: set size")?;
            keep_times().ctx("data copy-up: keep times")?;
            if durable {
                nix::unistd::fsync(dst.as_fd()).ctx("data copy-up: fsync")?;
            }
            match sys::remove_xattr(udir.as_fd(), &name, &self.names.metacopy) {
                Ok(()) | Err(Errno::ENODATA) => Ok(()),
                Err(e) => Err(Error::new(e, "data copy-up: remove the metacopy mark")),
            }
        })();
        if let Err(e) = copied {
            // Back to the metacopy file it was (its data still read from below, its mark
            // still on): the blocks copied so far (a full upper, say) go, and whatever the
            // file is left holding is what is charged for it.
            let _ = nix::unistd::ftruncate(dst.as_fd(), 0);
            let _ = nix::unistd::ftruncate(dst.as_fd(), before.st_size);
            let _ = keep_times();
            if let Ok(now) = nix::sys::stat::fstat(dst.as_fd()) {
                res.settle(
                    super::charge::alloc(&now) - super::charge::alloc(&before),
                    0,
                );
            }
            return Err(e);
        }
        let after = nix::sys::stat::fstat(dst.as_fd()).ctx("data copy-up: stat")?;
        res.settle(
            super::charge::alloc(&after) - super::charge::alloc(&before),
            0,
        );
        if self.quota.is_some() {
            // What the file now holds is what is charged for it (see copy_up_as).
            *node.io_lock.lock() = Some((super::charge::alloc(&after), after.st_size));
        }
        node.st.lock().data = None;
        Ok(())
    }

    /// `empty`: a regular file's data is not copied (an open with O_TRUNC).
    fn copy_up_as(
        &self,
        node: &Node,
        defer: bool,
        empty: bool,
    ) -> Result<Option<super::commit::Staged>> {
        self.upper_layer()?;
        // Parents first (the root always has an upper when the union is writable).
        let parent = node.st.lock().parent;
        if parent != 0 {
            let p = self.node(parent)?;
            self.copy_up(&p)?;
        }
        let _g = node.copy_lock.lock();
        let st = node.state();
        if st.upper {
            if !defer {
                self.commits.wait_node(node.ino);
            }
            return Ok(None);
        }
        if st.unlinked {
            return Err(Error::new(Errno::ENOENT, "copy-up of removed file"));
        }
        let src_layer = st.top();
        let (src_dir, name) = self.open_parent_in(node, src_layer)?;
        let (dst_dir, _) = self.open_parent_in(node, LayerRef::Upper)?;
        let mut fs = layer::stat_at(src_dir.as_fd(), &name).ctx("copy-up: stat lower")?;
        let empty = empty && fs.st_mode & libc::S_IFMT == libc::S_IFREG;
        if empty {
            fs.st_size = 0;
            fs.st_blocks = 0;
        }
        // A metacopy file in a lower layer: its data from further below.
        let data = match &st.data {
            Some(_) if empty => None,
            Some(d) => {
                fs.st_blocks = d.blocks;
                Some(self.data_parent(node, d)?)
            }
            None => None,
        };
        // Charged in full before it starts: a copy-up that does not fit fails cleanly.
        let res = self.reserve(1, super::charge::alloc(&fs) as u64)?;
        let work = self.work_fd()?;
        // Deferred commit: a regular file, when the committer can take it. A name of a file
        // hard-linked in a lower layer has a node of its own (namei.rs), and its copy breaks
        // the link as the kernel's does: it commits like any other.
        let tx = (defer && fs.st_mode & libc::S_IFMT == libc::S_IFREG)
            .then(|| self.can_stage(fs.st_size.max(0) as u64))
            .flatten();
        let deferred = tx.is_some();
        // The work dir grows here; upper's directory when the copy is renamed into it (now or
        // by the commit), measured there: a commit running meanwhile into the same directory
        // is not counted twice.
        let (new, tmp) = self.dir_op(&[work], true, || {
            self.copy_object(
                (src_dir.as_fd(), &name),
                data.as_ref().map(|(d, n)| (d.as_fd(), n.as_os_str())),
                &fs,
                (dst_dir.as_fd(), &name),
                deferred,
                (src_layer != LayerRef::Upper).then_some(node.ino),
            )
        })?;
        res.settle(super::charge::alloc(&new), 1);
        if self.quota.is_some() && !node.is_dir() {
            // What was just charged is what the node's upper file is known to hold, so any later
            // difference is settled (charge.rs `sync_known`). Left unknown, the first write
            // would take a fresh fstat as already charged — and on ext4 one that runs while
            // the commit's fsync allocates the delayed blocks can see none of them (the
            // reservation is dropped before the blocks are added): charged twice for good.
            *node.io_lock.lock() = Some((super::charge::alloc(&new), new.st_size));
        }
        // Keep st_ino (the node id) across copy-up and remounts. (A copy renamed into upper
        // already was recorded before the rename: `copy_object`.)
        if src_layer != LayerRef::Upper && tmp.is_some() {
            self.inomap.set(new.st_ino, node.ino);
        }
        // A name of a file hard-linked in its lower layer: the copy is a file of its own
        // (nlink 1, as kernel overlayfs without index=on shows it), but the kernel may hold the
        // lower file's count from a lookup, and a copy-up made for another request (a whole
        // tree's, dir_rename=copy) tells it nothing: have it fetch the attributes again.
        if !node.is_dir() && fs.st_nlink > 1 && new.st_nlink != fs.st_nlink {
            self.kernel_forget(vec![super::Forget::Inode(node.ino)]);
        }
        // Pending before it is upper: whoever sees it upper also finds the commit to wait for.
        let staged = match (tx, tmp) {
            (Some(tx), Some(tmp)) => {
                let parent = node.st.lock().parent;
                let size = new.st_size.max(0) as u64;
                let target = (parent, name.as_os_str(), dst_dir.clone());
                Some(self.stage(tx, node.ino, target, tmp, size))
            }
            _ => None,
        };
        {
            let mut st = node.st.lock();
            st.upper = true;
            st.data = None;
        }
        node.upper_obj
            .store(new.st_ino, std::sync::atomic::Ordering::Release);
        // A directory of a lower layer is merged once it is in upper too: its link count is 1
        // from now on (`attr_for`), as the kernel shows it at once; the kernel's copy of its
        // attributes, with the layer's count, goes.
        if node.is_dir() && src_layer != LayerRef::Upper && fs.st_nlink != 1 {
            self.kernel_forget_now(&super::Forget::Attr(node.ino));
        }
        Ok(staged)
    }

    /// Copy the object `name` (stat `fs`) from `src_dir` to `dst_dir/dst_name` through the work
    /// dir, a regular file's data from `data` if given (a metacopy file's). Returns the new
    /// upper object's stat. `deferred` (regular files): stop before the fsync and the rename,
    /// and return the copy's scratch name in the work dir too. `origin`: the node id the copy
    /// keeps (recorded in the inode map before the copy shows in upper).
    #[allow(clippy::too_many_arguments)]
    fn copy_object(
        &self,
        (src_dir, name): (BorrowedFd<'_>, &OsStr),
        data: Option<(BorrowedFd<'_>, &OsStr)>,
        fs: &FileStat,
        (dst_dir, dst_name): (BorrowedFd<'_>, &OsStr),
        deferred: bool,
        origin: Option<u64>,
    ) -> Result<(FileStat, Option<OsString>)> {
        let work = self.work_fd()?;
        let tmp = self.tmp_name();
        let kind = fs.st_mode & libc::S_IFMT;
        let recorded = std::cell::Cell::new(None);
        let res = (|| -> Result<FileStat> {
            match kind {
                libc::S_IFDIR => {
                    nix::sys::stat::mkdirat(work, tmp.as_os_str(), Mode::from_bits_truncate(0o700))
                        .ctx("copy-up: mkdir")?;
                }
                libc::S_IFREG => {
                    let src = open_source(src_dir, name).ctx("copy-up: open source")?;
                    let data_src = match data {
                        Some((d, n)) => Some(open_source(d, n).ctx("copy-up: open data")?),
                        None => None,
                    };
                    let dst = nix::fcntl::openat(
                        work,
                        tmp.as_os_str(),
                        OFlag::O_WRONLY | OFlag::O_CREAT | OFlag::O_EXCL | OFlag::O_CLOEXEC,
                        Mode::from_bits_truncate(0o600),
                    )
                    .ctx("copy-up: create")?;
                    // Write-behind only when this thread waits for the fsync anyway.
                    let durable = !self.volatile && !deferred;
                    let from = data_src.as_ref().unwrap_or(&src);
                    copy_data(from.as_fd(), dst.as_fd(), fs, durable, &self.reflink)?;
                    if data_src.is_some() {
                        // As much as the metacopy file shows.
                        nix::unistd::ftruncate(dst.as_fd(), fs.st_size).ctx("copy-up: set size")?;
                    }
                    // Metadata through the open files (no path lookups), in copy_meta's order.
                    let (s, d) = (src.as_fd(), dst.as_fd());
                    nix::unistd::fchown(
                        d,
                        Some(Uid::from_raw(fs.st_uid)),
                        Some(Gid::from_raw(fs.st_gid)),
                    )
                    .ctx("copy-up: chown")?;
                    copy_xattrs(self, s, OsStr::new(""), d, OsStr::new(""))?;
                    nix::sys::stat::fchmod(d, Mode::from_bits_truncate(fs.st_mode & 0o7777))
                        .ctx("copy-up: chmod")?;
                    nix::sys::stat::futimens(
                        d,
                        &TimeSpec::new(fs.st_atime, fs.st_atime_nsec),
                        &TimeSpec::new(fs.st_mtime, fs.st_mtime_nsec),
                    )
                    .ctx("copy-up: utimes")?;
                    if durable {
                        nix::unistd::fsync(d).ctx("copy-up: fsync")?;
                    }
                }
                libc::S_IFLNK => {
                    let target = nix::fcntl::readlinkat(src_dir, name).ctx("copy-up: readlink")?;
                    nix::unistd::symlinkat(target.as_os_str(), work, tmp.as_os_str())
                        .ctx("copy-up: symlink")?;
                }
                _ => {
                    nix::sys::stat::mknodat(
                        work,
                        tmp.as_os_str(),
                        SFlag::from_bits_truncate(kind),
                        Mode::from_bits_truncate(0o600),
                        fs.st_rdev,
                    )
                    .ctx("copy-up: mknod")?;
                }
            }
            if kind != libc::S_IFREG {
                copy_meta(self, src_dir, name, work, &tmp, fs)?;
            }
            // The copy as it is (taken before it shows in upper: once it is there, a failure
            // would leave it in upper while the copy-up fails).
            let c = layer::stat_at(work, &tmp).ctx("copy-up: stat copy")?;
            if deferred {
                return Ok(c);
            }
            // Its number recorded before it shows in upper: a lookup of the name meanwhile (a
            // stat while a chmod copies the file up; the kernel holds no lock of the parent
            // for the chmod) must give it the node's number, not its own — which would make a
            // second node, and a second kernel inode, for it.
            if let Some(o) = origin {
                self.inomap.set(c.st_ino, o);
                recorded.set(Some(c.st_ino));
            }
            // A copy-up is no change of the parent the user could see: its times are read
            // just before the rename into it and restored after, as the kernel does (best
            // effort; a deferred commit does the same when it renames, holding the directory
            // against operations in it — this copy-up runs inside an operation, which may hold
            // that guard itself).
            let _times = self.dir_times.lock();
            let pstat = nix::sys::stat::fstat(dst_dir).ctx("copy-up: stat parent")?;
            self.dir_op(&[dst_dir], true, || {
                nix::fcntl::renameat2(
                    work,
                    tmp.as_os_str(),
                    dst_dir,
                    dst_name,
                    RenameFlags::RENAME_NOREPLACE,
                )
                .ctx("copy-up: rename into upper")
            })?;
            super::commit::restore_mtime(dst_dir, &pstat);
            Ok(c)
        })();
        let c = match res {
            Ok(c) => c,
            Err(e) => {
                if let Some(i) = recorded.get() {
                    self.inomap.set(i, 0);
                }
                remove_tmp(work, &tmp, kind == libc::S_IFDIR);
                return Err(e);
            }
        };
        if deferred {
            return Ok((c, Some(tmp)));
        }
        if !self.copyup_window.is_zero() {
            // (Testing aid: the copy is in upper, no lock of ours held.)
            std::thread::sleep(self.copyup_window);
        }
        // (Its ctime is the rename's now; nothing here uses it.)
        Ok((c, None))
    }
}

/// Open regular file `name` in `dir` to copy it (without touching its atime where allowed).
fn open_source(dir: BorrowedFd<'_>, name: &OsStr) -> std::result::Result<OwnedFd, Errno> {
    nix::fcntl::openat(
        dir,
        name,
        OFlag::O_RDONLY | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC | OFlag::O_NOATIME,
        Mode::empty(),
    )
    .or_else(|_| {
        nix::fcntl::openat(
            dir,
            name,
            OFlag::O_RDONLY | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC,
            Mode::empty(),
        )
    })
}

/// Owner, xattrs (of `src_dir/name`), mode and times of `dir/name` from `fs`. Owner first:
/// chown clears set-id bits and drops security.capability, so the xattrs (file capabilities
/// included, which kernel overlayfs keeps on copy-up) and the mode come after it.
pub(crate) fn copy_meta(
    u: &Union,
    src_dir: BorrowedFd<'_>,
    src_name: &OsStr,
    dir: BorrowedFd<'_>,
    name: &OsStr,
    fs: &FileStat,
) -> Result<()> {
    nix::unistd::fchownat(
        dir,
        name,
        Some(Uid::from_raw(fs.st_uid)),
        Some(Gid::from_raw(fs.st_gid)),
        AtFlags::AT_SYMLINK_NOFOLLOW,
    )
    .ctx("copy-up: chown")?;
    copy_xattrs(u, src_dir, src_name, dir, name)?;
    if fs.st_mode & libc::S_IFMT != libc::S_IFLNK {
        sys::chmod_at(dir, name, fs.st_mode & 0o7777).ctx("copy-up: chmod")?;
    }
    nix::sys::stat::utimensat(
        dir,
        name,
        &TimeSpec::new(fs.st_atime, fs.st_atime_nsec),
        &TimeSpec::new(fs.st_mtime, fs.st_mtime_nsec),
        UtimensatFlags::NoFollowSymlink,
    )
    .ctx("copy-up: utimes")?;
    Ok(())
}

/// An ACL xattr's value without its entries for unmapped ids, if it has any.
fn acl_stripped(name: &OsStr, v: &[u8]) -> Option<Vec<u8>> {
    use std::os::unix::ffi::OsStrExt;
    super::acl::is_acl_name(name.as_bytes())
        .then(|| super::acl::strip_unmapped(v))
        .flatten()
}

/// Copy every xattr except the overlay-private ones.
fn copy_xattrs(
    u: &Union,
    src_dir: BorrowedFd<'_>,
    name: &OsStr,
    dst_dir: BorrowedFd<'_>,
    dst_name: &OsStr,
) -> Result<()> {
    let names = match sys::list_xattr(src_dir, name) {
        Ok(n) => n,
        Err(Errno::ENOTSUP) => return Ok(()),
        Err(e) => return Err(Error::new(e, "copy-up: listxattr")),
    };
    for x in names {
        if u.names.is_private(&x) {
            continue;
        }
        let v = match sys::get_xattr(src_dir, name, &x) {
            Ok(Some(v)) => v,
            Ok(None) => continue,
            // Unreadable namespaces (e.g. trusted.* for an unprivileged daemon) are skipped,
            // as the kernel skips what it may not copy.
            Err(Errno::EPERM) | Err(Errno::EACCES) | Err(Errno::ENOTSUP) => continue,
            Err(e) => return Err(Error::new(e, "copy-up: getxattr")),
        };
        // (Entries for ids our user namespace does not map cannot be set again: see
        // acl::strip_unmapped.)
        let v = match acl_stripped(&x, &v) {
            Some(s) => {
                if let Some(e) = super::acl::strip_widens(&v) {
                    // Left out, that entry would give its user or group more on the copy (on
                    // the host) than on the original.
                    log::warn!(
                        "refusing to copy {name:?} up: its {x:?} restricts {}, which this \
                         user namespace does not map, and the copy could not keep that \
                         restriction",
                        super::acl::describe(&e)
                    );
                    return Err(Error::new(
                        Errno::EACCES,
                        "copy-up: an ACL restricts an unmapped id",
                    ));
                }
                log::warn!(
                    "copy-up of {name:?}: {x:?} names users or groups this user namespace \
                     does not map; those entries are left out of the copy"
                );
                s
            }
            None => v,
        };
        match sys::set_xattr(dst_dir, dst_name, &x, &v, 0) {
            Ok(()) => {}
            Err(Errno::EPERM) | Err(Errno::ENOTSUP)
                if !x.to_string_lossy().starts_with("user.") => {}
            Err(e) => return Err(Error::new(e, "copy-up: setxattr")),
        }
    }
    Ok(())
}

/// Copy file data keeping holes: reflink if possible, else copy_file_range (or read/write)
/// over each data extent found with SEEK_DATA/SEEK_HOLE, then set the size. With `durable`
/// (an fsync follows), the copy starts writing each chunk to disk as soon as it is copied, so
/// the disk works while the rest is copied and the fsync waits only for the tail.
///
/// `reflink` says whether FICLONE is worth trying (cleared once upper's filesystem refuses it).
/// A source with as many blocks as bytes has no holes: it is copied in one range without
/// looking for them.
pub(crate) fn copy_data(
    src: BorrowedFd<'_>,
    dst: BorrowedFd<'_>,
    fs: &FileStat,
    durable: bool,
    reflink: &std::sync::atomic::AtomicBool,
) -> Result<()> {
    use std::sync::atomic::Ordering::Relaxed;
    let size = fs.st_size.max(0) as u64;
    if size == 0 {
        return Ok(());
    }
    if reflink.load(Relaxed) {
        match sys::ficlone(dst, src) {
            Ok(()) => return Ok(()),
            Err(Errno::EOPNOTSUPP) | Err(Errno::ENOTTY) => reflink.store(false, Relaxed),
            // EXDEV (lower on another filesystem), EINVAL (e.g. a btrfs NOCOW file): per file.
            Err(_) => {}
        }
    }
    let end = size as i64;
    let dense = fs.st_blocks.saturating_mul(512) >= fs.st_size;
    let mut off: i64 = 0;
    while off < end {
        let data = match nix::unistd::lseek(src, off, Whence::SeekData) {
            _ if dense => off,
            Ok(d) => d,
            Err(Errno::ENXIO) => break, // only a hole remains
            Err(Errno::EINVAL) => off,  // no SEEK_DATA support: treat all as data
            Err(e) => return Err(Error::new(e, "copy-up: seek data")),
        };
        if data >= end {
            break;
        }
        let hole = if dense {
            end
        } else {
            match nix::unistd::lseek(src, data, Whence::SeekHole) {
                Ok(h) => h.min(end),
                Err(_) => end,
            }
        };
        // A durable copy goes in chunks, each handed to the disk once copied.
        let chunk = if durable {
            WRITE_BEHIND_CHUNK
        } else {
            i64::MAX
        };
        let mut at = data;
        while at < hole {
            let n = (hole - at).min(chunk);
            copy_range(src, dst, at, n as u64)?;
            if durable {
                write_behind(dst, at, n)?;
            }
            at += n;
        }
        off = hole;
    }
    if !dense {
        // Holes at the end were not written.
        nix::unistd::ftruncate(dst, end).ctx("copy-up: set size")?;
    }
    Ok(())
}

/// Chunk of a durable copy handed to the disk at once.
const WRITE_BEHIND_CHUNK: i64 = 8 << 20;

/// Start writing `len` bytes at `off` of `dst` to disk, after waiting for what lies two
/// chunks before it (so about two chunks are in flight and dirty memory stays bounded). A
/// wait consumes the file's write-back error (the fsync after would not see it), so an error
/// there fails the copy; a filesystem without sync_file_range just gets no write-behind.
fn write_behind(dst: BorrowedFd<'_>, off: i64, len: i64) -> Result<()> {
    let unsupported = |e: &Errno| matches!(e, Errno::EINVAL | Errno::ENOSYS | Errno::EOPNOTSUPP);
    match sys::sync_file_range(dst, off, len, libc::SYNC_FILE_RANGE_WRITE) {
        Err(e) if unsupported(&e) => return Ok(()),
        _ => {}
    }
    let before = off - 2 * WRITE_BEHIND_CHUNK;
    if before >= 0 {
        match sys::sync_file_range(
            dst,
            before,
            WRITE_BEHIND_CHUNK,
            libc::SYNC_FILE_RANGE_WAIT_BEFORE
                | libc::SYNC_FILE_RANGE_WRITE
                | libc::SYNC_FILE_RANGE_WAIT_AFTER,
        ) {
            Err(e) if !unsupported(&e) => return Err(Error::new(e, "copy-up: write data")),
            _ => {}
        }
    }
    Ok(())
}

fn copy_range(src: BorrowedFd<'_>, dst: BorrowedFd<'_>, start: i64, len: u64) -> Result<()> {
    let mut done = 0u64;
    let mut use_cfr = true;
    let mut buf: Vec<u8> = Vec::new();
    while done < len {
        let chunk = (len - done).min(1 << 30) as usize;
        let mut off_in = start + done as i64;
        let mut off_out = off_in;
        if use_cfr {
            match nix::fcntl::copy_file_range(
                src,
                Some(&mut off_in),
                dst,
                Some(&mut off_out),
                chunk,
            ) {
                Ok(0) => return Ok(()), // source shorter than expected
                Ok(n) => {
                    done += n as u64;
                    continue;
                }
                Err(Errno::EINTR) => continue,
                Err(Errno::EXDEV)
                | Err(Errno::EINVAL)
                | Err(Errno::EOPNOTSUPP)
                | Err(Errno::ENOSYS) => {
                    use_cfr = false;
                }
                Err(e) => return Err(Error::new(e, "copy-up: copy_file_range")),
            }
        }
        if buf.is_empty() {
            buf = vec![0u8; 1 << 20];
        }
        let want = chunk.min(buf.len());
        let n = sys::pread_full(src, &mut buf[..want], off_in).ctx("copy-up: read")?;
        if n == 0 {
            return Ok(());
        }
        let mut w = 0;
        while w < n {
            match nix::sys::uio::pwrite(dst, &buf[w..n], off_in + w as i64) {
                Ok(m) => w += m,
                Err(Errno::EINTR) => {}
                Err(e) => return Err(Error::new(e, "copy-up: write")),
            }
        }
        done += n as u64;
    }
    Ok(())
}

/// Remove a scratch object from the work dir (recursively for a directory). Returns what was
/// freed (allocated bytes, inodes), counting only objects whose last link went away.
pub(crate) fn remove_tmp(work: BorrowedFd<'_>, name: &OsStr, is_dir: bool) -> (i64, i64) {
    remove_tmp_as(work, name, is_dir, None)
}

/// [`remove_tmp`] of a directory whose allocation `removal` follows: freed for the directory
/// itself is what was accounted for it ([`super::charge::DirRemoval`]).
pub(crate) fn remove_tmp_as(
    work: BorrowedFd<'_>,
    name: &OsStr,
    is_dir: bool,
    removal: Option<&super::charge::DirRemoval<'_>>,
) -> (i64, i64) {
    let st = layer::stat_at(work, name).ok();
    let mut freed = (0, 0);
    if is_dir {
        if let Ok(d) = nix::fcntl::openat(
            work,
            name,
            OFlag::O_RDONLY | OFlag::O_DIRECTORY | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC,
            Mode::empty(),
        ) {
            freed = remove_dir_contents(&d);
        }
        if nix::unistd::unlinkat(work, name, nix::unistd::UnlinkatFlags::RemoveDir).is_err() {
            return freed;
        }
    } else if nix::unistd::unlinkat(work, name, nix::unistd::UnlinkatFlags::NoRemoveDir).is_err() {
        return freed;
    }
    if let Some(st) = st
        && (is_dir || st.st_nlink <= 1)
    {
        freed.0 += removal
            .and_then(|r| r.accounted())
            .unwrap_or_else(|| super::charge::alloc(&st));
        freed.1 += 1;
    }
    freed
}

/// Remove everything inside an (already detached) directory, never following symlinks.
/// Returns what was freed (bytes, inodes).
pub(crate) fn remove_dir_contents(dir: &OwnedFd) -> (i64, i64) {
    remove_dir_contents_where(dir, |_| true)
}

/// Scratch objects in the work dir that nobody can be using: those of a daemon that is gone
/// (our names are `#PID.N`, PID in hex) and the kernel's (`#HEX`). Another live mount sharing
/// the work dir keeps its own (its commits may be pending). Returns what was freed.
pub(crate) fn clean_work(work: &OwnedFd) -> (i64, i64) {
    use std::os::unix::ffi::OsStrExt;
    remove_dir_contents_where(work, |name| {
        let b = name.as_bytes();
        if b.first() != Some(&b'#') {
            return false;
        }
        let s = String::from_utf8_lossy(&b[1..]);
        match s.split_once('.') {
            Some((pid, _)) => match i32::from_str_radix(pid, 16) {
                // A live process with that pid may hold its scratch.
                Ok(pid) if pid > 0 => !process_alive(pid),
                _ => false,
            },
            None => true,
        }
    })
}

/// Is process `pid` running? A zombie (a killed daemon not yet reaped) is not.
fn process_alive(pid: i32) -> bool {
    match std::fs::read(format!("/proc/{pid}/stat")) {
        // The state follows the command name's closing parenthesis.
        Ok(stat) => match stat.iter().rposition(|&b| b == b')') {
            Some(i) => !matches!(stat.get(i + 2), Some(b'Z') | Some(b'X')),
            None => true,
        },
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => false,
        // No /proc to ask: kill(2) with no signal (a zombie counts as alive there).
        Err(_) => {
            nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), None) != Err(Errno::ESRCH)
        }
    }
}

/// [`remove_dir_contents`] of the top-level entries `remove` picks. Iterative, with a bounded
/// number of open directories ([`layer::walk`]): the tree may be one users built, a hundred
/// thousand levels deep.
fn remove_dir_contents_where(dir: &OwnedFd, remove: impl Fn(&OsStr) -> bool) -> (i64, i64) {
    let mut freed = (0i64, 0i64);
    let mut count = |st: Option<FileStat>, is_dir: bool| {
        if let Some(st) = st
            && (is_dir || st.st_nlink <= 1)
        {
            freed.0 += super::charge::alloc(&st);
            freed.1 += 1;
        }
    };
    let walked = layer::walk::walk(dir.as_fd(), true, &mut |v| match v {
        layer::walk::Visit::Entry {
            dir,
            name,
            is_dir,
            depth,
        } => {
            if depth == 0 && !remove(name) {
                return Ok(false);
            }
            if is_dir {
                // Removed once emptied (Done).
                return Ok(true);
            }
            let st = layer::stat_at(dir, name).ok();
            if nix::unistd::unlinkat(dir, name, nix::unistd::UnlinkatFlags::NoRemoveDir).is_ok() {
                count(st, false);
            }
            Ok(false)
        }
        layer::walk::Visit::Done { dir, name, .. } => {
            let st = layer::stat_at(dir, name).ok();
            if nix::unistd::unlinkat(dir, name, nix::unistd::UnlinkatFlags::RemoveDir).is_ok() {
                count(st, true);
            }
            Ok(true)
        }
    });
    if let Err(e) = walked {
        log::warn!("removing a scratch tree: {e}");
    }
    freed
}
