//! What a reactor lends the parts it routes to for the length of one call: its id, the node
//! state, the driver, the timer heap, the run queue, the pipe pool, its metrics shard and
//! access-log observer, and its flow budget. The HBONE half ([`super::tunnels`]) works through
//! this context; it never sees the reactor itself.

use std::cmp::Reverse;
use std::collections::BinaryHeap;
use std::os::fd::OwnedFd;
use std::time::Instant;

use crate::control_plane::state::State;
use crate::data_plane::driver::{Driver, FlowKey};
use crate::data_plane::first_connection::{Destination, Direction, Resolution, Route};
use crate::data_plane::socket;
use crate::data_plane::splice::PipePool;
use crate::data_plane::timer::{Timer, TimerKind};
use crate::observability::access_log::{self, FlowRecord, Observer};
use crate::observability::metrics::{
    CloseKind, FailureKind, ReactorMetrics, SecurityPolicy, TcpLabels,
};

pub(super) struct Shared<'a> {
    pub id: usize,
    pub state: &'a State,
    pub driver: &'a mut dyn Driver,
    timers: &'a mut BinaryHeap<Reverse<Timer>>,
    runnable: &'a mut Vec<FlowKey>,
    pub pipes: &'a mut PipePool,
    pub metrics: &'a ReactorMetrics,
    pub observer: Option<&'a Observer>,
    next_generation: &'a mut u32,
    /// Plain flows open now and the budget they share with tunnels and their connections.
    pub plain_flows: usize,
    pub max_flows: usize,
}

impl<'a> Shared<'a> {
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        id: usize,
        state: &'a State,
        driver: &'a mut dyn Driver,
        timers: &'a mut BinaryHeap<Reverse<Timer>>,
        runnable: &'a mut Vec<FlowKey>,
        pipes: &'a mut PipePool,
        metrics: &'a ReactorMetrics,
        observer: Option<&'a Observer>,
        next_generation: &'a mut u32,
        plain_flows: usize,
        max_flows: usize,
    ) -> Self {
        Shared {
            id,
            state,
            driver,
            timers,
            runnable,
            pipes,
            metrics,
            observer,
            next_generation,
            plain_flows,
            max_flows,
        }
    }

    /// A generation for a new slab entry (never 0: [`FlowKey::NONE`] has 0).
    pub fn next_gen(&mut self) -> u32 {
        let g = *self.next_generation;
        *self.next_generation = g.wrapping_add(1).max(1);
        g
    }

    pub fn push_timer(&mut self, key: FlowKey, at: Instant, kind: TimerKind) {
        self.timers.push(Reverse(Timer::new(key, at, kind)));
    }

    /// Runs `key` again before the reactor next waits.
    pub fn queue(&mut self, key: FlowKey) {
        self.runnable.push(key);
    }

    /// Resets a connection that will not be proxied, and records why.
    pub fn refuse(
        &mut self,
        fd: OwnedFd,
        kind: FailureKind,
        errno: Option<i32>,
        mut record: FlowRecord,
        now: Instant,
    ) {
        self.metrics.failure(kind);
        self.metrics.closed(CloseKind::Failed);
        socket::close_with_reset(fd);
        record.set_end(CloseKind::Failed, Some(kind), errno, now.elapsed());
        access_log::emit(&record, self.observer);
    }
}

impl Shared<'_> {
    /// Records a connection refused before it had a socket of its own (a CONNECT answered
    /// 400, 401 or 503 on its tunnel).
    pub fn refused(&mut self, kind: FailureKind, mut record: FlowRecord, now: Instant) {
        self.metrics.failure(kind);
        self.metrics.closed(CloseKind::Failed);
        record.set_end(CloseKind::Failed, Some(kind), None, now.elapsed());
        access_log::emit(&record, self.observer);
    }
}

/// Istio's TCP metric labels for a resolved connection.
pub(super) fn tcp_labels(res: &Resolution, state: &State) -> TcpLabels {
    let reg = &state.registry;
    let name_ns = |w: Option<crate::control_plane::workload_registry::WorkloadId>| match w {
        Some(w) => {
            let w = &reg.workload(w).workload;
            (w.name.clone(), w.namespace.clone())
        }
        None => ("unknown".to_string(), "unknown".to_string()),
    };
    let (sw, sns) = name_ns(res.source);
    let (dw, dns) = name_ns(res.destination_workload());
    let service = match res.destination {
        Destination::Service { service, .. } => reg.service(service).hostname.clone(),
        _ => "unknown".into(),
    };
    TcpLabels {
        reporter: match res.direction {
            Direction::Outbound => "source",
            Direction::InboundPlaintext => "destination",
        },
        source_workload: sw,
        source_workload_namespace: sns,
        destination_workload: dw,
        destination_workload_namespace: dns,
        destination_service: service,
        security: match res.route {
            Route::HboneTunnel { .. } => SecurityPolicy::MutualTls,
            _ => SecurityPolicy::None,
        },
    }
}
