//! Counters. Each reactor owns a shard of atomics that only it writes (relaxed increments, no
//! contention); a scrape sums the shards. Istio's TCP metric names are kept so existing
//! dashboards work; ringtun's own counters are prefixed `ringtun_`.
//!
//! Every label value comes from the configuration or a fixed list, so no client can grow the
//! number of series; the per-reactor label table is capped as well.

use std::collections::HashMap;
use std::fmt::Write as _;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex};

use super::hbone_metrics::HboneMetrics;

/// Why a connection failed. Each kind has a class (whose fault) and a short reason label.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FailureKind {
    DownstreamReset,
    NoOriginalDst,
    UpstreamRefused,
    UpstreamConnectTimeout,
    UpstreamUnreachable,
    UpstreamReset,
    UpstreamError,
    NoHealthyEndpoint,
    Loop,
    NotForThisWorkload,
    FlowLimit,
    TunnelUnavailable,
    SocketSetup,
    Accept,
    /// The HBONE tunnel could not be opened (connect, TLS handshake, peer identity) or died.
    TunnelFailed,
    /// The tunnel peer answered the CONNECT with something other than 200.
    ConnectRejected,
    /// The tunnel peer reset the stream with an error code.
    StreamReset,
    /// Too many flows already wait for tunnel handshakes.
    TunnelPoolFull,
    /// Authorization policy denied the connection (401 on HBONE, a reset on plaintext).
    PolicyDenied,
    /// An inbound CONNECT that cannot be served as asked (400/431): malformed, or naming a
    /// destination that is not a local workload at the address the tunnel arrived on.
    ConnectInvalid,
    /// The node is draining: a connection accepted now is reset at once.
    Draining,
}

impl FailureKind {
    pub const ALL: [FailureKind; 21] = [
        FailureKind::DownstreamReset,
        FailureKind::NoOriginalDst,
        FailureKind::UpstreamRefused,
        FailureKind::UpstreamConnectTimeout,
        FailureKind::UpstreamUnreachable,
        FailureKind::UpstreamReset,
        FailureKind::UpstreamError,
        FailureKind::NoHealthyEndpoint,
        FailureKind::Loop,
        FailureKind::NotForThisWorkload,
        FailureKind::FlowLimit,
        FailureKind::TunnelUnavailable,
        FailureKind::SocketSetup,
        FailureKind::Accept,
        FailureKind::TunnelFailed,
        FailureKind::ConnectRejected,
        FailureKind::StreamReset,
        FailureKind::TunnelPoolFull,
        FailureKind::PolicyDenied,
        FailureKind::ConnectInvalid,
        FailureKind::Draining,
    ];

    /// downstream, upstream, policy, kernel or internal.
    pub fn class(self) -> &'static str {
        use FailureKind::*;
        match self {
            DownstreamReset | NoOriginalDst | ConnectInvalid => "downstream",
            UpstreamRefused
            | UpstreamConnectTimeout
            | UpstreamUnreachable
            | UpstreamReset
            | UpstreamError
            | NoHealthyEndpoint
            | TunnelFailed
            | ConnectRejected
            | StreamReset => "upstream",
            Loop | NotForThisWorkload | PolicyDenied => "policy",
            SocketSetup | Accept => "kernel",
            FlowLimit | TunnelUnavailable | TunnelPoolFull | Draining => "internal",
        }
    }

    pub fn reason(self) -> &'static str {
        use FailureKind::*;
        match self {
            DownstreamReset => "reset",
            NoOriginalDst => "no_original_dst",
            UpstreamRefused => "refused",
            UpstreamConnectTimeout => "connect_timeout",
            UpstreamUnreachable => "unreachable",
            UpstreamReset => "reset",
            UpstreamError => "error",
            NoHealthyEndpoint => "no_healthy_endpoint",
            Loop => "loop",
            NotForThisWorkload => "not_for_this_workload",
            FlowLimit => "flow_limit",
            TunnelUnavailable => "hbone_tunnel_unavailable",
            SocketSetup => "socket_setup",
            Accept => "accept",
            TunnelFailed => "hbone_tunnel_failed",
            ConnectRejected => "hbone_connect_rejected",
            StreamReset => "hbone_stream_reset",
            TunnelPoolFull => "hbone_pool_full",
            PolicyDenied => "policy_denied",
            ConnectInvalid => "hbone_bad_request",
            Draining => "draining",
        }
    }

    /// The failure of an upstream connect, from its errno.
    pub fn from_connect_errno(errno: i32) -> FailureKind {
        match errno {
            libc::ECONNREFUSED => FailureKind::UpstreamRefused,
            libc::ETIMEDOUT | libc::ECANCELED => FailureKind::UpstreamConnectTimeout,
            libc::EHOSTUNREACH | libc::ENETUNREACH | libc::EADDRNOTAVAIL => {
                FailureKind::UpstreamUnreachable
            }
            libc::ECONNRESET => FailureKind::UpstreamReset,
            _ => FailureKind::UpstreamError,
        }
    }
}

/// How a flow ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CloseKind {
    /// Both directions reached EOF and were delivered.
    Clean,
    /// One side reset (or failed) and the other was reset to match.
    Reset,
    /// Refused or failed before any byte moved.
    Failed,
    IdleTimeout,
    /// Still open at the drain deadline; reset so no client mistakes it for a clean end.
    Drained,
    /// Open when a reload brought a policy that denies it: reset.
    PolicyDenied,
}

impl CloseKind {
    pub const ALL: [CloseKind; 6] = [
        CloseKind::Clean,
        CloseKind::Reset,
        CloseKind::Failed,
        CloseKind::IdleTimeout,
        CloseKind::Drained,
        CloseKind::PolicyDenied,
    ];

    /// How a flow that broke is counted: a reset once it was open, a failure before.
    pub fn broken(was_open: bool) -> CloseKind {
        if was_open {
            CloseKind::Reset
        } else {
            CloseKind::Failed
        }
    }

    pub fn label(self) -> &'static str {
        match self {
            CloseKind::Clean => "clean",
            CloseKind::Reset => "reset",
            CloseKind::Failed => "failed",
            CloseKind::IdleTimeout => "idle_timeout",
            CloseKind::Drained => "drained",
            CloseKind::PolicyDenied => "policy_denied",
        }
    }
}

/// Istio's labels for the TCP metrics (the subset a node proxy can know without tunnels).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct TcpLabels {
    pub reporter: &'static str,
    pub source_workload: String,
    pub source_workload_namespace: String,
    pub destination_workload: String,
    pub destination_workload_namespace: String,
    pub destination_service: String,
    /// `mutual_tls` for connections carried by an HBONE tunnel (either end), `none` for plain
    /// TCP, as Istio labels them.
    pub security: SecurityPolicy,
}

/// Istio's `connection_security_policy` label.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Default)]
pub enum SecurityPolicy {
    #[default]
    None,
    MutualTls,
}

impl SecurityPolicy {
    pub fn label(self) -> &'static str {
        match self {
            SecurityPolicy::None => "none",
            SecurityPolicy::MutualTls => "mutual_tls",
        }
    }
}

#[derive(Debug, Default)]
pub struct TcpCounters {
    pub opened: AtomicU64,
    pub closed: AtomicU64,
    /// Bytes toward the client (Istio: "sent during response").
    pub sent_bytes: AtomicU64,
    /// Bytes from the client (Istio: "received during request").
    pub received_bytes: AtomicU64,
}

/// Label sets one reactor keeps at most; past it, new sets share one `overflow` series.
const MAX_LABEL_SETS: usize = 4096;
/// Policy denial series one reactor keeps at most (policies come from the config, but a
/// mesh can hold thousands); past it, new ones share one `overflow` series.
const MAX_POLICY_SERIES: usize = 1024;

/// When authorization refused a connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum DenialAt {
    /// At its first connection (401, or a reset on plaintext).
    Connect,
    /// Open when a reload's policy denied it: cut.
    Reload,
}

impl DenialAt {
    pub fn label(self) -> &'static str {
        match self {
            DenialAt::Connect => "connect",
            DenialAt::Reload => "reload",
        }
    }
}

/// The labels of `ringtun_policy_denials_total`: the policy (`namespace/name`, empty when no
/// rule decided) and rule that denied, the policy outcome, and when.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct DenialLabels {
    pub policy: String,
    pub rule: Option<u32>,
    pub reason: &'static str,
    pub at: DenialAt,
}

#[derive(Debug)]
pub struct ReactorMetrics {
    pub reactor: usize,
    pub driver: Mutex<&'static str>,
    pub flows_open: AtomicU64,
    pub accepted: AtomicU64,
    /// Bytes spliced client→upstream and upstream→client, counted on every splice.
    pub splice_bytes_to_upstream: AtomicU64,
    pub splice_bytes_to_downstream: AtomicU64,
    pub pipes_created: AtomicU64,
    pub pipe_resize_refused: AtomicU64,
    /// Empty pipes held for reuse (two descriptors each).
    pub pipes_pooled: AtomicU64,
    /// Pipes lent to flows and streams, carrying bytes.
    pub pipes_in_flight: AtomicU64,
    /// Times a flow or stream found every pipe of the budget busy and copied instead.
    pub pipe_budget_exhausted: AtomicU64,
    /// Times the kernel would not make a pipe and the bytes were copied instead.
    pub pipes_refused: AtomicU64,
    /// Entries in the reactor's timer heap (live and stale; compacted when stale ones pile up).
    pub timers_queued: AtomicU64,
    /// Times the reactor, quiet after connections opened or closed, gave freed memory back to the kernel.
    pub memory_returns: AtomicU64,
    /// The longest one loop iteration took (events, queued work, timers), nanoseconds: how
    /// long the reactor stalled at worst, reloads included.
    pub longest_iteration_ns: AtomicU64,
    /// How long this reactor took to adopt each published snapshot (re-pointing listeners,
    /// deciding every open connection again, swapping credentials): a reload's stall.
    pub adoption: Histogram,
    failures: [AtomicU64; FailureKind::ALL.len()],
    closed: [AtomicU64; CloseKind::ALL.len()],
    tcp: Mutex<HashMap<TcpLabels, Arc<TcpCounters>>>,
    /// Connections authorization refused, by policy and rule (one lock per denial, never per
    /// byte).
    policy_denials: Mutex<HashMap<DenialLabels, u64>>,
    /// HBONE tunnel counters: enum-indexed atomics, touched once per tunnel or stream event
    /// (payload bytes once per receive or send call), never under a lock.
    pub hbone: HboneMetrics,
}

impl ReactorMetrics {
    pub fn new(reactor: usize) -> Self {
        ReactorMetrics {
            reactor,
            driver: Mutex::new("starting"),
            flows_open: AtomicU64::new(0),
            accepted: AtomicU64::new(0),
            splice_bytes_to_upstream: AtomicU64::new(0),
            splice_bytes_to_downstream: AtomicU64::new(0),
            pipes_created: AtomicU64::new(0),
            pipe_resize_refused: AtomicU64::new(0),
            pipes_pooled: AtomicU64::new(0),
            pipes_in_flight: AtomicU64::new(0),
            pipe_budget_exhausted: AtomicU64::new(0),
            pipes_refused: AtomicU64::new(0),
            timers_queued: AtomicU64::new(0),
            memory_returns: AtomicU64::new(0),
            longest_iteration_ns: AtomicU64::new(0),
            adoption: Histogram::default(),
            failures: Default::default(),
            closed: Default::default(),
            tcp: Mutex::new(HashMap::new()),
            policy_denials: Mutex::new(HashMap::new()),
            hbone: HboneMetrics::default(),
        }
    }

    pub fn failure(&self, kind: FailureKind) {
        let i = FailureKind::ALL
            .iter()
            .position(|k| *k == kind)
            .unwrap_or(0);
        self.failures[i].fetch_add(1, Relaxed);
    }

    pub fn failures(&self, kind: FailureKind) -> u64 {
        let i = FailureKind::ALL
            .iter()
            .position(|k| *k == kind)
            .unwrap_or(0);
        self.failures[i].load(Relaxed)
    }

    pub fn closed(&self, kind: CloseKind) {
        let i = CloseKind::ALL.iter().position(|k| *k == kind).unwrap_or(0);
        self.closed[i].fetch_add(1, Relaxed);
    }

    /// One loop iteration's busy time (kept if it is the longest yet).
    pub fn iteration_took(&self, took: std::time::Duration) {
        self.longest_iteration_ns
            .fetch_max(took.as_nanos() as u64, Relaxed);
    }

    /// How long adopting a snapshot took (once per publication, never per event).
    pub fn adopt_took(&self, took: std::time::Duration) {
        self.adoption.observe(took);
    }

    /// Counts a connection authorization refused.
    pub fn policy_denied(&self, labels: DenialLabels) {
        let mut map = self
            .policy_denials
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        let key = if map.len() >= MAX_POLICY_SERIES && !map.contains_key(&labels) {
            DenialLabels {
                policy: "overflow".into(),
                rule: None,
                ..labels
            }
        } else {
            labels
        };
        *map.entry(key).or_default() += 1;
    }

    /// The counters for one label set; looked up once per connection, never per byte.
    pub fn tcp_counters(&self, labels: TcpLabels) -> Arc<TcpCounters> {
        let mut map = self.tcp.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(c) = map.get(&labels) {
            return c.clone();
        }
        let key = if map.len() >= MAX_LABEL_SETS {
            TcpLabels {
                reporter: labels.reporter,
                source_workload: "overflow".into(),
                source_workload_namespace: "overflow".into(),
                destination_workload: "overflow".into(),
                destination_workload_namespace: "overflow".into(),
                destination_service: "overflow".into(),
                security: labels.security,
            }
        } else {
            labels
        };
        map.entry(key).or_default().clone()
    }
}

/// Connections the io_uring driver accepted, by accept mode: `multishot` (one request per
/// listener keeps accepting; kernels 5.19+) or `single_shot` (re-armed after every connection,
/// the fallback before 5.19). It proves which path carried a node's traffic, which the driver
/// choice alone does not. Process-wide because the driver has no shard of its own; one relaxed
/// add per accepted connection, never per byte.
pub static IO_URING_ACCEPTS: AcceptModes = AcceptModes::new();

/// Accept counts by mode (see [`IO_URING_ACCEPTS`]).
#[derive(Debug)]
pub struct AcceptModes {
    multishot: AtomicU64,
    single_shot: AtomicU64,
}

impl AcceptModes {
    pub const fn new() -> Self {
        AcceptModes {
            multishot: AtomicU64::new(0),
            single_shot: AtomicU64::new(0),
        }
    }

    /// One connection accepted by a multishot (`true`) or single-shot accept.
    pub fn count(&self, multishot: bool) {
        let c = if multishot {
            &self.multishot
        } else {
            &self.single_shot
        };
        c.fetch_add(1, Relaxed);
    }

    /// (multishot, single-shot) accepts so far.
    pub fn get(&self) -> (u64, u64) {
        (self.multishot.load(Relaxed), self.single_shot.load(Relaxed))
    }

    fn render(&self, out: &mut String) {
        let (multi, single) = self.get();
        let _ = writeln!(
            out,
            "# HELP ringtun_io_uring_accepts_total Connections the io_uring driver accepted, by accept mode (multishot on 5.19+, single_shot re-armed per connection before).\n\
             # TYPE ringtun_io_uring_accepts_total counter\n\
             ringtun_io_uring_accepts_total{{mode=\"multishot\"}} {multi}\n\
             ringtun_io_uring_accepts_total{{mode=\"single_shot\"}} {single}"
        );
    }
}

impl Default for AcceptModes {
    fn default() -> Self {
        Self::new()
    }
}

/// A latency histogram for rare events (one observation per snapshot adoption): fixed buckets
/// from 100 µs to 1 s, the sum, the count and the longest observation, all atomics.
#[derive(Debug, Default)]
pub struct Histogram {
    buckets: [AtomicU64; Histogram::BOUNDS_NS.len()],
    count: AtomicU64,
    sum_ns: AtomicU64,
    pub longest_ns: AtomicU64,
}

impl Histogram {
    /// Upper bounds of the buckets (the `le` labels), nanoseconds; 10 ms is the reload-stall
    /// target, so it is a bound.
    const BOUNDS_NS: [u64; 10] = [
        100_000,
        250_000,
        500_000,
        1_000_000,
        2_500_000,
        5_000_000,
        10_000_000,
        25_000_000,
        100_000_000,
        1_000_000_000,
    ];

    pub fn observe(&self, took: std::time::Duration) {
        let ns = u64::try_from(took.as_nanos()).unwrap_or(u64::MAX);
        if let Some(i) = Self::BOUNDS_NS.iter().position(|b| ns <= *b) {
            self.buckets[i].fetch_add(1, Relaxed);
        }
        self.count.fetch_add(1, Relaxed);
        self.sum_ns.fetch_add(ns, Relaxed);
        self.longest_ns.fetch_max(ns, Relaxed);
    }

    pub fn count(&self) -> u64 {
        self.count.load(Relaxed)
    }

    /// The Prometheus text of this histogram (cumulative buckets, `+Inf`, sum and count),
    /// each series with `labels` first.
    fn render(&self, out: &mut String, name: &str, labels: &str) {
        let mut cumulative = 0;
        for (bound, n) in Self::BOUNDS_NS.iter().zip(&self.buckets) {
            cumulative += n.load(Relaxed);
            let le = *bound as f64 / 1e9;
            let _ = writeln!(out, "{name}_bucket{{{labels},le=\"{le}\"}} {cumulative}");
        }
        let count = self.count.load(Relaxed);
        let _ = writeln!(out, "{name}_bucket{{{labels},le=\"+Inf\"}} {count}");
        let sum = self.sum_ns.load(Relaxed) as f64 / 1e9;
        let _ = writeln!(out, "{name}_sum{{{labels}}} {sum:.6}");
        let _ = writeln!(out, "{name}_count{{{labels}}} {count}");
    }
}

/// Process-wide facts shown with the counters.
#[derive(Debug, Default)]
pub struct ProcessFacts {
    pub open_files_soft: u64,
    pub open_files_hard: u64,
    pub max_flows_per_reactor: u64,
    pub pipes_per_reactor: u64,
}

/// The control thread's counters: configuration reloads and the generation running.
#[derive(Debug, Default)]
pub struct ControlMetrics {
    /// Reloads that published a new snapshot.
    pub reloads_applied: AtomicU64,
    /// Reloads refused (the file did not load, credentials did not): the running snapshot
    /// stayed.
    pub reloads_failed: AtomicU64,
    /// The configuration generation the node runs (1 at start).
    pub generation: AtomicU64,
    /// How long the last applied reload took, from reading the file to every reactor running
    /// on the new snapshot, nanoseconds.
    pub last_reload_ns: AtomicU64,
    /// Node CA mode: certificates issued anew at half their lifetime.
    pub certificate_renewals: AtomicU64,
    /// Node CA mode: renewal attempts that failed (the current certificates stayed).
    pub certificate_renewals_failed: AtomicU64,
}

#[derive(Debug)]
pub struct Metrics {
    pub reactors: Vec<Arc<ReactorMetrics>>,
    pub facts: ProcessFacts,
    pub control: ControlMetrics,
}

impl Metrics {
    pub fn new(reactors: usize, facts: ProcessFacts) -> Self {
        Metrics {
            reactors: (0..reactors)
                .map(|i| Arc::new(ReactorMetrics::new(i)))
                .collect(),
            facts,
            control: ControlMetrics {
                generation: AtomicU64::new(1),
                ..ControlMetrics::default()
            },
        }
    }

    pub fn flows_open(&self) -> u64 {
        self.reactors
            .iter()
            .map(|r| r.flows_open.load(Relaxed))
            .sum()
    }

    pub fn failures(&self, kind: FailureKind) -> u64 {
        self.reactors.iter().map(|r| r.failures(kind)).sum()
    }

    /// Totals of the TCP counters over every label set and reactor: (opened, closed, received, sent).
    pub fn tcp_totals(&self) -> (u64, u64, u64, u64) {
        let mut t = (0, 0, 0, 0);
        for r in &self.reactors {
            for c in r.tcp.lock().unwrap_or_else(|p| p.into_inner()).values() {
                t.0 += c.opened.load(Relaxed);
                t.1 += c.closed.load(Relaxed);
                t.2 += c.received_bytes.load(Relaxed);
                t.3 += c.sent_bytes.load(Relaxed);
            }
        }
        t
    }

    /// Prometheus text exposition (version 0.0.4).
    pub fn render(&self) -> String {
        let mut out = String::with_capacity(4096);
        let mut tcp: HashMap<TcpLabels, [u64; 4]> = HashMap::new();
        for r in &self.reactors {
            for (labels, c) in r.tcp.lock().unwrap_or_else(|p| p.into_inner()).iter() {
                let e = tcp.entry(labels.clone()).or_default();
                e[0] += c.opened.load(Relaxed);
                e[1] += c.closed.load(Relaxed);
                e[2] += c.sent_bytes.load(Relaxed);
                e[3] += c.received_bytes.load(Relaxed);
            }
        }
        let mut rows: Vec<_> = tcp.into_iter().collect();
        rows.sort_by(|a, b| format!("{:?}", a.0).cmp(&format!("{:?}", b.0)));
        let names = [
            (
                "istio_tcp_connections_opened_total",
                "TCP connections opened",
                0,
            ),
            (
                "istio_tcp_connections_closed_total",
                "TCP connections closed",
                1,
            ),
            (
                "istio_tcp_sent_bytes_total",
                "Bytes sent toward the client",
                2,
            ),
            (
                "istio_tcp_received_bytes_total",
                "Bytes received from the client",
                3,
            ),
        ];
        for (name, help, i) in names {
            let _ = writeln!(out, "# HELP {name} {help}.\n# TYPE {name} counter");
            for (l, v) in &rows {
                let _ = writeln!(
                    out,
                    "{name}{{reporter=\"{}\",source_workload=\"{}\",source_workload_namespace=\"{}\",destination_workload=\"{}\",destination_workload_namespace=\"{}\",destination_service=\"{}\",request_protocol=\"tcp\",connection_security_policy=\"{}\"}} {}",
                    l.reporter,
                    esc(&l.source_workload),
                    esc(&l.source_workload_namespace),
                    esc(&l.destination_workload),
                    esc(&l.destination_workload_namespace),
                    esc(&l.destination_service),
                    l.security.label(),
                    v[i]
                );
            }
        }
        let per_reactor: [PerReactorMetric; 12] = [
            (
                "ringtun_flows_open",
                "gauge",
                "Flows open on each reactor",
                |r| r.flows_open.load(Relaxed),
            ),
            (
                "ringtun_connections_accepted_total",
                "counter",
                "Connections accepted from capture listeners",
                |r| r.accepted.load(Relaxed),
            ),
            (
                "ringtun_splice_bytes_to_upstream_total",
                "counter",
                "Bytes spliced client to upstream",
                |r| r.splice_bytes_to_upstream.load(Relaxed),
            ),
            (
                "ringtun_splice_bytes_to_downstream_total",
                "counter",
                "Bytes spliced upstream to client",
                |r| r.splice_bytes_to_downstream.load(Relaxed),
            ),
            (
                "ringtun_pipes_created_total",
                "counter",
                "Pipes created (reuse not counted)",
                |r| r.pipes_created.load(Relaxed),
            ),
            (
                "ringtun_pipes_in_flight",
                "gauge",
                "Pipes lent to flows and tunnel streams, carrying bytes (two descriptors each)",
                |r| r.pipes_in_flight.load(Relaxed),
            ),
            (
                "ringtun_pipe_budget_exhausted_total",
                "counter",
                "Times a flow or stream found every pipe of its reactor's budget busy and copied its bytes through user space instead",
                |r| r.pipe_budget_exhausted.load(Relaxed),
            ),
            (
                "ringtun_pipes_refused_total",
                "counter",
                "Times the kernel would not make a pipe (descriptors, fs.pipe-user-pages-hard) and a flow or stream copied its bytes through user space instead",
                |r| r.pipes_refused.load(Relaxed),
            ),
            (
                "ringtun_reactor_memory_returns_total",
                "counter",
                "Times a reactor, quiet after connections opened or closed, gave freed memory back to the kernel",
                |r| r.memory_returns.load(Relaxed),
            ),
            (
                "ringtun_pipe_resize_refused_total",
                "counter",
                "Pipes the kernel kept at default size",
                |r| r.pipe_resize_refused.load(Relaxed),
            ),
            (
                "ringtun_pipes_pooled",
                "gauge",
                "Empty pipes held for reuse (two descriptors each)",
                |r| r.pipes_pooled.load(Relaxed),
            ),
            (
                "ringtun_timers_queued",
                "gauge",
                "Timer heap entries per reactor (bounded: stale ones are compacted away)",
                |r| r.timers_queued.load(Relaxed),
            ),
        ];
        for (name, kind, help, get) in per_reactor {
            let _ = writeln!(out, "# HELP {name} {help}.\n# TYPE {name} {kind}");
            for r in &self.reactors {
                let _ = writeln!(out, "{name}{{reactor=\"{}\"}} {}", r.reactor, get(r));
            }
        }
        let seconds: [PerReactorNanos; 2] = [
            (
                "ringtun_reactor_longest_iteration_seconds",
                "The longest one reactor loop iteration took: its worst stall",
                |r| r.longest_iteration_ns.load(Relaxed),
            ),
            (
                "ringtun_reactor_snapshot_adoption_longest_seconds",
                "The longest adoption of a published snapshot (a reload's stall) since start",
                |r| r.adoption.longest_ns.load(Relaxed),
            ),
        ];
        for (name, help, get) in seconds {
            let _ = writeln!(out, "# HELP {name} {help}.\n# TYPE {name} gauge");
            for r in &self.reactors {
                let _ = writeln!(
                    out,
                    "{name}{{reactor=\"{}\"}} {:.6}",
                    r.reactor,
                    get(r) as f64 / 1e9
                );
            }
        }
        let name = "ringtun_reactor_snapshot_adoption_seconds";
        let _ = writeln!(
            out,
            "# HELP {name} How long each reactor took to adopt a published snapshot (configuration reload or certificate rotation).\n# TYPE {name} histogram"
        );
        for r in &self.reactors {
            r.adoption
                .render(&mut out, name, &format!("reactor=\"{}\"", r.reactor));
        }
        let _ = writeln!(out, "# HELP ringtun_driver_info Readiness driver each reactor runs.\n# TYPE ringtun_driver_info gauge");
        for r in &self.reactors {
            let d = *r.driver.lock().unwrap_or_else(|p| p.into_inner());
            let _ = writeln!(
                out,
                "ringtun_driver_info{{reactor=\"{}\",driver=\"{d}\"}} 1",
                r.reactor
            );
        }
        IO_URING_ACCEPTS.render(&mut out);
        let _ = writeln!(out, "# HELP ringtun_connection_failures_total Failed connections by class and reason.\n# TYPE ringtun_connection_failures_total counter");
        for kind in FailureKind::ALL {
            let _ = writeln!(
                out,
                "ringtun_connection_failures_total{{class=\"{}\",reason=\"{}\"}} {}",
                kind.class(),
                kind.reason(),
                self.failures(kind)
            );
        }
        let _ = writeln!(out, "# HELP ringtun_flows_closed_total Flows ended, by how.\n# TYPE ringtun_flows_closed_total counter");
        for (i, kind) in CloseKind::ALL.iter().enumerate() {
            let v: u64 = self
                .reactors
                .iter()
                .map(|r| r.closed[i].load(Relaxed))
                .sum();
            let _ = writeln!(
                out,
                "ringtun_flows_closed_total{{end=\"{}\"}} {v}",
                kind.label()
            );
        }
        let _ = writeln!(
            out,
            "# HELP ringtun_open_files_limit RLIMIT_NOFILE ringtun runs under.\n# TYPE ringtun_open_files_limit gauge\nringtun_open_files_limit{{kind=\"soft\"}} {}\nringtun_open_files_limit{{kind=\"hard\"}} {}",
            self.facts.open_files_soft, self.facts.open_files_hard
        );
        let _ = writeln!(
            out,
            "# HELP ringtun_max_flows_per_reactor Flow limit per reactor after the fd budget.\n# TYPE ringtun_max_flows_per_reactor gauge\nringtun_max_flows_per_reactor {}",
            self.facts.max_flows_per_reactor
        );
        let _ = writeln!(
            out,
            "# HELP ringtun_pipe_budget_per_reactor Pipes each reactor may have at once, after the fd budget.\n# TYPE ringtun_pipe_budget_per_reactor gauge\nringtun_pipe_budget_per_reactor {}",
            self.facts.pipes_per_reactor
        );
        let mut denials: std::collections::BTreeMap<DenialLabels, u64> = Default::default();
        for r in &self.reactors {
            let map = r.policy_denials.lock().unwrap_or_else(|p| p.into_inner());
            for (labels, n) in map.iter() {
                *denials.entry(labels.clone()).or_default() += n;
            }
        }
        let _ = writeln!(out, "# HELP ringtun_policy_denials_total Connections authorization policy refused (at connect) or cut (at a reload), by the policy and rule that decided.\n# TYPE ringtun_policy_denials_total counter");
        for (l, n) in &denials {
            let _ = writeln!(
                out,
                "ringtun_policy_denials_total{{policy=\"{}\",rule=\"{}\",reason=\"{}\",at=\"{}\"}} {n}",
                esc(&l.policy),
                l.rule.map(|r| r.to_string()).unwrap_or_default(),
                l.reason,
                l.at.label()
            );
        }
        let c = &self.control;
        let _ = writeln!(
            out,
            "# HELP ringtun_config_reloads_total Configuration reloads, applied or failed (a failed one leaves the running snapshot in place).\n# TYPE ringtun_config_reloads_total counter\nringtun_config_reloads_total{{result=\"applied\"}} {}\nringtun_config_reloads_total{{result=\"failed\"}} {}",
            c.reloads_applied.load(Relaxed),
            c.reloads_failed.load(Relaxed)
        );
        let _ = writeln!(
            out,
            "# HELP ringtun_config_generation The configuration generation the node runs.\n# TYPE ringtun_config_generation gauge\nringtun_config_generation {}",
            c.generation.load(Relaxed)
        );
        let _ = writeln!(
            out,
            "# HELP ringtun_config_reload_seconds How long the last applied reload took, until every reactor ran on it.\n# TYPE ringtun_config_reload_seconds gauge\nringtun_config_reload_seconds {:.6}",
            c.last_reload_ns.load(Relaxed) as f64 / 1e9
        );
        let _ = writeln!(
            out,
            "# HELP ringtun_certificate_renewals_total Node CA mode: certificates renewed at half their lifetime, and renewal attempts that failed (the current certificates stay).\n# TYPE ringtun_certificate_renewals_total counter\nringtun_certificate_renewals_total{{result=\"renewed\"}} {}\nringtun_certificate_renewals_total{{result=\"failed\"}} {}",
            c.certificate_renewals.load(Relaxed),
            c.certificate_renewals_failed.load(Relaxed)
        );
        let shards: Vec<&HboneMetrics> = self.reactors.iter().map(|r| &r.hbone).collect();
        super::hbone_metrics::render(&mut out, &shards);
        let fds = std::fs::read_dir("/proc/self/fd")
            .map(|d| d.count() as u64)
            .unwrap_or(0);
        let _ = writeln!(out, "# HELP ringtun_open_fds Descriptors open in the process.\n# TYPE ringtun_open_fds gauge\nringtun_open_fds {fds}");
        out
    }
}

/// A per-reactor duration gauge: name, help text, and how to read its nanoseconds from a shard.
type PerReactorNanos = (&'static str, &'static str, fn(&ReactorMetrics) -> u64);

/// A per-reactor series: name, Prometheus type, help text, and how to read it from a shard.
type PerReactorMetric = (
    &'static str,
    &'static str,
    &'static str,
    fn(&ReactorMetrics) -> u64,
);

fn esc(s: &str) -> String {
    s.replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn labels(w: &str) -> TcpLabels {
        TcpLabels {
            reporter: "source",
            source_workload: w.into(),
            source_workload_namespace: "ns".into(),
            destination_workload: "unknown".into(),
            destination_workload_namespace: "unknown".into(),
            destination_service: "unknown".into(),
            security: SecurityPolicy::None,
        }
    }

    #[test]
    fn adoption_histogram_counts_cumulative_buckets_and_the_longest() {
        use std::time::Duration;
        let h = Histogram::default();
        h.observe(Duration::from_micros(80));
        h.observe(Duration::from_micros(700));
        h.observe(Duration::from_millis(30));
        h.observe(Duration::from_secs(3));
        let mut out = String::new();
        h.render(&mut out, "x", "reactor=\"0\"");
        for line in [
            "x_bucket{reactor=\"0\",le=\"0.0001\"} 1\n",
            "x_bucket{reactor=\"0\",le=\"0.0005\"} 1\n",
            "x_bucket{reactor=\"0\",le=\"0.001\"} 2\n",
            "x_bucket{reactor=\"0\",le=\"0.01\"} 2\n",
            "x_bucket{reactor=\"0\",le=\"0.1\"} 3\n",
            "x_bucket{reactor=\"0\",le=\"1\"} 3\n",
            "x_bucket{reactor=\"0\",le=\"+Inf\"} 4\n",
            "x_sum{reactor=\"0\"} 3.030780\n",
            "x_count{reactor=\"0\"} 4\n",
        ] {
            assert!(out.contains(line), "no `{line}` in\n{out}");
        }
        assert_eq!(h.longest_ns.load(Relaxed), 3_000_000_000);
    }

    #[test]
    fn scrape_sums_reactor_shards() {
        let m = Metrics::new(2, ProcessFacts::default());
        m.reactors[0]
            .tcp_counters(labels("a"))
            .received_bytes
            .fetch_add(5, Relaxed);
        m.reactors[1]
            .tcp_counters(labels("a"))
            .received_bytes
            .fetch_add(7, Relaxed);
        m.reactors[1].failure(FailureKind::UpstreamRefused);
        let text = m.render();
        assert!(text
            .contains("istio_tcp_received_bytes_total{reporter=\"source\",source_workload=\"a\""));
        assert!(
            text.lines()
                .any(|l| l.starts_with("istio_tcp_received_bytes_total") && l.ends_with(" 12")),
            "{text}"
        );
        assert!(text.contains(
            "ringtun_connection_failures_total{class=\"upstream\",reason=\"refused\"} 1"
        ));
    }

    #[test]
    fn io_uring_accepts_are_counted_by_mode() {
        let modes = AcceptModes::new();
        modes.count(false);
        modes.count(false);
        modes.count(true);
        assert_eq!(modes.get(), (1, 2));
        let mut text = String::new();
        modes.render(&mut text);
        assert!(
            text.contains("ringtun_io_uring_accepts_total{mode=\"multishot\"} 1\n")
                && text.contains("ringtun_io_uring_accepts_total{mode=\"single_shot\"} 2"),
            "{text}"
        );
        // The scrape always carries both series, so a dashboard (and the kernel matrix) can
        // tell "no single-shot accepts" from "metric missing".
        let scrape = Metrics::new(1, ProcessFacts::default()).render();
        for mode in ["multishot", "single_shot"] {
            assert!(
                scrape.contains(&format!(
                    "ringtun_io_uring_accepts_total{{mode=\"{mode}\"}} "
                )),
                "{scrape}"
            );
        }
    }

    #[test]
    fn label_sets_are_capped() {
        let r = ReactorMetrics::new(0);
        for i in 0..MAX_LABEL_SETS + 10 {
            r.tcp_counters(labels(&format!("w{i}")));
        }
        assert_eq!(r.tcp.lock().unwrap().len(), MAX_LABEL_SETS + 1);
    }
}
