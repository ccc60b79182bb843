//! copy_file_range(2) inside the mount is answered by the daemon (FUSE_COPY_FILE_RANGE): upper's
//! filesystem copies the range itself instead of the kernel reading and writing it through the
//! mount. The same calls on kernel overlayfs are the oracle: what each call returns (bytes or
//! errno) and what every file holds afterwards. Data cached on either side (the daemon's page
//! cache, the kernel's write-back cache) must reach the copy, and no cached page may show the
//! destination's old data after it.

mod common;

use common::*;
use std::fs::{self, File, OpenOptions};
use std::io::Write;
use std::os::fd::AsRawFd;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

const TIMEOUT: u64 = 120;
const KIB: usize = 1 << 10;
const MIB: usize = 1 << 20;
/// With the page cache, without it, and without it or passthrough.
const CACHE_CONFIGS: &[&[&str]] = &[
    &[],
    &["--cache-size", "0"],
    &["--passthrough", "off", "--cache-size", "0"],
];

fn pattern(len: usize, seed: u8) -> Vec<u8> {
    (0..len)
        .map(|i| ((i as u64).wrapping_mul(2_654_435_761) >> 13) as u8 ^ seed)
        .collect()
}

/// copy_file_range(2) with explicit offsets: bytes copied, or the errno.
fn cfr(src: &File, off_in: u64, dst: &File, off_out: u64, len: usize) -> Result<usize, i32> {
    let mut oi = off_in as libc::loff_t;
    let mut oo = off_out as libc::loff_t;
    // SAFETY: copy_file_range(2) between two fds we own, with offsets on our stack.
    let n = unsafe {
        libc::copy_file_range(src.as_raw_fd(), &mut oi, dst.as_raw_fd(), &mut oo, len, 0)
    };
    if n < 0 {
        Err(std::io::Error::last_os_error().raw_os_error().unwrap_or(0))
    } else {
        Ok(n as usize)
    }
}

fn lowers() -> Vec<Vec<Entry>> {
    vec![vec![
        file_bytes("src", pattern(3 * MIB + 123, 1)),
        file_bytes("lowdst", pattern(256 * KIB, 2)),
        file_bytes("dir/small", pattern(5000, 3)),
    ]]
}

/// The same sequence of copies on a mount at `root`; returns what each call gave.
fn copies(root: &Path) -> Vec<(String, Result<usize, i32>)> {
    let p = |n: &str| root.join(n);
    let mut out = Vec::new();
    let mut rec = |what: &str, r: Result<usize, i32>| out.push((what.to_string(), r));
    let src = File::open(p("src")).unwrap();
    let a = File::create(p("a")).unwrap();
    // A whole lower file into a new file, in two calls (the second at the source's end).
    rec("lower to new", cfr(&src, 0, &a, 0, 2 * MIB));
    rec(
        "lower tail",
        cfr(&src, 2 * MIB as u64, &a, 2 * MIB as u64, 2 * MIB),
    );
    rec(
        "past the source's end",
        cfr(&src, 4 * MIB as u64, &a, 0, 4096),
    );
    // Upper to upper, unaligned, into the middle of a file with data, and past its end.
    let a_r = File::open(p("a")).unwrap();
    let mut b = File::create(p("b")).unwrap();
    b.write_all(&pattern(20_000, 4)).unwrap();
    rec(
        "unaligned into the middle",
        cfr(&a_r, 4095, &b, 10_000, MIB + 7),
    );
    rec("leaving a hole", cfr(&a_r, 0, &b, 3 * MIB as u64, 100));
    // Within one file, ranges apart; and overlapping (EINVAL from the kernel).
    let a_rw = OpenOptions::new()
        .read(true)
        .write(true)
        .open(p("a"))
        .unwrap();
    rec(
        "same file",
        cfr(&a_rw, 0, &a_rw, 3 * MIB as u64 + 500, 64 * KIB),
    );
    rec(
        "same file overlapping",
        cfr(&a_rw, 0, &a_rw, 1000, 64 * KIB),
    );
    // Into a lower file opened for writing (copied up), from a file in a lower dir.
    let small = File::open(p("dir/small")).unwrap();
    let low = OpenOptions::new().write(true).open(p("lowdst")).unwrap();
    rec("into a copied-up file", cfr(&small, 1, &low, 100_000, 4999));
    // Destination open for appending, source open for writing only: refused.
    let app = OpenOptions::new().append(true).open(p("b")).unwrap();
    rec("append-only destination", cfr(&a_r, 0, &app, 0, 10));
    let wo = OpenOptions::new().write(true).open(p("a")).unwrap();
    rec("write-only source", cfr(&wo, 0, &b, 0, 10));
    rec("zero length", cfr(&a_r, 0, &b, 0, 0));
    out
}

fn contents(root: &Path) -> Vec<(String, Vec<u8>)> {
    ["a", "b", "lowdst", "src", "dir/small"]
        .iter()
        .map(|n| (n.to_string(), fs::read(root.join(n)).unwrap_or_default()))
        .collect()
}

#[track_caller]
fn assert_same_files(ours: &[(String, Vec<u8>)], kernel: &[(String, Vec<u8>)], what: &str) {
    for ((n, o), (_, k)) in ours.iter().zip(kernel) {
        if o != k {
            let at = o.iter().zip(k).position(|(x, y)| x != y);
            panic!(
                "{what}: {n} differs from kernel overlayfs (len {} vs {}, first difference at {at:?})",
                o.len(),
                k.len()
            );
        }
    }
}

fn copied_by_daemon(merged: &Path) -> (u64, u64) {
    let s = daemon_stats(merged);
    (s["copy_ranges"], s["copy_range_bytes"])
}

#[test]
fn copies_match_kernel_overlayfs() {
    with_timeout(TIMEOUT, || {
        let k = OverlayMount::new(&lowers(), &[]);
        let want = copies(&k.merged);
        let want_files = contents(&k.merged);
        k.unmount().unwrap();
        for args in [&[][..], &["--passthrough", "off"], &["--cache-size", "0"]] {
            let dirs = Dirs::new(&lowers(), &[]);
            let opts = MountOpts {
                extra: args.iter().map(|s| s.to_string()).collect(),
                ..MountOpts::default()
            };
            let m = Mount::start(&dirs, &opts).unwrap_or_else(|e| panic!("{e}"));
            let got = copies(&m.merged);
            assert_eq!(got, want, "{args:?}: what the calls returned");
            assert_same_files(&contents(&m.merged), &want_files, &format!("{args:?}"));
            let (n, bytes) = copied_by_daemon(&m.merged);
            assert!(
                n >= 6 && bytes >= 3 * MIB as u64,
                "{args:?}: the daemon copied only {n} ranges, {bytes} bytes"
            );
            m.unmount().unwrap();
            // What reached upper is the same after the unmount.
            let k2 = OverlayMount::start(&dirs, &MountOpts::default()).unwrap();
            assert_same_files(
                &contents(&k2.merged),
                &want_files,
                &format!("{args:?}, upper under kernel overlayfs"),
            );
            k2.unmount().unwrap();
        }
    })
}

/// Data written but still cached (the daemon's pages with `--writeback-on-close 0`, the
/// kernel's write-back cache without passthrough) is what a copy copies, and a destination
/// whose pages were cached reads the copied data afterwards, through old and new descriptors.
#[test]
fn copies_see_cached_writes_and_leave_no_stale_pages() {
    with_timeout(TIMEOUT, || {
        for args in [
            &["--writeback-on-close", "0"][..],
            &["--passthrough", "off", "--writeback-on-close", "0"],
        ] {
            let m = Mount::with_args(vec![], args);
            let p = |n: &str| -> PathBuf { m.path(n) };
            // Source written through the cache and still open: nothing of it on disk yet.
            let mut s = OpenOptions::new()
                .read(true)
                .write(true)
                .create(true)
                .truncate(true)
                .open(p("s"))
                .unwrap();
            s.write_all(&pattern(MIB, 5)).unwrap();
            // Destination read first (its pages cached on both sides), then written in part.
            fs::write(p("d"), pattern(2 * MIB, 6)).unwrap();
            let d = OpenOptions::new()
                .read(true)
                .write(true)
                .open(p("d"))
                .unwrap();
            let mut before = vec![0u8; 2 * MIB];
            d.read_exact_at(&mut before, 0).unwrap();
            d.write_all_at(&pattern(8 * KIB, 7), 300 * KIB as u64)
                .unwrap();
            assert_eq!(cfr(&s, 0, &d, 100_000, MIB), Ok(MIB), "{args:?}");
            let mut want = pattern(2 * MIB, 6);
            want[300 * KIB..308 * KIB].copy_from_slice(&pattern(8 * KIB, 7));
            want[100_000..100_000 + MIB].copy_from_slice(&pattern(MIB, 5));
            let mut got = vec![0u8; 2 * MIB];
            d.read_exact_at(&mut got, 0).unwrap();
            assert!(got == want, "{args:?}: read through the open destination");
            assert!(
                fs::read(p("d")).unwrap() == want,
                "{args:?}: read through a new open"
            );
            // Written on after the copy: the write lands on the copied data.
            d.write_all_at(b"tail", 100_000 + MIB as u64 - 2).unwrap();
            want[100_000 + MIB - 2..100_000 + MIB + 2].copy_from_slice(b"tail");
            drop((s, d));
            let (code, out, err) = run_with_timeout(
                std::process::Command::new(bin()).arg("sync").arg(&m.merged),
                std::time::Duration::from_secs(20),
            )
            .unwrap();
            assert!(code.success(), "sync: {out}{err}");
            assert!(
                fs::read(m.dirs.upper.join("d")).unwrap() == want,
                "{args:?}: upper's file"
            );
            assert!(
                copied_by_daemon(&m.merged).0 >= 1,
                "{args:?}: the daemon did not copy"
            );
            m.unmount().unwrap();
        }
    })
}

/// A file of a lower layer open for reading while another descriptor copies a range into it
/// (which copies it up): the reader sees the copied data at once, through its old descriptor,
/// with the page cache and without it, as on kernel overlayfs, which switches such a file to
/// the copy. (QA: with `--cache-size 0` the old descriptor went on reading the lower file —
/// the kernel, having dropped its pages of the range, asked the daemon — and returned the old
/// length and data.) Its SEEK_HOLE sees the new end too.
#[test]
fn a_reader_of_a_lower_file_sees_a_range_copied_into_it() {
    with_timeout(TIMEOUT, || {
        let lower = vec![file("f", &"L".repeat(4096)), file("src", &"S".repeat(8192))];
        let run = |m: &Path| {
            let r = File::open(m.join("f")).unwrap();
            let mut b = vec![0u8; 8192];
            let n = r.read_at(&mut b, 0).unwrap();
            assert_eq!(n, 4096);
            let s = File::open(m.join("src")).unwrap();
            let d = OpenOptions::new().write(true).open(m.join("f")).unwrap();
            let copied = cfr(&s, 0, &d, 2048, 4096);
            drop((s, d));
            let n = r.read_at(&mut b, 0).unwrap();
            // SAFETY: lseek(2) on a descriptor we own.
            let hole = unsafe { libc::lseek(r.as_raw_fd(), 0, libc::SEEK_HOLE) };
            (
                copied,
                n,
                b[..n].iter().filter(|c| **c == b'S').count(),
                hole,
            )
        };
        let kernel = against_kernel(&lower, CACHE_CONFIGS, run);
        assert_eq!(kernel, (Ok(4096), 6144, 4096, 6144), "kernel overlayfs");
    });
}

/// The same reader after the file it reads is copied up by an append and then removed
/// (unlinked, or replaced by a rename): it reads the copy, as on kernel overlayfs. (Review:
/// without the page cache the handle went back to reading the lower file once the copy's
/// name was gone.)
#[test]
fn a_reader_of_a_lower_file_sees_the_copy_after_its_removal() {
    with_timeout(TIMEOUT, || {
        let lower = vec![file("f", "old\n"), file("g", "old\n")];
        let run = |m: &Path| {
            let mut seen = Vec::new();
            for (name, replace) in [("f", false), ("g", true)] {
                let r = File::open(m.join(name)).unwrap();
                let mut b = vec![0u8; 64];
                let n = r.read_at(&mut b, 0).unwrap();
                assert_eq!(&b[..n], b"old\n");
                OpenOptions::new()
                    .append(true)
                    .open(m.join(name))
                    .unwrap()
                    .write_all(b"new\n")
                    .unwrap();
                if replace {
                    fs::write(m.join("other"), "other\n").unwrap();
                    fs::rename(m.join("other"), m.join(name)).unwrap();
                } else {
                    fs::remove_file(m.join(name)).unwrap();
                }
                let n = r.read_at(&mut b, 0).unwrap();
                seen.push((name, String::from_utf8_lossy(&b[..n]).into_owned()));
            }
            seen
        };
        let kernel = against_kernel(&lower, CACHE_CONFIGS, run);
        assert_eq!(
            kernel,
            [
                ("f", "old\nnew\n".to_string()),
                ("g", "old\nnew\n".to_string())
            ],
            "kernel overlayfs"
        );
    });
}
