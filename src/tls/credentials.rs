//! The TLS material of one node snapshot: for every local workload identity, the client side
//! (its certificate, for tunnels it opens) and the server config (what its port 15008 presents),
//! all over one trust bundle; what each certificate is (serial, validity, source), so an
//! expired or not-yet-valid one is never presented and `/certificates` can list them; plus the
//! kernel's kTLS support, probed once at start. The certificates come from files
//! (`node.tls.certificate_dir`) or, in node CA mode, from the node's own CA
//! ([`crate::control_plane::node_ca`]), which issues them in memory.
//!
//! Boundary: built by [`load`] at start, at every reload, whenever a certificate file changes
//! and whenever node CA mode renews a certificate; then only read, shared by every reactor
//! through the snapshot. A build that fails (a missing or mismatched certificate, an
//! unreadable bundle, a node CA that cannot issue) changes nothing: the running credentials
//! (and what the node CA issued) stay. A certificate outside its validity is loaded (it may be replaced
//! any moment) but never presented: [`TunnelCredentials::usable`] says so per identity.

use std::collections::{HashMap, HashSet};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use rustls::ServerConfig;

use super::{server_config_for, ClientTls, TlsError};
use crate::control_plane::certs::{
    identity_dir, load_trust_bundle, load_workload_credentials, CertError, WorkloadCredentials,
    CERT_FILE, KEY_FILE,
};
use crate::control_plane::identity::{IdentityError, SpiffeId};
use crate::control_plane::node_ca::{NodeCa, NodeCaError};
use crate::control_plane::state::State;
use crate::kernel_features::KtlsSupport;
use crate::observability::logging::rfc3339;

/// TLS material for tunnels, shared by every reactor.
pub struct TunnelCredentials {
    /// Client side per local identity (the source workload's certificate).
    pub client: HashMap<SpiffeId, ClientTls>,
    /// Server config per local identity (what 15008 presents for that pod).
    pub server: HashMap<SpiffeId, Arc<ServerConfig>>,
    /// What each local identity's certificate is.
    pub certificates: HashMap<SpiffeId, CertificateInfo>,
    pub ktls: KtlsSupport,
}

/// One certificate in use, as `GET /certificates` lists it (never its key).
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct CertificateInfo {
    pub identity: String,
    /// The serial number, hex bytes separated by colons.
    pub serial: String,
    /// The validity, RFC 3339 in UTC.
    pub not_before: String,
    pub not_after: String,
    #[serde(skip)]
    not_before_unix: u64,
    #[serde(skip)]
    not_after_unix: u64,
    /// Where it came from: `file <path>`, or `node CA` (issued by this node).
    pub source: String,
}

/// Why a local certificate must not be presented now.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum Unusable {
    #[error("expired")]
    Expired,
    #[error("not valid yet")]
    NotYetValid,
}

impl Unusable {
    /// The `reason` label of the refusal counter.
    pub fn label(self) -> &'static str {
        match self {
            Unusable::Expired => "local_certificate_expired",
            Unusable::NotYetValid => "local_certificate_not_yet_valid",
        }
    }
}

impl CertificateInfo {
    fn of(id: &SpiffeId, creds: &WorkloadCredentials, source: String) -> Result<Self, String> {
        let (_, cert) = x509_parser::parse_x509_certificate(creds.chain[0].as_ref())
            .map_err(|e| format!("not an X.509 certificate: {e}"))?;
        // Before 1970 is as unusable as 1970 itself; clamp rather than wrap.
        let unix = |t: x509_parser::time::ASN1Time| u64::try_from(t.timestamp()).unwrap_or(0);
        let not_before_unix = unix(cert.validity().not_before);
        let not_after_unix = unix(cert.validity().not_after);
        let text = |secs| rfc3339(SystemTime::UNIX_EPOCH + Duration::from_secs(secs));
        Ok(CertificateInfo {
            identity: id.to_uri(),
            serial: cert.raw_serial_as_string(),
            not_before: text(not_before_unix),
            not_after: text(not_after_unix),
            not_before_unix,
            not_after_unix,
            source,
        })
    }

    /// Whether it may be presented at `now`: its validity includes `now` (both ends inclusive,
    /// as RFC 5280 4.1.2.5 has it).
    pub fn usable_at(&self, now: SystemTime) -> Result<(), Unusable> {
        let secs = now
            .duration_since(SystemTime::UNIX_EPOCH)
            .unwrap_or(Duration::ZERO)
            .as_secs();
        if secs < self.not_before_unix {
            Err(Unusable::NotYetValid)
        } else if secs > self.not_after_unix {
            Err(Unusable::Expired)
        } else {
            Ok(())
        }
    }
}

impl TunnelCredentials {
    /// Whether `id`'s certificate may be presented at `now`. An identity without a certificate
    /// is not this check's business: the callers already refuse it as unknown.
    pub fn usable(&self, id: &SpiffeId, now: SystemTime) -> Result<(), Unusable> {
        self.certificates
            .get(id)
            .map_or(Ok(()), |info| info.usable_at(now))
    }

    /// Every certificate in use, by identity.
    pub fn listing(&self) -> Vec<CertificateInfo> {
        let mut all: Vec<CertificateInfo> = self.certificates.values().cloned().collect();
        all.sort_by(|a, b| a.identity.cmp(&b.identity));
        all
    }
}

/// Why the credentials of a snapshot cannot be built; each names what to fix.
#[derive(Debug, thiserror::Error)]
pub enum CredentialsError {
    #[error("node.tls.trust_bundle: {0}")]
    TrustBundle(Box<CertError>),
    #[error("node.tls.certificate_dir: {}: cannot read: {source}", dir.display())]
    CertificateDir {
        dir: PathBuf,
        source: std::io::Error,
    },
    #[error("workload {workload}: identity {identity}: {source}")]
    Identity {
        workload: Arc<str>,
        identity: String,
        source: IdentityError,
    },
    #[error("workload {workload}: no usable certificate for {id}: {source}")]
    Certificate {
        workload: Arc<str>,
        id: SpiffeId,
        source: Box<CertError>,
    },
    #[error("workload {workload}: TLS for {id}: {source}")]
    Tls {
        workload: Arc<str>,
        id: SpiffeId,
        source: Box<TlsError>,
    },
    #[error("node.tls.node_ca: {0}")]
    NodeCa(Box<NodeCaError>),
}

/// The `source` of a certificate node CA mode issued, as `/certificates` shows it.
pub const NODE_CA_SOURCE: &str = "node CA";

/// Every problem [`load`] found, not just the first: an operator fixes them in one round.
#[derive(Debug)]
pub struct CredentialsErrors(pub Vec<CredentialsError>);

impl std::fmt::Display for CredentialsErrors {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        for (i, e) in self.0.iter().enumerate() {
            if i > 0 {
                f.write_str("; ")?;
            }
            write!(f, "{e}")?;
        }
        Ok(())
    }
}

impl std::error::Error for CredentialsErrors {}

/// Loads the trust bundle and every local workload's certificate at `now`. `None` without
/// `node.tls`: tunnels are off and HBONE routes refused.
///
/// In node CA mode the CA is read from its files again and `node_ca` (what the running node
/// issued) is replaced by it once everything loaded: certificates still short of half their
/// lifetime are kept (when the CA is the same), the others and those of new local identities
/// are issued now, those of identities no longer local forgotten. Otherwise `node_ca` becomes
/// `None`. On an error `node_ca` is left as it was.
pub fn load(
    state: &State,
    ktls: &KtlsSupport,
    node_ca: &mut Option<NodeCa>,
    now: SystemTime,
) -> Result<Option<TunnelCredentials>, CredentialsErrors> {
    let Some(sides) = read(state, node_ca.as_ref(), now)? else {
        *node_ca = None;
        return Ok(None);
    };
    *node_ca = sides.node_ca;
    for info in sides.certificates.values() {
        if let Err(why) = info.usable_at(now) {
            log::warn!("{}", unusable_line(info, why));
        }
    }
    Ok(Some(TunnelCredentials {
        client: sides.client,
        server: sides.server,
        certificates: sides.certificates,
        ktls: ktls.clone(),
    }))
}

/// What an operator reads about a certificate outside its validity (at start, at a reload,
/// from `check-config`).
fn unusable_line(info: &CertificateInfo, why: Unusable) -> String {
    format!(
        "the certificate of {} (serial {}, valid {} to {}, {}) is {why}: tunnels that would \
         present it are refused until it is replaced",
        info.identity, info.serial, info.not_before, info.not_after, info.source
    )
}

/// The client and server sides and the certificate per local identity, and in node CA mode
/// the CA that issued them.
struct Sides {
    client: HashMap<SpiffeId, ClientTls>,
    server: HashMap<SpiffeId, Arc<ServerConfig>>,
    certificates: HashMap<SpiffeId, CertificateInfo>,
    node_ca: Option<NodeCa>,
}

/// Where the local certificates come from.
enum Source<'a> {
    Files(&'a std::path::Path),
    /// `None` when the node CA did not load (its error is already collected).
    NodeCa(Option<Box<NodeCa>>),
}

fn read(
    state: &State,
    previous: Option<&NodeCa>,
    now: SystemTime,
) -> Result<Option<Sides>, CredentialsErrors> {
    let node = &state.config.node;
    let Some(tls) = &node.tls else {
        return Ok(None);
    };
    let mut problems = Vec::new();
    let trust = load_trust_bundle(&tls.trust_bundle)
        .map_err(|e| problems.push(CredentialsError::TrustBundle(Box::new(e))))
        .ok();
    let mut source = match (&tls.certificate_dir, &tls.node_ca) {
        (Some(dir), _) => {
            if let Err(source) = std::fs::read_dir(dir) {
                problems.push(CredentialsError::CertificateDir {
                    dir: dir.clone(),
                    source,
                });
            }
            Source::Files(dir)
        }
        (None, Some(settings)) => {
            match NodeCa::load(settings, trust.as_ref(), &node.trust_domain, now) {
                Ok(mut ca) => {
                    if let Some(previous) = previous {
                        ca.carry_over(previous);
                    }
                    Source::NodeCa(Some(Box::new(ca)))
                }
                Err(e) => {
                    problems.push(CredentialsError::NodeCa(Box::new(e)));
                    Source::NodeCa(None)
                }
            }
        }
        // The config checker requires exactly one of the two.
        (None, None) => Source::NodeCa(None),
    };
    let mut client = HashMap::new();
    let mut server = HashMap::new();
    let mut certificates = HashMap::new();
    let mut seen = HashSet::new();
    for (_, entry) in state.registry.local_workloads() {
        let workload = Arc::clone(&entry.name);
        let id = match SpiffeId::parse(&entry.identity) {
            Ok(id) => id,
            Err(source) => {
                problems.push(CredentialsError::Identity {
                    workload,
                    identity: entry.identity.clone(),
                    source,
                });
                continue;
            }
        };
        if !seen.insert(id.clone()) {
            continue;
        }
        let (creds, origin, file) = match &mut source {
            Source::Files(dir) => match load_workload_credentials(dir, &id) {
                Ok(c) => {
                    let file = identity_dir(dir, &id).join(CERT_FILE);
                    (c, format!("file {}", file.display()), file)
                }
                Err(source) => {
                    problems.push(CredentialsError::Certificate {
                        workload,
                        id,
                        source: Box::new(source),
                    });
                    continue;
                }
            },
            Source::NodeCa(None) => continue,
            Source::NodeCa(Some(ca)) => match ca.credentials(&id, now) {
                Ok(c) => (c, NODE_CA_SOURCE.to_string(), PathBuf::from(id.to_uri())),
                Err(e) => {
                    problems.push(CredentialsError::NodeCa(Box::new(e)));
                    continue;
                }
            },
        };
        let info = match CertificateInfo::of(&id, &creds, origin) {
            Ok(info) => info,
            Err(detail) => {
                problems.push(CredentialsError::Certificate {
                    workload,
                    id,
                    source: Box::new(CertError::BadCertificate { path: file, detail }),
                });
                continue;
            }
        };
        let Some(trust) = &trust else { continue };
        let made = ClientTls::new_for(&creds, trust, node.hbone.cipher).and_then(|c| {
            server_config_for(&creds, trust, &node.trust_domain, node.hbone.cipher).map(|s| (c, s))
        });
        match made {
            Ok((c, s)) => {
                client.insert(id.clone(), c);
                server.insert(id.clone(), s);
                certificates.insert(id, info);
            }
            Err(source) => problems.push(CredentialsError::Tls {
                workload,
                id,
                source: Box::new(source),
            }),
        }
    }
    if !problems.is_empty() {
        return Err(CredentialsErrors(problems));
    }
    let node_ca = match source {
        Source::NodeCa(Some(mut ca)) => {
            ca.retain(|id| client.contains_key(id));
            Some(*ca)
        }
        _ => None,
    };
    log::info!(
        "HBONE tunnels: {} local identities, trust bundle {} ({} CA certificates)",
        client.len(),
        tls.trust_bundle.display(),
        trust.as_ref().map_or(0, |t| t.len())
    );
    Ok(Some(Sides {
        client,
        server,
        certificates,
        node_ca,
    }))
}

/// Everything a node would refuse about the files a valid config names (the trust bundle, the
/// certificate directory and each local workload's certificate and key, or the node CA's
/// certificate and key), each as one line: what `check-config` reports beyond the file itself;
/// `run` exits 64 for the same. In node CA mode the certificates are issued, checked and
/// dropped.
pub fn check_files(state: &State) -> Vec<String> {
    match read(state, None, SystemTime::now()) {
        Ok(_) => Vec::new(),
        Err(e) => e.0.iter().map(ToString::to_string).collect(),
    }
}

/// The local certificates that load but are outside their validity at `now`, each as one
/// line. A warning, not a refusal: the node serves everything else, and a certificate agent
/// that rewrites the files brings the identity back without a restart.
pub fn check_validity(state: &State, now: SystemTime) -> Vec<String> {
    let Ok(Some(sides)) = read(state, None, now) else {
        return Vec::new();
    };
    let mut lines: Vec<(String, String)> = sides
        .certificates
        .values()
        .filter_map(|info| {
            let why = info.usable_at(now).err()?;
            Some((info.identity.clone(), unusable_line(info, why)))
        })
        .collect();
    lines.sort();
    lines.into_iter().map(|(_, line)| line).collect()
}

/// The files a snapshot's credentials are read from (the trust bundle, and each local
/// identity's certificate and key or the node CA's): a change of any of them rebuilds the
/// credentials.
pub fn credential_files(state: &State) -> Vec<PathBuf> {
    let Some(tls) = &state.config.node.tls else {
        return Vec::new();
    };
    let mut files = vec![tls.trust_bundle.clone()];
    if let Some(ca) = &tls.node_ca {
        files.push(ca.certificate.clone());
        files.push(ca.key.clone());
    }
    if let Some(certificate_dir) = &tls.certificate_dir {
        for (_, entry) in state.registry.local_workloads() {
            if let Ok(id) = SpiffeId::parse(&entry.identity) {
                let dir = identity_dir(certificate_dir, &id);
                files.push(dir.join(CERT_FILE));
                files.push(dir.join(KEY_FILE));
            }
        }
    }
    files.sort();
    files.dedup();
    files
}

/// Test support: no kTLS, as on a host without it (nothing is probed).
#[cfg(test)]
pub(crate) fn unprobed_ktls() -> KtlsSupport {
    KtlsSupport {
        tx: false,
        rx: false,
        ciphers: Vec::new(),
        rx_ciphers: Vec::new(),
        rekey: crate::kernel_features::Rekey::Unsupported,
        reason: Some("not probed in this test".into()),
    }
}

#[cfg(test)]
mod tests {
    use std::path::Path;
    use std::time::{Duration, SystemTime};

    use super::*;
    use crate::control_plane::certs::{DevCa, CA_CERT_FILE};
    use crate::control_plane::config;
    use crate::control_plane::node_ca::write_test_node_ca;

    const HOUR: Duration = Duration::from_secs(3600);

    /// A node with three local workloads, one identity each, and the dev CA's layout in `dir`.
    fn node_state(dir: &Path) -> Arc<State> {
        let text = format!(
            "version: 1\nnode:\n  name: n\n  tls:\n    trust_bundle: {d}/{CA_CERT_FILE}\n    \
             certificate_dir: {d}\nworkloads:\n\
             - {{name: old, namespace: ns, service_account: old, ips: [10.0.0.1], node: n, netns: p1}}\n\
             - {{name: now, namespace: ns, service_account: now, ips: [10.0.0.2], node: n, netns: p2}}\n\
             - {{name: soon, namespace: ns, service_account: soon, ips: [10.0.0.3], node: n, netns: p3}}\n",
            d = dir.display()
        );
        State::new(config::load(&text).expect("valid config"), 1)
    }

    fn write_cert(
        ca: &DevCa,
        dir: &Path,
        sa: &str,
        from: SystemTime,
        validity: Duration,
    ) -> String {
        let id = SpiffeId::new("cluster.local", "ns", sa).unwrap();
        let issued = ca.issue(&id, from, validity).unwrap();
        let d = identity_dir(dir, &id);
        std::fs::create_dir_all(&d).unwrap();
        std::fs::write(d.join(CERT_FILE), &issued.cert_pem).unwrap();
        std::fs::write(d.join(KEY_FILE), &issued.key_pem).unwrap();
        let (_, cert) = x509_parser::parse_x509_certificate(issued.cert_der.as_ref()).unwrap();
        cert.raw_serial_as_string()
    }

    #[test]
    fn a_certificate_outside_its_validity_loads_but_is_never_usable() {
        let dir =
            std::env::temp_dir().join(format!("ringtun-creds-validity-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let now = SystemTime::now();
        let ca = DevCa::generate("cluster.local", now - 4 * HOUR, 24 * HOUR).unwrap();
        std::fs::write(dir.join(CA_CERT_FILE), ca.cert_pem()).unwrap();
        // Ended an hour ago; valid now for an hour; valid from an hour hence.
        let expired = write_cert(&ca, &dir, "old", now - 2 * HOUR, HOUR);
        let valid = write_cert(&ca, &dir, "now", now, HOUR);
        let future = write_cert(&ca, &dir, "soon", now + HOUR, HOUR);
        let state = node_state(&dir);

        // Loading refuses nothing: the node starts and serves the valid identity.
        assert!(check_files(&state).is_empty(), "{:?}", check_files(&state));
        let creds = load(&state, &unprobed_ktls(), &mut None, now)
            .expect("loads")
            .expect("tls is on");
        let id = |sa| SpiffeId::new("cluster.local", "ns", sa).unwrap();
        assert_eq!(creds.usable(&id("old"), now), Err(Unusable::Expired));
        assert_eq!(creds.usable(&id("now"), now), Ok(()));
        assert_eq!(creds.usable(&id("soon"), now), Err(Unusable::NotYetValid));
        // The valid one is unusable too once its hour is over.
        assert_eq!(
            creds.usable(&id("now"), now + 2 * HOUR),
            Err(Unusable::Expired)
        );
        assert_eq!(Unusable::Expired.label(), "local_certificate_expired");

        // The listing names each by serial and file, sorted by identity, no key.
        let listing = creds.listing();
        let serials: Vec<(&str, &str)> = listing
            .iter()
            .map(|c| (c.identity.as_str(), c.serial.as_str()))
            .collect();
        assert_eq!(
            serials,
            [
                ("spiffe://cluster.local/ns/ns/sa/now", valid.as_str()),
                ("spiffe://cluster.local/ns/ns/sa/old", expired.as_str()),
                ("spiffe://cluster.local/ns/ns/sa/soon", future.as_str()),
            ]
        );
        let json = serde_json::to_string(&listing).unwrap();
        assert!(!json.contains("PRIVATE"), "{json}");
        assert!(
            listing[1].source.ends_with(&format!("ns/old/{CERT_FILE}")),
            "{:?}",
            listing[1]
        );

        // check-config's warnings: one line for each unusable certificate, with the reason.
        let warnings = check_validity(&state, now);
        assert_eq!(warnings.len(), 2, "{warnings:?}");
        assert!(
            warnings[0].contains("sa/old") && warnings[0].contains("is expired"),
            "{warnings:?}"
        );
        assert!(warnings[0].contains(&expired), "{warnings:?}");
        assert!(
            warnings[1].contains("sa/soon") && warnings[1].contains("is not valid yet"),
            "{warnings:?}"
        );
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn the_files_to_watch_are_the_bundle_and_each_local_identitys_pair() {
        let state = node_state(Path::new("/c"));
        let files: Vec<String> = credential_files(&state)
            .iter()
            .map(|p| p.display().to_string())
            .collect();
        assert_eq!(
            files,
            [
                "/c/ca.pem",
                "/c/ns/now/cert.pem",
                "/c/ns/now/key.pem",
                "/c/ns/old/cert.pem",
                "/c/ns/old/key.pem",
                "/c/ns/soon/cert.pem",
                "/c/ns/soon/key.pem",
            ]
        );
    }

    /// A node in node CA mode with local workloads `local` (service accounts in namespace
    /// ns) and one workload on another node; the node CA and the root in `dir`.
    fn node_ca_state(dir: &Path, local: &[&str], lifetime: &str) -> Arc<State> {
        let mut text = format!(
            "version: 1\nnode:\n  name: n\n  tls:\n    trust_bundle: {d}/root.pem\n    \
             node_ca: {{certificate: {d}/ica.pem, key: {d}/ica-key.pem, certificate_lifetime: {lifetime}}}\n\
             workloads:\n\
             - {{name: far, namespace: ns, service_account: far, ips: [10.0.1.1], node: m}}\n",
            d = dir.display()
        );
        for (i, sa) in local.iter().enumerate() {
            text.push_str(&format!(
                "- {{name: {sa}, namespace: ns, service_account: {sa}, ips: [10.0.0.{}], node: n, netns: p{i}}}\n",
                i + 1
            ));
        }
        State::new(config::load(&text).expect("valid config"), 1)
    }

    #[test]
    fn node_ca_mode_issues_for_local_identities_only_and_renews_at_half_life() {
        let dir = std::env::temp_dir().join(format!("ringtun-creds-nodeca-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let now = SystemTime::now();
        let (_, ica) = write_test_node_ca(&dir, now, 2 * HOUR);
        let id = |sa| SpiffeId::new("cluster.local", "ns", sa).unwrap();

        let state = node_ca_state(&dir, &["web", "db"], "60s");
        assert!(check_files(&state).is_empty(), "{:?}", check_files(&state));
        let mut node_ca = None;
        let creds = load(&state, &unprobed_ktls(), &mut node_ca, now)
            .expect("loads")
            .expect("tls");
        // The local identities only: never the workload on node m.
        let listed: Vec<(String, String)> = creds
            .listing()
            .into_iter()
            .map(|c| (c.identity, c.source))
            .collect();
        assert_eq!(
            listed,
            [
                (id("db").to_uri(), NODE_CA_SOURCE.to_string()),
                (id("web").to_uri(), NODE_CA_SOURCE.to_string()),
            ]
        );
        let json = serde_json::to_string(&creds.listing()).unwrap();
        assert!(!json.contains("PRIVATE") && !json.contains("key"), "{json}");
        let serial = |c: &TunnelCredentials, sa| c.certificates[&id(sa)].serial.clone();
        let next = node_ca.as_ref().and_then(NodeCa::next_renewal);
        assert_eq!(next, Some(now + Duration::from_secs(30)));

        // Before half-life a rebuild presents the same certificates; after it, new ones.
        let early = load(
            &state,
            &unprobed_ktls(),
            &mut node_ca,
            now + Duration::from_secs(29),
        )
        .unwrap()
        .unwrap();
        assert_eq!(serial(&early, "web"), serial(&creds, "web"));
        let late = load(
            &state,
            &unprobed_ktls(),
            &mut node_ca,
            now + Duration::from_secs(31),
        )
        .unwrap()
        .unwrap();
        assert_ne!(serial(&late, "web"), serial(&creds, "web"));
        assert_ne!(serial(&late, "db"), serial(&creds, "db"));
        assert_eq!(node_ca.as_ref().unwrap().issued_total(), 4);

        // A workload added is issued at once; one removed is forgotten.
        let state = node_ca_state(&dir, &["web", "cache"], "60s");
        let t = now + Duration::from_secs(32);
        let added = load(&state, &unprobed_ktls(), &mut node_ca, t)
            .unwrap()
            .unwrap();
        assert_eq!(serial(&added, "web"), serial(&late, "web"));
        assert!(added.certificates.contains_key(&id("cache")));
        assert!(!added.certificates.contains_key(&id("db")));
        assert_eq!(node_ca.as_ref().unwrap().issued_total(), 5);

        // A failed build (the CA's key replaced by another) changes nothing it issued.
        let stranger = DevCa::generate("cluster.local", now, HOUR).unwrap();
        std::fs::write(dir.join("ica-key.pem"), stranger.key_pem()).unwrap();
        let err = load(
            &state,
            &unprobed_ktls(),
            &mut node_ca,
            t + Duration::from_secs(60),
        )
        .err()
        .expect("a foreign key is refused");
        assert!(err.to_string().contains("node.tls.node_ca"), "{err}");
        assert!(err.to_string().contains("ica-key.pem"), "{err}");
        assert_eq!(node_ca.as_ref().unwrap().issued_total(), 5);
        let lines = check_files(&state);
        assert_eq!(lines.len(), 1, "{lines:?}");
        assert!(lines[0].contains("not the private key"), "{lines:?}");

        // A CA outside the trust bundle: check-config names both files.
        std::fs::write(dir.join("ica-key.pem"), &ica.key_pem).unwrap();
        std::fs::write(dir.join("root.pem"), stranger.cert_pem()).unwrap();
        let lines = check_files(&state);
        assert_eq!(lines.len(), 1, "{lines:?}");
        assert!(
            lines[0].contains("ica.pem") && lines[0].contains("does not chain to the trust bundle"),
            "{lines:?}"
        );
        let files: Vec<String> = credential_files(&state)
            .iter()
            .map(|p| p.file_name().unwrap().to_string_lossy().into_owned())
            .collect();
        assert_eq!(files, ["ica-key.pem", "ica.pem", "root.pem"]);
        let _ = std::fs::remove_dir_all(&dir);
    }
}
