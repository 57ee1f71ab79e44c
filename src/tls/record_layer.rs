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
//! NewSessionTicket is dropped, close_notify is EOF, a KeyUpdate gets the next key), and a
//! key update of our own ([`RecordWriter::key_update`]) seals the KeyUpdate under the old key
//! and every later record under the next.

use aws_lc_rs::aead::{Aad, LessSafeKey, Nonce, UnboundKey, AES_128_GCM, AES_256_GCM};
use rustls::ConnectionTrafficSecrets;

/// Largest plaintext in one record (2^14).
pub const MAX_PLAINTEXT: usize = 16 * 1024;
const HEADER: usize = 5;
const TAG: usize = 16;
/// RFC 8446 §5.2: a record's ciphertext may be at most 2^14 + 256 bytes.
const MAX_CIPHERTEXT: usize = MAX_PLAINTEXT + 256;
const APPLICATION_DATA: u8 = 23;
const ALERT: u8 = 21;
const HANDSHAKE: u8 = 22;

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
        alg: &'static aws_lc_rs::aead::Algorithm,
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

    /// Appends a handshake record carrying `message` (a KeyUpdate).
    pub fn seal_handshake(&mut self, message: &[u8], out: &mut Vec<u8>) -> Result<(), RecordError> {
        self.seal_one(HANDSHAKE, message, out)
    }

    /// Seals `inner` as it stands — content, content type, padding: a TLSInnerPlaintext a
    /// peer may build in any shape — as one record. For the fuzz target that feeds
    /// [`Opener`] records with every inner layout, not for tunnels.
    pub(crate) fn seal_raw(&mut self, inner: &[u8], out: &mut Vec<u8>) -> Result<(), RecordError> {
        let len = inner.len() + TAG;
        if inner.len() > MAX_PLAINTEXT + 1 {
            return Err(RecordError::Oversized(len));
        }
        let header = [APPLICATION_DATA, 3, 3, (len >> 8) as u8, len as u8];
        let start = out.len();
        out.extend_from_slice(&header);
        out.extend_from_slice(inner);
        let nonce = self.0.next_nonce()?;
        let tag = self
            .0
            .key
            .seal_in_place_separate_tag(nonce, Aad::from(header), &mut out[start + HEADER..])
            .map_err(|_| RecordError::Cipher("seal failed"))?;
        out.extend_from_slice(tag.as_ref());
        Ok(())
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

/// Outgoing records built and sealed in one buffer, in place: plaintext (the session's frames,
/// DATA frame headers, payload read straight from a socket) is put where its record's
/// ciphertext goes, so sealing copies nothing. Frames fill records back to back (a record
/// holds up to 16 KiB of the HTTP/2 byte stream, whatever frames it cuts); a record is sealed
/// when it is full or when [`seal_open`](Self::seal_open) closes it before a write.
///
/// Layout: `buf[sent..sealed]` are sealed records not yet written; an open record, if any,
/// has its 5-byte header reserved at `sealed` and its plaintext in `buf[sealed + 5..len]`.
/// `buf` itself stays initialised (zeroed once as it grows) and is reused; `len` is the end
/// of what it holds.
pub struct RecordWriter {
    sealer: Sealer,
    buf: Vec<u8>,
    len: usize,
    sent: usize,
    sealed: usize,
    open: bool,
    records: u64,
}

/// Where a frame's payload goes: up to this many record slots (a 1 MiB frame spans 65).
const MAX_SLOTS: usize = 80;

impl RecordWriter {
    pub fn new(sealer: Sealer) -> Self {
        RecordWriter {
            sealer,
            buf: Vec::new(),
            len: 0,
            sent: 0,
            sealed: 0,
            open: false,
            records: 0,
        }
    }

    /// Bytes queued and not yet written (sealed records and the open record's plaintext).
    pub fn pending(&self) -> usize {
        self.len - self.sent
    }

    /// Records sealed so far (for the record budget).
    pub fn records_sealed(&self) -> u64 {
        self.records
    }

    /// Sealed bytes ready to write.
    pub fn sealed_bytes(&self) -> &[u8] {
        &self.buf[self.sent..self.sealed]
    }

    /// `n` sealed bytes were written. When everything is, the buffer starts over.
    pub fn consume(&mut self, n: usize) {
        self.sent += n;
        debug_assert!(self.sent <= self.sealed);
        if self.sent == self.len && !self.open {
            self.sent = 0;
            self.sealed = 0;
            self.len = 0;
        }
    }

    /// Appends plaintext to the open record(s), sealing each one that fills.
    pub fn append(&mut self, mut bytes: &[u8]) -> Result<(), RecordError> {
        while !bytes.is_empty() {
            self.open_record();
            let take = (MAX_PLAINTEXT - self.open_len()).min(bytes.len());
            self.grow(self.len + take);
            self.buf[self.len..self.len + take].copy_from_slice(&bytes[..take]);
            self.len += take;
            bytes = &bytes[take..];
            if self.open_len() == MAX_PLAINTEXT {
                self.seal_open()?;
            }
        }
        Ok(())
    }

    /// One frame read straight into records: `H` header bytes, then up to `max` payload bytes
    /// that `read` writes into the slices it is given, in order, as `readv(2)` would (it
    /// returns how many). `header(n)` gives the header for `n` payload bytes. With `Ok(0)`
    /// from `read`, or an error from either, nothing is added; otherwise returns `n`.
    pub fn read_frame<const H: usize>(
        &mut self,
        max: usize,
        read: impl FnOnce(&mut [std::io::IoSliceMut<'_>]) -> std::io::Result<usize>,
        header: impl FnOnce(usize) -> std::io::Result<[u8; H]>,
    ) -> std::io::Result<usize> {
        assert!(H < MAX_PLAINTEXT);
        self.compact();
        if self.open && MAX_PLAINTEXT - self.open_len() < H + 1 {
            self.seal_open().map_err(std::io::Error::other)?;
        }
        let opened_here = !self.open;
        self.open_record();
        let header_at = self.len;
        // Slot 0: the rest of the open record; then whole records, each leaving room for the
        // previous one's content type and tag and its own header.
        let mut slots = [(0usize, 0usize); MAX_SLOTS];
        let mut count = 0;
        let mut start = header_at + H;
        let mut room = MAX_PLAINTEXT - self.open_len() - H;
        let mut left = max;
        while left > 0 && count < MAX_SLOTS {
            let take = room.min(left);
            slots[count] = (start, take);
            count += 1;
            left -= take;
            start += room + 1 + TAG + HEADER;
            room = MAX_PLAINTEXT;
        }
        let (last_start, last_len) = slots[count.max(1) - 1];
        self.grow(last_start + last_len + 1 + TAG);
        let n = {
            let mut rest: &mut [u8] = &mut self.buf[..];
            let mut cut = 0;
            let mut iov: Vec<std::io::IoSliceMut<'_>> = Vec::with_capacity(count);
            for &(at, len) in &slots[..count] {
                let (_, tail) = std::mem::take(&mut rest).split_at_mut(at - cut);
                let (slot, tail) = tail.split_at_mut(len);
                iov.push(std::io::IoSliceMut::new(slot));
                rest = tail;
                cut = at + len;
            }
            read(&mut iov)
        };
        let framed = match n {
            Ok(0) => Ok(None),
            Ok(n) => header(n).map(|h| Some((n, h))),
            Err(e) => Err(e),
        };
        let n = match framed {
            Ok(Some((n, h))) => {
                self.buf[header_at..header_at + H].copy_from_slice(&h);
                n
            }
            other => {
                // Nothing added: back to where we were.
                self.len = header_at;
                if opened_here {
                    self.len = self.sealed;
                    self.open = false;
                }
                return other.map(|_| 0);
            }
        };
        self.len = header_at + H;
        let mut left = n;
        for (i, &(at, len)) in slots[..count].iter().enumerate() {
            if left == 0 {
                break;
            }
            let fill = len.min(left);
            if i > 0 {
                // A new record whose header sits just before its slot.
                self.sealed = at - HEADER;
                self.open = true;
            }
            self.len = at + fill;
            left -= fill;
            if self.open_len() == MAX_PLAINTEXT {
                self.seal_open().map_err(std::io::Error::other)?;
            }
        }
        debug_assert_eq!(left, 0, "read returned more than its slices hold");
        Ok(n)
    }

    /// Seals the open record, if any (before writing: the peer needs whole records).
    pub fn seal_open(&mut self) -> Result<(), RecordError> {
        if !self.open {
            return Ok(());
        }
        let at = self.sealed;
        let plain = self.open_len();
        if plain == 0 {
            self.len = at;
            self.open = false;
            return Ok(());
        }
        self.grow(self.len + 1 + TAG);
        let body = plain + 1 + TAG;
        let header = [APPLICATION_DATA, 3, 3, (body >> 8) as u8, body as u8];
        self.buf[at..at + HEADER].copy_from_slice(&header);
        self.buf[self.len] = APPLICATION_DATA;
        let nonce = self.sealer.0.next_nonce()?;
        let end = at + HEADER + plain + 1;
        let tag = self
            .sealer
            .0
            .key
            .seal_in_place_separate_tag(nonce, Aad::from(header), &mut self.buf[at + HEADER..end])
            .map_err(|_| RecordError::Cipher("seal failed"))?;
        self.buf[end..end + TAG].copy_from_slice(tag.as_ref());
        self.len = end + TAG;
        self.sealed = self.len;
        self.open = false;
        self.records += 1;
        Ok(())
    }

    /// Seals any open record, then a close_notify alert.
    pub fn close_notify(&mut self) -> Result<(), RecordError> {
        self.seal_open()?;
        let mut alert = Vec::new();
        self.sealer.seal_close_notify(&mut alert)?;
        self.push_sealed(&alert);
        Ok(())
    }

    /// Our TLS 1.3 key update: what is open is sealed, then `message` (the KeyUpdate) under the
    /// current key; every later record is sealed by `next`.
    pub fn key_update(&mut self, message: &[u8], next: Sealer) -> Result<(), RecordError> {
        self.seal_open()?;
        let mut record = Vec::new();
        self.sealer.seal_handshake(message, &mut record)?;
        self.push_sealed(&record);
        self.sealer = next;
        Ok(())
    }

    /// Appends one record sealed outside the buffer.
    fn push_sealed(&mut self, record: &[u8]) {
        self.grow(self.len + record.len());
        self.buf[self.len..self.len + record.len()].copy_from_slice(record);
        self.len += record.len();
        self.sealed = self.len;
        self.records += 1;
    }

    fn open_len(&self) -> usize {
        if self.open {
            self.len - self.sealed - HEADER
        } else {
            0
        }
    }

    fn open_record(&mut self) {
        if !self.open {
            debug_assert_eq!(self.sealed, self.len);
            self.grow(self.len + HEADER);
            self.len += HEADER;
            self.open = true;
        }
    }

    fn grow(&mut self, to: usize) {
        if self.buf.len() < to {
            self.buf.resize(to.next_power_of_two(), 0);
        }
    }

    /// Moves what is unsent to the front once the written part dominates the buffer.
    fn compact(&mut self) {
        if self.sent > 0 && self.sent >= self.len - self.sent {
            self.buf.copy_within(self.sent..self.len, 0);
            self.len -= self.sent;
            self.sealed -= self.sent;
            self.sent = 0;
        }
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

    /// The wire format is rustls's: after a real handshake, our side hands over to this record
    /// layer and the peer keeps rustls's own; bytes cross both ways intact.
    #[test]
    fn records_interoperate_with_rustls() {
        use crate::tls::fixtures::*;
        use crate::tls::handshake::{Handshake, Progress};
        use std::io::{Read, Write};
        use std::os::fd::AsRawFd;
        let pki = Pki::new("cluster.local");
        let (cc, sc) = configs(&pki, &pki.creds(CLIENT), &pki.creds(SERVER), SERVER);
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let data: Vec<u8> = (0..50_000u32).map(|i| (i % 253) as u8).collect();
        let echo = data.clone();
        // rustls's own buffered server: reads the data, then sends it back.
        let server = std::thread::spawn(move || {
            let (mut sock, _) = listener.accept().unwrap();
            let mut s = rustls::ServerConnection::new(sc).unwrap();
            let mut got = Vec::new();
            while got.len() < echo.len() {
                s.complete_io(&mut sock)
                    .expect("rustls accepts our records");
                let mut buf = [0u8; 65536];
                match s.reader().read(&mut buf) {
                    Ok(n) => got.extend_from_slice(&buf[..n]),
                    Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
                    Err(e) => panic!("{e}"),
                }
            }
            assert_eq!(got, echo);
            s.writer().write_all(&got).unwrap();
            while s.wants_write() {
                s.write_tls(&mut sock).unwrap();
            }
            sock
        });
        let mut sock = std::net::TcpStream::connect(addr).unwrap();
        sock.set_nonblocking(true).unwrap();
        let mut hs = Handshake::client(
            rustls::client::UnbufferedClientConnection::new(cc, crate::tls::server_name(addr.ip()))
                .unwrap(),
        );
        while hs.advance(sock.as_raw_fd()).expect("handshake") != Progress::Done {
            std::thread::sleep(std::time::Duration::from_millis(1));
        }
        let est = hs.finish().expect("handover");
        sock.set_nonblocking(false).unwrap();
        let mut sealer = Sealer::new(&est.secrets.tx.1, est.secrets.tx.0).unwrap();
        let mut opener = Opener::new(&est.secrets.rx.1, est.secrets.rx.0).unwrap();
        // Ours → rustls.
        let mut wire = Vec::new();
        sealer.seal(&data, &mut wire).unwrap();
        sock.write_all(&wire).unwrap();
        // rustls → ours.
        let mut raw = Vec::new();
        let mut plain = Vec::new();
        let mut buf = [0u8; 65536];
        while plain.len() < data.len() {
            let n = sock.read(&mut buf).unwrap();
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
        drop(server.join().unwrap());
    }

    /// Opens every record in `wire`, returning the application data and the record count.
    fn open_all(o: &mut Opener, wire: &mut [u8]) -> (Vec<u8>, usize) {
        let (mut got, mut off, mut records) = (Vec::new(), 0, 0);
        while let Some(r) = o.open_first(&mut wire[off..]).unwrap() {
            assert_eq!(r.content_type, APPLICATION_DATA);
            assert!(r.end - r.start <= MAX_PLAINTEXT);
            got.extend_from_slice(&wire[off + r.start..off + r.end]);
            off += r.consumed;
            records += 1;
        }
        assert_eq!(off, wire.len(), "trailing bytes that are not a record");
        (got, records)
    }

    /// Frames appended and read in place, with reads of every size (zero, short, spanning
    /// many records, exactly filling one), come out as the same byte stream, in records of at
    /// most 16 KiB, whenever the writer is drained: in place sealing loses, reorders and
    /// overlaps nothing.
    #[test]
    fn record_writer_keeps_the_stream_whatever_the_frame_sizes() {
        use std::io::Write as _;
        let (s, mut o) = pair(3, false, 9);
        let mut w = RecordWriter::new(s);
        let mut want = Vec::new();
        let mut wire = Vec::new();
        let mut rng = 0x2545_f491_4f6c_dd1du64;
        let mut next = |m: usize| {
            rng ^= rng << 13;
            rng ^= rng >> 7;
            rng ^= rng << 17;
            (rng % m as u64) as usize
        };
        let sizes = [
            0,
            1,
            7,
            16_375,
            16_376,
            16_384,
            16_385,
            40_000,
            100_000,
            1 << 20,
        ];
        for round in 0..300 {
            match next(4) {
                0 => {
                    let ctl: Vec<u8> = (0..next(30)).map(|i| (i + round) as u8).collect();
                    w.append(&ctl).unwrap();
                    want.extend_from_slice(&ctl);
                }
                _ => {
                    let max = if next(3) == 0 {
                        sizes[next(sizes.len())]
                    } else {
                        next(70_000)
                    };
                    let avail = if next(5) == 0 { 0 } else { next(max + 1) };
                    let payload: Vec<u8> = (0..avail).map(|i| (i * 7 + round) as u8).collect();
                    let n = w
                        .read_frame::<9>(
                            max,
                            |iov| {
                                let mut src = &payload[..];
                                let mut n = 0;
                                for s in iov.iter_mut() {
                                    let k = s.len().min(src.len());
                                    s[..k].copy_from_slice(&src[..k]);
                                    src = &src[k..];
                                    n += k;
                                }
                                Ok(n)
                            },
                            |n| {
                                Ok([
                                    0xAB,
                                    (n >> 16) as u8,
                                    (n >> 8) as u8,
                                    n as u8,
                                    0,
                                    0,
                                    0,
                                    0,
                                    1,
                                ])
                            },
                        )
                        .unwrap();
                    assert_eq!(n, avail.min(max));
                    if n > 0 {
                        want.extend_from_slice(&[
                            0xAB,
                            (n >> 16) as u8,
                            (n >> 8) as u8,
                            n as u8,
                            0,
                            0,
                            0,
                            0,
                            1,
                        ]);
                        want.extend_from_slice(&payload[..n]);
                    }
                }
            }
            // Sometimes write: seal what is open and take some or all sealed bytes.
            if next(3) == 0 {
                w.seal_open().unwrap();
                let ready = w.sealed_bytes().len();
                let k = if next(2) == 0 { ready } else { next(ready + 1) };
                wire.write_all(&w.sealed_bytes()[..k]).unwrap();
                w.consume(k);
            }
        }
        w.seal_open().unwrap();
        let rest = w.sealed_bytes().to_vec();
        wire.extend_from_slice(&rest);
        w.consume(rest.len());
        assert_eq!(w.pending(), 0);
        let (got, records) = open_all(&mut o, &mut wire);
        assert_eq!(records as u64, w.records_sealed());
        assert!(
            got == want,
            "stream differs ({} vs {} bytes)",
            got.len(),
            want.len()
        );
    }

    /// A read that fails or finds nothing leaves no trace, and a frame header is never split
    /// across records.
    #[test]
    fn record_writer_rolls_back_and_keeps_headers_whole() {
        let (s, mut o) = pair(4, true, 0);
        let mut w = RecordWriter::new(s);
        w.append(&vec![5u8; MAX_PLAINTEXT - 4]).unwrap(); // 4 bytes of room: too few for 9
        let err = w.read_frame::<9>(
            100,
            |_| Err(std::io::ErrorKind::WouldBlock.into()),
            |_| Ok([0; 9]),
        );
        assert!(err.is_err());
        assert_eq!(
            w.read_frame::<9>(100, |_| Ok(0), |_| Ok([0; 9])).unwrap(),
            0
        );
        assert_eq!(
            w.read_frame::<9>(
                100,
                |iov| {
                    iov[0][..3].copy_from_slice(b"abc");
                    Ok(3)
                },
                |_| Ok([9; 9])
            )
            .unwrap(),
            3
        );
        w.seal_open().unwrap();
        let mut wire = w.sealed_bytes().to_vec();
        let mut off = 0;
        let mut plains = Vec::new();
        while let Some(r) = o.open_first(&mut wire[off..]).unwrap() {
            plains.push(wire[off + r.start..off + r.end].to_vec());
            off += r.consumed;
        }
        assert_eq!(plains.len(), 2, "the header started a new record");
        assert_eq!(plains[0], vec![5u8; MAX_PLAINTEXT - 4]);
        assert_eq!(plains[1], [&[9u8; 9][..], b"abc"].concat());
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
