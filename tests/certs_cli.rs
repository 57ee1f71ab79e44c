//! `ringtun certs`: a development CA and one certificate per workload identity, in the layout
//! `node.tls` reads; exit 64 on a bad config; the CA key is never replaced.

use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

const BIN: &str = env!("CARGO_BIN_EXE_ringtun");

fn run(args: &[&str]) -> Output {
    Command::new(BIN).args(args).output().expect("ringtun runs")
}

fn temp_dir(tag: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("ringtun-certs-cli-{tag}-{}", std::process::id()));
    let _ = fs::remove_dir_all(&dir);
    fs::create_dir_all(&dir).expect("temp dir");
    dir
}

fn mode(path: &Path) -> u32 {
    fs::metadata(path).expect("stat").permissions().mode() & 0o777
}

const CONFIG: &str = "version: 1
node:
  name: node-a
  trust_domain: example.org
  tls:
    trust_bundle: TMP/bundle.pem
    certificate_dir: TMP/certs
workloads:
  - {name: client, namespace: default, service_account: client, ips: [10.0.0.1], node: node-a}
  - {name: server, namespace: prod, service_account: server, ips: [10.0.0.2], node: node-b}
";

#[test]
fn certs_writes_ca_bundle_and_one_cert_per_identity() {
    let dir = temp_dir("layout");
    let config = dir.join("node.yaml");
    fs::write(&config, CONFIG.replace("TMP", dir.to_str().expect("utf-8"))).expect("config");
    let out = run(&["certs", "--config", config.to_str().expect("utf-8")]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_eq!(
        out.status.code(),
        Some(0),
        "{stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        stdout.contains("new development CA for example.org"),
        "{stdout}"
    );
    assert!(
        stdout.contains("spiffe://example.org/ns/prod/sa/server"),
        "{stdout}"
    );
    for (ns, sa) in [("default", "client"), ("prod", "server")] {
        let idir = dir.join("certs").join(ns).join(sa);
        assert_eq!(mode(&idir.join("key.pem")), 0o600);
        let cert = fs::read_to_string(idir.join("cert.pem")).expect("cert");
        assert!(cert.starts_with("-----BEGIN CERTIFICATE-----"));
    }
    assert_eq!(mode(&dir.join("certs/ca-key.pem")), 0o600);
    assert_eq!(
        fs::read(dir.join("bundle.pem")).expect("bundle"),
        fs::read(dir.join("certs/ca.pem")).expect("ca")
    );
    // Again: the CA is kept.
    let key = fs::read(dir.join("certs/ca-key.pem")).expect("key");
    let out = run(&[
        "certs",
        "--config",
        config.to_str().expect("utf-8"),
        "--validity",
        "1h",
    ]);
    assert_eq!(out.status.code(), Some(0));
    assert!(String::from_utf8_lossy(&out.stdout).contains("using existing CA"));
    assert!(String::from_utf8_lossy(&out.stdout).contains("valid 1h"));
    assert_eq!(fs::read(dir.join("certs/ca-key.pem")).expect("key"), key);
    let _ = fs::remove_dir_all(&dir);
}

#[test]
fn certs_exits_64_on_a_bad_config_or_no_destination() {
    let dir = temp_dir("bad");
    let config = dir.join("node.yaml");
    fs::write(
        &config,
        "version: 1\nnode:\n  name: a\n  tls: {trust_bundle: x}\n",
    )
    .expect("write");
    let out = run(&["certs", "--config", config.to_str().expect("utf-8")]);
    assert_eq!(out.status.code(), Some(64));
    assert!(String::from_utf8_lossy(&out.stderr).contains("node.tls.certificate_dir"));
    fs::write(&config, "version: 1\nnode:\n  name: a\n").expect("write");
    let out = run(&["certs", "--config", config.to_str().expect("utf-8")]);
    assert_eq!(out.status.code(), Some(64));
    assert!(String::from_utf8_lossy(&out.stderr).contains("pass --out DIR"));
    let out = run(&[
        "certs",
        "--config",
        config.to_str().expect("utf-8"),
        "--out",
        dir.join("o").to_str().expect("utf-8"),
        "--validity",
        "0s",
    ]);
    assert_eq!(out.status.code(), Some(64));
    let _ = fs::remove_dir_all(&dir);
}

#[test]
fn certs_refuses_a_certificate_that_would_outlive_its_ca() {
    let dir = temp_dir("outlive");
    let cfg = dir.join("node.yaml");
    fs::write(&cfg, CONFIG.replace("TMP", dir.to_str().unwrap())).unwrap();
    let cfg = cfg.to_str().unwrap();
    // The development CA lives a year: a 400-day certificate would outlive it.
    let out = run(&["certs", "--config", cfg, "--validity", "9600h"]);
    assert_eq!(out.status.code(), Some(64), "{out:?}");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("the CA expires") && err.contains("--validity"),
        "{err}"
    );
    assert!(
        !dir.join("certs/default/client/cert.pem").exists(),
        "a certificate was written anyway"
    );
    // Within the CA's life it works, with the same CA.
    let out = run(&["certs", "--config", cfg, "--validity", "24h"]);
    assert_eq!(out.status.code(), Some(0), "{out:?}");
    assert!(dir.join("certs/default/client/cert.pem").exists());
}

const NODE_CA_CONFIG: &str = "version: 1
node:
  name: node-a
  trust_domain: example.org
  tls:
    trust_bundle: TMP/pki/bundle.pem
    node_ca: {certificate: TMP/node/ca.pem, key: TMP/node/ca-key.pem, certificate_lifetime: 10m}
workloads:
  - {name: client, namespace: default, service_account: client, ips: [10.0.0.1], node: node-a}
";

/// In node CA mode `ringtun certs` makes the node CA (under the development CA, which lives
/// beside the trust bundle) and no workload certificate; `check-config` accepts the result,
/// and refuses — exit 64, naming the file — a node CA whose key is another's, or one outside
/// the trust bundle.
#[test]
fn certs_makes_a_node_ca_that_check_config_accepts() {
    let dir = temp_dir("node-ca");
    let config = dir.join("node.yaml");
    fs::write(
        &config,
        NODE_CA_CONFIG.replace("TMP", dir.to_str().expect("utf-8")),
    )
    .expect("config");
    let config = config.to_str().expect("utf-8");
    // Before the files exist: each missing one is named.
    let out = run(&["check-config", config]);
    assert_eq!(out.status.code(), Some(64), "{out:?}");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("pki/bundle.pem"), "{err}");
    assert!(
        err.contains("node.tls.node_ca") && err.contains("node/ca.pem"),
        "{err}"
    );

    let out = run(&["certs", "--config", config, "--validity", "2h"]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(0), "{out:?}");
    assert!(
        stdout.contains("node CA for node node-a, valid 2h"),
        "{stdout}"
    );
    assert_eq!(mode(&dir.join("node/ca-key.pem")), 0o600);
    assert_eq!(mode(&dir.join("pki/ca-key.pem")), 0o600);
    // The node CA's file holds it and the root the bundle trusts.
    let chain = fs::read_to_string(dir.join("node/ca.pem")).expect("node CA");
    let root = fs::read_to_string(dir.join("pki/bundle.pem")).expect("bundle");
    assert_eq!(chain.matches("BEGIN CERTIFICATE").count(), 2, "{chain}");
    assert!(chain.ends_with(&root));
    assert!(
        !dir.join("pki/default").exists(),
        "no workload certificate is written"
    );
    let out = run(&["check-config", config]);
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );

    // The key of another CA.
    let node_key = fs::read(dir.join("node/ca-key.pem")).expect("key");
    fs::copy(dir.join("pki/ca-key.pem"), dir.join("node/ca-key.pem")).expect("copy");
    let out = run(&["check-config", config]);
    assert_eq!(out.status.code(), Some(64), "{out:?}");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("node/ca-key.pem: not the private key of the node CA certificate"),
        "{err}"
    );
    fs::write(dir.join("node/ca-key.pem"), node_key).expect("key back");

    // A bundle that does not hold the root the node CA chains to.
    let other = temp_dir("node-ca-other");
    let other_cfg = other.join("node.yaml");
    fs::write(
        &other_cfg,
        NODE_CA_CONFIG.replace("TMP", other.to_str().expect("utf-8")),
    )
    .expect("config");
    let out = run(&["certs", "--config", other_cfg.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(0), "{out:?}");
    fs::copy(other.join("pki/bundle.pem"), dir.join("pki/bundle.pem")).expect("copy");
    let out = run(&["check-config", config]);
    assert_eq!(out.status.code(), Some(64), "{out:?}");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("node/ca.pem: the node CA does not chain to the trust bundle"),
        "{err}"
    );
    let _ = fs::remove_dir_all(&dir);
    let _ = fs::remove_dir_all(&other);
}
