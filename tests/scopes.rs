//! Scopes: layer-wide requirements, wildcards, per-route requirements and the axum extractor.

mod common;

use axum::Router;
use axum::body::Body;
use axum::routing::get;
use common::*;
use http::Request;
use http_body_util::BodyExt;
use tower::ServiceExt;
use tower_pat::{MemoryStore, PatAuthLayer, Principal, RequireScopesLayer};

#[tokio::test]
async fn missing_scope_is_forbidden_with_insufficient_scope() {
    let store = MemoryStore::new();
    let (_, secret) = Tokens::new(store.clone())
        .issue(new_token("alice", &["repo:read"]))
        .await
        .unwrap();
    let layer = PatAuthLayer::builder(store)
        .require_scopes(["repo:write", "repo:read"])
        .build();
    let reply = send_token(&layer, &secret).await;
    assert_eq!(reply.status, 403);
    let challenge = reply.www_authenticate();
    assert!(
        challenge.contains("error=\"insufficient_scope\""),
        "{challenge}"
    );
    assert!(
        challenge.contains("scope=\"repo:read repo:write\""),
        "{challenge}"
    );
    assert_eq!(reply.json()["code"], "insufficient_scope");
}

#[tokio::test]
async fn resource_wildcard_and_global_wildcard_grant() {
    let store = MemoryStore::new();
    let (_, repo_all) = Tokens::new(store.clone())
        .issue(new_token("alice", &["repo:*"]))
        .await
        .unwrap();
    let (_, everything) = Tokens::new(store.clone())
        .issue(new_token("root", &["*"]))
        .await
        .unwrap();
    let (_, other) = Tokens::new(store.clone())
        .issue(new_token("bob", &["issues:*"]))
        .await
        .unwrap();
    let layer = PatAuthLayer::builder(store)
        .require_scopes(["repo:write"])
        .build();
    assert_eq!(
        send(&layer, request(Some(repo_all.expose_secret()), None))
            .await
            .status,
        200
    );
    assert_eq!(
        send(&layer, request(Some(everything.expose_secret()), None))
            .await
            .status,
        200
    );
    assert_eq!(
        send(&layer, request(Some(other.expose_secret()), None))
            .await
            .status,
        403
    );
}

async fn call(app: &Router, path: &str, token: Option<&str>) -> (u16, String) {
    let mut b = Request::builder().uri(path);
    if let Some(t) = token {
        b = b.header("authorization", format!("Bearer {t}"));
    }
    let res = app
        .clone()
        .oneshot(b.body(Body::empty()).unwrap())
        .await
        .unwrap();
    let status = res.status().as_u16();
    let body = res.into_body().collect().await.unwrap().to_bytes();
    (status, String::from_utf8(body.to_vec()).unwrap())
}

#[tokio::test]
async fn extractor_and_route_layer_in_a_real_router() {
    let store = MemoryStore::new();
    let (record, reader) = Tokens::new(store.clone())
        .issue(new_token("alice", &["docs:read"]))
        .await
        .unwrap();
    let (_, writer) = Tokens::new(store.clone())
        .issue(new_token("bob", &["docs:read", "docs:write"]))
        .await
        .unwrap();
    let layer = PatAuthLayer::builder(store).build();

    let app = Router::new()
        .route(
            "/docs",
            get(|p: Principal| async move { format!("{} {}", p.subject(), p.token_id()) }),
        )
        .merge(
            Router::new()
                .route("/docs/edit", get(|| async { "edited" }))
                .route_layer(RequireScopesLayer::new(["docs:write"])),
        )
        .layer(layer);

    assert_eq!(
        call(&app, "/docs", Some(reader.expose_secret())).await,
        (200, format!("alice {}", record.id))
    );
    let (status, body) = call(&app, "/docs/edit", Some(reader.expose_secret())).await;
    assert_eq!(status, 403);
    assert!(body.contains("insufficient_scope"));
    assert_eq!(
        call(&app, "/docs/edit", Some(writer.expose_secret()))
            .await
            .0,
        200
    );
    assert_eq!(call(&app, "/docs", None).await.0, 401);
}

#[tokio::test]
async fn optional_principal_and_missing_layer() {
    let store = MemoryStore::new();
    let (_, secret) = Tokens::new(store.clone())
        .issue(new_token("alice", &[]))
        .await
        .unwrap();
    let optional = PatAuthLayer::builder(store).allow_anonymous().build();
    let who = |p: Option<Principal>| async move {
        p.map_or("nobody".to_owned(), |p| p.subject().to_owned())
    };
    let app = Router::new()
        .route("/who", get(who))
        .route(
            "/must",
            get(|p: Principal| async move { p.subject().to_owned() }),
        )
        .layer(optional);
    assert_eq!(call(&app, "/who", None).await, (200, "nobody".to_owned()));
    assert_eq!(
        call(&app, "/who", Some(secret.expose_secret())).await,
        (200, "alice".to_owned())
    );
    // Anonymous request to a handler that needs a principal: the layer's 401 challenge.
    assert_eq!(call(&app, "/must", None).await.0, 401);

    // Without any layer the extractor explains the misconfiguration.
    let bare = Router::new().route(
        "/must",
        get(|p: Principal| async move { p.subject().to_owned() }),
    );
    let (status, body) = call(&bare, "/must", None).await;
    assert_eq!(status, 500);
    assert!(body.contains("not configured"), "{body}");
}
