//! Found by a review of issue 10: PAT-prefixed credentials in unusual spellings must not pass as
//! foreign credentials, and X-Token-Expiration is never sent on a refusal.

mod common;

use std::convert::Infallible;
use std::time::Duration;

use bytes::Bytes;
use chrono::{TimeZone, Utc};
use common::*;
use http::{Request, Response, StatusCode};
use http_body_util::Full;
use tower::{Layer, Service};
use tower_pat::{
    ForeignCredential, PatAuthLayer, Principal, RequireScopesLayer, TokenStore, Tokens,
};

/// Inner service: says whether it was reached, with a principal or a foreign marker.
fn probe() -> impl Service<
    Request<Full<Bytes>>,
    Response = Response<Full<Bytes>>,
    Error = Infallible,
    Future = impl Send,
> + Clone
+ Send {
    tower::service_fn(|req: Request<Full<Bytes>>| async move {
        let body = if let Some(p) = req.extensions().get::<Principal>() {
            format!("reached:pat:{}", p.subject())
        } else if req.extensions().get::<ForeignCredential>().is_some() {
            "reached:foreign".to_owned()
        } else {
            "reached:none".to_owned()
        };
        Ok::<_, Infallible>(Response::new(Full::new(Bytes::from(body))))
    })
}

fn with_header(name: &str, value: &str, uri: &str) -> Request<Full<Bytes>> {
    let mut req = Request::builder()
        .uri(uri)
        .body(Full::new(Bytes::new()))
        .unwrap();
    req.extensions_mut()
        .insert("192.0.2.9:1".parse::<std::net::SocketAddr>().unwrap());
    if !name.is_empty() {
        req.headers_mut().insert(
            http::HeaderName::from_bytes(name.as_bytes()).unwrap(),
            value.parse().unwrap(),
        );
    }
    req
}

/// A revoked PAT, separated from `Bearer` by a tab (legal header bytes; many parsers accept it),
/// or sent in a scheme the layer does not read, or with a leading `+` (form-encoded space) in the
/// query, is not refused by the PAT layer: it reaches the service as a foreign credential, and
/// its failure is neither counted nor logged. The doc of `pass_foreign_credentials` promises "a
/// credential with the prefix that fails any check ... is still refused, and counts against
/// limit_failures".
#[tokio::test]
async fn a_revoked_pat_in_a_variant_spelling_is_not_passed_as_foreign() {
    let store = CountingStore::new();
    let tokens = Tokens::new(store.inner.clone());
    let (rec, revoked) = tokens.issue(new_token("alice", &["a:read"])).await.unwrap();
    store.inner.revoke(&rec.id, Utc::now()).await.unwrap();
    let secret = revoked.expose_secret();
    let layer = PatAuthLayer::builder(store.clone())
        .pass_foreign_credentials()
        .accept_query_parameter()
        .limit_failures(2, Duration::from_secs(60))
        .build();
    let svc = layer.layer(probe());

    // Control: the canonical spelling is refused.
    let r = call(
        &svc,
        with_header("authorization", &format!("Bearer {secret}"), "/"),
    )
    .await;
    assert_eq!(r.status, StatusCode::UNAUTHORIZED, "{}", r.body);

    let mut leaked = Vec::new();
    for (name, value, uri) in [
        ("authorization", format!("Bearer\t{secret}"), "/".to_owned()),
        ("authorization", format!("Token {secret}"), "/".to_owned()),
        ("", String::new(), format!("/?access_token=+{secret}")),
        (
            "",
            String::new(),
            format!("/?access_token=%70at_{}", &secret[4..]),
        ),
    ] {
        let r = call(&svc, with_header(name, &value, &uri)).await;
        if r.body.starts_with("reached") {
            leaked.push(format!(
                "{name}: {value:?} {uri} -> {} {}",
                r.status, r.body
            ));
        }
    }
    // One failure was counted (the control); with the limit at 2, one more would lock the client.
    assert!(
        leaked.is_empty(),
        "PAT-prefixed credentials passed as foreign:\n{}",
        leaked.join("\n")
    );
}

/// `token_expiration_header` documents "nor do refusals", but a 403 of a `RequireScopesLayer`
/// behind the PAT layer (the documented way to require scopes per route) carries the header.
#[tokio::test]
async fn no_expiration_header_on_a_scope_refusal() {
    let store = CountingStore::new();
    let at = Utc.with_ymd_and_hms(2999, 1, 2, 3, 4, 5).unwrap();
    let (_, secret) = Tokens::new(store.inner.clone())
        .issue(new_token("alice", &["a:read"]).expires_at(at))
        .await
        .unwrap();
    let layer = PatAuthLayer::builder(store.clone())
        .token_expiration_header()
        .build();
    let svc = layer.layer(RequireScopesLayer::new(["a:write"]).layer(echo_service()));
    let r = call(&svc, request(Some(secret.expose_secret()), None)).await;
    assert_eq!(r.status, StatusCode::FORBIDDEN);
    assert_eq!(r.headers["cache-control"], "no-store");
    assert!(
        r.headers.get("x-token-expiration").is_none(),
        "a refusal carries X-Token-Expiration: {:?}",
        r.headers.get("x-token-expiration")
    );
}

/// Only the start of a credential counts: a foreign credential that merely contains the token
/// prefix somewhere (a JWT's base64url can) is still passed on as foreign.
#[tokio::test]
async fn a_jwt_containing_the_prefix_is_still_foreign() {
    let store = CountingStore::new();
    let layer = PatAuthLayer::builder(store.clone())
        .pass_foreign_credentials()
        .accept_query_parameter()
        .build();
    let svc = layer.layer(probe());
    let jwt = "eyJhbGciOiJIUzI1NiJ9.eyJzdWIiOiJwat_xIn0.c2lnpat_bmF0dXJl";
    let r = call(
        &svc,
        with_header("authorization", &format!("Bearer {jwt}"), "/"),
    )
    .await;
    assert!(r.body.starts_with("reached"), "{} {}", r.status, r.body);
    let r = call(&svc, with_header("", "", &format!("/?access_token={jwt}"))).await;
    assert!(r.body.starts_with("reached"), "{} {}", r.status, r.body);
    assert_eq!(
        store.lookups(),
        0,
        "a foreign credential never reaches the store"
    );
}
