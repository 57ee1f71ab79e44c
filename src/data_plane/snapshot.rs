//! What the reactors read: the node state and the tunnel credentials of one moment, published
//! whole by the control thread — at start, at every successful reload, at every certificate
//! rotation — and loaded by each reactor at every wakeup: an atomic pointer load through
//! `arc-swap`, never a lock. A reactor that sees a new snapshot adopts it between events, so
//! a connection is always decided against one consistent snapshot.

use std::sync::Arc;

use arc_swap::ArcSwap;

use crate::control_plane::state::State;
use crate::tls::credentials::TunnelCredentials;

pub struct Snapshot {
    /// Increases with every publication (config or credentials); a reactor reports the serial
    /// it runs, so the control thread knows when every reactor let go of the old one.
    pub serial: u64,
    pub state: Arc<State>,
    /// `None` without `node.tls`.
    pub credentials: Option<Arc<TunnelCredentials>>,
}

/// Where the current snapshot lives: the control thread stores, reactors load.
pub struct Published(ArcSwap<Snapshot>);

impl Published {
    pub fn new(first: Snapshot) -> Arc<Published> {
        Arc::new(Published(ArcSwap::from_pointee(first)))
    }

    /// The current snapshot (a reference count taken; cheap).
    pub fn load(&self) -> Arc<Snapshot> {
        self.0.load_full()
    }

    /// Whether `held` is still the current snapshot: a pointer comparison, no reference count.
    pub fn is_current(&self, held: &Arc<Snapshot>) -> bool {
        Arc::ptr_eq(&self.0.load(), held)
    }

    /// Publishes `next`; returns the snapshot it replaced.
    pub fn store(&self, next: Snapshot) -> Arc<Snapshot> {
        self.0.swap(Arc::new(next))
    }
}
