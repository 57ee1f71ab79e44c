//! Randomised: the tunnel connection runs through a relay that cuts the byte stream at random
//! places with random pauses (so frame headers and payloads arrive split every way), pipes are
//! small (so payload spills from pipe to buffer mid-frame), applications read slowly at random
//! (so sinks fill) and CONNECTs are decided after a random delay. Every stream's bytes must
//! arrive whole and in order, in both directions, whatever the interleaving.

use std::io::{Read, Write};
use std::net::Shutdown;
use std::sync::{Arc, Mutex};

use super::*;

/// xorshift64, seeded: each failure names the seed that reproduces it.
#[derive(Clone)]
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }

    fn below(&mut self, n: u64) -> u64 {
        self.next() % n.max(1)
    }
}

/// Forwards `from` → `to` in random pieces with random short pauses; FIN follows EOF.
fn chop(mut from: TcpStream, mut to: TcpStream, mut rng: Rng) {
    let mut buf = vec![0u8; 70_000];
    loop {
        let limit = if rng.below(4) == 0 { 20 } else { 70_000 };
        let want = 1 + rng.below(limit) as usize;
        match from.read(&mut buf[..want]) {
            Ok(0) | Err(_) => break,
            Ok(n) => {
                if to.write_all(&buf[..n]).is_err() {
                    break;
                }
            }
        }
        if rng.below(8) == 0 {
            std::thread::sleep(Duration::from_micros(rng.below(2_000)));
        }
    }
    let _ = to.shutdown(Shutdown::Write);
}

/// Two loopback connections joined by a chopping relay: (client's socket, server's socket).
fn relayed(rng: &mut Rng) -> (TcpStream, TcpStream) {
    let (client, relay_a) = tcp_pair();
    let (relay_b, server) = tcp_pair();
    let (a2, b2) = (relay_a.try_clone().unwrap(), relay_b.try_clone().unwrap());
    let (r1, r2) = (Rng(rng.next() | 1), Rng(rng.next() | 1));
    std::thread::spawn(move || chop(relay_a, relay_b, r1));
    std::thread::spawn(move || chop(b2, a2, r2));
    (client, server)
}

/// Reads to EOF in random pieces with random pauses, then echoes it all back in random pieces.
fn slow_echo(mut sock: TcpStream, mut rng: Rng) {
    let mut got = Vec::new();
    let mut buf = vec![0u8; 200_000];
    loop {
        let want = 1 + rng.below(200_000) as usize;
        match sock.read(&mut buf[..want]) {
            Ok(0) => break,
            Ok(n) => got.extend_from_slice(&buf[..n]),
            Err(_) => return,
        }
        if rng.below(4) == 0 {
            std::thread::sleep(Duration::from_micros(rng.below(5_000)));
        }
    }
    let mut off = 0;
    while off < got.len() {
        let n = (1 + rng.below(300_000) as usize).min(got.len() - off);
        if sock.write_all(&got[off..off + n]).is_err() {
            return;
        }
        off += n;
    }
}

fn one_run(seed: u64) {
    let mut rng = Rng(seed);
    let tls = match rng.below(3) {
        0 => Tls::Plain { zero_copy: true },
        1 => Tls::Plain { zero_copy: false },
        _ => Tls::Rustls,
    };
    let readiness = READINESS[rng.below(2) as usize];
    let pipe = [4096, 16_384, 65_536][rng.below(3) as usize];
    let mut env = env();
    env.max_bytes_per_wakeup = [4096, 65_536, 1 << 20][rng.below(3) as usize];
    let socks = relayed(&mut rng);
    let mut h = Harness::new(tls, readiness, env, PipePool::new(pipe, 4, 64), socks);
    h.accept_after = Duration::from_millis(rng.below(20));
    let app_rng = Arc::new(Mutex::new(Rng(rng.next() | 1)));
    h.on_accept = Box::new(move |_, sock| {
        let r = Rng(app_rng.lock().unwrap().next() | 1);
        std::thread::spawn(move || slow_echo(sock, r));
    });
    h.wait_established();
    let streams = 1 + rng.below(6);
    let apps: Vec<_> = (0..streams)
        .map(|i| {
            let len = rng.below(900_000) as usize;
            let payload = data(len, seed ^ (i + 1));
            let want = sha(&payload);
            (client_app(h.open(), payload), want, len)
        })
        .collect();
    h.run_until(|h| {
        h.client.ended.len() == streams as usize && h.server.ended.len() == streams as usize
    });
    for (i, (app, want, len)) in apps.into_iter().enumerate() {
        let got = app.join().unwrap().unwrap_or_else(|e| {
            panic!("seed {seed:#x} {tls:?} {readiness:?} pipe {pipe}: stream {i}: {e}")
        });
        assert_eq!(
            got.len(),
            len,
            "seed {seed:#x} {tls:?} {readiness:?} pipe {pipe}: stream {i} length"
        );
        assert_eq!(
            sha(&got),
            want,
            "seed {seed:#x} {tls:?} {readiness:?} pipe {pipe}: stream {i} reordered or corrupted"
        );
    }
    for (side, node) in [("client", &h.client), ("server", &h.server)] {
        assert!(
            node.ended
                .iter()
                .all(|e| e.end == crate::tunnel::streams::StreamEnd::Clean),
            "seed {seed:#x}: {side} streams ended uncleanly: {:?}",
            node.ended.iter().map(|e| e.end).collect::<Vec<_>>()
        );
    }
}

#[test]
fn every_stream_arrives_whole_and_in_order_whatever_the_interleaving() {
    // RINGTUN_TUNNEL_SEEDS=N runs N seeds (default 16); RINGTUN_TUNNEL_SEED=x runs one.
    if let Ok(seed) = std::env::var("RINGTUN_TUNNEL_SEED") {
        let seed = u64::from_str_radix(seed.trim_start_matches("0x"), 16).expect("hex seed");
        return one_run(seed);
    }
    let runs: u64 = std::env::var("RINGTUN_TUNNEL_SEEDS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(16);
    for i in 0..runs {
        one_run(0x5eed_0000 + i * 0x9e37_79b9);
    }
}
