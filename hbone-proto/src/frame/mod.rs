//! HTTP/2 frames (RFC 9113 §4 and §6): one file per frame type, the 9-byte frame header here.
//!
//! Decoding works on a byte buffer that may hold a partial frame ([`decode`] returns
//! `Ok(None)`: feed more); encoding appends to a `Vec<u8>`. Every frame owns its bytes: the
//! zero-copy DATA path does not go through [`Data`] at all, it uses [`FrameHeader`] and
//! [`data::encode_header`] and lets the payload bypass this module.

pub mod continuation;
pub mod data;
pub mod goaway;
pub mod header;
pub mod headers;
pub mod ping;
pub mod priority;
pub mod push_promise;
pub mod rst_stream;
pub mod settings;
pub mod window_update;

pub use continuation::Continuation;
pub use data::Data;
pub use goaway::GoAway;
pub use header::{FrameHeader, FrameType, StreamId, FRAME_HEADER_LEN};
pub use headers::{Headers, PrioritySpec};
pub use ping::Ping;
pub use priority::Priority;
pub use push_promise::PushPromise;
pub use rst_stream::RstStream;
pub use settings::{Setting, Settings};
pub use window_update::WindowUpdate;

use crate::error::{ErrorCode, FrameError};

/// Flag bits (RFC 9113 §6). Each frame type gives them its own meaning.
pub mod flags {
    pub const END_STREAM: u8 = 0x1;
    pub const ACK: u8 = 0x1;
    pub const END_HEADERS: u8 = 0x4;
    pub const PADDED: u8 = 0x8;
    pub const PRIORITY: u8 = 0x20;
}

/// The smallest MAX_FRAME_SIZE any peer may advertise, and the initial value.
//= rfc9113#section-6.5.2
//# The initial value is 2^14 (16,384) octets.  The value advertised
//# by an endpoint MUST be between this initial value and the maximum
//# allowed frame size (2^24-1 or 16,777,215 octets), inclusive.
pub const DEFAULT_MAX_FRAME_SIZE: u32 = 1 << 14;
/// The largest frame payload the 24-bit length field can carry.
pub const MAX_MAX_FRAME_SIZE: u32 = (1 << 24) - 1;

/// One decoded frame.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Frame {
    Data(Data),
    Headers(Headers),
    Priority(Priority),
    RstStream(RstStream),
    Settings(Settings),
    PushPromise(PushPromise),
    Ping(Ping),
    GoAway(GoAway),
    WindowUpdate(WindowUpdate),
    Continuation(Continuation),
    /// A frame type this crate does not know; its payload is kept for the caller.
    //= rfc9113#section-4.1
    //# Implementations MUST ignore and discard frames of
    //# unknown types.
    Unknown {
        header: FrameHeader,
        payload: Vec<u8>,
    },
}

impl Frame {
    /// Decodes the payload of a frame whose header is already parsed. `payload.len()` must be
    /// `header.length`.
    pub fn decode_payload(header: FrameHeader, payload: &[u8]) -> Result<Frame, FrameError> {
        debug_assert_eq!(payload.len(), header.length as usize);
        Ok(match header.kind {
            FrameType::Data => Frame::Data(Data::decode(header, payload)?),
            FrameType::Headers => Frame::Headers(Headers::decode(header, payload)?),
            FrameType::Priority => Frame::Priority(Priority::decode(header, payload)?),
            FrameType::RstStream => Frame::RstStream(RstStream::decode(header, payload)?),
            FrameType::Settings => Frame::Settings(Settings::decode(header, payload)?),
            FrameType::PushPromise => Frame::PushPromise(PushPromise::decode(header, payload)?),
            FrameType::Ping => Frame::Ping(Ping::decode(header, payload)?),
            FrameType::GoAway => Frame::GoAway(GoAway::decode(header, payload)?),
            FrameType::WindowUpdate => Frame::WindowUpdate(WindowUpdate::decode(header, payload)?),
            FrameType::Continuation => Frame::Continuation(Continuation::decode(header, payload)?),
            FrameType::Unknown(_) => Frame::Unknown {
                header,
                payload: payload.to_vec(),
            },
        })
    }

    /// Appends the frame, header included, to `out`.
    pub fn encode(&self, out: &mut Vec<u8>) {
        match self {
            Frame::Data(f) => f.encode(out),
            Frame::Headers(f) => f.encode(out),
            Frame::Priority(f) => f.encode(out),
            Frame::RstStream(f) => f.encode(out),
            Frame::Settings(f) => f.encode(out),
            Frame::PushPromise(f) => f.encode(out),
            Frame::Ping(f) => f.encode(out),
            Frame::GoAway(f) => f.encode(out),
            Frame::WindowUpdate(f) => f.encode(out),
            Frame::Continuation(f) => f.encode(out),
            Frame::Unknown { header, payload } => {
                FrameHeader {
                    length: payload.len() as u32,
                    ..*header
                }
                .encode(out);
                out.extend_from_slice(payload);
            }
        }
    }
}

/// Decodes one frame from the front of `buf`.
///
/// Returns `Ok(None)` when `buf` does not yet hold the whole frame (read more and call again
/// with the longer buffer), or the frame and the number of bytes it took.
pub fn decode(buf: &[u8], max_frame_size: u32) -> Result<Option<(Frame, usize)>, FrameError> {
    let Some(header) = FrameHeader::decode(buf) else {
        return Ok(None);
    };
    check_length(&header, max_frame_size)?;
    let total = FRAME_HEADER_LEN + header.length as usize;
    if buf.len() < total {
        return Ok(None);
    }
    let frame = Frame::decode_payload(header, &buf[FRAME_HEADER_LEN..total])?;
    Ok(Some((frame, total)))
}

/// Rejects a frame longer than the MAX_FRAME_SIZE we advertised.
//= rfc9113#section-4.2
//# An endpoint MUST send an error code of FRAME_SIZE_ERROR if a frame
//# exceeds the size defined in SETTINGS_MAX_FRAME_SIZE, exceeds any
//# limit defined for the frame type, or is too small to contain
//# mandatory frame data.
pub fn check_length(header: &FrameHeader, max_frame_size: u32) -> Result<(), FrameError> {
    if header.length > max_frame_size {
        return Err(FrameError::conn(
            ErrorCode::FRAME_SIZE_ERROR,
            "frame longer than our SETTINGS_MAX_FRAME_SIZE",
        ));
    }
    Ok(())
}

/// Strips padding from a PADDED frame's payload, returning the unpadded body and the pad length.
//= rfc9113#section-6.1
//# If the length of the padding is the length of the
//# frame payload or greater, the recipient MUST treat this as a
//# connection error (Section 5.4.1) of type PROTOCOL_ERROR.
pub(crate) fn strip_padding(
    flags_byte: u8,
    payload: &[u8],
) -> Result<(&[u8], Option<u8>), FrameError> {
    if flags_byte & flags::PADDED == 0 {
        return Ok((payload, None));
    }
    let Some((&pad, rest)) = payload.split_first() else {
        return Err(FrameError::conn(
            ErrorCode::FRAME_SIZE_ERROR,
            "PADDED frame too short for the Pad Length field",
        ));
    };
    if pad as usize > rest.len() {
        return Err(FrameError::conn(
            ErrorCode::PROTOCOL_ERROR,
            "padding as long as or longer than the frame payload",
        ));
    }
    Ok((&rest[..rest.len() - pad as usize], Some(pad)))
}

/// Writes the Pad Length field, `body` and `pad` zero bytes (the padding is all zeros).
pub(crate) fn write_padded(out: &mut Vec<u8>, pad: Option<u8>, body: &[u8]) {
    if let Some(p) = pad {
        out.push(p);
    }
    out.extend_from_slice(body);
    if let Some(p) = pad {
        out.resize(out.len() + p as usize, 0);
    }
}

pub(crate) fn padded_len(pad: Option<u8>, body: usize) -> u32 {
    (body + pad.map_or(0, |p| 1 + p as usize)) as u32
}

pub(crate) fn read_u32(b: &[u8]) -> u32 {
    u32::from_be_bytes([b[0], b[1], b[2], b[3]])
}

#[cfg(test)]
mod tests {
    use super::*;

    fn all_frames() -> Vec<Frame> {
        let s1 = StreamId::new(1);
        vec![
            Frame::Data(Data {
                stream_id: s1,
                payload: b"hello".to_vec(),
                end_stream: true,
                pad_len: None,
            }),
            Frame::Data(Data {
                stream_id: s1,
                payload: b"padded".to_vec(),
                end_stream: false,
                pad_len: Some(3),
            }),
            Frame::Headers(Headers {
                stream_id: StreamId::new(3),
                fragment: vec![0x82, 0x86],
                end_stream: false,
                end_headers: true,
                priority: Some(PrioritySpec {
                    dependency: StreamId::new(1),
                    exclusive: true,
                    weight: 15,
                }),
                pad_len: Some(2),
            }),
            Frame::Priority(Priority {
                stream_id: StreamId::new(5),
                spec: PrioritySpec {
                    dependency: StreamId::new(0),
                    exclusive: false,
                    weight: 255,
                },
            }),
            Frame::RstStream(RstStream {
                stream_id: s1,
                code: ErrorCode::CANCEL,
            }),
            Frame::Settings(Settings {
                ack: false,
                params: vec![
                    Setting::InitialWindowSize(1 << 22),
                    Setting::Unknown(0x99, 7),
                ],
            }),
            Frame::Settings(Settings::ack()),
            Frame::PushPromise(PushPromise {
                stream_id: s1,
                promised_id: StreamId::new(2),
                fragment: vec![1, 2, 3],
                end_headers: true,
                pad_len: None,
            }),
            Frame::Ping(Ping {
                ack: true,
                data: *b"01234567",
            }),
            Frame::GoAway(GoAway {
                last_stream_id: StreamId::new(7),
                code: ErrorCode::ENHANCE_YOUR_CALM,
                debug: b"calm down".to_vec(),
            }),
            Frame::WindowUpdate(WindowUpdate {
                stream_id: StreamId::ZERO,
                increment: (1 << 31) - 1,
            }),
            Frame::Continuation(Continuation {
                stream_id: StreamId::new(3),
                fragment: vec![0x84],
                end_headers: true,
            }),
            Frame::Unknown {
                header: FrameHeader {
                    length: 2,
                    kind: FrameType::Unknown(0xfa),
                    flags: 0x3,
                    stream_id: StreamId::new(9),
                },
                payload: vec![0xaa, 0xbb],
            },
        ]
    }

    #[test]
    fn every_frame_type_round_trips() {
        for frame in all_frames() {
            let mut buf = Vec::new();
            frame.encode(&mut buf);
            let (back, used) = decode(&buf, DEFAULT_MAX_FRAME_SIZE).unwrap().unwrap();
            assert_eq!(used, buf.len());
            assert_eq!(back, frame);
        }
    }

    #[test]
    fn partial_frame_asks_for_more() {
        for frame in all_frames() {
            let mut buf = Vec::new();
            frame.encode(&mut buf);
            for cut in 0..buf.len() {
                assert_eq!(
                    decode(&buf[..cut], DEFAULT_MAX_FRAME_SIZE),
                    Ok(None),
                    "{frame:?}"
                );
            }
        }
    }

    #[test]
    fn frame_longer_than_max_frame_size_is_frame_size_error() {
        let mut buf = Vec::new();
        Data {
            stream_id: StreamId::new(1),
            payload: vec![0; 100],
            end_stream: false,
            pad_len: None,
        }
        .encode(&mut buf);
        let err = decode(&buf[..9], 99).unwrap_err();
        assert_eq!(err.code(), ErrorCode::FRAME_SIZE_ERROR);
    }

    #[test]
    fn padding_longer_than_payload_is_protocol_error() {
        // DATA, PADDED, stream 1, pad length 5 but only 2 bytes follow.
        let buf = [0, 0, 3, 0, flags::PADDED, 0, 0, 0, 1, 5, b'a', b'b'];
        let err = decode(&buf, DEFAULT_MAX_FRAME_SIZE).unwrap_err();
        assert_eq!(err.code(), ErrorCode::PROTOCOL_ERROR);
    }
}
