//! The one place ringtun calls the operating system below std: raw syscalls (`libc`) and `nix`
//! calls sit here behind safe functions whose docs state their contracts, each `unsafe` block
//! with a `// SAFETY:` line. The rest of the library is `#![deny(unsafe_code)]`, except the
//! modules `lib.rs` lists as not yet migrated and two lines of the io_uring driver that keep
//! the ring's own invariant (ARCHITECTURE.md says why); `tests/layout` fails if an OS call
//! appears outside the modules allowed `unsafe`.
//!
//! One file per topic: [`socket`] (creating, configuring, connecting, accepting, addresses,
//! non-blocking send, queue depths, netfilter's original destination), [`pipe`] (pipes,
//! `F_SETPIPE_SZ`, `splice(2)`), [`tls`] (kTLS options and records with a content type), [`epoll`], [`eventfd`], [`inotify`] (watching directories for changed files), [`netns`] (`setns`), [`signal`]
//! (blocking and waiting for signals, signalling a process), [`process`] (identity, limits,
//! clock) and [`allocator`] (giving freed memory back to the kernel).
//!
//! **Descriptors.** A function that creates a descriptor returns an `OwnedFd`. A function that
//! acts on one takes a `RawFd`, because the drivers, reactors and pumps hold their sockets as
//! raw numbers: each is memory-safe for any integer (the kernel checks the descriptor, and every
//! pointer handed to it is to memory the function owns for the whole call), while acting on the
//! descriptor that was meant is the caller's business — the contract nix's own `RawFd` calls
//! have. Nothing here adopts or closes a descriptor it did not create. `nix` is used where it
//! has the call in a form that takes what the caller holds; `libc` where nix insists on a
//! borrowed descriptor the callers only have as a `RawFd`.

pub mod allocator;
pub mod epoll;
pub mod eventfd;
pub mod inotify;
pub mod netns;
pub mod pipe;
pub mod process;
pub mod signal;
pub mod socket;
pub mod tls;

use std::io;

/// An errno as the OS reported it (nix's type, the one `sys` functions return).
pub use nix::errno::Errno;

/// A libc return value: the value, or the `errno` it set.
fn check(rc: libc::c_int) -> io::Result<libc::c_int> {
    if rc < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(rc)
    }
}

/// nix's error as the `io::Error` the rest of ringtun reports.
fn io_error(e: nix::Error) -> io::Error {
    io::Error::from_raw_os_error(e as i32)
}
