//! The allocator evomerge's binaries install, and its one setting.
//!
//! The forward pass allocates and frees large activations (logits of a scoring batch are
//! hundreds of MB) many times per second. glibc returns such blocks to the kernel at once
//! (mmap/munmap), and mimalloc (v3) purges freed memory after 1 s by default; either way later
//! allocations get fresh pages, and first touch of fresh memory is slow on the VMs this runs
//! on (0.3–1.8 GB/s). mimalloc with purging disabled keeps freed memory for reuse: scoring
//! went from 62–72 to 99–108 tokens/s on the Qwen2-0.5B-shaped benchmark
//! (`scripts/bench-forward`, BENCHMARKS.md). The cost: resident memory stays at the peak of
//! the run, which is the working set of a search anyway.
//!
//! Binaries (and benchmark examples) install it with
//! ```ignore
//! #[global_allocator]
//! static GLOBAL: evomerge_engine::alloc::Allocator = evomerge_engine::alloc::Allocator;
//! fn main() { evomerge_engine::alloc::keep_freed_memory(); /* ... */ }
//! ```

pub use mimalloc::MiMalloc as Allocator;

/// mimalloc's `mi_option_purge_delay` (index 15 in both the v2 and v3 option enums of
/// libmimalloc-sys 0.1.49's bundled headers; the crate's own constants predate it).
const MI_OPTION_PURGE_DELAY: libmimalloc_sys::mi_option_t = 15;

/// Tells mimalloc never to return freed memory to the OS. Harmless when mimalloc is not the
/// global allocator (it only sets an option of an unused heap).
#[allow(unsafe_code)]
pub fn keep_freed_memory() {
    // SAFETY: mi_option_set stores an integer in mimalloc's option table; it has no
    // preconditions and is safe to call at any time from any thread.
    unsafe { libmimalloc_sys::mi_option_set(MI_OPTION_PURGE_DELAY, -1) };
}

/// The current purge delay (ms; -1 = never), to check the setting took.
#[allow(unsafe_code)]
pub fn purge_delay() -> i64 {
    // SAFETY: reads an option; no preconditions.
    #[allow(clippy::useless_conversion)] // c_long is i32 on some targets
    i64::from(unsafe { libmimalloc_sys::mi_option_get(MI_OPTION_PURGE_DELAY) })
}

#[cfg(test)]
mod tests {
    #[test]
    fn purge_delay_defaults_to_1s_and_can_be_disabled() {
        // mimalloc v3's default purge delay is 1000 ms (options.c): this pins the index.
        assert_eq!(super::purge_delay(), 1000);
        super::keep_freed_memory();
        assert_eq!(super::purge_delay(), -1);
    }
}
