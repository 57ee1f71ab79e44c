//! One HBONE tunnel connection as the reactor drives it: a non-blocking TCP socket, its TLS
//! (a rustls handshake, then records in the kernel — kTLS — or in user space with the same keys,
//! [`record_layer`]), and the HTTP/2 [`Session`] on top. The tunnel knows nothing of flows or
//! drivers; it moves plaintext between the socket and two buffers and says what it waits for:
//!
//! - `out`: HTTP/2 bytes queued for the peer — the session's frames (`poll_transmit`) and the
//!   DATA frames streams append with [`Tunnel::append_data_from`], which reads a stream's
//!   socket straight into the buffer behind a 9-byte header it fills in afterwards. (kTLS
//!   streams instead splice their payload with `tunnel_io`; see `reactor::hbone`.)
//! - `input`: plaintext read from the peer and not yet handed to the session or to a stream.
//!
//! Either way non-data records are judged by `ktls::control_record`: NewSessionTicket is
//! dropped, close_notify is EOF, KeyUpdate — which extracted keys cannot follow — and alerts
//! end the tunnel with a clear reason. Records sent are counted against the retirement budget
//! so a tunnel is replaced long before the AES-GCM record limit.
//!
//! The handshake reads record by record ([`RecordReader`]) so that nothing after the last
//! handshake record is pulled into user space before the keys may move to the kernel.
//! Closing politely ([`Phase::Closing`]): flush, close_notify, FIN, then read until the peer's
//! FIN — closing with unread bytes would make the kernel send a reset.

use std::collections::{HashMap, VecDeque};
use std::io::{self, Read, Write};
use std::net::SocketAddr;
use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::time::Instant;

use hbone_proto::frame::FRAME_HEADER_LEN;
use hbone_proto::{Session, StreamId};
use rustls::Connection;

use super::io::FrameReceiver;
use super::pool::TunnelId;
use crate::control_plane::identity::SpiffeId;
use crate::control_plane::workload_registry::WorkloadId;
use crate::data_plane::driver::FlowKey;
use crate::data_plane::socket::send_nonblocking as send;
use crate::kernel_features::KtlsSupport;
use crate::redirection::netns::NetNs;
use crate::tls;
use crate::tls::ktls::{self, ControlRecord, Offload, RecordBudget, RecordReader, TunnelTlsMode};
use crate::tls::record_layer::{self, Opener, RecordWriter, Sealer};

/// Plaintext the tunnel queues for the peer before streams must wait (back-pressure).
pub const OUT_LIMIT: usize = 1024 * 1024;
/// Plaintext read from the peer per fill.
const INPUT_CHUNK: usize = 256 * 1024;

/// Which end of the tunnel this node is.
#[derive(Debug, Clone)]
pub enum Role {
    /// We opened it for the pool entry `pool_id`, to `peer`, expecting `expected`.
    Client {
        pool_id: TunnelId,
        peer: SocketAddr,
        expected: SpiffeId,
        /// The source workload (its namespace made the socket).
        source: WorkloadId,
    },
    /// A peer opened it to `local` (a local workload's address, port 15008).
    Server {
        workload: WorkloadId,
        local: SocketAddr,
        peer: SocketAddr,
        /// The workload's namespace, where connections to it are made.
        netns: Option<NetNs>,
    },
}

impl Role {
    pub fn label(&self) -> &'static str {
        match self {
            Role::Client { .. } => "client",
            Role::Server { .. } => "server",
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Phase {
    /// TCP connect in flight (client).
    Connecting,
    Handshaking,
    /// TLS done; the session runs.
    Open,
    /// GOAWAY sent; writing what is queued, then close_notify and FIN, then waiting for the
    /// peer's FIN. No stream is attached any more.
    Closing,
}

enum Tls {
    Handshaking {
        conn: Box<Connection>,
        reader: RecordReader<FdIo>,
    },
    /// Records sealed and opened in user space with the extracted keys ([`record_layer`]).
    User(Box<SoftTls>),
    Kernel,
    /// Between states (only while a method swaps them).
    Gone,
}

/// The user-space record layer's state: keys, raw bytes read from the socket and not yet
/// opened, sealed bytes not yet written.
struct SoftTls {
    opener: Opener,
    raw: Vec<u8>,
    raw_pos: usize,
    raw_len: usize,
    /// Plaintext of opened application-data records, in place in `raw` (`start..end`), not
    /// yet consumed: the session reads it where it was decrypted, with no copy.
    plain: VecDeque<(usize, usize)>,
    /// Outgoing records, sealed in place (frames are written into their records directly).
    writer: RecordWriter,
    /// Records sealed and already charged to the record budget.
    charged: u64,
    /// close_notify seen: EOF once the plaintext before it is consumed.
    closed: bool,
}

/// Raw TLS bytes read per `recv` in user-space mode.
const RAW_CHUNK: usize = 256 * 1024;

/// A raw non-blocking socket as `Read + Write` for rustls.
pub struct FdIo(pub RawFd);

impl Read for FdIo {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        loop {
            // SAFETY: `buf` is a live writable slice of `buf.len()` bytes.
            let n = unsafe { libc::recv(self.0, buf.as_mut_ptr().cast(), buf.len(), 0) };
            if n >= 0 {
                return Ok(n as usize);
            }
            let e = io::Error::last_os_error();
            if e.kind() != io::ErrorKind::Interrupted {
                return Err(e);
            }
        }
    }
}

impl Write for FdIo {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        send(self.0, buf)
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// Why a tunnel ends badly; the text goes to the log, the label to metrics.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TunnelError {
    pub label: &'static str,
    pub detail: String,
}

impl TunnelError {
    pub fn new(label: &'static str, detail: impl Into<String>) -> Self {
        TunnelError {
            label,
            detail: detail.into(),
        }
    }
}

impl std::fmt::Display for TunnelError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} ({})", self.detail, self.label)
    }
}

/// What one handshake step needs next.
#[derive(Debug)]
pub enum Handshake {
    WantRead,
    WantWrite,
    Done,
}

/// What reading from the peer produced.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fill {
    /// Bytes were added to the input.
    Got(usize),
    WouldBlock,
    /// The peer closed its sending side (close_notify or TCP FIN between records).
    Eof,
}

pub struct Tunnel {
    pub key: FlowKey,
    pub fd: OwnedFd,
    pub role: Role,
    pub phase: Phase,
    tls: Tls,
    pub session: Option<Session>,
    /// Streams on this tunnel and the flows that carry them.
    pub streams: HashMap<StreamId, FlowKey>,
    out: Vec<u8>,
    out_pos: usize,
    input: Vec<u8>,
    input_pos: usize,
    pub peer_eof: bool,
    /// Readiness requests the driver holds (bits from `armed_bit`, side Upstream).
    pub armed: u8,
    /// Flows that wait for the socket: room in `out`, or a zero-copy frame in flight.
    /// Woken when a flush makes room.
    pub blocked: Vec<FlowKey>,
    /// Flows that wait for flow-control credit: woken only by the peer's WINDOW_UPDATE or
    /// SETTINGS (`SendCapacity`). Waking them on every flush made an idle sender spin
    /// through the run queue until the credit came (seen in perf as clock_gettime).
    pub waiting_credit: Vec<FlowKey>,
    pub mode: Option<TunnelTlsMode>,
    pub peer_identity: Option<SpiffeId>,
    /// The negotiated AEAD (set by `establish`).
    pub cipher: Option<crate::kernel_features::KtlsCipher>,
    pub budget: RecordBudget,
    /// The session timer currently in the reactor's heap.
    pub timer_at: Option<Instant>,
    pub started: Instant,
    /// Draining: GOAWAY received or the record budget reached; no new streams.
    pub retiring: bool,
    /// Queued to run again without waiting (it used its read budget).
    pub queued: bool,
    /// Closing: close_notify and FIN went out.
    pub fin_sent: bool,
    /// kTLS with `node.hbone.zero_copy`: streams splice their payload (set at `establish`).
    pub zero_copy: bool,
    /// kTLS only: the stream flow whose DATA frame is partly written. Nothing else may write
    /// to the socket until that frame is complete (`tunnel_io`'s rule).
    pub writer: Option<FlowKey>,
    /// The session drained (GOAWAY, no streams left) while `writer` was mid-frame: the
    /// stream's last frame (often its END_STREAM, which is what emptied the session) is
    /// committed but not yet on the wire. The tunnel closes once it is written.
    pub close_when_written: bool,
    /// Server tunnels: since when no stream has been open (checked at each session timer).
    pub idle_since: Option<Instant>,
    /// kTLS only: frames read with payloads spliced into the streams' pipes. Taken over from
    /// the copying reader once the session is between frames.
    pub receiver: Option<FrameReceiver>,
}

impl Tunnel {
    /// A tunnel whose socket is connecting (client) or accepted (server); the TLS handshake
    /// starts with `conn`.
    pub fn new(
        key: FlowKey,
        fd: OwnedFd,
        role: Role,
        conn: Connection,
        record_budget: u64,
        now: Instant,
    ) -> Tunnel {
        let phase = match role {
            Role::Client { .. } => Phase::Connecting,
            Role::Server { .. } => Phase::Handshaking,
        };
        let raw = fd.as_raw_fd();
        Tunnel {
            key,
            fd,
            role,
            phase,
            tls: Tls::Handshaking {
                conn: Box::new(conn),
                reader: RecordReader::new(FdIo(raw)),
            },
            session: None,
            streams: HashMap::new(),
            out: Vec::new(),
            out_pos: 0,
            input: Vec::new(),
            input_pos: 0,
            peer_eof: false,
            armed: 0,
            blocked: Vec::new(),
            waiting_credit: Vec::new(),
            mode: None,
            peer_identity: None,
            cipher: None,
            budget: RecordBudget::new(record_budget),
            timer_at: None,
            started: now,
            retiring: false,
            queued: false,
            fin_sent: false,
            zero_copy: false,
            writer: None,
            close_when_written: false,
            idle_since: None,
            receiver: None,
        }
    }

    pub fn raw(&self) -> RawFd {
        self.fd.as_raw_fd()
    }

    /// Advances the TLS handshake as far as the socket allows.
    pub fn handshake(&mut self) -> Result<Handshake, TunnelError> {
        let Tls::Handshaking { conn, reader } = &mut self.tls else {
            return Ok(Handshake::Done);
        };
        match ktls::complete_handshake(conn, reader) {
            Ok(()) => Ok(Handshake::Done),
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => Ok(if conn.wants_write() {
                Handshake::WantWrite
            } else {
                Handshake::WantRead
            }),
            Err(e) if e.kind() == io::ErrorKind::InvalidData => {
                Err(TunnelError::new("tls_handshake", e.to_string()))
            }
            Err(e) => Err(TunnelError::new("tls_io", e.to_string())),
        }
    }

    /// After the handshake: checks what was negotiated (TLS 1.3, h2, the peer's identity), then
    /// moves the keys to the kernel when `support` allows and `allow_ktls` says so, and starts
    /// the HTTP/2 session.
    pub fn establish(
        &mut self,
        support: &KtlsSupport,
        allow_ktls: bool,
        zero_copy: bool,
        now: Instant,
    ) -> Result<(), TunnelError> {
        let Tls::Handshaking { conn, .. } = std::mem::replace(&mut self.tls, Tls::Gone) else {
            return Err(TunnelError::new(
                "internal",
                "establish outside the handshake",
            ));
        };
        let negotiated = tls::negotiated(&conn)
            .map_err(|e| TunnelError::new("tls_negotiation", e.to_string()))?;
        self.peer_identity = Some(negotiated.peer);
        self.cipher = Some(negotiated.cipher);
        let offload = if allow_ktls {
            ktls::offload(&self.fd, *conn, support)
                .map_err(|e| TunnelError::new("ktls_install", e.to_string()))?
        } else {
            Offload::UserSpace {
                conn,
                reason: ktls::UserSpaceReason::NoKtls(
                    "kTLS turned off by node.hbone.ktls".to_string(),
                ),
            }
        };
        self.mode = Some(offload.mode());
        match offload {
            Offload::Kernel { received, .. } => {
                self.input.extend_from_slice(&received);
                self.tls = Tls::Kernel;
                self.zero_copy = zero_copy;
            }
            Offload::UserSpace { mut conn, .. } => {
                // Plaintext rustls already holds goes first, then its keys move here.
                let mut chunk = [0u8; 4096];
                loop {
                    match conn.reader().read(&mut chunk) {
                        Ok(0) => break,
                        Ok(n) => self.input.extend_from_slice(&chunk[..n]),
                        Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                        Err(e) => return Err(TunnelError::new("tls_read", e.to_string())),
                    }
                }
                let secrets = conn
                    .dangerous_extract_secrets()
                    .map_err(|e| TunnelError::new("tls_secrets", e.to_string()))?;
                let rec =
                    |e: record_layer::RecordError| TunnelError::new("tls_keys", e.to_string());
                self.tls = Tls::User(Box::new(SoftTls {
                    writer: RecordWriter::new(
                        Sealer::new(&secrets.tx.1, secrets.tx.0).map_err(rec)?,
                    ),
                    charged: 0,
                    opener: Opener::new(&secrets.rx.1, secrets.rx.0).map_err(rec)?,
                    raw: Vec::new(),
                    raw_pos: 0,
                    raw_len: 0,
                    plain: VecDeque::new(),
                    closed: false,
                }));
            }
        }
        let settings = hbone_proto::Settings::default();
        let mut session = match self.role {
            Role::Client { .. } => Session::client(settings, now),
            Role::Server { .. } => Session::server(settings, now),
        };
        session.poll_transmit(&mut self.out);
        self.session = Some(session);
        self.phase = Phase::Open;
        Ok(())
    }

    pub fn is_kernel_tls(&self) -> bool {
        matches!(self.tls, Tls::Kernel)
    }

    /// kTLS: the zero-copy receiver may take over reading (nothing buffered, the session
    /// between frames, past the preface).
    pub fn zero_copy_rx_ready(&self) -> bool {
        self.zero_copy
            && self.is_kernel_tls()
            && self.input_pos == self.input.len()
            && self.session.as_ref().is_some_and(|s| s.at_frame_boundary())
    }

    /// The tunnel's IO state in one line, for the log when it fails: whether bytes sat
    /// unread in the socket, what the reader waited for, what the writer held, and the
    /// flow-control windows. Enough to tell a missed wakeup from a peer that stopped.
    pub fn describe_io(&self) -> String {
        let (unread, unacked) = crate::data_plane::socket::queued_bytes(self.raw());
        let show = |n: Option<i32>| n.map_or("?".into(), |n| n.to_string());
        let reader = match &self.receiver {
            Some(r) => format!("zero-copy receiver at {}", r.describe()),
            None => format!(
                "{} bytes of input unparsed",
                self.input.len() - self.input_pos
            ),
        };
        let windows = self.session.as_ref().map_or(String::new(), |s| {
            let streams: Vec<String> = self
                .streams
                .keys()
                .map(|&id| {
                    format!(
                        "{id:?} send {} recv {}",
                        s.stream_send_window(id).unwrap_or(0),
                        s.stream_recv_window(id).unwrap_or(0)
                    )
                })
                .collect();
            format!(
                "; windows: connection send {} recv {}; {}",
                s.connection_send_window(),
                s.connection_recv_window(),
                streams.join(", ")
            )
        });
        format!(
            "socket: {} bytes unread, {} unacknowledged; {reader}; {} bytes queued to write; \
             mid-frame writer: {}; {} streams, {} waiting for the socket, {} for credit; \
             armed {:#b}, queued {}, retiring {}, peer EOF {}{windows}",
            show(unread),
            show(unacked),
            self.out_pending(),
            self.writer.is_some(),
            self.streams.len(),
            self.blocked.len(),
            self.waiting_credit.len(),
            self.armed,
            self.queued,
            self.retiring,
            self.peer_eof,
        )
    }

    /// Charges bytes written around `flush` (zero-copy frames) to the record budget.
    pub fn charge_written(&mut self, n: usize) {
        self.budget.charge_send(n);
    }

    /// Plaintext queued for the peer and not yet written.
    pub fn out_pending(&self) -> usize {
        let records = match &self.tls {
            Tls::User(st) => st.writer.pending(),
            _ => 0,
        };
        self.out.len() - self.out_pos + records
    }

    /// Room for more DATA frames before the writer must wait.
    pub fn out_room(&self) -> usize {
        OUT_LIMIT.saturating_sub(self.out_pending())
    }

    /// Moves the session's queued frames into `out` (they must precede any DATA frame).
    pub fn take_transmit(&mut self) {
        if let Some(s) = self.session.as_mut() {
            s.poll_transmit(&mut self.out);
        }
        self.move_out_to_records();
    }

    /// User-space TLS: plaintext queued in `out` (the session's frames) goes into the open
    /// record, behind everything before it. `out` is only a staging area in that mode.
    fn move_out_to_records(&mut self) {
        if let Tls::User(st) = &mut self.tls {
            if self.out_pos < self.out.len() {
                // Sealing only fails when the sequence number is exhausted, far past the
                // record budget; the next flush reports it then.
                if st.writer.append(&self.out[self.out_pos..]).is_ok() {
                    self.out.clear();
                    self.out_pos = 0;
                }
            }
        }
    }

    /// Reads up to `max` bytes from `src` as the payload of one DATA frame of `stream`:
    /// straight into `out` behind the frame header (kTLS), or straight into the records it
    /// will be sealed in (user-space TLS: no copy before encryption). Returns the bytes read;
    /// 0 means EOF. `WouldBlock` adds nothing.
    pub fn append_data_from(
        &mut self,
        src: RawFd,
        stream: StreamId,
        max: usize,
    ) -> io::Result<usize> {
        self.take_transmit();
        if let Tls::User(st) = &mut self.tls {
            let session = self.session.as_mut().expect("open tunnel");
            return st.writer.read_frame::<FRAME_HEADER_LEN>(
                max,
                |iov| readv(src, iov),
                |n| {
                    session
                        .data_frame_header(stream, n, false)
                        .map_err(|e| io::Error::other(e.to_string()))
                },
            );
        }
        let start = self.out.len();
        self.out.reserve(FRAME_HEADER_LEN + max);
        let n = loop {
            // SAFETY: `reserve` guarantees `max` bytes of spare capacity after the header; the
            // kernel writes at most `max` bytes there and we only expose what it wrote.
            let n = unsafe {
                libc::read(
                    src,
                    self.out.as_mut_ptr().add(start + FRAME_HEADER_LEN).cast(),
                    max,
                )
            };
            if n >= 0 {
                break n as usize;
            }
            let e = io::Error::last_os_error();
            if e.kind() != io::ErrorKind::Interrupted {
                return Err(e);
            }
        };
        if n == 0 {
            return Ok(0);
        }
        let session = self.session.as_mut().expect("open tunnel");
        let header = session
            .data_frame_header(stream, n, false)
            .map_err(|e| io::Error::other(e.to_string()))?;
        // SAFETY: the header bytes are written below before anyone reads them, and the `n`
        // payload bytes after them were initialised by `read`.
        unsafe { self.out.set_len(start + FRAME_HEADER_LEN + n) };
        self.out[start..start + FRAME_HEADER_LEN].copy_from_slice(&header);
        Ok(n)
    }

    /// Writes queued plaintext until the socket would block. `Ok(true)` when everything left.
    pub fn flush(&mut self) -> Result<bool, TunnelError> {
        if self.writer.is_some() {
            // A zero-copy frame is half written: its sender finishes it first.
            return Ok(
                self.out_pending() == 0 && !self.session.as_ref().is_some_and(|s| s.has_transmit())
            );
        }
        self.take_transmit();
        let fd = self.fd.as_raw_fd();
        let io_err = |e: io::Error| TunnelError::new("write", e.to_string());
        match &mut self.tls {
            Tls::User(st) => {
                if self.out_pos < self.out.len() {
                    st.writer
                        .append(&self.out[self.out_pos..])
                        .map_err(|e| TunnelError::new("tls_seal", e.to_string()))?;
                    self.out.clear();
                    self.out_pos = 0;
                }
                st.writer
                    .seal_open()
                    .map_err(|e| TunnelError::new("tls_seal", e.to_string()))?;
                let sealed = st.writer.records_sealed();
                self.budget.charge_records(sealed - st.charged);
                st.charged = sealed;
                while !st.writer.sealed_bytes().is_empty() {
                    match send(fd, st.writer.sealed_bytes()) {
                        Ok(n) => st.writer.consume(n),
                        Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(false),
                        Err(e) => return Err(io_err(e)),
                    }
                }
                Ok(true)
            }
            Tls::Kernel => {
                while self.out_pos < self.out.len() {
                    match send(fd, &self.out[self.out_pos..]) {
                        Ok(n) => {
                            self.budget.charge_send(n);
                            self.out_pos += n;
                        }
                        Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                            self.compact_out();
                            return Ok(false);
                        }
                        Err(e) => return Err(io_err(e)),
                    }
                }
                self.out.clear();
                self.out_pos = 0;
                Ok(true)
            }
            Tls::Handshaking { .. } | Tls::Gone => Ok(self.out_pos == self.out.len()),
        }
    }

    fn compact_out(&mut self) {
        if self.out_pos > OUT_LIMIT {
            self.out.drain(..self.out_pos);
            self.out_pos = 0;
        }
    }

    /// Plaintext received and not yet consumed, in order: bytes in the input buffer (kTLS
    /// reads, and what the handshake left), then user-space TLS records decrypted in place,
    /// one record at a time. Empty when nothing waits.
    pub fn input(&self) -> &[u8] {
        if self.input_pos < self.input.len() {
            return &self.input[self.input_pos..];
        }
        match &self.tls {
            Tls::User(st) => st.plain.front().map_or(&[][..], |&(a, b)| &st.raw[a..b]),
            _ => &[],
        }
    }

    /// The session, the unconsumed input and the stream map together (disjoint borrows).
    #[allow(clippy::type_complexity)]
    pub fn session_input(&mut self) -> Option<(&mut Session, &[u8], &HashMap<StreamId, FlowKey>)> {
        let input = if self.input_pos < self.input.len() {
            &self.input[self.input_pos..]
        } else {
            match &self.tls {
                Tls::User(st) => st.plain.front().map_or(&[][..], |&(a, b)| &st.raw[a..b]),
                _ => &[],
            }
        };
        let streams = &self.streams;
        self.session.as_mut().map(|s| (s, input, streams))
    }

    /// Marks `n` bytes of [`input`](Self::input) consumed.
    pub fn consume_input(&mut self, n: usize) {
        if self.input_pos < self.input.len() {
            self.input_pos += n;
            if self.input_pos == self.input.len() {
                self.input.clear();
                self.input_pos = 0;
            }
            return;
        }
        if let Tls::User(st) = &mut self.tls {
            if let Some(front) = st.plain.front_mut() {
                front.0 += n;
                debug_assert!(front.0 <= front.1);
                if front.0 >= front.1 {
                    st.plain.pop_front();
                }
            }
        }
    }

    /// Reads more plaintext from the peer into the input buffer. `records` counts the non-data
    /// records a kTLS socket handed up (for metrics).
    pub fn fill(&mut self, records: &mut Vec<&'static str>) -> Result<Fill, TunnelError> {
        // A kTLS tunnel about to hand reading to the zero-copy receiver reads no further than
        // the session wants, so no DATA payload lands in user space by accident.
        let max = if self.zero_copy && self.is_kernel_tls() {
            self.session
                .as_ref()
                .map_or(INPUT_CHUNK, |s| s.input_wanted().clamp(1, INPUT_CHUNK))
        } else {
            INPUT_CHUNK
        };
        if self.input_pos > 0 {
            self.input.drain(..self.input_pos);
            self.input_pos = 0;
        }
        let fd = self.fd.as_raw_fd();
        if let Tls::User(st) = &mut self.tls {
            return soft_fill(st, fd, records);
        }
        let start = self.input.len();
        self.input.resize(start + max, 0);
        let r = self.fill_into(start, records);
        let got = match r {
            Ok(Fill::Got(n)) => n,
            _ => 0,
        };
        self.input.truncate(start + got);
        r
    }

    fn fill_into(
        &mut self,
        start: usize,
        records: &mut Vec<&'static str>,
    ) -> Result<Fill, TunnelError> {
        let fd = self.fd.as_raw_fd();
        let buf = &mut self.input[start..];
        match &mut self.tls {
            Tls::User(_) => Ok(Fill::WouldBlock),
            Tls::Kernel => loop {
                match ktls::recv_record(fd, buf, libc::MSG_DONTWAIT) {
                    Ok(r) if r.record_type == ktls::CONTENT_APPLICATION_DATA => {
                        return Ok(if r.len == 0 {
                            Fill::Eof
                        } else {
                            Fill::Got(r.len)
                        })
                    }
                    Ok(r) => match ktls::control_record(r.record_type, &buf[..r.len]) {
                        ControlRecord::Ignore => records.push("new_session_ticket"),
                        ControlRecord::PeerClosed => {
                            records.push("close_notify");
                            return Ok(Fill::Eof);
                        }
                        ControlRecord::Retire(why) => {
                            records.push("key_update");
                            return Err(TunnelError::new("ktls_key_update", why));
                        }
                        ControlRecord::Fatal(why) => {
                            records.push("alert");
                            return Err(TunnelError::new("tls_alert", why));
                        }
                    },
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(Fill::WouldBlock),
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                    Err(e) => return Err(TunnelError::new("ktls_read", e.to_string())),
                }
            },
            Tls::Handshaking { .. } | Tls::Gone => Ok(Fill::WouldBlock),
        }
    }

    /// Ends our sending side politely: close_notify (user space via rustls, kTLS via an alert
    /// record), best effort.
    pub fn send_close_notify(&mut self) {
        let fd = self.fd.as_raw_fd();
        match &mut self.tls {
            Tls::User(st) => {
                // Only after a complete flush: nothing else is queued ahead of the alert.
                if st.writer.close_notify().is_ok() {
                    if let Ok(n) = send(fd, st.writer.sealed_bytes()) {
                        st.writer.consume(n);
                    }
                }
            }
            Tls::Kernel => {
                let _ = ktls::send_close_notify(fd);
            }
            Tls::Handshaking { .. } | Tls::Gone => {}
        }
    }

    /// The rustls connection's wish to write during the handshake.
    pub fn handshake_wants_write(&self) -> bool {
        match &self.tls {
            Tls::Handshaking { conn, .. } => conn.wants_write(),
            _ => false,
        }
    }
}

/// `readv(2)` into `iov`, retrying EINTR.
fn readv(fd: RawFd, iov: &mut [io::IoSliceMut<'_>]) -> io::Result<usize> {
    loop {
        // SAFETY: `IoSliceMut` is ABI-compatible with `struct iovec`; every slice is live and
        // writable for the call, and the kernel writes at most each one's length.
        let n = unsafe { libc::readv(fd, iov.as_ptr().cast(), iov.len() as libc::c_int) };
        if n >= 0 {
            return Ok(n as usize);
        }
        let e = io::Error::last_os_error();
        if e.kind() != io::ErrorKind::Interrupted {
            return Err(e);
        }
    }
}

/// User-space mode: opens every complete record already read, in place, queueing their
/// plaintext ranges for [`Tunnel::input`]; reads more from the socket only when none is
/// complete and every opened byte was consumed (reading may move the buffer's contents).
fn soft_fill(
    st: &mut SoftTls,
    fd: RawFd,
    records: &mut Vec<&'static str>,
) -> Result<Fill, TunnelError> {
    loop {
        let mut got = 0;
        while !st.closed {
            let opened = st
                .opener
                .open_first(&mut st.raw[st.raw_pos..st.raw_len])
                .map_err(|e| TunnelError::new("tls_record", e.to_string()))?;
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
            match ktls::control_record(r.content_type, &st.raw[a..b]) {
                ControlRecord::Ignore => records.push("new_session_ticket"),
                ControlRecord::PeerClosed => {
                    records.push("close_notify");
                    st.closed = true;
                }
                ControlRecord::Retire(_) => {
                    records.push("key_update");
                    return Err(TunnelError::new(
                        "key_update",
                        "peer sent KeyUpdate; extracted keys cannot follow it",
                    ));
                }
                ControlRecord::Fatal(why) => {
                    records.push("alert");
                    return Err(TunnelError::new("tls_alert", why));
                }
            }
        }
        if got > 0 {
            return Ok(Fill::Got(got));
        }
        if !st.plain.is_empty() {
            // The caller reads more only after consuming its input; anything else would
            // spin here, so say so instead.
            return Err(TunnelError::new(
                "internal",
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
        if st.raw.len() < RAW_CHUNK + 2 * (record_layer::MAX_PLAINTEXT + 512) {
            // Allocated once, zeroed once: reads land in it without clearing.
            st.raw
                .resize(RAW_CHUNK + 2 * (record_layer::MAX_PLAINTEXT + 512), 0);
        }
        let room = &mut st.raw[st.raw_len..];
        // SAFETY: `room` is a live, initialised, writable slice.
        let n = unsafe { libc::recv(fd, room.as_mut_ptr().cast(), room.len(), libc::MSG_DONTWAIT) };
        if n > 0 {
            st.raw_len += n as usize;
            continue;
        }
        if n == 0 {
            return Err(TunnelError::new(
                "peer_closed",
                if st.raw_len > 0 {
                    "peer closed TCP inside a TLS record"
                } else {
                    "peer closed TCP without close_notify"
                },
            ));
        }
        let e = io::Error::last_os_error();
        match e.kind() {
            io::ErrorKind::WouldBlock => return Ok(Fill::WouldBlock),
            io::ErrorKind::Interrupted => continue,
            _ => return Err(TunnelError::new("read", e.to_string())),
        }
    }
}
