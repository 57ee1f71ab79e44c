//! YAML text → a raw tree of [`Node`]s that remember where they came from (1-based line and
//! column). This layer knows YAML, not ringtun: it resolves scalars with the YAML 1.2 core schema
//! (so `0x539` is an integer and `"0x539"` a string) and reports a syntax error as one
//! [`ConfigError`] with its position. Everything about what the keys mean is in `validate.rs`.

use saphyr::{LoadableYamlNode, MarkedYaml, Scalar, YamlData};

use super::ConfigError;

/// Path shown for problems that belong to the file as a whole rather than to one key.
pub(super) const DOCUMENT_PATH: &str = "(document)";

/// Flow collections nested deeper than this are refused before saphyr sees them: its nodes are
/// dropped recursively, so a hostile `[[[[…` could otherwise overflow the stack. No real config
/// nests more than a handful of levels.
const MAX_FLOW_NESTING: usize = 64;

/// A 1-based position in the source text; `0:0` means "the file as a whole".
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Default)]
pub(super) struct Pos {
    pub line: usize,
    pub column: usize,
}

/// One YAML node and the place it starts.
#[derive(Debug, Clone, PartialEq)]
pub(super) struct Node {
    pub pos: Pos,
    pub value: Value,
}

/// A mapping entry; the key keeps its own position so an unknown key can be pointed at.
#[derive(Debug, Clone, PartialEq)]
pub(super) struct Entry {
    pub key: Node,
    pub value: Node,
}

#[derive(Debug, Clone, PartialEq)]
pub(super) enum Value {
    Null,
    Bool(bool),
    Int(i64),
    Float(f64),
    Str(String),
    Seq(Vec<Node>),
    /// Entries in file order.
    Map(Vec<Entry>),
    /// A scalar whose explicit tag it cannot satisfy (`!!int abc`) or an unresolvable alias.
    Invalid,
}

impl Value {
    /// How a value is named in a "wrong type" message: the kind, and for scalars the value too.
    pub fn describe(&self) -> String {
        match self {
            Value::Null => "nothing (null)".to_string(),
            Value::Bool(b) => format!("boolean {b}"),
            Value::Int(i) => format!("integer {i}"),
            Value::Float(f) => format!("number {f}"),
            Value::Str(s) => format!("string {s:?}"),
            Value::Seq(_) => "a list".to_string(),
            Value::Map(_) => "a mapping".to_string(),
            Value::Invalid => "a value that does not match its tag".to_string(),
        }
    }

    /// The text of a scalar key (`80:` is an integer key but still names something).
    pub fn key_text(&self) -> Option<String> {
        match self {
            Value::Str(s) => Some(s.clone()),
            Value::Int(i) => Some(i.to_string()),
            Value::Bool(b) => Some(b.to_string()),
            Value::Float(f) => Some(f.to_string()),
            Value::Null => Some("null".to_string()),
            Value::Seq(_) | Value::Map(_) | Value::Invalid => None,
        }
    }
}

/// Parses `text` as exactly one YAML document.
pub(super) fn parse(text: &str) -> Result<Node, ConfigError> {
    if let Some(pos) = too_deep(text) {
        return Err(ConfigError {
            line: pos.line,
            column: pos.column,
            path: DOCUMENT_PATH.to_string(),
            message: format!("YAML nested more than {MAX_FLOW_NESTING} levels deep"),
        });
    }
    let docs = MarkedYaml::load_from_str(text).map_err(|e| {
        let m = e.marker();
        ConfigError {
            line: m.line(),
            column: m.col() + 1,
            path: DOCUMENT_PATH.to_string(),
            // saphyr reports a repeated key as a scan error; say it in the operator's terms.
            message: if e.info().contains("duplicated key") {
                "this key appears twice in the same mapping".to_string()
            } else {
                format!("YAML syntax error: {}", e.info())
            },
        }
    })?;
    let mut docs = docs.into_iter();
    let Some(first) = docs.next() else {
        return Err(ConfigError {
            line: 0,
            column: 0,
            path: DOCUMENT_PATH.to_string(),
            message: "the file is empty; it needs at least `version: 1` and `node.name`"
                .to_string(),
        });
    };
    if let Some(second) = docs.next() {
        let pos = pos_of(&second);
        return Err(ConfigError {
            line: pos.line,
            column: pos.column,
            path: DOCUMENT_PATH.to_string(),
            message: "more than one YAML document (`---`); the config is a single document"
                .to_string(),
        });
    }
    Ok(convert(&first))
}

fn pos_of(node: &MarkedYaml<'_>) -> Pos {
    let start = node.span.start;
    Pos {
        line: start.line(),
        column: start.col() + 1,
    }
}

fn convert(node: &MarkedYaml<'_>) -> Node {
    let pos = pos_of(node);
    let value = match &node.data {
        YamlData::Value(s) => match s {
            Scalar::Null => Value::Null,
            Scalar::Boolean(b) => Value::Bool(*b),
            Scalar::Integer(i) => Value::Int(*i),
            Scalar::FloatingPoint(f) => Value::Float(f.0),
            Scalar::String(s) => Value::Str(s.to_string()),
        },
        // The loader resolves scalars eagerly, so a bare representation only appears if that
        // ever changes; resolving it here keeps the tree correct either way.
        YamlData::Representation(text, _, _) => {
            return convert(&MarkedYaml {
                span: node.span,
                data: YamlData::Value(Scalar::parse_from_cow(text.clone())),
            })
        }
        YamlData::Sequence(items) => Value::Seq(items.iter().map(convert).collect()),
        YamlData::Mapping(map) => Value::Map(
            map.iter()
                .map(|(k, v)| Entry {
                    key: convert(k),
                    value: convert(v),
                })
                .collect(),
        ),
        // Application tags (`!foo`) carry no meaning for ringtun: judge the value underneath.
        YamlData::Tagged(_, inner) => {
            let mut n = convert(inner);
            n.pos = pos;
            return n;
        }
        YamlData::Alias(_) | YamlData::BadValue => Value::Invalid,
    };
    Node { pos, value }
}

/// Where flow nesting (`[`, `{`) first exceeds the limit, counted naively (brackets inside
/// quotes or comments count too, which can only make a pathological file fail earlier).
fn too_deep(text: &str) -> Option<Pos> {
    let mut depth = 0usize;
    let (mut line, mut column) = (1usize, 0usize);
    for c in text.chars() {
        column += 1;
        match c {
            '\n' => {
                line += 1;
                column = 0;
            }
            '[' | '{' => {
                depth += 1;
                if depth > MAX_FLOW_NESTING {
                    return Some(Pos { line, column });
                }
            }
            ']' | '}' => depth = depth.saturating_sub(1),
            _ => {}
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    fn map_entries(n: &Node) -> &[Entry] {
        match &n.value {
            Value::Map(e) => e,
            other => panic!("expected a mapping, got {other:?}"),
        }
    }

    #[test]
    fn nodes_carry_one_based_line_and_column() {
        let root = parse("version: 1\nnode:\n  name: a\n  ips: [x, \"y\"]\n").expect("parses");
        assert_eq!(root.pos, Pos { line: 1, column: 1 });
        let top = map_entries(&root);
        assert_eq!(top[0].key.pos, Pos { line: 1, column: 1 });
        assert_eq!(
            top[0].value,
            Node {
                pos: Pos {
                    line: 1,
                    column: 10
                },
                value: Value::Int(1)
            }
        );
        let node = &top[1].value;
        assert_eq!(node.pos, Pos { line: 3, column: 3 });
        let inner = map_entries(node);
        assert_eq!(inner[0].value.pos, Pos { line: 3, column: 9 });
        let Value::Seq(ips) = &inner[1].value.value else {
            panic!("ips is a list")
        };
        assert_eq!(ips[0].pos, Pos { line: 4, column: 9 });
        assert_eq!(
            ips[1].pos,
            Pos {
                line: 4,
                column: 12
            }
        );
        assert_eq!(ips[1].value, Value::Str("y".into()));
    }

    #[test]
    fn hex_is_an_integer_but_quoted_hex_is_a_string() {
        let root = parse("a: 0x539\nb: \"0x539\"\n").expect("parses");
        let e = map_entries(&root);
        assert_eq!(e[0].value.value, Value::Int(0x539));
        assert_eq!(e[1].value.value, Value::Str("0x539".into()));
    }

    #[test]
    fn syntax_error_has_its_position() {
        let err = parse("version: 1\nnode:\n  name: [a, b\n").expect_err("unclosed list");
        assert_eq!(err.path, DOCUMENT_PATH);
        assert!(
            err.message.starts_with("YAML syntax error"),
            "{}",
            err.message
        );
        assert!(err.line >= 3, "{err}");
    }

    #[test]
    fn duplicate_key_is_a_syntax_error() {
        let err = parse("a: 1\nb: 2\na: 3\n").expect_err("duplicate key");
        assert!(err.message.contains("appears twice"), "{}", err.message);
        assert_eq!(err.line, 3, "{err}");
    }

    #[test]
    fn empty_and_multi_document_files_are_refused() {
        assert_eq!(parse("").expect_err("empty").line, 0);
        assert_eq!(parse("# only a comment\n").expect_err("empty").line, 0);
        let err = parse("a: 1\n---\nb: 2\n").expect_err("two docs");
        assert!(err.message.contains("more than one"), "{}", err.message);
    }

    #[test]
    fn deep_flow_nesting_is_refused_without_overflowing() {
        let text = "[".repeat(100_000);
        let err = parse(&text).expect_err("too deep");
        assert!(err.message.contains("nested"), "{}", err.message);
    }
}
