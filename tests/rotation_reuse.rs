//! Rotation reuse detection (issue 12 item 12), through HTTP: the management API rotates, the
//! layer in front of a route sees the rotated-out secret, refuses it as any unknown token, emits
//! `personalAccessToken.reused` and, under `ReusePolicy::RevokeFamily`, revokes the token on
//! every node.

mod common;
mod support_admin;

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use axum::Router;
use axum::body::Body;
use axum::routing;
use http::{Method, Request, StatusCode};
use http_body_util::BodyExt;
use support_admin::{BASE, Res, call, create, issue};
use tokio::sync::mpsc;
use tower::ServiceExt;
use tower_pat::admin::{self, AdminConfig, EventKind, TokenEvent};
use tower_pat::store::SupersededHistory;
use tower_pat::{
    CacheConfig, MemoryStore, NewToken, PatAuthLayer, Principal, ReusePolicy, TokenHasher,
    TokenLookup, TokenStore, Tokens,
};

const PEER: &str = "198.51.100.7:5000";

/// One node: the management API and `/hello` behind a layer with reuse events, over `tokens`.
struct Node {
    app: Router,
    layer: PatAuthLayer,
    events: mpsc::Receiver<TokenEvent>,
}

impl Node {
    fn new(tokens: &Tokens, policy: ReusePolicy) -> Self {
        let (tx, events) = mpsc::channel(1024);
        let layer = tokens
            .layer()
            .cache(CacheConfig::default().negative_ttl(Duration::from_millis(300)))
            .reuse_policy(policy)
            .reuse_events(tx.clone())
            .build();
        let config = AdminConfig::new(tokens, &layer).unwrap().events(tx);
        let protected = Router::new()
            .route(
                "/hello",
                routing::get(|p: Principal| async move { p.subject().to_owned() }),
            )
            .layer(layer.clone());
        let app = Router::new()
            .nest(BASE, admin::router(config))
            .merge(protected);
        Self { app, layer, events }
    }

    /// The `personalAccessToken.reused` events sent so far (the others are dropped).
    fn reused(&mut self) -> Vec<TokenEvent> {
        let mut out = Vec::new();
        while let Ok(e) = self.events.try_recv() {
            if e.event == EventKind::Reused {
                out.push(e);
            }
        }
        out
    }
}

/// `GET /hello` with `token`, from `PEER`.
async fn hello(app: &Router, token: &str) -> Res {
    let mut req = Request::builder()
        .method(Method::GET)
        .uri("/hello")
        .header("authorization", format!("Bearer {token}"))
        .body(Body::empty())
        .unwrap();
    req.extensions_mut()
        .insert(PEER.parse::<SocketAddr>().unwrap());
    let res = app.clone().oneshot(req).await.unwrap();
    let status = res.status();
    let headers = res.headers().clone();
    let bytes = res.into_body().collect().await.unwrap().to_bytes();
    let text = String::from_utf8_lossy(&bytes).into_owned();
    Res {
        status,
        headers,
        body: serde_json::from_slice(&bytes).unwrap_or_default(),
        text,
    }
}

/// Creates a never-expiring token through the API with the admin secret `admin`: (id, secret).
async fn make(app: &Router, admin: &str) -> (String, String) {
    let res = create(
        app,
        admin,
        r#"{"name": "target", "scopes": ["x:read"], "userAwareTokenNeverExpires": true}"#,
    )
    .await;
    (
        res.body["id"].as_str().unwrap().to_owned(),
        res.body["token"].as_str().unwrap().to_owned(),
    )
}

/// Rotates token `id` through the API; returns the new secret.
async fn rotate(app: &Router, admin: &str, id: &str, body: &str) -> String {
    let res = call(
        app,
        Method::POST,
        &format!("{BASE}/{id}/rotate"),
        Some(admin),
        Some(body),
    )
    .await;
    assert_eq!(res.status, StatusCode::CREATED, "{}", res.text);
    res.body["token"].as_str().unwrap().to_owned()
}

async fn admin_secret(tokens: &Tokens) -> String {
    issue(tokens, "alice", &["personalAccessToken:*", "x:*"]).await
}

fn memory() -> (Tokens, MemoryStore) {
    let store = MemoryStore::new();
    (Tokens::new(store.clone()), store)
}

#[tokio::test]
async fn a_rotated_out_secret_is_refused_and_reported_with_the_client_address() {
    let (tokens, _) = memory();
    let mut node = Node::new(&tokens, ReusePolicy::Report);
    let admin = admin_secret(&tokens).await;
    let (id, old) = make(&node.app, &admin).await;
    assert_eq!(hello(&node.app, &old).await.status, StatusCode::OK);
    let new = rotate(&node.app, &admin, &id, "{}").await;
    assert_eq!(node.layer.stats().reused_secrets, 0);

    let res = hello(&node.app, &old).await;
    assert_eq!(res.status, StatusCode::UNAUTHORIZED);
    let reused = node.reused();
    assert_eq!(reused.len(), 1, "{reused:?}");
    assert_eq!(node.layer.stats().reused_secrets, 1);
    let json = serde_json::to_value(&reused[0]).unwrap();
    assert_eq!(json["event"], "personalAccessToken.reused");
    assert_eq!(json["data"]["id"], id.as_str());
    assert_eq!(json["reuse"]["clientAddress"], "198.51.100.7");
    assert_eq!(json["reuse"]["revoked"], false);
    let superseded: chrono::DateTime<chrono::Utc> = json["reuse"]["supersededAt"]
        .as_str()
        .unwrap()
        .parse()
        .unwrap();
    assert!(superseded <= chrono::Utc::now());
    // Neither the secret nor its hash is in the event.
    let text = json.to_string();
    assert!(!text.contains(&old) && !text.contains(&new));
    assert!(!text.contains(&TokenHasher::default().hash(&old).to_hex()));

    // Report only: the current secret keeps working.
    assert_eq!(hello(&node.app, &new).await.status, StatusCode::OK);
    assert!(node.reused().is_empty());
}

#[tokio::test]
async fn the_reused_secret_gets_the_same_401_as_an_unknown_token() {
    let (tokens, _) = memory();
    let mut node = Node::new(&tokens, ReusePolicy::RevokeFamily);
    let admin = admin_secret(&tokens).await;
    let (id, old) = make(&node.app, &admin).await;
    rotate(&node.app, &admin, &id, "{}").await;
    let reused = hello(&node.app, &old).await;
    assert_eq!(node.reused().len(), 1);
    // A well-formed token that was never issued.
    let (_, never) = tokens.mint(NewToken::new("mallory", "x"), chrono::Utc::now());
    let unknown = hello(&node.app, never.expose_secret()).await;
    assert_eq!(reused.status, unknown.status);
    assert_eq!(reused.text, unknown.text, "byte-identical bodies");
    assert_eq!(
        reused.headers.get("www-authenticate"),
        unknown.headers.get("www-authenticate")
    );
    // The never-issued token emits nothing.
    assert!(node.reused().is_empty());
}

/// A client still on the old secret during the grace period has it cached under the old hash.
/// Presented after the grace period, that cached entry is not answered from the cache ("expired",
/// which would tell its holder that the secret was real): the first presentation gets the same
/// 401 as a token never issued, and is reported at once.
#[tokio::test]
async fn a_secret_in_its_grace_period_is_valid_and_silent_then_reported() {
    let (tokens, _) = memory();
    let mut node = Node::new(&tokens, ReusePolicy::Report);
    let admin = admin_secret(&tokens).await;
    let (id, old) = make(&node.app, &admin).await;
    let new = rotate(&node.app, &admin, &id, r#"{"gracePeriodSeconds": 1}"#).await;
    assert_eq!(hello(&node.app, &old).await.status, StatusCode::OK);
    assert_eq!(hello(&node.app, &new).await.status, StatusCode::OK);
    assert!(
        node.reused().is_empty(),
        "a secret in its grace period is valid"
    );

    // After the grace period, the old secret's entry still cached.
    tokio::time::sleep(Duration::from_millis(1_100)).await;
    let reused = hello(&node.app, &old).await;
    let (_, never) = tokens.mint(NewToken::new("mallory", "x"), chrono::Utc::now());
    let unknown = hello(&node.app, never.expose_secret()).await;
    assert_eq!(reused.status, StatusCode::UNAUTHORIZED);
    assert_eq!(reused.text, unknown.text, "answered as an unknown token");
    assert_eq!(
        reused.headers.get("www-authenticate"),
        unknown.headers.get("www-authenticate")
    );
    let reported = node.reused();
    assert_eq!(reported.len(), 1, "the first presentation is reported");
    assert_eq!(reported[0].data.id, id);
    assert_eq!(hello(&node.app, &new).await.status, StatusCode::OK);
}

/// The same through `PatAuthLayer::verify`: a rotated-out secret verified during its grace
/// period (so cached), verified again after it, is refused as unknown, reported, and under
/// `RevokeFamily` the token is revoked.
#[tokio::test]
async fn verify_of_a_cached_grace_secret_after_its_grace_is_unknown_and_reported() {
    let (tokens, _) = memory();
    let mut node = Node::new(&tokens, ReusePolicy::RevokeFamily);
    let admin = admin_secret(&tokens).await;
    let (id, old) = make(&node.app, &admin).await;
    let new = rotate(&node.app, &admin, &id, r#"{"gracePeriodSeconds": 1}"#).await;
    let none = tower_pat::ScopeSet::empty();
    let client = Some("198.51.100.7".parse().unwrap());
    assert!(node.layer.verify(&old, client, &none).await.is_ok());
    tokio::time::sleep(Duration::from_millis(1_100)).await;
    assert_eq!(
        node.layer.verify(&old, client, &none).await.unwrap_err(),
        tower_pat::AuthError::InvalidToken
    );
    let reported = node.reused();
    assert_eq!(reported.len(), 1, "{reported:?}");
    assert!(tokens.get(&id).await.unwrap().unwrap().is_revoked());
    assert_eq!(
        node.layer.verify(&new, client, &none).await.unwrap_err(),
        tower_pat::AuthError::Revoked
    );
}

#[tokio::test]
async fn revoke_family_stops_the_new_secret_at_once() {
    let (tokens, _) = memory();
    let mut node = Node::new(&tokens, ReusePolicy::RevokeFamily);
    let admin = admin_secret(&tokens).await;
    let (id, old) = make(&node.app, &admin).await;
    let new = rotate(&node.app, &admin, &id, "{}").await;
    assert_eq!(
        hello(&node.app, &new).await.status,
        StatusCode::OK,
        "cached"
    );

    assert_eq!(
        hello(&node.app, &old).await.status,
        StatusCode::UNAUTHORIZED
    );
    let reused = node.reused();
    assert_eq!(reused.len(), 1);
    let json = serde_json::to_value(&reused[0]).unwrap();
    assert_eq!(json["reuse"]["revoked"], true);
    assert!(json["data"]["revokedAt"].is_string(), "{json}");
    assert_eq!(
        hello(&node.app, &new).await.status,
        StatusCode::UNAUTHORIZED
    );
    // No `personalAccessToken.revoked` for it: the reused event says so.
    assert!(tokens.get(&id).await.unwrap().unwrap().is_revoked());
}

/// Node `a` (RevokeFamily) and node `b` (no reuse handling) over one shared store: the old
/// secret presented to `a` stops the new one on `b` within `within`.
async fn revoke_family_across_nodes(a: Tokens, b: Tokens, within: Duration) {
    let mut node_a = Node::new(&a, ReusePolicy::RevokeFamily);
    let plain_b = b.layer().build();
    let app_b = Router::new()
        .route(
            "/hello",
            routing::get(|p: Principal| async move { p.subject().to_owned() }),
        )
        .layer(plain_b);
    let admin = admin_secret(&a).await;
    let (id, old) = make(&node_a.app, &admin).await;
    let new = rotate(&node_a.app, &admin, &id, "{}").await;
    assert_eq!(
        hello(&app_b, &new).await.status,
        StatusCode::OK,
        "cached on b"
    );

    assert_eq!(
        hello(&node_a.app, &old).await.status,
        StatusCode::UNAUTHORIZED
    );
    assert_eq!(node_a.reused().len(), 1);
    assert_eq!(
        hello(&node_a.app, &new).await.status,
        StatusCode::UNAUTHORIZED,
        "at once on this node"
    );
    let deadline = Instant::now() + within;
    loop {
        let status = hello(&app_b, &new).await.status;
        if status == StatusCode::UNAUTHORIZED {
            break;
        }
        assert!(Instant::now() < deadline, "node b still answers {status}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[cfg(feature = "sqlite")]
#[tokio::test]
async fn revoke_family_reaches_another_node_over_one_sqlite_file() {
    use tower_pat::SqliteStore;
    let dir = common::tempdir();
    let path = dir.join("tokens.db");
    let a = SqliteStore::open(&path).await.unwrap();
    let b = SqliteStore::open(&path).await.unwrap();
    revoke_family_across_nodes(Tokens::new(a), Tokens::new(b), Duration::from_secs(3)).await;
    let _ = std::fs::remove_dir_all(dir);
}

#[cfg(feature = "postgres")]
#[tokio::test]
async fn revoke_family_reaches_another_node_over_postgres() {
    use tower_pat::PostgresStore;
    let Some(db) = common::pg::TestDb::create("rotation_reuse").await else {
        return;
    };
    let a = PostgresStore::builder()
        .connect_with(db.options.clone())
        .await
        .unwrap();
    let b = PostgresStore::builder()
        .connect_with(db.options.clone())
        .await
        .unwrap();
    revoke_family_across_nodes(Tokens::new(a), Tokens::new(b), Duration::from_secs(3)).await;
}

#[tokio::test]
async fn a_flood_of_the_old_secret_costs_one_history_lookup_and_one_event() {
    let store = common::CountingStore::new();
    let tokens = Tokens::new(store.clone());
    let mut node = Node::new(&tokens, ReusePolicy::Report);
    let admin = admin_secret(&tokens).await;
    let (id, old) = make(&node.app, &admin).await;
    rotate(&node.app, &admin, &id, "{}").await;
    let lookups_before = node.layer.store_lookups();

    let tasks: Vec<_> = (0..200)
        .map(|_| {
            let (app, old) = (node.app.clone(), old.clone());
            tokio::spawn(async move { hello(&app, &old).await.status })
        })
        .collect();
    for t in tasks {
        assert_eq!(t.await.unwrap(), StatusCode::UNAUTHORIZED);
    }
    assert_eq!(
        store.superseded_lookups(),
        1,
        "single-flight + negative cache"
    );
    assert_eq!(node.reused().len(), 1);
    assert_eq!(node.layer.stats().reused_secrets, 1);
    // One lookup by hash, one in the history.
    assert_eq!(node.layer.store_lookups() - lookups_before, 2);
}

#[tokio::test]
async fn a_cache_hit_does_no_history_lookup() {
    let store = common::CountingStore::new();
    let tokens = Tokens::new(store.clone());
    let node = Node::new(&tokens, ReusePolicy::RevokeFamily);
    let admin = admin_secret(&tokens).await;
    let (_, live) = make(&node.app, &admin).await;
    for _ in 0..100 {
        assert_eq!(hello(&node.app, &live).await.status, StatusCode::OK);
    }
    assert_eq!(store.superseded_lookups(), 0);
    // The admin token's and the live token's first lookups; then hits only.
    assert_eq!(store.lookups(), 2);
}

#[tokio::test]
async fn without_a_hook_or_revoke_family_the_history_is_never_read() {
    let store = common::CountingStore::new();
    let tokens = Tokens::new(store.clone());
    let layer = tokens.layer().build();
    let (record, old) = tokens
        .issue(NewToken::new("alice", "ci").scopes(["x:read"]).unwrap())
        .await
        .unwrap();
    tokens.rotate(&record.id, Duration::ZERO).await.unwrap();
    let res = common::send_token(&layer, &old).await;
    assert_eq!(res.status, StatusCode::UNAUTHORIZED);
    assert_eq!(store.superseded_lookups(), 0);
}

#[tokio::test]
async fn the_history_is_bounded_per_token() {
    let store =
        MemoryStore::new().superseded_history(SupersededHistory::default().max_per_token(3));
    let tokens = Tokens::new(store);
    let mut node = Node::new(&tokens, ReusePolicy::Report);
    let admin = admin_secret(&tokens).await;
    let (id, first) = make(&node.app, &admin).await;
    let mut secrets = vec![first];
    for _ in 0..5 {
        secrets.push(rotate(&node.app, &admin, &id, "{}").await);
    }
    // secrets[0..5] were superseded; only the newest 3 are remembered.
    for (i, old) in secrets[..5].iter().enumerate() {
        assert_eq!(hello(&node.app, old).await.status, StatusCode::UNAUTHORIZED);
        let reported = node.reused().len();
        assert_eq!(reported, usize::from(i >= 2), "secret {i}");
    }
    assert_eq!(hello(&node.app, &secrets[5]).await.status, StatusCode::OK);
}

#[tokio::test]
async fn deleting_the_token_removes_its_history() {
    let (tokens, store) = memory();
    let mut node = Node::new(&tokens, ReusePolicy::RevokeFamily);
    let admin = admin_secret(&tokens).await;
    let (id, old) = make(&node.app, &admin).await;
    rotate(&node.app, &admin, &id, "{}").await;
    let hash = TokenHasher::default().hash(&old);
    assert!(store.find_superseded(&hash).await.unwrap().is_some());

    let res = call(
        &node.app,
        Method::DELETE,
        &format!("{BASE}/{id}"),
        Some(&admin),
        None,
    )
    .await;
    assert!(res.status.is_success(), "{}", res.text);
    assert_eq!(store.find_superseded(&hash).await.unwrap(), None);
    assert_eq!(
        hello(&node.app, &old).await.status,
        StatusCode::UNAUTHORIZED
    );
    assert!(node.reused().is_empty());
    assert_eq!(store.get(&id).await.unwrap(), None);
}

/// `patd`: `[reuse] policy = "revoke_family"` builds a layer that revokes the family; the
/// default builds one that never reads the history.
#[cfg(feature = "gateway")]
#[tokio::test]
async fn patd_reuse_policy_configures_the_layer() {
    use tower_pat::gateway::config::Config;
    use tower_pat::gateway::serve;
    let store = common::CountingStore::new();
    let tokens = Tokens::new(store.clone());
    let none = tower_pat::ScopeSet::empty();
    let set = ["reuse.policy=revoke_family".to_owned()];
    let config = Config::load(None, Vec::new(), &set).unwrap();
    let layer = serve::layer(&config, &tokens);
    let default_layer = serve::layer(&Config::load(None, Vec::new(), &[]).unwrap(), &tokens);

    let (record, old) = tokens
        .issue(NewToken::new("alice", "ci").scopes(["x:read"]).unwrap())
        .await
        .unwrap();
    let (_, new) = tokens.rotate(&record.id, Duration::ZERO).await.unwrap();
    assert!(
        default_layer
            .verify(old.expose_secret(), None, &none)
            .await
            .is_err()
    );
    assert_eq!(store.superseded_lookups(), 0, "off by default");
    assert!(layer.verify(new.expose_secret(), None, &none).await.is_ok());
    assert!(
        layer
            .verify(old.expose_secret(), None, &none)
            .await
            .is_err()
    );
    assert_eq!(store.superseded_lookups(), 1);
    assert_eq!(layer.stats().reused_secrets, 1);
    assert_eq!(default_layer.stats().reused_secrets, 0);
    assert!(
        layer
            .verify(new.expose_secret(), None, &none)
            .await
            .is_err()
    );
    assert!(tokens.get(&record.id).await.unwrap().unwrap().is_revoked());
}

/// The served OpenAPI document lists the event and its `reuse` object.
#[tokio::test]
async fn the_openapi_document_lists_the_reused_event() {
    let (tokens, _) = memory();
    let node = Node::new(&tokens, ReusePolicy::Report);
    let admin = admin_secret(&tokens).await;
    let res = call(
        &node.app,
        Method::GET,
        &format!("{BASE}/openapi.json"),
        Some(&admin),
        None,
    )
    .await;
    assert_eq!(res.status, StatusCode::OK, "{}", res.text);
    let schemas = &res.body["components"]["schemas"];
    let kinds = schemas["EventKind"].to_string();
    assert!(kinds.contains("personalAccessToken.reused"), "{kinds}");
    assert!(schemas["TokenEvent"]["properties"]["reuse"].is_object());
    let details: Vec<&str> = schemas["ReuseDetails"]["properties"]
        .as_object()
        .unwrap()
        .keys()
        .map(String::as_str)
        .collect();
    assert_eq!(details, ["clientAddress", "revoked", "supersededAt"]);
}

/// The event reaches the management API's webhook, signed like every other event.
#[tokio::test]
async fn the_reused_event_is_delivered_to_the_webhook() {
    use axum::extract::State;
    use bytes::Bytes;
    use http::HeaderMap;
    use tower_pat::admin::{
        EVENT_HEADER, SIGNATURE_HEADER, TIMESTAMP_HEADER, WebhookSink, verify_signature,
    };
    const KEY: &[u8] = b"a webhook key of at least 32 bytes!!";

    let (tx, mut rx) = mpsc::unbounded_channel::<(HeaderMap, Bytes)>();
    let receiver = Router::new()
        .route(
            "/hook",
            routing::post(
                |State(tx): State<mpsc::UnboundedSender<(HeaderMap, Bytes)>>,
                 headers: HeaderMap,
                 body: Bytes| async move {
                    let _ = tx.send((headers, body));
                    StatusCode::OK
                },
            ),
        )
        .with_state(tx);
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, receiver).await });
    let sink = WebhookSink::builder(&format!("http://{addr}/hook"), KEY)
        .unwrap()
        .spawn();

    let (tokens, _) = memory();
    let layer = tokens
        .layer()
        .reuse_policy(ReusePolicy::RevokeFamily)
        .reuse_events(sink)
        .build();
    let app = Router::new()
        .route(
            "/hello",
            routing::get(|p: Principal| async move { p.subject().to_owned() }),
        )
        .layer(layer);
    let (record, old) = tokens
        .issue(NewToken::new("alice", "ci").scopes(["x:read"]).unwrap())
        .await
        .unwrap();
    tokens.rotate(&record.id, Duration::ZERO).await.unwrap();
    assert_eq!(
        hello(&app, old.expose_secret()).await.status,
        StatusCode::UNAUTHORIZED
    );

    let (headers, body) = tokio::time::timeout(Duration::from_secs(10), rx.recv())
        .await
        .expect("a delivery within 10 s")
        .unwrap();
    assert_eq!(headers[EVENT_HEADER], "personalAccessToken.reused");
    verify_signature(
        KEY,
        headers[TIMESTAMP_HEADER].as_bytes(),
        &body,
        headers[SIGNATURE_HEADER].as_bytes(),
        chrono::Utc::now(),
        Duration::from_secs(60),
    )
    .unwrap();
    let event: serde_json::Value = serde_json::from_slice(&body).unwrap();
    assert_eq!(event["data"]["id"], record.id.as_str());
    assert_eq!(event["reuse"]["clientAddress"], "198.51.100.7");
    assert_eq!(event["reuse"]["revoked"], true);
    assert!(!String::from_utf8_lossy(&body).contains(old.expose_secret()));
}

/// A presenter that drops its request while the history is being read cannot stop the report
/// or the revocation.
#[tokio::test]
async fn dropping_the_request_does_not_cancel_the_detection() {
    let store = common::CountingStore::new();
    let tokens = Tokens::new(store.clone());
    let mut node = Node::new(&tokens, ReusePolicy::RevokeFamily);
    let admin = admin_secret(&tokens).await;
    let (id, old) = make(&node.app, &admin).await;
    let new = rotate(&node.app, &admin, &id, "{}").await;
    store
        .superseded_delay_ms
        .store(300, std::sync::atomic::Ordering::SeqCst);
    let gave_up = tokio::time::timeout(Duration::from_millis(100), hello(&node.app, &old)).await;
    assert!(gave_up.is_err(), "the request was dropped mid-lookup");
    let deadline = Instant::now() + Duration::from_secs(5);
    while node.reused().is_empty() {
        assert!(Instant::now() < deadline, "no reused event");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(tokens.get(&id).await.unwrap().unwrap().is_revoked());
    assert_eq!(
        hello(&node.app, &new).await.status,
        StatusCode::UNAUTHORIZED
    );
}

/// A layer with one lookup slot and reuse detection, whose store reads the history for
/// `history_ms`, each store query given `lookup_timeout`; a presenter of a rotated-out secret has
/// started the history lookup and dropped its request. Returns the layer, a valid token not yet
/// cached, and the store.
async fn detection_after_a_dropped_presenter(
    history_ms: u64,
    lookup_timeout: Duration,
) -> (PatAuthLayer, String, common::CountingStore) {
    let store = common::CountingStore::new();
    let tokens = Tokens::new(store.clone());
    let (record, old) = tokens
        .issue(NewToken::new("alice", "rotated"))
        .await
        .unwrap();
    tokens.rotate(&record.id, Duration::ZERO).await.unwrap();
    let (_, valid) = tokens.issue(NewToken::new("bob", "valid")).await.unwrap();
    let layer = tokens
        .layer()
        .cache(
            CacheConfig::default()
                .max_concurrent_lookups(1)
                .lookup_wait(Duration::from_millis(100))
                .lookup_timeout(lookup_timeout),
        )
        .on_reuse(|_| {})
        .build();
    store
        .superseded_delay_ms
        .store(history_ms, std::sync::atomic::Ordering::SeqCst);
    let presenter = {
        let (layer, old) = (layer.clone(), old.expose_secret().to_owned());
        tokio::spawn(async move { common::send(&layer, common::request(Some(&old), None)).await })
    };
    let deadline = Instant::now() + Duration::from_secs(5);
    while store.superseded_lookups() == 0 {
        assert!(Instant::now() < deadline, "no history lookup");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    presenter.abort();
    (layer, valid.expose_secret().to_owned(), store)
}

/// A presenter that drops its request while the history is being read does not get its lookup
/// slot back early: the detection holds it (and the client's budget) until it ends, so that
/// detections stay within the bounds lookups have.
#[tokio::test]
async fn a_dropped_presenter_leaves_its_lookup_slot_to_the_detection() {
    let (layer, valid, _) = detection_after_a_dropped_presenter(600, Duration::from_secs(5)).await;
    let detection_started = Instant::now();
    // The one lookup slot is still the detection's: a valid token not yet cached waits for it,
    // and gets 503 after `lookup_wait`.
    let waited = common::send(&layer, common::request(Some(&valid), None)).await;
    assert_eq!(waited.status, StatusCode::SERVICE_UNAVAILABLE);
    // Once the detection has ended, the slot is free again.
    tokio::time::sleep(Duration::from_millis(700).saturating_sub(detection_started.elapsed()))
        .await;
    let served = common::send(&layer, common::request(Some(&valid), None)).await;
    assert_eq!(served.status, StatusCode::OK);
}

/// A store that never answers a history query keeps the lookup slot no longer than it would a
/// lookup's: the query is given up after `lookup_timeout` (a store failure), the detection ends,
/// and the slot is free. Before, the slot came back after a second while the query went on for
/// good (and with it, each second, another one per slot).
#[tokio::test]
async fn a_history_query_the_store_never_answers_is_given_up_after_the_lookup_timeout() {
    let (layer, valid, store) =
        detection_after_a_dropped_presenter(3_600_000, Duration::from_millis(300)).await;
    // The one lookup slot is the detection's while its query runs.
    let waited = common::send(&layer, common::request(Some(&valid), None)).await;
    assert_eq!(waited.status, StatusCode::SERVICE_UNAVAILABLE);
    // A hang guard, not a speed measure: the query is given up, not left running.
    let deadline = Instant::now() + Duration::from_secs(10);
    while store.superseded_in_progress() > 0 {
        assert!(
            Instant::now() < deadline,
            "the history query the store never answered is still running"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(store.superseded_lookups(), 1);
    let served = common::send(&layer, common::request(Some(&valid), None)).await;
    assert_eq!(served.status, StatusCode::OK);
}

/// Reuse detections stay within the lookup slots, however slow the history: a flood of random
/// well-formed tokens from many networks, round after round, against a store that never answers
/// a history query, never has more history queries in progress than the lookup slots (the shared
/// ones and the suspects' pool). Before, a detection gave its slots back after a second and kept
/// awaiting its query: each second brought another slot's worth on top (36 at once where the
/// bound is 6).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn history_queries_of_a_flood_stay_within_the_lookup_slots() {
    use std::net::{IpAddr, Ipv6Addr};
    const SHARED: usize = 4;
    const SUSPECT: usize = 2;
    let store = common::CountingStore::new();
    store
        .superseded_delay_ms
        .store(3_600_000, std::sync::atomic::Ordering::SeqCst);
    let layer = PatAuthLayer::builder(store.clone())
        .cache(
            CacheConfig::default()
                .max_concurrent_lookups(SHARED)
                .suspect_lookups(SUSPECT)
                .max_lookups_per_client(2)
                .lookup_wait(Duration::from_millis(100))
                .lookup_timeout(Duration::from_millis(200)),
        )
        .on_reuse(|_| {})
        .build();
    let format = tower_pat::TokenFormat::new();
    let none = tower_pat::ScopeSet::default();
    // Rounds a little over a second apart (the time a detection used to hold its slots): each
    // round, 40 random well-formed tokens from 20 IPv6 /64s.
    for round in 0..4u16 {
        let mut tasks = Vec::new();
        for i in 0..40u16 {
            let (layer, none) = (layer.clone(), none.clone());
            let token = format.generate().expose_secret().to_owned();
            let client = IpAddr::V6(Ipv6Addr::new(0x2001, 0xdb8, round, i % 20, 0, 0, 0, 1));
            tasks.push(tokio::spawn(async move {
                let _ = layer.verify(&token, Some(client), &none).await;
            }));
        }
        for t in tasks {
            t.await.unwrap();
        }
        tokio::time::sleep(Duration::from_millis(1_100)).await;
    }
    let most = store.superseded_most();
    assert!(
        store.superseded_lookups() > SHARED + SUSPECT,
        "the flood read little history"
    );
    assert!(
        most <= SHARED + SUSPECT,
        "{most} history queries ran at once, beyond the {} lookup slots (still running: {})",
        SHARED + SUSPECT,
        store.superseded_in_progress()
    );
}

/// Which reuse reports a webhook posts as alerts: the one that revokes the token (at most once
/// per token), not the ones a token's holder can repeat at will (rotate, present the old secret
/// again, under `Report`; or another rotated-out secret of a token already revoked).
#[tokio::test]
async fn only_the_reuse_that_revokes_is_an_alert() {
    let (tokens, _) = memory();
    let mut node = Node::new(&tokens, ReusePolicy::Report);
    let admin = admin_secret(&tokens).await;
    let (id, old) = make(&node.app, &admin).await;
    rotate(&node.app, &admin, &id, "{}").await;
    hello(&node.app, &old).await;
    let reported = node.reused();
    assert_eq!(reported.len(), 1);
    assert!(!reported[0].is_alert(), "a report that revokes nothing");

    let (tokens, _) = memory();
    let mut node = Node::new(&tokens, ReusePolicy::RevokeFamily);
    let admin = admin_secret(&tokens).await;
    let (id, first) = make(&node.app, &admin).await;
    let second = rotate(&node.app, &admin, &id, "{}").await;
    rotate(&node.app, &admin, &id, "{}").await;
    hello(&node.app, &first).await;
    let revoking = node.reused();
    assert_eq!(revoking.len(), 1);
    assert!(revoking[0].data.revoked);
    assert!(revoking[0].is_alert(), "the reuse that revoked the token");
    hello(&node.app, &second).await;
    let later = node.reused();
    assert_eq!(later.len(), 1);
    assert!(later[0].data.revoked);
    assert!(!later[0].is_alert(), "a token revoked before is not news");
}
