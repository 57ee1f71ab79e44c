//! rustls configuration for HBONE tunnels, as DESIGN.md §4 and Istio's ztunnel speak them:
//! TLS 1.3 only, AES-128-GCM and AES-256-GCM only (the ciphers kTLS offloads), ALPN `h2`, mutual
//! certificates whose identity is the single SPIFFE URI SAN.
//!
//! Boundary: this module builds configs and judges certificates; it never touches a socket (the
//! tunnel drives the rustls connection, `ktls` moves its keys into the kernel). Identity comes
//! only from a verified certificate, never from anything the peer says in HTTP:
//! - the server ([`server_config`]) requires a client certificate that chains to the trust
//!   bundle and carries exactly one SPIFFE URI SAN in the node's trust domain;
//! - the client ([`ClientTls::config_for`]) accepts a server only if its chain leads to the trust
//!   bundle and its single SPIFFE URI SAN equals the identity the destination workload should
//!   have. No DNS-name check: mesh servers are named by identity, not by host name.
//!
//! Session resumption is off both ways. Tunnels are pooled, so a handshake happens once per
//! (source identity, destination node), not per connection; resumption would skip certificate
//! verification on the resumed handshake (trusting a ticket instead of the live chain against
//! today's bundle), and tickets would arrive on kTLS sockets as extra control records. Secret
//! extraction is on so the traffic keys can be handed to the kernel.

pub mod credentials;
#[cfg(test)]
pub(crate) mod fixtures;
pub mod handshake;
pub mod ktls;
pub mod record_layer;

use std::net::IpAddr;
use std::sync::Arc;

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::client::{verify_server_cert_signed_by_trust_anchor, Resumption};
use rustls::crypto::{CryptoProvider, WebPkiSupportedAlgorithms};
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::server::{NoServerSessionStorage, ParsedCertificate, WebPkiClientVerifier};
use rustls::sign::{CertifiedKey, SingleCertAndKey};
use rustls::{
    CertificateError, ClientConfig, CommonState, DigitallySignedStruct, DistinguishedName,
    OtherError, ProtocolVersion, RootCertStore, ServerConfig, SignatureScheme,
    SupportedCipherSuite,
};

use crate::control_plane::certs::{spiffe_uri_san, TrustBundle, WorkloadCredentials};
use crate::control_plane::config::CipherChoice;
use crate::control_plane::identity::{IdentityError, SpiffeId};
use crate::kernel_features::KtlsCipher;

/// The only application protocol HBONE speaks.
pub const ALPN_H2: &[u8] = b"h2";

/// Why a tunnel's TLS could not be set up or was refused. Variants say whose fault it is:
/// `Local*` is this node's configuration, `Peer*` is what the other side presented.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("local TLS configuration: {0}")]
    LocalConfig(rustls::Error),
    #[error("local trust bundle {bundle}: {detail}")]
    LocalTrustBundle { bundle: String, detail: String },
    #[error("handshake not complete")]
    HandshakeIncomplete,
    #[error("peer negotiated {0:?}; HBONE needs TLS 1.3")]
    PeerNotTls13(Option<ProtocolVersion>),
    #[error("peer did not negotiate ALPN h2")]
    PeerNoH2,
    #[error("peer presented no certificate")]
    PeerNoCertificate,
    #[error("peer identity: {0}")]
    PeerIdentity(#[from] PeerIdentityError),
}

/// What is wrong with a peer's certificate as a mesh identity (the chain itself was valid).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PeerIdentityError {
    #[error("{0}")]
    Certificate(String),
    #[error("URI SAN is not a mesh identity: {0}")]
    NotSpiffe(#[from] IdentityError),
    #[error("{found} is outside trust domain {expected}")]
    WrongTrustDomain {
        found: Box<SpiffeId>,
        expected: String,
    },
    #[error("server is {found}, expected {expected}")]
    WrongIdentity {
        found: Box<SpiffeId>,
        expected: Box<SpiffeId>,
    },
}

impl From<PeerIdentityError> for rustls::Error {
    fn from(e: PeerIdentityError) -> Self {
        rustls::Error::InvalidCertificate(CertificateError::Other(OtherError(Arc::new(e))))
    }
}

/// The crypto provider for tunnels: ring, restricted to the TLS 1.3 AES-GCM suites.
pub fn provider() -> Arc<CryptoProvider> {
    provider_for(CipherChoice::Any)
}

/// The provider offering only the suites `choice` names (in preference order).
pub fn provider_for(choice: CipherChoice) -> Arc<CryptoProvider> {
    use rustls::crypto::ring::{cipher_suite, default_provider};
    let mut p = default_provider();
    p.cipher_suites = match choice {
        CipherChoice::Any => vec![
            cipher_suite::TLS13_AES_128_GCM_SHA256,
            cipher_suite::TLS13_AES_256_GCM_SHA384,
        ],
        CipherChoice::Aes128Gcm => vec![cipher_suite::TLS13_AES_128_GCM_SHA256],
        CipherChoice::Aes256Gcm => vec![cipher_suite::TLS13_AES_256_GCM_SHA384],
    };
    Arc::new(p)
}

/// The mesh identity a workload certificate carries (its one SPIFFE URI SAN).
///
/// # Errors
/// No URI SAN, several, or one that is not `spiffe://<td>/ns/<ns>/sa/<sa>`.
pub fn certificate_identity(cert: &CertificateDer<'_>) -> Result<SpiffeId, PeerIdentityError> {
    let uri = spiffe_uri_san(cert).map_err(PeerIdentityError::Certificate)?;
    Ok(SpiffeId::parse(&uri)?)
}

fn certified_key(
    creds: &WorkloadCredentials,
    provider: &CryptoProvider,
) -> Result<Arc<CertifiedKey>, TlsError> {
    CertifiedKey::from_der(creds.chain.clone(), creds.key.clone_key(), provider)
        .map(Arc::new)
        .map_err(TlsError::LocalConfig)
}

/// The HBONE server config for one local identity: presents `creds`, requires a client
/// certificate chaining to `trust` with a SPIFFE identity in `trust_domain`.
pub fn server_config(
    creds: &WorkloadCredentials,
    trust: &TrustBundle,
    trust_domain: &str,
) -> Result<Arc<ServerConfig>, TlsError> {
    server_config_for(creds, trust, trust_domain, CipherChoice::Any)
}

/// [`server_config`] offering only the suites `ciphers` names.
pub fn server_config_for(
    creds: &WorkloadCredentials,
    trust: &TrustBundle,
    trust_domain: &str,
    ciphers: CipherChoice,
) -> Result<Arc<ServerConfig>, TlsError> {
    let provider = provider_for(ciphers);
    let inner = WebPkiClientVerifier::builder_with_provider(trust.roots(), Arc::clone(&provider))
        .build()
        .map_err(|e| TlsError::LocalTrustBundle {
            bundle: trust.source().display().to_string(),
            detail: e.to_string(),
        })?;
    let verifier = SpiffeClientVerifier {
        inner,
        trust_domain: trust_domain.to_string(),
    };
    let key = certified_key(creds, &provider)?;
    let mut cfg = ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(TlsError::LocalConfig)?
        .with_client_cert_verifier(Arc::new(verifier))
        .with_cert_resolver(Arc::new(SingleCertAndKey::from(key)));
    cfg.alpn_protocols = vec![ALPN_H2.to_vec()];
    cfg.enable_secret_extraction = true;
    cfg.send_tls13_tickets = 0;
    cfg.session_storage = Arc::new(NoServerSessionStorage {});
    Ok(Arc::new(cfg))
}

/// The client side for one local (source) identity. Build once; ask [`ClientTls::config_for`]
/// per destination identity (cheap: the key and roots are shared).
#[derive(Clone)]
pub struct ClientTls {
    provider: Arc<CryptoProvider>,
    roots: Arc<RootCertStore>,
    key: Arc<SingleCertAndKey>,
}

impl ClientTls {
    pub fn new(creds: &WorkloadCredentials, trust: &TrustBundle) -> Result<Self, TlsError> {
        Self::new_for(creds, trust, CipherChoice::Any)
    }

    /// [`ClientTls::new`] offering only the suites `ciphers` names.
    pub fn new_for(
        creds: &WorkloadCredentials,
        trust: &TrustBundle,
        ciphers: CipherChoice,
    ) -> Result<Self, TlsError> {
        let provider = provider_for(ciphers);
        let key = certified_key(creds, &provider)?;
        Ok(Self {
            roots: trust.roots(),
            key: Arc::new(SingleCertAndKey::from(key)),
            provider,
        })
    }

    /// A config that accepts only a server whose certificate says `expected`.
    pub fn config_for(&self, expected: &SpiffeId) -> Result<Arc<ClientConfig>, TlsError> {
        let verifier = SpiffeServerVerifier {
            roots: Arc::clone(&self.roots),
            expected: expected.clone(),
            algs: self.provider.signature_verification_algorithms,
        };
        let mut cfg = ClientConfig::builder_with_provider(Arc::clone(&self.provider))
            .with_protocol_versions(&[&rustls::version::TLS13])
            .map_err(TlsError::LocalConfig)?
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(verifier))
            .with_client_cert_resolver(self.key.clone());
        cfg.alpn_protocols = vec![ALPN_H2.to_vec()];
        cfg.enable_secret_extraction = true;
        cfg.resumption = Resumption::disabled();
        cfg.enable_sni = false;
        Ok(Arc::new(cfg))
    }
}

/// The server name a tunnel client passes to rustls: the destination's IP (never sent as SNI,
/// never checked — the verifier checks the identity instead).
pub fn server_name(ip: IpAddr) -> ServerName<'static> {
    ServerName::IpAddress(ip.into())
}

/// What a completed handshake agreed, checked against HBONE's rules.
#[derive(Debug, Clone, PartialEq)]
pub struct Negotiated {
    /// The peer's verified identity.
    pub peer: SpiffeId,
    pub suite: SupportedCipherSuite,
    /// The kTLS cipher for this suite.
    pub cipher: KtlsCipher,
}

/// Checks a finished handshake (TLS 1.3, ALPN h2) and returns the peer's verified identity.
/// The verifiers already refused bad certificates; this reads the identity they accepted.
pub fn negotiated(conn: &CommonState) -> Result<Negotiated, TlsError> {
    if conn.is_handshaking() {
        return Err(TlsError::HandshakeIncomplete);
    }
    let version = conn.protocol_version();
    if version != Some(ProtocolVersion::TLSv1_3) {
        return Err(TlsError::PeerNotTls13(version));
    }
    if conn.alpn_protocol() != Some(ALPN_H2) {
        return Err(TlsError::PeerNoH2);
    }
    let leaf = conn
        .peer_certificates()
        .and_then(|c| c.first())
        .ok_or(TlsError::PeerNoCertificate)?;
    let peer = certificate_identity(leaf)?;
    let suite = conn
        .negotiated_cipher_suite()
        .ok_or(TlsError::HandshakeIncomplete)?;
    let cipher = ktls_cipher(suite).ok_or(TlsError::PeerNotTls13(version))?;
    Ok(Negotiated {
        peer,
        suite,
        cipher,
    })
}

/// The kernel's name for a TLS 1.3 suite's AEAD.
pub fn ktls_cipher(suite: SupportedCipherSuite) -> Option<KtlsCipher> {
    use rustls::CipherSuite as C;
    match suite.suite() {
        C::TLS13_AES_128_GCM_SHA256 => Some(KtlsCipher::Aes128Gcm),
        C::TLS13_AES_256_GCM_SHA384 => Some(KtlsCipher::Aes256Gcm),
        C::TLS13_CHACHA20_POLY1305_SHA256 => Some(KtlsCipher::Chacha20Poly1305),
        _ => None,
    }
}

/// Server side: WebPki chain verification, then the SPIFFE rules.
#[derive(Debug)]
struct SpiffeClientVerifier {
    inner: Arc<dyn ClientCertVerifier>,
    trust_domain: String,
}

impl ClientCertVerifier for SpiffeClientVerifier {
    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        self.inner.root_hint_subjects()
    }

    fn client_auth_mandatory(&self) -> bool {
        true
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        self.inner
            .verify_client_cert(end_entity, intermediates, now)?;
        let id = certificate_identity(end_entity)?;
        if id.trust_domain() != self.trust_domain {
            return Err(PeerIdentityError::WrongTrustDomain {
                found: Box::new(id),
                expected: self.trust_domain.clone(),
            }
            .into());
        }
        Ok(ClientCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.inner.supported_verify_schemes()
    }
}

/// Client side: chain to the trust bundle (no name check), then the expected identity.
#[derive(Debug)]
struct SpiffeServerVerifier {
    roots: Arc<RootCertStore>,
    expected: SpiffeId,
    algs: WebPkiSupportedAlgorithms,
}

impl ServerCertVerifier for SpiffeServerVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let parsed = ParsedCertificate::try_from(end_entity)?;
        verify_server_cert_signed_by_trust_anchor(
            &parsed,
            &self.roots,
            intermediates,
            now,
            self.algs.all,
        )?;
        let found = certificate_identity(end_entity)?;
        if found != self.expected {
            return Err(PeerIdentityError::WrongIdentity {
                found: Box::new(found),
                expected: Box::new(self.expected.clone()),
            }
            .into());
        }
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(message, cert, dss, &self.algs)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &self.algs)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.algs.supported_schemes()
    }
}

#[cfg(test)]
mod tests;
