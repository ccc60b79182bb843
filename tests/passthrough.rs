//! FUSE passthrough (DESIGN.md section 5): as root, files in upper (no quota) and every file of a
//! read-only union are read and written by the kernel itself; lower files of a writable union
//! (unless `--passthrough lower`), quota mounts and `--passthrough off` go through the daemon. The kernel refuses (EIO) an open
//! that mixes the two modes on one inode, so these tests open files every way that could mix
//! them: a lower file open for reading while another open copies it up, readers and writers of
//! one file at once, mmap, and a handover from the page cache.

mod common;

use common::*;
use std::fs::{self, File, OpenOptions};
use std::io::{Read, Seek, SeekFrom, Write};
use std::os::unix::fs::FileExt;
use std::path::Path;

const TIMEOUT: u64 = 120;

fn opens(m: &Path) -> u64 {
    daemon_stats(m)["passthrough_opens"]
}

/// Passthrough can be tested here: root, and test directories the kernel accepts backing
/// files from (not on a stacked filesystem such as overlayfs or FUSE: the mount offers a stack
/// depth of 1, so registering their files fails and everything goes through the daemon).
fn can_test_passthrough() -> bool {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        eprintln!("skipped: passthrough needs root");
        return false;
    }
    let probe = test_tempdir();
    let st = nix::sys::statfs::statfs(probe.path()).expect("statfs of the test directory");
    const OVERLAYFS_SUPER_MAGIC: i64 = 0x794c_7630;
    const FUSE_SUPER_MAGIC: i64 = 0x6573_5546;
    let fs = st.filesystem_type().0 as i64;
    if fs == OVERLAYFS_SUPER_MAGIC || fs == FUSE_SUPER_MAGIC {
        eprintln!("skipped: test directories are on a stacked filesystem ({fs:#x})");
        return false;
    }
    true
}

#[test]
fn upper_files_are_passthrough_and_lower_files_are_not() {
    if !can_test_passthrough() {
        return;
    }
    with_timeout(TIMEOUT, || {
        let m = Mount::with_args(vec![file("low", "lower data")], &[]);
        let s = daemon_stats(&m.merged);
        assert_eq!(s["passthrough"], 1, "passthrough not in use as root: {s:?}");
        let before = opens(&m.merged);
        // A lower file open for reading goes through the daemon.
        assert_eq!(fs::read_to_string(m.path("low")).unwrap(), "lower data");
        assert_eq!(
            opens(&m.merged),
            before,
            "a lower file was opened in passthrough mode"
        );
        // A new file: created, written, read back, appended, truncated, all by the kernel.
        let data: Vec<u8> = (0..3_000_000u32).map(|i| (i % 251) as u8).collect();
        fs::write(m.path("new"), &data).unwrap();
        assert_eq!(fs::read(m.path("new")).unwrap(), data);
        let mut f = OpenOptions::new().append(true).open(m.path("new")).unwrap();
        f.write_all(b"tail").unwrap();
        drop(f);
        assert_eq!(fs::metadata(m.path("new")).unwrap().len(), 3_000_004);
        let f = OpenOptions::new().write(true).open(m.path("new")).unwrap();
        f.set_len(10).unwrap();
        drop(f);
        assert_eq!(fs::read(m.path("new")).unwrap(), &data[..10]);
        assert!(
            opens(&m.merged) >= before + 5,
            "upper files did not use passthrough"
        );
        // What the kernel wrote is in upper.
        assert_eq!(fs::read(m.dirs.upper.join("new")).unwrap(), &data[..10]);
        m.unmount().unwrap_or_else(|e| panic!("{e}"));
    });
}

/// A lower file open for reading (through the daemon) while it is opened for writing (copy-up):
/// the writer must not get EIO, and the reader sees the written data (kernel overlayfs does
/// too). Once both are closed the file is in upper and its opens become passthrough, readers
/// and writers at once.
#[test]
fn modes_never_mix_on_one_file() {
    if !can_test_passthrough() {
        return;
    }
    with_timeout(TIMEOUT, || {
        let m = Mount::with_args(vec![file("f", "0123456789")], &[]);
        let mut reader = File::open(m.path("f")).unwrap();
        let mut buf = [0u8; 4];
        reader.read_exact(&mut buf).unwrap();
        assert_eq!(&buf, b"0123");
        let writer = OpenOptions::new().write(true).open(m.path("f")).unwrap();
        writer.write_all_at(b"abcdefghij", 0).unwrap();
        writer.sync_all().unwrap();
        let mut rest = String::new();
        reader.read_to_string(&mut rest).unwrap();
        assert_eq!(rest, "efghij", "reader opened before the copy-up");
        drop(reader);
        drop(writer);
        let before = opens(&m.merged);
        // Now in upper: two readers and a writer at once, all passthrough.
        let r1 = File::open(m.path("f")).unwrap();
        let w = OpenOptions::new()
            .read(true)
            .write(true)
            .open(m.path("f"))
            .unwrap();
        let r2 = File::open(m.path("f")).unwrap();
        assert_eq!(opens(&m.merged), before + 3);
        w.write_all_at(b"XY", 4).unwrap();
        let mut got = [0u8; 10];
        r1.read_exact_at(&mut got, 0).unwrap();
        assert_eq!(&got, b"abcdXYghij");
        r2.read_exact_at(&mut got, 0).unwrap();
        assert_eq!(&got, b"abcdXYghij");
        // mmap of a passthrough file sees the same bytes, and its writes reach readers.
        let mut map = SharedMap::new(&w, 10);
        assert_eq!(map.bytes(), b"abcdXYghij");
        map.bytes()[0] = b'M';
        let _ = map.sync();
        drop(map);
        r1.read_exact_at(&mut got, 0).unwrap();
        assert_eq!(&got, b"MbcdXYghij");
        drop((r1, r2, w));
        assert_eq!(
            fs::read(m.dirs.upper.join("f")).unwrap(),
            b"MbcdXYghij",
            "upper file"
        );
        m.unmount().unwrap_or_else(|e| panic!("{e}"));
    });
}

/// A lower file read through the daemon (the kernel caches its pages), closed, then opened for
/// appending: that open copies it up and stays with the daemon, so the kernel's pages of it
/// survive (a passthrough open would drop them all); they must show the appended byte, and the
/// next open, the file being in upper with nothing open, is passthrough again and sees it too.
#[test]
fn a_copy_up_of_a_file_just_read_keeps_the_kernels_pages_and_stays_right() {
    if !can_test_passthrough() {
        return;
    }
    with_timeout(TIMEOUT, || {
        let data: Vec<u8> = (0..8_000_000u32).map(|i| (i % 253) as u8).collect();
        let m = Mount::with_args(
            vec![Entry::File {
                path: "big".into(),
                data: data.clone(),
                mode: 0o644,
            }],
            &[],
        );
        assert_eq!(fs::read(m.path("big")).unwrap(), data);
        let before = opens(&m.merged);
        let mut f = OpenOptions::new().append(true).open(m.path("big")).unwrap();
        f.write_all(b"!").unwrap();
        // Written back, so the next open may hand the file over to the kernel.
        f.sync_all().unwrap();
        drop(f);
        assert_eq!(
            opens(&m.merged),
            before,
            "the copy-up open of a file the kernel caches was passthrough"
        );
        let mut want = data;
        want.push(b'!');
        // Passthrough now (the kernel drops its pages and reads the upper file itself).
        assert_eq!(fs::read(m.path("big")).unwrap(), want);
        assert_eq!(
            opens(&m.merged),
            before + 1,
            "the next open of the upper file was not passthrough"
        );
        // A passthrough writer now, then a reader: what the kernel wrote is seen.
        let f = OpenOptions::new().write(true).open(m.path("big")).unwrap();
        f.write_all_at(b"XYZ", 1_000_000).unwrap();
        drop(f);
        want[1_000_000..1_000_003].copy_from_slice(b"XYZ");
        assert_eq!(fs::read(m.path("big")).unwrap(), want);
        assert_eq!(
            fs::read(m.dirs.upper.join("big")).unwrap(),
            want,
            "upper file"
        );
        m.unmount().unwrap_or_else(|e| panic!("{e}"));
    });
}

/// Data written through the page cache (a file opened while a daemon-mode handle was open)
/// stays with the daemon until it is written back; then later opens are passthrough and see it.
#[test]
fn page_cache_hands_a_file_over_only_when_written_back() {
    if !can_test_passthrough() {
        return;
    }
    with_timeout(TIMEOUT, || {
        let m = Mount::with_args(
            vec![file("f", "lower")],
            &[
                "--writeback-on-close",
                "0",
                "--dirty-expire-centisecs",
                "100000",
                "--dirty-writeback-centisecs",
                "0",
            ],
        );
        let keep = File::open(m.path("f")).unwrap(); // daemon mode (lower file)
        let mut w = OpenOptions::new().write(true).open(m.path("f")).unwrap();
        w.write_all(b"cached write").unwrap();
        drop(w);
        drop(keep);
        assert!(
            daemon_stats(&m.merged)["dirty_bytes"] > 0,
            "write was not cached"
        );
        let before = opens(&m.merged);
        // Dirty pages: the next open stays with the daemon, and reads them.
        assert_eq!(fs::read_to_string(m.path("f")).unwrap(), "cached write");
        assert_eq!(opens(&m.merged), before, "dirty file handed to the kernel");
        // Written back: now passthrough, same bytes.
        let (ok, _, err) = run_with_timeout(
            std::process::Command::new(bin()).arg("sync").arg(&m.merged),
            std::time::Duration::from_secs(30),
        )
        .map(|(st, o, e)| (st.success(), o, e))
        .unwrap_or_else(|e| panic!("{e}"));
        assert!(ok, "unionfs-rs sync: {err}");
        let mut f = OpenOptions::new()
            .read(true)
            .write(true)
            .open(m.path("f"))
            .unwrap();
        assert_eq!(
            opens(&m.merged),
            before + 1,
            "written-back file not handed over"
        );
        let mut s = String::new();
        f.read_to_string(&mut s).unwrap();
        assert_eq!(s, "cached write");
        f.seek(SeekFrom::Start(0)).unwrap();
        f.write_all(b"DIRECT").unwrap();
        drop(f);
        assert_eq!(fs::read_to_string(m.path("f")).unwrap(), "DIRECT write");
        assert_eq!(fs::metadata(m.path("f")).unwrap().len(), 12);
        m.unmount().unwrap_or_else(|e| panic!("{e}"));
    });
}

#[test]
fn quota_and_passthrough_off_keep_io_in_the_daemon() {
    if !can_test_passthrough() {
        return;
    }
    with_timeout(TIMEOUT, || {
        for args in [&["--size", "100M"][..], &["--passthrough", "off"][..]] {
            let m = Mount::with_args(vec![], args);
            fs::write(m.path("new"), vec![7u8; 1 << 20]).unwrap();
            assert_eq!(fs::read(m.path("new")).unwrap(), vec![7u8; 1 << 20]);
            let s = daemon_stats(&m.merged);
            assert_eq!(s["passthrough_opens"], 0, "{args:?}: {s:?}");
            m.unmount().unwrap_or_else(|e| panic!("{e}"));
        }
    });
}

#[test]
fn read_only_union_reads_lower_files_by_passthrough() {
    if !can_test_passthrough() {
        return;
    }
    with_timeout(TIMEOUT, || {
        let data: Vec<u8> = (0..1_000_000u32).map(|i| (i % 253) as u8).collect();
        let m = mount_readonly(vec![file_bytes("big", data.clone()), file("small", "s")]);
        assert_eq!(fs::read(m.path("big")).unwrap(), data);
        assert_eq!(fs::read_to_string(m.path("small")).unwrap(), "s");
        assert_eq!(opens(&m.merged), 2);
        let e = OpenOptions::new()
            .write(true)
            .open(m.path("small"))
            .unwrap_err();
        assert_eq!(e.raw_os_error(), Some(libc::EROFS));
        m.unmount().unwrap_or_else(|e| panic!("{e}"));
    });
}

fn mount_readonly(lower: Vec<Entry>) -> Mount {
    let dirs = Dirs::new(&[lower], &[]);
    Mount::start(
        &dirs,
        &MountOpts {
            readonly: true,
            ..MountOpts::default()
        },
    )
    .unwrap_or_else(|e| panic!("{e}"))
}

/// `passthrough=lower`: read-only opens of lower files are passthrough too (the kernel reads
/// the lower file itself), and nothing may change such a file while they last — they would
/// read on from the lower file. An open for writing (which copies the file up) or a truncate
/// fails with ETXTBSY meanwhile (after a short wait for readers just closing it); metadata
/// changes go ahead, and a handle opened after such a change holds the lower file. Once they are
/// closed, the change is made and every later open sees it. A reader that has just closed
/// does not hold up the next writer (its RELEASE comes after close(2) returns).
#[test]
fn lower_passthrough_reads_lower_files_and_holds_changes_off_while_they_are_open() {
    if !can_test_passthrough() {
        return;
    }
    with_timeout(TIMEOUT, || {
        let data: Vec<u8> = (0..2_000_000u32).map(|i| (i % 249) as u8).collect();
        let mut lower = vec![
            file_bytes("big", data.clone()),
            file("f", "0123456789"),
            file("g", "abcdefghij"),
        ];
        for i in 0..50 {
            lower.push(file(&format!("s{i}"), &format!("small {i}\n")));
        }
        let m = Mount::with_args(lower, &["--passthrough", "lower"]);
        let lower_opens = |m: &Path| daemon_stats(m)["lower_passthrough_opens"];
        assert_eq!(fs::read(m.path("big")).unwrap(), data);
        assert_eq!(
            lower_opens(&m.merged),
            1,
            "a lower file was not passthrough"
        );

        // A reader holds the lower file: changes of its data wait, then fail.
        let mut reader = File::open(m.path("f")).unwrap();
        let mut buf = [0u8; 4];
        reader.read_exact(&mut buf).unwrap();
        let t = std::time::Instant::now();
        let e = OpenOptions::new()
            .append(true)
            .open(m.path("f"))
            .unwrap_err();
        assert_eq!(
            e.raw_os_error(),
            Some(libc::ETXTBSY),
            "open for writing: {e}"
        );
        assert!(
            t.elapsed() >= std::time::Duration::from_millis(90),
            "refused without waiting for the reader: {:?}",
            t.elapsed()
        );
        let e = OpenOptions::new()
            .write(true)
            .truncate(true)
            .open(m.path("f"))
            .unwrap_err();
        assert_eq!(e.raw_os_error(), Some(libc::ETXTBSY), "O_TRUNC: {e}");
        let path =
            std::ffi::CString::new(m.path("f").into_os_string().into_encoded_bytes()).unwrap();
        // SAFETY: truncate(2) of a NUL-terminated path.
        let r = unsafe { libc::truncate(path.as_ptr(), 3) };
        assert_eq!(r, -1);
        assert_eq!(
            std::io::Error::last_os_error().raw_os_error(),
            Some(libc::ETXTBSY),
            "truncate(2)"
        );
        // Metadata changes copy up, and the data stays the same for everyone.
        fs::set_permissions(
            m.path("f"),
            std::os::unix::fs::PermissionsExt::from_mode(0o600),
        )
        .unwrap();
        let second = fs::read_to_string(m.path("f")).unwrap();
        assert_eq!(second, "0123456789");
        let mut rest = String::new();
        reader.read_to_string(&mut rest).unwrap();
        assert_eq!(rest, "456789");
        drop(reader);
        let s = daemon_stats(&m.merged);
        assert_eq!(s["lower_busy_refusals"], 3, "{s:?}");

        // Closed: the write goes ahead, and every later open sees it.
        let w = OpenOptions::new().write(true).open(m.path("f")).unwrap();
        w.write_all_at(b"AB", 0).unwrap();
        drop(w);
        assert_eq!(fs::read_to_string(m.path("f")).unwrap(), "AB23456789");
        assert_eq!(
            fs::read_to_string(m.dirs.upper.join("f")).unwrap(),
            "AB23456789"
        );

        // An open after a metadata copy-up shares the readers' backing, the lower file: a
        // change through it once the name is gone must not reach the lower file (the handle
        // is not one of an upper file).
        let reader = File::open(m.path("g")).unwrap();
        fs::set_permissions(
            m.path("g"),
            std::os::unix::fs::PermissionsExt::from_mode(0o600),
        )
        .unwrap();
        let late = File::open(m.path("g")).unwrap();
        fs::remove_file(m.path("g")).unwrap();
        let _ = late.set_permissions(std::os::unix::fs::PermissionsExt::from_mode(0o751));
        let lower_g = fs::metadata(m.dirs.lowers[0].join("g")).unwrap();
        assert_eq!(
            std::os::unix::fs::PermissionsExt::mode(&lower_g.permissions()) & 0o7777,
            0o644,
            "a change through a reader of the lower file reached the lower file"
        );
        let mut all = String::new();
        (&late).read_to_string(&mut all).unwrap();
        assert_eq!(all, "abcdefghij");
        drop((reader, late));

        // A mapping of the file is the lower file's own (the kernel maps the backing file),
        // so it holds nothing up once the descriptor is closed: the writer goes ahead, and the
        // mapping goes on showing the lower file, as kernel overlayfs documents for a lower
        // file mapped before a change.
        let big = File::open(m.path("big")).unwrap();
        // SAFETY: a private read-only mapping of an open descriptor, unmapped below.
        let map = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                4096,
                libc::PROT_READ,
                libc::MAP_PRIVATE,
                std::os::fd::AsRawFd::as_raw_fd(&big),
                0,
            )
        };
        assert_ne!(map, libc::MAP_FAILED);
        drop(big);
        let w = OpenOptions::new().write(true).open(m.path("big")).unwrap();
        w.write_all_at(b"Z", 0).unwrap();
        w.write_all_at(b"Z", 1_999_999).unwrap();
        drop(w);
        // SAFETY: the mapping is 4096 readable bytes.
        let mapped = unsafe { std::slice::from_raw_parts(map as *const u8, 16) }.to_vec();
        assert_eq!(mapped, data[..16], "the mapping of the lower file");
        // SAFETY: unmapping the mapping made above, no longer used.
        assert_eq!(unsafe { libc::munmap(map, 4096) }, 0);
        let mut want = data.clone();
        want[0] = b'Z';
        want[1_999_999] = b'Z';
        assert_eq!(fs::read(m.path("big")).unwrap(), want);

        // Read, closed, then written at once: the reader's release is never in the way.
        let before = daemon_stats(&m.merged);
        for i in 0..50 {
            let p = m.path(&format!("s{i}"));
            assert_eq!(fs::read_to_string(&p).unwrap(), format!("small {i}\n"));
            let mut a = OpenOptions::new().append(true).open(&p).unwrap();
            a.write_all(b"more\n").unwrap();
        }
        for i in 0..50 {
            let p = m.path(&format!("s{i}"));
            assert_eq!(
                fs::read_to_string(&p).unwrap(),
                format!("small {i}\nmore\n")
            );
        }
        let s = daemon_stats(&m.merged);
        assert_eq!(
            s["lower_passthrough_opens"],
            before["lower_passthrough_opens"] + 50,
            "{s:?}"
        );
        assert_eq!(
            s["lower_busy_refusals"], before["lower_busy_refusals"],
            "{s:?}"
        );
        // The lower layer is untouched.
        assert_eq!(fs::read(m.dirs.lowers[0].join("big")).unwrap(), data);
        assert_eq!(
            fs::read_to_string(m.dirs.lowers[0].join("f")).unwrap(),
            "0123456789"
        );
        m.unmount().unwrap_or_else(|e| panic!("{e}"));
    });
}
