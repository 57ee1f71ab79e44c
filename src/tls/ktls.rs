//! kTLS for HBONE tunnels: after the handshake ([`super::handshake`]) hands over the traffic
//! secrets, they move into the kernel (`TCP_ULP` "tls", then `TLS_TX` and `TLS_RX`), so the
//! tunnel can splice payload straight into and out of an encrypting socket. Where the kernel has
//! no kTLS or not the negotiated cipher, the tunnel runs the user-space record layer with the
//! same secrets; [`offload`] says which mode a socket got and why, for the tunnel to log and
//! count.
//!
//! Boundary: this module sets socket options and reads/writes single records' control
//! messages; it owns no socket and makes no policy. After offload, non-data records reach the
//! tunnel as `recvmsg` control messages ([`recv_record`]) and are judged by [`control_record`]:
//! NewSessionTicket is ignored (the tunnel configs disable resumption; ztunnel's server still
//! sends two), close_notify is EOF, a KeyUpdate is the peer's new key. Kernels from 6.14 take a
//! second key on a live socket ([`install_next_key`]; `ringtun probe` tries it): there a
//! tunnel follows its peer's KeyUpdate and updates its own key at the record budget
//! ([`record_limit`], [`RecordBudget`]); on older kernels a peer's KeyUpdate ends the tunnel
//! and a tunnel retires at the budget (`tunnel::transport` decides).

use std::fmt;
use std::io;
use std::os::fd::RawFd;

use crate::sys::Errno;

pub use crate::sys::tls::{parse_record_type, recv_record, Received};
use crate::sys::tls::{set_crypto_info, set_ulp_tls};
use rustls::{ConnectionTrafficSecrets, ExtractedSecrets, SupportedCipherSuite};

use super::Negotiated;
use crate::kernel_features::ktls::{
    struct_bytes, Tls12CryptoInfoAesGcm128, Tls12CryptoInfoAesGcm256,
    Tls12CryptoInfoChacha20Poly1305, TlsCryptoInfo, TLS_1_3_VERSION, TLS_CIPHER_AES_GCM_128,
    TLS_CIPHER_AES_GCM_256, TLS_CIPHER_CHACHA20_POLY1305, TLS_RX, TLS_TX,
};
use crate::kernel_features::{KtlsCipher, KtlsSupport};

/// Largest plaintext in one TLS record (RFC 8446 §5.1); kTLS splits writes at this size.
pub const MAX_RECORD_PAYLOAD: usize = 16384;

/// AES-GCM's confidentiality limit in records for one key. RFC 8446 §5.5: "For AES-GCM, up to
/// 2^24.5 full-size records (about 24 million) may be encrypted on a given connection while
/// keeping a safety margin of approximately 2^-57"; rustls uses 2^24 for these suites.
pub const AES_GCM_RECORD_LIMIT: u64 = 1 << 24;

/// Records one tunnel may send under one key before it updates the key (where both ends can
/// follow a KeyUpdate) or retires (GOAWAY, new tunnel): half the limit, about 137 GB of full
/// records.
pub const TX_RECORD_BUDGET: u64 = AES_GCM_RECORD_LIMIT / 2;

/// TLS record content types (RFC 8446 §5.1).
pub const CONTENT_CHANGE_CIPHER_SPEC: u8 = 20;
pub const CONTENT_ALERT: u8 = 21;
pub const CONTENT_HANDSHAKE: u8 = 22;
pub const CONTENT_APPLICATION_DATA: u8 = 23;

/// The kernel refused keys after accepting the TLS ULP: the socket is half configured and the
/// tunnel must close.
#[derive(Debug, thiserror::Error)]
pub enum KtlsError {
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

/// Moves a finished handshake's secrets into the kernel on `sock` when `support` offloads the
/// negotiated cipher both ways; otherwise leaves the socket untouched and says why (the caller
/// then keys the user-space record layer with the same secrets).
///
/// # Errors
/// The kernel refusing keys after `TCP_ULP` was accepted: the socket is unusable.
pub fn offload(
    sock: RawFd,
    negotiated: &Negotiated,
    secrets: &ExtractedSecrets,
    support: &KtlsSupport,
) -> Result<TunnelTlsMode, KtlsError> {
    let cipher = negotiated.cipher;
    if let Err(reason) = decide(support, cipher) {
        return Ok(TunnelTlsMode::UserSpace { reason });
    }
    // The ULP can be refused per socket (e.g. not ESTABLISHED); nothing is changed then.
    if let Err(errno) = set_ulp_tls(sock) {
        return Ok(TunnelTlsMode::UserSpace {
            reason: UserSpaceReason::UlpRefused(errno),
        });
    }
    let (tx_seq, tx) = &secrets.tx;
    let (rx_seq, rx) = &secrets.rx;
    let mut tx_info = crypto_info(tx, *tx_seq);
    let mut rx_info = crypto_info(rx, *rx_seq);
    let tx_result = set_crypto_info(sock, TLS_TX, &tx_info);
    let rx_result = tx_result.and_then(|()| set_crypto_info(sock, TLS_RX, &rx_info));
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
    Ok(TunnelTlsMode::Kernel { cipher })
}

/// Records a tunnel may send before it retires: the configured budget, never more than half
/// the negotiated suite's confidentiality limit (RFC 8446 §5.5; rustls states it per suite:
/// 2^24 records for AES-GCM, unlimited for ChaCha20-Poly1305).
pub fn record_limit(suite: SupportedCipherSuite, configured: u64) -> u64 {
    let limit = suite
        .tls13()
        .map_or(AES_GCM_RECORD_LIMIT, |s| s.common.confidentiality_limit);
    configured.min(limit / 2)
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

    /// True once the records under the current key reached the limit: the tunnel updates its
    /// key, or, where it cannot, stops taking new streams and closes after draining.
    pub fn should_retire(&self) -> bool {
        self.sent >= self.limit
    }

    /// A new send key: the count starts again.
    pub fn rekeyed(&mut self) {
        self.sent = 0;
    }
}

/// What the tunnel does with a non-application-data record read from a kTLS socket.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ControlRecord {
    /// NewSessionTicket: resumption is off; drop it.
    Ignore,
    /// close_notify: the peer finished sending (EOF for the tunnel).
    PeerClosed,
    /// KeyUpdate (RFC 8446 §4.6.3): every later record of the peer is sealed with its next
    /// key; `update_requested` asks us to update ours too.
    KeyUpdate { update_requested: bool },
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
            let mut key_update = None;
            while !rest.is_empty() {
                let [kind, a, b, c, ref tail @ ..] = *rest else {
                    return ControlRecord::Fatal("truncated handshake message".into());
                };
                let len = usize::from(a) << 16 | usize::from(b) << 8 | usize::from(c);
                if tail.len() < len {
                    return ControlRecord::Fatal("truncated handshake message".into());
                }
                //= rfc8446#section-5.1
                //# Handshake messages MUST NOT span key changes.  Implementations
                //# MUST verify that all messages immediately preceding a key change
                //# align with a record boundary
                if key_update.is_some() {
                    return ControlRecord::Fatal(
                        "a message follows KeyUpdate in its record".into(),
                    );
                }
                match (kind, &tail[..len]) {
                    (4, _) => {}
                    //= rfc8446#section-4.6.3
                    //# If an implementation receives any other value [than 0 or 1],
                    //# it MUST terminate the connection with an "illegal_parameter" alert.
                    (24, [requested @ (0 | 1)]) => key_update = Some(*requested == 1),
                    (24, _) => return ControlRecord::Fatal("malformed KeyUpdate".into()),
                    (other, _) => {
                        return ControlRecord::Fatal(format!(
                            "unexpected post-handshake message type {other}"
                        ))
                    }
                }
                rest = &tail[len..];
            }
            match key_update {
                Some(update_requested) => ControlRecord::KeyUpdate { update_requested },
                None => ControlRecord::Ignore,
            }
        }
        other => ControlRecord::Fatal(format!("unexpected TLS record type {other}")),
    }
}

/// RFC 8446 §4.6.3: the KeyUpdate handshake message (type 24, length 1).
pub fn key_update_message(update_requested: bool) -> [u8; 5] {
    [24, 0, 0, 1, u8::from(update_requested)]
}

/// Sends our KeyUpdate on a kTLS socket, as a handshake record under the current key; the
/// kernel first closes any record it holds open. Then [`install_next_key`] for `TLS_TX`.
pub fn send_key_update(fd: RawFd, update_requested: bool) -> io::Result<()> {
    let message = key_update_message(update_requested);
    let n = crate::sys::tls::send_record(fd, CONTENT_HANDSHAKE, &message)?;
    if n != message.len() {
        // One record either way: a part of it would end the tunnel at the peer anyway.
        return Err(io::Error::new(
            io::ErrorKind::WriteZero,
            format!("KeyUpdate record: {n} of {} bytes written", message.len()),
        ));
    }
    Ok(())
}

/// Which way a key goes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KeyDirection {
    Send,
    Receive,
}

/// Installs the next key of one direction on a live kTLS socket (TLS 1.3 KeyUpdate; kernels
/// 6.14+, EBUSY before). A new key starts at record sequence 0.
pub fn install_next_key(
    sock: RawFd,
    direction: KeyDirection,
    secrets: &ConnectionTrafficSecrets,
) -> Result<(), KtlsError> {
    let (option, name) = match direction {
        KeyDirection::Send => (TLS_TX, "TLS_TX"),
        KeyDirection::Receive => (TLS_RX, "TLS_RX"),
    };
    let mut info = crypto_info(secrets, 0);
    let result = set_crypto_info(sock, option, &info);
    wipe(&mut info);
    result.map_err(|errno| KtlsError::Kernel {
        option: name,
        errno,
    })
}

/// Sends a close_notify alert on a kTLS socket (an alert record, warning level).
pub fn send_close_notify(fd: RawFd) -> io::Result<()> {
    crate::sys::tls::send_record(fd, CONTENT_ALERT, &[1, 0]).map(drop)
}

#[cfg(test)]
pub(crate) mod tests {
    use std::io::{Read, Write};
    use std::net::TcpStream;
    use std::os::fd::AsRawFd;
    use std::thread;

    use sha2::{Digest, Sha256};

    use super::*;
    use crate::kernel_features::{ktls_support, Rekey};
    use crate::tls::fixtures::handshake_pair;
    use crate::tls::fixtures::*;
    use crate::tls::handshake::Established;

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
        assert_eq!(
            control_record(CONTENT_HANDSHAKE, &[24, 0, 0, 1, 0]),
            ControlRecord::KeyUpdate {
                update_requested: false
            }
        );
        assert_eq!(
            control_record(CONTENT_HANDSHAKE, &[24, 0, 0, 1, 1]),
            ControlRecord::KeyUpdate {
                update_requested: true
            }
        );
        // A NewSessionTicket before it is fine; anything after it, or a bad value, is not.
        assert_eq!(
            control_record(CONTENT_HANDSHAKE, &[4, 0, 0, 1, 7, 24, 0, 0, 1, 1]),
            ControlRecord::KeyUpdate {
                update_requested: true
            }
        );
        assert!(matches!(
            control_record(CONTENT_HANDSHAKE, &[24, 0, 0, 1, 0, 4, 0, 0, 0]),
            ControlRecord::Fatal(s) if s.contains("follows KeyUpdate")
        ));
        for bad in [
            &[24u8, 0, 0, 1, 2][..],
            &[24, 0, 0, 2, 0, 0],
            &[24, 0, 0, 0],
        ] {
            assert!(matches!(
                control_record(CONTENT_HANDSHAKE, bad),
                ControlRecord::Fatal(s) if s == "malformed KeyUpdate"
            ));
        }
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

    /// Both ends of a real loopback handshake, handed over (secrets extracted), with their
    /// non-blocking sockets.
    pub(crate) fn loopback_handshake() -> ((Established, TcpStream), (Established, TcpStream)) {
        let pki = Pki::new("cluster.local");
        let (cc, sc) = configs(&pki, &pki.creds(CLIENT), &pki.creds(SERVER), SERVER);
        let ((c, cs), (s, ss)) = handshake_pair(cc, sc, |_, _| {});
        ((c.expect("client"), cs), (s.expect("server"), ss))
    }

    #[test]
    fn crypto_info_of_one_side_tx_equals_the_other_side_rx() {
        let ((c, _cs), (s, _ss)) = loopback_handshake();
        let cipher = c.negotiated.cipher;
        let (cs, ss) = (&c.secrets, &s.secrets);
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
    fn record_limit_is_half_the_suites_confidentiality_limit_at_most() {
        let ((c, _), _) = loopback_handshake();
        let suite = c.negotiated.suite;
        assert_eq!(
            record_limit(suite, u64::MAX),
            (1 << 24) / 2,
            "AES-GCM: 2^24 records"
        );
        assert_eq!(record_limit(suite, 1000), 1000, "a smaller budget stands");
    }

    #[test]
    fn without_ktls_the_socket_is_left_for_user_space_tls_and_it_works() {
        let ((c, cs), (s, ss)) = loopback_handshake();
        let none = support(&[], &[], Some("kernel has no kTLS"));
        let mode = offload(cs.as_raw_fd(), &c.negotiated, &c.secrets, &none).expect("offload");
        assert_eq!(
            mode,
            TunnelTlsMode::UserSpace {
                reason: UserSpaceReason::NoKtls("kernel has no kTLS".into())
            }
        );
        // The socket was not touched: records sealed with the client's secrets open with the
        // server's on the other end.
        let mut sealer =
            crate::tls::record_layer::Sealer::new(&c.secrets.tx.1, c.secrets.tx.0).expect("keys");
        let mut opener =
            crate::tls::record_layer::Opener::new(&s.secrets.rx.1, s.secrets.rx.0).expect("keys");
        let mut wire = Vec::new();
        sealer.seal(b"hello", &mut wire).expect("seal");
        cs.set_nonblocking(false).unwrap();
        (&cs).write_all(&wire).expect("send");
        ss.set_nonblocking(false).unwrap();
        let mut got = vec![0u8; wire.len()];
        (&ss).read_exact(&mut got).expect("read");
        let r = opener
            .open_first(&mut got)
            .expect("open")
            .expect("whole record");
        assert_eq!(&got[r.start..r.end], b"hello");
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
        let client_cipher = c.negotiated.cipher;
        let mut sides = Vec::new();
        for (est, sock) in [(c, cs), (s, ss)] {
            match offload(sock.as_raw_fd(), &est.negotiated, &est.secrets, &support)
                .expect("offload")
            {
                TunnelTlsMode::Kernel { cipher } => {
                    assert_eq!(cipher, client_cipher);
                    assert!(est.plaintext.is_empty());
                }
                TunnelTlsMode::UserSpace { reason } => {
                    if matches!(reason, UserSpaceReason::CipherNotOffloaded { .. }) {
                        println!("SKIPPED (no kTLS: {reason})");
                        return;
                    }
                    panic!("kTLS available but not used: {reason}");
                }
            }
            sock.set_nonblocking(false).expect("blocking");
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
