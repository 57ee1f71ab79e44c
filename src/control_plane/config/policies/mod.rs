//! The `policies:` section: Istio's AuthorizationPolicy as an operator writes it — `metadata`'s
//! `name` and `namespace` beside the `spec` fields (`selector.match_labels`, `action`, `rules`
//! with `from.source`, `to.operation` and `when`), keys in snake_case like the rest of the file,
//! and the `istio.io/dry-run` annotation as `dry_run`.
//!
//! Boundary: this module only validates and keeps what was written. The attributes a node proxy
//! cannot see (HTTP methods, paths, headers, JWT claims…) are accepted, as Istio accepts them,
//! but kept only by name in [`PolicyRule::l7_attributes`], and each such rule gets a warning
//! saying what it will do. What a policy *means* — istiod's conversion into the xDS model and the
//! fail-closed treatment of those rules — is `control_plane::policy::convert`.

use std::collections::HashMap;

use crate::control_plane::identity::{is_dns_label, is_dns_name, SpiffeId};
use crate::control_plane::policy::{Action, IpBlock};

use super::checker::{
    boolean, dns_label, dns_name, fields, item, label_map, list, string, Checker, Fields,
    LabelMapUse,
};
use super::model::{AuthorizationPolicy, Condition, Operation, PolicyRule, Source};
use super::parse::{Node, Value};

const POLICY_KEYS: &[&str] = &[
    "name",
    "namespace",
    "selector",
    "action",
    "dry_run",
    "rules",
];
const SELECTOR_KEYS: &[&str] = &["match_labels"];
const RULE_KEYS: &[&str] = &["from", "to", "when"];
const SOURCE_KEYS: &[&str] = &[
    "principals",
    "not_principals",
    "namespaces",
    "not_namespaces",
    "service_accounts",
    "not_service_accounts",
    "ip_blocks",
    "not_ip_blocks",
    "request_principals",
    "not_request_principals",
    "remote_ip_blocks",
    "not_remote_ip_blocks",
];
/// Source fields taken from the HTTP request (JWT principals, X-Forwarded-For addresses).
const SOURCE_L7_KEYS: &[&str] = &[
    "request_principals",
    "not_request_principals",
    "remote_ip_blocks",
    "not_remote_ip_blocks",
];
const OPERATION_KEYS: &[&str] = &[
    "ports",
    "not_ports",
    "hosts",
    "not_hosts",
    "methods",
    "not_methods",
    "paths",
    "not_paths",
];
const OPERATION_L7_KEYS: &[&str] = &[
    "hosts",
    "not_hosts",
    "methods",
    "not_methods",
    "paths",
    "not_paths",
];
const CONDITION_KEYS: &[&str] = &["key", "values", "not_values"];
/// `when` keys a node proxy can evaluate: what a TCP connection and its peer certificate show.
const CONDITION_L4_KEYS: &[&str] = &[
    "source.ip",
    "source.namespace",
    "source.principal",
    "destination.ip",
    "destination.port",
];
/// Istio's other `when` keys, exactly or as `prefix[...]`: all need the HTTP request (or, for
/// `connection.sni`, a TLS handshake ringtun does not terminate for the application).
const CONDITION_OTHER_KEYS: &[&str] = &[
    "remote.ip",
    "request.auth.principal",
    "request.auth.audiences",
    "request.auth.presenter",
    "connection.sni",
];
const CONDITION_OTHER_PREFIXES: &[&str] = &[
    "request.headers[",
    "request.auth.claims[",
    "experimental.envoy.filters.",
];

/// Validates `policies:`; `None` when anything in it is wrong (every problem is reported).
pub(super) fn check_policies(
    c: &mut Checker,
    items: &[Node],
    path: &str,
) -> Option<Vec<AuthorizationPolicy>> {
    let mut policies = Vec::with_capacity(items.len());
    let mut all_ok = true;
    let mut seen: HashMap<(String, String), String> = HashMap::new();
    for (i, n) in items.iter().enumerate() {
        let ppath = item(path, i);
        let Some(f) = fields(c, n, &ppath, POLICY_KEYS) else {
            all_ok = false;
            continue;
        };
        let name_node = f.require(c, "name");
        let name = name_node.and_then(|v| dns_name(c, v, &f.path("name")));
        let namespace = f
            .require(c, "namespace")
            .and_then(|v| dns_label(c, v, &f.path("namespace")));
        if let (Some(ns), Some(nm), Some(name_node)) = (&namespace, &name, name_node) {
            let key = (ns.clone(), nm.clone());
            if let Some(first) = seen.get(&key) {
                c.error(
                    name_node.pos,
                    &f.path("name"),
                    format!("policy {ns}/{nm} is already defined at {first}"),
                );
                all_ok = false;
            } else {
                seen.insert(key, ppath.clone());
            }
        }
        let selector = f.or_default(c, "selector", None, |c, v, p| {
            let s = fields(c, v, p, SELECTOR_KEYS)?;
            let labels = s.require(c, "match_labels")?;
            label_map(c, labels, &s.path("match_labels"), LabelMapUse::Selector).map(Some)
        });
        let action = f.or_default(c, "action", Action::Allow, action);
        let dry_run = f.or_default(c, "dry_run", false, boolean);
        let rules = f.or_default(c, "rules", Vec::new(), |c, v, p| {
            let items = list(c, v, p)?;
            let mut rules = Vec::with_capacity(items.len());
            let mut ok = true;
            for (j, rn) in items.iter().enumerate() {
                let rpath = item(p, j);
                match check_rule(c, rn, &rpath) {
                    Some(rule) => {
                        if !rule.l7_attributes.is_empty() {
                            if let (Some(action), Some(dry_run)) = (action, dry_run) {
                                warn_l7(c, rn, &rpath, &rule.l7_attributes, action, dry_run);
                            }
                        }
                        rules.push(rule);
                    }
                    None => ok = false,
                }
            }
            ok.then_some(rules)
        });
        if action == Some(Action::Deny) && rules.as_ref().is_some_and(Vec::is_empty) {
            // As Istio: it could never match, which is almost certainly not what was meant.
            let at = f.get("rules").map_or(f.pos, |r| r.pos);
            c.error(
                at,
                &f.path("rules"),
                "a DENY policy without rules never matches; add an empty rule `{}` to deny every \
                 connection it applies to",
            );
            all_ok = false;
        }
        let policy = (|| {
            Some(AuthorizationPolicy {
                name: name?,
                namespace: namespace?,
                selector: selector?,
                action: action?,
                dry_run: dry_run?,
                rules: rules?,
            })
        })();
        match policy {
            Some(p) => policies.push(p),
            None => all_ok = false,
        }
    }
    all_ok.then_some(policies)
}

fn action(c: &mut Checker, node: &Node, path: &str) -> Option<Action> {
    let s = string(c, node, path)?;
    if s.eq_ignore_ascii_case("ALLOW") {
        Some(Action::Allow)
    } else if s.eq_ignore_ascii_case("DENY") {
        Some(Action::Deny)
    } else if s.eq_ignore_ascii_case("AUDIT") {
        Some(Action::Audit)
    } else if s.eq_ignore_ascii_case("CUSTOM") {
        c.error(
            node.pos,
            path,
            "CUSTOM (an external authorization service) is not supported: a node proxy \
             enforces ALLOW, DENY and AUDIT (log only)",
        );
        None
    } else {
        c.error(
            node.pos,
            path,
            format!("unknown action `{s}`; accepted: ALLOW, DENY, AUDIT"),
        );
        None
    }
}

/// One warning per rule that names L4-invisible attributes: what it names and what it will do.
fn warn_l7(
    c: &mut Checker,
    node: &Node,
    path: &str,
    attributes: &[String],
    action: Action,
    dry_run: bool,
) {
    let what = match action {
        // Like ztunnel (istiod drops such rules from ALLOW policies).
        Action::Allow => {
            "in this ALLOW policy the rule matches no connection (it allows less than written)"
        }
        Action::Deny => {
            "in this DENY policy the rule matches every connection (fail closed): every \
             connection to the workloads the policy applies to is denied"
        }
        Action::Audit => {
            "in this AUDIT policy the rule matches every connection: every connection to the \
             workloads the policy applies to is logged as matching"
        }
    };
    let dry = if dry_run {
        " (dry run: reported, not enforced)"
    } else {
        ""
    };
    c.warning(
        node.pos,
        path,
        format!(
            "names attributes a node proxy cannot see at L4 ({}); {what}{dry}. Enforce HTTP \
             rules in a waypoint proxy",
            attributes.join(", ")
        ),
    );
}

fn check_rule(c: &mut Checker, node: &Node, path: &str) -> Option<PolicyRule> {
    let f = fields(c, node, path, RULE_KEYS)?;
    let mut l7 = Vec::new();
    let from = entries(c, &f, ("from", "source", "a source"), &mut l7, check_source);
    let to = entries(
        c,
        &f,
        ("to", "operation", "an operation"),
        &mut l7,
        check_operation,
    );
    let mut when = Some(Vec::new());
    if let Some(v) = f.get("when") {
        let wpath = f.path("when");
        when = list(c, v, &wpath).and_then(|items| {
            let mut out = Vec::with_capacity(items.len());
            let mut ok = true;
            for (k, n) in items.iter().enumerate() {
                match check_condition(c, n, &item(&wpath, k)) {
                    Some(ConditionRead::L4(cond)) => out.push(cond),
                    Some(ConditionRead::Other(key)) => l7.push(format!("when[{k}] {key}")),
                    None => ok = false,
                }
            }
            ok.then_some(out)
        });
    }
    Some(PolicyRule {
        from: from?,
        to: to?,
        when: when?,
        l7_attributes: l7,
    })
}

/// `from` or `to`: a list of one-key entries (`- source: {…}`), each read with `read`, which
/// records the L7 fields it meets under their path inside the rule.
fn entries<T>(
    c: &mut Checker,
    f: &Fields<'_>,
    (list_key, entry_key, what): (&str, &str, &str),
    l7: &mut Vec<String>,
    read: fn(&mut Checker, &Node, &str, &str, &mut Vec<String>) -> Option<T>,
) -> Option<Vec<T>> {
    let Some(v) = f.get(list_key) else {
        return Some(Vec::new());
    };
    let lpath = f.path(list_key);
    let items = list(c, v, &lpath)?;
    if items.is_empty() {
        c.error(
            v.pos,
            &lpath,
            format!(
                "`{list_key}` must not be empty: omit it to put no condition on the {what_for}",
                what_for = if list_key == "from" {
                    "source"
                } else {
                    "destination"
                }
            ),
        );
        return None;
    }
    let mut out = Vec::with_capacity(items.len());
    let mut ok = true;
    for (k, n) in items.iter().enumerate() {
        let rel = format!("{list_key}[{k}].{entry_key}");
        let read = entry(c, n, &item(&lpath, k), entry_key, what)
            .and_then(|(inner, ipath)| read(c, inner, &ipath, &rel, l7));
        match read {
            Some(x) => out.push(x),
            None => ok = false,
        }
    }
    ok.then_some(out)
}

/// `- source: {…}` / `- operation: {…}`: the one required key of a `from`/`to` entry, which
/// must name at least one field (Istio refuses an empty source or operation too; ztunnel would
/// otherwise read it as "matches nothing" where an HTTP proxy reads "matches everything").
fn entry<'a>(
    c: &mut Checker,
    node: &'a Node,
    path: &str,
    key: &str,
    what: &str,
) -> Option<(&'a Node, String)> {
    let f = fields(c, node, path, &[key])?;
    let inner = f.require(c, key)?;
    let inner_path = f.path(key);
    if let Value::Map(entries) = &inner.value {
        let named = entries
            .iter()
            .any(|e| !matches!(&e.value.value, Value::Null) && e.value.value != Value::Seq(vec![]));
        if !named {
            c.error(
                inner.pos,
                &inner_path,
                format!("{what} must name at least one field (an empty one would match nothing)"),
            );
            return None;
        }
    }
    Some((inner, inner_path))
}

fn check_source(
    c: &mut Checker,
    node: &Node,
    path: &str,
    rel: &str,
    l7: &mut Vec<String>,
) -> Option<Source> {
    let f = fields(c, node, path, SOURCE_KEYS)?;
    let l7_ok = read_l7(c, &f, SOURCE_L7_KEYS, rel, l7);
    let principals = values(c, &f, "principals", principal);
    let not_principals = values(c, &f, "not_principals", principal);
    let namespaces = values(c, &f, "namespaces", namespace_pattern);
    let not_namespaces = values(c, &f, "not_namespaces", namespace_pattern);
    let service_accounts = values(c, &f, "service_accounts", service_account);
    let not_service_accounts = values(c, &f, "not_service_accounts", service_account);
    let ip_blocks = values(c, &f, "ip_blocks", ip_block);
    let not_ip_blocks = values(c, &f, "not_ip_blocks", ip_block);
    let named = |v: &Option<Vec<String>>| v.as_ref().is_some_and(|v| !v.is_empty());
    let identity_fields = [&principals, &not_principals, &namespaces, &not_namespaces];
    if identity_fields.into_iter().any(named)
        && (named(&service_accounts) || named(&not_service_accounts))
    {
        // As Istio: the two ways of naming the source identity are not combined.
        c.error(
            node.pos,
            path,
            "a source cannot name service_accounts together with principals or namespaces",
        );
        return None;
    }
    if !l7_ok {
        return None;
    }
    Some(Source {
        principals: principals?,
        not_principals: not_principals?,
        namespaces: namespaces?,
        not_namespaces: not_namespaces?,
        service_accounts: service_accounts?,
        not_service_accounts: not_service_accounts?,
        ip_blocks: ip_blocks?,
        not_ip_blocks: not_ip_blocks?,
    })
}

fn check_operation(
    c: &mut Checker,
    node: &Node,
    path: &str,
    rel: &str,
    l7: &mut Vec<String>,
) -> Option<Operation> {
    let f = fields(c, node, path, OPERATION_KEYS)?;
    let l7_ok = read_l7(c, &f, OPERATION_L7_KEYS, rel, l7);
    let ports = values(c, &f, "ports", port_value);
    let not_ports = values(c, &f, "not_ports", port_value);
    if !l7_ok {
        return None;
    }
    Some(Operation {
        ports: ports?,
        not_ports: not_ports?,
    })
}

/// Checks the L7 `keys` of a mapping are lists of strings (their values mean nothing here) and
/// records those with a value as `rel.key`. False when one is malformed (reported).
fn read_l7(
    c: &mut Checker,
    f: &Fields<'_>,
    keys: &[&str],
    rel: &str,
    l7: &mut Vec<String>,
) -> bool {
    let mut ok = true;
    for key in keys {
        match values(c, f, key, any_string) {
            Some(v) if !v.is_empty() => l7.push(format!("{rel}.{key}")),
            Some(_) => {}
            None => ok = false,
        }
    }
    ok
}

fn any_string(c: &mut Checker, node: &Node, path: &str) -> Option<String> {
    let s = string(c, node, path)?;
    if s.is_empty() {
        c.error(node.pos, path, "must not be empty");
        return None;
    }
    Some(s.to_string())
}

enum ConditionRead {
    L4(Condition),
    /// A valid Istio key a node proxy cannot evaluate.
    Other(String),
}

fn check_condition(c: &mut Checker, node: &Node, path: &str) -> Option<ConditionRead> {
    let f = fields(c, node, path, CONDITION_KEYS)?;
    let key_node = f.require(c, "key")?;
    let key_path = f.path("key");
    let key = string(c, key_node, &key_path)?;
    let has =
        |k: &str| matches!(f.get(k), Some(Node { value: Value::Seq(v), .. }) if !v.is_empty());
    if !has("values") && !has("not_values") {
        // Read them anyway so a wrong type is reported as such.
        let _ = values(c, &f, "values", any_string);
        let _ = values(c, &f, "not_values", any_string);
        c.error(
            f.pos,
            path,
            format!("condition `{key}` needs `values` or `not_values` (at least one value)"),
        );
        return None;
    }
    macro_rules! both {
        ($variant:ident, $read:expr) => {{
            let v = values(c, &f, "values", $read);
            let nv = values(c, &f, "not_values", $read);
            Some(ConditionRead::L4(Condition::$variant {
                values: v?,
                not_values: nv?,
            }))
        }};
    }
    match key {
        "source.ip" => both!(SourceIp, ip_block),
        "source.namespace" => both!(SourceNamespace, namespace_pattern),
        "source.principal" => both!(SourcePrincipal, principal),
        "destination.ip" => both!(DestinationIp, ip_block),
        "destination.port" => both!(DestinationPort, port_value),
        other
            if CONDITION_OTHER_KEYS.contains(&other)
                || CONDITION_OTHER_PREFIXES.iter().any(|p| {
                    other.starts_with(p) && (!p.ends_with('[') || other.ends_with(']'))
                }) =>
        {
            let v = values(c, &f, "values", any_string);
            let nv = values(c, &f, "not_values", any_string);
            v?;
            nv?;
            Some(ConditionRead::Other(other.to_string()))
        }
        other => {
            c.error(
                key_node.pos,
                &key_path,
                format!(
                    "unknown condition key `{other}`; L4 keys: {}; Istio's HTTP keys ({}, \
                     request.headers[…], request.auth.claims[…]) are accepted with a warning",
                    CONDITION_L4_KEYS.join(", "),
                    CONDITION_OTHER_KEYS.join(", "),
                ),
            );
            None
        }
    }
}

/// An optional list under `key`, each item read with `read`; absent = empty.
fn values<T>(
    c: &mut Checker,
    f: &Fields<'_>,
    key: &str,
    read: impl Fn(&mut Checker, &Node, &str) -> Option<T>,
) -> Option<Vec<T>> {
    let Some(node) = f.get(key) else {
        return Some(Vec::new());
    };
    let path = f.path(key);
    let items = list(c, node, &path)?;
    let mut out = Vec::with_capacity(items.len());
    let mut ok = true;
    for (i, n) in items.iter().enumerate() {
        match read(c, n, &item(&path, i)) {
            Some(v) => out.push(v),
            None => ok = false,
        }
    }
    ok.then_some(out)
}

/// Istio's wildcard: `*` alone, or once at the start or end.
fn wildcard_shape(s: &str) -> Result<(), &'static str> {
    if s.is_empty() {
        return Err("must not be empty");
    }
    let stars = s.matches('*').count();
    if stars == 0 || s == "*" || (stars == 1 && (s.starts_with('*') || s.ends_with('*'))) {
        Ok(())
    } else {
        Err("may use `*` only once, at the start or the end (`*`, `*suffix`, `prefix*`)")
    }
}

/// A source principal: `<trust-domain>/ns/<namespace>/sa/<service-account>`, or a wildcard
/// pattern of one.
fn principal(c: &mut Checker, node: &Node, path: &str) -> Option<String> {
    let s = string(c, node, path)?;
    let why = if let Some(rest) = s.strip_prefix("spiffe://") {
        Some(format!(
            "principal `{s}` starts with `spiffe://`; Istio principals leave it out: `{rest}`"
        ))
    } else if let Err(why) = wildcard_shape(s) {
        Some(format!("principal `{s}` {why}"))
    } else if !s.contains('*') {
        SpiffeId::parse(&format!("spiffe://{s}")).err().map(|e| {
            format!(
                "principal `{s}` is not <trust-domain>/ns/<namespace>/sa/<service-account>: {e}"
            )
        })
    } else {
        None
    };
    match why {
        Some(why) => {
            c.error(node.pos, path, why);
            None
        }
        None => Some(s.to_string()),
    }
}

/// A source namespace: a DNS label, or a wildcard pattern of one.
fn namespace_pattern(c: &mut Checker, node: &Node, path: &str) -> Option<String> {
    let s = string(c, node, path)?;
    let why = match wildcard_shape(s) {
        Err(why) => Some(why),
        Ok(()) => {
            let fixed = s.trim_matches('*');
            let chars_ok = fixed
                .bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-');
            if (!s.contains('*') && !is_dns_label(s)) || !chars_ok {
                Some("is not a namespace (a DNS label: lowercase letters, digits, '-') or a pattern of one")
            } else {
                None
            }
        }
    };
    match why {
        Some(why) => {
            c.error(node.pos, path, format!("namespace `{s}` {why}"));
            None
        }
        None => Some(s.to_string()),
    }
}

/// `namespace/service-account`, or a service account in the policy's own namespace.
fn service_account(c: &mut Checker, node: &Node, path: &str) -> Option<String> {
    let s = string(c, node, path)?;
    let ok = match s.split_once('/') {
        Some((ns, sa)) => is_dns_label(ns) && is_dns_name(sa),
        None => is_dns_name(s),
    };
    if ok {
        Some(s.to_string())
    } else {
        c.error(
            node.pos,
            path,
            format!(
                "service account `{s}` is not `namespace/name` or `name` (a DNS label and a DNS \
                 subdomain; no wildcards)"
            ),
        );
        None
    }
}

fn ip_block(c: &mut Checker, node: &Node, path: &str) -> Option<IpBlock> {
    let s = string(c, node, path)?;
    match s.parse::<IpBlock>() {
        Ok(b) => Some(b),
        Err(e) => {
            c.error(node.pos, path, e.to_string());
            None
        }
    }
}

/// A port as Istio writes it (a string) or as YAML reads a bare number.
fn port_value(c: &mut Checker, node: &Node, path: &str) -> Option<u16> {
    let number = match &node.value {
        Value::Int(i) => Some(*i),
        Value::Str(s) if !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit()) => s.parse().ok(),
        _ => {
            c.wrong_type(node, path, "a port number 1..=65535");
            return None;
        }
    };
    match number
        .and_then(|n| u16::try_from(n).ok())
        .filter(|p| *p != 0)
    {
        Some(p) => Some(p),
        None => {
            c.error(
                node.pos,
                path,
                format!("{} is not a port: 1..=65535", node.value.describe()),
            );
            None
        }
    }
}

#[cfg(test)]
mod tests;
