//! ringtun as istiod's client, as ztunnel is: the resources istiod pushes over delta xDS
//! (`istio.workload.Address`, `istio.security.Authorization`), turned into ringtun's model.
//!
//! Pure conversions, no IO: each resource converts on its own, and one that cannot is
//! rejected with a reason for the NACK (`<path in the resource>: <why>`), never half-applied
//! or silently narrowed. The messages come from the `istio-api` crate (generated at build time
//! from its own `.proto` files, without `protoc`).

pub mod authorization;
