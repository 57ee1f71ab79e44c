//! The TLS material of one node snapshot: for every local workload identity, the client side
//! (its certificate, for tunnels it opens) and the server config (what its port 15008 presents),
//! all over one trust bundle; plus the kernel's kTLS support, probed once at start.
//!
//! Boundary: built from files by [`load`] at start and again by every reload; then only read,
//! shared by every reactor through the snapshot. A reload that cannot build it (a missing or
//! mismatched certificate, an unreadable bundle) fails as a whole and the running credentials
//! stay.

use std::collections::{HashMap, HashSet};
use std::path::PathBuf;
use std::sync::Arc;

use rustls::ServerConfig;

use super::{server_config_for, ClientTls, TlsError};
use crate::control_plane::certs::{load_trust_bundle, load_workload_credentials, CertError};
use crate::control_plane::identity::{IdentityError, SpiffeId};
use crate::control_plane::state::State;
use crate::kernel_features::KtlsSupport;

/// TLS material for tunnels, shared by every reactor.
pub struct TunnelCredentials {
    /// Client side per local identity (the source workload's certificate).
    pub client: HashMap<SpiffeId, ClientTls>,
    /// Server config per local identity (what 15008 presents for that pod).
    pub server: HashMap<SpiffeId, Arc<ServerConfig>>,
    pub ktls: KtlsSupport,
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
}

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

/// Loads the trust bundle and every local workload's certificate. `None` without `node.tls`:
/// tunnels are off and HBONE routes refused.
pub fn load(
    state: &State,
    ktls: &KtlsSupport,
) -> Result<Option<TunnelCredentials>, CredentialsErrors> {
    Ok(read(state)?.map(|(client, server)| TunnelCredentials {
        client,
        server,
        ktls: ktls.clone(),
    }))
}

/// The client and server sides per local identity.
type Sides = (
    HashMap<SpiffeId, ClientTls>,
    HashMap<SpiffeId, Arc<ServerConfig>>,
);

fn read(state: &State) -> Result<Option<Sides>, CredentialsErrors> {
    let node = &state.config.node;
    let Some(tls) = &node.tls else {
        return Ok(None);
    };
    let mut problems = Vec::new();
    let trust = load_trust_bundle(&tls.trust_bundle)
        .map_err(|e| problems.push(CredentialsError::TrustBundle(Box::new(e))))
        .ok();
    if let Err(source) = std::fs::read_dir(&tls.certificate_dir) {
        problems.push(CredentialsError::CertificateDir {
            dir: tls.certificate_dir.clone(),
            source,
        });
    }
    let mut client = HashMap::new();
    let mut server = HashMap::new();
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
        let creds = match load_workload_credentials(&tls.certificate_dir, &id) {
            Ok(c) => c,
            Err(source) => {
                problems.push(CredentialsError::Certificate {
                    workload,
                    id,
                    source: Box::new(source),
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
                server.insert(id, s);
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
    log::info!(
        "HBONE tunnels: {} local identities, trust bundle {} ({} CA certificates)",
        client.len(),
        tls.trust_bundle.display(),
        trust.as_ref().map_or(0, |t| t.len())
    );
    Ok(Some((client, server)))
}

/// Everything a node would refuse about the files a valid config names (the trust bundle, the
/// certificate directory, each local workload's certificate and key), each as one line: what
/// `check-config` reports beyond the file itself; `run` exits 64 for the same.
pub fn check_files(state: &State) -> Vec<String> {
    match read(state) {
        Ok(_) => Vec::new(),
        Err(e) => e.0.iter().map(ToString::to_string).collect(),
    }
}
