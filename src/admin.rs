//! The admin, metrics and readiness endpoints: a deliberately small HTTP/1.1 server (GET only,
//! one request per connection) on its own threads, never on a reactor. Routes:
//!
//! - metrics (default 0.0.0.0:15020): `GET /metrics`, `GET /stats/prometheus`
//! - readiness (default 0.0.0.0:15021): `GET /healthz/ready` — 200 once every reactor runs
//!   (naming the workloads it could not serve, if any), 503 before that and while draining
//! - admin (default 127.0.0.1:15000): `GET /config_dump` (the effective config and runtime
//!   facts as JSON), `GET /certificates` (the local certificates in use, never a key),
//!   `GET /metrics`, `GET /healthz/ready`
//!
//! Readiness listens on every address, so any pod can reach it: no client may hold it. Each
//! endpoint's thread serves all its connections at once from one `poll(2)` loop (non-blocking
//! sockets), gives each connection [`REQUEST_DEADLINE`] from accept to its last response byte
//! — a client trickling its request one byte at a time is cut off there — and holds at most
//! [`MAX_CONNECTIONS`], of which [`MAX_PER_SOURCE`] from one client address. A new connection
//! over either cap displaces the oldest one of the address holding the most, so a flood from
//! one pod never locks out the kubelet's probe. Every connection cut or displaced is counted
//! (`ringtun_admin_connections_shed_total{endpoint,reason}`).

use std::collections::HashMap;
use std::io::{self, Read, Write};
use std::net::{IpAddr, SocketAddr, TcpListener, TcpStream};
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::Relaxed, Ordering::SeqCst};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crate::observability::metrics::Metrics;
use crate::sys;

/// Requests larger than this are refused: nothing we serve needs more.
const MAX_REQUEST: usize = 8192;
/// From accept to the last byte of the answer. A probe is answered in microseconds; the
/// kubelet's own probe timeout is 1 s by default.
pub const REQUEST_DEADLINE: Duration = Duration::from_secs(2);
/// Connections one endpoint holds at once.
pub const MAX_CONNECTIONS: usize = 64;
/// Connections one client address holds at once on one endpoint.
pub const MAX_PER_SOURCE: usize = 8;
/// The client's own timeouts ([`http_get`]).
const CLIENT_TIMEOUT: Duration = Duration::from_secs(5);

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Endpoint {
    Admin,
    Metrics,
    Readiness,
}

impl Endpoint {
    fn label(self) -> &'static str {
        match self {
            Endpoint::Admin => "admin",
            Endpoint::Metrics => "metrics",
            Endpoint::Readiness => "readiness",
        }
    }

    fn index(self) -> usize {
        self as usize
    }
}

/// Why a connection was let go before it was answered.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Shed {
    /// Its request was not complete within [`REQUEST_DEADLINE`] (or its answer not taken).
    Deadline,
    /// Its address already held [`MAX_PER_SOURCE`] connections.
    PerSource,
    /// The endpoint held [`MAX_CONNECTIONS`].
    Capacity,
}

impl Shed {
    const ALL: [Shed; 3] = [Shed::Deadline, Shed::PerSource, Shed::Capacity];

    fn label(self) -> &'static str {
        match self {
            Shed::Deadline => "deadline",
            Shed::PerSource => "per_source",
            Shed::Capacity => "capacity",
        }
    }
}

/// What the endpoints serve, shared with the node.
pub struct AdminState {
    pub metrics: Arc<Metrics>,
    pub ready: AtomicBool,
    pub draining: AtomicBool,
    /// `/config_dump`'s body, made per request (it follows reloads).
    pub config_dump: Box<dyn Fn() -> String + Send + Sync>,
    /// `/certificates`' body, made per request (it follows certificate reloads).
    pub certificates: Box<dyn Fn() -> String + Send + Sync>,
    pub stop: AtomicBool,
    /// Local workloads the node could not serve (pod mode: their listeners failed), with why;
    /// readiness names them.
    pub not_served: Mutex<Vec<String>>,
    /// Connections shed, by endpoint and [`Shed`] reason.
    shed: [[AtomicU64; 3]; 3],
}

impl AdminState {
    pub fn new(
        metrics: Arc<Metrics>,
        config_dump: Box<dyn Fn() -> String + Send + Sync>,
    ) -> AdminState {
        AdminState {
            metrics,
            ready: AtomicBool::new(false),
            draining: AtomicBool::new(false),
            config_dump,
            certificates: Box::new(|| r#"{"certificates":[]}"#.into()),
            stop: AtomicBool::new(false),
            not_served: Mutex::new(Vec::new()),
            shed: Default::default(),
        }
    }

    fn count_shed(&self, endpoint: Endpoint, why: Shed) {
        self.shed[endpoint.index()][why as usize].fetch_add(1, Relaxed);
    }

    /// The node's metrics and the endpoints' own.
    fn render_metrics(&self) -> String {
        let mut out = self.metrics.render();
        out.push_str(
            "# HELP ringtun_admin_connections_shed_total Admin, metrics and readiness \
             connections closed unanswered: deadline (request not complete in time), \
             per_source and capacity (displaced by a newer one over the caps).\n\
             # TYPE ringtun_admin_connections_shed_total counter\n",
        );
        for endpoint in [Endpoint::Admin, Endpoint::Metrics, Endpoint::Readiness] {
            for why in Shed::ALL {
                let n = self.shed[endpoint.index()][why as usize].load(Relaxed);
                out.push_str(&format!(
                    "ringtun_admin_connections_shed_total{{endpoint=\"{}\",reason=\"{}\"}} {n}\n",
                    endpoint.label(),
                    why.label()
                ));
            }
        }
        out
    }

    /// The readiness answer: status and body.
    fn readiness(&self) -> (u16, String) {
        if self.draining.load(SeqCst) {
            return (503, "draining\n".into());
        }
        if !self.ready.load(SeqCst) {
            return (503, "starting\n".into());
        }
        let not_served = self.not_served.lock().unwrap_or_else(|p| p.into_inner());
        if not_served.is_empty() {
            (200, "ready\n".into())
        } else {
            let mut body = format!("ready; {} workload(s) not served:\n", not_served.len());
            for w in not_served.iter() {
                body.push_str(&format!("  {w}\n"));
            }
            (200, body)
        }
    }
}

pub struct Server {
    pub addr: SocketAddr,
    handle: JoinHandle<()>,
}

impl Server {
    pub fn join(self) {
        let _ = self.handle.join();
    }
}

/// Binds now (so a port conflict fails start-up with a clear error) and serves on a thread.
pub fn serve(endpoint: Endpoint, addr: SocketAddr, state: Arc<AdminState>) -> io::Result<Server> {
    let listener = TcpListener::bind(addr)
        .map_err(|e| io::Error::new(e.kind(), format!("{endpoint:?} endpoint {addr}: {e}")))?;
    let addr = listener.local_addr()?;
    listener.set_nonblocking(true)?;
    let handle = std::thread::Builder::new()
        .name(format!("{}-http", endpoint.label()))
        .spawn(move || ServerLoop::new(endpoint, listener, state).run())?;
    Ok(Server { addr, handle })
}

/// One client connection: reading its request, then writing its answer.
struct Conn {
    stream: TcpStream,
    peer: IpAddr,
    accepted: Instant,
    request: Vec<u8>,
    /// The answer, once the request is complete, and how much of it is written.
    answer: Option<(Vec<u8>, usize)>,
}

/// What happened to a connection after it was ready.
enum Progress {
    Pending,
    Done,
}

struct ServerLoop {
    endpoint: Endpoint,
    listener: TcpListener,
    state: Arc<AdminState>,
    conns: Vec<Conn>,
}

impl ServerLoop {
    fn new(endpoint: Endpoint, listener: TcpListener, state: Arc<AdminState>) -> Self {
        ServerLoop {
            endpoint,
            listener,
            state,
            conns: Vec::new(),
        }
    }

    fn run(mut self) {
        let mut fds: Vec<libc::pollfd> = Vec::new();
        while !self.state.stop.load(SeqCst) {
            let now = Instant::now();
            self.expire(now);
            fds.clear();
            fds.push(pollfd(self.listener.as_raw_fd(), libc::POLLIN));
            for c in &self.conns {
                let events = if c.answer.is_some() {
                    libc::POLLOUT
                } else {
                    libc::POLLIN
                };
                fds.push(pollfd(c.stream.as_raw_fd(), events));
            }
            // Wake for the next deadline, or after a second to notice `stop`: an idle node's
            // endpoint threads cost nothing.
            let wait = self
                .conns
                .iter()
                .map(|c| (c.accepted + REQUEST_DEADLINE).saturating_duration_since(now))
                .min()
                .unwrap_or(Duration::from_secs(1))
                .min(Duration::from_secs(1));
            let ms = wait.as_millis().max(1) as i32;
            if let Err(e) = sys::socket::poll(&mut fds, ms) {
                if e.kind() != io::ErrorKind::Interrupted {
                    log::warn!("{} endpoint: poll failed: {e}", self.endpoint.label());
                    std::thread::sleep(Duration::from_millis(100));
                }
                continue;
            }
            // Connections first (by index, from the back, so removal keeps the indexes of
            // those not yet visited), then the listener: accepting may displace a connection.
            for i in (0..self.conns.len()).rev() {
                let revents = fds[i + 1].revents;
                if revents == 0 {
                    continue;
                }
                match self.progress(i) {
                    Progress::Pending => {}
                    Progress::Done => {
                        self.conns.swap_remove(i);
                    }
                }
            }
            if fds[0].revents != 0 {
                self.accept_all(Instant::now());
            }
        }
    }

    fn accept_all(&mut self, now: Instant) {
        loop {
            match self.listener.accept() {
                Ok((stream, peer)) => {
                    if stream.set_nonblocking(true).is_err() {
                        continue;
                    }
                    self.admit(peer.ip(), now);
                    self.conns.push(Conn {
                        stream,
                        peer: peer.ip(),
                        accepted: now,
                        request: Vec::new(),
                        answer: None,
                    });
                    // Most requests are already there: answer without another poll round.
                    let last = self.conns.len() - 1;
                    if let Progress::Done = self.progress(last) {
                        self.conns.swap_remove(last);
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => {
                    crate::log_limited!(
                        log::Level::Warn,
                        "admin-accept",
                        "{} endpoint: accept failed: {e}",
                        self.endpoint.label()
                    );
                    return;
                }
            }
        }
    }

    /// Makes room for one more connection from `peer`: over the per-source cap its own oldest
    /// goes, over the total cap the oldest of the address holding the most.
    fn admit(&mut self, peer: IpAddr, _now: Instant) {
        let from_peer = self.conns.iter().filter(|c| c.peer == peer).count();
        if from_peer >= MAX_PER_SOURCE {
            self.shed_oldest_of(peer, Shed::PerSource);
        } else if self.conns.len() >= MAX_CONNECTIONS {
            let mut counts: HashMap<IpAddr, usize> = HashMap::new();
            for c in &self.conns {
                *counts.entry(c.peer).or_default() += 1;
            }
            if let Some((&busiest, _)) = counts.iter().max_by_key(|(_, n)| **n) {
                self.shed_oldest_of(busiest, Shed::Capacity);
            }
        }
    }

    fn shed_oldest_of(&mut self, peer: IpAddr, why: Shed) {
        let oldest = self
            .conns
            .iter()
            .enumerate()
            .filter(|(_, c)| c.peer == peer)
            .min_by_key(|(_, c)| c.accepted)
            .map(|(i, _)| i);
        if let Some(i) = oldest {
            self.shed(i, why);
        }
    }

    fn shed(&mut self, i: usize, why: Shed) {
        let c = self.conns.swap_remove(i);
        self.state.count_shed(self.endpoint, why);
        let key = match why {
            Shed::Deadline => "admin-shed-deadline",
            Shed::PerSource => "admin-shed-per-source",
            Shed::Capacity => "admin-shed-capacity",
        };
        crate::log_limited!(
            log::Level::Warn,
            key,
            "{} endpoint: connection from {} closed unanswered ({})",
            self.endpoint.label(),
            c.peer,
            why.label()
        );
        let _ = sys::socket::set_linger_zero(c.stream.as_raw_fd());
    }

    fn expire(&mut self, now: Instant) {
        for i in (0..self.conns.len()).rev() {
            if now >= self.conns[i].accepted + REQUEST_DEADLINE {
                self.shed(i, Shed::Deadline);
            }
        }
    }

    /// Reads what the connection has, answers once its request is complete, writes what the
    /// socket takes.
    fn progress(&mut self, i: usize) -> Progress {
        let endpoint = self.endpoint;
        let state = self.state.clone();
        let c = &mut self.conns[i];
        if c.answer.is_none() {
            let mut chunk = [0u8; 1024];
            loop {
                match c.stream.read(&mut chunk) {
                    Ok(0) => return Progress::Done,
                    Ok(n) => {
                        c.request.extend_from_slice(&chunk[..n]);
                        if let Some(answer) = answer_for(&c.request, endpoint, &state) {
                            c.answer = Some((answer, 0));
                            break;
                        }
                    }
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Progress::Pending,
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                    Err(_) => return Progress::Done,
                }
            }
        }
        let Some((answer, written)) = c.answer.as_mut() else {
            return Progress::Pending;
        };
        while *written < answer.len() {
            match c.stream.write(&answer[*written..]) {
                Ok(n) => *written += n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Progress::Pending,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(_) => return Progress::Done,
            }
        }
        Progress::Done
    }
}

fn pollfd(fd: i32, events: i16) -> libc::pollfd {
    libc::pollfd {
        fd,
        events,
        revents: 0,
    }
}

/// The whole answer to `request` once it is complete (or too large); `None` while its header
/// is still arriving.
fn answer_for(request: &[u8], endpoint: Endpoint, state: &AdminState) -> Option<Vec<u8>> {
    if !request.windows(4).any(|w| w == b"\r\n\r\n") {
        if request.len() > MAX_REQUEST {
            return Some(response(431, "text/plain", "request header too large\n"));
        }
        return None;
    }
    let line = String::from_utf8_lossy(request);
    let mut parts = line.lines().next().unwrap_or("").split_whitespace();
    let (method, path) = (parts.next().unwrap_or(""), parts.next().unwrap_or(""));
    if method != "GET" {
        return Some(response(405, "text/plain", "only GET is served\n"));
    }
    let path = path.split('?').next().unwrap_or("");
    Some(match (endpoint, path) {
        (Endpoint::Metrics | Endpoint::Admin, "/metrics" | "/stats/prometheus") => {
            response(200, "text/plain; version=0.0.4", &state.render_metrics())
        }
        (Endpoint::Readiness | Endpoint::Admin, "/healthz/ready") => {
            let (code, body) = state.readiness();
            response(code, "text/plain", &body)
        }
        (Endpoint::Admin, "/config_dump") => {
            response(200, "application/json", &(state.config_dump)())
        }
        (Endpoint::Admin, "/certificates") => {
            response(200, "application/json", &(state.certificates)())
        }
        _ => response(404, "text/plain", "not found\n"),
    })
}

fn response(code: u16, content_type: &str, body: &str) -> Vec<u8> {
    let reason = match code {
        200 => "OK",
        404 => "Not Found",
        405 => "Method Not Allowed",
        431 => "Request Header Fields Too Large",
        _ => "Service Unavailable",
    };
    let mut out = format!(
        "HTTP/1.1 {code} {reason}\r\nContent-Type: {content_type}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    )
    .into_bytes();
    out.extend_from_slice(body.as_bytes());
    out
}

/// A minimal client for the same endpoints (tests, the demo, `perf/`): returns status and body.
pub fn http_get(addr: SocketAddr, path: &str) -> io::Result<(u16, String)> {
    let mut s = TcpStream::connect_timeout(&addr, CLIENT_TIMEOUT)?;
    s.set_read_timeout(Some(CLIENT_TIMEOUT))?;
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n"
    )?;
    let mut out = String::new();
    s.read_to_string(&mut out)?;
    let code = out
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    let body = out
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_string())
        .unwrap_or_default();
    Ok((code, body))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::observability::metrics::ProcessFacts;

    fn server(endpoint: Endpoint) -> (Server, Arc<AdminState>) {
        let metrics = Arc::new(Metrics::new(
            1,
            ProcessFacts {
                open_files_soft: 1024,
                open_files_hard: 1024,
                max_flows_per_reactor: 10,
                pipes_per_reactor: 4,
            },
        ));
        let state = Arc::new(AdminState::new(metrics, Box::new(|| "{}".into())));
        state.ready.store(true, SeqCst);
        let s = serve(endpoint, "127.0.0.1:0".parse().unwrap(), state.clone()).unwrap();
        (s, state)
    }

    fn timed_get(addr: SocketAddr, path: &str) -> (u16, String, Duration) {
        let start = Instant::now();
        let (code, body) = http_get(addr, path).expect("answered");
        (code, body, start.elapsed())
    }

    fn shed(state: &AdminState, endpoint: Endpoint, why: Shed) -> u64 {
        state.shed[endpoint.index()][why as usize].load(Relaxed)
    }

    #[test]
    fn idle_connections_do_not_delay_the_probe() {
        let (s, state) = server(Endpoint::Readiness);
        // Four idle connections used to cost a probe 15 s (one at a time, 5 s read timeout).
        let idle: Vec<TcpStream> = (0..4)
            .map(|_| TcpStream::connect(s.addr).unwrap())
            .collect();
        std::thread::sleep(Duration::from_millis(100));
        let (code, body, took) = timed_get(s.addr, "/healthz/ready");
        assert_eq!((code, body.as_str()), (200, "ready\n"));
        assert!(took < Duration::from_millis(500), "probe took {took:?}");
        drop(idle);
        state.stop.store(true, SeqCst);
        s.join();
    }

    #[test]
    fn a_trickling_client_is_cut_at_the_deadline() {
        let (s, state) = server(Endpoint::Readiness);
        let mut slow = TcpStream::connect(s.addr).unwrap();
        let start = Instant::now();
        let mut cut_after = None;
        // One byte every 300 ms, for longer than the deadline allows.
        for b in b"GET /healthz/ready HTTP/1.1\r\nHost: x\r\n" {
            if slow.write_all(&[*b]).is_err() {
                cut_after = Some(start.elapsed());
                break;
            }
            std::thread::sleep(Duration::from_millis(300));
        }
        let cut_after = cut_after.expect("the trickling client was never cut off");
        assert!(
            cut_after >= REQUEST_DEADLINE && cut_after < REQUEST_DEADLINE + Duration::from_secs(2),
            "cut after {cut_after:?}"
        );
        assert_eq!(shed(&state, Endpoint::Readiness, Shed::Deadline), 1);
        let (code, _, took) = timed_get(s.addr, "/healthz/ready");
        assert_eq!(code, 200);
        assert!(took < Duration::from_millis(500), "probe took {took:?}");
        state.stop.store(true, SeqCst);
        s.join();
    }

    #[test]
    fn a_flood_from_one_address_never_locks_others_out() {
        let (s, state) = server(Endpoint::Readiness);
        // 200 idle connections from 127.0.0.1; the probe comes from 127.0.0.2.
        let flood: Vec<TcpStream> = (0..200)
            .map(|_| TcpStream::connect(s.addr).unwrap())
            .collect();
        std::thread::sleep(Duration::from_millis(200));
        // The listener is on 127.0.0.1: the probe comes from another address of loopback.
        let mut c = bound_client([127, 0, 0, 2], s.addr);
        let start = Instant::now();
        c.write_all(b"GET /healthz/ready HTTP/1.1\r\nHost: x\r\n\r\n")
            .unwrap();
        let mut answer = String::new();
        c.read_to_string(&mut answer).unwrap();
        assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
        assert!(start.elapsed() < Duration::from_millis(500));
        let per_source = shed(&state, Endpoint::Readiness, Shed::PerSource);
        assert!(
            per_source >= 200 - MAX_PER_SOURCE as u64,
            "{per_source} shed per source"
        );
        drop(flood);
        state.stop.store(true, SeqCst);
        s.join();
    }

    #[test]
    fn capacity_is_shared_fairly_between_addresses() {
        let (s, state) = server(Endpoint::Metrics);
        // MAX_PER_SOURCE connections from each of many addresses: past the total cap the
        // busiest address loses its oldest, and a newcomer is still answered.
        let mut held = Vec::new();
        for host in 1..=(MAX_CONNECTIONS / MAX_PER_SOURCE + 2) as u8 {
            for _ in 0..MAX_PER_SOURCE {
                held.push(bound_client([127, 0, 1, host], s.addr));
            }
        }
        std::thread::sleep(Duration::from_millis(200));
        assert!(shed(&state, Endpoint::Metrics, Shed::Capacity) >= 2 * MAX_PER_SOURCE as u64);
        let mut c = bound_client([127, 0, 2, 1], s.addr);
        c.write_all(b"GET /metrics HTTP/1.1\r\n\r\n").unwrap();
        let mut answer = String::new();
        c.read_to_string(&mut answer).unwrap();
        assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
        assert!(answer.contains(
            "ringtun_admin_connections_shed_total{endpoint=\"metrics\",reason=\"capacity\"}"
        ));
        drop(held);
        state.stop.store(true, SeqCst);
        s.join();
    }

    #[test]
    fn readiness_names_workloads_not_served() {
        let (s, state) = server(Endpoint::Readiness);
        state
            .not_served
            .lock()
            .unwrap()
            .push("default/mesh-2: listener 0.0.0.0:15006: Operation not permitted".into());
        let (code, body, _) = timed_get(s.addr, "/healthz/ready");
        assert_eq!(code, 200);
        assert!(body.contains("1 workload(s) not served") && body.contains("default/mesh-2"));
        state.draining.store(true, SeqCst);
        assert_eq!(timed_get(s.addr, "/healthz/ready").0, 503);
        state.stop.store(true, SeqCst);
        s.join();
    }

    fn bound_client(src: [u8; 4], to: SocketAddr) -> TcpStream {
        let fd = sys::socket::tcp_socket(&to).unwrap();
        sys::socket::bind(fd.as_raw_fd(), SocketAddr::from((src, 0))).unwrap();
        let s = TcpStream::from(fd);
        s.set_nonblocking(false).unwrap();
        sys::socket::connect(s.as_raw_fd(), to).unwrap();
        s.set_read_timeout(Some(CLIENT_TIMEOUT)).unwrap();
        s
    }
}
