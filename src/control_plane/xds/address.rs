//! `istio.workload.Address` → ringtun's view of a mesh workload or service ([`Address`]).
//!
//! Two kinds of "cannot" are kept apart:
//!
//! * A resource ringtun cannot **read** as Istio defines it (an address of 5 bytes, a port above
//!   65535, a service key without its namespace, an enum value it does not know, a name that
//!   is not the resource's own key) is rejected alone, with `<path>: <why>` for the NACK and the
//!   log ([`Rejected`]).
//! * A resource it reads but whose routing it does not **build** (a waypoint, a workload on
//!   another network behind a gateway, Istio's sidecar mTLS, a workload known only by hostname,
//!   locality-strict load balancing) is accepted, because leaving it out would make its
//!   addresses look like "outside the mesh" and send traffic straight to them, around the
//!   mesh's intent. It carries what it needs instead, and [`Workload::refusal`] /
//!   [`Service::refusal`] say why a connection to it is refused.
//!
//! Defaults are ztunnel's: trust domain `cluster.local`, service account `default`,
//! capacity 1, the empty network name for the default network.

use std::fmt;
use std::net::IpAddr;
use std::sync::Arc;

use istio_api::istio::workload as xds;
use istio_api::istio::workload::{address, gateway_address, load_balancing};
use istio_api::prost_types::Any;

use super::{check_name, decode_resource, ip_from_bytes};
use crate::control_plane::config::Protocol;
use crate::control_plane::policy::IpBlock;

/// One pushed address resource, converted.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Address {
    Workload(Arc<Workload>),
    Service(Arc<Service>),
}

impl Address {
    /// The resource name istiod gives it: a workload's uid, a service's `namespace/hostname`.
    pub fn key(&self) -> &str {
        match self {
            Address::Workload(w) => &w.uid,
            Address::Service(s) => &s.key,
        }
    }
}

/// An address resource ringtun will not apply, with `<path>: <why>` for the NACK.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rejected {
    pub reason: String,
}

impl fmt::Display for Rejected {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.reason)
    }
}

/// What ringtun does not build and so refuses to route to, rather than route around. The
/// `label` is the metric label and the `Display` form the log's reason.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Unsupported {
    /// Traffic to it must pass a waypoint (L7 policy, routing) first.
    Waypoint,
    /// It is on another network and reached through that network's gateway.
    NetworkGateway { network: String },
    /// It expects Istio's sidecar mTLS, not HBONE.
    LegacyIstioMtls,
    /// Known only by a DNS hostname (a ServiceEntry endpoint), no address.
    HostnameOnly,
    /// Its inbound traffic must be wrapped (PROXY protocol) for a sandwiched waypoint.
    ApplicationTunnel,
    /// Endpoints must be filtered by locality (`load_balancing` STRICT with scopes).
    StrictLocality,
}

impl Unsupported {
    pub fn label(&self) -> &'static str {
        match self {
            Unsupported::Waypoint => "waypoint",
            Unsupported::NetworkGateway { .. } => "network_gateway",
            Unsupported::LegacyIstioMtls => "legacy_istio_mtls",
            Unsupported::HostnameOnly => "hostname_only",
            Unsupported::ApplicationTunnel => "application_tunnel",
            Unsupported::StrictLocality => "strict_locality",
        }
    }
}

impl fmt::Display for Unsupported {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Unsupported::Waypoint => f.write_str("its traffic must pass a waypoint (not built)"),
            Unsupported::NetworkGateway { network } => write!(
                f,
                "it is on network {network:?}, reached through a network gateway (not built)"
            ),
            Unsupported::LegacyIstioMtls => {
                f.write_str("it expects Istio's sidecar mTLS (LEGACY_ISTIO_MTLS, not built)")
            }
            Unsupported::HostnameOnly => {
                f.write_str("it has a hostname and no address (DNS resolution not built)")
            }
            Unsupported::ApplicationTunnel => {
                f.write_str("it expects PROXY-protocol application tunnels (not built)")
            }
            Unsupported::StrictLocality => {
                f.write_str("its endpoints are chosen by locality, strictly (not built)")
            }
        }
    }
}

/// A waypoint or network gateway: where traffic would have to go instead.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Gateway {
    Hostname {
        namespace: String,
        hostname: String,
        hbone_port: u16,
    },
    Address {
        network: String,
        ip: IpAddr,
        hbone_port: u16,
    },
}

/// A mesh workload as istiod describes it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Workload {
    /// The resource name (pods: `<cluster>//Pod/<namespace>/<name>`).
    pub uid: String,
    pub name: String,
    pub namespace: String,
    pub service_account: String,
    pub trust_domain: String,
    pub ips: Vec<IpAddr>,
    pub hostname: String,
    /// "" is the default network.
    pub network: String,
    pub tunnel: TunnelProtocol,
    /// The Kubernetes node it runs on: local when it is this node's name.
    pub node: String,
    pub healthy: bool,
    /// A host-network pod shares the node's address: never looked up by IP.
    pub host_network: bool,
    /// Services it is an endpoint of, by key (`namespace/hostname`, ascending), each with its
    /// port map. A sorted list, not a map: most workloads name one service, and a map's node
    /// cost 500 bytes a workload at 100,000 workloads (benches/xds_push.rs).
    pub services: Vec<ServicePorts>,
    /// `namespace/name` of the selector-scoped policies that apply to it.
    pub policies: Vec<String>,
    /// Weight in a random endpoint choice.
    pub capacity: u32,
    pub cluster_id: String,
    pub locality: Locality,
    pub waypoint: Option<Gateway>,
    pub network_gateway: Option<Gateway>,
    pub application_tunnel: bool,
}

/// How a workload expects to be reached.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TunnelProtocol {
    /// Plain TCP.
    None,
    Hbone,
    /// Istio's sidecar mTLS: [`Workload::refusal`] refuses it.
    LegacyIstioMtls,
}

/// A service a workload is an endpoint of, and its port map for it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServicePorts {
    pub service: String,
    pub ports: Vec<PortMap>,
}

/// An endpoint's port map for one service: `service_port` → `target_port` (0: the service's).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PortMap {
    pub service_port: u16,
    pub target_port: u16,
}

#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Locality {
    pub region: String,
    pub zone: String,
    pub subzone: String,
}

impl Workload {
    /// How ringtun reaches it; `None` for a protocol it does not speak.
    pub fn protocol(&self) -> Option<Protocol> {
        match self.tunnel {
            TunnelProtocol::None => Some(Protocol::Tcp),
            TunnelProtocol::Hbone => Some(Protocol::Hbone),
            TunnelProtocol::LegacyIstioMtls => None,
        }
    }

    /// Its port map for a service, if it is one of its endpoints.
    pub fn ports_for(&self, service: &str) -> Option<&[PortMap]> {
        self.services
            .binary_search_by(|s| s.service.as_str().cmp(service))
            .ok()
            .map(|i| self.services[i].ports.as_slice())
    }

    /// `spiffe://<trust domain>/ns/<namespace>/sa/<service account>`.
    pub fn identity(&self) -> String {
        format!(
            "spiffe://{}/ns/{}/sa/{}",
            self.trust_domain, self.namespace, self.service_account
        )
    }

    /// Why a connection to this workload is refused by a node on `local_network`, if it is.
    /// A network gateway on a workload of this node's own network is only how other networks
    /// reach it, and is no reason.
    pub fn refusal(&self, local_network: &str) -> Option<Unsupported> {
        if self.waypoint.is_some() {
            Some(Unsupported::Waypoint)
        } else if self.network != local_network {
            Some(Unsupported::NetworkGateway {
                network: self.network.clone(),
            })
        } else if self.tunnel == TunnelProtocol::LegacyIstioMtls {
            Some(Unsupported::LegacyIstioMtls)
        } else if self.ips.is_empty() && !self.hostname.is_empty() {
            Some(Unsupported::HostnameOnly)
        } else if self.application_tunnel {
            Some(Unsupported::ApplicationTunnel)
        } else {
            None
        }
    }
}

/// A mesh service as istiod describes it. Its endpoints are the workloads that name it in
/// their `services`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Service {
    /// `namespace/hostname`: the resource name, and the key workloads use.
    pub key: String,
    pub name: String,
    pub namespace: String,
    pub hostname: String,
    /// VIPs, each on its network; `prefix` below the address's width is a CIDR VIP. Empty:
    /// headless.
    pub vips: Vec<Vip>,
    pub ports: Vec<ServicePort>,
    /// More identities a server of this service may prove.
    pub subject_alt_names: Vec<String>,
    pub load_balancing: LoadBalancing,
    /// Visible only to clients of its own namespace.
    pub namespace_only: bool,
    pub waypoint: Option<Gateway>,
    pub weighted_waypoints: usize,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Vip {
    pub network: String,
    pub block: IpBlock,
}

/// `port` → `target_port`; `None`: each endpoint's own port map decides.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ServicePort {
    pub port: u16,
    pub target_port: Option<u16>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum BalancingMode {
    /// Weighted random over healthy endpoints (and locality preference ringtun ignores,
    /// which only orders, never excludes).
    #[default]
    Standard,
    /// Endpoints outside the client's locality are excluded.
    Strict,
    /// Connect to the original destination, no endpoint choice.
    Passthrough,
}

#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct LoadBalancing {
    pub mode: BalancingMode,
    /// Unhealthy endpoints may be chosen too.
    pub allow_unhealthy: bool,
    /// The locality scopes, as the enum's names (`REGION`, `ZONE`, ...).
    pub scopes: Vec<&'static str>,
}

impl Service {
    /// Why a connection to this service is refused, if it is.
    pub fn refusal(&self) -> Option<Unsupported> {
        if self.waypoint.is_some() || self.weighted_waypoints > 0 {
            Some(Unsupported::Waypoint)
        } else if self.load_balancing.mode == BalancingMode::Strict
            && !self.load_balancing.scopes.is_empty()
        {
            Some(Unsupported::StrictLocality)
        } else {
            None
        }
    }
}

/// Decodes and converts one resource of a push, checking it is what its name says.
///
/// # Errors
/// [`Rejected`] when the bytes do not decode, the type URL is not the Address type, the name is
/// not the resource's key, or [`from_xds`] rejects it.
pub fn from_resource(name: &str, any: &Any) -> Result<Address, Rejected> {
    let reject = |reason: String| Rejected { reason };
    let decoded: xds::Address =
        decode_resource(istio_api::ADDRESS_TYPE_URL, any).map_err(reject)?;
    let address = from_xds(&decoded)?;
    check_name(name, address.key()).map_err(reject)?;
    Ok(address)
}

/// Converts one decoded `Address`.
///
/// # Errors
/// [`Rejected`] when a field cannot be read as Istio defines it.
pub fn from_xds(a: &xds::Address) -> Result<Address, Rejected> {
    let converted = match &a.r#type {
        Some(address::Type::Workload(w)) => workload(w).map(|w| Address::Workload(Arc::new(w))),
        Some(address::Type::Service(s)) => service(s).map(|s| Address::Service(Arc::new(s))),
        None => Err("type: neither a workload nor a service".to_string()),
    };
    converted.map_err(|reason| Rejected { reason })
}

fn workload(w: &xds::Workload) -> Result<Workload, String> {
    if w.uid.is_empty() {
        return Err("uid: empty".into());
    }
    if w.name.is_empty() || w.namespace.is_empty() {
        return Err("a workload needs a name and a namespace".into());
    }
    let ips = w
        .addresses
        .iter()
        .enumerate()
        .map(|(i, a)| ip_from_bytes(a).map_err(|e| format!("addresses[{i}]: {e}")))
        .collect::<Result<Vec<_>, _>>()?;
    let tunnel = match xds::TunnelProtocol::try_from(w.tunnel_protocol) {
        Ok(xds::TunnelProtocol::None) => TunnelProtocol::None,
        Ok(xds::TunnelProtocol::Hbone) => TunnelProtocol::Hbone,
        Ok(xds::TunnelProtocol::LegacyIstioMtls) => TunnelProtocol::LegacyIstioMtls,
        Err(_) => {
            return Err(format!(
                "tunnel_protocol: unknown value {}",
                w.tunnel_protocol
            ))
        }
    };
    let healthy = match xds::WorkloadStatus::try_from(w.status) {
        Ok(xds::WorkloadStatus::Healthy) => true,
        Ok(xds::WorkloadStatus::Unhealthy) => false,
        Err(_) => return Err(format!("status: unknown value {}", w.status)),
    };
    let host_network = match xds::NetworkMode::try_from(w.network_mode) {
        Ok(xds::NetworkMode::Standard) => false,
        Ok(xds::NetworkMode::HostNetwork) => true,
        Err(_) => return Err(format!("network_mode: unknown value {}", w.network_mode)),
    };
    let application_tunnel = match &w.application_tunnel {
        None => false,
        Some(t) => match xds::application_tunnel::Protocol::try_from(t.protocol) {
            Ok(xds::application_tunnel::Protocol::None) => false,
            Ok(xds::application_tunnel::Protocol::Proxy) => true,
            Err(_) => {
                return Err(format!(
                    "application_tunnel.protocol: unknown value {}",
                    t.protocol
                ))
            }
        },
    };
    let mut services = Vec::with_capacity(w.services.len());
    for (key, list) in &w.services {
        namespaced("services", key)?;
        let ports = list
            .ports
            .iter()
            .enumerate()
            .map(|(i, p)| {
                let at = |field: &str| format!("services[{key:?}].ports[{i}].{field}");
                Ok(PortMap {
                    service_port: port(&at("service_port"), p.service_port, false)?,
                    target_port: port(&at("target_port"), p.target_port, true)?,
                })
            })
            .collect::<Result<Vec<_>, String>>()?;
        services.push(ServicePorts {
            service: key.clone(),
            ports,
        });
    }
    services.sort_by(|a, b| a.service.cmp(&b.service));
    for (i, p) in w.authorization_policies.iter().enumerate() {
        namespaced(&format!("authorization_policies[{i}]"), p)?;
    }
    let locality = w
        .locality
        .as_ref()
        .map_or_else(Locality::default, |l| Locality {
            region: l.region.clone(),
            zone: l.zone.clone(),
            subzone: l.subzone.clone(),
        });
    Ok(Workload {
        uid: w.uid.clone(),
        name: w.name.clone(),
        namespace: w.namespace.clone(),
        service_account: or_default(&w.service_account, "default"),
        trust_domain: or_default(&w.trust_domain, "cluster.local"),
        ips,
        hostname: w.hostname.clone(),
        network: w.network.clone(),
        tunnel,
        node: w.node.clone(),
        healthy,
        host_network,
        services,
        policies: w.authorization_policies.clone(),
        capacity: w.capacity.unwrap_or(1),
        cluster_id: w.cluster_id.clone(),
        locality,
        waypoint: gateway("waypoint", w.waypoint.as_ref())?,
        network_gateway: gateway("network_gateway", w.network_gateway.as_ref())?,
        application_tunnel,
    })
}

fn service(s: &xds::Service) -> Result<Service, String> {
    if s.name.is_empty() || s.namespace.is_empty() || s.hostname.is_empty() {
        return Err("a service needs a name, a namespace and a hostname".into());
    }
    let vips = s
        .addresses
        .iter()
        .enumerate()
        .map(|(i, a)| {
            let ip = ip_from_bytes(&a.address).map_err(|e| format!("addresses[{i}]: {e}"))?;
            let width = if ip.is_ipv4() { 32 } else { 128 };
            let prefix = match a.length {
                None => width,
                Some(len) if len <= u32::from(width) => len as u8,
                Some(len) => {
                    return Err(format!(
                        "addresses[{i}].length: {len} bits, the address has {width}"
                    ))
                }
            };
            let block = IpBlock::new(ip, prefix).map_err(|e| format!("addresses[{i}]: {e}"))?;
            Ok(Vip {
                network: a.network.clone(),
                block,
            })
        })
        .collect::<Result<Vec<_>, String>>()?;
    let ports = s
        .ports
        .iter()
        .enumerate()
        .map(|(i, p)| {
            let target = port(&format!("ports[{i}].target_port"), p.target_port, true)?;
            Ok(ServicePort {
                port: port(&format!("ports[{i}].service_port"), p.service_port, false)?,
                target_port: (target != 0).then_some(target),
            })
        })
        .collect::<Result<Vec<_>, String>>()?;
    let load_balancing = match &s.load_balancing {
        None => LoadBalancing::default(),
        Some(lb) => balancing(lb)?,
    };
    // ztunnel reads an unknown visibility as PUBLIC; so does ringtun.
    let namespace_only = s.visibility == xds::ServiceVisibility::Namespace as i32;
    let weighted_waypoints = s
        .weighted_waypoints
        .iter()
        .enumerate()
        .map(|(i, w)| {
            gateway(
                &format!("weighted_waypoints[{i}].destination"),
                w.destination.as_ref(),
            )
        })
        .collect::<Result<Vec<_>, String>>()?
        .len();
    Ok(Service {
        key: format!("{}/{}", s.namespace, s.hostname),
        name: s.name.clone(),
        namespace: s.namespace.clone(),
        hostname: s.hostname.clone(),
        vips,
        ports,
        subject_alt_names: s.subject_alt_names.clone(),
        load_balancing,
        namespace_only,
        waypoint: gateway("waypoint", s.waypoint.as_ref())?,
        weighted_waypoints,
    })
}

fn balancing(lb: &xds::LoadBalancing) -> Result<LoadBalancing, String> {
    let mode = match load_balancing::Mode::try_from(lb.mode) {
        Ok(load_balancing::Mode::UnspecifiedMode | load_balancing::Mode::Failover) => {
            BalancingMode::Standard
        }
        Ok(load_balancing::Mode::Strict) => BalancingMode::Strict,
        Ok(load_balancing::Mode::Passthrough) => BalancingMode::Passthrough,
        Err(_) => return Err(format!("load_balancing.mode: unknown value {}", lb.mode)),
    };
    let allow_unhealthy = match load_balancing::HealthPolicy::try_from(lb.health_policy) {
        Ok(load_balancing::HealthPolicy::OnlyHealthy) => false,
        Ok(load_balancing::HealthPolicy::AllowAll) => true,
        Err(_) => {
            return Err(format!(
                "load_balancing.health_policy: unknown value {}",
                lb.health_policy
            ))
        }
    };
    let scopes = lb
        .routing_preference
        .iter()
        .enumerate()
        .map(|(i, &s)| {
            load_balancing::Scope::try_from(s)
                .map(|s| s.as_str_name())
                .map_err(|_| format!("load_balancing.routing_preference[{i}]: unknown value {s}"))
        })
        .collect::<Result<Vec<_>, String>>()?;
    Ok(LoadBalancing {
        mode,
        allow_unhealthy,
        scopes,
    })
}

fn gateway(field: &str, g: Option<&xds::GatewayAddress>) -> Result<Option<Gateway>, String> {
    let Some(g) = g else { return Ok(None) };
    let hbone_port = port(&format!("{field}.hbone_mtls_port"), g.hbone_mtls_port, true)?;
    match &g.destination {
        None => Err(format!("{field}: a gateway without a destination")),
        Some(gateway_address::Destination::Hostname(h)) => Ok(Some(Gateway::Hostname {
            namespace: h.namespace.clone(),
            hostname: h.hostname.clone(),
            hbone_port,
        })),
        Some(gateway_address::Destination::Address(a)) => Ok(Some(Gateway::Address {
            network: a.network.clone(),
            ip: ip_from_bytes(&a.address).map_err(|e| format!("{field}.address: {e}"))?,
            hbone_port,
        })),
    }
}

/// A port number; 0 only where the field allows "unset".
fn port(field: &str, p: u32, zero_allowed: bool) -> Result<u16, String> {
    match u16::try_from(p) {
        Ok(0) if !zero_allowed => Err(format!("{field}: port 0")),
        Ok(p) => Ok(p),
        Err(_) => Err(format!("{field}: port {p} is above 65535")),
    }
}

/// `namespace/name`: both parts present.
fn namespaced(field: &str, key: &str) -> Result<(), String> {
    match key.split_once('/') {
        Some((ns, name)) if !ns.is_empty() && !name.is_empty() => Ok(()),
        _ => Err(format!("{field}: {key:?} is not <namespace>/<name>")),
    }
}

fn or_default(value: &str, default: &str) -> String {
    if value.is_empty() {
        default.to_string()
    } else {
        value.to_string()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use istio_api::prost::Message;

    /// A way to break a valid message, and how the rejection's reason starts.
    type Breakage<T> = (fn(&mut T), &'static str);

    fn pod() -> xds::Workload {
        xds::Workload {
            uid: "c1//Pod/shop/cart-1".into(),
            name: "cart-1".into(),
            namespace: "shop".into(),
            addresses: vec![vec![10, 0, 0, 7], vec![0xfd; 16]],
            tunnel_protocol: xds::TunnelProtocol::Hbone as i32,
            node: "node-a".into(),
            ..xds::Workload::default()
        }
    }

    fn svc() -> xds::Service {
        xds::Service {
            name: "cart".into(),
            namespace: "shop".into(),
            hostname: "cart.shop.svc.cluster.local".into(),
            addresses: vec![xds::NetworkAddress {
                network: String::new(),
                address: vec![10, 96, 0, 9],
                length: None,
            }],
            ports: vec![xds::Port {
                service_port: 80,
                target_port: 8080,
                app_protocol: 0,
            }],
            ..xds::Service::default()
        }
    }

    fn convert_workload(w: xds::Workload) -> Result<Workload, String> {
        let a = xds::Address {
            r#type: Some(address::Type::Workload(Box::new(w))),
        };
        match from_xds(&a) {
            Ok(Address::Workload(w)) => Ok(Arc::unwrap_or_clone(w)),
            Ok(other) => panic!("a workload converted to {other:?}"),
            Err(r) => Err(r.reason),
        }
    }

    fn convert_service(s: xds::Service) -> Result<Service, String> {
        let a = xds::Address {
            r#type: Some(address::Type::Service(Box::new(s))),
        };
        match from_xds(&a) {
            Ok(Address::Service(s)) => Ok(Arc::unwrap_or_clone(s)),
            Ok(other) => panic!("a service converted to {other:?}"),
            Err(r) => Err(r.reason),
        }
    }

    #[test]
    fn a_pod_converts_with_ztunnels_defaults() {
        let mut p = pod();
        p.services.insert(
            "shop/cart.shop.svc.cluster.local".into(),
            xds::PortList {
                ports: vec![xds::Port {
                    service_port: 80,
                    target_port: 8080,
                    app_protocol: 0,
                }],
            },
        );
        p.authorization_policies = vec!["shop/allow-front".into()];
        p.status = xds::WorkloadStatus::Unhealthy as i32;
        let w = convert_workload(p).unwrap();
        assert_eq!(w.uid, "c1//Pod/shop/cart-1");
        assert_eq!(w.ips.len(), 2);
        assert_eq!(w.ips[0], "10.0.0.7".parse::<IpAddr>().unwrap());
        assert_eq!(w.protocol(), Some(Protocol::Hbone));
        assert_eq!(w.identity(), "spiffe://cluster.local/ns/shop/sa/default");
        assert!(!w.healthy);
        assert_eq!(w.capacity, 1);
        assert_eq!(
            w.ports_for("shop/cart.shop.svc.cluster.local"),
            Some(
                &[PortMap {
                    service_port: 80,
                    target_port: 8080
                }][..]
            )
        );
        assert_eq!(w.policies, vec!["shop/allow-front".to_string()]);
        assert_eq!(w.refusal(""), None);
    }

    #[test]
    fn unreadable_workloads_are_rejected_with_the_place() {
        let cases: Vec<Breakage<xds::Workload>> = vec![
            (|w| w.uid.clear(), "uid: empty"),
            (
                |w| w.namespace.clear(),
                "a workload needs a name and a namespace",
            ),
            (
                |w| w.addresses.push(vec![1, 2, 3, 4, 5]),
                "addresses[2]: an address of 5 bytes",
            ),
            (
                |w| w.tunnel_protocol = 7,
                "tunnel_protocol: unknown value 7",
            ),
            (|w| w.status = 2, "status: unknown value 2"),
            (|w| w.network_mode = 9, "network_mode: unknown value 9"),
            (
                |w| {
                    w.services
                        .insert("no-namespace".into(), xds::PortList::default());
                },
                "services: \"no-namespace\" is not <namespace>/<name>",
            ),
            (
                |w| {
                    w.services.insert(
                        "shop/cart".into(),
                        xds::PortList {
                            ports: vec![xds::Port {
                                service_port: 80,
                                target_port: 70_000,
                                app_protocol: 0,
                            }],
                        },
                    );
                },
                "services[\"shop/cart\"].ports[0].target_port: port 70000 is above 65535",
            ),
            (
                |w| w.authorization_policies = vec!["/p".into()],
                "authorization_policies[0]: \"/p\" is not <namespace>/<name>",
            ),
            (
                |w| w.waypoint = Some(xds::GatewayAddress::default()),
                "waypoint: a gateway without a destination",
            ),
            (
                |w| {
                    w.network_gateway = Some(xds::GatewayAddress {
                        destination: Some(gateway_address::Destination::Address(
                            xds::NetworkAddress {
                                network: "n2".into(),
                                address: vec![1; 3],
                                length: None,
                            },
                        )),
                        hbone_mtls_port: 15008,
                    })
                },
                "network_gateway.address: an address of 3 bytes",
            ),
        ];
        for (break_it, want) in cases {
            let mut w = pod();
            break_it(&mut w);
            let reason = convert_workload(w).unwrap_err();
            assert!(
                reason.starts_with(want),
                "{reason:?} should start with {want:?}"
            );
        }
    }

    #[test]
    fn what_ringtun_does_not_build_is_kept_and_refused() {
        let gw = || {
            Some(xds::GatewayAddress {
                destination: Some(gateway_address::Destination::Hostname(
                    xds::NamespacedHostname {
                        namespace: "shop".into(),
                        hostname: "waypoint.shop.svc.cluster.local".into(),
                    },
                )),
                hbone_mtls_port: 15008,
            })
        };
        let mut w = pod();
        w.waypoint = gw();
        let w = convert_workload(w).unwrap();
        assert_eq!(w.refusal(""), Some(Unsupported::Waypoint));
        assert_eq!(
            w.waypoint,
            Some(Gateway::Hostname {
                namespace: "shop".into(),
                hostname: "waypoint.shop.svc.cluster.local".into(),
                hbone_port: 15008
            })
        );

        // A gateway on a workload of this node's network is how other networks reach it.
        let mut w = pod();
        w.network = "n1".into();
        w.network_gateway = gw();
        let w = convert_workload(w).unwrap();
        assert_eq!(w.refusal("n1"), None);
        assert_eq!(w.refusal("n2").unwrap().label(), "network_gateway");

        let mut w = pod();
        w.tunnel_protocol = xds::TunnelProtocol::LegacyIstioMtls as i32;
        assert_eq!(
            convert_workload(w).unwrap().refusal(""),
            Some(Unsupported::LegacyIstioMtls)
        );

        let mut w = pod();
        w.addresses.clear();
        w.hostname = "db.example.com".into();
        assert_eq!(
            convert_workload(w).unwrap().refusal(""),
            Some(Unsupported::HostnameOnly)
        );

        let mut w = pod();
        w.application_tunnel = Some(xds::ApplicationTunnel {
            protocol: xds::application_tunnel::Protocol::Proxy as i32,
            port: 15088,
        });
        assert_eq!(
            convert_workload(w).unwrap().refusal(""),
            Some(Unsupported::ApplicationTunnel)
        );

        let mut s = svc();
        s.waypoint = gw();
        assert_eq!(
            convert_service(s).unwrap().refusal(),
            Some(Unsupported::Waypoint)
        );
        let mut s = svc();
        s.weighted_waypoints = vec![xds::WeightedGateway {
            destination: gw(),
            weight: 1,
        }];
        assert_eq!(
            convert_service(s).unwrap().refusal(),
            Some(Unsupported::Waypoint)
        );

        let mut s = svc();
        s.load_balancing = Some(xds::LoadBalancing {
            routing_preference: vec![load_balancing::Scope::Zone as i32],
            mode: load_balancing::Mode::Strict as i32,
            health_policy: 0,
        });
        let s = convert_service(s).unwrap();
        assert_eq!(s.load_balancing.scopes, vec!["ZONE"]);
        assert_eq!(s.refusal(), Some(Unsupported::StrictLocality));
        // Failover only orders endpoints: served, without the preference.
        let mut s = svc();
        s.load_balancing = Some(xds::LoadBalancing {
            routing_preference: vec![load_balancing::Scope::Zone as i32],
            mode: load_balancing::Mode::Failover as i32,
            health_policy: load_balancing::HealthPolicy::AllowAll as i32,
        });
        let s = convert_service(s).unwrap();
        assert_eq!(s.refusal(), None);
        assert!(s.load_balancing.allow_unhealthy);
    }

    #[test]
    fn a_service_converts_with_its_key_vips_and_ports() {
        let mut s = svc();
        s.addresses.push(xds::NetworkAddress {
            network: "n1".into(),
            address: vec![10, 97, 0, 0],
            length: Some(16),
        });
        s.ports.push(xds::Port {
            service_port: 9090,
            target_port: 0,
            app_protocol: 0,
        });
        s.visibility = 7; // unknown: PUBLIC, as ztunnel reads it
        let s = convert_service(s).unwrap();
        assert_eq!(s.key, "shop/cart.shop.svc.cluster.local");
        assert_eq!(s.vips[0].block.to_string(), "10.96.0.9/32");
        assert_eq!(s.vips[1].block.to_string(), "10.97.0.0/16");
        assert_eq!(s.vips[1].network, "n1");
        assert_eq!(
            s.ports,
            vec![
                ServicePort {
                    port: 80,
                    target_port: Some(8080)
                },
                ServicePort {
                    port: 9090,
                    target_port: None
                }
            ]
        );
        assert!(!s.namespace_only);
        assert_eq!(s.load_balancing.mode, BalancingMode::Standard);
    }

    #[test]
    fn unreadable_services_are_rejected_with_the_place() {
        let cases: Vec<Breakage<xds::Service>> = vec![
            (
                |s| s.hostname.clear(),
                "a service needs a name, a namespace and a hostname",
            ),
            (
                |s| s.addresses[0].address = vec![1; 15],
                "addresses[0]: an address of 15 bytes",
            ),
            (
                |s| s.addresses[0].length = Some(300),
                "addresses[0].length: 300 bits, the address has 32",
            ),
            (
                |s| s.ports[0].service_port = 0,
                "ports[0].service_port: port 0",
            ),
            (
                |s| s.ports[0].target_port = 65_536,
                "ports[0].target_port: port 65536 is above 65535",
            ),
            (
                |s| {
                    s.load_balancing = Some(xds::LoadBalancing {
                        mode: 9,
                        ..xds::LoadBalancing::default()
                    })
                },
                "load_balancing.mode: unknown value 9",
            ),
            (
                |s| {
                    s.load_balancing = Some(xds::LoadBalancing {
                        routing_preference: vec![1, 42],
                        ..xds::LoadBalancing::default()
                    })
                },
                "load_balancing.routing_preference[1]: unknown value 42",
            ),
        ];
        for (break_it, want) in cases {
            let mut s = svc();
            break_it(&mut s);
            let reason = convert_service(s).unwrap_err();
            assert!(
                reason.starts_with(want),
                "{reason:?} should start with {want:?}"
            );
        }
    }

    #[test]
    fn a_resource_must_be_an_address_named_by_its_key() {
        let encoded = |a: xds::Address| Any {
            type_url: istio_api::ADDRESS_TYPE_URL.into(),
            value: a.encode_to_vec(),
        };
        let service = encoded(xds::Address {
            r#type: Some(address::Type::Service(Box::new(svc()))),
        });
        let got = from_resource("shop/cart.shop.svc.cluster.local", &service).unwrap();
        assert_eq!(got.key(), "shop/cart.shop.svc.cluster.local");

        let wrong_name = from_resource("shop/other", &service).unwrap_err();
        assert!(
            wrong_name.reason.starts_with("name: \"shop/other\""),
            "{wrong_name}"
        );

        let mut wrong_type = service.clone();
        wrong_type.type_url = istio_api::AUTHORIZATION_TYPE_URL.into();
        assert!(
            from_resource("shop/cart.shop.svc.cluster.local", &wrong_type)
                .unwrap_err()
                .reason
                .starts_with("resource: type")
        );

        let garbage = Any {
            type_url: istio_api::ADDRESS_TYPE_URL.into(),
            value: vec![0x0a, 0x05, 0x01],
        };
        assert!(from_resource("x", &garbage)
            .unwrap_err()
            .reason
            .starts_with("resource: does not decode"));

        let empty = encoded(xds::Address { r#type: None });
        assert_eq!(
            from_resource("x", &empty).unwrap_err().reason,
            "type: neither a workload nor a service"
        );
    }
}
