//! Directory read-ahead for tree walks (`find`, `ls -lR`, `du`, `tar c`, `rm -rf`).
//!
//! A walk lists a directory, then each of its subdirectories in turn. On a cold cache every
//! listing waits for the disk twice: for the directory's blocks and, because READDIRPLUS
//! answers carry every entry's attributes, for its entries' inodes. One walker has one read
//! in flight at a time; this VM's disk serves 4 KiB reads at ~21k/s one at a time and ~54k/s
//! four at a time. So once a walk is seen (a directory is listed shortly after its parent),
//! the subdirectories of both are read ahead by background threads, newest first (a walk goes
//! depth-first): each is opened in every layer of its parent, listed, and one entry per
//! inode-table block `fstatat`'d, which leaves the blocks and inodes in the layer
//! filesystems' caches for the walker's own listing and lookups. Nothing read ahead is kept
//! by us; a wrong guess costs reads and nothing else. (Two threads did as well as four or
//! eight on the benchmark tree.)
//!
//! Beneath the layers by construction: a subdirectory is opened by its single name (from a
//! listing, never `.` or `..`) relative to its parent's directory fd, `O_NOFOLLOW`, and its
//! entries are only `fstatat`'d `AT_SYMLINK_NOFOLLOW`.
//!
//! Bounded: [`WORKERS`] threads (started on first use), [`MAX_QUEUED`] directories waiting
//! (beyond that new ones are dropped: the walker is far behind anyway), [`MAX_ENTRIES`]
//! entries per directory.
//!
//! Only while it reads the disk: where the layers are already cached (a fresh mount over
//! image layers read a moment ago) the read-ahead finds everything in memory and only takes
//! CPU from the walk (on 2 CPUs `find` of the benchmark tree: 0.35 s without, 0.37–0.44 s
//! with). Each job counts the blocks its thread had read from disk (`getrusage`
//! `ru_inblock`); after [`CACHED_AFTER`] jobs in a row that read none, only one job in
//! [`PROBE_EVERY`] is run (the others are dropped) until one reads the disk again. Only where
//! every layer is on a block device: reads of NFS, virtiofs, FUSE or 9p layers are not
//! counted as block reads, and read-ahead never holds back there.

use std::collections::VecDeque;
use std::ffi::OsString;
use std::num::NonZeroUsize;
use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use parking_lot::{Condvar, Mutex};

/// Threads reading ahead (reads in flight, besides the walker's own).
pub const WORKERS: usize = 2;
/// Directories waiting at most (the oldest is dropped for a new one).
pub const MAX_QUEUED: usize = 4096;
/// Entries of one directory read ahead at most.
pub const MAX_ENTRIES: usize = 16384;
/// A directory listed within this long after its parent is a step of a walk.
const WALK_WINDOW: Duration = Duration::from_secs(5);
/// Listed directories remembered (node id: when listed, when its subdirectories were queued).
const REMEMBERED: usize = 4096;
/// A directory's subdirectories are read ahead again in a walk this long after the last time
/// (the layer filesystems' caches may have let them go since).
const AGAIN: Duration = Duration::from_secs(30);
/// Jobs in a row that found everything cached before the read-ahead holds back.
pub const CACHED_AFTER: u32 = 16;
/// While holding back, one job in this many is run to see whether the disk is read again.
pub const PROBE_EVERY: u32 = 16;

/// Whether jobs are worth running: see the module documentation.
#[derive(Debug, Default)]
struct Gate {
    /// Jobs in a row that read nothing from disk.
    streak: u32,
    /// Jobs dropped since the last one run, while holding back.
    held: u32,
}

impl Gate {
    fn holding_back(&self) -> bool {
        self.streak >= CACHED_AFTER
    }

    /// Run the next job?
    fn admit(&mut self) -> bool {
        if !self.holding_back() {
            return true;
        }
        self.held += 1;
        if self.held >= PROBE_EVERY {
            self.held = 0;
            return true;
        }
        false
    }

    /// A job ran: did its thread read from disk (`None`: unknown, counted as a read)?
    fn record(&mut self, read_disk: Option<bool>) {
        if read_disk == Some(false) {
            self.streak = self.streak.saturating_add(1);
        } else {
            self.streak = 0;
            self.held = 0;
        }
    }
}

/// Blocks the calling thread has read from disk so far (`None` where the kernel keeps no
/// count: without per-task I/O accounting the read-ahead never holds back).
fn blocks_read() -> Option<i64> {
    static COUNTED: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    if !*COUNTED.get_or_init(|| std::path::Path::new("/proc/self/io").exists()) {
        return None;
    }
    nix::sys::resource::getrusage(nix::sys::resource::UsageWho::RUSAGE_THREAD)
        .ok()
        .map(|u| u.block_reads())
}

/// One subdirectory to read ahead: its parent's fd in each layer, and its name.
struct Job {
    parents: Vec<Arc<OwnedFd>>,
    name: OsString,
}

#[derive(Default)]
struct Queue {
    jobs: VecDeque<Job>,
    threads: usize,
    stopped: bool,
    gate: Gate,
}

/// See the module documentation.
pub struct Prefetcher {
    enabled: bool,
    /// Hold back over cached layers (see the module documentation).
    gated: bool,
    q: Mutex<Queue>,
    cv: Condvar,
    recent: Mutex<lru::LruCache<u64, (Instant, Option<Instant>)>>,
    /// Directories queued for read-ahead since the mount.
    pub queued: AtomicU64,
    /// Directories read ahead since the mount.
    pub dirs: AtomicU64,
    /// Entries stat'd ahead since the mount.
    pub entries: AtomicU64,
    /// Directories not read ahead because the queue was full.
    pub dropped: AtomicU64,
    /// Directories not read ahead because the layers were found cached.
    pub skipped: AtomicU64,
}

impl std::fmt::Debug for Prefetcher {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "Prefetcher {{ enabled: {}, queued: {} }}",
            self.enabled,
            self.q.lock().jobs.len()
        )
    }
}

impl Prefetcher {
    pub fn new(enabled: bool) -> Prefetcher {
        Prefetcher {
            enabled,
            gated: true,
            q: Mutex::new(Queue::default()),
            cv: Condvar::new(),
            recent: Mutex::new(lru::LruCache::new(
                NonZeroUsize::new(REMEMBERED).expect("nonzero"),
            )),
            queued: AtomicU64::new(0),
            dirs: AtomicU64::new(0),
            entries: AtomicU64::new(0),
            dropped: AtomicU64::new(0),
            skipped: AtomicU64::new(0),
        }
    }

    pub fn enabled(&self) -> bool {
        self.enabled
    }

    /// Never hold back: the layers' reads are not all counted as block reads (they are not
    /// all on block devices).
    pub fn ungated(mut self) -> Prefetcher {
        self.gated = false;
        self
    }

    /// Directory `ino` (child of `parent`) is being listed afresh. Returns the directories
    /// whose subdirectories are to be read ahead now: none unless `parent` was listed
    /// shortly before (a walk); then `parent` and `ino`, unless read ahead lately.
    pub fn listed(&self, ino: u64, parent: u64) -> Vec<u64> {
        if !self.enabled {
            return Vec::new();
        }
        let now = Instant::now();
        let fresh = |at: Option<Instant>| at.is_some_and(|t| now.duration_since(t) < AGAIN);
        let mut recent = self.recent.lock();
        let mut due = Vec::new();
        let walk = parent != 0
            && match recent.get_mut(&parent) {
                Some((at, queued)) if now.duration_since(*at) < WALK_WINDOW => {
                    if !fresh(*queued) {
                        *queued = Some(now);
                        due.push(parent);
                    }
                    true
                }
                _ => false,
            };
        let mut queued = recent.get(&ino).and_then(|(_, q)| *q);
        if walk && !fresh(queued) {
            queued = Some(now);
            due.push(ino);
        }
        recent.put(ino, (now, queued));
        due
    }

    /// Queue subdirectory `name` of the directory open as `parents` (one fd per layer).
    pub fn queue(self: &Arc<Self>, parents: Vec<Arc<OwnedFd>>, name: OsString) {
        let name_ok =
            !name.is_empty() && name != "." && name != ".." && !name.as_bytes().contains(&b'/');
        if !self.enabled || parents.is_empty() || !name_ok {
            return;
        }
        let mut q = self.q.lock();
        if q.stopped {
            return;
        }
        if q.jobs.len() >= MAX_QUEUED {
            // The oldest guess goes: the walker has moved on from there.
            q.jobs.pop_front();
            self.dropped.fetch_add(1, Ordering::Relaxed);
        }
        q.jobs.push_back(Job { parents, name });
        self.queued.fetch_add(1, Ordering::Relaxed);
        if q.threads < WORKERS && q.threads < q.jobs.len() {
            let me = Arc::downgrade(self);
            if std::thread::Builder::new()
                .name("prefetch".into())
                .spawn(move || run(me))
                .is_ok()
            {
                q.threads += 1;
            }
        }
        self.cv.notify_one();
    }

    /// Drop what is queued and let the threads end (shutdown).
    pub fn stop(&self) {
        let mut q = self.q.lock();
        q.stopped = true;
        q.jobs.clear();
        self.cv.notify_all();
    }

    /// Directories waiting now.
    pub fn pending(&self) -> usize {
        self.q.lock().jobs.len()
    }
}

fn run(me: std::sync::Weak<Prefetcher>) {
    loop {
        let Some(p) = me.upgrade() else { return };
        let job = {
            let mut q = p.q.lock();
            loop {
                if q.stopped {
                    q.threads -= 1;
                    return;
                }
                if let Some(j) = q.jobs.pop_back() {
                    if !p.gated || q.gate.admit() {
                        break Some(j);
                    }
                    p.skipped.fetch_add(1, Ordering::Relaxed);
                    continue;
                }
                // Idle: end the thread after a while (started again on demand).
                if p.cv.wait_for(&mut q, Duration::from_secs(10)).timed_out() && q.jobs.is_empty() {
                    q.threads -= 1;
                    break None;
                }
            }
        };
        let Some(job) = job else { return };
        let before = p.gated.then(blocks_read).flatten();
        let (dirs, n) = read_ahead(&job);
        if p.gated {
            let read_disk = before.zip(blocks_read()).map(|(b, a)| a > b);
            p.q.lock().gate.record(read_disk);
        }
        if dirs > 0 {
            p.dirs.fetch_add(1, Ordering::Relaxed);
            p.entries.fetch_add(n as u64, Ordering::Relaxed);
        }
    }
}

/// Inode numbers sharing this many low bits are taken to share a block of the layer
/// filesystem's inode table (16 inodes of 256 bytes per 4 KiB on ext4; XFS allocates inodes in
/// chunks of 64): one stat reads the block for all of them.
const INODE_GROUP_BITS: u32 = 4;

/// Open `job`'s directory in each layer and stat one entry per inode-table block (by the
/// entries' inode numbers); the directories opened and the entries stat'd.
fn read_ahead(job: &Job) -> (usize, usize) {
    use nix::fcntl::OFlag;
    let (mut dirs, mut n) = (0, 0);
    for parent in &job.parents {
        let open = |noatime| {
            nix::dir::Dir::openat(
                parent.as_fd(),
                job.name.as_os_str(),
                OFlag::O_RDONLY
                    | OFlag::O_DIRECTORY
                    | OFlag::O_NOFOLLOW
                    | OFlag::O_CLOEXEC
                    | noatime,
                nix::sys::stat::Mode::empty(),
            )
        };
        // No atime update for a directory the user may never list (O_NOATIME needs to own
        // it or CAP_FOWNER: else without).
        let d = match open(OFlag::O_NOATIME) {
            Err(nix::errno::Errno::EPERM) => open(OFlag::empty()),
            r => r,
        };
        let Ok(mut d) = d else {
            continue;
        };
        dirs += 1;
        let mut groups = std::collections::HashSet::new();
        let names: Vec<OsString> = d
            .iter()
            // An error ends the listing (another read would only fail again).
            .map_while(|e| e.ok())
            .filter(|e| !matches!(e.file_name().to_bytes(), b"." | b".."))
            .take(MAX_ENTRIES)
            .filter(|e| groups.insert(e.ino() >> INODE_GROUP_BITS))
            .map(|e| std::ffi::OsStr::from_bytes(e.file_name().to_bytes()).to_os_string())
            .collect();
        for name in &names {
            if nix::sys::stat::fstatat(
                &d,
                name.as_os_str(),
                nix::fcntl::AtFlags::AT_SYMLINK_NOFOLLOW | nix::fcntl::AtFlags::AT_NO_AUTOMOUNT,
            )
            .is_ok()
            {
                n += 1;
            }
        }
    }
    (dirs, n)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_a_walk_is_read_ahead_and_each_directory_once() {
        let p = Prefetcher::new(true);
        // The walk's root: nothing yet (a plain `ls` stops here).
        assert!(p.listed(10, 1).is_empty());
        // Its first subdirectory: the root's subdirectories and its own.
        assert_eq!(p.listed(11, 10), vec![10, 11]);
        // A sibling: only its own (the root's are queued).
        assert_eq!(p.listed(12, 10), vec![12]);
        // Listed again: nothing new.
        assert!(p.listed(12, 10).is_empty());
        // A grandchild: its own only.
        assert_eq!(p.listed(13, 12), vec![13]);
        // An unrelated directory whose parent was never listed.
        assert!(p.listed(99, 98).is_empty());
        // Off: never.
        let off = Prefetcher::new(false);
        assert!(off.listed(10, 1).is_empty());
        assert!(off.listed(11, 10).is_empty());
    }

    #[test]
    fn holds_back_while_everything_is_cached_and_resumes_on_a_disk_read() {
        let mut g = Gate::default();
        for _ in 0..CACHED_AFTER {
            assert!(g.admit());
            g.record(Some(false));
        }
        // Holding back: one job in PROBE_EVERY runs.
        let run = (0..PROBE_EVERY * 3).filter(|_| g.admit()).count();
        assert_eq!(run, 3);
        // A probe that read the disk: every job runs again.
        g.record(Some(true));
        assert!((0..PROBE_EVERY).all(|_| g.admit()));
        // Unknown counts as a disk read: never holds back.
        let mut u = Gate::default();
        for _ in 0..CACHED_AFTER * 2 {
            assert!(u.admit());
            u.record(None);
        }
        // A cached streak broken by one read starts over.
        let mut h = Gate::default();
        for i in 0..CACHED_AFTER * 2 {
            assert!(h.admit());
            h.record(Some(i == CACHED_AFTER - 1));
        }
        assert!(!h.admit());
    }

    #[test]
    fn this_thread_counts_its_disk_reads() {
        // Where the kernel accounts per-task I/O, the count is there and does not go down.
        if std::path::Path::new("/proc/self/io").exists() {
            let a = blocks_read().expect("counted");
            let b = blocks_read().expect("counted");
            assert!(b >= a);
        }
    }

    #[test]
    fn reads_subdirectories_in_every_layer_and_refuses_other_names() {
        let t = std::env::temp_dir().join(format!("prefetch-test-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&t);
        for l in ["a", "b"] {
            std::fs::create_dir_all(t.join(l).join("sub")).unwrap();
            for i in 0..3 {
                std::fs::write(t.join(l).join("sub").join(format!("{l}{i}")), b"x").unwrap();
            }
        }
        std::os::unix::fs::symlink(t.join("a"), t.join("a").join("link")).unwrap();
        let open = |l: &str| Arc::new(OwnedFd::from(std::fs::File::open(t.join(l)).unwrap()));
        let job = Job {
            parents: vec![open("a"), open("b")],
            name: "sub".into(),
        };
        // Both layers' copies; at least one entry each (one per inode-table block).
        let (dirs, n) = read_ahead(&job);
        assert_eq!(dirs, 2);
        assert!((2..=6).contains(&n), "{n} entries stat'd");
        // A symlink to a directory is not followed.
        let job = Job {
            parents: vec![open("a")],
            name: "link".into(),
        };
        assert_eq!(read_ahead(&job), (0, 0));
        let p = Arc::new(Prefetcher::new(true));
        for bad in ["..", ".", "", "x/y"] {
            p.queue(vec![open("a")], bad.into());
        }
        assert_eq!(p.queued.load(Ordering::Relaxed), 0);
        // A good name is queued and read by a thread.
        p.queue(vec![open("a"), open("b")], "sub".into());
        assert_eq!(p.queued.load(Ordering::Relaxed), 1);
        let until = Instant::now() + Duration::from_secs(10);
        while p.dirs.load(Ordering::Relaxed) == 0 && Instant::now() < until {
            std::thread::sleep(Duration::from_millis(5));
        }
        assert_eq!(p.dirs.load(Ordering::Relaxed), 1);
        p.stop();
        let _ = std::fs::remove_dir_all(&t);
    }
}
