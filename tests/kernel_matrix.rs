//! Kernel-aware end-to-end checks, written for the kernel matrix (`tests/kernels/`), which runs
//! them inside Debian kernels under qemu, and also run on the host by `cargo test`. Where the
//! other root tests force a driver and assume this host's kernel, these let ringtun choose by
//! itself and compare its choice with an oracle that does not ask ringtun:
//!
//! - the driver: `io_uring_setup(2)` called here, and `kernel.io_uring_disabled`;
//! - the io_uring accept path: a multishot `IORING_OP_ACCEPT` submitted here (kernels before
//!   5.19 refuse it), against ringtun's accepts by mode;
//! - the tunnel TLS: the kernel's own kTLS counters (`/proc/net/tls_stat`, per network
//!   namespace) in the namespaces where the tunnel sockets live.
//!
//! Each test prints what it saw as `RINGTUN-VM-FACT <key> <value>` lines on stderr (shown with
//! `--nocapture`; the VM runner's report reads them into the matrix table).
//!
//! Without root each test prints `SKIPPED (needs root)`; with `CI` set it fails.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use ringtun::redirection::netns::NetNs;
use ringtun::testbed::{
    self, connect_in, exchange_intact, listen_in, MeshNode, Pod, RingtunProcess, Testbed, MESH_PORT,
};
use serde_json::Value;

const BIN: &str = env!("CARGO_BIN_EXE_ringtun");

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

fn fact(key: &str, value: &str) {
    eprintln!("RINGTUN-VM-FACT {key} {}", value.replace('\n', " "));
}

fn probe_json() -> Value {
    let out = Command::new(BIN)
        .args(["probe", "--json"])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "ringtun probe: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).expect("probe JSON")
}

/// Whether this process may make an io_uring, asked of the kernel directly.
fn io_uring_setup_works() -> Result<(), std::io::Error> {
    // struct io_uring_params is 120 bytes; zeroed asks for nothing special.
    let mut params = [0u8; 120];
    // SAFETY: io_uring_setup reads and writes `params` (120 bytes, as the kernel expects).
    let fd = unsafe { libc::syscall(libc::SYS_io_uring_setup, 1u32, params.as_mut_ptr()) };
    if fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: a descriptor we just got and own.
    unsafe { libc::close(fd as i32) };
    Ok(())
}

/// Whether the kernel takes a multishot accept, asked of io_uring directly: one
/// `IORING_OP_ACCEPT` with `IORING_ACCEPT_MULTISHOT` on a loopback listener must post a
/// completion per connection and stay armed (`IORING_CQE_F_MORE`); kernels before 5.19 fail the
/// request with EINVAL (the flag sits in a field they require to be zero).
fn kernel_takes_multishot_accept() -> Result<bool, String> {
    use io_uring::{cqueue, opcode, types, IoUring};
    use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
    const ACCEPT: u64 = 1;
    const DEADLINE: u64 = 2;
    // Declared before the ring, so they outlive it.
    let listener = std::net::TcpListener::bind("127.0.0.1:0").map_err(|e| e.to_string())?;
    let addr = listener.local_addr().map_err(|e| e.to_string())?;
    let limit = types::Timespec::new().sec(10);
    let mut ring = IoUring::new(8).map_err(|e| format!("io_uring_setup: {e}"))?;
    let entries = [
        opcode::AcceptMulti::new(types::Fd(listener.as_raw_fd()))
            .build()
            .user_data(ACCEPT),
        opcode::Timeout::new(&limit).build().user_data(DEADLINE),
    ];
    for e in &entries {
        // SAFETY: the accept names `listener` and the timeout points at `limit`; both outlive
        // the ring, which is dropped (cancelling what is left) before them.
        unsafe { ring.submission().push(e) }.map_err(|_| "submission queue full".to_string())?;
    }
    ring.submit().map_err(|e| format!("io_uring_enter: {e}"))?;
    let clients: Vec<_> = (0..2)
        .map(|_| std::net::TcpStream::connect(addr))
        .collect::<Result<_, _>>()
        .map_err(|e| format!("connect: {e}"))?;
    let mut armed_after = 0;
    loop {
        ring.submit_and_wait(1)
            .map_err(|e| format!("io_uring_enter: {e}"))?;
        for cqe in ring.completion() {
            match (cqe.user_data(), cqe.result()) {
                (DEADLINE, _) => return Err("no accept completion within 10 s".into()),
                (ACCEPT, r) if r == -libc::EINVAL => return Ok(false),
                (ACCEPT, r) if r >= 0 => {
                    // SAFETY: a successful accept completion hands over a new descriptor.
                    drop(unsafe { OwnedFd::from_raw_fd(r) });
                    if !cqueue::more(cqe.flags()) {
                        return Ok(false);
                    }
                    armed_after += 1;
                    if armed_after == clients.len() {
                        return Ok(true);
                    }
                }
                (ACCEPT, r) => return Err(format!("accept failed: errno {}", -r)),
                _ => {}
            }
        }
    }
}

fn io_uring_disabled() -> u64 {
    std::fs::read_to_string("/proc/sys/kernel/io_uring_disabled")
        .ok()
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or(0)
}

/// The kernel's kTLS counters of the namespace `ns` (or of this thread's, for `None`); `None`
/// when that namespace has no `/proc/net/tls_stat` (no kTLS in the kernel).
fn tls_stat(ns: Option<&NetNs>) -> Option<BTreeMap<String, u64>> {
    // /proc/thread-self/net follows the calling thread's namespace (/proc/self would be the
    // main thread's).
    let read = || std::fs::read_to_string("/proc/thread-self/net/tls_stat").ok();
    let text = match ns {
        Some(ns) => ns.enter_for(read).unwrap(),
        None => read(),
    }?;
    Some(
        text.lines()
            .filter_map(|l| {
                let mut it = l.split_whitespace();
                Some((it.next()?.to_string(), it.next()?.parse().ok()?))
            })
            .collect(),
    )
}

fn wait_for(mut f: impl FnMut() -> bool) -> bool {
    let start = Instant::now();
    loop {
        if f() {
            return true;
        }
        if start.elapsed() > Duration::from_secs(20) {
            return false;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn install_rules(tb: &Testbed, pods: &[Pod], config_path: &Path) {
    tb.install_capture(Path::new(BIN), pods, config_path);
}

/// Every flow gone, SIGTERM, exit 0.
fn finish(name: &str, r: RingtunProcess) {
    let open = wait_for(|| r.metric("ringtun_flows_open", &[]).unwrap_or(1.0) == 0.0);
    assert!(
        open,
        "{name}: flows still open at the end:\n{}",
        r.log_text()
    );
    let log = r.log_text();
    let code = r.terminate().unwrap();
    assert_eq!(code, 0, "{name}: exit code after SIGTERM; log:\n{log}");
}

/// Started without `--driver`, ringtun picks the driver the kernel allows — epoll with
/// `kernel.io_uring_disabled=2`, saying why — and serves traffic on it.
#[test]
fn auto_driver_follows_the_kernel_and_serves() {
    if !root_or_skip("auto_driver_follows_the_kernel_and_serves") {
        return;
    }
    let probe = probe_json();
    let disabled = io_uring_disabled();
    let setup = io_uring_setup_works();
    let expected = match &setup {
        Err(_) => "epoll",
        // A ring can be made; the probe may still refuse it for a missing opcode, and then
        // it must say which.
        Ok(()) => probe["driver"]["selected"].as_str().unwrap_or("?"),
    };
    if disabled == 2 {
        assert!(
            setup.is_err(),
            "io_uring_disabled=2 but io_uring_setup succeeded"
        );
    }
    assert_eq!(
        probe["driver"]["selected"].as_str(),
        Some(expected),
        "probe disagrees with io_uring_setup ({setup:?}): {}",
        probe["driver"]
    );

    let tb = Testbed::create("kd").expect("testbed");
    let config = tb.config_yaml(2, "");
    let dir = std::env::temp_dir().join(&tb.prefix);
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("capture.yaml");
    std::fs::write(&path, &config).unwrap();
    install_rules(&tb, &Testbed::captured_pods(), &path);
    let r = RingtunProcess::spawn(Path::new(BIN), &tb, &config, &[]).expect("ringtun starts");

    let metrics = r.metrics().unwrap();
    let drivers: Vec<&str> = metrics
        .lines()
        .filter(|l| l.starts_with("ringtun_driver_info{"))
        .collect();
    assert_eq!(drivers.len(), 2, "one driver line per reactor:\n{metrics}");
    let label = format!("driver=\"{}\"", expected.replace('-', "_"));
    assert!(
        drivers.iter().all(|l| l.contains(&label)),
        "reactors do not all run {expected}: {drivers:?}"
    );
    let log = r.log_text();
    let why = log
        .lines()
        .find_map(|l| l.split_once("using the epoll driver: ").map(|(_, w)| w))
        .map(str::to_string);
    if expected == "epoll" {
        let why = why.unwrap_or_else(|| panic!("epoll without a reason in the log:\n{log}"));
        assert!(!why.trim().is_empty(), "empty reason:\n{log}");
        if disabled == 2 {
            assert!(
                why.contains("io_uring_disabled"),
                "the reason does not name kernel.io_uring_disabled: {why}"
            );
        }
        fact("driver", &format!("epoll: {why}"));
    } else {
        assert!(
            log.contains("using the io_uring driver"),
            "no driver line in the log:\n{log}"
        );
        fact("driver", expected);
    }
    // On io_uring, the accept path the kernel allows: every reactor says which it runs.
    let multishot = if expected == "io_uring" {
        let multishot = kernel_takes_multishot_accept().expect("multishot accept oracle");
        let said = if multishot {
            "io_uring driver: multishot accept"
        } else {
            "io_uring driver: single-shot accept"
        };
        let lines: Vec<&str> = log
            .lines()
            .filter(|l| l.contains("io_uring driver: "))
            .collect();
        assert!(
            lines.len() == 2 && lines.iter().all(|l| l.contains(said)),
            "the kernel {} multishot accept; every reactor must say {said:?}:\n{log}",
            if multishot { "takes" } else { "refuses" }
        );
        Some(multishot)
    } else {
        None
    };

    // It serves on that driver: 1 MiB each way out of the mesh through the capture.
    exchange_intact(&tb, Pod::Ext, SocketAddr::new(Pod::Ext.v4(), 9000), 1 << 20);

    // And that path carried the connection: ringtun's accepts by mode.
    let accepts = |mode: &str| {
        r.metric(
            "ringtun_io_uring_accepts_total",
            &[&format!("mode=\"{mode}\"")],
        )
        .unwrap()
    };
    let (multi, single) = (accepts("multishot"), accepts("single_shot"));
    let path = match multishot {
        Some(true) => "multishot",
        Some(false) => "single_shot",
        None => "epoll",
    };
    fact(
        "accept-path",
        &format!("{path}: {multi} multishot and {single} single-shot io_uring accepts"),
    );
    let carried = match multishot {
        Some(true) => multi >= 1.0 && single == 0.0,
        Some(false) => single >= 1.0 && multi == 0.0,
        None => multi == 0.0 && single == 0.0,
    };
    assert!(
        carried,
        "expected the {path} path to carry the connection: {multi} multishot, {single} \
         single-shot io_uring accepts"
    );
    finish("node", r);
}

/// Two nodes carry an HBONE tunnel: with kTLS in the kernel both ends must install it (the
/// kernel's counters in the client pod's and the server pod's namespaces say so), otherwise
/// both must say user-space TLS and why. 1 MiB each way, SHA-256 equal.
#[test]
fn hbone_tunnel_tls_follows_the_kernel() {
    if !root_or_skip("hbone_tunnel_tls_follows_the_kernel") {
        return;
    }
    let probe = probe_json();
    let ktls = &probe["ktls"];
    let probe_ktls = ktls["tx"] == Value::Bool(true) && ktls["rx"] == Value::Bool(true);
    // The oracle: the kernel registers /proc/net/tls_stat in every namespace once kTLS is
    // loaded (the probe loads the module if it can).
    let kernel_ktls = tls_stat(None).is_some();
    assert_eq!(
        probe_ktls, kernel_ktls,
        "probe says kTLS {probe_ktls}, /proc/net/tls_stat exists: {kernel_ktls}; probe: {ktls}"
    );
    let mode = if kernel_ktls { "ktls" } else { "userspace" };
    let bytes: u64 = std::env::var("RINGTUN_KM_BYTES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(1 << 20);

    let tb = Testbed::create("kh").expect("testbed");
    let dir = std::env::temp_dir().join(&tb.prefix);
    let certs: PathBuf = dir.join("certs");
    let cfg = |n| tb.two_node_config(n, 2, &certs, "");
    testbed::write_certs(Path::new(BIN), &cfg(MeshNode::A), &certs).expect("certs");
    let mut nodes = Vec::new();
    for n in [MeshNode::A, MeshNode::B] {
        let config = cfg(n);
        let path = dir.join(format!("{}-capture.yaml", n.name()));
        std::fs::write(&path, &config).unwrap();
        install_rules(&tb, n.pods(), &path);
        nodes.push(
            RingtunProcess::spawn_mesh_node(Path::new(BIN), &tb, n, &config, &[])
                .expect("ringtun starts"),
        );
    }
    let b = nodes.pop().unwrap();
    let a = nodes.pop().unwrap();

    let took = exchange_intact(
        &tb,
        Pod::Mesh1,
        SocketAddr::new(Pod::Mesh1.v4(), MESH_PORT),
        bytes,
    );
    fact(
        "hbone-exchange",
        &format!("{bytes} bytes each way in {took:?}"),
    );

    for (r, role) in [(&a, "client"), (&b, "server")] {
        let counted = |m: &str| {
            r.metric(
                "ringtun_hbone_tunnels_total",
                &[&format!("role=\"{role}\""), &format!("tls=\"{m}\"")],
            )
            .unwrap()
        };
        let other = if mode == "ktls" { "userspace" } else { "ktls" };
        assert!(
            counted(mode) >= 1.0 && counted(other) == 0.0,
            "{role}: expected every tunnel on {mode}; log:\n{}\nmetrics:\n{}",
            r.log_text(),
            r.metrics().unwrap()
        );
        let log = r.log_text();
        let line = log
            .lines()
            .find_map(|l| {
                l.split_once(&format!("{role} tunnels use "))
                    .map(|(_, m)| m)
            })
            .unwrap_or_else(|| panic!("{role}: no 'tunnels use' line:\n{log}"))
            .to_string();
        if mode == "ktls" {
            assert!(line.starts_with("kTLS ("), "{role}: {line}");
        } else {
            assert!(line.starts_with("user-space TLS: "), "{role}: {line}");
        }
        fact(&format!("tunnel-tls-{role}"), &line);
    }

    if kernel_ktls {
        // Each end's own namespace: the client's tunnel socket lives in the client pod, the
        // server's in mesh-1's (its 15008 listener). Fresh namespaces count from zero.
        for (pod, who) in [(Pod::Client, "client pod"), (Pod::Mesh1, "mesh-1 pod")] {
            let stat = tls_stat(Some(&tb.pod_ns(pod).unwrap()))
                .unwrap_or_else(|| panic!("{who}: no /proc/net/tls_stat"));
            let shown: Vec<String> = stat
                .iter()
                .filter(|(_, v)| **v != 0)
                .map(|(k, v)| format!("{k}={v}"))
                .collect();
            fact(&format!("tls-stat-{}", pod_key(pod)), &shown.join(" "));
            let get = |k: &str| stat.get(k).copied().unwrap_or(0);
            assert!(
                get("TlsTxSw") + get("TlsTxDevice") >= 1
                    && get("TlsRxSw") + get("TlsRxDevice") >= 1,
                "{who}: the kernel counted no kTLS socket: {stat:?}"
            );
            assert_eq!(get("TlsDecryptError"), 0, "{who}: {stat:?}");
        }
    }
    finish("node A", a);
    finish("node B", b);
}

fn pod_key(pod: Pod) -> &'static str {
    match pod {
        Pod::Client => "client",
        Pod::Mesh1 => "mesh1",
        Pod::Mesh2 => "mesh2",
        Pod::Ext => "ext",
    }
}

// ------------------------------------------------------------------ TLS records from a peer
//
// ringtun's own peers never send a KeyUpdate, and its server sends no session tickets, so two
// ringtun nodes never exercise those kTLS control records. Here an independent peer (rustls
// with the `h2` crate) plays the other node.

mod peer {
    use std::path::Path;
    use std::pin::Pin;
    use std::sync::{Arc, Mutex};
    use std::task::{Context, Poll};

    use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
    use rustls::crypto::CryptoProvider;
    use rustls::pki_types::pem::PemObject;
    use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
    use rustls::server::{ParsedCertificate, WebPkiClientVerifier};
    use rustls::{
        ClientConfig, DigitallySignedStruct, RootCertStore, ServerConfig, SignatureScheme,
    };
    use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

    pub fn provider() -> Arc<CryptoProvider> {
        Arc::new(rustls::crypto::ring::default_provider())
    }

    fn roots(ca: &Path) -> Arc<RootCertStore> {
        let mut roots = RootCertStore::empty();
        for c in CertificateDer::pem_file_iter(ca).expect("CA file") {
            roots.add(c.expect("CA PEM")).expect("CA usable as a root");
        }
        Arc::new(roots)
    }

    fn chain(cert: &Path) -> Vec<CertificateDer<'static>> {
        CertificateDer::pem_file_iter(cert)
            .unwrap()
            .collect::<Result<_, _>>()
            .unwrap()
    }

    fn key(key: &Path) -> PrivateKeyDer<'static> {
        PrivateKeyDer::from_pem_file(key).unwrap()
    }

    /// Checks the chain only: the tests care about records, not about which mesh identity
    /// the server has (other tests check that).
    #[derive(Debug)]
    struct ChainOnly {
        roots: Arc<RootCertStore>,
        provider: Arc<CryptoProvider>,
    }

    impl ServerCertVerifier for ChainOnly {
        fn verify_server_cert(
            &self,
            end_entity: &CertificateDer<'_>,
            intermediates: &[CertificateDer<'_>],
            _server_name: &ServerName<'_>,
            _ocsp: &[u8],
            now: UnixTime,
        ) -> Result<ServerCertVerified, rustls::Error> {
            let cert = ParsedCertificate::try_from(end_entity)?;
            rustls::client::verify_server_cert_signed_by_trust_anchor(
                &cert,
                &self.roots,
                intermediates,
                now,
                self.provider.signature_verification_algorithms.all,
            )?;
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

    /// TLS 1.3, ALPN h2, the certificate of `<certs>/default/<sa>`.
    pub fn client(certs: &Path, sa: &str) -> Arc<ClientConfig> {
        let provider = provider();
        let verifier = ChainOnly {
            roots: roots(&certs.join("ca.pem")),
            provider: Arc::clone(&provider),
        };
        let dir = certs.join("default").join(sa);
        let mut cfg = ClientConfig::builder_with_provider(provider)
            .with_protocol_versions(&[&rustls::version::TLS13])
            .unwrap()
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(verifier))
            .with_client_auth_cert(chain(&dir.join("cert.pem")), key(&dir.join("key.pem")))
            .unwrap();
        cfg.alpn_protocols = vec![b"h2".to_vec()];
        cfg.enable_sni = false;
        Arc::new(cfg)
    }

    /// TLS 1.3, ALPN h2, client certificate required; sends `tickets` NewSessionTickets after
    /// each handshake (rustls' default is 2, from an in-memory session cache).
    pub fn server(certs: &Path, sa: &str, tickets: usize) -> Arc<ServerConfig> {
        let provider = provider();
        let verifier = WebPkiClientVerifier::builder_with_provider(
            roots(&certs.join("ca.pem")),
            provider.clone(),
        )
        .build()
        .unwrap();
        let dir = certs.join("default").join(sa);
        let mut cfg = ServerConfig::builder_with_provider(provider)
            .with_protocol_versions(&[&rustls::version::TLS13])
            .unwrap()
            .with_client_cert_verifier(verifier)
            .with_single_cert(chain(&dir.join("cert.pem")), key(&dir.join("key.pem")))
            .unwrap();
        cfg.alpn_protocols = vec![b"h2".to_vec()];
        cfg.send_tls13_tickets = tickets;
        Arc::new(cfg)
    }

    /// A TLS stream the `h2` crate drives while the test keeps a handle to the rustls
    /// connection (to ask for a KeyUpdate between two writes).
    pub struct Shared<S>(pub Arc<Mutex<S>>);

    impl<S: AsyncRead + Unpin> AsyncRead for Shared<S> {
        fn poll_read(
            self: Pin<&mut Self>,
            cx: &mut Context<'_>,
            buf: &mut ReadBuf<'_>,
        ) -> Poll<std::io::Result<()>> {
            Pin::new(&mut *self.0.lock().unwrap()).poll_read(cx, buf)
        }
    }

    impl<S: AsyncWrite + Unpin> AsyncWrite for Shared<S> {
        fn poll_write(
            self: Pin<&mut Self>,
            cx: &mut Context<'_>,
            buf: &[u8],
        ) -> Poll<std::io::Result<usize>> {
            Pin::new(&mut *self.0.lock().unwrap()).poll_write(cx, buf)
        }

        fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
            Pin::new(&mut *self.0.lock().unwrap()).poll_flush(cx)
        }

        fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
            Pin::new(&mut *self.0.lock().unwrap()).poll_shutdown(cx)
        }
    }
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap()
}

/// Sends `data` within the peer's flow-control windows, then END_STREAM if `end`.
async fn send_all(
    send: &mut h2::SendStream<bytes::Bytes>,
    mut data: bytes::Bytes,
    end: bool,
) -> Result<(), String> {
    while !data.is_empty() {
        send.reserve_capacity(data.len());
        match std::future::poll_fn(|cx| send.poll_capacity(cx)).await {
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
        send.send_data(bytes::Bytes::new(), true)
            .map_err(|e| format!("END_STREAM: {e}"))?;
    }
    Ok(())
}

/// Certificates, `node`'s capture rules and `ringtun run` for one node of the two-node mesh.
fn start_node(tag: &str, node: MeshNode) -> (Testbed, PathBuf, RingtunProcess) {
    let tb = Testbed::create(tag).expect("testbed");
    let dir = std::env::temp_dir().join(&tb.prefix);
    let certs = dir.join("certs");
    let config = tb.two_node_config(node, 2, &certs, "");
    testbed::write_certs(Path::new(BIN), &config, &certs).expect("certs");
    let path = dir.join(format!("{}-capture.yaml", node.name()));
    std::fs::write(&path, &config).unwrap();
    install_rules(&tb, node.pods(), &path);
    let r = RingtunProcess::spawn_mesh_node(Path::new(BIN), &tb, node, &config, &[])
        .expect("ringtun starts");
    (tb, certs, r)
}

/// The TLS mode of `role`'s tunnels from ringtun's log line: `Some(true)` kTLS, `Some(false)`
/// user-space, `None` no tunnel yet.
fn logged_ktls(r: &RingtunProcess, role: &str) -> Option<bool> {
    let log = r.log_text();
    let line = log.lines().find_map(|l| {
        l.split_once(&format!("{role} tunnels use "))
            .map(|(_, m)| m.to_string())
    })?;
    fact(&format!("tunnel-tls-{role}"), &line);
    Some(line.starts_with("kTLS"))
}

/// A peer server sends NewSessionTickets after the handshake (rustls' default, as ztunnel's
/// server may): ringtun's client end, on kTLS, receives them as control records on the kernel
/// socket, must skip them and carry every byte. 1 MiB each way through node A's tunnel to an
/// `h2` echo server on mesh-1's 15008; on kTLS the tickets must have been counted.
#[test]
fn new_session_tickets_from_the_peer_do_not_break_the_tunnel() {
    if !root_or_skip("new_session_tickets_from_the_peer_do_not_break_the_tunnel") {
        return;
    }
    let (tb, certs, a) = start_node("kt", MeshNode::A);
    let rt = runtime();
    let listener = listen_in(
        &tb.pod_ns(Pod::Mesh1).unwrap(),
        SocketAddr::new(Pod::Mesh1.v4(), 15008),
    )
    .unwrap();
    listener.set_nonblocking(true).unwrap();
    let tls = peer::server(&certs, "mesh-1", 2);
    let server = rt.spawn(async move {
        let listener = tokio::net::TcpListener::from_std(listener).unwrap();
        let (tcp, _) = listener.accept().await.map_err(|e| e.to_string())?;
        let tls = tokio_rustls::TlsAcceptor::from(tls)
            .accept(tcp)
            .await
            .map_err(|e| format!("TLS: {e}"))?;
        let mut conn = h2::server::Builder::new()
            .initial_window_size(1 << 20)
            .initial_connection_window_size(4 << 20)
            .handshake::<_, bytes::Bytes>(tls)
            .await
            .map_err(|e| format!("HTTP/2 handshake: {e}"))?;
        let (req, mut respond) = conn
            .accept()
            .await
            .ok_or("no stream")?
            .map_err(|e| format!("accept: {e}"))?;
        // The connection makes progress only while polled.
        let driver = tokio::spawn(async move { while conn.accept().await.is_some() {} });
        let mut body = req.into_body();
        let ok = http::Response::builder().status(200).body(()).unwrap();
        let mut send = respond
            .send_response(ok, false)
            .map_err(|e| e.to_string())?;
        let mut echoed = 0u64;
        loop {
            match body.data().await {
                Some(Ok(chunk)) => {
                    let n = chunk.len();
                    echoed += n as u64;
                    send_all(&mut send, chunk, false).await?;
                    let _ = body.flow_control().release_capacity(n);
                }
                Some(Err(e)) => return Err(format!("request body: {e}")),
                None => break,
            }
        }
        send_all(&mut send, bytes::Bytes::new(), true).await?;
        // Let the END_STREAM out before the connection goes.
        tokio::time::sleep(Duration::from_millis(500)).await;
        driver.abort();
        Ok::<u64, String>(echoed)
    });

    const BYTES: u64 = 1 << 20;
    let client = connect_in(
        &tb.pod_ns(Pod::Client).unwrap(),
        SocketAddr::new(Pod::Mesh1.v4(), MESH_PORT),
    )
    .expect("client connects");
    let c = testbed::exchange(client, BYTES, 1)
        .unwrap_or_else(|e| panic!("through node A's tunnel: {e}\n{}", a.log_text()));
    let echoed = rt
        .block_on(async { tokio::time::timeout(Duration::from_secs(30), server).await })
        .expect("the h2 server did not finish")
        .unwrap()
        .unwrap_or_else(|e| panic!("h2 server: {e}\nringtun log:\n{}", a.log_text()));
    assert_eq!(echoed, BYTES, "bytes the server got");
    assert_eq!(c.received, BYTES, "echo bytes the client got");
    assert_eq!(
        testbed::hex(&c.received_hash),
        testbed::hex(&c.sent_hash),
        "echo differs"
    );
    let ktls = logged_ktls(&a, "client").expect("no 'client tunnels use' line");
    let tickets = a
        .metric(
            "ringtun_hbone_tls_records_total",
            &["kind=\"new_session_ticket\""],
        )
        .unwrap();
    fact("new-session-tickets-counted", &format!("{tickets}"));
    if ktls {
        assert!(
            tickets >= 1.0,
            "kTLS client tunnel: the server's NewSessionTickets were never seen as records:\n{}",
            a.metrics().unwrap()
        );
    }
    finish("node A", a);
}

/// What the upstream in mesh-1 saw of one connection.
struct Upstream {
    bytes: u64,
    sha256: String,
    /// "eof", or the error that ended the stream.
    end: String,
}

/// Accepts one connection on `listener`, counts (into `got`) and hashes what arrives until
/// the stream ends.
fn upstream_once(
    listener: std::net::TcpListener,
    got: std::sync::Arc<std::sync::atomic::AtomicU64>,
) -> std::thread::JoinHandle<Upstream> {
    std::thread::spawn(move || {
        use sha2::Digest;
        use std::io::Read;
        let (mut s, _) = listener.accept().unwrap();
        s.set_read_timeout(Some(Duration::from_secs(60))).unwrap();
        let mut h = sha2::Sha256::new();
        let mut buf = vec![0u8; 65536];
        let mut bytes = 0u64;
        let end = loop {
            match s.read(&mut buf) {
                Ok(0) => break "eof".to_string(),
                Ok(n) => {
                    h.update(&buf[..n]);
                    bytes += n as u64;
                    got.fetch_add(n as u64, std::sync::atomic::Ordering::SeqCst);
                }
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                Err(e) => break format!("{e} ({:?})", e.kind()),
            }
        };
        let digest: [u8; 32] = h.finalize().into();
        Upstream {
            bytes,
            sha256: testbed::hex(&digest),
            end,
        }
    })
}

/// An HBONE client (rustls + h2) from the client pod to mesh-1's 15008: CONNECT mesh-1:8080,
/// sends `part1`; once `got` (the upstream's count) reaches its length, asks rustls for a
/// KeyUpdate if `key_update`; sends `part2` and END_STREAM; reads the response stream to its
/// end. Returns how part 2 and the response stream ended.
fn hbone_client(
    tb: &Testbed,
    certs: &Path,
    part1: Vec<u8>,
    part2: Vec<u8>,
    key_update: bool,
    got: std::sync::Arc<std::sync::atomic::AtomicU64>,
) -> Result<String, String> {
    use std::sync::atomic::Ordering;
    use std::sync::{Arc, Mutex};
    let tcp = connect_in(
        &tb.pod_ns(Pod::Client).unwrap(),
        SocketAddr::new(Pod::Mesh1.v4(), 15008),
    )
    .map_err(|e| format!("client pod cannot reach mesh-1:15008: {e}"))?;
    tcp.set_nonblocking(true).unwrap();
    let client_tls = peer::client(certs, "client");
    let first = part1.len() as u64;
    runtime().block_on(async move {
        let tcp = tokio::net::TcpStream::from_std(tcp).unwrap();
        let tls = tokio_rustls::TlsConnector::from(client_tls)
            .connect(
                rustls::pki_types::ServerName::IpAddress(Pod::Mesh1.v4().into()),
                tcp,
            )
            .await
            .map_err(|e| format!("TLS: {e}"))?;
        let shared = Arc::new(Mutex::new(tls));
        let (send_req, conn) = h2::client::Builder::new()
            .initial_window_size(1 << 20)
            .handshake::<_, bytes::Bytes>(peer::Shared(shared.clone()))
            .await
            .map_err(|e| format!("HTTP/2: {e}"))?;
        let driver = tokio::spawn(conn);
        let mut send_req = send_req.ready().await.map_err(|e| e.to_string())?;
        let req = http::Request::builder()
            .method(http::Method::CONNECT)
            .uri(format!("{}:{MESH_PORT}", Pod::Mesh1.v4()))
            .body(())
            .unwrap();
        let (resp, mut send) = send_req
            .send_request(req, false)
            .map_err(|e| e.to_string())?;
        let resp = resp.await.map_err(|e| format!("CONNECT: {e}"))?;
        if resp.status() != 200 {
            return Err(format!("CONNECT answered {}", resp.status()));
        }
        send_all(&mut send, part1.into(), false).await?;
        let start = Instant::now();
        while got.load(Ordering::SeqCst) < first {
            if start.elapsed() > Duration::from_secs(30) {
                return Err(format!(
                    "the upstream got only {} bytes of part 1",
                    got.load(Ordering::SeqCst)
                ));
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        if key_update {
            // Queued in rustls; the next write sends the KeyUpdate record, then part 2 under
            // the new keys.
            shared
                .lock()
                .unwrap()
                .get_mut()
                .1
                .refresh_traffic_keys()
                .map_err(|e| format!("KeyUpdate: {e}"))?;
        }
        let sent2 = send_all(&mut send, part2.into(), true).await;
        let mut body = resp.into_body();
        let end = tokio::time::timeout(Duration::from_secs(30), async {
            loop {
                match body.data().await {
                    Some(Ok(c)) => {
                        let _ = body.flow_control().release_capacity(c.len());
                    }
                    Some(Err(e)) => break format!("error: {e}"),
                    None => break "end_stream".to_string(),
                }
            }
        })
        .await
        .unwrap_or_else(|_| "no end within 30 s".into());
        driver.abort();
        Ok(format!("part 2 sent: {sent2:?}; response stream: {end}"))
    })
}

/// The peer (an HBONE client) sends a TLS KeyUpdate in the middle of a stream. With user-space
/// TLS, or a kernel that can rekey, every byte arrives. With kTLS on a kernel that cannot
/// rekey, ringtun must retire the tunnel with a clear error: the bytes before the KeyUpdate
/// arrive intact, nothing after it is delivered, and the upstream sees a reset, never a clean
/// end (which would make a cut stream look complete). Either way ringtun then serves a new
/// tunnel.
#[test]
fn peer_key_update_never_corrupts_or_truncates_silently() {
    if !root_or_skip("peer_key_update_never_corrupts_or_truncates_silently") {
        return;
    }
    use std::sync::atomic::AtomicU64;
    use std::sync::Arc;

    let (tb, certs, b) = start_node("ku", MeshNode::B);
    let mesh1 = SocketAddr::new(Pod::Mesh1.v4(), MESH_PORT);
    const PART: usize = 256 * 1024;
    let mut pattern = testbed::Pattern::new(1);
    let (mut part1, mut part2) = (vec![0u8; PART], vec![0u8; PART]);
    pattern.fill(&mut part1);
    pattern.fill(&mut part2);
    let hash_of = |parts: &[&[u8]]| {
        use sha2::Digest;
        let mut h = sha2::Sha256::new();
        for p in parts {
            h.update(p);
        }
        let d: [u8; 32] = h.finalize().into();
        testbed::hex(&d)
    };

    let got = Arc::new(AtomicU64::new(0));
    let listener = listen_in(&tb.pod_ns(Pod::Mesh1).unwrap(), mesh1).unwrap();
    let upstream = upstream_once(listener.try_clone().unwrap(), got.clone());
    let client = hbone_client(&tb, &certs, part1.clone(), part2.clone(), true, got);
    let client =
        client.unwrap_or_else(|e| panic!("HBONE client: {e}\nringtun log:\n{}", b.log_text()));
    fact("key-update-client", &client);
    let up = upstream.join().unwrap();
    fact(
        "key-update-upstream",
        &format!("{} bytes, ended with {}", up.bytes, up.end),
    );
    let ktls = logged_ktls(&b, "server").expect("no 'server tunnels use' line");
    let rekey = probe_json()["ktls"]["rekey"]
        .as_str()
        .unwrap_or("?")
        .to_string();
    let log = b.log_text();
    let followed =
        up.bytes == 2 * PART as u64 && up.sha256 == hash_of(&[&part1, &part2]) && up.end == "eof";
    let retired = up.bytes == PART as u64
        && up.sha256 == hash_of(&[&part1])
        && up.end != "eof"
        && log.contains("KeyUpdate");
    let mode = if ktls {
        format!("kTLS (rekey {rekey})")
    } else {
        "user-space TLS".to_string()
    };
    fact(
        "key-update-outcome",
        &format!(
            "{mode}: {}",
            if followed {
                "followed, every byte delivered".to_string()
            } else if retired {
                format!(
                    "tunnel retired: {}",
                    log.lines()
                        .find(|l| l.contains("KeyUpdate"))
                        .and_then(|l| l.split_once(": ").map(|(_, m)| m))
                        .unwrap_or("")
                )
            } else {
                "NEITHER".to_string()
            }
        ),
    );
    // Following the new keys (user-space TLS, or a kernel that can rekey) delivers everything
    // and ends cleanly. Retiring delivers exactly part 1, intact, then a reset (a clean end
    // would make the cut stream look complete), with the KeyUpdate named in the log. Where
    // kTLS cannot rekey, only retiring is possible.
    assert!(
        followed || retired,
        "after a KeyUpdate on {mode} the upstream got {} bytes (sha256 {}), ended with {}:          neither every byte with a clean end, nor exactly part 1 then a reset with the          KeyUpdate logged; log:\n{log}",
        up.bytes,
        up.sha256,
        up.end
    );
    if ktls && rekey != "supported" {
        assert!(
            retired,
            "kTLS without rekey cannot have followed the KeyUpdate"
        );
    } else {
        // User-space TLS, or a kernel that takes a second key: followed, and since the peer
        // asked (rustls requests an update), our own key was updated in answer.
        assert!(
            followed,
            "{mode}: the KeyUpdate was not followed; log:\n{log}"
        );
        let updates = |kind: &str| {
            b.metric(
                "ringtun_hbone_tls_key_updates_total",
                &[&format!("kind=\"{kind}\"")],
            )
            .unwrap()
        };
        let (followed_n, sent_n) = (updates("followed"), updates("sent"));
        fact(
            "key-update-counted",
            &format!("followed {followed_n}, sent {sent_n}"),
        );
        assert!(
            followed_n >= 1.0 && sent_n >= 1.0,
            "{mode}: key updates followed {followed_n}, sent {sent_n}"
        );
        if ktls {
            // kTLS stayed on: the kernel counted the new keys on the node's sockets.
            if let Some(stat) = tls_stat(Some(&tb.pod_ns(Pod::Mesh1).unwrap())) {
                fact("key-update-tls-stat", &format!("{stat:?}"));
                let n = |k: &str| stat.get(k).copied().unwrap_or(0);
                assert!(
                    n("TlsRxRekeyOk") >= 1 && n("TlsTxRekeyOk") >= 1,
                    "the kernel counted no rekey: {stat:?}"
                );
            }
        }
    }
    if retired {
        let counted = b
            .metric("ringtun_hbone_tls_records_total", &["kind=\"key_update\""])
            .unwrap();
        fact("key-update-records-counted", &format!("{counted}"));
    }

    // ringtun still serves: a new tunnel (no KeyUpdate) carries a whole stream.
    let got = Arc::new(AtomicU64::new(0));
    let upstream = upstream_once(listener, got.clone());
    let small = |seed| {
        let mut v = vec![0u8; 64 * 1024];
        testbed::Pattern::new(seed).fill(&mut v);
        v
    };
    let (a1, a2) = (small(3), small(4));
    let after = hbone_client(&tb, &certs, a1.clone(), a2.clone(), false, got)
        .unwrap_or_else(|e| panic!("after the KeyUpdate: {e}\nringtun log:\n{}", b.log_text()));
    let up = upstream.join().unwrap();
    assert_eq!(
        (up.bytes, up.sha256, up.end.as_str()),
        ((a1.len() + a2.len()) as u64, hash_of(&[&a1, &a2]), "eof"),
        "a new tunnel after the KeyUpdate ({after}); log:\n{}",
        b.log_text()
    );
    finish("node B", b);
}

// ------------------------------------------------------------------ retirement, byte by byte

/// Where `got` first differs from `want`, and what the bytes there are instead: a repeat of
/// earlier stream bytes, later ones (a gap), or bytes from elsewhere. `None` when equal.
fn first_difference(want: &[u8], got: &[u8]) -> Option<String> {
    let n = want.len().min(got.len());
    let at = (0..n).find(|&i| want[i] != got[i]);
    let at = match at {
        Some(at) => at,
        None if want.len() == got.len() => return None,
        None => {
            return Some(format!(
                "{} bytes expected, {} received; equal up to the shorter",
                want.len(),
                got.len()
            ))
        }
    };
    let probe = &got[at..(at + 32).min(got.len())];
    let found = want
        .windows(probe.len())
        .position(|w| w == probe)
        .map(|from| {
            if from < at {
                format!(
                    "they are the stream's bytes from offset {from}: {} bytes repeated",
                    at - from
                )
            } else {
                format!(
                    "they are the stream's bytes from offset {from}: {} bytes skipped",
                    from - at
                )
            }
        })
        .unwrap_or_else(|| "they are not from the stream".to_string());
    let run = (at..n).take_while(|&i| want[i] != got[i]).count();
    let hex = |b: &[u8]| b.iter().map(|x| format!("{x:02x}")).collect::<String>();
    Some(format!(
        "first difference at offset {at} of {} (received {}); {found}; {run} bytes differ from \
         there on before the next match; expected {}…, received {}…",
        want.len(),
        got.len(),
        hex(&want[at..(at + 16).min(want.len())]),
        hex(&got[at..(at + 16).min(got.len())]),
    ))
}

/// With a tiny record budget the tunnels update their keys (where both ends follow a TLS
/// KeyUpdate: user-space TLS, or kTLS on a kernel that takes a second key) or retire (where
/// not) in the middle of streams, again and again. Every byte must arrive, in order, in both
/// directions; on failure the message says where the first wrong byte is and what it is
/// instead (the kernel matrix found such failures).
///
/// `payload`: `None` runs what the configuration says (the default: spliced payload on kTLS);
/// `Some(false)` pins `node.hbone.zero_copy: false`, the copied-payload path on kTLS.
fn record_budget_retirement_keeps_every_byte_in_order(driver: &str, zero_copy: Option<bool>) {
    let tb = Testbed::create(&format!(
        "kr{}{}",
        &driver[..1],
        if zero_copy == Some(false) { "c" } else { "" }
    ))
    .expect("testbed");
    let dir = std::env::temp_dir().join(&tb.prefix);
    let certs: PathBuf = dir.join("certs");
    // RINGTUN_KM_RECORD_BUDGET: another budget, to tell retirement bugs from others.
    let budget: u64 = std::env::var("RINGTUN_KM_RECORD_BUDGET")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(64);
    // RINGTUN_KM_KTLS=off: the same with user-space TLS, to tell kTLS bugs from others.
    // RINGTUN_KM_KTLS_A / _B: per node (A sends client → server, B server → client).
    let env = |k: &str| std::env::var(k).ok();
    let all = env("RINGTUN_KM_KTLS").unwrap_or_else(|| "auto".into());
    let ktls_a = env("RINGTUN_KM_KTLS_A").unwrap_or_else(|| all.clone());
    let ktls_b = env("RINGTUN_KM_KTLS_B").unwrap_or_else(|| all.clone());
    // RINGTUN_KM_ZERO_COPY(_A|_B)=true|false: node.hbone.zero_copy (spliced kTLS payload).
    let zc_all = env("RINGTUN_KM_ZERO_COPY").or_else(|| zero_copy.map(|z| z.to_string()));
    let zc_a = env("RINGTUN_KM_ZERO_COPY_A").or_else(|| zc_all.clone());
    let zc_b = env("RINGTUN_KM_ZERO_COPY_B").or_else(|| zc_all.clone());
    let shown = |z: &Option<String>| z.clone().unwrap_or_else(|| "default".into());
    let ktls = format!(
        "A {ktls_a} (zero copy {}), B {ktls_b} (zero copy {})",
        shown(&zc_a),
        shown(&zc_b)
    );
    let extra = |n| {
        let (k, z) = if n == MeshNode::A {
            (&ktls_a, &zc_a)
        } else {
            (&ktls_b, &zc_b)
        };
        let z = z
            .as_ref()
            .map(|z| format!(", zero_copy: {z}"))
            .unwrap_or_default();
        format!("  hbone: {{ktls_record_budget: {budget}, ktls: {k}{z}}}\n")
    };
    let cfg = |n| tb.two_node_config(n, 2, &certs, &extra(n));
    testbed::write_certs(Path::new(BIN), &cfg(MeshNode::A), &certs).expect("certs");
    let mut nodes = Vec::new();
    for n in [MeshNode::A, MeshNode::B] {
        let config = cfg(n);
        let path = dir.join(format!("{}-capture.yaml", n.name()));
        std::fs::write(&path, &config).unwrap();
        install_rules(&tb, n.pods(), &path);
        nodes.push(
            RingtunProcess::spawn_mesh_node(Path::new(BIN), &tb, n, &config, &["--driver", driver])
                .expect("ringtun starts"),
        );
    }
    let b = nodes.pop().unwrap();
    let a = nodes.pop().unwrap();

    const BYTES: usize = 2 << 20;
    let pattern = |seed| {
        let mut v = vec![0u8; BYTES];
        testbed::Pattern::new(seed).fill(&mut v);
        v
    };
    let (up, down) = (pattern(1), pattern(2));
    let mut problems = Vec::new();
    for round in 0..4 {
        let listener = listen_in(
            &tb.pod_ns(Pod::Mesh1).unwrap(),
            SocketAddr::new(Pod::Mesh1.v4(), MESH_PORT),
        )
        .unwrap();
        let down_c = down.clone();
        let server = std::thread::spawn(move || {
            use std::io::{Read, Write};
            let (s, _) = listener.accept()?;
            s.set_read_timeout(Some(Duration::from_secs(60)))?;
            let mut w = s.try_clone()?;
            let writer = std::thread::spawn(move || {
                w.write_all(&down_c)?;
                w.shutdown(std::net::Shutdown::Write)
            });
            let mut got = Vec::with_capacity(BYTES);
            (&s).read_to_end(&mut got)?;
            writer.join().unwrap()?;
            Ok::<_, std::io::Error>(got)
        });
        let c = connect_in(
            &tb.pod_ns(Pod::Client).unwrap(),
            SocketAddr::new(Pod::Mesh1.v4(), MESH_PORT),
        )
        .expect("client connects");
        let up_c = up.clone();
        let mut w = c.try_clone().unwrap();
        let writer = std::thread::spawn(move || {
            use std::io::Write;
            w.write_all(&up_c)?;
            w.shutdown(std::net::Shutdown::Write)
        });
        let mut got_down = Vec::with_capacity(BYTES);
        let read = {
            use std::io::Read;
            (&c).read_to_end(&mut got_down)
        };
        let wrote = writer.join().unwrap();
        let got_up = server.join().unwrap();
        if let Err(e) = &read {
            problems.push(format!(
                "round {round}: client read ended with {e} after {} bytes",
                got_down.len()
            ));
        }
        if let Err(e) = &wrote {
            problems.push(format!("round {round}: client write: {e}"));
        }
        if let Some(d) = first_difference(&down, &got_down) {
            problems.push(format!("round {round}: server → client: {d}"));
        }
        match got_up {
            Ok(got) => {
                if let Some(d) = first_difference(&up, &got) {
                    problems.push(format!("round {round}: client → server: {d}"));
                }
            }
            Err(e) => problems.push(format!("round {round}: server side: {e}")),
        }
    }
    let handshakes = a
        .metric("ringtun_hbone_handshakes_total", &["role=\"client\""])
        .unwrap();
    // Which path the payload took on each node, from its own counters: on a kTLS tunnel with
    // zero-copy (the default) most of it must have been spliced both ways, otherwise none.
    let mut paths = Vec::new();
    for (name, node, zc) in [("A", &a, &zc_a), ("B", &b, &zc_b)] {
        let bytes = |direction: &str, path: &str| {
            node.metric(
                "ringtun_hbone_payload_bytes_total",
                &[
                    &format!("direction=\"{direction}\""),
                    &format!("path=\"{path}\""),
                ],
            )
            .unwrap()
                + 0.0 // an empty sum is -0.0
        };
        let ktls_tunnels = node
            .metric("ringtun_hbone_tunnels_total", &["tls=\"ktls\""])
            .unwrap();
        let all_ktls = ktls_tunnels > 0.0
            && ktls_tunnels == node.metric("ringtun_hbone_tunnels_total", &[]).unwrap();
        let zero_copy = zc.as_deref() != Some("false");
        for direction in ["sent", "received"] {
            let (spliced, copied) = (bytes(direction, "spliced"), bytes(direction, "copied"));
            paths.push(format!(
                "{name} {direction} {spliced} spliced + {copied} copied"
            ));
            if all_ktls && zero_copy {
                if spliced < copied || spliced + copied < BYTES as f64 * 4.0 {
                    problems.push(format!(
                        "node {name}: zero-copy on kTLS, yet {direction} payload was \
                         {spliced} bytes spliced and {copied} copied"
                    ));
                }
            } else if spliced > 0.0 {
                problems.push(format!(
                    "node {name}: {spliced} {direction} payload bytes spliced without \
                     zero-copy on kTLS (kTLS tunnels {ktls_tunnels}, zero_copy {zc:?})"
                ));
            }
        }
    }
    fact(
        "record-budget-rounds",
        &format!(
            "{driver}: 4 rounds of 2 MiB each way, record budget {budget}, kTLS {ktls}, \
             {handshakes} client handshakes, payload {}, {} problems",
            paths.join(", "),
            problems.len()
        ),
    );
    for p in &problems {
        fact("record-budget-problem", &format!("{driver}: {p}"));
    }
    assert!(
        problems.is_empty(),
        "{driver}: bytes lost, reordered or corrupted while tunnels retire:\n{}\nnode A log:\n{}\nnode B log:\n{}",
        problems.join("\n"),
        a.log_text(),
        b.log_text()
    );
    // At the budget a node updates its own key where both ends follow a KeyUpdate (user-space
    // TLS always; kTLS where the kernel takes a second key), else its tunnel retires.
    let rekey = probe_json()["ktls"]["rekey"].as_str() == Some("supported");
    let follows = |node: &RingtunProcess| {
        let ktls = node
            .metric("ringtun_hbone_tunnels_total", &["tls=\"ktls\""])
            .unwrap();
        ktls == 0.0 || rekey
    };
    let both = follows(&a) && follows(&b);
    let updates = |node: &RingtunProcess, kind: &str| {
        node.metric(
            "ringtun_hbone_tls_key_updates_total",
            &[&format!("kind=\"{kind}\"")],
        )
        .unwrap()
            + 0.0
    };
    let (a_sent, b_sent) = (updates(&a, "sent"), updates(&b, "sent"));
    let (a_followed, b_followed) = (updates(&a, "followed"), updates(&b, "followed"));
    fact(
        "record-budget-key-updates",
        &format!(
            "{driver}: kTLS rekey {rekey}; A sent {a_sent} followed {a_followed}, \
             B sent {b_sent} followed {b_followed}, client handshakes {handshakes}"
        ),
    );
    let retired = |node: &RingtunProcess| {
        node.metric(
            "ringtun_hbone_tunnels_closed_total",
            &["reason=\"record_budget\""],
        )
        .unwrap()
            + 0.0
    };
    if budget == 64 {
        if both {
            // 8 MiB each way in 16 KiB records at 64 records per key, over one tunnel per
            // reactor: several updates each way, each followed by the other end, and no
            // tunnel retired.
            let tunnel_lines = |node: &RingtunProcess| {
                node.log_text()
                    .lines()
                    .filter(|l| l.contains("tunnel") || l.contains("key"))
                    .collect::<Vec<_>>()
                    .join("\n")
            };
            assert!(
                a_sent >= 4.0 && b_sent >= 4.0,
                "{driver}: both ends follow, yet A sent {a_sent} and B {b_sent} key updates\n\
                 node A:\n{}\nnode B:\n{}",
                tunnel_lines(&a),
                tunnel_lines(&b)
            );
            assert_eq!(
                (a_sent, b_sent),
                (b_followed, a_followed),
                "{driver}: key updates sent and followed differ"
            );
            assert_eq!(
                (retired(&a), retired(&b)),
                (0.0, 0.0),
                "{driver}: a tunnel retired although keys update"
            );
        } else {
            assert!(
                retired(&a) + retired(&b) >= 1.0,
                "{driver}: the budget never retired a tunnel"
            );
        }
    }
    finish("node A", a);
    finish("node B", b);
}

#[test]
fn record_budget_retirement_keeps_every_byte_in_order_io_uring() {
    if root_or_skip("record_budget_retirement_keeps_every_byte_in_order_io_uring") {
        record_budget_retirement_keeps_every_byte_in_order("io-uring", None);
    }
}

#[test]
fn record_budget_retirement_keeps_every_byte_in_order_epoll() {
    if root_or_skip("record_budget_retirement_keeps_every_byte_in_order_epoll") {
        record_budget_retirement_keeps_every_byte_in_order("epoll", None);
    }
}

/// The same with kTLS copying the payload through user space (`zero_copy: false`), the path a
/// user picks to rule the splice path out.
#[test]
fn record_budget_retirement_keeps_every_byte_in_order_copied_payload() {
    if root_or_skip("record_budget_retirement_keeps_every_byte_in_order_copied_payload") {
        record_budget_retirement_keeps_every_byte_in_order("epoll", Some(false));
    }
}

#[test]
fn first_difference_names_repeats_gaps_and_foreign_bytes() {
    let mut want = vec![0u8; 4096];
    testbed::Pattern::new(9).fill(&mut want);
    assert_eq!(first_difference(&want, &want), None);
    let mut repeat = want[..2000].to_vec();
    repeat.extend_from_slice(&want[1000..]);
    let d = first_difference(&want, &repeat).unwrap();
    assert!(
        d.contains("offset 2000") && d.contains("1000 bytes repeated"),
        "{d}"
    );
    let mut gap = want[..2000].to_vec();
    gap.extend_from_slice(&want[2500..]);
    let d = first_difference(&want, &gap).unwrap();
    assert!(d.contains("500 bytes skipped"), "{d}");
    let mut foreign = want.clone();
    foreign[3000..3040].fill(0);
    let d = first_difference(&want, &foreign).unwrap();
    assert!(
        d.contains("offset 3000") && d.contains("not from the stream"),
        "{d}"
    );
}
