//! Shared by the `admin_*` tests: an app with the management API nested at
//! `/personal-access-tokens` and a few protected routes, and a way to call it.
#![allow(dead_code)]

use std::net::SocketAddr;

use axum::Router;
use axum::body::Body;
use axum::routing;
use http::{HeaderMap, Method, Request, StatusCode};
use http_body_util::BodyExt;
use serde_json::Value;
use tower::ServiceExt;
use tower_pat::admin::{self, AdminConfig};
use tower_pat::{MemoryStore, NewToken, PatAuthLayer, Principal, RequireScopesLayer, Tokens};

pub(crate) const BASE: &str = "/personal-access-tokens";

pub(crate) struct TestApp {
    pub(crate) app: Router,
    pub(crate) store: MemoryStore,
    /// The handle the admin API and the layer are built from.
    pub(crate) tokens: Tokens,
    pub(crate) layer: PatAuthLayer,
    /// A token of subject `alice` with `personalAccessToken:*` and `x:*`.
    pub(crate) alice: String,
}

/// The app with the default configuration.
pub(crate) async fn app() -> TestApp {
    app_with(|c| c).await
}

/// The app with a configuration changed by `configure`.
pub(crate) async fn app_with(configure: impl FnOnce(AdminConfig) -> AdminConfig) -> TestApp {
    let store = MemoryStore::new();
    let tokens = Tokens::new(store.clone());
    let layer = tokens.layer().build();
    let config = configure(AdminConfig::new(&tokens, &layer).unwrap());
    let protected = Router::new()
        .route(
            "/hello",
            routing::get(|p: Principal| async move { p.subject().to_owned() }),
        )
        .route(
            "/needs-x",
            routing::get(|| async { "x" }).route_layer(RequireScopesLayer::new(["x:read"])),
        )
        .layer(layer.clone());
    let app = Router::new()
        .nest(BASE, admin::router(config))
        .merge(protected);
    let alice = issue(&tokens, "alice", &["personalAccessToken:*", "x:*"]).await;
    TestApp {
        app,
        store,
        tokens,
        layer,
        alice,
    }
}

/// Issues a never-expiring token named `seed-N` through `tokens` and returns its secret.
pub(crate) async fn issue(tokens: &Tokens, subject: &str, scopes: &[&str]) -> String {
    let new = NewToken::new(subject, format!("seed-{}", rand_suffix()))
        .scopes(scopes)
        .unwrap();
    let (_, secret) = tokens.issue(new).await.unwrap();
    secret.expose_secret().to_owned()
}

fn rand_suffix() -> String {
    use std::sync::atomic::{AtomicU64, Ordering};
    static N: AtomicU64 = AtomicU64::new(0);
    N.fetch_add(1, Ordering::Relaxed).to_string()
}

/// A response: status, headers and the body as JSON (`Value::Null` if empty or not JSON).
#[derive(Debug)]
pub(crate) struct Res {
    pub(crate) status: StatusCode,
    pub(crate) headers: HeaderMap,
    pub(crate) body: Value,
    pub(crate) text: String,
}

impl Res {
    /// Asserts the status and the crate's error shape, and returns the message.
    pub(crate) fn error(&self, status: u16) -> &str {
        assert_eq!(self.status.as_u16(), status, "{}", self.text);
        let obj = self.body.as_object().expect("a JSON error body");
        assert_eq!(obj.len(), 3, "{}", self.text);
        assert_eq!(obj["status"], status);
        assert!(obj["code"].is_string());
        obj["message"].as_str().unwrap()
    }

    /// Asserts a 429 in the crate's error shape, and returns its `Retry-After` in seconds.
    pub(crate) fn too_many(&self) -> u64 {
        self.error(429);
        self.headers["retry-after"]
            .to_str()
            .unwrap()
            .parse()
            .unwrap()
    }
}

/// One request through the app, from 127.0.0.1.
pub(crate) async fn call(
    app: &Router,
    method: Method,
    uri: &str,
    token: Option<&str>,
    body: Option<&str>,
) -> Res {
    let mut req = Request::builder().method(method).uri(uri);
    if let Some(t) = token {
        req = req.header("authorization", format!("Bearer {t}"));
    }
    if body.is_some() {
        req = req.header("content-type", "application/json");
    }
    let mut req = req.body(Body::from(body.unwrap_or("").to_owned())).unwrap();
    req.extensions_mut()
        .insert(SocketAddr::from(([127, 0, 0, 1], 40000)));
    let res = app.clone().oneshot(req).await.unwrap();
    let status = res.status();
    let headers = res.headers().clone();
    let bytes = res.into_body().collect().await.unwrap().to_bytes();
    let text = String::from_utf8_lossy(&bytes).into_owned();
    let body = serde_json::from_slice(&bytes).unwrap_or(Value::Null);
    Res {
        status,
        headers,
        body,
        text,
    }
}

pub(crate) async fn get(app: &Router, uri: &str, token: &str) -> Res {
    call(app, Method::GET, uri, Some(token), None).await
}

pub(crate) async fn post(app: &Router, uri: &str, token: &str, body: &str) -> Res {
    call(app, Method::POST, uri, Some(token), Some(body)).await
}

pub(crate) async fn patch(app: &Router, uri: &str, token: &str, body: &str) -> Res {
    call(app, Method::PATCH, uri, Some(token), Some(body)).await
}

/// Creates a token through the API and returns the 201 response.
pub(crate) async fn create(app: &Router, token: &str, body: &str) -> Res {
    let res = post(app, BASE, token, body).await;
    assert_eq!(res.status, StatusCode::CREATED, "{}", res.text);
    res
}

/// The status of `GET /hello` with `token`.
pub(crate) async fn hello(app: &Router, token: &str) -> StatusCode {
    get(app, "/hello", token).await.status
}

/// An RFC 3339 time `days` from now.
pub(crate) fn in_days(days: i64) -> String {
    (chrono::Utc::now() + chrono::Duration::days(days)).to_rfc3339()
}

/// A JSON string as a time.
pub(crate) fn time(v: &Value) -> chrono::DateTime<chrono::Utc> {
    v.as_str().unwrap().parse().unwrap()
}

/// The URL of a webhook receiver that accepts connections and never answers.
pub(crate) async fn hanging_receiver() -> String {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        let mut held = Vec::new();
        while let Ok((socket, _)) = listener.accept().await {
            held.push(socket);
        }
    });
    format!("http://{addr}/hook")
}
