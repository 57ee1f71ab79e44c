//! RFC 9113 connection errors as a peer receives them: a raw HTTP/2 client sends one
//! violation to a server tunnel and must read the GOAWAY naming it (the error code of the RFC
//! section that the violation breaks), then a clean end of the connection — not a reset that
//! throws the GOAWAY away. And a refused TLS handshake: the client must read the server's
//! alert, not a reset.

use std::io::{self, Read, Write};
use std::net::TcpStream;
use std::time::Duration;

use hbone_proto::{ConnectRequest, PREFACE};

use super::{env, Harness, Tls};
use crate::data_plane::socket::tcp_pair;

const PROTOCOL_ERROR: u32 = 0x1;
const FLOW_CONTROL_ERROR: u32 = 0x3;
const FRAME_SIZE_ERROR: u32 = 0x6;
const COMPRESSION_ERROR: u32 = 0x9;
const ENHANCE_YOUR_CALM: u32 = 0xb;

const DATA: u8 = 0;
const HEADERS: u8 = 1;
const RST_STREAM: u8 = 3;
const SETTINGS: u8 = 4;
const PUSH_PROMISE: u8 = 5;
const PING: u8 = 6;
const GOAWAY: u8 = 7;
const WINDOW_UPDATE: u8 = 8;
const CONTINUATION: u8 = 9;
const END_HEADERS: u8 = 0x4;
const ACK: u8 = 0x1;

fn frame(kind: u8, flags: u8, stream: u32, payload: &[u8]) -> Vec<u8> {
    let len = payload.len() as u32;
    let mut out = vec![(len >> 16) as u8, (len >> 8) as u8, len as u8, kind, flags];
    out.extend_from_slice(&stream.to_be_bytes());
    out.extend_from_slice(payload);
    out
}

/// The client's start: preface and an empty SETTINGS.
fn start() -> Vec<u8> {
    let mut v = PREFACE.to_vec();
    v.extend(frame(SETTINGS, 0, 0, &[]));
    v
}

fn connect_block() -> Vec<u8> {
    let mut out = Vec::new();
    hbone_proto::hpack::Encoder::new().encode(
        &ConnectRequest::new("10.0.0.2:8080".parse().unwrap()).to_fields(),
        &mut out,
    );
    out
}

fn setting(id: u16, value: u32) -> Vec<u8> {
    let mut v = id.to_be_bytes().to_vec();
    v.extend_from_slice(&value.to_be_bytes());
    v
}

/// (what breaks which rule, the bytes after the client's start, the GOAWAY code expected).
/// The first two cases replace the start itself.
fn violations() -> Vec<(&'static str, Vec<u8>, u32)> {
    let block = connect_block();
    let mut interrupted = frame(HEADERS, 0, 1, &block[..block.len() / 2]);
    interrupted.extend(frame(PING, 0, 0, &[0; 8]));
    let mut continuations = frame(HEADERS, 0, 1, &block[..1]);
    for _ in 0..200 {
        continuations.extend(frame(CONTINUATION, 0, 1, &[]));
    }
    vec![
        // §3.4: the first frame after the preface must be SETTINGS.
        (
            "§3.4 first frame not SETTINGS",
            frame(PING, 0, 0, &[0; 8]),
            PROTOCOL_ERROR,
        ),
        // §4.2: a frame larger than SETTINGS_MAX_FRAME_SIZE.
        (
            "§4.2 frame over MAX_FRAME_SIZE",
            vec![0xff, 0xff, 0xff, DATA, 0, 0, 0, 0, 1],
            FRAME_SIZE_ERROR,
        ),
        // §4.3: a header block that does not decode.
        (
            "§4.3 HPACK decoding error",
            frame(HEADERS, END_HEADERS, 1, &[0x80]),
            COMPRESSION_ERROR,
        ),
        // §5.1: DATA on an idle stream.
        (
            "§5.1 DATA on an idle stream",
            frame(DATA, 0, 1, b"x"),
            PROTOCOL_ERROR,
        ),
        // §5.1.1: a client-initiated stream with an even identifier.
        (
            "§5.1.1 stream of the wrong parity",
            frame(HEADERS, END_HEADERS, 2, &block),
            PROTOCOL_ERROR,
        ),
        // §6.1: DATA on stream 0.
        (
            "§6.1 DATA on stream 0",
            frame(DATA, 0, 0, b"x"),
            PROTOCOL_ERROR,
        ),
        // §6.2: HEADERS on stream 0.
        (
            "§6.2 HEADERS on stream 0",
            frame(HEADERS, END_HEADERS, 0, &block),
            PROTOCOL_ERROR,
        ),
        // §6.4: RST_STREAM on an idle stream.
        (
            "§6.4 RST_STREAM on an idle stream",
            frame(RST_STREAM, 0, 1, &[0, 0, 0, 8]),
            PROTOCOL_ERROR,
        ),
        // §6.4: RST_STREAM of the wrong length.
        (
            "§6.4 RST_STREAM length",
            frame(RST_STREAM, 0, 1, &[0, 0, 8]),
            FRAME_SIZE_ERROR,
        ),
        // §6.5: SETTINGS on a stream.
        (
            "§6.5 SETTINGS on a stream",
            frame(SETTINGS, 0, 1, &[]),
            PROTOCOL_ERROR,
        ),
        // §6.5: a SETTINGS ACK with a payload.
        (
            "§6.5 SETTINGS ACK with payload",
            frame(SETTINGS, ACK, 0, &setting(3, 1)),
            FRAME_SIZE_ERROR,
        ),
        // §6.5: a SETTINGS length not a multiple of 6.
        (
            "§6.5 SETTINGS length",
            frame(SETTINGS, 0, 0, &[0; 5]),
            FRAME_SIZE_ERROR,
        ),
        // §6.5.2: SETTINGS_ENABLE_PUSH other than 0 or 1.
        (
            "§6.5.2 ENABLE_PUSH 2",
            frame(SETTINGS, 0, 0, &setting(2, 2)),
            PROTOCOL_ERROR,
        ),
        // §6.5.2: SETTINGS_INITIAL_WINDOW_SIZE above 2^31-1.
        (
            "§6.5.2 INITIAL_WINDOW_SIZE",
            frame(SETTINGS, 0, 0, &setting(4, 1 << 31)),
            FLOW_CONTROL_ERROR,
        ),
        // §6.5.2: SETTINGS_MAX_FRAME_SIZE below 2^14.
        (
            "§6.5.2 MAX_FRAME_SIZE",
            frame(SETTINGS, 0, 0, &setting(5, 100)),
            PROTOCOL_ERROR,
        ),
        // §6.6: a client cannot push.
        (
            "§6.6 PUSH_PROMISE from a client",
            frame(PUSH_PROMISE, END_HEADERS, 1, &[0, 0, 0, 2]),
            PROTOCOL_ERROR,
        ),
        // §6.7: PING of the wrong length, and on a stream.
        (
            "§6.7 PING length",
            frame(PING, 0, 0, &[0; 7]),
            FRAME_SIZE_ERROR,
        ),
        (
            "§6.7 PING on a stream",
            frame(PING, 0, 1, &[0; 8]),
            PROTOCOL_ERROR,
        ),
        // §6.8: GOAWAY on a stream.
        (
            "§6.8 GOAWAY on a stream",
            frame(GOAWAY, 0, 1, &[0; 8]),
            PROTOCOL_ERROR,
        ),
        // §6.9: a zero increment on the connection.
        (
            "§6.9 WINDOW_UPDATE of 0",
            frame(WINDOW_UPDATE, 0, 0, &[0, 0, 0, 0]),
            PROTOCOL_ERROR,
        ),
        // §6.9.1: the connection window above 2^31-1.
        (
            "§6.9.1 window overflow",
            frame(WINDOW_UPDATE, 0, 0, &0x7fff_ffffu32.to_be_bytes()),
            FLOW_CONTROL_ERROR,
        ),
        // §6.9: WINDOW_UPDATE of the wrong length.
        (
            "§6.9 WINDOW_UPDATE length",
            frame(WINDOW_UPDATE, 0, 0, &[0, 0, 1]),
            FRAME_SIZE_ERROR,
        ),
        // §6.10: CONTINUATION without a header block, and a block interrupted.
        (
            "§6.10 CONTINUATION alone",
            frame(CONTINUATION, END_HEADERS, 1, &[]),
            PROTOCOL_ERROR,
        ),
        (
            "§6.10 header block interrupted",
            interrupted,
            PROTOCOL_ERROR,
        ),
        // §10.5: CONTINUATION flood.
        ("§10.5 CONTINUATION flood", continuations, ENHANCE_YOUR_CALM),
    ]
}

/// Sends `wire` and reads until the connection ends: the frames received, and how it ended.
fn raw_peer(mut sock: TcpStream, wire: Vec<u8>) -> (Vec<u8>, io::Result<()>) {
    sock.set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    // The server may close while we still write (it stops reading after the violation).
    let _ = sock.write_all(&wire);
    let mut got = Vec::new();
    let mut buf = [0u8; 4096];
    let end = loop {
        match sock.read(&mut buf) {
            Ok(0) => break Ok(()),
            Ok(n) => got.extend_from_slice(&buf[..n]),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => break Err(e),
        }
    };
    (got, end)
}

/// The error code of the first GOAWAY among `bytes`' frames (after the server's SETTINGS…).
fn goaway_code(bytes: &[u8]) -> Option<u32> {
    let mut off = 0;
    while off + 9 <= bytes.len() {
        let len = u32::from_be_bytes([0, bytes[off], bytes[off + 1], bytes[off + 2]]) as usize;
        let kind = bytes[off + 3];
        let payload = bytes.get(off + 9..off + 9 + len)?;
        if kind == GOAWAY && payload.len() >= 8 {
            return Some(u32::from_be_bytes(payload[4..8].try_into().unwrap()));
        }
        off += 9 + len;
    }
    None
}

#[test]
fn each_connection_error_reaches_the_peer_as_its_goaway_code() {
    let mut cases = violations();
    cases.push(("§3.4 invalid preface", Vec::new(), PROTOCOL_ERROR));
    for (what, after, code) in cases {
        let (client, server) = tcp_pair();
        let mut h = Harness::server_only(Tls::Plain { zero_copy: true }, env(), server);
        let wire = match what {
            "§3.4 invalid preface" => b"PRI * HTTP/1.1\r\n\r\nSM\r\n\r\n".to_vec(),
            "§3.4 first frame not SETTINGS" => [&PREFACE[..], &after].concat(),
            _ => [start(), after].concat(),
        };
        let peer = std::thread::spawn(move || raw_peer(client, wire));
        h.run_until(|h| h.server.closed.is_some() && peer.is_finished());
        let (got, end) = peer.join().unwrap();
        assert_eq!(
            goaway_code(&got),
            Some(code),
            "{what}: frames received {got:02x?}"
        );
        assert!(
            end.is_ok(),
            "{what}: the connection ended with {end:?}, not a clean close"
        );
        assert_eq!(
            h.server.closed,
            Some(false),
            "{what}: the server reset the socket"
        );
    }
}

#[test]
fn a_refused_handshake_reaches_the_client_as_an_alert() {
    use crate::tls::fixtures::{id, Pki, CLIENT, SERVER};
    // The client trusts the server's CA but presents a certificate from another one.
    let (client, server) = tcp_pair();
    let mut h = Harness::server_only(Tls::Rustls, env(), server);
    let stranger = Pki::new("cluster.local");
    let trusted = h.pki.take().expect("the harness's PKI");
    let cfg = crate::tls::ClientTls::new(&stranger.creds(CLIENT), &trusted.bundle)
        .unwrap()
        .config_for(&id(SERVER))
        .unwrap();
    let peer = std::thread::spawn(move || {
        let mut conn =
            rustls::ClientConnection::new(cfg, crate::tls::server_name([127, 0, 0, 1].into()))
                .unwrap();
        let mut sock = client;
        sock.set_read_timeout(Some(Duration::from_secs(10)))
            .unwrap();
        let mut tls = rustls::Stream::new(&mut conn, &mut sock);
        let _ = tls.write_all(b"hello");
        let mut buf = [0u8; 16];
        tls.read(&mut buf).map(|_| ())
    });
    h.run_until(|h| h.server.closed.is_some() && peer.is_finished());
    let err = peer
        .join()
        .unwrap()
        .expect_err("the server refuses the client");
    let text = err.to_string();
    assert!(
        text.contains("received fatal alert"),
        "the client saw `{text}`, not the server's alert"
    );
    assert_eq!(h.server.closed, Some(false), "the server reset the socket");
}
