//! kTLS probing: does the kernel accept `TCP_ULP` "tls", which TLS 1.3 ciphers does it take for
//! `TLS_TX` and for `TLS_RX` (each direction tried on its own), and can it re-key a TLS 1.3
//! socket in each direction. Learned by trying on fresh connected loopback sockets with
//! throw-away keys, never from the version number; ENOENT from `TCP_ULP` means no
//! tls module/CONFIG_TLS. The tunnel code asks [`ktls_support`], which probes once and
//! remembers; `ringtun probe` shows the whole [`KtlsReport`].
//!
//! Rekey, as the kernel sources have it (net/tls/tls_main.c, `do_tls_setsockopt_conf`): before
//! 6.14 a second `TLS_TX` or `TLS_RX` on a socket that already has that direction's key fails
//! with EBUSY ("Currently we don't support set crypto info more than one time"). From 6.14 on
//! ("tls: implement rekey for TLS1.3") a second key is accepted for TLS 1.3 when the version
//! and cipher are unchanged (EINVAL otherwise; TLS 1.2 keeps EBUSY) and counted in
//! `TlsTxRekeyOk`/`TlsRxRekeyOk`; a KeyUpdate record read from the socket pauses decryption
//! (`TlsRxRekeyReceived`, reads fail with EKEYEXPIRED) until the new `TLS_RX` key is
//! installed. The probe walks exactly that sequence on loopback and checks that the record
//! after the KeyUpdate decrypts under the new keys.

use std::fmt;
use std::sync::OnceLock;

use nix::errno::Errno;
use serde::Serialize;

use super::sys::{self, errno_text};

/// `TLS_TX` / `TLS_RX` from linux/tls.h (libc has `SOL_TLS` and `TCP_ULP` but not these).
pub(crate) const TLS_TX: libc::c_int = 1;
pub(crate) const TLS_RX: libc::c_int = 2;
/// TLS_VERSION_NUMBER(TLS_1_3): major 3, minor 4.
pub(crate) const TLS_1_3_VERSION: u16 = 0x0304;
pub(crate) const TLS_CIPHER_AES_GCM_128: u16 = 51;
pub(crate) const TLS_CIPHER_AES_GCM_256: u16 = 52;
pub(crate) const TLS_CIPHER_CHACHA20_POLY1305: u16 = 54;

/// `struct tls_crypto_info`.
#[repr(C)]
#[derive(Clone, Copy)]
pub(crate) struct TlsCryptoInfo {
    pub(crate) version: u16,
    pub(crate) cipher_type: u16,
}

/// `struct tls12_crypto_info_aes_gcm_128` (the "tls12" prefix is historical; TLS 1.3 uses it).
#[repr(C)]
#[derive(Clone, Copy)]
pub(crate) struct Tls12CryptoInfoAesGcm128 {
    pub(crate) info: TlsCryptoInfo,
    pub(crate) iv: [u8; 8],
    pub(crate) key: [u8; 16],
    pub(crate) salt: [u8; 4],
    pub(crate) rec_seq: [u8; 8],
}

/// `struct tls12_crypto_info_aes_gcm_256`.
#[repr(C)]
#[derive(Clone, Copy)]
pub(crate) struct Tls12CryptoInfoAesGcm256 {
    pub(crate) info: TlsCryptoInfo,
    pub(crate) iv: [u8; 8],
    pub(crate) key: [u8; 32],
    pub(crate) salt: [u8; 4],
    pub(crate) rec_seq: [u8; 8],
}

/// `struct tls12_crypto_info_chacha20_poly1305` (no salt: the whole 12-byte nonce is the IV).
#[repr(C)]
#[derive(Clone, Copy)]
pub(crate) struct Tls12CryptoInfoChacha20Poly1305 {
    pub(crate) info: TlsCryptoInfo,
    pub(crate) iv: [u8; 12],
    pub(crate) key: [u8; 32],
    pub(crate) rec_seq: [u8; 8],
}

// The kernel checks optlen against these exact sizes; a layout slip would read as "unsupported".
const _: () = assert!(std::mem::size_of::<Tls12CryptoInfoAesGcm128>() == 40);
const _: () = assert!(std::mem::size_of::<Tls12CryptoInfoAesGcm256>() == 56);
const _: () = assert!(std::mem::size_of::<Tls12CryptoInfoChacha20Poly1305>() == 56);

/// A kTLS cipher ringtun may install (TLS 1.3 suites).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize)]
pub enum KtlsCipher {
    #[serde(rename = "aes_128_gcm")]
    Aes128Gcm,
    #[serde(rename = "aes_256_gcm")]
    Aes256Gcm,
    #[serde(rename = "chacha20_poly1305")]
    Chacha20Poly1305,
}

impl KtlsCipher {
    pub const ALL: [KtlsCipher; 3] = [
        KtlsCipher::Aes128Gcm,
        KtlsCipher::Aes256Gcm,
        KtlsCipher::Chacha20Poly1305,
    ];

    /// The name used in the report and the JSON.
    pub fn name(self) -> &'static str {
        match self {
            KtlsCipher::Aes128Gcm => "aes_128_gcm",
            KtlsCipher::Aes256Gcm => "aes_256_gcm",
            KtlsCipher::Chacha20Poly1305 => "chacha20_poly1305",
        }
    }

    /// A TLS 1.3 crypto_info for this cipher with throw-away key material: every key byte is
    /// `key_byte` (nothing secret is ever sent under it), IV, salt and sequence zero.
    fn probe_crypto_info(self, key_byte: u8) -> Vec<u8> {
        match self {
            KtlsCipher::Aes128Gcm => struct_bytes(&Tls12CryptoInfoAesGcm128 {
                info: TlsCryptoInfo {
                    version: TLS_1_3_VERSION,
                    cipher_type: TLS_CIPHER_AES_GCM_128,
                },
                iv: [0; 8],
                key: [key_byte; 16],
                salt: [0; 4],
                rec_seq: [0; 8],
            }),
            KtlsCipher::Aes256Gcm => struct_bytes(&Tls12CryptoInfoAesGcm256 {
                info: TlsCryptoInfo {
                    version: TLS_1_3_VERSION,
                    cipher_type: TLS_CIPHER_AES_GCM_256,
                },
                iv: [0; 8],
                key: [key_byte; 32],
                salt: [0; 4],
                rec_seq: [0; 8],
            }),
            KtlsCipher::Chacha20Poly1305 => struct_bytes(&Tls12CryptoInfoChacha20Poly1305 {
                info: TlsCryptoInfo {
                    version: TLS_1_3_VERSION,
                    cipher_type: TLS_CIPHER_CHACHA20_POLY1305,
                },
                iv: [0; 12],
                key: [key_byte; 32],
                rec_seq: [0; 8],
            }),
        }
    }
}

impl fmt::Display for KtlsCipher {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// Marks the padding-free repr(C) crypto_info structs, the only types [`struct_bytes`] may view
/// as bytes.
pub(crate) trait CryptoInfo: Copy {}
impl CryptoInfo for Tls12CryptoInfoAesGcm128 {}
impl CryptoInfo for Tls12CryptoInfoAesGcm256 {}
impl CryptoInfo for Tls12CryptoInfoChacha20Poly1305 {}

/// The bytes of one of the crypto_info structs above, as setsockopt wants them.
pub(crate) fn struct_bytes<T: CryptoInfo>(value: &T) -> Vec<u8> {
    // SAFETY: only called with the repr(C) crypto_info structs, whose fields are u16 and u8
    // arrays laid out without padding (sizes asserted above), so every byte is initialised.
    unsafe {
        std::slice::from_raw_parts((value as *const T).cast::<u8>(), std::mem::size_of::<T>())
    }
    .to_vec()
}

/// Whether the kernel can replace a TLS 1.3 key on a live kTLS socket (TLS 1.3 KeyUpdate,
/// RFC 8446 §4.6.3), which decides whether a long-lived tunnel must be retired before the
/// AES-GCM record limit and whether a peer's KeyUpdate can be followed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Rekey {
    /// A second key was accepted and the next record went through under it (6.14+).
    Supported,
    /// No kTLS, or the second key was refused with EBUSY (kernels before 6.14).
    Unsupported,
    /// The attempt gave an answer that proves neither (its evidence says what happened).
    Unknown,
}

impl Rekey {
    /// Both directions: supported only if each is; unsupported if either is.
    fn both(tx: Rekey, rx: Rekey) -> Rekey {
        match (tx, rx) {
            (Rekey::Supported, Rekey::Supported) => Rekey::Supported,
            (Rekey::Unsupported, _) | (_, Rekey::Unsupported) => Rekey::Unsupported,
            _ => Rekey::Unknown,
        }
    }
}

impl fmt::Display for Rekey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Rekey::Supported => "supported",
            Rekey::Unsupported => "unsupported",
            Rekey::Unknown => "unknown",
        })
    }
}

/// What kTLS offers on this kernel.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct KtlsSupport {
    /// At least one TLS 1.3 cipher was accepted for TLS_TX.
    pub tx: bool,
    /// At least one TLS 1.3 cipher was accepted for TLS_RX.
    pub rx: bool,
    /// Ciphers TLS_TX accepted.
    pub ciphers: Vec<KtlsCipher>,
    /// Ciphers TLS_RX accepted.
    pub rx_ciphers: Vec<KtlsCipher>,
    /// Rekey in both directions (see [`KtlsReport`] for each one and the evidence).
    pub rekey: Rekey,
    /// Why TX or RX is missing; `None` when both work.
    pub reason: Option<String>,
}

impl KtlsSupport {
    fn unavailable(reason: String) -> Self {
        Self {
            tx: false,
            rx: false,
            ciphers: Vec::new(),
            rx_ciphers: Vec::new(),
            rekey: Rekey::Unsupported,
            reason: Some(reason),
        }
    }

    /// Whether a tunnel negotiated with `cipher` can run both directions in the kernel.
    pub fn offloads(&self, cipher: KtlsCipher) -> bool {
        self.ciphers.contains(&cipher) && self.rx_ciphers.contains(&cipher)
    }
}

/// Everything the kTLS probe learned, as `ringtun probe` shows it: the [`KtlsSupport`] tunnels
/// decide by (`tx`, `rx`, `ciphers` for TLS_TX, `rx_ciphers` for TLS_RX, `rekey`, `reason`),
/// and what the kernel answered to each attempt.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct KtlsReport {
    #[serde(flatten)]
    pub support: KtlsSupport,
    /// Sending our own KeyUpdate: a new TLS_TX key on a socket that already sends under one.
    pub rekey_tx: Rekey,
    /// Following the peer's KeyUpdate: a new TLS_RX key once the KeyUpdate record was read.
    pub rekey_rx: Rekey,
    /// What the rekey attempt did and what the kernel answered, step by step.
    pub rekey_evidence: String,
    /// Each refused key install, `<cipher> TLS_TX|TLS_RX: <errno>` (empty when all succeeded).
    pub refusals: Vec<String>,
}

impl KtlsReport {
    fn unavailable(reason: String) -> Self {
        Self {
            rekey_evidence: format!("not tried: {reason}"),
            support: KtlsSupport::unavailable(reason),
            rekey_tx: Rekey::Unsupported,
            rekey_rx: Rekey::Unsupported,
            refusals: Vec::new(),
        }
    }
}

/// kTLS support, probed on first use and remembered for the life of the process (what the
/// kernel offers does not change under a running proxy; the probe costs a few sockets).
pub fn ktls_support() -> KtlsSupport {
    static CACHE: OnceLock<KtlsSupport> = OnceLock::new();
    CACHE.get_or_init(|| probe_ktls().support).clone()
}

/// The reason text for "the tls ULP does not exist".
const NO_KTLS_REASON: &str = "kernel has no kTLS (CONFIG_TLS off or tls module missing)";

fn ulp_error_reason(errno: Errno) -> String {
    match errno {
        // Without CAP_NET_ADMIN the kernel will not auto-load the module, so ENOENT only says
        // "not loaded"; spell out the fix.
        Errno::ENOENT if !sys::has_cap(sys::CAP_NET_ADMIN) => "kTLS not loaded: no tls ULP, and \
             without CAP_NET_ADMIN the kernel will not auto-load it (run `modprobe tls`; if that \
             fails the kernel has no kTLS)"
            .to_owned(),
        Errno::ENOENT => NO_KTLS_REASON.to_owned(),
        other => format!("TCP_ULP \"tls\" refused: {}", errno_text(other)),
    }
}

/// A connected loopback socket with the tls ULP attached, ready for TLS_TX/TLS_RX.
fn tls_socket() -> Result<(std::net::TcpStream, std::net::TcpStream), String> {
    let (client, server) =
        sys::loopback_pair(false).map_err(|e| format!("loopback TCP pair: {}", errno_text(e)))?;
    sys::setsockopt_bytes(&client, libc::SOL_TCP, libc::TCP_ULP, b"tls")
        .map_err(ulp_error_reason)?;
    Ok((client, server))
}

/// A connected loopback pair, both ends with the tls ULP attached.
fn tls_pair() -> Result<(std::net::TcpStream, std::net::TcpStream), String> {
    let (client, server) =
        sys::loopback_pair(false).map_err(|e| format!("loopback TCP pair: {}", errno_text(e)))?;
    for s in [&client, &server] {
        sys::setsockopt_bytes(s, libc::SOL_TCP, libc::TCP_ULP, b"tls").map_err(ulp_error_reason)?;
    }
    Ok((client, server))
}

fn install(
    sock: &std::net::TcpStream,
    direction: libc::c_int,
    cipher: KtlsCipher,
    key_byte: u8,
) -> Result<(), Errno> {
    let info = cipher.probe_crypto_info(key_byte);
    sys::setsockopt_bytes(sock, libc::SOL_TLS, direction, &info)
}

/// Probes kTLS afresh (`ktls_support` caches the tunnels' part of it).
pub(crate) fn probe_ktls() -> KtlsReport {
    let mut ciphers = Vec::new();
    let mut rx_ciphers = Vec::new();
    let mut tx_errors = Vec::new();
    let mut rx_errors = Vec::new();
    let mut refusals = Vec::new();
    for cipher in KtlsCipher::ALL {
        // Each direction on its own fresh socket: one direction's refusal (or the kernel's
        // rule that both directions share a cipher) must not decide the other's answer.
        for (direction, name, accepted, errors) in [
            (TLS_TX, "TLS_TX", &mut ciphers, &mut tx_errors),
            (TLS_RX, "TLS_RX", &mut rx_ciphers, &mut rx_errors),
        ] {
            let (sock, _peer) = match tls_socket() {
                Ok(pair) => pair,
                Err(reason) => return KtlsReport::unavailable(reason),
            };
            match install(&sock, direction, cipher, 0) {
                Ok(()) => accepted.push(cipher),
                Err(e) => {
                    errors.push(format!("{cipher}: {}", errno_text(e)));
                    refusals.push(format!("{cipher} {name}: {}", errno_text(e)));
                }
            }
        }
    }
    let tx = !ciphers.is_empty();
    let rx = !rx_ciphers.is_empty();
    let reason = match (tx, rx) {
        (true, true) => None,
        (false, _) => Some(format!(
            "TLS_TX refused every TLS 1.3 cipher ({})",
            tx_errors.join(", ")
        )),
        (true, false) => Some(format!(
            "TLS_RX refused every TLS 1.3 cipher ({})",
            rx_errors.join(", ")
        )),
    };
    let both_ways = ciphers.iter().copied().find(|c| rx_ciphers.contains(c));
    let attempt = match both_ways {
        Some(cipher) => probe_rekey(cipher),
        None if !tx => RekeyAttempt::unsupported("not tried: no kTLS TX"),
        None => RekeyAttempt::unknown(
            "not tried: no cipher is accepted for both TLS_TX and TLS_RX".into(),
        ),
    };
    KtlsReport {
        support: KtlsSupport {
            tx,
            rx,
            ciphers,
            rx_ciphers,
            rekey: Rekey::both(attempt.tx, attempt.rx),
            reason,
        },
        rekey_tx: attempt.tx,
        rekey_rx: attempt.rx,
        rekey_evidence: attempt.evidence,
        refusals,
    }
}

/// The outcome of [`probe_rekey`].
struct RekeyAttempt {
    tx: Rekey,
    rx: Rekey,
    evidence: String,
}

impl RekeyAttempt {
    fn unknown(evidence: String) -> Self {
        Self {
            tx: Rekey::Unknown,
            rx: Rekey::Unknown,
            evidence,
        }
    }

    fn unsupported(evidence: &str) -> Self {
        Self {
            tx: Rekey::Unsupported,
            rx: Rekey::Unsupported,
            evidence: evidence.into(),
        }
    }
}

/// RFC 8446 §4.6.3: a KeyUpdate handshake message (type 24, length 1), update_not_requested.
const KEY_UPDATE: [u8; 5] = [24, 0, 0, 1, 0];
/// Application data sent under the new keys; must come out intact at the other end.
const AFTER_REKEY: &[u8] = b"ringtun rekey probe";

/// A second key on a live socket, each way, as a tunnel would use it: the sender sends a
/// KeyUpdate under key A and installs key B (`TLS_TX` again), then sends data; the receiver
/// reads the KeyUpdate record, installs key B (`TLS_RX` again) and must read that data
/// intact. EBUSY from the second key is the "one key per direction" answer of kernels before
/// 6.14. Bounded: every read on the pair times out (`sys::loopback_pair`).
fn probe_rekey(cipher: KtlsCipher) -> RekeyAttempt {
    let (sender, receiver) = match tls_pair() {
        Ok(pair) => pair,
        Err(why) => return RekeyAttempt::unknown(format!("{cipher}: {why}")),
    };
    if let Err(e) = install(&sender, TLS_TX, cipher, 0)
        .map_err(|e| format!("TLS_TX: {}", errno_text(e)))
        .and_then(|()| {
            install(&receiver, TLS_RX, cipher, 0).map_err(|e| format!("TLS_RX: {}", errno_text(e)))
        })
    {
        return RekeyAttempt::unknown(format!("{cipher}: the first key was refused ({e})"));
    }
    let mut steps = vec![format!("{cipher}: first keys installed")];
    if let Err(e) = sys::send_tls_record(&sender, sys::TLS_CONTENT_HANDSHAKE, &KEY_UPDATE) {
        steps.push(format!("sending KeyUpdate failed: {}", errno_text(e)));
        return RekeyAttempt::unknown(steps.join("; "));
    }
    steps.push("KeyUpdate sent".into());
    let answer = |r: Result<(), Errno>, what: &str, steps: &mut Vec<String>| match r {
        Ok(()) => {
            steps.push(format!("second {what} accepted"));
            Rekey::Supported
        }
        Err(Errno::EBUSY) => {
            steps.push(format!("second {what} refused with EBUSY"));
            Rekey::Unsupported
        }
        Err(e) => {
            steps.push(format!("second {what} refused with {}", errno_text(e)));
            Rekey::Unknown
        }
    };
    let mut tx = answer(install(&sender, TLS_TX, cipher, 1), "TLS_TX", &mut steps);
    if tx == Rekey::Supported {
        if let Err(e) =
            sys::send_tls_record(&sender, sys::TLS_CONTENT_APPLICATION_DATA, AFTER_REKEY)
        {
            steps.push(format!(
                "sending under the new key failed: {}",
                errno_text(e)
            ));
            tx = Rekey::Unknown;
        }
    }
    let mut buf = [0u8; 64];
    match sys::recv_tls_record(&receiver, &mut buf) {
        Ok((sys::TLS_CONTENT_HANDSHAKE, n)) if buf[..n] == KEY_UPDATE => {
            steps.push("KeyUpdate read".into())
        }
        other => {
            steps.push(format!("expected the KeyUpdate record, read {other:?}"));
            return RekeyAttempt {
                tx,
                rx: Rekey::Unknown,
                evidence: steps.join("; "),
            };
        }
    }
    let mut rx = answer(install(&receiver, TLS_RX, cipher, 1), "TLS_RX", &mut steps);
    if tx == Rekey::Supported && rx == Rekey::Supported {
        match sys::recv_tls_record(&receiver, &mut buf) {
            Ok((sys::TLS_CONTENT_APPLICATION_DATA, n)) if &buf[..n] == AFTER_REKEY => {
                steps.push("data sent after the KeyUpdate decrypted under the new keys".into())
            }
            other => {
                steps.push(format!(
                    "data sent after the KeyUpdate did not come through: {other:?}"
                ));
                tx = Rekey::Unknown;
                rx = Rekey::Unknown;
            }
        }
    }
    if tx == Rekey::Unsupported && rx == Rekey::Unsupported {
        steps
            .push("this kernel takes one key per direction (TLS 1.3 rekey arrived in 6.14)".into());
    }
    RekeyAttempt {
        tx,
        rx,
        evidence: steps.join("; "),
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use super::*;

    fn tls_ulp_listed() -> bool {
        sys::read_trimmed("/proc/sys/net/ipv4/tcp_available_ulp")
            .is_some_and(|ulps| ulps.split_whitespace().any(|u| u == "tls"))
    }

    /// The kernel's kTLS counters in this thread's network namespace; `None` without kTLS.
    fn tls_stat() -> Option<BTreeMap<String, u64>> {
        let text = std::fs::read_to_string("/proc/thread-self/net/tls_stat").ok()?;
        Some(
            text.lines()
                .filter_map(|l| {
                    let mut it = l.split_whitespace();
                    Some((it.next()?.to_owned(), it.next()?.parse().ok()?))
                })
                .collect(),
        )
    }

    #[test]
    fn ktls_tx_matches_the_kernels_ulp_list() {
        let k = probe_ktls().support;
        // The probe's TCP_ULP attempt loads the module if there is one, so afterwards the
        // kernel's own list is an independent answer.
        assert_eq!(k.tx, tls_ulp_listed(), "{k:?}");
        assert_eq!(k.tx, !k.ciphers.is_empty());
        if !k.tx {
            assert!(k.reason.is_some());
            assert_eq!(k.rekey, Rekey::Unsupported);
        }
    }

    /// The oracle: the kernel's own counters. Kernels with TLS 1.3 rekey list
    /// `TlsTxRekeyOk`/`TlsRxRekeyOk`/`TlsRxRekeyReceived` in /proc/net/tls_stat (added with the
    /// feature) and count each step the probe takes; older kernels have no such rows and must
    /// be reported unsupported, with the EBUSY they answered.
    #[test]
    fn rekey_matches_the_kernels_own_counters() {
        let before = tls_stat();
        let r = probe_ktls();
        let Some(after) = tls_stat() else {
            assert_eq!(r.support.rekey, Rekey::Unsupported, "no kTLS: {r:?}");
            assert!(r.rekey_evidence.starts_with("not tried"), "{r:?}");
            return;
        };
        let grew = |k: &str| {
            let was = before.as_ref().and_then(|b| b.get(k)).copied().unwrap_or(0);
            after.get(k).copied().unwrap_or(0).saturating_sub(was)
        };
        if after.contains_key("TlsTxRekeyOk") {
            assert_eq!(
                (r.rekey_tx, r.rekey_rx, r.support.rekey),
                (Rekey::Supported, Rekey::Supported, Rekey::Supported),
                "{r:?}"
            );
            // Other tests may probe at the same time: at least ours must show.
            for counter in ["TlsTxRekeyOk", "TlsRxRekeyOk", "TlsRxRekeyReceived"] {
                assert!(
                    grew(counter) >= 1,
                    "{counter} did not grow: {after:?}; {r:?}"
                );
            }
        } else {
            assert_eq!(
                (r.rekey_tx, r.rekey_rx, r.support.rekey),
                (Rekey::Unsupported, Rekey::Unsupported, Rekey::Unsupported),
                "{r:?}"
            );
            assert!(
                r.rekey_evidence.contains("TLS_TX refused with EBUSY")
                    && r.rekey_evidence.contains("TLS_RX refused with EBUSY"),
                "{}",
                r.rekey_evidence
            );
        }
    }

    #[test]
    fn every_cipher_is_accepted_or_its_refusal_named() {
        let r = probe_ktls();
        if !r.support.tx {
            return;
        }
        for cipher in KtlsCipher::ALL {
            for (name, accepted) in [
                ("TLS_TX", &r.support.ciphers),
                ("TLS_RX", &r.support.rx_ciphers),
            ] {
                let refused = r
                    .refusals
                    .iter()
                    .any(|x| x.starts_with(&format!("{cipher} {name}: ")));
                assert_ne!(
                    accepted.contains(&cipher),
                    refused,
                    "{cipher} {name}: {r:?}"
                );
            }
        }
    }

    #[test]
    fn rekey_needs_both_directions() {
        use Rekey::*;
        assert_eq!(Rekey::both(Supported, Supported), Supported);
        assert_eq!(Rekey::both(Supported, Unsupported), Unsupported);
        assert_eq!(Rekey::both(Unknown, Unsupported), Unsupported);
        assert_eq!(Rekey::both(Supported, Unknown), Unknown);
    }

    #[test]
    fn cached_support_equals_a_fresh_probe() {
        assert_eq!(ktls_support(), probe_ktls().support);
    }

    #[test]
    fn probe_crypto_info_starts_with_tls13_and_cipher() {
        let info = KtlsCipher::Aes256Gcm.probe_crypto_info(1);
        assert_eq!(info.len(), 56);
        assert_eq!(&info[..2], &TLS_1_3_VERSION.to_ne_bytes());
        assert_eq!(&info[2..4], &TLS_CIPHER_AES_GCM_256.to_ne_bytes());
        // iv (8), key (32), salt (4), rec_seq (8): only the key carries the byte.
        assert!(info[4..12].iter().all(|&b| b == 0));
        assert!(info[12..44].iter().all(|&b| b == 1));
        assert!(info[44..].iter().all(|&b| b == 0));
    }

    #[test]
    fn ciphers_serialize_by_kernel_name() {
        let json = serde_json::to_string(&KtlsCipher::ALL).expect("serialize");
        assert_eq!(json, r#"["aes_128_gcm","aes_256_gcm","chacha20_poly1305"]"#);
    }
}
