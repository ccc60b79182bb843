//! `dir_rename=copy` (the default in fuse-overlayfs's `-o lowerdir=` form, which container
//! storage uses): a rename of a merged or lower directory copies it up whole, each directory
//! opaque, and moves it, as fuse-overlayfs does, where kernel overlayfs (without
//! `redirect_dir=on`) answers EXDEV and `mv` copies the tree itself. The oracle: `mv` on
//! kernel overlayfs (its copy and removal) must give the same merged view, and the upper we
//! leave must show the same tree when kernel overlayfs mounts it.

mod common;

use common::*;
use std::fs;
use std::path::Path;
use std::process::Command;

const TIMEOUT: u64 = 120;

fn lowers() -> Vec<Vec<Entry>> {
    vec![
        vec![
            file("a/f1", "f1"),
            file_mode("a/sub/f2", "f2", 0o640),
            file("a/sub/deep/f3", "f3"),
            symlink("a/link", "f1"),
            xattr("a/sub/f2", "user.k", "v"),
            whiteout("a/gone"),
            opaque("a/opq"),
            file("a/opq/top", "top"),
            file("a/big", &"0123456789".repeat(30_000)),
            fifo("a/fifo"),
            file("c/keep", "keep"),
            file("x/d/inside", "inside"),
        ],
        vec![
            file("a/lowonly", "from the second layer"),
            file("a/gone", "hidden by a whiteout"),
            file("a/sub/f4", "f4"),
            file("a/opq/hidden", "hidden under an opaque dir"),
            dir("a/sub/emptydir"),
            file("c/other", "other"),
        ],
    ]
}

/// The fuse-overlayfs form with the same dirs.
fn legacy_args(d: &Dirs, extra: &str) -> Vec<String> {
    vec![
        "-o".into(),
        format!(
            "lowerdir={},upperdir={},workdir={}{extra}",
            d.lowerdir_arg(),
            d.upper.display(),
            d.work.display()
        ),
        d.merged.display().to_string(),
    ]
}

fn mv(root: &Path, a: &str, b: &str) {
    let st = Command::new("mv")
        .arg(root.join(a))
        .arg(root.join(b))
        .status()
        .expect("run mv");
    assert!(st.success(), "mv {a} {b} on kernel overlayfs");
}

/// What both sides get before and after the moves.
fn prepare(root: &Path) {
    fs::remove_file(root.join("a/f1")).unwrap();
    fs::write(root.join("a/new"), "new").unwrap();
    fs::write(root.join("a/sub/f4"), "f4 changed").unwrap();
}

fn check_after(root: &Path) {
    assert_eq!(
        fs::read_to_string(root.join("b/lowonly")).unwrap(),
        "from the second layer"
    );
    assert_eq!(
        fs::read_to_string(root.join("c/sub2/f4")).unwrap(),
        "f4 changed"
    );
    assert!(!root.join("a").exists());
    assert!(!root.join("b/gone").exists());
    assert!(!root.join("b/opq/hidden").exists());
}

/// The merged view at `kernel` (returned) equals the one at `other`.
fn same_views(kernel: &Path, what: &str, other: &Path) -> Snapshot {
    let ks = snapshot(kernel, &SnapOpts::merged());
    let os = snapshot(other, &SnapOpts::merged());
    let d = diff_snapshots("kernel", &ks, what, &os);
    assert!(d.is_empty(), "merged views differ:\n{}", d.join("\n"));
    ks
}

#[test]
fn lower_directories_move_as_mv_moves_them_on_kernel_overlayfs() {
    with_timeout(TIMEOUT, || {
        let kd = Dirs::new(&lowers(), &[]);
        let ud = Dirs::new(&lowers(), &[]);
        let k = OverlayMount::start(&kd, &MountOpts::default()).unwrap_or_else(|e| panic!("{e}"));
        let u = Mount::start_args(&ud, &legacy_args(&ud, "")).unwrap_or_else(|e| panic!("{e}"));
        prepare(&k.merged);
        prepare(&u.merged);
        // The kernel refuses the rename itself (mv then copies and removes).
        let e = fs::rename(k.merged.join("a"), k.merged.join("b")).unwrap_err();
        assert_eq!(e.raw_os_error(), Some(libc::EXDEV));
        mv(&k.merged, "a", "b");
        mv(&k.merged, "b/sub", "c/sub2");
        mv(&k.merged, "x/d", "d2");
        // We move them (a directory with lower layers below, into a merged directory, within
        // the root).
        fs::rename(u.merged.join("a"), u.merged.join("b")).unwrap();
        fs::rename(u.merged.join("b/sub"), u.merged.join("c/sub2")).unwrap();
        fs::rename(u.merged.join("x/d"), u.merged.join("d2")).unwrap();
        check_after(&k.merged);
        check_after(&u.merged);
        let ks = same_views(&k.merged, "unionfs", &u.merged);
        u.unmount().unwrap_or_else(|e| panic!("{e}"));
        // The moved trees are upper-only, opaque, and hold no whiteout (kernel overlayfs
        // would list one in a directory that merges with nothing).
        for moved in ["b", "b/sub3", "c/sub2", "c/sub2/deep", "d2"] {
            let p = ud.upper.join(moved);
            if !p.exists() {
                continue;
            }
            for e in fs::read_dir(&p).unwrap() {
                let e = e.unwrap();
                let ft = e.file_type().unwrap();
                assert!(
                    !std::os::unix::fs::FileTypeExt::is_char_device(&ft),
                    "whiteout {:?} left in upper",
                    e.path()
                );
            }
        }
        // Our upper as kernel overlayfs reads it: the same tree.
        let again =
            OverlayMount::start(&ud, &MountOpts::default()).unwrap_or_else(|e| panic!("{e}"));
        let rs = snapshot(&again.merged, &SnapOpts::merged());
        let d = diff_snapshots("kernel", &ks, "kernel over our upper", &rs);
        assert!(
            d.is_empty(),
            "kernel view of our upper differs:\n{}",
            d.join("\n")
        );
        again.unmount().unwrap_or_else(|e| panic!("{e}"));
        // A moved one removed (it held the whiteout of a/f1), after a remount.
        let u = Mount::start_args(&ud, &legacy_args(&ud, "")).unwrap_or_else(|e| panic!("{e}"));
        fs::remove_dir_all(k.merged.join("b")).unwrap();
        fs::remove_dir_all(u.merged.join("b")).unwrap();
        same_views(&k.merged, "unionfs after rm -rf", &u.merged);
        k.unmount().unwrap_or_else(|e| panic!("{e}"));
        u.unmount().unwrap_or_else(|e| panic!("{e}"));
    });
}

/// An exchange with a merged directory copies that one up whole too; `dir_rename=exdev` (and
/// the `mount` form's default) keeps the kernel's EXDEV.
#[test]
fn exchange_copies_and_exdev_mode_refuses() {
    with_timeout(TIMEOUT, || {
        let ud = Dirs::new(&lowers(), &[]);
        let u = Mount::start_args(&ud, &legacy_args(&ud, "")).unwrap_or_else(|e| panic!("{e}"));
        fs::create_dir(u.merged.join("n")).unwrap();
        fs::write(u.merged.join("n/mine"), "mine").unwrap();
        assert_eq!(apply(&u.merged, &op_exchange("n", "c")), Ok(Vec::new()));
        assert_eq!(
            fs::read_to_string(u.merged.join("n/other")).unwrap(),
            "other"
        );
        assert_eq!(fs::read_to_string(u.merged.join("c/mine")).unwrap(), "mine");
        assert!(!u.merged.join("c/keep").exists());
        u.unmount().unwrap_or_else(|e| panic!("{e}"));
        let again =
            OverlayMount::start(&ud, &MountOpts::default()).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(
            fs::read_to_string(again.merged.join("n/keep")).unwrap(),
            "keep"
        );
        assert_eq!(
            fs::read_to_string(again.merged.join("n/other")).unwrap(),
            "other"
        );
        let mut names: Vec<_> = fs::read_dir(again.merged.join("c"))
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        names.sort();
        assert_eq!(names, ["mine"]);
        again.unmount().unwrap_or_else(|e| panic!("{e}"));

        for legacy in [true, false] {
            let d = Dirs::new(&lowers(), &[]);
            let args = if legacy {
                legacy_args(&d, ",dir_rename=exdev")
            } else {
                Mount::command_args(&d, &MountOpts::default())
            };
            let m = Mount::start_args(&d, &args).unwrap_or_else(|e| panic!("{e}"));
            let e = fs::rename(m.merged.join("a"), m.merged.join("b")).unwrap_err();
            assert_eq!(e.raw_os_error(), Some(libc::EXDEV), "{args:?}");
            m.unmount().unwrap_or_else(|e| panic!("{e}"));
        }
    });
}

/// A directory whose copy does not fit the project quota: the rename fails with ENOSPC (as
/// XFS answers at the limit; `mv` reports it, it does not copy) before anything is copied:
/// the merged view is what it was, and neither upper nor the quota holds copies that would
/// change nothing in it (they did: the copy stopped at the limit, which it left reached).
#[test]
fn a_copy_over_the_quota_fails_and_changes_nothing_in_view() {
    with_timeout(TIMEOUT, || {
        let chunk = "0123456789abcdef".repeat(64 * 1024); // 1 MiB
        let entries: Vec<Entry> = (0..6)
            .map(|i| file(&format!("big/f{i}"), &chunk))
            .chain([file("big/sub/g", "g"), file("other", "other")])
            .collect();
        let d = Dirs::new(&[entries], &[]);
        let m =
            Mount::start_args(&d, &legacy_args(&d, ",size=3M")).unwrap_or_else(|e| panic!("{e}"));
        let before = snapshot(&m.merged, &SnapOpts::merged());
        let e = fs::rename(m.merged.join("big"), m.merged.join("moved")).unwrap_err();
        assert_eq!(e.raw_os_error(), Some(libc::ENOSPC), "{e}");
        let after = snapshot(&m.merged, &SnapOpts::merged());
        let diff = diff_snapshots("before", &before, "after", &after);
        assert!(
            diff.is_empty(),
            "the failed rename changed the view:\n{}",
            diff.join("\n")
        );
        assert!(!m.merged.join("moved").exists());
        let used = |m: &Mount| {
            let s = nix::sys::statvfs::statvfs(&m.merged).expect("statvfs");
            (s.blocks() - s.blocks_free()) * s.fragment_size()
        };
        assert!(used(&m) < 64 << 10, "copies left charged: {}", used(&m));
        assert!(!d.upper.join("big/f0").exists(), "a copy was left in upper");
        fs::write(m.merged.join("small"), "fits").expect("a small write after the refusal");
        fs::remove_dir_all(m.merged.join("big")).expect("rm -rf big");
        assert!(used(&m) < 64 << 10, "space not given back: {}", used(&m));
        assert_eq!(fs::read_to_string(m.merged.join("other")).unwrap(), "other");
        m.unmount().unwrap_or_else(|e| panic!("{e}"));
    });
}

/// The same on a nearly full upper filesystem (no quota): ENOSPC before anything is copied, so
/// the space left is still there for the next write; with room made, the rename goes through.
#[test]
fn a_copy_that_does_not_fit_upper_fails_before_copying() {
    with_timeout(TIMEOUT, || {
        let chunk = "0123456789abcdef".repeat(64 * 1024); // 1 MiB
        let entries: Vec<Entry> = (0..12)
            .map(|i| file(&format!("big/d{}/f{i}", i % 3), &chunk))
            .chain([file("other", "other")])
            .collect();
        let dirs = Dirs::new(&[entries], &[]);
        let lfs = LoopFs::new(&dirs, 32);
        let d = lfs.holding_upper(&dirs);
        // Leave ~6 MiB free: less than the 12 MiB the copy needs.
        let filler = lfs.mnt.join("filler");
        let fill = lfs.avail().saturating_sub(6 << 20);
        fs::write(&filler, vec![0u8; fill as usize]).expect("filler");
        let m = Mount::start_args(&d, &legacy_args(&d, "")).unwrap_or_else(|e| panic!("{e}"));
        let before = snapshot(&m.merged, &SnapOpts::merged());
        let free = lfs.avail();
        let e = fs::rename(m.merged.join("big"), m.merged.join("moved")).unwrap_err();
        assert_eq!(e.raw_os_error(), Some(libc::ENOSPC), "{e}");
        let after = snapshot(&m.merged, &SnapOpts::merged());
        let diff = diff_snapshots("before", &before, "after", &after);
        assert!(diff.is_empty(), "the view changed:\n{}", diff.join("\n"));
        assert!(
            lfs.avail() + (256 << 10) >= free,
            "the failed rename took {} of {free} free bytes",
            free - lfs.avail()
        );
        fs::remove_file(&filler).expect("rm filler");
        fs::rename(m.merged.join("big"), m.merged.join("moved")).expect("rename with room");
        assert_eq!(
            fs::read_to_string(m.merged.join("moved/d1/f4")).unwrap(),
            chunk,
            "moved content"
        );
        m.unmount().unwrap_or_else(|e| panic!("{e}"));
    });
}

/// The same when upper has the bytes but too few free inodes: ENOSPC before anything is
/// copied. (QA: with 48 inodes free, a tree of 100 files took all of them before it failed, 47
/// copies stayed in upper, and every later create failed.)
#[test]
fn a_copy_with_too_few_free_inodes_fails_before_copying() {
    with_timeout(TIMEOUT, || {
        let entries: Vec<Entry> = (0..100)
            .map(|i| file(&format!("many/f{i}"), "x"))
            .chain([file("other", "other")])
            .collect();
        let dirs = Dirs::new(&[entries], &[]);
        let lfs = LoopFs::new(&dirs, 32);
        let d = lfs.holding_upper(&dirs);
        let m = Mount::start_args(&d, &legacy_args(&d, "")).unwrap_or_else(|e| panic!("{e}"));
        // Every inode taken, then 48 given back.
        let ifill = lfs.mnt.join("ifill");
        fs::create_dir(&ifill).expect("mkdir ifill");
        let mut n = 0;
        while fs::File::create(ifill.join(n.to_string())).is_ok() {
            n += 1;
        }
        for i in 0..48 {
            fs::remove_file(ifill.join(i.to_string())).expect("rm");
        }
        let free_inodes = || {
            nix::sys::statvfs::statvfs(&lfs.mnt)
                .expect("statvfs")
                .files_free()
        };
        let before = snapshot(&m.merged, &SnapOpts::merged());
        let free = free_inodes();
        let e = fs::rename(m.merged.join("many"), m.merged.join("moved")).unwrap_err();
        assert_eq!(e.raw_os_error(), Some(libc::ENOSPC), "{e}");
        let after = snapshot(&m.merged, &SnapOpts::merged());
        let diff = diff_snapshots("before", &before, "after", &after);
        assert!(diff.is_empty(), "the view changed:\n{}", diff.join("\n"));
        assert!(
            free_inodes() + 2 >= free,
            "the failed rename took {} of {free} free inodes",
            free - free_inodes()
        );
        fs::write(m.merged.join("new"), "new").expect("a create after it");
        m.unmount().unwrap_or_else(|e| panic!("{e}"));
    });
}

/// A limit at what the moved tree ends up using, and a little above: the rename either goes
/// through whole or is refused with nothing left charged. (At the limit it failed partway: each
/// copy-up holds a block for each directory it adds an entry to until it settles, which the
/// check before the copy did not count, and the copies made stayed charged.)
#[test]
fn a_copy_right_at_the_quota_goes_through_or_leaves_nothing() {
    with_timeout(TIMEOUT, || {
        let entries = || -> Vec<Entry> {
            (0..40)
                .map(|i| {
                    let body = "x".repeat(i * 1777);
                    file(&format!("t/d{}/f{i}", i % 4), &body)
                })
                .collect()
        };
        let used = |m: &Mount| {
            let s = nix::sys::statvfs::statvfs(&m.merged).expect("statvfs");
            (s.blocks() - s.blocks_free()) * s.fragment_size()
        };
        let d = Dirs::new(&[entries()], &[]);
        let m =
            Mount::start_args(&d, &legacy_args(&d, ",size=1G")).unwrap_or_else(|e| panic!("{e}"));
        fs::rename(m.merged.join("t"), m.merged.join("t2")).expect("rename with room");
        let cost = used(&m);
        m.unmount().unwrap_or_else(|e| panic!("{e}"));
        for extra in [0u64, 4096, 8191, 8192, 65536] {
            let d = Dirs::new(&[entries()], &[]);
            let limit = format!(",size={}", cost + extra);
            let m =
                Mount::start_args(&d, &legacy_args(&d, &limit)).unwrap_or_else(|e| panic!("{e}"));
            let before = used(&m);
            match fs::rename(m.merged.join("t"), m.merged.join("t2")) {
                Ok(()) => assert_eq!(
                    fs::read_to_string(m.merged.join("t2/d3/f39")).unwrap(),
                    "x".repeat(39 * 1777),
                    "limit +{extra}: moved content"
                ),
                Err(e) => {
                    assert_eq!(e.raw_os_error(), Some(libc::ENOSPC), "limit +{extra}: {e}");
                    assert_eq!(used(&m), before, "limit +{extra}: copies left charged");
                }
            }
            m.unmount().unwrap_or_else(|e| panic!("{e}"));
        }
    });
}
