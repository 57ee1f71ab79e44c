//! The immutable snapshot reactors read: validated configuration and the registry built from it,
//! stamped with a generation. Reactors hold an `Arc<State>` and never lock it.

use std::sync::Arc;

use super::config::Config;
use super::workload_registry::Registry;

#[derive(Debug)]
pub struct State {
    pub generation: u64,
    pub config: Arc<Config>,
    pub registry: Registry,
}

impl State {
    pub fn new(config: Config, generation: u64) -> Arc<State> {
        let registry = Registry::new(&config);
        Arc::new(State {
            generation,
            config: Arc::new(config),
            registry,
        })
    }
}
