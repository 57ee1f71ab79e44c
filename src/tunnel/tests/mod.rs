//! Two tunnel objects joined over loopback sockets, driven by a small poll(2) loop that plays
//! the reactor — no namespaces, no root. Readiness is one-shot and level-checked, as io_uring
//! gives it, so a tunnel that arms without cause spins here and one that forgets to arm hangs.
//!
//! Tunnels run either the kTLS data path on a plaintext socket ([`Tls::Plain`]: splice and
//! all, which is what kTLS looks like to the data path) or real TLS 1.3 handshakes with the
//! user-space record layer ([`Tls::Rustls`]). Applications are threads on blocking sockets;
//! every test checks bytes by hash.

mod goaway;
mod pair;
mod random;

use std::collections::{HashMap, VecDeque};
use std::io::{Read, Write};
use std::net::{Shutdown, SocketAddr, TcpStream};
use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use hbone_proto::{ConnectRequest, StreamId};
use sha2::{Digest, Sha256};

use super::connection::{Action, Ctx, Role, Tunnel, TunnelEnv};
use super::pool::TunnelId;
use super::streams::{EndedStream, StreamSetup};
use crate::control_plane::workload_registry::WorkloadId;
use crate::data_plane::driver::{FlowKey, Interest};
use crate::data_plane::socket::tcp_pair;
use crate::data_plane::splice::PipePool;
use crate::data_plane::timer::TimerKind;
use crate::kernel_features::KtlsSupport;
use crate::observability::access_log::FlowRecord;
use crate::observability::hbone_metrics::{HboneMetrics, TunnelClose};
use crate::observability::metrics::TcpCounters;
use crate::tls::fixtures::{configs, id, Pki, CLIENT, SERVER};

/// How readiness reaches the tunnels, as each driver gives it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Readiness {
    /// io_uring: one-shot requests, checked against the socket's state when armed.
    Level,
    /// epoll: every socket registered once for both directions, edge-triggered; arming does
    /// nothing, so a tunnel that stops before EAGAIN hears no more.
    Edge,
}

pub(super) const READINESS: [Readiness; 2] = [Readiness::Level, Readiness::Edge];

/// A test's overall deadline.
pub(super) const DEADLINE: Duration = Duration::from_secs(60);

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Tls {
    /// The kTLS data path on a plaintext socket; `zero_copy` as `node.hbone.zero_copy`.
    Plain { zero_copy: bool },
    /// Real TLS 1.3 handshakes, records sealed in user space.
    Rustls,
}

pub(super) fn env() -> TunnelEnv {
    TunnelEnv {
        reactor: 0,
        ktls: KtlsSupport {
            tx: false,
            rx: false,
            ciphers: Vec::new(),
            rx_ciphers: Vec::new(),
            rekey: crate::kernel_features::Rekey::Unsupported,
            reason: Some("tests run without kTLS".into()),
        },
        allow_ktls: false,
        zero_copy: true,
        record_budget: crate::tls::ktls::TX_RECORD_BUDGET,
        max_bytes_per_wakeup: 256 * 1024,
        connect_timeout: Duration::from_secs(10),
        handshake_timeout: Duration::from_secs(10),
        idle_timeout: Duration::from_secs(60),
        server_idle: Duration::from_secs(600),
        keepalive_interval: Some(Duration::from_secs(10)),
        keepalive_timeout: Duration::from_secs(20),
    }
}

/// One end: its tunnel and what the harness, playing the reactor, holds for it.
#[derive(Default)]
pub(super) struct Node {
    pub t: Option<Tunnel>,
    armed: Vec<(FlowKey, RawFd, Interest)>,
    timers: Vec<(FlowKey, Instant, TimerKind)>,
    queued: bool,
    streams: HashMap<FlowKey, StreamId>,
    pub ended: Vec<EndedStream>,
    pub closed: Option<bool>,
    pub established: bool,
    /// Client: the record budget was reached (Action::Retire).
    pub retiring: bool,
    /// Client: the peer sent GOAWAY.
    pub goaway: bool,
}

impl Node {
    pub fn tunnel(&self) -> &Tunnel {
        self.t.as_ref().expect("tunnel still open")
    }
}

/// What the server side does with each CONNECT.
pub(super) type OnAccept = Box<dyn FnMut(StreamId, TcpStream)>;

pub(super) struct Harness {
    pub env: TunnelEnv,
    pub pipes: PipePool,
    pub metrics: HboneMetrics,
    pub client: Node,
    pub server: Node,
    next_key: u32,
    /// Server CONNECTs are accepted this long after they arrive (payload may come first).
    pub accept_after: Duration,
    pending_accepts: VecDeque<(Instant, StreamId)>,
    pub on_accept: OnAccept,
    /// Client: close the tunnel once it retired and its streams are done (the pool's job).
    pub close_retired: bool,
    pub iterations: u64,
    /// `Readiness::Edge`: the epoll set every socket is registered in.
    edge: Option<crate::sys::epoll::Epoll>,
    /// `Tls::Rustls`: the CA both tunnels' certificates come from.
    pub pki: Option<Pki>,
}

impl Harness {
    /// Two tunnels on the two ends of `(client_sock, server_sock)`.
    pub fn new(
        tls: Tls,
        readiness: Readiness,
        env: TunnelEnv,
        pipes: PipePool,
        socks: (TcpStream, TcpStream),
    ) -> Self {
        let (cs, ss) = socks;
        cs.set_nonblocking(true).unwrap();
        ss.set_nonblocking(true).unwrap();
        let _ = crate::data_plane::socket::set_nodelay(cs.as_raw_fd());
        let _ = crate::data_plane::socket::set_nodelay(ss.as_raw_fd());
        let peer: SocketAddr = "127.0.0.1:15008".parse().unwrap();
        let client_role = Role::Client {
            pool_id: TunnelId(1),
            peer,
            expected: id(SERVER),
            source: WorkloadId(0),
        };
        let server_role = Role::Server {
            workload: WorkloadId(1),
            local: peer,
            peer: "127.0.0.1:40000".parse().unwrap(),
            netns: None,
            deliver_client: false,
        };
        let mut h = Harness {
            env: TunnelEnv {
                zero_copy: matches!(tls, Tls::Plain { zero_copy: true }),
                ..env
            },
            pipes,
            metrics: HboneMetrics::default(),
            client: Node::default(),
            server: Node::default(),
            next_key: 1,
            accept_after: Duration::ZERO,
            pending_accepts: VecDeque::new(),
            on_accept: Box::new(|_, sock| {
                std::thread::spawn(move || echo(sock));
            }),
            close_retired: true,
            iterations: 0,
            edge: (readiness == Readiness::Edge)
                .then(|| crate::sys::epoll::Epoll::new().expect("epoll")),
            pki: None,
        };
        let ckey = FlowKey {
            index: 1 << 30,
            generation: 1,
        };
        let skey = FlowKey {
            index: 1 << 30 | 1,
            generation: 1,
        };
        let now = Instant::now();
        let (env, pipes, metrics) = (&h.env, &mut h.pipes, &h.metrics);
        let mut ctx = Ctx {
            env,
            pipes,
            metrics,
            now,
        };
        match tls {
            Tls::Plain { .. } => {
                let mut c = Tunnel::open_plaintext(ckey, OwnedFd::from(cs), client_role, &mut ctx);
                c.run(&mut ctx);
                h.client.t = Some(c);
                let mut s = Tunnel::open_plaintext(skey, OwnedFd::from(ss), server_role, &mut ctx);
                s.run(&mut ctx);
                h.server.t = Some(s);
                h.client.established = true;
                h.server.established = true;
            }
            Tls::Rustls => {
                let pki = Pki::new("cluster.local");
                let (cc, sc) = configs(&pki, &pki.creds(CLIENT), &pki.creds(SERVER), SERVER);
                let conn = rustls::client::UnbufferedClientConnection::new(
                    cc,
                    crate::tls::server_name(peer.ip()),
                )
                .unwrap();
                let mut c = Tunnel::client(ckey, OwnedFd::from(cs), client_role, conn, &mut ctx);
                // The socket is connected already.
                c.connected(Ok(()), &mut ctx);
                h.client.t = Some(c);
                let conn = rustls::server::UnbufferedServerConnection::new(sc).unwrap();
                let mut s = Tunnel::server(skey, OwnedFd::from(ss), server_role, conn, &mut ctx);
                s.run(&mut ctx);
                h.server.t = Some(s);
                h.pki = Some(pki);
            }
        }
        for server in [false, true] {
            let key = if server { skey } else { ckey };
            let fd = h.node(server).tunnel().raw();
            h.watch(server, key, fd);
        }
        h.apply();
        h
    }

    /// Edge mode: registers `fd` once for both directions, as the epoll driver does.
    fn watch(&mut self, server: bool, key: FlowKey, fd: RawFd) {
        if let Some(ep) = &self.edge {
            let events = (libc::EPOLLIN | libc::EPOLLOUT | libc::EPOLLRDHUP | libc::EPOLLET) as u32;
            let data = (u64::from(server) << 63)
                | (u64::from(key.index) << 32)
                | u64::from(key.generation);
            ep.add(fd, events, data).expect("epoll add");
        }
    }

    /// Only a server tunnel (Plain), on `sock`: the test drives the client side itself.
    pub fn server_only(tls: Tls, env: TunnelEnv, sock: TcpStream) -> Self {
        let (spare, _peer) = tcp_pair();
        let mut h = Harness::new(
            tls,
            Readiness::Level,
            env,
            PipePool::new(256 << 10, 16, 64),
            (spare, sock),
        );
        h.client.t = None;
        h.client.armed.clear();
        h.client.timers.clear();
        h.client.queued = false;
        h
    }

    /// Two tunnels joined directly over a loopback pair.
    pub fn pair(tls: Tls, readiness: Readiness, env: TunnelEnv) -> Self {
        Harness::new(
            tls,
            readiness,
            env,
            PipePool::new(256 << 10, 16, 64),
            tcp_pair(),
        )
    }

    fn node(&mut self, server: bool) -> &mut Node {
        if server {
            &mut self.server
        } else {
            &mut self.client
        }
    }

    /// Calls `f` on one end's tunnel with a context, then plays the reactor for its actions.
    pub fn call<R>(
        &mut self,
        server: bool,
        f: impl FnOnce(&mut Tunnel, &mut Ctx<'_>) -> R,
    ) -> Option<R> {
        let now = Instant::now();
        let (env, pipes, metrics) = (&self.env, &mut self.pipes, &self.metrics);
        let node = if server {
            &mut self.server
        } else {
            &mut self.client
        };
        let t = node.t.as_mut()?;
        let mut ctx = Ctx {
            env,
            pipes,
            metrics,
            now,
        };
        let r = f(t, &mut ctx);
        self.apply();
        Some(r)
    }

    /// Waits for the client tunnel to be ready for streams.
    pub fn wait_established(&mut self) {
        let start = Instant::now();
        while !(self.client.established && self.server.established) {
            assert!(start.elapsed() < DEADLINE, "handshake stuck");
            self.step();
        }
    }

    /// Opens a stream from the client tunnel; returns the application's end of it.
    pub fn open(&mut self) -> TcpStream {
        let (app, local) = tcp_pair();
        local.set_nonblocking(true).unwrap();
        let key = self.next_stream_key();
        self.watch(false, key, local.as_raw_fd());
        let setup = StreamSetup {
            key,
            local: OwnedFd::from(local),
            started: Instant::now(),
            counters: Arc::new(TcpCounters::default()),
            record: FlowRecord::new(0, "outbound"),
            owner: Arc::from("default/client"),
            admission: None,
        };
        let request = ConnectRequest::new("10.0.0.2:8080".parse().unwrap());
        let id = self
            .call(false, |t, ctx| t.open_stream(setup, &request, ctx))
            .expect("client tunnel")
            .unwrap_or_else(|e| panic!("open_stream: {}", e.why));
        self.client.streams.insert(key, id);
        app
    }

    fn next_stream_key(&mut self) -> FlowKey {
        self.next_key += 1;
        FlowKey {
            index: self.next_key,
            generation: 1,
        }
    }

    /// Plays the reactor for every action both tunnels queued.
    fn apply(&mut self) {
        let edge = self.edge.is_some();
        for server in [false, true] {
            while let Some(action) = self.node(server).t.as_mut().and_then(Tunnel::poll_action) {
                if let Action::Request { id, .. } = action {
                    let due = Instant::now() + self.accept_after;
                    self.pending_accepts.push_back((due, id));
                    continue;
                }
                let node = self.node(server);
                match action {
                    // Edge mode: arming does nothing, as with epoll.
                    Action::Arm { .. } if edge => {}
                    Action::Arm {
                        key, fd, interest, ..
                    } => {
                        if !node
                            .armed
                            .iter()
                            .any(|(k, _, i)| *k == key && *i == interest)
                        {
                            node.armed.push((key, fd, interest));
                        }
                    }
                    Action::Timer { key, at, kind } => node.timers.push((key, at, kind)),
                    Action::Queue => node.queued = true,
                    Action::Established => node.established = true,
                    Action::Request { .. } => unreachable!("handled above"),
                    // The reactor records these; the session already answered.
                    Action::RequestRefused { .. } => {}
                    Action::StreamEnded(mut e) => {
                        node.streams.remove(&e.key);
                        node.armed.retain(|(k, _, _)| *k != e.key);
                        e.close_local();
                        node.ended.push(*e);
                    }
                    Action::GoAway => node.goaway = true,
                    Action::Retire => node.retiring = true,
                    Action::Closing => {}
                    Action::Closed { reset, .. } => {
                        node.closed = Some(reset);
                        node.armed.clear();
                        node.timers.clear();
                        node.streams.clear();
                        if let Some(t) = node.t.take() {
                            let fd = t.into_fd();
                            if reset {
                                crate::data_plane::socket::close_with_reset(fd);
                            }
                        }
                    }
                }
            }
        }
    }

    /// Where an event for `key` goes: the tunnel itself (`None`) or one of its streams.
    fn route(&self, server: bool, key: FlowKey) -> Option<Option<StreamId>> {
        let node = if server { &self.server } else { &self.client };
        let t = node.t.as_ref()?;
        if key == t.key() {
            return Some(None);
        }
        node.streams.get(&key).map(|id| Some(*id))
    }

    /// Accepts the server CONNECTs that are due: each gets a connected local socket, whose
    /// other end goes to `on_accept`.
    fn accept_due(&mut self) {
        let now = Instant::now();
        while self
            .pending_accepts
            .front()
            .is_some_and(|(due, _)| *due <= now)
        {
            let (_, id) = self.pending_accepts.pop_front().expect("checked");
            let (dst, app) = tcp_pair();
            dst.set_nonblocking(true).unwrap();
            let key = self.next_stream_key();
            self.watch(true, key, dst.as_raw_fd());
            let setup = StreamSetup {
                key,
                local: OwnedFd::from(dst),
                started: now,
                counters: Arc::new(TcpCounters::default()),
                record: FlowRecord::new(0, "inbound_hbone"),
                owner: Arc::from("default/server"),
                admission: None,
            };
            let accepted = self.call(true, |t, _| t.accept_stream(id, setup));
            if accepted != Some(true) {
                continue;
            }
            self.server.streams.insert(key, id);
            (self.on_accept)(id, app);
            self.call(true, |t, ctx| t.stream_connected(id, Ok(()), ctx));
        }
    }

    /// One turn of the loop: due accepts, readiness (poll, up to 10 ms), queued tunnels, timers.
    pub fn step(&mut self) {
        self.iterations += 1;
        self.accept_due();
        for server in [false, true] {
            let node = self.node(server);
            if node.retiring && node.t.as_ref().is_some_and(|t| t.stream_count() == 0) {
                node.retiring = false;
                if self.close_retired {
                    self.call(server, |t, ctx| t.close(TunnelClose::Drained, ctx));
                }
            }
        }
        let busy = self.client.queued || self.server.queued;
        let fired = match &self.edge {
            Some(ep) => edge_events(ep, if busy { 0 } else { 10 }),
            None => self.level_events(busy),
        };
        for (server, key, interest) in fired {
            match self.route(server, key) {
                Some(None) => self.call(server, |t, ctx| t.ready(interest, ctx)),
                Some(Some(id)) => self.call(server, |t, ctx| t.stream_ready(id, interest, ctx)),
                None => None,
            };
        }
        for server in [false, true] {
            let node = self.node(server);
            if std::mem::take(&mut node.queued) {
                self.call(server, |t, ctx| t.run(ctx));
            }
        }
        self.fire_timers();
    }

    /// Level mode: polls the armed requests (up to 10 ms); each one that fired is gone.
    fn level_events(&mut self, busy: bool) -> Vec<(bool, FlowKey, Interest)> {
        let mut fds: Vec<libc::pollfd> = Vec::new();
        let mut owners = Vec::new();
        for server in [false, true] {
            for (i, (_, fd, interest)) in self.node(server).armed.iter().enumerate() {
                fds.push(libc::pollfd {
                    fd: *fd,
                    events: match interest {
                        Interest::Read => libc::POLLIN | libc::POLLRDHUP,
                        Interest::Write => libc::POLLOUT,
                    },
                    revents: 0,
                });
                owners.push((server, i));
            }
        }
        let wait = if busy { 0 } else { 10 };
        crate::sys::socket::poll(&mut fds, wait).expect("poll");
        let mut fired: Vec<(bool, FlowKey, Interest)> = Vec::new();
        let mut gone: Vec<(bool, usize)> = Vec::new();
        for (pfd, (server, i)) in fds.iter().zip(owners) {
            if pfd.revents != 0 {
                let (key, _, interest) = self.node(server).armed[i];
                fired.push((server, key, interest));
                gone.push((server, i));
            }
        }
        // One-shot: a fired request is gone (remove from the back so indices stay valid).
        gone.sort_by_key(|g| std::cmp::Reverse(g.1));
        for (server, i) in gone {
            self.node(server).armed.remove(i);
        }
        fired
    }

    fn fire_timers(&mut self) {
        let now = Instant::now();
        for server in [false, true] {
            let node = self.node(server);
            let (due, later): (Vec<_>, Vec<_>) =
                node.timers.drain(..).partition(|(_, at, _)| *at <= now);
            node.timers = later;
            for (key, at, kind) in due {
                match self.route(server, key) {
                    Some(None) => self.call(server, |t, ctx| t.timer(kind, at, ctx)),
                    Some(Some(id)) => self.call(server, |t, ctx| t.stream_timer(id, kind, ctx)),
                    None => None,
                };
            }
        }
    }

    /// Steps until `done` holds (or the deadline: then the tunnels' state is printed).
    pub fn run_until(&mut self, mut done: impl FnMut(&Harness) -> bool) {
        let start = Instant::now();
        while !done(self) {
            if start.elapsed() > DEADLINE {
                for (name, node) in [("client", &self.client), ("server", &self.server)] {
                    if let Some(t) = node.t.as_ref() {
                        eprintln!("{name}: {}", t.describe_io());
                    }
                }
                panic!("stuck after {} iterations", self.iterations);
            }
            self.step();
        }
    }
}

/// Edge mode: what the epoll set reports (up to `wait_ms`), as (side, key, interest) events.
fn edge_events(ep: &crate::sys::epoll::Epoll, wait_ms: i32) -> Vec<(bool, FlowKey, Interest)> {
    let mut ready = [crate::sys::epoll::EpollEvent { events: 0, u64: 0 }; 64];
    let n = ep.wait(&mut ready, wait_ms).expect("epoll wait");
    let mut out = Vec::new();
    for ev in &ready[..n] {
        let data = ev.u64;
        let server = data >> 63 == 1;
        let key = FlowKey {
            index: ((data >> 32) & 0x7fff_ffff) as u32,
            generation: data as u32,
        };
        let read = (libc::EPOLLIN | libc::EPOLLRDHUP | libc::EPOLLHUP | libc::EPOLLERR) as u32;
        let write = (libc::EPOLLOUT | libc::EPOLLHUP | libc::EPOLLERR) as u32;
        if ev.events & read != 0 {
            out.push((server, key, Interest::Read));
        }
        if ev.events & write != 0 {
            out.push((server, key, Interest::Write));
        }
    }
    out
}

/// A server application: reads its stream to EOF, then sends back what it read, then closes.
pub(super) fn echo(mut sock: TcpStream) {
    let mut got = Vec::new();
    if sock.read_to_end(&mut got).is_ok() {
        let _ = sock.write_all(&got);
    }
}

/// Deterministic bytes for a test stream.
pub(super) fn data(len: usize, seed: u64) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

pub(super) fn sha(bytes: &[u8]) -> [u8; 32] {
    Sha256::digest(bytes).into()
}

/// A client application: writes `payload` (then FIN), reads to EOF; returns what it read.
pub(super) fn client_app(
    mut sock: TcpStream,
    payload: Vec<u8>,
) -> JoinHandle<std::io::Result<Vec<u8>>> {
    std::thread::spawn(move || {
        let mut reader = sock.try_clone()?;
        let read = std::thread::spawn(move || {
            let mut got = Vec::new();
            reader.read_to_end(&mut got).map(|_| got)
        });
        for chunk in payload.chunks(100_000) {
            sock.write_all(chunk)?;
        }
        sock.shutdown(Shutdown::Write)?;
        read.join().expect("reader")
    })
}
