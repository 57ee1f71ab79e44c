//! One HBONE tunnel: the object that owns everything a tunnel is — its socket, its TLS (the
//! handshake, then records in the kernel or in user space: [`Transport`]), its `hbone-proto`
//! [`Session`], its streams and their local sockets ([`Stream`]), the writer that serialises
//! DATA frames on the socket — and that alone changes any of it.
//!
//! The split is quinn-proto's connection/endpoint one. The reactor owns the driver and routes
//! by key: it calls a tunnel with an event (its socket is ready, a stream's socket is ready, a
//! connect finished, a timer fired, a decision on a CONNECT) and then applies the
//! [`Action`]s the tunnel queued: arm a socket, set a timer, run the tunnel again, a CONNECT
//! to decide, a stream that ended (its socket, record and reason), the pool news of a client
//! tunnel, the tunnel's own end. Nothing here touches the ring or the epoll set, the registry
//! or the pool, so two tunnels can be joined over a socket pair and tested without a reactor
//! (see `tests`).
//!
//! **Receiving has one path.** Bytes are read only as the session asks for them: at most
//! [`Session::input_wanted`] on a zero-copy kTLS socket, so payload never lands in user space
//! by accident. When the session announces a DATA payload, the tunnel moves exactly those
//! bytes into the stream's one [`Sink`](super::sink::Sink) — spliced off the socket when it
//! can be, copied when it cannot — and reports them with [`Session::data_consumed`]. There is
//! one frame parser (the session's), one queue per stream and one place that delivers; the
//! order of a stream's bytes cannot depend on which way each frame came.
//!
//! **Sending**: the session's frames go into the transport's output; a stream's bytes are read
//! straight into that output behind a DATA header (copy), or, on kTLS with zero copy, a
//! stream's [`FrameSender`](super::frames::FrameSender) writes its header and splices its
//! payload onto the socket itself — while it is mid-frame it owns the socket and everything
//! else waits. Streams that wait for room or for credit sit in queues the tunnel wakes.
//!
//! Closing politely ([`Phase::Closing`]): GOAWAY, everything queued written, close_notify,
//! FIN, then the socket is read until the peer's FIN — closing with unread bytes would make the
//! kernel send a reset that can destroy data still in flight to the peer. Bounded by a linger
//! timer.

use std::collections::{HashMap, VecDeque};
use std::net::SocketAddr;
use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::sync::Arc;
use std::time::{Duration, Instant};

use hbone_proto::{ConnectRequest, ErrorCode, Session, Settings, StreamId};
use rustls::client::UnbufferedClientConnection;
use rustls::server::UnbufferedServerConnection;

use super::error::TunnelError;
use super::inbound_rules::RejectReason;
use super::pool::TunnelId;
use super::streams::{EndedStream, Stream, StreamEnd, StreamPhase, StreamSetup};
use super::transport::{KeyUpdates, Transport, KEY_UPDATE_SETTING};
use crate::control_plane::identity::SpiffeId;
use crate::control_plane::workload_registry::WorkloadId;
use crate::data_plane::authorization::Admission;
use crate::data_plane::driver::{FlowKey, Interest, Side};
use crate::data_plane::socket;
use crate::data_plane::splice::PipePool;
use crate::data_plane::timer::TimerKind;
use crate::kernel_features::KtlsSupport;
use crate::observability::access_log::FlowRecord;
use crate::observability::hbone_metrics::{
    CipherLabel, HboneMetrics, Role as RoleLabel, TlsLabel, TunnelClose,
};
use crate::observability::metrics::{CloseKind, FailureKind};
use crate::redirection::netns::NetNs;
use crate::tls::handshake::{Handshake, Progress};
use crate::tls::ktls::{self, RecordBudget, TunnelTlsMode, UserSpaceReason};

mod closing;
mod receive;
mod send;

/// How long a politely closing tunnel may take to flush and see the peer's FIN.
pub const CLOSE_LINGER: Duration = Duration::from_secs(5);
/// A copying stream waits once the tunnel's output has less room than this.
const MIN_ROOM: usize = 16 * 1024;

/// Which end of the tunnel this node is.
#[derive(Debug, Clone)]
pub enum Role {
    /// We opened it for the pool entry `pool_id`, to `peer`, expecting `expected`.
    Client {
        pool_id: TunnelId,
        peer: SocketAddr,
        expected: SpiffeId,
        /// The source workload (its namespace made the socket).
        source: WorkloadId,
    },
    /// A peer opened it to `local` (a local workload's address, port 15008).
    Server {
        workload: WorkloadId,
        local: SocketAddr,
        peer: SocketAddr,
        /// The workload's namespace, where connections to it are made.
        netns: Option<NetNs>,
        /// Deliveries reach the application from the client's address (the CONNECT's
        /// `forwarded`, checked against the peer's identity, or the tunnel's peer address).
        deliver_client: bool,
    },
}

impl Role {
    pub fn label(&self) -> RoleLabel {
        match self {
            Role::Client { .. } => RoleLabel::Client,
            Role::Server { .. } => RoleLabel::Server,
        }
    }

    /// The peer, for logs.
    pub fn describe(&self) -> String {
        match self {
            Role::Client { peer, expected, .. } => format!("{peer} (expecting {expected})"),
            Role::Server { peer, local, .. } => format!("{peer} → {local}"),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Phase {
    /// TCP connect in flight (client).
    Connecting,
    Handshaking,
    /// TLS done; the session runs.
    Open,
    /// GOAWAY sent; writing what is queued, then close_notify and FIN, then waiting for the
    /// peer's FIN. Streams that had finished both ways may still deliver their tail.
    Closing,
    /// Gone: the reactor removes it.
    Closed,
}

/// Per-reactor settings every tunnel reads.
#[derive(Debug, Clone)]
pub struct TunnelEnv {
    pub reactor: usize,
    pub ktls: KtlsSupport,
    /// `node.hbone.ktls: auto`.
    pub allow_ktls: bool,
    /// `node.hbone.zero_copy` (takes effect on kTLS tunnels).
    pub zero_copy: bool,
    /// `node.hbone.ktls_record_budget` (capped by the suite's confidentiality limit).
    pub record_budget: u64,
    pub max_bytes_per_wakeup: usize,
    /// Connect + TLS handshake deadline (client tunnels).
    pub connect_timeout: Duration,
    /// TLS handshake deadline of an accepted connection (server tunnels): shorter, so a peer
    /// that connects and says nothing holds a handshake slot only briefly.
    pub handshake_timeout: Duration,
    /// A stream without a byte either way for this long is cut.
    pub idle_timeout: Duration,
    /// A server tunnel without streams for this long is closed.
    pub server_idle: Duration,
    /// `node.hbone.keepalive_interval` / `keepalive_timeout`: PINGs that notice a peer gone
    /// without a word.
    pub keepalive_interval: Option<Duration>,
    pub keepalive_timeout: Duration,
}

/// What a call gets to work with besides the tunnel.
pub struct Ctx<'a> {
    pub env: &'a TunnelEnv,
    pub pipes: &'a mut PipePool,
    pub metrics: &'a HboneMetrics,
    pub now: Instant,
}

/// What the reactor must do after a call (see the module docs).
#[derive(Debug)]
pub enum Action {
    /// Ask the driver for one readiness event on `fd` (the tunnel's own socket when `key` is
    /// the tunnel's, else a stream's local socket).
    Arm {
        key: FlowKey,
        fd: RawFd,
        side: Side,
        interest: Interest,
    },
    Timer {
        key: FlowKey,
        at: Instant,
        kind: TimerKind,
    },
    /// Call [`Tunnel::run`] again before waiting (a budget ran out).
    Queue,
    /// The handshake is done (a client tunnel's waiting streams may be granted now).
    Established,
    /// Server: a CONNECT to decide ([`Tunnel::accept_stream`] / [`Tunnel::refuse_stream`]).
    Request {
        id: StreamId,
        request: ConnectRequest,
    },
    /// Server: a CONNECT the session could not parse was answered `status` and reset (the
    /// reactor records the refusal).
    RequestRefused {
        status: u16,
        reason: RejectReason,
    },
    StreamEnded(Box<EndedStream>),
    /// Client: the peer sent GOAWAY; the pool must stop granting streams here.
    GoAway,
    /// Client: the record budget is reached; the pool retires this tunnel.
    Retire,
    /// The tunnel takes no new streams any more (it began closing).
    Closing,
    /// The tunnel is over: release the driver's requests (a connect may still be in flight
    /// when `connecting`) and close the socket (with a reset when `reset`).
    Closed {
        reset: bool,
        connecting: bool,
    },
}

/// A stream the tunnel could not open: the socket comes back with the reason.
#[derive(Debug)]
pub struct OpenRefused {
    pub setup: StreamSetup,
    pub why: String,
}

/// What the receive loop stopped on.
enum Recv {
    WantRead,
    Yield,
    Eof,
    /// The tunnel is no longer open (it failed or closed while receiving).
    Stopped,
}

/// See the module docs.
pub struct Tunnel {
    key: FlowKey,
    fd: OwnedFd,
    role: Role,
    phase: Phase,
    handshake: Option<Box<Handshake>>,
    transport: Option<Transport>,
    session: Option<Session>,
    streams: HashMap<StreamId, Stream>,
    mode: Option<TunnelTlsMode>,
    peer_identity: Option<SpiffeId>,
    /// kTLS with `node.hbone.zero_copy`: payload is spliced both ways.
    zero_copy: bool,
    /// The stream whose zero-copy DATA frame is partly written: the socket is its until the
    /// frame is complete.
    writer: Option<StreamId>,
    /// Streams waiting for the socket (room in the output, or the writer to finish).
    blocked: Vec<StreamId>,
    /// Streams waiting for flow-control credit (woken by the peer's WINDOW_UPDATE/SETTINGS
    /// only: waking them on every flush made an idle sender spin).
    waiting_credit: Vec<StreamId>,
    /// Streams to run now.
    runnable: VecDeque<StreamId>,
    /// The session drained while `writer` was mid-frame: close once the frame is written.
    close_when_written: bool,
    /// No new streams (GOAWAY received, or the record budget reached).
    retiring: bool,
    /// Closing: close_notify and FIN went out.
    fin_sent: bool,
    /// Closing: the peer's FIN was read (or the linger ran out); only streams remain.
    socket_done: bool,
    queued: bool,
    timer_at: Option<Instant>,
    idle_since: Option<Instant>,
    /// When the peer last opened a stream (server tunnels): under pressure the tunnel idle
    /// longest gives its place up first, never one a client is using right now.
    last_request: Option<Instant>,
    actions: VecDeque<Action>,
    /// Frames polled from the session, reused.
    frames: Vec<u8>,
}

impl std::fmt::Debug for Tunnel {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Tunnel")
            .field("key", &self.key)
            .field("role", &self.role)
            .field("phase", &self.phase)
            .field("streams", &self.streams.len())
            .finish_non_exhaustive()
    }
}

impl Tunnel {
    /// A client tunnel whose socket is connecting to `peer` (the reactor started the connect).
    pub fn client(
        key: FlowKey,
        fd: OwnedFd,
        role: Role,
        conn: UnbufferedClientConnection,
        ctx: &mut Ctx<'_>,
    ) -> Tunnel {
        ctx.metrics.handshake_started(RoleLabel::Client);
        let mut t = Tunnel::new(
            key,
            fd,
            role,
            Some(Handshake::client(conn)),
            Phase::Connecting,
        );
        t.push_timer(key, ctx.now + ctx.env.connect_timeout, TimerKind::Connect);
        t
    }

    /// A server tunnel on an accepted socket: call [`drive`](Self::run) to start the handshake.
    pub fn server(
        key: FlowKey,
        fd: OwnedFd,
        role: Role,
        conn: UnbufferedServerConnection,
        ctx: &mut Ctx<'_>,
    ) -> Tunnel {
        ctx.metrics.handshake_started(RoleLabel::Server);
        let mut t = Tunnel::new(
            key,
            fd,
            role,
            Some(Handshake::server(conn)),
            Phase::Handshaking,
        );
        t.push_timer(key, ctx.now + ctx.env.handshake_timeout, TimerKind::Connect);
        t
    }

    fn new(
        key: FlowKey,
        fd: OwnedFd,
        role: Role,
        handshake: Option<Handshake>,
        phase: Phase,
    ) -> Tunnel {
        Tunnel {
            key,
            fd,
            role,
            phase,
            handshake: handshake.map(Box::new),
            transport: None,
            session: None,
            streams: HashMap::new(),
            mode: None,
            peer_identity: None,
            zero_copy: false,
            writer: None,
            blocked: Vec::new(),
            waiting_credit: Vec::new(),
            runnable: VecDeque::new(),
            close_when_written: false,
            retiring: false,
            fin_sent: false,
            socket_done: false,
            queued: false,
            timer_at: None,
            idle_since: None,
            last_request: None,
            actions: VecDeque::new(),
            frames: Vec::new(),
        }
    }

    pub fn key(&self) -> FlowKey {
        self.key
    }

    pub fn raw(&self) -> RawFd {
        self.fd.as_raw_fd()
    }

    pub fn role(&self) -> &Role {
        &self.role
    }

    pub fn phase(&self) -> Phase {
        self.phase
    }

    pub fn peer_identity(&self) -> Option<&SpiffeId> {
        self.peer_identity.as_ref()
    }

    pub fn mode(&self) -> Option<&TunnelTlsMode> {
        self.mode.as_ref()
    }

    pub fn is_kernel_tls(&self) -> bool {
        self.transport.as_ref().is_some_and(Transport::is_kernel)
    }

    pub fn zero_copy(&self) -> bool {
        self.zero_copy
    }

    pub fn stream_count(&self) -> usize {
        self.streams.len()
    }

    /// When the peer last opened a stream on it (`None`: never).
    pub fn last_request(&self) -> Option<Instant> {
        self.last_request
    }

    /// The stream's local socket and the side it is registered as.
    pub fn stream_socket(&self, id: StreamId) -> Option<(RawFd, Side)> {
        let s = self.streams.get(&id)?;
        Some((s.local_fd()?, s.side))
    }

    /// Client tunnels: may a new stream be opened here now?
    pub fn takes_streams(&self) -> bool {
        self.phase == Phase::Open
            && !self.retiring
            && self.session.as_ref().is_some_and(|s| s.can_open_stream())
    }

    pub fn poll_action(&mut self) -> Option<Action> {
        self.actions.pop_front()
    }

    /// Streams that have not exchanged both END_STREAMs.
    pub fn unfinished_streams(&self) -> usize {
        self.streams
            .values()
            .filter(|s| !(s.remote_eof && s.local_eof))
            .count()
    }

    /// Takes the socket once the tunnel reported [`Action::Closed`].
    pub fn into_fd(self) -> OwnedFd {
        self.fd
    }

    /// Client: the TCP connect finished.
    pub fn connected(&mut self, result: Result<(), i32>, ctx: &mut Ctx<'_>) {
        if self.phase != Phase::Connecting {
            return;
        }
        match result {
            Ok(()) => {
                self.phase = Phase::Handshaking;
                self.run(ctx);
            }
            Err(errno) => self.fail(TunnelError::Connect(errno), ctx),
        }
    }

    /// The tunnel socket is ready for `interest`.
    pub fn ready(&mut self, interest: Interest, ctx: &mut Ctx<'_>) {
        if interest == Interest::Write && self.phase == Phase::Open {
            // Room again: the mid-frame writer and the streams waiting for room go on.
            self.wake_blocked();
        }
        self.run(ctx);
    }

    /// Handshake, then receiving, session events, the streams' sending and writing, as far
    /// as the socket and the budgets allow.
    pub fn run(&mut self, ctx: &mut Ctx<'_>) {
        self.queued = false;
        match self.phase {
            Phase::Connecting | Phase::Closed => return,
            Phase::Handshaking => {
                if !self.advance_handshake(ctx) {
                    return;
                }
            }
            Phase::Open => {}
            Phase::Closing => return self.continue_close(ctx),
        }
        match self.receive(ctx) {
            Ok(Recv::WantRead) => self.arm_socket(Interest::Read),
            Ok(Recv::Yield) => self.queue(),
            Ok(Recv::Stopped) => return,
            Ok(Recv::Eof) => return self.peer_closed(ctx),
            Err(e) => return self.fail(e, ctx),
        }
        self.run_streams(ctx);
        self.flush(ctx);
        self.schedule_session_timer();
    }

    /// A timer this tunnel set for itself fired.
    pub fn timer(&mut self, kind: TimerKind, at: Instant, ctx: &mut Ctx<'_>) {
        match kind {
            TimerKind::Connect if matches!(self.phase, Phase::Connecting | Phase::Handshaking) => {
                self.fail(TunnelError::HandshakeTimeout, ctx)
            }
            TimerKind::Linger if self.phase == Phase::Closing => {
                // The peer did not finish closing in time.
                self.socket_done = true;
                self.close_socket(true, ctx);
            }
            TimerKind::Session if self.timer_at == Some(at) && self.phase == Phase::Open => {
                self.timer_at = None;
                let Some(s) = self.session.as_mut() else {
                    return;
                };
                s.handle_timeout(ctx.now);
                if s.is_closed() {
                    return self.fail(TunnelError::Keepalive, ctx);
                }
                if let Err(e) = self.process_events(ctx) {
                    return self.fail(e, ctx);
                }
                if self.phase != Phase::Open {
                    return;
                }
                if self.server_idle_expired(ctx) {
                    return self.close(TunnelClose::Idle, ctx);
                }
                self.flush(ctx);
                self.schedule_session_timer();
            }
            _ => {}
        }
    }

    /// A stream's local socket is ready for `interest`.
    pub fn stream_ready(&mut self, id: StreamId, interest: Interest, ctx: &mut Ctx<'_>) {
        let Some(s) = self.streams.get(&id) else {
            return;
        };
        if s.phase != StreamPhase::Open {
            return;
        }
        match interest {
            Interest::Write => self.flush_sink(id, ctx),
            Interest::Read => self.send_stream(id, ctx),
        }
        if self.phase == Phase::Open {
            self.flush(ctx);
        }
    }

    /// A timer of one of this tunnel's streams fired.
    pub fn stream_timer(&mut self, id: StreamId, kind: TimerKind, ctx: &mut Ctx<'_>) {
        let Some(s) = self.streams.get(&id) else {
            return;
        };
        match (kind, s.phase) {
            (TimerKind::Connect, StreamPhase::Connecting) => {
                self.stream_connected(id, Err(libc::ETIMEDOUT), ctx)
            }
            (TimerKind::Connect, StreamPhase::AwaitingResponse) => self.end_stream(
                id,
                StreamEnd::TunnelBroken {
                    kind: FailureKind::UpstreamConnectTimeout,
                },
                ctx,
            ),
            (TimerKind::Drain, _) => {
                self.end_stream(id, StreamEnd::Cut(CloseKind::Drained), ctx);
                if self.phase == Phase::Open {
                    self.flush(ctx);
                }
            }
            (TimerKind::Idle, _) => {
                let due = s.last_active + ctx.env.idle_timeout;
                if due <= ctx.now {
                    self.end_stream(id, StreamEnd::Cut(CloseKind::IdleTimeout), ctx);
                } else {
                    let key = s.key;
                    self.push_timer(key, due, TimerKind::Idle);
                }
            }
            _ => {}
        }
    }

    /// Drives the handshake; true once the tunnel is open.
    fn advance_handshake(&mut self, ctx: &mut Ctx<'_>) -> bool {
        let fd = self.raw();
        let Some(hs) = self.handshake.as_mut() else {
            return self.phase == Phase::Open;
        };
        match hs.advance(fd) {
            Ok(Progress::WantRead) => {
                self.arm_socket(Interest::Read);
                false
            }
            Ok(Progress::WantWrite) => {
                self.arm_socket(Interest::Write);
                false
            }
            Ok(Progress::Done) => match self.establish(ctx) {
                Ok(()) => true,
                Err(e) => {
                    self.fail(e, ctx);
                    false
                }
            },
            Err(e) => {
                self.fail(e.into(), ctx);
                false
            }
        }
    }

    /// After the handshake: the keys go to the kernel when it can take them (else the
    /// user-space record layer gets them), and the HTTP/2 session starts.
    fn establish(&mut self, ctx: &mut Ctx<'_>) -> Result<(), TunnelError> {
        let hs = self.handshake.take().expect("handshaking");
        let est = hs.finish()?;
        let limit = ktls::record_limit(est.negotiated.suite, ctx.env.record_budget);
        let budget = RecordBudget::new(limit);
        let mode = if ctx.env.allow_ktls {
            ktls::offload(self.raw(), &est.negotiated, &est.secrets, &ctx.env.ktls)?
        } else {
            TunnelTlsMode::UserSpace {
                reason: UserSpaceReason::NoKtls("kTLS turned off by node.hbone.ktls".into()),
            }
        };
        // Keys can be updated in user space always; on kTLS where the kernel takes a second
        // key (`ringtun probe` tried it at start).
        let kernel_rekey = ctx.env.ktls.rekey == crate::kernel_features::Rekey::Supported;
        let transport = match mode {
            TunnelTlsMode::Kernel { .. } => {
                let keys = KeyUpdates::new(est.kernel, kernel_rekey);
                Transport::kernel(est.plaintext, budget, Some(keys))
            }
            TunnelTlsMode::UserSpace { .. } => {
                let keys = KeyUpdates::new(est.kernel, true);
                Transport::user_space(&est.secrets, est.plaintext, budget, Some(keys))?
            }
        };
        self.peer_identity = Some(est.negotiated.peer.clone());
        self.start_session(transport, ctx);
        let role = self.role.label();
        let (tls, path) = match (&mode, self.zero_copy) {
            (TunnelTlsMode::Kernel { .. }, true) => (TlsLabel::Kernel, ", payload spliced"),
            (TunnelTlsMode::Kernel { .. }, false) => (
                TlsLabel::Kernel,
                ", payload copied (node.hbone.zero_copy is off)",
            ),
            (TunnelTlsMode::UserSpace { .. }, _) => (TlsLabel::UserSpace, ""),
        };
        ctx.metrics
            .established(role, tls, CipherLabel::from(Some(est.negotiated.cipher)));
        log::info!(
            "reactor {}: {} tunnel with {} ({}) established: {mode}{path}",
            ctx.env.reactor,
            role.label(),
            self.role.describe(),
            est.negotiated.peer.to_uri(),
        );
        self.mode = Some(mode);
        self.actions.push_back(Action::Established);
        Ok(())
    }

    /// The HTTP/2 session starts over `transport` (its preface and SETTINGS queued first).
    fn start_session(&mut self, transport: Transport, ctx: &Ctx<'_>) {
        self.zero_copy = transport.is_kernel() && ctx.env.zero_copy;
        let mut settings = Settings {
            keepalive_interval: ctx.env.keepalive_interval,
            keepalive_timeout: ctx.env.keepalive_timeout,
            ..Settings::default()
        };
        if transport.has_tls_session() {
            // Whether we follow the peer's KeyUpdate; a ringtun peer updates its own key at
            // the record budget only when we say 1.
            settings.extensions = vec![(
                KEY_UPDATE_SETTING,
                u32::from(transport.follows_key_updates()),
            )];
        }
        self.transport = Some(transport);
        let mut session = match self.role {
            Role::Client { .. } => Session::client(settings, ctx.now),
            Role::Server { .. } => Session::server(settings, ctx.now),
        };
        self.frames.clear();
        session.poll_transmit(&mut self.frames);
        self.transport
            .as_mut()
            .expect("just set")
            .queue(&self.frames);
        self.session = Some(session);
        self.phase = Phase::Open;
    }

    /// A tunnel that starts open on a plaintext socket, which it treats as a kTLS socket:
    /// to the data path that is exactly what kTLS is (the socket carries HTTP/2 bytes and
    /// payload can be spliced through it). The tests run the kTLS data path this way on a
    /// kernel without kTLS; TLS itself is tested with real handshakes.
    #[cfg(test)]
    pub(crate) fn open_plaintext(
        key: FlowKey,
        fd: OwnedFd,
        role: Role,
        ctx: &mut Ctx<'_>,
    ) -> Tunnel {
        let mut t = Tunnel::new(key, fd, role, None, Phase::Open);
        let budget = RecordBudget::new(ctx.env.record_budget);
        t.start_session(Transport::kernel(Vec::new(), budget, None), ctx);
        t.mode = Some(TunnelTlsMode::Kernel {
            cipher: crate::kernel_features::KtlsCipher::Aes128Gcm,
        });
        t
    }

    /// Client: opens a CONNECT stream carrying `setup`'s socket. The socket comes back when
    /// the tunnel cannot take it.
    pub fn open_stream(
        &mut self,
        setup: StreamSetup,
        request: &ConnectRequest,
        ctx: &mut Ctx<'_>,
    ) -> Result<StreamId, Box<OpenRefused>> {
        if self.phase != Phase::Open {
            let why = format!("tunnel is {:?}", self.phase);
            return Err(Box::new(OpenRefused { setup, why }));
        }
        let session = self.session.as_mut().expect("open tunnel");
        let id = match session.open_stream(request) {
            Ok(id) => id,
            Err(e) => {
                let why = e.to_string();
                return Err(Box::new(OpenRefused { setup, why }));
            }
        };
        let window = Settings::default().initial_stream_window as usize;
        let stream = Stream::new(
            id,
            setup,
            Side::Downstream,
            StreamPhase::AwaitingResponse,
            window,
            self.zero_copy,
        );
        self.streams.insert(id, stream);
        self.flush(ctx);
        Ok(id)
    }

    /// Server: the reactor accepted the CONNECT on `id` and started connecting `setup`'s
    /// socket to the destination; the answer goes out when [`stream_connected`] says how it
    /// went.
    ///
    /// [`stream_connected`]: Self::stream_connected
    pub fn accept_stream(&mut self, id: StreamId, setup: StreamSetup) -> bool {
        let Some(s) = self.streams.get_mut(&id) else {
            return false;
        };
        if s.phase != StreamPhase::Requested {
            return false;
        }
        let sink = std::mem::replace(&mut s.sink, crate::tunnel::sink::Sink::new(0));
        let window = Settings::default().initial_stream_window as usize;
        let mut stream = Stream::new(
            id,
            setup,
            Side::Upstream,
            StreamPhase::Connecting,
            window,
            self.zero_copy,
        );
        // Payload that followed the CONNECT waits in its sink, in order.
        stream.sink = sink;
        stream.remote_eof = s.remote_eof;
        stream.stream_gone = s.stream_gone;
        *s = stream;
        true
    }

    /// Server: the CONNECT on `id` is refused with `status`; the stream is reset.
    pub fn refuse_stream(&mut self, id: StreamId, status: u16, ctx: &mut Ctx<'_>) {
        if let Some(mut s) = self.streams.remove(&id) {
            s.sink.release(ctx.pipes);
            self.forget_queued(id);
        }
        self.answer_and_reset(id, status, ctx);
        self.check_socket_done(ctx);
    }

    /// Server: the destination connect of stream `id` finished.
    pub fn stream_connected(&mut self, id: StreamId, result: Result<(), i32>, ctx: &mut Ctx<'_>) {
        let Some(s) = self.streams.get_mut(&id) else {
            return;
        };
        if s.phase != StreamPhase::Connecting {
            return;
        }
        match result {
            Ok(()) => {
                let answered = self
                    .session
                    .as_mut()
                    .is_some_and(|session| session.send_response(id, 200, false).is_ok());
                if !answered {
                    return self.end_stream(
                        id,
                        StreamEnd::TunnelBroken {
                            kind: FailureKind::StreamReset,
                        },
                        ctx,
                    );
                }
                ctx.metrics.stream_answered(RoleLabel::Server, 200);
                s.record.status = Some(200);
                self.stream_opened(id, ctx);
                self.flush(ctx);
            }
            Err(errno) => {
                // 503, and the flow never opened.
                s.stream_gone = true;
                s.record.status = Some(503);
                s.record.reason = Some(RejectReason::UpstreamUnreachable.label());
                ctx.metrics
                    .connect_refused(RejectReason::UpstreamUnreachable);
                self.answer_and_reset(id, 503, ctx);
                self.end_stream(
                    id,
                    StreamEnd::LocalBroken {
                        kind: FailureKind::from_connect_errno(errno),
                        errno,
                    },
                    ctx,
                );
            }
        }
    }

    /// A stream's CONNECT was answered 200 (sent, or received): bytes flow both ways now. Its
    /// idle timer starts, it runs at once (its socket may hold bytes already), and payload that
    /// came with the answer (or, inbound, ahead of the decision) leaves its sink.
    fn stream_opened(&mut self, id: StreamId, ctx: &mut Ctx<'_>) {
        let Some(s) = self.streams.get_mut(&id) else {
            return;
        };
        s.phase = StreamPhase::Open;
        s.last_active = ctx.now;
        s.counters
            .opened
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let key = s.key;
        self.push_timer(key, ctx.now + ctx.env.idle_timeout, TimerKind::Idle);
        self.make_runnable(id);
        self.flush_sink(id, ctx);
    }

    /// Ends a stream now (idle, drain deadline, a policy that no longer allows it).
    pub fn cut_stream(&mut self, id: StreamId, how: CloseKind, ctx: &mut Ctx<'_>) {
        self.end_stream(id, StreamEnd::Cut(how), ctx);
        if self.phase == Phase::Open {
            self.flush(ctx);
        }
    }

    /// Each stream that has its local socket: its id, the workload it belongs to and, inbound,
    /// what it was admitted on (what a reload checks again).
    pub fn stream_checks(&self) -> Vec<(StreamId, Arc<str>, Option<Admission>, bool)> {
        self.streams
            .values()
            .filter(|s| s.local.is_some())
            .map(|s| (s.id, Arc::clone(&s.owner), s.admission, s.draining))
            .collect()
    }

    /// The access record of stream `id` (to note why it is about to be cut).
    pub fn stream_record_mut(&mut self, id: StreamId) -> Option<&mut FlowRecord> {
        self.streams.get_mut(&id).map(|s| &mut s.record)
    }

    /// Stream `id`'s workload left this node: it is reset at `at` unless it ends before.
    pub fn drain_stream(&mut self, id: StreamId, at: Instant) {
        if let Some(s) = self.streams.get_mut(&id) {
            if !s.draining {
                s.draining = true;
                let key = s.key;
                self.push_timer(key, at, TimerKind::Drain);
            }
        }
    }

    /// Cuts every stream (the drain deadline).
    pub fn cut_streams(&mut self, how: CloseKind, ctx: &mut Ctx<'_>) {
        let ids: Vec<StreamId> = self.streams.keys().copied().collect();
        for id in ids {
            self.end_stream(id, StreamEnd::Cut(how), ctx);
        }
        if self.phase == Phase::Open {
            self.flush(ctx);
        }
    }

    /// Answers a CONNECT that will not be served (400/503 …) and resets its stream (the
    /// client may still be sending: NO_ERROR tells it to stop, RFC 9113 §8.1).
    fn answer_and_reset(&mut self, id: StreamId, status: u16, ctx: &mut Ctx<'_>) {
        ctx.metrics.stream_answered(RoleLabel::Server, status);
        if let Some(s) = self.session.as_mut() {
            let _ = s.send_response(id, status, true);
            let _ = s.reset(id, ErrorCode::NO_ERROR);
        }
        if self.phase == Phase::Open {
            self.flush(ctx);
        }
    }

    fn forget_queued(&mut self, id: StreamId) {
        self.blocked.retain(|s| *s != id);
        self.waiting_credit.retain(|s| *s != id);
        self.runnable.retain(|s| *s != id);
    }

    /// Removes a stream: resets it in the session unless it ended cleanly, hands its socket
    /// and record to the reactor.
    fn end_stream(&mut self, id: StreamId, end: StreamEnd, ctx: &mut Ctx<'_>) {
        let Some(s) = self.streams.remove(&id) else {
            return;
        };
        log::debug!(
            "reactor {}: stream {id:?} (fd {}) ends: {end:?}",
            ctx.env.reactor,
            s.local_fd().unwrap_or(-1)
        );
        self.forget_queued(id);
        if !s.stream_gone && end != StreamEnd::Clean {
            // Every end but a clean one resets the local socket, so the peer must reset its
            // side too: CANCEL (or NO_ERROR) would reach it as EOF, and its client would take
            // the cut-off stream for a complete one (the kernel matrix caught exactly that: a
            // stream ended here by a refused frame header reached the other node's client as
            // a clean end, 0.7 MB short).
            if let Some(session) = self.session.as_mut() {
                let _ = session.reset(id, ErrorCode::CONNECT_ERROR);
            }
        }
        let was_requested = s.phase == StreamPhase::Requested;
        let ended = s.end(end, ctx.pipes);
        if !was_requested {
            self.actions.push_back(Action::StreamEnded(Box::new(ended)));
        }
        if self.writer == Some(id) {
            // A half-written DATA frame cannot be finished: the tunnel is unusable.
            self.writer = None;
            return self.fail(TunnelError::StreamEndedMidFrame, ctx);
        }
        self.check_socket_done(ctx);
    }

    fn schedule_session_timer(&mut self) {
        let next = self.session.as_ref().and_then(Session::poll_timeout);
        if let Some(at) = next {
            if self.timer_at != Some(at) {
                self.timer_at = Some(at);
                let key = self.key;
                self.push_timer(key, at, TimerKind::Session);
            }
        }
    }

    /// Server tunnels close after `server_idle` without streams (the keepalive timer, every
    /// 10 s, is the clock): the client's pool normally closes its end first, but a peer that
    /// never does must not hold a tunnel slot on 15008 for ever.
    fn server_idle_expired(&mut self, ctx: &Ctx<'_>) -> bool {
        if !matches!(self.role, Role::Server { .. }) || self.phase != Phase::Open {
            return false;
        }
        if !self.streams.is_empty() {
            self.idle_since = None;
            return false;
        }
        let since = *self.idle_since.get_or_insert(ctx.now);
        ctx.now.duration_since(since) >= ctx.env.server_idle
    }

    fn push_timer(&mut self, key: FlowKey, at: Instant, kind: TimerKind) {
        self.actions.push_back(Action::Timer { key, at, kind });
    }

    fn arm_socket(&mut self, interest: Interest) {
        self.actions.push_back(Action::Arm {
            key: self.key,
            fd: self.raw(),
            side: Side::Upstream,
            interest,
        });
    }

    fn queue(&mut self) {
        if !self.queued {
            self.queued = true;
            self.actions.push_back(Action::Queue);
        }
    }

    /// The tunnel's IO state in one line, for the log when it fails: whether bytes sat unread
    /// in the socket, what the writer held, which streams waited, and the flow-control
    /// windows. Enough to tell a missed wakeup from a peer that stopped.
    pub fn describe_io(&self) -> String {
        let (unread, unacked) = socket::queued_bytes(self.raw());
        let show = |n: Option<i32>| n.map_or("?".into(), |n| n.to_string());
        let windows = self.session.as_ref().map_or(String::new(), |s| {
            let streams: Vec<String> = self
                .streams
                .keys()
                .map(|&id| {
                    format!(
                        "{id:?} send {} recv {}",
                        s.stream_send_window(id).unwrap_or(0),
                        s.stream_recv_window(id).unwrap_or(0)
                    )
                })
                .collect();
            format!(
                "; windows: connection send {} recv {}; {}; session wants {} bytes{}",
                s.connection_send_window(),
                s.connection_recv_window(),
                streams.join(", "),
                s.input_wanted(),
                s.pending_payload().map_or(String::new(), |(id, n)| format!(
                    ", {n} payload bytes of {id:?} due"
                ))
            )
        });
        format!(
            "socket: {} bytes unread, {} unacknowledged; {} bytes of input unparsed; {} bytes \
             queued to write; mid-frame writer: {:?}; {} streams, {} waiting for the socket, \
             {} for credit, {} runnable; queued {}, retiring {}, phase {:?}{windows}",
            show(unread),
            show(unacked),
            self.transport.as_ref().map_or(0, |t| t.buffered().len()),
            self.transport.as_ref().map_or(0, Transport::out_pending),
            self.writer,
            self.streams.len(),
            self.blocked.len(),
            self.waiting_credit.len(),
            self.runnable.len(),
            self.queued,
            self.retiring,
            self.phase,
        )
    }
}
