//! Depth-first walk of a directory tree without recursion and with a bounded number of open
//! directories: a tree in upper is built by the mount's users, and one directory chain a
//! hundred thousand levels deep (cheap to make: `mkdir n; mv t n/; mv n t` per level) must
//! neither overflow a thread's stack nor take a descriptor per level.
//!
//! Symlinks are never followed (every open is O_NOFOLLOW | O_DIRECTORY). When more than
//! [`MAX_OPEN`] levels are open, the shallowest open one is closed; the walk comes back to it
//! through `..` of its child and checks that this is still the directory it left (device and
//! inode), so a directory moved meanwhile ends the walk with ESTALE instead of walking
//! somewhere else.

use std::ffi::{OsStr, OsString};
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;

use nix::dir::{Dir, Type};
use nix::errno::Errno;
use nix::fcntl::OFlag;
use nix::sys::stat::Mode;

/// Most directory levels kept open at once.
pub const MAX_OPEN: usize = 64;

/// What the walk shows its visitor.
pub enum Visit<'a> {
    /// An entry of directory `dir` (`depth` 0: the root's own entries). Returning `Ok(true)`
    /// for a directory descends into it.
    Entry {
        dir: BorrowedFd<'a>,
        name: &'a OsStr,
        is_dir: bool,
        depth: usize,
    },
    /// Everything below directory `name` of `dir` has been visited.
    Done {
        dir: BorrowedFd<'a>,
        name: &'a OsStr,
        depth: usize,
    },
}

struct Level {
    fd: Option<OwnedFd>,
    id: (u64, u64),
    /// Its name in the level above (empty for the root).
    name: OsString,
    /// Subdirectories still to visit.
    todo: Vec<OsString>,
}

fn open_dir(dir: BorrowedFd<'_>, name: &OsStr) -> Result<OwnedFd, Errno> {
    nix::fcntl::openat(
        dir,
        name,
        OFlag::O_RDONLY | OFlag::O_DIRECTORY | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC,
        Mode::empty(),
    )
}

fn id_of(fd: BorrowedFd<'_>) -> Result<(u64, u64), Errno> {
    let st = nix::sys::stat::fstat(fd)?;
    Ok((st.st_dev, st.st_ino))
}

/// List `fd`'s entries to the visitor; returns the subdirectories it wants to descend into.
fn list(
    fd: &OwnedFd,
    depth: usize,
    visit: &mut dyn FnMut(Visit<'_>) -> Result<bool, Errno>,
) -> Result<Vec<OsString>, Errno> {
    let mut d = Dir::from_fd(nix::unistd::dup(fd.as_fd())?)?;
    let mut entries = Vec::new();
    for e in d.iter() {
        let e = e?;
        let name = e.file_name().to_bytes();
        if name == b"." || name == b".." {
            continue;
        }
        let is_dir = match e.file_type() {
            Some(t) => t == Type::Directory,
            None => crate::layer::stat_at(fd.as_fd(), OsStr::from_bytes(name))
                .is_ok_and(|st| st.st_mode & libc::S_IFMT == libc::S_IFDIR),
        };
        entries.push((OsStr::from_bytes(name).to_os_string(), is_dir));
    }
    drop(d);
    let mut subdirs = Vec::new();
    for (name, is_dir) in entries {
        let descend = visit(Visit::Entry {
            dir: fd.as_fd(),
            name: &name,
            is_dir,
            depth,
        })?;
        if is_dir && descend {
            subdirs.push(name);
        }
    }
    // Visited in listing order (popped from the end).
    subdirs.reverse();
    Ok(subdirs)
}

/// Walk everything below `root` (not `root` itself), depth first. A subdirectory that cannot
/// be opened or listed ends the walk with the error, or with `lenient` is skipped (a removal
/// goes on with the rest).
pub fn walk(
    root: BorrowedFd<'_>,
    lenient: bool,
    visit: &mut dyn FnMut(Visit<'_>) -> Result<bool, Errno>,
) -> Result<(), Errno> {
    let root = root.try_clone_to_owned().map_err(|_| Errno::EMFILE)?;
    let todo = list(&root, 0, visit)?;
    let mut stack = vec![Level {
        id: id_of(root.as_fd())?,
        fd: Some(root),
        name: OsString::new(),
        todo,
    }];
    // stack[lo..] are open, stack[..lo] closed (the shallowest are closed first).
    let mut lo = 0usize;
    loop {
        let depth = stack.len();
        let Some(top) = stack.last_mut() else { break };
        if let Some(name) = top.todo.pop() {
            let Some(fd) = top.fd.as_ref() else {
                return Err(Errno::EBADF); // The deepest level is always open.
            };
            let opened = open_dir(fd.as_fd(), &name).and_then(|sub| {
                let id = id_of(sub.as_fd())?;
                let todo = list(&sub, depth, visit)?;
                Ok((sub, id, todo))
            });
            let (sub, id, todo) = match opened {
                Ok(x) => x,
                // Gone or replaced meanwhile (not by a directory): nothing to walk.
                Err(Errno::ENOENT) | Err(Errno::ENOTDIR) | Err(Errno::ELOOP) => continue,
                Err(_) if lenient => continue,
                Err(e) => return Err(e),
            };
            if stack.len() - lo >= MAX_OPEN {
                stack[lo].fd = None;
                lo += 1;
            }
            stack.push(Level {
                fd: Some(sub),
                id,
                name,
                todo,
            });
            continue;
        }
        let Some(done) = stack.pop() else { break };
        let depth = stack.len().saturating_sub(1);
        let Some(parent) = stack.last_mut() else {
            break;
        };
        if parent.fd.is_none() {
            let Some(child) = done.fd.as_ref() else {
                return Err(Errno::EBADF);
            };
            let up = open_dir(child.as_fd(), OsStr::new(".."))?;
            if id_of(up.as_fd())? != parent.id {
                return Err(Errno::ESTALE);
            }
            parent.fd = Some(up);
            lo = depth;
        }
        drop(done.fd);
        if let Some(pfd) = parent.fd.as_ref() {
            visit(Visit::Done {
                dir: pfd.as_fd(),
                name: &done.name,
                depth,
            })?;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A chain far deeper than MAX_OPEN (and than a recursive walk's stack would allow in a
    /// small thread) is walked with at most MAX_OPEN + 2 descriptors, then removed bottom-up.
    #[test]
    fn deep_chains_are_walked_with_few_descriptors() {
        let d = tempfile::tempdir().expect("tempdir");
        let root = std::fs::File::open(d.path()).expect("open");
        let depth = 3000usize;
        // Built by fd, one level at a time (a path this long could not be named).
        let mut cur = OwnedFd::from(std::fs::File::open(d.path()).expect("open"));
        for i in 0..depth {
            nix::sys::stat::mkdirat(cur.as_fd(), "d", Mode::from_bits_truncate(0o755))
                .expect("mkdir");
            if i % 500 == 0 {
                nix::fcntl::openat(
                    cur.as_fd(),
                    "f",
                    OFlag::O_CREAT | OFlag::O_WRONLY | OFlag::O_CLOEXEC,
                    Mode::from_bits_truncate(0o644),
                )
                .expect("file");
            }
            cur = open_dir(cur.as_fd(), OsStr::new("d")).expect("open level");
        }
        drop(cur);
        let fds_before = std::fs::read_dir("/proc/self/fd").expect("fds").count();
        let (mut dirs, mut files, mut done, mut max_fds) = (0, 0, 0, 0);
        walk(root.as_fd(), false, &mut |v| {
            match v {
                Visit::Entry { is_dir, .. } => {
                    if is_dir {
                        dirs += 1;
                    } else {
                        files += 1;
                    }
                }
                Visit::Done { .. } => done += 1,
            }
            if dirs % 100 == 0 {
                max_fds = max_fds.max(std::fs::read_dir("/proc/self/fd").expect("fds").count());
            }
            Ok(true)
        })
        .expect("walk");
        assert_eq!((dirs, files, done), (depth, depth.div_ceil(500), depth));
        // Other tests' threads open files meanwhile: allow some slack beyond the walk's own.
        assert!(max_fds <= fds_before + MAX_OPEN + 16, "{max_fds} fds open");
        // Bottom-up removal from the visitor: every directory is empty when Done.
        walk(root.as_fd(), false, &mut |v| {
            match v {
                Visit::Entry {
                    dir,
                    name,
                    is_dir: false,
                    ..
                } => nix::unistd::unlinkat(dir, name, nix::unistd::UnlinkatFlags::NoRemoveDir)?,
                Visit::Done { dir, name, .. } => {
                    nix::unistd::unlinkat(dir, name, nix::unistd::UnlinkatFlags::RemoveDir)?
                }
                _ => {}
            }
            Ok(true)
        })
        .expect("remove");
        assert_eq!(std::fs::read_dir(d.path()).expect("list").count(), 0);
    }

    /// Every entry of a wide tree is shown once, at its depth.
    #[test]
    fn entries_are_seen_once_in_a_wide_tree() {
        let d = tempfile::tempdir().expect("tempdir");
        for a in 0..5 {
            for b in 0..5 {
                let p = d.path().join(format!("a{a}/b{b}"));
                std::fs::create_dir_all(&p).expect("mkdir");
                std::fs::write(p.join("f"), "x").expect("file");
            }
        }
        let root = std::fs::File::open(d.path()).expect("open");
        let mut seen = Vec::new();
        walk(root.as_fd(), false, &mut |v| {
            if let Visit::Entry { name, depth, .. } = v {
                seen.push((depth, name.to_os_string()));
            }
            Ok(true)
        })
        .expect("walk");
        assert_eq!(seen.len(), 5 + 25 + 25);
        assert_eq!(seen.iter().filter(|(d, _)| *d == 2).count(), 25);
    }
}
