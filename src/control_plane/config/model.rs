//! The validated configuration: the types [`load`](super::load) produces and the rest of
//! ringtun reads. Every value here has passed validation (ports, addresses, durations, names,
//! cross-references), so readers never re-check it. Immutable once built.

use std::collections::BTreeMap;

use crate::control_plane::policy::{Action, IpBlock};

use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::time::Duration;

/// Every problem found in one file, in file order. Never empty when returned as an error.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigErrors(pub Vec<ConfigError>);

/// One problem, with its place: `path` is the YAML path (`workloads[2].ips[0]`), `line`/`column`
/// are 1-based positions in the source text (0 when the problem is about the file as a whole).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigError {
    pub line: usize,
    pub column: usize,
    pub path: String,
    pub message: String,
}

impl std::fmt::Display for ConfigError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{}:{}: {}: {}",
            self.line, self.column, self.path, self.message
        )
    }
}

impl std::fmt::Display for ConfigErrors {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        for (i, e) in self.0.iter().enumerate() {
            if i > 0 {
                writeln!(f)?;
            }
            write!(f, "{e}")?;
        }
        Ok(())
    }
}

impl std::error::Error for ConfigErrors {}

/// Something valid that will not do what it seems to say, with its place (as [`ConfigError`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigWarning {
    pub line: usize,
    pub column: usize,
    pub path: String,
    pub message: String,
}

impl std::fmt::Display for ConfigWarning {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{}:{}: {}: warning: {}",
            self.line, self.column, self.path, self.message
        )
    }
}

/// A valid configuration and its warnings, in file order.
#[derive(Debug, Clone, PartialEq)]
pub struct Checked {
    pub config: Config,
    pub warnings: Vec<ConfigWarning>,
}

/// The validated configuration of one node. Cheap to clone behind an `Arc`; immutable once built.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct Config {
    pub node: NodeConfig,
    pub workloads: Vec<Workload>,
    pub services: Vec<Service>,
    /// Authorization policies, in file order (the order that names the policy that decided
    /// when several match).
    pub policies: Vec<AuthorizationPolicy>,
}

#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct NodeConfig {
    /// This node's name; workloads whose `node` equals it are local (served by this process).
    pub name: String,
    pub trust_domain: String,
    /// Istio's root namespace: a policy there without selector applies to the whole mesh, one
    /// with a selector to matching workloads in every namespace.
    pub root_namespace: String,
    /// Number of reactor threads; `None` = one per available core.
    pub reactors: Option<usize>,
    /// Pin reactor N to CPU N (when there are at most as many reactors as CPUs).
    pub pin_reactors: bool,
    pub driver: DriverChoice,
    /// `SO_MARK` put on every socket ringtun opens (default 0x539), so capture rules skip it.
    pub socket_mark: u32,
    /// Whether inbound connections reach the application from the client's own address.
    pub deliver_client_address: ClientAddressChoice,
    pub ports: Ports,
    /// Address the admin endpoint binds (default 127.0.0.1:15000).
    pub admin_addr: Option<SocketAddr>,
    /// Address the Prometheus metrics endpoint binds (default 0.0.0.0:15020).
    pub metrics_addr: Option<SocketAddr>,
    /// Address the readiness endpoint binds (default 0.0.0.0:15021).
    pub readiness_addr: Option<SocketAddr>,
    pub timeouts: Timeouts,
    pub limits: Limits,
    pub splice: SpliceSettings,
    /// Where the mesh certificates live; `None` = no `tls:` section (no HBONE tunnels can be
    /// made or accepted).
    pub tls: Option<TlsSettings>,
    pub hbone: HboneSettings,
}

/// HBONE tunnel settings (`node.hbone`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub struct HboneSettings {
    /// Streams one pooled outbound tunnel carries at most (ztunnel: 100).
    pub max_streams_per_tunnel: u32,
    /// An outbound tunnel without streams for this long is closed; an inbound (server) tunnel
    /// after twice as long, so the client's pool normally closes first, and a peer cannot
    /// park idle tunnels on port 15008 for ever.
    #[serde(with = "duration_serde")]
    pub pool_idle_timeout: Duration,
    /// `auto`: kTLS when the kernel offloads the negotiated cipher; `off`: always user space.
    pub ktls: KtlsChoice,
    /// TLS records a tunnel sends under one key before it updates the key (where both ends
    /// follow a TLS 1.3 KeyUpdate) or retires (drained, replaced), so no tunnel reaches the
    /// AES-GCM limit of 2^24 records.
    pub ktls_record_budget: u64,
    /// Which TLS 1.3 suites tunnels offer and accept.
    pub cipher: CipherChoice,
    /// kTLS tunnels splice DATA payload (socket → pipe → tunnel and back) instead of copying
    /// it through user space. On by default; `false` copies the plaintext once each way (the
    /// kernel still encrypts), a way to rule the splice path out when chasing a problem.
    /// No effect on tunnels running user-space TLS.
    pub zero_copy: bool,
    /// A tunnel PINGs its peer this often (`None`: `off`, never); one that goes
    /// `keepalive_timeout` unanswered closes the tunnel and resets its streams, so a peer that
    /// vanished without a word (a partition, a dead host) is noticed in seconds, not after TCP's
    /// retransmissions give up.
    #[serde(with = "optional_duration_serde")]
    pub keepalive_interval: Option<Duration>,
    #[serde(with = "duration_serde")]
    pub keepalive_timeout: Duration,
}

/// `node.hbone.cipher`: both AES-GCM suites (AES-128 preferred, as rustls), or just one (to
/// pin what kTLS must offload, e.g. in the kernel matrix).
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum CipherChoice {
    Any,
    Aes128Gcm,
    Aes256Gcm,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum KtlsChoice {
    Auto,
    Off,
}

/// Certificate files for mutual TLS. Relative paths are taken from ringtun's working directory.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct TlsSettings {
    /// PEM file of the CA certificates a peer's chain must lead to.
    pub trust_bundle: PathBuf,
    /// The certificate and key of identity ns/sa are `<dir>/<ns>/<sa>/cert.pem` and `key.pem`.
    /// Exactly one of this and `node_ca` is set.
    pub certificate_dir: Option<PathBuf>,
    /// Node CA mode: ringtun issues its local workloads' certificates itself.
    pub node_ca: Option<NodeCaSettings>,
}

/// Node CA mode (`node.tls.node_ca`): an intermediate CA whose certificate and key this node
/// holds; ringtun issues short-lived certificates for the identities of its own local
/// workloads only, in memory, and renews each at half its lifetime.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct NodeCaSettings {
    /// PEM: the CA certificate that signs (first), then any intermediates up to the trust
    /// bundle's root; all are sent after the workload certificate.
    pub certificate: PathBuf,
    /// PEM (PKCS#8): the CA's private key.
    pub key: PathBuf,
    /// How long an issued certificate is valid (default 1h); renewed at half of it.
    #[serde(with = "duration_serde")]
    pub certificate_lifetime: Duration,
}

/// `node.deliver_client_address`: whether an inbound connection (plaintext on 15006, or a
/// tunnel stream from 15008) reaches the destination application from the client's address
/// (`IP_TRANSPARENT` on the delivery socket) or from the workload's own address. The replies
/// must be routed back to ringtun, which the capture rules (`ringtun redirect install`) do.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum ClientAddressChoice {
    /// Per workload, where its namespace routes the replies back (checked when its listeners
    /// are made); elsewhere from the workload's address, said in the log.
    Auto,
    /// Always; a workload whose namespace cannot route the replies back is not served.
    On,
    /// Never: the application sees its own address as the client (hosts without the rules).
    Off,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum DriverChoice {
    /// io_uring when it can be set up, epoll otherwise (the reason is logged).
    Auto,
    IoUring,
    Epoll,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub struct Ports {
    pub outbound: u16,
    pub inbound_plaintext: u16,
    pub inbound_hbone: u16,
}

impl Ports {
    /// Every port ringtun listens on inside a workload; a connection whose original destination
    /// is one of these (on the workload's own address) would loop and is refused.
    pub fn all(&self) -> [u16; 3] {
        [self.outbound, self.inbound_plaintext, self.inbound_hbone]
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub struct Timeouts {
    #[serde(with = "duration_serde")]
    pub connect: Duration,
    /// A connection to port 15008 must finish its TLS handshake within this (shorter than
    /// `connect`: a peer that connects and says nothing holds a handshake slot only so long).
    #[serde(with = "duration_serde")]
    pub handshake: Duration,
    #[serde(with = "duration_serde")]
    pub idle: Duration,
    /// How long SIGTERM waits for open flows before closing them.
    #[serde(with = "duration_serde")]
    pub drain: Duration,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub struct Limits {
    /// Flows one reactor holds at most; accepts beyond it are refused (and counted).
    pub max_flows_per_reactor: usize,
    /// Connections to port 15008 still in their TLS handshake, per reactor. Their own budget:
    /// unauthenticated sockets never take room from flows and tunnels.
    pub max_handshakes_per_reactor: usize,
    /// Of those, from one client address (IPv6: one /64).
    pub max_handshakes_per_source: usize,
    /// Established server tunnels per reactor from one peer identity, and from one peer
    /// address (idle ones are closed first to make room).
    pub max_tunnels_per_peer: usize,
    /// Receive buffer (`SO_RCVBUF`, bytes) of the sockets a flow's bytes arrive on: captured
    /// connections and deliveries, not tunnels. What one flow can make the kernel hold for
    /// ringtun while it cannot forward; 0 leaves it to the kernel's autotuning (up to
    /// `net.ipv4.tcp_rmem`'s maximum, 32 MiB on recent kernels).
    pub flow_receive_buffer: usize,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub struct SpliceSettings {
    /// Requested pipe capacity in bytes (`F_SETPIPE_SZ`); kept as the kernel grants it.
    pub pipe_size: usize,
    /// Bytes one direction of one flow may move per wakeup before yielding to other flows.
    pub max_bytes_per_wakeup: usize,
    /// Empty pipes a reactor keeps for reuse.
    pub pipe_pool_size: usize,
    /// Pipes a reactor may have at once (two descriptors each). Flows and tunnel streams take
    /// one per direction only while bytes are in flight; with every one busy, bytes are
    /// copied through user space until one is free. 0: always copy.
    pub pipes_per_reactor: usize,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "UPPERCASE")]
pub enum Protocol {
    /// Reached through an HBONE tunnel (mTLS HTTP/2 CONNECT to the node's port 15008).
    Hbone,
    /// Reached with plain TCP (a mesh workload that does not accept tunnels).
    Tcp,
}

#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct Workload {
    pub name: String,
    pub namespace: String,
    pub service_account: String,
    pub ips: Vec<IpAddr>,
    pub node: String,
    pub protocol: Protocol,
    /// Pod mode: the network namespace (a path, e.g. `/var/run/netns/pod-a`) ringtun creates
    /// this workload's listeners and outbound sockets in. `None` on a local workload = host mode.
    pub netns: Option<PathBuf>,
    /// Unhealthy workloads are never chosen as service endpoints.
    pub healthy: bool,
    /// Kubernetes labels, matched by authorization policies' selectors.
    pub labels: BTreeMap<String, String>,
}

#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct Service {
    pub name: String,
    pub namespace: String,
    pub vips: Vec<IpAddr>,
    pub ports: Vec<ServicePort>,
    /// Endpoints by workload reference; validation guarantees each names a configured workload.
    pub endpoints: Vec<WorkloadRef>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub struct ServicePort {
    pub port: u16,
    pub target_port: u16,
}

/// `namespace/name` of a workload.
#[derive(Debug, Clone, PartialEq, Eq, Hash, serde::Serialize)]
pub struct WorkloadRef {
    pub namespace: String,
    pub name: String,
}

mod duration_serde {
    use std::time::Duration;
    pub fn serialize<S: serde::Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&super::format_duration(*d))
    }
}

mod optional_duration_serde {
    use std::time::Duration;
    pub fn serialize<S: serde::Serializer>(d: &Option<Duration>, s: S) -> Result<S::Ok, S::Error> {
        match d {
            Some(d) => s.serialize_str(&super::format_duration(*d)),
            None => s.serialize_str("off"),
        }
    }
}

/// `1h`, `30s`, `250ms`: the same units the parser accepts.
pub fn format_duration(d: Duration) -> String {
    let ms = d.as_millis();
    if ms % 3_600_000 == 0 && ms > 0 {
        format!("{}h", ms / 3_600_000)
    } else if ms % 60_000 == 0 && ms > 0 {
        format!("{}m", ms / 60_000)
    } else if ms % 1000 == 0 {
        format!("{}s", ms / 1000)
    } else {
        format!("{ms}ms")
    }
}

// ------------------------------------------------------------------ authorization policies

/// One entry of `policies:` (Istio's AuthorizationPolicy).
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct AuthorizationPolicy {
    pub name: String,
    pub namespace: String,
    /// `selector.match_labels`: the workloads it applies to — in its namespace, or in every
    /// namespace when it lives in the root namespace. `None`: the whole namespace (the whole
    /// mesh in the root namespace).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub selector: Option<BTreeMap<String, String>>,
    pub action: Action,
    pub dry_run: bool,
    /// Any one matching makes the policy match. None: the policy matches nothing (an ALLOW
    /// policy without rules allows nothing).
    pub rules: Vec<PolicyRule>,
}

/// One rule: every part it has must match (each `from` entry, `to` entry and `when` condition
/// being a clause; within `from` and `to` any one entry is enough).
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize)]
pub struct PolicyRule {
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub from: Vec<Source>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub to: Vec<Operation>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub when: Vec<Condition>,
    /// Where this rule names attributes L4 cannot see, as paths inside the rule
    /// (`to[0].operation.methods`, `when[1] request.headers[x-user]`). Non-empty: the rule cannot
    /// be enforced as written — in an ALLOW policy it matches nothing, otherwise everything.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub l7_attributes: Vec<String>,
}

/// `from[].source`: the L4 fields. Principals and namespaces are Istio patterns (`*`, `*x`,
/// `x*` or exact); service accounts are `namespace/name` or a name in the policy's namespace.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize)]
pub struct Source {
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub principals: Vec<String>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub not_principals: Vec<String>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub namespaces: Vec<String>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub not_namespaces: Vec<String>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub service_accounts: Vec<String>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub not_service_accounts: Vec<String>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub ip_blocks: Vec<IpBlock>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub not_ip_blocks: Vec<IpBlock>,
}

/// `to[].operation`: the destination ports (its HTTP fields are L7).
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize)]
pub struct Operation {
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub ports: Vec<u16>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub not_ports: Vec<u16>,
}

/// `when[]` with an L4 key: `values` (any matches) and `not_values` (none matches).
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
#[serde(tag = "key")]
pub enum Condition {
    #[serde(rename = "source.ip")]
    SourceIp {
        values: Vec<IpBlock>,
        not_values: Vec<IpBlock>,
    },
    #[serde(rename = "source.namespace")]
    SourceNamespace {
        values: Vec<String>,
        not_values: Vec<String>,
    },
    #[serde(rename = "source.principal")]
    SourcePrincipal {
        values: Vec<String>,
        not_values: Vec<String>,
    },
    #[serde(rename = "destination.ip")]
    DestinationIp {
        values: Vec<IpBlock>,
        not_values: Vec<IpBlock>,
    },
    #[serde(rename = "destination.port")]
    DestinationPort {
        values: Vec<u16>,
        not_values: Vec<u16>,
    },
}
