//! What the node knows: configuration, the workload registry built from it, and the resolution
//! of a connection's destination. Everything here is plain data and pure functions, no IO.

pub mod config;
pub mod state;
pub mod workload_registry;
