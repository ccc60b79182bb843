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
    /// The topmost layer holding it when listed (none for `.` and `..`): no layer above it
    /// has the name or a whiteout of it.
    pub layer: Option<LayerRef>,
}

/// Listings a directory node keeps for readers (the least recently used goes first).
const KEPT_LISTINGS: usize = 8;

/// Listings kept by directory nodes, oldest first (node, generation, entries), and their
/// entries in all.
pub type KeptListings = (std::collections::VecDeque<(u64, u64, usize)>, usize);

/// Entries of all kept listings together, at most (~100 bytes each); the oldest listings go
/// first (`Union::kept_listings`).
const KEPT_ENTRIES: usize = 64 * 1024;

/// Bits of a readdir offset that hold the index; the generation sits above them. Offsets stay
/// below 2^31: a 32-bit process's getdents (compat d_off) gets EOVERFLOW for larger ones.
const INDEX_BITS: u32 = 21;
/// Generations are 1..=GENERATIONS (0: none, the offset is a plain index).
const GENERATIONS: u64 = (1 << (31 - INDEX_BITS)) - 1;

/// Marks a plain index (an entry past 2^21 in its listing: no room for the generation, read
/// from a fresh listing; such offsets do not fit a 32-bit d_off).
const PLAIN: u64 = 1 << 31;

/// The offset of the entry after index `next - 1` of listing `generation`.
pub fn dir_offset(generation: u64, next: usize) -> u64 {
    if next as u64 >= 1 << INDEX_BITS {
        return PLAIN | next as u64;
    }
    (generation << INDEX_BITS) | next as u64
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
                    layer: Some(r),
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
            layer: None,
        });
        v.push(DirEntry {
            name: OsString::from(".."),
            kind: libc::S_IFDIR,
            ino: if parent == 0 { node.ino } else { parent },
            layer: None,
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
    /// taken afresh and read from the same index. A listing read to the end stays: the
    /// kernel's cached copy of it carries its offsets, and a reader served from that cache
    /// comes back with them when the cache loses a page. A node keeps its last eight listings
    /// (least recently used out first), all nodes together at most 64k entries (oldest out).
    ///
    /// Offsets stay below 2^31 (21 bits of index, 10 of generation) for 32-bit callers.
    pub fn readdir(&self, ino: u64, offset: u64) -> Result<(Arc<Vec<DirEntry>>, usize, u64)> {
        self.readdir_made(ino, offset).map(|(l, i, g, _)| (l, i, g))
    }

    /// [`Union::readdir`], and whether the listing was made in this call (not one kept from
    /// an earlier call: the directory may have changed since that one).
    pub fn readdir_made(
        &self,
        ino: u64,
        offset: u64,
    ) -> Result<(Arc<Vec<DirEntry>>, usize, u64, bool)> {
        let node = self.node(ino)?;
        if !node.is_dir() {
            return Err(Error::new(Errno::ENOTDIR, "readdir"));
        }
        let (generation, index) = if offset & PLAIN != 0 {
            (0, (offset & !PLAIN) as usize)
        } else {
            (
                offset >> INDEX_BITS,
                (offset & ((1 << INDEX_BITS) - 1)) as usize,
            )
        };
        if offset != 0 && generation != 0 {
            let mut kept = node.listings.lock();
            if let Some(pos) = kept.iter().position(|(g, _)| *g == generation) {
                let used = kept.remove(pos);
                let l = used.1.clone();
                kept.push(used);
                return Ok((l, index, generation, false));
            }
        }
        let fresh = self.listing(&node)?;
        if offset != 0 && index >= fresh.len() {
            // An unknown listing's reader at or past the end: nothing to keep for it.
            return Ok((fresh, index, 0, true));
        }
        // Generations wrap: a reused one names another listing only after the node dropped
        // the old one, and reading on in another listing is what an unknown one gets anyway.
        let generation = (self
            .list_seq
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed)
            % GENERATIONS)
            + 1;
        {
            let mut kept = node.listings.lock();
            if kept.len() >= KEPT_LISTINGS {
                kept.remove(0);
            }
            kept.push((generation, fresh.clone()));
        }
        self.keep_listing(ino, generation, fresh.len());
        if offset == 0 {
            self.note_listing(&node, &fresh);
        }
        Ok((fresh, index, generation, true))
    }

    /// A fresh listing of `node`: in a tree walk, queue its subdirectories, and its parent's,
    /// for read-ahead (`prefetch.rs`).
    fn note_listing(&self, node: &Arc<Node>, list: &Arc<Vec<DirEntry>>) {
        if !self.prefetch.enabled() {
            return;
        }
        let parent = node.st.lock().parent;
        for d in self.prefetch.listed(node.ino, parent) {
            let (dnode, entries) = if d == node.ino {
                (node.clone(), list.clone())
            } else {
                let Some(p) = self.nodes.get(d) else { continue };
                let Some(l) = p.listings.lock().last().map(|(_, l)| l.clone()) else {
                    continue;
                };
                (p, l)
            };
            let layers = dnode.state().dir_layers();
            let fds: Vec<Arc<std::os::fd::OwnedFd>> = layers
                .into_iter()
                .filter_map(|r| self.dir_fd(&dnode, r).ok())
                .collect();
            // Last in, first read (`prefetch.rs`): the first subdirectory goes in last.
            for e in entries.iter().rev().filter(|e| e.kind == libc::S_IFDIR) {
                if e.name != "." && e.name != ".." {
                    self.prefetch.queue(fds.clone(), e.name.clone());
                }
            }
        }
    }

    /// Count a listing kept for node `ino` against the budget of all nodes, dropping the
    /// oldest kept listings beyond it.
    fn keep_listing(&self, ino: u64, generation: u64, len: usize) {
        let mut q = self.kept_listings.lock();
        q.0.push_back((ino, generation, len));
        q.1 += len;
        while q.1 > KEPT_ENTRIES && q.0.len() > 1 {
            let Some((i, g, n)) = q.0.pop_front() else {
                break;
            };
            q.1 -= n;
            if let Some(node) = self.nodes.get(i) {
                node.listings.lock().retain(|(k, _)| *k != g);
            }
        }
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn offsets_fit_31_bits_and_name_their_listing() {
        for g in [1, 2, GENERATIONS] {
            for next in [1usize, 2, 1000, (1 << INDEX_BITS) - 1] {
                let o = dir_offset(g, next);
                assert!(o < 1 << 31, "offset {o:#x} of ({g}, {next})");
                assert_eq!(
                    (o >> INDEX_BITS, (o & ((1 << INDEX_BITS) - 1)) as usize),
                    (g, next)
                );
            }
        }
        let o = dir_offset(5, 1 << INDEX_BITS);
        assert_eq!(o & PLAIN, PLAIN);
        assert_eq!((o & !PLAIN) as usize, 1 << INDEX_BITS);
    }
}
