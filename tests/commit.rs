//! Deferred copy-up commits (src/union/commit.rs) on real mounts: a copy-up made by an open for
//! writing or a setattr is answered before its fsync and rename into upper; the file is right
//! through every path meanwhile, fsync and `unionfs-rs sync` wait for the commit, the unmount
//! drains it, a killed daemon leaves the old file or the whole new one (never a partial upper
//! file) and the next mount clears its scratch. The operation sequences themselves are
//! compared with kernel overlayfs in tests/differential.rs (operations_right_after_a_copy_up).

mod common;

use common::*;
use std::fs::{self, OpenOptions};
use std::io::Write;
use std::os::unix::fs::{MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::Path;
use std::time::Duration;

const TIMEOUT: u64 = 120;
const MIB: usize = 1 << 20;

/// Deterministic bytes that differ at every offset's low byte and per seed.
fn pattern(len: usize, seed: u8) -> Vec<u8> {
    (0..len)
        .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed) ^ (i >> 12) as u8)
        .collect()
}

fn append(p: &Path, data: &[u8]) {
    let mut f = OpenOptions::new()
        .append(true)
        .open(p)
        .unwrap_or_else(|e| panic!("open {} for append: {e}", p.display()));
    f.write_all(data).expect("append");
}

/// `unionfs-rs sync` on the mount: every pending commit is done when it returns.
fn sync_mount(m: &Mount) {
    let (st, _, err) = run_with_timeout(
        std::process::Command::new(bin()).arg("sync").arg(&m.merged),
        Duration::from_secs(60),
    )
    .expect("run sync");
    assert!(st.success(), "sync: {err}");
}

/// Read `p` until it holds `want` (the daemon has the kernel forget from a thread of its own),
/// for at most 10 s.
fn eventually_reads(p: &Path, want: &str, what: &str) {
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    loop {
        let now = fs::read_to_string(p).unwrap_or_default();
        if now == want || std::time::Instant::now() > deadline {
            assert_eq!(now, want, "{what}");
            return;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Scratch objects in the work dir: everything but the shared whiteout that whiteouts are
/// hard links of (kept there while mounted, as kernel overlayfs keeps its own).
fn work_entries(m: &Mount) -> Vec<String> {
    work_entries_in(&m.dirs)
}

fn work_entries_in(dirs: &Dirs) -> Vec<String> {
    match fs::read_dir(dirs.work.join("work")) {
        Ok(rd) => rd
            .map(|e| e.expect("work entry"))
            .filter(|e| {
                !e.file_type()
                    .is_ok_and(|t| std::os::unix::fs::FileTypeExt::is_char_device(&t))
            })
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .collect(),
        Err(_) => Vec::new(),
    }
}

#[test]
fn copy_up_for_writing_commits_in_the_background() {
    with_timeout(TIMEOUT, || {
        let big = pattern(64 * MIB, 7);
        let m = Mount::with_args(
            vec![
                file_bytes("big", big.clone()),
                file_mode("small", "0123456789", 0o640),
                file("d/nested", "deep"),
            ],
            &[],
        );
        // Written right after the open that copied it up: all of it is there at once, through
        // the open file and by name (stat, a new open, a listing), before any sync.
        append(&m.path("big"), b"tail");
        let mut want = big.clone();
        want.extend_from_slice(b"tail");
        assert_eq!(lstat(&m.path("big")).len(), want.len() as u64);
        assert!(fs::read(m.path("big")).expect("read back") == want);
        fs::set_permissions(m.path("small"), fs::Permissions::from_mode(0o600)).expect("chmod");
        assert_eq!(lstat(&m.path("small")).mode() & 0o777, 0o600);
        append(&m.path("d/nested"), b"er");
        let names: Vec<String> = fs::read_dir(&m.merged)
            .expect("readdir")
            .map(|e| e.expect("entry").file_name().to_string_lossy().into_owned())
            .collect();
        assert_eq!(names.iter().filter(|n| *n == "big").count(), 1, "{names:?}");

        // `unionfs-rs sync` waits for every commit: then upper has the files, work is empty.
        sync_mount(&m);
        let s = daemon_stats(&m.merged);
        assert!(
            s.get("copyup_deferred_commits").copied().unwrap_or(0) >= 3,
            "commits were not deferred: {s:?}"
        );
        assert_eq!(s.get("copyup_pending_commits"), Some(&0), "{s:?}");
        assert!(fs::read(m.dirs.upper.join("big")).expect("upper big") == want);
        assert_eq!(
            fs::metadata(m.dirs.upper.join("small"))
                .expect("upper small")
                .mode()
                & 0o777,
            0o600
        );
        assert_eq!(
            fs::read(m.dirs.upper.join("d/nested")).expect("upper nested"),
            b"deeper"
        );
        assert!(work_entries(&m).is_empty(), "work: {:?}", work_entries(&m));
        m.unmount().expect("unmount");
    })
}

#[test]
fn fsync_and_unmount_wait_for_the_commit() {
    with_timeout(TIMEOUT, || {
        let a = pattern(32 * MIB, 1);
        let b = pattern(32 * MIB, 2);
        let m = Mount::with_args(
            vec![file_bytes("a", a.clone()), file_bytes("b", b.clone())],
            &[],
        );
        // fsync(2) of the copied-up file returns only once it has its upper name.
        let mut f = OpenOptions::new()
            .append(true)
            .open(m.path("a"))
            .expect("open a");
        f.write_all(b"synced").expect("write a");
        f.sync_all().expect("fsync a");
        let up = fs::read(m.dirs.upper.join("a")).expect("upper a after fsync");
        assert_eq!(up.len(), a.len() + 6);
        assert_eq!(&up[a.len()..], b"synced");
        drop(f);
        // No sync at all: the unmount drains the commit before the daemon exits.
        append(&m.path("b"), b"unsynced");
        let upper = m.dirs.upper.clone();
        let dirs = m.dirs.clone();
        m.unmount().expect("unmount");
        let up = fs::read(upper.join("b")).expect("upper b after unmount");
        assert_eq!(up.len(), b.len() + 8);
        assert!(up[..b.len()] == b[..]);
        assert!(
            fs::read_dir(dirs.work.join("work")).map_or(true, |mut d| d.next().is_none()),
            "work dir not empty after unmount"
        );
    })
}

/// A killed daemon (not a crash: the kernel keeps what was written, so this does not test the
/// fsync before the rename) leaves a state the next mount serves: upper has no copy or the
/// whole one, the merged file is the old or the new one, and the scratch is cleared.
#[test]
fn killed_daemon_leaves_the_old_file_or_the_whole_copy() {
    with_timeout(TIMEOUT, || {
        let big = pattern(96 * MIB, 9);
        for round in 0..3 {
            let m = Mount::with_args(vec![file_bytes("big", big.clone())], &[]);
            append(&m.path("big"), b"x");
            // Killed at once: most likely while the commit's fsync runs.
            let pid = m.pid.expect("daemon pid");
            // SAFETY: kill(2) of the daemon process this test started.
            assert_eq!(unsafe { libc::kill(pid, libc::SIGKILL) }, 0);
            assert!(wait_pid_gone(pid, Duration::from_secs(10)));
            let dirs = m.dirs.clone();
            drop(m);
            // Upper holds no copy, or the complete one: never a partial file hiding the lower.
            match fs::read(dirs.upper.join("big")) {
                Ok(up) => {
                    assert_eq!(up.len(), big.len() + 1, "round {round}: partial upper file");
                    assert!(
                        up[..big.len()] == big[..],
                        "round {round}: upper data differs"
                    );
                }
                Err(e) => {
                    assert_eq!(e.kind(), std::io::ErrorKind::NotFound, "round {round}");
                    eprintln!("round {round}: killed before the commit");
                }
            }
            // The next mount clears the scratch and shows one of the two files.
            let m = Mount::start(&dirs, &MountOpts::default()).unwrap_or_else(|e| panic!("{e}"));
            let seen = fs::read(m.path("big")).expect("read after remount");
            assert!(
                seen == big || (seen.len() == big.len() + 1 && seen[..big.len()] == big[..]),
                "round {round}: merged file is neither the old nor the new one (len {})",
                seen.len()
            );
            assert!(
                work_entries(&m).is_empty(),
                "round {round}: work {:?}",
                work_entries(&m)
            );
            m.unmount().expect("unmount");
        }
    })
}

#[test]
fn concurrent_users_of_a_file_being_copied_up() {
    // Four threads go through the same lower files at the same time: one appends (an open for
    // writing: copy-up), one chmods (setattr: copy-up), one reads through new opens, one
    // stats and lists xattrs. Whoever comes second to a file meets a copy whose commit is
    // pending. Nothing may fail or hang, and every file ends right.
    // Both with FUSE passthrough (as root) and through the daemon's page cache.
    with_timeout(TIMEOUT, || {
        // Each commit waits 5 ms first: the others meet it pending.
        concurrent_round(&["-o", "commit_delay_ms=5"]);
        concurrent_round(&["--passthrough", "off", "-o", "commit_delay_ms=5"]);
    })
}

fn concurrent_round(args: &[&str]) {
    {
        const N: usize = 150;
        let lower: Vec<Entry> = (0..N)
            .map(|i| file_bytes(&format!("f{i}"), pattern(256 * 1024, i as u8)))
            .collect();
        let m = Mount::with_args(lower, args);
        let root = m.merged.clone();
        let work = |k: usize| {
            let root = root.clone();
            std::thread::spawn(move || {
                for i in 0..N {
                    let p = root.join(format!("f{i}"));
                    match k {
                        0 => append(&p, b"+"),
                        1 => fs::set_permissions(&p, fs::Permissions::from_mode(0o600))
                            .unwrap_or_else(|e| panic!("chmod f{i}: {e}")),
                        2 => {
                            let d = fs::read(&p).unwrap_or_else(|e| panic!("read f{i}: {e}"));
                            assert!(d.len() == 256 * 1024 || d.len() == 256 * 1024 + 1);
                        }
                        _ => {
                            lstat(&p);
                            xattr_names(&p);
                        }
                    }
                }
            })
        };
        let threads: Vec<_> = (0..4).map(work).collect();
        for t in threads {
            t.join().expect("worker thread");
        }
        let s = daemon_stats(&m.merged);
        assert!(
            s.get("copyup_deferred_commits").copied().unwrap_or(0) > 0,
            "no commit was deferred: {s:?}"
        );
        assert_eq!(s.get("copyup_failed_commits"), Some(&0), "{s:?}");
        for i in 0..N {
            let p = m.path(&format!("f{i}"));
            let d = fs::read(&p).expect("read");
            let mut want = pattern(256 * 1024, i as u8);
            want.push(b'+');
            assert!(d == want, "f{i} content");
            assert_eq!(lstat(&p).mode() & 0o777, 0o600, "f{i} mode");
        }
        m.unmount().expect("unmount");
    }
}

/// llistxattr(2) of `p` (names only; the count is what matters here).
fn xattr_names(p: &Path) -> usize {
    use std::os::unix::ffi::OsStrExt;
    let c = std::ffi::CString::new(p.as_os_str().as_bytes()).expect("path");
    let mut buf = vec![0u8; 4096];
    // SAFETY: llistxattr(2) into a buffer of the length given.
    let n = unsafe { libc::llistxattr(c.as_ptr(), buf.as_mut_ptr().cast(), buf.len()) };
    assert!(
        n >= 0,
        "llistxattr {}: {}",
        p.display(),
        std::io::Error::last_os_error()
    );
    n as usize
}

#[test]
fn unlink_and_rename_racing_a_copy_up() {
    // One thread opens lower files for writing (copy-up, commit deferred) while another
    // unlinks or renames over the same names. Every operation succeeds or fails as it may
    // (ENOENT once the name is gone), nothing hangs, and the end state is exactly what the
    // removals and renames say: no file shows through, upper holds only what it should.
    with_timeout(TIMEOUT, || {
        const N: usize = 120;
        let mut lower: Vec<Entry> = (0..N)
            .map(|i| file_bytes(&format!("u{i}"), pattern(128 * 1024, i as u8)))
            .collect();
        lower.extend((0..N).map(|i| file_bytes(&format!("r{i}"), pattern(128 * 1024, 1))));
        let m = Mount::with_args(lower, &["-o", "commit_delay_ms=5"]);
        let root = m.merged.clone();
        let writer = {
            let root = root.clone();
            std::thread::spawn(move || {
                for i in 0..N {
                    for name in [format!("u{i}"), format!("r{i}")] {
                        match OpenOptions::new().append(true).open(root.join(&name)) {
                            Ok(mut f) => {
                                // The name may go at any time; the open file stays writable.
                                f.write_all(b"w")
                                    .unwrap_or_else(|e| panic!("write {name}: {e}"))
                            }
                            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                            Err(e) => panic!("open {name}: {e}"),
                        }
                    }
                }
            })
        };
        let remover = {
            let root = root.clone();
            std::thread::spawn(move || {
                for i in 0..N {
                    fs::remove_file(root.join(format!("u{i}")))
                        .unwrap_or_else(|e| panic!("unlink u{i}: {e}"));
                    fs::write(root.join("new"), b"replacement").expect("create new");
                    fs::rename(root.join("new"), root.join(format!("r{i}")))
                        .unwrap_or_else(|e| panic!("rename over r{i}: {e}"));
                }
            })
        };
        writer.join().expect("writer");
        remover.join().expect("remover");
        sync_mount(&m);
        for i in 0..N {
            assert!(
                fs::symlink_metadata(m.path(&format!("u{i}"))).is_err(),
                "u{i} still shows"
            );
            // The writer may have opened the replacement (then it appended to it).
            let r = fs::read(m.path(&format!("r{i}"))).expect("read r");
            assert!(r == b"replacement" || r == b"replacementw", "r{i}: {r:?}");
            let up = m.dirs.upper.join(format!("u{i}"));
            let md = fs::symlink_metadata(&up).expect("whiteout in upper");
            assert!(
                std::os::unix::fs::FileTypeExt::is_char_device(&md.file_type()),
                "upper u{i} is not a whiteout"
            );
        }
        assert!(work_entries(&m).is_empty(), "work: {:?}", work_entries(&m));
        // The 120 whiteouts are links of one inode, whose work-dir name the unmount removes.
        let ino = |n: &str| {
            fs::symlink_metadata(m.dirs.upper.join(n))
                .expect("whiteout")
                .ino()
        };
        assert_eq!(ino("u0"), ino(&format!("u{}", N - 1)));
        let dirs = m.dirs.clone();
        m.unmount().expect("unmount");
        assert!(
            fs::read_dir(dirs.work.join("work")).map_or(true, |mut d| d.next().is_none()),
            "work dir not empty after unmount"
        );
    })
}

/// An operation in a directory while a background commit renames a copy into it keeps its
/// change of the directory's times: the commit holds the directory from reading its times to
/// restoring them, and the operation waits (else the restore would undo the operation's
/// change: seen once in CI by the random differential sequences).
#[test]
fn an_operation_during_a_commit_keeps_its_change_of_the_directory_times() {
    with_timeout(TIMEOUT, || {
        let m = Mount::with_args(vec![file("a/x", "lower")], &["-o", "commit_window_ms=400"]);
        let old = lstat(&m.path("a")).mtime();
        assert!(old < OLD_TIME_CUTOFF, "a's mtime {old} is not the layer's");
        // Copies a up (its times kept) and a/x, whose commit then waits 400 ms between
        // reading a's times and renaming x into it.
        append(&m.path("a/x"), b" and more");
        std::thread::sleep(Duration::from_millis(150));
        fs::create_dir(m.path("a/y")).expect("mkdir during the commit");
        sync_mount(&m);
        let now = lstat(&m.path("a")).mtime();
        assert!(
            now > OLD_TIME_CUTOFF,
            "a's mtime is {now}, the layer's: the mkdir's change of it was undone"
        );
        assert!(
            fs::metadata(m.dirs.upper.join("a"))
                .expect("upper a")
                .mtime()
                > OLD_TIME_CUTOFF
        );
        assert_eq!(fs::read_to_string(m.path("a/x")).unwrap(), "lower and more");
        m.unmount().expect("unmount");
    })
}

/// mtime of `path` from the daemon itself (statx AT_STATX_FORCE_SYNC: FUSE then asks with a
/// GETATTR whatever it has cached).
fn daemon_mtime(path: &Path) -> i64 {
    use std::os::unix::ffi::OsStrExt;
    let c = std::ffi::CString::new(path.as_os_str().as_bytes()).expect("path");
    // SAFETY: zeroed statx is a valid out-buffer.
    let mut stx: libc::statx = unsafe { std::mem::zeroed() };
    // SAFETY: valid C string and out-pointer for the call.
    let r = unsafe {
        libc::statx(
            libc::AT_FDCWD,
            c.as_ptr(),
            libc::AT_SYMLINK_NOFOLLOW | libc::AT_STATX_FORCE_SYNC,
            libc::STATX_MTIME,
            &mut stx,
        )
    };
    assert_eq!(r, 0, "statx {path:?}: {}", std::io::Error::last_os_error());
    stx.stx_mtime.tv_sec
}

/// A commit renaming a copy into its directory changes the directory's times on disk until it
/// puts them back; a stat in between must not report them (the crossmount random test once
/// caught our view with a copied-up directory's new mtime, kernel overlayfs with its old one).
#[test]
fn a_stat_during_a_commit_shows_the_directory_times_it_keeps() {
    with_timeout(TIMEOUT, || {
        let m = Mount::with_args(vec![file("a/x", "lower")], &["-o", "commit_window_ms=300"]);
        let old = daemon_mtime(&m.path("a"));
        assert!(old < OLD_TIME_CUTOFF, "a's mtime {old} is not the layer's");
        // Copies a up (times kept) and a/x; the commit waits 300 ms before its rename into a
        // and 300 ms after it before restoring a's times.
        append(&m.path("a/x"), b" and more");
        let until = std::time::Instant::now() + Duration::from_millis(900);
        // Upper's own a, watched behind the mount: it has the commit's transient times between
        // the rename and the restore (a stat through the mount then waits for the restore).
        let upper_a = m.dirs.upper.join("a");
        let watcher = std::thread::spawn(move || {
            let mut seen = false;
            while std::time::Instant::now() < until {
                seen |= fs::metadata(&upper_a).is_ok_and(|md| md.mtime() != old);
                std::thread::sleep(Duration::from_millis(2));
            }
            seen
        });
        let mut stats = 0;
        while std::time::Instant::now() < until {
            let now = daemon_mtime(&m.path("a"));
            assert_eq!(
                now, old,
                "a's mtime seen during the commit (after {stats} stats)"
            );
            stats += 1;
            std::thread::sleep(Duration::from_millis(5));
        }
        assert!(
            watcher.join().expect("watcher"),
            "the commit's window never showed on disk: the test did not meet it"
        );
        sync_mount(&m);
        assert_eq!(daemon_mtime(&m.path("a")), old);
        let s = daemon_stats(&m.merged);
        assert_eq!(s.get("copyup_deferred_commits"), Some(&1), "{s:?}");
        m.unmount().expect("unmount");
    })
}

#[test]
fn synchronous_writes_do_not_defer_the_commit() {
    // O_SYNC / O_DSYNC writes are durable when they return, so is the name they are under:
    // such an open copies up synchronously, and the file is in upper at once.
    with_timeout(TIMEOUT, || {
        let m = Mount::with_args(vec![file("s", "sync"), file("d", "dsync")], &[]);
        for (name, flag) in [("s", libc::O_SYNC), ("d", libc::O_DSYNC)] {
            let mut f = OpenOptions::new()
                .append(true)
                .custom_flags(flag)
                .open(m.path(name))
                .expect("open");
            f.write_all(b"!").expect("write");
            assert!(
                m.dirs.upper.join(name).exists(),
                "{name} not in upper after the write"
            );
        }
        let s = daemon_stats(&m.merged);
        assert_eq!(s.get("copyup_deferred_commits"), Some(&0), "{s:?}");
        m.unmount().expect("unmount");
    })
}

/// A deferred rename whose move cannot be committed (here: a file put at the new name in upper
/// behind the daemon's back while the commit waits) leaves the file under its old name, and
/// the kernel, which was told of the rename, is made to forget both names: the new name then
/// shows what upper has there, the old name the moved file, and its fsync reports the failure.
#[test]
fn a_rename_that_cannot_be_committed_is_undone_in_the_kernel_too() {
    with_timeout(TIMEOUT, || {
        let m = Mount::with_args(
            vec![file("a", "lower a"), dir("dst")],
            &["-o", "commit_delay_ms=400"],
        );
        // The kernel learns the rename and caches the new name's entry (and, from the stat,
        // its attributes; an open would wait for the commit).
        fs::rename(m.path("a"), m.path("dst/b")).expect("rename");
        assert_eq!(fs::metadata(m.path("dst/b")).expect("stat b").len(), 7);
        // Behind the daemon, before the commit: something takes the new name in upper.
        fs::create_dir_all(m.dirs.upper.join("dst")).expect("upper dst");
        fs::write(m.dirs.upper.join("dst/b"), "put there").expect("write upper b");
        sync_mount(&m);
        let s = daemon_stats(&m.merged);
        assert_eq!(s.get("copyup_failed_commits"), Some(&1), "{s:?}");
        eventually_reads(
            &m.path("dst/b"),
            "put there",
            "the new name still shows the moved file",
        );
        assert_eq!(
            fs::read_to_string(m.path("a")).expect("old name"),
            "lower a",
            "the file is back under its old name"
        );
        assert_eq!(
            fs::read_to_string(m.dirs.upper.join("a")).expect("upper a"),
            "lower a"
        );
        m.unmount().expect("unmount");
    })
}

/// A deferred rename answers with both directories' times set, and its commit keeps them: the
/// times stat showed right after the rename are the ones on disk once it is committed (kernel
/// overlayfs sets them once, at the rename).
#[test]
fn a_deferred_rename_keeps_the_directory_times_it_showed() {
    with_timeout(TIMEOUT, || {
        let m = Mount::with_args(
            vec![file("src/a", "a"), dir("dst")],
            &["-o", "commit_delay_ms=300"],
        );
        fs::rename(m.path("src/a"), m.path("dst/a")).expect("rename");
        let shown: Vec<(i64, i64)> = ["src", "dst"]
            .iter()
            .map(|d| {
                let md = fs::metadata(m.path(d)).expect("stat dir");
                (md.mtime(), md.mtime_nsec())
            })
            .collect();
        sync_mount(&m);
        for (d, want) in ["src", "dst"].iter().zip(&shown) {
            let md = fs::metadata(m.dirs.upper.join(d)).expect("stat upper dir");
            assert_eq!(
                (md.mtime(), md.mtime_nsec()),
                *want,
                "{d}: mtime on disk after the commit differs from the one shown after the rename"
            );
        }
        assert_eq!(
            fs::read_to_string(m.dirs.upper.join("dst/a")).expect("moved"),
            "a"
        );
        m.unmount().expect("unmount");
    })
}

/// Undoes `chattr +i` on drop.
struct Immutable(std::path::PathBuf);

impl Immutable {
    fn set(p: &Path) -> Option<Immutable> {
        let ok = std::process::Command::new("chattr")
            .arg("+i")
            .arg(p)
            .status()
            .is_ok_and(|s| s.success());
        ok.then(|| Immutable(p.to_path_buf()))
    }
}

impl Drop for Immutable {
    fn drop(&mut self) {
        let _ = std::process::Command::new("chattr")
            .arg("-i")
            .arg(&self.0)
            .status();
    }
}

/// A copy-up for writing whose commit fails (upper's directory made immutable behind the
/// daemon: the rename into it fails): the file is the lower one again for everyone, the
/// handle opened on the lost copy gets EIO (its writes would reach the caches of what is now
/// the lower file), and its fsync reports the failure.
#[test]
fn a_failed_copy_up_commit_reverts_to_the_lower_file() {
    with_timeout(TIMEOUT, || {
        let m = Mount::with_args(
            vec![file("d/f", "lower content")],
            &["--passthrough", "off", "-o", "commit_delay_ms=300"],
        );
        fs::create_dir(m.path("d/keep")).expect("mkdir (copies d up)");
        let h = OpenOptions::new()
            .read(true)
            .write(true)
            .open(m.path("d/f"))
            .expect("open for writing");
        use std::os::unix::fs::FileExt;
        h.write_all_at(b"XX", 0).expect("write to the copy");
        let Some(imm) = Immutable::set(&m.dirs.upper.join("d")) else {
            eprintln!("skipped: chattr +i not possible here");
            drop(h);
            m.unmount().expect("unmount");
            return;
        };
        sync_mount(&m);
        drop(imm);
        let s = daemon_stats(&m.merged);
        assert_eq!(s.get("copyup_failed_commits"), Some(&1), "{s:?}");
        let e = h.write_all_at(b"YY", 0).expect_err("write to a lost copy");
        assert_eq!(e.raw_os_error(), Some(libc::EIO), "{e}");
        assert!(h.sync_all().is_err(), "fsync of a lost copy succeeded");
        eventually_reads(&m.path("d/f"), "lower content", "not the lower file again");
        assert!(!m.dirs.upper.join("d/f").exists(), "a copy reached upper");
        drop(h);
        m.unmount().expect("unmount");
    })
}

/// After files of a directory are copied up (their commits in the background), the
/// directory's ctime in the view is the one on disk: the commits' renames changed it after the
/// kernel had cached the attributes. (QA: 194 directories of a git tree showed a ctime a few
/// ms old until a remount.)
#[test]
fn a_directory_shows_the_ctime_its_commits_left() {
    with_timeout(TIMEOUT, || {
        let lower: Vec<Entry> = (0..50).map(|i| file(&format!("d/f{i}"), "lower")).collect();
        let m = Mount::with_args(lower, &[]);
        for i in 0..50 {
            append(&m.path(&format!("d/f{i}")), b" more");
        }
        // Cached by the kernel now, while commits may still be pending.
        let _ = fs::metadata(m.path("d")).unwrap();
        sync_mount(&m);
        let ctime = |p: &Path| {
            let md = fs::metadata(p).unwrap();
            (md.ctime(), md.ctime_nsec())
        };
        let s = daemon_stats(&m.merged);
        assert!(
            s.get("copyup_deferred_commits").copied().unwrap_or(0) > 0,
            "test setup: no commit deferred: {s:?}"
        );
        assert_eq!(
            ctime(&m.path("d")),
            ctime(&m.dirs.upper.join("d")),
            "the view's ctime of d (left) against upper's"
        );
        m.unmount().expect("unmount");
    })
}

/// An upper on a filesystem that cannot make whiteouts (here another unionfs-rs mount: FUSE has
/// no RENAME_WHITEOUT, and no union lets a whiteout be created through it): a rename or a
/// removal of a lower file is refused when it is asked (EPERM, as the mknod of the whiteout
/// fails), and nothing changes. Before, the rename of a lower file was answered at once and its
/// commit failed in the background: the file went back to its old name after `mv` succeeded.
/// Kernel overlayfs refuses such an upper at mount time.
#[test]
fn an_upper_without_whiteouts_refuses_lower_renames_when_asked() {
    with_timeout(TIMEOUT, || {
        let inner = Mount::new(&[vec![]], &[dir("u"), dir("w")]);
        let mut dirs = Dirs::new(&[vec![file("a", "lower a"), file("t/f", "lower f")]], &[]);
        dirs.upper = inner.path("u");
        dirs.work = inner.path("w");
        let outer = Mount::start(&dirs, &MountOpts::default()).unwrap_or_else(|e| panic!("{e}"));
        let errno = |r: std::io::Result<()>| r.err().and_then(|e| e.raw_os_error());
        assert_eq!(
            errno(fs::rename(outer.path("a"), outer.path("b"))),
            Some(libc::EPERM),
            "rename of a lower file"
        );
        assert_eq!(
            errno(fs::remove_file(outer.path("t/f"))),
            Some(libc::EPERM),
            "unlink of a lower file"
        );
        // Names of upper files move and go as usual.
        fs::write(outer.path("c"), "upper c").unwrap();
        fs::rename(outer.path("c"), outer.path("d")).expect("rename of an upper file");
        sync_mount(&outer);
        std::thread::sleep(Duration::from_millis(200));
        assert_eq!(fs::read_to_string(outer.path("a")).unwrap(), "lower a");
        assert!(!outer.path("b").exists(), "b appeared");
        assert_eq!(fs::read_to_string(outer.path("t/f")).unwrap(), "lower f");
        assert_eq!(fs::read_to_string(outer.path("d")).unwrap(), "upper c");
        assert!(!outer.path("c").exists(), "c is still there");
        outer.unmount().expect("unmount outer");
        inner.unmount().expect("unmount inner");
    })
}

/// Near a full upper a copy-up is committed before the operation is answered: a full disk
/// fails the chmod, rename or open (ENOSPC, as kernel overlayfs), and nothing it was told
/// happened is undone later. (QA: with upper's directory block full and no block free, chmod
/// and mv of lower files returned 0 and their background commits failed: the mode went back,
/// the file kept its old name; an append through a copy-up for writing was lost.)
#[test]
fn a_full_upper_fails_the_operation_not_a_later_commit() {
    with_timeout(TIMEOUT, || {
        let dirs = Dirs::new(
            &[vec![
                file_mode("d/z0", "", 0o644),
                file("d/z1", "z1"),
                file("d/c0", "orig\n"),
            ]],
            &[],
        );
        let lfs = LoopFs::new(&dirs, 64);
        let d = lfs.holding_upper(&dirs);
        fs::create_dir(d.upper.join("d")).expect("mkdir upper d");
        let m = Mount::start(&d, &MountOpts::default()).unwrap_or_else(|e| panic!("{e}"));
        // No block free, and upper's d has no room for another entry.
        {
            let mut g = fs::File::create(lfs.mnt.join("filler")).expect("filler");
            let chunk = vec![0u8; 64 << 10];
            while g.write_all(&chunk).is_ok() {}
            let small = vec![0u8; 1024];
            while g.write_all(&small).is_ok() {}
        }
        let mut i = 0;
        while fs::File::create(d.upper.join("d").join(format!("q{i:040}"))).is_ok() {
            i += 1;
        }
        let errno = |r: std::io::Result<()>| r.err().and_then(|e| e.raw_os_error());
        let mode = |p: &Path| fs::metadata(p).expect("stat").permissions().mode() & 0o7777;
        assert_eq!(
            errno(fs::set_permissions(
                m.path("d/z0"),
                fs::Permissions::from_mode(0o600)
            )),
            Some(libc::ENOSPC),
            "chmod of a lower file"
        );
        assert_eq!(
            errno(fs::rename(m.path("d/z1"), m.path("d/z1moved"))),
            Some(libc::ENOSPC),
            "rename of a lower file"
        );
        let appended = OpenOptions::new()
            .append(true)
            .open(m.path("d/c0"))
            .and_then(|mut f| f.write_all(b"appended\n").and_then(|()| f.sync_all()));
        assert_eq!(
            errno(appended),
            Some(libc::ENOSPC),
            "append to a lower file"
        );
        sync_mount(&m);
        std::thread::sleep(Duration::from_millis(200));
        assert_eq!(mode(&m.path("d/z0")), 0o644, "z0's mode");
        assert!(m.path("d/z1").exists() && !m.path("d/z1moved").exists());
        assert_eq!(fs::read_to_string(m.path("d/c0")).unwrap(), "orig\n");
        m.unmount().expect("unmount");
        drop(lfs);
    })
}

/// An open with O_TRUNC of a lower file copies its metadata up, not its data, as kernel
/// overlayfs does: `> big` and `cp new big` work on an upper with no room for the old data,
/// and the copy keeps the file's mode, owner and xattrs. (QA: ENOSPC for a 20 MiB lower file
/// on a 16 MiB upper, where the kernel's succeeded; the data was copied to be thrown away.)
#[test]
fn an_open_with_o_trunc_copies_no_data() {
    with_timeout(TIMEOUT, || {
        let big = "x".repeat(24 << 20);
        let dirs = Dirs::new(
            &[vec![
                file_mode("big", &big, 0o640),
                xattr("big", "user.keep", "kept"),
                chown("big", 1234, 5678),
            ]],
            &[],
        );
        let lfs = LoopFs::new(&dirs, 16);
        let d = lfs.holding_upper(&dirs);
        for extra in [&[][..], &["--passthrough", "off"][..]] {
            let _ = fs::remove_file(d.upper.join("big"));
            let m = Mount::on(&d, extra);
            fs::write(m.path("big"), "new\n").unwrap_or_else(|e| panic!("{extra:?}: {e}"));
            assert_eq!(fs::read_to_string(m.path("big")).unwrap(), "new\n");
            let md = fs::metadata(m.path("big")).unwrap();
            assert_eq!(
                (md.permissions().mode() & 0o7777, md.uid(), md.gid()),
                (0o640, 1234, 5678),
                "{extra:?}"
            );
            assert_eq!(
                lgetxattr(&m.path("big"), "user.keep").as_deref(),
                Ok(&b"kept"[..]),
                "{extra:?}"
            );
            m.unmount().expect("unmount");
            assert_eq!(fs::read_to_string(d.upper.join("big")).unwrap(), "new\n");
        }
        drop(lfs);
    })
}
