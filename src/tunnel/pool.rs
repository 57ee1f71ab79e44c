//! Tunnel pooling: which HBONE tunnel a new outbound connection rides, as pure bookkeeping.
//!
//! One [`TunnelPool`] belongs to one reactor (DESIGN.md §3: no cross-thread locks). It never
//! touches a socket or reads a clock: tunnels are opaque [`TunnelId`]s, waiting flows are
//! opaque tokens `W` chosen by the caller, and every time is an [`Instant`] passed in. The
//! reactor does the IO and reports what happened (`tunnel_ready`, `stream_closed`,
//! `goaway_received`, `tunnel_failed`, ...); the pool answers with decisions.
//!
//! A tunnel is keyed by [`PoolKey`]: the source workload's identity (the client certificate it
//! presents), the destination node's HBONE address, and the identity the server must prove.
//! New connections with the same key reuse an open tunnel while it has spare streams: the
//! limit is the smaller of the peer's SETTINGS_MAX_CONCURRENT_STREAMS and the configured cap
//! (100 by default, as ztunnel). A tunnel moves through [`TunnelState`]:
//!
//! ```text
//! Connecting ──tunnel_ready──▶ Ready ──goaway_received / retire / stream budget──▶ Draining
//!     │                          │  (no stream for idle_timeout)                       │
//!     └─goaway/retire─▶ Draining └──────────────▶ Closed ◀── last stream closed ──────┘
//! any state ──tunnel_failed──▶ Closed (waiters handed back to be reset)
//! ```
//!
//! A draining tunnel finishes its streams but never gets a new one. While a tunnel connects,
//! further checkouts for its key wait on it (at most the configured cap per tunnel, and at most
//! [`PoolConfig::max_waiters`] in the whole pool — beyond that a checkout is refused, so a slow
//! handshake cannot pile up unbounded flows). Streams are reserved when they are granted, so
//! the counts are exact even if the caller opens the HTTP/2 stream a little later; the caller
//! gives each back with [`TunnelPool::stream_closed`] (also when opening it failed).
//!
//! Tunnels the pool wants closed (idle, or draining with no stream left) are reported as
//! [`PoolEvent`]s from [`TunnelPool::poll_event`]; the caller sends GOAWAY and closes them.
//! The per-key and per-tunnel scans are linear: a reactor holds a handful of tunnels per
//! destination node, not thousands.

use std::collections::{HashMap, VecDeque};
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use crate::control_plane::identity::SpiffeId;

/// ztunnel's default cap on streams per pooled tunnel.
pub const DEFAULT_MAX_STREAMS_PER_TUNNEL: u32 = 100;
/// ztunnel's default for releasing an unused pooled connection (5 minutes).
pub const DEFAULT_IDLE_TIMEOUT: Duration = Duration::from_secs(300);
/// Flows that may wait for connecting tunnels in one pool.
pub const DEFAULT_MAX_WAITERS: usize = 1024;
/// Client-initiated stream ids are odd and below 2^31: a connection has 2^30 of them.
pub const CLIENT_STREAM_ID_BUDGET: u64 = 1 << 30;

/// What makes two connections able to share a tunnel.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct PoolKey {
    /// The identity the client certificate carries (the source workload's).
    pub source: SpiffeId,
    /// The destination node's HBONE address (`Route::HboneTunnel { peer }`).
    pub peer: SocketAddr,
    /// The identity the server certificate must carry.
    pub expected: SpiffeId,
}

/// An opaque tunnel handle. Ids are never reused within one pool.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct TunnelId(pub u64);

/// Pool settings.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PoolConfig {
    /// Streams one tunnel carries at most, whatever the peer allows (at least 1).
    pub max_streams_per_tunnel: u32,
    /// A ready tunnel with no stream for this long is closed.
    pub idle_timeout: Duration,
    /// Flows waiting for connecting tunnels, across the pool; checkouts beyond are refused.
    pub max_waiters: usize,
    /// Streams a tunnel opens in its life before it drains and a new one takes over.
    pub stream_budget: u64,
}

impl Default for PoolConfig {
    fn default() -> Self {
        PoolConfig {
            max_streams_per_tunnel: DEFAULT_MAX_STREAMS_PER_TUNNEL,
            idle_timeout: DEFAULT_IDLE_TIMEOUT,
            max_waiters: DEFAULT_MAX_WAITERS,
            stream_budget: CLIENT_STREAM_ID_BUDGET,
        }
    }
}

/// Where a tunnel is in its life.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TunnelState {
    /// TCP connect, TLS handshake and HTTP/2 preface in progress; flows queue on it.
    Connecting,
    /// Carries streams and takes new ones up to its limit.
    Ready,
    /// GOAWAY received or retirement budget reached: finishes its streams, takes no new one.
    Draining,
    /// Gone from the pool (also the answer for an id the pool does not hold).
    Closed,
}

/// The answer to [`TunnelPool::checkout`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Checkout {
    /// A stream on this ready tunnel is reserved for the flow: open it now.
    Reuse(TunnelId),
    /// No tunnel can take the flow: start connecting this new tunnel. The flow is queued on it
    /// and gets its stream from [`TunnelPool::tunnel_ready`].
    Open(TunnelId),
    /// The flow is queued on this connecting tunnel (no new handshake).
    Wait(TunnelId),
    /// The flow cannot be served: reset it.
    Refuse(PoolRefusal),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PoolRefusal {
    /// [`PoolConfig::max_waiters`] flows already wait for handshakes.
    TooManyWaiters,
}

impl PoolRefusal {
    /// Metrics label.
    pub fn label(self) -> &'static str {
        match self {
            PoolRefusal::TooManyWaiters => "tunnel_pool_waiters_full",
        }
    }
}

/// What became of a connecting tunnel's queued flows when it became ready.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Ready<W> {
    /// Each has a stream reserved on the tunnel: open them, in this order.
    pub granted: Vec<W>,
    /// The peer allows fewer streams than were queued: check these out again (they may
    /// wait on, or open, another tunnel).
    pub retry: Vec<W>,
    /// The peer allows no stream at all (MAX_CONCURRENT_STREAMS 0): reset these. The tunnel
    /// is reported for closing.
    pub refused: Vec<W>,
}

/// What the caller must do for a tunnel the pool has let go.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PoolEvent {
    /// Send GOAWAY and close the tunnel's connection; it is already out of the pool.
    Close {
        tunnel: TunnelId,
        reason: CloseReason,
    },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CloseReason {
    /// Ready with no stream for the idle timeout.
    Idle,
    /// Draining and its last stream closed.
    Drained,
    /// The peer allows no stream.
    NoStreams,
}

impl CloseReason {
    /// Metrics label.
    pub fn label(self) -> &'static str {
        match self {
            CloseReason::Idle => "idle",
            CloseReason::Drained => "drained",
            CloseReason::NoStreams => "no_streams",
        }
    }
}

/// A report that does not fit the tunnel's state; the pool is unchanged.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum PoolError {
    #[error("tunnel {0:?} is not in the pool")]
    UnknownTunnel(TunnelId),
    #[error("tunnel {0:?} is not connecting")]
    NotConnecting(TunnelId),
    #[error("tunnel {0:?} has no open stream to close")]
    NoOpenStream(TunnelId),
}

/// A failed tunnel's flows: reset them all.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Failed<W> {
    /// Flows that were waiting for the handshake.
    pub waiters: Vec<W>,
    /// Streams that were open on it (the caller knows which flows they are).
    pub open_streams: u32,
}

/// Counters for metrics, monotonic.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct PoolCounters {
    /// New tunnels (TLS handshakes) started.
    pub handshakes_started: u64,
    /// Checkouts answered with a stream on an existing ready tunnel.
    pub reuses: u64,
    /// Checkouts queued on a connecting tunnel.
    pub waits: u64,
    /// Checkouts refused.
    pub refused: u64,
    /// Tunnels reported failed.
    pub failures: u64,
    /// GOAWAYs received.
    pub goaways: u64,
    /// Tunnels retired (external budget or stream budget).
    pub retirements: u64,
    pub closed_idle: u64,
    pub closed_drained: u64,
}

#[derive(Debug)]
struct Tunnel<W> {
    key: PoolKey,
    state: TunnelState,
    /// Streams reserved or open.
    active: u32,
    /// min(cap, peer's MAX_CONCURRENT_STREAMS); the cap while connecting.
    limit: u32,
    waiters: VecDeque<W>,
    /// Streams granted over the tunnel's life.
    opened: u64,
    /// Ready with no stream since then.
    idle_since: Option<Instant>,
}

/// Per-reactor tunnel pool. `W` is the caller's token for a waiting flow.
#[derive(Debug)]
pub struct TunnelPool<W> {
    config: PoolConfig,
    next_id: u64,
    tunnels: HashMap<TunnelId, Tunnel<W>>,
    /// Tunnels of a key, oldest first (new streams pack onto the oldest with room).
    by_key: HashMap<PoolKey, Vec<TunnelId>>,
    waiters_total: usize,
    events: VecDeque<PoolEvent>,
    counters: PoolCounters,
}

impl<W> TunnelPool<W> {
    pub fn new(config: PoolConfig) -> Self {
        let config = PoolConfig {
            max_streams_per_tunnel: config.max_streams_per_tunnel.max(1),
            stream_budget: config.stream_budget.max(1),
            ..config
        };
        TunnelPool {
            config,
            next_id: 0,
            tunnels: HashMap::new(),
            by_key: HashMap::new(),
            waiters_total: 0,
            events: VecDeque::new(),
            counters: PoolCounters::default(),
        }
    }

    pub fn config(&self) -> &PoolConfig {
        &self.config
    }

    /// Finds a tunnel for a new connection with this key; see [`Checkout`].
    ///
    /// A ready tunnel whose idle time has run out by `now` is closed here rather than reused,
    /// so the answer does not depend on whether [`TunnelPool::handle_timeout`] ran first.
    pub fn checkout(&mut self, key: &PoolKey, waiter: W, now: Instant) -> Checkout {
        let idle = self.config.idle_timeout;
        let expired: Vec<TunnelId> = self
            .by_key
            .get(key)
            .into_iter()
            .flatten()
            .copied()
            .filter(|id| {
                self.tunnels
                    .get(id)
                    .is_some_and(|t| t.idle_since.is_some_and(|s| s + idle <= now))
            })
            .collect();
        for id in expired {
            self.close(id, CloseReason::Idle);
        }
        let ids = self.by_key.get(key).map(Vec::as_slice).unwrap_or(&[]);
        let ready = ids.iter().copied().find(|id| {
            self.tunnels
                .get(id)
                .is_some_and(|t| t.state == TunnelState::Ready && t.active < t.limit)
        });
        if let Some(id) = ready {
            self.grant(id, 1);
            self.counters.reuses += 1;
            return Checkout::Reuse(id);
        }
        if self.waiters_total >= self.config.max_waiters {
            self.counters.refused += 1;
            return Checkout::Refuse(PoolRefusal::TooManyWaiters);
        }
        let cap = self.config.max_streams_per_tunnel as usize;
        let connecting = ids.iter().copied().find(|id| {
            self.tunnels
                .get(id)
                .is_some_and(|t| t.state == TunnelState::Connecting && t.waiters.len() < cap)
        });
        if let Some(id) = connecting {
            if let Some(t) = self.tunnels.get_mut(&id) {
                t.waiters.push_back(waiter);
                self.waiters_total += 1;
                self.counters.waits += 1;
                return Checkout::Wait(id);
            }
        }
        let id = TunnelId(self.next_id);
        self.next_id += 1;
        let mut waiters = VecDeque::new();
        waiters.push_back(waiter);
        self.waiters_total += 1;
        self.tunnels.insert(
            id,
            Tunnel {
                key: key.clone(),
                state: TunnelState::Connecting,
                active: 0,
                limit: self.config.max_streams_per_tunnel,
                waiters,
                opened: 0,
                idle_since: None,
            },
        );
        self.by_key.entry(key.clone()).or_default().push(id);
        self.counters.handshakes_started += 1;
        Checkout::Open(id)
    }

    /// The tunnel's handshake and HTTP/2 preface are done; the peer allows
    /// `peer_max_concurrent_streams` (`u32::MAX` when it sent no such setting). Queued flows get
    /// streams up to the tunnel's limit, in arrival order.
    pub fn tunnel_ready(
        &mut self,
        id: TunnelId,
        peer_max_concurrent_streams: u32,
        now: Instant,
    ) -> Result<Ready<W>, PoolError> {
        let cap = self.config.max_streams_per_tunnel;
        let budget = self.config.stream_budget;
        let t = self
            .tunnels
            .get_mut(&id)
            .ok_or(PoolError::UnknownTunnel(id))?;
        if t.state != TunnelState::Connecting {
            return Err(PoolError::NotConnecting(id));
        }
        t.state = TunnelState::Ready;
        t.limit = cap.min(peer_max_concurrent_streams);
        let limit = t.limit;
        let mut waiters = std::mem::take(&mut t.waiters);
        self.waiters_total -= waiters.len();
        if limit == 0 {
            self.close(id, CloseReason::NoStreams);
            return Ok(Ready {
                granted: Vec::new(),
                retry: Vec::new(),
                refused: waiters.into(),
            });
        }
        let n = u64::from(limit).min(budget).min(waiters.len() as u64) as usize;
        let granted: Vec<W> = waiters.drain(..n).collect();
        let retry: Vec<W> = waiters.into();
        if granted.is_empty() {
            t.idle_since = Some(now);
        } else {
            self.grant(id, n as u32);
        }
        Ok(Ready {
            granted,
            retry,
            refused: Vec::new(),
        })
    }

    /// The peer changed SETTINGS_MAX_CONCURRENT_STREAMS. Streams already open stay; new ones
    /// wait until the count is below the new limit. Ignored while connecting: the limit is
    /// taken from [`TunnelPool::tunnel_ready`].
    pub fn peer_limit_changed(
        &mut self,
        id: TunnelId,
        peer_max_concurrent_streams: u32,
    ) -> Result<(), PoolError> {
        let cap = self.config.max_streams_per_tunnel;
        let t = self
            .tunnels
            .get_mut(&id)
            .ok_or(PoolError::UnknownTunnel(id))?;
        if t.state != TunnelState::Connecting {
            t.limit = cap.min(peer_max_concurrent_streams);
        }
        Ok(())
    }

    /// A stream granted on the tunnel has ended (or could not be opened). A draining tunnel
    /// whose last stream this was is reported for closing.
    pub fn stream_closed(&mut self, id: TunnelId, now: Instant) -> Result<(), PoolError> {
        let t = self
            .tunnels
            .get_mut(&id)
            .ok_or(PoolError::UnknownTunnel(id))?;
        if t.active == 0 {
            return Err(PoolError::NoOpenStream(id));
        }
        t.active -= 1;
        if t.active == 0 {
            match t.state {
                TunnelState::Draining => self.close(id, CloseReason::Drained),
                TunnelState::Ready => t.idle_since = Some(now),
                TunnelState::Connecting | TunnelState::Closed => {}
            }
        }
        Ok(())
    }

    /// The peer sent GOAWAY: the tunnel drains. Flows still waiting for it (GOAWAY during the
    /// preface) are returned: check them out again.
    pub fn goaway_received(&mut self, id: TunnelId) -> Result<Vec<W>, PoolError> {
        self.counters.goaways += u64::from(self.tunnels.contains_key(&id));
        self.begin_draining(id)
    }

    /// The tunnel reached a retirement budget the caller tracks (kTLS records before the
    /// AES-GCM limit): it drains and the next checkout opens a new one. Waiting flows are
    /// returned: check them out again.
    pub fn retire(&mut self, id: TunnelId) -> Result<Vec<W>, PoolError> {
        self.counters.retirements += u64::from(self.tunnels.contains_key(&id));
        self.begin_draining(id)
    }

    /// The tunnel failed (connect refused, handshake or identity rejected, connection error):
    /// it leaves the pool, and its waiting flows are handed back to be reset.
    pub fn tunnel_failed(&mut self, id: TunnelId) -> Result<Failed<W>, PoolError> {
        let t = self.remove(id).ok_or(PoolError::UnknownTunnel(id))?;
        self.counters.failures += 1;
        self.waiters_total -= t.waiters.len();
        Ok(Failed {
            waiters: t.waiters.into(),
            open_streams: t.active,
        })
    }

    /// A waiting flow gave up (its client went away, or its connect timer fired). Returns
    /// whether it was found on the tunnel.
    pub fn cancel_wait(&mut self, id: TunnelId, waiter: &W) -> bool
    where
        W: PartialEq,
    {
        let Some(t) = self.tunnels.get_mut(&id) else {
            return false;
        };
        let Some(i) = t.waiters.iter().position(|w| w == waiter) else {
            return false;
        };
        t.waiters.remove(i);
        self.waiters_total -= 1;
        true
    }

    /// The earliest time [`TunnelPool::handle_timeout`] has something to do.
    pub fn poll_timeout(&self) -> Option<Instant> {
        self.tunnels
            .values()
            .filter(|t| t.state == TunnelState::Ready && t.active == 0)
            .filter_map(|t| t.idle_since)
            .map(|since| since + self.config.idle_timeout)
            .min()
    }

    /// Closes ready tunnels idle for the idle timeout (reported as [`PoolEvent`]s).
    pub fn handle_timeout(&mut self, now: Instant) {
        let idle = self.config.idle_timeout;
        let mut expired: Vec<TunnelId> = self
            .tunnels
            .iter()
            .filter(|(_, t)| t.state == TunnelState::Ready && t.active == 0)
            .filter(|(_, t)| t.idle_since.is_some_and(|s| s + idle <= now))
            .map(|(id, _)| *id)
            .collect();
        expired.sort();
        for id in expired {
            self.close(id, CloseReason::Idle);
        }
    }

    /// The next tunnel the caller must close.
    pub fn poll_event(&mut self) -> Option<PoolEvent> {
        self.events.pop_front()
    }

    pub fn state(&self, id: TunnelId) -> TunnelState {
        self.tunnels
            .get(&id)
            .map_or(TunnelState::Closed, |t| t.state)
    }

    /// Streams reserved or open on the tunnel.
    pub fn active_streams(&self, id: TunnelId) -> Option<u32> {
        self.tunnels.get(&id).map(|t| t.active)
    }

    /// The tunnel's stream limit: min(cap, peer's MAX_CONCURRENT_STREAMS) once ready.
    pub fn stream_limit(&self, id: TunnelId) -> Option<u32> {
        self.tunnels.get(&id).map(|t| t.limit)
    }

    /// Flows queued on a connecting tunnel.
    pub fn waiting(&self, id: TunnelId) -> Option<usize> {
        self.tunnels.get(&id).map(|t| t.waiters.len())
    }

    pub fn key(&self, id: TunnelId) -> Option<&PoolKey> {
        self.tunnels.get(&id).map(|t| &t.key)
    }

    /// Flows waiting across the pool.
    pub fn waiters_total(&self) -> usize {
        self.waiters_total
    }

    /// Tunnels in the pool (connecting, ready or draining).
    pub fn tunnel_count(&self) -> usize {
        self.tunnels.len()
    }

    pub fn counters(&self) -> PoolCounters {
        self.counters
    }

    /// Reserves `n` streams on a ready tunnel (the caller checked the limit); drains it once
    /// its stream budget is spent.
    fn grant(&mut self, id: TunnelId, n: u32) {
        let budget = self.config.stream_budget;
        let Some(t) = self.tunnels.get_mut(&id) else {
            return;
        };
        t.active += n;
        t.opened += u64::from(n);
        t.idle_since = None;
        if t.opened >= budget && t.state == TunnelState::Ready {
            t.state = TunnelState::Draining;
            self.counters.retirements += 1;
        }
    }

    fn begin_draining(&mut self, id: TunnelId) -> Result<Vec<W>, PoolError> {
        let t = self
            .tunnels
            .get_mut(&id)
            .ok_or(PoolError::UnknownTunnel(id))?;
        t.state = TunnelState::Draining;
        t.idle_since = None;
        let waiters: Vec<W> = std::mem::take(&mut t.waiters).into();
        self.waiters_total -= waiters.len();
        if t.active == 0 {
            self.close(id, CloseReason::Drained);
        }
        Ok(waiters)
    }

    fn close(&mut self, id: TunnelId, reason: CloseReason) {
        if self.remove(id).is_some() {
            match reason {
                CloseReason::Idle => self.counters.closed_idle += 1,
                CloseReason::Drained | CloseReason::NoStreams => self.counters.closed_drained += 1,
            }
            self.events
                .push_back(PoolEvent::Close { tunnel: id, reason });
        }
    }

    fn remove(&mut self, id: TunnelId) -> Option<Tunnel<W>> {
        let t = self.tunnels.remove(&id)?;
        if let Some(ids) = self.by_key.get_mut(&t.key) {
            ids.retain(|i| *i != id);
            if ids.is_empty() {
                self.by_key.remove(&t.key);
            }
        }
        Some(t)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(source: &str, peer: &str, expected: &str) -> PoolKey {
        PoolKey {
            source: SpiffeId::new("cluster.local", "default", source).unwrap(),
            peer: peer.parse().unwrap(),
            expected: SpiffeId::new("cluster.local", "default", expected).unwrap(),
        }
    }

    fn ab() -> PoolKey {
        key("client", "10.1.0.12:15008", "echo")
    }

    fn config(cap: u32) -> PoolConfig {
        PoolConfig {
            max_streams_per_tunnel: cap,
            idle_timeout: Duration::from_secs(60),
            max_waiters: 16,
            stream_budget: CLIENT_STREAM_ID_BUDGET,
        }
    }

    /// Opens a tunnel for `key` with one flow and makes it ready with the peer's limit.
    fn ready_tunnel(
        pool: &mut TunnelPool<u64>,
        key: &PoolKey,
        peer_limit: u32,
        now: Instant,
    ) -> TunnelId {
        let Checkout::Open(id) = pool.checkout(key, 0, now) else {
            panic!("expected a new tunnel")
        };
        let ready = pool.tunnel_ready(id, peer_limit, now).unwrap();
        assert_eq!(ready.granted, vec![0]);
        id
    }

    #[test]
    fn defaults_match_ztunnel() {
        let c = PoolConfig::default();
        assert_eq!(c.max_streams_per_tunnel, 100);
        assert_eq!(c.idle_timeout, Duration::from_secs(300));
    }

    #[test]
    fn second_connection_with_same_key_reuses_the_ready_tunnel() {
        let now = Instant::now();
        let mut pool = TunnelPool::new(config(100));
        let id = ready_tunnel(&mut pool, &ab(), u32::MAX, now);
        assert_eq!(pool.checkout(&ab(), 1, now), Checkout::Reuse(id));
        assert_eq!(pool.active_streams(id), Some(2));
        let c = pool.counters();
        assert_eq!((c.handshakes_started, c.reuses), (1, 1));
    }

    #[test]
    fn different_source_peer_or_expected_identity_opens_a_new_tunnel() {
        let now = Instant::now();
        let mut pool = TunnelPool::new(config(100));
        let id = ready_tunnel(&mut pool, &ab(), u32::MAX, now);
        for other in [
            key("other", "10.1.0.12:15008", "echo"),
            key("client", "10.1.0.13:15008", "echo"),
            key("client", "10.1.0.12:15008", "impostor"),
        ] {
            match pool.checkout(&other, 1, now) {
                Checkout::Open(new) => assert_ne!(new, id),
                c => panic!("{other:?} must not share tunnel {id:?}: {c:?}"),
            }
        }
        assert_eq!(pool.counters().handshakes_started, 4);
    }

    #[test]
    fn stream_limit_is_the_smaller_of_peer_setting_and_cap() {
        let now = Instant::now();
        let mut pool = TunnelPool::new(config(3));
        let big = ready_tunnel(&mut pool, &ab(), 200, now);
        assert_eq!(pool.stream_limit(big), Some(3));
        let k2 = key("client", "10.1.0.99:15008", "echo");
        let small = ready_tunnel(&mut pool, &k2, 2, now);
        assert_eq!(pool.stream_limit(small), Some(2));
        assert_eq!(pool.checkout(&k2, 1, now), Checkout::Reuse(small));
        // Full: the next connection needs a second tunnel.
        assert!(matches!(pool.checkout(&k2, 2, now), Checkout::Open(t) if t != small));
    }

    #[test]
    fn full_tunnel_reopens_room_when_a_stream_closes() {
        let now = Instant::now();
        let mut pool = TunnelPool::new(config(2));
        let id = ready_tunnel(&mut pool, &ab(), u32::MAX, now);
        assert_eq!(pool.checkout(&ab(), 1, now), Checkout::Reuse(id));
        pool.stream_closed(id, now).unwrap();
        assert_eq!(pool.checkout(&ab(), 2, now), Checkout::Reuse(id));
        assert_eq!(pool.active_streams(id), Some(2));
    }

    #[test]
    fn connections_during_the_handshake_wait_instead_of_opening_more_tunnels() {
        let now = Instant::now();
        let mut pool = TunnelPool::new(config(100));
        let Checkout::Open(id) = pool.checkout(&ab(), 0, now) else {
            panic!()
        };
        for w in 1..5 {
            assert_eq!(pool.checkout(&ab(), w, now), Checkout::Wait(id));
        }
        assert_eq!(pool.state(id), TunnelState::Connecting);
        let ready = pool.tunnel_ready(id, u32::MAX, now).unwrap();
        assert_eq!(ready.granted, vec![0, 1, 2, 3, 4]);
        assert!(ready.retry.is_empty() && ready.refused.is_empty());
        assert_eq!(pool.active_streams(id), Some(5));
        assert_eq!(pool.counters().handshakes_started, 1);
        assert_eq!(pool.counters().waits, 4);
    }

    #[test]
    fn waiters_beyond_the_peer_limit_are_handed_back_to_retry() {
        let now = Instant::now();
        let mut pool = TunnelPool::new(config(100));
        let Checkout::Open(id) = pool.checkout(&ab(), 0, now) else {
            panic!()
        };
        for w in 1..4 {
            pool.checkout(&ab(), w, now);
        }
        let ready = pool.tunnel_ready(id, 2, now).unwrap();
        assert_eq!(ready.granted, vec![0, 1]);
        assert_eq!(ready.retry, vec![2, 3]);
        assert_eq!(pool.waiters_total(), 0);
        // Retrying opens a second tunnel; the first is full.
        assert!(matches!(pool.checkout(&ab(), 2, now), Checkout::Open(t) if t != id));
    }

    #[test]
    fn a_connecting_tunnel_queues_at_most_the_cap_then_another_opens() {
        let now = Instant::now();
        let mut pool = TunnelPool::new(config(2));
        let Checkout::Open(first) = pool.checkout(&ab(), 0, now) else {
            panic!()
        };
        assert_eq!(pool.checkout(&ab(), 1, now), Checkout::Wait(first));
        let Checkout::Open(second) = pool.checkout(&ab(), 2, now) else {
            panic!("a full queue opens another tunnel")
        };
        assert_ne!(first, second);
        assert_eq!(pool.checkout(&ab(), 3, now), Checkout::Wait(second));
    }

    #[test]
    fn waiters_beyond_the_pool_limit_are_refused() {
        let now = Instant::now();
        let mut pool = TunnelPool::new(PoolConfig {
            max_waiters: 3,
            ..config(100)
        });
        for w in 0..3 {
            assert!(!matches!(pool.checkout(&ab(), w, now), Checkout::Refuse(_)));
        }
        assert_eq!(
            pool.checkout(&ab(), 3, now),
            Checkout::Refuse(PoolRefusal::TooManyWaiters)
        );
        assert_eq!(pool.counters().refused, 1);
        // A ready tunnel with room still serves without queueing.
        let other = key("client", "10.1.0.50:15008", "echo");
        let Checkout::Refuse(_) = pool.checkout(&other, 9, now) else {
            panic!("the waiter limit is pool-wide")
        };
    }

    #[test]
    fn a_ready_tunnel_with_room_serves_even_when_waiters_are_full() {
        let now = Instant::now();
        let mut pool = TunnelPool::new(PoolConfig {
            max_waiters: 1,
            ..config(100)
        });
        let id = ready_tunnel(&mut pool, &ab(), u32::MAX, now);
        let other = key("client", "10.1.0.50:15008", "echo");
        assert!(matches!(pool.checkout(&other, 1, now), Checkout::Open(_)));
        assert_eq!(pool.checkout(&ab(), 2, now), Checkout::Reuse(id));
    }

    #[test]
    fn failed_tunnel_returns_its_waiters_to_be_reset() {
        let now = Instant::now();
        let mut pool = TunnelPool::new(config(100));
        let Checkout::Open(id) = pool.checkout(&ab(), 7, now) else {
            panic!()
        };
        pool.checkout(&ab(), 8, now);
        let failed = pool.tunnel_failed(id).unwrap();
        assert_eq!(failed.waiters, vec![7, 8]);
        assert_eq!(failed.open_streams, 0);
        assert_eq!(pool.state(id), TunnelState::Closed);
        assert_eq!(pool.waiters_total(), 0);
        assert_eq!(pool.counters().failures, 1);
        // The next connection starts a fresh handshake.
        assert!(matches!(pool.checkout(&ab(), 9, now), Checkout::Open(t) if t != id));
        assert_eq!(pool.tunnel_failed(id), Err(PoolError::UnknownTunnel(id)));
    }

    #[test]
    fn goaway_drains_the_tunnel_and_new_connections_open_another() {
        let now = Instant::now();
        let mut pool = TunnelPool::new(config(100));
        let id = ready_tunnel(&mut pool, &ab(), u32::MAX, now);
        assert!(pool.goaway_received(id).unwrap().is_empty());
        assert_eq!(pool.state(id), TunnelState::Draining);
        assert!(matches!(pool.checkout(&ab(), 1, now), Checkout::Open(t) if t != id));
        assert_eq!(pool.active_streams(id), Some(1));
        assert_eq!(pool.poll_event(), None, "a stream is still open");
        pool.stream_closed(id, now).unwrap();
        assert_eq!(
            pool.poll_event(),
            Some(PoolEvent::Close {
                tunnel: id,
                reason: CloseReason::Drained
            })
        );
        assert_eq!(pool.state(id), TunnelState::Closed);
    }

    #[test]
    fn goaway_during_the_handshake_hands_waiters_back_for_retry() {
        let now = Instant::now();
        let mut pool = TunnelPool::new(config(100));
        let Checkout::Open(id) = pool.checkout(&ab(), 1, now) else {
            panic!()
        };
        pool.checkout(&ab(), 2, now);
        assert_eq!(pool.goaway_received(id).unwrap(), vec![1, 2]);
        assert_eq!(
            pool.poll_event(),
            Some(PoolEvent::Close {
                tunnel: id,
                reason: CloseReason::Drained
            })
        );
        assert_eq!(pool.waiters_total(), 0);
    }

    #[test]
    fn retired_tunnel_takes_no_new_stream() {
        let now = Instant::now();
        let mut pool = TunnelPool::new(config(100));
        let id = ready_tunnel(&mut pool, &ab(), u32::MAX, now);
        pool.retire(id).unwrap();
        assert!(matches!(pool.checkout(&ab(), 1, now), Checkout::Open(t) if t != id));
        assert_eq!(pool.counters().retirements, 1);
    }

    #[test]
    fn stream_budget_spent_drains_the_tunnel() {
        let now = Instant::now();
        let mut pool = TunnelPool::new(PoolConfig {
            stream_budget: 3,
            ..config(100)
        });
        let id = ready_tunnel(&mut pool, &ab(), u32::MAX, now);
        assert_eq!(pool.checkout(&ab(), 1, now), Checkout::Reuse(id));
        assert_eq!(pool.checkout(&ab(), 2, now), Checkout::Reuse(id));
        assert_eq!(pool.state(id), TunnelState::Draining);
        assert!(matches!(pool.checkout(&ab(), 3, now), Checkout::Open(t) if t != id));
    }

    #[test]
    fn peer_allowing_no_streams_refuses_the_waiters_and_closes() {
        let now = Instant::now();
        let mut pool = TunnelPool::new(config(100));
        let Checkout::Open(id) = pool.checkout(&ab(), 1, now) else {
            panic!()
        };
        let ready = pool.tunnel_ready(id, 0, now).unwrap();
        assert_eq!(ready.refused, vec![1]);
        assert!(ready.granted.is_empty());
        assert_eq!(
            pool.poll_event(),
            Some(PoolEvent::Close {
                tunnel: id,
                reason: CloseReason::NoStreams
            })
        );
    }

    #[test]
    fn lowered_peer_limit_blocks_new_streams_until_below_it() {
        let now = Instant::now();
        let mut pool = TunnelPool::new(config(100));
        let id = ready_tunnel(&mut pool, &ab(), u32::MAX, now);
        assert_eq!(pool.checkout(&ab(), 1, now), Checkout::Reuse(id));
        pool.peer_limit_changed(id, 1).unwrap();
        assert!(matches!(pool.checkout(&ab(), 2, now), Checkout::Open(t) if t != id));
        pool.stream_closed(id, now).unwrap();
        pool.stream_closed(id, now).unwrap();
        assert_eq!(pool.checkout(&ab(), 3, now), Checkout::Reuse(id));
    }

    #[test]
    fn idle_tunnel_expires_after_the_idle_timeout() {
        let t0 = Instant::now();
        let mut pool = TunnelPool::new(config(100));
        let id = ready_tunnel(&mut pool, &ab(), u32::MAX, t0);
        assert_eq!(pool.poll_timeout(), None, "a stream is open");
        let t1 = t0 + Duration::from_secs(5);
        pool.stream_closed(id, t1).unwrap();
        assert_eq!(pool.poll_timeout(), Some(t1 + Duration::from_secs(60)));
        pool.handle_timeout(t1 + Duration::from_secs(59));
        assert_eq!(pool.state(id), TunnelState::Ready);
        assert_eq!(pool.poll_event(), None);
        pool.handle_timeout(t1 + Duration::from_secs(60));
        assert_eq!(
            pool.poll_event(),
            Some(PoolEvent::Close {
                tunnel: id,
                reason: CloseReason::Idle
            })
        );
        assert_eq!(pool.state(id), TunnelState::Closed);
        assert_eq!(pool.poll_timeout(), None);
        assert_eq!(pool.counters().closed_idle, 1);
    }

    #[test]
    fn reuse_before_the_deadline_cancels_the_idle_timer() {
        let t0 = Instant::now();
        let mut pool = TunnelPool::new(config(100));
        let id = ready_tunnel(&mut pool, &ab(), u32::MAX, t0);
        pool.stream_closed(id, t0).unwrap();
        let t1 = t0 + Duration::from_secs(30);
        assert_eq!(pool.checkout(&ab(), 1, t1), Checkout::Reuse(id));
        assert_eq!(pool.poll_timeout(), None);
        pool.handle_timeout(t0 + Duration::from_secs(90));
        assert_eq!(pool.state(id), TunnelState::Ready);
    }

    #[test]
    fn expired_tunnel_is_not_reused_even_before_handle_timeout() {
        let t0 = Instant::now();
        let mut pool = TunnelPool::new(config(100));
        let id = ready_tunnel(&mut pool, &ab(), u32::MAX, t0);
        pool.stream_closed(id, t0).unwrap();
        let late = t0 + Duration::from_secs(61);
        assert!(matches!(pool.checkout(&ab(), 1, late), Checkout::Open(t) if t != id));
        assert_eq!(
            pool.poll_event(),
            Some(PoolEvent::Close {
                tunnel: id,
                reason: CloseReason::Idle
            })
        );
    }

    #[test]
    fn ready_tunnel_whose_waiters_all_gave_up_starts_idle() {
        let t0 = Instant::now();
        let mut pool = TunnelPool::new(config(100));
        let Checkout::Open(id) = pool.checkout(&ab(), 1, t0) else {
            panic!()
        };
        assert!(pool.cancel_wait(id, &1));
        assert!(!pool.cancel_wait(id, &1));
        assert_eq!(pool.waiters_total(), 0);
        let ready = pool.tunnel_ready(id, u32::MAX, t0).unwrap();
        assert!(ready.granted.is_empty());
        assert_eq!(pool.poll_timeout(), Some(t0 + Duration::from_secs(60)));
    }

    #[test]
    fn closing_more_streams_than_were_granted_is_an_error_not_a_negative_count() {
        let now = Instant::now();
        let mut pool = TunnelPool::new(config(100));
        let id = ready_tunnel(&mut pool, &ab(), u32::MAX, now);
        pool.stream_closed(id, now).unwrap();
        assert_eq!(
            pool.stream_closed(id, now),
            Err(PoolError::NoOpenStream(id))
        );
        assert_eq!(pool.active_streams(id), Some(0));
        assert_eq!(
            pool.tunnel_ready(id, 10, now).map(|_| ()),
            Err(PoolError::NotConnecting(id))
        );
    }

    /// xorshift64*: a deterministic sequence, so a failure replays exactly.
    struct Rng(u64);

    impl Rng {
        fn next(&mut self) -> u64 {
            self.0 ^= self.0 >> 12;
            self.0 ^= self.0 << 25;
            self.0 ^= self.0 >> 27;
            self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
        }

        fn below(&mut self, n: usize) -> usize {
            (self.next() % n as u64) as usize
        }
    }

    /// Random operations against the pool, checked against a model of what the caller holds:
    /// counts never exceed the limit or go negative, draining tunnels get no stream, every
    /// flow is in exactly one place, and the pool's own bounds hold.
    #[test]
    fn random_operations_keep_stream_accounting_within_limits() {
        let mut total = PoolCounters::default();
        for seed in 1..=40u64 {
            let c = run_random(seed, 2_000);
            total.reuses += c.reuses;
            total.waits += c.waits;
            total.refused += c.refused;
            total.retirements += c.retirements;
            total.closed_idle += c.closed_idle;
            total.closed_drained += c.closed_drained;
        }
        // The runs reached every path the invariants are about.
        assert!(
            total.reuses > 0 && total.waits > 0 && total.refused > 0,
            "{total:?}"
        );
        assert!(total.retirements > 0 && total.closed_idle > 0 && total.closed_drained > 0);
    }

    fn run_random(seed: u64, steps: usize) -> PoolCounters {
        let mut rng = Rng(seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1);
        let cfg = PoolConfig {
            max_streams_per_tunnel: 1 + rng.below(6) as u32,
            idle_timeout: Duration::from_secs(10),
            max_waiters: 1 + rng.below(12),
            stream_budget: 3 + rng.below(20) as u64,
        };
        let keys = [
            ab(),
            key("client", "10.1.0.13:15008", "echo"),
            key("other", "10.1.0.12:15008", "echo"),
        ];
        let mut pool: TunnelPool<u64> = TunnelPool::new(cfg);
        let mut now = Instant::now();
        // Model: open streams the caller holds per tunnel, tunnels known to drain, and where
        // each flow is.
        let mut streams: HashMap<TunnelId, u32> = HashMap::new();
        let mut draining: std::collections::HashSet<TunnelId> = Default::default();
        let mut waiting: HashMap<u64, TunnelId> = HashMap::new();
        let mut next_flow = 0u64;
        let mut known: Vec<TunnelId> = Vec::new();
        let mut granted_total = 0u64;

        let mut grant = |pool: &TunnelPool<u64>,
                         streams: &mut HashMap<TunnelId, u32>,
                         draining: &mut std::collections::HashSet<TunnelId>,
                         id: TunnelId,
                         n: u32| {
            assert!(
                !draining.contains(&id),
                "seed {seed}: stream on draining {id:?}"
            );
            *streams.entry(id).or_default() += n;
            let active = pool.active_streams(id).unwrap_or(0);
            assert_eq!(active, streams[&id], "seed {seed}");
            assert!(
                active <= pool.stream_limit(id).unwrap_or(0),
                "seed {seed}: {active} streams above the limit on {id:?}"
            );
            assert!(active <= cfg.max_streams_per_tunnel, "seed {seed}");
            granted_total += u64::from(n);
            if pool.state(id) == TunnelState::Draining {
                // Its stream budget is spent: it must never get another stream.
                draining.insert(id);
            }
        };

        for _ in 0..steps {
            match rng.below(10) {
                0..=2 => {
                    let flow = next_flow;
                    next_flow += 1;
                    let k = &keys[rng.below(keys.len())];
                    match pool.checkout(k, flow, now) {
                        Checkout::Reuse(id) => {
                            assert_eq!(pool.key(id), Some(k));
                            grant(&pool, &mut streams, &mut draining, id, 1);
                        }
                        Checkout::Open(id) => {
                            assert!(!known.contains(&id), "seed {seed}: id reused");
                            known.push(id);
                            waiting.insert(flow, id);
                        }
                        Checkout::Wait(id) => {
                            assert_eq!(pool.state(id), TunnelState::Connecting);
                            waiting.insert(flow, id);
                        }
                        Checkout::Refuse(_) => {
                            assert_eq!(pool.waiters_total(), cfg.max_waiters, "seed {seed}");
                        }
                    }
                }
                3 => {
                    let connecting: Vec<TunnelId> = known
                        .iter()
                        .copied()
                        .filter(|id| pool.state(*id) == TunnelState::Connecting)
                        .collect();
                    if let Some(&id) = connecting.get(rng.below(connecting.len().max(1))) {
                        let peer = [0, 1, 2, 3, 50, u32::MAX][rng.below(6)];
                        let r = pool.tunnel_ready(id, peer, now).unwrap();
                        for f in r.granted.iter().chain(&r.retry).chain(&r.refused) {
                            assert_eq!(waiting.remove(f), Some(id), "seed {seed}");
                        }
                        if !r.granted.is_empty() {
                            grant(
                                &pool,
                                &mut streams,
                                &mut draining,
                                id,
                                r.granted.len() as u32,
                            );
                        }
                        if peer == 0 {
                            assert!(r.granted.is_empty() && r.retry.is_empty());
                        }
                    }
                }
                4..=5 => {
                    let open: Vec<TunnelId> = streams
                        .iter()
                        .filter(|(_, n)| **n > 0)
                        .map(|(id, _)| *id)
                        .collect();
                    if let Some(&id) = open.get(rng.below(open.len().max(1))) {
                        pool.stream_closed(id, now).unwrap();
                        if let Some(n) = streams.get_mut(&id) {
                            *n -= 1;
                        }
                    }
                }
                6 => {
                    if let Some(&id) = known.get(rng.below(known.len().max(1))) {
                        let was = pool.state(id);
                        let r = if rng.below(2) == 0 {
                            pool.goaway_received(id)
                        } else {
                            pool.retire(id)
                        };
                        match r {
                            Ok(back) => {
                                draining.insert(id);
                                for f in back {
                                    assert_eq!(waiting.remove(&f), Some(id), "seed {seed}");
                                }
                            }
                            Err(e) => {
                                assert_eq!(was, TunnelState::Closed);
                                assert_eq!(e, PoolError::UnknownTunnel(id));
                            }
                        }
                    }
                }
                7 => {
                    if let Some(&id) = known.get(rng.below(known.len().max(1))) {
                        if let Ok(f) = pool.tunnel_failed(id) {
                            assert_eq!(f.open_streams, streams.remove(&id).unwrap_or(0));
                            for w in f.waiters {
                                assert_eq!(waiting.remove(&w), Some(id), "seed {seed}");
                            }
                        }
                    }
                }
                8 => {
                    if let Some(&id) = known.get(rng.below(known.len().max(1))) {
                        let limit = [0, 1, 2, 100][rng.below(4)];
                        let _ = pool.peer_limit_changed(id, limit);
                    }
                }
                _ => {
                    now += Duration::from_secs(rng.below(8) as u64);
                    pool.handle_timeout(now);
                    if let Some(deadline) = pool.poll_timeout() {
                        assert!(deadline > now, "seed {seed}: timeout not handled");
                    }
                }
            }
            while let Some(PoolEvent::Close { tunnel, reason }) = pool.poll_event() {
                assert_eq!(pool.state(tunnel), TunnelState::Closed);
                assert_eq!(
                    streams.get(&tunnel).copied().unwrap_or(0),
                    0,
                    "seed {seed}: closed {tunnel:?} ({reason:?}) with open streams"
                );
                assert!(!waiting.values().any(|t| *t == tunnel), "seed {seed}");
            }
            // Global invariants.
            assert_eq!(pool.waiters_total(), waiting.len(), "seed {seed}");
            assert!(pool.waiters_total() <= cfg.max_waiters, "seed {seed}");
            for &id in &known {
                match pool.state(id) {
                    TunnelState::Closed => {}
                    s => {
                        let active = pool.active_streams(id).unwrap_or(0);
                        assert_eq!(active, streams.get(&id).copied().unwrap_or(0));
                        let queued = pool.waiting(id).unwrap_or(0);
                        assert!(queued <= cfg.max_streams_per_tunnel as usize);
                        if s != TunnelState::Connecting {
                            assert_eq!(queued, 0, "seed {seed}: waiters on a {s:?} tunnel");
                        }
                        if draining.contains(&id) {
                            assert_eq!(s, TunnelState::Draining, "seed {seed}");
                        }
                    }
                }
            }
        }
        assert!(granted_total > 0, "seed {seed}: the run exercised nothing");
        let counters = pool.counters();
        // Failing every tunnel hands back every waiting flow.
        for id in known {
            if let Ok(f) = pool.tunnel_failed(id) {
                for w in f.waiters {
                    assert_eq!(waiting.remove(&w), Some(id));
                }
            }
        }
        assert!(waiting.is_empty(), "seed {seed}: flows lost: {waiting:?}");
        assert_eq!(pool.tunnel_count(), 0);
        counters
    }
}
