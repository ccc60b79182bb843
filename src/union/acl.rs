//! POSIX ACLs in their xattr form (`system.posix_acl_access` / `system.posix_acl_default`,
//! version 2: a 4-byte header, then 8-byte entries tag/perm/id, little-endian).
//!
//! The kernel enforces ACLs on the mount itself (FUSE_POSIX_ACL); the daemon's part is what
//! the kernel leaves to a FUSE filesystem: giving a new object the ACL and mode its parent's
//! default ACL calls for (posix_acl_create in fs/posix_acl.c, which kernel overlayfs applies on
//! the merged parent and writes to upper, ovl_create_or_link), applying the umask only where
//! there is no default ACL, and showing ACL entries' ids through the mount's id mapping.

use std::os::unix::ffi::OsStrExt;
use std::sync::atomic::Ordering;

use nix::errno::Errno;

use super::file::SetAttr;
use super::idmap::IdMap;
use super::{Caller, Node, Union};

/// `system.posix_acl_access`.
pub const ACCESS: &str = "system.posix_acl_access";
/// `system.posix_acl_default`.
pub const DEFAULT: &str = "system.posix_acl_default";

const VERSION: u32 = 2;
const USER_OBJ: u16 = 0x01;
const USER: u16 = 0x02;
const GROUP_OBJ: u16 = 0x04;
const GROUP: u16 = 0x08;
const MASK: u16 = 0x10;
const OTHER: u16 = 0x20;

/// One ACL entry.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Entry {
    pub tag: u16,
    pub perm: u16,
    pub id: u32,
}

/// Parse the xattr form. EINVAL for anything that is not a version-2 ACL.
pub fn parse(v: &[u8]) -> Result<Vec<Entry>, Errno> {
    if v.len() < 4 || (v.len() - 4) % 8 != 0 {
        return Err(Errno::EINVAL);
    }
    let u32_at = |i: usize| u32::from_le_bytes([v[i], v[i + 1], v[i + 2], v[i + 3]]);
    let u16_at = |i: usize| u16::from_le_bytes([v[i], v[i + 1]]);
    if u32_at(0) != VERSION {
        return Err(Errno::EINVAL);
    }
    Ok((4..v.len())
        .step_by(8)
        .map(|i| Entry {
            tag: u16_at(i),
            perm: u16_at(i + 2),
            id: u32_at(i + 4),
        })
        .collect())
}

/// The xattr form of `acl`.
pub fn encode(acl: &[Entry]) -> Vec<u8> {
    let mut v = Vec::with_capacity(4 + 8 * acl.len());
    v.extend_from_slice(&VERSION.to_le_bytes());
    for e in acl {
        v.extend_from_slice(&e.tag.to_le_bytes());
        v.extend_from_slice(&e.perm.to_le_bytes());
        v.extend_from_slice(&e.id.to_le_bytes());
    }
    v
}

/// The id a named entry shows when its user or group has no id in the reader's user namespace
/// ((uid_t)-1: the kernel's posix_acl_to_xattr gives it for an unmapped kuid).
const UNMAPPED: u32 = u32::MAX;

/// `v` without its named entries of users or groups unmapped in the daemon's user namespace
/// (None: there are none, or `v` is not an ACL). Rootless, a layer's ACL may name a host id
/// the namespace does not map: read from here it names (uid_t)-1, which the FUSE kernel refuses
/// in an ACL we answer with (EINVAL for every getxattr, and so `getfacl`) and which no setxattr
/// accepts (EINVAL for every copy-up of the file, and every create under a default ACL naming
/// it). Left out, they grant nothing to anyone in the namespace, where no process can be that
/// id. (Kernel overlayfs keeps the kernel's raw entry, which no userspace daemon can reach.)
pub fn strip_unmapped(v: &[u8]) -> Option<Vec<u8>> {
    let acl = parse(v).ok()?;
    let named = |e: &Entry| matches!(e.tag, USER | GROUP) && e.id == UNMAPPED;
    if !acl.iter().any(named) {
        return None;
    }
    let kept: Vec<Entry> = acl.into_iter().filter(|e| !named(e)).collect();
    Some(encode(&kept))
}

/// The first of `old`'s entries picked by `hidden` (users and groups the mount cannot show)
/// whose holder could get more access than that entry gives it now if the ACL became `new`
/// (None: no ACL, the mode's group and other bits `mode` deciding instead). Such an entry
/// can only narrow (a user who may read nothing where everyone else may): left out of an ACL
/// the daemon writes, it would widen that user's access to the file on the host. Which
/// groups a hidden user is in is not known, so what any group-class entry grants counts for
/// it; a hidden group's members who match no other entry fall to `other`.
pub fn widening(
    old: &[Entry],
    hidden: impl Fn(&Entry) -> bool,
    new: Option<&[Entry]>,
    mode: u32,
) -> Option<Entry> {
    let mask_of = |acl: &[Entry]| acl.iter().find(|e| e.tag == MASK).map_or(7, |e| e.perm & 7);
    let (group_class, other) = match new {
        Some(acl) => {
            let m = mask_of(acl);
            let g = acl
                .iter()
                .filter(|e| matches!(e.tag, GROUP_OBJ | GROUP))
                .fold(0, |a, e| a | (e.perm & m));
            let o = acl
                .iter()
                .find(|e| e.tag == OTHER)
                .map_or(0, |e| e.perm & 7);
            (g, o)
        }
        None => (((mode >> 3) & 7) as u16, (mode & 7) as u16),
    };
    let old_mask = mask_of(old);
    old.iter()
        .filter(|e| matches!(e.tag, USER | GROUP) && hidden(e))
        .find(|e| {
            let now = e.perm & old_mask;
            let fall = if e.tag == USER {
                group_class | other
            } else {
                other
            };
            fall & !now != 0
        })
        .copied()
}

/// [`strip_unmapped`] of `v` would widen access (see [`widening`]) for this entry.
pub fn strip_widens(v: &[u8]) -> Option<Entry> {
    let acl = parse(v).ok()?;
    let unmapped = |e: &Entry| e.id == UNMAPPED;
    let kept: Vec<Entry> = acl
        .iter()
        .filter(|e| !(matches!(e.tag, USER | GROUP) && unmapped(e)))
        .copied()
        .collect();
    widening(&acl, unmapped, Some(&kept), 0)
}

/// How an entry reads in a message.
pub fn describe(e: &Entry) -> String {
    let who = if e.tag == USER { "user" } else { "group" };
    let id = if e.id == UNMAPPED {
        "(unmapped)".to_string()
    } else {
        e.id.to_string()
    };
    let p = |bit: u16, c: char| if e.perm & bit != 0 { c } else { '-' };
    format!("{who}:{id}:{}{}{}", p(4, 'r'), p(2, 'w'), p(1, 'x'))
}

/// Is `name` one of the two ACL xattrs?
pub fn is_acl_name(name: &[u8]) -> bool {
    name == ACCESS.as_bytes() || name == DEFAULT.as_bytes()
}

/// The access ACL and mode of an object created with `mode` under a default ACL `default`
/// (posix_acl_create_masq): the owner, other and mask (group if no mask) entries lose what the
/// mode lacks, and the mode's permission bits lose what those entries lack. Returns the new
/// mode and the access ACL, `None` when the ACL says no more than the mode does.
pub fn create_masq(default: &[Entry], mode: u32) -> Result<(u32, Option<Vec<Entry>>), Errno> {
    let mut acl = default.to_vec();
    let mut m = mode & 0o777;
    let mut extended = false;
    let (mut group_obj, mut mask) = (None, None);
    for (i, e) in acl.iter_mut().enumerate() {
        match e.tag {
            USER_OBJ => {
                e.perm &= ((m >> 6) & 7) as u16;
                m &= (u32::from(e.perm) << 6) | !0o700;
            }
            USER | GROUP => extended = true,
            GROUP_OBJ => group_obj = Some(i),
            OTHER => {
                e.perm &= (m & 7) as u16;
                m &= u32::from(e.perm) | !0o007;
            }
            MASK => {
                mask = Some(i);
                extended = true;
            }
            _ => return Err(Errno::EIO),
        }
    }
    let g = mask.or(group_obj).ok_or(Errno::EIO)?;
    acl[g].perm &= ((m >> 3) & 7) as u16;
    m &= (u32::from(acl[g].perm) << 3) | !0o070;
    let mode = (mode & !0o777) | (m & 0o777);
    Ok((mode, extended.then_some(acl)))
}

/// Map the ids of an ACL's named user and group entries with `uid` / `gid`; an id they cannot
/// map (None) drops its entry (`drop_unmapped`) or fails the whole ACL with EINVAL.
fn map_ids(
    v: &[u8],
    uid: impl Fn(u32) -> Option<u32>,
    gid: impl Fn(u32) -> Option<u32>,
    drop_unmapped: bool,
) -> Result<Vec<u8>, Errno> {
    let mut acl = parse(v)?;
    let mut out = Vec::with_capacity(acl.len());
    for mut e in acl.drain(..) {
        let mapped = match e.tag {
            USER => uid(e.id),
            GROUP => gid(e.id),
            _ => Some(e.id),
        };
        match mapped {
            Some(id) => {
                e.id = id;
                out.push(e);
            }
            None if drop_unmapped => {}
            None => return Err(Errno::EINVAL),
        }
    }
    Ok(encode(&out))
}

/// An ACL as stored (ids on disk) in the ids the mount shows. Entries naming a disk id the
/// mapping does not cover are left out: shown as the overflow id, as owners are, they would
/// grant that user (nobody) what they grant, while no process of the view can be their id.
pub fn to_view(v: &[u8], uids: &IdMap, gids: &IdMap) -> Result<Vec<u8>, Errno> {
    if uids.is_identity() && gids.is_identity() {
        return Ok(strip_unmapped(v).unwrap_or_else(|| v.to_vec()));
    }
    map_ids(v, |u| uids.view_of(u), |g| gids.view_of(g), true)
}

/// An ACL given in the mount's ids as it is stored; EINVAL for an id with no disk id.
pub fn to_disk(v: &[u8], uids: &IdMap, gids: &IdMap) -> Result<Vec<u8>, Errno> {
    if uids.is_identity() && gids.is_identity() {
        return Ok(v.to_vec());
    }
    map_ids(v, |u| uids.to_disk(u), |g| gids.to_disk(g), false)
}

/// ACL xattrs (name, value) to give a new object.
pub(crate) type NewAcls = Vec<(&'static str, Vec<u8>)>;

impl Union {
    /// The kernel enforces ACLs on the mount and leaves the umask to us (its answer at INIT).
    pub fn set_posix_acl(&self, on: bool) {
        self.posix_acl.store(on, Ordering::Release);
    }

    /// Are ACLs on (see [`Union::set_posix_acl`])?
    pub fn posix_acl_on(&self) -> bool {
        self.posix_acl.load(Ordering::Acquire)
    }

    /// Setting an access ACL on a set-gid file clears the bit unless the caller is in the
    /// file's group or has CAP_FSETID (the kernel does so for local filesystems and overlayfs,
    /// CVE-2016-7097; FUSE reports it only with FUSE_SETXATTR_EXT, which fuser cannot parse).
    pub(crate) fn kill_sgid_for_acl(&self, ino: u64, who: Caller) -> super::Result<()> {
        let a = self.getattr(ino, None)?;
        if a.mode & libc::S_ISGID == 0 || in_group_or_capable(who, a.uid, a.gid) {
            return Ok(());
        }
        let clear = SetAttr {
            mode: Some(a.mode & 0o7777 & !libc::S_ISGID),
            ..SetAttr::default()
        };
        self.setattr(ino, &clear).map(drop)
    }

    /// Refuse (EPERM) to set `node`'s ACL xattr `lname` to `new` (as stored; None: remove
    /// it) when its ACL now names a user or group the mount cannot show (an id its user
    /// namespace or its id mapping does not cover, left out of the ACL the mount shows) and
    /// the change would give that user or group more access on the host than it has (see
    /// [`widening`]): an ACL set through the mount cannot name it again.
    pub(crate) fn check_acl_change(
        &self,
        node: &Node,
        lname: &[u8],
        new: Option<&[u8]>,
    ) -> super::Result<()> {
        let all = self.xattrs_of(node)?;
        let Some(old) = all
            .iter()
            .find(|(n, _)| n.as_bytes() == lname)
            .and_then(|(_, v)| parse(v).ok())
        else {
            return Ok(());
        };
        let hidden = |e: &Entry| {
            e.id == UNMAPPED
                || match e.tag {
                    USER => self.uid_map.view_of(e.id).is_none(),
                    _ => self.gid_map.view_of(e.id).is_none(),
                }
        };
        if !old
            .iter()
            .any(|e| matches!(e.tag, USER | GROUP) && hidden(e))
        {
            return Ok(());
        }
        let new = match new {
            Some(v) => Some(parse(v).map_err(|e| super::Error::new(e, "setxattr: ACL"))?),
            None => None,
        };
        // Without a default ACL, new objects get what their creators ask for.
        let mode = if lname == DEFAULT.as_bytes() {
            0o777
        } else {
            self.getattr(node.ino, None)?.mode
        };
        let Some(e) = widening(&old, hidden, new.as_deref(), mode) else {
            return Ok(());
        };
        log::warn!(
            "refusing to {} an ACL that restricts {}, which the mount cannot show: \
             it would lose that restriction on the host",
            if new.is_some() { "replace" } else { "remove" },
            describe(&e)
        );
        Err(super::Error::new(
            Errno::EPERM,
            "ACL change would drop a restriction of an id the mount cannot show",
        ))
    }

    /// The mode of a new object under `parent` created with `mode` by a caller with `umask`,
    /// and the ACL xattrs to give it: the parent's default ACL decides if there is one
    /// (posix_acl_create: the umask does not apply), else the umask does. With ACLs off the
    /// kernel has applied the umask already.
    pub(crate) fn new_object_acls(
        &self,
        parent: &Node,
        mode: u32,
        umask: u32,
        is_dir: bool,
    ) -> super::Result<(u32, NewAcls)> {
        if !self.posix_acl_on() {
            return Ok((mode, Vec::new()));
        }
        let all = self.xattrs_of(parent)?;
        let Some((_, dv)) = all.iter().find(|(n, _)| n.as_bytes() == DEFAULT.as_bytes()) else {
            return Ok((mode & !(umask & 0o777), Vec::new()));
        };
        let stripped = strip_unmapped(dv);
        if stripped.is_some()
            && let Some(e) = strip_widens(dv)
        {
            // Left out, the entry would give that user or group more on the new object
            // than the directory asks for; it cannot be written from this user namespace.
            log::warn!(
                "refusing to create under a directory whose default ACL restricts {}, \
                 which this user namespace does not map (the new object would not be \
                 restricted on the host)",
                describe(&e)
            );
            return Err(super::Error::new(
                Errno::EACCES,
                "parent's default ACL restricts an unmapped id",
            ));
        }
        let dv = stripped.as_ref().unwrap_or(dv);
        let default = parse(dv).map_err(|e| super::Error::new(e, "parent's default ACL"))?;
        if default.is_empty() {
            // No entries: no default ACL (posix_acl_from_xattr gives none).
            return Ok((mode & !(umask & 0o777), Vec::new()));
        }
        let (mode, access) = create_masq(&default, mode)
            .map_err(|e| super::Error::new(e, "parent's default ACL"))?;
        let mut set = Vec::new();
        if let Some(a) = access {
            set.push((ACCESS, encode(&a)));
        }
        if is_dir {
            set.push((DEFAULT, dv.clone()));
        }
        Ok((mode, set))
    }
}

/// What /proc/PID/status says of a caller's thread: its supplementary groups and effective
/// capabilities, and whether it runs in the daemon's user namespace and in the initial one.
/// None where it cannot be read (the process is gone, or hidden from us), or where the
/// thread's fsuid and fsgid are not the request's (the request's pid is numbered in the
/// mounter's pid namespace: another process's status must not speak for the caller).
struct CallerStatus {
    groups: Vec<u32>,
    cap_eff: u64,
    same_userns: bool,
    init_userns: bool,
}

const CAP_DAC_OVERRIDE: u32 = 1;
const CAP_FOWNER: u32 = 3;
const CAP_FSETID: u32 = 4;

fn caller_status(who: Caller) -> Option<CallerStatus> {
    /// The initial user namespace's inode number (PROC_USER_INIT_INO), whoever looks.
    const INIT_USER_NS: &str = "user:[4026531837]";
    let proc = format!("/proc/{}", who.pid);
    let status = std::fs::read_to_string(format!("{proc}/status")).ok()?;
    let ns = std::fs::read_link(format!("{proc}/ns/user")).ok();
    let own = std::fs::read_link("/proc/self/ns/user").ok();
    let mut st = CallerStatus {
        groups: Vec::new(),
        cap_eff: 0,
        same_userns: ns.is_some() && ns == own,
        init_userns: ns.is_some_and(|n| n.as_os_str() == INIT_USER_NS),
    };
    // "Uid:/Gid: real effective saved fs".
    let fs_id = |l: &str| {
        l.split_whitespace()
            .nth(3)
            .and_then(|v| v.parse::<u32>().ok())
    };
    let (mut fsuid, mut fsgid) = (None, None);
    for l in status.lines() {
        if let Some(g) = l.strip_prefix("Groups:") {
            st.groups = g
                .split_whitespace()
                .filter_map(|g| g.parse().ok())
                .collect();
        } else if let Some(c) = l.strip_prefix("CapEff:") {
            st.cap_eff = u64::from_str_radix(c.trim(), 16).unwrap_or(0);
        } else if let Some(u) = l.strip_prefix("Uid:") {
            fsuid = fs_id(u);
        } else if let Some(g) = l.strip_prefix("Gid:") {
            fsgid = fs_id(g);
        }
    }
    (fsuid == Some(who.uid) && fsgid == Some(who.gid)).then_some(st)
}

impl CallerStatus {
    fn has(&self, cap: u32) -> bool {
        self.cap_eff & (1 << cap) != 0
    }

    /// Does `who` hold `cap` over a file owned by `uid`:`gid` (ids of the daemon's user
    /// namespace)? As the kernel's `capable_wrt_inode_uidgid`: the capability in the caller's
    /// own user namespace, and both ids mapped there. So root of the daemon's namespace, and
    /// root of a namespace made below it that maps the file's ids (podman's
    /// `--userns=keep-id` containers under a rootless mount program); not root of a
    /// namespace of the caller's own that maps only itself (`unshare -Ur`).
    fn capable_over(&self, who: Caller, cap: u32, uid: u32, gid: u32) -> bool {
        self.has(cap) && (self.same_userns || ids_mapped(who.pid, uid, gid))
    }
}

/// Are `uid` and `gid` (ids of the daemon's user namespace) mapped in the user namespace of
/// thread `pid`? Its `uid_map` and `gid_map`, read from another namespace, give the outside
/// ids in the reader's terms (user_namespaces(7)); unreadable: no.
fn ids_mapped(pid: u32, uid: u32, gid: u32) -> bool {
    let mapped = |file: &str, id: u32| {
        std::fs::read_to_string(format!("/proc/{pid}/{file}")).is_ok_and(|m| {
            m.lines().any(|l| {
                let v: Vec<u64> = l
                    .split_whitespace()
                    .filter_map(|x| x.parse().ok())
                    .collect();
                v.len() == 3 && u64::from(id) >= v[1] && u64::from(id) < v[1] + v[2]
            })
        })
    };
    mapped("uid_map", uid) && mapped("gid_map", gid)
}

/// Is `who` in the group of a file owned by `uid`:`gid` (its fsgid or a supplementary group)
/// or holding CAP_FSETID over it ([`CallerStatus::capable_over`])? Read from /proc/PID (the
/// caller's thread); unreadable: only the fsgid counts.
pub(crate) fn in_group_or_capable(who: Caller, uid: u32, gid: u32) -> bool {
    who.gid == gid
        || caller_status(who)
            .is_some_and(|s| s.groups.contains(&gid) || s.capable_over(who, CAP_FSETID, uid, gid))
}

/// Whether `who` may change the mode of a file owned by `uid`:`gid`: its owner, or holding
/// CAP_FOWNER over it (unreadable: the owner only).
pub(crate) fn owner_or_capable(who: Caller, uid: u32, gid: u32) -> bool {
    who.uid == uid || caller_status(who).is_some_and(|s| s.capable_over(who, CAP_FOWNER, uid, gid))
}

/// Whether the mode bits (`mode`, owner `uid`, group `gid`) let `who` write, or it holds
/// CAP_DAC_OVERRIDE over the file. (ACLs are the caller's to consult.)
pub(crate) fn mode_lets_write(who: Caller, mode: u32, uid: u32, gid: u32) -> bool {
    let status = std::cell::OnceCell::new();
    let status = || status.get_or_init(|| caller_status(who));
    let bit = if who.uid == uid {
        0o200
    } else if who.gid == gid || status().as_ref().is_some_and(|s| s.groups.contains(&gid)) {
        0o020
    } else {
        0o002
    };
    mode & bit != 0
        || status()
            .as_ref()
            .is_some_and(|s| s.capable_over(who, CAP_DAC_OVERRIDE, uid, gid))
}

/// Whether `who` lacks CAP_FSETID in the initial user namespace, which is what the kernel's
/// `capable(CAP_FSETID)` asks of a writing or truncating caller. When that cannot be told, it
/// is taken to lack it: set-id bits are cleared, the safe way.
pub(crate) fn lacks_fsetid(who: Caller) -> bool {
    !caller_status(who).is_some_and(|s| s.init_userns && s.has(CAP_FSETID))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn e(tag: u16, perm: u16, id: u32) -> Entry {
        Entry { tag, perm, id }
    }

    #[test]
    fn dropping_hidden_entries_that_restrict_widens() {
        let x = UNMAPPED;
        let hidden = |e: &Entry| e.id == x;
        let strip = |acl: &[Entry]| -> Vec<Entry> {
            acl.iter()
                .filter(|e| !(matches!(e.tag, USER | GROUP) && e.id == x))
                .copied()
                .collect()
        };
        let base = |named: Entry, group: u16, mask: u16, other: u16| {
            vec![
                e(USER_OBJ, 6, 0),
                named,
                e(GROUP_OBJ, group, 0),
                e(MASK, mask, 0),
                e(OTHER, other, 0),
            ]
        };
        // A user who may read nothing where others may read: dropped, they could read.
        let acl = base(e(USER, 0, x), 4, 6, 4);
        assert_eq!(widening(&acl, hidden, Some(&strip(&acl)), 0), Some(acl[1]));
        // Others get nothing, but the user may be in the owning group, which may read.
        let acl = base(e(USER, 0, x), 4, 6, 0);
        assert!(widening(&acl, hidden, Some(&strip(&acl)), 0).is_some());
        // The mask limits what the user had: r-x masked to r-- against a group's r--.
        let acl = base(e(USER, 5, x), 4, 4, 4);
        assert_eq!(widening(&acl, hidden, Some(&strip(&acl)), 0), None);
        // A user granted at least what everyone else gets: nothing to lose.
        let acl = base(e(USER, 7, x), 4, 7, 4);
        assert_eq!(widening(&acl, hidden, Some(&strip(&acl)), 0), None);
        // A group's members fall to other only.
        let acl = base(e(GROUP, 0, x), 6, 6, 0);
        assert_eq!(widening(&acl, hidden, Some(&strip(&acl)), 0), None);
        let acl = base(e(GROUP, 0, x), 6, 6, 4);
        assert_eq!(widening(&acl, hidden, Some(&strip(&acl)), 0), Some(acl[1]));
        // Removing the ACL: the mode's bits decide.
        let acl = base(e(USER, 4, x), 4, 4, 0);
        assert_eq!(widening(&acl, hidden, None, 0o640), None);
        assert!(widening(&acl, hidden, None, 0o660).is_some());
        // Entries that are not hidden are none of its business.
        let acl = base(e(USER, 0, 1000), 4, 6, 4);
        assert_eq!(widening(&acl, hidden, Some(&strip(&acl)), 0), None);
        assert_eq!(strip_widens(&encode(&acl)), None);
        assert_eq!(
            strip_widens(&encode(&base(e(USER, 0, x), 4, 6, 4))),
            Some(e(USER, 0, x))
        );
        assert_eq!(describe(&e(USER, 5, x)), "user:(unmapped):r-x");
        assert_eq!(describe(&e(GROUP, 6, 7)), "group:7:rw-");
    }

    /// This thread as a FUSE request would name it.
    fn me() -> Caller {
        // SAFETY: getuid/getgid/gettid have no preconditions.
        let (uid, gid, tid) = unsafe { (libc::getuid(), libc::getgid(), libc::gettid()) };
        Caller {
            uid,
            gid,
            pid: tid as u32,
        }
    }

    /// The status of a thread speaks for a caller only if its fsuid and fsgid are the
    /// request's: a pid from another pid namespace must not lend another process's
    /// capabilities (the safe answers then: not capable, lacking CAP_FSETID).
    #[test]
    fn caller_status_is_the_callers_only_if_its_ids_match() {
        let me = me();
        let st = caller_status(me).expect("own status");
        assert!(st.same_userns);
        let other = Caller {
            uid: me.uid.wrapping_add(1),
            ..me
        };
        assert!(
            caller_status(other).is_none(),
            "another fsuid's status was used"
        );
        assert!(
            caller_status(Caller {
                gid: me.gid.wrapping_add(1),
                ..me
            })
            .is_none()
        );
        assert!(lacks_fsetid(other));
        assert!(!owner_or_capable(other, me.uid.wrapping_add(2), 0));
        if me.uid == 0 && st.init_userns && st.has(CAP_FSETID) {
            // Root in the initial namespace (the test machines): capable, as the kernel says.
            assert!(!lacks_fsetid(me));
            assert!(owner_or_capable(me, 12345, 12345));
            assert!(mode_lets_write(me, 0o100000, 12345, 12345));
        }
        // Gone or never there: unknown.
        let gone = Caller {
            pid: u32::MAX - 1,
            ..me
        };
        assert!(caller_status(gone).is_none());
        assert!(lacks_fsetid(gone));
    }
    const U: u32 = u32::MAX;

    #[test]
    fn round_trip() {
        let acl = vec![
            e(USER_OBJ, 7, U),
            e(USER, 5, 1000),
            e(GROUP_OBJ, 5, U),
            e(MASK, 7, U),
            e(OTHER, 0, U),
        ];
        assert_eq!(parse(&encode(&acl)).unwrap(), acl);
        assert_eq!(parse(&[2, 0, 0, 0, 1]), Err(Errno::EINVAL));
        assert_eq!(parse(&[1, 0, 0, 0]), Err(Errno::EINVAL));
    }

    #[test]
    fn masq_as_the_kernel() {
        // setfacl -d -m u:nobody:rwx on a 755 dir: default u::rwx,u:65534:rwx,g::r-x,m::rwx,o::r-x.
        let d = vec![
            e(USER_OBJ, 7, U),
            e(USER, 7, 65534),
            e(GROUP_OBJ, 5, U),
            e(MASK, 7, U),
            e(OTHER, 5, U),
        ];
        // open(O_CREAT, 0666) (umask ignored): mode 0664, mask rw-.
        let (mode, acl) = create_masq(&d, libc::S_IFREG | 0o666).unwrap();
        assert_eq!(mode, libc::S_IFREG | 0o664);
        let acl = acl.unwrap();
        assert_eq!(acl[0].perm, 6);
        assert_eq!(
            acl[1].perm, 7,
            "named entries keep their perms (the mask limits them)"
        );
        assert_eq!(acl[3].perm, 6);
        assert_eq!(acl[4].perm, 4);
        // mkdir 0777 with the set-gid bit kept.
        let (mode, _) = create_masq(&d, libc::S_IFDIR | 0o2777).unwrap();
        assert_eq!(mode, libc::S_IFDIR | 0o2775);
        // A default ACL of base entries only: no access ACL, mode limited by it.
        let base = vec![e(USER_OBJ, 6, U), e(GROUP_OBJ, 4, U), e(OTHER, 0, U)];
        assert_eq!(create_masq(&base, 0o777).unwrap(), (0o640, None));
        assert_eq!(create_masq(&[e(USER_OBJ, 7, U)], 0o777), Err(Errno::EIO));
    }

    #[test]
    fn ids_follow_the_mapping() {
        let uids = IdMap::parse("100000:0:65536").unwrap();
        let gids = IdMap::parse("200000:0:65536").unwrap();
        let disk = encode(&[
            e(USER_OBJ, 7, U),
            e(USER, 5, 101000),
            e(GROUP, 5, 201000),
            e(MASK, 7, U),
            e(OTHER, 0, U),
            e(GROUP_OBJ, 5, U),
        ]);
        let view = to_view(&disk, &uids, &gids).unwrap();
        let v = parse(&view).unwrap();
        assert_eq!((v[1].id, v[2].id, v[0].id), (1000, 1000, U));
        assert_eq!(to_disk(&view, &uids, &gids).unwrap(), disk);
        let unmapped = encode(&[e(USER, 5, 70000)]);
        assert_eq!(to_disk(&unmapped, &uids, &gids), Err(Errno::EINVAL));
        // A disk id no range covers: the entry is not shown (as 65534 it would grant nobody).
        let base = [
            e(USER_OBJ, 6, U),
            e(GROUP_OBJ, 4, U),
            e(MASK, 6, U),
            e(OTHER, 0, U),
        ];
        let mut with = base.to_vec();
        with.insert(1, e(USER, 6, 70000));
        assert_eq!(
            to_view(&encode(&with), &uids, &gids).unwrap(),
            encode(&base)
        );
    }
}
