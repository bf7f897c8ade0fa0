//! Which addresses a media URL may reach. A client that can make the server fetch a URL can
//! otherwise make it fetch from the server's own network: loopback services, the cloud
//! metadata endpoint (169.254.169.254), the cluster's private addresses. So by default only
//! globally routable addresses are fetched from, checked on the address actually connected
//! to: a name is resolved here, the refused addresses are dropped, and the connection is made
//! only to what is left (a name that resolves once to a public address and then to a private
//! one gets no second chance). IP literals, which skip resolution, are checked on the URL,
//! first hop and every redirect.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::Arc;

use futures::future::BoxFuture;
use ipnet::IpNet;

use super::MediaError;

/// The addresses media may be fetched from.
#[derive(Debug, Clone, Default)]
pub struct AddressRule {
    /// Every address, private ones included (`--allow-private-media-addresses`).
    pub allow_private: bool,
    /// Networks allowed although not global (`--allowed-media-networks`): an internal image
    /// store, without opening the whole private network.
    pub allowed_networks: Vec<IpNet>,
}

impl AddressRule {
    pub fn permits(&self, ip: IpAddr) -> bool {
        let ip = canonical(ip);
        self.allow_private || is_global(ip) || self.allowed_networks.iter().any(|n| n.contains(&ip))
    }

    /// A URL's host when it is an IP literal; names are checked when resolved.
    pub fn check_url(&self, url: &reqwest::Url) -> Result<(), MediaError> {
        // The URL parser has already normalised the host: `0x7f.1` and `2130706433` are
        // written `127.0.0.1`, an IPv6 literal in brackets.
        let host = url.host_str().unwrap_or_default();
        let Ok(ip) = host.trim_start_matches('[').trim_end_matches(']').parse::<IpAddr>() else {
            return Ok(());
        };
        if self.permits(ip) {
            Ok(())
        } else {
            Err(MediaError::AddressNotAllowed(ip.to_string()))
        }
    }

    /// The addresses a name resolved to that may be connected to; none: refused, naming the
    /// first address found.
    pub fn filter(&self, host: &str, addrs: Vec<SocketAddr>) -> Result<Vec<SocketAddr>, MediaError> {
        let allowed: Vec<SocketAddr> = addrs.iter().copied().filter(|a| self.permits(a.ip())).collect();
        match (allowed.is_empty(), addrs.first()) {
            (false, _) => Ok(allowed),
            (true, Some(first)) => Err(MediaError::AddressNotAllowed(format!("{host} ({})", first.ip()))),
            (true, None) => Err(MediaError::FetchFailed(format!("`{host}` resolved to no address"))),
        }
    }
}

/// An IPv6 address that carries an IPv4 one (mapped `::ffff:a.b.c.d`, NAT64 `64:ff9b::/96`),
/// as the IPv4 address it reaches.
fn canonical(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) => {
            if let Some(v4) = v6.to_ipv4_mapped() {
                return IpAddr::V4(v4);
            }
            let s = v6.segments();
            if s[..6] == [0x64, 0xff9b, 0, 0, 0, 0] {
                let [a, b] = s[6].to_be_bytes();
                let [c, d] = s[7].to_be_bytes();
                return IpAddr::V4(Ipv4Addr::new(a, b, c, d));
            }
            ip
        }
        IpAddr::V4(_) => ip,
    }
}

/// Globally routable: what `Ipv4Addr::is_global`/`Ipv6Addr::is_global` (unstable) decide,
/// from IANA's special-purpose registries.
pub fn is_global(ip: IpAddr) -> bool {
    match canonical(ip) {
        IpAddr::V4(v4) => is_global_v4(v4),
        IpAddr::V6(v6) => is_global_v6(v6),
    }
}

fn is_global_v4(ip: Ipv4Addr) -> bool {
    let [a, b, c, _] = ip.octets();
    !(a == 0 // "this network", 0.0.0.0 included
        || ip.is_private()
        || (a == 100 && (b & 0xc0) == 64) // shared address space (carrier-grade NAT)
        || ip.is_loopback()
        || ip.is_link_local() // 169.254/16: cloud metadata services
        || (a == 192 && b == 0 && c == 0) // IETF protocol assignments
        || ip.is_documentation()
        || (a == 198 && (b & 0xfe) == 18) // benchmarking
        || a >= 224) // multicast, reserved, broadcast
}

fn is_global_v6(ip: Ipv6Addr) -> bool {
    let s = ip.segments();
    !(ip.is_unspecified()
        || ip.is_loopback()
        || ip.is_multicast()
        || s[..6] == [0; 6] // IPv4-compatible (deprecated), ::/96
        || (s[0] & 0xfe00) == 0xfc00 // unique local
        || (s[0] & 0xffc0) == 0xfe80 // link local
        || (s[0] & 0xffc0) == 0xfec0 // site local (deprecated)
        || s[..4] == [0x100, 0, 0, 0] // discard-only
        || (s[0] == 0x2001 && s[1] == 0xdb8) // documentation
        || s[0] == 0x2002 // 6to4: reaches the IPv4 address inside it
        || (s[0] == 0x2001 && s[1] < 0x200)) // IETF protocol assignments, Teredo included
}

/// Resolves a host name; the system's resolver in service, a stub in tests.
pub trait Lookup: Send + Sync {
    fn lookup(&self, host: String) -> BoxFuture<'static, std::io::Result<Vec<SocketAddr>>>;
}

/// `getaddrinfo`, on tokio's blocking pool.
pub struct SystemLookup;

impl Lookup for SystemLookup {
    fn lookup(&self, host: String) -> BoxFuture<'static, std::io::Result<Vec<SocketAddr>>> {
        Box::pin(async move { Ok(tokio::net::lookup_host((host.as_str(), 0)).await?.collect()) })
    }
}

/// A refusal carried through reqwest's error chain, found again by `fetch::fetch_error`.
#[derive(Debug)]
pub struct Refused(pub MediaError);

impl std::fmt::Display for Refused {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        self.0.fmt(f)
    }
}

impl std::error::Error for Refused {}

/// reqwest's resolver: resolves, then keeps only the addresses the rule permits.
#[derive(Clone)]
pub struct GuardedResolver {
    pub lookup: Arc<dyn Lookup>,
    pub rule: AddressRule,
}

impl GuardedResolver {
    pub async fn resolve_checked(&self, host: &str) -> Result<Vec<SocketAddr>, MediaError> {
        let addrs = (self.lookup.lookup(host.to_string()).await)
            .map_err(|e| MediaError::FetchFailed(format!("resolving `{host}`: {e}")))?;
        self.rule.filter(host, addrs)
    }
}

impl reqwest::dns::Resolve for GuardedResolver {
    fn resolve(&self, name: reqwest::dns::Name) -> reqwest::dns::Resolving {
        let this = self.clone();
        Box::pin(async move {
            let addrs = this.resolve_checked(name.as_str()).await.map_err(Refused)?;
            Ok(Box::new(addrs.into_iter()) as reqwest::dns::Addrs)
        })
    }
}

#[cfg(test)]
mod tests;
