//! Deferred copy-up commit.
//!
//! A copy-up must not put a file at its upper name before its data is on disk: after a crash
//! an empty or partial upper file would hide the lower one (ext4 allocates delayed data after
//! the rename's journal commit). So the copy is fsync'd before the rename into upper, which
//! costs the caller the disk's flush (kernel overlayfs pays it too).
//!
//! For a copy-up made by an open for writing or a setattr (chmod, chown, utimes, truncate),
//! the daemon answers first and commits after: the copy is complete in the work dir (data,
//! xattrs, owner, mode, times) and the operation itself runs on it there; a background thread
//! then fsyncs it and renames it into upper. The crash contract is the same as a synchronous
//! copy-up's: a crash before the commit leaves the lower file in view (with no upper object
//! at all), after it the complete copy. What is lost in that window is what the operation and
//! later writes did to the file without an fsync, which a crash may always lose.
//!
//! A rename of a lower file (`mv`) defers the same way: the copy is staged, the rename is
//! answered, and the commit puts the copy at the old name and then renames it to the new one
//! with a whiteout at the old name (RENAME_WHITEOUT): a crash leaves the old name (lower file,
//! or the copy there) or the new one, as the synchronous path does. While such a commit is
//! pending both names wait, and so does reading either directory.
//!
//! While a commit is pending its file has no name in upper, so nothing may look for it
//! there: `open_parent_in` (every by-name use of a node's upper object) and `find` (every
//! lookup of a name) wait for the commit of that node or name, `fsync` and `sync` wait too,
//! and the unmount drains them all. Only I/O through handles already open on the copy runs
//! on. The thread that made the copy (the "stager") is the exception: until it hands the
//! commit to the committer (when its request is done) it uses the copy in the work dir under
//! its scratch name; nobody else can, and the committer cannot rename it meanwhile.

use std::collections::HashMap;
use std::ffi::{OsStr, OsString};
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, OnceLock, Weak, mpsc};
use std::thread::ThreadId;

use nix::errno::Errno;
use nix::fcntl::{OFlag, RenameFlags};
use nix::sys::stat::Mode;
use nix::sys::time::TimeSpec;
use parking_lot::{Condvar, Mutex};

use super::Union;

/// Most commits and file bytes pending at once; beyond them copy-ups commit synchronously
/// (bounds what the unmount must wait for — a remount waits 10 s for the upper lock — and
/// what a crash can undo).
const MAX_PENDING: usize = 1024;
const MAX_PENDING_BYTES: u64 = 1 << 30;

/// Most commits the committer takes at once.
const BATCH: usize = 64;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    /// Copied; its stager still works on it under the scratch name.
    Staged,
    /// Handed to the committer.
    Queued,
    /// Renamed into upper (or given up): the node is reached by its name again.
    Done,
}

/// Where a deferred rename moves the copy after putting it at its old name.
#[derive(Debug)]
pub(crate) struct Move {
    pub(crate) newparent: u64,
    pub(crate) newname: OsString,
    pub(crate) new_dir: Arc<OwnedFd>,
    /// A lower object stays at the old name: leave a whiteout there.
    pub(crate) whiteout: bool,
}

/// One pending commit: the copy `tmp` in the work dir becomes `dst_dir/name` (then moves, for
/// a deferred rename).
#[derive(Debug)]
pub(crate) struct Commit {
    ino: u64,
    parent: u64,
    name: OsString,
    tmp: OsString,
    dst_dir: Arc<OwnedFd>,
    /// File size when staged (the pending-bytes bound).
    size: u64,
    /// Order of staging: a waiter waits only for commits staged before it began.
    seq: u64,
    stager: ThreadId,
    moving: OnceLock<Move>,
    phase: Mutex<Phase>,
    cv: Condvar,
}

impl Commit {
    fn wait(&self) {
        let mut p = self.phase.lock();
        while *p != Phase::Done {
            self.cv.wait(&mut p);
        }
    }

    /// Does this commit change what directory `dir` lists?
    fn lists_in(&self, dir: u64) -> bool {
        self.moving
            .get()
            .is_some_and(|m| self.parent == dir || m.newparent == dir)
    }

    fn staged_here(&self) -> bool {
        self.stager == std::thread::current().id() && *self.phase.lock() == Phase::Staged
    }
}

#[derive(Debug, Default)]
struct Pending {
    by_ino: HashMap<u64, Arc<Commit>>,
    by_name: HashMap<(u64, OsString), Arc<Commit>>,
}

/// The pending commits of a union and its committer thread.
#[derive(Debug, Default)]
pub(crate) struct Commits {
    /// Number of pending commits (the fast path: 0, nothing to look up).
    count: AtomicUsize,
    /// Their file bytes.
    bytes: std::sync::atomic::AtomicU64,
    /// Sequence number of the next commit staged.
    next_seq: std::sync::atomic::AtomicU64,
    pending: Mutex<Pending>,
    /// Signalled whenever a commit finishes.
    idle: Condvar,
    /// Errors of failed commits, by node, for the file's next fsync.
    errors: Mutex<HashMap<u64, Errno>>,
    /// The committer, started with the first commit.
    tx: OnceLock<Mutex<mpsc::Sender<Arc<Commit>>>>,
    /// The union, for the committer (set by `Union::attach`; none: commits are synchronous).
    pub(crate) owner: OnceLock<Weak<Union>>,
    /// Commits made in the background (stats), and those that failed.
    pub(crate) done: std::sync::atomic::AtomicU64,
    pub(crate) failed: std::sync::atomic::AtomicU64,
}

impl Commits {
    pub(crate) fn pending_count(&self) -> usize {
        self.count.load(Ordering::Acquire)
    }

    /// The commit of node `ino` if one is pending.
    fn of(&self, ino: u64) -> Option<Arc<Commit>> {
        if self.pending_count() == 0 {
            return None;
        }
        self.pending.lock().by_ino.get(&ino).cloned()
    }

    /// Is the upper object of `ino` the stager's copy in the work dir? Then its scratch name.
    pub(crate) fn staged_name(&self, ino: u64) -> Option<OsString> {
        self.of(ino)
            .filter(|c| c.staged_here())
            .map(|c| c.tmp.clone())
    }

    /// The scratch name of `ino`'s copy while its commit is pending.
    pub(crate) fn pending_name(&self, ino: u64) -> Option<OsString> {
        self.of(ino).map(|c| c.tmp.clone())
    }

    /// Wait until node `ino` has its upper name (unless this thread is its stager).
    pub(crate) fn wait_node(&self, ino: u64) {
        if let Some(c) = self.of(ino)
            && !c.staged_here()
        {
            c.wait();
        }
    }

    /// Wait until no commit is pending for `name` in directory `parent`.
    pub(crate) fn wait_name(&self, parent: u64, name: &OsStr) {
        if self.pending_count() == 0 {
            return;
        }
        let c = self
            .pending
            .lock()
            .by_name
            .get(&(parent, name.to_os_string()))
            .cloned();
        if let Some(c) = c
            && !c.staged_here()
        {
            c.wait();
        }
    }

    /// Wait until every commit staged before is done (sync). A commit staged by this thread
    /// would never finish while it waits: it is not waited for.
    pub(crate) fn wait_all(&self) {
        self.wait_where(|_| true);
    }

    /// Wait until no commit is pending at all (the unmount: the daemon exits after).
    pub(crate) fn drain(&self) {
        let mut p = self.pending.lock();
        while p.by_ino.values().any(|c| !c.staged_here()) {
            self.idle.wait(&mut p);
        }
    }

    /// Wait until no commit into directory `parent` is pending (its fsyncdir).
    pub(crate) fn wait_parent(&self, parent: u64) {
        self.wait_where(|c| c.parent == parent || c.lists_in(parent));
    }

    /// Wait until no deferred rename from or into directory `dir` is pending (before listing
    /// it or setting its attributes: its entries are not on disk yet, and the commit restores
    /// its times). Whether it waited.
    pub(crate) fn wait_dir(&self, dir: u64) -> bool {
        self.wait_where(|c| c.lists_in(dir))
    }

    fn wait_where(&self, of_interest: impl Fn(&Commit) -> bool) -> bool {
        if self.pending_count() == 0 {
            return false;
        }
        let mut p = self.pending.lock();
        // Commits staged from now on are not waited for: a stream of them (mv into a
        // directory) must not hold a reader of that directory for the whole stream.
        let before = self.next_seq.load(Ordering::Acquire);
        let mut waited = false;
        while p
            .by_ino
            .values()
            .any(|c| c.seq < before && of_interest(c) && !c.staged_here())
        {
            waited = true;
            self.idle.wait(&mut p);
        }
        waited
    }

    /// The background fsync error of `ino`, once.
    pub(crate) fn take_error(&self, ino: u64) -> Option<Errno> {
        self.errors.lock().remove(&ino)
    }

    fn finish(&self, c: &Commit) {
        {
            let mut p = self.pending.lock();
            p.by_ino.remove(&c.ino);
            p.by_name.remove(&(c.parent, c.name.clone()));
            if let Some(m) = c.moving.get() {
                p.by_name.remove(&(m.newparent, m.newname.clone()));
            }
            self.count.fetch_sub(1, Ordering::AcqRel);
            self.bytes.fetch_sub(c.size, Ordering::AcqRel);
            // Every time: a waiter that skips its own staged commit waits for the others only.
            self.idle.notify_all();
        }
        *c.phase.lock() = Phase::Done;
        c.cv.notify_all();
    }

    /// The sender to the committer thread, started on first use.
    fn sender(&self) -> Option<mpsc::Sender<Arc<Commit>>> {
        if let Some(tx) = self.tx.get() {
            return Some(tx.lock().clone());
        }
        let owner = self.owner.get()?.clone();
        let (tx, rx) = mpsc::channel::<Arc<Commit>>();
        let spawned = std::thread::Builder::new()
            .name("commit".into())
            .spawn(move || {
                while let Ok(first) = rx.recv() {
                    // What else is queued goes in the same batch (see `commit_batch`).
                    let mut batch = vec![first];
                    while batch.len() < BATCH {
                        match rx.try_recv() {
                            Ok(c) => batch.push(c),
                            Err(_) => break,
                        }
                    }
                    match owner.upgrade() {
                        Some(u) => u.commit_batch(&batch),
                        None => break,
                    }
                }
            });
        if let Err(e) = spawned {
            log::warn!("cannot start the commit thread ({e}): copy-ups commit synchronously");
            return None;
        }
        // A racing first caller may have set it: use whichever won (the loser's thread ends
        // when its sender is dropped here).
        let tx = self.tx.get_or_init(|| Mutex::new(tx));
        Some(tx.lock().clone())
    }
}

/// A commit staged by the current request; dropping it hands the commit to the committer.
#[derive(Debug)]
pub(crate) struct Staged {
    commit: Arc<Commit>,
    tx: mpsc::Sender<Arc<Commit>>,
    owner: Weak<Union>,
}

impl Staged {
    /// Make this commit a deferred rename: after putting the copy at its old name, it moves
    /// to `m`. Called before the guard drops (the committer has not seen it yet).
    pub(crate) fn moving_to(&self, u: &Union, m: Move) {
        let key = (m.newparent, m.newname.clone());
        if self.commit.moving.set(m).is_ok() {
            u.commits
                .pending
                .lock()
                .by_name
                .insert(key, self.commit.clone());
        }
    }
}

impl Drop for Staged {
    fn drop(&mut self) {
        *self.commit.phase.lock() = Phase::Queued;
        if let Err(mpsc::SendError(c)) = self.tx.send(self.commit.clone()) {
            // No committer any more: commit here.
            if let Some(u) = self.owner.upgrade() {
                u.commit_now(&c);
            }
        }
    }
}

impl Union {
    /// Run the read-only `f` on `node`'s object in layer `r` (its directory and name there).
    /// A copy whose commit is pending is read in the work dir, without waiting for the
    /// commit; a read that races the commit's rename finds it gone there (ENOENT) and is
    /// run again by the upper name. Scratch names are never reused.
    pub(crate) fn read_in<T>(
        &self,
        node: &super::Node,
        r: super::LayerRef,
        f: impl Fn(std::os::fd::BorrowedFd<'_>, &OsStr) -> super::Result<T>,
    ) -> super::Result<T> {
        if r == super::LayerRef::Upper
            && node.kind == libc::S_IFREG
            && let Some(tmp) = self.commits.pending_name(node.ino)
        {
            match f(self.work_fd()?, &tmp) {
                Err(e) if e.errno == Errno::ENOENT => {}
                done => return done,
            }
        }
        if r == super::LayerRef::Upper
            && node.st.lock().unlinked
            && let Some(h) = self.upper_handle_of(node.ino, None)
        {
            // Removed but open: read through the handle (its name may be another file's).
            return f(h.fd.as_fd(), OsStr::new(""));
        }
        let (dir, name) = self.open_parent_in(node, r)?;
        f(dir.as_fd(), &name)
    }

    /// Copy-ups committed in the background so far, those pending now, and those that failed.
    pub fn commit_stats(&self) -> (u64, usize, u64) {
        (
            self.commits.done.load(Ordering::Relaxed),
            self.commits.pending_count(),
            self.commits.failed.load(Ordering::Relaxed),
        )
    }

    /// Can a copy-up of a regular file be committed in the background right now? Then the
    /// sender to use.
    pub(crate) fn can_stage(&self, size: u64) -> Option<mpsc::Sender<Arc<Commit>>> {
        if self.volatile
            || self.sync_commit
            || self.commits.pending_count() >= MAX_PENDING
            || self.commits.bytes.load(Ordering::Acquire) + size > MAX_PENDING_BYTES
            || !self.room_to_commit_later(size)
        {
            return None;
        }
        self.commits.sender()
    }

    /// Register the copy `tmp` (in the work dir, `size` bytes) of node `ino` as the future
    /// `dst_dir/name` in directory node `parent`, staged by this thread.
    pub(crate) fn stage(
        &self,
        tx: mpsc::Sender<Arc<Commit>>,
        ino: u64,
        (parent, name, dst_dir): (u64, &OsStr, Arc<OwnedFd>),
        tmp: OsString,
        size: u64,
    ) -> Staged {
        let commit = Arc::new(Commit {
            ino,
            parent,
            name: name.to_os_string(),
            tmp,
            dst_dir,
            size,
            seq: self.commits.next_seq.fetch_add(1, Ordering::AcqRel),
            stager: std::thread::current().id(),
            moving: OnceLock::new(),
            phase: Mutex::new(Phase::Staged),
            cv: Condvar::new(),
        });
        {
            let mut p = self.commits.pending.lock();
            p.by_ino.insert(ino, commit.clone());
            p.by_name
                .insert((parent, name.to_os_string()), commit.clone());
            self.commits.count.fetch_add(1, Ordering::AcqRel);
            self.commits.bytes.fetch_add(size, Ordering::AcqRel);
        }
        Staged {
            commit,
            tx,
            owner: self.commits.owner.get().cloned().unwrap_or_default(),
        }
    }

    /// Commit several: start writing every copy's data first, so the disk takes them all at
    /// once and each fsync after mostly finds its data written and its metadata in a journal
    /// commit an earlier one made (one flush for the batch instead of one per file).
    fn commit_batch(&self, batch: &[Arc<Commit>]) {
        if batch.len() == 1 {
            return self.commit_now(&batch[0]);
        }
        let fds: Vec<_> = batch.iter().map(|c| self.open_copy(c)).collect();
        for fd in fds.iter().flatten() {
            // Best effort: the fsync in commit_inner is what counts.
            let _ =
                crate::layer::sys::sync_file_range(fd.as_fd(), 0, 0, libc::SYNC_FILE_RANGE_WRITE);
        }
        for (c, fd) in batch.iter().zip(fds) {
            self.commit_with(c, fd);
        }
    }

    /// The copy of `c` in the work dir, open for its fsync.
    fn open_copy(&self, c: &Commit) -> std::result::Result<OwnedFd, Errno> {
        nix::fcntl::openat(
            self.work_fd().map_err(|e| e.errno)?,
            c.tmp.as_os_str(),
            OFlag::O_RDONLY | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC,
            Mode::empty(),
        )
    }

    /// Commit `c`: fsync the copy, rename it into upper (keeping the parent's times, as a
    /// copy-up does), then let waiters go on.
    fn commit_now(&self, c: &Commit) {
        self.commit_with(c, self.open_copy(c))
    }

    /// [`Union::commit_now`] with the copy already opened (or the error opening it).
    fn commit_with(&self, c: &Commit, fd: std::result::Result<OwnedFd, Errno>) {
        // A panic is a failed commit: it must still finish, or everything that waits for it
        // (each lookup of its name) would wait for good.
        let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| self.commit_inner(c, fd)))
            .unwrap_or_else(|_| {
                log::error!("copy-up commit of {:?}: panicked", c.name);
                Err(Errno::EIO)
            });
        match r {
            Ok(true) => {
                self.commits.done.fetch_add(1, Ordering::Relaxed);
            }
            // In upper, but its rename could not be completed (counted as failed).
            Ok(false) => {}
            Err(e) => self.commit_failed(c, e),
        }
        self.commits.finish(c);
    }

    /// A commit that cannot be made: the copy is dropped and the node is the lower file again
    /// (what a crash at that point would show), and the file's next fsync reports the error.
    /// Without an upper object to put it in, what was written to the copy is lost: say so.
    /// EEXIST on a plain commit: a rename replaced the file meanwhile (its open handles keep
    /// the copy). A deferred rename's old name is taken by nothing of ours (everything that
    /// names it waits for the commit): there EEXIST is a failure like any other.
    fn commit_failed(&self, c: &Commit, e: Errno) {
        self.commits.failed.fetch_add(1, Ordering::Relaxed);
        let benign = e == Errno::EEXIST && c.moving.get().is_none();
        if benign {
            self.drop_failed_copy(c, false);
            return;
        }
        log::error!(
            "copy-up of {:?} could not be committed ({e}): it is the lower file again, and \
             what was written to it since the copy-up is lost",
            c.name
        );
        self.commits.errors.lock().insert(c.ino, e);
        // Handles open on the copy: it is gone, their reads and writes fail from now on (they
        // would reach the caches of the file, which is the lower one again).
        for f in self.handles_on(c.ino) {
            if f.in_upper {
                f.lost.store(true, Ordering::Release);
            }
        }
        if let Some(cache) = &self.cache {
            cache.drop_file(c.ino);
        }
        self.drop_failed_copy(c, true);
        // The kernel's attributes and pages of the file are of the lost copy, and a rename it
        // was told of did not happen (after the node is reverted: what it looks up again is
        // the lower file).
        let mut forget = vec![super::Forget::Inode(c.ino)];
        if let Some(m) = c.moving.get() {
            forget.push(super::Forget::Entry(m.newparent, m.newname.clone()));
            forget.push(super::Forget::Entry(c.parent, c.name.clone()));
        }
        self.kernel_forget(forget);
    }

    /// Remove the copy of a failed commit and revert the node (`revert`: to the lower file;
    /// else only a rename's name goes back).
    fn drop_failed_copy(&self, c: &Commit, revert: bool) {
        let Ok(work) = self.work_fd() else {
            return;
        };
        let st = crate::layer::stat_at(work, &c.tmp).ok();
        if let Some(st) = &st {
            // Its inode number is free for another object once the copy is gone.
            self.inomap.set(st.st_ino, 0);
        }
        if nix::unistd::unlinkat(
            work,
            c.tmp.as_os_str(),
            nix::unistd::UnlinkatFlags::NoRemoveDir,
        )
        .is_err()
        {
            return;
        }
        if let Some(node) = self.nodes.get(c.ino) {
            if let Some(m) = c.moving.get() {
                // The rename did not happen after all: the file keeps its old name.
                super::namei::move_name(&node, m.newparent, &m.newname, c.parent, &c.name);
            }
            let mut s = node.st.lock();
            if revert && !s.unlinked {
                s.upper = false;
                node.upper_obj
                    .store(0, std::sync::atomic::Ordering::Release);
            }
        }
        // An open handle on the copy releases its charge at its last close; else release now.
        if let Some(st) = st
            && self.upper_handle_of(c.ino, None).is_none()
        {
            self.account(-super::charge::alloc(&st), -1);
        }
    }

    /// Ok(false): a deferred rename's copy is in upper under its old name, but the move
    /// failed.
    fn commit_inner(
        &self,
        c: &Commit,
        fd: std::result::Result<OwnedFd, Errno>,
    ) -> std::result::Result<bool, Errno> {
        if !self.commit_delay.is_zero() {
            std::thread::sleep(self.commit_delay);
        }
        let work = self.work_fd().map_err(|e| e.errno)?;
        let fd = fd?;
        // A copy not known to be on disk must not replace the lower file (the crash contract).
        nix::unistd::fsync(fd.as_fd())?;
        drop(fd);
        let dst = c.dst_dir.as_fd();
        // The parent's times (and for a move the new parent's), read and restored with no
        // other change of them in between: no namespace operation in those directories, no
        // other copy-up or deferred rename.
        let mut dirs = vec![c.parent];
        if let Some(m) = c.moving.get() {
            dirs.push(m.newparent);
        }
        let committing = self.dir_committing(&dirs);
        let _times = self.dir_times.lock();
        let pstat = nix::sys::stat::fstat(dst)?;
        if !self.commit_window.is_zero() {
            std::thread::sleep(self.commit_window);
        }
        // Only upper's directory grows (the work dir was charged when the copy was made).
        self.dir_op(&[dst], false, || {
            nix::fcntl::renameat2(
                work,
                c.tmp.as_os_str(),
                dst,
                c.name.as_os_str(),
                RenameFlags::RENAME_NOREPLACE,
            )
            .map_err(|e| super::Error::new(e, "copy-up commit: rename"))
        })
        .map_err(|e| e.errno)?;
        if !self.commit_window.is_zero() {
            std::thread::sleep(self.commit_window);
        }
        // The copy-up is no change the user could see (for a rename: the directory's times
        // are the rename's already, set when it was answered). Unless an operation changed
        // the directory meanwhile (only possible where the guard timed out): its change of
        // the times stays.
        if committing.quiet() {
            restore_mtime(dst, &pstat);
        }
        // The rename (and the restore) changed the directory's ctime after the kernel had
        // been answered: it fetches the attributes again (QA: a directory's ctime stayed a
        // few ms old until a remount, after the copy-ups of files in it).
        self.kernel_forget_now(&super::Forget::Attr(c.parent));
        let Some(m) = c.moving.get() else {
            return Ok(true);
        };
        // A deferred rename: the copy is in upper at its old name (the old view, should we
        // crash now); move it, leaving a whiteout (the new view, in one step).
        if let Err(e) = self.commit_move(c, m, &committing) {
            log::error!(
                "rename of {:?} to {:?} could not be completed ({e}): the file stays under \
                 its old name",
                c.name,
                m.newname
            );
            self.commits.failed.fetch_add(1, Ordering::Relaxed);
            self.commits.errors.lock().insert(c.ino, e);
            if let Some(node) = self.nodes.get(c.ino) {
                super::namei::move_name(&node, m.newparent, &m.newname, c.parent, &c.name);
            }
            // The kernel was told the file has its new name: it must look both names up again.
            self.kernel_forget(vec![
                super::Forget::Entry(m.newparent, m.newname.clone()),
                super::Forget::Entry(c.parent, c.name.clone()),
                super::Forget::Inode(c.ino),
            ]);
            return Ok(false);
        }
        self.kernel_forget_now(&super::Forget::Attr(m.newparent));
        Ok(true)
    }

    /// The move of a deferred rename (with `dir_times` held): both directories keep the
    /// times the rename set when it was answered, as with a rename done at once.
    fn commit_move(
        &self,
        c: &Commit,
        m: &Move,
        committing: &super::DirCommitting<'_>,
    ) -> std::result::Result<(), Errno> {
        let (src, dst) = (c.dst_dir.as_fd(), m.new_dir.as_fd());
        let (sstat, dstat) = (nix::sys::stat::fstat(src)?, nix::sys::stat::fstat(dst)?);
        self.dir_op(&[dst], false, || {
            let mv = |flags| {
                nix::fcntl::renameat2(src, c.name.as_os_str(), dst, m.newname.as_os_str(), flags)
            };
            let r = if m.whiteout {
                match mv(RenameFlags::RENAME_WHITEOUT | RenameFlags::RENAME_NOREPLACE) {
                    // No RENAME_WHITEOUT here: rename, then put the whiteout; without one the
                    // lower file would show at the old name again: move back, and fail.
                    Err(Errno::EINVAL) | Err(Errno::EPERM) => mv(RenameFlags::RENAME_NOREPLACE)
                        .and_then(|()| {
                            super::ondisk::make_whiteout(src, &c.name).inspect_err(|_| {
                                let _ = nix::fcntl::renameat2(
                                    dst,
                                    m.newname.as_os_str(),
                                    src,
                                    c.name.as_os_str(),
                                    RenameFlags::RENAME_NOREPLACE,
                                );
                            })
                        }),
                    r => r,
                }
            } else {
                mv(RenameFlags::RENAME_NOREPLACE)
            };
            r.map_err(|e| super::Error::new(e, "rename"))
        })
        .map_err(|e| e.errno)?;
        if committing.quiet() {
            restore_mtime(src, &sstat);
            restore_mtime(dst, &dstat);
        }
        if m.whiteout {
            self.account(0, 1);
        }
        Ok(())
    }
}

/// Set directory `dir`'s mtime back to `st`'s (best effort; atime untouched).
pub(crate) fn restore_mtime(dir: BorrowedFd<'_>, st: &nix::sys::stat::FileStat) {
    let _ = nix::sys::stat::futimens(
        dir,
        &TimeSpec::new(0, libc::UTIME_OMIT),
        &TimeSpec::new(st.st_mtime, st.st_mtime_nsec),
    );
}
