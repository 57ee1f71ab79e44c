//! The budget attacks of issue 11, as root, against the two-node mesh: each test runs an
//! attack on node B while a good client keeps exchanging bytes through A → tunnel → B, and
//! asserts that the good client is served throughout (every exchange intact), that the attack
//! hits its budget (the counters say so), and that both nodes end at their descriptor
//! baselines with exit 0.
//!
//! - a handshake flood: thousands of idle TCP connections to port 15008 from many addresses
//!   (500 held at once, each re-opened as soon as B cuts it), while a newcomer still gets its
//!   tunnel and plaintext to B's pods is served;
//! - parked authenticated tunnels: a certificate holder opens tunnel after tunnel and idles,
//!   bounded per peer; and with the flow budget full, idle tunnels give their place up;
//! - slow clients against the readiness port: idle connections and a one-byte-at-a-time
//!   trickler must not delay the probe (here the probe is the client that must be served).
//!
//! The mesh is `testbed::two_nodes`; node B gets the small budgets under test.
//!
//! Without root each test prints `SKIPPED (needs root)`; with `CI` set it fails.

use std::io::{self, Read, Write};
use std::net::{IpAddr, SocketAddr, TcpStream};
use std::path::Path;
use std::process::Command;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use ringtun::redirection::netns::NetNs;
use ringtun::testbed::two_nodes::{wait_for, Mesh};
use ringtun::testbed::{self, connect_in, root_or_skip, MeshNode, Pod, MESH_PORT};

const BIN: &str = env!("CARGO_BIN_EXE_ringtun");

/// The two-node mesh with `extra_b` (YAML under `node:`) in node B's config only.
fn mesh(driver: &str, extra_b: &str) -> Mesh {
    Mesh::start_with(Path::new(BIN), driver, "", |n, config| match n {
        MeshNode::A => config,
        MeshNode::B => config.replacen("workloads:\n", &format!("{extra_b}workloads:\n"), 1),
    })
}

fn ns(m: &Mesh, pod: Pod) -> NetNs {
    m.tb.pod_ns(pod).unwrap()
}

fn mesh1_hbone() -> SocketAddr {
    SocketAddr::new(Pod::Mesh1.v4(), 15008)
}

#[test]
fn a_handshake_flood_does_not_lock_out_served_traffic() {
    if !root_or_skip("a_handshake_flood_does_not_lock_out_served_traffic") {
        return;
    }
    // Small budgets so the flood is quick: 64 flows, 32 handshakes, 4 per source, per reactor.
    // The connect timeout is long (20 s) so that a cut before 10 s can only be the handshake
    // timeout's.
    let b = "  limits: {max_flows_per_reactor: 64, max_handshakes_per_reactor: 32, \
             max_handshakes_per_source: 4}\n  timeouts: {connect: 20s, handshake: 2s}\n";
    let m = mesh("io-uring", b);
    // The handshake timeout of its own: an idle connection is cut after 2 s.
    let lone = idle_connection(&m, Pod::Ext.v4(), mesh1_hbone()).expect("connects");
    let opened = Instant::now();
    assert!(
        wait_for(|| is_closed(&lone)),
        "an idle connection to 15008 outlived the handshake timeout"
    );
    let took = opened.elapsed();
    assert!(
        took >= Duration::from_millis(1900) && took < Duration::from_secs(10),
        "closed after {took:?}: not the 2 s handshake timeout"
    );
    drop(lone);

    let good = GoodClient::start(&m, Pod::Mesh1, MESH_PORT, 256 << 10);
    let sources = ext_sources(&m, 20);
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    // 20 addresses × 25 idle connections, each re-opened as soon as B closes it.
    let flood = {
        let stop = stop.clone();
        let ns = ns(&m, Pod::Ext);
        std::thread::spawn(move || {
            let mut conns: Vec<Option<TcpStream>> = (0..500).map(|_| None).collect();
            let mut opened = 0u64;
            while !stop.load(std::sync::atomic::Ordering::SeqCst) {
                for (i, slot) in conns.iter_mut().enumerate() {
                    if slot.as_ref().is_some_and(|s| !is_closed(s)) {
                        continue;
                    }
                    let source = sources[i % sources.len()];
                    let to = mesh1_hbone();
                    let made = ns.enter_for(|| -> std::io::Result<TcpStream> {
                        use std::os::fd::AsRawFd;
                        let fd = ringtun::sys::socket::tcp_socket(&to)?;
                        ringtun::sys::socket::bind(fd.as_raw_fd(), SocketAddr::new(source, 0))?;
                        let s = TcpStream::from(fd);
                        s.set_nonblocking(false)?;
                        ringtun::sys::socket::connect(s.as_raw_fd(), to)?;
                        Ok(s)
                    });
                    if let Ok(Ok(s)) = made {
                        opened += 1;
                        *slot = Some(s);
                    }
                }
                std::thread::sleep(Duration::from_millis(50));
            }
            opened
        })
    };
    // While the flood runs: the good client's exchanges go on, a plaintext connection from
    // outside the mesh to mesh-2 (B's 15006) is served, and B's handshakes stay in budget.
    let start = Instant::now();
    let mut most_handshakes = 0.0f64;
    let before = good.completed();
    while start.elapsed() < Duration::from_secs(8) {
        let h = m
            .b()
            .metric("ringtun_hbone_handshakes_in_progress", &[])
            .unwrap();
        most_handshakes = most_handshakes.max(h);
        std::thread::sleep(Duration::from_millis(200));
    }
    plaintext_exchange_to_mesh2(&m);
    // A client holding no handshake gets in with the budget full (the address holding the
    // most gives up its oldest): a certificate holder on an address of its own completes a
    // tunnel and is greeted with B's SETTINGS.
    let mut fresh = park_tunnel(&m, mesh2_certificate(&m)).expect("a handshake during the flood");
    assert!(
        server_settings(&mut fresh),
        "a newcomer's tunnel was not accepted during the flood"
    );
    drop(fresh);
    let during = good.completed() - before;
    stop.store(true, std::sync::atomic::Ordering::SeqCst);
    let opened = flood.join().unwrap();
    let (total, longest) = good.finish();
    eprintln!(
        "handshake flood: {opened} connections opened; good client: {during} exchanges during \
         the flood ({total} in all, longest {longest:?}); at most {most_handshakes} handshakes"
    );
    assert!(opened >= 500, "the flood opened only {opened} connections");
    assert!(
        during >= 3,
        "the good client completed only {during} exchanges during the flood"
    );
    assert!(
        most_handshakes <= 64.0,
        "{most_handshakes} handshakes in progress on B"
    );
    let shed = m
        .b()
        .metric("ringtun_hbone_tunnels_shed_total", &["reason=\"handshake_"])
        .unwrap();
    assert!(
        shed >= 100.0,
        "only {shed} handshakes refused by budget:\n{}",
        m.b().metrics().unwrap()
    );
    let flow_limit = m
        .b()
        .metric(
            "ringtun_connection_failures_total",
            &["reason=\"flow_limit\""],
        )
        .unwrap();
    assert_eq!(
        flow_limit, 0.0,
        "served traffic hit the flow limit during the flood"
    );
    let logged = m
        .b()
        .log_text()
        .lines()
        .filter(|l| l.contains("handshakes in progress"))
        .count();
    assert!(
        logged <= 40,
        "{logged} log lines for refused handshakes (not rate-limited)"
    );
    // The flood's connections are gone once the handshake timeout passed.
    assert!(wait_for(|| m
        .b()
        .metric("ringtun_hbone_handshakes_in_progress", &[])
        .unwrap()
        == 0.0));
    m.finish();
}

/// From the ext pod (outside the mesh) to mesh-2:8081, captured by TPROXY to B's 15006.
fn plaintext_exchange_to_mesh2(m: &Mesh) {
    let to = SocketAddr::new(Pod::Mesh2.v4(), 8081);
    let listener = m.listen(Pod::Mesh2, 8081);
    let server = ringtun::testbed::serve_exchanges(listener, 1, 64 << 10, 2);
    let c = ringtun::testbed::connect_in(&ns(m, Pod::Ext), to).expect("plaintext connect");
    let x = ringtun::testbed::exchange(c, 64 << 10, 1).expect("plaintext exchange");
    let s = server.join().unwrap().expect("server")[0];
    assert_eq!(
        (x.received, s.received),
        (64 << 10, 64 << 10),
        "plaintext bytes lost"
    );
    assert_eq!(x.sent_hash, s.received_hash);
}

/// A TLS client config holding mesh-2's certificate, for mesh-1's 15008.
fn mesh2_certificate(m: &Mesh) -> Arc<rustls::ClientConfig> {
    use ringtun::control_plane::certs::{load_trust_bundle, load_workload_credentials};
    use ringtun::control_plane::identity::SpiffeId;
    let id =
        |sa: &str| SpiffeId::parse(&format!("spiffe://cluster.local/ns/default/sa/{sa}")).unwrap();
    let creds = load_workload_credentials(&m.certs, &id("mesh-2")).unwrap();
    let trust = load_trust_bundle(&m.certs.join("ca.pem")).unwrap();
    ringtun::tls::ClientTls::new_for(
        &creds,
        &trust,
        ringtun::control_plane::config::CipherChoice::Any,
    )
    .unwrap()
    .config_for(&id("mesh-1"))
    .unwrap()
}

/// True when the server's first HTTP/2 frame arrives and is SETTINGS: it accepted the
/// tunnel (and, being TLS 1.3, checked the client certificate first).
fn server_settings(tls: &mut rustls::StreamOwned<rustls::ClientConnection, TcpStream>) -> bool {
    let mut header = [0u8; 9];
    tls.read_exact(&mut header).is_ok() && header[3] == 0x4
}

/// `count` attempts of [`park_tunnel`], 20 ms apart: the tunnels that could be parked.
fn park_tunnels(
    m: &Mesh,
    cfg: &Arc<rustls::ClientConfig>,
    count: usize,
) -> Vec<rustls::StreamOwned<rustls::ClientConnection, TcpStream>> {
    let mut parked = Vec::new();
    for _ in 0..count {
        if let Some(t) = park_tunnel(m, cfg.clone()) {
            parked.push(t);
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    parked
}

/// A certificate holder (mesh-2's certificate, from outside the mesh) opens tunnel after
/// tunnel to mesh-1's 15008, each with an HTTP/2 preface and nothing more.
fn park_tunnel(
    m: &Mesh,
    cfg: Arc<rustls::ClientConfig>,
) -> Option<rustls::StreamOwned<rustls::ClientConnection, TcpStream>> {
    let to = mesh1_hbone();
    let sock = ringtun::testbed::connect_in(&ns(m, Pod::Ext), to).ok()?;
    sock.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
    let conn = rustls::ClientConnection::new(cfg, ringtun::tls::server_name(to.ip())).ok()?;
    let mut tls = rustls::StreamOwned::new(conn, sock);
    let mut hello = hbone_proto::PREFACE.to_vec();
    hello.extend_from_slice(&[0, 0, 0, 4, 0, 0, 0, 0, 0]);
    tls.write_all(&hello).ok()?;
    tls.flush().ok()?;
    Some(tls)
}

#[test]
fn parked_authenticated_tunnels_are_bounded() {
    if !root_or_skip("parked_authenticated_tunnels_are_bounded") {
        return;
    }
    let m = mesh("io-uring", "  limits: {max_tunnels_per_peer: 4}\n");
    let good = GoodClient::start(&m, Pod::Mesh1, MESH_PORT, 256 << 10);
    let cfg = mesh2_certificate(&m);
    let parked = park_tunnels(&m, &cfg, 40);
    assert!(
        parked.len() >= 30,
        "only {} tunnels could be parked",
        parked.len()
    );
    // Two reactors, four per peer identity (and address) each: at most 8 of them stay open,
    // and the good client's tunnels are not among the ones shed.
    let settled = wait_for(|| {
        m.b()
            .metric("ringtun_hbone_tunnels_open", &["role=\"server\""])
            .unwrap()
            <= 8.0 + 2.0
    });
    let open = m
        .b()
        .metric("ringtun_hbone_tunnels_open", &["role=\"server\""])
        .unwrap();
    assert!(
        settled,
        "{open} server tunnels open on B with 40 parked:\n{}",
        m.b().metrics().unwrap()
    );
    let shed = m
        .b()
        .metric("ringtun_hbone_tunnels_shed_total", &[])
        .unwrap();
    assert!(
        shed >= 30.0,
        "only {shed} parked tunnels shed:\n{}",
        m.b().metrics().unwrap()
    );
    std::thread::sleep(Duration::from_secs(2));
    drop(parked);
    let (n, longest) = good.finish();
    eprintln!("parked tunnels: {open} server tunnels open, {shed} shed; good client {n} exchanges, longest {longest:?}");
    assert!(n >= 3, "the good client completed only {n} exchanges");
    m.finish();
}

#[test]
fn idle_tunnels_give_their_place_up_under_flow_pressure() {
    if !root_or_skip("idle_tunnels_give_their_place_up_under_flow_pressure") {
        return;
    }
    // 8 flows per reactor: parked tunnels alone fill B, so every newcomer needs room.
    let m = mesh("io-uring", "  limits: {max_flows_per_reactor: 8}\n");
    let good = GoodClient::start(&m, Pod::Mesh1, MESH_PORT, 256 << 10);
    let cfg = mesh2_certificate(&m);
    let parked = park_tunnels(&m, &cfg, 30);
    assert!(
        parked.len() >= 25,
        "only {} tunnels could be parked",
        parked.len()
    );
    let idle_shed = || {
        m.b()
            .metric(
                "ringtun_hbone_tunnels_shed_total",
                &["reason=\"idle_under_pressure\""],
            )
            .unwrap()
    };
    let after_parking = idle_shed();
    // With both reactors full of parked tunnels, plaintext to a pod on B is still served: an
    // idle tunnel makes room for it.
    for _ in 0..4 {
        plaintext_exchange_to_mesh2(&m);
    }
    let open = m
        .b()
        .metric("ringtun_hbone_tunnels_open", &["role=\"server\""])
        .unwrap();
    let flow_limit = m
        .b()
        .metric(
            "ringtun_connection_failures_total",
            &["reason=\"flow_limit\""],
        )
        .unwrap();
    drop(parked);
    let (n, longest) = good.finish();
    let shed = idle_shed();
    eprintln!(
        "flow pressure: {open} server tunnels open, {shed} idle ones shed ({after_parking} \
         while parking); good client {n} exchanges, longest {longest:?}"
    );
    assert!(
        after_parking >= 10.0,
        "only {after_parking} idle tunnels shed for parked newcomers:\n{}",
        m.b().metrics().unwrap()
    );
    assert!(
        shed > after_parking,
        "no idle tunnel made room for plaintext"
    );
    assert_eq!(
        flow_limit, 0.0,
        "a connection was refused at the flow limit"
    );
    assert!(
        open <= 16.0,
        "{open} server tunnels open with 8 flows per reactor"
    );
    assert!(n >= 3, "the good client completed only {n} exchanges");
    m.finish();
}

#[test]
fn slow_clients_do_not_delay_the_readiness_probe() {
    if !root_or_skip("slow_clients_do_not_delay_the_readiness_probe") {
        return;
    }
    let m = mesh("epoll", "");
    // Node B's readiness endpoint, on the node namespace's loopback (the probe's address too).
    let port = MeshNode::B.port_base() + 21;
    let node_ns = m.tb.node_ns().unwrap();
    let addr = SocketAddr::from(([127, 0, 0, 1], port));
    let idle: Vec<TcpStream> = (0..40)
        .filter_map(|_| node_ns.enter_for(|| TcpStream::connect(addr)).ok()?.ok())
        .collect();
    let trickler = {
        let s = node_ns
            .enter_for(|| TcpStream::connect(addr))
            .unwrap()
            .unwrap();
        std::thread::spawn(move || {
            let mut s = s;
            let mut sent = 0;
            for b in b"GET /healthz/ready HTTP/1.1\r\nHost: x\r\n"
                .iter()
                .cycle()
                .take(30)
            {
                if s.write_all(&[*b]).is_err() {
                    break;
                }
                sent += 1;
                std::thread::sleep(Duration::from_millis(400));
            }
            sent
        })
    };
    let mut slowest = Duration::ZERO;
    let start = Instant::now();
    while start.elapsed() < Duration::from_secs(5) {
        let t = Instant::now();
        let (code, _) = m.b().get(port, "/healthz/ready").expect("probe answered");
        assert_eq!(code, 200);
        slowest = slowest.max(t.elapsed());
        std::thread::sleep(Duration::from_millis(100));
    }
    let trickled = trickler.join().unwrap();
    drop(idle);
    eprintln!("readiness under slow clients: slowest probe {slowest:?}; trickler cut after {trickled} bytes");
    // The kubelet's default probe timeout is 1 s.
    assert!(slowest < Duration::from_secs(1), "a probe took {slowest:?}");
    // Cut at the 2 s request deadline: 5 or 6 bytes at one per 400 ms; 15 leaves room for
    // a loaded machine.
    assert!(
        trickled < 15,
        "the trickler was served {trickled} bytes' worth of time"
    );
    let shed = m
        .b()
        .metric(
            "ringtun_admin_connections_shed_total",
            &["endpoint=\"readiness\""],
        )
        .unwrap();
    assert!(shed >= 1.0, "no slow readiness connection was shed");
    m.finish();
}

/// A good client: from the client pod, exchanges of `bytes` each way with a server in
/// `pod` (through node A, a tunnel and node B), one after another, until `stop`; each must
/// arrive intact. Returns how many completed, and the longest one took.
struct GoodClient {
    stop: Arc<AtomicBool>,
    done: Arc<AtomicU64>,
    handle: std::thread::JoinHandle<(u64, Duration)>,
}

impl GoodClient {
    pub fn start(m: &Mesh, pod: Pod, port: u16, bytes: u64) -> GoodClient {
        let listener = m.listen(pod, port);
        listener.set_nonblocking(false).unwrap();
        let to = SocketAddr::new(pod.v4(), port);
        let client_ns = ns(m, Pod::Client);
        let stop = Arc::new(AtomicBool::new(false));
        let done = Arc::new(AtomicU64::new(0));
        let (stop2, done2) = (stop.clone(), done.clone());
        let handle = std::thread::spawn(move || {
            let mut longest = Duration::ZERO;
            let mut n = 0u64;
            while !stop2.load(Ordering::SeqCst) {
                let server = testbed::serve_exchanges(listener.try_clone().unwrap(), 1, bytes, 2);
                let start = Instant::now();
                let c = connect_in(&client_ns, to).expect("good client connects");
                let got = testbed::exchange(c, bytes, 1).expect("good client exchange");
                let s = server
                    .join()
                    .expect("server thread")
                    .expect("server exchange")[0];
                assert_eq!(
                    (got.received, s.received),
                    (bytes, bytes),
                    "good client: bytes lost in exchange {n}"
                );
                assert_eq!(got.sent_hash, s.received_hash, "good client: bytes differ");
                assert_eq!(s.sent_hash, got.received_hash, "good client: bytes differ");
                longest = longest.max(start.elapsed());
                n += 1;
                done2.store(n, Ordering::SeqCst);
            }
            (n, longest)
        });
        GoodClient { stop, done, handle }
    }

    pub fn completed(&self) -> u64 {
        self.done.load(Ordering::SeqCst)
    }

    /// Stops after the exchange in progress; panics if any failed.
    pub fn finish(self) -> (u64, Duration) {
        self.stop.store(true, Ordering::SeqCst);
        match self.handle.join() {
            Ok(r) => r,
            Err(p) => std::panic::resume_unwind(p),
        }
    }
}

/// Adds `count` addresses 10.77.4.10… to the ext pod (outside the mesh): many sources.
fn ext_sources(m: &Mesh, count: u8) -> Vec<IpAddr> {
    (0..count)
        .map(|i| {
            let ip = format!("10.77.4.{}", 10 + i);
            let out = Command::new("ip")
                .args([
                    "-n",
                    &m.tb.pod_name(Pod::Ext),
                    "addr",
                    "add",
                    &format!("{ip}/24"),
                    "dev",
                    "eth0",
                ])
                .output()
                .unwrap();
            assert!(
                out.status.success(),
                "{}",
                String::from_utf8_lossy(&out.stderr)
            );
            ip.parse().unwrap()
        })
        .collect()
}

/// A TCP connection from `source` (in the ext pod) to `to`, left idle.
fn idle_connection(m: &Mesh, source: IpAddr, to: SocketAddr) -> io::Result<TcpStream> {
    ns(m, Pod::Ext).enter_for(|| -> io::Result<TcpStream> {
        let fd = ringtun::sys::socket::tcp_socket(&to)?;
        use std::os::fd::AsRawFd;
        ringtun::sys::socket::bind(fd.as_raw_fd(), SocketAddr::new(source, 0))?;
        let s = TcpStream::from(fd);
        s.set_nonblocking(false)?;
        match ringtun::sys::socket::connect(s.as_raw_fd(), to) {
            Ok(()) => Ok(s),
            Err(e) => Err(e),
        }
    })?
}

/// Reads what is there without blocking: true when the peer has closed or reset.
fn is_closed(s: &TcpStream) -> bool {
    s.set_nonblocking(true).unwrap();
    let mut buf = [0u8; 512];
    let closed = match (&*s).read(&mut buf) {
        Ok(0) => true,
        Ok(_) => false,
        Err(e) if e.kind() == io::ErrorKind::WouldBlock => false,
        Err(_) => true,
    };
    s.set_nonblocking(false).unwrap();
    closed
}
