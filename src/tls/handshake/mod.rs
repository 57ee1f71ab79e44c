//! The TLS 1.3 handshake of a tunnel socket, driven with rustls's unbuffered API on a
//! non-blocking socket, and the handover that follows it.
//!
//! A handshake ends in an [`Established`]: the traffic secrets with their sequence numbers (for
//! kTLS or for the user-space record layer), rustls's [`KernelConnection`] (which can still
//! derive the next keys of a TLS 1.3 KeyUpdate and take session tickets once the records are
//! handled elsewhere), what was negotiated, and any application data that arrived together
//! with the handshake (a client's HTTP/2 preface typically follows its Finished in the same
//! read). Boundary: this module reads and writes TLS bytes on the socket it is given and
//! nothing else; it decides nothing about kTLS ([`super::ktls`] does) and knows no HTTP/2.
//!
//! **The one rule of the handover:** the socket must be left at a TLS record boundary, because
//! the kernel (kTLS) parses records from wherever the socket's receive queue starts. Reads
//! during the handshake are unrestricted — rustls decrypts application records that arrive
//! behind its last handshake message — and once the handshake is complete a record read only
//! in part is finished by reading exactly its remainder, then reading stops. Nothing is read
//! past a record and nothing needs to be pushed back.

use std::fmt;
use std::io;
use std::os::fd::RawFd;

use rustls::client::{ClientConnectionData, UnbufferedClientConnection};
use rustls::kernel::KernelConnection;
use rustls::server::{ServerConnectionData, UnbufferedServerConnection};
use rustls::unbuffered::{
    ConnectionState, EncodeError, InsufficientSizeError, UnbufferedConnectionCommon,
    UnbufferedStatus,
};
use rustls::{CommonState, ExtractedSecrets};

use super::{negotiated, Negotiated, TlsError};
use crate::data_plane::socket;

/// TLS record header: type (1), legacy version (2), length (2).
const RECORD_HEADER: usize = 5;
/// Bytes read per `recv` while handshaking (a flight with a certificate chain fits easily).
const READ_CHUNK: usize = 32 * 1024;

/// Why a handshake failed.
#[derive(Debug, thiserror::Error)]
pub enum HandshakeError {
    /// rustls refused the peer (certificate, protocol, decryption); its alert was sent.
    #[error("TLS handshake: {0}")]
    Tls(#[from] rustls::Error),
    /// The handshake finished but not with what a tunnel needs (version, ALPN, identity).
    #[error("TLS negotiation: {0}")]
    Negotiation(#[from] TlsError),
    #[error("peer closed the connection during the TLS handshake")]
    PeerClosed,
    #[error("socket error during the TLS handshake: {0}")]
    Io(io::Error),
}

/// Which end of the handshake this is.
enum Conn {
    Client(UnbufferedClientConnection),
    Server(UnbufferedServerConnection),
}

/// rustls's connection state after the handshake, kept so later key changes can be derived.
pub enum KernelSide {
    Client(KernelConnection<ClientConnectionData>),
    Server(KernelConnection<ServerConnectionData>),
}

impl KernelSide {
    /// The next send secret (TLS 1.3 KeyUpdate), with its first sequence number.
    pub fn next_send_secret(&mut self) -> Result<rustls::ConnectionTrafficSecrets, rustls::Error> {
        match self {
            KernelSide::Client(k) => k.update_tx_secret(),
            KernelSide::Server(k) => k.update_tx_secret(),
        }
        .map(|(_, secrets)| secrets)
    }

    /// The next receive secret, once the peer's KeyUpdate was read.
    pub fn next_receive_secret(
        &mut self,
    ) -> Result<rustls::ConnectionTrafficSecrets, rustls::Error> {
        match self {
            KernelSide::Client(k) => k.update_rx_secret(),
            KernelSide::Server(k) => k.update_rx_secret(),
        }
        .map(|(_, secrets)| secrets)
    }
}

impl fmt::Debug for KernelSide {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            KernelSide::Client(_) => "KernelSide::Client",
            KernelSide::Server(_) => "KernelSide::Server",
        })
    }
}

/// What one call to [`Handshake::advance`] needs next.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Progress {
    WantRead,
    WantWrite,
    /// Complete, and the socket is at a record boundary: call [`Handshake::finish`].
    Done,
}

/// The handshake's result (see the module docs).
pub struct Established {
    pub negotiated: Negotiated,
    pub secrets: ExtractedSecrets,
    pub kernel: KernelSide,
    /// Application data decrypted by rustls before the handover, in order.
    pub plaintext: Vec<u8>,
}

impl fmt::Debug for Established {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Established")
            .field("negotiated", &self.negotiated)
            .field("plaintext", &self.plaintext.len())
            .finish_non_exhaustive()
    }
}

/// A handshake in progress on one socket.
pub struct Handshake {
    conn: Conn,
    /// Received TLS bytes rustls has not consumed yet (`..incoming_len`).
    incoming: Vec<u8>,
    incoming_len: usize,
    /// Encoded TLS bytes not yet written (`outgoing_pos..`).
    outgoing: Vec<u8>,
    outgoing_pos: usize,
    plaintext: Vec<u8>,
    complete: bool,
    /// TLS bytes written so far (for logs and tests).
    sent: usize,
}

impl fmt::Debug for Handshake {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Handshake")
            .field("incoming", &self.incoming_len)
            .field("outgoing", &(self.outgoing.len() - self.outgoing_pos))
            .field("complete", &self.complete)
            .finish()
    }
}

/// One step of rustls's state machine and what it asked for.
enum Step {
    /// Call rustls again.
    Again,
    NeedInput,
    Complete,
}

impl Handshake {
    pub fn client(conn: UnbufferedClientConnection) -> Handshake {
        Handshake::new(Conn::Client(conn))
    }

    pub fn server(conn: UnbufferedServerConnection) -> Handshake {
        Handshake::new(Conn::Server(conn))
    }

    fn new(conn: Conn) -> Handshake {
        Handshake {
            conn,
            incoming: Vec::new(),
            incoming_len: 0,
            outgoing: Vec::new(),
            outgoing_pos: 0,
            plaintext: Vec::new(),
            complete: false,
            sent: 0,
        }
    }

    fn common(&self) -> &CommonState {
        match &self.conn {
            Conn::Client(c) => c,
            Conn::Server(c) => c,
        }
    }

    /// True while rustls has bytes for the peer that are not written yet.
    pub fn wants_write(&self) -> bool {
        self.outgoing_pos < self.outgoing.len()
    }

    /// Moves the handshake on as far as the socket allows.
    pub fn advance(&mut self, fd: RawFd) -> Result<Progress, HandshakeError> {
        loop {
            if !self.flush(fd)? {
                return Ok(Progress::WantWrite);
            }
            let step = match self.step() {
                Ok(step) => step,
                Err(e) => {
                    // rustls queued an alert for the peer: send it if the socket takes it.
                    self.send_alert(fd);
                    return Err(HandshakeError::Tls(e));
                }
            };
            match step {
                Step::Again => continue,
                Step::Complete if self.wants_write() => continue,
                Step::Complete => match self.record_remainder() {
                    0 => return Ok(Progress::Done),
                    rest => {
                        if !self.read(fd, rest)? {
                            return Ok(Progress::WantRead);
                        }
                    }
                },
                Step::NeedInput => {
                    if !self.read(fd, READ_CHUNK)? {
                        return Ok(Progress::WantRead);
                    }
                }
            }
        }
    }

    /// The handshake is done ([`Progress::Done`]): checks what was negotiated and hands over.
    pub fn finish(self) -> Result<Established, HandshakeError> {
        let negotiated = negotiated(self.common())?;
        let (secrets, kernel) = match self.conn {
            Conn::Client(c) => {
                let (s, k) = c.dangerous_into_kernel_connection()?;
                (s, KernelSide::Client(k))
            }
            Conn::Server(c) => {
                let (s, k) = c.dangerous_into_kernel_connection()?;
                (s, KernelSide::Server(k))
            }
        };
        Ok(Established {
            negotiated,
            secrets,
            kernel,
            plaintext: self.plaintext,
        })
    }

    /// Writes encoded TLS bytes; false when the socket is full.
    fn flush(&mut self, fd: RawFd) -> Result<bool, HandshakeError> {
        while self.wants_write() {
            match socket::send_nonblocking(fd, &self.outgoing[self.outgoing_pos..]) {
                Ok(n) => {
                    self.outgoing_pos += n;
                    self.sent += n;
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(false),
                Err(e) => return Err(HandshakeError::Io(e)),
            }
        }
        self.outgoing.clear();
        self.outgoing_pos = 0;
        Ok(true)
    }

    /// Writes what is still queued (after a failure: the rest of rustls's alert); false
    /// while the socket is full.
    pub fn flush_pending(&mut self, fd: RawFd) -> Result<bool, HandshakeError> {
        self.flush(fd)
    }

    /// Best effort: encodes what rustls queued after an error (its alert) and writes it once.
    fn send_alert(&mut self, fd: RawFd) {
        for _ in 0..4 {
            if !matches!(self.step(), Ok(Step::Again)) {
                break;
            }
        }
        let _ = self.flush(fd);
    }

    /// Reads at most `max` bytes; false on EAGAIN.
    fn read(&mut self, fd: RawFd, max: usize) -> Result<bool, HandshakeError> {
        let want = self.incoming_len + max;
        if self.incoming.len() < want {
            self.incoming.resize(want, 0);
        }
        match crate::sys::socket::recv_nonblocking(fd, &mut self.incoming[self.incoming_len..want])
        {
            Ok(0) => Err(HandshakeError::PeerClosed),
            Ok(n) => {
                self.incoming_len += n;
                Ok(true)
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => Ok(false),
            Err(e) => Err(HandshakeError::Io(e)),
        }
    }

    /// Once the handshake is complete: the bytes still missing from a record read in part
    /// (0 at a boundary). The header is completed first, then the body.
    fn record_remainder(&self) -> usize {
        let have = self.incoming_len;
        if have == 0 {
            return 0;
        }
        if have < RECORD_HEADER {
            return RECORD_HEADER - have;
        }
        let body = usize::from(u16::from_be_bytes([self.incoming[3], self.incoming[4]]));
        (RECORD_HEADER + body).saturating_sub(have)
    }

    /// One call into rustls, with the discard it asks for applied afterwards.
    fn step(&mut self) -> Result<Step, rustls::Error> {
        let incoming = &mut self.incoming[..self.incoming_len];
        let (discard, step) = match &mut self.conn {
            Conn::Client(c) => drive(
                c,
                incoming,
                &mut self.outgoing,
                &mut self.plaintext,
                &mut self.complete,
            ),
            Conn::Server(c) => drive(
                c,
                incoming,
                &mut self.outgoing,
                &mut self.plaintext,
                &mut self.complete,
            ),
        };
        if discard > 0 {
            self.incoming.copy_within(discard..self.incoming_len, 0);
            self.incoming_len -= discard;
        }
        step
    }
}

/// The client and server connections share every state but the entry point.
trait Process<Data> {
    fn process<'c, 'i>(&'c mut self, incoming: &'i mut [u8]) -> UnbufferedStatus<'c, 'i, Data>;
}

impl Process<ClientConnectionData> for UnbufferedConnectionCommon<ClientConnectionData> {
    fn process<'c, 'i>(
        &'c mut self,
        incoming: &'i mut [u8],
    ) -> UnbufferedStatus<'c, 'i, ClientConnectionData> {
        self.process_tls_records(incoming)
    }
}

impl Process<ServerConnectionData> for UnbufferedConnectionCommon<ServerConnectionData> {
    fn process<'c, 'i>(
        &'c mut self,
        incoming: &'i mut [u8],
    ) -> UnbufferedStatus<'c, 'i, ServerConnectionData> {
        self.process_tls_records(incoming)
    }
}

/// Acts on one state rustls reports; returns the bytes to discard from `incoming`.
fn drive<Data, C>(
    conn: &mut C,
    incoming: &mut [u8],
    outgoing: &mut Vec<u8>,
    plaintext: &mut Vec<u8>,
    complete: &mut bool,
) -> (usize, Result<Step, rustls::Error>)
where
    C: std::ops::DerefMut<Target = UnbufferedConnectionCommon<Data>>,
    UnbufferedConnectionCommon<Data>: Process<Data>,
{
    let UnbufferedStatus { mut discard, state } = (**conn).process(incoming);
    let step = match state {
        Err(e) => Err(e),
        Ok(ConnectionState::ReadTraffic(mut records)) => {
            let mut result = Ok(Step::Again);
            while let Some(record) = records.next_record() {
                match record {
                    Ok(r) => {
                        discard += r.discard;
                        plaintext.extend_from_slice(r.payload);
                    }
                    Err(e) => {
                        result = Err(e);
                        break;
                    }
                }
            }
            result
        }
        Ok(ConnectionState::EncodeTlsData(mut encode)) => {
            let start = outgoing.len();
            let mut room = 4096;
            loop {
                outgoing.resize(start + room, 0);
                match encode.encode(&mut outgoing[start..]) {
                    Ok(n) => {
                        outgoing.truncate(start + n);
                        break Ok(Step::Again);
                    }
                    Err(EncodeError::InsufficientSize(InsufficientSizeError { required_size })) => {
                        room = required_size
                    }
                    Err(e) => {
                        outgoing.truncate(start);
                        break Err(rustls::Error::General(format!("encoding a record: {e}")));
                    }
                }
            }
        }
        // The encoded bytes are in `outgoing`; the caller writes them before calling again.
        Ok(ConnectionState::TransmitTlsData(transmit)) => {
            transmit.done();
            Ok(Step::Again)
        }
        Ok(ConnectionState::BlockedHandshake) => Ok(Step::NeedInput),
        Ok(ConnectionState::WriteTraffic(_)) => Ok(Step::Complete),
        Ok(ConnectionState::PeerClosed | ConnectionState::Closed) => Err(rustls::Error::General(
            "peer sent close_notify during the handshake".into(),
        )),
        Ok(ConnectionState::ReadEarlyData(_)) => Err(rustls::Error::General(
            "early data is not accepted on tunnels".into(),
        )),
        Ok(other) => Err(rustls::Error::General(format!(
            "unexpected TLS state {other:?}"
        ))),
    };
    // A server may send (and so reports WriteTraffic) before the client's certificate and
    // Finished arrived: only a finished handshake hands over.
    let step = match step {
        Ok(Step::Complete) if conn.is_handshaking() => Ok(Step::NeedInput),
        Ok(Step::Complete) => {
            *complete = true;
            Ok(Step::Complete)
        }
        other => other,
    };
    (discard, step)
}

#[cfg(test)]
mod tests;
