//! The policy model: Istio's L4 authorization as istiod sends it to ztunnel over xDS
//! (`istio.security.Authorization`), one Rust type per message, nothing ringtun-specific.
//!
//! Boundary: plain data and the value types it needs (an [`IpBlock`] knows whether it contains an
//! address). Where the data comes from is `convert` (ringtun's YAML, converted the way istiod
//! converts an AuthorizationPolicy) or, later, xDS; how it is evaluated fast is `compile` and
//! `evaluate`. Field names follow the xDS proto, except that the proto's `Group` / `Rules` /
//! `Match` nesting is called [`Rule`] / [`Clause`] / [`Match`] here (ztunnel's names too).
//!
//! The meaning, as ztunnel evaluates it: a policy matches when **any** rule matches; a rule when
//! **all** its clauses match (a rule with no clauses matches every connection); a clause when
//! **any** of its matches matches (a match with no field set is skipped, so a clause whose matches
//! are all empty matches nothing); a match when **every** field it sets matches, where a positive
//! list matches when any value matches and a `not_` list when none does. A policy without rules
//! matches nothing.

use std::fmt;
use std::net::IpAddr;
use std::str::FromStr;

/// One authorization policy (xDS `istio.security.Authorization`).
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct Authorization {
    pub name: String,
    pub namespace: String,
    pub scope: Scope,
    pub action: Action,
    /// Evaluated and reported, never enforced (the `istio.io/dry-run` annotation).
    pub dry_run: bool,
    /// Any one matching makes the policy match; none = the policy matches nothing.
    pub rules: Vec<Rule>,
}

impl Authorization {
    pub fn key(&self) -> PolicyKey {
        PolicyKey {
            namespace: self.namespace.clone(),
            name: self.name.clone(),
        }
    }
}

/// `namespace/name` of a policy: how workloads reference selector-scoped policies
/// (xDS `Workload.authorization_policies`) and how the access log names the policy that decided.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, serde::Serialize)]
pub struct PolicyKey {
    pub namespace: String,
    pub name: String,
}

impl fmt::Display for PolicyKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.namespace, self.name)
    }
}

/// Which workloads a policy applies to (xDS `Scope`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Scope {
    /// Every workload of the mesh (`GLOBAL`: a policy without selector in the root namespace).
    Mesh,
    /// Every workload in the policy's namespace (`NAMESPACE`: no selector).
    Namespace,
    /// Only the workloads that reference it (`WORKLOAD_SELECTOR`: istiod resolves the label
    /// selector and lists the policy in each selected workload's `authorization_policies`).
    WorkloadSelector,
}

/// What a matching policy does (xDS `Action`, plus `Audit`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum Action {
    Allow,
    Deny,
    /// Reported, never enforced. istiod does not send AUDIT policies to ztunnel (they need an
    /// audit provider); ringtun keeps them from its YAML as log-only, so an operator can see
    /// which connections a rule would pick out.
    Audit,
}

/// One rule (xDS `Group`): matches when every clause matches.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Rule {
    /// Matches when every clause matches; with no clauses, every connection.
    AllOf(Vec<Clause>),
    /// Matches no connection. Stands for an ALLOW rule naming attributes L4 cannot see (istiod
    /// drops such a rule from the policy instead); kept so rule indices follow the file.
    Never,
}

/// One clause (xDS `Rules`): matches when any of its matches matches.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize)]
pub struct Clause {
    pub matches: Vec<Match>,
}

/// One match (xDS `Match`): every non-empty field must match.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize)]
pub struct Match {
    /// Compared with the source identity's namespace.
    pub namespaces: Vec<StringMatch>,
    pub not_namespaces: Vec<StringMatch>,
    /// Compared with the source identity without `spiffe://`: `<td>/ns/<ns>/sa/<sa>`.
    pub principals: Vec<StringMatch>,
    pub not_principals: Vec<StringMatch>,
    pub service_accounts: Vec<ServiceAccountMatch>,
    pub not_service_accounts: Vec<ServiceAccountMatch>,
    pub source_ips: Vec<IpBlock>,
    pub not_source_ips: Vec<IpBlock>,
    pub destination_ips: Vec<IpBlock>,
    pub not_destination_ips: Vec<IpBlock>,
    pub destination_ports: Vec<u16>,
    pub not_destination_ports: Vec<u16>,
}

impl Match {
    /// No field set: ztunnel skips such a match (it matches nothing, not everything).
    pub fn is_empty(&self) -> bool {
        self.namespaces.is_empty()
            && self.not_namespaces.is_empty()
            && self.principals.is_empty()
            && self.not_principals.is_empty()
            && self.service_accounts.is_empty()
            && self.not_service_accounts.is_empty()
            && self.source_ips.is_empty()
            && self.not_source_ips.is_empty()
            && self.destination_ips.is_empty()
            && self.not_destination_ips.is_empty()
            && self.destination_ports.is_empty()
            && self.not_destination_ports.is_empty()
    }
}

/// xDS `StringMatch`. Istio's `*` wildcards become these: `*` → presence, `*x` → suffix `x`,
/// `x*` → prefix `x`, anything else → exact.
#[derive(Debug, Clone, PartialEq, Eq, Hash, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum StringMatch {
    Exact(String),
    Prefix(String),
    Suffix(String),
    /// Any non-empty value.
    Presence,
}

impl StringMatch {
    /// The conversion istiod applies to AuthorizationPolicy strings (`stringToMatch`).
    pub fn from_istio_pattern(pattern: &str) -> StringMatch {
        if pattern == "*" {
            StringMatch::Presence
        } else if let Some(suffix) = pattern.strip_prefix('*') {
            StringMatch::Suffix(suffix.to_string())
        } else if let Some(prefix) = pattern.strip_suffix('*') {
            StringMatch::Prefix(prefix.to_string())
        } else {
            StringMatch::Exact(pattern.to_string())
        }
    }
}

/// xDS `ServiceAccountMatch`: the source identity's namespace and service account (any trust
/// domain).
#[derive(Debug, Clone, PartialEq, Eq, Hash, serde::Serialize)]
pub struct ServiceAccountMatch {
    pub namespace: String,
    pub service_account: String,
}

/// A CIDR block (xDS `Address{address, length}`), IPv4 or IPv6, stored with its host bits
/// cleared. An IPv4 block never contains an IPv6 address: callers hand in canonical addresses
/// (IPv4-mapped IPv6 already turned into IPv4).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct IpBlock {
    network: IpAddr,
    prefix_len: u8,
}

/// Why a string is not a CIDR block.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum IpBlockError {
    #[error("`{0}` is not an IP address or CIDR block (e.g. 10.0.0.0/8, fd00::/64, 192.0.2.7)")]
    Syntax(String),
    #[error("prefix length {len} is longer than {max}, the length of an {family} address")]
    PrefixTooLong {
        len: u32,
        max: u8,
        family: &'static str,
    },
}

impl IpBlock {
    /// The block of `len` leading bits of `addr`; bits past `len` are cleared (as Istio and
    /// ztunnel treat `10.0.0.1/24`: the block 10.0.0.0/24).
    ///
    /// # Errors
    /// `len` longer than the address.
    pub fn new(addr: IpAddr, len: u8) -> Result<IpBlock, IpBlockError> {
        let (max, family) = match addr {
            IpAddr::V4(_) => (32, "IPv4"),
            IpAddr::V6(_) => (128, "IPv6"),
        };
        if len > max {
            return Err(IpBlockError::PrefixTooLong {
                len: u32::from(len),
                max,
                family,
            });
        }
        let network = match addr {
            IpAddr::V4(a) => IpAddr::V4((u32::from(a) & v4_mask(len)).into()),
            IpAddr::V6(a) => IpAddr::V6((u128::from(a) & v6_mask(len)).into()),
        };
        Ok(IpBlock {
            network,
            prefix_len: len,
        })
    }

    /// One address: a /32 or /128.
    pub fn host(addr: IpAddr) -> IpBlock {
        let len = if addr.is_ipv4() { 32 } else { 128 };
        IpBlock {
            network: addr,
            prefix_len: len,
        }
    }

    pub fn network(&self) -> IpAddr {
        self.network
    }

    pub fn prefix_len(&self) -> u8 {
        self.prefix_len
    }

    pub fn contains(&self, ip: IpAddr) -> bool {
        match (self.network, ip) {
            (IpAddr::V4(net), IpAddr::V4(a)) => {
                u32::from(a) & v4_mask(self.prefix_len) == u32::from(net)
            }
            (IpAddr::V6(net), IpAddr::V6(a)) => {
                u128::from(a) & v6_mask(self.prefix_len) == u128::from(net)
            }
            _ => false,
        }
    }
}

fn v4_mask(len: u8) -> u32 {
    u32::MAX.checked_shl(32 - u32::from(len)).unwrap_or(0)
}

fn v6_mask(len: u8) -> u128 {
    u128::MAX.checked_shl(128 - u32::from(len)).unwrap_or(0)
}

impl FromStr for IpBlock {
    type Err = IpBlockError;

    /// `a.b.c.d`, `a.b.c.d/len`, an IPv6 address, or `ipv6/len` (what Istio's `ipBlocks` take).
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let syntax = || IpBlockError::Syntax(s.to_string());
        match s.split_once('/') {
            None => s.parse::<IpAddr>().map(IpBlock::host).map_err(|_| syntax()),
            Some((addr, len)) => {
                let addr = addr.parse::<IpAddr>().map_err(|_| syntax())?;
                // Digits only: `+8`, ` 8` and `08x` are typos, not prefix lengths.
                if len.is_empty() || len.len() > 3 || !len.bytes().all(|b| b.is_ascii_digit()) {
                    return Err(syntax());
                }
                let len: u32 = len.parse().map_err(|_| syntax())?;
                let max = if addr.is_ipv4() { 32 } else { 128 };
                match u8::try_from(len) {
                    Ok(l) if l <= max => IpBlock::new(addr, l),
                    _ => Err(IpBlockError::PrefixTooLong {
                        len,
                        max,
                        family: if addr.is_ipv4() { "IPv4" } else { "IPv6" },
                    }),
                }
            }
        }
    }
}

impl fmt::Display for IpBlock {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.network, self.prefix_len)
    }
}

impl serde::Serialize for IpBlock {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn block(s: &str) -> IpBlock {
        s.parse().unwrap_or_else(|e| panic!("{s}: {e}"))
    }

    fn ip(s: &str) -> IpAddr {
        s.parse().expect("test address")
    }

    #[test]
    fn blocks_contain_exactly_their_addresses() {
        let b = block("10.1.0.0/16");
        assert!(b.contains(ip("10.1.0.0")));
        assert!(b.contains(ip("10.1.255.255")));
        assert!(!b.contains(ip("10.2.0.0")));
        assert!(!b.contains(ip("::ffff:10.1.0.1")), "families never mix");
        let all4 = block("0.0.0.0/0");
        assert!(all4.contains(ip("255.255.255.255")));
        assert!(!all4.contains(ip("::1")));
        let all6 = block("::/0");
        assert!(all6.contains(ip("fd00::1")));
        assert!(!all6.contains(ip("10.0.0.1")));
        let host = block("fd00::7");
        assert_eq!(host.prefix_len(), 128);
        assert!(host.contains(ip("fd00::7")));
        assert!(!host.contains(ip("fd00::8")));
        let v6 = block("fd00:1::/32");
        assert!(v6.contains(ip("fd00:1:ffff::1")));
        assert!(!v6.contains(ip("fd00:2::1")));
    }

    #[test]
    fn host_bits_are_cleared_as_istio_does() {
        let b = block("10.0.0.77/24");
        assert_eq!(b.to_string(), "10.0.0.0/24");
        assert!(b.contains(ip("10.0.0.1")));
        assert_eq!(block("192.0.2.7").to_string(), "192.0.2.7/32");
    }

    #[test]
    fn malformed_blocks_say_what_is_wrong() {
        for bad in [
            "",
            "10.0.0.0/",
            "10.0.0/8",
            "10.0.0.0/+8",
            "10.0.0.0/8/8",
            "x",
            "10.0.0.0/ 8",
        ] {
            assert!(
                matches!(bad.parse::<IpBlock>(), Err(IpBlockError::Syntax(_))),
                "{bad:?}"
            );
        }
        let err = "10.0.0.0/33".parse::<IpBlock>().expect_err("too long");
        assert_eq!(
            err.to_string(),
            "prefix length 33 is longer than 32, the length of an IPv4 address"
        );
        assert!("::/129".parse::<IpBlock>().is_err());
        assert!("::/999".parse::<IpBlock>().is_err());
    }

    #[test]
    fn istio_wildcards_become_string_matches() {
        use StringMatch::*;
        assert_eq!(StringMatch::from_istio_pattern("*"), Presence);
        assert_eq!(
            StringMatch::from_istio_pattern("*/sa/web"),
            Suffix("/sa/web".into())
        );
        assert_eq!(
            StringMatch::from_istio_pattern("prod-*"),
            Prefix("prod-".into())
        );
        assert_eq!(
            StringMatch::from_istio_pattern("prod"),
            Exact("prod".into())
        );
    }
}
