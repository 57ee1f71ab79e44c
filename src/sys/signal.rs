//! Signals delivered synchronously: the handled ones are blocked in every thread and taken with
//! `sigtimedwait(2)` by the one thread that waits for them, so no handler ever runs
//! asynchronously. Also: asking another process to stop.

use std::io;
use std::time::Duration;

use nix::sys::signal::{kill, SigSet};
use nix::unistd::Pid;

pub use nix::sys::signal::Signal;

use super::io_error;

fn set_of(signals: &[Signal]) -> SigSet {
    let mut set = SigSet::empty();
    for s in signals {
        set.add(*s);
    }
    set
}

/// Blocks `signals` in the calling thread; threads spawned afterwards inherit the mask.
pub fn block(signals: &[Signal]) -> io::Result<()> {
    set_of(signals).thread_block().map_err(io_error)
}

/// Takes one of `signals` (which must be blocked) if one is pending or arrives within
/// `timeout`; `None` when none did (or the wait was interrupted by another signal).
pub fn wait(signals: &[Signal], timeout: Duration) -> Option<Signal> {
    let set = set_of(signals);
    let ts = libc::timespec {
        tv_sec: timeout.as_secs().min(libc::time_t::MAX as u64) as libc::time_t,
        tv_nsec: timeout.subsec_nanos() as libc::c_long,
    };
    // SAFETY: `set` and `ts` live on this stack frame for the call and are only read; a null
    // info pointer is allowed.
    let sig = unsafe { libc::sigtimedwait(set.as_ref(), std::ptr::null_mut(), &ts) };
    // -1 is the timeout (EAGAIN) or an interruption (EINTR).
    Signal::try_from(sig).ok()
}

/// Sends SIGTERM to process `pid`.
pub fn terminate(pid: u32) -> io::Result<()> {
    send(pid, Signal::SIGTERM)
}

/// Sends `signal` to process `pid`.
pub fn send(pid: u32, signal: Signal) -> io::Result<()> {
    let pid = i32::try_from(pid).map_err(|_| io::Error::from_raw_os_error(libc::ESRCH))?;
    kill(Pid::from_raw(pid), signal).map_err(io_error)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_blocked_signal_sent_to_the_thread_is_taken_by_wait() {
        // SIGUSR2: nothing else in the test process uses it, and it is blocked in this thread
        // only, so it cannot reach a thread where it would end the process.
        std::thread::spawn(|| {
            block(&[Signal::SIGUSR2]).unwrap();
            assert_eq!(wait(&[Signal::SIGUSR2], Duration::from_millis(10)), None);
            // raise(3) in a threaded process signals the calling thread.
            nix::sys::signal::raise(Signal::SIGUSR2).unwrap();
            assert_eq!(
                wait(&[Signal::SIGUSR2], Duration::from_secs(5)),
                Some(Signal::SIGUSR2)
            );
        })
        .join()
        .unwrap();
    }

    #[test]
    fn terminating_a_process_that_does_not_exist_is_an_error() {
        assert!(terminate(u32::MAX).is_err());
    }
}
