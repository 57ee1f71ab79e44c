//! The decision for one connection to a local workload: [`PolicySet::evaluate`].
//!
//! Boundary: a sans-IO core. It takes what the destination node knows when a connection arrives
//! — the local workload it is for, the address and port it was sent to, the source address and,
//! for HBONE, the SPIFFE identity of the verified peer certificate (never anything the client
//! merely says) — and returns a `Copy` [`Decision`]. No socket, clock, log or allocation: the
//! caller answers (401 on HBONE, a reset on 15006), logs and counts.
//!
//! The decision, Istio's: any matching enforced DENY → deny; no enforced ALLOW applies → allow;
//! an enforced ALLOW matches → allow; otherwise deny. When several policies match, the first in
//! file order decided, at its first matching rule. AUDIT and dry-run policies never change the
//! verdict; those that match are listed in [`Decision::log_only`].
//!
//! Without an identity (plaintext on 15006) nothing about the source's principal, namespace or
//! service account is known, so every value of such a field fails to match: a positive clause
//! cannot match and a `not_` clause always does. (ztunnel compares an empty namespace instead,
//! so an exact `""` or an empty prefix would match plaintext there; issue 10 says such a clause
//! cannot match, and a valid configuration cannot write either.)

use std::net::{IpAddr, SocketAddr};

use crate::control_plane::identity::SpiffeId;
use crate::control_plane::workload_registry::{canonical, WorkloadId};

use super::compile::{CompiledPolicy, CompiledRule, Condition, PolicyId, PolicySet};
use super::model::{ServiceAccountMatch, StringMatch};

/// What the destination node knows about a connection when it decides.
#[derive(Debug, Clone, Copy)]
pub struct Connection<'a> {
    /// The local workload the connection is for.
    pub destination: WorkloadId,
    /// The address and port the connection was sent to (the workload's IP, the target port).
    pub destination_addr: SocketAddr,
    /// The verified peer certificate's identity (HBONE); `None` for plaintext.
    pub source_identity: Option<&'a SpiffeId>,
    /// The connection's source address (HBONE: the address the client's node gave, once that
    /// is delivered; until then the tunnel's peer address).
    pub source_ip: IpAddr,
}

/// Allow or deny.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Verdict {
    Allow,
    Deny,
}

/// One rule of one policy: what decided, or what matched.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct RuleRef {
    pub policy: PolicyId,
    /// Index in the policy's `rules` (as written in the file).
    pub rule: u32,
}

/// Why the verdict is what it is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Reason {
    /// An enforced DENY rule matched.
    DeniedBy(RuleRef),
    /// An enforced ALLOW rule matched (and no DENY did).
    AllowedBy(RuleRef),
    /// No enforced ALLOW policy applies to the destination (and no DENY matched).
    NoAllowPolicy,
    /// ALLOW policies apply to the destination, none matched.
    NoAllowMatched,
    /// The destination is not a local workload of this snapshot: refused (fail closed).
    NotLocal,
}

impl Reason {
    /// The access log's and the metrics' name for the outcome.
    pub fn label(self) -> &'static str {
        match self {
            Reason::DeniedBy(_) => "deny_rule",
            Reason::AllowedBy(_) => "allow_rule",
            Reason::NoAllowPolicy => "no_allow_policy",
            Reason::NoAllowMatched => "no_allow_match",
            Reason::NotLocal => "not_local",
        }
    }
}

/// Why a log-only policy is reported.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum LogOnlyKind {
    /// An AUDIT policy matched (dry run or not: AUDIT only logs anyway).
    Audit,
    /// A dry-run ALLOW policy matched.
    DryRunAllow,
    /// A dry-run DENY policy matched: enforced, it would deny this connection.
    DryRunDeny,
}

impl LogOnlyKind {
    pub fn label(self) -> &'static str {
        match self {
            LogOnlyKind::Audit => "audit",
            LogOnlyKind::DryRunAllow => "dry_run_allow",
            LogOnlyKind::DryRunDeny => "dry_run_deny",
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct LogOnlyMatch {
    pub kind: LogOnlyKind,
    pub matched: RuleRef,
}

/// The log-only policies that matched, in file order: the first [`LogOnlyMatches::CAPACITY`]
/// inline (a decision never allocates), and how many more matched. When `omitted()` is not
/// zero, [`PolicySet::log_only_matches`] lists them all.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LogOnlyMatches {
    len: u8,
    items: [Option<LogOnlyMatch>; LogOnlyMatches::CAPACITY],
    omitted: u32,
}

impl LogOnlyMatches {
    pub const CAPACITY: usize = 4;

    const NONE: LogOnlyMatches = LogOnlyMatches {
        len: 0,
        items: [None; LogOnlyMatches::CAPACITY],
        omitted: 0,
    };

    fn push(&mut self, m: LogOnlyMatch) {
        match self.items.get_mut(self.len as usize) {
            Some(slot) => {
                *slot = Some(m);
                self.len += 1;
            }
            None => self.omitted = self.omitted.saturating_add(1),
        }
    }

    pub fn iter(&self) -> impl Iterator<Item = LogOnlyMatch> + '_ {
        self.items[..self.len as usize].iter().flatten().copied()
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Matches beyond the inline capacity.
    pub fn omitted(&self) -> u32 {
        self.omitted
    }
}

/// The outcome for one connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Decision {
    pub reason: Reason,
    pub log_only: LogOnlyMatches,
}

impl Decision {
    pub fn verdict(&self) -> Verdict {
        match self.reason {
            Reason::AllowedBy(_) | Reason::NoAllowPolicy => Verdict::Allow,
            Reason::DeniedBy(_) | Reason::NoAllowMatched | Reason::NotLocal => Verdict::Deny,
        }
    }

    pub fn is_allowed(&self) -> bool {
        self.verdict() == Verdict::Allow
    }

    /// The policy rule that decided, when one did (not for the defaults).
    pub fn decided_by(&self) -> Option<RuleRef> {
        match self.reason {
            Reason::DeniedBy(r) | Reason::AllowedBy(r) => Some(r),
            Reason::NoAllowPolicy | Reason::NoAllowMatched | Reason::NotLocal => None,
        }
    }
}

/// The connection's facts in the form the checks compare: canonical addresses.
struct Facts<'a> {
    identity: Option<&'a SpiffeId>,
    source_ip: IpAddr,
    destination_ip: IpAddr,
    destination_port: u16,
}

impl PolicySet {
    /// The decision for `conn`. Never allocates.
    pub fn evaluate(&self, conn: &Connection<'_>) -> Decision {
        let Some(applicable) = self.applicable(conn.destination) else {
            return Decision {
                reason: Reason::NotLocal,
                log_only: LogOnlyMatches::NONE,
            };
        };
        let facts = Facts::new(conn);
        let first_match = |ids: &[PolicyId]| {
            ids.iter().find_map(|&policy| {
                self.compiled[policy.0 as usize]
                    .first_matching_rule(&facts)
                    .map(|rule| RuleRef { policy, rule })
            })
        };
        let reason = if let Some(r) = first_match(&applicable.deny) {
            Reason::DeniedBy(r)
        } else if applicable.allow.is_empty() {
            Reason::NoAllowPolicy
        } else if let Some(r) = first_match(&applicable.allow) {
            Reason::AllowedBy(r)
        } else {
            Reason::NoAllowMatched
        };
        let mut log_only = LogOnlyMatches::NONE;
        for m in self.log_only_iter(&applicable.log_only, facts) {
            log_only.push(m);
        }
        Decision { reason, log_only }
    }

    /// Every log-only match for `conn`, in file order (what [`Decision::log_only`] holds, without
    /// its capacity limit). Empty for a workload that is not local.
    pub fn log_only_matches<'s>(
        &'s self,
        conn: &Connection<'s>,
    ) -> impl Iterator<Item = LogOnlyMatch> + 's {
        let ids: &[PolicyId] = self
            .applicable(conn.destination)
            .map_or(&[], |a| &a.log_only);
        self.log_only_iter(ids, Facts::new(conn))
    }

    fn log_only_iter<'s>(
        &'s self,
        ids: &'s [PolicyId],
        facts: Facts<'s>,
    ) -> impl Iterator<Item = LogOnlyMatch> + 's {
        ids.iter().filter_map(move |&policy| {
            let rule = self.compiled[policy.0 as usize].first_matching_rule(&facts)?;
            let p = &self.policies[policy.0 as usize];
            let kind = match p.action {
                super::Action::Audit => LogOnlyKind::Audit,
                super::Action::Allow => LogOnlyKind::DryRunAllow,
                super::Action::Deny => LogOnlyKind::DryRunDeny,
            };
            Some(LogOnlyMatch {
                kind,
                matched: RuleRef { policy, rule },
            })
        })
    }
}

impl<'a> Facts<'a> {
    fn new(conn: &Connection<'a>) -> Facts<'a> {
        Facts {
            identity: conn.source_identity,
            source_ip: canonical(conn.source_ip),
            destination_ip: canonical(conn.destination_addr.ip()),
            destination_port: conn.destination_addr.port(),
        }
    }
}

impl CompiledPolicy {
    /// Index of the first rule that matches.
    fn first_matching_rule(&self, f: &Facts<'_>) -> Option<u32> {
        self.rules
            .iter()
            .position(|rule| match rule {
                CompiledRule::Never => false,
                CompiledRule::AllOf(clauses) => clauses.iter().all(|clause| {
                    clause
                        .matches
                        .iter()
                        .any(|m| m.conditions.iter().all(|c| c.holds(f)))
                }),
            })
            .map(|i| i as u32)
    }
}

impl Condition {
    fn holds(&self, f: &Facts<'_>) -> bool {
        let (any, negate) = match self {
            Condition::DestinationPorts { ports, negate } => {
                (ports.contains(&f.destination_port), *negate)
            }
            Condition::DestinationIps { blocks, negate } => {
                (blocks.iter().any(|b| b.contains(f.destination_ip)), *negate)
            }
            Condition::SourceIps { blocks, negate } => {
                (blocks.iter().any(|b| b.contains(f.source_ip)), *negate)
            }
            Condition::Namespaces { values, negate } => (
                f.identity
                    .is_some_and(|id| values.iter().any(|v| string_matches(v, id.namespace()))),
                *negate,
            ),
            Condition::ServiceAccounts { values, negate } => (
                f.identity
                    .is_some_and(|id| values.iter().any(|v| service_account_matches(v, id))),
                *negate,
            ),
            Condition::Principals { values, negate } => (
                f.identity
                    .is_some_and(|id| values.iter().any(|v| principal_matches(v, id))),
                *negate,
            ),
        };
        any != negate
    }
}

fn string_matches(m: &StringMatch, s: &str) -> bool {
    match m {
        StringMatch::Exact(x) => s == x,
        StringMatch::Prefix(p) => s.starts_with(p.as_str()),
        StringMatch::Suffix(x) => s.ends_with(x.as_str()),
        StringMatch::Presence => !s.is_empty(),
    }
}

fn service_account_matches(m: &ServiceAccountMatch, id: &SpiffeId) -> bool {
    m.namespace == id.namespace() && m.service_account == id.service_account()
}

/// Matches against `<td>/ns/<ns>/sa/<sa>` without building the string: the identity is compared
/// piece by piece.
fn principal_matches(m: &StringMatch, id: &SpiffeId) -> bool {
    let pieces = [
        id.trust_domain().as_bytes(),
        b"/ns/",
        id.namespace().as_bytes(),
        b"/sa/",
        id.service_account().as_bytes(),
    ];
    match m {
        StringMatch::Exact(x) => {
            pieces.iter().map(|p| p.len()).sum::<usize>() == x.len()
                && starts_with(pieces.iter().copied(), x.as_bytes())
        }
        StringMatch::Prefix(p) => starts_with(pieces.iter().copied(), p.as_bytes()),
        StringMatch::Suffix(x) => ends_with(&pieces, x.as_bytes()),
        // A verified identity always renders to a non-empty principal.
        StringMatch::Presence => true,
    }
}

/// Whether the concatenation of `pieces` starts with `prefix`.
fn starts_with<'p>(pieces: impl Iterator<Item = &'p [u8]>, mut prefix: &[u8]) -> bool {
    for piece in pieces {
        if prefix.len() <= piece.len() {
            return piece.starts_with(prefix);
        }
        match prefix.split_at_checked(piece.len()) {
            Some((head, rest)) if head == piece => prefix = rest,
            _ => return false,
        }
    }
    prefix.is_empty()
}

/// Whether the concatenation of `pieces` ends with `suffix`.
fn ends_with(pieces: &[&[u8]], mut suffix: &[u8]) -> bool {
    for piece in pieces.iter().rev() {
        if suffix.len() <= piece.len() {
            return piece.ends_with(suffix);
        }
        let (rest, tail) = suffix.split_at(suffix.len() - piece.len());
        if tail != *piece {
            return false;
        }
        suffix = rest;
    }
    suffix.is_empty()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn id(td: &str, ns: &str, sa: &str) -> SpiffeId {
        SpiffeId::new(td, ns, sa).expect("test identity")
    }

    #[test]
    fn principal_pieces_compare_like_the_joined_string() {
        let ident = id("cluster.local", "prod", "web");
        let full = "cluster.local/ns/prod/sa/web";
        let cases = [
            "",
            "c",
            "cluster.local",
            "cluster.local/",
            "cluster.local/ns/",
            "cluster.local/ns/p",
            "cluster.local/ns/prod/sa/web",
            "cluster.local/ns/prod/sa/webx",
            "b",
            "/sa/web",
            "web",
            "prod/sa/web",
            "xcluster.local/ns/prod/sa/web",
            "cluster.local/ns/prod/sa/we",
            "/ns/prod/",
            "local/ns/prod/sa/web",
        ];
        for s in cases {
            let owned = s.to_string();
            assert_eq!(
                principal_matches(&StringMatch::Exact(owned.clone()), &ident),
                full == s,
                "exact {s:?}"
            );
            assert_eq!(
                principal_matches(&StringMatch::Prefix(owned.clone()), &ident),
                full.starts_with(s),
                "prefix {s:?}"
            );
            assert_eq!(
                principal_matches(&StringMatch::Suffix(owned), &ident),
                full.ends_with(s),
                "suffix {s:?}"
            );
        }
    }

    #[test]
    fn inline_log_only_list_counts_what_it_cannot_hold() {
        let mut l = LogOnlyMatches::NONE;
        let m = |i: u32| LogOnlyMatch {
            kind: LogOnlyKind::Audit,
            matched: RuleRef {
                policy: PolicyId(i),
                rule: 0,
            },
        };
        for i in 0..6 {
            l.push(m(i));
        }
        assert_eq!(l.iter().count(), LogOnlyMatches::CAPACITY);
        assert_eq!(l.iter().next(), Some(m(0)));
        assert_eq!(l.omitted(), 6 - LogOnlyMatches::CAPACITY as u32);
    }
}
