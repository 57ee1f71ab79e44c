//! PING frames (RFC 9113 §6.7): liveness checks, answered with an ACK carrying the same data.

use super::{flags, FrameHeader, FrameType, StreamId};
use crate::error::{ErrorCode, FrameError};

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Ping {
    pub ack: bool,
    pub data: [u8; 8],
}

impl Ping {
    pub fn decode(header: FrameHeader, payload: &[u8]) -> Result<Ping, FrameError> {
        //= rfc9113#section-6.7
        //# If a PING frame is received with a Stream Identifier field value
        //# other than 0x00, the recipient MUST respond with a connection error
        //# (Section 5.4.1) of type PROTOCOL_ERROR.
        if !header.stream_id.is_zero() {
            return Err(FrameError::conn(
                ErrorCode::PROTOCOL_ERROR,
                "PING frame on a stream other than 0",
            ));
        }
        //= rfc9113#section-6.7
        //# Receipt of a PING frame with a length field value other than 8 MUST
        //# be treated as a connection error (Section 5.4.1) of type
        //# FRAME_SIZE_ERROR.
        let data: [u8; 8] = payload.try_into().map_err(|_| {
            FrameError::conn(ErrorCode::FRAME_SIZE_ERROR, "PING frame is not 8 octets")
        })?;
        Ok(Ping {
            ack: header.has(flags::ACK),
            data,
        })
    }

    pub fn encode(&self, out: &mut Vec<u8>) {
        FrameHeader {
            length: 8,
            kind: FrameType::Ping,
            flags: if self.ack { flags::ACK } else { 0 },
            stream_id: StreamId::ZERO,
        }
        .encode(out);
        out.extend_from_slice(&self.data);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ping_of_wrong_length_is_frame_size_error() {
        let h = FrameHeader {
            length: 7,
            kind: FrameType::Ping,
            flags: 0,
            stream_id: StreamId::ZERO,
        };
        assert_eq!(
            Ping::decode(h, &[0; 7]).unwrap_err().code(),
            ErrorCode::FRAME_SIZE_ERROR
        );
    }

    #[test]
    fn ping_on_a_stream_is_protocol_error() {
        let h = FrameHeader {
            length: 8,
            kind: FrameType::Ping,
            flags: 0,
            stream_id: StreamId::new(1),
        };
        assert_eq!(
            Ping::decode(h, &[0; 8]).unwrap_err().code(),
            ErrorCode::PROTOCOL_ERROR
        );
    }
}
