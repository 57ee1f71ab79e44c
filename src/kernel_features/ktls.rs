//! kTLS probing: does the kernel accept `TCP_ULP` "tls", which TLS 1.3 ciphers does it take for
//! `TLS_TX` and `TLS_RX`, and can it re-key a TLS 1.3 sender. Learned by trying on fresh
//! connected loopback sockets with all-zero keys (nothing is ever sent under them), never from
//! the version number; ENOENT from `TCP_ULP` means no tls module/CONFIG_TLS. The tunnel code
//! asks [`ktls_support`], which probes once and remembers.

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

    /// A TLS 1.3 crypto_info for this cipher with all-zero key material.
    fn zero_crypto_info(self) -> Vec<u8> {
        match self {
            KtlsCipher::Aes128Gcm => struct_bytes(&Tls12CryptoInfoAesGcm128 {
                info: TlsCryptoInfo {
                    version: TLS_1_3_VERSION,
                    cipher_type: TLS_CIPHER_AES_GCM_128,
                },
                iv: [0; 8],
                key: [0; 16],
                salt: [0; 4],
                rec_seq: [0; 8],
            }),
            KtlsCipher::Aes256Gcm => struct_bytes(&Tls12CryptoInfoAesGcm256 {
                info: TlsCryptoInfo {
                    version: TLS_1_3_VERSION,
                    cipher_type: TLS_CIPHER_AES_GCM_256,
                },
                iv: [0; 8],
                key: [0; 32],
                salt: [0; 4],
                rec_seq: [0; 8],
            }),
            KtlsCipher::Chacha20Poly1305 => struct_bytes(&Tls12CryptoInfoChacha20Poly1305 {
                info: TlsCryptoInfo {
                    version: TLS_1_3_VERSION,
                    cipher_type: TLS_CIPHER_CHACHA20_POLY1305,
                },
                iv: [0; 12],
                key: [0; 32],
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

/// Whether a TLS 1.3 sender can be re-keyed in the kernel (KeyUpdate), which decides whether a
/// long-lived tunnel must be rotated before the AES-GCM record limit.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Rekey {
    /// A second TLS_TX on a TLS 1.3 socket was accepted (kernels with key update, ~6.14+).
    Supported,
    /// No kTLS, or the second TLS_TX was refused with EBUSY (older kernels).
    Unsupported,
    /// The attempt gave an answer that proves neither.
    Unknown,
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

/// kTLS support, probed on first use and remembered for the life of the process (what the
/// kernel offers does not change under a running proxy; the probe costs a few sockets).
pub fn ktls_support() -> KtlsSupport {
    static CACHE: OnceLock<KtlsSupport> = OnceLock::new();
    CACHE.get_or_init(probe_ktls).clone()
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

/// Probes kTLS afresh (`ktls_support` caches this).
pub(crate) fn probe_ktls() -> KtlsSupport {
    let mut ciphers = Vec::new();
    let mut rx_ciphers = Vec::new();
    let mut tx_errors = Vec::new();
    let mut rx_errors = Vec::new();
    let mut rekey = Rekey::Unknown;
    for cipher in KtlsCipher::ALL {
        // A socket takes TLS_TX once (before key update), so each cipher gets a fresh one.
        let (sock, _peer) = match tls_socket() {
            Ok(pair) => pair,
            Err(reason) => return KtlsSupport::unavailable(reason),
        };
        let info = cipher.zero_crypto_info();
        match sys::setsockopt_bytes(&sock, libc::SOL_TLS, TLS_TX, &info) {
            Ok(()) => {
                ciphers.push(cipher);
                if rekey == Rekey::Unknown {
                    rekey = match sys::setsockopt_bytes(&sock, libc::SOL_TLS, TLS_TX, &info) {
                        Ok(()) => Rekey::Supported,
                        Err(Errno::EBUSY) => Rekey::Unsupported,
                        Err(_) => Rekey::Unknown,
                    };
                }
            }
            Err(e) => tx_errors.push(format!("{cipher}: {}", errno_text(e))),
        }
        match sys::setsockopt_bytes(&sock, libc::SOL_TLS, TLS_RX, &info) {
            Ok(()) => rx_ciphers.push(cipher),
            Err(e) => rx_errors.push(format!("{cipher}: {}", errno_text(e))),
        }
    }
    let tx = !ciphers.is_empty();
    let rx = !rx_ciphers.is_empty();
    if !tx {
        rekey = Rekey::Unsupported;
    }
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
    KtlsSupport {
        tx,
        rx,
        ciphers,
        rx_ciphers,
        rekey,
        reason,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tls_ulp_listed() -> bool {
        sys::read_trimmed("/proc/sys/net/ipv4/tcp_available_ulp")
            .is_some_and(|ulps| ulps.split_whitespace().any(|u| u == "tls"))
    }

    #[test]
    fn ktls_tx_matches_the_kernels_ulp_list() {
        let k = probe_ktls();
        // The probe's TCP_ULP attempt loads the module if there is one, so afterwards the
        // kernel's own list is an independent answer.
        assert_eq!(k.tx, tls_ulp_listed(), "{k:?}");
        assert_eq!(k.tx, !k.ciphers.is_empty());
        if !k.tx {
            assert!(k.reason.is_some());
            assert_eq!(k.rekey, Rekey::Unsupported);
        }
    }

    #[test]
    fn cached_support_equals_a_fresh_probe() {
        assert_eq!(ktls_support(), probe_ktls());
    }

    #[test]
    fn zero_crypto_info_starts_with_tls13_and_cipher() {
        let info = KtlsCipher::Aes256Gcm.zero_crypto_info();
        assert_eq!(info.len(), 56);
        assert_eq!(&info[..2], &TLS_1_3_VERSION.to_ne_bytes());
        assert_eq!(&info[2..4], &TLS_CIPHER_AES_GCM_256.to_ne_bytes());
        assert!(info[4..].iter().all(|&b| b == 0));
    }

    #[test]
    fn ciphers_serialize_by_kernel_name() {
        let json = serde_json::to_string(&KtlsCipher::ALL).expect("serialize");
        assert_eq!(json, r#"["aes_128_gcm","aes_256_gcm","chacha20_poly1305"]"#);
    }
}
