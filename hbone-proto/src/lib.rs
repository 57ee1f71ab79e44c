//! # hbone-proto: the sans-IO core of ringtun's HBONE tunnels
//!
//! This crate speaks the HTTP/2 that Istio's HBONE uses (RFC 9113 with classic CONNECT,
//! §8.5): the frame codec (one module per frame type under [`frame`]), HPACK ([`hpack`],
//! RFC 7541), CONNECT request and response rules ([`connect`]), connection and stream flow
//! control ([`flow`]), and the [`Session`] state machine with keepalive PINGs, GOAWAY,
//! RST_STREAM and limits on everything a peer can grow. Its boundary: it performs no IO,
//! reads no clock (every time is an [`Instant`](std::time::Instant) the caller passes in),
//! spawns nothing and uses no `unsafe`. The reactor owns sockets, TLS, pipes and timers,
//! and drives a session with bytes and times, quinn-proto style.
//!
//! ## The zero-copy contract
//!
//! Payload bytes of DATA frames never have to enter the session (DESIGN.md §2: the proxy
//! writes only the 9-byte frame header and splices the payload).
//!
//! **Sending** (pipe → tunnel):
//! 1. Drain [`Session::poll_transmit`] first (HEADERS and control frames keep their order).
//! 2. `let n = session.send_capacity(stream)`: how much one frame may carry now (both
//!    windows and the peer's MAX_FRAME_SIZE). 0 means wait for [`Event::SendCapacity`].
//! 3. `let hdr = session.data_frame_header(stream, len, end_stream)?` for some `len <= n`:
//!    the credit is taken now. Write `hdr`, then splice exactly `len` bytes, nothing between.
//!
//! **Receiving** (tunnel → pipe):
//! 1. Read at most [`Session::input_wanted`] bytes and pass them to
//!    [`Session::handle_input`]. Control frames are handled inside; when a DATA frame header
//!    completes, it returns [`Input::DataPayload`] `{ consumed, stream, len, end_stream }`
//!    after taking only the 9-byte header (and the Pad Length byte of a PADDED frame).
//! 2. Either splice the `len` payload bytes to the stream's pipe yourself and report each
//!    chunk with [`Session::data_consumed`]`(stream, n)`, or (pipe full, user-space TLS, or
//!    any reason) pass the bytes to `handle_input`, which hands them back as [`Event::Data`].
//!    Padding is skipped by the session; END_STREAM becomes [`Event::StreamEnd`] once the
//!    payload is through.
//! 3. When bytes have left toward the destination socket, call
//!    [`Session::release_capacity`]`(stream, n)`. Only then does credit go back to the peer:
//!    WINDOW_UPDATEs are queued once half a window is released.
//!
//! ```
//! use hbone_proto::{ConnectRequest, Event, Input, Session, Settings};
//! use std::time::Instant;
//!
//! let now = Instant::now();
//! let mut client = Session::client(Settings::default(), now);
//! let mut server = Session::server(Settings::default(), now);
//! let (mut c2s, mut s2c) = (Vec::new(), Vec::new());
//!
//! // Client opens a tunnel to 10.0.0.7:8080.
//! let stream = client.open_stream(&ConnectRequest::new("10.0.0.7:8080".parse().unwrap())).unwrap();
//! client.poll_transmit(&mut c2s);
//! assert_eq!(server.handle_input(&c2s, now), Input::Consumed(c2s.len()));
//! c2s.clear();
//! while let Some(ev) = server.poll_event() {
//!     if let Event::Request { stream, request } = ev {
//!         assert_eq!(request.authority.port(), 8080);
//!         server.send_response(stream, 200, false).unwrap();
//!     }
//! }
//! server.poll_transmit(&mut s2c);
//! let _ = client.handle_input(&s2c, now);
//! s2c.clear();
//! let mut status = None;
//! while let Some(ev) = client.poll_event() {
//!     if let Event::Response { response, .. } = ev {
//!         status = Some(response.status);
//!     }
//! }
//! assert_eq!(status, Some(200));
//!
//! // Zero-copy send: header from the session, payload written by the caller (here a Vec
//! // stands in for the splice).
//! client.poll_transmit(&mut c2s); // SETTINGS ACK etc. go first
//! let payload = b"hello through the tunnel";
//! let hdr = client.data_frame_header(stream, payload.len(), false).unwrap();
//! c2s.extend_from_slice(&hdr);
//! c2s.extend_from_slice(payload);
//!
//! // Zero-copy receive: the server stops right after the DATA header.
//! let Input::DataPayload { consumed, stream: s, len, .. } = server.handle_input(&c2s, now) else {
//!     panic!("expected a DATA payload announcement")
//! };
//! assert_eq!(&c2s[consumed..consumed + len], payload); // the caller "splices" these
//! server.data_consumed(s, len).unwrap();
//! server.release_capacity(s, len).unwrap(); // once they reached the destination
//! ```
//!
//! ## Limits
//!
//! [`Settings::default`] is ztunnel's configuration (stream window 4 MiB, connection window
//! 16 MiB, MAX_FRAME_SIZE 1 MiB, 200 concurrent streams, PING every 10 s, 20 s timeout).
//! A peer that exceeds a limit gets the error code RFC 9113 names: REFUSED_STREAM for streams
//! beyond MAX_CONCURRENT_STREAMS, FRAME_SIZE_ERROR for oversized frames, FLOW_CONTROL_ERROR for
//! data beyond a window or a window above 2^31−1, PROTOCOL_ERROR for stream-ID and state
//! violations, COMPRESSION_ERROR for HPACK errors, and ENHANCE_YOUR_CALM for CONTINUATION
//! floods, oversized header blocks, rapid resets and PING/SETTINGS floods.

#![forbid(unsafe_code)]
#![warn(missing_debug_implementations)]

pub mod connect;
pub mod error;
pub mod flow;
pub mod frame;
pub mod hpack;
pub mod session;
pub mod settings;

pub use connect::{ConnectRequest, ConnectResponse, RequestError, ResponseError};
pub use error::{ConnectionError, ErrorCode, FrameError, SendError};
pub use frame::StreamId;
pub use session::{Event, Input, Session, PREFACE};
pub use settings::Settings;
