//! A reactor: one thread, pinned to a core, owning its driver (io_uring ring or epoll set), its
//! `SO_REUSEPORT` listeners, a slab of flows, a pipe pool, timers and a metrics shard. It accepts
//! captured connections, resolves each first connection, connects upstream, and then only
//! splices. Nothing here is shared with other reactors except the read-only [`State`] and the
//! atomics other threads read.

mod keys;
mod shared;
mod tunnels;

use keys::{entry, entry_mut, kind_of, Keyed, Kind, SLOT_MASK};
use shared::Shared;
use tunnels::Tunnels;

use std::cmp::Reverse;
use std::collections::BinaryHeap;
use std::io;
use std::os::fd::{AsRawFd, OwnedFd};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering::Relaxed, Ordering::SeqCst};
use std::sync::{Arc, Mutex};

use crate::sys::eventfd::Waker;
use std::time::{Duration, Instant};

use slab::Slab;

use super::authorization::{self, Admission, Recheck};
use super::client_address;
use super::driver::{self, Driver, Event, FlowKey, Side};
use super::first_connection::{
    self, Accepted, Destination, Direction, EndpointPicker, RefuseReason, Resolution, Route,
};
use super::flow::{Directions, End, Flow, Phase, Step};
use super::listeners::{Listener, ListenerUpdate};
use super::snapshot::{Published, Snapshot};
use super::socket;
use super::splice::{PipePool, Pump};
use super::timer::{Timer, TimerKind};
use crate::control_plane::state::State;
use crate::observability::access_log::{self, FlowRecord, Observer};
use crate::observability::metrics::{CloseKind, DenialAt, FailureKind, ReactorMetrics};
use crate::redirection::netns::in_netns;
use crate::redirection::original_dst::original_dst;

/// Ring entries: room for accepts, connects and two polls per busy flow per wakeup.
const RING_ENTRIES: u32 = 4096;
/// How long a reactor stays quiet after connections opened or closed before it gives freed
/// memory back.
const IDLE_MEMORY_RETURN: Duration = Duration::from_secs(1);

/// The node's reactors, seen together for the drain: how many still serve connections, and
/// every reactor's waker. A reactor whose connections are all done keeps refusing on its
/// listeners until the last one is done too: its listeners closing early would have the
/// kernel drop the captured SYNs the `SO_REUSEPORT` group still hands them, and those clients
/// would wait out a SYN retransmit instead of being refused at once.
#[derive(Debug)]
struct ReactorGroup {
    wakers: Vec<Waker>,
    /// Reactors that have not finished yet (drained, stopped or failed).
    running: AtomicUsize,
}

/// How other threads talk to a reactor: flags plus an eventfd that wakes its driver.
#[derive(Debug)]
pub struct ReactorControl {
    group: Arc<ReactorGroup>,
    /// This reactor's place in `group`.
    index: usize,
    draining: AtomicBool,
    stop: AtomicBool,
    /// The serial of the snapshot the reactor runs on.
    adopted: AtomicU64,
    /// Listeners a reload made for this reactor, taken when it adopts their snapshot (a lock
    /// the reactor touches only then; the snapshot itself is never behind one).
    listener_updates: Mutex<Vec<ListenerUpdate>>,
}

impl ReactorControl {
    /// The controls of a node's `reactors` reactors, in reactor order.
    pub fn group(reactors: usize) -> io::Result<Vec<Arc<Self>>> {
        let group = Arc::new(ReactorGroup {
            wakers: (0..reactors)
                .map(|_| Waker::new())
                .collect::<io::Result<_>>()?,
            running: AtomicUsize::new(reactors),
        });
        Ok((0..reactors)
            .map(|index| {
                Arc::new(ReactorControl {
                    group: Arc::clone(&group),
                    index,
                    draining: AtomicBool::new(false),
                    stop: AtomicBool::new(false),
                    adopted: AtomicU64::new(0),
                    listener_updates: Mutex::new(Vec::new()),
                })
            })
            .collect())
    }

    fn waker(&self) -> &Waker {
        &self.group.wakers[self.index]
    }

    /// This reactor is done (called once): the last one wakes the others, which were
    /// waiting for it with their listeners still refusing.
    fn finished(&self) {
        if self.group.running.fetch_sub(1, SeqCst) == 1 {
            for w in &self.group.wakers {
                w.wake();
            }
        }
    }

    /// Every reactor of the node is done.
    fn all_finished(&self) -> bool {
        self.group.running.load(SeqCst) == 0
    }

    /// Listeners for the reactor to take when it adopts snapshot `update.serial` (hand them
    /// over before publishing it).
    pub fn hand_listeners(&self, update: ListenerUpdate) {
        self.listener_updates
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push(update);
    }

    fn take_listener_updates(&self, upto: u64) -> Vec<ListenerUpdate> {
        let mut pending = self
            .listener_updates
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        let (ready, later): (Vec<_>, Vec<_>) = pending.drain(..).partition(|u| u.serial <= upto);
        *pending = later;
        ready
    }

    /// A new snapshot was published: wake the reactor so it adopts it now rather than at
    /// its next event.
    pub fn refresh(&self) {
        self.waker().wake();
    }

    /// The serial of the snapshot the reactor runs on (0 before it started).
    pub fn adopted(&self) -> u64 {
        self.adopted.load(SeqCst)
    }

    /// Stop accepting; let open flows finish until the drain timeout.
    pub fn drain(&self) {
        self.draining.store(true, SeqCst);
        self.waker().wake();
    }

    /// Close every flow now and exit.
    pub fn stop(&self) {
        self.stop.store(true, SeqCst);
        self.waker().wake();
    }
}

impl Keyed for Flow {
    fn key(&self) -> FlowKey {
        self.key
    }
}

pub struct ReactorSpec {
    pub id: usize,
    /// Where the node snapshot (state, tunnel credentials) is published; the reactor starts
    /// on the current one. Tunnels are served when it has credentials (`node.tls`).
    pub published: Arc<Published>,
    pub driver: driver::DriverPlan,
    pub listeners: Vec<Listener>,
    pub metrics: Arc<ReactorMetrics>,
    pub control: Arc<ReactorControl>,
    pub observer: Option<Observer>,
    pub max_flows: usize,
    /// Pipes this reactor may have at once (`app::reactor_budget`).
    pub pipes: usize,
    /// Pin the thread to this CPU.
    pub cpu: Option<usize>,
}

pub struct Reactor {
    id: usize,
    published: Arc<Published>,
    /// The snapshot this reactor runs on, and its state (kept apart for short borrows).
    snapshot: Arc<Snapshot>,
    state: Arc<State>,
    driver: Box<dyn Driver>,
    listeners: Vec<Option<Listener>>,
    flows: Slab<Flow>,
    /// Tunnels and the connections they carry; `None` without `node.tls`.
    hbone: Option<Tunnels>,
    pool: PipePool,
    timers: BinaryHeap<Reverse<Timer>>,
    runnable: Vec<FlowKey>,
    picker: EndpointPicker,
    metrics: Arc<ReactorMetrics>,
    control: Arc<ReactorControl>,
    observer: Option<Observer>,
    next_generation: u32,
    max_flows: usize,
    drain_deadline: Option<Instant>,
    /// Flows or tunnels opened or closed, and the reactor has not yet been quiet since: when it
    /// has been for [`IDLE_MEMORY_RETURN`], freed memory goes back to the kernel
    /// (`sys::allocator`).
    return_memory_at: Option<Instant>,
    /// Flows, tunnel streams and tunnels open after the last wakeup, to notice opens and closes.
    open_last: usize,
    /// Draining, and every flow is done: the tunnels were asked to close.
    tunnels_closing: bool,
    /// Told the other reactors it is done (see [`ReactorGroup`]).
    finished: bool,
    warned_tunnel: bool,
}

impl Reactor {
    /// Sets up the driver on the calling thread (a ring belongs to the thread that uses it).
    pub fn new(spec: ReactorSpec) -> io::Result<Reactor> {
        if let Some(cpu) = spec.cpu {
            pin_to(cpu);
        }
        crate::redirection::netns::prepare_thread()?;
        let (driver, fallback) = driver::create(&spec.driver, RING_ENTRIES)?;
        match &fallback {
            Some(reason) => log::info!("reactor {}: using the epoll driver: {reason}", spec.id),
            None => log::info!("reactor {}: using the io_uring driver", spec.id),
        }
        *spec
            .metrics
            .driver
            .lock()
            .unwrap_or_else(|p| p.into_inner()) = driver.kind().label();
        let snapshot = spec.published.load();
        let state = Arc::clone(&snapshot.state);
        let splice = state.config.node.splice;
        let mut r = Reactor {
            id: spec.id,
            driver,
            listeners: spec.listeners.into_iter().map(Some).collect(),
            flows: Slab::new(),
            hbone: snapshot
                .credentials
                .clone()
                .map(|c| Tunnels::new(spec.id, c, &state.config.node)),
            pool: PipePool::new(splice.pipe_size, splice.pipe_pool_size, spec.pipes),
            timers: BinaryHeap::new(),
            runnable: Vec::new(),
            picker: EndpointPicker::default(),
            metrics: spec.metrics,
            control: spec.control,
            observer: spec.observer,
            next_generation: 1,
            max_flows: spec.max_flows.min(SLOT_MASK as usize),
            drain_deadline: None,
            return_memory_at: None,
            open_last: 0,
            tunnels_closing: false,
            finished: false,
            warned_tunnel: false,
            published: spec.published,
            snapshot,
            state,
        };
        r.control.adopted.store(r.snapshot.serial, SeqCst);
        r.driver.watch_waker(r.control.waker().raw_fd())?;
        for i in 0..r.listeners.len() {
            let fd = r.listeners[i]
                .as_ref()
                .map(|l| l.fd.as_raw_fd())
                .unwrap_or(-1);
            r.driver.watch_listener(i, fd)?;
        }
        Ok(r)
    }

    pub fn driver_name(&self) -> &'static str {
        self.driver.kind().label()
    }

    /// Runs until drained or stopped.
    pub fn run(mut self) -> io::Result<()> {
        let served = self.serve();
        if !self.finished {
            self.control.finished();
        }
        // The listeners close with the reactor; connections the driver accepted while it
        // cancelled its requests are refused like any other during a drain, with a reset.
        let mut late = Vec::new();
        self.driver.quiesce(&mut late);
        for ev in late {
            if let Event::Accepted { listener, fd } = ev {
                self.refuse_while_draining(listener, fd);
            }
        }
        served
    }

    fn serve(&mut self) -> io::Result<()> {
        let mut events = Vec::with_capacity(256);
        loop {
            let now = Instant::now();
            let timeout = if !self.runnable.is_empty() {
                Some(Duration::ZERO)
            } else {
                let next = self.timers.peek().map(|t| t.0.at);
                let pool = self.hbone.as_ref().and_then(Tunnels::poll_timeout);
                let next = match (next, pool) {
                    (Some(a), Some(b)) => Some(a.min(b)),
                    (a, b) => a.or(b),
                };
                let next = [self.drain_deadline, self.return_memory_at]
                    .into_iter()
                    .fold(next, |a, b| match (a, b) {
                        (Some(a), Some(b)) => Some(a.min(b)),
                        (a, b) => a.or(b),
                    });
                next.map(|at| at.saturating_duration_since(now))
            };
            self.driver.wait(timeout, &mut events)?;
            let now = Instant::now();
            let quiet = events.is_empty();
            // Before this wakeup's events: the flag is raised before readiness turns 503, so
            // a connection made after a client saw 503 is among these events at the earliest,
            // and is refused rather than served.
            if self.control.draining.load(SeqCst) && self.drain_deadline.is_none() {
                self.start_drain(now);
            }
            if !self.published.is_current(&self.snapshot) {
                self.adopt(now);
            }
            for ev in events.drain(..) {
                self.handle(ev, now);
            }
            self.run_queued(now);
            self.fire_timers(now);
            self.account_pipes();
            self.metrics
                .timers_queued
                .store(self.timers.len() as u64, Relaxed);
            self.return_memory_when_quiet(quiet, now);
            self.metrics.iteration_took(now.elapsed());
            if self.control.stop.load(SeqCst) {
                self.close_all(CloseKind::Drained, now);
                return Ok(());
            }
            if let Some(deadline) = self.drain_deadline {
                if self.flows.is_empty() && self.tunnelled_flows() == 0 {
                    // Tunnels close politely: what their streams handed over is written first,
                    // then close_notify and FIN, then they wait for the peer's EOF (bounded by
                    // the close linger). Returning before that would drop queued bytes with the
                    // socket and reset the peer mid-stream.
                    if !self.tunnels_closing {
                        self.tunnels_closing = true;
                        self.with_hbone(|h, io| h.close_tunnels(io, now));
                    }
                    if self.hbone.as_ref().is_none_or(|h| h.tunnel_count() == 0) {
                        if !self.finished {
                            self.finished = true;
                            log::info!("reactor {}: drained", self.id);
                            self.control.finished();
                        }
                        // Its listeners keep refusing until the other reactors are done.
                        if self.control.all_finished() {
                            return Ok(());
                        }
                    }
                }
                if now >= deadline {
                    log::warn!(
                        "reactor {}: drain deadline passed; resetting {} open flows",
                        self.id,
                        self.flows.len() + self.tunnelled_flows()
                    );
                    self.close_all(CloseKind::Drained, now);
                    return Ok(());
                }
            }
        }
    }

    /// Publishes the pipe pool's state once per wakeup (the pool is the reactor's alone, so its
    /// counts are the totals, whether flows or tunnel streams took the pipes); says
    /// (rate-limited) when flows found every pipe busy and copied instead.
    fn account_pipes(&mut self) {
        let m = &self.metrics;
        m.pipes_pooled.store(self.pool.idle() as u64, Relaxed);
        m.pipes_created.store(self.pool.created, Relaxed);
        m.pipe_resize_refused
            .store(self.pool.resize_refused, Relaxed);
        m.pipes_in_flight
            .store(self.pool.in_flight() as u64, Relaxed);
        let before = m.pipe_budget_exhausted.swap(self.pool.exhausted, Relaxed);
        if self.pool.exhausted > before {
            crate::log_limited!(
                log::Level::Warn,
                "pipe_budget_exhausted",
                "reactor {}: all {} pipes are carrying bytes; {} transfers copied through user \
                 space instead (splice.pipes_per_reactor; ringtun_pipe_budget_exhausted_total)",
                self.id,
                self.pool.budget(),
                self.pool.exhausted - before
            );
        }
        let before = m.pipes_refused.swap(self.pool.refused, Relaxed);
        if self.pool.refused > before {
            crate::log_limited!(
                log::Level::Warn,
                "pipes_refused",
                "reactor {}: the kernel would not make a pipe ({}); {} transfers copied through \
                 user space instead (descriptors, or fs.pipe-user-pages-hard without \
                 CAP_SYS_RESOURCE; ringtun_pipes_refused_total)",
                self.id,
                std::io::Error::from_raw_os_error(self.pool.last_refusal),
                self.pool.refused - before
            );
        }
    }

    /// After connections opened or closed, gives freed memory back once a wakeup finds
    /// nothing to do [`IDLE_MEMORY_RETURN`] after the last change: under churn the allocator's own paths
    /// purge, and a reactor that has gone quiet would otherwise keep its burst's peak.
    fn return_memory_when_quiet(&mut self, quiet: bool, now: Instant) {
        let open = self.flows.len()
            + self
                .hbone
                .as_ref()
                .map_or(0, |h| h.flow_count() + h.tunnel_count());
        // Opening connections frees memory too (resolution, handshakes, first buffers).
        if open != self.open_last {
            self.return_memory_at = Some(now + IDLE_MEMORY_RETURN);
        }
        self.open_last = open;
        if quiet && self.return_memory_at.is_some_and(|at| now >= at) {
            self.return_memory_at = None;
            crate::sys::allocator::return_freed_memory();
            self.metrics.memory_returns.fetch_add(1, Relaxed);
        }
    }

    /// Takes the published snapshot: listeners are re-pointed at the new registry's workloads
    /// (ids are per snapshot; names are not) and a workload that left takes its listeners
    /// with it; tunnels get the new credentials. Called between events, never inside one.
    fn adopt(&mut self, now: Instant) {
        let snapshot = self.published.load();
        if let (Some(h), Some(c)) = (self.hbone.as_mut(), &snapshot.credentials) {
            h.set_credentials(Arc::clone(c));
        }
        if !Arc::ptr_eq(&snapshot.state, &self.state) {
            let state = Arc::clone(&snapshot.state);
            self.state = Arc::clone(&state);
            if self.drain_deadline.is_none() {
                for update in self.control.take_listener_updates(snapshot.serial) {
                    self.take_listeners(update);
                }
            }
            self.repoint_listeners(&state);
            self.recheck(&state, now);
            log::info!(
                "reactor {}: configuration generation {} adopted",
                self.id,
                state.generation
            );
        }
        // The old snapshot is let go before the adoption is announced: the control thread
        // drops its own reference once every reactor announced, so the last reference, and
        // freeing a state of thousands of workloads and policies, stays on its side.
        let serial = snapshot.serial;
        drop(std::mem::replace(&mut self.snapshot, snapshot));
        self.control.adopted.store(serial, SeqCst);
        self.metrics.adopt_took(now.elapsed());
    }

    /// Starts accepting on a reload's new listeners, then closes the older listeners they
    /// replace (in that order: with `SO_REUSEPORT` both are open for a moment, so no
    /// connection finds the port closed). New listeners take new slots: an io_uring accept
    /// being cancelled on an old slot can still complete, and must not be taken for the new
    /// listener's.
    fn take_listeners(&mut self, update: ListenerUpdate) {
        for l in update.listeners {
            let i = self.listeners.len();
            let fd = l.fd.as_raw_fd();
            log::info!(
                "reactor {}: listening on {} for workload {}",
                self.id,
                l.addr,
                l.name
            );
            self.listeners.push(Some(l));
            if let Err(e) = self.driver.watch_listener(i, fd) {
                log::error!("reactor {}: cannot watch a new listener: {e}", self.id);
                self.listeners[i] = None;
            }
        }
        for (i, slot) in self.listeners.iter_mut().enumerate() {
            let replaced = slot
                .as_ref()
                .is_some_and(|l| l.serial < update.serial && update.replaced.contains(&l.name));
            if replaced {
                if let Some(l) = slot.take() {
                    self.driver.unwatch_listener(i, l.fd.as_raw_fd());
                }
            }
        }
    }

    /// Points each listener at its workload in `state`; closes those whose workload is gone
    /// from this node.
    fn repoint_listeners(&mut self, state: &State) {
        let registry = &state.registry;
        for (i, slot) in self.listeners.iter_mut().enumerate() {
            let Some(l) = slot else { continue };
            match registry.workload_by_name(&l.name) {
                Some(id) if registry.workload(id).local => l.workload = id,
                _ => {
                    log::info!(
                        "reactor {}: workload {} left this node; its listener {} closes",
                        self.id,
                        l.name,
                        l.addr
                    );
                    if let Some(l) = slot.take() {
                        self.driver.unwatch_listener(i, l.fd.as_raw_fd());
                    }
                }
            }
        }
    }

    /// Decides every open connection again under `state`: those its policy denies are cut
    /// now (counted, their records naming the policy), those of a workload that left this
    /// node are drained (reset at `timeouts.drain` unless they end first), the rest are not
    /// touched.
    fn recheck(&mut self, state: &State, now: Instant) {
        let drain_at = now + state.config.node.timeouts.drain;
        let mut denied = Vec::new();
        let mut leaving = Vec::new();
        for (_, f) in self.flows.iter() {
            if !state.registry.is_local(&f.owner) {
                if !f.draining {
                    leaving.push(f.key);
                }
                continue;
            }
            let Some(admission) = f.admission else {
                continue;
            };
            match authorization::recheck(state, &admission, None) {
                Recheck::Allowed => {}
                Recheck::Gone => leaving.push(f.key),
                Recheck::Denied { decision, workload } => {
                    denied.push((f.key, admission, decision, workload))
                }
            }
        }
        let cut = denied.len();
        for (key, admission, decision, workload) in denied {
            authorization::count_denial(&self.metrics, state, &decision, DenialAt::Reload);
            if let Some(f) = self.flow_mut(key) {
                authorization::note_recheck(
                    state,
                    workload,
                    &admission,
                    None,
                    &decision,
                    &mut f.record,
                );
            }
            self.finish(key, End::Cut(CloseKind::PolicyDenied));
        }
        let drained = leaving.len();
        for key in leaving {
            if let Some(f) = self.flow_mut(key) {
                f.draining = true;
                self.split().1.push_timer(key, drain_at, TimerKind::Drain);
            }
        }
        let (mut streams_cut, mut streams_drained) = (0, 0);
        self.with_hbone(|h, io| {
            (streams_cut, streams_drained) = h.recheck(io, state, drain_at, now);
        });
        if cut + drained + streams_cut + streams_drained > 0 {
            log::info!(
                "reactor {}: generation {}: {} connections cut (policy denies them now), {} \
                 draining (their workload left this node)",
                self.id,
                state.generation,
                cut + streams_cut,
                drained + streams_drained
            );
        }
    }

    fn start_drain(&mut self, now: Instant) {
        self.drain_deadline = Some(now + self.state.config.node.timeouts.drain);
        // The listeners stay open until the reactor returns, refusing every new connection
        // with a reset (see `handle`); the driver's drop then cancels their accepts before
        // they close.
        // Peers opening streams on our server tunnels should go elsewhere now.
        self.with_hbone(|h, io| h.goaway_server_tunnels(io, now));
        log::info!(
            "reactor {}: draining {} flows",
            self.id,
            self.flows.len() + self.tunnelled_flows()
        );
    }

    fn close_all(&mut self, how: CloseKind, now: Instant) {
        let keys: Vec<usize> = self.flows.iter().map(|(k, _)| k).collect();
        for k in keys {
            let key = self.flows[k].key;
            self.finish(key, End::Cut(how));
        }
        self.with_hbone(|h, io| {
            h.cut_streams(io, how, now);
            h.close_tunnels(io, now);
        });
    }

    /// Lends the HBONE half the reactor's context for one call (nothing without `node.tls`).
    fn with_hbone(&mut self, f: impl FnOnce(&mut Tunnels, &mut Shared<'_>)) {
        let (hbone, mut io) = self.split();
        if let Some(h) = hbone {
            f(h, &mut io);
        }
    }

    /// The HBONE half and the context it works through, borrowed side by side.
    fn split(&mut self) -> (Option<&mut Tunnels>, Shared<'_>) {
        let io = Shared::new(
            self.id,
            &self.state,
            &mut *self.driver,
            &mut self.timers,
            &mut self.runnable,
            &mut self.pool,
            &self.metrics,
            self.observer.as_ref(),
            &mut self.next_generation,
            self.flows.len(),
            self.max_flows,
        );
        (self.hbone.as_mut(), io)
    }

    /// The flow budget is full: an idle server tunnel may give its place up (true if so).
    fn make_room(&mut self, now: Instant) -> bool {
        let (hbone, mut io) = self.split();
        hbone.is_some_and(|h| h.make_room(&mut io, now))
    }

    /// Connections carried by tunnels, open or waiting for one.
    fn tunnelled_flows(&self) -> usize {
        self.hbone.as_ref().map_or(0, Tunnels::flow_count)
    }

    /// Draining: the listeners stay open and refuse with a reset. Closed, a TPROXY listener
    /// would make the kernel drop captured SYNs silently, and clients would wait out their
    /// connect timeout instead of trying elsewhere.
    fn refuse_while_draining(&mut self, listener: usize, fd: OwnedFd) {
        self.metrics.accepted.fetch_add(1, Relaxed);
        self.metrics.failure(FailureKind::Draining);
        let addr = self
            .listeners
            .get(listener)
            .and_then(|l| l.as_ref())
            .map(|l| l.addr.to_string())
            .unwrap_or_default();
        crate::log_limited!(
            log::Level::Info,
            "draining-refused",
            "reactor {}: draining: refused a new connection on {addr} with a reset",
            self.id
        );
        socket::close_with_reset(fd);
    }

    fn handle(&mut self, ev: Event, now: Instant) {
        match ev {
            Event::Accepted { listener, fd } if self.drain_deadline.is_some() => {
                self.refuse_while_draining(listener, fd)
            }
            Event::Accepted { listener, fd } => {
                let hbone = self
                    .listeners
                    .get(listener)
                    .and_then(|l| l.as_ref())
                    .map(|l| (l.hbone, l.workload, l.netns.clone(), l.deliver_client));
                match hbone {
                    Some((true, workload, netns, deliver_client)) => {
                        self.metrics.accepted.fetch_add(1, Relaxed);
                        let (hbone, mut io) = self.split();
                        match hbone {
                            Some(h) => {
                                let to = tunnels::ServedWorkload {
                                    workload,
                                    netns,
                                    deliver_client,
                                };
                                h.accept_tunnel(&mut io, fd, to, now)
                            }
                            None => socket::close_with_reset(fd),
                        }
                    }
                    _ => self.accept(listener, fd, now),
                }
            }
            Event::AcceptFailed { listener, errno } => {
                self.metrics.failure(FailureKind::Accept);
                crate::log_limited!(
                    log::Level::Warn,
                    "accept-failed",
                    "reactor {}: accept on listener {listener} failed: {}",
                    self.id,
                    io::Error::from_raw_os_error(errno)
                );
            }
            Event::Connected { flow, result } => match kind_of(flow) {
                Kind::Direct => self.connected(flow, result, now),
                Kind::Stream => self.with_hbone(|h, io| h.stream_connected(io, flow, result, now)),
                Kind::Tunnel => self.with_hbone(|h, io| h.tunnel_connected(io, flow, result, now)),
            },
            Event::Ready {
                flow,
                side,
                interest,
            } if kind_of(flow) == Kind::Stream => {
                self.with_hbone(|h, io| h.stream_ready(io, flow, side, interest, now))
            }
            Event::Ready { flow, interest, .. } if kind_of(flow) == Kind::Tunnel => {
                self.with_hbone(|h, io| h.tunnel_ready(io, flow, interest, now))
            }
            Event::Ready {
                flow,
                side,
                interest,
            } => {
                let Some(f) = self.flow_mut(flow) else { return };
                f.armed &= !driver::armed_bit(side, interest);
                if f.phase == Phase::Open {
                    self.drive(flow, Directions::for_event(side, interest), now);
                }
            }
            Event::Woken => {
                self.control.waker().drain();
            }
        }
    }

    fn flow_mut(&mut self, key: FlowKey) -> Option<&mut Flow> {
        entry_mut(&mut self.flows, key)
    }

    fn accept(&mut self, listener: usize, fd: OwnedFd, now: Instant) {
        self.metrics.accepted.fetch_add(1, Relaxed);
        let Some(l) = self.listeners.get(listener).and_then(|l| l.as_ref()) else {
            socket::close_with_reset(fd);
            return;
        };
        let (workload, direction, netns) = (l.workload, l.direction, l.netns.clone());
        let deliver_client = l.deliver_client;
        let owner = Arc::clone(&l.name);
        let mut record = FlowRecord::new(
            self.id,
            match direction {
                Direction::Outbound => "outbound",
                Direction::InboundPlaintext => "inbound",
            },
        );
        let raw = fd.as_raw_fd();
        let (local, peer) = match (socket::local_addr(raw), socket::peer_addr(raw)) {
            (Ok(l), Ok(p)) => (l, p),
            // The client went away between accept and now.
            _ => return self.refuse(fd, FailureKind::DownstreamReset, None, record, now),
        };
        record.client = peer;
        let orig = match (direction, original_dst(raw, &local)) {
            (_, Ok(dst)) => dst,
            // TPROXY leaves no NAT behind: the local address is the original destination.
            (Direction::InboundPlaintext, Err(_)) => local,
            (Direction::Outbound, Err(e)) => {
                return self.refuse(
                    fd,
                    FailureKind::NoOriginalDst,
                    e.raw_os_error(),
                    record,
                    now,
                );
            }
        };
        record.original_dst = orig;
        record.upstream = orig;
        if self.flows.len() + self.hbone.as_ref().map_or(0, Tunnels::entries) >= self.max_flows
            && !self.make_room(now)
        {
            return self.refuse(fd, FailureKind::FlowLimit, None, record, now);
        }
        let accepted = Accepted {
            direction,
            listener_workload: workload,
            peer,
            original_dst: orig,
        };
        let res = first_connection::resolve(
            &self.state.registry,
            &self.state.config.node.ports,
            &accepted,
            &mut self.picker,
        );
        describe(&mut record, &res, &self.state);
        let kind = match res.route {
            Route::DirectTcp => None,
            Route::Refuse(RefuseReason::Loop) => Some(FailureKind::Loop),
            Route::Refuse(RefuseReason::NoHealthyEndpoint) => Some(FailureKind::NoHealthyEndpoint),
            Route::Refuse(RefuseReason::NotForThisWorkload) => {
                Some(FailureKind::NotForThisWorkload)
            }
            Route::HboneTunnel { .. } if self.hbone.is_some() => {
                let (hbone, mut io) = self.split();
                let h = hbone.expect("checked");
                return h.start_outbound_stream(&mut io, fd, res, record, netns, owner, now);
            }
            Route::HboneTunnel { .. } => {
                if !self.warned_tunnel {
                    self.warned_tunnel = true;
                    log::warn!(
                        "reactor {}: {} needs an HBONE tunnel but node.tls is not configured; \
                         such connections are refused (hbone_tunnel_unavailable)",
                        self.id,
                        record.destination
                    );
                }
                Some(FailureKind::TunnelUnavailable)
            }
        };
        if let Some(kind) = kind {
            return self.refuse(fd, kind, None, record, now);
        }
        // The destination node decides: plaintext arriving for a local workload is authorized
        // here, without an identity (outbound connections are judged where they arrive).
        let admission = match res.direction {
            Direction::InboundPlaintext => {
                let admission = Admission {
                    destination: res.original_dst,
                    source_ip: peer.ip(),
                };
                let decision =
                    authorization::authorize(&self.state, workload, &admission, None, &mut record);
                if !decision.is_allowed() {
                    authorization::count_denial(
                        &self.metrics,
                        &self.state,
                        &decision,
                        DenialAt::Connect,
                    );
                    return self.refuse(fd, FailureKind::PolicyDenied, None, record, now);
                }
                Some(admission)
            }
            Direction::Outbound => None,
        };
        let mark = self.state.config.node.socket_mark;
        // Inbound: delivered from the client's address where the workload's namespace allows.
        let source = match res.direction {
            Direction::InboundPlaintext => {
                client_address::delivery_source(deliver_client, peer, res.upstream)
            }
            Direction::Outbound => None,
        };
        let buffer = self.state.config.node.limits.flow_receive_buffer;
        let up = match in_netns(netns.as_ref(), || {
            socket::delivery_socket(&res.upstream, mark, source, buffer)
        }) {
            Ok(Ok(s)) => s,
            Ok(Err(e)) | Err(e) => {
                log::warn!(
                    "reactor {}: cannot make the upstream socket for {}: {e}",
                    self.id,
                    res.upstream
                );
                return self.refuse(fd, FailureKind::SocketSetup, e.raw_os_error(), record, now);
            }
        };
        let _ = socket::set_nodelay(raw);
        let labels = shared::tcp_labels(&res, &self.state);
        let counters = self.metrics.tcp_counters(labels);
        let generation = self.split().1.next_gen();
        let entry = self.flows.vacant_entry();
        let key = FlowKey {
            index: entry.key() as u32,
            generation,
        };
        let upstream = res.upstream;
        let up_raw = up.as_raw_fd();
        entry.insert(Flow {
            key,
            down: fd,
            up,
            phase: Phase::Connecting,
            to_upstream: Pump::default(),
            to_downstream: Pump::default(),
            armed: 0,
            queued: false,
            started: now,
            last_active: now,
            resolution: res,
            admission,
            owner,
            draining: false,
            counters,
            record,
        });
        self.metrics.flows_open.fetch_add(1, Relaxed);
        // Connect first: epoll must not watch a socket that has not started connecting, or it
        // reports the fresh socket's HUP as a finished connect.
        let registered = self
            .driver
            .connect(key, up_raw, upstream)
            .and_then(|_| self.driver.register(key, Side::Upstream, up_raw))
            .and_then(|_| self.driver.register(key, Side::Downstream, raw));
        if let Err(e) = registered {
            log::warn!(
                "reactor {}: cannot start connect to {upstream}: {e}",
                self.id
            );
            return self.finish(
                key,
                End::Broken {
                    failed: Side::Upstream,
                    kind: FailureKind::SocketSetup,
                    errno: e.raw_os_error().unwrap_or(0),
                },
            );
        }
        let deadline = now + self.state.config.node.timeouts.connect;
        self.split().1.push_timer(key, deadline, TimerKind::Connect);
    }

    /// Resets a connection that will not be proxied, and records why.
    fn refuse(
        &mut self,
        fd: OwnedFd,
        kind: FailureKind,
        errno: Option<i32>,
        record: FlowRecord,
        now: Instant,
    ) {
        self.split().1.refuse(fd, kind, errno, record, now);
    }

    fn connected(&mut self, key: FlowKey, result: Result<(), i32>, now: Instant) {
        let idle = self.state.config.node.timeouts.idle;
        let Some(f) = self.flow_mut(key) else { return };
        if f.phase != Phase::Connecting {
            return;
        }
        match result {
            Ok(()) => {
                f.phase = Phase::Open;
                f.counters.opened.fetch_add(1, Relaxed);
                f.last_active = now;
                self.split().1.push_timer(key, now + idle, TimerKind::Idle);
                self.drive(key, Directions::BOTH, now);
            }
            Err(errno) => {
                let kind = FailureKind::from_connect_errno(errno);
                self.finish(
                    key,
                    End::Broken {
                        failed: Side::Upstream,
                        kind,
                        errno,
                    },
                );
            }
        }
    }

    fn drive(&mut self, key: FlowKey, which: Directions, now: Instant) {
        let budget = self.state.config.node.splice.max_bytes_per_wakeup;
        let short_read_drains = self.driver.arming_checks_level();
        let Some(f) = entry_mut(&mut self.flows, key) else {
            return;
        };
        match f.drive(
            which,
            short_read_drains,
            &mut self.pool,
            budget,
            &self.metrics,
            now,
        ) {
            Step::Continue { wants, yielded } => {
                for (side, interest) in wants.iter() {
                    if !f.is_armed(side, interest) {
                        let fd = match side {
                            Side::Downstream => f.down.as_raw_fd(),
                            Side::Upstream => f.up.as_raw_fd(),
                        };
                        if self.driver.arm(key, side, interest, fd) {
                            f.armed |= driver::armed_bit(side, interest);
                        }
                    }
                }
                if yielded && !f.queued {
                    f.queued = true;
                    self.runnable.push(key);
                }
            }
            Step::Finished(end) => self.finish(key, end),
        }
    }

    fn run_queued(&mut self, now: Instant) {
        if self.runnable.is_empty() {
            return;
        }
        let queued = std::mem::take(&mut self.runnable);
        for key in queued {
            match kind_of(key) {
                Kind::Direct => {
                    if let Some(f) = self.flow_mut(key) {
                        f.queued = false;
                        self.drive(key, Directions::BOTH, now);
                    }
                }
                // A tunnel queues its own streams; only tunnels are queued here.
                Kind::Stream => {}
                Kind::Tunnel => self.with_hbone(|h, io| h.run_tunnel(io, key, now)),
            }
        }
    }

    /// Timers of finished flows stay in the heap until their time comes (a binary heap cannot
    /// remove from the middle): an hour-long idle timer per flow would pile up at thousands of
    /// connections per second. When the heap holds far more timers than live owners could
    /// need, it is rebuilt with only the timers whose owner still exists.
    fn compact_timers(&mut self) {
        let live = self.flows.len() + self.hbone.as_ref().map_or(0, Tunnels::entries);
        if self.timers.len() <= 4 * live + 256 {
            return;
        }
        let before = self.timers.len();
        let timers = std::mem::take(&mut self.timers).into_vec();
        let kept: Vec<Reverse<Timer>> = timers
            .into_iter()
            .filter(|Reverse(t)| {
                let key = FlowKey {
                    index: t.index,
                    generation: t.generation,
                };
                match kind_of(key) {
                    Kind::Direct => entry(&self.flows, key).is_some(),
                    Kind::Stream | Kind::Tunnel => {
                        self.hbone.as_ref().is_some_and(|h| h.holds(key))
                    }
                }
            })
            .collect();
        log::debug!(
            "reactor {}: timer heap compacted from {before} to {} entries",
            self.id,
            kept.len()
        );
        self.timers = BinaryHeap::from(kept);
    }

    fn fire_timers(&mut self, now: Instant) {
        let idle = self.state.config.node.timeouts.idle;
        self.compact_timers();
        self.with_hbone(|h, io| h.pool_timers(io, now));
        while let Some(Reverse(t)) = self.timers.peek().copied() {
            if t.at > now {
                break;
            }
            self.timers.pop();
            let key = FlowKey {
                index: t.index,
                generation: t.generation,
            };
            match kind_of(key) {
                Kind::Direct => {}
                Kind::Stream => {
                    self.with_hbone(|h, io| h.stream_timer(io, key, t, now));
                    continue;
                }
                Kind::Tunnel => {
                    self.with_hbone(|h, io| h.tunnel_timer(io, key, t, now));
                    continue;
                }
            }
            let Some(f) = self.flow_mut(key) else {
                continue;
            };
            match t.kind {
                TimerKind::Connect if f.phase == Phase::Connecting => {
                    self.finish(
                        key,
                        End::Broken {
                            failed: Side::Upstream,
                            kind: FailureKind::UpstreamConnectTimeout,
                            errno: libc::ETIMEDOUT,
                        },
                    );
                }
                TimerKind::Drain => self.finish(key, End::Cut(CloseKind::Drained)),
                TimerKind::Connect | TimerKind::Session | TimerKind::Linger => {}
                TimerKind::Idle => {
                    let due = f.last_active + idle;
                    if due <= now {
                        self.finish(key, End::Cut(CloseKind::IdleTimeout));
                    } else {
                        self.timers.push(Reverse(Timer { at: due, ..t }));
                    }
                }
            }
        }
    }

    /// Removes a flow: drops the driver's requests, returns empty pipes, closes both sockets
    /// (with a reset on the side that did not break, when one did), counts and logs it.
    fn finish(&mut self, key: FlowKey, end: End) {
        if self
            .flows
            .get(key.index as usize)
            .is_none_or(|f| f.key != key)
        {
            return;
        }
        let mut f = self.flows.remove(key.index as usize);
        self.driver
            .release(key, f.armed, f.phase == Phase::Connecting);
        f.to_upstream.release(&mut self.pool);
        f.to_downstream.release(&mut self.pool);
        self.metrics.flows_open.fetch_sub(1, Relaxed);
        let was_open = f.phase == Phase::Open;
        if was_open {
            f.counters.closed.fetch_add(1, Relaxed);
        }
        let (close, failure, errno) = match end {
            End::Cut(kind) => {
                socket::close_with_reset(f.down);
                socket::close_with_reset(f.up);
                (kind, None, None)
            }
            End::Clean => {
                drop(f.down);
                drop(f.up);
                (CloseKind::Clean, None, None)
            }
            End::Broken {
                failed,
                kind,
                errno,
            } => {
                // The broken side is closed as it is; the other learns of it as a reset.
                match failed {
                    Side::Downstream => {
                        drop(f.down);
                        socket::close_with_reset(f.up);
                    }
                    Side::Upstream => {
                        drop(f.up);
                        socket::close_with_reset(f.down);
                    }
                }
                self.metrics.failure(kind);
                let close = CloseKind::broken(was_open);
                (close, Some(kind), Some(errno).filter(|e| *e != 0))
            }
        };
        self.metrics.closed(close);
        f.record.set_end(close, failure, errno, f.started.elapsed());
        access_log::emit(&f.record, self.observer.as_ref());
    }
}

/// Fills the access-log fields that come from the resolution.
fn describe(record: &mut FlowRecord, res: &Resolution, state: &State) {
    let reg = &state.registry;
    record.source_workload = res
        .source
        .map(|w| {
            let w = &reg.workload(w).workload;
            format!("{}/{}", w.namespace, w.name)
        })
        .unwrap_or_else(|| "unknown".into());
    record.destination = match res.destination {
        Destination::Service { service, endpoint } => {
            let w = &reg.workload(endpoint).workload;
            format!(
                "service:{} endpoint:{}/{}",
                reg.service(service).hostname,
                w.namespace,
                w.name
            )
        }
        Destination::Workload(w) => {
            let w = &reg.workload(w).workload;
            format!("workload:{}/{}", w.namespace, w.name)
        }
        Destination::OutOfMesh => "out_of_mesh".into(),
    };
    record.route = match res.route {
        Route::DirectTcp => "direct_tcp",
        Route::HboneTunnel { .. } => "hbone",
        Route::Refuse(_) => "refused",
    };
    record.upstream = res.upstream;
    record.destination_identity = res.destination_identity(reg).map(str::to_owned);
}

fn pin_to(cpu: usize) {
    if let Err(e) = crate::sys::process::pin_to_cpu(cpu) {
        log::warn!("cannot pin reactor thread to CPU {cpu}: {e}");
    }
}
