//! WINDOW_UPDATE frames (RFC 9113 §6.9): flow-control credit for a stream or the connection.

use super::{read_u32, FrameHeader, FrameType, StreamId};
use crate::error::{ErrorCode, FrameError};

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WindowUpdate {
    /// Stream 0 updates the connection window.
    pub stream_id: StreamId,
    /// 1..=2^31-1.
    pub increment: u32,
}

impl WindowUpdate {
    pub fn decode(header: FrameHeader, payload: &[u8]) -> Result<WindowUpdate, FrameError> {
        //= rfc9113#section-6.9
        //# A WINDOW_UPDATE frame with a length other than 4 octets MUST be
        //# treated as a connection error (Section 5.4.1) of type
        //# FRAME_SIZE_ERROR.
        if payload.len() != 4 {
            return Err(FrameError::conn(
                ErrorCode::FRAME_SIZE_ERROR,
                "WINDOW_UPDATE frame is not 4 octets",
            ));
        }
        let increment = read_u32(payload) & 0x7fff_ffff;
        //= rfc9113#section-6.9
        //# A receiver MUST treat the receipt of a WINDOW_UPDATE frame with a
        //# flow-control window increment of 0 as a stream error (Section 5.4.2)
        //# of type PROTOCOL_ERROR; errors on the connection flow-control window
        //# MUST be treated as a connection error (Section 5.4.1).
        if increment == 0 {
            let reason = "WINDOW_UPDATE with an increment of 0";
            return Err(if header.stream_id.is_zero() {
                FrameError::conn(ErrorCode::PROTOCOL_ERROR, reason)
            } else {
                FrameError::stream(header.stream_id, ErrorCode::PROTOCOL_ERROR, reason)
            });
        }
        Ok(WindowUpdate {
            stream_id: header.stream_id,
            increment,
        })
    }

    pub fn encode(&self, out: &mut Vec<u8>) {
        FrameHeader {
            length: 4,
            kind: FrameType::WindowUpdate,
            flags: 0,
            stream_id: self.stream_id,
        }
        .encode(out);
        out.extend_from_slice(&(self.increment & 0x7fff_ffff).to_be_bytes());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn header(stream: u32) -> FrameHeader {
        FrameHeader {
            length: 4,
            kind: FrameType::WindowUpdate,
            flags: 0,
            stream_id: StreamId::new(stream),
        }
    }

    #[test]
    fn zero_increment_on_stream_is_stream_error() {
        let err = WindowUpdate::decode(header(1), &[0; 4]).unwrap_err();
        assert!(matches!(
            err,
            FrameError::Stream {
                code: ErrorCode::PROTOCOL_ERROR,
                ..
            }
        ));
    }

    #[test]
    fn zero_increment_on_connection_is_connection_error() {
        let err = WindowUpdate::decode(header(0), &[0; 4]).unwrap_err();
        assert!(matches!(
            err,
            FrameError::Connection {
                code: ErrorCode::PROTOCOL_ERROR,
                ..
            }
        ));
    }
}
