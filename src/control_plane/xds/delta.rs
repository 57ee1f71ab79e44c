//! The delta ADS conversation with istiod, as a protocol core without IO: what to send when a
//! stream opens, what a push changes and how to answer it.
//!
//! The stream's owner (the control-plane thread) feeds it every [`DeltaDiscoveryResponse`] and
//! sends the requests it returns; it applies each [`Changes`] to its store. The rules are
//! Envoy's delta xDS as istiod serves it and ztunnel speaks it:
//!
//! * One wildcard subscription per type (an empty subscribe list), the [`Node`] on each first
//!   request; on a reconnect, `initial_resource_versions` lists every name the store holds, so
//!   istiod skips what has not changed and names in `removed_resources` what went away while
//!   the stream was down.
//! * Each resource of a push is converted on its own: a bad one is rejected alone and the push
//!   is answered with a NACK whose message names each rejected resource and why (bounded, so a
//!   push of many bad resources cannot make an oversized request); the rest applies.
//! * A rejected resource leaves the store as it was (the last good version stays, and its name
//!   and old version stay declared), except where the conversion gives a fail-closed stand-in
//!   (a policy that cannot be read as written), which replaces it.
//! * The ACK or NACK carries the push's nonce; an unknown type is ACKed and reported.
//! * The node is synced once each subscribed type has been answered once (readiness).

use std::collections::{BTreeMap, HashMap};

use istio_api::envoy::service::discovery::v3::{
    DeltaDiscoveryRequest, DeltaDiscoveryResponse, Node,
};
use istio_api::google::rpc::Status;
use istio_api::prost_types::{value::Kind, Any, Struct, Value};
use istio_api::{ADDRESS_TYPE_URL, AUTHORIZATION_TYPE_URL};

use super::address::{self, Address};
use super::authorization;
use crate::control_plane::policy::Authorization;

/// A NACK's message stops growing here; the rest is counted ("... and N more").
pub const MAX_NACK_MESSAGE: usize = 16 * 1024;

/// google.rpc.Code INVALID_ARGUMENT: istiod reads any `error_detail` as a NACK and logs it.
const INVALID_ARGUMENT: i32 = 3;

/// Who this node is, as istiod expects a ztunnel to say it (the `Node` of each first request).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct NodeInfo {
    /// `INSTANCE_IP`: the proxy pod's address.
    pub instance_ip: String,
    /// `POD_NAME`, `POD_NAMESPACE`: the proxy pod.
    pub pod_name: String,
    pub pod_namespace: String,
    /// `NODE_NAME`: the Kubernetes node.
    pub node_name: String,
    /// Every `ISTIO_META_<KEY>` variable as `KEY` (e.g. `CLUSTER_ID`, `ISTIO_VERSION`).
    pub metadata: BTreeMap<String, String>,
}

impl NodeInfo {
    /// The `Node` istiod parses: id `ztunnel~<ip>~<pod>.<ns>~<ns>.svc.cluster.local`, metadata
    /// NAME, NAMESPACE, INSTANCE_IPS, NODE_NAME and the `ISTIO_META_` keys (which win, as the
    /// later keys do in ztunnel).
    pub fn node(&self) -> Node {
        let ip = if self.instance_ip.is_empty() {
            "1.1.1.1" // ztunnel's default, so istiod's id parser accepts the id
        } else {
            &self.instance_ip
        };
        let ns = &self.pod_namespace;
        let mut fields = BTreeMap::new();
        for (k, v) in [
            ("NAME", &self.pod_name),
            ("NAMESPACE", ns),
            ("INSTANCE_IPS", &ip.to_string()),
            ("NODE_NAME", &self.node_name),
        ]
        .into_iter()
        .chain(self.metadata.iter().map(|(k, v)| (k.as_str(), v)))
        {
            fields.insert(
                k.to_string(),
                Value {
                    kind: Some(Kind::StringValue(v.clone())),
                },
            );
        }
        Node {
            id: format!("ztunnel~{ip}~{}.{ns}~{ns}.svc.cluster.local", self.pod_name),
            cluster: String::new(),
            metadata: Some(Struct { fields }),
        }
    }
}

/// What one push changes in one type's store.
#[derive(Debug, Clone, PartialEq)]
pub struct Changes<T> {
    /// Resources to insert or replace, by name (stand-ins of rejected resources included).
    pub upserts: Vec<(String, T)>,
    /// Names to remove.
    pub removals: Vec<String>,
    /// Names rejected, with the reason (also in the NACK); the store keeps what it had for
    /// them unless a stand-in is among the upserts.
    pub rejected: Vec<(String, String)>,
}

impl<T> Default for Changes<T> {
    fn default() -> Self {
        Changes {
            upserts: Vec::new(),
            removals: Vec::new(),
            rejected: Vec::new(),
        }
    }
}

/// A push, converted.
#[derive(Debug, Clone, PartialEq)]
pub enum Update {
    Addresses(Changes<Address>),
    Policies(Changes<Authorization>),
    /// A type ringtun did not subscribe to: ACKed, nothing changes.
    UnknownType(String),
}

/// The answer to a push and what it changes.
#[derive(Debug, Clone, PartialEq)]
pub struct Push {
    /// The ACK (no `error_detail`) or NACK to send.
    pub reply: DeltaDiscoveryRequest,
    pub update: Update,
}

/// One subscribed type: what the store holds of it, by name and version.
#[derive(Debug, Default)]
struct Subscription {
    held: HashMap<String, String>,
    answered: bool,
}

/// The client side of the delta ADS stream, across reconnects.
#[derive(Debug)]
pub struct DeltaClient {
    node: Node,
    addresses: Subscription,
    policies: Subscription,
}

impl DeltaClient {
    pub fn new(node: &NodeInfo) -> DeltaClient {
        DeltaClient {
            node: node.node(),
            addresses: Subscription::default(),
            policies: Subscription::default(),
        }
    }

    /// The requests that open a stream (the first one or a reconnect): one wildcard
    /// subscription per type, with the versions held.
    pub fn initial_requests(&self) -> Vec<DeltaDiscoveryRequest> {
        [
            (ADDRESS_TYPE_URL, &self.addresses),
            (AUTHORIZATION_TYPE_URL, &self.policies),
        ]
        .into_iter()
        .map(|(type_url, sub)| DeltaDiscoveryRequest {
            node: Some(self.node.clone()),
            type_url: type_url.to_string(),
            initial_resource_versions: sub
                .held
                .iter()
                .map(|(k, v)| (k.clone(), v.clone()))
                .collect(),
            ..DeltaDiscoveryRequest::default()
        })
        .collect()
    }

    /// Every subscribed type has had its first push answered.
    pub fn synced(&self) -> bool {
        self.addresses.answered && self.policies.answered
    }

    /// How many resources of each type the store holds: (addresses, policies).
    pub fn held(&self) -> (usize, usize) {
        (self.addresses.held.len(), self.policies.held.len())
    }

    /// Converts a push, records what the store will hold, and gives the ACK or NACK.
    pub fn on_response(&mut self, response: DeltaDiscoveryResponse) -> Push {
        let type_url = response.type_url.clone();
        let nonce = response.nonce.clone();
        let (update, rejected): (Update, Vec<(String, String)>) = match type_url.as_str() {
            ADDRESS_TYPE_URL => {
                let changes = apply(&mut self.addresses, response, |name, any| {
                    address::from_resource(name, any).map_err(|r| (r.reason, None))
                });
                let rejected = changes.rejected.clone();
                (Update::Addresses(changes), rejected)
            }
            AUTHORIZATION_TYPE_URL => {
                let changes = apply(&mut self.policies, response, |name, any| {
                    authorization::from_resource(name, any).map_err(|r| (r.reason, r.fail_closed))
                });
                let rejected = changes.rejected.clone();
                (Update::Policies(changes), rejected)
            }
            _ => (Update::UnknownType(type_url.clone()), Vec::new()),
        };
        let error_detail = (!rejected.is_empty()).then(|| Status {
            code: INVALID_ARGUMENT,
            message: nack_message(&rejected),
            details: Vec::new(),
        });
        Push {
            reply: DeltaDiscoveryRequest {
                type_url,
                response_nonce: nonce,
                error_detail,
                ..DeltaDiscoveryRequest::default()
            },
            update,
        }
    }
}

/// A rejection: the reason, and a stand-in to apply instead (when there is a fail-closed form).
type Rejection<T> = (String, Option<T>);

fn apply<T>(
    sub: &mut Subscription,
    response: DeltaDiscoveryResponse,
    convert: impl Fn(&str, &Any) -> Result<T, Rejection<T>>,
) -> Changes<T> {
    let mut changes = Changes::default();
    for name in response.removed_resources {
        sub.held.remove(&name);
        changes.removals.push(name);
    }
    for r in response.resources {
        let converted = match &r.resource {
            Some(any) => convert(&r.name, any),
            None => Err(("resource: missing".to_string(), None)),
        };
        match converted {
            Ok(item) => {
                sub.held.insert(r.name.clone(), r.version);
                changes.upserts.push((r.name, item));
            }
            Err((reason, stand_in)) => {
                if let Some(item) = stand_in {
                    // What is applied is not any version istiod sent: declare the name (so a
                    // removal while disconnected still arrives) without a version istiod
                    // could take as current.
                    sub.held.insert(r.name.clone(), String::new());
                    changes.upserts.push((r.name.clone(), item));
                }
                changes.rejected.push((r.name, reason));
            }
        }
    }
    sub.answered = true;
    changes
}

/// `name: reason; name: reason`, cut at [`MAX_NACK_MESSAGE`] with a count of what was left.
fn nack_message(rejected: &[(String, String)]) -> String {
    let mut out = String::new();
    for (i, (name, reason)) in rejected.iter().enumerate() {
        let entry = format!("{}{name}: {reason}", if i == 0 { "" } else { "; " });
        if out.len() + entry.len() > MAX_NACK_MESSAGE {
            out.push_str(&format!("; ... and {} more", rejected.len() - i));
            break;
        }
        out.push_str(&entry);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use istio_api::envoy::service::discovery::v3::Resource;
    use istio_api::istio::security as sec;
    use istio_api::istio::workload as wl;
    use istio_api::prost::Message;

    fn node_info() -> NodeInfo {
        NodeInfo {
            instance_ip: "10.0.0.2".into(),
            pod_name: "ztunnel-x".into(),
            pod_namespace: "istio-system".into(),
            node_name: "node-a".into(),
            metadata: [("CLUSTER_ID".to_string(), "Kubernetes".to_string())].into(),
        }
    }

    fn workload(uid: &str, ip: u8) -> Resource {
        let a = wl::Address {
            r#type: Some(wl::address::Type::Workload(Box::new(wl::Workload {
                uid: uid.into(),
                name: uid.into(),
                namespace: "ns".into(),
                addresses: vec![vec![10, 0, 0, ip]],
                ..wl::Workload::default()
            }))),
        };
        Resource {
            name: uid.into(),
            version: format!("v{ip}"),
            resource: Some(Any {
                type_url: ADDRESS_TYPE_URL.into(),
                value: a.encode_to_vec(),
            }),
            ..Resource::default()
        }
    }

    fn policy(name: &str, action: i32, port: u32) -> Resource {
        let p = sec::Authorization {
            name: name.into(),
            namespace: "ns".into(),
            scope: sec::Scope::Namespace as i32,
            action,
            groups: vec![sec::Group {
                rules: vec![sec::Rules {
                    matches: vec![sec::Match {
                        destination_ports: vec![port],
                        ..sec::Match::default()
                    }],
                }],
            }],
            dry_run: false,
        };
        Resource {
            name: format!("ns/{name}"),
            resource: Some(Any {
                type_url: AUTHORIZATION_TYPE_URL.into(),
                value: p.encode_to_vec(),
            }),
            ..Resource::default()
        }
    }

    fn push(
        type_url: &str,
        nonce: &str,
        resources: Vec<Resource>,
        removed: &[&str],
    ) -> DeltaDiscoveryResponse {
        DeltaDiscoveryResponse {
            type_url: type_url.into(),
            nonce: nonce.into(),
            resources,
            removed_resources: removed.iter().map(|s| s.to_string()).collect(),
            ..DeltaDiscoveryResponse::default()
        }
    }

    #[test]
    fn the_node_is_what_istiod_parses_for_a_ztunnel() {
        let node = node_info().node();
        assert_eq!(
            node.id,
            "ztunnel~10.0.0.2~ztunnel-x.istio-system~istio-system.svc.cluster.local"
        );
        let fields = node.metadata.unwrap().fields;
        let get = |k: &str| match &fields[k].kind {
            Some(Kind::StringValue(s)) => s.clone(),
            other => panic!("{k}: {other:?}"),
        };
        assert_eq!(get("NAME"), "ztunnel-x");
        assert_eq!(get("NAMESPACE"), "istio-system");
        assert_eq!(get("INSTANCE_IPS"), "10.0.0.2");
        assert_eq!(get("NODE_NAME"), "node-a");
        assert_eq!(get("CLUSTER_ID"), "Kubernetes");
        let anonymous = NodeInfo::default().node();
        assert!(
            anonymous.id.starts_with("ztunnel~1.1.1.1~"),
            "{}",
            anonymous.id
        );
    }

    #[test]
    fn a_stream_opens_with_one_wildcard_request_per_type() {
        let client = DeltaClient::new(&node_info());
        let reqs = client.initial_requests();
        let types: Vec<_> = reqs.iter().map(|r| r.type_url.as_str()).collect();
        assert_eq!(types, [ADDRESS_TYPE_URL, AUTHORIZATION_TYPE_URL]);
        for r in &reqs {
            assert!(r.node.is_some());
            assert!(r.resource_names_subscribe.is_empty());
            assert!(r.initial_resource_versions.is_empty());
            assert!(r.response_nonce.is_empty());
        }
        assert!(!client.synced());
    }

    #[test]
    fn a_bad_resource_is_nacked_alone_and_the_rest_applies() {
        let mut client = DeltaClient::new(&node_info());
        let mut bad = workload("w-bad", 3);
        bad.resource.as_mut().unwrap().value = wl::Address {
            r#type: Some(wl::address::Type::Workload(Box::new(wl::Workload {
                uid: "w-bad".into(),
                name: "w-bad".into(),
                namespace: "ns".into(),
                addresses: vec![vec![1, 2, 3]],
                ..wl::Workload::default()
            }))),
        }
        .encode_to_vec();
        let p = client.on_response(push(
            ADDRESS_TYPE_URL,
            "n1",
            vec![workload("w1", 1), bad, workload("w2", 2)],
            &[],
        ));
        assert_eq!(p.reply.response_nonce, "n1");
        assert_eq!(p.reply.type_url, ADDRESS_TYPE_URL);
        assert!(p.reply.node.is_none());
        let detail = p.reply.error_detail.expect("a NACK");
        assert_eq!(
            detail.message,
            "w-bad: addresses[0]: an address of 3 bytes (IPv4 has 4, IPv6 16)"
        );
        let Update::Addresses(changes) = p.update else {
            panic!("{:?}", p.update)
        };
        let names: Vec<_> = changes.upserts.iter().map(|(n, _)| n.as_str()).collect();
        assert_eq!(names, ["w1", "w2"]);
        assert_eq!(changes.rejected.len(), 1);
        assert!(!client.synced(), "policies not pushed yet");

        let p = client.on_response(push(AUTHORIZATION_TYPE_URL, "n2", vec![], &[]));
        assert_eq!(p.reply.error_detail, None, "an ACK");
        assert!(client.synced());

        // The rejected name is not declared on a reconnect (istiod sends it again).
        let reqs = client.initial_requests();
        let versions = &reqs[0].initial_resource_versions;
        assert_eq!(versions.len(), 2);
        assert_eq!(versions["w1"], "v1");
        assert_eq!(versions["w2"], "v2");
    }

    #[test]
    fn removals_and_updates_change_the_declared_versions() {
        let mut client = DeltaClient::new(&node_info());
        client.on_response(push(
            ADDRESS_TYPE_URL,
            "n1",
            vec![workload("w1", 1), workload("w2", 2)],
            &[],
        ));
        let p = client.on_response(push(
            ADDRESS_TYPE_URL,
            "n2",
            vec![workload("w1", 9)],
            &["w2", "never-held"],
        ));
        assert_eq!(p.reply.error_detail, None);
        let Update::Addresses(changes) = p.update else {
            panic!()
        };
        assert_eq!(changes.removals, ["w2", "never-held"]);
        let versions = &client.initial_requests()[0].initial_resource_versions;
        assert_eq!(versions.len(), 1);
        assert_eq!(versions["w1"], "v9");
        assert_eq!(client.held(), (1, 0));
    }

    #[test]
    fn a_bad_update_keeps_the_last_good_version_declared() {
        let mut client = DeltaClient::new(&node_info());
        client.on_response(push(ADDRESS_TYPE_URL, "n1", vec![workload("w1", 1)], &[]));
        let mut bad = workload("w1", 5);
        bad.resource.as_mut().unwrap().value = vec![0x0a, 0x09, 0x01];
        let p = client.on_response(push(ADDRESS_TYPE_URL, "n2", vec![bad], &[]));
        assert!(p
            .reply
            .error_detail
            .unwrap()
            .message
            .starts_with("w1: resource: does not decode"));
        let Update::Addresses(changes) = p.update else {
            panic!()
        };
        assert!(changes.upserts.is_empty());
        assert_eq!(
            client.initial_requests()[0].initial_resource_versions["w1"],
            "v1"
        );
    }

    #[test]
    fn an_unreadable_policy_is_nacked_and_its_stand_in_applies() {
        let mut client = DeltaClient::new(&node_info());
        let p = client.on_response(push(
            AUTHORIZATION_TYPE_URL,
            "n1",
            vec![
                policy("ok", sec::Action::Allow as i32, 80),
                policy("too-far", sec::Action::Deny as i32, 70_000),
                policy("odd", 9, 80),
            ],
            &[],
        ));
        let message = p.reply.error_detail.unwrap().message;
        assert!(
            message.starts_with(
                "ns/too-far: groups[0].rules[0].matches[0].destination_ports[0]: port 70000"
            ),
            "{message}"
        );
        assert!(
            message.contains("; ns/odd: action: unknown value 9"),
            "{message}"
        );
        let Update::Policies(changes) = p.update else {
            panic!()
        };
        let names: Vec<_> = changes.upserts.iter().map(|(n, _)| n.as_str()).collect();
        assert_eq!(
            names,
            ["ns/ok", "ns/too-far"],
            "the DENY's stand-in applies"
        );
        assert_eq!(changes.rejected.len(), 2);
        let versions = &client.initial_requests()[1].initial_resource_versions;
        let mut declared: Vec<_> = versions.keys().cloned().collect();
        declared.sort();
        assert_eq!(declared, ["ns/ok", "ns/too-far"]);
    }

    #[test]
    fn an_unknown_type_is_acked_and_changes_nothing() {
        let mut client = DeltaClient::new(&node_info());
        let p = client.on_response(push(
            "type.googleapis.com/x.Y",
            "n7",
            vec![workload("w", 1)],
            &[],
        ));
        assert_eq!(p.reply.error_detail, None);
        assert_eq!(p.reply.response_nonce, "n7");
        assert_eq!(
            p.update,
            Update::UnknownType("type.googleapis.com/x.Y".into())
        );
        assert_eq!(client.held(), (0, 0));
    }

    #[test]
    fn a_resource_named_otherwise_than_its_key_is_rejected() {
        let mut client = DeltaClient::new(&node_info());
        let mut r = policy("p", sec::Action::Allow as i32, 80);
        r.name = "other/p".into();
        let p = client.on_response(push(AUTHORIZATION_TYPE_URL, "n1", vec![r], &[]));
        assert_eq!(
            p.reply.error_detail.unwrap().message,
            "other/p: name: \"other/p\" is not the resource's key \"ns/p\""
        );
    }

    #[test]
    fn a_nack_of_many_resources_stays_bounded() {
        let rejected: Vec<_> = (0..10_000)
            .map(|i| {
                (
                    format!("c1//Pod/ns/w-{i}"),
                    "addresses[0]: an address of 3 bytes".to_string(),
                )
            })
            .collect();
        let m = nack_message(&rejected);
        assert!(m.len() <= MAX_NACK_MESSAGE + 32, "{}", m.len());
        let shown = m.matches("c1//Pod").count();
        assert!(
            m.ends_with(&format!("; ... and {} more", 10_000 - shown)),
            "{}",
            &m[m.len() - 40..]
        );
    }
}
