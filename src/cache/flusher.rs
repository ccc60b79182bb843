//! The dirty path: writes landing as dirty pages (with the quota charged at accept), the
//! writer throttling of balance_dirty_pages ([`super::writeback`] has the thresholds and the
//! curve), and the flusher that writes dirty pages back to the upper file.

use std::os::fd::AsFd;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Weak};
use std::time::{Duration, Instant};

use nix::errno::Errno;

use super::{
    CachedFile, Fd, FileState, P, PAGE, Page, PageCache, PageData, Signal, Slot, WB_BATCH,
    WB_CHUNK, WbError, now, read::read_pages, writeback,
};
use std::sync::atomic::AtomicU64;

pub(super) fn flusher_main(weak: Weak<PageCache>, sig: Arc<Signal>) {
    let mut last_periodic = Instant::now();
    let mut last_trim = Instant::now();
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
        // At most every 200 ms (the flusher wakes at least every dirty_writeback_centisecs,
        // and whenever writers kick it): freed memory beyond what the budget keeps goes back.
        if last_trim.elapsed() >= Duration::from_millis(200) {
            last_trim = Instant::now();
            if crate::alloc::trim_excess(c.cfg.read().size) {
                c.stats.heap_trims.fetch_add(1, Ordering::Relaxed);
            }
        }
        let periodic = period.is_some_and(|p| last_periodic.elapsed() >= p);
        if periodic {
            last_periodic = Instant::now();
        }
        // The flusher lives on past a panic (writers at the dirty limit wait for it), after a
        // pause so that one repeating does not spin.
        if std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| c.flush_pass(periodic)))
            .is_err()
        {
            log::error!("page cache flusher: a pass panicked");
            std::thread::sleep(Duration::from_secs(1));
        }
    }
}

/// pwritev all of `parts` (in order) at `off`.
pub(super) fn pwritev_all(fd: &Fd, parts: &[&[u8]], off: u64) -> Result<(), Errno> {
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

/// Room reserved under the dirty limit and not used (yet): handed back when dropped.
struct Unreserve<'a>(&'a PageCache, u64);

impl Drop for Unreserve<'_> {
    fn drop(&mut self) {
        self.0.dirty.fetch_sub(self.1, Ordering::AcqRel);
    }
}

impl PageCache {
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
            // What is reserved and not dirtied is handed back, also if `apply` panics.
            let mut unused = Unreserve(self, span);
            if !self.make_room(span) {
                // Everything cached is dirty or in flight: the dirty limit keeps this short.
                log::debug!("page cache over budget while writing node {ino}");
            }
            let r = self.apply(&f, fd, pos, &data[done..done + len]);
            // Writers at once each made room for their own chunk only.
            self.trim_to_budget();
            let newly = r.as_ref().map(|x| x.1).unwrap_or(0);
            unused.1 = span - newly * P;
            drop(unused);
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
            self.write_out(ino)?;
        }
        Ok(done)
    }

    /// Dirty the pages of one chunk. Returns (bytes accepted, pages newly dirty).
    pub(super) fn apply(
        &self,
        f: &CachedFile,
        fd: &Fd,
        off: u64,
        data: &[u8],
    ) -> Result<(usize, u64), Errno> {
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
        if st.dead {
            // Forgotten meanwhile (the copy-up its handle was opened on was lost).
            return Err(Errno::EIO);
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
        let FileState {
            pages, dirty: dset, ..
        } = &mut *st;
        for idx in first..=last {
            let ps = idx * P;
            let from = (off.max(ps) - ps) as usize;
            let to = (end.min(ps + P) - ps) as usize;
            let src = &data[(ps + from as u64 - off) as usize..(ps + to as u64 - off) as usize];
            let charge = charged.binary_search(&idx).is_ok();
            match pages.get_mut(&idx) {
                Some(Slot::Ready(p)) => {
                    p.data.make_mut()[from..to].copy_from_slice(src);
                    if !p.dirty {
                        p.dirty = true;
                        dset.insert(idx);
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
                    pages.insert(
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
                    dset.insert(idx);
                    newly += 1;
                    added += 1;
                }
            }
        }
        self.finish_apply(&mut st, f, fd, newly, added, off, end);
        Ok(((end - off) as usize, newly))
    }

    #[allow(clippy::too_many_arguments)]
    pub(super) fn finish_apply(
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
        // `newly` pages were added to st.dirty by the caller.
        let was_clean = st.dirty.len() as u64 == newly;
        self.bytes.fetch_add(added * P, Ordering::AcqRel);
        if was_clean && newly > 0 {
            self.dirty_files.lock().insert(f.ino, Instant::now());
        }
    }

    /// Take room for `need` more dirty bytes, waiting (throttled) while that would pass
    /// dirty_thresh.
    pub(super) fn reserve_dirty(&self, need: u64) -> Result<(), Errno> {
        // From the first wait on: when it began, and the writer counted among those waiting
        // at the limit (out again on every way out).
        struct Waiting<'a>(Instant, &'a AtomicU64);
        impl Drop for Waiting<'_> {
            fn drop(&mut self) {
                self.1.fetch_sub(1, Ordering::AcqRel);
            }
        }
        let mut waited: Option<Waiting> = None;
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
            let t0 = waited
                .get_or_insert_with(|| {
                    self.stats.limit_waits.fetch_add(1, Ordering::Relaxed);
                    self.limit_waiters.fetch_add(1, Ordering::AcqRel);
                    Waiting(Instant::now(), &self.limit_waiters)
                })
                .0;
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
        if let Some(w) = waited {
            self.note_throttle(w.0);
        }
        Ok(())
    }

    pub(super) fn note_throttle(&self, t0: Instant) {
        self.stats.throttle_events.fetch_add(1, Ordering::Relaxed);
        self.stats
            .throttle_us
            .fetch_add(t0.elapsed().as_micros() as u64, Ordering::Relaxed);
    }

    /// balance_dirty_pages after dirtying `bytes`: wake the flusher above bg_thresh, pace the
    /// writer between freerun and the limit.
    pub(super) fn balance_dirty_pages(&self, bytes: u64) {
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

    pub(super) fn kick_flusher(&self) {
        let mut g = self.flusher.m.lock();
        if !g.kick {
            g.kick = true;
            self.flusher.cv.notify_all();
        }
    }

    /// Write dirty pages of `f` (at most `max_pages`) to its upper file. Returns pages written.
    pub(super) fn writeback_file(&self, f: &CachedFile, max_pages: u64) -> Result<u64, Errno> {
        let mut wb = f.wb.lock();
        let mut total = 0u64;
        // Each batch looks on from where the last one ended (once more from the start when
        // that finds nothing: pages dirtied behind it meanwhile), so writing D dirty pages out
        // of P cached ones walks the file's pages about once, not D/256 times.
        let mut from = 0u64;
        while total < max_pages {
            let mut st = f.st.lock();
            let Some(fd) = st.wb_fd.clone() else {
                break;
            };
            if st.dirty.is_empty() {
                self.finish_clean(f, &mut st, &fd);
                break;
            }
            let want = (max_pages - total).min(WB_BATCH as u64) as usize;
            let mut batch: Vec<(u64, PageData, u64)> = Vec::with_capacity(want);
            let FileState { pages, dirty, .. } = &mut *st;
            for &i in dirty.range(from..) {
                if let Some(Slot::Ready(p)) = pages.get_mut(&i)
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
            let Some(&(last, _, _)) = batch.last() else {
                if from > 0 {
                    from = 0;
                    continue;
                }
                break;
            };
            from = last + 1;
            let n = batch.len() as u64;
            // Quota: from the first write of the batch until its charge is handed back, a
            // stat of the file may count pages still charged (see `charge_token`).
            let flushing = self.quota.as_ref().map(|_| {
                f.flushing.fetch_add(1, Ordering::SeqCst);
                f.flush_gen.fetch_add(1, Ordering::SeqCst);
                Flushing(&f.flushing)
            });
            self.writeback.fetch_add(n * P, Ordering::AcqRel);
            let marked = Marked {
                cache: self,
                f,
                batch: &batch,
            };
            let t0 = Instant::now();
            let mut res = Ok(());
            let mut written_end = 0u64;
            // batch[..ok_upto] reached the file; batch[ok_upto..failed_to] is the run whose
            // write failed (the rest was not tried).
            let (mut ok_upto, mut failed_to) = (batch.len(), batch.len());
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
                    #[cfg(test)]
                    if PANIC_IN_WRITEBACK.with(|p| p.replace(false)) {
                        panic!("unit test: write-back panics");
                    }
                    res = pwritev_all(&fd, &parts, start);
                    if res.is_err() {
                        (ok_upto, failed_to) = (i, j);
                        break;
                    }
                    written_end = written_end.max(start + len as u64);
                }
                i = j;
            }
            // Past the largest file upper's filesystem can hold: those pages can never be
            // written, and kept dirty they would hold the dirty budget (and every writer of
            // the mount at the limit) for good. Dropped, the error kept for fsync — what the
            // kernel does with pages whose write-back fails.
            let lost_to = if res == Err(Errno::EFBIG) {
                failed_to
            } else {
                ok_upto
            };
            marked.sorted();
            self.writeback.fetch_sub(n * P, Ordering::AcqRel);
            let mut st = f.st.lock();
            let mut cleaned = 0u64;
            let mut released = 0u64;
            let mut lru_add = Vec::new();
            let mut lost = Vec::new();
            for (k, (idx, _, wseq)) in batch.iter().enumerate() {
                if let Some(Slot::Ready(p)) = st.pages.get_mut(idx) {
                    p.writeback = false;
                    if k < lost_to {
                        if std::mem::take(&mut p.charged) {
                            released += P;
                        }
                        if k >= ok_upto {
                            // Even if rewritten meanwhile: no write of it can succeed.
                            if p.dirty {
                                cleaned += 1;
                            }
                            lost.push(*idx);
                        } else if p.wseq == *wseq {
                            p.dirty = false;
                            st.dirty.remove(idx);
                            cleaned += 1;
                            lru_add.push(*idx);
                        }
                    }
                }
            }
            for idx in &lost {
                st.pages.remove(idx);
                st.dirty.remove(idx);
            }
            // What reached the file is on disk whatever came after it (the runs before a
            // failed one are clean now: a later partial write into one of their pages, evicted
            // meanwhile, must read the rest of it back).
            st.disk_size = st.disk_size.max(written_end);
            if !lost.is_empty() {
                // The failed run may have been written in part (up to the limit).
                if let Ok(fs) = nix::sys::stat::fstat(fd.as_fd()) {
                    st.disk_size = st.disk_size.max(fs.st_size.max(0) as u64);
                }
                // The size those writes showed was never the file's: it is set from the file
                // once nothing dirty is left.
                st.size_lost = true;
                let mut lru = self.lru.lock();
                for idx in &lost {
                    lru.pop(&(f.ino, *idx));
                }
            }
            if st.size_lost
                && st.dirty.is_empty()
                && let Ok(fs) = nix::sys::stat::fstat(fd.as_fd())
            {
                st.size = fs.st_size.max(0) as u64;
                st.disk_size = st.size;
                st.size_lost = false;
            }
            self.bytes
                .fetch_sub(lost.len() as u64 * P, Ordering::AcqRel);
            self.dirty.fetch_sub(cleaned * P, Ordering::AcqRel);
            match res {
                Ok(()) => {
                    if st.dirty.is_empty() {
                        self.finish_clean(f, &mut st, &fd);
                    }
                }
                // (None for a file forgotten meanwhile: its number may name another soon.)
                Err(e) if !st.dead => self.record_error(f.ino, e),
                Err(_) => {}
            }
            drop(st);
            f.cv.notify_all();
            if !lru_add.is_empty() {
                {
                    let mut lru = self.lru.lock();
                    for i in lru_add {
                        lru.put((f.ino, i), ());
                    }
                }
                // Writes that found nothing clean to evict went over the budget; these pages
                // can go now.
                self.trim_to_budget();
            }
            if let Some(q) = &self.quota {
                // Settle the file's real allocation and hand the charge back, in one step (a
                // report between the two counted these pages twice). Not under the
                // write-back lock: the settle takes the node's allocation lock, which a
                // truncate holds while it waits for the write-back lock.
                parking_lot::MutexGuard::unlocked(&mut wb, || {
                    match self.sink.read().as_ref().and_then(|w| w.upgrade()) {
                        Some(s) => s.written(f.ino, fd.as_fd(), released),
                        None => q.adjust_bytes(-(released as i64)),
                    }
                });
            }
            drop(flushing);
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
    pub(super) fn finish_clean(&self, f: &CachedFile, st: &mut FileState, fd: &Fd) {
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

    /// Write every dirty page of `ino` to its file; the error of this attempt, if it failed
    /// (recorded for the file's fsyncs too). For operations that need the file's data on it
    /// first (a change behind the cache, a seek for holes, times set after the writes).
    pub fn write_out(&self, ino: u64) -> Result<(), Errno> {
        let Some(f) = self.files.get(&ino).map(|f| f.clone()) else {
            return Ok(());
        };
        self.writeback_file(&f, u64::MAX).map(|_| ())
    }

    /// Record a write-back error of `ino` (`writeback_file`).
    pub(super) fn record_error(&self, ino: u64, errno: Errno) {
        let seq = self.error_seq.fetch_add(1, Ordering::AcqRel) + 1;
        self.errors.lock().insert(
            ino,
            WbError {
                seq,
                errno,
                seen: false,
            },
        );
    }

    /// What a new open of `ino` starts from ([`PageCache::fsync_file`]'s `seen`): the last
    /// error if a sync has reported it, else 0, so that an error nobody was told of is told
    /// to this one (errseq_sample).
    pub fn error_sample(&self, ino: u64) -> u64 {
        match self.errors.lock().get(&ino) {
            Some(w) if w.seen => w.seq,
            _ => 0,
        }
    }

    /// fsync of a handle of `ino` that has seen the errors up to sequence `seen`: write every
    /// dirty page, then report the file's last write-back error if it came after `seen` (and
    /// note it seen), as the kernel's errseq does: an error reaches every descriptor that was
    /// open when it happened, once each, whoever synced first.
    pub fn fsync_file(&self, ino: u64, seen: &AtomicU64) -> Result<(), Errno> {
        let r = self.write_out(ino);
        let mut errors = self.errors.lock();
        if let Some(w) = errors.get_mut(&ino)
            && w.seq > seen.load(Ordering::Acquire)
        {
            w.seen = true;
            seen.store(w.seq, Ordering::Release);
            return Err(w.errno);
        }
        r
    }

    /// Write every dirty page of `ino` to its file, and report a write-back error no sync has
    /// reported yet (noting it seen; descriptors open when it happened still get it at their
    /// fsync).
    pub fn sync_file(&self, ino: u64) -> Result<(), Errno> {
        let r = self.write_out(ino);
        let mut errors = self.errors.lock();
        if let Some(w) = errors.get_mut(&ino)
            && !w.seen
        {
            w.seen = true;
            return Err(w.errno);
        }
        r
    }

    /// A handle that wrote `ino` was released, or a rename is about to replace a file with
    /// it: with `writeback_on_close` (the default), write its dirty pages to its file now, so
    /// that a daemon killed afterwards loses nothing of it (see [`super::CacheConfig`]). A
    /// write-back error stays for the file's next fsync, as the flusher's do.
    pub fn write_back_closed(&self, ino: u64) {
        if !self.cfg.read().writeback_on_close {
            return;
        }
        let Some(f) = self.files.get(&ino).map(|f| f.clone()) else {
            return;
        };
        if f.st.lock().dirty.is_empty() {
            return;
        }
        self.stats.close_writebacks.fetch_add(1, Ordering::Relaxed);
        let _ = self.writeback_file(&f, u64::MAX);
    }

    /// Write every dirty page of every file. Returns the first error.
    pub fn sync_all(&self) -> Result<(), Errno> {
        self.each_dirty_file(Self::sync_file)
    }

    /// `op` on every file with dirty pages; the first error.
    fn each_dirty_file(&self, op: impl Fn(&Self, u64) -> Result<(), Errno>) -> Result<(), Errno> {
        let mut first = Ok(());
        let inos: Vec<u64> = self.dirty_files.lock().keys().copied().collect();
        for ino in inos {
            if let Err(e) = op(self, ino)
                && first.is_ok()
            {
                first = Err(e);
            }
        }
        first
    }

    /// Write every dirty page of every file, for an unmount: an error only if some cannot be
    /// written now. (Errors of earlier write-backs stay for the files' fsyncs: reported here
    /// as well, the first unmount after room was made on a full upper was refused, saying
    /// "0 bytes" could not be stored — a QA run.)
    pub fn store_all(&self) -> Result<(), Errno> {
        self.each_dirty_file(Self::write_out)
    }

    /// One flusher pass: background write-back while above bg_thresh, and (on the periodic
    /// wake-up) files whose dirty data has expired.
    pub(super) fn flush_pass(&self, periodic: bool) {
        let mut ran = false;
        // Above bg_thresh; or a writer waits at dirty_thresh, which can be less than a page
        // above bg_thresh (tiny budgets): without this, a page below bg_thresh was written
        // only when it expired, and the writer waited that long for every page (as the
        // kernel's balance_dirty_pages starts write-back for a writer over the limit).
        let over_bg = || {
            let d = self.dirty.load(Ordering::Acquire);
            d > self.cfg.read().thresholds().0
                || (d > 0 && self.limit_waiters.load(Ordering::Acquire) > 0)
        };
        // Oldest files first, a chunk each, round after round while above bg_thresh; a file
        // that cannot be written (its error waits for fsync) does not hold up the others.
        while over_bg() {
            let mut order: Vec<(u64, Instant)> = self
                .dirty_files
                .lock()
                .iter()
                .map(|(i, t)| (*i, *t))
                .collect();
            order.sort_by_key(|e| e.1);
            let mut progress = false;
            for (ino, _) in order {
                if !over_bg() {
                    break;
                }
                let Some(f) = self.files.get(&ino).map(|f| f.clone()) else {
                    self.dirty_files.lock().remove(&ino);
                    continue;
                };
                if let Ok(n) = self.writeback_file(&f, WB_CHUNK)
                    && n > 0
                {
                    progress = true;
                    ran = true;
                }
            }
            if !progress {
                break;
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

/// A write-back batch counted in `CachedFile::flushing` (counted out when dropped, also by a
/// panic).
struct Flushing<'a>(&'a AtomicU64);

impl Drop for Flushing<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::SeqCst);
    }
}

#[cfg(test)]
thread_local! {
    /// Unit tests: the next write-back write of this thread panics.
    pub(super) static PANIC_IN_WRITEBACK: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

/// A write-back batch's pages, marked under write-back. If the batch unwinds before it sorts
/// them out (a panic), they are unmarked, still dirty, and counted out of write-back, so that a
/// later pass writes them: left marked, every pass would skip them, and a sync would return
/// as if they were written.
struct Marked<'a> {
    cache: &'a PageCache,
    f: &'a CachedFile,
    /// (page, data, write sequence), as the batch holds them.
    batch: &'a [(u64, PageData, u64)],
}

impl Marked<'_> {
    /// The batch sorts its pages out itself from here on.
    fn sorted(mut self) {
        self.batch = &[];
    }
}

impl Drop for Marked<'_> {
    fn drop(&mut self) {
        if self.batch.is_empty() {
            return;
        }
        let mut st = self.f.st.lock();
        for (i, _, _) in self.batch {
            if let Some(Slot::Ready(p)) = st.pages.get_mut(i) {
                p.writeback = false;
            }
        }
        drop(st);
        self.cache
            .writeback
            .fetch_sub(self.batch.len() as u64 * P, Ordering::AcqRel);
        self.f.cv.notify_all();
        self.cache.throttle.1.notify_all();
    }
}
