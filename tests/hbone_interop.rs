//! HBONE interop with independent peers, over real mutual TLS 1.3 with certificates from
//! `ringtun certs` (DESIGN.md §4): the `h2` crate (with tokio-rustls) and Python's `h2` package
//! (with the `ssl` module, `tests/interop/h2_connect.py`), each as a CONNECT client against
//! ringtun's port 15008 and as a CONNECT server accepting ringtun's outbound tunnel.
//!
//! Two-node mesh (`Testbed::two_node_config`): node A serves the client pod, node B serves the
//! HBONE pods mesh-1 and mesh-2. Each test starts only the ringtun it examines; the other node's
//! part is played by a peer under test control:
//! - against node B, the peer is the client: a TLS connection from the client pod to
//!   10.77.2.2:15008, which node B's rules in mesh-1 hand to ringtun;
//! - against node A, the peer is the server, listening on mesh-1's 10.77.2.2:15008 (no rules
//!   there), and a plain TCP client in the client pod is captured and tunnelled by ringtun A.
//!
//! The peers themselves are checked against each other on loopback (no root needed), so a
//! failure of a root test is ringtun's, not the peer's.
//!
//! Without root the namespace tests print `SKIPPED (needs root)`; with `CI` set they fail.
//! The Python tests need `python3` with the `h2` package (Debian `python3-h2`); without it they
//! print `SKIPPED (python3 h2 missing)`, and with `CI` set they fail.

use std::future::poll_fn;
use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{mpsc as std_mpsc, Arc, OnceLock};
use std::time::{Duration, Instant, SystemTime};

use bytes::Bytes;
use ringtun::control_plane::certs::DevCa;
use ringtun::control_plane::identity::SpiffeId;
use ringtun::testbed::{
    self, connect_in, listen_in, serve_exchanges, MeshNode, Pod, RingtunProcess, Testbed, MESH_PORT,
};
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::client::verify_server_cert_signed_by_trust_anchor;
use rustls::crypto::CryptoProvider;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use rustls::server::{ParsedCertificate, WebPkiClientVerifier};
use rustls::{
    CertificateError, ClientConfig, DigitallySignedStruct, OtherError, RootCertStore, ServerConfig,
    SignatureScheme,
};
use sha2::{Digest, Sha256};
use tokio::time::timeout;

const BIN: &str = env!("CARGO_BIN_EXE_ringtun");
const SCRIPT: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/interop/h2_connect.py");
const MIB: u64 = 1 << 20;
const BIG: u64 = 4 * MIB;
/// What an HBONE port is.
const HBONE_PORT: u16 = 15008;
/// Each step's limit: a broken peer fails the test instead of hanging it.
const STEP: Duration = Duration::from_secs(10);
const TRANSFER: Duration = Duration::from_secs(30);

fn root_or_skip(name: &str) -> bool {
    if testbed::is_root() {
        return true;
    }
    if std::env::var_os("CI").is_some() {
        panic!("{name}: root tests must run as root in CI");
    }
    eprintln!("SKIPPED (needs root): {name}");
    false
}

/// A `python3` that can `import h2` (Debian's `python3-h2`), looked for once.
fn python_or_skip(name: &str) -> Option<&'static str> {
    static FOUND: OnceLock<Option<String>> = OnceLock::new();
    let found = FOUND
        .get_or_init(|| testbed::python_with("h2, ssl"))
        .as_deref();
    if found.is_none() {
        // Says SKIPPED, or fails under CI.
        testbed::python_or_skip(name, "h2, ssl", "python3-h2");
    }
    found
}

fn spiffe(sa: &str) -> String {
    format!("spiffe://cluster.local/ns/default/sa/{sa}")
}

fn hex(d: &[u8; 32]) -> String {
    testbed::hex(d)
}

/// SHA-256 of `len` bytes of `testbed::Pattern(seed)`: what a correct sender sent.
fn pattern_hash(len: u64, seed: u64) -> String {
    hex(&testbed::send_pattern(&mut std::io::sink(), len, seed).unwrap())
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap()
}

// ------------------------------------------------------------------ TLS configs (independent)

fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// The URI SANs of a certificate, parsed here with x509-parser (not with ringtun's code).
fn uri_sans(cert: &[u8]) -> Vec<String> {
    let Ok((_, parsed)) = x509_parser::parse_x509_certificate(cert) else {
        return Vec::new();
    };
    let Ok(Some(san)) = parsed.subject_alternative_name() else {
        return Vec::new();
    };
    san.value
        .general_names
        .iter()
        .filter_map(|n| match n {
            x509_parser::extensions::GeneralName::URI(u) => Some(u.to_string()),
            _ => None,
        })
        .collect()
}

/// Accepts a server whose chain leads to `roots` and whose only URI SAN is `expected`; no
/// DNS-name check (mesh servers carry no DNS name).
#[derive(Debug)]
struct SpiffeServerVerifier {
    roots: Arc<RootCertStore>,
    expected: String,
    provider: Arc<CryptoProvider>,
}

impl ServerCertVerifier for SpiffeServerVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let cert = ParsedCertificate::try_from(end_entity)?;
        verify_server_cert_signed_by_trust_anchor(
            &cert,
            &self.roots,
            intermediates,
            now,
            self.provider.signature_verification_algorithms.all,
        )?;
        let uris = uri_sans(end_entity);
        if uris != [self.expected.clone()] {
            return Err(rustls::Error::InvalidCertificate(CertificateError::Other(
                OtherError(Arc::new(std::io::Error::other(format!(
                    "server URI SANs {uris:?}, expected exactly [{}]",
                    self.expected
                )))),
            )));
        }
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.provider
            .signature_verification_algorithms
            .supported_schemes()
    }
}

fn roots(ca_pem: &Path) -> Arc<RootCertStore> {
    let mut roots = RootCertStore::empty();
    for c in CertificateDer::pem_file_iter(ca_pem).expect("CA file") {
        roots.add(c.expect("CA PEM")).expect("CA usable as a root");
    }
    Arc::new(roots)
}

fn load_chain(cert: &Path) -> Vec<CertificateDer<'static>> {
    CertificateDer::pem_file_iter(cert)
        .unwrap_or_else(|e| panic!("{}: {e}", cert.display()))
        .collect::<Result<_, _>>()
        .unwrap()
}

fn load_key(key: &Path) -> PrivateKeyDer<'static> {
    PrivateKeyDer::from_pem_file(key).unwrap_or_else(|e| panic!("{}: {e}", key.display()))
}

/// TLS 1.3, ALPN h2, client certificate, server identity `expected`.
fn client_config(
    chain: Vec<CertificateDer<'static>>,
    key: PrivateKeyDer<'static>,
    ca: &Path,
    expected: &str,
) -> Arc<ClientConfig> {
    let provider = provider();
    let verifier = SpiffeServerVerifier {
        roots: roots(ca),
        expected: expected.to_string(),
        provider: Arc::clone(&provider),
    };
    let mut cfg = ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])
        .unwrap()
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(verifier))
        .with_client_auth_cert(chain, key)
        .unwrap();
    cfg.alpn_protocols = vec![b"h2".to_vec()];
    cfg.enable_sni = false;
    Arc::new(cfg)
}

/// TLS 1.3, ALPN h2, a client certificate required and verified against `ca`.
fn server_config(cert: &Path, key: &Path, ca: &Path) -> Arc<ServerConfig> {
    let provider = provider();
    let verifier = WebPkiClientVerifier::builder_with_provider(roots(ca), Arc::clone(&provider))
        .build()
        .unwrap();
    let mut cfg = ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])
        .unwrap()
        .with_client_cert_verifier(verifier)
        .with_single_cert(load_chain(cert), load_key(key))
        .unwrap();
    cfg.alpn_protocols = vec![b"h2".to_vec()];
    Arc::new(cfg)
}

/// `<certs>/default/<sa>/cert.pem|key.pem`, as `ringtun certs` lays them out.
struct Pki {
    dir: PathBuf,
}

impl Pki {
    fn ca(&self) -> PathBuf {
        self.dir.join("ca.pem")
    }
    fn cert(&self, sa: &str) -> PathBuf {
        self.dir.join("default").join(sa).join("cert.pem")
    }
    fn key(&self, sa: &str) -> PathBuf {
        self.dir.join("default").join(sa).join("key.pem")
    }
    fn client(&self, sa: &str, expected_server: &str) -> Arc<ClientConfig> {
        client_config(
            load_chain(&self.cert(sa)),
            load_key(&self.key(sa)),
            &self.ca(),
            expected_server,
        )
    }
    fn server(&self, sa: &str) -> Arc<ServerConfig> {
        server_config(&self.cert(sa), &self.key(sa), &self.ca())
    }

    /// A CA and certificates for `client` and `mesh-1` made in memory (loopback tests).
    fn generate(dir: &Path) -> Pki {
        let now = SystemTime::now();
        let ca = DevCa::generate("cluster.local", now, Duration::from_secs(3600)).unwrap();
        std::fs::create_dir_all(dir).unwrap();
        std::fs::write(dir.join("ca.pem"), ca.cert_pem()).unwrap();
        for sa in ["client", "mesh-1"] {
            let id = SpiffeId::parse(&spiffe(sa)).unwrap();
            let issued = ca.issue(&id, now, Duration::from_secs(3600)).unwrap();
            let d = dir.join("default").join(sa);
            std::fs::create_dir_all(&d).unwrap();
            std::fs::write(d.join("cert.pem"), &issued.cert_pem).unwrap();
            std::fs::write(d.join("key.pem"), &issued.key_pem).unwrap();
        }
        Pki {
            dir: dir.to_path_buf(),
        }
    }
}

// ------------------------------------------------------------------ the h2 crate peers

/// The h2 client's connection task; dropping it aborts the task and closes the connection.
/// A test keeps it (in its `ClientOutcome`) until the server pod has finished its side:
/// the client may see the server's END_STREAM before ringtun has delivered the client's own
/// last bytes to the server, and closing the tunnel then (with unread WINDOW_UPDATEs: a TCP
/// reset) would rightly reset that stream.
#[derive(Debug)]
struct H2Connection(tokio::task::JoinHandle<Result<(), h2::Error>>);

impl Drop for H2Connection {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// What the h2-crate CONNECT client saw.
#[derive(Debug)]
struct ClientOutcome {
    status: u16,
    server_identity: Vec<String>,
    sent: u64,
    sent_hash: String,
    received: u64,
    received_hash: String,
    /// How the response stream ended: `end_stream`, or the error.
    end: String,
    /// Open until the outcome is dropped (after 200).
    _connection: Option<H2Connection>,
}

/// Sends `data` within the peer's flow-control windows, then (if `end`) END_STREAM.
async fn send_all(
    send: &mut h2::SendStream<Bytes>,
    mut data: Bytes,
    end: bool,
) -> Result<(), String> {
    while !data.is_empty() {
        send.reserve_capacity(data.len());
        match poll_fn(|cx| send.poll_capacity(cx)).await {
            None => return Err("stream closed while sending".into()),
            Some(Err(e)) => return Err(format!("send capacity: {e}")),
            Some(Ok(0)) => continue,
            Some(Ok(n)) => {
                let chunk = data.split_to(n.min(data.len()));
                send.send_data(chunk, false)
                    .map_err(|e| format!("send_data: {e}"))?;
            }
        }
    }
    if end {
        send.send_data(Bytes::new(), true)
            .map_err(|e| format!("END_STREAM: {e}"))?;
    }
    Ok(())
}

/// Over `tcp` (already connected): TLS with `tls`, HTTP/2, `CONNECT authority`; on 200 sends
/// `bytes` pattern bytes with `seed`, END_STREAM, and reads the response stream to its end.
/// `Err` is a failure before a response (TLS, HTTP/2 handshake, reset, timeout).
async fn h2_connect(
    tcp: std::net::TcpStream,
    tls: Arc<ClientConfig>,
    authority: &str,
    bytes: u64,
    seed: u64,
) -> Result<ClientOutcome, String> {
    h2_connect_with(tcp, tls, authority, &[], bytes, seed).await
}

/// [`h2_connect`] with `headers` added to the CONNECT.
async fn h2_connect_with(
    tcp: std::net::TcpStream,
    tls: Arc<ClientConfig>,
    authority: &str,
    headers: &[(&str, &str)],
    bytes: u64,
    seed: u64,
) -> Result<ClientOutcome, String> {
    let server_ip = tcp.peer_addr().map_err(|e| e.to_string())?.ip();
    tcp.set_nonblocking(true).unwrap();
    let tcp = tokio::net::TcpStream::from_std(tcp).map_err(|e| e.to_string())?;
    let tls = timeout(
        STEP,
        tokio_rustls::TlsConnector::from(tls).connect(ServerName::IpAddress(server_ip.into()), tcp),
    )
    .await
    .map_err(|_| "TLS handshake timed out".to_string())?
    .map_err(|e| format!("TLS handshake: {e}"))?;
    {
        let (_, c) = tls.get_ref();
        if c.alpn_protocol() != Some(b"h2") {
            return Err(format!("ALPN {:?}, not h2", c.alpn_protocol()));
        }
        if c.protocol_version() != Some(rustls::ProtocolVersion::TLSv1_3) {
            return Err(format!("{:?}, not TLS 1.3", c.protocol_version()));
        }
    }
    let server_identity = tls
        .get_ref()
        .1
        .peer_certificates()
        .and_then(|c| c.first())
        .map(|c| uri_sans(c))
        .unwrap_or_default();
    let (send_req, conn) = timeout(
        STEP,
        h2::client::Builder::new()
            .initial_window_size(MIB as u32)
            .initial_connection_window_size(4 * MIB as u32)
            .handshake::<_, Bytes>(tls),
    )
    .await
    .map_err(|_| "HTTP/2 handshake timed out".to_string())?
    .map_err(|e| format!("HTTP/2 handshake: {e}"))?;
    let driver = tokio::spawn(conn);
    let conn_error = |driver: tokio::task::JoinHandle<Result<(), h2::Error>>| async move {
        match timeout(Duration::from_millis(500), driver).await {
            Ok(Ok(Err(e))) => format!("; connection: {e}"),
            _ => String::new(),
        }
    };
    let mut send_req = match timeout(STEP, send_req.ready()).await {
        Ok(Ok(s)) => s,
        Ok(Err(e)) => return Err(format!("HTTP/2 not ready: {e}{}", conn_error(driver).await)),
        Err(_) => return Err("HTTP/2 not ready in time".into()),
    };
    let mut req = http::Request::builder()
        .method(http::Method::CONNECT)
        .uri(authority);
    for (name, value) in headers {
        req = req.header(*name, *value);
    }
    let req = req.body(()).unwrap();
    let (resp, mut send) = send_req
        .send_request(req, false)
        .map_err(|e| format!("send CONNECT: {e}"))?;
    let resp = match timeout(STEP, resp).await {
        Ok(Ok(r)) => r,
        Ok(Err(e)) => {
            return Err(format!("CONNECT response: {e}{}", conn_error(driver).await));
        }
        Err(_) => return Err("no CONNECT response in time".into()),
    };
    let status = resp.status().as_u16();
    let mut out = ClientOutcome {
        status,
        server_identity,
        sent: 0,
        sent_hash: String::new(),
        received: 0,
        received_hash: String::new(),
        end: String::new(),
        _connection: None,
    };
    if status != 200 {
        out.end = "status".into();
        return Ok(out);
    }
    let writer = async {
        let mut pattern = testbed::Pattern::new(seed);
        let mut h = Sha256::new();
        let mut left = bytes;
        while left > 0 {
            let n = left.min(256 * 1024) as usize;
            let mut buf = vec![0u8; n];
            pattern.fill(&mut buf);
            h.update(&buf);
            send_all(&mut send, Bytes::from(buf), false).await?;
            left -= n as u64;
        }
        send_all(&mut send, Bytes::new(), true).await?;
        Ok::<_, String>(hex(&h.finalize().into()))
    };
    let reader = async {
        let mut body = resp.into_body();
        let mut h = Sha256::new();
        let mut n = 0u64;
        let end = loop {
            match body.data().await {
                Some(Ok(chunk)) => {
                    let _ = body.flow_control().release_capacity(chunk.len());
                    n += chunk.len() as u64;
                    h.update(&chunk);
                }
                Some(Err(e)) => break format!("error: {e}"),
                None => break "end_stream".to_string(),
            }
        };
        (n, hex(&h.finalize().into()), end)
    };
    let (sent_hash, (received, received_hash, end)) =
        match timeout(TRANSFER, async { tokio::join!(writer, reader) }).await {
            Ok((Ok(h), r)) => (h, r),
            Ok((Err(e), r)) => return Err(format!("sending: {e} (reader: {r:?})")),
            Err(_) => return Err(format!("transfer not done within {TRANSFER:?}")),
        };
    out.sent = bytes;
    out.sent_hash = sent_hash;
    out.received = received;
    out.received_hash = received_hash;
    out.end = end;
    out._connection = Some(H2Connection(driver));
    Ok(out)
}

/// One CONNECT stream as the h2-crate server saw it.
#[derive(Debug, Clone)]
struct StreamReport {
    client_identity: Vec<String>,
    method: String,
    authority: Option<String>,
    scheme: Option<String>,
    forwarded: Option<String>,
    bytes: u64,
    sha256: String,
    end: String,
}

/// CONNECT server: TLS (client certificate required), HTTP/2, 200 to every CONNECT, each DATA
/// byte echoed on the same stream, END_STREAM after the peer's and the echo. One report per
/// stream on `reports`.
async fn h2_echo_server(
    listener: std::net::TcpListener,
    tls: Arc<ServerConfig>,
    reports: tokio::sync::mpsc::UnboundedSender<StreamReport>,
) {
    listener.set_nonblocking(true).unwrap();
    let listener = tokio::net::TcpListener::from_std(listener).unwrap();
    let acceptor = tokio_rustls::TlsAcceptor::from(tls);
    loop {
        let Ok((tcp, peer)) = listener.accept().await else {
            continue;
        };
        let acceptor = acceptor.clone();
        let reports = reports.clone();
        tokio::spawn(async move {
            let tls = match timeout(STEP, acceptor.accept(tcp)).await {
                Ok(Ok(t)) => t,
                Ok(Err(e)) => return eprintln!("h2 server: TLS from {peer}: {e}"),
                Err(_) => return eprintln!("h2 server: TLS from {peer} timed out"),
            };
            let client_identity = tls
                .get_ref()
                .1
                .peer_certificates()
                .and_then(|c| c.first())
                .map(|c| uri_sans(c))
                .unwrap_or_default();
            let mut conn = match h2::server::Builder::new()
                .initial_window_size(MIB as u32)
                .initial_connection_window_size(4 * MIB as u32)
                .handshake::<_, Bytes>(tls)
                .await
            {
                Ok(c) => c,
                Err(e) => return eprintln!("h2 server: HTTP/2 handshake from {peer}: {e}"),
            };
            while let Some(accepted) = conn.accept().await {
                let (req, mut respond) = match accepted {
                    Ok(x) => x,
                    Err(e) => return eprintln!("h2 server: {peer}: {e}"),
                };
                let reports = reports.clone();
                let client_identity = client_identity.clone();
                tokio::spawn(async move {
                    let mut report = StreamReport {
                        client_identity,
                        method: req.method().to_string(),
                        authority: req.uri().authority().map(|a| a.to_string()),
                        scheme: req.uri().scheme_str().map(str::to_string),
                        forwarded: req
                            .headers()
                            .get("forwarded")
                            .map(|v| String::from_utf8_lossy(v.as_bytes()).into_owned()),
                        bytes: 0,
                        sha256: String::new(),
                        end: String::new(),
                    };
                    let mut body = req.into_body();
                    let ok = http::Response::builder().status(200).body(()).unwrap();
                    let mut send = match respond.send_response(ok, false) {
                        Ok(s) => s,
                        Err(e) => {
                            report.end = format!("respond: {e}");
                            let _ = reports.send(report);
                            return;
                        }
                    };
                    let mut h = Sha256::new();
                    report.end = loop {
                        match body.data().await {
                            Some(Ok(chunk)) => {
                                let n = chunk.len();
                                report.bytes += n as u64;
                                h.update(&chunk);
                                if let Err(e) = send_all(&mut send, chunk, false).await {
                                    break format!("echo: {e}");
                                }
                                let _ = body.flow_control().release_capacity(n);
                            }
                            Some(Err(e)) => break format!("error: {e}"),
                            None => match send_all(&mut send, Bytes::new(), true).await {
                                Ok(()) => break "end_stream".into(),
                                Err(e) => break format!("END_STREAM: {e}"),
                            },
                        }
                    };
                    report.sha256 = hex(&h.finalize().into());
                    let _ = reports.send(report);
                });
            }
        });
    }
}

// ------------------------------------------------------------------ the Python peer

fn py_cert_args(pki: &Pki, sa: &str) -> Vec<String> {
    vec![
        "--cert".into(),
        pki.cert(sa).display().to_string(),
        "--key".into(),
        pki.key(sa).display().to_string(),
        "--ca".into(),
        pki.ca().display().to_string(),
    ]
}

/// `h2_connect.py client …`, in namespace `netns` if given; returns its JSON line.
fn py_client(python: &str, netns: Option<&str>, args: &[String]) -> serde_json::Value {
    let mut cmd = match netns {
        Some(ns) => {
            let mut c = Command::new("ip");
            c.args(["netns", "exec", ns, python]);
            c
        }
        None => Command::new(python),
    };
    cmd.arg(SCRIPT)
        .arg("client")
        .args(args)
        .args(["--timeout", "30"])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut child = cmd.spawn().expect("python client starts");
    let deadline = Instant::now() + Duration::from_secs(45);
    while child.try_wait().unwrap().is_none() {
        if Instant::now() > deadline {
            let _ = child.kill();
            break;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let out = child.wait_with_output().unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    let line = stdout.lines().rev().find(|l| !l.trim().is_empty());
    match line.and_then(|l| serde_json::from_str(l).ok()) {
        Some(v) => v,
        None => panic!(
            "python client gave no JSON ({}); stdout:\n{stdout}\nstderr:\n{stderr}",
            out.status
        ),
    }
}

/// `h2_connect.py server …` running until dropped; its JSON lines arrive on `lines`.
struct PyServer {
    child: Child,
    lines: std_mpsc::Receiver<serde_json::Value>,
}

impl PyServer {
    fn start(python: &str, netns: Option<&str>, listen: SocketAddr, args: &[String]) -> PyServer {
        let mut cmd = match netns {
            Some(ns) => {
                let mut c = Command::new("ip");
                c.args(["netns", "exec", ns, python]);
                c
            }
            None => Command::new(python),
        };
        let mut child = cmd
            .arg(SCRIPT)
            .arg("server")
            .arg("--listen")
            .arg(listen.to_string())
            .args(args)
            .args(["--timeout", "60"])
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("python server starts");
        let stdout = child.stdout.take().unwrap();
        let (tx, lines) = std_mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                match serde_json::from_str(&line) {
                    Ok(v) => {
                        if tx.send(v).is_err() {
                            break;
                        }
                    }
                    Err(_) => eprintln!("python server: {line}"),
                }
            }
        });
        let server = PyServer { child, lines };
        let first = server.next(STEP);
        assert!(
            first.get("listening").is_some(),
            "python server did not start: {first}"
        );
        server
    }

    fn next(&self, within: Duration) -> serde_json::Value {
        self.lines
            .recv_timeout(within)
            .unwrap_or_else(|e| panic!("no line from the python server within {within:?}: {e}"))
    }
}

impl Drop for PyServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

// ------------------------------------------------------------------ the mesh under test

/// A testbed with certificates for every workload and one ringtun node running.
struct Mesh {
    ringtun: Option<RingtunProcess>,
    pki: Pki,
    tb: Testbed,
}

impl Mesh {
    /// Certificates from `ringtun certs`, `node`'s capture rules installed in its pods, and
    /// `ringtun run` for `node`.
    fn start(tag: &str, node: MeshNode) -> Mesh {
        Self::start_with_policies(tag, node, "")
    }

    /// [`Mesh::start`] with `policies` (the YAML `policies:` section) in the node's config.
    fn start_with_policies(tag: &str, node: MeshNode, policies: &str) -> Mesh {
        let tb = Testbed::create(tag).expect("testbed");
        let dir = std::env::temp_dir().join(&tb.prefix);
        let certs = dir.join("certs");
        let config = tb.two_node_config(node, 2, &certs, "") + policies;
        testbed::write_certs(Path::new(BIN), &config, &certs).expect("ringtun certs");
        let cfg_path = dir.join(format!("{}-rules.yaml", node.name()));
        std::fs::write(&cfg_path, &config).unwrap();
        tb.install_capture(Path::new(BIN), node.pods(), &cfg_path);
        let ringtun = RingtunProcess::spawn_mesh_node(Path::new(BIN), &tb, node, &config, &[])
            .expect("ringtun starts");
        Mesh {
            ringtun: Some(ringtun),
            pki: Pki { dir: certs },
            tb,
        }
    }

    fn ns(&self, pod: Pod) -> ringtun::redirection::netns::NetNs {
        self.tb.pod_ns(pod).unwrap()
    }

    /// A TCP connection from the client pod's namespace.
    fn connect_from_client(&self, to: SocketAddr) -> std::net::TcpStream {
        let s = connect_in(&self.ns(Pod::Client), to)
            .unwrap_or_else(|e| panic!("client pod cannot connect to {to}: {e}"));
        s.set_read_timeout(Some(TRANSFER)).unwrap();
        s.set_write_timeout(Some(TRANSFER)).unwrap();
        s
    }

    /// An exchange server (seed 2) for `count` connections on mesh-1's port `MESH_PORT`.
    fn mesh1_exchange_server(
        &self,
        count: usize,
        bytes: u64,
    ) -> std::thread::JoinHandle<std::io::Result<Vec<testbed::Exchange>>> {
        let listener = listen_in(&self.ns(Pod::Mesh1), mesh1(MESH_PORT)).unwrap();
        serve_exchanges(listener, count, bytes, 2)
    }

    /// SIGTERM; ringtun must exit 0.
    fn finish(mut self) {
        let r = self.ringtun.take().unwrap();
        let log = r.log_text();
        let code = r.terminate().unwrap();
        assert_eq!(code, 0, "ringtun exit code after SIGTERM; log:\n{log}");
    }
}

impl Drop for Mesh {
    fn drop(&mut self) {
        if std::thread::panicking() {
            if let Some(r) = &self.ringtun {
                let log = r.log_text();
                let tail: Vec<&str> = log.lines().rev().take(60).collect();
                eprintln!(
                    "---- ringtun log ({}), last {} lines:",
                    r.log.display(),
                    tail.len()
                );
                for l in tail.iter().rev() {
                    eprintln!("{l}");
                }
            }
        }
    }
}

fn mesh1(port: u16) -> SocketAddr {
    SocketAddr::new(Pod::Mesh1.v4(), port)
}

fn wait_exchange(
    server: std::thread::JoinHandle<std::io::Result<Vec<testbed::Exchange>>>,
) -> testbed::Exchange {
    let start = Instant::now();
    while !server.is_finished() {
        assert!(
            start.elapsed() < TRANSFER,
            "the server in mesh-1 did not finish its exchange"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    server.join().unwrap().expect("server exchange")[0]
}

// ------------------------------------------------------------------ against ringtun's 15008

#[test]
fn h2_crate_client_gets_200_and_a_byte_stream_from_ringtun_15008() {
    if !root_or_skip("h2_crate_client_gets_200_and_a_byte_stream_from_ringtun_15008") {
        return;
    }
    let mesh = Mesh::start("h2c", MeshNode::B);
    let server = mesh.mesh1_exchange_server(1, BIG);
    let tcp = mesh.connect_from_client(mesh1(HBONE_PORT));
    let tls = mesh.pki.client("client", &spiffe("mesh-1"));
    let authority = format!("{}:{MESH_PORT}", Pod::Mesh1.v4());
    // The runtime (and so the client's connection) lives until the upstream finished.
    let rt = runtime();
    let out = rt
        .block_on(h2_connect(tcp, tls, &authority, BIG, 1))
        .unwrap_or_else(|e| panic!("CONNECT {authority} through ringtun's 15008: {e}"));
    assert_eq!(out.server_identity, [spiffe("mesh-1")]);
    assert_eq!(out.status, 200, "{out:?}");
    assert_eq!(out.end, "end_stream", "{out:?}");
    let s = wait_exchange(server);
    assert_eq!(out.sent_hash, pattern_hash(BIG, 1));
    assert_eq!(s.received, BIG, "bytes the upstream got");
    assert_eq!(
        hex(&s.received_hash),
        out.sent_hash,
        "client → upstream bytes differ"
    );
    assert_eq!(out.received, BIG, "bytes the h2 client got back");
    assert_eq!(
        out.received_hash,
        hex(&s.sent_hash),
        "upstream → client bytes differ"
    );
    mesh.finish();
}

#[test]
fn h2_crate_client_unknown_authority_gets_400_and_a_record() {
    if !root_or_skip("h2_crate_client_unknown_authority_gets_400_and_a_record") {
        return;
    }
    let mesh = Mesh::start("h4", MeshNode::B);
    let tcp = mesh.connect_from_client(mesh1(HBONE_PORT));
    let tls = mesh.pki.client("client", &spiffe("mesh-1"));
    let out = runtime()
        .block_on(h2_connect(tcp, tls, "10.77.2.99:8080", 1024, 1))
        .unwrap_or_else(|e| panic!("CONNECT 10.77.2.99:8080: {e}"));
    assert_eq!(out.status, 400, "{out:?}");
    // A refused CONNECT leaves a record like any connection, with the check that failed.
    let r = mesh.ringtun.as_ref().unwrap();
    let rec = wait_record(r, |rec| rec["status"] == 400);
    assert_eq!(rec["reason"], "unknown_authority", "{rec}");
    assert_eq!(rec["failure_reason"], "hbone_bad_request", "{rec}");
    assert_refused_counted(&mesh, "unknown_authority", "400");
    assert_eq!(rec["source_workload"], spiffe("client"), "{rec}");
    assert!(
        r.metric(
            "ringtun_connection_failures_total",
            &["class=\"downstream\"", "reason=\"hbone_bad_request\""]
        )
        .unwrap()
            >= 1.0
    );
    mesh.finish();
}

/// Only mesh-2's identity may reach mesh-1.
const ONLY_MESH2: &str = "policies:
  - name: only-mesh-2
    namespace: default
    rules:
      - from: [{source: {principals: [cluster.local/ns/default/sa/mesh-2]}}]
";

#[test]
fn headers_claiming_another_identity_change_nothing() {
    if !root_or_skip("headers_claiming_another_identity_change_nothing") {
        return;
    }
    let mesh = Mesh::start_with_policies("hi", MeshNode::B, ONLY_MESH2);
    let authority = format!("{}:{MESH_PORT}", Pod::Mesh1.v4());
    let claims = [
        (
            "x-forwarded-client-cert",
            "By=spiffe://cluster.local/ns/default/sa/mesh-1;URI=spiffe://cluster.local/ns/default/sa/mesh-2",
        ),
        ("baggage", "k8s.namespace.name=default,k8s.deployment.name=mesh-2"),
        ("x-spiffe-id", "spiffe://cluster.local/ns/default/sa/mesh-2"),
        ("x-istio-principal", "cluster.local/ns/default/sa/mesh-2"),
    ];
    let rt = runtime();
    // The client's certificate, whatever the headers say: 401.
    let tcp = mesh.connect_from_client(mesh1(HBONE_PORT));
    let tls = mesh.pki.client("client", &spiffe("mesh-1"));
    let out = rt
        .block_on(h2_connect_with(tcp, tls, &authority, &claims, 1024, 1))
        .unwrap_or_else(|e| panic!("CONNECT {authority}: {e}"));
    assert_eq!(out.status, 401, "{out:?}");
    let r = mesh.ringtun.as_ref().unwrap();
    let rec = wait_record(r, |rec| rec["status"] == 401);
    assert_eq!(rec["source_workload"], spiffe("client"), "{rec}");
    assert_eq!(rec["reason"], "no_allow_match", "{rec}");
    // A `forwarded` address of mesh-2 (another identity's workload) is not believed: the
    // CONNECT is refused for the claim itself, whatever the policy.
    let forged = [("forwarded", "for=\"10.77.3.2:4000\";by=mesh-2")];
    for (sa, status) in [("client", 400), ("mesh-1", 400)] {
        let tcp = mesh.connect_from_client(mesh1(HBONE_PORT));
        let tls = mesh.pki.client(sa, &spiffe("mesh-1"));
        let out = rt
            .block_on(h2_connect_with(tcp, tls, &authority, &forged, 1024, 1))
            .unwrap_or_else(|e| panic!("CONNECT {authority}: {e}"));
        assert_eq!(out.status, status, "{sa}: {out:?}");
        let rec = wait_record(r, |rec| {
            rec["reason"] == "forged_client_address" && rec["source_workload"] == spiffe(sa)
        });
        assert_eq!(rec["status"], 400, "{rec}");
    }
    assert!(
        r.log_text().contains("names another identity's workload"),
        "{}",
        r.log_text()
    );
    assert_refused_counted(&mesh, "forged_client_address", "400");
    assert_refused_counted(&mesh, "unauthorized", "401");
    // mesh-2's certificate, without any header: allowed.
    let server = mesh.mesh1_exchange_server(1, 64 * 1024);
    let tcp = mesh.connect_from_client(mesh1(HBONE_PORT));
    let tls = mesh.pki.client("mesh-2", &spiffe("mesh-1"));
    let out = rt
        .block_on(h2_connect(tcp, tls, &authority, 64 * 1024, 1))
        .unwrap_or_else(|e| panic!("CONNECT {authority}: {e}"));
    assert_eq!(out.status, 200, "{out:?}");
    let s = wait_exchange(server);
    assert_eq!(hex(&s.received_hash), out.sent_hash);
    drop(out);
    mesh.finish();
}

/// `ringtun_hbone_connects_refused_total` counted at least one CONNECT refused for `reason`
/// with `status`.
fn assert_refused_counted(mesh: &Mesh, reason: &str, status: &str) {
    let r = mesh.ringtun.as_ref().unwrap();
    let labels = [
        format!("reason=\"{reason}\""),
        format!("status=\"{status}\""),
    ];
    let labels: Vec<&str> = labels.iter().map(String::as_str).collect();
    let n = r
        .metric("ringtun_hbone_connects_refused_total", &labels)
        .unwrap();
    assert!(
        n >= 1.0,
        "no CONNECT counted refused for {reason} ({status})"
    );
}

/// The first access record `pick` accepts, waiting up to 10 s for it.
fn wait_record(r: &RingtunProcess, pick: impl Fn(&serde_json::Value) -> bool) -> serde_json::Value {
    let start = Instant::now();
    loop {
        if let Some(rec) = r.access_records().into_iter().find(|rec| pick(rec)) {
            return rec;
        }
        assert!(
            start.elapsed() < STEP,
            "no such access record; log:\n{}",
            r.log_text()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn h2_crate_client_refused_upstream_gets_503() {
    if !root_or_skip("h2_crate_client_refused_upstream_gets_503") {
        return;
    }
    let mesh = Mesh::start("h5", MeshNode::B);
    let tcp = mesh.connect_from_client(mesh1(HBONE_PORT));
    let tls = mesh.pki.client("client", &spiffe("mesh-1"));
    let authority = format!("{}:{}", Pod::Mesh1.v4(), MESH_PORT + 1);
    let out = runtime()
        .block_on(h2_connect(tcp, tls, &authority, 1024, 1))
        .unwrap_or_else(|e| panic!("CONNECT {authority}: {e}"));
    assert_eq!(out.status, 503, "{out:?}");
    let rec = wait_record(mesh.ringtun.as_ref().unwrap(), |rec| rec["status"] == 503);
    assert_eq!(rec["reason"], "upstream_unreachable", "{rec}");
    assert_eq!(rec["failure_reason"], "refused", "{rec}");
    assert_refused_counted(&mesh, "upstream_unreachable", "503");
    mesh.finish();
}

#[test]
fn client_certificate_from_another_trust_domain_is_refused() {
    if !root_or_skip("client_certificate_from_another_trust_domain_is_refused") {
        return;
    }
    let mesh = Mesh::start("td", MeshNode::B);
    let authority = format!("{}:{MESH_PORT}", Pod::Mesh1.v4());
    let rt = runtime();

    // Control: the same exchange with the client's own certificate works, so what follows is
    // a refusal and not a server that refuses everyone.
    let server = mesh.mesh1_exchange_server(1, 64 * 1024);
    let tcp = mesh.connect_from_client(mesh1(HBONE_PORT));
    let good = rt
        .block_on(h2_connect(
            tcp,
            mesh.pki.client("client", &spiffe("mesh-1")),
            &authority,
            64 * 1024,
            1,
        ))
        .unwrap_or_else(|e| panic!("control CONNECT with the client's certificate: {e}"));
    assert_eq!(
        (good.status, good.end.as_str()),
        (200, "end_stream"),
        "{good:?}"
    );
    assert_eq!(wait_exchange(server).received, 64 * 1024);

    // Same CA, same namespace and service account, other trust domain.
    let ca = DevCa::from_pem(
        &std::fs::read_to_string(mesh.pki.dir.join("ca.pem")).unwrap(),
        &std::fs::read_to_string(mesh.pki.dir.join("ca-key.pem")).unwrap(),
    )
    .expect("dev CA loads");
    let evil = SpiffeId::parse("spiffe://evil.example/ns/default/sa/client").unwrap();
    let issued = ca
        .issue(&evil, SystemTime::now(), Duration::from_secs(3600))
        .unwrap();
    assert_eq!(uri_sans(&issued.cert_der), [evil.to_uri()]);
    let tls = client_config(
        vec![issued.cert_der.clone()],
        PrivateKeyDer::Pkcs8(issued.key_der.clone_key()),
        &mesh.pki.ca(),
        &spiffe("mesh-1"),
    );
    // Something must be listening, or no answer would be a refusal.
    let server = mesh.mesh1_exchange_server(1, 1024);
    let tcp = mesh.connect_from_client(mesh1(HBONE_PORT));
    match rt.block_on(h2_connect(tcp, tls, &authority, 1024, 1)) {
        Err(e) => eprintln!("refused as expected: {e}"),
        Ok(out) => assert!(
            !(200..300).contains(&out.status),
            "a client from trust domain evil.example got {out:?}"
        ),
    }
    assert!(
        !server.is_finished(),
        "the upstream saw a connection from the refused client"
    );
    mesh.finish();
}

#[test]
fn python_h2_client_against_ringtun_15008() {
    let name = "python_h2_client_against_ringtun_15008";
    if !root_or_skip(name) {
        return;
    }
    let Some(python) = python_or_skip(name) else {
        return;
    };
    let mesh = Mesh::start("pyc", MeshNode::B);
    let server = mesh.mesh1_exchange_server(1, BIG);
    let mut args = py_cert_args(&mesh.pki, "client");
    args.extend([
        "--connect".into(),
        mesh1(HBONE_PORT).to_string(),
        "--authority".into(),
        mesh1(MESH_PORT).to_string(),
        "--expect-identity".into(),
        spiffe("mesh-1"),
        "--bytes".into(),
        BIG.to_string(),
        "--seed".into(),
        "1".into(),
    ]);
    let out = py_client(python, Some(&mesh.tb.pod_name(Pod::Client)), &args);
    assert_eq!(out["status"], 200, "{out}");
    assert_eq!(out["end"], "end_stream", "{out}");
    assert_eq!(out["tls"], "TLSv1.3", "{out}");
    assert_eq!(out["server_identity"], spiffe("mesh-1"), "{out}");
    let s = wait_exchange(server);
    assert_eq!(out["sent"], BIG, "{out}");
    assert_eq!(out["sent_sha256"], pattern_hash(BIG, 1), "{out}");
    assert_eq!(s.received, BIG, "bytes the upstream got");
    assert_eq!(
        out["sent_sha256"],
        hex(&s.received_hash),
        "client → upstream"
    );
    assert_eq!(out["received"], BIG, "{out}");
    assert_eq!(
        out["received_sha256"],
        hex(&s.sent_hash),
        "upstream → client"
    );
    mesh.finish();
}

// ------------------------------------------------------------------ ringtun's tunnel to a peer

/// The tunnel's CONNECT, as a peer server saw it.
fn assert_tunnel_stream(
    authority: Option<&str>,
    forwarded: Option<&str>,
    client_port: u16,
    client_identity: &[String],
) {
    assert_eq!(authority, Some(mesh1(MESH_PORT).to_string().as_str()));
    let want = format!("for=\"{}:{client_port}\"", Pod::Client.v4());
    assert_eq!(forwarded, Some(want.as_str()), "forwarded header");
    assert_eq!(
        client_identity,
        [spiffe("client")],
        "ringtun's client certificate"
    );
}

#[test]
fn ringtun_tunnel_is_accepted_by_an_h2_crate_server() {
    if !root_or_skip("ringtun_tunnel_is_accepted_by_an_h2_crate_server") {
        return;
    }
    let mesh = Mesh::start("h2s", MeshNode::A);
    let rt = runtime();
    let listener = listen_in(&mesh.ns(Pod::Mesh1), mesh1(HBONE_PORT)).unwrap();
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
    let server = rt.spawn(h2_echo_server(listener, mesh.pki.server("mesh-1"), tx));

    let client = mesh.connect_from_client(mesh1(MESH_PORT));
    let client_port = client.local_addr().unwrap().port();
    let c = testbed::exchange(client, BIG, 1)
        .unwrap_or_else(|e| panic!("plain TCP through ringtun A's tunnel: {e}"));
    let report = rt
        .block_on(async { timeout(STEP, rx.recv()).await })
        .expect("the h2 server reported no stream in time")
        .unwrap();
    server.abort();
    assert_eq!(report.method, "CONNECT", "{report:?}");
    assert_eq!(report.scheme, None, "{report:?}");
    assert_eq!(report.end, "end_stream", "{report:?}");
    assert_tunnel_stream(
        report.authority.as_deref(),
        report.forwarded.as_deref(),
        client_port,
        &report.client_identity,
    );
    assert_eq!(report.bytes, BIG, "bytes the h2 server got");
    assert_eq!(
        report.sha256,
        hex(&c.sent_hash),
        "client → server bytes differ"
    );
    assert_eq!(c.received, BIG, "echo bytes the client got");
    assert_eq!(c.received_hash, c.sent_hash, "echo differs");
    mesh.finish();
}

#[test]
fn ringtun_tunnel_is_accepted_by_a_python_h2_server() {
    let name = "ringtun_tunnel_is_accepted_by_a_python_h2_server";
    if !root_or_skip(name) {
        return;
    }
    let Some(python) = python_or_skip(name) else {
        return;
    };
    let mesh = Mesh::start("pys", MeshNode::A);
    let server = PyServer::start(
        python,
        Some(&mesh.tb.pod_name(Pod::Mesh1)),
        mesh1(HBONE_PORT),
        &py_cert_args(&mesh.pki, "mesh-1"),
    );
    let client = mesh.connect_from_client(mesh1(MESH_PORT));
    let client_port = client.local_addr().unwrap().port();
    let c = testbed::exchange(client, BIG, 1)
        .unwrap_or_else(|e| panic!("plain TCP through ringtun A's tunnel: {e}"));
    let report = server.next(STEP);
    assert_eq!(report["method"], "CONNECT", "{report}");
    let mut pseudo: Vec<&str> = report["pseudo"]
        .as_array()
        .map(|a| a.iter().filter_map(|v| v.as_str()).collect())
        .unwrap_or_default();
    pseudo.sort_unstable();
    assert_eq!(
        pseudo,
        [":authority", ":method"],
        "classic CONNECT: {report}"
    );
    assert_eq!(report["end"], "end_stream", "{report}");
    let identity = report["client_identity"].as_str().map(str::to_string);
    assert_tunnel_stream(
        report["authority"].as_str(),
        report["forwarded"].as_str(),
        client_port,
        identity.as_slice(),
    );
    assert_eq!(report["bytes"], BIG, "{report}");
    assert_eq!(report["sha256"], hex(&c.sent_hash), "client → server bytes");
    assert_eq!(c.received, BIG, "echo bytes the client got");
    assert_eq!(c.received_hash, c.sent_hash, "echo differs");
    mesh.finish();
}

// ------------------------------------------------------------------ the peers, against each other

/// The h2-crate client against the Python server, and the Python client against the h2-crate
/// server, on loopback (no root): the peers agree with each other, so a root test's failure is
/// ringtun's.
#[test]
fn peers_agree_with_each_other_on_loopback() {
    let Some(python) = python_or_skip("peers_agree_with_each_other_on_loopback") else {
        return;
    };
    let dir = std::env::temp_dir().join(format!("ringtun-interop-{}", std::process::id()));
    let pki = Pki::generate(&dir);
    let rt = runtime();

    // h2 crate client → Python server.
    let port = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap().port()
    };
    let listen = SocketAddr::from(([127, 0, 0, 1], port));
    let py = PyServer::start(python, None, listen, &py_cert_args(&pki, "mesh-1"));
    let tcp = std::net::TcpStream::connect_timeout(&listen, STEP).unwrap();
    let out = rt
        .block_on(h2_connect(
            tcp,
            pki.client("client", &spiffe("mesh-1")),
            "10.77.2.2:8080",
            BIG,
            7,
        ))
        .expect("h2 crate client → python server");
    assert_eq!(
        (out.status, out.end.as_str()),
        (200, "end_stream"),
        "{out:?}"
    );
    assert_eq!(out.sent_hash, pattern_hash(BIG, 7));
    assert_eq!((out.received, &out.received_hash), (BIG, &out.sent_hash));
    let report = py.next(STEP);
    assert_eq!(report["authority"], "10.77.2.2:8080", "{report}");
    assert_eq!(
        report["pseudo"].as_array().map(Vec::len),
        Some(2),
        "{report}"
    );
    assert_eq!(report["sha256"], out.sent_hash, "{report}");
    assert_eq!(report["client_identity"], spiffe("client"), "{report}");
    // A wrong expected identity is refused by the h2-crate client.
    let tcp = std::net::TcpStream::connect_timeout(&listen, STEP).unwrap();
    let wrong = rt.block_on(h2_connect(
        tcp,
        pki.client("client", &spiffe("mesh-2")),
        "10.77.2.2:8080",
        16,
        7,
    ));
    assert!(wrong.is_err(), "wrong server identity accepted: {wrong:?}");
    drop(py);

    // Python client → h2 crate server (several streams, several connections).
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
    let server = rt.spawn(h2_echo_server(listener, pki.server("mesh-1"), tx));
    for (bytes, seed) in [(BIG, 3u64), (1000, 4)] {
        let mut args = py_cert_args(&pki, "client");
        args.extend([
            "--connect".into(),
            addr.to_string(),
            "--authority".into(),
            "10.77.2.2:8080".into(),
            "--expect-identity".into(),
            spiffe("mesh-1"),
            "--bytes".into(),
            bytes.to_string(),
            "--seed".into(),
            seed.to_string(),
        ]);
        let out = py_client(python, None, &args);
        assert_eq!(out["status"], 200, "{out}");
        assert_eq!(out["end"], "end_stream", "{out}");
        assert_eq!(out["sent_sha256"], pattern_hash(bytes, seed), "{out}");
        assert_eq!(out["received_sha256"], out["sent_sha256"], "{out}");
        assert_eq!(out["received"], bytes, "{out}");
        let report = rt
            .block_on(async { timeout(STEP, rx.recv()).await })
            .unwrap()
            .unwrap();
        assert_eq!(report.method, "CONNECT");
        assert_eq!(report.authority.as_deref(), Some("10.77.2.2:8080"));
        assert_eq!(report.client_identity, [spiffe("client")]);
        assert_eq!(report.bytes, bytes);
        assert_eq!(report.sha256, out["sent_sha256"].as_str().unwrap());
    }
    // The Python client refuses a server that is not the identity it expects.
    let mut args = py_cert_args(&pki, "client");
    args.extend([
        "--connect".into(),
        addr.to_string(),
        "--authority".into(),
        "10.77.2.2:8080".into(),
        "--expect-identity".into(),
        spiffe("mesh-2"),
    ]);
    let out = py_client(python, None, &args);
    assert_eq!(out["error"], "tls", "{out}");
    server.abort();
    let _ = std::fs::remove_dir_all(&dir);
}

/// The h2-crate client against the h2-crate server on loopback: two streams on separate
/// connections, identities checked both ways (no Python needed).
#[test]
fn rust_peers_agree_on_loopback() {
    let dir = std::env::temp_dir().join(format!("ringtun-interop-rs-{}", std::process::id()));
    let pki = Pki::generate(&dir);
    let rt = runtime();
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
    let server = rt.spawn(h2_echo_server(listener, pki.server("mesh-1"), tx));
    let tcp = std::net::TcpStream::connect_timeout(&addr, STEP).unwrap();
    let out = rt
        .block_on(h2_connect(
            tcp,
            pki.client("client", &spiffe("mesh-1")),
            "10.77.2.2:8080",
            BIG,
            5,
        ))
        .expect("h2 client → h2 server");
    assert_eq!(
        (out.status, out.end.as_str()),
        (200, "end_stream"),
        "{out:?}"
    );
    assert_eq!(out.server_identity, [spiffe("mesh-1")]);
    assert_eq!(out.sent_hash, pattern_hash(BIG, 5));
    assert_eq!((out.received, &out.received_hash), (BIG, &out.sent_hash));
    let report = rt
        .block_on(async { timeout(STEP, rx.recv()).await })
        .unwrap()
        .unwrap();
    assert_eq!(report.client_identity, [spiffe("client")]);
    assert_eq!((report.bytes, &report.sha256), (BIG, &out.sent_hash));
    assert_eq!(report.scheme, None);
    server.abort();
    let _ = std::fs::remove_dir_all(&dir);
}
