//! The FUSE adapter: fuser requests → union operations → replies. No policy lives here.

use std::ffi::OsStr;
use std::os::fd::BorrowedFd;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use fuser::{
    AccessFlags, BackingId, Errno, FileAttr, FileHandle, FileType, Filesystem, FopenFlags,
    Generation, INodeNo, InitFlags, IoctlFlags, KernelConfig, LockOwner, OpenFlags, RenameFlags,
    ReplyAttr, ReplyCreate, ReplyData, ReplyDirectory, ReplyDirectoryPlus, ReplyEmpty, ReplyEntry,
    ReplyIoctl, ReplyLseek, ReplyOpen, ReplyStatfs, ReplyWrite, ReplyXattr, Request, TimeOrNow,
    WriteFlags,
};

use crate::union::dir::NewKind;
use crate::union::file::{KillSuidgid, Opened, RegisterBacking, SetAttr, SetTime};
use crate::union::inode::Backing;
use crate::union::readdir::dir_offset;
use crate::union::{Attr, Caller, Error, Union};

pub mod ring;
mod watchdog;
pub mod wire;

/// Kernel cache lifetime for entries and attributes. Safe to make long: every change to the
/// layers goes through this daemon, the kernel updates its cache from our replies (setattr,
/// create, link, write) and invalidates what an operation may change (the parent's attributes
/// after create/unlink/rename, the inode after link/unlink, the size after write); st_ino and
/// the visible attributes are unchanged by copy-up, and copy-up restores the parent's times.
/// Changing the layers behind a live mount is unsupported, as with kernel overlayfs.
pub const DEFAULT_TTL: Duration = Duration::from_secs(60);

/// fuser glue around a [`Union`].
#[derive(Debug)]
pub struct UnionFs {
    u: Arc<Union>,
    ttl: Duration,
    readdirplus: Readdirplus,
    ring: Option<RingSetup>,
}

/// Whether requests come through io_uring (see [`ring`]).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum Uring {
    /// Where the kernel offers it and the daemon may commit replies at idle policy (root): the
    /// case where it is faster than /dev/fuse on an idle machine too.
    #[default]
    Auto,
    /// Wherever the kernel offers it.
    On,
    /// Never.
    Off,
}

/// FUSE over io_uring: offered at INIT, started once INIT is answered (see [`ring`]).
#[derive(Debug, Clone, Default)]
pub struct RingSetup {
    mode: Uring,
    /// Testing aid: the setup after INIT fails (as a thread or ring that cannot be created).
    fail_for_test: bool,
    state: Arc<ring::RingState>,
}

impl RingSetup {
    /// Set up for `mode` (not Off); `fail_for_test`: see `uring_test_fail` (README).
    pub fn new(mode: Uring, fail_for_test: bool) -> RingSetup {
        RingSetup {
            mode,
            fail_for_test,
            state: Arc::default(),
        }
    }

    /// Whether INIT offered it (false: not asked, not offered, or it failed).
    pub fn offered(&self) -> bool {
        !self.state.failed()
    }

    /// Why requests do not come through io_uring, if they do not.
    pub fn why_not(&self) -> Option<&str> {
        self.state.why_not()
    }

    /// Wait (at most `limit`) for the ring threads to end once the connection is gone.
    pub fn join(&self, limit: Duration) {
        self.state.join(limit)
    }

    /// Serve the connection of `dev` through io_uring, `per_cpu` threads per CPU; on an
    /// error the kernel goes on through /dev/fuse.
    pub fn start(
        &self,
        u: Arc<Union>,
        dev: BorrowedFd<'_>,
        ttl: Duration,
        per_cpu: usize,
    ) -> std::io::Result<()> {
        ring::start(u, dev, ttl, per_cpu, self.fail_for_test, self.state.clone())
    }
}

/// When the kernel asks for directory listings with attributes (READDIRPLUS). Each entry of
/// such a listing is a lookup here and an inode in the kernel: `ls -l` then needs no LOOKUP per
/// file, while `find`, which needs only names, pays for attributes it never reads.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum Readdirplus {
    /// The kernel's heuristic (FUSE_READDIRPLUS_AUTO): the first batch of a listing, and later
    /// ones once lookups happened in the directory.
    #[default]
    Auto,
    /// Every batch.
    On,
    /// Names only (READDIR).
    Off,
}

impl UnionFs {
    /// Wrap a union; `ttl` is the kernel's entry and attribute cache lifetime.
    pub fn new(u: Arc<Union>, ttl: Duration) -> UnionFs {
        UnionFs {
            u,
            ttl,
            readdirplus: Readdirplus::Auto,
            ring: None,
        }
    }

    /// Serve requests through io_uring where the kernel offers it.
    pub fn with_ring(mut self, r: RingSetup) -> UnionFs {
        self.ring = Some(r);
        self
    }

    /// Whether opens through /dev/fuse may register passthrough backing files: not while the
    /// ring may take over, which registers its own (an inode's opens share one).
    fn may_register(&self) -> bool {
        self.ring.as_ref().is_none_or(|r| r.state.failed())
    }

    /// Set when listings come with attributes.
    pub fn with_readdirplus(mut self, r: Readdirplus) -> UnionFs {
        self.readdirplus = r;
        self
    }
}

fn errno(e: Error) -> Errno {
    log::debug!("{e}");
    Errno::from_i32(e.errno as i32)
}

/// The backing file an open answers with in passthrough mode.
fn backing_id(o: &Opened) -> Option<&BackingId> {
    o.direct
        .as_ref()
        .and_then(|b| b.downcast_ref::<BackingId>())
}

/// FOPEN_KEEP_CACHE unless the file changed behind the kernel's pages of it: every write
/// otherwise comes through us, so they stay valid across opens.
fn keep_cache(o: &Opened) -> FopenFlags {
    if o.keep_cache {
        FopenFlags::FOPEN_KEEP_CACHE
    } else {
        FopenFlags::empty()
    }
}

fn systime((s, ns): (i64, i64)) -> SystemTime {
    if s >= 0 {
        UNIX_EPOCH + Duration::new(s as u64, ns as u32)
    } else {
        UNIX_EPOCH - Duration::from_secs((-s) as u64) + Duration::from_nanos(ns as u64)
    }
}

fn kind_of(mode: u32) -> FileType {
    match mode & libc::S_IFMT {
        libc::S_IFDIR => FileType::Directory,
        libc::S_IFLNK => FileType::Symlink,
        libc::S_IFCHR => FileType::CharDevice,
        libc::S_IFBLK => FileType::BlockDevice,
        libc::S_IFIFO => FileType::NamedPipe,
        libc::S_IFSOCK => FileType::Socket,
        _ => FileType::RegularFile,
    }
}

/// LOOKUP for both transports. A name that does not exist is answered with node id 0 (with
/// the entry timeout), which the kernel keeps as a negative dentry (as it does on kernel
/// overlayfs) instead of asking again at every open or stat of a missing name (a shell's PATH
/// search, a compiler's include path, interpreters probing modules). Safe as long as positive
/// entries are: every change of a name comes through us, and a name the daemon itself brings
/// back (a deferred rename undone, a half-done create) is invalidated in the kernel
/// (`Forget::Entry`).
pub(crate) fn lookup_entry(u: &Union, parent: u64, name: &OsStr) -> crate::union::Result<Attr> {
    match u.lookup(parent, name) {
        Err(e) if e.errno == nix::errno::Errno::ENOENT => Ok(Attr::EMPTY),
        r => r,
    }
}

fn fattr(a: &Attr) -> FileAttr {
    FileAttr {
        ino: INodeNo(a.ino),
        size: a.size,
        blocks: a.blocks,
        atime: systime(a.atime),
        mtime: systime(a.mtime),
        ctime: systime(a.ctime),
        crtime: UNIX_EPOCH,
        kind: kind_of(a.mode),
        perm: (a.mode & 0o7777) as u16,
        nlink: a.nlink as u32,
        uid: a.uid,
        gid: a.gid,
        rdev: a.rdev as u32,
        blksize: a.blksize as u32,
        flags: 0,
    }
}

fn set_time(t: Option<TimeOrNow>) -> Option<SetTime> {
    t.map(|t| match t {
        TimeOrNow::Now => SetTime::Now,
        TimeOrNow::SpecificTime(st) => match st.duration_since(UNIX_EPOCH) {
            Ok(d) => SetTime::At(d.as_secs() as i64, d.subsec_nanos() as i64),
            Err(e) => {
                let d = e.duration();
                let (mut s, mut ns) = (-(d.as_secs() as i64), -(d.subsec_nanos() as i64));
                if ns < 0 {
                    s -= 1;
                    ns += 1_000_000_000;
                }
                SetTime::At(s, ns)
            }
        },
    })
}

fn caller(req: &Request) -> Caller {
    Caller {
        uid: req.uid(),
        gid: req.gid(),
        pid: req.pid(),
    }
}

impl UnionFs {
    fn entry(&self, r: crate::union::Result<Attr>, reply: ReplyEntry) {
        match r {
            Ok(a) => reply.entry(&self.ttl, &fattr(&a), Generation(a.generation)),
            Err(e) => reply.error(errno(e)),
        }
    }
}

/// A request whose handler panicked is answered EIO (its fuser reply, dropped unsent while
/// unwinding, sends that) and its thread serves on: fuser ends the whole session once one of
/// its loop threads has ended, and the requests of the others with it.
fn guarded(op: &str, f: impl FnOnce()) {
    if std::panic::catch_unwind(std::panic::AssertUnwindSafe(f)).is_err() {
        log::error!("{op}: the handler panicked; answered EIO");
    }
}

impl Filesystem for UnionFs {
    fn init(&mut self, _req: &Request, config: &mut KernelConfig) -> std::io::Result<()> {
        let _ = config.set_max_write(1 << 20);
        let rdp = match self.readdirplus {
            Readdirplus::Auto => InitFlags::FUSE_DO_READDIRPLUS | InitFlags::FUSE_READDIRPLUS_AUTO,
            Readdirplus::On => InitFlags::FUSE_DO_READDIRPLUS,
            Readdirplus::Off => InitFlags::empty(),
        };
        // FUSE_ATOMIC_O_TRUNC: an open with O_TRUNC carries the flag and the kernel sends no
        // SETATTR after it: one round trip less, and the open knows the data will go (a lower
        // file is copied up without it, as kernel overlayfs does: `Union::open_as`).
        let _ = config.add_capabilities(
            InitFlags::FUSE_PARALLEL_DIROPS
                | rdp
                | InitFlags::FUSE_CACHE_SYMLINKS
                | InitFlags::FUSE_ATOMIC_O_TRUNC,
        );
        // Set-id bits and file capabilities cleared by the daemon where the VFS leaves it to
        // the filesystem (writes, truncates, chowns: KillSuidgid; the upper filesystem drops
        // security.capability on our own writes and truncates). In return the kernel marks
        // the mount SB_NOSEC, as disk filesystems are: once it found a file with neither, it
        // stops asking for security.capability before each write(2) — a GETXATTR round trip
        // per call otherwise (100 MiB in 4 KiB writes: 25,600 of them, 0.85 s against 0.06 s).
        if config
            .add_capabilities(InitFlags::FUSE_HANDLE_KILLPRIV_V2)
            .is_err()
        {
            log::info!("FUSE_HANDLE_KILLPRIV_V2 not offered: every write asks security.capability");
        }
        // POSIX ACLs checked by the kernel as on kernel overlayfs (it asks us for
        // system.posix_acl_* and caches them), with the umask left to us: a default ACL
        // replaces it (Union::new_object_acls).
        let acl = InitFlags::FUSE_POSIX_ACL | InitFlags::FUSE_DONT_MASK;
        let acl_on = config.add_capabilities(acl).is_ok();
        self.u.set_posix_acl(acl_on);
        if !acl_on {
            log::info!(
                "POSIX ACLs: not offered by the kernel; permission checks use the mode only"
            );
        }
        if self.u.writeback_cache_on() {
            // The kernel keeps written pages and writes them to us later (and never offers
            // passthrough along with it). Off with a quota: see Union::writeback_cache.
            let on = config
                .add_capabilities(InitFlags::FUSE_WRITEBACK_CACHE)
                .is_ok();
            self.u.set_writeback_cache(on);
            if !on {
                log::info!("kernel write-back cache: not offered by the kernel");
            }
        }
        if let Some(r) = &self.ring {
            // Offered only where we can set io_uring up: from now on the kernel holds requests
            // until the ring is complete (started once INIT is answered, see ring::start).
            let offered = config
                .capabilities()
                .contains(InitFlags::FUSE_OVER_IO_URING);
            // The probe costs a thread (~0.3 ms before the mount reports ready): only when
            // the answer matters.
            let hand_over = offered && ring::can_hand_over();
            r.state.set_hand_over(hand_over);
            let why_not = if !offered {
                Some("not offered by the kernel (fuse module parameter enable_uring off?)")
            } else if r.mode == Uring::Auto && !hand_over {
                Some("no CAP_SYS_NICE to commit replies at idle policy (uring=on uses it anyway)")
            } else if !r.state.prepare() {
                Some("io_uring cannot be set up here")
            } else {
                None
            };
            match why_not {
                None => {
                    let _ = config.add_capabilities(InitFlags::FUSE_OVER_IO_URING);
                }
                Some(why) => r.state.fail_because(why.into()),
            }
        }
        if self.u.passthrough_wanted() && !self.u.writeback_cache_on() {
            // Depth 1: backing files must not be on a stacked filesystem themselves, and
            // kernel overlayfs can still be stacked on this mount (the kernel's limit is 2).
            let on = config.set_max_stack_depth(1).is_ok()
                && config.add_capabilities(InitFlags::FUSE_PASSTHROUGH).is_ok();
            self.u.set_passthrough(on);
            if !on {
                log::info!("passthrough: not offered by the kernel; all I/O through the daemon");
            }
        }
        Ok(())
    }

    fn destroy(&mut self) {
        self.u.shutdown();
    }

    fn lookup(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEntry) {
        guarded("lookup", || {
            self.entry(lookup_entry(&self.u, parent.0, name), reply)
        })
    }

    fn forget(&self, _req: &Request, ino: INodeNo, nlookup: u64) {
        guarded("forget", || self.u.forget(ino.0, nlookup))
    }

    fn getattr(&self, _req: &Request, ino: INodeNo, fh: Option<FileHandle>, reply: ReplyAttr) {
        guarded("getattr", || match self.u.getattr(ino.0, fh.map(|f| f.0)) {
            Ok(a) => reply.attr(&self.ttl, &fattr(&a)),
            Err(e) => reply.error(errno(e)),
        })
    }

    fn setattr(
        &self,
        req: &Request,
        ino: INodeNo,
        mode: Option<u32>,
        uid: Option<u32>,
        gid: Option<u32>,
        size: Option<u64>,
        atime: Option<TimeOrNow>,
        mtime: Option<TimeOrNow>,
        _ctime: Option<SystemTime>,
        fh: Option<FileHandle>,
        _crtime: Option<SystemTime>,
        _chgtime: Option<SystemTime>,
        _bkuptime: Option<SystemTime>,
        _flags: Option<fuser::BsdFileFlags>,
        reply: ReplyAttr,
    ) {
        guarded("setattr", || {
            let mut a = SetAttr {
                mode,
                uid,
                gid,
                size,
                atime: set_time(atime),
                mtime: set_time(mtime),
                fh: fh.map(|f| f.0),
                kill_suidgid: KillSuidgid::No,
            };
            // (fuser drops FATTR_KILL_SUIDGID: the caller's capabilities are looked up.)
            a.kill_suidgid = KillSuidgid::for_setattr(&a, caller(req), None);
            match self.u.setattr(ino.0, &a) {
                Ok(a) => reply.attr(&self.ttl, &fattr(&a)),
                Err(e) => reply.error(errno(e)),
            }
        })
    }

    fn readlink(&self, _req: &Request, ino: INodeNo, reply: ReplyData) {
        guarded("readlink", || {
            use std::os::unix::ffi::OsStrExt;
            match self.u.readlink(ino.0) {
                Ok(t) => reply.data(t.as_bytes()),
                Err(e) => reply.error(errno(e)),
            }
        })
    }

    fn mknod(
        &self,
        req: &Request,
        parent: INodeNo,
        name: &OsStr,
        mode: u32,
        umask: u32,
        rdev: u32,
        reply: ReplyEntry,
    ) {
        guarded("mknod", || {
            let kind = NewKind::Node {
                kind: mode & libc::S_IFMT,
                rdev: rdev as u64,
            };
            let r = self
                .u
                .create_node(parent.0, name, kind, mode, umask, caller(req));
            self.entry(r.map(|(a, _)| a), reply)
        })
    }

    fn mkdir(
        &self,
        req: &Request,
        parent: INodeNo,
        name: &OsStr,
        mode: u32,
        umask: u32,
        reply: ReplyEntry,
    ) {
        guarded("mkdir", || {
            let r = self
                .u
                .create_node(parent.0, name, NewKind::Dir, mode, umask, caller(req));
            self.entry(r.map(|(a, _)| a), reply)
        })
    }

    fn unlink(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEmpty) {
        guarded("unlink", || match self.u.unlink(parent.0, name) {
            Ok(()) => reply.ok(),
            Err(e) => reply.error(errno(e)),
        })
    }

    fn rmdir(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEmpty) {
        guarded("rmdir", || match self.u.rmdir(parent.0, name) {
            Ok(()) => reply.ok(),
            Err(e) => reply.error(errno(e)),
        })
    }

    fn symlink(
        &self,
        req: &Request,
        parent: INodeNo,
        link_name: &OsStr,
        target: &Path,
        reply: ReplyEntry,
    ) {
        guarded("symlink", || {
            let r = self.u.create_node(
                parent.0,
                link_name,
                NewKind::Symlink(target.as_os_str()),
                0o777,
                0,
                caller(req),
            );
            self.entry(r.map(|(a, _)| a), reply)
        })
    }

    fn rename(
        &self,
        _req: &Request,
        parent: INodeNo,
        name: &OsStr,
        newparent: INodeNo,
        newname: &OsStr,
        flags: RenameFlags,
        reply: ReplyEmpty,
    ) {
        guarded("rename", || {
            match self
                .u
                .rename(parent.0, name, newparent.0, newname, flags.bits())
            {
                Ok(()) => reply.ok(),
                Err(e) => reply.error(errno(e)),
            }
        })
    }

    fn link(
        &self,
        _req: &Request,
        ino: INodeNo,
        newparent: INodeNo,
        newname: &OsStr,
        reply: ReplyEntry,
    ) {
        guarded("link", || {
            self.entry(self.u.link(ino.0, newparent.0, newname), reply)
        })
    }

    fn open(&self, req: &Request, ino: INodeNo, flags: OpenFlags, reply: ReplyOpen) {
        guarded("open", || {
            let register = |fd: BorrowedFd<'_>| -> std::io::Result<Backing> {
                Ok(Arc::new(reply.open_backing(fd)?))
            };
            let register: Option<RegisterBacking<'_>> = self.may_register().then_some(&register);
            // (fuser drops FUSE_OPEN_KILL_SUIDGID: the caller's capabilities are looked up.)
            let r = self
                .u
                .open_as(ino.0, flags.0, register, Some((caller(req), None)));
            match r {
                Ok(o) => match backing_id(&o) {
                    Some(id) => reply.opened_passthrough(FileHandle(o.fh), FopenFlags::empty(), id),
                    None => reply.opened(FileHandle(o.fh), keep_cache(&o)),
                },
                Err(e) => reply.error(errno(e)),
            }
        })
    }

    fn read(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        size: u32,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        reply: ReplyData,
    ) {
        guarded("read", || match self.u.read(fh.0, offset, size) {
            Ok(d) => reply.data(&d),
            Err(e) => reply.error(errno(e)),
        })
    }

    fn write(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        data: &[u8],
        _write_flags: WriteFlags,
        flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        reply: ReplyWrite,
    ) {
        guarded("write", || {
            match self.u.write_flags(fh.0, offset, data, flags.0) {
                Ok(n) => reply.written(n as u32),
                Err(e) => reply.error(errno(e)),
            }
        })
    }

    fn flush(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _fh: FileHandle,
        _lock_owner: LockOwner,
        reply: ReplyEmpty,
    ) {
        guarded("flush", || {
            // Nothing to do at close (no locks of our own; cached data is written back by the
            // flusher, fsync, sync and unmount, as a disk filesystem does): ENOSYS tells the
            // kernel to stop sending FLUSH at all, saving a round trip per close.
            reply.error(Errno::ENOSYS)
        })
    }

    fn release(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        _flush: bool,
        reply: ReplyEmpty,
    ) {
        guarded("release", || {
            self.u.release(fh.0);
            reply.ok()
        })
    }

    fn fsync(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        datasync: bool,
        reply: ReplyEmpty,
    ) {
        guarded("fsync", || match self.u.fsync(fh.0, datasync) {
            Ok(()) => reply.ok(),
            Err(e) => reply.error(errno(e)),
        })
    }

    fn opendir(&self, _req: &Request, _ino: INodeNo, _flags: OpenFlags, reply: ReplyOpen) {
        guarded("opendir", || {
            // ENOSYS: the kernel stops sending OPENDIR and RELEASEDIR (two round trips per
            // directory read) and opens directories itself with FOPEN_KEEP_CACHE |
            // FOPEN_CACHE_DIR (what we used to answer): it may cache listings, since every change
            // to a directory goes through us and the kernel drops a directory's cached listing
            // when it changes it. readdir then works from (directory, offset) alone.
            reply.error(Errno::ENOSYS)
        })
    }

    fn readdir(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        mut reply: ReplyDirectory,
    ) {
        guarded("readdir", || {
            match readdir_batch(&self.u, ino.0, offset, |ino, next, kind, name| {
                !reply.add(INodeNo(ino), next, kind_of(kind), name)
            }) {
                Ok(()) => reply.ok(),
                Err(e) => reply.error(errno(e)),
            }
        })
    }

    fn readdirplus(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        mut reply: ReplyDirectoryPlus,
    ) {
        guarded("readdirplus", || {
            let ttl = self.ttl;
            let r = readdirplus_batch(&self.u, ino.0, offset, |attr, next, name| {
                !reply.add(
                    INodeNo(attr.ino),
                    next,
                    name,
                    &ttl,
                    &fattr(attr),
                    Generation(attr.generation),
                )
            });
            match r {
                Ok(()) => reply.ok(),
                Err(e) => reply.error(errno(e)),
            }
        })
    }

    fn releasedir(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _fh: FileHandle,
        _flags: OpenFlags,
        reply: ReplyEmpty,
    ) {
        guarded("releasedir", || {
            // Not sent once opendir answered ENOSYS.
            reply.ok()
        })
    }

    /// No ioctls of our own. The kernel forwards every ioctl on a FUSE file (a shell's `read`
    /// asks TCGETS of each file it reads) and, unlike FLUSH, does not remember a refusal: answer
    /// ENOTTY ("not a terminal / no such ioctl", what a disk filesystem says) at once, instead of
    /// fuser's default, which logs a warning for every call.
    #[allow(clippy::too_many_arguments)]
    fn ioctl(
        &self,
        _req: &Request,
        ino: INodeNo,
        fh: FileHandle,
        _flags: IoctlFlags,
        cmd: u32,
        in_data: &[u8],
        out_size: u32,
        reply: ReplyIoctl,
    ) {
        guarded("ioctl", || {
            // File attribute flags (lsattr / chattr); anything else is not ours to answer.
            match self.u.fileattr(ino.0, fh.0, cmd, in_data) {
                Ok(out) if out.len() <= out_size as usize => reply.ioctl(0, &out),
                Ok(_) => reply.error(Errno::EINVAL),
                Err(e) => reply.error(errno(e)),
            }
        })
    }

    fn fsyncdir(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        _datasync: bool,
        reply: ReplyEmpty,
    ) {
        guarded("fsyncdir", || match self.u.fsyncdir(ino.0) {
            Ok(()) => reply.ok(),
            Err(e) => reply.error(errno(e)),
        })
    }

    fn statfs(&self, _req: &Request, _ino: INodeNo, reply: ReplyStatfs) {
        guarded("statfs", || match self.u.statfs() {
            Ok(s) => reply.statfs(
                s.f_blocks,
                s.f_bfree,
                s.f_bavail,
                s.f_files,
                s.f_ffree,
                s.f_bsize as u32,
                s.f_namelen as u32,
                s.f_frsize as u32,
            ),
            Err(e) => reply.error(errno(e)),
        })
    }

    fn setxattr(
        &self,
        req: &Request,
        ino: INodeNo,
        name: &OsStr,
        value: &[u8],
        flags: i32,
        _position: u32,
        reply: ReplyEmpty,
    ) {
        guarded("setxattr", || {
            match self.u.setxattr(ino.0, name, value, flags, caller(req)) {
                Ok(()) => reply.ok(),
                Err(e) => reply.error(errno(e)),
            }
        })
    }

    fn getxattr(&self, _req: &Request, ino: INodeNo, name: &OsStr, size: u32, reply: ReplyXattr) {
        guarded("getxattr", || match self.u.getxattr(ino.0, name) {
            Ok(v) => xattr_reply(&v, size, reply),
            Err(e) => reply.error(errno(e)),
        })
    }

    fn listxattr(&self, req: &Request, ino: INodeNo, size: u32, reply: ReplyXattr) {
        guarded("listxattr", || match self.u.listxattr(ino.0, req.uid()) {
            Ok(names) => xattr_reply(&xattr_list(&names), size, reply),
            Err(e) => reply.error(errno(e)),
        })
    }

    fn removexattr(&self, _req: &Request, ino: INodeNo, name: &OsStr, reply: ReplyEmpty) {
        guarded("removexattr", || match self.u.removexattr(ino.0, name) {
            Ok(()) => reply.ok(),
            Err(e) => reply.error(errno(e)),
        })
    }

    fn access(&self, _req: &Request, _ino: INodeNo, _mask: AccessFlags, reply: ReplyEmpty) {
        guarded("access", || {
            // default_permissions: the kernel has already checked.
            reply.ok()
        })
    }

    fn create(
        &self,
        req: &Request,
        parent: INodeNo,
        name: &OsStr,
        mode: u32,
        umask: u32,
        flags: i32,
        reply: ReplyCreate,
    ) {
        guarded("create", || {
            let register = |fd: BorrowedFd<'_>| -> std::io::Result<Backing> {
                Ok(Arc::new(reply.open_backing(fd)?))
            };
            let register: Option<RegisterBacking<'_>> = self.may_register().then_some(&register);
            let r = create_open(
                &self.u,
                parent.0,
                name,
                mode,
                umask,
                flags,
                caller(req),
                register,
            );
            match r {
                Ok((a, o)) => {
                    let (ttl, attr, fh) = (&self.ttl, &fattr(&a), FileHandle(o.fh));
                    match backing_id(&o) {
                        Some(id) => reply.created_passthrough(
                            ttl,
                            attr,
                            Generation(a.generation),
                            fh,
                            FopenFlags::empty(),
                            id,
                        ),
                        None => {
                            reply.created(ttl, attr, Generation(a.generation), fh, keep_cache(&o))
                        }
                    }
                }
                Err(e) => reply.error(errno(e)),
            }
        })
    }

    fn copy_file_range(
        &self,
        _req: &Request,
        _ino_in: INodeNo,
        fh_in: FileHandle,
        offset_in: u64,
        _ino_out: INodeNo,
        fh_out: FileHandle,
        offset_out: u64,
        len: u64,
        flags: fuser::CopyFileRangeFlags,
        reply: ReplyWrite,
    ) {
        guarded("copy_file_range", || {
            match self.u.copy_file_range(
                (fh_in.0, offset_in),
                (fh_out.0, offset_out),
                len,
                flags.bits(),
            ) {
                Ok(n) => reply.written(n as u32),
                Err(e) => reply.error(errno(e)),
            }
        })
    }

    fn poll(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _fh: FileHandle,
        _ph: fuser::PollNotifier,
        _events: fuser::PollEvents,
        _flags: fuser::PollFlags,
        reply: fuser::ReplyPoll,
    ) {
        guarded("poll", || {
            // ENOSYS: regular files are always ready, which the kernel then answers itself.
            reply.error(Errno::ENOSYS)
        })
    }

    fn fallocate(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        length: u64,
        mode: i32,
        reply: ReplyEmpty,
    ) {
        guarded("fallocate", || {
            match self.u.fallocate(fh.0, offset, length, mode) {
                Ok(()) => reply.ok(),
                Err(e) => reply.error(errno(e)),
            }
        })
    }

    fn lseek(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        offset: i64,
        whence: i32,
        reply: ReplyLseek,
    ) {
        guarded("lseek", || match self.u.lseek(fh.0, offset, whence) {
            Ok(o) => reply.offset(o),
            Err(e) => reply.error(errno(e)),
        })
    }
}

fn xattr_reply(v: &[u8], size: u32, reply: ReplyXattr) {
    if size == 0 {
        reply.size(v.len() as u32)
    } else if v.len() > size as usize {
        reply.error(Errno::ERANGE)
    } else {
        reply.data(v)
    }
}

/// The entries of one READDIR batch from `offset`, handed to `add(ino, next offset, mode,
/// name)` until it answers false (reply full).
pub(crate) fn readdir_batch(
    u: &Union,
    ino: u64,
    offset: u64,
    mut add: impl FnMut(u64, u64, u32, &OsStr) -> bool,
) -> crate::union::Result<()> {
    let (entries, start, generation) = u.readdir(ino, offset)?;
    for (i, e) in entries.iter().enumerate().skip(start) {
        if !add(e.ino, dir_offset(generation, i + 1), e.kind, &e.name) {
            break;
        }
    }
    Ok(())
}

/// The entries of one READDIRPLUS batch from `offset` with their attributes, handed to
/// `add(attr, next offset, name)` until it answers false (reply full). Each entry handed over
/// but "." and ".." is a lookup (one kernel reference); the one that did not fit is forgotten.
pub(crate) fn readdirplus_batch(
    u: &Union,
    ino: u64,
    offset: u64,
    mut add: impl FnMut(&Attr, u64, &OsStr) -> bool,
) -> crate::union::Result<()> {
    let (entries, start, generation, made_now) = u.readdir_made(ino, offset)?;
    let mut added = false;
    for (i, e) in entries.iter().enumerate().skip(start) {
        let dot = e.name == "." || e.name == "..";
        // "." and ".." are ignored by the kernel and take no reference.
        let attr = if dot {
            Attr {
                ino: e.ino,
                mode: e.kind,
                nlink: 1,
                blksize: 4096,
                ..Attr::EMPTY
            }
        } else {
            // A listing made in this request names each entry's topmost layer: the lookup
            // skips the lower layers above it (the kernel holds the directory's lock
            // meanwhile; a kept listing may be older than a change of the name).
            match u.lookup_from(ino, &e.name, e.layer.filter(|_| made_now)) {
                Ok(a) => a,
                Err(err) if err.errno == nix::errno::Errno::ENOENT => continue, // gone since listed
                // Never drop an entry silently (the kernel may cache this listing): end the
                // batch before it, so the kernel asks again from here, or report the error.
                Err(err) if !added => return Err(err),
                Err(_) => break,
            }
        };
        if !add(&attr, dir_offset(generation, i + 1), &e.name) {
            if !dot {
                u.forget(attr.ino, 1);
            }
            break;
        }
        added = true;
    }
    Ok(())
}

/// CREATE: the new file and its open handle.
#[allow(clippy::too_many_arguments)]
pub(crate) fn create_open(
    u: &Union,
    parent: u64,
    name: &OsStr,
    mode: u32,
    umask: u32,
    flags: i32,
    who: Caller,
    register: Option<RegisterBacking<'_>>,
) -> crate::union::Result<(Attr, Opened)> {
    let (a, fd) = u.create_node(parent, name, NewKind::File { flags }, mode, umask, who)?;
    let fd = fd.ok_or_else(|| Error::new(nix::errno::Errno::EIO, "create: no file"))?;
    let o = u.open_created(a.ino, fd, flags, register)?;
    Ok((a, o))
}

/// LISTXATTR's answer: the names, each NUL-terminated.
pub(crate) fn xattr_list(names: &[std::ffi::OsString]) -> Vec<u8> {
    use std::os::unix::ffi::OsStrExt;
    let mut buf = Vec::new();
    for n in names {
        buf.extend_from_slice(n.as_bytes());
        buf.push(0);
    }
    buf
}
