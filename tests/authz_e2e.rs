//! Authorization on the destination node, as root, over two ringtun nodes in network
//! namespaces (`testbed::two_nodes`): node A serves the client pod, node B serves mesh-1 and
//! mesh-2 (HBONE) and holds the policies. What a user of the mesh would see: allowed
//! connections carry their bytes intact, denied CONNECTs are answered 401 and the client is
//! reset, denied plaintext is reset, the destination application never sees a denied
//! connection, and every refusal is in node B's access log and metrics with the policy and
//! rule that decided. The certificates the tunnels present are here too: listed, rotated
//! under open tunnels and under a steady load of new connections, and never presented outside
//! their validity.
//!
//! Policy enforcement does not depend on the readiness driver (it runs once per connection,
//! before any byte moves), so these tests run on io_uring only; `hbone_e2e` covers the drivers.
//!
//! Without root each test prints `SKIPPED (needs root)`; with `CI` set it fails.

use std::io::{self, Read, Write};
use std::net::{Shutdown, SocketAddr};
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering::SeqCst};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant, SystemTime};

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::CertificateDer;
use sha2::{Digest, Sha256};

use ringtun::control_plane::certs::{
    identity_dir, load_trust_bundle, load_workload_credentials, DevCa, CA_CERT_FILE, CA_KEY_FILE,
    CERT_FILE, KEY_FILE,
};
use ringtun::control_plane::config::CipherChoice;
use ringtun::control_plane::identity::SpiffeId;
use ringtun::testbed::two_nodes::{expect_reset_from, wait_for, Mesh};
use ringtun::testbed::{self, root_or_skip, MeshNode, Pod, RingtunProcess, MESH_PORT};
use ringtun::tls::{server_name, ClientTls};

const BIN: &str = env!("CARGO_BIN_EXE_ringtun");

fn bin() -> &'static Path {
    Path::new(BIN)
}

/// Node B gets `policies` (YAML, the whole `policies:` section); node A none.
fn mesh_with_policies(policies: &'static str) -> Mesh {
    Mesh::start_with(bin(), "io-uring", "", move |n, c| match n {
        MeshNode::A => c,
        MeshNode::B => format!("{c}{policies}"),
    })
}

fn mesh1(port: u16) -> SocketAddr {
    SocketAddr::new(Pod::Mesh1.v4(), port)
}

/// The first access record on `r` for which `pick` holds (waits up to 10 s for it).
fn record(r: &RingtunProcess, pick: impl Fn(&serde_json::Value) -> bool) -> serde_json::Value {
    let mut found = None;
    wait_for(|| {
        found = r.access_records().into_iter().find(|rec| pick(rec));
        found.is_some()
    });
    found.unwrap_or_else(|| panic!("no such access record; the log:\n{}", r.log_text()))
}

fn metric_reaches(r: &RingtunProcess, name: &str, labels: &[&str], at_least: f64) {
    let ok = wait_for(|| r.metric(name, labels).unwrap_or(0.0) >= at_least);
    assert!(
        ok,
        "{name}{labels:?} did not reach {at_least}:\n{}",
        r.metrics().unwrap_or_default()
    );
}

/// A listener in mesh-1 that must never see a connection; call `assert_untouched` after.
struct Untouched(std::net::TcpListener);

impl Untouched {
    fn on(m: &Mesh, port: u16) -> Untouched {
        let l = m.listen(Pod::Mesh1, port);
        l.set_nonblocking(true).unwrap();
        Untouched(l)
    }

    fn assert_untouched(&self) {
        assert!(
            self.0.accept().is_err(),
            "a denied connection reached the application"
        );
    }
}

const TWO_ALLOWS_AND_A_DENY: &str = "policies:
  - name: client-to-8080
    namespace: default
    rules:
      - from: [{source: {principals: [cluster.local/ns/default/sa/client]}}]
        to: [{operation: {ports: [8080]}}]
  - name: mesh2-to-9090
    namespace: default
    rules:
      - from: [{source: {principals: [cluster.local/ns/default/sa/mesh-2]}}]
        to: [{operation: {ports: [9090]}}]
  - name: no-8081
    namespace: default
    action: DENY
    rules:
      - to: [{operation: {ports: [9999]}}]
      - to: [{operation: {ports: [8081]}}]
";

#[test]
fn allowed_identity_passes_and_a_denied_one_gets_401_and_a_reset() {
    if !root_or_skip("allowed_identity_passes_and_a_denied_one_gets_401_and_a_reset") {
        return;
    }
    let m = mesh_with_policies(TWO_ALLOWS_AND_A_DENY);

    // Allowed: the client's certificate names the principal client-to-8080 allows.
    testbed::exchange_intact(&m.tb, Pod::Mesh1, mesh1(MESH_PORT), 1 << 20);
    let ok = record(m.b(), |r| r["status"] == 200);
    assert_eq!(ok["policy"], "default/client-to-8080", "{ok}");
    assert_eq!(ok["policy_rule"], 0, "{ok}");
    assert_eq!(
        ok["source_workload"], "spiffe://cluster.local/ns/default/sa/client",
        "{ok}"
    );

    // Port 9090 only admits mesh-2's identity: the client's is refused, 401, reset.
    let app = Untouched::on(&m, 9090);
    m.expect_reset(mesh1(9090));
    let denied = record(m.b(), |r| r["status"] == 401);
    assert_eq!(denied["failure_class"], "policy", "{denied}");
    assert_eq!(denied["failure_reason"], "policy_denied", "{denied}");
    assert_eq!(denied["reason"], "no_allow_match", "{denied}");
    assert_eq!(denied["destination"], "workload:default/mesh-1", "{denied}");
    assert!(denied.get("policy").is_none(), "{denied}");
    metric_reaches(
        m.b(),
        "ringtun_policy_denials_total",
        &["policy=\"\"", "reason=\"no_allow_match\"", "at=\"connect\""],
        1.0,
    );

    // A DENY rule: the record and the metric name the policy and the rule (the second).
    m.expect_reset(mesh1(8081));
    let denied = record(m.b(), |r| r["reason"] == "deny_rule");
    assert_eq!(denied["policy"], "default/no-8081", "{denied}");
    assert_eq!(denied["policy_rule"], 1, "{denied}");
    assert_eq!(denied["status"], 401, "{denied}");
    metric_reaches(
        m.b(),
        "ringtun_policy_denials_total",
        &[
            "policy=\"default/no-8081\"",
            "rule=\"1\"",
            "reason=\"deny_rule\"",
        ],
        1.0,
    );
    metric_reaches(
        m.b(),
        "ringtun_hbone_streams_total",
        &["role=\"server\"", "status=\"401\""],
        2.0,
    );
    metric_reaches(
        m.b(),
        "ringtun_connection_failures_total",
        &["class=\"policy\"", "reason=\"policy_denied\""],
        2.0,
    );
    // The client's node saw the answer and reset its client.
    metric_reaches(
        m.a(),
        "ringtun_hbone_streams_total",
        &["role=\"client\"", "status=\"401\""],
        2.0,
    );
    let seen = record(m.a(), |r| r["status"] == 401);
    assert_eq!(seen["failure_reason"], "hbone_connect_rejected", "{seen}");
    std::thread::sleep(Duration::from_millis(200));
    app.assert_untouched();
    m.finish();
}

/// Istio's PeerAuthentication STRICT as a policy: plaintext has no identity, so
/// `not_principals: ["*"]` matches it; tunnelled connections carry one and pass.
const STRICT_ON_8080: &str = "policies:
  - name: strict
    namespace: istio-system
    action: DENY
    rules:
      - from: [{source: {not_principals: ['*']}}]
        to: [{operation: {ports: [8080]}}]
";

#[test]
fn plaintext_without_identity_is_reset_and_tunnels_pass() {
    if !root_or_skip("plaintext_without_identity_is_reset_and_tunnels_pass") {
        return;
    }
    let m = mesh_with_policies(STRICT_ON_8080);
    // The ext pod is outside the mesh: its connection to mesh-1 arrives in plaintext on
    // node B's 15006.
    let app = Untouched::on(&m, MESH_PORT);
    expect_reset_from(&m.tb, Pod::Ext, mesh1(MESH_PORT));
    std::thread::sleep(Duration::from_millis(200));
    app.assert_untouched();
    drop(app);
    let denied = record(m.b(), |r| r["reason"] == "deny_rule");
    assert_eq!(denied["direction"], "inbound", "{denied}");
    assert_eq!(denied["policy"], "istio-system/strict", "{denied}");
    assert_eq!(denied["failure_reason"], "policy_denied", "{denied}");
    let client = denied["client"].as_str().unwrap_or_default();
    assert!(
        client.starts_with(&format!("{}:", Pod::Ext.v4())),
        "{denied}"
    );
    metric_reaches(
        m.b(),
        "ringtun_policy_denials_total",
        &["policy=\"istio-system/strict\"", "at=\"connect\""],
        1.0,
    );

    // Plaintext to a port the policy leaves alone passes.
    testbed_exchange_from(&m, Pod::Ext, mesh1(8082), 64 << 10);
    // The client's connection goes through a tunnel and has an identity: it passes.
    testbed::exchange_intact(&m.tb, Pod::Mesh1, mesh1(MESH_PORT), 1 << 20);
    m.finish();
}

/// An exchange from `from` to a server in mesh-1 at `to`, bytes intact both ways.
fn testbed_exchange_from(m: &Mesh, from: Pod, to: SocketAddr, bytes: u64) {
    let l = m.listen(Pod::Mesh1, to.port());
    let server = testbed::serve_exchanges(l, 1, bytes, 2);
    let c = testbed::connect_in(&m.tb.pod_ns(from).unwrap(), to).expect("connects");
    let got = testbed::exchange(c, bytes, 1).expect("client exchange");
    let s = server.join().unwrap().expect("server exchange")[0];
    assert_eq!((got.received, s.received), (bytes, bytes), "bytes lost");
    assert_eq!(got.sent_hash, s.received_hash);
    assert_eq!(s.sent_hash, got.received_hash);
}

/// Replaces a node's configuration file the way editors and Kubernetes do (write, rename).
fn rewrite_config(r: &RingtunProcess, text: &str) {
    let tmp = r.config.with_extension("new");
    std::fs::write(&tmp, text).unwrap();
    std::fs::rename(&tmp, &r.config).unwrap();
}

fn config_dump(r: &RingtunProcess, port_base: u16) -> serde_json::Value {
    let (status, body) = r.get(port_base, "/config_dump").expect("admin endpoint");
    assert_eq!(status, 200, "{body}");
    serde_json::from_str(&body).expect("config_dump is JSON")
}

const ONLY_CLIENT_ON_8080: &str = "policies:
  - name: client-to-8080
    namespace: default
    rules:
      - from: [{source: {principals: [cluster.local/ns/default/sa/client]}}]
        to: [{operation: {ports: [8080]}}]
";

const DENY_8080: &str = "policies:
  - name: closed-8080
    namespace: default
    action: DENY
    rules:
      - to: [{operation: {ports: [8080]}}]
";

#[test]
fn a_broken_reload_changes_nothing_and_a_good_one_applies_to_new_connections() {
    if !root_or_skip("a_broken_reload_changes_nothing_and_a_good_one_applies_to_new_connections") {
        return;
    }
    let m = mesh_with_policies(ONLY_CLIENT_ON_8080);
    let b = m.b();
    let base = MeshNode::B.port_base();
    let running = std::fs::read_to_string(&b.config).unwrap();
    testbed::exchange_intact(&m.tb, Pod::Mesh1, mesh1(MESH_PORT), 1 << 20);

    // A broken file (a policy port out of range) and SIGHUP: refused, counted, explained; the
    // running policy keeps serving.
    rewrite_config(b, &running.replace("ports: [8080]", "ports: [80800]"));
    b.hangup().unwrap();
    metric_reaches(
        b,
        "ringtun_config_reloads_total",
        &["result=\"failed\""],
        1.0,
    );
    let dump = config_dump(b, base);
    assert_eq!(dump["generation"], 1, "{dump}");
    let error = dump["reload"]["last_error"].as_str().unwrap_or_default();
    assert!(
        error.contains("policies[0].rules[0].to[0].operation.ports[0]"),
        "{dump}"
    );
    testbed::exchange_intact(&m.tb, Pod::Mesh1, mesh1(MESH_PORT), 1 << 20);
    assert!(b
        .log_text()
        .contains("configuration reload failed; generation 1 keeps running"));

    // A good file, no signal: the change of the file is enough. New connections meet the new
    // policy at once.
    let denying = running.replace(ONLY_CLIENT_ON_8080, DENY_8080);
    assert_ne!(denying, running);
    rewrite_config(b, &denying);
    metric_reaches(b, "ringtun_config_generation", &[], 2.0);
    let app = Untouched::on(&m, MESH_PORT);
    m.expect_reset(mesh1(MESH_PORT));
    let denied = record(b, |r| r["policy"] == "default/closed-8080");
    assert_eq!(denied["status"], 401, "{denied}");
    std::thread::sleep(Duration::from_millis(200));
    app.assert_untouched();
    let dump = config_dump(b, base);
    assert_eq!(dump["generation"], 2, "{dump}");
    assert!(dump["reload"]["last_error"].is_null(), "{dump}");
    assert_eq!(
        dump["config"]["policies"][0]["name"], "closed-8080",
        "{dump}"
    );
    m.finish();
}

/// A connection kept busy: the client writes pattern bytes at a steady pace until told to
/// stop, the server in the destination pod echoes everything back, and both ends hash what
/// they saw. A cut shows up as an error on the client, with the moment it came.
struct Live {
    stop: Arc<AtomicBool>,
    /// The writer stops writing but leaves the connection open (see [`Live::hold_writes`]).
    hold: Arc<AtomicBool>,
    /// The destination application accepted the connection: the node admitted it.
    admitted: Arc<AtomicBool>,
    writer: JoinHandle<Hashed>,
    reader: JoinHandle<Hashed>,
    server: JoinHandle<io::Result<(u64, [u8; 32])>>,
}

/// Bytes counted and hashed, or the error that ended them and when it came.
type Hashed = Result<(u64, [u8; 32]), (io::Error, Instant)>;

/// The client's end of a [`Live`] connection.
struct LiveEnd {
    sent: u64,
    sent_hash: [u8; 32],
    echoed: u64,
    echoed_hash: [u8; 32],
    server_got: u64,
    server_hash: [u8; 32],
}

impl Live {
    fn start(m: &Mesh, from: Pod, to: SocketAddr, server_pod: Pod) -> Live {
        let listener = testbed::listen_in(&m.tb.pod_ns(server_pod).unwrap(), to).unwrap();
        let admitted = Arc::new(AtomicBool::new(false));
        let accepted = Arc::clone(&admitted);
        let server = std::thread::spawn(move || -> io::Result<(u64, [u8; 32])> {
            let (mut s, _) = listener.accept()?;
            accepted.store(true, SeqCst);
            s.set_read_timeout(Some(Duration::from_secs(60)))?;
            let mut h = Sha256::new();
            let mut n = 0u64;
            let mut buf = vec![0u8; 64 * 1024];
            loop {
                let got = match s.read(&mut buf) {
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                    r => r?,
                };
                if got == 0 {
                    s.shutdown(Shutdown::Write)?;
                    return Ok((n, h.finalize().into()));
                }
                h.update(&buf[..got]);
                n += got as u64;
                s.write_all(&buf[..got])?;
            }
        });
        let client = testbed::connect_in(&m.tb.pod_ns(from).unwrap(), to).expect("connects");
        client
            .set_read_timeout(Some(Duration::from_secs(60)))
            .unwrap();
        let stop = Arc::new(AtomicBool::new(false));
        let hold = Arc::new(AtomicBool::new(false));
        let mut w = client.try_clone().unwrap();
        let stop_w = Arc::clone(&stop);
        let hold_w = Arc::clone(&hold);
        let writer = std::thread::spawn(move || {
            let mut p = testbed::Pattern::new(7);
            let mut h = Sha256::new();
            let mut n = 0u64;
            let mut buf = vec![0u8; 16 * 1024];
            while !stop_w.load(SeqCst) {
                if hold_w.load(SeqCst) {
                    return Ok((n, h.finalize().into()));
                }
                p.fill(&mut buf);
                w.write_all(&buf).map_err(|e| (e, Instant::now()))?;
                h.update(&buf);
                n += buf.len() as u64;
                std::thread::sleep(Duration::from_millis(5));
            }
            w.shutdown(Shutdown::Write)
                .map_err(|e| (e, Instant::now()))?;
            Ok((n, h.finalize().into()))
        });
        let mut r = client;
        let reader =
            std::thread::spawn(move || testbed::recv_hash(&mut r).map_err(|e| (e, Instant::now())));
        Live {
            stop,
            hold,
            admitted,
            writer,
            reader,
            server,
        }
    }

    /// Waits until the destination application has the connection, so a change made next
    /// meets it open (a fixed sleep is not enough on a loaded machine).
    fn wait_admitted(&self) {
        assert!(
            wait_for(|| self.admitted.load(SeqCst)),
            "the connection never reached the application"
        );
    }

    /// Stops writing, leaving the connection open, and waits until the writer has stopped.
    /// Before a cut: a reset is reported once, to whichever call meets it first, so a write
    /// racing the reader would take the ECONNRESET and leave the reader an end of file that
    /// looks clean.
    fn hold_writes(&self) {
        self.hold.store(true, SeqCst);
        assert!(
            wait_for(|| self.writer.is_finished()),
            "the writer did not stop"
        );
    }

    /// Stops sending and waits for both ends: the bytes each way, hashed.
    fn finish(self) -> LiveEnd {
        self.stop.store(true, SeqCst);
        let (sent, sent_hash) = self
            .writer
            .join()
            .unwrap()
            .unwrap_or_else(|(e, _)| panic!("an allowed connection failed sending: {e}"));
        let (echoed, echoed_hash) = self
            .reader
            .join()
            .unwrap()
            .unwrap_or_else(|(e, _)| panic!("an allowed connection failed receiving: {e}"));
        let (server_got, server_hash) = self.server.join().unwrap().expect("server side");
        LiveEnd {
            sent,
            sent_hash,
            echoed,
            echoed_hash,
            server_got,
            server_hash,
        }
    }

    /// Waits (up to 10 s) for the client to see its connection reset; when it did. `m`'s node
    /// logs are shown if it did not.
    fn cut_at(self, m: &Mesh, what: &str) -> Instant {
        let logs = || {
            format!(
                "node A:\n{}\nnode B:\n{}",
                m.a().log_text(),
                m.b().log_text()
            )
        };
        let (e, at) = match self.reader.join().unwrap() {
            Err(cut) => cut,
            Ok((n, _)) => panic!(
                "the {what} connection ended cleanly after {n} bytes; a reset was expected\n{}",
                logs()
            ),
        };
        assert!(
            testbed::is_reset(&e),
            "the {what} connection: expected a reset, got {e}\n{}",
            logs()
        );
        self.stop.store(true, SeqCst);
        let _ = self.writer.join();
        let _ = self.server.join();
        at
    }
}

fn assert_intact(end: &LiveEnd) {
    assert!(end.sent > 0);
    assert_eq!(
        end.server_got, end.sent,
        "bytes lost on the way to the server"
    );
    assert_eq!(end.server_hash, end.sent_hash, "bytes changed on the way");
    assert_eq!(end.echoed, end.sent, "bytes lost on the way back");
    assert_eq!(
        end.echoed_hash, end.sent_hash,
        "bytes changed on the way back"
    );
}

const CLIENT_ON_8080_AND_9090: &str = "policies:
  - name: client-in
    namespace: default
    rules:
      - from: [{source: {principals: [cluster.local/ns/default/sa/client]}}]
        to: [{operation: {ports: [8080, 9090]}}]
      - to: [{operation: {ports: [8081]}}]
";

/// The same policy after the change: 9090 and plaintext 8081 no longer admitted.
const CLIENT_ON_8080_ONLY: &str = "policies:
  - name: client-in
    namespace: default
    rules:
      - from: [{source: {principals: [cluster.local/ns/default/sa/client]}}]
        to: [{operation: {ports: [8080]}}]
";

#[test]
fn a_reload_cuts_what_it_denies_within_a_second_and_leaves_the_rest_intact() {
    if !root_or_skip("a_reload_cuts_what_it_denies_within_a_second_and_leaves_the_rest_intact") {
        return;
    }
    let m = mesh_with_policies(CLIENT_ON_8080_AND_9090);
    let b = m.b();
    let keeps = Live::start(&m, Pod::Client, mesh1(MESH_PORT), Pod::Mesh1);
    let tunnelled = Live::start(&m, Pod::Client, mesh1(9090), Pod::Mesh1);
    let plaintext = Live::start(&m, Pod::Ext, mesh1(8081), Pod::Mesh1);
    for live in [&keeps, &tunnelled, &plaintext] {
        live.wait_admitted();
    }
    // Bytes flowing both ways before the reload.
    std::thread::sleep(Duration::from_millis(200));
    for live in [&tunnelled, &plaintext] {
        live.hold_writes();
    }

    let running = std::fs::read_to_string(&b.config).unwrap();
    rewrite_config(
        b,
        &running.replace(CLIENT_ON_8080_AND_9090, CLIENT_ON_8080_ONLY),
    );
    let asked = Instant::now();
    b.hangup().unwrap();
    for (what, live) in [("tunnelled", tunnelled), ("plaintext", plaintext)] {
        let took = live.cut_at(&m, what).saturating_duration_since(asked);
        eprintln!("{what} connection cut {took:?} after SIGHUP");
        assert!(
            took < Duration::from_secs(1),
            "the {what} connection was cut {took:?} after the reload was asked for"
        );
    }
    // The allowed connection goes on through and after the reload, every byte intact.
    std::thread::sleep(Duration::from_millis(500));
    assert_intact(&keeps.finish());

    metric_reaches(
        b,
        "ringtun_flows_closed_total",
        &["end=\"policy_denied\""],
        2.0,
    );
    metric_reaches(
        b,
        "ringtun_policy_denials_total",
        &["reason=\"no_allow_match\"", "at=\"reload\""],
        2.0,
    );
    for direction in ["inbound_hbone", "inbound"] {
        let rec = record(b, |r| {
            r["end"] == "policy_denied" && r["direction"] == direction
        });
        assert_eq!(rec["reason"], "no_allow_match", "{rec}");
    }
    m.finish();
}

/// Node B starts without mesh-2 (it is on a node that does not exist) and a short drain.
fn mesh_without_mesh2() -> Mesh {
    Mesh::start_with(
        bin(),
        "io-uring",
        "  timeouts: {drain: 2s}\n",
        |n, c| match n {
            MeshNode::A => c,
            MeshNode::B => move_mesh2(&c, "node-b", "node-c"),
        },
    )
}

fn move_mesh2(config: &str, from: &str, to: &str) -> String {
    let at = config.find("name: mesh-2").expect("mesh-2 in the config");
    let (head, tail) = config.split_at(at);
    let moved = tail.replacen(&format!("node: {from}"), &format!("node: {to}"), 1);
    assert_ne!(moved, tail, "mesh-2 is not on {from}");
    format!("{head}{moved}")
}

fn mesh2(port: u16) -> SocketAddr {
    SocketAddr::new(Pod::Mesh2.v4(), port)
}

#[test]
fn a_workload_a_reload_adds_is_served_and_one_it_removes_is_drained() {
    if !root_or_skip("a_workload_a_reload_adds_is_served_and_one_it_removes_is_drained") {
        return;
    }
    let m = mesh_without_mesh2();
    let b = m.b();
    // Node A tunnels to mesh-2's 15008; nobody listens there yet.
    m.expect_reset(mesh2(MESH_PORT));

    let without = std::fs::read_to_string(&b.config).unwrap();
    let with = move_mesh2(&without, "node-c", "node-b");
    rewrite_config(b, &with);
    metric_reaches(b, "ringtun_config_generation", &[], 2.0);
    // Its listeners exist now, in its namespace, and the capture there reaches them.
    testbed::exchange_intact(&m.tb, Pod::Mesh2, mesh2(MESH_PORT), 1 << 20);
    assert!(b.log_text().contains("for workload default/mesh-2"));

    // Removed again while a connection is open: new connections are refused at once, the
    // open one goes on until the drain deadline (2 s), then is reset.
    let open = Live::start(&m, Pod::Client, mesh2(9090), Pod::Mesh2);
    open.wait_admitted();
    rewrite_config(b, &without);
    let removed = Instant::now();
    metric_reaches(b, "ringtun_config_generation", &[], 3.0);
    m.expect_reset(mesh2(MESH_PORT));
    // Bytes flow for most of the drain; then only the reader waits for the cut.
    std::thread::sleep(Duration::from_millis(1200).saturating_sub(removed.elapsed()));
    open.hold_writes();
    let cut = open
        .cut_at(&m, "drained")
        .saturating_duration_since(removed);
    assert!(
        cut >= Duration::from_millis(1500) && cut < Duration::from_secs(5),
        "the open connection of a removed workload ended {cut:?} after the reload; \
         the drain is 2 s"
    );
    let rec = record(b, |r| r["end"] == "drained");
    assert_eq!(rec["destination"], "workload:default/mesh-2", "{rec}");
    m.finish();
}

// ------------------------------------------------------------------------ certificates

const HOUR: Duration = Duration::from_secs(3600);

fn spiffe(sa: &str) -> SpiffeId {
    SpiffeId::new("cluster.local", "default", sa).unwrap()
}

/// Issues `sa` a new certificate from the mesh's CA, valid from `from` for `validity`, and
/// writes it the way a certificate agent does (new files renamed over the old); its serial.
fn reissue(m: &Mesh, sa: &str, from: SystemTime, validity: Duration) -> String {
    let read = |f: &str| std::fs::read_to_string(m.certs.join(f)).unwrap();
    let ca = DevCa::from_pem(&read(CA_CERT_FILE), &read(CA_KEY_FILE)).unwrap();
    let issued = ca.issue(&spiffe(sa), from, validity).unwrap();
    let dir = identity_dir(&m.certs, &spiffe(sa));
    for (file, text) in [(KEY_FILE, &issued.key_pem), (CERT_FILE, &issued.cert_pem)] {
        let tmp = dir.join(format!("{file}.new"));
        std::fs::write(&tmp, text).unwrap();
        std::fs::rename(&tmp, dir.join(file)).unwrap();
    }
    serial_of(&issued.cert_der)
}

fn serial_of(der: &[u8]) -> String {
    x509_parser::parse_x509_certificate(der)
        .expect("an X.509 certificate")
        .1
        .raw_serial_as_string()
}

/// `GET /certificates` on `r`'s admin endpoint: the entry of `sa`, and the whole body.
fn listed(r: &RingtunProcess, node: MeshNode, sa: &str) -> (serde_json::Value, String) {
    let (status, body) = r
        .get(node.port_base(), "/certificates")
        .expect("admin endpoint");
    assert_eq!(status, 200, "{body}");
    let all: serde_json::Value = serde_json::from_str(&body).expect("JSON");
    let entry = all["certificates"]
        .as_array()
        .expect("a list")
        .iter()
        .find(|c| c["identity"] == spiffe(sa).to_uri())
        .cloned()
        .unwrap_or(serde_json::Value::Null);
    (entry, body)
}

fn wait_listed(r: &RingtunProcess, node: MeshNode, sa: &str, field: &str, value: &str) {
    let ok = wait_for(|| listed(r, node, sa).0[field] == value);
    assert!(
        ok,
        "{sa}'s {field} never became {value}: {}\n{}",
        listed(r, node, sa).1,
        r.log_text()
    );
}

/// Waits until `r` logged its `n`th certificate rotation: every reactor runs on the new
/// credentials (the listing shows them a moment before).
fn rotated(r: &RingtunProcess, n: usize) {
    let line = "certificate files changed";
    let ok = wait_for(|| r.log_text().matches(line).count() >= n);
    assert!(ok, "no {n}th `{line}`:\n{}", r.log_text());
}

fn logged(r: &RingtunProcess, line: &str) {
    assert!(
        wait_for(|| r.log_text().contains(line)),
        "no `{line}` in:\n{}",
        r.log_text()
    );
}

/// Serial of the certificate node B's port 15008 presents for mesh-1 to a new tunnel: a TLS
/// handshake from the ext pod with the client's certificate, as node A would make it.
fn presented_for_mesh1(m: &Mesh) -> String {
    let trust = load_trust_bundle(&m.certs.join(CA_CERT_FILE)).unwrap();
    let creds = load_workload_credentials(&m.certs, &spiffe("client")).unwrap();
    let config = ClientTls::new_for(&creds, &trust, CipherChoice::Any)
        .unwrap()
        .config_for(&spiffe("mesh-1"))
        .unwrap();
    let mut conn = rustls::ClientConnection::new(config, server_name(Pod::Mesh1.v4())).unwrap();
    let mut sock =
        testbed::connect_in(&m.tb.pod_ns(Pod::Ext).unwrap(), mesh1(15008)).expect("connects");
    sock.set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    while conn.is_handshaking() {
        conn.complete_io(&mut sock).expect("handshake");
    }
    let leaf = conn.peer_certificates().expect("a certificate")[0].clone();
    serial_of(leaf.as_ref())
}

/// What an operator of a node sees of its certificates, and what rotation does: `/certificates`
/// lists each local identity's serial and validity (never a key); certificate files rewritten
/// on disk are taken without a restart — a new tunnel presents the new certificate while an
/// open tunnel's stream goes on, every byte intact; a certificate not valid yet (client side)
/// or expired (server side) is never presented: the tunnel is refused, counted and logged, and
/// the destination application never sees the connection.
#[test]
fn certificate_files_rotate_under_open_tunnels_and_unusable_ones_are_never_presented() {
    if !root_or_skip(
        "certificate_files_rotate_under_open_tunnels_and_unusable_ones_are_never_presented",
    ) {
        return;
    }
    let m = Mesh::start(bin(), "io-uring", "");
    let (a, b) = (m.a(), m.b());
    let file = |sa: &str| {
        let pem = std::fs::read(identity_dir(&m.certs, &spiffe(sa)).join(CERT_FILE)).unwrap();
        let der = CertificateDer::from_pem_slice(&pem).unwrap();
        serial_of(der.as_ref())
    };
    let first = file("mesh-1");
    let (entry, body) = listed(b, MeshNode::B, "mesh-1");
    assert_eq!(entry["serial"], first.as_str(), "{body}");
    assert_eq!(entry["state"], "valid", "{body}");
    assert!(
        entry["not_after"].as_str().unwrap_or("").ends_with('Z'),
        "{body}"
    );
    assert!(
        entry["source"]
            .as_str()
            .unwrap_or("")
            .contains("mesh-1/cert.pem"),
        "{body}"
    );
    assert!(!body.contains("PRIVATE KEY"), "{body}");
    assert_eq!(
        listed(b, MeshNode::B, "mesh-2").0["serial"],
        file("mesh-2").as_str()
    );
    assert!(listed(b, MeshNode::B, "client").0.is_null(), "{body}");
    assert_eq!(
        listed(a, MeshNode::A, "client").0["serial"],
        file("client").as_str()
    );
    assert_eq!(presented_for_mesh1(&m), first);

    // Rotation under a busy tunnel.
    let live = Live::start(&m, Pod::Client, mesh1(MESH_PORT), Pod::Mesh1);
    live.wait_admitted();
    std::thread::sleep(Duration::from_millis(200));
    let second = reissue(&m, "mesh-1", SystemTime::now(), HOUR);
    assert_ne!(second, first);
    wait_listed(b, MeshNode::B, "mesh-1", "serial", &second);
    rotated(b, 1);
    assert_eq!(
        presented_for_mesh1(&m),
        second,
        "a new tunnel presents the new certificate"
    );
    std::thread::sleep(Duration::from_millis(300));
    assert_intact(&live.finish());

    // Client side: the client's new certificate is valid only from an hour hence. Node A
    // opens no tunnel with it (mesh-2 has none pooled yet); the client is reset.
    let app = m.listen(Pod::Mesh2, MESH_PORT);
    app.set_nonblocking(true).unwrap();
    reissue(&m, "client", SystemTime::now() + HOUR, HOUR);
    wait_listed(a, MeshNode::A, "client", "state", "not valid yet");
    rotated(a, 1);
    expect_reset_from(&m.tb, Pod::Client, mesh2(MESH_PORT));
    metric_reaches(
        a,
        "ringtun_hbone_tunnel_failures_total",
        &[
            "role=\"client\"",
            "reason=\"local_certificate_not_yet_valid\"",
        ],
        1.0,
    );
    logged(
        a,
        "client tunnel for spiffe://cluster.local/ns/default/sa/client refused: its \
         certificate is not valid yet",
    );

    // Server side: the client is valid again, mesh-2's certificate expired an hour ago.
    // Node B refuses the handshake on mesh-2's port 15008.
    reissue(&m, "client", SystemTime::now(), HOUR);
    reissue(&m, "mesh-2", SystemTime::now() - 2 * HOUR, HOUR);
    wait_listed(a, MeshNode::A, "client", "state", "valid");
    wait_listed(b, MeshNode::B, "mesh-2", "state", "expired");
    rotated(a, 2);
    rotated(b, 2);
    expect_reset_from(&m.tb, Pod::Client, mesh2(MESH_PORT));
    metric_reaches(
        b,
        "ringtun_hbone_tunnel_failures_total",
        &["role=\"server\"", "reason=\"local_certificate_expired\""],
        1.0,
    );
    logged(
        b,
        "server tunnel for spiffe://cluster.local/ns/default/sa/mesh-2 refused: its \
         certificate is expired",
    );
    std::thread::sleep(Duration::from_millis(200));
    assert!(
        app.accept().is_err(),
        "a connection reached mesh-2 through an unusable certificate"
    );
    m.finish();
}

/// Node CA mode's lifetime in the test below: renewal every 3 s.
const NODE_CA_LIFETIME: &str = "6s";

/// Node `n`'s configuration in node CA mode: its `certificate_dir` line replaced by a
/// `node_ca` section, whose files `ringtun certs` makes from the mesh's development CA.
fn in_node_ca_mode(n: MeshNode, config: String) -> String {
    let line = config
        .lines()
        .find(|l| l.trim_start().starts_with("certificate_dir:"))
        .expect("a certificate_dir line")
        .to_string();
    let certs = Path::new(
        line.trim_start()
            .trim_start_matches("certificate_dir:")
            .trim(),
    );
    let node_ca = format!(
        "    node_ca: {{certificate: {d}/{n}-ca.pem, key: {d}/{n}-ca-key.pem, certificate_lifetime: {NODE_CA_LIFETIME}}}",
        d = certs.display(),
        n = n.name()
    );
    let config = config.replace(&line, &node_ca);
    let file = certs.join(format!("{}-node-ca.yaml", n.name()));
    std::fs::write(&file, &config).unwrap();
    let out = std::process::Command::new(bin())
        .args(["certs", "--validity", "1h", "--config"])
        .arg(&file)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "ringtun certs for the node CA: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    config
}

/// `sa`'s serial on `/certificates` and what a new tunnel to mesh-1 presents, read while the
/// listing held still (a renewal may fall between two reads).
fn listed_and_presented(m: &Mesh) -> (String, String) {
    for _ in 0..5 {
        let before = listed(m.b(), MeshNode::B, "mesh-1").0["serial"].clone();
        let presented = presented_for_mesh1(m);
        let after = listed(m.b(), MeshNode::B, "mesh-1").0["serial"].clone();
        if before == after {
            return (before.as_str().unwrap_or("").to_string(), presented);
        }
    }
    panic!("mesh-1's certificate changed at every look");
}

/// Node CA mode end to end: both nodes issue their own workloads' certificates (only theirs)
/// from a node CA `ringtun certs` made, in memory, listed as `node CA` without a key; a tunnel
/// works with them; at half their lifetime they are renewed — a new tunnel presents the new
/// serial, counted — while a stream opened before keeps flowing past the old certificate's
/// end with every byte intact.
#[test]
fn node_ca_mode_issues_local_certificates_and_renews_them_under_open_tunnels() {
    if !root_or_skip("node_ca_mode_issues_local_certificates_and_renews_them_under_open_tunnels") {
        return;
    }
    let m = Mesh::start_with(bin(), "io-uring", "", in_node_ca_mode);
    let (a, b) = (m.a(), m.b());
    let (entry, body) = listed(b, MeshNode::B, "mesh-1");
    assert_eq!(entry["source"], "node CA", "{body}");
    assert_eq!(entry["state"], "valid", "{body}");
    assert!(!body.contains("PRIVATE"), "{body}");
    // Node B issues for mesh-1 and mesh-2, never for the client on node A.
    assert!(listed(b, MeshNode::B, "client").0.is_null(), "{body}");
    assert_eq!(listed(a, MeshNode::A, "client").0["source"], "node CA");
    assert!(listed(a, MeshNode::A, "mesh-1").0.is_null());
    let (first, presented) = listed_and_presented(&m);
    assert_eq!(presented, first, "a tunnel presents the listed certificate");

    // A stream through a tunnel, open while the certificates renew.
    let live = Live::start(&m, Pod::Client, mesh1(MESH_PORT), Pod::Mesh1);
    live.wait_admitted();
    let renewed = wait_for(|| listed(b, MeshNode::B, "mesh-1").0["serial"] != first.as_str());
    assert!(renewed, "mesh-1 was never renewed\n{}", b.log_text());
    let (second, presented) = listed_and_presented(&m);
    assert_ne!(second, first);
    assert_eq!(
        presented, second,
        "a new tunnel presents the renewed certificate"
    );
    metric_reaches(
        b,
        "ringtun_certificate_renewals_total",
        &["result=\"renewed\""],
        1.0,
    );
    metric_reaches(
        a,
        "ringtun_certificate_renewals_total",
        &["result=\"renewed\""],
        1.0,
    );
    // The first certificate's whole lifetime has passed: the open stream goes on regardless.
    std::thread::sleep(Duration::from_secs(4));
    assert_intact(&live.finish());
    assert!(!b.log_text().contains("PRIVATE KEY"));
    m.finish();
}

// ------------------------------------------------------------- rotation under load

/// Connections opened one after another by several clients: each exchanges `CHURN_BYTES`
/// each way and checks both hashes, and each server checks what it received. Runs until
/// stopped; counts what completed and keeps every failure.
struct Churn {
    stop: Arc<AtomicBool>,
    done: Arc<AtomicUsize>,
    failures: Arc<std::sync::Mutex<Vec<String>>>,
    clients: Vec<JoinHandle<()>>,
    /// Per destination: its clients' completed connections, how many its server must
    /// accept (told at the end), and the server.
    servers: Vec<ChurnServer>,
}

struct ChurnServer {
    completed: Arc<AtomicUsize>,
    expect: Arc<AtomicUsize>,
    thread: JoinHandle<Vec<String>>,
}

const CHURN_BYTES: u64 = 64 << 10;
/// Seeds of the two directions' patterns: every connection carries the same bytes, so each
/// end knows the hash it must see.
const CHURN_CLIENT_SEED: u64 = 21;
const CHURN_SERVER_SEED: u64 = 22;

fn pattern_hash(seed: u64) -> [u8; 32] {
    testbed::send_pattern(&mut io::sink(), CHURN_BYTES, seed).unwrap()
}

impl Churn {
    /// `per_destination` clients in the client pod for each of `to` (servers in those pods).
    fn start(m: &Mesh, to: &[(Pod, SocketAddr)], per_destination: usize) -> Churn {
        let stop = Arc::new(AtomicBool::new(false));
        let done = Arc::new(AtomicUsize::new(0));
        let failures = Arc::new(std::sync::Mutex::new(Vec::new()));
        let mut servers = Vec::new();
        let mut clients = Vec::new();
        for &(pod, addr) in to {
            let listener = testbed::listen_in(&m.tb.pod_ns(pod).unwrap(), addr).unwrap();
            listener.set_nonblocking(true).unwrap();
            // The server learns at the end how many connections its clients made and accepts
            // until it had them all (or 20 s passed).
            let expect = Arc::new(AtomicUsize::new(usize::MAX));
            let until = Arc::clone(&expect);
            let completed = Arc::new(AtomicUsize::new(0));
            let thread = std::thread::spawn(move || {
                let want = pattern_hash(CHURN_CLIENT_SEED);
                let mut handles = Vec::new();
                let mut deadline: Option<Instant> = None;
                while handles.len() < until.load(SeqCst) {
                    match listener.accept() {
                        Ok((s, _)) => {
                            s.set_nonblocking(false).unwrap();
                            s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
                            handles.push(std::thread::spawn(move || {
                                testbed::exchange(s, CHURN_BYTES, CHURN_SERVER_SEED)
                            }));
                        }
                        Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                            if until.load(SeqCst) != usize::MAX {
                                let d = *deadline.get_or_insert_with(|| {
                                    Instant::now() + Duration::from_secs(20)
                                });
                                if Instant::now() > d {
                                    break;
                                }
                            }
                            std::thread::sleep(Duration::from_millis(2));
                        }
                        Err(e) => panic!("accept: {e}"),
                    }
                }
                let mut problems = Vec::new();
                let expected = until.load(SeqCst);
                if handles.len() != expected {
                    problems.push(format!(
                        "{addr}: the server accepted {} connections, its clients made {expected}",
                        handles.len()
                    ));
                }
                for h in handles {
                    match h.join().unwrap() {
                        Ok(x) if x.received == CHURN_BYTES && x.received_hash == want => {}
                        Ok(x) => problems.push(format!(
                            "{addr}: the server received {} bytes (hash equal: {})",
                            x.received,
                            x.received_hash == want
                        )),
                        Err(e) => problems.push(format!("{addr}: server side: {e}")),
                    }
                }
                problems
            });
            for _ in 0..per_destination {
                let (stop, done, failures) =
                    (Arc::clone(&stop), Arc::clone(&done), Arc::clone(&failures));
                let completed = Arc::clone(&completed);
                let ns = m.tb.pod_ns(Pod::Client).unwrap();
                clients.push(std::thread::spawn(move || {
                    let want = pattern_hash(CHURN_SERVER_SEED);
                    while !stop.load(SeqCst) {
                        let outcome = testbed::connect_in(&ns, addr).and_then(|c| {
                            c.set_read_timeout(Some(Duration::from_secs(20)))?;
                            testbed::exchange(c, CHURN_BYTES, CHURN_CLIENT_SEED)
                        });
                        match outcome {
                            Ok(x) if x.received == CHURN_BYTES && x.received_hash == want => {
                                completed.fetch_add(1, SeqCst);
                                done.fetch_add(1, SeqCst);
                            }
                            Ok(x) => failures.lock().unwrap().push(format!(
                                "{addr}: the client received {} bytes (hash equal: {})",
                                x.received,
                                x.received_hash == want
                            )),
                            Err(e) => failures
                                .lock()
                                .unwrap()
                                .push(format!("{addr}: client side: {e}")),
                        }
                        std::thread::sleep(Duration::from_millis(10));
                    }
                }));
            }
            servers.push(ChurnServer {
                completed,
                expect,
                thread,
            });
        }
        Churn {
            stop,
            done,
            failures,
            clients,
            servers,
        }
    }

    /// Connections completed so far.
    fn done(&self) -> usize {
        self.done.load(SeqCst)
    }

    /// Waits until `n` more connections completed (the load is really flowing now).
    fn wait_more(&self, n: usize) {
        let from = self.done();
        assert!(
            wait_for(|| self.done() >= from + n),
            "the clients completed {} connections in 10 s, not {n}; failures: {:?}",
            self.done() - from,
            self.failures.lock().unwrap()
        );
    }

    /// Stops the clients and waits for both ends; returns the connections made and every
    /// failure either end saw.
    fn finish(self) -> (usize, Vec<String>) {
        self.stop.store(true, SeqCst);
        for c in self.clients {
            c.join().unwrap();
        }
        let mut failures = std::mem::take(&mut *self.failures.lock().unwrap());
        let made = self.done.load(SeqCst) + failures.len();
        // Each server must have had exactly the connections its clients completed.
        for server in self.servers {
            server.expect.store(server.completed.load(SeqCst), SeqCst);
            failures.extend(server.thread.join().unwrap());
        }
        (made, failures)
    }
}

/// Node A's view of the mesh with one more HBONE workload, `observer`, on a node that does not
/// exist, at the ext pod's address: a connection from the client pod to it makes node A open a
/// tunnel to the ext pod's port 15008, where the test answers the TLS handshake itself and
/// reads the certificate node A presents.
fn with_observer(config: String) -> String {
    let observer = format!(
        "  - name: observer\n    namespace: default\n    service_account: observer\n    \
         ips: [{}]\n    node: node-c\n    protocol: HBONE\nservices:\n",
        Pod::Ext.v4()
    );
    let out = config.replacen("services:\n", &observer, 1);
    assert_ne!(
        out, config,
        "no services section to insert the observer before"
    );
    out
}

/// The serial of the client certificate node A presents on a new tunnel now: a connection from
/// the client pod to the observer, whose TLS server (a certificate for `observer` from the
/// mesh's CA) completes the handshake, takes the client certificate and closes. Node A resets
/// that client connection; nothing else of the mesh is touched.
fn presented_by_node_a(m: &Mesh) -> String {
    let read = |f: &str| std::fs::read_to_string(m.certs.join(f)).unwrap();
    let ca = DevCa::from_pem(&read(CA_CERT_FILE), &read(CA_KEY_FILE)).unwrap();
    let issued = ca
        .issue(&spiffe("observer"), SystemTime::now(), HOUR)
        .unwrap();
    let trust = load_trust_bundle(&m.certs.join(CA_CERT_FILE)).unwrap();
    let config = ringtun::tls::server_config(
        &issued.credentials(&spiffe("observer")),
        &trust,
        "cluster.local",
    )
    .unwrap();
    // A fresh listener per probe: a tunnel attempt left from an earlier probe cannot be taken
    // for this one.
    let listener = testbed::listen_in(
        &m.tb.pod_ns(Pod::Ext).unwrap(),
        SocketAddr::new(Pod::Ext.v4(), 15008),
    )
    .unwrap();
    listener.set_nonblocking(true).unwrap();
    let server = std::thread::spawn(move || {
        let deadline = Instant::now() + Duration::from_secs(10);
        let mut sock = loop {
            match listener.accept() {
                Ok((s, _)) => break s,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock && Instant::now() < deadline => {
                    std::thread::sleep(Duration::from_millis(5))
                }
                Err(e) => panic!("node A opened no tunnel to the observer: {e}"),
            }
        };
        sock.set_nonblocking(false).unwrap();
        sock.set_read_timeout(Some(Duration::from_secs(10)))
            .unwrap();
        let mut conn = rustls::ServerConnection::new(config).unwrap();
        while conn.is_handshaking() {
            conn.complete_io(&mut sock).expect("handshake with node A");
        }
        let leaf = conn.peer_certificates().expect("a client certificate")[0].clone();
        serial_of(leaf.as_ref())
    });
    let mut client = testbed::connect_in(
        &m.tb.pod_ns(Pod::Client).unwrap(),
        SocketAddr::new(Pod::Ext.v4(), 7070),
    )
    .expect("connects");
    client
        .set_read_timeout(Some(Duration::from_secs(20)))
        .unwrap();
    let serial = server
        .join()
        .expect("the observer saw node A's certificate");
    let _ = testbed::read_until_end(&mut client);
    serial
}

/// The issue's "certificate rotation under load loses no connection": while four clients keep
/// opening connections through HBONE tunnels (node A to node B, each connection a CONNECT
/// stream exchanging 64 KiB each way, hashed at both ends) and two long-lived streams keep
/// flowing, the certificates of both sides (the client's on node A, mesh-1's on node B) are
/// rotated three times. No connection fails or loses a byte; after each rotation a new tunnel
/// presents the new certificate on each side; the long-lived streams, on tunnels opened with
/// the first certificates, go on intact to the end.
#[test]
fn certificate_rotation_under_load_loses_no_connection() {
    if !root_or_skip("certificate_rotation_under_load_loses_no_connection") {
        return;
    }
    let m = Mesh::start_with(bin(), "io-uring", "", |n, c| match n {
        MeshNode::A => with_observer(c),
        MeshNode::B => c,
    });
    let (a, b) = (m.a(), m.b());
    let long_lived = [
        Live::start(&m, Pod::Client, mesh1(8090), Pod::Mesh1),
        Live::start(&m, Pod::Client, mesh2(8091), Pod::Mesh2),
    ];
    for live in &long_lived {
        live.wait_admitted();
    }
    let churn = Churn::start(
        &m,
        &[
            (Pod::Mesh1, mesh1(MESH_PORT)),
            (Pod::Mesh2, mesh2(MESH_PORT)),
        ],
        2,
    );
    churn.wait_more(20);

    let mut serials = vec![(presented_by_node_a(&m), presented_for_mesh1(&m))];
    for k in 1..=3 {
        let client = reissue(&m, "client", SystemTime::now(), HOUR);
        let server = reissue(&m, "mesh-1", SystemTime::now(), HOUR);
        wait_listed(a, MeshNode::A, "client", "serial", &client);
        wait_listed(b, MeshNode::B, "mesh-1", "serial", &server);
        // Every reactor runs on the new certificates once the rotation is logged.
        rotated(a, k);
        rotated(b, k);
        let presented = (presented_by_node_a(&m), presented_for_mesh1(&m));
        assert_eq!(
            presented,
            (client.clone(), server.clone()),
            "rotation {k}: new tunnels must present the new certificates (client, server)"
        );
        serials.push(presented);
        // Connections keep completing on the rotated node before the next rotation.
        churn.wait_more(20);
    }
    let distinct: std::collections::HashSet<_> = serials.iter().collect();
    assert_eq!(
        distinct.len(),
        4,
        "four certificate pairs presented: {serials:?}"
    );

    let (made, failures) = churn.finish();
    assert!(
        failures.is_empty(),
        "{} of {made} connections failed during the rotations: {failures:#?}\nnode A:\n{}\nnode B:\n{}",
        failures.len(),
        a.log_text(),
        b.log_text()
    );
    assert!(made >= 80, "only {made} connections were made");
    eprintln!("{made} connections through three rotations, none failed");
    for live in long_lived {
        assert_intact(&live.finish());
    }
    // Node B served every connection's CONNECT with 200 (the probes opened no stream there).
    metric_reaches(
        b,
        "ringtun_hbone_streams_total",
        &["role=\"server\"", "status=\"200\""],
        (made + 2) as f64,
    );
    m.finish();
}
