//! Merged directory listing (kernel fs/overlayfs/readdir.c): upper first, then each merged
//! lower; a name seen once is not listed again; whiteouts hide the name below and are never
//! listed.

use std::collections::HashSet;
use std::ffi::{OsStr, OsString};
use std::os::fd::AsFd;
use std::os::unix::ffi::OsStrExt;
use std::sync::Arc;

use nix::dir::{Dir, Type};
use nix::errno::Errno;
use parking_lot::Mutex;

use super::{Ctx, Error, LayerRef, Node, Result, Union};
use crate::layer;

/// One entry of a merged listing.
#[derive(Debug, Clone)]
pub struct DirEntry {
    /// Name.
    pub name: OsString,
    /// File type bits (S_IFMT), 0 if unknown.
    pub kind: u32,
    /// Inode number as seen in the layer (merged-view number where cheaply known).
    pub ino: u64,
}

/// An open directory: a snapshot of the listing taken at its first read and at every rewind.
#[derive(Debug)]
pub struct DirHandle {
    /// Node id of the directory.
    pub ino: u64,
    /// Entries, `.` and `..` first; `None` until listed.
    pub entries: Mutex<Option<Arc<Vec<DirEntry>>>>,
}

fn dtype_kind(t: Option<Type>) -> u32 {
    match t {
        Some(Type::Directory) => libc::S_IFDIR,
        Some(Type::File) => libc::S_IFREG,
        Some(Type::Symlink) => libc::S_IFLNK,
        Some(Type::CharacterDevice) => libc::S_IFCHR,
        Some(Type::BlockDevice) => libc::S_IFBLK,
        Some(Type::Fifo) => libc::S_IFIFO,
        Some(Type::Socket) => libc::S_IFSOCK,
        None => 0,
    }
}

impl Union {
    /// The merged entries of a directory node, without `.` and `..`.
    pub(crate) fn merged_entries(&self, node: &Node) -> Result<Vec<DirEntry>> {
        // A deferred rename from or into it is not on disk yet.
        self.commits.wait_dir(node.ino);
        let st = node.state();
        let mut seen: HashSet<OsString> = HashSet::new();
        let mut out = Vec::new();
        for r in st.dir_layers() {
            let fd = match self.dir_fd(node, r) {
                Ok(fd) => fd,
                Err(Errno::ENOENT) | Err(Errno::ENOTDIR) if r != LayerRef::Upper => continue,
                Err(e) => return Err(Error::new(e, "readdir: open")),
            };
            let is_lower = r != LayerRef::Upper;
            let has_x = is_lower
                && self
                    .names
                    .opaque_mark(fd.as_fd(), OsStr::new(""))
                    .ctx("readdir: xattr")?
                    == Some(b'x');
            // A new open file description: the cached fd's offset is shared by everyone.
            let mut d = Dir::openat(
                fd.as_fd(),
                ".",
                nix::fcntl::OFlag::O_RDONLY
                    | nix::fcntl::OFlag::O_DIRECTORY
                    | nix::fcntl::OFlag::O_CLOEXEC,
                nix::sys::stat::Mode::empty(),
            )
            .ctx("readdir: open")?;
            // AUFS mode: `.wh.NAME` hides NAME in the layers *below*; a NAME in this same layer
            // stays visible whatever the listing order, so whiteouts are applied after the layer.
            let mut hides: Vec<OsString> = Vec::new();
            for e in d.iter() {
                let e = e.ctx("readdir")?;
                let b = e.file_name().to_bytes();
                if b == b"." || b == b".." {
                    continue;
                }
                let name = OsStr::from_bytes(b);
                if self.names.aufs
                    && let Some(hidden) = b.strip_prefix(super::ondisk::AUFS_WH_PREFIX)
                {
                    // `.wh..wh..opq` and other meta names are hidden too.
                    if !hidden.starts_with(b".wh.") {
                        hides.push(OsStr::from_bytes(hidden).to_os_string());
                    }
                    continue;
                }
                if seen.contains(name) {
                    continue;
                }
                seen.insert(name.to_os_string());
                let mut kind = dtype_kind(e.file_type());
                let maybe_wh = match kind {
                    libc::S_IFCHR => true,
                    libc::S_IFREG => has_x,
                    0 => true,
                    _ => false,
                };
                if maybe_wh {
                    let fs = match layer::stat_at(fd.as_fd(), name) {
                        Ok(fs) => fs,
                        Err(Errno::ENOENT) => continue,
                        Err(e) => return Err(Error::new(e, "readdir: stat")),
                    };
                    if self.names.is_whiteout(fd.as_fd(), name, &fs, has_x) {
                        continue;
                    }
                    kind = fs.st_mode & libc::S_IFMT;
                }
                out.push(DirEntry {
                    name: name.to_os_string(),
                    kind,
                    ino: e.ino(),
                });
            }
            seen.extend(hides);
        }
        Ok(out)
    }

    fn listing(&self, node: &Node) -> Result<Arc<Vec<DirEntry>>> {
        let mut v = Vec::new();
        let parent = node.st.lock().parent;
        v.push(DirEntry {
            name: OsString::from("."),
            kind: libc::S_IFDIR,
            ino: node.ino,
        });
        v.push(DirEntry {
            name: OsString::from(".."),
            kind: libc::S_IFDIR,
            ino: if parent == 0 { node.ino } else { parent },
        });
        v.extend(self.merged_entries(node)?);
        Ok(Arc::new(v))
    }

    /// opendir: snapshot the listing; returns a handle id.
    pub fn opendir(&self, ino: u64) -> Result<u64> {
        let node = self.node(ino)?;
        if !node.is_dir() {
            return Err(Error::new(Errno::ENOTDIR, "opendir"));
        }
        // Listed on the first readdir, so opendir costs no layer I/O.
        let fh = self
            .fh_seq
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        self.dirs.insert(
            fh,
            Arc::new(DirHandle {
                ino,
                entries: Mutex::new(None),
            }),
        );
        Ok(fh)
    }

    /// Entries of an open directory from `offset` on (offset = index of the next entry). At
    /// offset 0 the snapshot is refreshed (rewinddir sees changes, as POSIX asks).
    ///
    /// The first read of a handle may come at any offset: the kernel serves the start of a
    /// listing from its own cache (FOPEN_CACHE_DIR) and asks us only from where its cache ends
    /// or lost a page, and seekdir() to a cookie from an earlier open does the same. The
    /// listing is taken then; offsets are indices into it, and an unchanged directory lists
    /// in the same order every time (upper, then each lower, in getdents order).
    pub fn readdir(&self, fh: u64, offset: u64) -> Result<Arc<Vec<DirEntry>>> {
        let h = self
            .dirs
            .get(&fh)
            .map(|h| h.clone())
            .ok_or(Error::new(Errno::EBADF, "readdir handle"))?;
        let mut entries = h.entries.lock();
        match &*entries {
            Some(e) if offset != 0 => Ok(e.clone()),
            _ => {
                let node = self.node(h.ino)?;
                let fresh = self.listing(&node)?;
                *entries = Some(fresh.clone());
                Ok(fresh)
            }
        }
    }

    /// releasedir.
    pub fn releasedir(&self, fh: u64) {
        self.dirs.remove(&fh);
    }

    /// fsyncdir: sync the upper directory if there is one.
    pub fn fsyncdir(&self, ino: u64) -> Result<()> {
        let node = self.node(ino)?;
        let st = node.state();
        if !st.upper || self.volatile {
            return Ok(());
        }
        // Its entries include copies whose commit is pending.
        self.commits.wait_parent(ino);
        let fd = self.dir_fd(&node, LayerRef::Upper).ctx("fsyncdir: open")?;
        nix::unistd::fsync(fd.as_fd()).ctx("fsyncdir")
    }
}
