//! The client's address reaches the destination application (`node.deliver_client_address`),
//! as root over two ringtun nodes in network namespaces (`testbed::two_nodes`, capture rules
//! installed in every pod): through an HBONE tunnel (client pod on node A → mesh-1 on node B)
//! and in plaintext (the ext pod outside the mesh → mesh-1 on node B's 15006), over IPv4 and
//! IPv6, bytes hashed both ways. With the knob off the application sees its own address, as
//! before. (A `forwarded` claim of another identity's address is refused: `hbone_interop`.)
//!
//! Without root each test prints `SKIPPED (needs root)`; with `CI` set it fails.

use std::net::{IpAddr, SocketAddr, TcpListener};
use std::path::Path;
use std::thread::JoinHandle;
use std::time::Duration;

use ringtun::testbed::two_nodes::Mesh;
use ringtun::testbed::{self, root_or_skip, Exchange, MeshNode, Pod, MESH_PORT};

const BIN: &str = env!("CARGO_BIN_EXE_ringtun");
const BYTES: u64 = 256 << 10;

/// `n` connections accepted on `listener` one after the other: the address each came from
/// and its exchange.
fn serve(listener: TcpListener, n: usize) -> JoinHandle<Vec<(SocketAddr, Exchange)>> {
    std::thread::spawn(move || {
        (0..n)
            .map(|_| {
                let (s, from) = listener.accept().expect("accept");
                s.set_read_timeout(Some(Duration::from_secs(60))).unwrap();
                (
                    from,
                    testbed::exchange(s, BYTES, 2).expect("server exchange"),
                )
            })
            .collect()
    })
}

/// `n` connections, one after the other, from `from` to mesh-1 at `to` (one listener for all:
/// a port bound again at once can still be held by the last connection's socket); the
/// addresses mesh-1's application saw.
fn seen_by_mesh1(m: &Mesh, from: Pod, to: SocketAddr, n: usize) -> Vec<IpAddr> {
    let listener = testbed::listen_in(&m.tb.pod_ns(Pod::Mesh1).unwrap(), to).expect("listen");
    let server = serve(listener, n);
    let mut clients = Vec::new();
    for _ in 0..n {
        let c = testbed::connect_in(&m.tb.pod_ns(from).unwrap(), to)
            .unwrap_or_else(|e| panic!("{from:?} → {to}: {e}"));
        clients.push(testbed::exchange(c, BYTES, 1).expect("client exchange"));
    }
    let served = server.join().expect("server thread");
    for (got, (_, s)) in clients.iter().zip(&served) {
        assert_eq!(
            (got.received, s.received),
            (BYTES, BYTES),
            "{to}: bytes lost"
        );
        assert_eq!(
            testbed::hex(&got.sent_hash),
            testbed::hex(&s.received_hash),
            "{to}: upload changed"
        );
        assert_eq!(
            testbed::hex(&s.sent_hash),
            testbed::hex(&got.received_hash),
            "{to}: download changed"
        );
    }
    served.iter().map(|(from, _)| from.ip()).collect()
}

/// Each case: who connects, over which family, and through what.
fn cases() -> Vec<(&'static str, Pod, SocketAddr)> {
    vec![
        // The client pod's outbound capture turns these into HBONE tunnel streams.
        (
            "hbone v4",
            Pod::Client,
            SocketAddr::new(Pod::Mesh1.v4(), MESH_PORT),
        ),
        (
            "hbone v6",
            Pod::Client,
            SocketAddr::new(Pod::Mesh1.v6(), MESH_PORT),
        ),
        // The ext pod is outside the mesh: plaintext, captured on node B's 15006.
        (
            "plaintext v4",
            Pod::Ext,
            SocketAddr::new(Pod::Mesh1.v4(), MESH_PORT + 1),
        ),
        (
            "plaintext v6",
            Pod::Ext,
            SocketAddr::new(Pod::Mesh1.v6(), MESH_PORT + 1),
        ),
    ]
}

/// Packets the mangle OUTPUT rule gave a connection's mark back to in `pod`'s namespace
/// (both families): the replies of connections ringtun delivered there.
fn marks_restored_in(m: &Mesh, pod: Pod) -> u64 {
    ["iptables", "ip6tables"]
        .iter()
        .map(|family| {
            let out = std::process::Command::new("ip")
                .args(["netns", "exec", &m.tb.pod_name(pod)])
                .args([&format!("{family}-nft"), "-w", "10", "-t", "mangle"])
                .args(["-L", "RINGTUN_OUTPUT", "-v", "-x", "-n"])
                .output()
                .expect("run iptables");
            let text = String::from_utf8_lossy(&out.stdout);
            assert!(out.status.success(), "{family} in {pod:?}: {text}");
            text.lines()
                .filter(|l| l.contains("CONNMARK restore"))
                .map(|l| l.split_whitespace().next().unwrap().parse::<u64>().unwrap())
                .sum::<u64>()
        })
        .sum()
}

#[test]
fn the_application_sees_the_clients_own_address() {
    if !root_or_skip("the_application_sees_the_clients_own_address") {
        return;
    }
    let m = Mesh::start(Path::new(BIN), "io-uring", "");
    // The start-up check of the client pod's return path is a delivery of its own.
    let client_pod_restores = marks_restored_in(&m, Pod::Client);
    for (what, from, to) in cases() {
        let client = if to.is_ipv4() { from.v4() } else { from.v6() };
        // Several connections, so a kernel-chosen port is exercised more than once.
        for seen in seen_by_mesh1(&m, from, to, 3) {
            assert_eq!(
                seen,
                client,
                "{what}: mesh-1's application must see the client's address; node B log:\n{}",
                m.b().log_text()
            );
        }
    }
    assert!(
        m.b()
            .log_text()
            .contains("workload default/mesh-1: inbound connections reach the application from the client's address"),
        "{}",
        m.b().log_text()
    );
    // Only the deliveries' replies have their mark restored (and are routed again for it):
    // the client pod's captured outbound connections come over lo with ringtun's mark too,
    // and were once marked as deliveries, re-routing every one of their packets.
    assert!(marks_restored_in(&m, Pod::Mesh1) > 100);
    assert_eq!(
        marks_restored_in(&m, Pod::Client),
        client_pod_restores,
        "the client pod's outbound connections were marked as deliveries"
    );
    m.finish();
}

#[test]
fn with_the_knob_off_the_application_sees_its_own_address() {
    if !root_or_skip("with_the_knob_off_the_application_sees_its_own_address") {
        return;
    }
    let m = Mesh::start_with(Path::new(BIN), "io-uring", "", |n, c| match n {
        MeshNode::A => c,
        MeshNode::B => c.replacen("node:\n", "node:\n  deliver_client_address: off\n", 1),
    });
    for (what, from, to) in cases() {
        let own = if to.is_ipv4() {
            Pod::Mesh1.v4()
        } else {
            Pod::Mesh1.v6()
        };
        assert_eq!(seen_by_mesh1(&m, from, to, 1), [own], "{what}");
    }
    m.finish();
}

/// `ringtun probe --json` inside `pod`'s namespace: its `client_address` verdict.
fn probe_in(tb: &testbed::Testbed, pod: Pod) -> serde_json::Value {
    let out = std::process::Command::new("ip")
        .args(["netns", "exec", &tb.pod_name(pod), BIN, "probe", "--json"])
        .output()
        .expect("ringtun probe runs");
    assert!(out.status.success(), "{out:?}");
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).expect("probe JSON");
    report["client_address"].clone()
}

/// The probe says no, and why.
fn assert_unavailable(verdict: &serde_json::Value, why: &str) {
    assert_eq!(verdict["available"], false, "{verdict}");
    let reason = verdict["reason"].as_str().unwrap_or_default();
    assert!(reason.contains(why), "{verdict}");
}

#[test]
fn probe_says_whether_a_namespace_routes_replies_to_client_addresses_back() {
    if !root_or_skip("probe_says_whether_a_namespace_routes_replies_to_client_addresses_back") {
        return;
    }
    let tb = testbed::Testbed::create("ca").expect("testbed");
    let pod = Pod::Ext;
    let verdict = probe_in(&tb, pod);
    assert_unavailable(&verdict, "not routed back");
    let dir = std::env::temp_dir().join(&tb.prefix);
    std::fs::create_dir_all(&dir).unwrap();
    let cfg = dir.join("capture.yaml");
    std::fs::write(&cfg, tb.config_yaml(1, "")).unwrap();
    tb.install_capture(Path::new(BIN), &[pod], &cfg);
    let verdict = probe_in(&tb, pod);
    assert_eq!(verdict["available"], true, "{verdict}");
    // Capture rules without the reply marking (as an older ringtun installed them): the
    // connection the check makes never completes, and the probe says why.
    let flushed = std::process::Command::new("ip")
        .args(["netns", "exec", &tb.pod_name(pod)])
        .args(["iptables-nft", "-t", "mangle", "-F", "RINGTUN_OUTPUT"])
        .status()
        .unwrap();
    assert!(flushed.success());
    let verdict = probe_in(&tb, pod);
    assert_unavailable(&verdict, "not marked");
}

/// A tunnel stream's delivery leaves its port to `connect` (`IP_BIND_ADDRESS_NO_PORT`: no
/// search of the port range at `bind`); a plaintext client's gets one at `bind`, never the
/// client's own.
#[test]
fn a_delivery_binds_the_client_address_and_the_port_when_it_must() {
    use std::os::fd::AsRawFd;

    use ringtun::data_plane::socket::{delivery_socket, local_addr};
    if !root_or_skip("a_delivery_binds_the_client_address_and_the_port_when_it_must") {
        return;
    }
    let app = TcpListener::bind("127.0.0.1:0").unwrap();
    let to = app.local_addr().unwrap();
    let tunnel_client: SocketAddr = "127.0.0.2:0".parse().unwrap();
    let fd = delivery_socket(&to, 0, Some(tunnel_client), 0).unwrap();
    assert_eq!(
        local_addr(fd.as_raw_fd()).unwrap(),
        tunnel_client,
        "no port before connect"
    );
    match ringtun::sys::socket::connect(fd.as_raw_fd(), to) {
        Err(e) if e.raw_os_error() != Some(libc::EINPROGRESS) => panic!("connect: {e}"),
        _ => {}
    }
    let (_accepted, from) = app.accept().unwrap();
    assert_eq!(from.ip(), tunnel_client.ip());
    assert_ne!(from.port(), 0);

    // A plaintext client: the delivery's port is known before connect, and is not the
    // client's (the port just freed is the one the client is given here).
    let plaintext_client: SocketAddr = "127.0.0.2:40000".parse().unwrap();
    let fd = delivery_socket(&to, 0, Some(plaintext_client), 0).unwrap();
    let port = local_addr(fd.as_raw_fd()).unwrap().port();
    assert_ne!(port, 0, "the port is chosen at bind");
    assert_ne!(port, plaintext_client.port());
    let client = SocketAddr::new(plaintext_client.ip(), port);
    drop(fd);
    for _ in 0..20 {
        let fd = delivery_socket(&to, 0, Some(client), 0).unwrap();
        let port = local_addr(fd.as_raw_fd()).unwrap().port();
        assert_ne!(port, 0);
        assert_ne!(port, client.port(), "a delivery took the client's own port");
    }
}
