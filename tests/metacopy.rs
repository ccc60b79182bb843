//! Metacopy files (kernel overlayfs `metacopy=on` copies up a file's metadata alone on a
//! chown, chmod, utimes or setxattr: an empty sparse upper file marked `overlay.metacopy`,
//! whose data stays below): refused by default (EPERM), as kernel overlayfs refuses them
//! without `metacopy=on`; with `metacopy=on` read from below, and given their data before a
//! change, as on kernel overlayfs mounted the same way (the oracle).

mod common;

use common::*;
use std::fs;

const TIMEOUT: u64 = 90;
const METACOPY: &str = "trusted.overlay.metacopy";
/// What the kernel needs to follow metacopy files (it turns redirects on with them).
const KERNEL_METACOPY: &str = "redirect_dir=on,metacopy=on";

fn big() -> Vec<u8> {
    (0..300_000u32).map(|i| (i % 251) as u8).collect()
}

fn base() -> Vec<Entry> {
    vec![
        file("f", "hello"),
        file_bytes("big", big()),
        file("d/g", "world"),
        sparse(
            "sp",
            1 << 20,
            &[(4096, b"in a hole"), (900_000, b"near the end")],
        ),
        file("x/y", "why"),
        file("plain", "plain"),
    ]
}

/// What kernel overlayfs with metacopy=on leaves in upper: metadata-only copies of files
/// changed by chown, chmod, utimes, setxattr; one moved after that (a redirect to its data).
fn kernel_metacopy_ops() -> Vec<Op> {
    vec![
        op_chown("f", 1000, 1000),
        op_chmod("big", 0o600),
        op_chmod("d/g", 0o640),
        op_rename("d/g", "d/g2"),
        op_utimes("sp", 1_000_000_000, 5),
        op_setxattr("x/y", "user.k", "v"),
    ]
}

fn upper_has_metacopy(upper: &std::path::Path, rel: &str) -> bool {
    xattr_get(&upper.join(rel), METACOPY).is_some()
}

fn xattr_get(p: &std::path::Path, name: &str) -> Option<Vec<u8>> {
    let c = cstr(p);
    let n = std::ffi::CString::new(name).unwrap();
    let mut buf = vec![0u8; 256];
    // SAFETY: valid NUL-terminated strings and a buffer of the length passed.
    let r = unsafe { libc::lgetxattr(c.as_ptr(), n.as_ptr(), buf.as_mut_ptr().cast(), buf.len()) };
    (r >= 0).then(|| buf[..r as usize].to_vec())
}

/// Default mount: a metacopy file is refused (EPERM) as by kernel overlayfs without
/// `metacopy=on`, never shown as the empty sparse file it is on disk.
#[test]
fn metacopy_files_are_refused_by_default() {
    with_timeout(TIMEOUT, || {
        let lowers = vec![base()];
        let prepare = |d: &Dirs| {
            let m = OverlayMount::start(
                d,
                &MountOpts {
                    kernel_extra: KERNEL_METACOPY.into(),
                    ..Default::default()
                },
            )
            .unwrap_or_else(|e| panic!("{e}"));
            for op in kernel_metacopy_ops() {
                assert_eq!(apply(&m.merged, &op), Ok(Vec::new()), "{op:?}");
            }
            m.unmount().unwrap_or_else(|e| panic!("{e}"));
        };
        let kd = Dirs::new(&lowers, &[]);
        prepare(&kd);
        let ud = Dirs::new(&lowers, &[]);
        prepare(&ud);
        let k = OverlayMount::start(&kd, &MountOpts::default()).unwrap_or_else(|e| panic!("{e}"));
        let u = Mount::start(&ud, &MountOpts::default()).unwrap_or_else(|e| panic!("{e}"));
        let metacopies = ["f", "big", "d/g2", "sp", "x/y"];
        for rel in metacopies {
            for op in [op_read(rel), op_append(rel, "+"), op_chmod(rel, 0o600)] {
                let kr = apply(&k.merged, &op);
                let ur = apply(&u.merged, &op);
                assert_eq!(kr, Err(libc::EPERM), "kernel {op:?}");
                assert_eq!(ur, kr, "{op:?}");
            }
        }
        assert_eq!(apply(&u.merged, &op_read("plain")), Ok(b"plain".to_vec()));
        // A listing that looks its entries up fails on one, as kernel overlayfs's (which
        // looks them up for their inode numbers in a directory holding copied-up files).
        assert_eq!(apply(&k.merged, &op_readdir("")), Err(libc::EPERM));
        assert_eq!(apply(&u.merged, &op_readdir("")), Err(libc::EPERM));
        k.unmount().unwrap_or_else(|e| panic!("{e}"));
        drop(u);
        for rel in metacopies {
            assert!(
                upper_has_metacopy(&ud.upper, rel),
                "{rel} must stay as it was"
            );
        }
    });
}

/// `metacopy=on`: read from the data below (a moved one through its redirect), and changed
/// after its data is copied up, as on kernel overlayfs with metacopy=on.
#[test]
fn metacopy_files_read_and_change_as_on_kernel_overlayfs() {
    // Also with a quota, which charges the data a copy-up brings.
    for opts in ["metacopy=on", "metacopy=on,size=10M"] {
        followed(opts);
    }
}

fn followed(opts: &str) {
    Differential::new(&format!("metacopy followed ({opts})"))
        .kernel_prepare_opts(KERNEL_METACOPY)
        .kernel_prepare(kernel_metacopy_ops())
        .kernel_opts(KERNEL_METACOPY)
        .candidate_args(&["-o", opts])
        .lower(base())
        // Upper forms differ by design: the kernel copies metadata alone again, we copy data.
        .no_upper_compare()
        .data(op_read("f"), "hello")
        .data(op_read("d/g2"), "world")
        .data(op_read("x/y"), "why")
        .ok(op_read("big"))
        .ok(op_read("sp"))
        .ok(op_append("f", "+"))
        .data(op_read("f"), "hello+")
        .ok(op_truncate("big", 1000))
        .ok(op_write("sp", 10, "written"))
        .ok(op_chmod("x/y", 0o600))
        .ok(op_rename("d/g2", "d/g3"))
        .data(op_read("d/g3"), "world")
        .ok(op_link("d/g3", "d/g4"))
        .data(op_read("d/g4"), "world")
        .ok(op_unlink("plain"))
        .data(op_readdir("d"), "g3\ng4")
        .timeout(TIMEOUT)
        .check_upper(|_, u| {
            // Each changed file got its data and lost the mark: the upper reads the same
            // under kernel overlayfs without metacopy=on.
            for rel in ["f", "big", "sp", "x/y", "d/g3"] {
                assert!(!upper_has_metacopy(u, rel), "{rel} still metacopy");
            }
            assert_eq!(fs::read(u.join("f")).unwrap(), b"hello+");
            assert!(fs::read(u.join("big")).unwrap() == big()[..1000], "big");
            assert_eq!(fs::read(u.join("d/g3")).unwrap(), b"world");
        })
        .run();
}

/// Metacopy files in a lower layer (an older upper used as a lower), their data further
/// below, found under their name or their redirect; a copy-up takes the metadata from the
/// metacopy file and the data from below. No data below: EIO, as on kernel overlayfs.
#[test]
fn metacopy_files_in_lower_layers() {
    // Kernel overlayfs marks every directory it copies a file up into "impure".
    let impure = || xattr("", "trusted.overlay.impure", "y");
    let top = vec![
        impure(),
        sparse("m", 5, &[]),
        xattr("m", METACOPY, ""),
        chown("m", 1000, 1000),
        chmod_entry("m", 0o600),
        // Moved from "orig" in its layer.
        sparse("moved", 4, &[]),
        xattr("moved", METACOPY, ""),
        xattr("moved", "trusted.overlay.redirect", "/src/orig"),
        chmod_entry("moved", 0o640),
        whiteout("src"),
        // Metacopy over metacopy: the data two layers down.
        sparse("two", 3, &[]),
        xattr("two", METACOPY, ""),
        chmod_entry("two", 0o604),
        // Nothing below.
        sparse("nodata", 3, &[]),
        xattr("nodata", METACOPY, ""),
    ];
    let mid = vec![
        impure(),
        sparse("two", 3, &[]),
        xattr("two", METACOPY, ""),
        chmod_entry("two", 0o606),
    ];
    let bottom = vec![
        file("m", "hello"),
        file("src/orig", "orig"),
        file("two", "two"),
    ];
    Differential::new("lower metacopy")
        .kernel_opts(KERNEL_METACOPY)
        .candidate_args(&["-o", "metacopy=on"])
        .lower(top)
        .lower(mid)
        .lower(bottom)
        .no_upper_compare()
        .data(op_read("m"), "hello")
        .data(op_read("moved"), "orig")
        .data(op_read("two"), "two")
        .err(op_read("nodata"), libc::EIO)
        .ok(op_append("m", "+"))
        .data(op_read("m"), "hello+")
        .ok(op_append("moved", "+"))
        .data(op_read("moved"), "orig+")
        .ok(op_chmod("two", 0o644))
        .data(op_read("two"), "two")
        .timeout(TIMEOUT)
        .run();
}

/// A metacopy file removed while a process holds it (an O_PATH fd) still reads its data
/// through `/proc/self/fd`, as on kernel overlayfs.
#[test]
fn a_held_removed_metacopy_file_reads_its_data() {
    with_timeout(TIMEOUT, || {
        let lowers = vec![vec![file("f", "hello")]];
        let upper = vec![
            xattr("", "trusted.overlay.impure", "y"),
            sparse("f", 5, &[]),
            xattr("f", METACOPY, ""),
            chmod_entry("f", 0o600),
        ];
        let read_held = |root: &std::path::Path, what: &str| {
            use std::os::fd::AsRawFd;
            let p = root.join("f");
            let held = nix::fcntl::open(
                &p,
                nix::fcntl::OFlag::O_PATH | nix::fcntl::OFlag::O_CLOEXEC,
                nix::sys::stat::Mode::empty(),
            )
            .unwrap_or_else(|e| panic!("{what}: O_PATH open: {e}"));
            fs::remove_file(&p).unwrap_or_else(|e| panic!("{what}: unlink: {e}"));
            let proc = format!("/proc/self/fd/{}", held.as_raw_fd());
            let got = fs::read_to_string(&proc)
                .unwrap_or_else(|e| panic!("{what}: read of the removed file: {e}"));
            assert_eq!(got, "hello", "{what}");
        };
        let kd = Dirs::new(&lowers, &upper);
        let k = OverlayMount::start(
            &kd,
            &MountOpts {
                kernel_extra: KERNEL_METACOPY.into(),
                ..Default::default()
            },
        )
        .unwrap_or_else(|e| panic!("{e}"));
        read_held(&k.merged, "kernel overlayfs");
        k.unmount().unwrap_or_else(|e| panic!("{e}"));
        for extra in [
            &["-o", "metacopy=on"][..],
            &["-o", "metacopy=on", "--cache-size", "0"],
        ] {
            let ud = Dirs::new(&lowers, &upper);
            let u = Mount::start(
                &ud,
                &MountOpts {
                    extra: extra.iter().map(|s| s.to_string()).collect(),
                    ..Default::default()
                },
            )
            .unwrap_or_else(|e| panic!("{e}"));
            read_held(&u.merged, &format!("unionfs-rs {extra:?}"));
            drop(u);
        }
    });
}

/// Data-only lower layers (`lowerdir=L::D1::D2`, kernel overlayfs 6.5+, composefs's layout):
/// never in the merged view; a metacopy file's absolute redirect finds its data there (in
/// the first that holds it), without `metacopy=on`, as on kernel overlayfs. Its image's
/// directories carry no `impure` mark: the metacopy files are recognised by holding no data.
#[test]
fn data_only_layers_hold_the_data_of_metacopy_files() {
    let image = vec![
        sparse("etc/conf", 4, &[]),
        xattr("etc/conf", METACOPY, ""),
        xattr("etc/conf", "trusted.overlay.redirect", "/ab/cdef"),
        chmod_entry("etc/conf", 0o640),
        sparse("bin/tool", 5, &[]),
        xattr("bin/tool", METACOPY, ""),
        xattr("bin/tool", "trusted.overlay.redirect", "/12/3456"),
        chmod_entry("bin/tool", 0o755),
        // No object anywhere.
        sparse("lost", 3, &[]),
        xattr("lost", METACOPY, ""),
        xattr("lost", "trusted.overlay.redirect", "/no/such"),
        file("plain", "plain"),
    ];
    let objects1 = vec![file("ab/cdef", "conf"), file("only-in-data", "x")];
    let objects2 = vec![file("12/3456", "tool!"), file("ab/cdef", "not this one")];
    for readonly in [true, false] {
        let mut d = Differential::new(&format!("data-only layers (read-only: {readonly})"))
            .lower(image.clone())
            .lower(objects1.clone())
            .lower(objects2.clone())
            .data_only(2)
            .no_upper_compare()
            .data(op_read("etc/conf"), "conf")
            .data(op_read("bin/tool"), "tool!")
            // Looked for only when opened, as by the kernel: listed, stat works, open fails.
            .err(op_read("lost"), libc::ENOENT)
            .err(op_read("only-in-data"), libc::ENOENT)
            .err(op_read("ab/cdef"), libc::ENOENT)
            .data(op_readdir(""), "bin\netc\nlost\nplain");
        if readonly {
            d = d.readonly();
        } else {
            d = d
                .ok(op_append("etc/conf", "+"))
                .data(op_read("etc/conf"), "conf+")
                .ok(op_chmod("bin/tool", 0o700))
                .data(op_read("bin/tool"), "tool!");
        }
        d.timeout(TIMEOUT).run();
    }
}
