//! `h2-tunnel`: the conventional HBONE tunnel (h2 + tokio-rustls, user-space copies), the
//! baseline of perf/hbone.sh. See `ringtun_perf_tools::tunnel` for what it does.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;

use anyhow::{Context, Result};
use clap::{Args, Parser, Subcommand};
use ringtun_perf_tools::{default_threads, listen, parse_threads, runtime, tls, tunnel};
use rustls::pki_types::ServerName;

#[derive(Parser, Debug)]
#[command(
    name = "h2-tunnel",
    about = "The conventional HBONE tunnel (h2 over tokio-rustls, mTLS, HTTP/2 CONNECT) used as the baseline in perf/hbone.sh"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Terminate tunnels: mTLS HTTP/2 in, a TCP connection to each CONNECT's authority out.
    Server {
        /// Address for tunnels (HBONE uses port 15008).
        #[arg(long)]
        listen: SocketAddr,
        #[command(flatten)]
        tls: TlsArgs,
        #[command(flatten)]
        runtime: RuntimeArgs,
    },
    /// Originate tunnels: plain TCP in, one CONNECT stream per connection on a pooled HTTP/2
    /// connection to the peer.
    Client {
        /// Plain TCP listener for the connections to tunnel.
        #[arg(long)]
        listen: SocketAddr,
        /// The tunnel server (`h2-tunnel server` or any HBONE server).
        #[arg(long)]
        peer: SocketAddr,
        /// The `host:port` every tunnel CONNECTs to (the `:authority`).
        #[arg(long, value_parser = parse_authority)]
        target: String,
        /// TLS server name (DNS name or IP) sent to the peer; default: the peer's IP. Not
        /// checked against the certificate (mesh certificates carry a SPIFFE URI, no name).
        #[arg(long, value_parser = parse_server_name)]
        server_name: Option<ServerName<'static>>,
        #[command(flatten)]
        tls: TlsArgs,
        #[command(flatten)]
        runtime: RuntimeArgs,
    },
}

#[derive(Args, Debug)]
struct TlsArgs {
    /// PEM certificate chain presented to the peer (leaf first).
    #[arg(long)]
    cert: PathBuf,
    /// PEM private key of the certificate.
    #[arg(long)]
    key: PathBuf,
    /// PEM CA certificate(s) the peer's certificate must chain to.
    #[arg(long)]
    ca: PathBuf,
}

#[derive(Args, Debug)]
struct RuntimeArgs {
    /// Tokio worker threads (default: one per CPU).
    #[arg(long, value_parser = parse_threads)]
    threads: Option<usize>,
}

fn parse_authority(s: &str) -> Result<String, String> {
    match s.parse::<http::uri::Authority>() {
        Ok(a) if a.port_u16().is_some() && !a.host().is_empty() && !s.contains('@') => {
            Ok(a.to_string())
        }
        _ => Err(format!("'{s}' is not host:port")),
    }
}

fn parse_server_name(s: &str) -> Result<ServerName<'static>, String> {
    ServerName::try_from(s.to_string())
        .map_err(|_| format!("'{s}' is neither a DNS name nor an IP address"))
}

fn run(cli: Cli) -> Result<()> {
    match cli.command {
        Command::Server {
            listen: addr,
            tls: t,
            runtime: r,
        } => {
            let creds = tls::Credentials::load(&t.cert, &t.key, &t.ca)?;
            let config = tls::server_config(&creds)?;
            runtime(r.threads.unwrap_or_else(default_threads))?.block_on(async move {
                let listener = listen(addr, "server").await?;
                tunnel::serve(listener, config).await
            })
        }
        Command::Client {
            listen: addr,
            peer,
            target,
            server_name,
            tls: t,
            runtime: r,
        } => {
            let creds = tls::Credentials::load(&t.cert, &t.key, &t.ca)?;
            let config = tls::client_config(&creds)?;
            let name = server_name.unwrap_or_else(|| ServerName::IpAddress(peer.ip().into()));
            let client = Arc::new(tunnel::Client::new(peer, name, target, config));
            runtime(r.threads.unwrap_or_else(default_threads))?.block_on(async move {
                let listener = listen(addr, "client").await?;
                client.serve(listener).await.context("client")
            })
        }
    }
}

fn main() -> ExitCode {
    match run(Cli::parse()) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("h2-tunnel: error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(args: &[&str]) -> Result<Cli, clap::Error> {
        Cli::try_parse_from(std::iter::once("h2-tunnel").chain(args.iter().copied()))
    }

    const TLS: &[&str] = &["--cert", "c.pem", "--key", "k.pem", "--ca", "ca.pem"];

    #[test]
    fn client_arguments() {
        let mut args = vec![
            "client",
            "--listen",
            "127.0.0.1:25201",
            "--peer",
            "10.77.4.2:15008",
        ];
        args.extend(["--target", "10.77.4.2:5201", "--threads", "2"]);
        args.extend(TLS);
        let cli = parse(&args).unwrap();
        let Command::Client {
            target,
            server_name,
            runtime,
            peer,
            ..
        } = cli.command
        else {
            panic!("not client")
        };
        assert_eq!(target, "10.77.4.2:5201");
        assert_eq!(peer, "10.77.4.2:15008".parse().unwrap());
        assert!(server_name.is_none());
        assert_eq!(runtime.threads, Some(2));
    }

    #[test]
    fn bad_arguments_are_refused() {
        let base = ["client", "--listen", "127.0.0.1:1", "--peer", "127.0.0.1:2"];
        for target in ["10.0.0.1", "10.0.0.1:http", ":80", "user@host:80"] {
            let mut args = base.to_vec();
            args.extend(["--target", target]);
            args.extend(TLS);
            assert!(parse(&args).is_err(), "target {target} accepted");
        }
        let mut args = vec!["server", "--listen", "localhost:15008"];
        args.extend(TLS);
        assert!(parse(&args).is_err(), "listen needs an IP address");
        let mut args = vec!["server", "--listen", "0.0.0.0:15008", "--threads", "0"];
        args.extend(TLS);
        assert!(parse(&args).is_err(), "zero threads");
        assert!(
            parse(&["server", "--listen", "0.0.0.0:15008"]).is_err(),
            "certificates are required"
        );
    }

    #[test]
    fn server_name_may_be_dns_or_ip() {
        assert!(parse_server_name("server.default.svc").is_ok());
        assert!(parse_server_name("10.77.4.2").is_ok());
        assert!(parse_server_name("not a name!").is_err());
    }
}
