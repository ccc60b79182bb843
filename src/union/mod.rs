//! The OverlayFS semantics, FUSE-free: lookup through layers, copy-up, whiteouts, opaque
//! directories, merged readdir, and every namespace operation. The FUSE adapter calls these with
//! plain integers and byte strings and turns [`Error`] into an errno.

pub mod acl;
pub mod charge;
pub mod commit;
pub mod copy_up;
pub mod dir;
pub mod file;
pub mod fileattr;
pub mod idmap;
pub mod inode;
pub mod namei;
pub mod ondisk;
pub mod prefetch;
pub mod readdir;
pub mod reaper;
pub mod xattr;

use std::ffi::{OsStr, OsString};
use std::fmt;
use std::os::fd::{AsFd, OwnedFd};
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::AtomicU64;

use dashmap::DashMap;
use nix::errno::Errno;
use nix::sys::stat::FileStat;

use crate::layer::{self, Layer};
pub use inode::{LayerRef, Node, NodeState, ROOT_INO};

/// An error of the union layer: an errno plus what we were doing.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Error {
    /// The errno to report.
    pub errno: Errno,
    /// What failed.
    pub ctx: &'static str,
}

impl Error {
    /// An error with context.
    pub fn new(errno: Errno, ctx: &'static str) -> Error {
        Error { errno, ctx }
    }
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.ctx, self.errno.desc())
    }
}

impl std::error::Error for Error {}

impl From<Errno> for Error {
    fn from(e: Errno) -> Error {
        Error::new(e, "syscall")
    }
}

impl From<std::io::Error> for Error {
    fn from(e: std::io::Error) -> Error {
        Error::new(Errno::from_raw(e.raw_os_error().unwrap_or(libc::EIO)), "io")
    }
}

/// Attach context to a nix result.
pub trait Ctx<T> {
    /// Tag the error with `ctx`.
    fn ctx(self, ctx: &'static str) -> Result<T>;
}

impl<T> Ctx<T> for std::result::Result<T, Errno> {
    fn ctx(self, ctx: &'static str) -> Result<T> {
        self.map_err(|e| Error::new(e, ctx))
    }
}

/// Result of the union layer.
pub type Result<T> = std::result::Result<T, Error>;

/// Attributes of a merged-view inode (FUSE-free mirror of `struct stat`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Attr {
    /// Stable inode number (= node id).
    pub ino: u64,
    /// FUSE generation of the node id (see `Node::generation`); 0 outside entry replies.
    pub generation: u64,
    /// st_mode (type and permission bits).
    pub mode: u32,
    /// Link count.
    pub nlink: u64,
    /// Owner.
    pub uid: u32,
    /// Group.
    pub gid: u32,
    /// Device number of a device node.
    pub rdev: u64,
    /// Apparent size.
    pub size: u64,
    /// Allocated 512-byte blocks.
    pub blocks: u64,
    /// Preferred I/O size.
    pub blksize: u64,
    /// Access time (sec, nsec).
    pub atime: (i64, i64),
    /// Modification time.
    pub mtime: (i64, i64),
    /// Status change time.
    pub ctime: (i64, i64),
}

impl Attr {
    /// All zero: node id 0 (no object), no mode, no times.
    pub const EMPTY: Attr = Attr {
        ino: 0,
        generation: 0,
        mode: 0,
        nlink: 0,
        uid: 0,
        gid: 0,
        rdev: 0,
        size: 0,
        blocks: 0,
        blksize: 0,
        atime: (0, 0),
        mtime: (0, 0),
        ctime: (0, 0),
    };

    /// From a layer stat, with the merged-view inode number.
    pub fn from_stat(st: &FileStat, ino: u64) -> Attr {
        Attr {
            ino,
            generation: 0,
            mode: st.st_mode,
            nlink: st.st_nlink,
            uid: st.st_uid,
            gid: st.st_gid,
            rdev: st.st_rdev,
            size: st.st_size as u64,
            blocks: st.st_blocks as u64,
            blksize: st.st_blksize as u64,
            atime: (st.st_atime, st.st_atime_nsec),
            mtime: (st.st_mtime, st.st_mtime_nsec),
            ctime: (st.st_ctime, st.st_ctime_nsec),
        }
    }

    /// File type bits.
    pub fn kind(&self) -> u32 {
        self.mode & libc::S_IFMT
    }
}

/// How to build a union.
#[derive(Debug, Clone, Default)]
pub struct Options {
    /// Lower layers, top first.
    pub lowers: Vec<PathBuf>,
    /// Data-only lower layers below them (kernel overlayfs `lowerdir=a::data`): never in the
    /// merged view, only where a metacopy file's absolute redirect leads.
    pub data_lowers: Vec<PathBuf>,
    /// Upper layer (None: read-only union).
    pub upper: Option<PathBuf>,
    /// Work directory (required with an upper).
    pub workdir: Option<PathBuf>,
    /// Use `user.overlay.*` xattrs (kernel `userxattr`).
    pub userxattr: bool,
    /// Honour AUFS `.wh.` whiteouts in lower layers.
    pub aufs_whiteouts: bool,
    /// Refuse to follow the redirects of directories moved by kernel overlayfs (its
    /// `redirect_dir=nofollow`; forced by `userxattr`, as the kernel does): EPERM.
    pub redirect_nofollow: bool,
    /// Move merged and lower directories by writing a redirect (kernel `redirect_dir=on`)
    /// instead of refusing with EXDEV.
    pub redirect_create: bool,
    /// Move merged and lower directories (where no redirect is written) by copying them up
    /// whole, each directory opaque, as fuse-overlayfs does, instead of refusing with EXDEV.
    pub copy_dir_renames: bool,
    /// Follow metacopy files to their data below (kernel `metacopy=on`); off: refuse them
    /// (EPERM), as the kernel does by default.
    pub metacopy: bool,
    /// Project quota settings (limits recorded in the workdir apply even without them).
    pub quota: Option<charge::QuotaConfig>,
    /// uid mapping between disk and view.
    pub uid_map: idmap::IdMap,
    /// gid mapping between disk and view.
    pub gid_map: idmap::IdMap,
    /// Skip every sync (copy-up fsync, fsync, fsyncdir), as fuse-overlayfs' `volatile`.
    pub volatile: bool,
    /// Commit every copy-up before replying (no background commits, `commit.rs`).
    pub sync_commit: bool,
    /// Testing aid: each background commit waits this long first.
    pub commit_delay_ms: u64,
    /// Testing aid: each background release of a removed file waits this long first.
    pub release_delay_ms: u64,
    /// Testing aid: a background commit waits this long between reading its directory's times
    /// and renaming into it, and again before restoring them.
    pub commit_window_ms: u64,
    /// Testing aid: a copy-up made in the request waits this long once its copy is in upper.
    pub copyup_window_ms: u64,
    /// Testing aid: a lookup of this name panics.
    pub panic_name: Option<std::ffi::OsString>,
    /// Page cache settings (None or size 0: file data goes straight to the layer files).
    pub cache: Option<crate::cache::CacheConfig>,
    /// Use FUSE passthrough where it is safe, if the kernel agrees (see [`Union::set_passthrough`]).
    pub passthrough: bool,
    /// Passthrough for read-only opens of lower files of a writable union too
    /// (`passthrough=lower`): the kernel reads them itself, and an open that would change such
    /// a file (copy it up and write) fails with ETXTBSY while they last (after a short wait
    /// for ones just closed; `kio_for_change` in file.rs).
    pub lower_passthrough: bool,
    /// Ask for the kernel's FUSE write-back cache (never kept with a quota).
    pub writeback_cache: bool,
    /// Read directories ahead of a tree walk (`prefetch.rs`).
    pub prefetch: bool,
    /// getxattr of an absent `security.selinux` answers ENODATA even where SELinux is not
    /// enabled (by default it then answers EOPNOTSUPP, see [`Union::getxattr`]).
    pub selinux_enodata: bool,
}

/// The identity of a caller, for ownership of new objects and the set-gid rule of ACLs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Caller {
    /// fsuid
    pub uid: u32,
    /// fsgid
    pub gid: u32,
    /// Thread id (FUSE passes it; 0: unknown), to read supplementary groups and capabilities.
    pub pid: u32,
}

/// Walks of a directory's names `dir_fd` makes again while directory moves keep overlapping
/// them, before it gives up with ESTALE.
const DIR_MOVE_RETRIES: u32 = 1000;

/// How often a getattr looks again when the node's name led to another object (a removal or
/// a rename over it in progress): ten yields, then every 0.1 ms, ~10 ms in all.
const GETATTR_TRIES: u32 = 100;

/// statfs settles recently written files itself up to this many ([`Union::statfs`]).
const STATFS_SETTLE_MAX: usize = 4096;

/// The dir-fd cap for this process: a quarter of its descriptor limit (the rest is for open
/// files, passthrough backing files and the kernel's), at least 64 and at most 65,536.
fn dirfd_cap() -> usize {
    let soft = nix::sys::resource::getrlimit(nix::sys::resource::Resource::RLIMIT_NOFILE)
        .map(|(s, _)| s)
        .unwrap_or(1024);
    (soft / 4).clamp(64, 65_536) as usize
}

impl Union {
    /// Disk ids for view ids (EINVAL when unmapped, as chown(2)).
    pub(crate) fn disk_ids(
        &self,
        uid: Option<u32>,
        gid: Option<u32>,
    ) -> Result<(Option<u32>, Option<u32>)> {
        let map = |m: &idmap::IdMap, v: Option<u32>| -> Result<Option<u32>> {
            match v {
                None => Ok(None),
                Some(v) => m
                    .to_disk(v)
                    .map(Some)
                    .ok_or(Error::new(Errno::EINVAL, "id not mapped")),
            }
        };
        Ok((map(&self.uid_map, uid)?, map(&self.gid_map, gid)?))
    }
}

/// Something the kernel caches that the daemon changed on its own (a background commit that
/// failed), to be forgotten: a name in a directory, or an inode's attributes and pages.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Forget {
    Entry(u64, OsString),
    /// An inode's attributes and cached pages (a directory's listing).
    Inode(u64),
    /// An inode's attributes only.
    Attr(u64),
}

/// Sends [`Forget`]s to the kernel (the FUSE adapter's notifier).
pub type Forgetter = Arc<dyn Fn(&Forget) -> std::io::Result<()> + Send + Sync>;

struct KernelForget(Forgetter);

impl fmt::Debug for KernelForget {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("KernelForget")
    }
}

/// How many of some activity began and ended: tells, without a lock, whether any ran over an
/// interval ([`Activity::idle`] at its start, [`Activity::none_since`] at its end).
#[derive(Debug, Default)]
pub(crate) struct Activity {
    begun: std::sync::atomic::AtomicU64,
    ended: std::sync::atomic::AtomicU64,
}

impl Activity {
    fn begin(&self) {
        self.begun.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
    }

    fn end(&self) {
        self.ended.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
    }

    /// None in progress: every one begun so far has ended. Then the count begun, for
    /// [`Activity::none_since`].
    fn idle(&self) -> Option<u64> {
        use std::sync::atomic::Ordering::SeqCst;
        let begun = self.begun.load(SeqCst);
        (self.ended.load(SeqCst) == begun).then_some(begun)
    }

    /// None began since `idle` answered `begun`.
    fn none_since(&self, begun: u64) -> bool {
        self.begun.load(std::sync::atomic::Ordering::SeqCst) == begun
    }
}

/// The windows in which an upper directory's times are not what the merged view shows: a
/// rename into it (copy-up, commit) has changed them and they are about to be put back. One
/// window at a time; counted, so a stat can tell without taking the lock that no window
/// overlapped it.
#[derive(Debug, Default)]
pub(crate) struct DirTimes {
    lock: parking_lot::Mutex<()>,
    windows: Activity,
}

/// One window of [`DirTimes`], open while this lives.
pub(crate) struct DirTimesWindow<'a> {
    times: &'a DirTimes,
    _lock: parking_lot::MutexGuard<'a, ()>,
}

impl Drop for DirTimesWindow<'_> {
    fn drop(&mut self) {
        self.times.windows.end();
    }
}

impl DirTimes {
    /// Open a window (waits for the one open).
    pub(crate) fn lock(&self) -> DirTimesWindow<'_> {
        let g = self.lock.lock();
        self.windows.begin();
        DirTimesWindow {
            times: self,
            _lock: g,
        }
    }

    /// `stat()` of an upper object, as the merged view shows it: a directory stat that a
    /// window overlapped (it may hold a copy-up's transient times) is made again once that
    /// window is closed. Two atomic loads otherwise.
    pub(crate) fn steady<E>(
        &self,
        stat: impl Fn() -> std::result::Result<FileStat, E>,
    ) -> std::result::Result<FileStat, E> {
        let idle = self.windows.idle();
        let fs = stat()?;
        // All windows begun before are closed, and none began during the stat.
        if fs.st_mode & libc::S_IFMT != libc::S_IFDIR
            || idle.is_some_and(|b| self.windows.none_since(b))
        {
            return Ok(fs);
        }
        let _closed = self.lock.lock();
        stat()
    }
}

/// A union filesystem instance.
#[derive(Debug)]
pub struct Union {
    pub(crate) upper: Option<Layer>,
    pub(crate) lowers: Vec<Layer>,
    /// `workdir/work`: scratch space for atomic creation, on upper's filesystem.
    pub(crate) work: Option<Arc<OwnedFd>>,
    pub(crate) names: ondisk::Names,
    /// Follow `overlay.redirect` of directories (kernel `redirect_dir=follow`).
    pub(crate) follow_redirects: bool,
    /// Write redirects: move merged and lower directories (kernel `redirect_dir=on`).
    pub(crate) create_redirects: bool,
    /// Move merged and lower directories by copying them up whole (`dir_rename=copy`).
    pub(crate) copy_dir_renames: bool,
    /// How many of `lowers` are regular lower layers (the rest, below them, data-only).
    pub(crate) regular_lowers: usize,
    /// Read the data of metacopy files from below (kernel `metacopy=on`); else refuse them.
    pub(crate) follow_metacopy: bool,
    pub(crate) nodes: inode::NodeTable,
    pub(crate) inomap: inode::InoMap,
    /// Layers are not all on one filesystem: inode numbers get a layer tag in the high bits.
    pub(crate) xino: bool,
    pub(crate) tmp_seq: AtomicU64,
    pub(crate) files: DashMap<u64, Arc<file::OpenFile>>,
    /// The handles of `files` by node, so that "is this file open in upper?" (every unlink,
    /// last close, rename over a file) costs a lookup, not a walk through every open file.
    /// Each node's handles by handle id (a map: closing one of many handles of a file costs
    /// O(1), and "is another open in upper?" stops at the first).
    pub(crate) handles_of: DashMap<u64, std::collections::HashMap<u64, Arc<file::OpenFile>>>,
    /// Generations of directory listings (readdir offsets).
    pub(crate) list_seq: AtomicU64,
    /// Directory listings made (each reads the directory in every layer).
    pub(crate) listings_made: AtomicU64,
    /// Times the kernel's cached listing of a directory was dropped because another listing
    /// of it was being read (`readdir.rs`).
    pub(crate) kernel_listing_drops: AtomicU64,
    /// Listings kept by directory nodes, oldest first (node, generation, entries), and their
    /// entries in all (the budget: `readdir.rs`).
    pub(crate) kept_listings: parking_lot::Mutex<readdir::KeptListings>,
    /// Most directory fds nodes may cache (a quarter of the descriptor limit, 64..=65536).
    pub(crate) dirfd_cap: usize,
    /// Nodes that cached directory fds, in the order they did (the dir-fd cache's CLOCK).
    pub(crate) dirfd_queue: parking_lot::Mutex<std::collections::VecDeque<std::sync::Weak<Node>>>,
    pub(crate) dirfd_sweep: parking_lot::Mutex<()>,
    /// Cached directory fds closed to stay under the cap.
    pub(crate) dirfd_evictions: AtomicU64,
    /// Directory renames against name walks (`dir_fd`).
    pub(crate) dir_moves: inode::DirMoves,
    /// Merged directories made upper-only (`dir_rename=copy`) against lookups that read their
    /// marks before (`Found::stamp`, [`Union::node_for`]).
    pub(crate) upper_only_marks: inode::DirMoves,
    pub(crate) fh_seq: AtomicU64,
    pub(crate) quota: Option<Arc<crate::quota::Quota>>,
    pub(crate) uid_map: idmap::IdMap,
    pub(crate) gid_map: idmap::IdMap,
    pub(crate) volatile: bool,
    /// Files written recently whose allocation may still change (quota settling).
    pub(crate) unsettled: DashMap<u64, std::time::Instant>,
    /// Upper directories whose allocation operations are changing now: what was accounted for
    /// each, shared by the operations so that each change is counted once (`charge::DirAlloc`).
    pub(crate) dir_alloc: DashMap<(u64, u64), charge::DirAlloc>,
    /// The page cache for file data.
    pub(crate) cache: Option<Arc<crate::cache::PageCache>>,
    /// `kernel_readahead_kb` as configured (it applies with the page cache off too).
    kernel_ra_configured: u64,
    /// `MAJ:MIN` of our FUSE mount (its bdi), recorded once mounted.
    mount_dev: std::sync::OnceLock<String>,
    /// Held through a shutdown, so a second caller waits for the first to finish.
    shutdown_lock: parking_lot::Mutex<()>,
    /// Free bytes and inodes of upper's filesystem, and when they were read (write-back and
    /// background commit safety margins).
    pub(crate) upper_free: parking_lot::Mutex<Option<file::UpperFree>>,
    /// Passthrough was asked for (and the process may register backing files).
    pub(crate) passthrough_wanted: bool,
    /// The kernel agreed to passthrough at FUSE INIT.
    pub(crate) passthrough: std::sync::atomic::AtomicBool,
    /// Opens answered in passthrough mode, and their fallbacks to the daemon after a failed
    /// registration.
    pub(crate) direct_opens: AtomicU64,
    pub(crate) direct_fallbacks: AtomicU64,
    /// `passthrough=lower` ([`Options::lower_passthrough`]).
    pub(crate) lower_passthrough: bool,
    /// Of those opens, the ones of lower files (`passthrough=lower`); changes that waited for
    /// such opens to close, and the ones refused with ETXTBSY after waiting.
    pub(crate) lower_direct_opens: AtomicU64,
    pub(crate) lower_busy_waits: AtomicU64,
    pub(crate) lower_busy_refusals: AtomicU64,
    /// FUSE over io_uring: serving threads (0: requests come through /dev/fuse only) and the
    /// requests they served. Kept here for `stats`; the transport is the FUSE adapter's.
    pub uring_threads: std::sync::atomic::AtomicUsize,
    pub uring_requests: AtomicU64,
    /// Ring threads the hand-over's watchdog put back to SCHED_OTHER (fuse/watchdog.rs).
    pub uring_rescues: AtomicU64,
    /// getxattr requests answered (`stats`: the kernel asks one before each write(2) unless
    /// FUSE_HANDLE_KILLPRIV_V2 lets it remember that a file has no security.capability).
    pub(crate) getxattr_requests: AtomicU64,
    /// copy_file_range requests copied by upper's filesystem, and their bytes.
    pub(crate) copy_ranges: AtomicU64,
    pub(crate) copy_range_bytes: AtomicU64,
    /// The kernel's FUSE write-back cache is on (asked for, no quota, the kernel agreed): it
    /// reads pages through write-only handles and places appends itself.
    pub(crate) writeback_cache: std::sync::atomic::AtomicBool,
    /// The kernel enforces POSIX ACLs on the mount and leaves the umask to us (FUSE_POSIX_ACL
    /// and FUSE_DONT_MASK agreed at INIT): new objects get their mode and ACLs here (`acl.rs`).
    pub(crate) posix_acl: std::sync::atomic::AtomicBool,
    /// Copy-ups commit before the reply (`copyup_commit=sync`).
    pub(crate) sync_commit: bool,
    /// Tells the kernel to forget cached entries and inodes (FUSE notifications), once the
    /// session is up.
    kernel_forget: std::sync::OnceLock<KernelForget>,
    /// Held from reading an upper directory's times to restoring them around a rename into
    /// it (copy-up, commit), and while a deferred rename sets them: neither undoes the other,
    /// and a stat of a directory never reports the times in between ([`DirTimes::steady`]).
    pub(crate) dir_times: DirTimes,
    /// Testing aid: background commits wait this long first.
    pub(crate) commit_delay: std::time::Duration,
    /// Testing aid: background commits wait this long inside their directory-times window.
    pub(crate) commit_window: std::time::Duration,
    /// Testing aid: a copy-up made in the request waits this long once its copy is in upper.
    pub(crate) copyup_window: std::time::Duration,
    panic_name: Option<std::ffi::OsString>,
    /// FICLONE is worth trying for copy-up (cleared when upper's filesystem lacks it).
    pub(crate) reflink: std::sync::atomic::AtomicBool,
    /// Our pid, for scratch names.
    pid: u32,
    /// Copy-ups whose commit into upper runs in the background (`commit.rs`).
    pub(crate) commits: commit::Commits,
    /// Removed files released by the filesystem in the background (`reaper.rs`).
    pub(crate) reaper: Arc<reaper::Reaper>,
    /// Directory read-ahead for tree walks (`prefetch.rs`).
    pub(crate) prefetch: Arc<prefetch::Prefetcher>,
    /// An absent `security.selinux` is answered EOPNOTSUPP ([`Union::getxattr`]).
    pub(crate) selinux_unsupported: bool,
    /// Name in the work dir of the whiteout that new whiteouts are hard links of (as kernel
    /// overlayfs shares one whiteout inode), once one was made.
    pub(crate) shared_whiteout: parking_lot::Mutex<Option<OsString>>,
    /// Cleared when upper's filesystem refuses to link a whiteout (each gets its own inode).
    pub(crate) whiteout_sharing: std::sync::atomic::AtomicBool,
    /// Directory times guards, striped by directory node (see [`Union::dir_changing`]).
    dir_locks: Box<[DirStripe]>,
    /// Whether upper's filesystem makes whiteouts with RENAME_WHITEOUT (tried once, when a
    /// deferred rename first needs one: `dir.rs` `rename_deferred`).
    pub(crate) rename_whiteout: std::sync::OnceLock<bool>,
}

/// One stripe of the directory times guards: the lock, and how many operations under it
/// started and ended (a commit that went on without the lock tells from them whether an
/// operation changed the directory meanwhile).
#[derive(Debug, Default)]
pub(crate) struct DirStripe {
    lock: parking_lot::RwLock<()>,
    ops: Activity,
}

/// An operation's hold on one stripe ([`Union::dir_changing`]).
pub(crate) struct DirChanging<'a> {
    stripe: &'a DirStripe,
    _guard: parking_lot::RwLockReadGuard<'a, ()>,
}

impl Drop for DirChanging<'_> {
    fn drop(&mut self) {
        self.stripe.ops.end();
    }
}

/// A commit's hold on its directories' stripes ([`Union::dir_committing`]).
pub(crate) struct DirCommitting<'a> {
    _guards: Vec<parking_lot::RwLockWriteGuard<'a, ()>>,
    /// (stripe, operations started) when taken, for those where none was in progress.
    seen: Vec<(&'a DirStripe, u64)>,
    /// Some stripe had an operation in progress when taken (the lock timed out).
    busy: bool,
}

impl DirCommitting<'_> {
    /// No operation changed the directories since this was taken (always so where the lock
    /// was obtained): the commit may put their times back.
    pub(crate) fn quiet(&self) -> bool {
        !self.busy && self.seen.iter().all(|(s, n)| s.ops.none_since(*n))
    }
}

/// Stripes of [`Union::dir_changing`].
const DIR_LOCKS: usize = 64;

impl Union {
    /// Open all layers and set up the root node. The directories must already be validated.
    pub fn new(opts: &Options) -> std::io::Result<Union> {
        Self::new_with_progress(opts, &mut |m| log::info!("{m}"))
    }

    /// Like [`Union::new`], reporting long steps (quotacheck) through `progress`.
    pub fn new_with_progress(
        opts: &Options,
        progress: &mut dyn FnMut(String),
    ) -> std::io::Result<Union> {
        let lowers = opts
            .lowers
            .iter()
            .chain(&opts.data_lowers)
            .map(|p| Layer::open(p))
            .collect::<std::io::Result<Vec<_>>>()?;
        let upper = opts.upper.as_deref().map(Layer::open).transpose()?;
        let mut quota = None;
        let (work, inomap) = match (&upper, &opts.workdir) {
            (Some(_), Some(wd)) => {
                let workdir = Layer::open(wd)?;
                let mkdir = |sub: &str| match nix::sys::stat::mkdirat(
                    workdir.root(),
                    sub,
                    nix::sys::stat::Mode::from_bits_truncate(0o700),
                ) {
                    Ok(()) | Err(Errno::EEXIST) => Ok(()),
                    Err(e) => Err(layer::io_err(e, format!("create {}/{sub}", wd.display()))),
                };
                // Both directories the daemon writes in are checked before anything is made
                // (a mount refused for what is there leaves the workdir as it was): ours,
                // writable by us alone, never a link (anyone else who could write in work/
                // could swap the whiteout or a copy-up's scratch file for a link to a file of
                // theirs, which the daemon then renames into upper).
                for sub in ["unionfs", "work"] {
                    crate::quota::store::check_book_dir(workdir.root(), sub, &wd.join(sub))?;
                }
                // Our bookkeeping first (a planted link there refuses the mount before
                // anything is created): reached through the dir's fd, never through a link.
                mkdir("unionfs")?;
                let book_path = wd.join("unionfs");
                let book =
                    crate::quota::store::open_book_dir(workdir.root(), "unionfs", &book_path)?;
                let state = |name: &'static str| {
                    crate::quota::store::StateFile::new(book.clone(), name, book_path.join(name))
                };
                let inomap = inode::InoMap::open(&state("inomap"))?;
                mkdir("work")?;
                let work =
                    crate::quota::store::open_book_dir(workdir.root(), "work", &wd.join("work"))?;
                // Scratch left by an earlier daemon that did not stop cleanly (a copy-up
                // whose commit was pending, a half-built object): nothing there is in the
                // union's view, and kernel overlayfs empties work/ at mount too.
                let (bytes, n) = copy_up::clean_work(&work);
                if n > 0 {
                    log::warn!(
                        "removed {n} leftover objects ({bytes} bytes) from {}/work",
                        wd.display()
                    );
                }
                if let Some(up) = &upper {
                    quota = charge::open_quota(
                        opts.quota.as_ref(),
                        up,
                        work.as_fd(),
                        state("quota"),
                        progress,
                    )?;
                }
                (Some(work), inomap)
            }
            (Some(_), None) => {
                return Err(std::io::Error::new(
                    std::io::ErrorKind::InvalidInput,
                    "an upper layer needs a workdir",
                ));
            }
            _ => (None, inode::InoMap::memory()),
        };
        layer::sys::probe_xattrat(upper.as_ref().unwrap_or(&lowers[0]).root());
        let mut devs: Vec<u64> = lowers.iter().map(|l| l.dev).collect();
        if let Some(u) = &upper {
            devs.push(u.dev);
        }
        let xino = devs.windows(2).any(|w| w[0] != w[1]);
        let cache = match opts.cache {
            Some(c) if c.size > 0 => Some(crate::cache::PageCache::new(c, quota.clone())?),
            _ => None,
        };
        let u = Union {
            upper,
            lowers,
            work,
            names: ondisk::Names::new(opts.userxattr, opts.aufs_whiteouts),
            follow_redirects: !opts.redirect_nofollow && !opts.userxattr,
            regular_lowers: opts.lowers.len(),
            create_redirects: opts.redirect_create && !opts.redirect_nofollow && !opts.userxattr,
            follow_metacopy: opts.metacopy && !opts.userxattr,
            copy_dir_renames: opts.copy_dir_renames,
            nodes: inode::NodeTable::default(),
            inomap,
            xino,
            tmp_seq: AtomicU64::new(0),
            files: crate::new_map(),
            handles_of: crate::new_map(),
            list_seq: AtomicU64::new(0),
            listings_made: AtomicU64::new(0),
            kept_listings: parking_lot::Mutex::new(Default::default()),
            dirfd_cap: dirfd_cap(),
            dirfd_queue: Default::default(),
            dirfd_sweep: parking_lot::Mutex::new(()),
            dir_moves: Default::default(),
            upper_only_marks: Default::default(),
            kernel_listing_drops: AtomicU64::new(0),
            dirfd_evictions: AtomicU64::new(0),
            fh_seq: AtomicU64::new(1),
            quota,
            uid_map: opts.uid_map.clone(),
            gid_map: opts.gid_map.clone(),
            volatile: opts.volatile,
            unsettled: crate::new_map(),
            dir_alloc: crate::new_map(),
            cache,
            kernel_ra_configured: opts.cache.map_or(0, |c| c.kernel_readahead_kb),
            mount_dev: std::sync::OnceLock::new(),
            shutdown_lock: parking_lot::Mutex::new(()),
            upper_free: parking_lot::Mutex::new(None),
            passthrough_wanted: opts.passthrough,
            passthrough: std::sync::atomic::AtomicBool::new(false),
            direct_opens: AtomicU64::new(0),
            direct_fallbacks: AtomicU64::new(0),
            lower_passthrough: opts.lower_passthrough,
            lower_direct_opens: AtomicU64::new(0),
            lower_busy_waits: AtomicU64::new(0),
            lower_busy_refusals: AtomicU64::new(0),
            uring_threads: Default::default(),
            uring_requests: AtomicU64::new(0),
            uring_rescues: AtomicU64::new(0),
            getxattr_requests: AtomicU64::new(0),
            copy_ranges: AtomicU64::new(0),
            copy_range_bytes: AtomicU64::new(0),
            writeback_cache: std::sync::atomic::AtomicBool::new(false),
            posix_acl: std::sync::atomic::AtomicBool::new(false),
            reflink: std::sync::atomic::AtomicBool::new(true),
            sync_commit: opts.sync_commit,
            kernel_forget: std::sync::OnceLock::new(),
            dir_times: DirTimes::default(),
            commit_delay: std::time::Duration::from_millis(opts.commit_delay_ms),
            commit_window: std::time::Duration::from_millis(opts.commit_window_ms),
            copyup_window: std::time::Duration::from_millis(opts.copyup_window_ms),
            panic_name: opts.panic_name.clone(),
            pid: std::process::id(),
            commits: commit::Commits::default(),
            // Its descriptors count against the limit as cached directory fds do.
            reaper: Arc::new(reaper::Reaper::new(
                std::time::Duration::from_millis(opts.release_delay_ms),
                dirfd_cap(),
            )),
            prefetch: Arc::new({
                let p = prefetch::Prefetcher::new(opts.prefetch);
                // Block reads are counted only for filesystems on block devices (major
                // number 0: NFS, FUSE, 9p, tmpfs... anonymous devices).
                if devs.iter().all(|&d| libc::major(d) != 0) {
                    p
                } else {
                    p.ungated()
                }
            }),
            selinux_unsupported: !opts.selinux_enodata && !xattr::selinux_enabled(),
            shared_whiteout: parking_lot::Mutex::new(None),
            dir_locks: (0..DIR_LOCKS).map(|_| DirStripe::default()).collect(),
            whiteout_sharing: std::sync::atomic::AtomicBool::new(true),
            rename_whiteout: std::sync::OnceLock::new(),
        };
        // With a quota, the kernel would acknowledge writes the quota must refuse.
        u.writeback_cache.store(
            opts.writeback_cache && u.quota.is_none(),
            std::sync::atomic::Ordering::Release,
        );
        if opts.writeback_cache && u.quota.is_some() {
            log::info!("kernel write-back cache stays off: a quota is kept on this mount");
        }
        u.init_root()?;
        Ok(u)
    }

    fn init_root(&self) -> std::io::Result<()> {
        let mut st = NodeState {
            parent: 0,
            name: OsString::new(),
            aliases: Default::default(),
            upper: self.upper.is_some(),
            lower: None,
            lowers: Vec::new(),
            opaque: false,
            redirects: None,
            data: None,
            impure: 0,
            unlinked: false,
        };
        // Where kernel overlayfs left metacopy files in the root, if anywhere.
        let impure = |l: &layer::Layer| {
            self.names
                .dir_marks(l.root(), OsStr::new(""))
                .is_ok_and(|m| m.impure)
        };
        if let Some(u) = &self.upper
            && impure(u)
        {
            st.impure |= inode::impure_bit(LayerRef::Upper);
        }
        // The root merges every lower until one is opaque.
        if !(self.upper.is_some() && self.root_opaque_upper()) {
            for (i, l) in self.lowers[..self.regular_lowers].iter().enumerate() {
                st.lowers.push(i);
                if impure(l) {
                    st.impure |= inode::impure_bit(LayerRef::Lower(i));
                }
                if self
                    .names
                    .is_opaque(l.root(), OsStr::new(""), Some(l.root()))?
                {
                    break;
                }
            }
        }
        self.nodes
            .insert_or_get(Node::new(ROOT_INO, libc::S_IFDIR, st), 1);
        Ok(())
    }

    fn root_opaque_upper(&self) -> bool {
        self.upper.as_ref().is_some_and(|u| {
            matches!(
                self.names.opaque_mark(u.root(), OsStr::new("")),
                Ok(Some(b'y'))
            )
        })
    }

    /// Is this a read-only union (no upper layer)?
    pub fn read_only(&self) -> bool {
        self.upper.is_none()
    }

    /// The layer behind a reference.
    pub(crate) fn layer(&self, r: LayerRef) -> &Layer {
        match r {
            LayerRef::Upper => self
                .upper
                .as_ref()
                .expect("upper layer referenced without one"),
            LayerRef::Lower(i) => &self.lowers[i],
        }
    }

    pub(crate) fn upper_layer(&self) -> Result<&Layer> {
        self.upper
            .as_ref()
            .ok_or(Error::new(Errno::EROFS, "read-only union"))
    }

    pub(crate) fn work_fd(&self) -> Result<std::os::fd::BorrowedFd<'_>> {
        self.work
            .as_ref()
            .map(|w| w.as_fd())
            .ok_or(Error::new(Errno::EROFS, "read-only union"))
    }

    /// The work dir as a shared fd.
    pub(crate) fn work_arc(&self) -> Result<Arc<OwnedFd>> {
        self.work
            .clone()
            .ok_or(Error::new(Errno::EROFS, "read-only union"))
    }

    /// A node by id.
    pub fn node(&self, ino: u64) -> Result<Arc<Node>> {
        self.nodes
            .get(ino)
            .ok_or(Error::new(Errno::ESTALE, "unknown node id"))
    }

    /// The names from the nearest ancestor of `node` that has its directory fd in layer `r`
    /// cached (or from the layer root) down to `node`, and that fd: a directory whose fd was
    /// closed for the cap is opened from its parent's, not by a path from the root (which a
    /// tree deeper than PATH_MAX could not name).
    fn below_cached_ancestor(
        &self,
        node: &Node,
        r: LayerRef,
    ) -> Result<(Option<Arc<OwnedFd>>, Vec<OsString>)> {
        self.layer_path(node, r, true)
    }

    /// The path of directory `node` from the root of lower layer `li`.
    pub(crate) fn lower_path(&self, node: &Node, li: usize) -> Result<Vec<OsString>> {
        Ok(self.layer_path(node, LayerRef::Lower(li), false)?.1)
    }

    /// The path of `node` in layer `r`: from the nearest ancestor whose directory there is
    /// cached (`use_cache`, returned with it), else from the layer's root.
    fn layer_path(
        &self,
        node: &Node,
        r: LayerRef,
        use_cache: bool,
    ) -> Result<(Option<Arc<OwnedFd>>, Vec<OsString>)> {
        let mut comps = Vec::new();
        if node.ino == ROOT_INO {
            return Ok((None, comps));
        }
        let li = match r {
            LayerRef::Lower(li) => Some(li),
            LayerRef::Upper => None,
        };
        // A directory found in a lower layer through a redirect is there under another name
        // or path (kernel overlayfs `redirect_dir`); so are the objects below it.
        let step = |st: &NodeState, comps: &mut Vec<OsString>| -> bool {
            match li.and_then(|li| st.locator(li)) {
                Some(inode::Locator::Path(p)) => {
                    comps.extend(p.iter().rev().cloned());
                    true
                }
                Some(inode::Locator::Name(n)) => {
                    comps.push(n.clone());
                    false
                }
                None => {
                    comps.push(st.name.clone());
                    false
                }
            }
        };
        let mut parent = {
            let st = node.st.lock();
            if step(&st, &mut comps) {
                comps.reverse();
                return Ok((None, comps));
            }
            st.parent
        };
        let mut steps = 0usize;
        while parent != ROOT_INO {
            let p = self.node(parent)?;
            if use_cache && let Some(fd) = p.cached_dirfd(r) {
                comps.reverse();
                return Ok((Some(fd), comps));
            }
            let st = p.st.lock();
            if step(&st, &mut comps) {
                comps.reverse();
                return Ok((None, comps));
            }
            parent = st.parent;
            steps += 1;
            if steps > 1 << 20 || parent == 0 {
                return Err(Error::new(Errno::ELOOP, "node path"));
            }
        }
        comps.reverse();
        Ok((None, comps))
    }

    /// The directory `node` in layer `r`, opened beneath the layer root on first use and cached
    /// in the node.
    pub(crate) fn dir_fd(
        &self,
        node: &Node,
        r: LayerRef,
    ) -> std::result::Result<Arc<OwnedFd>, Errno> {
        if let Some(fd) = node.cached_dirfd(r) {
            return Ok(fd);
        }
        let generation = node.dirgen.load(std::sync::atomic::Ordering::Acquire);
        // The names are walked again if a directory move ran meanwhile: they may have named
        // something else on disk than in the nodes.
        let opened = self.dir_moves.settled(DIR_MOVE_RETRIES, || {
            let (base, rel) = self.below_cached_ancestor(node, r).map_err(|e| e.errno)?;
            match &base {
                Some(b) => self.layer(r).open_dir_below(b.as_fd(), &rel),
                None => self.layer(r).open_dir(&rel),
            }
        });
        // Moves without pause: the kernel looks the name up again on ESTALE.
        let fd = Arc::new(opened.ok_or(Errno::ESTALE)?.map_err(|e| match e {
            // The directory's upper name leads to something else now (a whiteout its removal
            // put there, a file renamed over it): the kernel looks it up again, as after a
            // move (not ENOTDIR for a create in a directory removed meanwhile).
            Errno::ENOTDIR | Errno::ELOOP | Errno::ENXIO if r == LayerRef::Upper => Errno::ESTALE,
            e => e,
        })?);
        let mut c = node.dirfds.lock();
        if node.dirgen.load(std::sync::atomic::Ordering::Acquire) != generation {
            // The node was reset meanwhile: this fd may name the directory it used to be.
            drop(c);
            return Err(Errno::ESTALE);
        }
        if let Some(f) = c.iter().find(|c| c.layer == r) {
            return Ok(f.fd.clone());
        }
        c.push(inode::CachedDir::new(r, fd.clone()));
        let first = c.len() == 1;
        drop(c);
        if first
            && let Some(arc) = self.nodes.get(node.ino)
            && std::ptr::eq(&*arc, node)
            && !node
                .dirfd_queued
                .swap(true, std::sync::atomic::Ordering::AcqRel)
        {
            let mut q = self.dirfd_queue.lock();
            if q.len() > 2 * inode::dirfds_cached() + 1024 {
                // Nodes gone meanwhile: their entries would keep the allocations alive.
                q.retain(|w| w.strong_count() > 0);
            }
            q.push_back(Arc::downgrade(&arc));
        }
        if inode::dirfds_cached() > self.dirfd_cap {
            self.evict_dirfds();
        }
        Ok(fd)
    }

    /// (directory fds cached now, the cap, fds closed to stay under it so far).
    pub fn dirfd_stats(&self) -> (usize, usize, u64) {
        (
            inode::dirfds_cached(),
            self.dirfd_cap,
            self.dirfd_evictions
                .load(std::sync::atomic::Ordering::Relaxed),
        )
    }

    /// Close cached directory fds until an eighth of the cap is free again: the directories
    /// not used since the last sweep, oldest cached first (CLOCK). Without a cap, a tree walk
    /// kept one fd per directory per layer for as long as the kernel held the directory's
    /// inode, and at the descriptor limit every open of the mount failed with EMFILE.
    fn evict_dirfds(&self) {
        let Some(_sweeping) = self.dirfd_sweep.try_lock() else {
            return;
        };
        let target = self.dirfd_cap - self.dirfd_cap / 8;
        let mut closing: Vec<inode::CachedDir> = Vec::new();
        {
            let mut q = self.dirfd_queue.lock();
            let mut budget = 2 * q.len();
            while budget > 0 && inode::dirfds_cached().saturating_sub(closing.len()) > target {
                budget -= 1;
                let Some(w) = q.pop_front() else { break };
                let Some(n) = w.upgrade() else { continue };
                if n.dirfd_used
                    .swap(false, std::sync::atomic::Ordering::Relaxed)
                {
                    q.push_back(w);
                    continue;
                }
                match n.dirfds.try_lock() {
                    Some(mut c) => {
                        closing.extend(c.drain(..));
                        // Out of the queue: its next cached fd queues it again.
                        n.dirfd_queued
                            .store(false, std::sync::atomic::Ordering::Release);
                    }
                    None => q.push_back(w),
                }
            }
        }
        self.dirfd_evictions
            .fetch_add(closing.len() as u64, std::sync::atomic::Ordering::Relaxed);
        drop(closing);
    }

    /// The directory holding `node` in layer `r`, with the node's name there (for the root:
    /// the root dir itself and an empty name).
    pub(crate) fn open_parent_in(
        &self,
        node: &Node,
        r: LayerRef,
    ) -> Result<(Arc<OwnedFd>, OsString)> {
        if r == LayerRef::Upper && node.kind == libc::S_IFREG {
            // A copy whose commit is pending: its stager finds it in the work dir, everyone
            // else waits for its upper name.
            if let Some(tmp) = self.commits.staged_name(node.ino) {
                return Ok((self.work_arc()?, tmp));
            }
            self.commits.wait_node(node.ino);
        }
        let (parent, name) = {
            let st = node.st.lock();
            if st.unlinked && r == LayerRef::Upper {
                // Its last name is gone and may be another file's now: an unlinked file is
                // reached through its open handles only, never by name. (A lower name stays
                // the same file: the lower layers do not change.)
                return Err(Error::new(Errno::ESTALE, "the file was removed"));
            }
            (st.parent, st.name.clone())
        };
        if parent == 0 {
            return Ok((self.dir_fd(node, r).ctx("open root dir")?, OsString::new()));
        }
        let p = self.node(parent)?;
        Ok((self.dir_fd(&p, r).ctx("open parent dir")?, name))
    }

    /// The directory holding the data of metacopy file `node` (`d`, [`inode::DataAt`]) and
    /// its name there.
    pub(crate) fn data_parent(
        &self,
        node: &Node,
        d: &inode::DataAt,
    ) -> Result<(Arc<OwnedFd>, OsString)> {
        let r = LayerRef::Lower(d.layer);
        if let Some(inode::Locator::Path(p)) = &d.at {
            let Some((last, dirs)) = p.split_last() else {
                return Err(Error::new(Errno::EINVAL, "empty data path"));
            };
            let dir = self
                .layer(r)
                .open_dir(dirs)
                .ctx("open the data's directory")?;
            return Ok((Arc::new(dir), last.clone()));
        }
        let (parent, name) = {
            let st = node.st.lock();
            (st.parent, st.name.clone())
        };
        let name = match &d.at {
            Some(inode::Locator::Name(n)) => n.clone(),
            _ => name,
        };
        let p = self.node(parent)?;
        Ok((self.dir_fd(&p, r).ctx("open the data's directory")?, name))
    }

    /// Fresh attributes of a node from its top layer (through an open handle `fh` if the
    /// node was unlinked while open).
    pub fn getattr(&self, ino: u64, fh: Option<u64>) -> Result<Attr> {
        // A removal (a whiteout swapped in) or a rename over the name in progress: the stat by
        // name found another object. Its attributes are not the node's (another type would
        // make the kernel take its inode for a stale one and fail every use of it with EIO):
        // once the change is through, the node is removed and answered for by the object it
        // pins or a handle of it.
        for i in 0..GETATTR_TRIES {
            match self.getattr_once(ino, fh) {
                Err(e) if e.errno == Errno::EAGAIN && i < 10 => std::thread::yield_now(),
                Err(e) if e.errno == Errno::EAGAIN => {
                    std::thread::sleep(std::time::Duration::from_micros(100))
                }
                r => return r,
            }
        }
        Err(Error::new(
            Errno::ENOENT,
            "getattr: the name leads to another object",
        ))
    }

    fn getattr_once(&self, ino: u64, fh: Option<u64>) -> Result<Attr> {
        let node = self.node(ino)?;
        // (A directory a deferred rename moves a file from or into has its new times
        // already: rename_deferred sets them.)
        let (unlinked, top) = {
            let st = node.st.lock();
            (st.unlinked, st.top())
        };
        // An unlinked but open file is reached through one of its handles open on upper's
        // object; else (removed, held for the kernel: an O_PATH fd of a process, a cwd, a
        // handle opened on the lower file before a copy-up) the object the daemon pins; else
        // a handle on the lower file, for a file removed before any copy-up. (Review: a
        // lower handle came first, and a copied-up file removed while a reader opened before
        // its copy-up held it showed the lower file's size: the kernel cut its pages to it.)
        let upper_handle = unlinked.then(|| self.upper_handle_of(ino, fh)).flatten();
        let pinned = (upper_handle.is_none() && unlinked)
            .then(|| {
                let pin = node.pin.lock();
                pin.as_ref()?.fd().map(nix::sys::stat::fstat)
            })
            .flatten();
        let handle = upper_handle.or_else(|| {
            (unlinked && pinned.is_none())
                .then(|| self.handles_on(ino).into_iter().next())
                .flatten()
        });
        let fs = match (handle, pinned) {
            (Some(f), _) => nix::sys::stat::fstat(f.fd.as_fd()).ctx("fstat")?,
            (None, Some(st)) => st.ctx("fstat")?,
            (None, None) if top == LayerRef::Upper && node.is_dir() => {
                self.dir_times.steady(|| {
                    self.read_in(&node, top, |dir, name| {
                        layer::stat_at(dir, name).ctx("stat")
                    })
                })?
            }
            (None, None) => self
                .read_in(&node, top, |dir, name| {
                    layer::stat_at(dir, name).ctx("stat")
                })
                .map_err(|e| match e.errno {
                    // Marked removed since we looked: answered from what it holds next time.
                    Errno::ESTALE if !unlinked && top == LayerRef::Upper => {
                        Error::new(Errno::EAGAIN, "getattr: removed meanwhile")
                    }
                    _ => e,
                })?,
        };
        let st = node.st.lock();
        if !unlinked
            && ino != inode::ROOT_INO
            && top == LayerRef::Upper
            && (fs.st_mode & libc::S_IFMT != node.kind
                || !self.is_nodes_object(&node, top, &fs, &st))
        {
            return Err(Error::new(
                Errno::EAGAIN,
                "getattr: another object under the name",
            ));
        }
        Ok(self.attr_for(&node, &st, &fs))
    }

    /// Is `fs`, found in layer `r` under the name of `node` (state `st`), the node's object?
    /// Its number is the node's, or it is the node's upper object itself (a node given a number
    /// of its own because the inode map's gave another's: `Union::node_for`).
    pub(crate) fn is_nodes_object(
        &self,
        node: &Node,
        r: LayerRef,
        fs: &FileStat,
        st: &NodeState,
    ) -> bool {
        let computed = self.node_ino(r, fs, st.parent, &st.name);
        computed == node.ino
            || (r == LayerRef::Upper
                && node.ino == self.own_number_of(fs.st_ino)
                && node.upper_obj.load(std::sync::atomic::Ordering::Acquire) == fs.st_ino)
    }

    /// Merged-view attributes from the top object's stat.
    pub(crate) fn attr_for(&self, node: &Node, st: &NodeState, fs: &FileStat) -> Attr {
        let mut a = Attr::from_stat(fs, node.ino);
        a.generation = node.generation.load(std::sync::atomic::Ordering::Acquire);
        if node.kind == libc::S_IFREG
            && let Some((size, mtime, dirty)) =
                self.cache.as_ref().and_then(|c| c.attr_override(node.ino))
        {
            // Written data not yet on disk: its size and time are already the file's, and its
            // pages count as blocks (as a filesystem's delayed allocation counts its reserved
            // ones), at most as many as the whole size takes. (Before: the whole size's
            // blocks, for good — a sparse file written through the mount showed as full.)
            a.size = size;
            a.blocks = (a.blocks + dirty * 8).min(a.blocks.max(size.div_ceil(4096) * 8));
            a.mtime = mtime;
            a.ctime = a.ctime.max(mtime);
        }
        if let Some(d) = &st.data {
            // A metacopy file holds no data of its own: the blocks are its data's, as the
            // kernel shows them.
            a.blocks = d.blocks as u64;
        }
        a.uid = self.uid_map.to_view(a.uid);
        a.gid = self.gid_map.to_view(a.gid);
        if node.is_dir() && Self::is_merge_dir(st) {
            // As the kernel: counting subdirectories across layers is not worth it.
            a.nlink = 1;
        }
        a
    }

    /// Kernel OVL_TYPE_MERGE for a directory.
    pub(crate) fn is_merge_dir(st: &NodeState) -> bool {
        (st.upper && !st.lowers.is_empty()) || st.lowers.len() > 1
    }

    /// The merged-view inode number for a real object.
    pub(crate) fn ino_for(&self, r: LayerRef, fs: &FileStat) -> u64 {
        self.ino_for_real(r, fs.st_ino)
    }

    /// [`Union::ino_for`] of the object with inode number `real` in layer `r` (a listing's
    /// d_ino, which must be the st_ino a stat of the name gives).
    pub(crate) fn ino_for_real(&self, r: LayerRef, real: u64) -> u64 {
        let base = match r {
            LayerRef::Upper => self.inomap.get(real).unwrap_or(real),
            LayerRef::Lower(_) => real,
        };
        if !self.xino || (r == LayerRef::Upper && base != real) {
            // Same filesystem everywhere (or an origin already tagged): real numbers are unique.
            return if base == ROOT_INO { u64::MAX - 1 } else { base };
        }
        let tag = match r {
            LayerRef::Upper => 0u64,
            LayerRef::Lower(i) => i as u64 + 1,
        };
        let v = (base & ((1u64 << 56) - 1)) | (tag << 56);
        if v == ROOT_INO { u64::MAX - 1 } else { v }
    }

    /// Install what tells the kernel to forget (once the FUSE session exists).
    pub fn set_forgetter(&self, f: Forgetter) {
        let _ = self.kernel_forget.set(KernelForget(f));
    }

    /// Have the kernel forget `what` now, in this thread (an inode's attributes and pages:
    /// that waits for no lock a request may hold, unlike a name).
    pub(crate) fn kernel_forget_now(&self, what: &Forget) {
        if let Some(KernelForget(f)) = self.kernel_forget.get()
            && let Err(e) = f(what)
            && e.raw_os_error() != Some(libc::ENOENT)
        {
            log::warn!("kernel cache invalidation of {what:?}: {e}");
        }
    }

    /// Have the kernel forget `what`, from a thread of its own: a notification about a
    /// directory waits for the kernel's lock of it, which a request waiting for us may hold.
    pub(crate) fn kernel_forget(&self, what: Vec<Forget>) {
        let Some(KernelForget(f)) = self.kernel_forget.get() else {
            return;
        };
        let f = f.clone();
        let spawned = std::thread::Builder::new()
            .name("forget".into())
            .spawn(move || {
                for w in &what {
                    if let Err(e) = f(w) {
                        log::warn!("kernel cache invalidation of {w:?}: {e}");
                    }
                }
            });
        if let Err(e) = spawned {
            log::warn!("kernel cache invalidation: no thread ({e})");
        }
    }

    /// A fresh scratch name in the work directory.
    pub(crate) fn tmp_name(&self) -> OsString {
        let n = self
            .tmp_seq
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        OsString::from(format!("#{:x}.{n}", self.pid))
    }

    /// Number of live nodes (for stats and tests).
    pub fn node_count(&self) -> usize {
        self.nodes.len()
    }

    /// Number of open file handles.
    pub fn open_file_count(&self) -> usize {
        self.files.len()
    }

    /// Drop kernel references.
    pub fn forget(&self, ino: u64, n: u64) {
        // With a quota, a file whose allocation may still change (dirty pages in the cache,
        // or written recently: the filesystem allocates at its own write-back) keeps its node,
        // which holds what is accounted for it, until that is settled (settle_allocations).
        let forgotten = self.nodes.forget_unless(ino, n, |node| {
            self.quota.is_some()
                && !node.is_dir()
                && (self.unsettled.contains_key(&node.ino)
                    || self.cache.as_ref().is_some_and(|c| c.is_dirty(node.ino)))
        });
        if let Some(node) = forgotten {
            self.unpin_forgotten(&node);
        }
    }

    /// Hold the removed object of `node` ([`inode::Pin`]) while the kernel holds the node;
    /// otherwise (or past the cap) hand it to the reaper.
    /// With `drop_pages`, the removed file's cached pages go: right here (before the object
    /// is let go of, whose inode number a new file may get at once) unless it is pinned;
    /// pinned, they stay (dirty ones too) for an open of it by the kernel
    /// ([`Union::reopen_pinned`]) until the kernel forgets it ([`Union::unpin_forgotten`]).
    pub(crate) fn pin_removed(&self, node: &Node, hold: Option<(OwnedFd, u64)>, drop_pages: bool) {
        let pinned = hold.is_some() && self.may_pin(node);
        if drop_pages {
            self.removed_file_pages(node.ino, pinned);
        }
        let hold = match hold {
            Some(h) if pinned => h,
            // Not held for the kernel: to the reaper (or closed).
            other => return self.release_later(other),
        };
        let old = node.pin.lock().replace(inode::Pin::new(hold));
        if let Some(p) = old {
            self.release_later(p.into_hold());
        }
        // Forgotten meanwhile: nobody would unpin it.
        if node.nlookup.load(std::sync::atomic::Ordering::Acquire) == 0 {
            self.unpin_forgotten(node);
        }
    }

    /// The cached pages of file `ino`, whose last name is gone: kept if the removed file is
    /// pinned for the kernel (only what the quota reserved for them goes: the file is freed),
    /// dropped, dirty ones too, if not.
    pub(crate) fn removed_file_pages(&self, ino: u64, pinned: bool) {
        match &self.cache {
            Some(c) if pinned => c.uncharge(ino),
            Some(c) => c.drop_file(ino),
            None => {}
        }
    }

    /// The kernel forgot `node`: let go of the removed object it pinned, and of that file's
    /// cached pages unless a handle of it is still open (its last close drops them).
    pub(crate) fn unpin_forgotten(&self, node: &Node) {
        let pin = node.pin.lock().take();
        let Some(p) = pin else {
            return;
        };
        if let Some(c) = &self.cache
            && !node.is_dir()
            && node.st.lock().unlinked
            && self.upper_handle_of(node.ino, None).is_none()
        {
            c.drop_file(node.ino);
        }
        self.release_later(p.into_hold());
    }

    /// The removed object `node` pins, opened again with `flags` (an open for reading of a
    /// file the kernel still holds under a name that was just replaced: what the kernel does
    /// for an unlinked inode it holds). Through `/proc/self/fd`, the one way to reopen an
    /// `O_PATH` descriptor; it names our own descriptor, never a path in a layer. None when
    /// nothing is pinned or that fails (no /proc).
    pub(crate) fn reopen_pinned(&self, node: &Node, flags: nix::fcntl::OFlag) -> Option<OwnedFd> {
        use nix::fcntl::OFlag;
        use std::os::fd::AsRawFd;
        let pin = node.pin.lock();
        let fd = pin.as_ref()?.fd()?;
        let path = format!("/proc/self/fd/{}", fd.as_raw_fd());
        // (No O_NOFOLLOW: the descriptor's link is what is followed.)
        let flags = (flags - OFlag::O_NOFOLLOW - OFlag::O_CREAT - OFlag::O_TRUNC)
            | OFlag::O_CLOEXEC
            | OFlag::O_NOCTTY;
        let open = |f| nix::fcntl::open(path.as_str(), f, nix::sys::stat::Mode::empty());
        open(flags)
            .or_else(|e| match e {
                Errno::EPERM if flags.contains(OFlag::O_NOATIME) => open(flags - OFlag::O_NOATIME),
                e => Err(e),
            })
            .ok()
    }

    /// Let go of the removed object `node` held (the node names another object now; its
    /// pages were dropped when that object was made).
    pub(crate) fn unpin(&self, node: &Node) {
        let pin = node.pin.lock().take();
        if let Some(p) = pin {
            self.release_later(p.into_hold());
        }
    }

    /// May one more removed object be pinned? (Pins count against the descriptor limit like
    /// cached directory fds; past the cap a removed object is not held.) With a quota the
    /// object is accounted freed with its last name all the same (unless a file of it is
    /// open), as when the reaper holds it: what a pin holds back is upper's space, not the
    /// project's, and never a file's data near a full upper (`stat_holding`).
    pub(crate) fn may_pin(&self, node: &Node) -> bool {
        node.nlookup.load(std::sync::atomic::Ordering::Acquire) > 0
            && inode::pinned() < self.dirfd_cap
    }

    /// statfs of the upper filesystem (or the top lower for a read-only union); with a quota,
    /// sizes and inode counts show the limit, as XFS does inside a project directory.
    pub fn statfs(&self) -> Result<libc::statfs> {
        let l = self.upper.as_ref().unwrap_or(&self.lowers[0]);
        // Space of removed files shows as free once the filesystem has it back.
        self.reaper.flush();
        let mut s = layer::sys::statfs(l.root()).ctx("statfs")?;
        // What files allocate after their writes returned (write-back) is settled here, a
        // stat each, unless that is many files (an untar of 100k files would make every `df`
        // for a minute cost 100k stats): then the running figures, which every write keeps
        // exact as of its return, stand, and the background settle (every 5 s) catches up.
        if self.unsettled.len() <= STATFS_SETTLE_MAX {
            self.settle_allocations();
        }
        if let Some(q) = &self.quota {
            let (b, bf, ba, f, ff) = q.statfs(&s);
            s.f_blocks = b;
            s.f_bfree = bf;
            s.f_bavail = ba;
            s.f_files = f;
            s.f_ffree = ff;
        }
        Ok(s)
    }

    /// Record the device of our FUSE mount at `merged` (right after mounting, before anything
    /// else can be mounted over it).
    /// The mount's device (`MAJ:MIN` from mountinfo), once noted.
    pub fn mount_device(&self) -> Option<&str> {
        self.mount_dev.get().map(String::as_str)
    }

    pub fn note_mount_device(&self, merged: &std::path::Path) {
        if let Some(dev) = crate::cache::kernel_ra::mount_dev(merged) {
            let _ = self.mount_dev.set(dev);
        }
    }

    /// Set the kernel's readahead on our mount (see `cache::kernel_ra`); returns the value in
    /// effect.
    pub fn apply_kernel_readahead(&self) -> std::result::Result<u64, String> {
        let dev = self
            .mount_dev
            .get()
            .ok_or("the mount's device was not found in mountinfo")?;
        let configured = self.cache.as_ref().map_or_else(
            || self.kernel_ra_configured,
            |c| c.config().kernel_readahead_kb,
        );
        let devs: Vec<u64> = self
            .upper
            .iter()
            .chain(self.lowers.iter())
            .map(|l| l.dev)
            .collect();
        let kb = crate::cache::kernel_ra::apply(dev, &devs, configured)?;
        if let Some(c) = &self.cache {
            c.set_kernel_readahead_kb(kb);
        }
        Ok(kb)
    }

    /// Held (shared) by a namespace operation while it changes the upper directories `dirs`
    /// (node ids), and so their times. A background commit renaming into a directory holds
    /// it exclusively from reading the directory's times to restoring them
    /// ([`Union::dir_committing`]), so that it cannot undo the change of an operation that ran
    /// in between (the kernel holds the directory's lock around its own copy-up the same way).
    /// Taken after any wait for a commit, never around one. Recursive: a nested operation in
    /// the same thread (a copy-up inside a rename) cannot deadlock behind a waiting commit.
    pub(crate) fn dir_changing(&self, dirs: &[u64]) -> Vec<DirChanging<'_>> {
        self.dir_stripes(dirs)
            .into_iter()
            .map(|i| {
                let stripe = &self.dir_locks[i];
                let guard = stripe.lock.read_recursive();
                stripe.ops.begin();
                DirChanging {
                    stripe,
                    _guard: guard,
                }
            })
            .collect()
    }

    /// Directory `dir` changed by no namespace operation through us while held (they hold
    /// [`Union::dir_changing`] shared; so do other directories of its stripe, briefly). Not
    /// recursive: take it holding no stripe, and call nothing that takes one under it.
    pub(crate) fn dir_exclusive(&self, dir: u64) -> parking_lot::RwLockWriteGuard<'_, ()> {
        self.dir_locks[(dir as usize) % DIR_LOCKS].lock.write()
    }

    /// Held by a background commit from reading the times of directories `dirs` to restoring
    /// them (see [`Union::dir_changing`]). Waits at most 100 ms for each (operations hold it
    /// for a few syscalls; a commit made in an operation's own thread, when the committer is
    /// gone at shutdown, would otherwise wait for itself), then goes on without it; the times
    /// are then put back only if no operation changed the directories meanwhile
    /// ([`DirCommitting::quiet`]).
    pub(crate) fn dir_committing(&self, dirs: &[u64]) -> DirCommitting<'_> {
        let mut c = DirCommitting {
            _guards: Vec::new(),
            seen: Vec::new(),
            busy: false,
        };
        for i in self.dir_stripes(dirs) {
            let stripe = &self.dir_locks[i];
            match stripe
                .lock
                .try_write_for(std::time::Duration::from_millis(100))
            {
                Some(g) => c._guards.push(g),
                None => log::debug!("commit: directory guard busy"),
            }
            match stripe.ops.idle() {
                Some(begun) => c.seen.push((stripe, begun)),
                None => c.busy = true,
            }
        }
        c
    }

    /// A stamp of directory `ino`'s changes (through us) before reading it; `None` while one
    /// is in progress. [`Union::dir_unchanged`] tells whether one began since.
    pub(crate) fn dir_stamp(&self, ino: u64) -> Option<u64> {
        self.dir_locks[(ino as usize) % DIR_LOCKS].ops.idle()
    }

    /// No change of directory `ino` (or of another in its stripe) began since `stamp`.
    pub(crate) fn dir_unchanged(&self, ino: u64, stamp: Option<u64>) -> bool {
        stamp.is_some_and(|b| self.dir_locks[(ino as usize) % DIR_LOCKS].ops.none_since(b))
    }

    /// Distinct stripes of `dirs`, in order (one lock order for every taker).
    fn dir_stripes(&self, dirs: &[u64]) -> Vec<usize> {
        let mut v: Vec<usize> = dirs.iter().map(|d| (*d as usize) % DIR_LOCKS).collect();
        v.sort_unstable();
        v.dedup();
        v
    }

    /// May the release of a removed file wait for the reaper? Not near a full upper.
    pub(crate) fn release_in_background(&self) -> bool {
        self.upper_free().is_some_and(|f| f >= reaper::MIN_FREE)
    }

    /// Removed files released in the background, released by their request because the
    /// reaper was full, and (files, bytes) waiting now.
    pub fn release_stats(&self) -> (u64, u64, (usize, u64)) {
        use std::sync::atomic::Ordering::Relaxed;
        let r = &self.reaper;
        (
            r.released.load(Relaxed),
            r.overflowed.load(Relaxed),
            r.pending(),
        )
    }

    /// Directories queued and read ahead for walks, entries stat'd, directories dropped (queue
    /// full), directories skipped (layers cached), and directories waiting now.
    pub fn prefetch_stats(&self) -> (u64, u64, u64, u64, u64, usize) {
        use std::sync::atomic::Ordering::Relaxed;
        let p = &self.prefetch;
        (
            p.queued.load(Relaxed),
            p.dirs.load(Relaxed),
            p.entries.load(Relaxed),
            p.dropped.load(Relaxed),
            p.skipped.load(Relaxed),
            p.pending(),
        )
    }

    /// The page cache, if the mount has one.
    pub fn cache(&self) -> Option<&Arc<crate::cache::PageCache>> {
        self.cache.as_ref()
    }

    /// Let the page cache's flusher settle quota through this union (call once the union
    /// is shared).
    pub fn attach(self: &Arc<Self>) {
        let _ = self.commits.owner.set(Arc::downgrade(self));
        if let Some(c) = &self.cache {
            let w: std::sync::Weak<dyn crate::cache::WritebackSink> =
                Arc::downgrade(self) as std::sync::Weak<Union>;
            c.set_sink(w);
        }
    }

    /// Clean shutdown: write all cached data and sync upper, then record exact quota usage
    /// so the next mount need not rescan. Later writes go straight through to the files. A
    /// second caller waits for the first to finish.
    pub fn shutdown(&self) {
        let _once = self.shutdown_lock.lock();
        let pending = self.commits.pending_count();
        if pending > 0 {
            log::info!("waiting for {pending} copy-up commits");
        }
        self.commits.drain();
        self.reaper.stop();
        self.prefetch.stop();
        // The shared whiteout's name in the work dir (its links in upper stay whiteouts).
        if let (Some(name), Ok(work)) = (self.shared_whiteout.lock().take(), self.work_fd()) {
            let freed = copy_up::remove_tmp(work, &name, false);
            self.account(-freed.0, -freed.1);
        }
        let mut lost = false;
        if let Some(c) = &self.cache {
            let dirty = c.dirty_bytes();
            if dirty > 0 {
                log::info!("writing {dirty} bytes of cached data to upper");
            }
            if let Err(e) = c.close() {
                log::error!(
                    "write-back at shutdown failed ({e}): {} bytes of written data could not be stored",
                    c.dirty_bytes()
                );
                // Their charge is still in the usage: not a figure to keep as exact.
                lost = true;
            }
        }
        if let (Some(up), false) = (&self.upper, self.volatile)
            && let Err(e) = nix::unistd::syncfs(up.root())
        {
            log::warn!("syncfs of upper: {e}");
        }
        self.settle_allocations();
        if let Some(q) = &self.quota {
            if lost {
                log::warn!("quota: usage recorded as not exact; the next mount recomputes it");
            }
            q.persist(!lost);
        }
    }
}

impl crate::cache::WritebackSink for Union {
    fn written(&self, ino: u64, fd: std::os::fd::BorrowedFd<'_>, released: u64) {
        if self.quota.is_none() {
            return;
        }
        // An unlinked file still open counts too (until its last close releases it); one
        // accounted freed with its last name (pinned for the kernel, its pages kept) not.
        let node = self
            .nodes
            .get(ino)
            .filter(|n| !n.freed.load(std::sync::atomic::Ordering::Acquire));
        let Some(node) = node else {
            self.account(-(released as i64), 0);
            return;
        };
        // The stat under the allocation lock: a settle holding it does not see these pages'
        // blocks before their charge is handed back (`PageCache::charge_token`).
        let mut known = node.io_lock.lock();
        match nix::sys::stat::fstat(fd) {
            Ok(st) => self.sync_known_less(&mut known, &st, released),
            Err(_) => self.account(-(released as i64), 0),
        }
        drop(known);
        // The filesystem may still allocate for what was just written (ext4 places delayed
        // blocks, and an extent tree block, at its own write-back): settle again after the
        // next sync and for a while.
        self.mark_unsettled(ino);
    }
}
