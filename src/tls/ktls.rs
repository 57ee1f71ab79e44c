//! kTLS for HBONE tunnels: after rustls finishes the handshake on a TCP socket, the traffic keys
//! move into the kernel (`TCP_ULP` "tls", then `TLS_TX` and `TLS_RX`), so the tunnel can splice
//! payload straight into and out of an encrypting socket. Where the kernel has no kTLS or not
//! the negotiated cipher, the tunnel keeps rustls in user space; [`offload`] says which mode a
//! socket got and why, for the tunnel to log once and count.
//!
//! Boundary: this module sets socket options and reads/writes single records' control
//! messages; it owns no socket and makes no policy. Keys come from rustls's secret extraction
//! (`dangerous_extract_secrets`), which leaves rustls unable to follow later key changes, so:
//! - the handshake must not read past its last record ([`RecordReader`] reads record by record),
//!   otherwise ciphertext meant for the kernel would be stuck in rustls's buffer;
//! - after offload, non-data records reach the tunnel as `recvmsg` control messages
//!   ([`recv_record`]) and are judged by [`control_record`]: NewSessionTicket is ignored (the
//!   tunnel configs disable resumption; ztunnel's server still sends two), close_notify is EOF, a
//!   KeyUpdate from the peer retires the tunnel (its new keys cannot be derived here);
//! - this side never rekeys either, so a tunnel retires before the AES-GCM record limit
//!   ([`RecordBudget`]), whatever the kernel's rekey support.

use std::fmt;
use std::io::{self, Read, Write};
use std::os::fd::{AsRawFd, RawFd};

use nix::errno::Errno;
use rustls::{Connection, ConnectionTrafficSecrets, ProtocolVersion};

use super::ktls_cipher;
use crate::kernel_features::ktls::{
    struct_bytes, Tls12CryptoInfoAesGcm128, Tls12CryptoInfoAesGcm256,
    Tls12CryptoInfoChacha20Poly1305, TlsCryptoInfo, TLS_1_3_VERSION, TLS_CIPHER_AES_GCM_128,
    TLS_CIPHER_AES_GCM_256, TLS_CIPHER_CHACHA20_POLY1305, TLS_RX, TLS_TX,
};
use crate::kernel_features::{KtlsCipher, KtlsSupport};

/// `TLS_SET_RECORD_TYPE` / `TLS_GET_RECORD_TYPE` cmsg types at `SOL_TLS` (linux/tls.h).
pub const TLS_SET_RECORD_TYPE: libc::c_int = 1;
pub const TLS_GET_RECORD_TYPE: libc::c_int = 2;

/// Largest plaintext in one TLS record (RFC 8446 §5.1); kTLS splits writes at this size.
pub const MAX_RECORD_PAYLOAD: usize = 16384;

/// AES-GCM's confidentiality limit in records for one key. RFC 8446 §5.5: "For AES-GCM, up to
/// 2^24.5 full-size records (about 24 million) may be encrypted on a given connection while
/// keeping a safety margin of approximately 2^-57"; rustls uses 2^24 for these suites.
pub const AES_GCM_RECORD_LIMIT: u64 = 1 << 24;

/// Records one tunnel may send before it must retire (GOAWAY, new tunnel): half the limit,
/// about 137 GB of full records. The kernel cannot re-key a socket whose keys were extracted
/// (and kernels before ~6.14 cannot re-key at all), so this holds on every kernel.
pub const TX_RECORD_BUDGET: u64 = AES_GCM_RECORD_LIMIT / 2;

/// TLS record content types (RFC 8446 §5.1).
pub const CONTENT_CHANGE_CIPHER_SPEC: u8 = 20;
pub const CONTENT_ALERT: u8 = 21;
pub const CONTENT_HANDSHAKE: u8 = 22;
pub const CONTENT_APPLICATION_DATA: u8 = 23;

/// What went wrong moving a connection into the kernel. Whose fault each is: `Caller` variants
/// are misuse by the tunnel code, `Tls` is rustls refusing, `Kernel` is the kernel refusing
/// after the probe said yes (the tunnel must close: the keys are gone from rustls).
#[derive(Debug, thiserror::Error)]
pub enum KtlsError {
    #[error("caller: handshake not complete")]
    CallerHandshakeIncomplete,
    #[error("caller: rustls still has TLS records to send; flush write_tls first")]
    CallerUnsentRecords,
    #[error("tls: secret extraction failed: {0}")]
    TlsExtract(rustls::Error),
    #[error("tls: reading buffered plaintext: {0}")]
    TlsRead(io::Error),
    #[error("kernel refused {option} after the probe accepted it: {errno}; closing the tunnel")]
    Kernel { option: &'static str, errno: Errno },
}

/// Why a tunnel runs rustls in user space.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum UserSpaceReason {
    /// The probe found no usable kTLS; its reason.
    NoKtls(String),
    /// kTLS exists but not for this cipher in both directions.
    CipherNotOffloaded {
        cipher: KtlsCipher,
        tx: bool,
        rx: bool,
    },
    /// Not a TLS 1.3 AEAD the kernel knows (HBONE configs never negotiate one).
    UnsupportedSuite(String),
    /// `TCP_ULP` "tls" failed on this socket; it is unchanged.
    UlpRefused(Errno),
}

impl UserSpaceReason {
    /// A bounded label for metrics.
    pub fn label(&self) -> &'static str {
        match self {
            UserSpaceReason::NoKtls(_) => "no_ktls",
            UserSpaceReason::CipherNotOffloaded { .. } => "cipher_not_offloaded",
            UserSpaceReason::UnsupportedSuite(_) => "unsupported_suite",
            UserSpaceReason::UlpRefused(_) => "ulp_refused",
        }
    }
}

impl fmt::Display for UserSpaceReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            UserSpaceReason::NoKtls(why) => write!(f, "kTLS unavailable: {why}"),
            UserSpaceReason::CipherNotOffloaded { cipher, tx, rx } => write!(
                f,
                "kernel has no kTLS for {cipher} (TLS_TX {}, TLS_RX {})",
                if *tx { "ok" } else { "refused" },
                if *rx { "ok" } else { "refused" }
            ),
            UserSpaceReason::UnsupportedSuite(s) => write!(f, "suite {s} has no kTLS cipher"),
            UserSpaceReason::UlpRefused(e) => write!(f, "TCP_ULP \"tls\" refused: {e}"),
        }
    }
}

/// Which TLS a tunnel runs, for the once-per-tunnel log line and the counter.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TunnelTlsMode {
    Kernel { cipher: KtlsCipher },
    UserSpace { reason: UserSpaceReason },
}

impl TunnelTlsMode {
    pub fn label(&self) -> &'static str {
        match self {
            TunnelTlsMode::Kernel { .. } => "ktls",
            TunnelTlsMode::UserSpace { .. } => "userspace",
        }
    }
}

impl fmt::Display for TunnelTlsMode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            TunnelTlsMode::Kernel { cipher } => write!(f, "kTLS ({cipher})"),
            TunnelTlsMode::UserSpace { reason } => write!(f, "user-space TLS: {reason}"),
        }
    }
}

/// The outcome of [`offload`].
pub enum Offload {
    /// Keys are in the kernel; the socket now reads and writes plaintext. `received` is
    /// application data rustls had already decrypted: the tunnel must consume it first.
    Kernel {
        cipher: KtlsCipher,
        received: Vec<u8>,
    },
    /// Keep using `conn` on the unchanged socket.
    UserSpace {
        conn: Box<Connection>,
        reason: UserSpaceReason,
    },
}

impl Offload {
    pub fn mode(&self) -> TunnelTlsMode {
        match self {
            Offload::Kernel { cipher, .. } => TunnelTlsMode::Kernel { cipher: *cipher },
            Offload::UserSpace { reason, .. } => TunnelTlsMode::UserSpace {
                reason: reason.clone(),
            },
        }
    }
}

/// Decides from the probe whether a connection with `cipher` can run in the kernel.
pub fn decide(support: &KtlsSupport, cipher: KtlsCipher) -> Result<(), UserSpaceReason> {
    if !support.tx || !support.rx {
        return Err(UserSpaceReason::NoKtls(
            support
                .reason
                .clone()
                .unwrap_or_else(|| "kTLS TX/RX unavailable".into()),
        ));
    }
    if support.offloads(cipher) {
        return Ok(());
    }
    Err(UserSpaceReason::CipherNotOffloaded {
        cipher,
        tx: support.ciphers.contains(&cipher),
        rx: support.rx_ciphers.contains(&cipher),
    })
}

/// Moves a finished TLS 1.3 connection on `sock` into the kernel when `support` allows,
/// otherwise hands it back for user-space use. The socket must be the one the handshake ran on,
/// and the handshake must have been read record by record ([`RecordReader`]).
///
/// # Errors
/// Misuse (handshake unfinished, records unsent), or the kernel refusing keys after `TCP_ULP`
/// was accepted — then the connection is gone and the tunnel must close.
pub fn offload(
    sock: &impl AsRawFd,
    mut conn: Connection,
    support: &KtlsSupport,
) -> Result<Offload, KtlsError> {
    if conn.is_handshaking() {
        return Err(KtlsError::CallerHandshakeIncomplete);
    }
    if conn.wants_write() {
        return Err(KtlsError::CallerUnsentRecords);
    }
    let user_space = |conn, reason| {
        Ok(Offload::UserSpace {
            conn: Box::new(conn),
            reason,
        })
    };
    let suite = conn.negotiated_cipher_suite();
    let cipher = match (conn.protocol_version(), suite.and_then(ktls_cipher)) {
        (Some(ProtocolVersion::TLSv1_3), Some(c)) => c,
        _ => {
            let name = suite.map_or("none".to_string(), |s| format!("{:?}", s.suite()));
            return user_space(conn, UserSpaceReason::UnsupportedSuite(name));
        }
    };
    if let Err(reason) = decide(support, cipher) {
        return user_space(conn, reason);
    }
    // The ULP can be refused per socket (e.g. not ESTABLISHED); nothing is changed then.
    if let Err(errno) = setsockopt(sock.as_raw_fd(), libc::SOL_TCP, libc::TCP_ULP, b"tls") {
        return user_space(conn, UserSpaceReason::UlpRefused(errno));
    }
    let mut received = Vec::new();
    let mut chunk = [0u8; 4096];
    loop {
        match conn.reader().read(&mut chunk) {
            Ok(0) => break,
            Ok(n) => received.extend_from_slice(&chunk[..n]),
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
            Err(e) => return Err(KtlsError::TlsRead(e)),
        }
    }
    let secrets = conn
        .dangerous_extract_secrets()
        .map_err(KtlsError::TlsExtract)?;
    let (tx_seq, tx) = secrets.tx;
    let (rx_seq, rx) = secrets.rx;
    let mut tx_info = crypto_info(&tx, tx_seq);
    let mut rx_info = crypto_info(&rx, rx_seq);
    let tx_result = setsockopt(sock.as_raw_fd(), libc::SOL_TLS, TLS_TX, &tx_info);
    let rx_result =
        tx_result.and_then(|()| setsockopt(sock.as_raw_fd(), libc::SOL_TLS, TLS_RX, &rx_info));
    wipe(&mut tx_info);
    wipe(&mut rx_info);
    tx_result.map_err(|errno| KtlsError::Kernel {
        option: "TLS_TX",
        errno,
    })?;
    rx_result.map_err(|errno| KtlsError::Kernel {
        option: "TLS_RX",
        errno,
    })?;
    Ok(Offload::Kernel { cipher, received })
}

/// Key material must not linger in freed memory longer than needed.
fn wipe(buf: &mut [u8]) {
    buf.fill(0);
    std::hint::black_box(&buf);
}

/// The kernel's `tls12_crypto_info_*` for one direction: the 12-byte TLS 1.3 IV splits into a
/// 4-byte salt and an 8-byte "iv" for AES-GCM (the kernel XORs the sequence number into the
/// last 8 bytes, as RFC 8446 §5.3 does), and is kept whole for ChaCha20-Poly1305.
pub(crate) fn crypto_info(secrets: &ConnectionTrafficSecrets, seq: u64) -> Vec<u8> {
    let rec_seq = seq.to_be_bytes();
    let split = |iv: &[u8]| -> ([u8; 4], [u8; 8]) {
        let mut salt = [0u8; 4];
        let mut rest = [0u8; 8];
        salt.copy_from_slice(&iv[..4]);
        rest.copy_from_slice(&iv[4..12]);
        (salt, rest)
    };
    match secrets {
        ConnectionTrafficSecrets::Aes128Gcm { key, iv } => {
            let (salt, iv) = split(iv.as_ref());
            let mut k = [0u8; 16];
            k.copy_from_slice(key.as_ref());
            let bytes = struct_bytes(&Tls12CryptoInfoAesGcm128 {
                info: TlsCryptoInfo {
                    version: TLS_1_3_VERSION,
                    cipher_type: TLS_CIPHER_AES_GCM_128,
                },
                iv,
                key: k,
                salt,
                rec_seq,
            });
            wipe(&mut k);
            bytes
        }
        ConnectionTrafficSecrets::Aes256Gcm { key, iv } => {
            let (salt, iv) = split(iv.as_ref());
            let mut k = [0u8; 32];
            k.copy_from_slice(key.as_ref());
            let bytes = struct_bytes(&Tls12CryptoInfoAesGcm256 {
                info: TlsCryptoInfo {
                    version: TLS_1_3_VERSION,
                    cipher_type: TLS_CIPHER_AES_GCM_256,
                },
                iv,
                key: k,
                salt,
                rec_seq,
            });
            wipe(&mut k);
            bytes
        }
        ConnectionTrafficSecrets::Chacha20Poly1305 { key, iv } => {
            let mut k = [0u8; 32];
            k.copy_from_slice(key.as_ref());
            let mut whole = [0u8; 12];
            whole.copy_from_slice(iv.as_ref());
            let bytes = struct_bytes(&Tls12CryptoInfoChacha20Poly1305 {
                info: TlsCryptoInfo {
                    version: TLS_1_3_VERSION,
                    cipher_type: TLS_CIPHER_CHACHA20_POLY1305,
                },
                iv: whole,
                key: k,
                rec_seq,
            });
            wipe(&mut k);
            bytes
        }
        // ConnectionTrafficSecrets is non-exhaustive; HBONE configs only offer the above.
        _ => Vec::new(),
    }
}

fn setsockopt(fd: RawFd, level: libc::c_int, name: libc::c_int, value: &[u8]) -> Result<(), Errno> {
    let len = libc::socklen_t::try_from(value.len()).map_err(|_| Errno::EINVAL)?;
    // SAFETY: `value` is a live, initialised buffer of `len` bytes for the whole call and the
    // kernel only reads it; a bad fd or option gives an errno, not undefined behaviour.
    let rc = unsafe { libc::setsockopt(fd, level, name, value.as_ptr().cast(), len) };
    if rc == 0 {
        Ok(())
    } else {
        Err(Errno::last())
    }
}

/// Counts records a tunnel sends under one key and says when to retire it.
#[derive(Debug, Clone, Copy)]
pub struct RecordBudget {
    sent: u64,
    limit: u64,
}

impl Default for RecordBudget {
    fn default() -> Self {
        Self::new(TX_RECORD_BUDGET)
    }
}

impl RecordBudget {
    pub fn new(limit: u64) -> Self {
        Self { sent: 0, limit }
    }

    /// Charges one send of `bytes` plaintext: kTLS makes at least one record per send (more
    /// with MSG_MORE coalescing only ever means fewer), at most 16 KiB each. Counting this way
    /// overestimates, which is the safe side.
    pub fn charge_send(&mut self, bytes: usize) {
        let records = bytes.div_ceil(MAX_RECORD_PAYLOAD).max(1) as u64;
        self.sent = self.sent.saturating_add(records);
    }

    /// Charges records counted exactly (the user-space record layer seals them itself).
    pub fn charge_records(&mut self, records: u64) {
        self.sent = self.sent.saturating_add(records);
    }

    pub fn records_sent(&self) -> u64 {
        self.sent
    }

    /// True once the tunnel should stop taking new streams and close after draining.
    pub fn should_retire(&self) -> bool {
        self.sent >= self.limit
    }
}

/// Reads a TLS stream without crossing a record boundary: each `read` returns bytes of at most
/// one record (header and body in separate reads). Give it to `read_tls` during the handshake so
/// that the first record after the handshake stays in the socket for the kernel.
pub struct RecordReader<R> {
    inner: R,
    header: [u8; 5],
    header_len: usize,
    body_left: usize,
}

impl<R: Read> RecordReader<R> {
    pub fn new(inner: R) -> Self {
        Self {
            inner,
            header: [0; 5],
            header_len: 0,
            body_left: 0,
        }
    }

    pub fn into_inner(self) -> R {
        self.inner
    }

    /// True between records (nothing of a record has been read and not finished).
    pub fn at_boundary(&self) -> bool {
        self.header_len == 0 && self.body_left == 0
    }
}

impl<R: Read> Read for RecordReader<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        if buf.is_empty() {
            return Ok(0);
        }
        if self.body_left > 0 {
            let want = self.body_left.min(buf.len());
            let n = self.inner.read(&mut buf[..want])?;
            self.body_left -= n;
            return Ok(n);
        }
        let want = (5 - self.header_len).min(buf.len());
        let n = self.inner.read(&mut buf[..want])?;
        self.header[self.header_len..self.header_len + n].copy_from_slice(&buf[..n]);
        self.header_len += n;
        if self.header_len == 5 {
            self.body_left = usize::from(u16::from_be_bytes([self.header[3], self.header[4]]));
            self.header_len = 0;
        }
        Ok(n)
    }
}

/// Drives a handshake on a stream, reading record by record; returns once the handshake is done
/// and everything rustls queued is written. Works on blocking sockets; on non-blocking ones it
/// returns `WouldBlock` and may be called again with the same reader.
pub fn complete_handshake<S: Read + Write>(
    conn: &mut Connection,
    reader: &mut RecordReader<S>,
) -> io::Result<()> {
    loop {
        while conn.wants_write() {
            conn.write_tls(&mut WriteHalf(&mut reader.inner))?;
        }
        if !conn.is_handshaking() {
            return Ok(());
        }
        if conn.read_tls(reader)? == 0 {
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                "peer closed during the TLS handshake",
            ));
        }
        if let Err(e) = conn.process_new_packets() {
            // Send the alert rustls queued for the peer, then report.
            while conn.wants_write() {
                if conn.write_tls(&mut WriteHalf(&mut reader.inner)).is_err() {
                    break;
                }
            }
            return Err(io::Error::new(io::ErrorKind::InvalidData, e));
        }
    }
}

struct WriteHalf<'a, S>(&'a mut S);

impl<S: Write> Write for WriteHalf<'_, S> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.0.write(buf)
    }
    fn flush(&mut self) -> io::Result<()> {
        self.0.flush()
    }
}

/// One `recvmsg` on a kTLS socket: how many bytes, and the record type they came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Received {
    pub len: usize,
    pub record_type: u8,
}

/// CMSG_SPACE(1), as a buffer aligned for `cmsghdr`.
#[repr(C, align(8))]
struct ControlBuf([u8; 32]);

/// Receives on a kTLS socket with a control buffer, so non-data records come back as data with
/// their content type instead of failing with EIO. The kernel never mixes record types in one
/// call. On a socket without kTLS there is no control message and the type is application data.
pub fn recv_record(fd: RawFd, buf: &mut [u8], flags: libc::c_int) -> io::Result<Received> {
    let mut control = ControlBuf([0; 32]);
    let mut iov = libc::iovec {
        iov_base: buf.as_mut_ptr().cast(),
        iov_len: buf.len(),
    };
    // SAFETY: an all-zero msghdr is a valid "no name, no iov, no control" header.
    let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
    msg.msg_iov = &mut iov;
    msg.msg_iovlen = 1;
    msg.msg_control = control.0.as_mut_ptr().cast();
    msg.msg_controllen = control.0.len() as _;
    // SAFETY: `msg` points at `iov` (which covers `buf`) and `control`, all live and writable
    // for the whole call; the kernel writes at most their lengths.
    let n = unsafe { libc::recvmsg(fd, &mut msg, flags) };
    if n < 0 {
        return Err(io::Error::last_os_error());
    }
    let control_len = (msg.msg_controllen as usize).min(control.0.len());
    let record_type =
        parse_record_type(&control.0[..control_len]).unwrap_or(CONTENT_APPLICATION_DATA);
    Ok(Received {
        len: n as usize,
        record_type,
    })
}

/// Finds the `SOL_TLS`/`TLS_GET_RECORD_TYPE` control message in a `recvmsg` control buffer and
/// returns its one-byte record type. Walks the buffer as `CMSG_NXTHDR` does, without pointers.
pub fn parse_record_type(control: &[u8]) -> Option<u8> {
    // struct cmsghdr { size_t cmsg_len; int cmsg_level; int cmsg_type; } then data, each
    // header and data start aligned to size_t.
    const W: usize = std::mem::size_of::<usize>();
    const HDR: usize = std::mem::size_of::<libc::cmsghdr>();
    let align = |len: usize| len.div_ceil(W) * W;
    let mut offset = 0;
    while offset + HDR <= control.len() {
        let at = &control[offset..];
        let len = usize::from_ne_bytes(at[..W].try_into().ok()?);
        let level = i32::from_ne_bytes(at[W..W + 4].try_into().ok()?);
        let kind = i32::from_ne_bytes(at[W + 4..W + 8].try_into().ok()?);
        if len < HDR || offset + len > control.len() {
            return None;
        }
        if level == libc::SOL_TLS && kind == TLS_GET_RECORD_TYPE && len > HDR {
            return Some(control[offset + align(HDR)]);
        }
        offset += align(len);
    }
    None
}

/// What the tunnel does with a non-application-data record read from a kTLS socket.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ControlRecord {
    /// NewSessionTicket: resumption is off; drop it.
    Ignore,
    /// close_notify: the peer finished sending (EOF for the tunnel).
    PeerClosed,
    /// KeyUpdate: the peer changed its keys, which extracted secrets cannot follow. Stop using
    /// the tunnel for new streams and close it.
    Retire(&'static str),
    /// A fatal alert or a record that has no business here: close the tunnel.
    Fatal(String),
}

/// Judges one non-data record (`record_type` from [`recv_record`], `payload` its plaintext).
pub fn control_record(record_type: u8, payload: &[u8]) -> ControlRecord {
    match record_type {
        CONTENT_ALERT => match payload {
            [_, 0] => ControlRecord::PeerClosed,
            [level, description] => {
                ControlRecord::Fatal(format!("peer sent alert {description} (level {level})"))
            }
            _ => ControlRecord::Fatal(format!("malformed alert record ({} bytes)", payload.len())),
        },
        CONTENT_HANDSHAKE => {
            // RFC 8446 §4: msg_type (1), length (3), body; one record may carry several.
            let mut rest = payload;
            let mut retire = false;
            while !rest.is_empty() {
                let [kind, a, b, c, ref tail @ ..] = *rest else {
                    return ControlRecord::Fatal("truncated handshake message".into());
                };
                let len = usize::from(a) << 16 | usize::from(b) << 8 | usize::from(c);
                if tail.len() < len {
                    return ControlRecord::Fatal("truncated handshake message".into());
                }
                match kind {
                    4 => {}
                    24 => retire = true,
                    other => {
                        return ControlRecord::Fatal(format!(
                            "unexpected post-handshake message type {other}"
                        ))
                    }
                }
                rest = &tail[len..];
            }
            if retire {
                ControlRecord::Retire("peer sent KeyUpdate; kTLS keys cannot follow")
            } else {
                ControlRecord::Ignore
            }
        }
        other => ControlRecord::Fatal(format!("unexpected TLS record type {other}")),
    }
}

/// Sends a close_notify alert on a kTLS socket (an alert record via `TLS_SET_RECORD_TYPE`).
pub fn send_close_notify(fd: RawFd) -> io::Result<()> {
    let mut payload = [1u8, 0u8]; // warning, close_notify
    let mut control = ControlBuf([0; 32]);
    let mut iov = libc::iovec {
        iov_base: payload.as_mut_ptr().cast(),
        iov_len: payload.len(),
    };
    // SAFETY: an all-zero msghdr is a valid empty header.
    let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
    msg.msg_iov = &mut iov;
    msg.msg_iovlen = 1;
    msg.msg_control = control.0.as_mut_ptr().cast();
    // SAFETY: CMSG_SPACE only computes a size.
    msg.msg_controllen = unsafe { libc::CMSG_SPACE(1) } as _;
    // SAFETY: msg_control points at `control`, which is aligned for cmsghdr and at least
    // CMSG_SPACE(1) bytes, so the first header and its one data byte lie inside it.
    unsafe {
        let cmsg = libc::CMSG_FIRSTHDR(&msg);
        (*cmsg).cmsg_level = libc::SOL_TLS;
        (*cmsg).cmsg_type = TLS_SET_RECORD_TYPE;
        (*cmsg).cmsg_len = libc::CMSG_LEN(1) as _;
        *libc::CMSG_DATA(cmsg) = CONTENT_ALERT;
    }
    // SAFETY: every pointer in `msg` refers to live buffers of the stated lengths.
    let n = unsafe { libc::sendmsg(fd, &msg, 0) };
    if n < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

#[cfg(test)]
pub(crate) mod tests {
    use std::net::{TcpListener, TcpStream};
    use std::thread;

    use rustls::{ClientConnection, ServerConnection};
    use sha2::{Digest, Sha256};

    use super::*;
    use crate::kernel_features::{ktls_support, Rekey};
    use crate::tls::fixtures::*;
    use crate::tls::{negotiated, server_name};

    fn support(tx: &[KtlsCipher], rx: &[KtlsCipher], reason: Option<&str>) -> KtlsSupport {
        KtlsSupport {
            tx: !tx.is_empty(),
            rx: !rx.is_empty(),
            ciphers: tx.to_vec(),
            rx_ciphers: rx.to_vec(),
            rekey: Rekey::Unsupported,
            reason: reason.map(str::to_string),
        }
    }

    #[test]
    fn decision_names_the_reason_for_user_space() {
        let none = support(&[], &[], Some("kernel has no kTLS (CONFIG_TLS off)"));
        let err = decide(&none, KtlsCipher::Aes128Gcm).expect_err("no kTLS");
        assert_eq!(
            err.to_string(),
            "kTLS unavailable: kernel has no kTLS (CONFIG_TLS off)"
        );
        assert_eq!(err.label(), "no_ktls");
        let tx_only_256 = support(
            &[KtlsCipher::Aes128Gcm, KtlsCipher::Aes256Gcm],
            &[KtlsCipher::Aes128Gcm],
            None,
        );
        assert_eq!(decide(&tx_only_256, KtlsCipher::Aes128Gcm), Ok(()));
        let err = decide(&tx_only_256, KtlsCipher::Aes256Gcm).expect_err("no RX");
        assert_eq!(
            err.to_string(),
            "kernel has no kTLS for aes_256_gcm (TLS_TX ok, TLS_RX refused)"
        );
    }

    #[test]
    fn record_budget_retires_well_before_the_aes_gcm_limit() {
        const { assert!(TX_RECORD_BUDGET <= AES_GCM_RECORD_LIMIT / 2) };
        let mut b = RecordBudget::new(10);
        b.charge_send(0);
        b.charge_send(1);
        b.charge_send(MAX_RECORD_PAYLOAD);
        assert_eq!(b.records_sent(), 3);
        b.charge_send(MAX_RECORD_PAYLOAD + 1);
        assert_eq!(b.records_sent(), 5);
        assert!(!b.should_retire());
        b.charge_send(5 * MAX_RECORD_PAYLOAD);
        assert!(b.should_retire());
        // A 64 KiB frame every time: the default budget lasts about 2^21 frames (137 GB).
        let mut d = RecordBudget::default();
        for _ in 0..(TX_RECORD_BUDGET / 4 - 1) {
            d.charge_send(4 * MAX_RECORD_PAYLOAD);
        }
        assert!(!d.should_retire());
        d.charge_send(4 * MAX_RECORD_PAYLOAD);
        assert!(d.should_retire());
    }

    #[test]
    fn record_type_is_read_from_a_constructed_cmsg_buffer() {
        // Two control messages, as recvmsg could return them: an unrelated one first.
        let mut buf = ControlBuf([0; 32]);
        let mut big = [0u64; 8];
        // SAFETY: CMSG_* only compute sizes; the msghdr points at `big`, which is aligned for
        // cmsghdr and large enough for both headers written below.
        unsafe {
            let mut msg: libc::msghdr = std::mem::zeroed();
            msg.msg_control = big.as_mut_ptr().cast();
            msg.msg_controllen = std::mem::size_of_val(&big) as _;
            let first = libc::CMSG_FIRSTHDR(&msg);
            (*first).cmsg_level = libc::SOL_SOCKET;
            (*first).cmsg_type = libc::SCM_RIGHTS;
            (*first).cmsg_len = libc::CMSG_LEN(4) as _;
            let second = libc::CMSG_NXTHDR(&msg, first);
            (*second).cmsg_level = libc::SOL_TLS;
            (*second).cmsg_type = TLS_GET_RECORD_TYPE;
            (*second).cmsg_len = libc::CMSG_LEN(1) as _;
            *libc::CMSG_DATA(second) = CONTENT_HANDSHAKE;
            let used = libc::CMSG_SPACE(4) as usize + libc::CMSG_SPACE(1) as usize;
            let bytes = std::slice::from_raw_parts(big.as_ptr().cast::<u8>(), used);
            assert_eq!(parse_record_type(bytes), Some(CONTENT_HANDSHAKE));
            // Only the unrelated message: no record type.
            let only_first =
                std::slice::from_raw_parts(big.as_ptr().cast::<u8>(), libc::CMSG_SPACE(4) as usize);
            assert_eq!(parse_record_type(only_first), None);
            // The one-message buffer the receive path uses.
            let one = libc::CMSG_SPACE(1) as usize;
            std::ptr::copy_nonoverlapping(
                (second as *const libc::cmsghdr).cast::<u8>(),
                buf.0.as_mut_ptr(),
                one,
            );
            assert_eq!(parse_record_type(&buf.0[..one]), Some(CONTENT_HANDSHAKE));
        }
        assert_eq!(parse_record_type(&[]), None);
        // A header whose length runs past the buffer is refused, not read past.
        let mut bad = buf.0;
        bad[..8].copy_from_slice(&1000usize.to_ne_bytes());
        assert_eq!(parse_record_type(&bad), None);
    }

    #[test]
    fn control_records_map_to_tunnel_actions() {
        assert_eq!(
            control_record(CONTENT_ALERT, &[1, 0]),
            ControlRecord::PeerClosed
        );
        assert!(matches!(
            control_record(CONTENT_ALERT, &[2, 40]),
            ControlRecord::Fatal(s) if s == "peer sent alert 40 (level 2)"
        ));
        // Two NewSessionTickets in one record, as ztunnel's server may send them.
        let nst = [4u8, 0, 0, 2, 0xaa, 0xbb];
        let two: Vec<u8> = nst.iter().chain(nst.iter()).copied().collect();
        assert_eq!(
            control_record(CONTENT_HANDSHAKE, &two),
            ControlRecord::Ignore
        );
        assert!(matches!(
            control_record(CONTENT_HANDSHAKE, &[24, 0, 0, 1, 0]),
            ControlRecord::Retire(_)
        ));
        assert!(matches!(
            control_record(CONTENT_HANDSHAKE, &[4, 0, 0, 9, 1]),
            ControlRecord::Fatal(s) if s.contains("truncated")
        ));
        assert!(matches!(
            control_record(CONTENT_HANDSHAKE, &[1, 0, 0, 0]),
            ControlRecord::Fatal(_)
        ));
        assert!(matches!(
            control_record(CONTENT_CHANGE_CIPHER_SPEC, &[1]),
            ControlRecord::Fatal(_)
        ));
    }

    #[test]
    fn record_reader_never_reads_past_a_record() {
        let mut stream = Vec::new();
        stream.extend_from_slice(&[22, 3, 3, 0, 3, b'a', b'b', b'c']);
        stream.extend_from_slice(&[23, 3, 3, 0, 2, b'x', b'y']);
        let mut r = RecordReader::new(&stream[..]);
        let mut buf = [0u8; 64];
        let mut pieces = Vec::new();
        loop {
            let n = r.read(&mut buf).expect("read");
            if n == 0 {
                break;
            }
            pieces.push(buf[..n].to_vec());
        }
        assert_eq!(
            pieces,
            vec![
                vec![22, 3, 3, 0, 3],
                b"abc".to_vec(),
                vec![23, 3, 3, 0, 2],
                b"xy".to_vec()
            ]
        );
        assert!(r.at_boundary());
    }

    /// Client and server connections after a real loopback handshake, plus their sockets.
    pub(crate) fn loopback_handshake() -> ((Connection, TcpStream), (Connection, TcpStream)) {
        let pki = Pki::new("cluster.local");
        let (cc, sc) = configs(&pki, &pki.creds(CLIENT), &pki.creds(SERVER), SERVER);
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
        let addr = listener.local_addr().expect("addr");
        let server = thread::spawn(move || {
            let (sock, _) = listener.accept().expect("accept");
            let mut conn = Connection::from(ServerConnection::new(sc).expect("server conn"));
            let mut reader = RecordReader::new(sock);
            complete_handshake(&mut conn, &mut reader).expect("server handshake");
            assert!(reader.at_boundary());
            (conn, reader.into_inner())
        });
        let sock = TcpStream::connect(addr).expect("connect");
        let mut conn = Connection::from(
            ClientConnection::new(cc, server_name(addr.ip())).expect("client conn"),
        );
        let mut reader = RecordReader::new(sock);
        complete_handshake(&mut conn, &mut reader).expect("client handshake");
        let client = (conn, reader.into_inner());
        let server = server.join().expect("server thread");
        (client, server)
    }

    #[test]
    fn crypto_info_of_one_side_tx_equals_the_other_side_rx() {
        let ((c, _cs), (s, _ss)) = loopback_handshake();
        let cipher = negotiated(&c).expect("negotiated").cipher;
        let cs = c.dangerous_extract_secrets().expect("client secrets");
        let ss = s.dangerous_extract_secrets().expect("server secrets");
        let c_tx = crypto_info(&cs.tx.1, cs.tx.0);
        let s_rx = crypto_info(&ss.rx.1, ss.rx.0);
        assert_eq!(c_tx, s_rx);
        assert_eq!(
            crypto_info(&ss.tx.1, ss.tx.0),
            crypto_info(&cs.rx.1, cs.rx.0)
        );
        let (len, cipher_type) = match cipher {
            KtlsCipher::Aes128Gcm => (40, TLS_CIPHER_AES_GCM_128),
            KtlsCipher::Aes256Gcm => (56, TLS_CIPHER_AES_GCM_256),
            KtlsCipher::Chacha20Poly1305 => panic!("HBONE never negotiates ChaCha20"),
        };
        assert_eq!(c_tx.len(), len);
        assert_eq!(&c_tx[..2], &TLS_1_3_VERSION.to_ne_bytes());
        assert_eq!(&c_tx[2..4], &cipher_type.to_ne_bytes());
        // No record was sent after the handshake: sequence numbers start at zero.
        assert_eq!(cs.tx.0, 0);
        assert_eq!(&c_tx[len - 8..], &[0; 8]);
        // The 12-byte IV is salt (4, after the key) + iv (8, right after the header).
        let iv = match &cs.tx.1 {
            ConnectionTrafficSecrets::Aes128Gcm { iv, .. }
            | ConnectionTrafficSecrets::Aes256Gcm { iv, .. } => iv.as_ref().to_vec(),
            _ => panic!("AES-GCM expected"),
        };
        assert_eq!(&c_tx[4..12], &iv[4..]);
        assert_eq!(&c_tx[len - 12..len - 8], &iv[..4]);
    }

    #[test]
    fn without_ktls_the_tunnel_keeps_user_space_tls_and_it_works() {
        let ((c, mut cs), (s, mut ss)) = loopback_handshake();
        let none = support(&[], &[], Some("kernel has no kTLS"));
        let Offload::UserSpace {
            conn: mut c,
            reason,
        } = offload(&cs, c, &none).expect("offload")
        else {
            panic!("no kTLS must mean user space")
        };
        assert_eq!(reason, UserSpaceReason::NoKtls("kernel has no kTLS".into()));
        let Offload::UserSpace { conn: mut s, .. } = offload(&ss, s, &none).expect("offload")
        else {
            panic!("no kTLS must mean user space")
        };
        // The socket was not touched: rustls still carries data over it.
        c.writer().write_all(b"hello").expect("write");
        while c.wants_write() {
            c.write_tls(&mut cs).expect("write_tls");
        }
        let mut got = Vec::new();
        while got.len() < 5 {
            s.read_tls(&mut ss).expect("read_tls");
            s.process_new_packets().expect("process");
            let mut buf = [0u8; 16];
            match s.reader().read(&mut buf) {
                Ok(n) => got.extend_from_slice(&buf[..n]),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                Err(e) => panic!("{e}"),
            }
        }
        assert_eq!(got, b"hello");
    }

    fn pattern(len: usize, seed: u8) -> Vec<u8> {
        let mut x = u32::from(seed) | 1;
        (0..len)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 17;
                x ^= x << 5;
                x as u8
            })
            .collect()
    }

    /// Reads `len` application bytes from a kTLS socket with `recv_record`, hashing them.
    fn read_all(sock: &TcpStream, len: usize) -> [u8; 32] {
        let mut hash = Sha256::new();
        let mut left = len;
        let mut buf = vec![0u8; 65536];
        while left > 0 {
            let r = recv_record(sock.as_raw_fd(), &mut buf, 0).expect("recvmsg");
            assert!(r.len > 0, "EOF with {left} bytes missing");
            if r.record_type == CONTENT_APPLICATION_DATA {
                hash.update(&buf[..r.len]);
                left -= r.len;
            } else {
                assert_eq!(
                    control_record(r.record_type, &buf[..r.len]),
                    ControlRecord::Ignore
                );
            }
        }
        hash.finalize().into()
    }

    #[test]
    fn ktls_loopback_moves_a_mebibyte_each_way() {
        let support = ktls_support();
        if !(support.tx && support.rx) {
            println!(
                "SKIPPED (no kTLS: {})",
                support.reason.as_deref().unwrap_or("TX/RX unavailable")
            );
            return;
        }
        const LEN: usize = 1 << 20;
        let ((c, cs), (s, ss)) = loopback_handshake();
        let client_cipher = negotiated(&c).expect("negotiated").cipher;
        let mut sides = Vec::new();
        for (conn, sock) in [(c, cs), (s, ss)] {
            match offload(&sock, conn, &support).expect("offload") {
                Offload::Kernel { cipher, received } => {
                    assert_eq!(cipher, client_cipher);
                    assert!(received.is_empty());
                }
                Offload::UserSpace { reason, .. } => {
                    if matches!(reason, UserSpaceReason::CipherNotOffloaded { .. }) {
                        println!("SKIPPED (no kTLS: {reason})");
                        return;
                    }
                    panic!("kTLS available but not used: {reason}");
                }
            }
            sides.push((sock, ()));
        }
        let data = [pattern(LEN, 1), pattern(LEN, 2)];
        let expect: Vec<[u8; 32]> = data.iter().map(|d| Sha256::digest(d).into()).collect();
        let mut writers = Vec::new();
        for ((sock, _), payload) in sides.iter().zip(data) {
            let mut w = sock.try_clone().expect("clone");
            writers.push(thread::spawn(move || {
                // Uneven writes: records of every size, not only full ones.
                for chunk in payload.chunks(50_000) {
                    w.write_all(chunk).expect("kTLS write");
                }
                send_close_notify(w.as_raw_fd()).expect("close_notify");
            }));
        }
        let got_at_server = read_all(&sides[1].0, LEN);
        let got_at_client = read_all(&sides[0].0, LEN);
        for w in writers {
            w.join().expect("writer");
        }
        assert_eq!(got_at_server, expect[0], "client → server bytes differ");
        assert_eq!(got_at_client, expect[1], "server → client bytes differ");
        // After the data, each side sees the other's close_notify as an alert record.
        let mut buf = [0u8; 16];
        for (sock, _) in &sides {
            let r = recv_record(sock.as_raw_fd(), &mut buf, 0).expect("recvmsg");
            assert_eq!(r.record_type, CONTENT_ALERT);
            assert_eq!(
                control_record(r.record_type, &buf[..r.len]),
                ControlRecord::PeerClosed
            );
        }
    }
}
