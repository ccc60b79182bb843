//! Running commands with a timeout; the mount table; finding daemon processes.

use super::*;

/// Run an unmount command; while it fails because the mount is busy, try again for up to 3 s.
/// A mount is busy for a moment whenever another test thread forks while this one has a file
/// of the mount open: the child holds a copy of the descriptor until it execs (seen with kernel
/// overlayfs mounts as well as ours, tests running two at a time).
pub fn run_unmount(
    mut cmd: impl FnMut() -> Command,
    timeout: Duration,
) -> Result<(ExitStatus, String, String), String> {
    let until = std::time::Instant::now() + Duration::from_secs(3);
    loop {
        let (st, out, err) = run_with_timeout(&mut cmd(), timeout)?;
        let busy = !st.success() && (err.contains("busy") || out.contains("busy"));
        if !busy || std::time::Instant::now() > until {
            return Ok((st, out, err));
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Run a command with stdin closed, killing it after `timeout`. Returns (status, stdout, stderr);
/// `Err` if it could not be started or had to be killed.
pub fn run_with_timeout(
    cmd: &mut Command,
    timeout: Duration,
) -> Result<(ExitStatus, String, String), String> {
    let dir = tempfile::tempdir().map_err(|e| e.to_string())?;
    let out_path = dir.path().join("out");
    let err_path = dir.path().join("err");
    let out = fs::File::create(&out_path).map_err(|e| e.to_string())?;
    let err = fs::File::create(&err_path).map_err(|e| e.to_string())?;
    // Files, not pipes: a daemon forked by the command may keep inherited fds open forever.
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(out)
        .stderr(err)
        .spawn()
        .map_err(|e| format!("cannot start {cmd:?}: {e}"))?;
    let start = Instant::now();
    let status = loop {
        if let Some(st) = child.try_wait().map_err(|e| e.to_string())? {
            break st;
        }
        if start.elapsed() > timeout {
            let _ = child.kill();
            let _ = child.wait();
            return Err(format!("{cmd:?} did not finish within {timeout:?}; killed"));
        }
        thread::sleep(Duration::from_millis(10));
    };
    let stdout = fs::read_to_string(&out_path).unwrap_or_default();
    let stderr = fs::read_to_string(&err_path).unwrap_or_default();
    Ok((status, stdout, stderr))
}

pub(super) fn unescape_mountinfo(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'\\' && i + 4 <= b.len() {
            let oct = std::str::from_utf8(&b[i + 1..i + 4]).unwrap_or("");
            if let Ok(v) = u8::from_str_radix(oct, 8) {
                out.push(v);
                i += 4;
                continue;
            }
        }
        out.push(b[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// One line of /proc/self/mountinfo.
#[derive(Clone, Debug)]
pub struct MountInfo {
    pub dev: (u32, u32),
    pub mount_point: PathBuf,
    pub mount_opts: String,
    pub fstype: String,
    pub source: String,
    pub super_opts: String,
}

pub fn mountinfo() -> Vec<MountInfo> {
    let text = fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
    let mut v = Vec::new();
    for line in text.lines() {
        let Some((left, right)) = line.split_once(" - ") else {
            continue;
        };
        let l: Vec<&str> = left.split(' ').collect();
        let r: Vec<&str> = right.split(' ').collect();
        if l.len() < 6 || r.len() < 3 {
            continue;
        }
        let mut dev = (0, 0);
        if let Some((a, b)) = l[2].split_once(':') {
            dev = (a.parse().unwrap_or(0), b.parse().unwrap_or(0));
        }
        v.push(MountInfo {
            dev,
            mount_point: PathBuf::from(unescape_mountinfo(l[4])),
            mount_opts: l[5].to_string(),
            fstype: r[0].to_string(),
            source: unescape_mountinfo(r[1]),
            super_opts: r[2].to_string(),
        });
    }
    v
}

/// The topmost mount whose mount point is `path` (last in mountinfo order), if any.
pub fn mount_at(path: &Path) -> Option<MountInfo> {
    mountinfo()
        .into_iter()
        .rev()
        .find(|m| m.mount_point == path)
}

pub(super) fn mount_device(path: &Path) -> Option<(u32, u32)> {
    mount_at(path).map(|m| m.dev)
}

/// Is there a FUSE filesystem (fstype `fuse` or `fuse.*`) mounted at `path`?
pub fn is_fuse_mounted(path: &Path) -> bool {
    mount_at(path).is_some_and(|m| m.fstype == "fuse" || m.fstype.starts_with("fuse."))
}

pub fn is_mounted(path: &Path) -> bool {
    mount_at(path).is_some()
}

/// Pids of processes (other than this one) whose command line mentions `needle` in an argument
/// (as the whole argument, or as part of one such as `-o upperdir=...`).
pub fn pids_mentioning(needle: &Path) -> Vec<i32> {
    let me = std::process::id() as i32;
    let needle = needle.as_os_str().as_bytes();
    let mut pids = Vec::new();
    let Ok(rd) = fs::read_dir("/proc") else {
        return pids;
    };
    for e in rd.flatten() {
        let Some(pid) = e.file_name().to_str().and_then(|s| s.parse::<i32>().ok()) else {
            continue;
        };
        if pid == me || !process_alive(pid) {
            continue;
        }
        let Ok(cmdline) = fs::read(format!("/proc/{pid}/cmdline")) else {
            continue;
        };
        let hit = cmdline
            .split(|&b| b == 0)
            .any(|arg| arg.windows(needle.len()).any(|w| w == needle) && !needle.is_empty());
        if hit {
            pids.push(pid);
        }
    }
    pids
}

/// Pids of FUSE daemons serving `merged`: processes whose command line mentions the path and
/// that hold `/dev/fuse` open.
pub fn daemon_pids(merged: &Path) -> Vec<i32> {
    pids_mentioning(merged)
        .into_iter()
        .filter(|pid| holds_dev_fuse(*pid))
        .collect()
}

pub(super) fn holds_dev_fuse(pid: i32) -> bool {
    let Ok(rd) = fs::read_dir(format!("/proc/{pid}/fd")) else {
        return false;
    };
    rd.flatten().any(|e| {
        fs::read_link(e.path())
            .map(|t| t == Path::new("/dev/fuse"))
            .unwrap_or(false)
    })
}

/// Alive = exists and is not a zombie.
pub fn process_alive(pid: i32) -> bool {
    match fs::read_to_string(format!("/proc/{pid}/stat")) {
        Ok(stat) => {
            // state is the first field after the parenthesised comm
            let state = stat
                .rsplit_once(')')
                .and_then(|(_, rest)| rest.trim_start().chars().next());
            !matches!(state, Some('Z') | Some('X') | None)
        }
        Err(_) => false,
    }
}

/// Wait up to `timeout` for `pid` to exit. True if it is gone.
pub fn wait_pid_gone(pid: i32, timeout: Duration) -> bool {
    let start = Instant::now();
    while start.elapsed() < timeout {
        if !process_alive(pid) {
            return true;
        }
        thread::sleep(Duration::from_millis(20));
    }
    !process_alive(pid)
}

pub(super) fn tail(path: &Path, max: usize) -> String {
    let s = fs::read_to_string(path).unwrap_or_default();
    if s.len() > max {
        let mut cut = s.len() - max;
        while !s.is_char_boundary(cut) {
            cut += 1;
        }
        format!("...{}", &s[cut..])
    } else {
        s
    }
}

/// (used bytes, used inodes) of the quota of the mount at `merged` (`quota report --json`).
pub fn quota_used(merged: &Path) -> (u64, u64) {
    let out = Command::new(bin())
        .args(["quota", "report", "--json"])
        .arg(merged)
        .output()
        .expect("run quota report");
    assert!(
        out.status.success(),
        "quota report failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8_lossy(&out.stdout);
    let used = |key: &str| -> u64 {
        text.split(&format!("\"{key}\":{{\"used\":"))
            .nth(1)
            .and_then(|r| r.split(|c: char| !c.is_ascii_digit()).next())
            .and_then(|n| n.parse().ok())
            .unwrap_or_else(|| panic!("no {key} usage in {text}"))
    };
    (used("blocks"), used("inodes"))
}

/// `unionfs-rs stats --json MERGED` as numbers (the `mount` string is left out).
pub fn daemon_stats(merged: &Path) -> HashMap<String, u64> {
    let out = Command::new(bin())
        .args(["stats", "--json"])
        .arg(merged)
        .output()
        .expect("run stats");
    assert!(
        out.status.success(),
        "stats failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8_lossy(&out.stdout);
    let mut m = HashMap::new();
    for kv in text
        .trim()
        .trim_matches(|c| c == '{' || c == '}')
        .split(',')
    {
        if let Some((k, v)) = kv.split_once(':')
            && let Ok(n) = v.trim().parse::<u64>()
        {
            m.insert(k.trim().trim_matches('"').to_string(), n);
        }
    }
    m
}
