//! Cross-mount tests for the on-disk contract (DESIGN.md section 2): an upper + work directory
//! written by unionfs-rs must mount under kernel overlayfs with the same lowers and show the same
//! tree, and the reverse. The same workdir is reused across implementations, as a container
//! runtime would after switching mount programs.

mod common;

use common::*;
use proptest::prelude::*;

fn lowers() -> Vec<Vec<Entry>> {
    vec![
        vec![
            file("d/a", "a0"),
            file("d/b", "b0"),
            xattr("d/b", "user.keep", "k"),
            file_mode("d/c", "c0", 0o600),
            chown("d/c", 1000, 1000),
            whiteout("d/gone"),
            symlink("d/link", "a"),
            opaque("o"),
            file("o/visible", "v"),
            dir("emptydir"),
            file("top", "top"),
            file("ren/src", "rename me"),
            dir("merge/sub"),
            file("merge/x", "x"),
            file("f_to_dir", "file that becomes a dir"),
            file("big", &"0123456789abcdef".repeat(8192)),
        ],
        vec![
            file("d/gone", "hidden"),
            file("d/lower1", "l1"),
            file("o/hidden", "hidden by opaque"),
            file("merge/y", "y"),
            file("rmall/1", "1"),
            file("rmall/2", "2"),
        ],
    ]
}

/// A workload touching every kind of on-disk state: copy-ups (data, metadata, xattr), whiteouts
/// for files and dirs, opaque dirs, renames, hard links, special files, new trees.
fn workload_ops() -> Vec<Op> {
    vec![
        op_write("d/a", 1, "WRITTEN"),
        op_chmod("d/c", 0o640),
        op_setxattr("d/b", "user.new", "n"),
        op_removexattr("d/b", "user.keep"),
        op_unlink("top"),
        op_rmdir("emptydir"),
        op_unlink("rmall/1"),
        op_unlink("rmall/2"),
        op_rmdir("rmall"),
        op_mkdir("rmall"), // opaque, over our whiteout
        op_create("rmall/new"),
        op_rename("ren/src", "ren/dst"),
        op_link("d/lower1", "d/hard"),
        op_symlink("../d/a", "merge/sym"),
        Op::Mkfifo {
            path: "merge/fifo".into(),
            mode: 0o600,
        },
        op_truncate("big", 5000),
        op_append("big", "tail"),
        op_mkdir("newtree"),
        op_mkdir("newtree/deeper"),
        op_create("newtree/deeper/f"),
        op_mkdir("moved"),
        op_create("moved/inner"),
        op_rename("moved", "merge/moved"),
        op_unlink("f_to_dir"),
        op_mkdir("f_to_dir"),
        op_chown("merge/sub", 42, 43),
        op_utimes("merge/x", 1_234_567_890, 42),
    ]
}

fn apply_all(root: &std::path::Path, ops: &[Op]) {
    for op in ops {
        let r = apply(root, op);
        assert!(r.is_ok(), "{op:?} failed: {}", show_outcome(&r));
    }
}

fn view(root: &std::path::Path) -> Snapshot {
    let s = snapshot(root, &SnapOpts::merged().relaxed_from_env());
    let leaked = private_xattrs(&s, OvlNs::Trusted);
    assert!(leaked.is_empty(), "private xattrs visible: {leaked:?}");
    s
}

#[test]
fn unionfs_writes_kernel_reads() {
    with_timeout(180, || {
        let dirs = Dirs::new(&lowers(), &[]);
        let m = Mount::start(&dirs, &MountOpts::default()).unwrap_or_else(|e| panic!("{e}"));
        apply_all(&m.merged, &workload_ops());
        let union_view = view(&m.merged);
        m.unmount().unwrap_or_else(|e| panic!("{e}"));

        let k = OverlayMount::start(&dirs, &MountOpts::default()).unwrap();
        let kernel_view = view(&k.merged);
        k.unmount().unwrap();
        assert_same_tree(
            "upper written by unionfs-rs, read by kernel overlayfs",
            "unionfs",
            &union_view,
            "kernel",
            &kernel_view,
        );

        // And back: the kernel may have added its own bookkeeping (uuid, impure); unionfs-rs
        // must still show the same tree.
        let m = Mount::start(&dirs, &MountOpts::default()).unwrap_or_else(|e| panic!("{e}"));
        let again = view(&m.merged);
        m.unmount().unwrap_or_else(|e| panic!("{e}"));
        assert_same_tree(
            "unionfs-rs remount after kernel mount",
            "first",
            &union_view,
            "again",
            &again,
        );
    });
}

#[test]
fn kernel_writes_unionfs_reads() {
    with_timeout(180, || {
        let dirs = Dirs::new(&lowers(), &[]);
        let k = OverlayMount::start(&dirs, &MountOpts::default()).unwrap();
        apply_all(&k.merged, &workload_ops());
        let kernel_view = view(&k.merged);
        k.unmount().unwrap();
        let upper_before = snapshot(&dirs.upper, &SnapOpts::exact_upper());

        let m = Mount::start(&dirs, &MountOpts::default()).unwrap_or_else(|e| panic!("{e}"));
        let union_view = view(&m.merged);
        m.unmount().unwrap_or_else(|e| panic!("{e}"));
        assert_same_tree(
            "upper written by kernel overlayfs, read by unionfs-rs",
            "kernel",
            &kernel_view,
            "unionfs",
            &union_view,
        );
        // Reading must not modify the upper layer.
        let upper_after = snapshot(&dirs.upper, &SnapOpts::exact_upper());
        assert_same_tree(
            "upper after a read-only unionfs-rs session",
            "before",
            &upper_before,
            "after",
            &upper_after,
        );
    });
}

/// unionfs-rs continues on an upper layer the kernel wrote (shared whiteout inodes, origin and
/// impure xattrs, kernel-made opaque dirs), compared step by step with the kernel doing the same.
#[test]
fn unionfs_continues_kernel_upper() {
    let mut d = Differential::new("continue on kernel upper").kernel_prepare(workload_ops());
    for l in lowers() {
        d = d.lower(l);
    }
    d.ok(op_unlink("d/a")) // upper copy -> whiteout
        .ok(op_unlink("d/hard")) // one name of a kernel-made hard link
        .data(op_read("d/lower1"), "l1")
        .ok(op_unlink("rmall/new"))
        .ok(op_rmdir("rmall")) // kernel-made opaque dir
        .ok(op_unlink("ren/dst"))
        .ok(op_rmdir("ren")) // dir holding a kernel whiteout
        .ok(op_rename("merge/moved", "moved_back")) // kernel-made opaque, upper-only dir
        .err(op_rename("merge", "merge2"), libc::EXDEV)
        .ok(op_append("d/b", "+"))
        .ok(op_create("top")) // over a kernel whiteout
        .ok(op_mkdir("emptydir")) // over a kernel whiteout of a dir
        .data(op_readdir("d"), "b\nc\nlink\nlower1")
        .ok(op_setxattr("d/c", "user.after", "1"))
        .run();
}

mod strategies {
    use super::*;

    pub const NAMES: [&str; 7] = ["d/a", "d/b", "d/n", "o", "o/visible", "merge/x", "z"];

    fn name() -> impl Strategy<Value = String> {
        proptest::sample::select(NAMES.to_vec()).prop_map(String::from)
    }

    pub fn op() -> impl Strategy<Value = Op> {
        prop_oneof![
            name().prop_map(|p| op_create(&p)),
            name().prop_map(|p| op_append(&p, "+")),
            name().prop_map(|p| op_unlink(&p)),
            name().prop_map(|p| op_mkdir(&p)),
            name().prop_map(|p| op_rmdir(&p)),
            (name(), name()).prop_map(|(a, b)| op_rename(&a, &b)),
            (name(), name()).prop_map(|(a, b)| op_link(&a, &b)),
            name().prop_map(|p| op_chmod(&p, 0o700)),
            name().prop_map(|p| op_setxattr(&p, "user.g", "v")),
        ]
    }
}

fn random_crossmount(ops: Vec<Op>, union_first: bool) {
    with_timeout(90, move || {
        let dirs = Dirs::new(&lowers(), &[]);
        let (first_view, second_view) = if union_first {
            let m = Mount::start(&dirs, &MountOpts::default()).unwrap_or_else(|e| panic!("{e}"));
            for op in &ops {
                let _ = apply(&m.merged, op);
            }
            let a = view(&m.merged);
            m.unmount().unwrap_or_else(|e| panic!("{e}"));
            let k = OverlayMount::start(&dirs, &MountOpts::default()).unwrap();
            let b = view(&k.merged);
            k.unmount().unwrap();
            (a, b)
        } else {
            let k = OverlayMount::start(&dirs, &MountOpts::default()).unwrap();
            for op in &ops {
                let _ = apply(&k.merged, op);
            }
            let a = view(&k.merged);
            k.unmount().unwrap();
            let m = Mount::start(&dirs, &MountOpts::default()).unwrap_or_else(|e| panic!("{e}"));
            let b = view(&m.merged);
            m.unmount().unwrap_or_else(|e| panic!("{e}"));
            (a, b)
        };
        let d = diff_snapshots("writer", &first_view, "reader", &second_view);
        assert!(
            d.is_empty(),
            "{} wrote, {} read; ops {ops:?}:\n  {}",
            if union_first { "unionfs-rs" } else { "kernel" },
            if union_first { "kernel" } else { "unionfs-rs" },
            d.join("\n  ")
        );
    });
}

proptest! {
    #![proptest_config(ProptestConfig {
        cases: cases_from_env(12),
        max_shrink_iters: 32,
        failure_persistence: Some(Box::new(
            proptest::test_runner::FileFailurePersistence::WithSource("proptest-regressions"),
        )),
        ..ProptestConfig::default()
    })]
    #[test]
    fn random_ops_survive_crossmount(
        ops in proptest::collection::vec(strategies::op(), 1..=16),
        union_first in any::<bool>(),
    ) {
        random_crossmount(ops, union_first);
    }
}

/// `PROPTEST_CASES` overrides the default case count (for longer local runs).
fn cases_from_env(default: u32) -> u32 {
    std::env::var("PROPTEST_CASES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}
