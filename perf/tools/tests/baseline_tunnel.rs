//! The baseline tunnel end to end on 127.0.0.1: `tcp-load echo` ← `h2-tunnel server` ←
//! (mTLS HTTP/2) ← `h2-tunnel client` ← the test, with a CA and SPIFFE leaf certificates made
//! here. No root needed.

use std::io::{BufRead, BufReader, ErrorKind, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::mpsc;
use std::time::Duration;

use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose, SanType,
};
use sha2::{Digest, Sha256};

const H2_TUNNEL: &str = env!("CARGO_BIN_EXE_h2-tunnel");
const TCP_LOAD: &str = env!("CARGO_BIN_EXE_tcp-load");

/// A child process killed when the test ends, however it ends.
struct Proc(Child);

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Starts a tool that binds port 0 and prints `listening on <addr>`; returns it and the address.
fn start(bin: &str, args: &[&str]) -> (Proc, SocketAddr) {
    let mut child = Command::new(bin)
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .unwrap_or_else(|e| panic!("spawn {bin}: {e}"));
    let stdout = child.stdout.take().expect("stdout");
    let proc = Proc(child);
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        let mut line = String::new();
        let _ = BufReader::new(stdout).read_line(&mut line);
        let _ = tx.send(line);
    });
    let line = rx
        .recv_timeout(Duration::from_secs(10))
        .unwrap_or_else(|_| panic!("{bin} {args:?} did not say where it listens within 10 s"));
    let addr = line
        .trim()
        .strip_prefix("listening on ")
        .unwrap_or_else(|| panic!("{bin} {args:?} printed {line:?} instead of 'listening on …'"));
    (proc, addr.parse().expect("address"))
}

/// A scratch directory with ca.pem and two leaves (server/, client/) carrying only a SPIFFE
/// URI SAN, as `ringtun certs` writes them.
struct Certs {
    dir: PathBuf,
}

impl Certs {
    fn new(name: &str) -> Self {
        let dir =
            std::env::temp_dir().join(format!("ringtun-perf-tools-{}-{name}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let ca_key = KeyPair::generate().unwrap();
        let mut ca = CertificateParams::new(Vec::<String>::new()).unwrap();
        ca.distinguished_name
            .push(DnType::CommonName, "perf-tools test CA");
        ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        ca.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        let ca_cert = ca.self_signed(&ca_key).unwrap();
        std::fs::write(dir.join("ca.pem"), ca_cert.pem()).unwrap();
        let issuer = Issuer::new(ca, ca_key);
        for who in ["server", "client"] {
            let key = KeyPair::generate().unwrap();
            let mut leaf = CertificateParams::new(Vec::<String>::new()).unwrap();
            leaf.subject_alt_names = vec![SanType::URI(
                "spiffe://cluster.local/ns/default/sa/x".try_into().unwrap(),
            )];
            leaf.is_ca = IsCa::ExplicitNoCa;
            leaf.extended_key_usages = vec![
                ExtendedKeyUsagePurpose::ServerAuth,
                ExtendedKeyUsagePurpose::ClientAuth,
            ];
            let cert = leaf.signed_by(&key, &issuer).unwrap();
            std::fs::create_dir_all(dir.join(who)).unwrap();
            std::fs::write(dir.join(who).join("cert.pem"), cert.pem()).unwrap();
            std::fs::write(dir.join(who).join("key.pem"), key.serialize_pem()).unwrap();
        }
        Self { dir }
    }

    fn args(&self, who: &str) -> Vec<String> {
        let p = |f: &Path| f.to_str().unwrap().to_string();
        vec![
            "--cert".into(),
            p(&self.dir.join(who).join("cert.pem")),
            "--key".into(),
            p(&self.dir.join(who).join("key.pem")),
            "--ca".into(),
            p(&self.dir.join("ca.pem")),
        ]
    }
}

impl Drop for Certs {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// echo ← h2-tunnel server ← h2-tunnel client; connections to `entry` are tunnelled to the echo
/// server (or to `target` instead, when given).
struct Tunnel {
    entry: SocketAddr,
    _procs: Vec<Proc>,
    _certs: Certs,
}

fn tunnel(name: &str, target: Option<SocketAddr>) -> Tunnel {
    let certs = Certs::new(name);
    let (echo, echo_addr) = start(
        TCP_LOAD,
        &["echo", "--listen", "127.0.0.1:0", "--threads", "2"],
    );
    let mut server_args = vec!["server", "--listen", "127.0.0.1:0", "--threads", "2"];
    let server_tls = certs.args("server");
    server_args.extend(server_tls.iter().map(String::as_str));
    let (server, server_addr) = start(H2_TUNNEL, &server_args);
    let peer = server_addr.to_string();
    let target = target.unwrap_or(echo_addr).to_string();
    let mut client_args = vec![
        "client",
        "--listen",
        "127.0.0.1:0",
        "--peer",
        &peer,
        "--target",
        &target,
    ];
    client_args.extend(["--threads", "2"]);
    let client_tls = certs.args("client");
    client_args.extend(client_tls.iter().map(String::as_str));
    let (client, entry) = start(H2_TUNNEL, &client_args);
    Tunnel {
        entry,
        _procs: vec![echo, server, client],
        _certs: certs,
    }
}

fn connect(addr: SocketAddr) -> TcpStream {
    let s = TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(15))).unwrap();
    s
}

/// Sends `len` pseudo-random bytes, shuts down writing, reads to EOF; returns the SHA-256 of
/// what was sent and of what came back, and how many bytes came back.
fn round_trip(addr: SocketAddr, len: usize, seed: u64) -> ([u8; 32], [u8; 32], usize) {
    let mut s = connect(addr);
    let mut w = s.try_clone().unwrap();
    let writer = std::thread::spawn(move || {
        let mut h = Sha256::new();
        let mut x = seed | 1;
        let mut left = len;
        let mut block = vec![0u8; 64 * 1024];
        while left > 0 {
            let n = left.min(block.len());
            for b in &mut block[..n] {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                *b = x as u8;
            }
            w.write_all(&block[..n]).unwrap();
            h.update(&block[..n]);
            left -= n;
        }
        w.shutdown(Shutdown::Write).unwrap();
        h.finalize().into()
    });
    let mut h = Sha256::new();
    let mut got = 0;
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        let n = s.read(&mut buf).expect("read through the tunnel");
        if n == 0 {
            break;
        }
        h.update(&buf[..n]);
        got += n;
    }
    (writer.join().unwrap(), h.finalize().into(), got)
}

#[test]
fn eight_mib_each_way_arrive_intact_on_two_streams_at_once() {
    let t = tunnel("intact", None);
    let entry = t.entry;
    let other = std::thread::spawn(move || round_trip(entry, 8 << 20, 7));
    let (sent, back, got) = round_trip(t.entry, 8 << 20, 3);
    assert_eq!(got, 8 << 20);
    assert_eq!(sent, back, "SHA-256 of the echo differs from what was sent");
    let (sent, back, got) = other.join().unwrap();
    assert_eq!(got, 8 << 20);
    assert_eq!(sent, back, "second stream: SHA-256 differs");
}

#[test]
fn half_close_client_still_receives_the_echo_tail() {
    let t = tunnel("half-close", None);
    let mut s = connect(t.entry);
    let data: Vec<u8> = (0..200_000u32).map(|i| (i * 7 % 256) as u8).collect();
    s.write_all(&data).unwrap();
    s.shutdown(Shutdown::Write).unwrap();
    // Only now start reading: everything after our FIN must still come back, then EOF.
    std::thread::sleep(Duration::from_millis(200));
    let mut back = Vec::new();
    s.read_to_end(&mut back).expect("read the tail, then EOF");
    assert_eq!(back.len(), data.len());
    assert!(back == data, "tail differs");
}

#[test]
fn unreachable_target_resets_the_client_connection() {
    let closed = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap();
    let t = tunnel("unreachable", Some(closed));
    let mut s = connect(t.entry);
    // Nothing written first: a write that met the reset would consume the error and leave
    // read() to report a plain EOF.
    let mut buf = [0u8; 16];
    match s.read(&mut buf) {
        Err(e) => assert_eq!(e.kind(), ErrorKind::ConnectionReset, "{e}"),
        Ok(n) => panic!("expected a reset (the server answered 503), read {n} bytes / EOF"),
    }
}

fn json_of(out: &Output) -> serde_json::Value {
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{:?}\nstdout: {stdout}\nstderr: {}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_str(stdout.trim()).unwrap_or_else(|e| panic!("not JSON ({e}): {stdout}"))
}

#[test]
fn tcp_load_rate_and_latency_through_the_tunnel() {
    let t = tunnel("load", None);
    let target = t.entry.to_string();
    let rate = Command::new(TCP_LOAD)
        .args([
            "rate",
            "--target",
            &target,
            "--concurrency",
            "4",
            "--duration",
            "1",
            "--strict",
        ])
        .output()
        .unwrap();
    let r = json_of(&rate);
    assert_eq!(r["mode"], "rate");
    assert_eq!(r["errors"], 0);
    assert!(r["conns"].as_u64().unwrap() > 10, "{r}");
    assert!(r["conns_per_sec"].as_f64().unwrap() > 0.0, "{r}");

    let lat = Command::new(TCP_LOAD)
        .args([
            "latency",
            "--target",
            &target,
            "--connections",
            "1",
            "--duration",
            "1",
            "--strict",
        ])
        .output()
        .unwrap();
    let l = json_of(&lat);
    assert_eq!(l["mode"], "latency");
    assert!(l["exchanges"].as_u64().unwrap() > 10, "{l}");
    let (p50, p99, p999, max) = (
        l["p50_us"].as_f64().unwrap(),
        l["p99_us"].as_f64().unwrap(),
        l["p999_us"].as_f64().unwrap(),
        l["max_us"].as_f64().unwrap(),
    );
    assert!(0.0 < p50 && p50 <= p99 && p99 <= p999 && p999 <= max, "{l}");
}

#[test]
fn bad_files_and_refused_targets_fail_with_a_message() {
    let out = Command::new(H2_TUNNEL)
        .args(["server", "--listen", "127.0.0.1:0"])
        .args([
            "--cert",
            "/nonexistent/cert.pem",
            "--key",
            "/nonexistent/key.pem",
            "--ca",
            "/nonexistent/ca.pem",
        ])
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains("--cert /nonexistent/cert.pem: cannot read"),
        "{stderr}"
    );
    assert!(!stderr.contains("panicked"), "{stderr}");

    let closed = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap();
    let out = Command::new(TCP_LOAD)
        .args([
            "rate",
            "--target",
            &closed.to_string(),
            "--duration",
            "0.2",
            "--concurrency",
            "1",
        ])
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(stderr.contains("nothing completed"), "{stderr}");
}
