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
        match socket::recv_nonblocking(fd, &mut self.incoming[self.incoming_len..want]) {
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
pub(crate) mod tests {
    use std::io::{Read, Write};
    use std::net::{TcpListener, TcpStream};
    use std::os::fd::AsRawFd;
    use std::sync::Arc;
    use std::thread;
    use std::time::{Duration, Instant};

    use rustls::{ClientConfig, ServerConfig};

    use super::*;
    use crate::tls::fixtures::*;
    use crate::tls::server_name;

    /// One end of a test handshake: how it ended, and its socket.
    pub(crate) type HandedOver = (Result<Established, HandshakeError>, TcpStream);

    /// Runs both ends of a handshake on non-blocking sockets, polling, until both are done.
    pub(crate) fn handshake_pair(
        cc: Arc<ClientConfig>,
        sc: Arc<ServerConfig>,
        before_finish: impl FnOnce(&TcpStream, &TcpStream),
    ) -> (HandedOver, HandedOver) {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
        let addr = listener.local_addr().expect("addr");
        let client_sock = TcpStream::connect(addr).expect("connect");
        let (server_sock, _) = listener.accept().expect("accept");
        client_sock.set_nonblocking(true).unwrap();
        server_sock.set_nonblocking(true).unwrap();
        let mut client = Some(Handshake::client(
            UnbufferedClientConnection::new(cc, server_name(addr.ip())).expect("client"),
        ));
        let mut server = Some(Handshake::server(
            UnbufferedServerConnection::new(sc).expect("server"),
        ));
        let (mut c_done, mut s_done) = (None, None);
        let deadline = Instant::now() + Duration::from_secs(10);
        while c_done.is_none() || s_done.is_none() {
            assert!(Instant::now() < deadline, "handshake stuck");
            for (hs, fd, done) in [
                (&mut client, client_sock.as_raw_fd(), &mut c_done),
                (&mut server, server_sock.as_raw_fd(), &mut s_done),
            ] {
                if let Some(h) = hs.as_mut() {
                    match h.advance(fd) {
                        Ok(Progress::Done) => *done = Some(Ok(hs.take().expect("present"))),
                        Ok(_) => {}
                        Err(e) => {
                            *done = Some(Err(e));
                            *hs = None;
                        }
                    }
                }
            }
            std::thread::sleep(Duration::from_millis(1));
        }
        before_finish(&client_sock, &server_sock);
        let finish = |r: Option<Result<Handshake, HandshakeError>>| {
            r.expect("done").and_then(Handshake::finish)
        };
        ((finish(c_done), client_sock), (finish(s_done), server_sock))
    }

    #[test]
    fn handshake_hands_over_with_fresh_sequence_numbers_and_agreeing_keys() {
        let pki = Pki::new("cluster.local");
        let (cc, sc) = configs(&pki, &pki.creds(CLIENT), &pki.creds(SERVER), SERVER);
        let ((c, _cs), (s, _ss)) = handshake_pair(cc, sc, |_, _| {});
        let (c, s) = (c.expect("client"), s.expect("server"));
        assert_eq!(c.negotiated.peer.to_string(), SERVER);
        assert_eq!(s.negotiated.peer.to_string(), CLIENT);
        assert_eq!(c.negotiated.cipher, s.negotiated.cipher);
        // No application record crossed yet: both directions start at sequence number 0.
        assert_eq!((c.secrets.tx.0, c.secrets.rx.0), (0, 0));
        assert_eq!((s.secrets.tx.0, s.secrets.rx.0), (0, 0));
        assert_eq!(
            crate::tls::ktls::crypto_info(&c.secrets.tx.1, 0),
            crate::tls::ktls::crypto_info(&s.secrets.rx.1, 0)
        );
        assert!(c.plaintext.is_empty() && s.plaintext.is_empty());
    }

    /// The client's Finished arrives in the same read as the first bytes of its first
    /// application record: the server completes that record by reading exactly its remainder
    /// (decrypting it in user space), and stops at the record boundary after it.
    #[test]
    fn a_record_begun_in_the_handshake_read_is_completed_and_nothing_after_it_is_read() {
        let pki = Pki::new("cluster.local");
        let (cc, sc) = configs(&pki, &pki.creds(CLIENT), &pki.creds(SERVER), SERVER);
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
        let addr = listener.local_addr().expect("addr");
        let (flight_sent, wait_flight) = std::sync::mpsc::channel();
        let payload: Vec<u8> = (0..20_000u32).map(|i| (i % 251) as u8).collect();
        let sent = payload.clone();
        // A blocking rustls client. Its Finished is held back in a buffer and written together
        // with 7 bytes of the first application record (header + 2); the rest of the stream
        // (two records: 16 KiB and the tail) follows 200 ms later.
        let client = thread::spawn(move || {
            struct Held<'a>(&'a mut TcpStream, &'a mut Vec<u8>);
            impl Write for Held<'_> {
                fn write(&mut self, b: &[u8]) -> io::Result<usize> {
                    self.1.extend_from_slice(b);
                    Ok(b.len())
                }
                fn flush(&mut self) -> io::Result<()> {
                    Ok(())
                }
            }
            impl Read for Held<'_> {
                fn read(&mut self, b: &mut [u8]) -> io::Result<usize> {
                    // Before reading the server's flight, send what was held (ClientHello).
                    if !self.1.is_empty() {
                        self.0.write_all(self.1).expect("send");
                        self.1.clear();
                    }
                    self.0.read(b)
                }
            }
            let mut sock = TcpStream::connect(addr).expect("connect");
            let mut conn =
                rustls::ClientConnection::new(cc, server_name(addr.ip())).expect("client");
            let mut held = Vec::new();
            while conn.is_handshaking() {
                conn.complete_io(&mut Held(&mut sock, &mut held))
                    .expect("handshake");
            }
            // `held` is the Finished flight now.
            conn.writer().write_all(&sent).expect("queue");
            let finished = held.len();
            while conn.wants_write() {
                conn.write_tls(&mut held).expect("records");
            }
            sock.write_all(&held[..finished + 7]).expect("send");
            flight_sent.send(()).expect("signal");
            thread::sleep(Duration::from_millis(200));
            sock.write_all(&held[finished + 7..]).expect("send");
            (sock, conn)
        });
        let (sock, _) = listener.accept().expect("accept");
        sock.set_nonblocking(true).unwrap();
        let mut hs = Handshake::server(UnbufferedServerConnection::new(sc).expect("server"));
        let deadline = Instant::now() + Duration::from_secs(10);
        let mut flight_in = false;
        loop {
            assert!(Instant::now() < deadline, "handshake stuck");
            // Once its own flight is out, the server does not read the client's last flight
            // until all of it, with the record's first bytes, sits in the socket.
            if hs.sent > 0 && !hs.wants_write() && !flight_in {
                flight_in = wait_flight.try_recv().is_ok();
                if !flight_in {
                    thread::sleep(Duration::from_millis(1));
                    continue;
                }
            }
            match hs.advance(sock.as_raw_fd()).expect("handshake") {
                Progress::Done => break,
                _ => thread::sleep(Duration::from_millis(1)),
            }
        }
        let mut est = hs.finish().expect("finish");
        // Exactly the first record was completed and decrypted, nothing of the second read.
        assert_eq!(
            est.plaintext.len(),
            16_384,
            "the handover stopped at a boundary"
        );
        // The rest of the stream opens as records from that boundary on.
        let mut opener = crate::tls::record_layer::Opener::new(&est.secrets.rx.1, est.secrets.rx.0)
            .expect("opener");
        let (_client_sock, _conn) = client.join().expect("client");
        let mut raw = Vec::new();
        let mut got = std::mem::take(&mut est.plaintext);
        while got.len() < payload.len() {
            assert!(
                Instant::now() < deadline,
                "stream stuck at {} bytes",
                got.len()
            );
            let mut buf = [0u8; 65536];
            match (&sock).read(&mut buf) {
                Ok(0) => panic!("EOF"),
                Ok(n) => raw.extend_from_slice(&buf[..n]),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    thread::sleep(Duration::from_millis(1));
                    continue;
                }
                Err(e) => panic!("{e}"),
            }
            while let Some(r) = opener.open_first(&mut raw).expect("record opens") {
                if r.content_type == crate::tls::ktls::CONTENT_APPLICATION_DATA {
                    got.extend_from_slice(&raw[r.start..r.end]);
                }
                raw.drain(..r.consumed);
            }
        }
        assert_eq!(got, payload);
    }

    #[test]
    fn a_refused_certificate_fails_the_handshake_and_alerts_the_peer() {
        let pki = Pki::new("cluster.local");
        // The client expects another identity than the server proves.
        let (cc, sc) = configs(
            &pki,
            &pki.creds(CLIENT),
            &pki.creds(SERVER),
            "spiffe://cluster.local/ns/default/sa/someone-else",
        );
        let ((c, _), (s, _)) = handshake_pair(cc, sc, |_, _| {});
        let err = c.expect_err("client must refuse the server");
        assert!(matches!(err, HandshakeError::Tls(_)), "{err}");
        // The server learns of it from the client's alert, not from a silent close.
        let err = s.expect_err("server sees the refusal");
        assert!(
            err.to_string().contains("alert") || err.to_string().contains("Alert"),
            "{err}"
        );
    }
}
