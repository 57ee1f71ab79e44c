//! Two tunnels over one loopback connection: streams, half-closes, resets, flow-control
//! stalls and retirement, in each data path (spliced, copied on the kTLS path, user-space TLS).

use std::io::{ErrorKind, Read, Write};
use std::sync::mpsc;

use super::*;
use crate::observability::hbone_metrics::{
    KeyUpdateKind, PayloadDirection, PayloadPath, Role as RoleLabel,
};
use crate::tunnel::streams::StreamEnd;

const PATHS: [Tls; 3] = [
    Tls::Plain { zero_copy: true },
    Tls::Plain { zero_copy: false },
    Tls::Rustls,
];

fn all_clean(node: &Node) -> bool {
    node.ended.iter().all(|e| e.end == StreamEnd::Clean)
}

/// Four streams at once (one of them empty): each client writes its bytes then FIN, the server
/// application reads to EOF and only then sends everything back — so each direction ends on its
/// own (END_STREAM ↔ FIN) — and the client reads it all back, hashed.
fn streams_exchange(tls: Tls) {
    for readiness in READINESS {
        streams_exchange_with(tls, readiness);
    }
}

fn streams_exchange_with(tls: Tls, readiness: Readiness) {
    let mut h = Harness::pair(tls, readiness, env());
    h.wait_established();
    let sizes = [300_000, 1_500_000, 0, 2_500_000];
    let apps: Vec<_> = sizes
        .iter()
        .enumerate()
        .map(|(i, &n)| {
            let payload = data(n, i as u64 + 1);
            let want = sha(&payload);
            (client_app(h.open(), payload), want)
        })
        .collect();
    h.run_until(|h| h.client.ended.len() == sizes.len() && h.server.ended.len() == sizes.len());
    for (app, want) in apps {
        let got = app.join().expect("client app").expect("client app io");
        assert_eq!(
            sha(&got),
            want,
            "{tls:?} {readiness:?}: echoed bytes differ"
        );
    }
    assert!(
        all_clean(&h.client) && all_clean(&h.server),
        "{tls:?} {readiness:?}: unclean ends"
    );
    let total: u64 = sizes.iter().map(|&n| n as u64).sum();
    for e in h.client.ended.iter().chain(&h.server.ended) {
        assert_eq!(e.record.bytes_to_upstream, e.record.bytes_to_downstream);
    }
    let received = |p| h.metrics.payload_bytes(PayloadDirection::Received, p);
    assert_eq!(
        received(PayloadPath::Spliced) + received(PayloadPath::Copied),
        2 * total,
        "{tls:?} {readiness:?}: payload counted once, both ways"
    );
    match tls {
        Tls::Plain { zero_copy: true } => assert!(received(PayloadPath::Spliced) > total),
        _ => assert_eq!(received(PayloadPath::Spliced), 0),
    }
    assert_eq!(h.client.tunnel().stream_count(), 0);
}

#[test]
fn streams_cross_intact_with_half_close_spliced() {
    streams_exchange(PATHS[0]);
}

#[test]
fn streams_cross_intact_with_half_close_copied() {
    streams_exchange(PATHS[1]);
}

#[test]
fn streams_cross_intact_with_half_close_user_space_tls() {
    streams_exchange(PATHS[2]);
}

/// The server application resets its connection mid-stream: the client application sees a
/// reset too (never a clean EOF that would pass a cut-off stream for a complete one).
#[test]
fn a_reset_at_one_end_reaches_the_other_as_a_reset() {
    for (tls, readiness) in PATHS.into_iter().flat_map(|t| READINESS.map(|r| (t, r))) {
        let mut h = Harness::pair(tls, readiness, env());
        h.on_accept = Box::new(|_, mut sock| {
            std::thread::spawn(move || {
                let mut first = [0u8; 10_000];
                let _ = sock.read_exact(&mut first);
                crate::testbed::set_linger_zero(&sock);
            });
        });
        h.wait_established();
        let app = h.open();
        let mut reader = app.try_clone().unwrap();
        let writer = std::thread::spawn(move || {
            let mut app = app;
            let payload = data(2_000_000, 9);
            app.write_all(&payload)
        });
        let read = std::thread::spawn(move || {
            let mut buf = Vec::new();
            reader.read_to_end(&mut buf)
        });
        h.run_until(|h| h.client.ended.len() == 1 && h.server.ended.len() == 1);
        // The kernel reports a reset once, to whichever call meets it first: the reader, or
        // the writer still blocked in write(2) (the reader then sees EOF). A clean end would
        // give neither a reset.
        let read = read.join().unwrap().map(|_| ());
        let written = writer.join().unwrap();
        let reset =
            |r: &std::io::Result<()>| matches!(r, Err(e) if e.kind() == ErrorKind::ConnectionReset);
        assert!(
            reset(&read) || reset(&written),
            "{tls:?} {readiness:?}: the client must see a reset (read {read:?}, write {written:?})"
        );
        assert!(
            matches!(h.server.ended[0].end, StreamEnd::LocalBroken { .. }),
            "{tls:?} {readiness:?}: {:?}",
            h.server.ended[0].end
        );
        assert!(
            matches!(h.client.ended[0].end, StreamEnd::TunnelBroken { .. }),
            "{tls:?} {readiness:?}: {:?}",
            h.client.ended[0].end
        );
        // The tunnel carries on: another stream crosses after the reset.
        h.on_accept = Box::new(|_, sock| {
            std::thread::spawn(move || echo(sock));
        });
        let payload = data(100_000, 10);
        let want = sha(&payload);
        let app = client_app(h.open(), payload);
        h.run_until(|h| h.client.ended.len() == 2);
        assert_eq!(
            sha(&app.join().unwrap().unwrap()),
            want,
            "{tls:?} {readiness:?}"
        );
    }
}

/// A destination that stops reading holds only its own stream: the tunnel goes on carrying
/// another stream to completion while the first waits for flow-control credit, and the first
/// delivers every byte once its reader resumes.
#[test]
fn a_stalled_reader_holds_only_its_own_stream() {
    for (tls, readiness) in PATHS.into_iter().flat_map(|t| READINESS.map(|r| (t, r))) {
        let mut h = Harness::pair(tls, readiness, env());
        let (resume, wait) = mpsc::channel::<()>();
        let mut wait = Some(wait);
        h.on_accept = Box::new(move |id, sock| {
            if id == StreamId::new(1) {
                let wait = wait.take().expect("one stalled stream");
                std::thread::spawn(move || {
                    let _ = wait.recv();
                    echo(sock)
                });
            } else {
                std::thread::spawn(move || echo(sock));
            }
        });
        h.wait_established();
        // More than the 4 MiB stream window and the socket buffers together.
        let stalled = data(12 << 20, 11);
        let stalled_sum = sha(&stalled);
        let stalled_app = client_app(h.open(), stalled);
        let quick = data(1 << 20, 12);
        let quick_sum = sha(&quick);
        let quick_app = client_app(h.open(), quick);
        h.run_until(|_| quick_app.is_finished());
        assert_eq!(
            sha(&quick_app.join().unwrap().unwrap()),
            quick_sum,
            "{tls:?} {readiness:?}"
        );
        assert!(
            !stalled_app.is_finished(),
            "{tls:?} {readiness:?}: the stalled stream cannot be done yet"
        );
        resume.send(()).unwrap();
        h.run_until(|_| stalled_app.is_finished());
        assert_eq!(
            sha(&stalled_app.join().unwrap().unwrap()),
            stalled_sum,
            "{tls:?} {readiness:?}"
        );
        h.run_until(|h| h.client.ended.len() == 2 && h.server.ended.len() == 2);
        assert!(
            all_clean(&h.client) && all_clean(&h.server),
            "{tls:?} {readiness:?}"
        );
    }
}

/// A tiny record budget where the keys cannot be updated (the plaintext sockets stand for kTLS
/// on a kernel without rekey): both ends retire their tunnel mid-transfer (the client asks its
/// pool to, the server sends GOAWAY); the streams already open finish with every byte, then
/// both tunnels close politely.
#[test]
fn retirement_finishes_open_streams_then_closes_politely() {
    let paths = [
        Tls::Plain { zero_copy: true },
        Tls::Plain { zero_copy: false },
    ];
    for (tls, readiness) in paths.into_iter().flat_map(|t| READINESS.map(|r| (t, r))) {
        let mut env = env();
        env.record_budget = 64;
        let mut h = Harness::pair(tls, readiness, env);
        h.wait_established();
        let apps: Vec<_> = (0..3)
            .map(|i| {
                let payload = data(1_000_000, 20 + i);
                let want = sha(&payload);
                (client_app(h.open(), payload), want)
            })
            .collect();
        h.run_until(|h| h.client.closed.is_some() && h.server.closed.is_some());
        for (app, want) in apps {
            assert_eq!(
                sha(&app.join().unwrap().unwrap()),
                want,
                "{tls:?} {readiness:?}"
            );
        }
        assert_eq!(
            h.client.closed,
            Some(false),
            "{tls:?} {readiness:?}: client closed with a reset"
        );
        assert_eq!(
            h.server.closed,
            Some(false),
            "{tls:?} {readiness:?}: server closed with a reset"
        );
        assert!(
            all_clean(&h.client) && all_clean(&h.server),
            "{tls:?} {readiness:?}"
        );
        assert!(
            h.metrics
                .closed_count(RoleLabel::Server, TunnelClose::RecordBudget)
                >= 1,
            "{tls:?} {readiness:?}: the server retired on its budget"
        );
        assert!(
            h.metrics
                .closed_count(RoleLabel::Client, TunnelClose::RecordBudget)
                >= 1,
            "{tls:?} {readiness:?}: the client retired on its budget"
        );
    }
}

/// A tiny record budget where both ends can update their keys (real TLS 1.3, records in user
/// space; each end announces that it follows a KeyUpdate): at every budget the sender updates
/// its key and the other end follows, mid-transfer, again and again; every byte arrives and
/// no tunnel retires.
#[test]
fn key_updates_at_the_record_budget_keep_every_byte_and_the_tunnel() {
    for readiness in READINESS {
        let mut env = env();
        env.record_budget = 64;
        let mut h = Harness::pair(Tls::Rustls, readiness, env);
        h.wait_established();
        let apps: Vec<_> = (0..3)
            .map(|i| {
                let payload = data(1_000_000, 30 + i);
                let want = sha(&payload);
                (client_app(h.open(), payload), want)
            })
            .collect();
        h.run_until(|h| h.client.ended.len() == 3 && h.server.ended.len() == 3);
        for (app, want) in apps {
            assert_eq!(sha(&app.join().unwrap().unwrap()), want, "{readiness:?}");
        }
        assert!(
            all_clean(&h.client) && all_clean(&h.server),
            "{readiness:?}"
        );
        assert_eq!(
            (h.client.closed, h.server.closed),
            (None, None),
            "{readiness:?}"
        );
        // 3 MB each way in 16 KiB records: about 190 records per direction, so updates both
        // ways (the last budget of a direction may be reached after its last flush), and
        // every update sent was followed.
        let sent = h.metrics.key_updates(KeyUpdateKind::Sent);
        let followed = h.metrics.key_updates(KeyUpdateKind::Followed);
        assert!(sent >= 2, "{readiness:?}: {sent} key updates sent");
        assert_eq!(sent, followed, "{readiness:?}");
        for role in [RoleLabel::Client, RoleLabel::Server] {
            assert_eq!(
                h.metrics.closed_count(role, TunnelClose::RecordBudget),
                0,
                "{readiness:?}: {role:?} retired"
            );
        }
    }
}

/// An HBONE client that sends its first DATA right behind the CONNECT, before any answer
/// (RFC 9113 allows it; ringtun's own client waits): the server holds those bytes in the
/// stream's sink while the reactor decides, and delivers them, in order, once the destination
/// is connected. An independent session drives the client side.
#[test]
fn payload_before_the_decision_waits_in_the_stream_and_arrives_in_order() {
    for zero_copy in [true, false] {
        let (client_sock, server_sock) = tcp_pair();
        let mut h = Harness::server_only(Tls::Plain { zero_copy }, env(), server_sock);
        h.accept_after = Duration::from_millis(100);
        let (delivered, got) = mpsc::channel();
        h.on_accept = Box::new(move |_, mut sock| {
            let delivered = delivered.clone();
            std::thread::spawn(move || {
                let mut buf = Vec::new();
                let _ = delivered.send(sock.read_to_end(&mut buf).map(|_| buf));
            });
        });
        let payload = data(300_000, 30);
        let sent = payload.clone();
        let peer = std::thread::spawn(move || raw_client_sends_early(client_sock, &sent));
        let received = loop {
            if let Ok(b) = got.try_recv() {
                break b.unwrap_or_else(|e| {
                    panic!(
                        "zero_copy {zero_copy}: destination: {e}; server: {:?} {:?}",
                        h.server.ended.iter().map(|e| e.end).collect::<Vec<_>>(),
                        h.server.t.as_ref().map(|t| t.describe_io())
                    )
                });
            }
            h.step();
        };
        assert_eq!(received.len(), payload.len(), "zero_copy {zero_copy}");
        assert_eq!(sha(&received), sha(&payload), "zero_copy {zero_copy}");
        h.run_until(|_| peer.is_finished());
        peer.join().unwrap();
        h.run_until(|h| h.server.ended.len() == 1);
        assert_eq!(
            h.server.ended[0].end,
            crate::tunnel::streams::StreamEnd::Clean,
            "zero_copy {zero_copy}"
        );
    }
}

/// Preface, CONNECT and as much DATA as the initial windows allow written at once; then the
/// rest as credit comes, END_STREAM, and reads until the server's answer and END_STREAM
/// (closing the connection earlier would cut the stream: the tunnel dies with it).
fn raw_client_sends_early(mut sock: TcpStream, payload: &[u8]) {
    use hbone_proto::{Event, Input, Session, Settings};
    let now = Instant::now();
    let mut s = Session::client(Settings::default(), now);
    let id = s
        .open_stream(&ConnectRequest::new("10.0.0.2:8080".parse().unwrap()))
        .unwrap();
    let mut wire = Vec::new();
    s.poll_transmit(&mut wire);
    // The default windows are 64 KiB until the server's SETTINGS arrive: send what they allow.
    let mut off = 0;
    while off < payload.len() {
        let n = s.send_capacity(id).min(payload.len() - off);
        if n == 0 {
            break;
        }
        s.send_data(id, &payload[off..off + n], false, &mut wire)
            .unwrap();
        off += n;
    }
    sock.write_all(&wire).unwrap();
    let mut buf = vec![0u8; 65536];
    let mut answered = false;
    let mut finished = false;
    let mut ended = false;
    while !ended {
        let n = sock.read(&mut buf).unwrap();
        assert!(n > 0, "server closed");
        let mut at = 0;
        while at < n {
            at += match s.handle_input(&buf[at..n], now) {
                Input::Consumed(c) => c,
                Input::DataPayload { consumed, .. } => consumed,
            };
        }
        while let Some(ev) = s.poll_event() {
            match ev {
                Event::Response { response, .. } => {
                    assert_eq!(response.status, 200);
                    answered = true;
                }
                Event::StreamEnd { .. } => ended = true,
                _ => {}
            }
        }
        let mut out = Vec::new();
        s.poll_transmit(&mut out);
        while off < payload.len() {
            let n = s.send_capacity(id).min(payload.len() - off);
            if n == 0 {
                break;
            }
            s.send_data(id, &payload[off..off + n], false, &mut out)
                .unwrap();
            off += n;
        }
        if off == payload.len() && !finished {
            finished = true;
            s.finish(id).unwrap();
            s.poll_transmit(&mut out);
        }
        sock.write_all(&out).unwrap();
    }
    assert!(answered && finished);
}

/// A destination that speaks first (a banner, as SMTP or MySQL servers send) is heard at once:
/// the stream reads its local socket as soon as the CONNECT is answered, not at the tunnel's
/// next event (a keepalive tick, 10 s later).
#[test]
fn the_destination_may_speak_first() {
    for (tls, readiness) in PATHS.into_iter().flat_map(|t| READINESS.map(|r| (t, r))) {
        let mut h = Harness::pair(tls, readiness, env());
        h.on_accept = Box::new(|_, mut sock| {
            std::thread::spawn(move || {
                let _ = sock.write_all(b"220 ready\r\n");
                echo(sock)
            });
        });
        h.wait_established();
        let mut app = h.open();
        app.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
        let banner = std::thread::spawn(move || {
            let mut b = [0u8; 11];
            app.read_exact(&mut b).map(|_| (b, app))
        });
        let start = Instant::now();
        h.run_until(|_| banner.is_finished());
        let (b, app) = banner
            .join()
            .unwrap()
            .unwrap_or_else(|e| panic!("{tls:?} {readiness:?}: no banner within 2 s: {e}"));
        assert_eq!(&b, b"220 ready\r\n");
        assert!(
            start.elapsed() < Duration::from_secs(1),
            "{tls:?} {readiness:?}: {:?}",
            start.elapsed()
        );
        app.shutdown(Shutdown::Both).unwrap();
    }
}
