//! Capture listeners: for every local workload, the outbound listener (loopback, port 15001,
//! where nat REDIRECT sends locally generated connections) and the inbound plaintext listener
//! (any address, transparent, port 15006, for TPROXY or REDIRECT), IPv4 and IPv6, one set per
//! reactor with `SO_REUSEPORT`. Pod workloads get theirs inside the pod's network namespace,
//! made by a helper thread that enters it; the sockets keep that namespace for life.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::os::fd::OwnedFd;
use std::path::PathBuf;
use std::sync::Arc;

use super::client_address::{self, Delivery};
use super::first_connection::Direction;
use super::socket;
use crate::control_plane::config::{Protocol, Workload};
use crate::control_plane::state::State;
use crate::control_plane::workload_registry::WorkloadId;
use crate::redirection::netns::{on_helper_thread, NetNs};

const BACKLOG: i32 = 1024;

/// One listening socket owned by one reactor.
#[derive(Debug)]
pub struct Listener {
    pub fd: OwnedFd,
    /// The workload's id in the snapshot the reactor runs on (re-pointed at each reload).
    pub workload: WorkloadId,
    /// `namespace/name`: how a reload finds the workload again.
    pub name: Arc<str>,
    /// The snapshot it was made for: a reload that replaces a workload's listeners closes
    /// only the older ones.
    pub serial: u64,
    pub direction: Direction,
    pub addr: SocketAddr,
    /// The pod's namespace, where this workload's outbound sockets are made too.
    pub netns: Option<NetNs>,
    /// Port 15008: HBONE tunnels to this workload (TLS server), not captured plaintext.
    pub hbone: bool,
    /// Connections accepted here reach the application from the client's address
    /// (`node.deliver_client_address` and the workload's namespace: see `client_address`).
    pub deliver_client: bool,
}

/// Listeners a reload made for one reactor: those of workloads new on this node or changed,
/// and the workloads whose older listeners they replace.
#[derive(Debug)]
pub struct ListenerUpdate {
    /// The snapshot they belong to: the reactor takes them when it adopts it.
    pub serial: u64,
    pub listeners: Vec<Listener>,
    pub replaced: Vec<Arc<str>>,
}

/// What a workload's listeners depend on: when it changes (the pod's namespace was replaced, it
/// started speaking HBONE, it got an IPv6 address), a reload makes them anew.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ListenerSpec {
    netns: Option<PathBuf>,
    v6: bool,
    hbone: bool,
}

impl ListenerSpec {
    /// `tunnels`: this node can serve HBONE (it has certificates).
    pub fn of(w: &Workload, tunnels: bool) -> ListenerSpec {
        ListenerSpec {
            netns: w.netns.clone(),
            v6: w.ips.iter().any(|ip| ip.is_ipv6()),
            hbone: tunnels && w.protocol == Protocol::Hbone,
        }
    }
}

/// The local workloads of `next` that need listeners made: new on this node, or with a
/// changed [`ListenerSpec`] (their old listeners are replaced).
pub fn to_make(previous: &State, next: &State, tunnels: bool) -> Vec<WorkloadId> {
    let before = &previous.registry;
    next.registry
        .local_workloads()
        .filter(|(_, entry)| match before.workload_by_name(&entry.name) {
            Some(old) if before.workload(old).local => {
                ListenerSpec::of(&before.workload(old).workload, tunnels)
                    != ListenerSpec::of(&entry.workload, tunnels)
            }
            _ => true,
        })
        .map(|(id, _)| id)
        .collect()
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
    serial: u64,
) -> (Vec<Vec<Listener>>, Vec<ListenerProblem>) {
    let ids: Vec<WorkloadId> = state.registry.local_workloads().map(|(id, _)| id).collect();
    create_for(state, &ids, reactors, tunnels, serial)
}

/// [`create_all`] for the workloads `ids` only.
pub fn create_for(
    state: &State,
    ids: &[WorkloadId],
    reactors: usize,
    tunnels: bool,
    serial: u64,
) -> (Vec<Vec<Listener>>, Vec<ListenerProblem>) {
    let mut per_reactor: Vec<Vec<Listener>> = (0..reactors).map(|_| Vec::new()).collect();
    let mut problems = Vec::new();
    let ports = state.config.node.ports;
    let mark = state.config.node.socket_mark;
    let choice = state.config.node.deliver_client_address;
    let receive_buffer = state.config.node.limits.flow_receive_buffer;
    for &id in ids {
        let entry = state.registry.workload(id);
        let w = &entry.workload;
        let name = &entry.name;
        let pod = w.netns.is_some();
        let netns = match &w.netns {
            Some(path) => match NetNs::open(path) {
                Ok(ns) => Some(ns),
                Err(e) => {
                    problems.push(problem(name, pod, &e, e.to_string()));
                    continue;
                }
            },
            None => None,
        };
        let spec = ListenerSpec::of(w, tunnels);
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
        if spec.v6 {
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
        if spec.hbone {
            addrs.push((
                Direction::InboundPlaintext,
                SocketAddr::new(IpAddr::V4(Ipv4Addr::UNSPECIFIED), ports.inbound_hbone),
                true,
                true,
            ));
            if spec.v6 {
                addrs.push((
                    Direction::InboundPlaintext,
                    SocketAddr::new(IpAddr::V6(Ipv6Addr::UNSPECIFIED), ports.inbound_hbone),
                    true,
                    true,
                ));
            }
        }
        // One address of each family the workload has, to check the return path from.
        let mut own: Vec<IpAddr> = Vec::new();
        for ip in &w.ips {
            if !own.iter().any(|o| o.is_ipv4() == ip.is_ipv4()) {
                own.push(*ip);
            }
        }
        let made = on_helper_thread(netns.clone(), move || {
            let delivery = client_address::decide(choice, || {
                own.iter()
                    .try_for_each(|ip| client_address::check_return_path(*ip, mark))
            });
            let mut out = Vec::new();
            for _ in 0..reactors {
                let mut set = Vec::new();
                for (dir, addr, transparent, hbone) in &addrs {
                    // Port 15008's connections are tunnels: many flows, autotuned.
                    let buffer = if *hbone { 0 } else { receive_buffer };
                    set.push((
                        *dir,
                        *addr,
                        *hbone,
                        socket::listener(*addr, *transparent, mark, BACKLOG, buffer),
                    ));
                }
                out.push(set);
            }
            (delivery, out)
        });
        match made {
            Ok((Delivery::Unservable(why), _)) => {
                let kind = match why {
                    client_address::ReturnPathError::Transparent(_) => {
                        std::io::ErrorKind::PermissionDenied
                    }
                    _ => std::io::ErrorKind::Other,
                };
                let e = std::io::Error::new(kind, why.to_string());
                let what = format!(
                    "node.deliver_client_address is on but the client's address cannot be \
                     delivered here: {why}"
                );
                problems.push(problem(name, pod, &e, what));
            }
            Ok((delivery, sets)) => {
                let deliver_client = delivery.from_client();
                match &delivery {
                    Delivery::FromClient => log::info!(
                        "workload {name}: inbound connections reach the application from the \
                         client's address"
                    ),
                    Delivery::FromWorkload(Some(why)) => log::info!(
                        "workload {name}: inbound connections reach the application from the \
                         workload's own address: {why}"
                    ),
                    _ => {}
                }
                for (r, set) in sets.into_iter().enumerate() {
                    for (direction, addr, hbone, fd) in set {
                        match fd {
                            Ok(fd) => per_reactor[r].push(Listener {
                                fd,
                                workload: id,
                                name: Arc::clone(name),
                                serial,
                                direction,
                                addr,
                                netns: netns.clone(),
                                hbone,
                                deliver_client,
                            }),
                            Err(e) => {
                                if r == 0 {
                                    let what = format!("listener {addr}: {e}");
                                    problems.push(problem(name, pod, &e, what));
                                }
                            }
                        }
                    }
                }
            }
            Err(e) => problems.push(problem(name, pod, &e, e.to_string())),
        }
    }
    (per_reactor, problems)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::control_plane::config::load;

    fn state(workloads: &str) -> std::sync::Arc<State> {
        State::new(
            load(&format!(
                "version: 1\nnode: {{name: n}}\nworkloads:\n{workloads}"
            ))
            .expect("valid"),
            1,
        )
    }

    #[test]
    fn a_reload_makes_listeners_for_new_and_changed_workloads_only() {
        let before = state(
            "- {name: same, namespace: a, ips: [10.0.0.1], node: n, netns: /run/netns/same}\n\
             - {name: moved, namespace: a, ips: [10.0.0.2], node: n, netns: /run/netns/old}\n\
             - {name: tls, namespace: a, ips: [10.0.0.3], node: n, netns: /run/netns/tls, protocol: TCP}\n\
             - {name: arriving, namespace: a, ips: [10.0.0.4], node: m, netns: /run/netns/a}\n\
             - {name: leaving, namespace: a, ips: [10.0.0.5], node: n, netns: /run/netns/l}\n",
        );
        let after = state(
            "- {name: new, namespace: a, ips: [10.0.0.9], node: n}\n\
             - {name: same, namespace: a, ips: [10.0.0.1], node: n, netns: /run/netns/same}\n\
             - {name: moved, namespace: a, ips: [10.0.0.2], node: n, netns: /run/netns/new}\n\
             - {name: tls, namespace: a, ips: [10.0.0.3], node: n, netns: /run/netns/tls, protocol: HBONE}\n\
             - {name: arriving, namespace: a, ips: [10.0.0.4], node: n, netns: /run/netns/a}\n\
             - {name: leaving, namespace: a, ips: [10.0.0.5], node: m, netns: /run/netns/l}\n",
        );
        let names = |tunnels| -> Vec<String> {
            to_make(&before, &after, tunnels)
                .into_iter()
                .map(|id| after.registry.workload(id).name.to_string())
                .collect()
        };
        assert_eq!(names(true), ["a/new", "a/moved", "a/tls", "a/arriving"]);
        // Without certificates an HBONE workload gets no 15008 listener: nothing changes.
        assert_eq!(names(false), ["a/new", "a/moved", "a/arriving"]);
    }
}
