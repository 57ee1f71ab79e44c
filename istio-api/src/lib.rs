//! The Istio control-plane messages a node proxy speaks, as istiod and ztunnel put them on the
//! wire: the delta xDS envelope (`envoy.service.discovery.v3`), the resources pushed over it
//! (`istio.workload.Address`, `istio.security.Authorization`) and the CA's certificate request
//! (`istio.v1.auth`).
//!
//! The `.proto` files in `proto/` are ringtun's own, written from the field numbers of Istio's
//! definitions; they keep only what a node proxy acts on (decoding skips every other field).
//! `build.rs` compiles them with protox and tonic-prost-build (prost's messages plus a gRPC
//! client and server stub per service, generic over tonic's transport traits), so building
//! needs no system `protoc`. This crate holds types and wire facts only: no IO, no
//! conversion into ringtun's model.

// The generated types' own crates, so users name the same versions.
pub use prost;
pub use prost_types;

// The module tree mirrors the protobuf packages: generated code names other packages' types
// by relative paths (`super::super::...`).

pub mod envoy {
    pub mod service {
        pub mod discovery {
            pub mod v3 {
                include!(concat!(env!("OUT_DIR"), "/envoy.service.discovery.v3.rs"));
            }
        }
    }
}

pub mod google {
    pub mod rpc {
        include!(concat!(env!("OUT_DIR"), "/google.rpc.rs"));
    }
}

pub mod istio {
    pub mod workload {
        include!(concat!(env!("OUT_DIR"), "/istio.workload.rs"));
    }
    pub mod security {
        include!(concat!(env!("OUT_DIR"), "/istio.security.rs"));
    }
    pub mod v1 {
        pub mod auth {
            include!(concat!(env!("OUT_DIR"), "/istio.v1.auth.rs"));
        }
    }
}

/// Every message above as a serialized `google.protobuf.FileDescriptorSet`, imports included:
/// what a peer needs to build the same messages at run time (the tests' Python fake istiod).
pub const FILE_DESCRIPTOR_SET: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/descriptors.bin"));

/// Type URL of workload and service resources (wildcard-subscribed).
pub const ADDRESS_TYPE_URL: &str = "type.googleapis.com/istio.workload.Address";
/// Type URL of authorization policy resources (wildcard-subscribed).
pub const AUTHORIZATION_TYPE_URL: &str = "type.googleapis.com/istio.security.Authorization";
/// The delta ADS method on istiod's port 15012.
pub const DELTA_ADS_PATH: &str =
    "/envoy.service.discovery.v3.AggregatedDiscoveryService/DeltaAggregatedResources";
/// The CA's certificate method on istiod's port 15012.
pub const CREATE_CERTIFICATE_PATH: &str =
    "/istio.v1.auth.IstioCertificateService/CreateCertificate";

#[cfg(test)]
mod tests {
    use super::envoy::service::discovery::v3::{
        DeltaDiscoveryRequest, DeltaDiscoveryResponse, Resource,
    };
    use super::google::rpc::Status;
    use super::istio::security::{
        string_match::MatchType, Authorization, Group, Match, Rules, StringMatch,
    };
    use super::istio::v1::auth::IstioCertificateResponse;
    use super::istio::workload::{address, Address, Port, PortList, TunnelProtocol, Workload};
    use super::*;
    use prost::Message;

    /// A field's key on the wire: (number << 3) | wire type, as a varint.
    fn key(number: u32, wire_type: u32) -> Vec<u8> {
        let mut v = (number << 3) | wire_type;
        let mut out = Vec::new();
        loop {
            if v < 0x80 {
                out.push(v as u8);
                return out;
            }
            out.push((v as u8 & 0x7f) | 0x80);
            v >>= 7;
        }
    }

    /// A length-delimited field as Istio's definitions number it.
    fn field(number: u32, body: &[u8]) -> Vec<u8> {
        let mut out = key(number, 2);
        out.push(body.len() as u8);
        out.extend_from_slice(body);
        out
    }

    /// The field numbers that matter most, checked against bytes built by hand from Istio's
    /// numbering: a wrong number in `proto/` decodes istiod's pushes as empty fields.
    #[test]
    fn workload_fields_have_istios_numbers() {
        let bytes = [
            field(20, b"c1//Pod/ns/a"),
            field(3, &[10, 0, 0, 7]),
            key(5, 0),
            vec![1], // tunnel_protocol HBONE
            field(9, b"node-1"),
            field(
                22,
                &[
                    field(1, b"ns/svc.ns.svc.cluster.local"),
                    field(2, &field(1, &[8, 80, 16, 0x90, 0x3f])),
                ]
                .concat(),
            ),
            field(16, b"ns/allow-a"),
            key(17, 0),
            vec![1], // UNHEALTHY
            field(26, b"an extension this crate leaves out"),
        ]
        .concat();
        let w = Workload::decode(bytes.as_slice()).unwrap();
        assert_eq!(w.uid, "c1//Pod/ns/a");
        assert_eq!(w.addresses, vec![vec![10, 0, 0, 7]]);
        assert_eq!(w.tunnel_protocol(), TunnelProtocol::Hbone);
        assert_eq!(w.node, "node-1");
        let ports = &w.services["ns/svc.ns.svc.cluster.local"];
        assert_eq!(
            ports,
            &PortList {
                ports: vec![Port {
                    service_port: 80,
                    target_port: 8080,
                    app_protocol: 0
                }]
            }
        );
        assert_eq!(w.authorization_policies, vec!["ns/allow-a".to_string()]);
        assert_eq!(w.status, 1);
    }

    #[test]
    fn authorization_fields_have_istios_numbers() {
        let presence = field(4, &[]); // StringMatch.presence (google.protobuf.Empty)
        let matched = [field(4, &presence), key(9, 0), vec![80]].concat(); // not_principals, destination_ports
        let bytes = [
            field(1, b"istio_converted_static_strict"),
            field(2, b"istio-system"),
            key(3, 0),
            vec![2], // WORKLOAD_SELECTOR
            key(4, 0),
            vec![1], // DENY
            field(5, &field(1, &field(2, &matched))),
            key(6, 0),
            vec![1], // dry_run
        ]
        .concat();
        let p = Authorization::decode(bytes.as_slice()).unwrap();
        assert_eq!(p.name, "istio_converted_static_strict");
        assert_eq!(p.action, 1);
        assert_eq!(p.scope, 2);
        assert!(p.dry_run);
        assert_eq!(
            p.groups,
            vec![Group {
                rules: vec![Rules {
                    matches: vec![Match {
                        not_principals: vec![StringMatch {
                            match_type: Some(MatchType::Presence(()))
                        }],
                        destination_ports: vec![80],
                        ..Match::default()
                    }]
                }]
            }]
        );
    }

    /// A push as istiod sends it: resources wrapped in `Any` with the Address type URL, a
    /// removal, a nonce; and the NACK that answers it.
    #[test]
    fn a_delta_push_and_its_nack_round_trip() {
        let workload = Address {
            r#type: Some(address::Type::Workload(Box::new(Workload {
                uid: "u1".into(),
                ..Workload::default()
            }))),
        };
        let push = DeltaDiscoveryResponse {
            type_url: ADDRESS_TYPE_URL.into(),
            nonce: "n1".into(),
            resources: vec![Resource {
                name: "u1".into(),
                version: "v1".into(),
                resource: Some(prost_types::Any {
                    type_url: ADDRESS_TYPE_URL.into(),
                    value: workload.encode_to_vec(),
                }),
                ..Resource::default()
            }],
            removed_resources: vec!["ns/gone.ns.svc.cluster.local".into()],
            ..DeltaDiscoveryResponse::default()
        };
        let wire = push.encode_to_vec();
        // type_url is field 4 and nonce field 5 (Envoy's numbering; 3 is unused).
        assert!(wire
            .windows(2)
            .any(|w| w == [0x22, ADDRESS_TYPE_URL.len() as u8]));
        let got = DeltaDiscoveryResponse::decode(wire.as_slice()).unwrap();
        assert_eq!(got, push);
        let any = got.resources[0].resource.as_ref().unwrap();
        assert_eq!(Address::decode(any.value.as_slice()).unwrap(), workload);

        let nack = DeltaDiscoveryRequest {
            type_url: ADDRESS_TYPE_URL.into(),
            response_nonce: "n1".into(),
            error_detail: Some(Status {
                code: 0,
                message: "u1: address of 5 bytes".into(),
                details: vec![],
            }),
            ..DeltaDiscoveryRequest::default()
        };
        let wire = nack.encode_to_vec();
        assert_eq!(&wire[..2], &[0x12, ADDRESS_TYPE_URL.len() as u8]); // type_url = 2
        assert_eq!(
            DeltaDiscoveryRequest::decode(wire.as_slice()).unwrap(),
            nack
        );
    }

    #[test]
    fn reconnect_versions_and_ca_chains_use_istios_numbers() {
        let mut req = DeltaDiscoveryRequest::default();
        req.initial_resource_versions
            .insert("u1".into(), "v7".into());
        let entry = [field(1, b"u1"), field(2, b"v7")].concat();
        assert_eq!(req.encode_to_vec(), field(5, &entry));

        let chain = [field(1, b"LEAF"), field(1, b"ROOT")].concat();
        let resp = IstioCertificateResponse::decode(chain.as_slice()).unwrap();
        assert_eq!(
            resp.cert_chain,
            vec!["LEAF".to_string(), "ROOT".to_string()]
        );
    }
}
