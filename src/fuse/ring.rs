//! FUSE over io_uring (kernel 6.14+, `CONFIG_FUSE_IO_URING`, enabled by root with
//! `echo Y > /sys/module/fuse/parameters/enable_uring`).
//!
//! Why: on /dev/fuse every request wakes whichever daemon thread has waited longest, usually on
//! another CPU than the caller, and the answer wakes the caller back across CPUs. On this
//! 2-vCPU VM that cross-CPU round trip is most of the cost of a metadata operation (`ls -lR`
//! of the speed benchmark's tree: 3.5 s with the two free, 1.75 s with daemon and caller pinned
//! to one CPU). With io_uring the kernel queues a request on the queue of the CPU the caller
//! runs on, and we serve each queue from threads pinned to that CPU: the caller sleeps, the
//! daemon thread runs on the same CPU, answers, and the caller runs again, without waking
//! another CPU. Except that the answer wakes the caller while the daemon thread still runs, so
//! the scheduler puts the caller on an idle CPU if there is one, and every round trip wakes an
//! idle CPU again (measured: no faster than /dev/fuse). Hence the hand-over: a thread commits
//! each answer as a SCHED_IDLE thread; a CPU that runs only idle-policy threads counts as free,
//! so the caller is woken right there, and the thread is SCHED_OTHER again before it handles
//! the next request. Returning from SCHED_IDLE needs CAP_SYS_NICE (probed at INIT). An
//! idle-policy thread runs about once a second while other work keeps its CPU busy, so a
//! watchdog (`watchdog.rs`) puts a thread that stays idle for a few milliseconds back to
//! SCHED_OTHER.
//!
//! The kernel keeps using /dev/fuse (fuser's loop) for FORGET, INTERRUPT and everything before
//! the ring is complete (every possible CPU's queue has an entry). Each entry is one request at
//! a time: a header buffer (request header, operation header, entry info) and a payload buffer
//! (names, data). The thread handles the request with the same union operations as the fuser
//! adapter, writes the reply into the same buffers and commits it, which fetches the next.

use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use io_uring::{IoUring, cqueue, opcode, squeue, types};

use super::watchdog::Watchdog;
use super::wire::{self, Arg, InHeader, Names, Out, Short};
use crate::union::dir::NewKind;
use crate::union::file::{KillSuidgid, Opened, SetAttr, SetTime};
use crate::union::inode::Backing;
use crate::union::{Caller, Union};

/// enum fuse_uring_cmd.
const CMD_REGISTER: u32 = 1;
const CMD_COMMIT_AND_FETCH: u32 = 2;
/// struct fuse_uring_req_header: in_out[128], op_in[128], struct fuse_uring_ent_in_out.
const HEADER_LEN: usize = 128 + 128 + 32;
const OP_IN: usize = 128;
const ENT_IN_OUT: usize = 256;
/// Payload buffer of each entry: the kernel wants room for the largest request or reply,
/// max_write or max_pages pages (1 MiB both, set at INIT).
const MAX_PAYLOAD: usize = 1 << 20;

/// Ring state, shared with the fuser adapter (which must not register passthrough backing
/// files while the ring may take over: an inode's opens must all use one backing file, and
/// the ring registers its own).
#[derive(Default)]
pub struct RingState {
    failed: AtomicBool,
    hand_over: AtomicBool,
    why_not: std::sync::OnceLock<String>,
    /// A ring made at INIT, before io_uring is offered, to tell the kernel to give up on it
    /// ([`abandon`]) whatever fails later.
    control: parking_lot::Mutex<Option<Ring>>,
    threads: parking_lot::Mutex<Vec<std::thread::JoinHandle<()>>>,
}

impl std::fmt::Debug for RingState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RingState")
            .field("failed", &self.failed())
            .field("why_not", &self.why_not())
            .finish()
    }
}

impl RingState {
    /// The ring will not serve requests (not offered, or setup failed): /dev/fuse serves
    /// everything.
    pub fn failed(&self) -> bool {
        self.failed.load(Ordering::Acquire)
    }
    /// Not used, and why (logged once the mount is live).
    pub(crate) fn fail_because(&self, why: String) {
        let _ = self.why_not.set(why);
        self.failed.store(true, Ordering::Release);
    }
    /// Why the ring is not used, if it is not.
    pub fn why_not(&self) -> Option<&str> {
        self.why_not.get().map(String::as_str)
    }
    /// Whether the threads commit at idle policy (decided at INIT).
    pub(crate) fn hand_over(&self) -> bool {
        self.hand_over.load(Ordering::Acquire)
    }
    pub(crate) fn set_hand_over(&self, on: bool) {
        self.hand_over.store(on, Ordering::Release);
    }
    /// Make the control ring (at INIT, before offering io_uring); false: io_uring cannot be
    /// set up here, do not offer it.
    pub(crate) fn prepare(&self) -> bool {
        match new_ring(2) {
            Ok(r) => {
                *self.control.lock() = Some(r);
                true
            }
            Err(e) => {
                log::debug!("io_uring: {e}");
                false
            }
        }
    }
    /// Give up on the ring (see [`abandon`]) and record why.
    fn give_up(&self, dev: BorrowedFd<'_>, why: String) {
        self.fail_because(why);
        match self.control.lock().as_mut() {
            Some(c) => abandon(dev, c),
            None => log::error!("FUSE over io_uring: no control ring to turn it off with"),
        }
    }
    /// Wait (at most `limit`) for the ring threads to end, as they do once the connection is
    /// gone: nothing of theirs may run while the daemon shuts down.
    pub fn join(&self, limit: Duration) {
        let deadline = Instant::now() + limit;
        let handles = std::mem::take(&mut *self.threads.lock());
        for h in handles {
            while !h.is_finished() && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(5));
            }
            if h.is_finished() {
                let _ = h.join();
            } else {
                log::warn!("FUSE over io_uring: a ring thread still runs at shutdown");
            }
        }
    }
}

/// A passthrough backing file registered through the ring's /dev/fuse fd; unregistered when
/// the last open of the file using it is gone.
#[derive(Debug)]
pub struct RingBacking {
    id: u32,
    dev: Arc<OwnedFd>,
}

nix::ioctl_write_ptr!(fuse_backing_close, 229, 2, u32);

impl Drop for RingBacking {
    fn drop(&mut self) {
        // SAFETY: FUSE_DEV_IOC_BACKING_CLOSE reads one u32 (the id) from the pointer, which
        // points to our field for the duration of the call; the fd is our /dev/fuse fd.
        let r = unsafe { fuse_backing_close(self.dev.as_raw_fd(), &self.id) };
        if let Err(e) = r {
            log::debug!("passthrough: unregistering backing file {}: {e}", self.id);
        }
    }
}

/// What the ring's request handlers need.
struct Served {
    u: Arc<Union>,
    ttl: Duration,
    dev: Arc<OwnedFd>,
    /// Commit replies at idle policy (see `run`) under this watchdog's eye; None: no
    /// hand-over.
    watch: Option<Arc<Watchdog>>,
}

type Ring = IoUring<squeue::Entry128, cqueue::Entry>;

fn new_ring(entries: u32) -> std::io::Result<Ring> {
    IoUring::builder()
        .setup_coop_taskrun()
        .setup_taskrun_flag()
        .build(entries)
}

/// Start serving the connection of `dev` (a /dev/fuse fd of the mount, after INIT) through
/// io_uring, with `per_cpu` threads for each CPU's queue. An error means nothing is
/// registered and the kernel has been told to go on through /dev/fuse.
pub fn start(
    u: Arc<Union>,
    dev: BorrowedFd<'_>,
    ttl: Duration,
    per_cpu: usize,
    fail_for_test: bool,
    state: Arc<RingState>,
) -> std::io::Result<()> {
    let union = u.clone();
    let r = dev.try_clone_to_owned().and_then(|fd| {
        let plan = plan(per_cpu)?;
        if fail_for_test {
            return Err(std::io::Error::other(
                "failing on purpose (uring_test_fail)",
            ));
        }
        // Every ring first, so that a failure comes before any registration.
        let rings = plan
            .iter()
            .map(|(_, qids)| new_ring(8.max(2 * qids.len().next_power_of_two() as u32)))
            .collect::<std::io::Result<Vec<Ring>>>()?;
        let n = plan.len();
        // No hand-over without its watchdog (see watchdog.rs).
        let watch = match state.hand_over() {
            true => match Watchdog::start(n, u.clone()) {
                Ok((w, h)) => {
                    state.threads.lock().push(h);
                    Some(w)
                }
                Err(e) => {
                    log::warn!("FUSE over io_uring: no watchdog thread ({e}): no hand-over");
                    None
                }
            },
            false => None,
        };
        let served = Arc::new(Served {
            u,
            ttl,
            dev: Arc::new(fd),
            watch,
        });
        for (i, ((cpu, qids), ring)) in plan.into_iter().zip(rings).enumerate() {
            match spawn(served.clone(), ring, cpu, qids, i, state.clone()) {
                Ok(h) => state.threads.lock().push(h),
                Err(e) => {
                    if let Some(w) = &served.watch {
                        w.gone(n - i);
                    }
                    return Err(e);
                }
            }
        }
        Ok(n)
    });
    match r {
        Ok(n) => {
            log::debug!("FUSE over io_uring: {n} threads");
            union.uring_threads.store(n, Ordering::Relaxed);
            Ok(())
        }
        Err(e) => {
            state.give_up(dev, e.to_string());
            Err(e)
        }
    }
}

/// Which threads serve which queues: `per_cpu` pinned threads for each CPU we may run on; one
/// unpinned thread holds an entry for each other CPU's queue (offline or outside our cpuset:
/// rarely used, but the kernel uses the ring only once every queue has an entry).
fn plan(per_cpu: usize) -> std::io::Result<Vec<(Option<usize>, Vec<u16>)>> {
    let nr_queues = possible_cpus()?;
    let allowed = nix::sched::sched_getaffinity(nix::unistd::Pid::from_raw(0))
        .map_err(std::io::Error::from)?;
    let mut plan = Vec::new();
    let mut others = Vec::new();
    for cpu in 0..nr_queues {
        if allowed.is_set(cpu).unwrap_or(false) {
            for _ in 0..per_cpu.max(1) {
                plan.push((Some(cpu), vec![cpu as u16]));
            }
        } else {
            others.push(cpu as u16);
        }
    }
    if !others.is_empty() {
        plan.push((None, others));
    }
    Ok(plan)
}

/// Make the kernel give up on the ring for this connection: a registration it refuses (a
/// queue that does not exist) turns FUSE over io_uring off and releases the requests it held
/// back, which then come through /dev/fuse.
fn abandon(dev: BorrowedFd<'_>, control: &mut Ring) {
    let sqe = uring_cmd(dev, CMD_REGISTER, u16::MAX, 0);
    let mut r = push(control, &sqe);
    for _ in 0..100 {
        r = r.and_then(|_| control.submit_and_wait(1).map(|_| ()));
        match &r {
            Err(e) if retry(e) => r = Ok(()),
            _ => break,
        }
    }
    match r {
        Ok(()) => {
            if let Some(c) = control.completion().next() {
                log::debug!("uring: refused registration answered {}", c.result());
            }
        }
        Err(e) => log::error!("FUSE over io_uring: could not turn it off again: {e}"),
    }
}

/// io_uring_enter errors that only ask to try again.
fn retry(e: &std::io::Error) -> bool {
    matches!(
        e.raw_os_error(),
        Some(libc::EINTR | libc::EAGAIN | libc::EBUSY)
    )
}

/// Last resort when a ring thread cannot go on after serving: abort the connection (callers
/// get ENOTCONN) rather than leave the requests of its CPU waiting for ever.
fn abort_connection(u: &Union) {
    let conn = u
        .mount_device()
        .and_then(|d| d.split_once(':').map(|(_, minor)| minor.to_string()));
    match conn {
        Some(minor) => {
            let path = format!("/sys/fs/fuse/connections/{minor}/abort");
            if let Err(e) = std::fs::write(&path, "1") {
                log::error!("FUSE over io_uring: aborting the connection ({path}): {e}");
            }
        }
        None => log::error!("FUSE over io_uring: the mount's connection is unknown"),
    }
}

/// The kernel's queue count: one per possible CPU (num_possible_cpus()).
fn possible_cpus() -> std::io::Result<usize> {
    let s = std::fs::read_to_string("/sys/devices/system/cpu/possible")?;
    let bad = || std::io::Error::other(format!("cpu/possible: {s:?}"));
    let mut n = 0usize;
    for part in s.trim().split(',') {
        let (lo, hi) = part.split_once('-').unwrap_or((part, part));
        let (lo, hi): (usize, usize) = (
            lo.parse().map_err(|_| bad())?,
            hi.parse().map_err(|_| bad())?,
        );
        n += hi.checked_sub(lo).ok_or_else(bad)? + 1;
    }
    Ok(n)
}

fn spawn(
    served: Arc<Served>,
    ring: Ring,
    cpu: Option<usize>,
    qids: Vec<u16>,
    slot: usize,
    state: Arc<RingState>,
) -> std::io::Result<std::thread::JoinHandle<()>> {
    let name = match cpu {
        Some(c) => format!("uring-{c}"),
        None => "uring-rest".into(),
    };
    std::thread::Builder::new().name(name).spawn(move || {
        let _running = served.watch.as_ref().map(|w| w.enter(slot));
        if let Some(c) = cpu {
            let mut set = nix::sched::CpuSet::new();
            if set.set(c).is_ok()
                && let Err(e) = nix::sched::sched_setaffinity(nix::unistd::Pid::from_raw(0), &set)
            {
                log::debug!("uring: pinning to CPU {c}: {e}");
            }
        }
        match serve(&served, ring, &qids, slot) {
            Ok(()) => {}
            Err((e, false)) => {
                // Before this thread served anything: tell the kernel to go on through
                // /dev/fuse (if the ring is complete without us, that changes nothing and the
                // queue's other threads serve it).
                log::warn!("FUSE over io_uring: {e}; requests go through /dev/fuse");
                state.give_up(served.dev.as_fd(), e.to_string());
            }
            Err((e, true)) => {
                log::error!("FUSE over io_uring: a ring thread failed after serving: {e}");
                abort_connection(&served.u);
            }
        }
    })
}

/// One ring entry's buffers. Boxed: the kernel keeps their addresses from registration on.
struct Entry {
    qid: u16,
    header: Box<[u8; HEADER_LEN]>,
    payload: Vec<u8>,
    iov: Box<[libc::iovec; 2]>,
    /// The request's payload copied out, so the reply can be written over the original.
    input: Vec<u8>,
    live: bool,
    /// Registrations refused in a row after an error (the entry is given up at 3).
    refused: u8,
}

fn uring_cmd(dev: BorrowedFd<'_>, op: u32, qid: u16, commit_id: u64) -> squeue::Entry128 {
    // struct fuse_uring_cmd_req: flags u64, commit_id u64, qid u16, padding.
    let mut cmd = [0u8; 80];
    cmd[8..16].copy_from_slice(&commit_id.to_ne_bytes());
    cmd[16..18].copy_from_slice(&qid.to_ne_bytes());
    opcode::UringCmd80::new(types::Fd(dev.as_raw_fd()), op)
        .cmd(cmd)
        .build()
}

fn register_sqe(dev: BorrowedFd<'_>, e: &Entry, index: usize) -> squeue::Entry128 {
    let sqe = opcode::UringCmd80::new(types::Fd(dev.as_raw_fd()), CMD_REGISTER)
        .cmd({
            let mut cmd = [0u8; 80];
            cmd[16..18].copy_from_slice(&e.qid.to_ne_bytes());
            cmd
        })
        .addr(Some(e.iov.as_ptr() as u64))
        .build()
        .user_data(index as u64);
    // The kernel takes the number of iovecs from sqe->len, which the builder does not set.
    // SAFETY: Entry128 is repr(C): a 64-byte struct io_uring_sqe followed by 64 command bytes;
    // `len` is the u32 at byte 24 of io_uring_sqe. Plain bytes both ways, no invalid values.
    let mut raw: [u8; 128] = unsafe { std::mem::transmute(sqe) };
    raw[24..28].copy_from_slice(&2u32.to_ne_bytes());
    // SAFETY: as above.
    unsafe { std::mem::transmute::<[u8; 128], squeue::Entry128>(raw) }
}

/// Serve `qids` until the connection is gone. Err((error, whether it served requests)).
fn serve(s: &Served, ring: Ring, qids: &[u16], slot: usize) -> Result<(), (std::io::Error, bool)> {
    let max_payload = MAX_PAYLOAD;
    // The kernel holds the buffers' addresses from registration on: they are freed only once
    // every entry is finished, never on an error or a panic (then they are leaked).
    let mut ring = std::mem::ManuallyDrop::new(ring);
    let mut entries = std::mem::ManuallyDrop::new(
        qids.iter()
            .map(|&qid| {
                let mut header = Box::new([0u8; HEADER_LEN]);
                let mut payload = vec![0u8; max_payload];
                let iov = Box::new([
                    libc::iovec {
                        iov_base: header.as_mut_ptr().cast(),
                        iov_len: HEADER_LEN,
                    },
                    libc::iovec {
                        iov_base: payload.as_mut_ptr().cast(),
                        iov_len: max_payload,
                    },
                ]);
                Entry {
                    qid,
                    header,
                    payload,
                    iov,
                    input: Vec::new(),
                    live: true,
                    refused: 0,
                }
            })
            .collect::<Vec<Entry>>(),
    );
    let mut served = false;
    run(s, &mut ring, &mut entries, &mut served, slot).map_err(|e| (e, served))?;
    // SAFETY: every entry is finished (the kernel completed all their commands): nothing of
    // the kernel's points into the buffers or uses the ring any more; each is dropped once.
    unsafe {
        std::mem::ManuallyDrop::drop(&mut entries);
        std::mem::ManuallyDrop::drop(&mut ring);
    }
    Ok(())
}

fn run(
    s: &Served,
    ring: &mut Ring,
    entries: &mut [Entry],
    registered: &mut bool,
    slot: usize,
) -> std::io::Result<()> {
    let dev = s.dev.as_fd();
    // The hand-over puts the thread back to SCHED_OTHER: only for threads that run so (a daemon
    // started under another policy keeps it).
    // SAFETY: sched_getscheduler(2) of the calling thread; no memory involved.
    let mut hand_over =
        s.watch.is_some() && unsafe { libc::sched_getscheduler(0) } == libc::SCHED_OTHER;
    for (i, e) in entries.iter().enumerate() {
        push(ring, &register_sqe(dev, e, i))?;
    }
    let mut done = Vec::new();
    loop {
        match ring.submit_and_wait(1) {
            Ok(_) => {}
            Err(e) if retry(&e) => {}
            Err(e) => return Err(e),
        }
        done.clear();
        done.extend(
            ring.completion()
                .map(|c| (c.user_data() as usize, c.result())),
        );
        for &(i, res) in &done {
            let Some(e) = entries.get_mut(i) else {
                continue;
            };
            if res == 0 {
                *registered = true;
                e.refused = 0;
                let (unique, qid) = handle(s, e);
                let sqe = uring_cmd(dev, CMD_COMMIT_AND_FETCH, qid, unique).user_data(i as u64);
                push(ring, &sqe)?;
                if hand_over {
                    // Commit as an idle-policy thread: the scheduler then counts this CPU as
                    // free and wakes the caller here, where its next request is queued and
                    // served, instead of on an idle CPU it must wake (see the module notes).
                    // The watchdog ends the episode if other work keeps this CPU busy.
                    let episode = s.watch.as_ref().map(|w| w.idle(slot));
                    set_policy(libc::SCHED_IDLE);
                    let r = ring.submit();
                    let back = set_policy(libc::SCHED_OTHER);
                    drop(episode);
                    if !back {
                        log::error!(
                            "FUSE over io_uring: cannot leave SCHED_IDLE: {}",
                            std::io::Error::last_os_error()
                        );
                        hand_over = false;
                    }
                    match r {
                        Err(e) if !retry(&e) => return Err(e),
                        _ => {} // the commit is still queued if not submitted: next loop
                    }
                }
            } else if !*registered && !gone(res) {
                // (The ring starts once the kernel has processed INIT's answer, so no EAGAIN
                // for "not initialized" comes here: any refusal gives the ring up.)
                return Err(std::io::Error::other(format!(
                    "registering queue {}: {}",
                    e.qid,
                    std::io::Error::from_raw_os_error(-res)
                )));
            } else {
                // The connection is gone (unmount, abort): this entry is finished.
                let err = std::io::Error::from_raw_os_error(-res);
                if gone(res) {
                    log::debug!("uring queue {}: {err}", e.qid);
                    e.live = false;
                } else if e.refused < 3 {
                    // An error of ours (the kernel refused a commit): the kernel's entry is
                    // lost to the queue; register the buffers as a new one.
                    e.refused += 1;
                    log::error!(
                        "FUSE over io_uring: queue {}: {err}; entry registered again",
                        e.qid
                    );
                    push(ring, &register_sqe(dev, e, i))?;
                } else {
                    return Err(std::io::Error::other(format!(
                        "queue {}: registration refused again: {err}",
                        e.qid
                    )));
                }
            }
        }
        if entries.iter().all(|e| !e.live) {
            return Ok(());
        }
    }
}

/// CQE results that mean the connection is gone (unmount, abort) or our ring is.
fn gone(res: i32) -> bool {
    [
        libc::ENOTCONN,
        libc::ECANCELED,
        libc::ECONNABORTED,
        libc::ENODEV,
    ]
    .contains(&-res)
}

fn push(ring: &mut Ring, sqe: &squeue::Entry128) -> std::io::Result<()> {
    loop {
        // SAFETY: every buffer an SQE names (an entry's header, payload and iovecs) lives as
        // long as the ring: entries are dropped only after every command completed, or leaked.
        if unsafe { ring.submission().push(sqe) }.is_ok() {
            return Ok(());
        }
        ring.submit()?;
    }
}

/// Serve the request in `e`'s buffers and write the reply there; returns (commit id, qid).
fn handle(s: &Served, e: &mut Entry) -> (u64, u16) {
    s.u.uring_requests.fetch_add(1, Ordering::Relaxed);
    let ent = Arg(&e.header[ENT_IN_OUT..]);
    let commit_id = ent.u64(8).unwrap_or(0);
    let payload_sz = (ent.u32(16).unwrap_or(0) as usize).min(e.payload.len());
    let h = InHeader::parse(&e.header[..wire::IN_HEADER_LEN]);
    let op_in: [u8; 128] = {
        let mut b = [0u8; 128];
        b.copy_from_slice(&e.header[OP_IN..OP_IN + 128]);
        b
    };
    let (unique, result) = match h {
        Ok(h) if h.opcode == wire::WRITE => {
            // Data used in place; the 8-byte answer is written after.
            let mut small = [0u8; 16];
            let r = {
                let mut out = Out::new(&mut small);
                guarded(&h, || {
                    dispatch(s, &h, &op_in, &e.payload[..payload_sz], &mut out)
                })
                .map(|_| out.len())
            };
            if let Ok(n) = r {
                e.payload[..n].copy_from_slice(&small[..n]);
            }
            (h.unique, r)
        }
        Ok(h) => {
            e.input.clear();
            e.input.extend_from_slice(&e.payload[..payload_sz]);
            let mut out = Out::new(&mut e.payload);
            let r = guarded(&h, || dispatch(s, &h, &op_in, &e.input, &mut out)).map(|_| out.len());
            (h.unique, r)
        }
        Err(Short) => (commit_id, Err(libc::EIO)),
    };
    let (len, error) = match result {
        Ok(n) => (n, 0),
        // An errno the kernel takes (1..=511); anything else is EIO, as fuser does.
        Err(errno) => (
            0,
            -(if (1..512).contains(&errno) {
                errno
            } else {
                libc::EIO
            }),
        ),
    };
    wire::out_header(
        &mut e.header[..wire::OUT_HEADER_LEN],
        (wire::OUT_HEADER_LEN + len) as u32,
        error,
        unique,
    );
    // fuse_uring_ent_in_out.payload_sz: the size of the reply's arguments.
    e.header[ENT_IN_OUT + 16..ENT_IN_OUT + 20].copy_from_slice(&(len as u32).to_ne_bytes());
    (commit_id, e.qid)
}

type Reply = Result<(), i32>;

/// A request whose handler panicked is answered EIO: the thread must live on, or the requests
/// of its CPU would wait for it forever.
fn guarded(h: &InHeader, f: impl FnOnce() -> Reply) -> Reply {
    std::panic::catch_unwind(std::panic::AssertUnwindSafe(f)).unwrap_or_else(|_| {
        log::error!(
            "FUSE over io_uring: request {} (opcode {}) panicked",
            h.unique,
            h.opcode
        );
        Err(libc::EIO)
    })
}

fn err(e: crate::union::Error) -> i32 {
    log::debug!("{e}");
    e.errno as i32
}

fn short(_: Short) -> i32 {
    libc::EIO
}

fn time(valid: u32, now_bit: u32, set_bit: u32, s: u64, ns: u32) -> Option<SetTime> {
    if valid & now_bit != 0 {
        Some(SetTime::Now)
    } else if valid & set_bit != 0 {
        Some(SetTime::At(s as i64, ns as i64))
    } else {
        None
    }
}

impl Served {
    fn register(&self) -> impl Fn(BorrowedFd<'_>) -> std::io::Result<Backing> + '_ {
        move |fd: BorrowedFd<'_>| -> std::io::Result<Backing> {
            let id = fuser::BackingId::create_raw(self.dev.as_fd(), fd)?;
            Ok(Arc::new(RingBacking {
                id,
                dev: self.dev.clone(),
            }))
        }
    }

    fn open_reply(&self, o: &Opened, out: &mut Out<'_>) {
        match o
            .direct
            .as_ref()
            .and_then(|b| b.downcast_ref::<RingBacking>())
        {
            Some(b) => out.open(o.fh, wire::FOPEN_PASSTHROUGH, b.id),
            None => out.open(
                o.fh,
                if o.keep_cache {
                    wire::FOPEN_KEEP_CACHE
                } else {
                    0
                },
                0,
            ),
        }
    }
}

/// One request: the union operation and the reply's arguments written to `out`.
fn dispatch(s: &Served, h: &InHeader, op_in: &[u8], input: &[u8], out: &mut Out<'_>) -> Reply {
    let u = &s.u;
    let a = Arg(op_in);
    let mut names = Names::new(input);
    let ino = h.nodeid;
    let who = Caller {
        uid: h.uid,
        gid: h.gid,
        pid: h.pid,
    };
    match h.opcode {
        wire::LOOKUP => {
            let name = names.next_name().map_err(short)?;
            let attr = super::lookup_entry(u, ino, name).map_err(err)?;
            out.entry(&attr, s.ttl);
        }
        wire::GETATTR => {
            let fh = (a.u32(0).map_err(short)? & wire::GETATTR_FH != 0)
                .then(|| a.u64(8))
                .transpose()
                .map_err(short)?;
            out.attr_out(&u.getattr(ino, fh).map_err(err)?, s.ttl);
        }
        wire::SETATTR => {
            let valid = a.u32(0).map_err(short)?;
            // A field of fuse_setattr_in if its FATTR_ bit is set.
            let field32 = |bit: u32, off: usize| {
                (valid & bit != 0)
                    .then(|| a.u32(off))
                    .transpose()
                    .map_err(short)
            };
            let field64 = |bit: u32, off: usize| {
                (valid & bit != 0)
                    .then(|| a.u64(off))
                    .transpose()
                    .map_err(short)
            };
            let mut sa = SetAttr {
                mode: field32(wire::FATTR_MODE, 68)?,
                uid: field32(wire::FATTR_UID, 76)?,
                gid: field32(wire::FATTR_GID, 80)?,
                size: field64(wire::FATTR_SIZE, 16)?,
                atime: time(
                    valid,
                    wire::FATTR_ATIME_NOW,
                    wire::FATTR_ATIME,
                    a.u64(32).map_err(short)?,
                    a.u32(56).map_err(short)?,
                ),
                mtime: time(
                    valid,
                    wire::FATTR_MTIME_NOW,
                    wire::FATTR_MTIME,
                    a.u64(40).map_err(short)?,
                    a.u32(60).map_err(short)?,
                ),
                fh: field64(wire::FATTR_FH, 8)?,
                kill_suidgid: KillSuidgid::No,
            };
            let said = valid & wire::FATTR_KILL_SUIDGID != 0;
            sa.kill_suidgid = KillSuidgid::for_setattr(&sa, who, Some(said));
            out.attr_out(&u.setattr(ino, &sa).map_err(err)?, s.ttl);
        }
        wire::READLINK => {
            let t = u.readlink(ino).map_err(err)?;
            if !out.bytes(t.as_bytes()) {
                return Err(libc::ENAMETOOLONG);
            }
        }
        wire::SYMLINK => {
            let name = names.next_name().map_err(short)?;
            let target = names.next_name().map_err(short)?;
            let (attr, _) = u
                .create_node(ino, name, NewKind::Symlink(target), 0o777, 0, who)
                .map_err(err)?;
            out.entry(&attr, s.ttl);
        }
        wire::MKNOD => {
            let (mode, rdev, umask) = (
                a.u32(0).map_err(short)?,
                a.u32(4).map_err(short)?,
                a.u32(8).map_err(short)?,
            );
            let name = names.next_name().map_err(short)?;
            let kind = NewKind::Node {
                kind: mode & libc::S_IFMT,
                rdev: rdev as u64,
            };
            let (attr, _) = u
                .create_node(ino, name, kind, mode, umask, who)
                .map_err(err)?;
            out.entry(&attr, s.ttl);
        }
        wire::MKDIR => {
            let (mode, umask) = (a.u32(0).map_err(short)?, a.u32(4).map_err(short)?);
            let name = names.next_name().map_err(short)?;
            let (attr, _) = u
                .create_node(ino, name, NewKind::Dir, mode, umask, who)
                .map_err(err)?;
            out.entry(&attr, s.ttl);
        }
        wire::UNLINK => u
            .unlink(ino, names.next_name().map_err(short)?)
            .map_err(err)?,
        wire::RMDIR => u
            .rmdir(ino, names.next_name().map_err(short)?)
            .map_err(err)?,
        wire::RENAME | wire::RENAME2 => {
            let newdir = a.u64(0).map_err(short)?;
            let flags = if h.opcode == wire::RENAME2 {
                a.u32(8).map_err(short)?
            } else {
                0
            };
            let old = names.next_name().map_err(short)?;
            let new = names.next_name().map_err(short)?;
            u.rename(ino, old, newdir, new, flags).map_err(err)?;
        }
        wire::LINK => {
            let old = a.u64(0).map_err(short)?;
            let name = names.next_name().map_err(short)?;
            out.entry(&u.link(old, ino, name).map_err(err)?, s.ttl);
        }
        wire::OPEN => {
            let flags = a.i32(0).map_err(short)?;
            let kill = a.u32(4).map_err(short)? & wire::FUSE_OPEN_KILL_SUIDGID != 0;
            let register = s.register();
            let o = u
                .open_as(ino, flags, Some(&register), Some((who, Some(kill))))
                .map_err(err)?;
            s.open_reply(&o, out);
        }
        wire::CREATE => {
            let (flags, mode, umask) = (
                a.i32(0).map_err(short)?,
                a.u32(4).map_err(short)?,
                a.u32(8).map_err(short)?,
            );
            let name = names.next_name().map_err(short)?;
            let register = s.register();
            let (attr, o) =
                super::create_open(u, ino, name, mode, umask, flags, who, Some(&register))
                    .map_err(err)?;
            out.entry(&attr, s.ttl);
            s.open_reply(&o, out);
        }
        wire::READ => {
            let (fh, off, size) = (
                a.u64(0).map_err(short)?,
                a.u64(8).map_err(short)?,
                a.u32(16).map_err(short)?,
            );
            let d = u.read(fh, off, size.min(out.room() as u32)).map_err(err)?;
            out.bytes(&d);
        }
        wire::WRITE => {
            let (fh, off, size, flags) = (
                a.u64(0).map_err(short)?,
                a.u64(8).map_err(short)?,
                a.u32(16).map_err(short)? as usize,
                a.i32(32).map_err(short)?,
            );
            let data = input.get(..size).ok_or(libc::EIO)?;
            let n = u.write_flags(fh, off, data, flags).map_err(err)?;
            out.write(n as u32);
        }
        wire::STATFS => out.statfs(&u.statfs().map_err(err)?),
        wire::RELEASE => u.release(a.u64(0).map_err(short)?),
        wire::FSYNC => {
            let (fh, fl) = (a.u64(0).map_err(short)?, a.u32(8).map_err(short)?);
            u.fsync(fh, fl & 1 != 0).map_err(err)?;
        }
        wire::FSYNCDIR => u.fsyncdir(ino).map_err(err)?,
        wire::SETXATTR => {
            let (size, flags) = (a.u32(0).map_err(short)? as usize, a.i32(4).map_err(short)?);
            let name = names.next_name().map_err(short)?;
            let value = names.rest().get(..size).ok_or(libc::EIO)?;
            u.setxattr(ino, name, value, flags, who).map_err(err)?;
        }
        wire::GETXATTR => {
            let size = a.u32(0).map_err(short)?;
            let name = names.next_name().map_err(short)?;
            let v = u.getxattr(ino, name).map_err(err)?;
            xattr_out(&v, size, out)?;
        }
        wire::LISTXATTR => {
            let size = a.u32(0).map_err(short)?;
            let v = super::xattr_list(&u.listxattr(ino, h.uid).map_err(err)?);
            xattr_out(&v, size, out)?;
        }
        wire::REMOVEXATTR => u
            .removexattr(ino, names.next_name().map_err(short)?)
            .map_err(err)?,
        // As the fuser adapter: no FLUSH, no OPENDIR (see there), ioctls refused.
        wire::FLUSH | wire::OPENDIR => return Err(libc::ENOSYS),
        wire::IOCTL => {
            // struct fuse_ioctl_in: fh, flags, cmd, arg, in_size, out_size; the input after it.
            let (fh, cmd, in_size, out_size) = (
                a.u64(0).map_err(short)?,
                a.u32(12).map_err(short)?,
                a.u32(24).map_err(short)? as usize,
                a.u32(28).map_err(short)? as usize,
            );
            let data = input.get(..in_size).ok_or(libc::EIO)?;
            let r = u.fileattr(ino, fh, cmd, data).map_err(err)?;
            if r.len() > out_size || !out.ioctl(&r) {
                return Err(libc::EINVAL);
            }
        }
        wire::RELEASEDIR | wire::ACCESS => {}
        wire::READDIR | wire::READDIRPLUS => {
            let (off, size) = (a.u64(8).map_err(short)?, a.u32(16).map_err(short)? as usize);
            // No more than the kernel's buffer.
            out.limit(size);
            if h.opcode == wire::READDIR {
                super::readdir_batch(u, ino, off, |e_ino, next, kind, name| {
                    out.dirent(e_ino, next, kind, name)
                })
            } else {
                super::readdirplus_batch(u, ino, off, |attr, next, name| {
                    out.direntplus(attr, s.ttl, next, name)
                })
            }
            .map_err(err)?;
        }
        wire::FALLOCATE => {
            let (fh, off, len, mode) = (
                a.u64(0).map_err(short)?,
                a.u64(8).map_err(short)?,
                a.u64(16).map_err(short)?,
                a.i32(24).map_err(short)?,
            );
            u.fallocate(fh, off, len, mode).map_err(err)?;
        }
        wire::LSEEK => {
            let (fh, off, whence) = (
                a.u64(0).map_err(short)?,
                a.u64(8).map_err(short)? as i64,
                a.i32(16).map_err(short)?,
            );
            out.lseek(u.lseek(fh, off, whence).map_err(err)?);
        }
        wire::COPY_FILE_RANGE => {
            // fuse_copy_file_range_in: fh_in, off_in, nodeid_out, fh_out, off_out, len, flags.
            let (fh_in, off_in, fh_out, off_out, len, flags) = (
                a.u64(0).map_err(short)?,
                a.u64(8).map_err(short)?,
                a.u64(24).map_err(short)?,
                a.u64(32).map_err(short)?,
                a.u64(40).map_err(short)?,
                a.u64(48).map_err(short)?,
            );
            let n = u
                .copy_file_range((fh_in, off_in), (fh_out, off_out), len, flags)
                .map_err(err)?;
            out.write(n as u32);
        }
        wire::DESTROY => u.shutdown(),
        // FORGET, BATCH_FORGET, INTERRUPT, INIT come through /dev/fuse; anything else is not
        // implemented (what fuser answers too).
        _ => return Err(libc::ENOSYS),
    }
    Ok(())
}

fn xattr_out(v: &[u8], size: u32, out: &mut Out<'_>) -> Reply {
    if size == 0 {
        out.xattr_size(v.len() as u32);
    } else if v.len() > size as usize || !out.bytes(v) {
        return Err(libc::ERANGE);
    }
    Ok(())
}

/// Set the calling thread's scheduling policy (priority 0).
fn set_policy(p: i32) -> bool {
    let param = libc::sched_param { sched_priority: 0 };
    // SAFETY: sched_setscheduler(2) on the calling thread (pid 0) with a valid param struct.
    unsafe { libc::sched_setscheduler(0, p, &param) == 0 }
}

/// Whether a thread of ours may drop to SCHED_IDLE and come back (coming back needs
/// CAP_SYS_NICE, which a daemon in a user namespace lacks). Tried on a throwaway thread.
pub fn can_hand_over() -> bool {
    std::thread::Builder::new()
        .name("uring-probe".into())
        .spawn(|| set_policy(libc::SCHED_IDLE) && set_policy(libc::SCHED_OTHER))
        .ok()
        .and_then(|t| t.join().ok())
        .unwrap_or(false)
}
