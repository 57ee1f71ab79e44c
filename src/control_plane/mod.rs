//! What the node knows: configuration, the workload registry built from it, mesh identities,
//! the authorization policies, and the resolution of a connection's destination. Everything
//! here is plain data and pure functions, no IO — except `certs`, which reads and writes
//! certificate files, and `node_ca`, which reads the node CA's (and issues in memory).

pub mod certs;
pub mod config;
pub mod identity;
pub mod istio_ca;
pub mod istiod;
pub mod node_ca;
pub mod policy;
pub mod state;
pub mod workload_registry;
pub mod xds;
