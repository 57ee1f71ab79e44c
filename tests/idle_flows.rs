//! What an idle flow costs a node: resident memory and descriptors per open connection that
//! moved a byte each way and now waits, plain and through an HBONE tunnel, at two scales.
//! Run by `perf/idle.sh` (root); ignored in the ordinary suite (9,000 connections take a
//! while to open and close).
//!
//! Two ringtun nodes (the two-node testbed of `tests/hbone_e2e.rs`), one reactor each so one
//! reactor's flow budget holds every connection (the cost per flow does not depend on how many
//! reactors share them). For each kind and each count N (`IDLE_COUNTS`, default "1000 9000"):
//! - **plain**: N connections from the client pod to the out-of-mesh ext pod, passed through
//!   by node A (two sockets there; node B sees nothing);
//! - **hbone**: N connections from the client pod to mesh-1: node A carries each as a stream
//!   of a pooled tunnel (the captured socket), node B delivers it to mesh-1 (one socket).
//!
//! Each connection sends one byte and gets one back (so every stream, pipe and buffer a moving
//! flow uses has been taken), then stays open while both nodes' resident memory and
//! descriptors are read, against the same reading before the N opened. The table goes to
//! stdout and `IDLE_CSV` (default `perf/results/idle-<unix time>.csv`). `IDLE_KINDS` (default
//! "plain hbone") picks the kinds, `IDLE_NODE_YAML` adds YAML under both nodes' `node:` (e.g.
//! `"  hbone: {max_streams_per_tunnel: 1000}\n"` to see what tunnels cost apart from streams).
//! The test fails only when a connection fails or a byte comes back wrong; the numbers are the
//! result.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant, SystemTime};

use ringtun::testbed::two_nodes::{settled_fds, Mesh};
use ringtun::testbed::{connect_in, listen_in, root_or_skip, Pod, RingtunProcess, MESH_PORT};

const BIN: &str = env!("CARGO_BIN_EXE_ringtun");
const EXT_PORT: u16 = 9300;

/// Memory and descriptors of one node, once its descriptor count stopped changing.
#[derive(Clone, Copy)]
struct Reading {
    rss_kib: u64,
    fds: usize,
}

fn read(r: &RingtunProcess) -> Reading {
    let fds = settled_fds(r);
    // The reactors return freed memory a second after their last close; let them.
    std::thread::sleep(Duration::from_millis(1500));
    Reading {
        rss_kib: r.rss_kib(),
        fds,
    }
}

/// Opens `n` connections from the client pod to `to`, each echoing one byte, and returns them
/// with the server ends (accepted in `ns_of_server`).
fn open_idle(m: &Mesh, server: Pod, to: SocketAddr, n: usize) -> (Vec<TcpStream>, Vec<TcpStream>) {
    let listener = listen_in(&m.tb.pod_ns(server).unwrap(), to).unwrap();
    let acceptor = std::thread::spawn(move || {
        let mut held = Vec::with_capacity(n);
        for _ in 0..n {
            let (mut s, _) = listener.accept().expect("accept");
            s.set_read_timeout(Some(Duration::from_secs(60))).unwrap();
            let mut b = [0u8; 1];
            s.read_exact(&mut b).expect("the client's byte");
            s.write_all(&[b[0] ^ 0xff]).expect("the answer");
            held.push(s);
        }
        held
    });
    let ns = m.tb.pod_ns(Pod::Client).unwrap();
    let clients: Vec<TcpStream> = (0..n)
        .map(|i| {
            let mut s = connect_in(&ns, to).expect("client connects");
            let b = i as u8;
            s.write_all(&[b]).expect("send one byte");
            let mut back = [0u8; 1];
            s.read_exact(&mut back).expect("one byte back");
            assert_eq!(back[0], b ^ 0xff, "connection {i}: wrong byte back");
            s
        })
        .collect();
    (clients, acceptor.join().expect("acceptor"))
}

struct Row {
    kind: &'static str,
    n: usize,
    node: &'static str,
    rss_kib_per_flow: f64,
    fds_per_flow: f64,
}

#[test]
#[ignore = "opens thousands of connections: run by perf/idle.sh"]
fn idle_flow_cost() {
    if !root_or_skip("idle_flow_cost") {
        return;
    }
    let counts: Vec<usize> = std::env::var("IDLE_COUNTS")
        .unwrap_or_else(|_| "1000 9000".into())
        .split_whitespace()
        .map(|v| v.parse().expect("IDLE_COUNTS: numbers"))
        .collect();
    let unix = SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .unwrap()
        .as_secs();
    let csv_path = std::env::var("IDLE_CSV")
        .map(PathBuf::from)
        .unwrap_or_else(|_| {
            Path::new(env!("CARGO_MANIFEST_DIR")).join(format!("perf/results/idle-{unix}.csv"))
        });
    let kinds = std::env::var("IDLE_KINDS").unwrap_or_else(|_| "plain hbone".into());
    let mut extra = std::env::var("IDLE_NODE_YAML").unwrap_or_default();
    if !extra.is_empty() && !extra.ends_with('\n') {
        extra.push('\n');
    }
    let mut rows = Vec::new();
    for &n in &counts {
        for (kind, server, to) in [
            ("plain", Pod::Ext, SocketAddr::new(Pod::Ext.v4(), EXT_PORT)),
            (
                "hbone",
                Pod::Mesh1,
                SocketAddr::new(Pod::Mesh1.v4(), MESH_PORT),
            ),
        ] {
            if !kinds.split_whitespace().any(|k| k == kind) {
                continue;
            }
            // Fresh nodes for every measurement: memory an earlier one left fragmented would
            // be reused and hide this one's cost.
            let m = Mesh::start_with(Path::new(BIN), "io-uring", &extra, |_, c| {
                c.replacen("  reactors: 2\n", "  reactors: 1\n", 1)
            });
            let nodes: [(&str, &RingtunProcess); 2] = [("A", m.a()), ("B", m.b())];
            // Warm up: the tunnel (for hbone), the pools and the allocator's arenas exist
            // before the first reading.
            drop(open_idle(&m, server, to, 10));
            let before = nodes.map(|(_, r)| read(r));
            let started = Instant::now();
            let held = open_idle(&m, server, to, n);
            let opened_in = started.elapsed();
            let during = nodes.map(|(_, r)| read(r));
            for (i, (name, _)) in nodes.iter().enumerate() {
                let row = Row {
                    kind,
                    n,
                    node: name,
                    rss_kib_per_flow: (during[i].rss_kib as f64 - before[i].rss_kib as f64)
                        / n as f64,
                    fds_per_flow: (during[i].fds as f64 - before[i].fds as f64) / n as f64,
                };
                println!(
                    "idle {kind:5} x{n:5} node {name}: {:6.2} KiB and {:4.2} descriptors per flow \
                     (RSS {} -> {} KiB, fds {} -> {}; opened in {:.1} s)",
                    row.rss_kib_per_flow,
                    row.fds_per_flow,
                    before[i].rss_kib,
                    during[i].rss_kib,
                    before[i].fds,
                    during[i].fds,
                    opened_in.as_secs_f64()
                );
                rows.push(row);
            }
            drop(held);
            m.finish();
        }
    }
    if let Some(dir) = csv_path.parent() {
        std::fs::create_dir_all(dir).unwrap();
    }
    let mut csv = String::from("kind,flows,node,rss_kib_per_flow,fds_per_flow\n");
    for r in &rows {
        csv += &format!(
            "{},{},{},{:.3},{:.3}\n",
            r.kind, r.n, r.node, r.rss_kib_per_flow, r.fds_per_flow
        );
    }
    std::fs::write(&csv_path, csv).unwrap();
    println!("idle: CSV {}", csv_path.display());
}
