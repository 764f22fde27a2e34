//! Client-address parsing (`ClientIpSource::client_addr`) over arbitrary `Forwarded`,
//! `X-Forwarded-For`, `X-Real-IP` (and other) header values, peers, trusted-proxy settings and
//! the configured forwarded header.
//!
//! Properties: never panics; without a peer there is no address; a peer that is not a trusted
//! proxy is the client whatever the headers say; otherwise the answer is `None`, the peer, or an
//! address written in the configured header; only the configured header matters (the answer is
//! the same with every other header removed); the failure limiter always has a key when there is
//! a peer, and it is the client address when that is known; addresses are in canonical form (an
//! IPv4-mapped IPv6 address is reported as IPv4).
#![no_main]

use std::net::{IpAddr, SocketAddr};

use arbitrary::Arbitrary;
use http::{Extensions, HeaderMap, HeaderName, HeaderValue};
use ipnet::IpNet;
use libfuzzer_sys::fuzz_target;
use tower_pat::{ClientIpSource, ForwardedHeader};
use tower_pat_fuzz::{Addr, canonical};

#[derive(Arbitrary, Debug)]
struct Input<'a> {
    header: u8,
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
        // Lossy: the crate walks a list from the right and may stop at a readable element before
        // it reaches unreadable bytes further left (client-controlled, never looked at).
        let text = String::from_utf8_lossy(value.as_bytes());
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

fn peer_present(extensions: &Extensions) -> bool {
    extensions.get::<SocketAddr>().is_some()
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
    let configured = [
        ForwardedHeader::XForwardedFor,
        ForwardedHeader::Forwarded,
        ForwardedHeader::XRealIp,
    ][usize::from(input.header) % 3];
    let source = ClientIpSource::new().trust_proxies(trusted.clone(), configured);

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

    let addr = source.client_addr(&headers, &extensions);
    let client = addr.ip();
    assert_eq!(client, source.client_ip(&headers, &extensions));

    // Only the configured header is read: a client may send the others itself.
    let mut only_configured = HeaderMap::new();
    for value in headers.get_all(configured.name()) {
        only_configured.append(HeaderName::from_static(configured.name()), value.clone());
    }
    let alone = source.client_addr(&only_configured, &extensions);
    assert_eq!(
        (alone.ip(), alone.limit_key()),
        (client, addr.limit_key()),
        "a header other than {configured:?} changed the address"
    );
    if peer_present(&extensions) {
        assert!(
            addr.limit_key().is_some(),
            "a request with a peer is always limited"
        );
    }
    if client.is_some() {
        assert_eq!(
            addr.limit_key(),
            client,
            "a known client is limited as itself"
        );
    }
    let headers = only_configured;

    if let Some(ip) = client {
        assert_eq!(ip, canonical(ip), "reported in canonical form");
    }
    let Some(peer) = peer else {
        assert_eq!(client, None, "no peer, no address");
        return;
    };
    let peer_ip = canonical(peer.ip());
    // As the source holds them: IPv4-mapped IPv6 networks are the IPv4 networks they stand for.
    let peer_trusted = source
        .trusted_proxies()
        .iter()
        .any(|net| net.contains(&peer_ip));
    assert!(
        source.trusted_proxies().iter().all(|n| match n {
            IpNet::V6(v6) => v6.prefix_len() < 96 || v6.network().to_ipv4_mapped().is_none(),
            IpNet::V4(_) => true,
        }),
        "a mapped trusted network was kept as IPv6"
    );
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
