//! Mount guards: unionfs-rs (`Mount`) and kernel overlayfs (`OverlayMount`).

use super::*;

#[derive(Clone, Debug, Default)]
pub struct MountOpts {
    /// `--userxattr`
    pub userxattr: bool,
    /// Read-only union: `mount LOWERS MERGED` (upper/work unused).
    pub readonly: bool,
    /// Extra arguments appended to the command line.
    pub extra: Vec<String>,
    /// Kernel overlayfs only: options appended to the defaults (a later one wins).
    pub kernel_extra: String,
}

/// A live unionfs-rs mount. Drop unmounts (fusermount3 -u, then umount -l) and kills the daemon
/// if it is still alive afterwards.
pub struct Mount {
    pub dirs: Dirs,
    pub merged: PathBuf,
    pub pid: Option<i32>,
    pub log: PathBuf,
    reg: usize,
    mounted: bool,
}

pub(super) static MOUNT_SEQ: AtomicUsize = AtomicUsize::new(0);

impl Mount {
    /// Build fresh dirs from the descriptions and mount them. Panics if mounting fails.
    pub fn new(lowers: &[Vec<Entry>], upper: &[Entry]) -> Mount {
        let dirs = Dirs::new(lowers, upper);
        Mount::start(&dirs, &MountOpts::default()).unwrap_or_else(|e| panic!("{e}"))
    }

    /// One lower layer built from `lower`, an empty upper, and `args` added to the mount
    /// command. Panics if mounting fails.
    pub fn with_args(lower: Vec<Entry>, args: &[&str]) -> Mount {
        Mount::on(&Dirs::new(&[lower], &[]), args)
    }

    /// Mount `dirs` with `args` added to the mount command. Panics if mounting fails.
    pub fn on(dirs: &Dirs, args: &[&str]) -> Mount {
        let opts = MountOpts {
            extra: args.iter().map(|s| s.to_string()).collect(),
            ..MountOpts::default()
        };
        Mount::start(dirs, &opts).unwrap_or_else(|e| panic!("{e}"))
    }

    /// The arguments `unionfs-rs` is run with for `dirs` and `opts`.
    pub fn command_args(dirs: &Dirs, opts: &MountOpts) -> Vec<String> {
        let mut args = vec!["mount".to_string(), dirs.lowerdir_arg()];
        if !opts.readonly {
            args.push(dirs.upper.to_str().unwrap().to_string());
        }
        args.push(dirs.merged.to_str().unwrap().to_string());
        if !opts.readonly {
            args.push("--workdir".into());
            args.push(dirs.work.to_str().unwrap().to_string());
        }
        if opts.userxattr {
            args.push("--userxattr".into());
        }
        args.extend(opts.extra.iter().cloned());
        args
    }

    /// Mount `dirs` with unionfs-rs (standard `mount` CLI form).
    pub fn start(dirs: &Dirs, opts: &MountOpts) -> Result<Mount, String> {
        Self::start_args(dirs, &Self::command_args(dirs, opts))
    }

    /// Mount by running `unionfs-rs ARGS` (any CLI form); `dirs.merged` must be the mount point.
    pub fn start_args(dirs: &Dirs, args: &[String]) -> Result<Mount, String> {
        let seq = MOUNT_SEQ.fetch_add(1, Ordering::SeqCst);
        let log = dirs.root.join(format!("unionfs-mount-{seq}.log"));
        let logf = fs::File::create(&log).map_err(|e| e.to_string())?;
        let logf2 = logf.try_clone().map_err(|e| e.to_string())?;
        // The background daemon's own log goes to the same file (shown when a test fails).
        let mut args = args.to_vec();
        if args.first().map(String::as_str) == Some("mount")
            && !args
                .iter()
                .any(|a| a == "--log-file" || a.contains("log_file="))
        {
            args.extend(["--log-file".into(), log.to_str().unwrap().to_string()]);
        }
        let args = &args[..];
        let mut child = Command::new(bin())
            .args(args)
            .stdin(Stdio::null())
            .stdout(logf)
            .stderr(logf2)
            .spawn()
            .map_err(|e| format!("cannot run {}: {e}", bin().display()))?;
        let start = Instant::now();
        let status = loop {
            if let Some(st) = child.try_wait().map_err(|e| e.to_string())? {
                break st;
            }
            if start.elapsed() > MOUNT_CMD_TIMEOUT {
                let _ = child.kill();
                let _ = child.wait();
                let mut m = Mount::adopt(dirs, log.clone());
                m.cleanup();
                return Err(format!(
                    "`unionfs-rs {}` hung for more than {MOUNT_CMD_TIMEOUT:?}; log:\n{}",
                    args.join(" "),
                    tail(&log, 4000)
                ));
            }
            thread::sleep(Duration::from_millis(10));
        };
        if !status.success() {
            let mut m = Mount::adopt(dirs, log.clone());
            m.cleanup();
            return Err(format!(
                "`unionfs-rs {}` failed with {status}; output:\n{}",
                args.join(" "),
                tail(&log, 4000)
            ));
        }
        // The contract says the command returns once the mount is live; allow a little slack
        // here (cli.rs checks the strict form).
        let deadline = Instant::now() + Duration::from_secs(10);
        while !is_fuse_mounted(&dirs.merged) {
            if Instant::now() > deadline {
                let mut m = Mount::adopt(dirs, log.clone());
                m.cleanup();
                return Err(format!(
                    "`unionfs-rs {}` exited 0 but no FUSE mount appeared at {}; output:\n{}",
                    args.join(" "),
                    dirs.merged.display(),
                    tail(&log, 4000)
                ));
            }
            thread::sleep(Duration::from_millis(20));
        }
        Ok(Mount::adopt(dirs, log))
    }

    /// Take charge of whatever is mounted at `dirs.merged` (mounted by other means), so that it
    /// is unmounted and its daemon stopped on drop.
    pub fn adopt_existing(dirs: &Dirs) -> Mount {
        let mut m = Mount::adopt(dirs, dirs.root.join("no-log"));
        m.mounted = is_mounted(&dirs.merged);
        m
    }

    fn adopt(dirs: &Dirs, log: PathBuf) -> Mount {
        let pid = daemon_pids(&dirs.merged).into_iter().next();
        let reg = register(&dirs.merged, LiveKind::Fuse { pid });
        Mount {
            dirs: dirs.clone(),
            merged: dirs.merged.clone(),
            pid,
            log,
            reg,
            mounted: true,
        }
    }

    /// Path inside the merged view.
    pub fn path(&self, rel: &str) -> PathBuf {
        self.merged.join(rel)
    }

    /// The daemon's output so far (stdout+stderr of the mount command and whatever the daemon
    /// kept writing to them).
    pub fn log_text(&self) -> String {
        tail(&self.log, 8000)
    }

    /// Unmount with `fusermount3 -u` and wait for the daemon to exit. Errors (instead of falling
    /// back to force) if either step does not happen; the guard still cleans up on drop.
    pub fn unmount(mut self) -> Result<(), String> {
        let merged = self.merged.clone();
        let r = self.unmount_retrying(|| {
            let mut c = Command::new("fusermount3");
            c.arg("-u").arg(&merged);
            c
        });
        self.cleanup();
        r
    }

    /// [`Mount::unmount_with`], the command tried again while the mount is busy for a moment
    /// ([`run_unmount`]).
    pub fn unmount_retrying(&mut self, cmd: impl FnMut() -> Command) -> Result<(), String> {
        let (st, out, err) = run_unmount(cmd, Duration::from_secs(20))?;
        if !st.success() {
            return Err(format!("unmount failed: {st}\n{out}{err}"));
        }
        self.after_unmount()
    }

    /// Unmount using the given command (e.g. `unionfs-rs umount M`, `umount M`) and check that the
    /// mount disappears and the daemon exits by itself.
    pub fn unmount_with(&mut self, cmd: &mut Command) -> Result<(), String> {
        let (st, out, err) = run_with_timeout(cmd, Duration::from_secs(20))?;
        if !st.success() {
            return Err(format!("{cmd:?} failed: {st}\n{out}{err}"));
        }
        self.after_unmount()
    }

    /// The mount is gone and the daemon exits by itself.
    fn after_unmount(&mut self) -> Result<(), String> {
        if is_fuse_mounted(&self.merged) {
            return Err(format!(
                "unmount succeeded but {} is still mounted",
                self.merged.display()
            ));
        }
        self.mounted = false;
        match self.pid {
            Some(pid) => {
                if !wait_pid_gone(pid, DAEMON_EXIT_TIMEOUT) {
                    return Err(format!(
                        "daemon pid {pid} still alive {DAEMON_EXIT_TIMEOUT:?} after unmount"
                    ));
                }
            }
            None => {
                let left = daemon_pids(&self.merged);
                if !left.is_empty() {
                    for p in &left {
                        if !wait_pid_gone(*p, DAEMON_EXIT_TIMEOUT) {
                            return Err(format!("daemon pid {p} still alive after unmount"));
                        }
                    }
                }
            }
        }
        Ok(())
    }

    fn cleanup(&mut self) {
        if self.mounted || is_fuse_mounted(&self.merged) {
            let ok = run_with_timeout(
                Command::new("fusermount3").arg("-u").arg(&self.merged),
                Duration::from_secs(10),
            )
            .map(|(st, _, _)| st.success())
            .unwrap_or(false);
            if !ok && is_mounted(&self.merged) {
                let _ = run_with_timeout(
                    Command::new("umount").arg("-l").arg(&self.merged),
                    Duration::from_secs(10),
                );
            }
            self.mounted = false;
        }
        let mut pids: Vec<i32> = self.pid.into_iter().collect();
        pids.extend(daemon_pids(&self.merged));
        pids.sort();
        pids.dedup();
        for pid in pids {
            if !wait_pid_gone(pid, Duration::from_secs(5)) {
                eprintln!(
                    "warning: unionfs-rs daemon {pid} for {} did not exit after unmount; killing",
                    self.merged.display()
                );
                unsafe {
                    libc::kill(pid, libc::SIGKILL);
                }
                wait_pid_gone(pid, Duration::from_secs(5));
            }
        }
        unregister(self.reg);
    }
}

impl Drop for Mount {
    fn drop(&mut self) {
        if thread::panicking() {
            eprintln!(
                "--- unionfs-rs log for {} ---\n{}\n--- end of log ---",
                self.merged.display(),
                self.log_text()
            );
        }
        self.cleanup();
    }
}

// ---------------------------------------------------------------------------------------------
// Kernel overlayfs mount guard
// ---------------------------------------------------------------------------------------------

/// A kernel overlayfs mount of `dirs` (the reference implementation). Options are pinned
/// (index, redirect_dir, metacopy off; xino off) so the reference does not depend on module
/// parameters.
pub struct OverlayMount {
    pub dirs: Dirs,
    pub merged: PathBuf,
    reg: usize,
    mounted: bool,
}

impl OverlayMount {
    pub fn new(lowers: &[Vec<Entry>], upper: &[Entry]) -> OverlayMount {
        let dirs = Dirs::new(lowers, upper);
        OverlayMount::start(&dirs, &MountOpts::default()).unwrap_or_else(|e| panic!("{e}"))
    }

    pub fn start(dirs: &Dirs, opts: &MountOpts) -> Result<OverlayMount, String> {
        let mut o = format!("lowerdir={}", dirs.lowerdir_arg());
        if !opts.readonly {
            o += &format!(
                ",upperdir={},workdir={}",
                dirs.upper.display(),
                dirs.work.display()
            );
        }
        // redirect_dir: never create redirects ("off" still follows existing ones; userxattr
        // mode requires "nofollow").
        if opts.userxattr {
            o += ",userxattr,redirect_dir=nofollow";
        } else {
            o += ",redirect_dir=off";
        }
        o += ",index=off,metacopy=off,xino=off";
        if !opts.kernel_extra.is_empty() {
            o += ",";
            o += &opts.kernel_extra;
        }
        let (st, out, err) = run_with_timeout(
            Command::new("mount")
                .args(["-t", "overlay", "overlay", "-o", &o])
                .arg(&dirs.merged),
            Duration::from_secs(20),
        )?;
        if !st.success() {
            return Err(format!("kernel overlay mount failed ({st}): {out}{err}"));
        }
        let reg = register(&dirs.merged, LiveKind::Kernel);
        Ok(OverlayMount {
            dirs: dirs.clone(),
            merged: dirs.merged.clone(),
            reg,
            mounted: true,
        })
    }

    pub fn path(&self, rel: &str) -> PathBuf {
        self.merged.join(rel)
    }

    pub fn unmount(mut self) -> Result<(), String> {
        let merged = self.merged.clone();
        let r = run_unmount(
            || {
                let mut c = Command::new("umount");
                c.arg(&merged);
                c
            },
            Duration::from_secs(20),
        )
        .and_then(|(st, o, e)| {
            if st.success() {
                Ok(())
            } else {
                Err(format!("umount failed: {o}{e}"))
            }
        });
        if r.is_ok() {
            self.mounted = false;
        }
        self.cleanup();
        r
    }

    fn cleanup(&mut self) {
        if self.mounted {
            let ok = run_with_timeout(
                Command::new("umount").arg(&self.merged),
                Duration::from_secs(10),
            )
            .map(|(st, _, _)| st.success())
            .unwrap_or(false);
            if !ok {
                let _ = run_with_timeout(
                    Command::new("umount").arg("-l").arg(&self.merged),
                    Duration::from_secs(10),
                );
            }
            self.mounted = false;
        }
        unregister(self.reg);
    }
}

impl Drop for OverlayMount {
    fn drop(&mut self) {
        self.cleanup();
    }
}

/// A shared, writable mapping of the first `len` bytes of an open file, unmapped on drop.
pub struct SharedMap {
    ptr: *mut libc::c_void,
    len: usize,
}

impl SharedMap {
    pub fn new(f: &fs::File, len: usize) -> SharedMap {
        // SAFETY: a fresh shared mapping of an open descriptor; Drop unmaps it.
        let ptr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                std::os::fd::AsRawFd::as_raw_fd(f),
                0,
            )
        };
        assert_ne!(
            ptr,
            libc::MAP_FAILED,
            "mmap: {}",
            io::Error::last_os_error()
        );
        SharedMap { ptr, len }
    }

    /// The mapped bytes.
    pub fn bytes(&mut self) -> &mut [u8] {
        // SAFETY: ptr maps len writable bytes for the life of self.
        unsafe { std::slice::from_raw_parts_mut(self.ptr as *mut u8, self.len) }
    }

    /// msync(MS_SYNC); returns its errno, 0 on success.
    #[must_use = "the errno of msync"]
    pub fn sync(&self) -> i32 {
        // SAFETY: the mapping made in new().
        if unsafe { libc::msync(self.ptr, self.len, libc::MS_SYNC) } == 0 {
            0
        } else {
            io::Error::last_os_error().raw_os_error().unwrap_or(-1)
        }
    }
}

impl Drop for SharedMap {
    fn drop(&mut self) {
        // SAFETY: the mapping made in new(), unmapped once.
        unsafe {
            libc::munmap(self.ptr, self.len);
        }
    }
}

/// A mount of `dirs` with default options: kernel overlayfs (the reference) or ours. Returns the
/// merged dir and what unmounts it (checking that it went, and for ours that the daemon exited).
/// Dropped without calling that, the guard inside still unmounts.
pub fn mount_either(dirs: &Dirs, kernel: bool) -> (PathBuf, Box<dyn FnOnce()>) {
    if kernel {
        let k = OverlayMount::start(dirs, &MountOpts::default()).unwrap_or_else(|e| panic!("{e}"));
        (
            k.merged.clone(),
            Box::new(move || k.unmount().expect("umount kernel overlayfs")),
        )
    } else {
        let m = Mount::start(dirs, &MountOpts::default()).unwrap_or_else(|e| panic!("{e}"));
        (
            m.merged.clone(),
            Box::new(move || m.unmount().expect("umount unionfs-rs")),
        )
    }
}

/// `run` on kernel overlayfs over `lower`, then on unionfs-rs mounted with each of `configs`
/// (extra arguments): each must give what the kernel gave, which is returned.
pub fn against_kernel<T: PartialEq + std::fmt::Debug>(
    lower: &[Entry],
    configs: &[&[&str]],
    run: impl Fn(&Path) -> T,
) -> T {
    let d = Dirs::new(&[lower.to_vec()], &[]);
    let (merged, unmount) = mount_either(&d, true);
    let kernel = run(&merged);
    unmount();
    for args in configs {
        let m = Mount::with_args(lower.to_vec(), args);
        assert_eq!(
            run(&m.merged),
            kernel,
            "{args:?} (left) against kernel overlayfs"
        );
        m.unmount().unwrap_or_else(|e| panic!("{e}"));
    }
    kernel
}
