//! File attribute flags through the mount (`lsattr` / `chattr`: FS_IOC_GETFLAGS / SETFLAGS, and
//! FS_IOC_FSGETXATTR / FSSETXATTR), on unionfs-rs and kernel overlayfs over the same layers:
//! read from the object that shows, set on upper after a copy-up, and immutable enforced.

mod common;

use common::*;
use std::fs;
use std::os::fd::AsRawFd;
use std::path::Path;

const TIMEOUT: u64 = 60;
const FS_IOC_GETFLAGS: libc::Ioctl = 0x8008_6601;
const FS_IOC_SETFLAGS: libc::Ioctl = 0x4008_6602;
const FS_IOC_FSGETXATTR: libc::Ioctl = 0x801c_581f;
const FS_IOC_FSSETXATTR: libc::Ioctl = 0x401c_5820;
const FS_IMMUTABLE_FL: u32 = 0x10;
const FS_NODUMP_FL: u32 = 0x40;
const FS_NOATIME_FL: u32 = 0x80;
/// The flags compared (ext4 adds its own, such as extents, which both show alike).
const SHOWN: u32 = FS_IMMUTABLE_FL | FS_NODUMP_FL | FS_NOATIME_FL | 0x20 /* append */;
const FS_XFLAG_NODUMP: u32 = 0x80;
const FS_XFLAG_NOATIME: u32 = 0x40;

fn open(p: &Path) -> std::io::Result<fs::File> {
    use std::os::unix::fs::OpenOptionsExt;
    fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NONBLOCK)
        .open(p)
}

fn get_flags(p: &Path) -> Result<u32, i32> {
    let f = open(p).map_err(|e| e.raw_os_error().unwrap_or(-1))?;
    let mut v: u32 = 0;
    // SAFETY: FS_IOC_GETFLAGS writes an int through the pointer, which outlives the call.
    let r = unsafe { libc::ioctl(f.as_raw_fd(), FS_IOC_GETFLAGS, &mut v) };
    if r < 0 {
        return Err(std::io::Error::last_os_error().raw_os_error().unwrap_or(-1));
    }
    Ok(v & SHOWN)
}

fn set_flags(p: &Path, on: u32, off: u32) -> Result<(), i32> {
    let f = open(p).map_err(|e| e.raw_os_error().unwrap_or(-1))?;
    let mut v: u32 = 0;
    // SAFETY: as in get_flags; FS_IOC_SETFLAGS reads the int.
    let r = unsafe {
        if libc::ioctl(f.as_raw_fd(), FS_IOC_GETFLAGS, &mut v) < 0 {
            -1
        } else {
            v = (v | on) & !off;
            libc::ioctl(f.as_raw_fd(), FS_IOC_SETFLAGS, &v)
        }
    };
    if r < 0 {
        return Err(std::io::Error::last_os_error().raw_os_error().unwrap_or(-1));
    }
    Ok(())
}

/// struct fsxattr: fsx_xflags, fsx_extsize, fsx_nextents, fsx_projid, fsx_cowextsize, pad.
fn fsx(p: &Path, set_xflags: Option<u32>) -> Result<u32, i32> {
    let f = open(p).map_err(|e| e.raw_os_error().unwrap_or(-1))?;
    let mut x = [0u32; 7];
    // SAFETY: FS_IOC_FSGETXATTR / FSSETXATTR read or write a 28-byte struct fsxattr, which
    // `x` holds.
    let r = unsafe {
        let mut r = libc::ioctl(f.as_raw_fd(), FS_IOC_FSGETXATTR, x.as_mut_ptr());
        if r == 0
            && let Some(xf) = set_xflags
        {
            x[0] |= xf;
            r = libc::ioctl(f.as_raw_fd(), FS_IOC_FSSETXATTR, x.as_ptr());
        }
        r
    };
    if r < 0 {
        return Err(std::io::Error::last_os_error().raw_os_error().unwrap_or(-1));
    }
    Ok(x[0] & (FS_XFLAG_NODUMP | FS_XFLAG_NOATIME))
}

fn layers() -> Vec<Vec<Entry>> {
    vec![vec![
        file("f", "lower f"),
        dir("d"),
        file("d/g", "lower g"),
        file("h", "lower h"),
    ]]
}

/// What the mount at `m` shows and does; `upper`: its upper dir on disk.
fn observe(m: &Path, upper: &Path) -> Vec<String> {
    let mut out = Vec::new();
    let mut note = |k: &str, v: String| out.push(format!("{k}: {v}"));
    note(
        "f (nodump in lower)",
        format!("{:?}", get_flags(&m.join("f"))),
    );
    note("f fsxattr", format!("{:?}", fsx(&m.join("f"), None)));
    note("d", format!("{:?}", get_flags(&m.join("d"))));
    note("root", format!("{:?}", get_flags(m)));
    note(
        "set d/g nodump",
        format!("{:?}", set_flags(&m.join("d/g"), FS_NODUMP_FL, 0)),
    );
    note("d/g", format!("{:?}", get_flags(&m.join("d/g"))));
    note("upper d/g", format!("{:?}", get_flags(&upper.join("d/g"))));
    note(
        "set d noatime",
        format!("{:?}", set_flags(&m.join("d"), FS_NOATIME_FL, 0)),
    );
    note("d", format!("{:?}", get_flags(&m.join("d"))));
    note("upper d", format!("{:?}", get_flags(&upper.join("d"))));
    note(
        "set h noatime (fsxattr)",
        format!("{:?}", fsx(&m.join("h"), Some(FS_XFLAG_NOATIME))),
    );
    note("h", format!("{:?}", get_flags(&m.join("h"))));
    note(
        "set f immutable",
        format!("{:?}", set_flags(&m.join("f"), FS_IMMUTABLE_FL, 0)),
    );
    note("f", format!("{:?}", get_flags(&m.join("f"))));
    let append = fs::OpenOptions::new().append(true).open(m.join("f"));
    note(
        "append to immutable f",
        format!("{:?}", append.map(|_| ()).map_err(|e| e.raw_os_error())),
    );
    note(
        "unlink immutable f",
        format!(
            "{:?}",
            fs::remove_file(m.join("f")).map_err(|e| e.raw_os_error())
        ),
    );
    note(
        "clear f immutable",
        format!("{:?}", set_flags(&m.join("f"), 0, FS_IMMUTABLE_FL)),
    );
    note(
        "unlink f",
        format!(
            "{:?}",
            fs::remove_file(m.join("f")).map_err(|e| e.raw_os_error())
        ),
    );
    note("f gone", format!("{:?}", m.join("f").exists()));
    out
}

fn dirs_with_lower_flag() -> Dirs {
    let dirs = Dirs::new(&layers(), &[]);
    set_flags(&dirs.lowers[0].join("f"), FS_NODUMP_FL, 0).expect("nodump on the lower file");
    dirs
}

#[test]
fn file_attribute_flags_as_on_kernel_overlayfs() {
    with_timeout(TIMEOUT, || {
        let dirs = dirs_with_lower_flag();
        let m = Mount::start(&dirs, &MountOpts::default()).unwrap_or_else(|e| panic!("{e}"));
        let ours = observe(&m.merged, &dirs.upper);
        m.unmount().unwrap_or_else(|e| panic!("{e}"));
        let kdirs = dirs_with_lower_flag();
        let k =
            OverlayMount::start(&kdirs, &MountOpts::default()).unwrap_or_else(|e| panic!("{e}"));
        let theirs = observe(&k.merged, &kdirs.upper);
        k.unmount().unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(
            ours, theirs,
            "unionfs-rs (left) against kernel overlayfs (right)"
        );
        // Not equal by both failing alike:
        for want in [
            format!("f (nodump in lower): Ok({FS_NODUMP_FL})"),
            format!("upper d/g: Ok({FS_NODUMP_FL})"),
            format!("h: Ok({FS_NOATIME_FL})"),
            format!("f: Ok({})", FS_NODUMP_FL | FS_IMMUTABLE_FL),
            format!("unlink immutable f: Err(Some({}))", libc::EPERM),
            "f gone: false".to_string(),
        ] {
            assert!(ours.contains(&want), "{want} not in {ours:#?}");
        }
    });
}
