//! TLS 1.3 record protection in user space, with the traffic keys rustls negotiated: what kTLS
//! does in the kernel, for tunnels on kernels without it (RFC 8446 §5).
//!
//! rustls drives the handshake; afterwards its secrets are extracted (as for kTLS) and this
//! module seals and opens application-data records itself. Why not keep rustls's buffered
//! connection: it reads the socket 4 KiB at a time, allocates a buffer per decrypted record
//! and copies plaintext out of it. Here a tunnel reads up to a few hundred KiB per `recv`,
//! decrypts records in place, and seals whole batches of frames into one buffer for one `send`
//! — one copy each way plus the AES-GCM that cannot be avoided.
//!
//! The semantics match the kernel's, so a tunnel behaves the same in both modes: non-data
//! records come back with their content type for `ktls::control_record` to judge (a
//! NewSessionTicket is dropped, close_notify is EOF, a KeyUpdate — which extracted keys
//! cannot follow — ends the tunnel), and the sender never re-keys: the tunnel retires at its
//! record budget, long before the AES-GCM limit.

use ring::aead::{Aad, LessSafeKey, Nonce, UnboundKey, AES_128_GCM, AES_256_GCM};
use rustls::ConnectionTrafficSecrets;

/// Largest plaintext in one record (2^14).
pub const MAX_PLAINTEXT: usize = 16 * 1024;
const HEADER: usize = 5;
const TAG: usize = 16;
/// RFC 8446 §5.2: a record's ciphertext may be at most 2^14 + 256 bytes.
const MAX_CIPHERTEXT: usize = MAX_PLAINTEXT + 256;
const APPLICATION_DATA: u8 = 23;
const ALERT: u8 = 21;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RecordError {
    #[error("cipher not supported in user space: {0}")]
    Cipher(&'static str),
    #[error("record authentication failed (bad MAC)")]
    BadRecordMac,
    #[error("record of {0} bytes exceeds the TLS 1.3 limit")]
    Oversized(usize),
    #[error("outer record type {0} is not application_data")]
    OuterType(u8),
    #[error("record has no content type (all padding)")]
    NoContentType,
    #[error("record sequence number exhausted")]
    SequenceExhausted,
}

/// One direction's key, IV and record sequence number.
struct Direction {
    key: LessSafeKey,
    iv: [u8; 12],
    seq: u64,
}

impl Direction {
    fn new(secrets: &ConnectionTrafficSecrets, seq: u64) -> Result<Self, RecordError> {
        let (alg, key, iv) = match secrets {
            ConnectionTrafficSecrets::Aes128Gcm { key, iv } => (&AES_128_GCM, key, iv),
            ConnectionTrafficSecrets::Aes256Gcm { key, iv } => (&AES_256_GCM, key, iv),
            _ => return Err(RecordError::Cipher("only AES-GCM suites are offered")),
        };
        Self::from_raw(alg, key.as_ref(), iv.as_ref(), seq)
    }

    fn from_raw(
        alg: &'static ring::aead::Algorithm,
        key: &[u8],
        iv: &[u8],
        seq: u64,
    ) -> Result<Self, RecordError> {
        let unbound = UnboundKey::new(alg, key).map_err(|_| RecordError::Cipher("bad key"))?;
        let mut fixed = [0u8; 12];
        if iv.len() != 12 {
            return Err(RecordError::Cipher("IV is not 12 bytes"));
        }
        fixed.copy_from_slice(iv);
        Ok(Direction {
            key: LessSafeKey::new(unbound),
            iv: fixed,
            seq,
        })
    }

    /// RFC 8446 §5.3: the IV XOR the 64-bit sequence number, left-padded to 12 bytes.
    fn next_nonce(&mut self) -> Result<Nonce, RecordError> {
        let mut n = self.iv;
        for (b, s) in n[4..].iter_mut().zip(self.seq.to_be_bytes()) {
            *b ^= s;
        }
        self.seq = self
            .seq
            .checked_add(1)
            .ok_or(RecordError::SequenceExhausted)?;
        Ok(Nonce::assume_unique_for_key(n))
    }
}

/// Seals outgoing records.
pub struct Sealer(Direction);

impl Sealer {
    /// `seq`: the next record sequence number (from the extracted secrets).
    pub fn new(secrets: &ConnectionTrafficSecrets, seq: u64) -> Result<Self, RecordError> {
        Direction::new(secrets, seq).map(Sealer)
    }

    /// Appends `plaintext` to `out` as application-data records of at most 16 KiB each.
    /// Returns the number of records.
    pub fn seal(&mut self, plaintext: &[u8], out: &mut Vec<u8>) -> Result<usize, RecordError> {
        let mut records = 0;
        out.reserve(plaintext.len() + plaintext.len().div_ceil(MAX_PLAINTEXT) * (HEADER + 1 + TAG));
        for chunk in plaintext.chunks(MAX_PLAINTEXT) {
            self.seal_one(APPLICATION_DATA, chunk, out)?;
            records += 1;
        }
        Ok(records)
    }

    /// Appends a close_notify alert record.
    pub fn seal_close_notify(&mut self, out: &mut Vec<u8>) -> Result<(), RecordError> {
        self.seal_one(ALERT, &[1, 0], out)
    }

    fn seal_one(
        &mut self,
        content: u8,
        chunk: &[u8],
        out: &mut Vec<u8>,
    ) -> Result<(), RecordError> {
        let len = chunk.len() + 1 + TAG;
        let header = [APPLICATION_DATA, 3, 3, (len >> 8) as u8, len as u8];
        let start = out.len();
        out.extend_from_slice(&header);
        out.extend_from_slice(chunk);
        out.push(content);
        let nonce = self.0.next_nonce()?;
        let tag = self
            .0
            .key
            .seal_in_place_separate_tag(nonce, Aad::from(header), &mut out[start + HEADER..])
            .map_err(|_| RecordError::Cipher("seal failed"))?;
        out.extend_from_slice(tag.as_ref());
        Ok(())
    }
}

/// One opened record: its inner content type and where its plaintext lies in the buffer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Opened {
    pub content_type: u8,
    pub start: usize,
    pub end: usize,
    /// Bytes of the buffer this record occupied (header, ciphertext, tag).
    pub consumed: usize,
}

/// Opens incoming records.
pub struct Opener(Direction);

impl Opener {
    pub fn new(secrets: &ConnectionTrafficSecrets, seq: u64) -> Result<Self, RecordError> {
        Direction::new(secrets, seq).map(Opener)
    }

    /// Decrypts the first record of `buf` in place if it is complete; `Ok(None)` when more
    /// bytes are needed.
    pub fn open_first(&mut self, buf: &mut [u8]) -> Result<Option<Opened>, RecordError> {
        if buf.len() < HEADER {
            return Ok(None);
        }
        let header = [buf[0], buf[1], buf[2], buf[3], buf[4]];
        if header[0] != APPLICATION_DATA {
            return Err(RecordError::OuterType(header[0]));
        }
        let len = usize::from(u16::from_be_bytes([header[3], header[4]]));
        if !(TAG + 1..=MAX_CIPHERTEXT).contains(&len) {
            return Err(RecordError::Oversized(len));
        }
        if buf.len() < HEADER + len {
            return Ok(None);
        }
        let nonce = self.0.next_nonce()?;
        let plain = self
            .0
            .key
            .open_in_place(nonce, Aad::from(header), &mut buf[HEADER..HEADER + len])
            .map_err(|_| RecordError::BadRecordMac)?;
        // TLSInnerPlaintext: content, then the real type, then zero padding.
        let Some(type_at) = plain.iter().rposition(|b| *b != 0) else {
            return Err(RecordError::NoContentType);
        };
        Ok(Some(Opened {
            content_type: plain[type_at],
            start: HEADER,
            end: HEADER + type_at,
            consumed: HEADER + len,
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pair(k: u8, wide: bool, seq: u64) -> (Sealer, Opener) {
        let alg = if wide { &AES_256_GCM } else { &AES_128_GCM };
        let key = vec![k; alg.key_len()];
        let d = || Direction::from_raw(alg, &key, &[k; 12], seq).unwrap();
        (Sealer(d()), Opener(d()))
    }

    #[test]
    fn sealed_records_open_in_order_with_their_content() {
        for wide in [false, true] {
            let (mut s, mut o) = pair(7, wide, 5);
            let data: Vec<u8> = (0..40_000u32).map(|i| (i * 31 % 251) as u8).collect();
            let mut wire = Vec::new();
            assert_eq!(s.seal(&data, &mut wire).unwrap(), 3);
            s.seal_close_notify(&mut wire).unwrap();
            let mut got = Vec::new();
            let mut off = 0;
            let mut types = Vec::new();
            while let Some(r) = o.open_first(&mut wire[off..]).unwrap() {
                got.extend_from_slice(&wire[off + r.start..off + r.end]);
                types.push(r.content_type);
                off += r.consumed;
            }
            assert_eq!(off, wire.len());
            assert_eq!(types, [23, 23, 23, 21]);
            assert_eq!(&got[..data.len()], &data[..]);
            assert_eq!(&got[data.len()..], &[1, 0]);
        }
    }

    #[test]
    fn a_partial_record_waits_and_a_flipped_bit_fails() {
        let (mut s, mut o) = pair(1, false, 0);
        let mut wire = Vec::new();
        s.seal(b"hello", &mut wire).unwrap();
        let mut part = wire[..wire.len() - 1].to_vec();
        assert_eq!(o.open_first(&mut part).unwrap(), None);
        let mut bad = wire.clone();
        bad[7] ^= 1;
        assert_eq!(o.open_first(&mut bad), Err(RecordError::BadRecordMac));
        // A wrong sequence number fails too: records cannot be replayed or reordered.
        let (_, mut o2) = pair(1, false, 1);
        let mut w = wire.clone();
        assert_eq!(o2.open_first(&mut w), Err(RecordError::BadRecordMac));
    }

    /// The wire format is rustls's: after a real handshake, one side switches to this record
    /// layer and the other keeps rustls; bytes cross both ways intact.
    #[test]
    fn records_interoperate_with_rustls() {
        use std::io::{Read, Write};
        let ((c, mut c_sock), (mut s, mut s_sock)) =
            crate::data_plane::ktls::tests::loopback_handshake();
        let secrets = c.dangerous_extract_secrets().expect("client secrets");
        let mut sealer = Sealer::new(&secrets.tx.1, secrets.tx.0).unwrap();
        let mut opener = Opener::new(&secrets.rx.1, secrets.rx.0).unwrap();
        // Ours → rustls.
        let data: Vec<u8> = (0..50_000u32).map(|i| (i % 253) as u8).collect();
        let mut wire = Vec::new();
        sealer.seal(&data, &mut wire).unwrap();
        c_sock.write_all(&wire).unwrap();
        let mut got = Vec::new();
        while got.len() < data.len() {
            s.read_tls(&mut s_sock).expect("read_tls");
            s.process_new_packets().expect("rustls accepts our records");
            let mut buf = [0u8; 65536];
            match s.reader().read(&mut buf) {
                Ok(n) => got.extend_from_slice(&buf[..n]),
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
                Err(e) => panic!("{e}"),
            }
        }
        assert_eq!(got, data);
        // rustls → ours.
        s.writer().write_all(&data).unwrap();
        while s.wants_write() {
            s.write_tls(&mut s_sock).unwrap();
        }
        let mut raw = Vec::new();
        let mut plain = Vec::new();
        let mut buf = [0u8; 65536];
        while plain.len() < data.len() {
            let n = c_sock.read(&mut buf).unwrap();
            assert!(n > 0, "eof");
            raw.extend_from_slice(&buf[..n]);
            while let Some(r) = opener.open_first(&mut raw).unwrap() {
                if r.content_type == APPLICATION_DATA {
                    plain.extend_from_slice(&raw[r.start..r.end]);
                }
                raw.drain(..r.consumed);
            }
        }
        assert_eq!(plain, data);
    }

    #[test]
    fn oversized_and_non_data_outer_records_are_refused() {
        let (_, mut o) = pair(1, false, 0);
        let mut big = vec![23, 3, 3, 0x50, 0x00];
        big.resize(HEADER + 0x5000, 0);
        assert_eq!(o.open_first(&mut big), Err(RecordError::Oversized(0x5000)));
        let mut hs = vec![22, 3, 3, 0, 20];
        hs.resize(25, 0);
        assert_eq!(o.open_first(&mut hs), Err(RecordError::OuterType(22)));
    }
}
