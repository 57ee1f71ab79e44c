//! Every limit and rule a peer can break, checked against the error code RFC 9113 names.
//! A raw peer (hand-built frames) talks to our server session.

use hbone_proto::frame::{self, Frame, StreamId};
use hbone_proto::hpack::{Encoder, Field};
use hbone_proto::{ConnectionError, ErrorCode, Event, Input, Session, Settings, PREFACE};
use std::time::{Duration, Instant};

struct Raw {
    now: Instant,
    server: Session,
    enc: Encoder,
}

impl Raw {
    fn new(settings: Settings) -> Raw {
        let now = Instant::now();
        let mut r = Raw {
            now,
            server: Session::server(settings, now),
            enc: Encoder::new(),
        };
        let mut b = PREFACE.to_vec();
        frame::Settings {
            ack: false,
            params: vec![],
        }
        .encode(&mut b);
        r.input(&b);
        r
    }

    fn input(&mut self, b: &[u8]) {
        let mut off = 0;
        while off < b.len() {
            match self.server.handle_input(&b[off..], self.now) {
                Input::Consumed(n) => off += n,
                Input::DataPayload { consumed, .. } => off += consumed,
            }
        }
    }

    fn frame(&mut self, f: Frame) {
        let mut b = Vec::new();
        f.encode(&mut b);
        self.input(&b);
    }

    fn request_block(&mut self) -> Vec<u8> {
        let mut block = Vec::new();
        self.enc.encode(
            &[
                Field::new(":method", "CONNECT"),
                Field::new(":authority", "10.0.0.1:80"),
            ],
            &mut block,
        );
        block
    }

    fn open(&mut self, id: u32) {
        let fragment = self.request_block();
        self.frame(Frame::Headers(frame::Headers {
            stream_id: StreamId::new(id),
            fragment,
            end_stream: false,
            end_headers: true,
            priority: None,
            pad_len: None,
        }));
    }

    /// Frames the server wants to send.
    fn sent(&mut self) -> Vec<Frame> {
        let mut b = Vec::new();
        self.server.poll_transmit(&mut b);
        let mut off = 0;
        let mut out = Vec::new();
        while let Some((f, n)) = frame::decode(&b[off..], (1 << 24) - 1).unwrap() {
            out.push(f);
            off += n;
        }
        out
    }

    fn goaway_code(&mut self) -> Option<ErrorCode> {
        self.sent().into_iter().find_map(|f| match f {
            Frame::GoAway(g) => Some(g.code),
            _ => None,
        })
    }

    fn rst_code(&mut self, id: u32) -> Option<ErrorCode> {
        self.sent().into_iter().find_map(|f| match f {
            Frame::RstStream(r) if r.stream_id.get() == id => Some(r.code),
            _ => None,
        })
    }

    fn connection_error(&mut self) -> Option<ConnectionError> {
        std::iter::from_fn(|| self.server.poll_event()).find_map(|e| match e {
            Event::ConnectionError(c) => Some(c),
            _ => None,
        })
    }
}

fn raw() -> Raw {
    Raw::new(Settings::default())
}

#[test]
fn streams_beyond_max_concurrent_are_refused() {
    let mut r = Raw::new(Settings {
        max_concurrent_streams: 3,
        ..Settings::default()
    });
    for id in [1, 3, 5] {
        r.open(id);
    }
    r.sent();
    r.open(7);
    assert_eq!(r.rst_code(7), Some(ErrorCode::REFUSED_STREAM));
    assert_eq!(r.server.stream_count(), 3);
}

#[test]
fn header_list_over_limit_is_reported_as_431() {
    let mut r = Raw::new(Settings {
        max_header_list_size: 200,
        ..Settings::default()
    });
    let mut block = Vec::new();
    r.enc.encode(
        &[
            Field::new(":method", "CONNECT"),
            Field::new(":authority", "10.0.0.1:80"),
            Field::new("baggage", vec![b'x'; 300]),
        ],
        &mut block,
    );
    r.frame(Frame::Headers(frame::Headers {
        stream_id: StreamId::new(1),
        fragment: block,
        end_stream: false,
        end_headers: true,
        priority: None,
        pad_len: None,
    }));
    let err = std::iter::from_fn(|| r.server.poll_event())
        .find_map(|e| match e {
            Event::InvalidRequest { error, .. } => Some(error),
            _ => None,
        })
        .unwrap();
    assert_eq!(err.status(), 431);
}

#[test]
fn continuation_flood_is_enhance_your_calm() {
    let mut r = raw();
    let block = r.request_block();
    r.frame(Frame::Headers(frame::Headers {
        stream_id: StreamId::new(1),
        fragment: block[..1].to_vec(),
        end_stream: false,
        end_headers: false,
        priority: None,
        pad_len: None,
    }));
    for _ in 0..17 {
        r.frame(Frame::Continuation(frame::Continuation {
            stream_id: StreamId::new(1),
            fragment: vec![],
            end_headers: false,
        }));
    }
    assert_eq!(r.goaway_code(), Some(ErrorCode::ENHANCE_YOUR_CALM));
    assert!(r.server.is_closed());
}

#[test]
fn header_block_split_over_continuations_is_accepted() {
    let mut r = raw();
    let block = r.request_block();
    let (a, b) = block.split_at(2);
    r.frame(Frame::Headers(frame::Headers {
        stream_id: StreamId::new(1),
        fragment: a.to_vec(),
        end_stream: false,
        end_headers: false,
        priority: None,
        pad_len: None,
    }));
    r.frame(Frame::Continuation(frame::Continuation {
        stream_id: StreamId::new(1),
        fragment: b.to_vec(),
        end_headers: true,
    }));
    assert!(
        std::iter::from_fn(|| r.server.poll_event()).any(|e| matches!(e, Event::Request { .. }))
    );
}

#[test]
fn interrupted_header_block_is_protocol_error() {
    let mut r = raw();
    r.frame(Frame::Headers(frame::Headers {
        stream_id: StreamId::new(1),
        fragment: vec![0x82],
        end_stream: false,
        end_headers: false,
        priority: None,
        pad_len: None,
    }));
    r.frame(Frame::Ping(frame::Ping {
        ack: false,
        data: [0; 8],
    }));
    assert_eq!(r.goaway_code(), Some(ErrorCode::PROTOCOL_ERROR));
}

#[test]
fn rapid_reset_is_enhance_your_calm() {
    let mut r = Raw::new(Settings {
        max_resets_per_second: 10,
        ..Settings::default()
    });
    for i in 0..10u32 {
        let id = 1 + 2 * i;
        r.open(id);
        r.frame(Frame::RstStream(frame::RstStream {
            stream_id: StreamId::new(id),
            code: ErrorCode::CANCEL,
        }));
    }
    assert!(!r.server.is_closed());
    r.open(21);
    r.frame(Frame::RstStream(frame::RstStream {
        stream_id: StreamId::new(21),
        code: ErrorCode::CANCEL,
    }));
    assert_eq!(r.goaway_code(), Some(ErrorCode::ENHANCE_YOUR_CALM));
}

#[test]
fn resets_spread_over_time_are_allowed() {
    let mut r = Raw::new(Settings {
        max_resets_per_second: 10,
        ..Settings::default()
    });
    for i in 0..30u32 {
        let id = 1 + 2 * i;
        r.open(id);
        r.frame(Frame::RstStream(frame::RstStream {
            stream_id: StreamId::new(id),
            code: ErrorCode::CANCEL,
        }));
        r.now += Duration::from_millis(200);
    }
    assert!(!r.server.is_closed());
}

#[test]
fn ping_flood_without_reading_is_enhance_your_calm() {
    let mut r = Raw::new(Settings {
        max_queued_control_frames: 50,
        ..Settings::default()
    });
    r.sent();
    for _ in 0..51 {
        r.frame(Frame::Ping(frame::Ping {
            ack: false,
            data: [1; 8],
        }));
    }
    assert_eq!(r.goaway_code(), Some(ErrorCode::ENHANCE_YOUR_CALM));
}

#[test]
fn pings_are_answered_with_the_same_payload() {
    let mut r = raw();
    r.sent();
    r.frame(Frame::Ping(frame::Ping {
        ack: false,
        data: *b"12345678",
    }));
    assert_eq!(
        r.sent(),
        [Frame::Ping(frame::Ping {
            ack: true,
            data: *b"12345678"
        })]
    );
}

#[test]
fn data_beyond_stream_window_is_flow_control_error() {
    let mut r = Raw::new(Settings {
        initial_stream_window: 100,
        ..Settings::default()
    });
    r.open(1);
    r.sent();
    r.frame(Frame::Data(frame::Data {
        stream_id: StreamId::new(1),
        payload: vec![0; 101],
        end_stream: false,
        pad_len: None,
    }));
    assert_eq!(r.rst_code(1), Some(ErrorCode::FLOW_CONTROL_ERROR));
    assert!(!r.server.is_closed());
}

#[test]
fn data_beyond_connection_window_is_connection_flow_control_error() {
    let mut r = Raw::new(Settings {
        connection_window: 65_535,
        initial_stream_window: 1 << 20,
        ..Settings::default()
    });
    r.open(1);
    r.frame(Frame::Data(frame::Data {
        stream_id: StreamId::new(1),
        payload: vec![0; 65_536],
        end_stream: false,
        pad_len: None,
    }));
    assert_eq!(r.goaway_code(), Some(ErrorCode::FLOW_CONTROL_ERROR));
}

#[test]
fn window_update_past_2_31_minus_1_is_flow_control_error() {
    let mut r = raw();
    r.open(1);
    r.sent();
    r.frame(Frame::WindowUpdate(frame::WindowUpdate {
        stream_id: StreamId::new(1),
        increment: (1 << 31) - 1,
    }));
    assert_eq!(r.rst_code(1), Some(ErrorCode::FLOW_CONTROL_ERROR));
    r.frame(Frame::WindowUpdate(frame::WindowUpdate {
        stream_id: StreamId::ZERO,
        increment: (1 << 31) - 1,
    }));
    assert_eq!(r.goaway_code(), Some(ErrorCode::FLOW_CONTROL_ERROR));
}

#[test]
fn initial_window_change_overflowing_a_stream_is_flow_control_error() {
    let mut r = raw();
    r.open(1);
    r.frame(Frame::WindowUpdate(frame::WindowUpdate {
        stream_id: StreamId::new(1),
        increment: (1 << 31) - 65_536,
    }));
    r.sent();
    r.frame(Frame::Settings(frame::Settings {
        ack: false,
        params: vec![frame::Setting::InitialWindowSize(65_536)],
    }));
    assert_eq!(r.goaway_code(), Some(ErrorCode::FLOW_CONTROL_ERROR));
}

#[test]
fn initial_window_decrease_may_make_send_window_negative() {
    let mut r = raw();
    r.open(1);
    r.server
        .send_response(StreamId::new(1), 200, false)
        .unwrap();
    r.sent();
    for _ in 0..4 {
        let hdr = r
            .server
            .data_frame_header(StreamId::new(1), 15_000, false)
            .unwrap();
        assert_eq!(hdr[..3], [0, 0x3a, 0x98]);
    }
    r.frame(Frame::Settings(frame::Settings {
        ack: false,
        params: vec![frame::Setting::InitialWindowSize(1000)],
    }));
    assert_eq!(
        r.server.stream_send_window(StreamId::new(1)),
        Some(1000 - 60_000)
    );
    assert_eq!(r.server.send_capacity(StreamId::new(1)), 0);
    assert!(!r.server.is_closed());
}

#[test]
fn oversized_frame_is_frame_size_error() {
    let mut r = Raw::new(Settings {
        max_frame_size: 16_384,
        ..Settings::default()
    });
    r.open(1);
    r.frame(Frame::Data(frame::Data {
        stream_id: StreamId::new(1),
        payload: vec![0; 16_385],
        end_stream: false,
        pad_len: None,
    }));
    assert_eq!(r.goaway_code(), Some(ErrorCode::FRAME_SIZE_ERROR));
}

#[test]
fn even_stream_id_from_client_is_protocol_error() {
    let mut r = raw();
    r.open(2);
    assert_eq!(r.goaway_code(), Some(ErrorCode::PROTOCOL_ERROR));
}

#[test]
fn decreasing_stream_id_is_protocol_error() {
    let mut r = raw();
    r.open(5);
    r.open(3);
    assert_eq!(r.goaway_code(), Some(ErrorCode::PROTOCOL_ERROR));
}

#[test]
fn data_on_idle_stream_is_protocol_error() {
    let mut r = raw();
    r.frame(Frame::Data(frame::Data {
        stream_id: StreamId::new(1),
        payload: vec![1],
        end_stream: false,
        pad_len: None,
    }));
    assert_eq!(r.goaway_code(), Some(ErrorCode::PROTOCOL_ERROR));
}

#[test]
fn data_after_end_stream_is_stream_closed() {
    let mut r = raw();
    r.open(1);
    r.frame(Frame::Data(frame::Data {
        stream_id: StreamId::new(1),
        payload: vec![],
        end_stream: true,
        pad_len: None,
    }));
    r.sent();
    r.frame(Frame::Data(frame::Data {
        stream_id: StreamId::new(1),
        payload: vec![1, 2],
        end_stream: false,
        pad_len: None,
    }));
    assert_eq!(r.rst_code(1), Some(ErrorCode::STREAM_CLOSED));
}

#[test]
fn hpack_garbage_is_compression_error() {
    let mut r = raw();
    r.frame(Frame::Headers(frame::Headers {
        stream_id: StreamId::new(1),
        fragment: vec![0x80],
        end_stream: false,
        end_headers: true,
        priority: None,
        pad_len: None,
    }));
    assert_eq!(r.goaway_code(), Some(ErrorCode::COMPRESSION_ERROR));
}

#[test]
fn push_promise_to_server_is_protocol_error() {
    let mut r = raw();
    r.open(1);
    r.frame(Frame::PushPromise(frame::PushPromise {
        stream_id: StreamId::new(1),
        promised_id: StreamId::new(2),
        fragment: vec![],
        end_headers: true,
        pad_len: None,
    }));
    assert_eq!(r.goaway_code(), Some(ErrorCode::PROTOCOL_ERROR));
}

#[test]
fn invalid_preface_is_protocol_error() {
    let now = Instant::now();
    let mut s = Session::server(Settings::default(), now);
    let _ = s.handle_input(b"GET / HTTP/1.1\r\n", now);
    assert!(s.is_closed());
    let mut b = Vec::new();
    s.poll_transmit(&mut b);
    assert!(std::iter::from_fn(|| s.poll_event()).any(|e| matches!(
        e,
        Event::ConnectionError(ConnectionError::Protocol {
            code: ErrorCode::PROTOCOL_ERROR,
            ..
        })
    )));
}

#[test]
fn first_frame_not_settings_is_protocol_error() {
    let now = Instant::now();
    let mut s = Session::server(Settings::default(), now);
    let mut b = PREFACE.to_vec();
    frame::Ping {
        ack: false,
        data: [0; 8],
    }
    .encode(&mut b);
    let _ = s.handle_input(&b, now);
    assert!(s.is_closed());
}

#[test]
fn self_dependent_headers_resets_only_that_stream() {
    let mut r = raw();
    let fragment = r.request_block();
    r.frame(Frame::Headers(frame::Headers {
        stream_id: StreamId::new(1),
        fragment,
        end_stream: false,
        end_headers: true,
        priority: Some(frame::PrioritySpec {
            dependency: StreamId::new(1),
            exclusive: false,
            weight: 0,
        }),
        pad_len: None,
    }));
    assert_eq!(r.rst_code(1), Some(ErrorCode::PROTOCOL_ERROR));
    r.open(3);
    assert!(!r.server.is_closed());
    assert!(r.connection_error().is_none());
}
