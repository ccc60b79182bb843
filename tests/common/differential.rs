//! Differential runs: the same layers and operations against kernel overlayfs and unionfs-rs.

use super::*;

/// What an operation is expected to return on the reference (kernel overlayfs). Checked so that a
/// scenario really exercises what it claims to (not, say, both sides failing with ENOENT).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Expect {
    Any,
    Ok,
    Err(i32),
    /// Success carrying exactly these bytes (read-like ops).
    Data(Vec<u8>),
    /// Do not compare this step's outcome between the implementations (the step is there for
    /// its effect on the trees, which are still compared).
    Unchecked,
}

#[derive(Clone, Debug)]
pub struct Step {
    pub op: Op,
    pub expect: Expect,
}

/// A check on a pair of paths: (kernel's, unionfs-rs's).
type PairCheck = Box<dyn Fn(&Path, &Path) + Send + 'static>;

/// The implementation under test in a differential run: unionfs-rs, or, when the environment
/// variable `UNIONFS_DIFF_SELFTEST=1` is set, a second kernel overlayfs mount (to check that the
/// harness itself is deterministic and the scenarios' expectations hold on the reference).
pub enum AnyMount {
    Fuse(Mount),
    Kernel(OverlayMount),
}

impl AnyMount {
    pub fn selftest() -> bool {
        std::env::var("UNIONFS_DIFF_SELFTEST").is_ok_and(|v| v == "1")
    }
    pub fn start_candidate(dirs: &Dirs, opts: &MountOpts) -> Result<AnyMount, String> {
        if Self::selftest() {
            OverlayMount::start(dirs, opts).map(AnyMount::Kernel)
        } else {
            Mount::start(dirs, opts).map(AnyMount::Fuse)
        }
    }
    pub fn merged(&self) -> &Path {
        match self {
            AnyMount::Fuse(m) => &m.merged,
            AnyMount::Kernel(m) => &m.merged,
        }
    }
    pub fn unmount(self) -> Result<(), String> {
        match self {
            AnyMount::Fuse(m) => m.unmount(),
            AnyMount::Kernel(m) => m.unmount(),
        }
    }
}

/// Result of one differential run, for extra assertions.
pub struct DiffResult {
    pub kernel_dirs: Dirs,
    pub union_dirs: Dirs,
    pub kernel_outcomes: Vec<Outcome>,
    pub union_outcomes: Vec<Outcome>,
}

/// Builder for a differential scenario.
pub struct Differential {
    pub name: String,
    pub lowers: Vec<Vec<Entry>>,
    pub upper: Vec<Entry>,
    pub steps: Vec<Step>,
    pub ns: OvlNs,
    pub timeout_secs: u64,
    /// Extra checks on (kernel upper, unionfs upper) after both are unmounted.
    pub upper_checks: Vec<PairCheck>,
    /// Extra checks on (kernel merged, unionfs merged) while mounted.
    pub merged_checks: Vec<PairCheck>,
    /// Also compare the on-disk upper forms.
    pub compare_upper: bool,
    /// Operations applied with kernel overlayfs to both dir sets before the comparison (to test
    /// unionfs-rs continuing on an upper layer written by the kernel).
    pub kernel_prepare: Vec<Op>,
    /// Kernel overlayfs options for the `kernel_prepare` mounts only (e.g. `redirect_dir=on`).
    pub kernel_prepare_opts: String,
    /// Kernel overlayfs options for the compared mount (e.g. `metacopy=on`).
    pub kernel_opts: String,
    /// The last this many lower layers are data-only (`lowerdir=…::D`).
    pub data_only: usize,
    /// Mount both without an upper layer.
    pub readonly: bool,
    /// Extra arguments for the unionfs-rs mount (not the kernel's).
    pub candidate_args: Vec<String>,
}

impl Differential {
    pub fn new(name: &str) -> Self {
        Differential {
            name: name.into(),
            lowers: Vec::new(),
            upper: Vec::new(),
            steps: Vec::new(),
            ns: OvlNs::Trusted,
            timeout_secs: 120,
            upper_checks: Vec::new(),
            merged_checks: Vec::new(),
            compare_upper: true,
            kernel_prepare: Vec::new(),
            kernel_prepare_opts: String::new(),
            kernel_opts: String::new(),
            data_only: 0,
            readonly: false,
            candidate_args: Vec::new(),
        }
    }
    /// Mount unionfs-rs with these extra arguments.
    pub fn candidate_args(mut self, args: &[&str]) -> Self {
        self.candidate_args = args.iter().map(|s| s.to_string()).collect();
        self
    }
    /// Before the comparison, apply `ops` through kernel overlayfs to both dir sets (mount,
    /// apply, unmount), so the compared steps start from a kernel-written upper layer.
    pub fn kernel_prepare(mut self, ops: Vec<Op>) -> Self {
        self.kernel_prepare = ops;
        self
    }
    /// Mount kernel overlayfs for `kernel_prepare` with these options added.
    pub fn kernel_prepare_opts(mut self, opts: &str) -> Self {
        self.kernel_prepare_opts = opts.into();
        self
    }
    /// Mount both as read-only unions (no upper layer; nothing to compare there).
    pub fn readonly(mut self) -> Self {
        self.readonly = true;
        self.compare_upper = false;
        self
    }
    /// The last `n` lower layers added are data-only layers.
    pub fn data_only(mut self, n: usize) -> Self {
        self.data_only = n;
        self
    }
    /// Mount kernel overlayfs for the comparison with these options added.
    pub fn kernel_opts(mut self, opts: &str) -> Self {
        self.kernel_opts = opts.into();
        self
    }
    /// Add a lower layer below the ones added so far.
    pub fn lower(mut self, spec: Vec<Entry>) -> Self {
        self.lowers.push(spec);
        self
    }
    pub fn upper(mut self, spec: Vec<Entry>) -> Self {
        self.upper = spec;
        self
    }
    pub fn op(mut self, op: Op) -> Self {
        self.steps.push(Step {
            op,
            expect: Expect::Any,
        });
        self
    }
    pub fn ok(mut self, op: Op) -> Self {
        self.steps.push(Step {
            op,
            expect: Expect::Ok,
        });
        self
    }
    pub fn err(mut self, op: Op, errno: i32) -> Self {
        self.steps.push(Step {
            op,
            expect: Expect::Err(errno),
        });
        self
    }
    pub fn unchecked(mut self, op: Op) -> Self {
        self.steps.push(Step {
            op,
            expect: Expect::Unchecked,
        });
        self
    }
    pub fn no_upper_compare(mut self) -> Self {
        self.compare_upper = false;
        self
    }
    pub fn data(mut self, op: Op, data: &str) -> Self {
        self.steps.push(Step {
            op,
            expect: Expect::Data(data.as_bytes().to_vec()),
        });
        self
    }
    /// Extra check on (kernel merged, unionfs merged) while both are mounted, after the steps.
    pub fn check_merged(mut self, f: impl Fn(&Path, &Path) + Send + 'static) -> Self {
        self.merged_checks.push(Box::new(f));
        self
    }
    pub fn userxattr(mut self) -> Self {
        self.ns = OvlNs::User;
        self
    }
    pub fn check_upper(mut self, f: impl Fn(&Path, &Path) + Send + 'static) -> Self {
        self.upper_checks.push(Box::new(f));
        self
    }
    pub fn timeout(mut self, secs: u64) -> Self {
        self.timeout_secs = secs;
        self
    }

    /// Run against both implementations and panic with every difference found.
    pub fn run(self) -> DiffResult {
        let secs = self.timeout_secs;
        with_timeout(secs, move || self.run_inner())
    }

    fn run_inner(self) -> DiffResult {
        let mut kd = Dirs::with_ns(&self.lowers, &self.upper, self.ns);
        let mut ud = Dirs::with_ns(&self.lowers, &self.upper, self.ns);
        kd.data_only = self.data_only;
        ud.data_only = self.data_only;
        let opts = MountOpts {
            userxattr: self.ns == OvlNs::User,
            readonly: self.readonly,
            ..Default::default()
        };
        if !self.kernel_prepare.is_empty() {
            let mut first: Option<Vec<Outcome>> = None;
            let popts = MountOpts {
                kernel_extra: self.kernel_prepare_opts.clone(),
                ..opts.clone()
            };
            for d in [&kd, &ud] {
                let m = OverlayMount::start(d, &popts).unwrap_or_else(|e| panic!("{e}"));
                let outs: Vec<Outcome> = self
                    .kernel_prepare
                    .iter()
                    .map(|op| apply(&m.merged, op))
                    .collect();
                m.unmount().unwrap_or_else(|e| panic!("kernel umount: {e}"));
                if let Some(f) = &first {
                    assert_eq!(f, &outs, "kernel preparation is not deterministic");
                }
                first = Some(outs);
            }
        }
        let kopts = MountOpts {
            kernel_extra: self.kernel_opts.clone(),
            ..opts.clone()
        };
        let km = OverlayMount::start(&kd, &kopts).unwrap_or_else(|e| panic!("{e}"));
        let uopts = MountOpts {
            extra: self.candidate_args.clone(),
            ..opts.clone()
        };
        let um = AnyMount::start_candidate(&ud, &uopts).unwrap_or_else(|e| panic!("{e}"));

        let mut problems = Vec::new();
        let mut log = Vec::new();
        let mut kouts = Vec::new();
        let mut uouts = Vec::new();
        for (i, step) in self.steps.iter().enumerate() {
            let k = apply(&km.merged, &step.op);
            let u = apply(um.merged(), &step.op);
            if let (Op::ReadDir { path }, AnyMount::Fuse(_)) = (&step.op, &um) {
                let ph = phantoms(um.merged(), path);
                if !ph.is_empty() {
                    problems.push(format!(
                        "#{i}: unionfs-rs readdir of {path:?} lists names lookup cannot find: {ph:?}"
                    ));
                }
            }
            let line = format!(
                "#{i} {:?}: kernel={} unionfs={}",
                step.op,
                show_outcome(&k),
                show_outcome(&u)
            );
            match &step.expect {
                Expect::Any | Expect::Unchecked => {}
                Expect::Data(d) => {
                    if k.as_ref() != Ok(d) {
                        problems.push(format!(
                            "scenario bug: kernel was expected to return {:?} at {line}",
                            String::from_utf8_lossy(d)
                        ));
                    }
                }
                Expect::Ok => {
                    if k.is_err() {
                        problems.push(format!(
                            "scenario bug: kernel was expected to succeed at {line}"
                        ));
                    }
                }
                Expect::Err(e) => {
                    if k != Err(*e) {
                        problems.push(format!(
                            "scenario bug: kernel was expected to fail with {} at {line}",
                            errno_name(*e)
                        ));
                    }
                }
            }
            if k != u && step.expect != Expect::Unchecked {
                problems.push(format!("outcome differs: {line}"));
            }
            log.push(line);
            kouts.push(k);
            uouts.push(u);
        }

        for c in &self.merged_checks {
            c(&km.merged, um.merged());
        }
        let ks = snapshot(&km.merged, &SnapOpts::merged().relaxed_from_env());
        let us = snapshot(um.merged(), &SnapOpts::merged().relaxed_from_env());
        if matches!(um, AnyMount::Fuse(_)) && !us.phantoms.is_empty() {
            problems.push(format!(
                "unionfs-rs readdir lists names that lookup cannot find: {:?}",
                us.phantoms
            ));
        }
        let leaked = private_xattrs(&us, self.ns);
        if !leaked.is_empty() {
            problems.push(format!(
                "unionfs-rs merged view shows overlay-private xattrs: {leaked:?}"
            ));
        }
        let kleak = private_xattrs(&ks, self.ns);
        assert!(
            kleak.is_empty(),
            "harness assumption broken: kernel shows {kleak:?}"
        );
        let d = diff_snapshots(
            "kernel",
            &strip_private(ks, self.ns),
            "unionfs",
            &strip_private(us, self.ns),
        );
        if !d.is_empty() {
            problems.push(format!("merged views differ:\n    {}", d.join("\n    ")));
        }

        km.unmount()
            .unwrap_or_else(|e| panic!("kernel umount: {e}"));
        if let Err(e) = um.unmount() {
            problems.push(format!("unmount of the candidate: {e}"));
        }

        if self.compare_upper {
            let ku = snapshot(&kd.upper, &SnapOpts::upper().relaxed_from_env());
            let uu = snapshot(&ud.upper, &SnapOpts::upper().relaxed_from_env());
            let d = diff_snapshots("kernel", &ku, "unionfs", &uu);
            if !d.is_empty() {
                problems.push(format!(
                    "upper on-disk forms differ:\n    {}",
                    d.join("\n    ")
                ));
            }
        }
        if problems.is_empty() {
            for c in &self.upper_checks {
                c(&kd.upper, &ud.upper);
            }
        }
        assert!(
            problems.is_empty(),
            "differential scenario `{}` failed:\n  {}\noperations:\n  {}",
            self.name,
            problems.join("\n  "),
            log.join("\n  ")
        );
        DiffResult {
            kernel_dirs: kd,
            union_dirs: ud,
            kernel_outcomes: kouts,
            union_outcomes: uouts,
        }
    }
}
