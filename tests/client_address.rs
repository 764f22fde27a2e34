//! The client address behind trusted proxies: exactly one configured forwarded
//! header, walked from the right; an unreadable list fails closed for IP restrictions but never
//! escapes the failure limiter; the limiter counts IPv6 clients per /64.

mod common;

use std::time::Duration;

use bytes::Bytes;
use common::*;
use http::{HeaderValue, Request};
use http_body_util::Full;
use tower_pat::record::parse_ip_net;
use tower_pat::{
    ForwardedHeader, MemoryStore, PatAuthLayer, PatAuthLayerBuilder, TokenFormat, TokenSecret,
    UsageConfig,
};

const PROXY: &str = "10.1.1.1:443";

fn proxies() -> Vec<ipnet::IpNet> {
    vec!["10.0.0.0/8".parse().unwrap()]
}

/// The proxy in 10.0.0.0/8 appends to `X-Forwarded-For` (nginx `$proxy_add_x_forwarded_for`).
fn behind_xff(b: PatAuthLayerBuilder) -> PatAuthLayerBuilder {
    b.trusted_proxies(proxies(), ForwardedHeader::XForwardedFor)
}

/// The proxy in 10.0.0.0/8 appends to `Forwarded` (RFC 7239).
fn behind_forwarded(b: PatAuthLayerBuilder) -> PatAuthLayerBuilder {
    b.trusted_proxies(proxies(), ForwardedHeader::Forwarded)
}

/// The proxy in 10.0.0.0/8 sets `X-Real-IP`.
fn behind_real_ip(b: PatAuthLayerBuilder) -> PatAuthLayerBuilder {
    b.trusted_proxies(proxies(), ForwardedHeader::XRealIp)
}

async fn restricted(nets: &[&str]) -> (MemoryStore, TokenSecret) {
    let store = MemoryStore::new();
    let nets = nets.iter().map(|n| parse_ip_net(n).unwrap());
    let (_, secret) = Tokens::new(store.clone())
        .issue(new_token("alice", &[]).ip_restriction(nets))
        .await
        .unwrap();
    (store, secret)
}

/// A request from `peer` with `token` and the given headers (appended in order, so a name may
/// repeat).
fn req(token: Option<&str>, peer: &str, headers: &[(&str, &[u8])]) -> Request<Full<Bytes>> {
    let mut r = request(token, Some(peer));
    for (name, value) in headers {
        r.headers_mut().append(
            http::HeaderName::from_bytes(name.as_bytes()).unwrap(),
            HeaderValue::from_bytes(value).unwrap(),
        );
    }
    r
}

fn guess() -> String {
    TokenFormat::new().generate().expose_secret().to_owned()
}

#[tokio::test]
async fn client_sent_forwarded_does_not_beat_the_proxys_x_forwarded_for() {
    // The client is 198.51.100.9; the token is allowed only from 203.0.113.5. The proxy appends
    // the real address to X-Forwarded-For and passes the client's own `Forwarded` through.
    let (store, secret) = restricted(&["203.0.113.5"]).await;
    let layer = behind_xff(PatAuthLayer::builder(store)).build();
    let t = Some(secret.expose_secret());
    let spoofed = req(
        t,
        PROXY,
        &[
            ("forwarded", b"for=203.0.113.5"),
            ("x-forwarded-for", b"198.51.100.9"),
        ],
    );
    let reply = send(&layer, spoofed).await;
    assert_eq!(reply.status, 403, "{}", reply.body);

    // Both present, the configured one names the allowed client: only that one is read.
    let honest = req(
        t,
        PROXY,
        &[
            ("forwarded", b"for=198.51.100.9"),
            ("x-forwarded-for", b"203.0.113.5"),
        ],
    );
    assert_eq!(send(&layer, honest).await.status, 200);
}

#[tokio::test]
async fn client_sent_x_forwarded_for_does_not_beat_the_proxys_forwarded() {
    let (store, secret) = restricted(&["203.0.113.5"]).await;
    let layer = behind_forwarded(PatAuthLayer::builder(store)).build();
    let t = Some(secret.expose_secret());
    let spoofed = req(
        t,
        PROXY,
        &[
            ("x-forwarded-for", b"203.0.113.5"),
            ("forwarded", b"for=198.51.100.9;proto=https"),
        ],
    );
    assert_eq!(send(&layer, spoofed).await.status, 403);
    let honest = req(
        t,
        PROXY,
        &[
            ("x-forwarded-for", b"198.51.100.9"),
            ("forwarded", b"for=\"203.0.113.5:4711\";proto=https"),
        ],
    );
    assert_eq!(send(&layer, honest).await.status, 200);
    // The client's own element is left of the proxy's: walking from the right stops at the
    // proxy's untrusted client address.
    let prepended = req(
        t,
        PROXY,
        &[("forwarded", b"for=203.0.113.5, for=198.51.100.9")],
    );
    assert_eq!(send(&layer, prepended).await.status, 403);
}

#[tokio::test]
async fn a_comma_inside_a_quoted_forwarded_parameter_is_no_element_boundary() {
    // The client is 198.51.100.9 and sends `Host: x, for=203.0.113.5;a=`; the trusted proxy
    // appends `for=198.51.100.9;host="<the client's Host>"`. The allowed address is inside the
    // quotes: the client's text, not an element.
    let (store, secret) = restricted(&["203.0.113.5"]).await;
    let layer = behind_forwarded(PatAuthLayer::builder(store)).build();
    let t = Some(secret.expose_secret());
    let spoofed = req(
        t,
        PROXY,
        &[(
            "forwarded",
            b"for=198.51.100.9;host=\"x, for=203.0.113.5;a=\"",
        )],
    );
    assert_eq!(send(&layer, spoofed).await.status, 403);
    // The allowed client with such a host passes.
    let honest = req(
        t,
        PROXY,
        &[("forwarded", b"for=203.0.113.5;host=\"x, for=198.51.100.9\"")],
    );
    assert_eq!(send(&layer, honest).await.status, 200);
    // An unclosed quoted-string in the element read: the address is unknown, so refused.
    let broken = req(t, PROXY, &[("forwarded", b"for=203.0.113.5;host=\"x")]);
    assert_eq!(send(&layer, broken).await.status, 403);
}

#[tokio::test]
async fn x_real_ip_is_one_value_set_by_the_proxy() {
    let (store, secret) = restricted(&["203.0.113.5"]).await;
    let layer = behind_real_ip(PatAuthLayer::builder(store)).build();
    let t = Some(secret.expose_secret());
    let ok = req(t, PROXY, &[("x-real-ip", b"203.0.113.5")]);
    assert_eq!(send(&layer, ok).await.status, 200);
    for headers in [
        // The proxy's X-Real-IP is what counts, whatever the client put elsewhere.
        &[
            ("x-forwarded-for", &b"203.0.113.5"[..]),
            ("forwarded", b"for=203.0.113.5"),
            ("x-real-ip", b"198.51.100.9"),
        ][..],
        // Two values (a client's and the proxy's) or a list: the address is unknown.
        &[("x-real-ip", b"203.0.113.5"), ("x-real-ip", b"203.0.113.5")],
        &[("x-real-ip", b"203.0.113.5, 203.0.113.5")],
    ] {
        let reply = send(&layer, req(t, PROXY, headers)).await;
        assert_eq!(reply.status, 403, "{headers:?}");
    }
}

#[tokio::test]
async fn header_lines_are_one_list_in_order() {
    let (store, secret) = restricted(&["203.0.113.5"]).await;
    let layer = behind_xff(PatAuthLayer::builder(store)).build();
    let t = Some(secret.expose_secret());
    let two_proxies = req(
        t,
        PROXY,
        &[
            ("x-forwarded-for", b"198.51.100.9, 203.0.113.5"),
            ("x-forwarded-for", b"10.2.2.2"),
        ],
    );
    assert_eq!(send(&layer, two_proxies).await.status, 200);
    let appended_line = req(
        t,
        PROXY,
        &[
            ("x-forwarded-for", b"203.0.113.5"),
            ("x-forwarded-for", b"198.51.100.9"),
        ],
    );
    assert_eq!(send(&layer, appended_line).await.status, 403);
}

#[tokio::test]
async fn an_unreadable_forwarded_list_fails_closed() {
    let (store, secret) = restricted(&["203.0.113.5", "10.0.0.0/8"]).await;
    let t = Some(secret.expose_secret());
    let forwarded = behind_forwarded(PatAuthLayer::builder(store.clone())).build();
    for value in [
        &b"for=unknown"[..],
        b"for=_hidden",
        b"for=\"_gazonk\"",
        b"for=garbage",
        b"for=203.0.113.5, for=unknown",
        b"for=203.0.113.5, proto=https",
        b"for=203.0.113.5;for=203.0.113.5",
        b"for=\"203.0.113.5",
        b"for=203.0.113.5, for=\xff",
    ] {
        let reply = send(&forwarded, req(t, PROXY, &[("forwarded", value)])).await;
        assert_eq!(reply.status, 403, "{}", String::from_utf8_lossy(value));
    }
    let xff = behind_xff(PatAuthLayer::builder(store)).build();
    for value in [
        &b"garbage"[..],
        b"203.0.113.5, unknown",
        b"203.0.113.5, \xff\xfe",
        b"203.0.113.5, 10.2.2.2, 203.0.113.5:80:1",
    ] {
        let reply = send(&xff, req(t, PROXY, &[("x-forwarded-for", value)])).await;
        assert_eq!(reply.status, 403, "{}", String::from_utf8_lossy(value));
    }
}

#[tokio::test]
async fn an_unreadable_forwarded_list_still_counts_failures_against_the_proxy_hop() {
    let store = CountingStore::new();
    let (_, secret) = Tokens::new(store.inner.clone())
        .issue(new_token("alice", &[]))
        .await
        .unwrap();
    let valid = Some(secret.expose_secret());
    let layer = behind_xff(PatAuthLayer::builder(store.clone()))
        .limit_failures(3, Duration::from_secs(60))
        .build();
    // Through proxy 10.1.1.1, a second trusted hop 10.2.2.2 forwarded something unreadable.
    let garbage: [&[u8]; 3] = [
        b"garbage, 10.2.2.2",
        b"unknown, 10.2.2.2",
        b"\xff, 10.2.2.2",
    ];
    for value in garbage {
        let reply = send(
            &layer,
            req(Some(&guess()), PROXY, &[("x-forwarded-for", value)]),
        )
        .await;
        assert_eq!(reply.status, 401);
    }
    // The fourth attempt through the same hop is refused, whoever it claims to be.
    let reply = send(
        &layer,
        req(valid, "10.9.9.9:1", &[("x-forwarded-for", b"_x, 10.2.2.2")]),
    )
    .await;
    assert_eq!(reply.status, 429, "{}", reply.body);
    // A client whose address did parse is counted on its own.
    let ok = req(
        valid,
        PROXY,
        &[("x-forwarded-for", b"198.51.100.7, 10.2.2.2")],
    );
    assert_eq!(send(&layer, ok).await.status, 200);

    // `Forwarded: for=unknown` from the proxy itself counts against the proxy.
    let layer = behind_forwarded(PatAuthLayer::builder(store.clone()))
        .limit_failures(2, Duration::from_secs(60))
        .build();
    for _ in 0..2 {
        let r = req(Some(&guess()), PROXY, &[("forwarded", b"for=unknown")]);
        assert_eq!(send(&layer, r).await.status, 401);
    }
    let r = req(valid, PROXY, &[("forwarded", b"for=_hidden")]);
    assert_eq!(send(&layer, r).await.status, 429);
}

#[tokio::test]
async fn ipv6_failures_count_per_64() {
    let store = MemoryStore::new();
    let (_, secret) = Tokens::new(store.clone())
        .issue(new_token("alice", &[]))
        .await
        .unwrap();
    let valid = Some(secret.expose_secret());
    let layer = PatAuthLayer::builder(store)
        .limit_failures(3, Duration::from_secs(60))
        .build();
    for peer in [
        "[2001:db8:1:2::1]:1",
        "[2001:db8:1:2::2]:1",
        "[2001:db8:1:2:aaaa::3]:1",
    ] {
        let reply = send(&layer, request(Some(&guess()), Some(peer))).await;
        assert_eq!(reply.status, 401);
    }
    let other_in_64 = request(valid, Some("[2001:db8:1:2:ffff:ffff:ffff:fffe]:9"));
    assert_eq!(send(&layer, other_in_64).await.status, 429);
    let next_64 = request(valid, Some("[2001:db8:1:3::1]:9"));
    assert_eq!(send(&layer, next_64).await.status, 200);
}

#[tokio::test]
async fn failure_limit_prefixes_are_configurable() {
    let store = MemoryStore::new();
    let (_, secret) = Tokens::new(store.clone())
        .issue(new_token("alice", &[]))
        .await
        .unwrap();
    let valid = Some(secret.expose_secret());
    let layer = PatAuthLayer::builder(store)
        .limit_failures(2, Duration::from_secs(60))
        .failure_limit_prefixes(24, 48)
        .build();
    for peer in ["203.0.113.1:1", "203.0.113.2:1"] {
        assert_eq!(
            send(&layer, request(Some(&guess()), Some(peer)))
                .await
                .status,
            401
        );
    }
    assert_eq!(
        send(&layer, request(valid, Some("203.0.113.200:1")))
            .await
            .status,
        429
    );
    assert_eq!(
        send(&layer, request(valid, Some("203.0.114.1:1")))
            .await
            .status,
        200
    );
    for peer in ["[2001:db8:1:2::1]:1", "[2001:db8:1:3::1]:1"] {
        assert_eq!(
            send(&layer, request(Some(&guess()), Some(peer)))
                .await
                .status,
            401
        );
    }
    assert_eq!(
        send(&layer, request(valid, Some("[2001:db8:1:ffff::1]:1")))
            .await
            .status,
        429
    );
}

#[tokio::test]
async fn ipv4_mapped_peers_count_as_ipv4() {
    let store = MemoryStore::new();
    let (_, secret) = Tokens::new(store.clone())
        .issue(new_token("alice", &[]))
        .await
        .unwrap();
    let layer = PatAuthLayer::builder(store)
        .limit_failures(2, Duration::from_secs(60))
        .build();
    for peer in ["[::ffff:203.0.113.5]:1", "203.0.113.5:2"] {
        assert_eq!(
            send(&layer, request(Some(&guess()), Some(peer)))
                .await
                .status,
            401
        );
    }
    let valid = Some(secret.expose_secret());
    assert_eq!(
        send(&layer, request(valid, Some("[::ffff:203.0.113.5]:3")))
            .await
            .status,
        429
    );
    assert_eq!(
        send(&layer, request(valid, Some("203.0.113.5:3")))
            .await
            .status,
        429
    );
}

#[tokio::test]
async fn usage_records_only_addresses_from_trusted_information() {
    let store = MemoryStore::new();
    let (record, secret) = Tokens::new(store.clone())
        .issue(new_token("alice", &[]))
        .await
        .unwrap();
    let t = Some(secret.expose_secret());
    let usage = || {
        UsageConfig::default()
            .granularity(Duration::ZERO)
            .flush_interval(Duration::from_secs(3600))
    };
    let layer = behind_xff(PatAuthLayer::builder(store.clone()))
        .track_usage(usage())
        .build();
    let spoofed = req(
        t,
        PROXY,
        &[
            ("forwarded", b"for=192.0.2.66"),
            ("x-forwarded-for", b"198.51.100.7"),
        ],
    );
    assert_eq!(send(&layer, spoofed).await.status, 200);
    let pending = layer.usage().unwrap().pending(&record.id).unwrap();
    assert_eq!(
        pending.ips,
        vec!["198.51.100.7".parse::<std::net::IpAddr>().unwrap()]
    );

    // An unreadable list: the token works (it is unrestricted) but no address is recorded, not
    // even the proxy's.
    let layer = behind_xff(PatAuthLayer::builder(store.clone()))
        .track_usage(usage())
        .build();
    let garbage = req(t, PROXY, &[("x-forwarded-for", b"not-an-address")]);
    assert_eq!(send(&layer, garbage).await.status, 200);
    let pending = layer.usage().unwrap().pending(&record.id).unwrap();
    assert!(pending.ips.is_empty(), "{:?}", pending.ips);
}

#[tokio::test]
async fn a_client_cannot_get_another_address_locked_out() {
    let store = MemoryStore::new();
    let (_, secret) = Tokens::new(store.clone())
        .issue(new_token("alice", &[]))
        .await
        .unwrap();
    let valid = Some(secret.expose_secret());
    let layer = behind_xff(PatAuthLayer::builder(store))
        .limit_failures(2, Duration::from_secs(60))
        .build();
    // The attacker (198.51.100.66, appended by the proxy) names its victim in both headers.
    let spoofing: &[(&str, &[u8])] = &[
        ("forwarded", b"for=192.0.2.1"),
        ("x-forwarded-for", b"192.0.2.1, 198.51.100.66"),
    ];
    for _ in 0..2 {
        let reply = send(&layer, req(Some(&guess()), PROXY, spoofing)).await;
        assert_eq!(reply.status, 401);
    }
    let victim = req(valid, PROXY, &[("x-forwarded-for", b"192.0.2.1")]);
    assert_eq!(send(&layer, victim).await.status, 200);
    assert_eq!(send(&layer, req(valid, PROXY, spoofing)).await.status, 429);
}
