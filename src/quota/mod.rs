//! Project quota for one mount, mirroring XFS project quotas (DESIGN.md section 3).
//!
//! Usage is allocated bytes (st_blocks × 512) and inodes of everything in upper + workdir/work,
//! hard links once. Space is reserved *before* an operation asks the filesystem for it (a
//! write, a copy-up, a create) and reconciled with the real allocation afterwards, so the
//! syscall that crosses a limit is the one that fails, and concurrent writers cannot overshoot.
//! Over a hard limit — or a soft limit whose grace period has run out — the request fails with
//! ENOSPC (XFS's errno for project quota) or EDQUOT if asked.

pub mod scan;
pub mod store;

use std::path::PathBuf;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};

use nix::errno::Errno;
use parking_lot::{Mutex, RwLock};

/// Default grace period: 7 days, as XFS.
pub const DEFAULT_GRACE: u64 = 7 * 24 * 3600;

/// Limits of a project. 0 means "no limit".
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Project id (reported only).
    pub project_id: u32,
    /// Soft block limit, bytes.
    pub bsoft: u64,
    /// Hard block limit, bytes.
    pub bhard: u64,
    /// Soft inode limit.
    pub isoft: u64,
    /// Hard inode limit.
    pub ihard: u64,
    /// Block grace period, seconds.
    pub bgrace: u64,
    /// Inode grace period, seconds.
    pub igrace: u64,
}

impl Default for Limits {
    fn default() -> Limits {
        Limits {
            project_id: 0,
            bsoft: 0,
            bhard: 0,
            isoft: 0,
            ihard: 0,
            bgrace: DEFAULT_GRACE,
            igrace: DEFAULT_GRACE,
        }
    }
}

impl Limits {
    /// Is any limit set?
    pub fn any(&self) -> bool {
        self.bsoft != 0 || self.bhard != 0 || self.isoft != 0 || self.ihard != 0
    }

    /// Check soft ≤ hard where both are set.
    pub fn validate(&self) -> Result<(), String> {
        if self.bsoft != 0 && self.bhard != 0 && self.bsoft > self.bhard {
            return Err(format!(
                "block soft limit {} is above the hard limit {}",
                self.bsoft, self.bhard
            ));
        }
        if self.isoft != 0 && self.ihard != 0 && self.isoft > self.ihard {
            return Err(format!(
                "inode soft limit {} is above the hard limit {}",
                self.isoft, self.ihard
            ));
        }
        Ok(())
    }
}

/// Seconds since the epoch, or the time held in `clock_file` (tests pin the clock with the
/// daemon's `UNIONFS_FAKE_CLOCK_FILE` so grace periods expire without waiting).
pub fn now_from(clock_file: Option<&std::path::Path>) -> u64 {
    if let Some(p) = clock_file
        && let Ok(s) = std::fs::read_to_string(p)
        && let Ok(v) = s.trim().parse::<u64>()
    {
        return v;
    }
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// A snapshot for reports and statfs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Report {
    /// Limits in force.
    pub limits: Limits,
    /// Allocated bytes.
    pub used_bytes: u64,
    /// Inodes.
    pub used_inodes: u64,
    /// When the block soft limit stops being soft (epoch seconds), if over it.
    pub btimer: Option<u64>,
    /// Same for inodes.
    pub itimer: Option<u64>,
    /// Requests refused for quota so far.
    pub refusals: u64,
}

/// The quota of one mount.
#[derive(Debug)]
pub struct Quota {
    limits: RwLock<Limits>,
    bytes: AtomicI64,
    inodes: AtomicI64,
    /// Grace expiries (epoch seconds), set when usage goes over a soft limit.
    timers: Mutex<(Option<u64>, Option<u64>)>,
    errno: Errno,
    refusals: AtomicU64,
    store: Option<store::StateFile>,
    clock_file: Option<PathBuf>,
}

/// What a reservation is for (which counter, which limits).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Blocks,
    Inodes,
}

impl Quota {
    /// A quota with these limits and current usage. `store`: the state file to persist to.
    pub fn new(
        limits: Limits,
        used_bytes: u64,
        used_inodes: u64,
        timers: (Option<u64>, Option<u64>),
        errno: Errno,
        store: Option<store::StateFile>,
    ) -> Quota {
        let q = Quota {
            limits: RwLock::new(limits),
            bytes: AtomicI64::new(used_bytes as i64),
            inodes: AtomicI64::new(used_inodes as i64),
            timers: Mutex::new(timers),
            errno,
            refusals: AtomicU64::new(0),
            store,
            clock_file: std::env::var_os("UNIONFS_FAKE_CLOCK_FILE").map(PathBuf::from),
        };
        q.update_timers();
        q
    }

    /// Read the current time from `path` instead of the system clock (tests).
    pub fn with_clock_file(mut self, path: PathBuf) -> Quota {
        self.clock_file = Some(path);
        self
    }

    /// The quota's idea of now (epoch seconds).
    pub fn now(&self) -> u64 {
        now_from(self.clock_file.as_deref())
    }

    /// The errno for a refused request.
    pub fn errno(&self) -> Errno {
        self.errno
    }

    /// Current limits.
    pub fn limits(&self) -> Limits {
        *self.limits.read()
    }

    /// Change limits on a live mount (lowering below usage is allowed: growth is refused).
    pub fn set_limits(&self, l: Limits) {
        *self.limits.write() = l;
        self.update_timers();
        self.persist(false);
    }

    /// Current usage (bytes, inodes).
    pub fn usage(&self) -> (u64, u64) {
        (
            self.bytes.load(Ordering::Acquire).max(0) as u64,
            self.inodes.load(Ordering::Acquire).max(0) as u64,
        )
    }

    /// A snapshot.
    pub fn report(&self) -> Report {
        let (b, i) = self.usage();
        let t = *self.timers.lock();
        Report {
            limits: self.limits(),
            used_bytes: b,
            used_inodes: i,
            btimer: t.0,
            itimer: t.1,
            refusals: self.refusals.load(Ordering::Relaxed),
        }
    }

    /// The most that may be in use of `kind` right now (None: unlimited).
    fn ceiling(&self, kind: Kind) -> Option<u64> {
        let l = self.limits();
        let (soft, hard, timer) = match kind {
            Kind::Blocks => (l.bsoft, l.bhard, self.timers.lock().0),
            Kind::Inodes => (l.isoft, l.ihard, self.timers.lock().1),
        };
        let mut c: Option<u64> = if hard != 0 { Some(hard) } else { None };
        if soft != 0
            && let Some(t) = timer
            && self.now() >= t
        {
            // Grace is over: the soft limit is enforced like a hard one.
            c = Some(c.map_or(soft, |h| h.min(soft)));
        }
        c
    }

    fn counter(&self, kind: Kind) -> &AtomicI64 {
        match kind {
            Kind::Blocks => &self.bytes,
            Kind::Inodes => &self.inodes,
        }
    }

    fn reserve(&self, kind: Kind, n: u64) -> Result<(), Errno> {
        if n == 0 {
            return Ok(());
        }
        let ceiling = self.ceiling(kind).map(|c| c.min(i64::MAX as u64) as i64);
        let ctr = self.counter(kind);
        // Checked: a request for 2^63 bytes or more (fallocate of LLONG_MAX) must be refused,
        // not wrap the counter negative and pass.
        let n = i64::try_from(n).ok();
        let r = ctr.fetch_update(Ordering::AcqRel, Ordering::Acquire, |cur| {
            let next = cur.checked_add(n?)?;
            match ceiling {
                Some(c) if next > c => None,
                _ => Some(next),
            }
        });
        match r {
            Ok(_) => {
                self.update_timers();
                Ok(())
            }
            Err(_) => {
                self.refusals.fetch_add(1, Ordering::Relaxed);
                Err(self.errno)
            }
        }
    }

    /// Reserve `n` bytes of space, or fail with the quota errno.
    pub fn reserve_bytes(&self, n: u64) -> Result<(), Errno> {
        self.reserve(Kind::Blocks, n)
    }

    /// Reserve `n` inodes, or fail with the quota errno.
    pub fn reserve_inodes(&self, n: u64) -> Result<(), Errno> {
        self.reserve(Kind::Inodes, n)
    }

    /// Bytes that may still be reserved now (u64::MAX: unlimited).
    pub fn available_bytes(&self) -> u64 {
        self.available(Kind::Blocks)
    }

    /// Inodes that may still be reserved now (u64::MAX: unlimited).
    pub fn available_inodes(&self) -> u64 {
        self.available(Kind::Inodes)
    }

    fn available(&self, kind: Kind) -> u64 {
        let used = match kind {
            Kind::Blocks => &self.bytes,
            Kind::Inodes => &self.inodes,
        };
        match self.ceiling(kind) {
            None => u64::MAX,
            Some(c) => (c.min(i64::MAX as u64) as i64)
                .saturating_sub(used.load(Ordering::Acquire))
                .max(0) as u64,
        }
    }

    /// Adjust usage by what really happened (no check: reconciliation and releases).
    pub fn adjust_bytes(&self, delta: i64) {
        if delta != 0 {
            self.bytes.fetch_add(delta, Ordering::AcqRel);
            self.update_timers();
        }
    }

    /// Adjust the inode count (no check).
    pub fn adjust_inodes(&self, delta: i64) {
        if delta != 0 {
            self.inodes.fetch_add(delta, Ordering::AcqRel);
            self.update_timers();
        }
    }

    /// Start or clear grace timers as usage crosses soft limits.
    fn update_timers(&self) {
        let l = self.limits();
        if l.bsoft == 0 && l.isoft == 0 {
            let t = self.timers.lock();
            if t.0.is_none() && t.1.is_none() {
                return;
            }
        }
        let (b, i) = self.usage();
        let t_now = self.now();
        let mut guard = self.timers.lock();
        let t = &mut *guard;
        let mut changed = false;
        for (timer, used, soft, grace) in [
            (&mut t.0, b, l.bsoft, l.bgrace),
            (&mut t.1, i, l.isoft, l.igrace),
        ] {
            if soft != 0 && used > soft {
                if timer.is_none() {
                    *timer = Some(t_now + grace);
                    changed = true;
                }
            } else if timer.is_some() {
                *timer = None;
                changed = true;
            }
        }
        drop(guard);
        if changed {
            self.persist(false);
        }
    }

    /// Write the state file; `clean` marks the usage as exact (a clean unmount).
    pub fn persist(&self, clean: bool) {
        let r = self.report();
        let st = store::State {
            limits: r.limits,
            used_bytes: r.used_bytes,
            used_inodes: r.used_inodes,
            timers: (r.btimer, r.itimer),
            clean,
            errno: self.errno,
        };
        if let Some(p) = &self.store
            && let Err(e) = store::save_state(p, &st, Some(self.errno))
        {
            log::warn!("quota state {}: {e}", p.shown().display());
        }
    }

    /// Statfs numbers as XFS reports them inside a project directory: the soft limit (else
    /// the hard one) as the size, clamped to the real filesystem. Returns
    /// (blocks, bfree, bavail, files, ffree) in units of `frsize`.
    pub fn statfs(&self, real: &libc::statfs) -> (u64, u64, u64, u64, u64) {
        let l = self.limits();
        let (b, i) = self.usage();
        let frsize = if real.f_frsize > 0 {
            real.f_frsize as u64
        } else {
            real.f_bsize as u64
        };
        let (mut blocks, mut bfree, mut bavail) = (real.f_blocks, real.f_bfree, real.f_bavail);
        let blim = if l.bsoft != 0 { l.bsoft } else { l.bhard };
        if blim != 0 {
            let lim_blocks = blim / frsize;
            let free = lim_blocks.saturating_sub(b.div_ceil(frsize));
            blocks = lim_blocks.min(real.f_blocks);
            bfree = free.min(real.f_bfree);
            bavail = free.min(real.f_bavail);
        }
        let (mut files, mut ffree) = (real.f_files, real.f_ffree);
        let ilim = if l.isoft != 0 { l.isoft } else { l.ihard };
        if ilim != 0 {
            files = ilim.min(real.f_files.max(ilim));
            ffree = ilim.saturating_sub(i).min(real.f_ffree);
        }
        (blocks, bfree, bavail, files, ffree)
    }
}

/// Parse a size: bytes, or a number with a binary k/m/g/t/p/e suffix (as xfs_quota), e.g.
/// `10G`, `512m`, `1.5g`, `4096`.
pub fn parse_size(s: &str) -> Result<u64, String> {
    let t = s.trim();
    let bad = || format!("invalid size '{s}' (use bytes or a number with k/m/g/t suffix)");
    if t.is_empty() || t.starts_with('-') {
        return Err(bad());
    }
    let lower = t.to_ascii_lowercase();
    let lower = lower
        .strip_suffix("ib")
        .or_else(|| {
            lower
                .strip_suffix('b')
                .filter(|x| x.ends_with(|c: char| c.is_ascii_alphabetic()))
        })
        .unwrap_or(&lower)
        .to_string();
    let (num, mult): (&str, u64) = match lower.chars().last() {
        Some('k') => (&lower[..lower.len() - 1], 1 << 10),
        Some('m') => (&lower[..lower.len() - 1], 1 << 20),
        Some('g') => (&lower[..lower.len() - 1], 1 << 30),
        Some('t') => (&lower[..lower.len() - 1], 1 << 40),
        Some('p') => (&lower[..lower.len() - 1], 1 << 50),
        Some('e') => (&lower[..lower.len() - 1], 1 << 60),
        Some(c) if c.is_ascii_digit() => (&lower[..], 1),
        _ => return Err(bad()),
    };
    if num.is_empty() {
        return Err(bad());
    }
    if let Ok(n) = num.parse::<u64>() {
        return n.checked_mul(mult).ok_or_else(bad);
    }
    let f: f64 = num.parse().map_err(|_| bad())?;
    if !f.is_finite() || f < 0.0 {
        return Err(bad());
    }
    let v = f * mult as f64;
    if v >= u64::MAX as f64 {
        return Err(bad());
    }
    Ok(v as u64)
}

/// Parse an inode count (plain number, k/m/g decimal-free binary suffixes accepted).
pub fn parse_count(s: &str) -> Result<u64, String> {
    parse_size(s).map_err(|_| format!("invalid inode count '{s}'"))
}

/// Parse a duration: seconds, or a number with s/m/h/d/w suffix (`7d`, `12h`, `90`).
pub fn parse_duration(s: &str) -> Result<u64, String> {
    let t = s.trim().to_ascii_lowercase();
    let bad = || format!("invalid duration '{s}' (use seconds or a number with s/m/h/d/w)");
    let (num, mult) = match t.chars().last() {
        Some('s') => (&t[..t.len() - 1], 1),
        Some('m') => (&t[..t.len() - 1], 60),
        Some('h') => (&t[..t.len() - 1], 3600),
        Some('d') => (&t[..t.len() - 1], 86400),
        Some('w') => (&t[..t.len() - 1], 7 * 86400),
        Some(c) if c.is_ascii_digit() => (&t[..], 1),
        _ => return Err(bad()),
    };
    num.parse::<u64>()
        .map_err(|_| bad())?
        .checked_mul(mult)
        .ok_or_else(bad)
}

/// Human-readable bytes, as `xfs_quota -h` prints them (binary units).
pub fn human(n: u64) -> String {
    const U: [&str; 6] = ["", "K", "M", "G", "T", "P"];
    let mut v = n as f64;
    let mut i = 0;
    while v >= 1024.0 && i < U.len() - 1 {
        v /= 1024.0;
        i += 1;
    }
    if i == 0 {
        format!("{n}")
    } else if v >= 100.0 || (v - v.round()).abs() < 0.05 {
        format!("{:.0}{}", v, U[i])
    } else {
        format!("{:.1}{}", v, U[i])
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes() {
        assert_eq!(parse_size("4096").unwrap(), 4096);
        assert_eq!(parse_size("10G").unwrap(), 10 << 30);
        assert_eq!(parse_size("10g").unwrap(), 10 << 30);
        assert_eq!(parse_size("512k").unwrap(), 512 << 10);
        assert_eq!(parse_size("1.5m").unwrap(), 3 << 19);
        assert_eq!(parse_size("2GiB").unwrap(), 2 << 30);
        for bad in ["", "-1", "x", "10q", "g", "1e400"] {
            assert!(parse_size(bad).is_err(), "{bad}");
        }
        assert_eq!(parse_duration("7d").unwrap(), 7 * 86400);
        assert_eq!(parse_duration("90").unwrap(), 90);
        assert!(parse_duration("soon").is_err());
    }

    fn q(l: Limits) -> Quota {
        Quota::new(l, 0, 0, (None, None), Errno::ENOSPC, None)
    }

    #[test]
    fn hard_limit_refuses_exactly_past_it() {
        let quota = q(Limits {
            bhard: 10_000,
            ..Limits::default()
        });
        quota.reserve_bytes(6000).unwrap();
        quota.reserve_bytes(4000).unwrap();
        assert_eq!(quota.reserve_bytes(1), Err(Errno::ENOSPC));
        quota.adjust_bytes(-4000);
        assert_eq!(quota.available_bytes(), 4000);
    }

    /// Requests of 2^63 bytes or more, or that would carry usage past i64::MAX, are refused
    /// (they once wrapped the counter negative and passed); a limit past i64::MAX holds.
    #[test]
    fn huge_requests_do_not_wrap() {
        let quota = q(Limits {
            bhard: 1 << 30,
            ..Limits::default()
        });
        quota.reserve_bytes(4096).unwrap();
        assert_eq!(quota.reserve_bytes(1 << 63), Err(Errno::ENOSPC));
        assert_eq!(quota.reserve_bytes(u64::MAX), Err(Errno::ENOSPC));
        assert_eq!(quota.reserve_bytes(i64::MAX as u64), Err(Errno::ENOSPC));
        assert_eq!(quota.usage().0, 4096);
        let unlimited = q(Limits {
            bhard: u64::MAX,
            ..Limits::default()
        });
        unlimited.reserve_bytes(1 << 40).unwrap();
        assert_eq!(unlimited.reserve_bytes(i64::MAX as u64), Err(Errno::ENOSPC));
        assert_eq!(unlimited.usage().0, 1 << 40);
        assert!(unlimited.available_bytes() > 1 << 62);
    }

    #[test]
    fn soft_limit_after_grace() {
        let dir = tempfile::tempdir().unwrap();
        let clock = dir.path().join("clock");
        std::fs::write(&clock, "1000").unwrap();
        let quota = q(Limits {
            bsoft: 100,
            bhard: 1000,
            bgrace: 60,
            ..Limits::default()
        })
        .with_clock_file(clock.clone());
        quota.reserve_bytes(150).unwrap(); // over soft: timer starts at 1000 + 60
        assert_eq!(quota.report().btimer, Some(1060));
        quota.reserve_bytes(10).unwrap(); // still in grace
        std::fs::write(&clock, "1061").unwrap();
        assert_eq!(quota.reserve_bytes(1), Err(Errno::ENOSPC)); // soft is now hard
        quota.adjust_bytes(-100); // back under soft: timer cleared
        assert_eq!(quota.report().btimer, None);
        quota.reserve_bytes(10).unwrap();
    }

    #[test]
    fn statfs_shows_limit() {
        let quota = q(Limits {
            bhard: 1 << 20,
            ihard: 100,
            ..Limits::default()
        });
        quota.reserve_bytes(4096).unwrap();
        quota.reserve_inodes(10).unwrap();
        // SAFETY: statfs is plain old data; zeroed is a valid value.
        let mut real: libc::statfs = unsafe { std::mem::zeroed() };
        real.f_bsize = 4096;
        real.f_frsize = 4096;
        real.f_blocks = 1 << 30;
        real.f_bfree = 1 << 29;
        real.f_bavail = 1 << 29;
        real.f_files = 1 << 20;
        real.f_ffree = 1 << 19;
        let (b, bf, ba, f, ff) = quota.statfs(&real);
        assert_eq!((b, bf, ba), (256, 255, 255));
        assert_eq!((f, ff), (100, 90));
    }
}
