//! Who is calling and from where: the client's identity (the TCP peer, or,
//! when the peer is a trusted proxy, the first untrusted hop of
//! `X-Forwarded-For`/`Forwarded` walked right to left), aggregated per IPv6
//! prefix exactly as the kernel does; and whether the calling page's
//! `Origin` (else `Referer`) is allowed.
//!
//! Origin entries: one with a scheme matches an Origin/Referer that starts
//! with it at a boundary (`https://a.example` does not match
//! `https://a.example.evil`); one without a scheme matches the host itself or
//! any subdomain of it; `*` matches any origin (written out, never implied:
//! an empty list is refused by the policy). The contract says "substring of the host", which
//! would let `example.org.evil.net` through; suffix-at-a-dot is what the
//! key-restriction services actually enforce.

use std::net::IpAddr;

use http::HeaderMap;

use crate::{config::ForwardedHeader, units::Cidr};

/// Allowed origins and whether one is required.
#[derive(Debug, Clone, Default)]
pub struct Origins {
    prefixes: Vec<String>,
    hosts: Vec<String>,
    /// `*`: any origin.
    any: bool,
    require: bool,
}

/// The origin verdict.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum OriginCheck {
    /// Allowed; `Some(origin)` to echo in CORS headers.
    Allowed(Option<String>),
    /// Missing while required, or not allowed.
    Refused,
}

impl Origins {
    /// From `[access]`.
    pub fn new(allowed: &[String], require: bool) -> Origins {
        let mut o = Origins { require, ..Origins::default() };
        for a in allowed {
            let a = a.trim().to_ascii_lowercase();
            if a == "*" {
                o.any = true;
            } else if a.starts_with("http://") || a.starts_with("https://") {
                o.prefixes.push(a.trim_end_matches('/').to_owned());
            } else {
                o.hosts.push(a.trim_start_matches('.').to_owned());
            }
        }
        o
    }

    fn allows(&self, url: &str) -> bool {
        if self.any {
            return true;
        }
        let u = url.trim().to_ascii_lowercase();
        let at_boundary =
            |p: &str| u.strip_prefix(p).is_some_and(|rest| rest.is_empty() || rest.starts_with(['/', '?', '#', ':']));
        if self.prefixes.iter().any(|p| at_boundary(p)) {
            return true;
        }
        let Some(host) = host_of(&u) else { return false };
        self.hosts.iter().any(|h| host == *h || host.strip_suffix(h.as_str()).is_some_and(|r| r.ends_with('.')))
    }

    /// Check `Origin`, else `Referer`.
    pub fn check(&self, headers: &HeaderMap) -> OriginCheck {
        let origin = headers.get(http::header::ORIGIN).and_then(|v| v.to_str().ok());
        let referer = headers.get(http::header::REFERER).and_then(|v| v.to_str().ok());
        match (origin, referer) {
            (Some(o), _) if o != "null" => {
                if self.allows(o) {
                    OriginCheck::Allowed(Some(o.to_owned()))
                } else {
                    OriginCheck::Refused
                }
            }
            (_, Some(r)) => {
                if self.allows(r) {
                    // Same-origin GETs carry no Origin: the page is the
                    // Referer's origin (what a token is bound to).
                    OriginCheck::Allowed(origin_of(r))
                } else {
                    OriginCheck::Refused
                }
            }
            _ if self.require => OriginCheck::Refused,
            _ => OriginCheck::Allowed(None),
        }
    }
}

/// `scheme://host[:port]` of a URL, lower-cased.
fn origin_of(url: &str) -> Option<String> {
    let (scheme, rest) = url.trim().split_once("://")?;
    let auth = rest.split(['/', '?', '#']).next()?;
    let auth = auth.rsplit('@').next()?;
    (!auth.is_empty()).then(|| format!("{scheme}://{auth}").to_ascii_lowercase())
}

/// The host of `scheme://host[:port]/...`.
fn host_of(url: &str) -> Option<&str> {
    let rest = url.split_once("://")?.1;
    let auth = rest.split(['/', '?', '#']).next()?;
    let auth = auth.rsplit('@').next()?;
    let host = if auth.starts_with('[') {
        auth.split(']').next().map(|h| h.trim_start_matches('['))?
    } else {
        auth.split(':').next()?
    };
    (!host.is_empty()).then_some(host)
}

/// The client's address: the peer, or the first untrusted hop behind trusted
/// proxies, read from the one header the proxies are configured to write.
pub fn client_ip(peer: IpAddr, headers: &HeaderMap, trusted: &[Cidr], from: ForwardedHeader) -> IpAddr {
    let peer = canonical(peer);
    let is_trusted = |ip: IpAddr| trusted.iter().any(|c| c.contains(ip));
    if !is_trusted(peer) {
        return peer;
    }
    // Every hop, oldest first, from the configured header only.
    let mut hops: Vec<IpAddr> = Vec::new();
    let forwarded = if from == ForwardedHeader::Forwarded {
        headers.get_all(http::header::FORWARDED).iter().collect()
    } else {
        Vec::new()
    };
    for v in forwarded {
        let Ok(v) = v.to_str() else { continue };
        for elem in v.split(',') {
            for pair in elem.split(';') {
                if let Some((k, val)) = pair.trim().split_once('=')
                    && k.eq_ignore_ascii_case("for")
                    && let Some(ip) = parse_node(val)
                {
                    hops.push(ip);
                }
            }
        }
    }
    if from == ForwardedHeader::XForwardedFor {
        for v in headers.get_all("x-forwarded-for") {
            let Ok(v) = v.to_str() else { continue };
            hops.extend(v.split(',').filter_map(|h| parse_node(h.trim())));
        }
    }
    // Right to left: the first address not ours is the client. Anything to
    // its left was written by the client and is not believed.
    for ip in hops.iter().rev() {
        let ip = canonical(*ip);
        if !is_trusted(ip) {
            return ip;
        }
    }
    hops.first().map_or(peer, |ip| canonical(*ip))
}

/// `192.0.2.1`, `"[2001:db8::1]:4711"`, `192.0.2.1:80`.
fn parse_node(v: &str) -> Option<IpAddr> {
    let v = v.trim().trim_matches('"');
    if let Ok(ip) = v.parse() {
        return Some(ip);
    }
    if let Some(rest) = v.strip_prefix('[') {
        return rest.split(']').next()?.parse().ok();
    }
    v.rsplit_once(':').and_then(|(h, _)| h.parse().ok())
}

/// IPv4-mapped IPv6 peers (dual-stack sockets) are IPv4 clients.
fn canonical(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(ip, IpAddr::V4),
        v4 => v4,
    }
}

/// The key a client is counted under: IPv4 /32, IPv6 per `v6_prefix`.
pub fn client_key(ip: IpAddr, v6_prefix: u8) -> IpAddr {
    match ip {
        IpAddr::V4(_) => ip,
        IpAddr::V6(v6) => IpAddr::from(proxy_common::prefix::mask_v6(v6.octets(), u32::from(v6_prefix))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn h(pairs: &[(&str, &str)]) -> HeaderMap {
        let mut m = HeaderMap::new();
        for (k, v) in pairs {
            m.append(http::HeaderName::from_bytes(k.as_bytes()).unwrap(), v.parse().unwrap());
        }
        m
    }

    fn origins() -> Origins {
        Origins::new(&["https://www.example.com".into(), "example.org".into()], true)
    }

    #[test]
    fn origin_rules() {
        let o = origins();
        let ok = |hs: &[(&str, &str)]| matches!(o.check(&h(hs)), OriginCheck::Allowed(_));
        assert!(ok(&[("origin", "https://www.example.com")]));
        assert!(ok(&[("origin", "https://WWW.example.com:443")]));
        assert!(!ok(&[("origin", "https://www.example.com.evil.net")]));
        assert!(!ok(&[("origin", "http://www.example.com")]));
        assert!(ok(&[("origin", "https://example.org")]));
        assert!(ok(&[("origin", "http://shop.example.org")]));
        assert!(!ok(&[("origin", "https://example.org.evil.net")]));
        assert!(!ok(&[("origin", "https://notexample.org")]));
        assert!(ok(&[("referer", "https://www.example.com/signup?x=1")]));
        assert!(!ok(&[("referer", "https://evil.net/?u=https://www.example.com")]));
        // Origin is checked first; a good Referer does not rescue a bad Origin.
        assert!(!ok(&[("origin", "https://evil.net"), ("referer", "https://www.example.com/")]));
        assert!(!ok(&[]));
        assert!(matches!(Origins::new(&[], false).check(&h(&[])), OriginCheck::Allowed(None)));
        assert_eq!(
            o.check(&h(&[("origin", "https://www.example.com")])),
            OriginCheck::Allowed(Some("https://www.example.com".into()))
        );
    }

    #[test]
    fn a_written_wildcard_allows_any_origin_but_still_requires_one() {
        let any = Origins::new(&["*".into()], true);
        assert!(matches!(any.check(&h(&[("origin", "https://anything.test")])), OriginCheck::Allowed(Some(_))));
        assert_eq!(any.check(&h(&[])), OriginCheck::Refused);
        assert_eq!(Origins::new(&[], true).check(&h(&[("origin", "https://a.test")])), OriginCheck::Refused);
    }

    #[test]
    fn client_identity() {
        let trusted: Vec<Cidr> = vec!["10.0.0.0/8".parse().unwrap()];
        let peer: IpAddr = "10.1.1.1".parse().unwrap();
        let x = ForwardedHeader::XForwardedFor;
        let xff = h(&[("x-forwarded-for", "6.6.6.6, 203.0.113.5, 10.2.2.2")]);
        assert_eq!(client_ip(peer, &xff, &trusted, x), "203.0.113.5".parse::<IpAddr>().unwrap());
        // An untrusted peer's headers are ignored.
        let outsider: IpAddr = "198.51.100.9".parse().unwrap();
        assert_eq!(client_ip(outsider, &xff, &trusted, x), outsider);
        let fwd = h(&[("forwarded", "for=6.6.6.6, for=\"[2001:db8::7]:4711\";proto=https")]);
        assert_eq!(
            client_ip(peer, &fwd, &trusted, ForwardedHeader::Forwarded),
            "2001:db8::7".parse::<IpAddr>().unwrap()
        );
        // A client-written Forwarded is not read when the proxies write XFF.
        let both = h(&[("forwarded", "for=10.1.1.1"), ("x-forwarded-for", "203.0.113.5")]);
        assert_eq!(client_ip(peer, &both, &trusted, x), "203.0.113.5".parse::<IpAddr>().unwrap());
        assert_eq!(client_ip(peer, &fwd, &trusted, x), peer);
        // Only trusted hops: the oldest one.
        let all = h(&[("x-forwarded-for", "10.9.9.9")]);
        assert_eq!(client_ip(peer, &all, &trusted, x), "10.9.9.9".parse::<IpAddr>().unwrap());
        assert_eq!(client_ip(peer, &h(&[]), &trusted, x), peer);
        let mapped: IpAddr = "::ffff:198.51.100.9".parse().unwrap();
        assert_eq!(client_ip(mapped, &h(&[]), &trusted, x), outsider);
    }

    #[test]
    fn ipv6_clients_are_keyed_per_prefix() {
        let a: IpAddr = "2001:db8:1:2:3:4:5:6".parse().unwrap();
        assert_eq!(client_key(a, 64), "2001:db8:1:2::".parse::<IpAddr>().unwrap());
        let v4: IpAddr = "192.0.2.1".parse().unwrap();
        assert_eq!(client_key(v4, 64), v4);
    }
}
