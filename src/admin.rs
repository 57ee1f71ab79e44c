//! The admin, metrics and readiness endpoints: a deliberately small HTTP/1.1 server (GET only,
//! one request per connection, bounded request size and time) on its own threads, never on a
//! reactor. Routes:
//!
//! - metrics (default 0.0.0.0:15020): `GET /metrics`, `GET /stats/prometheus`
//! - readiness (default 0.0.0.0:15021): `GET /healthz/ready` — 200 once every reactor runs,
//!   503 before that and while draining
//! - admin (default 127.0.0.1:15000): `GET /config_dump` (the effective config and runtime
//!   facts as JSON), `GET /metrics`, `GET /healthz/ready`

use std::io::{self, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicBool, Ordering::SeqCst};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

use crate::observability::metrics::Metrics;
use crate::sys;

/// Requests larger than this are refused: nothing we serve needs more.
const MAX_REQUEST: usize = 8192;
const IO_TIMEOUT: Duration = Duration::from_secs(5);

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Endpoint {
    Admin,
    Metrics,
    Readiness,
}

pub struct AdminState {
    pub metrics: Arc<Metrics>,
    pub ready: AtomicBool,
    pub draining: AtomicBool,
    /// `/config_dump`'s body, made per request (it follows reloads).
    pub config_dump: Box<dyn Fn() -> String + Send + Sync>,
    pub stop: AtomicBool,
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
        .name(format!("{endpoint:?}-http").to_lowercase())
        .spawn(move || {
            while !state.stop.load(SeqCst) {
                // Sleep in poll(2) until a client comes (or a second passes, to notice `stop`),
                // so an idle node's endpoint threads cost nothing.
                let _ = sys::socket::wait_readable(listener.as_raw_fd(), Duration::from_secs(1));
                match listener.accept() {
                    Ok((stream, _)) => {
                        if let Err(e) = handle(stream, endpoint, &state) {
                            log::debug!("{endpoint:?} request failed: {e}");
                        }
                    }
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                    Err(e) => {
                        log::warn!("{endpoint:?} accept failed: {e}");
                        std::thread::sleep(Duration::from_millis(100));
                    }
                }
            }
        })?;
    Ok(Server { addr, handle })
}

fn handle(mut stream: TcpStream, endpoint: Endpoint, state: &AdminState) -> io::Result<()> {
    stream.set_nonblocking(false)?;
    stream.set_read_timeout(Some(IO_TIMEOUT))?;
    stream.set_write_timeout(Some(IO_TIMEOUT))?;
    let mut buf = Vec::with_capacity(1024);
    let mut chunk = [0u8; 1024];
    while !buf.windows(4).any(|w| w == b"\r\n\r\n") {
        let n = stream.read(&mut chunk)?;
        if n == 0 {
            return Ok(());
        }
        buf.extend_from_slice(&chunk[..n]);
        if buf.len() > MAX_REQUEST {
            return respond(&mut stream, 431, "text/plain", "request header too large\n");
        }
    }
    let line = String::from_utf8_lossy(&buf);
    let mut parts = line.lines().next().unwrap_or("").split_whitespace();
    let (method, path) = (parts.next().unwrap_or(""), parts.next().unwrap_or(""));
    if method != "GET" {
        return respond(&mut stream, 405, "text/plain", "only GET is served\n");
    }
    let path = path.split('?').next().unwrap_or("");
    match (endpoint, path) {
        (Endpoint::Metrics | Endpoint::Admin, "/metrics" | "/stats/prometheus") => respond(
            &mut stream,
            200,
            "text/plain; version=0.0.4",
            &state.metrics.render(),
        ),
        (Endpoint::Readiness | Endpoint::Admin, "/healthz/ready") => {
            if state.draining.load(SeqCst) {
                respond(&mut stream, 503, "text/plain", "draining\n")
            } else if state.ready.load(SeqCst) {
                respond(&mut stream, 200, "text/plain", "ready\n")
            } else {
                respond(&mut stream, 503, "text/plain", "starting\n")
            }
        }
        (Endpoint::Admin, "/config_dump") => {
            respond(&mut stream, 200, "application/json", &(state.config_dump)())
        }
        _ => respond(&mut stream, 404, "text/plain", "not found\n"),
    }
}

fn respond(stream: &mut TcpStream, code: u16, content_type: &str, body: &str) -> io::Result<()> {
    let reason = match code {
        200 => "OK",
        404 => "Not Found",
        405 => "Method Not Allowed",
        431 => "Request Header Fields Too Large",
        _ => "Service Unavailable",
    };
    let head = format!(
        "HTTP/1.1 {code} {reason}\r\nContent-Type: {content_type}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    );
    stream.write_all(head.as_bytes())?;
    stream.write_all(body.as_bytes())
}

/// A minimal client for the same endpoints (tests, the demo, `perf/`): returns status and body.
pub fn http_get(addr: SocketAddr, path: &str) -> io::Result<(u16, String)> {
    let mut s = TcpStream::connect_timeout(&addr, IO_TIMEOUT)?;
    s.set_read_timeout(Some(IO_TIMEOUT))?;
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
