//! The bodies of the fuzz targets: every parser a peer or an operator feeds — the HTTP/2 frame
//! decoder and session, the HPACK decoder, the user-space TLS record layer, the config loader
//! and the CONNECT checks — each as a function of arbitrary bytes that must never panic, hang
//! or grow without bound.
//!
//! They live in the library so that two callers run the same code: `fuzz/` (cargo-fuzz on
//! stable, coverage-guided, outside the workspace) and `tests/fuzz_corpus.rs`, which replays
//! every committed corpus entry in the ordinary test suite. Test support, hidden from the docs.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use hbone_proto::hpack::{Decoder, Encoder, Field};
use hbone_proto::{ConnectRequest, Event, Input, Session, Settings};

use crate::control_plane::config;
use crate::control_plane::workload_registry::Registry;
use crate::tls::record_layer::{Opener, Sealer};
use crate::tunnel::inbound_rules::InboundRules;

/// A fuzz target's body.
pub type Target = fn(&[u8]);

/// The targets, by the name `fuzz/` and the corpus directories use.
pub const TARGETS: [(&str, Target); 5] = [
    ("session_input", session_input),
    ("hpack_decode", hpack_decode),
    ("tls_records", tls_records),
    ("config_load", config_load),
    ("connect_request", connect_request),
];

/// Frames from a peer, cut into reads of the sizes the input picks, fed to a server or client
/// session the way a tunnel does: DATA payload taken by the caller (`data_consumed`) or fed
/// back through `handle_input`, events acted on (CONNECTs answered 200, resets, credit given
/// back), output polled, keepalive timers fired.
///
/// Input: byte 0 picks the role (bit 0: client), whether the harness sends the client
/// preface and an empty SETTINGS first (bit 1, so the fuzzer starts past the handshake) and
/// how DATA payload is taken (bit 2); byte 1 is the read size (1..=256). The rest is the wire.
pub fn session_input(data: &[u8]) {
    let [mode, chunk, wire @ ..] = data else {
        return;
    };
    let client = mode & 1 != 0;
    let chunk = usize::from(*chunk).max(1);
    let take_payload = mode & 4 != 0;
    let start = Instant::now();
    let mut now = start;
    let settings = Settings::default();
    let mut session = if client {
        Session::client(settings, now)
    } else {
        Session::server(settings, now)
    };
    let mut out = Vec::new();
    if client {
        let _ = session.open_stream(&ConnectRequest::new(SocketAddr::new(
            IpAddr::V4(Ipv4Addr::new(10, 0, 0, 1)),
            8080,
        )));
    }
    let mut input = Vec::with_capacity(wire.len() + 33);
    if mode & 2 != 0 && !client {
        input.extend_from_slice(hbone_proto::PREFACE);
    }
    if mode & 2 != 0 {
        // An empty SETTINGS frame: what every peer sends first.
        input.extend_from_slice(&[0, 0, 0, 4, 0, 0, 0, 0, 0]);
    }
    input.extend_from_slice(wire);
    let mut rest = &input[..];
    let mut rounds = 0u32;
    while !rest.is_empty() && !session.is_closed() {
        rounds += 1;
        let n = chunk.min(rest.len());
        let step = &rest[..n];
        let consumed = match session.handle_input(step, now) {
            Input::Consumed(c) => c,
            Input::DataPayload { consumed, .. } => consumed,
        };
        assert!(consumed <= n, "the session took more than it was given");
        rest = &rest[consumed..];
        // Payload announced: the caller moves it (as a splice would) or feeds it back.
        if let Some((id, remaining)) = session.pending_payload() {
            let take = remaining.min(rest.len()).min(chunk);
            if take_payload {
                session
                    .data_consumed(id, take)
                    .expect("announced payload can be taken");
                let _ = session.release_capacity(id, take);
                rest = &rest[take..];
            }
        }
        act_on_events(&mut session, client);
        out.clear();
        session.poll_transmit(&mut out);
        if rounds % 16 == 0 {
            now += Duration::from_secs(5);
            session.handle_timeout(now);
        }
    }
    act_on_events(&mut session, client);
    out.clear();
    session.poll_transmit(&mut out);
    let _ = session.poll_timeout();
}

fn act_on_events(session: &mut Session, client: bool) {
    while let Some(ev) = session.poll_event() {
        match ev {
            Event::Request { stream, .. } => {
                let _ = session.send_response(stream, 200, false);
            }
            Event::InvalidRequest { stream, error } => {
                let _ = session.send_response(stream, error.status(), true);
            }
            Event::Data { stream, data } => {
                let _ = session.release_capacity(stream, data.len());
            }
            Event::StreamEnd { stream } => {
                let _ = session.finish(stream);
            }
            Event::GoAway { .. } if client => session.goaway(),
            Event::Response { stream, .. } => {
                let _ = session.finish(stream);
            }
            _ => {}
        }
    }
}

/// A header block decoded with a 4 KiB table, then the same bytes again on the same decoder
/// (its dynamic table carries over, as on a connection); every field decoded must encode and
/// decode back to itself.
pub fn hpack_decode(data: &[u8]) {
    let mut decoder = Decoder::new(4096);
    for _ in 0..2 {
        let Ok(block) = decoder.decode(data, 16 * 1024) else {
            return;
        };
        assert!(
            block.over_limit || block.fields.iter().map(Field::size).sum::<usize>() <= 16 * 1024
        );
        let mut wire = Vec::new();
        let mut encoder = Encoder::new();
        encoder.encode(&block.fields, &mut wire);
        let again = Decoder::new(4096)
            .decode(&wire, usize::MAX)
            .expect("our own encoding decodes");
        assert_eq!(
            again.fields, block.fields,
            "HPACK round trip changed fields"
        );
    }
}

/// The user-space TLS record layer: arbitrary bytes opened as records (header and length
/// checks; a forged record fails its MAC), then records sealed with the right key around
/// content the input picks — any inner type, trailing zero padding, empty content — and
/// opened again.
pub fn tls_records(data: &[u8]) {
    use rustls::crypto::cipher::{AeadKey, Iv};
    use rustls::ConnectionTrafficSecrets;
    let secrets = || ConnectionTrafficSecrets::Aes256Gcm {
        key: AeadKey::from([7u8; 32]),
        iv: Iv::from([9u8; 12]),
    };
    let mut opener = Opener::new(&secrets(), 0).expect("AES-256-GCM");
    let mut buf = data.to_vec();
    let mut off = 0;
    while off < buf.len() {
        match opener.open_first(&mut buf[off..]) {
            Ok(Some(r)) => {
                assert!(r.start <= r.end && r.consumed > 0 && off + r.consumed <= buf.len());
                off += r.consumed;
            }
            Ok(None) | Err(_) => break,
        }
    }
    // Sealed by the peer that holds the key: inner plaintext `content ‖ type ‖ zeros`.
    let mut sealer = Sealer::new(&secrets(), 0).expect("AES-256-GCM");
    let mut opener = Opener::new(&secrets(), 0).expect("AES-256-GCM");
    let mut wire = Vec::new();
    let mut expected = Vec::new();
    for piece in data.chunks(97) {
        let (&kind, body) = piece.split_first().expect("chunks are not empty");
        let padding = usize::from(kind >> 4);
        let content_type = kind & 0x0f;
        let mut inner = body.to_vec();
        inner.push(content_type);
        inner.resize(inner.len() + padding, 0);
        sealer.seal_raw(&inner, &mut wire).expect("seal");
        let text_end = body.len() + 1;
        expected.push(
            inner[..text_end]
                .iter()
                .rposition(|b| *b != 0)
                .map(|at| (inner[at], inner[..at].to_vec())),
        );
    }
    let mut off = 0;
    for want in expected {
        match (opener.open_first(&mut wire[off..]), want) {
            (Ok(Some(r)), Some((content_type, text))) => {
                assert_eq!(r.content_type, content_type);
                assert_eq!(&wire[off + r.start..off + r.end], &text[..]);
                off += r.consumed;
            }
            (Err(crate::tls::record_layer::RecordError::NoContentType), None) => return,
            (got, want) => panic!("record opened as {got:?}, expected {want:?}"),
        }
    }
}

/// A configuration file's text (any bytes; the loader reads UTF-8): every problem must come
/// back as errors with places, never a panic.
pub fn config_load(data: &[u8]) {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    if let Err(errors) = config::check(text) {
        assert!(!errors.0.is_empty(), "an error result names no error");
    }
}

/// A CONNECT's header list (from the input: fields `name: value` separated by newlines),
/// parsed and then decided against a node's workloads, as a tunnel server does.
pub fn connect_request(data: &[u8]) {
    static NODE: OnceLock<(Registry, InboundRules)> = OnceLock::new();
    let (registry, rules) = NODE.get_or_init(|| {
        let cfg = config::load(CONNECT_NODE).expect("the fuzz node config is valid");
        (Registry::new(&cfg), InboundRules::new(&cfg.node))
    });
    let fields: Vec<Field> = data
        .split(|b| *b == b'\n')
        .filter(|l| !l.is_empty())
        .map(|line| match line.iter().skip(1).position(|b| *b == b':') {
            Some(at) => Field::new(&line[..at + 1], line[at + 2..].trim_ascii_start()),
            None => Field::new(line, Vec::new()),
        })
        .collect();
    let local = SocketAddr::from(([10, 1, 1, 2], 15008));
    let _ = rules.check_fields(registry, &fields, local);
    if let Ok(request) = ConnectRequest::from_fields(&fields) {
        // What we accept we can send again, and it parses the same.
        let back = ConnectRequest::from_fields(&request.to_fields()).expect("round trip");
        assert_eq!(back.authority, request.authority);
    }
}

const CONNECT_NODE: &str = "version: 1
node:
  name: node-a
workloads:
  - name: server
    namespace: default
    ips: [10.1.1.2, \"fd00::2\"]
    node: node-a
  - name: remote
    namespace: default
    ips: [10.1.2.2]
    node: node-b
";
