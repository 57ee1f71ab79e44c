//! HEADERS frames (RFC 9113 §6.2): open a stream and carry the first part of a field block.

use super::{
    flags, padded_len, read_u32, strip_padding, write_padded, FrameHeader, FrameType, StreamId,
};
use crate::error::{ErrorCode, FrameError};

/// The deprecated priority fields (RFC 9113 §5.3.2); parsed so they can be skipped.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PrioritySpec {
    pub dependency: StreamId,
    pub exclusive: bool,
    /// The wire value (weight − 1).
    pub weight: u8,
}

impl PrioritySpec {
    pub(crate) fn decode(b: &[u8]) -> PrioritySpec {
        let dep = read_u32(b);
        PrioritySpec {
            dependency: StreamId::new(dep),
            exclusive: dep & 0x8000_0000 != 0,
            weight: b[4],
        }
    }

    pub(crate) fn encode(&self, out: &mut Vec<u8>) {
        let mut dep = self.dependency.get();
        if self.exclusive {
            dep |= 0x8000_0000;
        }
        out.extend_from_slice(&dep.to_be_bytes());
        out.push(self.weight);
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Headers {
    pub stream_id: StreamId,
    /// The field block fragment (HPACK bytes).
    pub fragment: Vec<u8>,
    pub end_stream: bool,
    pub end_headers: bool,
    pub priority: Option<PrioritySpec>,
    pub pad_len: Option<u8>,
}

impl Headers {
    pub fn decode(header: FrameHeader, payload: &[u8]) -> Result<Headers, FrameError> {
        //= rfc9113#section-6.2
        //# If a HEADERS frame
        //# is received whose Stream Identifier field is 0x00, the recipient
        //# MUST respond with a connection error (Section 5.4.1) of type
        //# PROTOCOL_ERROR.
        if header.stream_id.is_zero() {
            return Err(FrameError::conn(
                ErrorCode::PROTOCOL_ERROR,
                "HEADERS frame on stream 0",
            ));
        }
        let (mut body, pad_len) = strip_padding(header.flags, payload)?;
        let priority = if header.has(flags::PRIORITY) {
            if body.len() < 5 {
                return Err(FrameError::conn(
                    ErrorCode::FRAME_SIZE_ERROR,
                    "HEADERS frame too short for its priority fields",
                ));
            }
            // A self-dependency is a stream error, but the field block must still be decoded
            // to keep HPACK state in step: the session checks it after decoding.
            let spec = PrioritySpec::decode(body);
            body = &body[5..];
            Some(spec)
        } else {
            None
        };
        Ok(Headers {
            stream_id: header.stream_id,
            fragment: body.to_vec(),
            end_stream: header.has(flags::END_STREAM),
            end_headers: header.has(flags::END_HEADERS),
            priority,
            pad_len,
        })
    }

    pub fn encode(&self, out: &mut Vec<u8>) {
        let mut f = 0;
        if self.end_stream {
            f |= flags::END_STREAM;
        }
        if self.end_headers {
            f |= flags::END_HEADERS;
        }
        if self.pad_len.is_some() {
            f |= flags::PADDED;
        }
        let mut body = Vec::with_capacity(self.fragment.len() + 5);
        if let Some(p) = &self.priority {
            f |= flags::PRIORITY;
            p.encode(&mut body);
        }
        body.extend_from_slice(&self.fragment);
        FrameHeader {
            length: padded_len(self.pad_len, body.len()),
            kind: FrameType::Headers,
            flags: f,
            stream_id: self.stream_id,
        }
        .encode(out);
        write_padded(out, self.pad_len, &body);
    }
}
