//! What istiod has told this node, kept by resource name and changed one push at a time.
//!
//! The store applies [`Changes`] as the delta conversation produced them and keeps the indexes
//! a snapshot needs up to date as it goes, so a push costs in proportion to what it changes,
//! not to the mesh: a service's endpoints (the workloads that name it, whether or not the
//! service itself has arrived yet: istiod may push a workload before its service), and the
//! workloads of this node.
//!
//! Resource names are the delta stream's: a workload's uid, a service's `namespace/hostname`,
//! a policy's `namespace/name`. A removed Address name is a workload uid when one is held under
//! it, else a service key (ztunnel's rule: the two share one type and one name space).

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::Arc;

use super::address::{Address, Service, Workload};
use super::delta::Changes;
use crate::control_plane::policy::Authorization;

#[derive(Debug, Default)]
pub struct Store {
    /// This node's name: workloads whose `node` is it are local.
    node_name: String,
    workloads: HashMap<String, Arc<Workload>>,
    services: HashMap<String, Arc<Service>>,
    policies: BTreeMap<String, Arc<Authorization>>,
    /// Service key → uids of the workloads that name it in their `services`.
    endpoints: HashMap<String, BTreeSet<String>>,
    /// Uids of this node's workloads.
    local: BTreeSet<String>,
}

/// What applying one push did, for the log and the metrics.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Applied {
    pub upserted: usize,
    /// Removals of names the store held.
    pub removed: usize,
    /// Removals of names it did not hold (nothing to do; istiod may name what it never sent).
    pub unknown_removals: usize,
}

impl Store {
    pub fn new(node_name: &str) -> Store {
        Store {
            node_name: node_name.to_string(),
            ..Store::default()
        }
    }

    pub fn apply_addresses(&mut self, changes: Changes<Address>) -> Applied {
        let mut applied = Applied::default();
        for name in changes.removals {
            if self.remove_workload(&name) || self.services.remove(&name).is_some() {
                applied.removed += 1;
            } else {
                applied.unknown_removals += 1;
            }
        }
        for (name, address) in changes.upserts {
            match address {
                Address::Workload(w) => {
                    // A uid that named a service before (not expected from istiod) is one
                    // resource name: the newer resource replaces the older.
                    self.services.remove(&name);
                    self.insert_workload(name, w);
                }
                Address::Service(s) => {
                    self.remove_workload(&name);
                    self.services.insert(name, s);
                }
            }
            applied.upserted += 1;
        }
        applied
    }

    pub fn apply_policies(&mut self, changes: Changes<Authorization>) -> Applied {
        let mut applied = Applied::default();
        for name in changes.removals {
            if self.policies.remove(&name).is_some() {
                applied.removed += 1;
            } else {
                applied.unknown_removals += 1;
            }
        }
        for (name, policy) in changes.upserts {
            self.policies.insert(name, Arc::new(policy));
            applied.upserted += 1;
        }
        applied
    }

    fn insert_workload(&mut self, uid: String, w: Arc<Workload>) {
        self.remove_workload(&uid);
        for s in &w.services {
            self.endpoints
                .entry(s.service.clone())
                .or_default()
                .insert(uid.clone());
        }
        if w.node == self.node_name && !self.node_name.is_empty() {
            self.local.insert(uid.clone());
        }
        self.workloads.insert(uid, w);
    }

    fn remove_workload(&mut self, uid: &str) -> bool {
        let Some(old) = self.workloads.remove(uid) else {
            return false;
        };
        for s in &old.services {
            if let Some(set) = self.endpoints.get_mut(&s.service) {
                set.remove(uid);
                if set.is_empty() {
                    self.endpoints.remove(&s.service);
                }
            }
        }
        self.local.remove(uid);
        true
    }

    pub fn workload(&self, uid: &str) -> Option<&Arc<Workload>> {
        self.workloads.get(uid)
    }

    pub fn service(&self, key: &str) -> Option<&Arc<Service>> {
        self.services.get(key)
    }

    pub fn policy(&self, name: &str) -> Option<&Arc<Authorization>> {
        self.policies.get(name)
    }

    /// The workloads that are endpoints of a service, by uid (ascending).
    pub fn endpoints(&self, service_key: &str) -> impl Iterator<Item = &Arc<Workload>> {
        self.endpoints
            .get(service_key)
            .into_iter()
            .flatten()
            .filter_map(|uid| self.workloads.get(uid))
    }

    /// This node's workloads, by uid (ascending).
    pub fn local_workloads(&self) -> impl Iterator<Item = &Arc<Workload>> {
        self.local.iter().filter_map(|uid| self.workloads.get(uid))
    }

    /// (workloads, services, policies) held.
    pub fn counts(&self) -> (usize, usize, usize) {
        (
            self.workloads.len(),
            self.services.len(),
            self.policies.len(),
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::control_plane::config::Protocol;
    use crate::control_plane::xds::address::{
        LoadBalancing, PortMap, ServicePort, ServicePorts, TunnelProtocol,
    };

    fn workload(uid: &str, node: &str, services: &[&str]) -> Address {
        Address::Workload(Arc::new(Workload {
            uid: uid.into(),
            name: uid.into(),
            namespace: "ns".into(),
            service_account: "default".into(),
            trust_domain: "cluster.local".into(),
            ips: vec![],
            hostname: String::new(),
            network: String::new(),
            tunnel: TunnelProtocol::Hbone,
            node: node.into(),
            healthy: true,
            host_network: false,
            services: services
                .iter()
                .map(|s| ServicePorts {
                    service: s.to_string(),
                    ports: vec![PortMap {
                        service_port: 80,
                        target_port: 8080,
                    }],
                })
                .collect(),
            policies: vec![],
            capacity: 1,
            cluster_id: String::new(),
            locality: Default::default(),
            waypoint: None,
            network_gateway: None,
            application_tunnel: false,
        }))
    }

    fn service(key: &str) -> Address {
        let (ns, host) = key.split_once('/').unwrap();
        Address::Service(Arc::new(Service {
            key: key.into(),
            name: host.split('.').next().unwrap().into(),
            namespace: ns.into(),
            hostname: host.into(),
            vips: vec![],
            ports: vec![ServicePort {
                port: 80,
                target_port: None,
            }],
            subject_alt_names: vec![],
            load_balancing: LoadBalancing::default(),
            namespace_only: false,
            waypoint: None,
            weighted_waypoints: 0,
        }))
    }

    fn upserts(items: Vec<Address>) -> Changes<Address> {
        Changes {
            upserts: items
                .into_iter()
                .map(|a| (a.key().to_string(), a))
                .collect(),
            ..Changes::default()
        }
    }

    fn uids<'a>(it: impl Iterator<Item = &'a Arc<Workload>>) -> Vec<String> {
        it.map(|w| w.uid.clone()).collect()
    }

    #[test]
    fn endpoints_follow_workloads_even_before_their_service() {
        let mut store = Store::new("node-a");
        store.apply_addresses(upserts(vec![
            workload("w1", "node-a", &["ns/cart"]),
            workload("w2", "node-b", &["ns/cart", "ns/shop"]),
        ]));
        assert_eq!(uids(store.endpoints("ns/cart")), ["w1", "w2"]);
        assert!(store.service("ns/cart").is_none(), "not pushed yet");
        store.apply_addresses(upserts(vec![service("ns/cart")]));
        assert!(store.service("ns/cart").is_some());
        assert_eq!(uids(store.local_workloads()), ["w1"]);

        // An update that leaves a service leaves its endpoints; one that moves node moves.
        let applied = store.apply_addresses(upserts(vec![workload("w2", "node-a", &["ns/shop"])]));
        assert_eq!(applied.upserted, 1);
        assert_eq!(uids(store.endpoints("ns/cart")), ["w1"]);
        assert_eq!(uids(store.endpoints("ns/shop")), ["w2"]);
        assert_eq!(uids(store.local_workloads()), ["w1", "w2"]);
        assert_eq!(
            store.workload("w2").unwrap().protocol(),
            Some(Protocol::Hbone)
        );
    }

    #[test]
    fn a_removed_name_is_a_workload_first_then_a_service() {
        let mut store = Store::new("node-a");
        store.apply_addresses(upserts(vec![
            workload("w1", "node-a", &["ns/cart"]),
            service("ns/cart"),
        ]));
        let applied = store.apply_addresses(Changes {
            removals: vec!["w1".into(), "ns/cart".into(), "ns/never".into()],
            ..Changes::default()
        });
        assert_eq!(
            applied,
            Applied {
                upserted: 0,
                removed: 2,
                unknown_removals: 1
            }
        );
        assert_eq!(store.counts(), (0, 0, 0));
        assert_eq!(store.endpoints("ns/cart").count(), 0);
        assert_eq!(store.local_workloads().count(), 0);
        assert!(
            store.endpoints.is_empty(),
            "no empty endpoint sets left behind"
        );
    }

    #[test]
    fn policies_are_replaced_and_removed_by_name() {
        use crate::control_plane::policy::{Action, Scope};
        let policy = |action| Authorization {
            name: "p".into(),
            namespace: "ns".into(),
            scope: Scope::Namespace,
            action,
            dry_run: false,
            rules: vec![],
        };
        let mut store = Store::new("node-a");
        store.apply_policies(Changes {
            upserts: vec![("ns/p".into(), policy(Action::Allow))],
            ..Changes::default()
        });
        store.apply_policies(Changes {
            upserts: vec![("ns/p".into(), policy(Action::Deny))],
            ..Changes::default()
        });
        assert_eq!(store.policy("ns/p").unwrap().action, Action::Deny);
        let applied = store.apply_policies(Changes {
            removals: vec!["ns/p".into()],
            ..Changes::default()
        });
        assert_eq!(applied.removed, 1);
        assert_eq!(store.counts(), (0, 0, 0));
    }
}
