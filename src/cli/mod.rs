//! Command line: `mount`, `umount`, and the fuse-overlayfs / mount(8) helper form
//! `unionfs-rs [SOURCE] MERGED -o lowerdir=…,upperdir=…,workdir=…`.

pub mod config;
pub mod daemon;
pub mod options;
pub mod quota;
pub mod validate;

use std::ffi::OsString;
use std::path::PathBuf;

use clap::{Parser, Subcommand};

use options::MountSpec;

/// Exit code for bad input and refused mounts.
pub const EXIT_USAGE: i32 = 2;

#[derive(Debug, Parser)]
#[command(
    name = "unionfs-rs",
    version,
    about = "OverlayFS-compatible union filesystem in userspace (FUSE)",
    after_help = "Also usable as `unionfs-rs [SOURCE] MERGED -o lowerdir=L1:L2,upperdir=U,workdir=W` \
                  (fuse-overlayfs and mount.fuse3 form)."
)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Debug, Subcommand)]
enum Cmd {
    /// Mount LOWER1[:LOWER2…] [UPPER] MERGED (no UPPER: a read-only union).
    Mount(Box<MountArgs>),
    /// Unmount a union mounted at MERGED (refused while cached writes cannot be stored).
    Umount {
        /// Unmount even if cached writes cannot be stored (a full upper, the quota): they are
        /// lost.
        #[arg(long)]
        force: bool,
        /// The merged directory.
        merged: PathBuf,
    },
    /// Live statistics of a mount (from its control socket).
    Stats {
        /// Print the daemon's JSON object as is.
        #[arg(long)]
        json: bool,
        /// The merged directory.
        merged: PathBuf,
    },
    /// Project quota of live mounts (xfs_quota's report and limit).
    Quota {
        #[command(subcommand)]
        cmd: QuotaCmd,
    },
    /// Page cache settings of a live mount.
    Cache {
        #[command(subcommand)]
        cmd: CacheCmd,
    },
    /// Write all cached data of a mount to its upper layer and sync it (what `sync` does for
    /// a disk filesystem; FUSE's syncfs does not reach the daemon).
    Sync {
        /// The merged directory.
        merged: PathBuf,
    },
}

#[derive(Debug, Subcommand)]
enum CacheCmd {
    /// Print the settings (key=value lines).
    Show {
        /// The merged directory.
        merged: PathBuf,
    },
    /// Change settings: KEY=VALUE… (cache_size, readahead_kb, kernel_readahead_kb,
    /// dirty_background_ratio,
    /// dirty_ratio, dirty_background_bytes, dirty_bytes, dirty_expire_centisecs,
    /// dirty_writeback_centisecs, writeback_on_close).
    Set {
        /// The merged directory.
        merged: PathBuf,
        /// KEY=VALUE settings.
        #[arg(required = true)]
        settings: Vec<String>,
    },
}

#[derive(Debug, Subcommand)]
enum QuotaCmd {
    /// Usage, limits and grace of mounts (all unionfs-rs mounts if none is named).
    #[command(disable_help_flag = true)]
    Report {
        /// Print help.
        #[arg(long, action = clap::ArgAction::Help)]
        help: Option<bool>,
        /// Human-readable sizes.
        #[arg(short = 'h', long = "human-readable")]
        human: bool,
        /// JSON output.
        #[arg(long)]
        json: bool,
        /// Mount points.
        merged: Vec<PathBuf>,
    },
    /// Change limits on a live mount (lowering below usage is allowed; growth is refused).
    Limit {
        #[command(flatten)]
        limits: LimitFlags,
        /// Mount point.
        merged: PathBuf,
    },
}

#[derive(Debug, clap::Args)]
struct MountArgs {
    /// Lower directories separated by ':', leftmost on top.
    lowers: String,
    /// [UPPER] MERGED
    #[arg(num_args = 1..=2, required = true)]
    dirs: Vec<PathBuf>,
    /// Work directory on the same filesystem as UPPER (default: UPPER's sibling `<upper>.work`).
    #[arg(long)]
    workdir: Option<PathBuf>,
    /// Stay in the foreground, logging to stderr.
    #[arg(short, long)]
    foreground: bool,
    /// Use user.overlay.* xattrs (kernel overlayfs `userxattr`), for rootless use.
    #[arg(long)]
    userxattr: bool,
    /// Honour AUFS-style `.wh.NAME` whiteouts in lower layers.
    #[arg(long)]
    aufs_whiteouts: bool,
    /// FUSE worker threads.
    #[arg(long)]
    threads: Option<usize>,
    /// Debug logging.
    #[arg(short, long)]
    debug: bool,
    /// Append the daemon's log (warnings, write-back errors, stop progress) to this file.
    #[arg(long, value_name = "PATH")]
    log_file: Option<PathBuf>,
    /// FUSE passthrough where it is safe: auto (default; used as root), lower (auto, and
    /// read-only opens of lower files too: meanwhile an open for writing fails with ETXTBSY)
    /// or off.
    #[arg(long, value_name = "auto|lower|off")]
    passthrough: Option<String>,
    /// The kernel's FUSE write-back cache: auto (default; on when passthrough cannot be used,
    /// i.e. rootless), on or off. Never with a quota.
    #[arg(long, value_name = "auto|on|off")]
    writeback_cache: Option<String>,
    /// Directory listings with attributes (FUSE readdirplus): auto (default: the first batch of
    /// each listing, and later ones after lookups in the directory), on (every batch) or off
    /// (names only: faster `find`, slower `ls -l`).
    #[arg(long, value_name = "auto|on|off")]
    readdirplus: Option<String>,
    /// Directory read-ahead for tree walks (find, ls -R, du, tar): on (default) or off.
    #[arg(long, value_name = "on|off")]
    prefetch: Option<String>,
    /// FUSE requests through io_uring, served on the caller's CPU: auto (default: where the
    /// kernel offers it, i.e. after `echo Y > /sys/module/fuse/parameters/enable_uring`, and
    /// the daemon runs as root), on (wherever offered) or off.
    #[arg(long, value_name = "auto|on|off")]
    uring: Option<String>,
    /// Mount options, comma separated (same as the -o form).
    #[arg(short = 'o', value_name = "OPTS")]
    opts: Vec<String>,
    /// Project quota: block hard limit (like `--storage-opt size=`), e.g. 10G.
    #[arg(long, value_name = "SIZE", allow_hyphen_values = true)]
    size: Option<String>,
    #[command(flatten)]
    limits: LimitFlags,
    /// Project id to record and report.
    #[arg(long, value_name = "ID")]
    project_id: Option<String>,
    /// errno for refusals: enospc (XFS project quota, default) or edquot (ext4's convention).
    #[arg(long, value_name = "ERRNO")]
    quota_errno: Option<String>,
    #[command(flatten)]
    cache: CacheFlags,
}

/// Page cache and write-back settings (the vm.* sysctls of the same names, over the cache
/// budget instead of memory).
#[derive(Debug, clap::Args)]
struct CacheFlags {
    /// Page cache budget (default 256M; 0 turns the cache off).
    #[arg(long, value_name = "SIZE", allow_hyphen_values = true)]
    cache_size: Option<String>,
    /// Largest readahead window in KiB (default 128; 0: no readahead).
    #[arg(long, value_name = "KB", allow_negative_numbers = true)]
    readahead_kb: Option<String>,
    /// The kernel's readahead on this mount in KiB (as root; default 0: as the layers' disks).
    #[arg(long, value_name = "KB", allow_negative_numbers = true)]
    kernel_readahead_kb: Option<String>,
    /// Background write-back starts above this % of the budget (default 10).
    #[arg(long, value_name = "PCT", allow_negative_numbers = true)]
    dirty_background_ratio: Option<String>,
    /// Writers are paced above the midpoint and block at this % of the budget (default 20).
    #[arg(long, value_name = "PCT", allow_negative_numbers = true)]
    dirty_ratio: Option<String>,
    /// Background threshold in bytes (overrides the ratio).
    #[arg(long, value_name = "SIZE", allow_hyphen_values = true)]
    dirty_background_bytes: Option<String>,
    /// Dirty limit in bytes (overrides the ratio).
    #[arg(long, value_name = "SIZE", allow_hyphen_values = true)]
    dirty_bytes: Option<String>,
    /// Dirty data older than this is written out (default 3000 = 30 s).
    #[arg(long, value_name = "CS", allow_negative_numbers = true)]
    dirty_expire_centisecs: Option<String>,
    /// The flusher wakes this often (default 500 = 5 s; 0: only when needed).
    #[arg(long, value_name = "CS", allow_negative_numbers = true)]
    dirty_writeback_centisecs: Option<String>,
    /// Write a file's cached data to upper when it is closed and before a rename replaces a
    /// file with it (default 1; 0: wait for the flusher, fsync or sync).
    #[arg(long, value_name = "1|0", allow_negative_numbers = true)]
    writeback_on_close: Option<String>,
}

impl CacheFlags {
    fn given(self) -> Vec<(&'static str, String)> {
        given([
            ("cache_size", self.cache_size),
            ("readahead_kb", self.readahead_kb),
            ("kernel_readahead_kb", self.kernel_readahead_kb),
            ("dirty_background_ratio", self.dirty_background_ratio),
            ("dirty_ratio", self.dirty_ratio),
            ("dirty_background_bytes", self.dirty_background_bytes),
            ("dirty_bytes", self.dirty_bytes),
            ("dirty_expire_centisecs", self.dirty_expire_centisecs),
            ("dirty_writeback_centisecs", self.dirty_writeback_centisecs),
            ("writeback_on_close", self.writeback_on_close),
        ])
    }
}

/// The limit flags shared by `mount` and `quota limit`.
#[derive(Debug, clap::Args)]
struct LimitFlags {
    /// Block hard limit (same as --size on mount).
    #[arg(long, value_name = "SIZE", allow_hyphen_values = true)]
    bhard: Option<String>,
    /// Block soft limit (enforced after the grace period).
    #[arg(long, value_name = "SIZE", allow_hyphen_values = true)]
    bsoft: Option<String>,
    /// Inode hard limit.
    #[arg(long, value_name = "N", allow_negative_numbers = true)]
    ihard: Option<String>,
    /// Inode soft limit.
    #[arg(long, value_name = "N", allow_negative_numbers = true)]
    isoft: Option<String>,
    /// Block grace period (default 7d).
    #[arg(long, value_name = "DURATION", allow_negative_numbers = true)]
    bgrace: Option<String>,
    /// Inode grace period (default 7d).
    #[arg(long, value_name = "DURATION", allow_negative_numbers = true)]
    igrace: Option<String>,
}

impl LimitFlags {
    /// The flags given, as (option name, value).
    fn given(self) -> Vec<(&'static str, String)> {
        given([
            ("bhard", self.bhard),
            ("bsoft", self.bsoft),
            ("ihard", self.ihard),
            ("isoft", self.isoft),
            ("bgrace", self.bgrace),
            ("igrace", self.igrace),
        ])
    }
}

/// The flags given among `flags`, as (option name, value).
fn given<const N: usize>(
    flags: [(&'static str, Option<String>); N],
) -> Vec<(&'static str, String)> {
    flags
        .into_iter()
        .filter_map(|(k, v)| v.map(|v| (k, v)))
        .collect()
}

/// What a command-line flag or argument does to a mount's spec.
type Setter = Box<dyn Fn(&mut MountSpec) -> Result<(), String>>;

/// The `mount` form's spec: the config file's default options, then the command line's
/// arguments and flags, then its `-o` options. A setting given both as a flag (or argument)
/// and in `-o` with different effects is refused, whichever order they came in: neither
/// silently wins (a QA run's `--cache-size 64M -o cache_size=1G` got 1G without a word).
fn mount_spec(m: MountArgs) -> Result<MountSpec, String> {
    let (lowers, data_lowers) = options::split_lowers(&m.lowers)?;
    let mut base = MountSpec {
        merged: m.dirs.last().cloned(),
        ..MountSpec::default()
    };
    let cfg = config::load().map_err(|e| format!("config: {e}"))?;
    if let Some(d) = &cfg.default_options {
        options::apply_opts(&mut base, d).map_err(|e| {
            let at = cfg
                .path
                .as_deref()
                .unwrap_or(std::path::Path::new("config"));
            format!("{}: default_options: {e}", at.display())
        })?;
    }
    let mut flags: Vec<(String, Setter)> = Vec::new();
    // (`mount "" MERGED -o lowerdir=…` gives the layers in -o only.)
    if !lowers.is_empty() {
        flags.push((
            format!("LOWERS {}", m.lowers),
            Box::new(move |s| {
                s.lowers = lowers.clone();
                s.data_lowers = data_lowers.clone();
                Ok(())
            }),
        ));
    }
    let paths = [
        ("UPPER", (m.dirs.len() == 2).then(|| m.dirs[0].clone())),
        ("--workdir", m.workdir),
        ("--log-file", m.log_file),
    ];
    for (name, path) in paths {
        let Some(path) = path else { continue };
        flags.push((
            format!("{name} {}", path.display()),
            Box::new(move |s| {
                let p = Some(path.clone());
                match name {
                    "UPPER" => s.upper = p,
                    "--workdir" => s.workdir = p,
                    _ => s.log_file = p,
                }
                Ok(())
            }),
        ));
    }
    if m.foreground {
        flags.push((
            "--foreground".into(),
            Box::new(|s| {
                s.foreground = true;
                Ok(())
            }),
        ));
    }
    // The rest are options of the -o form under their flag's name: the switches as bare
    // options, the others always as `key=value` (an empty value is refused as in -o).
    for (on, k) in [
        (m.userxattr, "userxattr"),
        (m.aufs_whiteouts, "aufs_whiteouts"),
        (m.debug, "debug"),
    ] {
        if on {
            let shown = format!("--{}", k.replace('_', "-"));
            flags.push((shown, Box::new(move |s| options::apply_opt(s, k))));
        }
    }
    let mut kv = given([
        ("threads", m.threads.map(|t| t.to_string())),
        ("size", m.size),
        ("project_id", m.project_id),
        ("quota_errno", m.quota_errno),
        ("passthrough", m.passthrough),
        ("writeback_cache", m.writeback_cache),
        ("readdirplus", m.readdirplus),
        ("prefetch", m.prefetch),
        ("uring", m.uring),
    ]);
    kv.extend(m.limits.given());
    kv.extend(m.cache.given());
    for (k, v) in kv {
        let shown = format!("--{} {v:?}", k.replace('_', "-"));
        let opt = format!("{k}={v}");
        flags.push((shown, Box::new(move |s| options::apply_opt(s, &opt))));
    }
    let opts: Vec<String> = m
        .opts
        .iter()
        .flat_map(|o| options::split_opts(o))
        .filter(|o| !o.trim().is_empty())
        .collect();
    // A flag conflicts with -o when the two orders give different mounts: -o as a whole
    // (within it the last occurrence wins), so `--threads 2 -o threads=3,threads=2` is fine.
    let all_opts = |s: &mut MountSpec| opts.iter().try_for_each(|o| options::apply_opt(s, o));
    let differ = |set: &Setter, opt: &dyn Fn(&mut MountSpec) -> Result<(), String>| {
        let (mut a, mut b) = (base.clone(), base.clone());
        let flag_first = set(&mut a).and_then(|()| opt(&mut a));
        let opt_first = opt(&mut b).and_then(|()| set(&mut b));
        // (A value that is refused either way is reported below, when it is applied.)
        flag_first.is_ok() && opt_first.is_ok() && a != b
    };
    for (shown, set) in &flags {
        if differ(set, &all_opts) {
            // Name the last -o element that disagrees alone (there is one unless only a
            // combination of elements does).
            let culprit = opts
                .iter()
                .rev()
                .find(|o| differ(set, &|s: &mut MountSpec| options::apply_opt(s, o)))
                .map_or_else(|| opts.join(","), |o| o.trim().to_string());
            return Err(format!(
                "{shown} and -o {culprit} conflict: give only one of them"
            ));
        }
    }
    let mut spec = base;
    for (_, set) in &flags {
        set(&mut spec)?;
    }
    for o in &opts {
        options::apply_opt(&mut spec, o)?;
    }
    Ok(spec)
}

/// Print one clear line and return the usage exit code.
pub fn fail(msg: impl std::fmt::Display) -> i32 {
    eprintln!("unionfs-rs: {msg}");
    EXIT_USAGE
}

/// Entry point; returns the process exit code.
pub fn main_with(args: Vec<OsString>) -> i32 {
    let first = args.get(1).and_then(|a| a.to_str()).unwrap_or("");
    let is_cli = matches!(
        first,
        "mount"
            | "umount"
            | "quota"
            | "stats"
            | "cache"
            | "sync"
            | "help"
            | "--help"
            | "-h"
            | "--version"
            | "-V"
            | ""
    );
    if !is_cli {
        // Config defaults first, then the caller's options (which win).
        let cfg = match config::load() {
            Ok(c) => c,
            Err(e) => return fail(format!("config: {e}")),
        };
        let mut pre: Vec<OsString> = Vec::new();
        for (key, o) in [
            ("default_options", &cfg.default_options),
            ("mount_program_options", &cfg.mount_program_options),
        ] {
            let Some(o) = o else { continue };
            // Checked alone first, so that a bad value names the file it came from.
            let mut probe = options::MountSpec::default();
            if let Err(e) = options::apply_opts(&mut probe, o) {
                let at = cfg
                    .path
                    .as_deref()
                    .unwrap_or(std::path::Path::new("config"));
                return fail(format!("{}: {key}: {e}", at.display()));
            }
            pre.push("-o".into());
            pre.push(o.into());
        }
        pre.extend(args[1..].iter().cloned());
        return match options::parse_legacy(&pre) {
            Ok(spec) => run_mount(spec),
            Err(e) => fail(e),
        };
    }
    if args.len() <= 1 {
        return fail(
            "missing command: mount, umount, stats, quota, cache or sync (see unionfs-rs --help)",
        );
    }
    if matches!(
        first,
        "stats" | "quota" | "cache" | "help" | "--help" | "-h"
    ) {
        // Commands that print: a reader that goes away (`| head`) ends them quietly, as it
        // does coreutils, instead of a panic on EPIPE. (Not for mount: the daemon keeps
        // ignoring SIGPIPE.)
        // SAFETY: signal(2) with the default action, before any thread exists.
        unsafe {
            libc::signal(libc::SIGPIPE, libc::SIG_DFL);
        }
    }
    let cli = match Cli::try_parse_from(&args) {
        Ok(c) => c,
        Err(e) if !e.use_stderr() => {
            // --help / --version
            let _ = e.print();
            return 0;
        }
        Err(e) => {
            // One clear line instead of clap's multi-line usage block.
            let text = e.to_string();
            let mut lines = text.lines();
            let first = lines.next().unwrap_or("invalid arguments");
            let mut msg = first.strip_prefix("error: ").unwrap_or(first).to_string();
            if msg.ends_with(':') {
                // "required arguments were not provided:" lists them on the next lines.
                let more: Vec<&str> = lines
                    .take_while(|l| !l.trim().is_empty())
                    .map(str::trim)
                    .collect();
                msg = format!("{msg} {}", more.join(" "));
            }
            return fail(format!("{msg} (see unionfs-rs --help)"));
        }
    };
    match cli.cmd {
        Cmd::Mount(m) => match mount_spec(*m) {
            Ok(spec) => run_mount(spec),
            Err(e) => fail(e),
        },
        Cmd::Umount { force, merged } => match daemon::umount(&merged, force) {
            Ok(()) => 0,
            Err(e) => fail(e),
        },
        Cmd::Stats { json, merged } => {
            let m = match merged.canonicalize() {
                Ok(m) => m,
                Err(e) => return fail(format!("{}: {e}", merged.display())),
            };
            match crate::control::request(&m, "stats") {
                Ok(r) if r.starts_with("{\"error\"") => fail(r),
                Ok(r) if json => {
                    println!("{r}");
                    0
                }
                Ok(r) => {
                    // key: value lines from the flat JSON object.
                    for kv in r.trim_matches(|c| c == '{' || c == '}').split(',') {
                        if let Some((k, v)) = kv.split_once(':') {
                            println!("{}: {}", k.trim_matches('"'), v.trim_matches('"'));
                        }
                    }
                    0
                }
                Err(e) => fail(e),
            }
        }
        Cmd::Cache { cmd } => {
            let (merged, line) = match cmd {
                CacheCmd::Show { merged } => (merged, "cache-show".to_string()),
                CacheCmd::Set { merged, settings } => {
                    if let Some(bad) = settings.iter().find(|s| !s.contains('=')) {
                        return fail(format!("cache set: expected KEY=VALUE, got {bad:?}"));
                    }
                    (merged, format!("cache-set {}", settings.join(" ")))
                }
            };
            control_call(&merged, &line)
        }
        Cmd::Sync { merged } => {
            // First what the kernel holds (its write-back cache when on, pages written through
            // mappings): syncfs writes it to the daemon, which then stores everything it
            // caches. A syncfs error is a write-back failure the kernel also reports to the
            // writer (fsync, msync, close), possibly from before this command: say so, and
            // still store the rest.
            match std::fs::File::open(&merged) {
                Ok(f) => {
                    if let Err(e) = nix::unistd::syncfs(&f) {
                        eprintln!(
                            "unionfs-rs: warning: syncfs {}: {e} (a write-back of the kernel's pages failed, now or earlier; its writer is told too)",
                            merged.display()
                        );
                    }
                }
                Err(e) => return fail(format!("{}: {e}", merged.display())),
            }
            control_call(&merged, "sync")
        }
        Cmd::Quota { cmd } => {
            let r = match cmd {
                QuotaCmd::Report {
                    human,
                    json,
                    merged,
                    ..
                } => quota::report(&merged, human, json),
                QuotaCmd::Limit { limits, merged } => {
                    let args: Vec<String> = limits
                        .given()
                        .into_iter()
                        .map(|(k, v)| format!("{k}={v}"))
                        .collect();
                    quota::limit(&merged, &args)
                }
            };
            match r {
                Ok(out) => {
                    print!("{out}");
                    0
                }
                Err(e) => fail(e),
            }
        }
    }
}

/// Send a control command and print its key=value reply (errors to stderr, exit 1).
fn control_call(merged: &std::path::Path, line: &str) -> i32 {
    let m = match merged.canonicalize() {
        Ok(m) => m,
        Err(e) => return fail(format!("{}: {e}", merged.display())),
    };
    match crate::control::request(&m, line) {
        Ok(r) if r.starts_with("{\"error\"") => fail(
            r.trim_start_matches("{\"error\":\"")
                .trim_end_matches("\"}")
                .replace("\\\"", "\"")
                .replace("\\\\", "\\"),
        ),
        Ok(r) => {
            for line in r.lines() {
                match line.strip_prefix("warning: ") {
                    Some(w) => eprintln!("unionfs-rs: warning: {w}"),
                    None => println!("{line}"),
                }
            }
            0
        }
        Err(e) => fail(e),
    }
}

fn run_mount(spec: MountSpec) -> i32 {
    let checked = match validate::validate(spec) {
        Ok(c) => c,
        Err(e) => return fail(e),
    };
    daemon::start(checked)
}
