//! On-demand readahead, mirroring the kernel's mm/readahead.c (`page_cache_sync_ra`,
//! `page_cache_async_ra`, `get_init_ra_size`, `get_next_ra_size`), in pages.
//!
//! One [`RaState`] lives in each open file (the kernel's `struct file_ra_state`). A read that
//! misses the cache asks [`RaState::sync`] what to read; a read that touches the readahead
//! marker page of the current window asks [`RaState::on_marker`] for the next window, which is
//! read asynchronously. The window's marker page is `start + size - async_size`.

/// A readahead window: pages `[start, start + size)`, the last `async_size` of which are read
/// ahead of need; touching page `start + size - async_size` (the marker) starts the next one.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Window {
    /// First page.
    pub start: u64,
    /// Pages in the window.
    pub size: u64,
    /// Pages read ahead of need (the marker is the first of them).
    pub async_size: u64,
}

impl Window {
    /// The marker page: touching it starts the next window.
    pub fn marker(&self) -> u64 {
        self.start + self.size - self.async_size
    }

    /// One past the last page.
    pub fn end(&self) -> u64 {
        self.start + self.size
    }
}

/// Per-open-file readahead state (`struct file_ra_state`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct RaState {
    /// The current window (size 0: none yet).
    pub start: u64,
    /// Pages in the current window.
    pub size: u64,
    /// Asynchronous tail of the current window.
    pub async_size: u64,
    /// The last page the previous read touched (`prev_pos >> PAGE_SHIFT`), if any.
    pub prev: Option<u64>,
    /// Drop-behind: pages a sequential stream reads synchronously are handed to the reader and
    /// not kept (set for handles whose reads land in the kernel's page cache, which keeps them
    /// for re-reads; our copy would only cost a pass over cold memory). Readahead windows are
    /// still cached: that is where the reader finds them.
    pub drop_behind: bool,
}

/// `get_init_ra_size`: the first window for a request of `req` pages, `max` pages at most.
pub fn init_size(req: u64, max: u64) -> u64 {
    let r = req.max(1).next_power_of_two();
    if r <= max / 32 {
        r * 4
    } else if r <= max / 4 {
        r * 2
    } else {
        max
    }
}

/// `get_next_ra_size`: the window after one of `cur` pages.
pub fn next_size(cur: u64, max: u64) -> u64 {
    if cur < max / 16 {
        4 * cur
    } else if cur <= max / 2 {
        2 * cur
    } else {
        max
    }
}

impl RaState {
    fn window(&self) -> Window {
        Window {
            start: self.start,
            size: self.size,
            async_size: self.async_size,
        }
    }

    /// The kernel's `readit:` step: a window read entirely ahead of need whose marker is the
    /// page being read merges the next window in, so the stream keeps one window in flight.
    fn readit(&mut self, index: u64, max: u64) -> Window {
        if index == self.start && self.size == self.async_size {
            let add = next_size(self.size, max);
            if self.size + add <= max {
                self.async_size = add;
                self.size += add;
            } else {
                self.size = max;
                self.async_size = max >> 1;
            }
        }
        self.window()
    }

    /// A read of `req` pages from `index` missed the cache at `index`. Returns the window to
    /// read (the caller reads `[index, index + req)` at once and the rest of the window in the
    /// background), or `None` for random access: read exactly what was asked, no readahead.
    /// `contig_before` counts cached pages just before `index` (the kernel's context
    /// readahead: an interleaved stream whose history is in the cache).
    pub fn sync(&mut self, index: u64, req: u64, max: u64, contig_before: u64) -> Option<Window> {
        let prev = self.prev;
        self.prev = Some(index + req.max(1) - 1);
        if max == 0 {
            return None;
        }
        let sequential = prev.is_some_and(|p| index >= p && index - p <= 1);
        if index == 0 || req > max || sequential {
            self.start = index;
            self.size = init_size(req, max);
            self.async_size = if self.size > req {
                self.size - req
            } else {
                self.size
            };
            return Some(self.readit(index, max));
        }
        if contig_before <= req {
            // Random: no readahead, and the window is left alone.
            return None;
        }
        self.start = index;
        self.size = (contig_before + req).min(max);
        self.async_size = 1;
        Some(self.readit(index, max))
    }

    /// A read of `req` pages touched the marker page `index`. Returns the next window, all of it
    /// to be read asynchronously. `next_miss` is the first page after `index` not in the cache
    /// (used when the marker belongs to a window this state no longer describes).
    pub fn on_marker(&mut self, index: u64, req: u64, max: u64, next_miss: u64) -> Option<Window> {
        if max == 0 {
            return None;
        }
        let expected = self.start + self.size - self.async_size;
        if self.size > 0 && (index == expected || index == self.start + self.size) {
            self.start += self.size;
            self.size = next_size(self.size, max);
            self.async_size = self.size;
            return Some(self.readit(index, max));
        }
        // Hit the marker of another stream, or this one lost its state: pick up from the
        // first page not yet cached, sized from how far ahead the cache already reaches.
        if next_miss <= index || next_miss - index > max {
            return None;
        }
        self.start = next_miss;
        self.size = next_miss - index + req;
        self.size = next_size(self.size, max);
        self.async_size = self.size;
        Some(self.readit(index, max))
    }

    /// Does a read from `index` continue this file's stream (or start one at the beginning),
    /// allowing `slack` pages either way: FUSE delivers the kernel's concurrent readahead
    /// requests of one stream slightly out of order.
    pub fn streaming(&self, index: u64, slack: u64) -> bool {
        index == 0 || self.prev.is_some_and(|p| index.abs_diff(p) <= slack)
    }

    /// Remember where the last read ended (for the sequential test of the next miss).
    pub fn touched(&mut self, last: u64) {
        self.prev = Some(last);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn initial_window_follows_the_kernel() {
        // max 32 pages (128 KiB): 1–2 page requests → 4, 3–4 → 8, 5–8 → 16, more → 32.
        let m = 32;
        assert_eq!(init_size(1, m), 4);
        assert_eq!(init_size(2, m), 4);
        assert_eq!(init_size(3, m), 8);
        assert_eq!(init_size(4, m), 8);
        for r in 5..=8 {
            assert_eq!(init_size(r, m), 16, "r={r}");
        }
        for r in [9, 16, 31, 32, 33, 256] {
            assert_eq!(init_size(r, m), 32, "r={r}");
        }
        // A bigger maximum (1 MiB = 256 pages): a 1-page request ×4 while ≤ max/32 (8).
        assert_eq!(init_size(1, 256), 4);
        assert_eq!(init_size(8, 256), 32);
        assert_eq!(init_size(16, 256), 32);
        assert_eq!(init_size(64, 256), 128);
        assert_eq!(init_size(65, 256), 256);
    }

    #[test]
    fn ramp_follows_the_kernel() {
        let m = 32;
        assert_eq!(next_size(1, m), 4);
        assert_eq!(next_size(4, m), 8);
        assert_eq!(next_size(8, m), 16);
        assert_eq!(next_size(16, m), 32);
        assert_eq!(next_size(32, m), 32);
        // A full ramp from one page.
        let mut cur = 1;
        let mut seen = vec![cur];
        for _ in 0..5 {
            cur = next_size(cur, m);
            seen.push(cur);
        }
        assert_eq!(seen, [1, 4, 8, 16, 32, 32]);
    }

    #[test]
    fn sequential_stream_of_one_page_reads() {
        let m = 32;
        let mut ra = RaState::default();
        // First read at 0: initial window 4, async tail 3, marker page 1.
        let w = ra.sync(0, 1, m, 0).expect("window");
        assert_eq!(
            w,
            Window {
                start: 0,
                size: 4,
                async_size: 3
            }
        );
        assert_eq!(w.marker(), 1);
        // The reader touches page 1 (the marker): next window 4..12, all async, marker 4.
        let w = ra.on_marker(1, 1, m, 4).expect("window");
        assert_eq!((w.start, w.size, w.async_size, w.marker()), (4, 8, 8, 4));
        // Then 12..28 (16), then 28..60 (32), then 32 at a time.
        let w = ra.on_marker(4, 1, m, 12).expect("window");
        assert_eq!((w.start, w.size), (12, 16));
        let w = ra.on_marker(12, 1, m, 28).expect("window");
        assert_eq!((w.start, w.size), (28, 32));
        let w = ra.on_marker(28, 1, m, 60).expect("window");
        assert_eq!((w.start, w.size), (60, 32));
    }

    #[test]
    fn full_window_requests_merge_the_next_window() {
        // FUSE sends 32-page reads with a 32-page maximum: size == request, so the whole
        // window is "async" and readit splits it: marker half way, next window on touch.
        let m = 32;
        let mut ra = RaState::default();
        let w = ra.sync(0, 32, m, 0).expect("window");
        assert_eq!((w.start, w.size, w.async_size, w.marker()), (0, 32, 16, 16));
        let w = ra.on_marker(16, 32, m, 32).expect("window");
        assert_eq!((w.start, w.size, w.async_size), (32, 32, 32));
    }

    #[test]
    fn random_reads_get_no_readahead() {
        let m = 32;
        let mut ra = RaState::default();
        ra.sync(0, 1, m, 0);
        let before = ra;
        // A jump far away with no cached history: exactly what was asked.
        assert_eq!(ra.sync(1000, 1, m, 0), None);
        assert_eq!(
            (ra.start, ra.size, ra.async_size),
            (before.start, before.size, before.async_size)
        );
        assert_eq!(ra.sync(50, 2, m, 0), None);
        // Readahead off.
        let mut off = RaState::default();
        assert_eq!(off.sync(0, 4, 0, 0), None);
    }

    #[test]
    fn a_sequential_miss_after_a_jump_starts_a_fresh_window() {
        let m = 32;
        let mut ra = RaState::default();
        assert_eq!(ra.sync(1000, 2, m, 0), None);
        // Next read continues from 1001+1: sequential → initial window.
        let w = ra.sync(1002, 2, m, 0).expect("window");
        assert_eq!((w.start, w.size, w.async_size), (1002, 4, 2));
    }

    #[test]
    fn context_readahead_from_cached_history() {
        let m = 32;
        let mut ra = RaState::default();
        ra.sync(0, 1, m, 0);
        // Far from the state's stream, but 10 pages before `index` are cached.
        let w = ra.sync(500, 2, m, 10).expect("window");
        assert_eq!((w.start, w.size, w.async_size), (500, 12, 1));
    }

    #[test]
    fn foreign_marker_resumes_from_the_first_miss() {
        let m = 32;
        let mut ra = RaState::default();
        let w = ra.on_marker(100, 1, m, 104).expect("window");
        assert_eq!(w.start, 104);
        assert_eq!(w.size, next_size(5, m));
        // Nothing missing within reach: nothing to do.
        assert_eq!(ra.on_marker(100, 1, m, 200), None);
    }
}
