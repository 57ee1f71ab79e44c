//! The reading primitives every part of the config loader uses: a [`Checker`] that collects
//! every error with its place, and typed readers of YAML nodes (strings, integers, ports, IPs,
//! DNS names, labels, lists, mappings with their known keys) that report and skip what is
//! wrong instead of stopping at the first problem.

use std::collections::BTreeMap;
use std::net::IpAddr;

use super::model::{ConfigError, ConfigWarning};
use super::parse::{Entry, Node, Pos, Value, DOCUMENT_PATH};
use crate::control_plane::identity::{is_dns_label, is_dns_name};

#[derive(Default)]
pub(super) struct Checker {
    pub(super) errors: Vec<ConfigError>,
    pub(super) warnings: Vec<ConfigWarning>,
}

impl Checker {
    pub(super) fn error(&mut self, pos: Pos, path: &str, message: impl Into<String>) {
        self.errors.push(ConfigError {
            line: pos.line,
            column: pos.column,
            path: path.to_string(),
            message: message.into(),
        });
    }

    pub(super) fn warning(&mut self, pos: Pos, path: &str, message: impl Into<String>) {
        self.warnings.push(ConfigWarning {
            line: pos.line,
            column: pos.column,
            path: path.to_string(),
            message: message.into(),
        });
    }

    pub(super) fn wrong_type(&mut self, node: &Node, path: &str, expected: &str) {
        self.error(
            node.pos,
            path,
            format!("expected {expected}, found {}", node.value.describe()),
        );
    }
}

pub(super) fn join(parent: &str, key: &str) -> String {
    if parent.is_empty() {
        key.to_string()
    } else {
        format!("{parent}.{key}")
    }
}

pub(super) fn item(parent: &str, index: usize) -> String {
    format!("{parent}[{index}]")
}

/// The known keys of one mapping; unknown keys have already been reported.
pub(super) struct Fields<'a> {
    pub(super) pos: Pos,
    path: String,
    entries: Vec<(String, &'a Entry)>,
    /// Accepted keys written in camelCase (already reported): not "missing" as well.
    misspelled: Vec<String>,
}

/// Opens `node` as a mapping whose keys must be among `accepted`.
pub(super) fn fields<'a>(
    c: &mut Checker,
    node: &'a Node,
    path: &str,
    accepted: &[&str],
) -> Option<Fields<'a>> {
    let Value::Map(entries) = &node.value else {
        c.wrong_type(node, path, "a mapping");
        return None;
    };
    let mut known = Vec::with_capacity(entries.len());
    let mut misspelled = Vec::new();
    for entry in entries {
        match entry.key.value.key_text() {
            None => c.error(
                entry.key.pos,
                if path.is_empty() { DOCUMENT_PATH } else { path },
                "a key must be a plain name, not a list or mapping",
            ),
            Some(k) if accepted.contains(&k.as_str()) => known.push((k, entry)),
            Some(k) => {
                let key_path = join(path, &k);
                // Istio's own YAML is camelCase; this file spells the same keys in snake_case.
                let snake = snake_case(&k);
                let message = if snake != k && accepted.contains(&snake.as_str()) {
                    let message = format!("unknown key `{k}`; keys here are snake_case: `{snake}`");
                    misspelled.push(snake);
                    message
                } else {
                    format!("unknown key `{k}`; accepted keys: {}", accepted.join(", "))
                };
                c.error(entry.key.pos, &key_path, message)
            }
        }
    }
    Some(Fields {
        pos: node.pos,
        path: path.to_string(),
        entries: known,
        misspelled,
    })
}

/// `ipBlocks` → `ip_blocks`, `matchLabels` → `match_labels`.
pub(super) fn snake_case(key: &str) -> String {
    let mut out = String::with_capacity(key.len() + 4);
    for ch in key.chars() {
        if ch.is_ascii_uppercase() {
            out.push('_');
            out.push(ch.to_ascii_lowercase());
        } else {
            out.push(ch);
        }
    }
    out
}

impl<'a> Fields<'a> {
    pub(super) fn path(&self, key: &str) -> String {
        join(&self.path, key)
    }

    fn entry(&self, key: &str) -> Option<&'a Entry> {
        self.entries.iter().find(|(k, _)| k == key).map(|(_, e)| *e)
    }

    /// An optional key's value; `key:` with nothing after it counts as absent (the default).
    pub(super) fn get(&self, key: &str) -> Option<&'a Node> {
        self.entry(key)
            .map(|e| &e.value)
            .filter(|v| v.value != Value::Null)
    }

    /// A required key's value; a missing key is reported at the enclosing mapping.
    pub(super) fn require(&self, c: &mut Checker, key: &str) -> Option<&'a Node> {
        match self.entry(key) {
            None if self.misspelled.iter().any(|k| k == key) => None,
            None => {
                c.error(
                    self.pos,
                    &self.path(key),
                    format!("required key `{key}` is missing"),
                );
                None
            }
            Some(e) if e.value.value == Value::Null => {
                c.error(e.key.pos, &self.path(key), format!("`{key}` needs a value"));
                None
            }
            Some(e) => Some(&e.value),
        }
    }

    /// An optional key read with `read`, or `default` when absent. `None` = invalid (reported).
    pub(super) fn or_default<T>(
        &self,
        c: &mut Checker,
        key: &str,
        default: T,
        read: impl FnOnce(&mut Checker, &'a Node, &str) -> Option<T>,
    ) -> Option<T> {
        match self.get(key) {
            None => Some(default),
            Some(v) => read(c, v, &self.path(key)),
        }
    }
}

// ---- scalar readers: each reports its own problem and returns None on any ----

pub(super) fn string<'a>(c: &mut Checker, node: &'a Node, path: &str) -> Option<&'a str> {
    match &node.value {
        Value::Str(s) => Some(s),
        _ => {
            c.wrong_type(node, path, "a string");
            None
        }
    }
}

pub(super) fn integer(c: &mut Checker, node: &Node, path: &str, min: i64, max: i64) -> Option<i64> {
    match node.value {
        Value::Int(i) if (min..=max).contains(&i) => Some(i),
        Value::Int(i) => {
            c.error(node.pos, path, format!("{i} is out of range {min}..={max}"));
            None
        }
        _ => {
            c.wrong_type(node, path, "an integer");
            None
        }
    }
}

pub(super) fn usize_in(
    c: &mut Checker,
    node: &Node,
    path: &str,
    min: usize,
    max: usize,
) -> Option<usize> {
    let lo = i64::try_from(min).unwrap_or(i64::MAX);
    let hi = i64::try_from(max).unwrap_or(i64::MAX);
    integer(c, node, path, lo, hi).and_then(|i| usize::try_from(i).ok())
}

pub(super) fn port(c: &mut Checker, node: &Node, path: &str) -> Option<u16> {
    integer(c, node, path, 1, 65535).and_then(|i| u16::try_from(i).ok())
}

pub(super) fn boolean(c: &mut Checker, node: &Node, path: &str) -> Option<bool> {
    match node.value {
        Value::Bool(b) => Some(b),
        _ => {
            c.wrong_type(node, path, "true or false");
            None
        }
    }
}

pub(super) fn list<'a>(c: &mut Checker, node: &'a Node, path: &str) -> Option<&'a [Node]> {
    match &node.value {
        Value::Seq(items) => Some(items),
        _ => {
            c.wrong_type(node, path, "a list");
            None
        }
    }
}

/// A required list with at least one item.
pub(super) fn non_empty_list<'a>(
    c: &mut Checker,
    node: &'a Node,
    path: &str,
) -> Option<&'a [Node]> {
    let items = list(c, node, path)?;
    if items.is_empty() {
        c.error(node.pos, path, "must list at least one entry");
        return None;
    }
    Some(items)
}

pub(super) fn ip(c: &mut Checker, node: &Node, path: &str) -> Option<IpAddr> {
    let s = string(c, node, path)?;
    match s.parse::<IpAddr>() {
        Ok(ip) => Some(ip),
        Err(_) => {
            c.error(
                node.pos,
                path,
                format!("`{s}` is not an IPv4 or IPv6 address"),
            );
            None
        }
    }
}

/// A Kubernetes-style name (workload, namespace, service).
pub(super) fn dns_label(c: &mut Checker, node: &Node, path: &str) -> Option<String> {
    let s = string(c, node, path)?;
    if is_dns_label(s) {
        Some(s.to_string())
    } else {
        c.error(
            node.pos,
            path,
            format!(
                "`{s}` is not a DNS label: 1 to 63 lowercase letters, digits or '-', \
                 starting and ending with a letter or digit"
            ),
        );
        None
    }
}

pub(super) fn dns_name(c: &mut Checker, node: &Node, path: &str) -> Option<String> {
    let s = string(c, node, path)?;
    if is_dns_name(s) {
        Some(s.to_string())
    } else {
        c.error(
            node.pos,
            path,
            format!(
                "`{s}` is not a DNS name: dot-separated labels of lowercase letters, digits \
                 or '-', at most 253 characters"
            ),
        );
        None
    }
}

/// Where a label map is read: a workload's own labels may be empty; a selector's may not (an
/// empty selector would select everything: omit `selector` for that).
#[derive(Clone, Copy, PartialEq, Eq)]
pub(super) enum LabelMapUse {
    Workload,
    Selector,
}

/// A mapping of Kubernetes labels: keys `[prefix/]name`, string values.
pub(super) fn label_map(
    c: &mut Checker,
    node: &Node,
    path: &str,
    usage: LabelMapUse,
) -> Option<BTreeMap<String, String>> {
    let Value::Map(entries) = &node.value else {
        c.wrong_type(node, path, "a mapping of label names to values");
        return None;
    };
    if entries.is_empty() && usage == LabelMapUse::Selector {
        c.error(
            node.pos,
            path,
            "an empty selector would select every workload; omit `selector` for a policy on the \
             whole namespace",
        );
        return None;
    }
    let mut labels = BTreeMap::new();
    let mut ok = true;
    for entry in entries {
        let Some(key) = entry.key.value.key_text() else {
            c.error(entry.key.pos, path, "a label name must be a plain string");
            ok = false;
            continue;
        };
        let key_path = join(path, &key);
        if let Err(why) = label_key(&key) {
            c.error(entry.key.pos, &key_path, format!("label `{key}` {why}"));
            ok = false;
        }
        let value = match &entry.value.value {
            Value::Str(s) => s.as_str(),
            // `app:` with nothing after it: the empty value Kubernetes allows.
            Value::Null => "",
            _ => {
                c.wrong_type(&entry.value, &key_path, "a string (quote numbers: \"1\")");
                ok = false;
                continue;
            }
        };
        if !is_label_value(value) {
            c.error(
                entry.value.pos,
                &key_path,
                format!(
                    "label value `{value}` is invalid: at most 63 letters, digits, '-', '_' or \
                     '.', starting and ending with a letter or digit (or empty)"
                ),
            );
            ok = false;
        }
        labels.insert(key, value.to_string());
    }
    ok.then_some(labels)
}

/// Kubernetes label key: an optional DNS-subdomain prefix and `/`, then a name.
pub(super) fn label_key(key: &str) -> Result<(), &'static str> {
    let (prefix, name) = match key.split_once('/') {
        Some((prefix, name)) => (Some(prefix), name),
        None => (None, key),
    };
    if let Some(prefix) = prefix {
        if !is_dns_name(prefix) {
            return Err("has a prefix that is not a DNS subdomain (lowercase, dot-separated)");
        }
    }
    if name.is_empty() || !is_label_value(name) {
        return Err(
            "is invalid: a name of 1 to 63 letters, digits, '-', '_' or '.', starting \
             and ending with a letter or digit, optionally after a DNS prefix and '/'",
        );
    }
    Ok(())
}

/// A label value (or the name part of a key, when non-empty).
pub(super) fn is_label_value(s: &str) -> bool {
    let alnum = |b: u8| b.is_ascii_alphanumeric();
    s.is_empty()
        || (s.len() <= 63
            && s.bytes()
                .all(|b| alnum(b) || b == b'-' || b == b'_' || b == b'.')
            && s.bytes().next().is_some_and(alnum)
            && s.bytes().last().is_some_and(alnum))
}
