//! The page cache for file data between FUSE and the layer files (DESIGN.md section 4).
//!
//! Pages are 4 KiB, keyed by node id and page index, held per file in a `BTreeMap` under the
//! file's lock; clean pages sit on one LRU list and are evicted when the cache would pass its
//! budget. Reads fill the cache through per-open-file readahead ([`readahead`]); writes land
//! as dirty pages and return, and the flusher thread writes them to the upper file
//! ([`writeback`] has the thresholds and the writer pacing of balance_dirty_pages).
//!
//! Quota: a write is charged when it is accepted — one page for each page it dirties that is
//! neither dirty already nor allocated on disk — and the charge is handed back once the
//! flusher has written the page and the union has settled the file's real allocation. The
//! flusher therefore never meets the quota.
//!
//! Locks, in the only order they are taken: a file's write-back lock (`wb`), then its state
//! (`st`), then the per-open-file readahead state, then the LRU list / dirty-file list. No
//! file's state is held while another file's is taken (eviction takes them one at a time).

pub mod readahead;
pub mod writeback;

use std::collections::{BTreeMap, HashMap};
use std::os::fd::{AsFd, OwnedFd};
use std::sync::atomic::{AtomicBool, AtomicI32, AtomicU64, Ordering};
use std::sync::{Arc, Weak, mpsc};
use std::time::{Duration, Instant};

use lru::LruCache;
use nix::errno::Errno;
use parking_lot::{Condvar, Mutex, MutexGuard, RwLock};

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
/// real allocation before the charge taken at accept time is handed back).
pub trait WritebackSink: Send + Sync {
    /// Pages of node `ino` were written through `fd`.
    fn written(&self, ino: u64, fd: std::os::fd::BorrowedFd<'_>);
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
    ndirty: u64,
    /// The time of the last write through the cache: shown as mtime/ctime (with `size`) from
    /// the write on, stamped on the file when its last dirty page is written, and kept (a stat
    /// racing with the last write-back must not see the disk's older values) until something
    /// else sets the file's size or times.
    mtime: Option<(i64, i64)>,
    /// `mtime` is not on disk yet.
    mtime_pending: bool,
    /// A write-back error not yet reported (fsync returns it, as errseq does).
    error: Option<Errno>,
    seq: u64,
}

/// One file's pages.
#[derive(Debug)]
pub struct CachedFile {
    ino: u64,
    st: Mutex<FileState>,
    cv: Condvar,
    wb: Mutex<()>,
}

#[derive(Debug, Default)]
struct Counters {
    hits: AtomicU64,
    misses: AtomicU64,
    ra_pages: AtomicU64,
    ra_used: AtomicU64,
    throttle_events: AtomicU64,
    throttle_us: AtomicU64,
    flusher_runs: AtomicU64,
    written_back: AtomicU64,
    evicted: AtomicU64,
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

struct RaJob {
    file: Arc<CachedFile>,
    fd: Fd,
    pages: Vec<u64>,
    token: u64,
    marker: u64,
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
    quota: Option<Arc<Quota>>,
    sink: RwLock<Option<Weak<dyn WritebackSink>>>,
    ra_tx: Mutex<Option<mpsc::Sender<RaJob>>>,
    closing: AtomicBool,
    /// Dirty data was above bg_thresh at the last look (to count crossings).
    above_bg: AtomicBool,
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

/// The reply for a read made of these page pieces: a slice of one buffer when they are
/// consecutive pieces of it, else a copy.
fn assemble(segs: Vec<(PageData, usize, usize)>) -> ReadData {
    if let Some((first, from, _)) = segs.first() {
        let contiguous = segs.windows(2).all(|w| {
            let ((a, _, ato), (b, bfrom, _)) = (&w[0], &w[1]);
            Arc::ptr_eq(&a.buf, &b.buf) && *ato == PAGE && *bfrom == 0 && b.off == a.off + PAGE
        });
        if contiguous {
            let start = first.off + from;
            let (last, _, to) = &segs[segs.len() - 1];
            return ReadData::Shared(first.buf.clone(), start..last.off + to);
        }
    }
    let mut out = Vec::with_capacity(segs.iter().map(|(_, a, b)| b - a).sum());
    for (d, a, b) in &segs {
        out.extend_from_slice(&d.bytes()[*a..*b]);
    }
    ReadData::Owned(out)
}

/// Does the file have blocks allocated past its end?
fn past_end(st: &nix::sys::stat::FileStat) -> bool {
    (st.st_blocks.max(0) as u64) * 512 > (st.st_size.max(0) as u64).div_ceil(P) * P
}

/// Read `n` pages from `start` (zero past EOF) into one buffer; returns the pages.
fn read_pages(fd: &Fd, start: u64, n: usize) -> Result<Vec<PageData>, Errno> {
    let mut buf = vec![0u8; n * PAGE];
    crate::layer::sys::pread_full(fd.as_fd(), &mut buf, (start * P) as i64)?;
    let buf = Arc::new(buf);
    Ok((0..n)
        .map(|k| PageData {
            buf: buf.clone(),
            off: k * PAGE,
        })
        .collect())
}

/// pwritev all of `parts` (in order) at `off`.
fn pwritev_all(fd: &Fd, parts: &[&[u8]], off: u64) -> Result<(), Errno> {
    let total: usize = parts.iter().map(|p| p.len()).sum();
    let mut done = 0usize;
    while done < total {
        // Skip what is written, cut into the part where the last call stopped.
        let mut skip = done;
        let slices: Vec<std::io::IoSlice<'_>> = parts
            .iter()
            .filter_map(|p| {
                if skip >= p.len() {
                    skip -= p.len();
                    None
                } else {
                    let s = std::io::IoSlice::new(&p[skip..]);
                    skip = 0;
                    Some(s)
                }
            })
            .collect();
        match nix::sys::uio::pwritev(fd.as_fd(), &slices, (off + done as u64) as i64) {
            Ok(0) => return Err(Errno::EIO),
            Ok(n) => done += n,
            Err(Errno::EINTR) => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

impl PageCache {
    /// A cache with `cfg` (size > 0); `quota` is charged for accepted writes. Starts the
    /// flusher and the readahead workers.
    pub fn new(cfg: CacheConfig, quota: Option<Arc<Quota>>) -> std::io::Result<Arc<PageCache>> {
        let (tx, rx) = mpsc::channel::<RaJob>();
        let c = Arc::new(PageCache {
            cfg: RwLock::new(cfg),
            files: dashmap::DashMap::new(),
            lru: Mutex::new(LruCache::unbounded()),
            bytes: AtomicU64::new(0),
            dirty: AtomicU64::new(0),
            writeback: AtomicU64::new(0),
            dirty_files: Mutex::new(HashMap::new()),
            flusher: Arc::new(Signal::default()),
            throttle: (Mutex::new(()), Condvar::new()),
            bw: AtomicU64::new(100 << 20),
            flush_error: AtomicI32::new(0),
            quota,
            sink: RwLock::new(None),
            ra_tx: Mutex::new(Some(tx)),
            closing: AtomicBool::new(false),
            above_bg: AtomicBool::new(false),
            token: AtomicU64::new(1),
            stats: Counters::default(),
        });
        let weak = Arc::downgrade(&c);
        let sig = c.flusher.clone();
        std::thread::Builder::new()
            .name("flusher".into())
            .spawn(move || flusher_main(weak, sig))?;
        let rx = Arc::new(Mutex::new(rx));
        for i in 0..RA_WORKERS {
            let weak = Arc::downgrade(&c);
            let rx = rx.clone();
            std::thread::Builder::new()
                .name(format!("readahead-{i}"))
                .spawn(move || {
                    loop {
                        let job = rx.lock().recv();
                        let Ok(job) = job else { return };
                        let Some(c) = weak.upgrade() else { return };
                        c.run_ra_job(job);
                    }
                })?;
        }
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
        let st = nix::sys::stat::fstat(fd.as_fd())?;
        let size = st.st_size.max(0) as u64;
        let f = Arc::new(CachedFile {
            ino,
            st: Mutex::new(FileState {
                pages: BTreeMap::new(),
                size,
                disk_size: size,
                prealloc: past_end(&st),
                wb_fd: None,
                ndirty: 0,
                mtime: None,
                mtime_pending: false,
                error: None,
                seq: 0,
            }),
            cv: Condvar::new(),
            wb: Mutex::new(()),
        });
        Ok(self.files.entry(ino).or_insert(f).clone())
    }

    fn next_token(&self) -> u64 {
        self.token.fetch_add(1, Ordering::Relaxed)
    }

    /// Evict clean pages until `extra` more bytes fit in the budget. False if they do not.
    fn make_room(&self, extra: u64) -> bool {
        let budget = self.cfg.read().size;
        loop {
            let used = self.bytes.load(Ordering::Acquire);
            if used + extra <= budget {
                return true;
            }
            // Take a batch of the least recently used keys, then visit their files in turn.
            let want = ((used + extra - budget).div_ceil(P) as usize).clamp(1, 256);
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
                for &(_, idx) in &victims[i..j] {
                    if let Some(Slot::Ready(p)) = st.pages.get(&idx)
                        && !p.dirty
                        && !p.writeback
                    {
                        st.pages.remove(&idx);
                        freed += 1;
                    }
                }
                let empty = st.pages.is_empty() && st.ndirty == 0 && !st.mtime_pending;
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

    /// read(2) of `size` bytes at `off` of node `ino`, filling misses from `fd` with
    /// readahead as `ra` (the open file's state) decides.
    pub fn read(
        &self,
        ino: u64,
        ra: &Mutex<RaState>,
        fd: &Fd,
        off: u64,
        size: u32,
    ) -> Result<ReadData, Errno> {
        let f = self.file(ino, fd)?;
        let max_ra = self.cfg.read().readahead_kb * 1024 / P;
        // Pages to copy out once the file's lock is released.
        let mut segs: Vec<(PageData, usize, usize)> = Vec::with_capacity(32);
        let mut touched: Vec<u64> = Vec::new();
        let (mut hits, mut ra_used) = (0u64, 0u64);
        let mut st = f.st.lock();
        let mut end = (off + size as u64).min(st.size);
        if off >= end {
            return Ok(ReadData::Owned(Vec::new()));
        }
        let first = off / P;
        let mut last = (end - 1) / P;
        let mut idx = first;
        while idx <= last {
            let ps = idx * P;
            match st.pages.get_mut(&idx) {
                Some(Slot::Ready(p)) => {
                    let from = (off.max(ps) - ps) as usize;
                    let to = (end.min(ps + P) - ps) as usize;
                    segs.push((p.data.clone(), from, to));
                    hits += 1;
                    if p.ra {
                        p.ra = false;
                        ra_used += 1;
                    }
                    if !p.dirty {
                        touched.push(idx);
                    }
                    if std::mem::take(&mut p.marker) {
                        self.async_readahead(&f, &mut st, ra, fd, idx, last - idx + 1, max_ra);
                    }
                    idx += 1;
                }
                Some(Slot::Loading(_)) => {
                    f.cv.wait(&mut st);
                    // A truncate may have come in between.
                    end = end.min(st.size);
                    if end <= ps.max(off) {
                        break;
                    }
                    last = (end - 1) / P;
                }
                None | Some(Slot::Queued(_)) => {
                    let req = last - idx + 1;
                    let contig = st
                        .pages
                        .range(idx.saturating_sub(max_ra + req)..idx)
                        .rev()
                        .scan(idx, |want, (&k, _)| {
                            (k + 1 == *want).then(|| {
                                *want = k;
                            })
                        })
                        .count() as u64;
                    let win = ra.lock().sync(idx, req, max_ra, contig);
                    let mut n = 0u64;
                    while idx + n <= last && Slot::missing(st.pages.get(&(idx + n))) {
                        n += 1;
                    }
                    let token = self.next_token();
                    for i in idx..idx + n {
                        st.pages.insert(i, Slot::Loading(token));
                    }
                    if let Some(w) = win
                        && w.end() > idx + n
                    {
                        // The rest of the window is read in the background.
                        let marker = w.marker();
                        self.queue_readahead(&f, &mut st, fd, idx + n..w.end(), marker);
                    }
                    let read = MutexGuard::unlocked(&mut st, || {
                        let room = self.make_room(n * P);
                        read_pages(fd, idx, n as usize).map(|p| (p, room))
                    });
                    let (pages, room) = match read {
                        Ok(x) => x,
                        Err(e) => {
                            for i in idx..idx + n {
                                if matches!(st.pages.get(&i), Some(Slot::Loading(t)) if *t == token)
                                {
                                    st.pages.remove(&i);
                                }
                            }
                            f.cv.notify_all();
                            return Err(e);
                        }
                    };
                    self.stats.misses.fetch_add(n, Ordering::Relaxed);
                    let marker_in_run = win
                        .map(|w| w.marker())
                        .filter(|m| (idx..idx + n).contains(m));
                    end = end.min(st.size);
                    for (i, data) in pages.into_iter().enumerate() {
                        let pi = idx + i as u64;
                        let ps = pi * P;
                        if ps < end {
                            let from = (off.max(ps) - ps) as usize;
                            let to = (end.min(ps + P) - ps) as usize;
                            segs.push((data.clone(), from, to));
                        }
                        let mine =
                            matches!(st.pages.get(&pi), Some(Slot::Loading(t)) if *t == token);
                        if !mine {
                            continue;
                        }
                        if room {
                            st.pages.insert(
                                pi,
                                Slot::Ready(Page {
                                    data,
                                    dirty: false,
                                    wseq: 0,
                                    ra: false,
                                    marker: false,
                                    charged: false,
                                    writeback: false,
                                }),
                            );
                            self.bytes.fetch_add(P, Ordering::AcqRel);
                            touched.push(pi);
                        } else {
                            st.pages.remove(&pi);
                        }
                    }
                    f.cv.notify_all();
                    if let Some(m) = marker_in_run {
                        self.async_readahead(&f, &mut st, ra, fd, m, last - m + 1, max_ra);
                    }
                    idx += n;
                }
            }
        }
        ra.lock().touched(last);
        drop(st);
        self.stats.hits.fetch_add(hits, Ordering::Relaxed);
        self.stats.ra_used.fetch_add(ra_used, Ordering::Relaxed);
        if !touched.is_empty() {
            let mut lru = self.lru.lock();
            for i in touched {
                lru.put((ino, i), ());
            }
        }
        Ok(assemble(segs))
    }

    /// The reader touched the marker page `index`: start the next window in the background.
    #[allow(clippy::too_many_arguments)]
    fn async_readahead(
        &self,
        f: &Arc<CachedFile>,
        st: &mut MutexGuard<'_, FileState>,
        ra: &Mutex<RaState>,
        fd: &Fd,
        index: u64,
        req: u64,
        max: u64,
    ) {
        let mut next_miss = index + 1;
        while next_miss <= index + max && st.pages.contains_key(&next_miss) {
            next_miss += 1;
        }
        let w = ra.lock().on_marker(index, req, max, next_miss);
        if let Some(w) = w {
            self.queue_readahead(f, st, fd, w.start..w.end(), w.marker());
        }
    }

    /// Mark the missing pages of `range` as loading and hand them to a readahead worker.
    fn queue_readahead(
        &self,
        f: &Arc<CachedFile>,
        st: &mut MutexGuard<'_, FileState>,
        fd: &Fd,
        range: std::ops::Range<u64>,
        marker: u64,
    ) {
        let limit = st.size.div_ceil(P);
        let pages: Vec<u64> = range
            .filter(|i| *i < limit && !st.pages.contains_key(i))
            .collect();
        if pages.is_empty() {
            return;
        }
        let token = self.next_token();
        for &i in &pages {
            st.pages.insert(i, Slot::Queued(token));
        }
        let job = RaJob {
            file: f.clone(),
            fd: fd.clone(),
            pages,
            token,
            marker,
        };
        let sent = match &*self.ra_tx.lock() {
            Some(tx) => tx.send(job).map_err(|e| e.0),
            None => Err(job),
        };
        if let Err(job) = sent {
            for i in &job.pages {
                st.pages.remove(i);
            }
        }
    }

    fn run_ra_job(&self, mut job: RaJob) {
        let f = &job.file;
        // Claim what no reader has taken over meanwhile.
        {
            let mut st = f.st.lock();
            let token = job.token;
            job.pages.retain(|i| {
                let mine = matches!(st.pages.get(i), Some(Slot::Queued(t)) if *t == token);
                if mine {
                    st.pages.insert(*i, Slot::Loading(token));
                }
                mine
            });
        }
        if job.pages.is_empty() {
            return;
        }
        let n = job.pages.len() as u64;
        let room = self.make_room(n * P);
        // Contiguous runs, one read each.
        let mut loaded: Vec<(u64, PageData)> = Vec::with_capacity(job.pages.len());
        if room {
            let mut i = 0;
            while i < job.pages.len() {
                let mut j = i + 1;
                while j < job.pages.len() && job.pages[j] == job.pages[j - 1] + 1 {
                    j += 1;
                }
                match read_pages(&job.fd, job.pages[i], j - i) {
                    Ok(ps) => loaded.extend(job.pages[i..j].iter().copied().zip(ps)),
                    Err(e) => log::debug!("readahead of node {}: {e}", f.ino),
                }
                i = j;
            }
        }
        let mut st = f.st.lock();
        let mut inserted = Vec::new();
        for (i, data) in loaded {
            if matches!(st.pages.get(&i), Some(Slot::Loading(t)) if *t == job.token) {
                st.pages.insert(
                    i,
                    Slot::Ready(Page {
                        data,
                        dirty: false,
                        wseq: 0,
                        ra: true,
                        marker: i == job.marker,
                        charged: false,
                        writeback: false,
                    }),
                );
                inserted.push(i);
            }
        }
        // Whatever did not load is dropped (a reader will read it itself).
        for i in &job.pages {
            if matches!(st.pages.get(i), Some(Slot::Loading(t)) if *t == job.token) {
                st.pages.remove(i);
            }
        }
        drop(st);
        f.cv.notify_all();
        self.bytes
            .fetch_add(inserted.len() as u64 * P, Ordering::AcqRel);
        self.stats
            .ra_pages
            .fetch_add(inserted.len() as u64, Ordering::Relaxed);
        let mut lru = self.lru.lock();
        for i in inserted {
            lru.put((f.ino, i), ());
        }
    }

    /// write(2) of `data` at `off` of node `ino` (an upper file; `fd` open for reading and
    /// writing): the data lands in the cache as dirty pages. Returns the bytes accepted (short
    /// only at the quota limit). Writers are paced, and block at the dirty limit.
    pub fn write(&self, ino: u64, fd: &Fd, off: u64, data: &[u8]) -> Result<usize, Errno> {
        if data.is_empty() {
            return Ok(0);
        }
        let f = self.file(ino, fd)?;
        let mut done = 0usize;
        while done < data.len() {
            let pos = off + done as u64;
            let (_, thresh) = self.cfg.read().thresholds();
            let chunk_cap = ((thresh / 4) / P * P).clamp(P, 1 << 20);
            // Chunks end on page boundaries (all but the last).
            let len = ((data.len() - done) as u64).min(chunk_cap - pos % P) as usize;
            let span = ((pos + len as u64 - 1) / P - pos / P + 1) * P;
            self.reserve_dirty(span)?;
            if !self.make_room(span) {
                // Everything cached is dirty or in flight: the dirty limit keeps this short.
                log::debug!("page cache over budget while writing node {ino}");
            }
            let r = self.apply(&f, fd, pos, &data[done..done + len]);
            let newly = r.as_ref().map(|x| x.1).unwrap_or(0);
            self.dirty.fetch_sub(span - newly * P, Ordering::AcqRel);
            match r {
                Ok((n, newly)) => {
                    done += n;
                    self.balance_dirty_pages(newly * P);
                    if n < len {
                        break;
                    }
                }
                Err(e) if done == 0 => return Err(e),
                Err(e) => {
                    log::warn!("write of node {ino} stopped short at {done} bytes: {e}");
                    break;
                }
            }
        }
        if self.closing.load(Ordering::Acquire) {
            // Stopping: nothing may stay behind in the cache.
            self.sync_file(ino)?;
        }
        Ok(done)
    }

    /// Dirty the pages of one chunk. Returns (bytes accepted, pages newly dirty).
    fn apply(&self, f: &CachedFile, fd: &Fd, off: u64, data: &[u8]) -> Result<(usize, u64), Errno> {
        let mut st = f.st.lock();
        let first = off / P;
        let mut end = off + data.len() as u64;
        // Pages being read in must land first.
        while st
            .pages
            .range(first..=(end - 1) / P)
            .any(|(_, s)| matches!(s, Slot::Loading(_)))
        {
            f.cv.wait(&mut st);
        }
        let mut charged: Vec<u64> = Vec::new();
        if let Some(q) = &self.quota {
            let last = (end - 1) / P;
            let cand: Vec<u64> = (first..=last)
                .filter(|i| !matches!(st.pages.get(i), Some(Slot::Ready(p)) if p.dirty))
                .collect();
            if !cand.is_empty() {
                let disk_end = st.disk_size.div_ceil(P);
                let mut allocated: Vec<(u64, u64)> = Vec::new();
                if cand[0] < disk_end || st.prealloc {
                    allocated = crate::layer::sys::allocated_ranges(
                        fd.as_fd(),
                        first * P,
                        (last + 1 - first) * P,
                    )
                    .unwrap_or_else(|_| vec![(0, st.disk_size)]);
                }
                charged = cand
                    .into_iter()
                    .filter(|&i| {
                        let (a, b) = (i * P, i * P + P);
                        !allocated.iter().any(|&(s, e)| s < b && e > a)
                    })
                    .collect();
                if !charged.is_empty() && q.reserve_bytes(charged.len() as u64 * P).is_err() {
                    // Near the limit: accept what fits, as a full disk does (a short write).
                    let fit = (q.available_bytes() / P) as usize;
                    let cut = charged.get(fit).copied().unwrap_or(u64::MAX);
                    let cut_at = cut.saturating_mul(P);
                    if cut_at <= off {
                        return Err(q.errno());
                    }
                    end = end.min(cut_at);
                    charged.truncate(fit);
                    q.reserve_bytes(charged.len() as u64 * P)?;
                }
            }
        }
        let last = (end - 1) / P;
        // Partial pages that exist on disk but not here: read them first (read-modify-write).
        let mut rmw: Vec<(u64, PageData)> = Vec::new();
        for idx in [first, last] {
            let ps = idx * P;
            let partial = off > ps || end < ps + P;
            if partial
                && ps < st.disk_size
                && !matches!(st.pages.get(&idx), Some(Slot::Ready(_)))
                && !rmw.iter().any(|(i, _)| *i == idx)
            {
                match read_pages(fd, idx, 1) {
                    Ok(mut v) => rmw.push((idx, v.remove(0))),
                    Err(e) => {
                        if let Some(q) = &self.quota {
                            q.adjust_bytes(-((charged.len() as u64 * P) as i64));
                        }
                        return Err(e);
                    }
                }
            }
        }
        st.seq += 1;
        let seq = st.seq;
        let mut newly = 0u64;
        let mut added = 0u64;
        for idx in first..=last {
            let ps = idx * P;
            let from = (off.max(ps) - ps) as usize;
            let to = (end.min(ps + P) - ps) as usize;
            let src = &data[(ps + from as u64 - off) as usize..(ps + to as u64 - off) as usize];
            let charge = charged.binary_search(&idx).is_ok();
            match st.pages.get_mut(&idx) {
                Some(Slot::Ready(p)) => {
                    p.data.make_mut()[from..to].copy_from_slice(src);
                    if !p.dirty {
                        p.dirty = true;
                        newly += 1;
                    }
                    p.wseq = seq;
                    p.ra = false;
                    p.charged |= charge;
                }
                _ => {
                    let buf = match rmw.iter().position(|(i, _)| *i == idx) {
                        Some(k) => {
                            let mut b = rmw.swap_remove(k).1;
                            b.make_mut()[from..to].copy_from_slice(src);
                            b
                        }
                        // A whole page: its bytes are the data, nothing to zero first.
                        None if src.len() == PAGE => PageData {
                            buf: Arc::new(src.to_vec()),
                            off: 0,
                        },
                        None => {
                            let mut b = PageData::zeroed();
                            b.make_mut()[from..to].copy_from_slice(src);
                            b
                        }
                    };
                    st.pages.insert(
                        idx,
                        Slot::Ready(Page {
                            data: buf,
                            dirty: true,
                            wseq: seq,
                            ra: false,
                            marker: false,
                            charged: charge,
                            writeback: false,
                        }),
                    );
                    newly += 1;
                    added += 1;
                }
            }
        }
        self.finish_apply(&mut st, f, fd, newly, added, off, end);
        Ok(((end - off) as usize, newly))
    }

    #[allow(clippy::too_many_arguments)]
    fn finish_apply(
        &self,
        st: &mut FileState,
        f: &CachedFile,
        fd: &Fd,
        newly: u64,
        added: u64,
        off: u64,
        end: u64,
    ) {
        if end > off {
            st.size = st.size.max(end);
            st.mtime = Some(now());
            st.mtime_pending = true;
        }
        st.wb_fd = Some(fd.clone());
        let was_clean = st.ndirty == 0;
        st.ndirty += newly;
        self.bytes.fetch_add(added * P, Ordering::AcqRel);
        if was_clean && st.ndirty > 0 {
            self.dirty_files.lock().insert(f.ino, Instant::now());
        }
    }

    /// Take room for `need` more dirty bytes, waiting (throttled) while that would pass
    /// dirty_thresh.
    fn reserve_dirty(&self, need: u64) -> Result<(), Errno> {
        let mut waited: Option<Instant> = None;
        loop {
            let (_, thresh) = self.cfg.read().thresholds();
            let cur = self.dirty.load(Ordering::Acquire);
            if cur + need <= thresh || cur == 0 || self.closing.load(Ordering::Acquire) {
                if self
                    .dirty
                    .compare_exchange(cur, cur + need, Ordering::AcqRel, Ordering::Acquire)
                    .is_ok()
                {
                    break;
                }
                continue;
            }
            let t0 = *waited.get_or_insert_with(|| {
                self.stats.limit_waits.fetch_add(1, Ordering::Relaxed);
                Instant::now()
            });
            let err = self.flush_error.load(Ordering::Acquire);
            if err != 0 && t0.elapsed() > Duration::from_secs(2) {
                // The flusher cannot write (a full or failing disk): do not wait forever.
                self.note_throttle(t0);
                return Err(Errno::from_raw(err));
            }
            self.kick_flusher();
            let mut g = self.throttle.0.lock();
            self.throttle.1.wait_for(&mut g, Duration::from_millis(50));
        }
        if let Some(t0) = waited {
            self.note_throttle(t0);
        }
        Ok(())
    }

    fn note_throttle(&self, t0: Instant) {
        self.stats.throttle_events.fetch_add(1, Ordering::Relaxed);
        self.stats
            .throttle_us
            .fetch_add(t0.elapsed().as_micros() as u64, Ordering::Relaxed);
    }

    /// balance_dirty_pages after dirtying `bytes`: wake the flusher above bg_thresh, pace the
    /// writer between freerun and the limit.
    fn balance_dirty_pages(&self, bytes: u64) {
        let (bg, thresh) = self.cfg.read().thresholds();
        let d = self.dirty.load(Ordering::Acquire);
        if d > bg {
            if !self.above_bg.swap(true, Ordering::AcqRel) {
                self.stats.bg_crossings.fetch_add(1, Ordering::Relaxed);
            }
            self.kick_flusher();
        } else {
            self.above_bg.store(false, Ordering::Release);
        }
        if bytes == 0 || self.closing.load(Ordering::Acquire) {
            return;
        }
        let bw = self.bw.load(Ordering::Relaxed);
        match writeback::pause(bytes, d, bg, thresh, bw) {
            Some(p) if p.is_zero() => {}
            Some(p) => {
                let t0 = Instant::now();
                let mut g = self.throttle.0.lock();
                // Sleep the pause out (woken early only to re-check time).
                let deadline = t0 + p;
                while Instant::now() < deadline {
                    self.throttle.1.wait_until(&mut g, deadline);
                }
                drop(g);
                self.note_throttle(t0);
            }
            None => {
                // At the limit: reserve_dirty of the next chunk waits for the flusher.
            }
        }
    }

    fn kick_flusher(&self) {
        let mut g = self.flusher.m.lock();
        if !g.kick {
            g.kick = true;
            self.flusher.cv.notify_all();
        }
    }

    /// Write dirty pages of `f` (at most `max_pages`) to its upper file. Returns pages written.
    fn writeback_file(&self, f: &CachedFile, max_pages: u64) -> Result<u64, Errno> {
        let _wb = f.wb.lock();
        let mut total = 0u64;
        while total < max_pages {
            let mut st = f.st.lock();
            let Some(fd) = st.wb_fd.clone() else {
                break;
            };
            if st.ndirty == 0 {
                self.finish_clean(f, &mut st, &fd);
                break;
            }
            let want = (max_pages - total).min(WB_BATCH as u64) as usize;
            let mut batch: Vec<(u64, PageData, u64)> = Vec::with_capacity(want);
            for (&i, s) in st.pages.iter_mut() {
                if let Slot::Ready(p) = s
                    && p.dirty
                    && !p.writeback
                {
                    p.writeback = true;
                    batch.push((i, p.data.clone(), p.wseq));
                    if batch.len() == want {
                        break;
                    }
                }
            }
            let size = st.size;
            drop(st);
            if batch.is_empty() {
                break;
            }
            let n = batch.len() as u64;
            self.writeback.fetch_add(n * P, Ordering::AcqRel);
            let t0 = Instant::now();
            let mut res = Ok(());
            let mut written_end = 0u64;
            let mut i = 0;
            while i < batch.len() && res.is_ok() {
                let mut j = i + 1;
                while j < batch.len() && batch[j].0 == batch[j - 1].0 + 1 {
                    j += 1;
                }
                let start = batch[i].0 * P;
                let len = (((j - i) * PAGE) as u64).min(size.saturating_sub(start)) as usize;
                if len > 0 {
                    // One pwritev of the run's pages, the last one cut at the file's end.
                    let parts: Vec<&[u8]> = batch[i..j]
                        .iter()
                        .enumerate()
                        .map(|(k, (_, d, _))| &d.bytes()[..(len - (k * PAGE).min(len)).min(PAGE)])
                        .filter(|b| !b.is_empty())
                        .collect();
                    res = pwritev_all(&fd, &parts, start);
                    written_end = written_end.max(start + len as u64);
                }
                i = j;
            }
            self.writeback.fetch_sub(n * P, Ordering::AcqRel);
            let mut st = f.st.lock();
            let mut cleaned = 0u64;
            let mut released = 0u64;
            let mut lru_add = Vec::new();
            for (idx, _, wseq) in &batch {
                if let Some(Slot::Ready(p)) = st.pages.get_mut(idx) {
                    p.writeback = false;
                    if res.is_ok() {
                        if std::mem::take(&mut p.charged) {
                            released += P;
                        }
                        if p.wseq == *wseq {
                            p.dirty = false;
                            cleaned += 1;
                            lru_add.push(*idx);
                        }
                    }
                }
            }
            st.ndirty -= cleaned;
            self.dirty.fetch_sub(cleaned * P, Ordering::AcqRel);
            match res {
                Ok(()) => {
                    st.disk_size = st.disk_size.max(written_end);
                    if st.ndirty == 0 {
                        self.finish_clean(f, &mut st, &fd);
                    }
                }
                Err(e) => st.error = Some(e),
            }
            drop(st);
            f.cv.notify_all();
            if !lru_add.is_empty() {
                let mut lru = self.lru.lock();
                for i in lru_add {
                    lru.put((f.ino, i), ());
                }
            }
            if let Some(q) = &self.quota {
                // Settle the file's real allocation first, then hand the charge back.
                if let Some(s) = self.sink.read().as_ref().and_then(|w| w.upgrade()) {
                    s.written(f.ino, fd.as_fd());
                }
                q.adjust_bytes(-(released as i64));
            }
            self.throttle.1.notify_all();
            match res {
                Ok(()) => {
                    self.flush_error.store(0, Ordering::Release);
                    let bytes = n * P;
                    self.stats.written_back.fetch_add(bytes, Ordering::Relaxed);
                    let el = t0.elapsed().as_secs_f64().max(1e-6);
                    let cur = (bytes as f64 / el) as u64;
                    let old = self.bw.load(Ordering::Relaxed);
                    self.bw
                        .store((old / 5 * 4 + cur / 5).max(1 << 20), Ordering::Relaxed);
                    total += n;
                }
                Err(e) => {
                    self.flush_error.store(e as i32, Ordering::Release);
                    log::warn!("write-back of node {}: {e}", f.ino);
                    return Err(e);
                }
            }
        }
        Ok(total)
    }

    /// The file's last dirty page is on disk: stamp the time of its last write and let go of
    /// the write-back fd.
    fn finish_clean(&self, f: &CachedFile, st: &mut FileState, fd: &Fd) {
        if let (Some((s, ns)), true) = (st.mtime, std::mem::take(&mut st.mtime_pending)) {
            let omit = nix::sys::time::TimeSpec::new(0, libc::UTIME_OMIT);
            let t = nix::sys::time::TimeSpec::new(s, ns);
            if let Err(e) = nix::sys::stat::futimens(fd.as_fd(), &omit, &t) {
                log::debug!("mtime of node {}: {e}", f.ino);
            }
        }
        st.wb_fd = None;
        self.dirty_files.lock().remove(&f.ino);
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

    /// Size and mtime to show for `ino` after writes through the cache.
    pub fn attr_override(&self, ino: u64) -> Option<(u64, (i64, i64))> {
        let f = self.files.get(&ino)?.clone();
        let st = f.st.lock();
        st.mtime.map(|m| (st.size, m))
    }

    /// Write every dirty page of `ino` to its file; returns (and clears) a write-back error.
    pub fn sync_file(&self, ino: u64) -> Result<(), Errno> {
        let Some(f) = self.files.get(&ino).map(|f| f.clone()) else {
            return Ok(());
        };
        let r = self.writeback_file(&f, u64::MAX);
        let pending = f.st.lock().error.take();
        r?;
        pending.map_or(Ok(()), Err)
    }

    /// Write every dirty page of every file. Returns the first error.
    pub fn sync_all(&self) -> Result<(), Errno> {
        let mut first = Ok(());
        let inos: Vec<u64> = self.dirty_files.lock().keys().copied().collect();
        for ino in inos {
            if let Err(e) = self.sync_file(ino)
                && first.is_ok()
            {
                first = Err(e);
            }
        }
        first
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
        let Some(f) = self.files.get(&ino).map(|f| f.clone()) else {
            return op();
        };
        let _wb = f.wb.lock();
        let r = op()?;
        let mut st = f.st.lock();
        self.drop_pages(&f, &mut st, size.div_ceil(P));
        if size % P != 0
            && let Some(Slot::Ready(p)) = st.pages.get_mut(&(size / P))
        {
            p.data.make_mut()[(size % P) as usize..].fill(0);
        }
        st.size = size;
        st.disk_size = size;
        // The truncate stamped the file; dirty pages left will stamp it again when written.
        st.mtime_pending = st.ndirty > 0;
        st.mtime = st.mtime_pending.then(now);
        drop(st);
        f.cv.notify_all();
        Ok(r)
    }

    /// Drop the pages of `f` from index `from` on (dirty ones too: the data is gone).
    fn drop_pages(&self, f: &CachedFile, st: &mut FileState, from: u64) {
        let gone = st.pages.split_off(&from);
        let (mut freed, mut undirty, mut released) = (0u64, 0u64, 0u64);
        let mut keys = Vec::new();
        for (i, s) in gone {
            if let Slot::Ready(p) = s {
                freed += 1;
                keys.push(i);
                if p.dirty {
                    undirty += 1;
                }
                if p.charged {
                    released += P;
                }
            }
        }
        st.ndirty -= undirty;
        self.bytes.fetch_sub(freed * P, Ordering::AcqRel);
        self.dirty.fetch_sub(undirty * P, Ordering::AcqRel);
        if let Some(q) = &self.quota {
            q.adjust_bytes(-(released as i64));
        }
        if st.ndirty == 0 {
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

    /// Forget everything about `ino` (its last name is gone and nothing holds it open, or the
    /// inode number now names a new file). Dirty data is discarded.
    pub fn drop_file(&self, ino: u64) {
        let Some((_, f)) = self.files.remove(&ino) else {
            return;
        };
        let _wb = f.wb.lock();
        let mut st = f.st.lock();
        self.drop_pages(&f, &mut st, 0);
        st.mtime = None;
        st.mtime_pending = false;
        drop(st);
        f.cv.notify_all();
    }

    /// Before `ino`'s file is changed behind the cache (fallocate, a write that bypasses
    /// it): write its dirty pages, then forget its clean ones in `[off, off + len)` (len 0:
    /// to the end).
    pub fn invalidate(&self, ino: u64, off: u64, len: u64) -> Result<(), Errno> {
        self.sync_file(ino)?;
        let Some(f) = self.files.get(&ino).map(|f| f.clone()) else {
            return Ok(());
        };
        let _wb = f.wb.lock();
        let mut st = f.st.lock();
        let from = off / P;
        let to = if len == 0 {
            u64::MAX
        } else {
            (off + len).div_ceil(P)
        };
        let mut tail = st.pages.split_off(&from);
        let mut rest = tail.split_off(&to);
        let mut freed = 0u64;
        let mut keys = Vec::new();
        for (i, s) in tail {
            match s {
                Slot::Ready(p) if p.dirty => {
                    st.pages.insert(i, Slot::Ready(p));
                }
                Slot::Ready(_) => {
                    freed += 1;
                    keys.push(i);
                }
                Slot::Loading(_) | Slot::Queued(_) => {}
            }
        }
        st.pages.append(&mut rest);
        self.bytes.fetch_sub(freed * P, Ordering::AcqRel);
        drop(st);
        f.cv.notify_all();
        let mut lru = self.lru.lock();
        for i in keys {
            lru.pop(&(ino, i));
        }
        Ok(())
    }

    /// The backing file of `ino` was changed behind the cache (fallocate, a direct write):
    /// its stat is now `st`.
    pub fn set_size(&self, ino: u64, st: &nix::sys::stat::FileStat) {
        if let Some(f) = self.files.get(&ino).map(|f| f.clone()) {
            let size = st.st_size.max(0) as u64;
            let mut s = f.st.lock();
            s.disk_size = size;
            s.prealloc = past_end(st);
            if s.ndirty == 0 || size > s.size {
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
        *self.ra_tx.lock() = None;
        r
    }

    /// The current figures.
    pub fn stats(&self) -> CacheStats {
        let (bg, thresh) = self.cfg.read().thresholds();
        let s = &self.stats;
        let l = |a: &AtomicU64| a.load(Ordering::Relaxed);
        CacheStats {
            fields: vec![
                ("cache_size", self.cfg.read().size),
                ("cache_bytes", l(&self.bytes)),
                ("cache_hits", l(&s.hits)),
                ("cache_misses", l(&s.misses)),
                ("evicted_pages", l(&s.evicted)),
                ("readahead_pages", l(&s.ra_pages)),
                ("readahead_used_pages", l(&s.ra_used)),
                ("dirty_bytes", l(&self.dirty)),
                ("writeback_bytes", l(&self.writeback)),
                ("written_back_bytes", l(&s.written_back)),
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

    /// One flusher pass: background write-back while above bg_thresh, and (on the periodic
    /// wake-up) files whose dirty data has expired.
    fn flush_pass(&self, periodic: bool) {
        let mut ran = false;
        loop {
            let (bg, _) = self.cfg.read().thresholds();
            if self.dirty.load(Ordering::Acquire) <= bg {
                break;
            }
            let oldest = {
                let d = self.dirty_files.lock();
                d.iter().min_by_key(|(_, t)| **t).map(|(i, _)| *i)
            };
            let Some(ino) = oldest else { break };
            let Some(f) = self.files.get(&ino).map(|f| f.clone()) else {
                self.dirty_files.lock().remove(&ino);
                continue;
            };
            match self.writeback_file(&f, WB_CHUNK) {
                Ok(0) | Err(_) => break,
                Ok(_) => ran = true,
            }
        }
        if periodic {
            let expire = Duration::from_millis(self.cfg.read().dirty_expire_centisecs * 10);
            let old: Vec<u64> = self
                .dirty_files
                .lock()
                .iter()
                .filter(|(_, t)| t.elapsed() >= expire)
                .map(|(i, _)| *i)
                .collect();
            for ino in old {
                if let Some(f) = self.files.get(&ino).map(|f| f.clone())
                    && self.writeback_file(&f, u64::MAX).is_ok()
                {
                    ran = true;
                }
            }
        }
        if ran {
            self.stats.flusher_runs.fetch_add(1, Ordering::Relaxed);
        }
    }
}

fn flusher_main(weak: Weak<PageCache>, sig: Arc<Signal>) {
    let mut last_periodic = Instant::now();
    loop {
        let interval = match weak.upgrade() {
            Some(c) => c.cfg.read().dirty_writeback_centisecs,
            None => return,
        };
        let period = if interval == 0 {
            None
        } else {
            Some(Duration::from_millis(interval * 10))
        };
        {
            let mut g = sig.m.lock();
            if !g.kick && !g.stop {
                let wait = period
                    .map(|p| p.saturating_sub(last_periodic.elapsed()))
                    .unwrap_or(Duration::from_secs(1));
                sig.cv.wait_for(&mut g, wait.max(Duration::from_millis(1)));
            }
            if g.stop {
                return;
            }
            g.kick = false;
        }
        let Some(c) = weak.upgrade() else { return };
        let periodic = period.is_some_and(|p| last_periodic.elapsed() >= p);
        if periodic {
            last_periodic = Instant::now();
        }
        c.flush_pass(periodic);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

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

    #[test]
    fn reads_reply_from_shared_buffers_and_writes_copy() {
        let data: Vec<u8> = (0..16 * PAGE).map(|i| (i % 253) as u8).collect();
        let (_d, fd) = tmpfile(&data);
        let c = PageCache::new(
            CacheConfig {
                readahead_kb: 0,
                ..cfg(16 << 20)
            },
            None,
        )
        .expect("cache");
        let ra = Mutex::new(RaState::default());
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
        let t = Instant::now();
        while t.elapsed() < Duration::from_millis(200) {
            std::thread::sleep(Duration::from_millis(10));
        }
        assert!(c.stats().get("cache_bytes").expect("bytes") <= 32 * P);
        assert!(c.stats().get("evicted_pages").expect("evicted") > 0);
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
        for i in 0..64u64 {
            c.write(2, &fd, i * chunk.len() as u64, &chunk)
                .expect("write");
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
        assert_eq!(st.st_size as usize, 64 * chunk.len());
    }
}
