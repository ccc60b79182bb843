//! The quota state file `workdir/unionfs/quota`: limits, usage, grace timers and a clean flag,
//! as `key=value` lines, replaced atomically (write, fsync, rename); and [`StateFile`], how
//! every file of the daemon's bookkeeping dir `workdir/unionfs/` is reached.

use std::io::Write;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use nix::errno::Errno;
use nix::fcntl::OFlag;
use nix::sys::stat::Mode;

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

/// Open the daemon's bookkeeping dir `name` in the workdir (`dir`), never through a symlink,
/// and only if it is ours: a root daemon writes there, and whoever may write to the workdir
/// must not point those writes elsewhere (a symlink `unionfs -> /etc`, a directory of theirs
/// to plant links in). `shown` names it in messages.
pub fn open_book_dir(
    dir: BorrowedFd<'_>,
    name: &str,
    shown: &Path,
) -> std::io::Result<Arc<OwnedFd>> {
    let err = |e: Errno, what: &str| {
        std::io::Error::new(
            std::io::Error::from(e).kind(),
            format!("{}: {what}: {e}", shown.display()),
        )
    };
    let fd = nix::fcntl::openat(
        dir,
        name,
        OFlag::O_RDONLY | OFlag::O_DIRECTORY | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC,
        Mode::empty(),
    )
    .map_err(|e| match e {
        Errno::ELOOP | Errno::ENOTDIR => err(e, "not a directory (a symlink?)"),
        e => err(e, "open"),
    })?;
    let st = nix::sys::stat::fstat(fd.as_fd()).map_err(|e| err(e, "stat"))?;
    check_ours(&st, shown)?;
    Ok(Arc::new(fd))
}

/// What [`open_book_dir`] checks, without opening or making anything: `name` in `dir`, if it
/// is there, is a directory (not a link) of ours that only we may write to. Run before the
/// mount makes anything in the workdir, so that a mount refused for what is there leaves the
/// workdir as it found it.
pub fn check_book_dir(dir: BorrowedFd<'_>, name: &str, shown: &Path) -> std::io::Result<()> {
    let st = match nix::sys::stat::fstatat(dir, name, nix::fcntl::AtFlags::AT_SYMLINK_NOFOLLOW) {
        Ok(st) => st,
        Err(Errno::ENOENT) => return Ok(()),
        Err(e) => {
            return Err(std::io::Error::new(
                std::io::Error::from(e).kind(),
                format!("{}: stat: {e}", shown.display()),
            ));
        }
    };
    if st.st_mode & libc::S_IFMT != libc::S_IFDIR {
        return Err(std::io::Error::new(
            std::io::ErrorKind::InvalidInput,
            format!("{}: not a directory (a symlink?)", shown.display()),
        ));
    }
    check_ours(&st, shown)
}

/// A directory the daemon writes in must be its user's and writable by it alone: whoever else
/// may write there can swap what the daemon made for links to files of their choice.
fn check_ours(st: &nix::sys::stat::FileStat, shown: &Path) -> std::io::Result<()> {
    let me = nix::unistd::geteuid().as_raw();
    if st.st_uid != me || st.st_mode & 0o022 != 0 {
        return Err(std::io::Error::new(
            std::io::ErrorKind::PermissionDenied,
            format!(
                "{}: owned by uid {} with mode {:o}; it must be ours (uid {me}) and writable by us \
                 alone (remove it: the daemon recreates it)",
                shown.display(),
                st.st_uid,
                st.st_mode & 0o7777
            ),
        ));
    }
    Ok(())
}

/// A file of the bookkeeping dir, reached through the dir's fd by its single name, never
/// through a symlink, and never written in place when it may be another file's link: state
/// is replaced by a new file renamed over it, and a log appended to must be a regular file
/// with one name.
#[derive(Debug, Clone)]
pub struct StateFile {
    dir: Arc<OwnedFd>,
    name: &'static str,
    shown: PathBuf,
}

impl StateFile {
    /// `name` in the bookkeeping dir `dir` (opened by [`open_book_dir`]), `shown` as its path.
    pub fn new(dir: Arc<OwnedFd>, name: &'static str, shown: PathBuf) -> StateFile {
        StateFile { dir, name, shown }
    }

    /// Its path, for messages.
    pub fn shown(&self) -> &Path {
        &self.shown
    }

    fn err(&self, e: Errno, what: &str) -> std::io::Error {
        if e == Errno::ELOOP {
            return std::io::Error::new(
                std::io::ErrorKind::InvalidData,
                format!(
                    "{}: a symlink, which is never followed here (remove it: the daemon recreates it)",
                    self.shown.display()
                ),
            );
        }
        std::io::Error::new(
            std::io::Error::from(e).kind(),
            format!("{}: {what}: {e}", self.shown.display()),
        )
    }

    /// The whole content; `Ok(None)` if there is no such file.
    pub fn read(&self) -> std::io::Result<Option<Vec<u8>>> {
        use std::io::Read;
        let fd = match nix::fcntl::openat(
            self.dir.as_fd(),
            self.name,
            OFlag::O_RDONLY | OFlag::O_NOFOLLOW | OFlag::O_NONBLOCK | OFlag::O_CLOEXEC,
            Mode::empty(),
        ) {
            Ok(fd) => fd,
            Err(Errno::ENOENT) => return Ok(None),
            Err(e) => return Err(self.err(e, "open")),
        };
        let st = nix::sys::stat::fstat(fd.as_fd()).map_err(|e| self.err(e, "stat"))?;
        if st.st_mode & libc::S_IFMT != libc::S_IFREG {
            return Err(self.err(Errno::EINVAL, "not a regular file"));
        }
        let mut buf = Vec::new();
        std::fs::File::from(fd).read_to_end(&mut buf)?;
        Ok(Some(buf))
    }

    /// Replace the content atomically: a new file (`NAME.tmp`, created afresh), synced, then
    /// renamed over the old one.
    pub fn replace(&self, data: &[u8]) -> std::io::Result<()> {
        let tmp = format!("{}.tmp", self.name);
        let dir = self.dir.as_fd();
        match nix::unistd::unlinkat(dir, tmp.as_str(), nix::unistd::UnlinkatFlags::NoRemoveDir) {
            Ok(()) | Err(Errno::ENOENT) => {}
            Err(e) => return Err(self.err(e, "remove the old scratch copy")),
        }
        let fd = nix::fcntl::openat(
            dir,
            tmp.as_str(),
            OFlag::O_WRONLY | OFlag::O_CREAT | OFlag::O_EXCL | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC,
            Mode::from_bits_truncate(0o600),
        )
        .map_err(|e| self.err(e, "create the new copy"))?;
        let mut f = std::fs::File::from(fd);
        f.write_all(data)?;
        f.sync_all()?;
        nix::fcntl::renameat(dir, tmp.as_str(), dir, self.name)
            .map_err(|e| self.err(e, "rename the new copy into place"))
    }

    /// Rename it to `NAME.SUFFIX` (kept for a person to look at), replacing an older one.
    pub fn set_aside(&self, suffix: &str) -> std::io::Result<PathBuf> {
        let to = format!("{}.{suffix}", self.name);
        nix::fcntl::renameat(self.dir.as_fd(), self.name, self.dir.as_fd(), to.as_str())
            .map_err(|e| self.err(e, "set aside"))?;
        Ok(self.shown.with_file_name(to))
    }

    /// Open for appending (created if absent): a regular file with this one name only.
    pub fn open_append(&self) -> std::io::Result<std::fs::File> {
        let fd = nix::fcntl::openat(
            self.dir.as_fd(),
            self.name,
            OFlag::O_WRONLY
                | OFlag::O_APPEND
                | OFlag::O_CREAT
                | OFlag::O_NOFOLLOW
                | OFlag::O_NONBLOCK
                | OFlag::O_CLOEXEC,
            Mode::from_bits_truncate(0o600),
        )
        .map_err(|e| self.err(e, "open"))?;
        let st = nix::sys::stat::fstat(fd.as_fd()).map_err(|e| self.err(e, "stat"))?;
        if st.st_mode & libc::S_IFMT != libc::S_IFREG || st.st_nlink != 1 {
            return Err(self.err(
                Errno::EINVAL,
                "not a regular file with one name (remove it: the daemon recreates it)",
            ));
        }
        Ok(std::fs::File::from(fd))
    }
}

/// Write a full state (with the errno when known).
pub fn save_state(file: &StateFile, s: &State, errno: Option<Errno>) -> std::io::Result<()> {
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
    file.replace(text.as_bytes())
}

/// Read the state file; `Ok(None)` if there is none.
pub fn load(file: &StateFile) -> std::io::Result<Option<State>> {
    let Some(bytes) = file.read()? else {
        return Ok(None);
    };
    parse(&String::from_utf8_lossy(&bytes))
        .map(Some)
        .map_err(|why| {
            std::io::Error::new(
                std::io::ErrorKind::InvalidData,
                format!("{}: {why}", file.shown().display()),
            )
        })
}

/// The state in `text`; what is wrong with it otherwise (a file that is not one we wrote,
/// or damaged: every line is a comment, blank, or a known `key=number`, with `version=1`).
fn parse(text: &str) -> Result<State, String> {
    let mut s = State {
        limits: Limits::default(),
        used_bytes: 0,
        used_inodes: 0,
        timers: (None, None),
        clean: false,
        errno: Errno::ENOSPC,
    };
    let mut version = None;
    for (i, line) in text.lines().enumerate() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let bad = || format!("line {}: {line:?} is not a state line", i + 1);
        let (k, v) = line.split_once('=').ok_or_else(bad)?;
        let (k, v) = (k.trim(), v.trim());
        if k == "errno" {
            s.errno = match v {
                "edquot" => Errno::EDQUOT,
                "enospc" => Errno::ENOSPC,
                _ => return Err(bad()),
            };
            continue;
        }
        let n: u64 = v.parse().map_err(|_| bad())?;
        let t = |x: u64| if x == 0 { None } else { Some(x) };
        match k {
            "version" => version = Some(n),
            "project_id" => s.limits.project_id = u32::try_from(n).map_err(|_| bad())?,
            "bsoft" => s.limits.bsoft = n,
            "bhard" => s.limits.bhard = n,
            "isoft" => s.limits.isoft = n,
            "ihard" => s.limits.ihard = n,
            "bgrace" => s.limits.bgrace = n,
            "igrace" => s.limits.igrace = n,
            "btimer" => s.timers.0 = t(n),
            "itimer" => s.timers.1 = t(n),
            "used_bytes" => s.used_bytes = n,
            "used_inodes" => s.used_inodes = n,
            "clean" => s.clean = n == 1,
            _ => return Err(bad()),
        }
    }
    match version {
        Some(1) => Ok(s),
        Some(v) => Err(format!("version {v}, not 1")),
        None => Err("no version line".into()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn book(d: &tempfile::TempDir) -> Arc<OwnedFd> {
        let root = std::fs::File::open(d.path()).unwrap();
        std::fs::create_dir(d.path().join("unionfs")).unwrap();
        open_book_dir(root.as_fd(), "unionfs", &d.path().join("unionfs")).unwrap()
    }

    #[test]
    fn roundtrip() {
        let d = tempfile::tempdir().unwrap();
        let p = StateFile::new(book(&d), "quota", d.path().join("unionfs/quota"));
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
        for bad in [
            "garbage\n",
            "version=1\nbhard=12x\n",
            "bhard=5\n",
            "version=2\n",
            "version=1\nerrno=eio\n",
        ] {
            assert!(parse(bad).is_err(), "{bad:?} accepted");
        }
    }

    /// Links planted in the bookkeeping dir (or the dir itself a link) are never followed,
    /// and a file with another name too is not appended to.
    #[test]
    fn planted_links_are_not_followed() {
        use std::os::unix::fs::symlink;
        let d = tempfile::tempdir().unwrap();
        let victim = d.path().join("victim");
        std::fs::write(&victim, "untouched").unwrap();
        let root = std::fs::File::open(d.path()).unwrap();
        symlink(d.path(), d.path().join("linked")).unwrap();
        assert!(open_book_dir(root.as_fd(), "linked", &d.path().join("linked")).is_err());
        let dir = book(&d);
        let u = d.path().join("unionfs");
        symlink(&victim, u.join("quota")).unwrap();
        symlink(&victim, u.join("quota.tmp")).unwrap();
        symlink(&victim, u.join("inomap")).unwrap();
        let q = StateFile::new(dir.clone(), "quota", u.join("quota"));
        assert!(q.read().is_err(), "read through a symlink");
        q.replace(b"state").unwrap();
        assert_eq!(std::fs::read(u.join("quota")).unwrap(), b"state");
        let m = StateFile::new(dir.clone(), "inomap", u.join("inomap"));
        assert!(m.open_append().is_err(), "append through a symlink");
        std::fs::remove_file(u.join("inomap")).unwrap();
        std::fs::hard_link(&victim, u.join("inomap")).unwrap();
        assert!(m.open_append().is_err(), "append to a hard link");
        assert_eq!(std::fs::read(&victim).unwrap(), b"untouched");
        assert!(std::fs::symlink_metadata(&victim).unwrap().is_file());
    }
}
