//! Capture listeners: for every local workload, the outbound listener (loopback, port 15001,
//! where nat REDIRECT sends locally generated connections) and the inbound plaintext listener
//! (any address, transparent, port 15006, for TPROXY or REDIRECT), IPv4 and IPv6, one set per
//! reactor with `SO_REUSEPORT`. Pod workloads get theirs inside the pod's network namespace,
//! made by a helper thread that enters it; the sockets keep that namespace for life.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::os::fd::OwnedFd;

use super::first_connection::Direction;
use super::socket;
use crate::control_plane::config::Protocol;
use crate::control_plane::state::State;
use crate::control_plane::workload_registry::WorkloadId;
use crate::redirection::netns::{on_helper_thread, NetNs};

const BACKLOG: i32 = 1024;

/// One listening socket owned by one reactor.
#[derive(Debug)]
pub struct Listener {
    pub fd: OwnedFd,
    pub workload: WorkloadId,
    pub direction: Direction,
    pub addr: SocketAddr,
    /// The pod's namespace, where this workload's outbound sockets are made too.
    pub netns: Option<NetNs>,
    /// Port 15008: HBONE tunnels to this workload (TLS server), not captured plaintext.
    pub hbone: bool,
}

/// A local workload the node could not (fully) serve: its namespace or one of its listeners
/// could not be opened.
#[derive(Debug, Clone)]
pub struct ListenerProblem {
    /// `namespace/name`.
    pub workload: String,
    /// Pod mode (the workload has its own namespace): the node may serve the others.
    pub pod: bool,
    /// The failure was a missing privilege (EPERM/EACCES): `CAP_NET_ADMIN`, `CAP_SYS_ADMIN`.
    pub not_permitted: bool,
    pub message: String,
}

impl std::fmt::Display for ListenerProblem {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "workload {}: {}", self.workload, self.message)
    }
}

fn problem(workload: &str, pod: bool, e: &std::io::Error, what: String) -> ListenerProblem {
    ListenerProblem {
        workload: workload.to_string(),
        pod,
        not_permitted: e.kind() == std::io::ErrorKind::PermissionDenied,
        message: what,
    }
}

/// Listener sets, one `Vec` per reactor, for every local workload, and the problems met: a pod
/// whose namespace is gone must not stop the node serving the others (the caller decides what
/// a problem means: see `App::start`).
///
/// `tunnels`: this node can serve HBONE (it has certificates), so workloads that speak HBONE
/// also get a 15008 listener.
pub fn create_all(
    state: &State,
    reactors: usize,
    tunnels: bool,
) -> (Vec<Vec<Listener>>, Vec<ListenerProblem>) {
    let mut per_reactor: Vec<Vec<Listener>> = (0..reactors).map(|_| Vec::new()).collect();
    let mut problems = Vec::new();
    let ports = state.config.node.ports;
    let mark = state.config.node.socket_mark;
    for (id, entry) in state.registry.local_workloads() {
        let w = &entry.workload;
        let name = format!("{}/{}", w.namespace, w.name);
        let pod = w.netns.is_some();
        let netns = match &w.netns {
            Some(path) => match NetNs::open(path) {
                Ok(ns) => Some(ns),
                Err(e) => {
                    problems.push(problem(&name, pod, &e, e.to_string()));
                    continue;
                }
            },
            None => None,
        };
        let wants_v6 = w.ips.iter().any(|ip| ip.is_ipv6());
        // (direction, address, transparent, hbone)
        let mut addrs = vec![
            (
                Direction::Outbound,
                SocketAddr::new(IpAddr::V4(Ipv4Addr::LOCALHOST), ports.outbound),
                false,
                false,
            ),
            (
                Direction::InboundPlaintext,
                SocketAddr::new(IpAddr::V4(Ipv4Addr::UNSPECIFIED), ports.inbound_plaintext),
                true,
                false,
            ),
        ];
        if wants_v6 {
            addrs.push((
                Direction::Outbound,
                SocketAddr::new(IpAddr::V6(Ipv6Addr::LOCALHOST), ports.outbound),
                false,
                false,
            ));
            addrs.push((
                Direction::InboundPlaintext,
                SocketAddr::new(IpAddr::V6(Ipv6Addr::UNSPECIFIED), ports.inbound_plaintext),
                true,
                false,
            ));
        }
        // Tunnels reach a pod that speaks HBONE on its port 15008, when this node has
        // certificates to answer with.
        if tunnels && w.protocol == Protocol::Hbone {
            addrs.push((
                Direction::InboundPlaintext,
                SocketAddr::new(IpAddr::V4(Ipv4Addr::UNSPECIFIED), ports.inbound_hbone),
                true,
                true,
            ));
            if wants_v6 {
                addrs.push((
                    Direction::InboundPlaintext,
                    SocketAddr::new(IpAddr::V6(Ipv6Addr::UNSPECIFIED), ports.inbound_hbone),
                    true,
                    true,
                ));
            }
        }
        let made = on_helper_thread(netns.clone(), move || {
            let mut out = Vec::new();
            for _ in 0..reactors {
                let mut set = Vec::new();
                for (dir, addr, transparent, hbone) in &addrs {
                    set.push((
                        *dir,
                        *addr,
                        *hbone,
                        socket::listener(*addr, *transparent, mark, BACKLOG),
                    ));
                }
                out.push(set);
            }
            out
        });
        match made {
            Ok(sets) => {
                for (r, set) in sets.into_iter().enumerate() {
                    for (direction, addr, hbone, fd) in set {
                        match fd {
                            Ok(fd) => per_reactor[r].push(Listener {
                                fd,
                                workload: id,
                                direction,
                                addr,
                                netns: netns.clone(),
                                hbone,
                            }),
                            Err(e) => {
                                if r == 0 {
                                    let what = format!("listener {addr}: {e}");
                                    problems.push(problem(&name, pod, &e, what));
                                }
                            }
                        }
                    }
                }
            }
            Err(e) => problems.push(problem(&name, pod, &e, e.to_string())),
        }
    }
    (per_reactor, problems)
}
