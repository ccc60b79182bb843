//! Where the union meets the project quota: setting it up at mount (recorded limits, clean
//! state or quotacheck), reservations taken before the filesystem is asked for space, and
//! releases when objects go away. Every change to upper's allocation passes through here.

use std::os::fd::{AsFd, BorrowedFd};
use std::sync::Arc;

use nix::errno::Errno;
use nix::sys::stat::FileStat;

use super::{Error, Result, Union};
use crate::quota::{Limits, Quota, scan, store};

/// Quota settings of a mount request.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct QuotaConfig {
    /// Limits given on the command line (None: keep what the workdir recorded, if anything).
    pub limits: Option<Limits>,
    /// Refuse with EDQUOT instead of ENOSPC.
    pub edquot: bool,
}

/// Allocated bytes of a stat.
pub(crate) fn alloc(st: &FileStat) -> i64 {
    st.st_blocks * 512
}

/// Set up the quota of a writable union: limits from the command line or the workdir's record,
/// usage from a clean record or a fresh scan of upper + workdir/work.
pub(crate) fn open_quota(
    cfg: Option<&QuotaConfig>,
    upper: &crate::layer::Layer,
    work: BorrowedFd<'_>,
    state: store::StateFile,
    progress: &mut dyn FnMut(String),
) -> std::io::Result<Option<Arc<Quota>>> {
    // A state file we cannot read is neither trusted nor fatal: it is kept aside (for a
    // person: limits set live with `quota limit` were only there), the usage is recomputed,
    // and the limits are the mount's options'.
    let recorded = match store::load(&state) {
        Err(e) if e.kind() == std::io::ErrorKind::InvalidData => {
            let kept = match state.set_aside("damaged") {
                Ok(p) => format!("kept as {}", p.display()),
                Err(e2) => format!("could not be kept aside: {e2}"),
            };
            let given = cfg.and_then(|c| c.limits).is_some();
            let msg = format!(
                "quota: ignoring a damaged state file ({e}; {kept}); usage is recomputed, and {}",
                if given {
                    "the limits are the mount options'"
                } else {
                    "no limits are given by the mount options: this mount has NO quota"
                }
            );
            progress(msg.clone());
            log::warn!("{msg}");
            None
        }
        r => r?,
    };
    let limits = match (cfg.and_then(|c| c.limits), &recorded) {
        (Some(l), Some(r)) if r.limits != l => {
            progress("quota: limits changed from the recorded ones by the mount options".into());
            l
        }
        (Some(l), _) => l,
        (None, Some(r)) => {
            progress(format!(
                "quota: keeping the limits recorded in the workdir (project {}, bhard {}, bsoft {}, ihard {}, isoft {})",
                r.limits.project_id, r.limits.bhard, r.limits.bsoft, r.limits.ihard, r.limits.isoft
            ));
            r.limits
        }
        (None, None) => return Ok(None),
    };
    limits
        .validate()
        .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidInput, e))?;
    let errno = match (cfg.map(|c| c.edquot), &recorded) {
        (Some(true), _) => Errno::EDQUOT,
        (Some(false), Some(r)) if cfg.and_then(|c| c.limits).is_none() => r.errno,
        (None, Some(r)) => r.errno,
        _ => Errno::ENOSPC,
    };
    let (bytes, inodes, timers) = match &recorded {
        Some(r) if r.clean => (r.used_bytes, r.used_inodes, r.timers),
        _ => {
            if recorded.is_some() {
                progress(
                    "quota: the last mount did not stop cleanly; recomputing usage (quotacheck)"
                        .into(),
                );
            }
            let t = quotacheck(upper, work, progress)?;
            (t.0, t.1, recorded.map(|r| r.timers).unwrap_or((None, None)))
        }
    };
    let q = Quota::new(limits, bytes, inodes, timers, errno, Some(state.clone()));
    // Mark the record dirty while mounted: a crash means the next mount rescans.
    let r = q.report();
    store::save_state(
        &state,
        &store::State {
            limits,
            used_bytes: bytes,
            used_inodes: inodes,
            timers: (r.btimer, r.itimer),
            clean: false,
            errno,
        },
        Some(errno),
    )?;
    Ok(Some(Arc::new(q)))
}

/// Scan upper and workdir/work; returns (bytes, inodes).
pub fn quotacheck(
    upper: &crate::layer::Layer,
    work: BorrowedFd<'_>,
    progress: &mut dyn FnMut(String),
) -> std::io::Result<(u64, u64)> {
    let mut t = scan::Totals::default();
    let started = std::time::Instant::now();
    let mut report = |n: u64| {
        progress(format!(
            "quotacheck: {n} inodes scanned ({:.1}s)",
            started.elapsed().as_secs_f64()
        ))
    };
    let up = upper
        .open_dir(&[])
        .map_err(|e| crate::layer::io_err(e, "quotacheck: open upper"))?;
    scan::scan_dir(&up, &mut t, &mut report)
        .map_err(|e| crate::layer::io_err(e, "quotacheck: scan upper"))?;
    let w = nix::unistd::dup(work).map_err(|e| crate::layer::io_err(e, "dup"))?;
    scan::scan_dir(&w, &mut t, &mut report)
        .map_err(|e| crate::layer::io_err(e, "quotacheck: scan workdir"))?;
    if t.inodes >= 10_000 {
        progress(format!(
            "quotacheck: done, {} inodes, {} bytes",
            t.inodes, t.bytes
        ));
    }
    Ok((t.bytes, t.inodes))
}

/// Space and inodes held for an operation until it knows what it really used. Dropped without
/// [`Reservation::settle`], it gives everything back (the operation failed).
#[derive(Debug)]
pub(crate) struct Reservation<'a> {
    q: Option<&'a Quota>,
    bytes: i64,
    inodes: i64,
}

impl Reservation<'_> {
    /// Settle with what was really allocated (bytes, inodes).
    pub(crate) fn settle(mut self, bytes: i64, inodes: i64) {
        if let Some(q) = self.q {
            q.adjust_bytes(bytes - self.bytes);
            q.adjust_inodes(inodes - self.inodes);
        }
        self.q = None;
    }
}

impl Drop for Reservation<'_> {
    fn drop(&mut self) {
        if let Some(q) = self.q {
            q.adjust_bytes(-self.bytes);
            q.adjust_inodes(-self.inodes);
        }
    }
}

impl Union {
    /// The mount's quota, if any.
    pub fn quota(&self) -> Option<&Arc<Quota>> {
        self.quota.as_ref()
    }

    /// Reserve `inodes` and `bytes` before creating something in upper.
    pub(crate) fn reserve(&self, inodes: u64, bytes: u64) -> Result<Reservation<'_>> {
        let Some(q) = self.quota.as_deref() else {
            return Ok(Reservation {
                q: None,
                bytes: 0,
                inodes: 0,
            });
        };
        q.reserve_inodes(inodes)
            .map_err(|e| Error::new(e, "quota: inode limit"))?;
        if let Err(e) = q.reserve_bytes(bytes) {
            q.adjust_inodes(-(inodes as i64));
            return Err(Error::new(e, "quota: block limit"));
        }
        Ok(Reservation {
            q: Some(q),
            bytes: bytes as i64,
            inodes: inodes as i64,
        })
    }

    /// Account a change that needs no permission (releases, whiteouts, reconciliation).
    pub(crate) fn account(&self, bytes: i64, inodes: i64) {
        if let Some(q) = &self.quota {
            q.adjust_bytes(bytes);
            q.adjust_inodes(inodes);
        }
    }

    /// An upper object with stat `st` lost one name: if that was its last, its space and inode
    /// are freed — unless it is still open, in which case the last close frees them.
    pub(crate) fn account_unlinked(&self, st: &FileStat, still_open: bool) {
        let last = st.st_nlink <= 1 || st.st_mode & libc::S_IFMT == libc::S_IFDIR;
        if self.quota.is_some() && last && !still_open {
            self.account(-alloc(st), -1);
        }
    }

    /// Run `op`, a change by name of upper directory `name` in `dir` that may allocate or
    /// free a block for its xattrs (an opaque mark or a redirect set by a rename), and
    /// account the change as [`Union::with_realloc_of`] does for a directory. (Unaccounted, a
    /// mark that took the directory's xattrs past the inode's own space was a block never
    /// charged: a stress run with user xattrs on directories under renames found blocks
    /// missing from the usage.)
    pub(crate) fn realloc_dir_at<T>(
        &self,
        dir: BorrowedFd<'_>,
        name: &std::ffi::OsStr,
        op: impl FnOnce() -> Result<T>,
    ) -> Result<T> {
        if self.quota.is_none() {
            return op();
        }
        let Some(fd) = open_dir_path(dir, name) else {
            return op();
        };
        let turn = DirTurn::begin(self, &[fd.as_fd()]);
        let r = op();
        self.account(turn.end(), 0);
        r
    }

    /// Run a namespace operation that adds entries to the directories `dirs`, and settle with
    /// how much they really grew. A creation (`reserve`) first reserves a block per directory (a
    /// directory may need one more block for the new entry; at the limit the creation is
    /// refused, as XFS refuses it); removals and renames are never refused for quota — their
    /// whiteouts and moved names are accounted as they land.
    pub(crate) fn dir_op<T>(
        &self,
        dirs: &[BorrowedFd<'_>],
        reserve: bool,
        op: impl FnOnce() -> Result<T>,
    ) -> Result<T> {
        if self.quota.is_none() {
            return op();
        }
        let res = self.reserve(0, if reserve { 4096 * dirs.len() as u64 } else { 0 })?;
        let turn = DirTurn::begin(self, dirs);
        let r = op();
        res.settle(turn.end(), 0);
        r
    }

    /// Bring the allocation accounted for a node's upper file (`known`) up to date with its
    /// current stat `st`: the filesystem may allocate after our write returned (ext4 extent
    /// blocks at writeback), so each time we look we settle the drift. Unknown: take `st` as
    /// what was accounted (the scan or copy-up that brought the file in counted it).
    pub(crate) fn sync_known(&self, known: &mut Option<(i64, i64)>, st: &FileStat) {
        self.sync_known_less(known, st, 0);
    }

    /// [`Union::sync_known`], handing back `released` bytes of charge in the same step.
    pub(crate) fn sync_known_less(
        &self,
        known: &mut Option<(i64, i64)>,
        st: &FileStat,
        released: u64,
    ) {
        let drift = known.map_or(0, |(a, _)| alloc(st) - a);
        self.account(drift - released as i64, 0);
        *known = Some((alloc(st), st.st_size));
    }

    /// Settle the allocation drift of one node's upper file.
    pub(crate) fn settle_node(&self, node: &super::Node) {
        if self.quota.is_none() || node.is_dir() {
            return;
        }
        let mut known = node.io_lock.lock();
        if known.is_none() {
            return;
        }
        // Pages the flusher is writing may show in the stat while their charge still counts:
        // the flusher settles the file itself when it hands that back.
        let token = || {
            self.cache
                .as_ref()
                .map_or(Some(0), |c| c.charge_token(node.ino))
        };
        let Some(before) = token() else {
            return;
        };
        let st = match self.upper_handle_of(node.ino, None) {
            Some(f) => nix::sys::stat::fstat(f.fd.as_fd()).ok(),
            // Removed and not open: its space went with its last name, and that name is a
            // whiteout or another object by now, whose stat says nothing about this node.
            None if node.st.lock().unlinked => None,
            // A stat: a copy whose commit is pending is read where it is, without waiting
            // (with io_lock held, writers would wait for the commit's fsync too).
            None => self
                .read_in(node, super::LayerRef::Upper, |d, n| {
                    crate::layer::stat_at(d, n).map_err(|e| super::Error::new(e, "stat"))
                })
                .ok(),
        };
        match st {
            Some(st) if st.st_nlink > 0 && token() == Some(before) => {
                self.sync_known(&mut known, &st)
            }
            _ => {}
        }
    }

    /// Remember that a file's allocation may still change after a write (writeback).
    pub(crate) fn mark_unsettled(&self, ino: u64) {
        if self.quota.is_some() {
            self.unsettled.insert(ino, std::time::Instant::now());
        }
    }

    /// Settle every recently written file (before reports, statfs, and every few seconds);
    /// files written more than a minute ago are settled a last time and forgotten.
    pub fn settle_allocations(&self) {
        if self.quota.is_none() {
            return;
        }
        let inos: Vec<(u64, std::time::Instant)> = self
            .unsettled
            .iter()
            .map(|e| (*e.key(), *e.value()))
            .collect();
        for (ino, t) in inos {
            match self.nodes.get(ino) {
                Some(node) => self.settle_node(&node),
                None => {
                    self.unsettled.remove(&ino);
                    continue;
                }
            }
            if t.elapsed() > std::time::Duration::from_secs(60)
                && self.unsettled.remove_if(&ino, |_, v| *v == t).is_some()
                && !self.cache.as_ref().is_some_and(|c| c.is_dirty(ino))
            {
                // Settled for good: a node the kernel forgot meanwhile can go now.
                self.nodes.remove_unreferenced(ino);
            }
        }
    }

    /// Write `data` at `off` through `fd` within the quota: reserve what the write can newly
    /// allocate, shorten the write to what fits near the limit (a partial write, as on a full
    /// disk), then settle with the real allocation.
    pub(crate) fn quota_write(
        &self,
        q: &Quota,
        fd: BorrowedFd<'_>,
        off: u64,
        data: &[u8],
        known: &mut Option<(i64, i64)>,
    ) -> Result<usize> {
        self.quota_io(q, fd, off, data.len() as u64, known, |n| {
            super::file::pwrite_all(fd, &data[..n as usize], off)
        })
    }

    /// Run `io`, which writes at most its argument's bytes at `off` of `fd`, within the quota
    /// (as [`Union::quota_write`]: `io` may be asked for fewer bytes than `len` near the limit).
    pub(crate) fn quota_io(
        &self,
        q: &Quota,
        fd: BorrowedFd<'_>,
        off: u64,
        len: u64,
        known: &mut Option<(i64, i64)>,
        io: impl FnOnce(u64) -> Result<usize>,
    ) -> Result<usize> {
        if len == 0 {
            return Ok(0);
        }
        // The allocation and size as left by our last write (all size-changing I/O of the
        // node runs under the lock that guards `known`), else a fresh fstat.
        let (alloc_before, size_before, bs) = match *known {
            Some((a, sz)) => (a, sz, 4096),
            None => {
                let st = nix::sys::stat::fstat(fd).map_err(|e| Error::new(e, "fstat"))?;
                (alloc(&st), st.st_size, block_size(&st))
            }
        };
        let mut len = len;
        let mut est = estimate(alloc_before, size_before, off, len, bs);
        if q.reserve_bytes(est).is_err() {
            let avail = q.available_bytes();
            let holes = new_blocks(fd, size_before as u64, off, len, bs)?;
            let (fit, need) = fitting(&holes, off, len, bs, avail);
            if fit == 0 {
                return Err(Error::new(q.errno(), "quota: block limit"));
            }
            len = fit;
            est = need;
            q.reserve_bytes(est)
                .map_err(|e| Error::new(e, "quota: block limit"))?;
        }
        let r = Reservation {
            q: Some(q),
            bytes: est as i64,
            inodes: 0,
        };
        let res = io(len);
        let after = match nix::sys::stat::fstat(fd) {
            Ok(st) => st,
            Err(e) => {
                *known = None;
                return Err(Error::new(e, "fstat"));
            }
        };
        r.settle(alloc(&after) - alloc_before, 0);
        *known = Some((alloc(&after), after.st_size));
        res
    }

    /// fallocate(mode) of [off, off+len) on `fd`: reserve what it can newly allocate, run it,
    /// settle with the real change.
    pub(crate) fn quota_fallocate(
        &self,
        q: &Quota,
        fd: BorrowedFd<'_>,
        (off, len, mode): (u64, u64, i32),
        known: &mut Option<(i64, i64)>,
    ) -> Result<()> {
        let before = nix::sys::stat::fstat(fd).map_err(|e| Error::new(e, "fstat"))?;
        self.sync_known(known, &before);
        let frees = libc::FALLOC_FL_PUNCH_HOLE
            | libc::FALLOC_FL_COLLAPSE_RANGE
            | libc::FALLOC_FL_ZERO_RANGE;
        let need = if mode & frees == 0 {
            let bs = block_size(&before);
            let holes = new_blocks(fd, before.st_size as u64, off, len, bs)?;
            holes.count().saturating_mul(bs)
        } else {
            0
        };
        q.reserve_bytes(need)
            .map_err(|e| Error::new(e, "quota: block limit"))?;
        let r = Reservation {
            q: Some(q),
            bytes: need as i64,
            inodes: 0,
        };
        let ran = fallocate(fd, off, len, mode);
        let after = nix::sys::stat::fstat(fd).map_err(|e| Error::new(e, "fstat"))?;
        r.settle(alloc(&after) - alloc(&before), 0);
        *known = Some((alloc(&after), after.st_size));
        ran
    }

    /// Run `op`, a change of the upper object `obj` (of `node`) that may allocate or free a
    /// block (an xattr), and account the change of its allocation. Through the descriptor,
    /// never the name: a rename over the name meanwhile must not make the change of one
    /// object be settled against another's (it was, a block at a time).
    pub(crate) fn with_realloc_of<T>(
        &self,
        node: &super::Node,
        obj: BorrowedFd<'_>,
        op: impl FnOnce() -> Result<T>,
    ) -> Result<T> {
        if self.quota.is_none() {
            return op();
        }
        let mut known = node.io_lock.lock();
        // A removed object not open was accounted freed with its last name: nothing to settle.
        let counted = !node.freed.load(std::sync::atomic::Ordering::Acquire);
        if node.is_dir() {
            if !counted {
                return op();
            }
            // Entries added to it meanwhile change its allocation too: settled in turn with
            // those operations, against one record.
            let turn = DirTurn::begin(self, &[obj]);
            let r = op();
            self.account(turn.end(), 0);
            return r;
        }
        let before = nix::sys::stat::fstat(obj).ok().filter(|_| counted);
        if let Some(b) = &before {
            self.sync_known(&mut known, b);
        }
        let r = op();
        if let (Some(b), Ok(a)) = (before, nix::sys::stat::fstat(obj)) {
            self.account(alloc(&a) - alloc(&b), 0);
            *known = Some((alloc(&a), a.st_size));
        }
        r
    }
}

/// An upper directory about to be removed, taking part in its allocation record
/// ([`DirAlloc`]) until it is gone, so that what its removal frees for it is what was
/// accounted for it ([`DirRemoval::accounted`], asked once it is gone). An operation on it
/// still running then (an xattr set through its descriptor) finds it removed and settles
/// nothing: what it changed was never counted, and is not freed either. (Before, a removal
/// freed the directory's allocation as a stat found it, which could already hold such an
/// operation's new block: a block freed that had never been charged, for good.) Dropped
/// while the directory is still there (the removal failed), it settles as any operation.
pub(crate) struct DirRemoval<'a> {
    u: &'a Union,
    fd: std::os::fd::OwnedFd,
    key: (u64, u64),
}

impl Union {
    /// [`DirRemoval`] of directory `name` in `dir`; None without a quota, or if it cannot be
    /// opened (its stat then decides, as for any removal).
    pub(crate) fn dir_removal(
        &self,
        dir: BorrowedFd<'_>,
        name: &std::ffi::OsStr,
    ) -> Option<DirRemoval<'_>> {
        self.quota.as_ref()?;
        let fd = open_dir_path(dir, name)?;
        let key = join_dir_record(self, fd.as_fd())?;
        Some(DirRemoval { u: self, fd, key })
    }
}

impl DirRemoval<'_> {
    /// What is accounted for the directory itself (to free once it is gone).
    pub(crate) fn accounted(&self) -> Option<i64> {
        self.u.dir_alloc.get(&self.key).map(|r| r.accounted)
    }
}

impl Drop for DirRemoval<'_> {
    fn drop(&mut self) {
        let grown = leave_dir_record(self.u, self.fd.as_fd(), self.key);
        self.u.account(grown, 0);
    }
}

/// The allocation accounted for an upper directory while operations change it, and how many
/// operations are at it (`Union::dir_alloc`). Each operation, when done, settles the difference
/// between the directory's allocation and this record and moves the record: a block that two
/// concurrent operations both see appear — an entry added by one, an xattr set by the other on
/// the same directory, which the kernel does not serialize — is counted once, not by each
/// (a removal counted twice left the usage a block short).
#[derive(Debug)]
pub(crate) struct DirAlloc {
    accounted: i64,
    users: u32,
}

/// Upper directories taking part in one operation, from before it changes them until
/// [`DirTurn::end`] (or drop: a failed or unwound operation settles what it changed too).
struct DirTurn<'a> {
    u: &'a Union,
    dirs: Vec<(BorrowedFd<'a>, Option<(u64, u64)>)>,
}

impl<'a> DirTurn<'a> {
    fn begin(u: &'a Union, dirs: &[BorrowedFd<'a>]) -> DirTurn<'a> {
        let dirs = dirs.iter().map(|d| (*d, join_dir_record(u, *d))).collect();
        DirTurn { u, dirs }
    }

    /// How much the directories grew (negative: shrank) since what was accounted for them.
    fn end(mut self) -> i64 {
        self.settle()
    }

    fn settle(&mut self) -> i64 {
        let mut grown = 0;
        for (d, key) in self.dirs.drain(..) {
            if let Some(key) = key {
                grown += leave_dir_record(self.u, d, key);
            }
        }
        grown
    }
}

/// Take part in the allocation record of upper directory `d` ([`DirAlloc`]), made with its
/// allocation if there is none; its key. None for what cannot be stat'ed: nothing is settled
/// for it (as nothing changed).
fn join_dir_record(u: &Union, d: BorrowedFd<'_>) -> Option<(u64, u64)> {
    let st = nix::sys::stat::fstat(d).ok()?;
    let key = (st.st_dev, st.st_ino);
    // A new record takes the allocation as it is once no other operation can settle it
    // meanwhile (under the map's lock): a stat from before another operation's change and
    // its settling would count that change again.
    u.dir_alloc
        .entry(key)
        .or_insert_with(|| DirAlloc {
            accounted: nix::sys::stat::fstat(d)
                .map(|st| alloc(&st))
                .unwrap_or(alloc(&st)),
            users: 0,
        })
        .users += 1;
    Some(key)
}

/// Leave the record joined by [`join_dir_record`]: settle how much the directory grew
/// (negative: shrank) since what the record accounted, and return that (to account).
fn leave_dir_record(u: &Union, d: BorrowedFd<'_>, key: (u64, u64)) -> i64 {
    let mut grown = 0;
    let last = match u.dir_alloc.get_mut(&key) {
        Some(mut rec) => {
            match nix::sys::stat::fstat(d) {
                // Removed meanwhile: its removal freed what was accounted for it.
                Ok(st) if st.st_nlink > 0 => {
                    grown = alloc(&st) - rec.accounted;
                    rec.accounted = alloc(&st);
                }
                _ => {}
            }
            rec.users -= 1;
            rec.users == 0
        }
        None => false,
    };
    if last {
        u.dir_alloc.remove_if(&key, |_, r| r.users == 0);
    }
    grown
}

/// An `O_PATH` descriptor of directory `name` in `dir` (no symlink followed).
fn open_dir_path(dir: BorrowedFd<'_>, name: &std::ffi::OsStr) -> Option<std::os::fd::OwnedFd> {
    use nix::fcntl::OFlag;
    nix::fcntl::openat(
        dir,
        name,
        OFlag::O_PATH | OFlag::O_DIRECTORY | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC,
        nix::sys::stat::Mode::empty(),
    )
    .ok()
}

impl Drop for DirTurn<'_> {
    fn drop(&mut self) {
        if !self.dirs.is_empty() {
            let grown = self.settle();
            self.u.account(grown, 0);
        }
    }
}

/// fallocate(2).
pub(crate) fn fallocate(fd: BorrowedFd<'_>, off: u64, len: u64, mode: i32) -> Result<()> {
    nix::fcntl::fallocate(
        fd,
        nix::fcntl::FallocateFlags::from_bits_truncate(mode),
        off as i64,
        len as i64,
    )
    .map_err(|e| Error::new(e, "fallocate"))
}

fn block_size(st: &FileStat) -> u64 {
    if st.st_blksize > 0 {
        st.st_blksize as u64
    } else {
        4096
    }
}

/// Upper bound of what writing [off, off+len) can newly allocate: blocks past the allocated
/// end for a file without holes, every touched block otherwise.
fn estimate(alloc_bytes: i64, size: i64, off: u64, len: u64, bs: u64) -> u64 {
    let first = off / bs;
    let last = (off + len - 1) / bs;
    let size = size.max(0) as u64;
    let full = alloc_bytes.max(0) as u64 >= size.div_ceil(bs) * bs;
    let alloc_end = size.div_ceil(bs);
    let newblocks = if full {
        (last + 1).saturating_sub(first.max(alloc_end))
    } else {
        last - first + 1
    };
    newblocks * bs
}

/// The blocks touched by [off, off+len) that writing would newly allocate (holes, past EOF),
/// kept as the touched block range less the allocated block ranges: a fallocate of terabytes
/// costs as much as the file has extents, not a flag per block.
#[derive(Debug)]
struct NewBlocks {
    /// First and one past the last touched block.
    first: u64,
    end: u64,
    /// Allocated block ranges within [first, end): sorted, disjoint, half-open.
    allocated: Vec<(u64, u64)>,
}

impl NewBlocks {
    /// `allocated` in any order, overlapping or not, in blocks; clipped to [first, end).
    fn new(first: u64, end: u64, mut allocated: Vec<(u64, u64)>) -> NewBlocks {
        allocated.retain_mut(|r| {
            *r = (r.0.max(first), r.1.min(end));
            r.0 < r.1
        });
        allocated.sort_unstable();
        let mut merged: Vec<(u64, u64)> = Vec::with_capacity(allocated.len());
        for (a, b) in allocated {
            match merged.last_mut() {
                Some(last) if a <= last.1 => last.1 = last.1.max(b),
                _ => merged.push((a, b)),
            }
        }
        NewBlocks {
            first,
            end,
            allocated: merged,
        }
    }

    /// The unallocated block ranges, in order (half-open).
    fn holes(&self) -> impl Iterator<Item = (u64, u64)> + '_ {
        let mut at = self.first;
        let mut next = self.allocated.iter();
        std::iter::from_fn(move || {
            while at < self.end {
                match next.next() {
                    Some(&(a, b)) => {
                        let hole = (at, a);
                        at = b;
                        if hole.0 < hole.1 {
                            return Some(hole);
                        }
                    }
                    None => {
                        let hole = (at, self.end);
                        at = self.end;
                        return Some(hole);
                    }
                }
            }
            None
        })
    }

    /// How many blocks are new.
    fn count(&self) -> u64 {
        self.holes().map(|(a, b)| b - a).sum()
    }
}

/// Which blocks touched by [off, off+len) are unallocated now (hole or past EOF)?
fn new_blocks(fd: BorrowedFd<'_>, size: u64, off: u64, len: u64, bs: u64) -> Result<NewBlocks> {
    let first = off / bs;
    let end = off.saturating_add(len.max(1)).div_ceil(bs);
    // Exact where the filesystem tells its extents (preallocation past EOF included).
    if let Ok(ranges) = crate::layer::sys::allocated_ranges(fd, first * bs, (end - first) * bs) {
        let blocks = ranges
            .into_iter()
            .filter(|(a, b)| b > a)
            .map(|(a, b)| (a / bs, b.div_ceil(bs)))
            .collect();
        return Ok(NewBlocks::new(first, end, blocks));
    }
    // Otherwise walk the data extents that intersect the range.
    let start = first * bs;
    let stop = (end * bs).min(size);
    let mut pos = start;
    let mut blocks = Vec::new();
    while pos < stop {
        let data = match nix::unistd::lseek(fd.as_fd(), pos as i64, nix::unistd::Whence::SeekData) {
            Ok(d) => d as u64,
            Err(Errno::ENXIO) => break,
            Err(Errno::EINVAL) => {
                // No SEEK_DATA: assume everything before EOF is allocated.
                blocks = vec![(0, size.div_ceil(bs))];
                break;
            }
            Err(e) => return Err(Error::new(e, "seek data")),
        };
        if data >= stop {
            break;
        }
        let hole = match nix::unistd::lseek(fd.as_fd(), data as i64, nix::unistd::Whence::SeekHole)
        {
            Ok(h) => (h as u64).min(stop),
            Err(_) => stop,
        };
        blocks.push((data / bs, hole.div_ceil(bs)));
        pos = hole.max(data + 1);
    }
    Ok(NewBlocks::new(first, end, blocks))
}

/// The longest prefix of [off, off+len) whose new blocks fit in `avail` bytes, and what those
/// blocks cost.
fn fitting(new: &NewBlocks, off: u64, len: u64, bs: u64, avail: u64) -> (u64, u64) {
    let mut need = 0u64;
    for (a, b) in new.holes() {
        let cost = (b - a).saturating_mul(bs);
        if need.saturating_add(cost) > avail {
            // The first new block that does not fit ends the prefix.
            let blocks = (avail - need) / bs;
            let block_start = (a + blocks) * bs;
            let fit = block_start.saturating_sub(off).min(len);
            return (fit, need + blocks * bs);
        }
        need += cost;
    }
    (len, need)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fitting_prefix() {
        // Three new blocks, room for two: the write stops at the third block's start.
        let all_new = NewBlocks::new(0, 3, vec![]);
        assert_eq!(fitting(&all_new, 100, 10_000, 4096, 8192), (8092, 8192));
        // Allocated blocks cost nothing.
        let second_new = NewBlocks::new(0, 2, vec![(0, 1)]);
        assert_eq!(fitting(&second_new, 0, 8192, 4096, 4096), (8192, 4096));
        // Nothing fits.
        assert_eq!(
            fitting(&NewBlocks::new(0, 1, vec![]), 0, 10, 4096, 100),
            (0, 0)
        );
        // Room for 3 blocks over holes [10, 12) and [14, 20): the prefix ends at block 15.
        let gaps = NewBlocks::new(10, 20, vec![(12, 14)]);
        assert_eq!(
            fitting(&gaps, 10 * 4096, 10 * 4096, 4096, 3 * 4096),
            (5 * 4096, 3 * 4096)
        );
    }

    #[test]
    fn new_blocks_are_ranges() {
        // Unsorted, overlapping and out-of-range allocated ranges.
        let n = NewBlocks::new(10, 30, vec![(25, 40), (12, 15), (0, 11), (14, 18)]);
        assert_eq!(n.allocated, vec![(10, 11), (12, 18), (25, 30)]);
        assert_eq!(n.holes().collect::<Vec<_>>(), vec![(11, 12), (18, 25)]);
        assert_eq!(n.count(), 8);
        assert_eq!(NewBlocks::new(0, 5, vec![(0, 5)]).count(), 0);
        assert_eq!(
            NewBlocks::new(0, 5, vec![]).holes().collect::<Vec<_>>(),
            vec![(0, 5)]
        );
        // A petabyte range is counted without a flag per block.
        let huge = NewBlocks::new(0, 1 << 38, vec![(5, 10)]);
        assert_eq!(huge.count(), (1 << 38) - 5);
    }

    #[test]
    fn new_blocks_of_a_sparse_file() {
        let dir = std::env::temp_dir().join(format!("ufs-newblocks-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("f");
        let f = std::fs::File::create(&path).unwrap();
        use std::os::unix::fs::FileExt;
        f.write_all_at(&[1u8; 4096], 8192).unwrap(); // block 2 written, 0-1 holes
        f.sync_all().unwrap();
        let n = new_blocks(f.as_fd(), 12288, 0, 1 << 40, 4096).unwrap();
        // Blocks 0, 1 and everything from 3 up to 1 TiB are new.
        assert_eq!(n.count(), (1u64 << 40) / 4096 - 1);
        let (fit, need) = fitting(&n, 0, 1 << 40, 4096, 3 * 4096);
        assert_eq!((fit, need), (4 * 4096, 3 * 4096));
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn estimates() {
        // A fully allocated 8 KiB file.
        assert_eq!(estimate(8192, 8192, 0, 4096, 4096), 0); // overwrite
        assert_eq!(estimate(8192, 8192, 8192, 1, 4096), 4096); // append a byte
        assert_eq!(estimate(8192, 8192, 4000, 8000, 4096), 4096);
        // Sparse: every touched block may be new.
        assert_eq!(estimate(0, 8192, 0, 4096, 4096), 4096);
    }
}
