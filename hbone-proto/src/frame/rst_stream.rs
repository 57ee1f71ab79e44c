//! RST_STREAM frames (RFC 9113 §6.4): end one stream abruptly.

use super::{read_u32, FrameHeader, FrameType, StreamId};
use crate::error::{ErrorCode, FrameError};

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RstStream {
    pub stream_id: StreamId,
    pub code: ErrorCode,
}

impl RstStream {
    pub fn decode(header: FrameHeader, payload: &[u8]) -> Result<RstStream, FrameError> {
        //= rfc9113#section-6.4
        //# If a RST_STREAM frame is received with a stream identifier of 0x00,
        //# the recipient MUST treat this as a connection error (Section 5.4.1)
        //# of type PROTOCOL_ERROR.
        if header.stream_id.is_zero() {
            return Err(FrameError::conn(
                ErrorCode::PROTOCOL_ERROR,
                "RST_STREAM frame on stream 0",
            ));
        }
        //= rfc9113#section-6.4
        //# A RST_STREAM frame with a length other than 4 octets MUST be treated
        //# as a connection error (Section 5.4.1) of type FRAME_SIZE_ERROR.
        if payload.len() != 4 {
            return Err(FrameError::conn(
                ErrorCode::FRAME_SIZE_ERROR,
                "RST_STREAM frame is not 4 octets",
            ));
        }
        Ok(RstStream {
            stream_id: header.stream_id,
            code: ErrorCode(read_u32(payload)),
        })
    }

    pub fn encode(&self, out: &mut Vec<u8>) {
        FrameHeader {
            length: 4,
            kind: FrameType::RstStream,
            flags: 0,
            stream_id: self.stream_id,
        }
        .encode(out);
        out.extend_from_slice(&self.code.0.to_be_bytes());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rst_stream_on_stream_zero_is_protocol_error() {
        let h = FrameHeader {
            length: 4,
            kind: FrameType::RstStream,
            flags: 0,
            stream_id: StreamId::ZERO,
        };
        let err = RstStream::decode(h, &[0; 4]).unwrap_err();
        assert_eq!(err.code(), ErrorCode::PROTOCOL_ERROR);
    }

    #[test]
    fn rst_stream_of_wrong_length_is_frame_size_error() {
        let h = FrameHeader {
            length: 5,
            kind: FrameType::RstStream,
            flags: 0,
            stream_id: StreamId::new(1),
        };
        let err = RstStream::decode(h, &[0; 5]).unwrap_err();
        assert_eq!(err.code(), ErrorCode::FRAME_SIZE_ERROR);
    }
}
