//! The reactor's HBONE half: outbound flows checked out of the tunnel pool, tunnels opened
//! from the source pod's namespace to the destination's port 15008, the 15008 server side
//! (TLS with client certificates, CONNECT checked by [`InboundRules`], the upstream connect,
//! then 200 / 400 / 503), and the bytes between local sockets and tunnel streams.
//!
//! Ownership: tunnels and stream flows live in their own slabs; a tunnel maps its stream ids
//! to flow keys, a flow names its tunnel by key. Either side may disappear first; every lookup
//! goes through the key (slot + generation), so a stale one finds nothing.
//!
//! End of stream (DESIGN.md §4): local EOF → END_STREAM; END_STREAM → `shutdown(SHUT_WR)` once
//! the queued bytes are written; RST_STREAM NO_ERROR/CANCEL is EOF; any other reset, or a
//! tunnel that dies, resets the local socket; a local reset becomes RST_STREAM CONNECT_ERROR.

use std::cmp::Reverse;
use std::collections::HashMap;
use std::io;
use std::os::fd::{AsRawFd, OwnedFd};
use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;
use std::time::Instant;

use hbone_proto::{ConnectRequest, ErrorCode, Event as SessionEvent, Input, StreamId};
use rustls::{ClientConfig, ClientConnection, Connection, ServerConfig, ServerConnection};

use super::{Kind, Reactor, Timer, TimerKind};
use crate::control_plane::config::KtlsChoice;
use crate::control_plane::identity::SpiffeId;
use crate::control_plane::workload_registry::WorkloadId;
use crate::data_plane::driver::{self, FlowKey, Interest, Side};
use crate::data_plane::first_connection::Resolution;
use crate::data_plane::hbone_rules::{outbound_connect, InboundDecision, InboundRules};
use crate::data_plane::ktls::{self, ControlRecord};
use crate::data_plane::socket;
use crate::data_plane::splice::Pipe;
use crate::data_plane::stream_flow::{StreamFlow, StreamPhase, TunnelTarget};
use crate::data_plane::tls::{self, ClientTls};
use crate::data_plane::tunnel::{Fill, Handshake, Phase, Role, Tunnel, TunnelError};
use crate::data_plane::tunnel_io::{
    DataFrameHeaders, FrameHandler, FrameReceiver, HandlerError, RecvError, RecvStatus, SendError,
    SendStatus, StreamSink,
};
use crate::data_plane::tunnel_pool::{
    Checkout, PoolConfig, PoolEvent, PoolKey, TunnelId, TunnelPool,
};
use crate::kernel_features::KtlsSupport;
use crate::observability::access_log::{self, FlowRecord};
use crate::observability::metrics::{CloseKind, FailureKind, TcpLabels};
use crate::redirection::netns::{in_netns, NetNs};

/// TLS material for tunnels, built once at start-up and shared by every reactor.
pub struct TunnelCredentials {
    /// Client side per local identity (the source workload's certificate).
    pub client: HashMap<SpiffeId, ClientTls>,
    /// Server config per local identity (what 15008 presents for that pod).
    pub server: HashMap<SpiffeId, Arc<ServerConfig>>,
    pub ktls: KtlsSupport,
}

/// One reactor's tunnel state.
pub struct HboneState {
    pub creds: Arc<TunnelCredentials>,
    pub pool: TunnelPool<FlowKey>,
    /// Pool ids of client tunnels → their slab keys.
    pub by_pool_id: HashMap<TunnelId, FlowKey>,
    /// Client configs per (source, expected server identity).
    client_configs: HashMap<(SpiffeId, SpiffeId), Arc<ClientConfig>>,
    pub rules: InboundRules,
    pub allow_ktls: bool,
    pub record_budget: u64,
    /// Mode lines already logged (one per mode and reason per reactor; each tunnel's own
    /// line is at debug level).
    logged_modes: std::collections::HashSet<String>,
}

impl HboneState {
    pub fn new(
        creds: Arc<TunnelCredentials>,
        node: &crate::control_plane::config::NodeConfig,
    ) -> Self {
        HboneState {
            creds,
            pool: TunnelPool::new(PoolConfig {
                max_streams_per_tunnel: node.hbone.max_streams_per_tunnel,
                idle_timeout: node.hbone.pool_idle_timeout,
                ..PoolConfig::default()
            }),
            by_pool_id: HashMap::new(),
            client_configs: HashMap::new(),
            rules: InboundRules::new(node),
            allow_ktls: node.hbone.ktls == KtlsChoice::Auto,
            record_budget: node.hbone.ktls_record_budget,
            logged_modes: Default::default(),
        }
    }
}

/// The zero-copy receiver's view of the session and the streams (kTLS tunnels).
struct RecvHandler<'a> {
    session: &'a mut hbone_proto::Session,
    stream_map: &'a HashMap<StreamId, FlowKey>,
    flows: &'a mut slab::Slab<StreamFlow>,
    now: Instant,
    records: Vec<&'static str>,
    /// Flows whose sinks took payload (their credit is released after the poll).
    touched: Vec<FlowKey>,
    fatal: Option<TunnelError>,
    peer_closed: bool,
}

impl FrameHandler<Pipe> for RecvHandler<'_> {
    fn frame_bytes(&mut self, bytes: &[u8]) -> Result<(), HandlerError> {
        let mut off = 0;
        while off < bytes.len() {
            let n = match self.session.handle_input(&bytes[off..], self.now) {
                Input::Consumed(n) => n,
                Input::DataPayload { consumed, .. } => consumed,
            };
            if self.session.is_closed() {
                return Err(HandlerError);
            }
            if n == 0 {
                break;
            }
            off += n;
        }
        Ok(())
    }

    fn sink(&mut self, stream: StreamId) -> Option<&mut StreamSink<Pipe>> {
        if self.session.pending_payload().map(|(s, _)| s) != Some(stream) {
            return None;
        }
        let key = *self.stream_map.get(&stream)?;
        let sf = self
            .flows
            .get_mut(super::slot(key))
            .filter(|f| f.key == key)?;
        // Copied bytes still queued go first: then this frame is copied behind them.
        if !sf.copy_queue_empty() {
            return None;
        }
        if !self.touched.contains(&key) {
            self.touched.push(key);
        }
        sf.sink.as_mut()
    }

    fn payload_moved(&mut self, stream: StreamId, n: usize) -> Result<(), HandlerError> {
        self.session
            .data_consumed(stream, n)
            .map_err(|_| HandlerError)
    }

    fn tls_record(&mut self, record_type: u8, payload: &[u8]) -> Result<(), HandlerError> {
        match ktls::control_record(record_type, payload) {
            ControlRecord::Ignore => {
                self.records.push("new_session_ticket");
                Ok(())
            }
            ControlRecord::PeerClosed => {
                self.records.push("close_notify");
                self.peer_closed = true;
                Err(HandlerError)
            }
            ControlRecord::Retire(why) => {
                self.records.push("key_update");
                self.fatal = Some(TunnelError::new("ktls_key_update", why));
                Err(HandlerError)
            }
            ControlRecord::Fatal(why) => {
                self.records.push("alert");
                self.fatal = Some(TunnelError::new("tls_alert", why));
                Err(HandlerError)
            }
        }
    }
}

/// DATA frame headers for one stream's zero-copy sender. Called only between frames, so the
/// session's own frames (HEADERS, WINDOW_UPDATE, PING ACK...) are written first, right here;
/// if the socket cannot take them the header is refused and the sender waits.
struct FrameHeaders<'a> {
    tunnel: &'a mut Tunnel,
    stream: StreamId,
}

impl DataFrameHeaders for FrameHeaders<'_> {
    fn credit(&mut self) -> usize {
        self.tunnel
            .session
            .as_ref()
            .map_or(0, |s| s.send_capacity(self.stream))
    }

    fn max_frame_size(&mut self) -> usize {
        self.tunnel
            .session
            .as_ref()
            .map_or(0, |s| s.peer_max_frame_size() as usize)
    }

    fn data_frame_header(
        &mut self,
        len: usize,
        end_stream: bool,
    ) -> Option<[u8; hbone_proto::frame::FRAME_HEADER_LEN]> {
        let writer = self.tunnel.writer.take();
        let flushed = matches!(self.tunnel.flush(), Ok(true));
        self.tunnel.writer = writer;
        if !flushed {
            return None;
        }
        let header = self
            .tunnel
            .session
            .as_mut()?
            .data_frame_header(self.stream, len, end_stream)
            .ok()?;
        self.tunnel
            .charge_written(hbone_proto::frame::FRAME_HEADER_LEN);
        Some(header)
    }
}

/// Bytes a receiver has moved (payload and frame headers), from its counters.
fn moved(stats: &crate::data_plane::tunnel_io::RecvStats) -> usize {
    (stats.spliced_bytes + stats.buffered_bytes + stats.skipped_bytes + stats.dropped_bytes)
        as usize
        + (stats.spliced_frames + stats.buffered_frames + stats.control_frames) as usize
            * hbone_proto::frame::FRAME_HEADER_LEN
}

/// How a stream flow ends.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum StreamEnd {
    Clean,
    /// The local socket failed: the stream is reset (CONNECT_ERROR).
    LocalBroken {
        kind: FailureKind,
        errno: i32,
    },
    /// The tunnel side failed (reset stream, dead tunnel, refused CONNECT): the local socket
    /// is reset.
    TunnelBroken {
        kind: FailureKind,
    },
    /// ringtun ended it (idle, drain deadline): both ends reset.
    Cut(CloseKind),
}

impl Reactor {
    fn hbone_state(&mut self) -> &mut HboneState {
        self.hbone.as_mut().expect("hbone configured")
    }

    // ------------------------------------------------------------------ outbound: accept side

    /// A captured connection whose route is an HBONE tunnel: queue it on the pool.
    pub(super) fn start_outbound_stream(
        &mut self,
        fd: OwnedFd,
        res: Resolution,
        mut record: FlowRecord,
        netns: Option<NetNs>,
        now: Instant,
    ) {
        let Some(h) = self.hbone.as_ref() else {
            if !self.warned_tunnel {
                self.warned_tunnel = true;
                log::warn!(
                    "reactor {}: {} needs an HBONE tunnel but node.tls is not configured; such \
                     connections are refused (hbone_tunnel_unavailable)",
                    self.id,
                    record.destination
                );
            }
            return self.refuse(fd, FailureKind::TunnelUnavailable, None, record, now);
        };
        let oc = match outbound_connect(&self.state.registry, &res, record.client) {
            Ok(oc) => oc,
            Err(e) => {
                log::warn!(
                    "reactor {}: no CONNECT for {}: {e}",
                    self.id,
                    record.destination
                );
                return self.refuse(fd, FailureKind::TunnelUnavailable, None, record, now);
            }
        };
        if !h.creds.client.contains_key(&oc.source_identity) {
            log::warn!(
                "reactor {}: no certificate for {} (source of {}); refused",
                self.id,
                oc.source_identity,
                record.destination
            );
            return self.refuse(fd, FailureKind::TunnelUnavailable, None, record, now);
        }
        record.upstream = res.upstream;
        let _ = socket::set_nodelay(fd.as_raw_fd());
        let counters = self
            .metrics
            .tcp_counters(super::tcp_labels(&res, &self.state));
        let raw = fd.as_raw_fd();
        let key = self.insert_stream(|key| {
            let mut sf = StreamFlow::new(
                key,
                fd,
                Side::Downstream,
                StreamPhase::WaitingTunnel,
                counters,
                record,
                now,
            );
            sf.request = Some(oc.request.clone());
            sf.target = Some(TunnelTarget {
                peer: oc.peer,
                source: res.source.expect("outbound_connect checked the source"),
                source_id: oc.source_identity.clone(),
                expected: oc.expected_identity.clone(),
                netns: netns.clone(),
            });
            sf
        });
        if let Err(e) = self.driver.register(key, Side::Downstream, raw) {
            log::warn!("reactor {}: cannot watch a captured socket: {e}", self.id);
            return self.finish_stream(
                key,
                StreamEnd::TunnelBroken {
                    kind: FailureKind::SocketSetup,
                },
            );
        }
        self.push_timer(
            key,
            now + self.state.config.node.timeouts.connect,
            TimerKind::Connect,
        );
        self.checkout(key, &oc.pool_key(), now);
    }

    /// Takes a stream for the flow from the pool: on an open tunnel now, on a connecting one
    /// later, or on a new tunnel to the flow's target.
    fn checkout(&mut self, key: FlowKey, pool_key: &PoolKey, now: Instant) {
        let checkout = self.hbone_state().pool.checkout(pool_key, key, now);
        let outcome = match checkout {
            Checkout::Reuse(_) => "reuse",
            Checkout::Open(_) => "open",
            Checkout::Wait(_) => "wait",
            Checkout::Refuse(_) => "refuse",
        };
        self.metrics.hbone(
            "ringtun_hbone_pool_total",
            &format!("outcome=\"{outcome}\""),
            1,
        );
        let broken = |kind| StreamEnd::TunnelBroken { kind };
        match checkout {
            Checkout::Reuse(tid) => {
                self.set_pool(key, tid, true);
                match self.hbone_state().by_pool_id.get(&tid).copied() {
                    Some(tkey) => self.open_stream_on(key, tkey, now),
                    None => self.finish_stream(key, broken(FailureKind::TunnelFailed)),
                }
            }
            Checkout::Wait(tid) => self.set_pool(key, tid, false),
            Checkout::Open(tid) => {
                self.set_pool(key, tid, false);
                let Some(tt) = self.stream_mut(key).and_then(|sf| sf.target.clone()) else {
                    return self.pool_tunnel_failed(tid);
                };
                let peer = tt.peer;
                if let Err(e) = self.start_client_tunnel(tid, tt, now) {
                    log::warn!("reactor {}: cannot open a tunnel to {peer}: {e}", self.id);
                    self.pool_tunnel_failed(tid);
                }
            }
            Checkout::Refuse(r) => {
                log::warn!(
                    "reactor {}: tunnel pool refused a flow: {}",
                    self.id,
                    r.label()
                );
                self.finish_stream(key, broken(FailureKind::TunnelPoolFull));
            }
        }
    }

    fn set_pool(&mut self, key: FlowKey, tid: TunnelId, reserved: bool) {
        if let Some(sf) = self.stream_mut(key) {
            sf.pool_id = Some(tid);
            sf.reserved = reserved;
        }
    }

    fn insert_stream(&mut self, make: impl FnOnce(FlowKey) -> StreamFlow) -> FlowKey {
        let generation = self.next_gen();
        let entry = self.streams.vacant_entry();
        let key = super::make_key(Kind::Stream, entry.key(), generation);
        entry.insert(make(key));
        self.metrics.flows_open.fetch_add(1, Relaxed);
        key
    }

    fn insert_tunnel(&mut self, make: impl FnOnce(FlowKey) -> Tunnel) -> FlowKey {
        let generation = self.next_gen();
        let entry = self.tunnels.vacant_entry();
        let key = super::make_key(Kind::Tunnel, entry.key(), generation);
        entry.insert(make(key));
        key
    }

    pub(super) fn stream_mut(&mut self, key: FlowKey) -> Option<&mut StreamFlow> {
        self.streams
            .get_mut(super::slot(key))
            .filter(|f| f.key == key)
    }

    pub(super) fn tunnel_mut(&mut self, key: FlowKey) -> Option<&mut Tunnel> {
        self.tunnels
            .get_mut(super::slot(key))
            .filter(|t| t.key == key)
    }

    fn push_timer(&mut self, key: FlowKey, at: Instant, kind: TimerKind) {
        self.timers.push(Reverse(Timer {
            at,
            index: key.index,
            generation: key.generation,
            kind,
        }));
    }

    fn start_client_tunnel(
        &mut self,
        tid: TunnelId,
        target: TunnelTarget,
        now: Instant,
    ) -> io::Result<()> {
        let TunnelTarget {
            peer,
            source,
            source_id,
            expected,
            netns,
        } = target;
        let h = self.hbone.as_mut().expect("hbone configured");
        let cfg = match h.client_configs.get(&(source_id.clone(), expected.clone())) {
            Some(c) => Arc::clone(c),
            None => {
                let client = h
                    .creds
                    .client
                    .get(&source_id)
                    .ok_or_else(|| io::Error::other("no client certificate"))?;
                let c = client.config_for(&expected).map_err(io::Error::other)?;
                h.client_configs
                    .insert((source_id.clone(), expected.clone()), Arc::clone(&c));
                c
            }
        };
        let conn =
            ClientConnection::new(cfg, tls::server_name(peer.ip())).map_err(io::Error::other)?;
        let mark = self.state.config.node.socket_mark;
        let fd = in_netns(netns.as_ref(), || socket::outbound_socket(&peer, mark))??;
        let raw = fd.as_raw_fd();
        let budget = self.hbone_state().record_budget;
        let tkey = self.insert_tunnel(|key| {
            Tunnel::new(
                key,
                fd,
                Role::Client {
                    pool_id: tid,
                    peer,
                    expected,
                    source,
                },
                Connection::Client(conn),
                budget,
                now,
            )
        });
        self.hbone_state().by_pool_id.insert(tid, tkey);
        self.metrics
            .hbone("ringtun_hbone_handshakes_total", "role=\"client\"", 1);
        self.push_timer(
            tkey,
            now + self.state.config.node.timeouts.connect,
            TimerKind::Connect,
        );
        let started = self
            .driver
            .connect(tkey, raw, peer)
            .and_then(|_| self.driver.register(tkey, Side::Upstream, raw));
        if let Err(e) = started {
            self.fail_tunnel(tkey, TunnelError::new("connect", e.to_string()));
        }
        Ok(())
    }

    /// The pool gave up on a tunnel that never got a slab entry: reset its waiters.
    fn pool_tunnel_failed(&mut self, tid: TunnelId) {
        let failed = self.hbone_state().pool.tunnel_failed(tid);
        if let Ok(failed) = failed {
            for w in failed.waiters {
                self.finish_stream(
                    w,
                    StreamEnd::TunnelBroken {
                        kind: FailureKind::TunnelFailed,
                    },
                );
            }
        }
    }

    /// Sends the flow's CONNECT on an open tunnel.
    fn open_stream_on(&mut self, key: FlowKey, tkey: FlowKey, now: Instant) {
        let Some(request) = self.stream_mut(key).and_then(|sf| sf.request.take()) else {
            return;
        };
        let opened = match self.tunnel_mut(tkey) {
            Some(t) if t.phase == Phase::Open => t
                .session
                .as_mut()
                .map(|s| s.open_stream(&request).map_err(|e| e.to_string())),
            _ => None,
        };
        match opened {
            Some(Ok(sid)) => {
                if let Some(t) = self.tunnel_mut(tkey) {
                    t.streams.insert(sid, key);
                }
                if let Some(sf) = self.stream_mut(key) {
                    sf.stream = Some(sid);
                    sf.tunnel = Some(tkey);
                    sf.phase = StreamPhase::AwaitingResponse;
                }
                self.flush_tunnel(tkey, now);
            }
            Some(Err(e)) => {
                log::warn!("reactor {}: cannot open a stream: {e}", self.id);
                self.finish_stream(
                    key,
                    StreamEnd::TunnelBroken {
                        kind: FailureKind::TunnelFailed,
                    },
                );
            }
            None => self.finish_stream(
                key,
                StreamEnd::TunnelBroken {
                    kind: FailureKind::TunnelFailed,
                },
            ),
        }
    }

    /// Checks a flow out of the pool again (its tunnel drained or allowed fewer streams).
    fn retry_checkout(&mut self, key: FlowKey, now: Instant) {
        let Some(tt) = self.stream_mut(key).and_then(|sf| sf.target.clone()) else {
            return;
        };
        let pool_key = PoolKey {
            source: tt.source_id,
            peer: tt.peer,
            expected: tt.expected,
        };
        self.checkout(key, &pool_key, now);
    }

    // -------------------------------------------------------------------- inbound: 15008

    /// A connection accepted on a 15008 listener: start the TLS server handshake.
    pub(super) fn accept_tunnel(
        &mut self,
        fd: OwnedFd,
        workload: WorkloadId,
        netns: Option<NetNs>,
        now: Instant,
    ) {
        let raw = fd.as_raw_fd();
        let (local, peer) = match (socket::local_addr(raw), socket::peer_addr(raw)) {
            (Ok(l), Ok(p)) => (l, p),
            _ => return socket::close_with_reset(fd),
        };
        let Some(h) = self.hbone.as_ref() else {
            return socket::close_with_reset(fd);
        };
        let entry = self.state.registry.workload(workload);
        let config = SpiffeId::parse(&entry.identity)
            .ok()
            .and_then(|id| h.creds.server.get(&id).cloned());
        let Some(config) = config else {
            log::warn!(
                "reactor {}: tunnel to {local} refused: no server certificate for {}",
                self.id,
                entry.identity
            );
            self.metrics.hbone(
                "ringtun_hbone_tunnel_failures_total",
                "role=\"server\",reason=\"no_certificate\"",
                1,
            );
            return socket::close_with_reset(fd);
        };
        if self.tunnels.len() + self.flows.len() + self.streams.len() >= self.max_flows {
            self.metrics.failure(FailureKind::FlowLimit);
            return socket::close_with_reset(fd);
        }
        let conn = match ServerConnection::new(config) {
            Ok(c) => c,
            Err(e) => {
                log::warn!("reactor {}: TLS server setup failed: {e}", self.id);
                return socket::close_with_reset(fd);
            }
        };
        let _ = socket::set_nodelay(raw);
        let budget = self.hbone_state().record_budget;
        let tkey = self.insert_tunnel(|key| {
            Tunnel::new(
                key,
                fd,
                Role::Server {
                    workload,
                    local,
                    peer,
                    netns,
                },
                Connection::Server(conn),
                budget,
                now,
            )
        });
        self.metrics
            .hbone("ringtun_hbone_handshakes_total", "role=\"server\"", 1);
        if let Err(e) = self.driver.register(tkey, Side::Upstream, raw) {
            return self.fail_tunnel(tkey, TunnelError::new("register", e.to_string()));
        }
        self.push_timer(
            tkey,
            now + self.state.config.node.timeouts.connect,
            TimerKind::Connect,
        );
        self.drive_tunnel(tkey, now);
    }

    /// A CONNECT arrived on a server tunnel: check it, then connect to the destination.
    fn inbound_request(
        &mut self,
        tkey: FlowKey,
        sid: StreamId,
        request: ConnectRequest,
        now: Instant,
    ) {
        let Some(t) = self.tunnel_mut(tkey) else {
            return;
        };
        let Role::Server {
            local,
            peer,
            ref netns,
            ..
        } = t.role
        else {
            return;
        };
        let netns = netns.clone();
        let peer_identity = t.peer_identity.clone();
        let h = self.hbone.as_ref().expect("hbone configured");
        let decision = h.rules.check(&self.state.registry, &request, local);
        let (workload, upstream) = match decision {
            InboundDecision::Accept { workload, upstream } => (workload, upstream),
            InboundDecision::Reject { status, reason } => {
                log::debug!(
                    "reactor {}: CONNECT {} from {peer} refused with {status}: {}",
                    self.id,
                    request.authority,
                    reason.label()
                );
                return self.answer_and_close(tkey, sid, status);
            }
        };
        let mark = self.state.config.node.socket_mark;
        let made = in_netns(netns.as_ref(), || socket::outbound_socket(&upstream, mark));
        let fd = match made {
            Ok(Ok(fd)) => fd,
            Ok(Err(e)) | Err(e) => {
                log::warn!(
                    "reactor {}: cannot make a socket for {upstream}: {e}",
                    self.id
                );
                return self.answer_and_close(tkey, sid, 503);
            }
        };
        let w = &self.state.registry.workload(workload).workload;
        let labels = TcpLabels {
            reporter: "destination",
            source_workload: "unknown".into(),
            source_workload_namespace: peer_identity
                .as_ref()
                .map(|p| p.namespace().to_string())
                .unwrap_or_else(|| "unknown".into()),
            destination_workload: w.name.clone(),
            destination_workload_namespace: w.namespace.clone(),
            destination_service: "unknown".into(),
        };
        let mut record = FlowRecord::new(self.id, "inbound_hbone");
        record.source_workload = peer_identity
            .as_ref()
            .map(|p| p.to_uri())
            .unwrap_or_else(|| "unknown".into());
        record.client = peer;
        record.original_dst = local;
        record.destination = format!("workload:{}/{}", w.namespace, w.name);
        record.route = "hbone";
        record.upstream = upstream;
        record.destination_identity = Some(self.state.registry.workload(workload).identity.clone());
        let counters = self.metrics.tcp_counters(labels);
        let raw = fd.as_raw_fd();
        let key = self.insert_stream(|key| {
            let mut sf = StreamFlow::new(
                key,
                fd,
                Side::Upstream,
                StreamPhase::Connecting,
                counters,
                record,
                now,
            );
            sf.tunnel = Some(tkey);
            sf.stream = Some(sid);
            sf
        });
        if let Some(t) = self.tunnel_mut(tkey) {
            t.streams.insert(sid, key);
        }
        let started = self
            .driver
            .connect(key, raw, upstream)
            .and_then(|_| self.driver.register(key, Side::Upstream, raw));
        if let Err(e) = started {
            log::warn!("reactor {}: cannot connect to {upstream}: {e}", self.id);
            return self.stream_connected(key, Err(e.raw_os_error().unwrap_or(libc::EIO)), now);
        }
        self.push_timer(
            key,
            now + self.state.config.node.timeouts.connect,
            TimerKind::Connect,
        );
    }

    /// Answers a CONNECT that will not be served (400/503 ...) and ends the stream.
    fn answer_and_close(&mut self, tkey: FlowKey, sid: StreamId, status: u16) {
        self.metrics.hbone(
            "ringtun_hbone_streams_total",
            &format!("role=\"server\",status=\"{status}\""),
            1,
        );
        if let Some(s) = self.tunnel_mut(tkey).and_then(|t| t.session.as_mut()) {
            let _ = s.send_response(sid, status, true);
            // The client may still be sending: tell it to stop (NO_ERROR, RFC 9113 §8.1).
            let _ = s.reset(sid, ErrorCode::NO_ERROR);
        }
        self.flush_tunnel(tkey, Instant::now());
    }

    /// The inbound stream's upstream connect finished.
    pub(super) fn stream_connected(&mut self, key: FlowKey, result: Result<(), i32>, now: Instant) {
        let Some(sf) = self.stream_mut(key) else {
            return;
        };
        if sf.phase != StreamPhase::Connecting {
            return;
        }
        let (tkey, sid) = (sf.tunnel, sf.stream);
        let (Some(tkey), Some(sid)) = (tkey, sid) else {
            return;
        };
        match result {
            Ok(()) => {
                sf.phase = StreamPhase::Open;
                sf.last_active = now;
                sf.counters.opened.fetch_add(1, Relaxed);
                self.maybe_zero_copy(key);
                let answered = self
                    .tunnel_mut(tkey)
                    .and_then(|t| t.session.as_mut())
                    .map(|s| s.send_response(sid, 200, false).is_ok())
                    .unwrap_or(false);
                if !answered {
                    return self.finish_stream(
                        key,
                        StreamEnd::TunnelBroken {
                            kind: FailureKind::StreamReset,
                        },
                    );
                }
                self.metrics.hbone(
                    "ringtun_hbone_streams_total",
                    "role=\"server\",status=\"200\"",
                    1,
                );
                self.push_timer(
                    key,
                    now + self.state.config.node.timeouts.idle,
                    TimerKind::Idle,
                );
                self.flush_tunnel(tkey, now);
                self.drive_stream(key, now);
            }
            Err(errno) => {
                // 503 and the stream is over; the flow never opened.
                if let Some(t) = self.tunnel_mut(tkey) {
                    t.streams.remove(&sid);
                }
                self.answer_and_close(tkey, sid, 503);
                if let Some(sf) = self.stream_mut(key) {
                    sf.stream_gone = true;
                }
                self.finish_stream(
                    key,
                    StreamEnd::LocalBroken {
                        kind: FailureKind::from_connect_errno(errno),
                        errno,
                    },
                );
            }
        }
    }

    // ------------------------------------------------------------------------ tunnel IO

    pub(super) fn tunnel_connected(
        &mut self,
        tkey: FlowKey,
        result: Result<(), i32>,
        now: Instant,
    ) {
        let Some(t) = self.tunnel_mut(tkey) else {
            return;
        };
        if t.phase != Phase::Connecting {
            return;
        }
        match result {
            Ok(()) => {
                t.phase = Phase::Handshaking;
                self.drive_tunnel(tkey, now);
            }
            Err(errno) => self.fail_tunnel(
                tkey,
                TunnelError::new("connect", io::Error::from_raw_os_error(errno).to_string()),
            ),
        }
    }

    pub(super) fn tunnel_ready(&mut self, tkey: FlowKey, interest: Interest, now: Instant) {
        let Some(t) = self.tunnel_mut(tkey) else {
            return;
        };
        t.armed &= !driver::armed_bit(Side::Upstream, interest);
        self.drive_tunnel(tkey, now);
    }

    /// Handshake, then reading, session events and writing, as far as the socket allows.
    pub(super) fn drive_tunnel(&mut self, tkey: FlowKey, now: Instant) {
        let Some(t) = self.tunnel_mut(tkey) else {
            return;
        };
        t.queued = false;
        match t.phase {
            Phase::Connecting => return,
            Phase::Handshaking => match t.handshake() {
                Ok(Handshake::WantRead) => return self.arm_tunnel(tkey, Interest::Read),
                Ok(Handshake::WantWrite) => return self.arm_tunnel(tkey, Interest::Write),
                Ok(Handshake::Done) => {
                    if let Err(e) = self.establish(tkey, now) {
                        return self.fail_tunnel(tkey, e);
                    }
                }
                Err(e) => return self.fail_tunnel(tkey, e),
            },
            Phase::Open => {}
            Phase::Closing => return self.finish_close(tkey),
        }
        let budget = self.state.config.node.splice.max_bytes_per_wakeup;
        let mut read = 0usize;
        let mut records = Vec::new();
        loop {
            if let Err(e) = self.process_input(tkey, now) {
                return self.fail_tunnel(tkey, e);
            }
            self.process_session_events(tkey, now);
            let Some(t) = self.tunnel_mut(tkey) else {
                return;
            };
            if t.peer_eof || t.session.as_ref().is_none_or(|s| s.is_closed()) {
                break;
            }
            if read >= budget {
                if !t.queued {
                    t.queued = true;
                    self.runnable.push(tkey);
                }
                break;
            }
            if t.receiver.is_none() && t.zero_copy_rx_ready() {
                let max_frame = hbone_proto::Settings::default().max_frame_size as usize;
                t.receiver = Some(FrameReceiver::new(max_frame, true));
            }
            if t.receiver.is_some() {
                match self.receive_frames(tkey, budget - read, now) {
                    Ok((RecvStatus::WantRead, n)) => {
                        let _ = n;
                        self.process_session_events(tkey, now);
                        self.arm_tunnel(tkey, Interest::Read);
                        break;
                    }
                    Ok((RecvStatus::Yield, n)) => read += n.max(1),
                    Ok((RecvStatus::Eof, _)) => {
                        if let Some(t) = self.tunnel_mut(tkey) {
                            t.peer_eof = true;
                        }
                    }
                    Err(e) => return self.fail_tunnel(tkey, e),
                }
                continue;
            }
            match t.fill(&mut records) {
                Ok(Fill::Got(n)) => read += n,
                Ok(Fill::WouldBlock) => {
                    self.arm_tunnel(tkey, Interest::Read);
                    break;
                }
                Ok(Fill::Eof) => {
                    t.peer_eof = true;
                }
                Err(e) => {
                    self.count_records(&records);
                    return self.fail_tunnel(tkey, e);
                }
            }
        }
        self.count_records(&records);
        let Some(t) = self.tunnel_mut(tkey) else {
            return;
        };
        if t.peer_eof {
            // The peer will send nothing more. Streams that already got everything both ways
            // finish delivering their tail; any other stream is cut off and reset (counted).
            let role = t.role.label();
            let unfinished = self.unfinished_streams(tkey);
            if unfinished > 0 {
                let id = self.id;
                log::info!(
                    "reactor {id}: peer closed a {role} tunnel with {unfinished} unfinished streams; resetting them"
                );
                self.metrics.hbone(
                    "ringtun_hbone_tunnel_failures_total",
                    &format!("role=\"{role}\",reason=\"peer_closed\""),
                    1,
                );
            }
            return self.close_tunnel(tkey, Some("peer_closed"));
        }
        if t.session.as_ref().is_some_and(|s| s.is_closed()) {
            return self.fail_tunnel(tkey, TunnelError::new("http2", "session closed"));
        }
        self.flush_tunnel(tkey, now);
        self.schedule_session_timer(tkey);
    }

    /// kTLS: reads frames with the zero-copy receiver; DATA payload is spliced into the
    /// streams' pipes. Returns the receiver's status and the bytes it moved.
    fn receive_frames(
        &mut self,
        tkey: FlowKey,
        budget: usize,
        now: Instant,
    ) -> Result<(RecvStatus, usize), TunnelError> {
        let Reactor {
            tunnels,
            streams,
            pool,
            ..
        } = self;
        let Some(t) = tunnels.get_mut(super::slot(tkey)).filter(|t| t.key == tkey) else {
            return Ok((RecvStatus::WantRead, 0));
        };
        let fd = t.raw();
        let Some(mut receiver) = t.receiver.take() else {
            return Ok((RecvStatus::WantRead, 0));
        };
        let before = moved(&receiver.stats);
        let Some(session) = t.session.as_mut() else {
            t.receiver = Some(receiver);
            return Ok((RecvStatus::WantRead, 0));
        };
        let mut handler = RecvHandler {
            session,
            stream_map: &t.streams,
            flows: streams,
            now,
            records: Vec::new(),
            touched: Vec::new(),
            fatal: None,
            peer_closed: false,
        };
        let r = receiver.poll(fd, pool, &mut handler, budget);
        let n = moved(&receiver.stats) - before;
        let RecvHandler {
            records,
            touched,
            fatal,
            peer_closed,
            ..
        } = handler;
        t.receiver = Some(receiver);
        self.count_records(&records);
        for skey in touched {
            self.release_delivered(skey, now);
        }
        match r {
            Ok(status) => Ok((status, n)),
            Err(_) if peer_closed => Ok((RecvStatus::Eof, n)),
            Err(_) if fatal.is_some() => Err(fatal.expect("checked")),
            Err(RecvError::Handler) => Err(TunnelError::new("http2", "session closed")),
            Err(RecvError::Truncated) => Err(TunnelError::new(
                "peer_closed",
                "peer closed inside a frame",
            )),
            Err(RecvError::Tunnel(errno)) => Err(TunnelError::new(
                "ktls_read",
                io::Error::from_raw_os_error(errno).to_string(),
            )),
            Err(RecvError::Pipe(errno)) => Err(TunnelError::new(
                "pipe",
                io::Error::from_raw_os_error(errno).to_string(),
            )),
            Err(RecvError::FrameTooLarge(len)) => Err(TunnelError::new(
                "frame_size",
                format!("peer sent a {len}-byte frame"),
            )),
            Err(RecvError::SpillLimit(sid)) => Err(TunnelError::new(
                "flow_control",
                format!("peer overran stream {sid:?}'s window"),
            )),
            Err(RecvError::BadPadding) => Err(TunnelError::new("protocol", "bad DATA padding")),
        }
    }

    /// Gives the peer credit for the bytes a stream's sink delivered; waits for the local
    /// socket when bytes are left.
    fn release_delivered(&mut self, skey: FlowKey, now: Instant) {
        let Some(sf) = self.stream_mut(skey) else {
            return;
        };
        let delivered = sf.sink.as_mut().map_or(0, |s| s.take_delivered());
        if delivered > 0 {
            sf.last_active = now;
            sf.count_toward_local(delivered);
            if let (Some(tkey), Some(sid)) = (sf.tunnel, sf.stream) {
                if let Some(s) = self.tunnel_mut(tkey).and_then(|t| t.session.as_mut()) {
                    let _ = s.release_capacity(sid, delivered);
                }
            }
        }
        self.want_local_write(skey);
    }

    fn count_records(&self, records: &[&'static str]) {
        for r in records {
            self.metrics.hbone(
                "ringtun_hbone_tls_records_total",
                &format!("kind=\"{r}\""),
                1,
            );
        }
    }

    fn establish(&mut self, tkey: FlowKey, now: Instant) -> Result<(), TunnelError> {
        let (support, allow) = {
            let h = self.hbone.as_ref().expect("hbone configured");
            (h.creds.ktls.clone(), h.allow_ktls)
        };
        let t = self.tunnel_mut(tkey).expect("tunnel present");
        t.establish(&support, allow, now)?;
        let role = t.role.label();
        let mode = t.mode.clone().expect("mode set by establish");
        let cipher = t.cipher;
        let peer_id = t
            .peer_identity
            .as_ref()
            .map(|p| p.to_uri())
            .unwrap_or_default();
        let (peer, pool_id) = match &t.role {
            Role::Client { peer, pool_id, .. } => (*peer, Some(*pool_id)),
            Role::Server { peer, .. } => (*peer, None),
        };
        let line = format!("{role} tunnels use {mode}");
        let id = self.id;
        let h = self.hbone_state();
        if h.logged_modes.insert(line.clone()) {
            log::info!("reactor {id}: {line}");
        }
        // Once per tunnel: which TLS it runs and why (tunnels are pooled, so this is rare).
        log::info!("reactor {id}: {role} tunnel with {peer} ({peer_id}) established: {mode}");
        self.metrics.hbone(
            "ringtun_hbone_tunnels_total",
            &format!(
                "role=\"{role}\",tls=\"{}\",cipher=\"{}\"",
                mode.label(),
                cipher.map_or("unknown", |c| c.name())
            ),
            1,
        );
        self.metrics
            .hbone("ringtun_hbone_tunnels_open", &format!("role=\"{role}\""), 1);
        if let Some(tid) = pool_id {
            let ready = self.hbone_state().pool.tunnel_ready(tid, u32::MAX, now);
            if let Ok(ready) = ready {
                for w in ready.granted {
                    if let Some(sf) = self.stream_mut(w) {
                        sf.reserved = true;
                    }
                    self.open_stream_on(w, tkey, now);
                }
                for w in ready.retry {
                    self.retry_checkout(w, now);
                }
                for w in ready.refused {
                    self.finish_stream(
                        w,
                        StreamEnd::TunnelBroken {
                            kind: FailureKind::TunnelFailed,
                        },
                    );
                }
            }
            self.process_pool_events(now);
        }
        Ok(())
    }

    /// Feeds received plaintext to the session; DATA payload goes straight to its stream.
    fn process_input(&mut self, tkey: FlowKey, now: Instant) -> Result<(), TunnelError> {
        loop {
            let Some(t) = self
                .tunnels
                .get_mut(super::slot(tkey))
                .filter(|t| t.key == tkey)
            else {
                return Ok(());
            };
            let Some((session, input, streams)) = t.session_input() else {
                return Ok(());
            };
            if input.is_empty() || session.is_closed() {
                return Ok(());
            }
            if let Some((sid, remaining)) = session.pending_payload() {
                let n = remaining.min(input.len());
                let skey = streams.get(&sid).copied();
                let sf =
                    skey.and_then(|k| self.streams.get_mut(super::slot(k)).filter(|f| f.key == k));
                let (released, failed) = match sf {
                    Some(sf) => match sf.deliver(&input[..n]) {
                        Ok(w) => {
                            sf.last_active = now;
                            (w, None)
                        }
                        // The local socket failed: drop the bytes (credit goes back) and end
                        // the flow below.
                        Err(e) => (n, Some((sf.key, e.raw_os_error().unwrap_or(libc::EIO)))),
                    },
                    None => (n, None),
                };
                session
                    .data_consumed(sid, n)
                    .map_err(|e| TunnelError::new("internal", e.to_string()))?;
                if released > 0 {
                    let _ = session.release_capacity(sid, released);
                }
                t.consume_input(n);
                if let Some((skey, errno)) = failed {
                    self.finish_stream(skey, self.local_broken(skey, errno));
                } else if let Some(skey) = skey {
                    self.want_local_write(skey);
                }
                continue;
            }
            let consumed = match session.handle_input(input, now) {
                Input::Consumed(n) => n,
                Input::DataPayload { consumed, .. } => consumed,
            };
            t.consume_input(consumed);
            if consumed == 0 {
                return Ok(());
            }
        }
    }

    fn local_broken(&self, skey: FlowKey, errno: i32) -> StreamEnd {
        let side = self
            .streams
            .get(super::slot(skey))
            .map(|f| f.local_side)
            .unwrap_or(Side::Downstream);
        StreamEnd::LocalBroken {
            kind: match side {
                Side::Downstream => FailureKind::DownstreamReset,
                Side::Upstream => FailureKind::UpstreamReset,
            },
            errno,
        }
    }

    /// Arms the local socket for writing if bytes wait for it.
    fn want_local_write(&mut self, skey: FlowKey) {
        let Some(sf) = self.stream_mut(skey) else {
            return;
        };
        if sf.pending_local() > 0 {
            let side = sf.local_side;
            self.arm_stream(skey, side, Interest::Write);
        } else if sf.remote_eof && !sf.local_shut {
            // Everything arrived and left: deliver the EOF now.
            if !sf.queued {
                sf.queued = true;
                self.runnable.push(skey);
            }
        }
    }

    fn process_session_events(&mut self, tkey: FlowKey, now: Instant) {
        loop {
            let Some(t) = self.tunnel_mut(tkey) else {
                return;
            };
            let Some(ev) = t.session.as_mut().and_then(|s| s.poll_event()) else {
                return;
            };
            match ev {
                SessionEvent::Request { stream, request } => {
                    self.inbound_request(tkey, stream, request, now)
                }
                SessionEvent::InvalidRequest { stream, error } => {
                    self.answer_and_close(tkey, stream, error.status())
                }
                SessionEvent::Response { stream, response } => {
                    let Some(skey) = t.streams.get(&stream).copied() else {
                        continue;
                    };
                    let status = response.status;
                    self.metrics.hbone(
                        "ringtun_hbone_streams_total",
                        &format!("role=\"client\",status=\"{status}\""),
                        1,
                    );
                    if status == 200 {
                        if let Some(sf) = self.stream_mut(skey) {
                            sf.phase = StreamPhase::Open;
                            sf.last_active = now;
                            sf.counters.opened.fetch_add(1, Relaxed);
                        }
                        self.maybe_zero_copy(skey);
                        self.push_timer(
                            skey,
                            now + self.state.config.node.timeouts.idle,
                            TimerKind::Idle,
                        );
                        self.drive_stream(skey, now);
                    } else {
                        log::debug!(
                            "reactor {}: CONNECT answered {status}; client reset",
                            self.id
                        );
                        self.finish_stream(
                            skey,
                            StreamEnd::TunnelBroken {
                                kind: FailureKind::ConnectRejected,
                            },
                        );
                    }
                }
                SessionEvent::Data { stream, data } => {
                    // Only if payload was fed through handle_input; deliver it the same way.
                    let Some(skey) = t.streams.get(&stream).copied() else {
                        continue;
                    };
                    let r = self.stream_mut(skey).map(|sf| sf.deliver(&data));
                    match r {
                        Some(Ok(w)) => {
                            if let Some(s) = self.tunnel_mut(tkey).and_then(|t| t.session.as_mut())
                            {
                                let _ = s.release_capacity(stream, w);
                            }
                            self.want_local_write(skey);
                        }
                        Some(Err(e)) => {
                            let end =
                                self.local_broken(skey, e.raw_os_error().unwrap_or(libc::EIO));
                            self.finish_stream(skey, end);
                        }
                        None => {}
                    }
                }
                SessionEvent::StreamEnd { stream } => {
                    let Some(skey) = t.streams.get(&stream).copied() else {
                        continue;
                    };
                    if let Some(sf) = self.stream_mut(skey) {
                        sf.remote_eof = true;
                    }
                    self.drive_stream(skey, now);
                }
                SessionEvent::Reset { stream, code, .. } => {
                    let Some(skey) = t.streams.remove(&stream) else {
                        continue;
                    };
                    if let Some(sf) = self.stream_mut(skey) {
                        sf.stream_gone = true;
                    }
                    if code.is_eof() {
                        if let Some(sf) = self.stream_mut(skey) {
                            sf.remote_eof = true;
                            // We can no longer send: the local socket's input is moot.
                            sf.local_eof = true;
                        }
                        self.drive_stream(skey, now);
                    } else {
                        log::debug!("reactor {}: stream reset by the peer ({code:?})", self.id);
                        self.finish_stream(
                            skey,
                            StreamEnd::TunnelBroken {
                                kind: FailureKind::StreamReset,
                            },
                        );
                    }
                }
                SessionEvent::SendCapacity { .. } => self.wake_blocked(tkey),
                SessionEvent::GoAway { .. } => {
                    if let Role::Client { pool_id, .. } = t.role {
                        t.retiring = true;
                        let retry = self.hbone_state().pool.goaway_received(pool_id);
                        for w in retry.unwrap_or_default() {
                            self.retry_checkout(w, now);
                        }
                    }
                }
                SessionEvent::Drained => {
                    return self.close_tunnel(tkey, None);
                }
                SessionEvent::ConnectionError(e) => {
                    return self.fail_tunnel(tkey, TunnelError::new("http2", e.to_string()));
                }
            }
        }
    }

    /// Writes what the tunnel holds; wakes streams waiting for room; retires a tunnel past its
    /// record budget.
    pub(super) fn flush_tunnel(&mut self, tkey: FlowKey, now: Instant) {
        let Some(t) = self.tunnel_mut(tkey) else {
            return;
        };
        if t.phase != Phase::Open {
            return;
        }
        if t.writer.is_some() {
            // A zero-copy frame is half written: its stream finishes it, then the rest goes.
            return self.wake_blocked(tkey);
        }
        match t.flush() {
            Ok(true) => {
                if !t.blocked.is_empty() {
                    self.wake_blocked(tkey);
                }
            }
            Ok(false) => self.arm_tunnel(tkey, Interest::Write),
            Err(e) => return self.fail_tunnel(tkey, e),
        }
        let id = self.id;
        let Some(t) = self.tunnel_mut(tkey) else {
            return;
        };
        if t.budget.should_retire() && !t.retiring {
            t.retiring = true;
            let records = t.budget.records_sent();
            let role = t.role.label();
            log::info!(
                "reactor {id}: {role} tunnel sent {records} TLS records (budget reached); retiring it"
            );
            match t.role {
                Role::Client { pool_id, .. } => {
                    let retry = self.hbone_state().pool.retire(pool_id);
                    for w in retry.unwrap_or_default() {
                        self.retry_checkout(w, now);
                    }
                    self.process_pool_events(now);
                }
                Role::Server { .. } => {
                    if let Some(s) = t.session.as_mut() {
                        s.goaway();
                    }
                    let _ = t.flush();
                }
            }
            self.metrics.hbone(
                "ringtun_hbone_tunnels_closed_total",
                &format!("role=\"{role}\",reason=\"record_budget\""),
                1,
            );
        }
    }

    fn wake_blocked(&mut self, tkey: FlowKey) {
        let Some(t) = self.tunnel_mut(tkey) else {
            return;
        };
        let blocked = std::mem::take(&mut t.blocked);
        for skey in blocked {
            if let Some(sf) = self.stream_mut(skey) {
                sf.blocked = false;
                if !sf.queued {
                    sf.queued = true;
                    self.runnable.push(skey);
                }
            }
        }
    }

    fn arm_tunnel(&mut self, tkey: FlowKey, interest: Interest) {
        let Some(t) = self
            .tunnels
            .get_mut(super::slot(tkey))
            .filter(|t| t.key == tkey)
        else {
            return;
        };
        let bit = driver::armed_bit(Side::Upstream, interest);
        if t.armed & bit == 0 && self.driver.arm(tkey, Side::Upstream, interest, t.raw()) {
            t.armed |= bit;
        }
    }

    fn arm_stream(&mut self, skey: FlowKey, side: Side, interest: Interest) {
        let Some(sf) = self
            .streams
            .get_mut(super::slot(skey))
            .filter(|f| f.key == skey)
        else {
            return;
        };
        if !sf.is_armed(side, interest)
            && self.driver.arm(skey, side, interest, sf.local.as_raw_fd())
        {
            sf.armed |= driver::armed_bit(side, interest);
        }
    }

    fn schedule_session_timer(&mut self, tkey: FlowKey) {
        let Some(t) = self.tunnel_mut(tkey) else {
            return;
        };
        let next = t.session.as_ref().and_then(|s| s.poll_timeout());
        if let Some(at) = next {
            if t.timer_at != Some(at) {
                t.timer_at = Some(at);
                self.push_timer(tkey, at, TimerKind::Session);
            }
        }
    }

    pub(super) fn tunnel_timer(&mut self, tkey: FlowKey, timer: Timer, now: Instant) {
        let Some(t) = self.tunnel_mut(tkey) else {
            return;
        };
        match timer.kind {
            // The peer did not finish closing in time.
            TimerKind::Connect if t.phase == Phase::Closing => self.remove_tunnel(tkey, true),
            TimerKind::Connect if t.phase != Phase::Open => self.fail_tunnel(
                tkey,
                TunnelError::new(
                    "handshake_timeout",
                    "connect and TLS handshake took too long",
                ),
            ),
            TimerKind::Session if t.timer_at == Some(timer.at) => {
                t.timer_at = None;
                if let Some(s) = t.session.as_mut() {
                    s.handle_timeout(now);
                }
                self.process_session_events(tkey, now);
                if self
                    .tunnel_mut(tkey)
                    .is_some_and(|t| t.session.as_ref().is_some_and(|s| s.is_closed()))
                {
                    return self.fail_tunnel(
                        tkey,
                        TunnelError::new("keepalive", "peer did not answer PING"),
                    );
                }
                self.flush_tunnel(tkey, now);
                self.schedule_session_timer(tkey);
            }
            _ => {}
        }
    }

    // --------------------------------------------------------------------- stream flows

    pub(super) fn stream_ready(
        &mut self,
        skey: FlowKey,
        side: Side,
        interest: Interest,
        now: Instant,
    ) {
        let Some(sf) = self.stream_mut(skey) else {
            return;
        };
        sf.armed &= !driver::armed_bit(side, interest);
        if sf.phase == StreamPhase::Open {
            self.drive_stream(skey, now);
        } else if interest == Interest::Read && sf.local_side == Side::Downstream {
            // Waiting for a tunnel: a client that resets now is noticed at the next step.
        }
    }

    /// Moves bytes both ways between the local socket and the stream; finishes the flow when
    /// both directions are done.
    pub(super) fn drive_stream(&mut self, skey: FlowKey, now: Instant) {
        let budget = self.state.config.node.splice.max_bytes_per_wakeup;
        let Some(sf) = self.stream_mut(skey) else {
            return;
        };
        sf.queued = false;
        if sf.phase != StreamPhase::Open {
            return;
        }
        let (side, local) = (sf.local_side, sf.local.as_raw_fd());
        // Tunnel → local: what waits in the buffer.
        if sf.pending_local() > 0 {
            match sf.flush_local() {
                Ok(n) => {
                    if n > 0 {
                        sf.last_active = now;
                        if let (Some(tkey), Some(sid)) = (sf.tunnel, sf.stream) {
                            if let Some(s) = self.tunnel_mut(tkey).and_then(|t| t.session.as_mut())
                            {
                                let _ = s.release_capacity(sid, n);
                            }
                            self.flush_tunnel(tkey, now);
                        }
                    }
                }
                Err(e) => {
                    let end = self.local_broken(skey, e.raw_os_error().unwrap_or(libc::EIO));
                    return self.finish_stream(skey, end);
                }
            }
        }
        let Some(sf) = self.stream_mut(skey) else {
            return;
        };
        if sf.copy_queue_empty() {
            if let Some(sink) = sf.sink.as_mut() {
                if let Err(e) = sink.flush() {
                    let end = self.local_broken(skey, e.0);
                    return self.finish_stream(skey, end);
                }
                self.release_delivered(skey, now);
            }
        }
        let Some(sf) = self.stream_mut(skey) else {
            return;
        };
        if sf.pending_local() > 0 {
            self.arm_stream(skey, side, Interest::Write);
        } else if sf.remote_eof && !sf.local_shut {
            sf.local_shut = true;
            log::debug!(
                "reactor {}: stream flow fd {local} shut down for writing",
                self.id
            );
            // SAFETY: plain syscall on a socket we own.
            unsafe { libc::shutdown(local, libc::SHUT_WR) };
        }
        // Local → tunnel.
        let Some(sf) = self.stream_mut(skey) else {
            return;
        };
        if !sf.local_eof && !sf.stream_gone && !sf.blocked {
            let (tkey, sid) = (sf.tunnel, sf.stream);
            let (Some(tkey), Some(sid)) = (tkey, sid) else {
                return;
            };
            if self.stream_mut(skey).is_some_and(|sf| sf.sender.is_some()) {
                self.send_zero_copy(skey, tkey, sid, now);
                if self.stream_mut(skey).is_some_and(|sf| sf.is_complete()) {
                    self.finish_stream(skey, StreamEnd::Clean);
                }
                return;
            }
            let mut moved = 0usize;
            loop {
                let Some(t) = self
                    .tunnels
                    .get_mut(super::slot(tkey))
                    .filter(|t| t.key == tkey)
                else {
                    return self.finish_stream(
                        skey,
                        StreamEnd::TunnelBroken {
                            kind: FailureKind::TunnelFailed,
                        },
                    );
                };
                let credit = t.session.as_ref().map_or(0, |s| s.send_capacity(sid));
                let room = t.out_room();
                if credit == 0 || room < 16 * 1024 {
                    t.blocked.push(skey);
                    if let Some(sf) = self.stream_mut(skey) {
                        sf.blocked = true;
                    }
                    break;
                }
                if moved >= budget {
                    if let Some(sf) = self.stream_mut(skey) {
                        if !sf.queued {
                            sf.queued = true;
                            self.runnable.push(skey);
                        }
                    }
                    break;
                }
                match t.append_data_from(local, sid, credit.min(room)) {
                    Ok(0) => {
                        let _ = t.session.as_mut().map(|s| s.finish(sid));
                        if let Some(sf) = self.stream_mut(skey) {
                            sf.local_eof = true;
                        }
                        break;
                    }
                    Ok(n) => {
                        moved += n;
                        if let Some(sf) = self.stream_mut(skey) {
                            sf.count_from_local(n);
                            sf.last_active = now;
                        }
                    }
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                        self.arm_stream(skey, side, Interest::Read);
                        break;
                    }
                    Err(e) => {
                        let end = self.local_broken(skey, e.raw_os_error().unwrap_or(libc::EIO));
                        self.flush_tunnel(tkey, now);
                        return self.finish_stream(skey, end);
                    }
                }
            }
            self.flush_tunnel(tkey, now);
        }
        if self.stream_mut(skey).is_some_and(|sf| sf.is_complete()) {
            self.finish_stream(skey, StreamEnd::Clean);
        }
    }

    /// A stream that just opened on a kTLS tunnel moves its bytes by splice from now on.
    fn maybe_zero_copy(&mut self, skey: FlowKey) {
        let Some(tkey) = self.stream_mut(skey).and_then(|sf| sf.tunnel) else {
            return;
        };
        if !self.tunnel_mut(tkey).is_some_and(|t| t.is_kernel_tls()) {
            return;
        }
        let window = hbone_proto::Settings::default().initial_stream_window as usize;
        if let Some(sf) = self.stream_mut(skey) {
            sf.use_zero_copy(window);
        }
    }

    /// kTLS: the stream's bytes go local socket → pipe → tunnel as DATA frames, the payload
    /// spliced and encrypted by the kernel. One stream at a time owns the socket mid-frame.
    fn send_zero_copy(&mut self, skey: FlowKey, tkey: FlowKey, sid: StreamId, now: Instant) {
        let budget = self.state.config.node.splice.max_bytes_per_wakeup;
        let Reactor {
            tunnels,
            streams,
            pool,
            ..
        } = self;
        let Some(t) = tunnels.get_mut(super::slot(tkey)).filter(|t| t.key == tkey) else {
            return self.finish_stream(
                skey,
                StreamEnd::TunnelBroken {
                    kind: FailureKind::TunnelFailed,
                },
            );
        };
        let Some(sf) = streams.get_mut(super::slot(skey)).filter(|f| f.key == skey) else {
            return;
        };
        if t.writer.is_some_and(|w| w != skey) {
            // Another stream is mid-frame; it wakes us when done.
            t.blocked.push(skey);
            sf.blocked = true;
            return;
        }
        let local = sf.local.as_raw_fd();
        let tunnel_fd = t.raw();
        let Some(sender) = sf.sender.as_mut() else {
            return;
        };
        let (frames, bytes) = (sender.stats.frames, sender.stats.payload_bytes);
        let r = sender.send(
            local,
            tunnel_fd,
            pool,
            &mut FrameHeaders {
                tunnel: t,
                stream: sid,
            },
            budget,
        );
        let sent = (sender.stats.payload_bytes - bytes) as usize;
        let new_frames = sender.stats.frames - frames;
        let mid_frame = sender.mid_frame();
        let _ = new_frames;
        t.charge_written(sent);
        t.writer = mid_frame.then_some(skey);
        if sent > 0 {
            sf.count_from_local(sent);
            sf.last_active = now;
        }
        let side = sf.local_side;
        let wrote_out = t.out_pending() > 0;
        match r {
            Ok(SendStatus::WantRead) => self.arm_stream(skey, side, Interest::Read),
            Ok(SendStatus::WantWrite) => {
                t.blocked.push(skey);
                sf.blocked = true;
                self.arm_tunnel(tkey, Interest::Write);
            }
            Ok(SendStatus::WantCredit) => {
                t.blocked.push(skey);
                sf.blocked = true;
            }
            Ok(SendStatus::Yield) => {
                if !sf.queued {
                    sf.queued = true;
                    self.runnable.push(skey);
                }
            }
            Ok(SendStatus::Done) => sf.local_eof = true,
            // The session's own frames could not all be written first: wait for the socket.
            Err(SendError::HeaderRefused) if wrote_out => {
                t.blocked.push(skey);
                sf.blocked = true;
                self.arm_tunnel(tkey, Interest::Write);
            }
            Err(SendError::HeaderRefused) => {
                return self.finish_stream(
                    skey,
                    StreamEnd::TunnelBroken {
                        kind: FailureKind::StreamReset,
                    },
                )
            }
            Err(SendError::Source(errno)) => {
                let end = self.local_broken(skey, errno);
                return self.finish_stream(skey, end);
            }
            Err(SendError::Pipe(errno)) => {
                return self.finish_stream(
                    skey,
                    StreamEnd::LocalBroken {
                        kind: FailureKind::PipeUnavailable,
                        errno,
                    },
                )
            }
            Err(SendError::Tunnel(errno)) => {
                return self.fail_tunnel(
                    tkey,
                    TunnelError::new("write", io::Error::from_raw_os_error(errno).to_string()),
                )
            }
        }
        if !mid_frame {
            // Frame boundary: the session's frames and waiting streams may write now.
            self.flush_tunnel(tkey, now);
        }
    }

    pub(super) fn stream_timer(&mut self, skey: FlowKey, timer: Timer, now: Instant) {
        let idle = self.state.config.node.timeouts.idle;
        let Some(sf) = self.stream_mut(skey) else {
            return;
        };
        match timer.kind {
            TimerKind::Connect => match sf.phase {
                StreamPhase::Connecting => self.stream_connected(skey, Err(libc::ETIMEDOUT), now),
                StreamPhase::WaitingTunnel | StreamPhase::AwaitingResponse => self.finish_stream(
                    skey,
                    StreamEnd::TunnelBroken {
                        kind: FailureKind::UpstreamConnectTimeout,
                    },
                ),
                StreamPhase::Open => {}
            },
            TimerKind::Idle => {
                let due = sf.last_active + idle;
                if due <= now {
                    self.finish_stream(skey, StreamEnd::Cut(CloseKind::IdleTimeout));
                } else {
                    self.push_timer(skey, due, TimerKind::Idle);
                }
            }
            TimerKind::Session => {}
        }
    }

    /// Removes a stream flow: gives its stream back (reset unless it ended cleanly), its pool
    /// reservation back, closes the local socket (reset when the tunnel side broke), logs it.
    pub(super) fn finish_stream(&mut self, skey: FlowKey, end: StreamEnd) {
        if self.stream_mut(skey).is_none() {
            return;
        }
        let mut sf = self.streams.remove(super::slot(skey));
        log::debug!(
            "reactor {}: stream flow fd {} ends: {end:?}",
            self.id,
            sf.local.as_raw_fd()
        );
        sf.release_pipes(&mut self.pool);
        self.driver
            .release(skey, sf.armed, sf.phase == StreamPhase::Connecting);
        self.metrics.flows_open.fetch_sub(1, Relaxed);
        let now = Instant::now();
        if let (Some(tkey), Some(sid)) = (sf.tunnel, sf.stream) {
            if let Some(t) = self.tunnel_mut(tkey) {
                let ours = t.streams.get(&sid) == Some(&skey);
                if ours {
                    t.streams.remove(&sid);
                }
                if ours && !sf.stream_gone && end != StreamEnd::Clean {
                    let code = match end {
                        StreamEnd::LocalBroken { .. } => ErrorCode::CONNECT_ERROR,
                        _ => ErrorCode::CANCEL,
                    };
                    if let Some(s) = t.session.as_mut() {
                        let _ = s.reset(sid, code);
                    }
                }
                t.blocked.retain(|k| *k != skey);
                if t.writer == Some(skey) {
                    // A half-written DATA frame cannot be finished: the tunnel is unusable.
                    t.writer = None;
                    self.fail_tunnel(
                        tkey,
                        TunnelError::new(
                            "stream_ended_mid_frame",
                            "a stream ended inside its DATA frame",
                        ),
                    );
                }
                self.flush_tunnel(tkey, now);
            }
        }
        if let Some(tid) = sf.pool_id {
            let h = self.hbone_state();
            if sf.reserved {
                let _ = h.pool.stream_closed(tid, now);
            } else {
                h.pool.cancel_wait(tid, &skey);
            }
            self.process_pool_events(now);
        }
        let was_open = sf.phase == StreamPhase::Open;
        if was_open {
            sf.counters.closed.fetch_add(1, Relaxed);
        }
        let (close, failure, errno) = match end {
            StreamEnd::Clean => {
                drop(sf.local);
                (CloseKind::Clean, None, None)
            }
            StreamEnd::Cut(kind) => {
                socket::close_with_reset(sf.local);
                (kind, None, None)
            }
            StreamEnd::LocalBroken { kind, errno } => {
                drop(sf.local);
                self.metrics.failure(kind);
                let close = if was_open {
                    CloseKind::Reset
                } else {
                    CloseKind::Failed
                };
                (close, Some(kind), Some(errno).filter(|e| *e != 0))
            }
            StreamEnd::TunnelBroken { kind } => {
                socket::close_with_reset(sf.local);
                self.metrics.failure(kind);
                let close = if was_open {
                    CloseKind::Reset
                } else {
                    CloseKind::Failed
                };
                (close, Some(kind), None)
            }
        };
        self.metrics.closed(close);
        let mut record = sf.record;
        record.set_end(close, failure, errno, sf.started.elapsed());
        access_log::emit(&record, self.observer.as_ref());
    }

    /// Acts on the pool's decisions: tunnels it let go are closed.
    pub(super) fn process_pool_events(&mut self, _now: Instant) {
        loop {
            let Some(h) = self.hbone.as_mut() else { return };
            let Some(PoolEvent::Close { tunnel, reason }) = h.pool.poll_event() else {
                return;
            };
            let Some(tkey) = h.by_pool_id.get(&tunnel).copied() else {
                continue;
            };
            log::debug!(
                "reactor {}: closing pooled tunnel ({})",
                self.id,
                reason.label()
            );
            self.close_tunnel(tkey, Some(reason.label()));
        }
    }

    /// A tunnel failed: log, count, reset its flows, hand its waiters back.
    pub(super) fn fail_tunnel(&mut self, tkey: FlowKey, e: TunnelError) {
        let Some(t) = self.tunnel_mut(tkey) else {
            return;
        };
        let role = t.role.label();
        let peer = match &t.role {
            Role::Client { peer, expected, .. } => format!("{peer} (expecting {expected})"),
            Role::Server { peer, local, .. } => format!("{peer} → {local}"),
        };
        let level = if t.phase == Phase::Open {
            log::Level::Info
        } else {
            log::Level::Warn
        };
        log::log!(
            level,
            "reactor {}: {role} tunnel {peer} failed: {e}",
            self.id
        );
        self.metrics.hbone(
            "ringtun_hbone_tunnel_failures_total",
            &format!("role=\"{role}\",reason=\"{}\"", e.label),
            1,
        );
        self.close_tunnel_inner(tkey, true, e.label);
    }

    /// Closes a tunnel gracefully (GOAWAY, close_notify) or, with `Some(reason)` from the pool,
    /// because it is idle or drained.
    pub(super) fn close_tunnel(&mut self, tkey: FlowKey, reason: Option<&'static str>) {
        self.close_tunnel_inner(tkey, false, reason.unwrap_or("closed"));
    }

    fn close_tunnel_inner(&mut self, tkey: FlowKey, failed: bool, reason: &'static str) {
        let id = self.id;
        let Some(t) = self.tunnel_mut(tkey) else {
            return;
        };
        log::debug!(
            "reactor {id}: closing {} tunnel ({reason}, failed: {failed}, phase {:?}, {} bytes queued)",
            t.role.label(),
            t.phase,
            t.out_pending()
        );
        if t.phase == Phase::Closing {
            // Already closing politely; a failure now just ends it.
            if failed {
                self.remove_tunnel(tkey, true);
            }
            return;
        }
        let role = t.role.label();
        let was_open = t.phase == Phase::Open;
        let streams: Vec<FlowKey> = std::mem::take(&mut t.streams).into_values().collect();
        t.blocked.clear();
        if was_open {
            self.metrics.hbone(
                "ringtun_hbone_tunnels_open",
                &format!("role=\"{role}\""),
                -1,
            );
        }
        self.metrics.hbone(
            "ringtun_hbone_tunnels_closed_total",
            &format!("role=\"{role}\",reason=\"{reason}\""),
            1,
        );
        let t = self.tunnel_mut(tkey).expect("present");
        if let Role::Client { pool_id, .. } = t.role {
            let h = self.hbone_state();
            h.by_pool_id.remove(&pool_id);
            if h.pool.state(pool_id) != crate::data_plane::tunnel_pool::TunnelState::Closed {
                if let Ok(f) = h.pool.tunnel_failed(pool_id) {
                    for w in f.waiters {
                        self.finish_stream(
                            w,
                            StreamEnd::TunnelBroken {
                                kind: FailureKind::TunnelFailed,
                            },
                        );
                    }
                }
            }
        }
        let now = Instant::now();
        for skey in streams {
            let mut finished_both_ways = false;
            if let Some(sf) = self.stream_mut(skey) {
                finished_both_ways = sf.phase == StreamPhase::Open && sf.remote_eof && sf.local_eof;
                sf.stream_gone = true;
                sf.reserved = false;
                sf.tunnel = None;
                sf.blocked = false;
            }
            if !failed && finished_both_ways {
                // Every byte and both END_STREAMs crossed; the flow may still be writing the
                // tail to its local socket. Let it finish on its own.
                self.drive_stream(skey, now);
                continue;
            }
            self.finish_stream(
                skey,
                StreamEnd::TunnelBroken {
                    kind: FailureKind::TunnelFailed,
                },
            );
        }
        if failed || !was_open {
            return self.remove_tunnel(tkey, failed);
        }
        // Politely: GOAWAY, everything queued written, close_notify, FIN, then read until the
        // peer closes too (closing with unread bytes would send a reset that can destroy data
        // still in flight to the peer). Bounded by a timer.
        let Some(t) = self.tunnel_mut(tkey) else {
            return;
        };
        t.phase = Phase::Closing;
        if let Some(s) = t.session.as_mut() {
            s.goaway();
        }
        self.push_timer(tkey, now + CLOSE_LINGER, TimerKind::Connect);
        self.finish_close(tkey);
    }

    /// Streams on the tunnel that have not exchanged both END_STREAMs.
    fn unfinished_streams(&self, tkey: FlowKey) -> usize {
        let Some(t) = self
            .tunnels
            .get(super::slot(tkey))
            .filter(|t| t.key == tkey)
        else {
            return 0;
        };
        t.streams
            .values()
            .filter(|k| {
                self.streams
                    .get(super::slot(**k))
                    .filter(|f| f.key == **k)
                    .is_some_and(|f| !(f.remote_eof && f.local_eof))
            })
            .count()
    }

    /// Closing: flush, then close_notify and FIN once, then discard input until EOF.
    fn finish_close(&mut self, tkey: FlowKey) {
        let Some(t) = self.tunnel_mut(tkey) else {
            return;
        };
        t.writer = None;
        match if t.fin_sent { Ok(true) } else { t.flush() } {
            Ok(true) => {}
            Ok(false) => return self.arm_tunnel(tkey, Interest::Write),
            Err(e) => {
                log::debug!("reactor {}: closing tunnel: {e}", self.id);
                return self.remove_tunnel(tkey, true);
            }
        }
        if !t.fin_sent {
            t.fin_sent = true;
            t.send_close_notify();
            // SAFETY: plain syscall on a socket we own.
            unsafe { libc::shutdown(t.raw(), libc::SHUT_WR) };
        }
        let mut scratch = [0u8; 16 * 1024];
        loop {
            match crate::data_plane::ktls::recv_record(t.raw(), &mut scratch, libc::MSG_DONTWAIT) {
                Ok(r)
                    if r.len == 0
                        && r.record_type == crate::data_plane::ktls::CONTENT_APPLICATION_DATA =>
                {
                    return self.remove_tunnel(tkey, false)
                }
                Ok(_) => {}
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    return self.arm_tunnel(tkey, Interest::Read)
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => {
                    log::debug!("reactor {}: closing tunnel: {e}", self.id);
                    return self.remove_tunnel(tkey, false);
                }
            }
        }
    }

    /// Takes the tunnel out of the slab and closes its socket (with a reset when it failed).
    fn remove_tunnel(&mut self, tkey: FlowKey, reset: bool) {
        let id = self.id;
        let Some(t) = self.tunnel_mut(tkey) else {
            return;
        };
        log::debug!(
            "reactor {id}: {} tunnel fd {} removed (reset: {reset}, {} bytes were queued)",
            t.role.label(),
            t.raw(),
            t.out_pending()
        );
        let mut t = self.tunnels.remove(super::slot(tkey));
        self.driver
            .release(tkey, t.armed, t.phase == Phase::Connecting);
        if let Some(sf_keys) = (!t.streams.is_empty()).then(|| std::mem::take(&mut t.streams)) {
            for skey in sf_keys.into_values() {
                if let Some(sf) = self.stream_mut(skey) {
                    sf.tunnel = None;
                    sf.stream_gone = true;
                }
                self.finish_stream(
                    skey,
                    StreamEnd::TunnelBroken {
                        kind: FailureKind::TunnelFailed,
                    },
                );
            }
        }
        if reset {
            socket::close_with_reset(t.fd);
        } else {
            drop(t.fd);
        }
    }
}

/// How long a politely closing tunnel may take to flush and see the peer's FIN.
const CLOSE_LINGER: std::time::Duration = std::time::Duration::from_secs(5);
