//! `istio.security.Authorization` → ringtun's policy model ([`Authorization`]).
//!
//! The policy model was written after this message, so the conversion is structural: a
//! `Group` is a [`Rule::AllOf`], its `Rules` are [`Clause`]s, each `Match` a [`Match`]. What the
//! evaluator makes of empty rules, clauses and matches is the evaluator's (ztunnel's meaning,
//! see `policy::model`); nothing is dropped here.
//!
//! Where ztunnel drops what it cannot read (an address of the wrong length, a string match
//! without a value) or truncates it (a port above 65535), the policy would quietly mean
//! something else: a `not_source_ips` entry dropped from a DENY lets that source through. Here
//! such a policy is rejected with the place and the reason, and [`Rejected::fail_closed`] is
//! what to enforce in its stead: a DENY that matches every connection in its scope, or an
//! ALLOW that matches none (so it still makes its scope allow-listed). An action ringtun does
//! not know has no fail-closed form: it is rejected alone.

use istio_api::istio::security as xds;
use istio_api::istio::security::string_match::MatchType;

use istio_api::prost_types::Any;

use super::{check_name, decode_resource, ip_from_bytes};
use crate::control_plane::policy::{
    Action, Authorization, Clause, IpBlock, Match, Rule, Scope, ServiceAccountMatch, StringMatch,
};

/// A policy istiod sent that ringtun will not enforce as written.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rejected {
    /// For the NACK and the log: `<path in the resource>: <why>`.
    pub reason: String,
    /// What to enforce instead, when the policy's name, scope and action are known.
    pub fail_closed: Option<Authorization>,
}

/// Decodes and converts one resource of a push, checking it is what its name says
/// (`namespace/name`).
///
/// # Errors
/// [`Rejected`] when the bytes do not decode, the type URL is not the Authorization type, the
/// name is not the policy's key (all without a stand-in: nothing trustworthy names the policy),
/// or [`from_xds`] rejects it.
pub fn from_resource(name: &str, any: &Any) -> Result<Authorization, Rejected> {
    let reject = |reason: String| Rejected {
        reason,
        fail_closed: None,
    };
    let p: xds::Authorization =
        decode_resource(istio_api::AUTHORIZATION_TYPE_URL, any).map_err(reject)?;
    check_name(name, &format!("{}/{}", p.namespace, p.name)).map_err(reject)?;
    from_xds(&p)
}

/// Converts one pushed policy.
///
/// # Errors
/// [`Rejected`] when a field cannot be read as Istio defines it.
pub fn from_xds(p: &xds::Authorization) -> Result<Authorization, Rejected> {
    let reject = |reason: String| Rejected {
        reason,
        fail_closed: None,
    };
    if p.name.is_empty() || p.namespace.is_empty() {
        return Err(reject("a policy needs a name and a namespace".into()));
    }
    let scope = match xds::Scope::try_from(p.scope) {
        Ok(xds::Scope::Global) => Scope::Mesh,
        Ok(xds::Scope::Namespace) => Scope::Namespace,
        Ok(xds::Scope::WorkloadSelector) => Scope::WorkloadSelector,
        Err(_) => return Err(reject(format!("scope: unknown value {}", p.scope))),
    };
    let action = match xds::Action::try_from(p.action) {
        Ok(xds::Action::Allow) => Action::Allow,
        Ok(xds::Action::Deny) => Action::Deny,
        Err(_) => return Err(reject(format!("action: unknown value {}", p.action))),
    };
    let policy = |rules| Authorization {
        name: p.name.clone(),
        namespace: p.namespace.clone(),
        scope,
        action,
        dry_run: p.dry_run,
        rules,
    };
    let rules = p
        .groups
        .iter()
        .enumerate()
        .map(|(g, group)| {
            let clauses = group
                .rules
                .iter()
                .enumerate()
                .map(|(r, rules)| {
                    let matches = rules
                        .matches
                        .iter()
                        .enumerate()
                        .map(|(m, x)| {
                            convert_match(x)
                                .map_err(|e| format!("groups[{g}].rules[{r}].matches[{m}].{e}"))
                        })
                        .collect::<Result<Vec<_>, _>>()?;
                    Ok(Clause { matches })
                })
                .collect::<Result<Vec<_>, String>>()?;
            Ok(Rule::AllOf(clauses))
        })
        .collect::<Result<Vec<_>, String>>();
    match rules {
        Ok(rules) => Ok(policy(rules)),
        Err(reason) => {
            // Every connection for a DENY (a rule without clauses), none for an ALLOW.
            let stand_in = match action {
                Action::Deny => Rule::AllOf(Vec::new()),
                _ => Rule::Never,
            };
            Err(Rejected {
                reason,
                fail_closed: Some(policy(vec![stand_in])),
            })
        }
    }
}

fn convert_match(m: &xds::Match) -> Result<Match, String> {
    Ok(Match {
        namespaces: strings("namespaces", &m.namespaces)?,
        not_namespaces: strings("not_namespaces", &m.not_namespaces)?,
        principals: strings("principals", &m.principals)?,
        not_principals: strings("not_principals", &m.not_principals)?,
        service_accounts: accounts(&m.service_accounts),
        not_service_accounts: accounts(&m.not_service_accounts),
        source_ips: blocks("source_ips", &m.source_ips)?,
        not_source_ips: blocks("not_source_ips", &m.not_source_ips)?,
        destination_ips: blocks("destination_ips", &m.destination_ips)?,
        not_destination_ips: blocks("not_destination_ips", &m.not_destination_ips)?,
        destination_ports: ports("destination_ports", &m.destination_ports)?,
        not_destination_ports: ports("not_destination_ports", &m.not_destination_ports)?,
    })
}

fn strings(field: &str, list: &[xds::StringMatch]) -> Result<Vec<StringMatch>, String> {
    list.iter()
        .enumerate()
        .map(|(i, s)| match &s.match_type {
            Some(MatchType::Exact(v)) => Ok(StringMatch::Exact(v.clone())),
            Some(MatchType::Prefix(v)) => Ok(StringMatch::Prefix(v.clone())),
            Some(MatchType::Suffix(v)) => Ok(StringMatch::Suffix(v.clone())),
            Some(MatchType::Presence(())) => Ok(StringMatch::Presence),
            None => Err(format!(
                "{field}[{i}]: a string match with no kind (exact, prefix, suffix or presence)"
            )),
        })
        .collect()
}

fn accounts(list: &[xds::ServiceAccountMatch]) -> Vec<ServiceAccountMatch> {
    list.iter()
        .map(|a| ServiceAccountMatch {
            namespace: a.namespace.clone(),
            service_account: a.service_account.clone(),
        })
        .collect()
}

fn blocks(field: &str, list: &[xds::Address]) -> Result<Vec<IpBlock>, String> {
    list.iter()
        .enumerate()
        .map(|(i, a)| {
            let ip = ip_from_bytes(&a.address).map_err(|e| format!("{field}[{i}]: {e}"))?;
            let len = u8::try_from(a.length).unwrap_or(u8::MAX);
            IpBlock::new(ip, len).map_err(|e| format!("{field}[{i}]: {e}"))
        })
        .collect()
}

fn ports(field: &str, list: &[u32]) -> Result<Vec<u16>, String> {
    list.iter()
        .enumerate()
        .map(|(i, &p)| {
            u16::try_from(p).map_err(|_| format!("{field}[{i}]: port {p} is above 65535"))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn exact(s: &str) -> xds::StringMatch {
        xds::StringMatch {
            match_type: Some(MatchType::Exact(s.into())),
        }
    }

    fn policy(action: xds::Action, groups: Vec<xds::Group>) -> xds::Authorization {
        xds::Authorization {
            name: "p".into(),
            namespace: "ns".into(),
            scope: xds::Scope::Namespace as i32,
            action: action as i32,
            groups,
            dry_run: false,
        }
    }

    fn one_match(m: xds::Match) -> Vec<xds::Group> {
        vec![xds::Group {
            rules: vec![xds::Rules { matches: vec![m] }],
        }]
    }

    /// The static STRICT policy istiod derives from PeerAuthentication: a DENY of every
    /// connection without a principal, referenced by the workloads it selects.
    #[test]
    fn the_static_strict_policy_converts_field_for_field() {
        let p = xds::Authorization {
            name: "istio_converted_static_strict".into(),
            namespace: "istio-system".into(),
            scope: xds::Scope::WorkloadSelector as i32,
            action: xds::Action::Deny as i32,
            groups: one_match(xds::Match {
                not_principals: vec![xds::StringMatch {
                    match_type: Some(MatchType::Presence(())),
                }],
                ..xds::Match::default()
            }),
            dry_run: false,
        };
        let got = from_xds(&p).unwrap();
        assert_eq!(got.scope, Scope::WorkloadSelector);
        assert_eq!(got.action, Action::Deny);
        assert_eq!(
            got.rules,
            vec![Rule::AllOf(vec![Clause {
                matches: vec![Match {
                    not_principals: vec![StringMatch::Presence],
                    ..Match::default()
                }]
            }])]
        );
    }

    #[test]
    fn every_field_of_a_match_arrives() {
        let block = |b: &[u8], len| xds::Address {
            address: b.to_vec(),
            length: len,
        };
        let m = xds::Match {
            namespaces: vec![exact("a")],
            not_namespaces: vec![exact("b")],
            principals: vec![xds::StringMatch {
                match_type: Some(MatchType::Suffix("/sa/c".into())),
            }],
            not_principals: vec![xds::StringMatch {
                match_type: Some(MatchType::Prefix("td/ns/d".into())),
            }],
            source_ips: vec![block(&[10, 1, 2, 3], 8)],
            not_source_ips: vec![block(&[10, 9, 9, 9], 32)],
            destination_ips: vec![block(
                &[0xfd, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1],
                64,
            )],
            not_destination_ips: vec![block(&[192, 0, 2, 1], 24)],
            destination_ports: vec![80, 443],
            not_destination_ports: vec![8080],
            service_accounts: vec![xds::ServiceAccountMatch {
                namespace: "e".into(),
                service_account: "f".into(),
            }],
            not_service_accounts: vec![xds::ServiceAccountMatch {
                namespace: "g".into(),
                service_account: "h".into(),
            }],
        };
        let got = from_xds(&policy(xds::Action::Allow, one_match(m))).unwrap();
        let Rule::AllOf(clauses) = &got.rules[0] else {
            panic!("{:?}", got.rules)
        };
        let m = &clauses[0].matches[0];
        assert_eq!(m.namespaces, vec![StringMatch::Exact("a".into())]);
        assert_eq!(m.not_namespaces, vec![StringMatch::Exact("b".into())]);
        assert_eq!(m.principals, vec![StringMatch::Suffix("/sa/c".into())]);
        assert_eq!(
            m.not_principals,
            vec![StringMatch::Prefix("td/ns/d".into())]
        );
        assert_eq!(m.source_ips, vec!["10.0.0.0/8".parse().unwrap()]);
        assert_eq!(m.not_source_ips, vec!["10.9.9.9/32".parse().unwrap()]);
        assert_eq!(m.destination_ips, vec!["fd00::/64".parse().unwrap()]);
        assert_eq!(m.not_destination_ips, vec!["192.0.2.0/24".parse().unwrap()]);
        assert_eq!(m.destination_ports, vec![80, 443]);
        assert_eq!(m.not_destination_ports, vec![8080]);
        assert_eq!(m.service_accounts[0].service_account, "f");
        assert_eq!(m.not_service_accounts[0].namespace, "g");
    }

    /// Empty groups, rules and matches reach the evaluator as they came: their meaning is its.
    #[test]
    fn empty_parts_are_kept_for_the_evaluator() {
        let groups = vec![
            xds::Group { rules: vec![] },
            xds::Group {
                rules: vec![xds::Rules { matches: vec![] }],
            },
            xds::Group {
                rules: vec![xds::Rules {
                    matches: vec![xds::Match::default()],
                }],
            },
        ];
        let got = from_xds(&policy(xds::Action::Allow, groups)).unwrap();
        assert_eq!(
            got.rules,
            vec![
                Rule::AllOf(vec![]),
                Rule::AllOf(vec![Clause { matches: vec![] }]),
                Rule::AllOf(vec![Clause {
                    matches: vec![Match::default()]
                }]),
            ]
        );
        assert!(from_xds(&policy(xds::Action::Deny, vec![]))
            .unwrap()
            .rules
            .is_empty());
    }

    /// What ztunnel drops or truncates is rejected here, with where and why; the stand-in
    /// fails closed: a DENY that matches every connection, an ALLOW that matches none.
    #[test]
    fn unreadable_matches_reject_the_policy_and_fail_closed() {
        let cases: Vec<(xds::Match, &str)> = vec![
            (
                xds::Match {
                    not_source_ips: vec![xds::Address {
                        address: vec![10, 0, 0],
                        length: 24,
                    }],
                    ..xds::Match::default()
                },
                "groups[0].rules[0].matches[0].not_source_ips[0]: an address of 3 bytes",
            ),
            (
                xds::Match {
                    destination_ips: vec![xds::Address {
                        address: vec![10, 0, 0, 1],
                        length: 33,
                    }],
                    ..xds::Match::default()
                },
                "groups[0].rules[0].matches[0].destination_ips[0]: prefix length 33",
            ),
            (
                xds::Match {
                    destination_ports: vec![80, 65536],
                    ..xds::Match::default()
                },
                "groups[0].rules[0].matches[0].destination_ports[1]: port 65536 is above 65535",
            ),
            (
                xds::Match {
                    principals: vec![xds::StringMatch { match_type: None }],
                    ..xds::Match::default()
                },
                "groups[0].rules[0].matches[0].principals[0]: a string match with no kind",
            ),
        ];
        for (m, want) in cases {
            for (action, stand_in) in [
                (xds::Action::Deny, Rule::AllOf(vec![])),
                (xds::Action::Allow, Rule::Never),
            ] {
                let err = from_xds(&policy(action, one_match(m.clone()))).unwrap_err();
                assert!(err.reason.starts_with(want), "{} vs {want}", err.reason);
                let fc = err
                    .fail_closed
                    .expect("a known action has a fail-closed form");
                assert_eq!(fc.rules, vec![stand_in]);
                assert_eq!((fc.name.as_str(), fc.scope), ("p", Scope::Namespace));
            }
        }
    }

    #[test]
    fn unknown_scope_action_or_a_missing_name_reject_the_policy_alone() {
        let mut p = policy(xds::Action::Deny, vec![]);
        p.action = 7;
        let err = from_xds(&p).unwrap_err();
        assert_eq!(err.reason, "action: unknown value 7");
        assert_eq!(err.fail_closed, None);
        let mut p = policy(xds::Action::Deny, vec![]);
        p.scope = 3;
        assert_eq!(from_xds(&p).unwrap_err().reason, "scope: unknown value 3");
        let mut p = policy(xds::Action::Deny, vec![]);
        p.name.clear();
        assert!(from_xds(&p).unwrap_err().reason.contains("needs a name"));
    }

    #[test]
    fn addresses_are_four_or_sixteen_bytes() {
        assert_eq!(
            ip_from_bytes(&[127, 0, 0, 1]),
            Ok("127.0.0.1".parse().unwrap())
        );
        assert_eq!(ip_from_bytes(&[0; 16]), Ok("::".parse().unwrap()));
        assert!(ip_from_bytes(&[]).is_err());
        assert!(ip_from_bytes(&[1; 5]).is_err());
    }
}
