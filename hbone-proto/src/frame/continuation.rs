//! CONTINUATION frames (RFC 9113 §6.10): the rest of a field block that did not fit in one
//! HEADERS frame. The session caps how many a block may use (CONTINUATION flood).

use super::{flags, FrameHeader, FrameType, StreamId};
use crate::error::{ErrorCode, FrameError};

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Continuation {
    pub stream_id: StreamId,
    pub fragment: Vec<u8>,
    pub end_headers: bool,
}

impl Continuation {
    pub fn decode(header: FrameHeader, payload: &[u8]) -> Result<Continuation, FrameError> {
        //= rfc9113#section-6.10
        //# If a CONTINUATION frame is received with a Stream Identifier field of
        //# 0x00, the recipient MUST respond with a connection error (Section 5.4.1)
        //# of type PROTOCOL_ERROR.
        if header.stream_id.is_zero() {
            return Err(FrameError::conn(
                ErrorCode::PROTOCOL_ERROR,
                "CONTINUATION frame on stream 0",
            ));
        }
        Ok(Continuation {
            stream_id: header.stream_id,
            fragment: payload.to_vec(),
            end_headers: header.has(flags::END_HEADERS),
        })
    }

    pub fn encode(&self, out: &mut Vec<u8>) {
        FrameHeader {
            length: self.fragment.len() as u32,
            kind: FrameType::Continuation,
            flags: if self.end_headers {
                flags::END_HEADERS
            } else {
                0
            },
            stream_id: self.stream_id,
        }
        .encode(out);
        out.extend_from_slice(&self.fragment);
    }
}
