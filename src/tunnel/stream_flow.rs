//! A connection carried by an HBONE tunnel stream: one local TCP socket (the captured client on
//! the outbound side, the connection to the destination pod on the inbound side) joined to one
//! HTTP/2 stream of a [`Tunnel`](super::connection::Tunnel). The reactor drives both ends; this
//! type keeps the stream's state and the bytes that arrived from the tunnel but could not be
//! written to the local socket yet (bounded by the stream's receive window: credit goes back
//! to the peer only as those bytes leave, so a slow local socket slows its own stream and no
//! other).

use std::io;
use std::net::SocketAddr;
use std::os::fd::{AsRawFd, OwnedFd};
use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;
use std::time::Instant;

use hbone_proto::{ConnectRequest, StreamId};

use super::io::{FrameSender, StreamSink};
use super::pool::TunnelId;
use crate::control_plane::identity::SpiffeId;
use crate::control_plane::workload_registry::WorkloadId;
use crate::data_plane::driver::{armed_bit, FlowKey, Interest, Side};
use crate::data_plane::socket::send_nonblocking as send;
use crate::data_plane::splice::{Pipe, PipePool};
use crate::observability::access_log::FlowRecord;
use crate::observability::metrics::TcpCounters;
use crate::redirection::netns::NetNs;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StreamPhase {
    /// Outbound: queued on the pool for a tunnel.
    WaitingTunnel,
    /// Outbound: CONNECT sent, no answer yet.
    AwaitingResponse,
    /// Inbound: connecting to the destination pod; the CONNECT is answered after.
    Connecting,
    /// Bytes flow both ways.
    Open,
}

/// Where an outbound flow's tunnel goes, kept so the flow can open a new tunnel if the one it
/// waited on drains before granting it a stream.
#[derive(Debug, Clone)]
pub struct TunnelTarget {
    pub peer: SocketAddr,
    pub source: WorkloadId,
    pub source_id: SpiffeId,
    pub expected: SpiffeId,
    pub netns: Option<NetNs>,
}

pub struct StreamFlow {
    pub key: FlowKey,
    pub local: OwnedFd,
    /// Which driver side the local socket is registered as (a connecting socket must be
    /// `Upstream`, so inbound flows use `Upstream` and outbound ones `Downstream`).
    pub local_side: Side,
    pub phase: StreamPhase,
    pub tunnel: Option<FlowKey>,
    /// Outbound: the pool's tunnel this flow waits on or was granted a stream of.
    pub pool_id: Option<TunnelId>,
    /// Outbound: a stream on `pool_id` is reserved for this flow (give it back when done).
    pub reserved: bool,
    pub stream: Option<StreamId>,
    /// Outbound: the CONNECT to send once a tunnel is ready.
    pub request: Option<ConnectRequest>,
    /// Outbound: where a new tunnel for this flow would go.
    pub target: Option<TunnelTarget>,
    /// Bytes from the tunnel waiting for the local socket.
    to_local: Vec<u8>,
    to_local_pos: usize,
    /// The local socket reached EOF; END_STREAM went to the tunnel.
    pub local_eof: bool,
    /// The peer ended its direction (END_STREAM, or a NO_ERROR/CANCEL reset).
    pub remote_eof: bool,
    /// Our write side of the local socket is shut down (the peer's EOF was delivered).
    pub local_shut: bool,
    /// The stream no longer exists in the session (ended both ways or reset).
    pub stream_gone: bool,
    /// Waiting on the tunnel (send credit or room in its output).
    pub blocked: bool,
    pub armed: u8,
    pub queued: bool,
    pub started: Instant,
    pub last_active: Instant,
    pub counters: Arc<TcpCounters>,
    pub record: FlowRecord,
    /// kTLS tunnels: local socket → pipe → DATA frames spliced into the tunnel.
    pub sender: Option<FrameSender<Pipe>>,
    /// kTLS tunnels: DATA payload spliced from the tunnel into a pipe → local socket.
    pub sink: Option<StreamSink<Pipe>>,
}

impl StreamFlow {
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        key: FlowKey,
        local: OwnedFd,
        local_side: Side,
        phase: StreamPhase,
        counters: Arc<TcpCounters>,
        record: FlowRecord,
        now: Instant,
    ) -> StreamFlow {
        StreamFlow {
            key,
            local,
            local_side,
            phase,
            tunnel: None,
            pool_id: None,
            reserved: false,
            stream: None,
            request: None,
            target: None,
            to_local: Vec::new(),
            to_local_pos: 0,
            local_eof: false,
            remote_eof: false,
            local_shut: false,
            stream_gone: false,
            blocked: false,
            armed: 0,
            queued: false,
            started: now,
            last_active: now,
            counters,
            record,
            sender: None,
            sink: None,
        }
    }

    /// Switches the stream to the zero-copy path of a kTLS tunnel (called when it opens).
    /// `max_spill` bounds the user-space fallback buffer (the stream's receive window).
    ///
    /// From here on the sink is the stream's only queue toward the local socket: bytes the
    /// copy path still holds move into it first, and [`deliver`](Self::deliver) appends
    /// behind whatever it holds. (An outbound stream gets its sink when the CONNECT answer is
    /// processed, after DATA that followed the answer on the wire may already have been
    /// copied; with two queues, bytes spliced into the pipe could overtake them.)
    pub fn use_zero_copy(&mut self, max_spill: usize) {
        self.sender = Some(FrameSender::new(true));
        let mut sink = StreamSink::new(self.local.as_raw_fd(), max_spill);
        if self.to_local_pos < self.to_local.len() {
            sink.push_copied(&self.to_local[self.to_local_pos..]);
        }
        self.to_local = Vec::new();
        self.to_local_pos = 0;
        self.sink = Some(sink);
    }

    /// Gives pipes back to the pool (empty ones) or closes them.
    pub fn release_pipes(&mut self, pool: &mut PipePool) {
        if let Some(s) = self.sender.as_mut() {
            s.release(pool);
        }
        if let Some(s) = self.sink.as_mut() {
            s.release(pool);
        }
    }

    /// Bytes waiting for the local socket.
    pub fn pending_local(&self) -> usize {
        self.to_local.len() - self.to_local_pos + self.sink.as_ref().map_or(0, |s| s.buffered())
    }

    /// Hands tunnel payload that came through user space to the local socket, in order behind
    /// everything received before it. Without a sink: written directly when nothing is queued
    /// and the socket takes it, the rest queued; returns the bytes that left now (to release
    /// as flow-control credit). With a sink the bytes join it and `Ok(0)` is returned: their
    /// credit comes back through the sink's `take_delivered` as they leave. An error is the
    /// local socket's.
    pub fn deliver(&mut self, data: &[u8]) -> io::Result<usize> {
        if let Some(sink) = self.sink.as_mut() {
            sink.push_copied(data);
            return Ok(0);
        }
        let mut written = 0;
        if self.to_local.len() == self.to_local_pos {
            match send(self.local.as_raw_fd(), data) {
                Ok(n) => written = n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                Err(e) => return Err(e),
            }
        }
        if written < data.len() {
            self.to_local.extend_from_slice(&data[written..]);
        }
        self.count_toward_local(written);
        Ok(written)
    }

    /// Counts bytes that left the tunnel for the local socket (as they leave, whichever queue
    /// they waited in), and bytes that went from the local socket into the tunnel (`count_from_local`), in the access record and
    /// the Istio TCP counters (received = from the client's side, sent = toward it).
    pub fn count_toward_local(&mut self, n: usize) {
        let n = n as u64;
        match self.local_side {
            Side::Downstream => {
                self.record.bytes_to_downstream += n;
                self.counters.sent_bytes.fetch_add(n, Relaxed);
            }
            Side::Upstream => {
                self.record.bytes_to_upstream += n;
                self.counters.received_bytes.fetch_add(n, Relaxed);
            }
        }
    }

    pub fn count_from_local(&mut self, n: usize) {
        let n = n as u64;
        match self.local_side {
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

    /// Writes queued bytes to the local socket until it would block; returns the bytes written.
    pub fn flush_local(&mut self) -> io::Result<usize> {
        let mut total = 0;
        while self.to_local_pos < self.to_local.len() {
            match send(self.local.as_raw_fd(), &self.to_local[self.to_local_pos..]) {
                Ok(n) => {
                    self.to_local_pos += n;
                    total += n;
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) => return Err(e),
            }
        }
        if self.to_local_pos == self.to_local.len() {
            self.to_local = Vec::new();
            self.to_local_pos = 0;
        }
        self.count_toward_local(total);
        Ok(total)
    }

    pub fn is_armed(&self, side: Side, interest: Interest) -> bool {
        self.armed & armed_bit(side, interest) != 0
    }

    /// Both directions finished and delivered: a clean end.
    pub fn is_complete(&self) -> bool {
        let outgoing_done = self.local_eof || self.stream_gone;
        let incoming_done = self.remote_eof && self.pending_local() == 0 && self.local_shut;
        outgoing_done && incoming_done
    }
}
