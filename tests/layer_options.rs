//! The layer's opt-in behaviours: foreign credentials passed to a layer behind, the `on_reject`
//! hook, `X-Token-Expiration`, the `PatAuth` accessors and `try_require_scopes`.

mod common;

use std::convert::Infallible;
use std::time::Duration;

use bytes::Bytes;
use chrono::{TimeZone, Utc};
use common::*;
use http::{Request, Response, StatusCode, Version};
use http_body_util::Full;
use tower::{Layer, Service};
use tower_pat::record::parse_ip_net;
use tower_pat::{ForeignCredential, PatAuth, PatAuthLayer, Principal, TokenStore, Tokens};

/// A trivial second authentication layer: behind the PAT layer, it accepts the bearer
/// `eyJ.good.sig` for `jwt-bob` when the PAT layer marked the credential foreign, and answers 401
/// `jwt: …` to any other foreign credential. Requests with a principal go straight through.
fn jwt_then_echo() -> impl Service<
    Request<Full<Bytes>>,
    Response = Response<Full<Bytes>>,
    Error = Infallible,
    Future = impl Send,
> + Clone
+ Send {
    tower::service_fn(|req: Request<Full<Bytes>>| async move {
        let reply = |status: StatusCode, body: String| {
            let mut res = Response::new(Full::new(Bytes::from(body)));
            *res.status_mut() = status;
            Ok::<_, Infallible>(res)
        };
        if let Some(p) = req.extensions().get::<Principal>() {
            return reply(StatusCode::OK, format!("pat:{}", p.subject()));
        }
        let Some(marker) = req.extensions().get::<ForeignCredential>() else {
            return reply(StatusCode::UNAUTHORIZED, "jwt: no credential".to_owned());
        };
        // The marker holds nothing of the credential.
        assert_eq!(format!("{marker:?}"), "ForeignCredential");
        match req.headers().get("authorization").map(|v| v.as_bytes()) {
            Some(b"Bearer eyJ.good.sig") => reply(StatusCode::OK, "jwt:jwt-bob".to_owned()),
            _ => reply(StatusCode::UNAUTHORIZED, "jwt: bad token".to_owned()),
        }
    })
}

fn with_authorization(value: &str) -> Request<Full<Bytes>> {
    let mut req = request(None, Some("192.0.2.9:1"));
    req.headers_mut()
        .insert("authorization", value.parse().unwrap());
    req
}

#[tokio::test]
async fn a_pat_and_a_jwt_share_one_route() {
    let store = CountingStore::new();
    let (_, pat) = Tokens::new(store.inner.clone())
        .issue(new_token("alice", &["a:read"]))
        .await
        .unwrap();
    let layer = PatAuthLayer::builder(store.clone())
        .pass_foreign_credentials()
        .build();
    let svc = layer.layer(jwt_then_echo());

    let r = call(&svc, request(Some(pat.expose_secret()), None)).await;
    assert_eq!((r.status, r.body.as_str()), (StatusCode::OK, "pat:alice"));

    let r = call(&svc, with_authorization("Bearer eyJ.good.sig")).await;
    assert_eq!((r.status, r.body.as_str()), (StatusCode::OK, "jwt:jwt-bob"));

    // A bad foreign credential is the layer behind's to refuse, not the PAT layer's.
    let r = call(&svc, with_authorization("Bearer eyJ.forged.sig")).await;
    assert_eq!(
        (r.status, r.body.as_str()),
        (StatusCode::UNAUTHORIZED, "jwt: bad token")
    );
    // Another scheme is foreign too.
    let r = call(&svc, with_authorization("Basic Ym9iOnB3")).await;
    assert_eq!(
        (r.status, r.body.as_str()),
        (StatusCode::UNAUTHORIZED, "jwt: bad token")
    );
    // No credential at all: the PAT layer's 401 as before.
    let r = call(&svc, request(None, None)).await;
    assert_eq!(r.status, StatusCode::UNAUTHORIZED);
    assert!(r.www_authenticate().starts_with("Bearer realm="));
    // The foreign credentials never reached the store.
    assert_eq!(layer.store_lookups(), 1);
}

#[tokio::test]
async fn without_the_opt_in_a_jwt_is_refused_by_the_pat_layer() {
    let layer = PatAuthLayer::builder(CountingStore::new()).build();
    let svc = layer.layer(jwt_then_echo());
    let r = call(&svc, with_authorization("Bearer eyJ.good.sig")).await;
    assert_eq!(r.status, StatusCode::UNAUTHORIZED);
    assert!(r.www_authenticate().contains("invalid_token"), "{}", r.body);
}

#[tokio::test]
async fn a_pat_prefixed_credential_that_fails_is_still_refused() {
    let store = CountingStore::new();
    let (rec, revoked) = Tokens::new(store.inner.clone())
        .issue(new_token("alice", &["a:read"]))
        .await
        .unwrap();
    store.inner.revoke(&rec.id, Utc::now()).await.unwrap();
    let (_, restricted) = Tokens::new(store.inner.clone())
        .issue(
            new_token("alice", &["a:read"])
                .ip_restriction([parse_ip_net("203.0.113.0/24").unwrap()]),
        )
        .await
        .unwrap();
    let layer = PatAuthLayer::builder(store.clone())
        .pass_foreign_credentials()
        .limit_failures(2, Duration::from_secs(60))
        .build();
    let svc = layer.layer(jwt_then_echo());

    // Foreign credentials do not count against the failure limit.
    for _ in 0..5 {
        let r = call(&svc, with_authorization("Bearer eyJ.forged.sig")).await;
        assert_eq!(r.body, "jwt: bad token");
    }
    let prefixed_garbage = format!("Bearer {}", "pat_".to_owned() + &"x".repeat(10));
    // The IP refusal does not count (the token is good, the place is wrong); the two others do.
    for (value, code) in [
        (
            format!("Bearer {}", restricted.expose_secret()),
            "invalid_token",
        ),
        (prefixed_garbage, "invalid_token"),
        (
            format!("Bearer {}", revoked.expose_secret()),
            "invalid_token",
        ),
    ] {
        let r = call(&svc, with_authorization(&value)).await;
        assert!(r.status == StatusCode::UNAUTHORIZED || r.status == StatusCode::FORBIDDEN);
        assert!(r.www_authenticate().contains(code), "{value}: {}", r.body);
        assert!(
            !r.body.starts_with("jwt"),
            "{value} reached the layer behind"
        );
    }
    // Two failed PATs from this client: the network is now refused, foreign credential or not.
    let r = call(&svc, with_authorization("Bearer eyJ.good.sig")).await;
    assert_eq!(r.status, StatusCode::TOO_MANY_REQUESTS);
}

#[tokio::test]
async fn foreign_credentials_are_refused_when_the_layer_requires_scopes() {
    let layer = PatAuthLayer::builder(CountingStore::new())
        .pass_foreign_credentials()
        .require_scopes(["a:read"])
        .build();
    let svc = layer.layer(jwt_then_echo());
    let r = call(&svc, with_authorization("Bearer eyJ.good.sig")).await;
    assert_eq!(r.status, StatusCode::UNAUTHORIZED);
    assert!(r.www_authenticate().contains("invalid_token"));
}

#[tokio::test]
async fn on_reject_shapes_the_body_but_the_protocol_stays_the_layers() {
    let store = CountingStore::new();
    let (_, unscoped) = Tokens::new(store.inner.clone())
        .issue(new_token("alice", &[]))
        .await
        .unwrap();
    let layer = PatAuthLayer::builder(store.clone())
        .require_scopes(["a:read"])
        .on_reject(|err, res| {
            *res.body_mut() = Bytes::from(format!("custom:{}", err.code()));
            // Everything an application may not change, it tries to.
            *res.status_mut() = StatusCode::OK;
            let h2 = res.headers_mut();
            h2.insert("content-type", "text/plain".parse().unwrap());
            h2.insert("x-custom", "1".parse().unwrap());
            h2.insert("cache-control", "public, max-age=3600".parse().unwrap());
            h2.insert("www-authenticate", "Basic".parse().unwrap());
            h2.insert("grpc-status", "0".parse().unwrap());
            h2.insert("retry-after", "0".parse().unwrap());
        })
        .build();
    let svc = layer.layer(echo_service());

    // Refused in the synchronous path (no credentials), after a store lookup (unknown token's
    // first sight is a cache miss) and after a cache hit (scope missing).
    let unknown = tower_pat::TokenFormat::default().generate();
    for req in [
        request(None, None),
        request(Some(unknown.expose_secret()), None),
        request(Some(unscoped.expose_secret()), None),
        request(Some(unscoped.expose_secret()), None),
    ] {
        let r = call(&svc, req).await;
        assert!(
            [StatusCode::UNAUTHORIZED, StatusCode::FORBIDDEN].contains(&r.status),
            "{}",
            r.status
        );
        assert!(r.body.starts_with("custom:"), "{}", r.body);
        assert_eq!(r.headers["x-custom"], "1");
        assert_eq!(r.headers["content-type"], "text/plain");
        assert_eq!(r.headers["cache-control"], "no-store");
        assert!(r.www_authenticate().starts_with("Bearer realm=\"api\""));
        assert!(r.headers.get("grpc-status").is_none());
        assert!(r.headers.get("retry-after").is_none());
    }
    let r = call(&svc, request(Some(unscoped.expose_secret()), None)).await;
    assert_eq!(r.status, StatusCode::FORBIDDEN);
    assert!(r.www_authenticate().contains("scope=\"a:read\""));

    // gRPC: status 200 with the layer's grpc-status, an empty body, the gRPC content type.
    let mut req = request(None, None);
    *req.version_mut() = Version::HTTP_2;
    req.headers_mut()
        .insert("content-type", "application/grpc".parse().unwrap());
    let r = call(&svc, req).await;
    assert_eq!(r.status, StatusCode::OK);
    assert_eq!(r.headers["grpc-status"], "16");
    assert_eq!(r.headers["content-type"], "application/grpc");
    assert_eq!(r.headers["cache-control"], "no-store");
    assert_eq!(r.body, "");
}

#[tokio::test]
async fn expiration_header_on_authenticated_responses_only_when_asked() {
    let store = CountingStore::new();
    let at = Utc.with_ymd_and_hms(2999, 1, 2, 3, 4, 5).unwrap();
    let (_, expiring) = Tokens::new(store.inner.clone())
        .issue(new_token("alice", &[]).expires_at(at))
        .await
        .unwrap();
    let (_, forever) = Tokens::new(store.inner.clone())
        .issue(new_token("alice", &[]))
        .await
        .unwrap();
    let on = PatAuthLayer::builder(store.clone())
        .token_expiration_header()
        .build();
    // The inner service tries to set the header itself: the layer's value wins.
    let inner = tower::service_fn(|_req: Request<Full<Bytes>>| async {
        let mut res = Response::new(Full::new(Bytes::new()));
        res.headers_mut()
            .insert("x-token-expiration", "never".parse().unwrap());
        Ok::<_, Infallible>(res)
    });
    let svc = on.layer(inner);
    // The first request looks the token up, the second is a cache hit.
    for _ in 0..2 {
        let r = call(&svc, request(Some(expiring.expose_secret()), None)).await;
        assert_eq!(r.status, StatusCode::OK);
        assert_eq!(r.headers["x-token-expiration"], "2999-01-02T03:04:05Z");
    }
    assert_eq!(on.store_lookups(), 1);
    let svc = on.layer(echo_service());
    for _ in 0..2 {
        let r = call(&svc, request(Some(forever.expose_secret()), None)).await;
        assert_eq!(r.status, StatusCode::OK);
        assert!(r.headers.get("x-token-expiration").is_none());
    }
    let r = call(&svc, request(None, None)).await;
    assert!(r.headers.get("x-token-expiration").is_none());

    let off = PatAuthLayer::builder(store.clone()).build();
    let svc = off.layer(echo_service());
    for _ in 0..2 {
        let r = call(&svc, request(Some(expiring.expose_secret()), None)).await;
        assert_eq!(r.status, StatusCode::OK);
        assert!(r.headers.get("x-token-expiration").is_none());
    }
}

#[test]
fn try_require_scopes_returns_the_parse_error() {
    let err = PatAuthLayer::builder(CountingStore::new())
        .try_require_scopes(["a:read", "not a scope"])
        .unwrap_err();
    assert!(!err.to_string().is_empty());
    assert!(
        PatAuthLayer::builder(CountingStore::new())
            .try_require_scopes(["a:read"])
            .is_ok()
    );
}

#[tokio::test]
async fn pat_auth_exposes_its_inner_service() {
    #[derive(Clone)]
    struct Named(&'static str);
    let layer = PatAuthLayer::builder(CountingStore::new()).build();
    let mut svc: PatAuth<Named> = layer.layer(Named("inner"));
    assert_eq!(svc.get_ref().0, "inner");
    svc.get_mut().0 = "changed";
    assert_eq!(svc.into_inner().0, "changed");
}
