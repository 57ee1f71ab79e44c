//! Replays every committed fuzz corpus entry (`fuzz/corpus/<target>/*`) through the same
//! target bodies the fuzzer runs (`ringtun::fuzzing`): a crash the fuzzer once found, minimised
//! and committed with its fix, fails the ordinary test suite if it ever comes back, and the
//! seeds keep working as inputs. `cargo test --test fuzz_corpus -- --ignored write_seeds`
//! rewrites the seed files from the encoders below.

use std::path::{Path, PathBuf};

use hbone_proto::hpack::{Encoder, Field};
use hbone_proto::{ConnectRequest, PREFACE};
use ringtun::fuzzing::TARGETS;

fn corpus_dir(target: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("fuzz/corpus")
        .join(target)
}

#[test]
fn every_corpus_entry_runs_clean() {
    for (name, run) in TARGETS {
        let dir = corpus_dir(name);
        let mut entries: Vec<PathBuf> = std::fs::read_dir(&dir)
            .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
            .map(|e| e.expect("corpus entry").path())
            .collect();
        entries.sort();
        assert!(
            entries.len() >= 3,
            "{name}: the seed corpus has {} entries",
            entries.len()
        );
        for path in entries {
            let data = std::fs::read(&path).expect("corpus file");
            let outcome = std::panic::catch_unwind(|| run(&data));
            assert!(outcome.is_ok(), "{name}: {} panics", path.display());
        }
    }
}

#[test]
fn seeds_match_the_encoders() {
    for (target, name, data) in seeds() {
        let path = corpus_dir(target).join(name);
        let on_disk = std::fs::read(&path).unwrap_or_default();
        assert!(
            on_disk == data,
            "{} is out of date: run `cargo test --test fuzz_corpus -- --ignored write_seeds`",
            path.display()
        );
    }
}

#[test]
#[ignore = "rewrites fuzz/corpus seed files"]
fn write_seeds() {
    for (target, name, data) in seeds() {
        let dir = corpus_dir(target);
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join(name), data).unwrap();
    }
}

/// A frame: 9-byte header, then the payload.
fn frame(kind: u8, flags: u8, stream: u32, payload: &[u8]) -> Vec<u8> {
    let len = payload.len() as u32;
    let mut out = vec![(len >> 16) as u8, (len >> 8) as u8, len as u8, kind, flags];
    out.extend_from_slice(&stream.to_be_bytes());
    out.extend_from_slice(payload);
    out
}

fn block(fields: &[Field]) -> Vec<u8> {
    let mut out = Vec::new();
    Encoder::new().encode(fields, &mut out);
    out
}

fn connect_block() -> Vec<u8> {
    let mut req = ConnectRequest::new("10.1.1.2:8080".parse().unwrap());
    req.forwarded = Some("for=\"10.1.2.9\"".into());
    block(&req.to_fields())
}

const DATA: u8 = 0;
const HEADERS: u8 = 1;
const RST_STREAM: u8 = 3;
const SETTINGS: u8 = 4;
const PUSH_PROMISE: u8 = 5;
const PING: u8 = 6;
const GOAWAY: u8 = 7;
const WINDOW_UPDATE: u8 = 8;
const CONTINUATION: u8 = 9;
const END_STREAM: u8 = 1;
const END_HEADERS: u8 = 4;
const PADDED: u8 = 8;

/// (target, file name, bytes) of every seed.
fn seeds() -> Vec<(&'static str, &'static str, Vec<u8>)> {
    let mut out = Vec::new();
    let session = |mode: u8, chunk: u8, wire: Vec<u8>| {
        let mut v = vec![mode, chunk];
        v.extend(wire);
        v
    };
    // A server's whole exchange: CONNECT, payload, END_STREAM, PING, credit, reset, GOAWAY.
    let mut server = frame(HEADERS, END_HEADERS, 1, &connect_block());
    server.extend(frame(DATA, 0, 1, b"hello"));
    server.extend(frame(DATA, END_STREAM | PADDED, 1, b"\x03abc\0\0\0"));
    server.extend(frame(PING, 0, 0, &[1, 2, 3, 4, 5, 6, 7, 8]));
    server.extend(frame(WINDOW_UPDATE, 0, 0, &1000u32.to_be_bytes()));
    server.extend(frame(HEADERS, END_HEADERS, 3, &connect_block()));
    server.extend(frame(RST_STREAM, 0, 3, &8u32.to_be_bytes()));
    server.extend(frame(GOAWAY, 0, 0, &[0, 0, 0, 3, 0, 0, 0, 0]));
    out.push((
        "session_input",
        "server-exchange",
        session(2, 7, server.clone()),
    ));
    out.push((
        "session_input",
        "server-exchange-taken",
        session(6, 64, server),
    ));
    let mut raw = PREFACE.to_vec();
    raw.extend(frame(SETTINGS, 0, 0, &[0, 4, 0, 0x40, 0, 0]));
    let cb = connect_block();
    let (first, rest) = cb.split_at(cb.len() / 2);
    raw.extend(frame(HEADERS, 0, 1, first));
    raw.extend(frame(CONTINUATION, END_HEADERS, 1, rest));
    raw.extend(frame(DATA, 0, 1, &[0x55; 300]));
    out.push((
        "session_input",
        "server-preface-continuation",
        session(0, 1, raw),
    ));
    let mut client = frame(SETTINGS, 0, 0, &[0, 3, 0, 0, 0, 100]);
    client.extend(frame(
        HEADERS,
        END_HEADERS,
        1,
        &block(&[Field::new(":status", "200")]),
    ));
    client.extend(frame(DATA, 0, 1, b"response bytes"));
    client.extend(frame(DATA, END_STREAM, 1, b""));
    out.push(("session_input", "client-response", session(1, 16, client)));
    let mut errors = frame(PUSH_PROMISE, END_HEADERS, 1, &[0, 0, 0, 2]);
    errors.extend(frame(CONTINUATION, END_HEADERS, 5, b""));
    out.push((
        "session_input",
        "server-push-promise",
        session(2, 255, errors),
    ));

    out.push(("hpack_decode", "connect", connect_block()));
    // Literal with incremental indexing (new name), then that entry by index, a Huffman
    // string, then a table size update (illegal after a field).
    let mut hp = vec![0x40, 0x03];
    hp.extend_from_slice(b"abc");
    hp.push(0x03);
    hp.extend_from_slice(b"xyz");
    hp.push(0xbe);
    hp.extend_from_slice(&[0x04, 0x83, 0x63, 0xd5, 0xa9]);
    out.push(("hpack_decode", "indexing", hp));
    out.push((
        "hpack_decode",
        "size-update",
        vec![0x3f, 0xe1, 0x1f, 0x82, 0x3f, 0x01],
    ));

    out.push((
        "tls_records",
        "forged-header",
        vec![
            23, 3, 3, 0, 17, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16, 17,
        ],
    ));
    let mut inner = vec![0x17];
    inner.extend_from_slice(b"application data");
    inner.push(0x35);
    inner.extend_from_slice(b"padded alert");
    inner.push(0xf0);
    out.push(("tls_records", "inner-types", inner));
    out.push(("tls_records", "oversized", vec![23, 3, 3, 0xff, 0xff, 0]));

    out.push((
        "config_load",
        "default",
        ringtun::control_plane::config::DEFAULT_CONFIG_YAML
            .as_bytes()
            .to_vec(),
    ));
    out.push((
        "config_load",
        "errors",
        b"version: 1\nnode:\n  name: n\n  reactors: 0\n  colour: blue\n  timeouts: {idle: forever}\nworkloads:\n  - name: w\n    ips: [10.0.0.300]\n    node: n\n"
            .to_vec(),
    ));
    out.push((
        "config_load",
        "policies",
        b"version: 1\nnode: {name: n}\nworkloads:\n  - {name: w, namespace: ns, ips: [10.0.0.1], node: n, labels: {app: w}}\npolicies:\n  - name: p\n    namespace: ns\n    selector: {match_labels: {app: w}}\n    action: DENY\n    rules:\n      - from: [{source: {not_principals: [\"*\"], ip_blocks: [10.0.0.0/8]}}]\n        to: [{operation: {ports: [80], paths: [/x]}}]\n        when: [{key: source.ip, values: [\"10.1.0.0/16\"]}]\n"
            .to_vec(),
    ));

    out.push((
        "connect_request",
        "accepted",
        b":method: CONNECT\n:authority: 10.1.1.2:8080\nforwarded: for=\"10.1.2.2\"\n".to_vec(),
    ));
    out.push((
        "connect_request",
        "own-port",
        b":method: CONNECT\n:authority: 10.1.1.2:15008\n".to_vec(),
    ));
    out.push((
        "connect_request",
        "malformed",
        b":method: CONNECT\n:scheme: https\n:path: /\n:authority: [fd00::2]:80\n".to_vec(),
    ));
    out
}
