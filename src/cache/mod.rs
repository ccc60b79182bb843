//! The page cache for file data between FUSE and the layer files (DESIGN.md section 4).
//!
//! Pages are 4 KiB, keyed by node id and page index, held per file in a `BTreeMap` under the
//! file's lock; clean pages sit on one LRU list and are evicted when the cache would pass its
//! budget (this file: pages, budget, coherence operations, stats). Reads fill the cache
//! (`read.rs`) through per-open-file readahead ([`readahead`]: the window arithmetic); writes
//! land as dirty pages and return, and the flusher thread writes them to the upper file
//! (`flusher.rs`; [`writeback`] has the thresholds and the pacing curve of
//! balance_dirty_pages).
//!
//! Quota: a write is charged when it is accepted — one page for each page it dirties that is
//! neither dirty already nor allocated on disk — and the charge is handed back once the
//! flusher has written the page and the union has settled the file's real allocation. The
//! flusher therefore never meets the quota.
//!
//! Locks, in the only order they are taken: a file's write-back lock (`wb`), then its state
//! (`st`), then the per-open-file readahead state, then the LRU list / dirty-file list. No
//! file's state is held while another file's is taken (eviction takes them one at a time).

mod flusher;
pub mod kernel_ra;
mod read;
pub mod readahead;
pub mod writeback;

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::os::fd::{AsFd, OwnedFd};
use std::sync::atomic::{AtomicBool, AtomicI32, AtomicU64, Ordering};
use std::sync::{Arc, Weak, mpsc};
use std::time::Instant;

use lru::LruCache;
use nix::errno::Errno;
use parking_lot::{Condvar, Mutex, RwLock};

use crate::quota::Quota;
pub use readahead::RaState;
pub use writeback::CacheConfig;

/// Page size of the cache.
pub const PAGE: usize = 4096;
const P: u64 = PAGE as u64;
/// Most pages the flusher writes in one go (one syscall).
const WB_BATCH: usize = 256;
/// Most pages the background flusher writes from one file before it looks again.
const WB_CHUNK: u64 = 1024;
/// Readahead worker threads.
const RA_WORKERS: usize = 4;
/// Fewest pages eviction takes off the LRU list at once (the kernel's SWAP_CLUSTER_MAX).
const EVICT_BATCH: usize = 32;

/// A backing file descriptor shared between handles, jobs and the flusher.
pub type Fd = Arc<OwnedFd>;

/// A page's bytes: a page-sized slice of a buffer. A miss or a readahead window is read into
/// one buffer whose pages share it, so a later read of the same range can reply straight from
/// it; a page that is written gets a buffer of its own first (copy on write).
#[derive(Debug, Clone)]
struct PageData {
    buf: Arc<Vec<u8>>,
    off: usize,
}

impl PageData {
    fn zeroed() -> PageData {
        PageData {
            buf: Arc::new(vec![0u8; PAGE]),
            off: 0,
        }
    }

    fn bytes(&self) -> &[u8] {
        &self.buf[self.off..self.off + PAGE]
    }

    /// The page's bytes for writing (its own buffer, copied if shared).
    fn make_mut(&mut self) -> &mut [u8] {
        if self.buf.len() != PAGE {
            *self = PageData {
                buf: Arc::new(self.bytes().to_vec()),
                off: 0,
            };
        }
        &mut Arc::make_mut(&mut self.buf)[..]
    }
}

/// Buffers of several pages that lost some of them (evicted, truncated, invalidated, or not
/// inserted after a load), each with the index of its first page. Once the removal is done,
/// the pages still cached from them get buffers of their own ([`Split::apply`]): else the cache
/// would count fewer pages than the buffer holds in memory, and the buffer would stay until
/// its last page went (a mixed random load held 10 MB that way on a 256 MiB budget). Each page
/// is copied once at most, and the copies are at most a buffer's size (a load's run, within
/// the readahead window); pages removed together copy nothing (eviction takes at least
/// [`EVICT_BATCH`] pages at a time, and a load's pages lie together at the cold end).
#[derive(Default)]
struct Split(Vec<(u64, Arc<Vec<u8>>)>);

impl Split {
    /// Page `idx`, holding `d`, is being removed.
    fn note(&mut self, idx: u64, d: &PageData) {
        if d.buf.len() > PAGE && !self.0.iter().any(|(_, b)| Arc::ptr_eq(b, &d.buf)) {
            self.0.push((idx - (d.off / PAGE) as u64, d.buf.clone()));
        }
    }

    fn apply(self, st: &mut FileState) {
        for (first, buf) in self.0 {
            if Arc::strong_count(&buf) == 1 {
                continue;
            }
            for (_, slot) in st.pages.range_mut(first..first + (buf.len() / PAGE) as u64) {
                if let Slot::Ready(p) = slot
                    && Arc::ptr_eq(&p.data.buf, &buf)
                {
                    p.data = PageData {
                        buf: Arc::new(p.data.bytes().to_vec()),
                        off: 0,
                    };
                }
            }
        }
    }
}

/// Data returned by a read: a slice of one cached buffer when the request maps onto it
/// exactly, else a buffer of its own.
#[derive(Debug)]
pub enum ReadData {
    /// Copied together from pages.
    Owned(Vec<u8>),
    /// A range of one shared buffer.
    Shared(Arc<Vec<u8>>, std::ops::Range<usize>),
}

impl std::ops::Deref for ReadData {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        match self {
            ReadData::Owned(v) => v,
            ReadData::Shared(b, r) => &b[r.clone()],
        }
    }
}

/// What the union does after the flusher wrote pages of a file (quota: settle the file's
/// real allocation and hand back the charge taken at accept time, in one step).
pub trait WritebackSink: Send + Sync {
    /// Pages of node `ino` were written through `fd`; `released` bytes of quota charged for
    /// them are to be handed back together with the allocation they now have.
    fn written(&self, ino: u64, fd: std::os::fd::BorrowedFd<'_>, released: u64);
}

#[derive(Debug)]
struct Page {
    data: PageData,
    dirty: bool,
    /// Write sequence of the last change (a page rewritten during write-back stays dirty).
    wseq: u64,
    /// Read ahead and not yet used.
    ra: bool,
    /// The readahead marker (PG_readahead).
    marker: bool,
    /// A quota page was charged for it when it was dirtied.
    charged: bool,
    writeback: bool,
}

#[derive(Debug)]
enum Slot {
    /// Queued for a readahead worker that has not started on it: a reader that needs the page
    /// reads it itself instead of waiting.
    Queued(u64),
    /// Being read by the holder of this token.
    Loading(u64),
    Ready(Page),
}

impl Slot {
    /// Does a reader have to read this page (it is absent, or only queued)?
    fn missing(s: Option<&Slot>) -> bool {
        matches!(s, None | Some(Slot::Queued(_)))
    }
}

#[derive(Debug)]
struct FileState {
    pages: BTreeMap<u64, Slot>,
    /// The file's size as the union shows it (dirty data may reach past the disk's).
    size: u64,
    /// The backing file's size as far as we know (pages at or past it are holes there,
    /// unless `prealloc`).
    disk_size: u64,
    /// The backing file may have blocks allocated past its end (fallocate KEEP_SIZE).
    prealloc: bool,
    /// Where the flusher writes (the upper file, opened for writing).
    wb_fd: Option<Fd>,
    /// Indexes of the dirty pages (what write-back and fsync walk: a sync of one dirty page
    /// among many cached clean ones does not visit the clean ones).
    dirty: BTreeSet<u64>,
    /// The time of the last write through the cache: shown as mtime/ctime (with `size`) from
    /// the write on, stamped on the file when its last dirty page is written, and kept (a stat
    /// racing with the last write-back must not see the disk's older values) until something
    /// else sets the file's size or times.
    mtime: Option<(i64, i64)>,
    /// `mtime` is not on disk yet.
    mtime_pending: bool,
    /// Pages were dropped at write-back (EFBIG): `size` may show writes that never reached
    /// the file; it is taken from the file once nothing dirty is left.
    size_lost: bool,
    /// Forgotten ([`PageCache::drop_file`]): a writer that still holds it must not dirty it
    /// (its pages would count as dirty with no file for the flusher to write).
    dead: bool,
    seq: u64,
}

/// One file's pages.
#[derive(Debug)]
pub struct CachedFile {
    ino: u64,
    st: Mutex<FileState>,
    cv: Condvar,
    wb: Mutex<()>,
    /// Write-back batches between their first write to the file and the hand-back of their
    /// quota charge (with a quota only), and a number that changes at each one's start: see
    /// [`PageCache::charge_token`].
    flushing: AtomicU64,
    flush_gen: AtomicU64,
}

#[derive(Debug, Default)]
struct Counters {
    hits: AtomicU64,
    misses: AtomicU64,
    ra_pages: AtomicU64,
    ra_used: AtomicU64,
    dropped_behind: AtomicU64,
    throttle_events: AtomicU64,
    throttle_us: AtomicU64,
    flusher_runs: AtomicU64,
    written_back: AtomicU64,
    /// Files written back at a close or before a rename over another ([`PageCache::write_back_closed`]).
    close_writebacks: AtomicU64,
    evicted: AtomicU64,
    /// Times the flusher gave freed heap memory beyond the budget's keep back.
    heap_trims: AtomicU64,
    bg_crossings: AtomicU64,
    limit_waits: AtomicU64,
}

/// A snapshot of the cache's figures (`unionfs-rs stats`).
#[derive(Debug, Clone, Default)]
pub struct CacheStats {
    /// (name, value) in a fixed order.
    pub fields: Vec<(&'static str, u64)>,
}

impl CacheStats {
    /// One field by name.
    pub fn get(&self, name: &str) -> Option<u64> {
        self.fields.iter().find(|(n, _)| *n == name).map(|f| f.1)
    }
}

#[derive(Debug, Default)]
struct FlusherCtl {
    kick: bool,
    stop: bool,
}

#[derive(Debug, Default)]
struct Signal {
    m: Mutex<FlusherCtl>,
    cv: Condvar,
}

/// The readahead workers, started at the first job (a mount that never reads sequentially, or
/// only through passthrough, never pays for their threads; nor does mount start-up).
struct RaPool {
    /// None once the cache is closed.
    tx: Option<mpsc::Sender<RaJob>>,
    /// Until the workers are started.
    rx: Option<mpsc::Receiver<RaJob>>,
    /// The cache itself, for the workers.
    me: Weak<PageCache>,
}

impl RaPool {
    /// Queue `job`, starting the workers first if need be. Gives the job back if it cannot run.
    fn send(&mut self, job: RaJob) -> Result<(), RaJob> {
        let Some(tx) = &self.tx else {
            return Err(job);
        };
        if let Some(rx) = self.rx.take() {
            let rx = Arc::new(Mutex::new(rx));
            for i in 0..RA_WORKERS {
                let weak = self.me.clone();
                let rx = rx.clone();
                let spawned = std::thread::Builder::new()
                    .name(format!("readahead-{i}"))
                    .spawn(move || {
                        loop {
                            let job = rx.lock().recv();
                            let Ok(job) = job else { return };
                            let Some(c) = weak.upgrade() else { return };
                            c.run_ra_job(job);
                        }
                    });
                if let Err(e) = spawned {
                    log::warn!("readahead worker: {e}");
                    if i == 0 {
                        // No worker at all: no readahead.
                        self.tx = None;
                        return Err(job);
                    }
                    break;
                }
            }
        }
        tx.send(job).map_err(|e| e.0)
    }
}

struct RaJob {
    file: Arc<CachedFile>,
    fd: Fd,
    pages: Vec<u64>,
    token: u64,
    marker: u64,
}

/// The last write-back error of a file: its sequence (larger for a later error), the error,
/// and whether a sync has reported it yet (errseq's SEEN: a file opened after an error that
/// nobody was told of is told at its fsync).
#[derive(Debug, Clone, Copy)]
struct WbError {
    seq: u64,
    errno: Errno,
    seen: bool,
}

/// The page cache of one mount.
pub struct PageCache {
    cfg: RwLock<CacheConfig>,
    files: dashmap::DashMap<u64, Arc<CachedFile>>,
    lru: Mutex<LruCache<(u64, u64), ()>>,
    bytes: AtomicU64,
    /// Dirty bytes, including pages under write-back and room reserved by writers about to
    /// dirty pages: never above dirty_thresh (plus one page per writer).
    dirty: AtomicU64,
    writeback: AtomicU64,
    dirty_files: Mutex<HashMap<u64, Instant>>,
    flusher: Arc<Signal>,
    throttle: (Mutex<()>, Condvar),
    /// Measured write-back bandwidth, bytes/s.
    bw: AtomicU64,
    flush_error: AtomicI32,
    /// Write-back errors by file, reported as the kernel's errseq reports them (see
    /// [`PageCache::fsync_file`]); kept when the file's pages are evicted, until the file is
    /// forgotten ([`PageCache::drop_file`]).
    errors: Mutex<HashMap<u64, WbError>>,
    /// The sequence of the last write-back error recorded (of any file).
    error_seq: AtomicU64,
    /// Truncates that found no entry of their file (see [`PageCache::file`]).
    unseen_truncates: AtomicU64,
    quota: Option<Arc<Quota>>,
    sink: RwLock<Option<Weak<dyn WritebackSink>>>,
    ra: Mutex<RaPool>,
    closing: AtomicBool,
    /// The kernel's readahead on the mount (KiB): ours runs only beyond it for buffered readers.
    kernel_ra_kb: AtomicU64,
    /// Dirty data was above bg_thresh at the last look (to count crossings).
    above_bg: AtomicBool,
    /// Writers waiting at dirty_thresh: the flusher writes for them even below bg_thresh.
    limit_waiters: AtomicU64,
    token: AtomicU64,
    stats: Counters,
}

impl std::fmt::Debug for PageCache {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PageCache")
            .field("cfg", &*self.cfg.read())
            .field("bytes", &self.bytes)
            .field("dirty", &self.dirty)
            .finish()
    }
}

impl Drop for PageCache {
    fn drop(&mut self) {
        self.flusher.m.lock().stop = true;
        self.flusher.cv.notify_all();
    }
}

fn now() -> (i64, i64) {
    let d = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default();
    (d.as_secs() as i64, d.subsec_nanos() as i64)
}

/// Does the file have blocks allocated past its end?
fn past_end(st: &nix::sys::stat::FileStat) -> bool {
    (st.st_blocks.max(0) as u64) * 512 > (st.st_size.max(0) as u64).div_ceil(P) * P
}

impl PageCache {
    /// A cache with `cfg` (size > 0); `quota` is charged for accepted writes. Starts the
    /// flusher (the readahead workers start at the first readahead).
    pub fn new(cfg: CacheConfig, quota: Option<Arc<Quota>>) -> std::io::Result<Arc<PageCache>> {
        let (tx, rx) = mpsc::channel::<RaJob>();
        let c = Arc::new_cyclic(|me| PageCache {
            cfg: RwLock::new(cfg),
            files: crate::new_map(),
            lru: Mutex::new(LruCache::unbounded()),
            bytes: AtomicU64::new(0),
            dirty: AtomicU64::new(0),
            writeback: AtomicU64::new(0),
            dirty_files: Mutex::new(HashMap::new()),
            flusher: Arc::new(Signal::default()),
            throttle: (Mutex::new(()), Condvar::new()),
            bw: AtomicU64::new(100 << 20),
            flush_error: AtomicI32::new(0),
            errors: Mutex::new(HashMap::new()),
            error_seq: AtomicU64::new(0),
            unseen_truncates: AtomicU64::new(0),
            limit_waiters: AtomicU64::new(0),
            quota,
            sink: RwLock::new(None),
            ra: Mutex::new(RaPool {
                tx: Some(tx),
                rx: Some(rx),
                me: me.clone(),
            }),
            closing: AtomicBool::new(false),
            kernel_ra_kb: AtomicU64::new(read::KERNEL_RA_DEFAULT_KB),
            above_bg: AtomicBool::new(false),
            token: AtomicU64::new(1),
            stats: Counters::default(),
        });
        let weak = Arc::downgrade(&c);
        let sig = c.flusher.clone();
        std::thread::Builder::new()
            .name("flusher".into())
            .spawn(move || flusher::flusher_main(weak, sig))?;
        Ok(c)
    }

    /// Who settles the quota after write-back.
    pub fn set_sink(&self, sink: Weak<dyn WritebackSink>) {
        *self.sink.write() = Some(sink);
    }

    /// The current settings.
    pub fn config(&self) -> CacheConfig {
        *self.cfg.read()
    }

    /// Change settings on a live mount (the budget cannot go to 0: that needs a remount).
    pub fn set_config(&self, new: CacheConfig) -> Result<(), String> {
        if new.size == 0 {
            return Err("cache_size 0 turns the cache off, which needs a remount".into());
        }
        if new.size < 16 * P {
            return Err(format!("cache_size: at least 16 pages ({} bytes)", 16 * P));
        }
        *self.cfg.write() = new;
        self.make_room(0);
        self.kick_flusher();
        self.throttle.1.notify_all();
        Ok(())
    }

    fn file(&self, ino: u64, fd: &Fd) -> Result<Arc<CachedFile>, Errno> {
        if let Some(f) = self.files.get(&ino) {
            return Ok(f.clone());
        }
        // A truncate that finds no entry after changing the file (`truncate_with`) counts
        // itself in `unseen_truncates`: a stat taken before that is taken again, with the
        // map's slot held (the next truncate then finds the entry).
        let epoch = self.unseen_truncates.load(Ordering::Acquire);
        let mut st = nix::sys::stat::fstat(fd.as_fd())?;
        let entry = match self.files.entry(ino) {
            dashmap::mapref::entry::Entry::Occupied(o) => return Ok(o.get().clone()),
            dashmap::mapref::entry::Entry::Vacant(v) => v,
        };
        if self.unseen_truncates.load(Ordering::Acquire) != epoch {
            st = nix::sys::stat::fstat(fd.as_fd())?;
        }
        let size = st.st_size.max(0) as u64;
        let f = Arc::new(CachedFile {
            ino,
            flushing: AtomicU64::new(0),
            flush_gen: AtomicU64::new(0),
            st: Mutex::new(FileState {
                pages: BTreeMap::new(),
                size,
                disk_size: size,
                prealloc: past_end(&st),
                wb_fd: None,
                dirty: BTreeSet::new(),
                size_lost: false,
                mtime: None,
                mtime_pending: false,
                dead: false,
                seq: 0,
            }),
            cv: Condvar::new(),
            wb: Mutex::new(()),
        });
        Ok(entry.insert(f).value().clone())
    }

    fn next_token(&self) -> u64 {
        self.token.fetch_add(1, Ordering::Relaxed)
    }

    /// Back within the budget after pages were added: loads running at once each made room
    /// for their own pages only (and pages not yet on the LRU list could not be evicted for
    /// the others), so together they may pass it; nothing else would bring the cache back
    /// until the next load.
    pub(super) fn trim_to_budget(&self) {
        if self.bytes.load(Ordering::Acquire) > self.cfg.read().page_budget() {
            self.make_room(0);
        }
    }

    /// Evict clean pages until `extra` more bytes fit in the budget. False if they do not.
    fn make_room(&self, extra: u64) -> bool {
        let budget = self.cfg.read().page_budget();
        if extra > budget {
            // Evicting everything would not make it fit: keep what is cached.
            return false;
        }
        loop {
            let used = self.bytes.load(Ordering::Acquire);
            if used + extra <= budget {
                return true;
            }
            // Take a batch of the least recently used keys, then visit their files in turn: at
            // least EVICT_BATCH (as the kernel's reclaim isolates SWAP_CLUSTER_MAX pages at a
            // time), so that a load's pages, together at the cold end, go together.
            let need = (used + extra - budget).div_ceil(P) as usize;
            let want = need
                .max(EVICT_BATCH.min((budget / P / 16) as usize))
                .clamp(1, 256);
            let mut victims: Vec<(u64, u64)> = {
                let mut lru = self.lru.lock();
                (0..want)
                    .map_while(|_| lru.pop_lru().map(|(k, ())| k))
                    .collect()
            };
            if victims.is_empty() {
                return false;
            }
            victims.sort_unstable();
            let mut i = 0;
            while i < victims.len() {
                let ino = victims[i].0;
                let mut j = i;
                while j < victims.len() && victims[j].0 == ino {
                    j += 1;
                }
                let Some(f) = self.files.get(&ino).map(|f| f.clone()) else {
                    i = j;
                    continue;
                };
                let mut st = f.st.lock();
                let mut freed = 0u64;
                let mut split = Split::default();
                for &(_, idx) in &victims[i..j] {
                    if let Some(Slot::Ready(p)) = st.pages.get(&idx)
                        && !p.dirty
                        && !p.writeback
                    {
                        split.note(idx, &p.data);
                        st.pages.remove(&idx);
                        freed += 1;
                    }
                }
                split.apply(&mut st);
                let empty = st.pages.is_empty() && st.dirty.is_empty() && !st.mtime_pending;
                drop(st);
                self.bytes.fetch_sub(freed * P, Ordering::AcqRel);
                self.stats.evicted.fetch_add(freed, Ordering::Relaxed);
                if empty {
                    // Forget the file too, unless someone else holds it right now.
                    self.files.remove_if(&ino, |_, v| {
                        Arc::strong_count(v) == 2 && v.st.lock().pages.is_empty()
                    });
                }
                i = j;
            }
        }
    }

    /// Times were set on `ino` explicitly (after [`PageCache::sync_file`]): the disk's are the
    /// file's.
    pub fn times_set(&self, ino: u64) {
        if let Some(f) = self.files.get(&ino).map(|f| f.clone()) {
            let mut st = f.st.lock();
            if !st.mtime_pending {
                st.mtime = None;
            }
        }
    }

    /// Size and mtime to show for `ino` after writes through the cache, and how many of its
    /// pages are dirty (not on disk yet).
    pub fn attr_override(&self, ino: u64) -> Option<(u64, (i64, i64), u64)> {
        let f = self.files.get(&ino)?.clone();
        let st = f.st.lock();
        st.mtime.map(|m| (st.size, m, st.dirty.len() as u64))
    }

    /// Change the size of `ino` to `size` through `op` (which truncates the backing file),
    /// with write-back of the file held off; pages past the new end are dropped (their
    /// charges handed back) and the partial last page is zeroed past it.
    pub fn truncate_with<T, E>(
        &self,
        ino: u64,
        size: u64,
        op: impl FnOnce() -> Result<T, E>,
    ) -> Result<T, E> {
        let before = self.files.get(&ino).map(|f| f.clone());
        let wb = before.as_ref().map(|f| f.wb.lock());
        let r = op()?;
        // An entry made meanwhile (by a reader, from a stat that may predate the truncate) is
        // brought to the new size too.
        if before.is_none() {
            // (Before the look: a reader that made its entry since either finds the count
            // moved and stats again, or had inserted it before this look finds it.)
            self.unseen_truncates.fetch_add(1, Ordering::AcqRel);
        }
        let Some(f) = before
            .clone()
            .or_else(|| self.files.get(&ino).map(|f| f.clone()))
        else {
            return Ok(r);
        };
        let mut st = f.st.lock();
        self.drop_pages(&f, &mut st, size.div_ceil(P));
        if size % P != 0 {
            match st.pages.get_mut(&(size / P)) {
                Some(Slot::Ready(p)) => p.data.make_mut()[(size % P) as usize..].fill(0),
                // A load of the last page, whose read may predate the truncate (the old bytes
                // past the new end): it does not land, its waiters read the page again.
                Some(_) => {
                    st.pages.remove(&(size / P));
                }
                None => {}
            }
        }
        st.size = size;
        st.disk_size = size;
        st.size_lost = false;
        // The truncate stamped the file; dirty pages left will stamp it again when written.
        st.mtime_pending = !st.dirty.is_empty();
        st.mtime = st.mtime_pending.then(now);
        drop(st);
        drop(wb);
        f.cv.notify_all();
        Ok(r)
    }

    /// Drop the pages of `f` from index `from` on (dirty ones too: the data is gone).
    fn drop_pages(&self, f: &CachedFile, st: &mut FileState, from: u64) {
        let gone = st.pages.split_off(&from);
        let undirty = st.dirty.split_off(&from).len() as u64;
        let (mut freed, mut released) = (0u64, 0u64);
        let mut keys = Vec::new();
        let mut split = Split::default();
        for (i, s) in gone {
            if let Slot::Ready(p) = s {
                split.note(i, &p.data);
                freed += 1;
                keys.push(i);
                if p.charged {
                    released += P;
                }
            }
        }
        split.apply(st);
        self.bytes.fetch_sub(freed * P, Ordering::AcqRel);
        self.dirty.fetch_sub(undirty * P, Ordering::AcqRel);
        if let Some(q) = &self.quota {
            q.adjust_bytes(-(released as i64));
        }
        if st.dirty.is_empty() {
            st.wb_fd = None;
            self.dirty_files.lock().remove(&f.ino);
        }
        if !keys.is_empty() {
            let mut lru = self.lru.lock();
            for i in keys {
                lru.pop(&(f.ino, i));
            }
        }
        if undirty > 0 {
            self.throttle.1.notify_all();
        }
    }

    /// The file `ino` was accounted freed (its last name is gone) but its pages stay, for the
    /// kernel, which still holds it: hand back the quota reserved for those of its pages that
    /// have no blocks yet. Whatever of them is written back later is not counted.
    pub fn uncharge(&self, ino: u64) {
        let Some(q) = &self.quota else {
            return;
        };
        let Some(f) = self.files.get(&ino).map(|f| f.clone()) else {
            return;
        };
        let mut st = f.st.lock();
        let mut released = 0u64;
        for s in st.pages.values_mut() {
            if let Slot::Ready(p) = s
                && std::mem::take(&mut p.charged)
            {
                released += P;
            }
        }
        drop(st);
        q.adjust_bytes(-(released as i64));
    }

    /// A token for settling the quota of `ino` from its upper file's stat: None while a
    /// write-back batch of it is in flight (its pages may be on disk, and so in a stat, while
    /// their charge is still counted: the flusher settles the file itself once it hands the
    /// charge back). Take one before the stat and one after; if they differ, a batch began in
    /// between and the stat may count pages still charged.
    pub fn charge_token(&self, ino: u64) -> Option<u64> {
        let Some(f) = self.files.get(&ino) else {
            // Not cached: nothing charged (a batch of a file cached meanwhile changes the
            // token: generations start at 1).
            return Some(0);
        };
        // (The flusher counts a batch in before it moves the generation on.)
        let generation = f.flush_gen.load(Ordering::SeqCst);
        if f.flushing.load(Ordering::SeqCst) > 0 {
            return None;
        }
        Some(generation)
    }

    /// Forget everything about `ino` (its last name is gone and nothing holds it open, or the
    /// inode number now names a new file). Dirty data is discarded.
    pub fn drop_file(&self, ino: u64) {
        self.forget_file(ino, false);
    }

    /// [`PageCache::drop_file`]; `keep_error`: the file's write-back error stays for its
    /// descriptors' fsyncs (the file lives on, read and written behind the cache).
    fn forget_file(&self, ino: u64, keep_error: bool) {
        let Some((_, f)) = self.files.remove(&ino) else {
            if !keep_error {
                self.errors.lock().remove(&ino);
            }
            return;
        };
        let _wb = f.wb.lock();
        let mut st = f.st.lock();
        st.dead = true;
        // (Under the file's locks: a write-back in flight records its error under them,
        // and records none once the file is dead.)
        if !keep_error {
            self.errors.lock().remove(&ino);
        }
        self.drop_pages(&f, &mut st, 0);
        st.mtime = None;
        st.mtime_pending = false;
        drop(st);
        f.cv.notify_all();
    }

    /// Does the cache hold dirty pages of `ino` (or a change not yet written)?
    pub fn is_dirty(&self, ino: u64) -> bool {
        self.dirty_files.lock().contains_key(&ino)
            || self
                .files
                .get(&ino)
                .is_some_and(|f| !f.st.lock().dirty.is_empty())
    }

    /// Hand `ino` over to I/O that bypasses the cache (FUSE passthrough): forget its pages and
    /// state if nothing of it is waiting to be written. Returns false, changing nothing, if
    /// something is (dirty pages, a time not yet stamped, an error not yet reported).
    pub fn hand_over(&self, ino: u64) -> bool {
        let Some(f) = self.files.get(&ino).map(|f| f.clone()) else {
            return true;
        };
        {
            let st = f.st.lock();
            if !st.dirty.is_empty() || st.mtime_pending {
                return false;
            }
        }
        if self.errors.lock().get(&ino).is_some_and(|w| !w.seen) {
            return false;
        }
        if self.dirty_files.lock().contains_key(&ino) {
            return false;
        }
        // (A reported error stays: a descriptor open before it has not necessarily been told.)
        self.forget_file(ino, true);
        true
    }

    /// Change `ino`'s file behind the cache with `op` (fallocate, a write that bypasses it, a
    /// copy into it): its dirty pages are written first, and its clean pages in
    /// `[off, off + len)` (len 0: to the end) are forgotten before and again after `op`, with
    /// the loads that started meanwhile (their reads may predate the change: they do not
    /// land). Errors of the write-back come before `op` runs.
    pub fn invalidate_with<T>(
        &self,
        ino: u64,
        off: u64,
        len: u64,
        op: impl FnOnce() -> T,
    ) -> Result<T, Errno> {
        self.write_out(ino)?;
        let from = off / P;
        let to = if len == 0 {
            u64::MAX
        } else {
            (off + len).div_ceil(P)
        };
        let before = self.files.get(&ino).map(|f| f.clone());
        if let Some(f) = &before {
            self.forget_clean(f, from, to);
        }
        let r = op();
        // (The file's entry may have been made meanwhile, by a reader.)
        if let Some(f) = before.or_else(|| self.files.get(&ino).map(|f| f.clone())) {
            self.forget_clean(&f, from, to);
        }
        Ok(r)
    }

    /// Forget the pages of `f` in `[from, to)` that are not dirty, and the loads of any.
    fn forget_clean(&self, f: &CachedFile, from: u64, to: u64) {
        let _wb = f.wb.lock();
        let mut st = f.st.lock();
        // Removed one by one: O(pages in the range), not a rebuild of the file's whole map.
        let gone: Vec<u64> = st
            .pages
            .range(from..to)
            .filter(|(_, s)| !matches!(s, Slot::Ready(p) if p.dirty))
            .map(|(&i, _)| i)
            .collect();
        let mut freed = 0u64;
        let mut keys = Vec::new();
        let mut split = Split::default();
        for i in gone {
            if let Some(Slot::Ready(p)) = st.pages.remove(&i) {
                split.note(i, &p.data);
                freed += 1;
                keys.push(i);
            }
        }
        split.apply(&mut st);
        self.bytes.fetch_sub(freed * P, Ordering::AcqRel);
        drop(st);
        f.cv.notify_all();
        let mut lru = self.lru.lock();
        for i in keys {
            lru.pop(&(f.ino, i));
        }
    }

    /// The backing file of `ino` was changed behind the cache (fallocate, a direct write):
    /// its stat is now `st`.
    pub fn set_size(&self, ino: u64, st: &nix::sys::stat::FileStat) {
        if let Some(f) = self.files.get(&ino).map(|f| f.clone()) {
            let size = st.st_size.max(0) as u64;
            let mut s = f.st.lock();
            s.disk_size = size;
            s.prealloc = past_end(st);
            if s.dirty.is_empty() || size > s.size {
                s.size = size;
            }
            if !s.mtime_pending {
                // The disk's times are the file's again.
                s.mtime = None;
            }
        }
    }

    /// Dirty bytes (including pages under write-back).
    pub fn dirty_bytes(&self) -> u64 {
        self.dirty.load(Ordering::Acquire)
    }

    /// Stop caching writes: drain everything dirty, then write every later write through.
    /// `progress` hears how much is left every second or so.
    pub fn close(&self) -> Result<(), Errno> {
        self.closing.store(true, Ordering::Release);
        let r = self.sync_all();
        self.ra.lock().tx = None;
        r
    }

    /// Record the kernel's readahead on the mount (after [`kernel_ra::apply`]).
    pub fn set_kernel_readahead_kb(&self, kb: u64) {
        self.kernel_ra_kb.store(kb, Ordering::Relaxed);
    }

    /// The kernel's readahead on the mount in KiB, as last applied (what
    /// `kernel_readahead_kb=0`, auto, came to).
    pub fn kernel_readahead_kb(&self) -> u64 {
        self.kernel_ra_kb.load(Ordering::Relaxed)
    }

    /// The current figures.
    pub fn stats(&self) -> CacheStats {
        let cfg = *self.cfg.read();
        let (bg, thresh) = cfg.thresholds();
        let s = &self.stats;
        let l = |a: &AtomicU64| a.load(Ordering::Relaxed);
        CacheStats {
            fields: vec![
                ("cache_size", cfg.size),
                ("cache_page_budget", cfg.page_budget()),
                ("cache_bytes", l(&self.bytes)),
                ("cache_hits", l(&s.hits)),
                ("cache_misses", l(&s.misses)),
                ("evicted_pages", l(&s.evicted)),
                ("heap_trims", l(&s.heap_trims)),
                ("readahead_pages", l(&s.ra_pages)),
                ("readahead_used_pages", l(&s.ra_used)),
                ("kernel_readahead_kb", l(&self.kernel_ra_kb)),
                ("drop_behind_pages", l(&s.dropped_behind)),
                ("dirty_bytes", l(&self.dirty)),
                ("writeback_bytes", l(&self.writeback)),
                ("written_back_bytes", l(&s.written_back)),
                ("close_writebacks", l(&s.close_writebacks)),
                ("bg_thresh_bytes", bg),
                ("dirty_thresh_bytes", thresh),
                ("throttle_events", l(&s.throttle_events)),
                ("bg_thresh_crossings", l(&s.bg_crossings)),
                ("dirty_limit_waits", l(&s.limit_waits)),
                ("throttle_ms", l(&s.throttle_us) / 1000),
                ("flusher_runs", l(&s.flusher_runs)),
                ("writeback_bandwidth", self.bw.load(Ordering::Relaxed)),
                ("dirty_files", self.dirty_files.lock().len() as u64),
            ],
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;
    use std::time::Duration;

    fn tmpfile(data: &[u8]) -> (tempfile::TempDir, Fd) {
        let d = tempfile::tempdir().expect("tempdir");
        let p = d.path().join("f");
        std::fs::File::create(&p)
            .and_then(|mut f| f.write_all(data))
            .expect("write");
        let f = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(&p)
            .expect("open");
        (d, Arc::new(OwnedFd::from(f)))
    }

    fn cfg(size: u64) -> CacheConfig {
        CacheConfig {
            size,
            ..CacheConfig::default()
        }
    }

    /// Drop-behind: a sequential stream's synchronous misses are returned but not kept;
    /// random reads and readahead windows are kept.
    #[test]
    fn drop_behind_keeps_random_reads_and_readahead_but_not_streams() {
        let data: Vec<u8> = (0..1024 * PAGE).map(|i| (i % 253) as u8).collect();
        let (_d, fd) = tmpfile(&data);
        let mut config = cfg(16 << 20);
        config.readahead_kb = 128;
        let c = PageCache::new(config, None).expect("cache");
        let ra = Mutex::new(RaState {
            drop_behind: true,
            ..RaState::default()
        });
        // A stream of 128 KiB requests, each as large as the window: all synchronous.
        for k in 0..8u64 {
            let off = k * 32 * P;
            let got = c.read(1, &ra, &fd, off, 32 * PAGE as u32).expect("read");
            assert_eq!(&got[..], &data[off as usize..off as usize + 32 * PAGE]);
        }
        let s = c.stats();
        assert_eq!(s.get("cache_misses"), Some(256));
        assert_eq!(s.get("drop_behind_pages"), Some(256));
        assert_eq!(s.get("cache_bytes"), Some(0));
        // Random single pages far apart (beyond the stream slack) are kept (a second read hits).
        let ra2 = Mutex::new(RaState {
            drop_behind: true,
            ..RaState::default()
        });
        let _ = c.read(2, &ra2, &fd, 900 * P, 100).expect("read");
        let _ = c.read(2, &ra2, &fd, 100 * P, 100).expect("read");
        let _ = c.read(2, &ra2, &fd, 500 * P, 100).expect("read");
        assert_eq!(c.stats().get("cache_bytes"), Some(3 * P));
        let got = c.read(2, &ra2, &fd, 100 * P + 7, 50).expect("read");
        assert_eq!(&got[..], &data[100 * PAGE + 7..100 * PAGE + 57]);
        assert_eq!(c.stats().get("cache_hits"), Some(1));
        // Without drop-behind the stream is kept.
        let ra3 = Mutex::new(RaState::default());
        let _ = c.read(3, &ra3, &fd, 0, 32 * PAGE as u32).expect("read");
        assert!(c.stats().get("cache_bytes").unwrap_or(0) >= 32 * P + 3 * P);
    }

    /// A read whose page load panics leaves no page loading: the next read of them (which
    /// would wait for the load for good) reads them itself.
    #[test]
    fn a_read_that_panics_leaves_no_page_loading() {
        let data: Vec<u8> = (0..64 * PAGE).map(|i| (i % 249) as u8).collect();
        let (_d, fd) = tmpfile(&data);
        let c = Arc::new(PageCache::new(cfg(16 << 20), None).expect("cache"));
        let ra = Arc::new(Mutex::new(RaState::default()));
        read::PANIC_IN_READ.with(|p| p.set(true));
        let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            c.read(1, &ra, &fd, 3 * P, 100)
        }));
        assert!(r.is_err(), "the injected panic");
        let (tx, rx) = std::sync::mpsc::channel();
        {
            let (c, ra, fd) = (c.clone(), ra.clone(), fd.clone());
            std::thread::spawn(move || {
                let _ = tx.send(c.read(1, &ra, &fd, 3 * P, 100));
            });
        }
        let got = rx
            .recv_timeout(Duration::from_secs(10))
            .expect("the second read waits for a load that will never end")
            .expect("read");
        assert_eq!(&got[..], &data[3 * PAGE..3 * PAGE + 100]);
    }

    #[test]
    fn read_hits_after_a_miss_and_reads_ahead() {
        let data: Vec<u8> = (0..64 * PAGE).map(|i| (i % 251) as u8).collect();
        let (_d, fd) = tmpfile(&data);
        let c = PageCache::new(cfg(16 << 20), None).expect("cache");
        let ra = Mutex::new(RaState::default());
        let got = c.read(1, &ra, &fd, 0, 4096).expect("read");
        assert_eq!(&got[..], &data[..4096]);
        // Wait for the background window.
        let t = Instant::now();
        while c.stats().get("readahead_pages") == Some(0) && t.elapsed() < Duration::from_secs(5) {
            std::thread::sleep(Duration::from_millis(5));
        }
        assert_eq!(c.stats().get("readahead_pages"), Some(3));
        let got = c.read(1, &ra, &fd, 4096, 8192).expect("read");
        assert_eq!(&got[..], &data[4096..12288]);
        let s = c.stats();
        assert_eq!(s.get("cache_misses"), Some(1));
        assert_eq!(s.get("readahead_used_pages"), Some(2));
        // Reads across the whole file see the file.
        let mut all = Vec::new();
        for off in (0..data.len()).step_by(10_000) {
            all.extend_from_slice(&c.read(1, &ra, &fd, off as u64, 10_000).expect("read"));
        }
        assert_eq!(all, data);
        // Past EOF: nothing.
        assert!(
            c.read(1, &ra, &fd, data.len() as u64, 100)
                .expect("read")
                .is_empty()
        );
    }

    /// A writer holding a file the cache has forgotten meanwhile (a lost copy-up) dirties
    /// nothing: its pages would count as dirty for good, with no file for the flusher to write
    /// (review), until every writer waited at the dirty limit.
    #[test]
    fn a_forgotten_file_takes_no_writes() {
        let (_d, fd) = tmpfile(&[7u8; 10_000]);
        let c = PageCache::new(cfg(16 << 20), None).expect("cache");
        let f = c.file(3, &fd).expect("file");
        c.drop_file(3);
        assert_eq!(c.apply(&f, &fd, 0, b"late").err(), Some(Errno::EIO));
        assert_eq!(c.dirty_bytes(), 0);
        assert!(!c.is_dirty(3));
    }

    /// A write-back that panics leaves its pages dirty and unmarked: the next sync writes
    /// them (left marked under write-back, every pass skipped them and the sync returned as
    /// if they were on disk).
    #[test]
    fn a_write_back_that_panics_leaves_its_pages_to_the_next() {
        let (_d, fd) = tmpfile(&[7u8; 3 * PAGE]);
        let c = Arc::new(PageCache::new(cfg(16 << 20), None).expect("cache"));
        c.write(4, &fd, 100, b"written").expect("write");
        flusher::PANIC_IN_WRITEBACK.with(|p| p.set(true));
        let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| c.sync_file(4)));
        assert!(r.is_err(), "the injected panic");
        assert_eq!(c.stats().get("writeback_bytes"), Some(0));
        assert!(c.is_dirty(4), "the page is still to be written");
        let (tx, rx) = std::sync::mpsc::channel();
        {
            let c = c.clone();
            std::thread::spawn(move || {
                let _ = tx.send(c.sync_file(4));
            });
        }
        rx.recv_timeout(Duration::from_secs(10))
            .expect("the second sync waits for good")
            .expect("sync");
        let mut disk = vec![0u8; 7];
        crate::layer::sys::pread_full(fd.as_fd(), &mut disk, 100).expect("pread");
        assert_eq!(&disk, b"written");
        assert_eq!(c.dirty_bytes(), 0);
        assert!(!c.is_dirty(4));
    }

    #[test]
    fn writes_are_read_back_and_flushed() {
        let (_d, fd) = tmpfile(&[7u8; 10_000]);
        let c = PageCache::new(cfg(16 << 20), None).expect("cache");
        let ra = Mutex::new(RaState::default());
        assert_eq!(c.write(5, &fd, 9_000, b"hello world").expect("write"), 11);
        assert_eq!(c.write(5, &fd, 20_000, b"past eof").expect("write"), 8);
        let got = c.read(5, &ra, &fd, 8_995, 20).expect("read");
        assert_eq!(&got[..5], &[7u8; 5]);
        assert_eq!(&got[5..16], b"hello world");
        assert_eq!(c.attr_override(5).expect("dirty").0, 20_008);
        // Not on disk yet.
        assert_eq!(
            nix::sys::stat::fstat(fd.as_fd()).expect("fstat").st_size,
            10_000
        );
        c.sync_file(5).expect("sync");
        let mut disk = vec![0u8; 20_008];
        let n = crate::layer::sys::pread_full(fd.as_fd(), &mut disk, 0).expect("pread");
        assert_eq!(n, 20_008);
        assert_eq!(&disk[9_000..9_011], b"hello world");
        assert_eq!(&disk[10_000..20_000], &vec![0u8; 10_000][..]);
        assert_eq!(&disk[20_000..], b"past eof");
        assert_eq!(c.dirty_bytes(), 0);
        // Still shown as written (and now stamped on the file too).
        assert_eq!(c.attr_override(5).map(|a| a.0), Some(20_008));
        let st = nix::sys::stat::fstat(fd.as_fd()).expect("fstat");
        assert_eq!(
            Some((st.st_mtime, st.st_mtime_nsec)),
            c.attr_override(5).map(|a| a.1)
        );
    }

    /// More dirty pages than one write-back batch, scattered among clean cached ones (read
    /// in first), all reach the file in one sync; batches look on from where the last ended.
    #[test]
    fn a_sync_writes_scattered_dirty_pages_beyond_one_batch() {
        let pages = 2048usize;
        let (_d, fd) = tmpfile(&vec![1u8; pages * PAGE]);
        let c = PageCache::new(cfg(64 << 20), None).expect("cache");
        let ra = Mutex::new(RaState::default());
        // Every page cached clean first.
        for i in 0..pages {
            c.read(9, &ra, &fd, (i * PAGE) as u64, PAGE as u32)
                .expect("read");
        }
        // Every third page dirty: 683 pages, more than two batches of 256.
        let dirty: Vec<usize> = (0..pages).step_by(3).collect();
        for &i in &dirty {
            c.write(9, &fd, (i * PAGE) as u64 + 100, &[2u8; 8])
                .expect("write");
        }
        c.sync_file(9).expect("sync");
        assert_eq!(c.dirty_bytes(), 0);
        let mut disk = vec![0u8; pages * PAGE];
        crate::layer::sys::pread_full(fd.as_fd(), &mut disk, 0).expect("pread");
        for i in 0..pages {
            let at = i * PAGE + 100;
            let want = if i % 3 == 0 { 2 } else { 1 };
            assert_eq!(disk[at..at + 8], [want; 8], "page {i}");
        }
    }

    /// The dirty index holds exactly the dirty pages, and the byte count matches.
    fn assert_dirty_index(c: &PageCache, ino: u64) {
        let f = c.files.get(&ino).map(|f| f.clone()).expect("file");
        let st = f.st.lock();
        let flagged: BTreeSet<u64> = st
            .pages
            .iter()
            .filter(|(_, s)| matches!(s, Slot::Ready(p) if p.dirty))
            .map(|(&i, _)| i)
            .collect();
        assert_eq!(st.dirty, flagged, "dirty index");
        assert_eq!(c.dirty_bytes(), flagged.len() as u64 * P);
    }

    /// Writes, partial write-back, rewrites, truncates and reads in a random order keep the
    /// dirty index equal to the dirty pages, and a sync leaves the file as written.
    #[test]
    fn the_dirty_index_follows_every_change() {
        let pages = 64u64;
        let (_d, fd) = tmpfile(&vec![0u8; (pages * P) as usize]);
        let c = PageCache::new(cfg(64 << 20), None).expect("cache");
        let ra = Mutex::new(RaState::default());
        let mut model = vec![0u8; (pages * P) as usize];
        let mut x = 0x2545_f491_4f6c_dd1du64;
        let mut next = |n: u64| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x % n
        };
        for step in 0..400 {
            match next(6) {
                0..=2 => {
                    let off = next(pages * P - 9000);
                    let len = 1 + next(9000) as usize;
                    let b = (step % 250) as u8 + 1;
                    c.write(9, &fd, off, &vec![b; len]).expect("write");
                    let end = (off as usize + len).max(model.len());
                    model.resize(end, 0);
                    model[off as usize..off as usize + len].fill(b);
                }
                3 => {
                    let f = c.files.get(&9).map(|f| f.clone());
                    if let Some(f) = f {
                        c.writeback_file(&f, 1 + next(5)).expect("write-back");
                    }
                }
                4 => {
                    let size = next(pages * P);
                    c.truncate_with(9, size, || nix::unistd::ftruncate(fd.as_fd(), size as i64))
                        .expect("truncate");
                    model.truncate(size as usize);
                    model.resize((pages * P) as usize, 0);
                    c.truncate_with(9, pages * P, || {
                        nix::unistd::ftruncate(fd.as_fd(), (pages * P) as i64)
                    })
                    .expect("extend");
                }
                _ => {
                    let off = next(pages * P);
                    c.read(9, &ra, &fd, off, 8192).expect("read");
                }
            }
            if c.files.contains_key(&9) {
                assert_dirty_index(&c, 9);
            }
        }
        c.sync_file(9).expect("sync");
        assert_dirty_index(&c, 9);
        let mut disk = vec![0u8; model.len()];
        crate::layer::sys::pread_full(fd.as_fd(), &mut disk, 0).expect("pread");
        assert!(disk == model, "file content after sync");
    }

    /// Pages past the largest file the filesystem takes (EFBIG) are dropped at write-back,
    /// the error kept for fsync: kept dirty, they held the dirty budget for good and every
    /// writer of the mount waited at the limit. Run in a child process of its own: the limit
    /// is RLIMIT_FSIZE, which applies to the whole process.
    #[test]
    fn pages_past_the_file_size_limit_are_dropped_at_write_back() {
        const CHILD: &str = "UNIONFS_TEST_EFBIG_CHILD";
        if std::env::var_os(CHILD).is_none() {
            let out = std::process::Command::new(std::env::current_exe().expect("exe"))
                .args([
                    "--exact",
                    "cache::tests::pages_past_the_file_size_limit_are_dropped_at_write_back",
                    "--nocapture",
                ])
                .env(CHILD, "1")
                .output()
                .expect("run the child");
            let text = String::from_utf8_lossy(&out.stdout).to_string()
                + &String::from_utf8_lossy(&out.stderr);
            assert!(out.status.success() && text.contains("1 passed"), "{text}");
            return;
        }
        // SAFETY: ignoring SIGXFSZ (so a write past the limit fails with EFBIG instead of
        // killing the process) and lowering RLIMIT_FSIZE, in this child process only.
        unsafe {
            libc::signal(libc::SIGXFSZ, libc::SIG_IGN);
            let lim = libc::rlimit {
                rlim_cur: 16 * P,
                rlim_max: libc::RLIM_INFINITY,
            };
            assert_eq!(libc::setrlimit(libc::RLIMIT_FSIZE, &lim), 0);
        }
        let (_d, fd) = tmpfile(&[]);
        let c = PageCache::new(cfg(64 << 20), None).expect("cache");
        c.write(9, &fd, 0, &vec![1u8; 8 * PAGE])
            .expect("write below");
        c.write(9, &fd, 32 * P, &vec![2u8; 4 * PAGE])
            .expect("write past");
        assert_eq!(c.dirty_bytes(), 12 * P);
        assert_eq!(c.sync_file(9), Err(Errno::EFBIG));
        assert_eq!(c.dirty_bytes(), 0, "nothing stays dirty");
        assert_dirty_index(&c, 9);
        // What fit is on disk, the size is the file's again, and the next sync is clean.
        let st = nix::sys::stat::fstat(fd.as_fd()).expect("fstat");
        assert_eq!(st.st_size as u64, 8 * P);
        assert_eq!(c.attr_override(9).map(|a| a.0), Some(8 * P));
        c.sync_file(9).expect("nothing left to write");
        // The budget is free: more writes below the limit go through.
        c.write(9, &fd, 8 * P, &vec![3u8; 4 * PAGE]).expect("write");
        c.sync_file(9).expect("sync");
        assert_eq!(c.dirty_bytes(), 0);
    }

    /// A file of `pages` pages of `data` and a 16 MiB cache without readahead (each read reads
    /// what it asks for, into one buffer).
    fn no_readahead(
        pages: usize,
    ) -> (
        Vec<u8>,
        tempfile::TempDir,
        Fd,
        Arc<PageCache>,
        Mutex<RaState>,
    ) {
        let data: Vec<u8> = (0..pages * PAGE).map(|i| (i % 251) as u8).collect();
        let (d, fd) = tmpfile(&data);
        let c = PageCache::new(
            CacheConfig {
                readahead_kb: 0,
                ..cfg(16 << 20)
            },
            None,
        )
        .expect("cache");
        (data, d, fd, c, Mutex::new(RaState::default()))
    }

    #[test]
    fn reads_reply_from_shared_buffers_and_writes_copy() {
        let (data, _d, fd, c, ra) = no_readahead(16);
        // One miss reads 8 pages into one buffer; the reply is that buffer.
        let got = c.read(1, &ra, &fd, 0, 8 * PAGE as u32).expect("read");
        assert!(matches!(got, ReadData::Shared(..)));
        assert_eq!(&got[..], &data[..8 * PAGE]);
        // A hit inside it, unaligned: still a slice of the same buffer.
        let got = c.read(1, &ra, &fd, 100, 3 * PAGE as u32).expect("read");
        assert!(matches!(got, ReadData::Shared(..)));
        assert_eq!(&got[..], &data[100..100 + 3 * PAGE]);
        // Writing page 2 gives it its own buffer; its neighbours keep the old bytes.
        c.write(1, &fd, 2 * P + 10, b"xyz").expect("write");
        let got = c.read(1, &ra, &fd, 0, 8 * PAGE as u32).expect("read");
        assert!(matches!(got, ReadData::Owned(..)));
        let mut want = data[..8 * PAGE].to_vec();
        want[2 * PAGE + 10..2 * PAGE + 13].copy_from_slice(b"xyz");
        assert_eq!(&got[..], &want[..]);
        // Across two buffers (pages 0-7 and 8-15 read separately): copied.
        let got = c.read(1, &ra, &fd, 7 * P, 2 * PAGE as u32).expect("read");
        assert_eq!(&got[..], &data[7 * PAGE..9 * PAGE]);
    }

    /// Evicting part of a buffer gives the pages left of it buffers of their own, so the
    /// buffer's memory goes with the pages the cache no longer counts.
    #[test]
    fn evicting_part_of_a_buffer_unshares_the_rest() {
        let (data, _d, fd, c, ra) = no_readahead(32);
        let first = c.read(1, &ra, &fd, 0, 8 * PAGE as u32).expect("read");
        let ReadData::Shared(buf, _) = first else {
            panic!("one buffer for one miss")
        };
        for k in 1..4u64 {
            c.read(1, &ra, &fd, k * 8 * P, 8 * PAGE as u32)
                .expect("read");
        }
        // Pages 4-31 used again (a miss leaves its pages at the cold end): pages 0-3 are now
        // the least recently used.
        c.read(1, &ra, &fd, 8 * P, 24 * PAGE as u32).expect("read");
        c.read(1, &ra, &fd, 4 * P, 4 * PAGE as u32).expect("read");
        let mut small = c.config();
        small.size = 28 * (P + writeback::PAGE_META);
        c.set_config(small).expect("set");
        let f = c.files.get(&1).map(|f| f.clone()).expect("file");
        let st = f.st.lock();
        for idx in 0..4 {
            assert!(!st.pages.contains_key(&idx), "page {idx} evicted");
        }
        for idx in 4..8 {
            let Some(Slot::Ready(p)) = st.pages.get(&idx) else {
                panic!("page {idx} kept")
            };
            assert!(!Arc::ptr_eq(&p.data.buf, &buf), "page {idx} unshared");
            assert_eq!(p.data.bytes(), &data[idx as usize * PAGE..][..PAGE]);
        }
        // Pages 8-15 came in one buffer too: forgetting 10-11 (an invalidation) splits it.
        let Some(Slot::Ready(p)) = st.pages.get(&8) else {
            panic!("page 8 kept")
        };
        let second = p.data.buf.clone();
        assert_eq!(second.len(), 8 * PAGE);
        drop(st);
        c.forget_clean(&f, 10, 12);
        let st = f.st.lock();
        for idx in [8, 9, 12, 13, 14, 15] {
            let Some(Slot::Ready(p)) = st.pages.get(&idx) else {
                panic!("page {idx} kept")
            };
            assert!(!Arc::ptr_eq(&p.data.buf, &second), "page {idx} unshared");
        }
        drop(st);
        assert_eq!(
            Arc::strong_count(&buf),
            1,
            "only this test holds the buffer"
        );
        assert_eq!(Arc::strong_count(&second), 1);
        let got = c.read(1, &ra, &fd, 0, 32 * PAGE as u32).expect("read");
        assert_eq!(&got[..], &data[..]);
    }

    #[test]
    fn truncate_drops_pages_and_zeroes_the_tail() {
        let (_d, fd) = tmpfile(&[1u8; 3 * PAGE]);
        let c = PageCache::new(cfg(16 << 20), None).expect("cache");
        let ra = Mutex::new(RaState::default());
        c.write(9, &fd, 0, &[2u8; 3 * PAGE]).expect("write");
        c.truncate_with(9, 5000, || nix::unistd::ftruncate(fd.as_fd(), 5000))
            .expect("truncate");
        assert_eq!(c.dirty_bytes(), 2 * P);
        c.truncate_with(9, 9000, || nix::unistd::ftruncate(fd.as_fd(), 9000))
            .expect("truncate");
        let got = c.read(9, &ra, &fd, 0, 9000).expect("read");
        assert_eq!(got.len(), 9000);
        assert!(got[..5000].iter().all(|&b| b == 2));
        assert!(got[5000..].iter().all(|&b| b == 0));
        c.sync_file(9).expect("sync");
        let mut disk = vec![9u8; 9000];
        crate::layer::sys::pread_full(fd.as_fd(), &mut disk, 0).expect("pread");
        assert_eq!(&disk[..], &got[..]);
    }

    #[test]
    fn eviction_keeps_the_budget() {
        let data = vec![3u8; 256 * PAGE];
        let (_d, fd) = tmpfile(&data);
        let c = PageCache::new(cfg(32 * P), None).expect("cache");
        let ra = Mutex::new(RaState::default());
        for off in (0..data.len()).step_by(PAGE * 4) {
            let got = c
                .read(1, &ra, &fd, off as u64, 4 * PAGE as u32)
                .expect("read");
            assert_eq!(&got[..], &data[off..off + 4 * PAGE]);
            assert!(c.stats().get("cache_bytes").expect("bytes") <= 32 * P + 64 * P);
        }
        // Within the budget once the last read-ahead is in (polled: a loaded machine may
        // schedule the read-ahead worker late). Each load trims the cache back to the budget
        // once its pages are listed: loads at once each made room for their own pages only.
        let t = Instant::now();
        while c.stats().get("cache_bytes").expect("bytes") > 32 * P
            && t.elapsed() < Duration::from_secs(20)
        {
            std::thread::sleep(Duration::from_millis(10));
        }
        assert!(c.stats().get("cache_bytes").expect("bytes") <= 32 * P);
        assert!(c.stats().get("evicted_pages").expect("evicted") > 0);
    }

    #[test]
    fn a_stream_read_once_does_not_push_out_pages_in_use() {
        let (_d, hot) = tmpfile(&[1u8; 8 * PAGE]);
        let (_e, stream) = tmpfile(&vec![2u8; 512 * PAGE]);
        let c = PageCache::new(
            CacheConfig {
                readahead_kb: 0,
                ..cfg(64 * P)
            },
            None,
        )
        .expect("cache");
        let ra = Mutex::new(RaState::default());
        // Used twice: hot.
        for _ in 0..2 {
            c.read(1, &ra, &hot, 0, 8 * PAGE as u32).expect("read");
        }
        let ra2 = Mutex::new(RaState::default());
        for off in (0..512 * P).step_by(8 * PAGE) {
            c.read(2, &ra2, &stream, off, 8 * PAGE as u32)
                .expect("read");
        }
        assert!(c.stats().get("cache_bytes").expect("bytes") <= 64 * P);
        let misses = c.stats().get("cache_misses").expect("misses");
        c.read(1, &ra, &hot, 0, 8 * PAGE as u32).expect("read");
        assert_eq!(
            c.stats().get("cache_misses"),
            Some(misses),
            "the hot file was evicted by a one-pass stream"
        );
    }

    #[test]
    fn dirty_data_never_passes_the_limit() {
        let (_d, fd) = tmpfile(b"");
        // 1 MiB budget: bg 100 KiB, limit 200 KiB (ratios 10/20).
        let c = PageCache::new(cfg(1 << 20), None).expect("cache");
        let (_, thresh) = c.config().thresholds();
        let stop = Arc::new(AtomicBool::new(false));
        let max_seen = Arc::new(AtomicU64::new(0));
        let sampler = {
            let (c, stop, max_seen) = (c.clone(), stop.clone(), max_seen.clone());
            std::thread::spawn(move || {
                while !stop.load(Ordering::Relaxed) {
                    max_seen.fetch_max(c.dirty_bytes(), Ordering::Relaxed);
                    std::thread::yield_now();
                }
            })
        };
        let chunk = vec![5u8; 64 << 10];
        // At least 4 MiB, and on until the writer was throttled (a flusher that kept up
        // throttles nobody: on a loaded machine the writer may be the slower one for a while).
        let mut n = 0u64;
        while n < 64 || (c.stats().get("throttle_events").expect("events") == 0 && n < 4096) {
            c.write(2, &fd, n * chunk.len() as u64, &chunk)
                .expect("write");
            n += 1;
        }
        stop.store(true, Ordering::Relaxed);
        sampler.join().expect("join");
        assert!(
            max_seen.load(Ordering::Relaxed) <= thresh,
            "{max_seen:?} > {thresh}"
        );
        assert!(c.stats().get("throttle_events").expect("events") > 0);
        c.sync_file(2).expect("sync");
        let st = nix::sys::stat::fstat(fd.as_fd()).expect("fstat");
        assert_eq!(st.st_size, n as i64 * chunk.len() as i64);
    }
}
