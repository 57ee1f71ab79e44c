//! ringtun's YAML policies → the xDS model, the way istiod converts an Istio
//! AuthorizationPolicy for ztunnel, and label selectors → per-workload references, the way
//! istiod fills each workload's `authorization_policies`.
//!
//! Boundary: pure functions of a validated [`Config`] and the [`Registry`] built from it. A later
//! xDS client produces the same two outputs (policies and [`Bindings`]) from istiod's messages
//! and feeds the same `compile`, so everything after this module is shared.
//!
//! The conversion, as istiod's: no selector → namespace scope, or mesh scope in the root
//! namespace; a selector → workload-selector scope, resolved against workload labels in the
//! policy's namespace (every namespace from the root namespace). Each rule becomes one model
//! rule whose clauses are: the `to` operations (any one matches), the `from` sources (any one
//! matches), then one clause per `when` condition. Patterns become string matches (`*` →
//! presence, `*x` → suffix, `x*` → prefix); a service account without namespace is in the
//! policy's namespace.

use crate::control_plane::config::{AuthorizationPolicy, Condition, Config, PolicyRule, Source};
use crate::control_plane::workload_registry::{Registry, SelectorScope};

use super::compile::Bindings;
use super::model::{
    Action, Authorization, Clause, Match, Rule, Scope, ServiceAccountMatch, StringMatch,
};

/// The model policies of a configuration (in file order) and which selector-scoped policies
/// each local workload references.
pub fn from_config(config: &Config, registry: &Registry) -> (Vec<Authorization>, Bindings) {
    let root = config.node.root_namespace.as_str();
    let mut bindings = Bindings::default();
    let mut policies = Vec::with_capacity(config.policies.len());
    for p in &config.policies {
        let policy = convert_policy(p, root);
        if let Some(selector) = &p.selector {
            let scope = if p.namespace == root {
                SelectorScope::AllNamespaces
            } else {
                SelectorScope::Namespace(&p.namespace)
            };
            // Only local workloads are ever a connection's destination here.
            for id in registry.select(scope, selector) {
                if registry.workload(id).local {
                    bindings.bind(id, policy.key());
                }
            }
        }
        policies.push(policy);
    }
    (policies, bindings)
}

/// One policy, as istiod's `convertAuthorizationPolicy`.
pub fn convert_policy(p: &AuthorizationPolicy, root_namespace: &str) -> Authorization {
    let scope = match (&p.selector, p.namespace == root_namespace) {
        (Some(_), _) => Scope::WorkloadSelector,
        (None, true) => Scope::Mesh,
        (None, false) => Scope::Namespace,
    };
    Authorization {
        name: p.name.clone(),
        namespace: p.namespace.clone(),
        scope,
        action: p.action,
        dry_run: p.dry_run,
        rules: p
            .rules
            .iter()
            .map(|r| convert_rule(r, p.action, &p.namespace))
            .collect(),
    }
}

fn convert_rule(rule: &PolicyRule, action: Action, namespace: &str) -> Rule {
    if !rule.l7_attributes.is_empty() {
        return match action {
            // As istiod: an ALLOW rule that needs HTTP attributes cannot be satisfied at L4, so
            // it allows nothing (istiod drops the rule; `Never` keeps its index).
            Action::Allow => Rule::Never,
            // Differs from istiod, which keeps a DENY rule's L4 part and drops the HTTP part —
            // so a DENY naming only HTTP attributes denies nothing, and a mixed one denies
            // whatever its L4 part matches. Issue 10 asks for fail closed instead: a rule that
            // cannot be checked is taken to match, every connection. AUDIT follows DENY: an
            // audit rule that cannot be checked logs every connection rather than none.
            Action::Deny | Action::Audit => Rule::AllOf(Vec::new()),
        };
    }
    let mut clauses = Vec::with_capacity(2 + rule.when.len());
    if !rule.to.is_empty() {
        clauses.push(Clause {
            matches: rule
                .to
                .iter()
                .map(|op| Match {
                    destination_ports: op.ports.clone(),
                    not_destination_ports: op.not_ports.clone(),
                    ..Match::default()
                })
                .collect(),
        });
    }
    if !rule.from.is_empty() {
        clauses.push(Clause {
            matches: rule
                .from
                .iter()
                .map(|s| source_match(s, namespace))
                .collect(),
        });
    }
    for condition in &rule.when {
        clauses.push(Clause {
            matches: vec![condition_match(condition)],
        });
    }
    Rule::AllOf(clauses)
}

fn source_match(s: &Source, namespace: &str) -> Match {
    Match {
        namespaces: patterns(&s.namespaces),
        not_namespaces: patterns(&s.not_namespaces),
        principals: patterns(&s.principals),
        not_principals: patterns(&s.not_principals),
        service_accounts: service_accounts(&s.service_accounts, namespace),
        not_service_accounts: service_accounts(&s.not_service_accounts, namespace),
        source_ips: s.ip_blocks.clone(),
        not_source_ips: s.not_ip_blocks.clone(),
        ..Match::default()
    }
}

fn condition_match(c: &Condition) -> Match {
    match c {
        Condition::SourceIp { values, not_values } => Match {
            source_ips: values.clone(),
            not_source_ips: not_values.clone(),
            ..Match::default()
        },
        Condition::SourceNamespace { values, not_values } => Match {
            namespaces: patterns(values),
            not_namespaces: patterns(not_values),
            ..Match::default()
        },
        Condition::SourcePrincipal { values, not_values } => Match {
            principals: patterns(values),
            not_principals: patterns(not_values),
            ..Match::default()
        },
        Condition::DestinationIp { values, not_values } => Match {
            destination_ips: values.clone(),
            not_destination_ips: not_values.clone(),
            ..Match::default()
        },
        Condition::DestinationPort { values, not_values } => Match {
            destination_ports: values.clone(),
            not_destination_ports: not_values.clone(),
            ..Match::default()
        },
    }
}

fn patterns(values: &[String]) -> Vec<StringMatch> {
    values
        .iter()
        .map(|v| StringMatch::from_istio_pattern(v))
        .collect()
}

/// `ns/sa`, or `sa` in the policy's namespace (istiod's `stringToServiceAccountMatch`).
fn service_accounts(values: &[String], namespace: &str) -> Vec<ServiceAccountMatch> {
    values
        .iter()
        .map(|v| match v.split_once('/') {
            Some((ns, sa)) => ServiceAccountMatch {
                namespace: ns.to_string(),
                service_account: sa.to_string(),
            },
            None => ServiceAccountMatch {
                namespace: namespace.to_string(),
                service_account: v.clone(),
            },
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::control_plane::config::load;
    use crate::control_plane::policy::model::PolicyKey;
    use crate::control_plane::workload_registry::WorkloadId;

    fn converted(yaml_policies: &str) -> (Vec<Authorization>, Bindings) {
        let text = format!(
            "version: 1\nnode: {{name: n, root_namespace: mesh-root}}\nworkloads:\n\
             - {{name: web, namespace: prod, ips: [10.0.0.1], node: n, netns: a, labels: {{app: web}}}}\n\
             - {{name: db, namespace: prod, ips: [10.0.0.2], node: n, netns: b, labels: {{app: db}}}}\n\
             - {{name: web, namespace: dev, ips: [10.0.0.3], node: n, netns: c, labels: {{app: web}}}}\n\
             - {{name: web2, namespace: prod, ips: [10.0.0.4], node: other, labels: {{app: web}}}}\n\
             policies:\n{yaml_policies}"
        );
        let config = load(&text).unwrap_or_else(|e| panic!("{e}"));
        let registry = Registry::new(&config);
        from_config(&config, &registry)
    }

    #[test]
    fn scopes_follow_istiod_selector_namespace_and_root() {
        let (policies, bindings) = converted(
            "- {name: sel, namespace: prod, selector: {match_labels: {app: web}}}\n\
             - {name: ns, namespace: prod}\n\
             - {name: mesh, namespace: mesh-root}\n\
             - {name: root-sel, namespace: mesh-root, selector: {match_labels: {app: web}}}\n",
        );
        let scopes: Vec<Scope> = policies.iter().map(|p| p.scope).collect();
        assert_eq!(
            scopes,
            [
                Scope::WorkloadSelector,
                Scope::Namespace,
                Scope::Mesh,
                Scope::WorkloadSelector
            ]
        );
        let key = |ns: &str, name: &str| PolicyKey {
            namespace: ns.into(),
            name: name.into(),
        };
        // prod/web: its namespace's selector policy and the root one; dev/web: only the root
        // one; prod/db: neither; prod/web2 is on another node, so never bound here.
        assert_eq!(
            bindings.of(WorkloadId(0)),
            [key("prod", "sel"), key("mesh-root", "root-sel")]
        );
        assert_eq!(bindings.of(WorkloadId(1)), []);
        assert_eq!(bindings.of(WorkloadId(2)), [key("mesh-root", "root-sel")]);
        assert_eq!(bindings.of(WorkloadId(3)), []);
    }

    #[test]
    fn rules_become_to_from_and_when_clauses() {
        let (policies, _) = converted(
            "- name: p\n  namespace: prod\n  rules:\n\
             \x20 - to: [{operation: {ports: [80], not_ports: ['81']}}]\n\
             \x20   from:\n\
             \x20     - source: {principals: ['*']}\n\
             \x20     - source: {service_accounts: [client, dev/tool]}\n\
             \x20     - source: {not_namespaces: ['kube-*'], ip_blocks: [10.0.0.0/8]}\n\
             \x20   when: [{key: destination.ip, values: [10.0.0.1]}]\n\
             \x20 - {}\n",
        );
        let rules = &policies[0].rules;
        let Rule::AllOf(clauses) = &rules[0] else {
            panic!("an L4 rule converts to clauses: {rules:?}")
        };
        assert_eq!(clauses.len(), 3);
        assert_eq!(clauses[0].matches[0].destination_ports, [80]);
        assert_eq!(clauses[0].matches[0].not_destination_ports, [81]);
        let from = &clauses[1].matches;
        assert_eq!(from[0].principals, [StringMatch::Presence]);
        assert_eq!(
            from[1].service_accounts,
            [
                ServiceAccountMatch {
                    namespace: "prod".into(),
                    service_account: "client".into()
                },
                ServiceAccountMatch {
                    namespace: "dev".into(),
                    service_account: "tool".into()
                }
            ]
        );
        assert_eq!(
            from[2].not_namespaces,
            [StringMatch::Prefix("kube-".into())]
        );
        assert_eq!(from[2].source_ips[0].to_string(), "10.0.0.0/8");
        assert_eq!(
            clauses[2].matches[0].destination_ips[0].to_string(),
            "10.0.0.1/32"
        );
        // `- {}`: a rule with nothing to check matches every connection.
        assert_eq!(rules[1], Rule::AllOf(vec![]));
    }

    #[test]
    fn l7_rules_fail_closed_by_action() {
        let l7 = "  rules: [{to: [{operation: {methods: [GET], ports: [80]}}]}]\n";
        let (policies, _) = converted(&format!(
            "- name: a\n  namespace: prod\n  action: ALLOW\n{l7}\
             - name: d\n  namespace: prod\n  action: DENY\n{l7}\
             - name: u\n  namespace: prod\n  action: AUDIT\n{l7}"
        ));
        assert_eq!(policies[0].rules, [Rule::Never]);
        assert_eq!(policies[1].rules, [Rule::AllOf(vec![])]);
        assert_eq!(policies[2].rules, [Rule::AllOf(vec![])]);
    }
}
