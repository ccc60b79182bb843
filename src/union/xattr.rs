//! Extended attributes through the merged view (kernel fs/overlayfs/xattrs.c): the overlay's
//! private xattrs are invisible; names in the overlay's own namespace are escaped
//! (`trusted.overlay.X` is stored as `trusted.overlay.overlay.X`, as kernel 6.7+ does for
//! nested overlays); setting or removing copies up first.

use std::ffi::{OsStr, OsString};
use std::os::fd::AsFd;

use nix::errno::Errno;

use super::{Ctx, Error, LayerRef, Result, Union};

use crate::layer::sys;

impl Union {
    /// getxattr.
    pub fn getxattr(&self, ino: u64, xname: &OsStr) -> Result<Vec<u8>> {
        let xname = self.names.to_layer(xname);
        let node = self.node(ino)?;
        let st = node.state();
        let (dir, name) = self.open_parent_in(&node, st.top())?;
        sys::get_xattr(dir.as_fd(), &name, &xname)
            .ctx("getxattr")?
            .ok_or(Error::new(Errno::ENODATA, "getxattr"))
    }

    /// listxattr, private names removed.
    pub fn listxattr(&self, ino: u64) -> Result<Vec<OsString>> {
        let node = self.node(ino)?;
        let st = node.state();
        let (dir, name) = self.open_parent_in(&node, st.top())?;
        let v = sys::list_xattr(dir.as_fd(), &name).ctx("listxattr")?;
        Ok(v.iter().filter_map(|x| self.names.to_merged(x)).collect())
    }

    /// setxattr (copies up).
    pub fn setxattr(&self, ino: u64, xname: &OsStr, value: &[u8], flags: i32) -> Result<()> {
        let lname = self.names.to_layer(xname);
        let node = self.node(ino)?;
        self.copy_up(&node)?;
        let (dir, name) = self.open_parent_in(&node, LayerRef::Upper)?;
        self.with_realloc(&node, dir.as_fd(), &name, || {
            sys::set_xattr(dir.as_fd(), &name, &lname, value, flags).ctx("setxattr")
        })
    }

    /// removexattr (copies up only if the attribute exists).
    pub fn removexattr(&self, ino: u64, xname: &OsStr) -> Result<()> {
        let node = self.node(ino)?;
        if !node.state().upper {
            // Nothing to remove: fail without copying up, as the kernel does.
            self.getxattr(ino, xname)?;
        }
        self.copy_up(&node)?;
        let (dir, name) = self.open_parent_in(&node, LayerRef::Upper)?;
        let lname = self.names.to_layer(xname);
        self.with_realloc(&node, dir.as_fd(), &name, || {
            sys::remove_xattr(dir.as_fd(), &name, &lname).ctx("removexattr")
        })
    }
}
