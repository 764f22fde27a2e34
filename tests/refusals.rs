//! Every refusal is uncacheable (`Cache-Control: no-store`), and only an HTTP/2 `application/grpc`
//! request gets a gRPC (HTTP 200, trailers-only) refusal.

mod common;

use std::sync::atomic::Ordering;
use std::time::Duration;

use bytes::Bytes;
use common::*;
use http::{Request, Version};
use http_body_util::{BodyExt, Full};
use tower::{Layer, ServiceExt};
use tower_pat::record::parse_ip_net;
use tower_pat::{PatAuthLayer, RequireScopesLayer, TokenFormat};

fn no_store(headers: &http::HeaderMap) -> bool {
    headers
        .get("cache-control")
        .is_some_and(|v| v == "no-store")
}

/// A request with `token`, from `peer`, speaking `version` with `content-type`.
fn grpc_request(
    token: Option<&str>,
    version: Version,
    content_type: &str,
    extra: &[(&str, &str)],
) -> Request<Full<Bytes>> {
    let mut r = request(token, Some("192.0.2.1:1"));
    *r.version_mut() = version;
    r.headers_mut()
        .insert("content-type", content_type.parse().unwrap());
    for (k, v) in extra {
        r.headers_mut().insert(
            http::HeaderName::from_bytes(k.as_bytes()).unwrap(),
            v.parse().unwrap(),
        );
    }
    r
}

#[tokio::test]
async fn every_refusal_of_the_layer_is_no_store() {
    let store = CountingStore::new();
    let (_, plain) = Tokens::new(store.inner.clone())
        .issue(new_token("alice", &["a:read"]))
        .await
        .unwrap();
    let (_, unscoped) = Tokens::new(store.inner.clone())
        .issue(new_token("alice", &[]))
        .await
        .unwrap();
    let (_, restricted) = Tokens::new(store.inner.clone())
        .issue(
            new_token("alice", &["a:read"])
                .ip_restriction([parse_ip_net("203.0.113.0/24").unwrap()]),
        )
        .await
        .unwrap();
    let (_, uncached) = Tokens::new(store.inner.clone())
        .issue(new_token("alice", &["a:read"]))
        .await
        .unwrap();
    let layer = PatAuthLayer::builder(store.clone())
        .require_scopes(["a:read"])
        .limit_failures(1, Duration::from_secs(60))
        .build();
    let peer = Some("192.0.2.1:1");
    let two = Request::builder()
        .header("authorization", format!("Bearer {}", plain.expose_secret()))
        .header(
            "authorization",
            format!("Bearer {}", unscoped.expose_secret()),
        )
        .body(Full::default())
        .unwrap();
    let mut statuses = Vec::new();
    for req in [
        request(None, peer),
        two,
        request(Some(unscoped.expose_secret()), peer),
        request(Some(restricted.expose_secret()), peer),
    ] {
        let reply = send(&layer, req).await;
        assert!(
            no_store(&reply.headers),
            "{} {:?}",
            reply.status,
            reply.headers
        );
        statuses.push(reply.status.as_u16());
    }
    store.failing.store(true, Ordering::SeqCst);
    let reply = send(&layer, request(Some(uncached.expose_secret()), peer)).await;
    assert_eq!(reply.status, 503);
    assert!(no_store(&reply.headers));
    store.failing.store(false, Ordering::SeqCst);
    let guess = TokenFormat::new().generate();
    let reply = send(&layer, request(Some(guess.expose_secret()), peer)).await;
    assert_eq!(reply.status, 401);
    let reply = send(&layer, request(Some(plain.expose_secret()), peer)).await;
    assert_eq!(reply.status, 429);
    assert!(no_store(&reply.headers));
    assert_eq!(statuses, [401, 400, 403, 403]);
}

#[tokio::test]
async fn grpc_refusals_are_no_store() {
    let store = CountingStore::new();
    let (_, unscoped) = Tokens::new(store.inner.clone())
        .issue(new_token("alice", &[]))
        .await
        .unwrap();
    let layer = PatAuthLayer::builder(store.clone())
        .require_scopes(["a:read"])
        .build();
    for token in [None, Some("pat_garbage"), Some(unscoped.expose_secret())] {
        let reply = send(
            &layer,
            grpc_request(
                token,
                Version::HTTP_2,
                "application/grpc",
                &[("te", "trailers")],
            ),
        )
        .await;
        assert_eq!(reply.status, 200);
        assert!(reply.headers.contains_key("grpc-status"));
        assert!(no_store(&reply.headers), "{:?}", reply.headers);
    }
}

#[tokio::test]
async fn grpc_content_type_over_http1_gets_a_real_http_refusal() {
    let layer = PatAuthLayer::builder(CountingStore::new()).build();
    for (version, content_type, extra) in [
        (Version::HTTP_11, "application/grpc", &[][..]),
        (
            Version::HTTP_11,
            "application/grpc+proto",
            &[("te", "trailers")][..],
        ),
        (Version::HTTP_10, "application/grpc", &[][..]),
    ] {
        let reply = send(&layer, grpc_request(None, version, content_type, extra)).await;
        assert_eq!(reply.status, 401, "{version:?} {content_type}");
        assert!(!reply.headers.contains_key("grpc-status"));
        assert_eq!(reply.json()["code"], "unauthorized");
        assert!(no_store(&reply.headers));
    }
    // HTTP/2 with a gRPC content type is gRPC; with another content type it is not.
    let reply = send(
        &layer,
        grpc_request(None, Version::HTTP_2, "application/grpc+proto", &[]),
    )
    .await;
    assert_eq!(
        (reply.status.as_u16(), &reply.headers["grpc-status"]),
        (200, &"16".parse::<http::HeaderValue>().unwrap())
    );
    let reply = send(
        &layer,
        grpc_request(None, Version::HTTP_2, "application/json", &[]),
    )
    .await;
    assert_eq!(reply.status, 401);
}

#[tokio::test]
async fn require_scopes_refusals_are_no_store_and_http1_is_never_grpc() {
    let store = CountingStore::new();
    let (_, unscoped) = Tokens::new(store.inner.clone())
        .issue(new_token("alice", &[]))
        .await
        .unwrap();
    let auth = PatAuthLayer::builder(store.clone())
        .allow_anonymous()
        .build();
    let svc = auth.layer(RequireScopesLayer::new(["a:read"]).layer(echo_service()));
    for (token, version, status) in [
        (None, Version::HTTP_11, 401),
        (Some(unscoped.expose_secret()), Version::HTTP_11, 403),
        (None, Version::HTTP_2, 200),
        (Some(unscoped.expose_secret()), Version::HTTP_2, 200),
    ] {
        let req = grpc_request(token, version, "application/grpc", &[("te", "trailers")]);
        let res = svc.clone().oneshot(req).await.unwrap();
        assert_eq!(res.status(), status, "{version:?} {token:?}");
        assert!(no_store(res.headers()), "{:?}", res.headers());
        let body = res.into_body().collect().await.unwrap().to_bytes();
        assert_eq!(body.is_empty(), status == 200);
    }
}

#[cfg(feature = "admin")]
mod support_admin;

#[cfg(feature = "admin")]
#[tokio::test]
async fn management_api_errors_are_no_store() {
    let app = support_admin::app().await;
    let uri = format!(
        "{}/00000000-0000-4000-8000-000000000000",
        support_admin::BASE
    );
    let res = support_admin::get(&app.app, &uri, &app.alice).await;
    res.error(404);
    assert!(no_store(&res.headers), "{:?}", res.headers);
    let res = support_admin::get(&app.app, support_admin::BASE, "pat_nope").await;
    res.error(401);
    assert!(no_store(&res.headers));
    let res = support_admin::post(&app.app, support_admin::BASE, &app.alice, "{not json").await;
    assert_eq!(res.status, 400, "{}", res.text);
    assert!(no_store(&res.headers), "{:?}", res.headers);
    // Errors axum makes itself, too.
    let uri = format!("{}/self", support_admin::BASE);
    let res = support_admin::call(&app.app, http::Method::PUT, &uri, Some(&app.alice), None).await;
    assert_eq!(res.status, 405);
    assert!(no_store(&res.headers), "{:?}", res.headers);
}

#[tokio::test]
async fn a_credential_where_the_layer_does_not_read_one_is_told_where_the_token_goes() {
    let store = tower_pat::MemoryStore::new();
    let (_, secret) = Tokens::new(store.clone())
        .issue(new_token("alice", &[]))
        .await
        .unwrap();
    let token = secret.expose_secret();
    let layer = tower_pat::PatAuthLayer::builder(store.clone())
        .realm("acme")
        .build();
    let cases: [(&str, String, &str); 6] = [
        (
            "authorization",
            format!("Token {token}"),
            "the `Token` scheme",
        ),
        (
            "authorization",
            format!("Basic {token}"),
            "this `Authorization` scheme",
        ),
        ("authorization", token.to_owned(), "without a scheme"),
        ("authorization", "Bearer".to_owned(), "carries no token"),
        ("x-api-key", token.to_owned(), "the `X-API-Key` header"),
        (
            "private-token",
            token.to_owned(),
            "the `PRIVATE-TOKEN` header",
        ),
    ];
    for (name, value, says) in cases {
        let mut req = request(None, None);
        req.headers_mut()
            .insert(http::HeaderName::from_static(name), value.parse().unwrap());
        let reply = send(&layer, req).await;
        assert_eq!(reply.status, 401, "{name}: {value}");
        // The bare challenge, as for no credentials: nothing the layer reads was wrong.
        assert_eq!(reply.www_authenticate(), "Bearer realm=\"acme\"");
        let body = reply.json();
        assert_eq!(body["code"], "unauthorized");
        let message = body["message"].as_str().unwrap();
        assert!(message.contains(says), "{message}");
        assert!(
            message.contains("`Authorization: Bearer <token>`"),
            "{message}"
        );
        assert!(
            !reply.body.contains(token),
            "the credential is never echoed"
        );
    }
    let mut req = request(None, None);
    *req.uri_mut() = format!("/?access_token={token}").parse().unwrap();
    let reply = send(&layer, req).await;
    assert_eq!(reply.status, 401);
    assert!(
        reply.json()["message"]
            .as_str()
            .unwrap()
            .contains("`access_token` query parameter")
    );
    // Nothing like a credential: the plain message.
    let reply = send(&layer, request(None, None)).await;
    assert_eq!(reply.json()["message"], "an access token is required");
    // A source that is enabled is read, not refused with a hint.
    let layer = tower_pat::PatAuthLayer::builder(store)
        .accept_header(http::HeaderName::from_static("x-api-key"))
        .build();
    let mut req = request(None, None);
    req.headers_mut()
        .insert("x-api-key", token.parse().unwrap());
    assert_eq!(send(&layer, req).await.status, 200);
}
