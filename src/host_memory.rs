//! How this process gets host memory for the large buffers of CPU jobs.
//!
//! A paper-size training step frees and re-allocates buffers of 0.6–2.7 GB every step (codes,
//! gradients, the tensors burn's ops return). glibc serves every allocation above 32 MB with a fresh
//! `mmap` and returns it with `munmap` on free, so each step touches hundreds of thousands of new
//! pages; in a virtual machine every first touch is a costly fault (measured here: a fresh 1.36 GB
//! buffer fills at 0.5 GB/s, a reused one at ~25 GB/s, and the BatchTopK step at d 2304 × D 8192
//! ran at 5.2 s/step with ~4.4 s of it in the kernel). Serving large blocks from the heap and keeping
//! freed memory there lets the next step reuse the same pages (2.5 s/step, BENCHMARKS.md).
//! The cost: the process keeps its peak resident size until it exits. (`malloc_trim` after each of
//! the app's jobs was tried: with the heaps of a test process running 31 app tests at once it
//! stalled jobs for minutes, so the app keeps its peak too.)

/// Keeps freed memory for reuse instead of returning it to the system (glibc on Linux; a no-op
/// elsewhere). Call once, first thing in `main`, before any large allocation.
/// `CROSSDIFF_KEEP_FREED_MEMORY=0` leaves glibc's defaults (to compare, or where the resident size
/// matters more than speed).
pub fn keep_freed_memory() {
    if std::env::var_os("CROSSDIFF_KEEP_FREED_MEMORY").is_some_and(|v| v == "0") {
        return;
    }
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: mallopt only changes allocator parameters; called before other threads exist.
    unsafe {
        // One arena for every thread: glibc's per-thread arenas map any block above 64 MB afresh
        // whatever M_MMAP_MAX says, and the app's jobs (and cache's device threads) run off the
        // main thread.
        libc::mallopt(libc::M_ARENA_MAX, 1);
        // No mmap'd chunks: every block comes from the heap, which free() keeps for reuse.
        libc::mallopt(libc::M_MMAP_MAX, 0);
        // Never shrink the heap's top on free (-1 turns trimming off; any positive int would cap
        // it at 2 GB, less than one step of a paper-size run frees).
        libc::mallopt(libc::M_TRIM_THRESHOLD, -1);
    }
}
