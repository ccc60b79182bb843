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
        if self.enabled(r.metadata()) {
            eprintln!(
                "unionfs-rs[{}] {}: {}",
                std::process::id(),
                r.level(),
                r.args()
            );
        }
    }

    fn flush(&self) {}
}

/// Install the logger: debug with `debug`, info in the foreground, warnings otherwise.
/// `UNIONFS_LOG=debug|info|warn|error` overrides.
pub fn init(debug: bool, foreground: bool) {
    let mut level = if debug {
        Level::Debug
    } else if foreground {
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
