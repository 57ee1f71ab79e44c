//! Soak: mixed traffic through two ringtun nodes for a configurable time, sampling each
//! node's memory, descriptors, CPU and the traffic's outcomes every second. Run by
//! `perf/soak.sh` (root); ignored in the ordinary suite (it runs for minutes to hours).
//!
//! Traffic, all from the client pod on node A to node B's pods unless said, every byte hashed:
//! - **bulk**: back-to-back 8 MiB exchanges both ways through an HBONE tunnel (mesh-1);
//! - **request/response**: one long-lived tunnel stream to mesh-2, 1 KiB request → 1 KiB
//!   response, as fast as it answers (its worst round trip is sampled);
//! - **churn**: a new connection per 16 KiB exchange, alternating an HBONE one (client pod →
//!   mesh-1) and a plaintext one captured on node B's 15006 (the ext pod → mesh-2);
//! - **attacks**, every 10 s for 3 s: 200 idle TCP connections to mesh-1's 15008 (a handshake
//!   flood from the ext pod) and 20 connections that send garbage where a TLS handshake belongs.
//!
//! The run is a warm-up (a tenth of the duration, 10–120 s), a 15 s pause, `SOAK_SECS` of
//! traffic (default 60) and another pause. Memory is judged at rest, in the pauses: under
//! traffic it swings with the bytes in flight, so only rest-to-rest says whether anything
//! accumulates. `SOAK_CSV` sets the CSV path (default `perf/results/soak-<unix time>.csv`);
//! its `traffic` column is 0 in the pauses. The test fails on any byte error or failed
//! exchange, when a node's memory at rest grows by more than 16 MiB, and when a node's
//! descriptors do not return to their baseline at the end.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::Relaxed};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant, SystemTime};

use ringtun::testbed::two_nodes::Mesh;
use ringtun::testbed::{self, root_or_skip, Pod, RingtunProcess};

const BIN: &str = env!("CARGO_BIN_EXE_ringtun");
const BULK_PORT: u16 = 9101;
const RR_PORT: u16 = 9102;
const CHURN_PORT: u16 = 9103;
const BULK: u64 = 8 << 20;
const CHURN: u64 = 16 << 10;
const RR: usize = 1024;

/// What the traffic did, shared by its threads and read by the sampler.
#[derive(Default)]
struct Counters {
    bulk_ok: AtomicU64,
    rr_ok: AtomicU64,
    churn_ok: AtomicU64,
    /// Exchanges whose bytes arrived changed or short.
    byte_errors: AtomicU64,
    /// Exchanges that failed outright (connect refused, reset, timeout).
    failures: AtomicU64,
    /// The worst request/response round trip since the last sample, in microseconds.
    rr_worst_us: AtomicU64,
    attack_connections: AtomicU64,
}

/// Serves `bytes`-byte exchanges on every connection `listener` accepts until `stop`,
/// checking what the client uploaded.
fn exchange_server(
    listener: TcpListener,
    bytes: u64,
    c: Arc<Counters>,
    stop: Arc<AtomicBool>,
) -> JoinHandle<()> {
    listener.set_nonblocking(true).unwrap();
    let upload = pattern_hash(bytes, 1);
    std::thread::spawn(move || {
        while !stop.load(Relaxed) {
            match listener.accept() {
                Ok((s, _)) => {
                    s.set_nonblocking(false).unwrap();
                    s.set_read_timeout(Some(Duration::from_secs(60))).unwrap();
                    let c = c.clone();
                    std::thread::spawn(move || match testbed::exchange(s, bytes, 2) {
                        Ok(x) if x.received == bytes && x.received_hash == upload => {}
                        Ok(_) => {
                            c.byte_errors.fetch_add(1, Relaxed);
                        }
                        // The client counts the failure it sees.
                        Err(_) => {}
                    });
                }
                Err(_) => std::thread::sleep(Duration::from_millis(5)),
            }
        }
    })
}

/// Answers each `RR`-byte request with `RR` bytes (the request, reversed) until EOF.
fn rr_server(listener: TcpListener, stop: Arc<AtomicBool>) -> JoinHandle<()> {
    listener.set_nonblocking(true).unwrap();
    std::thread::spawn(move || {
        while !stop.load(Relaxed) {
            match listener.accept() {
                Ok((mut s, _)) => {
                    s.set_nonblocking(false).unwrap();
                    std::thread::spawn(move || {
                        let mut buf = [0u8; RR];
                        while s.read_exact(&mut buf).is_ok() {
                            buf.reverse();
                            if s.write_all(&buf).is_err() {
                                break;
                            }
                        }
                    });
                }
                Err(_) => std::thread::sleep(Duration::from_millis(5)),
            }
        }
    })
}

/// One exchange of `bytes` each way from `from` to `to`, counted in `ok` or as an error;
/// `expect` is the hash of the server's pattern.
fn one_exchange(
    m: &Mesh,
    from: Pod,
    to: SocketAddr,
    (bytes, expect): (u64, [u8; 32]),
    ok: &AtomicU64,
    c: &Counters,
) {
    let ns = m.tb.pod_ns(from).unwrap();
    let result = testbed::connect_in(&ns, to).and_then(|s| testbed::exchange(s, bytes, 1));
    match result {
        Ok(x) if x.received == bytes && x.received_hash == expect => {
            ok.fetch_add(1, Relaxed);
        }
        Ok(_) => {
            c.byte_errors.fetch_add(1, Relaxed);
        }
        Err(e) => {
            eprintln!("soak: exchange {from:?} → {to} failed: {e}");
            c.failures.fetch_add(1, Relaxed);
        }
    }
}

/// The hash of a `bytes`-byte pattern with `seed` (the client sends seed 1, servers seed 2).
fn pattern_hash(bytes: u64, seed: u64) -> [u8; 32] {
    testbed::send_pattern(&mut std::io::sink(), bytes, seed).unwrap()
}

fn request_response(m: &Mesh, c: &Counters, stop: &AtomicBool) {
    let to = SocketAddr::new(Pod::Mesh2.v4(), RR_PORT);
    while !stop.load(Relaxed) {
        let Ok(mut s) = testbed::connect_in(&m.tb.pod_ns(Pod::Client).unwrap(), to) else {
            c.failures.fetch_add(1, Relaxed);
            std::thread::sleep(Duration::from_millis(100));
            continue;
        };
        let mut n: u64 = 0;
        while !stop.load(Relaxed) {
            n += 1;
            let mut req = [0u8; RR];
            for (i, b) in req.iter_mut().enumerate() {
                *b = (n as usize).wrapping_mul(31).wrapping_add(i) as u8;
            }
            let start = Instant::now();
            let mut resp = [0u8; RR];
            if s.write_all(&req)
                .and_then(|_| s.read_exact(&mut resp))
                .is_err()
            {
                c.failures.fetch_add(1, Relaxed);
                break;
            }
            let us = start.elapsed().as_micros() as u64;
            c.rr_worst_us.fetch_max(us, Relaxed);
            req.reverse();
            if resp != req {
                c.byte_errors.fetch_add(1, Relaxed);
                break;
            }
            c.rr_ok.fetch_add(1, Relaxed);
        }
    }
}

/// Every 10 s for 3 s: a handshake flood and garbage on mesh-1's 15008, from the ext pod.
fn attacks(m: &Mesh, c: &Counters, stop: &AtomicBool) {
    let to = SocketAddr::new(Pod::Mesh1.v4(), 15008);
    let ns = m.tb.pod_ns(Pod::Ext).unwrap();
    while !stop.load(Relaxed) {
        let mut held: Vec<TcpStream> = Vec::new();
        for i in 0..220 {
            if let Ok(mut s) = testbed::connect_in(&ns, to) {
                if i >= 200 {
                    let _ = s.write_all(b"\x16\x03\x01\x00\x05garbage, not a ClientHello");
                }
                held.push(s);
                c.attack_connections.fetch_add(1, Relaxed);
            }
        }
        sleep_unless(stop, Duration::from_secs(3));
        drop(held);
        sleep_unless(stop, Duration::from_secs(7));
    }
}

fn sleep_unless(stop: &AtomicBool, d: Duration) {
    let end = Instant::now() + d;
    while !stop.load(Relaxed) && Instant::now() < end {
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// How long the traffic pauses before memory at rest is read.
const REST: Duration = Duration::from_secs(15);

/// How far memory at rest may grow over a run. An hour makes ~300,000 connections and a
/// million requests: a leak of ~60 bytes per connection passes this bound.
const LEAK_BOUND_KIB: u64 = 16 << 10;

/// Resident memory at rest per node: the median of the last five samples of a pause.
fn rest_rss(rest: &[Sample]) -> [u64; 2] {
    [0, 1].map(|i| {
        let mut v: Vec<u64> = rest.iter().rev().take(5).map(|s| s.rss[i]).collect();
        v.sort_unstable();
        v[v.len() / 2]
    })
}

/// The traffic's threads, all running until `stop`.
struct Traffic {
    stop: Arc<AtomicBool>,
    threads: Vec<JoinHandle<()>>,
}

impl Traffic {
    fn start(m: &Arc<Mesh>, c: &Arc<Counters>) -> Traffic {
        let stop = Arc::new(AtomicBool::new(false));
        let spawn = |f: fn(&Mesh, &Counters, &AtomicBool)| {
            let (m, c, stop) = (m.clone(), c.clone(), stop.clone());
            std::thread::spawn(move || f(&m, &c, &stop))
        };
        let threads = vec![
            spawn(|m, c, stop| {
                let to = SocketAddr::new(Pod::Mesh1.v4(), BULK_PORT);
                let bulk = (BULK, pattern_hash(BULK, 2));
                while !stop.load(Relaxed) {
                    one_exchange(m, Pod::Client, to, bulk, &c.bulk_ok, c);
                }
            }),
            spawn(request_response),
            spawn(|m, c, stop| {
                let hbone = SocketAddr::new(Pod::Mesh1.v4(), CHURN_PORT);
                let plain = SocketAddr::new(Pod::Mesh2.v4(), CHURN_PORT);
                let churn = (CHURN, pattern_hash(CHURN, 2));
                while !stop.load(Relaxed) {
                    one_exchange(m, Pod::Client, hbone, churn, &c.churn_ok, c);
                    one_exchange(m, Pod::Ext, plain, churn, &c.churn_ok, c);
                }
            }),
            spawn(attacks),
        ];
        Traffic { stop, threads }
    }

    /// Stops the traffic and waits until every exchange in progress has finished.
    fn stop(self) {
        self.stop.store(true, Relaxed);
        for t in self.threads {
            t.join().expect("traffic thread");
        }
    }
}

struct Sample {
    rss: [u64; 2],
    fds: [usize; 2],
}

#[test]
#[ignore = "minutes to hours of traffic: run by perf/soak.sh"]
fn soak() {
    if !root_or_skip("soak") {
        return;
    }
    let secs: u64 = std::env::var("SOAK_SECS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(60);
    let unix = SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .unwrap()
        .as_secs();
    let csv_path = std::env::var("SOAK_CSV")
        .map(PathBuf::from)
        .unwrap_or_else(|_| {
            Path::new(env!("CARGO_MANIFEST_DIR")).join(format!("perf/results/soak-{unix}.csv"))
        });
    let m = Arc::new(Mesh::start(Path::new(BIN), "io-uring", ""));
    // Servers stop only after the traffic did: a listener closed under a client's connection
    // would reset it and count as a failure of the proxy.
    let servers_stop = Arc::new(AtomicBool::new(false));
    let c = Arc::new(Counters::default());
    let mut servers = Vec::new();
    for (pod, port) in [(Pod::Mesh1, BULK_PORT), (Pod::Mesh1, CHURN_PORT)] {
        let bytes = if port == BULK_PORT { BULK } else { CHURN };
        servers.push(exchange_server(
            m.listen(pod, port),
            bytes,
            c.clone(),
            servers_stop.clone(),
        ));
    }
    servers.push(exchange_server(
        m.listen(Pod::Mesh2, CHURN_PORT),
        CHURN,
        c.clone(),
        servers_stop.clone(),
    ));
    servers.push(rr_server(
        m.listen(Pod::Mesh2, RR_PORT),
        servers_stop.clone(),
    ));

    let nodes: [&RingtunProcess; 2] = [m.a(), m.b()];
    if let Some(dir) = csv_path.parent() {
        std::fs::create_dir_all(dir).unwrap();
    }
    // Each sample is written as it is taken: a run cut short keeps what it measured.
    let mut csv = std::fs::File::create(&csv_path).expect("CSV file");
    let mut row = |line: String| {
        csv.write_all(line.as_bytes()).expect("CSV write");
    };
    row(String::from(
        "t_s,traffic,a_rss_kib,b_rss_kib,a_fds,b_fds,a_cpu_pct,b_cpu_pct,bulk_ok,rr_ok,churn_ok,\
         byte_errors,failures,rr_worst_ms,attack_connections\n",
    ));
    let started = Instant::now();
    let mut cpu_before = nodes.map(|n| n.cpu_seconds().unwrap_or(0.0));
    let mut samples: Vec<Sample> = Vec::new();
    let mut next = started + Duration::from_secs(1);
    // Samples one second at a time for `d`, with or without traffic running.
    let mut sample_for = |d: Duration, traffic: bool, samples: &mut Vec<Sample>| {
        let end = Instant::now() + d;
        while Instant::now() < end {
            std::thread::sleep(next.saturating_duration_since(Instant::now()));
            next += Duration::from_secs(1);
            let cpu_now = nodes.map(|n| n.cpu_seconds().unwrap_or(0.0));
            let cpu_pct = [0, 1].map(|i| (cpu_now[i] - cpu_before[i]) * 100.0);
            cpu_before = cpu_now;
            let s = Sample {
                rss: nodes.map(|n| n.rss_kib()),
                fds: nodes.map(|n| n.fd_count()),
            };
            row(format!(
                "{},{},{},{},{},{},{:.1},{:.1},{},{},{},{},{},{:.2},{}\n",
                started.elapsed().as_secs(),
                u8::from(traffic),
                s.rss[0],
                s.rss[1],
                s.fds[0],
                s.fds[1],
                cpu_pct[0],
                cpu_pct[1],
                c.bulk_ok.load(Relaxed),
                c.rr_ok.load(Relaxed),
                c.churn_ok.load(Relaxed),
                c.byte_errors.load(Relaxed),
                c.failures.load(Relaxed),
                c.rr_worst_us.swap(0, Relaxed) as f64 / 1000.0,
                c.attack_connections.load(Relaxed),
            ));
            samples.push(s);
        }
    };
    // A warm-up brings every pool, cache and allocator arena to its working size; the
    // memory both nodes rest at after it is the baseline the run's end is held to.
    let warmup = Duration::from_secs((secs / 10).clamp(10, 120));
    let t = Traffic::start(&m, &c);
    sample_for(warmup, true, &mut samples);
    t.stop();
    let mut rest = Vec::new();
    sample_for(REST, false, &mut rest);
    let rest_before = rest_rss(&rest);
    let t = Traffic::start(&m, &c);
    sample_for(Duration::from_secs(secs), true, &mut samples);
    t.stop();
    sample_for(REST, false, &mut rest);
    let rest_after = rest_rss(&rest);
    servers_stop.store(true, Relaxed);
    for s in servers {
        s.join().expect("server thread");
    }
    let peak = |i: usize| samples.iter().map(|s| s.rss[i]).max().unwrap_or(0);
    println!(
        "soak: {secs} s after a {} s warm-up; resident memory at rest before → after, KiB \
         (peak under traffic): node A {} → {} ({}), node B {} → {} ({}); descriptors at rest: \
         node A {:?}, node B {:?}; bulk {} rr {} churn {} exchanges; byte errors {}, \
         failures {}; CSV {}",
        warmup.as_secs(),
        rest_before[0],
        rest_after[0],
        peak(0),
        rest_before[1],
        rest_after[1],
        peak(1),
        rest.iter().map(|s| s.fds[0]).collect::<Vec<_>>(),
        rest.iter().map(|s| s.fds[1]).collect::<Vec<_>>(),
        c.bulk_ok.load(Relaxed),
        c.rr_ok.load(Relaxed),
        c.churn_ok.load(Relaxed),
        c.byte_errors.load(Relaxed),
        c.failures.load(Relaxed),
        csv_path.display()
    );
    assert_eq!(c.byte_errors.load(Relaxed), 0, "bytes arrived changed");
    assert_eq!(c.failures.load(Relaxed), 0, "exchanges failed");
    assert!(
        c.bulk_ok.load(Relaxed) > 0 && c.rr_ok.load(Relaxed) > 0 && c.churn_ok.load(Relaxed) > 0
    );
    for node in 0..2 {
        assert!(
            rest_after[node] <= rest_before[node] + LEAK_BOUND_KIB,
            "node {}: resident memory at rest grew from {} to {} KiB over the run",
            ["A", "B"][node],
            rest_before[node],
            rest_after[node]
        );
    }
    // Every flow ends and the descriptors come back (Mesh::finish asserts both).
    match Arc::try_unwrap(m) {
        Ok(m) => m.finish(),
        Err(_) => panic!("a traffic thread still holds the mesh"),
    }
}
