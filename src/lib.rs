//! unionfs-rs: an OverlayFS-compatible union filesystem in userspace.
//!
//! Layout (DESIGN.md section 1): `layer` (symlink-safe access beneath a layer root),
//! `union` (the overlay semantics, FUSE-free), `fuse` (the thin fuser adapter), `cli`.

pub mod alloc;
pub mod cache;
pub mod cli;
pub mod control;
pub mod fuse;
pub mod layer;
pub mod logger;
pub mod quota;
pub mod union;

/// The CPUs this process may run on (at least 1; 4 if that cannot be read). What
/// `std::thread::available_parallelism` answers reads /proc/self/cgroup and the cgroup's CPU
/// quota files as well (~14 syscalls), on the way to a mount being ready; this is one.
pub fn cpus_allowed() -> usize {
    let mut set = std::mem::MaybeUninit::<libc::cpu_set_t>::zeroed();
    // SAFETY: sched_getaffinity writes at most size_of::<cpu_set_t>() bytes into `set`, a
    // zeroed cpu_set_t that lives across the call; CPU_COUNT only reads it.
    let cpus = unsafe {
        if libc::sched_getaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), set.as_mut_ptr()) == 0
        {
            libc::CPU_COUNT(set.assume_init_ref()) as usize
        } else {
            4
        }
    };
    cpus.max(1)
}

/// A concurrent map sharded for this machine's CPUs (`DashMap::new` would ask
/// `available_parallelism`, see [`cpus_allowed`]).
pub(crate) fn new_map<K: Eq + std::hash::Hash, V>() -> dashmap::DashMap<K, V> {
    // dashmap's own rule (4 shards per CPU), as a power of two.
    dashmap::DashMap::with_shard_amount((cpus_allowed() * 4).next_power_of_two())
}
