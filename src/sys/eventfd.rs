//! An eventfd used as a waker: another thread writes to it, the thread that owns it sees it
//! readable in its poll set and drains it. Both ends non-blocking: waking never waits, and a
//! drain of an unwoken eventfd returns at once.

use std::io;
use std::os::fd::{AsRawFd, RawFd};

use nix::sys::eventfd::{EfdFlags, EventFd};

use super::io_error;

#[derive(Debug)]
pub struct Waker {
    fd: EventFd,
}

impl Waker {
    /// A non-blocking, close-on-exec eventfd with a count of 0.
    pub fn new() -> io::Result<Waker> {
        let fd = EventFd::from_flags(EfdFlags::EFD_NONBLOCK | EfdFlags::EFD_CLOEXEC)
            .map_err(io_error)?;
        Ok(Waker { fd })
    }

    /// The descriptor to watch for readability.
    pub fn raw_fd(&self) -> RawFd {
        self.fd.as_raw_fd()
    }

    /// Makes the eventfd readable. A failure can only be the count saturating (EAGAIN), which
    /// leaves it readable anyway, so it is not reported.
    pub fn wake(&self) {
        let _ = self.fd.write(1);
    }

    /// Resets the count so the eventfd stops being readable; returns how many wakes it held
    /// (0 when none).
    pub fn drain(&self) -> u64 {
        self.fd.read().unwrap_or(0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn wakes_add_up_until_drained_and_draining_never_blocks() {
        let w = Waker::new().unwrap();
        assert_eq!(w.drain(), 0);
        assert!(!super::super::socket::wait_readable(w.raw_fd(), Duration::ZERO).unwrap());
        w.wake();
        w.wake();
        assert!(super::super::socket::wait_readable(w.raw_fd(), Duration::ZERO).unwrap());
        assert_eq!(w.drain(), 2);
        assert!(!super::super::socket::wait_readable(w.raw_fd(), Duration::ZERO).unwrap());
    }
}
