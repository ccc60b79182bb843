//! Removed files released in the background (src/union/reaper.rs) on real mounts over a private
//! ext4 filesystem (a loop device, so its free space is the test's alone): the unlink answers
//! while the filesystem still holds the file, `df` on the mount waits until the space is back,
//! an unmount releases everything pending, a file replaced by a rename goes the same way, and
//! near a full upper the request releases the file itself (space comes back at once).

mod common;

use common::*;
use std::fs::{self, File};
use std::io::Write;
use std::time::Duration;

const TIMEOUT: u64 = 120;
const MIB: u64 = 1 << 20;

/// Upper and work on a fresh ext4 filesystem of `size_mib` MiB.
fn mount_on_loop(size_mib: u64, extra: &[&str]) -> (Mount, LoopFs) {
    let dirs = Dirs::new(&[vec![file("lower-file", "from below")]], &[]);
    let lfs = LoopFs::new(&dirs, size_mib);
    let d = lfs.holding_upper(&dirs);
    let opts = MountOpts {
        extra: extra.iter().map(|s| s.to_string()).collect(),
        ..MountOpts::default()
    };
    let m = Mount::start(&d, &opts).unwrap_or_else(|e| panic!("{e}"));
    (m, lfs)
}

/// `n` files of `mib` MiB each, written and fsynced through the mount.
fn write_files(m: &Mount, n: usize, mib: u64) {
    let data = vec![0x5au8; (mib * MIB) as usize];
    for i in 0..n {
        let mut f = File::create(m.path(&format!("f{i}"))).expect("create");
        f.write_all(&data).expect("write");
        f.sync_all().expect("fsync");
    }
}

/// Wait (up to 10 s) until `n` removed files have reached the reaper (pending or released).
/// Returns whether one was seen pending meanwhile.
fn wait_reaper(m: &Mount, n: u64) -> bool {
    let t = std::time::Instant::now();
    let mut seen_pending = false;
    loop {
        let pending = stat_of(m, "deferred_releases_pending");
        seen_pending |= pending >= 1;
        if pending + stat_of(m, "deferred_releases") >= n {
            return seen_pending;
        }
        assert!(
            t.elapsed() < Duration::from_secs(10),
            "the removed files never reached the reaper"
        );
        std::thread::sleep(Duration::from_millis(5));
    }
}

fn stat_of(m: &Mount, key: &str) -> u64 {
    let s = daemon_stats(&m.merged);
    *s.get(key)
        .unwrap_or_else(|| panic!("stats has no {key}: {s:?}"))
}

#[test]
fn removed_files_are_released_in_the_background_and_df_waits_for_them() {
    with_timeout(TIMEOUT, || {
        // 2 GiB: more free than the reaper's minimum (1 GiB).
        let (m, lfs) = mount_on_loop(2048, &["-o", "release_delay_ms=300"]);
        write_files(&m, 8, 4);
        let full = lfs.avail();
        for i in 0..8 {
            fs::remove_file(m.path(&format!("f{i}"))).expect("unlink");
        }
        // The names are gone at once, through the mount and in upper.
        for i in 0..8 {
            assert!(!m.path(&format!("f{i}")).exists(), "f{i} still visible");
            assert!(
                !m.dirs.upper.join(format!("f{i}")).exists(),
                "f{i} still in upper"
            );
        }
        // Each removed file reaches the reaper once the kernel forgets it (through io_uring a
        // moment after the unlink's reply) and waits there 300 ms: wait until all 8 got there,
        // most still held by the daemon.
        assert!(
            wait_reaper(&m, 8),
            "no release pending right after the unlinks"
        );
        assert!(
            lfs.avail() < full + 28 * MIB,
            "the space came back before the releases ran"
        );
        // df through the mount waits for them: afterwards everything is released and the
        // filesystem has the 32 MiB back.
        let s = nix::sys::statvfs::statvfs(&m.merged).expect("statvfs of the mount");
        assert!(s.blocks_available() > 0);
        assert_eq!(stat_of(&m, "deferred_releases_pending"), 0);
        assert_eq!(stat_of(&m, "deferred_releases"), 8);
        assert_eq!(stat_of(&m, "releases_in_request"), 0);
        assert!(
            lfs.avail() >= full + 30 * MIB,
            "space not back after df: {} -> {}",
            full,
            lfs.avail()
        );
        // A lower file's removal is a whiteout, nothing to release.
        fs::remove_file(m.path("lower-file")).expect("unlink lower file");
        assert_eq!(stat_of(&m, "deferred_releases_pending"), 0);
        m.unmount().expect("unmount");
    })
}

#[test]
fn a_file_replaced_by_a_rename_is_released_in_the_background() {
    with_timeout(TIMEOUT, || {
        let (m, lfs) = mount_on_loop(2048, &["-o", "release_delay_ms=300"]);
        write_files(&m, 4, 4);
        for i in 0..4 {
            fs::write(m.path(&format!("new{i}")), format!("replacement {i}")).expect("write");
        }
        let full = lfs.avail();
        for i in 0..4 {
            fs::rename(m.path(&format!("new{i}")), m.path(&format!("f{i}"))).expect("rename");
        }
        for i in 0..4 {
            assert_eq!(
                fs::read_to_string(m.path(&format!("f{i}"))).expect("read"),
                format!("replacement {i}")
            );
            assert!(!m.path(&format!("new{i}")).exists());
        }
        // The replaced files the kernel held go to the reaper once it forgets them (which
        // follows the rename's reply, a moment later through io_uring): each waits there
        // release_delay_ms.
        assert!(wait_reaper(&m, 4), "no release was deferred");
        let _ = nix::sys::statvfs::statvfs(&m.merged).expect("statvfs of the mount");
        assert_eq!(stat_of(&m, "deferred_releases"), 4);
        assert!(
            lfs.avail() >= full + 14 * MIB,
            "space not back after df: {} -> {}",
            full,
            lfs.avail()
        );
        m.unmount().expect("unmount");
    })
}

#[test]
fn an_unmount_releases_everything_pending() {
    with_timeout(TIMEOUT, || {
        let (m, lfs) = mount_on_loop(2048, &["-o", "release_delay_ms=200"]);
        write_files(&m, 5, 4);
        let full = lfs.avail();
        for i in 0..5 {
            fs::remove_file(m.path(&format!("f{i}"))).expect("unlink");
        }
        // A removed file reaches the reaper once the kernel forgets it, which through io_uring
        // can follow the unlink's reply by a moment; each then waits there release_delay_ms, so
        // polling every 5 ms sees one pending.
        let t = std::time::Instant::now();
        while stat_of(&m, "deferred_releases_pending") == 0 {
            assert!(
                t.elapsed() < Duration::from_secs(10),
                "no removed file reached the reaper"
            );
            std::thread::sleep(Duration::from_millis(5));
        }
        m.unmount().expect("unmount");
        // The daemon has exited: nothing holds the files any more.
        assert!(
            lfs.avail() >= full + 18 * MIB,
            "space not back after the unmount: {} -> {}",
            full,
            lfs.avail()
        );
    })
}

#[test]
fn near_a_full_upper_the_request_releases_the_file_itself() {
    with_timeout(TIMEOUT, || {
        // 256 MiB: less free than the reaper's minimum; a release delay that would show.
        let (m, lfs) = mount_on_loop(256, &["-o", "release_delay_ms=5000"]);
        write_files(&m, 4, 8);
        let full = lfs.avail();
        for i in 0..4 {
            fs::remove_file(m.path(&format!("f{i}"))).expect("unlink");
        }
        // No statfs through the mount: the space is back because the unlinks freed it. The
        // kernel sends a file's RELEASE after close(2) returns, so the last file's unlink can
        // reach the daemon while its handle is still open there, and its space comes back with
        // that RELEASE a moment later: wait up to 1 s for it (far below the 5 s release delay
        // this test would meet if the unlinks deferred).
        let deadline = std::time::Instant::now() + Duration::from_secs(1);
        while lfs.avail() < full + 30 * MIB && std::time::Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(20));
        }
        assert!(
            lfs.avail() >= full + 30 * MIB,
            "space not back within 1 s of the unlinks: {} -> {}",
            full,
            lfs.avail()
        );
        assert_eq!(stat_of(&m, "deferred_releases"), 0);
        assert_eq!(stat_of(&m, "deferred_releases_pending"), 0);
        m.unmount().expect("unmount");
    })
}
