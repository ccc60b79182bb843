//! The daemon caches an open fd per directory per layer; those are capped (a quarter of its
//! descriptor limit) so that a walk over more directories than the limit allows does not make
//! every later open of the mount fail with EMFILE. The daemon runs here with a descriptor
//! limit of 1024 (cap 256) over 3,000 directories in two layers.

mod common;

use common::*;
use std::fs;

const TIMEOUT: u64 = 180;
const DIRS: usize = 3000;

#[test]
fn directory_fds_stay_under_the_cap() {
    with_timeout(TIMEOUT, || {
        let lower: Vec<Entry> = (0..DIRS)
            .map(|i| file(&format!("d{i}/f"), &format!("lower {i}")))
            .collect();
        let dirs = Dirs::new(&[lower], &[]);
        // The daemon inherits this limit (and raises its soft limit to it). Lowering the
        // hard limit cannot be undone without CAP_SYS_RESOURCE: this test binary has no
        // other test.
        use nix::sys::resource::{Resource, setrlimit};
        setrlimit(Resource::RLIMIT_NOFILE, 1024, 1024).expect("lower the limit");
        let m = Mount::start(&dirs, &MountOpts::default()).unwrap_or_else(|e| panic!("mount: {e}"));
        for i in 0..DIRS {
            let d = m.merged.join(format!("d{i}"));
            assert_eq!(
                fs::read_to_string(d.join("f")).unwrap_or_else(|e| panic!("read d{i}/f: {e}")),
                format!("lower {i}")
            );
            // A create copies the directory up: its upper fd too.
            fs::write(d.join("new"), "x").unwrap_or_else(|e| panic!("create in d{i}: {e}"));
        }
        let out = std::process::Command::new(bin())
            .args(["stats", "--json"])
            .arg(&m.merged)
            .output()
            .expect("stats");
        let text = String::from_utf8_lossy(&out.stdout).to_string();
        let num = |k: &str| -> u64 {
            text.split(&format!("\"{k}\":"))
                .nth(1)
                .and_then(|r| r.split(|c: char| !c.is_ascii_digit()).next())
                .and_then(|n| n.parse().ok())
                .unwrap_or_else(|| panic!("no {k} in {text}"))
        };
        assert_eq!(num("dir_fd_cap"), 256, "{text}");
        assert!(num("dir_fds") <= 256, "{text}");
        assert!(num("dir_fd_evictions") >= (DIRS as u64) * 2 - 256, "{text}");
        // Everything is still there, read back through directories whose fds were closed.
        for i in (0..DIRS).step_by(7) {
            let d = m.merged.join(format!("d{i}"));
            let mut names: Vec<String> = fs::read_dir(&d)
                .unwrap_or_else(|e| panic!("list d{i}: {e}"))
                .map(|e| e.expect("entry").file_name().to_string_lossy().into_owned())
                .collect();
            names.sort();
            assert_eq!(names, ["f", "new"], "d{i}");
        }
        deep_chain_through_the_mount(&m.merged);
        let leaves = creates_while_ancestors_swap(&m.merged);
        m.unmount().unwrap_or_else(|e| panic!("{e}"));
        check_leaves_on_disk(&dirs.upper, leaves);
    })
}

/// A chain of 3,000 directories made through the mount (6,000 bytes of path: more than
/// PATH_MAX), far more levels than the cap keeps open: a level whose fd was closed is opened
/// again from its nearest open ancestor, not by a path from the root that could not be named.
fn deep_chain_through_the_mount(merged: &std::path::Path) {
    use nix::fcntl::{OFlag, openat};
    use nix::sys::stat::{Mode, mkdirat};
    use std::os::fd::{AsFd, OwnedFd};
    let dir = OFlag::O_RDONLY | OFlag::O_DIRECTORY | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC;
    let top: OwnedFd = fs::File::open(merged).expect("open merged").into();
    let mut cur = openat(top.as_fd(), ".", dir, Mode::empty()).expect("dup");
    for i in 0..3000 {
        mkdirat(cur.as_fd(), "c", Mode::from_bits_truncate(0o755))
            .unwrap_or_else(|e| panic!("mkdir level {i}: {e}"));
        cur = openat(cur.as_fd(), "c", dir, Mode::empty())
            .unwrap_or_else(|e| panic!("open level {i}: {e}"));
    }
    let f = openat(
        cur.as_fd(),
        "bottom",
        OFlag::O_CREAT | OFlag::O_WRONLY | OFlag::O_CLOEXEC,
        Mode::from_bits_truncate(0o644),
    )
    .expect("create at the bottom");
    nix::unistd::write(&f, b"deep").expect("write");
    drop((f, cur));
    // Down again from the top, one level at a time, and list each level.
    let mut cur = openat(top.as_fd(), ".", dir, Mode::empty()).expect("dup");
    for i in 0..3000 {
        cur = openat(cur.as_fd(), "c", dir, Mode::empty())
            .unwrap_or_else(|e| panic!("reopen level {i}: {e}"));
        // A create at each level needs the daemon's fd of it.
        let probe = format!("p{i}");
        mkdirat(cur.as_fd(), probe.as_str(), Mode::from_bits_truncate(0o755))
            .unwrap_or_else(|e| panic!("mkdir in level {i}: {e}"));
    }
    let f = openat(
        cur.as_fd(),
        "bottom",
        OFlag::O_RDONLY | OFlag::O_CLOEXEC,
        Mode::empty(),
    )
    .expect("open the bottom file");
    let mut buf = [0u8; 8];
    let n = nix::unistd::read(&f, &mut buf).expect("read");
    assert_eq!(&buf[..n], b"deep");
    // rm(1) walks it with fts, through the mount.
    let st = std::process::Command::new("rm")
        .arg("-rf")
        .arg(merged.join("c"))
        .status()
        .expect("rm");
    assert!(st.success(), "rm -rf of the chain through the mount");
}

const LEAVES: usize = 200;
const ROUNDS: usize = 30;

/// Two trees `sw/A/s*/l` and `sw/B/s*/l` made through the mount, swapped again and again
/// (RENAME_EXCHANGE of A and B) while another thread creates files in every leaf through
/// fds it holds on the leaves. The leaves' daemon fds are closed by the cap over and over,
/// so the daemon opens a leaf again by its names from an ancestor it has open: names that a
/// swap in flight has changed on disk and not yet in the daemon's nodes. Every create must
/// succeed and land in the leaf it was made in. Returns the number of leaves per tree.
fn creates_while_ancestors_swap(merged: &std::path::Path) -> usize {
    use nix::fcntl::{OFlag, RenameFlags, open, openat, renameat2};
    use nix::sys::stat::Mode;
    use std::os::fd::{AsFd, OwnedFd};
    use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
    let sw = merged.join("sw");
    let mut leaves: Vec<OwnedFd> = Vec::new();
    for t in ["A", "B"] {
        for i in 0..LEAVES {
            let l = sw.join(t).join(format!("s{i}")).join("l");
            fs::create_dir_all(&l).unwrap_or_else(|e| panic!("mkdir {l:?}: {e}"));
            fs::write(l.join("id"), format!("{t}{i}")).expect("write id");
            let fd = open(
                &l,
                OFlag::O_RDONLY | OFlag::O_DIRECTORY | OFlag::O_CLOEXEC,
                Mode::empty(),
            )
            .unwrap_or_else(|e| panic!("open {l:?}: {e}"));
            leaves.push(fd);
        }
    }
    let top: OwnedFd = fs::File::open(&sw).expect("open sw").into();
    let stop = AtomicBool::new(false);
    let swaps = AtomicU64::new(0);
    let failures: Vec<String> = std::thread::scope(|s| {
        s.spawn(|| {
            while !stop.load(Ordering::Relaxed) {
                renameat2(
                    top.as_fd(),
                    "A",
                    top.as_fd(),
                    "B",
                    RenameFlags::RENAME_EXCHANGE,
                )
                .expect("exchange A and B");
                swaps.fetch_add(1, Ordering::Relaxed);
            }
        });
        let creator = s.spawn(|| {
            let mut failures = Vec::new();
            for round in 0..ROUNDS {
                for (k, leaf) in leaves.iter().enumerate() {
                    let name = format!("c{k}-{round}");
                    match openat(
                        leaf.as_fd(),
                        name.as_str(),
                        OFlag::O_CREAT | OFlag::O_EXCL | OFlag::O_WRONLY | OFlag::O_CLOEXEC,
                        Mode::from_bits_truncate(0o644),
                    ) {
                        Ok(_) => {}
                        Err(e) => failures.push(format!("create {name}: {e}")),
                    }
                }
            }
            failures
        });
        let failures = creator.join().expect("creator thread");
        stop.store(true, Ordering::Relaxed);
        failures
    });
    assert!(swaps.load(Ordering::Relaxed) > 0, "no swap happened");
    assert!(
        failures.is_empty(),
        "{} of {} creates failed while A and B were swapped {} times, first: {:?}",
        failures.len(),
        2 * LEAVES * ROUNDS,
        swaps.load(Ordering::Relaxed),
        &failures[..failures.len().min(5)]
    );
    LEAVES
}

/// In the upper dir, each leaf holds its id file and exactly the files created through the
/// fd of that leaf (named after the fd's index, which follows the id).
fn check_leaves_on_disk(upper: &std::path::Path, leaves: usize) {
    let mut misplaced = Vec::new();
    for t in ["A", "B"] {
        for i in 0..leaves {
            let l = upper.join("sw").join(t).join(format!("s{i}")).join("l");
            let id = fs::read_to_string(l.join("id")).unwrap_or_else(|e| panic!("{l:?}: {e}"));
            let k = match &id[..1] {
                "A" => 0,
                _ => leaves,
            } + id[1..].parse::<usize>().expect("id");
            let mut n = 0;
            for e in fs::read_dir(&l).unwrap_or_else(|e| panic!("{l:?}: {e}")) {
                let name = e.expect("entry").file_name().to_string_lossy().into_owned();
                if name == "id" {
                    continue;
                }
                n += 1;
                if !name.starts_with(&format!("c{k}-")) {
                    misplaced.push(format!("{name} in the leaf of fd {k} ({id})"));
                }
            }
            if n != ROUNDS {
                misplaced.push(format!("leaf {id} holds {n} created files, not {ROUNDS}"));
            }
        }
    }
    assert!(
        misplaced.is_empty(),
        "{} misplaced or missing, first: {:?}",
        misplaced.len(),
        &misplaced[..misplaced.len().min(5)]
    );
}
