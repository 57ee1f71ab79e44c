//! GOAWAY frames (RFC 9113 §6.8): stop new streams, say which ones were processed, and why.

use super::{read_u32, FrameHeader, FrameType, StreamId};
use crate::error::{ErrorCode, FrameError};

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GoAway {
    /// The highest peer-initiated stream the sender processed or might still process.
    pub last_stream_id: StreamId,
    pub code: ErrorCode,
    /// Opaque diagnostic bytes.
    pub debug: Vec<u8>,
}

impl GoAway {
    pub fn decode(header: FrameHeader, payload: &[u8]) -> Result<GoAway, FrameError> {
        //= rfc9113#section-6.8
        //# An endpoint MUST treat a GOAWAY frame with a stream identifier
        //# other than 0x00 as a connection error (Section 5.4.1) of type
        //# PROTOCOL_ERROR.
        if !header.stream_id.is_zero() {
            return Err(FrameError::conn(
                ErrorCode::PROTOCOL_ERROR,
                "GOAWAY frame on a stream other than 0",
            ));
        }
        if payload.len() < 8 {
            return Err(FrameError::conn(
                ErrorCode::FRAME_SIZE_ERROR,
                "GOAWAY frame shorter than 8 octets",
            ));
        }
        Ok(GoAway {
            last_stream_id: StreamId::new(read_u32(payload)),
            code: ErrorCode(read_u32(&payload[4..])),
            debug: payload[8..].to_vec(),
        })
    }

    pub fn encode(&self, out: &mut Vec<u8>) {
        FrameHeader {
            length: 8 + self.debug.len() as u32,
            kind: FrameType::GoAway,
            flags: 0,
            stream_id: StreamId::ZERO,
        }
        .encode(out);
        out.extend_from_slice(&self.last_stream_id.get().to_be_bytes());
        out.extend_from_slice(&self.code.0.to_be_bytes());
        out.extend_from_slice(&self.debug);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn goaway_shorter_than_eight_octets_is_frame_size_error() {
        let h = FrameHeader {
            length: 7,
            kind: FrameType::GoAway,
            flags: 0,
            stream_id: StreamId::ZERO,
        };
        assert_eq!(
            GoAway::decode(h, &[0; 7]).unwrap_err().code(),
            ErrorCode::FRAME_SIZE_ERROR
        );
    }
}
