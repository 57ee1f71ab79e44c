//! Workload certificates on disk: loading the trust bundle and each local identity's certificate
//! chain and key from PEM files (the layout `node.tls` names), and the development CA behind
//! `ringtun certs`, which issues the short-lived ECDSA P-256 certificates a config needs, each
//! with exactly one URI SAN: its SPIFFE ID.
//!
//! Boundary: this module reads and writes files and makes keys; it never configures TLS (see
//! `tls`, which builds rustls configs from what is loaded here). Every error names
//! the file it concerns. The development CA is for demos and tests, not production: a real mesh
//! gets its certificates from its CA (istiod, SPIRE) into the same layout.

use std::fs::{self, OpenOptions};
use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    Issuer, KeyPair, KeyUsagePurpose, SanType, PKCS_ECDSA_P256_SHA256,
};
use rustls::RootCertStore;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};

use super::config::{Config, NodeCaSettings};
use super::identity::{IdentityError, SpiffeId};

/// File names inside `<certificate_dir>/<ns>/<sa>/`.
pub const CERT_FILE: &str = "cert.pem";
pub const KEY_FILE: &str = "key.pem";
/// The development CA's files inside the output directory.
pub const CA_CERT_FILE: &str = "ca.pem";
pub const CA_KEY_FILE: &str = "ca-key.pem";
/// Default lifetime of a workload certificate `ringtun certs` issues (Istio's default too).
pub const DEFAULT_LEAF_VALIDITY: Duration = Duration::from_secs(24 * 3600);
/// Lifetime of a new development CA.
pub const CA_VALIDITY: Duration = Duration::from_secs(365 * 24 * 3600);
/// Certificates start this much before "now" so peers with slightly slow clocks accept them.
const CLOCK_SKEW: Duration = Duration::from_secs(300);

/// What went wrong with certificate files; every variant names the file.
#[derive(Debug, thiserror::Error)]
pub enum CertError {
    #[error("{}: cannot read: {source}", path.display())]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{}: cannot write: {source}", path.display())]
    Write {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{}: not valid PEM: {detail}", path.display())]
    Pem { path: PathBuf, detail: String },
    #[error("{}: contains no CERTIFICATE section", path.display())]
    NoCertificate { path: PathBuf },
    #[error("{}: contains no PRIVATE KEY section (PKCS#8, SEC1 or PKCS#1)", path.display())]
    NoKey { path: PathBuf },
    #[error("{}: certificate is not usable: {detail}", path.display())]
    BadCertificate { path: PathBuf, detail: String },
    #[error("{}: certificate is for {found}, but the file belongs to {expected}", path.display())]
    WrongIdentity {
        path: PathBuf,
        expected: SpiffeId,
        found: String,
    },
    #[error(
        "{}: a CA key exists but its certificate {} is missing or unreadable; refusing to \
         replace the key (move both away to make a new CA)",
        key.display(), cert.display()
    )]
    CaKeyWithoutCert { key: PathBuf, cert: PathBuf },
    #[error(
        "{}: a CA certificate exists without its key {}; refusing to overwrite it (move it away \
         to make a new CA)",
        cert.display(), key.display()
    )]
    CaCertWithoutKey { cert: PathBuf, key: PathBuf },
    #[error(
        "{}: the CA expires {ca_expires} (in {}), before a certificate valid {} would; \
         choose a shorter --validity, or move the CA away to make a new one",
        ca.display(),
        super::config::format_duration(*.ca_left),
        super::config::format_duration(*.validity)
    )]
    OutlivesCa {
        ca: PathBuf,
        ca_expires: String,
        ca_left: Duration,
        validity: Duration,
    },
    #[error("workload {workload}: {source}")]
    Identity {
        workload: String,
        source: IdentityError,
    },
    #[error("certificate generation failed: {0}")]
    Generate(#[from] rcgen::Error),
    #[error("the CA key is not the key of the CA certificate")]
    CaKeyMismatch,
    #[error(
        "the CA allows no CA below it (pathLenConstraint 0, made by an older `ringtun certs`); \
         move its ca.pem and ca-key.pem away to make a new one"
    )]
    NoRoomForIntermediate,
}

/// The CA certificates a peer's chain must lead to, with the file they came from.
#[derive(Clone, Debug)]
pub struct TrustBundle {
    roots: Arc<RootCertStore>,
    source: PathBuf,
}

impl TrustBundle {
    /// Builds a bundle from DER certificates; `source` names where they came from in errors.
    ///
    /// # Errors
    /// No certificate, or one rustls cannot use as a trust anchor.
    pub fn from_certs(certs: &[CertificateDer<'_>], source: &Path) -> Result<Self, CertError> {
        if certs.is_empty() {
            return Err(CertError::NoCertificate {
                path: source.to_path_buf(),
            });
        }
        let mut roots = RootCertStore::empty();
        for cert in certs {
            roots
                .add(cert.clone().into_owned())
                .map_err(|e| CertError::BadCertificate {
                    path: source.to_path_buf(),
                    detail: e.to_string(),
                })?;
        }
        Ok(Self {
            roots: Arc::new(roots),
            source: source.to_path_buf(),
        })
    }

    pub fn roots(&self) -> Arc<RootCertStore> {
        Arc::clone(&self.roots)
    }

    pub fn source(&self) -> &Path {
        &self.source
    }

    pub fn len(&self) -> usize {
        self.roots.len()
    }

    pub fn is_empty(&self) -> bool {
        self.roots.is_empty()
    }
}

/// One workload identity's certificate chain (leaf first) and private key.
#[derive(Debug)]
pub struct WorkloadCredentials {
    pub id: SpiffeId,
    pub chain: Vec<CertificateDer<'static>>,
    pub key: PrivateKeyDer<'static>,
}

impl Clone for WorkloadCredentials {
    fn clone(&self) -> Self {
        Self {
            id: self.id.clone(),
            chain: self.chain.clone(),
            key: self.key.clone_key(),
        }
    }
}

/// `<dir>/<ns>/<sa>/`: where the certificate and key of `id` live.
pub fn identity_dir(certificate_dir: &Path, id: &SpiffeId) -> PathBuf {
    certificate_dir
        .join(id.namespace())
        .join(id.service_account())
}

fn read(path: &Path) -> Result<Vec<u8>, CertError> {
    fs::read(path).map_err(|source| CertError::Read {
        path: path.to_path_buf(),
        source,
    })
}

fn pem_error(path: &Path, e: rustls_pki_types::pem::Error) -> CertError {
    CertError::Pem {
        path: path.to_path_buf(),
        detail: e.to_string(),
    }
}

/// Every CERTIFICATE section of a PEM file, in order (other sections are skipped).
pub fn read_certificates(path: &Path) -> Result<Vec<CertificateDer<'static>>, CertError> {
    let bytes = read(path)?;
    let certs = CertificateDer::pem_slice_iter(&bytes)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| pem_error(path, e))?;
    if certs.is_empty() {
        return Err(CertError::NoCertificate {
            path: path.to_path_buf(),
        });
    }
    Ok(certs)
}

/// Loads the trust bundle (one or more CA certificates in PEM).
pub fn load_trust_bundle(path: &Path) -> Result<TrustBundle, CertError> {
    TrustBundle::from_certs(&read_certificates(path)?, path)
}

/// Loads `<dir>/<ns>/<sa>/cert.pem` and `key.pem` and checks the leaf is `id`'s certificate.
pub fn load_workload_credentials(
    certificate_dir: &Path,
    id: &SpiffeId,
) -> Result<WorkloadCredentials, CertError> {
    let dir = identity_dir(certificate_dir, id);
    let cert_path = dir.join(CERT_FILE);
    let key_path = dir.join(KEY_FILE);
    let chain = read_certificates(&cert_path)?;
    let found = spiffe_uri_san(&chain[0]).map_err(|detail| CertError::BadCertificate {
        path: cert_path.clone(),
        detail,
    })?;
    if found != id.to_uri() {
        return Err(CertError::WrongIdentity {
            path: cert_path,
            expected: id.clone(),
            found,
        });
    }
    let key_bytes = read(&key_path)?;
    let key = PrivateKeyDer::from_pem_slice(&key_bytes).map_err(|e| match e {
        rustls_pki_types::pem::Error::NoItemsFound => CertError::NoKey {
            path: key_path.clone(),
        },
        other => pem_error(&key_path, other),
    })?;
    Ok(WorkloadCredentials {
        id: id.clone(),
        chain,
        key,
    })
}

/// The URI SANs of a DER certificate, in order.
///
/// # Errors
/// The certificate or its SAN extension does not parse.
pub fn uri_sans(cert: &CertificateDer<'_>) -> Result<Vec<String>, String> {
    let (rest, parsed) = x509_parser::parse_x509_certificate(cert.as_ref())
        .map_err(|e| format!("not an X.509 certificate: {e}"))?;
    if !rest.is_empty() {
        return Err("trailing bytes after the certificate".into());
    }
    let san = parsed
        .subject_alternative_name()
        .map_err(|e| format!("bad subjectAltName extension: {e}"))?;
    Ok(san
        .map(|ext| {
            ext.value
                .general_names
                .iter()
                .filter_map(|name| match name {
                    x509_parser::extensions::GeneralName::URI(uri) => Some((*uri).to_string()),
                    _ => None,
                })
                .collect()
        })
        .unwrap_or_default())
}

/// The single URI SAN of a workload certificate (SPIFFE X.509-SVID: exactly one URI SAN; other
/// SAN types are allowed and ignored).
///
/// # Errors
/// No URI SAN, more than one, or an unparseable certificate.
pub fn spiffe_uri_san(cert: &CertificateDer<'_>) -> Result<String, String> {
    let mut uris = uri_sans(cert)?;
    match uris.len() {
        1 => Ok(uris.remove(0)),
        0 => Err("no URI SAN; a workload certificate carries its SPIFFE ID as one URI SAN".into()),
        n => Err(format!(
            "{n} URI SANs ({}); a workload certificate must have exactly one",
            uris.join(", ")
        )),
    }
}

/// A certificate time (notBefore, notAfter) as a `SystemTime`; a time before 1970 is as
/// unusable as 1970 itself, so it is clamped rather than wrapped.
pub fn asn1_time(t: x509_parser::time::ASN1Time) -> SystemTime {
    SystemTime::UNIX_EPOCH + Duration::from_secs(u64::try_from(t.timestamp()).unwrap_or(0))
}

/// A certificate and key as issued, DER and PEM.
pub struct IssuedCert {
    pub cert_der: CertificateDer<'static>,
    pub cert_pem: String,
    pub key_der: PrivatePkcs8KeyDer<'static>,
    pub key_pem: String,
}

impl IssuedCert {
    /// The chain (this leaf only; the dev CA issues directly) and key, as TLS wants them.
    pub fn credentials(&self, id: &SpiffeId) -> WorkloadCredentials {
        WorkloadCredentials {
            id: id.clone(),
            chain: vec![self.cert_der.clone()],
            key: PrivateKeyDer::Pkcs8(self.key_der.clone_key()),
        }
    }
}

/// A development CA: an ECDSA P-256 root that signs workload certificates directly.
pub struct DevCa {
    issuer: Issuer<'static, KeyPair>,
    cert_der: CertificateDer<'static>,
    cert_pem: String,
}

fn offset_time(t: SystemTime) -> time::OffsetDateTime {
    time::OffsetDateTime::from(t)
}

impl DevCa {
    /// A new CA named after `trust_domain`, valid from a little before `now` for `validity`.
    pub fn generate(
        trust_domain: &str,
        now: SystemTime,
        validity: Duration,
    ) -> Result<Self, CertError> {
        let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256)?;
        let mut params = CertificateParams::default();
        let mut dn = DistinguishedName::new();
        dn.push(DnType::OrganizationName, trust_domain);
        dn.push(DnType::CommonName, "ringtun development CA");
        params.distinguished_name = dn;
        // One CA may sit below: the node CA `ringtun certs` makes for node CA mode.
        params.is_ca = IsCa::Ca(BasicConstraints::Constrained(1));
        params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        params.not_before = offset_time(now - CLOCK_SKEW);
        params.not_after = offset_time(now + validity);
        let cert = params.self_signed(&key)?;
        Ok(Self {
            cert_der: cert.der().clone(),
            cert_pem: cert.pem(),
            issuer: Issuer::new(params, key),
        })
    }

    /// An existing CA from its certificate and PKCS#8 key in PEM.
    pub fn from_pem(cert_pem: &str, key_pem: &str) -> Result<Self, CertError> {
        let cert_der = CertificateDer::from_pem_slice(cert_pem.as_bytes())
            .map_err(|_| CertError::Generate(rcgen::Error::CouldNotParseCertificate))?;
        Self::from_der(cert_der, cert_pem, key_pem)
    }

    /// An existing CA from its certificate (DER, and the PEM text it came in) and PKCS#8 key
    /// in PEM. The key must be the certificate's: a CA that signed with another key would
    /// issue certificates no peer can verify.
    pub fn from_der(
        cert_der: CertificateDer<'static>,
        cert_pem: &str,
        key_pem: &str,
    ) -> Result<Self, CertError> {
        let key = KeyPair::from_pem(key_pem)?;
        let (_, parsed) = x509_parser::parse_x509_certificate(cert_der.as_ref())
            .map_err(|_| CertError::Generate(rcgen::Error::CouldNotParseCertificate))?;
        if parsed.public_key().subject_public_key.data.as_ref() != key.public_key_raw() {
            return Err(CertError::CaKeyMismatch);
        }
        let issuer = Issuer::from_ca_cert_der(&cert_der, key)?;
        Ok(Self {
            issuer,
            cert_der,
            cert_pem: cert_pem.to_string(),
        })
    }

    /// A node CA under this one for node CA mode: path length 0 (it signs workload
    /// certificates only), valid from a little before `now` for `validity`, which this CA
    /// must outlive.
    pub fn issue_intermediate(
        &self,
        name: &str,
        now: SystemTime,
        validity: Duration,
    ) -> Result<IssuedCert, CertError> {
        let (_, parsed) = x509_parser::parse_x509_certificate(self.cert_der.as_ref())
            .map_err(|_| CertError::Generate(rcgen::Error::CouldNotParseCertificate))?;
        if let Ok(Some(bc)) = parsed.basic_constraints() {
            if bc.value.path_len_constraint == Some(0) {
                return Err(CertError::NoRoomForIntermediate);
            }
        }
        let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256)?;
        let mut params = CertificateParams::default();
        let mut dn = DistinguishedName::new();
        dn.push(DnType::CommonName, format!("ringtun node CA {name}"));
        params.distinguished_name = dn;
        params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
        params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        params.use_authority_key_identifier_extension = true;
        params.not_before = offset_time(now - CLOCK_SKEW);
        params.not_after = offset_time(now + validity);
        self.sign(&params, key)
    }

    /// `params` signed by this CA for `key`, which is handed out with it.
    fn sign(&self, params: &CertificateParams, key: KeyPair) -> Result<IssuedCert, CertError> {
        let cert = params.signed_by(&key, &self.issuer)?;
        Ok(IssuedCert {
            cert_der: cert.der().clone(),
            cert_pem: cert.pem(),
            key_der: PrivatePkcs8KeyDer::from(key.serialize_der()),
            key_pem: key.serialize_pem(),
        })
    }

    pub fn cert_der(&self) -> &CertificateDer<'static> {
        &self.cert_der
    }

    /// When the CA certificate expires.
    pub fn not_after(&self) -> Result<SystemTime, String> {
        let (_, cert) = x509_parser::parse_x509_certificate(&self.cert_der)
            .map_err(|e| format!("cannot parse the CA certificate: {e}"))?;
        let secs = cert.validity().not_after.timestamp();
        u64::try_from(secs)
            .map(|s| std::time::UNIX_EPOCH + Duration::from_secs(s))
            .map_err(|_| "the CA certificate expires before 1970".to_string())
    }

    pub fn cert_pem(&self) -> &str {
        &self.cert_pem
    }

    pub fn key_pem(&self) -> String {
        self.issuer.key().serialize_pem()
    }

    /// This CA as a trust bundle (in memory; `label` stands for its file in errors).
    pub fn trust_bundle(&self, label: &Path) -> Result<TrustBundle, CertError> {
        TrustBundle::from_certs(std::slice::from_ref(&self.cert_der), label)
    }

    /// A workload certificate for `id`: ECDSA P-256, exactly one URI SAN (the SPIFFE ID), usable
    /// as TLS client and server, valid from a little before `now` for `validity`.
    pub fn issue(
        &self,
        id: &SpiffeId,
        now: SystemTime,
        validity: Duration,
    ) -> Result<IssuedCert, CertError> {
        let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256)?;
        self.sign(&workload_params(id, now, validity)?, key)
    }

    /// A workload certificate for `id` on the key of a PEM certificate signing request, as an
    /// Istio CA answers one: the request's signature is checked, its names are ignored (the
    /// certificate carries `id`). Returns the certificate's PEM (the key stays with the
    /// requester).
    pub fn sign_request(
        &self,
        csr_pem: &str,
        id: &SpiffeId,
        now: SystemTime,
        validity: Duration,
    ) -> Result<String, CertError> {
        let csr = rcgen::CertificateSigningRequestParams::from_pem(csr_pem)?;
        let cert = workload_params(id, now, validity)?.signed_by(&csr.public_key, &self.issuer)?;
        Ok(cert.pem())
    }
}

/// What a workload certificate for `id` says: exactly one URI SAN (the SPIFFE ID), usable as
/// TLS client and server, valid from a little before `now` for `validity`.
fn workload_params(
    id: &SpiffeId,
    now: SystemTime,
    validity: Duration,
) -> Result<CertificateParams, CertError> {
    let mut params = CertificateParams::default();
    let mut dn = DistinguishedName::new();
    dn.push(DnType::OrganizationName, id.trust_domain());
    params.distinguished_name = dn;
    params.subject_alt_names = vec![SanType::URI(id.to_uri().try_into()?)];
    params.is_ca = IsCa::ExplicitNoCa;
    params.key_usages = vec![
        KeyUsagePurpose::DigitalSignature,
        KeyUsagePurpose::KeyEncipherment,
    ];
    params.extended_key_usages = vec![
        ExtendedKeyUsagePurpose::ServerAuth,
        ExtendedKeyUsagePurpose::ClientAuth,
    ];
    params.use_authority_key_identifier_extension = true;
    params.not_before = offset_time(now - CLOCK_SKEW);
    params.not_after = offset_time(now + validity);
    Ok(params)
}

/// Every distinct workload identity of a config, in config order.
pub fn config_identities(config: &Config) -> Result<Vec<SpiffeId>, CertError> {
    let mut ids: Vec<SpiffeId> = Vec::new();
    for w in &config.workloads {
        let id = SpiffeId::new(&config.node.trust_domain, &w.namespace, &w.service_account)
            .map_err(|source| CertError::Identity {
                workload: format!("{}/{}", w.namespace, w.name),
                source,
            })?;
        if !ids.contains(&id) {
            ids.push(id);
        }
    }
    Ok(ids)
}

/// What [`write_dev_certificates`] did, one line per file, for the operator.
#[derive(Debug, Default)]
pub struct CertsReport {
    pub lines: Vec<String>,
}

/// Where `ringtun certs` writes: the certificate directory and the trust bundle file.
#[derive(Debug, Clone)]
pub struct CertsLayout {
    pub certificate_dir: PathBuf,
    pub trust_bundle: PathBuf,
}

/// Creates (or reuses) the development CA in `layout.certificate_dir` and issues a certificate
/// for every workload identity of `config`, writing the layout `node.tls` expects. An existing
/// CA is reused; a CA key is never replaced.
pub fn write_dev_certificates(
    config: &Config,
    layout: &CertsLayout,
    now: SystemTime,
    validity: Duration,
) -> Result<CertsReport, CertError> {
    let ids = config_identities(config)?;
    let mut report = CertsReport::default();
    let ca = dev_ca(config, layout, now, validity, &mut report)?;
    let dir = &layout.certificate_dir;
    for id in &ids {
        let issued = ca.issue(id, now, validity)?;
        let idir = identity_dir(dir, id);
        create_dir(&idir)?;
        let key_path = idir.join(KEY_FILE);
        let cert_path = idir.join(CERT_FILE);
        write_file(&key_path, issued.key_pem.as_bytes(), 0o600, false)?;
        write_file(&cert_path, issued.cert_pem.as_bytes(), 0o644, false)?;
        report.lines.push(format!(
            "wrote {} and {} ({id}, valid {})",
            cert_path.display(),
            key_path.display(),
            super::config::format_duration(validity)
        ));
    }
    Ok(report)
}

/// Node CA mode's files from the development CA: creates (or reuses) the CA in
/// `layout.certificate_dir`, writes the trust bundle, and issues a node CA (an intermediate,
/// path length 0, valid `validity`) for `config`'s node into `node_ca.certificate` (the node
/// CA, then the root) and `node_ca.key`. The node issues its workloads' certificates itself.
pub fn write_node_ca(
    config: &Config,
    layout: &CertsLayout,
    node_ca: &NodeCaSettings,
    now: SystemTime,
    validity: Duration,
) -> Result<CertsReport, CertError> {
    let mut report = CertsReport::default();
    let ca = dev_ca(config, layout, now, validity, &mut report)?;
    let issued = ca.issue_intermediate(&config.node.name, now, validity)?;
    for file in [&node_ca.certificate, &node_ca.key] {
        if let Some(parent) = file.parent().filter(|p| !p.as_os_str().is_empty()) {
            create_dir(parent)?;
        }
    }
    write_file(&node_ca.key, issued.key_pem.as_bytes(), 0o600, false)?;
    let chain = format!("{}{}", issued.cert_pem, ca.cert_pem());
    write_file(&node_ca.certificate, chain.as_bytes(), 0o644, false)?;
    report.lines.push(format!(
        "wrote {} and {} (node CA for node {}, valid {}; the node issues its workloads' \
         certificates)",
        node_ca.certificate.display(),
        node_ca.key.display(),
        config.node.name,
        super::config::format_duration(validity)
    ));
    Ok(report)
}

/// The development CA of `layout` (made if absent, never replacing a key), with the trust
/// bundle written, refusing `validity` when the CA would not outlive it.
fn dev_ca(
    config: &Config,
    layout: &CertsLayout,
    now: SystemTime,
    validity: Duration,
    report: &mut CertsReport,
) -> Result<DevCa, CertError> {
    let dir = &layout.certificate_dir;
    create_dir(dir)?;
    let ca_cert_path = dir.join(CA_CERT_FILE);
    let ca_key_path = dir.join(CA_KEY_FILE);
    let ca = match (ca_cert_path.exists(), ca_key_path.exists()) {
        (true, true) => {
            let cert = read_string(&ca_cert_path)?;
            let key = read_string(&ca_key_path)?;
            let ca = DevCa::from_pem(&cert, &key).map_err(|e| CertError::BadCertificate {
                path: ca_cert_path.clone(),
                detail: format!("cannot reuse the CA with {}: {e}", ca_key_path.display()),
            })?;
            report
                .lines
                .push(format!("using existing CA {}", ca_cert_path.display()));
            ca
        }
        (false, true) => {
            return Err(CertError::CaKeyWithoutCert {
                key: ca_key_path,
                cert: ca_cert_path,
            })
        }
        (true, false) => {
            return Err(CertError::CaCertWithoutKey {
                cert: ca_cert_path,
                key: ca_key_path,
            })
        }
        (false, false) => {
            let ca = DevCa::generate(&config.node.trust_domain, now, CA_VALIDITY)?;
            // create_new: if another process made a key meanwhile, fail rather than replace it.
            write_file(&ca_key_path, ca.key_pem().as_bytes(), 0o600, true)?;
            write_file(&ca_cert_path, ca.cert_pem().as_bytes(), 0o644, true)?;
            report.lines.push(format!(
                "wrote {} and {} (new development CA for {})",
                ca_cert_path.display(),
                ca_key_path.display(),
                config.node.trust_domain
            ));
            ca
        }
    };
    if layout.trust_bundle != ca_cert_path {
        if let Some(parent) = layout.trust_bundle.parent() {
            create_dir(parent)?;
        }
        write_file(&layout.trust_bundle, ca.cert_pem().as_bytes(), 0o644, false)?;
        report.lines.push(format!(
            "wrote {} (trust bundle)",
            layout.trust_bundle.display()
        ));
    }
    // A workload certificate the CA does not outlive would stop verifying when the CA
    // expires, halfway through its stated lifetime: refuse before writing any.
    let ca_not_after = ca.not_after().map_err(|detail| CertError::BadCertificate {
        path: ca_cert_path.clone(),
        detail,
    })?;
    if now + validity > ca_not_after {
        return Err(CertError::OutlivesCa {
            ca: ca_cert_path,
            ca_expires: crate::observability::logging::rfc3339(ca_not_after),
            ca_left: ca_not_after
                .duration_since(now)
                .map(|d| Duration::from_secs(d.as_secs()))
                .unwrap_or_default(),
            validity,
        });
    }
    Ok(ca)
}

fn read_string(path: &Path) -> Result<String, CertError> {
    fs::read_to_string(path).map_err(|source| CertError::Read {
        path: path.to_path_buf(),
        source,
    })
}

fn create_dir(dir: &Path) -> Result<(), CertError> {
    fs::create_dir_all(dir).map_err(|source| CertError::Write {
        path: dir.to_path_buf(),
        source,
    })
}

/// Writes `bytes` to `path` with `mode`. `create_new` refuses an existing file; otherwise the
/// file is written beside and renamed over, so a reader never sees half a key and the mode is
/// right from the first byte.
fn write_file(path: &Path, bytes: &[u8], mode: u32, create_new: bool) -> Result<(), CertError> {
    let err = |source| CertError::Write {
        path: path.to_path_buf(),
        source,
    };
    let target = if create_new {
        path.to_path_buf()
    } else {
        let mut name = path.file_name().unwrap_or_default().to_os_string();
        name.push(".tmp");
        path.with_file_name(name)
    };
    if !create_new {
        // A stale temporary from an interrupted run would keep its old mode.
        let _ = fs::remove_file(&target);
    }
    let mut f = OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(mode)
        .open(&target)
        .map_err(err)?;
    f.write_all(bytes).map_err(err)?;
    f.sync_all().map_err(err)?;
    if !create_new {
        fs::rename(&target, path).map_err(err)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    fn temp_dir(tag: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!(
            "ringtun-certs-{tag}-{}-{:?}",
            std::process::id(),
            std::thread::current().id()
        ));
        let _ = fs::remove_dir_all(&dir);
        fs::create_dir_all(&dir).expect("temp dir");
        dir
    }

    fn config(td: &str) -> Config {
        let text = format!(
            "version: 1\nnode:\n  name: n\n  trust_domain: {td}\nworkloads:\n  \
             - {{name: a, namespace: default, service_account: client, ips: [10.0.0.1], node: n}}\n  \
             - {{name: b, namespace: prod, ips: [10.0.0.2], node: m}}\n  \
             - {{name: c, namespace: prod, ips: [10.0.0.3], node: m}}\n"
        );
        super::super::config::load(&text).expect("valid config")
    }

    fn mode(path: &Path) -> u32 {
        fs::metadata(path).expect("stat").permissions().mode() & 0o777
    }

    #[test]
    fn issued_leaf_has_exactly_its_spiffe_id_as_uri_san() {
        let ca = DevCa::generate("example.org", SystemTime::now(), CA_VALIDITY).expect("ca");
        let id = SpiffeId::parse("spiffe://example.org/ns/prod/sa/web").expect("id");
        let leaf = ca
            .issue(&id, SystemTime::now(), DEFAULT_LEAF_VALIDITY)
            .expect("leaf");
        assert_eq!(uri_sans(&leaf.cert_der), Ok(vec![id.to_uri()]));
        let (_, parsed) = x509_parser::parse_x509_certificate(&leaf.cert_der).expect("parse");
        let lifetime =
            parsed.validity().not_after.timestamp() - parsed.validity().not_before.timestamp();
        assert_eq!(
            lifetime,
            (DEFAULT_LEAF_VALIDITY + CLOCK_SKEW).as_secs() as i64
        );
        assert!(!parsed.is_ca());
        assert_eq!(uri_sans(ca.cert_der()), Ok(vec![]));
    }

    #[test]
    fn certs_writes_the_layout_and_reuses_the_ca() {
        let dir = temp_dir("layout");
        let cfg = config("example.org");
        let layout = CertsLayout {
            certificate_dir: dir.join("certs"),
            trust_bundle: dir.join("bundle/trust.pem"),
        };
        let report =
            write_dev_certificates(&cfg, &layout, SystemTime::now(), DEFAULT_LEAF_VALIDITY)
                .expect("certs");
        // CA, bundle, and two identities (b and c share prod/default).
        assert_eq!(report.lines.len(), 4, "{:?}", report.lines);
        assert!(report.lines[0].contains("new development CA"));
        let ca_key = layout.certificate_dir.join(CA_KEY_FILE);
        assert_eq!(mode(&ca_key), 0o600);
        let bundle = load_trust_bundle(&layout.trust_bundle).expect("bundle");
        assert_eq!(bundle.len(), 1);
        for (ns, sa) in [("default", "client"), ("prod", "default")] {
            let id = SpiffeId::new("example.org", ns, sa).expect("id");
            let creds = load_workload_credentials(&layout.certificate_dir, &id).expect("creds");
            assert_eq!(creds.chain.len(), 1);
            let key_path = identity_dir(&layout.certificate_dir, &id).join(KEY_FILE);
            assert_eq!(mode(&key_path), 0o600);
        }
        // A second run keeps the CA (same bytes) and re-issues the leaves.
        let ca_before = fs::read(layout.certificate_dir.join(CA_CERT_FILE)).expect("ca");
        let key_before = fs::read(&ca_key).expect("key");
        let report =
            write_dev_certificates(&cfg, &layout, SystemTime::now(), DEFAULT_LEAF_VALIDITY)
                .expect("certs again");
        assert!(
            report.lines[0].starts_with("using existing CA"),
            "{:?}",
            report.lines
        );
        assert_eq!(fs::read(&ca_key).expect("key"), key_before);
        assert_eq!(
            fs::read(layout.certificate_dir.join(CA_CERT_FILE)).expect("ca"),
            ca_before
        );
        let _ = fs::remove_dir_all(&dir);
    }

    #[test]
    fn a_ca_key_without_its_certificate_is_never_replaced() {
        let dir = temp_dir("orphan");
        let layout = CertsLayout {
            certificate_dir: dir.clone(),
            trust_bundle: dir.join(CA_CERT_FILE),
        };
        fs::write(dir.join(CA_KEY_FILE), "precious").expect("write");
        let err = write_dev_certificates(
            &config("td"),
            &layout,
            SystemTime::now(),
            DEFAULT_LEAF_VALIDITY,
        )
        .expect_err("refused");
        assert!(matches!(err, CertError::CaKeyWithoutCert { .. }), "{err}");
        assert!(
            err.to_string().contains("refusing to replace the key"),
            "{err}"
        );
        assert_eq!(
            fs::read_to_string(dir.join(CA_KEY_FILE)).expect("key"),
            "precious"
        );
        let _ = fs::remove_dir_all(&dir);
    }

    #[test]
    fn load_errors_name_the_file_and_the_problem() {
        let dir = temp_dir("errors");
        let missing = dir.join("nope.pem");
        let err = load_trust_bundle(&missing).expect_err("missing");
        assert!(err
            .to_string()
            .starts_with(&format!("{}: cannot read", missing.display())));

        let empty = dir.join("empty.pem");
        fs::write(&empty, "no pem here\n").expect("write");
        let err = load_trust_bundle(&empty).expect_err("empty");
        assert_eq!(
            err.to_string(),
            format!("{}: contains no CERTIFICATE section", empty.display())
        );

        let broken = dir.join("broken.pem");
        fs::write(
            &broken,
            "-----BEGIN CERTIFICATE-----\n!!!!\n-----END CERTIFICATE-----\n",
        )
        .expect("write");
        let err = load_trust_bundle(&broken).expect_err("broken");
        assert!(matches!(err, CertError::Pem { .. }), "{err}");

        // A certificate filed under the wrong identity.
        let ca = DevCa::generate("td", SystemTime::now(), CA_VALIDITY).expect("ca");
        let other = SpiffeId::new("td", "ns", "other").expect("id");
        let wanted = SpiffeId::new("td", "ns", "wanted").expect("id");
        let leaf = ca
            .issue(&other, SystemTime::now(), DEFAULT_LEAF_VALIDITY)
            .expect("leaf");
        let idir = identity_dir(&dir, &wanted);
        fs::create_dir_all(&idir).expect("mkdir");
        fs::write(idir.join(CERT_FILE), &leaf.cert_pem).expect("write");
        let err = load_workload_credentials(&dir, &wanted).expect_err("wrong identity");
        assert!(matches!(err, CertError::WrongIdentity { .. }), "{err}");
        assert!(
            err.to_string().contains("spiffe://td/ns/ns/sa/other"),
            "{err}"
        );
        // Right certificate, key file without a key.
        fs::write(
            idir.join(CERT_FILE),
            ca.issue(&wanted, SystemTime::now(), DEFAULT_LEAF_VALIDITY)
                .expect("leaf")
                .cert_pem,
        )
        .expect("write");
        fs::write(idir.join(KEY_FILE), &leaf.cert_pem).expect("write");
        let err = load_workload_credentials(&dir, &wanted).expect_err("no key");
        assert_eq!(
            err.to_string(),
            format!(
                "{}: contains no PRIVATE KEY section (PKCS#8, SEC1 or PKCS#1)",
                idir.join(KEY_FILE).display()
            )
        );
        let _ = fs::remove_dir_all(&dir);
    }
}
