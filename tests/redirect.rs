//! Directories moved by kernel overlayfs with `redirect_dir=on` (the moved directory carries
//! `overlay.redirect`: its old name, or its old path from the root) read through unionfs-rs as
//! through kernel overlayfs, whether the redirect is in upper or in a lower layer (an older
//! upper); kernel overlayfs (which follows redirects by default) is the oracle.

mod common;

use common::*;

const TIMEOUT: u64 = 90;
const REDIRECT: &str = "trusted.overlay.redirect";

fn base() -> Vec<Entry> {
    vec![
        file("a/f1", "f1"),
        file("a/sub/f2", "f2"),
        file("a/sub/deep/f3", "f3"),
        file("b/x", "x"),
        file("c/d/e", "e"),
        file("c/t", "t"),
        file("m/keep", "keep"),
        file("plain/p", "p"),
    ]
}

/// An upper written by kernel overlayfs with `redirect_dir=on`, read and changed through
/// unionfs-rs as through kernel overlayfs (mounted with its defaults, which follow them).
#[test]
fn directories_moved_by_kernel_overlayfs_show_their_lower_content() {
    let prepare = vec![
        op_rename("a", "a2"),   // relative redirect "a"
        op_mkdir("n"),          //
        op_rename("b", "n/b"),  // absolute "/b", under a directory with no lower
        op_rename("c/d", "d2"), // absolute "/c/d"
        op_create("a2/new"),
        op_rename("a2/sub", "a2/sub2"), // relative, inside a redirected directory
        op_rename("m", "m2"),
        op_rename("m2", "m3"), // moved twice: still "m"
    ];
    Differential::new("kernel redirects")
        .kernel_prepare_opts("redirect_dir=on")
        .kernel_prepare(prepare)
        .lower(base())
        .data(op_read("a2/f1"), "f1")
        .data(op_read("a2/sub2/f2"), "f2")
        .data(op_read("a2/sub2/deep/f3"), "f3")
        .data(op_read("n/b/x"), "x")
        .data(op_read("d2/e"), "e")
        .data(op_read("m3/keep"), "keep")
        .data(op_readdir("a2"), "f1\nnew\nsub2")
        .data(op_readdir("d2"), "e")
        .data(op_readdir("c"), "t")
        .err(op_read("a/f1"), libc::ENOENT)
        .err(op_read("b/x"), libc::ENOENT)
        .err(op_read("c/d/e"), libc::ENOENT)
        // Changes inside moved directories: whiteouts where the lower shows, copy-ups from
        // where the redirect leads.
        .ok(op_unlink("a2/f1"))
        .ok(op_append("d2/e", "+"))
        .data(op_read("d2/e"), "e+")
        .ok(op_create("n/b/y"))
        .ok(op_rename("a2/sub2/f2", "d2/f2moved"))
        .ok(op_chmod("a2/sub2/deep", 0o700))
        .ok(op_chmod("a2/sub2/deep/f3", 0o600))
        .ok(op_setxattr("n/b/x", "user.k", "v"))
        // Without redirect_dir=on a merged directory does not move (kernel: EXDEV too).
        .err(op_rename("a2", "a3"), libc::EXDEV)
        .err(op_rename("a2/sub2", "sub3"), libc::EXDEV)
        // Removed and made again: empty, as the lower content is gone with it.
        .err(op_rmdir("d2"), libc::ENOTEMPTY)
        .ok(op_unlink("d2/e"))
        .ok(op_unlink("d2/f2moved"))
        .ok(op_rmdir("d2"))
        .ok(op_mkdir("d2"))
        .data(op_readdir("d2"), "")
        .ok(op_unlink("m3/keep"))
        .ok(op_rmdir("m3"))
        .data(op_readdir(""), "a2\nc\nd2\nn\nplain")
        .timeout(TIMEOUT)
        .run();
}

/// Redirects in lower layers (an older upper used as a lower), as kernel overlayfs follows
/// them layer by layer: chains of relative ones, absolute ones from a lower layer, a redirect
/// on a directory on the way of an absolute one, an opaque or whited-out directory on that
/// way, a redirect to nowhere.
#[test]
fn redirects_in_lower_layers_are_followed_layer_by_layer() {
    let top = vec![
        // x2 came from x (relative), whose own layer moved it from x0.
        dir("x2"),
        xattr("x2", REDIRECT, "x"),
        file("x2/top", "top"),
        whiteout("x"),
        // From the root: p/q2 was /y/q.
        dir("p/q2"),
        xattr("p/q2", REDIRECT, "/y/q"),
        // r was /s/t, and s was moved from s0 in the layer below.
        dir("r"),
        xattr("r", REDIRECT, "/s/t"),
        // Through an opaque directory: o/deep only in the layer holding the opaque o.
        dir("od"),
        xattr("od", REDIRECT, "/o/deep"),
        // Through a whiteout: nothing below.
        dir("wd"),
        xattr("wd", REDIRECT, "/gone/deep"),
        file("wd/own", "own"),
        // To nowhere: only its own content.
        dir("nowhere"),
        xattr("nowhere", REDIRECT, "/no/such"),
        file("nowhere/n", "n"),
        // Where the redirects lead is whited out at the root, as the kernel's moves leave it
        // (a file reached through two paths would be one inode to kernel overlayfs while its
        // dentries are cached, and a copy-up through one path would show through the other).
        whiteout("x0"),
        whiteout("y"),
        whiteout("s"),
        whiteout("s0"),
        // An opaque directory's redirect is not read.
        dir("opq"),
        xattr("opq", REDIRECT, "x0"),
        opaque("opq"),
        file("opq/o", "o"),
    ];
    let mid = vec![
        dir("x"),
        xattr("x", REDIRECT, "x0"),
        file("x/mid", "mid"),
        file("y/q/q1", "q1"),
        dir("s"),
        xattr("s", REDIRECT, "s0"),
        file("s/t/t1", "t1"),
        opaque("o"),
        file("o/deep/d1", "d1"),
        whiteout("gone"),
    ];
    let bottom = vec![
        file("x0/bottom", "bottom"),
        file("x/not-this", "no"),
        file("y/q/q2", "q2"),
        file("s0/t/t2", "t2"),
        file("s/t/not-this", "no"),
        file("o/deep/hidden", "no"),
        file("gone/deep/g", "no"),
    ];
    Differential::new("lower redirects")
        .lower(top)
        .lower(mid)
        .lower(bottom)
        .data(op_readdir("x2"), "bottom\nmid\ntop")
        .data(op_read("x2/bottom"), "bottom")
        .data(op_readdir("p/q2"), "q1\nq2")
        .data(op_readdir("r"), "t1\nt2")
        .data(op_readdir("od"), "d1")
        .data(op_readdir("wd"), "own")
        .data(op_readdir("nowhere"), "n")
        .data(op_readdir("opq"), "o")
        .err(op_read("x/mid"), libc::ENOENT)
        // Copy-up of a file found through the redirects, and of the directories above it.
        .ok(op_append("r/t2", "+"))
        .ok(op_append("x2/bottom", "+"))
        .ok(op_unlink("p/q2/q2"))
        .data(op_readdir("p/q2"), "q1")
        .timeout(TIMEOUT)
        .run();
}

/// Malformed redirects fail the lookup as on kernel overlayfs (EINVAL; a `.` or `..` in one,
/// EACCES) and never lead outside the layer.
#[test]
fn malformed_redirects_fail_as_on_kernel_overlayfs() {
    let top = vec![
        dir("slash"),
        xattr("slash", REDIRECT, "a/b"),
        dir("empty_comp"),
        xattr("empty_comp", REDIRECT, "//a"),
        dir("dotdot"),
        xattr("dotdot", REDIRECT, "/../../etc"),
        dir("dotdot_rel"),
        xattr("dotdot_rel", REDIRECT, ".."),
        dir("fine"),
        xattr("fine", REDIRECT, "a"),
    ];
    Differential::new("malformed redirects")
        .lower(top)
        .lower(vec![file("a/b/in", "in"), file("a/f", "f")])
        .data(op_readdir("fine"), "b\nf")
        .op(op_readdir("slash"))
        .op(op_readdir("empty_comp"))
        .op(op_readdir("dotdot"))
        .op(op_readdir("dotdot_rel"))
        .timeout(TIMEOUT)
        .run();
}

/// `redirect_dir=nofollow`: a redirected directory is refused (EPERM) where there are lower
/// layers to look in, as kernel overlayfs refuses it, and the rest of the tree reads.
#[test]
fn nofollow_refuses_redirected_directories_as_kernel_overlayfs() {
    with_timeout(TIMEOUT, || {
        let lowers = vec![base()];
        let upper = vec![
            dir("a2"),
            xattr("a2", REDIRECT, "a"),
            whiteout("a"),
            opaque("n"),
            dir("n/b"),
            xattr("n/b", REDIRECT, "/b"),
            file("n/b/own", "own"),
        ];
        let kd = Dirs::new(&lowers, &upper);
        let k = OverlayMount::start(
            &kd,
            &MountOpts {
                kernel_extra: "redirect_dir=nofollow".into(),
                ..Default::default()
            },
        )
        .unwrap_or_else(|e| panic!("{e}"));
        let ud = Dirs::new(&lowers, &upper);
        let u = Mount::start(
            &ud,
            &MountOpts {
                extra: vec!["-o".into(), "redirect_dir=nofollow".into()],
                ..Default::default()
            },
        )
        .unwrap_or_else(|e| panic!("{e}"));
        for path in ["a2", "n/b", "plain", "a"] {
            let kr = apply(&k.merged, &op_readdir(path));
            let ur = apply(&u.merged, &op_readdir(path));
            assert_eq!(kr, ur, "readdir {path}: kernel {kr:?}, unionfs-rs {ur:?}");
        }
        assert_eq!(
            apply(&u.merged, &op_readdir("a2")),
            Err(libc::EPERM),
            "the refusal"
        );
        k.unmount().unwrap_or_else(|e| panic!("{e}"));
        drop(u);
    });
}

/// `redirect_dir=on`: merged and lower directories move alone, carrying a redirect, as
/// kernel overlayfs with `redirect_dir=on` moves them — the same view and the same redirects
/// on disk, compared step by step.
#[test]
fn redirect_dir_on_moves_directories_as_kernel_overlayfs() {
    let lower = vec![
        file("a/f1", "f1"),
        file("a/sub/f2", "f2"),
        file("a/sub/deep/f3", "f3"),
        file("b/x", "x"),
        file("c/d/e", "e"),
        file("m/keep", "keep"),
        file("t/only", "only"),
        file("u/v/w", "w"),
        file("x1/f", "in x1"),
        file("x2/g", "in x2"),
        file("y1/h", "in y1"),
    ];
    Differential::new("redirect_dir=on")
        .kernel_opts("redirect_dir=on")
        .candidate_args(&["-o", "redirect_dir=on"])
        .lower(lower)
        .ok(op_rename("a", "a2")) // within its directory: "a"
        .data(op_read("a2/f1"), "f1")
        .data(op_readdir("a2"), "f1\nsub")
        .ok(op_mkdir("n"))
        .ok(op_rename("b", "n/b")) // elsewhere: "/b"
        .data(op_read("n/b/x"), "x")
        .ok(op_rename("c/d", "d2")) // "/c/d"
        .data(op_readdir("d2"), "e")
        .data(op_readdir("c"), "")
        .ok(op_rename("a2/sub", "sub3")) // its parent's redirect on the way: "/a/sub"
        .data(op_read("sub3/deep/f3"), "f3")
        .ok(op_rename("a2", "n/a3")) // moved again, elsewhere: "/a"
        .ok(op_rename("n/a3", "n/a4")) // an absolute one stays
        .data(op_read("n/a4/f1"), "f1")
        .ok(op_rename("m", "m2"))
        .ok(op_rename("m2", "m")) // back: its redirect stays
        .data(op_read("m/keep"), "keep")
        .ok(op_rename("u/v", "u/v2"))
        .ok(op_rename("u", "u2")) // a parent of a moved one
        .data(op_read("u2/v2/w"), "w")
        // Changes inside moved directories.
        .ok(op_unlink("n/a4/f1"))
        .ok(op_create("n/b/new"))
        .ok(op_append("sub3/f2", "+"))
        .data(op_read("sub3/f2"), "f2+")
        // Over an empty merged directory, which shows the mover's content only.
        .ok(op_unlink("t/only"))
        .ok(op_rename("d2", "t"))
        .data(op_readdir("t"), "e")
        // Removed once empty; a new one in its place is empty.
        .ok(op_unlink("n/b/x"))
        .ok(op_unlink("n/b/new"))
        .ok(op_rmdir("n/b"))
        .ok(op_mkdir("n/b"))
        .data(op_readdir("n/b"), "")
        // Exchanged: two lower directories in one directory (each gets its old name), a lower
        // one with a new one elsewhere (the lower one its path, the new one made opaque).
        .ok(op_exchange("x1", "x2"))
        .data(op_read("x1/g"), "in x2")
        .data(op_read("x2/f"), "in x1")
        .ok(op_mkdir("n/e"))
        .ok(op_create("n/e/mine"))
        .ok(op_exchange("y1", "n/e"))
        .data(op_read("n/e/h"), "in y1")
        .data(op_readdir("y1"), "mine")
        .data(op_readdir(""), "c\nm\nn\nsub3\nt\nu2\nx1\nx2\ny1")
        .timeout(TIMEOUT)
        .run();
}
