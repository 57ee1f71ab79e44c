//! What the node knows: configuration, the workload registry built from it, mesh identities,
//! the authorization policies, and the resolution of a connection's destination. Everything
//! here is plain data and pure functions, no IO — except `certs`, which reads and writes
//! certificate files.

pub mod certs;
pub mod config;
pub mod identity;
pub mod policy;
pub mod state;
pub mod workload_registry;
