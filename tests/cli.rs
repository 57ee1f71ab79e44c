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

#[test]
fn reactors_flag_is_checked_like_the_config_key() {
    let path = scratch("reactors.yaml", "version: 1\nnode:\n  name: node-a\n");
    for bad in ["0", "257", "-1", "many"] {
        let flag = format!("--reactors={bad}");
        let out = ringtun(&["run", "--config", path.to_str().unwrap(), &flag]);
        assert_eq!(out.status.code(), Some(64), "--reactors {bad}: {out:?}");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains("--reactors"), "{err}");
    }
}

/// A config whose `node.tls` names files that are not there (or a local workload without a
/// certificate): `check-config` says so with the paths and exits 64, and `run` refuses the
/// same with 64, before it binds anything.
#[test]
fn files_the_config_names_are_checked_by_check_config_and_run() {
    let dir = std::env::temp_dir().join(format!("ringtun-cli-tls-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let text = format!(
        "version: 1\nnode:\n  name: node-a\n  admin: off\n  metrics: off\n  readiness: off\n  tls:\n    trust_bundle: {d}/missing-ca.pem\n    certificate_dir: {d}/no-such-dir\nworkloads:\n  - {{name: a, namespace: default, service_account: a, ips: [10.0.0.1], node: node-a, netns: pod-a}}\n",
        d = dir.display()
    );
    let path = scratch("tls-missing.yaml", &text);
    let p = path.to_str().unwrap();
    for args in [vec!["check-config", p], vec!["run", "--config", p]] {
        let out = ringtun(&args);
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(64), "{args:?}: {err}");
        for needle in [
            "node.tls.trust_bundle",
            "missing-ca.pem",
            "node.tls.certificate_dir",
            "workload default/a: no usable certificate",
        ] {
            assert!(err.contains(needle), "{args:?}: no `{needle}` in:\n{err}");
        }
    }
    // With certificates for every identity but one local workload's, that one is named.
    let certs_cfg = scratch(
        "tls-certs.yaml",
        &text
            .replace("missing-ca.pem", "certs/ca.pem")
            .replace("no-such-dir", "certs"),
    );
    let out = ringtun(&["certs", "--config", certs_cfg.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(0), "{out:?}");
    let with_b = std::fs::read_to_string(&certs_cfg).unwrap()
        + "  - {name: b, namespace: prod, service_account: b, ips: [10.0.0.2], node: node-a, netns: pod-b}\n";
    let path = scratch("tls-one-missing.yaml", &with_b);
    let out = ringtun(&["check-config", path.to_str().unwrap()]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(64), "{err}");
    assert!(
        err.contains("workload prod/b: no usable certificate"),
        "{err}"
    );
    assert!(!err.contains("default/a"), "{err}");
    let out = ringtun(&["check-config", certs_cfg.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(0), "{out:?}");
}

/// An expired local certificate is a warning, not a refusal: `run` would start (every other
/// workload is served, and a rewritten certificate is taken without a restart), so
/// `check-config` exits 0 and names the certificate, its serial and why it is unusable.
#[test]
fn an_expired_certificate_is_a_check_config_warning() {
    use ringtun::control_plane::certs::{identity_dir, DevCa, CA_CERT_FILE, CA_KEY_FILE};
    use ringtun::control_plane::identity::SpiffeId;
    use std::time::{Duration, SystemTime};

    let dir = std::env::temp_dir().join(format!("ringtun-cli-expired-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let certs = dir.join("certs");
    let text = format!(
        "version: 1\nnode:\n  name: node-a\n  admin: off\n  metrics: off\n  readiness: off\n  tls:\n    trust_bundle: {d}/ca.pem\n    certificate_dir: {d}\nworkloads:\n  - {{name: a, namespace: default, service_account: a, ips: [10.0.0.1], node: node-a, netns: pod-a}}\n  - {{name: b, namespace: default, service_account: b, ips: [10.0.0.2], node: node-a, netns: pod-b}}\n",
        d = certs.display()
    );
    let path = scratch("tls-expired.yaml", &text);
    let p = path.to_str().unwrap();
    let out = ringtun(&["certs", "--config", p]);
    assert_eq!(out.status.code(), Some(0), "{out:?}");
    let out = ringtun(&["check-config", p]);
    assert_eq!(out.status.code(), Some(0), "{out:?}");
    assert!(
        !String::from_utf8_lossy(&out.stderr).contains("warning"),
        "{out:?}"
    );

    // Workload a's certificate, from the same CA, ended an hour ago.
    let read = |f: &str| std::fs::read_to_string(certs.join(f)).unwrap();
    let ca = DevCa::from_pem(&read(CA_CERT_FILE), &read(CA_KEY_FILE)).unwrap();
    let id = SpiffeId::new("cluster.local", "default", "a").unwrap();
    let hour = Duration::from_secs(3600);
    let issued = ca.issue(&id, SystemTime::now() - 2 * hour, hour).unwrap();
    let a = identity_dir(&certs, &id);
    std::fs::write(a.join("cert.pem"), &issued.cert_pem).unwrap();
    std::fs::write(a.join("key.pem"), &issued.key_pem).unwrap();
    let serial = x509_parser::parse_x509_certificate(issued.cert_der.as_ref())
        .unwrap()
        .1
        .raw_serial_as_string();

    let out = ringtun(&["check-config", p]);
    let err = String::from_utf8_lossy(&out.stderr);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(0), "{err}");
    let warnings: Vec<&str> = err.lines().filter(|l| l.contains("warning")).collect();
    assert_eq!(warnings.len(), 1, "{err}");
    for needle in [
        "warning: the certificate of spiffe://cluster.local/ns/default/sa/a",
        serial.as_str(),
        "is expired",
        "refused until it is replaced",
    ] {
        assert!(warnings[0].contains(needle), "no `{needle}` in:\n{err}");
    }
    assert!(stdout.contains("1 warning(s)"), "{stdout}");
    let _ = std::fs::remove_dir_all(&dir);
}

/// Unprivileged, a host-mode node cannot open its transparent listeners: that is a start
/// failure with exit 77 and the reason, never "ready".
#[test]
fn run_without_the_privilege_exits_77() {
    if !ringtun::testbed::is_root() || Command::new("setpriv").arg("--version").output().is_err() {
        eprintln!("SKIPPED (needs root and setpriv to drop privileges): run_without_the_privilege_exits_77");
        return;
    }
    let text = "version: 1\nnode:\n  name: node-a\n  admin: off\n  metrics: off\n  readiness: 127.0.0.1:0\nworkloads:\n  - {name: host, namespace: default, ips: [10.0.0.1], node: node-a}\n";
    let path = scratch("unprivileged.yaml", text);
    let dir = path.parent().unwrap();
    let _ = Command::new("chmod").arg("755").arg(dir).status();
    let _ = Command::new("chmod").arg("644").arg(&path).status();
    let out = Command::new("setpriv")
        .args([
            "--reuid=65534",
            "--regid=65534",
            "--clear-groups",
            "--inh-caps=-all",
        ])
        .arg(BIN)
        .args(["run", "--config", path.to_str().unwrap()])
        .output()
        .expect("setpriv runs");
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(77), "{err}");
    assert!(
        err.contains("cannot start") && err.contains("not permitted"),
        "{err}"
    );
    assert!(!err.contains("ready:"), "{err}");
}
