//! The workloads and services this node knows, indexed for the first-connection lookups:
//! workload by IP, service by (VIP, port); and for building policy snapshots: workloads by
//! label, so a label selector finds its workloads without scanning the mesh. Built once from a
//! validated [`Config`] and then only read, so every reactor can share it without locks.

use std::collections::{BTreeMap, HashMap};
use std::net::IpAddr;
use std::sync::Arc;

use crate::control_plane::config::{Config, Protocol, Workload};

/// Index of a workload in the registry (stable for the life of one registry).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct WorkloadId(pub u32);

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct ServiceId(pub u32);

#[derive(Debug)]
pub struct WorkloadEntry {
    pub workload: Workload,
    /// `namespace/name`: what names the workload across reloads (ids do not), shared cheaply
    /// by the listeners and flows that belong to it.
    pub name: Arc<str>,
    /// `spiffe://<trust-domain>/ns/<namespace>/sa/<service-account>`: the identity its
    /// certificate will carry once tunnels exist.
    pub identity: String,
    /// Served by this node (its `node` is this node's name).
    pub local: bool,
}

#[derive(Debug)]
pub struct ServiceEntry {
    pub name: String,
    pub namespace: String,
    /// `<name>.<namespace>.svc`: the `destination_service` label.
    pub hostname: String,
    pub endpoints: Vec<WorkloadId>,
}

#[derive(Debug)]
pub struct Registry {
    workloads: Vec<WorkloadEntry>,
    services: Vec<ServiceEntry>,
    by_ip: HashMap<IpAddr, WorkloadId>,
    /// `namespace/name` → workload: the name that survives a reload (ids do not).
    by_name: HashMap<Arc<str>, WorkloadId>,
    /// (VIP, service port) → (service, target port).
    by_vip: HashMap<(IpAddr, u16), (ServiceId, u16)>,
    /// Every address a workload or service owns, to tell "in the mesh" from "outside".
    vip_addrs: HashMap<IpAddr, ServiceId>,
    /// (namespace, label, value) → workloads, ascending.
    by_label_in_namespace: HashMap<(String, String, String), Vec<WorkloadId>>,
    /// (label, value) → workloads of every namespace, ascending.
    by_label: HashMap<(String, String), Vec<WorkloadId>>,
}

/// Where a label selector looks (Istio: a selector selects in its policy's namespace, or in
/// every namespace when the policy lives in the root namespace).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SelectorScope<'a> {
    Namespace(&'a str),
    AllNamespaces,
}

impl Registry {
    pub fn new(config: &Config) -> Registry {
        let td = &config.node.trust_domain;
        let mut workloads = Vec::with_capacity(config.workloads.len());
        let mut by_ip = HashMap::new();
        let mut by_name = HashMap::new();
        let mut by_full_name = HashMap::with_capacity(config.workloads.len());
        let mut by_label_in_namespace: HashMap<_, Vec<WorkloadId>> = HashMap::new();
        let mut by_label: HashMap<_, Vec<WorkloadId>> = HashMap::new();
        for (i, w) in config.workloads.iter().enumerate() {
            let id = WorkloadId(i as u32);
            for ip in &w.ips {
                by_ip.insert(*ip, id);
            }
            for (k, v) in &w.labels {
                by_label_in_namespace
                    .entry((w.namespace.clone(), k.clone(), v.clone()))
                    .or_default()
                    .push(id);
                by_label.entry((k.clone(), v.clone())).or_default().push(id);
            }
            by_name.insert((w.namespace.as_str(), w.name.as_str()), id);
            let name: Arc<str> = Arc::from(format!("{}/{}", w.namespace, w.name));
            by_full_name.insert(Arc::clone(&name), id);
            workloads.push(WorkloadEntry {
                name,
                identity: format!("spiffe://{td}/ns/{}/sa/{}", w.namespace, w.service_account),
                local: w.node == config.node.name,
                workload: w.clone(),
            });
        }
        let mut services = Vec::with_capacity(config.services.len());
        let mut by_vip = HashMap::new();
        let mut vip_addrs = HashMap::new();
        for (i, s) in config.services.iter().enumerate() {
            let id = ServiceId(i as u32);
            for vip in &s.vips {
                vip_addrs.insert(*vip, id);
                for p in &s.ports {
                    by_vip.insert((*vip, p.port), (id, p.target_port));
                }
            }
            // Validation guarantees every endpoint exists; a missing one is skipped, not fatal.
            let endpoints = s
                .endpoints
                .iter()
                .filter_map(|r| {
                    by_name
                        .get(&(r.namespace.as_str(), r.name.as_str()))
                        .copied()
                })
                .collect();
            services.push(ServiceEntry {
                hostname: format!("{}.{}.svc", s.name, s.namespace),
                name: s.name.clone(),
                namespace: s.namespace.clone(),
                endpoints,
            });
        }
        Registry {
            workloads,
            services,
            by_ip,
            by_name: by_full_name,
            by_vip,
            vip_addrs,
            by_label_in_namespace,
            by_label,
        }
    }

    /// The workloads whose labels include every `selector` label, in `scope`, ascending. An
    /// empty selector selects nothing (the config refuses one; xDS never sends one).
    pub fn select(
        &self,
        scope: SelectorScope<'_>,
        selector: &BTreeMap<String, String>,
    ) -> Vec<WorkloadId> {
        // Start from the label with the fewest workloads, then check the others on each.
        let mut shortest: Option<&[WorkloadId]> = None;
        for (k, v) in selector {
            let list = match scope {
                SelectorScope::Namespace(ns) => {
                    self.by_label_in_namespace
                        .get(&(ns.to_string(), k.clone(), v.clone()))
                }
                SelectorScope::AllNamespaces => self.by_label.get(&(k.clone(), v.clone())),
            };
            let Some(list) = list else {
                return Vec::new();
            };
            if shortest.is_none_or(|s| list.len() < s.len()) {
                shortest = Some(list);
            }
        }
        shortest
            .unwrap_or(&[])
            .iter()
            .copied()
            .filter(|&id| {
                let labels = &self.workload(id).workload.labels;
                selector.iter().all(|(k, v)| labels.get(k) == Some(v))
            })
            .collect()
    }

    pub fn workload(&self, id: WorkloadId) -> &WorkloadEntry {
        &self.workloads[id.0 as usize]
    }

    pub fn service(&self, id: ServiceId) -> &ServiceEntry {
        &self.services[id.0 as usize]
    }

    /// The workload named `namespace/name` (how a reload finds what an id meant before).
    pub fn workload_by_name(&self, namespaced_name: &str) -> Option<WorkloadId> {
        self.by_name.get(namespaced_name).copied()
    }

    /// Whether the workload named `namespace/name` is served by this node.
    pub fn is_local(&self, namespaced_name: &str) -> bool {
        self.workload_by_name(namespaced_name)
            .is_some_and(|id| self.workload(id).local)
    }

    pub fn workload_by_ip(&self, ip: IpAddr) -> Option<WorkloadId> {
        self.by_ip.get(&canonical(ip)).copied()
    }

    pub fn service_by_vip(&self, ip: IpAddr, port: u16) -> Option<(ServiceId, u16)> {
        self.by_vip.get(&(canonical(ip), port)).copied()
    }

    pub fn is_vip(&self, ip: IpAddr) -> bool {
        self.vip_addrs.contains_key(&canonical(ip))
    }

    /// Local workloads, in config order: the ones this node makes listeners for.
    pub fn local_workloads(&self) -> impl Iterator<Item = (WorkloadId, &WorkloadEntry)> {
        self.workloads
            .iter()
            .enumerate()
            .filter(|(_, w)| w.local)
            .map(|(i, w)| (WorkloadId(i as u32), w))
    }

    pub fn workload_count(&self) -> usize {
        self.workloads.len()
    }

    pub fn service_count(&self) -> usize {
        self.services.len()
    }

    /// True when the workload wants its traffic in an HBONE tunnel.
    pub fn speaks_hbone(&self, id: WorkloadId) -> bool {
        self.workload(id).workload.protocol == Protocol::Hbone
    }
}

/// IPv4-mapped IPv6 addresses (`::ffff:a.b.c.d`) are the IPv4 address they carry.
pub fn canonical(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => IpAddr::V4(v4),
            None => ip,
        },
        v4 => v4,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::control_plane::config::load;

    fn labels(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn selectors_find_workloads_by_every_label_in_their_scope() {
        let config = load(
            "version: 1\nnode: {name: n}\nworkloads:\n\
             - {name: a, namespace: prod, ips: [10.0.0.1], node: m, labels: {app: web, v: '1'}}\n\
             - {name: b, namespace: prod, ips: [10.0.0.2], node: m, labels: {app: web, v: '2'}}\n\
             - {name: c, namespace: dev, ips: [10.0.0.3], node: m, labels: {app: web, v: '1'}}\n\
             - {name: d, namespace: prod, ips: [10.0.0.4], node: m, labels: {app: db}}\n\
             - {name: e, namespace: prod, ips: [10.0.0.5], node: m}\n",
        )
        .expect("valid");
        let reg = Registry::new(&config);
        let ids = |v: &[u32]| v.iter().map(|&i| WorkloadId(i)).collect::<Vec<_>>();
        let prod = SelectorScope::Namespace("prod");
        assert_eq!(reg.select(prod, &labels(&[("app", "web")])), ids(&[0, 1]));
        assert_eq!(
            reg.select(prod, &labels(&[("app", "web"), ("v", "1")])),
            ids(&[0])
        );
        assert_eq!(
            reg.select(
                SelectorScope::AllNamespaces,
                &labels(&[("v", "1"), ("app", "web")])
            ),
            ids(&[0, 2])
        );
        assert_eq!(
            reg.select(SelectorScope::Namespace("dev"), &labels(&[("app", "db")])),
            ids(&[])
        );
        assert_eq!(
            reg.select(prod, &labels(&[("app", "web"), ("zone", "x")])),
            ids(&[])
        );
        assert_eq!(
            reg.select(prod, &labels(&[])),
            ids(&[]),
            "empty selects nothing"
        );
    }
}
