//! How a tunnel ends: politely (GOAWAY, flush, close_notify, FIN, then the peer's FIN, while
//! streams that finished both ways deliver their tail) or by failing (every stream reset, the
//! socket closed with a reset).
//!
//! A failure the peer caused and can be told about — an HTTP/2 connection error (the session
//! queued a GOAWAY naming it, RFC 9113 §5.4.1) or a refused TLS handshake (rustls wrote its
//! alert) — first says so: the goodbye is written, then FIN, then the socket is read until the
//! peer's FIN, all within [`GOODBYE_LINGER`]; only a peer that does not finish by then gets a
//! reset. Closing at once with `SO_LINGER` 0 would discard the goodbye with the unsent bytes,
//! and the peer would only ever see a reset.

use std::io;
use std::time::Duration;

use hbone_proto::StreamId;

use super::{Action, Ctx, Phase, Tunnel, CLOSE_LINGER};
use crate::data_plane::driver::Interest;
use crate::data_plane::timer::TimerKind;
use crate::observability::hbone_metrics::{TunnelClose, TunnelFailure};
use crate::observability::metrics::FailureKind;
use crate::tls::handshake::HandshakeError;
use crate::tls::ktls;
use crate::tunnel::error::{Labelled, TunnelError};
use crate::tunnel::streams::{Stream, StreamEnd, StreamPhase};
use crate::tunnel::transport::Transport;

/// How long a failing tunnel may take to deliver its goodbye and see the peer's FIN.
pub const GOODBYE_LINGER: Duration = Duration::from_secs(1);

impl Tunnel {
    /// The peer will send nothing more. Streams that already got everything both ways finish
    /// delivering their tail; any other stream is cut off and reset (counted).
    pub(super) fn peer_closed(&mut self, ctx: &mut Ctx<'_>) {
        let unfinished = self.unfinished_streams();
        if unfinished > 0 {
            log::info!(
                "reactor {}: peer closed a {} tunnel with {unfinished} unfinished streams; \
                 resetting them",
                ctx.env.reactor,
                self.role.label().label()
            );
            ctx.metrics
                .failed(self.role.label(), TunnelFailure::PeerClosed);
        }
        self.close(TunnelClose::PeerClosed, ctx);
    }

    /// Closes the tunnel politely (see the module docs): streams that finished both ways may
    /// still deliver their tail; the others are reset.
    pub fn close(&mut self, reason: TunnelClose, ctx: &mut Ctx<'_>) {
        match self.phase {
            Phase::Closing | Phase::Closed => return,
            Phase::Connecting | Phase::Handshaking => {
                // Nothing was said over it yet: it just ends.
                ctx.metrics.closed(self.role.label(), reason);
                self.end_streams(
                    |_| true,
                    StreamEnd::TunnelBroken {
                        kind: FailureKind::TunnelFailed,
                    },
                    ctx,
                );
                let connecting = self.phase == Phase::Connecting;
                self.phase = Phase::Closed;
                self.actions.push_back(Action::Closed {
                    reset: false,
                    connecting,
                });
                return;
            }
            Phase::Open => {}
        }
        if self.writer.is_some() {
            // A frame is half written: no polite end is possible.
            return self.fail(TunnelError::StreamEndedMidFrame, ctx);
        }
        log::debug!(
            "reactor {}: closing {} tunnel ({}, {} bytes queued)",
            ctx.env.reactor,
            self.role.label().label(),
            reason.label(),
            self.transport.as_ref().map_or(0, Transport::out_pending)
        );
        let role = self.role.label();
        ctx.metrics.open_ended(role);
        ctx.metrics.closed(role, reason);
        self.phase = Phase::Closing;
        self.actions.push_back(Action::Closing);
        self.end_streams(
            |s| !(s.phase == StreamPhase::Open && s.remote_eof && s.local_eof),
            StreamEnd::TunnelBroken {
                kind: FailureKind::TunnelFailed,
            },
            ctx,
        );
        if let Some(s) = self.session.as_mut() {
            s.goaway();
            self.frames.clear();
            s.poll_transmit(&mut self.frames);
        }
        if let Some(t) = self.transport.as_mut() {
            t.queue(&self.frames);
        }
        let key = self.key;
        self.push_timer(key, ctx.now + CLOSE_LINGER, TimerKind::Linger);
        self.continue_close(ctx);
    }

    /// Closing: flush, then close_notify and FIN once, then discard input until EOF.
    pub(super) fn continue_close(&mut self, ctx: &mut Ctx<'_>) {
        if self.socket_done {
            return self.check_socket_done(ctx);
        }
        let fd = self.raw();
        if !self.fin_sent {
            if let Some(transport) = self.transport.as_mut() {
                match transport.flush(fd) {
                    Ok(true) => {}
                    Ok(false) => return self.arm_socket(Interest::Write),
                    Err(e) => {
                        log::debug!("reactor {}: closing tunnel: {e}", ctx.env.reactor);
                        return self.close_socket(true, ctx);
                    }
                }
                transport.send_close_notify(fd);
            } else if let Some(hs) = self.handshake.as_mut() {
                // A refused handshake: rustls's alert goes out first.
                match hs.flush_pending(fd) {
                    Ok(true) => {}
                    Ok(false) => return self.arm_socket(Interest::Write),
                    Err(_) => return self.close_socket(true, ctx),
                }
            } else {
                return self.close_socket(true, ctx);
            }
            self.fin_sent = true;
            let _ = crate::sys::socket::shutdown_write(fd);
        }
        let mut scratch = [0u8; 16 * 1024];
        loop {
            match ktls::recv_record(fd, &mut scratch, libc::MSG_DONTWAIT) {
                Ok(r) if r.len == 0 && r.record_type == ktls::CONTENT_APPLICATION_DATA => {
                    return self.close_socket(false, ctx)
                }
                Ok(_) => {}
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    return self.arm_socket(Interest::Read)
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => {
                    log::debug!("reactor {}: closing tunnel: {e}", ctx.env.reactor);
                    return self.close_socket(false, ctx);
                }
            }
        }
    }

    /// The socket's part is over; the tunnel ends once no stream is left delivering.
    pub(super) fn close_socket(&mut self, reset: bool, ctx: &mut Ctx<'_>) {
        self.socket_done = true;
        if reset {
            // Streams cannot finish without the socket being closed cleanly anyway.
            self.end_streams(
                |_| true,
                StreamEnd::TunnelBroken {
                    kind: FailureKind::TunnelFailed,
                },
                ctx,
            );
        }
        if self.streams.is_empty() && self.phase != Phase::Closed {
            self.phase = Phase::Closed;
            self.actions.push_back(Action::Closed {
                reset,
                connecting: false,
            });
        }
    }

    pub(super) fn check_socket_done(&mut self, ctx: &mut Ctx<'_>) {
        if self.phase == Phase::Closing && self.socket_done {
            self.close_socket(false, ctx);
        }
    }

    /// The tunnel failed: log, count, reset its streams, end it with a reset.
    pub fn fail(&mut self, e: TunnelError, ctx: &mut Ctx<'_>) {
        if self.phase == Phase::Closed {
            return;
        }
        let role = self.role.label();
        let level = if self.phase == Phase::Open {
            log::Level::Info
        } else {
            log::Level::Warn
        };
        // Peers provoke these at will (one per refused handshake): rate-limited per reason.
        crate::log_limited!(
            level,
            e.failure().label(),
            "reactor {}: {} tunnel {} failed: {} ({})",
            ctx.env.reactor,
            role.label(),
            self.role.describe(),
            Labelled(&e),
            self.describe_io()
        );
        ctx.metrics.failed(role, e.failure());
        if self.phase == Phase::Open {
            ctx.metrics.open_ended(role);
        }
        if self.phase != Phase::Closing {
            ctx.metrics.closed_failed(role, e.failure());
        }
        // A half-written DATA frame cannot be followed by a GOAWAY: no goodbye then.
        let goodbye = self.writer.take().is_none()
            && matches!(self.phase, Phase::Open | Phase::Handshaking)
            && self.has_goodbye(&e);
        let connecting = self.phase == Phase::Connecting;
        // Closed first: the streams' endings below must not start another ending.
        self.phase = Phase::Closed;
        self.end_streams(
            |_| true,
            StreamEnd::TunnelBroken {
                kind: FailureKind::TunnelFailed,
            },
            ctx,
        );
        if goodbye {
            // The GOAWAY the session queued (and any RST_STREAM after it) goes into the
            // output, then the polite close's flush, FIN and wait for the peer's FIN.
            if let (Some(s), Some(t)) = (self.session.as_mut(), self.transport.as_mut()) {
                self.frames.clear();
                s.poll_transmit(&mut self.frames);
                t.queue(&self.frames);
            }
            self.phase = Phase::Closing;
            self.fin_sent = false;
            self.socket_done = false;
            self.actions.push_back(Action::Closing);
            let key = self.key;
            self.push_timer(key, ctx.now + GOODBYE_LINGER, TimerKind::Linger);
            return self.continue_close(ctx);
        }
        self.actions.push_back(Action::Closed {
            reset: true,
            connecting,
        });
    }

    /// Whether the peer can be told why the tunnel fails: the session queued a GOAWAY for an
    /// HTTP/2 connection error, or rustls wrote the alert of a handshake it refused.
    fn has_goodbye(&self, e: &TunnelError) -> bool {
        match e {
            TunnelError::Http2(_) => {
                self.transport.is_some() && self.session.as_ref().is_some_and(|s| s.has_transmit())
            }
            TunnelError::Handshake(HandshakeError::Tls(_)) => self.handshake.is_some(),
            _ => false,
        }
    }

    pub(super) fn end_streams(
        &mut self,
        which: impl Fn(&Stream) -> bool,
        end: StreamEnd,
        ctx: &mut Ctx<'_>,
    ) {
        let ids: Vec<StreamId> = self
            .streams
            .values()
            .filter(|s| which(s))
            .map(|s| s.id)
            .collect();
        let writer = self.writer.take();
        for id in ids {
            self.end_stream(id, end, ctx);
        }
        if writer.is_some_and(|w| self.streams.contains_key(&w)) {
            self.writer = writer;
        }
    }
}
