//! ringtun as istiod's client, as ztunnel is: the resources istiod pushes over delta xDS
//! (`istio.workload.Address`, `istio.security.Authorization`), turned into ringtun's model.
//!
//! Pure conversions, no IO: each resource converts on its own, and one that cannot is
//! rejected with a reason for the NACK (`<path in the resource>: <why>`), never half-applied
//! or silently narrowed. The messages come from the `istio-api` crate (generated at build time
//! from its own `.proto` files, without `protoc`).

pub mod address;
pub mod authorization;
pub mod client;
pub mod delta;
pub mod store;

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use istio_api::prost::Message;
use istio_api::prost_types::Any;

/// The message inside one pushed resource, which must be of `type_url`.
pub fn decode_resource<M: Message + Default>(type_url: &str, any: &Any) -> Result<M, String> {
    if any.type_url != type_url {
        return Err(format!("resource: type {:?}, not {type_url}", any.type_url));
    }
    M::decode(any.value.as_slice()).map_err(|e| format!("resource: does not decode: {e}"))
}

/// A resource's name must be its key: a resource named otherwise would be applied, removed
/// and versioned under one name while meaning another.
pub fn check_name(name: &str, key: &str) -> Result<(), String> {
    if name == key {
        Ok(())
    } else {
        Err(format!("name: {name:?} is not the resource's key {key:?}"))
    }
}

/// An address as xDS carries it: 4 bytes (IPv4) or 16 (IPv6).
pub fn ip_from_bytes(bytes: &[u8]) -> Result<IpAddr, String> {
    match bytes.len() {
        4 => Ok(IpAddr::V4(Ipv4Addr::from(
            <[u8; 4]>::try_from(bytes).expect("4 bytes"),
        ))),
        16 => Ok(IpAddr::V6(Ipv6Addr::from(
            <[u8; 16]>::try_from(bytes).expect("16 bytes"),
        ))),
        n => Err(format!("an address of {n} bytes (IPv4 has 4, IPv6 16)")),
    }
}
