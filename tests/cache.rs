//! The page cache (DESIGN.md section 4) on real mounts: dirty data stays under the limit while
//! a writer outruns the flusher, the flusher starts above bg_thresh (or when pages expire) and
//! not before, reads see every earlier write through any handle (mmap included), truncate and
//! unlink drop pages, fsync'd data survives SIGKILL of the daemon, SIGTERM and unmount drain
//! everything, settings change on a live mount, and bad settings are refused.
//!
//! Every test mounts for real (the common harness's `Mount` guard unmounts on drop) and runs its
//! body under `with_timeout`.

mod common;

use common::*;
use std::collections::HashMap;
use std::fs::{self, File, OpenOptions};
use std::io::{Read, Write};
use std::os::fd::AsRawFd;
use std::os::unix::fs::{FileExt, MetadataExt};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

const MIB: u64 = 1 << 20;
const TIMEOUT: u64 = 180;

fn mount_with(args: &[&str]) -> Mount {
    mount_lower(vec![], args)
}

/// A mount whose file I/O all goes through the daemon's page cache (as root, upper files
/// would otherwise be read and written by the kernel itself: tests/passthrough.rs).
fn mount_lower(lower: Vec<Entry>, args: &[&str]) -> Mount {
    let mut all = vec!["--passthrough", "off"];
    all.extend_from_slice(args);
    Mount::with_args(lower, &all)
}

/// `unionfs-rs stats --json` as numbers.
fn stats(merged: &Path) -> HashMap<String, u64> {
    daemon_stats(merged)
}

fn cli(args: &[&str]) -> (bool, String, String) {
    let out = Command::new(bin()).args(args).output().expect("run cli");
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

fn pattern(len: usize, seed: u8) -> Vec<u8> {
    (0..len)
        .map(|i| ((i as u64 * 2_654_435_761) >> 13) as u8 ^ seed)
        .collect()
}

/// Ask the kernel to drop its own cached pages of `f`, so the next read reaches the daemon.
fn drop_kernel_cache(f: &File) {
    // SAFETY: fadvise on an open fd; no memory is passed.
    let r = unsafe { libc::posix_fadvise(f.as_raw_fd(), 0, 0, libc::POSIX_FADV_DONTNEED) };
    assert_eq!(r, 0, "fadvise");
}

fn wait_until(timeout: Duration, mut f: impl FnMut() -> bool) -> bool {
    let t = Instant::now();
    while t.elapsed() < timeout {
        if f() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    f()
}

#[test]
fn writer_outrunning_the_flusher_stays_under_the_dirty_limit() {
    with_timeout(TIMEOUT, || {
        // 8 MiB budget: bg 0.8 MiB, limit 1.6 MiB. No expiry, so only the thresholds act.
        // Closed files too (writeback_on_close=0): only the thresholds act.
        let m = mount_with(&[
            "--cache-size",
            "8M",
            "--dirty-expire-centisecs",
            "1000000",
            "--writeback-on-close",
            "0",
        ]);
        let s0 = stats(&m.merged);
        let (bg, thresh) = (s0["bg_thresh_bytes"], s0["dirty_thresh_bytes"]);
        assert_eq!(thresh, 8 * MIB / 100 * 20 + 8 * MIB % 100 * 20 / 100);

        // Below bg_thresh: the data stays in the cache, the flusher does not run.
        let small = pattern((bg / 2) as usize, 1);
        fs::write(m.path("small"), &small).expect("write small");
        std::thread::sleep(Duration::from_millis(1500));
        let s1 = stats(&m.merged);
        assert_eq!(s1["written_back_bytes"], 0, "{s1:?}");
        assert_eq!(s1["flusher_runs"], 0, "{s1:?}");
        assert_eq!(s1["bg_thresh_crossings"], 0, "{s1:?}");
        assert!(s1["dirty_bytes"] >= small.len() as u64, "{s1:?}");
        assert_eq!(
            fs::metadata(m.dirs.upper.join("small"))
                .expect("upper")
                .len(),
            0,
            "data below bg_thresh reached upper early"
        );
        assert_eq!(
            fs::metadata(m.path("small")).expect("merged").len(),
            small.len() as u64
        );
        assert_eq!(fs::read(m.path("small")).expect("read back"), small);

        // A writer far faster than the flusher: sample dirty_bytes while it runs.
        let stop = Arc::new(AtomicBool::new(false));
        let merged = m.merged.clone();
        let sampler = {
            let stop = stop.clone();
            std::thread::spawn(move || {
                let mut samples = Vec::new();
                while !stop.load(Ordering::Relaxed) {
                    let s = stats(&merged);
                    samples.push((s["dirty_bytes"], s["dirty_thresh_bytes"]));
                    std::thread::sleep(Duration::from_millis(5));
                }
                samples
            })
        };
        // Four writers against one flusher.
        let big = Arc::new(pattern((24 * MIB) as usize, 7));
        let writers: Vec<_> = (0..4)
            .map(|k| {
                let (big, p) = (big.clone(), m.path(&format!("big{k}")));
                std::thread::spawn(move || {
                    let mut f = File::create(p).expect("create");
                    for c in big.chunks(256 << 10) {
                        f.write_all(c).expect("write");
                    }
                })
            })
            .collect();
        for w in writers {
            w.join().expect("writer");
        }
        stop.store(true, Ordering::Relaxed);
        let samples = sampler.join().expect("sampler");
        assert!(samples.len() >= 5, "too few samples: {}", samples.len());
        for (d, t) in &samples {
            assert!(d <= t, "dirty_bytes {d} above dirty_thresh_bytes {t}");
        }
        let s2 = stats(&m.merged);
        // 96 MiB through a 1.6 MiB dirty limit: the flusher ran, above bg_thresh.
        assert!(s2["written_back_bytes"] > 0, "{s2:?}");
        assert!(s2["flusher_runs"] > 0, "{s2:?}");
        assert!(s2["bg_thresh_crossings"] >= 1, "{s2:?}");
        assert!(s2["cache_bytes"] <= s2["cache_page_budget"], "{s2:?}");
        // How hard the writers were held back depends on how fast the flusher is here; what
        // the samples saw bounds it from below: past the freerun point, writers were paced.
        let max_seen = samples.iter().map(|s| s.0).max().unwrap_or(0);
        if max_seen > (bg + thresh) / 2 {
            assert!(
                s2["throttle_events"] > 0,
                "dirty reached {max_seen}: {s2:?}"
            );
        }
        eprintln!(
            "max dirty sampled {max_seen} of {thresh}; throttle events {}, limit waits {}",
            s2["throttle_events"], s2["dirty_limit_waits"]
        );
        // Everything arrives, in order.
        let (ok, _, err) = cli(&["sync", m.merged.to_str().expect("path")]);
        assert!(ok, "sync: {err}");
        assert_eq!(stats(&m.merged)["dirty_bytes"], 0);
        for k in 0..4 {
            assert!(fs::read(m.dirs.upper.join(format!("big{k}"))).expect("upper") == *big);
        }
        assert!(fs::read(m.dirs.upper.join("small")).expect("upper") == small);
        m.unmount().expect("unmount");
    })
}

/// With a budget so small that dirty_thresh is less than a page above bg_thresh (64 KiB at
/// 7% / 9%: 4587 and 5898 bytes), a writer's second page waits at the limit while the first
/// is below bg_thresh: the flusher must write for the waiting writer. (QA: each page waited
/// for its data to expire, and without the periodic wake-up the writer hung for good, in D
/// state, beyond SIGKILL.)
#[test]
fn a_writer_waiting_at_a_limit_within_a_page_of_bg_thresh_is_written_for() {
    with_timeout(60, || {
        let m = mount_with(&[
            "--cache-size",
            "64K",
            "--dirty-ratio",
            "9",
            "--dirty-background-ratio",
            "7",
            "--dirty-writeback-centisecs",
            "0",
            "--writeback-on-close",
            "0",
        ]);
        let s = stats(&m.merged);
        assert!(
            s["bg_thresh_bytes"] < 4096 * 2
                && s["dirty_thresh_bytes"] < s["bg_thresh_bytes"] + 4096,
            "{s:?}"
        );
        let data = pattern(64 * 1024, 9);
        let mut f = File::create(m.path("f")).expect("create");
        for chunk in data.chunks(4096) {
            f.write_all(chunk).expect("write");
        }
        drop(f);
        let s = stats(&m.merged);
        assert!(
            s["dirty_limit_waits"] >= 1,
            "the limit never held a writer: {s:?}"
        );
        assert!(
            s["dirty_bytes"] <= s["dirty_thresh_bytes"].max(4096),
            "{s:?}"
        );
        assert_eq!(fs::read(m.path("f")).expect("read"), data);
        m.unmount().expect("unmount");
    })
}

#[test]
fn expired_data_is_written_without_crossing_bg_thresh() {
    with_timeout(TIMEOUT, || {
        let m = mount_with(&[
            "--writeback-on-close",
            "0",
            "--dirty-expire-centisecs",
            "50",
            "--dirty-writeback-centisecs",
            "20",
        ]);
        let data = pattern(100_000, 3);
        fs::write(m.path("f"), &data).expect("write");
        assert!(
            wait_until(Duration::from_secs(10), || fs::read(m.dirs.upper.join("f"))
                .is_ok_and(|d| d == data)),
            "expired data never reached upper"
        );
        let s = stats(&m.merged);
        assert!(s["flusher_runs"] >= 1, "{s:?}");
        assert_eq!(s["dirty_bytes"], 0, "{s:?}");
        m.unmount().expect("unmount");
    })
}

#[test]
fn reads_see_every_write_through_any_handle_and_mmap() {
    with_timeout(TIMEOUT, || {
        let m = mount_lower(vec![file("lower.txt", &"L".repeat(20_000))], &[]);
        // Another handle, opened before the write, reads what was written.
        let p = m.path("f");
        fs::write(&p, pattern(50_000, 1)).expect("write");
        let r = File::open(&p).expect("open r");
        let w = OpenOptions::new().write(true).open(&p).expect("open w");
        w.write_all_at(b"NEW DATA", 10_000).expect("pwrite");
        drop_kernel_cache(&r);
        let mut buf = [0u8; 8];
        r.read_exact_at(&mut buf, 10_000).expect("pread");
        assert_eq!(&buf, b"NEW DATA");

        // Copy-up under a reader opened on the lower file.
        let lp = m.path("lower.txt");
        let lr = File::open(&lp).expect("open lower");
        let mut first = vec![0u8; 100];
        lr.read_exact_at(&mut first, 0).expect("read lower");
        let lw = OpenOptions::new()
            .write(true)
            .open(&lp)
            .expect("open for write");
        lw.write_all_at(b"xyz", 15_000).expect("write lower file");
        drop_kernel_cache(&lr);
        let mut got = [0u8; 3];
        lr.read_exact_at(&mut got, 15_000)
            .expect("read after copy-up");
        assert_eq!(&got, b"xyz");

        // mmap: a shared writable mapping's stores reach read(2) on another handle.
        let mp = m.path("mapped");
        fs::write(&mp, vec![0u8; 8192]).expect("create");
        let mf = OpenOptions::new()
            .read(true)
            .write(true)
            .open(&mp)
            .expect("open");
        // SAFETY: maps 8192 bytes of a file that is 8192 bytes long; unmapped below.
        let addr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                8192,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                mf.as_raw_fd(),
                0,
            )
        };
        assert_ne!(addr, libc::MAP_FAILED, "mmap");
        // SAFETY: addr points at 8192 mapped, writable bytes.
        unsafe {
            std::ptr::copy_nonoverlapping(b"mapped!".as_ptr(), (addr as *mut u8).add(5000), 7);
            assert_eq!(libc::msync(addr, 8192, libc::MS_SYNC), 0);
            libc::munmap(addr, 8192);
        }
        let other = File::open(&mp).expect("open other");
        drop_kernel_cache(&other);
        let mut got = [0u8; 7];
        other.read_exact_at(&mut got, 5000).expect("read");
        assert_eq!(&got, b"mapped!");
        // And a write(2) is seen by a fresh mapping.
        mf.write_all_at(b"written", 100).expect("pwrite");
        // SAFETY: a read-only mapping of the file's first 8192 bytes.
        let addr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                8192,
                libc::PROT_READ,
                libc::MAP_SHARED,
                other.as_raw_fd(),
                0,
            )
        };
        assert_ne!(addr, libc::MAP_FAILED, "mmap");
        // SAFETY: reading 7 mapped bytes, then unmapping.
        let seen = unsafe {
            let s = std::slice::from_raw_parts((addr as *const u8).add(100), 7).to_vec();
            libc::munmap(addr, 8192);
            s
        };
        assert_eq!(&seen, b"written");
        drop((r, w, lr, lw, mf, other));
        let (ok, _, err) = cli(&["sync", m.merged.to_str().expect("path")]);
        assert!(ok, "sync: {err}");
        let up = fs::read(m.dirs.upper.join("lower.txt")).expect("upper copy");
        assert_eq!(&up[15_000..15_003], b"xyz");
        assert_eq!(up.len(), 20_000);
        m.unmount().expect("unmount");
    })
}

/// A write far past the largest file upper's filesystem holds (ext4: 16 TiB) fails with
/// EFBIG at once, as on the filesystem itself; it once went into the cache, every write-back
/// of it failed, and its pages held the dirty budget for good: other writers then waited at
/// the dirty limit and failed (review).
#[test]
fn a_write_past_the_largest_file_fails_at_once() {
    with_timeout(TIMEOUT, || {
        let m = mount_with(&["--cache-size", "8M"]);
        let f = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(m.path("far"))
            .expect("create");
        for i in 0..4u64 {
            let r = f.write_at(&[7u8; 1 << 20], (1 << 50) + i * MIB);
            assert_eq!(
                r.map_err(|e| e.raw_os_error()),
                Err(Some(libc::EFBIG)),
                "write at 1 PiB"
            );
        }
        // The cache is not held: writes elsewhere are accepted and synced.
        let mut g = File::create(m.path("other")).expect("create");
        for _ in 0..16 {
            g.write_all(&[1u8; 1 << 20]).expect("write other");
        }
        g.sync_all().expect("fsync other");
        assert_eq!(stats(&m.merged)["dirty_bytes"], 0);
        assert_eq!(fs::metadata(m.path("far")).expect("stat").len(), 0);
        drop((f, g));
        m.unmount().expect("unmount");
    })
}

#[test]
fn truncate_and_unlink_drop_pages() {
    with_timeout(TIMEOUT, || {
        let m = mount_with(&[]);
        let p = m.path("t");
        let f = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(&p)
            .expect("create");
        f.write_all_at(&[0xAA; 10_000], 0).expect("write");
        f.set_len(5_000).expect("truncate down");
        f.set_len(10_000).expect("extend");
        drop_kernel_cache(&f);
        let mut buf = vec![0u8; 10_000];
        f.read_exact_at(&mut buf, 0).expect("read");
        assert!(buf[..5_000].iter().all(|&b| b == 0xAA));
        assert!(
            buf[5_000..].iter().all(|&b| b == 0),
            "stale bytes past a truncate"
        );
        assert_eq!(fs::metadata(&p).expect("stat").len(), 10_000);
        drop(f);

        // Unlink a file with dirty pages, create one under the same name (upper may reuse
        // the inode number): it must start empty.
        for round in 0..20 {
            let q = m.path("reuse");
            fs::write(&q, pattern(30_000, round)).expect("write");
            fs::remove_file(&q).expect("unlink");
            let mut g = File::create(&q).expect("recreate");
            g.write_all(b"fresh").expect("write fresh");
            drop(g);
            let g = File::open(&q).expect("open");
            drop_kernel_cache(&g);
            let mut s = String::new();
            (&g).read_to_string(&mut s).expect("read");
            assert_eq!(s, "fresh", "round {round}");
            fs::remove_file(&q).expect("unlink");
        }
        let (ok, _, err) = cli(&["sync", m.merged.to_str().expect("path")]);
        assert!(ok, "sync: {err}");
        let s = stats(&m.merged);
        assert_eq!(s["dirty_bytes"], 0, "{s:?}");
        assert!(!m.dirs.upper.join("reuse").exists());
        assert_eq!(
            fs::metadata(m.dirs.upper.join("t")).expect("upper").len(),
            10_000
        );
        m.unmount().expect("unmount");
    })
}

/// A mount whose flusher never runs on its own (no expiry, no periodic wake-up).
fn mount_without_flusher() -> Mount {
    mount_with(&[
        "--dirty-expire-centisecs",
        "1000000",
        "--dirty-writeback-centisecs",
        "0",
    ])
}

/// SIGKILL the mount's daemon and wait until it is gone.
fn kill_9(m: &Mount) {
    let pid = m.pid.expect("daemon pid");
    // SAFETY: kill(2) of the daemon process we started.
    assert_eq!(unsafe { libc::kill(pid, libc::SIGKILL) }, 0);
    assert!(wait_pid_gone(pid, Duration::from_secs(10)));
}

#[test]
fn fsynced_data_survives_kill_9() {
    with_timeout(TIMEOUT, || {
        // Nothing is written back on its own: only fsync (and closes) move data.
        let m = mount_without_flusher();
        let synced = pattern(3 * MIB as usize, 5);
        let f = File::create(m.path("synced")).expect("create");
        (&f).write_all(&synced).expect("write");
        f.sync_all().expect("fsync");
        let g = File::create(m.path("datasynced")).expect("create");
        (&g).write_all(b"datasync me").expect("write");
        g.sync_data().expect("fdatasync");
        fs::write(m.path("unsynced"), b"maybe").expect("write");
        kill_9(&m);
        drop((f, g));
        assert!(fs::read(m.dirs.upper.join("synced")).expect("upper") == synced);
        assert_eq!(
            fs::read(m.dirs.upper.join("datasynced")).expect("upper"),
            b"datasync me"
        );
        drop(m);
    })
}

/// What was closed survives a SIGKILL of the daemon (`writeback_on_close`, the default):
/// files written and closed, lines appended one open at a time, and a file replaced by a
/// rename of a new one written just before (whose old content is gone with the rename, so
/// the new one's data must be there). Only data of files still open may be lost.
#[test]
fn closed_files_survive_kill_9() {
    with_timeout(TIMEOUT, || {
        // Nothing is written back on its own: only closes, renames and fsyncs move data.
        let m = mount_without_flusher();
        let closed = pattern(3 * MIB as usize, 11);
        fs::write(m.path("closed"), &closed).expect("write");
        fs::write(m.path("conf"), b"version 1").expect("write v1");
        let (ok, _, err) = cli(&["sync", m.merged.to_str().expect("path")]);
        assert!(ok, "sync: {err}");
        let mut lines = String::new();
        for i in 0..200 {
            let line = format!("line {i}\n");
            OpenOptions::new()
                .append(true)
                .create(true)
                .open(m.path("log"))
                .and_then(|mut f| f.write_all(line.as_bytes()))
                .expect("append");
            lines.push_str(&line);
        }
        // The replacement stays open across the rename (the rename itself writes it back),
        // then a second one is closed first.
        let mut new = File::create(m.path("conf.new")).expect("create");
        new.write_all(b"version 2").expect("write v2");
        fs::rename(m.path("conf.new"), m.path("conf")).expect("rename over");
        fs::write(m.path("other.new"), b"other 2").expect("write");
        fs::write(m.path("other"), b"other 1").expect("write");
        fs::rename(m.path("other.new"), m.path("other")).expect("rename over");
        let open = File::create(m.path("still-open")).expect("create");
        (&open).write_all(b"not closed").expect("write");
        // A RELEASE reaches the daemon just after close(2) returns: wait until it has been
        // served (nothing of a closed file is dirty then), then kill.
        assert!(
            wait_until(Duration::from_secs(10), || stats(&m.merged)["dirty_files"]
                <= 2),
            "closed files still dirty: {:?}",
            stats(&m.merged)
        );
        // (Fewer than one per close: a RELEASE that comes after the next append's write
        // writes both.)
        let s = stats(&m.merged);
        assert!(s["close_writebacks"] > 0, "{s:?}");
        kill_9(&m);
        drop((new, open));
        let up = |n: &str| fs::read(m.dirs.upper.join(n)).expect("upper file");
        assert!(up("closed") == closed, "closed file lost data");
        assert_eq!(String::from_utf8_lossy(&up("log")), lines);
        assert_eq!(up("conf"), b"version 2");
        assert_eq!(up("other"), b"other 2");
        drop(m);
    })
}

/// A file whose name was removed while it was open for writing, but which has another name
/// the daemon never looked up, is still written at its close (it still exists).
#[test]
fn a_closed_file_with_another_name_left_is_written_at_close() {
    with_timeout(TIMEOUT, || {
        let dirs = Dirs::new(&[vec![]], &[file("a", "old")]);
        fs::hard_link(dirs.upper.join("a"), dirs.upper.join("b")).expect("link in upper");
        let extra = [
            "--passthrough",
            "off",
            "--dirty-expire-centisecs",
            "1000000",
            "--dirty-writeback-centisecs",
            "0",
        ];
        let opts = MountOpts {
            extra: extra.iter().map(|x| x.to_string()).collect(),
            ..MountOpts::default()
        };
        let m = Mount::start(&dirs, &opts).unwrap_or_else(|e| panic!("{e}"));
        let mut f = OpenOptions::new()
            .write(true)
            .truncate(true)
            .open(m.path("a"))
            .expect("open");
        f.write_all(b"new data").expect("write");
        fs::remove_file(m.path("a")).expect("unlink");
        drop(f);
        assert!(
            wait_until(Duration::from_secs(10), || stats(&m.merged)["dirty_bytes"]
                == 0),
            "still dirty after the close: {:?}",
            stats(&m.merged)
        );
        kill_9(&m);
        assert_eq!(
            fs::read(m.dirs.upper.join("b")).expect("upper b"),
            b"new data"
        );
        drop(m);
    })
}

/// With `writeback_on_close=0` a closed file's data stays in the cache until the flusher,
/// fsync or sync moves it.
#[test]
fn writeback_on_close_off_keeps_closed_files_cached() {
    with_timeout(TIMEOUT, || {
        let m = mount_with(&[
            "--writeback-on-close",
            "0",
            "--dirty-expire-centisecs",
            "1000000",
            "--dirty-writeback-centisecs",
            "0",
        ]);
        let data = pattern(MIB as usize, 12);
        fs::write(m.path("f"), &data).expect("write");
        fs::write(m.path("g.new"), b"g2").expect("write");
        fs::write(m.path("g"), b"g1").expect("write");
        fs::rename(m.path("g.new"), m.path("g")).expect("rename over");
        std::thread::sleep(Duration::from_millis(300));
        let s = stats(&m.merged);
        assert_eq!(s["close_writebacks"], 0, "{s:?}");
        assert!(s["dirty_bytes"] >= MIB, "{s:?}");
        assert_eq!(
            fs::metadata(m.dirs.upper.join("f")).expect("upper").len(),
            0
        );
        // Live, back on: the next close writes the file.
        let (ok, out, err) = cli(&[
            "cache",
            "set",
            m.merged.to_str().expect("path"),
            "writeback_on_close=1",
        ]);
        assert!(ok, "cache set: {out}{err}");
        drop(
            OpenOptions::new()
                .append(true)
                .open(m.path("f"))
                .expect("open"),
        );
        assert!(
            wait_until(Duration::from_secs(10), || fs::read(m.dirs.upper.join("f"))
                .is_ok_and(|d| d == data)),
            "not written at close after cache set"
        );
        m.unmount().expect("unmount");
    })
}

/// Write `n` MiB that the flusher will not touch on its own; return (mount, data).
fn mount_with_dirty(n: u64) -> (Mount, Vec<u8>) {
    let m = mount_with(&[
        "--writeback-on-close",
        "0",
        "--cache-size",
        "512M",
        "--dirty-ratio",
        "50",
        "--dirty-background-ratio",
        "40",
        "--dirty-expire-centisecs",
        "1000000",
        "--dirty-writeback-centisecs",
        "0",
    ]);
    let data = pattern((n * MIB) as usize, 9);
    fs::write(m.path("pending"), &data).expect("write");
    let s = stats(&m.merged);
    assert!(s["dirty_bytes"] >= n * MIB - MIB, "{s:?}");
    assert!(
        fs::metadata(m.dirs.upper.join("pending"))
            .expect("upper")
            .len()
            < n * MIB,
        "written back before the test could stop the daemon"
    );
    (m, data)
}

#[test]
fn sigterm_drains_dirty_data_then_exits() {
    with_timeout(TIMEOUT, || {
        let (m, data) = mount_with_dirty(64);
        let pid = m.pid.expect("pid");
        // SAFETY: signal the daemon we started.
        assert_eq!(unsafe { libc::kill(pid, libc::SIGTERM) }, 0);
        // A second signal mid-drain must not cut it short.
        std::thread::sleep(Duration::from_millis(20));
        // SAFETY: as above.
        unsafe { libc::kill(pid, libc::SIGINT) };
        assert!(
            wait_pid_gone(pid, Duration::from_secs(60)),
            "daemon did not exit"
        );
        assert!(!is_fuse_mounted(&m.merged), "still mounted after SIGTERM");
        assert!(fs::read(m.dirs.upper.join("pending")).expect("upper") == data);
        drop(m);
    })
}

#[test]
fn unmount_drains_dirty_data() {
    with_timeout(TIMEOUT, || {
        let (mut m, data) = mount_with_dirty(64);
        let merged = m.merged.clone();
        m.unmount_retrying(|| {
            let mut c = Command::new("fusermount3");
            c.arg("-u").arg(&merged);
            c
        })
        .expect("fusermount3 -u");
        assert!(fs::read(m.dirs.upper.join("pending")).expect("upper") == data);
        drop(m);

        let (mut m, data) = mount_with_dirty(16);
        let merged = m.merged.to_str().expect("path").to_string();
        m.unmount_with(Command::new(bin()).args(["umount", &merged]))
            .expect("unionfs-rs umount");
        assert!(fs::read(m.dirs.upper.join("pending")).expect("upper") == data);
    })
}

#[test]
fn sequential_reads_read_ahead_and_random_reads_do_not() {
    with_timeout(TIMEOUT, || {
        let big = pattern((32 * MIB) as usize, 2);
        let m = mount_lower(
            vec![
                file_bytes("seq", big.clone()),
                file_bytes("rand", big.clone()),
            ],
            // Our window only runs beyond the kernel's: keep the kernel's at its 128 KiB.
            &["--readahead-kb", "512", "--kernel-readahead-kb", "128"],
        );
        assert_eq!(fs::read(m.path("seq")).expect("read"), big);
        let s = stats(&m.merged);
        assert!(s["readahead_pages"] > 1000, "{s:?}");
        assert!(
            s["readahead_used_pages"] * 10 >= s["readahead_pages"] * 9,
            "sequential readahead mostly wasted: {s:?}"
        );
        // Random 4 KiB reads with the kernel's own readahead off.
        let f = File::open(m.path("rand")).expect("open");
        // SAFETY: fadvise on an open fd.
        unsafe { libc::posix_fadvise(f.as_raw_fd(), 0, 0, libc::POSIX_FADV_RANDOM) };
        let mut x: u64 = 12345;
        let mut buf = [0u8; 4096];
        for _ in 0..400 {
            x = x
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            let off = (x >> 33) % (32 * MIB / 4096) * 4096;
            f.read_exact_at(&mut buf, off).expect("pread");
            assert_eq!(&buf[..], &big[off as usize..off as usize + 4096]);
        }
        drop(f);
        let s2 = stats(&m.merged);
        let extra = s2["readahead_pages"] - s["readahead_pages"];
        assert!(extra < 400, "random reads read ahead {extra} pages: {s2:?}");
        m.unmount().expect("unmount");
    })
}

/// At the default readahead (no larger than the kernel's FUSE window) a buffered sequential read
/// leaves nothing of ours behind (drop-behind, no duplicate readahead), while random reads are
/// cached: reading the same random pages again through a fresh kernel cache hits.
#[test]
fn sequential_stream_drops_behind_random_reads_stay() {
    with_timeout(TIMEOUT, || {
        let big = pattern((64 * MIB) as usize, 3);
        let m = mount_lower(
            vec![
                file_bytes("seq", big.clone()),
                file_bytes("rand", big.clone()),
            ],
            &[],
        );
        assert_eq!(fs::read(m.path("seq")).expect("read"), big);
        let s = stats(&m.merged);
        assert_eq!(s["readahead_pages"], 0, "{s:?}");
        assert!(s["drop_behind_pages"] >= 16384, "{s:?}");
        assert!(
            s["cache_bytes"] < MIB,
            "a stream stays out of the cache: {s:?}"
        );
        // Pages far apart (never within drop-behind's stream slack, 2 MiB at most, of the
        // previous read).
        let offs: Vec<u64> = (1..=64u64).map(|k| (k * 7919 % 16384) * 4096).collect();
        let read_random = || {
            let f = File::open(m.path("rand")).expect("open");
            // SAFETY: fadvise on an open fd (random access, and drop the kernel's pages).
            unsafe {
                libc::posix_fadvise(f.as_raw_fd(), 0, 0, libc::POSIX_FADV_RANDOM);
                libc::posix_fadvise(f.as_raw_fd(), 0, 0, libc::POSIX_FADV_DONTNEED);
            }
            let mut buf = [0u8; 4096];
            for &off in &offs {
                f.read_exact_at(&mut buf, off).expect("pread");
                assert_eq!(&buf[..], &big[off as usize..off as usize + 4096]);
            }
            // SAFETY: as above.
            unsafe { libc::posix_fadvise(f.as_raw_fd(), 0, 0, libc::POSIX_FADV_DONTNEED) };
        };
        read_random();
        let s1 = stats(&m.merged);
        read_random();
        let s2 = stats(&m.merged);
        let hits = s2["cache_hits"] - s1["cache_hits"];
        assert!(
            hits >= 60,
            "random pages read again must hit: {hits} ({s2:?})"
        );
        m.unmount().expect("unmount");
    })
}

/// The kernel's readahead on the mount (its bdi's read_ahead_kb): as configured, changeable
/// live, and by default that of the disk under the layers (what kernel overlayfs reads with).
#[test]
fn kernel_readahead_follows_the_setting_and_the_layers_disk() {
    with_timeout(TIMEOUT, || {
        fn bdi_kb(merged: &Path) -> u64 {
            let info = fs::read_to_string("/proc/self/mountinfo").expect("mountinfo");
            let dev = info
                .lines()
                .rev()
                .find_map(|l| {
                    let f: Vec<&str> = l.split(' ').collect();
                    (f[4] == merged.to_str().expect("path")).then(|| f[2].to_string())
                })
                .expect("mount in mountinfo");
            fs::read_to_string(format!("/sys/class/bdi/{dev}/read_ahead_kb"))
                .expect("bdi")
                .trim()
                .parse()
                .expect("number")
        }
        // The daemon sets it once the mount is live, after `mount` has returned.
        fn settled_bdi_kb(merged: &Path, want: u64) -> u64 {
            let deadline = Instant::now() + Duration::from_secs(10);
            loop {
                let kb = bdi_kb(merged);
                if kb == want || Instant::now() > deadline {
                    return kb;
                }
                std::thread::sleep(Duration::from_millis(10));
            }
        }
        let m = mount_with(&["--kernel-readahead-kb", "1024"]);
        assert_eq!(settled_bdi_kb(&m.merged, 1024), 1024);
        assert_eq!(stats(&m.merged)["kernel_readahead_kb"], 1024);
        let out = Command::new(bin())
            .args(["cache", "set"])
            .arg(&m.merged)
            .arg("kernel_readahead_kb=2048")
            .output()
            .expect("cache set");
        assert!(out.status.success(), "{out:?}");
        assert_eq!(bdi_kb(&m.merged), 2048);
        assert_eq!(stats(&m.merged)["kernel_readahead_kb"], 2048);
        let shown = String::from_utf8_lossy(&out.stdout);
        assert!(
            shown.contains("\nkernel_readahead_kb=2048\n")
                && shown.contains("\nkernel_readahead_in_use_kb=2048"),
            "{shown}"
        );
        m.unmount().expect("unmount");

        let m = mount_with(&[]);
        let dev = fs::metadata(&m.dirs.upper).expect("upper").dev();
        let (maj, min) = (libc::major(dev), libc::minor(dev));
        let disk = [
            format!("/sys/dev/block/{maj}:{min}/queue/read_ahead_kb"),
            format!("/sys/dev/block/{maj}:{min}/../queue/read_ahead_kb"),
        ]
        .iter()
        .find_map(|p| fs::read_to_string(p).ok())
        .and_then(|s| s.trim().parse::<u64>().ok());
        let got = settled_bdi_kb(&m.merged, disk.unwrap_or(128));
        match disk {
            Some(kb) => assert_eq!(got, kb, "the layers' disk reads ahead {kb} KiB"),
            None => assert_eq!(got, 128, "no block device under the layers: the kernel's"),
        }
        assert_eq!(stats(&m.merged)["kernel_readahead_kb"], got);
        // `cache show` gives the setting (0: auto) and what it came to (QA: it said 0 where
        // stats said 8192).
        let (ok, shown, err) = cli(&["cache", "show", m.merged.to_str().expect("path")]);
        assert!(ok, "{err}");
        assert!(
            shown.contains("\nkernel_readahead_kb=0\n")
                && shown.contains(&format!("\nkernel_readahead_in_use_kb={got}")),
            "{shown}"
        );
        m.unmount().expect("unmount");
    })
}

#[test]
fn settings_change_on_a_live_mount() {
    with_timeout(TIMEOUT, || {
        let m = mount_with(&["-o", "cache_size=64M,dirty_ratio=10"]);
        let merged = m.merged.to_str().expect("path");
        let s = stats(&m.merged);
        assert_eq!(s["cache_size"], 64 * MIB);
        assert_eq!(
            s["dirty_thresh_bytes"],
            64 * MIB / 100 * 10 + 64 * MIB % 100 * 10 / 100
        );
        let (ok, out, err) = cli(&[
            "cache",
            "set",
            merged,
            "dirty_bytes=8M",
            "readahead_kb=1024",
        ]);
        assert!(ok, "{err}");
        assert!(out.contains("dirty_thresh_bytes=8388608"), "{out}");
        let s = stats(&m.merged);
        assert_eq!(s["dirty_thresh_bytes"], 8 * MIB);
        let (ok, out, _) = cli(&["cache", "show", merged]);
        assert!(ok && out.contains("readahead_kb=1024"), "{out}");
        // The ratio dirty_bytes overrides reads 0, as the sysctl does.
        assert!(
            out.contains("\ndirty_ratio=0\n") && out.contains("\ndirty_bytes=8388608\n"),
            "{out}"
        );
        // Bad settings: refused with a clear message, nothing changed.
        for bad in [
            "dirty_ratio=150",
            "nonsense=1",
            "cache_size=0",
            "dirty_ratio",
        ] {
            let (ok, _, err) = cli(&["cache", "set", merged, bad]);
            assert!(!ok, "{bad} accepted");
            assert!(!err.trim().is_empty(), "no message for {bad}");
        }
        assert_eq!(stats(&m.merged)["dirty_thresh_bytes"], 8 * MIB);
        // Settings taken that do not do what they say are warned of on stderr (QA: a
        // cache_size above the machine's memory warned at mount only); stdout keeps the
        // settings alone.
        let (ok, out, err) = cli(&["cache", "set", merged, "dirty_background_bytes=16M"]);
        assert!(ok, "{err}");
        assert!(
            err.contains("unionfs-rs: warning: dirty_background_bytes 16777216 ")
                && err.contains("not below the dirty limit (8388608 bytes)"),
            "{err}"
        );
        assert!(!out.contains("warning"), "{out}");
        assert_eq!(stats(&m.merged)["bg_thresh_bytes"], 4 * MIB);
        // Not again for a change that does not cause it.
        let (ok, _, err) = cli(&["cache", "set", merged, "readahead_kb=256"]);
        assert!(ok && err.is_empty(), "{err}");
        let (ok, _, err) = cli(&["cache", "set", merged, "cache_size=100T"]);
        assert!(ok, "{err}");
        assert!(err.contains("more than this machine's memory"), "{err}");
        let (ok, _, err) = cli(&[
            "cache",
            "set",
            merged,
            "cache_size=64M",
            "dirty_background_bytes=1M",
        ]);
        assert!(ok && err.is_empty(), "{err}");
        m.unmount().expect("unmount");
    })
}

/// `cache_size` bounds the cache's memory, its pages' bookkeeping included: filling a 128 MiB
/// cache with 4 KiB random reads grows the daemon's heap by no more than the budget. (Before,
/// pages alone filled the budget and their map and LRU entries, ~200 bytes a page, came on
/// top: 6 MiB here, 50 MiB on a 1 GiB budget.)
#[test]
fn a_full_cache_keeps_its_bookkeeping_within_the_budget() {
    use std::os::unix::fs::OpenOptionsExt;
    with_timeout(TIMEOUT, || {
        const SIZE: u64 = 320 * MIB;
        let m = mount_lower(vec![sparse("big", SIZE, &[])], &["--cache-size", "128M"]);
        let s0 = stats(&m.merged);
        let Some(&heap0) = s0.get("heap_in_use_bytes") else {
            eprintln!("the allocator gives no heap figures: skipped");
            return;
        };
        let f = OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_DIRECT)
            .open(m.path("big"))
            .expect("open O_DIRECT");
        let mut buf = Box::new(Aligned([0u8; 8192]));
        let pages = SIZE / 4096;
        // Every page once, in a scattered order (7919 is prime to the page count).
        for k in 0..pages {
            let off = k * 7919 % pages * 4096;
            let n = f.read_at(&mut buf.0[..4096], off).expect("pread");
            assert_eq!(n, 4096);
        }
        let s1 = stats(&m.merged);
        assert!(s1["cache_bytes"] <= s1["cache_page_budget"], "{s1:?}");
        assert!(
            s1["cache_bytes"] + 8 * MIB >= s1["cache_page_budget"],
            "the cache filled: {s1:?}"
        );
        let grown = s1["heap_in_use_bytes"].saturating_sub(heap0);
        assert!(
            grown <= 128 * MIB + 2 * MIB,
            "the heap grew {grown} bytes for a 128 MiB cache: {s1:?}"
        );
        assert!(s1["cache_page_budget"] < 128 * MIB, "{s1:?}");
        drop(f);
        m.unmount().expect("unmount");
    })
}

#[test]
fn cache_size_zero_turns_the_cache_off() {
    with_timeout(TIMEOUT, || {
        let m = mount_with(&["--cache-size", "0"]);
        let data = pattern(1 << 20, 4);
        fs::write(m.path("f"), &data).expect("write");
        // Straight to upper.
        assert!(fs::read(m.dirs.upper.join("f")).expect("upper") == data);
        assert!(fs::read(m.path("f")).expect("read") == data);
        let s = stats(&m.merged);
        assert_eq!(s["cache_size"], 0);
        assert!(!s.contains_key("dirty_bytes"));
        let (ok, _, err) = cli(&["cache", "show", m.merged.to_str().expect("path")]);
        assert!(!ok && err.contains("no page cache"), "{err}");
        m.unmount().expect("unmount");
    })
}

#[test]
fn bad_cache_options_are_refused() {
    with_timeout(TIMEOUT, || {
        // (arguments, what the message names). QA: a negative number got clap's "unexpected
        // argument", and out-of-range windows and intervals were taken (a readahead_kb of
        // 2^64-1 wrapped when turned into bytes).
        for (args, names) in [
            (vec!["--cache-size", "10"], "cache_size"),
            (vec!["--cache-size", "lots"], "cache_size"),
            (vec!["--dirty-ratio", "101"], "dirty_ratio"),
            (vec!["--dirty-ratio", "-5"], "dirty_ratio"),
            (vec!["--bhard", "-1G"], "size"),
            (
                vec!["-o", "dirty_background_ratio=x"],
                "dirty_background_ratio",
            ),
            (
                vec!["--readahead-kb", "18446744073709551615"],
                "readahead_kb",
            ),
            (
                vec!["--kernel-readahead-kb", "2000000"],
                "kernel_readahead_kb",
            ),
            (
                vec!["--dirty-expire-centisecs", "3000000000"],
                "dirty_expire_centisecs",
            ),
            (
                vec!["-o", "dirty_writeback_centisecs=99999999999"],
                "dirty_writeback_centisecs",
            ),
        ] {
            let dirs = Dirs::new(&[vec![]], &[]);
            let mut a = Mount::command_args(&dirs, &MountOpts::default());
            a.extend(args.iter().map(|s| s.to_string()));
            let out = Command::new(bin()).args(&a).output().expect("run");
            assert_eq!(out.status.code(), Some(2), "{args:?}");
            let err = String::from_utf8_lossy(&out.stderr);
            assert!(err.starts_with("unionfs-rs: "), "{args:?}: {err}");
            assert!(err.contains(names), "{args:?}: {err}");
            assert!(!is_fuse_mounted(&dirs.merged));
        }
    })
}

#[test]
fn quota_is_charged_when_a_write_is_accepted() {
    with_timeout(TIMEOUT, || {
        // Writes stay in the cache (no write-back on its own), yet the quota refuses at the
        // limit right away, and usage shows the cached data.
        let m = mount_with(&[
            "--size",
            "2M",
            "--dirty-expire-centisecs",
            "1000000",
            "--dirty-writeback-centisecs",
            "0",
        ]);
        let mut f = File::create(m.path("f")).expect("create");
        let chunk = vec![1u8; 256 << 10];
        let mut written = 0u64;
        let err = loop {
            match f.write(&chunk) {
                Ok(n) => written += n as u64,
                Err(e) => break e,
            }
            assert!(written <= 2 * MIB, "wrote past the limit: {written}");
        };
        assert_eq!(err.raw_os_error(), Some(libc::ENOSPC), "{err}");
        assert!(written >= 2 * MIB - 64 * 1024, "stopped early at {written}");
        let report = cli(&[
            "quota",
            "report",
            "--json",
            m.merged.to_str().expect("path"),
        ]);
        assert!(report.0, "{}", report.2);
        drop(f);
        let (ok, _, e) = cli(&["sync", m.merged.to_str().expect("path")]);
        assert!(ok, "{e}");
        assert_eq!(
            fs::metadata(m.dirs.upper.join("f")).expect("upper").len(),
            written
        );
        // Overwriting in place needs no new space even at the limit.
        let g = OpenOptions::new()
            .write(true)
            .open(m.path("f"))
            .expect("open");
        g.write_all_at(&[2u8; 100_000], 0)
            .expect("overwrite at the limit");
        drop(g);
        m.unmount().expect("unmount");
    })
}

#[test]
fn a_full_upper_disk_fails_the_write_and_loses_nothing_acknowledged() {
    with_timeout(TIMEOUT, || {
        let dirs = Dirs::new(&[vec![]], &[]);
        let lfs = LoopFs::new(&dirs, 64);
        let d = lfs.holding_upper(&dirs);
        let m = Mount::on(&d, &["--cache-size", "16M", "--passthrough", "off"]);
        let data = pattern((128 * MIB) as usize, 6);
        let mut f = File::create(m.path("fill")).expect("create");
        let mut acked = 0usize;
        let err = loop {
            match f.write(&data[acked..(acked + MIB as usize).min(data.len())]) {
                Ok(0) => panic!("write returned 0"),
                Ok(n) => acked += n,
                Err(e) => break e,
            }
            assert!(acked < data.len(), "128 MiB fit on a 64 MiB filesystem?");
        };
        assert_eq!(err.raw_os_error(), Some(libc::ENOSPC), "{err}");
        assert!(
            acked > 20 * MIB as usize,
            "only {acked} bytes before ENOSPC"
        );
        drop(f);
        let upper = d.upper.clone();
        m.unmount().expect("unmount");
        let on_disk = fs::read(upper.join("fill")).expect("upper");
        assert_eq!(
            on_disk.len(),
            acked,
            "acknowledged bytes missing after unmount"
        );
        assert!(on_disk == data[..acked], "content differs");
        drop(lfs);
    })
}

/// A mount (`extra` options) with upper on a 64 MiB loop filesystem, 2 MiB written to `a` and
/// still cached, then upper filled up from outside (`filler`): its cached writes cannot be
/// stored. Returns the mount, the filesystem, the dirs, the data and the filler's path.
fn cached_writes_on_a_full_upper(extra: &[&str]) -> (Mount, LoopFs, Dirs, Vec<u8>, PathBuf) {
    let dirs = Dirs::new(&[vec![]], &[]);
    let lfs = LoopFs::new(&dirs, 64);
    let d = lfs.holding_upper(&dirs);
    let mut args = vec!["--cache-size", "64M", "--passthrough", "off"];
    args.extend_from_slice(extra);
    let m = Mount::on(&d, &args);
    let data = pattern((2 * MIB) as usize, 7);
    let mut f = File::create(m.path("a")).expect("create");
    f.write_all(&data).expect("write");
    let filler = lfs.mnt.join("filler");
    {
        let mut g = File::create(&filler).expect("filler");
        let chunk = vec![0u8; MIB as usize];
        while g.write_all(&chunk).is_ok() {}
    }
    drop(f);
    assert!(stats(&m.merged)["dirty_bytes"] > 0, "nothing left cached");
    (m, lfs, d, data, filler)
}

/// Cached writes that cannot be stored when the mount is to go (upper filled up behind the
/// daemon's back, after the writes were cached): `unionfs-rs umount` refuses, says why, and
/// keeps the mount and the data; with room made it unmounts and the data is on disk. (It
/// unmounted and exited 0, and the data was gone: only the daemon's log said so.)
#[test]
fn umount_refuses_while_cached_writes_cannot_be_stored() {
    with_timeout(TIMEOUT, || {
        let (mut m, lfs, d, data, filler) = cached_writes_on_a_full_upper(&[]);
        let merged = m.merged.to_str().expect("path").to_string();
        let (ok, _, err) = cli(&["umount", &merged]);
        assert!(!ok, "umount lost cached data without a word");
        assert!(err.contains("cannot be stored"), "{err}");
        assert!(is_fuse_mounted(&m.merged), "unmounted anyway");
        assert!(fs::read(m.path("a")).expect("read") == data);
        // A writable handle's close writes the file back, which fails again: an error nobody
        // has been told of yet, for the file's next fsync — not a reason to refuse the
        // unmount once the data can be stored. (QA: the first unmount after room was made
        // was refused, saying "0 bytes" could not be stored.)
        let closes = stats(&m.merged)["close_writebacks"];
        drop(
            OpenOptions::new()
                .append(true)
                .open(m.path("a"))
                .expect("open"),
        );
        // (The RELEASE comes after the close returns.)
        assert!(
            wait_until(Duration::from_secs(10), || {
                let s = stats(&m.merged);
                s["close_writebacks"] > closes && s["writeback_bytes"] == 0
            }),
            "no write-back at close"
        );
        fs::remove_file(&filler).expect("rm filler");
        m.unmount_with(Command::new(bin()).args(["umount", &merged]))
            .expect("unionfs-rs umount once there is room");
        assert!(fs::read(d.upper.join("a")).expect("upper") == data);
        drop(m);
        drop(lfs);
    })
}

/// `umount --force` unmounts all the same; the cached writes are lost, and the quota, which
/// had charged them, records its usage as not exact, so that the next mount recomputes it.
/// (It recorded it as exact, the lost bytes included, and kept that figure from then on.)
#[test]
fn umount_force_loses_cached_writes_and_the_next_mount_recounts() {
    with_timeout(TIMEOUT, || {
        let (mut m, lfs, d, _, filler) = cached_writes_on_a_full_upper(&["--size", "1G"]);
        let merged = m.merged.to_str().expect("path").to_string();
        m.unmount_with(Command::new(bin()).args(["umount", "--force", &merged]))
            .expect("umount --force");
        let state = fs::read_to_string(d.work.join("unionfs/quota")).expect("quota state");
        assert!(
            state.contains("clean=0"),
            "usage recorded as exact:\n{state}"
        );
        drop(m);
        fs::remove_file(&filler).expect("rm filler");
        let m = Mount::start(&d, &MountOpts::default()).unwrap_or_else(|e| panic!("{e}"));
        let (used, _) = quota_used(&m.merged);
        assert!(
            used < MIB,
            "the lost writes are still charged: {used} bytes used"
        );
        m.unmount().expect("unmount");
        drop(lfs);
    })
}

/// A buffer at a 4 KiB-aligned address, as O_DIRECT needs.
#[repr(C, align(4096))]
struct Aligned([u8; 8192]);

/// O_DIRECT reads and writes of lower, new and upper files in every configuration of the page
/// cache and passthrough give what kernel overlayfs gives. (QA: with `--cache-size 0` the
/// backing file keeps the caller's O_DIRECT, and the daemon read and wrote it through buffers
/// of its own, unaligned: EINVAL for every read of file data, and every write with passthrough
/// off too.)
#[test]
fn o_direct_reads_and_writes_in_every_configuration() {
    use std::os::unix::fs::OpenOptionsExt;
    with_timeout(TIMEOUT, || {
        let lower_data: String = (0..16384)
            .map(|i| (b'a' + (i % 26) as u8) as char)
            .collect();
        let lower = vec![file("low", &lower_data), file("low2", &lower_data)];
        let run = |m: &Path| -> Vec<String> {
            let mut out = Vec::new();
            let mut buf = Box::new(Aligned([0u8; 8192]));
            let open = |name: &str, write: bool, create: bool| {
                OpenOptions::new()
                    .read(true)
                    .write(write)
                    .create(create)
                    .custom_flags(libc::O_DIRECT)
                    .open(m.join(name))
                    .unwrap_or_else(|e| panic!("open {name}: {e}"))
            };
            let mut show = |what: &str, r: std::io::Result<usize>, data: &[u8]| {
                out.push(match r {
                    Ok(n) => format!(
                        "{what}: {n} {:?}…{:?}",
                        String::from_utf8_lossy(&data[..n.min(8)]),
                        String::from_utf8_lossy(&data[n.saturating_sub(8)..n])
                    ),
                    Err(e) => format!("{what}: {e}"),
                })
            };
            let f = open("low", false, false);
            let r = f.read_at(&mut buf.0, 4096);
            show("lower read", r, &buf.0);
            // Past the end: a short read.
            let r = f.read_at(&mut buf.0, 12288);
            show("lower read at the end", r, &buf.0);
            buf.0.fill(b'W');
            let f = open("new", true, true);
            let r = f.write_at(&buf.0, 0);
            show("new write", r, &buf.0);
            drop(f);
            let f = open("new", false, false);
            buf.0.fill(0);
            let r = f.read_at(&mut buf.0[..4096], 4096);
            show("upper read", r, &buf.0);
            // Read-write on a lower file: copied up, read and written with O_DIRECT.
            let f = open("low2", true, false);
            let r = f.read_at(&mut buf.0[..4096], 0);
            show("copied-up read", r, &buf.0);
            buf.0.fill(b'X');
            let r = f.write_at(&buf.0[..4096], 4096);
            show("copied-up write", r, &buf.0);
            drop(f);
            for name in ["new", "low2"] {
                let s = fs::read_to_string(m.join(name)).unwrap();
                out.push(format!("{name}: {} {}", s.len(), &s[4090..4100]));
            }
            out
        };
        against_kernel(
            &lower,
            &[
                &[],
                &["--cache-size", "0"],
                &["--cache-size", "0", "--passthrough", "off"],
                &["--passthrough", "off"],
            ],
            run,
        );
    });
}

/// st_blocks of files written through the page cache, before and after fsync, as on kernel
/// overlayfs (ext4's delayed allocation counts the blocks it has reserved for data not yet on
/// disk): a dense 1 MiB file counts its pages at once, a 4 KiB write at 100 MiB one block, not
/// the 100 MiB its size spans. (QA: `du` of such a sparse file showed 100 MiB, for good.)
#[test]
fn blocks_of_written_files_are_their_data_not_their_size() {
    with_timeout(TIMEOUT, || {
        let run = |m: &Path| {
            let mut seen = Vec::new();
            for (name, off, len) in [("dense", 0u64, MIB as usize), ("sparse", 100 * MIB, 4096)] {
                let f = OpenOptions::new()
                    .write(true)
                    .create(true)
                    .truncate(true)
                    .open(m.join(name))
                    .unwrap();
                f.write_all_at(&vec![b'd'; len], off).unwrap();
                let before = fs::metadata(m.join(name)).unwrap().blocks();
                f.sync_all().unwrap();
                drop(f);
                let after = fs::metadata(m.join(name)).unwrap().blocks();
                seen.push((name, before, after));
            }
            seen
        };
        let d = Dirs::new(&[vec![]], &[]);
        let (merged, unmount) = mount_either(&d, true);
        let kernel = run(&merged);
        unmount();
        assert_eq!(
            kernel,
            [("dense", 2048, 2048), ("sparse", 8, 8)],
            "kernel overlayfs (ext4 upper)"
        );
        let m = mount_with(&[]);
        assert_eq!(
            run(&m.merged),
            kernel,
            "unionfs-rs (left) against kernel overlayfs"
        );
        m.unmount().unwrap_or_else(|e| panic!("{e}"));
    });
}

/// A page-aligned buffer of `len` bytes (O_DIRECT), inside a larger vector.
fn aligned_vec(len: usize) -> (Vec<u8>, usize) {
    let v = vec![0u8; len + 4096];
    let at = v.as_ptr().align_offset(4096);
    (v, at)
}

/// A truncate while reads and readahead load the file's pages: the bytes past the new end read
/// as zeros once the file is extended again, as POSIX (and kernel overlayfs) have it. (Review:
/// a load of the new last page that read the disk before the truncate landed after it, with the
/// old bytes past the end: 3 and 11 rounds in 3000 and 4000, and a write of the page then
/// stored them in upper.)
#[test]
fn a_truncate_racing_reads_leaves_zeros_past_the_end() {
    use std::os::unix::fs::OpenOptionsExt;
    with_timeout(TIMEOUT, || {
        const P: usize = 4096;
        const NP: usize = 64;
        let m = mount_with(&["--readahead-kb", "512", "--cache-size", "64K"]);
        let path = m.path("tr");
        fs::write(&path, vec![0xabu8; NP * P]).unwrap();
        let stop = Arc::new(AtomicBool::new(false));
        let readers: Vec<_> = (0..2)
            .map(|_| {
                let (path, stop) = (path.clone(), stop.clone());
                std::thread::spawn(move || {
                    let f = OpenOptions::new()
                        .read(true)
                        .custom_flags(libc::O_DIRECT)
                        .open(&path)
                        .expect("open for reading");
                    let (mut v, at) = aligned_vec(4 * P);
                    while !stop.load(Ordering::Relaxed) {
                        for off in (0..NP * P).step_by(4 * P) {
                            let _ = f.read_at(&mut v[at..at + 4 * P], off as u64);
                        }
                    }
                })
            })
            .collect();
        let f = OpenOptions::new()
            .read(true)
            .write(true)
            .custom_flags(libc::O_DIRECT)
            .open(&path)
            .expect("open for writing");
        let (mut v, at) = aligned_vec(NP * P);
        let mut bad = Vec::new();
        for i in 0..3000usize {
            let x = (i * 7919) % (NP * P - 2 * P) + P + 100;
            f.set_len(x as u64).expect("truncate");
            f.set_len((NP * P) as u64).expect("extend");
            let buf = &mut v[at..at + NP * P];
            let n = f.read_at(buf, 0).expect("read");
            assert_eq!(n, NP * P, "short read");
            let tail = &buf[x..(x / P + 1) * P];
            let stale = tail.iter().filter(|&&b| b != 0).count();
            if stale > 0 {
                bad.push((i, x, stale));
            }
            buf.fill(0xab);
            f.write_at(buf, 0).expect("rewrite");
        }
        stop.store(true, Ordering::Relaxed);
        for r in readers {
            r.join().expect("reader");
        }
        assert!(
            bad.is_empty(),
            "rounds whose bytes past the cut were not zeros (round, size, bytes): {bad:?}"
        );
        drop(f);
        m.unmount().expect("unmount");
    })
}

/// A write-back error is reported as the kernel's errseq reports it: at the fsync of every
/// descriptor that was open when it happened (and of one opened before any fsync reported it),
/// once each, even after the file's pages have left the cache; a descriptor opened after it
/// was reported hears nothing. (Review: the first fsync took the error for all, so a second
/// descriptor's fsync said all was well; and once the file's clean pages were evicted the
/// error went with them: no fsync reported it.)
#[test]
fn a_write_back_error_reaches_every_descriptors_fsync_once() {
    with_timeout(TIMEOUT, || {
        let big = pattern((24 * MIB) as usize, 3);
        let dirs = Dirs::new(&[vec![file_bytes("big", big.clone())]], &[]);
        let lfs = LoopFs::new(&dirs, 64);
        let d = lfs.holding_upper(&dirs);
        let args = [
            "--cache-size",
            "16M",
            "--passthrough",
            "off",
            "--writeback-on-close",
            "0",
            "--dirty-expire-centisecs",
            "100000",
            "--dirty-writeback-centisecs",
            "0",
        ];
        let m = Mount::on(&d, &args);
        let data = pattern(MIB as usize, 9);
        let mut fd1 = File::create(m.path("g")).expect("create");
        let fd2 = OpenOptions::new()
            .read(true)
            .write(true)
            .open(m.path("g"))
            .expect("open fd2");
        fd1.write_all(&data).expect("write");
        // Upper fills up behind the daemon's back, then write-back starts: ENOSPC.
        let filler = lfs.mnt.join("filler");
        {
            let mut g = File::create(&filler).expect("filler");
            let chunk = vec![0u8; MIB as usize];
            while g.write_all(&chunk).is_ok() {}
        }
        let merged = m.merged.to_str().expect("path").to_string();
        let (ok, _, err) = cli(&["cache", "set", &merged, "dirty_background_bytes=4096"]);
        assert!(ok, "cache set: {err}");
        let deadline = Instant::now() + Duration::from_secs(20);
        while !m.log_text().contains("write-back of node") {
            assert!(
                Instant::now() < deadline,
                "no write-back failed: {}",
                m.log_text()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        // Room again: the flusher's next try stores the data.
        fs::remove_file(&filler).expect("rm filler");
        let deadline = Instant::now() + Duration::from_secs(30);
        while stats(&m.merged)["dirty_bytes"] > 0 {
            assert!(Instant::now() < deadline, "the data never reached upper");
            std::thread::sleep(Duration::from_millis(50));
        }
        // The file's clean pages leave the cache (16 MiB) for another file's, each read twice
        // (so they rank as used again, as g's written pages do).
        {
            use std::os::unix::fs::OpenOptionsExt;
            let f = OpenOptions::new()
                .read(true)
                .custom_flags(libc::O_DIRECT)
                .open(m.path("big"))
                .expect("open big");
            let (mut v, at) = aligned_vec(4096);
            for off in (0..big.len()).step_by(4096) {
                for _ in 0..2 {
                    let n = f.read_at(&mut v[at..at + 4096], off as u64).expect("read");
                    assert!(v[at..at + n] == big[off..off + n], "big at {off}");
                }
            }
        }
        let fd3 = OpenOptions::new()
            .write(true)
            .open(m.path("g"))
            .expect("open fd3");
        let errno = |r: std::io::Result<()>| r.err().and_then(|e| e.raw_os_error());
        assert_eq!(errno(fd1.sync_all()), Some(libc::ENOSPC), "fd1's fsync");
        assert_eq!(errno(fd1.sync_all()), None, "fd1's second fsync");
        assert_eq!(errno(fd2.sync_all()), Some(libc::ENOSPC), "fd2's fsync");
        assert_eq!(
            errno(fd3.sync_all()),
            Some(libc::ENOSPC),
            "fd3's fsync (opened before any fsync reported the error)"
        );
        let fd4 = OpenOptions::new()
            .write(true)
            .open(m.path("g"))
            .expect("open fd4");
        assert_eq!(errno(fd4.sync_all()), None, "fd4's fsync (opened after)");
        assert!(fs::read(m.path("g")).expect("read g") == data, "g's data");
        drop((fd1, fd2, fd3, fd4));
        m.unmount().expect("unmount");
        assert!(fs::read(d.upper.join("g")).expect("upper g") == data);
        drop(lfs);
    })
}
