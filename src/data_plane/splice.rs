//! The zero-copy fast path: pipes and inline, non-blocking `splice(2)`.
//!
//! Each direction of a flow is a [`Pump`]: source socket → pipe → destination socket. The pump is
//! called on the reactor thread after a readiness event; it moves at most a budget of bytes and
//! reports what it waits for next. DESIGN.md §2 measured why it is built this way: io_uring's own
//! splice opcode runs on kernel workers and is slower than copying, while splice inline after
//! readiness is the fastest path we have. The pump never blocks and never holds bytes anywhere but
//! in its pipe, whose size bounds what a flow can buffer.

use std::io;
use std::os::fd::{AsRawFd, OwnedFd, RawFd};

use crate::sys;

/// One non-blocking `splice(2)` between a socket and a pipe (the tunnel's framing splices
/// through the same call).
pub(crate) use crate::sys::pipe::splice;

/// A pipe with both ends non-blocking, and the capacity the kernel actually granted.
#[derive(Debug)]
pub struct Pipe {
    read: OwnedFd,
    write: OwnedFd,
    capacity: usize,
}

impl Pipe {
    /// Creates a pipe and asks for `size` bytes. The kernel may refuse a larger size (over
    /// `pipe-max-size`, or the per-user `pipe-user-pages-soft` budget without CAP_SYS_RESOURCE);
    /// the pipe is then kept at its default size and `resized` says so.
    pub fn new(size: usize) -> io::Result<(Pipe, bool)> {
        let (read, write) = sys::pipe::pipe()?;
        let resized = sys::pipe::set_pipe_size(write.as_raw_fd(), size).is_ok();
        // The kernel's default (16 pages) if it will not even say.
        let capacity = match sys::pipe::pipe_size(write.as_raw_fd()) {
            Ok(n) if n > 0 => n,
            _ => 65536,
        };
        Ok((
            Pipe {
                read,
                write,
                capacity,
            },
            resized,
        ))
    }

    pub fn capacity(&self) -> usize {
        self.capacity
    }
}

/// A pipe the data path can splice through (the tunnel's framing is generic over it so its
/// tests can check every pipe handed back).
pub trait SplicePipe {
    fn read_fd(&self) -> RawFd;
    fn write_fd(&self) -> RawFd;
    /// Bytes the kernel granted (capacity is really counted in slots: a pipe may refuse bytes
    /// before this many are in it).
    fn capacity(&self) -> usize;
}

/// Where pipes come from and go back to. `put_empty` must only ever receive empty pipes.
pub trait PipeSupply {
    type Pipe: SplicePipe;
    fn get(&mut self) -> io::Result<Self::Pipe>;
    fn put_empty(&mut self, pipe: Self::Pipe);
}

impl SplicePipe for Pipe {
    fn read_fd(&self) -> RawFd {
        self.read.as_raw_fd()
    }
    fn write_fd(&self) -> RawFd {
        self.write.as_raw_fd()
    }
    fn capacity(&self) -> usize {
        self.capacity
    }
}

impl PipeSupply for PipePool {
    type Pipe = Pipe;
    fn get(&mut self) -> io::Result<Pipe> {
        PipePool::get(self)
    }
    fn put_empty(&mut self, pipe: Pipe) {
        PipePool::put_empty(self, pipe)
    }
}

/// Empty pipes kept by one reactor for reuse. Only pipes known to be empty come back here:
/// a pipe that may still hold bytes is closed instead, so no flow ever sees another's data.
#[derive(Debug)]
pub struct PipePool {
    free: Vec<Pipe>,
    max_free: usize,
    pipe_size: usize,
    /// Pipes whose F_SETPIPE_SZ was refused (kept at the kernel default).
    pub resize_refused: u64,
    /// Pipes created since start (not counting reuse).
    pub created: u64,
}

impl PipePool {
    pub fn new(pipe_size: usize, max_free: usize) -> Self {
        PipePool {
            free: Vec::new(),
            max_free,
            pipe_size,
            resize_refused: 0,
            created: 0,
        }
    }

    pub fn get(&mut self) -> io::Result<Pipe> {
        if let Some(p) = self.free.pop() {
            return Ok(p);
        }
        let (pipe, resized) = Pipe::new(self.pipe_size)?;
        self.created += 1;
        if !resized {
            self.resize_refused += 1;
            if self.resize_refused == 1 {
                log::warn!(
                    "pipe resize to {} bytes refused (fs.pipe-max-size or fs.pipe-user-pages-soft); \
                     using {} byte pipes",
                    self.pipe_size,
                    pipe.capacity
                );
            }
        }
        Ok(pipe)
    }

    /// Returns an **empty** pipe to the pool (the caller guarantees it holds no bytes).
    pub fn put_empty(&mut self, pipe: Pipe) {
        if self.free.len() < self.max_free {
            self.free.push(pipe);
        }
    }

    pub fn idle(&self) -> usize {
        self.free.len()
    }
}

/// What a pump needs before it can make progress again.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PumpStatus {
    /// Waiting for the source to become readable.
    WantRead,
    /// Waiting for the destination to become writable (the pipe holds bytes).
    WantWrite,
    /// The budget for this wakeup is used up; call again soon without waiting.
    Yield,
    /// Source reached EOF, every byte was delivered and the destination was shut for writing.
    Done,
}

/// Which end failed, with the errno: a reset (or any error) on one side becomes a reset on the other.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PumpError {
    Source(i32),
    Destination(i32),
    /// No pipe could be had (fd or memory exhaustion): a kernel resource problem.
    Pipe(i32),
}

/// One direction of a flow.
#[derive(Debug)]
pub struct Pump {
    pipe: Option<Pipe>,
    /// What the last call ended waiting for: a direction not pumped on a wakeup (the event was
    /// for the other one) still knows what it waits for.
    last: PumpStatus,
    /// Bytes in the pipe not yet written to the destination.
    pending: usize,
    src_eof: bool,
    done: bool,
    /// Bytes delivered to the destination since the flow began.
    pub delivered: u64,
}

impl Default for Pump {
    fn default() -> Self {
        Pump {
            pipe: None,
            last: PumpStatus::WantRead,
            pending: 0,
            src_eof: false,
            done: false,
            delivered: 0,
        }
    }
}

/// Bytes a pump moved in one call, reported as they are delivered (never only at the end).
#[derive(Debug, Default, Clone, Copy)]
pub struct Moved(pub u64);

impl Pump {
    pub fn is_done(&self) -> bool {
        self.done
    }

    /// True while the source has not reached EOF (the flow should watch it for readability).
    pub fn src_open(&self) -> bool {
        !self.src_eof
    }

    pub fn pending(&self) -> usize {
        self.pending
    }

    /// What the last [`Pump::pump`] call ended waiting for.
    pub fn last_status(&self) -> PumpStatus {
        self.last
    }

    /// Moves bytes from `src` to `dst` until one side would block, EOF is delivered, or `budget`
    /// bytes have been read this call. Bytes delivered are added to `moved`.
    ///
    /// `short_read_drains`: the caller's readiness is checked afresh when re-armed (io_uring's
    /// one-shot poll completes at once if data is already there), so a read that returned less
    /// than the pipe had room for is taken to mean "source drained" and the pump waits instead
    /// of making one more splice that would return EAGAIN. With edge-triggered epoll a short read
    /// caused by a pipe full by slots would never be signalled again, so epoll passes false.
    pub fn pump(
        &mut self,
        src: RawFd,
        dst: RawFd,
        pool: &mut PipePool,
        budget: usize,
        short_read_drains: bool,
        moved: &mut Moved,
    ) -> Result<PumpStatus, PumpError> {
        let r = self.pump_inner(src, dst, pool, budget, short_read_drains, moved);
        if let Ok(status) = r {
            self.last = status;
        }
        r
    }

    fn pump_inner(
        &mut self,
        src: RawFd,
        dst: RawFd,
        pool: &mut PipePool,
        budget: usize,
        short_read_drains: bool,
        moved: &mut Moved,
    ) -> Result<PumpStatus, PumpError> {
        if self.done {
            return Ok(PumpStatus::Done);
        }
        let mut read_this_call = 0usize;
        let mut drained = false;
        loop {
            if self.pending > 0 {
                let pipe = self.pipe.as_ref().expect("pending bytes live in a pipe");
                match splice(pipe.read.as_raw_fd(), dst, self.pending) {
                    Ok(0) => return Ok(PumpStatus::WantWrite),
                    Ok(n) => {
                        self.pending -= n;
                        self.delivered += n as u64;
                        moved.0 += n as u64;
                    }
                    Err(e) if e.raw_os_error() == Some(libc::EAGAIN) => {
                        return Ok(PumpStatus::WantWrite)
                    }
                    Err(e) if e.raw_os_error() == Some(libc::EINTR) => continue,
                    Err(e) => return Err(PumpError::Destination(errno(&e))),
                }
                if self.pending > 0 {
                    continue;
                }
            }
            if self.src_eof {
                // Everything read was delivered: pass the half-close on, keep the other
                // direction flowing.
                if let Err(e) = sys::socket::shutdown_write(dst) {
                    if e.raw_os_error() != Some(libc::ENOTCONN) {
                        return Err(PumpError::Destination(errno(&e)));
                    }
                }
                self.done = true;
                if let Some(pipe) = self.pipe.take() {
                    pool.put_empty(pipe);
                }
                return Ok(PumpStatus::Done);
            }
            if drained {
                return Ok(self.wait_for_source(pool));
            }
            if read_this_call >= budget {
                return Ok(PumpStatus::Yield);
            }
            if self.pipe.is_none() {
                self.pipe = Some(pool.get().map_err(|e| PumpError::Pipe(errno(&e)))?);
            }
            let pipe = self.pipe.as_ref().expect("just ensured");
            let room = pipe.capacity - self.pending;
            match splice(src, pipe.write.as_raw_fd(), room) {
                Ok(0) => self.src_eof = true,
                Ok(n) => {
                    self.pending += n;
                    read_this_call += n;
                    drained = short_read_drains && n < room;
                }
                Err(e) if e.raw_os_error() == Some(libc::EAGAIN) => {
                    if self.pending == 0 {
                        return Ok(self.wait_for_source(pool));
                    }
                    // The pipe may be full by slots rather than bytes: drain it first.
                }
                Err(e) if e.raw_os_error() == Some(libc::EINTR) => {}
                Err(e) => return Err(PumpError::Source(errno(&e))),
            }
        }
    }

    /// The pipe is empty and the source has nothing now: the pipe goes back to the pool, so
    /// a flow that waits for bytes holds no pipe (the next readable source takes one again,
    /// from the pool without a syscall while it has any).
    fn wait_for_source(&mut self, pool: &mut PipePool) -> PumpStatus {
        debug_assert_eq!(self.pending, 0);
        if let Some(pipe) = self.pipe.take() {
            pool.put_empty(pipe);
        }
        PumpStatus::WantRead
    }

    /// Whether the pump holds a pipe (only while bytes are in flight, or between two calls
    /// of one wakeup's budget).
    pub fn holds_pipe(&self) -> bool {
        self.pipe.is_some()
    }

    /// Gives the pipe back if it is empty, or closes it if it may still hold bytes.
    pub fn release(&mut self, pool: &mut PipePool) {
        if let Some(pipe) = self.pipe.take() {
            if self.pending == 0 {
                pool.put_empty(pipe);
            }
        }
    }
}

fn errno(e: &io::Error) -> i32 {
    e.raw_os_error().unwrap_or(libc::EIO)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{Read, Write};
    use std::net::Shutdown;
    use std::os::fd::AsRawFd;

    use crate::data_plane::socket::tcp_pair;

    #[test]
    fn pump_delivers_every_byte_then_half_closes_destination() {
        for short in [false, true] {
            pump_delivers_every_byte(short);
        }
    }

    fn pump_delivers_every_byte(short: bool) {
        let (mut client, proxy_in) = tcp_pair();
        let (proxy_out, mut server) = tcp_pair();
        proxy_in.set_nonblocking(true).unwrap();
        proxy_out.set_nonblocking(true).unwrap();
        let data: Vec<u8> = (0..3_000_000u32).map(|i| (i * 7 % 251) as u8).collect();
        let writer = {
            let data = data.clone();
            std::thread::spawn(move || {
                client.write_all(&data).unwrap();
                client.shutdown(Shutdown::Write).unwrap();
                client
            })
        };
        let reader = std::thread::spawn(move || {
            let mut got = Vec::new();
            server.read_to_end(&mut got).unwrap();
            got
        });
        let mut pool = PipePool::new(65536, 4);
        let mut pump = Pump::default();
        let mut moved = Moved::default();
        loop {
            match pump.pump(
                proxy_in.as_raw_fd(),
                proxy_out.as_raw_fd(),
                &mut pool,
                1 << 20,
                short,
                &mut moved,
            ) {
                Ok(PumpStatus::Done) => break,
                Ok(_) => std::thread::sleep(std::time::Duration::from_micros(200)),
                Err(e) => panic!("pump failed: {e:?}"),
            }
        }
        let _client = writer.join().unwrap();
        assert_eq!(reader.join().unwrap(), data);
        assert_eq!(moved.0, data.len() as u64);
        assert_eq!(pool.idle(), 1, "an empty pipe goes back to the pool");
    }

    #[test]
    fn a_pump_waiting_for_its_source_holds_no_pipe() {
        let (mut client, proxy_in) = tcp_pair();
        let (proxy_out, mut server) = tcp_pair();
        proxy_in.set_nonblocking(true).unwrap();
        proxy_out.set_nonblocking(true).unwrap();
        let mut pool = PipePool::new(65536, 4);
        let mut pump = Pump::default();
        for (round, short) in [(1u8, false), (2, true)] {
            client.write_all(&[round; 1000]).unwrap();
            std::thread::sleep(std::time::Duration::from_millis(20));
            let status = pump
                .pump(
                    proxy_in.as_raw_fd(),
                    proxy_out.as_raw_fd(),
                    &mut pool,
                    1 << 20,
                    short,
                    &mut Moved::default(),
                )
                .unwrap();
            assert_eq!(status, PumpStatus::WantRead);
            assert!(!pump.holds_pipe(), "an idle flow's pump holds no pipe");
            assert_eq!(pool.idle(), 1, "its pipe went back to the pool");
            let mut got = [0u8; 1000];
            server.read_exact(&mut got).unwrap();
            assert_eq!(got, [round; 1000]);
        }
        assert_eq!(pool.created, 1, "the second wakeup reused the pooled pipe");
    }

    #[test]
    fn a_pipe_holding_bytes_is_never_reused() {
        let mut pool = PipePool::new(65536, 4);
        let mut pump = Pump {
            pipe: Some(pool.get().unwrap()),
            pending: 10,
            ..Pump::default()
        };
        pump.release(&mut pool);
        assert_eq!(pool.idle(), 0);
    }
}
