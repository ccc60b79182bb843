//! The process's allocator: glibc malloc tuned for the page cache's budget, and the heap's
//! figures for `stats`.
//!
//! Cache pages are freed by eviction and allocated by the next read all the time, and
//! read/reply buffers (up to 1 MiB) come and go with every request. With glibc's defaults each
//! of those trims or maps fresh memory, and the page faults and zeroing cost more CPU than the
//! copying itself; so freed memory up to the budget (plus 64 MiB for everything else) is kept.

/// Freed heap memory kept for reuse with a cache budget of `cache_size` bytes.
#[cfg(target_env = "gnu")]
fn keep(cache_size: u64) -> i32 {
    cache_size.saturating_add(64 << 20).min(i32::MAX as u64) as i32
}

/// Tune malloc for a cache budget of `cache_size` bytes. Call before any thread starts.
pub fn tune(cache_size: u64) {
    #[cfg(target_env = "gnu")]
    // SAFETY: mallopt only changes allocator parameters; called before any thread starts.
    unsafe {
        libc::mallopt(libc::M_TRIM_THRESHOLD, keep(cache_size));
        libc::mallopt(libc::M_MMAP_THRESHOLD, 4 << 20);
        // One arena: pages are allocated by one thread and freed by another, and with an
        // arena per thread each would keep its own share of freed pages — up to the budget
        // several times over (measured: 340 MiB RSS for a 256 MiB budget, 277 with one).
        libc::mallopt(libc::M_ARENA_MAX, 1);
    }
    #[cfg(not(target_env = "gnu"))]
    let _ = cache_size;
}

/// The budget changed on a live mount (`cache set cache_size=`): keep no more freed memory
/// than the new budget allows, and give back what is above it now. (A QA run shrank a 128 MiB
/// cache to 1 MiB: the cache let its pages go, the daemon's RSS stayed at 141 MiB.)
pub fn retune(cache_size: u64) {
    #[cfg(target_env = "gnu")]
    // SAFETY: mallopt and malloc_trim only change and apply allocator parameters; glibc takes
    // its arenas' locks for both, so other threads may be allocating meanwhile.
    unsafe {
        libc::mallopt(libc::M_TRIM_THRESHOLD, keep(cache_size));
        libc::malloc_trim(0);
    }
    #[cfg(not(target_env = "gnu"))]
    let _ = cache_size;
}

/// Give back freed heap memory beyond what a budget of `cache_size` keeps, if there is more:
/// after the budget was lowered under load, the freed pages sit in the heap's free lists
/// with the rest, and the load's allocations fault them in again one by one (a QA run: a 1G
/// cache set to 2M under fio stayed at 211 MiB RSS, where a fresh 2M mount peaks at 16).
/// The trim threshold acts on the heap's top only. Returns whether it trimmed.
pub fn trim_excess(cache_size: u64) -> bool {
    #[cfg(target_env = "gnu")]
    {
        let Some((_, free)) = heap() else {
            return false;
        };
        if free <= keep(cache_size) as u64 {
            return false;
        }
        // SAFETY: malloc_trim only gives free memory back to the kernel, under the arenas'
        // locks; other threads may allocate meanwhile.
        unsafe { libc::malloc_trim(0) };
        true
    }
    #[cfg(not(target_env = "gnu"))]
    {
        let _ = cache_size;
        false
    }
}

/// The heap's bytes (in use, free but kept), mmapped blocks counted as in use; None where
/// the allocator does not tell.
pub fn heap() -> Option<(u64, u64)> {
    #[cfg(target_env = "gnu")]
    {
        // SAFETY: mallinfo2 only reads the allocator's state (under its arenas' locks) and
        // returns a plain struct.
        let m = unsafe { libc::mallinfo2() };
        Some(((m.uordblks + m.hblkhd) as u64, m.fordblks as u64))
    }
    #[cfg(not(target_env = "gnu"))]
    None
}

/// The machine's memory in bytes (None if it cannot be read).
pub fn physical_memory() -> Option<u64> {
    // SAFETY: sysconf only reads system configuration.
    let (pages, size) = unsafe {
        (
            libc::sysconf(libc::_SC_PHYS_PAGES),
            libc::sysconf(libc::_SC_PAGESIZE),
        )
    };
    (pages > 0 && size > 0).then(|| pages as u64 * size as u64)
}
