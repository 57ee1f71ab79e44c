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
use hdrhistogram::Histogram;
use serde_json::{json, Value};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
const IO_TIMEOUT: Duration = Duration::from_secs(10);
/// How long a bulk flow waits, after its last write, for the sink's count: everything the
/// flow's socket buffers and the proxy hold must arrive first. 1,000 flows through a tunnel on
/// 2 cores hold gigabytes (the client's send buffers grow to megabytes each) and take 10 s
/// and more to drain; a proxy that really lost a flow's end still fails it.
const DRAIN_TIMEOUT: Duration = Duration::from_secs(60);
/// How long an open-loop run may overrun its duration to send what fell due in it.
const OPEN_LOOP_GRACE: Duration = Duration::from_secs(1);
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

/// Open-loop request/response: `concurrency` persistent connections together start `rate`
/// exchanges per second on a fixed schedule, whatever the answers do. Exchange `k` of
/// connection `c` is due at `(k * concurrency + c) / rate` seconds after the start, and its
/// latency runs from when it was **due** to its last byte read, not from when it was written.
/// A proxy that stalls therefore cannot hide the stall by slowing the client down (coordinated
/// omission): every exchange that waited behind the stall counts its wait. Latencies go into
/// an HDR histogram (1 µs .. 60 s, 3 significant digits) per connection, merged at the end.
///
/// Each thread sleeps to its next due time with a 1 ns timer slack, so the client's own wake-up
/// delay (a few µs, the same for every row measured) stays small against a proxy's.
pub fn open_loop(spec: &LoadSpec, rate: f64) -> Report {
    let errors = Arc::new(Errors::default());
    let start = Instant::now() + Duration::from_millis(20); // every thread is up by then
    let deadline = start + spec.duration;
    let interval = Duration::from_secs_f64(spec.concurrency as f64 / rate);
    let threads: Vec<_> = (0..spec.concurrency)
        .map(|c| {
            let (errors, target) = (Arc::clone(&errors), spec.target);
            let out = payload(spec.bytes);
            let first = start + Duration::from_secs_f64(c as f64 / rate);
            std::thread::spawn(move || {
                let _ = nix::sys::prctl::set_timerslack(1);
                let mut hist = latency_histogram();
                let mut back = vec![0u8; out.len()];
                let mut conn: Option<TcpStream> = None;
                let mut due = first;
                let mut late = 0u64; // exchanges written more than one interval after due
                let mut unsent = 0u64; // due before the deadline, never written (see below)
                while due < deadline {
                    let now = Instant::now();
                    // A target that answers too slowly for the rate would keep the client
                    // running long past its duration; what is still due a second after the
                    // end is counted as not sent, and shows as an achieved rate below the rate.
                    if now > deadline + OPEN_LOOP_GRACE {
                        unsent = (deadline - due).as_nanos().div_ceil(interval.as_nanos()) as u64;
                        break;
                    }
                    if due > now {
                        std::thread::sleep(due - now);
                    } else if now - due > interval {
                        late += 1;
                    }
                    let s = match conn.as_mut() {
                        Some(s) => s,
                        None => match connect(target) {
                            Ok(s) => conn.insert(s),
                            Err(e) => {
                                errors.record("connect", e);
                                due += interval;
                                continue;
                            }
                        },
                    };
                    match exchange(s, &out, &mut back) {
                        Ok(()) => {
                            let us = due.elapsed().as_micros() as u64;
                            hist.saturating_record(us.max(1));
                        }
                        Err(e) => {
                            errors.record("exchange", e);
                            conn = None;
                        }
                    }
                    due += interval;
                }
                if let Some(s) = conn {
                    let _ = s.shutdown(Shutdown::Both);
                }
                (hist, late, unsent)
            })
        })
        .collect();
    let mut hist = latency_histogram();
    let (mut late, mut unsent) = (0, 0);
    for t in threads {
        if let Ok((h, l, u)) = t.join() {
            let _ = hist.add(&h);
            late += l;
            unsent += u;
        }
    }
    let secs = start.elapsed().as_secs_f64();
    let at = |q: f64| (!hist.is_empty()).then(|| hist.value_at_quantile(q));
    let errs = errors.count.load(Ordering::Relaxed);
    let exchanges = hist.len();
    Report {
        json: json!({
            "mode": "open-loop",
            "rate": rate,
            "achieved_rate": round(exchanges as f64 / secs, 1),
            "exchanges": exchanges,
            "late": late,
            "unsent": unsent,
            "errors": errs,
            "secs": round(secs, 3),
            "connections": spec.concurrency,
            "bytes": spec.bytes,
            "p50_us": at(0.50),
            "p99_us": at(0.99),
            "p999_us": at(0.999),
            "max_us": (!hist.is_empty()).then(|| hist.max()),
            "first_error": errors.first(),
        }),
        completed: exchanges,
        errors: errs,
        first_error: errors.first(),
    }
}

fn latency_histogram() -> Histogram<u64> {
    Histogram::new_with_bounds(1, 60_000_000, 3).expect("constant histogram bounds are valid")
}

/// Bulk flows for the scaling series: `concurrency` connections each write for the duration,
/// then half-close and read the 8-byte count of what the sink received ([`sink`]). The
/// throughput is what arrived at the server over the time until the last count came back
/// (`secs`; `drain_secs` of it after the writing stopped), so bytes a proxy or the socket
/// buffers still held when the writing stopped count only once they arrive. Runs on a small tokio runtime so that
/// 1,000 flows do not need 1,000 threads.
pub fn bulk(spec: &LoadSpec, threads: usize) -> Report {
    let errors = Arc::new(Errors::default());
    let received = Arc::new(AtomicU64::new(0));
    let flows_done = Arc::new(AtomicU64::new(0));
    let start = Instant::now();
    let result = crate::runtime(threads).map(|rt| {
        rt.block_on(async {
            let mut tasks = Vec::with_capacity(spec.concurrency);
            for _ in 0..spec.concurrency {
                let (errors, received, flows_done) = (
                    Arc::clone(&errors),
                    Arc::clone(&received),
                    Arc::clone(&flows_done),
                );
                let (target, duration, bytes) = (spec.target, spec.duration, spec.bytes);
                tasks.push(tokio::spawn(async move {
                    match bulk_flow(target, start + duration, bytes).await {
                        Ok(n) => {
                            received.fetch_add(n, Ordering::Relaxed);
                            flows_done.fetch_add(1, Ordering::Relaxed);
                        }
                        Err(e) => errors.record("bulk flow", format!("{e:#}")),
                    }
                }));
            }
            for t in tasks {
                let _ = t.await;
            }
        })
    });
    if let Err(e) = result {
        errors.record("runtime", format!("{e:#}"));
    }
    let secs = start.elapsed().as_secs_f64();
    let drain_secs = (secs - spec.duration.as_secs_f64()).max(0.0);
    let bytes = received.load(Ordering::Relaxed);
    let errs = errors.count.load(Ordering::Relaxed);
    Report {
        json: json!({
            "mode": "bulk",
            "flows": spec.concurrency,
            "flows_done": flows_done.load(Ordering::Relaxed),
            "bytes_received": bytes,
            "secs": round(secs, 3),
            "drain_secs": round(drain_secs, 3),
            "gbit_per_sec": round(bytes as f64 * 8.0 / secs / 1e9, 3),
            "errors": errs,
            "first_error": errors.first(),
        }),
        completed: flows_done.load(Ordering::Relaxed),
        errors: errs,
        first_error: errors.first(),
    }
}

async fn bulk_flow(target: SocketAddr, until: Instant, chunk: usize) -> Result<u64> {
    let mut s = tokio::time::timeout(CONNECT_TIMEOUT, tokio::net::TcpStream::connect(target))
        .await
        .map_err(|_| anyhow::anyhow!("connect timed out"))??;
    let out = payload(chunk);
    let mut sent = 0u64;
    let until = tokio::time::Instant::from_std(until);
    loop {
        match tokio::time::timeout_at(until, s.write_all(&out)).await {
            Ok(r) => r?,
            Err(_) => break, // time is up; a partly written chunk is fine, the sink counts
        }
        sent += out.len() as u64;
    }
    s.shutdown().await?;
    let mut count = [0u8; 8];
    tokio::time::timeout(DRAIN_TIMEOUT, s.read_exact(&mut count))
        .await
        .map_err(|_| anyhow::anyhow!("no byte count from the sink within {DRAIN_TIMEOUT:?}"))??;
    let got = u64::from_be_bytes(count);
    anyhow::ensure!(
        got >= sent,
        "the sink counted {got} bytes, fewer than the {sent} written"
    );
    Ok(got)
}

/// The sink server for [`bulk`]: reads and drops everything; at EOF writes the number of bytes
/// it received as 8 big-endian bytes and closes.
pub async fn sink(listener: tokio::net::TcpListener) -> Result<()> {
    serve_each(listener, |mut s| async move {
        let mut buf = vec![0u8; 64 * 1024];
        let mut total = 0u64;
        loop {
            match s.read(&mut buf).await {
                Ok(0) => break,
                Ok(n) => total += n as u64,
                Err(_) => return,
            }
        }
        let _ = s.write_all(&total.to_be_bytes()).await;
        let _ = s.shutdown().await;
    })
    .await
}

/// Accepts connections for ever, each served by its own task; a failed accept (out of
/// descriptors, say) is reported and retried after a pause instead of ending the server.
async fn serve_each<F, Fut>(listener: tokio::net::TcpListener, serve: F) -> Result<()>
where
    F: Fn(tokio::net::TcpStream) -> Fut,
    Fut: std::future::Future<Output = ()> + Send + 'static,
{
    loop {
        match listener.accept().await {
            Ok((s, _)) => {
                tokio::spawn(serve(s));
            }
            Err(e) => {
                eprintln!("accept: {e}");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
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
    serve_each(listener, |mut s| async move {
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
    })
    .await
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

    /// Starts `server` on a listener of its own (one runtime thread) and returns its address.
    fn serve<F, Fut>(server: F) -> SocketAddr
    where
        F: FnOnce(tokio::net::TcpListener) -> Fut + Send + 'static,
        Fut: std::future::Future<Output = Result<()>>,
    {
        let std_listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = std_listener.local_addr().unwrap();
        std_listener.set_nonblocking(true).unwrap();
        std::thread::spawn(move || {
            let rt = crate::runtime(1).unwrap();
            rt.block_on(async move {
                let listener = tokio::net::TcpListener::from_std(std_listener).unwrap();
                let _ = server(listener).await;
            });
        });
        addr
    }

    fn spec(target: SocketAddr, concurrency: usize, millis: u64, bytes: usize) -> LoadSpec {
        LoadSpec {
            target,
            concurrency,
            duration: Duration::from_millis(millis),
            bytes,
        }
    }

    #[test]
    fn open_loop_keeps_its_schedule_against_a_fast_target() {
        let addr = serve(echo);
        let r = open_loop(&spec(addr, 4, 1000, 1024), 2000.0);
        assert_eq!(r.errors, 0, "{:?}", r.first_error);
        // 2,000 due in the second; a loaded test host may miss some at the edges.
        assert!((1800..=2000).contains(&r.completed), "{}", r.json);
        assert_eq!(r.json["unsent"], 0);
        assert!(r.json["p50_us"].as_u64().unwrap() >= 1);
    }

    /// The property the mode exists for: a target that stalls once for 300 ms delays every
    /// exchange due during the stall, and those waits are counted. A closed loop would have
    /// recorded one slow exchange and then simply sent fewer.
    #[test]
    fn open_loop_counts_the_wait_of_exchanges_due_during_a_stall() {
        let addr = serve(|listener: tokio::net::TcpListener| async move {
            let (mut s, _) = listener.accept().await?;
            let mut buf = vec![0u8; 64];
            let mut first = true;
            loop {
                let n = s.read(&mut buf).await?;
                if n == 0 {
                    return Ok(());
                }
                if std::mem::take(&mut first) {
                    tokio::time::sleep(Duration::from_millis(300)).await;
                }
                s.write_all(&buf[..n]).await?;
            }
        });
        let r = open_loop(&spec(addr, 1, 1000, 64), 100.0);
        assert_eq!(r.errors, 0, "{:?}", r.first_error);
        assert!(r.completed >= 95, "{}", r.json);
        // 30 exchanges fell due during the stall: about 30 % of them waited 0..300 ms, so the
        // median stays low and p99 is near the stall.
        let p50 = r.json["p50_us"].as_u64().unwrap();
        let p99 = r.json["p99_us"].as_u64().unwrap();
        assert!(p50 < 100_000, "{}", r.json);
        assert!(p99 >= 250_000, "{}", r.json);
        assert!(r.json["late"].as_u64().unwrap() >= 20, "{}", r.json);
    }

    #[test]
    fn open_loop_against_a_target_too_slow_for_the_rate_stops_and_says_so() {
        let addr = serve(|listener: tokio::net::TcpListener| async move {
            let (mut s, _) = listener.accept().await?;
            let mut buf = vec![0u8; 64];
            loop {
                let n = s.read(&mut buf).await?;
                if n == 0 {
                    return Ok(());
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
                s.write_all(&buf[..n]).await?;
            }
        });
        let t0 = Instant::now();
        let r = open_loop(&spec(addr, 1, 500, 64), 1000.0);
        assert!(
            t0.elapsed() < Duration::from_secs(3),
            "ran {:?}",
            t0.elapsed()
        );
        assert!(r.json["unsent"].as_u64().unwrap() > 400, "{}", r.json);
        assert!(
            r.json["achieved_rate"].as_f64().unwrap() < 100.0,
            "{}",
            r.json
        );
    }

    #[test]
    fn bulk_flows_report_what_the_sink_received() {
        let addr = serve(sink);
        let r = bulk(&spec(addr, 8, 300, 64 * 1024), 1);
        assert_eq!(r.errors, 0, "{:?}", r.first_error);
        assert_eq!(r.completed, 8);
        assert!(
            r.json["bytes_received"].as_u64().unwrap() >= 8 * 64 * 1024,
            "{}",
            r.json
        );
    }

    #[test]
    fn bulk_flow_against_a_sink_that_loses_bytes_is_an_error() {
        // Counts half of what it reads: a proxy that dropped bytes looks like this.
        let addr = serve(|listener: tokio::net::TcpListener| async move {
            let (mut s, _) = listener.accept().await?;
            let mut buf = vec![0u8; 64 * 1024];
            let mut total = 0u64;
            loop {
                match s.read(&mut buf).await? {
                    0 => break,
                    n => total += n as u64,
                }
            }
            s.write_all(&(total / 2).to_be_bytes()).await?;
            Ok(())
        });
        let r = bulk(&spec(addr, 1, 200, 16 * 1024), 1);
        assert_eq!(r.completed, 0);
        assert_eq!(r.errors, 1);
        assert!(r.first_error.unwrap().contains("fewer than"));
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
