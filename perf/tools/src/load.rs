//! Connection-rate and latency load against an echo server, and the echo server itself.
//!
//! The load side uses plain blocking sockets, one OS thread per concurrent connection: a
//! thread that only waits on its own socket measures latency without a scheduler in between,
//! and 32 or so threads are cheap. Every exchange writes `bytes` and reads the same bytes back
//! (checked), so a proxy that loses, reorders or truncates data counts as an error.

use std::io::{Read, Write};
use std::net::{Shutdown, SocketAddr, TcpStream};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::Result;
use serde_json::{json, Value};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
const IO_TIMEOUT: Duration = Duration::from_secs(10);
/// Pause after a failed attempt, so a refused target is counted, not hammered.
const ERROR_PAUSE: Duration = Duration::from_millis(1);

/// What every load mode shares.
#[derive(Debug, Clone)]
pub struct LoadSpec {
    pub target: SocketAddr,
    /// Concurrent connections (threads).
    pub concurrency: usize,
    pub duration: Duration,
    /// Bytes written, then read back, per exchange.
    pub bytes: usize,
}

/// Errors seen by all threads: a count and the first message (the usual cause of the rest).
#[derive(Default)]
struct Errors {
    count: AtomicU64,
    first: Mutex<Option<String>>,
}

impl Errors {
    fn record(&self, what: &str, e: impl std::fmt::Display) {
        self.count.fetch_add(1, Ordering::Relaxed);
        let mut first = self.first.lock().unwrap_or_else(|p| p.into_inner());
        first.get_or_insert_with(|| format!("{what}: {e}"));
        drop(first);
        std::thread::sleep(ERROR_PAUSE);
    }

    fn first(&self) -> Option<String> {
        self.first.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }
}

fn payload(bytes: usize) -> Vec<u8> {
    (0..bytes).map(|i| (i % 251) as u8).collect()
}

fn connect(target: SocketAddr) -> std::io::Result<TcpStream> {
    let s = TcpStream::connect_timeout(&target, CONNECT_TIMEOUT)?;
    s.set_nodelay(true)?;
    s.set_read_timeout(Some(IO_TIMEOUT))?;
    s.set_write_timeout(Some(IO_TIMEOUT))?;
    Ok(s)
}

/// Writes `out`, reads as many bytes back into `back` and checks they are the same.
fn exchange(s: &mut TcpStream, out: &[u8], back: &mut [u8]) -> std::io::Result<()> {
    s.write_all(out)?;
    s.read_exact(back)?;
    if back != out {
        return Err(std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            "echoed bytes differ from the bytes sent",
        ));
    }
    Ok(())
}

/// Result of a load run, printed as one JSON line.
#[derive(Debug, Clone, PartialEq)]
pub struct Report {
    pub json: Value,
    /// Completed connections (rate) or exchanges (latency).
    pub completed: u64,
    pub errors: u64,
    pub first_error: Option<String>,
}

/// `concurrency` threads, each: connect, exchange `bytes`, close — until the duration is over.
pub fn rate(spec: &LoadSpec) -> Report {
    let errors = Arc::new(Errors::default());
    let done = Arc::new(AtomicU64::new(0));
    let start = Instant::now();
    let deadline = start + spec.duration;
    let threads: Vec<_> = (0..spec.concurrency)
        .map(|_| {
            let (errors, done, target) = (Arc::clone(&errors), Arc::clone(&done), spec.target);
            let out = payload(spec.bytes);
            std::thread::spawn(move || {
                let mut back = vec![0u8; out.len()];
                while Instant::now() < deadline {
                    let mut s = match connect(target) {
                        Ok(s) => s,
                        Err(e) => {
                            errors.record("connect", e);
                            continue;
                        }
                    };
                    match exchange(&mut s, &out, &mut back) {
                        Ok(()) => {
                            done.fetch_add(1, Ordering::Relaxed);
                        }
                        Err(e) => errors.record("exchange", e),
                    }
                }
            })
        })
        .collect();
    for t in threads {
        let _ = t.join();
    }
    let secs = start.elapsed().as_secs_f64();
    let conns = done.load(Ordering::Relaxed);
    let errs = errors.count.load(Ordering::Relaxed);
    Report {
        json: json!({
            "mode": "rate",
            "conns": conns,
            "errors": errs,
            "secs": round(secs, 3),
            "conns_per_sec": round(conns as f64 / secs, 1),
            "concurrency": spec.concurrency,
            "bytes": spec.bytes,
            "first_error": errors.first(),
        }),
        completed: conns,
        errors: errs,
        first_error: errors.first(),
    }
}

/// `concurrency` persistent connections, each ping-ponging `bytes` as fast as it can; the
/// latency of every exchange (write start → last byte read) is kept.
pub fn latency(spec: &LoadSpec) -> Report {
    let errors = Arc::new(Errors::default());
    let start = Instant::now();
    let deadline = start + spec.duration;
    let threads: Vec<_> = (0..spec.concurrency)
        .map(|_| {
            let (errors, target) = (Arc::clone(&errors), spec.target);
            let out = payload(spec.bytes);
            std::thread::spawn(move || {
                let mut back = vec![0u8; out.len()];
                let mut samples_ns: Vec<u64> = Vec::with_capacity(1 << 16);
                let mut conn: Option<TcpStream> = None;
                while Instant::now() < deadline {
                    let s = match conn.as_mut() {
                        Some(s) => s,
                        None => match connect(target) {
                            Ok(s) => conn.insert(s),
                            Err(e) => {
                                errors.record("connect", e);
                                continue;
                            }
                        },
                    };
                    let t0 = Instant::now();
                    match exchange(s, &out, &mut back) {
                        Ok(()) => samples_ns.push(t0.elapsed().as_nanos() as u64),
                        Err(e) => {
                            errors.record("exchange", e);
                            conn = None; // reconnect
                        }
                    }
                }
                if let Some(s) = conn {
                    let _ = s.shutdown(Shutdown::Both);
                }
                samples_ns
            })
        })
        .collect();
    let mut samples: Vec<u64> = Vec::new();
    for t in threads {
        if let Ok(s) = t.join() {
            samples.extend(s);
        }
    }
    let secs = start.elapsed().as_secs_f64();
    samples.sort_unstable();
    let us = |p: f64| percentile(&samples, p).map(|ns| round(ns as f64 / 1000.0, 1));
    let errs = errors.count.load(Ordering::Relaxed);
    Report {
        json: json!({
            "mode": "latency",
            "exchanges": samples.len(),
            "errors": errs,
            "secs": round(secs, 3),
            "connections": spec.concurrency,
            "bytes": spec.bytes,
            "p50_us": us(50.0),
            "p99_us": us(99.0),
            "p999_us": us(99.9),
            "max_us": samples.last().map(|&ns| round(ns as f64 / 1000.0, 1)),
            "first_error": errors.first(),
        }),
        completed: samples.len() as u64,
        errors: errs,
        first_error: errors.first(),
    }
}

/// The nearest-rank percentile of `sorted` (ascending): the smallest value with at least
/// `p` percent of the samples at or below it. `None` for no samples.
pub fn percentile(sorted: &[u64], p: f64) -> Option<u64> {
    if sorted.is_empty() {
        return None;
    }
    // The epsilon keeps decimal percentiles exact: 99.9 % of 1000 is rank 999, not 1000.
    let rank = (p / 100.0 * sorted.len() as f64 - 1e-9).ceil() as usize;
    Some(sorted[rank.clamp(1, sorted.len()) - 1])
}

fn round(x: f64, decimals: i32) -> f64 {
    let f = 10f64.powi(decimals);
    (x * f).round() / f
}

/// The echo server: every connection gets back what it sends; at EOF the write side is shut
/// down too (half-close: a client that shut down its writing still reads the tail).
pub async fn echo(listener: tokio::net::TcpListener) -> Result<()> {
    loop {
        let (mut s, _) = match listener.accept().await {
            Ok(a) => a,
            Err(e) => {
                eprintln!("accept: {e}");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        tokio::spawn(async move {
            let _ = s.set_nodelay(true);
            let mut buf = vec![0u8; 64 * 1024];
            loop {
                match s.read(&mut buf).await {
                    Ok(0) => {
                        let _ = s.shutdown().await;
                        return;
                    }
                    Ok(n) => {
                        if s.write_all(&buf[..n]).await.is_err() {
                            return;
                        }
                    }
                    Err(_) => return,
                }
            }
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentile_is_nearest_rank() {
        let v: Vec<u64> = (1..=100).collect();
        assert_eq!(percentile(&v, 50.0), Some(50));
        assert_eq!(percentile(&v, 99.0), Some(99));
        assert_eq!(percentile(&v, 99.9), Some(100));
        assert_eq!(percentile(&v, 100.0), Some(100));
        assert_eq!(percentile(&v, 0.0), Some(1));
    }

    #[test]
    fn percentile_of_few_samples() {
        assert_eq!(percentile(&[], 50.0), None);
        assert_eq!(percentile(&[7], 99.9), Some(7));
        assert_eq!(percentile(&[1, 2], 50.0), Some(1));
        assert_eq!(percentile(&[1, 2], 51.0), Some(2));
        let v: Vec<u64> = (1..=1000).collect();
        assert_eq!(percentile(&v, 99.9), Some(999));
    }

    #[test]
    fn payload_is_patterned_not_constant() {
        let p = payload(1024);
        assert_eq!(p.len(), 1024);
        assert_ne!(p[0], p[1]);
        assert_eq!(p[251], p[0]);
    }

    #[test]
    fn refused_target_counts_errors_and_completes_nothing() {
        // Bind then drop: nothing listens on that port any more.
        let addr = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap();
        let spec = LoadSpec {
            target: addr,
            concurrency: 2,
            duration: Duration::from_millis(100),
            bytes: 16,
        };
        let r = rate(&spec);
        assert_eq!(r.completed, 0);
        assert!(r.errors > 0);
        assert!(r.first_error.unwrap().starts_with("connect:"));
        assert_eq!(r.json["mode"], "rate");
    }
}
