//! Open files and attribute changes (kernel fs/overlayfs/file.c, inode.c): opening for write
//! or truncating copies up first; a read-only open reads the layer that holds the file.

use std::ffi::OsString;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};
use std::sync::Arc;
use std::sync::atomic::Ordering;

use nix::errno::Errno;
use nix::fcntl::{AtFlags, OFlag};
use nix::sys::stat::{Mode, UtimensatFlags};
use nix::sys::time::TimeSpec;
use nix::unistd::{Gid, Uid};

use super::inode::{Backing, KernelIo, Node};
use super::{Attr, Ctx, Error, LayerRef, Result, Union};
use crate::cache::RaState;
use crate::layer;

/// An open file handle.
#[derive(Debug)]
pub struct OpenFile {
    /// Node id.
    pub ino: u64,
    /// The backing file in its layer.
    pub fd: Arc<OwnedFd>,
    /// Opened for writing (so it is in upper).
    pub writable: bool,
    /// The backing file is the upper layer's (safe to change through).
    pub in_upper: bool,
    /// Readahead state of this open file.
    pub ra: parking_lot::Mutex<RaState>,
    /// O_SYNC (Some(true)) or O_DSYNC (Some(false)): writes reach the disk before they return.
    pub sync: Option<bool>,
    /// O_DIRECT: writes go through the page cache to the file before they return.
    pub direct: bool,
    /// The page cache is bypassed for this handle (its backing fd could not be opened for
    /// reading and writing).
    pub nocache: bool,
    /// Opened on a copy whose commit failed: the copy is gone (unlinked) and the file is the
    /// lower one again. Reads and writes through it fail with EIO, as on a disk that failed:
    /// whatever they did would reach the kernel's pages of the file, which are the lower
    /// file's now, or be lost.
    pub lost: std::sync::atomic::AtomicBool,
    /// The upper file, for reads through a handle opened on a lower file before a copy-up.
    upper_fd: std::sync::OnceLock<Arc<OwnedFd>>,
    /// Opened in passthrough mode: the kernel reads and writes the backing file itself.
    pub passthrough: bool,
    /// The last write-back error of the file that this handle's fsync has reported (or that
    /// was reported before it was opened): `PageCache::fsync_file`.
    pub wb_err_seen: std::sync::atomic::AtomicU64,
}

impl OpenFile {
    /// Its backing fd keeps the caller's O_DIRECT (a handle that bypasses the page cache:
    /// [`backing_flags`]): reads and writes through it need aligned buffers.
    fn direct_fd(&self) -> bool {
        self.direct && self.nocache
    }

    /// EIO once the copy this handle was opened on could not be committed (see `lost`).
    fn check_lost(&self) -> Result<()> {
        if self.lost.load(Ordering::Acquire) {
            return Err(Error::new(
                Errno::EIO,
                "the copy-up this file was opened on could not be committed",
            ));
        }
        Ok(())
    }
}

/// Registers a backing file with the kernel for FUSE passthrough (the adapter's
/// `FUSE_DEV_IOC_BACKING_OPEN`).
pub type RegisterBacking<'a> = &'a dyn Fn(BorrowedFd<'_>) -> std::io::Result<Backing>;

/// What an open returns.
#[derive(Debug)]
pub struct Opened {
    /// Handle id.
    pub fh: u64,
    /// Passthrough mode: the backing file registration to answer with.
    pub direct: Option<Backing>,
    /// The kernel's cached pages of the file are still valid (FOPEN_KEEP_CACHE).
    pub keep_cache: bool,
}

/// Open regular file `name` in `dir` with `flags` (never through a symlink), without
/// O_NOATIME where that is not allowed (EPERM: not the file's owner).
fn open_file_at(
    dir: std::os::fd::BorrowedFd<'_>,
    name: &std::ffi::OsStr,
    flags: OFlag,
) -> std::result::Result<OwnedFd, Errno> {
    let how = flags | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC | OFlag::O_NOCTTY;
    nix::fcntl::openat(dir, name, how, Mode::empty()).or_else(|e| match e {
        Errno::EPERM if how.contains(OFlag::O_NOATIME) => {
            nix::fcntl::openat(dir, name, how - OFlag::O_NOATIME, Mode::empty())
        }
        e => Err(e),
    })
}

/// An open of an upper object by the name it had failed the way it fails when the name no
/// longer leads to it: gone (ENOENT), a whiteout or another device or socket in its place
/// (ENXIO, ENODEV), a symlink (ELOOP with O_NOFOLLOW), a directory (EISDIR).
fn name_changed_hands(e: Errno) -> bool {
    matches!(
        e,
        Errno::ENOENT | Errno::ENXIO | Errno::ENODEV | Errno::ELOOP | Errno::EISDIR
    )
}

/// Flags to open a backing file with. With the page cache, O_APPEND (the kernel passes the
/// offset of an append), O_DIRECT (page buffers are not aligned), O_SYNC/O_DSYNC (done by
/// [`Union::write_flags`]) and O_TRUNC (done through the cache) stay off, and a writable
/// file is opened read-write so partial pages can be read in.
pub(crate) fn backing_flags(f: OFlag, writable: bool, cached: bool) -> OFlag {
    let keep = f
        & (OFlag::O_ACCMODE
            | OFlag::O_APPEND
            | OFlag::O_SYNC
            | OFlag::O_DSYNC
            | OFlag::O_DIRECT
            | OFlag::O_NONBLOCK
            | OFlag::O_NOATIME
            | OFlag::O_TRUNC);
    if !cached {
        return keep;
    }
    let mut k = keep
        - (OFlag::O_APPEND | OFlag::O_DIRECT | OFlag::O_SYNC | OFlag::O_DSYNC | OFlag::O_TRUNC);
    if writable {
        k = (k - OFlag::O_ACCMODE) | OFlag::O_RDWR;
    }
    k
}

fn sync_of(flags: i32) -> Option<bool> {
    if flags & libc::O_SYNC == libc::O_SYNC {
        Some(true)
    } else if flags & libc::O_DSYNC != 0 {
        Some(false)
    } else {
        None
    }
}

/// pwrite all of `data` at `off` (a short count only after a later chunk fails).
pub(crate) fn pwrite_all(fd: std::os::fd::BorrowedFd<'_>, data: &[u8], off: u64) -> Result<usize> {
    let mut done = 0;
    while done < data.len() {
        match nix::sys::uio::pwrite(fd, &data[done..], off as i64 + done as i64) {
            // (Never for a regular file; not an endless loop if it did.)
            Ok(0) if done == 0 => return Err(Error::new(Errno::EIO, "write: nothing written")),
            Ok(0) => break,
            Ok(n) => done += n,
            Err(Errno::EINTR) => {}
            Err(e) if done == 0 => return Err(Error::new(e, "write")),
            Err(_) => break,
        }
    }
    Ok(done)
}

/// The alignment O_DIRECT asks of buffers (the page size; enough for every block size).
const DIO_ALIGN: usize = 4096;

/// A copy of some bytes at an address aligned for O_DIRECT: a backing file opened with it
/// (a handle that bypasses the page cache keeps the caller's O_DIRECT) refuses other buffers
/// with EINVAL, and FUSE hands us requests in buffers of its own.
struct AlignedBuf {
    v: Vec<u8>,
    at: usize,
    len: usize,
}

impl AlignedBuf {
    fn zeroed(len: usize) -> AlignedBuf {
        let v = vec![0u8; len + DIO_ALIGN];
        let at = v.as_ptr().align_offset(DIO_ALIGN).min(DIO_ALIGN);
        AlignedBuf { v, at, len }
    }

    fn copy_of(data: &[u8]) -> AlignedBuf {
        let mut b = AlignedBuf::zeroed(data.len());
        b.bytes_mut().copy_from_slice(data);
        b
    }

    fn bytes(&self) -> &[u8] {
        &self.v[self.at..self.at + self.len]
    }

    fn bytes_mut(&mut self) -> &mut [u8] {
        &mut self.v[self.at..self.at + self.len]
    }

    /// The first `n` bytes, as a Vec of their own (moved to its start).
    fn into_vec(mut self, n: usize) -> Vec<u8> {
        self.v.truncate(self.at + n.min(self.len));
        self.v.drain(..self.at);
        self.v
    }
}

/// read(2) through a backing fd opened with O_DIRECT: into an aligned buffer, and a short
/// read is the end of the file (a second read would start at an unaligned offset).
fn direct_read(fd: std::os::fd::BorrowedFd<'_>, size: usize, off: u64) -> Result<Vec<u8>> {
    let mut b = AlignedBuf::zeroed(size);
    let n = loop {
        match nix::sys::uio::pread(fd, b.bytes_mut(), off as i64) {
            Err(Errno::EINTR) => continue,
            r => break r.ctx("read")?,
        }
    };
    Ok(b.into_vec(n))
}

/// A time to set.
#[derive(Debug, Clone, Copy)]
pub enum SetTime {
    /// The current time.
    Now,
    /// A given time (sec, nsec).
    At(i64, i64),
}

/// Whether a setattr clears the file's set-user-ID and set-group-ID bits.
///
/// With FUSE_HANDLE_KILLPRIV_V2 (offered at INIT so that the kernel stops asking for
/// `security.capability` before every write: see `fuse::UnionFs::init`) the kernel leaves that
/// to the daemon where kernel overlayfs's VFS would clear them, and drops the mode it worked
/// out: a truncate by a caller without CAP_FSETID (it says FATTR_KILL_SUIDGID; fuser does not
/// pass that on), a chown, a write by a caller without CAP_FSETID (a setattr that changes
/// nothing, sent before the write goes ahead — also before the writes the kernel makes itself
/// through passthrough, which we never see), and `chown(f, -1, -1)` (the same empty setattr,
/// or one of ctime only with the kernel's write-back cache, from a caller who must own the
/// file when there is a bit to clear). The rules are the VFS's: a write or truncate
/// (`setattr_should_drop_suidgid`) clears the set-user-ID bit, and the set-group-ID bit if the
/// group may execute the file or the caller is neither in its group nor holds CAP_FSETID; a
/// chown clears the same whatever the caller's CAP_FSETID. Decided on the attributes before
/// the change, as the kernel decides, and made with it (the mode is set before a truncate).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum KillSuidgid {
    /// The bits stay.
    #[default]
    No,
    /// A truncate by `caller`; `lacks_fsetid`: what the kernel said, or None: looked up (only
    /// when there is a bit to clear).
    Truncate {
        caller: super::Caller,
        lacks_fsetid: Option<bool>,
    },
    /// A change of owner or group by `caller`.
    Chown(super::Caller),
    /// A setattr that changes nothing, from `caller`: a write's, or a `chown(f, -1, -1)`.
    Nothing(super::Caller),
}

impl KillSuidgid {
    /// What setattr `a` from `caller` leaves to us: a truncate, a chown, or a change of
    /// nothing (ctime alone counts as nothing: chown(f, -1, -1) with the kernel's write-back
    /// cache). `truncate_kills`: the kernel's FATTR_KILL_SUIDGID (it decides on the caller's
    /// CAP_FSETID), or None where the transport drops it (fuser: looked up instead).
    pub fn for_setattr(
        a: &SetAttr,
        caller: super::Caller,
        truncate_kills: Option<bool>,
    ) -> KillSuidgid {
        if a.size.is_some() {
            match truncate_kills {
                Some(false) => KillSuidgid::No,
                lacks_fsetid => KillSuidgid::Truncate {
                    caller,
                    lacks_fsetid,
                },
            }
        } else if a.uid.is_some() || a.gid.is_some() {
            KillSuidgid::Chown(caller)
        } else if a.mode.is_none() && a.atime.is_none() && a.mtime.is_none() {
            KillSuidgid::Nothing(caller)
        } else {
            KillSuidgid::No
        }
    }
}

/// The set-id bits of a file (`attr`) the VFS clears for `caller` on a chown, and on a write
/// or truncate by a caller without CAP_FSETID.
fn set_id_bits(attr: &Attr, caller: super::Caller) -> u32 {
    if attr.mode & libc::S_IFMT == libc::S_IFDIR {
        return 0;
    }
    let sgid = attr.mode & libc::S_ISGID != 0
        && (attr.mode & libc::S_IXGRP != 0
            || !super::acl::in_group_or_capable(caller, attr.uid, attr.gid));
    (attr.mode & libc::S_ISUID) | if sgid { libc::S_ISGID } else { 0 }
}

/// [`set_id_bits`] of a regular file if `caller` lacks CAP_FSETID (`lacks`: known, or looked
/// up when it matters).
fn set_id_bits_without_fsetid(attr: &Attr, caller: super::Caller, lacks: Option<bool>) -> u32 {
    if attr.mode & libc::S_IFMT != libc::S_IFREG {
        return 0;
    }
    match set_id_bits(attr, caller) {
        0 => 0,
        bits if lacks.unwrap_or_else(|| super::acl::lacks_fsetid(caller)) => bits,
        _ => 0,
    }
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
    /// Whether set-user-ID and set-group-ID bits go with the change ([`KillSuidgid`]).
    pub kill_suidgid: KillSuidgid,
}

fn ts(t: Option<SetTime>) -> TimeSpec {
    match t {
        None => TimeSpec::new(0, libc::UTIME_OMIT),
        Some(SetTime::Now) => TimeSpec::new(0, libc::UTIME_NOW),
        Some(SetTime::At(s, ns)) => TimeSpec::new(s, ns),
    }
}

fn is_writable(f: OFlag) -> bool {
    let acc = f & OFlag::O_ACCMODE;
    acc == OFlag::O_WRONLY || acc == OFlag::O_RDWR || f.contains(OFlag::O_TRUNC)
}

/// Writes ending past 1 TiB bypass the page cache (see [`Union::write_flags`]): ext4's largest
/// file is 16 TiB (4 KiB blocks) and FUSE lets writes reach 8 EiB.
const CACHED_WRITE_END_MAX: u64 = 1 << 40;

/// The most one COPY_FILE_RANGE answers for: its reply counts in 32 bits (the kernel asks
/// for at most `MAX_RW_COUNT`, 2 GiB less a page, anyway).
const COPY_RANGE_MAX: u64 = (u32::MAX as u64) & !4095;

/// How long a change of a lower file waits for the opens that read it in passthrough mode
/// (`passthrough=lower`) to close before it fails with ETXTBSY ([`Union::kio_for_change`]).
/// Short: it covers a reader's RELEASE still on its way (it follows close(2)), not a reader
/// that stays; the waiting request holds a serving thread meanwhile.
const LOWER_BUSY_WAIT: std::time::Duration = std::time::Duration::from_millis(100);

impl Union {
    /// Offer FUSE passthrough at INIT? (Asked for, and the daemon may register backing files:
    /// root in the initial user namespace.)
    pub fn passthrough_wanted(&self) -> bool {
        self.passthrough_wanted
    }

    /// The kernel's answer at INIT.
    pub fn set_passthrough(&self, on: bool) {
        self.passthrough.store(on, Ordering::Release);
    }

    /// Passthrough is in use on this mount.
    pub fn passthrough_active(&self) -> bool {
        self.passthrough.load(Ordering::Acquire)
    }

    /// Ask for the kernel's write-back cache at INIT?
    pub fn writeback_cache_on(&self) -> bool {
        self.writeback_cache.load(Ordering::Acquire)
    }

    /// The kernel's answer at INIT.
    pub fn set_writeback_cache(&self, on: bool) {
        self.writeback_cache.store(on, Ordering::Release);
    }

    /// Flags of a daemon-mode backing file: [`backing_flags`], and with the kernel's write-back
    /// cache no O_APPEND (the kernel places appends itself) and read access to writable files
    /// (it reads partly written pages in through whichever handle it holds).
    pub(crate) fn daemon_flags(&self, f: OFlag, writable: bool) -> OFlag {
        let mut k = backing_flags(f, writable, self.cache.is_some());
        if self.writeback_cache_on() {
            k -= OFlag::O_APPEND;
            if writable {
                k = (k - OFlag::O_ACCMODE) | OFlag::O_RDWR;
            }
        }
        k
    }

    /// (passthrough in use, opens answered in passthrough mode, registrations that failed).
    pub fn passthrough_stats(&self) -> (bool, u64, u64) {
        (
            self.passthrough_active(),
            self.direct_opens.load(Ordering::Relaxed),
            self.direct_fallbacks.load(Ordering::Relaxed),
        )
    }

    /// (`passthrough=lower`: opens of lower files answered in passthrough mode, changes that
    /// waited for such opens to close, changes refused with ETXTBSY).
    pub fn lower_passthrough_stats(&self) -> (u64, u64, u64) {
        (
            self.lower_direct_opens.load(Ordering::Relaxed),
            self.lower_busy_waits.load(Ordering::Relaxed),
            self.lower_busy_refusals.load(Ordering::Relaxed),
        )
    }

    /// open(2) of an existing file; `flags` as the kernel passes them. Returns a handle id.
    pub fn open(&self, ino: u64, flags: i32) -> Result<u64> {
        Ok(self.open_with(ino, flags, None)?.fh)
    }

    /// open(2) of an existing file, in passthrough mode where that is safe (`register` given,
    /// see [`Union::try_direct`]), else through the daemon.
    pub fn open_with(
        &self,
        ino: u64,
        flags: i32,
        register: Option<RegisterBacking<'_>>,
    ) -> Result<Opened> {
        self.open_as(ino, flags, register, None)
    }

    /// [`Union::open_with`] for `who`. With O_TRUNC (the kernel's atomic O_TRUNC: no SETATTR
    /// follows) the file is emptied by this call, as by a truncate(2) of `who` right after the
    /// open (set-id bits cleared as `kill` says, the kernel's FUSE_OPEN_KILL_SUIDGID, or as
    /// looked up where the transport drops it); a lower file's data is not copied up for it,
    /// only its metadata, as kernel overlayfs copies up for O_TRUNC: `> big-lower-file` needs
    /// no room for the old data and no time to copy it.
    pub fn open_as(
        &self,
        ino: u64,
        flags: i32,
        register: Option<RegisterBacking<'_>>,
        who: Option<(super::Caller, Option<bool>)>,
    ) -> Result<Opened> {
        if flags & libc::O_TRUNC == 0 {
            return self.open_inner(ino, flags, register, false);
        }
        let o = self.open_inner(ino, flags & !libc::O_TRUNC, register, true)?;
        let mut a = SetAttr {
            size: Some(0),
            ..SetAttr::default()
        };
        if let Some((caller, kill)) = who {
            a.kill_suidgid = KillSuidgid::for_setattr(&a, caller, kill);
        }
        if let Err(e) = self.setattr(ino, &a) {
            self.release(o.fh);
            return Err(e);
        }
        Ok(o)
    }

    /// open(2) without O_TRUNC; `trunc`: the caller truncates the file right after (no data
    /// is copied up for it, the kernel's pages of it need not be kept).
    fn open_inner(
        &self,
        ino: u64,
        flags: i32,
        register: Option<RegisterBacking<'_>>,
        trunc: bool,
    ) -> Result<Opened> {
        let node = self.node(ino)?;
        if node.is_dir() {
            return Err(Error::new(Errno::EISDIR, "open of a directory"));
        }
        let f = OFlag::from_bits_truncate(flags);
        let writable = is_writable(f);
        // The kernel-I/O state first: a copy staged here (commit deferred) is opened under
        // its scratch name by this thread only, and another open of the file, which would
        // wait for the commit, must not hold this lock meanwhile.
        let mut k = if writable {
            self.kio_for_change(&node)?
        } else {
            node.kio.lock()
        };
        let was_lower = writable && {
            let st = node.st.lock();
            // (A metacopy file's data was read from the lower file, as a lower file's.)
            !st.upper || st.data.is_some()
        };
        let _staged = if !writable {
            None
        } else if f.intersects(OFlag::O_SYNC | OFlag::O_DSYNC) {
            // Synchronous writes are durable when they return, name included: no deferral.
            self.copy_up(&node)?;
            None
        } else if trunc {
            self.copy_up_for_truncate(&node)?
        } else {
            self.copy_up_for_use(&node)?
        };
        // An open for writing that copied the file up, when the kernel may hold pages of it
        // (it was read through us): a passthrough open would make the kernel drop them all
        // (~50 ms per 256 MiB here) to append a byte. Served by the daemon, they stay valid
        // (our writes go through them) and the next open after this one closes is
        // passthrough again. O_TRUNC drops them anyway.
        let keep_pages = was_lower && k.kernel_pages && !trunc;
        if !keep_pages && let Some(o) = self.try_direct(&node, &mut k, flags, register)? {
            return Ok(o);
        }
        let keep_cache = self.enter_daemon_mode(&node, &mut k);
        let fh = self.open_daemon(&node, f, flags, writable)?;
        k.daemon += 1;
        k.kernel_pages = true;
        Ok(Opened {
            fh,
            direct: None,
            keep_cache,
        })
    }

    /// The handle of a file just created with `fd` (create_node), in passthrough mode where
    /// that is safe.
    pub fn open_created(
        &self,
        ino: u64,
        fd: OwnedFd,
        flags: i32,
        register: Option<RegisterBacking<'_>>,
    ) -> Result<Opened> {
        let node = self.node(ino)?;
        let mut k = node.kio.lock();
        // (Not the create's own fd as the backing file: passthrough writes through a backing
        // file registered from it ran at half the speed, 2.4 against 4.9 GB/s for a 512 MiB
        // `dd` here; the new file is opened again and that is registered.)
        if let Some(o) = self.try_direct(&node, &mut k, flags, register)? {
            return Ok(o);
        }
        let keep_cache = self.enter_daemon_mode(&node, &mut k);
        let writable = flags & libc::O_ACCMODE != libc::O_RDONLY;
        let fh = self.add_handle_with(ino, fd, (writable, true), flags, false);
        k.daemon += 1;
        k.kernel_pages = true;
        Ok(Opened {
            fh,
            direct: None,
            keep_cache,
        })
    }

    /// A daemon-mode open of a node that may have been in passthrough mode: if it was written
    /// that way, the kernel's pages of the FUSE inode and ours are stale. Returns whether the
    /// kernel may keep its pages.
    fn enter_daemon_mode(&self, node: &Node, k: &mut KernelIo) -> bool {
        if !std::mem::take(&mut k.changed_directly) {
            return true;
        }
        if let Some(c) = &self.cache {
            // Nothing of it can be dirty: no daemon handle was open since.
            c.drop_file(node.ino);
        }
        false
    }

    /// The node's kernel-I/O state, locked, for an open or truncate that may change the file.
    /// While the kernel reads its lower file in passthrough mode (`passthrough=lower`), the
    /// file cannot change: those opens would go on reading the lower file (the kernel binds
    /// every open of an inode to one backing file, and neither hands the upper file to the
    /// ones there nor lets another open of the inode go through the daemon). So the change
    /// waits for them to close — a reader's RELEASE comes after its close(2) has returned —
    /// for up to [`LOWER_BUSY_WAIT`], then fails with ETXTBSY, as writing a running program
    /// does. (Not longer: the wait holds a serving thread, and with every thread of a queue
    /// waiting, the RELEASE that would end it could not be served; readers that keep
    /// opening the file would keep a writer waiting anyway.)
    fn kio_for_change<'a>(
        &self,
        node: &'a Node,
    ) -> Result<parking_lot::MutexGuard<'a, super::inode::KernelIo>> {
        let mut waited: Option<std::time::Instant> = None;
        loop {
            let k = node.kio.lock();
            if k.direct == 0 || !k.backing_lower {
                return Ok(k);
            }
            drop(k);
            let since = *waited.get_or_insert_with(|| {
                self.lower_busy_waits.fetch_add(1, Ordering::Relaxed);
                std::time::Instant::now()
            });
            if since.elapsed() >= LOWER_BUSY_WAIT {
                if self.lower_busy_refusals.fetch_add(1, Ordering::Relaxed) == 0 {
                    log::warn!(
                        "passthrough=lower: a change of a lower file open for reading (node {}) \
                         waited {} ms for those opens to close; refused with ETXTBSY",
                        node.ino,
                        LOWER_BUSY_WAIT.as_millis()
                    );
                }
                return Err(Error::new(
                    Errno::ETXTBSY,
                    "lower file open for reading in passthrough mode (passthrough=lower)",
                ));
            }
            std::thread::sleep(std::time::Duration::from_millis(1));
        }
    }

    /// Open in passthrough mode if that is safe; `Ok(None)`: open through the daemon.
    ///
    /// Safe means no write through this open can need the daemon: a file in upper when no
    /// quota is kept (the kernel's writes need no accounting), or any file of a read-only
    /// union. A lower file of a writable union never is: a later open for writing copies it
    /// up, and the kernel could neither give that open the upper file (all passthrough opens
    /// of an inode share one backing file) nor let it go through the daemon while the lower
    /// one is open in passthrough mode. Once a node has passthrough opens, every open of it
    /// is one (the kernel's rule), with the same registered backing file.
    fn try_direct(
        &self,
        node: &Node,
        k: &mut KernelIo,
        flags: i32,
        register: Option<RegisterBacking<'_>>,
    ) -> Result<Option<Opened>> {
        let Some(register) = register else {
            return Ok(None);
        };
        if k.daemon > 0 || node.kind != libc::S_IFREG || !self.passthrough_active() {
            return Ok(None);
        }
        let f = OFlag::from_bits_truncate(flags);
        let writable = is_writable(f);
        let st = node.state();
        if st.data.is_some() {
            // A metacopy file's data is not in its upper file: read through the daemon.
            return Ok(None);
        }
        // Which layer's file the handle holds: the shared backing file's when there is one
        // (`passthrough=lower`: a lower file's, also after a copy-up of the node's metadata).
        let (backing, fd, in_upper) = match &k.backing {
            Some((b, fd)) if k.direct > 0 => (b.clone(), fd.clone(), !k.backing_lower),
            _ => {
                let in_upper = st.upper;
                // A lower file of a writable union only with `passthrough=lower`, and only to
                // read: an open that changes it waits until such opens are gone
                // ([`Union::kio_for_change`]), so they never read a stale file.
                let safe = !st.unlinked
                    && if in_upper {
                        self.quota.is_none()
                    } else {
                        self.upper.is_none() || (self.lower_passthrough && !writable)
                    };
                if !safe {
                    return Ok(None);
                }
                // Our cached pages of the file would go stale, and unwritten data must reach
                // the file first: wait for the flusher instead.
                if let Some(c) = &self.cache
                    && !c.hand_over(node.ino)
                {
                    return Ok(None);
                }
                let (dir, name) = self.open_parent_in(node, st.top())?;
                let acc = if in_upper {
                    OFlag::O_RDWR
                } else {
                    OFlag::O_RDONLY
                };
                let fd = match nix::fcntl::openat(
                    dir.as_fd(),
                    name.as_os_str(),
                    acc | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC | OFlag::O_NOCTTY,
                    Mode::empty(),
                ) {
                    Ok(fd) => fd,
                    // An immutable or append-only file: the daemon applies the rules.
                    Err(Errno::EPERM) | Err(Errno::EACCES) => return Ok(None),
                    // Removed or replaced meanwhile: the daemon's open sorts that out.
                    Err(e) if in_upper && name_changed_hands(e) => return Ok(None),
                    Err(e) => return Err(Error::new(e, "open backing file")),
                };
                if let Err(e) = self.check_opened(node, st.top(), fd.as_fd()) {
                    // Replaced meanwhile: read what the kernel holds, through the daemon.
                    if self.removed_meanwhile(node) {
                        return Ok(None);
                    }
                    return Err(e);
                }
                match register(fd.as_fd()) {
                    Ok(b) => (b, Arc::new(fd), in_upper),
                    Err(e) => {
                        if self.direct_fallbacks.fetch_add(1, Ordering::Relaxed) == 0 {
                            log::warn!(
                                "passthrough: registering a backing file failed ({e}); \
                                 such opens go through the daemon"
                            );
                        }
                        return Ok(None);
                    }
                }
            }
        };
        drop(st);
        if writable && f.contains(OFlag::O_TRUNC) {
            nix::unistd::ftruncate(fd.as_fd(), 0).ctx("open: truncate")?;
        }
        let fh = self.fh_seq.fetch_add(1, Ordering::Relaxed);
        self.insert_handle(
            fh,
            Arc::new(OpenFile {
                ino: node.ino,
                fd: fd.clone(),
                writable,
                in_upper,
                ra: parking_lot::Mutex::new(RaState::default()),
                sync: sync_of(flags),
                direct: flags & libc::O_DIRECT != 0,
                passthrough: true,
                nocache: true,
                upper_fd: std::sync::OnceLock::new(),
                lost: std::sync::atomic::AtomicBool::new(false),
                wb_err_seen: self.error_sample(node.ino),
            }),
        );
        if k.direct == 0 {
            k.backing_lower = !in_upper && self.upper.is_some();
        }
        if k.backing_lower {
            self.lower_direct_opens.fetch_add(1, Ordering::Relaxed);
        }
        k.direct += 1;
        k.backing = Some((backing.clone(), fd));
        k.changed_directly |= writable;
        // Opened without FOPEN_KEEP_CACHE: the kernel drops its pages of the inode.
        k.kernel_pages = false;
        self.direct_opens.fetch_add(1, Ordering::Relaxed);
        Ok(Some(Opened {
            fh,
            direct: Some(backing),
            keep_cache: false,
        }))
    }

    /// `fd`, just opened by the name of `node`'s object in layer `r`, is that object. The
    /// name was checked before (an unlinked node has none), but it can change hands between
    /// that check and the open (an unlink or a rename over it, then another user's file
    /// under it): a handle of this node must never reach that file.
    pub(crate) fn check_opened(&self, node: &Node, r: LayerRef, fd: BorrowedFd<'_>) -> Result<()> {
        if r != LayerRef::Upper {
            // Lower layers do not change: a lower name is always the same file.
            return Ok(());
        }
        let fs = nix::sys::stat::fstat(fd).ctx("fstat")?;
        let st = node.st.lock();
        // (No name left: removed since the open, by a removal not yet marked in the node —
        // it marks it once it has let go of the node's allocation lock. A handle registered
        // on it now would be charged for a file its removal has freed.)
        if st.unlinked || fs.st_nlink == 0 || !self.is_nodes_object(node, r, &fs, &st) {
            return Err(Error::new(
                Errno::ESTALE,
                "open: another file has its name now",
            ));
        }
        Ok(())
    }

    /// An open of `node`, an upper file removed while the kernel held it (a name replaced by
    /// a rename, which a reader had just looked up; a reopen through `/proc/self/fd`): the
    /// object the kernel holds is opened, as the kernel would open an unlinked inode of its
    /// own. ESTALE when the removed object is not held (the kernel then looks the name up
    /// again).
    ///
    /// With a quota a removed file nobody had open was accounted freed with its last name;
    /// an open for writing counts it again (its space and inode, as XFS counts an unlinked
    /// file until its last close), and its last close frees it once more.
    fn open_removed(&self, node: &Node, f: OFlag, flags: i32, writable: bool) -> Result<u64> {
        let data = node.st.lock().data.clone();
        if let Some(d) = data {
            // A removed metacopy file: its data is below, where it was (the lower layers do
            // not change); writing it would need a copy-up of a file without a name.
            if writable {
                return Err(Error::new(
                    Errno::ESTALE,
                    "open for writing: a removed metacopy file",
                ));
            }
            let (dir, name) = self.data_parent(node, &d)?;
            let fd = open_file_at(dir.as_fd(), &name, self.daemon_flags(f, false))
                .ctx("open the data of a removed metacopy file")?;
            return Ok(self.add_handle_with(node.ino, fd, (false, false), flags, false));
        }
        let flags_k = self.daemon_flags(f, writable);
        // A removal in progress holds the node's allocation lock from before its name goes
        // until it has pinned the object (or let it go), and a last close frees the object
        // under it: the reopen, the accounting and the registration are one step for both.
        let mut known = node.io_lock.lock();
        let fd = self
            .reopen_pinned(node, flags_k)
            .ok_or(Error::new(Errno::ESTALE, "open: the file was removed"))?;
        if writable
            && self.quota.is_some()
            && node.freed.load(Ordering::Acquire)
            && let Ok(st) = nix::sys::stat::fstat(fd.as_fd())
            && st.st_nlink == 0
        {
            self.account(super::charge::alloc(&st), 1);
            *known = Some((super::charge::alloc(&st), st.st_size));
            node.freed.store(false, Ordering::Release);
        }
        let fh = self.add_handle_with(node.ino, fd, (writable, true), flags, false);
        drop(known);
        if writable && f.contains(OFlag::O_TRUNC) {
            // (reopen_pinned does not pass O_TRUNC on: through the cache, as any truncate.)
            let h = self.handle(fh)?;
            if let Err(e) = self.setattr_size(node, &h, 0) {
                self.remove_handle(fh);
                return Err(e);
            }
        }
        Ok(fh)
    }

    /// After an open by `node`'s name found another object: whether `node` was removed
    /// meanwhile and its object is held for the kernel. A removal in progress holds the node's
    /// allocation lock until it has pinned the object (or let it go): waited for here.
    fn removed_meanwhile(&self, node: &Node) -> bool {
        drop(node.io_lock.lock());
        node.st.lock().unlinked && node.pin.lock().is_some()
    }

    /// Open `node` through the daemon (and the page cache).
    fn open_daemon(&self, node: &Node, f: OFlag, flags: i32, writable: bool) -> Result<u64> {
        let ino = node.ino;
        let st = node.state();
        if st.unlinked && st.top() == LayerRef::Upper {
            return self.open_removed(node, f, flags, writable);
        }
        // A metacopy file opened for reading (an open for writing gave it its data first):
        // its data file.
        let metacopy = st.data.as_deref().filter(|_| !writable);
        let (dir, name) = match metacopy {
            Some(d) => self.data_parent(node, d)?,
            None => self.open_parent_in(node, st.top())?,
        };
        let in_upper = st.upper && metacopy.is_none();
        let cached = self.cache.is_some();
        let open = |flags: OFlag| open_file_at(dir.as_fd(), &name, flags);
        // The name was removed or replaced since the kernel looked it up: once that removal
        // is through, the object may be held for the kernel; else the kernel looks again.
        let changed_hands = |e: Error| {
            if self.removed_meanwhile(node) {
                self.open_removed(node, f, flags, writable)
            } else {
                Err(e)
            }
        };
        let mut nocache = false;
        let opened = match open(self.daemon_flags(f, writable)) {
            // Not readable by us: serve this handle without the cache.
            Err(Errno::EACCES) | Err(Errno::EPERM) if cached && writable => {
                nocache = true;
                open(backing_flags(f, writable, false))
            }
            r => r,
        };
        let fd = match opened {
            Ok(fd) => fd,
            // (A whiteout in its place opens as a device without a driver, ENXIO.)
            Err(e) if in_upper && name_changed_hands(e) => {
                return changed_hands(Error::new(
                    Errno::ESTALE,
                    "open: the name changed meanwhile",
                ));
            }
            Err(e) => return Err(Error::new(e, "open")),
        };
        // The check that the name still leads to the node's object and the handle's
        // registration are one step for a removal of that name, which decides under the
        // node's allocation lock whether a handle is open (then the last close frees the
        // object, and its pages stay) or not (then the removal frees it): a handle
        // registered after that look would be charged for a file no longer counted.
        let decided = (in_upper && (self.quota.is_some() || cached)).then(|| node.io_lock.lock());
        let checked = if in_upper {
            self.check_opened(node, LayerRef::Upper, fd.as_fd())
        } else {
            Ok(())
        };
        if let Err(e) = checked {
            // Its name was replaced between our look and the open.
            drop(decided);
            drop(fd);
            return changed_hands(e);
        }
        let fh = self.add_handle_with(ino, fd, (writable, in_upper), flags, nocache);
        drop(decided);
        drop(st);
        if cached && !nocache && f.contains(OFlag::O_TRUNC) {
            // O_TRUNC through the cache, so pages and size follow.
            let h = self.handle(fh)?;
            if let Err(e) = self.setattr_size(node, &h, 0) {
                self.remove_handle(fh);
                return Err(e);
            }
        }
        Ok(fh)
    }

    /// Register an open backing fd; returns its handle id.
    pub fn add_handle(&self, ino: u64, fd: OwnedFd, writable: bool, in_upper: bool) -> u64 {
        self.add_handle_with(ino, fd, (writable, in_upper), 0, false)
    }

    /// Register an open backing fd opened with `flags` (for O_SYNC/O_DSYNC/O_DIRECT).
    pub fn add_handle_with(
        &self,
        ino: u64,
        fd: OwnedFd,
        (writable, in_upper): (bool, bool),
        flags: i32,
        nocache: bool,
    ) -> u64 {
        let fh = self.fh_seq.fetch_add(1, Ordering::Relaxed);
        self.insert_handle(
            fh,
            Arc::new(OpenFile {
                ino,
                fd: Arc::new(fd),
                writable,
                in_upper,
                ra: parking_lot::Mutex::new(RaState {
                    // The kernel caches what buffered handles read (FOPEN_KEEP_CACHE).
                    drop_behind: flags & libc::O_DIRECT == 0,
                    ..RaState::default()
                }),
                sync: sync_of(flags),
                direct: flags & libc::O_DIRECT != 0,
                nocache: nocache || self.cache.is_none(),
                upper_fd: std::sync::OnceLock::new(),
                lost: std::sync::atomic::AtomicBool::new(false),
                passthrough: false,
                wb_err_seen: self.error_sample(ino),
            }),
        );
        fh
    }

    /// Where a new handle of `ino` starts in the file's write-back errors
    /// (`OpenFile::wb_err_seen`).
    fn error_sample(&self, ino: u64) -> std::sync::atomic::AtomicU64 {
        std::sync::atomic::AtomicU64::new(self.cache.as_ref().map_or(0, |c| c.error_sample(ino)))
    }

    /// Truncate an open upper file to `size` through its handle `f`, through the cache and
    /// within the quota. `f` may be open for reading only (the kernel sends the truncate of
    /// an `open(O_TRUNC)` without a handle, and a removed file is reached through any of
    /// its handles): then through its descriptor's `/proc/self/fd` link.
    fn setattr_size(&self, node: &super::Node, f: &OpenFile, size: u64) -> Result<()> {
        let mut known = node.io_lock.lock();
        let fd = f.fd.as_fd();
        let before = nix::sys::stat::fstat(fd).ctx("fstat")?;
        // A removed file whose last close (another handle's, while this truncate came in
        // through a handle it had found) has freed it: nothing of it is counted any more.
        let counted = self.quota.is_some() && !node.freed.load(Ordering::Acquire);
        if counted {
            self.sync_known(&mut known, &before);
        }
        let trunc = || {
            if f.writable {
                nix::unistd::ftruncate(fd, size as i64).ctx("ftruncate")
            } else {
                let link = format!("/proc/self/fd/{}", fd.as_raw_fd());
                nix::unistd::truncate(link.as_str(), size as i64).ctx("truncate")
            }
        };
        match &self.cache {
            Some(c) => c.truncate_with(node.ino, size, trunc)?,
            None => trunc()?,
        }
        if counted {
            let after = nix::sys::stat::fstat(fd).ctx("fstat")?;
            self.account(
                super::charge::alloc(&after) - super::charge::alloc(&before),
                0,
            );
            *known = Some((super::charge::alloc(&after), after.st_size));
            drop(known);
            self.mark_unsettled(node.ino);
        }
        Ok(())
    }

    /// The fd to read through `f` with (the cache's fills, reads without it, a copy's source,
    /// lseek, fsync): the upper file once the node has been copied up, even if `f` was opened
    /// on a lower one, as kernel overlayfs switches such a file to the copy.
    fn read_fd(&self, f: &OpenFile) -> Arc<OwnedFd> {
        if f.in_upper {
            return f.fd.clone();
        }
        if let Some(fd) = f.upper_fd.get() {
            return fd.clone();
        }
        let Some(node) = self.nodes.get(f.ino) else {
            return f.fd.clone();
        };
        {
            let st = node.st.lock();
            if !st.upper || st.data.is_some() {
                return f.fd.clone();
            }
        }
        let opened = self
            .open_parent_in(&node, LayerRef::Upper)
            .ok()
            .and_then(|(dir, name)| {
                nix::fcntl::openat(
                    dir.as_fd(),
                    name.as_os_str(),
                    OFlag::O_RDONLY | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC,
                    Mode::empty(),
                )
                .ok()
            })
            // The name may have changed hands since (review): only the node's own file.
            .filter(|fd| {
                self.check_opened(&node, LayerRef::Upper, fd.as_fd())
                    .is_ok()
            })
            // Removed since its copy-up (unlinked, or replaced by a rename): the object the
            // daemon holds for the kernel, reopened through our own descriptor of it (review:
            // the handle went back to reading the lower file).
            .or_else(|| {
                let pin = node.pin.lock();
                let held = pin.as_ref().and_then(|p| p.fd())?;
                nix::fcntl::open(
                    format!("/proc/self/fd/{}", held.as_raw_fd()).as_str(),
                    OFlag::O_RDONLY | OFlag::O_CLOEXEC,
                    Mode::empty(),
                )
                .ok()
            });
        match opened {
            Some(fd) => f.upper_fd.get_or_init(|| Arc::new(fd)).clone(),
            None => f.fd.clone(),
        }
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
        self.handles_of
            .get(&ino)?
            .values()
            .find(|f| f.in_upper)
            .cloned()
    }

    /// The handles open on node `ino` now.
    pub(crate) fn handles_on(&self, ino: u64) -> Vec<Arc<OpenFile>> {
        self.handles_of
            .get(&ino)
            .map(|h| h.values().cloned().collect())
            .unwrap_or_default()
    }

    /// Register handle `fh` (indexed by node too).
    fn insert_handle(&self, fh: u64, f: Arc<OpenFile>) {
        self.handles_of
            .entry(f.ino)
            .or_default()
            .insert(fh, f.clone());
        self.files.insert(fh, f);
    }

    /// Drop handle `fh` from the table and the index (O(1): a file opened 100,000 times
    /// closes as fast as one opened once).
    fn remove_handle(&self, fh: u64) -> Option<Arc<OpenFile>> {
        let (_, f) = self.files.remove(&fh)?;
        if let dashmap::mapref::entry::Entry::Occupied(mut e) = self.handles_of.entry(f.ino) {
            e.get_mut().remove(&fh);
            if e.get().is_empty() {
                e.remove();
            }
        }
        Some(f)
    }

    /// setattr of an unlinked file through one of its open handles.
    fn setattr_unlinked(&self, node: &super::Node, a: &SetAttr) -> Result<Attr> {
        // A truncate goes through a handle open for writing if there is one.
        let writable = a.size.and_then(|_| {
            self.handles_on(node.ino)
                .into_iter()
                .find(|f| f.in_upper && f.writable)
        });
        let Some(f) = writable.or_else(|| self.upper_handle_of(node.ino, a.fh)) else {
            return self.setattr_pinned(node, a);
        };
        let fd = f.fd.as_fd();
        if a.uid.is_some() || a.gid.is_some() {
            nix::unistd::fchown(fd, a.uid.map(Uid::from_raw), a.gid.map(Gid::from_raw))
                .ctx("fchown")?;
        }
        if let Some(mode) = a.mode {
            nix::sys::stat::fchmod(fd, Mode::from_bits_truncate(mode & 0o7777)).ctx("fchmod")?;
        }
        if let Some(size) = a.size {
            self.setattr_size(node, &f, size)?;
        }
        self.set_times(node.ino, a, || {
            nix::sys::stat::futimens(fd, &ts(a.atime), &ts(a.mtime)).ctx("futimens")
        })?;
        let fs = nix::sys::stat::fstat(fd).ctx("fstat")?;
        Ok(self.attr_for(node, &node.state(), &fs))
    }

    /// setattr of a removed file that no handle has open but the daemon pins for the kernel
    /// (an `O_PATH` fd, or a file just closed: with its write-back cache the kernel hands a
    /// closed file's times over later, also after the unlink; a chmod through
    /// `/proc/self/fd`). Made on the pinned object through its descriptor's `/proc/self/fd`
    /// link, which names our own descriptor, never a path in a layer.
    fn setattr_pinned(&self, node: &super::Node, a: &SetAttr) -> Result<Attr> {
        let gone = || Error::new(Errno::ENOENT, "setattr of a removed file");
        // Refused before anything is changed.
        if a.size.is_some() && node.is_dir() {
            return Err(Error::new(Errno::EISDIR, "truncate of a directory"));
        }
        // With a quota the removed object, which no handle has open, was accounted freed with
        // its last name: what a truncate frees or takes of it is not counted. Unless an open
        // for writing counted it again meanwhile (its handle is the way then).
        let uncounted = match (&self.quota, a.size) {
            (Some(_), Some(_)) => {
                let known = node.io_lock.lock();
                if !node.freed.load(Ordering::Acquire) {
                    return Err(Error::new(
                        Errno::ESTALE,
                        "truncate of a removed file opened meanwhile",
                    ));
                }
                Some(known)
            }
            _ => None,
        };
        // Our own duplicate: the object stays whatever an unpin does meanwhile.
        let fd = {
            let pin = node.pin.lock();
            match pin.as_ref().and_then(|p| p.fd()) {
                Some(fd) => nix::unistd::dup(fd).ctx("dup")?,
                None => return self.setattr_of_nothing_kept(node, a).ok_or_else(gone)?,
            }
        };
        let link = format!("/proc/self/fd/{}", fd.as_raw_fd());
        if a.uid.is_some() || a.gid.is_some() {
            nix::unistd::fchownat(
                fd.as_fd(),
                "",
                a.uid.map(Uid::from_raw),
                a.gid.map(Gid::from_raw),
                AtFlags::AT_EMPTY_PATH,
            )
            .ctx("chown")?;
        }
        if let Some(mode) = a.mode {
            nix::sys::stat::fchmodat(
                nix::fcntl::AT_FDCWD,
                link.as_str(),
                Mode::from_bits_truncate(mode & 0o7777),
                nix::sys::stat::FchmodatFlags::FollowSymlink,
            )
            .ctx("chmod")?;
        }
        if let Some(size) = a.size {
            let trunc = || nix::unistd::truncate(link.as_str(), size as i64).ctx("truncate");
            match &self.cache {
                Some(c) => c.truncate_with(node.ino, size, trunc)?,
                None => trunc()?,
            }
        }
        drop(uncounted);
        self.set_times(node.ino, a, || {
            nix::sys::stat::utimensat(
                nix::fcntl::AT_FDCWD,
                link.as_str(),
                &ts(a.atime),
                &ts(a.mtime),
                UtimensatFlags::FollowSymlink,
            )
            .ctx("utimens")
        })?;
        let fs = nix::sys::stat::fstat(fd.as_fd()).ctx("fstat")?;
        Ok(self.attr_for(node, &node.state(), &fs))
    }

    /// setattr of a removed file of which nothing is kept in upper (a lower file removed while
    /// open for reading): only times can be asked of it — the kernel's write-back cache hands
    /// a file's times over when it is closed, and its unlink made them dirty — and they can go
    /// nowhere: answered with the attributes of an open handle's file and the times asked, so
    /// that the close does not fail. None: something else was asked, or no handle is left.
    fn setattr_of_nothing_kept(&self, node: &super::Node, a: &SetAttr) -> Option<Result<Attr>> {
        if a.size.is_some() || a.mode.is_some() || a.uid.is_some() || a.gid.is_some() {
            return None;
        }
        let f = self.handles_on(node.ino).into_iter().next()?;
        let fs = match nix::sys::stat::fstat(f.fd.as_fd()).ctx("fstat") {
            Ok(fs) => fs,
            Err(e) => return Some(Err(e)),
        };
        let mut attr = self.attr_for(node, &node.state(), &fs);
        let now = || {
            let t = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap_or_default();
            (t.as_secs() as i64, i64::from(t.subsec_nanos()))
        };
        let pick = |t: &SetTime| match t {
            SetTime::Now => now(),
            SetTime::At(s, ns) => (*s, *ns),
        };
        if let Some(t) = &a.atime {
            attr.atime = pick(t);
        }
        if let Some(t) = &a.mtime {
            attr.mtime = pick(t);
        }
        Some(Ok(attr))
    }

    /// The times of setattr `a`, if it sets any, made by `set` on file `ino`: the page
    /// cache's pending writes land first (their times must not come after these), and the
    /// cache then keeps these (see `PageCache::times_set`).
    fn set_times(&self, ino: u64, a: &SetAttr, set: impl FnOnce() -> Result<()>) -> Result<()> {
        if a.atime.is_none() && a.mtime.is_none() {
            return Ok(());
        }
        if let Some(c) = &self.cache {
            c.write_out(ino).ctx("write-back")?;
        }
        set()?;
        if let Some(c) = &self.cache {
            c.times_set(ino);
        }
        Ok(())
    }

    /// The open file behind a handle.
    pub fn handle(&self, fh: u64) -> Result<Arc<OpenFile>> {
        self.files
            .get(&fh)
            .map(|f| f.clone())
            .ok_or(Error::new(Errno::EBADF, "file handle"))
    }

    /// read(2): up to `size` bytes at `off`.
    pub fn read(&self, fh: u64, off: u64, size: u32) -> Result<crate::cache::ReadData> {
        let f = self.handle(fh)?;
        f.check_lost()?;
        if let (Some(c), false) = (&self.cache, f.nocache) {
            let fd = self.read_fd(&f);
            return c.read(f.ino, &f.ra, &fd, off, size).ctx("read");
        }
        // A handle opened on a lower file reads the upper file once the file is copied up,
        // as through the cache. (Before, it went on reading the lower file: stale wherever
        // the kernel had no page of its own, as after a copy_file_range into the file.)
        let fd = self.read_fd(&f);
        if f.direct_fd() && Arc::ptr_eq(&fd, &f.fd) {
            return direct_read(fd.as_fd(), size as usize, off).map(crate::cache::ReadData::Owned);
        }
        let mut buf = vec![0u8; size as usize];
        let n = layer::sys::pread_full(fd.as_fd(), &mut buf, off as i64).ctx("read")?;
        buf.truncate(n);
        Ok(crate::cache::ReadData::Owned(buf))
    }

    /// write(2) of `data` at `off` (within the quota, if one is set).
    pub fn write(&self, fh: u64, off: u64, data: &[u8]) -> Result<usize> {
        self.write_flags(fh, off, data, 0)
    }

    /// write(2) with the caller's per-write flags (`O_SYNC`/`O_DSYNC` from RWF_*SYNC). Writes
    /// reaching past [`CACHED_WRITE_END_MAX`] go straight to the file, so that upper's own
    /// limit on file size (EFBIG) reaches the writer, not a later write-back.
    pub fn write_flags(&self, fh: u64, off: u64, data: &[u8], flags: i32) -> Result<usize> {
        let f = self.handle(fh)?;
        f.check_lost()?;
        if sync_of(flags).or(f.sync).is_some() {
            // Durable includes the name: a pending copy-up commit first.
            self.commits.wait_node(f.ino);
        }
        self.written_to(f.ino);
        if let (Some(c), false, true) = (&self.cache, f.nocache, f.in_upper)
            && off.saturating_add(data.len() as u64) <= CACHED_WRITE_END_MAX
            && !self.upper_nearly_full(c, data.len() as u64)
        {
            if self.quota.is_some() {
                // The flusher settles against what is known: know it before the first write.
                let node = self.node(f.ino)?;
                let mut known = node.io_lock.lock();
                if known.is_none() {
                    let st = nix::sys::stat::fstat(f.fd.as_fd()).ctx("fstat")?;
                    *known = Some((super::charge::alloc(&st), st.st_size));
                }
                drop(known);
                // Unsettled from now on: a FORGET right after write-back (before it settles)
                // must not take the node, which holds what is accounted.
                self.mark_unsettled(f.ino);
            }
            let n = c.write(f.ino, &f.fd, off, data).ctx("write")?;
            let sync = sync_of(flags).or(f.sync);
            if f.direct || sync.is_some() {
                c.fsync_file(f.ino, &f.wb_err_seen).ctx("write-back")?;
                self.make_durable(f.fd.as_fd(), sync)?;
            }
            return Ok(n);
        }
        let aligned;
        let data = if f.direct_fd() {
            aligned = AlignedBuf::copy_of(data);
            aligned.bytes()
        } else {
            data
        };
        let write = || match &self.quota {
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
        };
        let r = match &self.cache {
            // A handle that bypasses the cache, or upper's filesystem is nearly full (so a
            // full disk fails this write, not a later write-back): what the cache holds of the
            // file goes first, and what was loaded while the write ran.
            Some(c) => c
                .invalidate_with(f.ino, off, data.len() as u64, write)
                .ctx("write-back")?,
            None => write(),
        };
        if let Some(c) = &self.cache
            && let Ok(st) = nix::sys::stat::fstat(f.fd.as_fd())
        {
            c.set_size(f.ino, &st);
        }
        r
    }

    /// Would accepting `len` more bytes into the cache leave too little room on upper's
    /// filesystem for everything dirty to be written back? (Free space is read at most every
    /// 100 ms, and what is accepted meanwhile counts as used: the flusher writes while the
    /// figure ages, so a fast writer would otherwise fill the disk under a stale one. The
    /// margin is the dirty limit plus 16 MiB.)
    fn upper_nearly_full(&self, c: &crate::cache::PageCache, len: u64) -> bool {
        let Some(up) = &self.upper else {
            return false;
        };
        let mut cached = self.upper_free.lock();
        let (free, _) = upper_free_in(up, &mut cached);
        let full = free < c.config().thresholds().1 + len + (16 << 20);
        if !full && let Some((_, f, _)) = cached.as_mut() {
            *f = f.saturating_sub(len);
        }
        full
    }

    /// Free bytes of upper's filesystem, read at most every 100 ms (None: no upper).
    pub(crate) fn upper_free(&self) -> Option<u64> {
        let up = self.upper.as_ref()?;
        Some(upper_free_in(up, &mut self.upper_free.lock()).0)
    }

    /// Is there room on upper's filesystem for what a background commit still needs (an entry
    /// in the target directory, which may take a new block, and a rename's whiteout, an
    /// inode)? Near a full upper a copy-up is committed before it is answered, so that a
    /// full disk fails the operation (ENOSPC, as kernel overlayfs), not the commit after the
    /// caller was told it succeeded. Read at most every 100 ms: the margins (16 MiB beyond
    /// the copy's own `size` and a block per pending commit, 1024 inodes beyond one per
    /// pending commit) cover what others take meanwhile.
    pub(crate) fn room_to_commit_later(&self, size: u64) -> bool {
        let Some(up) = &self.upper else {
            return false;
        };
        let (bytes, inodes) = upper_free_in(up, &mut self.upper_free.lock());
        // (Each commit still pending may take a block and an inode too.)
        let pending = self.commits.pending_count() as u64;
        bytes >= (16 << 20) + size + pending * 4096 && inodes >= 1024 + pending
    }

    /// release(2): drop a handle. The last close of an unlinked upper file frees its space
    /// (and its cached pages, dirty ones too: nothing can reach them any more).
    pub fn release(&self, fh: u64) {
        let Some((ino, writable, fd)) = self
            .files
            .get(&fh)
            .map(|f| (f.ino, f.writable, f.fd.clone()))
        else {
            return;
        };
        let node = self.nodes.get(ino);
        // What was written through it reaches upper now, not when the flusher comes to it
        // (`writeback_on_close`, see CacheConfig): a daemon killed after a close must lose
        // nothing of the file. Not for a file with no name left (nothing can read it back:
        // asked of the file itself, since a name we never looked up may still hold it), and
        // before the allocation lock below, which the write-back's accounting takes.
        if writable
            && let Some(c) = &self.cache
            && c.is_dirty(ino)
            && nix::sys::stat::fstat(fd.as_fd()).is_ok_and(|st| st.st_nlink > 0)
        {
            c.write_back_closed(ino);
        }
        drop(fd);
        // With a quota, the handle goes and the last close is accounted under the node's
        // allocation lock, which an unlink holds from its "still open?" to its own
        // accounting: the object's release is counted by exactly one of the two.
        // With a page cache too: an unlink or a rename over the file decides under that lock
        // whether the removed object stays pinned for the kernel, with its pages.
        let mut known = match &node {
            Some(n) if self.quota.is_some() || self.cache.is_some() => Some(n.io_lock.lock()),
            _ => None,
        };
        let Some(f) = self.remove_handle(fh) else {
            return;
        };
        self.last_close(&f, node.as_deref(), known.as_deref_mut());
        drop(known);
        if let Some(node) = &node {
            let mut k = node.kio.lock();
            if f.passthrough {
                k.direct = k.direct.saturating_sub(1);
                if k.direct == 0 {
                    // The kernel has let go of it before sending RELEASE.
                    k.backing = None;
                    k.backing_lower = false;
                }
            } else {
                k.daemon = k.daemon.saturating_sub(1);
            }
        }
    }

    /// After handle `f` went: if it was the last one of an upper file, settle what is
    /// accounted for it (`known`: the node's, locked) and, for an unlinked file, free its
    /// space, inode and cached pages.
    fn last_close(
        &self,
        f: &OpenFile,
        node: Option<&Node>,
        known: Option<&mut Option<(i64, i64)>>,
    ) {
        if (self.quota.is_none() && self.cache.is_none())
            || !f.in_upper
            || self.upper_handle_of(f.ino, None).is_some()
        {
            return;
        }
        let Ok(st) = nix::sys::stat::fstat(f.fd.as_fd()) else {
            return;
        };
        if st.st_nlink == 0 {
            // Pinned for the kernel, which may open it again (a RELEASE comes after the
            // close that sent it, so after a rename over the file that close came before):
            // its pages stay until the kernel forgets it (unpin_forgotten).
            self.removed_file_pages(f.ino, node.is_some_and(|n| n.pin.lock().is_some()));
            // An unlink that found no handle registered yet freed it already.
            let freed = node.is_some_and(|n| n.freed.load(Ordering::Acquire));
            if self.quota.is_some() && !freed {
                // Settle drift first, so what is released is what was accounted.
                if let Some(known) = known {
                    self.sync_known(known, &st);
                    *known = None;
                }
                self.account(-super::charge::alloc(&st), -1);
                // (Pinned for the kernel, its pages may still be written back: not counted.)
                if let Some(n) = node {
                    n.freed.store(true, Ordering::Release);
                }
            }
        } else if let (Some(_), Some(known)) = (&self.quota, known) {
            self.sync_known(known, &st);
        }
    }

    /// fsync / fdatasync of an open file: its dirty pages first, then the upper file.
    pub fn fsync(&self, fh: u64, datasync: bool) -> Result<()> {
        let f = self.handle(fh)?;
        // A synced file has its name: a copy-up commit of it finishes first, and its fsync
        // error is this fsync's.
        self.commits.wait_node(f.ino);
        if let Some(e) = self.commits.take_error(f.ino) {
            return Err(Error::new(e, "fsync of copied-up file"));
        }
        if let Some(c) = &self.cache {
            c.fsync_file(f.ino, &f.wb_err_seen).ctx("write-back")?;
        }
        if self.volatile {
            return Ok(());
        }
        let fd = self.read_fd(&f);
        let r = if datasync {
            nix::unistd::fdatasync(fd.as_fd()).ctx("fdatasync")
        } else {
            nix::unistd::fsync(fd.as_fd()).ctx("fsync")
        };
        // After a sync the allocation is final: settle it.
        if let (Some(_), Some(node)) = (&self.quota, self.nodes.get(f.ino))
            && f.in_upper
        {
            self.settle_node(&node);
        }
        r
    }

    /// Write every dirty page of the mount to its file and sync the upper filesystem
    /// (`unionfs-rs sync`; the kernel sends FUSE_SYNCFS to virtiofs servers only, so sync(2)
    /// and syncfs(2) on the mount never ask for this).
    pub fn sync_all(&self) -> Result<()> {
        self.store_cached()?;
        if let (Some(up), false) = (&self.upper, self.volatile) {
            nix::unistd::syncfs(up.root()).ctx("syncfs")?;
        }
        self.settle_allocations();
        Ok(())
    }

    /// Pending copy-up commits done and cached writes stored in upper (not synced).
    pub fn store_cached(&self) -> Result<()> {
        self.commits.wait_all();
        if let Some(c) = &self.cache {
            c.store_all().ctx("write-back")?;
        }
        Ok(())
    }

    /// fallocate on an open file (space reserved against the quota first).
    pub fn fallocate(&self, fh: u64, off: u64, len: u64, mode: i32) -> Result<()> {
        let f = self.handle(fh)?;
        f.check_lost()?;
        let alloc = || match &self.quota {
            Some(q) if f.in_upper && len > 0 => {
                let node = self.node(f.ino)?;
                let mut known = node.io_lock.lock();
                let r = self.quota_fallocate(q, f.fd.as_fd(), (off, len, mode), &mut known);
                drop(known);
                self.mark_unsettled(f.ino);
                r
            }
            _ => super::charge::fallocate(f.fd.as_fd(), off, len, mode),
        };
        let r = match &self.cache {
            // The file changes behind the cache: dirty pages out, affected clean pages gone.
            Some(c) => {
                let shifts =
                    mode & (libc::FALLOC_FL_COLLAPSE_RANGE | libc::FALLOC_FL_INSERT_RANGE) != 0;
                c.invalidate_with(f.ino, off, if shifts { 0 } else { len }, alloc)
                    .ctx("write-back")?
            }
            None => alloc(),
        };
        if let Some(c) = &self.cache
            && let Ok(st) = nix::sys::stat::fstat(f.fd.as_fd())
        {
            c.set_size(f.ino, &st);
        }
        r
    }

    /// A write drops security.capability on disk: keep the xattr cache honest.
    fn written_to(&self, ino: u64) {
        if let Some(node) = self.nodes.get(ino) {
            let has_cap = node.xattrs.lock().as_ref().is_some_and(|c| {
                c.iter()
                    .any(|(n, _)| n.as_encoded_bytes() == b"security.capability")
            });
            if has_cap {
                node.invalidate_xattrs();
            }
        }
    }

    /// copy_file_range(2) from one open file to another, made by upper's filesystem (a
    /// reflink where it shares extents, else its own in-kernel copy) instead of the kernel's
    /// reads and writes through the mount. Returns the bytes copied (fewer at the source's
    /// end, or near the quota's limit). EOPNOTSUPP where upper's filesystem cannot copy
    /// between the two (a lower layer on another filesystem): the kernel then copies this
    /// range through reads and writes, as for a filesystem without the operation.
    pub fn copy_file_range(
        &self,
        (fh_in, off_in): (u64, u64),
        (fh_out, off_out): (u64, u64),
        len: u64,
        flags: u64,
    ) -> Result<u64> {
        if flags != 0 {
            return Err(Error::new(Errno::EINVAL, "copy_file_range: flags"));
        }
        let fi = self.handle(fh_in)?;
        let fo = self.handle(fh_out)?;
        fo.check_lost()?;
        if !fo.writable || !fo.in_upper {
            return Err(Error::new(
                Errno::EBADF,
                "copy_file_range: not open for writing",
            ));
        }
        // What one reply can count (and the kernel's own cap on one call).
        let len = len.min(COPY_RANGE_MAX);
        if len == 0 {
            return Ok(0);
        }
        let sync = fo.sync;
        if sync.is_some() {
            // Durable includes the name: a pending copy-up commit first.
            self.commits.wait_node(fo.ino);
        }
        self.written_to(fo.ino);
        if let Some(c) = &self.cache {
            // The copy reads the source file and writes the destination behind the cache:
            // cached writes of both reach their files first, the destination's clean pages
            // in the range go.
            if c.is_dirty(fi.ino) {
                c.write_out(fi.ino).ctx("write-back")?;
            }
        }
        let src = self.read_fd(&fi);
        let copy = |n: u64| -> Result<usize> {
            copy_range(src.as_fd(), off_in, fo.fd.as_fd(), off_out, n)
        };
        let copy_all = || match &self.quota {
            Some(q) => {
                let node = self.node(fo.ino)?;
                let mut known = node.io_lock.lock();
                let r = self.quota_io(q, fo.fd.as_fd(), off_out, len, &mut known, copy);
                drop(known);
                self.mark_unsettled(fo.ino);
                r
            }
            None => copy(len),
        };
        let r = match &self.cache {
            Some(c) => c
                .invalidate_with(fo.ino, off_out, len, copy_all)
                .ctx("write-back")?,
            None => copy_all(),
        };
        if let Some(c) = &self.cache
            && let Ok(st) = nix::sys::stat::fstat(fo.fd.as_fd())
        {
            c.set_size(fo.ino, &st);
        }
        let n = r?;
        self.copy_ranges.fetch_add(1, Ordering::Relaxed);
        self.copy_range_bytes.fetch_add(n as u64, Ordering::Relaxed);
        if n > 0 {
            self.make_durable(fo.fd.as_fd(), sync)?;
        }
        Ok(n as u64)
    }

    /// What an O_SYNC (`Some(true)`) or O_DSYNC (`Some(false)`) write owes when it returns
    /// (nothing on a volatile mount).
    fn make_durable(&self, fd: BorrowedFd<'_>, sync: Option<bool>) -> Result<()> {
        match sync {
            _ if self.volatile => Ok(()),
            Some(true) => nix::unistd::fsync(fd).ctx("fsync"),
            Some(false) => nix::unistd::fdatasync(fd).ctx("fdatasync"),
            None => Ok(()),
        }
    }

    /// lseek SEEK_DATA / SEEK_HOLE on an open file.
    pub fn lseek(&self, fh: u64, off: i64, whence: i32) -> Result<i64> {
        let f = self.handle(fh)?;
        if self.writeback_cache_on()
            && matches!(whence, libc::SEEK_DATA | libc::SEEK_HOLE)
            && self.handles_on(f.ino).iter().any(|h| h.writable)
        {
            // The kernel's write-back cache may hold written pages of the file (and its size)
            // that we have not seen: where they are cannot be told from here (before: ENXIO
            // for offsets inside the file). EINVAL, as a filesystem without SEEK_DATA answers:
            // copying tools then read the file whole. (Not ENOSYS: the kernel would stop
            // asking for every file of the mount, whose holes we do know.)
            return Err(Error::new(
                Errno::EINVAL,
                "SEEK_DATA/SEEK_HOLE of a file the kernel may hold written pages of",
            ));
        }
        if let Some(c) = &self.cache {
            // Holes and data as the file will be: write what is cached first.
            c.write_out(f.ino).ctx("write-back")?;
        }
        let w = match whence {
            libc::SEEK_DATA => nix::unistd::Whence::SeekData,
            libc::SEEK_HOLE => nix::unistd::Whence::SeekHole,
            libc::SEEK_SET => nix::unistd::Whence::SeekSet,
            libc::SEEK_END => nix::unistd::Whence::SeekEnd,
            _ => return Err(Error::new(Errno::EINVAL, "lseek whence")),
        };
        let fd = self.read_fd(&f);
        nix::unistd::lseek(fd.as_fd(), off, w).ctx("lseek")
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
        // A truncate waits for passthrough readers of the lower file, and holds new ones
        // off until it is done (`passthrough=lower`).
        let _no_lower_readers = match a.size {
            Some(_) if self.lower_passthrough && !node.is_dir() => {
                Some(self.kio_for_change(&node)?)
            }
            _ => None,
        };
        // Set-id bits that go with the change ([`KillSuidgid`]), decided before it (a chown
        // refused with EPERM copies nothing up): the mode to set along.
        let with_mode;
        let a = match self.killed_mode(&node, a)? {
            Some(mode) => {
                with_mode = SetAttr {
                    mode: Some(mode),
                    ..*a
                };
                &with_mode
            }
            None => a,
        };
        // Only times, of a node already in upper, change no xattr (`tar x` sets a file's
        // times right after writing it, then asks security.capability for its chown: the
        // cache loaded at the write stays good).
        let times_only = a.mode.is_none()
            && a.uid.is_none()
            && a.gid.is_none()
            && a.size.is_none()
            && node.st.lock().upper;
        if times_only {
            return self.setattr_node(&node, a);
        }
        // chmod rewrites ACL xattrs, chown and truncate drop security.capability: reload
        // xattrs next time — also after the change, so a load that ran meanwhile (a getfacl
        // during the copy-up) cannot keep the old ACL for the kernel's next permission check.
        node.invalidate_xattrs();
        let r = self.setattr_node(&node, a);
        node.invalidate_xattrs();
        r
    }

    /// The mode `node` gets with setattr `a` if set-id bits go ([`KillSuidgid`]); EPERM for a
    /// `chown(f, -1, -1)` the caller may not make.
    fn killed_mode(&self, node: &Node, a: &SetAttr) -> Result<Option<u32>> {
        let caller = match a.kill_suidgid {
            KillSuidgid::No => return Ok(None),
            KillSuidgid::Truncate { caller, .. }
            | KillSuidgid::Chown(caller)
            | KillSuidgid::Nothing(caller) => caller,
        };
        if node.is_dir() {
            return Ok(None);
        }
        let now = self.getattr(node.ino, None)?;
        let bits = match a.kill_suidgid {
            KillSuidgid::No => 0,
            KillSuidgid::Truncate { lacks_fsetid, .. } => {
                set_id_bits_without_fsetid(&now, caller, lacks_fsetid)
            }
            KillSuidgid::Chown(_) => set_id_bits(&now, caller),
            KillSuidgid::Nothing(_) => match set_id_bits(&now, caller) {
                0 => 0,
                bits => {
                    // A write's or chown(f, -1, -1)'s. A write sends it only for a caller
                    // without CAP_FSETID (or, to drop security.capability alone, one with
                    // it), through a handle open for writing, so the caller may write the file
                    // (and could clear the bits by writing anyway). Anything else is the
                    // chown, which clears the bits whoever asks, if allowed to.
                    let has_xattr = |name: &str| {
                        self.xattrs_of(node).is_ok_and(|x| {
                            x.iter()
                                .any(|(n, _)| n.as_encoded_bytes() == name.as_bytes())
                        })
                    };
                    let lacks = super::acl::lacks_fsetid(caller);
                    let writing = self.handles_on(node.ino).iter().any(|f| f.writable)
                        && (lacks || has_xattr("security.capability"))
                        && (super::acl::mode_lets_write(caller, now.mode, now.uid, now.gid)
                            || has_xattr(super::acl::ACCESS));
                    if writing {
                        if lacks { bits } else { 0 }
                    } else if super::acl::owner_or_capable(caller, now.uid, now.gid) {
                        bits
                    } else {
                        return Err(Error::new(Errno::EPERM, "chown: not the owner"));
                    }
                }
            },
        };
        Ok((bits != 0).then(|| a.mode.unwrap_or(now.mode) & 0o7777 & !bits))
    }

    fn setattr_node(&self, node: &Arc<Node>, a: &SetAttr) -> Result<Attr> {
        let node = node.clone();
        if node.st.lock().unlinked {
            return self.setattr_unlinked(&node, a);
        }
        if node.is_dir() {
            // A deferred rename from or into it would set its times again when committed.
            self.commits.wait_dir(node.ino);
        }
        let _changing = node.is_dir().then(|| self.dir_changing(&[node.ino]));
        // Held to the end: the change is made to the copy, then its commit is queued.
        let _staged = self.copy_up_for_use(&node)?;
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
            // Without a handle, the node's upper file opened by name and checked to be the
            // node's object under the lock a removal of the name takes: since the kernel
            // looked the name up, an unlink and a create may have put another file there,
            // whose truncate would be settled against this node (the usage drifted by
            // whole files under truncate(2) / unlink / open(O_CREAT) churn).
            let opened = match via {
                Some(_) => None,
                None => {
                    let fd = match nix::fcntl::openat(
                        dir.as_fd(),
                        name.as_os_str(),
                        OFlag::O_WRONLY | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC | OFlag::O_NONBLOCK,
                        Mode::empty(),
                    ) {
                        Ok(fd) => Ok(fd),
                        Err(e) if name_changed_hands(e) => Err(Error::new(
                            Errno::ESTALE,
                            "truncate: the name changed meanwhile",
                        )),
                        Err(e) => return Err(Error::new(e, "truncate: open")),
                    };
                    match fd.and_then(|fd| {
                        self.check_opened(&node, LayerRef::Upper, fd.as_fd())
                            .map(|()| fd)
                    }) {
                        Ok(fd) => Some(fd),
                        Err(e) => {
                            drop(known);
                            // Removed meanwhile and held for the kernel: truncated there.
                            if self.removed_meanwhile(&node) {
                                return self.setattr_unlinked(&node, a);
                            }
                            return Err(e);
                        }
                    }
                }
            };
            let fd = match (&via, &opened) {
                (Some(f), _) => f.fd.as_fd(),
                (None, Some(o)) => o.as_fd(),
                (None, None) => return Err(Error::new(Errno::EBADF, "truncate: no file")),
            };
            let before = match &self.quota {
                Some(_) => nix::sys::stat::fstat(fd).ok(),
                None => None,
            };
            if let Some(b) = &before {
                self.sync_known(&mut known, b);
            }
            let trunc =
                || -> Result<()> { nix::unistd::ftruncate(fd, size as i64).ctx("truncate") };
            match &self.cache {
                Some(c) => c.truncate_with(node.ino, size, trunc)?,
                None => trunc()?,
            }
            // Growing is sparse (nothing allocated); shrinking frees blocks.
            if let (Some(b), Ok(a)) = (before, nix::sys::stat::fstat(fd)) {
                self.account(super::charge::alloc(&a) - super::charge::alloc(&b), 0);
                *known = Some((super::charge::alloc(&a), a.st_size));
                drop(known);
                self.mark_unsettled(node.ino);
            }
        }
        self.set_times(node.ino, a, || {
            if is_root {
                nix::sys::stat::futimens(dir.as_fd(), &ts(a.atime), &ts(a.mtime)).ctx("utimens")
            } else {
                nix::sys::stat::utimensat(
                    dir.as_fd(),
                    name.as_os_str(),
                    &ts(a.atime),
                    &ts(a.mtime),
                    UtimensatFlags::NoFollowSymlink,
                )
                .ctx("utimens")
            }
        })?;
        let fs = self
            .dir_times
            .steady(|| layer::stat_at(dir.as_fd(), &name).ctx("stat"))?;
        Ok(self.attr_for(&node, &st, &fs))
    }
}

/// `cached`'s figure of upper's free bytes if younger than 100 ms, else a fresh one.
/// Free (bytes, inodes) of upper's filesystem, from `cached` if read in the last 100 ms.
/// Inodes: u64::MAX where the filesystem has no fixed number (btrfs says 0 of 0).
fn upper_free_in(up: &layer::Layer, cached: &mut Option<UpperFree>) -> (u64, u64) {
    let now = std::time::Instant::now();
    match *cached {
        Some((t, free, inodes))
            if now.duration_since(t) < std::time::Duration::from_millis(100) =>
        {
            (free, inodes)
        }
        _ => {
            let (free, inodes) = layer::sys::statfs(up.root())
                .map(|s| {
                    let inodes = match s.f_files {
                        0 => u64::MAX,
                        _ => s.f_ffree,
                    };
                    (s.f_bavail * s.f_bsize as u64, inodes)
                })
                .unwrap_or((u64::MAX, u64::MAX));
            *cached = Some((now, free, inodes));
            (free, inodes)
        }
    }
}

/// When upper's free space was read, its free bytes and free inodes ([`upper_free_in`]).
pub(crate) type UpperFree = (std::time::Instant, u64, u64);

/// Copy up to `len` bytes from `src` at `off_in` to `dst` at `off_out` with copy_file_range(2),
/// as far as the source goes. Upper's filesystem unable to copy between the two files
/// (another filesystem, or one without the operation): EOPNOTSUPP, before anything is copied.
fn copy_range(
    src: BorrowedFd<'_>,
    off_in: u64,
    dst: BorrowedFd<'_>,
    off_out: u64,
    len: u64,
) -> Result<usize> {
    let (mut oi, mut oo) = (off_in as i64, off_out as i64);
    let mut done = 0u64;
    while done < len {
        let want = (len - done) as usize;
        match nix::fcntl::copy_file_range(src, Some(&mut oi), dst, Some(&mut oo), want) {
            Ok(0) => break,
            Ok(n) => done += n as u64,
            Err(Errno::EINTR) => continue,
            Err(Errno::EXDEV) | Err(Errno::EOPNOTSUPP) | Err(Errno::ENOSYS) if done == 0 => {
                return Err(Error::new(
                    Errno::EOPNOTSUPP,
                    "copy_file_range between these files",
                ));
            }
            // What was copied counts (a full upper or quota stops the next call).
            Err(_) if done > 0 => break,
            Err(e) => return Err(Error::new(e, "copy_file_range")),
        }
    }
    Ok(done as usize)
}

#[cfg(test)]
mod tests {
    //! The passthrough mode rules of [`Union::try_direct`], with a stand-in for the kernel's
    //! backing file registration (the rules must hold whatever the adapter does with it).

    use super::*;
    use crate::union::{Options, ROOT_INO};
    use std::ffi::OsStr;
    use std::sync::atomic::AtomicUsize;

    struct Fixture {
        _tmp: tempfile::TempDir,
        u: Union,
    }

    /// A union of one lower (holding `low`) and an upper (holding `up`), or a read-only one.
    fn fixture(writable: bool, quota: bool) -> Fixture {
        let tmp = tempfile::tempdir().expect("tempdir");
        let root = tmp.path();
        for d in ["l", "u", "w"] {
            std::fs::create_dir_all(root.join(d)).expect("mkdir");
        }
        for name in ["low", "low2", "low3"] {
            std::fs::write(root.join("l").join(name), b"lower").expect("write");
        }
        std::fs::write(root.join("u/up"), b"upper").expect("write");
        let u = Union::new(&Options {
            lowers: vec![root.join("l")],
            upper: writable.then(|| root.join("u")),
            workdir: writable.then(|| root.join("w")),
            quota: quota.then(|| crate::union::charge::QuotaConfig {
                limits: Some(crate::quota::Limits {
                    bhard: 1 << 30,
                    ..crate::quota::Limits::default()
                }),
                edquot: false,
            }),
            passthrough: true,
            ..Options::default()
        })
        .expect("union");
        u.set_passthrough(true);
        Fixture { _tmp: tmp, u }
    }

    fn ino(u: &Union, name: &str) -> u64 {
        u.lookup(ROOT_INO, OsStr::new(name)).expect("lookup").ino
    }

    /// Opens `ino` with `flags` offering registration; returns (handle, passthrough?).
    fn open(u: &Union, ino: u64, flags: i32, registered: &AtomicUsize) -> (u64, bool) {
        let reg = |_: BorrowedFd<'_>| -> std::io::Result<Backing> {
            registered.fetch_add(1, Ordering::SeqCst);
            Ok(Arc::new(()))
        };
        let o = u.open_with(ino, flags, Some(&reg)).expect("open");
        (o.fh, o.direct.is_some())
    }

    #[test]
    fn upper_files_are_direct_and_share_one_backing() {
        let f = fixture(true, false);
        let n = AtomicUsize::new(0);
        let up = ino(&f.u, "up");
        let (a, da) = open(&f.u, up, libc::O_RDONLY, &n);
        let (b, db) = open(&f.u, up, libc::O_RDWR, &n);
        assert!(da && db, "upper file opens must be passthrough");
        assert_eq!(
            n.load(Ordering::SeqCst),
            1,
            "one registration for both opens"
        );
        f.u.release(a);
        f.u.release(b);
        // All closed: the registration is dropped, the next open registers again.
        let (c, dc) = open(&f.u, up, libc::O_RDONLY, &n);
        assert!(dc);
        assert_eq!(n.load(Ordering::SeqCst), 2);
        f.u.release(c);
    }

    #[test]
    fn lower_files_of_a_writable_union_stay_with_the_daemon() {
        let f = fixture(true, false);
        let n = AtomicUsize::new(0);
        let low = ino(&f.u, "low");
        let (r, dr) = open(&f.u, low, libc::O_RDONLY, &n);
        assert!(!dr, "a lower file must not be opened in passthrough mode");
        // A write open while the daemon-mode reader is open: copied up, still the daemon's.
        let (w, dw) = open(&f.u, low, libc::O_WRONLY, &n);
        assert!(!dw, "modes must not mix on one inode");
        f.u.release(r);
        // The writer is still open: new opens keep to the daemon.
        let (r2, dr2) = open(&f.u, low, libc::O_RDONLY, &n);
        assert!(!dr2);
        f.u.release(w);
        f.u.release(r2);
        // Now in upper and nothing open: passthrough.
        let (r3, dr3) = open(&f.u, low, libc::O_RDONLY, &n);
        assert!(
            dr3,
            "a copied-up file with no open handle should be passthrough"
        );
        assert_eq!(n.load(Ordering::SeqCst), 1);
        f.u.release(r3);
    }

    #[test]
    fn a_copy_up_open_keeps_the_kernels_pages_when_it_may_hold_some() {
        let f = fixture(true, false);
        let n = AtomicUsize::new(0);
        let low = ino(&f.u, "low");
        // Read through the daemon (the kernel caches pages of it), then closed.
        let (r, _) = open(&f.u, low, libc::O_RDONLY, &n);
        f.u.release(r);
        // The open for writing copies it up: served by the daemon, no backing registered.
        let (w, dw) = open(&f.u, low, libc::O_WRONLY | libc::O_APPEND, &n);
        assert!(!dw, "the copy-up open must not drop the kernel's pages");
        f.u.release(w);
        // Later opens of the upper file: passthrough.
        let (w2, dw2) = open(&f.u, low, libc::O_WRONLY, &n);
        assert!(dw2);
        f.u.release(w2);
        assert_eq!(n.load(Ordering::SeqCst), 1);

        // Never read through the daemon: the copy-up open is passthrough.
        let fresh = ino(&f.u, "low2");
        let (w3, dw3) = open(&f.u, fresh, libc::O_WRONLY | libc::O_APPEND, &n);
        assert!(dw3, "nothing cached: passthrough");
        f.u.release(w3);

        // O_TRUNC drops the pages anyway: passthrough.
        let third = ino(&f.u, "low3");
        let (r3, _) = open(&f.u, third, libc::O_RDONLY, &n);
        f.u.release(r3);
        let (w4, dw4) = open(&f.u, third, libc::O_WRONLY | libc::O_TRUNC, &n);
        assert!(dw4);
        f.u.release(w4);
    }

    #[test]
    fn quota_keeps_upper_files_with_the_daemon() {
        let f = fixture(true, true);
        let n = AtomicUsize::new(0);
        let (h, d) = open(&f.u, ino(&f.u, "up"), libc::O_RDWR, &n);
        assert!(
            !d,
            "with a quota every write must be accounted by the daemon"
        );
        assert_eq!(n.load(Ordering::SeqCst), 0);
        f.u.release(h);
    }

    #[test]
    fn read_only_union_reads_lower_files_directly() {
        let f = fixture(false, false);
        let n = AtomicUsize::new(0);
        let (h, d) = open(&f.u, ino(&f.u, "low"), libc::O_RDONLY, &n);
        assert!(d);
        f.u.release(h);
    }

    #[test]
    fn failed_registration_falls_back_and_later_opens_follow() {
        let f = fixture(true, false);
        let up = ino(&f.u, "up");
        let fail = |_: BorrowedFd<'_>| -> std::io::Result<Backing> {
            Err(std::io::Error::from_raw_os_error(libc::ELOOP))
        };
        let o =
            f.u.open_with(up, libc::O_RDONLY, Some(&fail))
                .expect("open");
        assert!(o.direct.is_none(), "a refused registration must fall back");
        assert_eq!(f.u.passthrough_stats().2, 1);
        // A daemon-mode open exists: the next open must not be passthrough.
        let n = AtomicUsize::new(0);
        let (h, d) = open(&f.u, up, libc::O_RDONLY, &n);
        assert!(!d);
        f.u.release(o.fh);
        f.u.release(h);
    }

    #[test]
    fn daemon_open_after_direct_writes_drops_the_kernels_pages() {
        let f = fixture(true, false);
        let n = AtomicUsize::new(0);
        let up = ino(&f.u, "up");
        let (w, dw) = open(&f.u, up, libc::O_RDWR, &n);
        assert!(dw);
        f.u.release(w);
        // Passthrough switched off (as after a failed registration): a daemon-mode open that
        // follows direct writes must not let the kernel keep its pages.
        f.u.set_passthrough(false);
        let o = f.u.open_with(up, libc::O_RDONLY, None).expect("open");
        assert!(!o.keep_cache);
        let o2 = f.u.open_with(up, libc::O_RDONLY, None).expect("open");
        assert!(
            o2.keep_cache,
            "only the first daemon open after direct writes"
        );
        f.u.release(o.fh);
        f.u.release(o2.fh);
    }

    /// A commit that could not take a directory's guard (an operation held it past the
    /// timeout) must not put the directory's times back over that operation's change.
    #[test]
    fn a_commit_without_the_guard_keeps_times_only_when_nothing_changed_meanwhile() {
        let f = fixture(true, false);
        {
            let c = f.u.dir_committing(&[ROOT_INO]);
            assert!(c.quiet(), "nothing else ran");
        }
        let op = f.u.dir_changing(&[ROOT_INO]);
        // Same stripe held for reading (here by this thread): times out after 100 ms.
        let t = std::time::Instant::now();
        let c = f.u.dir_committing(&[ROOT_INO]);
        assert!(t.elapsed() >= std::time::Duration::from_millis(90));
        assert!(!c.quiet(), "an operation was in progress");
        drop(c);
        drop(op);
        let c = f.u.dir_committing(&[ROOT_INO, ROOT_INO + 64]);
        assert!(c.quiet(), "the operation ended before this commit began");
    }
}
