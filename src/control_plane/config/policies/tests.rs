//! The `policies:` section: YAML to validated policies, with every error's place.

use super::*;
use crate::control_plane::config::validate::tests::{errors, places};
use crate::control_plane::config::{check, load, ConfigErrors, ConfigWarning};

const HEAD: &str = "version: 1\nnode: {name: n}\n";

fn warnings(text: &str) -> Vec<ConfigWarning> {
    match check(text) {
        Ok(c) => c.warnings,
        Err(e) => panic!("expected a valid config, got:\n{e}"),
    }
}

#[test]
fn every_policy_mistake_is_reported_at_its_place() {
    let text = format!(
            "{HEAD}policies:
  - name: Bad_Name
    namespace: prod
    action: CUSTOM
    selector: {{matchLabels: {{app: web}}}}
    rules:
      - from:
          - source: {{principals: ['spiffe://td/ns/a/sa/b', 'td/ns/a'], namespaces: ['a*b'], ip_blocks: [10.0.0.0/33]}}
        to:
          - operation: {{ports: [0, http], not_ports: ['80']}}
        when:
          - {{key: source.ipp, values: [x]}}
          - {{key: destination.port}}
      - from: [{{source: {{}}}}]
      - bogus: 1
  - {{name: dup, namespace: prod}}
  - {{name: dup, namespace: prod, dry_run: 'yes', rules: [{{from: [{{source: {{service_accounts: ['a/b/c']}}}}]}}]}}
"
        );
    let errs = errors(&text);
    assert_eq!(
        places(&errs),
        vec![
            (4, 11, "policies[0].name"),
            (6, 13, "policies[0].action"),
            (7, 16, "policies[0].selector.matchLabels"),
            (10, 35, "policies[0].rules[0].from[0].source.principals[0]"),
            (10, 60, "policies[0].rules[0].from[0].source.principals[1]"),
            (10, 85, "policies[0].rules[0].from[0].source.namespaces[0]"),
            (10, 105, "policies[0].rules[0].from[0].source.ip_blocks[0]"),
            (12, 33, "policies[0].rules[0].to[0].operation.ports[0]"),
            (12, 36, "policies[0].rules[0].to[0].operation.ports[1]"),
            (14, 19, "policies[0].rules[0].when[0].key"),
            (15, 13, "policies[0].rules[0].when[1]"),
            (16, 25, "policies[0].rules[1].from[0].source"),
            (17, 9, "policies[0].rules[2].bogus"),
            (19, 12, "policies[2].name"),
            (19, 43, "policies[2].dry_run"),
            (
                19,
                95,
                "policies[2].rules[0].from[0].source.service_accounts[0]"
            ),
        ],
        "{}",
        ConfigErrors(errs.clone())
    );
    let msg = |i: usize| errs[i].message.as_str();
    assert!(msg(1).contains("CUSTOM"), "{}", msg(1));
    assert!(msg(2).contains("snake_case: `match_labels`"), "{}", msg(2));
    assert!(
        msg(3).contains("leave it out: `td/ns/a/sa/b`"),
        "{}",
        msg(3)
    );
    assert!(msg(4).contains("is not <trust-domain>/ns/"), "{}", msg(4));
    assert!(
        msg(5).contains("only once, at the start or the end"),
        "{}",
        msg(5)
    );
    assert!(msg(6).contains("prefix length 33"), "{}", msg(6));
    assert!(msg(7).contains("integer 0 is not a port"), "{}", msg(7));
    assert!(msg(8).contains("expected a port number"), "{}", msg(8));
    assert!(
        msg(9).contains("unknown condition key `source.ipp`"),
        "{}",
        msg(9)
    );
    assert!(
        msg(10).contains("needs `values` or `not_values`"),
        "{}",
        msg(10)
    );
    assert!(
        msg(11).contains("must name at least one field"),
        "{}",
        msg(11)
    );
    assert!(
        msg(13).contains("policy prod/dup is already defined at policies[1]"),
        "{}",
        msg(13)
    );
    assert!(
        msg(15).contains("is not `namespace/name` or `name`"),
        "{}",
        msg(15)
    );
}

#[test]
fn what_istio_refuses_is_refused() {
    let text = format!(
        "{HEAD}policies:
  - name: deny-nothing
    namespace: prod
    action: DENY
  - name: b
    namespace: prod
    rules:
      - from: []
        to: []
      - from: [{{source: {{principals: ['*'], service_accounts: [x]}}}}]
      - to: [{{operation: {{methods: ['']}}}}]
"
    );
    let errs = errors(&text);
    assert_eq!(
        places(&errs),
        vec![
            (4, 5, "policies[0].rules"),
            (10, 15, "policies[1].rules[0].from"),
            (11, 13, "policies[1].rules[0].to"),
            (12, 25, "policies[1].rules[1].from[0].source"),
            (13, 37, "policies[1].rules[2].to[0].operation.methods[0]"),
        ],
        "{}",
        ConfigErrors(errs.clone())
    );
    assert!(
        errs[0].message.contains("add an empty rule `{}`"),
        "{}",
        errs[0]
    );
    assert!(
        errs[1].message.contains("must not be empty: omit it"),
        "{}",
        errs[1]
    );
    assert!(
        errs[3].message.contains("service_accounts together with"),
        "{}",
        errs[3]
    );
    assert!(errs[4].message.contains("must not be empty"), "{}", errs[4]);
}

#[test]
fn selectors_and_labels_follow_kubernetes_rules() {
    let text = format!(
        "{HEAD}workloads:
  - name: w
    namespace: prod
    ips: [10.0.0.1]
    node: n
    labels: {{app: web, -bad: x, example.com/ok: y, Bad.Prefix/x: y, v: 1, long: {long}}}
policies:
  - {{name: p, namespace: prod, selector: {{match_labels: {{}}}}}}
  - {{name: q, namespace: prod, selector: {{}}}}
",
        long = "a".repeat(64)
    );
    let errs = errors(&text);
    assert_eq!(
        places(&errs),
        vec![
            (8, 24, "workloads[0].labels.-bad"),
            (8, 52, "workloads[0].labels.Bad.Prefix/x"),
            (8, 72, "workloads[0].labels.v"),
            (8, 81, "workloads[0].labels.long"),
            (10, 57, "policies[0].selector.match_labels"),
            (11, 42, "policies[1].selector.match_labels"),
        ],
        "{}",
        ConfigErrors(errs.clone())
    );
    assert!(errs[2].message.contains("quote numbers"), "{}", errs[2]);
    assert!(errs[4].message.contains("empty selector"), "{}", errs[4]);
    assert!(
        errs[5].message.contains("required key `match_labels`"),
        "{}",
        errs[5]
    );
}

#[test]
fn a_valid_policy_reads_every_l4_field() {
    let text = format!(
        "{HEAD}policies:
  - name: p
    namespace: prod
    action: deny
    rules:
      - from:
          - source:
              principals: ['*', 'cluster.local/ns/a/*', '*/sa/b', cluster.local/ns/a/sa/b]
              not_principals: [other.td/ns/x/sa/y]
              namespaces: [prod, 'kube-*']
              not_namespaces: ['*-canary']
              ip_blocks: [10.0.0.0/8, 'fd00::/8', 192.0.2.1]
              not_ip_blocks: [10.1.0.0/16]
          - source:
              service_accounts: [web, dev/tool]
              not_service_accounts: [dev/other]
        to: [{{operation: {{ports: [80, '8080'], not_ports: [22]}}}}]
        when:
          - {{key: destination.ip, values: [10.0.0.1], not_values: ['fd00::1']}}
          - {{key: source.namespace, not_values: [dev]}}
"
    );
    let cfg = load(&text).unwrap_or_else(|e| panic!("{e}"));
    let p = &cfg.policies[0];
    assert_eq!(p.action, Action::Deny);
    assert_eq!(p.selector, None);
    let r = &p.rules[0];
    assert!(r.l7_attributes.is_empty());
    let s = &r.from[0];
    assert_eq!(s.principals.len(), 4);
    assert_eq!(r.from[1].service_accounts, ["web", "dev/tool"]);
    assert_eq!(r.from[1].not_service_accounts, ["dev/other"]);
    let blocks: Vec<String> = s.ip_blocks.iter().map(|b| b.to_string()).collect();
    assert_eq!(blocks, ["10.0.0.0/8", "fd00::/8", "192.0.2.1/32"]);
    assert_eq!(r.to[0].ports, [80, 8080]);
    assert_eq!(r.to[0].not_ports, [22]);
    assert_eq!(
        r.when[1],
        Condition::SourceNamespace {
            values: vec![],
            not_values: vec!["dev".into()]
        }
    );
    assert!(warnings(&text).is_empty());
}

#[test]
fn policies_and_labels_appear_in_the_config_dump() {
    let text = format!(
        "{HEAD}workloads:
  - {{name: w, namespace: prod, ips: [10.0.0.1], node: n, labels: {{app: web}}}}
policies:
  - name: p
    namespace: prod
    action: DENY
    selector: {{match_labels: {{app: web}}}}
    rules:
      - from: [{{source: {{ip_blocks: [10.0.0.7/24]}}}}]
        when: [{{key: destination.port, values: ['80']}}]
      - to: [{{operation: {{methods: [GET]}}}}]
"
    );
    let cfg = load(&text).unwrap_or_else(|e| panic!("{e}"));
    let json: serde_json::Value = serde_json::to_value(&cfg).expect("serializes");
    assert_eq!(
        json["workloads"][0]["labels"],
        serde_json::json!({"app": "web"})
    );
    assert_eq!(
        json["policies"][0],
        serde_json::json!({
            "name": "p",
            "namespace": "prod",
            "selector": {"app": "web"},
            "action": "DENY",
            "dry_run": false,
            "rules": [
                {
                    "from": [{"ip_blocks": ["10.0.0.0/24"]}],
                    "when": [{"key": "destination.port", "values": [80], "not_values": []}]
                },
                {"l7_attributes": ["to[0].operation.methods"], "to": [{}]}
            ]
        })
    );
}

#[test]
fn l7_attributes_are_kept_by_name_and_warned_about_by_action() {
    let text = format!(
            "{HEAD}policies:
  - name: a
    namespace: prod
    rules:
      - to: [{{operation: {{methods: [GET], paths: [/x]}}}}]
      - from: [{{source: {{principals: ['*']}}}}]
  - name: d
    namespace: prod
    action: DENY
    rules:
      - from: [{{source: {{namespaces: [dev], request_principals: ['*']}}}}]
        when: [{{key: 'request.headers[x-user]', values: [admin]}}, {{key: connection.sni, not_values: [x]}}]
  - name: u
    namespace: prod
    action: AUDIT
    dry_run: true
    rules: [{{to: [{{operation: {{hosts: [example.com]}}}}]}}]
"
        );
    let cfg = load(&text).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(
        cfg.policies[0].rules[0].l7_attributes,
        ["to[0].operation.methods", "to[0].operation.paths"]
    );
    assert!(cfg.policies[0].rules[1].l7_attributes.is_empty());
    assert_eq!(
        cfg.policies[1].rules[0].l7_attributes,
        [
            "from[0].source.request_principals",
            "when[0] request.headers[x-user]",
            "when[1] connection.sni"
        ]
    );
    // The L4 part is kept too (the xDS conversion decides what it means).
    assert_eq!(cfg.policies[1].rules[0].from[0].namespaces, ["dev"]);
    let w = warnings(&text);
    let at: Vec<(usize, usize, &str)> = w
        .iter()
        .map(|w| (w.line, w.column, w.path.as_str()))
        .collect();
    assert_eq!(
        at,
        [
            (7, 9, "policies[0].rules[0]"),
            (13, 9, "policies[1].rules[0]"),
            (19, 13, "policies[2].rules[0]"),
        ]
    );
    assert!(
        w[0].message
            .contains("(to[0].operation.methods, to[0].operation.paths)"),
        "{}",
        w[0]
    );
    assert!(
        w[0].message
            .contains("ALLOW policy the rule matches no connection"),
        "{}",
        w[0]
    );
    assert!(
        w[1].message
            .contains("DENY policy the rule matches every connection (fail closed)"),
        "{}",
        w[1]
    );
    assert!(w[2].message.contains("AUDIT policy"), "{}", w[2]);
    assert!(w[2].message.contains("dry run"), "{}", w[2]);
    assert_eq!(
        w[0].to_string(),
        format!("7:9: policies[0].rules[0]: warning: {}", w[0].message)
    );
}
