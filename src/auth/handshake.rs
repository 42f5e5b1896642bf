//! What a handshake carries (SPEC §2): the token and where it came from, the codec, device,
//! platform and resume position; the client address behind trusted proxies; the browser
//! origin check. Shared by every transport.

use std::net::IpAddr;

use http::header::{AUTHORIZATION, SEC_WEBSOCKET_PROTOCOL};
use http::HeaderMap;
use ipnet::IpNet;

use super::jwt::PLATFORMS;
use crate::protocol::{valid_id, Codec};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TokenSource {
    Header,
    Subprotocol,
    Query,
}

impl TokenSource {
    pub fn as_str(self) -> &'static str {
        match self {
            TokenSource::Header => "header",
            TokenSource::Subprotocol => "subprotocol",
            TokenSource::Query => "query",
        }
    }
}

#[derive(Debug, Default)]
pub struct HandshakeParams {
    pub token: Option<(String, TokenSource)>,
    pub codec: Codec,
    /// The subprotocol to echo (`imgate.v1.json` / `imgate.v1.proto`) when the client
    /// offered one. A `bearer.` entry is never echoed.
    pub subprotocol: Option<&'static str>,
    pub device: Option<String>,
    pub platform: Option<String>,
    pub since: Option<String>,
}

#[derive(Debug, PartialEq, Eq, thiserror::Error)]
pub enum HandshakeError {
    /// An `Authorization` header that is not `Bearer <token>`: HTTP 401.
    #[error("bad Authorization header")]
    BadAuthorization,
    /// HTTP 400 with this message.
    #[error("{0}")]
    BadRequest(String),
}

const JSON_PROTOCOL: &str = "imgate.v1.json";
const PROTO_PROTOCOL: &str = "imgate.v1.proto";

/// Parse the handshake's headers and query string.
pub fn parse(headers: &HeaderMap, query: Option<&str>) -> Result<HandshakeParams, HandshakeError> {
    let mut p = HandshakeParams::default();
    let bad = |m: &str| HandshakeError::BadRequest(m.to_string());

    if let Some(v) = headers.get(AUTHORIZATION) {
        let v = v.to_str().map_err(|_| HandshakeError::BadAuthorization)?;
        let token = v
            .strip_prefix("Bearer ")
            .or_else(|| v.strip_prefix("bearer "))
            .map(str::trim)
            .filter(|t| !t.is_empty())
            .ok_or(HandshakeError::BadAuthorization)?;
        p.token = Some((token.to_string(), TokenSource::Header));
    }

    let mut proto_codec = None;
    for entry in headers
        .get_all(SEC_WEBSOCKET_PROTOCOL)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .map(str::trim)
    {
        if let Some(t) = entry.strip_prefix("bearer.") {
            if p.token.is_none() && !t.is_empty() {
                p.token = Some((t.to_string(), TokenSource::Subprotocol));
            }
        } else if entry == JSON_PROTOCOL && proto_codec.is_none() {
            proto_codec = Some(Codec::Json);
            p.subprotocol = Some(JSON_PROTOCOL);
        } else if entry == PROTO_PROTOCOL && proto_codec.is_none() {
            proto_codec = Some(Codec::Proto);
            p.subprotocol = Some(PROTO_PROTOCOL);
        }
    }

    let mut query_codec = None;
    for (k, v) in form_urlencoded::parse(query.unwrap_or("").as_bytes()) {
        match &*k {
            "token" if !v.is_empty() && p.token.is_none() => {
                p.token = Some((v.into_owned(), TokenSource::Query));
            }
            "codec" => {
                query_codec =
                    Some(Codec::parse(&v).ok_or_else(|| bad("codec must be json or proto"))?)
            }
            "device" => {
                if !valid_id(&v) {
                    return Err(bad("device must be 1-128 chars of A-Z a-z 0-9 . _ : @ -"));
                }
                p.device = Some(v.into_owned());
            }
            "platform" => {
                if !PLATFORMS.contains(&&*v) {
                    return Err(bad("platform must be ios, android, web, desktop or other"));
                }
                p.platform = Some(v.into_owned());
            }
            "since" => p.since = Some(v.into_owned()),
            _ => {}
        }
    }
    p.codec = match (proto_codec, query_codec) {
        (Some(a), Some(b)) if a != b => {
            return Err(bad("the codec parameter and the subprotocol disagree"))
        }
        (Some(c), _) | (None, Some(c)) => c,
        (None, None) => Codec::Json,
    };
    Ok(p)
}

/// The addresses whose `X-Forwarded-For` is believed.
#[derive(Debug, Default, Clone)]
pub struct TrustedProxies {
    nets: Vec<IpNet>,
}

impl TrustedProxies {
    pub fn parse(list: &[String]) -> Result<TrustedProxies, String> {
        let nets = list
            .iter()
            .map(|s| {
                s.parse::<IpNet>()
                    .or_else(|_| s.parse::<IpAddr>().map(IpNet::from))
                    .map_err(|_| format!("net.trusted_proxies: {s:?} is not an IP address or CIDR"))
            })
            .collect::<Result<_, _>>()?;
        Ok(TrustedProxies { nets })
    }

    pub fn contains(&self, ip: IpAddr) -> bool {
        let ip = canonical(ip);
        self.nets.iter().any(|n| n.contains(&ip))
    }
}

fn canonical(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map(IpAddr::V4).unwrap_or(ip),
        v4 => v4,
    }
}

/// The client's address: the peer, or, when the peer is a trusted proxy, the rightmost
/// untrusted address of `X-Forwarded-For` (entries left of it could be forged by the client).
/// The chain is read right to left and only as far as it can be believed: an entry that does
/// not parse (a client can write anything left of its real address; some proxies write
/// `unknown`) ends the walk, and never turns the answer into the proxy's own address when a
/// believable client address was already found.
pub fn client_ip(peer: IpAddr, headers: &HeaderMap, trusted: &TrustedProxies) -> IpAddr {
    let peer = canonical(peer);
    if !trusted.contains(peer) {
        return peer;
    }
    let mut chain: Vec<Option<IpAddr>> = Vec::new();
    for v in headers.get_all("x-forwarded-for") {
        match v.to_str() {
            Ok(v) => chain.extend(v.split(',').map(|p| p.trim().parse().ok().map(canonical))),
            Err(_) => chain.push(None),
        }
    }
    let mut last = peer;
    for ip in chain.into_iter().rev() {
        match ip {
            Some(ip) if trusted.contains(ip) => last = ip,
            Some(ip) => return ip,
            None => break,
        }
    }
    last
}

/// Which browser origins may connect.
#[derive(Debug, Clone)]
pub struct OriginPolicy {
    allowed: Vec<String>,
    any: bool,
    dev_localhost: bool,
}

impl OriginPolicy {
    pub fn new(allowed: &[String], dev: bool) -> OriginPolicy {
        OriginPolicy {
            any: allowed.iter().any(|a| a == "*"),
            allowed: allowed
                .iter()
                .map(|a| a.trim_end_matches('/').to_ascii_lowercase())
                .collect(),
            dev_localhost: dev && allowed.is_empty(),
        }
    }

    /// No `Origin` (not a browser) is allowed; `null` only with `*`.
    pub fn allows(&self, origin: Option<&str>) -> bool {
        let Some(origin) = origin else { return true };
        if self.any {
            return true;
        }
        let o = origin.to_ascii_lowercase();
        if self.allowed.contains(&o) {
            return true;
        }
        self.dev_localhost && is_localhost(&o)
    }
}

fn is_localhost(origin: &str) -> bool {
    let Some(rest) = origin
        .strip_prefix("http://")
        .or_else(|| origin.strip_prefix("https://"))
    else {
        return false;
    };
    let host = if rest.starts_with('[') {
        rest.split(']').next().map(|h| &h[1..]).unwrap_or("")
    } else {
        rest.split(':').next().unwrap_or("")
    };
    matches!(host, "localhost" | "127.0.0.1" | "::1")
}

#[cfg(test)]
mod tests {
    use http::HeaderValue;

    use super::*;

    fn headers(pairs: &[(&'static str, &str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in pairs {
            h.append(*k, HeaderValue::from_str(v).unwrap());
        }
        h
    }

    #[test]
    fn token_precedence() {
        let all = headers(&[
            ("authorization", "Bearer H"),
            ("sec-websocket-protocol", "bearer.S, imgate.v1.json"),
        ]);
        let p = parse(&all, Some("token=Q")).unwrap();
        assert_eq!(p.token, Some(("H".into(), TokenSource::Header)));
        let p = parse(
            &headers(&[("sec-websocket-protocol", "imgate.v1.proto,bearer.S")]),
            Some("token=Q"),
        )
        .unwrap();
        assert_eq!(p.token, Some(("S".into(), TokenSource::Subprotocol)));
        assert_eq!(
            (p.codec, p.subprotocol),
            (Codec::Proto, Some("imgate.v1.proto"))
        );
        let p = parse(
            &HeaderMap::new(),
            Some("token=a%2Bb&device=d1&platform=web&since=e%3A5"),
        )
        .unwrap();
        assert_eq!(p.token, Some(("a+b".into(), TokenSource::Query)));
        assert_eq!(
            (
                p.device.as_deref(),
                p.platform.as_deref(),
                p.since.as_deref()
            ),
            (Some("d1"), Some("web"), Some("e:5"))
        );
        assert_eq!((p.codec, p.subprotocol), (Codec::Json, None));
        assert!(parse(&HeaderMap::new(), None).unwrap().token.is_none());
    }

    #[test]
    fn refusals() {
        for v in ["Basic abc", "Bearer", "Bearer   ", "token"] {
            assert_eq!(
                parse(&headers(&[("authorization", v)]), None).unwrap_err(),
                HandshakeError::BadAuthorization,
                "{v}"
            );
        }
        for q in ["codec=xml", "device=a%20b", "platform=toaster"] {
            assert!(
                matches!(
                    parse(&HeaderMap::new(), Some(q)),
                    Err(HandshakeError::BadRequest(_))
                ),
                "{q}"
            );
        }
        let conflict = parse(
            &headers(&[("sec-websocket-protocol", "imgate.v1.json")]),
            Some("codec=proto"),
        );
        assert!(matches!(conflict, Err(HandshakeError::BadRequest(_))));
    }

    #[test]
    fn client_address() {
        let peer: IpAddr = "10.0.0.1".parse().unwrap();
        let none = TrustedProxies::default();
        let lb = TrustedProxies::parse(&["10.0.0.0/8".into()]).unwrap();
        let xff = headers(&[("x-forwarded-for", "1.1.1.1, 2.2.2.2, 10.0.0.7")]);
        assert_eq!(
            client_ip(peer, &xff, &none),
            peer,
            "untrusted peers cannot claim an address"
        );
        assert_eq!(
            client_ip(peer, &xff, &lb),
            "2.2.2.2".parse::<IpAddr>().unwrap()
        );
        assert_eq!(
            client_ip(peer, &headers(&[("x-forwarded-for", "garbage")]), &lb),
            peer
        );
        assert_eq!(client_ip(peer, &HeaderMap::new(), &lb), peer);
        // Review F14: junk a client wrote left of its real address (or a proxy's `unknown`)
        // does not put it in the proxy's bucket.
        for junk in [
            "unknown, 2.2.2.2",
            "garbage, 2.2.2.2, 10.0.0.7",
            "x,,2.2.2.2",
        ] {
            assert_eq!(
                client_ip(peer, &headers(&[("x-forwarded-for", junk)]), &lb),
                "2.2.2.2".parse::<IpAddr>().unwrap(),
                "{junk}"
            );
        }
        let two = headers(&[
            ("x-forwarded-for", "9.9.9.9, nonsense"),
            ("x-forwarded-for", "3.3.3.3"),
        ]);
        assert_eq!(
            client_ip(peer, &two, &lb),
            "3.3.3.3".parse::<IpAddr>().unwrap()
        );
        let mapped: IpAddr = "::ffff:10.0.0.1".parse().unwrap();
        assert_eq!(
            client_ip(mapped, &xff, &lb),
            "2.2.2.2".parse::<IpAddr>().unwrap()
        );
        assert!(TrustedProxies::parse(&["nope".into()]).is_err());
        assert!(TrustedProxies::parse(&["192.168.1.1".into()])
            .unwrap()
            .contains("192.168.1.1".parse().unwrap()));
    }

    #[test]
    fn origins() {
        let dev = OriginPolicy::new(&[], true);
        assert!(dev.allows(None));
        assert!(dev.allows(Some("http://localhost:5173")));
        assert!(dev.allows(Some("https://127.0.0.1")));
        assert!(dev.allows(Some("http://[::1]:8080")));
        assert!(!dev.allows(Some("https://evil.example")));
        assert!(!dev.allows(Some("http://localhost.evil.example")));
        assert!(!dev.allows(Some("null")));
        let prod = OriginPolicy::new(&[], false);
        assert!(prod.allows(None) && !prod.allows(Some("http://localhost")));
        let listed = OriginPolicy::new(&["https://Chat.example".into()], true);
        assert!(listed.allows(Some("https://chat.example")));
        assert!(
            !listed.allows(Some("http://localhost")),
            "a list replaces the dev default"
        );
        assert!(OriginPolicy::new(&["*".into()], false).allows(Some("null")));
    }
}
