//! The list filters `createdAfter`, `createdBefore`, `lastUsedAfter`, `state` and `subject`, and
//! `lastUsed` filters that agree with the views while usage marks are still pending.

mod support_admin;

use std::time::Duration;

use axum::Router;
use chrono::Utc;
use http::StatusCode;
use support_admin::*;
use tower_pat::admin::{self, AdminConfig};
use tower_pat::{MemoryStore, NewToken, Principal, TokenStore, Tokens, UsageConfig};

fn names(res: &Res) -> Vec<String> {
    let mut n: Vec<String> = res
        .body
        .as_array()
        .unwrap_or_else(|| panic!("{}", res.text))
        .iter()
        .map(|t| t["name"].as_str().unwrap().to_owned())
        .collect();
    n.sort();
    n
}

fn q(pairs: &[(&str, &str)]) -> String {
    let query: Vec<String> = pairs
        .iter()
        .map(|(k, v)| format!("{k}={}", v.replace('+', "%2B").replace(':', "%3A")))
        .collect();
    format!("{BASE}?{}", query.join("&"))
}

#[tokio::test]
async fn created_and_state_filters() {
    let t = app().await;
    let make = |name: &'static str| {
        let t = &t;
        async move {
            let res = create(
                &t.app,
                &t.alice,
                &format!(r#"{{"name": "{name}", "expiresAt": "{}"}}"#, in_days(30)),
            )
            .await;
            res.body["id"].as_str().unwrap().to_owned()
        }
    };
    let early = make("early").await;
    tokio::time::sleep(Duration::from_millis(5)).await;
    let mid = Utc::now().to_rfc3339();
    tokio::time::sleep(Duration::from_millis(5)).await;
    let revoked = make("revoked").await;
    let disabled = make("disabled").await;
    let _active = make("active").await;
    patch(
        &t.app,
        &format!("{BASE}/{revoked}"),
        &t.alice,
        r#"{"revoked": true}"#,
    )
    .await;
    patch(
        &t.app,
        &format!("{BASE}/{disabled}"),
        &t.alice,
        r#"{"active": false}"#,
    )
    .await;
    // An expired one, written straight to the store.
    let (rec, _) = t
        .tokens
        .issue(
            NewToken::new("alice", "expired").expires_at(Utc::now() - chrono::Duration::seconds(1)),
        )
        .await
        .unwrap();

    let res = get(&t.app, &q(&[("createdBefore", &mid)]), &t.alice).await;
    assert_eq!(res.status, StatusCode::OK, "{}", res.text);
    assert!(names(&res).contains(&"early".to_owned()));
    assert!(!names(&res).contains(&"revoked".to_owned()));
    let res = get(&t.app, &q(&[("createdAfter", &mid)]), &t.alice).await;
    assert_eq!(names(&res), ["active", "disabled", "expired", "revoked"]);
    assert_eq!(res.headers["x-total-count"], "4");

    for (state, want) in [
        ("revoked", vec!["revoked"]),
        ("disabled", vec!["disabled"]),
        ("expired", vec!["expired"]),
    ] {
        let res = get(&t.app, &q(&[("state", state)]), &t.alice).await;
        assert_eq!(names(&res), want, "state={state}");
    }
    let res = get(
        &t.app,
        &q(&[("state", "active"), ("createdAfter", &mid)]),
        &t.alice,
    )
    .await;
    assert_eq!(names(&res), ["active"]);
    let _ = (early, rec);

    for bad in [
        "state=gone",
        "createdAfter=yesterday",
        "createdBefore=1",
        "lastUsedAfter=soon",
    ] {
        let res = get(&t.app, &format!("{BASE}?{bad}"), &t.alice).await;
        let param = bad.split('=').next().unwrap();
        assert!(
            res.error(400).starts_with(&format!("{param}:")),
            "{bad}: {}",
            res.text
        );
    }
}

#[tokio::test]
async fn subject_is_for_admins_only() {
    let t = app().await;
    issue(&t.tokens, "bob", &["x:read"]).await;
    // alice has personalAccessToken:* (admin included): she may list bob's tokens.
    let res = get(&t.app, &q(&[("subject", "bob")]), &t.alice).await;
    assert_eq!(res.status, StatusCode::OK);
    assert_eq!(res.headers["x-total-count"], "1");
    // A reader without the admin scope may not, by either name.
    let reader = issue(&t.tokens, "alice", &["personalAccessToken:read"]).await;
    for param in ["subject", "ownerId"] {
        let res = get(&t.app, &q(&[(param, "bob")]), &reader).await;
        assert_eq!(res.status, StatusCode::FORBIDDEN, "{param}");
    }
    // Its own subject by name is fine.
    let res = get(&t.app, &q(&[("subject", "alice")]), &reader).await;
    assert_eq!(res.status, StatusCode::OK);
    // Two different subjects in one query: the filters combine and match no token (not one of
    // them silently chosen); the reader may name neither of them but its own.
    let res = get(
        &t.app,
        &q(&[("ownerId", "alice"), ("subject", "bob")]),
        &t.alice,
    )
    .await;
    assert_eq!(res.status, StatusCode::OK, "{}", res.text);
    assert_eq!(res.body, serde_json::json!([]));
    let res = get(
        &t.app,
        &q(&[("ownerId", "alice"), ("subject", "bob")]),
        &reader,
    )
    .await;
    assert_eq!(res.status, StatusCode::FORBIDDEN, "{}", res.text);
}

/// An app whose layer tracks usage but writes it behind only every hour.
async fn app_with_pending_usage() -> (Router, MemoryStore, Tokens, String) {
    let store = MemoryStore::new();
    let tokens = Tokens::new(store.clone());
    let layer = tokens
        .layer()
        .track_usage(
            UsageConfig::default()
                .granularity(Duration::from_millis(1))
                .flush_interval(Duration::from_secs(3600)),
        )
        .build();
    let config = AdminConfig::new(&tokens, &layer).unwrap();
    let app = Router::new().nest(BASE, admin::router(config)).merge(
        Router::new()
            .route(
                "/hello",
                axum::routing::get(|p: Principal| async move { p.subject().to_owned() }),
            )
            .layer(layer),
    );
    let admin = issue(&tokens, "alice", &["personalAccessToken:*"]).await;
    (app, store, tokens, admin)
}

#[tokio::test]
async fn last_used_filters_agree_with_the_views_before_the_marks_are_written() {
    let (app, store, tokens, admin) = app_with_pending_usage().await;
    let (used, secret) = tokens.issue(NewToken::new("alice", "used")).await.unwrap();
    tokens
        .issue(NewToken::new("alice", "unused"))
        .await
        .unwrap();
    let before = Utc::now().to_rfc3339();
    // Marks are stamped with the coarse clock (a few ms behind): use the token clearly after.
    tokio::time::sleep(Duration::from_millis(30)).await;
    assert_eq!(hello(&app, secret.expose_secret()).await, StatusCode::OK);
    // The mark is pending: the store does not have it yet.
    assert!(
        store
            .get(&used.id)
            .await
            .unwrap()
            .unwrap()
            .last_used_at
            .is_none()
    );
    // The view shows it...
    let view = get(&app, &format!("{BASE}/{}", used.id), &admin).await;
    assert!(view.body["lastUsedAt"].is_string());
    // ...and every last-use filter agrees at once.
    let res = get(&app, &q(&[("lastUsed", "never")]), &admin).await;
    assert!(!names(&res).contains(&"used".to_owned()), "{}", res.text);
    assert!(names(&res).contains(&"unused".to_owned()));
    let res = get(&app, &q(&[("lastUsedAfter", &before)]), &admin).await;
    assert!(names(&res).contains(&"used".to_owned()), "{}", res.text);
    assert!(!names(&res).contains(&"unused".to_owned()));
    let res = get(&app, &q(&[("lastUsedBefore", &before)]), &admin).await;
    assert!(!names(&res).contains(&"used".to_owned()));
}
