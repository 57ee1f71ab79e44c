//! `tcp-load`: connection-rate and latency load against an echo server, and the echo server.
//! Prints one JSON line per run. See `ringtun_perf_tools::load`.

use std::net::SocketAddr;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::{bail, Result};
use clap::{Args, Parser, Subcommand};
use ringtun_perf_tools::load::{self, LoadSpec};
use ringtun_perf_tools::{default_threads, listen, parse_threads, runtime};

#[derive(Parser, Debug)]
#[command(
    name = "tcp-load",
    about = "TCP connection-rate and latency load, and an echo server to pair with it"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// New connections as fast as possible: connect, write N bytes, read them back, close.
    Rate {
        #[command(flatten)]
        common: Common,
        /// Concurrent connection loops (threads).
        #[arg(long, default_value_t = 32, value_parser = parse_concurrency)]
        concurrency: usize,
    },
    /// Persistent connections doing request/response ping-pong of N bytes; per-exchange latency.
    Latency {
        #[command(flatten)]
        common: Common,
        /// Persistent connections (threads).
        #[arg(long, default_value_t = 1, value_parser = parse_concurrency)]
        connections: usize,
    },
    /// Persistent connections that together start exchanges at a fixed rate (open loop);
    /// latency counts from when each exchange was due, so a stalled target cannot hide it.
    OpenLoop {
        #[command(flatten)]
        common: Common,
        /// Exchanges per second, over all connections.
        #[arg(long, value_parser = parse_rate)]
        rate: f64,
        /// Persistent connections (threads); each has at most one exchange outstanding.
        #[arg(long, default_value_t = 16, value_parser = parse_concurrency)]
        connections: usize,
    },
    /// Bulk flows against `tcp-load sink`: each writes --bytes chunks for the duration, then
    /// half-closes and reads back how much the sink received.
    Bulk {
        #[command(flatten)]
        common: Common,
        /// Concurrent flows.
        #[arg(long, default_value_t = 1, value_parser = parse_concurrency)]
        flows: usize,
        /// Tokio worker threads driving the flows.
        #[arg(long, value_parser = parse_threads)]
        threads: Option<usize>,
    },
    /// Sink server for `bulk`: reads and drops; at EOF answers the byte count (8 bytes, BE).
    Sink {
        #[arg(long)]
        listen: SocketAddr,
        /// Tokio worker threads (default: one per CPU).
        #[arg(long, value_parser = parse_threads)]
        threads: Option<usize>,
    },
    /// Echo server: sends back what it reads; shuts down its write side at EOF.
    Echo {
        #[arg(long)]
        listen: SocketAddr,
        /// Tokio worker threads (default: one per CPU).
        #[arg(long, value_parser = parse_threads)]
        threads: Option<usize>,
    },
}

#[derive(Args, Debug)]
struct Common {
    /// The echo server (or a proxy in front of it).
    #[arg(long)]
    target: SocketAddr,
    /// Seconds to run (decimals allowed).
    #[arg(long, default_value = "10", value_parser = parse_secs)]
    duration: Duration,
    /// Bytes per exchange (bulk: per write).
    #[arg(long, default_value_t = 1024, value_parser = parse_bytes)]
    bytes: usize,
    /// Exit 1 if any connection or exchange failed (by default errors are only counted).
    #[arg(long)]
    strict: bool,
}

fn parse_concurrency(s: &str) -> Result<usize, String> {
    match s.parse::<usize>() {
        Ok(n) if (1..=10_000).contains(&n) => Ok(n),
        _ => Err(format!("'{s}' is not a count in 1..=10000")),
    }
}

fn parse_rate(s: &str) -> Result<f64, String> {
    match s.parse::<f64>() {
        Ok(x) if x.is_finite() && (1.0..=1e7).contains(&x) => Ok(x),
        _ => Err(format!("'{s}' is not a rate in 1..=10000000 per second")),
    }
}

fn parse_secs(s: &str) -> Result<Duration, String> {
    match s.parse::<f64>() {
        Ok(x) if x.is_finite() && x > 0.0 && x <= 86_400.0 => Ok(Duration::from_secs_f64(x)),
        _ => Err(format!("'{s}' is not a number of seconds in (0, 86400]")),
    }
}

fn parse_bytes(s: &str) -> Result<usize, String> {
    match s.parse::<usize>() {
        Ok(n) if (1..=64 << 20).contains(&n) => Ok(n),
        _ => Err(format!("'{s}' is not a byte count in 1..=67108864")),
    }
}

fn report(r: load::Report, strict: bool) -> Result<()> {
    println!("{}", r.json);
    let why = r.first_error.as_deref().unwrap_or("no error recorded");
    if r.completed == 0 {
        bail!("nothing completed ({} errors; first: {why})", r.errors);
    }
    if strict && r.errors > 0 {
        bail!("{} errors with --strict (first: {why})", r.errors);
    }
    Ok(())
}

fn run(cli: Cli) -> Result<()> {
    let spec = |c: &Common, concurrency| LoadSpec {
        target: c.target,
        concurrency,
        duration: c.duration,
        bytes: c.bytes,
    };
    match cli.command {
        Command::Rate {
            common,
            concurrency,
        } => report(load::rate(&spec(&common, concurrency)), common.strict),
        Command::Latency {
            common,
            connections,
        } => report(load::latency(&spec(&common, connections)), common.strict),
        Command::OpenLoop {
            common,
            rate,
            connections,
        } => report(
            load::open_loop(&spec(&common, connections), rate),
            common.strict,
        ),
        Command::Bulk {
            common,
            flows,
            threads,
        } => report(
            load::bulk(
                &spec(&common, flows),
                threads.unwrap_or_else(default_threads),
            ),
            common.strict,
        ),
        Command::Sink {
            listen: addr,
            threads,
        } => runtime(threads.unwrap_or_else(default_threads))?.block_on(async move {
            let listener = listen(addr, "sink").await?;
            load::sink(listener).await
        }),
        Command::Echo {
            listen: addr,
            threads,
        } => runtime(threads.unwrap_or_else(default_threads))?.block_on(async move {
            let listener = listen(addr, "echo").await?;
            load::echo(listener).await
        }),
    }
}

fn main() -> ExitCode {
    match run(Cli::parse()) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("tcp-load: error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(args: &[&str]) -> Result<Cli, clap::Error> {
        Cli::try_parse_from(std::iter::once("tcp-load").chain(args.iter().copied()))
    }

    #[test]
    fn rate_defaults_and_values() {
        let cli = parse(&["rate", "--target", "10.77.4.2:7000", "--duration", "2.5"]).unwrap();
        let Command::Rate {
            common,
            concurrency,
        } = cli.command
        else {
            panic!("not rate")
        };
        assert_eq!(concurrency, 32);
        assert_eq!(common.bytes, 1024);
        assert_eq!(common.duration, Duration::from_millis(2500));
        assert!(!common.strict);
    }

    #[test]
    fn latency_arguments() {
        let cli = parse(&[
            "latency",
            "--target",
            "127.0.0.1:7000",
            "--connections",
            "4",
            "--bytes",
            "64",
            "--strict",
        ])
        .unwrap();
        let Command::Latency {
            common,
            connections,
        } = cli.command
        else {
            panic!("not latency")
        };
        assert_eq!(connections, 4);
        assert_eq!(common.bytes, 64);
        assert!(common.strict);
    }

    #[test]
    fn bad_arguments_are_refused() {
        for args in [
            &["rate", "--target", "nowhere:7000"][..],
            &["rate", "--target", "127.0.0.1:7000", "--concurrency", "0"],
            &["rate", "--target", "127.0.0.1:7000", "--duration", "0"],
            &["rate", "--target", "127.0.0.1:7000", "--duration", "-3"],
            &["rate", "--target", "127.0.0.1:7000", "--duration", "NaN"],
            &["latency", "--target", "127.0.0.1:7000", "--bytes", "0"],
            &[
                "latency",
                "--target",
                "127.0.0.1:7000",
                "--connections",
                "x",
            ],
            &["echo", "--listen", "127.0.0.1"],
            &["open-loop", "--target", "127.0.0.1:7000"],
            &["open-loop", "--target", "127.0.0.1:7000", "--rate", "0"],
            &["open-loop", "--target", "127.0.0.1:7000", "--rate", "inf"],
            &["bulk", "--target", "127.0.0.1:7000", "--flows", "0"],
            &["sink"],
            &["rate"],
        ] {
            assert!(parse(args).is_err(), "{args:?} accepted");
        }
    }

    #[test]
    fn strict_fails_on_errors_and_nothing_completed_always_fails() {
        let r = |completed, errors| load::Report {
            json: serde_json::json!({}),
            completed,
            errors,
            first_error: None,
        };
        assert!(report(r(10, 0), true).is_ok());
        assert!(report(r(10, 3), false).is_ok());
        assert!(report(r(10, 3), true).is_err());
        assert!(report(r(0, 3), false).is_err());
    }
}
