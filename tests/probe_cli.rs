//! `ringtun probe` as an operator runs it: the JSON form carries every key with the right
//! type, agrees with independent sources (`uname -r`, the kernel's ULP list after the probe
//! tried to load `tls`, kTLS keys installed by this test itself, the kernel's own rekey
//! counters, getrlimit via /proc), and the table names kTLS with its reason. The kernel matrix
//! (`tests/kernels/`) runs these on kernels with kTLS and with TLS 1.3 rekey.

use std::collections::BTreeMap;
use std::net::{Ipv4Addr, TcpListener, TcpStream};
use std::os::fd::AsRawFd;
use std::process::{Command, Stdio};

use serde_json::Value;

fn ringtun(args: &[&str]) -> (i32, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_ringtun"))
        .args(args)
        .output()
        .expect("run ringtun");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

fn probe_json() -> Value {
    let (code, stdout, stderr) = ringtun(&["probe", "--json"]);
    assert_eq!(code, 0, "stderr: {stderr}");
    serde_json::from_str(&stdout).unwrap_or_else(|e| panic!("not JSON ({e}): {stdout}"))
}

fn tls_ulp_available() -> bool {
    std::fs::read_to_string("/proc/sys/net/ipv4/tcp_available_ulp")
        .map(|s| s.split_whitespace().any(|u| u == "tls"))
        .unwrap_or(false)
}

fn assert_availability(v: &Value, what: &str) {
    assert!(v["available"].is_boolean(), "{what}.available: {v}");
    let reason = &v["reason"];
    assert!(reason.is_null() || reason.is_string(), "{what}.reason: {v}");
    if v["available"] == Value::Bool(false) {
        assert!(
            reason.is_string(),
            "{what} unavailable without a reason: {v}"
        );
    }
}

#[test]
fn json_report_has_every_key_with_its_type() {
    let r = probe_json();
    assert!(r.is_object());
    assert!(r["kernel_release"].is_string());
    assert!(r["open_files_limit"]["soft"].is_u64());
    assert!(r["open_files_limit"]["hard"].is_u64());
    assert!(r["cap_sys_resource"].is_boolean());

    let io = &r["io_uring"];
    assert!(io["available"].is_boolean());
    if io["available"] == Value::Bool(false) {
        assert!(
            io["reason"].is_string(),
            "io_uring unavailable without a reason: {io}"
        );
    }
    assert!(io["io_uring_disabled"].is_null() || io["io_uring_disabled"].is_u64());
    for op in [
        "accept",
        "accept_multishot",
        "connect",
        "poll_add",
        "poll_add_multishot",
        "poll_remove",
        "async_cancel",
        "timeout",
        "link_timeout",
        "splice",
    ] {
        assert!(
            io["opcodes"][op].is_boolean(),
            "io_uring.opcodes.{op}: {io}"
        );
    }
    let driver = r["driver"]["selected"].as_str().expect("driver.selected");
    assert!(driver == "io_uring" || driver == "epoll", "{driver}");
    assert!(r["driver"]["reason"].is_string());
    if io["available"] == Value::Bool(false) {
        assert_eq!(driver, "epoll");
    }

    assert_availability(&r["splice"], "splice");
    let k = &r["ktls"];
    assert!(k["tx"].is_boolean());
    assert!(k["rx"].is_boolean());
    for (list, direction) in [("ciphers", "tx"), ("rx_ciphers", "rx")] {
        let ciphers = k[list].as_array().expect("ktls cipher lists");
        for c in ciphers {
            let name = c.as_str().expect("cipher name");
            assert!(CIPHERS.iter().any(|c| c.name == name), "{name}");
        }
        assert_eq!(k[direction].as_bool(), Some(!ciphers.is_empty()), "{k}");
    }
    for key in ["rekey", "rekey_tx", "rekey_rx"] {
        assert!(
            ["supported", "unsupported", "unknown"].contains(&k[key].as_str().unwrap_or("")),
            "ktls.{key}: {k}"
        );
    }
    assert!(k["rekey_evidence"].is_string(), "{k}");
    assert!(k["refusals"].is_array(), "{k}");

    assert!(r["tproxy"]["available"].is_boolean());
    assert!(r["tproxy"]["ip_transparent"].is_boolean());
    assert!(r["tproxy"]["target"].is_string());
    assert!(r["original_dst"]["available"].is_boolean());
    assert_availability(&r["original_dst"]["ipv4"], "original_dst.ipv4");
    assert_availability(&r["original_dst"]["ipv6"], "original_dst.ipv6");
    assert_availability(&r["reuseport"], "reuseport");
    assert!(
        r["pipe_max_size"].is_u64(),
        "pipe_max_size: {}",
        r["pipe_max_size"]
    );
    assert!(r["pipe_user_pages_soft"].is_u64());
    assert_availability(&r["pipe_resize_1mib"], "pipe_resize_1mib");
    assert_availability(&r["so_mark"], "so_mark");
}

#[test]
fn kernel_release_is_uname_r() {
    let r = probe_json();
    let uname = Command::new("uname")
        .arg("-r")
        .output()
        .expect("run uname -r");
    let expected = String::from_utf8_lossy(&uname.stdout).trim().to_owned();
    assert_eq!(r["kernel_release"].as_str(), Some(expected.as_str()));
}

#[test]
fn open_files_limit_is_the_one_this_process_inherits() {
    // The child inherits our RLIMIT_NOFILE, which /proc/self/limits states independently.
    let limits = std::fs::read_to_string("/proc/self/limits").expect("read /proc/self/limits");
    let line = limits
        .lines()
        .find(|l| l.starts_with("Max open files"))
        .expect("Max open files line");
    let fields: Vec<&str> = line.split_whitespace().collect();
    let as_limit = |s: &str| {
        if s == "unlimited" {
            u64::MAX
        } else {
            s.parse().expect("number")
        }
    };
    let (soft, hard) = (as_limit(fields[3]), as_limit(fields[4]));
    let r = probe_json();
    assert_eq!(r["open_files_limit"]["soft"].as_u64(), Some(soft));
    assert_eq!(r["open_files_limit"]["hard"].as_u64(), Some(hard));
}

#[test]
fn ktls_agrees_with_the_kernels_ulp_list() {
    let r = probe_json();
    // The probe's TCP_ULP "tls" attempt loads the module when one exists, so afterwards the
    // kernel's own list of available ULPs is an independent oracle.
    let oracle = tls_ulp_available();
    assert_eq!(
        r["ktls"]["tx"].as_bool(),
        Some(oracle),
        "ktls: {}",
        r["ktls"]
    );
    if !oracle {
        assert_eq!(r["ktls"]["rx"].as_bool(), Some(false));
        assert_eq!(r["ktls"]["ciphers"].as_array().map(Vec::len), Some(0));
        let reason = r["ktls"]["reason"]
            .as_str()
            .expect("kTLS unavailable needs a reason");
        assert!(reason.contains("kTLS"), "{reason}");
    }
}

/// A TLS 1.3 cipher as linux/tls.h describes it, for this test's own key installs.
struct Cipher {
    name: &'static str,
    /// `TLS_CIPHER_*`.
    kind: u16,
    iv: usize,
    key: usize,
    salt: usize,
}

const CIPHERS: [Cipher; 3] = [
    Cipher {
        name: "aes_128_gcm",
        kind: 51,
        iv: 8,
        key: 16,
        salt: 4,
    },
    Cipher {
        name: "aes_256_gcm",
        kind: 52,
        iv: 8,
        key: 32,
        salt: 4,
    },
    Cipher {
        name: "chacha20_poly1305",
        kind: 54,
        iv: 12,
        key: 32,
        salt: 0,
    },
];

/// `struct tls12_crypto_info_*` for TLS 1.3 (0x0304): the header, then iv, key, salt and an
/// 8-byte record sequence, all zero.
fn crypto_info(c: &Cipher) -> Vec<u8> {
    let mut info = Vec::new();
    info.extend_from_slice(&0x0304u16.to_ne_bytes());
    info.extend_from_slice(&c.kind.to_ne_bytes());
    info.resize(4 + c.iv + c.key + c.salt + 8, 0);
    info
}

fn setsockopt(fd: &impl AsRawFd, level: i32, name: i32, value: &[u8]) -> Result<(), i32> {
    // SAFETY: `value` is a live buffer of exactly the length passed; the kernel only reads it.
    let rc = unsafe {
        libc::setsockopt(
            fd.as_raw_fd(),
            level,
            name,
            value.as_ptr().cast(),
            value.len() as libc::socklen_t,
        )
    };
    if rc == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error().raw_os_error().unwrap_or(0))
    }
}

/// Whether this kernel takes `c` for `TLS_TX` (1) or `TLS_RX` (2), asked with a key install of
/// this test's own on a fresh loopback connection.
fn kernel_takes(c: &Cipher, direction: i32) -> bool {
    let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).expect("bind");
    let sock = TcpStream::connect(listener.local_addr().unwrap()).expect("connect");
    let _peer = listener.accept().expect("accept");
    setsockopt(&sock, libc::SOL_TCP, libc::TCP_ULP, b"tls").is_ok()
        && setsockopt(&sock, libc::SOL_TLS, direction, &crypto_info(c)).is_ok()
}

#[test]
fn ktls_ciphers_per_direction_match_our_own_key_installs() {
    // The probe runs first: as root it loads the tls module where the kernel has one.
    let r = probe_json();
    for (list, direction) in [("ciphers", 1), ("rx_ciphers", 2)] {
        let probed: Vec<&str> = r["ktls"][list]
            .as_array()
            .unwrap()
            .iter()
            .filter_map(Value::as_str)
            .collect();
        let ours: Vec<&str> = CIPHERS
            .iter()
            .filter(|c| kernel_takes(c, direction))
            .map(|c| c.name)
            .collect();
        assert_eq!(probed, ours, "ktls.{list}: {}", r["ktls"]);
    }
}

/// The kernel's kTLS counters in this process's network namespace; `None` without kTLS.
fn tls_stat() -> Option<BTreeMap<String, u64>> {
    let text = std::fs::read_to_string("/proc/self/net/tls_stat").ok()?;
    Some(
        text.lines()
            .filter_map(|l| {
                let mut it = l.split_whitespace();
                Some((it.next()?.to_owned(), it.next()?.parse().ok()?))
            })
            .collect(),
    )
}

/// Kernels that can rekey TLS 1.3 (6.14+) count it in `/proc/net/tls_stat` (the rows came with
/// the feature); the probe, run in this namespace, must say so and its attempt must show in
/// those counters. Older kernels have no such rows, and the probe must say unsupported.
#[test]
fn ktls_rekey_agrees_with_the_kernels_own_counters() {
    let before = tls_stat();
    let r = probe_json();
    let k = &r["ktls"];
    let said = (
        k["rekey"].as_str().unwrap_or(""),
        k["rekey_tx"].as_str().unwrap_or(""),
        k["rekey_rx"].as_str().unwrap_or(""),
    );
    let Some(after) = tls_stat() else {
        assert_eq!(said, ("unsupported", "unsupported", "unsupported"), "{k}");
        return;
    };
    if after.contains_key("TlsTxRekeyOk") {
        assert_eq!(said, ("supported", "supported", "supported"), "{k}");
        let grew = |c: &str| {
            let was = before.as_ref().and_then(|b| b.get(c)).copied().unwrap_or(0);
            after.get(c).copied().unwrap_or(0).saturating_sub(was)
        };
        for counter in ["TlsTxRekeyOk", "TlsRxRekeyOk", "TlsRxRekeyReceived"] {
            assert!(grew(counter) >= 1, "{counter} did not grow: {after:?}; {k}");
        }
    } else {
        assert_eq!(said, ("unsupported", "unsupported", "unsupported"), "{k}");
        let evidence = k["rekey_evidence"].as_str().unwrap_or("");
        assert!(evidence.contains("EBUSY"), "{evidence}");
    }
}

#[test]
fn table_names_ktls_and_its_reason() {
    let (code, table, stderr) = ringtun(&["probe"]);
    assert_eq!(code, 0, "stderr: {stderr}");
    assert!(table.contains("kTLS TX"), "{table}");
    assert!(table.contains("kTLS RX"), "{table}");
    assert!(table.contains("io_uring"), "{table}");
    let r = probe_json();
    if let Some(reason) = r["ktls"]["reason"].as_str() {
        let line = table
            .lines()
            .find(|l| l.starts_with("kTLS TX"))
            .expect("kTLS TX row");
        assert!(
            line.contains(reason),
            "kTLS row lacks its reason {reason:?}: {line}"
        );
        assert!(
            line.contains("fallback:") || line.contains("unavailable:"),
            "{line}"
        );
    }
    // Every degraded row says why: nothing ends in a bare "fallback:" or "unavailable:".
    for line in table.lines() {
        let t = line.trim_end();
        assert!(
            !t.ends_with("fallback:") && !t.ends_with("unavailable:"),
            "{line}"
        );
    }
}

#[test]
fn closed_stdout_is_exit_1_not_a_panic() {
    // `ringtun probe | head -c0`: the reader is gone before the report is written. The read
    // end is closed before ringtun even starts: dropping it after spawn raced the probe, which
    // on a busy host could finish and fill the pipe first (exit 0; seen in CI).
    let (read, write) = nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC).expect("pipe");
    drop(read);
    let child = Command::new(env!("CARGO_BIN_EXE_ringtun"))
        .arg("probe")
        .stdout(Stdio::from(write))
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn ringtun");
    let out = child.wait_with_output().expect("wait for ringtun");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!stderr.contains("panicked"), "{stderr}");
    assert_eq!(out.status.code(), Some(1), "{stderr}");
}
