//! HBONE tunnel counters: enum-indexed atomics in each reactor's shard.
//!
//! Every label a tunnel series carries is one of a fixed list (an enum here), so a counter is an
//! array slot and an event costs one relaxed atomic add — no lock, no string. A scrape sums the
//! shards and prints every series that has been touched (gauges always), in the Prometheus
//! names and label texts ringtun has always exported.

use std::fmt::Write as _;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering::Relaxed};

use crate::kernel_features::KtlsCipher;
use crate::tunnel::inbound_rules::RejectReason;

/// An enum whose variants are a metric label's values, with `ALL` in index order.
macro_rules! label_enum {
    ($(#[$meta:meta])* $name:ident { $($(#[$vmeta:meta])* $variant:ident => $label:literal),+ $(,)? }) => {
        $(#[$meta])*
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
        pub enum $name { $($(#[$vmeta])* $variant),+ }

        impl $name {
            pub const ALL: &'static [$name] = &[$($name::$variant),+];
            pub const COUNT: usize = Self::ALL.len();

            pub fn label(self) -> &'static str {
                match self { $($name::$variant => $label),+ }
            }

            fn index(self) -> usize {
                self as usize
            }
        }
    };
}

label_enum!(
    /// Which end of a tunnel this node is.
    Role { Client => "client", Server => "server" }
);

label_enum!(
    /// Who encrypts a tunnel's records.
    TlsLabel { Kernel => "ktls", UserSpace => "userspace" }
);

label_enum!(
    /// The AEAD a tunnel negotiated.
    CipherLabel {
        Aes128Gcm => "aes_128_gcm",
        Aes256Gcm => "aes_256_gcm",
        Chacha20Poly1305 => "chacha20_poly1305",
        Unknown => "unknown",
    }
);

impl From<Option<KtlsCipher>> for CipherLabel {
    fn from(c: Option<KtlsCipher>) -> Self {
        match c {
            Some(KtlsCipher::Aes128Gcm) => CipherLabel::Aes128Gcm,
            Some(KtlsCipher::Aes256Gcm) => CipherLabel::Aes256Gcm,
            Some(KtlsCipher::Chacha20Poly1305) => CipherLabel::Chacha20Poly1305,
            None => CipherLabel::Unknown,
        }
    }
}

label_enum!(
    /// Why a tunnel failed (`ringtun_hbone_tunnel_failures_total{reason}`).
    TunnelFailure {
        /// The TCP connect to the peer's 15008 failed.
        Connect => "connect",
        /// Connect and handshake took longer than `timeouts.connect`.
        HandshakeTimeout => "handshake_timeout",
        /// rustls refused the peer (certificate, protocol).
        TlsHandshake => "tls_handshake",
        /// The socket failed during the handshake.
        TlsIo => "tls_io",
        /// The handshake finished without TLS 1.3, h2 or a usable identity.
        TlsNegotiation => "tls_negotiation",
        /// The kernel refused the keys after accepting the TLS ULP.
        KtlsInstall => "ktls_install",
        /// The user-space record layer could not be keyed.
        TlsKeys => "tls_keys",
        /// A record did not open (bad MAC, malformed).
        TlsRecord => "tls_record",
        /// The peer sent a fatal alert or a record that has no business here.
        TlsAlert => "tls_alert",
        /// The peer updated its keys where they cannot be followed.
        KeyUpdate => "key_update",
        /// The peer closed TCP without close_notify, or inside a record or frame.
        PeerClosed => "peer_closed",
        Read => "read",
        Write => "write",
        /// The HTTP/2 session failed (the session says why).
        Http2 => "http2",
        /// The peer stopped answering PINGs.
        Keepalive => "keepalive",
        /// A stream ended inside the DATA frame it was writing.
        StreamEndedMidFrame => "stream_ended_mid_frame",
        /// The socket could not be registered with the driver.
        Register => "register",
        /// No certificate for the local workload the tunnel arrived for.
        NoCertificate => "no_certificate",
        /// The local workload's certificate has expired: it is not presented.
        LocalCertificateExpired => "local_certificate_expired",
        /// The local workload's certificate is not valid yet: it is not presented.
        LocalCertificateNotYetValid => "local_certificate_not_yet_valid",
        Internal => "internal",
    }
);

label_enum!(
    /// Why a tunnel closed without failing (`ringtun_hbone_tunnels_closed_total{reason}`).
    TunnelClose {
        /// The session drained: GOAWAY in effect and no stream left.
        Closed => "closed",
        /// The node is stopping.
        Shutdown => "shutdown",
        /// No stream for the idle timeout.
        Idle => "idle",
        /// The pool drained it and its last stream closed.
        Drained => "drained",
        /// The peer allows no stream.
        NoStreams => "no_streams",
        /// The record budget was reached (the tunnel is retired: drained, then closed).
        RecordBudget => "record_budget",
        /// The peer closed its side first.
        PeerClosed => "peer_closed",
        /// Closed to keep a budget (`ringtun_hbone_tunnels_shed_total` says which).
        Shed => "shed",
    }
);

label_enum!(
    /// Why a server tunnel was refused or closed to keep a budget
    /// (`ringtun_hbone_tunnels_shed_total{reason}`).
    TunnelShed {
        /// The reactor held `limits.max_handshakes_per_reactor` connections in their handshake.
        HandshakeBudget => "handshake_budget",
        /// The client address held `limits.max_handshakes_per_source` of them.
        HandshakePerSource => "handshake_per_source",
        /// The peer identity held `limits.max_tunnels_per_peer` tunnels, none idle.
        PeerIdentity => "peer_identity",
        /// The peer address held `limits.max_tunnels_per_peer` tunnels, none idle.
        PeerAddress => "peer_address",
        /// The flow budget was full and no idle tunnel could make room.
        FlowLimit => "flow_limit",
        /// A tunnel without streams closed to make room (for the same peer, or the flow budget).
        IdleUnderPressure => "idle_under_pressure",
    }
);

label_enum!(
    /// Outcome of an outbound tunnel checkout.
    PoolOutcome { Reuse => "reuse", Open => "open", Wait => "wait", Refuse => "refuse" }
);

label_enum!(
    /// Non-data TLS records a tunnel received.
    TlsRecordKind {
        NewSessionTicket => "new_session_ticket",
        CloseNotify => "close_notify",
        KeyUpdate => "key_update",
        Alert => "alert",
    }
);

label_enum!(
    /// A TLS 1.3 key update: the peer's followed (a new receive key), or our own sent (a
    /// KeyUpdate record, then a new send key).
    KeyUpdateKind { Followed => "followed", Sent => "sent" }
);

label_enum!(
    /// Which way DATA payload went.
    PayloadDirection { Sent => "sent", Received => "received" }
);

label_enum!(
    /// Whether DATA payload stayed in the kernel.
    PayloadPath { Spliced => "spliced", Copied => "copied" }
);

/// HTTP statuses a CONNECT answer is counted under; anything else is `other`.
const STATUSES: [u16; 10] = [200, 400, 401, 403, 404, 405, 431, 500, 502, 503];
const STATUS_SLOTS: usize = STATUSES.len() + 1;

fn status_slot(status: u16) -> usize {
    STATUSES
        .iter()
        .position(|s| *s == status)
        .unwrap_or(STATUSES.len())
}

type PerRole<T> = [T; Role::COUNT];

/// One reactor's tunnel counters.
#[derive(Debug, Default)]
pub struct HboneMetrics {
    tunnels_open: PerRole<AtomicI64>,
    tunnels: PerRole<[[AtomicU64; CipherLabel::COUNT]; TlsLabel::COUNT]>,
    handshakes: PerRole<AtomicU64>,
    failures: PerRole<[AtomicU64; TunnelFailure::COUNT]>,
    closed: PerRole<[AtomicU64; TunnelClose::COUNT]>,
    closed_failed: PerRole<[AtomicU64; TunnelFailure::COUNT]>,
    streams: PerRole<[AtomicU64; STATUS_SLOTS]>,
    pool: [AtomicU64; PoolOutcome::COUNT],
    tls_records: [AtomicU64; TlsRecordKind::COUNT],
    key_updates: [AtomicU64; KeyUpdateKind::COUNT],
    payload: [[AtomicU64; PayloadPath::COUNT]; PayloadDirection::COUNT],
    shed: [AtomicU64; TunnelShed::COUNT],
    connects_refused: [AtomicU64; RejectReason::COUNT],
    handshaking: AtomicI64,
}

impl HboneMetrics {
    pub fn handshake_started(&self, role: Role) {
        self.handshakes[role.index()].fetch_add(1, Relaxed);
    }

    /// A tunnel finished its handshake and runs: counted by TLS mode and cipher, and open.
    pub fn established(&self, role: Role, tls: TlsLabel, cipher: CipherLabel) {
        self.tunnels[role.index()][tls.index()][cipher.index()].fetch_add(1, Relaxed);
        self.tunnels_open[role.index()].fetch_add(1, Relaxed);
    }

    /// An established tunnel is no longer open.
    pub fn open_ended(&self, role: Role) {
        self.tunnels_open[role.index()].fetch_sub(1, Relaxed);
    }

    pub fn failed(&self, role: Role, why: TunnelFailure) {
        self.failures[role.index()][why.index()].fetch_add(1, Relaxed);
    }

    pub fn closed(&self, role: Role, why: TunnelClose) {
        self.closed[role.index()][why.index()].fetch_add(1, Relaxed);
    }

    /// A tunnel closed because it failed (also counted in the failures).
    pub fn closed_failed(&self, role: Role, why: TunnelFailure) {
        self.closed_failed[role.index()][why.index()].fetch_add(1, Relaxed);
    }

    pub fn stream_answered(&self, role: Role, status: u16) {
        self.streams[role.index()][status_slot(status)].fetch_add(1, Relaxed);
    }

    pub fn pool(&self, outcome: PoolOutcome) {
        self.pool[outcome.index()].fetch_add(1, Relaxed);
    }

    /// An inbound CONNECT answered with an error status, and why.
    pub fn connect_refused(&self, why: RejectReason) {
        self.connects_refused[why.index()].fetch_add(1, Relaxed);
    }

    pub fn shed(&self, why: TunnelShed) {
        self.shed[why.index()].fetch_add(1, Relaxed);
    }

    /// Server connections in their TLS handshake: one more (`+1`) or one fewer (`-1`).
    pub fn handshaking(&self, delta: i64) {
        self.handshaking.fetch_add(delta, Relaxed);
    }

    /// Tunnels shed for `why` so far.
    pub fn shed_count(&self, why: TunnelShed) -> u64 {
        self.shed[why.index()].load(Relaxed)
    }

    pub fn tls_record(&self, kind: TlsRecordKind) {
        self.tls_records[kind.index()].fetch_add(1, Relaxed);
    }

    pub fn key_update(&self, kind: KeyUpdateKind) {
        self.key_updates[kind.index()].fetch_add(1, Relaxed);
    }

    pub fn key_updates(&self, kind: KeyUpdateKind) -> u64 {
        self.key_updates[kind.index()].load(Relaxed)
    }

    pub fn payload(&self, direction: PayloadDirection, path: PayloadPath, bytes: u64) {
        if bytes > 0 {
            self.payload[direction.index()][path.index()].fetch_add(bytes, Relaxed);
        }
    }

    /// Open tunnels now.
    pub fn open(&self, role: Role) -> i64 {
        self.tunnels_open[role.index()].load(Relaxed)
    }

    /// Payload bytes counted so far.
    pub fn payload_bytes(&self, direction: PayloadDirection, path: PayloadPath) -> u64 {
        self.payload[direction.index()][path.index()].load(Relaxed)
    }

    /// Tunnels closed for `why` so far.
    pub fn closed_count(&self, role: Role, why: TunnelClose) -> u64 {
        self.closed[role.index()][why.index()].load(Relaxed)
    }
}

/// Prints the HBONE series of all shards, summed.
pub(super) fn render(out: &mut String, shards: &[&HboneMetrics]) {
    let sum = |get: &dyn Fn(&HboneMetrics) -> u64| -> u64 { shards.iter().map(|m| get(m)).sum() };
    let header = |out: &mut String, name: &str, kind: &str, help: &str| {
        let _ = writeln!(out, "# HELP {name} {help}.\n# TYPE {name} {kind}");
    };

    let name = "ringtun_hbone_tunnels_open";
    header(out, name, "gauge", "HBONE tunnels open now, by role");
    for &role in Role::ALL {
        let v: i64 = shards
            .iter()
            .map(|m| m.tunnels_open[role.index()].load(Relaxed))
            .sum();
        let _ = writeln!(out, "{name}{{role=\"{}\"}} {v}", role.label());
    }

    let mut lines = Vec::new();
    for &role in Role::ALL {
        for &tls in TlsLabel::ALL {
            for &cipher in CipherLabel::ALL {
                let v =
                    sum(&|m| m.tunnels[role.index()][tls.index()][cipher.index()].load(Relaxed));
                lines.push((
                    format!(
                        "role=\"{}\",tls=\"{}\",cipher=\"{}\"",
                        role.label(),
                        tls.label(),
                        cipher.label()
                    ),
                    v,
                ));
            }
        }
    }
    counter(
        out,
        "ringtun_hbone_tunnels_total",
        "HBONE tunnels established (TLS handshake done), by role and TLS mode",
        lines,
    );

    let lines = Role::ALL
        .iter()
        .map(|&r| {
            let v = sum(&|m| m.handshakes[r.index()].load(Relaxed));
            (format!("role=\"{}\"", r.label()), v)
        })
        .collect();
    counter(
        out,
        "ringtun_hbone_handshakes_total",
        "TLS handshakes started, by role",
        lines,
    );

    let mut lines = Vec::new();
    for &role in Role::ALL {
        for &why in TunnelFailure::ALL {
            let v = sum(&|m| m.failures[role.index()][why.index()].load(Relaxed));
            lines.push((
                format!("role=\"{}\",reason=\"{}\"", role.label(), why.label()),
                v,
            ));
        }
    }
    counter(
        out,
        "ringtun_hbone_tunnel_failures_total",
        "HBONE tunnels that failed, by role and reason",
        lines,
    );

    let mut lines = Vec::new();
    for &role in Role::ALL {
        for &why in TunnelClose::ALL {
            let v = sum(&|m| m.closed[role.index()][why.index()].load(Relaxed));
            lines.push((
                format!("role=\"{}\",reason=\"{}\"", role.label(), why.label()),
                v,
            ));
        }
        for &why in TunnelFailure::ALL {
            let v = sum(&|m| m.closed_failed[role.index()][why.index()].load(Relaxed));
            lines.push((
                format!("role=\"{}\",reason=\"{}\"", role.label(), why.label()),
                v,
            ));
        }
    }
    counter(
        out,
        "ringtun_hbone_tunnels_closed_total",
        "HBONE tunnels closed, by role and reason",
        lines,
    );

    let name = "ringtun_hbone_handshakes_in_progress";
    header(
        out,
        name,
        "gauge",
        "Connections to port 15008 in their TLS handshake now (their own budget)",
    );
    let v: i64 = shards.iter().map(|m| m.handshaking.load(Relaxed)).sum();
    let _ = writeln!(out, "{name} {v}");

    let lines = TunnelShed::ALL
        .iter()
        .map(|&w| {
            let v = sum(&|m| m.shed[w.index()].load(Relaxed));
            (format!("reason=\"{}\"", w.label()), v)
        })
        .collect();
    counter(
        out,
        "ringtun_hbone_tunnels_shed_total",
        "Server tunnels refused or closed to keep a budget, by reason",
        lines,
    );

    let lines = RejectReason::ALL
        .iter()
        .map(|&r| {
            let v = sum(&|m| m.connects_refused[r.index()].load(Relaxed));
            (
                format!("reason=\"{}\",status=\"{}\"", r.label(), r.status()),
                v,
            )
        })
        .collect();
    counter(
        out,
        "ringtun_hbone_connects_refused_total",
        "Inbound CONNECTs refused, by reason and the status answered",
        lines,
    );

    let mut lines = Vec::new();
    for &role in Role::ALL {
        for slot in 0..STATUS_SLOTS {
            let v = sum(&|m| m.streams[role.index()][slot].load(Relaxed));
            let status = STATUSES
                .get(slot)
                .map_or("other".to_string(), |s| s.to_string());
            lines.push((format!("role=\"{}\",status=\"{status}\"", role.label()), v));
        }
    }
    counter(
        out,
        "ringtun_hbone_streams_total",
        "CONNECT streams answered, by role and HTTP status",
        lines,
    );

    let lines = PoolOutcome::ALL
        .iter()
        .map(|&o| {
            let v = sum(&|m| m.pool[o.index()].load(Relaxed));
            (format!("outcome=\"{}\"", o.label()), v)
        })
        .collect();
    counter(
        out,
        "ringtun_hbone_pool_total",
        "Outbound tunnel checkouts, by outcome (reuse, wait, open, refuse)",
        lines,
    );

    let lines = TlsRecordKind::ALL
        .iter()
        .map(|&k| {
            let v = sum(&|m| m.tls_records[k.index()].load(Relaxed));
            (format!("kind=\"{}\"", k.label()), v)
        })
        .collect();
    counter(
        out,
        "ringtun_hbone_tls_records_total",
        "Non-data TLS records a tunnel received, by kind",
        lines,
    );

    let lines = KeyUpdateKind::ALL
        .iter()
        .map(|&k| {
            let v = sum(&|m| m.key_updates[k.index()].load(Relaxed));
            (format!("kind=\"{}\"", k.label()), v)
        })
        .collect();
    counter(
        out,
        "ringtun_hbone_tls_key_updates_total",
        "TLS 1.3 key updates of running tunnels: the peer's followed, our own sent",
        lines,
    );

    let mut lines = Vec::new();
    for &d in PayloadDirection::ALL {
        for &p in PayloadPath::ALL {
            let v = sum(&|m| m.payload[d.index()][p.index()].load(Relaxed));
            lines.push((
                format!("direction=\"{}\",path=\"{}\"", d.label(), p.label()),
                v,
            ));
        }
    }
    counter(
        out,
        "ringtun_hbone_payload_bytes_total",
        "DATA payload bytes through tunnels, by direction and path (spliced: never in user \
         space; copied: through user space)",
        lines,
    );
}

/// A counter family: only series that have counted something are printed.
fn counter(out: &mut String, name: &str, help: &str, lines: Vec<(String, u64)>) {
    if lines.iter().all(|(_, v)| *v == 0) {
        return;
    }
    let _ = writeln!(out, "# HELP {name} {help}.\n# TYPE {name} counter");
    for (labels, v) in lines {
        if v > 0 {
            let _ = writeln!(out, "{name}{{{labels}}} {v}");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn series_keep_their_names_and_labels_and_sum_over_shards() {
        let (a, b) = (HboneMetrics::default(), HboneMetrics::default());
        a.established(Role::Client, TlsLabel::Kernel, CipherLabel::Aes128Gcm);
        b.established(Role::Client, TlsLabel::Kernel, CipherLabel::Aes128Gcm);
        b.open_ended(Role::Client);
        a.failed(Role::Server, TunnelFailure::TlsHandshake);
        a.closed(Role::Client, TunnelClose::Idle);
        b.closed_failed(Role::Client, TunnelFailure::Keepalive);
        a.stream_answered(Role::Server, 503);
        a.stream_answered(Role::Server, 299);
        a.payload(PayloadDirection::Received, PayloadPath::Spliced, 10);
        b.payload(PayloadDirection::Received, PayloadPath::Spliced, 5);
        a.tls_record(TlsRecordKind::KeyUpdate);
        a.pool(PoolOutcome::Reuse);
        let mut out = String::new();
        render(&mut out, &[&a, &b]);
        for line in [
            "ringtun_hbone_tunnels_open{role=\"client\"} 1",
            "ringtun_hbone_tunnels_open{role=\"server\"} 0",
            "ringtun_hbone_tunnels_total{role=\"client\",tls=\"ktls\",cipher=\"aes_128_gcm\"} 2",
            "ringtun_hbone_tunnel_failures_total{role=\"server\",reason=\"tls_handshake\"} 1",
            "ringtun_hbone_tunnels_closed_total{role=\"client\",reason=\"idle\"} 1",
            "ringtun_hbone_tunnels_closed_total{role=\"client\",reason=\"keepalive\"} 1",
            "ringtun_hbone_streams_total{role=\"server\",status=\"503\"} 1",
            "ringtun_hbone_streams_total{role=\"server\",status=\"other\"} 1",
            "ringtun_hbone_payload_bytes_total{direction=\"received\",path=\"spliced\"} 15",
            "ringtun_hbone_tls_records_total{kind=\"key_update\"} 1",
            "ringtun_hbone_pool_total{outcome=\"reuse\"} 1",
        ] {
            assert!(out.lines().any(|l| l == line), "missing {line} in\n{out}");
        }
        // Untouched series are not printed; untouched families not even their header.
        assert!(!out.contains("status=\"200\""));
        assert!(!out.contains("ringtun_hbone_handshakes_total"));
    }
}
