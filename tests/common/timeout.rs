//! Per-test timeout and the registry of live mounts it aborts.

use super::*;

#[derive(Clone, Debug)]
pub(super) enum LiveKind {
    Fuse { pid: Option<i32> },
    Kernel,
}

#[derive(Clone, Debug)]
pub(super) struct Live {
    id: usize,
    owner: ThreadId,
    merged: PathBuf,
    kind: LiveKind,
}

pub(super) static LIVE: Mutex<Vec<Live>> = Mutex::new(Vec::new());
pub(super) static NEXT_ID: AtomicUsize = AtomicUsize::new(1);

pub(super) fn register(merged: &Path, kind: LiveKind) -> usize {
    let id = NEXT_ID.fetch_add(1, Ordering::SeqCst);
    LIVE.lock().unwrap_or_else(|e| e.into_inner()).push(Live {
        id,
        owner: thread::current().id(),
        merged: merged.to_path_buf(),
        kind,
    });
    id
}

pub(super) fn unregister(id: usize) {
    LIVE.lock()
        .unwrap_or_else(|e| e.into_inner())
        .retain(|l| l.id != id);
}

/// Forcefully tear down every mount created by thread `owner` (used when its test timed out).
pub(super) fn abort_mounts_of(owner: ThreadId) {
    let victims: Vec<Live> = LIVE
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .iter()
        .filter(|l| l.owner == owner)
        .cloned()
        .collect();
    for l in victims {
        eprintln!("timeout: aborting mount {}", l.merged.display());
        if let LiveKind::Fuse { pid } = l.kind {
            if let Some(dev) = mount_device(&l.merged) {
                let abort = format!("/sys/fs/fuse/connections/{}/abort", dev.1);
                let _ = fs::write(abort, "1");
            }
            if let Some(pid) = pid {
                unsafe {
                    libc::kill(pid, libc::SIGKILL);
                }
            }
        }
        let _ = run_with_timeout(
            Command::new("umount").arg("-l").arg(&l.merged),
            Duration::from_secs(10),
        );
    }
}

/// Run `f` on its own thread; panic if it does not finish within `secs` seconds.
///
/// Panics inside `f` are propagated unchanged. On timeout, mounts created by `f`'s thread are
/// aborted first (see module docs), then this function panics.
pub fn with_timeout<T, F>(secs: u64, f: F) -> T
where
    T: Send + 'static,
    F: FnOnce() -> T + Send + 'static,
{
    let (tx, rx) = mpsc::channel();
    let name = thread::current()
        .name()
        .map(|n| format!("{n}-body"))
        .unwrap_or_else(|| "test-body".into());
    let handle = thread::Builder::new()
        .name(name)
        .spawn(move || {
            let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(f));
            let _ = tx.send(r);
        })
        .expect("spawn test body thread");
    let owner = handle.thread().id();
    match rx.recv_timeout(Duration::from_secs(secs)) {
        Ok(Ok(v)) => {
            let _ = handle.join();
            v
        }
        Ok(Err(panic)) => {
            let _ = handle.join();
            std::panic::resume_unwind(panic)
        }
        Err(_) => {
            abort_mounts_of(owner);
            // Give the body a chance to unwind (its guards clean up after themselves).
            let _ = rx.recv_timeout(Duration::from_secs(secs.min(10)));
            panic!("test body exceeded its {secs} s timeout (mounts were aborted)");
        }
    }
}
