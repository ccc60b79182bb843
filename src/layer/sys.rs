//! Thin syscall wrappers that nix does not provide (xattrs, fchmodat2, FICLONE).
//! All `unsafe` of the layer module lives here.

use std::ffi::{CString, OsStr, OsString};
use std::os::fd::{AsRawFd, BorrowedFd};
use std::os::unix::ffi::{OsStrExt, OsStringExt};

use nix::errno::Errno;

/// Path naming `name` inside the directory `dir` without resolving anything of the layer:
/// `/proc/self/fd/N/name` (the final component is never followed by the l*xattr calls).
fn fd_path(dir: BorrowedFd<'_>, name: &OsStr) -> Result<CString, Errno> {
    let mut v = format!("/proc/self/fd/{}/", dir.as_raw_fd()).into_bytes();
    v.extend_from_slice(name.as_bytes());
    CString::new(v).map_err(|_| Errno::EINVAL)
}

/// The *xattrat system calls (Linux 6.13+, the same numbers on every architecture): xattrs of
/// a name relative to a directory fd, without building a `/proc/self/fd` path for it (whose
/// walk through procfs cost more than the xattr call itself). Off after the first ENOSYS.
static XATTRAT: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(true);
const SYS_SETXATTRAT: libc::c_long = 463;
const SYS_GETXATTRAT: libc::c_long = 464;
const SYS_LISTXATTRAT: libc::c_long = 465;
const SYS_REMOVEXATTRAT: libc::c_long = 466;

/// struct xattr_args.
#[repr(C)]
struct XattrArgs {
    value: u64,
    size: u32,
    flags: u32,
}

/// Run an *xattrat call; `None` when the kernel has none (then the caller uses the path form).
fn at_first<T>(call: impl FnOnce() -> Result<T, Errno>) -> Option<Result<T, Errno>> {
    use std::sync::atomic::Ordering;
    if !XATTRAT.load(Ordering::Relaxed) {
        return None;
    }
    match call() {
        Err(Errno::ENOSYS) => {
            XATTRAT.store(false, Ordering::Relaxed);
            None
        }
        r => Some(r),
    }
}

/// Try the *xattrat calls once on directory `dir`: where they fail as no kernel would (ENOSYS,
/// or EPERM from a seccomp filter that refuses calls it does not know), the path forms are
/// used from then on.
pub fn probe_xattrat(dir: BorrowedFd<'_>) {
    // (ENOSYS turns them off inside `get_xattr` already.)
    if get_xattr(dir, OsStr::new("."), OsStr::new("user.unionfs.probe")) == Err(Errno::EPERM) {
        XATTRAT.store(false, std::sync::atomic::Ordering::Relaxed);
    }
}

fn cstr(s: &OsStr) -> Result<CString, Errno> {
    CString::new(s.as_bytes()).map_err(|_| Errno::EINVAL)
}

/// Run an xattr call that fills a buffer, growing it on ERANGE.
fn fill_buf(mut call: impl FnMut(*mut libc::c_void, usize) -> isize) -> Result<Vec<u8>, Errno> {
    let mut cap = 256usize;
    loop {
        let mut buf = vec![0u8; cap];
        let n = call(buf.as_mut_ptr().cast(), buf.len());
        if n >= 0 {
            buf.truncate(n as usize);
            return Ok(buf);
        }
        match Errno::last() {
            Errno::ERANGE if cap < (1 << 20) => {
                let need = call(std::ptr::null_mut(), 0);
                cap = if need > 0 {
                    need as usize + 16
                } else {
                    cap * 4
                };
            }
            e => return Err(e),
        }
    }
}

/// Read xattr `xname` of `name` in `dir` (`name` empty: `dir` itself). `Ok(None)` if absent.
pub fn get_xattr(
    dir: BorrowedFd<'_>,
    name: &OsStr,
    xname: &OsStr,
) -> Result<Option<Vec<u8>>, Errno> {
    let x = cstr(xname)?;
    let r = if name.is_empty() {
        let fd = dir.as_raw_fd();
        // SAFETY: fd is a live descriptor, x a NUL-terminated string, buffer pointer/len valid.
        fill_buf(|p, n| unsafe { libc::fgetxattr(fd, x.as_ptr(), p, n) })
    } else {
        let n = cstr(name)?;
        let fd = dir.as_raw_fd();
        let at = at_first(|| {
            fill_buf(|p, len| {
                let args = XattrArgs {
                    value: p as u64,
                    size: len as u32,
                    flags: 0,
                };
                // SAFETY: fd live; n and x NUL-terminated; args describes a buffer valid for
                // writes of `len` bytes (or null with 0), and its own size is passed.
                (unsafe {
                    libc::syscall(
                        SYS_GETXATTRAT,
                        fd,
                        n.as_ptr(),
                        libc::AT_SYMLINK_NOFOLLOW,
                        x.as_ptr(),
                        &args as *const XattrArgs,
                        std::mem::size_of::<XattrArgs>(),
                    )
                }) as isize
            })
        });
        match at {
            Some(r) => r,
            None => {
                let path = fd_path(dir, name)?;
                // SAFETY: path and x are NUL-terminated, buffer pointer/len valid.
                fill_buf(|p, n| unsafe { libc::lgetxattr(path.as_ptr(), x.as_ptr(), p, n) })
            }
        }
    };
    match r {
        Ok(v) => Ok(Some(v)),
        Err(Errno::ENODATA) => Ok(None),
        Err(e) => Err(e),
    }
}

/// List xattr names of `name` in `dir`.
pub fn list_xattr(dir: BorrowedFd<'_>, name: &OsStr) -> Result<Vec<OsString>, Errno> {
    let buf = if name.is_empty() {
        let fd = dir.as_raw_fd();
        // SAFETY: fd is live; buffer pointer/len valid.
        fill_buf(|p, n| unsafe { libc::flistxattr(fd, p.cast(), n) })?
    } else {
        let n = cstr(name)?;
        let fd = dir.as_raw_fd();
        let at = at_first(|| {
            fill_buf(|p, len| {
                // SAFETY: fd live; n NUL-terminated; buffer pointer/len valid (or null, 0).
                (unsafe {
                    libc::syscall(
                        SYS_LISTXATTRAT,
                        fd,
                        n.as_ptr(),
                        libc::AT_SYMLINK_NOFOLLOW,
                        p,
                        len,
                    )
                }) as isize
            })
        });
        match at {
            Some(r) => r?,
            None => {
                let path = fd_path(dir, name)?;
                // SAFETY: path is NUL-terminated; buffer pointer/len valid.
                fill_buf(|p, n| unsafe { libc::llistxattr(path.as_ptr(), p.cast(), n) })?
            }
        }
    };
    Ok(buf
        .split(|b| *b == 0)
        .filter(|s| !s.is_empty())
        .map(|s| OsString::from_vec(s.to_vec()))
        .collect())
}

/// Set xattr `xname` = `value` on `name` in `dir`; `flags` are XATTR_CREATE / XATTR_REPLACE.
pub fn set_xattr(
    dir: BorrowedFd<'_>,
    name: &OsStr,
    xname: &OsStr,
    value: &[u8],
    flags: i32,
) -> Result<(), Errno> {
    let x = cstr(xname)?;
    let r = if name.is_empty() {
        // SAFETY: fd live; x NUL-terminated; value pointer/len from a slice.
        unsafe {
            libc::fsetxattr(
                dir.as_raw_fd(),
                x.as_ptr(),
                value.as_ptr().cast(),
                value.len(),
                flags,
            )
        }
    } else {
        let n = cstr(name)?;
        let args = XattrArgs {
            value: value.as_ptr() as u64,
            size: value.len() as u32,
            flags: flags as u32,
        };
        let at = at_first(|| {
            // SAFETY: fd live; n and x NUL-terminated; args describes the value slice, and
            // its own size is passed.
            Errno::result(unsafe {
                libc::syscall(
                    SYS_SETXATTRAT,
                    dir.as_raw_fd(),
                    n.as_ptr(),
                    libc::AT_SYMLINK_NOFOLLOW,
                    x.as_ptr(),
                    &args as *const XattrArgs,
                    std::mem::size_of::<XattrArgs>(),
                )
            })
        });
        if let Some(r) = at {
            return r.map(drop);
        }
        let path = fd_path(dir, name)?;
        // SAFETY: path and x NUL-terminated; value pointer/len from a slice.
        unsafe {
            libc::lsetxattr(
                path.as_ptr(),
                x.as_ptr(),
                value.as_ptr().cast(),
                value.len(),
                flags,
            )
        }
    };
    Errno::result(r).map(drop)
}

/// Remove xattr `xname` from `name` in `dir`.
pub fn remove_xattr(dir: BorrowedFd<'_>, name: &OsStr, xname: &OsStr) -> Result<(), Errno> {
    let x = cstr(xname)?;
    let r = if name.is_empty() {
        // SAFETY: fd live; x NUL-terminated.
        unsafe { libc::fremovexattr(dir.as_raw_fd(), x.as_ptr()) }
    } else {
        let n = cstr(name)?;
        let at = at_first(|| {
            // SAFETY: fd live; n and x NUL-terminated.
            Errno::result(unsafe {
                libc::syscall(
                    SYS_REMOVEXATTRAT,
                    dir.as_raw_fd(),
                    n.as_ptr(),
                    libc::AT_SYMLINK_NOFOLLOW,
                    x.as_ptr(),
                )
            })
        });
        if let Some(r) = at {
            return r.map(drop);
        }
        let path = fd_path(dir, name)?;
        // SAFETY: path and x NUL-terminated.
        unsafe { libc::lremovexattr(path.as_ptr(), x.as_ptr()) }
    };
    Errno::result(r).map(drop)
}

/// Set xattr `xname` = `value` on the object `fd` refers to, which may be an `O_PATH`
/// descriptor of any kind of file: through its `/proc/self/fd` link, which names the object
/// itself, a symlink included (never its target). (setxattrat refuses `O_PATH` descriptors.)
pub fn set_xattr_of(
    fd: BorrowedFd<'_>,
    xname: &OsStr,
    value: &[u8],
    flags: i32,
) -> Result<(), Errno> {
    let x = cstr(xname)?;
    let path = fd_link(fd)?;
    // SAFETY: path and x NUL-terminated; value pointer/len from a slice.
    Errno::result(unsafe {
        libc::setxattr(
            path.as_ptr(),
            x.as_ptr(),
            value.as_ptr().cast(),
            value.len(),
            flags,
        )
    })
    .map(drop)
}

/// Remove xattr `xname` from the object `fd` refers to (see [`set_xattr_of`]).
pub fn remove_xattr_of(fd: BorrowedFd<'_>, xname: &OsStr) -> Result<(), Errno> {
    let x = cstr(xname)?;
    let path = fd_link(fd)?;
    // SAFETY: path and x NUL-terminated.
    Errno::result(unsafe { libc::removexattr(path.as_ptr(), x.as_ptr()) }).map(drop)
}

/// `/proc/self/fd/N` of a descriptor of ours.
fn fd_link(fd: BorrowedFd<'_>) -> Result<CString, Errno> {
    CString::new(format!("/proc/self/fd/{}", fd.as_raw_fd())).map_err(|_| Errno::EINVAL)
}

/// chmod that never follows a final symlink (fchmodat2 with AT_SYMLINK_NOFOLLOW, Linux 6.6+;
/// falls back to fchmodat, which is safe for the non-symlink objects we call it on).
pub fn chmod_at(dir: BorrowedFd<'_>, name: &OsStr, mode: u32) -> Result<(), Errno> {
    if name.is_empty() {
        return nix::sys::stat::fchmod(dir, nix::sys::stat::Mode::from_bits_truncate(mode));
    }
    let n = cstr(name)?;
    // SAFETY: fd live; n NUL-terminated; syscall 452 is fchmodat2(dirfd, path, mode, flags).
    let r = unsafe {
        libc::syscall(
            452,
            dir.as_raw_fd(),
            n.as_ptr(),
            mode as libc::c_uint,
            libc::AT_SYMLINK_NOFOLLOW,
        )
    };
    match Errno::result(r) {
        Ok(_) => Ok(()),
        Err(Errno::ENOSYS) => nix::sys::stat::fchmodat(
            dir,
            name,
            nix::sys::stat::Mode::from_bits_truncate(mode),
            nix::sys::stat::FchmodatFlags::FollowSymlink,
        ),
        Err(e) => Err(e),
    }
}

/// Reflink the whole of `src` into `dst` (FICLONE). Fails with EOPNOTSUPP/EXDEV/EINVAL where the
/// filesystem cannot share extents.
pub fn ficlone(dst: BorrowedFd<'_>, src: BorrowedFd<'_>) -> Result<(), Errno> {
    const FICLONE: libc::c_ulong = 0x4004_9409;
    // SAFETY: both fds are live; FICLONE takes the source fd as its integer argument.
    let r = unsafe { libc::ioctl(dst.as_raw_fd(), FICLONE as _, src.as_raw_fd()) };
    Errno::result(r).map(drop)
}

/// sync_file_range(2) of `len` bytes at `off` with `flags` (SYNC_FILE_RANGE_*).
pub fn sync_file_range(
    fd: BorrowedFd<'_>,
    off: i64,
    len: i64,
    flags: libc::c_uint,
) -> Result<(), Errno> {
    // SAFETY: fd live; the call takes only integers.
    let r = unsafe { libc::sync_file_range(fd.as_raw_fd(), off, len, flags) };
    Errno::result(r).map(drop)
}

/// statfs of the filesystem holding `fd`.
pub fn statfs(fd: BorrowedFd<'_>) -> Result<libc::statfs, Errno> {
    let mut st = std::mem::MaybeUninit::<libc::statfs>::zeroed();
    // SAFETY: fd live; st points to writable memory of the right size.
    let r = unsafe { libc::fstatfs(fd.as_raw_fd(), st.as_mut_ptr()) };
    Errno::result(r)?;
    // SAFETY: fstatfs succeeded and filled the struct.
    Ok(unsafe { st.assume_init() })
}

/// pread that retries on EINTR and reads until `buf` is full or EOF.
pub fn pread_full(fd: BorrowedFd<'_>, buf: &mut [u8], mut off: i64) -> Result<usize, Errno> {
    let mut done = 0;
    while done < buf.len() {
        match nix::sys::uio::pread(fd, &mut buf[done..], off) {
            Ok(0) => break,
            Ok(n) => {
                done += n;
                off += n as i64;
            }
            Err(Errno::EINTR) => continue,
            Err(e) => return Err(e),
        }
    }
    Ok(done)
}

/// `len` bytes of `fd` at `off` in a new buffer, read straight into fresh memory (no zeroing
/// pass first); what lies past EOF reads as zeros. Retries EINTR and short reads.
pub fn pread_vec(fd: BorrowedFd<'_>, len: usize, mut off: i64) -> Result<Vec<u8>, Errno> {
    let mut buf: Vec<u8> = Vec::with_capacity(len);
    while buf.len() < len {
        let spare = buf.spare_capacity_mut();
        // SAFETY: the kernel writes at most spare.len() bytes into the vector's unused
        // capacity, which is valid for writes; nothing is read from it before it is written.
        let r = unsafe { libc::pread(fd.as_raw_fd(), spare.as_mut_ptr().cast(), spare.len(), off) };
        match r {
            0 => break,
            n if n > 0 => {
                let n = n as usize;
                // SAFETY: pread initialised the first n bytes of the spare capacity.
                unsafe { buf.set_len(buf.len() + n) };
                off += n as i64;
            }
            _ => match Errno::last() {
                Errno::EINTR => continue,
                e => return Err(e),
            },
        }
    }
    buf.resize(len, 0);
    Ok(buf)
}

/// Byte ranges of `fd` that have space allocated (written, unwritten/preallocated, or delayed)
/// and intersect [start, start + len), from FS_IOC_FIEMAP. Preallocation past EOF is included.
pub fn allocated_ranges(
    fd: BorrowedFd<'_>,
    start: u64,
    len: u64,
) -> Result<Vec<(u64, u64)>, Errno> {
    const FS_IOC_FIEMAP: libc::c_ulong = 0xC020_660B;
    const EXTENT_LAST: u32 = 0x1;
    const N: usize = 64;
    #[repr(C)]
    #[derive(Clone, Copy)]
    struct Extent {
        logical: u64,
        physical: u64,
        length: u64,
        reserved64: [u64; 2],
        flags: u32,
        reserved: [u32; 3],
    }
    #[repr(C)]
    struct Fiemap {
        start: u64,
        length: u64,
        flags: u32,
        mapped: u32,
        count: u32,
        reserved: u32,
        extents: [Extent; N],
    }
    let end = start.saturating_add(len);
    let mut out = Vec::new();
    let mut pos = start;
    while pos < end {
        // SAFETY: Fiemap is plain old data; all-zero is a valid request header.
        let mut fm: Fiemap = unsafe { std::mem::zeroed() };
        fm.start = pos;
        fm.length = end - pos;
        fm.count = N as u32;
        // SAFETY: fd is live; fm is a properly sized, writable fiemap with N extent slots.
        let r = unsafe { libc::ioctl(fd.as_raw_fd(), FS_IOC_FIEMAP as _, &mut fm as *mut Fiemap) };
        Errno::result(r)?;
        if fm.mapped == 0 {
            break;
        }
        let mut last = false;
        for e in &fm.extents[..fm.mapped as usize] {
            out.push((e.logical, e.logical + e.length));
            pos = pos.max(e.logical + e.length);
            if e.flags & EXTENT_LAST != 0 {
                last = true;
            }
        }
        if last {
            break;
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use std::io::Write;
    use std::os::fd::AsFd;

    #[test]
    fn xattrs_of_a_name_beneath_a_directory_fd_never_follow_a_symlink() {
        use std::ffi::OsStr;
        use std::sync::atomic::Ordering;
        let tmp = tempfile::tempdir().unwrap();
        std::fs::write(tmp.path().join("f"), b"x").unwrap();
        std::os::unix::fs::symlink("f", tmp.path().join("s")).unwrap();
        let dir = std::fs::File::open(tmp.path()).unwrap();
        let d = dir.as_fd();
        let (f, s, x) = (OsStr::new("f"), OsStr::new("s"), OsStr::new("user.t"));
        // Through the *xattrat calls where the kernel has them, then through /proc paths.
        for at in [true, false] {
            super::XATTRAT.store(at, Ordering::Relaxed);
            if let Err(e) = super::set_xattr(d, f, x, b"v", 0) {
                // A filesystem without user xattrs: nothing to check here.
                assert_eq!(e, nix::errno::Errno::EOPNOTSUPP);
                return;
            }
            assert_eq!(
                super::get_xattr(d, f, x).unwrap(),
                Some(b"v".to_vec()),
                "at={at}"
            );
            assert!(super::list_xattr(d, f).unwrap().iter().any(|n| n == x));
            // The symlink's own xattrs, not its target's.
            assert_eq!(super::get_xattr(d, s, x).unwrap(), None, "at={at}");
            assert!(!super::list_xattr(d, s).unwrap().iter().any(|n| n == x));
            super::remove_xattr(d, f, x).unwrap();
            assert_eq!(super::get_xattr(d, f, x).unwrap(), None);
            assert_eq!(
                super::remove_xattr(d, f, x),
                Err(nix::errno::Errno::ENODATA)
            );
        }
        super::XATTRAT.store(true, Ordering::Relaxed);
    }

    #[test]
    fn pread_vec_reads_and_zero_fills_past_eof() {
        let dir = std::env::temp_dir().join(format!("pread-vec-{}", std::process::id()));
        let mut f = std::fs::File::create(&dir).unwrap();
        let data: Vec<u8> = (0..10_000u32).map(|i| (i % 251) as u8 + 1).collect();
        f.write_all(&data).unwrap();
        let f = std::fs::File::open(&dir).unwrap();
        let v = super::pread_vec(f.as_fd(), 8192, 4096).unwrap();
        assert_eq!(v.len(), 8192);
        assert_eq!(&v[..10_000 - 4096], &data[4096..]);
        assert!(v[10_000 - 4096..].iter().all(|&b| b == 0));
        let past = super::pread_vec(f.as_fd(), 4096, 20_000).unwrap();
        assert!(past.len() == 4096 && past.iter().all(|&b| b == 0));
        std::fs::remove_file(&dir).unwrap();
    }
}
