//! Who is calling, by address: the client IP (believing `X-Forwarded-For`
//! only from configured proxies) and the global deny list.

use std::net::{IpAddr, SocketAddr};

use axum::http::HeaderMap;
use ipnet::{IpNet, Ipv4Net};

/// Trusted proxies and denied networks, from `[api]`.
#[derive(Clone, Debug, Default)]
pub struct NetworkPolicy {
    trusted_proxies: Vec<IpNet>,
    denied: Vec<IpNet>,
}

/// A CIDR in a setting that does not parse.
#[derive(Debug, thiserror::Error)]
#[error("{setting}: {value:?} is not a CIDR (e.g. 10.0.0.0/8, 2001:db8::/32, or one address)")]
pub struct BadCidr {
    /// Which setting.
    pub setting: &'static str,
    /// The value.
    pub value: String,
}

/// Parses a CIDR, or a single address as a /32 or /128; an IPv4-mapped
/// network is read as the IPv4 network it maps (see [`canonical_net`]).
pub fn parse_cidr(text: &str) -> Option<IpNet> {
    let text = text.trim();
    text.parse::<IpNet>()
        .ok()
        .or_else(|| text.parse::<IpAddr>().ok().map(IpNet::from))
        // `10.0.0.5/8` is the network `10.0.0.0/8`: stored and shown so.
        .map(|net| canonical_net(net.trunc()))
}

/// An IPv4-mapped IPv6 network (`::ffff:10.0.0.0/104`) as the IPv4
/// network it maps (`10.0.0.0/8`): client addresses are matched as IPv4
/// (see [`canonical`]), which a network left in mapped form never
/// contains. A mapped network of a prefix under 96 also spans addresses
/// that are not mapped, and is left as it is.
pub fn canonical_net(net: IpNet) -> IpNet {
    let IpNet::V6(v6) = net else {
        return net;
    };
    let Some(prefix) = v6.prefix_len().checked_sub(96) else {
        return net;
    };
    v6.network()
        .to_ipv4_mapped()
        .and_then(|v4| Ipv4Net::new(v4, prefix).ok())
        .map_or(net, IpNet::V4)
}

fn parse_all(setting: &'static str, values: &[String]) -> Result<Vec<IpNet>, BadCidr> {
    values
        .iter()
        .map(|value| {
            parse_cidr(value).ok_or_else(|| BadCidr {
                setting,
                value: value.clone(),
            })
        })
        .collect()
}

impl NetworkPolicy {
    /// From `api.trusted_proxies` and `api.deny_cidrs`.
    pub fn new(trusted_proxies: &[String], deny_cidrs: &[String]) -> Result<Self, BadCidr> {
        Ok(Self {
            trusted_proxies: parse_all("api.trusted_proxies", trusted_proxies)?,
            denied: parse_all("api.deny_cidrs", deny_cidrs)?,
        })
    }

    fn trusted(&self, ip: IpAddr) -> bool {
        self.trusted_proxies.iter().any(|net| net.contains(&ip))
    }

    /// The client's address: the peer, unless the peer is a trusted proxy;
    /// then the right-most `X-Forwarded-For` entry that is not one (entries
    /// left of it could have been written by anyone). `None` when a hop
    /// that must be believed is not an address: the client is then
    /// unknown, and falling back to the proxy's own address would let it
    /// pass allowlists meant for the proxy's network.
    pub fn client_ip(&self, peer: SocketAddr, headers: &HeaderMap) -> Option<IpAddr> {
        let peer = canonical(peer.ip());
        if !self.trusted(peer) {
            return Some(peer);
        }
        let mut client = peer;
        for value in headers.get_all("x-forwarded-for").iter().rev() {
            // By bytes: a hop of non-ASCII garbage written by the client
            // must not hide the hops a proxy appended right of it.
            for hop in value.as_bytes().rsplit(|&byte| byte == b',') {
                client = canonical(parse_hop(hop)?);
                if !self.trusted(client) {
                    return Some(client);
                }
            }
        }
        Some(client)
    }

    /// Whether `ip` is on the deny list.
    pub fn denies(&self, ip: IpAddr) -> bool {
        self.denied.iter().any(|net| net.contains(&ip))
    }
}

/// One `X-Forwarded-For` hop: an address, maybe with a port or brackets.
fn parse_hop(hop: &[u8]) -> Option<IpAddr> {
    // Only the whitespace HTTP knows: `str::trim` would also drop Unicode
    // spaces a client put there.
    let hop = std::str::from_utf8(hop).ok()?.trim_matches([' ', '\t']);
    let bare = hop
        .strip_prefix('[')
        .and_then(|rest| rest.strip_suffix(']'))
        .unwrap_or(hop);
    bare.parse::<IpAddr>()
        .ok()
        .or_else(|| hop.parse::<SocketAddr>().ok().map(|addr| addr.ip()))
}

/// IPv4-mapped IPv6 addresses as IPv4, so `10.0.0.0/8` matches them.
fn canonical(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(ip, IpAddr::V4),
        IpAddr::V4(_) => ip,
    }
}

#[cfg(test)]
mod tests {
    use axum::http::HeaderValue;

    use super::*;

    fn headers(xff: &[&str]) -> HeaderMap {
        let mut map = HeaderMap::new();
        for value in xff {
            map.append(
                "x-forwarded-for",
                HeaderValue::from_str(value).expect("value"),
            );
        }
        map
    }

    fn ip(text: &str) -> IpAddr {
        text.parse().expect("ip")
    }

    fn peer(text: &str) -> SocketAddr {
        SocketAddr::new(ip(text), 40000)
    }

    #[test]
    fn forwarded_for_is_believed_only_from_trusted_proxies() {
        let policy = NetworkPolicy::new(&["10.0.0.0/8".to_owned()], &[]).expect("policy");
        let spoof = headers(&["1.2.3.4"]);
        assert_eq!(
            policy.client_ip(peer("203.0.113.9"), &spoof),
            Some(ip("203.0.113.9"))
        );
        assert_eq!(
            policy.client_ip(peer("10.1.1.1"), &spoof),
            Some(ip("1.2.3.4"))
        );
        // A client cannot hide behind entries it wrote itself.
        let chain = headers(&["6.6.6.6, 198.51.100.7, 10.2.2.2"]);
        assert_eq!(
            policy.client_ip(peer("10.1.1.1"), &chain),
            Some(ip("198.51.100.7"))
        );
        // Garbage where an address must be believed: unknown, not the proxy.
        let garbage = headers(&["not-an-ip"]);
        assert_eq!(policy.client_ip(peer("10.1.1.1"), &garbage), None);
        assert_eq!(
            policy.client_ip(peer("10.1.1.1"), &headers(&["[2001:db8::7]"])),
            Some(ip("2001:db8::7"))
        );
    }

    #[test]
    fn non_ascii_hops_do_not_hide_the_appended_address() {
        let policy = NetworkPolicy::new(&["10.0.0.0/8".to_owned()], &[]).expect("policy");
        let mut map = HeaderMap::new();
        map.append(
            "x-forwarded-for",
            HeaderValue::from_bytes(b"\x80, 203.0.113.5").expect("value"),
        );
        assert_eq!(
            policy.client_ip(peer("10.1.1.1"), &map),
            Some(ip("203.0.113.5"))
        );
        let mut map = HeaderMap::new();
        map.append(
            "x-forwarded-for",
            HeaderValue::from_bytes(b"1.2.3.4, \x80").expect("value"),
        );
        assert_eq!(policy.client_ip(peer("10.1.1.1"), &map), None);
    }

    #[test]
    fn mapped_networks_become_ipv4_networks() {
        let net = |text: &str| parse_cidr(text).expect(text).to_string();
        assert_eq!(net("::ffff:198.51.100.0/120"), "198.51.100.0/24");
        assert_eq!(net("::ffff:10.0.0.0/104"), "10.0.0.0/8");
        assert_eq!(net("::ffff:10.1.2.3/104"), "10.0.0.0/8");
        assert_eq!(net("::ffff:0:0/96"), "0.0.0.0/0");
        assert_eq!(net("::ffff:192.0.2.7"), "192.0.2.7/32");
        assert_eq!(net("::ffff:192.0.2.7/128"), "192.0.2.7/32");
        // Wider than the mapped range, or not mapped at all: as given.
        assert_eq!(net("::ffff:0:0/95"), "::fffe:0:0/95");
        assert_eq!(net("::/64"), "::/64");
        assert_eq!(net("2001:db8::/32"), "2001:db8::/32");
        assert_eq!(net("::1"), "::1/128");
        assert_eq!(net("10.0.0.0/8"), "10.0.0.0/8");
    }

    /// A deny list written in mapped form denies the plain IPv4 client
    /// (and the client that connects over IPv6 with a mapped address).
    #[test]
    fn a_mapped_deny_list_denies_ipv4_clients() {
        let policy =
            NetworkPolicy::new(&[], &["::ffff:198.51.100.0/120".to_owned()]).expect("policy");
        assert!(policy.denies(ip("198.51.100.9")));
        assert!(!policy.denies(ip("198.51.101.9")));
        let mapped = policy.client_ip(peer("::ffff:198.51.100.9"), &HeaderMap::new());
        assert!(mapped.is_some_and(|mapped| policy.denies(mapped)));
        let proxies = NetworkPolicy::new(&["::ffff:10.0.0.0/104".to_owned()], &[]).expect("policy");
        assert_eq!(
            proxies.client_ip(peer("10.1.1.1"), &headers(&["203.0.113.5"])),
            Some(ip("203.0.113.5"))
        );
    }

    #[test]
    fn deny_list_and_mapped_addresses() {
        let policy =
            NetworkPolicy::new(&[], &["192.0.2.0/24".to_owned(), "2001:db8::1".to_owned()])
                .expect("policy");
        assert!(policy.denies("192.0.2.44".parse().expect("ip")));
        assert!(policy.denies("2001:db8::1".parse().expect("ip")));
        assert!(!policy.denies("198.51.100.1".parse().expect("ip")));
        let mapped = policy.client_ip(peer("::ffff:192.0.2.44"), &HeaderMap::new());
        assert!(mapped.is_some_and(|mapped| policy.denies(mapped)));
        assert!(NetworkPolicy::new(&["10.0.0.0/33".to_owned()], &[]).is_err());
    }
}
