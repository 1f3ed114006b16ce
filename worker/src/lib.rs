//! Distillery's worker: the agent that joins a coordinator, and the task runners it drives.
//! The ML code (model, prune, distill, judge) never talks to the network; `agent` and `tasks`
//! do.

pub mod agent;
pub mod cli;
pub mod collective;
pub mod data;
pub mod devices;
pub mod distill;
#[doc(hidden)]
pub mod fuzz_targets;
pub mod gpu_check;
pub mod judge;
pub mod model;
pub mod prune;
pub mod runner;
pub mod serve;
pub mod tasks;

/// mimalloc's `mi_option_purge_delay` (see mimalloc.h).
const MI_OPTION_PURGE_DELAY: libmimalloc_sys::mi_option_t = 15;

/// Keeps freed memory for reuse instead of returning it to the OS: without this, every large
/// tensor of a pass (logits, gradients) is mapped fresh and the kernel zeroes its pages, ~15% of a
/// training step. Binaries use mimalloc as their global allocator and call this first.
pub fn tune_allocator() {
    // SAFETY: sets an allocator option; mimalloc documents it as callable at any time.
    unsafe { libmimalloc_sys::mi_option_set(MI_OPTION_PURGE_DELAY, -1) };
}
