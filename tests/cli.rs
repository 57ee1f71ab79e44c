//! The command line as a user meets it: exit codes and the messages they read.

use std::process::{Command, Output};

const BIN: &str = env!("CARGO_BIN_EXE_ringtun");

fn ringtun(args: &[&str]) -> Output {
    Command::new(BIN).args(args).output().expect("ringtun runs")
}

fn scratch(name: &str, text: &str) -> std::path::PathBuf {
    let dir = std::env::temp_dir().join(format!("ringtun-cli-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let p = dir.join(name);
    std::fs::write(&p, text).unwrap();
    p
}

#[test]
fn check_config_prints_every_error_with_its_place_and_exits_64() {
    let bad = "version: 1\nnode:\n  name: node-a\n  colour: blue\n  timeouts:\n    idle: forever\nworkloads:\n  - name: a\n    namespace: default\n    ips: [10.0.0.1]\n    node: node-a\n  - name: b\n    namespace: default\n    ips: [10.0.0.1, not-an-ip]\n    node: node-a\n";
    let path = scratch("bad.yaml", bad);
    let out = ringtun(&["check-config", path.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(64));
    let err = String::from_utf8_lossy(&out.stderr);
    let file = path.display().to_string();
    // Unknown key, bad duration, duplicate IP, bad IP, two host-mode workloads: all at once.
    for (line, needle) in [
        (4, "colour"),
        (6, "idle"),
        (14, "10.0.0.1"),
        (14, "not-an-ip"),
    ] {
        assert!(
            err.lines()
                .any(|l| l.starts_with(&format!("{file}:{line}:")) && l.contains(needle)),
            "no error at line {line} mentioning {needle}:\n{err}"
        );
    }
    assert!(err.contains("error(s)"), "{err}");
}

#[test]
fn check_config_warns_about_rules_l4_cannot_enforce_and_still_exits_0() {
    let text = "version: 1
node:
  name: node-a
policies:
  - name: get-only
    namespace: default
    rules:
      - to: [{operation: {methods: [GET]}}]
      - from: [{source: {namespaces: [default]}}]
  - name: no-admin
    namespace: default
    action: DENY
    rules:
      - when: [{key: 'request.headers[x-admin]', values: [\"1\"]}]
";
    let path = scratch("l7.yaml", text);
    let out = ringtun(&["check-config", path.to_str().unwrap()]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(0), "{err}");
    let file = path.display().to_string();
    let lines: Vec<&str> = err.lines().collect();
    assert_eq!(
        lines.len(),
        2,
        "one warning per rule that names L7 attributes:\n{err}"
    );
    assert!(
        lines[0].starts_with(&format!("{file}:8:9: policies[0].rules[0]: warning: "))
            && lines[0].contains("to[0].operation.methods")
            && lines[0].contains("ALLOW policy the rule matches no connection"),
        "{}",
        lines[0]
    );
    assert!(
        lines[1].starts_with(&format!("{file}:14:9: policies[1].rules[0]: warning: "))
            && lines[1].contains("request.headers[x-admin]")
            && lines[1].contains("DENY policy the rule matches every connection (fail closed)"),
        "{}",
        lines[1]
    );
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(stdout.contains("2 policies, 2 warning(s)"), "{stdout}");
}

#[test]
fn check_config_reports_policy_errors_with_their_place() {
    let text = "version: 1
node:
  name: node-a
policies:
  - name: p
    namespace: default
    rules:
      - from: [{source: {principals: [spiffe://cluster.local/ns/a/sa/b], ipBlocks: [10.0.0.0/8]}}]
        to: [{operation: {ports: [70000]}}]
";
    let path = scratch("policy-errors.yaml", text);
    let out = ringtun(&["check-config", path.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(64));
    let err = String::from_utf8_lossy(&out.stderr);
    let file = path.display().to_string();
    for (place, needle) in [
        (
            ":8:39: policies[0].rules[0].from[0].source.principals[0]: ",
            "leave it out",
        ),
        (
            ":8:74: policies[0].rules[0].from[0].source.ipBlocks: ",
            "snake_case: `ip_blocks`",
        ),
        (
            ":9:35: policies[0].rules[0].to[0].operation.ports[0]: ",
            "not a port",
        ),
    ] {
        assert!(
            err.lines()
                .any(|l| l.starts_with(&format!("{file}{place}")) && l.contains(needle)),
            "no `{place}` error mentioning {needle}:\n{err}"
        );
    }
    assert!(err.contains("3 error(s)"), "{err}");
}

#[test]
fn default_config_is_valid() {
    let out = ringtun(&["print-default-config"]);
    assert!(out.status.success());
    let text = String::from_utf8(out.stdout).unwrap();
    assert!(
        text.contains("version: 1") && text.contains('#'),
        "commented example expected"
    );
    let path = scratch("default.yaml", &text);
    let out = ringtun(&["check-config", path.to_str().unwrap()]);
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn run_refuses_an_invalid_config_with_64_before_serving() {
    let path = scratch("run-bad.yaml", "version: 2\n");
    let out = ringtun(&["run", "--config", path.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(64));
    assert!(String::from_utf8_lossy(&out.stderr).contains("not starting"));
}

#[test]
fn demo_without_root_says_so_in_one_line_and_fails() {
    let out = if nix::unistd::geteuid().is_root() {
        Command::new("setpriv")
            .args([
                "--reuid=65534",
                "--regid=65534",
                "--clear-groups",
                BIN,
                "demo",
            ])
            .output()
            .expect("setpriv runs")
    } else {
        ringtun(&["demo"])
    };
    assert_eq!(out.status.code(), Some(77));
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(err.lines().count(), 1, "one clear line expected:\n{err}");
    assert!(err.contains("needs root"), "{err}");
}

#[test]
fn unknown_arguments_are_a_usage_error() {
    let out = ringtun(&["run", "--no-such-flag"]);
    assert_eq!(out.status.code(), Some(64));
}
