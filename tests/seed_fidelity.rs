//! The README's seed table, row by row: each seed API's own request, sent as its documentation
//! shows it, to the management API mounted at that seed's own path; what is accepted as sent, what
//! needs a named configuration, and where the answer differs from the seed's.

mod support_admin;

use std::time::Duration;

use axum::Router;
use http::{Method, StatusCode};
use support_admin::{Res, call, hello, in_days, issue};
use tower_pat::admin::{self, AdminConfig, ExpiryPolicy};
use tower_pat::{MemoryStore, Principal, Tokens};

/// The management API nested at `path` (the seed's own), `/hello` behind the layer, and a token of
/// `alice` that may manage tokens.
async fn mounted_at(
    path: &str,
    configure: impl FnOnce(AdminConfig) -> AdminConfig,
) -> (Router, String) {
    let tokens = Tokens::new(MemoryStore::new());
    let layer = tokens
        .layer()
        .track_usage(tower_pat::UsageConfig::default())
        .build();
    let config = configure(AdminConfig::new(&tokens, &layer).unwrap());
    let app = Router::new().nest(path, admin::router(config)).merge(
        Router::new()
            .route(
                "/hello",
                axum::routing::get(|p: Principal| async move { p.subject().to_owned() }),
            )
            .layer(layer),
    );
    let alice = issue(&tokens, "alice", &["personalAccessToken:*", "x:*"]).await;
    (app, alice)
}

async fn send(app: &Router, method: Method, uri: &str, token: &str, body: Option<&str>) -> Res {
    call(app, method, uri, Some(token), body).await
}

// ---- SailPoint: POST /personal-access-tokens ----

#[tokio::test]
async fn sailpoint_rows() {
    let (app, alice) = mounted_at("/personal-access-tokens", |c| c).await;
    let base = "/personal-access-tokens";
    // As sent: `scope`, `expirationDate`.
    let body = format!(
        r#"{{"name": "NodeJS Integration", "scope": ["x:read"], "expirationDate": "{}"}}"#,
        in_days(60)
    );
    let res = send(&app, Method::POST, base, &alice, Some(&body)).await;
    assert_eq!(res.status, StatusCode::CREATED, "{}", res.text);
    assert_eq!(res.body["scopes"], serde_json::json!(["x:read"]));
    let secret = res.body["secret"].as_str().unwrap();
    assert_eq!(hello(&app, secret).await, StatusCode::OK);
    // As sent: no expirationDate, with the acknowledgment.
    let res = send(
        &app,
        Method::POST,
        base,
        &alice,
        Some(r#"{"name": "Forever", "scope": ["x:read"], "userAwareTokenNeverExpires": true}"#),
    )
    .await;
    assert_eq!(res.status, StatusCode::CREATED, "{}", res.text);
    assert!(res.body["expiresAt"].is_null());
    // SailPoint's required validation: no expirationDate and no acknowledgment is a 400.
    for body in [
        r#"{"name": "Nope", "expirationDate": null}"#,
        r#"{"name": "Nope", "userAwareTokenNeverExpires": false}"#,
    ] {
        let res = send(&app, Method::POST, base, &alice, Some(body)).await;
        assert!(res.error(400).contains("userAwareTokenNeverExpires"));
    }
}

// ---- Unleash: POST /api/admin/user/tokens ----

#[tokio::test]
async fn unleash_rows() {
    let base = "/api/admin/user/tokens";
    let (app, alice) = mounted_at(base, |c| c).await;
    // As sent, with the server-set fields a client may echo (ignored, as Unleash documents).
    let body = format!(
        r#"{{"description": "my-token", "expiresAt": "{}", "id": 7, "secret": "x",
            "createdAt": "2001-01-01T00:00:00Z", "seenAt": null}}"#,
        in_days(10)
    );
    let res = send(&app, Method::POST, base, &alice, Some(&body)).await;
    assert_eq!(res.status, StatusCode::CREATED, "{}", res.text);
    let id = res.body["id"].as_str().expect("id is a string here");
    assert_eq!(res.headers["location"], format!("{base}/{id}"));
    assert_ne!(res.body["createdAt"], "2001-01-01T00:00:00Z");
    assert!(res.body["seenAt"].is_null());
    assert!(res.body["expiresAt"].is_string());
    // Differs: `id` is a string, not Unleash's integer.
    assert!(res.body["id"].as_i64().is_none());
    let secret = res.body["secret"].as_str().unwrap();
    assert_eq!(hello(&app, secret).await, StatusCode::OK);
    // seenAt follows use (written behind; a GET merges what is pending).
    let res = send(&app, Method::GET, &format!("{base}/{id}"), &alice, None).await;
    assert_eq!(res.status, StatusCode::OK);
    assert_eq!(res.body["name"], "my-token");
    assert!(res.body["seenAt"].is_string(), "{}", res.text);
    assert_eq!(res.body["seenAt"], res.body["lastUsedAt"]);
}

// ---- Avisi Cloud: provision, list, revoke ----

#[tokio::test]
async fn avisi_rows() {
    let base = "/personal-access-tokens";
    let provision = r#"{"name": "ci", "ipRestriction": "127.0.0.1/32", "type": "service"}"#;
    // Needs a setting: Avisi's body has no expiry field, so the default policy refuses it...
    let (app, alice) = mounted_at(base, |c| c).await;
    let res = send(&app, Method::POST, base, &alice, Some(provision)).await;
    assert!(res.error(400).contains("userAwareTokenNeverExpires"));
    // ...and ExpiryPolicy::DefaultLifetime accepts it as sent.
    let (app, alice) = mounted_at(base, |c| {
        c.expiry_policy(ExpiryPolicy::DefaultLifetime(Duration::from_secs(
            90 * 86_400,
        )))
    })
    .await;
    let res = send(&app, Method::POST, base, &alice, Some(provision)).await;
    // Differs: 201 (Avisi answers 200), `ipRestriction` a list, the expiry in `expiresAt`.
    assert_eq!(res.status, StatusCode::CREATED, "{}", res.text);
    assert_eq!(
        res.body["ipRestriction"],
        serde_json::json!(["127.0.0.1/32"])
    );
    assert!(res.body["expiresAt"].is_string());
    assert!(res.body.get("expireAt").is_none());
    // As Avisi: active, type, subject, token.
    assert_eq!(res.body["active"], true);
    assert_eq!(res.body["type"], "service");
    assert_eq!(res.body["subject"], "alice");
    let token = res.body["token"].as_str().unwrap().to_owned();
    let id = res.body["id"].as_str().unwrap().to_owned();
    assert_eq!(hello(&app, &token).await, StatusCode::OK);
    // `expireAt` is accepted in a request, as an alias.
    let res = send(
        &app,
        Method::POST,
        base,
        &alice,
        Some(&format!(
            r#"{{"name": "ci-2", "expireAt": "{}"}}"#,
            in_days(3)
        )),
    )
    .await;
    assert_eq!(res.status, StatusCode::CREATED, "{}", res.text);
    // Differs: `type` is a string; Avisi's object type (its shape unpublished) is refused.
    let res = send(
        &app,
        Method::POST,
        base,
        &alice,
        Some(r#"{"name": "ci-3", "type": {"name": "service"}}"#),
    )
    .await;
    assert!(res.error(400).starts_with("type:"), "{}", res.text);
    // As Avisi: the list is a JSON array of tokens.
    let res = send(&app, Method::GET, base, &alice, None).await;
    assert_eq!(res.status, StatusCode::OK);
    assert!(res.body.as_array().unwrap().iter().any(|t| t["id"] == id));
    // As Avisi: revoke is DELETE /{id}, 200 with {"message", "status"}.
    let res = send(&app, Method::DELETE, &format!("{base}/{id}"), &alice, None).await;
    assert_eq!(res.status, StatusCode::OK);
    assert_eq!(
        res.body,
        serde_json::json!({"message": "Personal access token revoked", "status": 200})
    );
    assert_eq!(hello(&app, &token).await, StatusCode::UNAUTHORIZED);
}

// ---- Cryptlex: POST /v3/personal-access-tokens ----

#[tokio::test]
async fn cryptlex_rows() {
    let base = "/v3/personal-access-tokens";
    let (app, alice) = mounted_at(base, |c| c).await;
    // The documentation's own request example asks for a revoked token: refused, nothing stored.
    let example = r#"{"name": "string", "revoked": true, "expiresAt": "2019-08-24T14:15:22Z", "scopes": ["string"]}"#;
    let res = send(&app, Method::POST, base, &alice, Some(example)).await;
    assert_eq!(res.error(400), "revoked: a token cannot be created revoked");
    // With `revoked: false` and a future expiry, as sent: 201 with `accessToken`.
    let body = format!(
        r#"{{"name": "string", "revoked": false, "expiresAt": "{}", "scopes": ["x:read"]}}"#,
        in_days(5)
    );
    let res = send(&app, Method::POST, base, &alice, Some(&body)).await;
    assert_eq!(res.status, StatusCode::CREATED, "{}", res.text);
    let secret = res.body["accessToken"].as_str().unwrap().to_owned();
    let id = res.body["id"].as_str().unwrap().to_owned();
    assert_eq!(hello(&app, &secret).await, StatusCode::OK);
    // A past expiresAt (the example's 2019 date) is a 400, not a token born expired.
    let res = send(
        &app,
        Method::POST,
        base,
        &alice,
        Some(r#"{"name": "old", "expiresAt": "2019-08-24T14:15:22Z"}"#),
    )
    .await;
    assert!(res.error(400).starts_with("expiresAt:"), "{}", res.text);
    // As Cryptlex: PATCH {"revoked": true} revokes.
    let res = send(
        &app,
        Method::PATCH,
        &format!("{base}/{id}"),
        &alice,
        Some(r#"{"revoked": true}"#),
    )
    .await;
    assert_eq!(res.status, StatusCode::OK, "{}", res.text);
    assert_eq!(res.body["revoked"], true);
    assert_eq!(hello(&app, &secret).await, StatusCode::UNAUTHORIZED);
}
