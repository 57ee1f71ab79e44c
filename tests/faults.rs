//! The faults of issue 11, as root, on the testbed: what a node does when something around it
//! breaks, judged by what a user would see (resets rather than hangs, hashed bytes, counters,
//! descriptors back to their baseline).
//!
//! - a peer node that vanishes mid-transfer (node B killed with SIGKILL): node A resets the
//!   client streams it carried at once, refuses new ones to B with a reset, keeps serving
//!   everything else, and gives back every descriptor;
//! - a partition (every packet between the client pod and mesh-1 dropped mid-transfer): both
//!   ends notice within the keepalive's interval and timeout, reset the stream (the client
//!   and the application each see a reset), count the tunnel as closed for `keepalive`, serve
//!   everything else, and open a new tunnel once the network heals;
//! - a destination that stops reading: only its own stream stalls, with no CPU spent on it;
//!   another stream on the same tunnel keeps flowing with every byte intact, and the stalled
//!   one completes afterwards;
//! - descriptor exhaustion: a node started with a low open-files limit sizes its flow budget
//!   to it, refuses the connections over the budget (reset, counter, access record) without
//!   ever failing an accept, serves the others, and serves again once they close.
//!
//! Without root each test prints `SKIPPED (needs root)`; with `CI` set it fails.

use std::io::{Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use ringtun::testbed::two_nodes::{settle_to, settled_fds, wait_for, Mesh};
use ringtun::testbed::{
    self, connect_in, exchange, hex, is_reset, listen_in, read_until_end, root_or_skip,
    serve_exchanges, MeshNode, Pattern, Pod, RingtunProcess, Testbed, MESH_PORT,
};

const BIN: &str = env!("CARGO_BIN_EXE_ringtun");

/// A port outside the mesh (the ext pod), served by node A without any tunnel.
fn ext(port: u16) -> SocketAddr {
    SocketAddr::new(Pod::Ext.v4(), port)
}

fn mesh1(port: u16) -> SocketAddr {
    SocketAddr::new(Pod::Mesh1.v4(), port)
}

/// A stream from the client pod to mesh-1 through the tunnel, mid-transfer: 1 MiB (a pattern
/// of `seed`) went through and arrived intact, more may come. Returns the listener, the
/// client's end, the application's end and the block sent.
fn stream_mid_transfer(m: &Mesh, seed: u64) -> (TcpListener, TcpStream, TcpStream, Vec<u8>) {
    let l = m.listen(Pod::Mesh1, MESH_PORT);
    let mut c = m.connect(mesh1(MESH_PORT));
    let (mut s, _) = l.accept().unwrap();
    s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    let mut block = vec![0u8; 1 << 20];
    Pattern::new(seed).fill(&mut block);
    c.write_all(&block).unwrap();
    let mut got = vec![0u8; block.len()];
    s.read_exact(&mut got).unwrap();
    assert!(got == block, "the stream's bytes differ before the fault");
    (l, c, s, block)
}

type ExchangeServer = std::thread::JoinHandle<std::io::Result<Vec<testbed::Exchange>>>;

/// A plaintext flow from the client pod to the ext pod on `port` (node A, no tunnel), open
/// across a fault: its client end and the server's exchange.
fn plaintext_across(m: &Mesh, port: u16) -> (TcpStream, ExchangeServer) {
    let listener = listen_in(&m.tb.pod_ns(Pod::Ext).unwrap(), ext(port)).unwrap();
    let server = serve_exchanges(listener, 1, 4 << 20, 2);
    (m.connect(ext(port)), server)
}

/// The flow `plaintext_across` opened is served to its end, 4 MiB each way, hashes equal.
fn plaintext_intact(other: TcpStream, server: ExchangeServer) {
    let mine = exchange(other, 4 << 20, 1).expect("the other flow goes on");
    let theirs = server.join().unwrap().expect("ext side")[0];
    assert_eq!((mine.received, theirs.received), (4 << 20, 4 << 20));
    assert_eq!(hex(&mine.sent_hash), hex(&theirs.received_hash));
    assert_eq!(hex(&theirs.sent_hash), hex(&mine.received_hash));
}

/// Node B is killed (SIGKILL: no goodbye, its sockets closed by the kernel) while node A
/// carries a stream to it mid-transfer and a plaintext flow to the ext pod. The client of the
/// stream must see a reset (never a clean end: it would take a cut transfer for a complete
/// one) within seconds; A's other flow goes on with every byte intact; a new connection to B's
/// pods is refused with a reset, not left hanging; A ends at its descriptor baseline and
/// exits 0 on SIGTERM.
#[test]
fn a_peer_node_that_vanishes_resets_its_streams_and_the_rest_is_served() {
    if !root_or_skip("a_peer_node_that_vanishes_resets_its_streams_and_the_rest_is_served") {
        return;
    }
    let mut m = Mesh::start(Path::new(BIN), "io-uring", "");
    let (_l, mut c, s, _) = stream_mid_transfer(&m, 11);
    let (other, other_server) = plaintext_across(&m, 9300);
    assert_eq!(
        m.a().metric("ringtun_hbone_tunnels_open", &[]).unwrap(),
        1.0
    );

    let mut b = m.b.process.take().unwrap();
    b.child.kill().unwrap();
    b.child.wait().unwrap();

    c.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
    let cut = Instant::now();
    match read_until_end(&mut c) {
        Ok(bytes) => panic!(
            "the stream to the vanished node ended cleanly after {} more bytes; a reset was \
             expected\n{}",
            bytes.len(),
            m.a().log_text()
        ),
        Err(e) => assert!(
            is_reset(&e),
            "the stream to the vanished node ended with {e}, not a reset, after {:?}",
            cut.elapsed()
        ),
    }
    eprintln!("stream reset {:?} after node B was killed", cut.elapsed());
    // The flow that never needed B is served to its end, every byte intact.
    plaintext_intact(other, other_server);
    // New work that needs B is refused at once; new work that does not is served.
    m.expect_reset(mesh1(MESH_PORT));
    testbed::exchange_intact(&m.tb, Pod::Ext, ext(9301), 1 << 20);

    let a = m.a.process.take().unwrap();
    assert!(
        wait_for(
            || a.metric("ringtun_hbone_tunnels_open", &[]).unwrap() == 0.0
                && a.metric("ringtun_flows_open", &[]).unwrap() == 0.0
        ),
        "node A still holds the vanished node's tunnel or flows:\n{}",
        a.log_text()
    );
    let failed = a
        .metric("ringtun_hbone_tunnels_closed_total", &["role=\"client\""])
        .unwrap();
    assert!(failed >= 1.0, "the lost tunnel was not counted as closed");
    settle_to(&a, m.a.baseline_fds);
    let log = a.log_text();
    assert_eq!(a.terminate().unwrap(), 0, "node A's exit code; log:\n{log}");
    drop(s);
}

/// iptables in the router namespace dropping every packet between the client pod and mesh-1
/// (both directions) while it lives.
struct Partition<'a> {
    tb: &'a Testbed,
}

impl<'a> Partition<'a> {
    const RULES: [[&'static str; 4]; 2] = [
        ["-s", "10.77.1.2", "-d", "10.77.2.2"],
        ["-s", "10.77.2.2", "-d", "10.77.1.2"],
    ];

    fn iptables(tb: &Testbed, op: &str, rule: &[&str]) {
        let node = tb.node_name();
        let out = Command::new("ip")
            .args(["netns", "exec", &node, "iptables-nft", op, "FORWARD"])
            .args(rule)
            .args(["-j", "DROP"])
            .output()
            .unwrap();
        assert!(out.status.success(), "{out:?}");
    }

    fn start(tb: &'a Testbed) -> Partition<'a> {
        for rule in Self::RULES {
            Self::iptables(tb, "-I", &rule);
        }
        Partition { tb }
    }
}

impl Drop for Partition<'_> {
    fn drop(&mut self) {
        for rule in Self::RULES {
            Self::iptables(self.tb, "-D", &rule);
        }
    }
}

/// The client pod and mesh-1 are cut off from each other mid-transfer (their packets dropped,
/// no FIN, no RST: a partition or a dead host). With a 1 s keepalive and a 2 s timeout both
/// nodes notice within seconds (TCP alone would retransmit for many minutes): the client and
/// mesh-1's application each see a reset, never a clean end; both tunnels are counted closed
/// for `keepalive`; a plaintext flow through node A goes on intact; once the network heals a
/// new connection to mesh-1 is served through a new tunnel; descriptors return to baseline.
#[test]
fn a_partitioned_peer_is_noticed_by_keepalive_and_the_rest_is_served() {
    if !root_or_skip("a_partitioned_peer_is_noticed_by_keepalive_and_the_rest_is_served") {
        return;
    }
    let keepalive = "  hbone:\n    keepalive_interval: 1s\n    keepalive_timeout: 2s\n";
    let m = Mesh::start(Path::new(BIN), "io-uring", keepalive);
    let (l, mut c, mut s, block) = stream_mid_transfer(&m, 12);
    let (other, other_server) = plaintext_across(&m, 9310);

    let partition = Partition::start(&m.tb);
    let cut = Instant::now();
    // Bytes sent into the partition are never delivered: the stream must end in a reset.
    let _ = c.write_all(&block[..64 << 10]);
    c.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
    match read_until_end(&mut c) {
        Ok(bytes) => panic!(
            "the partitioned stream ended cleanly after {} more bytes; a reset was expected\n{}",
            bytes.len(),
            m.a().log_text()
        ),
        Err(e) => assert!(is_reset(&e), "the client saw {e}, not a reset"),
    }
    let noticed = cut.elapsed();
    eprintln!("client stream reset {noticed:?} into the partition");
    assert!(
        noticed < Duration::from_secs(10),
        "the partition took {noticed:?} to notice with a 1 s + 2 s keepalive"
    );
    match read_until_end(&mut s) {
        Ok(bytes) => panic!(
            "mesh-1's application saw a clean end after {} bytes; a reset was expected",
            bytes.len()
        ),
        Err(e) => assert!(is_reset(&e), "mesh-1's application saw {e}, not a reset"),
    }
    for (node, role) in [(m.a(), "client"), (m.b(), "server")] {
        assert!(
            wait_for(|| node
                .metric(
                    "ringtun_hbone_tunnels_closed_total",
                    &[&format!("role=\"{role}\""), "reason=\"keepalive\""]
                )
                .unwrap()
                >= 1.0),
            "the {role} tunnel was not closed for keepalive:\n{}",
            node.log_text()
        );
    }
    // The plaintext flow never crossed the partition: it ends with every byte intact.
    plaintext_intact(other, other_server);
    // Healed: a new connection gets a new tunnel.
    drop(partition);
    testbed::exchange_intact(&m.tb, Pod::Mesh1, mesh1(MESH_PORT + 1), 1 << 20);
    drop((c, s, l));
    m.finish();
}

/// Two streams on one tunnel (node A runs one reactor, so one pool), to two ports of mesh-1: the
/// destination of the first stops reading. The second must not wait for it (its own flow-control
/// window, not the tunnel's, is what fills): 8 MiB each way with both hashes equal, on the same
/// tunnel, while the first is still stalled. Neither node spends CPU while only the stalled stream
/// has bytes to move. Then the first destination reads and every byte it was sent arrives.
#[test]
fn a_destination_that_stops_reading_stalls_only_its_own_stream() {
    if !root_or_skip("a_destination_that_stops_reading_stalls_only_its_own_stream") {
        return;
    }
    let m = Mesh::start_with(Path::new(BIN), "io-uring", "", |n, config| match n {
        MeshNode::A => config.replacen("reactors: 2", "reactors: 1", 1),
        MeshNode::B => config,
    });
    let stalled_listener = m.listen(Pod::Mesh1, MESH_PORT);
    let stalled_client = m.connect(mesh1(MESH_PORT));
    let (mut stalled_server, _) = stalled_listener.accept().unwrap();
    let bytes = 32 << 20;
    let mut data = vec![0u8; bytes];
    Pattern::new(5).fill(&mut data);
    let mut w = stalled_client.try_clone().unwrap();
    let sent = data.clone();
    let writer = std::thread::spawn(move || {
        w.write_all(&sent).unwrap();
        w.shutdown(Shutdown::Write).unwrap();
    });
    // Let the stalled stream fill its window, the pipes and the socket buffers.
    std::thread::sleep(Duration::from_secs(2));
    assert!(
        !writer.is_finished(),
        "the stalled destination took all {bytes} bytes"
    );
    // Nothing moves now: both nodes must wait asleep, not spin on the stalled stream.
    let cpu = || m.a().cpu_seconds().unwrap() + m.b().cpu_seconds().unwrap();
    let before = cpu();
    std::thread::sleep(Duration::from_secs(2));
    let used = cpu() - before;
    assert!(
        used < 0.3,
        "{used:.2} CPU seconds in 2 s with one stream stalled (a busy loop)"
    );

    let flowing = MESH_PORT + 1;
    let server = serve_exchanges(m.listen(Pod::Mesh1, flowing), 1, 8 << 20, 2);
    let c = exchange(m.connect(mesh1(flowing)), 8 << 20, 1).expect("the other stream flows");
    let s = server.join().unwrap().expect("mesh-1 side")[0];
    assert_eq!((c.received, s.received), (8 << 20, 8 << 20), "bytes lost");
    assert_eq!(hex(&c.sent_hash), hex(&s.received_hash));
    assert_eq!(hex(&s.sent_hash), hex(&c.received_hash));
    assert!(
        !writer.is_finished(),
        "the stalled stream moved while its destination read nothing"
    );
    let opened = m
        .a()
        .metric("ringtun_hbone_tunnels_total", &["role=\"client\""])
        .unwrap();
    assert_eq!(opened, 1.0, "both streams were to share one tunnel");

    stalled_server
        .set_read_timeout(Some(Duration::from_secs(60)))
        .unwrap();
    let mut got = Vec::new();
    stalled_server.read_to_end(&mut got).unwrap();
    writer.join().unwrap();
    assert_eq!(got.len(), bytes, "bytes missing after the stall");
    assert!(got == data, "bytes differ after the stall");
    drop((stalled_client, stalled_server));
    m.finish();
}

/// The open-files limit the node of [`a_node_short_of_descriptors_refuses_over_its_budget`]
/// is started with.
const NOFILE: u64 = 256;

/// ringtun in the node namespace under `ulimit -n NOFILE`, set by the shell that then execs
/// it (same pid, so signals and `/proc` reach ringtun itself).
fn spawn_with_nofile(tb: &Testbed, config: &str) -> RingtunProcess {
    let dir = std::env::temp_dir().join(&tb.prefix);
    std::fs::create_dir_all(&dir).unwrap();
    let wrapper = dir.join("ringtun-nofile.sh");
    std::fs::write(
        &wrapper,
        format!("#!/bin/sh\nulimit -n {NOFILE} || exit 70\nexec {BIN} \"$@\"\n"),
    )
    .unwrap();
    let chmod = Command::new("chmod").arg("+x").arg(&wrapper).status();
    assert!(chmod.unwrap().success());
    RingtunProcess::spawn(&wrapper, tb, config, &["--driver", "io-uring"]).expect("ringtun starts")
}

/// Accepts connections on `l`: each answers one byte with one byte, then reads to its end.
fn serve_one_byte_each(l: TcpListener) {
    std::thread::spawn(move || {
        for s in l.incoming() {
            let Ok(mut s) = s else { return };
            std::thread::spawn(move || {
                let mut b = [0u8; 1];
                if s.read_exact(&mut b).is_ok() && s.write_all(&b).is_ok() {
                    let _ = read_until_end(&mut s);
                }
            });
        }
    });
}

/// Connects `n` clients and asks each for one byte back: the served ones (kept open), and how
/// many were refused with a reset.
fn try_connections(tb: &Testbed, to: SocketAddr, n: usize) -> (Vec<TcpStream>, usize) {
    let ns = tb.pod_ns(Pod::Client).unwrap();
    let (mut served, mut refused) = (Vec::new(), 0);
    let mut clients = Vec::new();
    for _ in 0..n {
        match connect_in(&ns, to) {
            Ok(c) => clients.push(c),
            // Refused before the connect call even returned.
            Err(e) if is_reset(&e) => refused += 1,
            Err(e) => panic!("connect: {e}"),
        }
    }
    for mut c in clients {
        c.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
        let mut b = [0u8; 1];
        match c.write_all(b"x").and_then(|_| c.read_exact(&mut b)) {
            Ok(()) => served.push(c),
            Err(e) if is_reset(&e) => refused += 1,
            Err(e) => panic!("a connection neither served nor reset: {e}"),
        }
    }
    (served, refused)
}

/// With 256 descriptors, 2 reactors and 4 handshakes each, each reactor's share is (256 − 128
/// reserved − 8) / 2 = 60 descriptors: 7 pipes (an eighth of the share: 14 descriptors) and
/// (60 − 14) / 2 = 23 flows. 100 clients: 46 served, 54 refused with a reset and counted as
/// `flow_limit` (each with an access record), and no accept ever fails for want of a
/// descriptor — the budget kept the node inside its limit. When the served ones close, new
/// clients are served again, and the descriptors return to the baseline.
#[test]
fn a_node_short_of_descriptors_refuses_over_its_budget() {
    if !root_or_skip("a_node_short_of_descriptors_refuses_over_its_budget") {
        return;
    }
    let tb = Testbed::create("fd").expect("testbed");
    let config = tb.config_yaml(2, "  limits: {max_handshakes_per_reactor: 4}\n");
    let cfg_path = std::env::temp_dir().join(&tb.prefix).join("capture.yaml");
    std::fs::create_dir_all(cfg_path.parent().unwrap()).unwrap();
    std::fs::write(&cfg_path, &config).unwrap();
    tb.install_capture(Path::new(BIN), &Testbed::captured_pods(), &cfg_path);
    let r = spawn_with_nofile(&tb, &config);
    assert!(
        r.log_text()
            .contains(&format!("open files limit {NOFILE} (hard {NOFILE})")),
        "the lowered limit is not the node's:\n{}",
        r.log_text()
    );
    let baseline = settled_fds(&r);
    let to = ext(9400);
    serve_one_byte_each(listen_in(&tb.pod_ns(Pod::Ext).unwrap(), to).unwrap());

    let (served, refused) = try_connections(&tb, to, 100);
    assert_eq!(
        (served.len(), refused),
        (46, 54),
        "served and refused with a budget of 23 flows per reactor"
    );
    assert_eq!(
        r.metric("ringtun_pipe_budget_per_reactor", &[]).unwrap(),
        7.0
    );
    let limited = |r: &RingtunProcess| {
        r.metric(
            "ringtun_connection_failures_total",
            &["reason=\"flow_limit\""],
        )
        .unwrap()
    };
    assert!(
        wait_for(|| limited(&r) == 54.0),
        "flow_limit refusals counted: {}",
        limited(&r)
    );
    let records = r
        .access_records()
        .iter()
        .filter(|rec| rec["failure_reason"] == "flow_limit")
        .count();
    assert_eq!(records, 54, "an access record for every refusal");
    let accept_failures = r
        .metric("ringtun_connection_failures_total", &["reason=\"accept\""])
        .unwrap();
    assert_eq!(
        accept_failures, 0.0,
        "an accept failed: the budget did not fit the limit"
    );

    drop(served);
    assert!(
        wait_for(|| r.metric("ringtun_flows_open", &[]).unwrap() == 0.0),
        "flows still open after their clients left"
    );
    let (again, refused_again) = try_connections(&tb, to, 10);
    assert_eq!(
        (again.len(), refused_again),
        (10, 0),
        "served again once there was room"
    );
    drop(again);
    assert!(wait_for(
        || r.metric("ringtun_flows_open", &[]).unwrap() == 0.0
    ));
    settle_to(&r, baseline);
    assert_eq!(limited(&r), 54.0);
    let log = r.log_text();
    assert_eq!(
        r.terminate().unwrap(),
        0,
        "exit code after SIGTERM; log:\n{log}"
    );
}

/// Sets a `fs.` sysctl for as long as it lives, then puts the old value back.
struct Sysctl {
    key: &'static str,
    old: String,
}

impl Sysctl {
    fn set(key: &'static str, value: &str) -> Sysctl {
        let path = format!("/proc/sys/{}", key.replace('.', "/"));
        let old = std::fs::read_to_string(&path).unwrap().trim().to_string();
        std::fs::write(&path, value).unwrap();
        Sysctl { key, old }
    }
}

impl Drop for Sysctl {
    fn drop(&mut self) {
        let path = format!("/proc/sys/{}", self.key.replace('.', "/"));
        let _ = std::fs::write(path, &self.old);
    }
}

/// The per-user pipe budget (`fs.pipe-user-pages-soft`, `-hard`) binds only a process without
/// CAP_SYS_RESOURCE and CAP_SYS_ADMIN: a host-mode node (no `setns`) run without them. Over
/// the soft budget its pipes are small (2 pages) and cannot be resized: it serves on, every
/// byte intact, the refusal counted. Over the hard budget it can make no pipe at all: a
/// connection opened before and one opened after both go on, their bytes copied through user
/// space, every byte intact both ways, the refusals counted and no connection failed; with the
/// budget back, new connections splice again and descriptors return to their baseline.
#[test]
fn a_node_over_the_pipe_budget_copies_and_loses_no_byte() {
    if !root_or_skip("a_node_over_the_pipe_budget_copies_and_loses_no_byte") {
        return;
    }
    let tb = Testbed::create("pb").expect("testbed");
    let host = tb.pod_name(Pod::Client);
    let config = format!(
        "version: 1\nnode:\n  name: node-a\n  reactors: 1\n  admin: 127.0.0.1:15000\n  metrics: 127.0.0.1:15020\n  readiness: 127.0.0.1:15021\n  splice: {{pipe_pool_size: 0}}\nworkloads:\n  - name: host\n    namespace: default\n    ips: [{}]\n    node: node-a\n    protocol: TCP\n",
        Pod::Client.v4(),
    );
    let dir = std::env::temp_dir().join(&tb.prefix);
    std::fs::create_dir_all(&dir).unwrap();
    let cfg_path = dir.join("host.yaml");
    std::fs::write(&cfg_path, &config).unwrap();
    tb.install_capture(Path::new(BIN), &[Pod::Client], &cfg_path);
    let wrapper = dir.join("ringtun-unprivileged-pipes.sh");
    let drop_caps = "--inh-caps=-sys_resource,-sys_admin --bounding-set=-sys_resource,-sys_admin";
    std::fs::write(
        &wrapper,
        format!("#!/bin/sh\nexec setpriv {drop_caps} {BIN} \"$@\"\n"),
    )
    .unwrap();
    assert!(Command::new("chmod")
        .arg("+x")
        .arg(&wrapper)
        .status()
        .unwrap()
        .success());
    let r = RingtunProcess::spawn_in(&wrapper, &tb, &host, &config, &["--driver", "io-uring"])
        .expect("ringtun starts without CAP_SYS_RESOURCE and CAP_SYS_ADMIN");
    let baseline = settled_fds(&r);

    // Over the soft budget: small pipes, still every byte.
    let soft = Sysctl::set("fs.pipe-user-pages-soft", "1");
    testbed::exchange_intact(&tb, Pod::Ext, ext(9500), 4 << 20);
    assert!(
        r.metric("ringtun_pipe_resize_refused_total", &[]).unwrap() >= 1.0,
        "no pipe resize was refused over the soft budget:\n{}",
        r.log_text()
    );

    // A connection opened before the hard budget binds, which has moved bytes both ways.
    let held_listener = listen_in(&tb.pod_ns(Pod::Ext).unwrap(), ext(9501)).unwrap();
    let held_server = std::thread::spawn(move || {
        let (mut s, _) = held_listener.accept()?;
        s.set_read_timeout(Some(Duration::from_secs(60)))?;
        let mut one = [0u8; 1];
        s.read_exact(&mut one)?;
        s.write_all(&one)?;
        exchange(s, 4 << 20, 2)
    });
    let mut held = connect_in(&tb.pod_ns(Pod::Client).unwrap(), ext(9501)).unwrap();
    held.write_all(b"x").unwrap();
    let mut one = [0u8; 1];
    held.read_exact(&mut one).unwrap();

    // Over the hard budget no pipe can be made (the pool keeps none: pipe_pool_size 0).
    let hard = Sysctl::set("fs.pipe-user-pages-hard", "1");
    let refused_before = r.metric("ringtun_pipes_refused_total", &[]).unwrap();
    // The connection opened before goes on, every byte both ways.
    let mine = exchange(held, 4 << 20, 1).expect("the open connection goes on");
    let theirs = held_server.join().unwrap().expect("ext side");
    assert_eq!((mine.received, theirs.received), (4 << 20, 4 << 20));
    assert_eq!(hex(&mine.sent_hash), hex(&theirs.received_hash));
    assert_eq!(hex(&theirs.sent_hash), hex(&mine.received_hash));
    // So does one opened now.
    testbed::exchange_intact(&tb, Pod::Ext, ext(9502), 4 << 20);
    assert!(
        r.metric("ringtun_pipes_refused_total", &[]).unwrap() > refused_before,
        "no pipe was refused over the hard budget:\n{}",
        r.log_text()
    );
    assert_eq!(
        r.metric("ringtun_connection_failures_total", &[]).unwrap(),
        0.0,
        "a connection failed for want of a pipe:\n{}",
        r.log_text()
    );
    assert!(
        r.log_text().contains("the kernel would not make a pipe"),
        "the refusal was not logged:\n{}",
        r.log_text()
    );

    // The budget back: new connections are served; descriptors return to the baseline.
    drop(hard);
    drop(soft);
    testbed::exchange_intact(&tb, Pod::Ext, ext(9503), 1 << 20);
    assert!(
        wait_for(|| r.metric("ringtun_flows_open", &[]).unwrap() == 0.0),
        "flows still open:\n{}",
        r.log_text()
    );
    settle_to(&r, baseline);
    let log = r.log_text();
    assert_eq!(r.terminate().unwrap(), 0, "exit code; log:\n{log}");
}
