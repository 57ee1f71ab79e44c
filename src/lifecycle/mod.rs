//! Start, change and stop: signal handling, live reloads ([`reload`], [`watch`]) and the drain
//! that lets flows finish before exit.
//!
//! Signals: SIGTERM or SIGINT starts a drain (stop accepting, readiness 503, open flows run until
//! `timeouts.drain`, then are reset) and the process exits 0; a second SIGTERM/SIGINT stops at
//! once. SIGHUP reloads the configuration file (as a change of the file does).

pub mod reload;
pub mod watch;

use std::io;
use std::time::Duration;

use crate::sys::signal::{self, Signal};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Received {
    Terminate,
    Hangup,
}

const HANDLED: [Signal; 3] = [Signal::SIGTERM, Signal::SIGINT, Signal::SIGHUP];

/// Blocks the signals ringtun handles; call before spawning threads so every thread inherits
/// the mask and only [`wait_signal`] sees them.
pub fn block_signals() -> io::Result<()> {
    signal::block(&HANDLED)
}

/// Waits up to `timeout` for one of the handled signals.
pub fn wait_signal(timeout: Duration) -> Option<Received> {
    match signal::wait(&HANDLED, timeout)? {
        Signal::SIGTERM | Signal::SIGINT => Some(Received::Terminate),
        Signal::SIGHUP => Some(Received::Hangup),
        _ => None,
    }
}
