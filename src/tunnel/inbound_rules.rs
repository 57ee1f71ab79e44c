//! HBONE CONNECT rules, as pure decisions: what an outbound tunnel stream asks for, and whether
//! an inbound one on port 15008 may be delivered (DESIGN.md §4, issue 3).
//!
//! **Outbound.** For a [`Resolution`] whose route is [`Route::HboneTunnel`], [`outbound_connect`]
//! builds the CONNECT request — `:authority` is the destination endpoint's IP and target port
//! (a service VIP was already translated by resolution), `forwarded: for="<client ip:port>"`
//! (RFC 7239, IPv6 quoted and bracketed) — together with the tunnel's peer address, the
//! identity the client certificate carries and the identity the server must prove. Those three
//! are also the tunnel pool's key ([`OutboundConnect::pool_key`]).
//!
//! **Inbound.** [`InboundRules::check`] decides a CONNECT that arrived on a tunnel accepted at
//! `local` (the tunnel connection's local address; TPROXY keeps the pod IP the client dialled).
//! The authority must be an IP:port of a workload **served by this node**, its IP must be the
//! address the tunnel arrived on (a tunnel to pod A cannot reach pod B), and its port must not
//! be one of ringtun's own (that would loop into the proxy). The answer is
//! [`InboundDecision::Accept`] with the workload and the address to connect, or
//! [`InboundDecision::Reject`] with the status to answer and a reason label for metrics: 400
//! for a malformed request or an authority that is not a local workload here (431 for an
//! oversized header list); 503 is the caller's when the upstream connect fails; 401 is reserved
//! for authorization. Identity comes only from the peer's verified certificate: `forwarded`,
//! `baggage`, `traceparent` and any other header are telemetry and never change a decision.

use std::net::{IpAddr, SocketAddr};

use hbone_proto::connect::{ConnectRequest, RequestError};
use hbone_proto::hpack::Field;

use crate::control_plane::config::NodeConfig;
use crate::control_plane::identity::{IdentityError, SpiffeId};
use crate::control_plane::workload_registry::{canonical, Registry, WorkloadId};
use crate::data_plane::first_connection::{Resolution, Route};
use crate::tunnel::pool::PoolKey;

/// Everything needed to open one outbound tunnel stream.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OutboundConnect {
    /// The CONNECT request to send on the tunnel.
    pub request: ConnectRequest,
    /// The destination node's HBONE address (where the tunnel connects).
    pub peer: SocketAddr,
    /// The identity our client certificate carries: the source workload's.
    pub source_identity: SpiffeId,
    /// The identity the server certificate must carry: the destination workload's.
    pub expected_identity: SpiffeId,
    pub destination: WorkloadId,
}

impl OutboundConnect {
    /// The tunnel pool key this stream may share a tunnel under.
    pub fn pool_key(&self) -> PoolKey {
        PoolKey {
            source: self.source_identity.clone(),
            peer: self.peer,
            expected: self.expected_identity.clone(),
        }
    }
}

/// Why no CONNECT can be built for a resolution (a bug upstream of this module, or a
/// registry identity that does not parse); the client is reset.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum OutboundError {
    #[error("the resolution's route is not an HBONE tunnel")]
    NotHbone,
    #[error("the resolution has no source workload")]
    NoSourceWorkload,
    #[error("the resolution has no destination workload")]
    NoDestinationWorkload,
    #[error("upstream {0} is not an address of the destination workload")]
    UpstreamNotDestination(SocketAddr),
    #[error("workload identity is not a SPIFFE id: {0}")]
    Identity(#[from] IdentityError),
}

impl OutboundError {
    /// Metrics label.
    pub fn label(&self) -> &'static str {
        match self {
            OutboundError::NotHbone => "not_hbone",
            OutboundError::NoSourceWorkload => "no_source_workload",
            OutboundError::NoDestinationWorkload => "no_destination_workload",
            OutboundError::UpstreamNotDestination(_) => "upstream_not_destination",
            OutboundError::Identity(_) => "invalid_identity",
        }
    }
}

/// Builds the outbound CONNECT for a resolution routed through an HBONE tunnel. `client` is
/// the captured connection's peer address (the application's ip:port), sent as `forwarded`.
pub fn outbound_connect(
    registry: &Registry,
    resolution: &Resolution,
    client: SocketAddr,
) -> Result<OutboundConnect, OutboundError> {
    let Route::HboneTunnel { peer } = resolution.route else {
        return Err(OutboundError::NotHbone);
    };
    let source = resolution.source.ok_or(OutboundError::NoSourceWorkload)?;
    let destination = resolution
        .destination_workload()
        .ok_or(OutboundError::NoDestinationWorkload)?;
    let dst = registry.workload(destination);
    let upstream = canonical_addr(resolution.upstream);
    if !dst
        .workload
        .ips
        .iter()
        .any(|ip| canonical(*ip) == upstream.ip())
    {
        return Err(OutboundError::UpstreamNotDestination(resolution.upstream));
    }
    let mut request = ConnectRequest::new(upstream);
    request.forwarded = Some(forwarded_for(client));
    Ok(OutboundConnect {
        request,
        peer,
        source_identity: SpiffeId::parse(&registry.workload(source).identity)?,
        expected_identity: SpiffeId::parse(&dst.identity)?,
        destination,
    })
}

/// `for="<ip>:<port>"` per RFC 7239 §4 and §6: the value is quoted (it contains `:`), and an
/// IPv6 address is bracketed. An IPv4-mapped IPv6 address is written as the IPv4 address.
pub fn forwarded_for(client: SocketAddr) -> String {
    match canonical(client.ip()) {
        IpAddr::V4(ip) => format!("for=\"{ip}:{}\"", client.port()),
        // Ipv6Addr's Display has no zone index, which RFC 7239's node syntax cannot carry.
        IpAddr::V6(ip) => format!("for=\"[{ip}]:{}\"", client.port()),
    }
}

fn canonical_addr(addr: SocketAddr) -> SocketAddr {
    SocketAddr::new(canonical(addr.ip()), addr.port())
}

/// Why an inbound CONNECT is not delivered. Each has the status to answer and a label.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RejectReason {
    /// Not a valid HBONE CONNECT (RFC 9113 §8.1.1 malformed, or authority not `ip:port`).
    MalformedRequest,
    /// The request's header list is larger than we accept.
    HeaderListTooLarge,
    /// The authority's IP is no workload the registry knows.
    UnknownAuthority,
    /// The authority's IP is a workload served by another node.
    NotLocalWorkload,
    /// The authority's IP is a local workload, but not the one the tunnel arrived at.
    NotArrivalAddress,
    /// The authority's port is one of ringtun's own: delivering would loop into the proxy.
    OwnPort,
    /// Authorization denied the connection (reserved for the authorization issue).
    Unauthorized,
    /// The upstream connect failed (decided by the caller after an `Accept`).
    UpstreamUnreachable,
    /// `forwarded` names an address of a workload with another identity than the tunnel
    /// peer's: a client may not claim another workload's address.
    ForgedClientAddress,
}

impl RejectReason {
    pub const ALL: [RejectReason; 9] = [
        RejectReason::MalformedRequest,
        RejectReason::HeaderListTooLarge,
        RejectReason::UnknownAuthority,
        RejectReason::NotLocalWorkload,
        RejectReason::NotArrivalAddress,
        RejectReason::OwnPort,
        RejectReason::Unauthorized,
        RejectReason::UpstreamUnreachable,
        RejectReason::ForgedClientAddress,
    ];
    pub const COUNT: usize = Self::ALL.len();

    /// Its slot in per-reason counters.
    pub fn index(self) -> usize {
        self as usize
    }

    /// The HTTP status answered on the stream.
    pub fn status(self) -> u16 {
        match self {
            RejectReason::HeaderListTooLarge => 431,
            RejectReason::Unauthorized => 401,
            RejectReason::UpstreamUnreachable => 503,
            RejectReason::MalformedRequest
            | RejectReason::UnknownAuthority
            | RejectReason::NotLocalWorkload
            | RejectReason::NotArrivalAddress
            | RejectReason::OwnPort
            | RejectReason::ForgedClientAddress => 400,
        }
    }

    /// Metrics label.
    pub fn label(self) -> &'static str {
        match self {
            RejectReason::MalformedRequest => "malformed_request",
            RejectReason::HeaderListTooLarge => "header_list_too_large",
            RejectReason::UnknownAuthority => "unknown_authority",
            RejectReason::NotLocalWorkload => "not_local_workload",
            RejectReason::NotArrivalAddress => "authority_not_arrival_address",
            RejectReason::OwnPort => "own_port",
            RejectReason::Unauthorized => "unauthorized",
            RejectReason::UpstreamUnreachable => "upstream_unreachable",
            RejectReason::ForgedClientAddress => "forged_client_address",
        }
    }

    /// The reason for a request the CONNECT parser refused.
    pub fn from_request_error(error: &RequestError) -> RejectReason {
        match error {
            RequestError::HeaderListTooLarge { .. } => RejectReason::HeaderListTooLarge,
            _ => RejectReason::MalformedRequest,
        }
    }
}

/// The client address of an inbound CONNECT: what its stream is delivered from (where the
/// workload delivers client addresses) and what authorization's source IP blocks judge.
///
/// The address `forwarded` names (its last `for=`, the nearest proxy's view, as ztunnel reads
/// it) when that is the tunnel's own peer address or an address of a workload whose identity
/// is the peer's proven identity; otherwise the tunnel's peer address — what the network says
/// — when the named address is no workload's, or no address is named. Naming an address of a
/// workload with another identity is refused: a client may not claim another workload's
/// address.
pub fn client_address(
    registry: &Registry,
    request: &ConnectRequest,
    peer: SocketAddr,
    peer_identity: Option<&SpiffeId>,
) -> Result<IpAddr, RejectReason> {
    let peer_ip = canonical(peer.ip());
    let Some(claimed) = request.forwarded.as_deref().and_then(forwarded_for_ip) else {
        return Ok(peer_ip);
    };
    if claimed == peer_ip {
        return Ok(claimed);
    }
    let Some(owner) = registry.workload_by_ip(claimed) else {
        return Ok(peer_ip);
    };
    match peer_identity {
        Some(id) if registry.workload(owner).identity == id.to_uri() => Ok(claimed),
        _ => Err(RejectReason::ForgedClientAddress),
    }
}

/// The IP of the last `for=` parameter of a `forwarded` value (RFC 7239: elements separated
/// by `,`, pairs by `;`; a node is `ip`, `ip:port`, `"[v6]"` or `"[v6]:port"`, quoted or not).
/// `None` when there is none or it is not an IP (`unknown`, an obfuscated `_name`).
pub fn forwarded_for_ip(value: &str) -> Option<IpAddr> {
    let node = value
        .split(',')
        .flat_map(|element| element.split(';'))
        .filter_map(|pair| {
            let (key, v) = pair.trim().split_once('=')?;
            key.trim().eq_ignore_ascii_case("for").then_some(v.trim())
        })
        .next_back()?;
    let node = node.trim_matches('"');
    let ip = if let Some(rest) = node.strip_prefix('[') {
        rest.split_once(']')?.0.parse().ok()?
    } else if let Ok(ip) = node.parse::<IpAddr>() {
        ip
    } else {
        node.parse::<SocketAddr>().ok()?.ip()
    };
    Some(canonical(ip))
}

/// The verdict on one inbound CONNECT.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum InboundDecision {
    /// Connect `upstream` in `workload`'s namespace; answer 200 once it succeeds (or
    /// [`RejectReason::UpstreamUnreachable`]'s 503 if it fails).
    Accept {
        workload: WorkloadId,
        upstream: SocketAddr,
    },
    /// Answer `status` and end the stream.
    Reject { status: u16, reason: RejectReason },
}

impl InboundDecision {
    pub fn reject(reason: RejectReason) -> InboundDecision {
        InboundDecision::Reject {
            status: reason.status(),
            reason,
        }
    }
}

/// The inbound checks, with ringtun's own ports fixed at start-up.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InboundRules {
    own_ports: Vec<u16>,
}

impl InboundRules {
    /// Own ports: the capture ports (15001, 15006, 15008 by default) and the admin, metrics
    /// and readiness ports when those endpoints are on.
    pub fn new(node: &NodeConfig) -> InboundRules {
        let mut own_ports: Vec<u16> = node.ports.all().to_vec();
        own_ports.extend(
            [node.admin_addr, node.metrics_addr, node.readiness_addr]
                .into_iter()
                .flatten()
                .map(|a| a.port()),
        );
        own_ports.sort_unstable();
        own_ports.dedup();
        InboundRules { own_ports }
    }

    pub fn own_ports(&self) -> &[u16] {
        &self.own_ports
    }

    /// Decides a parsed CONNECT that arrived on a tunnel whose connection's local address is
    /// `local`. Only the request's authority is read; its telemetry headers are ignored.
    pub fn check(
        &self,
        registry: &Registry,
        request: &ConnectRequest,
        local: SocketAddr,
    ) -> InboundDecision {
        let authority = canonical_addr(request.authority);
        if authority.port() == 0 {
            return InboundDecision::reject(RejectReason::MalformedRequest);
        }
        let Some(workload) = registry.workload_by_ip(authority.ip()) else {
            return InboundDecision::reject(RejectReason::UnknownAuthority);
        };
        if !registry.workload(workload).local {
            return InboundDecision::reject(RejectReason::NotLocalWorkload);
        }
        if authority.ip() != canonical(local.ip()) {
            return InboundDecision::reject(RejectReason::NotArrivalAddress);
        }
        if self.own_ports.contains(&authority.port()) {
            return InboundDecision::reject(RejectReason::OwnPort);
        }
        InboundDecision::Accept {
            workload,
            upstream: authority,
        }
    }

    /// Decides a CONNECT from its decoded header list: parsed by
    /// [`ConnectRequest::from_fields`] (malformed → 400), then [`InboundRules::check`].
    pub fn check_fields(
        &self,
        registry: &Registry,
        fields: &[Field],
        local: SocketAddr,
    ) -> InboundDecision {
        match ConnectRequest::from_fields(fields) {
            Ok(request) => self.check(registry, &request, local),
            Err(error) => InboundDecision::reject(RejectReason::from_request_error(&error)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::control_plane::config::{Config, Protocol, Service, ServicePort, WorkloadRef};
    use crate::data_plane::first_connection::tests::{node, workload};
    use crate::data_plane::first_connection::{resolve, Accepted, Direction, EndpointPicker};

    /// Two nodes' view of one mesh: `client` and `server`/`server-2` on node-a, `remote` on
    /// node-b behind the service VIP 10.96.0.10:80 → 8080.
    fn config(this_node: &str) -> Config {
        let mut n = node();
        n.name = this_node.into();
        n.admin_addr = Some(addr("127.0.0.1:15000"));
        n.metrics_addr = Some(addr("0.0.0.0:15020"));
        n.readiness_addr = Some(addr("0.0.0.0:15021"));
        Config {
            node: n,
            workloads: vec![
                workload("client", &["10.1.0.2", "fd00::2"], "node-a", Protocol::Tcp),
                workload(
                    "server",
                    &["10.1.0.11", "fd00::11"],
                    "node-a",
                    Protocol::Hbone,
                ),
                workload("server-2", &["10.1.0.12"], "node-a", Protocol::Hbone),
                workload(
                    "remote",
                    &["10.1.0.20", "fd00::20"],
                    "node-b",
                    Protocol::Hbone,
                ),
                workload("plain", &["10.1.0.30"], "node-b", Protocol::Tcp),
            ],
            services: vec![Service {
                name: "echo".into(),
                namespace: "default".into(),
                vips: vec!["10.96.0.10".parse().unwrap()],
                ports: vec![ServicePort {
                    port: 80,
                    target_port: 8080,
                }],
                endpoints: vec![WorkloadRef {
                    namespace: "default".into(),
                    name: "remote".into(),
                }],
            }],
            policies: Vec::new(),
        }
    }

    fn addr(s: &str) -> SocketAddr {
        s.parse().unwrap()
    }

    fn resolve_outbound(cfg: &Config, reg: &Registry, client: &str, dst: &str) -> Resolution {
        let accepted = Accepted {
            direction: Direction::Outbound,
            listener_workload: WorkloadId(0),
            peer: addr(client),
            original_dst: addr(dst),
        };
        resolve(
            reg,
            &cfg.node.ports,
            &accepted,
            &mut EndpointPicker::default(),
        )
    }

    fn id(sa: &str) -> SpiffeId {
        SpiffeId::new("cluster.local", "default", sa).unwrap()
    }

    fn connect(authority: &str) -> ConnectRequest {
        ConnectRequest::new(addr(authority))
    }

    fn rejected(reason: RejectReason) -> InboundDecision {
        InboundDecision::reject(reason)
    }

    // ---- outbound ----

    #[test]
    fn outbound_connect_to_a_workload_ip_names_endpoint_peer_and_identities() {
        let cfg = config("node-a");
        let reg = Registry::new(&cfg);
        let res = resolve_outbound(&cfg, &reg, "10.1.0.2:40000", "10.1.0.20:9000");
        let out = outbound_connect(&reg, &res, addr("10.1.0.2:40000")).unwrap();
        assert_eq!(out.request.authority, addr("10.1.0.20:9000"));
        assert_eq!(
            out.request.forwarded.as_deref(),
            Some("for=\"10.1.0.2:40000\"")
        );
        assert_eq!(out.request.baggage, None);
        assert_eq!(out.peer, addr("10.1.0.20:15008"));
        assert_eq!(out.source_identity, id("client"));
        assert_eq!(out.expected_identity, id("remote"));
        assert_eq!(out.destination, WorkloadId(3));
    }

    #[test]
    fn outbound_connect_to_a_service_vip_carries_the_endpoint_not_the_vip() {
        let cfg = config("node-a");
        let reg = Registry::new(&cfg);
        let res = resolve_outbound(&cfg, &reg, "10.1.0.2:40000", "10.96.0.10:80");
        let out = outbound_connect(&reg, &res, addr("10.1.0.2:40000")).unwrap();
        assert_eq!(out.request.authority, addr("10.1.0.20:8080"));
        assert_eq!(out.peer, addr("10.1.0.20:15008"));
        assert_eq!(out.expected_identity, id("remote"));
    }

    #[test]
    fn forwarded_for_reads_the_last_node_in_every_form() {
        let ip = |s: &str| s.parse::<IpAddr>().ok();
        assert_eq!(forwarded_for_ip("for=\"10.1.0.2:5000\""), ip("10.1.0.2"));
        assert_eq!(forwarded_for_ip("for=10.1.0.2"), ip("10.1.0.2"));
        assert_eq!(forwarded_for_ip("For=\"[fd00::2]:5000\""), ip("fd00::2"));
        assert_eq!(forwarded_for_ip("for=\"[fd00::2]\""), ip("fd00::2"));
        assert_eq!(
            forwarded_for_ip("for=10.0.0.1;proto=http, for=\"10.1.0.2:1\";by=x"),
            ip("10.1.0.2")
        );
        assert_eq!(
            forwarded_for_ip("for=\"[::ffff:10.1.0.2]:1\""),
            ip("10.1.0.2")
        );
        for junk in [
            "",
            "for=unknown",
            "for=_hidden",
            "by=10.0.0.1",
            "for=\"[fd00::2\"",
            "for",
        ] {
            assert_eq!(forwarded_for_ip(junk), None, "{junk:?}");
        }
        // What the outbound side writes reads back as the client.
        for client in ["10.1.0.2:5000", "[fd00::2]:5000"] {
            assert_eq!(
                forwarded_for_ip(&forwarded_for(addr(client))),
                Some(addr(client).ip())
            );
        }
    }

    #[test]
    fn a_client_may_claim_only_an_address_of_its_own_identity() {
        let cfg = config("node-a");
        let reg = Registry::new(&cfg);
        let tunnel_peer = addr("10.1.0.20:40000");
        let with = |forwarded: Option<&str>, identity: &str| {
            let mut r = connect("10.1.0.11:8080");
            r.forwarded = forwarded.map(str::to_string);
            client_address(&reg, &r, tunnel_peer, Some(&id(identity)))
        };
        let ip = |s: &str| s.parse::<IpAddr>().unwrap();
        // No claim, or one that names no workload: the tunnel's peer address.
        assert_eq!(with(None, "remote"), Ok(ip("10.1.0.20")));
        assert_eq!(with(Some("for=unknown"), "remote"), Ok(ip("10.1.0.20")));
        assert_eq!(
            with(Some("for=\"192.0.2.4:1\""), "remote"),
            Ok(ip("10.1.0.20"))
        );
        // Its own addresses (either family), or the peer address itself.
        assert_eq!(
            with(Some("for=\"10.1.0.20:1\""), "client"),
            Ok(ip("10.1.0.20"))
        );
        assert_eq!(
            with(Some("for=\"[fd00::20]:1\""), "remote"),
            Ok(ip("fd00::20"))
        );
        assert_eq!(
            with(Some("for=\"10.1.0.2:5\""), "client"),
            Ok(ip("10.1.0.2"))
        );
        // Another identity's workload: refused.
        assert_eq!(
            with(Some("for=\"10.1.0.2:5\""), "remote"),
            Err(RejectReason::ForgedClientAddress)
        );
        let mut r = connect("10.1.0.11:8080");
        r.forwarded = Some("for=\"10.1.0.2:5\"".into());
        assert_eq!(
            client_address(&reg, &r, tunnel_peer, None),
            Err(RejectReason::ForgedClientAddress),
            "without a proven identity no workload's address can be claimed"
        );
        assert_eq!(RejectReason::ForgedClientAddress.status(), 400);
    }

    #[test]
    fn outbound_ipv6_authority_and_forwarded_are_bracketed() {
        let cfg = config("node-a");
        let reg = Registry::new(&cfg);
        let res = resolve_outbound(&cfg, &reg, "[fd00::2]:40000", "[fd00::20]:9000");
        let out = outbound_connect(&reg, &res, addr("[fd00::2]:40000")).unwrap();
        assert_eq!(
            out.request.forwarded.as_deref(),
            Some("for=\"[fd00::2]:40000\"")
        );
        let fields = out.request.to_fields();
        assert_eq!(fields[1].name, b":authority");
        assert_eq!(fields[1].value, b"[fd00::20]:9000");
        assert_eq!(out.peer, addr("[fd00::20]:15008"));
    }

    #[test]
    fn forwarded_writes_ipv4_mapped_clients_as_ipv4_and_drops_zone_ids() {
        assert_eq!(
            forwarded_for(addr("[::ffff:10.1.0.2]:5000")),
            "for=\"10.1.0.2:5000\""
        );
        assert_eq!(
            forwarded_for(addr("[fe80::1%2]:5000")),
            "for=\"[fe80::1]:5000\""
        );
    }

    #[test]
    fn outbound_connect_refuses_routes_that_are_not_tunnels() {
        let cfg = config("node-a");
        let reg = Registry::new(&cfg);
        for dst in ["10.1.0.30:80", "192.0.2.7:443", "127.0.0.1:15001"] {
            let res = resolve_outbound(&cfg, &reg, "10.1.0.2:40000", dst);
            assert_eq!(
                outbound_connect(&reg, &res, addr("10.1.0.2:40000")),
                Err(OutboundError::NotHbone),
                "{dst}"
            );
        }
    }

    #[test]
    fn outbound_connect_refuses_an_upstream_outside_the_destination_workload() {
        let cfg = config("node-a");
        let reg = Registry::new(&cfg);
        let mut res = resolve_outbound(&cfg, &reg, "10.1.0.2:40000", "10.1.0.20:9000");
        res.upstream = addr("10.96.0.10:80");
        let err = outbound_connect(&reg, &res, addr("10.1.0.2:40000")).unwrap_err();
        assert_eq!(err, OutboundError::UpstreamNotDestination(res.upstream));
        assert_eq!(err.label(), "upstream_not_destination");
    }

    #[test]
    fn connections_between_the_same_workloads_share_a_pool_key() {
        let cfg = config("node-a");
        let reg = Registry::new(&cfg);
        let key = |client: &str, dst: &str| {
            let res = resolve_outbound(&cfg, &reg, client, dst);
            outbound_connect(&reg, &res, addr(client))
                .unwrap()
                .pool_key()
        };
        let a = key("10.1.0.2:40000", "10.1.0.20:9000");
        assert_eq!(a, key("10.1.0.2:40001", "10.1.0.20:7000"));
        assert_eq!(a, key("10.1.0.2:40002", "10.96.0.10:80"));
        assert_eq!(a.peer, addr("10.1.0.20:15008"));
        assert_ne!(a, key("[fd00::2]:40000", "[fd00::20]:9000"), "other peer");
    }

    #[test]
    fn outbound_request_from_node_a_is_accepted_by_node_b() {
        let cfg_a = config("node-a");
        let reg_a = Registry::new(&cfg_a);
        let res = resolve_outbound(&cfg_a, &reg_a, "10.1.0.2:40000", "10.96.0.10:80");
        let out = outbound_connect(&reg_a, &res, addr("10.1.0.2:40000")).unwrap();
        let cfg_b = config("node-b");
        let reg_b = Registry::new(&cfg_b);
        let rules = InboundRules::new(&cfg_b.node);
        assert_eq!(
            rules.check_fields(&reg_b, &out.request.to_fields(), out.peer),
            InboundDecision::Accept {
                workload: WorkloadId(3),
                upstream: addr("10.1.0.20:8080"),
            }
        );
    }

    // ---- inbound ----

    fn inbound() -> (Registry, InboundRules) {
        let cfg = config("node-a");
        (Registry::new(&cfg), InboundRules::new(&cfg.node))
    }

    #[test]
    fn connect_to_the_local_workload_it_arrived_at_is_accepted() {
        let (reg, rules) = inbound();
        assert_eq!(
            rules.check(&reg, &connect("10.1.0.11:8080"), addr("10.1.0.11:15008")),
            InboundDecision::Accept {
                workload: WorkloadId(1),
                upstream: addr("10.1.0.11:8080"),
            }
        );
        assert_eq!(
            rules.check(&reg, &connect("[fd00::11]:8080"), addr("[fd00::11]:15008")),
            InboundDecision::Accept {
                workload: WorkloadId(1),
                upstream: addr("[fd00::11]:8080"),
            }
        );
    }

    #[test]
    fn ipv4_mapped_addresses_compare_as_ipv4() {
        let (reg, rules) = inbound();
        let want = InboundDecision::Accept {
            workload: WorkloadId(1),
            upstream: addr("10.1.0.11:8080"),
        };
        assert_eq!(
            rules.check(
                &reg,
                &connect("10.1.0.11:8080"),
                addr("[::ffff:10.1.0.11]:15008")
            ),
            want
        );
        assert_eq!(
            rules.check(
                &reg,
                &connect("[::ffff:10.1.0.11]:8080"),
                addr("10.1.0.11:15008")
            ),
            want
        );
    }

    #[test]
    fn unknown_authority_is_answered_400() {
        let (reg, rules) = inbound();
        let d = rules.check(&reg, &connect("192.0.2.9:80"), addr("10.1.0.11:15008"));
        assert_eq!(d, rejected(RejectReason::UnknownAuthority));
        assert!(matches!(
            d,
            InboundDecision::Reject {
                status: 400,
                reason
            } if reason.label() == "unknown_authority"
        ));
    }

    #[test]
    fn workload_on_another_node_is_answered_400() {
        let (reg, rules) = inbound();
        assert_eq!(
            rules.check(&reg, &connect("10.1.0.20:8080"), addr("10.1.0.20:15008")),
            rejected(RejectReason::NotLocalWorkload)
        );
    }

    #[test]
    fn local_workload_other_than_the_arrival_address_is_answered_400() {
        let (reg, rules) = inbound();
        // A tunnel that reached server (10.1.0.11) cannot be used to reach server-2.
        let d = rules.check(&reg, &connect("10.1.0.12:8080"), addr("10.1.0.11:15008"));
        assert_eq!(d, rejected(RejectReason::NotArrivalAddress));
        // Same workload, other family than it arrived on: still not the arrival address.
        assert_eq!(
            rules.check(&reg, &connect("[fd00::11]:8080"), addr("10.1.0.11:15008")),
            rejected(RejectReason::NotArrivalAddress)
        );
    }

    #[test]
    fn ringtun_own_ports_are_refused_as_loops() {
        let (reg, rules) = inbound();
        assert_eq!(
            rules.own_ports(),
            &[15000, 15001, 15006, 15008, 15020, 15021]
        );
        for port in [15001, 15006, 15008, 15000, 15020, 15021] {
            let authority = SocketAddr::new("10.1.0.11".parse().unwrap(), port);
            assert_eq!(
                rules.check(
                    &reg,
                    &ConnectRequest::new(authority),
                    addr("10.1.0.11:15008")
                ),
                rejected(RejectReason::OwnPort),
                "{port}"
            );
        }
    }

    #[test]
    fn disabled_endpoints_do_not_reserve_their_ports() {
        let mut cfg = config("node-a");
        cfg.node.metrics_addr = None;
        cfg.node.readiness_addr = None;
        cfg.node.admin_addr = None;
        let rules = InboundRules::new(&cfg.node);
        assert_eq!(rules.own_ports(), &[15001, 15006, 15008]);
        let reg = Registry::new(&cfg);
        assert!(matches!(
            rules.check(&reg, &connect("10.1.0.11:15020"), addr("10.1.0.11:15008")),
            InboundDecision::Accept { .. }
        ));
    }

    #[test]
    fn malformed_requests_are_answered_400_and_oversized_ones_431() {
        let (reg, rules) = inbound();
        let local = addr("10.1.0.11:15008");
        for fields in [
            vec![
                Field::new(":method", "CONNECT"),
                Field::new(":authority", "server.default.svc:8080"),
            ],
            vec![
                Field::new(":method", "GET"),
                Field::new(":authority", "10.1.0.11:8080"),
            ],
            vec![Field::new(":method", "CONNECT")],
            vec![
                Field::new(":method", "CONNECT"),
                Field::new(":authority", "10.1.0.11"),
            ],
            vec![
                Field::new(":method", "CONNECT"),
                Field::new(":authority", "10.1.0.11:8080"),
                Field::new(":path", "/"),
            ],
        ] {
            assert_eq!(
                rules.check_fields(&reg, &fields, local),
                rejected(RejectReason::MalformedRequest),
                "{fields:?}"
            );
        }
        let too_large = RequestError::HeaderListTooLarge {
            size: 70_000,
            limit: 65_536,
        };
        let reason = RejectReason::from_request_error(&too_large);
        assert_eq!(
            (reason.status(), reason.label()),
            (431, "header_list_too_large")
        );
    }

    #[test]
    fn port_zero_authority_is_malformed() {
        let (reg, rules) = inbound();
        assert_eq!(
            rules.check(&reg, &connect("10.1.0.11:0"), addr("10.1.0.11:15008")),
            rejected(RejectReason::MalformedRequest)
        );
    }

    #[test]
    fn identity_looking_headers_change_no_decision() {
        let (reg, rules) = inbound();
        let spoof = [
            Field::new(
                "forwarded",
                "for=\"10.1.0.12:1\";by=spiffe://cluster.local/ns/kube-system/sa/admin",
            ),
            Field::new(
                "baggage",
                "k8s.identity=spiffe://cluster.local/ns/kube-system/sa/admin",
            ),
            Field::new(
                "traceparent",
                "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01",
            ),
            Field::new(
                "x-spiffe-id",
                "spiffe://cluster.local/ns/default/sa/server-2",
            ),
            Field::new(
                "x-forwarded-client-cert",
                "URI=spiffe://cluster.local/ns/default/sa/server-2",
            ),
        ];
        for (authority, local) in [
            ("10.1.0.11:8080", "10.1.0.11:15008"),
            ("10.1.0.12:8080", "10.1.0.11:15008"),
            ("10.1.0.20:8080", "10.1.0.20:15008"),
            ("192.0.2.1:80", "10.1.0.11:15008"),
            ("10.1.0.11:15008", "10.1.0.11:15008"),
        ] {
            let plain = vec![
                Field::new(":method", "CONNECT"),
                Field::new(":authority", authority),
            ];
            let mut spoofed = plain.clone();
            spoofed.extend(spoof.iter().cloned());
            let local = addr(local);
            assert_eq!(
                rules.check_fields(&reg, &spoofed, local),
                rules.check_fields(&reg, &plain, local),
                "{authority} via {local}"
            );
        }
    }

    #[test]
    fn each_reason_has_its_status_and_a_distinct_label() {
        let all = RejectReason::ALL;
        let statuses: Vec<u16> = all.iter().map(|r| r.status()).collect();
        assert_eq!(statuses, [400, 431, 400, 400, 400, 400, 401, 503, 400]);
        for (i, r) in all.iter().enumerate() {
            assert_eq!(r.index(), i, "{r:?} is in its own slot");
        }
        let mut labels: Vec<&str> = all.iter().map(|r| r.label()).collect();
        labels.sort_unstable();
        labels.dedup();
        assert_eq!(labels.len(), all.len());
    }
}
