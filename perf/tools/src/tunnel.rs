//! The conventional HBONE tunnel, as Istio's ztunnel builds it: the `h2` crate over
//! tokio-rustls, every payload byte copied through user space (TCP read → buffer → TLS record
//! → socket, and back). This is the baseline ringtun's splice/kTLS tunnel is measured against.
//!
//! - Server: TLS 1.3 with client certificates, HTTP/2 with ztunnel's settings, one CONNECT per
//!   stream: TCP-connect to `:authority`, answer 200 (or 503), then copy both ways.
//! - Client: plain TCP in, one stream per connection on a pooled HTTP/2 connection to the peer
//!   (a new connection only when the pooled ones died or are at their stream limit).
//! - Ends (RFC 9113 §8.5, DESIGN.md §4): TCP FIN ↔ END_STREAM, each direction on its own; a TCP
//!   error → RST_STREAM(CONNECT_ERROR); a stream reset → TCP RST, except RST_STREAM NO_ERROR or
//!   CANCEL, which ends that direction like END_STREAM.
//!
//! Not mirrored from ztunnel: PING keep-alives, authorization, per-identity pools, metrics.

use std::future::poll_fn;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{anyhow, Context, Result};
use bytes::{Bytes, BytesMut};
use h2::{Reason, RecvStream, SendStream};
use http::{Method, Request, Response, StatusCode};
use rustls::pki_types::ServerName;
use rustls::{ClientConfig, ServerConfig};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Mutex;
use tokio_rustls::{TlsAcceptor, TlsConnector};

/// ztunnel's HTTP/2 settings (DESIGN.md §4).
pub const STREAM_WINDOW: u32 = 4 << 20;
pub const CONNECTION_WINDOW: u32 = 16 << 20;
pub const MAX_FRAME_SIZE: u32 = 1 << 20;
pub const MAX_CONCURRENT_STREAMS: u32 = 200;

/// Bytes asked of one TCP read before they are handed to h2 (which cuts frames of at most the
/// peer's MAX_FRAME_SIZE).
const READ_CHUNK: usize = 256 * 1024;
/// Upstream connect (server) and TLS + HTTP/2 handshake (client) deadline.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// How one direction of a tunnel ended when it did not end cleanly: the whole tunnel is then
/// torn down with resets on both sides.
#[derive(Debug)]
pub enum Abort {
    /// The TCP side failed (reset, write error).
    Tcp(std::io::Error),
    /// The stream was reset or its connection failed.
    Stream(h2::Error),
}

impl std::fmt::Display for Abort {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Abort::Tcp(e) => write!(f, "tcp: {e}"),
            Abort::Stream(e) => write!(f, "stream: {e}"),
        }
    }
}

/// RST_STREAM NO_ERROR or CANCEL from the peer means "no more data", not a failure (§4).
fn is_graceful_reset(e: &h2::Error) -> bool {
    e.is_remote() && matches!(e.reason(), Some(Reason::NO_ERROR) | Some(Reason::CANCEL))
}

/// Stream DATA → TCP, releasing flow-control credit as each chunk is written.
async fn h2_to_tcp<W: AsyncWrite + Unpin>(recv: &mut RecvStream, mut tcp: W) -> Result<(), Abort> {
    loop {
        match recv.data().await {
            Some(Ok(data)) => {
                let n = data.len();
                tcp.write_all(&data).await.map_err(Abort::Tcp)?;
                // The stream may already be gone; the bytes are written either way.
                let _ = recv.flow_control().release_capacity(n);
            }
            Some(Err(e)) if is_graceful_reset(&e) => break,
            Some(Err(e)) => return Err(Abort::Stream(e)),
            None => break, // END_STREAM
        }
    }
    tcp.shutdown().await.map_err(Abort::Tcp)
}

/// TCP → stream DATA, sending only what the peer's windows allow; EOF → END_STREAM.
async fn tcp_to_h2<R: AsyncRead + Unpin>(
    mut tcp: R,
    send: &mut SendStream<Bytes>,
) -> Result<(), Abort> {
    let mut buf = BytesMut::new();
    loop {
        buf.reserve(READ_CHUNK);
        let n = tcp.read_buf(&mut buf).await.map_err(Abort::Tcp)?;
        if n == 0 {
            return send.send_data(Bytes::new(), true).map_err(Abort::Stream);
        }
        let mut chunk = buf.split().freeze();
        while !chunk.is_empty() {
            send.reserve_capacity(chunk.len());
            let granted = match poll_fn(|cx| send.poll_capacity(cx)).await {
                Some(Ok(granted)) => granted,
                Some(Err(e)) if is_graceful_reset(&e) => return Ok(()),
                Some(Err(e)) => return Err(Abort::Stream(e)),
                None => return Err(Abort::Stream(h2::Error::from(Reason::STREAM_CLOSED))),
            };
            if granted > 0 {
                let part = chunk.split_to(granted.min(chunk.len()));
                send.send_data(part, false).map_err(Abort::Stream)?;
            }
        }
    }
}

/// Copies both ways until both directions ended. On the first abort the stream is reset
/// (RST_STREAM CONNECT_ERROR) and the TCP connection closed with a RST (`SO_LINGER` 0), so
/// neither end can mistake a cut-off transfer for a complete one.
pub async fn pump(
    mut tcp: TcpStream,
    mut send: SendStream<Bytes>,
    mut recv: RecvStream,
) -> Result<(), Abort> {
    let result = {
        let (rd, wr) = tcp.split();
        let up = h2_to_tcp(&mut recv, wr);
        let down = tcp_to_h2(rd, &mut send);
        tokio::pin!(up, down);
        let (mut up_done, mut down_done) = (false, false);
        let mut result = Ok(());
        while !(up_done && down_done) && result.is_ok() {
            tokio::select! {
                r = &mut up, if !up_done => { up_done = true; result = r; }
                r = &mut down, if !down_done => { down_done = true; result = r; }
            }
        }
        result
    };
    if result.is_err() {
        send.send_reset(Reason::CONNECT_ERROR);
        let _ = tcp.set_zero_linger();
    }
    result
}

fn h2_server_builder() -> h2::server::Builder {
    let mut b = h2::server::Builder::new();
    b.initial_window_size(STREAM_WINDOW)
        .initial_connection_window_size(CONNECTION_WINDOW)
        .max_frame_size(MAX_FRAME_SIZE)
        .max_concurrent_streams(MAX_CONCURRENT_STREAMS);
    b
}

fn h2_client_builder() -> h2::client::Builder {
    let mut b = h2::client::Builder::new();
    b.initial_window_size(STREAM_WINDOW)
        .initial_connection_window_size(CONNECTION_WINDOW)
        .max_frame_size(MAX_FRAME_SIZE);
    b
}

/// Accepts on a TCP listener that yields the odd error (EMFILE, a connection reset before
/// accept) without giving up.
async fn accept(listener: &TcpListener) -> TcpStream {
    loop {
        match listener.accept().await {
            Ok((tcp, _)) => {
                let _ = tcp.set_nodelay(true);
                return tcp;
            }
            Err(e) => {
                eprintln!("accept: {e}");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    }
}

/// The tunnel server: mTLS HTTP/2 on `listener`, a TCP connection per CONNECT.
pub async fn serve(listener: TcpListener, tls: Arc<ServerConfig>) -> Result<()> {
    let acceptor = TlsAcceptor::from(tls);
    loop {
        let tcp = accept(&listener).await;
        let acceptor = acceptor.clone();
        tokio::spawn(async move {
            let peer = tcp.peer_addr().ok();
            if let Err(e) = serve_connection(tcp, acceptor).await {
                eprintln!("connection from {peer:?}: {e:#}");
            }
        });
    }
}

async fn serve_connection(tcp: TcpStream, acceptor: TlsAcceptor) -> Result<()> {
    let tls = acceptor.accept(tcp).await.context("TLS handshake")?;
    let mut conn = h2_server_builder()
        .handshake::<_, Bytes>(tls)
        .await
        .context("HTTP/2 handshake")?;
    while let Some(request) = conn.accept().await {
        let (request, respond) = request.context("HTTP/2")?;
        tokio::spawn(serve_stream(request, respond));
    }
    Ok(())
}

async fn serve_stream(request: Request<RecvStream>, mut respond: h2::server::SendResponse<Bytes>) {
    let status = |code: StatusCode| {
        Response::builder()
            .status(code)
            .body(())
            .expect("static response")
    };
    let authority = match request.uri().authority() {
        Some(a) if request.method() == Method::CONNECT && a.port_u16().is_some() => a.to_string(),
        _ => {
            let _ = respond.send_response(status(StatusCode::BAD_REQUEST), true);
            return;
        }
    };
    let upstream = tokio::time::timeout(CONNECT_TIMEOUT, TcpStream::connect(&authority)).await;
    let tcp = match upstream {
        Ok(Ok(tcp)) => tcp,
        Ok(Err(e)) => {
            eprintln!("CONNECT {authority}: {e}");
            let _ = respond.send_response(status(StatusCode::SERVICE_UNAVAILABLE), true);
            return;
        }
        Err(_) => {
            eprintln!("CONNECT {authority}: timed out after {CONNECT_TIMEOUT:?}");
            let _ = respond.send_response(status(StatusCode::SERVICE_UNAVAILABLE), true);
            return;
        }
    };
    let _ = tcp.set_nodelay(true);
    let Ok(send) = respond.send_response(status(StatusCode::OK), false) else {
        return;
    };
    let _ = pump(tcp, send, request.into_body()).await;
}

/// One pooled HTTP/2 connection and how many of its streams are open.
struct Pooled {
    send: h2::client::SendRequest<Bytes>,
    open_streams: Arc<AtomicUsize>,
    dead: Arc<AtomicBool>,
}

impl Pooled {
    fn has_room(&self) -> bool {
        !self.dead.load(Ordering::Relaxed)
            && self.open_streams.load(Ordering::Relaxed) < self.send.current_max_send_streams()
    }
}

/// Counts a stream as open on its connection until dropped.
struct StreamSlot(Arc<AtomicUsize>);

impl Drop for StreamSlot {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

/// The client side: where to tunnel to and the pooled connections to the peer.
pub struct Client {
    peer: SocketAddr,
    server_name: ServerName<'static>,
    target: String,
    connector: TlsConnector,
    pool: Mutex<Vec<Pooled>>,
}

impl Client {
    pub fn new(
        peer: SocketAddr,
        server_name: ServerName<'static>,
        target: String,
        tls: Arc<ClientConfig>,
    ) -> Self {
        Self {
            peer,
            server_name,
            target,
            connector: TlsConnector::from(tls),
            pool: Mutex::new(Vec::new()),
        }
    }

    /// Accepts plain TCP on `listener` and tunnels each connection.
    pub async fn serve(self: Arc<Self>, listener: TcpListener) -> Result<()> {
        loop {
            let tcp = accept(&listener).await;
            let client = Arc::clone(&self);
            tokio::spawn(async move {
                if let Err(e) = client.tunnel(tcp).await {
                    eprintln!("tunnel to {} via {}: {e:#}", client.target, client.peer);
                }
            });
        }
    }

    async fn tunnel(&self, tcp: TcpStream) -> Result<()> {
        let opened = match self.open_stream().await {
            Ok(opened) => opened,
            Err(e) => {
                let _ = tcp.set_zero_linger();
                return Err(e);
            }
        };
        let (response, send, _slot) = opened;
        let response = match response.await {
            Ok(r) if r.status() == StatusCode::OK => r,
            Ok(r) => {
                let _ = tcp.set_zero_linger();
                return Err(anyhow!("peer answered {}", r.status()));
            }
            Err(e) => {
                let _ = tcp.set_zero_linger();
                return Err(e).context("CONNECT");
            }
        };
        pump(tcp, send, response.into_body())
            .await
            .map_err(|e| anyhow!("{e}"))
    }

    /// Sends `CONNECT target` on a pooled connection with room, opening one if none has; a
    /// connection that fails to take the stream is dropped and the stream tried once more.
    async fn open_stream(
        &self,
    ) -> Result<(h2::client::ResponseFuture, SendStream<Bytes>, StreamSlot)> {
        let mut last_err = None;
        for _ in 0..2 {
            let (send, slot, dead) = self.pick().await?;
            let request = Request::builder()
                .method(Method::CONNECT)
                .uri(self.target.as_str())
                .body(())
                .context("CONNECT request")?;
            let sent = match send.ready().await {
                Ok(mut send) => send.send_request(request, false),
                Err(e) => Err(e),
            };
            match sent {
                Ok((response, stream)) => return Ok((response, stream, slot)),
                Err(e) => {
                    dead.store(true, Ordering::Relaxed);
                    last_err = Some(e);
                }
            }
        }
        Err(last_err.expect("two tries")).context("opening a stream")
    }

    async fn pick(&self) -> Result<(h2::client::SendRequest<Bytes>, StreamSlot, Arc<AtomicBool>)> {
        // Held across the handshake on purpose: a burst of new connections waits for the one
        // being opened instead of each opening its own.
        let mut pool = self.pool.lock().await;
        pool.retain(|c| !c.dead.load(Ordering::Relaxed));
        let i = match pool.iter().position(Pooled::has_room) {
            Some(i) => i,
            None => {
                pool.push(self.connect().await?);
                pool.len() - 1
            }
        };
        let c = &pool[i];
        c.open_streams.fetch_add(1, Ordering::Relaxed);
        Ok((
            c.send.clone(),
            StreamSlot(Arc::clone(&c.open_streams)),
            Arc::clone(&c.dead),
        ))
    }

    async fn connect(&self) -> Result<Pooled> {
        let handshake = async {
            let tcp = TcpStream::connect(self.peer).await.context("TCP connect")?;
            let _ = tcp.set_nodelay(true);
            let tls = self
                .connector
                .connect(self.server_name.clone(), tcp)
                .await
                .context("TLS handshake")?;
            h2_client_builder()
                .handshake::<_, Bytes>(tls)
                .await
                .context("HTTP/2 handshake")
        };
        let (send, conn) = tokio::time::timeout(CONNECT_TIMEOUT, handshake)
            .await
            .map_err(|_| anyhow!("timed out after {CONNECT_TIMEOUT:?}"))?
            .with_context(|| format!("connecting to peer {}", self.peer))?;
        let dead = Arc::new(AtomicBool::new(false));
        let flag = Arc::clone(&dead);
        let peer = self.peer;
        tokio::spawn(async move {
            if let Err(e) = conn.await {
                eprintln!("connection to peer {peer}: {e}");
            }
            flag.store(true, Ordering::Relaxed);
        });
        Ok(Pooled {
            send,
            open_streams: Arc::new(AtomicUsize::new(0)),
            dead,
        })
    }
}
