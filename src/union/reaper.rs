//! Deferred release of removed files, as XFS's background inode inactivation does it.
//!
//! Unlinking a file's last name makes the upper filesystem free its blocks and inode at once,
//! in the unlinking thread, unless something still holds the inode: on ext4 that is a
//! truncate of every extent and, on a filesystem mounted `discard` without a journal (this
//! project's test machines), a synchronous discard per file: most of an UNLINK's time
//! (`rm -rf` of 10k small files: 84 µs per UNLINK, 25 µs when the release is deferred). So
//! before the last name of a file with blocks goes, `remove_entry` opens the file `O_PATH`;
//! once the name is gone and the reply can go, the descriptor is handed here and a background
//! thread closes it, which is when the filesystem frees the file.
//!
//! Bounded: at most [`MAX_FILES`] descriptors and [`MAX_BYTES`] of blocks wait; beyond that
//! the caller closes its descriptor itself (the old, synchronous cost), as it does when upper's
//! filesystem has less than [`MIN_FREE`] free (near a full disk, space comes back at once). Quota accounting does
//! not wait for the release (the union accounts the unlink at once). `statfs` and a clean
//! shutdown wait until everything queued is released ([`Reaper::flush`]), so `df` never shows
//! space that is already free in the merged view.

use std::collections::VecDeque;
use std::os::fd::OwnedFd;

use parking_lot::{Condvar, Mutex};

/// Descriptors waiting at most (each counts against the daemon's open-file limit).
pub const MAX_FILES: usize = 1024;
/// Bytes of blocks waiting at most: how far the upper filesystem's free space may lag.
pub const MAX_BYTES: u64 = 64 << 20;
/// Releases are deferred only while upper's filesystem has this much free: a write right after
/// a removal must never fail for space the reaper has not given back yet.
pub const MIN_FREE: u64 = 16 * MAX_BYTES;

#[derive(Default)]
struct Queue {
    files: VecDeque<(OwnedFd, u64)>,
    bytes: u64,
    /// A release is in progress (popped, not yet closed).
    busy: bool,
    /// Files queued and files released since the start (releases go in queue order), so a
    /// flush waits for what was queued before it, not for removals that keep coming.
    queued: u64,
    done: u64,
    thread: bool,
    stopped: bool,
}

#[derive(Default)]
pub struct Reaper {
    /// Testing aid: each release waits this long first.
    delay: std::time::Duration,
    /// Descriptors waiting at most: [`MAX_FILES`], or less under a low descriptor limit.
    max_files: usize,
    q: Mutex<Queue>,
    /// Work arrived (the thread waits on it) or the queue ran empty (flushers wait on it).
    cv: Condvar,
    /// Files released in the background since the mount.
    pub released: std::sync::atomic::AtomicU64,
    /// Files released by the unlinking request itself because the bounds were reached.
    pub overflowed: std::sync::atomic::AtomicU64,
}

impl Reaper {
    /// A reaper holding at most `max_files` descriptors (and [`MAX_FILES`]).
    pub fn new(delay: std::time::Duration, max_files: usize) -> Reaper {
        Reaper {
            delay,
            max_files: max_files.min(MAX_FILES),
            ..Reaper::default()
        }
    }

    /// Hand over `fd`, the last hold on a removed file with `bytes` of blocks, to be closed in
    /// the background. Gives it back when the bounds are reached or no thread can run (the
    /// caller then drops it, releasing the file itself).
    pub fn defer(self: &std::sync::Arc<Self>, fd: OwnedFd, bytes: u64) -> Option<OwnedFd> {
        let mut q = self.q.lock();
        if q.stopped || q.files.len() >= self.max_files || q.bytes + bytes > MAX_BYTES {
            self.overflowed
                .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            return Some(fd);
        }
        if !q.thread {
            let me = std::sync::Arc::downgrade(self);
            let spawned = std::thread::Builder::new()
                .name("reaper".into())
                .spawn(move || run(me));
            if spawned.is_err() {
                return Some(fd);
            }
            q.thread = true;
        }
        q.files.push_back((fd, bytes));
        q.bytes += bytes;
        q.queued += 1;
        self.cv.notify_all();
        None
    }

    /// Wait until every file handed over so far is released.
    pub fn flush(&self) {
        let mut q = self.q.lock();
        let upto = q.queued;
        while q.done < upto {
            self.cv.wait(&mut q);
        }
    }

    /// Take no more (later removals release their files themselves), release everything
    /// queued, and let the thread end (shutdown).
    pub fn stop(&self) {
        self.q.lock().stopped = true;
        self.cv.notify_all();
        self.flush();
    }

    /// Files and bytes waiting now.
    pub fn pending(&self) -> (usize, u64) {
        let q = self.q.lock();
        (q.files.len() + usize::from(q.busy), q.bytes)
    }
}

impl std::fmt::Debug for Reaper {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let (n, bytes) = self.pending();
        write!(f, "Reaper {{ pending: {n} files, {bytes} bytes }}")
    }
}

fn run(me: std::sync::Weak<Reaper>) {
    loop {
        let Some(r) = me.upgrade() else { return };
        let mut q = r.q.lock();
        while q.files.is_empty() && !q.stopped {
            // Wake now and then to notice the union is gone.
            if r.cv
                .wait_for(&mut q, std::time::Duration::from_secs(5))
                .timed_out()
                && q.files.is_empty()
            {
                break;
            }
        }
        let Some((fd, bytes)) = q.files.pop_front() else {
            let stop = q.stopped;
            if stop {
                q.thread = false;
            }
            drop(q);
            drop(r);
            if stop {
                return;
            }
            continue;
        };
        q.busy = true;
        drop(q);
        if !r.delay.is_zero() {
            std::thread::sleep(r.delay);
        }
        // The filesystem frees the file here.
        drop(fd);
        r.released
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let mut q = r.q.lock();
        q.busy = false;
        q.bytes -= bytes;
        q.done += 1;
        // Flushers wait for their own point in the queue.
        r.cv.notify_all();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::fd::AsRawFd;
    use std::sync::Arc;

    fn fd_of(f: &std::fs::File) -> OwnedFd {
        nix::unistd::dup(f).unwrap()
    }

    #[test]
    fn closes_in_the_background_and_flush_waits() {
        let dir = tempfile_dir();
        let path = dir.join("f");
        std::fs::write(&path, vec![7u8; 8192]).unwrap();
        let f = std::fs::File::open(&path).unwrap();
        let r = Arc::new(Reaper::new(std::time::Duration::ZERO, MAX_FILES));
        let fd = fd_of(&f);
        let raw = fd.as_raw_fd();
        drop(f);
        std::fs::remove_file(&path).unwrap();
        assert!(r.defer(fd, 8192).is_none());
        r.flush();
        assert_eq!(r.pending(), (0, 0));
        assert_eq!(r.released.load(std::sync::atomic::Ordering::Relaxed), 1);
        // The descriptor is closed: its number is free or names something else.
        let still = std::fs::read_link(format!("/proc/self/fd/{raw}"))
            .is_ok_and(|p| p.to_string_lossy().ends_with("/f (deleted)"));
        assert!(!still, "the removed file is still held");
        r.stop();
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn over_the_bounds_the_caller_keeps_its_descriptor() {
        let dir = tempfile_dir();
        let f = std::fs::File::create(dir.join("g")).unwrap();
        let r = Arc::new(Reaper::new(std::time::Duration::ZERO, MAX_FILES));
        assert!(r.defer(fd_of(&f), MAX_BYTES + 1).is_some());
        r.stop();
        assert!(
            r.defer(fd_of(&f), 1).is_some(),
            "stopped: nothing is queued"
        );
        let _ = std::fs::remove_dir_all(&dir);
    }

    fn tempfile_dir() -> std::path::PathBuf {
        let d = std::env::temp_dir().join(format!(
            "reaper-test-{}-{:?}",
            std::process::id(),
            std::thread::current().id()
        ));
        std::fs::create_dir_all(&d).unwrap();
        d
    }
}
