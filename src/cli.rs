//! Command line: parses arguments and hands each subcommand to the module that does the work
//! (the library's, or the binary's own `demo`). Exit codes are the library's
//! [`exit_code`](ringtun::exit_code)s: 64 bad configuration or usage, 77 not permitted (needs
//! root), 1 anything else.

use std::path::PathBuf;

use clap::{Parser, Subcommand, ValueEnum};

use ringtun::control_plane::config::{self, DriverChoice};
use ringtun::exit_code;
use ringtun::observability::logging;

#[derive(Parser, Debug)]
#[command(
    name = "ringtun",
    version,
    about = "Node proxy for ambient-style service meshes"
)]
pub struct Cli {
    /// Log level: error, warn, info, debug, trace (also RINGTUN_LOG).
    #[arg(long, global = true)]
    pub log: Option<String>,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Subcommand, Debug)]
pub enum Command {
    /// Serve a node: reactors, capture listeners, metrics and readiness endpoints.
    Run {
        #[arg(long, short)]
        config: PathBuf,
        /// Override the configured driver.
        #[arg(long, value_enum)]
        driver: Option<DriverArg>,
        /// Override the configured number of reactor threads (1..=256, like `node.reactors`).
        #[arg(long, value_parser = clap::value_parser!(u16).range(1..=256))]
        reactors: Option<u16>,
    },
    /// Validate a configuration file: exit 0, or print every error with its place and exit 64.
    CheckConfig { file: PathBuf },
    /// Print a commented example configuration.
    PrintDefaultConfig,
    /// Create a development CA (if absent) and a short-lived certificate for every workload
    /// identity in a config, in the layout `node.tls` reads; in node CA mode (`node.tls.node_ca`)
    /// the node CA's certificate and key instead. For demos and tests.
    Certs {
        #[arg(long, short)]
        config: PathBuf,
        /// Output directory (default: the config's node.tls.certificate_dir, in node CA mode the
        /// trust bundle's directory; the trust bundle then goes to node.tls.trust_bundle, else
        /// to <out>/ca.pem). The node CA always goes where node.tls.node_ca names.
        #[arg(long)]
        out: Option<PathBuf>,
        /// Lifetime of each workload certificate (of the node CA in node CA mode): <integer>
        /// then ms, s, m or h.
        #[arg(long, default_value = "24h")]
        validity: String,
    },
    /// Report the kernel features ringtun uses and which it falls back from.
    Probe {
        #[arg(long)]
        json: bool,
    },
    /// Install, remove or show the capture rules of a network namespace.
    Redirect {
        #[command(subcommand)]
        action: ringtun::redirection::cli::RedirectAction,
    },
    /// Build a small mesh in network namespaces, send traffic through ringtun, report, clean up.
    Demo {
        #[arg(long, value_enum, default_value = "auto")]
        driver: DriverArg,
        /// Bytes sent each way per transfer.
        #[arg(long, default_value_t = 256 << 20)]
        bytes: u64,
    },
}

#[derive(Clone, Copy, Debug, ValueEnum, PartialEq, Eq)]
pub enum DriverArg {
    Auto,
    IoUring,
    Epoll,
}

impl From<DriverArg> for DriverChoice {
    fn from(d: DriverArg) -> Self {
        match d {
            DriverArg::Auto => DriverChoice::Auto,
            DriverArg::IoUring => DriverChoice::IoUring,
            DriverArg::Epoll => DriverChoice::Epoll,
        }
    }
}

pub fn main() -> i32 {
    let cli = match Cli::try_parse() {
        Ok(c) => c,
        Err(e) => {
            let code = if e.use_stderr() {
                exit_code::CONFIG
            } else {
                exit_code::OK
            };
            let _ = e.print();
            return code;
        }
    };
    // The demo prints its own report; its per-connection access log would only bury it.
    let default_level = matches!(cli.command, Command::Demo { .. }).then_some("warn");
    logging::init(cli.log.as_deref(), default_level);
    match cli.command {
        Command::Run {
            config,
            driver,
            reactors,
        } => {
            ringtun::app::run_from_file(&config, driver.map(Into::into), reactors.map(usize::from))
        }
        Command::CheckConfig { file } => check_config(&file),
        Command::PrintDefaultConfig => {
            print!("{}", config::DEFAULT_CONFIG_YAML);
            exit_code::OK
        }
        Command::Certs {
            config,
            out,
            validity,
        } => certs(&config, out, &validity),
        Command::Probe { json } => ringtun::kernel_features::print_report(json),
        Command::Redirect { action } => ringtun::redirection::cli::run(action),
        Command::Demo { driver, bytes } => crate::demo::run(driver.into(), bytes),
    }
}

/// Prints every problem of a config file that cannot be used, then how many there were.
fn print_config_errors(e: &config::FileError) {
    let lines = e.lines();
    for line in &lines {
        eprintln!("{line}");
    }
    eprintln!("{}: {} error(s)", e.path().display(), lines.len());
}

fn check_config(file: &std::path::Path) -> i32 {
    match config::check_file(file) {
        Ok((cfg, warnings)) => {
            for w in &warnings {
                eprintln!("{w}");
            }
            // What `run` would refuse beyond the file itself: the files it names.
            let problems = ringtun::app::check_files(&cfg);
            if !problems.is_empty() {
                for p in &problems {
                    eprintln!("{}: {p}", file.display());
                }
                eprintln!(
                    "{}: {} problem(s) with the files it names",
                    file.display(),
                    problems.len()
                );
                return exit_code::CONFIG;
            }
            // Loaded but not presented by `run`: a warning, as `run` starts with it.
            let expired = ringtun::app::certificate_warnings(&cfg);
            for w in &expired {
                eprintln!("{}: warning: {w}", file.display());
            }
            println!(
                "{}: ok (node {}, {} workloads, {} services, {} policies, {} warning(s))",
                file.display(),
                cfg.node.name,
                cfg.workloads.len(),
                cfg.services.len(),
                cfg.policies.len(),
                warnings.len() + expired.len()
            );
            exit_code::OK
        }
        Err(e) => {
            print_config_errors(&e);
            exit_code::CONFIG
        }
    }
}

fn certs(file: &std::path::Path, out: Option<PathBuf>, validity: &str) -> i32 {
    use ringtun::control_plane::certs::{self, CertsLayout, CA_CERT_FILE};
    let validity = match config::parse_duration(validity) {
        Ok(d) => d,
        Err(why) => {
            eprintln!("--validity `{validity}` {why}");
            return exit_code::CONFIG;
        }
    };
    let cfg = match config::load_file(file) {
        Ok(cfg) => cfg,
        Err(e) => {
            print_config_errors(&e);
            return exit_code::CONFIG;
        }
    };
    let layout = match (out, &cfg.node.tls) {
        (Some(dir), _) => CertsLayout {
            trust_bundle: dir.join(CA_CERT_FILE),
            certificate_dir: dir,
        },
        (None, Some(tls)) => CertsLayout {
            // Node CA mode has no certificate directory: the CA lives beside the bundle.
            certificate_dir: tls.certificate_dir.clone().unwrap_or_else(|| {
                tls.trust_bundle
                    .parent()
                    .filter(|p| !p.as_os_str().is_empty())
                    .map_or_else(|| PathBuf::from("."), PathBuf::from)
            }),
            trust_bundle: tls.trust_bundle.clone(),
        },
        (None, None) => {
            eprintln!(
                "{}: no node.tls section says where certificates go; add one or pass --out DIR",
                file.display()
            );
            return exit_code::CONFIG;
        }
    };
    let now = std::time::SystemTime::now();
    let written = match cfg.node.tls.as_ref().and_then(|t| t.node_ca.as_ref()) {
        Some(node_ca) => certs::write_node_ca(&cfg, &layout, node_ca, now, validity),
        None => certs::write_dev_certificates(&cfg, &layout, now, validity),
    };
    match written {
        Ok(report) => {
            for line in &report.lines {
                println!("{line}");
            }
            exit_code::OK
        }
        Err(
            e @ (certs::CertError::Identity { .. }
            | certs::CertError::OutlivesCa { .. }
            | certs::CertError::NoRoomForIntermediate),
        ) => {
            eprintln!("{}: {e}", file.display());
            exit_code::CONFIG
        }
        Err(e) => {
            eprintln!("ringtun certs: {e}");
            exit_code::FAILURE
        }
    }
}
