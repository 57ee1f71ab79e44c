//! SETTINGS frames (RFC 9113 §6.5): each side's parameters, acknowledged by the other.

use super::{
    flags, read_u32, FrameHeader, FrameType, StreamId, DEFAULT_MAX_FRAME_SIZE, MAX_MAX_FRAME_SIZE,
};
use crate::error::{ErrorCode, FrameError};
use crate::flow::MAX_WINDOW;

/// One SETTINGS parameter. Values are validated on decode.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Setting {
    HeaderTableSize(u32),
    EnablePush(bool),
    MaxConcurrentStreams(u32),
    InitialWindowSize(u32),
    MaxFrameSize(u32),
    MaxHeaderListSize(u32),
    //= rfc9113#section-6.5.2
    //# An endpoint that receives a SETTINGS frame with any unknown or
    //# unsupported identifier MUST ignore that setting.
    Unknown(u16, u32),
}

impl Setting {
    fn decode(id: u16, value: u32) -> Result<Setting, FrameError> {
        Ok(match id {
            0x1 => Setting::HeaderTableSize(value),
            0x2 => {
                //= rfc9113#section-6.5.2
                //# Any value other than 0 or 1 MUST be treated as a
                //# connection error (Section 5.4.1) of type PROTOCOL_ERROR.
                if value > 1 {
                    return Err(FrameError::conn(
                        ErrorCode::PROTOCOL_ERROR,
                        "SETTINGS_ENABLE_PUSH other than 0 or 1",
                    ));
                }
                Setting::EnablePush(value == 1)
            }
            0x3 => Setting::MaxConcurrentStreams(value),
            0x4 => {
                //= rfc9113#section-6.5.2
                //# Values above the maximum flow-control window size of 2^31-1 MUST
                //# be treated as a connection error (Section 5.4.1) of type
                //# FLOW_CONTROL_ERROR.
                if value as i64 > MAX_WINDOW {
                    return Err(FrameError::conn(
                        ErrorCode::FLOW_CONTROL_ERROR,
                        "SETTINGS_INITIAL_WINDOW_SIZE above 2^31-1",
                    ));
                }
                Setting::InitialWindowSize(value)
            }
            0x5 => {
                //= rfc9113#section-6.5.2
                //# Values outside this range MUST be treated as a connection error
                //# (Section 5.4.1) of type PROTOCOL_ERROR.
                if !(DEFAULT_MAX_FRAME_SIZE..=MAX_MAX_FRAME_SIZE).contains(&value) {
                    return Err(FrameError::conn(
                        ErrorCode::PROTOCOL_ERROR,
                        "SETTINGS_MAX_FRAME_SIZE outside 2^14..2^24-1",
                    ));
                }
                Setting::MaxFrameSize(value)
            }
            0x6 => Setting::MaxHeaderListSize(value),
            other => Setting::Unknown(other, value),
        })
    }

    fn id_value(&self) -> (u16, u32) {
        match *self {
            Setting::HeaderTableSize(v) => (0x1, v),
            Setting::EnablePush(v) => (0x2, v as u32),
            Setting::MaxConcurrentStreams(v) => (0x3, v),
            Setting::InitialWindowSize(v) => (0x4, v),
            Setting::MaxFrameSize(v) => (0x5, v),
            Setting::MaxHeaderListSize(v) => (0x6, v),
            Setting::Unknown(id, v) => (id, v),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Settings {
    pub ack: bool,
    /// In the order received; a later value of the same parameter wins.
    pub params: Vec<Setting>,
}

impl Settings {
    pub fn ack() -> Settings {
        Settings {
            ack: true,
            params: Vec::new(),
        }
    }

    pub fn decode(header: FrameHeader, payload: &[u8]) -> Result<Settings, FrameError> {
        //= rfc9113#section-6.5
        //# If an endpoint receives a SETTINGS frame whose Stream
        //# Identifier field is anything other than 0x00, the endpoint MUST
        //# respond with a connection error (Section 5.4.1) of type
        //# PROTOCOL_ERROR.
        if !header.stream_id.is_zero() {
            return Err(FrameError::conn(
                ErrorCode::PROTOCOL_ERROR,
                "SETTINGS frame on a stream other than 0",
            ));
        }
        let ack = header.has(flags::ACK);
        //= rfc9113#section-6.5
        //# Receipt of a SETTINGS frame with the ACK flag set and a length
        //# field value other than 0 MUST be treated as a connection error
        //# (Section 5.4.1) of type FRAME_SIZE_ERROR.
        if ack && !payload.is_empty() {
            return Err(FrameError::conn(
                ErrorCode::FRAME_SIZE_ERROR,
                "SETTINGS ACK with a payload",
            ));
        }
        //= rfc9113#section-6.5
        //# A SETTINGS frame with a length other than a multiple of 6 octets MUST
        //# be treated as a connection error (Section 5.4.1) of type
        //# FRAME_SIZE_ERROR.
        if payload.len() % 6 != 0 {
            return Err(FrameError::conn(
                ErrorCode::FRAME_SIZE_ERROR,
                "SETTINGS length not a multiple of 6",
            ));
        }
        let params = payload
            .chunks_exact(6)
            .map(|c| Setting::decode(u16::from_be_bytes([c[0], c[1]]), read_u32(&c[2..])))
            .collect::<Result<_, _>>()?;
        Ok(Settings { ack, params })
    }

    pub fn encode(&self, out: &mut Vec<u8>) {
        FrameHeader {
            length: (self.params.len() * 6) as u32,
            kind: FrameType::Settings,
            flags: if self.ack { flags::ACK } else { 0 },
            stream_id: StreamId::ZERO,
        }
        .encode(out);
        for p in &self.params {
            let (id, v) = p.id_value();
            out.extend_from_slice(&id.to_be_bytes());
            out.extend_from_slice(&v.to_be_bytes());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn decode_one(id: u16, value: u32) -> Result<Settings, FrameError> {
        let mut payload = id.to_be_bytes().to_vec();
        payload.extend_from_slice(&value.to_be_bytes());
        let h = FrameHeader {
            length: 6,
            kind: FrameType::Settings,
            flags: 0,
            stream_id: StreamId::ZERO,
        };
        Settings::decode(h, &payload)
    }

    #[test]
    fn enable_push_above_one_is_protocol_error() {
        assert_eq!(
            decode_one(2, 2).unwrap_err().code(),
            ErrorCode::PROTOCOL_ERROR
        );
    }

    #[test]
    fn initial_window_above_2_31_minus_1_is_flow_control_error() {
        assert!(decode_one(4, (1 << 31) - 1).is_ok());
        assert_eq!(
            decode_one(4, 1 << 31).unwrap_err().code(),
            ErrorCode::FLOW_CONTROL_ERROR
        );
    }

    #[test]
    fn max_frame_size_outside_range_is_protocol_error() {
        assert_eq!(
            decode_one(5, 16383).unwrap_err().code(),
            ErrorCode::PROTOCOL_ERROR
        );
        assert_eq!(
            decode_one(5, 1 << 24).unwrap_err().code(),
            ErrorCode::PROTOCOL_ERROR
        );
        assert!(decode_one(5, 1 << 20).is_ok());
    }

    #[test]
    fn settings_ack_with_payload_is_frame_size_error() {
        let h = FrameHeader {
            length: 6,
            kind: FrameType::Settings,
            flags: flags::ACK,
            stream_id: StreamId::ZERO,
        };
        assert_eq!(
            Settings::decode(h, &[0; 6]).unwrap_err().code(),
            ErrorCode::FRAME_SIZE_ERROR
        );
    }

    #[test]
    fn settings_length_not_multiple_of_six_is_frame_size_error() {
        let h = FrameHeader {
            length: 5,
            kind: FrameType::Settings,
            flags: 0,
            stream_id: StreamId::ZERO,
        };
        assert_eq!(
            Settings::decode(h, &[0; 5]).unwrap_err().code(),
            ErrorCode::FRAME_SIZE_ERROR
        );
    }

    #[test]
    fn settings_on_a_stream_is_protocol_error() {
        let h = FrameHeader {
            length: 0,
            kind: FrameType::Settings,
            flags: 0,
            stream_id: StreamId::new(1),
        };
        assert_eq!(
            Settings::decode(h, &[]).unwrap_err().code(),
            ErrorCode::PROTOCOL_ERROR
        );
    }
}
