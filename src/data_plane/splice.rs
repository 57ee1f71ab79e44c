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
use std::sync::atomic::{AtomicUsize, Ordering::Relaxed};
use std::sync::Arc;

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
    /// The count of its pool's pipes in existence, if it came from a pool: dropping the pipe
    /// (pooled, or closed because it may hold bytes) gives its place in the budget back, so no
    /// path that lets a pipe go can leak budget.
    live: Option<Arc<AtomicUsize>>,
}

impl Drop for Pipe {
    fn drop(&mut self) {
        if let Some(live) = &self.live {
            live.fetch_sub(1, Relaxed);
        }
    }
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
                live: None,
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

/// Why a caller got no pipe.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NoPipe {
    /// Every pipe the reactor's budget allows is carrying bytes: move these by copying.
    Budget,
    /// The kernel refused a new pipe (descriptors or memory): the errno.
    Os(i32),
}

/// Where pipes come from and go back to. `put_empty` must only ever receive empty pipes; a
/// pipe that may hold bytes is dropped (closed) instead.
pub trait PipeSupply {
    type Pipe: SplicePipe;
    fn get(&mut self) -> Result<Self::Pipe, NoPipe>;
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
    fn get(&mut self) -> Result<Pipe, NoPipe> {
        PipePool::get(self)
    }
    fn put_empty(&mut self, pipe: Pipe) {
        PipePool::put_empty(self, pipe)
    }
}

/// One reactor's pipes: at most `budget` in existence (carrying bytes, or empty and kept for
/// reuse), so pipes cost a fixed number of descriptors per reactor however many flows are
/// open; flows take them only while bytes are in flight. Only pipes known to be empty come
/// back here: a pipe that may still hold bytes is closed instead, so no flow ever sees
/// another's data.
#[derive(Debug)]
pub struct PipePool {
    free: Vec<Pipe>,
    max_free: usize,
    pipe_size: usize,
    budget: usize,
    /// Pipes of this pool in existence (each pipe's drop counts itself out).
    live: Arc<AtomicUsize>,
    /// Where a pump copies when no pipe is to be had (allocated on first use).
    scratch: Vec<u8>,
    /// Pipes whose F_SETPIPE_SZ was refused (kept at the kernel default).
    pub resize_refused: u64,
    /// Pipes created since start (not counting reuse).
    pub created: u64,
    /// Times a caller found the budget spent and moved bytes by copying instead.
    pub exhausted: u64,
    /// Times the kernel would not make a pipe (descriptors, `fs.pipe-user-pages-hard`) and
    /// the caller copied instead; the last errno.
    pub refused: u64,
    pub last_refusal: i32,
}

/// What a pump copies at most per `recv`/`send` pair when it has no pipe.
const SCRATCH: usize = 64 << 10;

impl PipePool {
    /// `budget`: pipes this reactor may have at once; `max_free`: empty ones kept for reuse.
    pub fn new(pipe_size: usize, max_free: usize, budget: usize) -> Self {
        PipePool {
            free: Vec::new(),
            max_free: max_free.min(budget),
            pipe_size,
            budget,
            live: Arc::new(AtomicUsize::new(0)),
            scratch: Vec::new(),
            resize_refused: 0,
            created: 0,
            exhausted: 0,
            refused: 0,
            last_refusal: 0,
        }
    }

    pub fn get(&mut self) -> Result<Pipe, NoPipe> {
        if let Some(p) = self.free.pop() {
            return Ok(p);
        }
        if self.live.load(Relaxed) >= self.budget {
            self.exhausted += 1;
            return Err(NoPipe::Budget);
        }
        let (mut pipe, resized) = match Pipe::new(self.pipe_size) {
            Ok(p) => p,
            Err(e) => {
                self.refused += 1;
                self.last_refusal = errno(&e);
                return Err(NoPipe::Os(self.last_refusal));
            }
        };
        self.live.fetch_add(1, Relaxed);
        pipe.live = Some(Arc::clone(&self.live));
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

    /// Empty pipes kept for reuse.
    pub fn idle(&self) -> usize {
        self.free.len()
    }

    /// Pipes carrying bytes now (lent to flows and streams).
    pub fn in_flight(&self) -> usize {
        self.live.load(Relaxed) - self.free.len()
    }

    pub fn budget(&self) -> usize {
        self.budget
    }

    fn scratch(&mut self) -> &mut [u8] {
        if self.scratch.is_empty() {
            self.scratch = vec![0; SCRATCH];
        }
        &mut self.scratch
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
                match pool.get() {
                    Ok(pipe) => self.pipe = Some(pipe),
                    // Every pipe busy, or the kernel would not make one (the pool counts
                    // which): this wakeup copies instead, and the flow goes on.
                    Err(NoPipe::Budget | NoPipe::Os(_)) => {
                        let left = budget - read_this_call;
                        match self.copy_without_pipe(src, dst, pool, left, moved)? {
                            Some(status) => return Ok(status),
                            // EOF: delivered above, like a spliced one.
                            None => continue,
                        }
                    }
                }
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

    /// No pipe to be had: this wakeup's bytes go through user space instead, without being
    /// held there. Each round peeks at what the source has, sends what the destination takes,
    /// and only then drops exactly that much from the source, so what the destination refused
    /// stays in the source's receive queue (and its window) and the pump holds no bytes and no
    /// buffer between calls. `None` when the source reached EOF with everything before it
    /// delivered (the caller passes the half-close on).
    fn copy_without_pipe(
        &mut self,
        src: RawFd,
        dst: RawFd,
        pool: &mut PipePool,
        budget: usize,
        moved: &mut Moved,
    ) -> Result<Option<PumpStatus>, PumpError> {
        debug_assert_eq!(self.pending, 0);
        let scratch = pool.scratch();
        let mut copied = 0usize;
        loop {
            if copied >= budget {
                return Ok(Some(PumpStatus::Yield));
            }
            let n = match sys::socket::peek_nonblocking(src, scratch) {
                Ok(0) => {
                    self.src_eof = true;
                    return Ok(None);
                }
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    return Ok(Some(PumpStatus::WantRead))
                }
                Err(e) => return Err(PumpError::Source(errno(&e))),
            };
            let sent = match sys::socket::send_nonblocking(dst, &scratch[..n]) {
                Ok(k) => k,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    return Ok(Some(PumpStatus::WantWrite))
                }
                Err(e) => return Err(PumpError::Destination(errno(&e))),
            };
            // The peeked bytes are in the queue until this takes them: it cannot come short.
            let dropped = sys::socket::discard(src, &mut scratch[..sent])
                .map_err(|e| PumpError::Source(errno(&e)))?;
            debug_assert_eq!(dropped, sent);
            self.delivered += sent as u64;
            moved.0 += sent as u64;
            copied += sent;
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
            pump_delivers_every_byte(short, 64);
        }
    }

    /// With no pipe to be had (a budget of 0: every pipe busy), the pump copies, and still
    /// delivers every byte in order and the half-close, holding nothing between calls.
    #[test]
    fn pump_without_a_pipe_copies_every_byte_then_half_closes_destination() {
        for short in [false, true] {
            pump_delivers_every_byte(short, 0);
        }
    }

    fn pump_delivers_every_byte(short: bool, pipes: usize) {
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
        let mut pool = PipePool::new(65536, 4, pipes);
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
        if pipes > 0 {
            assert_eq!(pool.idle(), 1, "an empty pipe goes back to the pool");
            assert_eq!(pool.exhausted, 0);
        } else {
            assert_eq!(pool.created, 0);
            assert!(pool.exhausted > 0, "the copies are counted");
        }
        assert_eq!(pool.in_flight(), 0);
    }

    #[test]
    fn a_pool_never_has_more_pipes_than_its_budget() {
        let mut pool = PipePool::new(65536, 4, 2);
        let a = pool.get().unwrap();
        let b = pool.get().unwrap();
        assert_eq!(pool.get().unwrap_err(), NoPipe::Budget);
        assert_eq!((pool.in_flight(), pool.exhausted), (2, 1));
        // A pipe closed because it may hold bytes gives its place back, as one returned.
        drop(a);
        pool.put_empty(b);
        assert_eq!((pool.in_flight(), pool.idle()), (0, 1));
        let _c = pool.get().unwrap();
        let _d = pool.get().unwrap();
        assert_eq!(pool.created, 3);
        assert_eq!(pool.get().unwrap_err(), NoPipe::Budget);
    }

    #[test]
    fn a_pump_waiting_for_its_source_holds_no_pipe() {
        let (mut client, proxy_in) = tcp_pair();
        let (proxy_out, mut server) = tcp_pair();
        proxy_in.set_nonblocking(true).unwrap();
        proxy_out.set_nonblocking(true).unwrap();
        let mut pool = PipePool::new(65536, 4, 64);
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
        let mut pool = PipePool::new(65536, 4, 64);
        let mut pump = Pump {
            pipe: Some(pool.get().unwrap()),
            pending: 10,
            ..Pump::default()
        };
        pump.release(&mut pool);
        assert_eq!(pool.idle(), 0);
    }
}
