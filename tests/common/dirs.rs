//! The directories of one test: lowers, upper, work, merged under one tempdir.

use super::*;

/// Which xattr namespace holds overlay's private attributes.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum OvlNs {
    #[default]
    Trusted,
    /// `userxattr` mode: `user.overlay.*`.
    User,
}

impl OvlNs {
    pub fn prefix(self) -> &'static str {
        match self {
            OvlNs::Trusted => "trusted.overlay.",
            OvlNs::User => "user.overlay.",
        }
    }
    pub fn opaque(self) -> String {
        format!("{}opaque", self.prefix())
    }
}

/// lowers / upper / work / merged under one tempdir. Cloning shares the tempdir, which is removed
/// when the last clone (and the last mount guard using it) is gone.
#[derive(Clone)]
pub struct Dirs {
    pub root: PathBuf,
    pub lowers: Vec<PathBuf>,
    pub upper: PathBuf,
    pub work: PathBuf,
    pub merged: PathBuf,
    pub ns: OvlNs,
    /// The last this many of `lowers` are data-only layers (`lowerdir=…::D1::D2`).
    pub data_only: usize,
    _tmp: Arc<tempfile::TempDir>,
}

impl fmt::Debug for Dirs {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Dirs").field("root", &self.root).finish()
    }
}

/// A tempdir under /var/tmp (a real disk filesystem, like /tmp here; never tmpfs if avoidable, so
/// upper/work behave like a container host's), mode 0755 so other uids can traverse it.
pub fn test_tempdir() -> tempfile::TempDir {
    let base = if Path::new("/var/tmp").is_dir() {
        "/var/tmp"
    } else {
        "/tmp"
    };
    let t = tempfile::Builder::new()
        .prefix("unionfs-test-")
        .tempdir_in(base)
        .expect("create tempdir");
    chmod(t.path(), 0o755).expect("chmod tempdir");
    t
}

impl Dirs {
    /// Build `lowers` (index 0 = top-most) and `upper` from their descriptions.
    pub fn new(lowers: &[Vec<Entry>], upper: &[Entry]) -> Dirs {
        Self::with_ns(lowers, upper, OvlNs::Trusted)
    }

    pub fn with_ns(lowers: &[Vec<Entry>], upper: &[Entry], ns: OvlNs) -> Dirs {
        set_test_umask();
        let tmp = test_tempdir();
        let root = tmp.path().to_path_buf();
        let mut lower_paths = Vec::new();
        for (i, spec) in lowers.iter().enumerate() {
            let p = root.join(format!("lower{i}"));
            fs::create_dir(&p).unwrap();
            chmod(&p, 0o755).unwrap();
            build_layer(&p, spec, ns).unwrap_or_else(|e| panic!("building lower{i}: {e}"));
            lower_paths.push(p);
        }
        let upper_p = root.join("upper");
        let work = root.join("work");
        let merged = root.join("merged");
        for p in [&upper_p, &work, &merged] {
            fs::create_dir(p).unwrap();
            chmod(p, 0o755).unwrap();
        }
        build_layer(&upper_p, upper, ns).unwrap_or_else(|e| panic!("building upper: {e}"));
        Dirs {
            root,
            lowers: lower_paths,
            upper: upper_p,
            work,
            merged,
            ns,
            data_only: 0,
            _tmp: Arc::new(tmp),
        }
    }

    /// `L0:L1:...` as given to `mount` and kernel `lowerdir=`.
    pub fn lowerdir_arg(&self) -> String {
        let regular = self.lowers.len() - self.data_only;
        let s = |p: &PathBuf| p.to_str().expect("utf-8 path").to_string();
        let mut arg = self.lowers[..regular]
            .iter()
            .map(s)
            .collect::<Vec<_>>()
            .join(":");
        for d in &self.lowers[regular..] {
            arg += "::";
            arg += &s(d);
        }
        arg
    }

    /// Empty the work dir (e.g. before handing the same dirs to another implementation).
    pub fn clear_work(&self) {
        for e in fs::read_dir(&self.work).unwrap().flatten() {
            let p = e.path();
            if e.file_type().unwrap().is_dir() {
                fs::remove_dir_all(&p).unwrap();
            } else {
                fs::remove_file(&p).unwrap();
            }
        }
    }
}

pub fn set_test_umask() {
    unsafe {
        libc::umask(0o022);
    }
}
