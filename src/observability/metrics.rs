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
    PipeUnavailable,
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
    /// The node is draining: a connection accepted now is reset at once.
    Draining,
}

impl FailureKind {
    pub const ALL: [FailureKind; 20] = [
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
        FailureKind::PipeUnavailable,
        FailureKind::SocketSetup,
        FailureKind::Accept,
        FailureKind::TunnelFailed,
        FailureKind::ConnectRejected,
        FailureKind::StreamReset,
        FailureKind::TunnelPoolFull,
        FailureKind::Draining,
    ];

    /// downstream, upstream, policy, kernel or internal.
    pub fn class(self) -> &'static str {
        use FailureKind::*;
        match self {
            DownstreamReset | NoOriginalDst => "downstream",
            UpstreamRefused
            | UpstreamConnectTimeout
            | UpstreamUnreachable
            | UpstreamReset
            | UpstreamError
            | NoHealthyEndpoint
            | TunnelFailed
            | ConnectRejected
            | StreamReset => "upstream",
            Loop | NotForThisWorkload => "policy",
            PipeUnavailable | SocketSetup | Accept => "kernel",
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
            PipeUnavailable => "pipe_unavailable",
            SocketSetup => "socket_setup",
            Accept => "accept",
            TunnelFailed => "hbone_tunnel_failed",
            ConnectRejected => "hbone_connect_rejected",
            StreamReset => "hbone_stream_reset",
            TunnelPoolFull => "hbone_pool_full",
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
}

impl CloseKind {
    pub const ALL: [CloseKind; 5] = [
        CloseKind::Clean,
        CloseKind::Reset,
        CloseKind::Failed,
        CloseKind::IdleTimeout,
        CloseKind::Drained,
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
    /// Entries in the reactor's timer heap (live and stale; compacted when stale ones pile up).
    pub timers_queued: AtomicU64,
    failures: [AtomicU64; FailureKind::ALL.len()],
    closed: [AtomicU64; CloseKind::ALL.len()],
    tcp: Mutex<HashMap<TcpLabels, Arc<TcpCounters>>>,
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
            timers_queued: AtomicU64::new(0),
            failures: Default::default(),
            closed: Default::default(),
            tcp: Mutex::new(HashMap::new()),
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
            }
        } else {
            labels
        };
        map.entry(key).or_default().clone()
    }
}

/// Process-wide facts shown with the counters.
#[derive(Debug, Default)]
pub struct ProcessFacts {
    pub open_files_soft: u64,
    pub open_files_hard: u64,
    pub max_flows_per_reactor: u64,
}

#[derive(Debug)]
pub struct Metrics {
    pub reactors: Vec<Arc<ReactorMetrics>>,
    pub facts: ProcessFacts,
}

impl Metrics {
    pub fn new(reactors: usize, facts: ProcessFacts) -> Self {
        Metrics {
            reactors: (0..reactors)
                .map(|i| Arc::new(ReactorMetrics::new(i)))
                .collect(),
            facts,
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
                    "{name}{{reporter=\"{}\",source_workload=\"{}\",source_workload_namespace=\"{}\",destination_workload=\"{}\",destination_workload_namespace=\"{}\",destination_service=\"{}\",request_protocol=\"tcp\",connection_security_policy=\"none\"}} {}",
                    l.reporter,
                    esc(&l.source_workload),
                    esc(&l.source_workload_namespace),
                    esc(&l.destination_workload),
                    esc(&l.destination_workload_namespace),
                    esc(&l.destination_service),
                    v[i]
                );
            }
        }
        let per_reactor: [PerReactorMetric; 8] = [
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
        let _ = writeln!(out, "# HELP ringtun_driver_info Readiness driver each reactor runs.\n# TYPE ringtun_driver_info gauge");
        for r in &self.reactors {
            let d = *r.driver.lock().unwrap_or_else(|p| p.into_inner());
            let _ = writeln!(
                out,
                "ringtun_driver_info{{reactor=\"{}\",driver=\"{d}\"}} 1",
                r.reactor
            );
        }
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
        let shards: Vec<&HboneMetrics> = self.reactors.iter().map(|r| &r.hbone).collect();
        super::hbone_metrics::render(&mut out, &shards);
        let fds = std::fs::read_dir("/proc/self/fd")
            .map(|d| d.count() as u64)
            .unwrap_or(0);
        let _ = writeln!(out, "# HELP ringtun_open_fds Descriptors open in the process.\n# TYPE ringtun_open_fds gauge\nringtun_open_fds {fds}");
        out
    }
}

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
        }
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
    fn label_sets_are_capped() {
        let r = ReactorMetrics::new(0);
        for i in 0..MAX_LABEL_SETS + 10 {
            r.tcp_counters(labels(&format!("w{i}")));
        }
        assert_eq!(r.tcp.lock().unwrap().len(), MAX_LABEL_SETS + 1);
    }
}
