//! Attacks found by an adversarial review of the lifecycle and management rules, kept as tests:
//! a rotated-away secret brought back by the cache's background refresh, a PATCH of scopes that
//! arms a longer-lived or wider token, and a request admitted before a revocation whose body
//! arrives after it.

mod support_admin;

use std::net::SocketAddr;
use std::time::Duration;

use axum::Router;
use axum::routing;
use chrono::Utc;
use http::StatusCode;
use support_admin::*;
use tower_pat::admin::{self, AdminConfig};
use tower_pat::record::parse_ip_net;
use tower_pat::{CacheConfig, MemoryStore, NewToken, Principal, TokenStore, Tokens};

/// A secret superseded by a rotation stops for good when its grace period ends, also when the
/// cache refreshes the entry it was loaded under in the background.
#[tokio::test]
async fn a_rotated_away_secret_does_not_come_back_through_a_background_refresh() {
    let store = MemoryStore::new();
    let tokens = Tokens::new(store.clone());
    let layer = tokens
        .layer()
        .cache(
            CacheConfig::default()
                .ttl(Duration::from_millis(300))
                .stale_if_error(Duration::from_secs(30)),
        )
        .build();
    let config = AdminConfig::new(&tokens, &layer).unwrap();
    let protected = Router::new()
        .route(
            "/hello",
            routing::get(|p: Principal| async move { p.subject().to_owned() }),
        )
        .layer(layer.clone());
    let app = Router::new()
        .nest(BASE, admin::router(config))
        .merge(protected);
    let old = issue(&tokens, "alice", &["personalAccessToken:*", "x:*"]).await;
    let me = get(&app, &format!("{BASE}/self"), &old).await;
    let id = me.body["id"].as_str().unwrap().to_owned();

    let res = post(
        &app,
        &format!("{BASE}/{id}/rotate"),
        &old,
        r#"{"gracePeriodSeconds": 1}"#,
    )
    .await;
    assert_eq!(res.status, StatusCode::CREATED, "{}", res.text);
    let new = res.body["token"].as_str().unwrap().to_owned();

    tokio::time::sleep(Duration::from_millis(800)).await;
    assert_eq!(
        hello(&app, &old).await,
        StatusCode::OK,
        "within the grace period"
    );
    // Past the grace period and the TTL of the entry loaded above: the next request starts a
    // background refresh of that entry.
    tokio::time::sleep(Duration::from_millis(600)).await;
    let _ = hello(&app, &old).await;
    let mut later = Vec::new();
    for _ in 0..5 {
        tokio::time::sleep(Duration::from_millis(300)).await;
        later.push(hello(&app, &old).await);
    }
    assert!(
        later.iter().all(|s| *s == StatusCode::UNAUTHORIZED),
        "the superseded secret works again after its grace period: {later:?}"
    );
    assert_eq!(
        get(&app, &format!("{BASE}/self"), &old).await.status,
        StatusCode::UNAUTHORIZED
    );
    assert_eq!(hello(&app, &new).await, StatusCode::OK);
}

/// Giving a token scopes hands those scopes its lifetime and networks: a short-lived, restricted
/// caller cannot arm a never-expiring, unrestricted sibling with its scopes.
#[tokio::test]
async fn a_patch_of_scopes_cannot_arm_a_longer_lived_or_wider_token() {
    let t = app().await;
    let rw = ["personalAccessToken:read", "personalAccessToken:write"];
    let short = NewToken::new("alice", "short")
        .scopes(rw.iter().copied().chain(["x:*"]))
        .unwrap()
        .ip_restriction([parse_ip_net("127.0.0.1").unwrap()])
        .expires_at(Utc::now() + chrono::Duration::hours(1));
    let (_, short) = t.tokens.issue(short).await.unwrap();
    let long = NewToken::new("alice", "long").scopes(rw).unwrap();
    let (long, _) = t.tokens.issue(long).await.unwrap();

    let res = patch(
        &t.app,
        &format!("{BASE}/{}", long.id),
        short.expose_secret(),
        r#"{"scopes": ["personalAccessToken:read", "personalAccessToken:write", "x:*"]}"#,
    )
    .await;
    let message = res.error(403);
    assert!(message.contains("outlive"), "{message}");
    let stored = t.store.get(&long.id).await.unwrap().unwrap();
    assert_eq!(stored.scopes, long.scopes, "nothing was written");

    // Within the caller's ceilings the same PATCH is fine.
    let bounded = patch(
        &t.app,
        &format!("{BASE}/{}", long.id),
        short.expose_secret(),
        &format!(
            r#"{{"expiresAt": "{}", "ipRestriction": "127.0.0.1"}}"#,
            (Utc::now() + chrono::Duration::minutes(30)).to_rfc3339()
        ),
    )
    .await;
    assert_eq!(bounded.status, StatusCode::OK, "{}", bounded.text);
    let res = patch(
        &t.app,
        &format!("{BASE}/{}", long.id),
        short.expose_secret(),
        r#"{"scopes": ["personalAccessToken:read", "personalAccessToken:write", "x:*"]}"#,
    )
    .await;
    assert_eq!(res.status, StatusCode::OK, "{}", res.text);
}

/// The layer authenticates on the headers; a management write whose body arrives after the
/// caller's token was revoked must not act.
#[tokio::test]
async fn a_slow_body_cannot_act_after_the_callers_revocation() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let t = app().await;
    let leaked = NewToken::new("alice", "leaked")
        .scopes(["personalAccessToken:*", "x:*"])
        .unwrap();
    let (rec, leaked) = t.tokens.issue(leaked).await.unwrap();
    let leaked = leaked.expose_secret().to_owned();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let app = t.app.clone();
    let server = tokio::spawn(async move {
        axum::serve(
            listener,
            app.into_make_service_with_connect_info::<SocketAddr>(),
        )
        .await
        .unwrap();
    });
    let body = r#"{"name": "persist", "scopes": ["personalAccessToken:*", "x:*"], "userAwareTokenNeverExpires": true}"#;
    let mut conn = tokio::net::TcpStream::connect(addr).await.unwrap();
    let head = format!(
        "POST {BASE} HTTP/1.1\r\nhost: x\r\nauthorization: Bearer {leaked}\r\n\
         content-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n",
        body.len()
    );
    conn.write_all(head.as_bytes()).await.unwrap();
    conn.write_all(&body.as_bytes()[..10]).await.unwrap();
    tokio::time::sleep(Duration::from_millis(300)).await;
    let res = patch(
        &t.app,
        &format!("{BASE}/{}", rec.id),
        &t.alice,
        r#"{"revoked": true}"#,
    )
    .await;
    assert_eq!(res.status, StatusCode::OK, "{}", res.text);
    assert_eq!(hello(&t.app, &leaked).await, StatusCode::UNAUTHORIZED);

    conn.write_all(&body.as_bytes()[10..]).await.unwrap();
    let mut out = String::new();
    tokio::time::timeout(Duration::from_secs(10), conn.read_to_string(&mut out))
        .await
        .unwrap()
        .unwrap();
    let status_line = out.lines().next().unwrap_or("").to_owned();
    assert!(
        status_line.contains(" 401 "),
        "a revoked token acted after revoke() returned: {status_line}"
    );
    let page = t
        .tokens
        .list(&tower_pat::store::ListQuery::for_subject("alice"))
        .await
        .unwrap();
    assert!(
        page.items.iter().all(|r| r.name != "persist"),
        "no child was stored"
    );
    server.abort();
}

/// A secret superseded by a rotation keeps authenticating during its grace period, but cannot
/// manage tokens: a leaked old secret cannot rotate the token again and cut off the new one.
#[tokio::test]
async fn a_secret_in_its_grace_period_cannot_manage_tokens() {
    let t = app().await;
    let old = issue(&t.tokens, "alice", &["personalAccessToken:*", "x:*"]).await;
    let me = get(&t.app, &format!("{BASE}/self"), &old).await;
    let id = me.body["id"].as_str().unwrap().to_owned();
    let res = post(
        &t.app,
        &format!("{BASE}/{id}/rotate"),
        &old,
        r#"{"gracePeriodSeconds": 600}"#,
    )
    .await;
    assert_eq!(res.status, StatusCode::CREATED, "{}", res.text);
    let new = res.body["token"].as_str().unwrap().to_owned();

    assert_eq!(
        hello(&t.app, &old).await,
        StatusCode::OK,
        "still authenticates"
    );
    let again = post(&t.app, &format!("{BASE}/{id}/rotate"), &old, "").await;
    assert!(
        again.error(403).contains("replaced by a rotation"),
        "{}",
        again.text
    );
    let revoke = patch(
        &t.app,
        &format!("{BASE}/{id}"),
        &old,
        r#"{"revoked": true}"#,
    )
    .await;
    revoke.error(403);
    assert_eq!(
        hello(&t.app, &new).await,
        StatusCode::OK,
        "the new secret is untouched"
    );
    let child = post(
        &t.app,
        BASE,
        &new,
        r#"{"name": "child", "userAwareTokenNeverExpires": true}"#,
    )
    .await;
    assert_eq!(child.status, StatusCode::CREATED, "{}", child.text);
}

/// A request body that sends its first bytes at once and the rest only when released: a client
/// whose headers the layer has authenticated while its body is still on the way.
struct HeldBody {
    first: Option<bytes::Bytes>,
    rest: Option<bytes::Bytes>,
    release: tokio::sync::oneshot::Receiver<()>,
}

impl http_body::Body for HeldBody {
    type Data = bytes::Bytes;
    type Error = std::convert::Infallible;

    fn poll_frame(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<http_body::Frame<bytes::Bytes>, Self::Error>>> {
        use std::task::Poll;
        if let Some(first) = self.first.take() {
            return Poll::Ready(Some(Ok(http_body::Frame::data(first))));
        }
        if self.rest.is_some() {
            // Released, or the sender dropped: either way the rest goes now.
            std::task::ready!(std::pin::Pin::new(&mut self.release).poll(cx)).ok();
        }
        Poll::Ready(self.rest.take().map(|b| Ok(http_body::Frame::data(b))))
    }
}

/// Sends `method uri` with `token` and a JSON `body` of which only the first 5 bytes arrive until
/// the returned sender is used; the response comes out of the handle. Returns once the layer has
/// let the request in (its handler is waiting for the body).
async fn held(
    app: &Router,
    method: http::Method,
    uri: &str,
    token: &str,
    body: &str,
) -> (
    tokio::task::JoinHandle<(StatusCode, serde_json::Value)>,
    tokio::sync::oneshot::Sender<()>,
) {
    use http_body_util::BodyExt;
    use tower::ServiceExt;
    let (release, wait) = tokio::sync::oneshot::channel();
    let bytes = bytes::Bytes::copy_from_slice(body.as_bytes());
    let mut req = http::Request::builder()
        .method(method)
        .uri(uri)
        .header("authorization", format!("Bearer {token}"))
        .header("content-type", "application/json")
        .header("content-length", bytes.len())
        .body(axum::body::Body::new(HeldBody {
            first: Some(bytes.slice(..5)),
            rest: Some(bytes.slice(5..)),
            release: wait,
        }))
        .unwrap();
    req.extensions_mut()
        .insert(SocketAddr::from(([127, 0, 0, 1], 40000)));
    let app = app.clone();
    let handle = tokio::spawn(async move {
        let res = app.oneshot(req).await.unwrap();
        let status = res.status();
        let bytes = res.into_body().collect().await.unwrap().to_bytes();
        (status, serde_json::from_slice(&bytes).unwrap_or_default())
    });
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert!(!handle.is_finished(), "the request waits for its body");
    (handle, release)
}

/// A leaked token narrowed by its owner while its own request's body is on the way: the request
/// ran under the ceilings the token had when its headers were authenticated, so it must not act
/// at all (409), neither putting back the scopes, expiry or networks it lost, nor handing them to
/// a child, nor rotating to a later expiry. Sent again, it runs under the token as it is.
#[tokio::test]
async fn a_request_held_across_its_tokens_narrowing_cannot_undo_it() {
    let t = app().await;
    let wide = |name: &str| {
        NewToken::new("alice", name)
            .scopes(["personalAccessToken:*", "x:*"])
            .unwrap()
    };
    let narrow = |id: &str| {
        let at = (Utc::now() + chrono::Duration::hours(1)).to_rfc3339();
        let body = format!(
            r#"{{"scopes": ["personalAccessToken:*"], "expiresAt": "{at}", "ipRestriction": "127.0.0.1"}}"#
        );
        let (app, alice, uri) = (t.app.clone(), t.alice.clone(), format!("{BASE}/{id}"));
        async move {
            let res = patch(&app, &uri, &alice, &body).await;
            assert_eq!(res.status, StatusCode::OK, "{}", res.text);
        }
    };
    let attempts = [
        (
            http::Method::PATCH,
            "{id}",
            r#"{"scopes": ["personalAccessToken:*", "x:*"], "expiresAt": null, "userAwareTokenNeverExpires": true, "ipRestriction": null}"#,
        ),
        (
            http::Method::POST,
            "",
            r#"{"name": "child", "scopes": ["x:*"], "userAwareTokenNeverExpires": true}"#,
        ),
        (
            http::Method::POST,
            "self/rotate",
            r#"{"expiresAt": "2999-01-01T00:00:00Z"}"#,
        ),
    ];
    for (i, (method, path, body)) in attempts.into_iter().enumerate() {
        let (rec, leaked) = t.tokens.issue(wide(&format!("leaked-{i}"))).await.unwrap();
        let uri = match path.replace("{id}", &rec.id) {
            p if p.is_empty() => BASE.to_owned(),
            p => format!("{BASE}/{p}"),
        };
        let (res, release) = held(&t.app, method.clone(), &uri, leaked.expose_secret(), body).await;
        narrow(&rec.id).await;
        release.send(()).unwrap();
        let (status, body) = res.await.unwrap();
        assert_eq!(status, StatusCode::CONFLICT, "{method} {uri}: {body}");
        assert_eq!(body["code"], "conflict");
        let stored = t.store.get(&rec.id).await.unwrap().unwrap();
        assert!(
            !stored.scopes.grants("x:read"),
            "{method} {uri}: scopes came back"
        );
        assert!(
            stored.expires_at.is_some(),
            "{method} {uri}: expiry came back"
        );
        assert_eq!(
            stored.ip_restriction.len(),
            1,
            "{method} {uri}: networks came back"
        );
        assert_eq!(stored.hash, rec.hash, "{method} {uri}: rotated");
        let page = t
            .tokens
            .list(&tower_pat::store::ListQuery::for_subject("alice"))
            .await
            .unwrap();
        assert!(
            page.items.iter().all(|r| r.name != "child"),
            "a child was stored"
        );
    }

    // Sent again (not held), a request runs under the narrowed token: it may rotate, within its
    // new expiry.
    let (rec, leaked) = t.tokens.issue(wide("leaked")).await.unwrap();
    narrow(&rec.id).await;
    let res = post(
        &t.app,
        &format!("{BASE}/self/rotate"),
        leaked.expose_secret(),
        "{}",
    )
    .await;
    assert_eq!(res.status, StatusCode::CREATED, "{}", res.text);
}

/// Enabling a disabled token gives it all its scopes back: like giving scopes, it must fit the
/// caller's ceilings. A short-lived, address-bound sibling holding the token's scopes cannot
/// bring back a never-expiring, unrestricted token its owner disabled.
#[tokio::test]
async fn enabling_a_token_must_fit_the_callers_ceilings() {
    let t = app().await;
    let target = NewToken::new("alice", "disabled")
        .scopes(["x:read"])
        .unwrap();
    let (target, _) = t.tokens.issue(target).await.unwrap();
    let uri = format!("{BASE}/{}", target.id);
    let res = patch(&t.app, &uri, &t.alice, r#"{"active": false}"#).await;
    assert_eq!(res.status, StatusCode::OK, "{}", res.text);

    let short = NewToken::new("alice", "short")
        .scopes(["personalAccessToken:write", "x:read"])
        .unwrap()
        .ip_restriction([parse_ip_net("127.0.0.1").unwrap()])
        .expires_at(Utc::now() + chrono::Duration::hours(1));
    let (_, short) = t.tokens.issue(short).await.unwrap();
    let res = patch(&t.app, &uri, short.expose_secret(), r#"{"active": true}"#).await;
    let message = res.error(403);
    assert!(message.contains("enabled again"), "{message}");
    assert!(
        t.store
            .get(&target.id)
            .await
            .unwrap()
            .unwrap()
            .is_disabled(),
        "still disabled"
    );

    // Disabling needs no ceiling (it takes away), and the owner's unbounded token may enable.
    let res = patch(&t.app, &uri, &t.alice, r#"{"active": true}"#).await;
    assert_eq!(res.status, StatusCode::OK, "{}", res.text);
    let res = patch(&t.app, &uri, short.expose_secret(), r#"{"active": false}"#).await;
    assert_eq!(res.status, StatusCode::OK, "{}", res.text);
}
