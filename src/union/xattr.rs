//! Extended attributes through the merged view (kernel fs/overlayfs/xattrs.c): the overlay's
//! private xattrs are invisible; names in the overlay's own namespace are escaped
//! (`trusted.overlay.X` is stored as `trusted.overlay.overlay.X`, as kernel 6.7+ does for
//! nested overlays); setting or removing copies up first.

use std::ffi::{OsStr, OsString};
use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::sync::Arc;
use std::sync::atomic::Ordering;

use nix::errno::Errno;
use nix::fcntl::OFlag;
use nix::sys::stat::Mode;

use super::inode::XattrCache;
use super::{Caller, Ctx, Error, LayerRef, Node, Result, Union, acl};

use crate::layer::sys;

/// The SELinux label's xattr name.
const SELINUX: &str = "security.selinux";

/// Is SELinux enabled on this host (its filesystem is registered only then)?
pub(crate) fn selinux_enabled() -> bool {
    std::fs::read_to_string("/proc/filesystems")
        .map(|s| {
            s.lines()
                .any(|l| l.split_whitespace().last() == Some("selinuxfs"))
        })
        // Unknown: keep the exact answer.
        .unwrap_or(true)
}

impl Union {
    /// The node's xattrs in its top layer, from the node's cache (loaded on first use: `ls -l`
    /// asks two or three absent xattrs per file, the kernel one per write).
    pub(crate) fn xattrs_of(&self, node: &Node) -> Result<XattrCache> {
        if let Some(c) = node.xattrs.lock().as_ref() {
            return Ok(c.clone());
        }
        let generation = node.xgen.load(Ordering::Acquire);
        let st = node.state();
        let v = self.read_in(node, st.top(), |dir, name| {
            let names = match sys::list_xattr(dir, name) {
                Ok(n) => n,
                Err(Errno::ENOTSUP) => Vec::new(),
                Err(e) => return Err(Error::new(e, "listxattr")),
            };
            let mut v = Vec::with_capacity(names.len());
            for x in names {
                match sys::get_xattr(dir, name, &x) {
                    Ok(Some(val)) => v.push((x, val)),
                    Ok(None) => {}
                    Err(e) => return Err(Error::new(e, "getxattr")),
                }
            }
            Ok(v)
        })?;
        let c: XattrCache = Arc::new(v);
        let mut slot = node.xattrs.lock();
        if node.xgen.load(Ordering::Acquire) == generation {
            *slot = Some(c.clone());
        }
        Ok(c)
    }

    /// getxattr.
    pub fn getxattr(&self, ino: u64, xname: &OsStr) -> Result<Vec<u8>> {
        self.getxattr_requests.fetch_add(1, Ordering::Relaxed);
        let lname = self.names.to_layer(xname);
        let node = self.node(ino)?;
        let all = self.xattrs_of(&node)?;
        let Some(v) = all.iter().find(|(n, _)| *n == lname).map(|(_, v)| v) else {
            if self.selinux_unsupported && xname == SELINUX {
                // No SELinux here: no label means nothing to the kernel. EOPNOTSUPP makes
                // `ls -l` (coreutils' getfilecon cache) stop asking for every file on this
                // mount: one FUSE round trip per file less (the kernel caches no xattrs for
                // FUSE). A label that is there is still answered.
                return Err(Error::new(Errno::EOPNOTSUPP, "getxattr: no SELinux label"));
            }
            return Err(Error::new(Errno::ENODATA, "getxattr"));
        };
        if acl::is_acl_name(lname.as_bytes()) {
            // Its users and groups as the mount shows owners.
            return acl::to_view(v, &self.uid_map, &self.gid_map)
                .map_err(|e| Error::new(e, "getxattr: ACL"));
        }
        Ok(v.clone())
    }

    /// listxattr, private names removed; `trusted.*` only for root, as overlayfs lists them only
    /// to CAP_SYS_ADMIN.
    pub fn listxattr(&self, ino: u64, caller_uid: u32) -> Result<Vec<OsString>> {
        let node = self.node(ino)?;
        let all = self.xattrs_of(&node)?;
        Ok(all
            .iter()
            .filter_map(|(x, _)| self.names.to_merged(x))
            .filter(|x| caller_uid == 0 || !x.as_bytes().starts_with(b"trusted."))
            .collect())
    }

    /// setxattr (copies up). An access ACL set by `who` may clear the set-gid bit first
    /// ([`Union::kill_sgid_for_acl`]).
    pub fn setxattr(
        &self,
        ino: u64,
        xname: &OsStr,
        value: &[u8],
        flags: i32,
        who: Caller,
    ) -> Result<()> {
        let lname = self.names.to_layer(xname);
        let mapped;
        let value = if acl::is_acl_name(lname.as_bytes()) {
            mapped = acl::to_disk(value, &self.uid_map, &self.gid_map)
                .map_err(|e| Error::new(e, "setxattr: ACL"))?;
            &mapped[..]
        } else {
            value
        };
        let node = self.node(ino)?;
        if acl::is_acl_name(lname.as_bytes()) {
            self.check_acl_change(&node, lname.as_bytes(), Some(value))?;
        }
        if self.posix_acl_on() && xname == acl::ACCESS {
            // As ovl_set_or_remove_acl: the bit goes first (once the ACL is known to be
            // taken).
            self.kill_sgid_for_acl(ino, who)?;
        }
        self.copy_up(&node)?;
        let obj = self.upper_object(&node)?;
        let r = self.with_realloc_of(&node, obj.as_fd(), || {
            sys::set_xattr_of(obj.as_fd(), &lname, value, flags).ctx("setxattr")
        });
        node.invalidate_xattrs();
        r
    }

    /// removexattr (copies up only if the attribute exists).
    pub fn removexattr(&self, ino: u64, xname: &OsStr) -> Result<()> {
        let node = self.node(ino)?;
        if !node.state().upper {
            // Nothing to remove: fail without copying up, as the kernel does.
            self.getxattr(ino, xname)?;
        }
        let lname = self.names.to_layer(xname);
        if acl::is_acl_name(lname.as_bytes()) {
            self.check_acl_change(&node, lname.as_bytes(), None)?;
        }
        self.copy_up(&node)?;
        let obj = self.upper_object(&node)?;
        let r = self.with_realloc_of(&node, obj.as_fd(), || {
            sys::remove_xattr_of(obj.as_fd(), &lname).ctx("removexattr")
        });
        node.invalidate_xattrs();
        r
    }

    /// The upper object of `node` (copied up), held by an `O_PATH` descriptor: opened by its
    /// name and checked to be the node's (a rename over the name or its removal may have
    /// come in between), or the removed object the daemon holds for the kernel (an open file's
    /// xattrs change after its unlink, as on any filesystem). ESTALE when neither: the
    /// kernel then looks the name up again.
    pub(crate) fn upper_object(&self, node: &super::Node) -> Result<OwnedFd> {
        if !node.st.lock().unlinked {
            let (dir, name) = self.open_parent_in(node, LayerRef::Upper)?;
            if name.is_empty() {
                // The root: its name never changes hands.
                return nix::unistd::dup(dir.as_fd()).ctx("dup");
            }
            let obj = {
                match nix::fcntl::openat(
                    dir.as_fd(),
                    name.as_os_str(),
                    OFlag::O_PATH | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC,
                    Mode::empty(),
                ) {
                    Ok(fd) => fd,
                    Err(Errno::ENOENT) => {
                        return self.removed_object(node);
                    }
                    Err(e) => return Err(Error::new(e, "open the object")),
                }
            };
            if self
                .check_opened(node, LayerRef::Upper, obj.as_fd())
                .is_ok()
            {
                return Ok(obj);
            }
        }
        self.removed_object(node)
    }

    /// The removed object of `node`, once a removal in progress is through: one of its open
    /// handles' descriptors, or the one the daemon pins for the kernel.
    fn removed_object(&self, node: &super::Node) -> Result<OwnedFd> {
        if !node.is_dir() {
            drop(node.io_lock.lock());
        }
        if !node.st.lock().unlinked {
            return Err(Error::new(
                Errno::ESTALE,
                "the name leads to another object",
            ));
        }
        if let Some(h) = self.upper_handle_of(node.ino, None) {
            return nix::unistd::dup(h.fd.as_fd()).ctx("dup");
        }
        let pin = node.pin.lock();
        match pin.as_ref().and_then(|p| p.fd()) {
            Some(fd) => nix::unistd::dup(fd).ctx("dup"),
            None => Err(Error::new(Errno::ESTALE, "the object was removed")),
        }
    }
}
