//! The on-disk contract shared with kernel overlayfs (DESIGN.md section 2): how whiteouts and
//! opaque directories look, how to recognise them in a layer and how to write them in upper.

use std::ffi::{OsStr, OsString};
use std::os::fd::BorrowedFd;
use std::os::unix::ffi::{OsStrExt, OsStringExt};

use nix::errno::Errno;
use nix::sys::stat::{FileStat, Mode, SFlag};

use crate::layer::sys;

/// AUFS-style whiteout prefix (`.wh.NAME`), as containers/storage writes layers.
pub const AUFS_WH_PREFIX: &[u8] = b".wh.";
/// AUFS-style opaque marker file inside a directory.
pub const AUFS_OPAQUE: &[u8] = b".wh..wh..opq";

/// The xattr names of one mount: `trusted.overlay.*`, or `user.overlay.*` in userxattr mode.
#[derive(Debug, Clone)]
pub struct Names {
    /// `trusted.overlay.` or `user.overlay.`
    pub prefix: &'static str,
    /// `<prefix>opaque`
    pub opaque: OsString,
    /// `<prefix>whiteout`
    pub whiteout: OsString,
    /// `<prefix>redirect`
    pub redirect: OsString,
    /// `<prefix>metacopy`
    pub metacopy: OsString,
    /// `<prefix>impure`
    pub impure: OsString,
    /// honour AUFS `.wh.` names in lower layers
    pub aufs: bool,
}

impl Names {
    /// Names for the given mode.
    pub fn new(userxattr: bool, aufs: bool) -> Names {
        let prefix = if userxattr {
            "user.overlay."
        } else {
            "trusted.overlay."
        };
        Names {
            prefix,
            opaque: OsString::from(format!("{prefix}opaque")),
            whiteout: OsString::from(format!("{prefix}whiteout")),
            redirect: OsString::from(format!("{prefix}redirect")),
            metacopy: OsString::from(format!("{prefix}metacopy")),
            impure: OsString::from(format!("{prefix}impure")),
            aufs,
        }
    }

    /// Is this layer xattr private to the overlay (hidden from the merged view, not copied
    /// up)? Escaped names (`<prefix>overlay.*`, kernel 6.7+ nesting) are user data.
    pub fn is_private(&self, layer_name: &OsStr) -> bool {
        let b = layer_name.as_bytes();
        let p = self.prefix.as_bytes();
        b.starts_with(p) && !b[p.len()..].starts_with(b"overlay.")
    }

    /// The layer name of a merged-view xattr: `<prefix>X` is stored escaped as
    /// `<prefix>overlay.X`, as the kernel does for nested overlays.
    pub fn to_layer(&self, merged: &OsStr) -> OsString {
        let b = merged.as_bytes();
        let p = self.prefix.as_bytes();
        match b.strip_prefix(p) {
            Some(rest) => {
                let mut v = p.to_vec();
                v.extend_from_slice(b"overlay.");
                v.extend_from_slice(rest);
                OsString::from_vec(v)
            }
            None => merged.to_os_string(),
        }
    }

    /// The merged-view name of a layer xattr (`None`: private, hidden).
    pub fn to_merged(&self, layer_name: &OsStr) -> Option<OsString> {
        let b = layer_name.as_bytes();
        let p = self.prefix.as_bytes();
        match b.strip_prefix(p) {
            Some(rest) => rest.strip_prefix(b"overlay.").map(|r| {
                let mut v = p.to_vec();
                v.extend_from_slice(r);
                OsString::from_vec(v)
            }),
            None => Some(layer_name.to_os_string()),
        }
    }

    /// Is this directory entry name an AUFS whiteout/meta name that must be hidden?
    pub fn is_aufs_meta(&self, name: &OsStr) -> bool {
        self.aufs && name.as_bytes().starts_with(AUFS_WH_PREFIX)
    }

    /// The opaque mark of directory `name` in `dir`: `Some(b'y')` opaque, `Some(b'x')` holds
    /// xattr whiteouts (not opaque), `None` none.
    pub fn opaque_mark(&self, dir: BorrowedFd<'_>, name: &OsStr) -> Result<Option<u8>, Errno> {
        match sys::get_xattr(dir, name, &self.opaque) {
            Ok(Some(v)) if v.as_slice() == b"y" => Ok(Some(b'y')),
            Ok(Some(v)) if v.as_slice() == b"x" => Ok(Some(b'x')),
            Ok(_) => Ok(None),
            Err(Errno::ENOTSUP) | Err(Errno::EACCES) | Err(Errno::EPERM) => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// Is directory `name` in `parent` opaque: `<prefix>opaque=y`, or (AUFS mode) a
    /// `.wh..wh..opq` inside it — `dir` is an fd of the directory itself, for that check.
    pub fn is_opaque(
        &self,
        parent: BorrowedFd<'_>,
        name: &OsStr,
        dir: Option<BorrowedFd<'_>>,
    ) -> Result<bool, Errno> {
        if self.opaque_mark(parent, name)? == Some(b'y') {
            return Ok(true);
        }
        if self.aufs
            && let Some(d) = dir
        {
            return Ok(crate::layer::stat_at(d, OsStr::from_bytes(AUFS_OPAQUE)).is_ok());
        }
        Ok(false)
    }

    /// Does an AUFS whiteout `.wh.NAME` exist in `dir`?
    pub fn aufs_whiteout(&self, dir: BorrowedFd<'_>, name: &OsStr) -> bool {
        if !self.aufs {
            return false;
        }
        let mut v = AUFS_WH_PREFIX.to_vec();
        v.extend_from_slice(name.as_bytes());
        crate::layer::stat_at(dir, OsStr::from_bytes(&v)).is_ok()
    }

    /// Is the entry `name` with stat `st` in `dir` a whiteout? Char 0/0 always; in a lower
    /// directory marked `opaque=x` (`dir_has_x`), also a zero-size regular file with the
    /// whiteout xattr.
    pub fn is_whiteout(
        &self,
        dir: BorrowedFd<'_>,
        name: &OsStr,
        st: &FileStat,
        dir_has_x: bool,
    ) -> bool {
        let fmt = st.st_mode & libc::S_IFMT;
        if fmt == libc::S_IFCHR && st.st_rdev == 0 {
            return true;
        }
        if dir_has_x && fmt == libc::S_IFREG && st.st_size == 0 {
            return matches!(sys::get_xattr(dir, name, &self.whiteout), Ok(Some(_)));
        }
        false
    }

    /// The redirect of directory `name` in `dir` (`<prefix>redirect`, written by kernel
    /// overlayfs with `redirect_dir=on` on a directory it moved): where to look for it in the
    /// layers below. `Ok(None)`: none. A malformed value is EINVAL and a `.` or `..` in it
    /// EACCES, as kernel overlayfs fails such a lookup.
    pub fn redirect_of(
        &self,
        dir: BorrowedFd<'_>,
        name: &OsStr,
    ) -> Result<Option<Redirect>, Errno> {
        let v = match sys::get_xattr(dir, name, &self.redirect) {
            Ok(Some(v)) => v,
            Ok(None) | Err(Errno::ENOTSUP) => return Ok(None),
            Err(e) => return Err(e),
        };
        parse_redirect(&v).map(Some)
    }

    /// The overlay marks of directory `name` in `dir`, read with one listxattr (most
    /// directories have no xattrs at all, and then that is all it costs).
    pub fn dir_marks(&self, dir: BorrowedFd<'_>, name: &OsStr) -> Result<DirMarks, Errno> {
        let mut m = DirMarks::default();
        let names = match sys::list_xattr(dir, name) {
            Ok(v) => v,
            // (As a read of the opaque mark alone took them: no marks.)
            Err(Errno::ENOTSUP) | Err(Errno::EACCES) | Err(Errno::EPERM) => return Ok(m),
            Err(e) => return Err(e),
        };
        for x in names {
            if x == self.opaque {
                m.opaque = self.opaque_mark(dir, name)?;
            } else if x == self.redirect {
                m.redirect = self.redirect_of(dir, name).transpose();
            } else if x == self.impure {
                m.impure = true;
            }
        }
        Ok(m)
    }

    /// Is regular file `name` in `dir` a metacopy file (`<prefix>metacopy`, written by kernel
    /// overlayfs with `metacopy=on` on a file whose metadata alone it copied up): its data is
    /// that of the file found under its name (or its redirect) in the layers below.
    pub fn is_metacopy(&self, dir: BorrowedFd<'_>, name: &OsStr) -> Result<bool, Errno> {
        match sys::get_xattr(dir, name, &self.metacopy) {
            Ok(v) => Ok(v.is_some()),
            Err(Errno::ENOTSUP) => Ok(false),
            Err(e) => Err(e),
        }
    }

    /// Mark directory `name` in `dir` opaque (`<prefix>opaque=y`).
    pub fn set_opaque(&self, dir: BorrowedFd<'_>, name: &OsStr) -> Result<(), Errno> {
        sys::set_xattr(dir, name, &self.opaque, b"y", 0)
    }
}

/// What the overlay xattrs of a directory say ([`Names::dir_marks`]).
#[derive(Debug, Default)]
pub struct DirMarks {
    /// `opaque`: `y` opaque, `x` holds xattr whiteouts.
    pub opaque: Option<u8>,
    /// `redirect`, parsed (or why it cannot be).
    pub redirect: Option<Result<Redirect, Errno>>,
    /// `impure`: kernel overlayfs copied objects up into it (keeping their origin) — the
    /// only directories where it leaves metacopy files.
    pub impure: bool,
}

/// A directory's redirect (kernel overlayfs `redirect_dir`): a name in the same parent, or a
/// path from the root of the union.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Redirect {
    /// Moved within its parent: its name in the layers below.
    Rel(OsString),
    /// Moved elsewhere: its path from the layer root, component by component.
    Abs(Vec<OsString>),
}

/// Parse a redirect xattr value as the kernel does (ovl_get_redirect_xattr): the string up
/// to a NUL; absolute (`/a/b`, no empty component) or one name without a `/`.
pub fn parse_redirect(v: &[u8]) -> Result<Redirect, Errno> {
    let v = v.split(|&b| b == 0).next().unwrap_or_default();
    if v.is_empty() {
        return Err(Errno::EINVAL);
    }
    let comp = |c: &[u8]| -> Result<OsString, Errno> {
        match c {
            b"" => Err(Errno::EINVAL),
            // The kernel's lookup of such a component fails with EACCES.
            b"." | b".." => Err(Errno::EACCES),
            c if c.len() > 255 => Err(Errno::ENAMETOOLONG),
            c => Ok(OsStr::from_bytes(c).to_os_string()),
        }
    };
    match v.strip_prefix(b"/") {
        Some(rest) => Ok(Redirect::Abs(
            rest.split(|&b| b == b'/')
                .map(comp)
                .collect::<Result<Vec<_>, _>>()?,
        )),
        None if v.contains(&b'/') => Err(Errno::EINVAL),
        None => Ok(Redirect::Rel(comp(v)?)),
    }
}

/// Is `st` a char 0/0 whiteout?
pub fn is_whiteout_stat(st: &FileStat) -> bool {
    (st.st_mode & libc::S_IFMT) == libc::S_IFCHR && st.st_rdev == 0
}

/// Create a whiteout (char device 0/0) named `name` in `dir`.
pub fn make_whiteout(dir: BorrowedFd<'_>, name: &OsStr) -> Result<(), Errno> {
    nix::sys::stat::mknodat(dir, name, SFlag::S_IFCHR, Mode::empty(), 0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn redirects_parse_as_the_kernel_reads_them() {
        let abs = |v: &[&str]| Redirect::Abs(v.iter().map(OsString::from).collect());
        assert_eq!(parse_redirect(b"a"), Ok(Redirect::Rel("a".into())));
        assert_eq!(parse_redirect(b"a\0junk"), Ok(Redirect::Rel("a".into())));
        assert_eq!(parse_redirect(b"/a"), Ok(abs(&["a"])));
        assert_eq!(parse_redirect(b"/a/b c/d"), Ok(abs(&["a", "b c", "d"])));
        for bad in [&b""[..], b"\0", b"/", b"//a", b"/a/", b"/a//b", b"a/b"] {
            assert_eq!(parse_redirect(bad), Err(Errno::EINVAL), "{bad:?}");
        }
        for bad in [&b"."[..], b"..", b"/a/../b", b"/."] {
            assert_eq!(parse_redirect(bad), Err(Errno::EACCES), "{bad:?}");
        }
    }
}
