//! One CONNECT stream of a tunnel and the local socket it carries: the captured client on the
//! outbound side, the connection to the destination pod on the inbound side.
//!
//! A [`Stream`] owns that socket, its one queue toward it ([`Sink`]), how its bytes go into the
//! tunnel ([`Outgoing`]: copied into the tunnel's output, or a zero-copy [`FrameSender`]), the
//! state of each direction, and the flow's access record and counters. The tunnel drives it;
//! the reactor only knows its key (for the driver's readiness events and timers) and gets the
//! socket, the record and the reason back when it ends ([`EndedStream`]).

use std::net::SocketAddr;
use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;
use std::time::Instant;

use hbone_proto::StreamId;

use super::frames::FrameSender;
use super::sink::Sink;
use crate::data_plane::authorization::Admission;
use crate::data_plane::driver::{FlowKey, Side};
use crate::data_plane::splice::{Pipe, PipePool};
use crate::observability::access_log::FlowRecord;
use crate::observability::metrics::{CloseKind, FailureKind, TcpCounters};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StreamPhase {
    /// Inbound: the CONNECT arrived; the reactor decides (payload that follows is queued).
    Requested,
    /// Inbound: connecting to the destination; the CONNECT is answered after.
    Connecting,
    /// Outbound: CONNECT sent, no answer yet.
    AwaitingResponse,
    /// Bytes flow both ways.
    Open,
}

/// How a stream's local bytes reach the tunnel.
#[derive(Debug)]
pub enum Outgoing {
    /// Read from the socket straight into the tunnel's output (user-space TLS, or kTLS with
    /// `node.hbone.zero_copy` off).
    Copy,
    /// kTLS: socket → pipe → DATA header written, payload spliced into the tunnel.
    Splice(FrameSender<Pipe>),
}

/// How a stream ends, which decides what each side sees.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StreamEnd {
    /// Both directions finished and were delivered.
    Clean,
    /// The local socket failed: the stream is reset (CONNECT_ERROR), the socket closed as is.
    LocalBroken { kind: FailureKind, errno: i32 },
    /// The tunnel side failed (reset stream, dead tunnel, refused CONNECT): the local socket
    /// is reset.
    TunnelBroken { kind: FailureKind },
    /// ringtun ended it (idle, drain deadline): both ends reset.
    Cut(CloseKind),
}

impl StreamEnd {
    /// Whether the local socket is closed with a reset (the other side broke, or ringtun cut
    /// the flow: a FIN would let the application take a cut-off stream for a complete one).
    pub fn resets_local(self) -> bool {
        matches!(self, StreamEnd::Cut(_) | StreamEnd::TunnelBroken { .. })
    }
}

/// What the reactor gets back when a stream ends: it releases the driver's requests for
/// `key`, closes `local` as `end` says, counts and logs the flow.
#[derive(Debug)]
pub struct EndedStream {
    pub key: FlowKey,
    pub local: Option<OwnedFd>,
    /// A connect was still in flight on `local`.
    pub connecting: bool,
    pub end: StreamEnd,
    pub was_open: bool,
    pub started: Instant,
    pub counters: Arc<TcpCounters>,
    pub record: FlowRecord,
}

impl EndedStream {
    /// Closes the local socket as the end says (a reset, or as it is).
    pub fn close_local(&mut self) {
        if let Some(fd) = self.local.take() {
            if self.end.resets_local() {
                crate::data_plane::socket::close_with_reset(fd);
            }
        }
    }
}

/// What the reactor hands a tunnel to carry a new stream.
#[derive(Debug)]
pub struct StreamSetup {
    pub key: FlowKey,
    pub local: OwnedFd,
    pub started: Instant,
    pub counters: Arc<TcpCounters>,
    pub record: FlowRecord,
    /// The local workload the stream belongs to (`namespace/name`: the source outbound, the
    /// destination inbound): a reload that takes it off this node drains the stream.
    pub owner: Arc<str>,
    /// Inbound: what authorization admitted it on (a reload decides it again).
    pub admission: Option<Admission>,
}

/// See the module docs.
#[derive(Debug)]
pub struct Stream {
    pub key: FlowKey,
    pub id: StreamId,
    /// `None` only while an inbound CONNECT waits for the reactor's decision.
    pub local: Option<OwnedFd>,
    /// The driver side the local socket is registered as: outbound streams carry the captured
    /// client (`Downstream`), inbound ones the delivery connection (`Upstream`, connected by
    /// us — a connecting socket must be the upstream side).
    pub side: Side,
    pub phase: StreamPhase,
    pub sink: Sink<Pipe>,
    pub outgoing: Outgoing,
    /// The local socket reached EOF; END_STREAM went (or goes) to the tunnel.
    pub local_eof: bool,
    /// The peer ended its direction (END_STREAM, or a NO_ERROR/CANCEL reset).
    pub remote_eof: bool,
    /// Our write side of the local socket is shut down (the peer's EOF was delivered).
    pub local_shut: bool,
    /// The stream no longer exists in the session (ended both ways, or reset).
    pub stream_gone: bool,
    /// Waiting in one of the tunnel's queues (room in its output, or credit).
    pub blocked: bool,
    /// In the tunnel's run queue.
    pub queued: bool,
    pub started: Instant,
    pub last_active: Instant,
    pub counters: Arc<TcpCounters>,
    pub record: FlowRecord,
    /// See [`StreamSetup::owner`] (empty while an inbound CONNECT waits for its decision).
    pub owner: Arc<str>,
    /// See [`StreamSetup::admission`].
    pub admission: Option<Admission>,
    /// A drain deadline is set (its workload left this node).
    pub draining: bool,
    /// Of the sink's delivered bytes, those already counted in the record and counters.
    counted_local: u64,
}

impl Stream {
    /// A stream whose local socket is known (outbound, at open; inbound, once accepted).
    pub fn new(
        id: StreamId,
        setup: StreamSetup,
        side: Side,
        phase: StreamPhase,
        window: usize,
        zero_copy: bool,
    ) -> Stream {
        let mut s = Stream::requested(id, setup.key, window, setup.started);
        s.local = Some(setup.local);
        s.side = side;
        s.phase = phase;
        s.counters = setup.counters;
        s.record = setup.record;
        s.owner = setup.owner;
        s.admission = setup.admission;
        s.outgoing = if zero_copy {
            Outgoing::Splice(FrameSender::new(true))
        } else {
            Outgoing::Copy
        };
        s
    }

    /// An inbound stream whose CONNECT the reactor has not decided yet: it has a sink (payload
    /// may follow the CONNECT at once) but no socket.
    pub fn requested(id: StreamId, key: FlowKey, window: usize, now: Instant) -> Stream {
        Stream {
            key,
            id,
            local: None,
            side: Side::Upstream,
            phase: StreamPhase::Requested,
            sink: Sink::new(window),
            outgoing: Outgoing::Copy,
            local_eof: false,
            remote_eof: false,
            local_shut: false,
            stream_gone: false,
            blocked: false,
            queued: false,
            started: now,
            last_active: now,
            counters: Arc::new(TcpCounters::default()),
            record: FlowRecord::new(0, "inbound_hbone"),
            owner: Arc::from(""),
            admission: None,
            draining: false,
            counted_local: 0,
        }
    }

    pub fn local_fd(&self) -> Option<RawFd> {
        self.local.as_ref().map(|f| f.as_raw_fd())
    }

    /// Bytes that can reach the local socket now (it exists and is connected).
    pub fn writable_local(&self) -> Option<RawFd> {
        match self.phase {
            StreamPhase::Open | StreamPhase::AwaitingResponse => self.local_fd(),
            StreamPhase::Requested | StreamPhase::Connecting => None,
        }
    }

    /// Counts the bytes the sink delivered since the last call, in the access record and the
    /// Istio TCP counters (received = from the client's side, sent = toward it).
    pub fn count_delivered(&mut self) -> u64 {
        let n = self.sink.delivered - self.counted_local;
        self.counted_local = self.sink.delivered;
        match self.side {
            Side::Downstream => {
                self.record.bytes_to_downstream += n;
                self.counters.sent_bytes.fetch_add(n, Relaxed);
            }
            Side::Upstream => {
                self.record.bytes_to_upstream += n;
                self.counters.received_bytes.fetch_add(n, Relaxed);
            }
        }
        n
    }

    /// Counts bytes that went from the local socket into the tunnel.
    pub fn count_from_local(&mut self, n: usize) {
        let n = n as u64;
        match self.side {
            Side::Downstream => {
                self.record.bytes_to_upstream += n;
                self.counters.received_bytes.fetch_add(n, Relaxed);
            }
            Side::Upstream => {
                self.record.bytes_to_downstream += n;
                self.counters.sent_bytes.fetch_add(n, Relaxed);
            }
        }
    }

    /// Both directions finished and delivered: a clean end.
    pub fn is_complete(&self) -> bool {
        let outgoing_done = self.local_eof || self.stream_gone;
        let incoming_done = self.remote_eof && self.sink.buffered() == 0 && self.local_shut;
        outgoing_done && incoming_done
    }

    /// A local socket error as the end it causes.
    pub fn local_broken(&self, errno: i32) -> StreamEnd {
        StreamEnd::LocalBroken {
            kind: match self.side {
                Side::Downstream => FailureKind::DownstreamReset,
                Side::Upstream => FailureKind::UpstreamReset,
            },
            errno,
        }
    }

    /// Gives pipes back (empty ones) or closes them, and turns the stream into what the
    /// reactor needs to finish the flow.
    pub fn end(mut self, end: StreamEnd, pipes: &mut PipePool) -> EndedStream {
        self.sink.release(pipes);
        if let Outgoing::Splice(sender) = &mut self.outgoing {
            sender.release(pipes);
        }
        EndedStream {
            key: self.key,
            local: self.local,
            connecting: self.phase == StreamPhase::Connecting,
            end,
            was_open: self.phase == StreamPhase::Open,
            started: self.started,
            counters: self.counters,
            record: self.record,
        }
    }
}

/// Where an outbound flow's tunnel goes, kept so the flow can open a new tunnel if the one it
/// waited on drains before granting it a stream.
#[derive(Debug, Clone)]
pub struct TunnelTarget {
    pub peer: SocketAddr,
    pub source: crate::control_plane::workload_registry::WorkloadId,
    pub source_id: crate::control_plane::identity::SpiffeId,
    pub expected: crate::control_plane::identity::SpiffeId,
    pub netns: Option<crate::redirection::netns::NetNs>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_local_socket_is_reset_unless_it_broke_or_the_stream_ended_cleanly() {
        let k = FailureKind::StreamReset;
        assert!(!StreamEnd::Clean.resets_local());
        assert!(!StreamEnd::LocalBroken { kind: k, errno: 0 }.resets_local());
        assert!(StreamEnd::TunnelBroken { kind: k }.resets_local());
        assert!(StreamEnd::Cut(CloseKind::IdleTimeout).resets_local());
    }
}
