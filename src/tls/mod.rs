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

/// Test fixtures shared with the kTLS tests: a dev CA and credentials for any identity.
#[cfg(test)]
pub(crate) mod fixtures {
    use std::path::Path;
    use std::time::SystemTime;

    use super::*;
    use crate::control_plane::certs::{DevCa, CA_VALIDITY, DEFAULT_LEAF_VALIDITY};

    pub(crate) struct Pki {
        pub ca: DevCa,
        pub bundle: TrustBundle,
    }

    impl Pki {
        pub(crate) fn new(trust_domain: &str) -> Self {
            let ca = DevCa::generate(trust_domain, SystemTime::now(), CA_VALIDITY).expect("ca");
            let bundle = ca.trust_bundle(Path::new("test-ca.pem")).expect("bundle");
            Self { ca, bundle }
        }

        pub(crate) fn creds(&self, id: &str) -> WorkloadCredentials {
            let id = SpiffeId::parse(id).expect("test id");
            self.ca
                .issue(&id, SystemTime::now(), DEFAULT_LEAF_VALIDITY)
                .expect("leaf")
                .credentials(&id)
        }
    }

    pub(crate) const CLIENT: &str = "spiffe://cluster.local/ns/default/sa/client";
    pub(crate) const SERVER: &str = "spiffe://cluster.local/ns/prod/sa/server";

    pub(crate) fn id(s: &str) -> SpiffeId {
        SpiffeId::parse(s).expect("test id")
    }

    /// A client config for `creds` expecting `expected`, and a server config for `server`.
    pub(crate) fn configs(
        pki: &Pki,
        client: &WorkloadCredentials,
        server: &WorkloadCredentials,
        expected: &str,
    ) -> (Arc<ClientConfig>, Arc<ServerConfig>) {
        let client = ClientTls::new(client, &pki.bundle)
            .expect("client tls")
            .config_for(&id(expected))
            .expect("client config");
        let server = server_config(server, &pki.bundle, "cluster.local").expect("server config");
        (client, server)
    }
}

#[cfg(test)]
mod tests {
    use std::time::SystemTime;

    use rcgen::{
        CertificateParams, ExtendedKeyUsagePurpose, Issuer, KeyPair, SanType,
        PKCS_ECDSA_P256_SHA256,
    };
    use rustls::pki_types::{PrivateKeyDer, PrivatePkcs8KeyDer};
    use rustls::{ClientConnection, Connection, ServerConnection};

    use super::fixtures::*;
    use super::*;

    #[derive(Debug)]
    enum Failed {
        Client(rustls::Error),
        Server(rustls::Error),
    }

    /// Moves every pending record from `from` to `to`; true when anything moved.
    fn transfer(from: &mut Connection, to: &mut Connection) -> Result<bool, rustls::Error> {
        let mut moved = false;
        while from.wants_write() {
            let mut buf = Vec::new();
            from.write_tls(&mut buf).expect("write_tls to a Vec");
            let mut rest = &buf[..];
            while !rest.is_empty() {
                to.read_tls(&mut rest).expect("read_tls from a slice");
                to.process_new_packets()?;
            }
            moved = true;
        }
        Ok(moved)
    }

    /// Runs the handshake in memory until neither side has anything to send.
    fn handshake(
        client: ClientConnection,
        server: ServerConnection,
    ) -> (Connection, Connection, Result<(), Failed>) {
        let mut c = Connection::from(client);
        let mut s = Connection::from(server);
        let result = (|| loop {
            // A side that fails still sends its alert; the error is the receiver's.
            let a = transfer(&mut c, &mut s).map_err(Failed::Server)?;
            let b = transfer(&mut s, &mut c).map_err(Failed::Client)?;
            if !a && !b {
                return Ok(());
            }
        })();
        (c, s, result)
    }

    fn connect(client: Arc<ClientConfig>, server: Arc<ServerConfig>) -> ClientServer {
        let c = ClientConnection::new(client, server_name("10.0.0.2".parse().expect("ip")))
            .expect("client connection");
        let s = ServerConnection::new(server).expect("server connection");
        let (c, s, result) = handshake(c, s);
        ClientServer { c, s, result }
    }

    struct ClientServer {
        c: Connection,
        s: Connection,
        result: Result<(), Failed>,
    }

    fn other_error_text(e: &rustls::Error) -> String {
        match e {
            rustls::Error::InvalidCertificate(CertificateError::Other(o)) => o.to_string(),
            other => panic!("expected a certificate error from our verifier, got {other:?}"),
        }
    }

    /// A leaf signed by `pki`'s CA with arbitrary SANs (the generator never makes these).
    fn custom_leaf(pki: &Pki, sans: &[&str]) -> WorkloadCredentials {
        let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).expect("key");
        let mut params = CertificateParams::default();
        params.subject_alt_names = sans
            .iter()
            .map(|s| SanType::URI((*s).try_into().expect("ia5")))
            .collect();
        params.extended_key_usages = vec![
            ExtendedKeyUsagePurpose::ServerAuth,
            ExtendedKeyUsagePurpose::ClientAuth,
        ];
        let issuer = Issuer::from_ca_cert_der(
            pki.ca.cert_der(),
            KeyPair::from_pem(&pki.ca.key_pem()).expect("ca key"),
        )
        .expect("issuer");
        let cert = params.signed_by(&key, &issuer).expect("sign");
        WorkloadCredentials {
            id: id(CLIENT),
            chain: vec![cert.der().clone()],
            key: PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.serialize_der())),
        }
    }

    #[test]
    fn good_handshake_gives_h2_tls13_and_both_identities() {
        let pki = Pki::new("cluster.local");
        let (cc, sc) = configs(&pki, &pki.creds(CLIENT), &pki.creds(SERVER), SERVER);
        let ClientServer { c, s, result } = connect(cc, sc);
        result.expect("handshake");
        let client_view = negotiated(&c).expect("client side");
        let server_view = negotiated(&s).expect("server side");
        assert_eq!(client_view.peer, id(SERVER));
        assert_eq!(server_view.peer, id(CLIENT));
        assert_eq!(c.alpn_protocol(), Some(ALPN_H2));
        assert_eq!(s.protocol_version(), Some(ProtocolVersion::TLSv1_3));
        assert_eq!(client_view.cipher, server_view.cipher);
        assert!(matches!(
            client_view.cipher,
            KtlsCipher::Aes128Gcm | KtlsCipher::Aes256Gcm
        ));
        // Application data flows both ways after the handshake.
        let (mut c, mut s) = (c, s);
        std::io::Write::write_all(&mut c.writer(), b"PRI * HTTP/2.0").expect("write");
        transfer(&mut c, &mut s).expect("transfer");
        let mut got = [0u8; 14];
        std::io::Read::read_exact(&mut s.reader(), &mut got).expect("read");
        assert_eq!(&got, b"PRI * HTTP/2.0");
    }

    #[test]
    fn client_refuses_a_server_with_another_identity() {
        let pki = Pki::new("cluster.local");
        let expected = "spiffe://cluster.local/ns/prod/sa/payments";
        let (cc, sc) = configs(&pki, &pki.creds(CLIENT), &pki.creds(SERVER), expected);
        let ClientServer { result, .. } = connect(cc, sc);
        let Err(Failed::Client(e)) = result else {
            panic!("client must refuse, got {result:?}")
        };
        assert_eq!(
            other_error_text(&e),
            format!("server is {SERVER}, expected {expected}")
        );
    }

    fn server_refusal(pki: &Pki, server_pki: &Pki, client: WorkloadCredentials) -> rustls::Error {
        let server_creds = server_pki.creds(SERVER);
        let cc = ClientTls::new(&client, &server_pki.bundle)
            .expect("client tls")
            .config_for(&id(SERVER))
            .expect("config");
        let sc = server_config(&server_creds, &pki.bundle, "cluster.local").expect("server");
        let ClientServer {
            mut c,
            mut s,
            result,
        } = connect(cc, sc);
        let e = match result {
            Err(Failed::Server(e)) => e,
            other => panic!("server must refuse, got {other:?}"),
        };
        // In TLS 1.3 the client has finished its side already; the server's alert ends it.
        match transfer(&mut s, &mut c) {
            Err(rustls::Error::AlertReceived(_)) => {}
            other => panic!("client must receive the server's alert, got {other:?}"),
        }
        e
    }

    #[test]
    fn server_refuses_a_client_from_another_trust_domain() {
        let pki = Pki::new("cluster.local");
        let e = server_refusal(
            &pki,
            &pki,
            pki.creds("spiffe://evil.org/ns/default/sa/client"),
        );
        assert_eq!(
            other_error_text(&e),
            "spiffe://evil.org/ns/default/sa/client is outside trust domain cluster.local"
        );
    }

    #[test]
    fn server_refuses_a_client_with_two_uri_sans() {
        let pki = Pki::new("cluster.local");
        let two = custom_leaf(
            &pki,
            &[CLIENT, "spiffe://cluster.local/ns/kube-system/sa/admin"],
        );
        let e = server_refusal(&pki, &pki, two);
        assert!(other_error_text(&e).contains("2 URI SANs"), "{e}");
        let none = custom_leaf(&pki, &[]);
        let e = server_refusal(&pki, &pki, none);
        assert!(other_error_text(&e).starts_with("no URI SAN"), "{e}");
        let not_spiffe = custom_leaf(&pki, &["https://cluster.local/ns/default/sa/client"]);
        let e = server_refusal(&pki, &pki, not_spiffe);
        assert!(other_error_text(&e).contains("not a mesh identity"), "{e}");
    }

    #[test]
    fn server_refuses_a_chain_to_another_ca() {
        let pki = Pki::new("cluster.local");
        // Same identity, same trust domain, signed by an impostor CA with the trusted CA's
        // very name: the issuer is found by name and its signature does not verify.
        let impostor = Pki::new("cluster.local");
        let e = server_refusal(&pki, &pki, impostor.creds(CLIENT));
        assert_eq!(
            e,
            rustls::Error::InvalidCertificate(CertificateError::BadSignature)
        );
        // A CA with another name: no issuer at all.
        let stranger = Pki::new("elsewhere.example");
        let e = server_refusal(&pki, &pki, stranger.creds(CLIENT));
        assert_eq!(
            e,
            rustls::Error::InvalidCertificate(CertificateError::UnknownIssuer)
        );
    }

    #[test]
    fn server_refuses_a_client_without_a_certificate() {
        let pki = Pki::new("cluster.local");
        let verifier = SpiffeServerVerifier {
            roots: pki.bundle.roots(),
            expected: id(SERVER),
            algs: provider().signature_verification_algorithms,
        };
        let cc = ClientConfig::builder_with_provider(provider())
            .with_protocol_versions(&[&rustls::version::TLS13])
            .expect("versions")
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(verifier))
            .with_no_client_auth();
        let sc = server_config(&pki.creds(SERVER), &pki.bundle, "cluster.local").expect("server");
        let ClientServer { result, .. } = connect(Arc::new(cc), sc);
        match result {
            Err(Failed::Server(e)) => assert_eq!(e, rustls::Error::NoCertificatesPresented),
            other => panic!("server must refuse, got {other:?}"),
        }
    }

    #[test]
    fn server_refuses_a_tls12_only_client() {
        let pki = Pki::new("cluster.local");
        let mut tls12 = rustls::crypto::ring::default_provider();
        tls12
            .cipher_suites
            .retain(|s| s.version() == &rustls::version::TLS12);
        let verifier = SpiffeServerVerifier {
            roots: pki.bundle.roots(),
            expected: id(SERVER),
            algs: provider().signature_verification_algorithms,
        };
        let creds = pki.creds(CLIENT);
        let mut cc = ClientConfig::builder_with_provider(Arc::new(tls12))
            .with_protocol_versions(&[&rustls::version::TLS12])
            .expect("tls12 versions (dev-dependency enables rustls' tls12 feature)")
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(verifier))
            .with_client_auth_cert(creds.chain.clone(), creds.key.clone_key())
            .expect("client cert");
        cc.alpn_protocols = vec![ALPN_H2.to_vec()];
        let sc = server_config(&pki.creds(SERVER), &pki.bundle, "cluster.local").expect("server");
        let ClientServer { result, .. } = connect(Arc::new(cc), sc);
        match result {
            Err(Failed::Server(rustls::Error::PeerIncompatible(_))) => {}
            other => panic!("server must refuse TLS 1.2, got {other:?}"),
        }
    }

    #[test]
    fn server_refuses_a_client_without_h2() {
        let pki = Pki::new("cluster.local");
        let tls = ClientTls::new(&pki.creds(CLIENT), &pki.bundle).expect("client");
        let mut cc = (*tls.config_for(&id(SERVER)).expect("config")).clone();
        cc.alpn_protocols = vec![b"http/1.1".to_vec()];
        let sc = server_config(&pki.creds(SERVER), &pki.bundle, "cluster.local").expect("server");
        let ClientServer { result, .. } = connect(Arc::new(cc), sc);
        assert!(
            matches!(
                result,
                Err(Failed::Server(rustls::Error::NoApplicationProtocol))
            ),
            "{result:?}"
        );
        // A client offering no ALPN at all completes TLS, but `negotiated` refuses the tunnel.
        let mut cc = (*tls.config_for(&id(SERVER)).expect("config")).clone();
        cc.alpn_protocols = Vec::new();
        let sc = server_config(&pki.creds(SERVER), &pki.bundle, "cluster.local").expect("server");
        let ClientServer { s, result, .. } = connect(Arc::new(cc), sc);
        result.expect("handshake without ALPN");
        assert!(matches!(negotiated(&s), Err(TlsError::PeerNoH2)));
    }

    #[test]
    fn expired_leaf_is_refused() {
        let pki = Pki::new("cluster.local");
        let old = SystemTime::now() - std::time::Duration::from_secs(3 * 24 * 3600);
        let expired = pki
            .ca
            .issue(&id(CLIENT), old, std::time::Duration::from_secs(3600))
            .expect("leaf")
            .credentials(&id(CLIENT));
        let e = server_refusal(&pki, &pki, expired);
        assert!(
            matches!(
                e,
                rustls::Error::InvalidCertificate(CertificateError::ExpiredContext { .. })
                    | rustls::Error::InvalidCertificate(CertificateError::Expired)
            ),
            "{e:?}"
        );
    }
}
