//! Outgoing DATA frames of one stream at the socket level, and the size of each.
//!
//! DESIGN.md §2: on a kTLS tunnel the proxy writes the 9-byte HTTP/2 DATA frame header and
//! splices the payload, which the kernel encrypts. [`FrameSender`] is that trick for one
//! stream: captured socket → pipe → header written, payload spliced into the tunnel. Its
//! boundary: it owns no socket and no session; the session is reached through
//! [`DataFrameHeaders`] (which hands out headers and takes flow-control credit), so the tunnel
//! drives it with its `hbone-proto` session and the tests drive it with a stand-in. Sockets are
//! non-blocking; every call moves what it can and says what it waits for, like
//! [`Pump`](crate::data_plane::splice::Pump). Receiving needs no counterpart here: the tunnel
//! reads frames through the session itself and splices each payload into its stream's
//! [`Sink`](super::sink::Sink).
//!
//! **The tunnel writer owns the socket for the duration of a frame.** Once a sender has taken a
//! header ([`FrameSender::mid_frame`] is true) nothing else — no other stream's sender, no
//! `poll_transmit` bytes of the session — may write to the tunnel socket until that sender has
//! written the rest of the header and exactly the announced payload. The tunnel serialises
//! writers; the sender only guarantees it never starts a new frame before the current one is
//! complete.
//!
//! Pipes come through [`PipeSupply`] (the reactor's pipe pool, whose rule holds here too: only
//! empty pipes go back; a pipe that may hold bytes is closed).

use std::io;
use std::os::fd::RawFd;

use hbone_proto::frame::{FRAME_HEADER_LEN, MAX_MAX_FRAME_SIZE};

use crate::data_plane::splice::{PipeSupply, SplicePipe};
use crate::tls::ktls;

/// `splice(2)` as the plain fast path does it, with EINTR retried.
fn splice(from: RawFd, to: RawFd, len: usize) -> io::Result<usize> {
    loop {
        match crate::data_plane::splice::splice(from, to, len) {
            Err(e) if e.raw_os_error() == Some(libc::EINTR) => continue,
            r => return r,
        }
    }
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
    /// No pipe to be had (every pipe of the reactor's budget is carrying bytes, or the kernel
    /// would not make one: the pool counts which). Nothing was read and no frame is open, so
    /// the caller moves this wakeup's bytes by copying.
    NoPipe,
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
                    match crate::sys::socket::send_more(tunnel, &bytes[written..], payload > 0) {
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
                    self.pipe = Some(pool.get().map_err(|_| SendError::NoPipe)?);
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
                                return Ok(self.wait_for_source(pool));
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
                self.wait_for_source(pool)
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

    /// Every byte read was framed and written, and the source has nothing now: the empty
    /// pipe goes back, so a stream waiting for bytes holds none.
    fn wait_for_source<S: PipeSupply<Pipe = P>>(&mut self, pool: &mut S) -> SendStatus {
        debug_assert!(self.pending == 0 && matches!(self.frame, OutFrame::Idle));
        if let Some(pipe) = self.pipe.take() {
            pool.put_empty(pipe);
        }
        SendStatus::WantRead
    }

    /// Whether the sender holds a pipe (only while bytes read are not yet framed and sent).
    pub fn holds_pipe(&self) -> bool {
        self.pipe.is_some()
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

#[cfg(test)]
mod tests {
    use std::io::{Read, Write};
    use std::os::fd::AsRawFd;

    use super::*;
    use crate::data_plane::socket::tcp_pair;
    use crate::data_plane::splice::{Pipe, PipePool};

    /// Windows that never run out, frames of up to 16 KiB, headers for stream 1.
    struct OpenWindows;

    impl DataFrameHeaders for OpenWindows {
        fn credit(&mut self) -> usize {
            usize::MAX
        }
        fn max_frame_size(&mut self) -> usize {
            16 << 10
        }
        fn data_frame_header(&mut self, len: usize, end: bool) -> Option<[u8; FRAME_HEADER_LEN]> {
            let l = (len as u32).to_be_bytes();
            Some([l[1], l[2], l[3], 0, u8::from(end), 0, 0, 0, 1])
        }
    }

    #[test]
    fn a_sender_waiting_for_its_source_holds_no_pipe() {
        let (mut client, src) = tcp_pair();
        let (tunnel, mut peer) = tcp_pair();
        src.set_nonblocking(true).unwrap();
        tunnel.set_nonblocking(true).unwrap();
        let mut pool = PipePool::new(64 << 10, 4, 64);
        let mut sender: FrameSender<Pipe> = FrameSender::new(false);
        for round in 1..=2u8 {
            client.write_all(&[round; 100]).unwrap();
            std::thread::sleep(std::time::Duration::from_millis(20));
            let status = sender
                .send(
                    src.as_raw_fd(),
                    tunnel.as_raw_fd(),
                    &mut pool,
                    &mut OpenWindows,
                    1 << 20,
                )
                .unwrap();
            assert_eq!(status, SendStatus::WantRead);
            assert!(
                !sender.holds_pipe(),
                "an idle stream's sender holds no pipe"
            );
            assert_eq!(pool.idle(), 1);
            let mut frame = [0u8; FRAME_HEADER_LEN + 100];
            peer.read_exact(&mut frame).unwrap();
            assert_eq!(&frame[..3], &[0, 0, 100]);
            assert_eq!(&frame[FRAME_HEADER_LEN..], &[round; 100]);
        }
        assert_eq!(pool.created, 1, "the pooled pipe was reused");
    }
}
