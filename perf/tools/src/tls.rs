//! TLS for the baseline tunnel, as ztunnel configures rustls for HBONE: rustls 0.23 with the
//! `ring` provider, TLS 1.3 only, the AES-GCM suites only, ALPN `h2`, certificates both ways.
//!
//! The server requires a client certificate that chains to the CA bundle (`WebPkiClientVerifier`).
//! The client accepts a server whose chain leads to the CA bundle and does not look at names:
//! mesh certificates (those `ringtun certs` writes) carry a SPIFFE URI SAN and no DNS name.
//! ztunnel instead checks that the URI SAN is the identity it expects for the destination; this
//! baseline only checks the chain, which costs the same per handshake and is enough for a
//! benchmark (it is not an authorization decision).

use std::fs;
use std::path::Path;
use std::sync::Arc;

use anyhow::{bail, Context, Result};
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::client::verify_server_cert_signed_by_trust_anchor;
use rustls::crypto::{verify_tls12_signature, verify_tls13_signature, CryptoProvider};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use rustls::server::{ParsedCertificate, WebPkiClientVerifier};
use rustls::{ClientConfig, DigitallySignedStruct, RootCertStore, ServerConfig, SignatureScheme};

/// The only application protocol HBONE speaks.
pub const ALPN_H2: &[u8] = b"h2";

/// ring, restricted to the TLS 1.3 AES-GCM suites (what ztunnel and ringtun negotiate).
pub fn provider() -> Arc<CryptoProvider> {
    use rustls::crypto::ring::{cipher_suite, default_provider};
    let mut p = default_provider();
    p.cipher_suites = vec![
        cipher_suite::TLS13_AES_128_GCM_SHA256,
        cipher_suite::TLS13_AES_256_GCM_SHA384,
    ];
    Arc::new(p)
}

/// This side's certificate chain and key, and the CAs the peer must chain to.
pub struct Credentials {
    pub chain: Vec<CertificateDer<'static>>,
    pub key: PrivateKeyDer<'static>,
    pub roots: Arc<RootCertStore>,
}

impl Credentials {
    /// Reads PEM files: `cert` (leaf first, then any intermediates), `key` (PKCS#8, PKCS#1 or
    /// SEC1) and `ca` (one or more CA certificates).
    pub fn load(cert: &Path, key: &Path, ca: &Path) -> Result<Self> {
        let chain = read_certs(cert, "--cert")?;
        let key_pem = read(key, "--key")?;
        let key = PrivateKeyDer::from_pem_slice(&key_pem).map_err(|e| {
            anyhow::anyhow!(
                "--key {}: no usable private key (PKCS#8, PKCS#1 or SEC1 PEM): {e}",
                key.display()
            )
        })?;
        let mut roots = RootCertStore::empty();
        for c in read_certs(ca, "--ca")? {
            roots
                .add(c)
                .with_context(|| format!("--ca {}: not a usable CA certificate", ca.display()))?;
        }
        Ok(Self {
            chain,
            key,
            roots: Arc::new(roots),
        })
    }
}

fn read(path: &Path, flag: &str) -> Result<Vec<u8>> {
    fs::read(path).with_context(|| format!("{flag} {}: cannot read", path.display()))
}

fn read_certs(path: &Path, flag: &str) -> Result<Vec<CertificateDer<'static>>> {
    let pem = read(path, flag)?;
    let certs = CertificateDer::pem_slice_iter(&pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| anyhow::anyhow!("{flag} {}: bad PEM: {e}", path.display()))?;
    if certs.is_empty() {
        bail!("{flag} {}: no CERTIFICATE block", path.display());
    }
    Ok(certs)
}

/// The tunnel server's config: presents `creds`, requires a client certificate chaining to
/// `creds.roots`.
pub fn server_config(creds: &Credentials) -> Result<Arc<ServerConfig>> {
    let provider = provider();
    let verifier = WebPkiClientVerifier::builder_with_provider(
        Arc::clone(&creds.roots),
        Arc::clone(&provider),
    )
    .build()
    .context("--ca: cannot build a client certificate verifier")?;
    let mut cfg = ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])
        .context("TLS 1.3 with the ring provider")?
        .with_client_cert_verifier(verifier)
        .with_single_cert(creds.chain.clone(), creds.key.clone_key())
        .context("--cert/--key: the key does not fit the certificate, or is unsupported")?;
    cfg.alpn_protocols = vec![ALPN_H2.to_vec()];
    Ok(Arc::new(cfg))
}

/// The tunnel client's config: presents `creds`, accepts a server chaining to `creds.roots`
/// whatever its name (see the module doc).
pub fn client_config(creds: &Credentials) -> Result<Arc<ClientConfig>> {
    let provider = provider();
    let verifier = ChainOnlyVerifier {
        roots: Arc::clone(&creds.roots),
        provider: Arc::clone(&provider),
    };
    let mut cfg = ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])
        .context("TLS 1.3 with the ring provider")?
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(verifier))
        .with_client_auth_cert(creds.chain.clone(), creds.key.clone_key())
        .context("--cert/--key: the key does not fit the certificate, or is unsupported")?;
    cfg.alpn_protocols = vec![ALPN_H2.to_vec()];
    Ok(Arc::new(cfg))
}

/// Chain to a trust anchor, validity dates and the server-auth usage; no name check.
#[derive(Debug)]
struct ChainOnlyVerifier {
    roots: Arc<RootCertStore>,
    provider: Arc<CryptoProvider>,
}

impl ServerCertVerifier for ChainOnlyVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let cert = ParsedCertificate::try_from(end_entity)?;
        verify_server_cert_signed_by_trust_anchor(
            &cert,
            &self.roots,
            intermediates,
            now,
            self.provider.signature_verification_algorithms.all,
        )?;
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        verify_tls12_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        verify_tls13_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.provider
            .signature_verification_algorithms
            .supported_schemes()
    }
}
