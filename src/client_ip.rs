//! The client's address: the peer of the connection, or, when that peer is a trusted proxy, the
//! address the proxies forwarded (`Forwarded`, RFC 7239, or `X-Forwarded-For`).
//!
//! The forwarded list is walked from the right: every address appended by a trusted proxy is
//! skipped, and the first untrusted one is the client. A client cannot smuggle an address in
//! through the header, since anything left of the first untrusted hop is ignored. A header from a
//! peer that is not a trusted proxy is ignored altogether.

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;

use http::{Extensions, HeaderMap, header};
use ipnet::IpNet;

use crate::record::canonical_ip;

/// Where the layer reads the client address from, and which proxies it trusts.
#[derive(Clone, Debug, Default)]
pub struct ClientIpSource {
    trusted_proxies: Arc<[IpNet]>,
}

impl ClientIpSource {
    /// Trusts no proxy: the client is the connection's peer.
    pub fn new() -> Self {
        Self::default()
    }

    /// Trusts `Forwarded` / `X-Forwarded-For` from peers in these networks.
    pub fn with_trusted_proxies(proxies: impl IntoIterator<Item = IpNet>) -> Self {
        Self {
            trusted_proxies: proxies.into_iter().collect(),
        }
    }

    /// The trusted proxy networks.
    pub fn trusted_proxies(&self) -> &[IpNet] {
        &self.trusted_proxies
    }

    fn is_trusted(&self, ip: IpAddr) -> bool {
        self.trusted_proxies.iter().any(|n| n.contains(&ip))
    }

    /// The client address of a request, `None` when the peer is unknown or a trusted proxy sent a
    /// forwarded list that cannot be read.
    pub fn client_ip(&self, headers: &HeaderMap, extensions: &Extensions) -> Option<IpAddr> {
        let peer = canonical_ip(peer_addr(extensions)?.ip());
        if !self.is_trusted(peer) {
            return Some(peer);
        }
        let forwarded: Vec<&str> = headers
            .get_all(header::FORWARDED)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .collect();
        let hops = if forwarded.is_empty() {
            let xff = headers
                .get_all("x-forwarded-for")
                .iter()
                .map(|v| v.to_str().ok())
                .collect::<Option<Vec<_>>>()?;
            xff.iter()
                .flat_map(|v| v.split(','))
                .map(|s| parse_node(s.trim()))
                .collect::<Vec<_>>()
        } else {
            forwarded
                .iter()
                .flat_map(|v| v.split(','))
                .map(forwarded_for)
                .collect::<Vec<_>>()
        };
        let mut client = peer;
        for hop in hops.iter().rev() {
            let ip = canonical_ip((*hop)?);
            client = ip;
            if !self.is_trusted(ip) {
                break;
            }
        }
        Some(client)
    }
}

/// The connection's peer address, from the extension the server put on the request: a plain
/// [`SocketAddr`] (insert it from a hyper server), axum's `ConnectInfo<SocketAddr>` (feature
/// `axum`) or tonic's `TcpConnectInfo` (feature `tonic`).
pub fn peer_addr(extensions: &Extensions) -> Option<SocketAddr> {
    if let Some(addr) = extensions.get::<SocketAddr>() {
        return Some(*addr);
    }
    #[cfg(feature = "axum")]
    if let Some(info) = extensions.get::<axum::extract::ConnectInfo<SocketAddr>>() {
        return Some(info.0);
    }
    #[cfg(feature = "tonic")]
    if let Some(info) = extensions.get::<tonic::transport::server::TcpConnectInfo>() {
        return info.remote_addr();
    }
    None
}

/// The `for=` node of one `Forwarded` element, `None` if absent or not an address.
fn forwarded_for(element: &str) -> Option<IpAddr> {
    element.split(';').find_map(|pair| {
        let (k, v) = pair.split_once('=')?;
        k.trim()
            .eq_ignore_ascii_case("for")
            .then(|| parse_node(v.trim().trim_matches('"')))?
    })
}

/// An address with an optional port: `192.0.2.1`, `192.0.2.1:80`, `2001:db8::1`, `[2001:db8::1]:80`.
fn parse_node(node: &str) -> Option<IpAddr> {
    if let Ok(ip) = node.parse::<IpAddr>() {
        return Some(ip);
    }
    if let Ok(sa) = node.parse::<SocketAddr>() {
        return Some(sa.ip());
    }
    node.strip_prefix('[')
        .and_then(|s| s.strip_suffix(']'))
        .and_then(|s| s.parse().ok())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn req(peer: &str, headers: &[(&str, &str)]) -> (HeaderMap, Extensions) {
        let mut h = HeaderMap::new();
        for (k, v) in headers {
            h.append(
                http::HeaderName::from_bytes(k.as_bytes()).unwrap(),
                v.parse().unwrap(),
            );
        }
        let mut e = Extensions::new();
        e.insert(peer.parse::<SocketAddr>().unwrap());
        (h, e)
    }

    #[test]
    fn untrusted_peer_ignores_headers() {
        let src = ClientIpSource::with_trusted_proxies(["10.0.0.0/8".parse().unwrap()]);
        let (h, e) = req("192.0.2.9:1", &[("x-forwarded-for", "1.2.3.4")]);
        assert_eq!(src.client_ip(&h, &e), Some("192.0.2.9".parse().unwrap()));
    }

    #[test]
    fn walks_from_the_right() {
        let src = ClientIpSource::with_trusted_proxies(["10.0.0.0/8".parse().unwrap()]);
        let (h, e) = req(
            "10.0.0.1:1",
            &[
                ("x-forwarded-for", "6.6.6.6, 198.51.100.7"),
                ("x-forwarded-for", "10.0.0.2"),
            ],
        );
        assert_eq!(src.client_ip(&h, &e), Some("198.51.100.7".parse().unwrap()));
        let (h, e) = req(
            "10.0.0.1:1",
            &[(
                "forwarded",
                "for=6.6.6.6, for=\"[2001:db8::7]:4711\";proto=https",
            )],
        );
        assert_eq!(src.client_ip(&h, &e), Some("2001:db8::7".parse().unwrap()));
        let (h, e) = req("10.0.0.1:1", &[("x-forwarded-for", "garbage")]);
        assert_eq!(src.client_ip(&h, &e), None);
        let (h, e) = req("10.0.0.1:1", &[]);
        assert_eq!(src.client_ip(&h, &e), Some("10.0.0.1".parse().unwrap()));
    }
}
