//! The 9-byte frame header every HTTP/2 frame starts with, and stream identifiers.

use std::fmt;

/// Length of the frame header.
//= rfc9113#section-4.1
//# All frames begin with a fixed 9-octet header followed by a variable-
//# length frame payload.
pub const FRAME_HEADER_LEN: usize = 9;

/// A 31-bit stream identifier. Stream 0 is the connection itself.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Default)]
pub struct StreamId(u32);

impl StreamId {
    pub const ZERO: StreamId = StreamId(0);
    /// The largest identifier a stream can have.
    pub const MAX: StreamId = StreamId((1 << 31) - 1);

    /// Builds an identifier; the reserved top bit is dropped.
    pub const fn new(id: u32) -> StreamId {
        StreamId(id & 0x7fff_ffff)
    }

    pub const fn get(self) -> u32 {
        self.0
    }

    pub const fn is_zero(self) -> bool {
        self.0 == 0
    }

    /// Streams a client opens have odd identifiers.
    //= rfc9113#section-5.1.1
    //# Streams initiated by a client MUST use odd-numbered stream
    //# identifiers; those initiated by the server MUST use even-numbered
    //# stream identifiers.
    pub const fn is_client_initiated(self) -> bool {
        self.0 % 2 == 1
    }
}

impl fmt::Display for StreamId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.fmt(f)
    }
}

impl fmt::Debug for StreamId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "StreamId({})", self.0)
    }
}

/// Frame types (RFC 9113 §6); anything else is [`FrameType::Unknown`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum FrameType {
    Data,
    Headers,
    Priority,
    RstStream,
    Settings,
    PushPromise,
    Ping,
    GoAway,
    WindowUpdate,
    Continuation,
    Unknown(u8),
}

impl FrameType {
    pub fn from_u8(b: u8) -> FrameType {
        match b {
            0x0 => FrameType::Data,
            0x1 => FrameType::Headers,
            0x2 => FrameType::Priority,
            0x3 => FrameType::RstStream,
            0x4 => FrameType::Settings,
            0x5 => FrameType::PushPromise,
            0x6 => FrameType::Ping,
            0x7 => FrameType::GoAway,
            0x8 => FrameType::WindowUpdate,
            0x9 => FrameType::Continuation,
            other => FrameType::Unknown(other),
        }
    }

    pub fn as_u8(self) -> u8 {
        match self {
            FrameType::Data => 0x0,
            FrameType::Headers => 0x1,
            FrameType::Priority => 0x2,
            FrameType::RstStream => 0x3,
            FrameType::Settings => 0x4,
            FrameType::PushPromise => 0x5,
            FrameType::Ping => 0x6,
            FrameType::GoAway => 0x7,
            FrameType::WindowUpdate => 0x8,
            FrameType::Continuation => 0x9,
            FrameType::Unknown(b) => b,
        }
    }
}

/// The frame header: payload length, type, flags and stream.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FrameHeader {
    /// Payload length, 24 bits.
    pub length: u32,
    pub kind: FrameType,
    pub flags: u8,
    pub stream_id: StreamId,
}

impl FrameHeader {
    /// Parses the first 9 bytes of `buf`, or `None` if there are fewer.
    //= rfc9113#section-4.1
    //# Reserved:  A reserved 1-bit field.  The semantics of this bit are
    //#    undefined, and the bit MUST remain unset (0x00) when sending and
    //#    MUST be ignored when receiving.
    pub fn decode(buf: &[u8]) -> Option<FrameHeader> {
        let b: &[u8; FRAME_HEADER_LEN] = buf.get(..FRAME_HEADER_LEN)?.try_into().ok()?;
        Some(FrameHeader {
            length: u32::from_be_bytes([0, b[0], b[1], b[2]]),
            kind: FrameType::from_u8(b[3]),
            flags: b[4],
            stream_id: StreamId::new(u32::from_be_bytes([b[5], b[6], b[7], b[8]])),
        })
    }

    /// The 9 header bytes.
    pub fn to_bytes(&self) -> [u8; FRAME_HEADER_LEN] {
        debug_assert!(self.length < (1 << 24));
        let l = self.length.to_be_bytes();
        let s = self.stream_id.get().to_be_bytes();
        [
            l[1],
            l[2],
            l[3],
            self.kind.as_u8(),
            self.flags,
            s[0],
            s[1],
            s[2],
            s[3],
        ]
    }

    pub fn encode(&self, out: &mut Vec<u8>) {
        out.extend_from_slice(&self.to_bytes());
    }

    pub fn has(&self, flag: u8) -> bool {
        self.flags & flag != 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reserved_bit_of_stream_id_is_ignored() {
        let h = FrameHeader::decode(&[0, 0, 0, 0, 0, 0x80, 0, 0, 1]).unwrap();
        assert_eq!(h.stream_id, StreamId::new(1));
    }

    #[test]
    fn header_round_trips() {
        let h = FrameHeader {
            length: 0xabcdef,
            kind: FrameType::WindowUpdate,
            flags: 0x25,
            stream_id: StreamId::MAX,
        };
        assert_eq!(FrameHeader::decode(&h.to_bytes()), Some(h));
        assert_eq!(FrameHeader::decode(&h.to_bytes()[..8]), None);
    }
}
