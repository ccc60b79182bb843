//! Directory listings resumed at an offset, on unionfs-rs and on kernel overlayfs.
//!
//! The kernel keeps FUSE directory listings in its own cache and asks the daemon only from where
//! that cache ends or lost a page, so the first READDIR a handle sees may come at any offset.
//! seekdir() to a cookie from an earlier open does the same. A handle that had no listing yet
//! used to answer such a read with nothing: `find` silently missed files after memory pressure
//! dropped cached listing pages.
//!
//! The daemon keeps no directory handles (opendir answers ENOSYS): offsets carry the listing's
//! generation, so a reader continues in the listing it started while the directory changes.

mod common;

use common::*;
use std::ffi::CStr;
use std::fs;
use std::os::fd::{AsRawFd, RawFd};
use std::path::Path;

const TIMEOUT: u64 = 60;

/// (name, cookie of the next entry) of every entry `getdents64` returns on `fd` until the end,
/// reading `buf_size` bytes at a time.
fn getdents_all(fd: RawFd, buf_size: usize) -> Vec<(String, i64)> {
    let mut out = Vec::new();
    let mut buf = vec![0u8; buf_size];
    loop {
        // SAFETY: getdents64 writes at most buf.len() bytes into buf, which lives across the call.
        let n = unsafe { libc::syscall(libc::SYS_getdents64, fd, buf.as_mut_ptr(), buf.len()) };
        assert!(n >= 0, "getdents64: {}", std::io::Error::last_os_error());
        if n == 0 {
            return out;
        }
        let mut at = 0usize;
        while at < n as usize {
            // struct linux_dirent64: u64 d_ino, i64 d_off, u16 d_reclen, u8 d_type, char d_name[].
            let d_off = i64::from_ne_bytes(buf[at + 8..at + 16].try_into().unwrap());
            let reclen = u16::from_ne_bytes(buf[at + 16..at + 18].try_into().unwrap()) as usize;
            let name = CStr::from_bytes_until_nul(&buf[at + 19..at + reclen])
                .unwrap()
                .to_string_lossy()
                .into_owned();
            out.push((name, d_off));
            at += reclen;
        }
    }
}

fn open_dir(p: &Path) -> fs::File {
    use std::os::unix::fs::OpenOptionsExt;
    fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_DIRECTORY)
        .open(p)
        .unwrap_or_else(|e| panic!("open {}: {e}", p.display()))
}

/// Drop the kernel's cached listing of the directory open as `f` (its page cache pages).
fn drop_cached_listing(f: &fs::File) {
    // SAFETY: fadvise on an open fd; no memory is passed.
    let r = unsafe { libc::posix_fadvise(f.as_raw_fd(), 0, 0, libc::POSIX_FADV_DONTNEED) };
    assert_eq!(r, 0, "fadvise DONTNEED on a directory");
}

fn layers() -> Vec<Vec<Entry>> {
    // Names long enough that one listing takes several FUSE replies; half in each layer, some
    // shadowed, some whited out.
    let name = |i: usize| format!("d/entry-with-a-long-name-to-fill-pages-{i:04}");
    let mut top = vec![dir("d")];
    let mut bottom = vec![dir("d")];
    for i in 0..600 {
        if i % 2 == 0 {
            top.push(file(&name(i), "top"));
        }
        // Every odd name, and every third even one (shadowed by the top layer).
        if i % 3 == 0 || i % 2 == 1 {
            bottom.push(file(&name(i), "bottom"));
        }
    }
    for i in (1..600).step_by(14) {
        top.push(whiteout(&name(i)));
    }
    vec![top, bottom]
}

/// List `dir` fully, then, on fresh opens, resume at cookies from that listing, with the
/// kernel's cached listing kept and dropped. Every resumed read must return exactly the rest.
fn resume_at_cookies(dir: &Path, what: &str) {
    let full = {
        let f = open_dir(dir);
        getdents_all(f.as_raw_fd(), 4096)
    };
    let names: Vec<&str> = full.iter().map(|(n, _)| n.as_str()).collect();
    assert!(
        names.len() > 300,
        "{what}: listing too short: {}",
        names.len()
    );
    for k in [1, full.len() / 3, full.len() / 2, full.len() - 2] {
        for drop_cache in [false, true] {
            let f = open_dir(dir);
            if drop_cache {
                drop_cached_listing(&f);
            }
            let cookie = full[k - 1].1;
            // SAFETY: lseek on an open fd.
            let r = unsafe { libc::lseek(f.as_raw_fd(), cookie, libc::SEEK_SET) };
            assert_eq!(r, cookie, "{what}: lseek to cookie {cookie}");
            let rest = getdents_all(f.as_raw_fd(), 1024);
            let rest: Vec<&str> = rest.iter().map(|(n, _)| n.as_str()).collect();
            if rest != names[k..] {
                let first = rest.iter().zip(&names[k..]).position(|(a, b)| a != b);
                panic!(
                    "{what}: resumed after entry {k} of {} (cached listing dropped: \
                     {drop_cache}): got {} entries, expected {}; first difference at {first:?}",
                    names.len(),
                    rest.len(),
                    names.len() - k
                );
            }
        }
    }
    // A full listing after all that is still complete.
    let f = open_dir(dir);
    drop_cached_listing(&f);
    let again: Vec<String> = getdents_all(f.as_raw_fd(), 2048)
        .into_iter()
        .map(|(n, _)| n)
        .collect();
    assert_eq!(again, names, "{what}: full listing after resumed reads");
}

#[test]
fn listing_resumed_at_a_cookie_returns_the_rest() {
    with_timeout(TIMEOUT, || {
        let m = Mount::new(&layers(), &[]);
        resume_at_cookies(&m.path("d"), "unionfs-rs");
        m.unmount().unwrap_or_else(|e| panic!("{e}"));
    });
}

#[test]
fn listing_resumed_at_a_cookie_returns_the_rest_on_kernel_overlayfs() {
    with_timeout(TIMEOUT, || {
        let m = OverlayMount::new(&layers(), &[]);
        resume_at_cookies(&m.path("d"), "kernel overlayfs");
        m.unmount().unwrap_or_else(|e| panic!("{e}"));
    });
}

/// `readdirplus=off|on|auto`: the same names and attributes whichever way the kernel lists;
/// with `off` a listing makes no lookup (no node per entry in the daemon), with `on` it does.
#[test]
fn readdirplus_modes_list_the_same_and_only_plus_looks_entries_up() {
    with_timeout(TIMEOUT, || {
        let files: Vec<Entry> = std::iter::once(dir("d"))
            .chain((0..300).map(|i| file(&format!("d/f{i:03}"), "x")))
            .collect();
        let mut listings = Vec::new();
        for mode in ["off", "on", "auto"] {
            let m = Mount::with_args(files.clone(), &["-o", &format!("readdirplus={mode}")]);
            let before = daemon_stats(&m.merged)["nodes"];
            let mut names: Vec<String> = fs::read_dir(m.path("d"))
                .unwrap_or_else(|e| panic!("{mode}: read_dir: {e}"))
                .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
                .collect();
            names.sort();
            let after = daemon_stats(&m.merged)["nodes"];
            match mode {
                "off" => assert!(
                    after <= before + 1,
                    "off: listing 300 names made {} nodes",
                    after - before
                ),
                "on" => assert!(
                    after >= before + 300,
                    "on: listing 300 names made only {} nodes",
                    after - before
                ),
                _ => assert!(
                    after > before,
                    "auto: the first batch comes with attributes"
                ),
            }
            for n in &names {
                let md = lstat(&m.path(&format!("d/{n}")));
                assert_eq!((md.len(), md.is_file()), (1, true), "{mode}: {n}");
            }
            listings.push(names);
            m.unmount().unwrap_or_else(|e| panic!("{e}"));
        }
        assert_eq!(listings[0].len(), 300);
        assert!(
            listings.iter().all(|l| *l == listings[0]),
            "listings differ"
        );
    });
}

#[test]
fn readdirplus_option_rejects_unknown_values() {
    with_timeout(TIMEOUT, || {
        let dirs = Dirs::new(&[vec![file("a", "x")]], &[]);
        let mut args = Mount::command_args(&dirs, &MountOpts::default());
        args.push("--readdirplus".into());
        args.push("sometimes".into());
        let out = std::process::Command::new(bin())
            .args(&args)
            .output()
            .expect("run unionfs-rs");
        assert!(
            !out.status.success(),
            "a bad readdirplus value was accepted"
        );
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(
            err.contains("readdirplus: sometimes is not auto, on or off"),
            "unexpected error: {err}"
        );
    });
}

/// One `getdents64` call of `buf_size` bytes on `fd`: the names it returned (empty at the end).
fn getdents_once(fd: RawFd, buf_size: usize) -> Vec<String> {
    let mut buf = vec![0u8; buf_size];
    // SAFETY: getdents64 writes at most buf.len() bytes into buf, which lives across the call.
    let n = unsafe { libc::syscall(libc::SYS_getdents64, fd, buf.as_mut_ptr(), buf.len()) };
    assert!(n >= 0, "getdents64: {}", std::io::Error::last_os_error());
    let mut out = Vec::new();
    let mut at = 0usize;
    while at < n as usize {
        let reclen = u16::from_ne_bytes(buf[at + 16..at + 18].try_into().unwrap()) as usize;
        let name = CStr::from_bytes_until_nul(&buf[at + 19..at + reclen])
            .unwrap()
            .to_string_lossy()
            .into_owned();
        out.push(name);
        at += reclen;
    }
    out
}

#[test]
fn a_listing_read_while_the_directory_changes_lists_every_other_entry_once() {
    // No open directory handles in the daemon (opendir answers ENOSYS): each READDIR names the
    // listing it continues through its offset. A reader that lists a directory in small pieces
    // while others create and remove names in it, and drops the kernel's cached listing
    // between pieces (so the daemon is asked from the middle), must see every entry that
    // stayed exactly once; created or removed ones may or may not appear. Twice: with the
    // kernel's cached listing complete when the reader starts (its first pieces come from that
    // cache, with the offsets of the listing that filled it), and with it reset (a change just
    // before the open: every piece comes from the daemon).
    with_timeout(TIMEOUT, || {
        let m = Mount::new(&layers(), &[]);
        read_while_changing(&m, true);
        read_while_changing(&m, false);
        m.unmount().expect("unmount");
    })
}

fn read_while_changing(m: &Mount, cached: bool) {
    {
        let d = m.path("d");
        let stayed: Vec<String> = fs::read_dir(&d)
            .expect("read_dir")
            .map(|e| e.expect("entry").file_name().to_string_lossy().into_owned())
            .filter(|n| !n.starts_with("new-"))
            .collect();
        assert!(stayed.len() > 300, "listing too short: {}", stayed.len());
        if !cached {
            fs::write(d.join("reset"), "x").expect("create");
            fs::remove_file(d.join("reset")).expect("unlink");
        }
        // Removed as the reader goes, each one it has already seen: a listing taken afresh
        // would then start one entry later at the reader's index and skip one.
        let mut removed: Vec<String> = Vec::new();
        let f = open_dir(&d);
        let mut seen: Vec<String> = Vec::new();
        let mut round = 0;
        loop {
            let batch = getdents_once(f.as_raw_fd(), 1024);
            if batch.is_empty() {
                break;
            }
            seen.extend(batch);
            // From the second piece on, a name comes and goes too (the first change is a
            // removal alone: a listing taken afresh there would be one entry off).
            if round > 0 {
                fs::write(d.join(format!("new-{cached}-{round}")), "x").expect("create");
            }
            if round > 1 {
                fs::remove_file(d.join(format!("new-{cached}-{}", round - 1))).expect("unlink");
            }
            if let Some(r) = seen
                .iter()
                .find(|n| stayed.contains(n) && !removed.contains(n))
                .cloned()
            {
                fs::remove_file(d.join(&r)).expect("unlink an original");
                removed.push(r);
            }
            drop_cached_listing(&f);
            round += 1;
        }
        assert!(round > 5, "the listing came in {round} pieces only");
        for name in stayed.iter().filter(|n| !removed.contains(n)) {
            let n = seen.iter().filter(|s| *s == name).count();
            assert_eq!(
                n, 1,
                "{name} listed {n} times ({round} pieces, cached {cached})"
            );
        }
        let mut dup = seen.clone();
        dup.sort();
        dup.dedup();
        assert_eq!(
            dup.len(),
            seen.len(),
            "some entry listed twice (cached {cached})"
        );
    }
}

/// Every file under `dir`, listing each directory once (as `find` does).
fn walk(dir: &Path, files: &mut usize) {
    for e in fs::read_dir(dir).expect("read_dir") {
        let e = e.expect("entry");
        if e.file_type().expect("type").is_dir() {
            walk(&e.path(), files);
        } else {
            *files += 1;
        }
    }
}

/// Stats of the mount once every directory queued for read-ahead was read (its threads run
/// behind the walk; queueing happens in the listing request itself).
fn settled_stats(m: &Mount) -> std::collections::HashMap<String, u64> {
    let until = std::time::Instant::now() + std::time::Duration::from_secs(20);
    loop {
        let s = daemon_stats(&m.merged);
        let n = |k: &str| s.get(k).copied().unwrap_or(0);
        let done = n("prefetch_dirs") + n("prefetch_skipped") == n("prefetch_queued");
        if done || std::time::Instant::now() > until {
            return s;
        }
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
}

fn walk_tree() -> Vec<Entry> {
    let mut v = Vec::new();
    for d in ["a", "b", "c"] {
        for s in ["x", "y"] {
            for f in 0..3 {
                v.push(file(&format!("top/{d}/{s}/f{f}"), "1"));
            }
        }
    }
    v
}

/// A tree walk has the subdirectories of each directory it lists read ahead, each once (the
/// walk's root's when its first subdirectory is listed); a single listing has none.
#[test]
fn a_tree_walk_reads_subdirectories_ahead_and_a_single_listing_does_not() {
    with_timeout(TIMEOUT, || {
        let m = Mount::with_args(walk_tree(), &[]);
        assert_eq!(fs::read_dir(m.path("top")).expect("ls").count(), 3);
        let s = settled_stats(&m);
        assert_eq!(s.get("prefetch_queued"), Some(&0), "{s:?}");
        let mut files = 0;
        walk(&m.path("top"), &mut files);
        assert_eq!(files, 18);
        // top's a, b, c and each one's x and y, each queued once and read.
        let s = settled_stats(&m);
        assert_eq!(s.get("prefetch_queued"), Some(&9), "{s:?}");
        assert_eq!(s.get("prefetch_dirs"), Some(&9), "{s:?}");
        assert!(s.get("prefetch_entries").is_some_and(|&n| n >= 9), "{s:?}");
        assert_eq!(s.get("prefetch_dropped"), Some(&0), "{s:?}");
        m.unmount().expect("unmount");
    })
}

/// Over layers that are all in memory (just written) the read-ahead reads nothing from disk,
/// so after a run of such directories it holds back: most of a longer walk's directories are
/// skipped, a few still read (to notice the disk again).
#[test]
fn a_walk_over_cached_layers_is_mostly_not_read_ahead() {
    with_timeout(TIMEOUT, || {
        let mut tree = Vec::new();
        for d in 0..8 {
            for s in 0..8 {
                tree.push(file(&format!("top/d{d}/s{s}/f"), "1"));
            }
        }
        let m = Mount::with_args(tree, &[]);
        let mut files = 0;
        walk(&m.path("top"), &mut files);
        assert_eq!(files, 64);
        // Held back only where the layers are on a block device (their reads are counted).
        use std::os::unix::fs::MetadataExt;
        let dev = fs::metadata(m.merged.parent().expect("parent"))
            .expect("stat")
            .dev();
        if libc::major(dev) == 0 {
            eprintln!("layers not on a block device: read-ahead is never held back there");
            m.unmount().expect("unmount");
            return;
        }
        let s = settled_stats(&m);
        let n = |k: &str| s.get(k).copied().unwrap_or(0);
        // top's 8 and their 8 each.
        assert_eq!(n("prefetch_queued"), 72, "{s:?}");
        assert_eq!(n("prefetch_dirs") + n("prefetch_skipped"), 72, "{s:?}");
        // 16 in a row found cached, then one in 16: 16 + 3 read ahead, 53 skipped.
        assert!(n("prefetch_skipped") >= 40, "{s:?}");
        assert!(n("prefetch_dirs") >= 16, "{s:?}");
        m.unmount().expect("unmount");
    })
}

#[test]
fn no_read_ahead_with_prefetch_off() {
    with_timeout(TIMEOUT, || {
        let m = Mount::with_args(walk_tree(), &["-o", "prefetch=off"]);
        let mut files = 0;
        walk(&m.path("top"), &mut files);
        assert_eq!(files, 18);
        let s = settled_stats(&m);
        assert_eq!(s.get("prefetch_queued"), Some(&0), "{s:?}");
        assert_eq!(s.get("prefetch_dirs"), Some(&0), "{s:?}");
        m.unmount().expect("unmount");
    })
}

/// Two readers going through two large directories at the same time, batch by batch, whose
/// listings together exceed what is kept of listings: each reader continues in its listing
/// (the one in use is kept), not in a listing of the whole directory made again at every
/// batch (which made such a read quadratic).
#[test]
fn two_large_listings_read_side_by_side_are_each_made_once() {
    with_timeout(TIMEOUT, || {
        // 2 × 40,000 entries; 64k are kept beyond the ones in use.
        let mut tree = vec![dir("a"), dir("b")];
        for d in ["a", "b"] {
            for i in 0..40_000 {
                tree.push(file(&format!("{d}/f{i:05}"), ""));
            }
        }
        let m = Mount::with_args(tree, &[]);
        let made0 = daemon_stats(&m.merged)
            .get("listings_made")
            .copied()
            .expect("listings_made");
        let (fa, fb) = (open_dir(&m.path("a")), open_dir(&m.path("b")));
        let (mut na, mut nb) = (0, 0);
        loop {
            let a = getdents_once(fa.as_raw_fd(), 4096);
            let b = getdents_once(fb.as_raw_fd(), 4096);
            if a.is_empty() && b.is_empty() {
                break;
            }
            na += a.len();
            nb += b.len();
        }
        // Each directory's entries and its "." and "..".
        assert_eq!((na, nb), (40_002, 40_002));
        let s = daemon_stats(&m.merged);
        let made = s.get("listings_made").copied().expect("listings_made") - made0;
        assert!(
            made <= 4,
            "{made} listings made for two directories read once: {s:?}"
        );
        drop((fa, fb));
        m.unmount().expect("unmount");
    })
}

/// 300 names in a directory merged from two lowers (50 more hidden by whiteouts), never
/// touched, while another thread creates and removes other names in it.
fn churned_layers() -> (Vec<Vec<Entry>>, Vec<String>) {
    let (mut top, mut bottom, mut kept) = (Vec::new(), Vec::new(), Vec::new());
    for i in 0..250 {
        let n = format!("pin/p{i:04}_{}", "x".repeat(30));
        bottom.push(file(&n, ""));
        if i >= 200 {
            top.push(whiteout(&n));
        } else {
            kept.push(n);
        }
    }
    for i in 250..350 {
        let n = format!("pin/p{i:04}_{}", "y".repeat(30));
        top.push(file(&n, ""));
        kept.push(n);
    }
    let kept = kept
        .into_iter()
        .map(|n| n.trim_start_matches("pin/").to_string())
        .collect();
    (vec![top, bottom], kept)
}

/// Three readers list the directory over and over while another thread creates and removes
/// other names in it: every listing holds all 300 names that exist throughout, as POSIX asks.
/// (The kernel keeps one cached listing per directory; a reader that had started another
/// listing meanwhile came back with an offset that cache does not hold, and when the cached
/// listing ended exactly at a page boundary the kernel answered end-of-directory: listings of
/// 175 of 330 names, about one in a thousand here.) Returns the listings made.
fn concurrent_listings_are_whole(dir: &Path, kept: &[String], what: &str) -> usize {
    use std::sync::atomic::{AtomicBool, Ordering};
    let stop = AtomicBool::new(false);
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(8);
    let (bad, total) = std::thread::scope(|s| {
        s.spawn(|| {
            let mut x = 0x9e37_79b9_7f4a_7c15u64;
            while !stop.load(Ordering::Relaxed) {
                // xorshift: a name of 61 and create or remove, at random.
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                let n = dir.join(format!("s{}", (x >> 8) % 61));
                if x & 1 == 0 {
                    let _ = fs::write(&n, "");
                } else {
                    let _ = fs::remove_file(&n);
                }
            }
        });
        let readers: Vec<_> = (0..3)
            .map(|_| {
                s.spawn(|| {
                    let (mut bad, mut n) = (Vec::new(), 0usize);
                    while std::time::Instant::now() < deadline {
                        let names: std::collections::HashSet<String> = fs::read_dir(dir)
                            .unwrap_or_else(|e| panic!("{what}: list: {e}"))
                            .map(|e| e.expect("entry").file_name().to_string_lossy().into_owned())
                            .collect();
                        n += 1;
                        let missing = kept.iter().filter(|k| !names.contains(*k)).count();
                        if missing > 0 {
                            bad.push(format!("{} names listed, {missing} missing", names.len()));
                        }
                    }
                    (bad, n)
                })
            })
            .collect();
        let r = readers.into_iter().fold((Vec::new(), 0), |mut acc, r| {
            let (b, n) = r.join().expect("reader");
            acc.0.extend(b);
            acc.1 += n;
            acc
        });
        stop.store(true, Ordering::Relaxed);
        r
    });
    assert!(
        bad.is_empty(),
        "{what}: {} of {total} listings left names out, first: {:?}",
        bad.len(),
        &bad[..bad.len().min(3)]
    );
    total
}

#[test]
fn concurrent_listings_of_a_changing_directory_are_whole() {
    with_timeout(TIMEOUT, || {
        let (lowers, kept) = churned_layers();
        let m = Mount::new(&lowers, &[]);
        let n = concurrent_listings_are_whole(&m.path("pin"), &kept, "unionfs-rs");
        eprintln!(
            "unionfs-rs: {n} whole listings; {:?}",
            daemon_stats(&m.merged).get("kernel_listing_drops")
        );
        m.unmount().expect("unmount");
    })
}

#[test]
fn concurrent_listings_of_a_changing_directory_are_whole_on_kernel_overlayfs() {
    with_timeout(TIMEOUT, || {
        let (lowers, kept) = churned_layers();
        let m = OverlayMount::new(&lowers, &[]);
        concurrent_listings_are_whole(&m.path("pin"), &kept, "kernel overlayfs");
        m.unmount().expect("unmount");
    })
}

/// (name, d_ino, st_ino) of every entry of `dir` whose listed inode number is not the one a
/// stat of its name gives.
fn dino_mismatches(dir: &Path) -> Vec<(String, u64, u64)> {
    use std::os::unix::fs::{DirEntryExt, MetadataExt};
    let mut out = Vec::new();
    for e in fs::read_dir(dir).unwrap() {
        let e = e.unwrap();
        let st = fs::symlink_metadata(e.path()).unwrap().ino();
        if e.ino() != st {
            out.push((e.file_name().to_string_lossy().into_owned(), e.ino(), st));
        }
    }
    out
}

/// A listing gives each entry the inode number a stat of it gives, as kernel overlayfs
/// does: a copied-up file keeps its origin's number in both (QA: listings gave the upper
/// copy's own number, so `find -inum` missed copied-up files), before and after a remount;
/// with READDIRPLUS off (every batch names only) and on.
#[test]
fn listed_inode_numbers_are_the_stat_ones() {
    with_timeout(TIMEOUT * 2, || {
        let mut lower = vec![dir("d"), dir("d/sub"), dir("e")];
        for i in 0..300 {
            lower.push(file(&format!("d/f{i:03}"), "x"));
        }
        let dirs = Dirs::new(&[lower], &[]);
        for mode in ["off", "on"] {
            let args = {
                let mut a = Mount::command_args(&dirs, &MountOpts::default());
                a.extend(["-o".to_string(), format!("readdirplus={mode}")]);
                a
            };
            let m = Mount::start_args(&dirs, &args).unwrap_or_else(|e| panic!("{e}"));
            // Copies up: files by a chmod, `d/sub` by a file made in it.
            for i in (0..300).step_by(2) {
                fs::set_permissions(
                    m.path(&format!("d/f{i:03}")),
                    std::os::unix::fs::PermissionsExt::from_mode(0o600),
                )
                .unwrap();
            }
            fs::write(m.path("d/sub/new"), "n").unwrap();
            fs::write(m.path("e/new"), "n").unwrap();
            for d in ["d", "d/sub", "e", ""] {
                let bad = dino_mismatches(&m.path(d));
                assert!(
                    bad.is_empty(),
                    "{mode}: {d}: {} of them: {bad:?}",
                    bad.len()
                );
            }
            m.unmount().unwrap_or_else(|e| panic!("{e}"));
            // A fresh mount lists before anything is looked up.
            let m = Mount::start_args(&dirs, &args).unwrap_or_else(|e| panic!("{e}"));
            for d in ["d", "d/sub", "e", ""] {
                let bad = dino_mismatches(&m.path(d));
                assert!(
                    bad.is_empty(),
                    "{mode}, remounted: {d}: {} of them: {bad:?}",
                    bad.len()
                );
            }
            m.unmount().unwrap_or_else(|e| panic!("{e}"));
        }
    });
}

/// A directory of one lower layer shows that layer's link count; once something in it is
/// copied up it is merged and shows 1 at once, as on kernel overlayfs (QA: the kernel kept
/// the count it had cached until its attribute timeout ran out).
#[test]
fn a_directory_merged_by_a_copy_up_shows_one_link_at_once() {
    use std::os::unix::fs::{MetadataExt, PermissionsExt};
    with_timeout(TIMEOUT, || {
        let lower = vec![dir("d"), dir("d/s1"), dir("d/s2"), file("d/x", "x")];
        let mut seen = Vec::new();
        for kernel in [true, false] {
            let d = Dirs::new(std::slice::from_ref(&lower), &[]);
            let (merged, unmount) = mount_either(&d, kernel);
            let links = |p: &str| fs::metadata(merged.join(p)).unwrap().nlink();
            let before = links("d");
            fs::set_permissions(merged.join("d/x"), fs::Permissions::from_mode(0o600)).unwrap();
            seen.push((before, links("d")));
            unmount();
        }
        assert_eq!(seen[0], (4, 1), "kernel overlayfs");
        assert_eq!(
            seen[1], seen[0],
            "unionfs-rs (left) against kernel overlayfs (right)"
        );
    });
}

/// A listing with attributes (READDIRPLUS: a lookup of each entry) made while a directory of a
/// lower layer is being copied up, its copy already in upper, gives it the number it had, not
/// the copy's own: the copy's number is recorded before the copy shows in upper (review: it
/// was recorded after, and a lookup in between made a second node, and a second kernel inode,
/// for the directory). The copy-up waits in that window (`copyup_window_ms`).
#[test]
fn a_listing_during_a_directory_copy_up_keeps_its_number() {
    use std::os::unix::fs::{DirEntryExt, MetadataExt};
    with_timeout(TIMEOUT, || {
        let lower = vec![dir("d"), file("d/x", "x"), file("y", "y")];
        let dirs = Dirs::new(&[lower], &[]);
        let mut args = Mount::command_args(&dirs, &MountOpts::default());
        args.extend([
            "-o".to_string(),
            "copyup_window_ms=700,readdirplus=on".to_string(),
        ]);
        let m = Mount::start_args(&dirs, &args).unwrap_or_else(|e| panic!("{e}"));
        let before = fs::symlink_metadata(m.path("d")).unwrap().ino();
        let sub = m.path("d/sub");
        let mkdir = std::thread::spawn(move || fs::create_dir(sub));
        std::thread::sleep(std::time::Duration::from_millis(250));
        // The copy of `d` is in upper now (the mkdir in it waits in the window).
        let listed: Vec<(String, u64, u64)> = fs::read_dir(&m.merged)
            .unwrap()
            .map(|e| {
                let e = e.unwrap();
                let st = fs::symlink_metadata(e.path()).unwrap().ino();
                (e.file_name().to_string_lossy().into_owned(), e.ino(), st)
            })
            .collect();
        mkdir.join().unwrap().unwrap();
        let d = listed.iter().find(|(n, _, _)| n == "d").expect("d listed");
        assert_eq!((d.1, d.2), (before, before), "listed during the copy-up");
        assert_eq!(
            fs::symlink_metadata(m.path("d")).unwrap().ino(),
            before,
            "after the copy-up"
        );
        assert!(m.path("d/sub").is_dir() && m.path("d/x").is_file());
        m.unmount().unwrap_or_else(|e| panic!("{e}"));
    });
}
