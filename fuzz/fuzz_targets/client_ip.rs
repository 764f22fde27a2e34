//! Client-address parsing (`ClientIpSource::client_ip`) over arbitrary `Forwarded`,
//! `X-Forwarded-For` (and other) header values, peers and trusted-proxy settings.
//!
//! Properties: never panics; without a peer there is no address; a peer that is not a trusted
//! proxy is the client whatever the headers say; otherwise the answer is `None`, the peer, or an
//! address written in one of the headers; and it is always in canonical form (an IPv4-mapped
//! IPv6 address is reported as IPv4).
#![no_main]

use std::net::{IpAddr, SocketAddr};

use arbitrary::Arbitrary;
use http::{Extensions, HeaderMap, HeaderName, HeaderValue};
use ipnet::IpNet;
use libfuzzer_sys::fuzz_target;
use tower_pat::ClientIpSource;
use tower_pat_fuzz::{Addr, canonical};

#[derive(Arbitrary, Debug)]
struct Input<'a> {
    peer: Option<(Addr, u16)>,
    trusted: Vec<(Addr, u8)>,
    headers: Vec<(Name<'a>, Value<'a>)>,
}

#[derive(Arbitrary, Debug)]
enum Name<'a> {
    Forwarded,
    XForwardedFor,
    XRealIp,
    Other(&'a str),
}

#[derive(Arbitrary, Debug)]
enum Value<'a> {
    Raw(&'a [u8]),
    /// Elements joined by one of `,`, `, `, `;`, ` `.
    List(Vec<Element<'a>>, u8),
}

#[derive(Arbitrary, Debug)]
enum Element<'a> {
    Junk(&'a str),
    /// An address in one of the ways proxies write it.
    Node {
        addr: Addr,
        port: u16,
        style: u8,
    },
}

impl Element<'_> {
    fn render(&self) -> String {
        match self {
            Element::Junk(s) => (*s).to_owned(),
            Element::Node { addr, port, style } => {
                let ip = addr.ip();
                let bracketed = match ip {
                    IpAddr::V4(v4) => v4.to_string(),
                    IpAddr::V6(v6) => format!("[{v6}]"),
                };
                match style % 8 {
                    0 => ip.to_string(),
                    1 => format!("{bracketed}:{port}"),
                    2 => bracketed,
                    3 => format!("for={ip}"),
                    4 => format!("for=\"{bracketed}:{port}\""),
                    5 => format!("for=\"{bracketed}\";proto=https;by={ip}"),
                    6 => format!("For= {ip} "),
                    _ => format!("  {ip}\t"),
                }
            }
        }
    }
}

/// Every address written in `headers`, in any of the forms the crate accepts: values split on
/// `,`, `;` and `=`, trimmed of spaces and quotes, read as an address, a socket address or a
/// bracketed IPv6 address.
fn written_addresses(headers: &HeaderMap) -> Vec<IpAddr> {
    let mut out = Vec::new();
    for value in headers.values() {
        let Ok(text) = value.to_str() else { continue };
        for part in text.split([',', ';', '=']) {
            let part = part.trim_matches(|c: char| c.is_whitespace() || c == '"');
            if let Ok(ip) = part.parse::<IpAddr>() {
                out.push(ip);
            } else if let Ok(sa) = part.parse::<SocketAddr>() {
                out.push(sa.ip());
            } else if let Some(ip) = part
                .strip_prefix('[')
                .and_then(|p| p.strip_suffix(']'))
                .and_then(|p| p.parse::<IpAddr>().ok())
            {
                out.push(ip);
            }
        }
    }
    out
}

fuzz_target!(|input: Input<'_>| {
    let trusted: Vec<IpNet> = input
        .trusted
        .iter()
        .take(8)
        .filter_map(|(addr, len)| {
            let ip = addr.ip();
            let max = if ip.is_ipv4() { 32 } else { 128 };
            IpNet::new(ip, len % (max + 1)).ok()
        })
        .collect();
    let source = ClientIpSource::with_trusted_proxies(trusted.clone());

    let mut headers = HeaderMap::new();
    for (name, value) in input.headers.iter().take(16) {
        let name = match name {
            Name::Forwarded => HeaderName::from_static("forwarded"),
            Name::XForwardedFor => HeaderName::from_static("x-forwarded-for"),
            Name::XRealIp => HeaderName::from_static("x-real-ip"),
            Name::Other(s) => match HeaderName::from_bytes(s.as_bytes()) {
                Ok(n) => n,
                Err(_) => continue,
            },
        };
        let value = match value {
            Value::Raw(bytes) => HeaderValue::from_bytes(bytes),
            Value::List(elements, sep) => {
                let sep = [",", ", ", ";", " "][usize::from(*sep) % 4];
                let text: Vec<String> = elements.iter().take(16).map(Element::render).collect();
                HeaderValue::from_str(&text.join(sep))
            }
        };
        if let Ok(value) = value {
            headers.append(name, value);
        }
    }

    let mut extensions = Extensions::new();
    let peer = input
        .peer
        .map(|(addr, port)| SocketAddr::new(addr.ip(), port));
    if let Some(peer) = peer {
        extensions.insert(peer);
    }

    let client = source.client_ip(&headers, &extensions);

    if let Some(ip) = client {
        assert_eq!(ip, canonical(ip), "reported in canonical form");
    }
    let Some(peer) = peer else {
        assert_eq!(client, None, "no peer, no address");
        return;
    };
    let peer_ip = canonical(peer.ip());
    let peer_trusted = trusted.iter().any(|net| net.contains(&peer_ip));
    if !peer_trusted {
        assert_eq!(
            client,
            Some(peer_ip),
            "an untrusted peer is the client, whatever its headers say"
        );
        return;
    }
    if let Some(ip) = client
        && ip != peer_ip
    {
        let written = written_addresses(&headers);
        assert!(
            written.iter().any(|w| canonical(*w) == ip),
            "{ip} is neither the peer nor written in the headers {headers:?}"
        );
    }
    // Without any header, a trusted peer is the client.
    if headers.is_empty() {
        assert_eq!(client, Some(peer_ip));
    }
});
