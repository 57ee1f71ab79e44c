//! One record per connection, written when it ends, from the same values that feed the metrics
//! (ztunnel's habit: one result object per connection). Logged at info under the `access`
//! target; an in-process observer (the demo, tests) can receive the records too.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use super::metrics::{CloseKind, FailureKind};

#[derive(Debug, Clone, serde::Serialize)]
pub struct FlowRecord {
    pub reactor: usize,
    pub direction: &'static str,
    pub source_workload: String,
    pub client: SocketAddr,
    pub original_dst: SocketAddr,
    /// `service:<host>`, `workload:<ns>/<name>` or `out_of_mesh`.
    pub destination: String,
    /// `direct_tcp`, `hbone`, or `refused`.
    pub route: &'static str,
    pub upstream: SocketAddr,
    /// The identity the destination must prove once tunnels carry the flow.
    pub destination_identity: Option<String>,
    pub bytes_to_upstream: u64,
    pub bytes_to_downstream: u64,
    pub duration_ms: u64,
    pub end: &'static str,
    pub failure_class: Option<&'static str>,
    pub failure_reason: Option<&'static str>,
    pub errno: Option<i32>,
    /// HBONE: the CONNECT's answer — sent (inbound) or received (outbound).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub status: Option<u16>,
    /// Why a connection was refused, in more detail than `failure_reason`: the CONNECT check
    /// that failed (`unknown_authority`, `malformed_request`, …) or the policy outcome
    /// (`deny_rule`, `no_allow_match`, `not_local`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reason: Option<&'static str>,
    /// The authorization policy (`namespace/name`) whose rule decided, allowing or denying.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub policy: Option<String>,
    /// The index of that rule in the policy's `rules`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub policy_rule: Option<u32>,
    /// AUDIT and dry-run policies that matched (`namespace/name#rule (kind)`): logged only.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub log_only_policies: Vec<String>,
}

impl FlowRecord {
    /// A record for a connection accepted on `reactor`, before anything is known of it.
    pub fn new(reactor: usize, direction: &'static str) -> FlowRecord {
        let unspecified = SocketAddr::from(([0, 0, 0, 0], 0));
        FlowRecord {
            reactor,
            direction,
            source_workload: String::new(),
            client: unspecified,
            original_dst: unspecified,
            destination: String::new(),
            route: "refused",
            upstream: unspecified,
            destination_identity: None,
            bytes_to_upstream: 0,
            bytes_to_downstream: 0,
            duration_ms: 0,
            end: "",
            failure_class: None,
            failure_reason: None,
            errno: None,
            status: None,
            reason: None,
            policy: None,
            policy_rule: None,
            log_only_policies: Vec::new(),
        }
    }

    pub fn set_end(
        &mut self,
        end: CloseKind,
        failure: Option<FailureKind>,
        errno: Option<i32>,
        took: Duration,
    ) {
        self.end = end.label();
        self.failure_class = failure.map(|f| f.class());
        self.failure_reason = failure.map(|f| f.reason());
        self.errno = errno;
        self.duration_ms = took.as_millis() as u64;
    }
}

/// Receives every finished flow's record (called on the reactor thread: keep it short).
pub type Observer = Arc<dyn Fn(&FlowRecord) + Send + Sync>;

pub fn emit(record: &FlowRecord, observer: Option<&Observer>) {
    if log::log_enabled!(target: "access", log::Level::Info) {
        let json = serde_json::to_string(record).unwrap_or_default();
        log::info!(target: "access", "{json}");
    }
    if let Some(o) = observer {
        o(record);
    }
}
