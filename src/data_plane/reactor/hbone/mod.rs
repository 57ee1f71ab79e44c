//! The reactor's HBONE half (`outbound`: the pool and client tunnels; `inbound`: the 15008
//! server; `tunnel_driver`: a tunnel's TLS, session and bytes; `streams`: the flows on streams): outbound flows checked out of the tunnel pool, tunnels opened
//! from the source pod's namespace to the destination's port 15008, the 15008 server side
//! (TLS with client certificates, CONNECT checked by [`InboundRules`], the upstream connect,
//! then 200 / 400 / 503), and the bytes between local sockets and tunnel streams.
//!
//! Ownership: tunnels and stream flows live in their own slabs; a tunnel maps its stream ids
//! to flow keys, a flow names its tunnel by key. Either side may disappear first; every lookup
//! goes through the key (slot + generation), so a stale one finds nothing.
//!
//! End of stream (DESIGN.md §4): local EOF → END_STREAM; END_STREAM → `shutdown(SHUT_WR)` once
//! the queued bytes are written; RST_STREAM NO_ERROR/CANCEL is EOF; any other reset, or a
//! tunnel that dies, resets the local socket; a local reset becomes RST_STREAM CONNECT_ERROR.

use std::cmp::Reverse;
use std::collections::HashMap;
use std::io;
use std::os::fd::{AsRawFd, OwnedFd};
use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;
use std::time::Instant;

use hbone_proto::{ConnectRequest, ErrorCode, Event as SessionEvent, Input, StreamId};
use rustls::{ClientConfig, ClientConnection, Connection, ServerConfig, ServerConnection};

use super::{entry, entry_mut, Kind, Reactor, Timer, TimerKind};
use crate::control_plane::config::KtlsChoice;
use crate::control_plane::identity::SpiffeId;
use crate::control_plane::workload_registry::WorkloadId;
use crate::data_plane::driver::{self, FlowKey, Interest, Side};
use crate::data_plane::first_connection::Resolution;
use crate::data_plane::socket;
use crate::data_plane::splice::Pipe;
use crate::kernel_features::KtlsSupport;
use crate::observability::access_log::{self, FlowRecord};
use crate::observability::metrics::{CloseKind, FailureKind, ReactorMetrics, TcpLabels};
use crate::redirection::netns::{in_netns, NetNs};
use crate::tls::ktls::{self, ControlRecord};
use crate::tls::{self, ClientTls};
use crate::tunnel::connection::{Fill, Handshake, Phase, Role, Tunnel, TunnelError};
use crate::tunnel::inbound_rules::{outbound_connect, InboundDecision, InboundRules};
use crate::tunnel::io::{
    DataFrameHeaders, FrameHandler, FrameReceiver, HandlerError, RecvError, RecvStatus, SendError,
    SendStatus, StreamSink,
};
use crate::tunnel::pool::{Checkout, PoolConfig, PoolEvent, PoolKey, TunnelId, TunnelPool};
use crate::tunnel::stream_flow::{StreamFlow, StreamPhase, TunnelTarget};

/// TLS material for tunnels, built once at start-up and shared by every reactor.
pub struct TunnelCredentials {
    /// Client side per local identity (the source workload's certificate).
    pub client: HashMap<SpiffeId, ClientTls>,
    /// Server config per local identity (what 15008 presents for that pod).
    pub server: HashMap<SpiffeId, Arc<ServerConfig>>,
    pub ktls: KtlsSupport,
}

/// One reactor's tunnel state.
pub struct HboneState {
    pub creds: Arc<TunnelCredentials>,
    pub pool: TunnelPool<FlowKey>,
    /// Pool ids of client tunnels → their slab keys.
    pub by_pool_id: HashMap<TunnelId, FlowKey>,
    /// Client configs per (source, expected server identity).
    client_configs: HashMap<(SpiffeId, SpiffeId), Arc<ClientConfig>>,
    pub rules: InboundRules,
    pub allow_ktls: bool,
    /// kTLS tunnels splice their payload (`node.hbone.zero_copy`).
    pub zero_copy: bool,
    pub record_budget: u64,
    /// Mode lines already logged (one per mode and reason per reactor; each tunnel's own
    /// line is at debug level).
    logged_modes: std::collections::HashSet<String>,
}

impl HboneState {
    pub fn new(
        creds: Arc<TunnelCredentials>,
        node: &crate::control_plane::config::NodeConfig,
    ) -> Self {
        HboneState {
            creds,
            pool: TunnelPool::new(PoolConfig {
                max_streams_per_tunnel: node.hbone.max_streams_per_tunnel,
                idle_timeout: node.hbone.pool_idle_timeout,
                ..PoolConfig::default()
            }),
            by_pool_id: HashMap::new(),
            client_configs: HashMap::new(),
            rules: InboundRules::new(node),
            allow_ktls: node.hbone.ktls == KtlsChoice::Auto,
            zero_copy: node.hbone.zero_copy,
            record_budget: node.hbone.ktls_record_budget,
            logged_modes: Default::default(),
        }
    }
}

/// How a stream flow ends.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(in crate::data_plane::reactor) enum StreamEnd {
    Clean,
    /// The local socket failed: the stream is reset (CONNECT_ERROR).
    LocalBroken {
        kind: FailureKind,
        errno: i32,
    },
    /// The tunnel side failed (reset stream, dead tunnel, refused CONNECT): the local socket
    /// is reset.
    TunnelBroken {
        kind: FailureKind,
    },
    /// ringtun ended it (idle, drain deadline): both ends reset.
    Cut(CloseKind),
}

mod inbound;
mod outbound;
mod streams;
mod tunnel_driver;

impl Reactor {
    pub(in crate::data_plane::reactor) fn hbone_state(&mut self) -> &mut HboneState {
        self.hbone.as_mut().expect("hbone configured")
    }

    pub(in crate::data_plane::reactor) fn insert_stream(
        &mut self,
        make: impl FnOnce(FlowKey) -> StreamFlow,
    ) -> FlowKey {
        let generation = self.next_gen();
        let entry = self.streams.vacant_entry();
        let key = crate::data_plane::reactor::make_key(Kind::Stream, entry.key(), generation);
        entry.insert(make(key));
        self.metrics.flows_open.fetch_add(1, Relaxed);
        key
    }

    pub(in crate::data_plane::reactor) fn insert_tunnel(
        &mut self,
        make: impl FnOnce(FlowKey) -> Tunnel,
    ) -> FlowKey {
        let generation = self.next_gen();
        let entry = self.tunnels.vacant_entry();
        let key = crate::data_plane::reactor::make_key(Kind::Tunnel, entry.key(), generation);
        entry.insert(make(key));
        key
    }

    pub(in crate::data_plane::reactor) fn stream_mut(
        &mut self,
        key: FlowKey,
    ) -> Option<&mut StreamFlow> {
        entry_mut(&mut self.streams, key)
    }

    pub(in crate::data_plane::reactor) fn tunnel_mut(
        &mut self,
        key: FlowKey,
    ) -> Option<&mut Tunnel> {
        entry_mut(&mut self.tunnels, key)
    }

    pub(in crate::data_plane::reactor) fn push_timer(
        &mut self,
        key: FlowKey,
        at: Instant,
        kind: TimerKind,
    ) {
        self.timers.push(Reverse(Timer {
            at,
            index: key.index,
            generation: key.generation,
            kind,
        }));
    }
}
