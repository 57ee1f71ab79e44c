//! PRIORITY frames (RFC 9113 §6.3): deprecated; validated and then ignored.

use super::{FrameHeader, FrameType, PrioritySpec, StreamId};
use crate::error::{ErrorCode, FrameError};

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Priority {
    pub stream_id: StreamId,
    pub spec: PrioritySpec,
}

impl Priority {
    pub fn decode(header: FrameHeader, payload: &[u8]) -> Result<Priority, FrameError> {
        //= rfc9113#section-6.3
        //# If a PRIORITY frame is received with a stream identifier of 0x00, the
        //# recipient MUST respond with a connection error (Section 5.4.1) of
        //# type PROTOCOL_ERROR.
        if header.stream_id.is_zero() {
            return Err(FrameError::conn(
                ErrorCode::PROTOCOL_ERROR,
                "PRIORITY frame on stream 0",
            ));
        }
        //= rfc9113#section-6.3
        //# A PRIORITY frame with a length other than 5 octets MUST be treated as
        //# a stream error (Section 5.4.2) of type FRAME_SIZE_ERROR.
        if payload.len() != 5 {
            return Err(FrameError::stream(
                header.stream_id,
                ErrorCode::FRAME_SIZE_ERROR,
                "PRIORITY frame is not 5 octets",
            ));
        }
        let spec = PrioritySpec::decode(payload);
        if spec.dependency == header.stream_id {
            return Err(FrameError::stream(
                header.stream_id,
                ErrorCode::PROTOCOL_ERROR,
                "stream depends on itself",
            ));
        }
        Ok(Priority {
            stream_id: header.stream_id,
            spec,
        })
    }

    pub fn encode(&self, out: &mut Vec<u8>) {
        FrameHeader {
            length: 5,
            kind: FrameType::Priority,
            flags: 0,
            stream_id: self.stream_id,
        }
        .encode(out);
        self.spec.encode(out);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn priority_of_wrong_length_is_stream_frame_size_error() {
        let h = FrameHeader {
            length: 4,
            kind: FrameType::Priority,
            flags: 0,
            stream_id: StreamId::new(1),
        };
        let err = Priority::decode(h, &[0, 0, 0, 0]).unwrap_err();
        assert!(matches!(
            err,
            FrameError::Stream {
                code: ErrorCode::FRAME_SIZE_ERROR,
                ..
            }
        ));
    }
}
