//! Starting the daemon (fork, wait for the mount to be live, detach from stdio), serving
//! until unmounted, stopping on SIGTERM/SIGINT, and `umount`.

use std::io::{BufRead, Write};
use std::os::fd::{FromRawFd, OwnedFd};
use std::path::Path;
use std::sync::Arc;

use fuser::{Config, MountOption, Session, SessionACL};
use nix::sys::signal::{SigSet, Signal};
use nix::unistd::ForkResult;

use super::validate::Checked;
use super::{EXIT_USAGE, fail};
use crate::fuse::UnionFs;
use crate::union::Union;

/// Mount and serve. Returns the process exit code (the daemon child never returns here in
/// background mode: it exits when the mount ends).
pub fn start(mut c: Checked) -> i32 {
    if let Some(w) = &c.create_workdir {
        if let Err(e) = std::fs::create_dir(w) {
            return fail(format!("create workdir {}: {e}", w.display()));
        }
        match super::validate::lock_dir(w, "workdir") {
            Ok(f) => c.work_lock = Some(f),
            Err(e) => return fail(e),
        }
    }
    crate::logger::init(c.spec.debug, c.spec.foreground || c.log.is_some());
    if c.spec.foreground {
        return match serve(&c, None) {
            Ok(()) => 0,
            Err(e) => fail(e),
        };
    }
    let (rd, wr) = match nix::unistd::pipe() {
        Ok(p) => p,
        Err(e) => return fail(format!("pipe: {e}")),
    };
    // SAFETY: no other threads exist yet (we fork before starting any), so the child may run
    // arbitrary code.
    match unsafe { nix::unistd::fork() } {
        Err(e) => fail(format!("fork: {e}")),
        Ok(ForkResult::Parent { .. }) => {
            drop(wr);
            // The child reports progress lines ("note: …"), then "ok" or the error.
            let mut failed = String::new();
            for line in std::io::BufReader::new(std::fs::File::from(rd)).lines() {
                let Ok(line) = line else { break };
                if line == "ok" {
                    return 0;
                } else if let Some(note) = line.strip_prefix("note: ") {
                    eprintln!("unionfs-rs: {note}");
                } else {
                    failed.push_str(&line);
                    failed.push('\n');
                }
            }
            if failed.is_empty() {
                fail("the daemon exited before the mount was ready")
            } else {
                eprint!("{failed}");
                EXIT_USAGE
            }
        }
        Ok(ForkResult::Child) => {
            drop(rd);
            let _ = nix::unistd::setsid();
            // Descriptors inherited from the caller (a pipe podman reads, say) must not be
            // held open for the daemon's life.
            let keep: Vec<i32> = [
                Some(std::os::fd::AsRawFd::as_raw_fd(&wr)),
                c.lock.as_ref().map(std::os::fd::AsRawFd::as_raw_fd),
                c.work_lock.as_ref().map(std::os::fd::AsRawFd::as_raw_fd),
                c.log.as_ref().map(std::os::fd::AsRawFd::as_raw_fd),
            ]
            .into_iter()
            .flatten()
            .collect();
            close_inherited_fds(&keep);
            let r = serve(&c, Some(wr));
            std::process::exit(if r.is_ok() { 0 } else { 1 });
        }
    }
}

/// Close every descriptor above stderr except `keep`.
fn close_inherited_fds(keep: &[i32]) {
    let fds: Vec<i32> = match std::fs::read_dir("/proc/self/fd") {
        Ok(rd) => rd
            .filter_map(|e| e.ok())
            .filter_map(|e| e.file_name().to_str().and_then(|n| n.parse().ok()))
            .collect(),
        Err(_) => return,
    };
    for fd in fds {
        if fd > 2 && !keep.contains(&fd) {
            // SAFETY: closing a descriptor we inherited and do not use; the read_dir handle
            // above is already dropped (closing it too would be harmless).
            unsafe {
                libc::close(fd);
            }
        }
    }
}

/// Point stdin/stdout at /dev/null, and stderr at the log file or /dev/null, so a caller
/// reading our stderr sees EOF.
fn detach_stdio(log: Option<&std::fs::File>) {
    use std::os::fd::AsRawFd;
    if let Ok(null) = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/null")
    {
        for fd in 0..3 {
            // SAFETY: dup2 onto the standard descriptors; null stays open for the call.
            unsafe {
                libc::dup2(null.as_raw_fd(), fd);
            }
        }
    }
    if let Some(f) = log {
        stderr_to(f);
    }
}

/// Point stderr at `f` (the log file).
fn stderr_to(f: &std::fs::File) {
    // SAFETY: dup2 of an open descriptor onto stderr.
    unsafe {
        libc::dup2(std::os::fd::AsRawFd::as_raw_fd(f), 2);
    }
}

fn serve(c: &Checked, ready: Option<OwnedFd>) -> Result<(), String> {
    let report = |ready: &Option<OwnedFd>, msg: &str| {
        if let Some(fd) = ready {
            // SAFETY: dup the pipe fd so the File we write through owns its own descriptor.
            let dupfd = unsafe { libc::dup(std::os::fd::AsRawFd::as_raw_fd(fd)) };
            if dupfd >= 0 {
                // SAFETY: dupfd is a fresh descriptor we own.
                let mut f = unsafe { std::fs::File::from_raw_fd(dupfd) };
                let _ = f.write_all(msg.as_bytes());
            }
        }
    };
    // Directory fds are cached per node: allow as many open files as the system lets us.
    if let Ok((_, hard)) =
        nix::sys::resource::getrlimit(nix::sys::resource::Resource::RLIMIT_NOFILE)
    {
        let _ =
            nix::sys::resource::setrlimit(nix::sys::resource::Resource::RLIMIT_NOFILE, hard, hard);
    }
    crate::alloc::tune(c.spec.cache.size);
    // Modes arrive from the kernel with the caller's umask applied; ours must not apply again.
    nix::sys::stat::umask(nix::sys::stat::Mode::empty());
    // Signals are taken by a dedicated thread: block them before any thread starts.
    let mut sigs = SigSet::empty();
    sigs.add(Signal::SIGTERM);
    sigs.add(Signal::SIGINT);
    sigs.add(Signal::SIGHUP);
    let _ = sigs.thread_block();

    let mut progress = |m: String| {
        log::info!("{m}");
        report(&ready, &format!("note: {m}\n"));
    };
    let union = match Union::new_with_progress(&c.opts, &mut progress) {
        Ok(u) => Arc::new(u),
        Err(e) => {
            let m = format!("unionfs-rs: {e}\n");
            report(&ready, &m);
            return Err(e.to_string());
        }
    };
    union.attach();
    let mut cfg = Config::default();
    let fsname = c.spec.fsname.clone().unwrap_or_else(|| "unionfs-rs".into());
    let mut mo = vec![
        MountOption::FSName(fsname),
        MountOption::Subtype(
            c.spec
                .subtype
                .clone()
                .unwrap_or_else(|| "unionfs-rs".into()),
        ),
        MountOption::DefaultPermissions,
    ];
    let root = nix::unistd::geteuid().is_root();
    let has = |f: &str| c.spec.kernel_flags.iter().any(|x| x == f);
    if root && !has("nodev") {
        mo.push(MountOption::Dev);
    }
    if root && !has("nosuid") {
        mo.push(MountOption::Suid);
    }
    for f in &c.spec.kernel_flags {
        match f.as_str() {
            "nodev" => mo.push(MountOption::NoDev),
            "nosuid" => mo.push(MountOption::NoSuid),
            "noexec" => mo.push(MountOption::NoExec),
            "noatime" => mo.push(MountOption::NoAtime),
            "dirsync" => mo.push(MountOption::DirSync),
            "sync" => mo.push(MountOption::Sync),
            _ => {}
        }
    }
    mo.push(if union.read_only() {
        MountOption::RO
    } else {
        MountOption::RW
    });
    cfg.mount_options = mo.clone();
    cfg.acl = SessionACL::All;
    let threads = c.spec.threads.unwrap_or(4).max(1);
    cfg.n_threads = Some(threads);
    cfg.clone_fd = true;
    let ttl = c
        .spec
        .ttl
        .map(std::time::Duration::from_secs_f64)
        .unwrap_or(crate::fuse::DEFAULT_TTL);
    let mut fs = UnionFs::new(union.clone(), ttl).with_readdirplus(c.spec.readdirplus);
    let ring = (c.spec.uring != crate::fuse::Uring::Off)
        .then(|| crate::fuse::RingSetup::new(c.spec.uring, c.spec.uring_test_fail));
    if let Some(r) = &ring {
        fs = fs.with_ring(r.clone());
    }
    let session = match own_mount(c, &mo) {
        Ok(fd) => Session::from_fd(fs, fd, SessionACL::All, cfg),
        // Not allowed to mount(2) here (rootless outside a user namespace): fusermount3.
        Err(nix::errno::Errno::EPERM) => Session::new(fs, &c.merged, &cfg),
        Err(e) => Err(std::io::Error::from(e)),
    };
    let mut session = match session {
        Ok(s) => s,
        Err(e) => {
            let m = format!("unionfs-rs: mount on {}: {e}\n", c.merged.display());
            report(&ready, &m);
            return Err(m);
        }
    };
    if let Some(r) = ring.as_ref().filter(|r| r.offered()) {
        // INIT is answered (the session's handshake): the kernel holds requests until every
        // CPU's queue has an entry. Threads per CPU so that there are about as many as
        // /dev/fuse workers.
        use std::os::fd::AsFd;
        let cpus = crate::cpus_allowed();
        // At least two per CPU: one long request (a copy-up, an fsync) must not hold up every
        // other request from that CPU.
        let per_cpu = threads.div_ceil(cpus).max(2);
        let _ = r.start(union.clone(), session.as_fd(), ttl, per_cpu);
    }
    let notifier = session.notifier();
    union.set_forgetter(std::sync::Arc::new(
        move |f: &crate::union::Forget| match f {
            crate::union::Forget::Entry(parent, name) => {
                notifier.inval_entry(fuser::INodeNo(*parent), name)
            }
            crate::union::Forget::Inode(ino) => notifier.inval_inode(fuser::INodeNo(*ino), 0, 0),
            // (A negative offset: the attributes alone, as fuse_reverse_inval_inode reads it.)
            crate::union::Forget::Attr(ino) => notifier.inval_inode(fuser::INodeNo(*ino), -1, 0),
        },
    ));
    let mut unmounter = session.unmount_callable();
    let merged = c.merged.clone();
    let sig_union = union.clone();
    std::thread::Builder::new()
        .name("signals".into())
        .spawn(move || {
            if let Ok(sig) = sigs.wait() {
                log::info!("{sig:?}: writing cached data, then unmounting {}", merged.display());
                // A second signal during a long drain says how much is left.
                let (u2, s2) = (sig_union.clone(), sigs);
                let _ = std::thread::Builder::new()
                    .name("signals-2".into())
                    .spawn(move || {
                        while let Ok(again) = s2.wait() {
                            let left = u2.cache().map_or(0, |c| c.dirty_bytes());
                            log::warn!(
                                "{again:?} while stopping: {left} bytes of cached writes still to store (stopping when done; SIGKILL loses them)"
                            );
                        }
                    });
                if let Some(c) = sig_union.cache()
                    && let Err(e) = c.sync_all()
                {
                    log::error!("write-back before unmount: {e}");
                }
                // Mounted by us: umount(2); through fusermount3: the session's unmounter.
                if nix::mount::umount(&merged).is_err()
                    && let Err(e) = unmounter.unmount()
                {
                    log::warn!("unmount: {e}; detaching");
                    let _ = nix::mount::umount2(&merged, nix::mount::MntFlags::MNT_DETACH);
                }
                // The session normally ends now. If a copy of the mount lives on in another
                // mount namespace (one created while we were mounted), the connection stays up:
                // stop anyway, after recording our state, as a stop signal asks.
                std::thread::sleep(std::time::Duration::from_secs(5));
                log::warn!(
                    "session still alive 5 s after {sig:?} (mount held elsewhere?): exiting"
                );
                sig_union.shutdown();
                std::process::exit(0);
            }
        })
        .map_err(|e| e.to_string())?;
    // Which device our mount is, before anything can be mounted over it.
    union.note_mount_device(&c.merged);
    // The mount is live (INIT answered) and stops cleanly on a signal: tell the caller now.
    // What follows (the control socket, the kernel's readahead) is not needed to use the
    // mount: clients wait a moment for the socket.
    report(&ready, "ok\n");
    if ready.is_some() {
        drop(ready);
        detach_stdio(c.log.as_ref());
    } else if let Some(f) = &c.log {
        // Foreground with a log file: the log goes there too once the mount is live.
        stderr_to(f);
    }
    if union.quota().is_some() {
        // Allocation can change after a write returned (writeback): settle it regularly.
        let u = Arc::downgrade(&union);
        let _ = std::thread::Builder::new()
            .name("quota-settle".into())
            .spawn(move || {
                while let Some(u) = u.upgrade() {
                    u.settle_allocations();
                    drop(u);
                    std::thread::sleep(std::time::Duration::from_secs(5));
                }
            });
    }
    let _control = match crate::control::Control::start(&c.merged, union.clone()) {
        Ok(ctl) => Some(ctl),
        Err(e) => {
            log::warn!("control socket: {e} (quota/stats commands will not reach this mount)");
            None
        }
    };
    // Mounted and reported: the kernel's readahead on it (mountinfo and sysfs only, no FUSE
    // request; the caller need not wait for it: until it is set, reads get the kernel's 128K).
    let kernel_ra = union.apply_kernel_readahead();
    log::info!("mounted {}", c.merged.display());
    match union
        .uring_threads
        .load(std::sync::atomic::Ordering::Relaxed)
    {
        0 => match ring.as_ref().and_then(|r| r.why_not()) {
            Some(why) => log::info!("requests through /dev/fuse (not io_uring: {why})"),
            None => log::info!("requests through /dev/fuse"),
        },
        n => log::info!("requests through io_uring ({n} threads, pinned per CPU)"),
    }
    match kernel_ra {
        Ok(kb) => log::info!("kernel readahead on {}: {kb} KiB", c.merged.display()),
        Err(e) => log::info!("kernel readahead left as it was: {e}"),
    }
    // run() consumes the session; fuser calls destroy (our shutdown) when it ends. Make sure
    // everything cached is stored whichever way the session ended.
    let r = session.run().map_err(|e| e.to_string());
    // The ring's threads end with the connection; none may still handle a request while the
    // union shuts down.
    if let Some(r) = &ring {
        r.join(std::time::Duration::from_secs(10));
    }
    union.shutdown();
    r
}

/// mount(2) a FUSE filesystem of type `fuse.<subtype>` ourselves (fuser's own mount omits the
/// subtype), returning the /dev/fuse fd to serve.
fn own_mount(c: &Checked, mo: &[MountOption]) -> Result<OwnedFd, nix::errno::Errno> {
    use nix::mount::MsFlags;
    use std::os::fd::AsRawFd;
    let dev = nix::fcntl::open(
        "/dev/fuse",
        nix::fcntl::OFlag::O_RDWR | nix::fcntl::OFlag::O_CLOEXEC,
        nix::sys::stat::Mode::empty(),
    )?;
    let root = nix::sys::stat::stat(&c.merged)?;
    let mut flags = MsFlags::empty();
    for o in mo {
        flags |= match o {
            MountOption::NoDev => MsFlags::MS_NODEV,
            MountOption::NoSuid => MsFlags::MS_NOSUID,
            MountOption::NoExec => MsFlags::MS_NOEXEC,
            MountOption::NoAtime => MsFlags::MS_NOATIME,
            MountOption::DirSync => MsFlags::MS_DIRSYNC,
            MountOption::Sync => MsFlags::MS_SYNCHRONOUS,
            MountOption::RO => MsFlags::MS_RDONLY,
            _ => MsFlags::empty(),
        };
    }
    if !mo.contains(&MountOption::Dev) {
        flags |= MsFlags::MS_NODEV;
    }
    if !mo.contains(&MountOption::Suid) {
        flags |= MsFlags::MS_NOSUID;
    }
    let data = format!(
        "fd={},rootmode={:o},user_id={},group_id={},default_permissions,allow_other",
        dev.as_raw_fd(),
        root.st_mode & libc::S_IFMT,
        nix::unistd::getuid(),
        nix::unistd::getgid()
    );
    let fsname = c.spec.fsname.as_deref().unwrap_or("unionfs-rs");
    let fstype = format!("fuse.{}", c.spec.subtype.as_deref().unwrap_or("unionfs-rs"));
    nix::mount::mount(
        Some(fsname),
        &c.merged,
        Some(fstype.as_str()),
        flags,
        Some(data.as_str()),
    )?;
    Ok(dev)
}

/// Unmount MERGED: umount(2) as root, else `fusermount3 -u`. Unless `force`, cached writes
/// are stored first, and if they cannot be (a full upper, the quota) the mount stays: an
/// unmount now would lose them, and only the daemon's log would say so.
pub fn umount(merged: &Path, force: bool) -> Result<(), String> {
    let m = merged
        .canonicalize()
        .map_err(|e| format!("{}: {e}", merged.display()))?;
    if !is_ours(&m) {
        return Err(format!("{} is not a unionfs-rs mount", m.display()));
    }
    // The daemon's pid, to wait until it has drained and recorded its state.
    let pid = crate::control::request(&m, "stats")
        .ok()
        .and_then(|r| json_u64(&r, "pid"));
    let dev = mount_info_at(&m);
    if pid.is_some() && !force {
        store_cached_writes(&m)?;
    }
    let r = unmount_now(&m);
    if r.is_ok() && pid.is_none() {
        // No daemon answered: one killed outright left its socket.
        crate::control::remove_stale(&m);
    }
    if r.is_ok()
        && let Some(pid) = pid
    {
        // Wait while it writes cached data back, saying so every few seconds; give up only
        // when it makes no progress for a minute.
        use std::time::{Duration, Instant};
        let proc_dir = std::path::PathBuf::from(format!("/proc/{pid}"));
        let started = Instant::now();
        let mut progress_at = Instant::now();
        let mut noted_at = Instant::now();
        let mut looked_elsewhere = false;
        let mut last_dirty: Option<u64> = None;
        while proc_dir.exists() && !is_zombie(pid) {
            std::thread::sleep(Duration::from_millis(20));
            // A daemon that has not exited soon after the unmount: is its file system mounted
            // somewhere else still? Then it goes on serving that, and waiting is pointless.
            if !looked_elsewhere
                && started.elapsed() >= Duration::from_millis(200)
                && let Some(dev) = &dev
            {
                looked_elsewhere = true;
                let places = mounted_elsewhere(dev);
                if !places.is_empty() {
                    eprintln!(
                        "unionfs-rs: unmounted {}, but the same file system is still mounted at {}; \
                         the daemon (pid {pid}) goes on serving it there and exits once it is \
                         unmounted there too",
                        m.display(),
                        places.join("; ")
                    );
                    return Ok(());
                }
            }
            if noted_at.elapsed() >= Duration::from_secs(5) {
                noted_at = Instant::now();
                let dirty = crate::control::request(&m, "stats")
                    .ok()
                    .and_then(|r| json_u64(&r, "dirty_bytes"));
                if let Some(d) = dirty {
                    if last_dirty.is_none_or(|l| d < l) {
                        progress_at = Instant::now();
                    }
                    last_dirty = Some(d);
                    if d > 0 {
                        eprintln!(
                            "unionfs-rs: waiting for the daemon (pid {pid}) to write {d} bytes of cached data"
                        );
                    } else {
                        eprintln!("unionfs-rs: waiting for the daemon (pid {pid}) to finish");
                    }
                }
            }
            if progress_at.elapsed() >= Duration::from_secs(60) {
                return Err(format!(
                    "unmounted, but the daemon (pid {pid}) has made no progress for 60 s and is still running"
                ));
            }
        }
    }
    r
}

/// Have the daemon of `m` store what it caches; an error if it cannot, saying what to do.
fn store_cached_writes(m: &Path) -> Result<(), String> {
    let reply = match crate::control::request(m, "store-cached") {
        Ok(r) => r,
        // (The unmount goes ahead: the daemon stores what it caches when it stops.)
        Err(_) => return Ok(()),
    };
    let Some(err) = reply.strip_prefix("{\"error\":\"") else {
        return Ok(());
    };
    // A daemon of an older version, which stores its cache when it stops anyway.
    if err.starts_with("unknown command") {
        return Ok(());
    }
    let err = err
        .trim_end_matches("\"}")
        .replace("\\\"", "\"")
        .replace("\\\\", "\\");
    let dirty = crate::control::request(m, "stats")
        .ok()
        .and_then(|r| json_u64(&r, "dirty_bytes"))
        .map_or_else(String::new, |d| format!(" ({d} bytes)"));
    Err(format!(
        "{}: not unmounted: cached writes{dirty} cannot be stored ({err}); make room on upper \
         (or raise the quota) and unmount again, or `unionfs-rs umount --force` to unmount and \
         lose them",
        m.display()
    ))
}

/// A field of a flat JSON object (our own control replies).
fn json_u64(json: &str, key: &str) -> Option<u64> {
    let at = json.find(&format!("\"{key}\":"))? + key.len() + 3;
    let digits: String = json[at..]
        .chars()
        .take_while(|c| c.is_ascii_digit())
        .collect();
    digits.parse().ok()
}

fn is_zombie(pid: u64) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .ok()
        .and_then(|s| {
            s.rsplit(')')
                .next()
                .map(|r| r.trim_start().starts_with('Z'))
        })
        .unwrap_or(true)
}

fn unmount_now(m: &Path) -> Result<(), String> {
    match nix::mount::umount(m) {
        Ok(()) => Ok(()),
        Err(nix::errno::Errno::EPERM) => {
            let st = std::process::Command::new("fusermount3")
                .arg("-u")
                .arg(m)
                .status()
                .map_err(|e| format!("fusermount3: {e}"))?;
            if st.success() {
                Ok(())
            } else {
                Err(format!("fusermount3 -u {} failed", m.display()))
            }
        }
        Err(e) => Err(format!("umount {}: {e}", m.display())),
    }
}

/// The file system type and source of the topmost mount at `m` (canonical), if any.
fn mount_at(m: &Path) -> Option<(String, String)> {
    mount_info_at(m).map(|(_, t, src)| (t, src))
}

/// The device (`major:minor`), file system type and source of the topmost mount at `m`
/// (canonical), if any.
fn mount_info_at(m: &Path) -> Option<(String, String, String)> {
    let s = std::fs::read_to_string("/proc/self/mountinfo").ok()?;
    let want = m.to_string_lossy();
    s.lines().rev().find_map(|l| {
        let f: Vec<&str> = l.split(' ').collect();
        let sep = f.iter().position(|x| *x == "-")?;
        (unescape(f.get(4)?) == want).then(|| {
            (
                f.get(2).map_or_else(String::new, |t| t.to_string()),
                f.get(sep + 1).map_or_else(String::new, |t| t.to_string()),
                f.get(sep + 2).map_or_else(String::new, |t| unescape(t)),
            )
        })
    })
}

/// Where the file system on device `dev` (`major:minor`, as in mountinfo) is still mounted:
/// its other mount points in this mount namespace (a bind mount) and in other namespaces (one
/// process named for each). A namespace made while it was mounted (`unshare -m`, a container
/// runtime's, podman's rootless pause process) holds a copy of the mount that an unmount here
/// does not remove where mounts do not propagate (a private `/`); the daemon serves every copy
/// until the last one goes. Namespaces whose processes we may not inspect are not seen.
fn mounted_elsewhere((dev, fstype, source): &(String, String, String)) -> Vec<String> {
    let own = std::fs::read_link("/proc/self/ns/mnt").ok();
    let pids = std::fs::read_dir("/proc")
        .into_iter()
        .flatten()
        .filter_map(|e| e.ok()?.file_name().into_string().ok())
        .filter(|n| n.bytes().all(|b| b.is_ascii_digit()));
    let mut seen = std::collections::HashSet::new();
    let mut found = Vec::new();
    for pid in std::iter::once("self".to_string()).chain(pids) {
        let Ok(ns) = std::fs::read_link(format!("/proc/{pid}/ns/mnt")) else {
            continue;
        };
        if !seen.insert(ns.clone()) {
            continue;
        }
        let Ok(info) = std::fs::read_to_string(format!("/proc/{pid}/mountinfo")) else {
            continue;
        };
        let points: Vec<String> = info
            .lines()
            .filter_map(|l| {
                // The device number alone may be a new mount's: the number of one gone is
                // handed out again at once. Its type and source too.
                let f: Vec<&str> = l.split(' ').collect();
                let sep = f.iter().position(|x| *x == "-")?;
                (f.get(2)? == dev
                    && f.get(sep + 1)? == fstype
                    && unescape(f.get(sep + 2)?) == *source)
                    .then(|| unescape(f.get(4).copied().unwrap_or_default()))
            })
            .collect();
        if points.is_empty() {
            continue;
        }
        let place = if own.as_ref() == Some(&ns) {
            "in this mount namespace".to_string()
        } else {
            let comm = std::fs::read_to_string(format!("/proc/{pid}/comm")).unwrap_or_default();
            format!("in the mount namespace of pid {pid} ({})", comm.trim())
        };
        found.push(format!("{} {place}", points.join(", ")));
    }
    found
}

/// Is the topmost mount at `m` (canonical) one of ours: a FUSE mount of type
/// `fuse.unionfs-rs`, named `unionfs-rs`, or with our control socket (custom `fsname=` and
/// `subtype=`)?
pub(crate) fn is_ours(m: &Path) -> bool {
    match mount_at(m) {
        Some((t, src)) if t.starts_with("fuse") => {
            t == "fuse.unionfs-rs" || src == "unionfs-rs" || crate::control::socket_path(m).exists()
        }
        _ => false,
    }
}

pub(crate) fn unescape(s: &str) -> String {
    s.replace("\\040", " ")
        .replace("\\011", "\t")
        .replace("\\012", "\n")
        .replace("\\134", "\\")
}
