//! Why a tunnel fails: one enum whose variants say what broke, each mapped to the bounded
//! reason label the failure metrics and logs carry ([`TunnelFailure`]).

use std::fmt;
use std::io;

use crate::observability::hbone_metrics::TunnelFailure;
use crate::tls::handshake::HandshakeError;
use crate::tls::ktls::KtlsError;
use crate::tls::record_layer::RecordError;

/// A tunnel-ending error. Data-path variants carry an errno, not a message.
#[derive(Debug, thiserror::Error)]
pub enum TunnelError {
    #[error("connect failed: {}", errno_text(*.0))]
    Connect(i32),
    #[error("connect and TLS handshake took too long")]
    HandshakeTimeout,
    #[error(transparent)]
    Handshake(#[from] HandshakeError),
    #[error("kTLS install: {0}")]
    KtlsInstall(#[from] KtlsError),
    #[error("user-space TLS keys: {0}")]
    TlsKeys(RecordError),
    #[error("TLS record: {0}")]
    TlsRecord(RecordError),
    /// A fatal alert or an unexpected record, as the peer sent it.
    #[error("{0}")]
    TlsAlert(String),
    #[error("{0}")]
    KeyUpdate(String),
    #[error("peer closed TCP without close_notify")]
    PeerClosedWithoutCloseNotify,
    #[error("peer closed TCP inside a TLS record")]
    PeerClosedInsideRecord,
    #[error("peer closed inside an HTTP/2 frame")]
    PeerClosedInsideFrame,
    #[error("read failed: {}", errno_text(*.0))]
    Read(i32),
    #[error("write failed: {}", errno_text(*.0))]
    Write(i32),
    #[error("HTTP/2: {0}")]
    Http2(String),
    #[error("peer did not answer PING")]
    Keepalive,
    #[error("a stream ended inside its DATA frame")]
    StreamEndedMidFrame,
    #[error("cannot register the socket: {}", errno_text(*.0))]
    Register(i32),
    #[error("internal: {0}")]
    Internal(&'static str),
}

impl TunnelError {
    /// The reason label of `ringtun_hbone_tunnel_failures_total`.
    pub fn failure(&self) -> TunnelFailure {
        use TunnelError::*;
        match self {
            Connect(_) => TunnelFailure::Connect,
            HandshakeTimeout => TunnelFailure::HandshakeTimeout,
            Handshake(HandshakeError::Tls(_)) => TunnelFailure::TlsHandshake,
            Handshake(HandshakeError::Negotiation(_)) => TunnelFailure::TlsNegotiation,
            Handshake(HandshakeError::PeerClosed | HandshakeError::Io(_)) => TunnelFailure::TlsIo,
            KtlsInstall(_) => TunnelFailure::KtlsInstall,
            TlsKeys(_) => TunnelFailure::TlsKeys,
            TlsRecord(_) => TunnelFailure::TlsRecord,
            TlsAlert(_) => TunnelFailure::TlsAlert,
            KeyUpdate(_) => TunnelFailure::KeyUpdate,
            PeerClosedWithoutCloseNotify | PeerClosedInsideRecord | PeerClosedInsideFrame => {
                TunnelFailure::PeerClosed
            }
            Read(_) => TunnelFailure::Read,
            Write(_) => TunnelFailure::Write,
            Http2(_) => TunnelFailure::Http2,
            Keepalive => TunnelFailure::Keepalive,
            StreamEndedMidFrame => TunnelFailure::StreamEndedMidFrame,
            Register(_) => TunnelFailure::Register,
            Internal(_) => TunnelFailure::Internal,
        }
    }

    /// A socket error as the variant for its direction.
    pub fn read(e: &io::Error) -> TunnelError {
        TunnelError::Read(errno(e))
    }

    pub fn write(e: &io::Error) -> TunnelError {
        TunnelError::Write(errno(e))
    }
}

pub(crate) fn errno(e: &io::Error) -> i32 {
    e.raw_os_error().unwrap_or(libc::EIO)
}

fn errno_text(errno: i32) -> String {
    io::Error::from_raw_os_error(errno).to_string()
}

/// `TunnelError` in a log line: the message, then its reason label.
pub struct Labelled<'a>(pub &'a TunnelError);

impl fmt::Display for Labelled<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} ({})", self.0, self.0.failure().label())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_error_names_its_reason() {
        assert_eq!(
            TunnelError::Connect(libc::ECONNREFUSED).failure(),
            TunnelFailure::Connect
        );
        assert_eq!(
            TunnelError::PeerClosedInsideRecord.failure(),
            TunnelFailure::PeerClosed
        );
        let e = TunnelError::Read(libc::ECONNRESET);
        assert_eq!(
            Labelled(&e).to_string(),
            "read failed: Connection reset by peer (os error 104) (read)"
        );
    }
}
