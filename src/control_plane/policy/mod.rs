//! Authorization at the first connection: Istio's L4 AuthorizationPolicy semantics, evaluated by
//! the destination node before it connects a workload.
//!
//! Boundary: no IO anywhere in here. `model` is the policy data exactly as istiod sends it to
//! ztunnel (`istio.security.Authorization`); `convert` turns ringtun's YAML into that model the
//! way istiod converts Istio's AuthorizationPolicy (label selectors resolved against workload
//! labels); `compile` builds the immutable [`PolicySet`] a snapshot carries (which policies apply
//! to each local workload, rules flattened); `evaluate` decides one connection without
//! allocating. A later xDS client will produce the model and its bindings itself and share
//! everything from `compile` on. Enforcement (401 on HBONE, a reset on 15006), its access log
//! and metrics belong to the data path, which calls [`PolicySet::evaluate`].

mod compile;
mod convert;
mod evaluate;
mod model;

#[cfg(test)]
mod oracle;
#[cfg(test)]
mod semantics_tests;

pub use compile::{Applicable, Bindings, PolicyId, PolicySet};
pub use convert::{convert_policy, from_config};
pub use evaluate::{
    Connection, Decision, LogOnlyKind, LogOnlyMatch, LogOnlyMatches, Reason, RuleRef, Verdict,
};
pub use model::{
    Action, Authorization, Clause, IpBlock, IpBlockError, Match, PolicyKey, Rule, Scope,
    ServiceAccountMatch, StringMatch,
};

use crate::control_plane::config::Config;
use crate::control_plane::workload_registry::Registry;

impl PolicySet {
    /// The policy snapshot of a configuration, for the local workloads of `registry` (which
    /// must be built from the same configuration).
    pub fn from_config(config: &Config, registry: &Registry) -> PolicySet {
        let (policies, bindings) = from_config(config, registry);
        PolicySet::compile(policies, &bindings, registry)
    }
}
