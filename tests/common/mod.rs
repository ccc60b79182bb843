//! Shared test harness: mount guards for unionfs-rs and kernel overlayfs, a layer builder, tree
//! snapshots, filesystem operations that report errnos, and a per-test timeout.
//!
//! Every integration test file does `mod common;` and uses a subset of this module, hence the
//! `dead_code` allowance.
//!
//! Layout of one test's directories (see [`Dirs`]): a tempdir (mode 0755 so other uids can reach
//! the mount) holding `lower0` (top-most lower), `lower1`, ..., `upper`, `work`, `merged`, and the
//! daemon's log files. Upper and work are siblings, so they are always on the same filesystem.
//!
//! Hung daemons: every test that touches a mount runs its body through [`with_timeout`]. Mount
//! guards register themselves (keyed by the thread that created them); when a body exceeds its
//! time, the guards created by that body are aborted (daemon SIGKILLed, FUSE connection aborted,
//! lazy unmount), so blocked syscalls return and the test fails instead of hanging CI.
//!
//! Submodules: `timeout` (with_timeout, live-mount registry), `procs` (commands with timeouts,
//! mountinfo, daemon pids), `dirs` (Dirs), `mount` (Mount, OverlayMount), `layer` (Entry,
//! build_layer), `snapshot` (snapshot, diff_snapshots), `ops` (Op, apply), `differential`
//! (Differential). Everything is re-exported here; the std imports below are shared with the
//! submodules through their `use super::*`.
#![allow(dead_code)]

use std::collections::{BTreeMap, HashMap};
use std::ffi::CString;
use std::fmt;
use std::fs;
use std::hash::{DefaultHasher, Hasher};
use std::io::{self, Read};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{FileTypeExt, MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::process::{Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, mpsc};
use std::thread::{self, ThreadId};
use std::time::{Duration, Instant};

/// Path of the binary under test (built by cargo for integration tests).
pub const BIN: &str = env!("CARGO_BIN_EXE_unionfs-rs");

/// The binary the tests run: [`BIN`], unless `UNIONFS_TEST_BIN` names another executable with
/// the same CLI (used to check the harness itself against a wrapper around another
/// implementation).
pub fn bin() -> PathBuf {
    std::env::var_os("UNIONFS_TEST_BIN")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(BIN))
}

/// How long the `unionfs-rs mount` command itself may take before it is killed.
pub const MOUNT_CMD_TIMEOUT: Duration = Duration::from_secs(20);

/// How long a daemon may take to exit after its filesystem was unmounted.
pub const DAEMON_EXIT_TIMEOUT: Duration = Duration::from_secs(10);

/// Timestamps given to every entry of a built layer start here (2001-09-09). Anything older than
/// [`OLD_TIME_CUTOFF`] is "a time that came from a layer description"; anything newer was set by
/// the filesystem while the test ran. Snapshots keep the former exactly and collapse the latter
/// to `Recent`, so "copy-up preserved the lower mtime" and "this write updated the mtime" are both
/// checkable across two runs that happen at different wall-clock times.
pub const BASE_TIME: i64 = 1_000_000_000;
pub const OLD_TIME_CUTOFF: i64 = 1_500_000_000;

mod differential;
mod dirs;
mod layer;
mod loopfs;
mod mount;
mod ops;
mod procs;
mod snapshot;
mod timeout;

#[allow(unused_imports)]
pub use differential::*;
#[allow(unused_imports)]
pub use dirs::*;
#[allow(unused_imports)]
pub use layer::*;
#[allow(unused_imports)]
pub use loopfs::*;
#[allow(unused_imports)]
pub use mount::*;
#[allow(unused_imports)]
pub use ops::*;
#[allow(unused_imports)]
pub use procs::*;
#[allow(unused_imports)]
pub use snapshot::*;
#[allow(unused_imports)]
pub use timeout::*;
