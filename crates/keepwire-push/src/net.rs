//! HTTP plumbing shared by the providers: the Web Push address guard (SSRF),
//! bounded response reads, `Retry-After`, and how transport errors map to an
//! [`Attempt`](crate::Attempt).

use std::error::Error as StdError;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::{Arc, LazyLock};
use std::time::{Duration, SystemTime};

use ipnet::IpNet;
use reqwest::dns::{Addrs, Name, Resolve, Resolving};

use crate::Attempt;

/// Largest response body read from a provider (error bodies are small JSON).
pub(crate) const MAX_RESPONSE_BYTES: usize = 64 * 1024;
/// Longest `Retry-After` honoured; longer ones are cut to this.
pub const MAX_RETRY_AFTER: Duration = Duration::from_secs(3600);

/// Address ranges that are not the public internet (RFC 6890 and friends):
/// a Web Push endpoint may not point into them unless the allow-list says so.
static NON_PUBLIC: LazyLock<Vec<IpNet>> = LazyLock::new(|| {
    [
        "0.0.0.0/8",       // "this network"
        "10.0.0.0/8",      // private
        "100.64.0.0/10",   // carrier-grade NAT
        "127.0.0.0/8",     // loopback
        "169.254.0.0/16",  // link local (cloud metadata lives here)
        "172.16.0.0/12",   // private
        "192.0.0.0/24",    // IETF protocol assignments
        "192.0.2.0/24",    // documentation
        "192.88.99.0/24",  // 6to4 relay anycast (deprecated)
        "192.168.0.0/16",  // private
        "198.18.0.0/15",   // benchmarking
        "198.51.100.0/24", // documentation
        "203.0.113.0/24",  // documentation
        "224.0.0.0/4",     // multicast
        "240.0.0.0/4",     // reserved, broadcast
        "::/128",          // unspecified
        "::1/128",         // loopback
        "64:ff9b:1::/48",  // local-use NAT64
        "100::/64",        // discard
        "2001::/23",       // IETF protocol assignments (Teredo, benchmarking, ...)
        "2001:db8::/32",   // documentation
        "2002::/16",       // 6to4 (embeds any IPv4 address)
        "fc00::/7",        // unique local
        "fe80::/10",       // link local
        "fec0::/10",       // site local (deprecated)
        "ff00::/8",        // multicast
    ]
    .iter()
    .map(|s| s.parse().expect("valid CIDR"))
    .collect()
});

/// Whether `ip` is a public unicast address. IPv4-mapped and NAT64
/// (`64:ff9b::/96`) IPv6 addresses are judged by the IPv4 address inside.
pub fn is_public(ip: IpAddr) -> bool {
    let ip = match ip {
        IpAddr::V6(v6) => match embedded_v4(v6) {
            Some(v4) => IpAddr::V4(v4),
            None => IpAddr::V6(v6),
        },
        v4 => v4,
    };
    !NON_PUBLIC.iter().any(|net| net.contains(&ip))
}

fn embedded_v4(v6: Ipv6Addr) -> Option<Ipv4Addr> {
    if let Some(v4) = v6.to_ipv4_mapped() {
        return Some(v4);
    }
    let s = v6.segments();
    if s[..6] == [0x64, 0xff9b, 0, 0, 0, 0] {
        let o = v6.octets();
        return Some(Ipv4Addr::new(o[12], o[13], o[14], o[15]));
    }
    None
}

/// Which addresses a Web Push request may connect to: public ones, plus the
/// networks of the configuration's `allow_private` list.
#[derive(Debug, Clone, Default)]
pub struct AddressPolicy {
    allow: Vec<IpNet>,
}

impl AddressPolicy {
    /// A policy allowing public addresses and `allow_private`.
    pub fn new(allow_private: Vec<IpNet>) -> AddressPolicy {
        AddressPolicy {
            allow: allow_private,
        }
    }

    /// Whether the allow-list names `ip`.
    pub fn listed(&self, ip: IpAddr) -> bool {
        let canon = match ip {
            IpAddr::V6(v6) => v6.to_ipv4_mapped().map(IpAddr::V4).unwrap_or(ip),
            v4 => v4,
        };
        self.allow
            .iter()
            .any(|n| n.contains(&ip) || n.contains(&canon))
    }

    /// Whether a request may connect to `ip`.
    pub fn permits(&self, ip: IpAddr) -> bool {
        is_public(ip) || self.listed(ip)
    }
}

/// The reason a connection was refused by the guard (found again in a
/// reqwest error's source chain).
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub(crate) struct Refused(pub(crate) String);

/// A resolver that keeps only the addresses the policy permits, so the
/// check applies to the address actually connected to (DNS rebinding gets
/// nowhere: reqwest connects only to what this returns).
#[derive(Debug)]
pub(crate) struct GuardedResolver {
    pub(crate) policy: Arc<AddressPolicy>,
}

impl Resolve for GuardedResolver {
    fn resolve(&self, name: Name) -> Resolving {
        let policy = self.policy.clone();
        Box::pin(async move {
            let host = name.as_str().to_owned();
            let found: Vec<SocketAddr> =
                tokio::net::lookup_host((host.as_str(), 0)).await?.collect();
            let kept: Vec<SocketAddr> = found
                .iter()
                .copied()
                .filter(|a| policy.permits(a.ip()))
                .collect();
            if kept.is_empty() {
                let why = if found.is_empty() {
                    "the endpoint's host has no address".to_owned()
                } else {
                    "the endpoint's host resolves only to private addresses".to_owned()
                };
                return Err(Box::new(Refused(why)) as Box<dyn StdError + Send + Sync>);
            }
            Ok(Box::new(kept.into_iter()) as Addrs)
        })
    }
}

/// Reads at most [`MAX_RESPONSE_BYTES`] of a response body (the rest is
/// dropped with the connection's stream).
pub(crate) async fn read_capped(mut resp: reqwest::Response) -> Vec<u8> {
    let mut out = Vec::new();
    while let Ok(Some(chunk)) = resp.chunk().await {
        let room = MAX_RESPONSE_BYTES - out.len();
        out.extend_from_slice(&chunk[..chunk.len().min(room)]);
        if out.len() >= MAX_RESPONSE_BYTES {
            break;
        }
    }
    out
}

/// `Retry-After` as a duration from `now` (delta-seconds or an HTTP date),
/// capped at [`MAX_RETRY_AFTER`].
pub(crate) fn retry_after(
    headers: &reqwest::header::HeaderMap,
    now: SystemTime,
) -> Option<Duration> {
    let value = headers
        .get(reqwest::header::RETRY_AFTER)?
        .to_str()
        .ok()?
        .trim();
    let d = if let Ok(secs) = value.parse::<u64>() {
        Duration::from_secs(secs)
    } else {
        let at = httpdate::parse_http_date(value).ok()?;
        at.duration_since(now).unwrap_or(Duration::ZERO)
    };
    Some(d.min(MAX_RETRY_AFTER))
}

/// Maps a transport error to an attempt: refused by the address guard →
/// rejected; anything else (connect, TLS, timeout, reset) → retry.
pub(crate) fn transport_error(provider: &str, e: &reqwest::Error) -> Attempt {
    let mut source: Option<&(dyn StdError + 'static)> = Some(e);
    while let Some(s) = source {
        if let Some(r) = s.downcast_ref::<Refused>() {
            return Attempt::Rejected {
                reason: format!("{provider}: endpoint refused: {}", r.0),
            };
        }
        source = s.source();
    }
    let kind = if e.is_timeout() {
        "timed out"
    } else if e.is_connect() {
        "could not connect"
    } else if e.is_request() {
        "request failed"
    } else if e.is_body() || e.is_decode() {
        "response failed"
    } else {
        "transport error"
    };
    Attempt::Retry {
        after: None,
        at_least: Duration::ZERO,
        reason: format!("{provider}: {kind}"),
    }
}

/// An error code read from a provider response, if it is one of the
/// provider's documented codes; anything else becomes `other`, so no text a
/// server chose (which could echo a token) reaches a reason or a log.
pub(crate) fn known_code(s: Option<&str>, documented: &[&'static str]) -> &'static str {
    match s {
        None => "",
        Some(s) => documented
            .iter()
            .find(|c| **c == s)
            .copied()
            .unwrap_or("other"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn public_and_private_addresses() {
        for private in [
            "127.0.0.1",
            "10.1.2.3",
            "172.20.0.1",
            "192.168.1.1",
            "169.254.169.254",
            "100.64.0.1",
            "0.0.0.0",
            "255.255.255.255",
            "224.0.0.1",
            "::1",
            "::",
            "fe80::1",
            "fd00::1",
            "::ffff:10.0.0.1",
            "64:ff9b::a00:1",
            "2002:a00:1::1",
            "2001:db8::1",
        ] {
            assert!(!is_public(private.parse().unwrap()), "{private}");
        }
        for public in [
            "8.8.8.8",
            "1.1.1.1",
            "2a00:1450:4001::200e",
            "::ffff:8.8.8.8",
            "64:ff9b::808:808",
        ] {
            assert!(is_public(public.parse().unwrap()), "{public}");
        }
    }

    #[test]
    fn policy_allow_list() {
        let p = AddressPolicy::new(vec![
            "10.0.0.0/8".parse().unwrap(),
            "127.0.0.1/32".parse().unwrap(),
        ]);
        assert!(p.permits("10.9.9.9".parse().unwrap()));
        assert!(p.permits("127.0.0.1".parse().unwrap()));
        assert!(p.permits("::ffff:127.0.0.1".parse().unwrap()));
        assert!(!p.permits("127.0.0.2".parse().unwrap()));
        assert!(!p.permits("192.168.0.1".parse().unwrap()));
        assert!(p.permits("8.8.8.8".parse().unwrap()));
        assert!(!AddressPolicy::default().listed("8.8.8.8".parse().unwrap()));
    }

    #[tokio::test]
    async fn resolver_filters_private_answers() {
        let strict = GuardedResolver {
            policy: Arc::new(AddressPolicy::default()),
        };
        let err = match strict.resolve("localhost".parse().unwrap()).await {
            Ok(_) => panic!("localhost must be refused"),
            Err(e) => e,
        };
        assert!(err.downcast_ref::<Refused>().is_some(), "{err}");
        let open = GuardedResolver {
            policy: Arc::new(AddressPolicy::new(vec![
                "127.0.0.0/8".parse().unwrap(),
                "::1/128".parse().unwrap(),
            ])),
        };
        let addrs: Vec<_> = open
            .resolve("localhost".parse().unwrap())
            .await
            .unwrap()
            .collect();
        assert!(!addrs.is_empty());
        assert!(addrs.iter().all(|a| a.ip().is_loopback()));
    }

    #[test]
    fn retry_after_forms() {
        use reqwest::header::{HeaderMap, HeaderValue, RETRY_AFTER};
        let now = SystemTime::UNIX_EPOCH + Duration::from_secs(1_700_000_000);
        let mut h = HeaderMap::new();
        assert_eq!(retry_after(&h, now), None);
        h.insert(RETRY_AFTER, HeaderValue::from_static("7"));
        assert_eq!(retry_after(&h, now), Some(Duration::from_secs(7)));
        h.insert(RETRY_AFTER, HeaderValue::from_static("999999"));
        assert_eq!(retry_after(&h, now), Some(MAX_RETRY_AFTER));
        let later = httpdate::fmt_http_date(now + Duration::from_secs(120));
        h.insert(RETRY_AFTER, HeaderValue::from_str(&later).unwrap());
        assert_eq!(retry_after(&h, now), Some(Duration::from_secs(120)));
        h.insert(RETRY_AFTER, HeaderValue::from_static("soon"));
        assert_eq!(retry_after(&h, now), None);
        assert_eq!(
            known_code(Some("BadDeviceToken"), &["BadDeviceToken"]),
            "BadDeviceToken"
        );
        assert_eq!(
            known_code(Some("secret-token"), &["BadDeviceToken"]),
            "other"
        );
        assert_eq!(known_code(None, &["BadDeviceToken"]), "");
    }
}
