//! The hand-over's watchdog (the hand-over itself: `ring.rs`'s module notes). A ring thread
//! commits each answer as a SCHED_IDLE thread and takes SCHED_OTHER back right after; the
//! caller its answer wakes usually preempts it in between, which is the point. But while other
//! SCHED_OTHER work keeps that CPU busy, an idle-policy thread gets the CPU for one slice about
//! every second (measured on this kernel: gaps of 1.2–1.4 s beside one busy loop), and every
//! request the kernel hands to its entry meanwhile waits that long (found by a CI run: a
//! thread's `read_dir` stalled for the 2 s of a race test while another thread's requests
//! went on).
//!
//! So a watchdog thread looks at the ring threads every [`TICK`] while they serve: a thread
//! found in the same idle episode at two ticks in a row is put back to SCHED_OTHER from
//! outside (which only ends the episode early: the thread itself goes on as if it had done
//! it). A request then waits at most about two ticks more than its CPU's fair share gives it.
//! With nothing served for a tick the watchdog sleeps until the next episode begins.

use std::sync::Arc;
use std::sync::OnceLock;
use std::sync::atomic::{AtomicBool, AtomicI32, AtomicU64, AtomicUsize, Ordering};
use std::time::Duration;

use crate::union::Union;

/// How often the watchdog looks while the ring serves.
pub(crate) const TICK: Duration = Duration::from_millis(4);

/// One ring thread as the watchdog sees it.
#[derive(Default)]
struct Slot {
    /// The thread's id (0: not running).
    tid: AtomicI32,
    /// Odd while the thread is in an idle episode; incremented at each start and end.
    episode: AtomicU64,
}

pub(crate) struct Watchdog {
    slots: Box<[Slot]>,
    /// The watchdog sleeps until an episode begins (set by the watchdog, cleared by the thread
    /// that wakes it).
    parked: AtomicBool,
    /// Ring threads not finished yet; the watchdog ends after the last.
    live: AtomicUsize,
    thread: OnceLock<std::thread::Thread>,
    u: Arc<Union>,
}

impl Watchdog {
    /// Start watching `threads` ring threads (slots `0..threads`); the handle is the
    /// watchdog's thread, which ends once every slot's thread has ended ([`Watchdog::enter`]'s
    /// guard dropped) or been given up ([`Watchdog::gone`]).
    pub(crate) fn start(
        threads: usize,
        u: Arc<Union>,
    ) -> std::io::Result<(Arc<Watchdog>, std::thread::JoinHandle<()>)> {
        let w = Arc::new(Watchdog {
            slots: (0..threads).map(|_| Slot::default()).collect(),
            parked: AtomicBool::new(false),
            live: AtomicUsize::new(threads),
            thread: OnceLock::new(),
            u,
        });
        let w2 = w.clone();
        let h = std::thread::Builder::new()
            .name("uring-watchdog".into())
            .spawn(move || w2.watch())?;
        let _ = w.thread.set(h.thread().clone());
        Ok((w, h))
    }

    /// The ring thread of slot `i` starts (call on that thread); it has ended when the guard
    /// is dropped.
    pub(crate) fn enter(self: &Arc<Self>, i: usize) -> Running {
        if let Some(s) = self.slots.get(i) {
            s.tid
                .store(nix::unistd::gettid().as_raw(), Ordering::Release);
        }
        Running { w: self.clone(), i }
    }

    /// `n` slots' threads will never run (their start failed).
    pub(crate) fn gone(&self, n: usize) {
        if n > 0 && self.live.fetch_sub(n, Ordering::AcqRel) == n {
            self.wake();
        }
    }

    /// The thread of slot `i` begins an idle episode, which ends when the guard is dropped.
    pub(crate) fn idle(&self, i: usize) -> Episode<'_> {
        let slot = self.slots.get(i);
        if let Some(s) = slot {
            // SeqCst with the watchdog's `parked` store and episode loads: either it sees
            // this episode or this thread sees it parked (and wakes it).
            s.episode.fetch_add(1, Ordering::SeqCst);
            if self.parked.load(Ordering::SeqCst) {
                self.wake();
            }
        }
        Episode { slot }
    }

    fn wake(&self) {
        if self.parked.swap(false, Ordering::SeqCst)
            && let Some(t) = self.thread.get()
        {
            t.unpark();
        }
    }

    fn watch(&self) {
        let n = self.slots.len();
        let mut last = vec![0u64; n];
        let mut rescued = vec![0u64; n];
        let mut warned = false;
        while self.live.load(Ordering::Acquire) > 0 {
            std::thread::sleep(TICK);
            let mut active = false;
            for (i, s) in self.slots.iter().enumerate() {
                let e = s.episode.load(Ordering::SeqCst);
                active |= e != last[i] || e % 2 == 1;
                if e % 2 == 1 && e == last[i] {
                    // Still in the episode of the last tick: stuck behind other work.
                    match self.rescue(s) {
                        Ok(()) if rescued[i] != e => {
                            rescued[i] = e;
                            self.u.uring_rescues.fetch_add(1, Ordering::Relaxed);
                        }
                        Ok(()) => {}
                        Err(err) if !warned => {
                            warned = true;
                            log::warn!(
                                "FUSE over io_uring: cannot put a ring thread back to SCHED_OTHER: {err}"
                            );
                        }
                        Err(_) => {}
                    }
                }
                last[i] = e;
            }
            if active {
                continue;
            }
            // Nothing since the last tick: sleep until an episode begins (or the end).
            self.parked.store(true, Ordering::SeqCst);
            let begun = self
                .slots
                .iter()
                .zip(&last)
                .any(|(s, &l)| s.episode.load(Ordering::SeqCst) != l);
            if begun || self.live.load(Ordering::Acquire) == 0 {
                self.parked.store(false, Ordering::SeqCst);
                continue;
            }
            while self.parked.load(Ordering::SeqCst) {
                std::thread::park();
            }
        }
    }

    fn rescue(&self, s: &Slot) -> std::io::Result<()> {
        let tid = s.tid.load(Ordering::Acquire);
        if tid == 0 {
            return Ok(());
        }
        let param = libc::sched_param { sched_priority: 0 };
        // SAFETY: sched_setscheduler(2) with a valid param struct, on `tid`: a thread of ours
        // in an idle episode a tick ago (alive: a slot's tid is cleared before its thread
        // ends). If the episode ended meanwhile, the thread is SCHED_OTHER already or about to
        // begin another episode, which this call then only ends early.
        if unsafe { libc::sched_setscheduler(tid, libc::SCHED_OTHER, &param) } == 0 {
            Ok(())
        } else {
            Err(std::io::Error::last_os_error())
        }
    }
}

/// A ring thread running (see [`Watchdog::enter`]).
pub(crate) struct Running {
    w: Arc<Watchdog>,
    i: usize,
}

impl Drop for Running {
    fn drop(&mut self) {
        if let Some(s) = self.w.slots.get(self.i) {
            s.tid.store(0, Ordering::Release);
        }
        self.w.gone(1);
    }
}

/// An idle episode (see [`Watchdog::idle`]).
pub(crate) struct Episode<'a> {
    slot: Option<&'a Slot>,
}

impl Drop for Episode<'_> {
    fn drop(&mut self) {
        if let Some(s) = self.slot {
            s.episode.fetch_add(1, Ordering::SeqCst);
        }
    }
}
