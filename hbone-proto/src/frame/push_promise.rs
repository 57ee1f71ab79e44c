//! PUSH_PROMISE frames (RFC 9113 §6.6). HBONE never pushes: the session advertises
//! SETTINGS_ENABLE_PUSH 0 and treats any PUSH_PROMISE it receives as a connection error.

use super::{
    flags, padded_len, read_u32, strip_padding, write_padded, FrameHeader, FrameType, StreamId,
};
use crate::error::{ErrorCode, FrameError};

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PushPromise {
    pub stream_id: StreamId,
    pub promised_id: StreamId,
    pub fragment: Vec<u8>,
    pub end_headers: bool,
    pub pad_len: Option<u8>,
}

impl PushPromise {
    pub fn decode(header: FrameHeader, payload: &[u8]) -> Result<PushPromise, FrameError> {
        //= rfc9113#section-6.6
        //# If the Stream Identifier field specifies the value
        //# 0x00, a recipient MUST respond with a connection error (Section 5.4.1)
        //# of type PROTOCOL_ERROR.
        if header.stream_id.is_zero() {
            return Err(FrameError::conn(
                ErrorCode::PROTOCOL_ERROR,
                "PUSH_PROMISE frame on stream 0",
            ));
        }
        let (body, pad_len) = strip_padding(header.flags, payload)?;
        if body.len() < 4 {
            return Err(FrameError::conn(
                ErrorCode::FRAME_SIZE_ERROR,
                "PUSH_PROMISE too short for the promised stream ID",
            ));
        }
        Ok(PushPromise {
            stream_id: header.stream_id,
            promised_id: StreamId::new(read_u32(body)),
            fragment: body[4..].to_vec(),
            end_headers: header.has(flags::END_HEADERS),
            pad_len,
        })
    }

    pub fn encode(&self, out: &mut Vec<u8>) {
        let mut f = if self.end_headers {
            flags::END_HEADERS
        } else {
            0
        };
        if self.pad_len.is_some() {
            f |= flags::PADDED;
        }
        let mut body = self.promised_id.get().to_be_bytes().to_vec();
        body.extend_from_slice(&self.fragment);
        FrameHeader {
            length: padded_len(self.pad_len, body.len()),
            kind: FrameType::PushPromise,
            flags: f,
            stream_id: self.stream_id,
        }
        .encode(out);
        write_padded(out, self.pad_len, &body);
    }
}
