//! Authorization where the issue puts it: on the destination node, at a connection's first
//! connection, before the destination is connected — and again for every open connection when
//! a reload brings new policy.
//!
//! Boundary: the facts a connection was admitted on ([`Admission`]), the call into the
//! snapshot's [`PolicySet`](crate::control_plane::policy::PolicySet), and what a decision
//! writes into the access record and the metrics. No IO: the callers answer (401 on an HBONE
//! stream, a reset on plaintext), close and log. The source identity is only ever the verified
//! peer certificate's (the caller passes the tunnel's); plaintext has none.

use std::net::{IpAddr, SocketAddr};

use crate::control_plane::identity::SpiffeId;
use crate::control_plane::policy::{Connection, Decision};
use crate::control_plane::state::State;
use crate::control_plane::workload_registry::WorkloadId;
use crate::observability::access_log::FlowRecord;
use crate::observability::metrics::{DenialAt, DenialLabels, ReactorMetrics};

/// What the destination node admitted a connection on, kept with the flow so a reload can
/// decide it again. (The identity is not here: a stream's is its tunnel's.)
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Admission {
    /// The local workload's address and port the connection is delivered to.
    pub destination: SocketAddr,
    /// The client's address: the peer of a plaintext connection; for HBONE the address the
    /// CONNECT carried (checked against the tunnel peer's workload), else the tunnel's peer.
    pub source_ip: IpAddr,
}

/// Decides a connection to `workload` (a local workload of `state`) and notes the decision in
/// `record`: the policy and rule that decided, the outcome when denied, log-only matches.
pub fn authorize(
    state: &State,
    workload: WorkloadId,
    admission: &Admission,
    identity: Option<&SpiffeId>,
    record: &mut FlowRecord,
) -> Decision {
    let conn = Connection {
        destination: workload,
        destination_addr: admission.destination,
        source_identity: identity,
        source_ip: admission.source_ip,
    };
    let decision = state.policies.evaluate(&conn);
    note(state, &conn, &decision, record);
    decision
}

/// What a reload's snapshot says of an open connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Recheck {
    Allowed,
    /// Denied now: cut it. `workload` is its destination in the new snapshot.
    Denied {
        decision: Decision,
        workload: WorkloadId,
    },
    /// Its destination is no longer a workload of this node: drained, not judged.
    Gone,
}

/// Decides an open connection again under `state`. The destination workload is found by the
/// address the connection was admitted to: workload ids are per snapshot, addresses are not.
pub fn recheck(state: &State, admission: &Admission, identity: Option<&SpiffeId>) -> Recheck {
    let registry = &state.registry;
    let Some(workload) = registry.workload_by_ip(admission.destination.ip()) else {
        return Recheck::Gone;
    };
    if !registry.workload(workload).local {
        return Recheck::Gone;
    }
    let decision = state.policies.evaluate(&Connection {
        destination: workload,
        destination_addr: admission.destination,
        source_identity: identity,
        source_ip: admission.source_ip,
    });
    if decision.is_allowed() {
        Recheck::Allowed
    } else {
        Recheck::Denied { decision, workload }
    }
}

/// Notes in `record` the decision a reload's [`recheck`] denied it with (see [`note`]).
pub fn note_recheck(
    state: &State,
    workload: WorkloadId,
    admission: &Admission,
    identity: Option<&SpiffeId>,
    decision: &Decision,
    record: &mut FlowRecord,
) {
    let conn = Connection {
        destination: workload,
        destination_addr: admission.destination,
        source_identity: identity,
        source_ip: admission.source_ip,
    };
    note(state, &conn, decision, record);
}

/// Writes `decision` into `record` (see [`authorize`]).
pub fn note(state: &State, conn: &Connection<'_>, decision: &Decision, record: &mut FlowRecord) {
    let policies = &state.policies;
    match decision.decided_by() {
        Some(r) => {
            record.policy = Some(policies.policy(r.policy).key().to_string());
            record.policy_rule = Some(r.rule);
        }
        None => {
            record.policy = None;
            record.policy_rule = None;
        }
    }
    if !decision.is_allowed() {
        record.reason = Some(decision.reason.label());
    }
    record.log_only_policies.clear();
    let describe = |m: crate::control_plane::policy::LogOnlyMatch| {
        format!(
            "{}#{} ({})",
            policies.policy(m.matched.policy).key(),
            m.matched.rule,
            m.kind.label()
        )
    };
    if decision.log_only.omitted() == 0 {
        record
            .log_only_policies
            .extend(decision.log_only.iter().map(describe));
    } else {
        // More matched than a decision holds inline: list them all, off the decision's
        // allocation-free path.
        record
            .log_only_policies
            .extend(policies.log_only_matches(conn).map(describe));
    }
}

/// Counts a denied connection under the policy and rule that decided.
pub fn count_denial(metrics: &ReactorMetrics, state: &State, decision: &Decision, at: DenialAt) {
    let (policy, rule) = match decision.decided_by() {
        Some(r) => (
            state.policies.policy(r.policy).key().to_string(),
            Some(r.rule),
        ),
        None => (String::new(), None),
    };
    metrics.policy_denied(DenialLabels {
        policy,
        rule,
        reason: decision.reason.label(),
        at,
    });
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::control_plane::config::load;

    fn state(policies: &str) -> std::sync::Arc<State> {
        let yaml = format!(
            "version: 1\nnode: {{name: n}}\nworkloads:\n\
             - {{name: web, namespace: prod, ips: [10.0.0.1], node: n, labels: {{app: web}}}}\n\
             - {{name: other, namespace: prod, ips: [10.0.0.2], node: m}}\n{policies}"
        );
        State::new(load(&yaml).expect("valid config"), 1)
    }

    fn admission(dst: &str, src: &str) -> Admission {
        Admission {
            destination: dst.parse().unwrap(),
            source_ip: src.parse().unwrap(),
        }
    }

    #[test]
    fn a_denial_names_the_policy_and_rule_in_the_record() {
        let s = state(
            "policies:\n\
             - {name: audit-all, namespace: prod, action: AUDIT, rules: [{}]}\n\
             - {name: no-ops, namespace: prod, action: DENY, rules: [{when: [{key: destination.port, values: ['22']}]}, {from: [{source: {ip_blocks: [10.9.0.0/16]}}]}]}\n",
        );
        let w = s
            .registry
            .workload_by_ip("10.0.0.1".parse().unwrap())
            .unwrap();
        let mut record = FlowRecord::new(0, "inbound");
        let d = authorize(
            &s,
            w,
            &admission("10.0.0.1:8080", "10.9.1.1"),
            None,
            &mut record,
        );
        assert!(!d.is_allowed());
        assert_eq!(record.policy.as_deref(), Some("prod/no-ops"));
        assert_eq!(record.policy_rule, Some(1));
        assert_eq!(record.reason, Some("deny_rule"));
        assert_eq!(record.log_only_policies, ["prod/audit-all#0 (audit)"]);

        let mut record = FlowRecord::new(0, "inbound");
        let d = authorize(
            &s,
            w,
            &admission("10.0.0.1:8080", "10.8.1.1"),
            None,
            &mut record,
        );
        assert!(d.is_allowed());
        assert_eq!((record.policy, record.reason), (None, None));
    }

    #[test]
    fn recheck_finds_the_workload_by_address_and_drains_what_left() {
        let s = state(
            "policies:\n- {name: only-8080, namespace: prod, rules: [{to: [{operation: {ports: [8080]}}]}]}\n",
        );
        assert_eq!(
            recheck(&s, &admission("10.0.0.1:8080", "10.9.1.1"), None),
            Recheck::Allowed
        );
        assert!(matches!(
            recheck(&s, &admission("10.0.0.1:9090", "10.9.1.1"), None),
            Recheck::Denied { decision, .. } if decision.reason.label() == "no_allow_match"
        ));
        // Another node's workload, and an address nobody has: not ours to judge any more.
        assert_eq!(
            recheck(&s, &admission("10.0.0.2:8080", "10.9.1.1"), None),
            Recheck::Gone
        );
        assert_eq!(
            recheck(&s, &admission("10.0.0.3:8080", "10.9.1.1"), None),
            Recheck::Gone
        );
    }
}
