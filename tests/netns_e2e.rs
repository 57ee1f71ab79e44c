//! End-to-end tests of the capture and the fast path, as root, in network namespaces with the
//! real iptables rules: a client pod, two mesh pods behind a service VIP and a server outside
//! the mesh (see `ringtun::testbed`), served by `ringtun run` in the node namespace. Every test
//! runs once per driver (io_uring and epoll), ends with SIGTERM and exit code 0, and checks that
//! ringtun's descriptor count returned to its baseline.
//!
//! Without root each test prints `SKIPPED (needs root)` to stderr; with `CI` set it fails.

use std::io::{Read, Write};
use std::net::{Shutdown, SocketAddr, TcpStream};
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use ringtun::testbed::{
    self, connect_in, exchange_intact, is_reset, listen_in, read_until_end, set_linger_zero, Pod,
    RingtunProcess, Testbed,
};

const BIN: &str = env!("CARGO_BIN_EXE_ringtun");
const EXT_PORT: u16 = 9000;

use testbed::root_or_skip;

struct Node {
    tb: Testbed,
    ringtun: Option<RingtunProcess>,
    baseline_fds: usize,
}

impl Node {
    fn start(driver: &str, extra_node: &str) -> Node {
        let tb = Testbed::create(&driver[..2]).expect("testbed");
        let config = tb.config_yaml(2, extra_node);
        let dir = std::env::temp_dir().join(&tb.prefix);
        std::fs::create_dir_all(&dir).unwrap();
        let cfg_path = dir.join("capture.yaml");
        std::fs::write(&cfg_path, &config).unwrap();
        tb.install_capture(Path::new(BIN), &Testbed::captured_pods(), &cfg_path);
        let ringtun = RingtunProcess::spawn(Path::new(BIN), &tb, &config, &["--driver", driver])
            .expect("ringtun starts");
        let metrics = ringtun.metrics().unwrap();
        let want = format!("driver=\"{}\"", driver.replace('-', "_"));
        assert!(
            metrics.contains(&want),
            "driver not in use: {want}\n{metrics}"
        );
        let baseline_fds = settled_fds(&ringtun, None);
        Node {
            tb,
            ringtun: Some(ringtun),
            baseline_fds,
        }
    }

    fn ringtun(&self) -> &RingtunProcess {
        self.ringtun.as_ref().unwrap()
    }

    fn ns(&self, pod: Pod) -> ringtun::redirection::netns::NetNs {
        self.tb.pod_ns(pod).unwrap()
    }

    fn connect(&self, to: SocketAddr) -> TcpStream {
        connect_in(&self.ns(Pod::Client), to).expect("client connects")
    }

    /// Connects and reads until the stream ends; returns the error it ended with. The client
    /// is captured to a local listener, so the proxy's reset can beat connect() itself.
    fn connect_expecting_reset(&self, to: SocketAddr) -> std::io::Error {
        match connect_in(&self.ns(Pod::Client), to) {
            Ok(mut c) => match read_until_end(&mut c) {
                Ok(b) => panic!(
                    "{to}: the stream ended cleanly after {} bytes; a reset was expected",
                    b.len()
                ),
                Err(e) => e,
            },
            Err(e) => e,
        }
    }

    fn metric(&self, name: &str, labels: &[&str]) -> f64 {
        self.ringtun().metric(name, labels).unwrap()
    }

    /// Waits until a counter reaches `at_least` (flows end asynchronously after the client sees it).
    fn wait_metric(&self, name: &str, labels: &[&str], at_least: f64) -> f64 {
        let start = Instant::now();
        loop {
            let v = self.metric(name, labels);
            if v >= at_least || start.elapsed() > Duration::from_secs(10) {
                return v;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Every flow gone, descriptors back to baseline (pooled empty pipes accounted for), then
    /// SIGTERM and exit 0.
    fn finish(mut self) {
        let r = self.ringtun.take().unwrap();
        let open = {
            let start = Instant::now();
            loop {
                let open = r.metric("ringtun_flows_open", &[]).unwrap();
                if open == 0.0 || start.elapsed() > Duration::from_secs(10) {
                    break open;
                }
                std::thread::sleep(Duration::from_millis(20));
            }
        };
        assert_eq!(open, 0.0, "flows still open at the end of the test");
        let now = settled_fds(&r, Some(self.baseline_fds));
        let pooled = r.metric("ringtun_pipes_pooled", &[]).unwrap() as usize;
        assert_eq!(
            now,
            self.baseline_fds + 2 * pooled,
            "fd count {now} != baseline {} + 2 x {pooled} pooled pipes",
            self.baseline_fds
        );
        let log = r.log_text();
        let code = r.terminate().unwrap();
        assert_eq!(code, 0, "ringtun exit code after SIGTERM; log:\n{log}");
    }
}

/// The fd count once it stops changing (or reaches `target`).
fn settled_fds(r: &RingtunProcess, target: Option<usize>) -> usize {
    let pooled = || r.metric("ringtun_pipes_pooled", &[]).unwrap_or(0.0) as usize;
    let start = Instant::now();
    let mut last = r.fd_count();
    loop {
        std::thread::sleep(Duration::from_millis(100));
        let now = r.fd_count();
        let done = match target {
            Some(t) => now == t + 2 * pooled(),
            None => now == last,
        };
        if done || start.elapsed() > Duration::from_secs(10) {
            return now;
        }
        last = now;
    }
}

fn ext(port: u16) -> SocketAddr {
    SocketAddr::new(Pod::Ext.v4(), port)
}

macro_rules! both_drivers {
    ($($name:ident),* $(,)?) => {
        mod io_uring { $( #[test] fn $name() { if super::root_or_skip(concat!("io_uring::", stringify!($name))) { super::$name("io-uring") } } )* }
        mod epoll { $( #[test] fn $name() { if super::root_or_skip(concat!("epoll::", stringify!($name))) { super::$name("epoll") } } )* }
    };
}

both_drivers!(
    one_gib_each_way_arrives_intact,
    client_half_close_keeps_server_direction_open,
    server_half_close_keeps_client_direction_open,
    server_reset_reaches_client_as_reset,
    refused_upstream_reaches_client_as_reset,
    thousand_concurrent_connections_complete,
    service_vip_spreads_across_two_endpoints,
    out_of_mesh_destination_passes_through_and_is_counted,
    ipv6_destination_is_captured_and_proxied,
    connection_to_ringtun_own_port_is_refused,
    idle_flow_is_closed_after_idle_timeout,
    unanswered_connect_times_out_and_resets_client,
    sigterm_lets_open_flow_finish_then_exits_zero,
    drain_deadline_resets_flows_still_open,
    inbound_redirect_capture_recovers_original_destination,
    host_mode_serves_the_namespace_ringtun_runs_in,
    a_stalled_destination_costs_no_cpu,
    flows_beyond_the_pipe_budget_copy_every_byte,
    draining_node_refuses_new_connections_at_once,
);

/// One driver is enough: the start-up decision is the driver's business only through the
/// listeners, which are made before any reactor runs.
#[test]
fn a_pod_that_cannot_be_served_is_named_by_readiness() {
    if root_or_skip("a_pod_that_cannot_be_served_is_named_by_readiness") {
        pod_that_cannot_be_served_is_named_by_readiness();
    }
}

fn one_gib_each_way_arrives_intact(driver: &str) {
    let node = Node::start(driver, "");
    const GIB: u64 = 1 << 30;
    exchange_intact(&node.tb, Pod::Ext, ext(EXT_PORT), GIB);
    let up = node.wait_metric(
        "istio_tcp_received_bytes_total",
        &["reporter=\"source\""],
        GIB as f64,
    );
    let down = node.wait_metric(
        "istio_tcp_sent_bytes_total",
        &["reporter=\"source\""],
        GIB as f64,
    );
    assert_eq!((up, down), (GIB as f64, GIB as f64));
    assert_eq!(
        node.metric("ringtun_splice_bytes_to_upstream_total", &[]),
        GIB as f64
    );
    node.finish();
}

fn client_half_close_keeps_server_direction_open(driver: &str) {
    let node = Node::start(driver, "");
    let listener = listen_in(&node.ns(Pod::Ext), ext(EXT_PORT)).unwrap();
    let server = std::thread::spawn(move || {
        let (mut s, _) = listener.accept().unwrap();
        let mut got = Vec::new();
        s.read_to_end(&mut got).unwrap(); // the client's FIN arrives as EOF…
        s.write_all(&vec![7u8; 1 << 20]).unwrap(); // …and the server can still answer
        got.len()
    });
    let mut c = node.connect(ext(EXT_PORT));
    c.write_all(&vec![1u8; 300_000]).unwrap();
    c.shutdown(Shutdown::Write).unwrap();
    let mut reply = Vec::new();
    c.read_to_end(&mut reply).unwrap();
    assert_eq!(server.join().unwrap(), 300_000);
    assert_eq!(reply.len(), 1 << 20);
    assert!(reply.iter().all(|&b| b == 7));
    node.finish();
}

fn server_half_close_keeps_client_direction_open(driver: &str) {
    let node = Node::start(driver, "");
    let listener = listen_in(&node.ns(Pod::Ext), ext(EXT_PORT)).unwrap();
    let server = std::thread::spawn(move || {
        let (mut s, _) = listener.accept().unwrap();
        s.write_all(b"hello, then FIN").unwrap();
        s.shutdown(Shutdown::Write).unwrap();
        let mut got = Vec::new();
        s.read_to_end(&mut got).unwrap();
        got.len()
    });
    let mut c = node.connect(ext(EXT_PORT));
    let mut greeting = Vec::new();
    c.read_to_end(&mut greeting).unwrap(); // EOF from the server's half-close
    assert_eq!(greeting, b"hello, then FIN");
    // The other direction still carries data after the server's FIN.
    c.write_all(&vec![3u8; 2 << 20]).unwrap();
    c.shutdown(Shutdown::Write).unwrap();
    assert_eq!(server.join().unwrap(), 2 << 20);
    node.finish();
}

fn server_reset_reaches_client_as_reset(driver: &str) {
    let node = Node::start(driver, "");
    let listener = listen_in(&node.ns(Pod::Ext), ext(EXT_PORT)).unwrap();
    let server = std::thread::spawn(move || {
        let (mut s, _) = listener.accept().unwrap();
        let mut b = [0u8; 5];
        s.read_exact(&mut b).unwrap();
        // SO_LINGER 0: close sends RST instead of FIN.
        set_linger_zero(&s);
        drop(s);
    });
    let mut c = node.connect(ext(EXT_PORT));
    c.write_all(b"hello").unwrap();
    server.join().unwrap();
    let err = read_until_end(&mut c).expect_err("the client must see a reset, not a clean EOF");
    assert!(is_reset(&err), "expected a reset, got {err:?}");
    assert!(
        node.wait_metric(
            "ringtun_connection_failures_total",
            &["class=\"upstream\",reason=\"reset\""],
            1.0
        ) >= 1.0
    );
    node.finish();
}

fn refused_upstream_reaches_client_as_reset(driver: &str) {
    let node = Node::start(driver, "");
    // Nothing listens on the port: the proxy's connect is refused.
    let err = node.connect_expecting_reset(ext(EXT_PORT + 1));
    assert!(is_reset(&err), "expected a reset, got {err:?}");
    assert_eq!(
        node.wait_metric(
            "ringtun_connection_failures_total",
            &["reason=\"refused\""],
            1.0
        ),
        1.0
    );
    node.finish();
}

fn thousand_concurrent_connections_complete(driver: &str) {
    let node = Node::start(driver, "");
    const N: usize = 1000;
    const BYTES: usize = 16 * 1024;
    let listener = listen_in(&node.ns(Pod::Ext), ext(EXT_PORT)).unwrap();
    let acceptor = std::thread::spawn(move || {
        let mut by_index: Vec<Option<TcpStream>> = (0..N).map(|_| None).collect();
        for _ in 0..N {
            let (mut s, _) = listener.accept().unwrap();
            s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
            let mut idx = [0u8; 4];
            s.read_exact(&mut idx).unwrap();
            by_index[u32::from_le_bytes(idx) as usize] = Some(s);
        }
        by_index.into_iter().map(|s| s.unwrap()).collect::<Vec<_>>()
    });
    let mut clients: Vec<TcpStream> = (0..N)
        .map(|i| {
            let mut c = node.connect(ext(EXT_PORT));
            c.write_all(&(i as u32).to_le_bytes()).unwrap();
            c
        })
        .collect();
    let mut servers = acceptor.join().unwrap();
    // All 1,000 are open through the proxy at the same time.
    assert_eq!(node.metric("ringtun_flows_open", &[]), N as f64);
    // Each moved its 4-byte index and now waits: an idle flow holds its two sockets and no
    // pipe (pipes went back to the reactors' pools, counted apart).
    let idle = settled_fds(node.ringtun(), Some(node.baseline_fds + 2 * N));
    let pooled = node.metric("ringtun_pipes_pooled", &[]) as usize;
    assert_eq!(
        idle,
        node.baseline_fds + 2 * N + 2 * pooled,
        "{N} idle flows: fd count {idle} != baseline {} + 2 per flow + 2 x {pooled} pooled pipes",
        node.baseline_fds
    );
    for (i, (c, s)) in clients.iter_mut().zip(servers.iter_mut()).enumerate() {
        let mut p = testbed::Pattern::new(i as u64);
        let mut data = vec![0u8; BYTES];
        p.fill(&mut data);
        c.write_all(&data).unwrap();
        c.shutdown(Shutdown::Write).unwrap();
        let mut got = Vec::new();
        s.read_to_end(&mut got).unwrap();
        assert_eq!(got, data, "connection {i}: bytes differ");
        s.write_all(&data).unwrap();
        s.shutdown(Shutdown::Write).unwrap();
        let mut back = Vec::new();
        c.read_to_end(&mut back).unwrap();
        assert_eq!(back, data, "connection {i}: reply differs");
    }
    drop(clients);
    drop(servers);
    let closed = node.wait_metric("istio_tcp_connections_closed_total", &[], N as f64);
    assert_eq!(closed, N as f64);
    // Their connect and idle timers (two per flow) do not stay behind in the heaps.
    let start = Instant::now();
    let mut timers = node.metric("ringtun_timers_queued", &[]);
    while timers > 512.0 && start.elapsed() < Duration::from_secs(10) {
        std::thread::sleep(Duration::from_millis(50));
        timers = node.metric("ringtun_timers_queued", &[]);
    }
    assert!(
        timers <= 512.0,
        "{timers} timers left after every flow ended"
    );
    node.finish();
}

fn service_vip_spreads_across_two_endpoints(driver: &str) {
    let node = Node::start(driver, "");
    let mut servers = Vec::new();
    for (pod, name) in [(Pod::Mesh1, "mesh-1"), (Pod::Mesh2, "mesh-2")] {
        let l = listen_in(&node.ns(pod), SocketAddr::new(pod.v4(), testbed::MESH_PORT)).unwrap();
        l.set_nonblocking(true).unwrap();
        servers.push(std::thread::spawn(move || {
            let start = Instant::now();
            let mut served = 0;
            while start.elapsed() < Duration::from_secs(5) && served < 10 {
                match l.accept() {
                    Ok((mut s, _)) => {
                        s.set_nonblocking(false).unwrap();
                        s.write_all(name.as_bytes()).unwrap();
                        served += 1;
                    }
                    Err(_) => std::thread::sleep(Duration::from_millis(2)),
                }
            }
        }));
    }
    let vip = SocketAddr::new(testbed::VIP.into(), testbed::VIP_PORT);
    let mut count = std::collections::HashMap::new();
    for _ in 0..10 {
        let mut c = node.connect(vip);
        let mut who = String::new();
        c.read_to_string(&mut who).unwrap();
        *count.entry(who).or_insert(0) += 1;
    }
    for s in servers {
        s.join().unwrap();
    }
    assert_eq!(count.len(), 2, "both endpoints serve: {count:?}");
    assert_eq!(count.values().sum::<i32>(), 10);
    let via_service = node.wait_metric(
        "istio_tcp_connections_opened_total",
        &[
            "reporter=\"source\"",
            "destination_service=\"echo.default.svc\"",
        ],
        10.0,
    );
    assert_eq!(via_service, 10.0);
    node.finish();
}

fn out_of_mesh_destination_passes_through_and_is_counted(driver: &str) {
    let node = Node::start(driver, "");
    exchange_intact(&node.tb, Pod::Ext, ext(EXT_PORT), 1 << 20);
    let labels = [
        "reporter=\"source\"",
        "source_workload=\"client\"",
        "destination_workload=\"unknown\"",
        "destination_service=\"unknown\"",
    ];
    assert_eq!(
        node.wait_metric("istio_tcp_connections_closed_total", &labels, 1.0),
        1.0
    );
    assert_eq!(
        node.metric("istio_tcp_received_bytes_total", &labels),
        (1 << 20) as f64
    );
    node.finish();
}

fn ipv6_destination_is_captured_and_proxied(driver: &str) {
    let node = Node::start(driver, "");
    let addr = SocketAddr::new(Pod::Ext.v6(), EXT_PORT);
    exchange_intact(&node.tb, Pod::Ext, addr, 8 << 20);
    // It went through ringtun (not around it): the v6 flow was counted.
    assert_eq!(
        node.wait_metric(
            "ringtun_splice_bytes_to_upstream_total",
            &[],
            (8 << 20) as f64
        ),
        (8 << 20) as f64
    );
    node.finish();
}

fn connection_to_ringtun_own_port_is_refused(driver: &str) {
    let node = Node::start(driver, "");
    // The pod's own address on the inbound port, and loopback on the outbound port: both reach
    // ringtun's listeners directly and would loop.
    for to in [
        SocketAddr::new(Pod::Client.v4(), 15006),
        "127.0.0.1:15001".parse().unwrap(),
    ] {
        let err = node.connect_expecting_reset(to);
        assert!(is_reset(&err), "{to}: expected a reset, got {err:?}");
    }
    assert_eq!(
        node.wait_metric(
            "ringtun_connection_failures_total",
            &["class=\"policy\",reason=\"loop\""],
            2.0
        ),
        2.0
    );
    node.finish();
}

fn idle_flow_is_closed_after_idle_timeout(driver: &str) {
    let node = Node::start(driver, "  timeouts:\n    idle: 1s\n");
    let listener = listen_in(&node.ns(Pod::Ext), ext(EXT_PORT)).unwrap();
    let mut c = node.connect(ext(EXT_PORT));
    let (_server_side, _) = listener.accept().unwrap();
    c.write_all(b"x").unwrap();
    let start = Instant::now();
    let err = read_until_end(&mut c).expect_err("an idle flow is reset");
    assert!(is_reset(&err), "expected a reset, got {err:?}");
    let took = start.elapsed();
    assert!(
        took >= Duration::from_millis(900) && took < Duration::from_secs(5),
        "closed after {took:?}"
    );
    assert_eq!(
        node.wait_metric("ringtun_flows_closed_total", &["end=\"idle_timeout\""], 1.0),
        1.0
    );
    node.finish();
}

fn unanswered_connect_times_out_and_resets_client(driver: &str) {
    let node = Node::start(driver, "  timeouts:\n    connect: 1s\n");
    // The server silently drops SYNs: the connect never completes.
    let ext_ns = node.tb.pod_name(Pod::Ext);
    let out = Command::new("ip")
        .args([
            "netns",
            "exec",
            &ext_ns,
            "iptables-nft",
            "-A",
            "INPUT",
            "-p",
            "tcp",
            "--dport",
            "9999",
            "-j",
            "DROP",
        ])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let mut c = node.connect(ext(9999));
    let start = Instant::now();
    let err =
        read_until_end(&mut c).expect_err("a connect timeout must reach the client as a reset");
    assert!(is_reset(&err), "expected a reset, got {err:?}");
    assert!(start.elapsed() < Duration::from_secs(5));
    assert_eq!(
        node.wait_metric(
            "ringtun_connection_failures_total",
            &["reason=\"connect_timeout\""],
            1.0
        ),
        1.0
    );
    node.finish();
}

fn sigterm_lets_open_flow_finish_then_exits_zero(driver: &str) {
    let mut node = Node::start(driver, "");
    let listener = listen_in(&node.ns(Pod::Ext), ext(EXT_PORT)).unwrap();
    let mut c = node.connect(ext(EXT_PORT));
    let (mut s, _) = listener.accept().unwrap();
    let r = node.ringtun.take().unwrap();
    let pid = nix::unistd::Pid::from_raw(r.pid() as i32);
    nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM).unwrap();
    // Draining: not ready any more, no new connections, but the open flow still works.
    let start = Instant::now();
    while r.get(15021, "/healthz/ready").map(|(c, _)| c).unwrap_or(0) != 503 {
        assert!(
            start.elapsed() < Duration::from_secs(5),
            "readiness did not turn 503"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    c.write_all(&vec![9u8; 1 << 20]).unwrap();
    c.shutdown(Shutdown::Write).unwrap();
    let mut got = Vec::new();
    s.read_to_end(&mut got).unwrap();
    assert_eq!(got.len(), 1 << 20);
    s.write_all(b"bye").unwrap();
    drop(s);
    let mut reply = Vec::new();
    c.read_to_end(&mut reply).unwrap();
    assert_eq!(reply, b"bye");
    let code = r.terminate().unwrap(); // already terminating: this waits for the exit
    assert_eq!(code, 0);
    node.baseline_fds = 0;
}

fn drain_deadline_resets_flows_still_open(driver: &str) {
    let mut node = Node::start(driver, "  timeouts:\n    drain: 1s\n");
    let listener = listen_in(&node.ns(Pod::Ext), ext(EXT_PORT)).unwrap();
    let mut c = node.connect(ext(EXT_PORT));
    let (_s, _) = listener.accept().unwrap();
    c.write_all(b"still here").unwrap();
    let r = node.ringtun.take().unwrap();
    let sent = Instant::now();
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(r.pid() as i32),
        nix::sys::signal::Signal::SIGTERM,
    )
    .unwrap();
    // The flow never ends by itself: at the deadline it is reset, not closed cleanly.
    let err = read_until_end(&mut c).expect_err("a flow cut at the drain deadline is reset");
    assert!(is_reset(&err), "expected a reset, got {err:?}");
    let took = sent.elapsed();
    assert!(
        took >= Duration::from_millis(900) && took < Duration::from_secs(5),
        "reset after {took:?}"
    );
    assert_eq!(r.terminate().unwrap(), 0);
    node.baseline_fds = 0;
}

fn inbound_redirect_capture_recovers_original_destination(driver: &str) {
    // The capture rules are swapped for a hand-made REDIRECT after start, and the return path
    // for client addresses goes with them: this workload delivers from its own address
    // (decided when its listeners are made, so the knob says it).
    let node = Node::start(driver, "  deliver_client_address: off\n");
    // Replace mesh-1's TPROXY capture with nat REDIRECT to 15006: the listener then sees the
    // pod's own address on 15006 and must read the real destination from conntrack.
    let mesh1 = node.tb.pod_name(Pod::Mesh1);
    let out = Command::new(BIN)
        .args(["redirect", "remove", "--netns", &mesh1])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let out = Command::new("ip")
        .args([
            "netns",
            "exec",
            &mesh1,
            "iptables-nft",
            "-t",
            "nat",
            "-A",
            "PREROUTING",
            "-p",
            "tcp",
            "--dport",
            "8080",
            "-j",
            "REDIRECT",
            "--to-ports",
            "15006",
        ])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let to = SocketAddr::new(Pod::Mesh1.v4(), testbed::MESH_PORT);
    exchange_intact(&node.tb, Pod::Mesh1, to, 1 << 20);
    let inbound = [
        "reporter=\"destination\"",
        "destination_workload=\"mesh-1\"",
    ];
    assert_eq!(
        node.wait_metric("istio_tcp_connections_closed_total", &inbound, 1.0),
        1.0
    );
    assert_eq!(
        node.metric("istio_tcp_received_bytes_total", &inbound),
        (1 << 20) as f64
    );
    node.finish();
}

fn host_mode_serves_the_namespace_ringtun_runs_in(driver: &str) {
    // Bare metal: no `netns` on the workload; ringtun runs in the workload's own namespace and
    // the capture rules are installed there.
    let tb = Testbed::create(&driver[..2]).expect("testbed");
    let host = tb.pod_name(Pod::Client);
    let config = format!(
        "version: 1\nnode:\n  name: node-a\n  reactors: 2\n  admin: 127.0.0.1:15000\n  metrics: 127.0.0.1:15020\n  readiness: 127.0.0.1:15021\nworkloads:\n  - name: host\n    namespace: default\n    ips: [{}, \"{}\"]\n    node: node-a\n    protocol: TCP\n",
        Pod::Client.v4(),
        Pod::Client.v6()
    );
    let out = Command::new(BIN)
        .args(["redirect", "install", "--netns", &host])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let r = RingtunProcess::spawn_in(Path::new(BIN), &tb, &host, &config, &["--driver", driver])
        .expect("ringtun starts");
    exchange_intact(&tb, Pod::Ext, ext(EXT_PORT), 4 << 20);
    let start = Instant::now();
    let labels = ["reporter=\"source\"", "source_workload=\"host\""];
    while r
        .metric("istio_tcp_connections_closed_total", &labels)
        .unwrap()
        < 1.0
    {
        assert!(
            start.elapsed() < Duration::from_secs(10),
            "the host workload's flow was not counted"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    assert_eq!(
        r.metric("istio_tcp_received_bytes_total", &labels).unwrap(),
        (4 << 20) as f64
    );
    assert_eq!(r.terminate().unwrap(), 0);
}

/// A destination that stops reading fills the pipe and the socket buffers; the flow must then
/// wait asleep (no CPU while nothing moves: a slow reader must not be a way to make the node
/// spin) and deliver every byte once the destination reads again.
/// One pipe per reactor: eight concurrent 4 MiB exchanges each way find it busy most of the
/// time and copy through user space. Every byte arrives intact and in order both ways, nothing
/// fails, the copies are counted, and the one pipe (kept in the pool between uses) is the only
/// one ever made per reactor.
fn flows_beyond_the_pipe_budget_copy_every_byte(driver: &str) {
    let node = Node::start(driver, "  splice: {pipes_per_reactor: 1}\n");
    const N: usize = 8;
    const BYTES: u64 = 4 << 20;
    testbed::concurrent_exchanges_intact(
        listen_in(&node.ns(Pod::Ext), ext(EXT_PORT)).unwrap(),
        N,
        BYTES,
        || node.connect(ext(EXT_PORT)),
    );
    let copied = node.metric("ringtun_pipe_budget_exhausted_total", &[]);
    assert!(copied > 0.0, "no transfer found the pipe budget spent");
    assert_eq!(node.metric("ringtun_connection_failures_total", &[]), 0.0);
    assert!(
        node.metric("ringtun_pipes_created_total", &[]) <= 2.0,
        "more pipes than the budget (1 per reactor, 2 reactors)"
    );
    eprintln!("{driver}: {copied} transfers copied for want of a pipe");
    node.finish();
}

fn a_stalled_destination_costs_no_cpu(driver: &str) {
    let node = Node::start(driver, "");
    let used = ringtun::testbed::stalled_upload_cpu(
        listen_in(&node.ns(Pod::Ext), ext(EXT_PORT)).unwrap(),
        || node.connect(ext(EXT_PORT)),
        32 << 20,
        || node.ringtun().cpu_seconds().unwrap(),
    );
    eprintln!("stalled-flow CPU ({driver}): {used:.2} s in 2 s");
    assert!(
        used < 0.2,
        "{used:.2} CPU seconds in 2 s with the flow stalled (a busy loop)"
    );
    node.finish();
}

/// SYNs the kernel of `ns` sent again because no answer came (`TcpExtTCPSynRetrans`, per
/// namespace: read through `/proc/thread-self`, the calling thread's namespace).
fn syn_retransmits(ns: &ringtun::redirection::netns::NetNs) -> u64 {
    let text = ns
        .enter_for(|| std::fs::read_to_string("/proc/thread-self/net/netstat"))
        .unwrap()
        .unwrap();
    let mut lines = text.lines().filter(|l| l.starts_with("TcpExt:"));
    let (names, values) = (lines.next().unwrap(), lines.next().unwrap());
    let i = names
        .split_whitespace()
        .position(|n| n == "TCPSynRetrans")
        .expect("TCPSynRetrans in /proc/net/netstat");
    values.split_whitespace().nth(i).unwrap().parse().unwrap()
}

/// SIGTERM with a flow still open: the node drains, and a connection captured by TPROXY while
/// it does (from outside the mesh to mesh-1) is refused with a reset at once — a closed
/// TPROXY listener would have the kernel drop its SYNs, and the client would wait out a SYN
/// retransmit or its connect timeout. "At once" is asserted as the kernel sees it (no SYN of
/// the client's sent twice), not by a clock: a loaded machine may run a reactor late, but
/// the client's SYN is answered and its connection then refused.
///
/// Readiness turns 503 only once every reactor has been told to drain, and a reactor that
/// drained early keeps refusing until all have: each connection made after the probe said 503
/// must meet a refusing listener, on whichever reactor `SO_REUSEPORT` hands it to.
fn draining_node_refuses_new_connections_at_once(driver: &str) {
    let mut node = Node::start(driver, "");
    let listener = listen_in(&node.ns(Pod::Ext), ext(EXT_PORT)).unwrap();
    let mut c = node.connect(ext(EXT_PORT));
    let (mut s, _) = listener.accept().unwrap();
    let _server = listen_in(&node.ns(Pod::Mesh1), SocketAddr::new(Pod::Mesh1.v4(), 8080)).unwrap();
    let r = node.ringtun.take().unwrap();
    ringtun::sys::signal::terminate(r.pid()).unwrap();
    let start = Instant::now();
    while r.get(15021, "/healthz/ready").map(|(c, _)| c).unwrap_or(0) != 503 {
        assert!(
            start.elapsed() < Duration::from_secs(5),
            "readiness did not turn 503"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    let syns_before = syn_retransmits(&node.ns(Pod::Ext));
    for _ in 0..8 {
        let tried = Instant::now();
        let to = SocketAddr::new(Pod::Mesh1.v4(), 8080);
        let outcome = node
            .ns(Pod::Ext)
            .enter_for(|| TcpStream::connect_timeout(&to, Duration::from_secs(5)))
            .unwrap();
        let err = match outcome {
            Ok(mut t) => {
                t.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
                read_until_end(&mut t).expect_err("a connection during the drain is refused")
            }
            Err(e) => e,
        };
        assert!(
            is_reset(&err) || err.kind() == std::io::ErrorKind::ConnectionRefused,
            "expected a reset or refusal, got {err:?}"
        );
        // A backstop only (the connect timeout is 5 s); the SYN count below is the check.
        assert!(
            tried.elapsed() < Duration::from_secs(4),
            "refused after {:?}",
            tried.elapsed()
        );
    }
    assert_eq!(
        syn_retransmits(&node.ns(Pod::Ext)) - syns_before,
        0,
        "a SYN to the draining node went unanswered and was sent again"
    );
    let refused = r
        .metric(
            "ringtun_connection_failures_total",
            &["reason=\"draining\""],
        )
        .unwrap();
    assert!(refused >= 8.0, "draining refusals counted: {refused}");
    // The open flow still works and ends the drain.
    c.write_all(b"done").unwrap();
    c.shutdown(Shutdown::Write).unwrap();
    let mut got = Vec::new();
    s.read_to_end(&mut got).unwrap();
    assert_eq!(got, b"done");
    drop(s);
    let _ = read_until_end(&mut c);
    assert_eq!(r.terminate().unwrap(), 0);
    node.baseline_fds = 0;
}

/// Pod mode: a local workload whose namespace is gone is not served, the others are; readiness
/// answers 200 and names it, with why.
fn pod_that_cannot_be_served_is_named_by_readiness() {
    let tb = Testbed::create("gh").expect("testbed");
    let ghost = format!(
        "  - name: ghost\n    namespace: default\n    ips: [10.77.9.2]\n    node: node-a\n    protocol: TCP\n    netns: /var/run/netns/{}-ghost\n",
        tb.prefix
    );
    let config = tb
        .config_yaml(1, "")
        .replace("services:", &format!("{ghost}services:"));
    let cfg_path = std::env::temp_dir().join(format!("{}-ghost.yaml", tb.prefix));
    std::fs::write(&cfg_path, &config).unwrap();
    let out = Command::new(BIN)
        .args([
            "redirect",
            "install",
            "--netns",
            &tb.pod_name(Pod::Client),
            "--config",
        ])
        .arg(&cfg_path)
        .output()
        .unwrap();
    let _ = std::fs::remove_file(&cfg_path);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let r = RingtunProcess::spawn(Path::new(BIN), &tb, &config, &[]).expect("ringtun starts");
    let (code, body) = r.get(15021, "/healthz/ready").unwrap();
    assert_eq!(code, 200, "{body}");
    assert!(
        body.contains("1 workload(s) not served") && body.contains("default/ghost"),
        "{body}"
    );
    // The others are served: a client connection goes through ringtun.
    exchange_intact(&tb, Pod::Ext, ext(EXT_PORT), 1 << 16);
    let opened = r.metric("istio_tcp_connections_opened_total", &[]).unwrap();
    assert!(
        opened >= 1.0,
        "the client's connection did not go through ringtun"
    );
    assert_eq!(r.terminate().unwrap(), 0);
}
