//! Mount option parsing shared by the `mount` subcommand and the `-o` (fuse-overlayfs,
//! mount.fuse3) form.

use std::ffi::OsString;
use std::path::PathBuf;

/// Everything a mount request says, before validation.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct MountSpec {
    /// Lower dirs, top first.
    pub lowers: Vec<PathBuf>,
    /// Data-only lower dirs (after `::` in `lowerdir=`, kernel overlayfs 6.5+), top first.
    pub data_lowers: Vec<PathBuf>,
    /// Upper dir (None: read-only union).
    pub upper: Option<PathBuf>,
    /// Work dir.
    pub workdir: Option<PathBuf>,
    /// Mount point.
    pub merged: Option<PathBuf>,
    /// Stay attached.
    pub foreground: bool,
    /// user.overlay.* xattrs.
    pub userxattr: bool,
    /// AUFS whiteouts in lowers.
    pub aufs_whiteouts: bool,
    /// `redirect_dir=on|follow|off|nofollow` as given (kernel overlayfs's values).
    pub redirect_dir: Option<String>,
    /// `dir_rename=copy|exdev`: a rename of a merged or lower directory copies it up whole
    /// (fuse-overlayfs's way; default in its `-o lowerdir=` form) or fails with EXDEV (the
    /// kernel's without `redirect_dir=on`; default in the `mount` form).
    pub dir_rename_copy: bool,
    /// `metacopy=on|off` (kernel overlayfs's): follow metacopy files to their data.
    pub metacopy: Option<bool>,
    /// Read-only mount.
    pub read_only: bool,
    /// fsname= for /proc/mounts.
    pub fsname: Option<String>,
    /// subtype= for /proc/mounts.
    pub subtype: Option<String>,
    /// Kernel mount flags passed through (nodev, nosuid, noexec, noatime, …).
    pub kernel_flags: Vec<String>,
    /// FUSE worker threads.
    pub threads: Option<usize>,
    /// Kernel entry/attribute cache lifetime in seconds.
    pub ttl: Option<f64>,
    /// uid mapping (`uidmapping=`, `squash_to_uid=`).
    pub uid_map: crate::union::idmap::IdMap,
    /// gid mapping (`gidmapping=`, `squash_to_gid=`).
    pub gid_map: crate::union::idmap::IdMap,
    /// No syncs.
    pub volatile: bool,
    /// `copyup_commit=defer|sync`: copy-ups for writing, setattr and rename commit in the
    /// background (default) or before the reply.
    pub sync_commit: bool,
    /// `commit_delay_ms=N` (testing aid): each background copy-up commit waits N ms first,
    /// so tests can observe the pending state.
    pub commit_delay_ms: u64,
    /// `release_delay_ms=N` (testing aid): the background release of each removed file waits
    /// N ms first, so tests can observe releases pending.
    pub release_delay_ms: u64,
    /// `commit_window_ms=N` (testing aid): a background commit waits N ms between reading its
    /// directory's times and renaming into it, and N ms again before restoring them, so tests
    /// can run operations and stats in that window.
    pub commit_window_ms: u64,
    /// `copyup_window_ms=N` (testing aid): a copy-up made in the request (not committed in the
    /// background) waits N ms right after its copy shows in upper, so tests can look the name
    /// up meanwhile.
    pub copyup_window_ms: u64,
    /// `panic_name=NAME` (testing aid): a lookup of NAME panics in the handler (the tests check
    /// that the request fails with EIO and the daemon serves on).
    pub panic_name: Option<std::ffi::OsString>,
    /// Debug logging.
    pub debug: bool,
    /// Where the daemon logs once the mount is live (default: nowhere in the background).
    pub log_file: Option<PathBuf>,
    /// Options we accepted but ignore, or did not know (warned).
    pub unknown: Vec<String>,
    /// Project quota settings.
    pub quota_args: QuotaArgs,
    /// The quota configuration built from `quota_args` (filled by validation).
    pub quota: Option<crate::union::charge::QuotaConfig>,
    /// Page cache and write-back settings.
    pub cache: crate::cache::CacheConfig,
    /// `passthrough=off`: every file's I/O goes through the daemon.
    pub no_passthrough: bool,
    /// `passthrough=lower`: read-only opens of lower files too (see [`crate::union::Options`]).
    pub lower_passthrough: bool,
    /// `writeback_cache=on|off` (None: auto, on where passthrough cannot be used).
    pub writeback_cache: Option<bool>,
    /// `readdirplus=auto|on|off`: directory listings with attributes.
    pub readdirplus: crate::fuse::Readdirplus,
    /// `prefetch=off` / `noprefetch`: no directory read-ahead for tree walks.
    pub no_prefetch: bool,
    /// `selinux_xattr=enodata`: an absent `security.selinux` is ENODATA even without SELinux.
    pub selinux_enodata: bool,
    /// `uring=auto|on|off`: requests through io_uring.
    pub uring: crate::fuse::Uring,
    /// Testing aid `uring_test_fail`: the ring's setup fails after INIT offered it.
    pub uring_test_fail: bool,
}

/// Quota options as given (`--bhard 10G`, `-o size=10G,bsoft=…`).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct QuotaArgs {
    /// Block hard limit (bytes).
    pub bhard: Option<u64>,
    /// Block soft limit.
    pub bsoft: Option<u64>,
    /// Inode hard limit.
    pub ihard: Option<u64>,
    /// Inode soft limit.
    pub isoft: Option<u64>,
    /// Block grace, seconds.
    pub bgrace: Option<u64>,
    /// Inode grace, seconds.
    pub igrace: Option<u64>,
    /// Project id.
    pub project_id: Option<u32>,
    /// EDQUOT instead of ENOSPC.
    pub edquot: Option<bool>,
}

impl QuotaArgs {
    /// Set one quota option by name; `Ok(false)` if the name is not a quota option.
    pub fn set(&mut self, k: &str, v: &str) -> Result<bool, String> {
        use crate::quota::{parse_count, parse_duration, parse_size};
        match k {
            "size" | "bhard" => self.bhard = Some(parse_size(v)?),
            "bsoft" => self.bsoft = Some(parse_size(v)?),
            "ihard" | "inodes" => self.ihard = Some(parse_count(v)?),
            "isoft" => self.isoft = Some(parse_count(v)?),
            "bgrace" => self.bgrace = Some(parse_duration(v)?),
            "igrace" => self.igrace = Some(parse_duration(v)?),
            "project_id" | "project-id" => {
                self.project_id = Some(
                    v.trim()
                        .parse()
                        .map_err(|_| format!("invalid project id '{v}'"))?,
                )
            }
            "quota_errno" | "quota-errno" => {
                self.edquot = Some(match v.trim() {
                    "enospc" | "ENOSPC" => false,
                    "edquot" | "EDQUOT" => true,
                    _ => return Err(format!("quota errno '{v}': use enospc or edquot")),
                })
            }
            _ => return Ok(false),
        }
        Ok(true)
    }

    /// Any limit given?
    fn has_limits(&self) -> bool {
        self.bhard.is_some()
            || self.bsoft.is_some()
            || self.ihard.is_some()
            || self.isoft.is_some()
            || self.bgrace.is_some()
            || self.igrace.is_some()
            || self.project_id.is_some()
    }

    /// The quota configuration these arguments ask for (None: nothing asked).
    pub fn to_config(&self) -> Result<Option<crate::union::charge::QuotaConfig>, String> {
        use crate::quota::{DEFAULT_GRACE, Limits};
        if !self.has_limits() && self.edquot.is_none() {
            return Ok(None);
        }
        let limits = if self.has_limits() {
            let l = Limits {
                project_id: self.project_id.unwrap_or(0),
                bsoft: self.bsoft.unwrap_or(0),
                bhard: self.bhard.unwrap_or(0),
                isoft: self.isoft.unwrap_or(0),
                ihard: self.ihard.unwrap_or(0),
                bgrace: self.bgrace.unwrap_or(DEFAULT_GRACE),
                igrace: self.igrace.unwrap_or(DEFAULT_GRACE),
            };
            l.validate()?;
            Some(l)
        } else {
            None
        };
        Ok(Some(crate::union::charge::QuotaConfig {
            limits,
            edquot: self.edquot.unwrap_or(false),
        }))
    }
}

/// Split `lowerdir=` into the lower layers and the data-only layers after them
/// (`a:b::d1::d2`).
pub fn split_lowers(s: &str) -> Result<(Vec<PathBuf>, Vec<PathBuf>), String> {
    // As kernel overlayfs: `\` escapes the next character (a `:` in a path); `::` begins the
    // data-only layers, each after another `::`. A lone empty element at either end is
    // ignored (containers-storage may leave one).
    let mut elems: Vec<String> = Vec::new();
    let mut cur = String::new();
    let mut chars = s.chars();
    while let Some(c) = chars.next() {
        match c {
            '\\' => cur.extend(chars.next()),
            ':' => elems.push(std::mem::take(&mut cur)),
            c => cur.push(c),
        }
    }
    elems.push(cur);
    if elems.first().is_some_and(String::is_empty) {
        elems.remove(0);
    }
    if elems.last().is_some_and(String::is_empty) {
        elems.pop();
    }
    let (mut lowers, mut data) = (Vec::new(), Vec::new());
    let mut it = elems.into_iter();
    while let Some(e) = it.next() {
        if e.is_empty() {
            // `::`: the next element is a data-only layer.
            match it.next() {
                Some(d) if !d.is_empty() => data.push(PathBuf::from(d)),
                _ => return Err(format!("lowerdir {s}: an empty layer")),
            }
            if lowers.is_empty() {
                return Err(format!(
                    "lowerdir {s}: data-only layers (after ::) need a lower layer above them"
                ));
            }
            continue;
        }
        if !data.is_empty() {
            return Err(format!(
                "lowerdir {s}: a regular layer ({e}) after a data-only one (each data-only \
                 layer follows ::)"
            ));
        }
        lowers.push(PathBuf::from(e));
    }
    Ok((lowers, data))
}

/// Split an option string at its commas; `\,` is a comma inside a value (a path), as kernel
/// overlayfs reads its options. Other backslashes stay (`\:` in `lowerdir=`).
pub fn split_opts(opts: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut cur = String::new();
    let mut it = opts.chars().peekable();
    while let Some(c) = it.next() {
        match c {
            // A backslash escapes the next character, whatever it is (as the kernel's
            // splitter): `\,` is a comma; other pairs stay for the value's own unescaping.
            '\\' => match it.next() {
                Some(',') => cur.push(','),
                Some(n) => {
                    cur.push('\\');
                    cur.push(n);
                }
                None => cur.push('\\'),
            },
            ',' => out.push(std::mem::take(&mut cur)),
            c => cur.push(c),
        }
    }
    out.push(cur);
    out
}

/// Apply one comma-separated option string.
pub fn apply_opts(spec: &mut MountSpec, opts: &str) -> Result<(), String> {
    for o in split_opts(opts) {
        apply_opt(spec, &o)?;
    }
    Ok(())
}

/// Apply one option (`key` or `key=value`, commas already split off).
pub fn apply_opt(spec: &mut MountSpec, o: &str) -> Result<(), String> {
    let o = o.trim();
    if o.is_empty() {
        return Ok(());
    }
    let (k, v) = match o.split_once('=') {
        Some((k, v)) => (k, Some(v)),
        None => (o, None),
    };
    let need = |v: Option<&str>| -> Result<String, String> {
        match v {
            Some(v) if !v.is_empty() => Ok(v.to_string()),
            _ => Err(format!("option '{k}' needs a value")),
        }
    };
    if let Some(v) = v
        && spec.quota_args.set(k, v)?
    {
        return Ok(());
    }
    if crate::cache::writeback::KEYS.contains(&k.replace('-', "_").as_str()) {
        spec.cache.set(k, &need(v)?)?;
        return Ok(());
    }
    match k {
        "lowerdir" => (spec.lowers, spec.data_lowers) = split_lowers(&need(v)?)?,
        "upperdir" => spec.upper = Some(PathBuf::from(need(v)?)),
        "workdir" => spec.workdir = Some(PathBuf::from(need(v)?)),
        "userxattr" => spec.userxattr = true,
        "aufs_whiteouts" | "aufs" => spec.aufs_whiteouts = true,
        "noaufs" => spec.aufs_whiteouts = false,
        "redirect_dir" => {
            let v = need(v)?;
            if !matches!(v.as_str(), "on" | "follow" | "off" | "nofollow") {
                return Err(format!(
                    "redirect_dir: {v} is not on, follow, off or nofollow"
                ));
            }
            spec.redirect_dir = Some(v);
        }
        "dir_rename" => {
            spec.dir_rename_copy = match need(v)?.as_str() {
                "copy" => true,
                "exdev" => false,
                other => return Err(format!("dir_rename: {other} is not copy or exdev")),
            }
        }
        "metacopy" => {
            spec.metacopy = Some(match need(v)?.as_str() {
                "on" => true,
                "off" => false,
                other => return Err(format!("metacopy: {other} is not on or off")),
            })
        }
        "ro" => spec.read_only = true,
        "rw" => spec.read_only = false,
        "fsname" => spec.fsname = Some(need(v)?),
        "subtype" => spec.subtype = Some(need(v)?),
        "threads" => {
            spec.threads = Some(
                need(v)?
                    .parse()
                    .map_err(|_| format!("threads: not a number: {}", v.unwrap_or("")))?,
            )
        }
        "debug" => spec.debug = true,
        "log_file" | "logfile" => spec.log_file = Some(PathBuf::from(need(v)?)),
        "volatile" => spec.volatile = true,
        "copyup_commit" => {
            spec.sync_commit = match need(v)?.as_str() {
                "defer" => false,
                "sync" => true,
                other => return Err(format!("copyup_commit: {other} is not defer or sync")),
            }
        }
        "commit_delay_ms" => {
            spec.commit_delay_ms = need(v)?
                .parse()
                .map_err(|_| format!("commit_delay_ms: not a number: {}", v.unwrap_or("")))?
        }
        "commit_window_ms" => {
            spec.commit_window_ms = need(v)?
                .parse()
                .map_err(|_| format!("commit_window_ms: not a number: {}", v.unwrap_or("")))?
        }
        "panic_name" => spec.panic_name = Some(need(v)?.into()),
        "copyup_window_ms" => {
            spec.copyup_window_ms = need(v)?
                .parse()
                .map_err(|_| format!("copyup_window_ms: not a number: {}", v.unwrap_or("")))?
        }
        "release_delay_ms" => {
            spec.release_delay_ms = need(v)?
                .parse()
                .map_err(|_| format!("release_delay_ms: not a number: {}", v.unwrap_or("")))?
        }
        "passthrough" => {
            (spec.no_passthrough, spec.lower_passthrough) = match v.unwrap_or("auto") {
                "auto" | "on" => (false, false),
                "lower" => (false, true),
                "off" => (true, false),
                other => return Err(format!("passthrough: {other} is not auto, lower or off")),
            }
        }
        "nopassthrough" => (spec.no_passthrough, spec.lower_passthrough) = (true, false),
        "writeback_cache" | "writeback" => {
            spec.writeback_cache = match v.unwrap_or("on") {
                "auto" => None,
                "on" => Some(true),
                "off" => Some(false),
                other => {
                    return Err(format!("writeback_cache: {other} is not auto, on or off"));
                }
            }
        }
        "nowriteback_cache" | "nowriteback" => spec.writeback_cache = Some(false),
        "readdirplus" => {
            spec.readdirplus = match v.unwrap_or("on") {
                "auto" => crate::fuse::Readdirplus::Auto,
                "on" => crate::fuse::Readdirplus::On,
                "off" => crate::fuse::Readdirplus::Off,
                other => return Err(format!("readdirplus: {other} is not auto, on or off")),
            }
        }
        "noreaddirplus" => spec.readdirplus = crate::fuse::Readdirplus::Off,
        "prefetch" => {
            spec.no_prefetch = match v.unwrap_or("on") {
                "on" => false,
                "off" => true,
                other => return Err(format!("prefetch: {other} is not on or off")),
            };
        }
        "noprefetch" => spec.no_prefetch = true,
        "selinux_xattr" => {
            spec.selinux_enodata = match need(v)?.as_str() {
                "auto" => false,
                "enodata" => true,
                other => return Err(format!("selinux_xattr: {other} is not auto or enodata")),
            };
        }
        "uring" => {
            spec.uring = match v.unwrap_or("on") {
                "auto" => crate::fuse::Uring::Auto,
                "on" => crate::fuse::Uring::On,
                "off" => crate::fuse::Uring::Off,
                other => return Err(format!("uring: {other} is not auto, on or off")),
            }
        }
        "nouring" => spec.uring = crate::fuse::Uring::Off,
        "uring_test_fail" => spec.uring_test_fail = true,
        "uidmapping" => {
            let squash = spec.uid_map.squash;
            spec.uid_map = crate::union::idmap::IdMap::parse(&need(v)?)?;
            spec.uid_map.squash = squash;
        }
        "gidmapping" => {
            let squash = spec.gid_map.squash;
            spec.gid_map = crate::union::idmap::IdMap::parse(&need(v)?)?;
            spec.gid_map.squash = squash;
        }
        "squash_to_uid" | "squash_to_gid" => {
            let id = need(v)?
                .parse::<u32>()
                .ok()
                .filter(|&id| id != u32::MAX)
                .ok_or_else(|| format!("{k}: not an id: {}", v.unwrap_or("")))?;
            let map = match k {
                "squash_to_uid" => &mut spec.uid_map,
                _ => &mut spec.gid_map,
            };
            map.squash = Some(id);
        }
        "squash_to_root" => {
            spec.uid_map.squash = Some(0);
            spec.gid_map.squash = Some(0);
        }
        "ttl" => {
            let t: f64 = need(v)?
                .parse()
                .map_err(|_| format!("ttl: not a number of seconds: {}", v.unwrap_or("")))?;
            if !(0.0..=86400.0).contains(&t) {
                return Err(format!("ttl: {t} is outside 0..86400 seconds"));
            }
            spec.ttl = Some(t);
        }
        "nodev" | "nosuid" | "noexec" | "noatime" | "dev" | "suid" | "exec" | "atime" | "sync"
        | "async" | "dirsync" => spec.kernel_flags.push(k.to_string()),
        // Always on, or meaningless for us: accept silently.
        "default_permissions"
        | "allow_other"
        | "allow_root"
        | "auto_unmount"
        | "nonempty"
        | "defaults"
        | "auto"
        | "noauto"
        | "user"
        | "nouser"
        | "_netdev"
        | "nofail"
        | "relatime"
        | "strictatime"
        | "lazytime"
        | "index"
        | "xino"
        | "uuid"
        | "nfs_export" => {}
        _ => spec.unknown.push(o.to_string()),
    }
    Ok(())
}

/// Parse the fuse-overlayfs / mount.fuse3 form: `[SOURCE] MERGED` with `-o OPTS` anywhere,
/// `-f` for foreground.
pub fn parse_legacy(args: &[OsString]) -> Result<MountSpec, String> {
    let mut spec = MountSpec {
        // containers/storage commits AUFS-style whiteouts when it drives a mount program.
        aufs_whiteouts: true,
        // A drop-in for fuse-overlayfs renames lower directories as it does.
        dir_rename_copy: true,
        ..MountSpec::default()
    };
    let mut pos: Vec<PathBuf> = Vec::new();
    let mut it = args.iter();
    while let Some(a) = it.next() {
        let s = a.to_str().unwrap_or("");
        if s == "-o" {
            let v = it
                .next()
                .ok_or("-o needs an option string")?
                .to_str()
                .ok_or("options are not valid UTF-8")?;
            apply_opts(&mut spec, v)?;
        } else if let Some(v) = s.strip_prefix("-o") {
            apply_opts(&mut spec, v)?;
        } else if s == "-f" || s == "--foreground" {
            spec.foreground = true;
        } else if s == "-d" || s == "--debug" {
            spec.debug = true;
            spec.foreground = true;
        } else if s.starts_with('-') && s.len() > 1 {
            return Err(format!("unknown argument '{s}' (see unionfs-rs --help)"));
        } else {
            pos.push(PathBuf::from(a));
        }
    }
    match pos.len() {
        1 => spec.merged = Some(pos.remove(0)),
        2 => {
            let source = pos.remove(0);
            if spec.fsname.is_none() {
                spec.fsname = Some(source.to_string_lossy().into_owned());
            }
            spec.merged = Some(pos.remove(0));
        }
        0 => {
            return Err(
                "missing mount point (usage: unionfs-rs -o lowerdir=…,upperdir=…,workdir=… MERGED)"
                    .into(),
            );
        }
        _ => return Err("too many arguments (usage: unionfs-rs [SOURCE] MERGED -o OPTS)".into()),
    }
    Ok(spec)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lowerdir_splits_as_the_kernel_does() {
        let p = |v: &[&str]| v.iter().map(PathBuf::from).collect::<Vec<_>>();
        assert_eq!(split_lowers("a:b"), Ok((p(&["a", "b"]), vec![])));
        // An empty element at either end is ignored; `\` escapes a `:`.
        assert_eq!(split_lowers(":a:b:"), Ok((p(&["a", "b"]), vec![])));
        assert_eq!(split_lowers("a\\:b:c"), Ok((p(&["a:b", "c"]), vec![])));
        assert_eq!(
            split_opts("lowerdir=/a\\,b:/c\\:d,upperdir=/u\\,v,,ro"),
            vec!["lowerdir=/a,b:/c\\:d", "upperdir=/u,v", "", "ro"]
        );
        // `\\` is a pair: the comma after it splits.
        assert_eq!(split_opts("a\\\\,b"), vec!["a\\\\", "b"]);
        // `::` begins the data-only layers, each after another `::`.
        assert_eq!(split_lowers("a:b::d1"), Ok((p(&["a", "b"]), p(&["d1"]))));
        assert_eq!(split_lowers("a::d1::d2"), Ok((p(&["a"]), p(&["d1", "d2"]))));
        for bad in ["::d1", "a::d1:b", "a:::d1", "a::"] {
            assert!(split_lowers(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn legacy_form() {
        let args: Vec<OsString> = ["-o", "lowerdir=/a:/b,,upperdir=/u,workdir=/w,", "/m"]
            .iter()
            .map(OsString::from)
            .collect();
        let s = parse_legacy(&args).unwrap();
        assert_eq!(s.lowers, vec![PathBuf::from("/a"), PathBuf::from("/b")]);
        assert_eq!(s.upper, Some(PathBuf::from("/u")));
        assert_eq!(s.workdir, Some(PathBuf::from("/w")));
        assert_eq!(s.merged, Some(PathBuf::from("/m")));
        assert!(s.aufs_whiteouts);
        // fuse-overlayfs's rename of lower directories, unless asked for the kernel's EXDEV.
        assert!(s.dir_rename_copy);
        let mut s = MountSpec::default();
        assert!(!s.dir_rename_copy);
        apply_opts(&mut s, "dir_rename=copy").unwrap();
        assert!(s.dir_rename_copy);
        apply_opts(&mut s, "dir_rename=exdev").unwrap();
        assert!(!s.dir_rename_copy);
        assert!(apply_opts(&mut s, "dir_rename=redirect").is_err());
    }

    #[test]
    fn squash_ids() {
        let mut s = MountSpec::default();
        apply_opts(
            &mut s,
            "uidmapping=0:1000:1,squash_to_uid=5,squash_to_gid=6",
        )
        .unwrap();
        assert_eq!((s.uid_map.squash, s.gid_map.squash), (Some(5), Some(6)));
        // A mapping given after the squash keeps it.
        apply_opts(&mut s, "gidmapping=0:1000:1").unwrap();
        assert_eq!(s.gid_map.squash, Some(6));
        for bad in ["squash_to_gid=x", "squash_to_gid=4294967295"] {
            let e = apply_opts(&mut s, bad).unwrap_err();
            assert!(e.starts_with("squash_to_gid: not an id"), "{e}");
        }
        assert_eq!(s.gid_map.squash, Some(6));
    }

    #[test]
    fn passthrough_values() {
        let mut s = MountSpec::default();
        apply_opts(&mut s, "passthrough=lower").unwrap();
        assert!(!s.no_passthrough && s.lower_passthrough);
        apply_opts(&mut s, "passthrough=auto").unwrap();
        assert!(!s.no_passthrough && !s.lower_passthrough);
        apply_opts(&mut s, "passthrough=lower,nopassthrough").unwrap();
        assert!(s.no_passthrough && !s.lower_passthrough);
        apply_opts(&mut s, "passthrough").unwrap();
        assert!(!s.no_passthrough && !s.lower_passthrough);
        assert!(apply_opts(&mut s, "passthrough=upper").is_err());
    }

    #[test]
    fn mount_helper_form() {
        let args: Vec<OsString> = ["srcname", "/m", "-o", "rw,lowerdir=/l,fsname=x,bogus=1"]
            .iter()
            .map(OsString::from)
            .collect();
        let s = parse_legacy(&args).unwrap();
        assert_eq!(s.fsname.as_deref(), Some("x"));
        assert_eq!(s.unknown, vec!["bogus=1".to_string()]);
        assert!(s.upper.is_none());
    }

    #[test]
    fn bad_forms() {
        let a: Vec<OsString> = ["-o", "lowerdir="].iter().map(OsString::from).collect();
        assert!(parse_legacy(&a).is_err());
        let a: Vec<OsString> = ["-x", "/m"].iter().map(OsString::from).collect();
        assert!(parse_legacy(&a).is_err());
        let a: Vec<OsString> = ["a", "b", "c"].iter().map(OsString::from).collect();
        assert!(parse_legacy(&a).is_err());
    }
}
