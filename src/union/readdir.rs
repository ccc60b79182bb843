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

/// Listings a directory node keeps for readers in progress.
const KEPT_LISTINGS: usize = 4;

/// The offset of the entry after index `next - 1` of listing `generation`.
pub fn dir_offset(generation: u64, next: usize) -> u64 {
    (generation << 32) | next as u64
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

    /// readdir of directory node `ino` from `offset`, without an open handle (opendir is
    /// answered ENOSYS: the kernel then opens directories without asking us, and caches their
    /// listings, FOPEN_CACHE_DIR, as it would for ours). Returns the listing, the index of the
    /// first entry to send and the listing's generation, which [`dir_offset`] puts in every
    /// entry's offset: a reader continues in the listing it started, whatever changed since.
    ///
    /// Offset 0 takes a fresh listing (rewinddir sees changes, as POSIX asks). A later offset
    /// names its listing; one no longer kept (evicted, or a cookie from long ago: seekdir) is
    /// taken afresh and read from the same index. A node keeps its last few listings; a reader
    /// that reaches the end lets its listing go.
    pub fn readdir(&self, ino: u64, offset: u64) -> Result<(Arc<Vec<DirEntry>>, usize, u64)> {
        let node = self.node(ino)?;
        if !node.is_dir() {
            return Err(Error::new(Errno::ENOTDIR, "readdir"));
        }
        let (generation, index) = (offset >> 32, (offset & 0xffff_ffff) as usize);
        if offset != 0 {
            let mut kept = node.listings.lock();
            if let Some(pos) = kept.iter().position(|(g, _)| *g == generation) {
                let l = kept[pos].1.clone();
                if index >= l.len() {
                    // The reader is at the end: it needs this listing no more.
                    kept.remove(pos);
                }
                return Ok((l, index, generation));
            }
        }
        let fresh = self.listing(&node)?;
        // 30 bits of generation keep offsets positive (telldir's long); 0 is never one.
        let generation = (self
            .list_seq
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed)
            % ((1 << 30) - 1))
            + 1;
        let mut kept = node.listings.lock();
        if kept.len() >= KEPT_LISTINGS {
            kept.remove(0);
        }
        kept.push((generation, fresh.clone()));
        Ok((fresh, index, generation))
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
