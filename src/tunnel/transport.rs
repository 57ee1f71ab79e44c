//! A tunnel's byte stream once TLS is established: HTTP/2 plaintext in and out, with records
//! sealed and opened by the kernel (kTLS: the socket itself carries plaintext) or in user space
//! with the same keys ([`record_layer`]).
//!
//! Reading: [`Transport::fill`] adds received plaintext to a buffer that [`buffered`] shows
//! and [`consume`] shortens; in kTLS mode the tunnel may instead splice DATA payload straight
//! off the socket ([`Transport::can_splice`]) whenever nothing is buffered. Non-data records are
//! judged the same way in both modes ([`ktls::control_record`]): NewSessionTicket is dropped,
//! close_notify is EOF, alerts end the tunnel with their reason, and a KeyUpdate is followed
//! where this end can install the peer's next key ([`KeyUpdates`]), else ends the tunnel.
//!
//! Writing: the session's frames are queued with [`queue`], a copied DATA frame is read from a
//! stream's socket straight into the output behind its header ([`read_data_frame`]: into the
//! records that will seal it in user-space mode), and [`flush`] writes until the socket is full.
//! Zero-copy DATA frames go around this queue, onto the socket directly, and only when it is
//! empty. Every record sent is charged to the [`RecordBudget`]; at the budget our own key is
//! updated (a KeyUpdate record, then the next send key) when this end can and the peer said it
//! follows, else the tunnel retires ([`Transport::must_retire`]).
//!
//! [`buffered`]: Transport::buffered
//! [`consume`]: Transport::consume
//! [`queue`]: Transport::queue
//! [`read_data_frame`]: Transport::read_data_frame
//! [`flush`]: Transport::flush

use std::collections::VecDeque;
use std::io;
use std::os::fd::RawFd;

use hbone_proto::frame::FRAME_HEADER_LEN;

use super::error::{errno, TunnelError};
use crate::data_plane::socket;
use crate::observability::hbone_metrics::{HboneMetrics, KeyUpdateKind, TlsRecordKind};
use crate::tls::handshake::KernelSide;
use crate::tls::ktls::{self, ControlRecord, KeyDirection, RecordBudget};
use crate::tls::record_layer::{self, Opener, RecordWriter, Sealer};

/// Plaintext queued for the peer before streams must wait (back-pressure).
pub const OUT_LIMIT: usize = 1024 * 1024;
/// Plaintext read from the peer per fill in copy mode.
pub const INPUT_CHUNK: usize = 256 * 1024;
/// Raw TLS bytes read per `recv` in user-space mode, at most.
const RAW_CHUNK: usize = 256 * 1024;
/// What the receive buffer starts with beyond one record's worth: it doubles each time a
/// `recv` fills it, up to [`RAW_CHUNK`], so an idle tunnel never holds the bulk size.
const RAW_START: usize = 16 * 1024;
/// A DATA frame read from a stream's socket starts at this many payload bytes; each read that
/// fills its size doubles the next (up to what the caller allows), and a short one brings it
/// back to twice what it got. Output buffers then grow only as far as the tunnel's traffic
/// really fills them: one byte sent no longer sizes (and zero-fills) a megabyte of them.
const FRAME_READ_START: usize = 16 * 1024;

/// What reading from the peer produced.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fill {
    /// Plaintext was added to the buffer.
    Got(usize),
    WouldBlock,
    /// The peer closed its sending side (close_notify, or TCP FIN between records on kTLS).
    Eof,
}

/// A byte buffer that stays initialised: data is `buf[start..end]`, reads land in `spare`.
#[derive(Debug, Default)]
struct Bytes {
    buf: Vec<u8>,
    start: usize,
    end: usize,
}

impl Bytes {
    fn as_slice(&self) -> &[u8] {
        &self.buf[self.start..self.end]
    }

    fn len(&self) -> usize {
        self.end - self.start
    }

    fn is_empty(&self) -> bool {
        self.start == self.end
    }

    fn consume(&mut self, n: usize) {
        self.start += n;
        debug_assert!(self.start <= self.end);
        if self.start == self.end {
            self.start = 0;
            self.end = 0;
        }
    }

    /// `n` writable bytes after the data (moving the data to the front when that makes room).
    fn spare(&mut self, n: usize) -> &mut [u8] {
        if self.start > 0 && self.buf.len() - self.end < n {
            self.buf.copy_within(self.start..self.end, 0);
            self.end -= self.start;
            self.start = 0;
        }
        if self.buf.len() < self.end + n {
            self.buf.resize(self.end + n, 0);
        }
        &mut self.buf[self.end..self.end + n]
    }

    fn commit(&mut self, n: usize) {
        self.end += n;
        debug_assert!(self.end <= self.buf.len());
    }

    fn append(&mut self, bytes: &[u8]) {
        self.spare(bytes.len()).copy_from_slice(bytes);
        self.commit(bytes.len());
    }
}

/// The user-space record layer's state.
struct UserTls {
    opener: Opener,
    /// Raw TLS bytes read and not yet opened: `raw[raw_pos..raw_len]`.
    raw: Vec<u8>,
    raw_pos: usize,
    raw_len: usize,
    /// Plaintext of opened records, in place in `raw` (`start..end`), not yet consumed.
    plain: VecDeque<(usize, usize)>,
    /// How much a `recv` may take now (see [`RAW_START`]).
    raw_want: usize,
    writer: RecordWriter,
    /// Records sealed and already charged to the budget.
    charged: u64,
    /// close_notify seen: EOF once the plaintext before it is consumed.
    closed: bool,
}

enum Mode {
    Kernel,
    User(Box<UserTls>),
}

/// TLS 1.3 key updates (RFC 8446 §4.6.3) of one tunnel: rustls's key schedule after the
/// handover, and what this end can do with it.
pub struct KeyUpdates {
    keys: KernelSide,
    /// A new receive key can be installed: always in user space; on kTLS where the kernel takes
    /// a second key (6.14+).
    can_follow: bool,
    /// A new send key can be installed (the same conditions).
    can_update: bool,
    /// The peer said it follows a KeyUpdate ([`KEY_UPDATE_SETTING`]): ours may go out at the
    /// record budget instead of retiring the tunnel.
    peer_follows: bool,
    /// Our KeyUpdate goes out before any more bytes: the peer asked, or the budget is reached.
    due: bool,
    /// Our KeyUpdates sent and not yet counted by the tunnel.
    sent_uncounted: u32,
}

/// The HTTP/2 SETTINGS parameter (from the experimental range, RFC 9113 §11.3; unknown
/// settings are ignored by every peer) by which a ringtun end says it follows its peer's TLS
/// KeyUpdate: 1 yes, 0 no. A peer that does not send it is not asked to follow ours.
pub const KEY_UPDATE_SETTING: u16 = 0xf0c5;

impl KeyUpdates {
    /// `kernel_rekey`: the socket's TLS is in the kernel and the kernel takes a second key, or
    /// the record layer runs in user space (which always can).
    pub fn new(keys: KernelSide, can_rekey: bool) -> KeyUpdates {
        KeyUpdates {
            keys,
            can_follow: can_rekey,
            can_update: can_rekey,
            peer_follows: false,
            due: false,
            sent_uncounted: 0,
        }
    }
}

/// See the module docs.
pub struct Transport {
    mode: Mode,
    /// Plaintext received and not consumed (kTLS reads, and what the handover decrypted).
    input: Bytes,
    /// kTLS: plaintext queued for the peer. User-space TLS queues into its records instead.
    out: Bytes,
    /// Payload bytes the next DATA frame read may take (see [`FRAME_READ_START`]).
    frame_read: usize,
    budget: RecordBudget,
    /// `None` where no TLS session stands behind the socket (the tests' plaintext tunnels).
    keys: Option<KeyUpdates>,
}

impl std::fmt::Debug for Transport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Transport")
            .field("kernel", &self.is_kernel())
            .field("buffered", &self.buffered().len())
            .field("out_pending", &self.out_pending())
            .finish()
    }
}

impl Transport {
    /// The socket does TLS itself (kTLS). `plaintext` is what the handover already decrypted.
    pub fn kernel(plaintext: Vec<u8>, budget: RecordBudget, keys: Option<KeyUpdates>) -> Transport {
        let mut t = Transport {
            mode: Mode::Kernel,
            input: Bytes::default(),
            out: Bytes::default(),
            frame_read: FRAME_READ_START,
            budget,
            keys,
        };
        t.input.append(&plaintext);
        t
    }

    /// Records are sealed and opened here with the handshake's secrets.
    pub fn user_space(
        secrets: &rustls::ExtractedSecrets,
        plaintext: Vec<u8>,
        budget: RecordBudget,
        keys: Option<KeyUpdates>,
    ) -> Result<Transport, TunnelError> {
        let sealer = Sealer::new(&secrets.tx.1, secrets.tx.0).map_err(TunnelError::TlsKeys)?;
        let opener = Opener::new(&secrets.rx.1, secrets.rx.0).map_err(TunnelError::TlsKeys)?;
        let mut t = Transport {
            mode: Mode::User(Box::new(UserTls {
                opener,
                raw: Vec::new(),
                raw_pos: 0,
                raw_len: 0,
                plain: VecDeque::new(),
                raw_want: RAW_START,
                writer: RecordWriter::new(sealer),
                charged: 0,
                closed: false,
            })),
            input: Bytes::default(),
            out: Bytes::default(),
            frame_read: FRAME_READ_START,
            budget,
            keys,
        };
        t.input.append(&plaintext);
        Ok(t)
    }

    pub fn is_kernel(&self) -> bool {
        matches!(self.mode, Mode::Kernel)
    }

    // ---------------------------------------------------------------------------- reading

    /// Plaintext received and not yet consumed, in order: the input buffer, then user-space
    /// records decrypted in place, one record at a time. Empty when nothing waits.
    pub fn buffered(&self) -> &[u8] {
        if !self.input.is_empty() {
            return self.input.as_slice();
        }
        match &self.mode {
            Mode::User(st) => st.plain.front().map_or(&[][..], |&(a, b)| &st.raw[a..b]),
            Mode::Kernel => &[],
        }
    }

    /// Marks `n` bytes of [`buffered`](Self::buffered) consumed.
    pub fn consume(&mut self, n: usize) {
        if !self.input.is_empty() {
            self.input.consume(n);
            return;
        }
        if let Mode::User(st) = &mut self.mode {
            if let Some(front) = st.plain.front_mut() {
                front.0 += n;
                debug_assert!(front.0 <= front.1);
                if front.0 >= front.1 {
                    st.plain.pop_front();
                }
            }
        }
    }

    /// True when the next plaintext byte is still in the socket and the socket is plaintext
    /// (kTLS): payload may be spliced off it.
    pub fn can_splice(&self) -> bool {
        self.is_kernel() && self.input.is_empty()
    }

    /// Reads more plaintext: at most `max` bytes on kTLS (so a zero-copy reader never pulls
    /// payload into user space by accident), whole records in user space. Call only when
    /// [`buffered`](Self::buffered) is empty.
    pub fn fill(
        &mut self,
        fd: RawFd,
        max: usize,
        metrics: &HboneMetrics,
    ) -> Result<Fill, TunnelError> {
        debug_assert!(self.buffered().is_empty(), "fill with unconsumed plaintext");
        match &mut self.mode {
            Mode::User(st) => user_fill(st, &mut self.keys, fd, metrics),
            Mode::Kernel => kernel_fill(&mut self.input, &mut self.keys, fd, max.max(1), metrics),
        }
    }

    // ---------------------------------------------------------------------------- writing

    /// Queues the session's frames (they precede any DATA frame written after).
    pub fn queue(&mut self, frames: &[u8]) {
        if frames.is_empty() {
            return;
        }
        match &mut self.mode {
            // Sealing fails only when the sequence number is exhausted, far past the record
            // budget; `flush` reports the writer's state then.
            Mode::User(st) => {
                let _ = st.writer.append(frames);
            }
            Mode::Kernel => self.out.append(frames),
        }
    }

    /// Reads up to `max` bytes from `src` as the payload of one DATA frame whose header
    /// `header(n)` gives: straight behind the header in the output (kTLS), or straight into
    /// the records that will seal it (user space: no copy before encryption). Returns the
    /// payload length; 0 is EOF (nothing added). `WouldBlock` adds nothing.
    pub fn read_data_frame(
        &mut self,
        src: RawFd,
        max: usize,
        header: impl FnOnce(usize) -> io::Result<[u8; FRAME_HEADER_LEN]>,
    ) -> io::Result<usize> {
        let max = max.min(self.frame_read);
        let n = if let Mode::User(st) = &mut self.mode {
            st.writer.read_frame::<FRAME_HEADER_LEN>(
                max,
                |iov| crate::sys::socket::readv(src, iov),
                header,
            )?
        } else {
            let room = self.out.spare(FRAME_HEADER_LEN + max);
            let n = crate::sys::socket::recv_nonblocking(src, &mut room[FRAME_HEADER_LEN..])?;
            if n == 0 {
                return Ok(0);
            }
            let h = header(n)?;
            room[..FRAME_HEADER_LEN].copy_from_slice(&h);
            self.out.commit(FRAME_HEADER_LEN + n);
            n
        };
        if n > 0 {
            self.frame_read = (2 * n).max(FRAME_READ_START);
        }
        Ok(n)
    }

    /// Plaintext queued for the peer and not yet written, our due KeyUpdate included (it
    /// waits for room like any other bytes: a writer that finds it pending waits too).
    pub fn out_pending(&self) -> usize {
        let records = match &self.mode {
            Mode::User(st) => st.writer.pending(),
            Mode::Kernel => 0,
        };
        let key_update = match &self.keys {
            Some(k) if k.due => ktls::key_update_message(false).len(),
            _ => 0,
        };
        self.out.len() + records + key_update
    }

    /// Room for more DATA frames before writers must wait.
    pub fn out_room(&self) -> usize {
        OUT_LIMIT.saturating_sub(self.out_pending())
    }

    /// Writes queued bytes until the socket would block; `Ok(true)` when everything left. A
    /// due KeyUpdate of ours goes first.
    pub fn flush(&mut self, fd: RawFd) -> Result<bool, TunnelError> {
        if !self.update_own_key(fd)? {
            return Ok(false);
        }
        match &mut self.mode {
            Mode::User(st) => {
                st.writer.seal_open().map_err(TunnelError::TlsRecord)?;
                let sealed = st.writer.records_sealed();
                self.budget.charge_records(sealed - st.charged);
                st.charged = sealed;
                while !st.writer.sealed_bytes().is_empty() {
                    match socket::send_nonblocking(fd, st.writer.sealed_bytes()) {
                        Ok(n) => st.writer.consume(n),
                        Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(false),
                        Err(e) => return Err(TunnelError::write(&e)),
                    }
                }
                Ok(true)
            }
            Mode::Kernel => {
                while !self.out.is_empty() {
                    match socket::send_nonblocking(fd, self.out.as_slice()) {
                        Ok(n) => {
                            self.budget.charge_send(n);
                            self.out.consume(n);
                        }
                        Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(false),
                        Err(e) => return Err(TunnelError::write(&e)),
                    }
                }
                Ok(true)
            }
        }
    }

    /// Our KeyUpdate, when due: the peer asked for it, or the record budget is reached and the
    /// peer follows. The record goes out under the current key, then the next send key is
    /// installed and the budget starts again. `Ok(false)`: the socket is full, try again.
    fn update_own_key(&mut self, fd: RawFd) -> Result<bool, TunnelError> {
        let Some(k) = self.keys.as_mut() else {
            return Ok(true);
        };
        if !k.can_update {
            return Ok(true);
        }
        if k.peer_follows && self.budget.should_retire() {
            k.due = true;
        }
        if !k.due {
            return Ok(true);
        }
        let message = ktls::key_update_message(false);
        let next = |k: &mut KeyUpdates| {
            k.keys
                .next_send_secret()
                .map_err(|e| TunnelError::KeyUpdate(format!("next send key: {e}")))
        };
        match &mut self.mode {
            Mode::Kernel => {
                // Bytes queued here but not yet written go out after it, under the new key:
                // the order of TLS records, not of our buffer, is what the peer follows.
                match ktls::send_key_update(fd, false) {
                    Ok(()) => {}
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(false),
                    Err(e) => return Err(TunnelError::write(&e)),
                }
                let secrets = next(k)?;
                ktls::install_next_key(fd, KeyDirection::Send, &secrets)?;
            }
            Mode::User(st) => {
                let secrets = next(k)?;
                let sealer = Sealer::new(&secrets, 0).map_err(TunnelError::TlsKeys)?;
                st.writer
                    .key_update(&message, sealer)
                    .map_err(TunnelError::TlsRecord)?;
                // The KeyUpdate record was sealed under the old key: charged to its count.
                let sealed = st.writer.records_sealed();
                self.budget.charge_records(sealed - st.charged);
                st.charged = sealed;
            }
        }
        k.due = false;
        k.sent_uncounted += 1;
        self.budget.rekeyed();
        Ok(true)
    }

    /// The peer's SETTINGS said whether it follows our KeyUpdate ([`KEY_UPDATE_SETTING`]).
    pub fn set_peer_follows(&mut self, follows: bool) {
        if let Some(k) = self.keys.as_mut() {
            k.peer_follows = follows;
        }
    }

    /// Whether a TLS session stands behind the socket (its keys can be updated at all).
    pub fn has_tls_session(&self) -> bool {
        self.keys.is_some()
    }

    /// Whether this end follows the peer's KeyUpdate (what it announces).
    pub fn follows_key_updates(&self) -> bool {
        self.keys.as_ref().is_some_and(|k| k.can_follow)
    }

    /// Our KeyUpdates sent since the last call (for the tunnel to count and log).
    pub fn take_key_updates_sent(&mut self) -> u32 {
        self.keys
            .as_mut()
            .map_or(0, |k| std::mem::take(&mut k.sent_uncounted))
    }

    /// True once the record budget is reached and our key cannot be updated instead: the
    /// tunnel retires.
    pub fn must_retire(&self) -> bool {
        self.budget.should_retire()
            && !self
                .keys
                .as_ref()
                .is_some_and(|k| k.can_update && k.peer_follows)
    }

    /// Charges bytes written around the queue (zero-copy frames) to the record budget.
    pub fn charge_written(&mut self, n: usize) {
        self.budget.charge_send(n);
    }

    pub fn budget(&self) -> &RecordBudget {
        &self.budget
    }

    /// Ends our sending side politely with close_notify; best effort, after a complete flush
    /// (nothing may be queued ahead of the alert).
    pub fn send_close_notify(&mut self, fd: RawFd) {
        match &mut self.mode {
            Mode::User(st) => {
                if st.writer.close_notify().is_ok() {
                    if let Ok(n) = socket::send_nonblocking(fd, st.writer.sealed_bytes()) {
                        st.writer.consume(n);
                    }
                }
            }
            Mode::Kernel => {
                let _ = ktls::send_close_notify(fd);
            }
        }
    }
}

/// What a control record meant for the reader.
enum Control {
    Continue,
    Eof,
}

/// Counts a control record and acts on it: EOF for close_notify, the peer's next key installed
/// (`install`) for a KeyUpdate this end can follow, an error for the rest.
fn judge_control(
    record_type: u8,
    payload: &[u8],
    keys: &mut Option<KeyUpdates>,
    metrics: &HboneMetrics,
    install: impl FnOnce(&rustls::ConnectionTrafficSecrets) -> Result<(), TunnelError>,
) -> Result<Control, TunnelError> {
    match ktls::control_record(record_type, payload) {
        ControlRecord::Ignore => {
            metrics.tls_record(TlsRecordKind::NewSessionTicket);
            Ok(Control::Continue)
        }
        ControlRecord::PeerClosed => {
            metrics.tls_record(TlsRecordKind::CloseNotify);
            Ok(Control::Eof)
        }
        ControlRecord::KeyUpdate { update_requested } => {
            metrics.tls_record(TlsRecordKind::KeyUpdate);
            let Some(k) = keys.as_mut().filter(|k| k.can_follow) else {
                return Err(TunnelError::KeyUpdate(
                    "peer sent KeyUpdate; this kernel cannot take a second kTLS key (6.14+ can)"
                        .into(),
                ));
            };
            let secrets = k
                .keys
                .next_receive_secret()
                .map_err(|e| TunnelError::KeyUpdate(format!("next receive key: {e}")))?;
            install(&secrets)?;
            metrics.key_update(KeyUpdateKind::Followed);
            if update_requested {
                k.due = true;
            }
            Ok(Control::Continue)
        }
        ControlRecord::Fatal(why) => {
            metrics.tls_record(TlsRecordKind::Alert);
            Err(TunnelError::TlsAlert(why))
        }
    }
}

/// kTLS: one `recvmsg` of at most `max` bytes into the input, handling control records (the
/// kernel returns one record type per call and stops at the end of a control record).
fn kernel_fill(
    input: &mut Bytes,
    keys: &mut Option<KeyUpdates>,
    fd: RawFd,
    max: usize,
    metrics: &HboneMetrics,
) -> Result<Fill, TunnelError> {
    loop {
        let buf = input.spare(max);
        let r = ktls::recv_record(fd, buf, libc::MSG_DONTWAIT);
        let got = match r {
            Ok(got) => got,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(Fill::WouldBlock),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(TunnelError::Read(errno(&e))),
        };
        if got.record_type == ktls::CONTENT_APPLICATION_DATA {
            if got.len == 0 {
                return Ok(Fill::Eof);
            }
            input.commit(got.len);
            return Ok(Fill::Got(got.len));
        }
        // If the read filled `max`, the control record may go on: take the rest of it.
        let mut control = buf[..got.len].to_vec();
        if got.len == max {
            let mut rest = vec![0u8; ktls::MAX_RECORD_PAYLOAD];
            if let Ok(p) = ktls::recv_record(fd, &mut rest, libc::MSG_DONTWAIT | libc::MSG_PEEK) {
                if p.len > 0 && p.record_type == got.record_type {
                    let taken = ktls::recv_record(fd, &mut rest[..p.len], libc::MSG_DONTWAIT)
                        .map_err(|e| TunnelError::Read(errno(&e)))?;
                    control.extend_from_slice(&rest[..taken.len]);
                }
            }
        }
        // After a KeyUpdate the kernel decrypts nothing (reads fail with EKEYEXPIRED, poll
        // stays silent) until the next key is installed: at once, here.
        let install = |secrets: &rustls::ConnectionTrafficSecrets| {
            ktls::install_next_key(fd, KeyDirection::Receive, secrets).map_err(TunnelError::from)
        };
        if let Control::Eof = judge_control(got.record_type, &control, keys, metrics, install)? {
            return Ok(Fill::Eof);
        }
    }
}

/// User space: opens every complete record already read, in place, queueing their plaintext
/// ranges; reads more from the socket only when none is complete and every opened byte was
/// consumed (reading may move the buffer's contents).
fn user_fill(
    st: &mut UserTls,
    keys: &mut Option<KeyUpdates>,
    fd: RawFd,
    metrics: &HboneMetrics,
) -> Result<Fill, TunnelError> {
    loop {
        let mut got = 0;
        while !st.closed {
            let opened = st
                .opener
                .open_first(&mut st.raw[st.raw_pos..st.raw_len])
                .map_err(TunnelError::TlsRecord)?;
            let Some(r) = opened else { break };
            let (a, b) = (st.raw_pos + r.start, st.raw_pos + r.end);
            st.raw_pos += r.consumed;
            if r.content_type == ktls::CONTENT_APPLICATION_DATA {
                if b > a {
                    st.plain.push_back((a, b));
                    got += b - a;
                }
                continue;
            }
            // Records after a KeyUpdate are opened with the next key: the loop's next turn.
            let opener = &mut st.opener;
            let install = |secrets: &rustls::ConnectionTrafficSecrets| {
                *opener = Opener::new(secrets, 0).map_err(TunnelError::TlsKeys)?;
                Ok(())
            };
            if let Control::Eof =
                judge_control(r.content_type, &st.raw[a..b], keys, metrics, install)?
            {
                st.closed = true;
            }
        }
        if got > 0 {
            return Ok(Fill::Got(got));
        }
        if !st.plain.is_empty() {
            return Err(TunnelError::Internal(
                "read asked for while decrypted input is unconsumed",
            ));
        }
        if st.closed {
            return Ok(Fill::Eof);
        }
        if st.raw_pos > 0 {
            st.raw.copy_within(st.raw_pos..st.raw_len, 0);
            st.raw_len -= st.raw_pos;
            st.raw_pos = 0;
        }
        // Room for the rest of a record in progress and another whole one, plus what reads
        // have shown they fill.
        let size = st.raw_want + 2 * (record_layer::MAX_PLAINTEXT + 512);
        if st.raw.len() < size {
            // Zeroed once per size: reads land in it without clearing.
            st.raw.resize(size, 0);
        }
        match crate::sys::socket::recv_nonblocking(fd, &mut st.raw[st.raw_len..]) {
            Ok(0) if st.raw_len > 0 => return Err(TunnelError::PeerClosedInsideRecord),
            Ok(0) => return Err(TunnelError::PeerClosedWithoutCloseNotify),
            Ok(n) => {
                if st.raw_len + n == st.raw.len() {
                    st.raw_want = (2 * st.raw_want).min(RAW_CHUNK);
                }
                st.raw_len += n;
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(Fill::WouldBlock),
            Err(e) => return Err(TunnelError::Read(errno(&e))),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;
    use std::os::fd::AsRawFd;

    /// A stream that sends one byte costs its tunnel's output buffer one small frame, not the
    /// megabyte its credit would allow; a stream that keeps filling its reads doubles them.
    #[test]
    fn frame_reads_grow_with_what_the_socket_really_has() {
        let (mut app, src) = crate::data_plane::socket::tcp_pair();
        src.set_nonblocking(true).unwrap();
        let mut t = Transport::kernel(Vec::new(), RecordBudget::default(), None);
        let header = |n: usize| Ok([n as u8; FRAME_HEADER_LEN]);
        app.write_all(b"x").unwrap();
        std::thread::sleep(std::time::Duration::from_millis(20));
        assert_eq!(
            t.read_data_frame(src.as_raw_fd(), 1 << 20, header).unwrap(),
            1
        );
        assert!(
            t.out.buf.len() <= FRAME_HEADER_LEN + FRAME_READ_START,
            "one byte sized the output to {} bytes",
            t.out.buf.len()
        );
        let writer = std::thread::spawn(move || {
            app.write_all(&vec![7u8; 4 << 20]).unwrap();
            app
        });
        let mut reads: Vec<usize> = Vec::new();
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
        while reads.iter().sum::<usize>() < 4 << 20 && std::time::Instant::now() < deadline {
            match t.read_data_frame(src.as_raw_fd(), 1 << 20, header) {
                Ok(n) => reads.push(n),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    std::thread::sleep(std::time::Duration::from_millis(1))
                }
                Err(e) => panic!("read failed: {e}"),
            }
            // What was framed leaves, as the tunnel's writes would take it.
            t.out.consume(t.out.len());
        }
        let _app = writer.join().unwrap();
        assert_eq!(reads.iter().sum::<usize>(), 4 << 20, "every byte was read");
        let mut allowed = FRAME_READ_START;
        for &n in &reads {
            assert!(
                n <= allowed,
                "a read of {n} where {allowed} was allowed: {reads:?}"
            );
            allowed = (2 * n).clamp(FRAME_READ_START, 1 << 20);
        }
        assert!(
            reads.iter().any(|&n| n > 64 << 10),
            "reads never grew past 64 KiB: {reads:?}"
        );
    }

    #[test]
    fn bytes_keep_order_across_compaction() {
        let mut b = Bytes::default();
        b.append(b"hello ");
        b.consume(3);
        b.append(b"world");
        assert_eq!(b.as_slice(), b"lo world");
        let spare = b.spare(4);
        spare.copy_from_slice(b"!!!!");
        b.commit(2);
        assert_eq!(b.as_slice(), b"lo world!!");
        b.consume(b.len());
        assert!(b.is_empty());
        assert_eq!((b.start, b.end), (0, 0));
    }
}
