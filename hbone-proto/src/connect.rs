//! HBONE's CONNECT request and response (RFC 9113 §8.5, DESIGN.md §4).
//!
//! A request is exactly `:method CONNECT` and `:authority <ip>:<port>` (IPv6 in brackets), no
//! `:scheme` or `:path`, plus the optional telemetry headers `forwarded`, `baggage` and
//! `traceparent`. These are never identity: identity comes from the peer's certificate.
//! Validation follows RFC 9113 §8.1.1–§8.3; a malformed request is reported as a typed
//! [`RequestError`] whose [`RequestError::status`] the server can answer with.

use crate::hpack::Field;
use std::net::SocketAddr;

/// A CONNECT request as HBONE sends it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConnectRequest {
    /// Destination pod IP and target port.
    pub authority: SocketAddr,
    /// `forwarded: for="<client ip:port>"`, telemetry only.
    pub forwarded: Option<String>,
    /// W3C baggage, telemetry only.
    pub baggage: Option<String>,
    /// W3C traceparent, telemetry only.
    pub traceparent: Option<String>,
}

impl ConnectRequest {
    pub fn new(authority: SocketAddr) -> ConnectRequest {
        ConnectRequest {
            authority,
            forwarded: None,
            baggage: None,
            traceparent: None,
        }
    }

    /// The header fields to encode, pseudo-headers first.
    //= rfc9113#section-8.5
    //# The :method pseudo-header field is set to CONNECT.
    //#
    //# The :scheme and :path pseudo-header fields MUST be omitted.
    //#
    //# The :authority pseudo-header field contains the host and port to
    //# connect to (equivalent to the authority-form of the request-target
    //# of CONNECT requests; see Section 3.2.3 of [HTTP/1.1]).
    pub fn to_fields(&self) -> Vec<Field> {
        // SocketAddr's Display brackets IPv6 addresses: "[fd00::1]:8080".
        let mut f = vec![
            Field::new(":method", "CONNECT"),
            Field::new(":authority", self.authority.to_string()),
        ];
        for (name, value) in [
            ("forwarded", &self.forwarded),
            ("baggage", &self.baggage),
            ("traceparent", &self.traceparent),
        ] {
            if let Some(v) = value {
                f.push(Field::new(name, v.as_bytes()));
            }
        }
        f
    }

    /// Validates a decoded request header list.
    pub fn from_fields(fields: &[Field]) -> Result<ConnectRequest, RequestError> {
        check_fields(
            fields,
            &[":method", ":authority", ":scheme", ":path", ":protocol"],
        )?;
        let mut method = None;
        let mut authority = None;
        let mut req = ConnectRequest::new(SocketAddr::from(([0, 0, 0, 0], 0)));
        for f in fields {
            match f.name.as_slice() {
                b":method" => set_once(&mut method, &f.value)?,
                b":authority" => set_once(&mut authority, &f.value)?,
                b":scheme" | b":path" => return Err(RequestError::SchemeOrPathPresent),
                // Extended CONNECT (RFC 8441) needs SETTINGS_ENABLE_CONNECT_PROTOCOL, which
                // HBONE never advertises.
                b":protocol" => return Err(RequestError::ExtendedConnect),
                b"forwarded" => req.forwarded = telemetry(&f.value),
                b"baggage" => req.baggage = telemetry(&f.value),
                b"traceparent" => req.traceparent = telemetry(&f.value),
                _ => {}
            }
        }
        match method {
            Some(m) if m == b"CONNECT" => {}
            Some(_) => return Err(RequestError::NotConnect),
            None => return Err(RequestError::Malformed("missing :method")),
        }
        let authority = authority.ok_or(RequestError::MissingAuthority)?;
        req.authority = std::str::from_utf8(authority)
            .ok()
            .and_then(|a| a.parse::<SocketAddr>().ok())
            .filter(|a| a.port() != 0)
            .ok_or(RequestError::AuthorityNotIpPort)?;
        Ok(req)
    }
}

/// Telemetry headers that are not UTF-8 are dropped rather than failing the tunnel.
fn telemetry(v: &[u8]) -> Option<String> {
    String::from_utf8(v.to_vec()).ok()
}

fn set_once<'a>(slot: &mut Option<&'a [u8]>, v: &'a [u8]) -> Result<(), RequestError> {
    //= rfc9113#section-8.3
    //# The same pseudo-header field name MUST NOT appear more than once in a
    //# field block.
    if slot.replace(v).is_some() {
        return Err(RequestError::Malformed("repeated pseudo-header field"));
    }
    Ok(())
}

/// A final or interim response to a CONNECT request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConnectResponse {
    pub status: u16,
    /// Other fields, passed through for diagnostics.
    pub headers: Vec<Field>,
}

impl ConnectResponse {
    pub fn new(status: u16) -> ConnectResponse {
        ConnectResponse {
            status,
            headers: Vec::new(),
        }
    }

    /// 2xx: the tunnel is established (HBONE peers send exactly 200).
    //= rfc9113#section-8.5
    //# A proxy that supports CONNECT establishes a TCP connection [TCP] to
    //# the server identified in the :authority pseudo-header field.  Once
    //# this connection is successfully established, the proxy sends a
    //# HEADERS frame containing a 2xx series status code to the client, as
    //# defined in Section 9.3.6 of [HTTP].
    pub fn is_success(&self) -> bool {
        (200..300).contains(&self.status)
    }

    pub fn is_interim(&self) -> bool {
        (100..200).contains(&self.status)
    }

    pub fn to_fields(&self) -> Vec<Field> {
        let mut f = vec![Field::new(":status", self.status.to_string())];
        f.extend(self.headers.iter().cloned());
        f
    }

    pub fn from_fields(fields: &[Field]) -> Result<ConnectResponse, ResponseError> {
        check_fields(fields, &[":status"]).map_err(ResponseError::Malformed)?;
        let mut status = None;
        let mut headers = Vec::new();
        for f in fields {
            if f.name == b":status" {
                if status.replace(&f.value).is_some() {
                    return Err(ResponseError::Malformed(RequestError::Malformed(
                        "repeated :status",
                    )));
                }
            } else {
                headers.push(f.clone());
            }
        }
        let status = status.ok_or(ResponseError::MissingStatus)?;
        let status = std::str::from_utf8(status)
            .ok()
            .filter(|s| s.len() == 3)
            .and_then(|s| s.parse::<u16>().ok())
            .filter(|s| (100..=999).contains(s))
            .ok_or(ResponseError::InvalidStatus)?;
        Ok(ConnectResponse { status, headers })
    }
}

/// Why a request is refused. Each is malformed in RFC 9113 §8.1.1's sense (a stream error of
/// type PROTOCOL_ERROR), and the server may first answer with [`RequestError::status`].
//= rfc9113#section-8.1.1
//# Malformed requests or responses that are
//# detected MUST be treated as a stream error (Section 5.4.2) of type
//# PROTOCOL_ERROR.
//#
//# For malformed requests, a server MAY send an HTTP response prior to
//# closing or resetting the stream.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RequestError {
    #[error("malformed request: {0}")]
    Malformed(&'static str),
    #[error("method is not CONNECT; HBONE only tunnels CONNECT")]
    NotConnect,
    #[error("extended CONNECT (:protocol) is not supported")]
    ExtendedConnect,
    #[error("CONNECT request carries :scheme or :path")]
    SchemeOrPathPresent,
    #[error("CONNECT request has no :authority")]
    MissingAuthority,
    #[error(":authority is not <ip>:<port> (IPv6 in brackets, port 1-65535)")]
    AuthorityNotIpPort,
    #[error("request header list of {size} bytes exceeds our limit of {limit}")]
    HeaderListTooLarge { size: usize, limit: usize },
}

impl RequestError {
    /// The status a server answers with: 431 for an oversized header list, 400 otherwise.
    pub fn status(&self) -> u16 {
        match self {
            RequestError::HeaderListTooLarge { .. } => 431,
            _ => 400,
        }
    }
}

/// Why a response is malformed; the client resets the stream with PROTOCOL_ERROR.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ResponseError {
    #[error(transparent)]
    Malformed(RequestError),
    #[error("response has no :status")]
    MissingStatus,
    #[error(":status is not a three-digit code")]
    InvalidStatus,
}

/// Checks the rules every field block follows (RFC 9113 §8.2, §8.3).
fn check_fields(fields: &[Field], allowed_pseudo: &[&str]) -> Result<(), RequestError> {
    let mut regular_seen = false;
    for f in fields {
        let name = f.name.as_slice();
        if name.is_empty() {
            return Err(RequestError::Malformed("empty field name"));
        }
        if name[0] == b':' {
            //= rfc9113#section-8.3
            //# All pseudo-header fields MUST appear in a field block before all
            //# regular field lines.
            if regular_seen {
                return Err(RequestError::Malformed(
                    "pseudo-header after a regular field",
                ));
            }
            //= rfc9113#section-8.3
            //# Endpoints MUST treat a request or response
            //# that contains undefined or invalid pseudo-header fields as malformed
            if !allowed_pseudo.iter().any(|p| p.as_bytes() == name) {
                return Err(RequestError::Malformed(
                    "undefined or misplaced pseudo-header",
                ));
            }
        } else {
            regular_seen = true;
            //= rfc9113#section-8.2.1
            //# A field name MUST NOT contain characters in the ranges 0x00-0x20,
            //# 0x41-0x5a, or 0x7f-0xff (all ranges inclusive).
            if name
                .iter()
                .any(|&c| c <= 0x20 || c.is_ascii_uppercase() || c >= 0x7f || c == b':')
            {
                return Err(RequestError::Malformed("invalid character in field name"));
            }
            //= rfc9113#section-8.2.2
            //# An endpoint MUST NOT generate an HTTP/2 message containing
            //# connection-specific header fields.  This includes the Connection
            //# header field and those listed as having connection-specific
            //# semantics in Section 7.6.1 of [HTTP] (that is, Proxy-Connection,
            //# Keep-Alive, Transfer-Encoding, and Upgrade).  Any message containing
            //# connection-specific header fields MUST be treated as malformed
            if matches!(
                name,
                b"connection"
                    | b"proxy-connection"
                    | b"keep-alive"
                    | b"transfer-encoding"
                    | b"upgrade"
            ) {
                return Err(RequestError::Malformed("connection-specific header field"));
            }
            //= rfc9113#section-8.2.2
            //# The only exception to this is the TE header field, which MAY be
            //# present in an HTTP/2 request; when it is, it MUST NOT contain any
            //# value other than "trailers".
            if name == b"te" && f.value != b"trailers" {
                return Err(RequestError::Malformed("te other than \"trailers\""));
            }
        }
        //= rfc9113#section-8.2.1
        //# A field value MUST NOT contain the zero value (ASCII NUL, 0x00), line
        //# feed (ASCII LF, 0x0a), or carriage return (ASCII CR, 0x0d) at any
        //# position.
        //#
        //# A field value MUST NOT start or end with an ASCII whitespace
        //# character (ASCII SP or HTAB, 0x20 or 0x09).
        let v = f.value.as_slice();
        if v.iter().any(|&c| c == 0 || c == b'\n' || c == b'\r')
            || v.first().is_some_and(|&c| c == b' ' || c == b'\t')
            || v.last().is_some_and(|&c| c == b' ' || c == b'\t')
        {
            return Err(RequestError::Malformed("invalid field value"));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn req(fields: &[(&str, &str)]) -> Result<ConnectRequest, RequestError> {
        let f: Vec<Field> = fields.iter().map(|(n, v)| Field::new(*n, *v)).collect();
        ConnectRequest::from_fields(&f)
    }

    #[test]
    fn ipv6_authority_is_bracketed_and_round_trips() {
        let mut r = ConnectRequest::new("[fd00::7]:8080".parse().unwrap());
        r.forwarded = Some("for=\"10.0.0.1:5000\"".into());
        let f = r.to_fields();
        assert_eq!(f[1].value, b"[fd00::7]:8080");
        assert!(f.iter().all(|f| f.name != b":scheme" && f.name != b":path"));
        assert_eq!(ConnectRequest::from_fields(&f).unwrap(), r);
    }

    #[test]
    fn valid_request_with_telemetry_is_accepted() {
        let r = req(&[
            (":method", "CONNECT"),
            (":authority", "10.1.2.3:80"),
            ("baggage", "k=v"),
            (
                "traceparent",
                "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01",
            ),
        ])
        .unwrap();
        assert_eq!(r.authority, "10.1.2.3:80".parse().unwrap());
        assert_eq!(r.baggage.as_deref(), Some("k=v"));
    }

    #[test]
    fn malformed_requests_are_refused_with_400() {
        for (fields, want) in [
            (
                vec![(":method", "GET"), (":authority", "1.2.3.4:80")],
                RequestError::NotConnect,
            ),
            (vec![(":method", "CONNECT")], RequestError::MissingAuthority),
            (
                vec![
                    (":method", "CONNECT"),
                    (":authority", "1.2.3.4:80"),
                    (":path", "/"),
                ],
                RequestError::SchemeOrPathPresent,
            ),
            (
                vec![(":method", "CONNECT"), (":authority", "example.com:80")],
                RequestError::AuthorityNotIpPort,
            ),
            (
                vec![(":method", "CONNECT"), (":authority", "fd00::1:80")],
                RequestError::AuthorityNotIpPort,
            ),
            (
                vec![(":method", "CONNECT"), (":authority", "1.2.3.4:0")],
                RequestError::AuthorityNotIpPort,
            ),
            (
                vec![
                    (":method", "CONNECT"),
                    (":authority", "1.2.3.4:80"),
                    (":protocol", "websocket"),
                ],
                RequestError::ExtendedConnect,
            ),
        ] {
            let err = req(&fields).unwrap_err();
            assert_eq!(err, want, "{fields:?}");
            assert_eq!(err.status(), 400);
        }
    }

    #[test]
    fn field_syntax_violations_are_malformed() {
        for fields in [
            vec![
                ("x-a", "1"),
                (":method", "CONNECT"),
                (":authority", "1.2.3.4:80"),
            ],
            vec![
                (":method", "CONNECT"),
                (":method", "CONNECT"),
                (":authority", "1.2.3.4:80"),
            ],
            vec![
                (":method", "CONNECT"),
                (":authority", "1.2.3.4:80"),
                ("X-Upper", "1"),
            ],
            vec![
                (":method", "CONNECT"),
                (":authority", "1.2.3.4:80"),
                ("connection", "close"),
            ],
            vec![
                (":method", "CONNECT"),
                (":authority", "1.2.3.4:80"),
                ("te", "gzip"),
            ],
            vec![
                (":method", "CONNECT"),
                (":authority", "1.2.3.4:80"),
                ("x", " padded"),
            ],
            vec![
                (":method", "CONNECT"),
                (":authority", "1.2.3.4:80"),
                ("x", "a\r\nb"),
            ],
            vec![
                (":method", "CONNECT"),
                (":authority", "1.2.3.4:80"),
                (":status", "200"),
            ],
        ] {
            assert!(
                matches!(req(&fields), Err(RequestError::Malformed(_))),
                "{fields:?}"
            );
        }
    }

    #[test]
    fn response_status_codes_parse() {
        for s in [200u16, 400, 401, 503, 302, 100] {
            let r = ConnectResponse::new(s);
            assert_eq!(
                ConnectResponse::from_fields(&r.to_fields()).unwrap().status,
                s
            );
        }
        assert_eq!(
            ConnectResponse::from_fields(&[Field::new(":status", "20")]),
            Err(ResponseError::InvalidStatus)
        );
        assert_eq!(
            ConnectResponse::from_fields(&[]),
            Err(ResponseError::MissingStatus)
        );
        assert!(ConnectResponse::from_fields(&[Field::new(":method", "GET")]).is_err());
    }
}
