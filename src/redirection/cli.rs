//! `ringtun redirect install|remove|show`: turns command-line flags (and optionally a node
//! config file) into [`RedirectSettings`], picks the network namespace, and hands the plan to
//! [`rules`](super::rules). It only parses, reports and maps outcomes to exit codes; what the
//! rules are and how they are applied lives in `rules.rs`.

use std::io::Write as _;
use std::path::{Path, PathBuf};

use clap::{Args, Subcommand, ValueEnum};

use super::rules::{self, InstallState, IptablesBackend, RedirectError, RedirectSettings};
use crate::control_plane::config;
use crate::exit_code;

#[derive(Subcommand, Debug)]
pub enum RedirectAction {
    /// Install the capture rules (idempotent: installing twice leaves them installed once).
    Install(RedirectArgs),
    /// Remove the capture rules; succeeds when nothing is installed.
    Remove(RedirectArgs),
    /// Print the commands `install` would run and whether they are installed; changes nothing.
    Show {
        #[command(flatten)]
        args: RedirectArgs,
        /// Print the commands `remove` would run instead.
        #[arg(long)]
        remove: bool,
    },
}

#[derive(Args, Debug, Clone, Default)]
pub struct RedirectArgs {
    /// Network namespace: a name under /var/run/netns or a path (e.g. /proc/PID/ns/net).
    /// Without it, the current namespace (host mode).
    #[arg(long, value_name = "NAME_OR_PATH")]
    pub netns: Option<String>,
    /// Take ports and socket mark from this node configuration; flags below override it.
    #[arg(long, short, value_name = "FILE")]
    pub config: Option<PathBuf>,
    /// Outbound capture port (nat REDIRECT target).
    #[arg(long, value_name = "PORT")]
    pub outbound_port: Option<u16>,
    /// Inbound plaintext port (TPROXY target).
    #[arg(long, value_name = "PORT")]
    pub inbound_port: Option<u16>,
    /// Inbound HBONE port (TPROXY target).
    #[arg(long, value_name = "PORT")]
    pub hbone_port: Option<u16>,
    /// Socket mark of ringtun's own sockets (decimal or 0x hex).
    #[arg(long, value_name = "MARK", value_parser = parse_u32)]
    pub mark: Option<u32>,
    /// Mark TPROXY puts on captured packets (decimal or 0x hex).
    #[arg(long, value_name = "MARK", value_parser = parse_u32)]
    pub tproxy_mark: Option<u32>,
    /// Routing table for TPROXYed packets.
    #[arg(long, value_name = "TABLE")]
    pub route_table: Option<u32>,
    /// Program IPv4 only.
    #[arg(long)]
    pub no_ipv6: bool,
    /// iptables implementation: nft (iptables-nft) or legacy (iptables-legacy).
    #[arg(long, value_enum)]
    pub backend: Option<BackendArg>,
}

#[derive(Clone, Copy, Debug, ValueEnum, PartialEq, Eq)]
pub enum BackendArg {
    Nft,
    Legacy,
}

impl From<BackendArg> for IptablesBackend {
    fn from(b: BackendArg) -> Self {
        match b {
            BackendArg::Nft => IptablesBackend::Nft,
            BackendArg::Legacy => IptablesBackend::Legacy,
        }
    }
}

fn parse_u32(text: &str) -> Result<u32, String> {
    let parsed = match text.strip_prefix("0x").or_else(|| text.strip_prefix("0X")) {
        Some(hex) => u32::from_str_radix(hex, 16),
        None => text.parse(),
    };
    parsed.map_err(|e| format!("`{text}` is not a 32-bit number (decimal or 0x hex): {e}"))
}

impl RedirectArgs {
    /// Settings from the config file (if any) with the flags applied on top; on a bad config
    /// file, every error in it.
    pub fn settings(&self) -> Result<RedirectSettings, Vec<String>> {
        let mut s = match &self.config {
            Some(file) => {
                RedirectSettings::from_node(&config::load_file(file).map_err(|e| e.lines())?.node)
            }
            None => RedirectSettings::default(),
        };
        if let Some(p) = self.outbound_port {
            s.outbound_port = p;
        }
        if let Some(p) = self.inbound_port {
            s.inbound_plaintext_port = p;
        }
        if let Some(p) = self.hbone_port {
            s.inbound_hbone_port = p;
        }
        if let Some(m) = self.mark {
            s.socket_mark = m;
        }
        if let Some(m) = self.tproxy_mark {
            s.tproxy_mark = m;
        }
        if let Some(t) = self.route_table {
            s.route_table = t;
        }
        if self.no_ipv6 {
            s.ipv6 = false;
        }
        if let Some(b) = self.backend {
            s.backend = b.into();
        }
        Ok(s)
    }

    /// The namespace path, or `None` for the current namespace.
    pub fn netns_path(&self) -> Result<Option<PathBuf>, String> {
        match self.netns.as_deref() {
            None => Ok(None),
            Some("") => Err("--netns needs a name or a path".to_string()),
            Some(name) => Ok(Some(super::netns::netns_path(name))),
        }
    }
}

/// Runs one `ringtun redirect` action; returns the process exit code.
pub fn run(action: RedirectAction) -> i32 {
    let (verb, args, show_remove) = match &action {
        RedirectAction::Install(a) => ("install", a, false),
        RedirectAction::Remove(a) => ("remove", a, false),
        RedirectAction::Show { args, remove } => ("show", args, *remove),
    };
    let settings = match args.settings() {
        Ok(s) => s,
        Err(errors) => {
            for e in &errors {
                eprintln!("{e}");
            }
            eprintln!(
                "ringtun redirect {verb}: the configuration has {} error(s)",
                errors.len()
            );
            return exit_code::CONFIG;
        }
    };
    if let Err(errors) = settings.validate() {
        for e in &errors {
            eprintln!("ringtun redirect {verb}: {e}");
        }
        return exit_code::CONFIG;
    }
    let netns = match args.netns_path() {
        Ok(n) => n,
        Err(e) => {
            eprintln!("ringtun redirect {verb}: {e}");
            return exit_code::CONFIG;
        }
    };
    let netns = netns.as_deref();
    let plan = rules::plan(&settings);
    let outcome = match verb {
        "install" => rules::install(&plan, netns).map(|()| {
            say(&format!(
                "ringtun redirect: capture rules installed in {}\n",
                where_(netns)
            ));
        }),
        "remove" => rules::remove(&plan, netns).map(|()| {
            say(&format!(
                "ringtun redirect: capture rules removed from {}\n",
                where_(netns)
            ));
        }),
        _ => show(&plan, netns, show_remove),
    };
    match outcome {
        Ok(()) => exit_code::OK,
        Err(e) => {
            eprintln!("ringtun redirect {verb}: {e}");
            if verb == "install"
                && matches!(
                    e,
                    RedirectError::Spawn { .. } | RedirectError::CommandFailed { .. }
                )
            {
                // Install stops at the first failure; what ran before it is still in place.
                eprintln!(
                    "ringtun redirect install: rules may be partly installed; \
                     `ringtun redirect remove` with the same flags undoes them"
                );
            }
            exit_code(&e)
        }
    }
}

fn where_(netns: Option<&Path>) -> String {
    match netns {
        Some(p) => format!("network namespace {}", p.display()),
        None => "the current network namespace".to_string(),
    }
}

/// Prints the plan first (it needs no privilege, so it is useful even as a dry run), then asks
/// the namespace whether it is installed.
fn show(plan: &rules::RulePlan, netns: Option<&Path>, remove: bool) -> Result<(), RedirectError> {
    let s = plan.settings();
    let mut text = format!(
        "# ringtun capture rules for {}: outbound {}, inbound {}, hbone {}, socket mark {:#x}, \
         backend {}, {}\n",
        where_(netns),
        s.outbound_port,
        s.inbound_plaintext_port,
        s.inbound_hbone_port,
        s.socket_mark,
        s.backend,
        if s.ipv6 { "IPv4+IPv6" } else { "IPv4 only" },
    );
    if remove {
        text += "# `ringtun redirect remove` runs:\n";
        text += &plan.render_remove_in(netns);
    } else {
        text += "# `ringtun redirect install` runs:\n";
        text += &plan.render_in(netns);
    }
    say(&text);
    let state = rules::install_state(plan, netns)?;
    let mut text = format!("# state: {state}\n");
    if let InstallState::Partial { missing } = &state {
        for m in missing {
            text += &format!("#   missing: {m}\n");
        }
    }
    say(&text);
    Ok(())
}

/// Writes to stdout, ignoring failure: a closed pipe (`show | head`) means the reader has what
/// it wanted, and the exit code must still say whether the rules were changed.
fn say(text: &str) {
    let _ = std::io::stdout().lock().write_all(text.as_bytes());
}

fn exit_code(e: &RedirectError) -> i32 {
    match e {
        RedirectError::NotRoot => exit_code::NOPERM,
        // The namespace argument names nothing: a usage error, like a bad flag.
        RedirectError::InvalidSettings(_) | RedirectError::NetnsNotFound { .. } => {
            exit_code::CONFIG
        }
        RedirectError::Spawn { .. }
        | RedirectError::CommandFailed { .. }
        | RedirectError::LoopbackDown { .. } => exit_code::FAILURE,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn marks_parse_in_decimal_and_hex() {
        assert_eq!(parse_u32("1337"), Ok(1337));
        assert_eq!(parse_u32("0x539"), Ok(0x539));
        assert!(parse_u32("0xzz").is_err());
    }

    #[test]
    fn flags_override_defaults() {
        let args = RedirectArgs {
            outbound_port: Some(1),
            inbound_port: Some(2),
            hbone_port: Some(3),
            mark: Some(0x7),
            no_ipv6: true,
            backend: Some(BackendArg::Legacy),
            ..RedirectArgs::default()
        };
        let s = args.settings().unwrap_or_default();
        assert_eq!(
            (
                s.outbound_port,
                s.inbound_plaintext_port,
                s.inbound_hbone_port
            ),
            (1, 2, 3)
        );
        assert_eq!(s.socket_mark, 7);
        assert!(!s.ipv6);
        assert_eq!(s.backend, IptablesBackend::Legacy);
    }

    #[test]
    fn missing_config_file_is_reported() {
        let args = RedirectArgs {
            config: Some(PathBuf::from("/nonexistent/ringtun.yaml")),
            ..RedirectArgs::default()
        };
        let errors = args.settings().err().unwrap_or_default();
        assert!(
            errors
                .iter()
                .any(|e| e.contains("/nonexistent/ringtun.yaml")),
            "{errors:?}"
        );
    }

    #[test]
    fn bare_netns_name_maps_to_var_run_netns() {
        let args = RedirectArgs {
            netns: Some("pod-a".into()),
            ..RedirectArgs::default()
        };
        assert_eq!(
            args.netns_path(),
            Ok(Some(PathBuf::from("/var/run/netns/pod-a")))
        );
        let args = RedirectArgs {
            netns: Some("/proc/1/ns/net".into()),
            ..RedirectArgs::default()
        };
        assert_eq!(args.netns_path(), Ok(Some(PathBuf::from("/proc/1/ns/net"))));
    }
}
