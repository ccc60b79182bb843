//! File attribute flags (`lsattr` / `chattr`: FS_IOC_GETFLAGS / FS_IOC_SETFLAGS, and `xfs_io
//! lsattr` / `chattr`: FS_IOC_FSGETXATTR / FS_IOC_FSSETXATTR), which the kernel asks of a FUSE
//! filesystem as FUSE_IOCTL on a file or directory it opened for the purpose. Read from the
//! object that shows (upper or lower), set on upper after a copy-up, as kernel overlayfs does;
//! the kernel has checked the caller's right to change them (owner, CAP_LINUX_IMMUTABLE for
//! immutable / append-only) on our inode before it asks.

use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::sync::Arc;

use nix::errno::Errno;
use nix::fcntl::OFlag;
use nix::sys::stat::Mode;

use super::{Ctx, Error, LayerRef, Node, Result, Union};

/// The commands as the kernel sends them (`_IOR('f', 1, long)` and so on, 64-bit numbers).
pub const FS_IOC_GETFLAGS: u32 = 0x8008_6601;
pub const FS_IOC_SETFLAGS: u32 = 0x4008_6602;
pub const FS_IOC_FSGETXATTR: u32 = 0x801c_581f;
pub const FS_IOC_FSSETXATTR: u32 = 0x401c_5820;
/// The argument sizes the kernel passes: an int of flags (whatever the `long` in the
/// command's number says), a struct fsxattr.
const FLAGS_LEN: usize = 4;
const FSXATTR_LEN: usize = 28;

impl Union {
    /// FUSE_IOCTL of node `ino` through handle `fh`: the reply's data for a get, empty for a
    /// set. ENOTTY for any other command (and for objects that are neither files nor
    /// directories).
    pub fn fileattr(&self, ino: u64, fh: u64, cmd: u32, input: &[u8]) -> Result<Vec<u8>> {
        let (len, set) = match cmd {
            FS_IOC_GETFLAGS => (FLAGS_LEN, false),
            FS_IOC_SETFLAGS => (FLAGS_LEN, true),
            FS_IOC_FSGETXATTR => (FSXATTR_LEN, false),
            FS_IOC_FSSETXATTR => (FSXATTR_LEN, true),
            _ => return Err(Error::new(Errno::ENOTTY, "ioctl")),
        };
        let node = self.node(ino)?;
        if node.kind != libc::S_IFREG && !node.is_dir() {
            return Err(Error::new(Errno::ENOTTY, "ioctl"));
        }
        // Room for either argument, zeroed.
        let mut arg = [0u8; 32];
        let layer = if set {
            let given = input
                .get(..len)
                .ok_or(Error::new(Errno::EINVAL, "ioctl argument"))?;
            arg[..len].copy_from_slice(given);
            self.copy_up(&node)?;
            LayerRef::Upper
        } else {
            node.state().top()
        };
        let fd = self.fileattr_fd(&node, layer, fh)?;
        // SAFETY: ioctl(2) of a file attribute command on our own descriptor; `arg` outlives
        // the call and is larger than the argument either command reads or writes.
        let r = unsafe { libc::ioctl(fd.as_raw_fd(), cmd as libc::Ioctl, arg.as_mut_ptr()) };
        if r < 0 {
            return Err(Error::new(Errno::last(), "file attributes"));
        }
        Ok(if set { Vec::new() } else { arg[..len].to_vec() })
    }

    /// A descriptor of `node`'s object in layer `r` to ask: a directory's cached fd; a file
    /// opened by its name (checked to be the node's object), or through the kernel's handle
    /// `fh` once its name is gone.
    fn fileattr_fd(&self, node: &Node, r: LayerRef, fh: u64) -> Result<Arc<OwnedFd>> {
        if node.is_dir() {
            return self.dir_fd(node, r).ctx("open directory");
        }
        if node.st.lock().unlinked {
            let f = self.handle(fh)?;
            if f.ino != node.ino {
                return Err(Error::new(Errno::EBADF, "file handle of another file"));
            }
            return Ok(f.fd.clone());
        }
        let (dir, name) = self.open_parent_in(node, r)?;
        let fd = nix::fcntl::openat(
            dir.as_fd(),
            name.as_os_str(),
            OFlag::O_RDONLY
                | OFlag::O_NOFOLLOW
                | OFlag::O_NONBLOCK
                | OFlag::O_CLOEXEC
                | OFlag::O_NOCTTY,
            Mode::empty(),
        )
        .ctx("open")?;
        self.check_opened(node, r, fd.as_fd())?;
        Ok(Arc::new(fd))
    }
}
