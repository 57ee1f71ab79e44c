//! Tools behind `perf/hbone.sh` (see perf/README.md): `h2-tunnel`, the conventional HBONE tunnel
//! that ringtun is measured against, and `tcp-load`, a connection-rate / latency load generator
//! with its echo server. Not part of ringtun; nothing here is used by the proxy.

#![forbid(unsafe_code)]

pub mod load;
pub mod tls;
pub mod tunnel;

use std::io::Write;
use std::net::SocketAddr;

use anyhow::{Context, Result};

/// `--threads`: the runtime's worker threads, at least 1.
pub fn parse_threads(s: &str) -> Result<usize, String> {
    match s.parse::<usize>() {
        Ok(n) if (1..=1024).contains(&n) => Ok(n),
        _ => Err(format!("'{s}' is not a thread count (1..=1024)")),
    }
}

/// The default worker thread count: one per CPU.
pub fn default_threads() -> usize {
    std::thread::available_parallelism().map_or(1, |n| n.get())
}

/// A multi-threaded tokio runtime with `threads` workers.
pub fn runtime(threads: usize) -> Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(threads)
        .enable_all()
        .build()
        .context("starting the tokio runtime")
}

/// Binds `addr` and announces it on stdout as `listening on <addr>` (the real port when `addr`
/// asked for port 0), so scripts and tests know when and where the tool is ready.
pub async fn listen(addr: SocketAddr, what: &str) -> Result<tokio::net::TcpListener> {
    let listener = tokio::net::TcpListener::bind(addr)
        .await
        .with_context(|| format!("{what}: cannot listen on {addr}"))?;
    let local = listener.local_addr()?;
    let mut out = std::io::stdout().lock();
    writeln!(out, "listening on {local}")?;
    out.flush()?;
    Ok(listener)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn threads_must_be_positive() {
        assert_eq!(parse_threads("4"), Ok(4));
        assert!(parse_threads("0").is_err());
        assert!(parse_threads("-1").is_err());
        assert!(parse_threads("many").is_err());
        assert!(default_threads() >= 1);
    }
}
