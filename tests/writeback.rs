//! The kernel's FUSE write-back cache (`--writeback-cache`, on by default where passthrough is
//! impossible, i.e. rootless): the kernel keeps written pages and writes them to the daemon
//! later, reads partly written pages in through write-only handles, and places appends itself.
//! These tests turn it on as root (with passthrough off, which the kernel excludes anyway) and
//! check what it changes: appends from several descriptors, partial-page writes through
//! O_WRONLY, mmap, truncate, and that kernel-held data reaches upper on unmount, SIGTERM,
//! `unionfs-rs sync` and fsync; and that a quota keeps it off.

mod common;

use common::*;
use std::fs::{self, File, OpenOptions};
use std::io::Write;
use std::os::unix::fs::FileExt;
use std::process::Command;
use std::time::Duration;

const TIMEOUT: u64 = 120;

fn mount(lower: Vec<Entry>, args: &[&str]) -> Mount {
    let mut all = vec!["--passthrough", "off", "--writeback-cache", "on"];
    all.extend_from_slice(args);
    Mount::with_args(lower, &all)
}

fn assert_on(m: &Mount) {
    let s = daemon_stats(&m.merged);
    assert_eq!(
        s["kernel_writeback_cache"], 1,
        "write-back cache not on: {s:?}"
    );
}

#[test]
fn appends_partial_pages_mmap_and_truncate() {
    with_timeout(TIMEOUT, || {
        appends_partial_pages_mmap_and_truncate_with(&[]);
    });
}

/// The same with the daemon's page cache off: the backing files themselves must then be
/// opened readable and without O_APPEND.
#[test]
fn appends_partial_pages_mmap_and_truncate_without_page_cache() {
    with_timeout(TIMEOUT, || {
        appends_partial_pages_mmap_and_truncate_with(&["--cache-size", "0"]);
    });
}

fn appends_partial_pages_mmap_and_truncate_with(args: &[&str]) {
    {
        let base: Vec<u8> = (0..8192u32).map(|i| (i % 249) as u8).collect();
        let m = mount(vec![file_bytes("eight", base.clone())], args);
        assert_on(&m);
        // Appends through two descriptors interleave in order (the kernel places them).
        let mut a = OpenOptions::new()
            .create(true)
            .append(true)
            .open(m.path("log"))
            .unwrap();
        let mut b = OpenOptions::new().append(true).open(m.path("log")).unwrap();
        a.write_all(b"one\n").unwrap();
        b.write_all(b"two\n").unwrap();
        a.write_all(b"three\n").unwrap();
        drop((a, b));
        assert_eq!(
            fs::read_to_string(m.path("log")).unwrap(),
            "one\ntwo\nthree\n"
        );
        // A write-only handle writing part of a page of a lower file: the kernel reads the
        // rest of the page in through it (after the copy-up).
        let w = OpenOptions::new()
            .write(true)
            .open(m.path("eight"))
            .unwrap();
        w.write_all_at(b"XYZ", 5000).unwrap();
        drop(w);
        let mut want = base.clone();
        want[5000..5003].copy_from_slice(b"XYZ");
        assert_eq!(fs::read(m.path("eight")).unwrap(), want);
        // mmap writes, then truncate: size and contents as written.
        let f = OpenOptions::new()
            .read(true)
            .write(true)
            .open(m.path("eight"))
            .unwrap();
        let mut map = SharedMap::new(&f, 8192);
        map.bytes()[100] = b'M';
        want[100] = b'M';
        drop(map);
        f.set_len(6000).unwrap();
        drop(f);
        want.truncate(6000);
        assert_eq!(fs::read(m.path("eight")).unwrap(), want);
        assert_eq!(fs::metadata(m.path("eight")).unwrap().len(), 6000);
        let mut m = m;
        {
            let merged = m.dirs.merged.clone();
            m.unmount_retrying(|| {
                let mut c = Command::new("fusermount3");
                c.arg("-u").arg(&merged);
                c
            })
        }
        .unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(fs::read(m.dirs.upper.join("eight")).unwrap(), want);
        assert_eq!(
            fs::read_to_string(m.dirs.upper.join("log")).unwrap(),
            "one\ntwo\nthree\n"
        );
    }
}

/// Data the kernel still holds when the mount goes away reaches upper: on unmount, on SIGTERM,
/// and with `unionfs-rs sync` or fsync while mounted.
#[test]
fn kernel_held_data_reaches_upper() {
    with_timeout(TIMEOUT, || {
        let data: Vec<u8> = (0..3_000_000u32).map(|i| (i % 241) as u8).collect();
        // Unmount right after writing.
        let mut m = mount(vec![], &[]);
        fs::write(m.path("u"), &data).unwrap();
        {
            let merged = m.dirs.merged.clone();
            m.unmount_retrying(|| {
                let mut c = Command::new("fusermount3");
                c.arg("-u").arg(&merged);
                c
            })
        }
        .unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(
            fs::read(m.dirs.upper.join("u")).unwrap(),
            data,
            "after unmount"
        );
        // SIGTERM right after writing.
        let m = mount(vec![], &[]);
        fs::write(m.path("t"), &data).unwrap();
        let pid = m.pid.expect("daemon pid");
        // SAFETY: kill(2) of the daemon this test started.
        assert_eq!(unsafe { libc::kill(pid, libc::SIGTERM) }, 0);
        let t0 = std::time::Instant::now();
        while is_fuse_mounted(&m.dirs.merged) && t0.elapsed() < Duration::from_secs(30) {
            std::thread::sleep(Duration::from_millis(50));
        }
        assert_eq!(
            fs::read(m.dirs.upper.join("t")).unwrap(),
            data,
            "after SIGTERM"
        );
        drop(m);
        // `unionfs-rs sync` and fsync while mounted.
        let m = mount(vec![], &[]);
        fs::write(m.path("s"), &data).unwrap();
        let (st, out, err) = run_with_timeout(
            Command::new(bin()).arg("sync").arg(&m.merged),
            Duration::from_secs(30),
        )
        .unwrap_or_else(|e| panic!("{e}"));
        assert!(st.success(), "sync: {out}{err}");
        assert_eq!(
            fs::read(m.dirs.upper.join("s")).unwrap(),
            data,
            "after sync"
        );
        let mut f = File::create(m.path("f")).unwrap();
        f.write_all(&data).unwrap();
        f.sync_all().unwrap();
        assert_eq!(
            fs::read(m.dirs.upper.join("f")).unwrap(),
            data,
            "after fsync"
        );
        drop(f);
        m.unmount().unwrap_or_else(|e| panic!("{e}"));
    });
}

/// With a quota the kernel must not acknowledge writes the quota may refuse: the write-back
/// cache stays off and a write past the limit fails in write(2).
#[test]
fn quota_keeps_the_kernel_write_back_cache_off() {
    with_timeout(TIMEOUT, || {
        let m = mount(vec![], &["--size", "1M"]);
        let s = daemon_stats(&m.merged);
        assert_eq!(s["kernel_writeback_cache"], 0, "{s:?}");
        let mut f = File::create(m.path("big")).unwrap();
        let chunk = vec![1u8; 64 << 10];
        let mut refused = None;
        for _ in 0..64 {
            if let Err(e) = f.write_all(&chunk) {
                refused = Some(e);
                break;
            }
        }
        let e = refused.expect("4 MiB written under a 1 MiB quota");
        assert_eq!(e.raw_os_error(), Some(libc::ENOSPC));
        drop(f);
        m.unmount().unwrap_or_else(|e| panic!("{e}"));
    });
}

/// A lower file open for reading is removed (unlink, or a rename over it), then closed: the
/// kernel hands the file's times (made dirty by the removal) over at the close, and nothing of
/// the file is kept in upper to put them on. The close succeeds, as on kernel overlayfs.
/// (QA: the daemon answered the SETATTR with ENOENT and close(2) failed with EIO.) Upper
/// files, and a lower file renamed away, for comparison.
#[test]
fn closing_a_removed_lower_file_succeeds() {
    with_timeout(TIMEOUT, || {
        let lower = vec![
            file("gone", "lower 1\n"),
            file("over", "lower 2\n"),
            file("by", "lower 3\n"),
            file("away", "lower 4\n"),
        ];
        let m = mount(lower, &[]);
        assert_on(&m);
        let close = |f: File| {
            use std::os::fd::IntoRawFd;
            // SAFETY: close(2) of the descriptor just taken out of `f`.
            let r = unsafe { libc::close(f.into_raw_fd()) };
            (r == 0)
                .then_some(())
                .ok_or_else(std::io::Error::last_os_error)
        };
        let read_open = |name: &str| {
            let f = File::open(m.path(name)).unwrap();
            let mut b = [0u8; 3];
            f.read_at(&mut b, 0).unwrap();
            f
        };
        let f = read_open("gone");
        fs::remove_file(m.path("gone")).unwrap();
        close(f).unwrap_or_else(|e| panic!("close after unlink: {e}"));
        let f = read_open("over");
        fs::write(m.path("new"), "new\n").unwrap();
        fs::rename(m.path("new"), m.path("over")).unwrap();
        close(f).unwrap_or_else(|e| panic!("close after a rename over it: {e}"));
        let f = read_open("over");
        fs::rename(m.path("by"), m.path("over")).unwrap();
        close(f).unwrap_or_else(|e| panic!("close after a lower file renamed over it: {e}"));
        let f = read_open("away");
        fs::rename(m.path("away"), m.path("moved")).unwrap();
        close(f).unwrap_or_else(|e| panic!("close after renamed away: {e}"));
        assert_eq!(fs::read_to_string(m.path("over")).unwrap(), "lower 3\n");
        assert_eq!(fs::read_to_string(m.path("moved")).unwrap(), "lower 4\n");
        assert!(!m.path("gone").exists());
        m.unmount().unwrap_or_else(|e| panic!("{e}"));
    });
}

/// SEEK_DATA / SEEK_HOLE under the kernel's write-back cache. A file nobody writes: its holes
/// as the upper file has them, before and after the question below. A file written through a
/// descriptor still open, whose pages the kernel may hold unseen by the daemon: never ENXIO
/// inside the file (QA: SEEK_DATA and SEEK_HOLE from 0 both answered ENXIO, the daemon's file
/// being still empty): EINVAL, as a filesystem without SEEK_DATA (review: a first version
/// answered ENOSYS, and the kernel then stopped asking for every file of the mount).
#[test]
fn seek_data_and_hole_with_kernel_held_pages() {
    use std::os::fd::AsRawFd;
    with_timeout(TIMEOUT, || {
        let m = mount(vec![], &[]);
        assert_on(&m);
        let seek = |f: &File, off: i64, whence: i32| {
            // SAFETY: lseek(2) on a descriptor we own.
            let r = unsafe { libc::lseek(f.as_raw_fd(), off, whence) };
            if r < 0 {
                Err(std::io::Error::last_os_error().raw_os_error().unwrap_or(0))
            } else {
                Ok(r)
            }
        };
        // Right after a close the kernel's RELEASE of the writer's handle may not have come
        // yet (it is sent in the background): EINVAL until it has (at most 5 s here).
        let settled = |f: &File, off: i64, whence: i32| {
            let deadline = std::time::Instant::now() + Duration::from_secs(5);
            loop {
                let r = seek(f, off, whence);
                if r != Err(libc::EINVAL) || std::time::Instant::now() > deadline {
                    return r;
                }
                std::thread::sleep(Duration::from_millis(10));
            }
        };
        const MIB: i64 = 1 << 20;
        let f = File::create(m.path("closed")).unwrap();
        f.write_all_at(&[b'c'; 4096], MIB as u64).unwrap();
        drop(f);
        let f = File::open(m.path("closed")).unwrap();
        assert_eq!(
            settled(&f, 0, libc::SEEK_DATA),
            Ok(MIB),
            "a closed sparse file"
        );
        assert_eq!(seek(&f, 0, libc::SEEK_HOLE), Ok(0));
        drop(f);
        let f = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(m.path("open"))
            .unwrap();
        f.write_all_at(&[b'o'; 4096], MIB as u64).unwrap();
        for (off, whence, right) in [
            (0, libc::SEEK_DATA, Ok(MIB)),
            (0, libc::SEEK_HOLE, Ok(0)),
            (MIB + 100, libc::SEEK_DATA, Ok(MIB + 100)),
            (MIB + 100, libc::SEEK_HOLE, Ok(1_052_672)),
        ] {
            let got = seek(&f, off, whence);
            assert!(
                got == right || got == Err(libc::EINVAL),
                "whence {whence} from {off} of a file with data at 1 MiB: {got:?}"
            );
        }
        drop(f);
        let f = File::open(m.path("closed")).unwrap();
        assert_eq!(
            settled(&f, 0, libc::SEEK_DATA),
            Ok(MIB),
            "a closed sparse file, after the question about the open one"
        );
        drop(f);
        m.unmount().unwrap_or_else(|e| panic!("{e}"));
    });
}
