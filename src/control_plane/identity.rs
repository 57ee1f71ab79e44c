//! Mesh identities: the SPIFFE ID `spiffe://<trust-domain>/ns/<namespace>/sa/<service-account>`
//! that a workload certificate carries as its single URI SAN and that Istio's ztunnel speaks.
//!
//! Boundary: this module only parses, validates and formats identities; it never reads a
//! certificate (see `certs` and `tls`). Parsing is strict — one spelling per
//! identity — because identities are compared as values when a tunnel's peer is checked: the
//! trust domain is a lowercase DNS name, the namespace a DNS label and the service account a
//! DNS subdomain (what Kubernetes allows, and what the config loader accepts for
//! `service_account`). No percent-encoding, query, fragment, port, user info or extra path
//! segments are accepted.

use std::fmt;
use std::str::FromStr;

/// The SPIFFE URI scheme prefix.
const SCHEME: &str = "spiffe://";
/// SPIFFE IDs are limited to 2048 bytes (SPIFFE-ID spec §2.3).
const MAX_ID_LEN: usize = 2048;

/// Why a string is not a mesh identity. Each variant names the part at fault.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum IdentityError {
    #[error("`{0}` is not a SPIFFE ID: it must start with `spiffe://`")]
    NotSpiffe(String),
    #[error("SPIFFE ID is {0} bytes long; at most 2048 are allowed")]
    TooLong(usize),
    #[error(
        "trust domain `{0}` is invalid: dot-separated DNS labels of lowercase letters, digits \
         or '-', at most 253 characters, no port or user info"
    )]
    TrustDomain(String),
    #[error("SPIFFE ID `{0}` has no path: expected spiffe://<trust-domain>/ns/<namespace>/sa/<service-account>")]
    MissingPath(String),
    #[error(
        "SPIFFE path `{0}` is not /ns/<namespace>/sa/<service-account> (no query, fragment, \
         percent-encoding, empty or extra segments)"
    )]
    Path(String),
    #[error(
        "namespace `{0}` is not a DNS label: 1 to 63 lowercase letters, digits or '-', starting \
         and ending with a letter or digit"
    )]
    Namespace(String),
    #[error(
        "service account `{0}` is not a DNS subdomain: dot-separated DNS labels, at most 253 \
         characters"
    )]
    ServiceAccount(String),
}

/// A validated workload identity. Two identities are equal exactly when their URIs are equal.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, serde::Serialize)]
pub struct SpiffeId {
    trust_domain: String,
    namespace: String,
    service_account: String,
}

impl SpiffeId {
    /// Builds an identity from its parts, validating each.
    ///
    /// # Errors
    /// The first part that is invalid.
    pub fn new(
        trust_domain: &str,
        namespace: &str,
        service_account: &str,
    ) -> Result<Self, IdentityError> {
        if !is_dns_name(trust_domain) {
            return Err(IdentityError::TrustDomain(trust_domain.to_string()));
        }
        if !is_dns_label(namespace) {
            return Err(IdentityError::Namespace(namespace.to_string()));
        }
        if !is_dns_name(service_account) {
            return Err(IdentityError::ServiceAccount(service_account.to_string()));
        }
        Ok(Self {
            trust_domain: trust_domain.to_string(),
            namespace: namespace.to_string(),
            service_account: service_account.to_string(),
        })
    }

    /// Parses `spiffe://<trust-domain>/ns/<namespace>/sa/<service-account>`.
    ///
    /// # Errors
    /// What is wrong with the text, naming the part at fault.
    pub fn parse(text: &str) -> Result<Self, IdentityError> {
        if text.len() > MAX_ID_LEN {
            return Err(IdentityError::TooLong(text.len()));
        }
        let rest = text
            .strip_prefix(SCHEME)
            .ok_or_else(|| IdentityError::NotSpiffe(text.to_string()))?;
        let (trust_domain, path) = match rest.find('/') {
            Some(i) => rest.split_at(i),
            None if is_dns_name(rest) => return Err(IdentityError::MissingPath(text.to_string())),
            None => return Err(IdentityError::TrustDomain(rest.to_string())),
        };
        if !is_dns_name(trust_domain) {
            return Err(IdentityError::TrustDomain(trust_domain.to_string()));
        }
        let segments: Vec<&str> = path.split('/').collect();
        // path starts with '/', so segments[0] is the empty string before it.
        let ["", "ns", namespace, "sa", service_account] = segments[..] else {
            return Err(IdentityError::Path(path.to_string()));
        };
        Self::new(trust_domain, namespace, service_account)
    }

    pub fn trust_domain(&self) -> &str {
        &self.trust_domain
    }

    pub fn namespace(&self) -> &str {
        &self.namespace
    }

    pub fn service_account(&self) -> &str {
        &self.service_account
    }

    /// The URI form, as it appears in a certificate's URI SAN.
    pub fn to_uri(&self) -> String {
        self.to_string()
    }
}

impl fmt::Display for SpiffeId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{SCHEME}{}/ns/{}/sa/{}",
            self.trust_domain, self.namespace, self.service_account
        )
    }
}

impl FromStr for SpiffeId {
    type Err = IdentityError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::parse(s)
    }
}

/// RFC 1123 label, lowercase only (as Kubernetes names are).
pub(crate) fn is_dns_label(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 63
        && s.bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && !s.starts_with('-')
        && !s.ends_with('-')
}

/// Dot-separated lowercase labels, at most 253 characters.
pub(crate) fn is_dns_name(s: &str) -> bool {
    s.len() <= 253 && s.split('.').all(is_dns_label)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_and_formats_the_istio_form() {
        let id = SpiffeId::parse("spiffe://cluster.local/ns/default/sa/client").expect("valid");
        assert_eq!(id.trust_domain(), "cluster.local");
        assert_eq!(id.namespace(), "default");
        assert_eq!(id.service_account(), "client");
        assert_eq!(
            id.to_string(),
            "spiffe://cluster.local/ns/default/sa/client"
        );
        assert_eq!(
            id,
            SpiffeId::new("cluster.local", "default", "client").expect("valid")
        );
        assert_eq!(
            id,
            "spiffe://cluster.local/ns/default/sa/client"
                .parse()
                .expect("valid")
        );
        // Service accounts may be DNS subdomains, as in Kubernetes.
        let id = SpiffeId::parse("spiffe://td/ns/a-1/sa/my.sa-2").expect("valid");
        assert_eq!(id.service_account(), "my.sa-2");
        assert_eq!(SpiffeId::parse(&id.to_uri()), Ok(id));
    }

    #[test]
    fn rejects_other_schemes_and_spellings() {
        for text in [
            "https://cluster.local/ns/a/sa/b",
            "SPIFFE://cluster.local/ns/a/sa/b",
            "spiffe:/cluster.local/ns/a/sa/b",
            "",
        ] {
            assert!(
                matches!(SpiffeId::parse(text), Err(IdentityError::NotSpiffe(_))),
                "{text}"
            );
        }
    }

    #[test]
    fn rejects_bad_trust_domains() {
        for (text, td) in [
            ("spiffe://Cluster.local/ns/a/sa/b", "Cluster.local"),
            ("spiffe://cluster.local:443/ns/a/sa/b", "cluster.local:443"),
            ("spiffe://user@td/ns/a/sa/b", "user@td"),
            ("spiffe:///ns/a/sa/b", ""),
            ("spiffe://a..b/ns/a/sa/b", "a..b"),
            ("spiffe://-a/ns/a/sa/b", "-a"),
            ("spiffe://td_x/ns/a/sa/b", "td_x"),
        ] {
            assert_eq!(
                SpiffeId::parse(text),
                Err(IdentityError::TrustDomain(td.to_string())),
                "{text}"
            );
        }
        assert_eq!(
            SpiffeId::parse("spiffe://cluster.local"),
            Err(IdentityError::MissingPath("spiffe://cluster.local".into()))
        );
        let long = format!("spiffe://{}/ns/a/sa/b", "a".repeat(2100));
        assert_eq!(
            SpiffeId::parse(&long),
            Err(IdentityError::TooLong(long.len()))
        );
    }

    #[test]
    fn rejects_paths_other_than_ns_sa() {
        for path in [
            "/",
            "/ns/a",
            "/ns/a/sa",
            "/ns/a/sa/",
            "/ns/a/sa/b/",
            "/ns/a/sa/b/extra",
            "/sa/b/ns/a",
            "/ns//sa/b",
            "//ns/a/sa/b",
            "/NS/a/sa/b",
            "/ns/a/sa/b?x=1",
            "/ns/a/sa/b#frag",
        ] {
            let text = format!("spiffe://td{path}");
            let err = SpiffeId::parse(&text).expect_err(&text);
            assert!(
                matches!(
                    err,
                    IdentityError::Path(_)
                        | IdentityError::Namespace(_)
                        | IdentityError::ServiceAccount(_)
                ),
                "{text}: {err}"
            );
        }
        assert_eq!(
            SpiffeId::parse("spiffe://td/ns/a/sa/b/extra"),
            Err(IdentityError::Path("/ns/a/sa/b/extra".into()))
        );
    }

    #[test]
    fn namespace_and_service_account_are_validated_with_their_own_message() {
        assert_eq!(
            SpiffeId::parse("spiffe://td/ns/Prod/sa/b"),
            Err(IdentityError::Namespace("Prod".into()))
        );
        assert_eq!(
            SpiffeId::parse("spiffe://td/ns/a.b/sa/b"),
            Err(IdentityError::Namespace("a.b".into()))
        );
        assert_eq!(
            SpiffeId::parse("spiffe://td/ns/a/sa/b%20c"),
            Err(IdentityError::ServiceAccount("b%20c".into()))
        );
        let err = SpiffeId::new("td", "a", "-bad").expect_err("invalid");
        assert_eq!(
            err.to_string(),
            "service account `-bad` is not a DNS subdomain: dot-separated DNS labels, at most \
             253 characters"
        );
        assert!(SpiffeId::new("td", &"a".repeat(64), "b").is_err());
        assert!(SpiffeId::new("td", &"a".repeat(63), "b").is_ok());
    }
}
