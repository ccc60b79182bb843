//! Hot paths of the union core, without FUSE: lookup through N layers, merged readdir of a
//! large directory, getattr. Compare the N=2/8/32 rows: the cost should grow by at most one
//! cached lookup per layer.

use std::ffi::OsStr;
use std::fs;
use std::path::Path;

use criterion::{BenchmarkId, Criterion, criterion_group, criterion_main};
use unionfs_rs::union::{Options, ROOT_INO, Union};

fn build(root: &Path, layers: usize, files: usize) -> Union {
    let mut lowers = Vec::new();
    for i in 0..layers {
        let l = root.join(format!("l{i}"));
        fs::create_dir_all(l.join("dir")).expect("mkdir");
        // The file being looked up lives in the bottom layer.
        if i == layers - 1 {
            fs::write(l.join("dir").join("target"), b"x").expect("write");
            for f in 0..files {
                fs::write(l.join("dir").join(format!("f{f}")), b"").expect("write");
            }
        }
        lowers.push(l);
    }
    let upper = root.join("upper");
    let work = root.join("work");
    fs::create_dir_all(&upper).expect("mkdir");
    fs::create_dir_all(&work).expect("mkdir");
    Union::new(&Options {
        lowers,
        upper: Some(upper),
        workdir: Some(work),
        ..Options::default()
    })
    .expect("union")
}

fn benches(c: &mut Criterion) {
    let mut g = c.benchmark_group("lookup_bottom_layer");
    for n in [2usize, 8, 32] {
        let tmp = tempfile::tempdir().expect("tempdir");
        let u = build(tmp.path(), n, 0);
        let dir = u.lookup(ROOT_INO, OsStr::new("dir")).expect("lookup dir");
        g.bench_with_input(BenchmarkId::from_parameter(n), &n, |b, _| {
            b.iter(|| {
                let a = u.lookup(dir.ino, OsStr::new("target")).expect("lookup");
                u.forget(a.ino, 1);
            })
        });
    }
    g.finish();

    let mut g = c.benchmark_group("readdir_merge");
    g.sample_size(20);
    for files in [1000usize, 10_000] {
        let tmp = tempfile::tempdir().expect("tempdir");
        let u = build(tmp.path(), 2, files);
        let dir = u.lookup(ROOT_INO, OsStr::new("dir")).expect("lookup dir");
        g.bench_with_input(BenchmarkId::from_parameter(files), &files, |b, _| {
            b.iter(|| u.readdir(dir.ino, 0).expect("readdir").0.len())
        });
    }
    g.finish();

    let tmp = tempfile::tempdir().expect("tempdir");
    let u = build(tmp.path(), 2, 0);
    let dir = u.lookup(ROOT_INO, OsStr::new("dir")).expect("lookup dir");
    let f = u.lookup(dir.ino, OsStr::new("target")).expect("lookup");
    c.bench_function("getattr_lower_file", |b| {
        b.iter(|| u.getattr(f.ino, None).expect("getattr"))
    });

    // Open and release a file with 1 or 5,000 names (hard links, as package stores make):
    // the cost must not grow with the number of names.
    let mut g = c.benchmark_group("open_release_of_a_file_with_n_names");
    for names in [1usize, 5_000] {
        let tmp = tempfile::tempdir().expect("tempdir");
        let u = build(tmp.path(), 2, 0);
        let dir = u.lookup(ROOT_INO, OsStr::new("dir")).expect("lookup dir");
        let f = u.lookup(dir.ino, OsStr::new("target")).expect("lookup");
        for i in 1..names {
            u.link(f.ino, dir.ino, OsStr::new(&format!("n{i}")))
                .expect("link");
        }
        g.bench_with_input(BenchmarkId::from_parameter(names), &names, |b, _| {
            b.iter(|| {
                let fh = u.open(f.ino, libc::O_RDONLY).expect("open");
                u.release(fh);
            })
        });
    }
    g.finish();

    // Open and release one upper file while 0 or 10,000 other handles are open (a daemon of a
    // database or a build holds many): a release must not cost more with more files open.
    let mut g = c.benchmark_group("open_release_among_open_handles");
    // As many descriptors as allowed (the daemon raises its own limit the same way).
    use nix::sys::resource::{Resource, getrlimit, setrlimit};
    let (_, hard) = getrlimit(Resource::RLIMIT_NOFILE).expect("getrlimit");
    let _ = setrlimit(Resource::RLIMIT_NOFILE, hard, hard);
    let many = 10_000.min(hard.saturating_sub(256) as usize);
    // Held on other files, or all on the file opened and released (O(1) per release too).
    for (held, same) in [(0usize, false), (many, false), (many, true)] {
        let tmp = tempfile::tempdir().expect("tempdir");
        let u = build(tmp.path(), 2, 0);
        // With the page cache, as mounts have by default (a last close settles its pages).
        let u = {
            drop(u);
            Union::new(&Options {
                lowers: vec![tmp.path().join("l0"), tmp.path().join("l1")],
                upper: Some(tmp.path().join("upper")),
                workdir: Some(tmp.path().join("work")),
                cache: Some(unionfs_rs::cache::CacheConfig::default()),
                ..Options::default()
            })
            .expect("union")
        };
        let dir = u.lookup(ROOT_INO, OsStr::new("dir")).expect("lookup dir");
        let f = u.lookup(dir.ino, OsStr::new("target")).expect("lookup");
        // Copied up by an open for writing, so its handles are upper ones.
        let first = u.open(f.ino, libc::O_RDWR).expect("open");
        let upper = tmp.path().join("upper/dir/target");
        let handles: Vec<u64> = (0..held)
            .map(|_| {
                let fd = fs::File::open(&upper).expect("open upper");
                let on = if same { f.ino } else { f.ino + 1 + held as u64 };
                u.add_handle(on, fd.into(), false, true)
            })
            .collect();
        let id = if same {
            format!("{held}_on_the_same_file")
        } else {
            held.to_string()
        };
        g.bench_with_input(BenchmarkId::from_parameter(id), &held, |b, _| {
            b.iter(|| {
                let fh = u.open(f.ino, libc::O_RDONLY).expect("open");
                u.release(fh);
            })
        });
        for h in handles {
            u.release(h);
        }
        u.release(first);
    }
    g.finish();
}

/// The quota's hot path: a 4 KiB append through the union with and without a quota, and the
/// bare reserve + settle of the counters.
fn quota_benches(c: &mut Criterion) {
    use unionfs_rs::quota::{Limits, Quota};
    use unionfs_rs::union::Caller;
    use unionfs_rs::union::charge::QuotaConfig;
    use unionfs_rs::union::dir::NewKind;

    let q = Quota::new(
        Limits {
            bhard: u64::MAX / 2,
            ..Limits::default()
        },
        0,
        0,
        (None, None),
        nix::errno::Errno::ENOSPC,
        None,
    );
    c.bench_function("quota_reserve_settle", |b| {
        b.iter(|| {
            q.reserve_bytes(4096).expect("reserve");
            q.adjust_bytes(-4096);
        })
    });

    let mut g = c.benchmark_group("write_4k_append");
    for with_quota in [false, true] {
        let tmp = tempfile::tempdir().expect("tempdir");
        let root = tmp.path();
        for d in ["l", "u", "w"] {
            fs::create_dir_all(root.join(d)).expect("mkdir");
        }
        let u = Union::new(&Options {
            lowers: vec![root.join("l")],
            upper: Some(root.join("u")),
            workdir: Some(root.join("w")),
            quota: with_quota.then(|| QuotaConfig {
                limits: Some(Limits {
                    bhard: 1 << 40,
                    ..Limits::default()
                }),
                edquot: false,
            }),
            ..Options::default()
        })
        .expect("union");
        let who = Caller {
            uid: 0,
            gid: 0,
            pid: 0,
        };
        let (a, fd) = u
            .create_node(
                ROOT_INO,
                OsStr::new("f"),
                NewKind::File {
                    flags: libc::O_WRONLY,
                },
                0o644,
                0,
                who,
            )
            .expect("create");
        let fh = u.add_handle(a.ino, fd.expect("fd"), true, true);
        let buf = vec![7u8; 4096];
        let mut off = 0u64;
        let name = if with_quota { "quota" } else { "no_quota" };
        g.bench_function(name, |b| {
            b.iter(|| {
                if off >= 256 << 20 {
                    u.setattr(
                        a.ino,
                        &unionfs_rs::union::file::SetAttr {
                            size: Some(0),
                            ..Default::default()
                        },
                    )
                    .expect("truncate");
                    off = 0;
                }
                let n = u.write(fh, off, &buf).expect("write");
                off += n as u64;
            })
        });
    }
    g.finish();
}

/// The page cache's own paths: a 128 KiB read served from cached pages (hit), one that must
/// read the file (miss, readahead off so each iteration reads), and a 128 KiB write landing as
/// dirty pages (the flusher writes them behind; the budget keeps dirty data bounded).
fn cache_benches(c: &mut Criterion) {
    use std::os::fd::OwnedFd;
    use std::sync::Arc;
    use unionfs_rs::cache::{CacheConfig, PageCache, RaState};
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("data");
    fs::write(&path, vec![7u8; 64 << 20]).expect("write");
    let open = || -> Arc<OwnedFd> {
        Arc::new(OwnedFd::from(
            fs::OpenOptions::new()
                .read(true)
                .write(true)
                .open(&path)
                .expect("open"),
        ))
    };
    let mut g = c.benchmark_group("page_cache");
    g.throughput(criterion::Throughput::Bytes(128 << 10));
    let cache = PageCache::new(CacheConfig::default(), None).expect("cache");
    let fd = open();
    let ra = parking_lot::Mutex::new(RaState::default());
    cache.read(1, &ra, &fd, 0, 128 << 10).expect("warm");
    g.bench_function("read_128k_hit", |b| {
        b.iter(|| cache.read(1, &ra, &fd, 0, 128 << 10).expect("read"))
    });
    let cold = PageCache::new(
        CacheConfig {
            size: 64 << 10,
            readahead_kb: 0,
            ..CacheConfig::default()
        },
        None,
    )
    .expect("cache");
    let mut off = 0u64;
    g.bench_function("read_128k_miss", |b| {
        b.iter(|| {
            // Walk the file so every read misses (the budget holds 16 pages).
            off = (off + (128 << 10)) % (64 << 20);
            cold.read(2, &ra, &fd, off, 128 << 10).expect("read")
        })
    });
    // The same reads without the cache, for comparison.
    let mut poff = 0u64;
    g.bench_function("pread_128k_no_cache", |b| {
        b.iter(|| {
            poff = (poff + (128 << 10)) % (64 << 20);
            let mut v = vec![0u8; 128 << 10];
            nix::sys::uio::pread(&*fd, &mut v, poff as i64).expect("pread")
        })
    });
    let buf = vec![3u8; 128 << 10];
    let mut woff = 0u64;
    g.bench_function("write_128k_dirty", |b| {
        b.iter(|| {
            woff = (woff + (128 << 10)) % (64 << 20);
            cache.write(3, &fd, woff, &buf).expect("write")
        })
    });
    g.finish();
    cache.sync_all().expect("sync");

    // A database's pattern: one 4 KiB page rewritten and synced in a file whose other pages
    // (64 MiB, 16k of them) are cached clean. What a sync costs should not grow with them.
    let mut g = c.benchmark_group("page_cache_fsync");
    let big = PageCache::new(CacheConfig::default(), None).expect("cache");
    for off in (0..64u64 << 20).step_by(1 << 20) {
        big.read(4, &ra, &fd, off, 1 << 20).expect("fill");
    }
    let page = vec![5u8; 4096];
    let mut k = 0u64;
    g.bench_function("write_4k_fsync_among_16k_cached_pages", |b| {
        b.iter(|| {
            k = (k + 4099) % (16 << 10);
            big.write(4, &fd, k * 4096, &page).expect("write");
            big.sync_file(4).expect("sync")
        })
    });
    g.finish();
}

criterion_group!(core, benches, quota_benches, cache_benches);
criterion_main!(core);
