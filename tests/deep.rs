//! Trees built to break recursive walks: a directory chain far deeper than a thread's stack
//! or the descriptor limit allows one level each (cheap to make through the mount: `mkdir n;
//! mv t n/; mv n t` per level). The quota scan at mount and the removal of scratch trees walk
//! such trees without recursion and with a bounded number of open directories.

mod common;

use common::*;
use std::fs;
use std::os::fd::{AsFd, OwnedFd};
use std::path::Path;

use nix::fcntl::OFlag;
use nix::sys::stat::Mode;

const TIMEOUT: u64 = 240;
/// Past both limits a recursive walk hit: ~20,000 levels on the main thread's 8 MiB stack,
/// 5,000–7,000 on a worker's 2 MiB, and one descriptor per level (20,000 here).
const DEPTH: usize = 40_000;

/// A chain `root/name/d/d/…/d` of `depth` directories, with a file every 1,000 levels;
/// built by descriptor (no path that long could be named).
fn chain(root: &Path, name: &str, depth: usize) {
    let open = |dir: &OwnedFd, n: &str| -> OwnedFd {
        nix::fcntl::openat(
            dir.as_fd(),
            n,
            OFlag::O_RDONLY | OFlag::O_DIRECTORY | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC,
            Mode::empty(),
        )
        .expect("open level")
    };
    let mut cur: OwnedFd = fs::File::open(root).expect("open root").into();
    let mut n = name;
    for i in 0..depth {
        nix::sys::stat::mkdirat(cur.as_fd(), n, Mode::from_bits_truncate(0o755)).expect("mkdir");
        cur = open(&cur, n);
        n = "d";
        if i % 1000 == 0 {
            nix::fcntl::openat(
                cur.as_fd(),
                "f",
                OFlag::O_CREAT | OFlag::O_WRONLY | OFlag::O_CLOEXEC,
                Mode::from_bits_truncate(0o644),
            )
            .expect("file");
        }
    }
}

/// Removes a chain with rm(1) (fts, no recursion) before the test directories are dropped:
/// std's remove_dir_all recurses and would overflow the test thread's stack.
struct RmChain(std::path::PathBuf);

impl Drop for RmChain {
    fn drop(&mut self) {
        let _ = std::process::Command::new("rm")
            .arg("-rf")
            .arg(&self.0)
            .status();
    }
}

/// The first mount with a quota scans upper; a 40,000-level chain there is counted (it
/// overflowed the stack or ran out of descriptors, and the mount never came up).
#[test]
fn quota_scan_counts_a_deep_chain() {
    with_timeout(TIMEOUT, || {
        let dirs = Dirs::new(&[vec![file("l", "x")]], &[]);
        // Before the chain is built: a panic midway must not leave it to remove_dir_all.
        let _rm = RmChain(dirs.upper.join("deep"));
        chain(&dirs.upper, "deep", DEPTH);
        let m = Mount::start_args(
            &dirs,
            &Mount::command_args(&dirs, &MountOpts::default())
                .into_iter()
                .chain(["--size".to_string(), "100G".to_string()])
                .collect::<Vec<_>>(),
        )
        .unwrap_or_else(|e| panic!("mount over a deep upper: {e}"));
        // DEPTH directories and DEPTH/1000 files, besides upper's root and the work dir.
        let used = quota_used(&m.merged).1 as usize;
        let chain = DEPTH + DEPTH / 1000;
        assert!(
            (chain..chain + 8).contains(&used),
            "{used} inodes counted, the chain alone has {chain}"
        );
        m.unmount().unwrap_or_else(|e| panic!("{e}"));
    })
}

/// With AUFS whiteouts, a directory named `.wh.X` is a whiteout: its parent lists empty, and
/// removing the parent removes the hidden tree (clear_whiteouts). A 40,000-level chain under
/// it overflowed the worker thread's stack and took the daemon down.
#[test]
fn removing_a_dir_whose_hidden_whiteout_holds_a_deep_chain() {
    with_timeout(TIMEOUT, || {
        let dirs = Dirs::new(&[vec![file("l", "x")]], &[dir("p")]);
        let _rm = RmChain(dirs.upper.join("p"));
        chain(&dirs.upper.join("p"), ".wh.h", DEPTH);
        let mut opts = MountOpts::default();
        opts.extra.push("--aufs-whiteouts".into());
        let m = Mount::start(&dirs, &opts).unwrap_or_else(|e| panic!("mount: {e}"));
        assert_eq!(
            fs::read_dir(m.merged.join("p")).expect("list p").count(),
            0,
            "p lists empty"
        );
        fs::remove_dir(m.merged.join("p")).expect("rmdir p");
        assert!(!m.merged.join("p").exists());
        assert!(!dirs.upper.join("p").exists(), "p is gone from upper");
        // The daemon is alive and serving.
        fs::write(m.merged.join("after"), "ok").expect("write after");
        assert_eq!(fs::read_to_string(m.merged.join("l")).expect("read"), "x");
        m.unmount().unwrap_or_else(|e| panic!("{e}"));
    })
}
