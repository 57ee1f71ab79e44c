//! The decision semantics, one table row per behaviour: policies written in YAML, loaded through
//! the configuration loader into a snapshot exactly as `ringtun run` builds it, then connections
//! decided. Each row also checks that the oracle (`oracle.rs`) agrees, and a property test checks
//! the same on random policies and connections.

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;

use proptest::prelude::*;

use super::oracle;
use super::{
    Action, Connection, Decision, IpBlock, LogOnlyKind, LogOnlyMatch, PolicySet, Reason, RuleRef,
};
use crate::control_plane::config::{
    self, AuthorizationPolicy, Condition, Config, Operation, PolicyRule, Source,
};
use crate::control_plane::identity::SpiffeId;
use crate::control_plane::state::State;
use crate::control_plane::workload_registry::WorkloadId;

/// Three local workloads (two in `prod`, one in `dev`; `web` and `api` share `app: web`) and one
/// on another node. The root namespace is Istio's default, `istio-system`.
const MESH: &str = "\
version: 1
node: {name: node-a}
workloads:
  - {name: web, namespace: prod, ips: [10.0.1.1, \"fd00::1:1\"], node: node-a, netns: web, labels: {app: web, tier: front}}
  - {name: db, namespace: prod, ips: [10.0.1.2], node: node-a, netns: db, labels: {app: db}}
  - {name: api, namespace: dev, ips: [10.0.2.1], node: node-a, netns: api, labels: {app: web}}
  - {name: remote, namespace: prod, ips: [10.0.9.9], node: node-b, labels: {app: web}}
";

fn mesh(policies: &str) -> Arc<State> {
    let text = format!("{MESH}policies:\n{policies}");
    match config::load(&text) {
        Ok(c) => State::new(c, 1),
        Err(e) => panic!("test policies are invalid:\n{e}\n---\n{text}"),
    }
}

/// `"<identity|plaintext> <source ip> -> <workload name or [ip]>:<port>"`, where an identity is
/// `ns/sa` (trust domain cluster.local) or a full `spiffe://` URI.
struct ConnSpec {
    identity: Option<SpiffeId>,
    source_ip: IpAddr,
    destination: WorkloadId,
    destination_addr: SocketAddr,
}

fn parse_conn(state: &State, spec: &str) -> ConnSpec {
    let (src, dst) = spec.split_once(" -> ").expect("`src -> dst`");
    let (who, source_ip) = src.split_once(' ').expect("`identity ip`");
    let identity = match who {
        "plaintext" => None,
        uri if uri.starts_with("spiffe://") => Some(SpiffeId::parse(uri).expect("identity")),
        short => {
            let (ns, sa) = short.split_once('/').expect("ns/sa");
            Some(SpiffeId::new("cluster.local", ns, sa).expect("identity"))
        }
    };
    let (host, port) = dst.rsplit_once(':').expect("host:port");
    let port: u16 = port.parse().expect("port");
    let reg = &state.registry;
    let (destination, ip) = if let Some(ip) = host.strip_prefix('[') {
        let ip: IpAddr = ip.trim_end_matches(']').parse().expect("ip");
        (reg.workload_by_ip(ip).expect("a workload's address"), ip)
    } else {
        (0..reg.workload_count() as u32)
            .map(WorkloadId)
            .find(|&id| reg.workload(id).workload.name == host)
            .map(|id| (id, reg.workload(id).workload.ips[0]))
            .expect("a workload name")
    };
    ConnSpec {
        identity,
        source_ip: source_ip.parse().expect("source ip"),
        destination,
        destination_addr: SocketAddr::new(ip, port),
    }
}

fn describe_rule(set: &PolicySet, r: RuleRef) -> String {
    format!("{}#{}", set.policy(r.policy).key(), r.rule)
}

/// `allow: prod/p#0`, `deny: no ALLOW matched`, … then ` | audit prod/a#0` per log-only match.
fn describe(set: &PolicySet, reason: Reason, log_only: &[LogOnlyMatch]) -> String {
    let mut s = match reason {
        Reason::DeniedBy(r) => format!("deny: {}", describe_rule(set, r)),
        Reason::AllowedBy(r) => format!("allow: {}", describe_rule(set, r)),
        Reason::NoAllowPolicy => "allow: no ALLOW policy".to_string(),
        Reason::NoAllowMatched => "deny: no ALLOW matched".to_string(),
        Reason::NotLocal => "deny: not local".to_string(),
    };
    for m in log_only {
        let kind = match m.kind {
            LogOnlyKind::Audit => "audit",
            LogOnlyKind::DryRunAllow => "dry-run allow",
            LogOnlyKind::DryRunDeny => "dry-run deny",
        };
        s.push_str(&format!(" | {kind} {}", describe_rule(set, m.matched)));
    }
    s
}

/// Decides every connection, compares with the expectation and with the oracle; reports every
/// row that differs at once.
fn check(policies: &str, rows: &[(&str, &str)]) {
    let state = mesh(policies);
    let mut failures = Vec::new();
    for (spec, expected) in rows {
        let c = parse_conn(&state, spec);
        let conn = Connection {
            destination: c.destination,
            destination_addr: c.destination_addr,
            source_identity: c.identity.as_ref(),
            source_ip: c.source_ip,
        };
        let d: Decision = state.policies.evaluate(&conn);
        let log_only: Vec<LogOnlyMatch> = d.log_only.iter().collect();
        let got = describe(&state.policies, d.reason, &log_only);
        if got != *expected {
            failures.push(format!(
                "{spec}\n    expected {expected}\n    got      {got}"
            ));
        }
        let (o_reason, o_log) = oracle::decide(
            &state.config,
            &oracle::Conn {
                destination: &state.registry.workload(c.destination).workload,
                destination_addr: c.destination_addr,
                identity: c.identity.as_ref(),
                source_ip: c.source_ip,
            },
        );
        let by_oracle = describe(&state.policies, o_reason, &o_log);
        if by_oracle != got {
            failures.push(format!(
                "{spec}\n    oracle   {by_oracle}\n    got      {got}"
            ));
        }
    }
    assert!(
        failures.is_empty(),
        "policies:\n{policies}\n{}",
        failures.join("\n")
    );
}

#[test]
fn without_policies_everything_is_allowed() {
    check(
        "  []\n",
        &[
            ("prod/client 10.9.0.1 -> web:8080", "allow: no ALLOW policy"),
            ("plaintext 10.9.0.1 -> db:5432", "allow: no ALLOW policy"),
        ],
    );
}

#[test]
fn principals_exact_and_not() {
    check(
        "- name: allow-client
  namespace: prod
  rules: [{from: [{source: {principals: [cluster.local/ns/prod/sa/client]}}]}]
- name: deny-others
  namespace: prod
  action: DENY
  rules: [{from: [{source: {not_principals: [cluster.local/ns/prod/sa/client, cluster.local/ns/dev/sa/tool]}}]}]
",
        &[
            ("prod/client 10.9.0.1 -> web:8080", "allow: prod/allow-client#0"),
            ("dev/tool 10.9.0.1 -> web:8080", "deny: no ALLOW matched"),
            ("prod/other 10.9.0.1 -> web:8080", "deny: prod/deny-others#0"),
            // Another trust domain is another principal.
            (
                "spiffe://other.td/ns/prod/sa/client 10.9.0.1 -> web:8080",
                "deny: prod/deny-others#0",
            ),
            // No identity: a not_ clause always matches.
            ("plaintext 10.9.0.1 -> web:8080", "deny: prod/deny-others#0"),
        ],
    );
}

#[test]
fn principal_wildcards_prefix_suffix_presence() {
    check(
        "- name: by-prefix
  namespace: prod
  selector: {match_labels: {app: web}}
  rules: [{from: [{source: {principals: [cluster.local/ns/dev/*]}}]}]
- name: by-suffix
  namespace: prod
  selector: {match_labels: {app: web}}
  rules: [{from: [{source: {principals: ['*/sa/gateway']}}]}]
- name: any-identity
  namespace: prod
  selector: {match_labels: {app: db}}
  rules: [{from: [{source: {principals: ['*']}}]}]
",
        &[
            ("dev/tool 10.9.0.1 -> web:80", "allow: prod/by-prefix#0"),
            ("prod/gateway 10.9.0.1 -> web:80", "allow: prod/by-suffix#0"),
            (
                "spiffe://other.td/ns/x/sa/gateway 10.9.0.1 -> web:80",
                "allow: prod/by-suffix#0",
            ),
            ("prod/tool 10.9.0.1 -> web:80", "deny: no ALLOW matched"),
            (
                "prod/anyone 10.9.0.1 -> db:80",
                "allow: prod/any-identity#0",
            ),
            ("plaintext 10.9.0.1 -> db:80", "deny: no ALLOW matched"),
        ],
    );
}

#[test]
fn namespaces_with_wildcards_and_not() {
    check(
        "- name: from-prod-ish
  namespace: prod
  rules: [{from: [{source: {namespaces: ['pro*', dev], not_namespaces: ['*-canary']}}]}]
",
        &[
            ("prod/a 10.9.0.1 -> web:80", "allow: prod/from-prod-ish#0"),
            (
                "production/a 10.9.0.1 -> web:80",
                "allow: prod/from-prod-ish#0",
            ),
            ("dev/a 10.9.0.1 -> db:80", "allow: prod/from-prod-ish#0"),
            ("prod-canary/a 10.9.0.1 -> web:80", "deny: no ALLOW matched"),
            ("staging/a 10.9.0.1 -> web:80", "deny: no ALLOW matched"),
            ("plaintext 10.9.0.1 -> web:80", "deny: no ALLOW matched"),
        ],
    );
}

#[test]
fn service_accounts_and_not() {
    check(
        "- name: by-sa
  namespace: prod
  rules:
    - from: [{source: {service_accounts: [client, dev/tool], not_service_accounts: [dev/tool]}}]
    - from: [{source: {service_accounts: [dev/tool]}}]
- name: deny-not-sa
  namespace: dev
  action: DENY
  rules: [{from: [{source: {not_service_accounts: [prod/client]}}]}]
",
        &[
            // A bare name is in the policy's namespace; any trust domain.
            ("prod/client 10.9.0.1 -> web:80", "allow: prod/by-sa#0"),
            (
                "spiffe://other.td/ns/prod/sa/client 10.9.0.1 -> web:80",
                "allow: prod/by-sa#0",
            ),
            // Rule 0 excludes dev/tool; rule 1 lets it in.
            ("dev/tool 10.9.0.1 -> web:80", "allow: prod/by-sa#1"),
            ("dev/client 10.9.0.1 -> web:80", "deny: no ALLOW matched"),
            ("prod/client 10.9.0.1 -> api:80", "allow: no ALLOW policy"),
            ("dev/tool 10.9.0.1 -> api:80", "deny: dev/deny-not-sa#0"),
            ("plaintext 10.9.0.1 -> api:80", "deny: dev/deny-not-sa#0"),
        ],
    );
}

#[test]
fn source_ip_blocks_v4_v6_mapped_and_not() {
    check(
        "- name: from-nets
  namespace: prod
  rules: [{from: [{source: {ip_blocks: [10.9.0.0/16, 'fd00:9::/32'], not_ip_blocks: [10.9.7.0/24]}}]}]
",
        &[
            ("prod/a 10.9.0.1 -> web:80", "allow: prod/from-nets#0"),
            ("plaintext 10.9.255.255 -> web:80", "allow: prod/from-nets#0"),
            ("plaintext fd00:9:1::5 -> web:80", "allow: prod/from-nets#0"),
            // An IPv4-mapped IPv6 source is its IPv4 address.
            ("plaintext ::ffff:10.9.0.1 -> web:80", "allow: prod/from-nets#0"),
            ("plaintext 10.9.7.1 -> web:80", "deny: no ALLOW matched"),
            ("plaintext 10.10.0.1 -> web:80", "deny: no ALLOW matched"),
            ("plaintext fd00:a::1 -> web:80", "deny: no ALLOW matched"),
        ],
    );
}

#[test]
fn destination_ports_and_not() {
    check(
        "- name: ports
  namespace: prod
  rules:
    - to: [{operation: {ports: [80, '8080']}}, {operation: {ports: [9000], not_ports: [9000]}}]
    - to: [{operation: {not_ports: [80, 8080, 22]}}]
      from: [{source: {principals: [cluster.local/ns/prod/sa/admin]}}]
",
        &[
            ("plaintext 10.9.0.1 -> web:80", "allow: prod/ports#0"),
            ("plaintext 10.9.0.1 -> web:8080", "allow: prod/ports#0"),
            ("plaintext 10.9.0.1 -> web:9000", "deny: no ALLOW matched"),
            ("prod/admin 10.9.0.1 -> web:9000", "allow: prod/ports#1"),
            ("prod/admin 10.9.0.1 -> web:22", "deny: no ALLOW matched"),
        ],
    );
}

#[test]
fn when_conditions_on_every_l4_key() {
    check(
        "- name: when
  namespace: prod
  rules:
    - when:
        - {key: destination.ip, values: ['fd00::1:0/112'], not_values: [10.0.1.2]}
    - when:
        - {key: destination.ip, values: [10.0.1.0/24], not_values: [10.0.1.2]}
        - {key: destination.port, values: ['443']}
        - {key: source.ip, not_values: [10.9.0.0/16]}
    - when:
        - {key: source.namespace, values: [dev]}
        - {key: source.principal, not_values: ['*/sa/tool']}
",
        &[
            // Rule 0: the workload's IPv6 address only.
            ("plaintext 10.1.1.1 -> [fd00::1:1]:80", "allow: prod/when#0"),
            ("plaintext 10.1.1.1 -> web:80", "deny: no ALLOW matched"),
            ("plaintext 10.1.1.1 -> web:443", "allow: prod/when#1"),
            ("plaintext 10.9.1.1 -> web:443", "deny: no ALLOW matched"),
            ("plaintext 10.1.1.1 -> db:443", "deny: no ALLOW matched"),
            ("dev/ci 10.9.1.1 -> db:80", "allow: prod/when#2"),
            ("dev/tool 10.9.1.1 -> db:80", "deny: no ALLOW matched"),
            ("plaintext 10.9.1.1 -> db:80", "deny: no ALLOW matched"),
        ],
    );
}

#[test]
fn a_rule_needs_all_its_parts_and_any_entry_of_each() {
    check(
        "- name: both
  namespace: prod
  rules:
    - from: [{source: {namespaces: [dev]}}, {source: {ip_blocks: [192.168.0.0/24]}}]
      to: [{operation: {ports: [80]}}]
",
        &[
            ("dev/a 10.9.0.1 -> web:80", "allow: prod/both#0"),
            ("plaintext 192.168.0.7 -> web:80", "allow: prod/both#0"),
            ("dev/a 10.9.0.1 -> web:81", "deny: no ALLOW matched"),
            ("prod/a 10.9.0.1 -> web:80", "deny: no ALLOW matched"),
        ],
    );
}

#[test]
fn deny_wins_over_allow_and_the_first_match_in_file_order_decides() {
    check(
        "- name: allow-all
  namespace: prod
  rules: [{}]
- name: deny-dev
  namespace: prod
  action: DENY
  rules:
    - from: [{source: {principals: [cluster.local/ns/dev/sa/x]}}]
    - from: [{source: {namespaces: [dev]}}]
- name: deny-dev-again
  namespace: prod
  action: DENY
  rules: [{from: [{source: {namespaces: [dev]}}]}]
",
        &[
            ("prod/a 10.9.0.1 -> web:80", "allow: prod/allow-all#0"),
            ("dev/y 10.9.0.1 -> web:80", "deny: prod/deny-dev#1"),
            ("dev/x 10.9.0.1 -> web:80", "deny: prod/deny-dev#0"),
        ],
    );
}

#[test]
fn no_allow_policy_means_allow_and_an_empty_allow_allows_nothing() {
    check(
        "- name: deny-dev
  namespace: prod
  action: DENY
  rules: [{from: [{source: {namespaces: [dev]}}]}]
- name: allow-nothing
  namespace: dev
",
        &[
            ("prod/a 10.9.0.1 -> web:80", "allow: no ALLOW policy"),
            ("dev/a 10.9.0.1 -> web:80", "deny: prod/deny-dev#0"),
            // An ALLOW policy without rules applies and matches nothing.
            ("dev/a 10.9.0.1 -> api:80", "deny: no ALLOW matched"),
        ],
    );
}

#[test]
fn audit_and_dry_run_only_report() {
    check(
        "- name: audit-dev
  namespace: prod
  action: AUDIT
  rules: [{from: [{source: {namespaces: [dev]}}]}]
- name: would-deny
  namespace: prod
  action: DENY
  dry_run: true
  rules: [{to: [{operation: {ports: [22]}}]}]
- name: would-allow
  namespace: prod
  dry_run: true
  rules: [{from: [{source: {namespaces: [prod]}}]}]
",
        &[
            // Neither AUDIT nor a dry-run ALLOW counts as an ALLOW policy.
            (
                "prod/a 10.9.0.1 -> web:80",
                "allow: no ALLOW policy | dry-run allow prod/would-allow#0",
            ),
            (
                "dev/a 10.9.0.1 -> web:80",
                "allow: no ALLOW policy | audit prod/audit-dev#0",
            ),
            (
                "dev/a 10.9.0.1 -> web:22",
                "allow: no ALLOW policy | audit prod/audit-dev#0 | dry-run deny prod/would-deny#0",
            ),
        ],
    );
}

#[test]
fn l7_rules_fail_closed() {
    check(
        "- name: allow-get
  namespace: prod
  selector: {match_labels: {app: web}}
  rules:
    - to: [{operation: {methods: [GET], ports: [80]}}]
    - from: [{source: {namespaces: [dev]}}]
      when: [{key: 'request.headers[x-user]', values: [admin]}]
- name: deny-post
  namespace: prod
  action: DENY
  selector: {match_labels: {app: db}}
  rules: [{from: [{source: {namespaces: [dev]}}], to: [{operation: {paths: [/admin]}}]}]
- name: audit-jwt
  namespace: dev
  action: AUDIT
  rules: [{from: [{source: {request_principals: ['*']}}]}]
",
        &[
            // ALLOW: an L7 rule matches nothing, so nothing is allowed.
            ("prod/a 10.9.0.1 -> web:80", "deny: no ALLOW matched"),
            ("dev/a 10.9.0.1 -> web:80", "deny: no ALLOW matched"),
            // DENY: the rule matches every connection, whatever its L4 part says.
            ("prod/a 10.9.0.1 -> db:80", "deny: prod/deny-post#0"),
            ("plaintext 10.9.0.1 -> db:80", "deny: prod/deny-post#0"),
            // AUDIT: logs every connection.
            (
                "plaintext 10.9.0.1 -> api:80",
                "allow: no ALLOW policy | audit dev/audit-jwt#0",
            ),
        ],
    );
}

#[test]
fn plaintext_has_no_identity_but_has_an_address() {
    check(
        "- name: allow-ids-or-block
  namespace: dev
  rules:
    - from: [{source: {principals: ['*']}}, {source: {namespaces: ['*']}}, {source: {service_accounts: [x]}}]
    - from: [{source: {ip_blocks: [10.9.0.0/16]}}]
- name: deny-not-prod
  namespace: prod
  action: DENY
  rules: [{from: [{source: {not_namespaces: [prod]}}]}]
",
        &[
            // Clauses naming principals, namespaces or service accounts cannot match plaintext…
            ("plaintext 10.8.0.1 -> api:80", "deny: no ALLOW matched"),
            ("prod/a 10.8.0.1 -> api:80", "allow: dev/allow-ids-or-block#0"),
            // …but its address still can,
            ("plaintext 10.9.0.1 -> api:80", "allow: dev/allow-ids-or-block#1"),
            // and their not_ forms always match it.
            ("plaintext 10.9.0.1 -> web:80", "deny: prod/deny-not-prod#0"),
            ("prod/a 10.9.0.1 -> web:80", "allow: no ALLOW policy"),
        ],
    );
    // The STRICT PeerAuthentication equivalent, mesh-wide: plaintext refused everywhere.
    check(
        "- name: strict
  namespace: istio-system
  action: DENY
  rules: [{from: [{source: {not_principals: ['*']}}]}]
",
        &[
            (
                "plaintext 10.9.0.1 -> web:80",
                "deny: istio-system/strict#0",
            ),
            (
                "plaintext 10.9.0.1 -> api:80",
                "deny: istio-system/strict#0",
            ),
            ("dev/a 10.9.0.1 -> api:80", "allow: no ALLOW policy"),
        ],
    );
}

#[test]
fn workload_namespace_and_mesh_scopes() {
    check(
        "- name: web-only
  namespace: prod
  selector: {match_labels: {app: web}}
  rules: [{from: [{source: {namespaces: [prod]}}]}]
- name: all-prod
  namespace: prod
  action: DENY
  rules: [{from: [{source: {principals: [cluster.local/ns/evil/sa/x]}}]}]
- name: everywhere
  namespace: istio-system
  action: DENY
  rules: [{from: [{source: {namespaces: [banned]}}]}]
- name: web-everywhere
  namespace: istio-system
  action: AUDIT
  selector: {match_labels: {app: web}}
  rules: [{}]
- name: front-in-dev
  namespace: dev
  selector: {match_labels: {tier: front}}
  rules: [{}]
",
        &[
            // Selector: web (app=web in prod) only; db has no ALLOW policy.
            (
                "prod/a 10.9.0.1 -> web:80",
                "allow: prod/web-only#0 | audit istio-system/web-everywhere#0",
            ),
            (
                "dev/a 10.9.0.1 -> web:80",
                "deny: no ALLOW matched | audit istio-system/web-everywhere#0",
            ),
            ("dev/a 10.9.0.1 -> db:80", "allow: no ALLOW policy"),
            // Namespace: every prod workload, no dev one.
            ("evil/x 10.9.0.1 -> db:80", "deny: prod/all-prod#0"),
            (
                "evil/x 10.9.0.1 -> api:80",
                "allow: no ALLOW policy | audit istio-system/web-everywhere#0",
            ),
            // Mesh: the root namespace without selector applies everywhere.
            (
                "banned/x 10.9.0.1 -> api:80",
                "deny: istio-system/everywhere#0 | audit istio-system/web-everywhere#0",
            ),
            (
                "banned/x 10.9.0.1 -> db:80",
                "deny: istio-system/everywhere#0",
            ),
        ],
    );
}

#[test]
fn a_destination_that_is_not_local_is_refused() {
    let state = mesh("  []\n");
    let remote = state
        .registry
        .workload_by_ip("10.0.9.9".parse().unwrap())
        .unwrap();
    let d = state.policies.evaluate(&Connection {
        destination: remote,
        destination_addr: "10.0.9.9:80".parse().unwrap(),
        source_identity: None,
        source_ip: "10.9.0.1".parse().unwrap(),
    });
    assert_eq!(d.reason, Reason::NotLocal);
    assert!(!d.is_allowed());
}

// ---- property: the compiled evaluator agrees with the oracle on random policies ----

const IDENTITIES: &[(&str, &str, &str)] = &[
    ("cluster.local", "prod", "client"),
    ("cluster.local", "prod", "web"),
    ("cluster.local", "dev", "tool"),
    ("cluster.local", "production", "client"),
    ("other.td", "prod", "client"),
];
const PRINCIPALS: &[&str] = &[
    "cluster.local/ns/prod/sa/client",
    "cluster.local/ns/dev/sa/tool",
    "other.td/ns/prod/sa/client",
    "*",
    "cluster.local/ns/prod/*",
    "*/sa/client",
    "*sa/web",
    "cluster.local/*",
];
const NAMESPACES: &[&str] = &["prod", "dev", "*", "pro*", "*ev", "production"];
const SERVICE_ACCOUNTS: &[&str] = &["client", "dev/tool", "prod/web", "web"];
const BLOCKS: &[&str] = &[
    "10.0.0.0/8",
    "10.9.0.0/16",
    "10.9.0.1",
    "192.168.0.0/24",
    "0.0.0.0/0",
    "fd00::/16",
    "fd00::1:0/112",
    "10.0.1.1",
];
const SOURCE_IPS: &[&str] = &[
    "10.9.0.1",
    "10.1.2.3",
    "192.168.0.5",
    "fd00::9",
    "::ffff:10.9.0.1",
    "172.16.0.1",
];
const PORTS: &[u16] = &[80, 8080, 9090];

fn pick<T: Clone + std::fmt::Debug + 'static>(from: &'static [T]) -> impl Strategy<Value = T> {
    proptest::sample::select(from)
}

fn some<T: Clone + std::fmt::Debug + 'static>(
    values: impl Strategy<Value = T>,
) -> impl Strategy<Value = Vec<T>> {
    // Mostly empty: a field constrains a match only now and then, as in real policies.
    prop_oneof![
        3 => Just(Vec::new()),
        2 => proptest::collection::vec(values, 1..3),
    ]
}

fn strings(from: &'static [&'static str]) -> impl Strategy<Value = Vec<String>> {
    some(pick(from).prop_map(str::to_string))
}

fn blocks() -> impl Strategy<Value = Vec<IpBlock>> {
    some(pick(BLOCKS).prop_map(|b| b.parse::<IpBlock>().expect("block")))
}

fn source() -> impl Strategy<Value = Source> {
    (
        (strings(PRINCIPALS), strings(PRINCIPALS)),
        (strings(NAMESPACES), strings(NAMESPACES)),
        (strings(SERVICE_ACCOUNTS), strings(SERVICE_ACCOUNTS)),
        (blocks(), blocks()),
    )
        .prop_map(|(p, n, s, b)| {
            let mut source = Source {
                principals: p.0,
                not_principals: p.1,
                namespaces: n.0,
                not_namespaces: n.1,
                service_accounts: s.0,
                not_service_accounts: s.1,
                ip_blocks: b.0,
                not_ip_blocks: b.1,
            };
            // The loader refuses a source that names nothing.
            if source == Source::default() {
                source.principals = vec!["*".into()];
            }
            source
        })
}

fn operation() -> impl Strategy<Value = Operation> {
    (some(pick(PORTS)), some(pick(PORTS))).prop_map(|(ports, not_ports)| {
        if ports.is_empty() && not_ports.is_empty() {
            Operation {
                ports: vec![80],
                not_ports,
            }
        } else {
            Operation { ports, not_ports }
        }
    })
}

fn condition() -> impl Strategy<Value = Condition> {
    prop_oneof![
        (blocks(), blocks())
            .prop_map(|(values, not_values)| Condition::SourceIp { values, not_values }),
        (blocks(), blocks())
            .prop_map(|(values, not_values)| Condition::DestinationIp { values, not_values }),
        (strings(NAMESPACES), strings(NAMESPACES))
            .prop_map(|(values, not_values)| Condition::SourceNamespace { values, not_values }),
        (strings(PRINCIPALS), strings(PRINCIPALS))
            .prop_map(|(values, not_values)| Condition::SourcePrincipal { values, not_values }),
        (some(pick(PORTS)), some(pick(PORTS)))
            .prop_map(|(values, not_values)| Condition::DestinationPort { values, not_values }),
    ]
    .prop_map(|c| {
        // The loader wants at least one value.
        match c {
            Condition::SourceIp { values, not_values }
                if values.is_empty() && not_values.is_empty() =>
            {
                Condition::SourceIp {
                    values: vec!["10.0.0.0/8".parse().expect("block")],
                    not_values,
                }
            }
            Condition::DestinationIp { values, not_values }
                if values.is_empty() && not_values.is_empty() =>
            {
                Condition::DestinationIp {
                    values: vec!["10.0.1.1".parse().expect("block")],
                    not_values,
                }
            }
            Condition::SourceNamespace { values, not_values }
                if values.is_empty() && not_values.is_empty() =>
            {
                Condition::SourceNamespace {
                    values: vec!["prod".into()],
                    not_values,
                }
            }
            Condition::SourcePrincipal { values, not_values }
                if values.is_empty() && not_values.is_empty() =>
            {
                Condition::SourcePrincipal {
                    values: vec!["*".into()],
                    not_values,
                }
            }
            Condition::DestinationPort { values, not_values }
                if values.is_empty() && not_values.is_empty() =>
            {
                Condition::DestinationPort {
                    values: vec![8080],
                    not_values,
                }
            }
            other => other,
        }
    })
}

fn rule() -> impl Strategy<Value = PolicyRule> {
    (
        proptest::collection::vec(source(), 0..3),
        proptest::collection::vec(operation(), 0..2),
        proptest::collection::vec(condition(), 0..2),
        proptest::bool::weighted(0.1),
    )
        .prop_map(|(from, to, when, l7)| PolicyRule {
            from,
            to,
            when,
            l7_attributes: if l7 {
                vec!["to[0].operation.methods".into()]
            } else {
                Vec::new()
            },
        })
}

fn policy() -> impl Strategy<Value = AuthorizationPolicy> {
    let selector = prop_oneof![
        2 => Just(None),
        1 => Just(Some([("app", "web")].as_slice())),
        1 => Just(Some([("app", "db")].as_slice())),
        1 => Just(Some([("app", "web"), ("tier", "front")].as_slice())),
    ];
    (
        pick(&["prod", "dev", "istio-system"][..]),
        selector,
        prop_oneof![3 => Just(Action::Allow), 2 => Just(Action::Deny), 1 => Just(Action::Audit)],
        proptest::bool::weighted(0.15),
        proptest::collection::vec(rule(), 0..3),
    )
        .prop_map(
            |(namespace, selector, action, dry_run, rules)| AuthorizationPolicy {
                name: String::new(),
                namespace: namespace.to_string(),
                selector: selector.map(|s| {
                    s.iter()
                        .map(|(k, v)| (k.to_string(), v.to_string()))
                        .collect()
                }),
                action,
                dry_run,
                rules,
            },
        )
}

/// (identity index or none, source ip, local workload, use its second address, port)
fn connection() -> impl Strategy<Value = (Option<usize>, &'static str, usize, bool, u16)> {
    (
        proptest::option::weighted(0.8, 0..IDENTITIES.len()),
        pick(SOURCE_IPS),
        0..3usize,
        proptest::bool::ANY,
        pick(PORTS),
    )
}

fn base_config() -> Config {
    config::load(MESH).expect("the test mesh is valid")
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 512, ..ProptestConfig::default() })]

    #[test]
    fn compiled_evaluator_agrees_with_the_oracle(
        policies in proptest::collection::vec(policy(), 0..8),
        connections in proptest::collection::vec(connection(), 1..32),
    ) {
        let mut config = base_config();
        config.policies = policies;
        for (i, p) in config.policies.iter_mut().enumerate() {
            p.name = format!("p{i}");
        }
        let state = State::new(config, 1);
        let identities: Vec<SpiffeId> = IDENTITIES
            .iter()
            .map(|(td, ns, sa)| SpiffeId::new(td, ns, sa).expect("identity"))
            .collect();
        for (who, src, dst, second, port) in connections {
            let destination = WorkloadId(dst as u32);
            let w = &state.registry.workload(destination).workload;
            let ip = if second { *w.ips.last().expect("an address") } else { w.ips[0] };
            let conn = Connection {
                destination,
                destination_addr: SocketAddr::new(ip, port),
                source_identity: who.map(|i| &identities[i]),
                source_ip: src.parse().expect("ip"),
            };
            let d = state.policies.evaluate(&conn);
            let all: Vec<LogOnlyMatch> = state.policies.log_only_matches(&conn).collect();
            let inline: Vec<LogOnlyMatch> = d.log_only.iter().collect();
            prop_assert_eq!(
                &inline[..],
                &all[..all.len().min(super::LogOnlyMatches::CAPACITY)]
            );
            prop_assert_eq!(d.log_only.omitted() as usize, all.len().saturating_sub(inline.len()));
            let (reason, log_only) = oracle::decide(&state.config, &oracle::Conn {
                destination: w,
                destination_addr: conn.destination_addr,
                identity: conn.source_identity,
                source_ip: conn.source_ip,
            });
            prop_assert_eq!(
                describe(&state.policies, d.reason, &all),
                describe(&state.policies, reason, &log_only),
                "connection {:?}", conn
            );
        }
    }
}
