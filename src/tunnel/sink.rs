//! A stream's one queue toward its local socket.
//!
//! Every payload byte the tunnel receives for a stream goes into its [`Sink`], whichever way
//! it came off the tunnel: spliced into the sink's pipe (kTLS, zero copy) or copied into its
//! buffer (user-space TLS, a padded frame, a pipe that was full, a control record in the way).
//! Bytes leave in the order they arrived because the sink enforces it: the pipe only takes
//! bytes while the buffer is empty, and [`Sink::flush`] drains the pipe before the buffer. So
//! no caller can make a spliced frame overtake a copied one — the order rule holds by
//! construction, not by convention.
//!
//! Flow control: bytes count as delivered once they left toward the socket
//! ([`Sink::take_delivered`]), and only then does the tunnel return their credit to the peer,
//! so a slow local socket slows its own stream, never the tunnel. The buffer is bounded by the
//! stream's receive window; a peer that overruns it broke flow control.

use std::collections::VecDeque;
use std::io;
use std::os::fd::RawFd;

use crate::data_plane::socket;
use crate::data_plane::splice::{self, NoPipe, PipeSupply, SplicePipe};

/// What a flush left.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FlushStatus {
    /// Everything received was delivered.
    Empty,
    /// Bytes wait for the socket to become writable.
    WantWrite,
}

/// Why the sink cannot take or give bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum SinkError {
    /// The local socket failed (errno); the stream is reset.
    #[error("local socket: {}", io::Error::from_raw_os_error(*.0))]
    Local(i32),
    /// The peer sent more than the stream's window allows.
    #[error("peer overran the stream's receive window")]
    Overrun,
}

/// The outcome of [`Sink::splice_in`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SpliceIn {
    /// Bytes moved from the tunnel into the pipe.
    Moved(usize),
    /// The tunnel socket has nothing now.
    WouldBlock,
    /// The bytes must go through user space ([`Sink::deliver`]): the pipe is full, bytes wait
    /// in the buffer ahead of them, the local socket failed (they are read and dropped), or
    /// the kernel has a control record next (a splice cannot pass one).
    Copy,
    /// The tunnel socket reached EOF.
    Eof,
}

/// A splice into the pipe failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum SpliceInError {
    #[error("reading the tunnel: {}", io::Error::from_raw_os_error(*.0))]
    Source(i32),
}

/// Counters of one sink.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct SinkStats {
    pub spliced_bytes: u64,
    pub copied_bytes: u64,
    /// Bytes dropped after the local socket failed.
    pub dropped_bytes: u64,
}

/// See the module docs.
#[derive(Debug)]
pub struct Sink<P> {
    pipe: Option<P>,
    in_pipe: usize,
    buf: VecDeque<u8>,
    max_buf: usize,
    /// Bytes delivered (or dropped after a failure) not yet reported by `take_delivered`.
    unreported: usize,
    failed: Option<i32>,
    /// Bytes delivered to the socket since the stream began.
    pub delivered: u64,
    pub stats: SinkStats,
}

impl<P: SplicePipe> Sink<P> {
    /// `max_buf` bounds the user-space buffer: the stream's receive window.
    pub fn new(max_buf: usize) -> Self {
        Sink {
            pipe: None,
            in_pipe: 0,
            buf: VecDeque::new(),
            max_buf,
            unreported: 0,
            failed: None,
            delivered: 0,
            stats: SinkStats::default(),
        }
    }

    /// Bytes received and not yet delivered.
    pub fn buffered(&self) -> usize {
        self.in_pipe + self.buf.len()
    }

    pub fn failed(&self) -> Option<i32> {
        self.failed
    }

    /// Bytes that left toward the socket (or were dropped after it failed) since the last call:
    /// give them back to the peer as flow-control credit.
    pub fn take_delivered(&mut self) -> usize {
        std::mem::take(&mut self.unreported)
    }

    /// Takes payload that came through user space, behind everything queued. With `dst` and
    /// nothing queued it is written at once as far as the socket takes it. After a local
    /// failure the bytes are dropped (and reported as delivered, so the credit goes back).
    pub fn deliver(&mut self, bytes: &[u8], dst: Option<RawFd>) -> Result<(), SinkError> {
        self.stats.copied_bytes += bytes.len() as u64;
        if self.failed.is_some() {
            self.drop_bytes(bytes.len());
            return Ok(());
        }
        let mut rest = bytes;
        if let (Some(dst), 0) = (dst, self.buffered()) {
            match socket::send_nonblocking(dst, rest) {
                Ok(n) => {
                    self.delivered += n as u64;
                    self.unreported += n;
                    rest = &rest[n..];
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                Err(e) => {
                    self.failed = Some(e.raw_os_error().unwrap_or(libc::EIO));
                    self.drop_bytes(rest.len());
                    return Ok(());
                }
            }
        }
        if rest.is_empty() {
            return Ok(());
        }
        if self.buf.len() + rest.len() > self.max_buf {
            return Err(SinkError::Overrun);
        }
        self.buf.extend(rest);
        Ok(())
    }

    /// Moves up to `len` bytes from `src` (a plaintext tunnel socket) into the pipe, if the
    /// pipe may take them now; `dst` is drained first to make room when it can be.
    pub fn splice_in<S: PipeSupply<Pipe = P>>(
        &mut self,
        src: RawFd,
        len: usize,
        dst: Option<RawFd>,
        pipes: &mut S,
    ) -> Result<SpliceIn, SpliceInError> {
        if self.failed.is_some() || !self.buf.is_empty() {
            return Ok(SpliceIn::Copy);
        }
        if self.pipe.is_none() {
            match pipes.get() {
                Ok(pipe) => self.pipe = Some(pipe),
                // Every pipe of the reactor is carrying bytes, or the kernel would not make
                // one (the pool counts which): read this payload through user space, like any
                // the pipe cannot take.
                Err(NoPipe::Budget | NoPipe::Os(_)) => return Ok(SpliceIn::Copy),
            }
        }
        let pipe = self.pipe.as_ref().expect("just ensured");
        let (pipe_r, pipe_w, cap) = (pipe.read_fd(), pipe.write_fd(), pipe.capacity());
        if self.in_pipe >= cap {
            if let Some(dst) = dst {
                self.drain_pipe(pipe_r, dst);
            }
            if self.in_pipe >= cap || self.failed.is_some() {
                return Ok(SpliceIn::Copy);
            }
        }
        match splice_retrying(src, pipe_w, len.min(cap - self.in_pipe)) {
            Ok(0) => Ok(SpliceIn::Eof),
            Ok(n) => {
                self.in_pipe += n;
                self.stats.spliced_bytes += n as u64;
                Ok(SpliceIn::Moved(n))
            }
            Err(e) if e.raw_os_error() == Some(libc::EAGAIN) => {
                // EAGAIN is the source's or the pipe's (full by slots before bytes).
                if self.in_pipe == 0 || crate::sys::pipe::pipe_has_room(pipe_w) {
                    Ok(SpliceIn::WouldBlock)
                } else {
                    Ok(SpliceIn::Copy)
                }
            }
            // kTLS: the next record is not application data; read it through user space.
            Err(e) if e.raw_os_error() == Some(libc::EINVAL) => Ok(SpliceIn::Copy),
            Err(e) => Err(SpliceInError::Source(e.raw_os_error().unwrap_or(libc::EIO))),
        }
    }

    /// Writes what it holds to `dst` until it would block: the pipe first, then the buffer.
    pub fn flush(&mut self, dst: RawFd) -> Result<FlushStatus, SinkError> {
        if let Some(e) = self.failed {
            return Err(SinkError::Local(e));
        }
        if self.in_pipe > 0 {
            let pipe_r = self.pipe.as_ref().expect("bytes in a pipe").read_fd();
            self.drain_pipe(pipe_r, dst);
            if let Some(e) = self.failed {
                return Err(SinkError::Local(e));
            }
            if self.in_pipe > 0 {
                return Ok(FlushStatus::WantWrite);
            }
        }
        while !self.buf.is_empty() {
            let (front, _) = self.buf.as_slices();
            match socket::send_nonblocking(dst, front) {
                Ok(n) => {
                    self.buf.drain(..n);
                    self.delivered += n as u64;
                    self.unreported += n;
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    return Ok(FlushStatus::WantWrite)
                }
                Err(e) => {
                    let errno = e.raw_os_error().unwrap_or(libc::EIO);
                    self.fail(errno);
                    return Err(SinkError::Local(errno));
                }
            }
        }
        self.buf = VecDeque::new();
        Ok(FlushStatus::Empty)
    }

    /// Gives the pipe back once everything in it was delivered, so a stream between two DATA
    /// frames holds no pipe (the next frame takes one from the pool).
    pub fn return_empty_pipe<S: PipeSupply<Pipe = P>>(&mut self, pipes: &mut S) {
        if self.in_pipe == 0 {
            if let Some(pipe) = self.pipe.take() {
                pipes.put_empty(pipe);
            }
        }
    }

    /// Whether the sink holds a pipe (only while spliced bytes wait for the local socket).
    pub fn holds_pipe(&self) -> bool {
        self.pipe.is_some()
    }

    /// Gives the pipe back if it is empty, or closes it if it may still hold bytes.
    pub fn release<S: PipeSupply<Pipe = P>>(&mut self, pipes: &mut S) {
        if let Some(pipe) = self.pipe.take() {
            if self.in_pipe == 0 {
                pipes.put_empty(pipe);
            }
        }
        self.buf = VecDeque::new();
    }

    fn drain_pipe(&mut self, pipe_r: RawFd, dst: RawFd) {
        while self.in_pipe > 0 {
            match splice_retrying(pipe_r, dst, self.in_pipe) {
                Ok(0) => return,
                Ok(n) => {
                    self.in_pipe -= n;
                    self.delivered += n as u64;
                    self.unreported += n;
                }
                Err(e) if e.raw_os_error() == Some(libc::EAGAIN) => return,
                Err(e) => return self.fail(e.raw_os_error().unwrap_or(libc::EIO)),
            }
        }
    }

    /// The local socket failed: what is queued will never be delivered; its credit goes back.
    fn fail(&mut self, errno: i32) {
        self.failed = Some(errno);
        let queued = self.buf.len();
        self.buf = VecDeque::new();
        self.drop_bytes(queued);
        // The pipe's bytes are lost with it (`release` closes a non-empty pipe).
        let in_pipe = std::mem::take(&mut self.in_pipe);
        self.unreported += in_pipe;
        self.stats.dropped_bytes += in_pipe as u64;
        if let Some(p) = self.pipe.take() {
            drop(p);
        }
    }

    fn drop_bytes(&mut self, n: usize) {
        self.unreported += n;
        self.stats.dropped_bytes += n as u64;
    }
}

fn splice_retrying(from: RawFd, to: RawFd, len: usize) -> io::Result<usize> {
    loop {
        match splice::splice(from, to, len) {
            Err(e) if e.raw_os_error() == Some(libc::EINTR) => continue,
            r => return r,
        }
    }
}

#[cfg(test)]
mod tests {
    use std::io::Read;
    use std::net::Shutdown;
    use std::os::fd::AsRawFd;

    use super::*;
    use crate::data_plane::socket::tcp_pair;
    use crate::data_plane::splice::{Pipe, PipePool};

    /// A sink between a tunnel-side socket pair (`src_w` writes what `src` is spliced from)
    /// and a local one (`dst` delivers to `peer`), both proxy ends non-blocking.
    struct Harness {
        pipes: PipePool,
        src_w: std::net::TcpStream,
        src: std::net::TcpStream,
        dst: std::net::TcpStream,
        peer: std::net::TcpStream,
        sink: Sink<Pipe>,
    }

    impl Harness {
        fn new() -> Harness {
            let (src_w, src) = tcp_pair();
            src.set_nonblocking(true).unwrap();
            let (dst, peer) = tcp_pair();
            dst.set_nonblocking(true).unwrap();
            Harness {
                pipes: PipePool::new(64 << 10, 4, 64),
                src_w,
                src,
                dst,
                peer,
                sink: Sink::new(1 << 20),
            }
        }
    }

    #[test]
    fn a_sink_gives_its_pipe_back_once_delivered() {
        let Harness {
            mut pipes,
            mut src_w,
            src,
            dst,
            mut peer,
            mut sink,
        } = Harness::new();
        std::io::Write::write_all(&mut src_w, b"frame").unwrap();
        std::thread::sleep(std::time::Duration::from_millis(20));
        assert_eq!(
            sink.splice_in(src.as_raw_fd(), 5, None, &mut pipes)
                .unwrap(),
            SpliceIn::Moved(5)
        );
        sink.return_empty_pipe(&mut pipes);
        assert!(
            sink.holds_pipe(),
            "a pipe holding bytes stays with its stream"
        );
        assert_eq!(sink.flush(dst.as_raw_fd()).unwrap(), FlushStatus::Empty);
        sink.return_empty_pipe(&mut pipes);
        assert!(!sink.holds_pipe());
        assert_eq!(pipes.idle(), 1);
        let mut got = [0u8; 5];
        peer.read_exact(&mut got).unwrap();
        assert_eq!(&got, b"frame");
    }

    #[test]
    fn bytes_leave_in_arrival_order_whichever_way_they_came() {
        let Harness {
            mut pipes,
            mut src_w,
            src,
            dst,
            mut peer,
            mut sink,
        } = Harness::new();
        // 1: spliced; 2: copied (lands behind the pipe); 3: spliced again must wait behind 2.
        std::io::Write::write_all(&mut src_w, b"one,").unwrap();
        std::thread::sleep(std::time::Duration::from_millis(20));
        assert_eq!(
            sink.splice_in(src.as_raw_fd(), 4, None, &mut pipes)
                .unwrap(),
            SpliceIn::Moved(4)
        );
        sink.deliver(b"two,", Some(dst.as_raw_fd())).unwrap();
        std::io::Write::write_all(&mut src_w, b"three").unwrap();
        std::thread::sleep(std::time::Duration::from_millis(20));
        assert_eq!(
            sink.splice_in(src.as_raw_fd(), 5, None, &mut pipes)
                .unwrap(),
            SpliceIn::Copy,
            "the pipe must not take bytes while copied ones wait"
        );
        let mut three = [0u8; 5];
        (&src).read_exact(&mut three).unwrap();
        sink.deliver(&three, Some(dst.as_raw_fd())).unwrap();
        assert_eq!(sink.flush(dst.as_raw_fd()).unwrap(), FlushStatus::Empty);
        assert_eq!(sink.take_delivered(), 13);
        sink.release(&mut pipes);
        assert_eq!(pipes.idle(), 1, "the empty pipe went back");
        dst.shutdown(Shutdown::Write).unwrap();
        let mut got = String::new();
        peer.read_to_string(&mut got).unwrap();
        assert_eq!(got, "one,two,three");
    }

    #[test]
    fn a_peer_beyond_the_window_is_refused_and_a_failed_socket_drops_with_credit() {
        let mut sink: Sink<Pipe> = Sink::new(10);
        sink.deliver(&[1; 8], None).unwrap();
        assert_eq!(sink.deliver(&[2; 3], None), Err(SinkError::Overrun));
        // A local socket that is gone: queued bytes are dropped, their credit comes back.
        let (dst, peer) = tcp_pair();
        drop(peer);
        std::thread::sleep(std::time::Duration::from_millis(20));
        let mut failed = false;
        for _ in 0..100 {
            match sink.flush(dst.as_raw_fd()) {
                Err(SinkError::Local(_)) => {
                    failed = true;
                    break;
                }
                _ => sink.deliver(&[3; 1], None).unwrap_or(()),
            }
        }
        assert!(failed, "writing to a closed peer must fail");
        let before = sink.take_delivered();
        sink.deliver(&[4; 5], Some(dst.as_raw_fd())).unwrap();
        assert_eq!(sink.take_delivered(), 5);
        assert!(before > 0);
        assert_eq!(sink.buffered(), 0);
    }

    #[test]
    fn a_pipe_holding_bytes_is_never_returned() {
        let mut pipes = PipePool::new(64 << 10, 4, 64);
        let (mut src_w, src) = tcp_pair();
        src.set_nonblocking(true).unwrap();
        std::io::Write::write_all(&mut src_w, b"held").unwrap();
        std::thread::sleep(std::time::Duration::from_millis(20));
        let mut sink: Sink<Pipe> = Sink::new(1 << 20);
        assert_eq!(
            sink.splice_in(src.as_raw_fd(), 4, None, &mut pipes)
                .unwrap(),
            SpliceIn::Moved(4)
        );
        sink.release(&mut pipes);
        assert_eq!(pipes.idle(), 0);
    }
}
