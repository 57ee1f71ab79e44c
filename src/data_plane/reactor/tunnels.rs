//! The reactor's HBONE side: routing events to tunnel objects and acting on what they ask.
//!
//! A reactor owns its tunnels ([`Tunnel`], one per TLS connection) and one routing entry per
//! tunnel-carried connection ([`StreamEntry`]): while an outbound connection waits for a
//! stream on a pooled tunnel the entry holds the captured socket itself
//! ([`StreamSlot::Waiting`]); once the stream exists the socket lives in the tunnel and the
//! entry only says where ([`StreamSlot::OnTunnel`]). Either way the entry's key is the
//! connection's identity for the driver and the timer heap, and its armed bits are the
//! driver's state for that socket. The reactor keeps what needs the node's view — the
//! registry and the inbound rules, the per-reactor pool, sockets made in a pod's namespace,
//! metrics and the access log — and the tunnel everything about the connection itself.

use std::collections::{HashMap, HashSet};
use std::io;
use std::net::{IpAddr, SocketAddr};
use std::os::fd::{AsRawFd, OwnedFd};
use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;
use std::time::{Instant, SystemTime};

use hbone_proto::{ConnectRequest, StreamId};
use rustls::client::UnbufferedClientConnection;
use rustls::server::UnbufferedServerConnection;
use rustls::ClientConfig;

use slab::Slab;

use super::keys::{entry, entry_mut, make_key, slot, Keyed, Kind};
use super::shared::{self, Shared};
use crate::control_plane::config::KtlsChoice;
use crate::control_plane::identity::SpiffeId;
use crate::control_plane::state::State;
use crate::control_plane::workload_registry::WorkloadId;
use crate::data_plane::authorization::{self, Admission, Recheck};
use crate::data_plane::client_address::delivery_source;
use crate::data_plane::driver::{self, FlowKey, Interest, Side};
use crate::data_plane::first_connection::Resolution;
use crate::data_plane::socket;
use crate::data_plane::timer::{Timer, TimerKind};
use crate::observability::access_log::{self, FlowRecord};
use crate::observability::hbone_metrics::{
    PoolOutcome, Role as RoleLabel, TunnelClose, TunnelFailure, TunnelShed,
};
use crate::observability::metrics::{
    CloseKind, DenialAt, FailureKind, SecurityPolicy, TcpCounters, TcpLabels,
};
use crate::redirection::netns::{in_netns, NetNs};
use crate::tls::credentials::{TunnelCredentials, Unusable};
use crate::tls::{self};
use crate::tunnel::connection::{Action, Ctx, OpenRefused, Phase, Role, Tunnel, TunnelEnv};
use crate::tunnel::inbound_rules::{
    client_address, outbound_connect, InboundDecision, InboundRules, RejectReason,
};
use crate::tunnel::pool::{
    Checkout, CloseReason, PoolConfig, PoolEvent, PoolKey, TunnelId, TunnelPool,
};
use crate::tunnel::streams::{EndedStream, StreamEnd, StreamSetup, TunnelTarget};

/// The local workload a 15008 listener serves, as its tunnels need it.
pub(super) struct ServedWorkload {
    pub workload: WorkloadId,
    /// Its namespace, where deliveries to it are made.
    pub netns: Option<NetNs>,
    /// Deliveries reach the application from the client's address.
    pub deliver_client: bool,
}

/// The reactor's HBONE half: its tunnels, the connections they carry, the per-reactor pool
/// and what building tunnels needs. Every call gets the reactor's [`Shared`] context.
pub(super) struct Tunnels {
    creds: Arc<TunnelCredentials>,
    pool: TunnelPool<FlowKey>,
    /// Pool ids of client tunnels → their keys.
    by_pool_id: HashMap<TunnelId, FlowKey>,
    /// Client configs per (source, expected server identity).
    client_configs: HashMap<(SpiffeId, SpiffeId), Arc<ClientConfig>>,
    rules: InboundRules,
    env: TunnelEnv,
    /// Mode lines already logged (one per role, mode and reason per reactor).
    logged_modes: HashSet<String>,
    tunnels: Slab<TunnelEntry>,
    /// Connections carried by tunnel streams (routing entries; the tunnel owns the socket
    /// once the stream exists).
    streams: Slab<StreamEntry>,
    /// The budgets of server tunnels (see [`Budgets`]).
    budgets: Budgets,
}

/// What server tunnels may hold, and what they hold now. Connections still in their TLS
/// handshake are unauthenticated: they have their own budget (per reactor and per client
/// address) and never count against the flow budget that flows and established tunnels
/// share, so a flood of idle connections to port 15008 cannot lock anyone out. Established
/// server tunnels are bounded per peer identity and per peer address; a peer at its bound, or
/// a flow budget that is full, first costs an idle tunnel (no streams) its place.
#[derive(Debug)]
struct Budgets {
    limits: crate::control_plane::config::Limits,
    handshakes: usize,
    handshakes_by_source: HashMap<IpAddr, usize>,
    by_identity: HashMap<SpiffeId, usize>,
    by_address: HashMap<IpAddr, usize>,
}

/// What one server tunnel holds of the [`Budgets`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) enum Held {
    Nothing,
    /// A handshake slot, for this client address.
    Handshake(IpAddr),
    /// An established tunnel of this peer.
    Peer {
        identity: SpiffeId,
        address: IpAddr,
    },
}

/// What the per-source handshake cap counts by: the IPv4 address, or the IPv6 /64 (one host
/// commonly holds a whole /64, so counting single IPv6 addresses would cap nothing).
fn source_bucket(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V4(_) => ip,
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => IpAddr::V4(v4),
            None => IpAddr::V6(std::net::Ipv6Addr::from(
                u128::from(v6) & !u128::from(u64::MAX),
            )),
        },
    }
}

fn take_one<K: std::hash::Hash + Eq>(map: &mut HashMap<K, usize>, key: &K) {
    if let Some(n) = map.get_mut(key) {
        *n -= 1;
        if *n == 0 {
            map.remove(key);
        }
    }
}

impl Budgets {
    fn release(&mut self, held: Held, metrics: &crate::observability::hbone_metrics::HboneMetrics) {
        match held {
            Held::Nothing => {}
            Held::Handshake(source) => {
                self.handshakes -= 1;
                take_one(&mut self.handshakes_by_source, &source);
                metrics.handshaking(-1);
            }
            Held::Peer { identity, address } => {
                take_one(&mut self.by_identity, &identity);
                take_one(&mut self.by_address, &address);
            }
        }
    }
}

impl Tunnels {
    pub fn new(
        reactor: usize,
        creds: Arc<TunnelCredentials>,
        node: &crate::control_plane::config::NodeConfig,
    ) -> Self {
        Tunnels {
            pool: TunnelPool::new(PoolConfig {
                max_streams_per_tunnel: node.hbone.max_streams_per_tunnel,
                idle_timeout: node.hbone.pool_idle_timeout,
                ..PoolConfig::default()
            }),
            by_pool_id: HashMap::new(),
            client_configs: HashMap::new(),
            rules: InboundRules::new(node),
            env: TunnelEnv {
                reactor,
                ktls: creds.ktls.clone(),
                allow_ktls: node.hbone.ktls == KtlsChoice::Auto,
                zero_copy: node.hbone.zero_copy,
                record_budget: node.hbone.ktls_record_budget,
                max_bytes_per_wakeup: node.splice.max_bytes_per_wakeup,
                connect_timeout: node.timeouts.connect,
                handshake_timeout: node.timeouts.handshake,
                idle_timeout: node.timeouts.idle,
                server_idle: node.hbone.pool_idle_timeout * 2,
                keepalive_interval: node.hbone.keepalive_interval,
                keepalive_timeout: node.hbone.keepalive_timeout,
            },
            creds,
            logged_modes: HashSet::new(),
            tunnels: Slab::new(),
            streams: Slab::new(),
            budgets: Budgets {
                limits: node.limits,
                handshakes: 0,
                handshakes_by_source: HashMap::new(),
                by_identity: HashMap::new(),
                by_address: HashMap::new(),
            },
        }
    }

    /// Tunnels past their handshake and tunnel-carried connections: what counts against the
    /// flow budget (handshakes have their own).
    pub fn entries(&self) -> usize {
        self.tunnels.len() - self.budgets.handshakes + self.streams.len()
    }

    /// Tunnel-carried connections, open or waiting for a stream.
    pub fn flow_count(&self) -> usize {
        self.streams.len()
    }

    pub fn tunnel_count(&self) -> usize {
        self.tunnels.len()
    }

    /// Whether `key` names a live tunnel or tunnel-carried connection.
    pub fn holds(&self, key: FlowKey) -> bool {
        entry(&self.tunnels, key).is_some() || entry(&self.streams, key).is_some()
    }

    /// A new snapshot's credentials: tunnels made from now on present its certificates (open
    /// ones keep theirs until they end).
    pub fn set_credentials(&mut self, creds: Arc<TunnelCredentials>) {
        if !Arc::ptr_eq(&creds, &self.creds) {
            self.creds = creds;
            self.client_configs.clear();
        }
    }

    /// When the pool next needs [`pool_timers`](Self::pool_timers).
    pub fn poll_timeout(&self) -> Option<Instant> {
        self.pool.poll_timeout()
    }

    /// The pool's idle timers: tunnels it lets go are closed.
    pub fn pool_timers(&mut self, io: &mut Shared<'_>, now: Instant) {
        if self.pool.poll_timeout().is_some_and(|at| at <= now) {
            self.pool.handle_timeout(now);
            self.process_pool_events(io, now);
        }
    }
}

/// A tunnel that would present a local certificate outside its validity is not made: a peer
/// would refuse it anyway, after a handshake, with a less telling alert. Counted per role
/// under the certificate's reason; the line is rate-limited, as every new connection of the
/// workload meets the same refusal until its files are replaced.
fn refuse_unusable_certificate(
    io: &mut Shared<'_>,
    role: RoleLabel,
    identity: &str,
    why: Unusable,
) {
    let reason = match why {
        Unusable::Expired => TunnelFailure::LocalCertificateExpired,
        Unusable::NotYetValid => TunnelFailure::LocalCertificateNotYetValid,
    };
    io.metrics.hbone.failed(role, reason);
    crate::log_limited!(
        log::Level::Warn,
        why.label(),
        "reactor {}: {} tunnel for {identity} refused: its certificate is {why}",
        io.id,
        role.label()
    );
}

/// A tunnel in the reactor's slab, with the driver's state for its socket and what it holds
/// of the server budgets.
pub(super) struct TunnelEntry {
    pub tunnel: Tunnel,
    pub armed: u8,
    pub held: Held,
    /// When the reactor took it (the oldest handshake of a source is shed first).
    pub since: Instant,
}

impl Keyed for TunnelEntry {
    fn key(&self) -> FlowKey {
        self.tunnel.key()
    }
}

/// An outbound connection waiting for a stream on a pooled tunnel.
pub(super) struct PendingStream {
    fd: OwnedFd,
    record: FlowRecord,
    counters: Arc<TcpCounters>,
    request: ConnectRequest,
    target: TunnelTarget,
    pool_id: Option<TunnelId>,
    /// A stream on `pool_id` is reserved for this connection (give it back if it never opens).
    reserved: bool,
    started: Instant,
    /// The source workload (`namespace/name`).
    owner: Arc<str>,
}

pub(super) enum StreamSlot {
    Waiting(Box<PendingStream>),
    /// Handed to a tunnel, whose answer is awaited (only inside one call).
    Opening,
    OnTunnel {
        tunnel: FlowKey,
        id: StreamId,
    },
}

/// A tunnel-carried connection's routing entry (see the module docs).
pub(super) struct StreamEntry {
    key: FlowKey,
    pub armed: u8,
    slot: StreamSlot,
}

impl Keyed for StreamEntry {
    fn key(&self) -> FlowKey {
        self.key
    }
}

impl Tunnels {
    /// Calls `f` on the tunnel `tkey` with its context, then acts on what it asked for.
    pub(super) fn with_tunnel<R>(
        &mut self,
        io: &mut Shared<'_>,
        tkey: FlowKey,
        now: Instant,
        f: impl FnOnce(&mut Tunnel, &mut Ctx<'_>) -> R,
    ) -> Option<R> {
        let e = entry_mut(&mut self.tunnels, tkey)?;
        let mut ctx = Ctx {
            env: &self.env,
            pipes: &mut *io.pipes,
            metrics: &io.metrics.hbone,
            now,
        };
        let r = f(&mut e.tunnel, &mut ctx);
        self.apply_actions(io, tkey, now);
        Some(r)
    }

    /// Acts on every action the tunnel queued (acting may queue more: they are taken too).
    fn apply_actions(&mut self, io: &mut Shared<'_>, tkey: FlowKey, now: Instant) {
        loop {
            let Some(e) = entry_mut(&mut self.tunnels, tkey) else {
                return;
            };
            let Some(action) = e.tunnel.poll_action() else {
                return;
            };
            match action {
                Action::Arm {
                    key,
                    fd,
                    side,
                    interest,
                } => {
                    let bit = driver::armed_bit(side, interest);
                    let armed = if key == tkey {
                        Some(&mut e.armed)
                    } else {
                        entry_mut(&mut self.streams, key).map(|s| &mut s.armed)
                    };
                    if let Some(armed) = armed {
                        if *armed & bit == 0 && io.driver.arm(key, side, interest, fd) {
                            *armed |= bit;
                        }
                    }
                }
                Action::Timer { key, at, kind } => io.push_timer(key, at, kind),
                Action::Queue => io.queue(tkey),
                Action::Established => self.tunnel_established(io, tkey, now),
                Action::Request { id, request } => self.inbound_request(io, tkey, id, request, now),
                Action::RequestRefused { status, reason } => {
                    let Role::Server { local, peer, .. } = *e.tunnel.role() else {
                        continue;
                    };
                    let mut record = FlowRecord::new(io.id, "inbound_hbone");
                    record.source_workload = e
                        .tunnel
                        .peer_identity()
                        .map_or_else(|| "unknown".into(), |p| p.to_uri());
                    record.client = peer;
                    record.original_dst = local;
                    record.destination = "unknown".into();
                    record.route = "hbone";
                    record.status = Some(status);
                    record.reason = Some(reason.label());
                    io.refused(FailureKind::ConnectInvalid, record, now);
                }
                Action::StreamEnded(ended) => {
                    let pool_id = match e.tunnel.role() {
                        Role::Client { pool_id, .. } => Some(*pool_id),
                        Role::Server { .. } => None,
                    };
                    self.stream_ended(io, *ended, pool_id, now);
                }
                Action::GoAway => {
                    if let Role::Client { pool_id, .. } = e.tunnel.role() {
                        let pool_id = *pool_id;
                        let retry = self.pool.goaway_received(pool_id);
                        for w in retry.unwrap_or_default() {
                            self.retry_checkout(io, w, now);
                        }
                        self.process_pool_events(io, now);
                    }
                }
                Action::Retire => {
                    if let Role::Client { pool_id, .. } = e.tunnel.role() {
                        let pool_id = *pool_id;
                        let retry = self.pool.retire(pool_id);
                        for w in retry.unwrap_or_default() {
                            self.retry_checkout(io, w, now);
                        }
                        self.process_pool_events(io, now);
                    }
                }
                Action::Closing => self.leave_pool(io, tkey, now),
                Action::Closed { reset, connecting } => {
                    self.leave_pool(io, tkey, now);
                    self.remove_tunnel(io, tkey, reset, connecting);
                    return;
                }
            }
        }
    }

    // ------------------------------------------------------------------------- events

    pub(super) fn tunnel_ready(
        &mut self,
        io: &mut Shared<'_>,
        tkey: FlowKey,
        interest: Interest,
        now: Instant,
    ) {
        if let Some(e) = entry_mut(&mut self.tunnels, tkey) {
            e.armed &= !driver::armed_bit(Side::Upstream, interest);
        }
        self.with_tunnel(io, tkey, now, |t, ctx| t.ready(interest, ctx));
    }

    pub(super) fn tunnel_connected(
        &mut self,
        io: &mut Shared<'_>,
        tkey: FlowKey,
        result: Result<(), i32>,
        now: Instant,
    ) {
        self.with_tunnel(io, tkey, now, |t, ctx| t.connected(result, ctx));
    }

    pub(super) fn run_tunnel(&mut self, io: &mut Shared<'_>, tkey: FlowKey, now: Instant) {
        self.with_tunnel(io, tkey, now, |t, ctx| t.run(ctx));
    }

    pub(super) fn tunnel_timer(
        &mut self,
        io: &mut Shared<'_>,
        tkey: FlowKey,
        timer: Timer,
        now: Instant,
    ) {
        self.with_tunnel(io, tkey, now, |t, ctx| t.timer(timer.kind, timer.at, ctx));
    }

    /// Readiness of a tunnel-carried connection's local socket.
    pub(super) fn stream_ready(
        &mut self,
        io: &mut Shared<'_>,
        skey: FlowKey,
        side: Side,
        interest: Interest,
        now: Instant,
    ) {
        let Some(e) = entry_mut(&mut self.streams, skey) else {
            return;
        };
        e.armed &= !driver::armed_bit(side, interest);
        if let StreamSlot::OnTunnel { tunnel, id } = e.slot {
            self.with_tunnel(io, tunnel, now, |t, ctx| t.stream_ready(id, interest, ctx));
        }
    }

    /// An inbound stream's destination connect finished.
    pub(super) fn stream_connected(
        &mut self,
        io: &mut Shared<'_>,
        skey: FlowKey,
        result: Result<(), i32>,
        now: Instant,
    ) {
        let Some(e) = entry_mut(&mut self.streams, skey) else {
            return;
        };
        if let StreamSlot::OnTunnel { tunnel, id } = e.slot {
            self.with_tunnel(io, tunnel, now, |t, ctx| {
                t.stream_connected(id, result, ctx)
            });
        }
    }

    pub(super) fn stream_timer(
        &mut self,
        io: &mut Shared<'_>,
        skey: FlowKey,
        timer: Timer,
        now: Instant,
    ) {
        let Some(e) = entry_mut(&mut self.streams, skey) else {
            return;
        };
        match e.slot {
            StreamSlot::OnTunnel { tunnel, id } => {
                self.with_tunnel(io, tunnel, now, |t, ctx| {
                    t.stream_timer(id, timer.kind, ctx)
                });
            }
            StreamSlot::Waiting(_) if timer.kind == TimerKind::Connect => self.finish_pending(
                io,
                skey,
                StreamEnd::TunnelBroken {
                    kind: FailureKind::UpstreamConnectTimeout,
                },
                now,
            ),
            _ => {}
        }
    }

    // ------------------------------------------------------------------------ inbound

    /// A connection accepted on a 15008 listener: start the TLS server handshake.
    pub(super) fn accept_tunnel(
        &mut self,
        io: &mut Shared<'_>,
        fd: OwnedFd,
        to: ServedWorkload,
        now: Instant,
    ) {
        let ServedWorkload {
            workload,
            netns,
            deliver_client,
        } = to;
        let raw = fd.as_raw_fd();
        let (local, peer) = match (socket::local_addr(raw), socket::peer_addr(raw)) {
            (Ok(l), Ok(p)) => (l, p),
            _ => return socket::close_with_reset(fd),
        };
        let entry = io.state.registry.workload(workload);
        let id = SpiffeId::parse(&entry.identity).ok();
        let config = id
            .as_ref()
            .and_then(|id| self.creds.server.get(id).cloned());
        let (Some(id), Some(config)) = (id, config) else {
            log::warn!(
                "reactor {}: tunnel to {local} refused: no server certificate for {}",
                io.id,
                entry.identity
            );
            io.metrics
                .hbone
                .failed(RoleLabel::Server, TunnelFailure::NoCertificate);
            return socket::close_with_reset(fd);
        };
        if let Err(why) = self.creds.usable(&id, SystemTime::now()) {
            refuse_unusable_certificate(io, RoleLabel::Server, &entry.identity, why);
            return socket::close_with_reset(fd);
        }
        // Unauthenticated: the handshake budget, never the flow budget.
        let source = source_bucket(peer.ip());
        let limits = self.budgets.limits;
        let from_source = self
            .budgets
            .handshakes_by_source
            .get(&source)
            .copied()
            .unwrap_or(0);
        let refused = if from_source >= limits.max_handshakes_per_source {
            Some(TunnelShed::HandshakePerSource)
        } else if self.budgets.handshakes >= limits.max_handshakes_per_reactor
            && !self.shed_handshake(io, from_source, now)
        {
            Some(TunnelShed::HandshakeBudget)
        } else {
            None
        };
        if let Some(why) = refused {
            io.metrics.hbone.shed(why);
            crate::log_limited!(
                log::Level::Warn,
                why.label(),
                "reactor {}: connection from {peer} to {local} refused: {} handshakes in \
                 progress ({} from its source {source}); budget {}",
                io.id,
                self.budgets.handshakes,
                self.budgets.handshakes_by_source.get(&source).unwrap_or(&0),
                why.label()
            );
            return socket::close_with_reset(fd);
        }
        let conn = match UnbufferedServerConnection::new(config) {
            Ok(c) => c,
            Err(e) => {
                log::warn!("reactor {}: TLS server setup failed: {e}", io.id);
                return socket::close_with_reset(fd);
            }
        };
        let _ = socket::set_nodelay(raw);
        let role = Role::Server {
            workload,
            local,
            peer,
            netns,
            deliver_client,
        };
        self.budgets.handshakes += 1;
        *self.budgets.handshakes_by_source.entry(source).or_default() += 1;
        io.metrics.hbone.handshaking(1);
        let Some(tkey) = self.insert_tunnel(io, now, Held::Handshake(source), |key, ctx| {
            Tunnel::server(key, fd, role, conn, ctx)
        }) else {
            return;
        };
        if let Err(e) = io.driver.register(tkey, Side::Upstream, raw) {
            let errno = crate::tunnel::error::errno(&e);
            self.with_tunnel(io, tkey, now, |t, ctx| {
                t.fail(crate::tunnel::error::TunnelError::Register(errno), ctx)
            });
            return;
        }
        self.run_tunnel(io, tkey, now);
    }

    /// A CONNECT arrived on a server tunnel: check it, authorize it, then connect to the
    /// destination. Every refusal (400/431, 401, 503) is answered, counted and logged.
    fn inbound_request(
        &mut self,
        io: &mut Shared<'_>,
        tkey: FlowKey,
        id: StreamId,
        request: ConnectRequest,
        now: Instant,
    ) {
        let Some(e) = entry_mut(&mut self.tunnels, tkey) else {
            return;
        };
        let Role::Server {
            local,
            peer,
            ref netns,
            deliver_client,
            ..
        } = *e.tunnel.role()
        else {
            return;
        };
        let netns = netns.clone();
        let peer_identity = e.tunnel.peer_identity().cloned();
        let mut record = FlowRecord::new(io.id, "inbound_hbone");
        record.source_workload = peer_identity
            .as_ref()
            .map(|p| p.to_uri())
            .unwrap_or_else(|| "unknown".into());
        record.client = peer;
        record.original_dst = local;
        record.route = "hbone";
        record.upstream = request.authority;
        let (workload, upstream) = match self.rules.check(&io.state.registry, &request, local) {
            InboundDecision::Accept { workload, upstream } => (workload, upstream),
            InboundDecision::Reject { status, reason } => {
                log::debug!(
                    "reactor {}: CONNECT {} from {peer} refused with {status}: {}",
                    io.id,
                    request.authority,
                    reason.label()
                );
                record.destination = "unknown".into();
                record.status = Some(status);
                record.reason = Some(reason.label());
                io.metrics.hbone.connect_refused(reason);
                self.with_tunnel(io, tkey, now, |t, ctx| t.refuse_stream(id, status, ctx));
                return io.refused(FailureKind::ConnectInvalid, record, now);
            }
        };
        let entry = io.state.registry.workload(workload);
        let owner = Arc::clone(&entry.name);
        record.destination = format!(
            "workload:{}/{}",
            entry.workload.namespace, entry.workload.name
        );
        record.upstream = upstream;
        record.destination_identity = Some(entry.identity.clone());
        let client =
            match client_address(&io.state.registry, &request, peer, peer_identity.as_ref()) {
                Ok(ip) => ip,
                Err(reason) => {
                    crate::log_limited!(
                        log::Level::Warn,
                        reason.label(),
                        "reactor {}: CONNECT {} from {peer} ({}) refused with {}: `forwarded: {}` \
                     names another identity's workload",
                        io.id,
                        request.authority,
                        record.source_workload,
                        reason.status(),
                        request.forwarded.as_deref().unwrap_or_default()
                    );
                    record.status = Some(reason.status());
                    record.reason = Some(reason.label());
                    let status = reason.status();
                    io.metrics.hbone.connect_refused(reason);
                    self.with_tunnel(io, tkey, now, |t, ctx| t.refuse_stream(id, status, ctx));
                    return io.refused(FailureKind::ConnectInvalid, record, now);
                }
            };
        let admission = Admission {
            destination: upstream,
            source_ip: client,
        };
        let decision = authorization::authorize(
            io.state,
            workload,
            &admission,
            peer_identity.as_ref(),
            &mut record,
        );
        if !decision.is_allowed() {
            log::debug!(
                "reactor {}: CONNECT {} from {peer} ({}) denied by policy: {}",
                io.id,
                request.authority,
                record.source_workload,
                decision.reason.label()
            );
            authorization::count_denial(io.metrics, io.state, &decision, DenialAt::Connect);
            record.status = Some(401);
            io.metrics.hbone.connect_refused(RejectReason::Unauthorized);
            self.with_tunnel(io, tkey, now, |t, ctx| t.refuse_stream(id, 401, ctx));
            return io.refused(FailureKind::PolicyDenied, record, now);
        }
        let mark = io.state.config.node.socket_mark;
        let buffer = io.state.config.node.limits.flow_receive_buffer;
        let source = delivery_source(deliver_client, SocketAddr::new(client, 0), upstream);
        let fd = match in_netns(netns.as_ref(), || {
            socket::delivery_socket(&upstream, mark, source, buffer)
        }) {
            Ok(Ok(fd)) => fd,
            Ok(Err(e)) | Err(e) => {
                log::warn!(
                    "reactor {}: cannot make a socket for {upstream}: {e}",
                    io.id
                );
                record.status = Some(503);
                record.reason = Some(RejectReason::UpstreamUnreachable.label());
                io.metrics
                    .hbone
                    .connect_refused(RejectReason::UpstreamUnreachable);
                self.with_tunnel(io, tkey, now, |t, ctx| t.refuse_stream(id, 503, ctx));
                return io.refused(FailureKind::SocketSetup, record, now);
            }
        };
        let w = &io.state.registry.workload(workload).workload;
        // The source workload is named only when the tunnel's proven identity is the identity
        // of the workload at the tunnel's peer address (an address alone proves nothing).
        let registry = &io.state.registry;
        let source = peer_identity.as_ref().and_then(|id| {
            let e = registry.workload(registry.workload_by_ip(peer.ip())?);
            (e.identity == id.to_uri()).then(|| e.workload.name.clone())
        });
        let labels = TcpLabels {
            reporter: "destination",
            source_workload: source.unwrap_or_else(|| "unknown".into()),
            source_workload_namespace: peer_identity
                .as_ref()
                .map(|p| p.namespace().to_string())
                .unwrap_or_else(|| "unknown".into()),
            destination_workload: w.name.clone(),
            destination_workload_namespace: w.namespace.clone(),
            destination_service: "unknown".into(),
            security: SecurityPolicy::MutualTls,
        };
        let counters = io.metrics.tcp_counters(labels);
        let raw = fd.as_raw_fd();
        let skey = self.insert_stream(io, StreamSlot::OnTunnel { tunnel: tkey, id });
        let setup = StreamSetup {
            key: skey,
            local: fd,
            started: now,
            counters,
            record,
            owner,
            admission: Some(admission),
        };
        let accepted = self.with_tunnel(io, tkey, now, |t, _| t.accept_stream(id, setup));
        if accepted != Some(true) {
            // The stream or the tunnel went away meanwhile; the socket went with the setup.
            self.remove_stream_entry(io, skey);
            return;
        }
        let started = io
            .driver
            .connect(skey, raw, upstream)
            .and_then(|_| io.driver.register(skey, Side::Upstream, raw));
        if let Err(e) = started {
            log::warn!("reactor {}: cannot connect to {upstream}: {e}", io.id);
            let errno = e.raw_os_error().unwrap_or(libc::EIO);
            self.with_tunnel(io, tkey, now, |t, ctx| {
                t.stream_connected(id, Err(errno), ctx)
            });
            return;
        }
        io.push_timer(
            skey,
            now + io.state.config.node.timeouts.connect,
            TimerKind::Connect,
        );
    }

    // ----------------------------------------------------------------------- outbound

    /// A captured connection whose route is an HBONE tunnel: queue it on the pool.
    #[allow(clippy::too_many_arguments)]
    pub(super) fn start_outbound_stream(
        &mut self,
        io: &mut Shared<'_>,
        fd: OwnedFd,
        res: Resolution,
        mut record: FlowRecord,
        netns: Option<NetNs>,
        owner: Arc<str>,
        now: Instant,
    ) {
        let oc = match outbound_connect(&io.state.registry, &res, record.client) {
            Ok(oc) => oc,
            Err(e) => {
                log::warn!(
                    "reactor {}: no CONNECT for {}: {e}",
                    io.id,
                    record.destination
                );
                return io.refuse(fd, FailureKind::TunnelUnavailable, None, record, now);
            }
        };
        if !self.creds.client.contains_key(&oc.source_identity) {
            log::warn!(
                "reactor {}: no certificate for {} (source of {}); refused",
                io.id,
                oc.source_identity,
                record.destination
            );
            return io.refuse(fd, FailureKind::TunnelUnavailable, None, record, now);
        }
        record.upstream = res.upstream;
        let raw = fd.as_raw_fd();
        let _ = socket::set_nodelay(raw);
        let counters = io.metrics.tcp_counters(shared::tcp_labels(&res, io.state));
        let target = TunnelTarget {
            peer: oc.peer,
            source: res.source.expect("outbound_connect checked the source"),
            source_id: oc.source_identity.clone(),
            expected: oc.expected_identity.clone(),
            netns,
        };
        let skey = self.insert_stream(
            io,
            StreamSlot::Waiting(Box::new(PendingStream {
                fd,
                record,
                counters,
                request: oc.request.clone(),
                target,
                pool_id: None,
                reserved: false,
                started: now,
                owner,
            })),
        );
        if let Err(e) = io.driver.register(skey, Side::Downstream, raw) {
            log::warn!("reactor {}: cannot watch a captured socket: {e}", io.id);
            return self.finish_pending(
                io,
                skey,
                StreamEnd::TunnelBroken {
                    kind: FailureKind::SocketSetup,
                },
                now,
            );
        }
        io.push_timer(
            skey,
            now + io.state.config.node.timeouts.connect,
            TimerKind::Connect,
        );
        self.checkout(io, skey, &oc.pool_key(), now);
    }

    /// Takes a stream for the connection from the pool: on an open tunnel now, on a
    /// connecting one later, or on a new tunnel to its target.
    fn checkout(&mut self, io: &mut Shared<'_>, skey: FlowKey, pool_key: &PoolKey, now: Instant) {
        let checkout = self.pool.checkout(pool_key, skey, now);
        let outcome = match checkout {
            Checkout::Reuse(_) => PoolOutcome::Reuse,
            Checkout::Open(_) => PoolOutcome::Open,
            Checkout::Wait(_) => PoolOutcome::Wait,
            Checkout::Refuse(_) => PoolOutcome::Refuse,
        };
        io.metrics.hbone.pool(outcome);
        let broken = |kind| StreamEnd::TunnelBroken { kind };
        match checkout {
            Checkout::Reuse(tid) => {
                self.set_pool(skey, tid, true);
                match self.by_pool_id.get(&tid).copied() {
                    Some(tkey) => self.open_on(io, skey, tkey, now),
                    None => self.finish_pending(io, skey, broken(FailureKind::TunnelFailed), now),
                }
            }
            Checkout::Wait(tid) => self.set_pool(skey, tid, false),
            Checkout::Open(tid) => {
                self.set_pool(skey, tid, false);
                let target = match entry_mut(&mut self.streams, skey).map(|e| &e.slot) {
                    Some(StreamSlot::Waiting(p)) => p.target.clone(),
                    _ => return self.pool_tunnel_failed(io, tid, now),
                };
                let peer = target.peer;
                if let Err(why) = self.creds.usable(&target.source_id, SystemTime::now()) {
                    let id = target.source_id.to_uri();
                    refuse_unusable_certificate(io, RoleLabel::Client, &id, why);
                    return self.pool_tunnel_failed(io, tid, now);
                }
                if let Err(e) = self.start_client_tunnel(io, tid, target, now) {
                    log::warn!("reactor {}: cannot open a tunnel to {peer}: {e}", io.id);
                    self.pool_tunnel_failed(io, tid, now);
                }
            }
            Checkout::Refuse(r) => {
                log::warn!(
                    "reactor {}: tunnel pool refused a flow: {}",
                    io.id,
                    r.label()
                );
                self.finish_pending(io, skey, broken(FailureKind::TunnelPoolFull), now);
            }
        }
    }

    fn set_pool(&mut self, skey: FlowKey, tid: TunnelId, reserved: bool) {
        if let Some(StreamSlot::Waiting(p)) =
            entry_mut(&mut self.streams, skey).map(|e| &mut e.slot)
        {
            p.pool_id = Some(tid);
            p.reserved = reserved;
        }
    }

    fn start_client_tunnel(
        &mut self,
        io: &mut Shared<'_>,
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
        let h = &mut *self;
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
        let conn = UnbufferedClientConnection::new(cfg, tls::server_name(peer.ip()))
            .map_err(io::Error::other)?;
        let mark = io.state.config.node.socket_mark;
        let fd = in_netns(netns.as_ref(), || socket::outbound_socket(&peer, mark))??;
        let raw = fd.as_raw_fd();
        let role = Role::Client {
            pool_id: tid,
            peer,
            expected,
            source,
        };
        let tkey = self
            .insert_tunnel(io, now, Held::Nothing, |key, ctx| {
                Tunnel::client(key, fd, role, conn, ctx)
            })
            .ok_or_else(|| io::Error::other("tunnels are off"))?;
        self.by_pool_id.insert(tid, tkey);
        let started = io
            .driver
            .connect(tkey, raw, peer)
            .and_then(|_| io.driver.register(tkey, Side::Upstream, raw));
        if let Err(e) = started {
            let errno = crate::tunnel::error::errno(&e);
            self.with_tunnel(io, tkey, now, |t, ctx| t.connected(Err(errno), ctx));
        }
        Ok(())
    }

    /// The pool gave up on a tunnel that never got a slab entry: reset its waiters.
    fn pool_tunnel_failed(&mut self, io: &mut Shared<'_>, tid: TunnelId, now: Instant) {
        let failed = self.pool.tunnel_failed(tid);
        if let Ok(failed) = failed {
            for w in failed.waiters {
                self.finish_pending(
                    io,
                    w,
                    StreamEnd::TunnelBroken {
                        kind: FailureKind::TunnelFailed,
                    },
                    now,
                );
            }
        }
    }

    /// Opens the waiting connection's CONNECT stream on tunnel `tkey` (a stream is reserved
    /// for it there).
    fn open_on(&mut self, io: &mut Shared<'_>, skey: FlowKey, tkey: FlowKey, now: Instant) {
        let Some(e) = entry_mut(&mut self.streams, skey) else {
            return;
        };
        let StreamSlot::Waiting(p) = std::mem::replace(&mut e.slot, StreamSlot::Opening) else {
            return;
        };
        let PendingStream {
            fd,
            record,
            counters,
            request,
            target,
            pool_id,
            reserved,
            started,
            owner,
        } = *p;
        let setup = StreamSetup {
            key: skey,
            local: fd,
            started,
            counters,
            record,
            owner,
            admission: None,
        };
        let opened = self.with_tunnel(io, tkey, now, |t, ctx| t.open_stream(setup, &request, ctx));
        match opened {
            Some(Ok(id)) => {
                if let Some(e) = entry_mut(&mut self.streams, skey) {
                    e.slot = StreamSlot::OnTunnel { tunnel: tkey, id };
                }
            }
            Some(Err(refused)) => {
                let OpenRefused { setup, why } = *refused;
                log::warn!("reactor {}: cannot open a stream: {why}", io.id);
                if let Some(e) = entry_mut(&mut self.streams, skey) {
                    e.slot = StreamSlot::Waiting(Box::new(PendingStream {
                        fd: setup.local,
                        record: setup.record,
                        counters: setup.counters,
                        request,
                        target,
                        pool_id,
                        reserved,
                        started: setup.started,
                        owner: setup.owner,
                    }));
                }
                self.finish_pending(
                    io,
                    skey,
                    StreamEnd::TunnelBroken {
                        kind: FailureKind::TunnelFailed,
                    },
                    now,
                );
            }
            // The tunnel is gone; the socket went with it.
            None => {
                self.remove_stream_entry(io, skey);
                if reserved {
                    if let Some(tid) = pool_id {
                        let _ = self.pool.stream_closed(tid, now);
                    }
                }
            }
        }
    }

    /// Checks a waiting connection out of the pool again (its tunnel drained or allowed
    /// fewer streams).
    fn retry_checkout(&mut self, io: &mut Shared<'_>, skey: FlowKey, now: Instant) {
        let target = match entry_mut(&mut self.streams, skey).map(|e| &e.slot) {
            Some(StreamSlot::Waiting(p)) => p.target.clone(),
            _ => return,
        };
        let pool_key = PoolKey {
            source: target.source_id,
            peer: target.peer,
            expected: target.expected,
        };
        self.checkout(io, skey, &pool_key, now);
    }

    /// A tunnel finished its handshake: log its mode once per reactor; a client tunnel's
    /// waiting connections get their streams.
    fn tunnel_established(&mut self, io: &mut Shared<'_>, tkey: FlowKey, now: Instant) {
        let Some(e) = entry_mut(&mut self.tunnels, tkey) else {
            return;
        };
        let role = e.tunnel.role().label();
        let pool_id = match e.tunnel.role() {
            Role::Client { pool_id, .. } => Some(*pool_id),
            Role::Server { .. } => None,
        };
        if let Some(mode) = e.tunnel.mode() {
            let line = format!("{} tunnels use {mode}", role.label());
            let id = io.id;
            if self.logged_modes.insert(line.clone()) {
                log::info!("reactor {id}: {line}");
            }
        }
        let Some(tid) = pool_id else {
            return self.admit_established(io, tkey, now);
        };
        let ready = self.pool.tunnel_ready(tid, u32::MAX, now);
        if let Ok(ready) = ready {
            for w in ready.granted {
                if let Some(StreamSlot::Waiting(p)) =
                    entry_mut(&mut self.streams, w).map(|e| &mut e.slot)
                {
                    p.reserved = true;
                }
                self.open_on(io, w, tkey, now);
            }
            for w in ready.retry {
                self.retry_checkout(io, w, now);
            }
            for w in ready.refused {
                self.finish_pending(
                    io,
                    w,
                    StreamEnd::TunnelBroken {
                        kind: FailureKind::TunnelFailed,
                    },
                    now,
                );
            }
        }
        self.process_pool_events(io, now);
    }

    /// Acts on the pool's decisions: tunnels it let go are closed.
    pub(super) fn process_pool_events(&mut self, io: &mut Shared<'_>, now: Instant) {
        loop {
            let h = &mut *self;
            let Some(PoolEvent::Close { tunnel, reason }) = h.pool.poll_event() else {
                return;
            };
            let Some(tkey) = h.by_pool_id.get(&tunnel).copied() else {
                continue;
            };
            let reason = match reason {
                CloseReason::Idle => TunnelClose::Idle,
                CloseReason::Drained => TunnelClose::Drained,
                CloseReason::NoStreams => TunnelClose::NoStreams,
            };
            self.with_tunnel(io, tkey, now, |t, ctx| t.close(reason, ctx));
        }
    }

    /// A client tunnel stops taking streams (closing or gone): the pool forgets it and the
    /// connections still waiting on it are reset.
    fn leave_pool(&mut self, io: &mut Shared<'_>, tkey: FlowKey, now: Instant) {
        let Some(e) = entry_mut(&mut self.tunnels, tkey) else {
            return;
        };
        let Role::Client { pool_id, .. } = e.tunnel.role() else {
            return;
        };
        let pool_id = *pool_id;
        let h = &mut *self;
        if h.by_pool_id.get(&pool_id) == Some(&tkey) {
            h.by_pool_id.remove(&pool_id);
        }
        if h.pool.state(pool_id) != crate::tunnel::pool::TunnelState::Closed {
            self.pool_tunnel_failed(io, pool_id, now);
        }
    }

    // ------------------------------------------------------------------------- endings

    /// A stream a tunnel carried ended: the driver lets go of its socket, the pool of its
    /// reservation; the flow is counted and logged.
    fn stream_ended(
        &mut self,
        io: &mut Shared<'_>,
        mut ended: EndedStream,
        pool_id: Option<TunnelId>,
        now: Instant,
    ) {
        let armed = self.remove_stream_entry(io, ended.key).unwrap_or(0);
        io.driver.release(ended.key, armed, ended.connecting);
        if let Some(tid) = pool_id {
            let _ = self.pool.stream_closed(tid, now);
            self.process_pool_events(io, now);
        }
        ended.close_local();
        self.finish_flow(
            io,
            ended.end,
            ended.was_open,
            ended.started,
            &ended.counters,
            ended.record,
        );
    }

    /// Ends a connection that never got its stream.
    fn finish_pending(&mut self, io: &mut Shared<'_>, skey: FlowKey, end: StreamEnd, now: Instant) {
        let Some(e) = entry_mut(&mut self.streams, skey) else {
            return;
        };
        let StreamSlot::Waiting(_) = e.slot else {
            return;
        };
        let armed = e.armed;
        let e = self.streams.remove(slot(skey));
        let StreamSlot::Waiting(p) = e.slot else {
            unreachable!("checked above")
        };
        io.metrics.flows_open.fetch_sub(1, Relaxed);
        io.driver.release(skey, armed, false);
        if let Some(tid) = p.pool_id {
            let h = &mut *self;
            if p.reserved {
                let _ = h.pool.stream_closed(tid, now);
            } else {
                h.pool.cancel_wait(tid, &skey);
            }
            self.process_pool_events(io, now);
        }
        let mut ended = EndedStream {
            key: skey,
            local: Some(p.fd),
            connecting: false,
            end,
            was_open: false,
            started: p.started,
            counters: p.counters,
            record: p.record,
        };
        ended.close_local();
        self.finish_flow(io, end, false, ended.started, &ended.counters, ended.record);
    }

    /// Counts and logs a tunnel-carried connection that ended (its socket is closed).
    fn finish_flow(
        &mut self,
        io: &mut Shared<'_>,
        end: StreamEnd,
        was_open: bool,
        started: Instant,
        counters: &TcpCounters,
        mut record: FlowRecord,
    ) {
        if was_open {
            counters.closed.fetch_add(1, Relaxed);
        }
        let (close, failure, errno) = match end {
            StreamEnd::Clean => (CloseKind::Clean, None, None),
            StreamEnd::Cut(kind) => (kind, None, None),
            StreamEnd::LocalBroken { kind, errno } => {
                io.metrics.failure(kind);
                (
                    CloseKind::broken(was_open),
                    Some(kind),
                    Some(errno).filter(|e| *e != 0),
                )
            }
            StreamEnd::TunnelBroken { kind } => {
                io.metrics.failure(kind);
                (CloseKind::broken(was_open), Some(kind), None)
            }
        };
        io.metrics.closed(close);
        record.set_end(close, failure, errno, started.elapsed());
        access_log::emit(&record, io.observer);
    }

    /// Takes the tunnel out of the slab and closes its socket (with a reset when it failed).
    fn remove_tunnel(&mut self, io: &mut Shared<'_>, tkey: FlowKey, reset: bool, connecting: bool) {
        if entry_mut(&mut self.tunnels, tkey).is_none() {
            return;
        }
        let e = self.tunnels.remove(slot(tkey));
        self.budgets.release(e.held.clone(), &io.metrics.hbone);
        log::debug!(
            "reactor {}: {} tunnel fd {} removed (reset: {reset})",
            io.id,
            e.tunnel.role().label().label(),
            e.tunnel.raw()
        );
        io.driver.release(tkey, e.armed, connecting);
        let fd = e.tunnel.into_fd();
        if reset {
            socket::close_with_reset(fd);
        } else {
            drop(fd);
        }
    }

    /// Closes every tunnel politely (GOAWAY, close_notify) — their connections are done.
    pub(super) fn close_tunnels(&mut self, io: &mut Shared<'_>, now: Instant) {
        let keys: Vec<FlowKey> = self.tunnels.iter().map(|(_, e)| e.key()).collect();
        for key in keys {
            self.with_tunnel(io, key, now, |t, ctx| t.close(TunnelClose::Shutdown, ctx));
        }
    }

    /// Cuts every tunnel-carried connection (the drain deadline, or a stop).
    pub(super) fn cut_streams(&mut self, io: &mut Shared<'_>, how: CloseKind, now: Instant) {
        let pending: Vec<FlowKey> = self
            .streams
            .iter()
            .filter(|(_, e)| matches!(e.slot, StreamSlot::Waiting(_)))
            .map(|(_, e)| e.key)
            .collect();
        for key in pending {
            self.finish_pending(io, key, StreamEnd::Cut(how), now);
        }
        let tunnels: Vec<FlowKey> = self.tunnels.iter().map(|(_, e)| e.key()).collect();
        for key in tunnels {
            self.with_tunnel(io, key, now, |t, ctx| t.cut_streams(how, ctx));
        }
    }

    /// A reload: the streams its policy denies now are cut, those of a workload that left this
    /// node are drained (reset at `drain_at`), and server tunnels to such a workload send
    /// GOAWAY. Returns how many streams were cut and set draining.
    pub(super) fn recheck(
        &mut self,
        io: &mut Shared<'_>,
        state: &State,
        drain_at: Instant,
        now: Instant,
    ) -> (usize, usize) {
        let (mut cut, mut drained) = (0, 0);
        let keys: Vec<FlowKey> = self.tunnels.iter().map(|(_, e)| e.key()).collect();
        for tkey in keys {
            let Some(e) = entry(&self.tunnels, tkey) else {
                continue;
            };
            let identity = e.tunnel.peer_identity().cloned();
            let workload_left = match e.tunnel.role() {
                Role::Server { local, .. } => state
                    .registry
                    .workload_by_ip(local.ip())
                    .is_none_or(|w| !state.registry.workload(w).local),
                Role::Client { .. } => false,
            };
            let mut denied = Vec::new();
            let mut leaving = Vec::new();
            for (id, owner, admission, draining) in e.tunnel.stream_checks() {
                if !state.registry.is_local(&owner) {
                    if !draining {
                        leaving.push(id);
                    }
                    continue;
                }
                let Some(admission) = admission else {
                    continue;
                };
                match authorization::recheck(state, &admission, identity.as_ref()) {
                    Recheck::Allowed => {}
                    Recheck::Gone if !draining => leaving.push(id),
                    Recheck::Gone => {}
                    Recheck::Denied { decision, workload } => {
                        authorization::count_denial(io.metrics, state, &decision, DenialAt::Reload);
                        denied.push((id, admission, decision, workload));
                    }
                }
            }
            if denied.is_empty() && leaving.is_empty() && !workload_left {
                continue;
            }
            cut += denied.len();
            drained += leaving.len();
            self.with_tunnel(io, tkey, now, |t, ctx| {
                for (id, admission, decision, workload) in denied {
                    if let Some(record) = t.stream_record_mut(id) {
                        authorization::note_recheck(
                            state,
                            workload,
                            &admission,
                            identity.as_ref(),
                            &decision,
                            record,
                        );
                    }
                    t.cut_stream(id, CloseKind::PolicyDenied, ctx);
                }
                for id in leaving {
                    t.drain_stream(id, drain_at);
                }
                if workload_left {
                    t.goaway(ctx);
                }
            });
        }
        (cut, drained)
    }

    /// Drain: server tunnels send GOAWAY so peers open new streams elsewhere.
    pub(super) fn goaway_server_tunnels(&mut self, io: &mut Shared<'_>, now: Instant) {
        let keys: Vec<FlowKey> = self
            .tunnels
            .iter()
            .filter(|(_, e)| matches!(e.tunnel.role(), Role::Server { .. }))
            .map(|(_, e)| e.key())
            .collect();
        for key in keys {
            self.with_tunnel(io, key, now, |t, ctx| t.goaway(ctx));
        }
    }

    // -------------------------------------------------------------------------- slabs

    fn insert_tunnel(
        &mut self,
        io: &mut Shared<'_>,
        now: Instant,
        held: Held,
        make: impl FnOnce(FlowKey, &mut Ctx<'_>) -> Tunnel,
    ) -> Option<FlowKey> {
        let generation = io.next_gen();
        let entry = self.tunnels.vacant_entry();
        let key = make_key(Kind::Tunnel, entry.key(), generation);
        let mut ctx = Ctx {
            env: &self.env,
            pipes: &mut *io.pipes,
            metrics: &io.metrics.hbone,
            now,
        };
        let tunnel = make(key, &mut ctx);
        entry.insert(TunnelEntry {
            tunnel,
            armed: 0,
            held,
            since: now,
        });
        self.apply_actions(io, key, now);
        Some(key)
    }

    fn insert_stream(&mut self, io: &mut Shared<'_>, slot: StreamSlot) -> FlowKey {
        let generation = io.next_gen();
        let entry = self.streams.vacant_entry();
        let key = make_key(Kind::Stream, entry.key(), generation);
        entry.insert(StreamEntry {
            key,
            armed: 0,
            slot,
        });
        io.metrics.flows_open.fetch_add(1, Relaxed);
        key
    }

    /// Removes a stream's routing entry; its armed bits, if it was there.
    fn remove_stream_entry(&mut self, io: &mut Shared<'_>, skey: FlowKey) -> Option<u8> {
        entry_mut(&mut self.streams, skey)?;
        let e = self.streams.remove(slot(skey));
        io.metrics.flows_open.fetch_sub(1, Relaxed);
        Some(e.armed)
    }

    /// Established tunnels, their connections and plain flows share one per-reactor budget.
    fn at_flow_limit(&self, io: &Shared<'_>) -> bool {
        io.plain_flows + self.entries() >= io.max_flows
    }

    /// Under pressure: closes one server tunnel without streams (of `identity`, or from
    /// `address`, when given), never `except`: the one whose peer opened a stream longest
    /// ago (never one first, oldest first), so a tunnel in use between two connections keeps
    /// its place while parked ones go. True when one was closed.
    fn shed_idle(
        &mut self,
        io: &mut Shared<'_>,
        now: Instant,
        identity: Option<&SpiffeId>,
        address: Option<IpAddr>,
        except: FlowKey,
    ) -> bool {
        let victim = self
            .tunnels
            .iter()
            .map(|(_, e)| e)
            .filter(|e| e.key() != except && e.tunnel.phase() == Phase::Open)
            .filter(|e| e.tunnel.stream_count() == 0)
            .filter(|e| match &e.held {
                Held::Peer {
                    identity: i,
                    address: a,
                } => identity.is_none_or(|want| want == i) && address.is_none_or(|want| want == *a),
                _ => false,
            })
            .min_by_key(|e| (e.tunnel.last_request(), e.since))
            .map(Keyed::key);
        let Some(victim) = victim else {
            return false;
        };
        io.metrics.hbone.shed(TunnelShed::IdleUnderPressure);
        self.with_tunnel(io, victim, now, |t, ctx| t.close(TunnelClose::Shed, ctx));
        true
    }

    /// The handshake budget is full and a source holding `newcomer` handshakes wants one:
    /// the source holding the most gives up its oldest, if it holds more — so a flood from
    /// many addresses cannot keep a peer that holds none (a node opening its first tunnel)
    /// out. True when one was shed.
    fn shed_handshake(&mut self, io: &mut Shared<'_>, newcomer: usize, now: Instant) -> bool {
        let Some((&busiest, &held)) = self
            .budgets
            .handshakes_by_source
            .iter()
            .max_by_key(|(_, n)| **n)
        else {
            return false;
        };
        if held <= newcomer {
            return false;
        }
        let victim = self
            .tunnels
            .iter()
            .map(|(_, e)| e)
            .filter(|e| e.held == Held::Handshake(busiest))
            .min_by_key(|e| e.since)
            .map(Keyed::key);
        let Some(victim) = victim else {
            return false;
        };
        io.metrics.hbone.shed(TunnelShed::HandshakeBudget);
        self.with_tunnel(io, victim, now, |t, ctx| t.close(TunnelClose::Shed, ctx));
        true
    }

    /// The flow budget is full: an idle server tunnel gives its place up, if there is one.
    /// True when the budget has room now.
    pub fn make_room(&mut self, io: &mut Shared<'_>, now: Instant) -> bool {
        !self.at_flow_limit(io) || self.shed_idle(io, now, None, None, FlowKey::NONE)
    }

    /// A server tunnel finished its handshake: it leaves the handshake budget and joins the
    /// flow budget and its peer's. Over a bound, an idle tunnel makes room (of the same peer
    /// for the peer bounds); without one the new tunnel is closed (GOAWAY) and counted.
    fn admit_established(&mut self, io: &mut Shared<'_>, tkey: FlowKey, now: Instant) {
        let Some(e) = entry_mut(&mut self.tunnels, tkey) else {
            return;
        };
        let Role::Server { peer, .. } = e.tunnel.role() else {
            return;
        };
        let address = peer.ip();
        let identity = e.tunnel.peer_identity().cloned();
        let held = std::mem::replace(&mut e.held, Held::Nothing);
        self.budgets.release(held, &io.metrics.hbone);
        // An established server tunnel always proved an identity (the handshake demands a
        // client certificate); without one there is no peer to count it against.
        let Some(identity) = identity else {
            return;
        };
        let max = self.budgets.limits.max_tunnels_per_peer;
        let identity_full = self
            .budgets
            .by_identity
            .get(&identity)
            .is_some_and(|n| *n >= max);
        let address_full = self
            .budgets
            .by_address
            .get(&address)
            .is_some_and(|n| *n >= max);
        // One idle tunnel makes room for one new one: of this identity and/or from this
        // address, whichever bound is reached; of anyone when only the flow budget is full.
        let refused = if identity_full || address_full {
            let shed = self.shed_idle(
                io,
                now,
                identity_full.then_some(&identity),
                address_full.then_some(address),
                tkey,
            );
            match (shed, identity_full) {
                (true, _) => None,
                (false, true) => Some(TunnelShed::PeerIdentity),
                (false, false) => Some(TunnelShed::PeerAddress),
            }
        } else if io.plain_flows + self.entries() > io.max_flows
            && !self.shed_idle(io, now, None, None, tkey)
        {
            Some(TunnelShed::FlowLimit)
        } else {
            None
        };
        if let Some(why) = refused {
            io.metrics.hbone.shed(why);
            crate::log_limited!(
                log::Level::Warn,
                why.label(),
                "reactor {}: tunnel from {} ({}) closed at once: {} (limit {max} per peer, \
                 {} flows per reactor)",
                io.id,
                address,
                identity.to_uri(),
                why.label(),
                io.max_flows
            );
            self.with_tunnel(io, tkey, now, |t, ctx| t.close(TunnelClose::Shed, ctx));
            return;
        }
        *self
            .budgets
            .by_identity
            .entry(identity.clone())
            .or_default() += 1;
        *self.budgets.by_address.entry(address).or_default() += 1;
        if let Some(e) = entry_mut(&mut self.tunnels, tkey) {
            e.held = Held::Peer { identity, address };
        }
    }
}

#[cfg(test)]
mod tests {
    use super::source_bucket;
    use std::net::IpAddr;

    #[test]
    fn handshakes_count_per_ipv4_address_and_per_ipv6_64() {
        let ip = |s: &str| s.parse::<IpAddr>().unwrap();
        assert_eq!(source_bucket(ip("10.1.2.3")), ip("10.1.2.3"));
        assert_ne!(source_bucket(ip("10.1.2.3")), source_bucket(ip("10.1.2.4")));
        assert_eq!(source_bucket(ip("::ffff:10.1.2.3")), ip("10.1.2.3"));
        assert_eq!(source_bucket(ip("fd00:1:2:3:a::1")), ip("fd00:1:2:3::"));
        assert_eq!(
            source_bucket(ip("fd00:1:2:3:ffff::9")),
            source_bucket(ip("fd00:1:2:3::1"))
        );
        assert_ne!(
            source_bucket(ip("fd00:1:2:3::1")),
            source_bucket(ip("fd00:1:2:4::1"))
        );
    }
}
