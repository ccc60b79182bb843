//! Layer descriptions (`Entry`) and building them on disk.

use super::*;

/// One item of a layer description. Paths are relative to the layer root; missing parent
/// directories are created (mode 0755, root). Items are applied in order.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Entry {
    Dir {
        path: String,
        mode: u32,
    },
    File {
        path: String,
        data: Vec<u8>,
        mode: u32,
    },
    /// A sparse file of `size` bytes with `data` written at the given offsets.
    Sparse {
        path: String,
        size: u64,
        data: Vec<(u64, Vec<u8>)>,
    },
    Symlink {
        path: String,
        target: String,
    },
    /// Character device 0/0 (overlayfs whiteout).
    Whiteout {
        path: String,
    },
    /// Mark a directory opaque (`<ns>.overlay.opaque=y`); creates it if missing.
    Opaque {
        path: String,
    },
    Xattr {
        path: String,
        name: String,
        value: Vec<u8>,
    },
    HardLink {
        path: String,
        target: String,
    },
    Fifo {
        path: String,
        mode: u32,
    },
    CharDev {
        path: String,
        mode: u32,
        major: u32,
        minor: u32,
    },
    /// lchown
    Chown {
        path: String,
        uid: u32,
        gid: u32,
    },
    /// chmod, applied after chown so suid/sgid bits survive
    Chmod {
        path: String,
        mode: u32,
    },
}

pub fn dir(path: &str) -> Entry {
    Entry::Dir {
        path: path.into(),
        mode: 0o755,
    }
}
pub fn dir_mode(path: &str, mode: u32) -> Entry {
    Entry::Dir {
        path: path.into(),
        mode,
    }
}
pub fn file(path: &str, data: &str) -> Entry {
    Entry::File {
        path: path.into(),
        data: data.as_bytes().to_vec(),
        mode: 0o644,
    }
}
pub fn file_bytes(path: &str, data: Vec<u8>) -> Entry {
    Entry::File {
        path: path.into(),
        data,
        mode: 0o644,
    }
}
pub fn file_mode(path: &str, data: &str, mode: u32) -> Entry {
    Entry::File {
        path: path.into(),
        data: data.as_bytes().to_vec(),
        mode,
    }
}
pub fn sparse(path: &str, size: u64, data: &[(u64, &[u8])]) -> Entry {
    Entry::Sparse {
        path: path.into(),
        size,
        data: data.iter().map(|(o, d)| (*o, d.to_vec())).collect(),
    }
}
pub fn symlink(path: &str, target: &str) -> Entry {
    Entry::Symlink {
        path: path.into(),
        target: target.into(),
    }
}
pub fn whiteout(path: &str) -> Entry {
    Entry::Whiteout { path: path.into() }
}
pub fn opaque(path: &str) -> Entry {
    Entry::Opaque { path: path.into() }
}
pub fn xattr(path: &str, name: &str, value: &str) -> Entry {
    Entry::Xattr {
        path: path.into(),
        name: name.into(),
        value: value.as_bytes().to_vec(),
    }
}
pub fn hardlink(path: &str, target: &str) -> Entry {
    Entry::HardLink {
        path: path.into(),
        target: target.into(),
    }
}
pub fn fifo(path: &str) -> Entry {
    Entry::Fifo {
        path: path.into(),
        mode: 0o644,
    }
}
pub fn chardev(path: &str, major: u32, minor: u32) -> Entry {
    Entry::CharDev {
        path: path.into(),
        mode: 0o600,
        major,
        minor,
    }
}
pub fn chown(path: &str, uid: u32, gid: u32) -> Entry {
    Entry::Chown {
        path: path.into(),
        uid,
        gid,
    }
}
pub fn chmod_entry(path: &str, mode: u32) -> Entry {
    Entry::Chmod {
        path: path.into(),
        mode,
    }
}

pub fn cstr(p: &Path) -> CString {
    CString::new(p.as_os_str().as_bytes()).expect("path without NUL")
}

pub(super) fn errno() -> i32 {
    io::Error::last_os_error()
        .raw_os_error()
        .unwrap_or(libc::EIO)
}

pub(super) fn check(rc: libc::c_int, what: &str, p: &Path) -> io::Result<()> {
    if rc < 0 {
        let e = io::Error::last_os_error();
        Err(io::Error::new(
            e.kind(),
            format!("{what} {}: {e}", p.display()),
        ))
    } else {
        Ok(())
    }
}

/// `lstat` helper that panics with the path on failure.
pub fn lstat(p: &Path) -> fs::Metadata {
    fs::symlink_metadata(p).unwrap_or_else(|e| panic!("lstat {}: {e}", p.display()))
}

pub fn chmod(p: &Path, mode: u32) -> io::Result<()> {
    let c = cstr(p);
    check(unsafe { libc::chmod(c.as_ptr(), mode) }, "chmod", p)
}

pub fn lchown(p: &Path, uid: u32, gid: u32) -> io::Result<()> {
    let c = cstr(p);
    check(unsafe { libc::lchown(c.as_ptr(), uid, gid) }, "lchown", p)
}

pub fn lsetxattr(p: &Path, name: &str, value: &[u8]) -> io::Result<()> {
    let c = cstr(p);
    let n = CString::new(name).unwrap();
    check(
        unsafe {
            libc::lsetxattr(
                c.as_ptr(),
                n.as_ptr(),
                value.as_ptr().cast(),
                value.len(),
                0,
            )
        },
        "lsetxattr",
        p,
    )
}

pub fn mknod(p: &Path, mode: u32, major: u32, minor: u32) -> io::Result<()> {
    let c = cstr(p);
    check(
        unsafe { libc::mknod(c.as_ptr(), mode, libc::makedev(major, minor)) },
        "mknod",
        p,
    )
}

/// Set atime and mtime of `p` without following symlinks.
pub fn set_times(p: &Path, sec: i64, nsec: i64) -> io::Result<()> {
    let c = cstr(p);
    let ts = libc::timespec {
        tv_sec: sec,
        tv_nsec: nsec,
    };
    let times = [ts, ts];
    check(
        unsafe {
            libc::utimensat(
                libc::AT_FDCWD,
                c.as_ptr(),
                times.as_ptr(),
                libc::AT_SYMLINK_NOFOLLOW,
            )
        },
        "utimensat",
        p,
    )
}

pub(super) fn ensure_parents(root: &Path, rel: &str) -> io::Result<PathBuf> {
    let p = root.join(rel);
    if let Some(parent) = p.parent() {
        if !parent.exists() {
            fs::create_dir_all(parent)?;
        }
    }
    Ok(p)
}

/// Create a layer under `root` from a description. After all items, every entry's atime/mtime is
/// set to `BASE_TIME + i` seconds (`i` = index in sorted path order) plus `i` microseconds, so two
/// layers built from one description are identical, including times.
pub fn build_layer(root: &Path, spec: &[Entry], ns: OvlNs) -> io::Result<()> {
    use std::os::unix::fs::symlink as mk_symlink;
    for e in spec {
        match e {
            Entry::Dir { path, mode } => {
                let p = ensure_parents(root, path)?;
                if !p.is_dir() {
                    fs::create_dir(&p)?;
                }
                chmod(&p, *mode)?;
            }
            Entry::File { path, data, mode } => {
                let p = ensure_parents(root, path)?;
                fs::write(&p, data)?;
                chmod(&p, *mode)?;
            }
            Entry::Sparse { path, size, data } => {
                use std::os::unix::fs::FileExt;
                let p = ensure_parents(root, path)?;
                let f = fs::File::create(&p)?;
                f.set_len(*size)?;
                for (off, d) in data {
                    f.write_all_at(d, *off)?;
                }
                chmod(&p, 0o644)?;
            }
            Entry::Symlink { path, target } => {
                let p = ensure_parents(root, path)?;
                mk_symlink(target, &p)?;
            }
            Entry::Whiteout { path } => {
                let p = ensure_parents(root, path)?;
                mknod(&p, libc::S_IFCHR, 0, 0)?;
            }
            Entry::Opaque { path } => {
                let p = ensure_parents(root, path)?;
                if !p.is_dir() {
                    fs::create_dir(&p)?;
                }
                lsetxattr(&p, &ns.opaque(), b"y")?;
            }
            Entry::Xattr { path, name, value } => {
                lsetxattr(&root.join(path), name, value)?;
            }
            Entry::HardLink { path, target } => {
                let p = ensure_parents(root, path)?;
                fs::hard_link(root.join(target), &p)?;
            }
            Entry::Fifo { path, mode } => {
                let p = ensure_parents(root, path)?;
                mknod(&p, libc::S_IFIFO | mode, 0, 0)?;
                chmod(&p, *mode)?;
            }
            Entry::CharDev {
                path,
                mode,
                major,
                minor,
            } => {
                let p = ensure_parents(root, path)?;
                mknod(&p, libc::S_IFCHR | mode, *major, *minor)?;
                chmod(&p, *mode)?;
            }
            Entry::Chown { path, uid, gid } => lchown(&root.join(path), *uid, *gid)?,
            Entry::Chmod { path, mode } => chmod(&root.join(path), *mode)?,
        }
    }
    // Fixed times, children before parents do not matter: utimensat does not touch the parent.
    let mut all = Vec::new();
    walk_paths(root, Path::new(""), &mut all)?;
    all.sort();
    for (i, rel) in all.iter().enumerate() {
        let p = if rel.as_os_str().is_empty() {
            root.to_path_buf()
        } else {
            root.join(rel)
        };
        set_times(&p, BASE_TIME + i as i64, (i as i64) * 1000 + 1)?;
    }
    Ok(())
}

pub(super) fn walk_paths(root: &Path, rel: &Path, out: &mut Vec<PathBuf>) -> io::Result<()> {
    out.push(rel.to_path_buf());
    let full = root.join(rel);
    if fs::symlink_metadata(&full)?.is_dir() {
        for e in fs::read_dir(&full)? {
            let e = e?;
            walk_paths(root, &rel.join(e.file_name()), out)?;
        }
    }
    Ok(())
}
