//! Policies + bindings → a [`PolicySet`]: the snapshot the data path evaluates.
//!
//! Boundary: built once per snapshot (start, later reload or xDS push), then only read. All the
//! work a decision should not do happens here: which policies apply to each local workload
//! (mesh-scoped, its namespace's, and the selector-scoped ones it references) is resolved into
//! three sorted index lists per workload — enforced DENY, enforced ALLOW, log-only (AUDIT and
//! dry run) — and every rule is flattened into the conditions it actually checks: empty matches
//! dropped (a clause left with none can never match, so its rule is `never`), clauses that
//! match everything dropped, each match reduced to the fields it sets.

use std::collections::HashMap;

use crate::control_plane::workload_registry::{Registry, WorkloadId};

use super::model::{
    Action, Authorization, IpBlock, Match, PolicyKey, Rule, ServiceAccountMatch, StringMatch,
};

/// Which selector-scoped policies each workload references: what istiod sends as each
/// `Workload.authorization_policies`, or what `convert` resolves from label selectors.
#[derive(Debug, Default, Clone)]
pub struct Bindings {
    refs: HashMap<WorkloadId, Vec<PolicyKey>>,
}

impl Bindings {
    pub fn bind(&mut self, workload: WorkloadId, policy: PolicyKey) {
        self.refs.entry(workload).or_default().push(policy);
    }

    /// The references of one workload, in the order they were bound.
    pub fn of(&self, workload: WorkloadId) -> &[PolicyKey] {
        self.refs.get(&workload).map_or(&[], Vec::as_slice)
    }
}

/// Index of a policy in its [`PolicySet`] (the order it was given in: file order from YAML).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct PolicyId(pub u32);

/// The compiled, immutable policy snapshot.
#[derive(Debug)]
pub struct PolicySet {
    pub(super) policies: Vec<Authorization>,
    pub(super) compiled: Vec<CompiledPolicy>,
    /// By `WorkloadId`; `None` for workloads that are not local.
    pub(super) workloads: Vec<Option<Applicable>>,
    unknown_references: Vec<(WorkloadId, PolicyKey)>,
}

/// The policies that apply to one local workload, by role, each list ascending.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Applicable {
    pub deny: Box<[PolicyId]>,
    pub allow: Box<[PolicyId]>,
    /// AUDIT policies and dry-run policies of any action: evaluated only to be reported.
    pub log_only: Box<[PolicyId]>,
}

impl PolicySet {
    /// An empty set: every local workload allowed by default.
    pub fn empty(registry: &Registry) -> PolicySet {
        PolicySet::compile(Vec::new(), &Bindings::default(), registry)
    }

    /// Compiles `policies` for the local workloads of `registry`. A binding naming a policy that
    /// is not in `policies` is skipped and listed in [`PolicySet::unknown_references`] (ztunnel
    /// does the same: xDS can name a policy before it arrives). When two policies share a key,
    /// references name the first.
    pub fn compile(
        policies: Vec<Authorization>,
        bindings: &Bindings,
        registry: &Registry,
    ) -> PolicySet {
        let mut by_key: HashMap<(&str, &str), PolicyId> = HashMap::with_capacity(policies.len());
        let mut mesh: Vec<PolicyId> = Vec::new();
        let mut by_namespace: HashMap<&str, Vec<PolicyId>> = HashMap::new();
        for (i, p) in policies.iter().enumerate() {
            let id = PolicyId(i as u32);
            by_key
                .entry((p.namespace.as_str(), p.name.as_str()))
                .or_insert(id);
            match p.scope {
                super::Scope::Mesh => mesh.push(id),
                super::Scope::Namespace => by_namespace.entry(&p.namespace).or_default().push(id),
                super::Scope::WorkloadSelector => {}
            }
        }

        let mut unknown_references = Vec::new();
        let mut workloads: Vec<Option<Applicable>> = Vec::new();
        workloads.resize_with(registry.workload_count(), || None);
        let mut ids: Vec<PolicyId> = Vec::new();
        for (wid, entry) in registry.local_workloads() {
            ids.clear();
            ids.extend_from_slice(&mesh);
            if let Some(ns) = by_namespace.get(entry.workload.namespace.as_str()) {
                ids.extend_from_slice(ns);
            }
            for key in bindings.of(wid) {
                match by_key.get(&(key.namespace.as_str(), key.name.as_str())) {
                    Some(id) => ids.push(*id),
                    None => unknown_references.push((wid, key.clone())),
                }
            }
            // File order is evaluation order: it names the policy that decided when several
            // match. A policy both in scope and referenced counts once.
            ids.sort_unstable();
            ids.dedup();
            let mut applicable = (Vec::new(), Vec::new(), Vec::new());
            for &id in &ids {
                let p = &policies[id.0 as usize];
                match (p.action, p.dry_run) {
                    (Action::Deny, false) => applicable.0.push(id),
                    (Action::Allow, false) => applicable.1.push(id),
                    (Action::Audit, _) | (_, true) => applicable.2.push(id),
                }
            }
            workloads[wid.0 as usize] = Some(Applicable {
                deny: applicable.0.into(),
                allow: applicable.1.into(),
                log_only: applicable.2.into(),
            });
        }
        let compiled = policies.iter().map(CompiledPolicy::new).collect();
        PolicySet {
            policies,
            compiled,
            workloads,
            unknown_references,
        }
    }

    /// The policy behind an id (for its namespace/name in logs, or `/config_dump`).
    ///
    /// # Panics
    /// If `id` does not come from this set.
    pub fn policy(&self, id: PolicyId) -> &Authorization {
        &self.policies[id.0 as usize]
    }

    pub fn policies(&self) -> &[Authorization] {
        &self.policies
    }

    /// The policies that apply to a local workload; `None` for any other workload.
    pub fn applicable(&self, workload: WorkloadId) -> Option<&Applicable> {
        self.workloads.get(workload.0 as usize)?.as_ref()
    }

    /// References to policies the set does not hold (skipped when compiling).
    pub fn unknown_references(&self) -> &[(WorkloadId, PolicyKey)] {
        &self.unknown_references
    }
}

/// One policy, flattened for evaluation. Rule indices are the model's.
#[derive(Debug)]
pub(super) struct CompiledPolicy {
    pub(super) rules: Box<[CompiledRule]>,
}

#[derive(Debug)]
pub(super) enum CompiledRule {
    Never,
    /// Every clause must match; none left means every connection.
    AllOf(Box<[CompiledClause]>),
}

/// Any match must match (never empty).
#[derive(Debug)]
pub(super) struct CompiledClause {
    pub(super) matches: Box<[CompiledMatch]>,
}

/// Every condition must hold (never empty).
#[derive(Debug)]
pub(super) struct CompiledMatch {
    pub(super) conditions: Box<[Condition]>,
}

/// One field of a match: `negate` is the `not_` form (true when no value matches).
#[derive(Debug)]
pub(super) enum Condition {
    DestinationPorts {
        ports: Box<[u16]>,
        negate: bool,
    },
    DestinationIps {
        blocks: Box<[IpBlock]>,
        negate: bool,
    },
    SourceIps {
        blocks: Box<[IpBlock]>,
        negate: bool,
    },
    Namespaces {
        values: Box<[StringMatch]>,
        negate: bool,
    },
    ServiceAccounts {
        values: Box<[ServiceAccountMatch]>,
        negate: bool,
    },
    Principals {
        values: Box<[StringMatch]>,
        negate: bool,
    },
}

impl CompiledPolicy {
    fn new(p: &Authorization) -> CompiledPolicy {
        CompiledPolicy {
            rules: p.rules.iter().map(compile_rule).collect(),
        }
    }
}

fn compile_rule(rule: &Rule) -> CompiledRule {
    let Rule::AllOf(clauses) = rule else {
        return CompiledRule::Never;
    };
    let mut out = Vec::with_capacity(clauses.len());
    for clause in clauses {
        if clause.matches.is_empty() {
            // A clause with no matches constrains nothing (ztunnel counts it as matched).
            continue;
        }
        let matches: Box<[CompiledMatch]> = clause
            .matches
            .iter()
            .filter(|m| !m.is_empty())
            .map(compile_match)
            .collect();
        if matches.is_empty() {
            // Only empty matches, each skipped: this clause, and so the rule, never matches.
            return CompiledRule::Never;
        }
        out.push(CompiledClause { matches });
    }
    CompiledRule::AllOf(out.into())
}

/// The fields a match sets, cheapest checks first (the order cannot change the outcome: all
/// must hold).
fn compile_match(m: &Match) -> CompiledMatch {
    let mut c = Vec::new();
    field(
        &mut c,
        &m.destination_ports,
        &m.not_destination_ports,
        |ports, negate| Condition::DestinationPorts { ports, negate },
    );
    field(
        &mut c,
        &m.destination_ips,
        &m.not_destination_ips,
        |blocks, negate| Condition::DestinationIps { blocks, negate },
    );
    field(
        &mut c,
        &m.source_ips,
        &m.not_source_ips,
        |blocks, negate| Condition::SourceIps { blocks, negate },
    );
    field(
        &mut c,
        &m.namespaces,
        &m.not_namespaces,
        |values, negate| Condition::Namespaces { values, negate },
    );
    field(
        &mut c,
        &m.service_accounts,
        &m.not_service_accounts,
        |values, negate| Condition::ServiceAccounts { values, negate },
    );
    field(
        &mut c,
        &m.principals,
        &m.not_principals,
        |values, negate| Condition::Principals { values, negate },
    );
    CompiledMatch {
        conditions: c.into(),
    }
}

/// One field's positive and `not_` lists → a condition for each that is set.
fn field<T: Clone>(
    out: &mut Vec<Condition>,
    values: &[T],
    not_values: &[T],
    make: fn(Box<[T]>, bool) -> Condition,
) {
    for (v, negate) in [(values, false), (not_values, true)] {
        if !v.is_empty() {
            out.push(make(v.into(), negate));
        }
    }
}

#[cfg(test)]
mod tests;
