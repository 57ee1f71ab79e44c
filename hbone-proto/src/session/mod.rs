//! The HTTP/2 session state machine: bytes in, events out, bytes to send, timers.
//!
//! It follows quinn-proto's shape: [`Session::handle_input`] takes received bytes,
//! [`Session::poll_event`] yields what happened, [`Session::poll_transmit`] yields the control
//! frames and HEADERS to write, [`Session::handle_timeout`] / [`Session::poll_timeout`] drive
//! keepalive. DATA payloads never have to pass through it; see the crate docs for the sequence.

mod stream;

use crate::connect::{ConnectRequest, ConnectResponse, RequestError};
use crate::error::{ConnectionError, ErrorCode, FrameError, SendError};
use crate::flow::{RecvWindow, SendWindow, DEFAULT_WINDOW};
use crate::frame::{
    self, flags, Continuation, Frame, FrameHeader, FrameType, GoAway, Headers, Ping, RstStream,
    Setting, StreamId, WindowUpdate, FRAME_HEADER_LEN,
};
use crate::hpack::{self, Field};
use crate::settings::Settings;
use std::collections::{HashMap, VecDeque};
use std::time::{Duration, Instant};
use stream::Stream;

/// The client connection preface.
//= rfc9113#section-3.4
//# In HTTP/2, each endpoint is required to send a connection preface as a
//# final confirmation of the protocol in use and to establish the
//# initial settings for the HTTP/2 connection.
pub const PREFACE: &[u8; 24] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

/// How many recently reset stream IDs are remembered, so frames the peer sent before it saw
/// our RST_STREAM are ignored rather than treated as errors.
const RECENT_RESETS: usize = 64;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Role {
    Client,
    Server,
}

/// What [`Session::handle_input`] did with the bytes it was given.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[must_use]
pub enum Input {
    /// The session took this many bytes (all of them, unless it is closed).
    Consumed(usize),
    /// The session took `consumed` bytes, the last of which completed a DATA frame header:
    /// the next `len` bytes of the connection are payload of `stream`.
    ///
    /// Either move them yourself (splice) and report each chunk with
    /// [`Session::data_consumed`], or pass them to `handle_input`, which returns them as
    /// [`Event::Data`]. Padding after the payload is skipped by the session either way.
    /// When the payload ends, END_STREAM (if `end_stream`) is reported as [`Event::StreamEnd`].
    DataPayload {
        consumed: usize,
        stream: StreamId,
        len: usize,
        end_stream: bool,
    },
}

/// Something the caller needs to act on.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Event {
    /// Server: the peer opened `stream` with a valid CONNECT request. Answer with
    /// [`Session::send_response`].
    Request {
        stream: StreamId,
        request: ConnectRequest,
    },
    /// Server: the peer opened `stream` with a malformed request. Answer with
    /// `send_response(stream, error.status(), true)` and/or [`Session::reset`] with
    /// PROTOCOL_ERROR.
    InvalidRequest {
        stream: StreamId,
        error: RequestError,
    },
    /// Client: the final response to our CONNECT on `stream`. Anything but 2xx means no tunnel.
    Response {
        stream: StreamId,
        response: ConnectResponse,
    },
    /// Payload of `stream` that the caller chose to feed through `handle_input`. The bytes
    /// still hold flow-control credit until released with [`Session::release_capacity`].
    Data { stream: StreamId, data: Vec<u8> },
    /// The peer sent END_STREAM: no more bytes will arrive on `stream` (TCP FIN). The other
    /// direction stays open.
    StreamEnd { stream: StreamId },
    /// `stream` was reset, by the peer (`remote`) or by the session after the peer broke a
    /// stream rule. [`ErrorCode::is_eof`] tells whether HBONE treats it as a clean end.
    Reset {
        stream: StreamId,
        code: ErrorCode,
        remote: bool,
    },
    /// More send credit: for `stream`, or for the whole connection (`None`).
    SendCapacity { stream: Option<StreamId> },
    /// The peer sent GOAWAY: no new streams; streams above `last_stream_id` were reset.
    GoAway {
        last_stream_id: StreamId,
        code: ErrorCode,
        debug: Vec<u8>,
    },
    /// A GOAWAY is in effect and no stream is left: flush `poll_transmit` and close.
    Drained,
    /// The connection is dead; flush `poll_transmit` (it may hold our GOAWAY) and close.
    ConnectionError(ConnectionError),
}

#[derive(Debug)]
enum ReadState {
    /// Server: matching the client preface.
    Preface { matched: usize },
    /// Collecting a frame header into `hdr`.
    Header,
    /// A PADDED DATA frame: waiting for its Pad Length byte.
    PadLength { header: FrameHeader },
    /// Collecting a non-DATA frame's payload into `body`.
    Body { header: FrameHeader },
    /// DATA payload bytes. `discard`: the session drops them (stream gone) instead of the
    /// caller taking them.
    Payload {
        stream: StreamId,
        remaining: usize,
        padding: usize,
        end_stream: bool,
        discard: bool,
    },
    /// Padding bytes to skip.
    Skip { remaining: usize },
}

/// A header block being collected across HEADERS and CONTINUATION frames.
#[derive(Debug)]
struct HeaderBlock {
    stream: StreamId,
    buf: Vec<u8>,
    end_stream: bool,
    continuations: u32,
    /// The HEADERS frame named its own stream as dependency: a stream error, raised only after
    /// the block is decoded so the HPACK state stays in step.
    self_dependent: bool,
}

#[derive(Debug, Clone, Copy)]
struct PeerSettings {
    max_frame_size: u32,
    initial_window: u32,
    max_concurrent_streams: u32,
}

/// One HTTP/2 connection carrying HBONE CONNECT streams. See the crate docs.
#[derive(Debug)]
pub struct Session {
    role: Role,
    local: Settings,
    peer: PeerSettings,
    /// The peer's values of the extension settings we announce ([`Settings::extensions`]).
    peer_extensions: Vec<(u16, u32)>,

    read: ReadState,
    hdr: [u8; FRAME_HEADER_LEN],
    hdr_len: usize,
    body: Vec<u8>,
    got_peer_settings: bool,
    block: Option<HeaderBlock>,
    decoder: hpack::Decoder,
    encoder: hpack::Encoder,

    streams: HashMap<StreamId, Stream>,
    next_local_stream: u32,
    last_peer_stream: StreamId,
    recent_resets: VecDeque<StreamId>,
    conn_send: SendWindow,
    conn_recv: RecvWindow,

    out: Vec<u8>,
    queued_control: u32,
    events: VecDeque<Event>,

    goaway_sent: Option<StreamId>,
    goaway_received: Option<StreamId>,
    drained_reported: bool,
    closed: bool,

    next_ping: Option<Instant>,
    ping_sent: Option<(Instant, [u8; 8])>,
    pings: u64,

    reset_window_start: Option<Instant>,
    resets_in_window: u32,
}

impl Session {
    /// A client session: queues the preface, SETTINGS and the connection window update.
    pub fn client(settings: Settings, now: Instant) -> Session {
        let mut s = Session::new(Role::Client, settings, now);
        s.out.extend_from_slice(PREFACE);
        s.queue_initial_frames();
        s
    }

    /// A server session: expects the client preface; queues SETTINGS and the window update.
    //= rfc9113#section-3.4
    //# The server connection preface consists of a potentially empty
    //# SETTINGS frame (Section 6.5) that MUST be the first frame the server
    //# sends in the HTTP/2 connection.
    pub fn server(settings: Settings, now: Instant) -> Session {
        let mut s = Session::new(Role::Server, settings, now);
        s.read = ReadState::Preface { matched: 0 };
        s.queue_initial_frames();
        s
    }

    fn new(role: Role, local: Settings, now: Instant) -> Session {
        Session {
            role,
            peer: PeerSettings {
                max_frame_size: frame::DEFAULT_MAX_FRAME_SIZE,
                initial_window: DEFAULT_WINDOW,
                // No limit until the peer's SETTINGS say otherwise.
                max_concurrent_streams: u32::MAX,
            },
            peer_extensions: Vec::new(),
            read: ReadState::Header,
            hdr: [0; FRAME_HEADER_LEN],
            hdr_len: 0,
            body: Vec::new(),
            got_peer_settings: false,
            block: None,
            decoder: hpack::Decoder::new(local.header_table_size as usize),
            encoder: hpack::Encoder::new(),
            streams: HashMap::new(),
            next_local_stream: if role == Role::Client { 1 } else { 2 },
            last_peer_stream: StreamId::ZERO,
            recent_resets: VecDeque::new(),
            conn_send: SendWindow::new(DEFAULT_WINDOW),
            conn_recv: RecvWindow::new(DEFAULT_WINDOW, local.connection_window),
            out: Vec::new(),
            queued_control: 0,
            events: VecDeque::new(),
            goaway_sent: None,
            goaway_received: None,
            drained_reported: false,
            closed: false,
            next_ping: local.keepalive_interval.map(|i| now + i),
            ping_sent: None,
            pings: 0,
            reset_window_start: None,
            resets_in_window: 0,
            local,
        }
    }

    fn queue_initial_frames(&mut self) {
        let mut params = vec![
            Setting::HeaderTableSize(self.local.header_table_size),
            Setting::InitialWindowSize(self.local.initial_stream_window),
            Setting::MaxFrameSize(self.local.max_frame_size),
            Setting::MaxHeaderListSize(self.local.max_header_list_size),
            Setting::MaxConcurrentStreams(self.local.max_concurrent_streams),
        ];
        if self.role == Role::Client {
            //= rfc9113#section-6.5.2
            //# SETTINGS_ENABLE_PUSH (0x02):  This setting can be used to enable or
            //# disable server push.
            params.push(Setting::EnablePush(false));
        }
        params.extend(
            self.local
                .extensions
                .iter()
                .map(|&(id, value)| Setting::Unknown(id, value)),
        );
        frame::Settings { ack: false, params }.encode(&mut self.out);
        //= rfc9113#section-6.9.2
        //# The connection flow-control window can only be changed using
        //# WINDOW_UPDATE frames.
        if self.local.connection_window > DEFAULT_WINDOW {
            self.conn_recv
                .grant(self.local.connection_window - DEFAULT_WINDOW);
            if let Some(inc) = self.conn_recv.take_pending() {
                self.queue_window_update(StreamId::ZERO, inc);
            }
        }
    }

    // ---------------------------------------------------------------- input

    /// How many bytes the session wants next without reading past a DATA payload boundary.
    ///
    /// A zero-copy reader reads at most this many bytes into user space, so it never pulls
    /// DATA payload into a buffer by accident. Returns 0 when the session is closed.
    pub fn input_wanted(&self) -> usize {
        if self.closed {
            return 0;
        }
        match &self.read {
            ReadState::Preface { matched } => PREFACE.len() - matched,
            ReadState::Header => FRAME_HEADER_LEN - self.hdr_len,
            ReadState::PadLength { .. } => 1,
            ReadState::Body { header } => header.length as usize - self.body.len(),
            ReadState::Payload {
                remaining, padding, ..
            } => remaining + padding,
            ReadState::Skip { remaining } => *remaining,
        }
    }

    /// True between frames (past the preface, no frame partly read): a reader that parses
    /// frame headers itself may take over here.
    pub fn at_frame_boundary(&self) -> bool {
        matches!(self.read, ReadState::Header) && self.hdr_len == 0
    }

    /// The DATA payload the caller has been told about and not yet moved: `(stream, bytes)`.
    pub fn pending_payload(&self) -> Option<(StreamId, usize)> {
        match self.read {
            ReadState::Payload {
                stream,
                remaining,
                discard: false,
                ..
            } if remaining > 0 => Some((stream, remaining)),
            _ => None,
        }
    }

    /// Feeds bytes received from the peer. Partial frames are buffered inside the session
    /// (they are at most our MAX_FRAME_SIZE), so all bytes are consumed unless a DATA payload
    /// starts: then [`Input::DataPayload`] tells how far the session read.
    pub fn handle_input(&mut self, buf: &[u8], now: Instant) -> Input {
        let mut off = 0;
        while off < buf.len() && !self.closed {
            let rest = &buf[off..];
            match &mut self.read {
                ReadState::Preface { matched } => {
                    let n = rest.len().min(PREFACE.len() - *matched);
                    //= rfc9113#section-3.4
                    //# Clients and servers MUST treat an invalid connection preface as a
                    //# connection error (Section 5.4.1) of type PROTOCOL_ERROR.
                    if rest[..n] != PREFACE[*matched..*matched + n] {
                        self.fail(ErrorCode::PROTOCOL_ERROR, "invalid connection preface");
                        break;
                    }
                    *matched += n;
                    off += n;
                    if *matched == PREFACE.len() {
                        self.read = ReadState::Header;
                    }
                }
                ReadState::Header => {
                    let n = rest.len().min(FRAME_HEADER_LEN - self.hdr_len);
                    self.hdr[self.hdr_len..self.hdr_len + n].copy_from_slice(&rest[..n]);
                    self.hdr_len += n;
                    off += n;
                    if self.hdr_len == FRAME_HEADER_LEN {
                        self.hdr_len = 0;
                        let header = FrameHeader::decode(&self.hdr).expect("9 bytes");
                        if let Some(announce) = self.on_frame_header(header, now) {
                            return self.announce(off, announce);
                        }
                    }
                }
                ReadState::PadLength { header } => {
                    let header = *header;
                    off += 1;
                    if let Some(announce) = self.start_data(header, Some(rest[0])) {
                        return self.announce(off, announce);
                    }
                }
                ReadState::Body { header } => {
                    let header = *header;
                    let n = rest.len().min(header.length as usize - self.body.len());
                    self.body.extend_from_slice(&rest[..n]);
                    off += n;
                    if self.body.len() == header.length as usize {
                        self.read = ReadState::Header;
                        let body = std::mem::take(&mut self.body);
                        self.on_frame(header, &body, now);
                        self.body = body;
                        self.body.clear();
                    }
                }
                ReadState::Payload {
                    stream,
                    remaining,
                    discard,
                    ..
                } => {
                    let n = rest.len().min(*remaining);
                    if !*discard && n > 0 {
                        let stream = *stream;
                        self.events.push_back(Event::Data {
                            stream,
                            data: rest[..n].to_vec(),
                        });
                    }
                    off += n;
                    self.advance_payload(n);
                }
                ReadState::Skip { remaining } => {
                    let n = rest.len().min(*remaining);
                    *remaining -= n;
                    off += n;
                    if *remaining == 0 {
                        self.read = ReadState::Header;
                    }
                }
            }
        }
        if self.closed {
            // A dead connection swallows whatever still arrives.
            return Input::Consumed(buf.len());
        }
        Input::Consumed(off)
    }

    fn announce(
        &self,
        consumed: usize,
        (stream, len, end_stream): (StreamId, usize, bool),
    ) -> Input {
        Input::DataPayload {
            consumed,
            stream,
            len,
            end_stream,
        }
    }

    /// Reports that the caller moved `len` payload bytes of `stream` itself.
    pub fn data_consumed(&mut self, stream: StreamId, len: usize) -> Result<(), SendError> {
        match self.read {
            ReadState::Payload {
                stream: s,
                remaining,
                discard: false,
                ..
            } if s == stream && len <= remaining => {
                self.advance_payload(len);
                Ok(())
            }
            _ => Err(SendError::NoPendingPayload { stream, len }),
        }
    }

    fn advance_payload(&mut self, n: usize) {
        let ReadState::Payload {
            stream,
            remaining,
            padding,
            end_stream,
            discard,
        } = &mut self.read
        else {
            return;
        };
        *remaining -= n;
        let (stream, remaining, padding, end_stream, discard) =
            (*stream, *remaining, *padding, *end_stream, *discard);
        if discard {
            // Nobody will release these bytes: return their connection credit now.
            self.release_conn_internal(n);
        }
        if remaining > 0 {
            return;
        }
        self.read = if padding > 0 {
            ReadState::Skip { remaining: padding }
        } else {
            ReadState::Header
        };
        if end_stream && !discard {
            self.remote_end(stream);
        }
    }

    /// A frame header arrived. Returns a DATA announcement when the caller takes over.
    fn on_frame_header(
        &mut self,
        header: FrameHeader,
        now: Instant,
    ) -> Option<(StreamId, usize, bool)> {
        if let Err(e) = frame::check_length(&header, self.local.max_frame_size) {
            self.frame_error(e);
            return None;
        }
        //= rfc9113#section-3.4
        //# The SETTINGS frames received from a peer as part of the connection
        //# preface MUST be acknowledged (see Section 6.5.3) after sending the
        //# connection preface.
        if !self.got_peer_settings && (header.kind != FrameType::Settings || header.has(flags::ACK))
        {
            self.fail(
                ErrorCode::PROTOCOL_ERROR,
                "first frame from the peer is not SETTINGS",
            );
            return None;
        }
        //= rfc9113#section-6.10
        //# A receiver MUST treat the receipt of any other type of frame or a frame on a
        //# different stream as a connection error (Section 5.4.1) of type
        //# PROTOCOL_ERROR.
        if let Some(b) = &self.block {
            if header.kind != FrameType::Continuation || header.stream_id != b.stream {
                self.fail(ErrorCode::PROTOCOL_ERROR, "header block interrupted");
                return None;
            }
        }
        if header.kind == FrameType::Data {
            if let Err(e) = frame::data::check_stream(header.stream_id) {
                self.frame_error(e);
                return None;
            }
            if header.has(flags::PADDED) {
                if header.length == 0 {
                    self.fail(
                        ErrorCode::FRAME_SIZE_ERROR,
                        "PADDED DATA frame without Pad Length",
                    );
                    return None;
                }
                self.read = ReadState::PadLength { header };
                return None;
            }
            return self.start_data(header, None);
        }
        if header.length == 0 {
            self.on_frame(header, &[], now);
        } else {
            self.read = ReadState::Body { header };
        }
        None
    }

    /// Applies flow control to a DATA frame and decides who takes its payload.
    fn start_data(
        &mut self,
        header: FrameHeader,
        pad: Option<u8>,
    ) -> Option<(StreamId, usize, bool)> {
        let id = header.stream_id;
        let flow_len = header.length as usize;
        let overhead = pad.map_or(0, |p| 1 + p as usize);
        if overhead > flow_len {
            self.fail(
                ErrorCode::PROTOCOL_ERROR,
                "DATA padding longer than the frame payload",
            );
            return None;
        }
        let data_len = flow_len - overhead;
        let end_stream = header.has(flags::END_STREAM);
        //= rfc9113#section-6.9.1
        //# The sender MUST NOT send a flow-controlled frame with a length that exceeds the
        //# space available in either of the flow-control windows advertised by the
        //# receiver.
        if self.conn_recv.receive(flow_len).is_err() {
            self.fail(
                ErrorCode::FLOW_CONTROL_ERROR,
                "DATA beyond the connection window",
            );
            return None;
        }
        // Pad Length and padding are ours to release right away.
        self.release_conn_internal(overhead);
        let mut discard = true;
        match self.stream_state(id) {
            StreamState::Open => {
                let s = self.streams.get_mut(&id).expect("open stream");
                if s.remote_closed {
                    //= rfc9113#section-5.1
                    //# If an endpoint receives additional frames, other than
                    //# WINDOW_UPDATE, PRIORITY, or RST_STREAM, for a stream that is in
                    //# this state, it MUST respond with a stream error (Section 5.4.2) of
                    //# type STREAM_CLOSED.
                    self.stream_error(id, ErrorCode::STREAM_CLOSED);
                } else if !s.headers_received {
                    self.stream_error(id, ErrorCode::PROTOCOL_ERROR);
                } else if s.recv.receive(flow_len).is_err() {
                    self.stream_error(id, ErrorCode::FLOW_CONTROL_ERROR);
                } else {
                    let _ = s.recv.release(overhead);
                    discard = false;
                }
            }
            StreamState::Idle => {
                //= rfc9113#section-5.1
                //# Receiving any frame other than HEADERS or PRIORITY on a stream in
                //# this state MUST be treated as a connection error (Section 5.4.1) of
                //# type PROTOCOL_ERROR.
                self.fail(ErrorCode::PROTOCOL_ERROR, "DATA on an idle stream");
                return None;
            }
            StreamState::Closed => self.closed_stream_frame(id),
        }
        let pad_bytes = pad.map_or(0, |p| p as usize);
        if data_len == 0 {
            self.read = if pad_bytes > 0 {
                ReadState::Skip {
                    remaining: pad_bytes,
                }
            } else {
                ReadState::Header
            };
            if end_stream && !discard {
                self.remote_end(id);
            }
            return None;
        }
        // A discarded payload is drained by the session and its connection credit released
        // as it goes (`advance_payload`).
        self.read = ReadState::Payload {
            stream: id,
            remaining: data_len,
            padding: pad_bytes,
            end_stream,
            discard,
        };
        if discard {
            return None;
        }
        Some((id, data_len, end_stream))
    }

    fn on_frame(&mut self, header: FrameHeader, body: &[u8], now: Instant) {
        let frame = match Frame::decode_payload(header, body) {
            Ok(f) => f,
            Err(e) => {
                self.frame_error(e);
                return;
            }
        };
        match frame {
            Frame::Data(_) => unreachable!("DATA is handled by start_data"),
            Frame::Headers(h) => self.on_headers(h),
            Frame::Continuation(c) => self.on_continuation(c),
            //= rfc9113#section-5.3.2
            //# Endpoints MUST handle and ignore the deprecated
            //# PRIORITY signals
            Frame::Priority(_) => {}
            Frame::RstStream(r) => self.on_rst_stream(r, now),
            Frame::Settings(s) => self.on_settings(s),
            Frame::PushPromise(_) => {
                //= rfc9113#section-8.4
                //# A client cannot push.  Thus, servers MUST treat the receipt of a
                //# PUSH_PROMISE frame as a connection error (Section 5.4.1) of type
                //# PROTOCOL_ERROR.
                //= rfc9113#section-6.6
                //# PUSH_PROMISE MUST NOT be sent if the SETTINGS_ENABLE_PUSH setting of
                //# the peer endpoint is set to 0.
                self.fail(
                    ErrorCode::PROTOCOL_ERROR,
                    "PUSH_PROMISE received; push is disabled",
                );
            }
            Frame::Ping(p) => self.on_ping(p, now),
            Frame::GoAway(g) => self.on_goaway(g),
            Frame::WindowUpdate(w) => self.on_window_update(w),
            Frame::Unknown { .. } => {}
        }
    }

    fn on_headers(&mut self, h: Headers) {
        let block = HeaderBlock {
            stream: h.stream_id,
            buf: h.fragment,
            end_stream: h.end_stream,
            continuations: 0,
            self_dependent: h.priority.is_some_and(|p| p.dependency == h.stream_id),
        };
        if block.buf.len() > self.local.max_header_block_bytes() {
            self.fail(ErrorCode::ENHANCE_YOUR_CALM, "header block too large");
            return;
        }
        if h.end_headers {
            self.on_header_block(block);
        } else {
            self.block = Some(block);
        }
    }

    fn on_continuation(&mut self, c: Continuation) {
        let Some(mut block) = self.block.take() else {
            //= rfc9113#section-6.10
            //# A CONTINUATION frame MUST be preceded by a HEADERS, PUSH_PROMISE or
            //# CONTINUATION frame without the END_HEADERS flag set.  A recipient that
            //# observes violation of this rule MUST respond with a connection error
            //# (Section 5.4.1) of type PROTOCOL_ERROR.
            self.fail(
                ErrorCode::PROTOCOL_ERROR,
                "CONTINUATION without a header block",
            );
            return;
        };
        block.continuations += 1;
        // CONTINUATION flood: a peer could otherwise make us buffer without end.
        if block.continuations > self.local.max_continuation_frames {
            self.fail(ErrorCode::ENHANCE_YOUR_CALM, "too many CONTINUATION frames");
            return;
        }
        block.buf.extend_from_slice(&c.fragment);
        if block.buf.len() > self.local.max_header_block_bytes() {
            self.fail(ErrorCode::ENHANCE_YOUR_CALM, "header block too large");
            return;
        }
        if c.end_headers {
            self.on_header_block(block);
        } else {
            self.block = Some(block);
        }
    }

    fn on_header_block(&mut self, block: HeaderBlock) {
        let limit = self.local.max_header_list_size as usize;
        //= rfc9113#section-4.3
        //# A decoding error in a field block MUST be treated as a connection error
        //# (Section 5.4.1) of type COMPRESSION_ERROR.
        let decoded = match self.decoder.decode(&block.buf, limit) {
            Ok(d) => d,
            Err(_) => {
                self.fail(ErrorCode::COMPRESSION_ERROR, "HPACK decoding failed");
                return;
            }
        };
        let id = block.stream;
        if block.self_dependent {
            //= rfc9113#section-5.3.1
            //# A stream cannot depend on itself.  An endpoint MUST treat this as a
            //# stream error (Section 5.4.2) of type PROTOCOL_ERROR.
            if self.is_peer_initiated(id) && id > self.last_peer_stream {
                self.last_peer_stream = id;
            }
            self.stream_error(id, ErrorCode::PROTOCOL_ERROR);
            return;
        }
        match self.stream_state(id) {
            StreamState::Open => {
                let s = self.streams.get_mut(&id).expect("open stream");
                if s.remote_closed {
                    self.stream_error(id, ErrorCode::STREAM_CLOSED);
                } else if !s.headers_received {
                    self.on_response(id, decoded, block.end_stream);
                } else if !block.end_stream {
                    //= rfc9113#section-8.1
                    //# An endpoint that receives a HEADERS frame without the END_STREAM flag
                    //# set after receiving the HEADERS frame that opens a request or after
                    //# receiving a final (non-informational) status code MUST treat the
                    //# corresponding request or response as malformed (Section 8.1.1).
                    self.stream_error(id, ErrorCode::PROTOCOL_ERROR);
                } else {
                    // Trailers: nothing in them matters to a tunnel.
                    self.remote_end(id);
                }
            }
            StreamState::Closed => {
                if self.recent_resets.contains(&id) {
                    return;
                }
                //= rfc9113#section-5.1.1
                //# An endpoint that receives an unexpected stream identifier MUST respond
                //# with a connection error (Section 5.4.1) of type PROTOCOL_ERROR.
                self.fail(ErrorCode::PROTOCOL_ERROR, "HEADERS on a closed stream");
            }
            StreamState::Idle => {
                if !self.is_peer_initiated(id) || self.role == Role::Client {
                    //= rfc9113#section-8.4
                    //# Promised requests MUST be initiated by the server
                    self.fail(
                        ErrorCode::PROTOCOL_ERROR,
                        "HEADERS opening a stream of the wrong parity",
                    );
                    return;
                }
                self.on_request(id, decoded, block.end_stream);
            }
        }
    }

    fn on_request(&mut self, id: StreamId, decoded: hpack::DecodedBlock, end_stream: bool) {
        self.last_peer_stream = id;
        //= rfc9113#section-6.8
        //# Once the GOAWAY is sent, the sender will ignore frames sent on streams
        //# initiated by the receiver if the stream has an identifier higher than
        //# the included last stream identifier.
        if self.goaway_sent.is_some_and(|last| id > last) {
            self.send_rst(id, ErrorCode::REFUSED_STREAM);
            return;
        }
        //= rfc9113#section-5.1.2
        //# An endpoint that receives a HEADERS frame that causes its advertised
        //# concurrent stream limit to be exceeded MUST treat this as a stream error
        //# (Section 5.4.2) of type PROTOCOL_ERROR or REFUSED_STREAM.
        if self.active_streams() >= self.local.max_concurrent_streams as usize {
            self.send_rst(id, ErrorCode::REFUSED_STREAM);
            return;
        }
        let mut s = Stream::new(self.peer.initial_window, self.local.initial_stream_window);
        s.headers_received = true;
        s.remote_closed = end_stream;
        self.streams.insert(id, s);
        let ev = if decoded.over_limit {
            //= rfc9113#section-10.5.1
            //# A server that receives a larger field block than it is willing to
            //# handle can send an HTTP 431 (Request Header Fields Too Large) status
            //# code [RFC6585].
            Event::InvalidRequest {
                stream: id,
                error: RequestError::HeaderListTooLarge {
                    size: decoded.list_size,
                    limit: self.local.max_header_list_size as usize,
                },
            }
        } else {
            match ConnectRequest::from_fields(&decoded.fields) {
                Ok(request) => Event::Request {
                    stream: id,
                    request,
                },
                Err(error) => Event::InvalidRequest { stream: id, error },
            }
        };
        self.events.push_back(ev);
        if end_stream {
            self.events.push_back(Event::StreamEnd { stream: id });
        }
    }

    fn on_response(&mut self, id: StreamId, decoded: hpack::DecodedBlock, end_stream: bool) {
        if decoded.over_limit {
            //= rfc9113#section-10.5.1
            //# A client can discard responses that it cannot process.
            self.stream_error(id, ErrorCode::PROTOCOL_ERROR);
            return;
        }
        let response = match ConnectResponse::from_fields(&decoded.fields) {
            Ok(r) => r,
            Err(_) => {
                self.stream_error(id, ErrorCode::PROTOCOL_ERROR);
                return;
            }
        };
        if response.is_interim() {
            if end_stream {
                self.stream_error(id, ErrorCode::PROTOCOL_ERROR);
            }
            return;
        }
        if let Some(s) = self.streams.get_mut(&id) {
            s.headers_received = true;
        }
        self.events.push_back(Event::Response {
            stream: id,
            response,
        });
        if end_stream {
            self.remote_end(id);
        }
    }

    fn on_rst_stream(&mut self, r: RstStream, now: Instant) {
        if self.stream_state(r.stream_id) == StreamState::Idle {
            //= rfc9113#section-6.4
            //# If a RST_STREAM frame identifying an idle stream is received, the
            //# recipient MUST treat this as a connection error (Section 5.4.1) of type
            //# PROTOCOL_ERROR.
            self.fail(ErrorCode::PROTOCOL_ERROR, "RST_STREAM on an idle stream");
            return;
        }
        // Rapid reset (CVE-2023-44487): opening and cancelling streams costs the peer
        // nothing and us a lot, so cap the rate.
        let start = *self.reset_window_start.get_or_insert(now);
        if now.saturating_duration_since(start) >= Duration::from_secs(1) {
            self.reset_window_start = Some(now);
            self.resets_in_window = 0;
        }
        self.resets_in_window += 1;
        if self.resets_in_window > self.local.max_resets_per_second {
            self.fail(
                ErrorCode::ENHANCE_YOUR_CALM,
                "too many RST_STREAM frames per second",
            );
            return;
        }
        if self.remove_stream(r.stream_id) {
            self.events.push_back(Event::Reset {
                stream: r.stream_id,
                code: r.code,
                remote: true,
            });
            self.check_drained();
        }
    }

    fn on_settings(&mut self, s: frame::Settings) {
        if s.ack {
            return;
        }
        self.got_peer_settings = true;
        for p in s.params {
            match p {
                Setting::HeaderTableSize(n) => self.encoder.peer_table_size(n as usize),
                Setting::EnablePush(true) if self.role == Role::Client => {
                    //= rfc9113#section-6.5.2
                    //# A client MUST treat receipt of a SETTINGS frame with
                    //# SETTINGS_ENABLE_PUSH set to 1 as a connection error (Section 5.4.1)
                    //# of type PROTOCOL_ERROR.
                    self.fail(
                        ErrorCode::PROTOCOL_ERROR,
                        "server sent SETTINGS_ENABLE_PUSH 1",
                    );
                    return;
                }
                Setting::EnablePush(_) => {}
                Setting::MaxConcurrentStreams(n) => self.peer.max_concurrent_streams = n,
                Setting::InitialWindowSize(n) => {
                    //= rfc9113#section-6.9.2
                    //# When the value of SETTINGS_INITIAL_WINDOW_SIZE changes, a receiver
                    //# MUST adjust the size of all stream flow-control windows that it
                    //# maintains by the difference between the new value and the old value.
                    let delta = n as i64 - self.peer.initial_window as i64;
                    self.peer.initial_window = n;
                    for s in self.streams.values_mut() {
                        //= rfc9113#section-6.9.2
                        //# An endpoint MUST treat a change to SETTINGS_INITIAL_WINDOW_SIZE that
                        //# causes any flow-control window to exceed the maximum size as a
                        //# connection error (Section 5.4.1) of type FLOW_CONTROL_ERROR.
                        if s.send.adjust(delta).is_err() {
                            self.fail(
                                ErrorCode::FLOW_CONTROL_ERROR,
                                "SETTINGS_INITIAL_WINDOW_SIZE overflows a window",
                            );
                            return;
                        }
                    }
                    if delta > 0 {
                        self.events.push_back(Event::SendCapacity { stream: None });
                    }
                }
                Setting::MaxFrameSize(n) => self.peer.max_frame_size = n,
                Setting::Unknown(id, value)
                    if self.local.extensions.iter().any(|&(ours, _)| ours == id) =>
                {
                    // Bounded by our own list: one entry per identifier we announce.
                    match self.peer_extensions.iter_mut().find(|(i, _)| *i == id) {
                        Some(entry) => entry.1 = value,
                        None => self.peer_extensions.push((id, value)),
                    }
                }
                Setting::MaxHeaderListSize(_) | Setting::Unknown(..) => {}
            }
        }
        //= rfc9113#section-6.5.3
        //# Upon receiving a SETTINGS frame without the ACK flag set, the receiver
        //# MUST immediately apply the updated settings and then send a SETTINGS
        //# frame with the ACK flag set.
        frame::Settings::ack().encode(&mut self.out);
        self.count_control_frame();
    }

    fn on_ping(&mut self, p: Ping, now: Instant) {
        if !p.ack {
            //= rfc9113#section-6.7
            //# Receivers of a PING frame that does not include an ACK flag MUST send
            //# a PING frame with the ACK flag set in response, with an identical
            //# frame payload.
            Ping {
                ack: true,
                data: p.data,
            }
            .encode(&mut self.out);
            self.count_control_frame();
            return;
        }
        if let Some((sent, data)) = self.ping_sent {
            if data == p.data {
                self.ping_sent = None;
                self.next_ping = self.local.keepalive_interval.map(|i| (sent + i).max(now));
            }
        }
    }

    fn on_goaway(&mut self, g: GoAway) {
        //= rfc9113#section-6.8
        //# Endpoints MUST NOT increase the value they send in the last stream
        //# identifier, since the peers might already have retried unprocessed
        //# requests on another connection.
        let last = match self.goaway_received {
            Some(prev) => prev.min(g.last_stream_id),
            None => g.last_stream_id,
        };
        self.goaway_received = Some(last);
        self.events.push_back(Event::GoAway {
            last_stream_id: g.last_stream_id,
            code: g.code,
            debug: g.debug,
        });
        //= rfc9113#section-6.8
        //# Activity on streams numbered lower than or equal to the last stream
        //# identifier might still complete successfully.
        let mut refused: Vec<StreamId> = self
            .streams
            .keys()
            .copied()
            .filter(|&id| !self.is_peer_initiated(id) && id > last)
            .collect();
        refused.sort();
        for id in refused {
            self.remove_stream(id);
            self.events.push_back(Event::Reset {
                stream: id,
                code: ErrorCode::REFUSED_STREAM,
                remote: true,
            });
        }
        self.check_drained();
    }

    fn on_window_update(&mut self, w: WindowUpdate) {
        if w.stream_id.is_zero() {
            //= rfc9113#section-6.9.1
            //# If a sender receives a WINDOW_UPDATE that causes a flow-control window to
            //# exceed this maximum, it MUST terminate either the stream or the connection,
            //# as appropriate.
            if self.conn_send.adjust(w.increment as i64).is_err() {
                self.fail(
                    ErrorCode::FLOW_CONTROL_ERROR,
                    "connection window above 2^31-1",
                );
                return;
            }
            self.events.push_back(Event::SendCapacity { stream: None });
            return;
        }
        match self.stream_state(w.stream_id) {
            StreamState::Idle => {
                self.fail(ErrorCode::PROTOCOL_ERROR, "WINDOW_UPDATE on an idle stream");
            }
            StreamState::Closed => {}
            StreamState::Open => {
                let s = self.streams.get_mut(&w.stream_id).expect("open stream");
                if s.send.adjust(w.increment as i64).is_err() {
                    self.stream_error(w.stream_id, ErrorCode::FLOW_CONTROL_ERROR);
                } else {
                    self.events.push_back(Event::SendCapacity {
                        stream: Some(w.stream_id),
                    });
                }
            }
        }
    }

    fn remote_end(&mut self, id: StreamId) {
        if let Some(s) = self.streams.get_mut(&id) {
            s.remote_closed = true;
            self.events.push_back(Event::StreamEnd { stream: id });
            self.maybe_remove(id);
        }
    }

    // ---------------------------------------------------------------- errors

    fn frame_error(&mut self, e: FrameError) {
        match e {
            FrameError::Connection { code, reason } => self.fail(code, reason),
            FrameError::Stream { stream, code, .. } => self.stream_error(stream, code),
        }
    }

    /// The peer broke a rule of one stream: reset it and tell the caller.
    fn stream_error(&mut self, id: StreamId, code: ErrorCode) {
        if self.remove_stream(id) {
            self.events.push_back(Event::Reset {
                stream: id,
                code,
                remote: false,
            });
        }
        self.send_rst(id, code);
        self.check_drained();
    }

    /// A frame arrived for a stream that is closed.
    fn closed_stream_frame(&mut self, id: StreamId) {
        //= rfc9113#section-5.1
        //# An endpoint MUST ignore frames that it receives on closed streams after it has
        //# sent a RST_STREAM frame.
        if !self.recent_resets.contains(&id) {
            self.send_rst(id, ErrorCode::STREAM_CLOSED);
        }
    }

    /// The peer broke a connection rule: queue GOAWAY and stop.
    fn fail(&mut self, code: ErrorCode, reason: &'static str) {
        if self.closed {
            return;
        }
        //= rfc9113#section-5.4.1
        //# An endpoint that encounters a connection error SHOULD first send a GOAWAY
        //# frame (Section 6.8) with the stream identifier of the last stream that it
        //# successfully received from its peer.
        GoAway {
            last_stream_id: self.last_peer_stream,
            code,
            debug: reason.as_bytes().to_vec(),
        }
        .encode(&mut self.out);
        self.goaway_sent = Some(self.last_peer_stream);
        self.close(ConnectionError::Protocol { code, reason });
    }

    fn close(&mut self, err: ConnectionError) {
        self.closed = true;
        self.block = None;
        self.events.push_back(Event::ConnectionError(err));
    }

    fn count_control_frame(&mut self) {
        self.queued_control += 1;
        // Control frames the peer provokes pile up when we cannot write (PING/SETTINGS flood).
        if self.queued_control > self.local.max_queued_control_frames {
            self.fail(
                ErrorCode::ENHANCE_YOUR_CALM,
                "too many queued control frames",
            );
        }
    }

    fn send_rst(&mut self, id: StreamId, code: ErrorCode) {
        RstStream {
            stream_id: id,
            code,
        }
        .encode(&mut self.out);
        if self.recent_resets.len() == RECENT_RESETS {
            self.recent_resets.pop_front();
        }
        self.recent_resets.push_back(id);
        self.count_control_frame();
    }

    // ---------------------------------------------------------------- streams

    fn is_peer_initiated(&self, id: StreamId) -> bool {
        id.is_client_initiated() == (self.role == Role::Server)
    }

    fn stream_state(&self, id: StreamId) -> StreamState {
        if self.streams.contains_key(&id) {
            return StreamState::Open;
        }
        let idle = if self.is_peer_initiated(id) {
            id > self.last_peer_stream
        } else {
            id.get() >= self.next_local_stream
        };
        if idle {
            StreamState::Idle
        } else {
            StreamState::Closed
        }
    }

    fn active_streams(&self) -> usize {
        self.streams.values().filter(|s| s.is_active()).count()
    }

    /// Removes a stream that is being reset; the connection credit its unreleased bytes hold
    /// goes back at once (nothing will deliver them now). Returns whether it existed.
    fn remove_stream(&mut self, id: StreamId) -> bool {
        let Some(s) = self.streams.remove(&id) else {
            return false;
        };
        let mut arrived = s.recv.unreleased() as usize;
        if let ReadState::Payload {
            stream,
            discard,
            remaining,
            ..
        } = &mut self.read
        {
            if *stream == id && !*discard {
                // The rest of this payload has not arrived yet: the session drains it and
                // releases its credit as it goes.
                *discard = true;
                arrived -= *remaining;
            }
        }
        self.release_conn_internal(arrived);
        if self.recent_resets.len() == RECENT_RESETS {
            self.recent_resets.pop_front();
        }
        self.recent_resets.push_back(id);
        true
    }

    /// Drops a stream closed both ways once the caller released all its bytes.
    fn maybe_remove(&mut self, id: StreamId) {
        if let Some(s) = self.streams.get(&id) {
            if !s.is_active() && s.recv.unreleased() == 0 {
                self.streams.remove(&id);
            }
        }
        self.check_drained();
    }

    fn check_drained(&mut self) {
        if (self.goaway_sent.is_some() || self.goaway_received.is_some())
            && !self.drained_reported
            && !self.closed
            && self.active_streams() == 0
        {
            self.drained_reported = true;
            self.events.push_back(Event::Drained);
        }
    }

    fn release_conn_internal(&mut self, n: usize) {
        if n == 0 {
            return;
        }
        if let Ok(Some(inc)) = self.conn_recv.release(n) {
            self.queue_window_update(StreamId::ZERO, inc);
        }
    }

    fn queue_window_update(&mut self, stream_id: StreamId, increment: u32) {
        WindowUpdate {
            stream_id,
            increment,
        }
        .encode(&mut self.out);
    }

    // ---------------------------------------------------------------- caller actions

    /// Client: opens a stream with a CONNECT request; HEADERS is queued for `poll_transmit`.
    pub fn open_stream(&mut self, request: &ConnectRequest) -> Result<StreamId, SendError> {
        if self.role != Role::Client {
            return Err(SendError::WrongRole);
        }
        self.check_open()?;
        if self.goaway_sent.is_some() || self.goaway_received.is_some() {
            return Err(SendError::GoingAway);
        }
        if self.active_streams() >= self.peer.max_concurrent_streams as usize {
            return Err(SendError::StreamLimit(self.peer.max_concurrent_streams));
        }
        //= rfc9113#section-5.1.1
        //# Stream identifiers cannot be reused.  Long-lived connections can result
        //# in an endpoint exhausting the available range of stream identifiers.
        if self.next_local_stream > StreamId::MAX.get() {
            return Err(SendError::StreamIdsExhausted);
        }
        let id = StreamId::new(self.next_local_stream);
        self.next_local_stream += 2;
        let mut s = Stream::new(self.peer.initial_window, self.local.initial_stream_window);
        s.headers_sent = true;
        self.streams.insert(id, s);
        self.queue_headers(id, &request.to_fields(), false);
        Ok(id)
    }

    /// Whether a new stream can be opened now (for pooling decisions).
    pub fn can_open_stream(&self) -> bool {
        self.role == Role::Client
            && !self.closed
            && self.goaway_sent.is_none()
            && self.goaway_received.is_none()
            && self.next_local_stream <= StreamId::MAX.get()
            && self.active_streams() < self.peer.max_concurrent_streams as usize
    }

    /// Server: answers the request on `stream`. `end_stream` closes our direction too (use it
    /// for refusals such as 400/401/503).
    pub fn send_response(
        &mut self,
        stream: StreamId,
        status: u16,
        end_stream: bool,
    ) -> Result<(), SendError> {
        self.send_response_with(stream, &ConnectResponse::new(status), end_stream)
    }

    /// [`Session::send_response`] with extra response header fields.
    pub fn send_response_with(
        &mut self,
        stream: StreamId,
        response: &ConnectResponse,
        end_stream: bool,
    ) -> Result<(), SendError> {
        if self.role != Role::Server {
            return Err(SendError::WrongRole);
        }
        self.check_open()?;
        if !(200..=599).contains(&response.status) {
            return Err(SendError::InvalidStatus(response.status));
        }
        let s = self
            .streams
            .get_mut(&stream)
            .ok_or(SendError::UnknownStream(stream))?;
        if s.headers_sent {
            return Err(SendError::ResponseAlreadySent(stream));
        }
        if s.local_closed {
            return Err(SendError::StreamNotWritable(stream));
        }
        s.headers_sent = true;
        s.local_closed = end_stream;
        self.queue_headers(stream, &response.to_fields(), end_stream);
        if end_stream {
            self.maybe_remove(stream);
        }
        Ok(())
    }

    fn queue_headers(&mut self, id: StreamId, fields: &[Field], end_stream: bool) {
        let mut block = Vec::new();
        self.encoder.encode(fields, &mut block);
        //= rfc9113#section-4.3
        //# Each field block is processed as a discrete unit.  Field blocks MUST be
        //# transmitted as a contiguous sequence of frames, with no interleaved frames
        //# of any other type or from any other stream.
        let max = self.peer.max_frame_size as usize;
        let mut chunks = block.chunks(max);
        let first = chunks.next().unwrap_or(&[]);
        let mut rest = chunks.peekable();
        Headers {
            stream_id: id,
            fragment: first.to_vec(),
            end_stream,
            end_headers: rest.peek().is_none(),
            priority: None,
            pad_len: None,
        }
        .encode(&mut self.out);
        while let Some(c) = rest.next() {
            Continuation {
                stream_id: id,
                fragment: c.to_vec(),
                end_headers: rest.peek().is_none(),
            }
            .encode(&mut self.out);
        }
    }

    fn check_open(&self) -> Result<(), SendError> {
        if self.closed {
            Err(SendError::Closed)
        } else {
            Ok(())
        }
    }

    fn writable_stream(&mut self, stream: StreamId) -> Result<&mut Stream, SendError> {
        match self.streams.get_mut(&stream) {
            Some(s) if s.headers_sent && !s.local_closed => Ok(s),
            _ => Err(SendError::StreamNotWritable(stream)),
        }
    }

    /// Bytes of DATA payload `stream` may send in one frame now: the smaller of both send
    /// windows and the peer's MAX_FRAME_SIZE. 0 when blocked or not writable.
    pub fn send_capacity(&self, stream: StreamId) -> usize {
        match self.streams.get(&stream) {
            Some(s) if s.headers_sent && !s.local_closed && !self.closed => s
                .send
                .available()
                .min(self.conn_send.available())
                .min(self.peer.max_frame_size as usize),
            _ => 0,
        }
    }

    /// The zero-copy send path: checks and takes flow-control credit for `len` payload bytes
    /// on `stream` and returns the 9-byte DATA frame header. The caller must write the header
    /// and then exactly `len` payload bytes, with nothing in between.
    ///
    /// Fails without changing anything if `poll_transmit` still has bytes queued (they must
    /// go first, e.g. the HEADERS that opened the stream), if `len` exceeds the peer's
    /// MAX_FRAME_SIZE or either window, or if the stream is not open for sending.
    pub fn data_frame_header(
        &mut self,
        stream: StreamId,
        len: usize,
        end_stream: bool,
    ) -> Result<[u8; FRAME_HEADER_LEN], SendError> {
        self.check_open()?;
        if !self.out.is_empty() {
            return Err(SendError::TransmitPending);
        }
        let max_frame = self.peer.max_frame_size;
        let conn_available = self.conn_send.available();
        let s = self.writable_stream(stream)?;
        //= rfc9113#section-4.2
        //# An endpoint MUST NOT send a frame unless its length is less than or equal
        //# to the value of SETTINGS_MAX_FRAME_SIZE advertised by the peer.
        if len > max_frame as usize {
            return Err(SendError::FrameTooLarge {
                len,
                max: max_frame,
            });
        }
        let available = s.send.available().min(conn_available);
        if len > available {
            return Err(SendError::FlowControl {
                asked: len,
                available,
            });
        }
        s.send
            .consume(len)
            .expect("checked against the stream window");
        if end_stream {
            s.local_closed = true;
        }
        self.conn_send
            .consume(len)
            .expect("checked against the connection window");
        if end_stream {
            self.maybe_remove(stream);
        }
        Ok(frame::data::encode_header(stream, len as u32, end_stream))
    }

    /// Sends `payload` as one DATA frame through `out` (the copying fallback).
    pub fn send_data(
        &mut self,
        stream: StreamId,
        payload: &[u8],
        end_stream: bool,
        out: &mut Vec<u8>,
    ) -> Result<(), SendError> {
        let header = self.data_frame_header(stream, payload.len(), end_stream)?;
        out.extend_from_slice(&header);
        out.extend_from_slice(payload);
        Ok(())
    }

    /// Half-closes our direction of `stream` (TCP FIN): queues an empty DATA frame with
    /// END_STREAM for `poll_transmit`.
    pub fn finish(&mut self, stream: StreamId) -> Result<(), SendError> {
        self.check_open()?;
        let s = self.writable_stream(stream)?;
        s.local_closed = true;
        self.out
            .extend_from_slice(&frame::data::encode_header(stream, 0, true));
        self.maybe_remove(stream);
        Ok(())
    }

    /// Resets `stream` with `code` (RST_STREAM). Use CANCEL/NO_ERROR for a clean abort and
    /// e.g. CONNECT_ERROR when the upstream connection was reset. No event is raised for it.
    pub fn reset(&mut self, stream: StreamId, code: ErrorCode) -> Result<(), SendError> {
        self.check_open()?;
        if !self.remove_stream(stream) {
            return Err(SendError::UnknownStream(stream));
        }
        RstStream {
            stream_id: stream,
            code,
        }
        .encode(&mut self.out);
        self.check_drained();
        Ok(())
    }

    /// Returns flow-control credit for `n` bytes of `stream` that have left toward their
    /// destination. WINDOW_UPDATE frames are queued once half of a window is released.
    /// Releasing for a stream that was reset is a no-op: its credit went back at the reset.
    pub fn release_capacity(&mut self, stream: StreamId, n: usize) -> Result<(), SendError> {
        let Some(s) = self.streams.get_mut(&stream) else {
            return Ok(());
        };
        let unreleased = s.recv.unreleased() as usize;
        let update = s
            .recv
            .release(n)
            .map_err(|_| SendError::ReleaseTooLarge { len: n, unreleased })?;
        // A stream the peer finished needs no more credit; the connection does.
        let send_stream_update = !s.remote_closed;
        if let (Some(inc), true) = (update, send_stream_update) {
            self.queue_window_update(stream, inc);
        }
        self.release_conn_internal(n);
        self.maybe_remove(stream);
        Ok(())
    }

    /// Starts a graceful shutdown: GOAWAY NO_ERROR with the last stream we accepted; no new
    /// streams, existing ones finish. [`Event::Drained`] follows when none is left.
    pub fn goaway(&mut self) {
        if self.closed || self.goaway_sent.is_some() {
            return;
        }
        GoAway {
            last_stream_id: self.last_peer_stream,
            code: ErrorCode::NO_ERROR,
            debug: Vec::new(),
        }
        .encode(&mut self.out);
        self.goaway_sent = Some(self.last_peer_stream);
        self.check_drained();
    }

    /// Appends everything queued to `buf` (control frames, HEADERS, WINDOW_UPDATE, RST_STREAM,
    /// GOAWAY, PING). Returns the number of bytes appended.
    pub fn poll_transmit(&mut self, buf: &mut Vec<u8>) -> usize {
        let n = self.out.len();
        buf.append(&mut self.out);
        self.queued_control = 0;
        n
    }

    /// Whether `poll_transmit` has bytes.
    pub fn has_transmit(&self) -> bool {
        !self.out.is_empty()
    }

    pub fn poll_event(&mut self) -> Option<Event> {
        self.events.pop_front()
    }

    // ---------------------------------------------------------------- time

    /// When [`Session::handle_timeout`] must next be called.
    pub fn poll_timeout(&self) -> Option<Instant> {
        if self.closed {
            return None;
        }
        match self.ping_sent {
            Some((sent, _)) => Some(sent + self.local.keepalive_timeout),
            None => self.next_ping,
        }
    }

    /// Drives keepalive: sends a PING when one is due and closes the connection when the
    /// last one went unanswered for `keepalive_timeout`.
    pub fn handle_timeout(&mut self, now: Instant) {
        if self.closed {
            return;
        }
        if let Some((sent, _)) = self.ping_sent {
            if now >= sent + self.local.keepalive_timeout {
                self.close(ConnectionError::KeepaliveTimeout(
                    self.local.keepalive_timeout,
                ));
            }
            return;
        }
        if self.next_ping.is_some_and(|t| now >= t) {
            self.pings += 1;
            let data = self.pings.to_be_bytes();
            Ping { ack: false, data }.encode(&mut self.out);
            self.ping_sent = Some((now, data));
            self.next_ping = None;
        }
    }

    // ---------------------------------------------------------------- inspection

    /// Whether the connection is dead (connection error or keepalive timeout).
    pub fn is_closed(&self) -> bool {
        self.closed
    }

    /// Streams open in at least one direction.
    pub fn stream_count(&self) -> usize {
        self.active_streams()
    }

    /// The peer's SETTINGS_MAX_CONCURRENT_STREAMS (`u32::MAX` until it says).
    pub fn peer_max_concurrent_streams(&self) -> u32 {
        self.peer.max_concurrent_streams
    }

    /// The peer's SETTINGS_MAX_FRAME_SIZE.
    pub fn peer_max_frame_size(&self) -> u32 {
        self.peer.max_frame_size
    }

    /// The peer's value of an extension setting we announce ([`Settings::extensions`]); `None`
    /// until its SETTINGS carried that identifier (a peer that does not know it never sends
    /// it).
    pub fn peer_extension(&self, id: u16) -> Option<u32> {
        self.peer_extensions
            .iter()
            .find(|(i, _)| *i == id)
            .map(|&(_, v)| v)
    }

    /// Send credit left on the connection (may be 0).
    pub fn connection_send_window(&self) -> i64 {
        self.conn_send.value()
    }

    /// Send credit left on `stream`; negative only after the peer lowered its initial window.
    pub fn stream_send_window(&self, stream: StreamId) -> Option<i64> {
        self.streams.get(&stream).map(|s| s.send.value())
    }

    /// Receive credit the peer has on `stream`.
    pub fn stream_recv_window(&self, stream: StreamId) -> Option<i64> {
        self.streams.get(&stream).map(|s| s.recv.window())
    }

    /// Receive credit the peer has on the connection.
    pub fn connection_recv_window(&self) -> i64 {
        self.conn_recv.window()
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum StreamState {
    /// Not yet opened.
    Idle,
    /// In the stream table (open or half-closed, or closed with bytes still unreleased).
    Open,
    /// Opened before and gone now.
    Closed,
}
