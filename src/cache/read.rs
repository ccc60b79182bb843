//! The read path: cache hits, misses filled from the layer file into one shared buffer per run,
//! and the readahead I/O that [`super::readahead`] decides on (queued to worker threads; a reader
//! that needs a page still queued reads it itself).

use std::os::fd::AsFd;
use std::sync::Arc;
use std::sync::atomic::Ordering;

use nix::errno::Errno;
use parking_lot::{Mutex, MutexGuard};

use super::{
    CachedFile, Fd, FileState, P, PAGE, Page, PageCache, PageData, RaJob, RaState, ReadData, Slot,
};

/// The kernel's default readahead on a FUSE mount (its bdi's `read_ahead_kb`) until the daemon
/// sets it (`kernel_ra.rs`).
pub(super) const KERNEL_RA_DEFAULT_KB: u64 = 128;

/// Slack (pages) within which a read still continues a stream, for drop-behind.
const STREAM_SLACK: u64 = 128;

/// A request at least this large (128 KiB, what the kernel's readahead sends) is a stream's.
const STREAM_REQ_PAGES: u64 = 32;

/// The reply for a read made of these page pieces: a slice of one buffer when they are
/// consecutive pieces of it, else a copy.
pub(super) fn assemble(segs: Vec<(PageData, usize, usize)>) -> ReadData {
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

/// Read `n` pages from `start` (zero past EOF) into one buffer; returns the pages.
/// Drop the pages of `range` still loading for `token` (a read that failed or panicked).
fn unload(st: &mut FileState, range: std::ops::Range<u64>, token: u64) {
    for i in range {
        if matches!(st.pages.get(&i), Some(Slot::Loading(t)) if *t == token) {
            st.pages.remove(&i);
        }
    }
}

#[cfg(test)]
thread_local! {
    /// Unit tests: the next `read_pages` of this thread panics.
    pub(super) static PANIC_IN_READ: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

pub(super) fn read_pages(fd: &Fd, start: u64, n: usize) -> Result<Vec<PageData>, Errno> {
    #[cfg(test)]
    if PANIC_IN_READ.with(|p| p.replace(false)) {
        panic!("unit test: read_pages panics");
    }
    let buf = Arc::new(crate::layer::sys::pread_vec(
        fd.as_fd(),
        n * PAGE,
        (start * P) as i64,
    )?);
    Ok((0..n)
        .map(|k| PageData {
            buf: buf.clone(),
            off: k * PAGE,
        })
        .collect())
}

impl PageCache {
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
        let cfg = *self.cfg.read();
        // No window above a quarter of what pages may take: a larger one would push out most
        // of the cache for one reader.
        let mut max_ra = (cfg.readahead_kb * 1024 / P).min(cfg.page_budget() / P / 4);
        let kernel_ra = self.kernel_ra_kb.load(Ordering::Relaxed) * 1024 / P;
        // Set at open, never changed.
        let buffered = ra.lock().drop_behind;
        if buffered && max_ra <= kernel_ra {
            // The kernel's FUSE readahead already keeps this much in flight for a buffered
            // reader; a window of ours no larger would read the same pages a second time.
            max_ra = 0;
        }
        // Pages to copy out once the file's lock is released.
        let mut segs: Vec<(PageData, usize, usize)> = Vec::with_capacity(32);
        // LRU updates once the file's lock is released: (page, true) moves it to the hot end
        // (a second use), (page, false) to the cold end (used once: a miss, or readahead
        // consumed), as the kernel's inactive list treats pages until they are used again. A
        // stream so recycles a few buffers at the cold end instead of sweeping the budget.
        let mut touched: Vec<(u64, bool)> = Vec::new();
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
                    let first_use = std::mem::take(&mut p.ra);
                    if first_use {
                        ra_used += 1;
                    }
                    if !p.dirty {
                        touched.push((idx, !first_use));
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
                    let (win, drop_behind) = {
                        let mut ra = ra.lock();
                        // A stream: a read next to the last one, or a request as large as the
                        // kernel's readahead makes them (its requests of one window arrive out
                        // of order, up to the whole window apart; random reads are small). Not
                        // while we read ahead ourselves: our windows are placed after the
                        // stream's pages in the cache, and would read dropped ones again.
                        let stream = buffered
                            && max_ra == 0
                            && (req >= STREAM_REQ_PAGES || ra.streaming(idx, STREAM_SLACK));
                        (ra.sync(idx, req, max_ra, contig), stream)
                    };
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
                        std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                            let room = !drop_behind && self.make_room(n * P);
                            read_pages(fd, idx, n as usize).map(|p| (p, room))
                        }))
                    });
                    let read = read.unwrap_or_else(|panic| {
                        // Not left loading: every later reader and writer of them would wait
                        // for good (the request's own handler answers EIO).
                        unload(&mut st, idx..idx + n, token);
                        f.cv.notify_all();
                        std::panic::resume_unwind(panic)
                    });
                    let (pages, room) = match read {
                        Ok(x) => x,
                        Err(e) => {
                            unload(&mut st, idx..idx + n, token);
                            f.cv.notify_all();
                            return Err(e);
                        }
                    };
                    self.stats.misses.fetch_add(n, Ordering::Relaxed);
                    if drop_behind {
                        self.stats.dropped_behind.fetch_add(n, Ordering::Relaxed);
                    }
                    let marker_in_run = win
                        .map(|w| w.marker())
                        .filter(|m| (idx..idx + n).contains(m));
                    end = end.min(st.size);
                    let mut split = super::Split::default();
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
                            // Dropped meanwhile (truncate, invalidation).
                            if room {
                                split.note(pi, &data);
                            }
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
                            touched.push((pi, false));
                        } else {
                            st.pages.remove(&pi);
                        }
                    }
                    split.apply(&mut st);
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
            for (i, hot) in touched {
                lru.put((ino, i), ());
                if !hot {
                    lru.demote(&(ino, i));
                }
            }
        }
        self.trim_to_budget();
        Ok(assemble(segs))
    }

    /// The reader touched the marker page `index`: start the next window in the background.
    #[allow(clippy::too_many_arguments)]
    pub(super) fn async_readahead(
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
    pub(super) fn queue_readahead(
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
        let sent = self.ra.lock().send(job);
        if let Err(job) = sent {
            for i in &job.pages {
                st.pages.remove(i);
            }
        }
    }

    pub(super) fn run_ra_job(&self, mut job: RaJob) {
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
        let loaded = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
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
            loaded
        }));
        // A panic loaded nothing: the pages are dropped below as any not loaded.
        let loaded = loaded.unwrap_or_else(|_| {
            log::error!("readahead of node {}: panicked", f.ino);
            Vec::new()
        });
        let mut st = f.st.lock();
        let mut inserted = Vec::new();
        let mut split = super::Split::default();
        for (i, data) in loaded {
            if !matches!(st.pages.get(&i), Some(Slot::Loading(t)) if *t == job.token) {
                // Dropped meanwhile (truncate, invalidation).
                split.note(i, &data);
            } else {
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
        split.apply(&mut st);
        // Whatever did not load is dropped (a reader will read it itself).
        for i in &job.pages {
            if matches!(st.pages.get(i), Some(Slot::Loading(t)) if *t == job.token) {
                st.pages.remove(i);
            }
        }
        // Counted before the file's lock goes: a truncate dropping them meanwhile must not
        // take them off the count first.
        self.bytes
            .fetch_add(inserted.len() as u64 * P, Ordering::AcqRel);
        drop(st);
        f.cv.notify_all();
        self.stats
            .ra_pages
            .fetch_add(inserted.len() as u64, Ordering::Relaxed);
        let mut lru = self.lru.lock();
        for i in inserted {
            lru.put((f.ino, i), ());
        }
        drop(lru);
        self.trim_to_budget();
    }
}
