//! The compiled policy set: applicability per workload and the rules as they will be evaluated.

use super::*;
use crate::control_plane::config::load;
use crate::control_plane::identity::SpiffeId;
use crate::control_plane::policy::{Clause, Connection, Reason, RuleRef, Scope};

/// Two local workloads in `prod` (`a`, `b`) and one remote.
fn registry() -> Registry {
    let config = load(
        "version: 1\nnode: {name: n}\nworkloads:\n\
         - {name: a, namespace: prod, ips: [10.0.0.1], node: n, netns: a}\n\
         - {name: b, namespace: prod, ips: [10.0.0.2], node: n, netns: b}\n\
         - {name: c, namespace: prod, ips: [10.0.0.3], node: other}\n",
    )
    .expect("valid");
    Registry::new(&config)
}

fn policy(name: &str, scope: Scope, action: Action, rules: Vec<Rule>) -> Authorization {
    Authorization {
        name: name.into(),
        namespace: "prod".into(),
        scope,
        action,
        dry_run: false,
        rules,
    }
}

fn key(name: &str) -> PolicyKey {
    PolicyKey {
        namespace: "prod".into(),
        name: name.into(),
    }
}

fn decide(set: &PolicySet, workload: u32, identity: Option<&SpiffeId>) -> Reason {
    set.evaluate(&Connection {
        destination: WorkloadId(workload),
        destination_addr: format!("10.0.0.{}:80", workload + 1).parse().unwrap(),
        source_identity: identity,
        source_ip: "10.9.0.1".parse().unwrap(),
    })
    .reason
}

fn rule_ref(policy: u32, rule: u32) -> Reason {
    Reason::DeniedBy(RuleRef {
        policy: PolicyId(policy),
        rule,
    })
}

#[test]
fn xds_edge_shapes_match_as_ztunnel_reads_them() {
    let reg = registry();
    let only_empty_match = Rule::AllOf(vec![Clause {
        matches: vec![Match::default()],
    }]);
    let clause_without_matches = Rule::AllOf(vec![Clause { matches: vec![] }]);
    let set = PolicySet::compile(
        vec![
            // An empty match is skipped, so its clause (and rule) never matches.
            policy(
                "empty-match",
                Scope::Namespace,
                Action::Deny,
                vec![only_empty_match],
            ),
            // A DENY without rules matches nothing.
            policy("no-rules", Scope::Namespace, Action::Deny, vec![]),
            // A clause without matches constrains nothing: the rule matches everything.
            policy(
                "empty-clause",
                Scope::WorkloadSelector,
                Action::Deny,
                vec![Rule::Never, clause_without_matches],
            ),
        ],
        &{
            let mut b = Bindings::default();
            b.bind(WorkloadId(1), key("empty-clause"));
            b
        },
        &reg,
    );
    assert_eq!(decide(&set, 0, None), Reason::NoAllowPolicy);
    assert_eq!(decide(&set, 1, None), rule_ref(2, 1));
}

#[test]
fn the_static_strict_policy_refuses_plaintext_where_referenced() {
    let reg = registry();
    let strict = Authorization {
        name: "istio_converted_static_strict".into(),
        namespace: "istio-system".into(),
        scope: Scope::WorkloadSelector,
        action: Action::Deny,
        dry_run: false,
        rules: vec![Rule::AllOf(vec![Clause {
            matches: vec![Match {
                not_principals: vec![StringMatch::Presence],
                ..Match::default()
            }],
        }])],
    };
    let mut bindings = Bindings::default();
    bindings.bind(WorkloadId(0), strict.key());
    let set = PolicySet::compile(vec![strict], &bindings, &reg);
    let id = SpiffeId::new("cluster.local", "dev", "x").expect("id");
    assert_eq!(decide(&set, 0, None), rule_ref(0, 0));
    assert_eq!(decide(&set, 0, Some(&id)), Reason::NoAllowPolicy);
    assert_eq!(
        decide(&set, 1, None),
        Reason::NoAllowPolicy,
        "not referenced"
    );
}

#[test]
fn applicable_lists_are_split_sorted_deduplicated_and_local_only() {
    let reg = registry();
    let mut dry = policy("dry", Scope::Namespace, Action::Deny, vec![]);
    dry.dry_run = true;
    let set = PolicySet::compile(
        vec![
            policy("allow-ns", Scope::Namespace, Action::Allow, vec![]),
            policy("audit", Scope::WorkloadSelector, Action::Audit, vec![]),
            dry,
            policy("deny-mesh", Scope::Mesh, Action::Deny, vec![]),
        ],
        &{
            let mut b = Bindings::default();
            // Referenced and in scope: counted once. Unknown: skipped and listed.
            b.bind(WorkloadId(0), key("allow-ns"));
            b.bind(WorkloadId(0), key("audit"));
            b.bind(WorkloadId(0), key("missing"));
            b
        },
        &reg,
    );
    let a = set.applicable(WorkloadId(0)).expect("local");
    assert_eq!(&a.deny[..], [PolicyId(3)]);
    assert_eq!(&a.allow[..], [PolicyId(0)]);
    assert_eq!(&a.log_only[..], [PolicyId(1), PolicyId(2)]);
    let b = set.applicable(WorkloadId(1)).expect("local");
    assert_eq!(&b.log_only[..], [PolicyId(2)]);
    assert!(set.applicable(WorkloadId(2)).is_none(), "remote");
    assert!(set.applicable(WorkloadId(9)).is_none(), "unknown");
    assert_eq!(set.unknown_references(), [(WorkloadId(0), key("missing"))]);
}
