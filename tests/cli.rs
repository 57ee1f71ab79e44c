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
