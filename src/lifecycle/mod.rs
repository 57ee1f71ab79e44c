//! Start and stop: signal handling and the drain that lets flows finish before exit.
//!
//! Signals: SIGTERM or SIGINT starts a drain (stop accepting, readiness 503, open flows run until
//! `timeouts.drain`, then are reset) and the process exits 0; a second SIGTERM/SIGINT stops at
//! once. SIGHUP is blocked and logged: configuration reload is not implemented yet, and the
//! default action (exit) would take the node's traffic down by surprise.

use std::time::Duration;

use nix::sys::signal::{SigSet, Signal};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Received {
    Terminate,
    Hangup,
}

/// Blocks the signals ringtun handles; call before spawning threads so every thread inherits
/// the mask and only [`wait_signal`] sees them.
pub fn block_signals() -> nix::Result<()> {
    handled().thread_block()
}

fn handled() -> SigSet {
    let mut set = SigSet::empty();
    set.add(Signal::SIGTERM);
    set.add(Signal::SIGINT);
    set.add(Signal::SIGHUP);
    set
}

/// Waits up to `timeout` for one of the handled signals.
pub fn wait_signal(timeout: Duration) -> Option<Received> {
    let set = handled();
    let ts = libc::timespec {
        tv_sec: timeout.as_secs() as libc::time_t,
        tv_nsec: timeout.subsec_nanos() as libc::c_long,
    };
    // SAFETY: `set` is a valid sigset_t; info pointer may be null; `ts` is a valid timespec.
    let sig = unsafe { libc::sigtimedwait(set.as_ref(), std::ptr::null_mut(), &ts) };
    match sig {
        libc::SIGTERM | libc::SIGINT => Some(Received::Terminate),
        libc::SIGHUP => Some(Received::Hangup),
        _ => None,
    }
}
