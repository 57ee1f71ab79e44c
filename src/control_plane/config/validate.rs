//! Raw YAML tree → validated [`Config`], collecting every problem in the file instead of stopping
//! at the first, each with its line, column and YAML path, sorted in file order.
//!
//! The walk reads every field it can even after others failed, so an operator fixes a file in one
//! round trip. Cross-checks (unique IPs and names, endpoints naming workloads, one host-mode
//! workload per node) only compare values that were themselves valid, so one typo yields one
//! error, not a cascade. A [`Config`] is returned only when the error list is empty.

use crate::control_plane::identity::is_dns_label;
use std::collections::{BTreeMap, HashMap, HashSet};
use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::time::Duration;

use super::checker::{
    boolean, dns_label, dns_name, fields, ip, item, label_map, list, non_empty_list, port, string,
    usize_in, Checker, LabelMapUse,
};
use super::parse::{self, Node, Pos, Value, DOCUMENT_PATH};
use super::policies::check_policies;
use super::{
    format_duration, Checked, CipherChoice, ClientAddressChoice, Config, ConfigErrors,
    DriverChoice, HboneSettings, KtlsChoice, Limits, NodeCaSettings, NodeConfig, Ports, Protocol,
    Service, ServicePort, SpliceSettings, Timeouts, TlsSettings, Workload, WorkloadRef,
};

/// Where a bare `netns` name is looked up, as `ip netns add` creates them.
const NETNS_DIR: &str = "/var/run/netns";

const ROOT_KEYS: &[&str] = &["version", "node", "workloads", "services", "policies"];
const NODE_KEYS: &[&str] = &[
    "name",
    "trust_domain",
    "root_namespace",
    "reactors",
    "pin_reactors",
    "driver",
    "socket_mark",
    "deliver_client_address",
    "ports",
    "admin",
    "metrics",
    "readiness",
    "timeouts",
    "limits",
    "splice",
    "tls",
    "hbone",
];
const PORTS_KEYS: &[&str] = &["outbound", "inbound_plaintext", "inbound_hbone"];
const TIMEOUT_KEYS: &[&str] = &["connect", "handshake", "idle", "drain"];
const LIMITS_KEYS: &[&str] = &[
    "max_flows_per_reactor",
    "max_handshakes_per_reactor",
    "max_handshakes_per_source",
    "max_tunnels_per_peer",
    "flow_receive_buffer",
];
const SPLICE_KEYS: &[&str] = &[
    "pipe_size",
    "max_bytes_per_wakeup",
    "pipe_pool_size",
    "pipes_per_reactor",
];
const TLS_KEYS: &[&str] = &["trust_bundle", "certificate_dir", "node_ca"];
const NODE_CA_KEYS: &[&str] = &["certificate", "key", "certificate_lifetime"];
/// Node CA mode's default certificate lifetime.
pub const DEFAULT_NODE_CA_LIFETIME: Duration = Duration::from_secs(3600);
/// The shortest certificate lifetime node CA mode accepts: renewal at half-life needs time to
/// issue and publish.
const MIN_NODE_CA_LIFETIME: Duration = Duration::from_secs(2);
const HBONE_KEYS: &[&str] = &[
    "max_streams_per_tunnel",
    "pool_idle_timeout",
    "ktls",
    "ktls_record_budget",
    "cipher",
    "zero_copy",
    "keepalive_interval",
    "keepalive_timeout",
];
const WORKLOAD_KEYS: &[&str] = &[
    "name",
    "namespace",
    "service_account",
    "ips",
    "node",
    "protocol",
    "netns",
    "healthy",
    "labels",
];
const SERVICE_KEYS: &[&str] = &["name", "namespace", "vips", "ports", "endpoints"];
const SERVICE_PORT_KEYS: &[&str] = &["port", "target_port"];

/// Defaults, shared with the commented default config (its test checks they agree).
pub(super) const DEFAULT_TRUST_DOMAIN: &str = "cluster.local";
/// Istio's default root namespace: its policies without selector apply to the whole mesh.
pub(super) const DEFAULT_ROOT_NAMESPACE: &str = "istio-system";
pub(super) const DEFAULT_SOCKET_MARK: u32 = 0x539;
pub(super) const DEFAULT_PORTS: Ports = Ports {
    outbound: 15001,
    inbound_plaintext: 15006,
    inbound_hbone: 15008,
};
pub(super) const DEFAULT_ADMIN: &str = "127.0.0.1:15000";
pub(super) const DEFAULT_METRICS: &str = "0.0.0.0:15020";
pub(super) const DEFAULT_READINESS: &str = "0.0.0.0:15021";
pub(super) const DEFAULT_TIMEOUTS: Timeouts = Timeouts {
    connect: Duration::from_secs(5),
    handshake: Duration::from_secs(2),
    idle: Duration::from_secs(3600),
    drain: Duration::from_secs(30),
};
pub(super) const DEFAULT_LIMITS: Limits = Limits {
    max_flows_per_reactor: 16384,
    max_handshakes_per_reactor: 256,
    max_handshakes_per_source: 16,
    max_tunnels_per_peer: 256,
    flow_receive_buffer: 128 * 1024,
};
/// Bounds of `limits.flow_receive_buffer` (besides 0).
const MIN_FLOW_RECEIVE_BUFFER: usize = 4096;
const MAX_FLOW_RECEIVE_BUFFER: usize = 64 * 1024 * 1024;
pub(super) const DEFAULT_SPLICE: SpliceSettings = SpliceSettings {
    pipe_size: 256 * 1024,
    max_bytes_per_wakeup: 1024 * 1024,
    pipe_pool_size: 64,
    pipes_per_reactor: 256,
};
pub const DEFAULT_HBONE: HboneSettings = HboneSettings {
    max_streams_per_tunnel: 100,
    pool_idle_timeout: Duration::from_secs(300),
    ktls: KtlsChoice::Auto,
    // Half the AES-GCM limit of 2^24 records (crate::tls::ktls::TX_RECORD_BUDGET).
    ktls_record_budget: 1 << 23,
    cipher: CipherChoice::Any,
    zero_copy: true,
    // ztunnel's: a PING every 10 s, the tunnel closed when one goes 20 s unanswered.
    keepalive_interval: Some(Duration::from_secs(10)),
    keepalive_timeout: Duration::from_secs(20),
};
const DEFAULT_SERVICE_ACCOUNT: &str = "default";

/// Parses and validates a node configuration file.
///
/// # Errors
/// Every problem in the file, in file order (never an empty list).
pub fn load(text: &str) -> Result<Config, ConfigErrors> {
    check(text).map(|checked| checked.config)
}

/// [`load`], keeping the warnings: what is valid but will not do what it seems to say (an
/// authorization rule naming HTTP attributes a node proxy cannot see), in file order.
///
/// # Errors
/// Every problem in the file, in file order (never an empty list).
pub fn check(text: &str) -> Result<Checked, ConfigErrors> {
    let root = parse::parse(text).map_err(|e| ConfigErrors(vec![e]))?;
    let mut c = Checker::default();
    let config = check_document(&mut c, &root);
    match config {
        Some(config) if c.errors.is_empty() => {
            c.warnings.sort_by_key(|w| (w.line, w.column));
            Ok(Checked {
                config,
                warnings: c.warnings,
            })
        }
        _ => {
            if c.errors.is_empty() {
                // Every path that yields no config records why; this only guards that promise.
                c.error(
                    Pos::default(),
                    DOCUMENT_PATH,
                    "internal error: configuration rejected without a reason",
                );
            }
            // Stable sort: problems found at the same place keep the order they were found in.
            c.errors.sort_by_key(|e| (e.line, e.column));
            Err(ConfigErrors(c.errors))
        }
    }
}

/// A node name as the cluster spells it; compared verbatim with each workload's `node`.
fn node_name(c: &mut Checker, node: &Node, path: &str) -> Option<String> {
    let s = string(c, node, path)?;
    if s.is_empty() || s.len() > 253 || s.chars().any(|ch| ch.is_whitespace() || ch.is_control()) {
        c.error(
            node.pos,
            path,
            format!("`{s}` is not a node name: 1 to 253 characters without spaces"),
        );
        return None;
    }
    Some(s.to_string())
}

/// `<int>ms|s|m|h`, greater than zero.
fn duration(c: &mut Checker, node: &Node, path: &str) -> Option<Duration> {
    let s = match &node.value {
        Value::Str(s) => s.as_str(),
        Value::Int(i) => {
            c.error(
                node.pos,
                path,
                format!("a duration needs a unit: ms, s, m or h (e.g. `{i}s`)"),
            );
            return None;
        }
        _ => {
            c.wrong_type(node, path, "a duration such as 5s, 250ms, 10m or 1h");
            return None;
        }
    };
    match parse_duration(s) {
        Ok(d) => Some(d),
        Err(why) => {
            c.error(node.pos, path, format!("`{s}` {why}"));
            None
        }
    }
}

/// `<int>ms|s|m|h` greater than zero, or why not (also used by CLI flags).
pub(crate) fn parse_duration(s: &str) -> Result<Duration, &'static str> {
    const SHAPE: &str = "is not a duration: write <integer><unit>, unit ms, s, m or h (e.g. 5s)";
    let digits_end = s.find(|ch: char| !ch.is_ascii_digit()).unwrap_or(s.len());
    let (digits, unit) = s.split_at(digits_end);
    if digits.is_empty() {
        return Err(SHAPE);
    }
    let n: u64 = digits.parse().map_err(|_| "is too large a duration")?;
    let ms_per_unit: u64 = match unit {
        "ms" => 1,
        "s" => 1000,
        "m" => 60_000,
        "h" => 3_600_000,
        _ => return Err(SHAPE),
    };
    let ms = n
        .checked_mul(ms_per_unit)
        .ok_or("is too large a duration")?;
    if ms == 0 {
        return Err("must be greater than zero");
    }
    Ok(Duration::from_millis(ms))
}

/// A listen address, or `off` for "do not serve this endpoint".
fn listen_addr(c: &mut Checker, node: &Node, path: &str) -> Option<Option<SocketAddr>> {
    let Value::Str(s) = &node.value else {
        c.wrong_type(node, path, "an address such as 127.0.0.1:15000, or `off`");
        return None;
    };
    if s == "off" {
        return Some(None);
    }
    match s.parse::<SocketAddr>() {
        Ok(a) => Some(Some(a)),
        Err(_) => {
            c.error(
                node.pos,
                path,
                format!("`{s}` is not an address: write ip:port (e.g. 127.0.0.1:15000, [::1]:15000) or `off`"),
            );
            None
        }
    }
}

fn socket_mark(c: &mut Checker, node: &Node, path: &str) -> Option<u32> {
    let value: Option<u64> = match &node.value {
        Value::Int(i) => u64::try_from(*i).ok(),
        Value::Str(s) => {
            let t = s.trim();
            match t.strip_prefix("0x").or_else(|| t.strip_prefix("0X")) {
                Some(hex) => u64::from_str_radix(hex, 16).ok(),
                None => t.parse::<u64>().ok(),
            }
        }
        _ => {
            c.wrong_type(node, path, "an integer such as 0x539");
            return None;
        }
    };
    match value.map(u32::try_from) {
        Some(Ok(0)) => {
            c.error(
                node.pos,
                path,
                "socket mark must be nonzero (0 would not keep ringtun's own traffic out of capture)",
            );
            None
        }
        Some(Ok(mark)) => Some(mark),
        _ => {
            c.error(
                node.pos,
                path,
                format!(
                    "{} is not a socket mark: an integer 1..=0xffffffff",
                    node.value.describe()
                ),
            );
            None
        }
    }
}

// ---- sections ----

fn check_document(c: &mut Checker, root: &Node) -> Option<Config> {
    let Value::Map(_) = root.value else {
        c.error(
            root.pos,
            DOCUMENT_PATH,
            format!(
                "expected a mapping with `version: 1` and `node:`, found {}",
                root.value.describe()
            ),
        );
        return None;
    };
    let f = fields(c, root, "", ROOT_KEYS)?;

    let version_ok = match f.require(c, "version") {
        Some(v) => match v.value {
            Value::Int(1) => true,
            Value::Int(other) => {
                c.error(
                    v.pos,
                    "version",
                    format!("unsupported config version {other}; this ringtun reads version 1"),
                );
                false
            }
            _ => {
                c.wrong_type(v, "version", "the integer 1");
                false
            }
        },
        None => false,
    };

    let (node_name, node) = match f.require(c, "node") {
        Some(n) => check_node(c, n),
        None => (None, None),
    };

    let workloads = match f.get("workloads") {
        None => Some(Vec::new()),
        Some(n) => list(c, n, "workloads")
            .map(|items| check_workloads(c, items, "workloads", node_name.as_deref())),
    };
    let services = match f.get("services") {
        None => Some(Vec::new()),
        Some(n) => list(c, n, "services").map(|items| {
            let drafts = workloads.as_deref().unwrap_or(&[]);
            check_services(c, items, "services", drafts)
        }),
    };
    let policies = match f.get("policies") {
        None => Some(Vec::new()),
        Some(n) => list(c, n, "policies").and_then(|items| check_policies(c, items, "policies")),
    };

    if !version_ok {
        return None;
    }
    let workloads = workloads?
        .into_iter()
        .map(|d| d.workload)
        .collect::<Option<Vec<_>>>()?;
    let services = services?;
    Some(Config {
        node: node?,
        workloads,
        services,
        policies: policies?,
    })
}

/// The node's name (when valid, even if other node keys are not: the workload checks need it)
/// and the complete node section.
fn check_node(c: &mut Checker, n: &Node) -> (Option<String>, Option<NodeConfig>) {
    let Some(f) = fields(c, n, "node", NODE_KEYS) else {
        return (None, None);
    };
    let name = f
        .require(c, "name")
        .and_then(|v| node_name(c, v, &f.path("name")));
    let trust_domain = f.or_default(
        c,
        "trust_domain",
        DEFAULT_TRUST_DOMAIN.to_string(),
        dns_name,
    );
    let root_namespace = f.or_default(
        c,
        "root_namespace",
        DEFAULT_ROOT_NAMESPACE.to_string(),
        dns_label,
    );
    let reactors = f.or_default(c, "reactors", None, |c, v, path| match v.value {
        Value::Str(ref s) if s == "auto" => Some(None),
        Value::Int(_) => usize_in(c, v, path, 1, 256).map(Some),
        _ => {
            c.wrong_type(v, path, "`auto` or an integer 1..=256");
            None
        }
    });
    let pin_reactors = f.or_default(c, "pin_reactors", true, boolean);
    let driver = f.or_default(c, "driver", DriverChoice::Auto, |c, v, path| match string(
        c, v, path,
    )? {
        "auto" => Some(DriverChoice::Auto),
        "io_uring" => Some(DriverChoice::IoUring),
        "epoll" => Some(DriverChoice::Epoll),
        other => {
            c.error(
                v.pos,
                path,
                format!("unknown driver `{other}`; accepted: auto, io_uring, epoll"),
            );
            None
        }
    });
    let mark = f.or_default(c, "socket_mark", DEFAULT_SOCKET_MARK, socket_mark);
    let client_address = f.or_default(
        c,
        "deliver_client_address",
        ClientAddressChoice::Auto,
        client_address_choice,
    );
    let ports = f.or_default(c, "ports", DEFAULT_PORTS, check_ports);
    let admin = f.or_default(c, "admin", DEFAULT_ADMIN.parse().ok(), listen_addr);
    let metrics = f.or_default(c, "metrics", DEFAULT_METRICS.parse().ok(), listen_addr);
    let readiness = f.or_default(c, "readiness", DEFAULT_READINESS.parse().ok(), listen_addr);
    let timeouts = f.or_default(c, "timeouts", DEFAULT_TIMEOUTS, |c, v, path| {
        let t = fields(c, v, path, TIMEOUT_KEYS)?;
        let connect = t.or_default(c, "connect", DEFAULT_TIMEOUTS.connect, duration);
        let handshake = t
            .get("handshake")
            .map(|v| (v, duration(c, v, &t.path("handshake"))));
        let idle = t.or_default(c, "idle", DEFAULT_TIMEOUTS.idle, duration);
        let drain = t.or_default(c, "drain", DEFAULT_TIMEOUTS.drain, duration);
        let connect = connect?;
        let handshake = match handshake {
            // Unset: 2 s, or the connect timeout when that is shorter.
            None => DEFAULT_TIMEOUTS.handshake.min(connect),
            Some((node, h)) => {
                let h = h?;
                if h > connect {
                    c.error(
                        node.pos,
                        &t.path("handshake"),
                        format!(
                            "must not be longer than timeouts.connect ({}): an unauthenticated \
                             connection may not outwait an upstream connect",
                            format_duration(connect)
                        ),
                    );
                    return None;
                }
                h
            }
        };
        Some(Timeouts {
            connect,
            handshake,
            idle: idle?,
            drain: drain?,
        })
    });
    let limits = f.or_default(c, "limits", DEFAULT_LIMITS, |c, v, path| {
        let l = fields(c, v, path, LIMITS_KEYS)?;
        let count = |c: &mut Checker, key: &str, default: usize| {
            l.or_default(c, key, default, |c, v, p| usize_in(c, v, p, 1, 1_000_000))
        };
        let max = count(
            c,
            "max_flows_per_reactor",
            DEFAULT_LIMITS.max_flows_per_reactor,
        );
        let handshakes = count(
            c,
            "max_handshakes_per_reactor",
            DEFAULT_LIMITS.max_handshakes_per_reactor,
        );
        let per_source = count(
            c,
            "max_handshakes_per_source",
            DEFAULT_LIMITS.max_handshakes_per_source,
        );
        let per_peer = count(
            c,
            "max_tunnels_per_peer",
            DEFAULT_LIMITS.max_tunnels_per_peer,
        );
        let receive_buffer = l.or_default(
            c,
            "flow_receive_buffer",
            DEFAULT_LIMITS.flow_receive_buffer,
            |c, v, p| {
                let n = usize_in(c, v, p, 0, MAX_FLOW_RECEIVE_BUFFER)?;
                if (1..MIN_FLOW_RECEIVE_BUFFER).contains(&n) {
                    c.error(
                        v.pos,
                        p,
                        format!(
                            "{n} bytes is too small to carry a flow: 0 (the kernel's \
                             autotuning) or {MIN_FLOW_RECEIVE_BUFFER}..={MAX_FLOW_RECEIVE_BUFFER}"
                        ),
                    );
                    return None;
                }
                Some(n)
            },
        );
        Some(Limits {
            max_flows_per_reactor: max?,
            max_handshakes_per_reactor: handshakes?,
            max_handshakes_per_source: per_source?,
            max_tunnels_per_peer: per_peer?,
            flow_receive_buffer: receive_buffer?,
        })
    });
    let splice = f.or_default(c, "splice", DEFAULT_SPLICE, |c, v, path| {
        let s = fields(c, v, path, SPLICE_KEYS)?;
        let pipe_size = s.or_default(c, "pipe_size", DEFAULT_SPLICE.pipe_size, |c, v, p| {
            usize_in(c, v, p, 4096, 16 * 1024 * 1024)
        });
        let per_wakeup = s.or_default(
            c,
            "max_bytes_per_wakeup",
            DEFAULT_SPLICE.max_bytes_per_wakeup,
            |c, v, p| usize_in(c, v, p, 4096, usize::MAX),
        );
        let pool = s.or_default(
            c,
            "pipe_pool_size",
            DEFAULT_SPLICE.pipe_pool_size,
            |c, v, p| usize_in(c, v, p, 0, 65536),
        );
        let pipes = s.or_default(
            c,
            "pipes_per_reactor",
            DEFAULT_SPLICE.pipes_per_reactor,
            |c, v, p| usize_in(c, v, p, 0, 65536),
        );
        Some(SpliceSettings {
            pipe_size: pipe_size?,
            max_bytes_per_wakeup: per_wakeup?,
            pipe_pool_size: pool?,
            pipes_per_reactor: pipes?,
        })
    });
    let tls = f.or_default(c, "tls", None, |c, v, path| {
        let t = fields(c, v, path, TLS_KEYS)?;
        let trust_bundle = t
            .require(c, "trust_bundle")
            .and_then(|v| file_path(c, v, &t.path("trust_bundle")));
        // Certificates come from files or from the node CA: exactly one.
        let (certificate_dir, node_ca) = match (t.get("certificate_dir"), t.get("node_ca")) {
            (Some(_), Some(ca)) => {
                c.error(
                    ca.pos,
                    &t.path("node_ca"),
                    "set either `certificate_dir` (certificates from files) or `node_ca` \
                     (issued by this node), not both",
                );
                (None, None)
            }
            (None, Some(ca)) => (Some(None), node_ca(c, ca, &t.path("node_ca")).map(Some)),
            _ => (
                t.require(c, "certificate_dir")
                    .and_then(|v| file_path(c, v, &t.path("certificate_dir")))
                    .map(Some),
                Some(None),
            ),
        };
        Some(Some(TlsSettings {
            trust_bundle: trust_bundle?,
            certificate_dir: certificate_dir?,
            node_ca: node_ca?,
        }))
    });
    let hbone = f.or_default(c, "hbone", DEFAULT_HBONE, |c, v, path| {
        let h = fields(c, v, path, HBONE_KEYS)?;
        let streams = h.or_default(
            c,
            "max_streams_per_tunnel",
            DEFAULT_HBONE.max_streams_per_tunnel,
            |c, v, p| usize_in(c, v, p, 1, 10_000).map(|n| n as u32),
        );
        let idle = h.or_default(
            c,
            "pool_idle_timeout",
            DEFAULT_HBONE.pool_idle_timeout,
            duration,
        );
        let ktls = h.or_default(c, "ktls", DEFAULT_HBONE.ktls, |c, v, path| {
            match string(c, v, path)? {
                "auto" => Some(KtlsChoice::Auto),
                "off" => Some(KtlsChoice::Off),
                other => {
                    c.error(
                        v.pos,
                        path,
                        format!("unknown kTLS choice `{other}`; accepted: auto, off"),
                    );
                    None
                }
            }
        });
        let budget = h.or_default(
            c,
            "ktls_record_budget",
            DEFAULT_HBONE.ktls_record_budget,
            |c, v, p| usize_in(c, v, p, 1, 1 << 24).map(|n| n as u64),
        );
        let cipher = h.or_default(
            c,
            "cipher",
            DEFAULT_HBONE.cipher,
            |c, v, path| match string(c, v, path)? {
                "any" => Some(CipherChoice::Any),
                "aes_128_gcm" => Some(CipherChoice::Aes128Gcm),
                "aes_256_gcm" => Some(CipherChoice::Aes256Gcm),
                other => {
                    c.error(
                        v.pos,
                        path,
                        format!(
                            "unknown cipher `{other}`; accepted: any, aes_128_gcm, aes_256_gcm"
                        ),
                    );
                    None
                }
            },
        );
        let zero_copy = h.or_default(c, "zero_copy", DEFAULT_HBONE.zero_copy, boolean);
        let keepalive_interval = h.or_default(
            c,
            "keepalive_interval",
            DEFAULT_HBONE.keepalive_interval,
            |c, v, p| match &v.value {
                Value::Str(s) if s == "off" => Some(None),
                _ => duration(c, v, p).map(Some),
            },
        );
        let keepalive_timeout = h.or_default(
            c,
            "keepalive_timeout",
            DEFAULT_HBONE.keepalive_timeout,
            duration,
        );
        Some(HboneSettings {
            keepalive_interval: keepalive_interval?,
            keepalive_timeout: keepalive_timeout?,
            zero_copy: zero_copy?,
            cipher: cipher?,
            max_streams_per_tunnel: streams?,
            pool_idle_timeout: idle?,
            ktls: ktls?,
            ktls_record_budget: budget?,
        })
    });
    let config = (|| {
        Some(NodeConfig {
            name: name.clone()?,
            trust_domain: trust_domain?,
            root_namespace: root_namespace?,
            reactors: reactors?,
            pin_reactors: pin_reactors?,
            driver: driver?,
            socket_mark: mark?,
            deliver_client_address: client_address?,
            ports: ports?,
            admin_addr: admin?,
            metrics_addr: metrics?,
            readiness_addr: readiness?,
            timeouts: timeouts?,
            limits: limits?,
            splice: splice?,
            tls: tls?,
            hbone: hbone?,
        })
    })();
    (name, config)
}

fn check_ports(c: &mut Checker, n: &Node, path: &str) -> Option<Ports> {
    let f = fields(c, n, path, PORTS_KEYS)?;
    let defaults = DEFAULT_PORTS.all();
    // (key, value, where it was written — None when defaulted)
    let mut read: Vec<(&str, Option<u16>, Option<Pos>)> = Vec::with_capacity(3);
    for (key, default) in PORTS_KEYS.iter().zip(defaults) {
        let at = f.get(key).map(|v| v.pos);
        read.push((key, f.or_default(c, key, default, port), at));
    }
    let mut clash = false;
    for j in 1..read.len() {
        for i in 0..j {
            let (key_i, Some(port_i), at_i) = read[i] else {
                continue;
            };
            let (key_j, Some(port_j), at_j) = read[j] else {
                continue;
            };
            if port_i != port_j {
                continue;
            }
            clash = true;
            // Point at a port the operator actually wrote; the later one if both were.
            let (key, other, at) = match (at_j, at_i) {
                (Some(at), _) => (key_j, key_i, at),
                (None, Some(at)) => (key_i, key_j, at),
                (None, None) => (key_j, key_i, f.pos),
            };
            let suffix = if at_i.is_some() && at_j.is_some() {
                ""
            } else {
                " (its default)"
            };
            c.error(
                at,
                &f.path(key),
                format!(
                    "port {port_j} is also {}{suffix}; each port must be distinct",
                    f.path(other)
                ),
            );
        }
    }
    let value = |i: usize| read.get(i).and_then(|r| r.1);
    let [outbound, inbound_plaintext, inbound_hbone] = [value(0), value(1), value(2)];
    if clash {
        return None;
    }
    Some(Ports {
        outbound: outbound?,
        inbound_plaintext: inbound_plaintext?,
        inbound_hbone: inbound_hbone?,
    })
}

/// What the cross-checks need from one workload entry, whether or not all of it was valid.
struct WorkloadDraft {
    /// (namespace, name) when both were valid.
    id: Option<WorkloadRef>,
    /// Valid addresses with their place.
    ips: Vec<(IpAddr, Pos, String)>,
    /// The complete workload; `None` when any field was invalid.
    workload: Option<Workload>,
}

fn check_workloads(
    c: &mut Checker,
    items: &[Node],
    path: &str,
    local_node: Option<&str>,
) -> Vec<WorkloadDraft> {
    let mut drafts = Vec::with_capacity(items.len());
    let mut ids: HashMap<WorkloadRef, String> = HashMap::new();
    let mut ips: HashMap<IpAddr, String> = HashMap::new();
    // The first local workload without a netns, and netns paths already used on this node.
    let mut host_mode: Option<String> = None;
    let mut netns_seen: HashMap<PathBuf, String> = HashMap::new();

    for (i, n) in items.iter().enumerate() {
        let wpath = item(path, i);
        let Some(f) = fields(c, n, &wpath, WORKLOAD_KEYS) else {
            drafts.push(WorkloadDraft {
                id: None,
                ips: Vec::new(),
                workload: None,
            });
            continue;
        };
        let name_node = f.require(c, "name");
        let name = name_node.and_then(|v| dns_label(c, v, &f.path("name")));
        let namespace = f
            .require(c, "namespace")
            .and_then(|v| dns_label(c, v, &f.path("namespace")));
        let service_account = f.or_default(
            c,
            "service_account",
            DEFAULT_SERVICE_ACCOUNT.to_string(),
            dns_name,
        );
        let mut ips_ok = false;
        let mut valid_ips = Vec::new();
        if let Some(list_node) = f.require(c, "ips") {
            let ips_path = f.path("ips");
            if let Some(list) = non_empty_list(c, list_node, &ips_path) {
                ips_ok = true;
                for (k, ip_node) in list.iter().enumerate() {
                    let ip_path = item(&ips_path, k);
                    match ip(c, ip_node, &ip_path) {
                        Some(addr) => valid_ips.push((addr, ip_node.pos, ip_path)),
                        None => ips_ok = false,
                    }
                }
            }
        }
        let node = f
            .require(c, "node")
            .and_then(|v| node_name(c, v, &f.path("node")));
        let protocol = f.or_default(c, "protocol", Protocol::Hbone, |c, v, p| {
            let s = string(c, v, p)?;
            if s.eq_ignore_ascii_case("HBONE") {
                Some(Protocol::Hbone)
            } else if s.eq_ignore_ascii_case("TCP") {
                Some(Protocol::Tcp)
            } else {
                c.error(
                    v.pos,
                    p,
                    format!("unknown protocol `{s}`; accepted: HBONE, TCP"),
                );
                None
            }
        });
        let netns_node = f.get("netns");
        let netns = f.or_default(c, "netns", None, |c, v, p| netns_path(c, v, p).map(Some));
        let healthy = f.or_default(c, "healthy", true, boolean);
        let labels = f.or_default(c, "labels", BTreeMap::new(), |c, v, p| {
            label_map(c, v, p, LabelMapUse::Workload)
        });

        // Cross-checks against earlier workloads, on valid values only.
        let id = match (&namespace, &name) {
            (Some(ns), Some(nm)) => Some(WorkloadRef {
                namespace: ns.clone(),
                name: nm.clone(),
            }),
            _ => None,
        };
        if let (Some(id), Some(name_node)) = (&id, name_node) {
            if let Some(first) = ids.get(id) {
                c.error(
                    name_node.pos,
                    &f.path("name"),
                    format!(
                        "workload {}/{} is already defined at {first}",
                        id.namespace, id.name
                    ),
                );
            } else {
                ids.insert(id.clone(), wpath.clone());
            }
        }
        for (addr, pos, ip_path) in &valid_ips {
            if let Some(first) = ips.get(addr) {
                c.error(
                    *pos,
                    ip_path,
                    format!(
                        "IP {addr} is already used at {first}; each workload IP must be unique"
                    ),
                );
            } else {
                ips.insert(*addr, ip_path.clone());
            }
        }
        let is_local = matches!((&node, local_node), (Some(a), Some(b)) if a == b);
        if is_local {
            match &netns {
                Some(None) => {
                    if let Some(first) = &host_mode {
                        c.error(
                            n.pos,
                            &wpath,
                            format!(
                                "a second host-mode workload on this node ({first} has no `netns` \
                                 either); at most one local workload may omit `netns`"
                            ),
                        );
                    } else {
                        host_mode = Some(wpath.clone());
                    }
                }
                Some(Some(p)) => {
                    if let Some(first) = netns_seen.get(p) {
                        let at = netns_node.map_or(n.pos, |v| v.pos);
                        c.error(
                            at,
                            &f.path("netns"),
                            format!(
                                "network namespace {} is already used by {first}; each local \
                                 workload needs its own",
                                p.display()
                            ),
                        );
                    } else {
                        netns_seen.insert(p.clone(), wpath.clone());
                    }
                }
                None => {}
            }
        }

        let workload = (|| {
            if !ips_ok {
                return None;
            }
            Some(Workload {
                name: name.clone()?,
                namespace: namespace.clone()?,
                service_account: service_account?,
                ips: valid_ips.iter().map(|(a, _, _)| *a).collect(),
                node: node?,
                protocol: protocol?,
                netns: netns?,
                healthy: healthy?,
                labels: labels?,
            })
        })();
        drafts.push(WorkloadDraft {
            id,
            ips: valid_ips,
            workload,
        });
    }
    drafts
}

/// `node.tls.node_ca`: the issuing CA's certificate and key files, the lifetime of what it
/// issues. The files are read by `check-config` and at start, not here.
fn node_ca(c: &mut Checker, node: &Node, path: &str) -> Option<NodeCaSettings> {
    let f = fields(c, node, path, NODE_CA_KEYS)?;
    let certificate = f
        .require(c, "certificate")
        .and_then(|v| file_path(c, v, &f.path("certificate")));
    let key = f
        .require(c, "key")
        .and_then(|v| file_path(c, v, &f.path("key")));
    let lifetime = f.or_default(
        c,
        "certificate_lifetime",
        DEFAULT_NODE_CA_LIFETIME,
        |c, v, p| {
            let d = duration(c, v, p)?;
            if d < MIN_NODE_CA_LIFETIME {
                c.error(
                    v.pos,
                    p,
                    "a certificate lifetime under 2s leaves no time to renew it at half-life",
                );
                return None;
            }
            Some(d)
        },
    );
    Some(NodeCaSettings {
        certificate: certificate?,
        key: key?,
        certificate_lifetime: lifetime?,
    })
}

/// `node.deliver_client_address`: `auto`, `on` or `off` (`true`/`false` too).
fn client_address_choice(c: &mut Checker, v: &Node, path: &str) -> Option<ClientAddressChoice> {
    match &v.value {
        Value::Bool(true) => Some(ClientAddressChoice::On),
        Value::Bool(false) => Some(ClientAddressChoice::Off),
        _ => match string(c, v, path)? {
            "auto" => Some(ClientAddressChoice::Auto),
            "on" => Some(ClientAddressChoice::On),
            "off" => Some(ClientAddressChoice::Off),
            other => {
                c.error(
                    v.pos,
                    path,
                    format!("unknown value `{other}`; accepted: auto, on, off"),
                );
                None
            }
        },
    }
}

/// A file or directory path (absolute, or relative to the working directory); not read here.
fn file_path(c: &mut Checker, node: &Node, path: &str) -> Option<PathBuf> {
    let s = string(c, node, path)?;
    let why = if s.is_empty() {
        "must not be empty"
    } else if s.contains('\0') {
        "must not contain a NUL character"
    } else {
        return Some(PathBuf::from(s));
    };
    c.error(node.pos, path, format!("path {why}"));
    None
}

/// Bare name → `/var/run/netns/<name>`; absolute path kept; anything else refused.
fn netns_path(c: &mut Checker, node: &Node, path: &str) -> Option<PathBuf> {
    let s = string(c, node, path)?;
    let why = if s.is_empty() {
        Some("must not be empty")
    } else if s.contains('\0') {
        Some("must not contain a NUL character")
    } else if s.starts_with('/') {
        None
    } else if s.contains('/') {
        Some("is a relative path: give a bare name (looked up in /var/run/netns) or an absolute path")
    } else if s == "." || s == ".." {
        Some("is not a namespace name")
    } else {
        None
    };
    if let Some(why) = why {
        c.error(node.pos, path, format!("netns `{s}` {why}"));
        return None;
    }
    if s.starts_with('/') {
        Some(PathBuf::from(s))
    } else {
        Some(PathBuf::from(NETNS_DIR).join(s))
    }
}

fn check_services(
    c: &mut Checker,
    items: &[Node],
    path: &str,
    workloads: &[WorkloadDraft],
) -> Vec<Service> {
    let workload_ips: HashMap<IpAddr, &str> = workloads
        .iter()
        .flat_map(|w| w.ips.iter().map(|(a, _, p)| (*a, p.as_str())))
        .collect();
    let known_workloads: HashSet<&WorkloadRef> =
        workloads.iter().filter_map(|w| w.id.as_ref()).collect();
    // An endpoint naming a workload whose own name was invalid would be a second error for the
    // same typo; only judge endpoints when every workload's name could be read.
    let names_complete = workloads.iter().all(|w| w.id.is_some());

    let mut services = Vec::with_capacity(items.len());
    let mut all_ok = true;
    let mut ids: HashMap<WorkloadRef, String> = HashMap::new();
    let mut listeners: HashMap<(IpAddr, u16), String> = HashMap::new();

    for (i, n) in items.iter().enumerate() {
        let spath = item(path, i);
        let Some(f) = fields(c, n, &spath, SERVICE_KEYS) else {
            all_ok = false;
            continue;
        };
        let name_node = f.require(c, "name");
        let name = name_node.and_then(|v| dns_label(c, v, &f.path("name")));
        let namespace = f
            .require(c, "namespace")
            .and_then(|v| dns_label(c, v, &f.path("namespace")));
        if let (Some(ns), Some(nm), Some(name_node)) = (&namespace, &name, name_node) {
            let id = WorkloadRef {
                namespace: ns.clone(),
                name: nm.clone(),
            };
            if let Some(first) = ids.get(&id) {
                c.error(
                    name_node.pos,
                    &f.path("name"),
                    format!("service {ns}/{nm} is already defined at {first}"),
                );
            } else {
                ids.insert(id, spath.clone());
            }
        }

        // VIPs: valid, not repeated, and not some workload's own address.
        let mut vips_ok = false;
        let mut vips: Vec<IpAddr> = Vec::new();
        if let Some(list_node) = f.require(c, "vips") {
            let vpath = f.path("vips");
            if let Some(list) = non_empty_list(c, list_node, &vpath) {
                vips_ok = true;
                for (k, v) in list.iter().enumerate() {
                    let p = item(&vpath, k);
                    let Some(addr) = ip(c, v, &p) else {
                        vips_ok = false;
                        continue;
                    };
                    if vips.contains(&addr) {
                        c.error(v.pos, &p, format!("VIP {addr} is listed twice"));
                        vips_ok = false;
                    } else if let Some(owner) = workload_ips.get(&addr) {
                        c.error(
                            v.pos,
                            &p,
                            format!("VIP {addr} is a workload's own address ({owner}); a VIP must be distinct"),
                        );
                        vips_ok = false;
                    } else {
                        vips.push(addr);
                    }
                }
            }
        }

        let mut ports_ok = false;
        let mut ports: Vec<(ServicePort, Pos, String)> = Vec::new();
        if let Some(list_node) = f.require(c, "ports") {
            let ppath = f.path("ports");
            if let Some(list) = non_empty_list(c, list_node, &ppath) {
                ports_ok = true;
                for (k, pn) in list.iter().enumerate() {
                    let p = item(&ppath, k);
                    let Some(pf) = fields(c, pn, &p, SERVICE_PORT_KEYS) else {
                        ports_ok = false;
                        continue;
                    };
                    let port_node = pf.require(c, "port");
                    let number = port_node.and_then(|v| port(c, v, &pf.path("port")));
                    // Like Kubernetes: no target_port means the same port on the endpoint.
                    let target = match pf.get("target_port") {
                        None => number,
                        Some(v) => port(c, v, &pf.path("target_port")),
                    };
                    let (Some(number), Some(target), Some(port_node)) = (number, target, port_node)
                    else {
                        ports_ok = false;
                        continue;
                    };
                    if ports.iter().any(|(sp, _, _)| sp.port == number) {
                        c.error(
                            port_node.pos,
                            &pf.path("port"),
                            format!("port {number} is listed twice in this service"),
                        );
                        ports_ok = false;
                        continue;
                    }
                    ports.push((
                        ServicePort {
                            port: number,
                            target_port: target,
                        },
                        port_node.pos,
                        pf.path("port"),
                    ));
                }
            }
        }
        for (sp, pos, ppath) in &ports {
            for vip in &vips {
                let key = (*vip, sp.port);
                if let Some(first) = listeners.get(&key) {
                    c.error(
                        *pos,
                        ppath,
                        format!(
                            "{} is already served by {first}; each (VIP, port) belongs to one service",
                            SocketAddr::new(*vip, sp.port)
                        ),
                    );
                    ports_ok = false;
                } else {
                    listeners.insert(key, spath.clone());
                }
            }
        }

        let mut endpoints_ok = true;
        let mut endpoints = Vec::new();
        if let Some(list_node) = f.get("endpoints") {
            let epath = f.path("endpoints");
            match list(c, list_node, &epath) {
                None => endpoints_ok = false,
                Some(list) => {
                    for (k, en) in list.iter().enumerate() {
                        let p = item(&epath, k);
                        let Some(r) = endpoint_ref(c, en, &p, namespace.as_deref()) else {
                            endpoints_ok = false;
                            continue;
                        };
                        if endpoints.contains(&r) {
                            c.error(
                                en.pos,
                                &p,
                                format!("endpoint {}/{} is listed twice", r.namespace, r.name),
                            );
                            endpoints_ok = false;
                        } else if names_complete && !known_workloads.contains(&r) {
                            c.error(
                                en.pos,
                                &p,
                                format!(
                                    "endpoint {}/{} names no configured workload",
                                    r.namespace, r.name
                                ),
                            );
                            endpoints_ok = false;
                        } else {
                            endpoints.push(r);
                        }
                    }
                }
            }
        }

        match (name, namespace) {
            (Some(name), Some(namespace)) if vips_ok && ports_ok && endpoints_ok => {
                services.push(Service {
                    name,
                    namespace,
                    vips,
                    ports: ports.into_iter().map(|(sp, _, _)| sp).collect(),
                    endpoints,
                })
            }
            _ => all_ok = false,
        }
    }
    if !all_ok {
        // Problems are already recorded; an incomplete list must never look like a valid one.
        services.clear();
    }
    services
}

/// `namespace/name`, or a bare `name` in the service's own namespace.
fn endpoint_ref(
    c: &mut Checker,
    node: &Node,
    path: &str,
    service_namespace: Option<&str>,
) -> Option<WorkloadRef> {
    let s = string(c, node, path)?;
    let (ns, name) = match s.split_once('/') {
        Some((ns, name)) => (Some(ns), name),
        None => (service_namespace, s),
    };
    let valid = |x: &str| is_dns_label(x);
    match ns {
        Some(ns) if valid(ns) && valid(name) => Some(WorkloadRef {
            namespace: ns.to_string(),
            name: name.to_string(),
        }),
        // The service's namespace was invalid and already reported.
        None => None,
        Some(_) => {
            c.error(
                node.pos,
                path,
                format!("endpoint `{s}` is not `namespace/name` or `name` (DNS labels)"),
            );
            None
        }
    }
}

#[cfg(test)]
pub(super) mod tests {
    use super::*;
    use crate::control_plane::config::ConfigError;
    use crate::control_plane::config::{AuthorizationPolicy, Operation, PolicyRule, Source};
    use crate::control_plane::policy::Action;

    pub(in crate::control_plane::config) fn errors(text: &str) -> Vec<ConfigError> {
        match load(text) {
            Ok(cfg) => panic!("expected errors, got {cfg:?}"),
            Err(ConfigErrors(errs)) => errs,
        }
    }

    fn ok(text: &str) -> Config {
        match load(text) {
            Ok(cfg) => cfg,
            Err(e) => panic!("expected a valid config, got:\n{e}"),
        }
    }

    /// (line, column, path) of each error, for compact assertions.
    pub(in crate::control_plane::config) fn places(
        errs: &[ConfigError],
    ) -> Vec<(usize, usize, &str)> {
        errs.iter()
            .map(|e| (e.line, e.column, e.path.as_str()))
            .collect()
    }

    fn ip(s: &str) -> IpAddr {
        s.parse().expect("test IP")
    }

    const HEAD: &str = "version: 1\nnode:\n  name: node-a\n";

    #[test]
    fn valid_file_round_trips_to_expected_config() {
        let text = r#"
version: 1
node:
  name: node-a
  trust_domain: example.org
  root_namespace: mesh-config
  reactors: 4
  pin_reactors: false
  driver: epoll
  socket_mark: 0x100
  deliver_client_address: off
  ports: {outbound: 16001, inbound_plaintext: 16006, inbound_hbone: 16008}
  admin: "[::1]:9000"
  metrics: off
  readiness: 127.0.0.1:9021
  timeouts: {connect: 250ms, idle: 10m, drain: 2s}
  limits: {max_flows_per_reactor: 100}
  splice: {pipe_size: 65536, max_bytes_per_wakeup: 4096, pipe_pool_size: 0, pipes_per_reactor: 0}
  tls:
    trust_bundle: /etc/ringtun/ca.pem
    certificate_dir: certs
  hbone: {max_streams_per_tunnel: 7, pool_idle_timeout: 90s, ktls: "off", ktls_record_budget: 1000, cipher: aes_256_gcm, zero_copy: true, keepalive_interval: "off", keepalive_timeout: 3s}
workloads:
  - name: client
    namespace: default
    ips: [10.1.1.2, "fd00:1::2"]
    node: node-a
    netns: pod-a
    labels: {app: client, example.com/tier: "", version: "v1.2_b"}
  - name: server
    namespace: prod
    service_account: server-sa
    ips: [10.1.1.3]
    node: node-a
    protocol: TCP
    netns: /run/netns/pod-b
    healthy: false
  - name: host
    namespace: default
    ips: [192.168.0.5]
    node: node-a
  - name: remote
    namespace: prod
    ips: [10.2.0.9]
    node: node-b
services:
  - name: echo
    namespace: prod
    vips: [10.96.0.10, "fd00:96::10"]
    ports:
      - {port: 80, target_port: 8080}
      - port: 443
    endpoints: [server, default/client, prod/remote]
policies:
  - name: allow-client
    namespace: prod
    selector: {match_labels: {app: server}}
    rules:
      - from: [{source: {principals: [example.org/ns/default/sa/default]}}]
        to: [{operation: {ports: [8080]}}]
  - name: deny-plaintext
    namespace: mesh-config
    action: DENY
    dry_run: true
    rules: [{from: [{source: {not_principals: ["*"]}}]}]
"#;
        let expected = Config {
            node: NodeConfig {
                name: "node-a".into(),
                trust_domain: "example.org".into(),
                root_namespace: "mesh-config".into(),
                reactors: Some(4),
                pin_reactors: false,
                driver: DriverChoice::Epoll,
                socket_mark: 0x100,
                deliver_client_address: ClientAddressChoice::Off,
                ports: Ports {
                    outbound: 16001,
                    inbound_plaintext: 16006,
                    inbound_hbone: 16008,
                },
                admin_addr: Some("[::1]:9000".parse().expect("addr")),
                metrics_addr: None,
                readiness_addr: Some("127.0.0.1:9021".parse().expect("addr")),
                timeouts: Timeouts {
                    connect: Duration::from_millis(250),
                    handshake: Duration::from_millis(250),
                    idle: Duration::from_secs(600),
                    drain: Duration::from_secs(2),
                },
                limits: Limits {
                    max_flows_per_reactor: 100,
                    ..DEFAULT_LIMITS
                },
                splice: SpliceSettings {
                    pipe_size: 65536,
                    max_bytes_per_wakeup: 4096,
                    pipe_pool_size: 0,
                    pipes_per_reactor: 0,
                },
                tls: Some(TlsSettings {
                    trust_bundle: PathBuf::from("/etc/ringtun/ca.pem"),
                    certificate_dir: Some(PathBuf::from("certs")),
                    node_ca: None,
                }),
                hbone: HboneSettings {
                    max_streams_per_tunnel: 7,
                    pool_idle_timeout: Duration::from_secs(90),
                    ktls: KtlsChoice::Off,
                    ktls_record_budget: 1000,
                    cipher: CipherChoice::Aes256Gcm,
                    zero_copy: true,
                    keepalive_interval: None,
                    keepalive_timeout: Duration::from_secs(3),
                },
            },
            workloads: vec![
                Workload {
                    name: "client".into(),
                    namespace: "default".into(),
                    service_account: "default".into(),
                    ips: vec![ip("10.1.1.2"), ip("fd00:1::2")],
                    node: "node-a".into(),
                    protocol: Protocol::Hbone,
                    netns: Some(PathBuf::from("/var/run/netns/pod-a")),
                    healthy: true,
                    labels: [
                        ("app", "client"),
                        ("example.com/tier", ""),
                        ("version", "v1.2_b"),
                    ]
                    .into_iter()
                    .map(|(k, v)| (k.to_string(), v.to_string()))
                    .collect(),
                },
                Workload {
                    name: "server".into(),
                    namespace: "prod".into(),
                    service_account: "server-sa".into(),
                    ips: vec![ip("10.1.1.3")],
                    node: "node-a".into(),
                    protocol: Protocol::Tcp,
                    netns: Some(PathBuf::from("/run/netns/pod-b")),
                    healthy: false,
                    labels: BTreeMap::new(),
                },
                Workload {
                    name: "host".into(),
                    namespace: "default".into(),
                    service_account: "default".into(),
                    ips: vec![ip("192.168.0.5")],
                    node: "node-a".into(),
                    protocol: Protocol::Hbone,
                    netns: None,
                    healthy: true,
                    labels: BTreeMap::new(),
                },
                Workload {
                    name: "remote".into(),
                    namespace: "prod".into(),
                    service_account: "default".into(),
                    ips: vec![ip("10.2.0.9")],
                    node: "node-b".into(),
                    protocol: Protocol::Hbone,
                    netns: None,
                    healthy: true,
                    labels: BTreeMap::new(),
                },
            ],
            services: vec![Service {
                name: "echo".into(),
                namespace: "prod".into(),
                vips: vec![ip("10.96.0.10"), ip("fd00:96::10")],
                ports: vec![
                    ServicePort {
                        port: 80,
                        target_port: 8080,
                    },
                    ServicePort {
                        port: 443,
                        target_port: 443,
                    },
                ],
                endpoints: vec![
                    WorkloadRef {
                        namespace: "prod".into(),
                        name: "server".into(),
                    },
                    WorkloadRef {
                        namespace: "default".into(),
                        name: "client".into(),
                    },
                    WorkloadRef {
                        namespace: "prod".into(),
                        name: "remote".into(),
                    },
                ],
            }],
            policies: vec![
                AuthorizationPolicy {
                    name: "allow-client".into(),
                    namespace: "prod".into(),
                    selector: Some(
                        [("app".to_string(), "server".to_string())]
                            .into_iter()
                            .collect(),
                    ),
                    action: Action::Allow,
                    dry_run: false,
                    rules: vec![PolicyRule {
                        from: vec![Source {
                            principals: vec!["example.org/ns/default/sa/default".into()],
                            ..Source::default()
                        }],
                        to: vec![Operation {
                            ports: vec![8080],
                            not_ports: vec![],
                        }],
                        when: vec![],
                        l7_attributes: vec![],
                    }],
                },
                AuthorizationPolicy {
                    name: "deny-plaintext".into(),
                    namespace: "mesh-config".into(),
                    selector: None,
                    action: Action::Deny,
                    dry_run: true,
                    rules: vec![PolicyRule {
                        from: vec![Source {
                            not_principals: vec!["*".into()],
                            ..Source::default()
                        }],
                        ..PolicyRule::default()
                    }],
                },
            ],
        };
        assert_eq!(ok(text), expected);
    }

    #[test]
    fn minimal_file_gets_every_default() {
        let cfg = ok(HEAD);
        assert_eq!(cfg.node.name, "node-a");
        assert_eq!(cfg.node.trust_domain, "cluster.local");
        assert_eq!(cfg.node.reactors, None);
        assert_eq!(cfg.node.socket_mark, 0x539);
        assert_eq!(cfg.node.ports.all(), [15001, 15006, 15008]);
        assert_eq!(cfg.node.admin_addr, "127.0.0.1:15000".parse().ok());
        assert_eq!(cfg.node.metrics_addr, "0.0.0.0:15020".parse().ok());
        assert_eq!(cfg.node.readiness_addr, "0.0.0.0:15021".parse().ok());
        assert_eq!(cfg.node.timeouts.idle, Duration::from_secs(3600));
        assert!(cfg.workloads.is_empty() && cfg.services.is_empty());
        // `workloads:` with nothing after it is an empty list, not an error.
        assert!(ok(&format!("{HEAD}workloads:\nservices:\n"))
            .workloads
            .is_empty());
    }

    #[test]
    fn the_handshake_budget_has_defaults_and_never_outwaits_connect() {
        let cfg = ok(HEAD);
        assert_eq!(cfg.node.timeouts.handshake, Duration::from_secs(2));
        assert_eq!(cfg.node.limits, DEFAULT_LIMITS);
        // Unset, it follows a connect timeout shorter than its default.
        let short = ok(&format!("{HEAD}  timeouts: {{connect: 500ms}}\n"));
        assert_eq!(short.node.timeouts.handshake, Duration::from_millis(500));
        let set = ok(&format!(
            "{HEAD}  timeouts: {{handshake: 300ms}}\n  limits: {{max_handshakes_per_reactor: 8, \
             max_handshakes_per_source: 2, max_tunnels_per_peer: 3}}\n"
        ));
        assert_eq!(set.node.timeouts.handshake, Duration::from_millis(300));
        let l = set.node.limits;
        assert_eq!(
            (
                l.max_handshakes_per_reactor,
                l.max_handshakes_per_source,
                l.max_tunnels_per_peer
            ),
            (8, 2, 3)
        );
        let errs = errors(&format!(
            "{HEAD}  timeouts: {{connect: 1s, handshake: 3s}}\n  \
             limits: {{max_handshakes_per_source: 0}}\n"
        ));
        let found: Vec<(&str, &str)> = errs
            .iter()
            .map(|e| (e.path.as_str(), e.message.as_str()))
            .collect();
        assert_eq!(found.len(), 2, "{}", ConfigErrors(errs.clone()));
        assert_eq!(found[0].0, "node.timeouts.handshake");
        assert!(
            found[0]
                .1
                .contains("must not be longer than timeouts.connect (1s)"),
            "{}",
            found[0].1
        );
        assert_eq!(found[1].0, "node.limits.max_handshakes_per_source");
    }

    #[test]
    fn flow_receive_buffer_is_zero_or_a_size_a_flow_can_use() {
        assert_eq!(ok(HEAD).node.limits.flow_receive_buffer, 128 * 1024);
        for (value, want) in [(0, 0), (4096, 4096), (1 << 20, 1 << 20)] {
            let cfg = ok(&format!(
                "{HEAD}  limits: {{flow_receive_buffer: {value}}}\n"
            ));
            assert_eq!(cfg.node.limits.flow_receive_buffer, want);
        }
        for value in ["100", "4095", "67108865", "-1"] {
            let errs = errors(&format!(
                "{HEAD}  limits: {{flow_receive_buffer: {value}}}\n"
            ));
            assert_eq!(errs.len(), 1, "{value}: {}", ConfigErrors(errs.clone()));
            assert_eq!(errs[0].path, "node.limits.flow_receive_buffer");
        }
        let errs = errors(&format!("{HEAD}  limits: {{flow_receive_buffer: 100}}\n"));
        assert!(
            errs[0].message.contains("too small to carry a flow"),
            "{}",
            errs[0].message
        );
    }

    #[test]
    fn every_mistake_is_reported_once_in_file_order() {
        let text = "\
version: 2
node:
  name: node-a
  driver: fast
  timeouts:
    connect: 5
  colour: blue
workloads:
  - name: a
    namespace: default
    ips: [10.0.0.1, 10.0.0.300]
    node: node-a
  - name: b
    namespace: default
    ips: [10.0.0.1]
    node: node-a
    healthy: \"yes\"
services:
  - name: svc
    namespace: default
    vips: [10.96.0.1]
    ports: [{port: 80}]
    endpoints: [default/missing]
";
        let errs = errors(text);
        assert_eq!(
            places(&errs),
            vec![
                (1, 10, "version"),
                (4, 11, "node.driver"),
                (6, 14, "node.timeouts.connect"),
                (7, 3, "node.colour"),
                (11, 21, "workloads[0].ips[1]"),
                (13, 5, "workloads[1]"),
                (15, 11, "workloads[1].ips[0]"),
                (17, 14, "workloads[1].healthy"),
                (23, 17, "services[0].endpoints[0]"),
            ],
            "{}",
            ConfigErrors(errs.clone())
        );
        let msg = |i: usize| errs[i].message.as_str();
        assert!(
            msg(0).contains("unsupported config version 2"),
            "{}",
            msg(0)
        );
        assert!(msg(1).contains("unknown driver `fast`"), "{}", msg(1));
        assert!(msg(2).contains("needs a unit"), "{}", msg(2));
        assert!(msg(3).contains("unknown key `colour`"), "{}", msg(3));
        assert!(
            msg(3).contains("accepted keys: name, trust_domain"),
            "{}",
            msg(3)
        );
        assert!(
            msg(4).contains("`10.0.0.300` is not an IPv4 or IPv6 address"),
            "{}",
            msg(4)
        );
        assert!(msg(5).contains("second host-mode workload"), "{}", msg(5));
        assert!(
            msg(6).contains("already used at workloads[0].ips[0]"),
            "{}",
            msg(6)
        );
        assert!(
            msg(7).contains("expected true or false, found string \"yes\""),
            "{}",
            msg(7)
        );
        assert!(
            msg(8).contains("default/missing names no configured workload"),
            "{}",
            msg(8)
        );
    }

    #[test]
    fn missing_version_and_missing_keys_point_at_the_enclosing_mapping() {
        let errs = errors("node:\n  trust_domain: x.y\nworkloads:\n  - name: a\n");
        assert_eq!(
            places(&errs),
            vec![
                (1, 1, "version"),
                (2, 3, "node.name"),
                (4, 5, "workloads[0].namespace"),
                (4, 5, "workloads[0].ips"),
                (4, 5, "workloads[0].node"),
            ]
        );
        assert!(errs[0]
            .message
            .contains("required key `version` is missing"));
        // A version that is not an integer is a type error.
        let errs = errors("version: \"1\"\nnode: {name: a}\n");
        assert_eq!(places(&errs), vec![(1, 10, "version")]);
        assert!(errs[0]
            .message
            .contains("expected the integer 1, found string \"1\""));
    }

    #[test]
    fn syntax_error_is_one_error_with_its_position() {
        let errs = errors("version: 1\nnode:\n  name: a\n  ports: {outbound: 1\nworkloads: []\n");
        assert_eq!(errs.len(), 1, "{errs:?}");
        assert!(
            errs[0].message.starts_with("YAML syntax error"),
            "{}",
            errs[0]
        );
        assert!(errs[0].line >= 4 && errs[0].column >= 1, "{}", errs[0]);
        // A key at an indentation no mapping has.
        let errs = errors("version: 1\nnode:\n  name: a\n    bad: x\n");
        assert_eq!(errs.len(), 1, "{errs:?}");
        assert_eq!(errs[0].line, 4, "{}", errs[0]);
    }

    #[test]
    fn socket_mark_accepts_hex_integer_and_hex_string() {
        let mark = |v: &str| ok(&format!("{HEAD}  socket_mark: {v}\n")).node.socket_mark;
        assert_eq!(mark("0x539"), 0x539);
        assert_eq!(mark("\"0x539\""), 0x539);
        assert_eq!(mark("'0X1f'"), 0x1f);
        assert_eq!(mark("1337"), 1337);
        assert_eq!(mark("\"1337\""), 1337);
        assert_eq!(mark("0xffffffff"), u32::MAX);
        for bad in ["0", "\"0x0\"", "0x100000000", "-1", "\"0xzz\"", "1.5"] {
            let errs = errors(&format!("{HEAD}  socket_mark: {bad}\n"));
            assert_eq!(places(&errs), vec![(4, 16, "node.socket_mark")], "{bad}");
        }
    }

    #[test]
    fn node_values_are_range_checked() {
        let text = format!(
            "{HEAD}  reactors: 0\n  trust_domain: Bad_Domain\n  admin: localhost\n  \
             ports: {{outbound: 70000}}\n  timeouts: {{idle: 0s, drain: 3d}}\n  \
             limits: {{max_flows_per_reactor: 0}}\n  \
             splice: {{pipe_size: 1024, max_bytes_per_wakeup: 100, pipe_pool_size: 70000}}\n"
        );
        let errs = errors(&text);
        let paths: Vec<&str> = errs.iter().map(|e| e.path.as_str()).collect();
        assert_eq!(
            paths,
            vec![
                "node.reactors",
                "node.trust_domain",
                "node.admin",
                "node.ports.outbound",
                "node.timeouts.idle",
                "node.timeouts.drain",
                "node.limits.max_flows_per_reactor",
                "node.splice.pipe_size",
                "node.splice.max_bytes_per_wakeup",
                "node.splice.pipe_pool_size",
            ],
            "{}",
            ConfigErrors(errs.clone())
        );
        assert!(ok(&format!("{HEAD}  reactors: 256\n  admin: off\n"))
            .node
            .admin_addr
            .is_none());
    }

    #[test]
    fn tls_section_is_optional_but_needs_both_paths_when_present() {
        assert_eq!(ok(HEAD).node.tls, None);
        assert_eq!(ok(&format!("{HEAD}  tls:\n")).node.tls, None);
        let text = format!(
            "{HEAD}  tls:\n    trust_bundle: \"\"\n    key_file: k.pem\n    certificate_dir: 5\n"
        );
        let errs = errors(&text);
        assert_eq!(
            places(&errs),
            vec![
                (5, 19, "node.tls.trust_bundle"),
                (6, 5, "node.tls.key_file"),
                (7, 22, "node.tls.certificate_dir"),
            ],
            "{}",
            ConfigErrors(errs.clone())
        );
        assert!(errs[0].message.contains("must not be empty"), "{}", errs[0]);
        assert!(
            errs[1]
                .message
                .contains("accepted keys: trust_bundle, certificate_dir"),
            "{}",
            errs[1]
        );
        assert!(errs[2].message.contains("expected a string"), "{}", errs[2]);
        let errs = errors(&format!("{HEAD}  tls: {{trust_bundle: ca.pem}}\n"));
        assert_eq!(places(&errs), vec![(4, 8, "node.tls.certificate_dir")]);
        assert!(errs[0].message.contains("required key `certificate_dir`"));
    }

    #[test]
    fn node_ca_mode_replaces_the_certificate_directory() {
        let cfg = ok(&format!(
            "{HEAD}  tls:\n    trust_bundle: ca.pem\n    node_ca: {{certificate: ica.pem, key: ica-key.pem, certificate_lifetime: 10m}}\n"
        ));
        let tls = cfg.node.tls.expect("tls");
        assert_eq!(tls.certificate_dir, None);
        let ca = tls.node_ca.expect("node_ca");
        assert_eq!(ca.certificate, PathBuf::from("ica.pem"));
        assert_eq!(ca.key, PathBuf::from("ica-key.pem"));
        assert_eq!(ca.certificate_lifetime, Duration::from_secs(600));
        let cfg = ok(&format!(
            "{HEAD}  tls: {{trust_bundle: ca.pem, node_ca: {{certificate: i.pem, key: k.pem}}}}\n"
        ));
        assert_eq!(
            cfg.node.tls.unwrap().node_ca.unwrap().certificate_lifetime,
            DEFAULT_NODE_CA_LIFETIME
        );

        // Both sources at once: one error, at `node_ca`.
        let errs = errors(&format!(
            "{HEAD}  tls:\n    trust_bundle: ca.pem\n    certificate_dir: certs\n    node_ca: {{key: k.pem, certificate_lifetime: 1s}}\n"
        ));
        assert_eq!(
            places(&errs),
            vec![(7, 14, "node.tls.node_ca")],
            "{}",
            ConfigErrors(errs.clone())
        );
        assert!(errs[0].message.contains("not both"), "{}", errs[0]);
        // Every problem inside `node_ca`, each at its place.
        let errs = errors(&format!(
            "{HEAD}  tls:\n    trust_bundle: ca.pem\n    node_ca: {{key: k.pem, certificate_lifetime: 1s, chain: x}}\n"
        ));
        assert_eq!(
            places(&errs),
            vec![
                (6, 14, "node.tls.node_ca.certificate"),
                (6, 49, "node.tls.node_ca.certificate_lifetime"),
                (6, 53, "node.tls.node_ca.chain"),
            ],
            "{}",
            ConfigErrors(errs.clone())
        );
        assert!(errs[1].message.contains("under 2s"), "{}", errs[1]);
    }

    #[test]
    fn listener_ports_must_be_distinct_even_from_defaults() {
        let errs = errors(&format!("{HEAD}  ports:\n    inbound_hbone: 15001\n"));
        assert_eq!(places(&errs), vec![(5, 20, "node.ports.inbound_hbone")]);
        assert!(
            errs[0]
                .message
                .contains("also node.ports.outbound (its default)"),
            "{}",
            errs[0]
        );
    }

    #[test]
    fn netns_bare_name_absolute_path_and_relative_path() {
        let w = |netns: &str| {
            format!(
                "{HEAD}workloads:\n  - {{name: a, namespace: ns, ips: [10.0.0.1], node: node-a, netns: {netns}}}\n"
            )
        };
        assert_eq!(
            ok(&w("pod-a")).workloads[0].netns,
            Some(PathBuf::from("/var/run/netns/pod-a"))
        );
        assert_eq!(
            ok(&w("/proc/42/ns/net")).workloads[0].netns,
            Some(PathBuf::from("/proc/42/ns/net"))
        );
        let errs = errors(&w("netns/pod-a"));
        assert_eq!(places(&errs), vec![(5, 68, "workloads[0].netns")]);
        assert!(errs[0].message.contains("relative path"), "{}", errs[0]);
    }

    #[test]
    fn local_workloads_need_distinct_netns_but_remote_ones_do_not() {
        let text = format!(
            "{HEAD}workloads:
  - {{name: a, namespace: ns, ips: [10.0.0.1], node: node-a, netns: pod}}
  - {{name: b, namespace: ns, ips: [10.0.0.2], node: node-a, netns: /var/run/netns/pod}}
  - {{name: c, namespace: ns, ips: [10.0.0.3], node: node-b}}
  - {{name: d, namespace: ns, ips: [10.0.0.4], node: node-b}}
  - {{name: a, namespace: ns, ips: [10.0.0.5], node: node-c}}
"
        );
        let errs = errors(&text);
        assert_eq!(
            places(&errs),
            vec![(6, 68, "workloads[1].netns"), (9, 12, "workloads[4].name")],
            "{}",
            ConfigErrors(errs.clone())
        );
        assert!(errs[1]
            .message
            .contains("workload ns/a is already defined at workloads[0]"));
    }

    #[test]
    fn service_cross_checks() {
        let text = format!(
            "{HEAD}workloads:
  - {{name: a, namespace: ns, ips: [10.0.0.1], node: node-b}}
services:
  - name: s1
    namespace: ns
    vips: [10.96.0.1, 10.0.0.1]
    ports: [{{port: 80}}, {{port: 80}}]
    endpoints: [a, ns/a]
  - name: s2
    namespace: ns
    vips: [10.96.0.1]
    ports: [{{port: 80, target_port: 0}}, {{port: 80, target_port: 8080}}]
  - name: s1
    namespace: ns
    vips: []
    ports: [{{target_port: 1}}]
    endpoints: [a/b/c]
"
        );
        let errs = errors(&text);
        assert_eq!(
            places(&errs),
            vec![
                (9, 23, "services[0].vips[1]"),
                (10, 32, "services[0].ports[1].port"),
                (11, 20, "services[0].endpoints[1]"),
                (15, 37, "services[1].ports[0].target_port"),
                (15, 48, "services[1].ports[1].port"),
                (16, 11, "services[2].name"),
                (18, 11, "services[2].vips"),
                (19, 13, "services[2].ports[0].port"),
                (20, 17, "services[2].endpoints[0]"),
            ],
            "{}",
            ConfigErrors(errs.clone())
        );
        assert!(
            errs[0].message.contains("a workload's own address"),
            "{}",
            errs[0]
        );
        assert!(errs[1].message.contains("listed twice"), "{}", errs[1]);
        assert!(
            errs[2].message.contains("endpoint ns/a is listed twice"),
            "{}",
            errs[2]
        );
        assert!(
            errs[4]
                .message
                .contains("10.96.0.1:80 is already served by services[0]"),
            "{}",
            errs[4]
        );
        assert!(
            errs[5].message.contains("service ns/s1 is already defined"),
            "{}",
            errs[5]
        );
        assert!(errs[6].message.contains("at least one"), "{}", errs[6]);
    }

    #[test]
    fn wrong_shapes_are_type_errors_not_panics() {
        for text in [
            "[]",
            "just a string",
            "version: 1\nnode: 5\n",
            "version: 1\nnode: {name: [a]}\nworkloads: {a: 1}\nservices: 3\n",
            "version: 1\nnode: {name: a}\nworkloads: [1, null, [x]]\n",
            "version: 1\nnode: {name: a}\n? [complex]\n: key\n",
            "version: 1\nnode: {name: a, reactors: !!int abc}\n",
            "version: &v 1\nnode: {name: *v, ports: *undefined}\n",
            "version: 1\nnode: {name: \"a b\", timeouts: {connect: 99999999999999999999h}}\n",
        ] {
            let errs = errors(text);
            assert!(!errs.is_empty(), "{text}");
            assert!(errs
                .windows(2)
                .all(|w| (w[0].line, w[0].column) <= (w[1].line, w[1].column)));
        }
        let errs = errors("version: 1\nnode: 5\n");
        assert_eq!(errs[0].message, "expected a mapping, found integer 5");
    }
}
