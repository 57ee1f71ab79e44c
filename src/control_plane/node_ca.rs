//! Node CA mode: this node holds an intermediate CA (certificate and key, `node.tls.node_ca`)
//! and issues the certificates of its own local workloads itself — a fresh ECDSA P-256 key per
//! certificate, short-lived, in memory only, never written anywhere — and renews each at half
//! its lifetime.
//!
//! Boundary: checking the CA ([`NodeCa::load`]: the files parse, the key is the certificate's,
//! the certificate is a CA valid now, and what it issues chains to the trust bundle peers
//! verify against), issuing, and deciding when a certificate is due for renewal. Which
//! identities are asked for is the caller's business (only local workloads'; [`NodeCa::retain`]
//! forgets the rest); when to look is the control thread's (`lifecycle`). The chain a workload
//! presents is its certificate followed by every certificate of the CA file, so peers that
//! trust only the root can verify it. An issued certificate never outlives the CA that signed
//! it.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use rustls::client::verify_server_cert_signed_by_trust_anchor;
use rustls::pki_types::UnixTime;
use rustls::server::{ParsedCertificate, WebPkiClientVerifier};
use rustls_pki_types::CertificateDer;

use super::certs::{
    asn1_time, read_certificates, CertError, DevCa, TrustBundle, WorkloadCredentials,
};
use super::config::NodeCaSettings;
use super::identity::SpiffeId;
use crate::observability::logging::rfc3339;

/// A certificate is never renewed sooner than this after it was issued: near the CA's end,
/// where each certificate is cut short, half-lives shrink towards nothing.
const MIN_RENEWAL_INTERVAL: Duration = Duration::from_secs(1);

/// Why the node CA cannot issue; every variant names the file to fix.
#[derive(Debug, thiserror::Error)]
pub enum NodeCaError {
    #[error(transparent)]
    File(#[from] CertError),
    #[error("{}: not a usable PKCS#8 private key: {detail}", path.display())]
    Key { path: PathBuf, detail: String },
    #[error("{}: not the private key of the node CA certificate {}", key.display(), cert.display())]
    KeyMismatch { key: PathBuf, cert: PathBuf },
    #[error("{}: not a CA certificate: {detail}", path.display())]
    NotCa { path: PathBuf, detail: String },
    #[error("{}: the node CA certificate is {why} (valid {not_before} to {not_after})", path.display())]
    NotValidNow {
        path: PathBuf,
        why: &'static str,
        not_before: String,
        not_after: String,
    },
    #[error(
        "{}: the node CA does not chain to the trust bundle {}: peers would refuse every \
         certificate it issues ({detail})",
        path.display(), bundle.display()
    )]
    Untrusted {
        path: PathBuf,
        bundle: PathBuf,
        detail: String,
    },
    #[error("{}: issuing a certificate for {id} failed: {detail}", path.display())]
    Issue {
        path: PathBuf,
        id: SpiffeId,
        detail: String,
    },
}

/// The issuing CA and what it issued.
pub struct NodeCa {
    ca: DevCa,
    certificate: PathBuf,
    key_pem: String,
    /// Sent after each issued certificate: the CA file's certificates, in order.
    chain: Vec<CertificateDer<'static>>,
    ca_not_after: SystemTime,
    lifetime: Duration,
    issued: HashMap<SpiffeId, Issued>,
    /// Certificates issued since start (carried from one load to the next).
    issued_total: u64,
}

struct Issued {
    credentials: WorkloadCredentials,
    renew_at: SystemTime,
}

impl NodeCa {
    /// Reads and checks the CA `settings` names: both files parse, the key is the
    /// certificate's, the certificate is a CA (basicConstraints CA, keyCertSign) valid at
    /// `now`, and — with `trust` — a certificate it issues for `trust_domain` chains to that
    /// bundle, as peers will check.
    pub fn load(
        settings: &NodeCaSettings,
        trust: Option<&TrustBundle>,
        trust_domain: &str,
        now: SystemTime,
    ) -> Result<NodeCa, NodeCaError> {
        let path = &settings.certificate;
        let chain = read_certificates(path)?;
        let cert_pem = std::fs::read_to_string(path).map_err(|source| CertError::Read {
            path: path.clone(),
            source,
        })?;
        let key_pem = std::fs::read_to_string(&settings.key).map_err(|source| CertError::Read {
            path: settings.key.clone(),
            source,
        })?;
        let ca_not_after = check_ca_certificate(path, &chain[0], now)?;
        let ca = DevCa::from_der(chain[0].clone(), &cert_pem, &key_pem).map_err(|e| match e {
            CertError::CaKeyMismatch => NodeCaError::KeyMismatch {
                key: settings.key.clone(),
                cert: path.clone(),
            },
            other => NodeCaError::Key {
                path: settings.key.clone(),
                detail: other.to_string(),
            },
        })?;
        let node_ca = NodeCa {
            ca,
            certificate: path.clone(),
            key_pem,
            chain,
            ca_not_after,
            lifetime: settings.certificate_lifetime,
            issued: HashMap::new(),
            issued_total: 0,
        };
        if let Some(trust) = trust {
            // A probe certificate, issued and dropped: what a peer would check of every real one.
            let probe = SpiffeId::new(trust_domain, "ringtun", "node-ca-check").map_err(|e| {
                NodeCaError::NotCa {
                    path: path.clone(),
                    detail: format!("cannot name a probe identity: {e}"),
                }
            })?;
            let creds = node_ca.sign(&probe, now)?.0;
            chains_to(trust, &creds, now).map_err(|detail| NodeCaError::Untrusted {
                path: path.clone(),
                bundle: trust.source().to_path_buf(),
                detail,
            })?;
        }
        Ok(node_ca)
    }

    /// Keeps what `previous` issued when it was the same CA (same files' contents) with the
    /// same lifetime: a reload or a renewal rebuilds the `NodeCa` from its files, and must not
    /// reissue every certificate each time. A different CA issues everything anew.
    pub fn carry_over(&mut self, previous: &NodeCa) {
        self.issued_total = previous.issued_total;
        if self.chain != previous.chain
            || self.key_pem != previous.key_pem
            || self.lifetime != previous.lifetime
        {
            return;
        }
        for (id, issued) in &previous.issued {
            self.issued.insert(
                id.clone(),
                Issued {
                    credentials: issued.credentials.clone(),
                    renew_at: issued.renew_at,
                },
            );
        }
    }

    /// The credentials of `id` at `now`: those issued before until they are due for renewal,
    /// else a certificate issued now.
    pub fn credentials(
        &mut self,
        id: &SpiffeId,
        now: SystemTime,
    ) -> Result<WorkloadCredentials, NodeCaError> {
        if let Some(issued) = self.issued.get(id) {
            if now < issued.renew_at {
                return Ok(issued.credentials.clone());
            }
        }
        let (credentials, renew_at) = self.sign(id, now)?;
        self.issued_total += 1;
        self.issued.insert(
            id.clone(),
            Issued {
                credentials: credentials.clone(),
                renew_at,
            },
        );
        Ok(credentials)
    }

    /// A new certificate for `id` and when it is due for renewal.
    fn sign(
        &self,
        id: &SpiffeId,
        now: SystemTime,
    ) -> Result<(WorkloadCredentials, SystemTime), NodeCaError> {
        let issue_error = |detail: String| NodeCaError::Issue {
            path: self.certificate.clone(),
            id: id.clone(),
            detail,
        };
        let left = self
            .ca_not_after
            .duration_since(now)
            .ok()
            .filter(|d| !d.is_zero())
            .ok_or_else(|| {
                issue_error(format!(
                    "the node CA expired {}; replace it",
                    rfc3339(self.ca_not_after)
                ))
            })?;
        let validity = self.lifetime.min(left);
        let cert = self
            .ca
            .issue(id, now, validity)
            .map_err(|e| issue_error(e.to_string()))?;
        let mut credentials = cert.credentials(id);
        credentials.chain.extend(self.chain.iter().cloned());
        Ok((credentials, renew_at(now, now + validity)))
    }

    /// Forgets what was issued for identities `keep` refuses (no longer local).
    pub fn retain(&mut self, keep: impl Fn(&SpiffeId) -> bool) {
        self.issued.retain(|id, _| keep(id));
    }

    /// When the next issued certificate is due for renewal.
    pub fn next_renewal(&self) -> Option<SystemTime> {
        self.issued.values().map(|i| i.renew_at).min()
    }

    /// Certificates issued since start.
    pub fn issued_total(&self) -> u64 {
        self.issued_total
    }
}

/// When a certificate issued at `issued_at` and valid until `not_after` is due for renewal:
/// at half its lifetime. The lifetime counts from issuance, not from notBefore, which is set a
/// little in the past for peers with slow clocks and would otherwise bring renewal forward.
pub fn renew_at(issued_at: SystemTime, not_after: SystemTime) -> SystemTime {
    let lifetime = not_after
        .duration_since(issued_at)
        .unwrap_or(Duration::ZERO);
    issued_at + (lifetime / 2).max(MIN_RENEWAL_INTERVAL)
}

/// Checks the node CA certificate itself: a CA allowed to sign certificates, valid at `now`.
/// Returns its notAfter.
fn check_ca_certificate(
    path: &Path,
    cert: &CertificateDer<'_>,
    now: SystemTime,
) -> Result<SystemTime, NodeCaError> {
    let not_ca = |detail: &str| NodeCaError::NotCa {
        path: path.to_path_buf(),
        detail: detail.to_string(),
    };
    let (_, parsed) = x509_parser::parse_x509_certificate(cert.as_ref())
        .map_err(|e| not_ca(&format!("not an X.509 certificate: {e}")))?;
    match parsed.basic_constraints() {
        Ok(Some(bc)) if bc.value.ca => {}
        Ok(_) => return Err(not_ca("its basicConstraints do not say CA")),
        Err(e) => return Err(not_ca(&format!("bad basicConstraints: {e}"))),
    }
    match parsed.key_usage() {
        Ok(Some(ku)) if ku.value.key_cert_sign() => {}
        Ok(_) => return Err(not_ca("its keyUsage does not include keyCertSign")),
        Err(e) => return Err(not_ca(&format!("bad keyUsage: {e}"))),
    }
    let not_before = asn1_time(parsed.validity().not_before);
    let not_after = asn1_time(parsed.validity().not_after);
    let why = if now < not_before {
        Some("not valid yet")
    } else if now >= not_after {
        Some("expired")
    } else {
        None
    };
    if let Some(why) = why {
        return Err(NodeCaError::NotValidNow {
            path: path.to_path_buf(),
            why,
            not_before: rfc3339(not_before),
            not_after: rfc3339(not_after),
        });
    }
    Ok(not_after)
}

/// Whether `creds`' chain leads to `trust` at `now` as both peers check it: a tunnel's client
/// verifying the server, and a server verifying its client (each with rustls's verifier).
fn chains_to(
    trust: &TrustBundle,
    creds: &WorkloadCredentials,
    now: SystemTime,
) -> Result<(), String> {
    let provider = crate::tls::provider();
    let since = now
        .duration_since(SystemTime::UNIX_EPOCH)
        .unwrap_or(Duration::ZERO);
    let now = UnixTime::since_unix_epoch(since);
    let (leaf, intermediates) = (&creds.chain[0], &creds.chain[1..]);
    let parsed = ParsedCertificate::try_from(leaf).map_err(|e| e.to_string())?;
    verify_server_cert_signed_by_trust_anchor(
        &parsed,
        &trust.roots(),
        intermediates,
        now,
        provider.signature_verification_algorithms.all,
    )
    .map_err(|e| format!("as a server: {e}"))?;
    WebPkiClientVerifier::builder_with_provider(trust.roots(), provider)
        .build()
        .map_err(|e| e.to_string())?
        .verify_client_cert(leaf, intermediates, now)
        .map_err(|e| format!("as a client: {e}"))?;
    Ok(())
}

/// Test support: a development root and a node CA under it, valid from `from` for `validity`,
/// written to `dir` as an operator would hand them to a node: `root.pem` (the trust bundle),
/// `ica.pem` (the node CA, then the root) and `ica-key.pem`.
#[cfg(test)]
pub(crate) fn write_test_node_ca(
    dir: &Path,
    from: SystemTime,
    validity: Duration,
) -> (DevCa, super::certs::IssuedCert) {
    let root =
        DevCa::generate("cluster.local", from, Duration::from_secs(24 * 3600)).expect("root CA");
    let ica = root
        .issue_intermediate("node-a", from, validity)
        .expect("node CA");
    std::fs::create_dir_all(dir).expect("directory");
    std::fs::write(dir.join("root.pem"), root.cert_pem()).expect("root.pem");
    let chain = format!("{}{}", ica.cert_pem, root.cert_pem());
    std::fs::write(dir.join("ica.pem"), chain).expect("ica.pem");
    std::fs::write(dir.join("ica-key.pem"), &ica.key_pem).expect("ica-key.pem");
    (root, ica)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::control_plane::certs::{load_trust_bundle, uri_sans};

    const HOUR: Duration = Duration::from_secs(3600);

    /// A root, and a node CA under it valid from `from` for `validity`, written to `dir`: the
    /// node CA's file holds it and the root, as an operator would hand a node its CA.
    struct Files {
        dir: PathBuf,
        root: DevCa,
        settings: NodeCaSettings,
    }

    impl Files {
        fn new(tag: &str, from: SystemTime, validity: Duration) -> Files {
            let dir = std::env::temp_dir().join(format!(
                "ringtun-node-ca-{tag}-{}-{:?}",
                std::process::id(),
                std::thread::current().id()
            ));
            let _ = std::fs::remove_dir_all(&dir);
            let (root, _) = write_test_node_ca(&dir, from, validity);
            let settings = NodeCaSettings {
                certificate: dir.join("ica.pem"),
                key: dir.join("ica-key.pem"),
                certificate_lifetime: Duration::from_secs(60),
            };
            Files {
                dir,
                root,
                settings,
            }
        }

        fn trust(&self) -> TrustBundle {
            load_trust_bundle(&self.dir.join("root.pem")).unwrap()
        }

        fn load(&self, now: SystemTime) -> Result<NodeCa, NodeCaError> {
            NodeCa::load(&self.settings, Some(&self.trust()), "cluster.local", now)
        }
    }

    impl Drop for Files {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.dir);
        }
    }

    fn id(sa: &str) -> SpiffeId {
        SpiffeId::new("cluster.local", "default", sa).unwrap()
    }

    fn not_after(cert: &CertificateDer<'_>) -> SystemTime {
        let (_, parsed) = x509_parser::parse_x509_certificate(cert.as_ref()).unwrap();
        SystemTime::UNIX_EPOCH + Duration::from_secs(parsed.validity().not_after.timestamp() as u64)
    }

    #[test]
    fn an_issued_certificate_verifies_against_the_bundle_with_exactly_its_spiffe_id() {
        let now = SystemTime::now();
        let files = Files::new("issue", now, HOUR);
        let mut ca = files.load(now).expect("loads");
        let web = ca.credentials(&id("web"), now).unwrap();
        assert_eq!(uri_sans(&web.chain[0]).unwrap(), [id("web").to_uri()]);
        // Leaf, then the CA file's node CA and root.
        assert_eq!(web.chain.len(), 3);
        chains_to(&files.trust(), &web, now).expect("a peer accepts it");
        // Valid for the configured lifetime from issuance (notBefore is a little earlier).
        let lifetime = not_after(&web.chain[0]).duration_since(now).unwrap();
        assert!(
            lifetime <= Duration::from_secs(60) && lifetime > Duration::from_secs(58),
            "{lifetime:?}"
        );
        // notBefore a little in the past, for peers whose clocks are slow.
        let (_, parsed) = x509_parser::parse_x509_certificate(web.chain[0].as_ref()).unwrap();
        let not_before = SystemTime::UNIX_EPOCH
            + Duration::from_secs(parsed.validity().not_before.timestamp() as u64);
        assert!(not_before + Duration::from_secs(60) < now, "{not_before:?}");
        // A fresh key per certificate: two identities, two keys.
        let db = ca.credentials(&id("db"), now).unwrap();
        assert_ne!(web.key.secret_der(), db.key.secret_der());
        assert_eq!(ca.issued_total(), 2);
    }

    #[test]
    fn renewal_falls_due_at_half_the_lifetime_counted_from_issuance() {
        let t0 = SystemTime::UNIX_EPOCH + Duration::from_secs(1_000_000);
        assert_eq!(
            renew_at(t0, t0 + Duration::from_secs(60)),
            t0 + Duration::from_secs(30)
        );
        assert_eq!(renew_at(t0, t0 + 2 * HOUR), t0 + HOUR);
        // Cut short by the CA's end: never sooner than the floor.
        assert_eq!(
            renew_at(t0, t0 + Duration::from_millis(400)),
            t0 + MIN_RENEWAL_INTERVAL
        );

        let now = SystemTime::now();
        let files = Files::new("renew", now, HOUR);
        let mut ca = files.load(now).expect("loads");
        let first = ca.credentials(&id("web"), now).unwrap();
        assert_eq!(ca.next_renewal(), Some(now + Duration::from_secs(30)));
        // Before half-life: the same certificate; at it: a new one, due in turn later.
        let again = ca
            .credentials(&id("web"), now + Duration::from_secs(29))
            .unwrap();
        assert_eq!(again.chain[0], first.chain[0]);
        let later = now + Duration::from_secs(30);
        let renewed = ca.credentials(&id("web"), later).unwrap();
        assert_ne!(renewed.chain[0], first.chain[0]);
        assert_eq!(ca.next_renewal(), Some(later + Duration::from_secs(30)));

        // A reload of the same CA keeps what was issued; another CA issues anew.
        let mut reloaded = files.load(later).unwrap();
        reloaded.carry_over(&ca);
        let kept = reloaded.credentials(&id("web"), later).unwrap();
        assert_eq!(kept.chain[0], renewed.chain[0]);
        let other = Files::new("renew-other", now, HOUR);
        let mut replaced = other.load(later).unwrap();
        replaced.carry_over(&ca);
        assert_eq!(replaced.next_renewal(), None);

        // Identities no longer local are forgotten.
        ca.credentials(&id("db"), now).unwrap();
        ca.retain(|i| *i != id("web"));
        assert_eq!(ca.issued.len(), 1);
        assert!(ca.issued.contains_key(&id("db")));
    }

    #[test]
    fn an_issued_certificate_never_outlives_its_ca() {
        let now = SystemTime::now();
        let files = Files::new("clamp", now, Duration::from_secs(20));
        let mut ca = files.load(now).expect("loads");
        let ca_end = ca.ca_not_after;
        let leaf = ca.credentials(&id("web"), now).unwrap();
        assert_eq!(not_after(&leaf.chain[0]), ca_end);
        chains_to(&files.trust(), &leaf, now).expect("valid while the CA is");
        // Once the CA has expired it issues nothing, and says so.
        let err = ca
            .credentials(&id("db"), ca_end + Duration::from_secs(1))
            .expect_err("an expired CA issues nothing");
        assert!(err.to_string().contains("expired"), "{err}");
        assert!(err.to_string().contains("ica.pem"), "{err}");
    }

    #[test]
    fn a_node_ca_that_cannot_serve_is_refused_naming_its_file() {
        let now = SystemTime::now();
        // A key that is not the CA's.
        let files = Files::new("key", now, HOUR);
        let other = DevCa::generate("cluster.local", now, HOUR).unwrap();
        std::fs::write(&files.settings.key, other.key_pem()).unwrap();
        let err = files.load(now).err().expect("a foreign key is refused");
        assert!(matches!(err, NodeCaError::KeyMismatch { .. }), "{err}");
        assert!(err.to_string().contains("ica-key.pem"), "{err}");

        // A CA outside the trust bundle: every certificate it issued would be refused.
        let files = Files::new("untrusted", now, HOUR);
        let stranger = DevCa::generate("cluster.local", now, HOUR).unwrap();
        let bundle = stranger
            .trust_bundle(Path::new("/etc/other-ca.pem"))
            .unwrap();
        let err = NodeCa::load(&files.settings, Some(&bundle), "cluster.local", now)
            .err()
            .expect("an untrusted CA is refused");
        assert!(matches!(err, NodeCaError::Untrusted { .. }), "{err}");
        assert!(err.to_string().contains("/etc/other-ca.pem"), "{err}");
        // Without a bundle to check against (it failed to load) the rest still loads.
        NodeCa::load(&files.settings, None, "cluster.local", now).expect("loads");

        // A workload certificate given as the CA.
        let files = Files::new("leaf", now, HOUR);
        let leaf = files.root.issue(&id("web"), now, HOUR).unwrap();
        std::fs::write(&files.settings.certificate, &leaf.cert_pem).unwrap();
        std::fs::write(&files.settings.key, &leaf.key_pem).unwrap();
        let err = files.load(now).err().expect("a leaf is not a CA");
        assert!(matches!(err, NodeCaError::NotCa { .. }), "{err}");
        assert!(err.to_string().contains("ica.pem"), "{err}");

        // An expired CA, and one not valid yet.
        let files = Files::new("expired", now - 3 * HOUR, HOUR);
        let err = files.load(now).err().expect("an expired CA is refused");
        assert!(
            matches!(err, NodeCaError::NotValidNow { why: "expired", .. }),
            "{err}"
        );
        let files = Files::new("future", now + HOUR, HOUR);
        let err = files.load(now).err().expect("a future CA is refused");
        assert!(err.to_string().contains("not valid yet"), "{err}");

        // A node CA limited to server authentication: peers would refuse its certificates
        // as clients (the check verifies both ways, as the two ends of a tunnel do).
        let files = Files::new("server-only", now, HOUR);
        let server_only = {
            use rcgen::{
                BasicConstraints, CertificateParams, ExtendedKeyUsagePurpose, IsCa, Issuer,
                KeyPair, KeyUsagePurpose,
            };
            let root_key = KeyPair::from_pem(&files.root.key_pem()).unwrap();
            let root = Issuer::from_ca_cert_der(files.root.cert_der(), root_key).unwrap();
            let key = KeyPair::generate().unwrap();
            let mut params = CertificateParams::default();
            params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
            params.key_usages = vec![KeyUsagePurpose::KeyCertSign];
            params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
            let cert = params.signed_by(&key, &root).unwrap();
            (cert.pem(), key.serialize_pem())
        };
        std::fs::write(&files.settings.certificate, &server_only.0).unwrap();
        std::fs::write(&files.settings.key, &server_only.1).unwrap();
        let err = files.load(now).err().expect("a server-only CA is refused");
        assert!(matches!(err, NodeCaError::Untrusted { .. }), "{err}");
        assert!(err.to_string().contains("as a client"), "{err}");

        // A missing file names itself.
        let files = Files::new("missing", now, HOUR);
        std::fs::remove_file(&files.settings.key).unwrap();
        let err = files.load(now).err().expect("no key");
        assert!(err.to_string().contains("ica-key.pem"), "{err}");
    }
}
