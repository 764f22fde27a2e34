//! Reversible disable (`PATCH {"active": false}` / `{"active": true}`): the layer refuses a
//! disabled token at once, with its own message, and accepts it again at once when it is enabled,
//! negative cache or not; revocation stays permanent; and a stale or racing change never undoes
//! another.

mod support_admin;

use http::StatusCode;
use support_admin::*;
use tower_pat::TokenStore;

/// A never-expiring token of alice's with `x:read`, its id and secret.
async fn target(t: &TestApp) -> (String, String) {
    let res = create(
        &t.app,
        &t.alice,
        r#"{"name": "target", "scopes": ["x:read"], "userAwareTokenNeverExpires": true}"#,
    )
    .await;
    (
        res.body["id"].as_str().unwrap().to_owned(),
        res.body["token"].as_str().unwrap().to_owned(),
    )
}

#[tokio::test]
async fn a_disabled_token_is_refused_at_once_and_accepted_again_when_enabled() {
    let t = app().await;
    let (id, secret) = target(&t).await;
    let uri = format!("{BASE}/{id}");
    assert_eq!(hello(&t.app, &secret).await, StatusCode::OK);

    let res = patch(&t.app, &uri, &t.alice, r#"{"active": false}"#).await;
    assert_eq!(res.status, StatusCode::OK, "{}", res.text);
    assert_eq!(res.body["active"], false);
    assert_eq!(res.body["disabled"], true);
    assert!(res.body["disabledAt"].is_string());
    // The very next request, although the token was cached: refused, and told why.
    let res = get(&t.app, "/hello", &secret).await;
    assert_eq!(res.status, StatusCode::UNAUTHORIZED);
    assert_eq!(res.body["message"], "the access token is disabled");
    // Refused again from the negative cache.
    assert_eq!(hello(&t.app, &secret).await, StatusCode::UNAUTHORIZED);
    // Disabling again changes nothing.
    let again = patch(&t.app, &uri, &t.alice, r#"{"active": false}"#).await;
    assert_eq!(again.status, StatusCode::OK);
    assert_eq!(again.body["disabledAt"], res_disabled_at(&t, &id).await);

    let res = patch(&t.app, &uri, &t.alice, r#"{"active": true}"#).await;
    assert_eq!(res.status, StatusCode::OK, "{}", res.text);
    assert_eq!(res.body["active"], true);
    assert_eq!(res.body["disabled"], false);
    // The negative cache must not keep the enabled token out.
    assert_eq!(hello(&t.app, &secret).await, StatusCode::OK);
}

async fn res_disabled_at(t: &TestApp, id: &str) -> serde_json::Value {
    get(&t.app, &format!("{BASE}/{id}"), &t.alice).await.body["disabledAt"].clone()
}

#[tokio::test]
async fn revocation_stays_permanent() {
    let t = app().await;
    let (id, secret) = target(&t).await;
    let uri = format!("{BASE}/{id}");
    patch(&t.app, &uri, &t.alice, r#"{"active": false}"#).await;
    let res = patch(&t.app, &uri, &t.alice, r#"{"revoked": true}"#).await;
    assert_eq!(res.status, StatusCode::OK);
    let res = patch(&t.app, &uri, &t.alice, r#"{"active": true}"#).await;
    assert_eq!(
        res.error(410),
        "the token is revoked: it cannot be changed or rotated"
    );
    let res = patch(&t.app, &uri, &t.alice, r#"{"active": false}"#).await;
    assert_eq!(res.status, StatusCode::GONE, "{}", res.text);
    let stored = t.store.get(&id).await.unwrap().unwrap();
    assert!(stored.is_revoked());
    let res = get(&t.app, "/hello", &secret).await;
    assert_eq!(res.body["message"], "the access token has been revoked");
}

#[tokio::test]
async fn a_disabled_token_cannot_enable_itself_or_manage_anything() {
    let t = app().await;
    // A token that could manage tokens, disabled by alice's main token.
    let res = create(
        &t.app,
        &t.alice,
        r#"{"name": "admin2", "scopes": ["personalAccessToken:*", "x:*"], "userAwareTokenNeverExpires": true}"#,
    )
    .await;
    let (id, secret) = (
        res.body["id"].as_str().unwrap().to_owned(),
        res.body["token"].as_str().unwrap().to_owned(),
    );
    let uri = format!("{BASE}/{id}");
    patch(&t.app, &uri, &t.alice, r#"{"active": false}"#).await;
    let res = patch(&t.app, &uri, &secret, r#"{"active": true}"#).await;
    assert_eq!(res.status, StatusCode::UNAUTHORIZED);
    let res = post(
        &t.app,
        BASE,
        &secret,
        r#"{"name": "escape", "userAwareTokenNeverExpires": true}"#,
    )
    .await;
    assert_eq!(res.status, StatusCode::UNAUTHORIZED);
    assert!(t.store.get(&id).await.unwrap().unwrap().is_disabled());
}

#[tokio::test]
async fn a_token_lacking_the_targets_scopes_cannot_enable_it() {
    let t = app().await;
    let (id, _) = target(&t).await;
    let uri = format!("{BASE}/{id}");
    patch(&t.app, &uri, &t.alice, r#"{"active": false}"#).await;
    // A write token of alice's without x:read may not act on a token holding x:read.
    let weak = issue(
        &t.tokens,
        "alice",
        &["personalAccessToken:write", "personalAccessToken:read"],
    )
    .await;
    let res = patch(&t.app, &uri, &weak, r#"{"active": true}"#).await;
    assert_eq!(res.status, StatusCode::FORBIDDEN, "{}", res.text);
    assert!(t.store.get(&id).await.unwrap().unwrap().is_disabled());
}

#[tokio::test]
async fn racing_disable_and_enable_never_lose_a_revocation() {
    for _ in 0..20 {
        let t = app().await;
        let (id, secret) = target(&t).await;
        let uri = format!("{BASE}/{id}");
        let (a, b, c) = tokio::join!(
            patch(&t.app, &uri, &t.alice, r#"{"active": false}"#),
            patch(&t.app, &uri, &t.alice, r#"{"revoked": true}"#),
            patch(&t.app, &uri, &t.alice, r#"{"active": true}"#),
        );
        for r in [&a, &b, &c] {
            assert!(
                [200, 400, 409, 410].contains(&r.status.as_u16()),
                "{}: {}",
                r.status,
                r.text
            );
        }
        let stored = t.store.get(&id).await.unwrap().unwrap();
        if b.status == StatusCode::OK {
            assert!(stored.is_revoked(), "a reported revocation was lost");
            assert_eq!(hello(&t.app, &secret).await, StatusCode::UNAUTHORIZED);
        }
        // Whatever the order, the layer agrees with the store.
        let expect = if stored.is_revoked() || stored.is_disabled() {
            StatusCode::UNAUTHORIZED
        } else {
            StatusCode::OK
        };
        assert_eq!(hello(&t.app, &secret).await, expect);
    }
}
