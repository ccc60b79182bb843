//! Set-id bits and FUSE_HANDLE_KILLPRIV_V2 (src/union/file.rs `KillSuidgid`). The daemon asks
//! the kernel to leave the clearing of set-id bits on a truncate to it, and in return the
//! kernel stops asking for `security.capability` before every write(2) once it found a file
//! without it. Kernel overlayfs is the oracle for the modes; the daemon's `getxattr_requests`
//! count shows the round trips the writes no longer make.

mod common;

use common::*;
use std::fs::{self, OpenOptions};
use std::io::Write;
use std::os::unix::fs::PermissionsExt;

const TIMEOUT: u64 = 120;

/// World-writable files with set-id bits, so that another user may write and truncate them.
fn set_id_files() -> Vec<Entry> {
    vec![
        file_mode("both_gx", "0123456789", 0o6777),
        file_mode("suid", "0123456789", 0o4766),
        file_mode("sgid_gx", "0123456789", 0o2777),
        file_mode("sgid_nox", "0123456789", 0o2766),
        file_mode("by_open", "0123456789", 0o6777),
        file_mode("by_write", "0123456789", 0o6777),
        file_mode("by_root", "0123456789", 0o6777),
        file_mode("root_opens", "0123456789", 0o6777),
        file_mode("chown_keep", "0123456789", 0o6777),
        file_mode("chown_user", "0123456789", 0o6777),
        file_mode("grp_owner", "0123456789", 0o2664),
        chown("grp_owner", 1000, 0),
        file_mode("grp_owner_x", "0123456789", 0o6775),
        chown("grp_owner_x", 1000, 0),
    ]
}

/// A user without CAP_FSETID that truncates a set-id file clears the set-user-ID bit, and the
/// set-group-ID bit where the group may execute it; root keeps them. Through a lower file
/// (copied up by the change) as kernel overlayfs does it: same modes after each step.
#[test]
fn a_truncate_by_another_user_clears_set_id_bits_as_on_kernel_overlayfs() {
    let user = |op| as_user(1000, 0o022, op);
    Differential::new("killpriv_truncate")
        .lower(set_id_files())
        .ok(user(op_truncate("both_gx", 3)))
        .ok(user(op_truncate("suid", 0)))
        .ok(user(op_truncate("sgid_gx", 20)))
        .ok(user(op_truncate("sgid_nox", 1)))
        .ok(user(Op::OpenTrunc {
            path: "by_open".into(),
        }))
        .ok(user(op_write("by_write", 2, "x")))
        .ok(op_truncate("by_root", 4))
        .ok(Op::OpenTrunc {
            path: "root_opens".into(),
        })
        // chown(-1, -1): by root, and by another user (EPERM: not the owner).
        .ok(op_chown("chown_keep", u32::MAX, u32::MAX))
        .err(
            user(op_chown("chown_user", u32::MAX, u32::MAX)),
            libc::EPERM,
        )
        // A chown by the owner, who is not in the file's group: the set-group-ID bit goes
        // without group execute too.
        .ok(user(op_chown("grp_owner", u32::MAX, 1000)))
        .ok(user(op_chown("grp_owner_x", u32::MAX, 1000)))
        // Once more on files in upper now, with the bits set again.
        .ok(op_chmod("both_gx", 0o6777))
        .ok(user(op_truncate("both_gx", 0)))
        .ok(op_chmod("by_write", 0o6777))
        .ok(user(op_write("by_write", 0, "again")))
        .run();
}

/// Many small writes to one file: the kernel asks security.capability once (its first write),
/// not before each write — and a set-user-ID bit set after that is still cleared by the next
/// write of another user (chmod makes the kernel look again).
#[test]
fn small_writes_ask_for_security_capability_once() {
    with_timeout(TIMEOUT, || {
        let m = Mount::with_args(vec![file("seed", "x")], &[]);
        let p = m.path("f");
        let mut f = fs::File::create(&p).expect("create");
        let before = daemon_stats(&m.merged)["getxattr_requests"];
        let block = [0x5au8; 4096];
        for _ in 0..500 {
            f.write_all(&block).expect("write");
        }
        f.sync_all().expect("fsync");
        drop(f);
        let asked = daemon_stats(&m.merged)["getxattr_requests"] - before;
        assert!(
            asked <= 5,
            "500 writes asked {asked} getxattrs (one per write without KILLPRIV_V2)"
        );
        assert_eq!(fs::metadata(&p).unwrap().len(), 500 * 4096);
        // Set-user-ID now: another user's write clears it.
        fs::set_permissions(&p, fs::Permissions::from_mode(0o4777)).expect("chmod");
        let r = apply(&m.merged, &as_user(1000, 0o022, op_append("f", "more")));
        assert_eq!(r, Ok(Vec::new()));
        let mode = fs::metadata(&p).unwrap().permissions().mode() & 0o7777;
        assert_eq!(
            mode, 0o777,
            "the set-user-ID bit survived a write by another user"
        );
        // And root's own writes keep it (CAP_FSETID).
        fs::set_permissions(&p, fs::Permissions::from_mode(0o4755)).expect("chmod");
        OpenOptions::new()
            .append(true)
            .open(&p)
            .and_then(|mut f| f.write_all(b"root"))
            .expect("append as root");
        let mode = fs::metadata(&p).unwrap().permissions().mode() & 0o7777;
        assert_eq!(mode, 0o4755);
        m.unmount().unwrap_or_else(|e| panic!("{e}"));
    });
}

/// `chown(f, -1, -1)` by a user who does not own the file fails with EPERM and changes
/// nothing, also while another process has the file open for writing (the daemon tells that
/// chown from the setattr a write sends, which looks the same to it); root's clears the bits.
/// Both mounts over the same layers, kernel overlayfs first.
#[test]
fn chown_minus_one_while_the_file_is_open_for_writing() {
    with_timeout(TIMEOUT, || {
        let lower = vec![
            file_mode("held", "0123456789", 0o6755),
            file_mode("held_root", "0123456789", 0o6755),
        ];
        let mut seen = Vec::new();
        for kernel in [true, false] {
            let d = Dirs::new(std::slice::from_ref(&lower), &[]);
            let (merged, unmount) = mount_either(&d, kernel);
            let open = |n: &str| {
                OpenOptions::new()
                    .read(true)
                    .write(true)
                    .open(merged.join(n))
                    .expect("open for writing")
            };
            let held = (open("held"), open("held_root"));
            let user = apply(
                &merged,
                &as_user(1000, 0o022, op_chown("held", u32::MAX, u32::MAX)),
            );
            let root = apply(&merged, &op_chown("held_root", u32::MAX, u32::MAX));
            let mode =
                |n: &str| fs::metadata(merged.join(n)).unwrap().permissions().mode() & 0o7777;
            seen.push((user, mode("held"), root, mode("held_root")));
            drop(held);
            unmount();
        }
        assert_eq!(
            seen[0],
            (Err(libc::EPERM), 0o6755, Ok(Vec::new()), 0o755),
            "kernel overlayfs"
        );
        assert_eq!(
            seen[1], seen[0],
            "unionfs-rs (left) against kernel overlayfs (right)"
        );
    });
}

/// Run `script` (sh) as root of a user namespace made below ours that maps ids 0–65535 to
/// themselves (as podman's `--userns=keep-id` containers are made under a rootless mount
/// program): it holds every capability there, over files whose ids are mapped, but none in
/// ours. Returns its stdout.
fn as_root_of_a_child_userns(script: &str) -> String {
    use std::io::{BufRead, BufReader};
    use std::process::{Command, Stdio};
    // The shell waits for its maps before it execs the script: a program exec'd before has
    // no capabilities (its uid was unmapped then).
    let mut child = Command::new("unshare")
        .args(["-U", "sh", "-c", "read x; exec sh -c \"$0\"", script])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .expect("unshare -U");
    let pid = child.id();
    // Mapped once it is in its namespace (not before unshare(2) ran).
    let ours = fs::read_link("/proc/self/ns/user").unwrap();
    let t = std::time::Instant::now();
    while fs::read_link(format!("/proc/{pid}/ns/user")).is_ok_and(|n| n == ours) {
        assert!(t.elapsed().as_secs() < 10, "unshare -U did not start");
        std::thread::sleep(std::time::Duration::from_millis(5));
    }
    for map in ["uid_map", "gid_map"] {
        fs::write(format!("/proc/{pid}/{map}"), "0 0 65536\n").expect(map);
    }
    child
        .stdin
        .take()
        .unwrap()
        .write_all(b"go\n")
        .expect("start the script");
    let out: Vec<String> = BufReader::new(child.stdout.take().unwrap())
        .lines()
        .map_while(Result::ok)
        .collect();
    assert!(child.wait().expect("wait").success(), "{out:?}");
    out.join("\n")
}

/// Root of a user namespace below ours (podman `--userns=keep-id --user 0`) writing set-id
/// files of another user, whose ids its namespace maps: the write goes through and clears the
/// bits, a `chown(f, -1, -1)` too, as on kernel overlayfs. (QA: the daemon counted
/// capabilities only in its own namespace, took the write's request to clear the bits for a
/// chown by someone without CAP_FOWNER, and failed the write.)
#[test]
fn root_of_a_child_user_namespace_writes_set_id_files_of_others() {
    with_timeout(TIMEOUT, || {
        // (The mode after the owner: a chown clears set-id bits, root's too.)
        let lower = vec![
            file_mode("suid", "0123456789", 0o644),
            chown("suid", 5000, 5000),
            chmod_entry("suid", 0o4755),
            file_mode("sgid", "0123456789", 0o644),
            chown("sgid", 5000, 5000),
            chmod_entry("sgid", 0o2755),
            file_mode("both", "0123456789", 0o644),
            chown("both", 5000, 5000),
            chmod_entry("both", 0o6755),
        ];
        let mut seen = Vec::new();
        for kernel in [true, false] {
            let d = Dirs::new(std::slice::from_ref(&lower), &[]);
            let (merged, unmount) = mount_either(&d, kernel);
            let m = merged.display();
            let out = as_root_of_a_child_userns(&format!(
                "cd '{m}' || exit 9; \
                 echo x >> suid; echo \"suid $?\"; \
                 echo y >> sgid; echo \"sgid $?\"; \
                 chown -h -- -1:-1 both 2>/dev/null || chown :5000 both; echo \"chown $?\""
            ));
            let meta = |n: &str| {
                let md = fs::metadata(merged.join(n)).unwrap();
                use std::os::unix::fs::MetadataExt;
                (
                    md.permissions().mode() & 0o7777,
                    md.uid(),
                    md.gid(),
                    md.len(),
                )
            };
            seen.push((out, meta("suid"), meta("sgid"), meta("both")));
            unmount();
        }
        assert_eq!(
            seen[0].0, "suid 0\nsgid 0\nchown 0",
            "kernel overlayfs: {seen:?}"
        );
        assert_eq!(
            (seen[0].1.0, seen[0].2.0, seen[0].3.0),
            (0o755, 0o755, 0o755),
            "kernel overlayfs: the bits cleared: {seen:?}"
        );
        assert_eq!(
            seen[1], seen[0],
            "unionfs-rs (left) against kernel overlayfs (right)"
        );
    });
}
