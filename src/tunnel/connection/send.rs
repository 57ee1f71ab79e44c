//! The tunnel's sending half: streams' bytes into DATA frames (copied into the transport's
//! output, or spliced by a stream's frame sender that owns the socket mid-frame), the queues
//! of streams waiting for room or credit, and writing the output.

use std::io;
use std::os::fd::{AsRawFd, RawFd};

use hbone_proto::frame::FRAME_HEADER_LEN;
use hbone_proto::{Session, StreamId};

use super::{Action, Ctx, Phase, Role, Tunnel, MIN_ROOM};
use crate::data_plane::driver::Interest;
use crate::observability::hbone_metrics::{
    KeyUpdateKind, PayloadDirection, PayloadPath, TunnelClose,
};
use crate::observability::metrics::FailureKind;
use crate::tunnel::error::{errno, TunnelError};
use crate::tunnel::frames::{DataFrameHeaders, SendError, SendStatus};
use crate::tunnel::streams::{Outgoing, Stream, StreamEnd, StreamPhase};
use crate::tunnel::transport::{Transport, KEY_UPDATE_SETTING};

/// The zero-copy sender's view of the session for one stream. Called only between frames, so
/// the session's own frames are written first, right here; if the socket cannot take them the
/// header is refused and the sender waits for the socket.
struct FrameHeaders<'a> {
    session: &'a mut Session,
    transport: &'a mut Transport,
    frames: &'a mut Vec<u8>,
    fd: RawFd,
    stream: StreamId,
}

impl DataFrameHeaders for FrameHeaders<'_> {
    fn credit(&mut self) -> usize {
        self.session.send_capacity(self.stream)
    }

    fn max_frame_size(&mut self) -> usize {
        self.session.peer_max_frame_size() as usize
    }

    fn data_frame_header(
        &mut self,
        len: usize,
        end_stream: bool,
    ) -> Option<[u8; FRAME_HEADER_LEN]> {
        self.frames.clear();
        self.session.poll_transmit(self.frames);
        self.transport.queue(self.frames);
        if !matches!(self.transport.flush(self.fd), Ok(true)) {
            return None;
        }
        let header = self
            .session
            .data_frame_header(self.stream, len, end_stream)
            .ok()?;
        self.transport.charge_written(FRAME_HEADER_LEN);
        Some(header)
    }
}

impl Tunnel {
    /// Moves a stream's local bytes into the tunnel, copied or spliced.
    pub(super) fn send_stream(&mut self, id: StreamId, ctx: &mut Ctx<'_>) {
        let Some(s) = self.streams.get_mut(&id) else {
            return;
        };
        s.queued = false;
        if s.phase != StreamPhase::Open || s.local_eof || s.stream_gone || s.blocked {
            return self.maybe_complete(id, ctx);
        }
        match s.outgoing {
            Outgoing::Copy => self.send_copied(id, ctx),
            Outgoing::Splice(_) => self.send_spliced(id, ctx),
        }
        self.maybe_complete(id, ctx);
    }

    pub(super) fn send_copied(&mut self, id: StreamId, ctx: &mut Ctx<'_>) {
        let budget = ctx.env.max_bytes_per_wakeup;
        let mut moved = 0usize;
        let (Some(session), Some(transport)) = (self.session.as_mut(), self.transport.as_mut())
        else {
            return;
        };
        let Some(s) = self.streams.get_mut(&id) else {
            return;
        };
        let local = s.local_fd().expect("open stream has a socket");
        loop {
            let credit = session.send_capacity(id);
            let room = transport.out_room();
            if credit == 0 {
                s.blocked = true;
                self.waiting_credit.push(id);
                break;
            }
            if room < MIN_ROOM {
                s.blocked = true;
                self.blocked.push(id);
                break;
            }
            if moved >= budget {
                if !s.queued {
                    s.queued = true;
                    self.runnable.push_back(id);
                    self.queue();
                }
                break;
            }
            // The session's frames go first: a DATA header needs an empty transmit queue.
            self.frames.clear();
            session.poll_transmit(&mut self.frames);
            transport.queue(&self.frames);
            let r = transport.read_data_frame(local, credit.min(room), |n| {
                session
                    .data_frame_header(id, n, false)
                    .map_err(|e| io::Error::other(e.to_string()))
            });
            match r {
                Ok(0) => {
                    let _ = session.finish(id);
                    s.local_eof = true;
                    break;
                }
                Ok(n) => {
                    moved += n;
                    s.count_from_local(n);
                    s.last_active = ctx.now;
                    ctx.metrics
                        .payload(PayloadDirection::Sent, PayloadPath::Copied, n as u64);
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    self.actions.push_back(Action::Arm {
                        key: s.key,
                        fd: local,
                        side: s.side,
                        interest: Interest::Read,
                    });
                    break;
                }
                Err(e) => {
                    let end = s.local_broken(errno(&e));
                    return self.end_stream(id, end, ctx);
                }
            }
        }
    }

    /// kTLS zero copy: local socket → pipe → DATA frames spliced into the tunnel. One stream
    /// at a time owns the socket mid-frame.
    pub(super) fn send_spliced(&mut self, id: StreamId, ctx: &mut Ctx<'_>) {
        let fd = self.raw();
        if self.writer.is_some_and(|w| w != id) {
            // Another stream is mid-frame; it wakes us when done.
            if let Some(s) = self.streams.get_mut(&id) {
                s.blocked = true;
                self.blocked.push(id);
            }
            return;
        }
        let (Some(session), Some(transport)) = (self.session.as_mut(), self.transport.as_mut())
        else {
            return;
        };
        let Some(s) = self.streams.get_mut(&id) else {
            return;
        };
        let Outgoing::Splice(sender) = &mut s.outgoing else {
            return;
        };
        let local = s
            .local
            .as_ref()
            .expect("open stream has a socket")
            .as_raw_fd();
        let bytes_before = sender.stats.payload_bytes;
        let r = sender.send(
            local,
            fd,
            ctx.pipes,
            &mut FrameHeaders {
                session,
                transport,
                frames: &mut self.frames,
                fd,
                stream: id,
            },
            ctx.env.max_bytes_per_wakeup,
        );
        let sent = (sender.stats.payload_bytes - bytes_before) as usize;
        let mid_frame = sender.mid_frame();
        transport.charge_written(sent);
        self.writer = mid_frame.then_some(id);
        if sent > 0 {
            s.count_from_local(sent);
            s.last_active = ctx.now;
            ctx.metrics
                .payload(PayloadDirection::Sent, PayloadPath::Spliced, sent as u64);
        }
        let queued_out = transport.out_pending() > 0;
        match r {
            Ok(SendStatus::WantRead) => self.actions.push_back(Action::Arm {
                key: s.key,
                fd: local,
                side: s.side,
                interest: Interest::Read,
            }),
            Ok(SendStatus::WantWrite) => {
                s.blocked = true;
                self.blocked.push(id);
                self.arm_socket(Interest::Write);
            }
            Ok(SendStatus::WantCredit) => {
                s.blocked = true;
                self.waiting_credit.push(id);
            }
            Ok(SendStatus::Yield) => {
                if !s.queued {
                    s.queued = true;
                    self.runnable.push_back(id);
                    self.queue();
                }
            }
            Ok(SendStatus::Done) => s.local_eof = true,
            // The session's own frames could not all be written first: wait for the socket.
            Err(SendError::HeaderRefused) if queued_out => {
                s.blocked = true;
                self.blocked.push(id);
                self.arm_socket(Interest::Write);
            }
            Err(SendError::HeaderRefused) => {
                return self.end_stream(
                    id,
                    StreamEnd::TunnelBroken {
                        kind: FailureKind::StreamReset,
                    },
                    ctx,
                )
            }
            Err(SendError::Source(errno)) => {
                let end = s.local_broken(errno);
                return self.end_stream(id, end, ctx);
            }
            // Nothing was read and no frame is open: this wakeup's bytes go copied.
            Err(SendError::NoPipe) => self.send_copied(id, ctx),
            Err(SendError::Tunnel(errno)) => return self.fail(TunnelError::Write(errno), ctx),
        }
        if !mid_frame && self.close_when_written {
            self.close_when_written = false;
            self.close(TunnelClose::Closed, ctx);
        }
    }

    pub(super) fn maybe_complete(&mut self, id: StreamId, ctx: &mut Ctx<'_>) {
        if self.streams.get(&id).is_some_and(Stream::is_complete) {
            self.end_stream(id, StreamEnd::Clean, ctx);
        }
    }

    /// Runs the streams woken since the last call, each within its budget.
    pub(super) fn run_streams(&mut self, ctx: &mut Ctx<'_>) {
        for _ in 0..self.runnable.len() {
            let Some(id) = self.runnable.pop_front() else {
                break;
            };
            if let Some(s) = self.streams.get_mut(&id) {
                s.queued = false;
            }
            self.send_stream(id, ctx);
            if !matches!(self.phase, Phase::Open | Phase::Closing) {
                return;
            }
        }
    }

    /// Puts a stream in the run queue, and the tunnel in the reactor's: a stream woken
    /// outside a socket event (its CONNECT answered, credit arrived) must not wait for the
    /// tunnel's next read to run.
    pub(super) fn make_runnable(&mut self, id: StreamId) {
        if let Some(s) = self.streams.get_mut(&id) {
            s.blocked = false;
            if !s.queued {
                s.queued = true;
                self.runnable.push_back(id);
                self.queue();
            }
        }
    }

    pub(super) fn wake_blocked(&mut self) {
        let blocked = std::mem::take(&mut self.blocked);
        for id in blocked {
            self.make_runnable(id);
        }
    }

    /// Writes what the tunnel holds; wakes streams waiting for room; retires a tunnel past its
    /// record budget.
    pub(super) fn flush(&mut self, ctx: &mut Ctx<'_>) {
        if self.phase != Phase::Open {
            return;
        }
        if self.writer.is_some() {
            // A zero-copy frame is half written: its stream finishes it first.
            self.arm_socket(Interest::Write);
            return;
        }
        let fd = self.raw();
        let (Some(session), Some(transport)) = (self.session.as_mut(), self.transport.as_mut())
        else {
            return;
        };
        self.frames.clear();
        session.poll_transmit(&mut self.frames);
        transport.queue(&self.frames);
        transport.set_peer_follows(session.peer_extension(KEY_UPDATE_SETTING) == Some(1));
        let flushed = transport.flush(fd);
        for _ in 0..transport.take_key_updates_sent() {
            ctx.metrics.key_update(KeyUpdateKind::Sent);
            log::debug!(
                "reactor {}: {} tunnel updated its TLS send key",
                ctx.env.reactor,
                self.role.label().label()
            );
        }
        match flushed {
            Ok(true) => {
                if self.close_when_written {
                    self.close_when_written = false;
                    return self.close(TunnelClose::Closed, ctx);
                }
                if !self.blocked.is_empty() {
                    self.wake_blocked();
                }
            }
            Ok(false) => self.arm_socket(Interest::Write),
            Err(e) => return self.fail(e, ctx),
        }
        let transport = self.transport.as_ref().expect("open");
        if transport.must_retire() && !self.retiring {
            self.retiring = true;
            let role = self.role.label();
            log::info!(
                "reactor {}: {} tunnel sent {} TLS records (budget reached) and cannot update its \
                 key (this kernel or the peer cannot follow); retiring it",
                ctx.env.reactor,
                role.label(),
                transport.budget().records_sent()
            );
            ctx.metrics.closed(role, TunnelClose::RecordBudget);
            match self.role {
                Role::Client { .. } => self.actions.push_back(Action::Retire),
                Role::Server { .. } => self.goaway(ctx),
            }
        }
    }

    /// Server: no new streams (the node drains, or the tunnel retires); GOAWAY goes out.
    pub fn goaway(&mut self, ctx: &mut Ctx<'_>) {
        if self.phase != Phase::Open {
            return;
        }
        if let Some(s) = self.session.as_mut() {
            s.goaway();
        }
        self.flush(ctx);
        // With no stream left the session reports Drained.
        if let Err(e) = self.process_events(ctx) {
            self.fail(e, ctx);
        }
    }
}
