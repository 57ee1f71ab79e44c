//! DATA frames (RFC 9113 §6.1): the tunnel's payload.
//!
//! The session never needs [`Data`] for its own traffic: it writes DATA headers with
//! [`encode_header`] and lets the payload go straight from a pipe to the socket.

use super::{flags, padded_len, strip_padding, write_padded, FrameHeader, FrameType, StreamId};
use crate::error::{ErrorCode, FrameError};

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Data {
    pub stream_id: StreamId,
    pub payload: Vec<u8>,
    pub end_stream: bool,
    pub pad_len: Option<u8>,
}

impl Data {
    pub fn decode(header: FrameHeader, payload: &[u8]) -> Result<Data, FrameError> {
        check_stream(header.stream_id)?;
        let (body, pad_len) = strip_padding(header.flags, payload)?;
        Ok(Data {
            stream_id: header.stream_id,
            payload: body.to_vec(),
            end_stream: header.has(flags::END_STREAM),
            pad_len,
        })
    }

    pub fn encode(&self, out: &mut Vec<u8>) {
        let mut f = if self.end_stream {
            flags::END_STREAM
        } else {
            0
        };
        if self.pad_len.is_some() {
            f |= flags::PADDED;
        }
        FrameHeader {
            length: padded_len(self.pad_len, self.payload.len()),
            kind: FrameType::Data,
            flags: f,
            stream_id: self.stream_id,
        }
        .encode(out);
        write_padded(out, self.pad_len, &self.payload);
    }
}

/// The 9-byte header of an unpadded DATA frame carrying `len` payload bytes.
pub fn encode_header(stream_id: StreamId, len: u32, end_stream: bool) -> [u8; 9] {
    FrameHeader {
        length: len,
        kind: FrameType::Data,
        flags: if end_stream { flags::END_STREAM } else { 0 },
        stream_id,
    }
    .to_bytes()
}

//= rfc9113#section-6.1
//# If a DATA frame is received
//# whose Stream Identifier field is 0x00, the recipient MUST respond
//# with a connection error (Section 5.4.1) of type PROTOCOL_ERROR.
pub(crate) fn check_stream(stream_id: StreamId) -> Result<(), FrameError> {
    if stream_id.is_zero() {
        return Err(FrameError::conn(
            ErrorCode::PROTOCOL_ERROR,
            "DATA frame on stream 0",
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn data_on_stream_zero_is_protocol_error() {
        let h = FrameHeader {
            length: 0,
            kind: FrameType::Data,
            flags: 0,
            stream_id: StreamId::ZERO,
        };
        assert_eq!(
            Data::decode(h, &[]).unwrap_err().code(),
            ErrorCode::PROTOCOL_ERROR
        );
    }

    #[test]
    fn encode_header_matches_full_frame_encoding() {
        let d = Data {
            stream_id: StreamId::new(3),
            payload: vec![7; 300],
            end_stream: true,
            pad_len: None,
        };
        let mut buf = Vec::new();
        d.encode(&mut buf);
        assert_eq!(buf[..9], encode_header(StreamId::new(3), 300, true));
    }
}
