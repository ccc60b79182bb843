//! Check a mount request before anything on disk is touched: every refusal is one clear line
//! and changes nothing.

use std::fs::File;
use std::os::fd::AsRawFd;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use super::options::MountSpec;
use crate::union::Options;

/// How long a mount waits for the previous daemon of the same upper to finish exiting.
const UPPER_LOCK_WAIT: std::time::Duration = std::time::Duration::from_secs(10);

/// Most FUSE worker threads a mount may ask for.
const MAX_THREADS: usize = 256;

/// A request that passed every check.
#[derive(Debug)]
pub struct Checked {
    /// The union to build.
    pub opts: Options,
    /// Canonical mount point.
    pub merged: PathBuf,
    /// The original request (flags, names).
    pub spec: MountSpec,
    /// Work dir to create before mounting (the default sibling did not exist).
    pub create_workdir: Option<PathBuf>,
    /// Exclusive lock on the upper dir, held for the daemon's life.
    pub lock: Option<File>,
    /// The same on the workdir (taken when it is created, if it does not exist yet).
    pub work_lock: Option<File>,
    /// The log file, opened for appending.
    pub log: Option<File>,
}

/// Open the log file for appending. It must not live in a layer or under the mount point (the
/// daemon would write through its own mount, or into the union's data).
fn open_log(p: &Path, roots: &[&Path]) -> Result<File, String> {
    use std::os::unix::fs::OpenOptionsExt;
    let name = p
        .file_name()
        .ok_or_else(|| format!("log file {}: not a file name", p.display()))?;
    let parent = match p.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => Path::new("."),
    };
    let dir = parent
        .canonicalize()
        .map_err(|e| format!("log file {}: {}: {e}", p.display(), parent.display()))?;
    if let Some(r) = roots.iter().find(|r| within(&dir, r)) {
        return Err(format!(
            "log file {}: inside {} (a layer or the mount point); put it elsewhere",
            p.display(),
            r.display()
        ));
    }
    std::fs::OpenOptions::new()
        .append(true)
        .create(true)
        .mode(0o640)
        .custom_flags(libc::O_CLOEXEC | libc::O_NOFOLLOW)
        .open(dir.join(name))
        .map_err(|e| format!("log file {}: {e}", p.display()))
}

/// `metadata(p)`, asked again for up to a second while it fails with ECANCELED: a request
/// the kernel handed to the io_uring queue of a FUSE daemon that has just died is cancelled
/// (the task is gone) until the kernel aborts the connection, which then answers ENOTCONN or
/// ECONNABORTED for good.
fn metadata_settled(p: &Path) -> std::io::Result<std::fs::Metadata> {
    let start = std::time::Instant::now();
    loop {
        match std::fs::metadata(p) {
            Err(e)
                if e.raw_os_error() == Some(libc::ECANCELED)
                    && start.elapsed() < std::time::Duration::from_secs(1) =>
            {
                std::thread::sleep(std::time::Duration::from_millis(20));
            }
            r => return r,
        }
    }
}

fn existing_dir(p: &Path, what: &str) -> Result<PathBuf, String> {
    let md = metadata_settled(p).map_err(|e| {
        if matches!(
            e.raw_os_error(),
            Some(libc::ENOTCONN | libc::ECONNABORTED | libc::ECANCELED)
        ) {
            // A FUSE mount whose daemon died (killed, crashed) stays until unmounted (its
            // connection aborted: ECONNABORTED where it was served through io_uring;
            // ECANCELED while the kernel has yet to abort it).
            format!(
                "{what} {}: {e}: a FUSE filesystem whose daemon has stopped is still mounted \
                 there; unmount it first (`unionfs-rs umount {0}` or `fusermount3 -u {0}`)",
                p.display()
            )
        } else {
            format!("{what} {}: {e}", p.display())
        }
    })?;
    if !md.is_dir() {
        return Err(format!("{what} {}: not a directory", p.display()));
    }
    p.canonicalize()
        .map_err(|e| format!("{what} {}: {e}", p.display()))
}

/// Is `a` equal to or inside `b` (both canonical)? By path, and by inode: an ancestor of
/// `a` that is `b`'s directory under another path (a bind mount of it) counts too.
fn within(a: &Path, b: &Path) -> bool {
    if a.starts_with(b) {
        return true;
    }
    let Ok(bm) = std::fs::metadata(b) else {
        return false;
    };
    a.ancestors()
        .any(|p| std::fs::metadata(p).is_ok_and(|m| m.dev() == bm.dev() && m.ino() == bm.ino()))
}

/// Are we in a user namespace other than the initial one (rootless containers)?
pub fn in_user_namespace() -> bool {
    match std::fs::read_to_string("/proc/self/uid_map") {
        Ok(m) => {
            let f: Vec<&str> = m.split_whitespace().collect();
            !(f.len() == 3 && f[0] == "0" && f[1] == "0" && f[2] == "4294967295")
        }
        Err(_) => false,
    }
}

/// Validate a request.
pub fn validate(mut spec: MountSpec) -> Result<Checked, String> {
    for u in &spec.unknown {
        eprintln!("unionfs-rs: warning: ignoring unknown option '{u}'");
    }
    spec.quota = spec.quota_args.to_config()?;
    if spec.quota.is_some() && spec.upper.is_none() {
        return Err("a quota needs an upper directory".into());
    }
    if spec.lowers.is_empty() {
        return Err("no lower directory given (lowerdir=…)".into());
    }
    // Each worker holds a thread and a cloned /dev/fuse descriptor: thousands would run the
    // daemon out of descriptors after the mount went live.
    if let Some(n) = spec.threads
        && !(1..=MAX_THREADS).contains(&n)
    {
        return Err(format!("threads: {n} is not between 1 and {MAX_THREADS}"));
    }
    let merged_raw = spec.merged.clone().ok_or("no mount point given")?;
    let merged = existing_dir(&merged_raw, "mount point")?;
    let mut lowers = Vec::new();
    for l in &spec.lowers {
        lowers.push(existing_dir(l, "lower directory")?);
    }
    let mut data_lowers = Vec::new();
    for l in &spec.data_lowers {
        data_lowers.push(existing_dir(l, "data-only lower directory")?);
    }
    // One directory twice among the lowers (by inode, so a bind mount of it too): kernel
    // overlayfs refuses it as a conflicting lowerdir.
    let mut seen: Vec<((u64, u64), &Path)> = Vec::new();
    for l in lowers.iter().chain(&data_lowers) {
        let md =
            std::fs::metadata(l).map_err(|e| format!("lower directory {}: {e}", l.display()))?;
        let id = (md.dev(), md.ino());
        if let Some((_, first)) = seen.iter().find(|(i, _)| *i == id) {
            return Err(format!(
                "lower directory {} is given twice (as {} too)",
                l.display(),
                first.display()
            ));
        }
        seen.push((id, l));
    }
    if spec.read_only {
        spec.upper = None;
        spec.workdir = None;
    }
    let upper = match &spec.upper {
        Some(u) => Some(existing_dir(u, "upper directory")?),
        None => None,
    };
    let mut create_workdir = None;
    let workdir = match (&upper, &spec.workdir) {
        (None, Some(_)) => return Err("workdir given without an upper directory".into()),
        (None, None) => None,
        (Some(_), Some(w)) => Some(existing_dir(w, "workdir")?),
        (Some(u), None) => {
            let name = format!(
                "{}.work",
                u.file_name()
                    .map(|n| n.to_string_lossy())
                    .unwrap_or_default()
            );
            let w = u.with_file_name(name);
            if w.exists() {
                Some(existing_dir(&w, "workdir")?)
            } else {
                create_workdir = Some(w.clone());
                Some(w)
            }
        }
    };
    if let (Some(u), Some(w)) = (&upper, &workdir) {
        let udev = std::fs::metadata(u).map_err(|e| e.to_string())?.dev();
        let wdev_path = if w.exists() {
            w.clone()
        } else {
            w.parent().map(Path::to_path_buf).unwrap_or_default()
        };
        let wdev = std::fs::metadata(&wdev_path)
            .map_err(|e| format!("workdir {}: {e}", w.display()))?
            .dev();
        if udev != wdev {
            return Err(format!(
                "workdir {} is on another filesystem than upper {} (they must share one, as rename between them must work)",
                w.display(),
                u.display()
            ));
        }
        if within(u, w) || within(w, u) {
            return Err(format!(
                "workdir {} and upper {} overlap (they must be separate subtrees)",
                w.display(),
                u.display()
            ));
        }
        let incompat = w.join("work").join("incompat");
        if let Ok(mut rd) = std::fs::read_dir(&incompat)
            && rd.next().is_some()
        {
            return Err(format!(
                "{} is not empty: this upper was written with an incompatible feature; refusing to mount (as overlayfs does)",
                incompat.display()
            ));
        }
    }
    // A second mount over a live one of ours would hide it, and `umount`, `stats` and the
    // control socket (named after the mount point) would reach the hidden daemon.
    if super::daemon::is_ours(&merged) {
        return Err(format!(
            "mount point {} is already a live unionfs-rs mount; unmount it first (`unionfs-rs umount {0}`)",
            merged.display()
        ));
    }
    for l in lowers.iter().chain(&data_lowers) {
        for (what, d) in [("upper", &upper), ("workdir", &workdir)] {
            if let Some(d) = d
                && (within(d, l) || within(l, d))
            {
                return Err(format!(
                    "{what} {} overlaps lower directory {}",
                    d.display(),
                    l.display()
                ));
            }
        }
        if within(l, &merged) && l != &merged {
            return Err(format!(
                "lower directory {} is inside the mount point {}",
                l.display(),
                merged.display()
            ));
        }
    }
    for (what, d) in [("upper", &upper), ("workdir", &workdir)] {
        if let Some(d) = d
            && (within(&merged, d) || within(d, &merged))
        {
            return Err(format!(
                "mount point {} overlaps {what} {}",
                merged.display(),
                d.display()
            ));
        }
    }
    if let Err(e) = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/fuse")
    {
        return Err(format!(
            "cannot open /dev/fuse: {e} (is the fuse module loaded and /dev/fuse accessible?)"
        ));
    }
    let lock = upper.as_deref().map(|u| lock_dir(u, "upper")).transpose()?;
    // The workdir too (its quota state and inode map are one mount's); one that does not
    // exist yet is locked when the daemon creates it.
    let work_lock = match &workdir {
        Some(w) if upper.is_some() && w.exists() => Some(lock_dir(w, "workdir")?),
        _ => None,
    };
    if !spec.userxattr && in_user_namespace() {
        // trusted.* cannot be written from a user namespace (rootless podman passes no
        // userxattr): use user.overlay.*, as the kernel's userxattr and fuse-overlayfs do.
        spec.userxattr = true;
    }
    let redirect = spec.redirect_dir.as_deref();
    // Kernel overlayfs refuses these pairs with userxattr; a mount program is given
    // storage.conf's mountopt whether or not it runs rootless (Fedora's has metacopy=on), so
    // here they are only told of.
    if spec.userxattr && matches!(redirect, Some("on" | "follow")) {
        eprintln!(
            "unionfs-rs: warning: redirect_dir={} ignored with userxattr: redirects are not \
             followed with user.overlay xattrs (as kernel overlayfs)",
            redirect.unwrap_or_default()
        );
    }
    if spec.userxattr && spec.metacopy == Some(true) {
        eprintln!(
            "unionfs-rs: warning: metacopy=on ignored with userxattr: metacopy files are \
             refused with user.overlay xattrs (as kernel overlayfs)"
        );
    }
    if spec.metacopy == Some(true) && redirect == Some("nofollow") {
        return Err(
            "conflicting options: metacopy=on,redirect_dir=nofollow: a moved \
                    metacopy file is found through its redirect (kernel overlayfs refuses \
                    the same)"
                .into(),
        );
    }
    if spec.cache.size > 0 && spec.cache.size < 16 * crate::cache::PAGE as u64 {
        return Err(format!(
            "cache_size {} is too small: at least 64K, or 0 to turn the page cache off",
            spec.cache.size
        ));
    }
    let log = match &spec.log_file {
        Some(p) => {
            let mut roots: Vec<&Path> = lowers.iter().map(PathBuf::as_path).collect();
            roots.extend(upper.as_deref());
            roots.extend(workdir.as_deref());
            roots.push(&merged);
            Some(open_log(p, &roots)?)
        }
        None => None,
    };
    let privileged = nix::unistd::geteuid().is_root() && !in_user_namespace();
    let opts = Options {
        lowers,
        data_lowers,
        upper,
        workdir,
        userxattr: spec.userxattr,
        aufs_whiteouts: spec.aufs_whiteouts,
        redirect_nofollow: redirect == Some("nofollow"),
        redirect_create: redirect == Some("on"),
        copy_dir_renames: spec.dir_rename_copy,
        metacopy: spec.metacopy == Some(true),
        quota: spec.quota.clone(),
        uid_map: spec.uid_map.clone(),
        gid_map: spec.gid_map.clone(),
        volatile: spec.volatile,
        sync_commit: spec.sync_commit,
        commit_delay_ms: spec.commit_delay_ms,
        release_delay_ms: spec.release_delay_ms,
        commit_window_ms: spec.commit_window_ms,
        copyup_window_ms: spec.copyup_window_ms,
        panic_name: spec.panic_name.clone(),
        cache: Some(spec.cache),
        // Registering backing files needs CAP_SYS_ADMIN in the initial user namespace.
        passthrough: !spec.no_passthrough && privileged,
        lower_passthrough: spec.lower_passthrough && !spec.no_passthrough && privileged,
        // Auto: where passthrough is impossible (the kernel excludes the two).
        writeback_cache: spec.writeback_cache.unwrap_or(!privileged),
        prefetch: !spec.no_prefetch,
        selinux_enodata: spec.selinux_enodata,
    };
    // Once the request is known to be good (a refused one says one thing).
    for w in spec.cache.warnings(crate::alloc::physical_memory()) {
        eprintln!("unionfs-rs: warning: {w}");
    }
    Ok(Checked {
        opts,
        merged,
        spec,
        create_workdir,
        lock,
        work_lock,
        log,
    })
}

/// An exclusive `flock` on directory `d` (`what`: upper or workdir), held for the daemon's
/// life: one unionfs-rs mount per upper and per workdir. A daemon whose mount was just
/// unmounted still holds it while it stores what it cached and exits, and container engines
/// mount the same layer again right after (podman diff, commit): wait for it a little before
/// calling it a conflict.
pub(crate) fn lock_dir(d: &std::path::Path, what: &str) -> Result<File, String> {
    let f = File::open(d).map_err(|e| format!("{what} {}: {e}", d.display()))?;
    let deadline = std::time::Instant::now() + UPPER_LOCK_WAIT;
    loop {
        // SAFETY: f is an open descriptor for the whole call.
        let r = unsafe { libc::flock(f.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) };
        if r == 0 {
            return Ok(f);
        }
        if std::time::Instant::now() >= deadline {
            return Err(format!(
                "{what} {} is already in use by another unionfs-rs mount",
                d.display()
            ));
        }
        std::thread::sleep(std::time::Duration::from_millis(10));
    }
}
