//! Filesystem operations on paths under a mount root, reporting Ok or the errno.

use super::*;

/// One filesystem operation on paths relative to a mount root.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Op {
    /// open(O_CREAT|O_EXCL|O_WRONLY, mode)
    Create {
        path: String,
        mode: u32,
    },
    /// open(O_WRONLY|O_NONBLOCK) + pwrite at `off` (non-blocking so a FIFO cannot hang a test)
    Write {
        path: String,
        off: u64,
        data: Vec<u8>,
    },
    /// open(O_WRONLY|O_APPEND) + write
    Append {
        path: String,
        data: Vec<u8>,
    },
    /// truncate(2) by path
    Truncate {
        path: String,
        len: u64,
    },
    /// open(O_WRONLY|O_TRUNC)
    OpenTrunc {
        path: String,
    },
    Unlink {
        path: String,
    },
    Mkdir {
        path: String,
        mode: u32,
    },
    Rmdir {
        path: String,
    },
    Rename {
        from: String,
        to: String,
    },
    /// renameat2(RENAME_EXCHANGE)
    Exchange {
        a: String,
        b: String,
    },
    /// Create symlink `path` → `target`.
    Symlink {
        target: String,
        path: String,
    },
    /// Hard link `to` → existing `from`.
    Link {
        from: String,
        to: String,
    },
    Chmod {
        path: String,
        mode: u32,
    },
    /// lchown
    Chown {
        path: String,
        uid: u32,
        gid: u32,
    },
    /// utimensat(AT_SYMLINK_NOFOLLOW) with atime = mtime = (sec, nsec)
    Utimes {
        path: String,
        sec: i64,
        nsec: i64,
    },
    SetXattr {
        path: String,
        name: String,
        value: Vec<u8>,
    },
    RemoveXattr {
        path: String,
        name: String,
    },
    Mknod {
        path: String,
        mode: u32,
        major: u32,
        minor: u32,
    },
    Mkfifo {
        path: String,
        mode: u32,
    },
    /// Read the whole file; the outcome carries the data.
    Read {
        path: String,
    },
    /// List a directory; the outcome carries the sorted names (newline separated) that lstat
    /// finds (kernel overlayfs lists whiteouts of unmerged lower dirs, see [`phantoms`]).
    ReadDir {
        path: String,
    },
    /// lgetxattr; the outcome carries the value.
    GetXattr {
        path: String,
        name: String,
    },
    Readlink {
        path: String,
    },
    /// Run `op` with fsuid `uid`, fsgid `gid`, no supplementary groups and umask `umask`, on a
    /// thread of its own (Linux keeps ids per thread; `unshare(CLONE_FS)` gives the thread
    /// its own umask), so permission checks are the kernel's for that user.
    AsUser {
        uid: u32,
        gid: u32,
        umask: u32,
        op: Box<Op>,
    },
}

/// Ok(data for read-like ops, empty otherwise) or the errno.
pub type Outcome = Result<Vec<u8>, i32>;

pub fn errno_name(e: i32) -> String {
    let names: &[(i32, &str)] = &[
        (libc::EPERM, "EPERM"),
        (libc::ENOENT, "ENOENT"),
        (libc::EIO, "EIO"),
        (libc::EBADF, "EBADF"),
        (libc::EACCES, "EACCES"),
        (libc::EEXIST, "EEXIST"),
        (libc::EXDEV, "EXDEV"),
        (libc::ENOTDIR, "ENOTDIR"),
        (libc::EISDIR, "EISDIR"),
        (libc::EINVAL, "EINVAL"),
        (libc::ENOSPC, "ENOSPC"),
        (libc::EROFS, "EROFS"),
        (libc::EMLINK, "EMLINK"),
        (libc::ERANGE, "ERANGE"),
        (libc::ENOSYS, "ENOSYS"),
        (libc::ENOTEMPTY, "ENOTEMPTY"),
        (libc::ELOOP, "ELOOP"),
        (libc::ENODATA, "ENODATA"),
        (libc::EOPNOTSUPP, "EOPNOTSUPP"),
        (libc::ENOTCONN, "ENOTCONN"),
        (libc::EBUSY, "EBUSY"),
        (libc::ETXTBSY, "ETXTBSY"),
        (libc::E2BIG, "E2BIG"),
    ];
    names
        .iter()
        .find(|(n, _)| *n == e)
        .map(|(_, s)| s.to_string())
        .unwrap_or_else(|| format!("errno {e}"))
}

pub fn show_outcome(o: &Outcome) -> String {
    match o {
        Ok(v) if v.is_empty() => "Ok".into(),
        Ok(v) => format!("Ok({:?})", String::from_utf8_lossy(v)),
        Err(e) => errno_name(*e),
    }
}

pub(super) fn rc(r: libc::c_int) -> Outcome {
    if r < 0 { Err(errno()) } else { Ok(Vec::new()) }
}

pub(super) fn open_raw(p: &Path, flags: i32, mode: u32) -> Result<i32, i32> {
    let c = cstr(p);
    let fd = unsafe { libc::open(c.as_ptr(), flags | libc::O_CLOEXEC, mode) };
    if fd < 0 { Err(errno()) } else { Ok(fd) }
}

pub(super) fn close_fd(fd: i32) -> Outcome {
    rc(unsafe { libc::close(fd) })
}

pub(super) fn write_all_fd(fd: i32, data: &[u8], off: Option<u64>) -> Result<(), i32> {
    let mut done = 0usize;
    while done < data.len() {
        let rest = &data[done..];
        let n = unsafe {
            match off {
                Some(o) => libc::pwrite(
                    fd,
                    rest.as_ptr().cast(),
                    rest.len(),
                    (o + done as u64) as libc::off_t,
                ),
                None => libc::write(fd, rest.as_ptr().cast(), rest.len()),
            }
        };
        if n < 0 {
            return Err(errno());
        }
        done += n as usize;
    }
    Ok(())
}

/// Apply `op` under `root`.
pub fn apply(root: &Path, op: &Op) -> Outcome {
    let p = |rel: &str| root.join(rel);
    match op {
        Op::Create { path, mode } => {
            let fd = open_raw(
                &p(path),
                libc::O_CREAT | libc::O_EXCL | libc::O_WRONLY,
                *mode,
            )?;
            close_fd(fd)
        }
        Op::Write { path, off, data } => {
            let fd = open_raw(&p(path), libc::O_WRONLY | libc::O_NONBLOCK, 0)?;
            let r = write_all_fd(fd, data, Some(*off));
            let c = close_fd(fd);
            r?;
            c
        }
        Op::Append { path, data } => {
            let fd = open_raw(
                &p(path),
                libc::O_WRONLY | libc::O_APPEND | libc::O_NONBLOCK,
                0,
            )?;
            let r = write_all_fd(fd, data, None);
            let c = close_fd(fd);
            r?;
            c
        }
        Op::Truncate { path, len } => {
            let c = cstr(&p(path));
            rc(unsafe { libc::truncate(c.as_ptr(), *len as libc::off_t) })
        }
        Op::OpenTrunc { path } => {
            let fd = open_raw(
                &p(path),
                libc::O_WRONLY | libc::O_TRUNC | libc::O_NONBLOCK,
                0,
            )?;
            close_fd(fd)
        }
        Op::Unlink { path } => {
            let c = cstr(&p(path));
            rc(unsafe { libc::unlink(c.as_ptr()) })
        }
        Op::Mkdir { path, mode } => {
            let c = cstr(&p(path));
            rc(unsafe { libc::mkdir(c.as_ptr(), *mode) })
        }
        Op::Rmdir { path } => {
            let c = cstr(&p(path));
            rc(unsafe { libc::rmdir(c.as_ptr()) })
        }
        Op::Rename { from, to } => {
            let a = cstr(&p(from));
            let b = cstr(&p(to));
            rc(unsafe { libc::rename(a.as_ptr(), b.as_ptr()) })
        }
        Op::Exchange { a, b } => {
            let a = cstr(&p(a));
            let b = cstr(&p(b));
            rc(unsafe {
                libc::renameat2(
                    libc::AT_FDCWD,
                    a.as_ptr(),
                    libc::AT_FDCWD,
                    b.as_ptr(),
                    libc::RENAME_EXCHANGE,
                )
            })
        }
        Op::Symlink { target, path } => {
            let t = CString::new(target.as_str()).unwrap();
            let c = cstr(&p(path));
            rc(unsafe { libc::symlink(t.as_ptr(), c.as_ptr()) })
        }
        Op::Link { from, to } => {
            let a = cstr(&p(from));
            let b = cstr(&p(to));
            rc(unsafe { libc::link(a.as_ptr(), b.as_ptr()) })
        }
        Op::Chmod { path, mode } => {
            let c = cstr(&p(path));
            rc(unsafe { libc::chmod(c.as_ptr(), *mode) })
        }
        Op::Chown { path, uid, gid } => {
            let c = cstr(&p(path));
            rc(unsafe { libc::lchown(c.as_ptr(), *uid, *gid) })
        }
        Op::Utimes { path, sec, nsec } => {
            let c = cstr(&p(path));
            let ts = libc::timespec {
                tv_sec: *sec,
                tv_nsec: *nsec,
            };
            let times = [ts, ts];
            rc(unsafe {
                libc::utimensat(
                    libc::AT_FDCWD,
                    c.as_ptr(),
                    times.as_ptr(),
                    libc::AT_SYMLINK_NOFOLLOW,
                )
            })
        }
        Op::SetXattr { path, name, value } => {
            let c = cstr(&p(path));
            let n = CString::new(name.as_str()).unwrap();
            rc(unsafe {
                libc::lsetxattr(
                    c.as_ptr(),
                    n.as_ptr(),
                    value.as_ptr().cast(),
                    value.len(),
                    0,
                )
            })
        }
        Op::RemoveXattr { path, name } => {
            let c = cstr(&p(path));
            let n = CString::new(name.as_str()).unwrap();
            rc(unsafe { libc::lremovexattr(c.as_ptr(), n.as_ptr()) })
        }
        Op::Mknod {
            path,
            mode,
            major,
            minor,
        } => {
            let c = cstr(&p(path));
            rc(unsafe { libc::mknod(c.as_ptr(), *mode, libc::makedev(*major, *minor)) })
        }
        Op::Mkfifo { path, mode } => {
            let c = cstr(&p(path));
            rc(unsafe { libc::mkfifo(c.as_ptr(), *mode) })
        }
        Op::Read { path } => {
            let fd = open_raw(&p(path), libc::O_RDONLY | libc::O_NONBLOCK, 0)?;
            let mut out = Vec::new();
            let mut buf = vec![0u8; 65536];
            let r = loop {
                let n = unsafe { libc::read(fd, buf.as_mut_ptr().cast(), buf.len()) };
                if n < 0 {
                    break Err(errno());
                }
                if n == 0 {
                    break Ok(());
                }
                out.extend_from_slice(&buf[..n as usize]);
            };
            let c = close_fd(fd);
            r?;
            c?;
            Ok(out)
        }
        Op::ReadDir { path } => {
            let rd = fs::read_dir(p(path)).map_err(|e| e.raw_os_error().unwrap_or(libc::EIO))?;
            let mut names = Vec::new();
            for e in rd {
                let e = e.map_err(|e| e.raw_os_error().unwrap_or(libc::EIO))?;
                // Names that lookup does not find are not in the union (see `phantoms`).
                if fs::symlink_metadata(e.path())
                    .is_err_and(|err| err.raw_os_error() == Some(libc::ENOENT))
                {
                    continue;
                }
                names.push(e.file_name().to_string_lossy().into_owned());
            }
            names.sort();
            Ok(names.join("\n").into_bytes())
        }
        Op::GetXattr { path, name } => lgetxattr(&p(path), name),
        Op::Readlink { path } => fs::read_link(p(path))
            .map(|t| t.as_os_str().as_bytes().to_vec())
            .map_err(|e| e.raw_os_error().unwrap_or(libc::EIO)),
        Op::AsUser {
            uid,
            gid,
            umask,
            op,
        } => std::thread::scope(|s| {
            s.spawn(|| {
                // Raw syscalls: glibc's wrappers would change every thread of the process.
                // SAFETY: plain syscalls on this thread's own credentials and fs struct.
                unsafe {
                    if libc::unshare(libc::CLONE_FS) != 0
                        || libc::syscall(libc::SYS_setgroups, 0, std::ptr::null::<libc::gid_t>())
                            != 0
                    {
                        return Err(errno());
                    }
                    libc::umask(*umask as libc::mode_t);
                    libc::syscall(libc::SYS_setfsgid, *gid);
                    libc::syscall(libc::SYS_setfsuid, *uid);
                }
                apply(root, op)
            })
            .join()
            .unwrap_or(Err(libc::EIO))
        }),
    }
}

/// Binary form of an ACL from (tag, perm, id) entries (ids of base entries are ignored).
pub fn acl_bytes(entries: &[(u16, u16, u32)]) -> Vec<u8> {
    let mut v = 2u32.to_le_bytes().to_vec();
    for &(tag, perm, id) in entries {
        v.extend_from_slice(&tag.to_le_bytes());
        v.extend_from_slice(&perm.to_le_bytes());
        v.extend_from_slice(&id.to_le_bytes());
    }
    v
}

/// `op` as user `uid` (group the same id) with umask `umask`.
pub fn as_user(uid: u32, umask: u32, op: Op) -> Op {
    Op::AsUser {
        uid,
        gid: uid,
        umask,
        op: Box::new(op),
    }
}

// Short constructors for ops.
pub fn op_create(p: &str) -> Op {
    Op::Create {
        path: p.into(),
        mode: 0o644,
    }
}
pub fn op_write(p: &str, off: u64, data: &str) -> Op {
    Op::Write {
        path: p.into(),
        off,
        data: data.as_bytes().to_vec(),
    }
}
pub fn op_append(p: &str, data: &str) -> Op {
    Op::Append {
        path: p.into(),
        data: data.as_bytes().to_vec(),
    }
}
pub fn op_truncate(p: &str, len: u64) -> Op {
    Op::Truncate {
        path: p.into(),
        len,
    }
}
pub fn op_unlink(p: &str) -> Op {
    Op::Unlink { path: p.into() }
}
pub fn op_mkdir(p: &str) -> Op {
    Op::Mkdir {
        path: p.into(),
        mode: 0o755,
    }
}
pub fn op_rmdir(p: &str) -> Op {
    Op::Rmdir { path: p.into() }
}
pub fn op_rename(a: &str, b: &str) -> Op {
    Op::Rename {
        from: a.into(),
        to: b.into(),
    }
}
pub fn op_exchange(a: &str, b: &str) -> Op {
    Op::Exchange {
        a: a.into(),
        b: b.into(),
    }
}
pub fn op_symlink(target: &str, p: &str) -> Op {
    Op::Symlink {
        target: target.into(),
        path: p.into(),
    }
}
pub fn op_link(a: &str, b: &str) -> Op {
    Op::Link {
        from: a.into(),
        to: b.into(),
    }
}
pub fn op_chmod(p: &str, mode: u32) -> Op {
    Op::Chmod {
        path: p.into(),
        mode,
    }
}
pub fn op_chown(p: &str, uid: u32, gid: u32) -> Op {
    Op::Chown {
        path: p.into(),
        uid,
        gid,
    }
}
pub fn op_utimes(p: &str, sec: i64, nsec: i64) -> Op {
    Op::Utimes {
        path: p.into(),
        sec,
        nsec,
    }
}
pub fn op_setxattr(p: &str, name: &str, value: &str) -> Op {
    Op::SetXattr {
        path: p.into(),
        name: name.into(),
        value: value.as_bytes().to_vec(),
    }
}
pub fn op_removexattr(p: &str, name: &str) -> Op {
    Op::RemoveXattr {
        path: p.into(),
        name: name.into(),
    }
}
pub fn op_read(p: &str) -> Op {
    Op::Read { path: p.into() }
}
pub fn op_readdir(p: &str) -> Op {
    Op::ReadDir { path: p.into() }
}

/// Names in directory `root/rel` that readdir lists but lstat does not find. Kernel overlayfs
/// shows the whiteouts of a lower directory that is not merged with anything below this way;
/// unionfs-rs must not list such names at all.
pub fn phantoms(root: &Path, rel: &str) -> Vec<String> {
    let Ok(rd) = fs::read_dir(root.join(rel)) else {
        return Vec::new();
    };
    rd.flatten()
        .filter(|e| {
            fs::symlink_metadata(e.path())
                .is_err_and(|err| err.raw_os_error() == Some(libc::ENOENT))
        })
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect()
}
