//! A minimal stderr logger for the `log` facade (the daemon's stderr is /dev/null unless it
//! runs in the foreground).

use log::{Level, LevelFilter, Log, Metadata, Record};

struct Stderr {
    level: Level,
}

impl Log for Stderr {
    fn enabled(&self, m: &Metadata<'_>) -> bool {
        m.level() <= self.level
    }

    fn log(&self, r: &Record<'_>) {
        if !self.enabled(r.metadata()) {
            return;
        }
        let mut level = r.level();
        if level == Level::Error && r.target().starts_with("fuser") {
            // A reply the kernel no longer waits for (ENOENT): the request was interrupted or
            // aborted meanwhile. With io_uring every INTERRUPT is of this kind: it comes
            // through /dev/fuse, whose queue never held the ring's request, so fuser's answer
            // to it fails so. Harmless: debug, not error.
            if reply_not_awaited(&r.args().to_string()) {
                if self.level < Level::Debug {
                    return;
                }
                level = Level::Debug;
            }
        }
        eprintln!(
            "{} unionfs-rs[{}] {}: {}",
            utc_now(),
            std::process::id(),
            level,
            r.args()
        );
    }

    fn flush(&self) {}
}

/// fuser's log line for a reply the kernel refused with ENOENT (no such request waiting).
fn reply_not_awaited(text: &str) -> bool {
    let enoent = std::io::Error::from_raw_os_error(libc::ENOENT).to_string();
    text.starts_with("Failed to send FUSE reply") && text.ends_with(&enoent)
}

/// `YYYY-MM-DDTHH:MM:SSZ` for now (civil-from-days, proleptic Gregorian).
fn utc_now() -> String {
    let secs = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0);
    let (days, rem) = (secs.div_euclid(86_400), secs.rem_euclid(86_400));
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!(
        "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}Z",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60
    )
}

/// Install the logger: debug with `debug`, info in the foreground or into a log file,
/// warnings otherwise. `UNIONFS_LOG=debug|info|warn|error` overrides.
pub fn init(debug: bool, verbose: bool) {
    let mut level = if debug {
        Level::Debug
    } else if verbose {
        Level::Info
    } else {
        Level::Warn
    };
    if let Ok(v) = std::env::var("UNIONFS_LOG") {
        level = match v.as_str() {
            "trace" => Level::Trace,
            "debug" => Level::Debug,
            "info" => Level::Info,
            "error" => Level::Error,
            _ => Level::Warn,
        };
    }
    let max = level.to_level_filter();
    if log::set_boxed_logger(Box::new(Stderr { level })).is_ok() {
        log::set_max_level(max);
    } else {
        log::set_max_level(LevelFilter::Warn);
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn utc_now_is_a_plausible_timestamp() {
        let t = super::utc_now();
        assert_eq!(t.len(), 20, "{t}");
        assert!(
            t.starts_with("20") && t.ends_with('Z') && &t[10..11] == "T",
            "{t}"
        );
    }

    use super::reply_not_awaited;

    #[test]
    fn only_enoent_reply_failures_are_demoted() {
        // The text fuser logs: "Failed to send FUSE reply: {io::Error}".
        let e = |n| std::io::Error::from_raw_os_error(n);
        assert!(reply_not_awaited(&format!(
            "Failed to send FUSE reply: {}",
            e(libc::ENOENT)
        )));
        assert!(!reply_not_awaited(&format!(
            "Failed to send FUSE reply: {}",
            e(libc::EINVAL)
        )));
        assert!(!reply_not_awaited(&format!(
            "something else: {}",
            e(libc::ENOENT)
        )));
    }
}
