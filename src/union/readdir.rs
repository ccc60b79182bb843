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
    /// Inode number in the merged view (st_ino), but for a lower file with several names.
    pub ino: u64,
    /// The topmost layer holding it when listed (none for `.` and `..`): no layer above it
    /// has the name or a whiteout of it.
    pub layer: Option<LayerRef>,
}

/// Listings kept for readers that continue them (`Union::readdir`), least recently used
/// first: by (node, generation), with the node's directory incarnation (`Node::dirgen`) and
/// when last used; and their entries in all.
#[derive(Debug)]
pub struct KeptListings {
    lru: lru::LruCache<(u64, u64), KeptListing>,
    entries: usize,
}

#[derive(Debug)]
struct KeptListing {
    dirgen: u64,
    list: Arc<Vec<DirEntry>>,
    used: std::time::Instant,
    /// The directory's change stamp when the listing was begun ([`Union::dir_stamp`]).
    stamp: Option<u64>,
}

/// A listing not read to its end and used this recently is a reader in progress (see
/// [`ListingUses`]).
const READING: std::time::Duration = std::time::Duration::from_secs(60);
/// A listing read to its end this recently may be completing the kernel's cache of it.
const JUST_ENDED: std::time::Duration = std::time::Duration::from_secs(1);

/// The listings of one directory being read, for [`Union::drop_kernel_listing`]: those read
/// recently (generation, last use, read to the end?), a few at most.
#[derive(Debug, Default)]
pub struct ListingUses(Vec<(u64, std::time::Instant, bool)>);

impl ListingUses {
    fn prune(&mut self, now: std::time::Instant) {
        self.0.retain(|&(_, used, ended)| {
            now.duration_since(used) < if ended { JUST_ENDED } else { READING }
        });
        if self.0.len() > 16 {
            self.0.sort_by_key(|&(_, used, _)| std::cmp::Reverse(used));
            self.0.truncate(16);
        }
    }

    /// Listing `generation` starts: is another one being read, or just read to its end?
    fn started(&mut self, generation: u64) -> bool {
        let now = std::time::Instant::now();
        self.prune(now);
        let others = self.0.iter().any(|&(g, _, _)| g != generation);
        self.0.retain(|&(g, _, _)| g != generation);
        self.0.push((generation, now, false));
        others
    }

    /// Listing `generation` is read on; at its `end` (a reader asked past it), is another
    /// one being read?
    fn read(&mut self, generation: u64, end: bool) -> bool {
        let now = std::time::Instant::now();
        self.prune(now);
        let mut first_end = false;
        match self.0.iter_mut().find(|(g, _, _)| *g == generation) {
            Some(u) => {
                first_end = end && !u.2;
                *u = (generation, now, u.2 || end);
            }
            None => self.0.push((generation, now, end)),
        }
        first_end
            && self
                .0
                .iter()
                .any(|&(g, _, ended)| g != generation && !ended)
    }
}

impl Default for KeptListings {
    fn default() -> Self {
        KeptListings {
            lru: lru::LruCache::unbounded(),
            entries: 0,
        }
    }
}

/// Entries of all kept listings together (~100 bytes each); beyond it the least recently
/// used listings go, but not one read in the last [`IN_USE`] while all together stay within
/// four times this (readers going through large directories at the same time must not make
/// each other's listings be taken again at every batch).
const KEPT_ENTRIES: usize = 64 * 1024;
/// A listing read this recently is in use (see [`KEPT_ENTRIES`]).
const IN_USE: std::time::Duration = std::time::Duration::from_secs(2);

/// Bits of a readdir offset that hold the index; the generation sits above them. Offsets stay
/// below 2^31: a 32-bit process's getdents (compat d_off) gets EOVERFLOW for larger ones.
const INDEX_BITS: u32 = 21;
/// Generations are 1..=GENERATIONS (0: none, the offset is a plain index).
const GENERATIONS: u64 = (1 << (31 - INDEX_BITS)) - 1;

/// Marks a long index (an entry past 2^21 in its listing): the index in the 31 bits below,
/// the generation from bit 32 up. Such offsets do not fit a 32-bit d_off, as no offset of such
/// a directory could. (They once carried no generation, so each batch of a directory of
/// more than 2 million entries made a fresh listing of it: quadratic.)
const PLAIN: u64 = 1 << 31;

/// The offset of the entry after index `next - 1` of listing `generation`.
pub fn dir_offset(generation: u64, next: usize) -> u64 {
    if next as u64 >= 1 << INDEX_BITS {
        if (next as u64) < PLAIN {
            return (generation << 32) | PLAIN | next as u64;
        }
        return PLAIN | (next as u64 & (PLAIN - 1));
    }
    (generation << INDEX_BITS) | next as u64
}

/// (generation, index) of a readdir offset (generation 0: none, make a fresh listing).
fn parse_offset(offset: u64) -> (u64, usize) {
    if offset & PLAIN != 0 {
        (offset >> 32, (offset & (PLAIN - 1)) as usize)
    } else {
        (
            offset >> INDEX_BITS,
            (offset & ((1 << INDEX_BITS) - 1)) as usize,
        )
    }
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
                    // The number a stat of the name gives (a copy-up keeps its origin's; a
                    // layer on another filesystem is tagged), as kernel overlayfs lists it.
                    // (Not for a lower file with more than one name, whose st_ino is one per
                    // name: that needs the stat a listing does not make.)
                    ino: self.ino_for_real(r, e.ino()),
                    layer: Some(r),
                });
            }
            seen.extend(hides);
        }
        Ok(out)
    }

    fn listing(&self, node: &Node) -> Result<Arc<Vec<DirEntry>>> {
        self.listings_made
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
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
    /// comes back with them when the cache loses a page. Listings are kept within a budget of
    /// entries, least recently used out first, but not those in use ([`KEPT_ENTRIES`]).
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
        let (generation, index) = parse_offset(offset);
        if offset != 0 && generation != 0 {
            let mut kept = self.kept_listings.lock();
            let dirgen = node.dirgen.load(std::sync::atomic::Ordering::Acquire);
            match kept.lru.get_mut(&(ino, generation)) {
                Some(k) if k.dirgen == dirgen => {
                    k.used = std::time::Instant::now();
                    let list = k.list.clone();
                    drop(kept);
                    // At the end the kernel marks its cache of the listing complete.
                    let end = index >= list.len();
                    if node.listing_uses.lock().read(generation, end) {
                        self.drop_kernel_listing(ino);
                    }
                    return Ok((list, index, generation, false));
                }
                // Of the directory the node named before: not this one's.
                Some(_) => {
                    if let Some(old) = kept.lru.pop(&(ino, generation)) {
                        kept.entries -= old.list.len();
                    }
                }
                None => {}
            }
        }
        // The directory the node names when the listing starts (a reset meanwhile makes the
        // listing one of the old directory).
        let dirgen = node.dirgen.load(std::sync::atomic::Ordering::Acquire);
        if offset == 0
            && let Some((list, generation)) = self.unchanged_listing(&node, dirgen)
        {
            node.listing_uses.lock().started(generation);
            return Ok((list, 0, generation, false));
        }
        let stamp = self.dir_stamp(ino);
        let fresh = self.listing(&node)?;
        if offset != 0 && index >= fresh.len() {
            // An unknown listing's reader at or past the end: nothing to keep for it.
            return Ok((fresh, index, 0, true));
        }
        // Generations wrap: a reused one replaces the node's old listing of that number, and
        // reading on in another listing is what an unknown one gets anyway.
        let generation = (self
            .list_seq
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed)
            % GENERATIONS)
            + 1;
        self.keep_listing(&node, dirgen, generation, stamp, &fresh);
        if node.listing_uses.lock().started(generation) {
            self.drop_kernel_listing(ino);
        }
        if offset == 0 {
            self.note_listing(&node, &fresh);
        }
        Ok((fresh, index, generation, true))
    }

    /// Drop the kernel's cache of directory `ino`'s listing now, before the reply (when
    /// another listing of it is being read: [`ListingUses`]). The kernel keeps one cached
    /// listing per directory, filled by the reader that started it from offset 0 and complete
    /// once that reader reaches the end; a reader that started another listing meanwhile
    /// (ours carry their listing's generation in every offset) comes back with an offset
    /// that is not in that cache, and the kernel (6.18) then answers end-of-directory instead
    /// of asking us whenever the cached listing ends exactly at a page boundary: `ls` showed
    /// 175 of 330 names. With its pages gone the kernel finds the cache missing and asks us.
    fn drop_kernel_listing(&self, ino: u64) {
        self.kernel_listing_drops
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        self.kernel_forget_now(&super::Forget::Inode(ino));
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
                let Some(l) = self.last_listing_of(&p) else {
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

    /// The last listing of `node`, if kept and no change of the directory began since it
    /// was begun: what a fresh listing would be. A reader starting while another reads the
    /// directory shares its listing (and so its offsets, which the kernel's cache of it
    /// holds) instead of making one whose offsets the cache would not know
    /// ([`Union::drop_kernel_listing`]).
    fn unchanged_listing(&self, node: &Node, dirgen: u64) -> Option<(Arc<Vec<DirEntry>>, u64)> {
        use std::sync::atomic::Ordering::Acquire;
        let generation = node.last_listing.load(Acquire);
        let mut q = self.kept_listings.lock();
        let k = q.lru.get_mut(&(node.ino, generation))?;
        if k.dirgen != dirgen || !self.dir_unchanged(node.ino, k.stamp) {
            return None;
        }
        k.used = std::time::Instant::now();
        Some((k.list.clone(), generation))
    }

    /// Keep `list` as listing `generation` of `node`, within the budget of all listings
    /// (see [`KEPT_ENTRIES`]).
    fn keep_listing(
        &self,
        node: &Node,
        dirgen: u64,
        generation: u64,
        stamp: Option<u64>,
        list: &Arc<Vec<DirEntry>>,
    ) {
        let mut q = self.kept_listings.lock();
        let now = std::time::Instant::now();
        let key = (node.ino, generation);
        let k = KeptListing {
            dirgen,
            list: list.clone(),
            used: now,
            stamp,
        };
        if let Some(old) = q.lru.put(key, k) {
            q.entries -= old.list.len();
        }
        node.last_listing
            .store(generation, std::sync::atomic::Ordering::Release);
        q.entries += list.len();
        while q.entries > KEPT_ENTRIES {
            let Some((&lru_key, lru)) = q.lru.peek_lru() else {
                break;
            };
            // The one just kept stays (a directory larger than the budget is read through
            // once); so do those in use, unless there are too many of them.
            let in_use = now.duration_since(lru.used) < IN_USE;
            if lru_key == key || (in_use && q.entries <= 4 * KEPT_ENTRIES) {
                break;
            }
            if let Some((_, gone)) = q.lru.pop_lru() {
                q.entries -= gone.list.len();
            }
        }
    }

    /// The last listing made of directory `node`, if still kept.
    fn last_listing_of(&self, node: &Node) -> Option<Arc<Vec<DirEntry>>> {
        use std::sync::atomic::Ordering::Acquire;
        let generation = node.last_listing.load(Acquire);
        let q = self.kept_listings.lock();
        q.lru
            .peek(&(node.ino, generation))
            .filter(|k| k.dirgen == node.dirgen.load(Acquire))
            .map(|k| k.list.clone())
    }

    /// Listings made since the mount, listings kept now, and their entries in all.
    pub fn listing_stats(&self) -> (u64, usize, usize, u64) {
        let q = self.kept_listings.lock();
        (
            self.listings_made
                .load(std::sync::atomic::Ordering::Relaxed),
            q.lru.len(),
            q.entries,
            self.kernel_listing_drops
                .load(std::sync::atomic::Ordering::Relaxed),
        )
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
        for g in [1, 5, GENERATIONS] {
            for next in [
                1usize,
                1000,
                (1 << INDEX_BITS) - 1,
                1 << INDEX_BITS,
                50_000_000,
            ] {
                assert_eq!(parse_offset(dir_offset(g, next)), (g, next));
            }
        }
        // Past 2^21 entries the listing is still named (it used to be made anew per batch).
        let o = dir_offset(5, 1 << INDEX_BITS);
        assert_eq!(o & PLAIN, PLAIN);
        assert_eq!(parse_offset(o), (5, 1 << INDEX_BITS));
        assert!(o < 1 << 63, "a valid loff_t");
        // An offset of the old form (no generation) takes a fresh listing.
        assert_eq!(parse_offset(PLAIN | 3_000_000), (0, 3_000_000));
    }
}
