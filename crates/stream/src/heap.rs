//! glibc's `malloc`, which librdkafka uses, set up for a long-running job.
//!
//! librdkafka allocates every fetch response, every decompressed message
//! set and every compressed produce batch with the C allocator. glibc's
//! defaults hand that memory back to the kernel as soon as it is free: each
//! thread gets its own arena of 64 MiB heaps that are unmapped once empty,
//! blocks over a (moving) threshold are `mmap`ed and `munmap`ed, and the top
//! of a heap is trimmed. The next fetch then writes into fresh pages, which
//! the kernel faults in and zeroes one by one. In `job_bench`'s end-to-end
//! phase that was about 80,000 page faults (docs/benchmarks-stream.md,
//! seventeenth measurement).
//!
//! [`keep_c_heap_mapped`] keeps that memory: one arena (the main heap, which
//! grows with `brk`), no `mmap` below glibc's largest threshold (32 MiB), and
//! no trimming below 1 GiB of free space at the top. The process then stays
//! at the C heap's peak, which librdkafka's queue limits bound
//! (`queued.max.messages.kbytes` per consumer, `queue.buffering.max.kbytes`
//! per producer).

/// Largest `M_MMAP_THRESHOLD` glibc accepts on 64-bit targets
/// (`HEAP_MAX_SIZE / 2`).
pub const C_HEAP_MMAP_THRESHOLD: usize = 32 << 20;
/// Free bytes at the top of the heap before glibc gives them back.
pub const C_HEAP_TRIM_THRESHOLD: usize = 1 << 30;

/// Sets glibc's `malloc` to keep freed memory mapped (see the module docs).
/// Call it first thing in `main`, before any thread starts: threads that
/// already have an arena keep it. Returns whether every setting took; on
/// targets without glibc it does nothing and returns `false`.
pub fn keep_c_heap_mapped() -> bool {
    imp::keep_c_heap_mapped()
}

/// The multi-threaded tokio runtime of a Kafka job, built after
/// [`keep_c_heap_mapped`] when `keep_c_heap` is set, so the setting comes
/// before any of the runtime's or librdkafka's threads. Call it from the
/// main thread before starting others. A setting glibc refuses is logged,
/// not fatal: the job runs either way.
pub fn job_runtime(keep_c_heap: bool) -> std::io::Result<tokio::runtime::Runtime> {
    if keep_c_heap && !keep_c_heap_mapped() {
        tracing::warn!(
            "could not tune the C allocator: librdkafka's buffers may fault in fresh pages"
        );
    }
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
}

#[cfg(all(target_os = "linux", target_env = "gnu"))]
mod imp {
    use super::{C_HEAP_MMAP_THRESHOLD, C_HEAP_TRIM_THRESHOLD};

    pub(super) fn keep_c_heap_mapped() -> bool {
        let settings = [
            (libc::M_ARENA_MAX, 1),
            (libc::M_MMAP_THRESHOLD, C_HEAP_MMAP_THRESHOLD as libc::c_int),
            (libc::M_TRIM_THRESHOLD, C_HEAP_TRIM_THRESHOLD as libc::c_int),
        ];
        settings.iter().all(|&(param, value)| {
            // SAFETY: mallopt only changes glibc's allocator parameters;
            // these are documented parameters with in-range values, and
            // glibc takes its own lock while it sets them.
            unsafe { libc::mallopt(param, value) == 1 }
        })
    }
}

#[cfg(not(all(target_os = "linux", target_env = "gnu")))]
mod imp {
    pub(super) fn keep_c_heap_mapped() -> bool {
        false
    }
}
