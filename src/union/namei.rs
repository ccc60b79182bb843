//! Lookup through the layers (kernel fs/overlayfs/namei.c): the topmost object wins; a
//! whiteout ends the search; directories merge with lower directories until one is opaque;
//! a non-directory hides everything below it.

use std::ffi::{OsStr, OsString};
use std::os::fd::{AsFd, BorrowedFd};
use std::os::unix::ffi::OsStrExt;
use std::sync::Arc;

use nix::errno::Errno;
use nix::sys::stat::FileStat;

use super::inode::{DataAt, Locator, impure_bit};
use super::ondisk::{DirMarks, Redirect};
use super::{Attr, Ctx, Error, LayerRef, Node, NodeState, Result, Union};
use crate::layer::{self, valid_name};

/// What a lookup found.
#[derive(Debug)]
pub struct Found {
    /// Layer of the top object.
    pub top: LayerRef,
    /// Its stat.
    pub stat: FileStat,
    /// Lower layers merged (directories) or the lower holding the object (non-dir: first).
    pub lowers: Vec<usize>,
    /// Top directory is opaque.
    pub opaque: bool,
    /// Lower layers of `lowers` the directory was found in through a redirect, and where.
    pub redirects: Vec<(usize, Locator)>,
    /// A metacopy file (kernel overlayfs `metacopy=on`): where its data is.
    pub data: Option<DataAt>,
    /// Directories: the layers it is impure in ([`super::inode::impure_bit`]).
    pub impure: u64,
    /// [`Union::upper_only_marks`] when the lookup began.
    pub stamp: Option<u64>,
    /// [`Union::dir_stamp`] of the parent when the lookup began: a removal or rename in it
    /// since may have taken the name from the object found.
    pub dir_stamp: Option<u64>,
}

impl Found {
    /// The redirects to keep in the node (None: found by name in every layer).
    pub(crate) fn redirects(&self) -> Option<Arc<[(usize, Locator)]>> {
        (!self.redirects.is_empty()).then(|| self.redirects.clone().into())
    }
}

/// Does regular file `st` hold fewer blocks than its size needs — as a metacopy file, which
/// holds none (an image such as composefs's, whose directories carry no `impure` mark)?
fn holey(st: &FileStat) -> bool {
    st.st_blocks.saturating_mul(512) < st.st_size
}

/// Where [`Union::locate`] sends a lookup in one lower layer.
enum Located {
    /// Not in this layer.
    Skip,
    /// A whiteout or a non-directory on a redirect's way: the lookup ends.
    Stop,
    /// Look in `dir` for `name` (None: the name looked up).
    At {
        dir: Arc<std::os::fd::OwnedFd>,
        name: Option<OsString>,
        /// How it was found there, when not by its own name in its parent's directory.
        phys: Option<Locator>,
        /// An opaque directory on the way: the layers below are not searched.
        stop_after: bool,
    },
}

/// What the walk of a redirect's path in one layer found ([`Union::walk_redirect`]).
enum Walk {
    /// A whiteout or a non-directory on the way: the lookup ends.
    Stop,
    /// Not in this layer; the path for the layers below, if a redirect on the way changed it.
    Absent(Option<Vec<OsString>>),
    /// The directory that holds the last component.
    At {
        dir: Arc<std::os::fd::OwnedFd>,
        rewrite: Option<Vec<OsString>>,
        stop: bool,
    },
}

impl Union {
    /// Find `name` in directory node `parent` across the layers. `Ok(None)`: not in the
    /// merged view (missing or whited out).
    pub(crate) fn find(&self, parent: &Node, name: &OsStr) -> Result<Option<Found>> {
        self.find_from(parent, name, None)
    }

    /// [`Union::find`], starting at lower layer `from` when known: the topmost layer holding
    /// the name in a listing of `parent` made while the name could not change (READDIRPLUS:
    /// the kernel holds the directory's lock for the whole request, so no create, removal or
    /// rename in it runs meanwhile; lower layers do not change under a mount). The lower
    /// layers above it hold neither the name nor a whiteout of it, so they are not searched
    /// again. Upper always is: a copy-up (an open for writing) takes no lock of the directory,
    /// and the node that would tell of it may be gone already (forgotten).
    pub(crate) fn find_from(
        &self,
        parent: &Node,
        name: &OsStr,
        from: Option<LayerRef>,
    ) -> Result<Option<Found>> {
        if !parent.is_dir() {
            return Err(Error::new(Errno::ENOTDIR, "lookup in non-directory"));
        }
        if !valid_name(name) {
            return Err(Error::new(Errno::EINVAL, "bad name"));
        }
        if name.len() > 255 {
            return Err(Error::new(Errno::ENAMETOOLONG, "lookup"));
        }
        if self.names.is_aufs_meta(name) {
            // `.wh.*` names are whiteout metadata in AUFS mode, in every layer.
            return Ok(None);
        }
        // A copy-up of this name not yet committed is not in upper yet.
        self.commits.wait_name(parent.ino, name);
        let stamp = self.upper_only_marks.stamp();
        let dir_stamp = self.dir_stamp(parent.ino);
        // Only what lookup needs, without cloning names (the hot path).
        let (p_upper, p_lowers, p_impure) = {
            let st = parent.st.lock();
            (st.upper, st.lowers.clone(), st.impure)
        };
        let mut found: Option<Found> = None;
        let mut upper_redirect = None;
        // Lower layers above `from` to skip (parent's lower list order is top to bottom).
        let skip = match from {
            Some(LayerRef::Lower(k)) => p_lowers.iter().position(|&li| li == k).unwrap_or(0),
            _ => 0,
        };
        if p_upper {
            let dir = match self.dir_fd(parent, LayerRef::Upper) {
                Ok(d) => Some(d),
                Err(Errno::ENOENT) | Err(Errno::ENOTDIR) if parent.st.lock().unlinked => None,
                // Not where its node says: a rename of it (or of a directory above it) is
                // between its move on disk and its new name in the node. Not "absent" (the
                // kernel would keep that as a negative entry): ESTALE makes the VFS walk the
                // path again.
                Err(Errno::ENOENT) | Err(Errno::ENOTDIR) => {
                    return Err(Error::new(Errno::ESTALE, "upper dir moved meanwhile"));
                }
                Err(e) => return Err(Error::new(e, "open upper dir")),
            };
            if let Some(dir) = dir {
                match self.dir_times.steady(|| layer::stat_at(dir.as_fd(), name)) {
                    Ok(st) => {
                        if super::ondisk::is_whiteout_stat(&st) {
                            return Ok(None);
                        }
                        let is_dir = st.st_mode & libc::S_IFMT == libc::S_IFDIR;
                        let mut marks = match is_dir {
                            true => self.dir_marks(&dir, name)?,
                            false => Default::default(),
                        };
                        let opaque = marks.opaque == Some(b'y');
                        found = Some(Found {
                            top: LayerRef::Upper,
                            stat: st,
                            lowers: Vec::new(),
                            opaque,
                            redirects: Vec::new(),
                            data: None,
                            stamp,
                            dir_stamp,
                            impure: if marks.impure {
                                impure_bit(LayerRef::Upper)
                            } else {
                                0
                            },
                        });
                        if !is_dir || opaque {
                            // Only where kernel overlayfs copied files up can one be a
                            // metacopy file: not a syscall more for any other file.
                            if st.st_mode & libc::S_IFMT == libc::S_IFREG
                                && (p_impure & impure_bit(LayerRef::Upper) != 0 || holey(&st))
                                && let Some(f) = &mut found
                            {
                                f.data = self.metacopy_data(
                                    parent,
                                    name,
                                    (dir.as_fd(), name, LayerRef::Upper, st.st_size),
                                    None,
                                    std::borrow::Cow::Borrowed(&p_lowers[..]),
                                )?;
                                f.lowers.extend(f.data.as_ref().map(|d| d.layer));
                            }
                            return Ok(found);
                        }
                        // As kernel overlayfs: with redirects not followed, a redirect is
                        // refused only where the lookup would go on below (a parent with
                        // lower layers), and otherwise not even read.
                        let below = if self.follow_redirects {
                            self.regular_lowers > 0
                        } else {
                            !p_lowers.is_empty()
                        };
                        if below {
                            upper_redirect = self
                                .follow_redirect(
                                    marks.redirect.take(),
                                    name,
                                    None,
                                    LayerRef::Upper,
                                )?
                                .map(|(loc, _)| loc);
                        }
                    }
                    Err(Errno::ENOENT) => {
                        // containers-storage layers used as upper carry AUFS whiteouts too.
                        if self.names.aufs_whiteout(dir.as_fd(), name) {
                            return Ok(None);
                        }
                    }
                    Err(e) => return Err(Error::new(e, "stat upper")),
                }
            }
        }
        // Where to look in the next lower layer: None, under `name` in the parent's directory
        // there; else where a redirect sent the lookup (kernel overlayfs `redirect_dir`).
        let mut next = upper_redirect;
        // Directories merge with regular lower layers only (not data-only ones).
        let nl = self.regular_lowers;
        let mut order: std::borrow::Cow<'_, [usize]> = match &next {
            None => std::borrow::Cow::Borrowed(&p_lowers[skip..]),
            // The listing that gave `from` looked for `name`, not for where it was moved from.
            Some(Locator::Name(_)) => std::borrow::Cow::Borrowed(&p_lowers[..]),
            Some(Locator::Path(_)) => std::borrow::Cow::Owned((0..nl).collect()),
        };
        let mut i = 0;
        while i < order.len() {
            let li = order[i];
            i += 1;
            let (dir, held, phys, mut stop_after) = match self.locate(parent, li, &mut next)? {
                Located::Skip => continue,
                Located::Stop => return Ok(found),
                Located::At {
                    dir,
                    name,
                    phys,
                    stop_after,
                } => (dir, name, phys, stop_after),
            };
            let lname = held.as_deref().unwrap_or(name);
            if self.names.aufs_whiteout(dir.as_fd(), lname) {
                return Ok(found);
            }
            let st = match layer::stat_at(dir.as_fd(), lname) {
                Ok(st) => st,
                Err(Errno::ENOENT) => continue,
                Err(e) => return Err(Error::new(e, "stat lower")),
            };
            let dir_has_x = st.st_mode & libc::S_IFMT == libc::S_IFREG
                && st.st_size == 0
                && self
                    .names
                    .opaque_mark(dir.as_fd(), OsStr::new(""))
                    .ctx("opaque xattr")?
                    == Some(b'x');
            if self.names.is_whiteout(dir.as_fd(), lname, &st, dir_has_x) {
                return Ok(found);
            }
            let is_dir = st.st_mode & libc::S_IFMT == libc::S_IFDIR;
            if !is_dir && found.is_some() {
                // A non-directory below a directory is hidden by it.
                return Ok(found);
            }
            let mut marks = match is_dir {
                true => self.dir_marks(&dir, lname)?,
                false => Default::default(),
            };
            let opaque = marks.opaque == Some(b'y');
            let f = match &mut found {
                None => found.insert(Found {
                    top: LayerRef::Lower(li),
                    stat: st,
                    lowers: vec![li],
                    opaque,
                    redirects: Vec::new(),
                    data: None,
                    impure: 0,
                    stamp,
                    dir_stamp,
                }),
                Some(f) => {
                    f.lowers.push(li);
                    f
                }
            };
            if marks.impure {
                f.impure |= impure_bit(LayerRef::Lower(li));
            }
            if let Some(loc) = &phys {
                f.redirects.push((li, loc.clone()));
            }
            if !is_dir {
                // The top object (a non-directory below another object returned above). A
                // metacopy file only in a directory kernel overlayfs marked impure (found by
                // a redirect's path: that directory is not the parent's, so always looked at).
                let impure_dir = matches!(phys, Some(Locator::Path(_)))
                    || p_impure & impure_bit(LayerRef::Lower(li)) != 0;
                if st.st_mode & libc::S_IFMT == libc::S_IFREG && (impure_dir || holey(&st)) {
                    f.data = self.metacopy_data(
                        parent,
                        name,
                        (dir.as_fd(), lname, LayerRef::Lower(li), st.st_size),
                        next.clone(),
                        std::borrow::Cow::Borrowed(&order[i..]),
                    )?;
                }
                return Ok(found);
            }
            if opaque {
                return Ok(found);
            }
            let below = if self.follow_redirects {
                li + 1 < nl
            } else {
                i < order.len()
            };
            if below
                && let Some((loc, absolute)) = self.follow_redirect(
                    marks.redirect.take(),
                    lname,
                    next.as_ref(),
                    LayerRef::Lower(li),
                )?
            {
                next = Some(loc);
                if absolute {
                    // From the root: every layer below this one.
                    order = std::borrow::Cow::Owned((li + 1..nl).collect());
                    i = 0;
                    stop_after = false;
                }
            }
            if stop_after {
                // An opaque directory on the way of the redirect's path in this layer.
                return Ok(found);
            }
        }
        Ok(found)
    }

    /// The data of regular file `name` of `parent`, found as `meta` (its directory, its name
    /// there, its layer): None unless it is a metacopy file (kernel overlayfs `metacopy=on`:
    /// its metadata copied up alone), whose data is the first file below that is not one,
    /// found under its name (or its own redirect, if it was moved) in `order`, the layers
    /// below, as the kernel finds it. Refused (EPERM) unless `metacopy=on`, as the kernel
    /// refuses it; EIO when there is no data below.
    fn metacopy_data(
        &self,
        parent: &Node,
        name: &OsStr,
        meta: (BorrowedFd<'_>, &OsStr, LayerRef, i64),
        mut next: Option<Locator>,
        mut order: std::borrow::Cow<'_, [usize]>,
    ) -> Result<Option<DataAt>> {
        let (mdir, mname, mlayer, size) = meta;
        if !self.names.is_metacopy(mdir, mname).ctx("metacopy xattr")? {
            return Ok(None);
        }
        // As kernel overlayfs: without metacopy=on only a lower metacopy file whose data is
        // in a data-only layer is followed (composefs's layout); any other is refused where
        // the lookup meets it or its data.
        let refuse = || {
            log::warn!(
                "refusing to follow the metacopy file {name:?} in {mlayer:?} (mount with metacopy=on)"
            );
            Error::new(Errno::EPERM, "metacopy file not followed")
        };
        if !self.follow_metacopy && mlayer == LayerRef::Upper {
            return Err(refuse());
        }
        // An absolute redirect leads on into the data-only layers too.
        let nl = self.lowers.len();
        // Moved by the kernel after its copy-up: its redirect says from where.
        let follow = |dir: BorrowedFd<'_>,
                      n: &OsStr,
                      at: LayerRef,
                      next: &mut Option<Locator>,
                      order: &mut std::borrow::Cow<'_, [usize]>,
                      i: &mut usize|
         -> Result<()> {
            let red = self.names.redirect_of(dir, n).transpose();
            if let Some((loc, absolute)) = self.follow_redirect(red, n, next.as_ref(), at)? {
                *next = Some(loc);
                if absolute {
                    let from = match at {
                        LayerRef::Upper => 0,
                        LayerRef::Lower(l) => l + 1,
                    };
                    *order = std::borrow::Cow::Owned((from..nl).collect());
                    *i = 0;
                }
            }
            Ok(())
        };
        let mut i = 0;
        follow(mdir, mname, mlayer, &mut next, &mut order, &mut i)?;
        let no_data = || {
            log::warn!("metacopy file {name:?} in {mlayer:?} has no data below");
            Error::new(Errno::EIO, "metacopy file without its data")
        };
        // Where the data-only layers were first looked in: as kernel overlayfs looks them up
        // only when the data is needed, a file whose data is not there fails its open
        // (ENOENT), not its lookup.
        let mut lazy = None;
        while i < order.len() {
            let li = order[i];
            i += 1;
            if li >= self.regular_lowers
                && lazy.is_none()
                && let Some(Locator::Path(p)) = &next
            {
                lazy = Some((li, p.clone()));
            }
            let (dir, held, phys) = match self.locate(parent, li, &mut next)? {
                Located::Skip => continue,
                Located::Stop => return Err(no_data()),
                Located::At {
                    dir, name, phys, ..
                } => (dir, name, phys),
            };
            let lname = held.as_deref().unwrap_or(name);
            let data_only = li >= self.regular_lowers;
            if !data_only && self.names.aufs_whiteout(dir.as_fd(), lname) {
                return Err(no_data());
            }
            let st = match layer::stat_at(dir.as_fd(), lname) {
                Ok(st) => st,
                Err(Errno::ENOENT) => continue,
                Err(e) => return Err(Error::new(e, "stat lower")),
            };
            if st.st_mode & libc::S_IFMT != libc::S_IFREG {
                if data_only {
                    // A data-only layer is looked up by path alone: the next one, then.
                    continue;
                }
                // A whiteout, a directory, another kind of file: not its data.
                return Err(no_data());
            }
            if !data_only && !self.follow_metacopy {
                return Err(refuse());
            }
            if !data_only
                && self
                    .names
                    .is_metacopy(dir.as_fd(), lname)
                    .ctx("metacopy xattr")?
            {
                follow(
                    dir.as_fd(),
                    lname,
                    LayerRef::Lower(li),
                    &mut next,
                    &mut order,
                    &mut i,
                )?;
                continue;
            }
            return Ok(Some(DataAt {
                layer: li,
                at: phys,
                blocks: st.st_blocks,
            }));
        }
        match lazy {
            // (Its blocks guessed from its size, as the kernel does for such a file.)
            Some((li, p)) => Ok(Some(DataAt {
                layer: li,
                at: Some(Locator::Path(p)),
                blocks: (size.max(0) + 511) / 512,
            })),
            None => Err(no_data()),
        }
    }

    /// Where to look in lower layer `li` for a name of `parent`, given where the layers
    /// above sent the lookup (`next`, None: the name itself in the parent's directory there;
    /// a redirect met on the way of a path rewrites it for the layers below).
    fn locate(&self, parent: &Node, li: usize, next: &mut Option<Locator>) -> Result<Located> {
        let by_name = |held: Option<OsString>| -> Result<Located> {
            match self.dir_fd(parent, LayerRef::Lower(li)) {
                Ok(dir) => Ok(Located::At {
                    dir,
                    phys: held.clone().map(Locator::Name),
                    name: held,
                    stop_after: false,
                }),
                Err(Errno::ENOENT) | Err(Errno::ENOTDIR) => Ok(Located::Skip),
                Err(e) => Err(Error::new(e, "open lower dir")),
            }
        };
        match next.clone() {
            None => by_name(None),
            Some(Locator::Name(n)) => by_name(Some(n)),
            Some(Locator::Path(path)) => match self.walk_redirect(li, &path)? {
                Walk::Stop => Ok(Located::Stop),
                Walk::Absent(rewrite) => {
                    if let Some(r) = rewrite {
                        *next = Some(Locator::Path(r.into()));
                    }
                    Ok(Located::Skip)
                }
                Walk::At { dir, rewrite, stop } => {
                    if let Some(r) = rewrite {
                        *next = Some(Locator::Path(r.into()));
                    }
                    Ok(Located::At {
                        dir,
                        name: path.last().cloned(),
                        phys: Some(Locator::Path(path)),
                        stop_after: stop,
                    })
                }
            },
        }
    }

    /// Where the lookup goes on in the layers below, when `name` (in layer `r`) carries
    /// redirect `red` (as read from its xattr): `cur` is where it was looked for in `r`
    /// (None: its own name). The bool: absolute (from the root of every layer below).
    fn follow_redirect(
        &self,
        red: Option<std::result::Result<Redirect, Errno>>,
        name: &OsStr,
        cur: Option<&Locator>,
        r: LayerRef,
    ) -> Result<Option<(Locator, bool)>> {
        let red = match red {
            None => return Ok(None),
            Some(Ok(red)) => red,
            Some(Err(e)) => {
                log::warn!("invalid redirect on {name:?} in {r:?}: {e}");
                return Err(Error::new(e, "redirect xattr"));
            }
        };
        if !self.follow_redirects {
            log::warn!(
                "refusing to follow the redirect of {name:?} in {r:?} (redirect_dir=nofollow, or userxattr)"
            );
            return Err(Error::new(Errno::EPERM, "redirect not followed"));
        }
        Ok(Some(match red {
            Redirect::Rel(n) => match cur {
                Some(Locator::Path(p)) => {
                    let mut v = p.to_vec();
                    v.pop();
                    v.push(n);
                    (Locator::Path(v.into()), false)
                }
                _ => (Locator::Name(n), false),
            },
            Redirect::Abs(p) => (Locator::Path(p.into()), true),
        }))
    }

    /// Walk the directories on the way of a redirect's `path` (all but its last component)
    /// in lower layer `li`, as kernel overlayfs does (ovl_lookup_layer): a missing one means
    /// not in this layer; a whiteout or a non-directory ends the lookup; an opaque one ends it
    /// after this layer (unless a later absolute redirect starts it again); a redirect on one
    /// rewrites the path for the layers below (`rewrite`), while this layer is walked on.
    fn walk_redirect(&self, li: usize, path: &[OsString]) -> Result<Walk> {
        let root = self.node(super::ROOT_INO)?;
        let mut cur = self
            .dir_fd(&root, LayerRef::Lower(li))
            .map_err(|e| Error::new(e, "open lower root"))?;
        // A data-only layer is walked as a plain path: no marks, and no way through is
        // "not here".
        let data_only = li >= self.regular_lowers;
        let last_layer = data_only || li + 1 == self.regular_lowers;
        let mut names: Option<Vec<OsString>> = None;
        let mut stop = false;
        let n = path.len();
        for (k, comp) in path.iter().enumerate().take(n.saturating_sub(1)) {
            if !data_only && self.names.aufs_whiteout(cur.as_fd(), comp) {
                return Ok(Walk::Stop);
            }
            let st = match layer::stat_at(cur.as_fd(), comp) {
                Ok(st) => st,
                Err(Errno::ENOENT) => return Ok(Walk::Absent(names)),
                Err(e) => return Err(Error::new(e, "stat lower")),
            };
            if st.st_mode & libc::S_IFMT != libc::S_IFDIR {
                if data_only {
                    return Ok(Walk::Absent(None));
                }
                // A whiteout, or a non-directory where a directory was to be.
                return Ok(Walk::Stop);
            }
            let mut marks = match data_only {
                true => DirMarks::default(),
                false => self.dir_marks(&cur, comp)?,
            };
            if marks.opaque == Some(b'y') {
                stop = true;
            } else if !last_layer {
                // Counted from the end: a rewrite changes what comes before.
                let at = names.as_ref().map_or(k, |v| v.len() - (n - k));
                let here = Locator::Path(
                    names
                        .as_ref()
                        .map_or(&path[..=k], |v| &v[..=at])
                        .to_vec()
                        .into(),
                );
                if let Some((loc, absolute)) = self.follow_redirect(
                    marks.redirect.take(),
                    comp,
                    Some(&here),
                    LayerRef::Lower(li),
                )? {
                    let Locator::Path(head) = loc else {
                        unreachable!("a redirect met on a path stays a path")
                    };
                    let mut v = head.to_vec();
                    v.extend_from_slice(&path[k + 1..]);
                    names = Some(v);
                    if absolute {
                        stop = false;
                    }
                }
            }
            let sub = self
                .layer(LayerRef::Lower(li))
                .open_dir_below(cur.as_fd(), std::slice::from_ref(comp))
                .map_err(|e| Error::new(e, "open lower dir"))?;
            cur = Arc::new(sub);
        }
        Ok(Walk::At {
            dir: cur,
            rewrite: names,
            stop,
        })
    }

    /// The overlay marks of directory `name` in `parent`; in AUFS mode a `.wh..wh..opq`
    /// inside it makes it opaque too.
    fn dir_marks(&self, parent: &std::os::fd::OwnedFd, name: &OsStr) -> Result<DirMarks> {
        let mut m = self
            .names
            .dir_marks(parent.as_fd(), name)
            .ctx("overlay xattrs")?;
        if m.opaque != Some(b'y') && self.names.aufs {
            // The AUFS marker lives inside the directory: open it only in AUFS mode.
            let sub = nix::fcntl::openat(
                parent.as_fd(),
                name,
                nix::fcntl::OFlag::O_RDONLY
                    | nix::fcntl::OFlag::O_DIRECTORY
                    | nix::fcntl::OFlag::O_NOFOLLOW
                    | nix::fcntl::OFlag::O_CLOEXEC,
                nix::sys::stat::Mode::empty(),
            )
            .ctx("open directory")?;
            let marker = OsStr::from_bytes(super::ondisk::AUFS_OPAQUE);
            if layer::stat_at(sub.as_fd(), marker).is_ok() {
                m.opaque = Some(b'y');
            }
        }
        Ok(m)
    }

    /// Does a lower layer below `parent` hold a visible `name` (kernel ovl_lower_positive)?
    /// Decides whether removing `name` from upper needs a whiteout.
    pub(crate) fn lower_positive(&self, parent: &Node, name: &OsStr) -> Result<bool> {
        let pst = parent.state();
        if pst.lowers.is_empty() {
            return Ok(false);
        }
        for &li in &pst.lowers {
            let dir = match self.dir_fd(parent, LayerRef::Lower(li)) {
                Ok(d) => d,
                Err(Errno::ENOENT) | Err(Errno::ENOTDIR) => continue,
                Err(e) => return Err(Error::new(e, "open lower dir")),
            };
            if self.names.aufs_whiteout(dir.as_fd(), name) {
                return Ok(false);
            }
            match layer::stat_at(dir.as_fd(), name) {
                Ok(st) => {
                    let dir_has_x = st.st_mode & libc::S_IFMT == libc::S_IFREG
                        && st.st_size == 0
                        && self
                            .names
                            .opaque_mark(dir.as_fd(), OsStr::new(""))
                            .ctx("xattr")?
                            == Some(b'x');
                    return Ok(!self.names.is_whiteout(dir.as_fd(), name, &st, dir_has_x));
                }
                Err(Errno::ENOENT) => continue,
                Err(e) => return Err(Error::new(e, "stat lower")),
            }
        }
        Ok(false)
    }

    /// The node id of the object `fs` found as (parent, name) in layer `r`.
    pub(crate) fn node_ino(&self, r: LayerRef, fs: &FileStat, parent: u64, name: &OsStr) -> u64 {
        let is_dir = fs.st_mode & libc::S_IFMT == libc::S_IFDIR;
        if r != LayerRef::Upper && !is_dir && fs.st_nlink > 1 {
            // Names of a hard-linked lower file are separate inodes until copy-up breaks the
            // link (as in the kernel without index=on); FUSE tells us only the inode of an open
            // or setattr, so each name needs its own node to copy up the right one.
            per_name_ino(parent, name, fs.st_ino)
        } else {
            self.ino_for(r, fs)
        }
    }

    /// Turn a lookup result into a node (existing or new) under (parent, name).
    pub(crate) fn node_for(
        &self,
        parent: u64,
        name: &OsStr,
        f: &Found,
        refs: u64,
    ) -> (Arc<Node>, Attr) {
        let kind = f.stat.st_mode & libc::S_IFMT;
        let is_dir = kind == libc::S_IFDIR;
        // A directory was made upper-only (dir_rename=copy) since this lookup began: what it
        // read of this one may be from before (lower layers, no opaque mark). Looked up again
        // for a node made now; an existing node keeps its state (below).
        let again;
        let f = match is_dir && !self.upper_only_marks.unchanged(f.stamp) {
            true => match self.find_again(parent, name, f) {
                Some(g) => {
                    again = g;
                    &again
                }
                None => f,
            },
            false => f,
        };
        let mut ino = self.node_ino(f.top, &f.stat, parent, name);
        if f.top == LayerRef::Upper
            && let Some(n) = self.nodes.get(ino)
            && self.taken_by_another(&n, f, parent, name)
        {
            // (Checked before the insert too: one of another type would be replaced.)
            ino = self.own_number(ino, f.stat.st_ino, name);
        }
        let fresh = NodeState {
            parent,
            name: name.to_os_string(),
            aliases: Default::default(),
            upper: f.top == LayerRef::Upper,
            lower: if is_dir {
                None
            } else {
                f.lowers.first().copied()
            },
            lowers: if is_dir { f.lowers.clone() } else { Vec::new() },
            opaque: f.opaque,
            redirects: f.redirects(),
            data: f.data.clone().map(Arc::new),
            impure: f.impure,
            unlinked: false,
        };
        let new_node = |ino| {
            let n = Node::new(ino, kind, fresh.clone());
            if f.top == LayerRef::Upper {
                // With the node, before anyone else can find it in the table.
                n.upper_obj
                    .store(f.stat.st_ino, std::sync::atomic::Ordering::Release);
            }
            n
        };
        let (mut node, mut created) = self.nodes.insert_or_get(new_node(ino), refs);
        if !created && f.top == LayerRef::Upper && self.taken_by_another(&node, f, parent, name) {
            // Another lookup put the other object there meanwhile: its references back (as a
            // kernel FORGET gives them: a node whose quota charge is unsettled stays).
            self.forget(ino, refs);
            ino = self.own_number(ino, f.stat.st_ino, name);
            (node, created) = self.nodes.insert_or_get(new_node(ino), refs);
        }
        if f.top == LayerRef::Upper {
            // (An existing node learns it: found in upper now.)
            let _ = node.upper_obj.compare_exchange(
                0,
                f.stat.st_ino,
                std::sync::atomic::Ordering::AcqRel,
                std::sync::atomic::Ordering::Acquire,
            );
        }
        // (The state's lock is let go before names_it_now, which takes it.)
        let unlinked = !created && node.st.lock().unlinked;
        if unlinked && !self.names_it_now(parent, name, &node) {
            // Found just before its removal (the stat raced an unlink or a rename over it):
            // the removed object, as the kernel may still hold it, under the same generation
            // (a new one would make the kernel retire its inode, and every read of a file
            // still open on it would fail with EIO). Its next open goes by name and fails
            // with ESTALE, and the kernel looks the name up again.
            let attr = self.attr_for(&node, &node.st.lock(), &f.stat);
            return (node, attr);
        }
        if !created {
            let mut st = node.st.lock();
            if st.unlinked {
                let gone = node.gone.swap(false, std::sync::atomic::Ordering::AcqRel);
                if gone {
                    // The inode number of a removed object, now another's: a new generation,
                    // so that the kernel does not take the new object for the old one it may
                    // hold. (Not gone: the same object under a hard link not seen before.)
                    self.nodes.renew(&node);
                }
                *st = fresh.clone();
                drop(st);
                node.upper_obj.store(
                    if fresh.upper { f.stat.st_ino } else { 0 },
                    std::sync::atomic::Ordering::Release,
                );
                self.unpin(&node);
                node.reset_dirfds();
                node.invalidate_xattrs();
                if gone {
                    // A new object under the inode number: nothing is accounted for it yet.
                    // (The same object is still counted, as its removed name's link was not
                    // its last: what is known of its allocation stays, and with it the
                    // settling of its cached writes.)
                    *node.io_lock.lock() = None;
                    node.freed
                        .store(false, std::sync::atomic::Ordering::Release);
                }
            } else if is_dir && !self.upper_only_marks.unchanged(f.stamp) {
                // Made upper-only since the lookup read it (or being made so): its state
                // is newer than what was read (checked under the node's lock, which the change
                // takes after it began).
            } else {
                // Refresh from disk: the layers are the truth. Except that what we copied up
                // stays in upper (only its removal, which marks it unlinked, undoes that): a
                // lookup that looked at upper just before a copy-up put it there (or while its
                // commit is pending) must not send the next open to the lower file, nor the
                // next create in a directory to a second copy-up of it (EEXIST).
                st.upper = fresh.upper || st.upper;
                if fresh.lower.is_some() || !fresh.upper {
                    st.lower = fresh.lower;
                }
                st.lowers = fresh.lowers.clone();
                st.opaque = fresh.opaque;
                st.impure = fresh.impure;
                if fresh.data.is_none() {
                    // (Never set again: a lookup that read the metacopy mark just before the
                    // file got its data must not send reads back to the lower file.)
                    st.data = None;
                }
                if st.redirects != fresh.redirects {
                    st.redirects = fresh.redirects.clone();
                    drop(st);
                    // Cached directories of its lower layers may be where it used to be found.
                    node.reset_dirfds();
                    st = node.st.lock();
                }
                let same = st.parent == parent && st.name.as_os_str() == name;
                // A set: 60,000 names of one file are looked up in O(1) each, not a scan of
                // them all (quadratic; review).
                if !same && !st.aliases.contains(&(parent, name.to_os_string())) {
                    // A name new to the node, found before a removal or rename in the
                    // directory that began meanwhile: it may be gone from the object already
                    // (a revalidating LOOKUP runs beside an UNLINK or RENAME of the name). Not
                    // taken on trust: the node would keep a name that is not its own, and
                    // whatever goes by the node's name (getattr, link) would reach nothing or
                    // another file (review: a link made a second name of another file).
                    let settled = self.dir_unchanged(parent, f.dir_stamp);
                    // Checked on disk before it is taken, and taken only if no name of the
                    // node was dropped or moved meanwhile (else checked again): a removal or
                    // rename after the check changes it itself. (Added first and checked
                    // after, it could become the node's name for a moment when the other
                    // names went: a stat of one of them then failed; review. Checked and then
                    // set without the generation, a directory renamed between the two took
                    // its old name back.)
                    let mut ok = settled;
                    for _ in 0..(if settled { 0 } else { 3 }) {
                        let g = node.names_gen.load(std::sync::atomic::Ordering::Acquire);
                        drop(st);
                        let now = self.names_it_now(parent, name, &node);
                        st = node.st.lock();
                        if !now {
                            break;
                        }
                        if node.names_gen.load(std::sync::atomic::Ordering::Acquire) == g {
                            ok = true;
                            break;
                        }
                    }
                    if is_dir {
                        // A directory has one name: it moved.
                        if ok {
                            st.parent = parent;
                            st.name = name.to_os_string();
                        }
                    } else {
                        let primary = st.parent == parent && st.name.as_os_str() == name;
                        if ok && !primary && !st.aliases.contains(&(parent, name.to_os_string())) {
                            Arc::make_mut(&mut st.aliases).insert((parent, name.to_os_string()));
                        }
                    }
                }
            }
        }
        let attr = self.attr_for(&node, &node.st.lock(), &f.stat);
        (node, attr)
    }

    /// Is live node `n`, whose id an upper object `f` found at (`parent`, `name`) computes,
    /// another object's? Only through an inode map entry that is stale or damaged: the number
    /// is another upper object's (a different inode), or an object's known only below, under
    /// other names (a copy-up of it would have gone through us and recorded it). A removed
    /// object's node is not (its number reused: `node_for`).
    fn taken_by_another(&self, n: &Node, f: &Found, parent: u64, name: &OsStr) -> bool {
        let st = n.st.lock();
        if st.unlinked {
            return false;
        }
        match n.upper_obj.load(std::sync::atomic::Ordering::Acquire) {
            0 => {
                let same_name = (st.parent == parent && st.name.as_os_str() == name)
                    || st.aliases.contains(&(parent, name.to_os_string()));
                !st.upper && !same_name
            }
            x => x != f.stat.st_ino,
        }
    }

    /// The number [`Union::own_number`] gives upper inode `real`.
    pub(crate) fn own_number_of(&self, real: u64) -> u64 {
        per_name_ino(u64::MAX, OsStr::new(""), real)
    }

    /// A number of its own for upper object `real` whose number `ino` is another object's
    /// ([`Union::taken_by_another`]): from its upper inode alone, so that it stays the same
    /// under every name of it and across renames.
    pub(crate) fn own_number(&self, ino: u64, real: u64, name: &OsStr) -> u64 {
        let own = self.own_number_of(real);
        static WARNED: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
        if WARNED.fetch_add(1, std::sync::atomic::Ordering::Relaxed) < 20 {
            log::warn!(
                "inode number {ino} is another object's (the inode map's entry for an upper \
                 object is stale: its origin removed from a lower layer and the number reused, \
                 or the map damaged): {name:?} (upper inode {real}) is given {own}"
            );
        }
        own
    }

    /// `name` in `parent` looked up again, until no directory is made upper-only meanwhile;
    /// None if it is gone or another object now (the caller goes on with what it found).
    fn find_again(&self, parent: u64, name: &OsStr, was: &Found) -> Option<Found> {
        let p = self.node(parent).ok()?;
        let f = self
            .upper_only_marks
            .settled(100, || self.find(&p, name))?
            .ok()??;
        // (The same node id across a copy-up: the inode map.)
        (self.node_ino(f.top, &f.stat, parent, name)
            == self.node_ino(was.top, &was.stat, parent, name))
        .then_some(f)
    }

    /// Does (parent, name) name the object of `node`'s id now? Asked of a removed node found
    /// again by a lookup: the number reused by a new object there (yes), or a stat made
    /// before the removal (no: the name holds another object or none).
    fn names_it_now(&self, parent: u64, name: &OsStr, node: &Node) -> bool {
        let Ok(p) = self.node(parent) else {
            return false;
        };
        match self.find(&p, name) {
            Ok(Some(f)) => {
                f.stat.st_mode & libc::S_IFMT == node.kind
                    && (self.node_ino(f.top, &f.stat, parent, name) == node.ino
                        // (A node with a number of its own: by its upper object.)
                        || self.is_nodes_object(node, f.top, &f.stat, &node.state()))
            }
            _ => false,
        }
    }

    /// FUSE lookup: find `name` in `parent`, take one kernel reference on the result.
    pub fn lookup(&self, parent: u64, name: &OsStr) -> Result<Attr> {
        if self.panic_name.as_deref() == Some(name) {
            panic!("testing aid panic_name: a lookup of {name:?}");
        }
        self.lookup_from(parent, name, None)
    }

    /// [`Union::lookup`] starting at layer `from` (see [`Union::find_from`]).
    pub fn lookup_from(&self, parent: u64, name: &OsStr, from: Option<LayerRef>) -> Result<Attr> {
        let p = self.node(parent)?;
        // (A copy-up since the listing is found: upper is always searched, `find_from`.)
        let mut f = self
            .find_from(&p, name, from)?
            .ok_or(Error::new(Errno::ENOENT, "lookup"))?;
        // Found below while a directory was being made upper-only (dir_rename=copy): its
        // lower layers may have been read before they were dropped and its whiteouts after
        // they were removed, so a removed lower file would show again. Looked up again, with
        // a moment for a marking still running to end (a few times at most: they are rare,
        // and one runs only while a directory is renamed).
        let mut tries = 0u32;
        while f.top != LayerRef::Upper && !self.upper_only_marks.unchanged(f.stamp) && tries < 4 {
            if f.stamp.is_none() || tries > 0 {
                std::thread::sleep(std::time::Duration::from_micros(250 << tries));
            }
            tries += 1;
            f = self
                .find_from(&p, name, from)?
                .ok_or(Error::new(Errno::ENOENT, "lookup"))?;
        }
        let (_, attr) = self.node_for(parent, name, &f, 1);
        Ok(attr)
    }

    /// Find the node for `name` in `parent` without taking a kernel reference.
    pub(crate) fn child(&self, parent: &Node, name: &OsStr) -> Result<Option<(Arc<Node>, Attr)>> {
        Ok(self
            .find(parent, name)?
            .map(|f| self.node_for(parent.ino, name, &f, 0)))
    }
}

/// A stable node id for one name of a hard-linked lower file (top bit set: never a real inode
/// number on the filesystems we serve; FNV-1a of parent, name and lower inode).
fn per_name_ino(parent: u64, name: &OsStr, ino: u64) -> u64 {
    use std::os::unix::ffi::OsStrExt;
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    let mut eat = |b: u8| {
        h ^= b as u64;
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    };
    parent.to_le_bytes().into_iter().for_each(&mut eat);
    ino.to_le_bytes().into_iter().for_each(&mut eat);
    name.as_bytes().iter().copied().for_each(&mut eat);
    h | (1 << 63)
}

/// Remove one (parent, name) from a node's names; mark it unlinked when none remain.
/// (`parent`, `name`) no longer names `node`; `gone`: nor anything, the object itself was
/// removed (a directory, a file's last link). The node keeps its FUSE generation: a lookup
/// that raced the removal may still hand the removed object to the kernel, which holds it
/// under that generation. If the inode number comes back as a new object, that gets a new
/// one (`node_for`, `insert_fresh`).
pub(crate) fn name_removed(node: &Node, parent: u64, name: &OsStr, gone: bool) {
    if gone {
        node.gone.store(true, std::sync::atomic::Ordering::Release);
    }
    drop_name(node, parent, name);
}

pub(crate) fn drop_name(node: &Node, parent: u64, name: &OsStr) {
    let mut st = node.st.lock();
    node.names_gen
        .fetch_add(1, std::sync::atomic::Ordering::AcqRel);
    if st.parent == parent && st.name.as_os_str() == name {
        let next = st.aliases.iter().next().cloned();
        if let Some((p, n)) = next {
            Arc::make_mut(&mut st.aliases).remove(&(p, n.clone()));
            st.parent = p;
            st.name = n;
        } else {
            st.unlinked = true;
            drop(st);
            node.reset_dirfds();
        }
    } else {
        let key = (parent, name.to_os_string());
        if st.aliases.contains(&key) {
            Arc::make_mut(&mut st.aliases).remove(&key);
        }
    }
}

/// Rename one (parent, name) of a node to (np, nn).
pub(crate) fn move_name(node: &Node, parent: u64, name: &OsStr, np: u64, nn: &OsStr) {
    let mut st = node.st.lock();
    node.names_gen
        .fetch_add(1, std::sync::atomic::Ordering::AcqRel);
    if st.parent == parent && st.name.as_os_str() == name {
        st.parent = np;
        st.name = OsString::from(nn);
    } else if st.aliases.contains(&(parent, name.to_os_string())) {
        let a = Arc::make_mut(&mut st.aliases);
        a.remove(&(parent, name.to_os_string()));
        a.insert((np, OsString::from(nn)));
    } else {
        st.parent = np;
        st.name = OsString::from(nn);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::union::{Options, ROOT_INO};

    /// A union of two lowers (`d/x` in the bottom one, `d/y` in the top one) and an upper.
    fn fixture() -> (tempfile::TempDir, Union) {
        let tmp = tempfile::tempdir().expect("tempdir");
        let root = tmp.path();
        for d in ["top/d", "bottom/d", "u", "w"] {
            std::fs::create_dir_all(root.join(d)).expect("mkdir");
        }
        std::fs::write(root.join("bottom/d/x"), b"lower").expect("write");
        std::fs::write(root.join("top/d/y"), b"top").expect("write");
        let u = Union::new(&Options {
            lowers: vec![root.join("top"), root.join("bottom")],
            upper: Some(root.join("u")),
            workdir: Some(root.join("w")),
            ..Options::default()
        })
        .expect("union");
        (tmp, u)
    }

    #[test]
    fn a_lookup_from_the_listed_layer_finds_what_a_full_one_finds() {
        let (_tmp, u) = fixture();
        let d = u.lookup(ROOT_INO, OsStr::new("d")).expect("d").ino;
        for (name, layer, size) in [("x", 1, 5), ("y", 0, 3)] {
            let full = u.lookup(d, OsStr::new(name)).expect("lookup");
            let from = u
                .lookup_from(d, OsStr::new(name), Some(LayerRef::Lower(layer)))
                .expect("lookup from");
            assert_eq!((from.ino, from.size), (full.ino, size), "{name}");
        }
    }

    /// A lookup that read a merged directory before it was made upper-only (a rename with
    /// dir_rename=copy copies it up whole; other processes may look things up meanwhile)
    /// must not give its node back the lower layers, whose deleted entries would show again.
    #[test]
    fn a_lookup_from_before_a_directory_became_upper_only_keeps_it_upper_only() {
        let (tmp, u) = fixture();
        let root = u.node(ROOT_INO).expect("root");
        let d = OsStr::new("d");
        let upper_only = |n: &Node| {
            let st = n.state();
            st.opaque && st.lowers.is_empty()
        };
        // A lookup reads d from the disk: merged, not opaque...
        let stale = u.find(&root, d).expect("find").expect("d");
        assert_eq!((stale.opaque, stale.lowers.len()), (false, 2));
        // ...then d is copied up whole and made upper-only, and x removed (no whiteout now).
        let (node, _) = u.child(&root, d).expect("child").expect("d");
        u.copy_up_tree(&node).expect("copy up tree");
        assert!(upper_only(&node));
        std::fs::remove_file(tmp.path().join("u/d/x")).expect("rm x");
        // The lookup goes on: the node keeps what it is.
        let (n, _) = u.node_for(ROOT_INO, d, &stale, 0);
        assert!(
            upper_only(&n),
            "refreshed from a stale lookup: {:?}",
            n.state()
        );
        // Made anew from it (the node was forgotten meanwhile): from a new lookup.
        u.nodes.remove_unreferenced(n.ino);
        let (n, _) = u.node_for(ROOT_INO, d, &stale, 1);
        assert!(upper_only(&n), "made from a stale lookup: {:?}", n.state());
        assert!(u.find(&n, OsStr::new("x")).expect("find x").is_none());
    }

    /// A lookup that read a lower directory before another request copied it up (a create
    /// in it, which takes no lock of its parent) must not take its node out of upper: the
    /// next copy-up of the node would make it again there and fail with EEXIST.
    #[test]
    fn a_lookup_from_before_a_directory_copy_up_keeps_it_upper() {
        let (tmp, u) = fixture();
        let root = u.node(ROOT_INO).expect("root");
        let d = OsStr::new("d");
        // A lookup reads d from the disk: lower only...
        let stale = u.find(&root, d).expect("find").expect("d");
        assert_ne!(stale.top, LayerRef::Upper);
        // ...then d is copied up.
        let (node, _) = u.child(&root, d).expect("child").expect("d");
        u.copy_up(&node).expect("copy up");
        assert!(tmp.path().join("u/d").is_dir());
        // The lookup goes on: the node stays in upper, and a create in d works.
        let (n, _) = u.node_for(ROOT_INO, d, &stale, 0);
        assert!(
            n.state().upper,
            "refreshed from a stale lookup: {:?}",
            n.state()
        );
        u.copy_up(&n).expect("copy up again");
    }

    #[test]
    fn a_file_copied_up_after_its_listing_is_found_in_upper() {
        let (tmp, u) = fixture();
        let d = u.lookup(ROOT_INO, OsStr::new("d")).expect("d").ino;
        let x = u.lookup(d, OsStr::new("x")).expect("x");
        // Copied up (as an open for writing does, which takes no lock of the directory)
        // and written to, after a listing named the bottom layer as x's.
        u.copy_up(&u.node(x.ino).expect("node")).expect("copy up");
        u.commits.wait_node(x.ino);
        std::fs::write(tmp.path().join("u/d/x"), b"longer now").expect("write upper");
        let a = u
            .lookup_from(d, OsStr::new("x"), Some(LayerRef::Lower(1)))
            .expect("lookup from");
        assert_eq!(
            (a.ino, a.size),
            (x.ino, 10),
            "the lower file's attributes came back"
        );
        assert!(u.node(x.ino).expect("node").st.lock().upper);
        // Its node forgotten by the kernel meanwhile: upper is still searched.
        u.forget(x.ino, 2);
        assert!(u.node(x.ino).is_err(), "node still there");
        let a = u
            .lookup_from(d, OsStr::new("x"), Some(LayerRef::Lower(1)))
            .expect("lookup from");
        assert_eq!(
            a.size, 10,
            "a forgotten copied-up file came back as the lower one"
        );
        assert!(u.node(a.ino).expect("node").st.lock().upper);
        // And a directory copied up stays in upper.
        let dn = u.node(d).expect("d node");
        assert!(dn.st.lock().upper, "d was copied up with x");
        u.lookup_from(ROOT_INO, OsStr::new("d"), Some(LayerRef::Lower(0)))
            .expect("lookup d from");
        assert!(
            dn.st.lock().upper,
            "a lookup from a lower layer took d out of upper"
        );
    }
}
