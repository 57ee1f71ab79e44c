//! The immutable snapshot reactors read: validated configuration, the registry built from it and
//! the compiled authorization policies, stamped with a generation. Reactors hold an `Arc<State>`
//! and never lock it.

use std::sync::Arc;

use super::config::Config;
use super::policy::PolicySet;
use super::workload_registry::Registry;

#[derive(Debug)]
pub struct State {
    pub generation: u64,
    pub config: Arc<Config>,
    pub registry: Registry,
    /// What decides a connection to a local workload: `policies.evaluate(&connection)`.
    pub policies: PolicySet,
}

impl State {
    pub fn new(config: Config, generation: u64) -> Arc<State> {
        let registry = Registry::new(&config);
        let policies = PolicySet::from_config(&config, &registry);
        Arc::new(State {
            generation,
            config: Arc::new(config),
            registry,
            policies,
        })
    }
}
