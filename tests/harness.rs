//! Tests of the test harness itself: a comparison that cannot see a difference, or a timeout that
//! cannot fire, would make every other test meaningless.

mod common;

use common::*;
use std::fs;
use std::os::unix::fs::MetadataExt;
use std::path::Path;
use std::time::{Duration, Instant};

fn sample() -> Vec<Entry> {
    vec![
        file("f", "content"),
        file_mode("g", "gg", 0o640),
        xattr("g", "user.a", "1"),
        symlink("s", "f"),
        dir("d/e"),
        file("d/e/deep", "deep"),
        hardlink("h", "f"),
        fifo("p"),
        whiteout("wh"),
        opaque("d"),
    ]
}

#[test]
fn identical_descriptions_build_identical_trees() {
    let a = Dirs::new(&[sample()], &[]);
    let b = Dirs::new(&[sample()], &[]);
    let sa = snapshot(&a.lowers[0], &SnapOpts::exact());
    let sb = snapshot(&b.lowers[0], &SnapOpts::exact());
    assert_same_tree("same description", "a", &sa, "b", &sb);
    assert_eq!(sa.nodes["h"].link_group.as_deref(), Some("f"));
    assert_eq!(sa.nodes["wh"].rdev, Some((0, 0)));
    assert!(sa.nodes["d"].xattrs.as_ref().unwrap()["trusted.overlay.opaque"] == b"y");
    assert!(matches!(sa.nodes["f"].mtime, Some(Mtime::Exact(t, _)) if t < OLD_TIME_CUTOFF));
}

#[test]
fn snapshot_diff_sees_every_property() {
    type Mutation = (&'static str, fn(&Path));
    let mutations: Vec<Mutation> = vec![
        ("content", |r| fs::write(r.join("f"), "CONTENT").unwrap()),
        ("mode", |r| chmod(&r.join("g"), 0o644).unwrap()),
        ("uid", |r| lchown(&r.join("g"), 1, 0).unwrap()),
        ("xattr", |r| {
            lsetxattr(&r.join("g"), "user.a", b"2").unwrap()
        }),
        ("target", |r| {
            fs::remove_file(r.join("s")).unwrap();
            std::os::unix::fs::symlink("g", r.join("s")).unwrap();
        }),
        ("mtime", |r| {
            set_times(&r.join("d/e/deep"), 1_700_000_000, 0).unwrap()
        }),
        ("hard link", |r| {
            fs::hard_link(r.join("g"), r.join("g2")).unwrap()
        }),
        ("kind", |r| {
            fs::remove_file(r.join("p")).unwrap();
            fs::write(r.join("p"), "").unwrap();
        }),
        ("opaque", |r| {
            lsetxattr(&r.join("d"), "trusted.overlay.opaque", b"n").unwrap()
        }),
    ];
    for (what, mutate) in mutations {
        let d = Dirs::new(&[sample()], &[]);
        let before = snapshot(&d.lowers[0], &SnapOpts::upper());
        mutate(&d.lowers[0]);
        let after = snapshot(&d.lowers[0], &SnapOpts::upper());
        assert!(
            !diff_snapshots("before", &before, "after", &after).is_empty(),
            "a change of {what} went unnoticed"
        );
    }
}

#[test]
fn upper_form_ignores_only_kernel_bookkeeping() {
    let d = Dirs::new(&[vec![file("f", "x"), dir("d")]], &[]);
    let root = &d.lowers[0];
    let before = snapshot(root, &SnapOpts::upper());
    lsetxattr(&root.join("f"), "trusted.overlay.origin", b"\0\xfb").unwrap();
    lsetxattr(&root.join("d"), "trusted.overlay.impure", b"y").unwrap();
    lsetxattr(root, "trusted.overlay.uuid", b"0123456789abcdef").unwrap();
    let after = snapshot(root, &SnapOpts::upper());
    assert_same_tree("bookkeeping xattrs", "before", &before, "after", &after);
    lsetxattr(&root.join("d"), "trusted.overlay.redirect", b"/x").unwrap();
    let redirected = snapshot(root, &SnapOpts::upper());
    assert!(!diff_snapshots("a", &before, "b", &redirected).is_empty());
}

#[test]
fn content_hash_is_independent_of_holes() {
    let t = test_tempdir();
    let data = vec![7u8; 5000];
    let sparse_p = t.path().join("sparse");
    let dense_p = t.path().join("dense");
    {
        use std::os::unix::fs::FileExt;
        let f = fs::File::create(&sparse_p).unwrap();
        f.set_len(64 << 20).unwrap();
        f.write_all_at(&data, 32 << 20).unwrap();
        let mut dense = vec![0u8; 64 << 20];
        dense[32 << 20..(32 << 20) + 5000].copy_from_slice(&data);
        fs::write(&dense_p, &dense).unwrap();
    }
    assert!(lstat(&sparse_p).blocks() < lstat(&dense_p).blocks());
    let s = snapshot(t.path(), &SnapOpts::exact());
    assert_eq!(s.nodes["sparse"].content, s.nodes["dense"].content);
    {
        use std::os::unix::fs::FileExt;
        let f = fs::OpenOptions::new().write(true).open(&dense_p).unwrap();
        f.write_all_at(b"x", (64 << 20) - 1).unwrap();
    }
    let s = snapshot(t.path(), &SnapOpts::exact());
    assert_ne!(s.nodes["sparse"].content, s.nodes["dense"].content);
}

#[test]
fn timeout_fails_a_hung_body() {
    let start = Instant::now();
    let r = std::panic::catch_unwind(|| {
        with_timeout(1, || std::thread::sleep(Duration::from_secs(30)));
    });
    assert!(r.is_err(), "with_timeout must panic");
    assert!(start.elapsed() < Duration::from_secs(10));
    let r = std::panic::catch_unwind(|| with_timeout(5, || panic!("inner")));
    assert!(r.is_err(), "panics propagate");
    assert_eq!(with_timeout(5, || 42), 42);
}

/// A stopped daemon makes every access to the mount hang; the timeout must abort the mount
/// (kill the daemon, detach the mount) so that the test fails instead of hanging.
#[test]
fn timeout_aborts_a_hung_daemon() {
    let dirs = Dirs::new(&[vec![file("f", "x")]], &[]);
    let d2 = dirs.clone();
    let start = Instant::now();
    let r = std::panic::catch_unwind(move || {
        with_timeout(5, move || {
            let m = Mount::start(&d2, &MountOpts::default()).unwrap_or_else(|e| panic!("{e}"));
            let pid = m.pid.expect("daemon pid");
            unsafe {
                libc::kill(pid, libc::SIGSTOP);
            }
            // Hangs until the harness aborts the connection.
            let _ = fs::read(m.path("f"));
            let _ = fs::read_dir(&m.merged).map(|rd| rd.count());
        })
    });
    assert!(r.is_err(), "the hung body must fail");
    assert!(start.elapsed() < Duration::from_secs(60));
    let deadline = Instant::now() + Duration::from_secs(10);
    while is_mounted(&dirs.merged) && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(50));
    }
    assert!(!is_mounted(&dirs.merged), "aborted mount is gone");
    assert!(daemon_pids(&dirs.merged).is_empty(), "daemon is gone");
}
