//! The TLS material of one node snapshot: for every local workload identity, the client side
//! (its certificate, for tunnels it opens) and the server config (what its port 15008 presents),
//! all over one trust bundle; plus the kernel's kTLS support, probed once at start.
//!
//! Boundary: built from files by [`load`] at start and again by every reload; then only read,
//! shared by every reactor through the snapshot. A reload that cannot build it (a missing or
//! mismatched certificate, an unreadable bundle) fails as a whole and the running credentials
//! stay.

use std::collections::HashMap;
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
    #[error("node.tls: {0}")]
    TrustBundle(Box<CertError>),
    #[error("workload identity {identity}: {source}")]
    Identity {
        identity: String,
        source: IdentityError,
    },
    #[error("certificate for {id}: {source}")]
    Certificate {
        id: SpiffeId,
        source: Box<CertError>,
    },
    #[error("TLS for {id}: {source}")]
    Tls { id: SpiffeId, source: Box<TlsError> },
}

/// Loads the trust bundle and every local workload's certificate. `None` without `node.tls`:
/// tunnels are off and HBONE routes refused.
pub fn load(
    state: &State,
    ktls: &KtlsSupport,
) -> Result<Option<TunnelCredentials>, CredentialsError> {
    let node = &state.config.node;
    let Some(tls) = &node.tls else {
        return Ok(None);
    };
    let trust = load_trust_bundle(&tls.trust_bundle)
        .map_err(|e| CredentialsError::TrustBundle(Box::new(e)))?;
    let mut client = HashMap::new();
    let mut server = HashMap::new();
    for (_, entry) in state.registry.local_workloads() {
        let id = SpiffeId::parse(&entry.identity).map_err(|source| CredentialsError::Identity {
            identity: entry.identity.clone(),
            source,
        })?;
        if client.contains_key(&id) {
            continue;
        }
        let creds = load_workload_credentials(&tls.certificate_dir, &id).map_err(|source| {
            CredentialsError::Certificate {
                id: id.clone(),
                source: Box::new(source),
            }
        })?;
        let tls_error = |source| CredentialsError::Tls {
            id: id.clone(),
            source: Box::new(source),
        };
        let c = ClientTls::new_for(&creds, &trust, node.hbone.cipher).map_err(tls_error)?;
        let s = server_config_for(&creds, &trust, &node.trust_domain, node.hbone.cipher)
            .map_err(tls_error)?;
        client.insert(id.clone(), c);
        server.insert(id, s);
    }
    log::info!(
        "HBONE tunnels: {} local identities, trust bundle {} ({} CA certificates)",
        client.len(),
        tls.trust_bundle.display(),
        trust.len()
    );
    Ok(Some(TunnelCredentials {
        client,
        server,
        ktls: ktls.clone(),
    }))
}
