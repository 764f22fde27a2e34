//! The client's address: the peer of the connection, or, when that peer is a trusted proxy, the
//! address that proxy forwarded in the **one** header it is configured to set
//! ([`ForwardedHeader`]).
//!
//! The rules:
//!
//! - Without trusted proxies (the default) the client is the connection's peer, and no header is
//!   ever read.
//! - A header from a peer that is not a trusted proxy is ignored altogether.
//! - Only the configured header is read; a request carrying `Forwarded` and `X-Forwarded-For`
//!   reads the configured one, whatever the other says. A client can always send either header
//!   itself: which one is the proxy's is configuration, never guessed from what is present.
//! - `X-Forwarded-For` and `Forwarded` are walked from the right (all lines of the header, in
//!   order, are one list): every address of a trusted proxy is skipped, and the first untrusted
//!   one is the client. A client cannot smuggle an address in, since anything left of the first
//!   untrusted hop is ignored. `X-Real-IP` is one value set by the proxy; two lines or a list
//!   make it unreadable.
//! - In `Forwarded`, a comma or semicolon inside a quoted-string (RFC 7230, `\` escapes) separates
//!   nothing: a trusted proxy's `for=192.0.2.9;host="x, for=198.51.100.7"` is one element, for
//!   192.0.2.9.
//! - A hop that cannot be read (`for=unknown`, an obfuscated `for=_hidden`, an element without
//!   `for`, an unclosed quoted-string, garbage, bytes that are not text) makes the client address
//!   unknown: a token with an IP restriction is then refused. The failure limiter still counts
//!   the request, against the nearest address that did parse (the last trusted hop, ultimately
//!   the peer): [`ClientAddr::limit_key`].
//!
//! Trust only proxies that overwrite or append to the configured header on every request: a
//! "trusted" proxy that passes a client's header through unchanged lets that client choose its
//! address.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::Arc;

use http::header::{FORWARDED, GetAll};
use http::{Extensions, HeaderMap, HeaderName, HeaderValue};
use ipnet::IpNet;

use crate::record::{canonical_ip, canonical_net};

/// `X-Forwarded-For`.
const X_FORWARDED_FOR: HeaderName = HeaderName::from_static("x-forwarded-for");
/// `X-Real-IP`.
const X_REAL_IP: HeaderName = HeaderName::from_static("x-real-ip");

/// The header a trusted proxy puts the client address in. Exactly one is read; see the
/// [module docs](self).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum ForwardedHeader {
    /// `X-Forwarded-For: client, proxy1, proxy2`, appended to by each proxy (nginx
    /// `$proxy_add_x_forwarded_for`, most cloud load balancers). Walked from the right.
    XForwardedFor,
    /// `Forwarded: for=client, for=proxy1` (RFC 7239), appended to by each proxy. Walked from the
    /// right; an element's `for` may be quoted and carry a port (`for="[2001:db8::1]:4711"`).
    Forwarded,
    /// `X-Real-IP: client`, one address set (overwritten) by the proxy (nginx
    /// `proxy_set_header X-Real-IP $remote_addr`).
    XRealIp,
}

impl ForwardedHeader {
    /// The header's name, in lower case.
    pub fn name(self) -> &'static str {
        match self {
            Self::XForwardedFor => "x-forwarded-for",
            Self::Forwarded => "forwarded",
            Self::XRealIp => "x-real-ip",
        }
    }
}

/// The client address of one request, as [`ClientIpSource::client_addr`] read it.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct ClientAddr {
    ip: Option<IpAddr>,
    limit_key: Option<IpAddr>,
}

impl ClientAddr {
    /// An address known from trusted information (the peer, or what a trusted proxy forwarded).
    fn known(ip: IpAddr) -> Self {
        Self {
            ip: Some(ip),
            limit_key: Some(ip),
        }
    }

    /// An address known from trusted information, or none: both the address and the limit key.
    pub(crate) fn from_ip(ip: Option<IpAddr>) -> Self {
        Self { ip, limit_key: ip }
    }

    /// The client address, `None` when it is unknown: no peer address on the request, or a
    /// trusted proxy forwarded something that cannot be read. IP restrictions are checked, and
    /// usage is recorded, with this address only; a restricted token is refused without one.
    pub fn ip(&self) -> Option<IpAddr> {
        self.ip
    }

    /// The address the failure limiter counts the request against: the client address when it is
    /// known, else the nearest hop that did parse (the last trusted proxy, ultimately the peer).
    /// `None` only without a peer address.
    pub fn limit_key(&self) -> Option<IpAddr> {
        self.limit_key
    }
}

/// Where the layer reads the client address from: the trusted proxies and the one header they
/// set. See the [module docs](self).
///
/// ```
/// use tower_pat::client_ip::{ClientIpSource, ForwardedHeader};
///
/// let source = ClientIpSource::new()
///     .trust_proxies(["10.0.0.0/8".parse().unwrap()], ForwardedHeader::XForwardedFor);
/// assert_eq!(source.forwarded_header(), Some(ForwardedHeader::XForwardedFor));
/// ```
#[derive(Clone, Debug, Default)]
pub struct ClientIpSource {
    trusted_proxies: Arc<[IpNet]>,
    header: Option<ForwardedHeader>,
}

impl ClientIpSource {
    /// Trusts no proxy: the client is the connection's peer and no header is read.
    pub fn new() -> Self {
        Self::default()
    }

    /// Trusts `header` from peers in `proxies`, replacing any earlier setting. IPv4-mapped IPv6
    /// networks (`::ffff:10.0.0.0/104`) are taken as the IPv4 networks they are.
    #[must_use]
    pub fn trust_proxies(
        mut self,
        proxies: impl IntoIterator<Item = IpNet>,
        header: ForwardedHeader,
    ) -> Self {
        self.trusted_proxies = proxies.into_iter().map(canonical_net).collect();
        self.header = Some(header);
        self
    }

    /// The trusted proxy networks.
    pub fn trusted_proxies(&self) -> &[IpNet] {
        &self.trusted_proxies
    }

    /// The header trusted proxies set, `None` when no proxy is trusted.
    pub fn forwarded_header(&self) -> Option<ForwardedHeader> {
        self.header.filter(|_| !self.trusted_proxies.is_empty())
    }

    fn is_trusted(&self, ip: IpAddr) -> bool {
        self.trusted_proxies.iter().any(|n| n.contains(&ip))
    }

    /// The client address of a request: [`client_addr`](Self::client_addr)`.ip()`.
    pub fn client_ip(&self, headers: &HeaderMap, extensions: &Extensions) -> Option<IpAddr> {
        self.client_addr(headers, extensions).ip()
    }

    /// The client address of a request and the address its failures count against. Allocates
    /// nothing.
    pub fn client_addr(&self, headers: &HeaderMap, extensions: &Extensions) -> ClientAddr {
        let Some(peer) = peer_addr(extensions) else {
            return ClientAddr::default();
        };
        let peer = canonical_ip(peer.ip());
        let Some(header) = self.header else {
            return ClientAddr::known(peer);
        };
        if !self.is_trusted(peer) {
            return ClientAddr::known(peer);
        }
        match header {
            ForwardedHeader::XForwardedFor => {
                self.walk(headers.get_all(X_FORWARDED_FOR), peer, false, xff_element)
            }
            ForwardedHeader::Forwarded => {
                self.walk(headers.get_all(FORWARDED), peer, true, forwarded_element)
            }
            ForwardedHeader::XRealIp => real_ip(headers, peer),
        }
    }

    /// Walks a comma-separated list from the right, skipping trusted hops. With `quoted`
    /// (`Forwarded`), a comma inside a quoted-string separates nothing ([`split_last`]).
    fn walk(
        &self,
        values: GetAll<'_, HeaderValue>,
        peer: IpAddr,
        quoted: bool,
        parse: fn(&[u8]) -> Option<IpAddr>,
    ) -> ClientAddr {
        let mut nearest = peer;
        for value in values.iter().rev() {
            let mut rest = Some(value.as_bytes());
            while let Some(list) = rest {
                let (before, element) = split_last(list, quoted);
                rest = before;
                let element = trim_ows(element);
                // RFC 9110 §5.6.1: empty list elements are ignored.
                if element.is_empty() {
                    continue;
                }
                let Some(ip) = parse(element) else {
                    return ClientAddr {
                        ip: None,
                        limit_key: Some(nearest),
                    };
                };
                nearest = ip;
                if !self.is_trusted(ip) {
                    return ClientAddr::known(ip);
                }
            }
        }
        // Every hop is a trusted proxy (or there is none): the leftmost is the client.
        ClientAddr::known(nearest)
    }
}

/// Whether the quoted-strings of a `Forwarded` element are closed (RFC 7230 §3.2.6: `"` … `"`,
/// with `\` escaping the byte after it inside), and no `\` stands outside one.
fn quoting_is_valid(element: &[u8]) -> bool {
    let mut inside = false;
    let mut bytes = element.iter();
    while let Some(b) = bytes.next() {
        match (inside, b) {
            (false, b'"') => inside = true,
            (false, b'\\') => return false,
            (true, b'"') => inside = false,
            // A quoted-pair: the escaped byte is skipped (none left: still inside, so invalid).
            (true, b'\\') => {
                bytes.next();
            }
            _ => {}
        }
    }
    !inside
}

/// `list` split at its last comma: what precedes it (`None` without one) and the last element.
///
/// With `quoted` (`Forwarded`), a comma inside a quoted-string does not count: `host="a, for=b"`
/// is one parameter. The list is read from the right, where the trusted proxies appended their
/// well-formed elements, so what a client wrote further left (an unclosed `"`, say) cannot change
/// how they split: a `"` starts or ends a quoted-string, except inside one after an odd run of
/// `\`, which escapes it. An element whose quoting is broken (as when the scan reaches the
/// start of the line inside a quoted-string) is refused by [`forwarded_element`].
fn split_last(list: &[u8], quoted: bool) -> (Option<&[u8]>, &[u8]) {
    let mut inside = false;
    for i in (0..list.len()).rev() {
        match list[i] {
            b',' if !inside => return (Some(&list[..i]), &list[i + 1..]),
            b'"' if quoted => {
                let escapes = list[..i].iter().rev().take_while(|b| **b == b'\\').count();
                if !inside || escapes % 2 == 0 {
                    inside = !inside;
                }
            }
            _ => {}
        }
    }
    (None, list)
}

/// `element` split at each `;` outside quoted-strings (its quoting valid: [`quoting_is_valid`]).
fn split_pairs(element: &str) -> impl Iterator<Item = &str> {
    let mut rest = Some(element);
    std::iter::from_fn(move || {
        let s = rest?;
        let mut inside = false;
        let mut escaped = false;
        for (i, b) in s.bytes().enumerate() {
            match b {
                _ if escaped => escaped = false,
                b'\\' if inside => escaped = true,
                b'"' => inside = !inside,
                b';' if !inside => {
                    rest = Some(&s[i + 1..]);
                    return Some(&s[..i]);
                }
                _ => {}
            }
        }
        rest = None;
        Some(s)
    })
}

/// `X-Real-IP`: one line, one address; absent, the client is the peer itself.
fn real_ip(headers: &HeaderMap, peer: IpAddr) -> ClientAddr {
    let mut values = headers.get_all(X_REAL_IP).iter();
    let ip = match (values.next(), values.next()) {
        (None, _) => return ClientAddr::known(peer),
        (Some(value), None) => xff_element(trim_ows(value.as_bytes())),
        (Some(_), Some(_)) => None,
    };
    match ip {
        Some(ip) => ClientAddr::known(ip),
        None => ClientAddr {
            ip: None,
            limit_key: Some(peer),
        },
    }
}

/// The connection's peer address, from the extension the server put on the request: a plain
/// [`SocketAddr`] (insert it from a hyper server), axum's `ConnectInfo<SocketAddr>` (feature
/// `axum`) or tonic's `TcpConnectInfo` (feature `tonic`).
///
/// tonic serving TLS itself puts a `TlsConnectInfo<TcpConnectInfo>` there instead, which this
/// crate does not read (it would need tonic's TLS stack): insert its address as a `SocketAddr`
/// with a layer in front of this one (`tower::util::MapRequestLayer`, reading
/// `TlsConnectInfo::get_ref().remote_addr()`). Without an address, IP-restricted tokens are
/// refused and the failure limit counts nothing (named once in the log).
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

fn trim_ows(mut s: &[u8]) -> &[u8] {
    while let [b' ' | b'\t', rest @ ..] = s {
        s = rest;
    }
    while let [rest @ .., b' ' | b'\t'] = s {
        s = rest;
    }
    s
}

/// One `X-Forwarded-For` element (or the `X-Real-IP` value): an address, optionally with a port.
fn xff_element(element: &[u8]) -> Option<IpAddr> {
    parse_node(std::str::from_utf8(element).ok()?)
}

/// One `Forwarded` element (`for=…;proto=…;by=…`): its `for` node. `None` for an element without
/// exactly one readable `for` address, with a parameter that is not `name=value`, or whose
/// quoted-strings are not closed.
fn forwarded_element(element: &[u8]) -> Option<IpAddr> {
    if !quoting_is_valid(element) {
        return None;
    }
    let element = std::str::from_utf8(element).ok()?;
    let mut found = None;
    for pair in split_pairs(element) {
        let pair = pair.trim_matches([' ', '\t']);
        if pair.is_empty() {
            continue;
        }
        let (name, value) = pair.split_once('=')?;
        if !name.eq_ignore_ascii_case("for") {
            continue;
        }
        if found.is_some() {
            // RFC 7239 §4: a parameter occurs at most once per element.
            return None;
        }
        let value = match value.strip_prefix('"') {
            // No escapes: a node never needs them.
            Some(quoted) => quoted
                .strip_suffix('"')
                .filter(|v| !v.contains(['"', '\\']))?,
            None => value,
        };
        found = Some(parse_node(value)?);
    }
    found
}

/// A node: `192.0.2.1`, `192.0.2.1:80`, `2001:db8::1`, `[2001:db8::1]`, `[2001:db8::1]:80`, a port
/// possibly obfuscated (`:_a1`). `unknown` and obfuscated identifiers (`_hidden`) are `None`.
/// IPv4-mapped IPv6 addresses come back as IPv4.
fn parse_node(node: &str) -> Option<IpAddr> {
    let ip = if let Some(rest) = node.strip_prefix('[') {
        let (addr, port) = rest.split_once(']')?;
        if !port.is_empty() && !is_port(port.strip_prefix(':')?) {
            return None;
        }
        IpAddr::V6(addr.parse::<Ipv6Addr>().ok()?)
    } else if let Ok(ip) = node.parse::<IpAddr>() {
        ip
    } else {
        let (addr, port) = node.split_once(':')?;
        if !is_port(port) {
            return None;
        }
        IpAddr::V4(addr.parse::<Ipv4Addr>().ok()?)
    };
    Some(canonical_ip(ip))
}

/// A port (1–5 digits, at most 65535) or an obfuscated one (`_` then letters, digits, `.`, `_`,
/// `-`), RFC 7239 §6.
fn is_port(port: &str) -> bool {
    match port.strip_prefix('_') {
        Some(obf) => {
            !obf.is_empty()
                && obf
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'))
        }
        None => {
            (1..=5).contains(&port.len())
                && port.bytes().all(|b| b.is_ascii_digit())
                && port.parse::<u16>().is_ok()
        }
    }
}

/// The network a client is counted in, by the failure limit and the lookup budgets: its address
/// (an IPv4-mapped IPv6 address as IPv4) with the host bits past `v4_prefix` / `v6_prefix`
/// cleared. Prefixes longer than the address keep it whole.
pub(crate) fn network_key(ip: IpAddr, v4_prefix: u8, v6_prefix: u8) -> IpAddr {
    match canonical_ip(ip) {
        IpAddr::V4(v4) => {
            let mask = u32::MAX
                .checked_shl(32 - u32::from(v4_prefix.min(32)))
                .unwrap_or(0);
            IpAddr::V4(std::net::Ipv4Addr::from(u32::from(v4) & mask))
        }
        IpAddr::V6(v6) => {
            let mask = u128::MAX
                .checked_shl(128 - u32::from(v6_prefix.min(128)))
                .unwrap_or(0);
            IpAddr::V6(std::net::Ipv6Addr::from(u128::from(v6) & mask))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn req(peer: &str, headers: &[(&str, &[u8])]) -> (HeaderMap, Extensions) {
        let mut h = HeaderMap::new();
        for (k, v) in headers {
            h.append(
                http::HeaderName::from_bytes(k.as_bytes()).unwrap(),
                HeaderValue::from_bytes(v).unwrap(),
            );
        }
        let mut e = Extensions::new();
        e.insert(peer.parse::<SocketAddr>().unwrap());
        (h, e)
    }

    fn source(header: ForwardedHeader) -> ClientIpSource {
        ClientIpSource::new().trust_proxies(["10.0.0.0/8".parse().unwrap()], header)
    }

    fn ip(s: &str) -> Option<IpAddr> {
        Some(s.parse().unwrap())
    }

    fn addr(src: &ClientIpSource, peer: &str, headers: &[(&str, &[u8])]) -> ClientAddr {
        let (h, e) = req(peer, headers);
        src.client_addr(&h, &e)
    }

    #[test]
    fn untrusted_peer_ignores_headers() {
        let src = source(ForwardedHeader::XForwardedFor);
        let a = addr(&src, "192.0.2.9:1", &[("x-forwarded-for", b"1.2.3.4")]);
        assert_eq!((a.ip(), a.limit_key()), (ip("192.0.2.9"), ip("192.0.2.9")));
        // Without any trusted proxy, even a header from a private address is ignored.
        let a = addr(
            &ClientIpSource::new(),
            "10.0.0.1:1",
            &[("x-forwarded-for", b"1.2.3.4")],
        );
        assert_eq!(a.ip(), ip("10.0.0.1"));
        assert_eq!(ClientIpSource::new().forwarded_header(), None);
    }

    #[test]
    fn walks_from_the_right() {
        let src = source(ForwardedHeader::XForwardedFor);
        let a = addr(
            &src,
            "10.0.0.1:1",
            &[
                ("x-forwarded-for", b"6.6.6.6, 198.51.100.7"),
                ("x-forwarded-for", b"10.0.0.2"),
            ],
        );
        assert_eq!(a.ip(), ip("198.51.100.7"));
        let src = source(ForwardedHeader::Forwarded);
        let a = addr(
            &src,
            "10.0.0.1:1",
            &[(
                "forwarded",
                b"for=6.6.6.6, for=\"[2001:db8::7]:4711\";proto=https",
            )],
        );
        assert_eq!(a.ip(), ip("2001:db8::7"));
        let a = addr(&src, "10.0.0.1:1", &[]);
        assert_eq!(a.ip(), ip("10.0.0.1"));
        // All hops trusted: the leftmost is the client.
        let a = addr(
            &src,
            "10.0.0.1:1",
            &[("forwarded", b"For=10.3.3.3, for=10.2.2.2")],
        );
        assert_eq!(a.ip(), ip("10.3.3.3"));
    }

    #[test]
    fn unreadable_lists_keep_the_nearest_parsed_hop_for_the_limiter() {
        let src = source(ForwardedHeader::XForwardedFor);
        for (value, key) in [
            (&b"garbage"[..], "10.0.0.1"),
            (b"1.2.3.4, unknown, 10.9.9.9", "10.9.9.9"),
            (b"1.2.3.4, \xff, 10.9.9.9 ,, ", "10.9.9.9"),
            (b"1.2.3.4:99999", "10.0.0.1"),
        ] {
            let a = addr(&src, "10.0.0.1:1", &[("x-forwarded-for", value)]);
            assert_eq!(a.ip(), None, "{value:?}");
            assert_eq!(a.limit_key(), ip(key), "{value:?}");
        }
        let src = source(ForwardedHeader::Forwarded);
        for value in [
            &b"for=unknown"[..],
            b"for=_hidden",
            b"proto=https",
            b"for",
            b"for=1.2.3.4;for=1.2.3.4",
            b"for=\"1.2.3.4",
            b"for=\"1.2\\.3.4\"",
            b"for=[2001:db8::1",
            b"for=\"[2001:db8::1]x\"",
        ] {
            let a = addr(&src, "10.0.0.1:1", &[("forwarded", value)]);
            assert_eq!(a.ip(), None, "{}", String::from_utf8_lossy(value));
            assert_eq!(a.limit_key(), ip("10.0.0.1"));
        }
        // Garbage left of the client is the client's own business.
        let a = addr(
            &src,
            "10.0.0.1:1",
            &[("forwarded", b"for=junk, for=1.2.3.4")],
        );
        assert_eq!(a.ip(), ip("1.2.3.4"));
    }

    #[test]
    fn forwarded_quoted_strings_separate_nothing() {
        let src = source(ForwardedHeader::Forwarded);
        // The attack: a trusted proxy appends the client's own `Host`, quoted; the comma and the
        // `for=` inside it are the client's text, not an element.
        for value in [
            &b"for=203.0.113.9;host=\"x, for=198.51.100.7;a=\""[..],
            b"for=203.0.113.9;host=\"x;for=198.51.100.7\"",
            b"for=203.0.113.9;host=\"x\\\", for=198.51.100.7\"",
            b"for=198.51.100.7, for=203.0.113.9;host=\"a\\\\\", for=10.2.2.2",
        ] {
            let a = addr(&src, "10.0.0.1:1", &[("forwarded", value)]);
            assert_eq!(
                a.ip(),
                ip("203.0.113.9"),
                "{}",
                String::from_utf8_lossy(value)
            );
        }
        // Trusted hops with quoted commas are walked past.
        let a = addr(
            &src,
            "10.0.0.1:1",
            &[(
                "forwarded",
                b"for=198.51.100.7;host=\"a, b\", for=10.2.2.2;host=\"c, for=1.1.1.1\"",
            )],
        );
        assert_eq!(a.ip(), ip("198.51.100.7"));
        // Broken quoting in an element that is read: unknown, counted against the nearest hop.
        for value in [
            &b"for=203.0.113.9;host=\"x"[..],
            b"for=203.0.113.9;host=\"x\\\"",
            b"for=203.0.113.9;host=x\\y",
            b"for=198.51.100.7, for=10.2.2.2;host=\"x",
        ] {
            let a = addr(&src, "10.0.0.1:1", &[("forwarded", value)]);
            assert_eq!(a.ip(), None, "{}", String::from_utf8_lossy(value));
            assert_eq!(a.limit_key(), ip("10.0.0.1"));
        }
        // Broken quoting left of the client is the client's own business: the proxy's element,
        // read from the right, still names it.
        let a = addr(
            &src,
            "10.0.0.1:1",
            &[("forwarded", b"for=\"x, for=203.0.113.9")],
        );
        assert_eq!(a.ip(), ip("203.0.113.9"));
    }

    #[test]
    fn nodes() {
        for (node, parsed) in [
            ("192.0.2.1", ip("192.0.2.1")),
            ("192.0.2.1:80", ip("192.0.2.1")),
            ("192.0.2.1:_obf", ip("192.0.2.1")),
            ("2001:db8::1", ip("2001:db8::1")),
            ("[2001:db8::1]", ip("2001:db8::1")),
            ("[2001:db8::1]:443", ip("2001:db8::1")),
            ("::ffff:192.0.2.1", ip("192.0.2.1")),
            ("[::ffff:192.0.2.1]:1", ip("192.0.2.1")),
            ("192.0.2.1:", None),
            ("192.0.2.1:_", None),
            ("192.0.2.1:123456", None),
            ("[2001:db8::1]:", None),
            ("fe80::1%eth0", None),
            ("unknown", None),
            ("_hidden", None),
            ("", None),
        ] {
            assert_eq!(parse_node(node), parsed, "{node}");
        }
    }

    #[test]
    fn x_real_ip() {
        let src = source(ForwardedHeader::XRealIp);
        let a = addr(
            &src,
            "10.0.0.1:1",
            &[
                ("x-real-ip", b" 198.51.100.7 "),
                ("x-forwarded-for", b"1.2.3.4"),
            ],
        );
        assert_eq!(a.ip(), ip("198.51.100.7"));
        let a = addr(
            &src,
            "10.0.0.1:1",
            &[
                ("x-real-ip", b"198.51.100.7"),
                ("x-real-ip", b"198.51.100.7"),
            ],
        );
        assert_eq!((a.ip(), a.limit_key()), (None, ip("10.0.0.1")));
        assert_eq!(addr(&src, "10.0.0.1:1", &[]).ip(), ip("10.0.0.1"));
    }

    #[test]
    fn mapped_peers_and_proxy_networks() {
        let src = ClientIpSource::new().trust_proxies(
            ["::ffff:10.0.0.0/104".parse().unwrap()],
            ForwardedHeader::XForwardedFor,
        );
        assert_eq!(src.trusted_proxies(), ["10.0.0.0/8".parse().unwrap()]);
        let a = addr(
            &src,
            "[::ffff:10.0.0.1]:1",
            &[("x-forwarded-for", b"198.51.100.7")],
        );
        assert_eq!(a.ip(), ip("198.51.100.7"));
        let mut e = Extensions::new();
        assert_eq!(
            src.client_addr(&HeaderMap::new(), &e),
            ClientAddr::default()
        );
        e.insert("[::ffff:192.0.2.1]:5".parse::<SocketAddr>().unwrap());
        assert_eq!(src.client_ip(&HeaderMap::new(), &e), ip("192.0.2.1"));
    }
}
