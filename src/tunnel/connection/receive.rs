//! The tunnel's receiving half: reading what the session asks for, moving each announced DATA
//! payload into its stream's sink (spliced or copied), returning credit as bytes reach the
//! local socket, and acting on the session's events.

use hbone_proto::{Event, Input, Session, Settings, StreamId};

use super::{Action, Ctx, Phase, Recv, Role, Tunnel};
use crate::data_plane::driver::{FlowKey, Interest};
use crate::observability::hbone_metrics::{
    PayloadDirection, PayloadPath, Role as RoleLabel, TunnelClose,
};
use crate::observability::metrics::FailureKind;
use crate::tunnel::error::TunnelError;
use crate::tunnel::inbound_rules::RejectReason;
use crate::tunnel::sink::{SinkError, SpliceIn, SpliceInError};
use crate::tunnel::streams::{Stream, StreamEnd};
use crate::tunnel::transport::{Fill, INPUT_CHUNK};

impl Tunnel {
    /// Reads what the session asks for and hands DATA payload to the streams' sinks, until the
    /// socket is empty, the budget is spent or the tunnel stops.
    pub(super) fn receive(&mut self, ctx: &mut Ctx<'_>) -> Result<Recv, TunnelError> {
        let budget = ctx.env.max_bytes_per_wakeup;
        let fd = self.raw();
        let mut moved = 0usize;
        loop {
            self.process_events(ctx)?;
            if self.phase != Phase::Open {
                return Ok(Recv::Stopped);
            }
            if moved >= budget {
                return Ok(Recv::Yield);
            }
            let session = self.session.as_mut().expect("open tunnel");
            if session.is_closed() {
                return Err(TunnelError::Http2("session closed".into()));
            }
            if let Some((id, remaining)) = session.pending_payload() {
                match self.move_payload(id, remaining, ctx)? {
                    Some(n) => moved += n,
                    None => return Ok(Recv::WantRead),
                }
                continue;
            }
            let transport = self.transport.as_mut().expect("open tunnel");
            let buffered = transport.buffered();
            if !buffered.is_empty() {
                let n = match session.handle_input(buffered, ctx.now) {
                    Input::Consumed(n) => n,
                    Input::DataPayload { consumed, .. } => consumed,
                };
                transport.consume(n);
                moved += n;
                continue;
            }
            // A zero-copy reader reads no further than the session wants, so no payload lands
            // in user space by accident.
            let want = if self.zero_copy {
                session.input_wanted().clamp(1, INPUT_CHUNK)
            } else {
                INPUT_CHUNK
            };
            match transport.fill(fd, want, ctx.metrics)? {
                Fill::Got(_) => {}
                Fill::WouldBlock => return Ok(Recv::WantRead),
                Fill::Eof if session.at_frame_boundary() => return Ok(Recv::Eof),
                Fill::Eof => return Err(TunnelError::PeerClosedInsideFrame),
            }
        }
    }

    /// Moves some of the announced payload of stream `id` (`remaining` bytes left) into its
    /// sink: what is already in user space first, then spliced off the socket where that
    /// works, else read through user space. `None` when the socket has nothing now.
    pub(super) fn move_payload(
        &mut self,
        id: StreamId,
        remaining: usize,
        ctx: &mut Ctx<'_>,
    ) -> Result<Option<usize>, TunnelError> {
        let fd = self.raw();
        let transport = self.transport.as_mut().expect("open tunnel");
        let session = self.session.as_mut().expect("open tunnel");
        let buffered = transport.buffered();
        if !buffered.is_empty() {
            let n = remaining.min(buffered.len());
            match self.streams.get_mut(&id) {
                Some(s) => {
                    s.last_active = ctx.now;
                    let dst = s.writable_local();
                    if let Err(SinkError::Overrun) = s.sink.deliver(&buffered[..n], dst) {
                        return Err(TunnelError::Http2(format!(
                            "peer overran stream {id:?}'s window"
                        )));
                    }
                }
                // No stream to take it (it ended on our side): drop it, credit goes back.
                None => {
                    let _ = session.release_capacity(id, n);
                }
            }
            transport.consume(n);
            session
                .data_consumed(id, n)
                .map_err(|_| TunnelError::Internal("payload accounting"))?;
            ctx.metrics
                .payload(PayloadDirection::Received, PayloadPath::Copied, n as u64);
            self.after_delivery(id, ctx);
            return Ok(Some(n));
        }
        if self.zero_copy && transport.can_splice() {
            if let Some(s) = self.streams.get_mut(&id) {
                let dst = s.writable_local();
                match s.sink.splice_in(fd, remaining, dst, ctx.pipes) {
                    Ok(SpliceIn::Moved(n)) => {
                        s.last_active = ctx.now;
                        session
                            .data_consumed(id, n)
                            .map_err(|_| TunnelError::Internal("payload accounting"))?;
                        ctx.metrics.payload(
                            PayloadDirection::Received,
                            PayloadPath::Spliced,
                            n as u64,
                        );
                        self.after_delivery(id, ctx);
                        return Ok(Some(n));
                    }
                    Ok(SpliceIn::WouldBlock) => return Ok(None),
                    Ok(SpliceIn::Eof) => return Err(TunnelError::PeerClosedInsideFrame),
                    Ok(SpliceIn::Copy) => {}
                    Err(SpliceInError::Source(e)) => return Err(TunnelError::Read(e)),
                }
            }
        }
        match transport.fill(fd, remaining.min(INPUT_CHUNK), ctx.metrics)? {
            Fill::Got(_) => Ok(Some(0)),
            Fill::WouldBlock => Ok(None),
            Fill::Eof => Err(TunnelError::PeerClosedInsideFrame),
        }
    }

    /// After bytes reached a stream's sink: push them on toward the local socket as far as
    /// it takes them now (edge-triggered readiness reports a socket that was writable all
    /// along never again, so "wait until writable" is only for a socket that said EAGAIN),
    /// count what reached it and give the peer credit for that, wait for the socket if bytes
    /// are left, deliver the EOF once everything is out, end the stream when its socket failed
    /// or it is complete.
    pub(super) fn after_delivery(&mut self, id: StreamId, ctx: &mut Ctx<'_>) {
        let Some(s) = self.streams.get_mut(&id) else {
            return;
        };
        if let (Some(dst), true) = (s.writable_local(), s.sink.buffered() > 0) {
            // A failure is the sink's state now; it is handled below with the credit.
            let _ = s.sink.flush(dst);
        }
        s.sink.return_empty_pipe(ctx.pipes);
        let credit = s.sink.take_delivered();
        if s.count_delivered() > 0 {
            s.last_active = ctx.now;
        }
        if credit > 0 {
            if let Some(session) = self.session.as_mut() {
                let _ = session.release_capacity(id, credit);
            }
        }
        if let Some(errno) = s.sink.failed() {
            let end = s.local_broken(errno);
            return self.end_stream(id, end, ctx);
        }
        if s.writable_local().is_none() {
            return;
        }
        if s.sink.buffered() > 0 {
            let (key, fd, side) = (s.key, s.local_fd().expect("writable"), s.side);
            self.actions.push_back(Action::Arm {
                key,
                fd,
                side,
                interest: Interest::Write,
            });
        } else if s.remote_eof && !s.local_shut {
            // Everything arrived and left: deliver the EOF.
            s.local_shut = true;
            let _ = crate::sys::socket::shutdown_write(s.local_fd().expect("writable"));
            log::debug!(
                "reactor {}: stream {id:?} delivered its EOF to fd {}",
                ctx.env.reactor,
                s.local_fd().unwrap_or(-1)
            );
        }
        if s.is_complete() {
            self.end_stream(id, StreamEnd::Clean, ctx);
        }
    }

    /// The local socket is writable: the sink goes on.
    pub(super) fn flush_sink(&mut self, id: StreamId, ctx: &mut Ctx<'_>) {
        self.after_delivery(id, ctx);
    }

    pub(super) fn process_events(&mut self, ctx: &mut Ctx<'_>) -> Result<(), TunnelError> {
        loop {
            let Some(ev) = self.session.as_mut().and_then(Session::poll_event) else {
                return Ok(());
            };
            match ev {
                Event::Request { stream, request } => {
                    let window = Settings::default().initial_stream_window as usize;
                    self.streams.insert(
                        stream,
                        Stream::requested(stream, FlowKey::NONE, window, ctx.now),
                    );
                    self.idle_since = None;
                    self.last_request = Some(ctx.now);
                    self.actions.push_back(Action::Request {
                        id: stream,
                        request,
                    });
                }
                Event::InvalidRequest { stream, error } => {
                    log::debug!(
                        "reactor {}: malformed CONNECT from {}: {error}",
                        ctx.env.reactor,
                        self.role.describe()
                    );
                    self.answer_and_reset(stream, error.status(), ctx);
                    self.actions.push_back(Action::RequestRefused {
                        status: error.status(),
                        reason: RejectReason::from_request_error(&error),
                    });
                }
                Event::Response { stream, response } => {
                    ctx.metrics
                        .stream_answered(RoleLabel::Client, response.status);
                    self.response(stream, response.status, ctx);
                }
                Event::Data { stream, data } => {
                    // Only payload fed through `handle_input` comes back like this, and the
                    // receive path never feeds it; deliver it the same way all the same.
                    if let Some(s) = self.streams.get_mut(&stream) {
                        let dst = s.writable_local();
                        if let Err(SinkError::Overrun) = s.sink.deliver(&data, dst) {
                            return Err(TunnelError::Http2(format!(
                                "peer overran stream {stream:?}'s window"
                            )));
                        }
                        self.after_delivery(stream, ctx);
                    }
                }
                Event::StreamEnd { stream } => {
                    if let Some(s) = self.streams.get_mut(&stream) {
                        s.remote_eof = true;
                        self.after_delivery(stream, ctx);
                    }
                }
                Event::Reset { stream, code, .. } => {
                    let Some(s) = self.streams.get_mut(&stream) else {
                        continue;
                    };
                    s.stream_gone = true;
                    if code.is_eof() {
                        s.remote_eof = true;
                        // We can no longer send: the local socket's input is moot.
                        s.local_eof = true;
                        self.after_delivery(stream, ctx);
                    } else {
                        log::debug!(
                            "reactor {}: stream {stream:?} reset by the peer ({code:?})",
                            ctx.env.reactor
                        );
                        self.end_stream(
                            stream,
                            StreamEnd::TunnelBroken {
                                kind: FailureKind::StreamReset,
                            },
                            ctx,
                        );
                    }
                }
                Event::SendCapacity { .. } => {
                    let waiting = std::mem::take(&mut self.waiting_credit);
                    for id in waiting {
                        self.make_runnable(id);
                    }
                    self.wake_blocked();
                }
                Event::GoAway { .. } => {
                    if matches!(self.role, Role::Client { .. }) && !self.retiring {
                        self.retiring = true;
                        self.actions.push_back(Action::GoAway);
                    }
                }
                Event::Drained => {
                    if self.writer.is_some() {
                        // Closing now would cut the frame in flight (the kernel matrix saw a
                        // stream lose its last 81 bytes and END_STREAM that way).
                        self.close_when_written = true;
                        continue;
                    }
                    self.close(TunnelClose::Closed, ctx);
                    return Ok(());
                }
                Event::ConnectionError(e) => return Err(TunnelError::Http2(e.to_string())),
            }
        }
    }

    /// Client: the answer to a stream's CONNECT.
    pub(super) fn response(&mut self, id: StreamId, status: u16, ctx: &mut Ctx<'_>) {
        let Some(s) = self.streams.get_mut(&id) else {
            return;
        };
        s.record.status = Some(status);
        if status != 200 {
            log::debug!(
                "reactor {}: CONNECT answered {status}; client reset",
                ctx.env.reactor
            );
            return self.end_stream(
                id,
                StreamEnd::TunnelBroken {
                    kind: FailureKind::ConnectRejected,
                },
                ctx,
            );
        }
        self.stream_opened(id, ctx);
    }
}
