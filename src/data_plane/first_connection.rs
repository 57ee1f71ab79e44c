//! First-connection resolution: once per connection, decide who is talking to whom and how the
//! bytes will travel. Pure: it reads the [`Registry`] and the facts of the accepted socket and
//! returns one [`Resolution`] value that the flow keeps for its whole life (access log, metrics,
//! and — in later issues — the tunnel and the authorization decision).
//!
//! The source workload is the one whose listener accepted the connection: a pod's listener lives
//! in that pod's network namespace, so nothing a client puts in a packet can change it.

use std::net::{IpAddr, SocketAddr};

use crate::control_plane::config::Ports;
use crate::control_plane::workload_registry::{Registry, ServiceId, WorkloadId};

/// Which capture listener accepted the connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Direction {
    /// Leaving a local workload (port 15001, nat REDIRECT).
    Outbound,
    /// Arriving in plaintext at a local workload (port 15006, TPROXY or REDIRECT).
    InboundPlaintext,
}

/// Facts about an accepted socket, all from the kernel.
#[derive(Debug, Clone, Copy)]
pub struct Accepted {
    pub direction: Direction,
    /// The workload whose listener accepted it.
    pub listener_workload: WorkloadId,
    pub peer: SocketAddr,
    pub original_dst: SocketAddr,
}

/// What the connection is for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Destination {
    /// A service VIP: the endpoint chosen for this connection.
    Service {
        service: ServiceId,
        endpoint: WorkloadId,
    },
    /// A workload addressed by its own IP.
    Workload(WorkloadId),
    /// An address the mesh does not know: passed through unchanged.
    OutOfMesh,
}

/// How the bytes will travel.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Route {
    /// Plain TCP to `Resolution::upstream` (out-of-mesh destinations, TCP-protocol workloads,
    /// and inbound delivery to the local workload).
    DirectTcp,
    /// Mutual-TLS HTTP/2 CONNECT to `peer` (the destination node's HBONE port) carrying a stream
    /// to `Resolution::upstream`. Decided here; carried by the tunnel once it exists.
    HboneTunnel { peer: SocketAddr },
    /// Not to be connected; the client is reset.
    Refuse(RefuseReason),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RefuseReason {
    /// The original destination is one of ringtun's own ports on the workload's own address:
    /// connecting would loop back into the proxy.
    Loop,
    /// A service VIP whose endpoints are all unhealthy or have no address of the family asked.
    NoHealthyEndpoint,
    /// Inbound traffic for an address that is not the accepting workload's.
    NotForThisWorkload,
}

impl RefuseReason {
    pub fn label(self) -> &'static str {
        match self {
            RefuseReason::Loop => "loop",
            RefuseReason::NoHealthyEndpoint => "no_healthy_endpoint",
            RefuseReason::NotForThisWorkload => "not_for_this_workload",
        }
    }
}

/// The outcome of first-connection resolution, recorded on the flow.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Resolution {
    pub direction: Direction,
    /// Outbound: the accepting workload. Inbound plaintext: the workload owning the client's
    /// address if any — informational only, since a plaintext source address is not proof.
    pub source: Option<WorkloadId>,
    pub destination: Destination,
    pub route: Route,
    /// Where the stream ends: the endpoint's IP and target port, or the original destination.
    pub upstream: SocketAddr,
    pub original_dst: SocketAddr,
}

impl Resolution {
    /// The destination workload, when the mesh knows it.
    pub fn destination_workload(&self) -> Option<WorkloadId> {
        match self.destination {
            Destination::Service { endpoint, .. } => Some(endpoint),
            Destination::Workload(w) => Some(w),
            Destination::OutOfMesh => None,
        }
    }

    /// The SPIFFE identity the destination must prove once tunnels carry it.
    pub fn destination_identity<'r>(&self, registry: &'r Registry) -> Option<&'r str> {
        self.destination_workload()
            .map(|w| registry.workload(w).identity.as_str())
    }
}

/// Spreads new connections across a service's endpoints. One per reactor (no sharing).
#[derive(Debug, Default)]
pub struct EndpointPicker {
    next: Vec<u32>,
}

impl EndpointPicker {
    fn start(&mut self, service: ServiceId) -> usize {
        let i = service.0 as usize;
        if self.next.len() <= i {
            self.next.resize(i + 1, 0);
        }
        let start = self.next[i] as usize;
        self.next[i] = self.next[i].wrapping_add(1);
        start
    }
}

pub fn resolve(
    registry: &Registry,
    ports: &Ports,
    accepted: &Accepted,
    picker: &mut EndpointPicker,
) -> Resolution {
    let dst = accepted.original_dst;
    let mut res = Resolution {
        direction: accepted.direction,
        source: None,
        destination: Destination::OutOfMesh,
        route: Route::DirectTcp,
        upstream: dst,
        original_dst: dst,
    };
    let me = registry.workload(accepted.listener_workload);
    let own_address =
        |ip: IpAddr| ip.is_loopback() || ip.is_unspecified() || me.workload.ips.contains(&ip);
    if ports.all().contains(&dst.port()) && own_address(dst.ip()) {
        res.route = Route::Refuse(RefuseReason::Loop);
        return res;
    }
    match accepted.direction {
        Direction::InboundPlaintext => {
            res.source = registry.workload_by_ip(accepted.peer.ip());
            res.destination = Destination::Workload(accepted.listener_workload);
            if !me.workload.ips.contains(&dst.ip()) {
                res.route = Route::Refuse(RefuseReason::NotForThisWorkload);
            }
            res
        }
        Direction::Outbound => {
            res.source = Some(accepted.listener_workload);
            if let Some((service, target_port)) = registry.service_by_vip(dst.ip(), dst.port()) {
                match pick_endpoint(registry, service, dst.is_ipv4(), picker) {
                    Some((endpoint, ip)) => {
                        res.destination = Destination::Service { service, endpoint };
                        res.upstream = SocketAddr::new(ip, target_port);
                        res.route = route_to(registry, endpoint, ip, ports);
                    }
                    None => res.route = Route::Refuse(RefuseReason::NoHealthyEndpoint),
                }
            } else if let Some(w) = registry.workload_by_ip(dst.ip()) {
                res.destination = Destination::Workload(w);
                res.route = route_to(registry, w, dst.ip(), ports);
            }
            res
        }
    }
}

fn route_to(registry: &Registry, w: WorkloadId, ip: IpAddr, ports: &Ports) -> Route {
    if registry.speaks_hbone(w) {
        Route::HboneTunnel {
            peer: SocketAddr::new(ip, ports.inbound_hbone),
        }
    } else {
        Route::DirectTcp
    }
}

/// Round-robin over the healthy endpoints that have an address of the wanted family.
fn pick_endpoint(
    registry: &Registry,
    service: ServiceId,
    want_v4: bool,
    picker: &mut EndpointPicker,
) -> Option<(WorkloadId, IpAddr)> {
    let endpoints = &registry.service(service).endpoints;
    if endpoints.is_empty() {
        return None;
    }
    let start = picker.start(service);
    (0..endpoints.len()).find_map(|k| {
        let id = endpoints[(start + k) % endpoints.len()];
        let w = &registry.workload(id).workload;
        if !w.healthy {
            return None;
        }
        w.ips
            .iter()
            .find(|ip| ip.is_ipv4() == want_v4)
            .map(|ip| (id, *ip))
    })
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::control_plane::config::*;
    use std::time::Duration;

    pub fn node() -> NodeConfig {
        NodeConfig {
            name: "node-a".into(),
            trust_domain: "cluster.local".into(),
            root_namespace: "istio-system".into(),
            reactors: None,
            pin_reactors: true,
            driver: DriverChoice::Auto,
            socket_mark: 0x539,
            deliver_client_address: crate::control_plane::config::ClientAddressChoice::Auto,
            ports: Ports {
                outbound: 15001,
                inbound_plaintext: 15006,
                inbound_hbone: 15008,
            },
            admin_addr: None,
            metrics_addr: None,
            readiness_addr: None,
            timeouts: Timeouts {
                connect: Duration::from_secs(5),
                handshake: Duration::from_secs(2),
                idle: Duration::from_secs(3600),
                drain: Duration::from_secs(30),
            },
            limits: Limits {
                max_flows_per_reactor: 4096,
                max_handshakes_per_reactor: 256,
                max_handshakes_per_source: 16,
                max_tunnels_per_peer: 256,
                flow_receive_buffer: 128 * 1024,
            },
            splice: SpliceSettings {
                pipe_size: 1 << 18,
                max_bytes_per_wakeup: 1 << 20,
                pipe_pool_size: 64,
                pipes_per_reactor: 256,
            },
            tls: None,
            hbone: crate::control_plane::config::DEFAULT_HBONE,
        }
    }

    pub fn workload(name: &str, ips: &[&str], node: &str, protocol: Protocol) -> Workload {
        Workload {
            name: name.into(),
            namespace: "default".into(),
            service_account: name.into(),
            ips: ips.iter().map(|s| s.parse().unwrap()).collect(),
            node: node.into(),
            protocol,
            netns: None,
            healthy: true,
            labels: Default::default(),
        }
    }

    fn config() -> Config {
        let mut sick = workload("echo-3", &["10.1.0.13"], "node-b", Protocol::Tcp);
        sick.healthy = false;
        Config {
            node: node(),
            workloads: vec![
                workload("client", &["10.1.0.2", "fd00::2"], "node-a", Protocol::Tcp),
                workload("echo-1", &["10.1.0.11"], "node-a", Protocol::Tcp),
                workload("echo-2", &["10.1.0.12"], "node-b", Protocol::Hbone),
                sick,
            ],
            services: vec![Service {
                name: "echo".into(),
                namespace: "default".into(),
                vips: vec!["10.96.0.10".parse().unwrap()],
                ports: vec![ServicePort {
                    port: 80,
                    target_port: 8080,
                }],
                endpoints: ["echo-1", "echo-2", "echo-3"]
                    .iter()
                    .map(|n| WorkloadRef {
                        namespace: "default".into(),
                        name: (*n).into(),
                    })
                    .collect(),
            }],
            policies: Vec::new(),
        }
    }

    fn outbound(dst: &str) -> Accepted {
        Accepted {
            direction: Direction::Outbound,
            listener_workload: WorkloadId(0),
            peer: "10.1.0.2:40000".parse().unwrap(),
            original_dst: dst.parse().unwrap(),
        }
    }

    #[test]
    fn vip_spreads_across_healthy_endpoints_only() {
        let cfg = config();
        let reg = Registry::new(&cfg);
        let mut picker = EndpointPicker::default();
        let mut seen = std::collections::HashMap::new();
        for _ in 0..30 {
            let r = resolve(
                &reg,
                &cfg.node.ports,
                &outbound("10.96.0.10:80"),
                &mut picker,
            );
            assert_eq!(r.upstream.port(), 8080);
            *seen.entry(r.upstream.ip().to_string()).or_insert(0) += 1;
        }
        assert_eq!(seen.len(), 2, "two healthy endpoints: {seen:?}");
        assert!(!seen.contains_key("10.1.0.13"), "unhealthy endpoint chosen");
        assert!(seen.values().all(|&n| n >= 10), "uneven spread {seen:?}");
    }

    #[test]
    fn route_follows_the_endpoint_protocol() {
        let cfg = config();
        let reg = Registry::new(&cfg);
        let mut picker = EndpointPicker::default();
        let routes: Vec<Route> = (0..2)
            .map(|_| {
                resolve(
                    &reg,
                    &cfg.node.ports,
                    &outbound("10.96.0.10:80"),
                    &mut picker,
                )
                .route
            })
            .collect();
        assert!(routes.contains(&Route::DirectTcp));
        assert!(routes.contains(&Route::HboneTunnel {
            peer: "10.1.0.12:15008".parse().unwrap()
        }));
    }

    #[test]
    fn workload_ip_resolves_to_that_workload_and_keeps_the_port() {
        let cfg = config();
        let reg = Registry::new(&cfg);
        let r = resolve(
            &reg,
            &cfg.node.ports,
            &outbound("10.1.0.11:9000"),
            &mut Default::default(),
        );
        assert_eq!(r.destination, Destination::Workload(WorkloadId(1)));
        assert_eq!(r.upstream, "10.1.0.11:9000".parse().unwrap());
        assert_eq!(r.source, Some(WorkloadId(0)));
        assert_eq!(
            r.destination_identity(&reg),
            Some("spiffe://cluster.local/ns/default/sa/echo-1")
        );
    }

    #[test]
    fn unknown_address_is_out_of_mesh_passthrough() {
        let cfg = config();
        let reg = Registry::new(&cfg);
        let r = resolve(
            &reg,
            &cfg.node.ports,
            &outbound("192.0.2.7:443"),
            &mut Default::default(),
        );
        assert_eq!(r.destination, Destination::OutOfMesh);
        assert_eq!(r.route, Route::DirectTcp);
        assert_eq!(r.upstream, "192.0.2.7:443".parse().unwrap());
    }

    #[test]
    fn own_port_on_own_address_is_refused_as_a_loop() {
        let cfg = config();
        let reg = Registry::new(&cfg);
        for dst in [
            "127.0.0.1:15001",
            "10.1.0.2:15006",
            "[::1]:15008",
            "[fd00::2]:15001",
        ] {
            let r = resolve(
                &reg,
                &cfg.node.ports,
                &outbound(dst),
                &mut Default::default(),
            );
            assert_eq!(r.route, Route::Refuse(RefuseReason::Loop), "{dst}");
        }
        // The same port on another host is an ordinary destination.
        let r = resolve(
            &reg,
            &cfg.node.ports,
            &outbound("192.0.2.7:15001"),
            &mut Default::default(),
        );
        assert_eq!(r.route, Route::DirectTcp);
    }

    #[test]
    fn inbound_for_another_address_is_refused() {
        let cfg = config();
        let reg = Registry::new(&cfg);
        let acc = Accepted {
            direction: Direction::InboundPlaintext,
            listener_workload: WorkloadId(1),
            peer: "10.1.0.2:5555".parse().unwrap(),
            original_dst: "10.1.0.99:8080".parse().unwrap(),
        };
        let r = resolve(&reg, &cfg.node.ports, &acc, &mut Default::default());
        assert_eq!(r.route, Route::Refuse(RefuseReason::NotForThisWorkload));
        let ok = Accepted {
            original_dst: "10.1.0.11:8080".parse().unwrap(),
            ..acc
        };
        let r = resolve(&reg, &cfg.node.ports, &ok, &mut Default::default());
        assert_eq!(r.route, Route::DirectTcp);
        assert_eq!(r.source, Some(WorkloadId(0)));
        assert_eq!(r.destination, Destination::Workload(WorkloadId(1)));
    }

    #[test]
    fn vip_with_no_healthy_endpoint_of_the_family_is_refused() {
        let mut cfg = config();
        cfg.services[0].vips.push("fd00:96::10".parse().unwrap());
        let reg = Registry::new(&cfg);
        let r = resolve(
            &reg,
            &cfg.node.ports,
            &outbound("[fd00:96::10]:80"),
            &mut Default::default(),
        );
        assert_eq!(r.route, Route::Refuse(RefuseReason::NoHealthyEndpoint));
    }
}
