//! The process allocator (mimalloc, set in `main.rs`): giving freed memory back to the kernel.
//!
//! mimalloc returns freed pages to the kernel lazily: a page becomes purgeable a second after
//! it is freed, and the purge itself runs only when some thread next calls into the allocator's
//! slow path. A reactor that goes quiet after a burst makes no such calls, so without help the
//! node keeps the burst's peak as its resident memory for as long as it stays quiet (the soak,
//! `tests/soak.rs`, measured a node at rest 20 MB above its working set). Reactors call
//! [`return_freed_memory`] once they have been quiet for a moment after connections opened or closed.

/// Frees this thread's empty pages and purges every page freed anywhere in the process,
/// whether or not its purge delay has passed. It walks this thread's heap pages and makes
/// `madvise` calls, so it is called when the reactor is idle, never per event. Harmless when mimalloc is not the global allocator (the library's tests):
/// its heaps are then empty.
pub fn return_freed_memory() {
    // SAFETY: mi_collect takes no pointers and is safe to call from any thread at any time.
    unsafe { libmimalloc_sys::mi_collect(true) }
}
