//! Self-service: `POST /self/rotate` and `DELETE /self` (GitLab's self-rotation and
//! self-revocation). Any token may replace or revoke itself, and nothing else: no other token, no
//! wider secret, not with a secret already rotated away.

mod support_admin;

use http::{Method, StatusCode};
use support_admin::*;
use tower_pat::{NewToken, TokenStore};

/// A token of alice's with only `x:read` (no management scope), expiring in 30 days.
async fn ci(t: &TestApp) -> (String, String) {
    let new = NewToken::new("alice", "ci")
        .scopes(["x:read"])
        .unwrap()
        .expires_at(chrono::Utc::now() + chrono::Duration::days(30));
    let (record, secret) = t.tokens.issue(new).await.unwrap();
    (record.id, secret.expose_secret().to_owned())
}

#[tokio::test]
async fn a_token_without_scopes_rotates_itself_and_the_old_secret_stops() {
    let t = app().await;
    let (id, old) = ci(&t).await;
    let res = post(&t.app, &format!("{BASE}/self/rotate"), &old, "").await;
    assert_eq!(res.status, StatusCode::CREATED, "{}", res.text);
    assert_eq!(res.body["id"], id.as_str());
    let new = res.body["token"].as_str().unwrap().to_owned();
    assert_ne!(new, old);
    assert_eq!(res.body["scopes"], serde_json::json!(["x:read"]));
    assert_eq!(hello(&t.app, &old).await, StatusCode::UNAUTHORIZED);
    assert_eq!(hello(&t.app, &new).await, StatusCode::OK);
    // It still cannot manage anything else.
    let res = get(&t.app, BASE, &new).await;
    assert_eq!(res.status, StatusCode::FORBIDDEN);
}

#[tokio::test]
async fn a_self_rotation_cannot_widen_or_lengthen_the_token() {
    let t = app().await;
    let (id, secret) = ci(&t).await;
    let before = t.store.get(&id).await.unwrap().unwrap();
    for (body, status) in [
        (r#"{"scopes": ["*"]}"#, StatusCode::BAD_REQUEST),
        (r#"{"ipRestriction": "0.0.0.0/0"}"#, StatusCode::BAD_REQUEST),
        (
            format!(r#"{{"expiresAt": "{}"}}"#, in_days(365)).leak() as &str,
            StatusCode::FORBIDDEN,
        ),
        (
            r#"{"expiresAt": null, "userAwareTokenNeverExpires": true}"#,
            StatusCode::BAD_REQUEST,
        ),
    ] {
        let res = post(&t.app, &format!("{BASE}/self/rotate"), &secret, body).await;
        assert_eq!(res.status, status, "{body}: {}", res.text);
    }
    assert_eq!(
        t.store.get(&id).await.unwrap().unwrap(),
        before,
        "nothing changed"
    );
    // A shorter expiry is fine.
    let res = post(
        &t.app,
        &format!("{BASE}/self/rotate"),
        &secret,
        &format!(r#"{{"expiresAt": "{}"}}"#, in_days(1)),
    )
    .await;
    assert_eq!(res.status, StatusCode::CREATED, "{}", res.text);
}

#[tokio::test]
async fn a_secret_in_its_grace_period_can_neither_rotate_nor_revoke_the_token() {
    let t = app().await;
    let (id, old) = ci(&t).await;
    let res = post(
        &t.app,
        &format!("{BASE}/self/rotate"),
        &old,
        r#"{"gracePeriodSeconds": 3600}"#,
    )
    .await;
    assert_eq!(res.status, StatusCode::CREATED, "{}", res.text);
    let new = res.body["token"].as_str().unwrap().to_owned();
    // The old secret still authenticates during the grace period...
    assert_eq!(hello(&t.app, &old).await, StatusCode::OK);
    // ...but cannot take the token over: a leaked old secret must not rotate the new one away.
    let res = post(&t.app, &format!("{BASE}/self/rotate"), &old, "").await;
    assert_eq!(res.status, StatusCode::FORBIDDEN, "{}", res.text);
    let res = call(
        &t.app,
        Method::DELETE,
        &format!("{BASE}/self"),
        Some(&old),
        None,
    )
    .await;
    assert_eq!(res.status, StatusCode::FORBIDDEN, "{}", res.text);
    assert!(!t.store.get(&id).await.unwrap().unwrap().is_revoked());
    assert_eq!(hello(&t.app, &new).await, StatusCode::OK);
}

#[tokio::test]
async fn a_token_revokes_itself_for_good() {
    let t = app().await;
    let (id, secret) = ci(&t).await;
    let other = issue(&t.tokens, "alice", &["x:read"]).await;
    let res = call(
        &t.app,
        Method::DELETE,
        &format!("{BASE}/self"),
        Some(&secret),
        None,
    )
    .await;
    assert_eq!(res.status, StatusCode::NO_CONTENT, "{}", res.text);
    assert_eq!(res.headers["cache-control"], "no-store");
    assert!(t.store.get(&id).await.unwrap().unwrap().is_revoked());
    let res = get(&t.app, "/hello", &secret).await;
    assert_eq!(res.status, StatusCode::UNAUTHORIZED);
    assert_eq!(res.body["message"], "the access token has been revoked");
    // Only itself: the subject's other token is untouched.
    assert_eq!(hello(&t.app, &other).await, StatusCode::OK);
    // And it cannot come back by rotating.
    let res = post(&t.app, &format!("{BASE}/self/rotate"), &secret, "").await;
    assert_eq!(res.status, StatusCode::UNAUTHORIZED);
}

#[tokio::test]
async fn concurrent_self_rotations_hand_out_one_working_secret() {
    for _ in 0..10 {
        let t = app().await;
        let (id, secret) = ci(&t).await;
        let uri = format!("{BASE}/self/rotate");
        let (a, b) = tokio::join!(
            post(&t.app, &uri, &secret, ""),
            post(&t.app, &uri, &secret, "")
        );
        let winners: Vec<_> = [&a, &b]
            .into_iter()
            .filter(|r| r.status == StatusCode::CREATED)
            .collect();
        assert!(!winners.is_empty(), "{} {}", a.text, b.text);
        for r in [&a, &b] {
            assert!(
                [201, 401, 403, 409].contains(&r.status.as_u16()),
                "{}: {}",
                r.status,
                r.text
            );
        }
        // Exactly the stored hash's secret works: a secret the store did not keep never does.
        let stored = t.store.get(&id).await.unwrap().unwrap();
        let working: Vec<_> = winners
            .iter()
            .map(|r| r.body["token"].as_str().unwrap().to_owned())
            .filter(|s| t.tokens.hasher().hash(s) == stored.hash)
            .collect();
        assert_eq!(working.len(), 1);
        for w in &winners {
            let s = w.body["token"].as_str().unwrap();
            let expect = if working.contains(&s.to_owned()) {
                StatusCode::OK
            } else {
                StatusCode::UNAUTHORIZED
            };
            assert_eq!(hello(&t.app, s).await, expect);
        }
    }
}

/// A token cannot have itself rotated as fast as it can send requests (each rotation is a store
/// write, an event and a notification to every node): by default ten rotations of one token a
/// minute, then 429 with `Retry-After`, whoever asks, and nothing changes. Counted per token: a
/// sibling of the same subject still rotates, and the limit can be turned off.
#[tokio::test]
async fn a_token_cannot_rotate_itself_without_limit() {
    let t = app().await;
    let (id, mut secret) = ci(&t).await;
    for _ in 0..10 {
        let res = post(&t.app, &format!("{BASE}/self/rotate"), &secret, "").await;
        assert_eq!(res.status, StatusCode::CREATED, "{}", res.text);
        secret = res.body["token"].as_str().unwrap().to_owned();
    }
    let before = t.store.get(&id).await.unwrap().unwrap();
    let res = post(&t.app, &format!("{BASE}/self/rotate"), &secret, "").await;
    let retry = res.too_many();
    assert!((1..=60).contains(&retry), "{retry}");
    // Nor through its id, by a caller who may rotate it.
    let res = post(&t.app, &format!("{BASE}/{id}/rotate"), &t.alice, "").await;
    assert!((1..=60).contains(&res.too_many()));
    assert_eq!(t.store.get(&id).await.unwrap().unwrap(), before);
    assert_eq!(hello(&t.app, &secret).await, StatusCode::OK);
    // A sibling has its own count.
    let new = NewToken::new("alice", "ci-2").scopes(["x:read"]).unwrap();
    let (_, sibling) = t.tokens.issue(new).await.unwrap();
    let sibling = sibling.expose_secret().to_owned();
    let res = post(&t.app, &format!("{BASE}/self/rotate"), &sibling, "").await;
    assert_eq!(res.status, StatusCode::CREATED, "{}", res.text);

    // Off: no limit.
    let t = app_with(|c| c.rotation_rate_limit(0, std::time::Duration::from_secs(60))).await;
    let (_, mut secret) = ci(&t).await;
    for _ in 0..15 {
        let res = post(&t.app, &format!("{BASE}/self/rotate"), &secret, "").await;
        assert_eq!(res.status, StatusCode::CREATED, "{}", res.text);
        secret = res.body["token"].as_str().unwrap().to_owned();
    }
}
