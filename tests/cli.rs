//! The command-line contract: bad input is refused with exit code 2, one line on stderr and no
//! change on disk; mount returns once the mount is live; every way of unmounting makes the daemon
//! exit; the alternative invocation forms work; and a security property of open files.

mod common;

use common::*;
use std::fs;
use std::os::unix::fs::{MetadataExt, OpenOptionsExt, PermissionsExt};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

fn run_bin(args: &[&str]) -> (i32, String, String) {
    let (st, out, err) = run_with_timeout(Command::new(bin()).args(args), Duration::from_secs(20))
        .unwrap_or_else(|e| panic!("{e}"));
    (st.code().unwrap_or(-1), out, err)
}

#[test]
fn version_exits_zero() {
    let (code, out, err) = run_bin(&["--version"]);
    assert_eq!(code, 0, "stderr: {err}");
    assert!(
        out.contains(env!("CARGO_PKG_VERSION")),
        "--version should print the version: {out:?}"
    );
}

// ---------------------------------------------------------------------------------------------
// Bad input
// ---------------------------------------------------------------------------------------------

/// A tmpfs mounted for the duration of a test (a filesystem surely different from /var/tmp).
struct Tmpfs(PathBuf);

impl Tmpfs {
    fn new(at: &Path) -> Tmpfs {
        fs::create_dir_all(at).unwrap();
        let (st, o, e) = run_with_timeout(
            Command::new("mount")
                .args(["-t", "tmpfs", "-o", "size=16m", "unionfs-test"])
                .arg(at),
            Duration::from_secs(10),
        )
        .unwrap();
        assert!(st.success(), "mount tmpfs: {o}{e}");
        Tmpfs(at.to_path_buf())
    }
}

impl Tmpfs {
    /// A bind mount of `src` at `at` instead (the same guard).
    fn bind(src: &Path, at: &Path) -> Tmpfs {
        fs::create_dir_all(at).unwrap();
        let (st, o, e) = run_with_timeout(
            Command::new("mount").arg("--bind").arg(src).arg(at),
            Duration::from_secs(10),
        )
        .unwrap();
        assert!(st.success(), "mount --bind: {o}{e}");
        Tmpfs(at.to_path_buf())
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = run_with_timeout(
            Command::new("umount").arg("-l").arg(&self.0),
            Duration::from_secs(10),
        );
    }
}

/// Set up dirs in a fresh tempdir, let `prepare` adjust them and return the arguments, run the
/// binary, and check the bad-input contract.
fn refused(name: &str, prepare: impl FnOnce(&Dirs) -> (Vec<String>, Option<Tmpfs>)) {
    let dirs = Dirs::new(&[vec![file("f", "lower")], vec![dir("d")]], &[]);
    let (args, tmpfs) = prepare(&dirs);
    let before = snapshot(&dirs.root, &SnapOpts::exact());
    let argv: Vec<&str> = args.iter().map(|s| s.as_str()).collect();
    let (code, out, err) = run_bin(&argv);
    let after = snapshot(&dirs.root, &SnapOpts::exact());
    let leftover_mount = is_mounted(&dirs.merged);
    let daemons = daemon_pids(&dirs.root);
    // Clean up before asserting, in case the binary mounted something after all.
    if leftover_mount {
        let _ = run_with_timeout(
            Command::new("umount").arg("-l").arg(&dirs.merged),
            Duration::from_secs(10),
        );
    }
    for p in &daemons {
        unsafe {
            libc::kill(*p, libc::SIGKILL);
        }
    }
    drop(tmpfs);
    assert_eq!(
        code,
        2,
        "{name}: `unionfs-rs {}` must exit 2; got {code}\nstdout: {out}\nstderr: {err}",
        args.join(" ")
    );
    let lines: Vec<&str> = err.trim_end().lines().collect();
    assert!(
        lines.len() == 1 && !lines[0].trim().is_empty(),
        "{name}: expected exactly one line on stderr, got {err:?}"
    );
    assert!(!leftover_mount, "{name}: something was mounted");
    assert!(
        daemons.is_empty(),
        "{name}: daemon left running: {daemons:?}"
    );
    assert_same_tree(
        &format!("{name}: nothing may change on disk"),
        "before",
        &before,
        "after",
        &after,
    );
}

fn s(p: &Path) -> String {
    p.to_str().unwrap().to_string()
}

/// The standard mount arguments of `d`, then `extra`.
fn with_args(d: &Dirs, extra: &[&str]) -> Vec<String> {
    let mut a = std_args(&d.lowerdir_arg(), &d.upper, &d.merged, &d.work);
    a.extend(extra.iter().map(|x| x.to_string()));
    a
}

fn std_args(lowers: &str, upper: &Path, merged: &Path, work: &Path) -> Vec<String> {
    vec![
        "mount".into(),
        lowers.into(),
        s(upper),
        s(merged),
        "--workdir".into(),
        s(work),
    ]
}

#[test]
fn bad_input_is_refused_without_side_effects() {
    with_timeout(120, || {
        refused("missing lower", |d| {
            let l = format!("{}:{}", s(&d.root.join("nolower")), d.lowerdir_arg());
            (std_args(&l, &d.upper, &d.merged, &d.work), None)
        });
        refused("missing upper", |d| {
            (
                std_args(
                    &d.lowerdir_arg(),
                    &d.root.join("noupper"),
                    &d.merged,
                    &d.work,
                ),
                None,
            )
        });
        refused("missing merged", |d| {
            (
                std_args(
                    &d.lowerdir_arg(),
                    &d.upper,
                    &d.root.join("nomerged"),
                    &d.work,
                ),
                None,
            )
        });
        refused("merged is a file", |d| {
            let f = d.root.join("merged-file");
            fs::write(&f, "x").unwrap();
            (std_args(&d.lowerdir_arg(), &d.upper, &f, &d.work), None)
        });
        refused("upper inside a lower", |d| {
            let u = d.lowers[0].join("u");
            fs::create_dir(&u).unwrap();
            (std_args(&d.lowerdir_arg(), &u, &d.merged, &d.work), None)
        });
        refused("merged inside upper", |d| {
            let m = d.upper.join("m");
            fs::create_dir(&m).unwrap();
            (std_args(&d.lowerdir_arg(), &d.upper, &m, &d.work), None)
        });
        refused("workdir inside upper", |d| {
            let w = d.upper.join("w");
            fs::create_dir(&w).unwrap();
            (std_args(&d.lowerdir_arg(), &d.upper, &d.merged, &w), None)
        });
        refused("lower is upper", |d| {
            let l = s(&d.upper);
            (std_args(&l, &d.upper, &d.merged, &d.work), None)
        });
        refused("workdir on another filesystem", |d| {
            let t = Tmpfs::new(&d.root.join("tmpfs"));
            let w = t.0.join("work");
            fs::create_dir(&w).unwrap();
            assert_ne!(
                lstat(&w).dev(),
                lstat(&d.upper).dev(),
                "test setup: tmpfs must differ"
            );
            (
                std_args(&d.lowerdir_arg(), &d.upper, &d.merged, &w),
                Some(t),
            )
        });
        refused("log file inside the upper dir", |d| {
            let mut a = std_args(&d.lowerdir_arg(), &d.upper, &d.merged, &d.work);
            a.extend(["--log-file".into(), s(&d.upper.join("daemon.log"))]);
            (a, None)
        });
        refused("log file under the mount point", |d| {
            let mut a = std_args(&d.lowerdir_arg(), &d.upper, &d.merged, &d.work);
            a.extend([
                "-o".into(),
                format!("log_file={}", s(&d.merged.join("x.log"))),
            ]);
            (a, None)
        });
        refused("log file in a missing directory", |d| {
            let mut a = std_args(&d.lowerdir_arg(), &d.upper, &d.merged, &d.work);
            a.extend(["--log-file".into(), s(&d.root.join("nodir/daemon.log"))]);
            (a, None)
        });
        refused("redirect_dir with a bad value", |d| {
            (with_args(d, &["-o", "redirect_dir=sometimes"]), None)
        });
        // The same directories by another path (a bind mount): overlaps all the same.
        refused("upper is a lower, bind-mounted", |d| {
            let b = Tmpfs::bind(&d.lowers[0], &d.root.join("bind"));
            (
                std_args(&d.lowerdir_arg(), &b.0, &d.merged, &d.work),
                Some(b),
            )
        });
        refused("workdir inside a lower, bind-mounted", |d| {
            fs::create_dir(d.lowers[0].join("wd")).unwrap();
            let b = Tmpfs::bind(&d.lowers[0], &d.root.join("bind"));
            let w = b.0.join("wd");
            (
                std_args(&d.lowerdir_arg(), &d.upper, &d.merged, &w),
                Some(b),
            )
        });
        refused("one lower twice, once bind-mounted", |d| {
            let b = Tmpfs::bind(&d.lowers[1], &d.root.join("bind"));
            let l = format!("{}:{}", d.lowerdir_arg(), s(&b.0));
            (std_args(&l, &d.upper, &d.merged, &d.work), Some(b))
        });
        refused("one lower twice", |d| {
            let l = format!("{}:{}", d.lowerdir_arg(), s(&d.lowers[0]));
            (std_args(&l, &d.upper, &d.merged, &d.work), None)
        });
        refused("overlapping uid mapping ranges", |d| {
            (with_args(d, &["-o", "uidmapping=0:100:10:5:200:10"]), None)
        });
        refused("squash to the invalid id", |d| {
            (with_args(d, &["-o", "squash_to_uid=4294967295"]), None)
        });
        refused("threads out of range", |d| {
            (with_args(d, &["--threads", "20000"]), None)
        });
        refused("no threads", |d| (with_args(d, &["-o", "threads=0"]), None));
        refused("metacopy with a bad value", |d| {
            (with_args(d, &["-o", "metacopy=yes"]), None)
        });
        refused("metacopy with redirects not followed", |d| {
            (
                with_args(d, &["-o", "metacopy=on,redirect_dir=nofollow"]),
                None,
            )
        });
        // Links planted in the daemon's bookkeeping dir (a root daemon writes there): never
        // followed; the victims are inside the test's tree, which must not change.
        refused("workdir/unionfs is a symlink", |d| {
            fs::create_dir(d.root.join("victim-dir")).unwrap();
            std::os::unix::fs::symlink(d.root.join("victim-dir"), d.work.join("unionfs")).unwrap();
            (
                std_args(&d.lowerdir_arg(), &d.upper, &d.merged, &d.work),
                None,
            )
        });
        // A workdir used before (its work/ there) or not: what is in the workdir is checked
        // before anything is made there (QA: a refusal for a planted inomap link left a new
        // work/ behind, one for work/ a new unionfs/).
        for (hard, used) in [(false, true), (true, true), (false, false), (true, false)] {
            let what = if hard { "a hard link" } else { "a symlink" };
            let when = if used { "" } else { ", no work/ yet" };
            refused(&format!("workdir/unionfs/inomap is {what}{when}"), |d| {
                let (victim, at) = (d.root.join("victim"), d.work.join("unionfs/inomap"));
                fs::write(&victim, "untouched").unwrap();
                if used {
                    fs::create_dir_all(d.work.join("work")).unwrap();
                }
                fs::create_dir(d.work.join("unionfs")).unwrap();
                if hard {
                    fs::hard_link(&victim, &at).unwrap();
                } else {
                    std::os::unix::fs::symlink(&victim, &at).unwrap();
                }
                (with_args(d, &[]), None)
            });
        }
        refused("workdir/work is a file", |d| {
            fs::write(d.work.join("work"), "a file").unwrap();
            (with_args(d, &[]), None)
        });
        refused("workdir/work is a symlink", |d| {
            fs::create_dir(d.root.join("victim-dir")).unwrap();
            std::os::unix::fs::symlink(d.root.join("victim-dir"), d.work.join("work")).unwrap();
            (with_args(d, &[]), None)
        });
        // Anyone else who may write in work/ can swap the daemon's whiteout or a copy-up's
        // scratch file for a link to a file of theirs, which the daemon then renames into upper
        // (a QA run got a file of `nobody`'s, still theirs to edit, in root's merged view).
        refused("workdir/work writable by others", |d| {
            fs::create_dir(d.work.join("work")).unwrap();
            fs::set_permissions(d.work.join("work"), fs::Permissions::from_mode(0o777)).unwrap();
            (with_args(d, &[]), None)
        });
        refused("workdir/work owned by another user", |d| {
            fs::create_dir(d.work.join("work")).unwrap();
            fs::set_permissions(d.work.join("work"), fs::Permissions::from_mode(0o700)).unwrap();
            std::os::unix::fs::chown(d.work.join("work"), Some(65534), Some(65534)).unwrap();
            (with_args(d, &[]), None)
        });
        refused("workdir/work/incompat present", |d| {
            fs::create_dir_all(d.work.join("work/incompat")).unwrap();
            fs::write(d.work.join("work/incompat/x"), "").unwrap();
            (
                std_args(&d.lowerdir_arg(), &d.upper, &d.merged, &d.work),
                None,
            )
        });
    });
}

/// The config file's errors name the file (and the key): one named by `$UNIONFS_RS_CONFIG`
/// must exist, and a bad value in it is not reported as if the caller had given it.
#[test]
fn config_file_errors_name_the_file() {
    with_timeout(60, || {
        let d = simple_dirs();
        let opts = format!(
            "lowerdir={},upperdir={},workdir={}",
            d.lowerdir_arg(),
            s(&d.upper),
            s(&d.work)
        );
        let run = |conf: &Path| {
            let out = Command::new(bin())
                .env("UNIONFS_RS_CONFIG", conf)
                .args(["-o", &opts, &s(&d.merged)])
                .output()
                .unwrap();
            let mounted = is_mounted(&d.merged);
            if mounted {
                let _ = Command::new("umount").arg("-l").arg(&d.merged).status();
            }
            assert!(!mounted, "mounted despite {}", conf.display());
            (
                out.status.code(),
                String::from_utf8_lossy(&out.stderr).into_owned(),
            )
        };
        let missing = d.root.join("no.conf");
        let (code, err) = run(&missing);
        assert_eq!(code, Some(2), "{err}");
        assert!(err.contains(&s(&missing)), "{err}");
        let bad = d.root.join("bad.conf");
        fs::write(&bad, "mount_program_options = size=abc\n").unwrap();
        let (code, err) = run(&bad);
        assert_eq!(code, Some(2), "{err}");
        assert!(
            err.contains(&s(&bad)) && err.contains("mount_program_options"),
            "{err}"
        );
    });
}

/// Usage errors follow the same contract (exit 2, one line on stderr, nothing touched).
#[test]
fn usage_errors_are_one_line() {
    with_timeout(60, || {
        refused("no arguments", |_| (vec![], None));
        refused("mount without directories", |_| {
            (vec!["mount".into()], None)
        });
        refused("unknown option", |d| {
            let mut a = std_args(&d.lowerdir_arg(), &d.upper, &d.merged, &d.work);
            a.push("--no-such-option".into());
            (a, None)
        });
    });
}

/// A setting given both as a flag (or argument) and in `-o`, with different effects, is
/// refused whichever comes first (QA: `--cache-size 64M -o cache_size=1G` mounted with 1G
/// without a word). The same value both ways is fine (also a path written another way, and
/// `-o` whose last occurrence agrees), an empty flag value is refused as in `-o`, and flags
/// still win over the config file's default options. Cache settings that do not do what they
/// say are warned of once the mount is accepted, not before a refusal.
#[test]
fn a_setting_given_twice_differently_is_refused() {
    with_timeout(120, || {
        for (extra, flag, opt) in [
            (
                &["--cache-size", "64M", "-o", "cache_size=1G"][..],
                "--cache-size \"64M\"",
                "-o cache_size=1G",
            ),
            (
                &["-o", "dirty_bytes=1M", "--dirty-ratio", "30"],
                "--dirty-ratio \"30\"",
                "-o dirty_bytes=1M",
            ),
            (
                &["--size", "1G", "-o", "noaufs,bhard=2G"],
                "--size \"1G\"",
                "-o bhard=2G",
            ),
            (
                &["--aufs-whiteouts", "-o", "noaufs"],
                "--aufs-whiteouts",
                "-o noaufs",
            ),
            (
                &["--passthrough", "off", "-o", "passthrough=lower"],
                "--passthrough \"off\"",
                "-o passthrough=lower",
            ),
            (&["-o", "lowerdir=/tmp"], "LOWERS ", "-o lowerdir=/tmp"),
            (
                &["--threads", "2", "-o", "threads=2,threads=3"],
                "--threads \"2\"",
                "-o threads=3",
            ),
            (&["-o", "upperdir=/tmp"], "UPPER ", "-o upperdir=/tmp"),
        ] {
            let name = extra.join(" ");
            refused(&name, |d| (with_args(d, extra), None));
            let d = simple_dirs();
            let args = with_args(&d, extra);
            let (code, _, err) = run_bin(&args.iter().map(String::as_str).collect::<Vec<_>>());
            assert_eq!(code, 2, "{name}: {err}");
            assert!(
                err.contains(flag) && err.contains(opt) && err.contains("conflict"),
                "{name}: {err}"
            );
        }
        // Empty values of value flags are refused, as `-o size=` is (the review: `--size ''`
        // mounted without a quota once flags went through the -o parser).
        for extra in [
            &["--size", ""][..],
            &["--passthrough", ""],
            &["--uring", ""],
        ] {
            refused(&extra.join(" "), |d| (with_args(d, extra), None));
        }
        // Agreeing: the same value, the same path written another way, -o's last word.
        let d = simple_dirs();
        let work_slash = format!("workdir={}/", s(&d.work));
        let lowers_in_o = format!("lowerdir={}", d.lowerdir_arg());
        for extra in [
            &["--cache-size", "64M", "-o", "cache_size=65536K"][..],
            &["--threads", "2", "-o", "threads=3,threads=2"],
            &["--aufs-whiteouts", "-o", "aufs,noaufs,aufs"],
            &["-o", &work_slash],
        ] {
            let m = mount_strict(&d, &with_args(&d, extra));
            m.unmount().expect("unmount");
        }
        let (code, out, err) = run_bin(&["stats", &s(&d.merged)]);
        assert_ne!(code, 0, "still mounted: {out}{err}");
        // The layers in -o only (an empty LOWERS argument).
        let mut a = std_args("", &d.upper, &d.merged, &d.work);
        a.extend(["-o".to_string(), lowers_in_o]);
        let m = mount_strict(&d, &a);
        let (code, out, err) = run_bin(&["stats", &s(&d.merged)]);
        assert_eq!(code, 0, "{err}");
        m.unmount().expect("unmount");
        let _ = out;
        // A warning once the mount is accepted; none when it is refused (one line).
        let (code, _, err) = run_bin(
            &with_args(
                &d,
                &["--cache-size", "64M", "--dirty-background-ratio", "30"],
            )
            .iter()
            .map(String::as_str)
            .collect::<Vec<_>>(),
        );
        let m = Mount::adopt_existing(&d);
        assert_eq!(code, 0, "{err}");
        assert!(
            err.contains("warning: dirty_background_ratio 30 (20132659 bytes) is not below"),
            "{err}"
        );
        let (code, out, err) = run_bin(&["stats", &s(&d.merged)]);
        assert_eq!(code, 0, "{err}");
        assert!(out.contains("\ncache_size: 67108864\n"), "{out}");
        assert!(out.contains("\nbg_thresh_bytes: 6710886\n"), "{out}");
        m.unmount().expect("unmount");
        refused("a warning-worthy setting on a refused mount", |d| {
            let l = format!("{}:{}", s(&d.root.join("nolower")), d.lowerdir_arg());
            let mut a = std_args(&l, &d.upper, &d.merged, &d.work);
            a.extend(["--dirty-background-ratio".into(), "30".into()]);
            (a, None)
        });
        // The config file's default options give way to flags.
        let conf = d.root.join("u.conf");
        fs::write(&conf, "default_options = cache_size=32M,noaufs\n").unwrap();
        let (st, _, err) = run_with_timeout(
            Command::new(bin())
                .env("UNIONFS_RS_CONFIG", &conf)
                .args(with_args(&d, &["--cache-size", "48M", "--aufs-whiteouts"])),
            MOUNT_CMD_TIMEOUT,
        )
        .unwrap_or_else(|e| panic!("{e}"));
        let m = Mount::adopt_existing(&d);
        assert!(st.success(), "{err}");
        let (_, out, _) = run_bin(&["stats", &s(&d.merged)]);
        assert!(out.contains("\ncache_size: 50331648\n"), "{out}");
        m.unmount().expect("unmount");
    });
}

// ---------------------------------------------------------------------------------------------
// Mounting and unmounting
// ---------------------------------------------------------------------------------------------

fn simple_dirs() -> Dirs {
    Dirs::new(
        &[
            vec![file("f", "top lower"), file_mode("private", "p", 0o600)],
            vec![file("f", "bottom lower"), file("g", "g")],
        ],
        &[],
    )
}

/// Run the mount command and check that the mount is live the moment it returns.
fn mount_strict(dirs: &Dirs, args: &[String]) -> Mount {
    let (st, out, err) = run_with_timeout(Command::new(bin()).args(args), MOUNT_CMD_TIMEOUT)
        .unwrap_or_else(|e| panic!("{e}"));
    let live = is_fuse_mounted(&dirs.merged);
    // Adopt whatever is there so that it is cleaned up.
    let guard = Mount::adopt_existing(dirs);
    assert!(
        st.success(),
        "`unionfs-rs {}` failed: {st}\n{out}{err}",
        args.join(" ")
    );
    assert!(
        live,
        "mount command returned before the FUSE mount was live (mountinfo: {:?})",
        mount_at(&dirs.merged)
    );
    guard
}

#[test]
fn mount_is_live_on_return_and_umount_subcommand_stops_daemon() {
    with_timeout(60, || {
        let dirs = simple_dirs();
        let mut m = mount_strict(&dirs, &Mount::command_args(&dirs, &MountOpts::default()));
        let info = mount_at(&dirs.merged).unwrap();
        assert!(
            info.fstype.starts_with("fuse"),
            "fstype {} is not FUSE",
            info.fstype
        );
        for opt in ["default_permissions", "allow_other"] {
            assert!(
                info.super_opts.split(',').any(|o| o == opt),
                "mount must use {opt}: {}",
                info.super_opts
            );
        }
        assert_eq!(fs::read_to_string(m.path("f")).unwrap(), "top lower");
        fs::write(m.path("new"), "via union").unwrap();
        assert!(m.pid.is_some(), "daemon process not found");
        m.unmount_with(Command::new(bin()).arg("umount").arg(&dirs.merged))
            .unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(
            fs::read_to_string(dirs.upper.join("new")).unwrap(),
            "via union"
        );
    });
}

/// A name that does not exist is asked once (the answer is a negative entry the kernel keeps,
/// as on kernel overlayfs), and the entry gives way to a file or directory made there through
/// the mount and comes back when it is removed; also in a merged lower directory and for a
/// name hidden by a whiteout.
#[test]
fn a_missing_name_is_looked_up_once() {
    with_timeout(60, || {
        let dirs = Dirs::new(&[vec![file("d/lower", "l"), file("gone", "g")]], &[]);
        let log = dirs.root.join("daemon.log");
        let opts = MountOpts {
            extra: vec!["--debug".into(), "--log-file".into(), s(&log)],
            ..MountOpts::default()
        };
        let m = Mount::start(&dirs, &opts).unwrap_or_else(|e| panic!("{e}"));
        let missing = |p: &str| {
            for _ in 0..5 {
                let e = fs::symlink_metadata(m.path(p)).expect_err(p);
                assert_eq!(e.raw_os_error(), Some(libc::ENOENT), "{p}");
            }
        };
        missing("nothere");
        missing("d/nothere");
        fs::remove_file(m.path("gone")).unwrap();
        missing("gone");
        // Made through the mount: there at once; removed: missing again.
        fs::write(m.path("nothere"), "now").unwrap();
        assert_eq!(fs::read_to_string(m.path("nothere")).unwrap(), "now");
        fs::create_dir(m.path("d/nothere")).unwrap();
        assert!(m.path("d/nothere").is_dir());
        fs::write(m.path("gone"), "back").unwrap();
        assert_eq!(fs::read_to_string(m.path("gone")).unwrap(), "back");
        fs::remove_file(m.path("nothere")).unwrap();
        fs::remove_dir(m.path("d/nothere")).unwrap();
        missing("nothere");
        missing("d/nothere");
        let dirs = m.dirs.clone();
        m.unmount().expect("unmount");
        let text = fs::read_to_string(dirs.root.join("daemon.log")).unwrap();
        let asked = |n: &str| {
            text.lines()
                .filter(|l| l.contains(&format!("LOOKUP name \"{n}\"")))
                .count()
        };
        // Five stats per round: at most one LOOKUP per round (the kernel asks again after an
        // unlink and before a create, whose negative entries it does not trust), where each
        // stat would be one without the negative entries (20 for "nothere").
        assert!(
            asked("nothere") <= 6,
            "{} LOOKUPs of nothere:\n{text}",
            asked("nothere")
        );
        assert!(
            asked("gone") <= 3,
            "{} LOOKUPs of gone:\n{text}",
            asked("gone")
        );
    })
}

/// `--log-file`: the background daemon's log (which otherwise goes nowhere) lands in the file,
/// with timestamps, from mount to the drain on SIGTERM; the caller's stderr stays quiet.
#[test]
fn log_file_receives_the_daemon_log() {
    with_timeout(60, || {
        let dirs = simple_dirs();
        let log = dirs.root.join("daemon.log");
        let mut args = Mount::command_args(&dirs, &MountOpts::default());
        args.extend(["--log-file".into(), s(&log)]);
        let (st, out, err) = run_with_timeout(Command::new(bin()).args(&args), MOUNT_CMD_TIMEOUT)
            .unwrap_or_else(|e| panic!("{e}"));
        let m = Mount::adopt_existing(&dirs);
        assert!(st.success(), "mount failed: {out}{err}");
        assert!(err.is_empty(), "nothing on the caller's stderr: {err:?}");
        fs::write(m.path("new"), "x").unwrap();
        // A shell's `read` asks TCGETS of every file: ENOTTY, and nothing logged for it.
        {
            use std::os::fd::AsRawFd;
            let f = fs::File::open(m.path("new")).unwrap();
            let mut t = std::mem::MaybeUninit::<libc::termios>::uninit();
            // SAFETY: TCGETS writes at most one termios into `t`.
            let r = unsafe { libc::ioctl(f.as_raw_fd(), libc::TCGETS, t.as_mut_ptr()) };
            let e = std::io::Error::last_os_error().raw_os_error();
            assert_eq!((r, e), (-1, Some(libc::ENOTTY)), "TCGETS on a file");
        }
        let pid = m.pid.expect("daemon pid");
        // SAFETY: signalling the daemon this test started.
        unsafe {
            libc::kill(pid, libc::SIGTERM);
        }
        assert!(
            wait_pid_gone(pid, Duration::from_secs(20)),
            "daemon did not exit on SIGTERM"
        );
        let text = fs::read_to_string(&log).unwrap();
        let merged = s(&fs::canonicalize(&dirs.merged).unwrap());
        assert!(
            text.lines()
                .any(|l| l.contains(" INFO: mounted ") && l.ends_with(&merged)),
            "log: {text:?}"
        );
        assert!(
            text.lines().any(|l| l.contains("SIGTERM")),
            "the stop is logged: {text:?}"
        );
        assert!(
            !text.contains("Not Implemented"),
            "no warning per ioctl: {text:?}"
        );
        let first = text.lines().next().unwrap_or("");
        assert!(
            first.len() > 20 && first.as_bytes()[4] == b'-' && first.as_bytes()[19] == b'Z',
            "timestamped: {first:?}"
        );
        assert_eq!(fs::read_to_string(dirs.upper.join("new")).unwrap(), "x");
    });
}

/// Container engines unmount a layer and mount it again at once (podman diff, commit): the new
/// mount waits for the old daemon to let go of the upper dir instead of failing. A second live
/// mount of the same upper is still refused, with a clear error.
#[test]
fn remount_right_after_unmount_and_upper_in_use() {
    with_timeout(120, || {
        let dirs = simple_dirs();
        let args = Mount::command_args(&dirs, &MountOpts::default());
        let argv: Vec<&str> = args.iter().map(String::as_str).collect();
        for i in 0..15 {
            // No guard between the rounds: it would wait for the daemon to exit.
            let (code, _, err) = run_bin(&argv);
            if code != 0 {
                drop(Mount::adopt_existing(&dirs));
                panic!("mount {i} right after an unmount: {err}");
            }
            fs::write(dirs.merged.join(format!("f{i}")), "x").unwrap();
            let (st, _, err) = run_with_timeout(
                Command::new("fusermount3").arg("-u").arg(&dirs.merged),
                Duration::from_secs(20),
            )
            .unwrap();
            assert!(st.success(), "fusermount3 -u: {err}");
        }
        for i in 0..15 {
            assert_eq!(
                fs::read_to_string(dirs.upper.join(format!("f{i}"))).unwrap(),
                "x"
            );
        }
        let m = Mount::start(&dirs, &MountOpts::default()).unwrap_or_else(|e| panic!("{e}"));
        let mkdir = |n: &str| {
            let p = dirs.root.join(n);
            fs::create_dir(&p).unwrap();
            p
        };
        let (other, upper2, work3) = (mkdir("merged2"), mkdir("upper2"), mkdir("work3"));
        // The live mount's arguments with some directories replaced: run, and clear any
        // mount it made at `at`. Returns (exit code, stderr, mounts seen at `at`).
        let attempt = |swap: &[(&Path, &Path)], at: &Path| {
            let mut args = Mount::command_args(&dirs, &MountOpts::default());
            for (from, to) in swap {
                let i = args.iter().position(|a| Path::new(a) == *from).unwrap();
                args[i] = s(to);
            }
            let argv: Vec<&str> = args.iter().map(String::as_str).collect();
            let (code, _, err) = run_bin(&argv);
            let n = count_mounts_at(at);
            let extra = if at == dirs.merged { n - 1 } else { n };
            if extra > 0 {
                let _ = Command::new("umount").arg("-l").arg(at).status();
            }
            (code, err, extra)
        };
        let (code, err, _) = attempt(&[(&dirs.merged, &other)], &other);
        assert_eq!(
            code, 2,
            "a second mount of a live upper must be refused: {err}"
        );
        assert!(err.contains("already in use"), "{err}");
        // Another upper with the live mount's workdir: refused too (its quota state and
        // inode map are that mount's).
        let (code, err, _) = attempt(&[(&dirs.upper, &upper2), (&dirs.merged, &other)], &other);
        assert_eq!(
            code, 2,
            "a second mount of a live workdir must be refused: {err}"
        );
        assert!(
            err.contains("workdir") && err.contains("already in use"),
            "{err}"
        );
        // A mount over the live one (other upper and workdir): refused, it would hide it.
        let (code, err, stacked) = attempt(
            &[(&dirs.upper, &upper2), (&dirs.work, &work3)],
            &dirs.merged,
        );
        assert_eq!(stacked, 0, "a second mount went over the live one");
        assert_eq!(code, 2, "a mount over a live mount must be refused: {err}");
        assert!(err.contains("already a live unionfs-rs mount"), "{err}");
        m.unmount().unwrap_or_else(|e| panic!("{e}"));
    });
}

/// A daemon killed with SIGKILL leaves its mount behind ("Transport endpoint is not
/// connected", or "Software caused connection abort" through io_uring): mounting there again is refused with exit code 2 and a message that says how
/// to clear it; `unionfs-rs umount` clears it, and a new mount serves what was written.
#[test]
fn a_dead_daemons_mount_is_named_and_cleared() {
    with_timeout(60, || {
        let dirs = simple_dirs();
        let args = Mount::command_args(&dirs, &MountOpts::default());
        let argv: Vec<&str> = args.iter().map(String::as_str).collect();
        let m = mount_strict(&dirs, &args);
        fs::write(m.path("kept"), "written before the kill").unwrap();
        let pid = m.pid.expect("daemon process not found");
        // SAFETY: kill(2) of the daemon this test started.
        unsafe {
            libc::kill(pid, libc::SIGKILL);
        }
        let t = Instant::now();
        while Path::new(&format!("/proc/{pid}")).exists() && !is_zombie(pid) {
            assert!(
                t.elapsed() < Duration::from_secs(10),
                "daemon survived SIGKILL"
            );
            std::thread::sleep(Duration::from_millis(10));
        }
        let (code, _, err) = run_bin(&argv);
        if code == 0 {
            drop(Mount::adopt_existing(&dirs));
            panic!("a mount over a dead daemon's mount succeeded");
        }
        assert_eq!(code, 2, "{err}");
        // (ENOTCONN; ECONNABORTED where the connection was served through io_uring. For a
        // few ms after the kill a stat there through io_uring gets ECANCELED: the CLI asks
        // again until the kernel has aborted the connection, as seen in a CI run.)
        assert!(
            (err.contains("not connected") || err.contains("connection abort"))
                && err.contains("unmount it first"),
            "{err}"
        );
        assert_eq!(err.trim_end().lines().count(), 1, "{err}");
        let sock = unionfs_rs::control::socket_path(&dirs.merged.canonicalize().unwrap());
        assert!(sock.exists(), "test setup: the killed daemon's socket");
        let (code, _, err) = run_bin(&["umount", &s(&dirs.merged)]);
        assert_eq!(code, 0, "umount of a dead daemon's mount: {err}");
        assert!(!is_fuse_mounted(&dirs.merged), "still mounted after umount");
        assert!(!sock.exists(), "the killed daemon's socket is left");
        drop(m);
        let m = mount_strict(&dirs, &args);
        assert_eq!(
            fs::read_to_string(m.path("kept")).unwrap(),
            "written before the kill"
        );
        m.unmount().unwrap_or_else(|e| panic!("{e}"));
    });
}

/// A bind mount of the merged dir keeps the file system (and so the daemon) alive after the
/// merged dir itself is unmounted, as does a mount namespace made while it was mounted (the copy
/// of a private mount stays there). `unionfs-rs umount` says where it is still mounted and
/// returns at once instead of waiting a minute for a daemon that has every reason to run on;
/// the daemon serves the other mount point and exits once that is unmounted too.
#[test]
fn umount_names_where_the_file_system_is_still_mounted() {
    struct Unbind(PathBuf);
    impl Drop for Unbind {
        fn drop(&mut self) {
            if is_fuse_mounted(&self.0) {
                let _ = run_with_timeout(
                    Command::new("umount").arg("-l").arg(&self.0),
                    Duration::from_secs(10),
                );
            }
        }
    }
    with_timeout(90, || {
        let dirs = simple_dirs();
        let m = mount_strict(&dirs, &Mount::command_args(&dirs, &MountOpts::default()));
        let pid = m.pid.expect("daemon process not found");
        let other = dirs.root.join("bound");
        fs::create_dir(&other).unwrap();
        let st = Command::new("mount")
            .arg("--bind")
            .arg(&dirs.merged)
            .arg(&other)
            .status()
            .unwrap();
        assert!(st.success(), "mount --bind: {st}");
        let bind = Unbind(other.clone());
        // (run_bin gives up after 20 s; a daemon that does not exit was waited for 60 s.)
        let (code, _, err) = run_bin(&["umount", &s(&dirs.merged)]);
        assert_eq!(code, 0, "{err}");
        assert!(!is_fuse_mounted(&dirs.merged), "still mounted after umount");
        assert!(
            err.contains("still mounted at")
                && err.contains(&other.canonicalize().unwrap().display().to_string())
                && err.contains(&format!("pid {pid}")),
            "{err}"
        );
        assert_eq!(err.trim_end().lines().count(), 1, "{err}");
        assert!(
            !err.contains("bytes of cached data"),
            "waited for the daemon: {err}"
        );
        // It serves the other mount point still, then exits once that goes.
        assert!(!is_zombie(pid) && Path::new(&format!("/proc/{pid}")).exists());
        assert_eq!(fs::read_to_string(other.join("f")).unwrap(), "top lower");
        fs::write(other.join("through the bind"), "b").unwrap();
        let st = Command::new("umount").arg(&other).status().unwrap();
        assert!(st.success(), "umount of the bind mount: {st}");
        drop(bind);
        assert!(
            wait_pid_gone(pid, Duration::from_secs(20)),
            "the daemon did not exit after the last mount point went"
        );
        assert_eq!(
            fs::read_to_string(dirs.upper.join("through the bind")).unwrap(),
            "b"
        );
        drop(m);
    });
}

fn is_zombie(pid: i32) -> bool {
    fs::read_to_string(format!("/proc/{pid}/stat")).is_ok_and(|s| {
        s.rsplit(')')
            .next()
            .is_some_and(|r| r.trim_start().starts_with('Z'))
    })
}

#[test]
fn fusermount_unmount_stops_daemon() {
    with_timeout(60, || {
        let dirs = simple_dirs();
        let mut m = Mount::start(&dirs, &MountOpts::default()).unwrap_or_else(|e| panic!("{e}"));
        assert!(m.pid.is_some(), "daemon process not found");
        m.unmount_retrying(|| {
            let mut c = Command::new("fusermount3");
            c.arg("-u").arg(&dirs.merged);
            c
        })
        .unwrap_or_else(|e| panic!("{e}"));
    });
}

#[test]
fn plain_umount_stops_daemon() {
    with_timeout(60, || {
        let dirs = simple_dirs();
        let mut m = Mount::start(&dirs, &MountOpts::default()).unwrap_or_else(|e| panic!("{e}"));
        assert!(m.pid.is_some(), "daemon process not found");
        m.unmount_retrying(|| {
            let mut c = Command::new("umount");
            c.arg(&dirs.merged);
            c
        })
        .unwrap_or_else(|e| panic!("{e}"));
    });
}

#[test]
fn foreground_mode_blocks_until_unmounted() {
    with_timeout(60, || {
        let dirs = simple_dirs();
        let mut args = Mount::command_args(&dirs, &MountOpts::default());
        args.push("--foreground".into());
        let log = dirs.root.join("fg.log");
        let logf = fs::File::create(&log).unwrap();
        let mut child = Command::new(bin())
            .args(&args)
            .stdin(std::process::Stdio::null())
            .stdout(logf.try_clone().unwrap())
            .stderr(logf)
            .spawn()
            .unwrap();
        let deadline = Instant::now() + Duration::from_secs(20);
        while !is_fuse_mounted(&dirs.merged) {
            if let Some(st) = child.try_wait().unwrap() {
                panic!(
                    "foreground mount exited early ({st}): {}",
                    fs::read_to_string(&log).unwrap_or_default()
                );
            }
            assert!(Instant::now() < deadline, "foreground mount never appeared");
            std::thread::sleep(Duration::from_millis(20));
        }
        let guard = Mount::adopt_existing(&dirs);
        assert_eq!(fs::read_to_string(dirs.merged.join("g")).unwrap(), "g");
        assert!(
            child.try_wait().unwrap().is_none(),
            "--foreground must not return while mounted"
        );
        let (st, o, e) = run_with_timeout(
            Command::new("fusermount3").arg("-u").arg(&dirs.merged),
            Duration::from_secs(10),
        )
        .unwrap();
        assert!(st.success(), "{o}{e}");
        let deadline = Instant::now() + DAEMON_EXIT_TIMEOUT;
        let status = loop {
            if let Some(st) = child.try_wait().unwrap() {
                break st;
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                panic!("foreground daemon did not exit after unmount");
            }
            std::thread::sleep(Duration::from_millis(20));
        };
        assert!(status.success(), "foreground daemon exit status {status}");
        drop(guard);
    });
}

#[test]
fn read_only_union_form() {
    with_timeout(60, || {
        let dirs = simple_dirs();
        let opts = MountOpts {
            readonly: true,
            ..Default::default()
        };
        let m = Mount::start(&dirs, &opts).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(fs::read_to_string(m.path("f")).unwrap(), "top lower");
        assert_eq!(fs::read_to_string(m.path("g")).unwrap(), "g");
        assert_eq!(
            apply(&m.merged, &op_create("new")),
            Err(libc::EROFS),
            "read-only union must refuse writes"
        );
        assert_eq!(apply(&m.merged, &op_append("g", "x")), Err(libc::EROFS));
        m.unmount().unwrap_or_else(|e| panic!("{e}"));
        let upper = snapshot(&dirs.upper, &SnapOpts::exact());
        assert_eq!(upper.nodes.len(), 1, "upper untouched: {upper:?}");
    });
}

#[test]
fn fuse_overlayfs_option_form() {
    with_timeout(60, || {
        let dirs = simple_dirs();
        let args = vec![
            "-o".to_string(),
            format!(
                // Fedora's storage.conf mountopt comes along (with userxattr, as rootless).
                "lowerdir={},upperdir={},workdir={},nodev,metacopy=on,userxattr",
                dirs.lowerdir_arg(),
                dirs.upper.display(),
                dirs.work.display()
            ),
            s(&dirs.merged),
        ];
        let m = mount_strict(&dirs, &args);
        // leftmost lower is on top
        assert_eq!(fs::read_to_string(m.path("f")).unwrap(), "top lower");
        fs::write(m.path("g"), "changed").unwrap();
        m.unmount().unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(fs::read_to_string(dirs.upper.join("g")).unwrap(), "changed");
    });
}

/// With `uidmapping=`/`gidmapping=` the named users and groups of POSIX ACLs go through the
/// mapping like owners: shown mapped, checked by the kernel in mapped ids, stored unmapped, and
/// an id with no disk id refused.
#[test]
fn acl_ids_follow_the_id_mapping() {
    with_timeout(60, || {
        let u = u32::MAX;
        let dirs = Dirs::new(
            &[vec![
                file_mode("f", "secret", 0o600),
                Entry::Xattr {
                    path: "f".into(),
                    name: "system.posix_acl_access".into(),
                    value: acl_bytes(&[
                        (1, 6, u),
                        (2, 4, 1000),
                        (4, 0, u),
                        (0x10, 4, u),
                        (0x20, 0, u),
                    ]),
                },
                file_mode("g", "g", 0o644),
                // A named user no range maps.
                file_mode("h", "h", 0o600),
                Entry::Xattr {
                    path: "h".into(),
                    name: "system.posix_acl_access".into(),
                    value: acl_bytes(&[
                        (1, 6, u),
                        (2, 6, 70000),
                        (4, 0, u),
                        (0x10, 6, u),
                        (0x20, 0, u),
                    ]),
                },
                // ... and one that keeps a user no range maps from reading what others may.
                file_mode("r", "r", 0o644),
                Entry::Xattr {
                    path: "r".into(),
                    name: "system.posix_acl_access".into(),
                    value: acl_bytes(&[
                        (1, 6, u),
                        (2, 0, 70000),
                        (4, 4, u),
                        (0x10, 4, u),
                        (0x20, 4, u),
                    ]),
                },
            ]],
            &[],
        );
        let args = vec![
            "-o".to_string(),
            format!(
                "lowerdir={},upperdir={},workdir={},uidmapping=0:100000:65536,gidmapping=0:100000:65536",
                dirs.lowerdir_arg(),
                dirs.upper.display(),
                dirs.work.display()
            ),
            s(&dirs.merged),
        ];
        let m = mount_strict(&dirs, &args);
        let get = |p: &str| {
            apply(
                &m.merged,
                &Op::GetXattr {
                    path: p.into(),
                    name: "system.posix_acl_access".into(),
                },
            )
        };
        let shown = acl_bytes(&[
            (1, 6, u),
            (2, 4, 101000),
            (4, 0, u),
            (0x10, 4, u),
            (0x20, 0, u),
        ]);
        assert_eq!(get("f"), Ok(shown));
        assert_eq!(
            apply(&m.merged, &as_user(101000, 0o022, op_read("f"))),
            Ok(b"secret".to_vec())
        );
        assert_eq!(
            apply(&m.merged, &as_user(1000, 0o022, op_read("f"))),
            Err(libc::EACCES)
        );
        // Its entry is not shown as the overflow id: that would let nobody in.
        assert_eq!(
            get("h"),
            Ok(acl_bytes(&[
                (1, 6, u),
                (4, 0, u),
                (0x10, 6, u),
                (0x20, 0, u)
            ]))
        );
        assert_eq!(
            apply(&m.merged, &as_user(65534, 0o022, op_read("h"))),
            Err(libc::EACCES)
        );
        let set_on = |path: &str, entries: &[(u16, u16, u32)]| {
            apply(
                &m.merged,
                &Op::SetXattr {
                    path: path.into(),
                    name: "system.posix_acl_access".into(),
                    value: acl_bytes(entries),
                },
            )
        };
        let set = |entries: &[(u16, u16, u32)]| set_on("g", entries);
        // An ACL set through the mount cannot name 70000: where its entry restricts, setting
        // one would lift the restriction on the disk. Refused, nothing copied up; where it
        // restricts nothing (h: 70000 may read and write, others nothing), allowed.
        let plain = [(1, 6, u), (4, 4, u), (0x10, 4, u), (0x20, 4, u)];
        assert_eq!(set_on("r", &plain), Err(libc::EPERM));
        let h_acl = [
            (1, 6, u),
            (2, 4, 101000),
            (4, 0, u),
            (0x10, 4, u),
            (0x20, 0, u),
        ];
        assert_eq!(set_on("h", &h_acl), Ok(Vec::new()));
        // A chmod copies it up with the entry (root copies the raw ACL): checked below.
        fs::set_permissions(m.merged.join("r"), fs::Permissions::from_mode(0o640)).unwrap();
        let g_acl = [
            (1, 6, u),
            (2, 6, 101005),
            (4, 4, u),
            (0x10, 6, u),
            (0x20, 4, u),
        ];
        assert_eq!(set(&g_acl), Ok(Vec::new()));
        assert_eq!(
            apply(&m.merged, &as_user(101005, 0o022, op_append("g", "+"))),
            Ok(Vec::new())
        );
        // The kernel refuses ids outside the mount's namespace itself; ids it passes that the
        // mapping cannot store are ours to refuse.
        assert_eq!(
            set(&[(1, 6, u), (2, 6, 5), (4, 4, u), (0x10, 6, u), (0x20, 4, u)]),
            Err(libc::EINVAL)
        );
        m.unmount().unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(
            lgetxattr(&dirs.upper.join("g"), "system.posix_acl_access"),
            Ok(acl_bytes(&[
                (1, 6, u),
                (2, 6, 1005),
                (4, 4, u),
                (0x10, 6, u),
                (0x20, 4, u)
            ]))
        );
        assert_eq!(fs::read_to_string(dirs.upper.join("g")).unwrap(), "g+");
        assert_eq!(
            lgetxattr(&dirs.upper.join("r"), "system.posix_acl_access"),
            Ok(acl_bytes(&[
                (1, 6, u),
                (2, 0, 70000),
                (4, 4, u),
                (0x10, 4, u),
                (0x20, 0, u)
            ]))
        );
        assert_eq!(
            lgetxattr(&dirs.upper.join("h"), "system.posix_acl_access"),
            Ok(acl_bytes(&[
                (1, 6, u),
                (2, 4, 1000),
                (4, 0, u),
                (0x10, 4, u),
                (0x20, 0, u)
            ]))
        );
    });
}

#[test]
fn mount_fuse3_helper_form() {
    // `mount.fuse3 SOURCE MERGED -t fuse.unionfs-rs -o OPTS` runs `unionfs-rs SOURCE MERGED -o
    // OPTS,dev,suid` found on PATH. (`mount -t fuse.unionfs-rs` itself resets PATH, so the helper
    // is called directly.)
    with_timeout(60, || {
        let dirs = simple_dirs();
        let bindir = dirs.root.join("bin");
        fs::create_dir(&bindir).unwrap();
        std::os::unix::fs::symlink(bin(), bindir.join("unionfs-rs")).unwrap();
        let path = format!(
            "{}:{}",
            bindir.display(),
            std::env::var("PATH").unwrap_or_default()
        );
        let opts = format!(
            "lowerdir={},upperdir={},workdir={}",
            dirs.lowerdir_arg(),
            dirs.upper.display(),
            dirs.work.display()
        );
        let (st, out, err) = run_with_timeout(
            Command::new("mount.fuse3")
                .args(["unionfs-rs"])
                .arg(&dirs.merged)
                .args(["-t", "fuse.unionfs-rs", "-o", &opts])
                .env("PATH", path),
            MOUNT_CMD_TIMEOUT,
        )
        .unwrap_or_else(|e| panic!("{e}"));
        let m = Mount::adopt_existing(&dirs);
        assert!(st.success(), "mount.fuse3 failed: {st}\n{out}{err}");
        assert!(is_fuse_mounted(&dirs.merged));
        assert_eq!(fs::read_to_string(m.path("f")).unwrap(), "top lower");
        m.unmount().unwrap_or_else(|e| panic!("{e}"));
    });
}

#[test]
fn other_users_go_through_kernel_permission_checks() {
    with_timeout(60, || {
        let dirs = simple_dirs();
        let m = Mount::start(&dirs, &MountOpts::default()).unwrap_or_else(|e| panic!("{e}"));
        let as_nobody = |script: &str| -> bool {
            let (st, _, _) = run_with_timeout(
                Command::new("sh")
                    .arg("-c")
                    .arg(script)
                    .current_dir("/")
                    .uid(65534)
                    .gid(65534),
                Duration::from_secs(10),
            )
            .unwrap();
            st.success()
        };
        let f = m.path("f");
        let p = m.path("private");
        assert!(
            as_nobody(&format!("cat '{}' >/dev/null", f.display())),
            "allow_other: nobody can read a 0644 file"
        );
        assert!(
            !as_nobody(&format!("echo x >> '{}'", f.display())),
            "default_permissions: nobody cannot write a root 0644 file"
        );
        assert!(
            !as_nobody(&format!("cat '{}' >/dev/null", p.display())),
            "default_permissions: nobody cannot read a root 0600 file"
        );
        assert!(
            !as_nobody(&format!("touch '{}'", m.path("newfile").display())),
            "nobody cannot create in a root 0755 dir"
        );
        assert_eq!(fs::read_to_string(&f).unwrap(), "top lower");
        m.unmount().unwrap_or_else(|e| panic!("{e}"));
    });
}

// ---------------------------------------------------------------------------------------------
// Open files follow their inode, not their old path
// ---------------------------------------------------------------------------------------------

/// Open d/f for writing, rename d → e, plant a symlink d → an outside directory, then write,
/// fchmod and ftruncate through the open fd. Only e/f may change; nothing may appear outside.
fn fd_survives_rename_and_symlink_swap(merged: &Path) {
    let outside = test_tempdir();
    fs::create_dir(merged.join("d")).unwrap();
    fs::write(merged.join("d/f"), "original").unwrap();
    let fh = fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(merged.join("d/f"))
        .unwrap();
    fs::rename(merged.join("d"), merged.join("e")).unwrap();
    std::os::unix::fs::symlink(outside.path(), merged.join("d")).unwrap();
    // An attacker would like these to land in outside/f.
    use std::os::unix::fs::FileExt;
    fh.write_all_at(b"PWNED", 0).unwrap();
    fh.set_permissions(fs::Permissions::from_mode(0o600))
        .unwrap();
    fh.set_len(3).unwrap();
    fh.sync_all().unwrap();
    drop(fh);
    let outside_entries: Vec<_> = fs::read_dir(outside.path()).unwrap().collect();
    assert!(
        outside_entries.is_empty(),
        "writes escaped through the symlink: {outside_entries:?}"
    );
    assert_eq!(fs::read(merged.join("e/f")).unwrap(), b"PWN");
    assert_eq!(lstat(&merged.join("e/f")).mode() & 0o7777, 0o600);
    assert_eq!(
        fs::read_link(merged.join("d")).unwrap(),
        outside.path(),
        "the symlink itself is untouched"
    );
}

/// Same with a lower file: open read-only, rename it (copy-up), plant a symlink at the old name,
/// then fchmod through the old fd (copy-up by inode, not by old path).
fn lower_fd_survives_rename_and_symlink_swap(merged: &Path) {
    let outside = test_tempdir();
    let target = outside.path().join("victim");
    fs::write(&target, "victim").unwrap();
    fs::set_permissions(&target, fs::Permissions::from_mode(0o644)).unwrap();
    let fh = fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NOFOLLOW)
        .open(merged.join("lowerfile"))
        .unwrap();
    fs::rename(merged.join("lowerfile"), merged.join("renamed")).unwrap();
    std::os::unix::fs::symlink(&target, merged.join("lowerfile")).unwrap();
    fh.set_permissions(fs::Permissions::from_mode(0o640))
        .unwrap();
    drop(fh);
    assert_eq!(
        lstat(&target).mode() & 0o7777,
        0o644,
        "victim's mode changed"
    );
    assert_eq!(fs::read_to_string(&target).unwrap(), "victim");
    assert_eq!(lstat(&merged.join("renamed")).mode() & 0o7777, 0o640);
    assert_eq!(
        fs::read_to_string(merged.join("renamed")).unwrap(),
        "lower data"
    );
}

fn security_layers() -> Vec<Vec<Entry>> {
    vec![vec![file("lowerfile", "lower data")]]
}

#[test]
fn open_fd_follows_inode_not_path() {
    with_timeout(60, || {
        let dirs = Dirs::new(&security_layers(), &[]);
        let m = Mount::start(&dirs, &MountOpts::default()).unwrap_or_else(|e| panic!("{e}"));
        fd_survives_rename_and_symlink_swap(&m.merged);
        lower_fd_survives_rename_and_symlink_swap(&m.merged);
        m.unmount().unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(fs::read(dirs.upper.join("e/f")).unwrap(), b"PWN");
        assert!(lstat(&dirs.upper.join("d")).file_type().is_symlink());
    });
}

/// The same scenario on kernel overlayfs, so the expectations above are known to be the
/// reference behaviour.
#[test]
fn open_fd_follows_inode_not_path_on_kernel_overlayfs() {
    with_timeout(60, || {
        let dirs = Dirs::new(&security_layers(), &[]);
        let k = OverlayMount::start(&dirs, &MountOpts::default()).unwrap();
        fd_survives_rename_and_symlink_swap(&k.merged);
        lower_fd_survives_rename_and_symlink_swap(&k.merged);
        k.unmount().unwrap();
    });
}

/// Where SELinux is not enabled, a file without a `security.selinux` label answers its
/// getxattr with EOPNOTSUPP (so `ls -l`, which caches that per device, stops asking for every
/// file: one FUSE round trip per file less); a label that is there is answered, other absent
/// names stay ENODATA, and `selinux_xattr=enodata` keeps ENODATA for the label too.
#[test]
fn an_absent_selinux_label_is_unsupported_where_selinux_is_off() {
    with_timeout(60, || {
        let selinux = fs::read_to_string("/proc/filesystems")
            .expect("/proc/filesystems")
            .lines()
            .any(|l| l.ends_with("selinuxfs"));
        let label = "system_u:object_r:test_t:s0";
        let lower = || {
            vec![
                file("plain", "p"),
                file("labelled", "l"),
                xattr("labelled", "security.selinux", label),
            ]
        };
        let m = Mount::with_args(lower(), &[]);
        let absent = if selinux {
            libc::ENODATA
        } else {
            libc::EOPNOTSUPP
        };
        assert_eq!(lgetxattr(&m.path("plain"), "security.selinux"), Err(absent));
        assert_eq!(
            lgetxattr(&m.path("labelled"), "security.selinux"),
            Ok(label.as_bytes().to_vec())
        );
        assert_eq!(lgetxattr(&m.path("plain"), "user.none"), Err(libc::ENODATA));
        assert_eq!(
            lgetxattr(&m.path("plain"), "security.capability"),
            Err(libc::ENODATA)
        );
        // ls -l still lists both (and stops asking after the first EOPNOTSUPP).
        let out = Command::new("ls")
            .arg("-l")
            .arg(&m.merged)
            .output()
            .expect("ls");
        assert!(out.status.success(), "{out:?}");
        let text = String::from_utf8_lossy(&out.stdout);
        assert!(
            text.contains("plain") && text.contains("labelled"),
            "{text}"
        );
        m.unmount().expect("unmount");

        let m = Mount::with_args(lower(), &["-o", "selinux_xattr=enodata"]);
        assert_eq!(
            lgetxattr(&m.path("plain"), "security.selinux"),
            Err(libc::ENODATA)
        );
        m.unmount().expect("unmount");
    })
}

/// How many mounts sit at `p` (stacked ones count each).
fn count_mounts_at(p: &Path) -> usize {
    let want = p.canonicalize().unwrap();
    fs::read_to_string("/proc/self/mountinfo")
        .unwrap()
        .lines()
        .filter(|l| {
            l.split(' ')
                .nth(4)
                .is_some_and(|m| Path::new(&m.replace("\\040", " ")) == want)
        })
        .count()
}

/// A private 0666 `/dev/fuse` for users of a test: /dev/fuse is root's 0600 here, so a 0666
/// node is bound over it in the test's own mount namespace (podman-e2e chmods the real one).
fn user_fuse_dev(base: &Path) -> PathBuf {
    let dev = base.join("fuse");
    let st = Command::new("mknod")
        .args(["-m", "0666", &s(&dev), "c", "10", "229"])
        .status()
        .unwrap();
    assert!(st.success(), "mknod");
    dev
}

/// Run `inner` (sh) as root of a user namespace (and mount namespace) of its own whose root
/// is host uid/gid `uid` (`unshare -Ur`, as podman's rootless mount program runs), with HOME
/// `home` and no XDG_RUNTIME_DIR: (exit code, stdout, stderr).
fn as_root_of_users_namespace(
    dev: &Path,
    uid: u32,
    home: &Path,
    inner: &str,
) -> (Option<i32>, String, String) {
    let outer = format!(
        "mount --bind {dev} /dev/fuse && exec setpriv --reuid={uid} --regid={uid} \
         --clear-groups unshare -U -m -r sh -c \"$0\"",
        dev = s(dev)
    );
    let (st, out, err) = run_with_timeout(
        Command::new("unshare")
            .args(["-m", "sh", "-c", &outer, inner])
            .env_remove("XDG_RUNTIME_DIR")
            .env("HOME", home),
        Duration::from_secs(40),
    )
    .unwrap_or_else(|e| panic!("{e}"));
    (st.code(), out, err)
}

/// A fresh 0755 directory under /var/tmp for a test run by other users.
fn users_base(prefix: &str) -> tempfile::TempDir {
    let base = tempfile::Builder::new()
        .prefix(prefix)
        .tempdir_in("/var/tmp")
        .unwrap();
    fs::set_permissions(base.path(), fs::Permissions::from_mode(0o755)).unwrap();
    base
}

fn chown_r(p: &Path, uid: u32) {
    let st = Command::new("chown")
        .args(["-R", &format!("{uid}:{uid}"), &s(p)])
        .status()
        .unwrap();
    assert!(st.success(), "chown");
}

/// Root of two users' user namespaces without `$XDG_RUNTIME_DIR` (podman's rootless mount
/// program run by hand, `unshare -Ur`) each mount and each get a control socket: the socket
/// directory in /tmp is named by the uid outside (before: both used `/tmp/unionfs-rs-0`, the
/// first's, and the second mount had no control socket: `stats` failed).
#[test]
fn roots_of_two_users_namespaces_each_get_a_control_socket() {
    with_timeout(90, || {
        let base = users_base("unionfs-userns-");
        let dev = user_fuse_dev(base.path());
        let users = [3101u32, 3102];
        let sock_dir = |u: u32| PathBuf::from(format!("/tmp/unionfs-rs-{u}"));
        for (i, u) in users.iter().enumerate() {
            let _ = fs::remove_dir_all(sock_dir(*u));
            let d = base.path().join(format!("u{u}"));
            for sub in ["l", "u", "m"] {
                fs::create_dir_all(d.join(sub)).unwrap();
            }
            fs::write(d.join("l/f"), format!("user {i}\n")).unwrap();
            chown_r(&d, *u);
        }
        let mut outs = Vec::new();
        for u in users {
            let d = base.path().join(format!("u{u}"));
            let (l, up, m) = (s(&d.join("l")), s(&d.join("u")), s(&d.join("m")));
            let b = BIN;
            // Unmounted on every path of the inner script; the namespaces go with it.
            let inner = format!(
                "{b} mount --userxattr {l} {up} {m} || exit 3; \
                 cat {m}/f; {b} stats {m}; r=$?; {b} umount {m} || umount -l {m}; exit $r"
            );
            let (code, out, err) = as_root_of_users_namespace(&dev, u, &d, &inner);
            outs.push((u, code, out, err));
        }
        for u in users {
            let _ = fs::remove_dir_all(sock_dir(u));
        }
        for (i, (u, code, out, err)) in outs.iter().enumerate() {
            assert_eq!(*code, Some(0), "user {u}: stdout {out}\nstderr {err}");
            assert!(out.starts_with(&format!("user {i}\n")), "user {u}: {out}");
            assert!(out.contains("pid:"), "user {u}: no stats: {out}\n{err}");
        }
    });
}

/// Rootless, a lower file's ACL and a lower directory's default ACL name a user the
/// namespace does not map: `getfacl` works (the entry is left out: from inside it reads as
/// (uid_t)-1, which FUSE refuses in an ACL), the file can be written (copied up, its ACL
/// without that entry, the rest kept) and files can be made in the directory. (QA: EINVAL
/// for all four; kernel overlayfs keeps the raw entry, which no daemon can write.)
#[test]
fn acls_naming_unmapped_users_do_not_stop_a_rootless_mount() {
    with_timeout(90, || {
        let base = users_base("unionfs-userns-acl-");
        let dev = user_fuse_dev(base.path());
        let u = 3103u32;
        let _ = fs::remove_dir_all(format!("/tmp/unionfs-rs-{u}"));
        let d = base.path().join("d");
        for sub in ["l/dacl", "u", "m"] {
            fs::create_dir_all(d.join(sub)).unwrap();
        }
        fs::write(d.join("l/acl"), "lower\n").unwrap();
        chown_r(&d, u);
        for (p, spec) in [
            ("l/acl", "u:4321:r,u:3103:rw,g:4321:r"),
            ("l/dacl", "d:u:4321:rwx,d:g::rx"),
        ] {
            let st = Command::new("setfacl")
                .args(["-m", spec, &s(&d.join(p))])
                .status()
                .unwrap();
            assert!(st.success(), "setfacl {p}");
        }
        let (l, up, m) = (s(&d.join("l")), s(&d.join("u")), s(&d.join("m")));
        let b = BIN;
        let inner = format!(
            "{b} mount --userxattr {l} {up} {m} || exit 3; cd {m} || exit 4; \
             getfacl -cn acl | tr '\\n' ' '; echo; \
             echo more >> acl && echo appended; touch dacl/new && echo created; \
             cd /; {b} umount {m} || umount -l {m}"
        );
        let (code, out, err) = as_root_of_users_namespace(&dev, u, &d, &inner);
        let _ = fs::remove_dir_all(format!("/tmp/unionfs-rs-{u}"));
        assert_eq!(code, Some(0), "stdout {out}\nstderr {err}");
        let lines: Vec<String> = out
            .lines()
            .map(|l| l.split_whitespace().collect::<Vec<_>>().join(" "))
            .collect();
        assert_eq!(
            lines,
            [
                "user::rw- user:0:rw- group::r-- mask::rw- other::r--",
                "appended",
                "created"
            ],
            "stderr {err}"
        );
        assert_eq!(
            fs::read_to_string(d.join("u/acl")).unwrap(),
            "lower\nmore\n"
        );
        let acl = Command::new("getfacl")
            .args(["-cn", &s(&d.join("u/acl"))])
            .output()
            .unwrap();
        assert_eq!(
            String::from_utf8_lossy(&acl.stdout)
                .split_whitespace()
                .collect::<Vec<_>>(),
            [
                "user::rw-",
                "user:3103:rw-",
                "group::r--",
                "mask::rw-",
                "other::r--"
            ],
            "the copy's ACL on disk"
        );
        assert!(d.join("u/dacl/new").exists());
    });
}

/// Rootless, an ACL entry naming a user or group the namespace does not map that gives them
/// *less* than others get cannot be left out of an ACL the daemon writes: left out, it would
/// give them more on the host. So a copy-up of such a file (access ACL, user or group) or
/// directory (default ACL), a create under such a default ACL, and a replacement or removal
/// of such an ACL are refused (EACCES / EPERM), nothing half done; a `chmod` keeps working
/// (the filesystem keeps the entry), and an entry that restricts nothing is left out as before.
/// (Before: each of them went through and the host user 4321 could read the copies.)
#[test]
fn acls_restricting_unmapped_users_are_never_dropped() {
    with_timeout(90, || {
        let base = users_base("unionfs-userns-aclw-");
        let dev = user_fuse_dev(base.path());
        let u = 3104u32;
        let _ = fs::remove_dir_all(format!("/tmp/unionfs-rs-{u}"));
        let d = base.path().join("d");
        for sub in ["l/dnarrow", "u/dup", "m"] {
            fs::create_dir_all(d.join(sub)).unwrap();
        }
        for f in ["l/narrow", "l/gnarrow", "l/wide", "u/up"] {
            fs::write(d.join(f), "data\n").unwrap();
            fs::set_permissions(d.join(f), fs::Permissions::from_mode(0o644)).unwrap();
        }
        chown_r(&d, u);
        let setfacl = |p: &str, spec: &str| {
            let st = Command::new("setfacl")
                .args(["-m", spec, &s(&d.join(p))])
                .status()
                .unwrap();
            assert!(st.success(), "setfacl {p}");
        };
        setfacl("l/narrow", "u:4321:---");
        setfacl("l/gnarrow", "g:4321:---");
        setfacl("l/wide", "u:4321:rwx");
        setfacl("l/dnarrow", "d:u:4321:---");
        setfacl("u/dup", "d:u:4321:---");
        setfacl("u/up", "u:4321:---,u:3104:rw");
        let getfacl = |p: &str| {
            let out = Command::new("getfacl")
                .args(["-cnE", &s(&d.join(p))])
                .output()
                .unwrap();
            assert!(out.status.success(), "getfacl {p}");
            String::from_utf8_lossy(&out.stdout)
                .split_whitespace()
                .collect::<Vec<_>>()
                .join(" ")
        };
        let up_before = getfacl("u/up");
        let (l, up, m) = (s(&d.join("l")), s(&d.join("u")), s(&d.join("m")));
        let b = BIN;
        let inner = format!(
            "{b} mount --userxattr {l} {up} {m} || exit 3; cd {m} || exit 4; \
             echo more >> narrow; echo narrow $?; echo more >> gnarrow; echo gnarrow $?; \
             touch dnarrow/new; echo dnarrow $?; touch dup/new; echo dup $?; \
             echo more >> wide; echo wide $?; \
             setfacl -m u:0:r up; echo setfacl $?; setfacl -b up; echo setfacl-b $?; \
             chmod 600 up; echo chmod $?; cat narrow; \
             cd /; {b} umount {m} || umount -l {m}"
        );
        let (code, out, err) = as_root_of_users_namespace(&dev, u, &d, &inner);
        let _ = fs::remove_dir_all(format!("/tmp/unionfs-rs-{u}"));
        assert_eq!(code, Some(0), "stdout {out}\nstderr {err}");
        assert_eq!(
            out.lines().collect::<Vec<_>>(),
            [
                "narrow 2",
                "gnarrow 2",
                "dnarrow 1",
                "dup 1",
                "wide 0",
                "setfacl 1",
                "setfacl-b 1",
                "chmod 0",
                "data"
            ],
            "stderr {err}"
        );
        assert!(err.contains("Permission denied"), "{err}");
        assert!(err.contains("Operation not permitted"), "{err}");
        for gone in ["u/narrow", "u/gnarrow", "u/dnarrow", "u/dup/new"] {
            assert!(!d.join(gone).exists(), "{gone} was made");
        }
        // Nothing left in the workdir from the refused copies.
        let work: Vec<_> = fs::read_dir(d.join("u.work/work"))
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert!(work.is_empty(), "left in work/: {work:?}");
        assert_eq!(
            fs::read_to_string(d.join("u/wide")).unwrap(),
            "data\nmore\n"
        );
        assert!(!getfacl("u/wide").contains("4321"), "{}", getfacl("u/wide"));
        // The entries stay; chmod changed the mask and other, as on any filesystem.
        assert_eq!(
            getfacl("u/up"),
            up_before
                .replace("mask::rw-", "mask::---")
                .replace("other::r--", "other::---"),
        );
        assert_eq!(
            fs::metadata(d.join("u/up")).unwrap().permissions().mode() & 0o777,
            0o600
        );
    });
}

/// A request whose handler panics (the testing aid `panic_name`: a lookup of that name) fails
/// with EIO, and the daemon goes on serving on every thread. (Before: on `/dev/fuse` the
/// panicking fuser loop thread ended; once the first one had, the session ended and the
/// mount answered ENOTCONN.) Through `/dev/fuse` and through whatever transport the machine
/// gives by default (io_uring where the CI pass switches it on).
#[test]
fn a_panicking_request_fails_with_eio_and_the_daemon_serves_on() {
    with_timeout(60, || {
        for transport in ["uring=off", "uring=auto"] {
            let m = Mount::with_args(
                vec![file("f", "lower\n")],
                &["-o", &format!("panic_name=boom,{transport}")],
            );
            // More than the worker threads, so that each one meets a panic (the kernel hands
            // requests to whichever waits).
            for i in 0..40 {
                let e = fs::metadata(m.path("boom")).expect_err("a lookup that panics");
                assert_eq!(
                    e.raw_os_error(),
                    Some(libc::EIO),
                    "{transport}, stat {i}: {e}"
                );
                let name = format!("g{i}");
                fs::write(m.path(&name), &name).unwrap_or_else(|e| panic!("{transport}: {e}"));
                assert_eq!(fs::read_to_string(m.path(&name)).unwrap(), name);
            }
            assert_eq!(fs::read_to_string(m.path("f")).unwrap(), "lower\n");
            assert_eq!(fs::read_dir(&m.merged).unwrap().count(), 41);
            let log = m.log_text();
            assert!(log.contains("panicked"), "{transport}: {log}");
            m.unmount().unwrap_or_else(|e| panic!("{transport}: {e}"));
        }
    });
}
