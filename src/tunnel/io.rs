//! Zero-copy HBONE DATA frames at the socket level: the header is written from user space, the
//! payload only ever moves by `splice(2)` between sockets and pipes.
//!
//! DESIGN.md §2: on a tunnel the proxy writes the 9-byte HTTP/2 DATA frame header and splices
//! the payload, which kTLS encrypts in the kernel. This module is the mechanics of that trick and
//! nothing more: [`FrameSender`] moves one stream's bytes from the captured socket through a pipe
//! into the tunnel as DATA frames, [`FrameReceiver`] reads frames off the tunnel and moves each
//! DATA payload into its stream's [`StreamSink`] (a pipe toward the destination socket, with a
//! bounded user-space spill buffer when the pipe cannot take a frame, so the tunnel never blocks
//! on one slow stream). Its boundary: it owns no socket and no session. The HTTP/2 session
//! (`hbone-proto`) is reached through two small traits — [`DataFrameHeaders`] hands out headers
//! (and takes flow-control credit) on the send side, [`FrameHandler`] receives every byte that is
//! not spliced payload on the receive side — so the reactor drives both with the session and the
//! tests drive them without one. Sockets are non-blocking; every call moves what it can and says
//! what it waits for, like [`Pump`](crate::data_plane::splice::Pump). Nothing here is wired into the reactor
//! yet.
//!
//! **The tunnel writer owns the socket for the duration of a frame.** Once a sender has taken a
//! header ([`FrameSender::mid_frame`] is true) nothing else — no other stream's sender, no
//! `poll_transmit` bytes of the session — may write to the tunnel socket until that sender has
//! written the rest of the header and exactly the announced payload. The caller serialises
//! writers; the sender only guarantees it never starts a new frame before the current one is
//! complete.
//!
//! Pipes come through [`PipeSupply`] (the reactor's [`PipePool`], whose rule holds here too:
//! only empty pipes go back; a pipe that may hold bytes is closed).

use std::collections::VecDeque;
use std::io;
use std::os::fd::RawFd;

use hbone_proto::frame::{flags, FrameHeader, FrameType, FRAME_HEADER_LEN, MAX_MAX_FRAME_SIZE};
use hbone_proto::StreamId;

use crate::data_plane::splice::{PipeSupply, SplicePipe};
use crate::tls::ktls;

// ------------------------------------------------------------------------------------------ pipes

// -------------------------------------------------------------------------------------- syscalls

/// Runs a syscall returning ssize_t, retrying EINTR.
fn retry(mut call: impl FnMut() -> isize) -> io::Result<usize> {
    loop {
        let n = call();
        if n >= 0 {
            return Ok(n as usize);
        }
        let e = io::Error::last_os_error();
        if e.raw_os_error() != Some(libc::EINTR) {
            return Err(e);
        }
    }
}

/// `splice(2)` as the plain fast path does it, with EINTR retried.
fn splice(from: RawFd, to: RawFd, len: usize) -> io::Result<usize> {
    loop {
        match crate::data_plane::splice::splice(from, to, len) {
            Err(e) if e.raw_os_error() == Some(libc::EINTR) => continue,
            r => return r,
        }
    }
}

fn send(fd: RawFd, buf: &[u8], more: bool) -> io::Result<usize> {
    let flags = libc::MSG_NOSIGNAL | libc::MSG_DONTWAIT | if more { libc::MSG_MORE } else { 0 };
    retry(|| {
        // SAFETY: `buf` is a live slice; the kernel reads at most `buf.len()` bytes from it.
        unsafe { libc::send(fd, buf.as_ptr().cast(), buf.len(), flags) }
    })
}

/// True if the pipe has at least one free slot (POLLOUT), i.e. a splice into it that returned
/// EAGAIN was waiting on its source, not on the pipe.
fn pipe_writable(write_fd: RawFd) -> bool {
    let mut pfd = libc::pollfd {
        fd: write_fd,
        events: libc::POLLOUT,
        revents: 0,
    };
    // SAFETY: one valid pollfd, timeout 0: never blocks.
    let rc = unsafe { libc::poll(&mut pfd, 1, 0) };
    rc > 0 && pfd.revents & libc::POLLOUT != 0
}

fn errno(e: &io::Error) -> i32 {
    e.raw_os_error().unwrap_or(libc::EIO)
}

fn is_eagain(e: &io::Error) -> bool {
    e.raw_os_error() == Some(libc::EAGAIN)
}

// ----------------------------------------------------------------------------------- size policy

/// Plaintext bytes in one full TLS record.
pub const TLS_RECORD_PAYLOAD: usize = ktls::MAX_RECORD_PAYLOAD;

/// The payload length of the next DATA frame: `min(pipe bytes, peer MAX_FRAME_SIZE, credit)`.
/// With kTLS, a frame that can fill at least one record is cut to the largest
/// `k·16384 − 9` bytes, so header and payload fill exactly `k` records (DESIGN.md §2); a shorter
/// tail is sent as it is rather than held back.
pub fn frame_payload_len(pipe_bytes: usize, max_frame: usize, credit: usize, ktls: bool) -> usize {
    let n = pipe_bytes
        .min(max_frame)
        .min(credit)
        .min(MAX_MAX_FRAME_SIZE as usize);
    if !ktls {
        return n;
    }
    let records = (n + FRAME_HEADER_LEN) / TLS_RECORD_PAYLOAD;
    if records == 0 {
        n
    } else {
        records * TLS_RECORD_PAYLOAD - FRAME_HEADER_LEN
    }
}

// ------------------------------------------------------------------------------------ send side

/// The session side of sending one stream: the reactor implements it over
/// `hbone_proto::Session` for one stream id.
pub trait DataFrameHeaders {
    /// Payload bytes the windows allow now (`Session::send_capacity(stream)`).
    fn credit(&mut self) -> usize;
    /// The peer's SETTINGS_MAX_FRAME_SIZE (`Session::peer_max_frame_size()`).
    fn max_frame_size(&mut self) -> usize;
    /// Takes credit for `len` bytes and returns the header
    /// (`Session::data_frame_header(stream, len, end_stream)`); `None` if the session refuses
    /// (stream reset, transmit queue not drained, ...).
    fn data_frame_header(&mut self, len: usize, end_stream: bool)
        -> Option<[u8; FRAME_HEADER_LEN]>;
}

/// What a sender needs before it can make progress again.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SendStatus {
    /// The source socket has nothing more for now.
    WantRead,
    /// The tunnel socket is full (possibly mid-frame: then nothing else may write to it).
    WantWrite,
    /// Bytes wait in the pipe but the flow-control windows are closed (`Event::SendCapacity`).
    WantCredit,
    /// The read budget for this call is used up; call again soon.
    Yield,
    /// The source reached EOF and the frame carrying END_STREAM is written.
    Done,
}

/// Which side failed, with the errno.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SendError {
    Source(i32),
    Tunnel(i32),
    /// No pipe could be had.
    Pipe(i32),
    /// The session refused to give a header; the caller asks it why.
    HeaderRefused,
}

/// Counters of one sender.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct SendStats {
    pub frames: u64,
    pub payload_bytes: u64,
    /// Times the tunnel returned EAGAIN while a frame was committed (resumed on a later call).
    pub stalls_mid_frame: u64,
}

#[derive(Debug, Clone, Copy)]
enum OutFrame {
    Idle,
    Header {
        bytes: [u8; FRAME_HEADER_LEN],
        written: usize,
        payload: usize,
        end: bool,
    },
    Payload {
        left: usize,
        end: bool,
    },
}

/// One stream's sending direction: captured socket → pipe → DATA frames on the tunnel.
#[derive(Debug)]
pub struct FrameSender<P> {
    pipe: Option<P>,
    /// Bytes in the pipe (including the committed payload of the frame in progress).
    pending: usize,
    src_eof: bool,
    done: bool,
    ktls: bool,
    frame: OutFrame,
    pub stats: SendStats,
}

impl<P: SplicePipe> FrameSender<P> {
    /// `ktls`: align frames with TLS records ([`frame_payload_len`]).
    pub fn new(ktls: bool) -> Self {
        FrameSender {
            pipe: None,
            pending: 0,
            src_eof: false,
            done: false,
            ktls,
            frame: OutFrame::Idle,
            stats: SendStats::default(),
        }
    }

    /// True while a frame is committed and not completely written: the tunnel belongs to this
    /// sender until it is false again.
    pub fn mid_frame(&self) -> bool {
        !matches!(self.frame, OutFrame::Idle)
    }

    /// Bytes read from the source and not yet written to the tunnel.
    pub fn pending(&self) -> usize {
        self.pending
    }

    pub fn is_done(&self) -> bool {
        self.done
    }

    /// Moves bytes from `src` into DATA frames on `tunnel` until something would block, the
    /// END_STREAM frame is written, or `budget` bytes were read from `src` in this call.
    /// A frame left incomplete by EAGAIN is resumed first on the next call.
    pub fn send<S, H>(
        &mut self,
        src: RawFd,
        tunnel: RawFd,
        pool: &mut S,
        headers: &mut H,
        budget: usize,
    ) -> Result<SendStatus, SendError>
    where
        S: PipeSupply<Pipe = P>,
        H: DataFrameHeaders,
    {
        if self.done {
            return Ok(SendStatus::Done);
        }
        let mut read = 0usize;
        // `pending` when a read last returned EAGAIN with bytes in the pipe: the pipe may be
        // full by slots, so read again only once some bytes have left it.
        let mut blocked_at: Option<usize> = None;
        loop {
            // 1. Finish the frame in progress; nothing else until it is complete.
            match self.frame {
                OutFrame::Header {
                    bytes,
                    written,
                    payload,
                    end,
                } => {
                    match send(tunnel, &bytes[written..], payload > 0) {
                        Ok(n) => {
                            let written = written + n;
                            self.frame = if written < FRAME_HEADER_LEN {
                                OutFrame::Header {
                                    bytes,
                                    written,
                                    payload,
                                    end,
                                }
                            } else if payload > 0 {
                                OutFrame::Payload { left: payload, end }
                            } else {
                                OutFrame::Idle
                            };
                            if matches!(self.frame, OutFrame::Idle) && end {
                                return Ok(self.finish(pool));
                            }
                        }
                        Err(e) if is_eagain(&e) => {
                            self.stats.stalls_mid_frame += 1;
                            return Ok(SendStatus::WantWrite);
                        }
                        Err(e) => return Err(SendError::Tunnel(errno(&e))),
                    }
                    continue;
                }
                OutFrame::Payload { left, end } => {
                    let pipe = self
                        .pipe
                        .as_ref()
                        .expect("committed payload lives in the pipe");
                    match splice(pipe.read_fd(), tunnel, left) {
                        // A pipe holding bytes never reads as EOF; guard against spinning.
                        Ok(0) => return Err(SendError::Tunnel(libc::EIO)),
                        Ok(n) => {
                            self.pending -= n;
                            self.stats.payload_bytes += n as u64;
                            let left = left - n;
                            if left > 0 {
                                self.frame = OutFrame::Payload { left, end };
                            } else {
                                self.frame = OutFrame::Idle;
                                if end {
                                    return Ok(self.finish(pool));
                                }
                            }
                        }
                        Err(e) if is_eagain(&e) => {
                            self.stats.stalls_mid_frame += 1;
                            return Ok(SendStatus::WantWrite);
                        }
                        Err(e) => return Err(SendError::Tunnel(errno(&e))),
                    }
                    continue;
                }
                OutFrame::Idle => {}
            }

            // 2. Fill the pipe from the source.
            let may_read = blocked_at.is_none_or(|at| self.pending < at);
            if !self.src_eof && read < budget && may_read {
                if self.pipe.is_none() {
                    self.pipe = Some(pool.get().map_err(|e| SendError::Pipe(errno(&e)))?);
                }
                let pipe = self.pipe.as_ref().expect("just ensured");
                let room = pipe.capacity().saturating_sub(self.pending);
                if room > 0 {
                    match splice(src, pipe.write_fd(), room) {
                        Ok(0) => self.src_eof = true,
                        Ok(n) => {
                            self.pending += n;
                            read += n;
                            blocked_at = None;
                        }
                        Err(e) if is_eagain(&e) => {
                            if self.pending == 0 {
                                return Ok(SendStatus::WantRead);
                            }
                            blocked_at = Some(self.pending);
                        }
                        Err(e) => return Err(SendError::Source(errno(&e))),
                    }
                }
            }

            // 3. Commit the next frame.
            if self.pending > 0 {
                let credit = headers.credit();
                let len =
                    frame_payload_len(self.pending, headers.max_frame_size(), credit, self.ktls);
                if len == 0 {
                    return Ok(SendStatus::WantCredit);
                }
                let end = self.src_eof && len == self.pending;
                self.commit(headers, len, end)?;
                continue;
            }
            if self.src_eof {
                // Everything is written: an empty frame carries END_STREAM (needs no credit).
                self.commit(headers, 0, true)?;
                continue;
            }
            // The pipe is empty and the source open: a read happened and found bytes, so only
            // the budget stops us here.
            return Ok(if read >= budget {
                SendStatus::Yield
            } else {
                SendStatus::WantRead
            });
        }
    }

    fn commit<H: DataFrameHeaders>(
        &mut self,
        headers: &mut H,
        len: usize,
        end: bool,
    ) -> Result<(), SendError> {
        let bytes = headers
            .data_frame_header(len, end)
            .ok_or(SendError::HeaderRefused)?;
        self.stats.frames += 1;
        self.frame = OutFrame::Header {
            bytes,
            written: 0,
            payload: len,
            end,
        };
        Ok(())
    }

    fn finish<S: PipeSupply<Pipe = P>>(&mut self, pool: &mut S) -> SendStatus {
        self.done = true;
        self.release(pool);
        SendStatus::Done
    }

    /// Gives the pipe back if it is empty, or closes it if it may still hold bytes.
    pub fn release<S: PipeSupply<Pipe = P>>(&mut self, pool: &mut S) {
        if let Some(pipe) = self.pipe.take() {
            if self.pending == 0 {
                pool.put_empty(pipe);
            }
        }
    }
}

// ------------------------------------------------------------------------------------ sink side

/// What a sink waits for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FlushStatus {
    /// Everything received was delivered.
    Empty,
    /// Bytes wait for the destination to become writable.
    WantWrite,
}

/// The destination socket of a stream failed (errno); the stream should be reset.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SinkError(pub i32);

/// One stream's receiving end: its pipe toward the destination socket, and the spill buffer
/// used for frames the pipe could not take. Bytes leave in order: pipe first, then spill; while
/// the spill holds bytes every new payload goes behind them.
#[derive(Debug)]
pub struct StreamSink<P> {
    dst: RawFd,
    pipe: Option<P>,
    in_pipe: usize,
    spill: VecDeque<u8>,
    max_spill: usize,
    /// Bytes delivered (or dropped after a failure) not yet reported by `take_delivered`.
    unreported: usize,
    failed: Option<i32>,
    /// Bytes delivered to the destination since the stream began.
    pub delivered: u64,
}

impl<P: SplicePipe> StreamSink<P> {
    /// `dst` stays owned by the caller and must outlive the sink's use. `max_spill` bounds the
    /// user-space buffer; give it the stream's receive window (a peer within flow control can
    /// never exceed it).
    pub fn new(dst: RawFd, max_spill: usize) -> Self {
        StreamSink {
            dst,
            pipe: None,
            in_pipe: 0,
            spill: VecDeque::new(),
            max_spill,
            unreported: 0,
            failed: None,
            delivered: 0,
        }
    }

    /// Bytes received and not yet delivered (pipe and spill).
    pub fn buffered(&self) -> usize {
        self.in_pipe + self.spill.len()
    }

    pub fn spilled(&self) -> usize {
        self.spill.len()
    }

    /// The errno of a destination failure, once one happened.
    pub fn failed(&self) -> Option<i32> {
        self.failed
    }

    /// Bytes that left toward the destination since the last call: give them back to the peer
    /// with `Session::release_capacity(stream, n)` (never before they left).
    pub fn take_delivered(&mut self) -> usize {
        std::mem::take(&mut self.unreported)
    }

    /// Writes what it holds to the destination until it would block.
    pub fn flush(&mut self) -> Result<FlushStatus, SinkError> {
        if let Some(e) = self.failed {
            return Err(SinkError(e));
        }
        loop {
            let r = if self.in_pipe > 0 {
                let pipe = self.pipe.as_ref().expect("bytes in a pipe");
                splice(pipe.read_fd(), self.dst, self.in_pipe).map(|n| (n, true))
            } else if !self.spill.is_empty() {
                let (front, _) = self.spill.as_slices();
                send(self.dst, front, false).map(|n| (n, false))
            } else {
                return Ok(FlushStatus::Empty);
            };
            match r {
                Ok((0, _)) => return Ok(FlushStatus::WantWrite),
                Ok((n, from_pipe)) => {
                    if from_pipe {
                        self.in_pipe -= n;
                    } else {
                        self.spill.drain(..n);
                    }
                    self.delivered += n as u64;
                    self.unreported += n;
                }
                Err(e) if is_eagain(&e) => return Ok(FlushStatus::WantWrite),
                Err(e) => {
                    let e = errno(&e);
                    self.failed = Some(e);
                    return Err(SinkError(e));
                }
            }
        }
    }

    /// Takes payload of this stream that came through user space rather than the receiver
    /// (bytes read before the stream had its sink, or by the tunnel's copy path before the
    /// zero-copy receiver took over). It goes behind everything the sink holds: once a stream
    /// has a sink, the sink is its only queue toward the destination, so its bytes leave in
    /// the order they arrived whichever path each frame took. Never more than the stream's
    /// receive window (the session enforces it), so the spill bound is not checked here. After
    /// a destination failure the bytes are dropped and reported as delivered (credit back).
    pub fn push_copied(&mut self, bytes: &[u8]) {
        if self.failed.is_some() {
            self.unreported += bytes.len();
            return;
        }
        self.spill.extend(bytes);
        self.opportunistic_flush();
    }

    /// Gives the pipe back if it is empty, or closes it if it may still hold bytes.
    pub fn release<S: PipeSupply<Pipe = P>>(&mut self, pool: &mut S) {
        if let Some(pipe) = self.pipe.take() {
            if self.in_pipe == 0 {
                pool.put_empty(pipe);
            }
        }
        self.spill = VecDeque::new();
    }

    fn opportunistic_flush(&mut self) {
        // A failure is recorded in `failed`; the tunnel carries on.
        let _ = self.flush();
    }
}

// --------------------------------------------------------------------------------- receive side

/// The session side of receiving: the reactor implements it over `hbone_proto::Session` and
/// its flows.
pub trait FrameHandler<P> {
    /// Bytes that are not spliced payload, in tunnel order: every frame header, whole non-DATA
    /// frames, a PADDED frame's Pad Length byte and padding, and the payload of DATA frames for
    /// which [`sink`](Self::sink) said `None`. Pass them to `Session::handle_input`; `Err` if the
    /// session failed the connection.
    fn frame_bytes(&mut self, bytes: &[u8]) -> Result<(), HandlerError>;
    /// Where `stream`'s payload goes (asked right after its header went to `frame_bytes`), or
    /// `None` if the session skips it (`Session::pending_payload()` does not name the stream).
    fn sink(&mut self, stream: StreamId) -> Option<&mut StreamSink<P>>;
    /// `n` payload bytes of `stream` were moved to its sink (`Session::data_consumed`).
    fn payload_moved(&mut self, stream: StreamId, n: usize) -> Result<(), HandlerError>;
    /// A non-application-data TLS record from a kTLS socket (judge with
    /// `ktls::control_record`); never called on a plain socket.
    fn tls_record(&mut self, record_type: u8, payload: &[u8]) -> Result<(), HandlerError>;
}

/// The handler refused input (the session closed the connection; it knows why).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HandlerError;

/// What the receiver waits for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RecvStatus {
    /// The tunnel has nothing more for now.
    WantRead,
    /// The budget for this call is used up; call again soon.
    Yield,
    /// The peer closed the tunnel between frames.
    Eof,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RecvError {
    Tunnel(i32),
    Pipe(i32),
    /// EOF inside a frame.
    Truncated,
    /// A frame longer than the limit the receiver was built with (our MAX_FRAME_SIZE).
    FrameTooLarge(u32),
    /// A stream's spill buffer would exceed its bound (the peer ignored flow control).
    SpillLimit(StreamId),
    /// A PADDED frame whose padding is longer than its payload.
    BadPadding,
    Handler,
}

impl From<HandlerError> for RecvError {
    fn from(_: HandlerError) -> Self {
        RecvError::Handler
    }
}

/// Counters of one receiver: the zero-copy path and the fallback, both counted.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct RecvStats {
    /// DATA frames whose payload went (at least in part) through a pipe.
    pub spliced_frames: u64,
    pub spliced_bytes: u64,
    /// DATA frames whose payload went (at least in part) through a spill buffer: the pipe
    /// could not take it, the stream already had spilled bytes, or the frame was PADDED.
    pub buffered_frames: u64,
    pub buffered_bytes: u64,
    /// Frames that started in the pipe and finished in the spill buffer (the pipe filled).
    pub switched_mid_frame: u64,
    pub padded_frames: u64,
    /// Non-DATA frames handed to the handler.
    pub control_frames: u64,
    /// DATA payload bytes of streams without a sink, handed to the handler.
    pub skipped_bytes: u64,
    /// Payload bytes of a failed sink, read and dropped.
    pub dropped_bytes: u64,
    pub tls_records: u64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Mode {
    Pipe,
    Spill,
    /// The sink failed or vanished: read and drop (still reported as moved).
    Drop,
}

#[derive(Debug, Clone, Copy)]
enum InFrame {
    Header,
    /// A non-DATA frame: its bytes accumulate in `frame_buf`.
    Control {
        total: usize,
    },
    /// A PADDED DATA frame, read whole into `frame_buf`.
    Padded {
        stream: StreamId,
        len: usize,
    },
    Payload {
        stream: StreamId,
        left: usize,
        mode: Mode,
    },
    /// DATA for a stream without a sink: bytes go to the handler.
    Skip {
        left: usize,
    },
}

/// The tunnel's reading direction: frame headers into user space, DATA payloads into their
/// streams' sinks.
#[derive(Debug)]
pub struct FrameReceiver {
    state: InFrame,
    hdr: [u8; FRAME_HEADER_LEN],
    hdr_len: usize,
    frame_buf: Vec<u8>,
    scratch: Vec<u8>,
    control: Vec<u8>,
    max_frame: usize,
    ktls: bool,
    pub stats: RecvStats,
}

const SCRATCH: usize = 64 * 1024;

impl FrameReceiver {
    /// `max_frame`: the MAX_FRAME_SIZE we advertised (bounds the frame buffer). `ktls`: the
    /// tunnel socket has TLS_RX (control records arrive as cmsgs; a splice that meets one
    /// fails with EINVAL and that chunk is read through user space instead).
    pub fn new(max_frame: usize, ktls: bool) -> Self {
        FrameReceiver {
            state: InFrame::Header,
            hdr: [0; FRAME_HEADER_LEN],
            hdr_len: 0,
            frame_buf: Vec::new(),
            scratch: vec![0; SCRATCH],
            control: Vec::new(),
            max_frame,
            ktls,
            stats: RecvStats::default(),
        }
    }

    /// Where the receiver is, for logs: the frame part it waits for.
    pub fn describe(&self) -> String {
        format!("{:?}, {} header bytes", self.state, self.hdr_len)
    }

    /// True between frames.
    pub fn at_frame_boundary(&self) -> bool {
        matches!(self.state, InFrame::Header) && self.hdr_len == 0
    }

    /// Reads frames from `tunnel` until it would block, it closes, or about `budget` bytes were
    /// moved in this call. Payload that a stream's pipe cannot take goes to its spill buffer, so
    /// one slow destination never stops the tunnel.
    pub fn poll<S, H>(
        &mut self,
        tunnel: RawFd,
        pool: &mut S,
        handler: &mut H,
        budget: usize,
    ) -> Result<RecvStatus, RecvError>
    where
        S: PipeSupply,
        H: FrameHandler<S::Pipe>,
    {
        let mut moved = 0usize;
        loop {
            if moved >= budget {
                return Ok(RecvStatus::Yield);
            }
            match self.state {
                InFrame::Header => {
                    let want = FRAME_HEADER_LEN - self.hdr_len;
                    let mut hdr = self.hdr;
                    let n = match self.read(tunnel, &mut hdr[self.hdr_len..], handler)? {
                        None => return Ok(RecvStatus::WantRead),
                        Some(0) if self.hdr_len == 0 => return Ok(RecvStatus::Eof),
                        Some(0) => return Err(RecvError::Truncated),
                        Some(n) => n,
                    };
                    debug_assert!(n <= want);
                    self.hdr = hdr;
                    self.hdr_len += n;
                    moved += n;
                    if self.hdr_len == FRAME_HEADER_LEN {
                        self.hdr_len = 0;
                        self.start_frame(pool, handler)?;
                    }
                }
                InFrame::Control { total } | InFrame::Padded { len: total, .. } => {
                    let have = self.frame_buf.len();
                    let want = (total - have).min(SCRATCH);
                    let mut scratch = std::mem::take(&mut self.scratch);
                    let r = self.read(tunnel, &mut scratch[..want], handler);
                    if let Ok(Some(n)) = r {
                        self.frame_buf.extend_from_slice(&scratch[..n]);
                    }
                    self.scratch = scratch;
                    match r? {
                        None => return Ok(RecvStatus::WantRead),
                        Some(0) => return Err(RecvError::Truncated),
                        Some(n) => moved += n,
                    }
                    if self.frame_buf.len() == total {
                        self.end_buffered_frame(handler)?;
                    }
                }
                InFrame::Skip { left } => {
                    let mut scratch = std::mem::take(&mut self.scratch);
                    let want = left.min(SCRATCH);
                    let r = match self.read(tunnel, &mut scratch[..want], handler) {
                        Ok(Some(n)) if n > 0 => handler
                            .frame_bytes(&scratch[..n])
                            .map(|()| Some(n))
                            .map_err(RecvError::from),
                        other => other,
                    };
                    self.scratch = scratch;
                    match r? {
                        None => return Ok(RecvStatus::WantRead),
                        Some(0) => return Err(RecvError::Truncated),
                        Some(n) => {
                            moved += n;
                            self.stats.skipped_bytes += n as u64;
                            self.state = if left == n {
                                InFrame::Header
                            } else {
                                InFrame::Skip { left: left - n }
                            };
                        }
                    }
                }
                InFrame::Payload { stream, left, mode } => {
                    match self.move_payload(tunnel, stream, left, mode, handler)? {
                        None => return Ok(RecvStatus::WantRead),
                        Some(n) => moved += n,
                    }
                }
            }
        }
    }

    /// A complete header is in `self.hdr`: decide where the frame goes.
    fn start_frame<S, H>(&mut self, pool: &mut S, handler: &mut H) -> Result<(), RecvError>
    where
        S: PipeSupply,
        H: FrameHandler<S::Pipe>,
    {
        let header = FrameHeader::decode(&self.hdr).expect("nine bytes");
        let len = header.length as usize;
        if len > self.max_frame {
            return Err(RecvError::FrameTooLarge(header.length));
        }
        if header.kind != FrameType::Data {
            self.frame_buf.clear();
            self.frame_buf.extend_from_slice(&self.hdr);
            self.state = InFrame::Control {
                total: FRAME_HEADER_LEN + len,
            };
            if len == 0 {
                self.end_buffered_frame(handler)?;
            }
            return Ok(());
        }
        handler.frame_bytes(&self.hdr)?;
        let stream = header.stream_id;
        if header.has(flags::PADDED) {
            self.stats.padded_frames += 1;
            self.stats.buffered_frames += 1;
            self.frame_buf.clear();
            self.state = InFrame::Padded { stream, len };
            if len == 0 {
                self.end_buffered_frame(handler)?;
            }
            return Ok(());
        }
        if len == 0 {
            self.state = InFrame::Header;
            return Ok(());
        }
        let Some(sink) = handler.sink(stream) else {
            self.state = InFrame::Skip { left: len };
            return Ok(());
        };
        sink.opportunistic_flush();
        let mode = if sink.failed.is_some() {
            Mode::Drop
        } else if !sink.spill.is_empty() {
            Mode::Spill
        } else {
            if sink.pipe.is_none() {
                sink.pipe = Some(pool.get().map_err(|e| RecvError::Pipe(errno(&e)))?);
            }
            let cap = sink.pipe.as_ref().expect("just ensured").capacity();
            if len <= cap.saturating_sub(sink.in_pipe) {
                Mode::Pipe
            } else {
                Mode::Spill
            }
        };
        if mode == Mode::Spill {
            if sink.spill.len() + len > sink.max_spill {
                return Err(RecvError::SpillLimit(stream));
            }
            self.stats.buffered_frames += 1;
        } else if mode == Mode::Pipe {
            self.stats.spliced_frames += 1;
        }
        self.state = InFrame::Payload {
            stream,
            left: len,
            mode,
        };
        Ok(())
    }

    /// A non-DATA or PADDED frame is complete in `frame_buf`.
    fn end_buffered_frame<P, H: FrameHandler<P>>(
        &mut self,
        handler: &mut H,
    ) -> Result<(), RecvError>
    where
        P: SplicePipe,
    {
        let state = std::mem::replace(&mut self.state, InFrame::Header);
        let frame = std::mem::take(&mut self.frame_buf);
        let r = match state {
            InFrame::Padded { stream, .. } => self.deliver_padded(stream, &frame, handler),
            _ => {
                self.stats.control_frames += 1;
                handler.frame_bytes(&frame).map_err(RecvError::from)
            }
        };
        self.frame_buf = frame;
        self.frame_buf.clear();
        r
    }

    fn deliver_padded<P: SplicePipe, H: FrameHandler<P>>(
        &mut self,
        stream: StreamId,
        payload: &[u8],
        handler: &mut H,
    ) -> Result<(), RecvError> {
        let Some((&pad, rest)) = payload.split_first() else {
            // No room for the Pad Length: the session judges (FRAME_SIZE_ERROR).
            return Ok(());
        };
        if pad as usize > rest.len() {
            handler.frame_bytes(payload)?;
            return Err(RecvError::BadPadding);
        }
        let (data, padding) = rest.split_at(rest.len() - pad as usize);
        handler.frame_bytes(&payload[..1])?;
        if !data.is_empty() {
            match handler.sink(stream) {
                None => {
                    self.stats.skipped_bytes += data.len() as u64;
                    handler.frame_bytes(data)?;
                }
                Some(sink) => {
                    if sink.failed.is_some() {
                        self.stats.dropped_bytes += data.len() as u64;
                        sink.unreported += data.len();
                    } else {
                        if sink.spill.len() + data.len() > sink.max_spill {
                            return Err(RecvError::SpillLimit(stream));
                        }
                        sink.spill.extend(data);
                        self.stats.buffered_bytes += data.len() as u64;
                        sink.opportunistic_flush();
                    }
                    handler.payload_moved(stream, data.len())?;
                }
            }
        }
        if !padding.is_empty() {
            handler.frame_bytes(padding)?;
        }
        Ok(())
    }

    /// Moves some of the current DATA payload; `None` when the tunnel has nothing now.
    fn move_payload<P: SplicePipe, H: FrameHandler<P>>(
        &mut self,
        tunnel: RawFd,
        stream: StreamId,
        left: usize,
        mode: Mode,
        handler: &mut H,
    ) -> Result<Option<usize>, RecvError> {
        let n = match mode {
            Mode::Pipe => {
                let Some(sink) = handler.sink(stream) else {
                    self.state = InFrame::Payload {
                        stream,
                        left,
                        mode: Mode::Drop,
                    };
                    return Ok(Some(0));
                };
                let pipe = sink.pipe.as_ref().expect("pipe mode has a pipe");
                match splice(tunnel, pipe.write_fd(), left) {
                    Ok(0) => return Err(RecvError::Truncated),
                    Ok(n) => {
                        sink.in_pipe += n;
                        self.stats.spliced_bytes += n as u64;
                        sink.opportunistic_flush();
                        if sink.failed.is_some() {
                            self.state = InFrame::Payload {
                                stream,
                                left,
                                mode: Mode::Drop,
                            };
                        }
                        n
                    }
                    Err(e) if is_eagain(&e) => {
                        if sink.in_pipe == 0 {
                            return Ok(None);
                        }
                        let before = sink.in_pipe;
                        sink.opportunistic_flush();
                        if sink.in_pipe < before || sink.failed.is_some() {
                            if sink.failed.is_some() {
                                self.switch(stream, left, Mode::Drop);
                            }
                            return Ok(Some(0)); // room was made: try again
                        }
                        if pipe_writable(sink.pipe.as_ref().expect("pipe mode").write_fd()) {
                            return Ok(None); // the tunnel is what is empty
                        }
                        // The pipe is full and the destination slow: the rest of this frame
                        // goes to the spill buffer so the tunnel keeps moving.
                        if sink.spill.len() + left > sink.max_spill {
                            return Err(RecvError::SpillLimit(stream));
                        }
                        self.stats.switched_mid_frame += 1;
                        self.stats.buffered_frames += 1;
                        self.switch(stream, left, Mode::Spill);
                        return Ok(Some(0));
                    }
                    Err(e) if self.ktls && e.raw_os_error() == Some(libc::EINVAL) => {
                        // A control record is next: read this chunk through user space.
                        self.stats.buffered_frames += 1;
                        self.switch(stream, left, Mode::Spill);
                        return Ok(Some(0));
                    }
                    Err(e) => return Err(RecvError::Tunnel(errno(&e))),
                }
            }
            Mode::Spill | Mode::Drop => {
                let mut scratch = std::mem::take(&mut self.scratch);
                let want = left.min(SCRATCH);
                let r = self.read(tunnel, &mut scratch[..want], handler);
                let r = match r {
                    Ok(Some(n)) if n > 0 => {
                        match handler.sink(stream) {
                            Some(sink) if mode == Mode::Spill && sink.failed.is_none() => {
                                sink.spill.extend(&scratch[..n]);
                                self.stats.buffered_bytes += n as u64;
                                sink.opportunistic_flush();
                            }
                            Some(sink) => {
                                sink.unreported += n;
                                self.stats.dropped_bytes += n as u64;
                            }
                            None => self.stats.dropped_bytes += n as u64,
                        }
                        Ok(Some(n))
                    }
                    other => other,
                };
                self.scratch = scratch;
                match r? {
                    None => return Ok(None),
                    Some(0) => return Err(RecvError::Truncated),
                    Some(n) => n,
                }
            }
        };
        if n > 0 {
            handler.payload_moved(stream, n)?;
            let left = left - n;
            match &mut self.state {
                InFrame::Payload { left: l, .. } if left > 0 => *l = left,
                _ if left == 0 => self.state = InFrame::Header,
                _ => {}
            }
        }
        Ok(Some(n))
    }

    fn switch(&mut self, stream: StreamId, left: usize, mode: Mode) {
        self.state = InFrame::Payload { stream, left, mode };
    }

    /// One read of HTTP/2 bytes into `buf`: `Some(0)` is EOF, `None` is EAGAIN. On kTLS, TLS
    /// records that are not application data are collected and given to the handler, and the
    /// read goes on.
    fn read<P, H: FrameHandler<P>>(
        &mut self,
        tunnel: RawFd,
        buf: &mut [u8],
        handler: &mut H,
    ) -> Result<Option<usize>, RecvError> {
        loop {
            let r = ktls::recv_record(tunnel, buf, libc::MSG_DONTWAIT);
            let got = match r {
                Ok(got) => got,
                Err(e) if is_eagain(&e) => return Ok(None),
                Err(e) if e.raw_os_error() == Some(libc::EINTR) => continue,
                Err(e) => return Err(RecvError::Tunnel(errno(&e))),
            };
            if got.record_type == ktls::CONTENT_APPLICATION_DATA {
                return Ok(Some(got.len));
            }
            // A control record: the kernel never mixes types in one call and stops at the end
            // of a control record. If `buf` was filled the record may go on: peek, and take the
            // rest if it is of the same type. (Two back-to-back records of one type may merge
            // then; handshake messages are self-delimiting.)
            self.control.clear();
            self.control.extend_from_slice(&buf[..got.len]);
            if got.len == buf.len() {
                let mut rest = vec![0u8; ktls::MAX_RECORD_PAYLOAD];
                let peek =
                    ktls::recv_record(tunnel, &mut rest, libc::MSG_DONTWAIT | libc::MSG_PEEK);
                if let Ok(p) = peek {
                    if p.len > 0 && p.record_type == got.record_type {
                        let taken =
                            ktls::recv_record(tunnel, &mut rest[..p.len], libc::MSG_DONTWAIT)
                                .map_err(|e| RecvError::Tunnel(errno(&e)))?;
                        self.control.extend_from_slice(&rest[..taken.len]);
                    }
                }
            }
            self.stats.tls_records += 1;
            let control = std::mem::take(&mut self.control);
            let r = handler.tls_record(got.record_type, &control);
            self.control = control;
            r?;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::data_plane::splice::{Pipe, PipePool};
    use sha2::{Digest, Sha256};
    use std::collections::HashMap;
    use std::io::{Read, Write};
    use std::net::{Shutdown, TcpStream};
    use std::os::fd::AsRawFd;
    use std::time::{Duration, Instant};

    const DEADLINE: Duration = Duration::from_secs(15);

    use crate::data_plane::socket::tcp_pair;

    fn set_buf(s: &TcpStream, opt: libc::c_int, bytes: libc::c_int) {
        // SAFETY: setsockopt with a pointer to a live c_int and its size.
        let rc = unsafe {
            libc::setsockopt(
                s.as_raw_fd(),
                libc::SOL_SOCKET,
                opt,
                (&bytes as *const libc::c_int).cast(),
                std::mem::size_of::<libc::c_int>() as libc::socklen_t,
            )
        };
        assert_eq!(rc, 0);
    }

    fn fionread(fd: RawFd) -> usize {
        let mut n: libc::c_int = 0;
        // SAFETY: FIONREAD writes one c_int to the pointer given.
        assert_eq!(unsafe { libc::ioctl(fd, libc::FIONREAD, &mut n) }, 0);
        n as usize
    }

    fn wait(fds: &[(RawFd, libc::c_short)], ms: i32) {
        let mut pfds: Vec<libc::pollfd> = fds
            .iter()
            .map(|&(fd, events)| libc::pollfd {
                fd,
                events,
                revents: 0,
            })
            .collect();
        // SAFETY: `pfds` is a live array of that many pollfds.
        unsafe { libc::poll(pfds.as_mut_ptr(), pfds.len() as libc::nfds_t, ms) };
    }

    fn data(len: usize, seed: u64) -> Vec<u8> {
        let mut x = seed | 1;
        (0..len)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                x as u8
            })
            .collect()
    }

    /// A pool that checks every pipe it gets back is really empty.
    struct CheckingPool(PipePool);

    impl PipeSupply for CheckingPool {
        type Pipe = Pipe;
        fn get(&mut self) -> io::Result<Pipe> {
            self.0.get()
        }
        fn put_empty(&mut self, pipe: Pipe) {
            assert_eq!(
                fionread(pipe.read_fd()),
                0,
                "a pipe holding bytes came back"
            );
            self.0.put_empty(pipe)
        }
    }

    /// Headers built with hbone-proto's frame API; unlimited credit unless told.
    struct Headers {
        stream: StreamId,
        max_frame: Box<dyn FnMut() -> usize>,
        credit: usize,
    }

    impl Headers {
        fn new(stream: u32, max_frame: usize) -> Self {
            Headers {
                stream: StreamId::new(stream),
                max_frame: Box::new(move || max_frame),
                credit: usize::MAX,
            }
        }
    }

    impl DataFrameHeaders for Headers {
        fn credit(&mut self) -> usize {
            self.credit
        }
        fn max_frame_size(&mut self) -> usize {
            (self.max_frame)()
        }
        fn data_frame_header(&mut self, len: usize, end: bool) -> Option<[u8; 9]> {
            self.credit -= len;
            Some(hbone_proto::frame::data::encode_header(
                self.stream,
                len as u32,
                end,
            ))
        }
    }

    /// Stands in for the session: logs what it is given, ends a stream on END_STREAM.
    #[derive(Default)]
    struct Handler {
        sinks: HashMap<u32, StreamSink<Pipe>>,
        log: Vec<Vec<u8>>,
        data_headers: Vec<FrameHeader>,
        moved: HashMap<u32, usize>,
        ended: HashMap<u32, bool>,
    }

    impl FrameHandler<Pipe> for Handler {
        fn frame_bytes(&mut self, bytes: &[u8]) -> Result<(), HandlerError> {
            if bytes.len() == 9 {
                let h = FrameHeader::decode(bytes).unwrap();
                if h.kind == FrameType::Data {
                    if h.has(flags::END_STREAM) {
                        self.ended.insert(h.stream_id.get(), true);
                    }
                    self.data_headers.push(h);
                }
            }
            self.log.push(bytes.to_vec());
            Ok(())
        }
        fn sink(&mut self, stream: StreamId) -> Option<&mut StreamSink<Pipe>> {
            self.sinks.get_mut(&stream.get())
        }
        fn payload_moved(&mut self, stream: StreamId, n: usize) -> Result<(), HandlerError> {
            *self.moved.entry(stream.get()).or_default() += n;
            Ok(())
        }
        fn tls_record(&mut self, _: u8, _: &[u8]) -> Result<(), HandlerError> {
            panic!("no TLS records on a plain socket")
        }
    }

    /// One stream through the tunnel: captured client → sender ... receiver → destination.
    struct Stream {
        id: u32,
        writer: Option<std::thread::JoinHandle<TcpStream>>,
        src: TcpStream,
        sender: FrameSender<Pipe>,
        headers: Headers,
        dst: TcpStream,
        dst_shut: bool,
        reader: Option<std::thread::JoinHandle<[u8; 32]>>,
        sent_sum: [u8; 32],
    }

    struct StreamOpts {
        max_frame: Box<dyn FnMut() -> usize>,
        /// The destination is not read until this fires.
        hold: Option<std::sync::mpsc::Receiver<()>>,
        /// Fired when the destination has read everything.
        done: Option<std::sync::mpsc::Sender<()>>,
    }

    impl StreamOpts {
        fn frames(max_frame: usize) -> Self {
            StreamOpts {
                max_frame: Box::new(move || max_frame),
                hold: None,
                done: None,
            }
        }
    }

    fn stream(id: u32, payload: Vec<u8>, opts: StreamOpts, handler: &mut Handler) -> Stream {
        let (mut client, src) = tcp_pair();
        let (dst, mut peer) = tcp_pair();
        src.set_nonblocking(true).unwrap();
        dst.set_nonblocking(true).unwrap();
        if opts.hold.is_some() {
            // A slow destination: small buffers, not read until released.
            set_buf(&dst, libc::SO_SNDBUF, 4096);
            // (A tiny receive buffer would stall loopback TCP in zero-window probes.)
            set_buf(&peer, libc::SO_RCVBUF, 65536);
        }
        let sent_sum: [u8; 32] = Sha256::digest(&payload).into();
        let writer = std::thread::spawn(move || {
            client.write_all(&payload).unwrap();
            client.shutdown(Shutdown::Write).unwrap();
            client
        });
        let (hold, done) = (opts.hold, opts.done);
        let reader = std::thread::spawn(move || {
            if let Some(hold) = hold {
                hold.recv().unwrap();
            }
            let mut got = Vec::new();
            peer.read_to_end(&mut got).unwrap();
            if let Some(done) = done {
                let _ = done.send(());
            }
            Sha256::digest(&got).into()
        });
        handler
            .sinks
            .insert(id, StreamSink::new(dst.as_raw_fd(), 64 << 20));
        let mut headers = Headers::new(id, 0);
        headers.max_frame = opts.max_frame;
        Stream {
            id,
            writer: Some(writer),
            src,
            sender: FrameSender::new(false),
            headers,
            dst,
            dst_shut: false,
            reader: Some(reader),
            sent_sum,
        }
    }

    struct Tunnel {
        tx: TcpStream,
        rx: TcpStream,
        receiver: FrameReceiver,
        rx_budget: usize,
    }

    fn tunnel(rx_budget: usize) -> Tunnel {
        let (tx, rx) = tcp_pair();
        tx.set_nonblocking(true).unwrap();
        rx.set_nonblocking(true).unwrap();
        Tunnel {
            tx,
            rx,
            receiver: FrameReceiver::new(1 << 20, false),
            rx_budget,
        }
    }

    struct Driver {
        owner: Option<usize>,
        next: usize,
    }

    /// One round: every sender (one tunnel writer at a time: a sender mid-frame keeps the
    /// tunnel), the receiver, every destination. Returns whether anything moved.
    fn step(
        d: &mut Driver,
        t: &mut Tunnel,
        streams: &mut [Stream],
        h: &mut Handler,
        pool: &mut CheckingPool,
    ) -> bool {
        let mut progress = false;
        for k in 0..streams.len() {
            let i = (d.next + k) % streams.len();
            if d.owner.is_some_and(|o| o != i) {
                continue;
            }
            let s = &mut streams[i];
            let moved = |s: &Stream| {
                let st = s.sender.stats;
                (st.frames, st.payload_bytes, s.sender.pending())
            };
            let before = moved(s);
            let st = s
                .sender
                .send(
                    s.src.as_raw_fd(),
                    t.tx.as_raw_fd(),
                    pool,
                    &mut s.headers,
                    128 << 10,
                )
                .unwrap();
            progress |= before != moved(s) && st != SendStatus::Done;
            d.owner = s.sender.mid_frame().then_some(i);
        }
        d.next += 1;
        let before = t.receiver.stats;
        let logged = h.log.len();
        t.receiver
            .poll(t.rx.as_raw_fd(), pool, h, t.rx_budget)
            .unwrap();
        progress |= before != t.receiver.stats || logged != h.log.len();
        for s in streams.iter_mut() {
            let sink = h.sinks.get_mut(&s.id).unwrap();
            let b = sink.buffered();
            let _ = sink.flush();
            let _ = sink.take_delivered();
            progress |= b != sink.buffered();
            if !s.dst_shut
                && h.ended.contains_key(&s.id)
                && sink.buffered() == 0
                && t.receiver.at_frame_boundary()
            {
                s.dst.shutdown(Shutdown::Write).unwrap();
                s.dst_shut = true;
                sink.release(pool);
                progress = true;
            }
        }
        progress
    }

    fn wait_any(t: &Tunnel, streams: &[Stream], h: &Handler) {
        let mut fds = vec![(t.rx.as_raw_fd(), libc::POLLIN)];
        for s in streams {
            fds.push((s.src.as_raw_fd(), libc::POLLIN));
            if h.sinks[&s.id].buffered() > 0 {
                fds.push((s.dst.as_raw_fd(), libc::POLLOUT));
            }
        }
        if streams
            .iter()
            .any(|s| s.sender.mid_frame() || s.sender.pending() > 0)
        {
            fds.push((t.tx.as_raw_fd(), libc::POLLOUT));
        }
        wait(&fds, 20);
    }

    /// Runs until every stream is delivered and its destination shut, then checks the sums.
    fn run(t: &mut Tunnel, streams: &mut [Stream], h: &mut Handler, pool: &mut CheckingPool) {
        let start = Instant::now();
        let mut d = Driver {
            owner: None,
            next: 0,
        };
        while !streams.iter().all(|s| s.dst_shut) {
            if start.elapsed() > DEADLINE {
                for s in streams.iter() {
                    eprintln!(
                        "stream {}: sender {:?} pending {} mid {} done {} shut {} sink {} spill {} failed {:?} ended {:?}",
                        s.id,
                        s.sender.stats,
                        s.sender.pending(),
                        s.sender.mid_frame(),
                        s.sender.is_done(),
                        s.dst_shut,
                        h.sinks[&s.id].buffered(),
                        h.sinks[&s.id].spilled(),
                        h.sinks[&s.id].failed(),
                        h.ended.get(&s.id)
                    );
                }
                panic!(
                    "transfer stuck: {:?} {:?}",
                    t.receiver.stats, t.receiver.state
                );
            }
            if !step(&mut d, t, streams, h, pool) {
                wait_any(t, streams, h);
            }
        }
        for s in streams.iter_mut() {
            if let Some(w) = s.writer.take() {
                w.join().unwrap();
            }
            let got = s.reader.take().unwrap().join().unwrap();
            assert_eq!(got, s.sent_sum, "stream {} arrived intact", s.id);
            assert!(s.sender.is_done());
            assert_eq!(
                h.moved.get(&s.id).copied().unwrap_or(0) as u64,
                s.sender.stats.payload_bytes
            );
        }
    }

    #[test]
    fn size_policy() {
        // Plain: the smallest of pipe bytes, MAX_FRAME_SIZE and credit.
        assert_eq!(
            frame_payload_len(100_000, 1 << 20, usize::MAX, false),
            100_000
        );
        assert_eq!(
            frame_payload_len(100_000, 16_384, usize::MAX, false),
            16_384
        );
        assert_eq!(frame_payload_len(100_000, 1 << 20, 5_000, false), 5_000);
        assert_eq!(frame_payload_len(0, 1 << 20, 5_000, false), 0);
        assert_eq!(frame_payload_len(10, 1 << 20, 0, false), 0);
        assert_eq!(
            frame_payload_len(usize::MAX, usize::MAX, usize::MAX, false),
            (1 << 24) - 1
        );
        // kTLS: k·16384 − 9 when at least one record fits.
        assert_eq!(
            frame_payload_len(100_000, 1 << 20, usize::MAX, true),
            6 * 16_384 - 9
        );
        assert_eq!(frame_payload_len(65_535, 65_535, usize::MAX, true), 65_527);
        assert_eq!(frame_payload_len(16_375, 1 << 20, usize::MAX, true), 16_375);
        assert_eq!(frame_payload_len(16_374, 1 << 20, usize::MAX, true), 16_374);
        assert_eq!(frame_payload_len(1 << 20, 16_384, usize::MAX, true), 16_375);
        assert_eq!(frame_payload_len(1 << 20, 1 << 20, 20_000, true), 16_375);
        assert_eq!(frame_payload_len(1 << 20, 1 << 20, 100, true), 100);
        for n in 0..200_000usize {
            let len = frame_payload_len(n, 1 << 20, usize::MAX, true);
            assert!(len <= n);
            assert!(n < 16_375 || (len + 9) % 16_384 == 0);
        }
    }

    #[test]
    fn sixty_four_frames_of_65527_bytes_sha256_equal() {
        const FRAME: usize = 65_527;
        let mut pool = CheckingPool(PipePool::new(1 << 20, 4));
        let mut h = Handler::default();
        let mut t = tunnel(1 << 20);
        let (mut client, src) = tcp_pair();
        let (dst, mut peer) = tcp_pair();
        src.set_nonblocking(true).unwrap();
        dst.set_nonblocking(true).unwrap();
        let payload = data(64 * FRAME, 1);
        let reader = std::thread::spawn(move || {
            let mut got = Vec::new();
            peer.read_to_end(&mut got).unwrap();
            Sha256::digest(&got).into()
        });
        h.sinks
            .insert(1, StreamSink::new(dst.as_raw_fd(), 64 << 20));
        let mut streams = [Stream {
            id: 1,
            writer: None,
            src,
            sender: FrameSender::new(false),
            headers: Headers::new(1, FRAME),
            dst,
            dst_shut: false,
            reader: Some(reader),
            sent_sum: Sha256::digest(&payload).into(),
        }];
        let exact = Pipe::new(1 << 20).unwrap().0.capacity() >= 2 * FRAME;
        let mut d = Driver {
            owner: None,
            next: 0,
        };
        let start = Instant::now();
        for (i, chunk) in payload.chunks(FRAME).enumerate() {
            // One frame's bytes wait whole in the source before the sender runs.
            client.write_all(chunk).unwrap();
            while fionread(streams[0].src.as_raw_fd()) < FRAME {
                assert!(start.elapsed() < DEADLINE);
                wait(&[(streams[0].src.as_raw_fd(), libc::POLLIN)], 20);
            }
            while streams[0].sender.stats.frames < i as u64 + 1
                || streams[0].sender.mid_frame()
                || streams[0].sender.pending() > 0
            {
                assert!(start.elapsed() < DEADLINE, "frame {i} stuck");
                if !step(&mut d, &mut t, &mut streams, &mut h, &mut pool) {
                    wait_any(&t, &streams, &h);
                }
            }
        }
        client.shutdown(Shutdown::Write).unwrap();
        run(&mut t, &mut streams, &mut h, &mut pool);
        // 64 full frames and the empty END_STREAM one.
        assert_eq!(h.data_headers.len(), 65);
        if exact {
            assert!(h.data_headers[..64]
                .iter()
                .all(|f| f.length as usize == FRAME));
        }
        let last = h.data_headers[64];
        assert!(last.length == 0 && last.has(flags::END_STREAM));
        assert_eq!(t.receiver.stats.spliced_bytes, (64 * FRAME) as u64);
        assert_eq!(t.receiver.stats.buffered_frames, 0);
        assert!(pool.0.idle() >= 1, "empty pipes went back to the pool");
    }

    #[test]
    fn random_small_frames() {
        let mut pool = CheckingPool(PipePool::new(256 << 10, 4));
        let mut h = Handler::default();
        let mut t = tunnel(64 << 10);
        let mut x = 0x9e37_79b9_7f4a_7c15u64;
        let opts = StreamOpts {
            max_frame: Box::new(move || {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                1 + (x % 3000) as usize
            }),
            hold: None,
            done: None,
        };
        let mut streams = [stream(1, data(1_500_000, 2), opts, &mut h)];
        run(&mut t, &mut streams, &mut h, &mut pool);
        assert!(streams[0].sender.stats.frames > 1_000);
        assert!(h.data_headers.iter().all(|f| f.length <= 3000));
    }

    #[test]
    fn slow_destination_spills_while_another_stream_flows() {
        let mut pool = CheckingPool(PipePool::new(64 << 10, 4));
        let mut h = Handler::default();
        let mut t = tunnel(256 << 10);
        let (release_slow, hold) = std::sync::mpsc::channel();
        let slow = StreamOpts {
            max_frame: Box::new(|| 16_384),
            hold: Some(hold),
            done: None,
        };
        let fast = StreamOpts {
            max_frame: Box::new(|| 16_384),
            hold: None,
            // The slow destination is read only after the fast stream arrived whole: if the
            // tunnel blocked on the slow stream's full pipe this would never happen.
            done: Some(release_slow),
        };
        let mut streams = [
            stream(1, data(3_000_000, 3), slow, &mut h),
            stream(3, data(3_000_000, 4), fast, &mut h),
        ];
        run(&mut t, &mut streams, &mut h, &mut pool);
        let st = t.receiver.stats;
        assert!(st.buffered_frames > 0 && st.buffered_bytes > 0, "{st:?}");
        assert!(st.spliced_frames > 0, "{st:?}");
        // Frames of both streams interleaved on the tunnel.
        let switches = h
            .data_headers
            .windows(2)
            .filter(|w| w[0].stream_id != w[1].stream_id)
            .count();
        assert!(switches > 2);
        assert_eq!(
            st.spliced_bytes + st.buffered_bytes,
            streams
                .iter()
                .map(|s| s.sender.stats.payload_bytes)
                .sum::<u64>()
        );
    }

    #[test]
    fn eagain_mid_frame_resumes() {
        let mut pool = CheckingPool(PipePool::new(256 << 10, 4));
        let mut h = Handler::default();
        let mut t = tunnel(3_000); // the receiver reads slowly
        set_buf(&t.tx, libc::SO_SNDBUF, 4096);
        let mut streams = [
            stream(1, data(1_000_000, 5), StreamOpts::frames(100_000), &mut h),
            stream(3, data(300_000, 6), StreamOpts::frames(7_000), &mut h),
        ];
        run(&mut t, &mut streams, &mut h, &mut pool);
        let stalls: u64 = streams
            .iter()
            .map(|s| s.sender.stats.stalls_mid_frame)
            .sum();
        assert!(stalls > 0);
    }

    fn raw_frame(kind: u8, fl: u8, stream: u32, payload: &[u8]) -> Vec<u8> {
        let mut v = FrameHeader {
            length: payload.len() as u32,
            kind: FrameType::from_u8(kind),
            flags: fl,
            stream_id: StreamId::new(stream),
        }
        .to_bytes()
        .to_vec();
        v.extend_from_slice(payload);
        v
    }

    #[test]
    fn padded_control_and_unknown_stream_frames() {
        let mut pool = CheckingPool(PipePool::new(64 << 10, 4));
        let mut h = Handler::default();
        let (mut tx, rx) = tcp_pair();
        rx.set_nonblocking(true).unwrap();
        let (dst, mut peer) = tcp_pair();
        dst.set_nonblocking(true).unwrap();
        h.sinks.insert(1, StreamSink::new(dst.as_raw_fd(), 1 << 20));
        let a = data(100, 7);
        let b = data(5_000, 8);
        let mut padded = vec![20u8];
        padded.extend_from_slice(&a);
        padded.extend_from_slice(&[0; 20]);
        let ping = raw_frame(6, 0, 0, &[1, 2, 3, 4, 5, 6, 7, 8]);
        let mut wire = ping.clone();
        wire.extend(raw_frame(0, flags::PADDED, 1, &padded));
        wire.extend(raw_frame(0, 0, 1, &b));
        wire.extend(raw_frame(0, 0, 5, &[9; 300])); // no sink: the session skips it
        wire.extend(raw_frame(0, flags::END_STREAM, 1, &[]));
        // Written in small pieces so headers and payloads arrive split.
        let writer = std::thread::spawn(move || {
            for piece in wire.chunks(7) {
                tx.write_all(piece).unwrap();
                std::thread::sleep(Duration::from_micros(50));
            }
        });
        let mut r = FrameReceiver::new(1 << 14, false);
        let start = Instant::now();
        loop {
            assert!(start.elapsed() < DEADLINE);
            match r.poll(rx.as_raw_fd(), &mut pool, &mut h, 1 << 20).unwrap() {
                RecvStatus::Eof => break,
                RecvStatus::Yield => {}
                RecvStatus::WantRead => wait(&[(rx.as_raw_fd(), libc::POLLIN)], 20),
            }
            let _ = h.sinks.get_mut(&1).unwrap().flush();
        }
        writer.join().unwrap();
        let sink = h.sinks.get_mut(&1).unwrap();
        while sink.flush().unwrap() != FlushStatus::Empty {
            wait(&[(dst.as_raw_fd(), libc::POLLOUT)], 20);
        }
        assert_eq!(sink.take_delivered(), 5_100);
        sink.release(&mut pool);
        dst.shutdown(Shutdown::Write).unwrap();
        let mut got = Vec::new();
        peer.read_to_end(&mut got).unwrap();
        assert_eq!(got, [a, b].concat());
        assert_eq!(h.moved[&1], 5_100);
        assert_eq!(r.stats.padded_frames, 1);
        assert_eq!(r.stats.buffered_frames, 1);
        assert_eq!(r.stats.spliced_frames, 1);
        assert_eq!(r.stats.control_frames, 1);
        assert_eq!(r.stats.skipped_bytes, 300);
        // What the session would have been fed, in order.
        let log: Vec<usize> = h.log.iter().take(6).map(Vec::len).collect();
        assert_eq!(log, [17, 9, 1, 20, 9, 9]);
        assert_eq!(h.log[0], ping);
        assert_eq!(h.log[3], vec![0; 20]);
        // The skipped payload (in as many pieces as it arrived), then the END_STREAM header.
        let rest = h.log[6..].concat();
        assert_eq!(rest.len(), 309);
        assert_eq!(rest[..300], [9; 300]);
        assert_eq!(h.log.last().unwrap().len(), 9);
    }

    #[test]
    fn a_pipe_holding_bytes_is_never_returned() {
        let mut pool = PipePool::new(64 << 10, 4);
        // A sink whose destination never reads keeps bytes in its pipe.
        let (dst, _peer) = tcp_pair();
        let mut sink: StreamSink<Pipe> = StreamSink::new(dst.as_raw_fd(), 1 << 20);
        let pipe = pool.get().unwrap();
        // SAFETY: write on a pipe descriptor we own, from a live buffer.
        let n = unsafe { libc::write(pipe.write_fd(), b"held".as_ptr().cast(), 4) };
        assert_eq!(n, 4);
        sink.pipe = Some(pipe);
        sink.in_pipe = 4;
        sink.release(&mut pool);
        assert_eq!(pool.idle(), 0);
        // A sender mid-frame likewise.
        let mut sender: FrameSender<Pipe> = FrameSender::new(false);
        sender.pipe = Some(pool.get().unwrap());
        sender.pending = 10;
        sender.release(&mut pool);
        assert_eq!(pool.idle(), 0);
        // An empty one goes back.
        let mut sink: StreamSink<Pipe> = StreamSink::new(dst.as_raw_fd(), 1 << 20);
        sink.pipe = Some(pool.get().unwrap());
        sink.release(&mut pool);
        assert_eq!(pool.idle(), 1);
    }
}
