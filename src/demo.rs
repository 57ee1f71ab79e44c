//! `ringtun demo`: a self-contained tour of the mesh on one machine. It builds the
//! [`testbed`](ringtun::testbed) topology, installs the capture rules in the pods, starts a node
//! in-process (pod mode), sends real traffic through it — out of the mesh, to a service VIP, to a
//! workload by IP, over IPv6 — prints what each first connection resolved to and what moved,
//! then removes everything it created. Exit 0 only if every byte arrived intact.

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use ringtun::app::{App, Options};
use ringtun::control_plane::config::{self, DriverChoice};
use ringtun::exit_code;
use ringtun::observability::access_log::{FlowRecord, Observer};
use ringtun::redirection::rules::{self, RedirectSettings};
use ringtun::testbed::{self, connect_in, listen_in, serve_exchanges, Pod, Testbed};

const EXT_PORT: u16 = 9000;

pub fn run(driver: DriverChoice, bytes: u64) -> i32 {
    if !testbed::is_root() {
        eprintln!("ringtun demo needs root: it creates network namespaces and iptables rules (try: sudo ringtun demo)");
        return exit_code::NOPERM;
    }
    match run_inner(driver, bytes) {
        Ok(true) => exit_code::OK,
        Ok(false) => exit_code::FAILURE,
        Err(e) => {
            eprintln!("demo failed: {e}");
            exit_code::FAILURE
        }
    }
}

struct Transfer {
    title: &'static str,
    from: Pod,
    to: SocketAddr,
    server: Pod,
    server_addr: SocketAddr,
    bytes: u64,
    connections: usize,
}

fn run_inner(driver: DriverChoice, bytes: u64) -> Result<bool, String> {
    println!(
        "ringtun demo: building a node with three captured pods and one server outside the mesh…"
    );
    let tb = Testbed::create("demo").map_err(|e| format!("building the testbed: {e}"))?;
    let yaml = tb.config_yaml(2, "");
    let cfg = config::load(&yaml).map_err(|e| format!("demo config invalid: {e}"))?;
    let plan = rules::plan(&RedirectSettings::from_node(&cfg.node));
    let mut installed = Vec::new();
    let result = (|| -> Result<bool, String> {
        for pod in Testbed::captured_pods() {
            let path = tb.pod_path(pod);
            rules::install(&plan, Some(&path))
                .map_err(|e| format!("capture rules in {}: {e}", path.display()))?;
            installed.push(path);
        }
        let records: Arc<Mutex<Vec<FlowRecord>>> = Arc::default();
        let observer = collecting(&records);
        let app = App::start(
            cfg,
            Options {
                driver: Some(driver),
                reactors: Some(2),
                observer: Some(observer),
                serve_endpoints: false,
                ..Default::default()
            },
        )?;
        println!("ringtun node started: 2 reactors ({}), pod mode, capture rules installed in client, mesh-1, mesh-2\n", app.drivers.join(", "));
        let small = (bytes / 16).max(1 << 20);
        let transfers = [
            Transfer {
                title: "client → out-of-mesh server (IPv4)",
                from: Pod::Client,
                to: SocketAddr::new(Pod::Ext.v4(), EXT_PORT),
                server: Pod::Ext,
                server_addr: SocketAddr::new(Pod::Ext.v4(), EXT_PORT),
                bytes,
                connections: 1,
            },
            Transfer {
                title: "client → out-of-mesh server (IPv6)",
                from: Pod::Client,
                to: SocketAddr::new(Pod::Ext.v6(), EXT_PORT),
                server: Pod::Ext,
                server_addr: SocketAddr::new(Pod::Ext.v6(), EXT_PORT),
                bytes: small,
                connections: 1,
            },
            Transfer {
                title: "client → mesh-1 by workload IP",
                from: Pod::Client,
                to: SocketAddr::new(Pod::Mesh1.v4(), testbed::MESH_PORT),
                server: Pod::Mesh1,
                server_addr: SocketAddr::new(Pod::Mesh1.v4(), testbed::MESH_PORT),
                bytes,
                connections: 1,
            },
        ];
        let mut ok = true;
        for t in &transfers {
            ok &= run_transfer(&tb, t, &records)?;
        }
        ok &= run_vip(&tb, small, &records, "outbound")?;
        let (opened, closed, received, sent) = app.metrics.tcp_totals();
        println!("counters: istio_tcp_connections_opened_total {opened}, closed {closed}, received_bytes {received}, sent_bytes {sent}");
        app.drain();
        app.wait()?;
        ok &= run_two_nodes(&tb, driver, bytes, small, &records)?;
        Ok(ok)
    })();
    for path in installed {
        if let Err(e) = rules::remove(&plan, Some(&path)) {
            eprintln!("removing capture rules from {}: {e}", path.display());
        }
    }
    drop(tb);
    println!("removed the namespaces, links and rules the demo created");
    let ok = result?;
    println!(
        "{}",
        if ok {
            "demo: all transfers intact (SHA-256 equal at both ends)"
        } else {
            "demo: FAILED (see above)"
        }
    );
    Ok(ok)
}

/// An observer that keeps every flow record for the demo to print.
fn collecting(records: &Arc<Mutex<Vec<FlowRecord>>>) -> Observer {
    let sink = records.clone();
    Arc::new(move |r: &FlowRecord| {
        sink.lock()
            .unwrap_or_else(|p| p.into_inner())
            .push(r.clone())
    })
}

fn take_records(records: &Mutex<Vec<FlowRecord>>) -> Vec<FlowRecord> {
    std::mem::take(&mut *records.lock().unwrap_or_else(|p| p.into_inner()))
}

fn run_transfer(
    tb: &Testbed,
    t: &Transfer,
    records: &Mutex<Vec<FlowRecord>>,
) -> Result<bool, String> {
    let err = |e: std::io::Error| format!("{}: {e}", t.title);
    let server_ns = tb.pod_ns(t.server).map_err(err)?;
    let listener = listen_in(&server_ns, t.server_addr).map_err(err)?;
    let server = serve_exchanges(listener, t.connections, t.bytes, 2);
    let client_ns = tb.pod_ns(t.from).map_err(err)?;
    let stream = connect_in(&client_ns, t.to).map_err(err)?;
    let c = match testbed::exchange(stream, t.bytes, 1) {
        Ok(c) => c,
        Err(e) => {
            // Say what the node made of the connection, if it saw it at all.
            std::thread::sleep(Duration::from_millis(200));
            println!("== {} ({} → {})", t.title, t.from.v4(), t.to);
            let seen = take_records(records);
            if seen.is_empty() {
                println!("   no flow record: no node reactor handled this connection");
            }
            for r in seen {
                print_record(&r);
            }
            return Err(err(e));
        }
    };
    let s = server
        .join()
        .map_err(|_| "server panicked".to_string())?
        .map_err(err)?;
    let s = s[0];
    // Records arrive when the proxy closes the flow, just after the client sees EOF.
    std::thread::sleep(Duration::from_millis(100));
    let intact = c.sent_hash == s.received_hash
        && s.sent_hash == c.received_hash
        && c.received == t.bytes
        && s.received == t.bytes;
    let secs = c.elapsed.as_secs_f64().max(1e-9);
    println!("== {} ({} → {})", t.title, t.from.v4(), t.to);
    for r in take_records(records) {
        print_record(&r);
    }
    println!(
        "   moved {} MiB each way in {:.2} s: {:.2} Gbit/s total; SHA-256 {} ({}…)\n",
        t.bytes >> 20,
        secs,
        (2 * t.bytes) as f64 * 8.0 / secs / 1e9,
        if intact {
            "equal both ways"
        } else {
            "MISMATCH"
        },
        &testbed::hex(&c.sent_hash)[..16]
    );
    Ok(intact)
}

/// Part two: the same pods as two nodes. Node A serves the client, node B the mesh pods,
/// which now speak HBONE: A reaches them through mTLS HTTP/2 CONNECT tunnels to their port
/// 15008, where B takes the tunnel and delivers to the pod. Same capture rules (same ports).
fn run_two_nodes(
    tb: &Testbed,
    driver: DriverChoice,
    bytes: u64,
    small: u64,
    records: &Arc<Mutex<Vec<FlowRecord>>>,
) -> Result<bool, String> {
    use ringtun::control_plane::certs::{write_dev_certificates, CertsLayout};
    use ringtun::testbed::MeshNode;
    let dir = std::env::temp_dir().join(format!("{}-certs", tb.prefix));
    let _cleanup = RemoveDir(dir.clone());
    let yaml = |n| tb.two_node_config(n, 2, &dir, "");
    let cfg_a = config::load(&yaml(MeshNode::A)).map_err(|e| format!("node A config: {e}"))?;
    let cfg_b = config::load(&yaml(MeshNode::B)).map_err(|e| format!("node B config: {e}"))?;
    write_dev_certificates(
        &cfg_a,
        &CertsLayout {
            certificate_dir: dir.clone(),
            trust_bundle: dir.join("ca.pem"),
        },
        std::time::SystemTime::now(),
        Duration::from_secs(3600),
    )
    .map_err(|e| format!("demo certificates: {e}"))?;
    println!("== two nodes: node A serves the client pod, node B serves mesh-1 and mesh-2, which speak HBONE");
    println!("   development CA and workload certificates in {} (SPIFFE ids spiffe://cluster.local/ns/default/sa/<pod>)", dir.display());
    let opts = || Options {
        driver: Some(driver),
        reactors: Some(2),
        observer: Some(collecting(records)),
        serve_endpoints: false,
        ..Default::default()
    };
    let b = App::start(cfg_b, opts())?;
    let a = App::start(cfg_a, opts())?;
    println!(
        "   node A and node B started ({} / {})\n",
        a.drivers.join(", "),
        b.drivers.join(", ")
    );
    let transfers = [Transfer {
        title: "client → mesh-1 through an HBONE tunnel (node A → node B :15008)",
        from: Pod::Client,
        to: SocketAddr::new(Pod::Mesh1.v4(), testbed::MESH_PORT),
        server: Pod::Mesh1,
        server_addr: SocketAddr::new(Pod::Mesh1.v4(), testbed::MESH_PORT),
        bytes,
        connections: 1,
    }];
    let mut ok = true;
    for t in &transfers {
        ok &= run_transfer(tb, t, records)?;
    }
    ok &= run_vip(tb, small, records, "inbound_hbone")?;
    let support = ringtun::kernel_features::ktls_support();
    for (name, app) in [("node A", &a), ("node B", &b)] {
        let text = app.metrics.render();
        for line in text
            .lines()
            .filter(|l| l.starts_with("ringtun_hbone_tunnels_total{"))
        {
            println!("   {name}: {line}");
        }
    }
    match &support.reason {
        None => println!("   tunnel TLS: kTLS (the kernel encrypts; payload spliced, never copied to user space)"),
        Some(why) => println!("   tunnel TLS: user-space TLS (rustls) because {why}; where kTLS exists tunnels use it and splice their payload"),
    }
    let handshakes: Vec<String> = [("A", &a), ("B", &b)]
        .iter()
        .map(|(n, app)| {
            let text = app.metrics.render();
            let sum: f64 =
                ringtun::testbed::metric_sum(&text, "ringtun_hbone_handshakes_total", &[]);
            format!("node {n} {sum}")
        })
        .collect();
    println!(
        "   TLS handshakes: {} (connections share pooled tunnels)\n",
        handshakes.join(", ")
    );
    a.drain();
    a.wait()?;
    b.drain();
    b.wait()?;
    Ok(ok)
}

/// Removes a directory when dropped.
struct RemoveDir(std::path::PathBuf);

impl Drop for RemoveDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn run_vip(
    tb: &Testbed,
    bytes: u64,
    records: &Mutex<Vec<FlowRecord>>,
    show: &str,
) -> Result<bool, String> {
    let err = |e: std::io::Error| format!("service VIP: {e}");
    let conns = 6;
    let mut servers = Vec::new();
    for pod in [Pod::Mesh1, Pod::Mesh2] {
        let ns = tb.pod_ns(pod).map_err(err)?;
        let l = listen_in(&ns, SocketAddr::new(pod.v4(), testbed::MESH_PORT)).map_err(err)?;
        l.set_nonblocking(true).map_err(err)?;
        servers.push((pod, l));
    }
    let client_ns = tb.pod_ns(Pod::Client).map_err(err)?;
    let vip = SocketAddr::new(testbed::VIP.into(), testbed::VIP_PORT);
    println!("== client → service echo VIP {vip}, {conns} connections");
    let mut ok = true;
    let mut served = [0usize; 2];
    for i in 0..conns {
        let stream = connect_in(&client_ns, vip).map_err(err)?;
        let client = std::thread::spawn(move || testbed::exchange(stream, bytes, 10 + i as u64));
        // Whichever endpoint the proxy picked gets the connection.
        let (k, s) = 'found: loop {
            for (k, (_, l)) in servers.iter().enumerate() {
                if let Ok((s, _)) = l.accept() {
                    break 'found (k, s);
                }
            }
            std::thread::sleep(Duration::from_millis(2));
        };
        s.set_nonblocking(false).map_err(err)?;
        served[k] += 1;
        let srv = testbed::exchange(s, bytes, 20 + i as u64).map_err(err)?;
        let c = client
            .join()
            .map_err(|_| "client panicked".to_string())?
            .map_err(err)?;
        ok &= c.sent_hash == srv.received_hash && srv.sent_hash == c.received_hash;
    }
    std::thread::sleep(Duration::from_millis(100));
    for r in take_records(records).iter().filter(|r| r.direction == show) {
        print_record(r);
    }
    println!(
        "   endpoints served: mesh-1 {}, mesh-2 {}; SHA-256 {}\n",
        served[0],
        served[1],
        if ok {
            "equal on every connection"
        } else {
            "MISMATCH"
        }
    );
    Ok(ok && served.iter().all(|&n| n > 0))
}

fn print_record(r: &FlowRecord) {
    println!(
        "   {:8} source={} dst={} → {} route={} upstream={} identity={} bytes→up={} bytes→down={} end={}{}",
        r.direction,
        r.source_workload,
        r.original_dst,
        r.destination,
        r.route,
        r.upstream,
        r.destination_identity.as_deref().unwrap_or("-"),
        r.bytes_to_upstream,
        r.bytes_to_downstream,
        r.end,
        r.failure_reason.map(|f| format!(" ({f})")).unwrap_or_default()
    );
}
