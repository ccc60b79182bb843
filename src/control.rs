//! The control channel of a live mount: a Unix socket per mount point that `unionfs-rs quota`
//! (and scripts) talk to.
//!
//! Where: `/run/unionfs-rs/<fnv64 of the canonical mount point>.sock` for root, else
//! `$XDG_RUNTIME_DIR/unionfs-rs/…` (or `/tmp/unionfs-rs-<uid outside the user namespace>/…`). Protocol: the client sends one
//! line (`quota-report`, `quota-limit key=value …`, `stats`) and reads the reply until EOF. Replies
//! are one JSON object; errors are `{"error": "…"}`. Commands that change something are accepted
//! only from root or the daemon's own user (checked with SO_PEERCRED).

use std::io::{BufRead, BufReader, Write};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use crate::quota::{Limits, Quota, Report};
use crate::union::Union;

/// The socket path for a (canonical) mount point.
pub fn socket_path(merged: &Path) -> PathBuf {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in merged.as_os_str().as_bytes() {
        h ^= *b as u64;
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    runtime_dir().join(format!("{h:016x}.sock"))
}

fn runtime_dir() -> PathBuf {
    if nix::unistd::geteuid().is_root() && initial_userns() {
        return PathBuf::from("/run/unionfs-rs");
    }
    match std::env::var_os("XDG_RUNTIME_DIR") {
        Some(d) if !d.is_empty() => PathBuf::from(d).join("unionfs-rs"),
        _ => {
            // Named by the user outside: root of two users' namespaces would otherwise share
            // `/tmp/unionfs-rs-0`, which is only the first one's (the second got no control
            // socket); and the user outside finds the same directory as its namespace's root.
            let uid = nix::unistd::geteuid().as_raw();
            let outside = std::fs::read_to_string("/proc/self/uid_map")
                .ok()
                .and_then(|m| outside_id(&m, uid))
                .unwrap_or(uid);
            PathBuf::from(format!("/tmp/unionfs-rs-{outside}"))
        }
    }
}

/// The id that `id` of this user namespace is in the parent namespace, from a `uid_map`'s
/// lines (`inside outside count`); None if no line maps it.
fn outside_id(map: &str, id: u32) -> Option<u32> {
    map.lines().find_map(|l| {
        let v: Vec<u64> = l
            .split_whitespace()
            .filter_map(|x| x.parse().ok())
            .collect();
        let id = u64::from(id);
        (v.len() == 3 && id >= v[0] && id < v[0] + v[2])
            .then(|| u32::try_from(v[1] + (id - v[0])).ok())
            .flatten()
    })
}

/// Are we in the initial user namespace? (Root of another one, podman's rootless mount
/// program, cannot own a directory in the host's `/run`.)
fn initial_userns() -> bool {
    /// The initial user namespace's inode number (PROC_USER_INIT_INO), whoever looks.
    const INIT_USER_NS: &str = "user:[4026531837]";
    std::fs::read_link("/proc/self/ns/user").is_ok_and(|n| n.as_os_str() == INIT_USER_NS)
}

/// Check the directory of the control sockets: a directory (not a link) of ours that no one
/// else may write to. Whoever could write there could swap a socket for a link to another
/// file (which the daemon then gives mode 0666), or put a socket of its own in our place and
/// answer our requests. With `make`: made (0755) if missing, and closed to others if it is ours
/// but open (older versions made it under the daemon's umask 0: mode 0777); the daemon's, and
/// a client's where the directory exists.
fn check_runtime_dir(dir: &Path, make: bool) -> std::io::Result<()> {
    use std::io::{Error, ErrorKind};
    use std::os::unix::fs::{DirBuilderExt, MetadataExt};
    if make {
        match std::fs::DirBuilder::new().mode(0o755).create(dir) {
            Ok(()) => {}
            Err(e) if e.kind() == ErrorKind::AlreadyExists => {}
            Err(e) => return Err(Error::new(e.kind(), format!("{}: {e}", dir.display()))),
        }
    }
    let md = std::fs::symlink_metadata(dir)
        .map_err(|e| Error::new(e.kind(), format!("{}: {e}", dir.display())))?;
    let me = nix::unistd::geteuid().as_raw();
    if !md.file_type().is_dir() {
        return Err(Error::other(format!(
            "{} is not a directory (a link?): not used for control sockets",
            dir.display()
        )));
    }
    if md.uid() != me {
        return Err(Error::new(
            ErrorKind::PermissionDenied,
            format!(
                "{} belongs to uid {}, not to uid {me}: not used for control sockets",
                dir.display(),
                md.uid()
            ),
        ));
    }
    if md.mode() & 0o022 != 0 {
        if !make {
            return Err(Error::new(
                ErrorKind::PermissionDenied,
                format!(
                    "{} may be written by others (mode {:o}): not trusted for control sockets \
                     (a mount by this version closes it)",
                    dir.display(),
                    md.mode() & 0o7777
                ),
            ));
        }
        // The same directory, through a descriptor that no rename or link can redirect.
        let fd = nix::fcntl::open(
            dir,
            nix::fcntl::OFlag::O_RDONLY
                | nix::fcntl::OFlag::O_DIRECTORY
                | nix::fcntl::OFlag::O_NOFOLLOW
                | nix::fcntl::OFlag::O_CLOEXEC,
            nix::sys::stat::Mode::empty(),
        )?;
        let st = nix::sys::stat::fstat(&fd)?;
        if st.st_ino != md.ino() || st.st_dev != md.dev() || st.st_uid != me {
            return Err(Error::other(format!(
                "{} changed while it was checked",
                dir.display()
            )));
        }
        nix::sys::stat::fchmod(&fd, nix::sys::stat::Mode::from_bits_truncate(0o755))?;
        log::warn!(
            "{}: was writable by others (mode {:o}); now 0755",
            dir.display(),
            md.mode() & 0o7777
        );
    }
    Ok(())
}

/// JSON string escaping.
pub fn json_str(s: &str) -> String {
    let mut o = String::with_capacity(s.len() + 2);
    o.push('"');
    for c in s.chars() {
        match c {
            '"' => o.push_str("\\\""),
            '\\' => o.push_str("\\\\"),
            '\n' => o.push_str("\\n"),
            c if (c as u32) < 0x20 => o.push_str(&format!("\\u{:04x}", c as u32)),
            c => o.push(c),
        }
    }
    o.push('"');
    o
}

/// A quota report as JSON.
pub fn report_json(mount: &str, r: &Report, now: u64) -> String {
    let timer = |t: Option<u64>| match t {
        Some(t) => t.to_string(),
        None => "null".into(),
    };
    let left = |t: Option<u64>| match t {
        Some(t) => t.saturating_sub(now).to_string(),
        None => "null".into(),
    };
    let l = &r.limits;
    format!(
        "{{\"mount\":{},\"project_id\":{},\"blocks\":{{\"used\":{},\"soft\":{},\"hard\":{},\"grace\":{},\"grace_expires\":{},\"grace_left\":{}}},\"inodes\":{{\"used\":{},\"soft\":{},\"hard\":{},\"grace\":{},\"grace_expires\":{},\"grace_left\":{}}},\"refusals\":{}}}",
        json_str(mount),
        l.project_id,
        r.used_bytes,
        l.bsoft,
        l.bhard,
        l.bgrace,
        timer(r.btimer),
        left(r.btimer),
        r.used_inodes,
        l.isoft,
        l.ihard,
        l.igrace,
        timer(r.itimer),
        left(r.itimer),
        r.refusals,
    )
}

/// A quota report as `key=value` lines (what the CLI's table is built from).
pub fn report_kv(r: &Report, now: u64) -> String {
    let l = &r.limits;
    let left = |t: Option<u64>| t.map_or(-1, |t| t.saturating_sub(now) as i64);
    format!(
        "project_id={}\nbused={}\nbsoft={}\nbhard={}\nbgrace={}\nbleft={}\niused={}\nisoft={}\nihard={}\nigrace={}\nileft={}\nrefusals={}",
        l.project_id,
        r.used_bytes,
        l.bsoft,
        l.bhard,
        l.bgrace,
        left(r.btimer),
        r.used_inodes,
        l.isoft,
        l.ihard,
        l.igrace,
        left(r.itimer),
        r.refusals
    )
}

/// Apply `key=value` limit changes to `l`.
pub fn apply_limit_args(l: &mut Limits, args: &[&str]) -> Result<(), String> {
    use crate::quota::{parse_count, parse_duration, parse_size};
    for a in args {
        let (k, v) = a
            .split_once('=')
            .ok_or_else(|| format!("expected key=value, got '{a}'"))?;
        match k {
            "bhard" | "size" => l.bhard = parse_size(v)?,
            "bsoft" => l.bsoft = parse_size(v)?,
            "ihard" => l.ihard = parse_count(v)?,
            "isoft" => l.isoft = parse_count(v)?,
            "bgrace" => l.bgrace = parse_duration(v)?,
            "igrace" => l.igrace = parse_duration(v)?,
            "project_id" => {
                l.project_id = v.parse().map_err(|_| format!("invalid project id '{v}'"))?
            }
            _ => return Err(format!("unknown limit '{k}'")),
        }
    }
    l.validate()
}

/// Serve the control socket of `merged` for `union` on a background thread. Returns the path
/// (removed again by [`Control::drop`]).
pub struct Control {
    path: PathBuf,
}

impl Drop for Control {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

impl Control {
    /// Bind and start serving.
    pub fn start(merged: &Path, union: Arc<Union>) -> std::io::Result<Control> {
        let path = socket_path(merged);
        if let Some(dir) = path.parent() {
            check_runtime_dir(dir, true)?;
        }
        if std::fs::symlink_metadata(&path).is_ok() {
            // A live daemon answers; a stale socket from a killed one is replaced.
            if UnixStream::connect(&path).is_ok() {
                return Err(std::io::Error::new(
                    std::io::ErrorKind::AddrInUse,
                    format!("{} is served by another daemon", path.display()),
                ));
            }
            std::fs::remove_file(&path)?;
        }
        let listener = UnixListener::bind(&path)?;
        // Anyone who can see the mount may read reports; changes are checked per request.
        // (Not through a link: nobody else can put one there, see check_runtime_dir.)
        let _ = nix::sys::stat::fchmodat(
            nix::fcntl::AT_FDCWD,
            &path,
            nix::sys::stat::Mode::from_bits_truncate(0o666),
            nix::sys::stat::FchmodatFlags::NoFollowSymlink,
        );
        let mount = merged.to_string_lossy().into_owned();
        std::thread::Builder::new()
            .name("control".into())
            .spawn(move || {
                for conn in listener.incoming() {
                    let Ok(conn) = conn else { continue };
                    if let Err(e) = serve_one(conn, &union, &mount) {
                        log::debug!("control: {e}");
                    }
                }
            })?;
        Ok(Control { path })
    }
}

fn serve_one(conn: UnixStream, union: &Union, mount: &str) -> std::io::Result<()> {
    conn.set_read_timeout(Some(std::time::Duration::from_secs(5)))?;
    let peer = nix::sys::socket::getsockopt(&conn, nix::sys::socket::sockopt::PeerCredentials)
        .map(|c| c.uid())
        .unwrap_or(u32::MAX);
    let mut line = String::new();
    BufReader::new(&conn).read_line(&mut line)?;
    let words: Vec<&str> = line.split_whitespace().collect();
    let reply = handle(&words, peer, union, mount);
    let mut w = &conn;
    w.write_all(reply.as_bytes())?;
    w.write_all(b"\n")
}

/// A cache's settings as `key=value` lines, then what they come to: the page budget, the
/// thresholds, and the kernel's readahead in use (`kernel_readahead_kb=0` is auto; QA: `cache
/// show` said 0 where stats said 8192).
fn cache_kv(cache: &crate::cache::PageCache) -> String {
    let c = cache.config();
    let mut out: Vec<String> = c.pairs().iter().map(|(k, v)| format!("{k}={v}")).collect();
    let (bg, th) = c.thresholds();
    out.push(format!("cache_page_budget={}", c.page_budget()));
    out.push(format!("bg_thresh_bytes={bg}"));
    out.push(format!("dirty_thresh_bytes={th}"));
    out.push(format!(
        "kernel_readahead_in_use_kb={}",
        cache.kernel_readahead_kb()
    ));
    out.join("\n")
}

fn no_quota() -> String {
    "{\"error\":\"no quota is set on this mount\"}".into()
}

fn handle(words: &[&str], peer: u32, union: &Union, mount: &str) -> String {
    let q: Option<&Arc<Quota>> = union.quota();
    union.settle_allocations();
    match words.first().copied() {
        Some("quota-report") => match q {
            Some(q) if words.get(1) == Some(&"kv") => report_kv(&q.report(), q.now()),
            Some(q) => report_json(mount, &q.report(), q.now()),
            None => no_quota(),
        },
        Some("quota-limit") => {
            let me = nix::unistd::geteuid().as_raw();
            if peer != 0 && peer != me {
                return "{\"error\":\"only root or the mount's owner may change limits\"}".into();
            }
            let Some(q) = q else { return no_quota() };
            let mut l = q.limits();
            match apply_limit_args(&mut l, &words[1..]) {
                Ok(()) => {
                    q.set_limits(l);
                    report_json(mount, &q.report(), q.now())
                }
                Err(e) => format!("{{\"error\":{}}}", json_str(&e)),
            }
        }
        Some("stats") => {
            let mut s = format!(
                "{{\"mount\":{},\"pid\":{},\"nodes\":{},\"open_files\":{}",
                json_str(mount),
                std::process::id(),
                union.node_count(),
                union.open_file_count()
            );
            let (pt, pt_opens, pt_fallbacks) = union.passthrough_stats();
            s.push_str(&format!(
                ",\"passthrough\":{},\"passthrough_opens\":{pt_opens},\"passthrough_fallbacks\":{pt_fallbacks},\"kernel_writeback_cache\":{}",
                u8::from(pt),
                u8::from(union.writeback_cache_on())
            ));
            let (lower_opens, busy_waits, busy_refusals) = union.lower_passthrough_stats();
            s.push_str(&format!(
                ",\"lower_passthrough_opens\":{lower_opens},\"lower_busy_waits\":{busy_waits},\"lower_busy_refusals\":{busy_refusals}"
            ));
            s.push_str(&format!(
                ",\"uring_threads\":{},\"uring_requests\":{},\"uring_rescues\":{},\"getxattr_requests\":{},\"copy_ranges\":{},\"copy_range_bytes\":{}",
                union.uring_threads.load(std::sync::atomic::Ordering::Relaxed),
                union.uring_requests.load(std::sync::atomic::Ordering::Relaxed),
                union.uring_rescues.load(std::sync::atomic::Ordering::Relaxed),
                union.getxattr_requests.load(std::sync::atomic::Ordering::Relaxed),
                union.copy_ranges.load(std::sync::atomic::Ordering::Relaxed),
                union.copy_range_bytes.load(std::sync::atomic::Ordering::Relaxed)
            ));
            let (rel, rel_over, (rel_pending, _)) = union.release_stats();
            s.push_str(&format!(
                ",\"deferred_releases\":{rel},\"deferred_releases_pending\":{rel_pending},\"releases_in_request\":{rel_over}"
            ));
            let (dirfds, dirfd_cap, dirfd_evictions) = union.dirfd_stats();
            s.push_str(&format!(
                ",\"dir_fds\":{dirfds},\"dir_fd_cap\":{dirfd_cap},\"dir_fd_evictions\":{dirfd_evictions},\"removed_pinned\":{}",
                crate::union::inode::pinned()
            ));
            let (made, kept, kept_entries, kdrops) = union.listing_stats();
            s.push_str(&format!(
                ",\"listings_made\":{made},\"listings_kept\":{kept},\"listing_entries_kept\":{kept_entries},\"kernel_listing_drops\":{kdrops}"
            ));
            let (pf_queued, pf_dirs, pf_entries, pf_dropped, pf_skipped, pf_pending) =
                union.prefetch_stats();
            s.push_str(&format!(
                ",\"prefetch_queued\":{pf_queued},\"prefetch_dirs\":{pf_dirs},\"prefetch_entries\":{pf_entries},\"prefetch_dropped\":{pf_dropped},\"prefetch_skipped\":{pf_skipped},\"prefetch_pending\":{pf_pending}"
            ));
            let (deferred, pending, failed) = union.commit_stats();
            s.push_str(&format!(
                ",\"copyup_deferred_commits\":{deferred},\"copyup_pending_commits\":{pending},\"copyup_failed_commits\":{failed}"
            ));
            if let Some((used, free)) = crate::alloc::heap() {
                s.push_str(&format!(
                    ",\"heap_in_use_bytes\":{used},\"heap_free_bytes\":{free}"
                ));
            }
            if let Some(c) = union.cache() {
                for (k, v) in c.stats().fields {
                    s.push_str(&format!(",\"{k}\":{v}"));
                }
            } else {
                s.push_str(",\"cache_size\":0");
            }
            if let Some(q) = q {
                let r = q.report();
                s.push_str(&format!(
                    ",\"quota_used_bytes\":{},\"quota_used_inodes\":{},\"quota_bhard\":{},\"quota_bsoft\":{},\"quota_ihard\":{},\"quota_isoft\":{},\"quota_refusals\":{}",
                    r.used_bytes,
                    r.used_inodes,
                    r.limits.bhard,
                    r.limits.bsoft,
                    r.limits.ihard,
                    r.limits.isoft,
                    r.refusals
                ));
            }
            s.push('}');
            s
        }
        Some("cache-show") => match union.cache() {
            Some(c) => cache_kv(c),
            None => "{\"error\":\"this mount has no page cache (mounted with cache_size=0)\"}".into(),
        },
        Some("cache-set") => {
            let me = nix::unistd::geteuid().as_raw();
            if peer != 0 && peer != me {
                return "{\"error\":\"only root or the mount's owner may change the cache\"}".into();
            }
            let Some(c) = union.cache() else {
                return "{\"error\":\"this mount has no page cache (mounted with cache_size=0)\"}".into();
            };
            let mut cfg = c.config();
            let size_before = cfg.size;
            let warned_before = cfg.warnings(crate::alloc::physical_memory());
            for kv in &words[1..] {
                let Some((k, v)) = kv.split_once('=') else {
                    return format!("{{\"error\":{}}}", json_str(&format!("expected KEY=VALUE, got {kv}")));
                };
                if let Err(e) = cfg.set(k, v) {
                    return format!("{{\"error\":{}}}", json_str(&e));
                }
            }
            match c.set_config(cfg) {
                Ok(()) => {
                    if cfg.size != size_before {
                        crate::alloc::retune(cfg.size);
                    }
                    if words[1..].iter().any(|kv| kv.starts_with("kernel_readahead_kb=")) {
                        if let Err(e) = union.apply_kernel_readahead() {
                            return format!("{{\"error\":{}}}", json_str(&e));
                        }
                    }
                    // What the new settings do that their values do not say, on lines
                    // of their own (the CLI prints them on stderr); not again what was
                    // already so before this change.
                    let mut out = cache_kv(c);
                    let warnings = c.config().warnings(crate::alloc::physical_memory());
                    for w in warnings.iter().filter(|w| !warned_before.contains(w)) {
                        out.push_str("\nwarning: ");
                        out.push_str(w);
                    }
                    out
                }
                Err(e) => format!("{{\"error\":{}}}", json_str(&e)),
            }
        }
        Some("sync") => match union.sync_all() {
            Ok(()) => String::new(),
            Err(e) => format!("{{\"error\":{}}}", json_str(&e.to_string())),
        },
        // What `umount` asks first: cached writes stored, without the syncfs of upper's
        // filesystem (whose error may be another program's file's; the stop syncs anyway).
        Some("store-cached") => match union.store_cached() {
            Ok(()) => String::new(),
            Err(e) => format!("{{\"error\":{}}}", json_str(&e.to_string())),
        },
        _ => "{\"error\":\"unknown command (quota-report, quota-limit k=v…, stats, cache-show, cache-set k=v…, sync, store-cached)\"}".into(),
    }
}

/// Is `p` on a FUSE mount?
fn is_fuse(p: &Path) -> bool {
    nix::sys::statfs::statfs(p)
        .is_ok_and(|s| s.filesystem_type() == nix::sys::statfs::FUSE_SUPER_MAGIC)
}

/// Remove the control socket of `merged` if no daemon answers on it (one killed outright
/// leaves it behind).
pub fn remove_stale(merged: &Path) {
    let path = socket_path(merged);
    if path.exists() && UnixStream::connect(&path).is_err() {
        let _ = std::fs::remove_file(&path);
    }
}

/// Send one command to the daemon serving `merged`; returns its reply.
pub fn request(merged: &Path, cmd: &str) -> Result<String, String> {
    let path = socket_path(merged);
    // (A directory of ours made open by an older version is closed here too: its daemons
    // still answer.)
    if let Some(dir) = path.parent()
        && let Err(e) = check_runtime_dir(dir, dir.exists())
        && e.kind() != std::io::ErrorKind::NotFound
    {
        return Err(format!("{}: {e}", merged.display()));
    }
    // A daemon opens its socket just after reporting the mount ready: on a FUSE mount, give a
    // missing or not yet listening socket a moment.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(1);
    let mut s = loop {
        match UnixStream::connect(&path) {
            Ok(s) => break s,
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::NotFound | std::io::ErrorKind::ConnectionRefused
                ) && std::time::Instant::now() < deadline
                    && is_fuse(merged) =>
            {
                std::thread::sleep(std::time::Duration::from_millis(10));
            }
            Err(e) => {
                return Err(format!(
                    "{}: no unionfs-rs daemon answers on {} ({e})",
                    merged.display(),
                    path.display()
                ));
            }
        }
    };
    s.set_read_timeout(Some(std::time::Duration::from_secs(10)))
        .map_err(|e| e.to_string())?;
    s.write_all(cmd.as_bytes())
        .and_then(|_| s.write_all(b"\n"))
        .map_err(|e| e.to_string())?;
    let mut out = String::new();
    std::io::Read::read_to_string(&mut s, &mut out).map_err(|e| e.to_string())?;
    Ok(out.trim().to_string())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::{MetadataExt, PermissionsExt};

    fn mode(p: &Path) -> u32 {
        std::fs::symlink_metadata(p).unwrap().mode() & 0o7777
    }

    #[test]
    fn the_fallback_directory_is_named_by_the_user_outside() {
        let init = "         0          0 4294967295\n";
        assert_eq!(outside_id(init, 0), Some(0));
        assert_eq!(outside_id(init, 1000), Some(1000));
        // podman's rootless namespace: root is the user, the rest its subordinate ids.
        let podman = "         0       1000          1\n         1     100000      65536\n";
        assert_eq!(outside_id(podman, 0), Some(1000));
        assert_eq!(outside_id(podman, 1), Some(100000));
        assert_eq!(outside_id(podman, 65536), Some(165535));
        assert_eq!(outside_id(podman, 65537), None);
        assert_eq!(outside_id("", 0), None);
    }

    #[test]
    fn the_socket_directory_is_ours_and_closed_to_others() {
        let t = tempfile::tempdir().unwrap();
        // Missing: made, 0755 whatever the umask (the daemon's is 0).
        let d = t.path().join("made");
        check_runtime_dir(&d, true).unwrap();
        assert_eq!(mode(&d), 0o755);
        check_runtime_dir(&d, false).unwrap();
        // Ours but open to others (what older versions made): a client does not trust it,
        // the daemon closes it.
        std::fs::set_permissions(&d, std::fs::Permissions::from_mode(0o777)).unwrap();
        let e = check_runtime_dir(&d, false).unwrap_err();
        assert!(e.to_string().contains("written by others"), "{e}");
        assert_eq!(mode(&d), 0o777, "a client changed it");
        check_runtime_dir(&d, true).unwrap();
        assert_eq!(mode(&d), 0o755);
        // A link to a directory (of ours, closed): refused, the target untouched.
        let target = t.path().join("target");
        std::fs::create_dir(&target).unwrap();
        std::fs::set_permissions(&target, std::fs::Permissions::from_mode(0o777)).unwrap();
        let link = t.path().join("link");
        std::os::unix::fs::symlink(&target, &link).unwrap();
        for make in [false, true] {
            let e = check_runtime_dir(&link, make).unwrap_err();
            assert!(e.to_string().contains("not a directory"), "{e}");
        }
        assert_eq!(mode(&target), 0o777);
        // A file in its place.
        let f = t.path().join("file");
        std::fs::write(&f, "x").unwrap();
        assert!(check_runtime_dir(&f, true).is_err());
        // Someone else's (made there first, as anyone may in /tmp): refused, left as it is.
        if nix::unistd::geteuid().is_root() {
            let other = t.path().join("other");
            std::fs::create_dir(&other).unwrap();
            std::fs::set_permissions(&other, std::fs::Permissions::from_mode(0o777)).unwrap();
            nix::unistd::chown(&other, Some(nix::unistd::Uid::from_raw(65534)), None).unwrap();
            for make in [false, true] {
                let e = check_runtime_dir(&other, make).unwrap_err();
                assert!(e.to_string().contains("belongs to uid 65534"), "{e}");
            }
            assert_eq!(mode(&other), 0o777);
        }
    }
}
