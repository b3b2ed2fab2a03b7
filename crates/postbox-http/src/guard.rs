//! The SSRF guard: which destination addresses a webhook may reach.
//!
//! A webhook URL comes from configuration, but the name in it resolves at
//! send time, and DNS can change (or be made to answer with an internal
//! address). So the check runs on the **resolved** addresses, inside the
//! HTTP client's resolver, right before it connects; IP-literal hosts (which
//! the client never resolves) are checked when the publisher is built.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

use reqwest::dns::{Addrs, Name, Resolve, Resolving};

/// Why an address is refused, or `None` when it is a public unicast address.
///
/// Refused: loopback, RFC 1918 private, CGNAT (100.64/10), link-local
/// (169.254/16, fe80::/10, which includes cloud metadata endpoints),
/// unspecified, broadcast, multicast, documentation and benchmarking ranges,
/// reserved 240/4, IETF protocol assignments (192.0.0/24), IPv6 unique-local
/// (fc00::/7), site-local (fec0::/10), Teredo, and IPv4 addresses embedded in
/// IPv6 (mapped, compatible, NAT64, 6to4) by the rules for the embedded one.
pub fn refusal(ip: IpAddr) -> Option<&'static str> {
    match ip {
        IpAddr::V4(v4) => refusal_v4(v4),
        IpAddr::V6(v6) => refusal_v6(v6),
    }
}

fn refusal_v4(ip: Ipv4Addr) -> Option<&'static str> {
    let [a, b, c, _] = ip.octets();
    let why = match (a, b, c) {
        (0, _, _) => "an unspecified (0.0.0.0/8) address",
        (10, _, _) => "a private (RFC 1918) address",
        (100, 64..=127, _) => "a carrier-grade NAT (100.64.0.0/10) address",
        (127, _, _) => "a loopback address",
        (169, 254, _) => "a link-local address",
        (172, 16..=31, _) => "a private (RFC 1918) address",
        (192, 0, 0) => "an IETF protocol assignment (192.0.0.0/24)",
        (192, 0, 2) | (198, 51, 100) | (203, 0, 113) => "a documentation address",
        (192, 168, _) => "a private (RFC 1918) address",
        (198, 18..=19, _) => "a benchmarking (198.18.0.0/15) address",
        (224..=239, _, _) => "a multicast address",
        (240..=255, _, _) => "a reserved or broadcast address",
        _ => return None,
    };
    Some(why)
}

fn refusal_v6(ip: Ipv6Addr) -> Option<&'static str> {
    if ip.is_unspecified() {
        return Some("an unspecified address");
    }
    if ip.is_loopback() {
        return Some("a loopback address");
    }
    let seg = ip.segments();
    // IPv4-mapped (::ffff:a.b.c.d) and the deprecated IPv4-compatible (::a.b.c.d)
    if seg[..5] == [0, 0, 0, 0, 0] && (seg[5] == 0xffff || seg[5] == 0) {
        return refusal_v4(embedded_v4(seg[6], seg[7]));
    }
    // NAT64 well-known prefix 64:ff9b::/96
    if seg[..6] == [0x64, 0xff9b, 0, 0, 0, 0] {
        return refusal_v4(embedded_v4(seg[6], seg[7]));
    }
    // 6to4 2002::/16 carries an IPv4 address in the next 32 bits
    if seg[0] == 0x2002 {
        return refusal_v4(embedded_v4(seg[1], seg[2]));
    }
    let why = match seg[0] {
        s if s & 0xfe00 == 0xfc00 => "a unique-local (fc00::/7) address",
        s if s & 0xffc0 == 0xfe80 => "a link-local (fe80::/10) address",
        s if s & 0xffc0 == 0xfec0 => "a site-local (fec0::/10) address",
        s if s & 0xff00 == 0xff00 => "a multicast address",
        0x2001 if seg[1] == 0 => "a Teredo (2001::/32) address",
        0x2001 if seg[1] == 0x0db8 => "a documentation address",
        0x0100 if seg[1..4] == [0, 0, 0] => "a discard-only (100::/64) address",
        _ => return None,
    };
    Some(why)
}

fn embedded_v4(hi: u16, lo: u16) -> Ipv4Addr {
    let [a, b] = hi.to_be_bytes();
    let [c, d] = lo.to_be_bytes();
    Ipv4Addr::new(a, b, c, d)
}

/// The error the guarding resolver returns; found again in the error chain
/// to report a refused destination as such. Its outcome is `Transient`,
/// not `Rejected`: what a name resolves to can change.
#[derive(Debug, thiserror::Error)]
#[error(
    "{host} resolves only to refused addresses ({detail}); set allow_private_networks = true to allow them"
)]
pub(crate) struct Refused {
    host: String,
    detail: String,
}

/// A DNS resolver that drops every refused address and fails when none is
/// left. It is the only resolver the webhook client uses.
#[derive(Debug, Clone, Copy)]
pub(crate) struct GuardedResolver {
    pub(crate) allow_private: bool,
}

impl Resolve for GuardedResolver {
    fn resolve(&self, name: Name) -> Resolving {
        Box::pin(resolve_guarded(
            name.as_str().to_owned(),
            self.allow_private,
        ))
    }
}

type BoxError = Box<dyn std::error::Error + Send + Sync>;

async fn resolve_guarded(host: String, allow_private: bool) -> Result<Addrs, BoxError> {
    let resolved: Vec<SocketAddr> = tokio::net::lookup_host((host.as_str(), 0)).await?.collect();
    let allowed = allowed_addresses(&host, resolved, allow_private)?;
    Ok(Box::new(allowed.into_iter()))
}

/// What the guard keeps of the addresses `host` resolved to: all of them
/// when private networks are allowed, else only public ones, and an error
/// naming the refused ones when none is left (a name that resolves to both
/// is reached on its public addresses only).
fn allowed_addresses(
    host: &str,
    resolved: Vec<SocketAddr>,
    allow_private: bool,
) -> Result<Vec<SocketAddr>, Refused> {
    if allow_private {
        return Ok(resolved);
    }
    let (ok, refused): (Vec<SocketAddr>, Vec<SocketAddr>) = resolved
        .into_iter()
        .partition(|a| refusal(a.ip()).is_none());
    if ok.is_empty() {
        let detail = refused
            .iter()
            .map(|a| format!("{} is {}", a.ip(), refusal(a.ip()).unwrap_or("refused")))
            .collect::<Vec<_>>()
            .join(", ");
        let detail = if detail.is_empty() {
            "no addresses".to_owned()
        } else {
            detail
        };
        return Err(Refused {
            host: host.to_owned(),
            detail,
        });
    }
    if !refused.is_empty() {
        tracing::debug!(host = %host, refused = refused.len(), "dropped refused addresses");
    }
    Ok(ok)
}

/// Whether `err` (a reqwest error) was caused by the guard.
pub(crate) fn refused_in_chain(err: &(dyn std::error::Error + 'static)) -> Option<String> {
    let mut cur: Option<&(dyn std::error::Error + 'static)> = Some(err);
    while let Some(e) = cur {
        if let Some(r) = e.downcast_ref::<Refused>() {
            return Some(r.to_string());
        }
        cur = e.source();
    }
    None
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn refused(s: &str) -> bool {
        refusal(s.parse().unwrap()).is_some()
    }

    #[test]
    fn refuses_internal_addresses() {
        for a in [
            "127.0.0.1",
            "127.1.2.3",
            "10.0.0.1",
            "172.16.0.1",
            "172.31.255.255",
            "192.168.1.1",
            "169.254.169.254",
            "100.64.0.1",
            "100.127.255.255",
            "0.0.0.0",
            "255.255.255.255",
            "224.0.0.1",
            "192.0.0.8",
            "198.18.0.1",
            "::1",
            "::",
            "fc00::1",
            "fd12:3456::1",
            "fe80::1",
            "fec0::1",
            "ff02::1",
            "::ffff:127.0.0.1",
            "::ffff:10.1.2.3",
            "::ffff:169.254.169.254",
            "64:ff9b::a9fe:a9fe",
            "2002:7f00:1::",
            "2001:db8::1",
            "2001::1",
        ] {
            assert!(refused(a), "{a} must be refused");
        }
    }

    #[test]
    fn allows_public_addresses() {
        for a in [
            "1.1.1.1",
            "8.8.8.8",
            "93.184.216.34",
            "100.63.255.255",
            "100.128.0.1",
            "172.15.255.255",
            "172.32.0.1",
            "192.169.0.1",
            "2606:4700:4700::1111",
            "2a00:1450:4001::200e",
            "::ffff:8.8.8.8",
            "2002:0808:0808::",
        ] {
            assert!(!refused(a), "{a} must be allowed");
        }
    }

    fn addrs(ips: &[&str]) -> Vec<SocketAddr> {
        ips.iter()
            .map(|ip| SocketAddr::new(ip.parse().unwrap(), 443))
            .collect()
    }

    /// What a DNS name may resolve to: a name whose every address is
    /// internal (`localhost` as `::1`, a name pointing at the metadata
    /// endpoint, a mapped or NAT64 form) is refused, naming the addresses;
    /// a name with public and internal addresses keeps only the public.
    #[test]
    fn names_resolving_to_internal_addresses_are_refused() {
        for answer in [
            &["::1"][..],
            &["127.0.0.1", "::1"],
            &["fe80::1"],
            &["169.254.169.254"],
            &["::ffff:169.254.169.254"],
            &["64:ff9b::7f00:1"],
            &["10.1.2.3", "fd00::1"],
            &["0.0.0.0"],
            &[],
        ] {
            let e = allowed_addresses("evil.example", addrs(answer), false).unwrap_err();
            let text = e.to_string();
            assert!(text.contains("evil.example"), "{text}");
            assert!(text.contains("allow_private_networks"), "{text}");
            for ip in answer {
                assert!(text.contains(ip), "{answer:?}: {text}");
            }
        }
        let e = allowed_addresses("localhost", addrs(&["::1"]), false).unwrap_err();
        assert!(e.to_string().contains("::1 is a loopback address"), "{e}");
        // mixed answer: only the public address is ever connected to
        let kept = allowed_addresses(
            "mixed.example",
            addrs(&["127.0.0.1", "93.184.216.34", "::1"]),
            false,
        )
        .unwrap();
        assert_eq!(kept, addrs(&["93.184.216.34"]));
        // allowed on purpose: everything, unchanged
        let all = addrs(&["::1", "10.0.0.1"]);
        assert_eq!(allowed_addresses("x", all.clone(), true).unwrap(), all);
    }
}
