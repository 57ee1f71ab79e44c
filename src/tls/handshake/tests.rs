//! The handshake against real rustls peers on loopback: the handover's sequence numbers and
//! keys, the record boundary it leaves, and alerts on refusal.

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::os::fd::AsRawFd;

use std::thread;
use std::time::{Duration, Instant};

use super::*;
use crate::tls::fixtures::*;
use crate::tls::server_name;

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
        let mut conn = rustls::ClientConnection::new(cc, server_name(addr.ip())).expect("client");
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
    let mut opener =
        crate::tls::record_layer::Opener::new(&est.secrets.rx.1, est.secrets.rx.0).expect("opener");
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
