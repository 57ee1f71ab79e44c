//! istiod's CA as ztunnel uses it, without IO: the certificate request for one workload
//! identity and the check of what comes back ([`request`], [`accept`]); when to ask
//! ([`schedule`]).
//!
//! A node proxy holds certificates for the identities of its local workloads, not its own: it
//! authenticates as itself (its service-account token, sent by the caller) and asks for
//! `spiffe://<td>/ns/<ns>/sa/<sa>` in the request's `ImpersonatedIdentity` metadata; istiod
//! grants it only for an identity with a pod on this node. Every request has a fresh ECDSA
//! P-256 key that never leaves the process. The answer is a PEM chain, leaf first, the trust
//! roots (possibly several, concatenated) last; the roots become what peers are verified
//! against. A leaf for another identity or another key, or already expired, is refused.

pub mod client;
pub mod schedule;

use std::time::{Duration, SystemTime};

use istio_api::istio::v1::auth::{IstioCertificateRequest, IstioCertificateResponse};
use istio_api::prost_types::{value::Kind, Struct, Value};
use rcgen::{
    CertificateParams, DistinguishedName, KeyPair, PublicKeyData, SanType, PKCS_ECDSA_P256_SHA256,
};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};

use super::certs::{asn1_time, spiffe_uri_san, WorkloadCredentials};
use super::identity::SpiffeId;

/// The metadata key that names the identity a node proxy asks for.
pub const IMPERSONATED_IDENTITY: &str = "ImpersonatedIdentity";

/// A request ready to send, and the key its certificate will belong to.
pub struct Request {
    pub id: SpiffeId,
    pub message: IstioCertificateRequest,
    key: KeyPair,
}

impl std::fmt::Debug for Request {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Request")
            .field("id", &self.id)
            .field("message", &self.message)
            .finish_non_exhaustive()
    }
}

/// A certificate istiod issued, checked.
#[derive(Debug, Clone)]
pub struct Issued {
    /// Leaf and intermediates (not the roots), with the request's key.
    pub credentials: WorkloadCredentials,
    /// The trust roots from the chain's last element.
    pub roots: Vec<CertificateDer<'static>>,
    pub not_before: SystemTime,
    pub not_after: SystemTime,
}

/// Why an answer from the CA is not used.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Refused {
    #[error("the CA sent an empty chain")]
    EmptyChain,
    #[error("chain element {index}: {detail}")]
    Unreadable { index: usize, detail: String },
    #[error("the chain has no root after the leaf")]
    NoRoot,
    #[error("the certificate is for {got}, not the {wanted} asked for")]
    WrongIdentity { wanted: String, got: String },
    #[error("the certificate is not for the key of the request")]
    WrongKey,
    #[error("the certificate expired at {0:?}, before it arrived")]
    Expired(SystemTime),
}

/// A request for `id`'s certificate, valid for `validity` (ztunnel asks for 24 h; istiod
/// refuses more than its maximum, 90 days by default).
///
/// # Errors
/// Only if key generation or CSR encoding fails (rcgen).
pub fn request(id: &SpiffeId, validity: Duration) -> Result<Request, rcgen::Error> {
    let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256)?;
    let mut params = CertificateParams::default();
    // As ztunnel's: the identity as the one URI SAN, an empty subject (istiod replaces the
    // SANs with the identity it authorises anyway).
    params.distinguished_name = DistinguishedName::new();
    params.subject_alt_names = vec![SanType::URI(id.to_uri().try_into()?)];
    let csr = params.serialize_request(&key)?.pem()?;
    let metadata = Struct {
        fields: [(
            IMPERSONATED_IDENTITY.to_string(),
            Value {
                kind: Some(Kind::StringValue(id.to_uri())),
            },
        )]
        .into(),
    };
    Ok(Request {
        id: id.clone(),
        message: IstioCertificateRequest {
            csr,
            validity_duration: i64::try_from(validity.as_secs()).unwrap_or(i64::MAX),
            metadata: Some(metadata),
        },
        key,
    })
}

/// Checks the CA's answer to `request` and turns it into credentials.
///
/// # Errors
/// [`Refused`]: an empty or unreadable chain, no root, a leaf for another identity or key, or
/// one that has already expired at `now`.
pub fn accept(
    request: Request,
    response: &IstioCertificateResponse,
    now: SystemTime,
) -> Result<Issued, Refused> {
    let chain = &response.cert_chain;
    if chain.is_empty() {
        return Err(Refused::EmptyChain);
    }
    if chain.len() < 2 {
        return Err(Refused::NoRoot);
    }
    let parse = |index: usize, pem: &str| -> Result<Vec<CertificateDer<'static>>, Refused> {
        let certs = CertificateDer::pem_slice_iter(pem.as_bytes())
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| Refused::Unreadable {
                index,
                detail: e.to_string(),
            })?;
        if certs.is_empty() {
            return Err(Refused::Unreadable {
                index,
                detail: "no PEM certificate".into(),
            });
        }
        Ok(certs)
    };
    let mut certificates = Vec::new();
    for (index, pem) in chain[..chain.len() - 1].iter().enumerate() {
        certificates.extend(parse(index, pem)?);
    }
    let roots = parse(chain.len() - 1, &chain[chain.len() - 1])?;
    let leaf = &certificates[0];
    let unreadable = |detail: String| Refused::Unreadable { index: 0, detail };
    let got = spiffe_uri_san(leaf).map_err(unreadable)?;
    if got != request.id.to_uri() {
        return Err(Refused::WrongIdentity {
            wanted: request.id.to_uri(),
            got,
        });
    }
    let (_, parsed) =
        x509_parser::parse_x509_certificate(leaf).map_err(|e| unreadable(e.to_string()))?;
    if parsed.public_key().raw != request.key.subject_public_key_info().as_slice() {
        return Err(Refused::WrongKey);
    }
    let not_before = asn1_time(parsed.validity().not_before);
    let not_after = asn1_time(parsed.validity().not_after);
    if not_after <= now {
        return Err(Refused::Expired(not_after));
    }
    Ok(Issued {
        credentials: WorkloadCredentials {
            id: request.id,
            chain: certificates,
            key: PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(request.key.serialize_der())),
        },
        roots,
        not_before,
        not_after,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::control_plane::certs::DevCa;

    const DAY: Duration = Duration::from_secs(86_400);

    fn id(sa: &str) -> SpiffeId {
        SpiffeId::new("cluster.local", "shop", sa).unwrap()
    }

    /// A CA that answers as istiod does: leaf, then the root.
    fn answer(
        ca: &DevCa,
        req: &Request,
        as_id: &SpiffeId,
        now: SystemTime,
    ) -> IstioCertificateResponse {
        let leaf = ca
            .sign_request(&req.message.csr, as_id, now, DAY)
            .expect("signs the request");
        IstioCertificateResponse {
            cert_chain: vec![leaf, ca.cert_pem().to_string()],
        }
    }

    #[test]
    fn a_request_impersonates_the_identity_with_a_fresh_key() {
        let a = request(&id("cart"), DAY).unwrap();
        let b = request(&id("cart"), DAY).unwrap();
        assert!(a
            .message
            .csr
            .starts_with("-----BEGIN CERTIFICATE REQUEST-----"));
        assert_ne!(a.message.csr, b.message.csr, "a fresh key each time");
        assert_eq!(a.message.validity_duration, 86_400);
        let meta = &a.message.metadata.as_ref().unwrap().fields[IMPERSONATED_IDENTITY];
        assert_eq!(
            meta.kind,
            Some(Kind::StringValue(
                "spiffe://cluster.local/ns/shop/sa/cart".into()
            ))
        );
    }

    #[test]
    fn an_answer_for_the_identity_and_key_becomes_credentials_and_roots() {
        let now = SystemTime::now();
        let ca = DevCa::generate("cluster.local", now, 10 * DAY).unwrap();
        let req = request(&id("cart"), DAY).unwrap();
        let resp = answer(&ca, &req, &id("cart"), now);
        let issued = accept(req, &resp, now).unwrap();
        assert_eq!(issued.credentials.id, id("cart"));
        assert_eq!(issued.credentials.chain.len(), 1);
        assert_eq!(issued.roots, vec![ca.cert_der().clone()]);
        let life = issued.not_after.duration_since(issued.not_before).unwrap();
        assert!(
            life >= DAY && life <= DAY + Duration::from_secs(600),
            "{life:?}"
        );
    }

    #[test]
    fn a_wrong_identity_key_or_chain_is_refused() {
        let now = SystemTime::now();
        let ca = DevCa::generate("cluster.local", now, 10 * DAY).unwrap();

        let req = request(&id("cart"), DAY).unwrap();
        let resp = answer(&ca, &req, &id("admin"), now);
        assert_eq!(
            accept(req, &resp, now).unwrap_err(),
            Refused::WrongIdentity {
                wanted: "spiffe://cluster.local/ns/shop/sa/cart".into(),
                got: "spiffe://cluster.local/ns/shop/sa/admin".into()
            }
        );

        // A certificate for the identity, but for someone else's key.
        let other = request(&id("cart"), DAY).unwrap();
        let req = request(&id("cart"), DAY).unwrap();
        let resp = answer(&ca, &other, &id("cart"), now);
        assert_eq!(accept(req, &resp, now).unwrap_err(), Refused::WrongKey);

        let req = request(&id("cart"), DAY).unwrap();
        let mut resp = answer(&ca, &req, &id("cart"), now);
        resp.cert_chain.pop();
        assert_eq!(accept(req, &resp, now).unwrap_err(), Refused::NoRoot);

        let req = request(&id("cart"), DAY).unwrap();
        let empty = IstioCertificateResponse { cert_chain: vec![] };
        assert_eq!(accept(req, &empty, now).unwrap_err(), Refused::EmptyChain);

        let req = request(&id("cart"), DAY).unwrap();
        let mut resp = answer(&ca, &req, &id("cart"), now);
        resp.cert_chain[1] = "not PEM".into();
        assert!(matches!(
            accept(req, &resp, now).unwrap_err(),
            Refused::Unreadable { index: 1, .. }
        ));

        let req = request(&id("cart"), DAY).unwrap();
        let resp = answer(&ca, &req, &id("cart"), now);
        assert!(matches!(
            accept(req, &resp, now + 2 * DAY).unwrap_err(),
            Refused::Expired(_)
        ));
    }
}
