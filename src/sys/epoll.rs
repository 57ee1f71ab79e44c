//! An epoll instance: interest registration and waiting. The epoll driver decides what to
//! watch and how (edge- or level-triggered); this only makes the calls.

use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};

use super::check;

/// One ready entry as the kernel reports it: `events` bits and the registration's `u64`.
pub use libc::epoll_event as EpollEvent;

pub struct Epoll {
    fd: OwnedFd,
}

impl Epoll {
    /// A new, close-on-exec epoll instance.
    pub fn new() -> io::Result<Epoll> {
        // SAFETY: no memory is involved; the result is checked.
        let fd = check(unsafe { libc::epoll_create1(libc::EPOLL_CLOEXEC) })?;
        // SAFETY: epoll_create1 just returned this descriptor; the OwnedFd is its only owner.
        let fd = unsafe { OwnedFd::from_raw_fd(fd) };
        Ok(Epoll { fd })
    }

    /// Starts watching `fd` for `events`; each report carries `data`.
    pub fn add(&self, fd: RawFd, events: u32, data: u64) -> io::Result<()> {
        self.ctl(libc::EPOLL_CTL_ADD, fd, events, data)
    }

    /// Stops watching `fd` (closing it does that too).
    pub fn delete(&self, fd: RawFd) -> io::Result<()> {
        self.ctl(libc::EPOLL_CTL_DEL, fd, 0, 0)
    }

    fn ctl(&self, op: libc::c_int, fd: RawFd, events: u32, data: u64) -> io::Result<()> {
        let mut ev = libc::epoll_event { events, u64: data };
        // SAFETY: `ev` lives on this stack frame for the call; the kernel copies it.
        check(unsafe { libc::epoll_ctl(self.fd.as_raw_fd(), op, fd, &mut ev) }).map(drop)
    }

    /// Waits up to `timeout_ms` (-1: no limit) and fills the front of `ready`; returns how many
    /// entries it filled. An interrupted wait returns 0.
    pub fn wait(&self, ready: &mut [EpollEvent], timeout_ms: i32) -> io::Result<usize> {
        let max = ready.len().min(i32::MAX as usize) as libc::c_int;
        // SAFETY: the kernel writes at most `max` entries, which is no more than `ready` holds,
        // and `ready` is borrowed mutably for the whole call.
        match check(unsafe {
            libc::epoll_wait(self.fd.as_raw_fd(), ready.as_mut_ptr(), max, timeout_ms)
        }) {
            Ok(n) => Ok(n as usize),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => Ok(0),
            Err(e) => Err(e),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    #[test]
    fn a_registered_socket_is_reported_with_its_data_once_readable() {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let mut c = std::net::TcpStream::connect(l.local_addr().unwrap()).unwrap();
        let (s, _) = l.accept().unwrap();
        let ep = Epoll::new().unwrap();
        ep.add(s.as_raw_fd(), libc::EPOLLIN as u32, 42).unwrap();
        let mut ready = vec![EpollEvent { events: 0, u64: 0 }; 4];
        assert_eq!(ep.wait(&mut ready, 0).unwrap(), 0, "nothing to read yet");
        c.write_all(b"x").unwrap();
        assert_eq!(ep.wait(&mut ready, 5000).unwrap(), 1);
        let (events, data) = (ready[0].events, ready[0].u64);
        assert_eq!(data, 42);
        assert_ne!(events & libc::EPOLLIN as u32, 0);
        ep.delete(s.as_raw_fd()).unwrap();
        assert_eq!(ep.wait(&mut ready, 0).unwrap(), 0, "no longer watched");
        assert_eq!(
            ep.add(-1, libc::EPOLLIN as u32, 0)
                .unwrap_err()
                .raw_os_error(),
            Some(libc::EBADF)
        );
    }
}
