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
            b.iter(|| {
                let fh = u.opendir(dir.ino).expect("opendir");
                let n = u.readdir(fh, 0).expect("readdir").len();
                u.releasedir(fh);
                n
            })
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
}

criterion_group!(core, benches);
criterion_main!(core);
