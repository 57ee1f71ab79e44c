//! A client and a server session joined in memory, with simulated time (quinn-proto's `Pair`).

use hbone_proto::frame::{self, Frame, StreamId};
use hbone_proto::{
    ConnectRequest, ConnectionError, ErrorCode, Event, Input, SendError, Session, Settings,
};
use std::time::{Duration, Instant};

struct Pair {
    now: Instant,
    client: Session,
    server: Session,
    client_events: Vec<Event>,
    server_events: Vec<Event>,
    /// Bytes each side received through the zero-copy path, by stream.
    client_spliced: Vec<(StreamId, Vec<u8>)>,
    server_spliced: Vec<(StreamId, Vec<u8>)>,
    /// Bytes in flight: written by one side, not yet read by the other.
    to_server: Vec<u8>,
    to_client: Vec<u8>,
}

impl Pair {
    fn new() -> Pair {
        Pair::with_settings(Settings::default(), Settings::default())
    }

    fn with_settings(c: Settings, s: Settings) -> Pair {
        let now = Instant::now();
        let mut p = Pair {
            now,
            client: Session::client(c, now),
            server: Session::server(s, now),
            client_events: Vec::new(),
            server_events: Vec::new(),
            client_spliced: Vec::new(),
            server_spliced: Vec::new(),
            to_server: Vec::new(),
            to_client: Vec::new(),
        };
        p.drive();
        p
    }

    /// Exchanges bytes until both sides are quiet. Each DATA payload is "spliced": taken out
    /// of the byte stream by the test, reported with `data_consumed`, never fed to the session.
    fn drive(&mut self) {
        for _ in 0..100 {
            self.client.poll_transmit(&mut self.to_server);
            self.server.poll_transmit(&mut self.to_client);
            if self.to_server.is_empty() && self.to_client.is_empty() {
                return;
            }
            let now = self.now;
            feed(
                &mut self.server,
                &mut self.to_server,
                now,
                &mut self.server_spliced,
            );
            feed(
                &mut self.client,
                &mut self.to_client,
                now,
                &mut self.client_spliced,
            );
            while let Some(e) = self.server.poll_event() {
                self.server_events.push(e);
            }
            while let Some(e) = self.client.poll_event() {
                self.client_events.push(e);
            }
        }
        panic!("sessions did not go quiet");
    }

    fn advance(&mut self, d: Duration) {
        self.now += d;
        self.client.handle_timeout(self.now);
        self.server.handle_timeout(self.now);
        self.drive();
    }

    fn connect(&mut self) -> StreamId {
        let id = self
            .client
            .open_stream(&ConnectRequest::new("10.0.0.7:8080".parse().unwrap()))
            .unwrap();
        self.drive();
        assert!(self
            .server_events
            .iter()
            .any(|e| matches!(e, Event::Request { stream, .. } if *stream == id)));
        self.server.send_response(id, 200, false).unwrap();
        self.drive();
        assert!(self.client_events.iter().any(
            |e| matches!(e, Event::Response { stream, response } if *stream == id && response.status == 200)
        ));
        id
    }
}

/// Feeds `buf` to `session`, splicing every DATA payload out of the stream.
fn feed(
    session: &mut Session,
    buf: &mut Vec<u8>,
    now: Instant,
    spliced: &mut Vec<(StreamId, Vec<u8>)>,
) {
    let mut off = 0;
    while off < buf.len() {
        match session.handle_input(&buf[off..], now) {
            Input::Consumed(n) => off += n,
            Input::DataPayload {
                consumed,
                stream,
                len,
                ..
            } => {
                off += consumed;
                let take = len.min(buf.len() - off);
                spliced.push((stream, buf[off..off + take].to_vec()));
                session.data_consumed(stream, take).unwrap();
                off += take;
            }
        }
    }
    buf.drain(..off);
}

fn spliced_bytes(v: &[(StreamId, Vec<u8>)], id: StreamId) -> Vec<u8> {
    v.iter()
        .filter(|(s, _)| *s == id)
        .flat_map(|(_, b)| b.clone())
        .collect()
}

fn send(session: &mut Session, out: &mut Vec<u8>, id: StreamId, payload: &[u8], end: bool) {
    session.poll_transmit(out);
    let hdr = session.data_frame_header(id, payload.len(), end).unwrap();
    out.extend_from_slice(&hdr);
    out.extend_from_slice(payload);
}

#[test]
fn connect_200_data_both_ways_half_close_then_reset() {
    let mut p = Pair::new();
    let id = p.connect();

    // Client → server and server → client through the zero-copy path.
    send(
        &mut p.client,
        &mut p.to_server,
        id,
        b"ping from client",
        false,
    );
    send(
        &mut p.server,
        &mut p.to_client,
        id,
        b"pong from server",
        false,
    );
    p.drive();
    assert_eq!(spliced_bytes(&p.server_spliced, id), b"ping from client");
    assert_eq!(spliced_bytes(&p.client_spliced, id), b"pong from server");

    // Client half-closes (FIN): the server sees the end, and can still send.
    p.client.finish(id).unwrap();
    p.drive();
    assert!(p.server_events.contains(&Event::StreamEnd { stream: id }));
    assert_eq!(p.client.send_capacity(id), 0);
    assert_eq!(
        p.client.data_frame_header(id, 1, false),
        Err(SendError::StreamNotWritable(id))
    );
    send(
        &mut p.server,
        &mut p.to_client,
        id,
        b"after client FIN",
        false,
    );
    p.drive();
    assert_eq!(
        spliced_bytes(&p.client_spliced, id),
        b"pong from serverafter client FIN"
    );
    assert!(!p.client_events.contains(&Event::StreamEnd { stream: id }));

    // A second stream is reset by the server: the client sees the code, not an EOF.
    let id2 = p.connect();
    p.server.reset(id2, ErrorCode::CONNECT_ERROR).unwrap();
    p.drive();
    assert!(p.client_events.contains(&Event::Reset {
        stream: id2,
        code: ErrorCode::CONNECT_ERROR,
        remote: true
    }));
    assert!(!ErrorCode::CONNECT_ERROR.is_eof());

    // Server half-closes the first stream with the last payload: both directions closed.
    send(&mut p.server, &mut p.to_client, id, b"bye", true);
    p.drive();
    assert!(p.client_events.contains(&Event::StreamEnd { stream: id }));
    p.client
        .release_capacity(id, spliced_bytes(&p.client_spliced, id).len())
        .unwrap();
    p.server.release_capacity(id, 16).unwrap();
    assert_eq!(p.client.stream_count(), 0);
    assert_eq!(p.server.stream_count(), 0);
}

#[test]
fn buffered_fallback_returns_payload_as_events() {
    let mut p = Pair::new();
    let id = p.connect();
    let mut wire = Vec::new();
    send(&mut p.client, &mut wire, id, b"through user space", true);
    // Feed everything, payload included, one byte at a time.
    for b in &wire {
        assert!(matches!(
            p.server.handle_input(std::slice::from_ref(b), p.now),
            Input::Consumed(1) | Input::DataPayload { .. }
        ));
    }
    let mut data = Vec::new();
    let mut ended = false;
    while let Some(e) = p.server.poll_event() {
        match e {
            Event::Data { stream, data: d } if stream == id => data.extend(d),
            Event::StreamEnd { stream } if stream == id => ended = true,
            _ => {}
        }
    }
    assert_eq!(data, b"through user space");
    assert!(ended);
}

#[test]
fn padded_data_is_spliced_and_padding_skipped() {
    let mut p = Pair::new();
    let id = p.connect();
    let mut wire = Vec::new();
    frame::Data {
        stream_id: id,
        payload: b"abc".to_vec(),
        end_stream: false,
        pad_len: Some(4),
    }
    .encode(&mut wire);
    let Input::DataPayload { consumed, len, .. } = p.server.handle_input(&wire, p.now) else {
        panic!()
    };
    assert_eq!((consumed, len), (10, 3));
    p.server.data_consumed(id, 3).unwrap();
    assert_eq!(p.server.input_wanted(), 4);
    assert_eq!(
        p.server.handle_input(&wire[13..], p.now),
        Input::Consumed(4)
    );
    assert_eq!(p.server.input_wanted(), 9);
}

#[test]
fn window_updates_follow_release_not_receipt() {
    let mut p = Pair::new();
    let id = p.connect();
    let window = p.client.stream_send_window(id).unwrap();
    assert_eq!(window, 4 << 20);
    let chunk = vec![7u8; 1 << 20];
    for _ in 0..4 {
        send(&mut p.client, &mut p.to_server, id, &chunk, false);
    }
    p.drive();
    // Stream window exhausted: nothing more may be sent, and nothing comes back on receipt.
    assert_eq!(p.client.send_capacity(id), 0);
    assert_eq!(
        p.client.data_frame_header(id, 1, false),
        Err(SendError::FlowControl {
            asked: 1,
            available: 0
        })
    );
    // Releasing less than half a window sends nothing; at half, the credit flows back.
    p.server.release_capacity(id, (1 << 20) - 1).unwrap();
    p.drive();
    assert_eq!(p.client.send_capacity(id), 0);
    p.server.release_capacity(id, (1 << 20) + 1).unwrap();
    p.drive();
    assert_eq!(p.client.stream_send_window(id), Some(2 << 20));
    assert!(p
        .client_events
        .contains(&Event::SendCapacity { stream: Some(id) }));
    assert_eq!(
        p.server.release_capacity(id, (2 << 20) + 1),
        Err(SendError::ReleaseTooLarge {
            len: (2 << 20) + 1,
            unreleased: 2 << 20
        })
    );
}

#[test]
fn data_header_refused_while_control_frames_are_queued() {
    let mut p = Pair::new();
    let id = p
        .client
        .open_stream(&ConnectRequest::new("10.0.0.7:80".parse().unwrap()))
        .unwrap();
    assert_eq!(
        p.client.data_frame_header(id, 1, false),
        Err(SendError::TransmitPending)
    );
}

#[test]
fn data_beyond_peer_max_frame_size_is_refused() {
    let mut p = Pair::new();
    let id = p.connect();
    assert_eq!(p.client.peer_max_frame_size(), 1 << 20);
    assert_eq!(
        p.client.data_frame_header(id, (1 << 20) + 1, false),
        Err(SendError::FrameTooLarge {
            len: (1 << 20) + 1,
            max: 1 << 20
        })
    );
}

#[test]
fn keepalive_pings_are_answered_and_keep_the_connection() {
    let mut p = Pair::new();
    for _ in 0..5 {
        p.advance(Duration::from_secs(10));
    }
    assert!(!p.client.is_closed() && !p.server.is_closed());
    assert!(p.client.poll_timeout().unwrap() > p.now);
}

#[test]
fn keepalive_times_out_after_20s_of_silence() {
    let mut p = Pair::new();
    let start = p.now;
    // The server stops answering: drop everything the client sends from now on.
    let mut sink = Vec::new();
    let mut t = start;
    let mut closed_at = None;
    while t < start + Duration::from_secs(60) {
        let next = p.client.poll_timeout().unwrap();
        t = next;
        p.client.handle_timeout(t);
        p.client.poll_transmit(&mut sink);
        if let Some(Event::ConnectionError(e)) = p.client.poll_event() {
            assert_eq!(
                e,
                ConnectionError::KeepaliveTimeout(Duration::from_secs(20))
            );
            closed_at = Some(t);
            break;
        }
    }
    // PING at 10 s, unanswered until 30 s.
    assert_eq!(closed_at, Some(start + Duration::from_secs(30)));
    assert!(p.client.is_closed());
    let ping = frame::decode(&sink, 1 << 14).unwrap().unwrap().0;
    assert!(matches!(ping, Frame::Ping(frame::Ping { ack: false, .. })));
}

#[test]
fn goaway_drains_existing_streams_and_refuses_new_ones() {
    let mut p = Pair::new();
    let id = p.connect();
    p.server.goaway();
    p.drive();
    assert!(p.client_events.iter().any(|e| matches!(e, Event::GoAway { code: ErrorCode::NO_ERROR, last_stream_id, .. } if *last_stream_id == id)));
    assert_eq!(
        p.client
            .open_stream(&ConnectRequest::new("10.0.0.7:80".parse().unwrap())),
        Err(SendError::GoingAway)
    );
    // The existing stream still works, then finishes both ways.
    send(&mut p.client, &mut p.to_server, id, b"still here", true);
    p.drive();
    assert_eq!(spliced_bytes(&p.server_spliced, id), b"still here");
    assert!(!p.server_events.contains(&Event::Drained));
    p.server.finish(id).unwrap();
    p.drive();
    assert!(p.server_events.contains(&Event::Drained));
    assert!(p.client_events.contains(&Event::Drained));
}

#[test]
fn goaway_resets_streams_above_last_stream_id() {
    let mut p = Pair::new();
    let id = p.connect();
    // Opened after the server decided to go away: not processed.
    p.server.goaway();
    let late = p
        .client
        .open_stream(&ConnectRequest::new("10.0.0.7:80".parse().unwrap()))
        .unwrap();
    p.drive();
    assert!(p.client_events.contains(&Event::Reset {
        stream: late,
        code: ErrorCode::REFUSED_STREAM,
        remote: true
    }));
    assert!(p.client.send_capacity(id) > 0);
}

#[test]
fn concurrent_stream_limit_refuses_extra_streams() {
    let server = Settings {
        max_concurrent_streams: 2,
        ..Settings::default()
    };
    let mut p = Pair::with_settings(Settings::default(), server);
    p.connect();
    p.connect();
    assert_eq!(p.client.peer_max_concurrent_streams(), 2);
    assert!(!p.client.can_open_stream());
    assert_eq!(
        p.client
            .open_stream(&ConnectRequest::new("10.0.0.7:80".parse().unwrap())),
        Err(SendError::StreamLimit(2))
    );
}

#[test]
fn malformed_request_is_reported_and_answered_with_400() {
    let mut p = Pair::new();
    // A GET (not CONNECT) written by hand with the server's HPACK-compatible encoder.
    let mut block = Vec::new();
    hbone_proto::hpack::Encoder::new().encode(
        &[
            hbone_proto::hpack::Field::new(":method", "GET"),
            hbone_proto::hpack::Field::new(":authority", "1.2.3.4:80"),
        ],
        &mut block,
    );
    frame::Headers {
        stream_id: StreamId::new(1),
        fragment: block,
        end_stream: false,
        end_headers: true,
        priority: None,
        pad_len: None,
    }
    .encode(&mut p.to_server);
    p.drive();
    let err = p
        .server_events
        .iter()
        .find_map(|e| match e {
            Event::InvalidRequest { stream, error } if stream.get() == 1 => Some(error.clone()),
            _ => None,
        })
        .unwrap();
    assert_eq!(err.status(), 400);
    p.server
        .send_response(StreamId::new(1), err.status(), true)
        .unwrap();
    // The client session never opened stream 1, so read the server's answer off the wire.
    let mut wire = Vec::new();
    p.server.poll_transmit(&mut wire);
    let (Frame::Headers(h), _) = frame::decode(&wire, 1 << 14).unwrap().unwrap() else {
        panic!()
    };
    assert!(h.end_stream);
    let block = hbone_proto::hpack::Decoder::new(4096)
        .decode(&h.fragment, 1 << 16)
        .unwrap();
    assert_eq!(
        block.fields,
        [hbone_proto::hpack::Field::new(":status", "400")]
    );
    // The request direction is still open until the server also resets it.
    assert_eq!(p.server.stream_count(), 1);
    p.server
        .reset(StreamId::new(1), ErrorCode::PROTOCOL_ERROR)
        .unwrap();
    assert_eq!(p.server.stream_count(), 0);
}

/// Events with DATA chunks merged per stream, so differently split inputs compare equal.
fn normalized(events: Vec<Event>) -> (Vec<Event>, Vec<u8>) {
    let mut data = Vec::new();
    let other = events
        .into_iter()
        .filter_map(|e| match e {
            Event::Data { data: d, .. } => {
                data.extend(d);
                None
            }
            e => Some(e),
        })
        .collect();
    (other, data)
}

fn client_byte_stream() -> Vec<u8> {
    let now = Instant::now();
    let mut c = Session::client(Settings::default(), now);
    let mut wire = Vec::new();
    let id = c
        .open_stream(&ConnectRequest::new("[fd00::1]:443".parse().unwrap()))
        .unwrap();
    c.poll_transmit(&mut wire);
    for i in 0..5u8 {
        c.send_data(id, &vec![i; 1000 + i as usize], false, &mut wire)
            .unwrap();
    }
    frame::Data {
        stream_id: id,
        payload: b"padded".to_vec(),
        end_stream: false,
        pad_len: Some(7),
    }
    .encode(&mut wire);
    frame::Ping {
        ack: false,
        data: *b"abcdefgh",
    }
    .encode(&mut wire);
    c.send_data(id, b"last", true, &mut wire).unwrap();
    wire
}

fn events_for_splits(wire: &[u8], cuts: &[usize]) -> (Vec<Event>, Vec<u8>, Vec<u8>) {
    let now = Instant::now();
    let mut s = Session::server(Settings::default(), now);
    let mut events = Vec::new();
    let mut start = 0;
    let mut points: Vec<usize> = cuts.iter().map(|c| c % (wire.len() + 1)).collect();
    points.push(wire.len());
    points.sort();
    for end in points {
        let mut off = start;
        while off < end {
            off += match s.handle_input(&wire[off..end], now) {
                Input::Consumed(n) => n,
                Input::DataPayload { consumed, .. } => consumed,
            };
        }
        start = end;
        while let Some(e) = s.poll_event() {
            events.push(e);
        }
    }
    let mut out = Vec::new();
    s.poll_transmit(&mut out);
    let (events, data) = normalized(events);
    (events, data, out)
}

proptest::proptest! {
    #![proptest_config(proptest::test_runner::Config { cases: 64, ..Default::default() })]

    /// However the byte stream is cut into reads, the session sees the same events, the same
    /// payload bytes, and answers with the same bytes.
    #[test]
    fn random_splits_give_the_same_events(cuts in proptest::collection::vec(0usize..100_000, 0..40)) {
        let wire = client_byte_stream();
        let whole = events_for_splits(&wire, &[]);
        let split = events_for_splits(&wire, &cuts);
        proptest::prop_assert_eq!(&split, &whole);
        let mut expected = Vec::new();
        for i in 0..5u8 {
            expected.extend(vec![i; 1000 + i as usize]);
        }
        expected.extend_from_slice(b"paddedlast");
        proptest::prop_assert_eq!(&whole.1, &expected);
        let ended = whole.0.iter().any(|e| matches!(e, Event::StreamEnd { .. }));
        proptest::prop_assert!(ended, "END_STREAM not reported");
    }
}

/// Extension settings: each side learns the other's value for the identifiers it announces
/// itself; an identifier only one side knows is ignored by the other, as RFC 9113 §6.5.2 asks.
#[test]
fn extension_settings_reach_a_peer_that_announces_the_same_identifier() {
    let with = |ext: Vec<(u16, u32)>| Settings {
        extensions: ext,
        ..Settings::default()
    };
    let p = Pair::with_settings(
        with(vec![(0xf0c5, 1)]),
        with(vec![(0xf0c5, 0), (0xf0aa, 7)]),
    );
    assert_eq!(p.client.peer_extension(0xf0c5), Some(0));
    assert_eq!(p.server.peer_extension(0xf0c5), Some(1));
    // The client does not announce 0xf0aa: it ignores the server's value.
    assert_eq!(p.client.peer_extension(0xf0aa), None);
    assert_eq!(p.server.peer_extension(0xf0aa), None);
    // A peer that announces nothing leaves it unknown; the session still runs.
    let p = Pair::with_settings(with(vec![(0xf0c5, 1)]), Settings::default());
    assert_eq!(p.client.peer_extension(0xf0c5), None);
    let failed = |events: &[Event]| {
        events
            .iter()
            .any(|e| matches!(e, Event::ConnectionError(_)))
    };
    assert!(!failed(&p.client_events) && !failed(&p.server_events));
}
