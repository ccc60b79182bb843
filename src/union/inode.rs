//! The node table: one node per merged-view inode, keyed by its stable st_ino (which is also
//! the FUSE node id), with the kernel's nlookup/forget reference counting.

use std::ffi::OsString;
use std::io::Write;
use std::os::fd::OwnedFd;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use dashmap::DashMap;
use parking_lot::Mutex;

/// FUSE's root node id.
pub const ROOT_INO: u64 = 1;

/// Where the topmost object of a node lives.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LayerRef {
    /// The upper layer.
    Upper,
    /// Lower layer `i` (0 = leftmost = topmost lower).
    Lower(usize),
}

/// Where a directory is in a lower layer when that is not its parent's directory there plus
/// its own name: it was found there through a redirect (kernel overlayfs `redirect_dir`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Locator {
    /// Under this name in its parent's directory of the layer.
    Name(OsString),
    /// At this path from the layer's root.
    Path(Arc<[OsString]>),
}

/// The bit of layer `r` in [`NodeState::impure`]: 1 for upper, 2 << i for lower i; lower
/// layers past the 63rd share the last bit.
pub fn impure_bit(r: LayerRef) -> u64 {
    match r {
        LayerRef::Upper => 1,
        LayerRef::Lower(i) => 2 << i.min(62),
    }
}

/// Where the data of a metacopy file is (kernel overlayfs `metacopy=on`: the file's metadata
/// was copied up alone, its data stayed below).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DataAt {
    /// The lower layer holding the data.
    pub layer: usize,
    /// Where in it, when not under the file's own name in its parent's directory there.
    pub at: Option<Locator>,
    /// The data file's allocated 512-byte blocks (what stat shows, as the kernel).
    pub blocks: i64,
}

/// Mutable per-node state; changes on copy-up, rename, unlink.
#[derive(Debug, Clone)]
pub struct NodeState {
    /// Parent node id (0 for the root).
    pub parent: u64,
    /// Name in the parent ("" for the root).
    pub name: OsString,
    /// Other (parent, name) pairs of a hard-linked node (shared: a snapshot of the state,
    /// taken at every open, does not copy thousands of names of a much-linked file).
    pub aliases: Arc<std::collections::HashSet<(u64, OsString)>>,
    /// Present in the upper layer.
    pub upper: bool,
    /// Non-directories: the lower layer holding the object (the copy-up origin).
    pub lower: Option<usize>,
    /// Directories: the lower layers merged into this directory, top first.
    pub lowers: Vec<usize>,
    /// Directory is opaque in its top layer.
    pub opaque: bool,
    /// Directories: the lower layers of `lowers` it was found in through a redirect, and
    /// where (None: none, the common case).
    pub redirects: Option<Arc<[(usize, Locator)]>>,
    /// Regular files whose top object is a metacopy file: where the data is.
    pub data: Option<Arc<DataAt>>,
    /// Directories: the layers where kernel overlayfs marked this directory impure (see
    /// [`impure_bit`]): only there can it hold metacopy files.
    pub impure: u64,
    /// Removed from the merged view (kept alive only by the kernel's references).
    pub unlinked: bool,
}

impl NodeState {
    /// The layer holding the topmost object.
    pub fn top(&self) -> LayerRef {
        if self.upper {
            LayerRef::Upper
        } else if let Some(l) = self.lower {
            LayerRef::Lower(l)
        } else {
            LayerRef::Lower(self.lowers.first().copied().unwrap_or(0))
        }
    }

    /// Layers to read a directory from, top first.
    pub fn dir_layers(&self) -> Vec<LayerRef> {
        let mut v = Vec::with_capacity(self.lowers.len() + 1);
        if self.upper {
            v.push(LayerRef::Upper);
        }
        v.extend(self.lowers.iter().map(|&l| LayerRef::Lower(l)));
        v
    }

    /// Where this directory is in lower layer `li`, if found there through a redirect.
    pub fn locator(&self, li: usize) -> Option<&Locator> {
        self.redirects
            .as_deref()?
            .iter()
            .find(|(l, _)| *l == li)
            .map(|(_, loc)| loc)
    }

    /// Has lower content below it (kernel: OVL_TYPE_MERGE or lower)?
    pub fn has_lower(&self) -> bool {
        self.lower.is_some() || !self.lowers.is_empty()
    }
}

/// One inode of the merged view.
#[derive(Debug)]
pub struct Node {
    /// Stable inode number, also the FUSE node id.
    pub ino: u64,
    /// File type bits (S_IFMT).
    pub kind: u32,
    /// The FUSE generation sent with this node id in entry replies. Inode numbers are reused
    /// (ext4 hands a removed directory's number to the next mkdir at once) while the kernel may
    /// still hold the old inode (an O_PATH fd, a cwd): the same id with the same generation
    /// would make it reuse that inode — for a removed directory one marked dead, where every
    /// create fails with ENOENT. A node that names a new object gets a new generation, so the
    /// kernel retires the old inode instead (fuse_stale_inode).
    pub generation: AtomicU64,
    /// Kernel lookup count.
    pub nlookup: AtomicU64,
    /// The inode number in upper of the node's object once it is there (0: not known to be in
    /// upper). Two upper objects must never share a node: a stale entry of the inode map (its
    /// origin removed offline, its number since given to a new upper file; or a damaged map)
    /// would otherwise send one file's reads and writes to the other (`Union::node_for`).
    pub upper_obj: AtomicU64,
    /// Bumped (under `st`'s lock) whenever a name of the node is dropped or moved: a lookup
    /// that checked a name on disk adds it only if no removal was recorded since.
    pub names_gen: AtomicU64,
    /// The object was removed (not just one of its names): its inode number may come back
    /// as another object's, which then needs a new generation.
    pub gone: std::sync::atomic::AtomicBool,
    /// The removed object, held while the kernel holds the node ([`Pin`]).
    pub pin: Mutex<Option<Pin>>,
    /// Mutable state.
    pub st: Mutex<NodeState>,
    /// Serialises copy-up of this node.
    pub copy_lock: Mutex<()>,
    /// Serialises size-changing I/O when a quota needs exact before/after accounting, and
    /// holds the upper file's (allocation, size) as last seen, saving an fstat per write.
    pub io_lock: Mutex<Option<(i64, i64)>>,
    /// With a quota: the upper object was freed (space and inode released) when its last name
    /// went, while a handle opened just before was not yet registered; that handle's last
    /// close must not free it again. Changed under `io_lock`.
    pub freed: std::sync::atomic::AtomicBool,
    /// Directories: open fds of this directory in each layer, opened once beneath the layer
    /// root and then used for every lookup, create and readdir in it (they follow renames).
    pub dirfds: Mutex<Vec<CachedDir>>,
    /// A cached fd of this directory was used since the last sweep of the dir-fd cache
    /// (second chance before it is closed: `Union::evict_dirfds`).
    pub dirfd_used: std::sync::atomic::AtomicBool,
    /// The node is in the dir-fd cache's queue (once at most).
    pub dirfd_queued: std::sync::atomic::AtomicBool,
    /// Bumped whenever the node starts naming another directory (or none): an fd opened
    /// under an older generation is not cached.
    pub dirgen: AtomicU64,
    /// Directories: the generation of the last listing made of it (kept in
    /// `Union::kept_listings` while it lasts; 0: none).
    pub last_listing: AtomicU64,
    /// Directories: the listings of it being read now.
    pub listing_uses: Mutex<super::readdir::ListingUses>,
    /// The node's xattrs as stored in its top layer (names and values), loaded on first use.
    /// Every change goes through us (setxattr, removexattr, setattr, writes that drop
    /// security.capability), and each of those drops it.
    pub xattrs: Mutex<Option<XattrCache>>,
    /// Bumped on every invalidation of `xattrs` (a load that raced with one is not kept).
    pub xgen: AtomicU64,
    /// Regular files: who does the I/O of the node's open files (FUSE passthrough or us).
    pub kio: Mutex<KernelIo>,
}

/// The kernel's registration of a backing file for FUSE passthrough, opaque here (it is the
/// FUSE adapter's type). Dropping the last clone unregisters it.
pub type Backing = Arc<dyn std::any::Any + Send + Sync>;

/// Who serves the I/O of a node's open files. The kernel (6.9+) requires that while any open
/// file of an inode is in passthrough mode, every open of it is, with the same backing file;
/// an inode with files open through the daemon cannot get a passthrough open. So a node is in
/// one mode at a time: `direct` opens (the kernel reads and writes the backing file itself) or
/// `daemon` opens (through us and the page cache), never both.
#[derive(Debug, Default)]
pub struct KernelIo {
    /// Open handles served by the daemon.
    pub daemon: u32,
    /// Open handles in passthrough mode.
    pub direct: u32,
    /// While `direct` > 0: the registered backing file and our fd of it.
    pub backing: Option<(Backing, Arc<OwnedFd>)>,
    /// That backing file is a lower layer's (`passthrough=lower`): no open may change the
    /// file until `direct` is back to 0.
    pub backing_lower: bool,
    /// A writable direct open happened since the daemon last served the file: the kernel's
    /// cached pages of the FUSE inode (and any of ours) may be stale.
    pub changed_directly: bool,
    /// The daemon served the file with FOPEN_KEEP_CACHE since its last passthrough open: the
    /// kernel may hold cached pages of the FUSE inode, which the next passthrough open drops.
    pub kernel_pages: bool,
}

/// Cached xattrs of a node: (layer name, value) pairs.
pub type XattrCache = Arc<Vec<(std::ffi::OsString, Vec<u8>)>>;

/// Directory fds cached in nodes, process-wide: what the dir-fd cap bounds.
static DIRFDS_CACHED: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);

/// How many directory fds nodes cache now.
pub fn dirfds_cached() -> usize {
    DIRFDS_CACHED.load(Ordering::Relaxed)
}

/// Removed objects pinned by nodes, process-wide (bounded by the dir-fd cap too).
static PINNED: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);

/// Removed objects pinned now.
pub fn pinned() -> usize {
    PINNED.load(Ordering::Relaxed)
}

/// A removed upper object held open (`O_PATH`) by its node while the kernel still holds the
/// node (and its blocks, for the reaper, in bytes). The node id is the object's inode number:
/// were the filesystem free to hand that number to a new object meanwhile, the new object's
/// entry (same id, new generation) would make the kernel retire the inode it holds — and a
/// process that had just looked the old object up and opened it reads EIO. Held, the number
/// cannot come back until the kernel forgets the node (`Union::forget`).
#[derive(Debug)]
pub struct Pin(Option<(OwnedFd, u64)>);

impl Pin {
    pub fn new(hold: (OwnedFd, u64)) -> Pin {
        PINNED.fetch_add(1, Ordering::Relaxed);
        Pin(Some(hold))
    }

    /// The held object (an `O_PATH` descriptor).
    pub fn fd(&self) -> Option<std::os::fd::BorrowedFd<'_>> {
        use std::os::fd::AsFd;
        self.0.as_ref().map(|(fd, _)| fd.as_fd())
    }

    /// The held object, for the reaper.
    pub fn into_hold(mut self) -> Option<(OwnedFd, u64)> {
        self.0.take()
    }
}

impl Drop for Pin {
    fn drop(&mut self) {
        PINNED.fetch_sub(1, Ordering::Relaxed);
    }
}

/// One directory fd cached in a node (counted while cached).
#[derive(Debug)]
pub struct CachedDir {
    /// The layer it is open in.
    pub layer: LayerRef,
    /// The open directory.
    pub fd: Arc<OwnedFd>,
}

impl CachedDir {
    /// Cache `fd`, the directory in `layer`.
    pub fn new(layer: LayerRef, fd: Arc<OwnedFd>) -> CachedDir {
        DIRFDS_CACHED.fetch_add(1, Ordering::Relaxed);
        CachedDir { layer, fd }
    }
}

impl Drop for CachedDir {
    fn drop(&mut self) {
        DIRFDS_CACHED.fetch_sub(1, Ordering::Relaxed);
    }
}

impl Node {
    /// A node with the given identity and state.
    pub fn new(ino: u64, kind: u32, st: NodeState) -> Node {
        Node {
            ino,
            kind,
            generation: AtomicU64::new(0),
            nlookup: AtomicU64::new(0),
            upper_obj: AtomicU64::new(0),
            names_gen: AtomicU64::new(0),
            gone: std::sync::atomic::AtomicBool::new(false),
            pin: Mutex::new(None),
            st: Mutex::new(st),
            copy_lock: Mutex::new(()),
            io_lock: Mutex::new(None),
            freed: std::sync::atomic::AtomicBool::new(false),
            dirfds: Mutex::new(Vec::new()),
            dirfd_used: std::sync::atomic::AtomicBool::new(false),
            dirfd_queued: std::sync::atomic::AtomicBool::new(false),
            // Unique across nodes too: kept listings are found by (node id, generation), and
            // a node id can name another directory after the first one's node is gone.
            dirgen: AtomicU64::new(NEXT_DIRGEN.fetch_add(1 << 32, Ordering::Relaxed)),
            last_listing: AtomicU64::new(0),
            listing_uses: Mutex::new(Default::default()),
            xattrs: Mutex::new(None),
            xgen: AtomicU64::new(0),
            kio: Mutex::new(KernelIo::default()),
        }
    }

    /// The directory moves with a redirect: its lower layers are found where `paths` say
    /// (from the layer roots) from now on, not by its name.
    pub fn set_locators(&self, paths: Vec<(usize, Locator)>) {
        let mut st = self.st.lock();
        if st.redirects.as_deref() != Some(&paths[..]) {
            st.redirects = Some(paths.into());
        }
    }

    /// Is this a directory?
    pub fn is_dir(&self) -> bool {
        self.kind == libc::S_IFDIR
    }

    /// The cached fd of this directory in layer `r`, marked used for the dir-fd cache's
    /// sweep.
    pub fn cached_dirfd(&self, r: LayerRef) -> Option<Arc<OwnedFd>> {
        let fd = self.dirfds.lock().iter().find(|c| c.layer == r)?.fd.clone();
        if !self.dirfd_used.load(Ordering::Relaxed) {
            self.dirfd_used.store(true, Ordering::Relaxed);
        }
        Some(fd)
    }

    /// Forget cached directory fds (the node now names another directory, or none).
    pub fn reset_dirfds(&self) {
        let mut c = self.dirfds.lock();
        self.dirgen.fetch_add(1, Ordering::AcqRel);
        c.clear();
        // (Listings kept of the directory it used to be carry the old `dirgen`: not served.)
    }

    /// Forget the cached xattrs.
    pub fn invalidate_xattrs(&self) {
        let mut c = self.xattrs.lock();
        self.xgen.fetch_add(1, Ordering::AcqRel);
        *c = None;
    }

    /// A copy of the current state.
    pub fn state(&self) -> NodeState {
        self.st.lock().clone()
    }
}

/// Directory incarnations: each node's first (`Node::dirgen`), 2^32 apart.
static NEXT_DIRGEN: AtomicU64 = AtomicU64::new(0);

/// Directory moves on disk against paths built from node names (a seqlock): a directory
/// whose fd is not cached is opened by the names from an ancestor down to it, and a rename
/// of one of those directories changes the disk before it changes the nodes' names. A path
/// walked meanwhile would open nothing (ENOENT) or, after an exchange, the other directory,
/// whose fd the node would then keep: creates in one directory would land in another.
#[derive(Debug, Default)]
pub struct DirMoves(super::Activity);

/// A directory move in progress (from before the disk changes until the names have).
pub struct DirMoving<'a>(&'a DirMoves);

impl DirMoves {
    /// `f` run again until no change began while it ran (it read names or marks a change
    /// alters), at most `tries` times: None if changes never paused.
    pub fn settled<T>(&self, tries: u32, mut f: impl FnMut() -> T) -> Option<T> {
        for i in 0..tries {
            let stamp = self.stamp();
            let v = f();
            if self.unchanged(stamp) {
                return Some(v);
            }
            drop(v);
            if i < 4 {
                std::thread::yield_now();
            } else {
                std::thread::sleep(std::time::Duration::from_micros(20));
            }
        }
        None
    }

    pub fn begin(&self) -> DirMoving<'_> {
        self.0.begin();
        DirMoving(self)
    }

    /// A stamp taken before reading names for a walk; `None` while a move runs.
    pub fn stamp(&self) -> Option<u64> {
        self.0.idle()
    }

    /// Did no move start since `stamp` (so the names walked matched the disk)?
    pub fn unchanged(&self, stamp: Option<u64>) -> bool {
        stamp.is_some_and(|s| self.0.none_since(s))
    }
}

impl Drop for DirMoving<'_> {
    fn drop(&mut self) {
        self.0.0.end();
    }
}

/// The sharded node table.
#[derive(Debug)]
pub struct NodeTable {
    map: DashMap<u64, Arc<Node>>,
    /// Last generation handed out.
    last_gen: AtomicU64,
}

impl Default for NodeTable {
    fn default() -> NodeTable {
        NodeTable {
            map: crate::new_map(),
            last_gen: AtomicU64::new(0),
        }
    }
}

impl NodeTable {
    /// Look a node up by id.
    pub fn get(&self, ino: u64) -> Option<Arc<Node>> {
        self.map.get(&ino).map(|n| n.clone())
    }

    /// Insert `node` unless a node of the same id and type exists, adding `refs` kernel
    /// references under the table's shard lock (so a concurrent forget cannot drop the node
    /// between finding and referencing it). Returns the node in the table and whether it is new.
    /// A node of another type under the same id (an inode number reused while the kernel still
    /// holds the old inode) is replaced, keeping the old reference count: the kernel will forget
    /// those references under this id.
    pub fn insert_or_get(&self, node: Node, refs: u64) -> (Arc<Node>, bool) {
        use dashmap::mapref::entry::Entry;
        match self.map.entry(node.ino) {
            Entry::Occupied(mut e) => {
                if e.get().kind == node.kind {
                    e.get().nlookup.fetch_add(refs, Ordering::AcqRel);
                    (e.get().clone(), false)
                } else {
                    let old = e.get().nlookup.load(Ordering::Acquire);
                    node.nlookup.store(old + refs, Ordering::Release);
                    self.renew(&node);
                    let n = Arc::new(node);
                    e.insert(n.clone());
                    (n, true)
                }
            }
            Entry::Vacant(e) => {
                node.nlookup.store(refs, Ordering::Release);
                self.renew(&node);
                let n = Arc::new(node);
                e.insert(n.clone());
                (n, true)
            }
        }
    }

    fn next_gen(&self) -> u64 {
        self.last_gen.fetch_add(1, Ordering::AcqRel) + 1
    }

    /// `node` now names another object than the one the kernel may still hold under its id
    /// (or its object is gone for good): entry replies carry a new generation from now on.
    /// (Taken only for new objects: the kernel keeps 32 bits of it.) The kernel knows the root
    /// under generation 0.
    pub fn renew(&self, node: &Node) {
        if node.ino != ROOT_INO {
            node.generation.store(self.next_gen(), Ordering::Release);
        }
    }

    /// Drop `n` kernel references; remove the node when none remain.
    pub fn forget(&self, ino: u64, n: u64) -> Option<Arc<Node>> {
        self.forget_unless(ino, n, |_| false)
    }

    /// Drop `n` kernel references to `ino`; with none left the node goes, unless `keep` says
    /// it must stay (it then stays with no reference until [`Nodes::remove_unreferenced`]).
    /// Returns the node if the kernel holds it no more.
    pub fn forget_unless(
        &self,
        ino: u64,
        n: u64,
        keep: impl Fn(&Node) -> bool,
    ) -> Option<Arc<Node>> {
        if ino == ROOT_INO {
            return None;
        }
        // Counted down under the table's guard (a node of another type may replace this one
        // and take over its count: insert_or_get).
        let (node, prev) = {
            let g = self.map.get(&ino)?;
            let prev = g
                .nlookup
                .fetch_update(Ordering::AcqRel, Ordering::Acquire, |v| {
                    Some(v.saturating_sub(n))
                })
                .unwrap_or(0);
            (g.clone(), prev)
        };
        // `keep` is asked with no lock of the table held. A node it keeps gains no new
        // reason to stay meanwhile: that takes an open, so a lookup (a reference) first.
        if prev > n {
            return None;
        }
        if !keep(&node) {
            self.remove_unreferenced(ino);
        }
        Some(node)
    }

    /// Remove `ino`'s node if the kernel holds no reference to it (one kept by
    /// [`Nodes::forget_unless`]).
    pub fn remove_unreferenced(&self, ino: u64) {
        if ino != ROOT_INO {
            self.map
                .remove_if(&ino, |_, node| node.nlookup.load(Ordering::Acquire) == 0);
        }
    }

    /// Number of nodes held.
    pub fn len(&self) -> usize {
        self.map.len()
    }

    /// Is the table empty?
    pub fn is_empty(&self) -> bool {
        self.map.is_empty()
    }
}

/// Persistent map from an upper object's inode number to the inode number its copy-up origin
/// had, so st_ino stays stable across copy-up and remounts. Kept in `workdir/unionfs/inomap`
/// as 16-byte little-endian records (upper, origin); origin 0 removes a mapping.
#[derive(Debug)]
pub struct InoMap {
    map: DashMap<u64, u64>,
    file: Option<Mutex<std::fs::File>>,
    path: Option<PathBuf>,
}

impl InoMap {
    /// An in-memory map only (read-only mounts).
    pub fn memory() -> InoMap {
        InoMap {
            map: crate::new_map(),
            file: None,
            path: None,
        }
    }

    /// Load (and keep appending to) the map file (in the workdir's bookkeeping dir, reached
    /// as [`crate::quota::store::StateFile`] does: never through a link).
    pub fn open(file: &crate::quota::store::StateFile) -> std::io::Result<InoMap> {
        let map = crate::new_map();
        let buf = file.read()?.unwrap_or_default();
        // Checked (a regular file with one name) before anything rewrites it: a refused mount
        // leaves it as it was.
        let mut f = file.open_append()?;
        let records = buf.len() as u64 / 16;
        {
            for rec in buf.chunks_exact(16) {
                let up = u64::from_le_bytes(rec[..8].try_into().unwrap_or([0; 8]));
                let or = u64::from_le_bytes(rec[8..].try_into().unwrap_or([0; 8]));
                if or == 0 {
                    map.remove(&up);
                } else {
                    map.insert(up, or);
                }
            }
        }
        // A part of a record at the end (the file cut short by hand or by a disk error):
        // records appended after it would all be read misaligned at the next mount. Rewritten
        // whole records only.
        let torn = buf.len() % 16 != 0;
        if torn {
            log::warn!(
                "{}: {} bytes after the last whole record dropped",
                file.shown().display(),
                buf.len() % 16
            );
        }
        // Compact when dead records dominate: rewrite live records only, then append.
        if torn || records > 2 * map.len() as u64 + 1024 {
            let mut out = Vec::with_capacity(map.len() * 16);
            for e in map.iter() {
                out.extend_from_slice(&e.key().to_le_bytes());
                out.extend_from_slice(&e.value().to_le_bytes());
            }
            file.replace(&out)?;
            f = file.open_append()?;
        }
        Ok(InoMap {
            map,
            file: Some(Mutex::new(f)),
            path: Some(file.shown().to_path_buf()),
        })
    }

    /// The origin inode recorded for upper inode `upper`.
    pub fn get(&self, upper: u64) -> Option<u64> {
        self.map.get(&upper).map(|v| *v)
    }

    /// Record that upper inode `upper` was copied up from `origin` (0: forget any record).
    pub fn set(&self, upper: u64, origin: u64) {
        if origin == 0 {
            if self.map.remove(&upper).is_none() {
                return;
            }
        } else {
            self.map.insert(upper, origin);
        }
        if let Some(f) = &self.file {
            let mut rec = [0u8; 16];
            rec[..8].copy_from_slice(&upper.to_le_bytes());
            rec[8..].copy_from_slice(&origin.to_le_bytes());
            if let Err(e) = f.lock().write_all(&rec) {
                log::warn!("inomap {:?}: {e}", self.path);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn state() -> NodeState {
        NodeState {
            parent: ROOT_INO,
            name: "x".into(),
            aliases: Default::default(),
            upper: true,
            lower: None,
            lowers: Vec::new(),
            opaque: false,
            redirects: None,
            data: None,
            impure: 0,
            unlinked: false,
        }
    }

    fn generation(n: &Node) -> u64 {
        n.generation.load(Ordering::Acquire)
    }

    #[test]
    fn a_node_keeps_its_generation_until_renewed() {
        let t = NodeTable::default();
        let (a, created) = t.insert_or_get(Node::new(7, libc::S_IFDIR, state()), 1);
        assert!(created);
        let g = generation(&a);
        assert_ne!(g, 0, "only the root is known under generation 0");
        // Looked up again: the same object, the same generation.
        let (b, created) = t.insert_or_get(Node::new(7, libc::S_IFDIR, state()), 1);
        assert!(!created && Arc::ptr_eq(&a, &b));
        assert_eq!(generation(&b), g);
        assert_eq!(b.nlookup.load(Ordering::Acquire), 2);
        // Its object gone, the id names another one.
        t.renew(&b);
        assert_ne!(generation(&b), g);
        // Another type under the id: a new node with a new generation, references kept.
        let (c, created) = t.insert_or_get(Node::new(7, libc::S_IFREG, state()), 1);
        assert!(created);
        assert!(generation(&c) != g && generation(&c) != generation(&b));
        assert_eq!(c.nlookup.load(Ordering::Acquire), 3);
        // Forgotten and found again: new too.
        t.forget(7, 3);
        assert!(t.get(7).is_none());
        let (d, _) = t.insert_or_get(Node::new(7, libc::S_IFREG, state()), 1);
        assert!(generation(&d) > generation(&c));
        // The root stays at 0.
        let (r, _) = t.insert_or_get(Node::new(ROOT_INO, libc::S_IFDIR, state()), 1);
        t.renew(&r);
        assert_eq!(generation(&r), 0);
    }
}
