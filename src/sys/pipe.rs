//! Pipes and `splice(2)`: the data path moves payload socket → pipe → socket without copying it
//! through user space. Pipes are made non-blocking at both ends; their capacity is asked for
//! with `F_SETPIPE_SZ` and read back, since the kernel may grant less.

use std::io;
use std::os::fd::{OwnedFd, RawFd};

use nix::fcntl::{fcntl, FcntlArg, OFlag};

use super::io_error;

/// A new pipe `(read end, write end)`, both non-blocking and close-on-exec.
pub fn pipe() -> io::Result<(OwnedFd, OwnedFd)> {
    nix::unistd::pipe2(OFlag::O_NONBLOCK | OFlag::O_CLOEXEC).map_err(io_error)
}

/// Asks for a capacity of `bytes` (`F_SETPIPE_SZ`). Refused over `fs.pipe-max-size`, or over
/// the per-user `fs.pipe-user-pages-soft` budget without CAP_SYS_RESOURCE.
pub fn set_pipe_size(fd: RawFd, bytes: usize) -> io::Result<()> {
    let bytes =
        libc::c_int::try_from(bytes).map_err(|_| io::Error::from_raw_os_error(libc::EINVAL))?;
    fcntl(fd, FcntlArg::F_SETPIPE_SZ(bytes))
        .map(drop)
        .map_err(io_error)
}

/// The capacity the kernel granted (`F_GETPIPE_SZ`).
pub fn pipe_size(fd: RawFd) -> io::Result<usize> {
    fcntl(fd, FcntlArg::F_GETPIPE_SZ)
        .map(|n| n as usize)
        .map_err(io_error)
}

/// One non-blocking `splice(2)` of up to `len` bytes between a socket and a pipe
/// (`SPLICE_F_NONBLOCK | SPLICE_F_MOVE`); `Ok(0)` is EOF on the source.
pub fn splice(from: RawFd, to: RawFd, len: usize) -> io::Result<usize> {
    // SAFETY: null offsets (sockets and pipes have no file position), so no user memory is
    // involved; any descriptor only yields an errno.
    let n = unsafe {
        libc::splice(
            from,
            std::ptr::null_mut(),
            to,
            std::ptr::null_mut(),
            len,
            libc::SPLICE_F_NONBLOCK | libc::SPLICE_F_MOVE,
        )
    };
    if n < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(n as usize)
    }
}

/// True if the pipe's write end has a free slot (POLLOUT, checked without waiting): a splice
/// into it that returned EAGAIN was then waiting on its source, not on the pipe.
pub fn pipe_has_room(write_fd: RawFd) -> bool {
    let mut pfd = libc::pollfd {
        fd: write_fd,
        events: libc::POLLOUT,
        revents: 0,
    };
    // SAFETY: one pollfd on this stack frame for the whole call; timeout 0 never blocks; any
    // fd only yields POLLNVAL.
    let rc = unsafe { libc::poll(&mut pfd, 1, 0) };
    rc > 0 && pfd.revents & libc::POLLOUT != 0
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{Read, Write};
    use std::os::fd::AsRawFd;

    #[test]
    fn bytes_spliced_into_a_pipe_come_out_of_it_in_order() {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let mut c = std::net::TcpStream::connect(l.local_addr().unwrap()).unwrap();
        let (mut s, _) = l.accept().unwrap();
        let (r, w) = pipe().unwrap();
        c.write_all(b"spliced bytes").unwrap();
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
        let mut moved = 0;
        while moved < 13 {
            match splice(s.as_raw_fd(), w.as_raw_fd(), 64) {
                Ok(n) => moved += n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    assert!(std::time::Instant::now() < deadline, "bytes never arrived");
                    std::thread::yield_now();
                }
                Err(e) => panic!("splice in: {e}"),
            }
        }
        assert_eq!(splice(r.as_raw_fd(), c.as_raw_fd(), 64).unwrap(), 13);
        let mut back = [0u8; 13];
        s.read_exact(&mut back).unwrap();
        assert_eq!(&back, b"spliced bytes");
        // Both ends are non-blocking: an empty pipe says so instead of waiting.
        let err = splice(r.as_raw_fd(), c.as_raw_fd(), 64).unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::WouldBlock);
    }

    #[test]
    fn a_pipe_grows_to_what_was_asked_and_reports_it() {
        let (_r, w) = pipe().unwrap();
        set_pipe_size(w.as_raw_fd(), 256 << 10).unwrap();
        assert_eq!(pipe_size(w.as_raw_fd()).unwrap(), 256 << 10);
        assert!(set_pipe_size(w.as_raw_fd(), usize::MAX).is_err());
    }
}
