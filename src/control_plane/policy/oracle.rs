//! The test oracle: the written policies' meaning read as directly as possible, from the
//! configuration (not from the model, the conversion or the compiled form), in the words of
//! issue 10. The compiled evaluator must agree with it on every connection.

use std::net::{IpAddr, SocketAddr};

use crate::control_plane::config::{
    AuthorizationPolicy, Condition, Config, Operation, PolicyRule, Source, Workload,
};
use crate::control_plane::identity::SpiffeId;

use super::{Action, IpBlock, LogOnlyKind, LogOnlyMatch, PolicyId, Reason, RuleRef};

pub struct Conn<'a> {
    pub destination: &'a Workload,
    pub destination_addr: SocketAddr,
    pub identity: Option<&'a SpiffeId>,
    pub source_ip: IpAddr,
}

/// The reason and every log-only match, as the issue states the decision.
pub fn decide(config: &Config, c: &Conn<'_>) -> (Reason, Vec<LogOnlyMatch>) {
    let root = config.node.root_namespace.as_str();
    let applicable: Vec<(u32, &AuthorizationPolicy)> = config
        .policies
        .iter()
        .enumerate()
        .filter(|(_, p)| applies(p, c.destination, root))
        .map(|(i, p)| (i as u32, p))
        .collect();
    let first_rule = |p: &AuthorizationPolicy| {
        p.rules
            .iter()
            .position(|r| rule_matches(p, r, c))
            .map(|r| r as u32)
    };
    let first_of = |action: Action| {
        applicable
            .iter()
            .filter(|(_, p)| p.action == action && !p.dry_run)
            .find_map(|(i, p)| {
                first_rule(p).map(|rule| RuleRef {
                    policy: PolicyId(*i),
                    rule,
                })
            })
    };
    let any_allow = applicable
        .iter()
        .any(|(_, p)| p.action == Action::Allow && !p.dry_run);
    let reason = if let Some(r) = first_of(Action::Deny) {
        Reason::DeniedBy(r)
    } else if !any_allow {
        Reason::NoAllowPolicy
    } else if let Some(r) = first_of(Action::Allow) {
        Reason::AllowedBy(r)
    } else {
        Reason::NoAllowMatched
    };
    let log_only = applicable
        .iter()
        .filter(|(_, p)| p.action == Action::Audit || p.dry_run)
        .filter_map(|(i, p)| {
            let rule = first_rule(p)?;
            let kind = match p.action {
                Action::Audit => LogOnlyKind::Audit,
                Action::Allow => LogOnlyKind::DryRunAllow,
                Action::Deny => LogOnlyKind::DryRunDeny,
            };
            Some(LogOnlyMatch {
                kind,
                matched: RuleRef {
                    policy: PolicyId(*i),
                    rule,
                },
            })
        })
        .collect();
    (reason, log_only)
}

/// No selector: its namespace (every namespace from the root one). A selector: workloads whose
/// labels include it, in the same namespaces.
fn applies(p: &AuthorizationPolicy, w: &Workload, root: &str) -> bool {
    let namespace_ok = p.namespace == root || p.namespace == w.namespace;
    namespace_ok
        && p.selector
            .as_ref()
            .is_none_or(|sel| sel.iter().all(|(k, v)| w.labels.get(k) == Some(v)))
}

/// A rule with L7 attributes: ALLOW matches nothing, DENY (and AUDIT) everything. Otherwise
/// every part it has must match: some `from` entry, some `to` entry, every `when`.
fn rule_matches(p: &AuthorizationPolicy, r: &PolicyRule, c: &Conn<'_>) -> bool {
    if !r.l7_attributes.is_empty() {
        return p.action != Action::Allow;
    }
    (r.from.is_empty() || r.from.iter().any(|s| source_matches(s, &p.namespace, c)))
        && (r.to.is_empty() || r.to.iter().any(|o| operation_matches(o, c)))
        && r.when.iter().all(|w| condition_matches(w, c))
}

/// Positive values: any must match (none listed: no constraint). `not_` values: none may.
fn values_ok<T>(values: &[T], not_values: &[T], matches: impl Fn(&T) -> bool) -> bool {
    (values.is_empty() || values.iter().any(&matches)) && !not_values.iter().any(&matches)
}

fn source_matches(s: &Source, policy_namespace: &str, c: &Conn<'_>) -> bool {
    let principal = c.identity.map(principal_of);
    let namespace = c.identity.map(|id| id.namespace().to_string());
    let sa_matches = |v: &String| {
        let (ns, sa) = v.split_once('/').unwrap_or((policy_namespace, v));
        c.identity
            .is_some_and(|id| id.namespace() == ns && id.service_account() == sa)
    };
    values_ok(&s.principals, &s.not_principals, |v| {
        pattern_matches(v, principal.as_deref())
    }) && values_ok(&s.namespaces, &s.not_namespaces, |v| {
        pattern_matches(v, namespace.as_deref())
    }) && values_ok(&s.service_accounts, &s.not_service_accounts, sa_matches)
        && values_ok(&s.ip_blocks, &s.not_ip_blocks, |b| {
            block_contains(b, c.source_ip)
        })
}

fn operation_matches(o: &Operation, c: &Conn<'_>) -> bool {
    let port = c.destination_addr.port();
    values_ok(&o.ports, &o.not_ports, |p| *p == port)
}

fn condition_matches(w: &Condition, c: &Conn<'_>) -> bool {
    let principal = c.identity.map(principal_of);
    let namespace = c.identity.map(|id| id.namespace().to_string());
    match w {
        Condition::SourceIp { values, not_values } => {
            values_ok(values, not_values, |b| block_contains(b, c.source_ip))
        }
        Condition::DestinationIp { values, not_values } => values_ok(values, not_values, |b| {
            block_contains(b, c.destination_addr.ip())
        }),
        Condition::SourceNamespace { values, not_values } => values_ok(values, not_values, |v| {
            pattern_matches(v, namespace.as_deref())
        }),
        Condition::SourcePrincipal { values, not_values } => values_ok(values, not_values, |v| {
            pattern_matches(v, principal.as_deref())
        }),
        Condition::DestinationPort { values, not_values } => {
            values_ok(values, not_values, |p| *p == c.destination_addr.port())
        }
    }
}

/// The identity as Istio names principals: the SPIFFE ID without `spiffe://`.
fn principal_of(id: &SpiffeId) -> String {
    id.to_uri()
        .strip_prefix("spiffe://")
        .expect("a SPIFFE ID starts with spiffe://")
        .to_string()
}

/// Istio's patterns; without an identity nothing matches.
fn pattern_matches(pattern: &str, value: Option<&str>) -> bool {
    let Some(value) = value else {
        return false;
    };
    if pattern == "*" {
        !value.is_empty()
    } else if let Some(suffix) = pattern.strip_prefix('*') {
        value.ends_with(suffix)
    } else if let Some(prefix) = pattern.strip_suffix('*') {
        value.starts_with(prefix)
    } else {
        value == pattern
    }
}

/// Bit by bit: the first `prefix_len` bits of the address equal the block's. IPv4-mapped IPv6
/// addresses are their IPv4 address.
fn block_contains(b: &IpBlock, ip: IpAddr) -> bool {
    let ip = match ip {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(ip, IpAddr::V4),
        v4 => v4,
    };
    let bits = |a: IpAddr| -> Vec<bool> {
        let bytes = match a {
            IpAddr::V4(v4) => v4.octets().to_vec(),
            IpAddr::V6(v6) => v6.octets().to_vec(),
        };
        bytes
            .iter()
            .flat_map(|byte| (0..8).rev().map(move |i| byte >> i & 1 == 1))
            .collect()
    };
    let (net, addr) = (bits(b.network()), bits(ip));
    net.len() == addr.len() && net[..b.prefix_len() as usize] == addr[..b.prefix_len() as usize]
}
