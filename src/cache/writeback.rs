//! Dirty limits and writer pacing, mirroring the kernel's mm/page-writeback.c
//! (`domain_dirty_limits`, `dirty_freerun_ceiling`, `pos_ratio_polynom`, `balance_dirty_pages`)
//! with the cache budget in place of available memory.

use std::time::Duration;

/// The longest single pause of a throttled writer (the kernel's MAX_PAUSE, HZ/5).
pub const MAX_PAUSE: Duration = Duration::from_millis(200);

/// Cache and write-back settings; what the vm.* sysctls of the same names mean, over the
/// cache budget.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CacheConfig {
    /// Page memory budget in bytes (0: no cache).
    pub size: u64,
    /// Largest readahead window in KiB (read_ahead_kb; 0: no readahead).
    pub readahead_kb: u64,
    /// The kernel's readahead for this FUSE mount (its bdi's read_ahead_kb), set when root
    /// may; 0: as the devices holding the layers read ahead (what kernel overlayfs gets).
    pub kernel_readahead_kb: u64,
    /// Background write-back starts above this % of the budget.
    pub dirty_background_ratio: u64,
    /// Writers block above this % of the budget.
    pub dirty_ratio: u64,
    /// Absolute background threshold in bytes (overrides the ratio when non-zero).
    pub dirty_background_bytes: u64,
    /// Absolute dirty limit in bytes (overrides the ratio when non-zero).
    pub dirty_bytes: u64,
    /// Dirty data older than this (centiseconds) is written at the next flusher wake-up.
    pub dirty_expire_centisecs: u64,
    /// The flusher wakes this often (centiseconds; 0: only when needed).
    pub dirty_writeback_centisecs: u64,
    /// A file's dirty data is written to its upper file when a handle that wrote it is
    /// released (the last close of an open file), and before a rename replaces a file with
    /// it, as FUSE's own write-back cache and NFS write at close and ext4 writes before such a
    /// rename (`auto_da_alloc`): a daemon killed afterwards loses nothing that was closed.
    /// Off: closed files' data waits for the flusher (expiry, thresholds), fsync or sync.
    pub writeback_on_close: bool,
}

impl Default for CacheConfig {
    fn default() -> Self {
        CacheConfig {
            size: 256 << 20,
            readahead_kb: 128,
            kernel_readahead_kb: 0,
            dirty_background_ratio: 10,
            dirty_ratio: 20,
            dirty_background_bytes: 0,
            dirty_bytes: 0,
            dirty_expire_centisecs: 3000,
            dirty_writeback_centisecs: 500,
            writeback_on_close: true,
        }
    }
}

/// The settings' names, as `-o` options, CLI flags (with dashes) and live `cache set` keys.
pub const KEYS: &[&str] = &[
    "cache_size",
    "readahead_kb",
    "kernel_readahead_kb",
    "dirty_background_ratio",
    "dirty_ratio",
    "dirty_background_bytes",
    "dirty_bytes",
    "dirty_expire_centisecs",
    "dirty_writeback_centisecs",
    "writeback_on_close",
];

/// What the cache's bookkeeping costs per page beyond its 4 KiB, in the daemon's heap: its
/// slot in the file's page map, its LRU entry and its share of the buffer it sits in (with
/// the allocator's headers). Measured: heap in use minus page bytes, over the page count,
/// after filling a 1 GiB budget with 4 KiB random reads — 51 MB for 256k pages (198 bytes a
/// page; 2026-12-02).
pub const PAGE_META: u64 = 200;

impl CacheConfig {
    /// The bytes pages may take: the budget less their bookkeeping ([`PAGE_META`]), in whole
    /// pages, so that `cache_size` bounds what the cache holds in memory.
    pub fn page_budget(&self) -> u64 {
        let p = super::PAGE as u64;
        self.size / (p + PAGE_META) * p
    }

    /// The most the dirty limit may be: what pages may take, and at least two pages.
    fn dirty_cap(&self) -> u64 {
        self.page_budget().max(2 * super::PAGE as u64)
    }

    /// (bg_thresh, dirty_thresh) in bytes, as `domain_dirty_limits` computes them: the
    /// `*_bytes` settings win over the ratios; a background threshold at or above the limit
    /// becomes half the limit. No limit passes what pages may take
    /// ([`CacheConfig::page_budget`]): dirty pages live in the cache, whose size bounds its
    /// memory (the kernel's own bound is the machine's memory).
    pub fn thresholds(&self) -> (u64, u64) {
        let (bg, thresh) = self.asked_thresholds();
        (if bg >= thresh { thresh / 2 } else { bg }, thresh)
    }

    /// (background threshold as asked, dirty limit): [`CacheConfig::thresholds`] before a
    /// background threshold at or above the limit is halved.
    fn asked_thresholds(&self) -> (u64, u64) {
        let thresh = if self.dirty_bytes > 0 {
            self.dirty_bytes
        } else {
            self.size / 100 * self.dirty_ratio + self.size % 100 * self.dirty_ratio / 100
        }
        .min(self.dirty_cap());
        let bg = if self.dirty_background_bytes > 0 {
            self.dirty_background_bytes
        } else {
            self.size / 100 * self.dirty_background_ratio
                + self.size % 100 * self.dirty_background_ratio / 100
        };
        (bg, thresh)
    }

    /// What these settings do that their values do not say (`physical_memory`: the machine's
    /// memory, if known): each a sentence for a warning. The settings are taken as the kernel
    /// takes its sysctls' (a background threshold at or above the limit is halved), but
    /// whoever set them should hear it.
    pub fn warnings(&self, physical_memory: Option<u64>) -> Vec<String> {
        let mut w = Vec::new();
        if let Some(mem) = physical_memory
            && self.size > mem
        {
            w.push(format!(
                "cache_size {} is more than this machine's memory ({} MiB): the cache may grow \
                 until the daemon is out of memory",
                self.size,
                mem >> 20
            ));
        }
        if self.size == 0 {
            return w;
        }
        let cap = self.dirty_cap();
        if self.dirty_bytes > cap {
            w.push(format!(
                "dirty_bytes {} is more than the cache's pages may take ({cap} bytes of \
                 cache_size {}): the dirty limit is {cap}",
                self.dirty_bytes, self.size
            ));
        }
        let (bg, thresh) = self.asked_thresholds();
        if bg > 0 && bg >= thresh {
            let asked = if self.dirty_background_bytes > 0 {
                format!("dirty_background_bytes {bg}")
            } else {
                format!(
                    "dirty_background_ratio {} ({bg} bytes)",
                    self.dirty_background_ratio
                )
            };
            w.push(format!(
                "{asked} is not below the dirty limit ({thresh} bytes): background write-back \
                 starts at half the limit ({} bytes), as the kernel does; set \
                 dirty_background_bytes or dirty_background_ratio below the limit to choose",
                thresh / 2
            ));
        }
        w
    }

    /// Set one setting by name (`cache_size=64M`, `dirty-ratio=30`). Setting a ratio clears
    /// the matching `*_bytes`, and the reverse, as writing the sysctls does.
    pub fn set(&mut self, key: &str, value: &str) -> Result<(), String> {
        let key = key.replace('-', "_");
        let num = |v: &str| -> Result<u64, String> {
            v.parse::<u64>()
                .map_err(|_| format!("{key}: expected a number, got {v:?}"))
        };
        let ratio = |v: &str| -> Result<u64, String> {
            let n = num(v)?;
            if n > 100 {
                return Err(format!("{key}: a percentage is at most 100, got {n}"));
            }
            Ok(n)
        };
        let at_most = |v: &str, max: u64, what: &str| -> Result<u64, String> {
            let n = num(v)?;
            if n > max {
                return Err(format!("{key}: at most {max}{what}, got {n}"));
            }
            Ok(n)
        };
        // Windows in KiB: 1 GiB at most (their byte counts must not overflow; a window is
        // also kept to a quarter of the page budget where it is used). Centiseconds: the
        // sysctls are ints.
        let kb = |v: &str| at_most(v, 1 << 20, " (1 GiB)");
        let cs = |v: &str| at_most(v, i32::MAX as u64, ", as the vm.* sysctl");
        let size = |v: &str| crate::quota::parse_size(v).map_err(|e| format!("{key}: {e}"));
        match key.as_str() {
            "cache_size" => self.size = size(value)?,
            "readahead_kb" => self.readahead_kb = kb(value)?,
            "kernel_readahead_kb" => self.kernel_readahead_kb = kb(value)?,
            "dirty_background_ratio" => {
                self.dirty_background_ratio = ratio(value)?;
                self.dirty_background_bytes = 0;
            }
            "dirty_ratio" => {
                let r = ratio(value)?;
                if r == 0 {
                    return Err("dirty_ratio: must be at least 1".into());
                }
                self.dirty_ratio = r;
                self.dirty_bytes = 0;
            }
            "dirty_background_bytes" => {
                self.dirty_background_bytes = size(value)?;
                if self.dirty_background_bytes == 0 && self.dirty_background_ratio == 0 {
                    return Err("dirty_background_bytes: 0 needs dirty_background_ratio".into());
                }
            }
            "dirty_bytes" => {
                let b = size(value)?;
                if b > 0 && b < 2 * super::PAGE as u64 {
                    return Err(format!(
                        "dirty_bytes: at least two pages ({} bytes)",
                        2 * super::PAGE
                    ));
                }
                self.dirty_bytes = b;
            }
            "dirty_expire_centisecs" => self.dirty_expire_centisecs = cs(value)?,
            "dirty_writeback_centisecs" => self.dirty_writeback_centisecs = cs(value)?,
            "writeback_on_close" => {
                self.writeback_on_close = match value {
                    "1" | "on" => true,
                    "0" | "off" => false,
                    v => return Err(format!("{key}: expected 1 (on) or 0 (off), got {v:?}")),
                }
            }
            _ => {
                return Err(format!(
                    "unknown cache setting {key:?} (known: {})",
                    KEYS.join(", ")
                ));
            }
        }
        Ok(())
    }

    /// The settings as `key=value` pairs, in [`KEYS`] order; a ratio that its `*_bytes`
    /// overrides shows as 0, as the sysctls read.
    pub fn pairs(&self) -> Vec<(&'static str, u64)> {
        let unless = |bytes: u64, ratio: u64| if bytes > 0 { 0 } else { ratio };
        vec![
            ("cache_size", self.size),
            ("readahead_kb", self.readahead_kb),
            ("kernel_readahead_kb", self.kernel_readahead_kb),
            (
                "dirty_background_ratio",
                unless(self.dirty_background_bytes, self.dirty_background_ratio),
            ),
            ("dirty_ratio", unless(self.dirty_bytes, self.dirty_ratio)),
            ("dirty_background_bytes", self.dirty_background_bytes),
            ("dirty_bytes", self.dirty_bytes),
            ("dirty_expire_centisecs", self.dirty_expire_centisecs),
            ("dirty_writeback_centisecs", self.dirty_writeback_centisecs),
            ("writeback_on_close", u64::from(self.writeback_on_close)),
        ]
    }
}

/// `dirty_freerun_ceiling`: below this writers are never throttled.
pub fn freerun(bg: u64, thresh: u64) -> u64 {
    (bg + thresh) / 2
}

/// `pos_ratio_polynom`: 1 + ((setpoint − dirty)/(limit − setpoint))³ clamped to [0, 2], with
/// setpoint halfway between the freerun ceiling and the limit. 2 at freerun, 1 at the
/// setpoint, 0 at the limit.
pub fn pos_ratio(dirty: u64, bg: u64, thresh: u64) -> f64 {
    let limit = thresh as f64;
    let fr = freerun(bg, thresh) as f64;
    let setpoint = (fr + limit) / 2.0;
    if limit <= setpoint {
        return if (dirty as f64) < limit { 2.0 } else { 0.0 };
    }
    let x = (setpoint - dirty as f64) / (limit - setpoint);
    (1.0 + x * x * x).clamp(0.0, 2.0)
}

/// How long a writer that just dirtied `bytes` pauses with `dirty` bytes dirty, given the
/// measured write-back bandwidth `bw` (bytes/s): none below freerun, `bytes / (bw·pos_ratio)`
/// above it (capped at [`MAX_PAUSE`]), `None` at the limit (wait for the flusher).
pub fn pause(bytes: u64, dirty: u64, bg: u64, thresh: u64, bw: u64) -> Option<Duration> {
    if dirty <= freerun(bg, thresh) {
        return Some(Duration::ZERO);
    }
    let r = pos_ratio(dirty, bg, thresh);
    if r <= 0.0 {
        return None;
    }
    let rate = bw.max(1 << 20) as f64 * r;
    let secs = bytes as f64 / rate;
    Some(Duration::from_secs_f64(secs).min(MAX_PAUSE))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn settings_that_do_not_do_what_they_say_are_warned_of() {
        let c = CacheConfig {
            size: 1000 << 20,
            ..CacheConfig::default()
        };
        assert!(c.warnings(Some(1 << 40)).is_empty());
        // More than the machine has.
        let w = c.warnings(Some(512 << 20));
        assert_eq!(w.len(), 1);
        assert!(
            w[0].contains("more than this machine's memory (512 MiB)"),
            "{w:?}"
        );
        // A background threshold at or above the limit (the kernel halves it).
        let c2 = CacheConfig {
            dirty_background_ratio: 30,
            ..c
        };
        let w = c2.warnings(None);
        assert_eq!(w.len(), 1);
        assert!(
            w[0].starts_with("dirty_background_ratio 30 (314572800 bytes) is not below the dirty limit (209715200 bytes)")
                && w[0].contains("half the limit (104857600 bytes)"),
            "{w:?}"
        );
        let c3 = CacheConfig {
            dirty_background_bytes: 300 << 20,
            ..c
        };
        assert!(
            c3.warnings(None)[0]
                .starts_with("dirty_background_bytes 314572800 is not below the dirty limit")
        );
        // Equal is not below either; just below is fine.
        let c4 = CacheConfig {
            dirty_background_bytes: 200 << 20,
            ..c
        };
        assert_eq!(c4.warnings(None).len(), 1);
        let c5 = CacheConfig {
            dirty_background_bytes: (200 << 20) - 1,
            ..c
        };
        assert!(c5.warnings(None).is_empty());
        // A dirty limit above what pages may take; the background threshold under it is
        // then compared with the capped limit.
        let c6 = CacheConfig {
            size: 16 << 20,
            dirty_bytes: 160 << 20,
            ..c
        };
        let w = c6.warnings(None);
        assert_eq!(w.len(), 1, "{w:?}");
        assert!(w[0].starts_with("dirty_bytes 167772160 is more than the cache's pages may take"));
        // The limit named is the one used: at least two pages (review: a 8K cache with
        // dirty_bytes=8K was told 4096).
        let tiny = CacheConfig {
            size: 8192,
            dirty_bytes: 8192,
            dirty_background_bytes: 4096,
            ..c
        };
        assert_eq!(tiny.thresholds().1, 8192);
        assert!(tiny.warnings(None).is_empty(), "{:?}", tiny.warnings(None));
        // A ratio of 0 asks for no background threshold; no cache, nothing to say.
        let c7 = CacheConfig {
            dirty_background_ratio: 0,
            ..c
        };
        assert!(c7.warnings(None).is_empty());
        let c8 = CacheConfig {
            size: 0,
            dirty_background_ratio: 50,
            ..c
        };
        assert!(c8.warnings(None).is_empty());
    }

    #[test]
    fn thresholds_like_the_sysctls() {
        let c = CacheConfig {
            size: 1000 << 20,
            ..CacheConfig::default()
        };
        assert_eq!(c.thresholds(), (100 << 20, 200 << 20));
        // bytes override ratios.
        let c2 = CacheConfig {
            dirty_bytes: 50 << 20,
            dirty_background_bytes: 10 << 20,
            ..c
        };
        assert_eq!(c2.thresholds(), (10 << 20, 50 << 20));
        // bg ≥ limit → half the limit.
        let c3 = CacheConfig {
            dirty_background_ratio: 30,
            dirty_ratio: 20,
            ..c
        };
        assert_eq!(c3.thresholds(), (100 << 20, 200 << 20));
        let c4 = CacheConfig {
            dirty_background_ratio: 50,
            dirty_ratio: 20,
            ..c
        };
        assert_eq!(c4.thresholds().0, c4.thresholds().1 / 2);
        // No more dirty than the cache holds (review: --cache-size 16M --dirty-bytes 160M
        // let 120 MiB of dirty pages into a 16 MiB cache).
        let c5 = CacheConfig {
            size: 16 << 20,
            dirty_bytes: 160 << 20,
            dirty_background_bytes: 150 << 20,
            ..c
        };
        let pages = c5.page_budget();
        assert_eq!(c5.thresholds(), (pages / 2, pages));
        // A ratio of 100 is the page budget too: pages' bookkeeping is inside the budget.
        let c6 = CacheConfig {
            dirty_ratio: 100,
            ..c
        };
        assert_eq!(c6.thresholds().1, c.page_budget());
    }

    #[test]
    fn the_page_budget_leaves_room_for_the_bookkeeping() {
        let c = CacheConfig {
            size: 256 << 20,
            ..CacheConfig::default()
        };
        let pages = c.page_budget() / 4096;
        assert_eq!(c.page_budget() % 4096, 0);
        assert!(pages * (4096 + PAGE_META) <= c.size);
        assert!((pages + 1) * (4096 + PAGE_META) > c.size);
    }

    #[test]
    fn throttle_curve() {
        let (bg, th) = (100u64 << 20, 200u64 << 20);
        let fr = freerun(bg, th);
        let sp = (fr + th) / 2;
        assert!((pos_ratio(fr, bg, th) - 2.0).abs() < 1e-9);
        assert!((pos_ratio(sp, bg, th) - 1.0).abs() < 1e-9);
        assert!(pos_ratio(th, bg, th).abs() < 1e-9);
        assert_eq!(pos_ratio(th + 4096, bg, th), 0.0);
        assert_eq!(pos_ratio(0, bg, th), 2.0);
        // Monotonic decreasing between freerun and the limit.
        let mut last = 2.0;
        for d in (fr..=th).step_by(1 << 20) {
            let r = pos_ratio(d, bg, th);
            assert!(r <= last + 1e-12, "d={d}");
            last = r;
        }
    }

    #[test]
    fn pauses() {
        let (bg, th) = (100u64 << 20, 200u64 << 20);
        let bw = 100 << 20;
        assert_eq!(pause(1 << 20, bg, bg, th, bw), Some(Duration::ZERO));
        let sp = (freerun(bg, th) + th) / 2;
        // At the setpoint a writer runs at the write-back bandwidth: 1 MiB takes 10 ms.
        let p = pause(1 << 20, sp, bg, th, bw).expect("pause");
        assert!((p.as_secs_f64() - 0.01).abs() < 1e-3, "{p:?}");
        assert_eq!(pause(1 << 20, th, bg, th, bw), None);
        // Never longer than MAX_PAUSE.
        assert_eq!(pause(1 << 30, th - 1, bg, th, bw), Some(MAX_PAUSE));
    }

    #[test]
    fn settings_by_name() {
        let mut c = CacheConfig::default();
        c.set("dirty-ratio", "30").expect("set");
        assert_eq!(c.dirty_ratio, 30);
        c.set("dirty_bytes", "64M").expect("set");
        assert_eq!(c.thresholds().1, 64 << 20);
        c.set("dirty_ratio", "25").expect("set");
        assert_eq!(c.dirty_bytes, 0);
        assert!(c.set("dirty_ratio", "101").is_err());
        assert!(c.set("dirty_ratio", "0").is_err());
        assert!(c.set("cache_size", "lots").is_err());
        assert!(c.set("nonsense", "1").is_err());
        c.set("cache_size", "1G").expect("set");
        assert_eq!(c.size, 1 << 30);
    }
}
