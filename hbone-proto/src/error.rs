//! HTTP/2 error codes (RFC 9113 §7) and the errors the codec and session report.
//!
//! Each error says whose fault it is: [`FrameError`] and [`ConnectionError::Protocol`] are the
//! peer's (it sent something RFC 9113 forbids), [`SendError`] is the caller's (it asked the
//! session for something the protocol state does not allow).

use crate::StreamId;
use std::fmt;
use std::time::Duration;

/// An HTTP/2 error code. Unknown codes are kept as they are.
//= rfc9113#section-7
//# Unknown or unsupported error codes MUST NOT trigger any special
//# behavior.  These MAY be treated by an implementation as being
//# equivalent to INTERNAL_ERROR.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct ErrorCode(pub u32);

impl ErrorCode {
    pub const NO_ERROR: ErrorCode = ErrorCode(0x0);
    pub const PROTOCOL_ERROR: ErrorCode = ErrorCode(0x1);
    pub const INTERNAL_ERROR: ErrorCode = ErrorCode(0x2);
    pub const FLOW_CONTROL_ERROR: ErrorCode = ErrorCode(0x3);
    pub const SETTINGS_TIMEOUT: ErrorCode = ErrorCode(0x4);
    pub const STREAM_CLOSED: ErrorCode = ErrorCode(0x5);
    pub const FRAME_SIZE_ERROR: ErrorCode = ErrorCode(0x6);
    pub const REFUSED_STREAM: ErrorCode = ErrorCode(0x7);
    pub const CANCEL: ErrorCode = ErrorCode(0x8);
    pub const COMPRESSION_ERROR: ErrorCode = ErrorCode(0x9);
    pub const CONNECT_ERROR: ErrorCode = ErrorCode(0xa);
    pub const ENHANCE_YOUR_CALM: ErrorCode = ErrorCode(0xb);
    pub const INADEQUATE_SECURITY: ErrorCode = ErrorCode(0xc);
    pub const HTTP_1_1_REQUIRED: ErrorCode = ErrorCode(0xd);

    /// The RFC 9113 name, or `None` for a code it does not define.
    pub fn name(self) -> Option<&'static str> {
        const NAMES: [&str; 14] = [
            "NO_ERROR",
            "PROTOCOL_ERROR",
            "INTERNAL_ERROR",
            "FLOW_CONTROL_ERROR",
            "SETTINGS_TIMEOUT",
            "STREAM_CLOSED",
            "FRAME_SIZE_ERROR",
            "REFUSED_STREAM",
            "CANCEL",
            "COMPRESSION_ERROR",
            "CONNECT_ERROR",
            "ENHANCE_YOUR_CALM",
            "INADEQUATE_SECURITY",
            "HTTP_1_1_REQUIRED",
        ];
        NAMES.get(self.0 as usize).copied()
    }

    /// Whether a RST_STREAM with this code ends the tunnelled byte stream like a FIN would.
    ///
    /// HBONE (DESIGN.md §4) treats NO_ERROR and CANCEL as end of file; every other code is a
    /// reset that must reach the other side as a TCP reset.
    pub fn is_eof(self) -> bool {
        self == ErrorCode::NO_ERROR || self == ErrorCode::CANCEL
    }
}

impl fmt::Display for ErrorCode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.name() {
            Some(n) => f.write_str(n),
            None => write!(f, "UNKNOWN_ERROR({:#x})", self.0),
        }
    }
}

impl fmt::Debug for ErrorCode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

/// A peer's violation found while decoding a frame: either the whole connection or only one
/// stream is affected (RFC 9113 §5.4).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FrameError {
    /// The connection must be closed with GOAWAY carrying `code`.
    #[error("connection error {code}: {reason}")]
    Connection {
        code: ErrorCode,
        reason: &'static str,
    },
    /// Only `stream` is affected: it is reset with RST_STREAM carrying `code`.
    #[error("stream {stream} error {code}: {reason}")]
    Stream {
        stream: StreamId,
        code: ErrorCode,
        reason: &'static str,
    },
}

impl FrameError {
    pub(crate) fn conn(code: ErrorCode, reason: &'static str) -> FrameError {
        FrameError::Connection { code, reason }
    }

    pub(crate) fn stream(stream: StreamId, code: ErrorCode, reason: &'static str) -> FrameError {
        FrameError::Stream {
            stream,
            code,
            reason,
        }
    }

    /// The error code this error is signalled with.
    pub fn code(&self) -> ErrorCode {
        match self {
            FrameError::Connection { code, .. } | FrameError::Stream { code, .. } => *code,
        }
    }
}

/// Why a session ended. After this the session sends nothing but what is already queued
/// (usually a GOAWAY); flush `poll_transmit` and close the transport.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ConnectionError {
    /// The peer broke RFC 9113 (or one of our limits); we queued GOAWAY with `code`.
    #[error("peer protocol error, closing with GOAWAY {code}: {reason}")]
    Protocol {
        code: ErrorCode,
        reason: &'static str,
    },
    /// Our keepalive PING went unanswered: the peer or the path is gone.
    #[error(
        "keepalive timeout: no PING answer within {0:?}; the peer or the network path is gone"
    )]
    KeepaliveTimeout(Duration),
}

impl ConnectionError {
    /// The error code sent in our GOAWAY, if any.
    pub fn code(&self) -> Option<ErrorCode> {
        match self {
            ConnectionError::Protocol { code, .. } => Some(*code),
            ConnectionError::KeepaliveTimeout(_) => None,
        }
    }
}

/// A request of the caller that the protocol state does not allow. Nothing was sent or changed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum SendError {
    #[error(
        "stream {0} is not open for sending (unknown, closed, reset, or END_STREAM already sent)"
    )]
    StreamNotWritable(StreamId),
    #[error("stream {0} is unknown or closed")]
    UnknownStream(StreamId),
    #[error("frame of {len} bytes exceeds the peer's MAX_FRAME_SIZE {max}")]
    FrameTooLarge { len: usize, max: u32 },
    #[error(
        "not enough flow-control credit: asked {asked}, have {available}; wait for a window update"
    )]
    FlowControl { asked: usize, available: usize },
    #[error("control frames are queued: drain poll_transmit before writing DATA so frames keep their order")]
    TransmitPending,
    #[error(
        "peer allows only {0} concurrent streams; wait for one to close or open another tunnel"
    )]
    StreamLimit(u32),
    #[error("connection is going away (GOAWAY sent or received); open a new tunnel")]
    GoingAway,
    #[error("connection is closed")]
    Closed,
    #[error("stream IDs are exhausted on this connection; open a new tunnel")]
    StreamIdsExhausted,
    #[error("only a client opens CONNECT streams; only a server sends responses")]
    WrongRole,
    #[error("response already sent on stream {0}")]
    ResponseAlreadySent(StreamId),
    #[error("no DATA payload of stream {stream} is pending, or {len} exceeds what is pending")]
    NoPendingPayload { stream: StreamId, len: usize },
    #[error("cannot release {len} bytes: only {unreleased} were received and not yet released")]
    ReleaseTooLarge { len: usize, unreleased: usize },
    #[error("invalid status code {0}: must be 200..=599")]
    InvalidStatus(u16),
}
