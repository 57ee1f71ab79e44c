//! Authorization at the first connection: Istio's L4 AuthorizationPolicy semantics, evaluated by
//! the destination node before it connects a workload.
//!
//! Boundary: no IO anywhere in here. `model` is the policy data exactly as istiod sends it to
//! ztunnel (`istio.security.Authorization`).

mod model;

pub use model::{
    Action, Authorization, Clause, IpBlock, IpBlockError, Match, PolicyKey, Rule, Scope,
    ServiceAccountMatch, StringMatch,
};
