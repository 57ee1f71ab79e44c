//! How a tunnel ends: politely (GOAWAY, flush, close_notify, FIN, then the peer's FIN, while
//! streams that finished both ways deliver their tail) or by failing (every stream reset, the
//! socket closed with a reset).

use std::io;

use hbone_proto::StreamId;

use super::{Action, Ctx, Phase, Tunnel, CLOSE_LINGER};
use crate::data_plane::driver::Interest;
use crate::data_plane::timer::TimerKind;
use crate::observability::hbone_metrics::{TunnelClose, TunnelFailure};
use crate::observability::metrics::FailureKind;
use crate::tls::ktls;
use crate::tunnel::error::{Labelled, TunnelError};
use crate::tunnel::streams::{Stream, StreamEnd, StreamPhase};
use crate::tunnel::transport::Transport;

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
        let Some(transport) = self.transport.as_mut() else {
            return self.close_socket(true, ctx);
        };
        if !self.fin_sent {
            match transport.flush(fd) {
                Ok(true) => {}
                Ok(false) => return self.arm_socket(Interest::Write),
                Err(e) => {
                    log::debug!("reactor {}: closing tunnel: {e}", ctx.env.reactor);
                    return self.close_socket(true, ctx);
                }
            }
            self.fin_sent = true;
            transport.send_close_notify(fd);
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
        self.writer = None;
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
        self.actions.push_back(Action::Closed {
            reset: true,
            connecting,
        });
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
