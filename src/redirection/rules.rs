//! The capture rules of one network namespace: the iptables chains, policy-routing rule and
//! local route that hand a workload's TCP connections to ringtun (outbound via nat `REDIRECT`,
//! inbound via mangle `TPROXY`), modelled on ztunnel's in-pod rules. A pure function turns
//! [`RedirectSettings`] into a [`RulePlan`]; the plan is the single source for what `install`
//! runs, what `show` prints and what `remove` undoes, so the three can never disagree. Every rule
//! lives in a ringtun-owned chain reached by one jump from a built-in chain, so removal deletes
//! exactly what was added and nothing of anyone else's. This module runs the `iptables`/`ip`
//! programs (inside a namespace through `nsenter`); it does not speak netlink itself, and it
//! does not decide which namespaces to capture — callers do.

use std::fmt::{self, Write as _};
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

/// nat chain holding the outbound (`REDIRECT`) rules; the mangle chain of the same name
/// restores the mark on replies to connections ringtun delivered.
pub const OUTPUT_CHAIN: &str = "RINGTUN_OUTPUT";
/// mangle chain holding the inbound (`TPROXY`) rules.
pub const PREROUTING_CHAIN: &str = "RINGTUN_PREROUTING";
/// Priority of the policy-routing rule; just below the kernel's `main` (32766) so ordinary
/// routing decisions made by earlier rules are not overridden.
pub const RULE_PRIORITY: u32 = 32764;
/// How long an iptables call waits for the xtables lock (legacy backend; the lock file is shared
/// by every namespace on the host) before failing rather than hanging.
const XTABLES_WAIT_SECONDS: &str = "10";

/// Which iptables implementation programs the kernel. Named explicitly (`iptables-nft`,
/// `iptables-legacy`) rather than through the `iptables` alternative, so the commands `show`
/// prints are the ones that run regardless of how the host's alternatives are set.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum IptablesBackend {
    /// `iptables-nft` / `ip6tables-nft`: nf_tables through the iptables syntax.
    #[default]
    Nft,
    /// `iptables-legacy` / `ip6tables-legacy`: the x_tables kernel interface.
    Legacy,
}

impl IptablesBackend {
    fn program(self, family: Family) -> &'static str {
        match (self, family) {
            (Self::Nft, Family::V4) => "iptables-nft",
            (Self::Nft, Family::V6) => "ip6tables-nft",
            (Self::Legacy, Family::V4) => "iptables-legacy",
            (Self::Legacy, Family::V6) => "ip6tables-legacy",
        }
    }
}

impl fmt::Display for IptablesBackend {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Nft => "nft",
            Self::Legacy => "legacy",
        })
    }
}

/// Everything the rules depend on. Ports and the socket mark must match what the proxy uses
/// (see [`RedirectSettings::from_node`]); the rest only has to be consistent between install and
/// remove.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RedirectSettings {
    /// Where outbound connections are redirected (nat `REDIRECT`).
    pub outbound_port: u16,
    /// Where inbound plaintext connections are delivered (`TPROXY`).
    pub inbound_plaintext_port: u16,
    /// Where inbound HBONE tunnels are delivered (`TPROXY`).
    pub inbound_hbone_port: u16,
    /// `SO_MARK` on every socket ringtun opens; packets carrying it are never captured.
    pub socket_mark: u32,
    /// Mark `TPROXY` puts on captured packets so the policy rule routes them locally.
    pub tproxy_mark: u32,
    /// Bits of the packet mark ringtun owns; other bits are left to other software.
    pub mark_mask: u32,
    /// Routing table holding the `local` route for `TPROXY`ed packets.
    pub route_table: u32,
    /// Also program IPv6 (`ip6tables`, `ip -6`).
    pub ipv6: bool,
    pub backend: IptablesBackend,
}

impl Default for RedirectSettings {
    fn default() -> Self {
        Self {
            outbound_port: 15001,
            inbound_plaintext_port: 15006,
            inbound_hbone_port: 15008,
            socket_mark: 0x539,
            tproxy_mark: 0x111,
            mark_mask: 0xfff,
            route_table: 133,
            ipv6: true,
            backend: IptablesBackend::Nft,
        }
    }
}

impl RedirectSettings {
    /// Takes the ports and socket mark the proxy itself uses from the node config, so the
    /// rules capture into the listeners that actually exist; everything else keeps its default.
    pub fn from_node(node: &crate::control_plane::config::NodeConfig) -> Self {
        Self {
            outbound_port: node.ports.outbound,
            inbound_plaintext_port: node.ports.inbound_plaintext,
            inbound_hbone_port: node.ports.inbound_hbone,
            socket_mark: node.socket_mark,
            ..Self::default()
        }
    }

    /// Every inconsistency at once; an empty list means the rules would do what they say.
    pub fn validate(&self) -> Result<(), Vec<String>> {
        let mut errors = Vec::new();
        let ports = [
            ("outbound port", self.outbound_port),
            ("inbound plaintext port", self.inbound_plaintext_port),
            ("inbound HBONE port", self.inbound_hbone_port),
        ];
        for (name, port) in ports {
            if port == 0 {
                errors.push(format!("{name} must not be 0"));
            }
        }
        for (i, (a, pa)) in ports.iter().enumerate() {
            for (b, pb) in &ports[i + 1..] {
                if pa == pb && *pa != 0 {
                    errors.push(format!(
                        "{a} and {b} are both {pa}; each needs its own port"
                    ));
                }
            }
        }
        if self.mark_mask == 0 {
            errors.push("mark mask must not be 0".to_string());
        }
        for (name, mark) in [
            ("socket mark", self.socket_mark),
            ("TPROXY mark", self.tproxy_mark),
        ] {
            if mark & self.mark_mask == 0 {
                errors.push(format!(
                    "{name} {mark:#x} has no bit inside the mark mask {:#x}",
                    self.mark_mask
                ));
            } else if mark & !self.mark_mask != 0 {
                // Bits outside the mask are ignored by every match, so the value the operator
                // wrote would not be the one that takes effect.
                errors.push(format!(
                    "{name} {mark:#x} has bits outside the mark mask {:#x}",
                    self.mark_mask
                ));
            }
        }
        if self.socket_mark & self.mark_mask == self.tproxy_mark & self.mark_mask {
            errors.push(format!(
                "socket mark and TPROXY mark are equal under the mask ({:#x}); captured packets \
                 would look like ringtun's own",
                self.socket_mark & self.mark_mask
            ));
        }
        // 0 is "unspecified"; 253-255 are the kernel's default, main and local tables.
        if matches!(self.route_table, 0 | 253..=255) {
            errors.push(format!(
                "route table {} is reserved by the kernel; pick another (default 133)",
                self.route_table
            ));
        }
        if errors.is_empty() {
            Ok(())
        } else {
            Err(errors)
        }
    }

    fn families(&self) -> Vec<Family> {
        if self.ipv6 {
            vec![Family::V4, Family::V6]
        } else {
            vec![Family::V4]
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Family {
    V4,
    V6,
}

impl Family {
    fn loopback_host(self) -> &'static str {
        match self {
            Self::V4 => "127.0.0.1/32",
            Self::V6 => "::1/128",
        }
    }

    fn loopback_net(self) -> &'static str {
        match self {
            Self::V4 => "127.0.0.0/8",
            Self::V6 => "::1/128",
        }
    }

    fn any_addr(self) -> &'static str {
        match self {
            Self::V4 => "0.0.0.0",
            // ip6tables' TPROXY rejects an IPv4 --on-ip.
            Self::V6 => "::",
        }
    }

    fn default_net(self) -> &'static str {
        match self {
            Self::V4 => "0.0.0.0/0",
            Self::V6 => "::/0",
        }
    }

    /// Lists the legacy x_tables tables that exist in the caller's namespace.
    fn legacy_tables_file(self) -> &'static str {
        match self {
            Self::V4 => "/proc/net/ip_tables_names",
            Self::V6 => "/proc/net/ip6_tables_names",
        }
    }
}

/// One program invocation, as an argument vector (never through a shell).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Cmd {
    pub argv: Vec<String>,
}

impl Cmd {
    fn new<I, S>(argv: I) -> Self
    where
        I: IntoIterator<Item = S>,
        S: Into<String>,
    {
        Self {
            argv: argv.into_iter().map(Into::into).collect(),
        }
    }

    /// The argument vector actually executed: prefixed with `nsenter --net=…` for a namespace.
    fn full_argv(&self, netns: Option<&Path>) -> Vec<String> {
        let mut v = Vec::with_capacity(self.argv.len() + 2);
        if let Some(ns) = netns {
            v.push("nsenter".to_string());
            v.push(format!("--net={}", ns.display()));
        }
        v.extend(self.argv.iter().cloned());
        v
    }

    /// The command as a shell line (arguments quoted where the shell would otherwise alter them).
    pub fn render(&self, netns: Option<&Path>) -> String {
        let argv = self.full_argv(netns);
        let quoted: Vec<String> = argv.iter().map(|a| shell_quote(a)).collect();
        quoted.join(" ")
    }

    fn output(&self, netns: Option<&Path>) -> Result<Output, RedirectError> {
        let argv = self.full_argv(netns);
        let (program, args) = match argv.split_first() {
            Some(split) => split,
            // Every command the plan builds has a program; an empty one is a bug, but it is
            // reported rather than panicking.
            None => {
                return Err(RedirectError::Spawn {
                    command: String::new(),
                    program: String::new(),
                    source: std::io::Error::new(std::io::ErrorKind::InvalidInput, "empty command"),
                })
            }
        };
        log::debug!("redirect: running {}", self.render(netns));
        Command::new(program)
            .args(args)
            .output()
            .map_err(|source| RedirectError::Spawn {
                command: self.render(netns),
                program: program.clone(),
                source,
            })
    }

    /// Runs the command; a non-zero exit is an error carrying the command line and its stderr.
    fn run(&self, netns: Option<&Path>) -> Result<(), RedirectError> {
        let out = self.output(netns)?;
        if out.status.success() {
            Ok(())
        } else {
            Err(RedirectError::CommandFailed {
                command: self.render(netns),
                status: match out.status.code() {
                    Some(code) => format!("exit status {code}"),
                    None => "killed by a signal".to_string(),
                },
                stderr: String::from_utf8_lossy(&out.stderr).trim().to_string(),
            })
        }
    }
}

/// A read-only question asked of the namespace.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Probe {
    /// Holds when the command exits 0 (e.g. `iptables -C`).
    Succeeds(Cmd),
    /// Holds when the command prints anything on stdout, whatever its exit status (e.g. a
    /// filtered `ip rule show`, which exits 0 whether or not something matched).
    PrintsAnything(Cmd),
}

impl Probe {
    fn render(&self, netns: Option<&Path>) -> String {
        match self {
            Self::Succeeds(c) => format!("{} >/dev/null 2>&1", c.render(netns)),
            Self::PrintsAnything(c) => format!("[ -n \"$({} 2>/dev/null)\" ]", c.render(netns)),
        }
    }

    fn holds(&self, netns: Option<&Path>) -> Result<bool, RedirectError> {
        match self {
            Self::Succeeds(c) => Ok(c.output(netns)?.status.success()),
            Self::PrintsAnything(c) => Ok(!String::from_utf8_lossy(&c.output(netns)?.stdout)
                .trim()
                .is_empty()),
        }
    }
}

/// Probes that must all hold (evaluated in order, stopping at the first that fails).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Check(pub Vec<Probe>);

impl Check {
    fn render(&self, netns: Option<&Path>) -> String {
        let parts: Vec<String> = self.0.iter().map(|p| p.render(netns)).collect();
        parts.join(" && ")
    }

    fn holds(&self, netns: Option<&Path>) -> Result<bool, RedirectError> {
        for probe in &self.0 {
            if !probe.holds(netns)? {
                return Ok(false);
            }
        }
        Ok(true)
    }
}

/// One step of an install or remove.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Step {
    /// Always run.
    Run(Cmd),
    /// Run `apply` unless `check` holds: creates something only if it is not there yet.
    Unless { check: Check, apply: Cmd },
    /// Run `apply` only if `check` holds: deletes something only if it is there.
    If { check: Check, apply: Cmd },
}

impl Step {
    /// The step as one shell line with the same meaning.
    pub fn render(&self, netns: Option<&Path>) -> String {
        match self {
            Self::Run(c) => c.render(netns),
            Self::Unless { check, apply } => {
                format!("{} || {}", check.render(netns), apply.render(netns))
            }
            Self::If { check, apply } => {
                format!(
                    "if {}; then {}; fi",
                    check.render(netns),
                    apply.render(netns)
                )
            }
        }
    }

    /// The command that changes something (the part a reader cares about).
    pub fn command(&self) -> &Cmd {
        match self {
            Self::Run(c) | Self::Unless { apply: c, .. } | Self::If { apply: c, .. } => c,
        }
    }

    fn execute(&self, netns: Option<&Path>) -> Result<(), RedirectError> {
        match self {
            Self::Run(c) => c.run(netns),
            Self::Unless { check, apply } => {
                if check.holds(netns)? {
                    Ok(())
                } else {
                    apply.run(netns)
                }
            }
            Self::If { check, apply } => {
                if check.holds(netns)? {
                    apply.run(netns)
                } else {
                    Ok(())
                }
            }
        }
    }
}

/// One thing the plan puts into the namespace. Install and remove steps are both derived from
/// this list (remove in reverse order), which is what makes remove the exact mirror of install.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Object {
    /// `local` default route in the TPROXY table.
    LocalRoute { family: Family },
    /// `fwmark` → TPROXY table.
    PolicyRule { family: Family },
    /// A ringtun-owned chain; installing it also flushes it so a re-install re-fills it.
    Chain {
        family: Family,
        table: &'static str,
        chain: &'static str,
    },
    /// One rule appended to a ringtun-owned chain (removed with the chain).
    ChainRule {
        family: Family,
        table: &'static str,
        chain: &'static str,
        spec: Vec<String>,
    },
    /// The single jump from a built-in chain into a ringtun-owned one.
    Jump {
        family: Family,
        table: &'static str,
        from: &'static str,
        to: &'static str,
    },
}

/// The complete description of ringtun's capture rules for one set of settings.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RulePlan {
    settings: RedirectSettings,
    objects: Vec<Object>,
}

/// Whether a namespace holds a plan's rules.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum InstallState {
    /// Every chain, rule, jump, policy rule and route of the plan is present.
    Installed,
    /// None of them is present.
    NotInstalled,
    /// Some are present: an interrupted install, or rules installed with other settings.
    /// `missing` names the absent pieces by the command that would create them.
    Partial { missing: Vec<String> },
}

impl fmt::Display for InstallState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Installed => f.write_str("installed"),
            Self::NotInstalled => f.write_str("not installed"),
            Self::Partial { missing } => {
                write!(
                    f,
                    "partially installed ({} piece(s) missing)",
                    missing.len()
                )
            }
        }
    }
}

/// Failures of install, remove and the state check; each says whose fault it is and what to do.
#[derive(Debug, thiserror::Error)]
pub enum RedirectError {
    #[error("changing or reading capture rules needs root (CAP_NET_ADMIN); run as root")]
    NotRoot,
    #[error("invalid redirect settings: {}", .0.join("; "))]
    InvalidSettings(Vec<String>),
    #[error(
        "network namespace {}: not found (create it with `ip netns add NAME`, or pass a path \
         such as /proc/PID/ns/net)",
        .path.display()
    )]
    NetnsNotFound { path: PathBuf },
    #[error("cannot run `{command}`: {source} (is `{program}` installed and on PATH?)")]
    Spawn {
        command: String,
        program: String,
        #[source]
        source: std::io::Error,
    },
    #[error(
        "loopback `lo` is down in {place}: TPROXY delivers captured connections through a local \
         route on it; bring it up first (`ip link set lo up` there); no rule was changed"
    )]
    LoopbackDown { place: String },
    #[error("`{command}` failed ({status}): {stderr}")]
    CommandFailed {
        command: String,
        status: String,
        stderr: String,
    },
}

/// Builds the plan for `settings`. Pure: touches no system state, so it can be rendered and
/// tested anywhere.
pub fn plan(settings: &RedirectSettings) -> RulePlan {
    let s = settings;
    let mark = |m: u32| format!("{m:#x}/{:#x}", s.mark_mask);
    let mut objects = Vec::new();
    for family in s.families() {
        // Routing first: once the TPROXY rules exist, marked packets must already have their
        // local route, or they would be routed (and lost) as ordinary traffic.
        objects.push(Object::LocalRoute { family });
        objects.push(Object::PolicyRule { family });

        let tproxy = |port: u16| -> Vec<String> {
            to_strings(&[
                "-j",
                "TPROXY",
                "--on-port",
                &port.to_string(),
                "--on-ip",
                family.any_addr(),
                "--tproxy-mark",
                &mark(s.tproxy_mark),
            ])
        };
        let (table, chain) = ("mangle", PREROUTING_CHAIN);
        objects.push(Object::Chain {
            family,
            table,
            chain,
        });
        let inbound: Vec<Vec<String>> = vec![
            // A connection ringtun delivers to the pod (its first packet arrives over lo with
            // ringtun's mark) is marked, so the replies find their way back to it even when it
            // delivers from the client's address (see the mangle OUTPUT chain). Only a
            // connection ringtun opens (its SYN: state NEW): ringtun's answers on a captured
            // outbound connection also come over lo with its mark, and marking that connection
            // would re-route every one of its packets (see the OUTPUT rule).
            [
                to_strings(&["-i", "lo", "-p", "tcp"]),
                to_strings(&["-m", "mark", "--mark", &mark(s.socket_mark)]),
                to_strings(&["-m", "conntrack", "--ctstate", "NEW"]),
                to_strings(&["-j", "CONNMARK", "--set-xmark", &mark(s.tproxy_mark)]),
            ]
            .concat(),
            // What the pod sends itself over lo is not inbound traffic.
            to_strings(&[
                "-i",
                "lo",
                "!",
                "-d",
                family.loopback_host(),
                "-p",
                "tcp",
                "-j",
                "ACCEPT",
            ]),
            // HBONE tunnels go to the HBONE listener (ringtun's own connections excepted).
            [
                to_strings(&["-p", "tcp", "--dport", &s.inbound_hbone_port.to_string()]),
                to_strings(&["-m", "mark", "!", "--mark", &mark(s.socket_mark)]),
                tproxy(s.inbound_hbone_port),
            ]
            .concat(),
            // Packets of flows already accepted skip the capture rules.
            to_strings(&[
                "-p",
                "tcp",
                "-m",
                "conntrack",
                "--ctstate",
                "RELATED,ESTABLISHED",
                "-j",
                "ACCEPT",
            ]),
            // Everything else inbound is plaintext for the inbound listener.
            [
                to_strings(&["!", "-d", family.loopback_host(), "-p", "tcp"]),
                to_strings(&["-m", "mark", "!", "--mark", &mark(s.socket_mark)]),
                tproxy(s.inbound_plaintext_port),
            ]
            .concat(),
        ];
        for spec in inbound {
            objects.push(Object::ChainRule {
                family,
                table,
                chain,
                spec,
            });
        }

        // Replies of a connection ringtun delivered carry the connection's mark again, and
        // the policy rule routes them to the local table: back to ringtun's socket, whatever
        // address (the client's) it was bound to. Only the replies: a packet whose mark
        // changes here is routed again (`ip_route_me_harder`), and ringtun's own packets on
        // the connection already leave by the right route.
        let (table, chain) = ("mangle", OUTPUT_CHAIN);
        objects.push(Object::Chain {
            family,
            table,
            chain,
        });
        objects.push(Object::ChainRule {
            family,
            table,
            chain,
            spec: to_strings(&[
                "-p",
                "tcp",
                "-m",
                "connmark",
                "--mark",
                &mark(s.tproxy_mark),
                "-m",
                "conntrack",
                "--ctdir",
                "REPLY",
                "-j",
                "CONNMARK",
                "--restore-mark",
                "--nfmask",
                &format!("{:#x}", s.mark_mask),
                "--ctmask",
                &format!("{:#x}", s.mark_mask),
            ]),
        });

        let (table, chain) = ("nat", OUTPUT_CHAIN);
        objects.push(Object::Chain {
            family,
            table,
            chain,
        });
        let outbound: Vec<Vec<String>> = vec![
            // ringtun's own sockets must not be captured again (the mark is set with SO_MARK).
            to_strings(&[
                "-p",
                "tcp",
                "-m",
                "mark",
                "--mark",
                &mark(s.socket_mark),
                "-j",
                "RETURN",
            ]),
            // Loopback, including the pod talking to itself, is never proxied.
            to_strings(&["-d", family.loopback_net(), "-j", "RETURN"]),
            to_strings(&["-o", "lo", "-j", "RETURN"]),
            to_strings(&[
                "-p",
                "tcp",
                "-j",
                "REDIRECT",
                "--to-ports",
                &s.outbound_port.to_string(),
            ]),
        ];
        for spec in outbound {
            objects.push(Object::ChainRule {
                family,
                table,
                chain,
                spec,
            });
        }

        // Jumps last, so traffic reaches the chains only once they are complete.
        objects.push(Object::Jump {
            family,
            table: "mangle",
            from: "PREROUTING",
            to: PREROUTING_CHAIN,
        });
        objects.push(Object::Jump {
            family,
            table: "nat",
            from: "OUTPUT",
            to: OUTPUT_CHAIN,
        });
        objects.push(Object::Jump {
            family,
            table: "mangle",
            from: "OUTPUT",
            to: OUTPUT_CHAIN,
        });
    }
    RulePlan {
        settings: *settings,
        objects,
    }
}

fn to_strings(parts: &[&str]) -> Vec<String> {
    parts.iter().map(|p| p.to_string()).collect()
}

impl RulePlan {
    pub fn settings(&self) -> &RedirectSettings {
        &self.settings
    }

    /// What `install` runs, in order.
    pub fn install_steps(&self) -> Vec<Step> {
        self.objects
            .iter()
            .flat_map(|o| self.install_object(o))
            .collect()
    }

    /// What `remove` runs, in order: the install objects undone in reverse.
    pub fn remove_steps(&self) -> Vec<Step> {
        self.objects
            .iter()
            .rev()
            .flat_map(|o| self.remove_object(o))
            .collect()
    }

    /// The install steps as shell lines, in the current namespace.
    pub fn render(&self) -> String {
        render_steps(&self.install_steps(), None)
    }

    /// The install steps as shell lines, run inside `netns` when given.
    pub fn render_in(&self, netns: Option<&Path>) -> String {
        render_steps(&self.install_steps(), netns)
    }

    /// The remove steps as shell lines, run inside `netns` when given.
    pub fn render_remove_in(&self, netns: Option<&Path>) -> String {
        render_steps(&self.remove_steps(), netns)
    }

    fn iptables(&self, family: Family, table: &str, rest: &[&str]) -> Cmd {
        let mut argv = to_strings(&[
            self.settings.backend.program(family),
            "-w",
            XTABLES_WAIT_SECONDS,
            "-t",
            table,
        ]);
        argv.extend(to_strings(rest));
        Cmd { argv }
    }

    fn ip(&self, family: Family, rest: &[&str]) -> Cmd {
        let mut argv = vec!["ip".to_string()];
        if family == Family::V6 {
            argv.push("-6".to_string());
        }
        argv.extend(to_strings(rest));
        Cmd { argv }
    }

    /// Probes that hold when `table` exists for the legacy backend. Asking legacy iptables about
    /// a table registers it in the namespace, which would make `show` (and a `remove` of nothing)
    /// change the namespace; the table list in /proc answers without that side effect.
    fn table_exists(&self, family: Family, table: &str) -> Vec<Probe> {
        match self.settings.backend {
            IptablesBackend::Nft => Vec::new(),
            IptablesBackend::Legacy => vec![Probe::Succeeds(Cmd::new([
                "grep",
                "-qx",
                table,
                family.legacy_tables_file(),
            ]))],
        }
    }

    fn route_args(&self, family: Family) -> Vec<String> {
        to_strings(&[
            "local",
            family.default_net(),
            "dev",
            "lo",
            "table",
            &self.settings.route_table.to_string(),
        ])
    }

    fn rule_args(&self) -> Vec<String> {
        let s = &self.settings;
        to_strings(&[
            "fwmark",
            &format!("{:#x}/{:#x}", s.tproxy_mark, s.mark_mask),
            "lookup",
            &s.route_table.to_string(),
            "pref",
            &RULE_PRIORITY.to_string(),
        ])
    }

    /// The check that holds when `object` is present in the namespace.
    fn exists(&self, object: &Object) -> Check {
        match object {
            Object::LocalRoute { family } => {
                let table = self.settings.route_table.to_string();
                Check(vec![Probe::PrintsAnything(self.ip(
                    *family,
                    &[
                        "route",
                        "show",
                        "table",
                        &table,
                        "type",
                        "local",
                        "exact",
                        family.default_net(),
                        "dev",
                        "lo",
                    ],
                ))])
            }
            Object::PolicyRule { family } => {
                let mut cmd = self.ip(*family, &["rule", "show"]);
                cmd.argv.extend(self.rule_args());
                Check(vec![Probe::PrintsAnything(cmd)])
            }
            Object::Chain {
                family,
                table,
                chain,
            } => {
                let mut probes = self.table_exists(*family, table);
                probes.push(Probe::Succeeds(self.iptables(
                    *family,
                    table,
                    &["-S", chain],
                )));
                Check(probes)
            }
            Object::ChainRule {
                family,
                table,
                chain,
                spec,
            } => {
                let mut probes = self.table_exists(*family, table);
                let mut cmd = self.iptables(*family, table, &["-C", chain]);
                cmd.argv.extend(spec.iter().cloned());
                probes.push(Probe::Succeeds(cmd));
                Check(probes)
            }
            Object::Jump {
                family,
                table,
                from,
                to,
            } => {
                let mut probes = self.table_exists(*family, table);
                probes.push(Probe::Succeeds(self.iptables(
                    *family,
                    table,
                    &["-C", from, "-j", to],
                )));
                Check(probes)
            }
        }
    }

    fn install_object(&self, object: &Object) -> Vec<Step> {
        let check = self.exists(object);
        match object {
            Object::LocalRoute { family } => {
                let mut apply = self.ip(*family, &["route", "add"]);
                apply.argv.extend(self.route_args(*family));
                vec![Step::Unless { check, apply }]
            }
            Object::PolicyRule { family } => {
                let mut apply = self.ip(*family, &["rule", "add"]);
                apply.argv.extend(self.rule_args());
                vec![Step::Unless { check, apply }]
            }
            Object::Chain {
                family,
                table,
                chain,
            } => vec![
                Step::Unless {
                    check,
                    apply: self.iptables(*family, table, &["-N", chain]),
                },
                // A re-install replaces the chain's contents rather than appending duplicates.
                Step::Run(self.iptables(*family, table, &["-F", chain])),
            ],
            Object::ChainRule {
                family,
                table,
                chain,
                spec,
            } => {
                let mut apply = self.iptables(*family, table, &["-A", chain]);
                apply.argv.extend(spec.iter().cloned());
                vec![Step::Run(apply)]
            }
            Object::Jump {
                family,
                table,
                from,
                to,
            } => vec![Step::Unless {
                check,
                apply: self.iptables(*family, table, &["-A", from, "-j", to]),
            }],
        }
    }

    fn remove_object(&self, object: &Object) -> Vec<Step> {
        let check = self.exists(object);
        match object {
            Object::LocalRoute { family } => {
                let mut apply = self.ip(*family, &["route", "del"]);
                apply.argv.extend(self.route_args(*family));
                vec![Step::If { check, apply }]
            }
            Object::PolicyRule { family } => {
                let mut apply = self.ip(*family, &["rule", "del"]);
                apply.argv.extend(self.rule_args());
                vec![Step::If { check, apply }]
            }
            Object::Chain {
                family,
                table,
                chain,
            } => vec![
                Step::If {
                    check: check.clone(),
                    apply: self.iptables(*family, table, &["-F", chain]),
                },
                Step::If {
                    check,
                    apply: self.iptables(*family, table, &["-X", chain]),
                },
            ],
            // Flushing and deleting the chain removes its rules.
            Object::ChainRule { .. } => Vec::new(),
            Object::Jump {
                family,
                table,
                from,
                to,
            } => vec![Step::If {
                check,
                apply: self.iptables(*family, table, &["-D", from, "-j", to]),
            }],
        }
    }

    /// Describes each object by the command that creates it (used for `Partial` reports).
    fn describe(&self, object: &Object) -> String {
        self.install_object(object)
            .iter()
            .map(|s| s.command().render(None))
            .next()
            .unwrap_or_default()
    }
}

fn render_steps(steps: &[Step], netns: Option<&Path>) -> String {
    let mut out = String::new();
    for step in steps {
        // Writing to a String cannot fail.
        let _ = writeln!(out, "{}", step.render(netns));
    }
    out
}

/// Quotes `arg` for a POSIX shell when it holds anything but plainly safe characters. A lone
/// `!` is left bare: as its own word after a command name it is neither negation nor history.
fn shell_quote(arg: &str) -> String {
    let safe = |c: char| c.is_ascii_alphanumeric() || "_-./:=,+@%".contains(c);
    if arg == "!" || (!arg.is_empty() && arg.chars().all(safe)) {
        arg.to_string()
    } else {
        format!("'{}'", arg.replace('\'', r"'\''"))
    }
}

/// Checks what every operation needs before it touches anything: valid settings, root, and an
/// existing namespace.
fn preflight(plan: &RulePlan, netns: Option<&Path>) -> Result<(), RedirectError> {
    plan.settings
        .validate()
        .map_err(RedirectError::InvalidSettings)?;
    if !crate::sys::process::is_root() {
        return Err(RedirectError::NotRoot);
    }
    if let Some(path) = netns {
        if !path.exists() {
            return Err(RedirectError::NetnsNotFound {
                path: path.to_path_buf(),
            });
        }
    }
    Ok(())
}

/// Installs `plan` in `netns` (the current namespace when `None`). Idempotent: chains are
/// re-filled, jumps, the policy rule and the route are added only when missing. Stops at the
/// first failing command; running `remove` afterwards cleans up a partial install.
pub fn install(plan: &RulePlan, netns: Option<&Path>) -> Result<(), RedirectError> {
    preflight(plan, netns)?;
    // The TPROXY route (`local default dev lo table …`) cannot be added while `lo` is down:
    // checked before anything changes, so a down loopback never leaves half a rule set.
    if !loopback_is_up(netns)? {
        return Err(RedirectError::LoopbackDown {
            place: match netns {
                Some(p) => format!("network namespace {}", p.display()),
                None => "the current network namespace".into(),
            },
        });
    }
    for step in plan.install_steps() {
        step.execute(netns)?;
    }
    Ok(())
}

/// Whether `lo` is administratively up in `netns` (its flags, as `ip -o link show` prints
/// them, include `UP`).
fn loopback_is_up(netns: Option<&Path>) -> Result<bool, RedirectError> {
    let cmd = Cmd::new(["ip", "-o", "link", "show", "dev", "lo"]);
    let out = cmd.output(netns)?;
    if !out.status.success() {
        return Err(RedirectError::CommandFailed {
            command: cmd.render(netns),
            status: format!("{}", out.status),
            stderr: String::from_utf8_lossy(&out.stderr).trim().to_string(),
        });
    }
    Ok(link_flags_up(&String::from_utf8_lossy(&out.stdout)))
}

/// `1: lo: <LOOPBACK,UP,LOWER_UP> mtu 65536 …` → true; `<LOOPBACK>` → false.
fn link_flags_up(line: &str) -> bool {
    line.split_once('<')
        .and_then(|(_, rest)| rest.split_once('>'))
        .is_some_and(|(flags, _)| flags.split(',').any(|f| f == "UP"))
}

/// Removes everything `install` adds; succeeds when nothing (or only part) is installed.
pub fn remove(plan: &RulePlan, netns: Option<&Path>) -> Result<(), RedirectError> {
    preflight(plan, netns)?;
    for step in plan.remove_steps() {
        step.execute(netns)?;
    }
    Ok(())
}

/// Reports which of the plan's pieces are present, changing nothing.
pub fn install_state(plan: &RulePlan, netns: Option<&Path>) -> Result<InstallState, RedirectError> {
    preflight(plan, netns)?;
    let mut missing = Vec::new();
    for object in &plan.objects {
        if !plan.exists(object).holds(netns)? {
            missing.push(plan.describe(object));
        }
    }
    Ok(if missing.is_empty() {
        InstallState::Installed
    } else if missing.len() == plan.objects.len() {
        InstallState::NotInstalled
    } else {
        InstallState::Partial { missing }
    })
}

/// True when every piece of `plan` is present in `netns` (the current namespace when `None`).
pub fn is_installed(plan: &RulePlan, netns: Option<&Path>) -> Result<bool, RedirectError> {
    Ok(install_state(plan, netns)? == InstallState::Installed)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn loopback_flags_are_read_from_ip_link() {
        assert!(link_flags_up(
            "1: lo: <LOOPBACK,UP,LOWER_UP> mtu 65536 qdisc noqueue state UNKNOWN"
        ));
        assert!(!link_flags_up(
            "1: lo: <LOOPBACK> mtu 65536 qdisc noop state DOWN"
        ));
        assert!(!link_flags_up("garbage"));
    }

    fn lines(text: &str) -> Vec<&str> {
        text.lines().collect()
    }

    fn has_line_ending(text: &str, suffix: &str) -> bool {
        text.lines().any(|l| l.ends_with(suffix))
    }

    #[test]
    fn default_plan_contains_ztunnel_style_rules() {
        let text = plan(&RedirectSettings::default()).render();
        let ipt = "iptables-nft -w 10";
        for expected in [
            format!(
                "{ipt} -t mangle -A RINGTUN_PREROUTING -i lo ! -d 127.0.0.1/32 -p tcp -j ACCEPT"
            ),
            format!(
                "{ipt} -t mangle -A RINGTUN_PREROUTING -p tcp --dport 15008 -m mark ! --mark \
                 0x539/0xfff -j TPROXY --on-port 15008 --on-ip 0.0.0.0 --tproxy-mark 0x111/0xfff"
            ),
            format!(
                "{ipt} -t mangle -A RINGTUN_PREROUTING -p tcp -m conntrack --ctstate \
                 RELATED,ESTABLISHED -j ACCEPT"
            ),
            format!(
                "{ipt} -t mangle -A RINGTUN_PREROUTING ! -d 127.0.0.1/32 -p tcp -m mark ! --mark \
                 0x539/0xfff -j TPROXY --on-port 15006 --on-ip 0.0.0.0 --tproxy-mark 0x111/0xfff"
            ),
            format!("{ipt} -t nat -A RINGTUN_OUTPUT -p tcp -m mark --mark 0x539/0xfff -j RETURN"),
            format!("{ipt} -t nat -A RINGTUN_OUTPUT -d 127.0.0.0/8 -j RETURN"),
            format!("{ipt} -t nat -A RINGTUN_OUTPUT -o lo -j RETURN"),
            format!("{ipt} -t nat -A RINGTUN_OUTPUT -p tcp -j REDIRECT --to-ports 15001"),
        ] {
            assert!(
                lines(&text).contains(&expected.as_str()),
                "missing `{expected}` in:\n{text}"
            );
        }
        assert!(has_line_ending(
            &text,
            "|| iptables-nft -w 10 -t mangle -A PREROUTING -j RINGTUN_PREROUTING"
        ));
        assert!(has_line_ending(
            &text,
            "|| iptables-nft -w 10 -t nat -A OUTPUT -j RINGTUN_OUTPUT"
        ));
        assert!(has_line_ending(
            &text,
            "|| ip rule add fwmark 0x111/0xfff lookup 133 pref 32764"
        ));
        assert!(has_line_ending(
            &text,
            "|| ip route add local 0.0.0.0/0 dev lo table 133"
        ));
        // IPv6 twins.
        assert!(has_line_ending(
            &text,
            "|| ip -6 rule add fwmark 0x111/0xfff lookup 133 pref 32764"
        ));
        assert!(has_line_ending(
            &text,
            "|| ip -6 route add local ::/0 dev lo table 133"
        ));
        assert!(text.contains(
            "ip6tables-nft -w 10 -t mangle -A RINGTUN_PREROUTING -p tcp --dport 15008 -m mark ! \
             --mark 0x539/0xfff -j TPROXY --on-port 15008 --on-ip :: --tproxy-mark 0x111/0xfff"
        ));
        assert!(text.contains("ip6tables-nft -w 10 -t nat -A RINGTUN_OUTPUT -d ::1/128 -j RETURN"));
        assert!(
            text.contains("ip6tables-nft -w 10 -t mangle -A RINGTUN_PREROUTING -i lo ! -d ::1/128")
        );
    }

    #[test]
    fn chains_are_filled_before_they_are_jumped_to() {
        let text = plan(&RedirectSettings::default()).render();
        let pos = |needle: &str| text.find(needle).unwrap_or(usize::MAX);
        assert!(pos("-t nat -F RINGTUN_OUTPUT") < pos("REDIRECT --to-ports"));
        assert!(pos("REDIRECT --to-ports") < pos("-A OUTPUT -j RINGTUN_OUTPUT"));
        assert!(pos("ip route add") < pos("TPROXY"));
    }

    #[test]
    fn custom_ports_and_marks_appear_in_rules() {
        let settings = RedirectSettings {
            outbound_port: 25001,
            inbound_plaintext_port: 25006,
            inbound_hbone_port: 25008,
            socket_mark: 0x77,
            tproxy_mark: 0x22,
            mark_mask: 0xff,
            route_table: 200,
            ..RedirectSettings::default()
        };
        let text = plan(&settings).render();
        for expected in [
            "--to-ports 25001",
            "--on-port 25006",
            "--dport 25008 -m mark ! --mark 0x77/0xff -j TPROXY --on-port 25008",
            "--tproxy-mark 0x22/0xff",
            "-m mark --mark 0x77/0xff -j RETURN",
            "ip rule add fwmark 0x22/0xff lookup 200 pref 32764",
            "ip route add local 0.0.0.0/0 dev lo table 200",
        ] {
            assert!(text.contains(expected), "missing `{expected}` in:\n{text}");
        }
        for stale in [
            "15001",
            "15006",
            "15008",
            "0x539",
            "0x111",
            "0xfff",
            "table 133",
        ] {
            assert!(
                !text.contains(stale),
                "default `{stale}` leaked into:\n{text}"
            );
        }
    }

    #[test]
    fn ipv6_off_yields_no_ip6tables_or_ip6_step() {
        let settings = RedirectSettings {
            ipv6: false,
            ..RedirectSettings::default()
        };
        let p = plan(&settings);
        for text in [p.render(), p.render_remove_in(None)] {
            assert!(!text.contains("ip6tables"), "{text}");
            assert!(!text.contains("ip -6"), "{text}");
            assert!(!text.contains("::"), "{text}");
            assert!(text.contains("iptables-nft"), "{text}");
        }
    }

    #[test]
    fn legacy_backend_uses_legacy_programs_and_guards_table_probes() {
        let settings = RedirectSettings {
            backend: IptablesBackend::Legacy,
            ..RedirectSettings::default()
        };
        let text = plan(&settings).render_remove_in(None);
        assert!(!text.contains("-nft"), "{text}");
        assert!(text.contains(
            "if grep -qx nat /proc/net/ip_tables_names >/dev/null 2>&1 && iptables-legacy -w 10 \
             -t nat -C OUTPUT -j RINGTUN_OUTPUT >/dev/null 2>&1; then iptables-legacy -w 10 -t nat \
             -D OUTPUT -j RINGTUN_OUTPUT; fi"
        ));
        assert!(text.contains("grep -qx mangle /proc/net/ip6_tables_names"));
    }

    /// What a step creates or deletes, with the verb taken out, so the two lists can be matched.
    fn object_key(step: &Step) -> Option<(String, &'static str)> {
        let argv = &step.command().argv;
        let joined = argv.join(" ");
        let verb = |create: &'static str, delete: &'static str| {
            argv.iter().find_map(|a| {
                if a == create {
                    Some("create")
                } else if a == delete {
                    Some("delete")
                } else {
                    None
                }
            })
        };
        let kind = if argv.first().map(String::as_str) == Some("ip") {
            verb("add", "del")?
        } else if argv.iter().any(|a| a == "-N" || a == "-X") {
            verb("-N", "-X")?
        } else if argv.iter().any(|a| a == "-j")
            && argv.iter().any(|a| a == "PREROUTING" || a == "OUTPUT")
        {
            verb("-A", "-D")?
        } else {
            return None;
        };
        let key = joined
            .replace(" add ", " _ ")
            .replace(" del ", " _ ")
            .replace(" -N ", " _ ")
            .replace(" -X ", " _ ")
            .replace(" -A ", " _ ")
            .replace(" -D ", " _ ");
        Some((key, kind))
    }

    #[test]
    fn remove_steps_mirror_install_steps() {
        for ipv6 in [true, false] {
            for backend in [IptablesBackend::Nft, IptablesBackend::Legacy] {
                let p = plan(&RedirectSettings {
                    ipv6,
                    backend,
                    ..RedirectSettings::default()
                });
                let created: Vec<String> = p
                    .install_steps()
                    .iter()
                    .filter_map(object_key)
                    .filter(|(_, kind)| *kind == "create")
                    .map(|(k, _)| k)
                    .collect();
                let mut deleted: Vec<String> = p
                    .remove_steps()
                    .iter()
                    .filter_map(object_key)
                    .filter(|(_, kind)| *kind == "delete")
                    .map(|(k, _)| k)
                    .collect();
                deleted.reverse();
                assert_eq!(created, deleted);
                // 3 chains + 3 jumps + rule + route per family.
                assert_eq!(created.len(), if ipv6 { 16 } else { 8 });
                // Every chain is flushed before it is deleted, and only guarded deletes are used,
                // so remove succeeds when nothing is installed.
                assert!(p
                    .remove_steps()
                    .iter()
                    .all(|s| matches!(s, Step::If { .. })));
                let text = p.render_remove_in(None);
                assert!(text.find("-F RINGTUN_OUTPUT") < text.find("-X RINGTUN_OUTPUT"));
            }
        }
    }

    #[test]
    fn install_never_adds_a_jump_rule_or_route_unguarded() {
        // Idempotence: everything that would duplicate on a second run is behind a check;
        // only chain flushes and appends into ringtun's own (just flushed) chains run always.
        for step in plan(&RedirectSettings::default()).install_steps() {
            if let Step::Run(cmd) = &step {
                let j = cmd.argv.join(" ");
                assert!(
                    j.contains("-F RINGTUN_") || j.contains("-A RINGTUN_"),
                    "unguarded step: {j}"
                );
            }
        }
    }

    #[test]
    fn netns_commands_run_through_nsenter() {
        let ns = Path::new("/var/run/netns/pod a");
        let text = plan(&RedirectSettings::default()).render_in(Some(ns));
        let prefix = "nsenter '--net=/var/run/netns/pod a' ";
        for line in text.lines() {
            // One command per `||`, `&&` or `then`, plus the first: each must enter the netns.
            let commands = 1
                + line.matches(" || ").count()
                + line.matches(" && ").count()
                + line.matches("; then ").count();
            assert_eq!(line.matches(prefix).count(), commands, "{line}");
        }
        assert!(text.contains("|| nsenter '--net=/var/run/netns/pod a' iptables-nft"));
    }

    #[test]
    fn default_settings_are_valid_and_bad_ones_are_all_reported() {
        assert_eq!(RedirectSettings::default().validate(), Ok(()));
        let bad = RedirectSettings {
            outbound_port: 0,
            inbound_plaintext_port: 15008,
            socket_mark: 0x1000,
            tproxy_mark: 0x539,
            route_table: 254,
            ..RedirectSettings::default()
        };
        let errors = bad.validate().err().unwrap_or_default();
        let all = errors.join("\n");
        assert!(all.contains("outbound port must not be 0"), "{all}");
        assert!(all.contains("are both 15008"), "{all}");
        assert!(
            all.contains("socket mark 0x1000 has no bit inside"),
            "{all}"
        );
        assert!(all.contains("route table 254 is reserved"), "{all}");
        let same = RedirectSettings {
            tproxy_mark: 0x539,
            ..RedirectSettings::default()
        };
        assert!(same.validate().is_err());
    }

    #[test]
    fn shell_quoting_leaves_rules_readable_and_quotes_the_rest() {
        assert_eq!(shell_quote("!"), "!");
        assert_eq!(shell_quote("0x539/0xfff"), "0x539/0xfff");
        assert_eq!(shell_quote("RELATED,ESTABLISHED"), "RELATED,ESTABLISHED");
        assert_eq!(shell_quote("a b"), "'a b'");
        assert_eq!(shell_quote("it's"), "'it'\\''s'");
        assert_eq!(shell_quote(""), "''");
        assert_eq!(shell_quote("$(x)"), "'$(x)'");
    }
}
