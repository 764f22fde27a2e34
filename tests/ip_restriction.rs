//! IP restriction (CIDR, IPv4 and IPv6) and the client address behind trusted proxies.

mod common;

use common::*;
use tower_pat::record::parse_ip_net;
use tower_pat::{ForwardedHeader, MemoryStore, PatAuthLayer, TokenSecret};

async fn restricted(nets: &[&str]) -> (MemoryStore, TokenSecret) {
    let store = MemoryStore::new();
    let nets = nets.iter().map(|n| parse_ip_net(n).unwrap());
    let (_, secret) = Tokens::new(store.clone())
        .issue(new_token("alice", &[]).ip_restriction(nets))
        .await
        .unwrap();
    (store, secret)
}

#[tokio::test]
async fn client_outside_the_restriction_is_forbidden() {
    let (store, secret) = restricted(&["192.0.2.0/24"]).await;
    let layer = PatAuthLayer::builder(store).build();
    let t = Some(secret.expose_secret());
    assert_eq!(
        send(&layer, request(t, Some("192.0.2.77:5000")))
            .await
            .status,
        200
    );
    let reply = send(&layer, request(t, Some("198.51.100.1:5000"))).await;
    assert_eq!(reply.status, 403);
    assert!(reply.www_authenticate().contains("error=\"invalid_token\""));
    assert_eq!(reply.json()["status"], 403);
}

#[tokio::test]
async fn restricted_token_without_a_known_client_address_is_forbidden() {
    let (store, secret) = restricted(&["192.0.2.0/24"]).await;
    let layer = PatAuthLayer::builder(store).build();
    assert_eq!(send_token(&layer, &secret).await.status, 403);
}

#[tokio::test]
async fn trusted_proxy_forwarded_address_is_honoured() {
    let (store, secret) = restricted(&["203.0.113.5"]).await;
    let layer = PatAuthLayer::builder(store.clone())
        .trusted_proxies(
            ["10.0.0.0/8".parse().unwrap()],
            ForwardedHeader::XForwardedFor,
        )
        .build();
    let mut req = request(Some(secret.expose_secret()), Some("10.1.1.1:443"));
    req.headers_mut()
        .insert("x-forwarded-for", "203.0.113.5, 10.2.2.2".parse().unwrap());
    assert_eq!(send(&layer, req).await.status, 200);

    // A client prepending a fake address does not get past the first untrusted hop.
    let mut req = request(Some(secret.expose_secret()), Some("10.1.1.1:443"));
    req.headers_mut().insert(
        "x-forwarded-for",
        "203.0.113.5, 198.51.100.9".parse().unwrap(),
    );
    assert_eq!(send(&layer, req).await.status, 403);

    let layer = PatAuthLayer::builder(store)
        .trusted_proxies(["10.0.0.0/8".parse().unwrap()], ForwardedHeader::Forwarded)
        .build();
    let mut req = request(Some(secret.expose_secret()), Some("10.1.1.1:443"));
    req.headers_mut()
        .insert("forwarded", "for=203.0.113.5;proto=https".parse().unwrap());
    assert_eq!(send(&layer, req).await.status, 200);
}

#[tokio::test]
async fn forwarded_header_from_an_untrusted_peer_is_ignored() {
    let (store, secret) = restricted(&["203.0.113.5"]).await;
    let layer = PatAuthLayer::builder(store)
        .trusted_proxies(
            ["10.0.0.0/8".parse().unwrap()],
            ForwardedHeader::XForwardedFor,
        )
        .build();
    let mut req = request(Some(secret.expose_secret()), Some("198.51.100.9:443"));
    req.headers_mut()
        .insert("x-forwarded-for", "203.0.113.5".parse().unwrap());
    assert_eq!(send(&layer, req).await.status, 403);
}

#[tokio::test]
async fn ipv6_restriction() {
    let (store, secret) = restricted(&["2001:db8:abcd::/48", "192.0.2.1"]).await;
    let layer = PatAuthLayer::builder(store).build();
    let t = Some(secret.expose_secret());
    assert_eq!(
        send(&layer, request(t, Some("[2001:db8:abcd:12::1]:443")))
            .await
            .status,
        200
    );
    assert_eq!(
        send(&layer, request(t, Some("[2001:db8:ffff::1]:443")))
            .await
            .status,
        403
    );
    // An IPv4 client on a dual-stack socket shows up IPv4-mapped.
    assert_eq!(
        send(&layer, request(t, Some("[::ffff:192.0.2.1]:443")))
            .await
            .status,
        200
    );
}

#[tokio::test]
async fn ipv4_mapped_restriction_matches_an_ipv4_peer() {
    let (store, secret) = restricted(&["::ffff:192.0.2.0/120"]).await;
    let layer = PatAuthLayer::builder(store).build();
    let t = Some(secret.expose_secret());
    for (peer, status) in [
        ("192.0.2.7:1", 200),
        ("[::ffff:192.0.2.7]:1", 200),
        ("198.51.100.1:1", 403),
        ("[::ffff:198.51.100.1]:1", 403),
    ] {
        assert_eq!(
            send(&layer, request(t, Some(peer))).await.status,
            status,
            "{peer}"
        );
    }

    // A mapped network built by hand (not through `parse_ip_net`) matches too.
    let store = MemoryStore::new();
    let net: ipnet::IpNet = "::ffff:192.0.2.0/120".parse().unwrap();
    let (_, secret) = Tokens::new(store.clone())
        .issue(new_token("alice", &[]).ip_restriction([net]))
        .await
        .unwrap();
    let layer = PatAuthLayer::builder(store).build();
    let t = Some(secret.expose_secret());
    assert_eq!(
        send(&layer, request(t, Some("192.0.2.7:1"))).await.status,
        200
    );
    assert_eq!(
        send(&layer, request(t, Some("198.51.100.1:1")))
            .await
            .status,
        403
    );
}

#[test]
fn ipv4_mapped_networks_are_parsed_as_ipv4() {
    for (input, parsed) in [
        ("::ffff:192.0.2.0/120", "192.0.2.0/24"),
        ("::ffff:192.0.2.5", "192.0.2.5/32"),
        ("::ffff:c000:0200/120", "192.0.2.0/24"),
        ("::ffff:0.0.0.0/96", "0.0.0.0/0"),
        ("::ffff:192.0.2.9/128", "192.0.2.9/32"),
        ("2001:db8::/32", "2001:db8::/32"),
        ("::/0", "::/0"),
    ] {
        assert_eq!(parse_ip_net(input).unwrap().to_string(), parsed, "{input}");
    }
}

#[cfg(feature = "admin")]
mod support_admin;

/// Networks entering through the management API are normalised the same way.
#[cfg(feature = "admin")]
#[tokio::test]
async fn management_api_stores_mapped_networks_as_ipv4() {
    let t = support_admin::app().await;
    let res = support_admin::create(
        &t.app,
        &t.alice,
        r#"{"name": "mapped", "ipRestriction": ["::ffff:192.0.2.0/120"], "userAwareTokenNeverExpires": true}"#,
    )
    .await;
    assert_eq!(
        res.body["ipRestriction"],
        serde_json::json!(["192.0.2.0/24"])
    );
    let token = res.body["token"].as_str().unwrap();
    assert_eq!(
        send(&t.layer, request(Some(token), Some("192.0.2.7:1")))
            .await
            .status,
        200
    );
    assert_eq!(
        send(&t.layer, request(Some(token), Some("192.0.3.7:1")))
            .await
            .status,
        403
    );
}
