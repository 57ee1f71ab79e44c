//! The workloads and services this node knows, indexed for the first-connection lookups:
//! workload by IP, service by (VIP, port). Built once from a validated [`Config`] and then only
//! read, so every reactor can share it without locks.

use std::collections::HashMap;
use std::net::IpAddr;

use crate::control_plane::config::{Config, Protocol, Workload};

/// Index of a workload in the registry (stable for the life of one registry).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct WorkloadId(pub u32);

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct ServiceId(pub u32);

#[derive(Debug)]
pub struct WorkloadEntry {
    pub workload: Workload,
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
    /// (VIP, service port) → (service, target port).
    by_vip: HashMap<(IpAddr, u16), (ServiceId, u16)>,
    /// Every address a workload or service owns, to tell "in the mesh" from "outside".
    vip_addrs: HashMap<IpAddr, ServiceId>,
}

impl Registry {
    pub fn new(config: &Config) -> Registry {
        let td = &config.node.trust_domain;
        let mut workloads = Vec::with_capacity(config.workloads.len());
        let mut by_ip = HashMap::new();
        let mut by_name = HashMap::new();
        for (i, w) in config.workloads.iter().enumerate() {
            let id = WorkloadId(i as u32);
            for ip in &w.ips {
                by_ip.insert(*ip, id);
            }
            by_name.insert((w.namespace.as_str(), w.name.as_str()), id);
            workloads.push(WorkloadEntry {
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
            by_vip,
            vip_addrs,
        }
    }

    pub fn workload(&self, id: WorkloadId) -> &WorkloadEntry {
        &self.workloads[id.0 as usize]
    }

    pub fn service(&self, id: ServiceId) -> &ServiceEntry {
        &self.services[id.0 as usize]
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
