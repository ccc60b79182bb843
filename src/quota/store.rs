//! The quota state file `workdir/unionfs/quota`: limits, usage, grace timers and a clean flag,
//! as `key=value` lines, replaced atomically (write, fsync, rename).

use std::io::Write;
use std::path::Path;

use nix::errno::Errno;

use super::Limits;

/// What the state file holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct State {
    /// Limits.
    pub limits: Limits,
    /// Usage in bytes when written.
    pub used_bytes: u64,
    /// Inodes when written.
    pub used_inodes: u64,
    /// Grace expiries.
    pub timers: (Option<u64>, Option<u64>),
    /// Written by a clean unmount: usage is exact.
    pub clean: bool,
    /// The errno chosen for refusals.
    pub errno: Errno,
}

/// Write a full state (with the errno when known).
pub fn save_state(path: &Path, s: &State, errno: Option<Errno>) -> std::io::Result<()> {
    let l = &s.limits;
    let errno_name = match errno.unwrap_or(s.errno) {
        Errno::EDQUOT => "edquot",
        _ => "enospc",
    };
    let text = format!(
        "# unionfs-rs project quota state (do not edit while mounted)\nversion=1\nproject_id={}\nbsoft={}\nbhard={}\nisoft={}\nihard={}\nbgrace={}\nigrace={}\nbtimer={}\nitimer={}\nused_bytes={}\nused_inodes={}\nerrno={}\nclean={}\n",
        l.project_id,
        l.bsoft,
        l.bhard,
        l.isoft,
        l.ihard,
        l.bgrace,
        l.igrace,
        s.timers.0.unwrap_or(0),
        s.timers.1.unwrap_or(0),
        s.used_bytes,
        s.used_inodes,
        errno_name,
        u8::from(s.clean),
    );
    let tmp = path.with_extension("tmp");
    {
        let mut f = private_file(&tmp)?;
        f.write_all(text.as_bytes())?;
        f.sync_all()?;
    }
    std::fs::rename(&tmp, path)
}

/// Create (truncate) a file only its owner can read: our bookkeeping, not user data.
pub fn private_file(p: &Path) -> std::io::Result<std::fs::File> {
    use std::os::unix::fs::OpenOptionsExt;
    std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(p)
}

/// Read the state file; `Ok(None)` if there is none.
pub fn load(path: &Path) -> std::io::Result<Option<State>> {
    let text = match std::fs::read_to_string(path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(e),
    };
    let mut s = State {
        limits: Limits::default(),
        used_bytes: 0,
        used_inodes: 0,
        timers: (None, None),
        clean: false,
        errno: Errno::ENOSPC,
    };
    for line in text.lines() {
        let Some((k, v)) = line.split_once('=') else {
            continue;
        };
        let n = || v.trim().parse::<u64>().unwrap_or(0);
        let t = |x: u64| if x == 0 { None } else { Some(x) };
        match k.trim() {
            "project_id" => s.limits.project_id = n() as u32,
            "bsoft" => s.limits.bsoft = n(),
            "bhard" => s.limits.bhard = n(),
            "isoft" => s.limits.isoft = n(),
            "ihard" => s.limits.ihard = n(),
            "bgrace" => s.limits.bgrace = n(),
            "igrace" => s.limits.igrace = n(),
            "btimer" => s.timers.0 = t(n()),
            "itimer" => s.timers.1 = t(n()),
            "used_bytes" => s.used_bytes = n(),
            "used_inodes" => s.used_inodes = n(),
            "clean" => s.clean = n() == 1,
            "errno" => {
                s.errno = if v.trim() == "edquot" {
                    Errno::EDQUOT
                } else {
                    Errno::ENOSPC
                }
            }
            _ => {}
        }
    }
    Ok(Some(s))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn roundtrip() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("quota");
        assert_eq!(load(&p).unwrap(), None);
        let st = State {
            limits: Limits {
                project_id: 7,
                bsoft: 1,
                bhard: 2,
                isoft: 3,
                ihard: 4,
                bgrace: 5,
                igrace: 6,
            },
            used_bytes: 8192,
            used_inodes: 3,
            timers: (Some(99), None),
            clean: true,
            errno: Errno::EDQUOT,
        };
        save_state(&p, &st, None).unwrap();
        assert_eq!(load(&p).unwrap(), Some(st));
    }
}
