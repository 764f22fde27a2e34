//! List, get, self, update, revoke, rotate and delete, with the scopes that guard them, and the
//! rule that every change applies to the very next request.

#[cfg(feature = "postgres")]
mod common;
mod support_admin;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use chrono::{DateTime, Utc};
use http::{Method, StatusCode};
use support_admin::*;
use tower_pat::{NewToken, StoreError, TokenLookup, TokenStore, Tokens, UsageUpdate};

fn names(res: &Res) -> Vec<&str> {
    res.body
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t["name"].as_str().unwrap())
        .collect()
}

/// Creates a never-expiring token named `name` through the API; returns (id, secret).
async fn make(t: &TestApp, name: &str, extra: &str) -> (String, String) {
    let res = create(
        &t.app,
        &t.alice,
        &format!(r#"{{"name": "{name}", "userAwareTokenNeverExpires": true {extra}}}"#),
    )
    .await;
    (
        res.body["id"].as_str().unwrap().to_owned(),
        res.body["token"].as_str().unwrap().to_owned(),
    )
}

#[tokio::test]
async fn list_pages_sorts_filters_and_counts() {
    let t = app().await;
    let mut ids = Vec::new();
    for (name, days) in [("delta", 3), ("alpha", 50), ("charlie", 9), ("bravo", 1)] {
        let res = create(
            &t.app,
            &t.alice,
            &format!(r#"{{"name": "{name}", "expiresAt": "{}"}}"#, in_days(days)),
        )
        .await;
        ids.push(res.body["id"].as_str().unwrap().to_owned());
    }
    // Another subject's token never shows up in alice's list.
    issue(&t.tokens, "bob", &["personalAccessToken:*"]).await;

    let res = get(&t.app, BASE, &t.alice).await;
    assert_eq!(res.status, StatusCode::OK);
    assert_eq!(res.headers["x-total-count"], "5");
    assert_eq!(&names(&res)[1..], ["delta", "alpha", "charlie", "bravo"]);

    let res = get(&t.app, &format!("{BASE}?sort=name&limit=2"), &t.alice).await;
    assert_eq!(names(&res), ["alpha", "bravo"]);
    assert_eq!(res.headers["x-total-count"], "5");
    let res = get(
        &t.app,
        &format!("{BASE}?sort=name&limit=2&page=2"),
        &t.alice,
    )
    .await;
    assert_eq!(names(&res)[0], "charlie");
    let res = get(
        &t.app,
        &format!("{BASE}?sort=name&limit=2&page=9"),
        &t.alice,
    )
    .await;
    assert!(names(&res).is_empty());
    assert_eq!(res.headers["x-total-count"], "5");

    let res = get(&t.app, &format!("{BASE}?sort=-createdAt&limit=1"), &t.alice).await;
    assert_eq!(names(&res), ["bravo"]);
    let res = get(&t.app, &format!("{BASE}?sort=expiresAt"), &t.alice).await;
    assert_eq!(&names(&res)[..4], ["bravo", "delta", "charlie", "alpha"]);
    let res = get(&t.app, &format!("{BASE}?search=HAR"), &t.alice).await;
    assert_eq!(names(&res), ["charlie"]);
    assert_eq!(res.headers["x-total-count"], "1");

    // Usage: alpha used long ago, charlie recently; the rest never.
    let now = Utc::now();
    t.store
        .record_usage(&[
            UsageUpdate::new(&ids[1], now - chrono::Duration::days(40), vec![]),
            UsageUpdate::new(&ids[2], now - chrono::Duration::hours(1), vec![]),
        ])
        .await
        .unwrap();
    let res = get(
        &t.app,
        &format!("{BASE}?lastUsed=never&sort=name"),
        &t.alice,
    )
    .await;
    assert_eq!(&names(&res)[..2], ["bravo", "delta"]);
    assert_eq!(res.headers["x-total-count"], "3");
    let before = (now - chrono::Duration::days(1)).to_rfc3339();
    let query = form_query(&[("lastUsedBefore", &before), ("sort", "name")]);
    let res = get(&t.app, &format!("{BASE}?{query}"), &t.alice).await;
    assert_eq!(&names(&res)[..3], ["alpha", "bravo", "delta"]);
    let res = get(
        &t.app,
        &format!("{BASE}?sort=-lastUsedAt&limit=2"),
        &t.alice,
    )
    .await;
    assert_eq!(names(&res), ["charlie", "alpha"]);
    assert!(res.body[0]["lastUsedAt"].is_string());
    assert_eq!(res.body[0]["lastUsedAt"], res.body[0]["seenAt"]);

    for bad in [
        "limit=0",
        "limit=101",
        "limit=x",
        "page=0",
        "sort=size",
        "lastUsed=yesterday",
        "lastUsedBefore=soon",
    ] {
        let res = get(&t.app, &format!("{BASE}?{bad}"), &t.alice).await;
        let param = bad.split('=').next().unwrap();
        assert!(res.error(400).starts_with(&format!("{param}:")), "{bad}");
    }
    let res = get(&t.app, &format!("{BASE}?limit=100"), &t.alice).await;
    assert_eq!(res.status, StatusCode::OK);
}

fn form_query(pairs: &[(&str, &str)]) -> String {
    pairs
        .iter()
        .map(|(k, v)| format!("{k}={}", v.replace('+', "%2B").replace(':', "%3A")))
        .collect::<Vec<_>>()
        .join("&")
}

#[tokio::test]
async fn the_default_page_size_is_50_and_configurable() {
    let t = app_with(|c| c.creation_rate_limit(0, Duration::from_secs(1))).await;
    for i in 0..55 {
        make(&t, &format!("t{i}"), "").await;
    }
    let res = get(&t.app, BASE, &t.alice).await;
    assert_eq!(res.body.as_array().unwrap().len(), 50);
    assert_eq!(res.headers["x-total-count"], "56");
    let t = app_with(|c| c.default_page_size(3)).await;
    for i in 0..4 {
        make(&t, &format!("t{i}"), "").await;
    }
    let res = get(&t.app, BASE, &t.alice).await;
    assert_eq!(res.body.as_array().unwrap().len(), 3);
}

#[tokio::test]
async fn other_subjects_tokens_need_the_admin_scope() {
    let t = app().await;
    let bob = issue(
        &t.tokens,
        "bob",
        &["personalAccessToken:read", "personalAccessToken:write"],
    )
    .await;
    let (id, _) = make(&t, "alices", "").await;

    // Without the admin scope: 404 for a single token, 403 for a listing.
    let uri = format!("{BASE}/{id}");
    get(&t.app, &uri, &bob).await.error(404);
    patch(&t.app, &uri, &bob, r#"{"name": "stolen"}"#)
        .await
        .error(404);
    post(&t.app, &format!("{uri}/rotate"), &bob, "")
        .await
        .error(404);
    call(&t.app, Method::DELETE, &uri, Some(&bob), None)
        .await
        .error(404);
    let res = get(&t.app, &format!("{BASE}?ownerId=alice"), &bob).await;
    assert!(res.error(403).starts_with("ownerId:"));
    // ownerId naming oneself needs nothing more.
    let res = get(&t.app, &format!("{BASE}?ownerId=bob"), &bob).await;
    assert_eq!(res.headers["x-total-count"], "1");
    assert_eq!(t.store.get(&id).await.unwrap().unwrap().name, "alices");

    // With it (here through `personalAccessToken:*`, and through `*`).
    for admin in [
        issue(&t.tokens, "root", &["personalAccessToken:*"]).await,
        issue(&t.tokens, "root", &["*"]).await,
    ] {
        let res = get(&t.app, &format!("{BASE}?ownerId=alice"), &admin).await;
        assert_eq!(res.headers["x-total-count"], "2");
        assert_eq!(get(&t.app, &uri, &admin).await.body["subject"], "alice");
    }
    let admin = issue(
        &t.tokens,
        "root",
        &[
            "personalAccessToken:read",
            "personalAccessToken:write",
            "personalAccessToken:admin",
        ],
    )
    .await;
    let res = patch(&t.app, &uri, &admin, r#"{"name": "renamed"}"#).await;
    assert_eq!(res.body["name"], "renamed");
    assert_eq!(res.body["subject"], "alice");
    let res = call(&t.app, Method::DELETE, &uri, Some(&admin), None).await;
    assert_eq!(res.status, StatusCode::OK);
    get(&t.app, "/personal-access-tokens/no-such-id", &t.alice)
        .await
        .error(404);
}

#[tokio::test]
async fn reads_need_read_and_changes_need_write() {
    let t = app().await;
    let (id, _) = make(&t, "target", "").await;
    let uri = format!("{BASE}/{id}");
    let reader = issue(&t.tokens, "alice", &["personalAccessToken:read"]).await;
    let writer = issue(&t.tokens, "alice", &["personalAccessToken:write"]).await;
    let other = issue(&t.tokens, "alice", &["repo:read"]).await;

    for token in [&reader, &t.alice] {
        assert_eq!(get(&t.app, BASE, token).await.status, StatusCode::OK);
        assert_eq!(get(&t.app, &uri, token).await.status, StatusCode::OK);
        assert_eq!(
            get(&t.app, &format!("{BASE}/self"), token).await.status,
            StatusCode::OK
        );
    }
    for token in [&writer, &other] {
        for u in [BASE.to_owned(), uri.clone(), format!("{BASE}/self")] {
            let res = get(&t.app, &u, token).await;
            res.error(403);
            assert_eq!(res.body["code"], "insufficient_scope");
        }
    }
    for token in [&reader, &other] {
        patch(&t.app, &uri, token, r#"{"name": "x"}"#)
            .await
            .error(403);
        post(&t.app, &format!("{uri}/rotate"), token, "")
            .await
            .error(403);
        call(&t.app, Method::DELETE, &uri, Some(token), None)
            .await
            .error(403);
    }
    assert_eq!(t.store.get(&id).await.unwrap().unwrap().name, "target");
    let res = patch(&t.app, &uri, &writer, r#"{"name": "x"}"#).await;
    assert_eq!(res.status, StatusCode::OK);
    for u in [BASE.to_owned(), uri.clone()] {
        call(&t.app, Method::GET, &u, None, None).await.error(401);
    }
}

#[tokio::test]
async fn self_is_the_token_of_the_request_with_its_last_use() {
    let t = app().await;
    let (id, secret) = make(&t, "me", r#", "scopes": ["personalAccessToken:read"]"#).await;
    let used = Utc::now() - chrono::Duration::minutes(5);
    t.store
        .record_usage(&[UsageUpdate::new(
            &id,
            used,
            vec!["192.0.2.1".parse().unwrap()],
        )])
        .await
        .unwrap();
    let res = get(&t.app, &format!("{BASE}/self"), &secret).await;
    assert_eq!(res.status, StatusCode::OK, "{}", res.text);
    assert_eq!(res.body["id"], id.as_str());
    assert_eq!(res.body["name"], "me");
    assert_eq!(time(&res.body["lastUsedAt"]), used);
    assert_eq!(res.body["seenAt"], res.body["lastUsedAt"]);
    assert_eq!(res.body["lastUsedIps"], serde_json::json!(["192.0.2.1"]));
    assert!(!res.text.contains(&secret));
}

#[tokio::test]
async fn patch_changes_only_the_fields_given_and_applies_at_once() {
    let t = app().await;
    let (id, secret) = make(
        &t,
        "old",
        r#", "scopes": ["x:read", "personalAccessToken:read"], "type": "ci""#,
    )
    .await;
    let uri = format!("{BASE}/{id}");
    assert_eq!(
        get(&t.app, "/needs-x", &secret).await.status,
        StatusCode::OK
    );

    // Name only: everything else stays.
    let before = get(&t.app, &uri, &t.alice).await.body;
    let res = patch(&t.app, &uri, &t.alice, r#"{"name": "new"}"#).await;
    assert_eq!(res.body["name"], "new");
    for f in [
        "scopes",
        "type",
        "expiresAt",
        "ipRestriction",
        "createdAt",
        "start",
    ] {
        assert_eq!(res.body[f], before[f], "{f}");
    }
    assert!(time(&res.body["updatedAt"]) > time(&before["updatedAt"]));

    // An empty patch changes nothing.
    let res = patch(&t.app, &uri, &t.alice, "{}").await;
    assert_eq!(
        res.body["updatedAt"],
        get(&t.app, &uri, &t.alice).await.body["updatedAt"]
    );

    // Dropping a scope applies to the very next request.
    let res = patch(
        &t.app,
        &uri,
        &t.alice,
        r#"{"scope": ["personalAccessToken:read"]}"#,
    )
    .await;
    assert_eq!(
        res.body["scopes"],
        serde_json::json!(["personalAccessToken:read"])
    );
    assert_eq!(
        get(&t.app, "/needs-x", &secret).await.status,
        StatusCode::FORBIDDEN
    );
    // Scopes the caller lacks are refused.
    let res = patch(&t.app, &uri, &t.alice, r#"{"scopes": ["repo:admin"]}"#).await;
    res.error(403);

    // An IP restriction excluding the client applies at once; null lifts it.
    let res = patch(&t.app, &uri, &t.alice, r#"{"ipRestriction": "10.0.0.0/8"}"#).await;
    assert_eq!(res.body["ipRestriction"], serde_json::json!(["10.0.0.0/8"]));
    assert_eq!(hello(&t.app, &secret).await, StatusCode::FORBIDDEN);
    let res = patch(&t.app, &uri, &t.alice, r#"{"ipRestriction": null}"#).await;
    assert_eq!(res.body["ipRestriction"], serde_json::json!([]));
    assert_eq!(hello(&t.app, &secret).await, StatusCode::OK);
    patch(
        &t.app,
        &uri,
        &t.alice,
        r#"{"ipRestriction": "10.0.0.0/99"}"#,
    )
    .await
    .error(400);

    // Expiry: a date, then never (with the acknowledgment only).
    let exp = in_days(3);
    let res = patch(
        &t.app,
        &uri,
        &t.alice,
        &format!(r#"{{"expiresAt": "{exp}"}}"#),
    )
    .await;
    assert_eq!(
        time(&res.body["expiresAt"]),
        // To the microsecond, as the stores keep times.
        DateTime::from_timestamp_micros(exp.parse::<DateTime<Utc>>().unwrap().timestamp_micros())
            .unwrap()
    );
    assert_eq!(res.body["expiryWarning"], "expires-soon");
    let msg = patch(&t.app, &uri, &t.alice, r#"{"expiresAt": null}"#)
        .await
        .error(400)
        .to_owned();
    assert!(msg.contains("userAwareTokenNeverExpires"), "{msg}");
    let res = patch(
        &t.app,
        &uri,
        &t.alice,
        r#"{"expiresAt": null, "userAwareTokenNeverExpires": true}"#,
    )
    .await;
    assert!(res.body["expiresAt"].is_null());
    let past = (Utc::now() - chrono::Duration::hours(1)).to_rfc3339();
    patch(
        &t.app,
        &uri,
        &t.alice,
        &format!(r#"{{"expiresAt": "{past}"}}"#),
    )
    .await
    .error(400);

    // Wrong types and removed names are named; a taken name is 409.
    for (body, field) in [
        (r#"{"name": null}"#, "name"),
        (r#"{"name": 1}"#, "name"),
        (r#"{"revoked": "yes"}"#, "revoked"),
        (r#"{"scopes": {}}"#, "scopes"),
        (r#"{"expiresAt": 5}"#, "expiresAt"),
    ] {
        let res = patch(&t.app, &uri, &t.alice, body).await;
        assert!(res.error(400).starts_with(&format!("{field}:")), "{body}");
    }
    make(&t, "taken", "").await;
    patch(&t.app, &uri, &t.alice, r#"{"name": "taken"}"#)
        .await
        .error(409);
    let stored = t.store.get(&id).await.unwrap().unwrap();
    assert_eq!(stored.name, "new");
    assert_eq!(stored.token_type, "ci");
}

#[tokio::test]
async fn revoke_keeps_the_record_and_stops_the_token_at_once() {
    let t = app().await;
    let (id, secret) = make(&t, "r", "").await;
    let uri = format!("{BASE}/{id}");
    assert_eq!(hello(&t.app, &secret).await, StatusCode::OK);
    let lookups = t.layer.store_lookups();
    assert_eq!(hello(&t.app, &secret).await, StatusCode::OK);
    assert_eq!(t.layer.store_lookups(), lookups, "the token is cached");

    // revoked: false on an active token changes nothing.
    let res = patch(&t.app, &uri, &t.alice, r#"{"revoked": false}"#).await;
    assert_eq!(res.body["revoked"], false);

    let res = patch(&t.app, &uri, &t.alice, r#"{"revoked": true}"#).await;
    assert_eq!(res.body["revoked"], true);
    assert_eq!(res.body["active"], false);
    assert!(res.body["revokedAt"].is_string());
    let res = get(&t.app, "/hello", &secret).await;
    assert_eq!(res.status, StatusCode::UNAUTHORIZED);
    assert!(res.text.contains("revoked"));
    assert!(t.store.get(&id).await.unwrap().unwrap().is_revoked());
    assert_eq!(get(&t.app, &uri, &t.alice).await.body["revoked"], true);

    // Not a bad request (Schemathesis: schema-valid data), the token's state: 410, as for any
    // other change of a revoked token.
    let res = patch(&t.app, &uri, &t.alice, r#"{"revoked": false}"#).await;
    assert!(res.error(410).contains("cannot be reinstated"));
    assert_eq!(res.body["code"], "token_revoked");
    // Revoking again is harmless.
    let res = patch(&t.app, &uri, &t.alice, r#"{"revoked": true}"#).await;
    assert_eq!(res.status, StatusCode::OK);
}

#[tokio::test]
async fn a_revoked_token_cannot_be_changed() {
    let t = app().await;
    let (id, secret) = make(&t, "gone", "").await;
    let uri = format!("{BASE}/{id}");
    let res = patch(&t.app, &uri, &t.alice, r#"{"revoked": true}"#).await;
    assert_eq!(res.status, StatusCode::OK, "{}", res.text);
    let before = t.store.get(&id).await.unwrap().unwrap();
    for body in [
        r#"{"name": "renamed"}"#,
        r#"{"name": "gone"}"#,
        r#"{"scopes": []}"#,
        r#"{"expiresAt": null, "userAwareTokenNeverExpires": true}"#,
        r#"{"ipRestriction": null}"#,
        r#"{"name": "renamed", "revoked": true}"#,
    ] {
        let res = patch(&t.app, &uri, &t.alice, body).await;
        assert!(res.error(410).contains("revoked"), "{body}");
        assert_eq!(res.body["code"], "token_revoked", "{body}");
    }
    assert_eq!(t.store.get(&id).await.unwrap().unwrap(), before);
    assert_eq!(hello(&t.app, &secret).await, StatusCode::UNAUTHORIZED);
    // Revoking it again is still harmless.
    let res = patch(&t.app, &uri, &t.alice, r#"{"revoked": true}"#).await;
    assert_eq!(res.status, StatusCode::OK, "{}", res.text);
}

#[tokio::test]
async fn rotate_issues_a_new_secret_and_stops_the_old_one_at_once() {
    let t = app().await;
    let (id, old) = make(
        &t,
        "rot",
        r#", "scopes": ["x:read"], "type": "ci", "ipRestriction": "127.0.0.0/8""#,
    )
    .await;
    assert_eq!(hello(&t.app, &old).await, StatusCode::OK);
    let before = get(&t.app, &format!("{BASE}/{id}"), &t.alice).await.body;

    let res = post(&t.app, &format!("{BASE}/{id}/rotate"), &t.alice, "").await;
    assert_eq!(res.status, StatusCode::CREATED, "{}", res.text);
    let new = res.body["token"].as_str().unwrap();
    assert_ne!(new, old);
    assert_eq!(res.body["secret"], new);
    assert_eq!(res.body["accessToken"], new);
    assert!(new.starts_with(res.body["start"].as_str().unwrap()));
    assert_eq!(res.body["id"], id.as_str());
    for f in [
        "name",
        "scopes",
        "type",
        "ipRestriction",
        "expiresAt",
        "createdAt",
    ] {
        assert_eq!(res.body[f], before[f], "{f}");
    }
    assert!(before["lastRotatedAt"].is_null());
    assert!(res.body["lastRotatedAt"].is_string());
    assert!(res.body.get("previousTokenValidUntil").is_none());

    assert_eq!(hello(&t.app, &old).await, StatusCode::UNAUTHORIZED);
    assert_eq!(hello(&t.app, new).await, StatusCode::OK);
    assert_eq!(get(&t.app, "/needs-x", new).await.status, StatusCode::OK);
    let stored = t.store.get(&id).await.unwrap().unwrap();
    assert_eq!(stored.hash, t.layer.hasher().hash(new));
    assert_eq!(stored.previous_hash, None);

    // A new expiry may come with the rotation.
    let exp = in_days(20);
    let res = post(
        &t.app,
        &format!("{BASE}/{id}/rotate"),
        &t.alice,
        &format!(r#"{{"expiresAt": "{exp}"}}"#),
    )
    .await;
    assert_eq!(
        time(&res.body["expiresAt"]),
        // To the microsecond, as the stores keep times.
        DateTime::from_timestamp_micros(exp.parse::<DateTime<Utc>>().unwrap().timestamp_micros())
            .unwrap()
    );
    let res = post(
        &t.app,
        &format!("{BASE}/{id}/rotate"),
        &t.alice,
        r#"{"gracePeriodSeconds": -1}"#,
    )
    .await;
    assert!(res.error(400).starts_with("gracePeriodSeconds:"));
}

#[tokio::test]
async fn rotation_with_a_grace_period_keeps_the_old_secret_until_it_ends() {
    let t = app().await;
    let (id, old) = make(&t, "grace", "").await;
    assert_eq!(hello(&t.app, &old).await, StatusCode::OK);
    let res = post(
        &t.app,
        &format!("{BASE}/{id}/rotate"),
        &t.alice,
        r#"{"gracePeriodSeconds": 2}"#,
    )
    .await;
    let new = res.body["token"].as_str().unwrap().to_owned();
    let until = time(&res.body["previousTokenValidUntil"]);
    assert!(until > Utc::now() + chrono::Duration::milliseconds(1500));
    assert_eq!(hello(&t.app, &old).await, StatusCode::OK);
    assert_eq!(hello(&t.app, &new).await, StatusCode::OK);
    let wait = (until - Utc::now()).to_std().unwrap_or_default() + Duration::from_millis(50);
    tokio::time::sleep(wait).await;
    assert_eq!(hello(&t.app, &old).await, StatusCode::UNAUTHORIZED);
    assert_eq!(hello(&t.app, &new).await, StatusCode::OK);
}

#[tokio::test]
async fn a_grace_period_beyond_the_configured_maximum_is_refused_and_documented() {
    let t = app_with(|c| c.max_rotation_grace(Duration::from_secs(60))).await;
    let (id, old) = make(&t, "g", "").await;
    let before = t.store.get(&id).await.unwrap().unwrap();
    let res = post(
        &t.app,
        &format!("{BASE}/{id}/rotate"),
        &t.alice,
        r#"{"gracePeriodSeconds": 61}"#,
    )
    .await;
    assert_eq!(
        res.error(400),
        "gracePeriodSeconds: at most 60 seconds on this server"
    );
    // Nothing rotated: the old secret works and the record is as it was.
    assert_eq!(hello(&t.app, &old).await, StatusCode::OK);
    assert_eq!(t.store.get(&id).await.unwrap().unwrap(), before);
    // The served document states this server's maximum, not the default.
    let doc = call(
        &t.app,
        Method::GET,
        &format!("{BASE}/openapi.json"),
        None,
        None,
    )
    .await;
    assert_eq!(
        doc.body["components"]["schemas"]["RotateTokenRequest"]["properties"]["gracePeriodSeconds"]
            ["maximum"],
        60
    );
    // The maximum itself is accepted (also written as 60.0, which JSON Schema calls an integer).
    let res = post(
        &t.app,
        &format!("{BASE}/{id}/rotate"),
        &t.alice,
        r#"{"gracePeriodSeconds": 60.0}"#,
    )
    .await;
    assert_eq!(res.status, StatusCode::CREATED, "{}", res.text);
    let until = time(&res.body["previousTokenValidUntil"]);
    assert!(until <= Utc::now() + chrono::Duration::seconds(60));
    assert!(until > Utc::now() + chrono::Duration::seconds(50));
    let stored = t.store.get(&id).await.unwrap().unwrap();
    assert_eq!(stored.previous_hash.map(|(_, u)| u), Some(until));
    for bad in ["60.5", "-1", "\"60\""] {
        let res = post(
            &t.app,
            &format!("{BASE}/{id}/rotate"),
            &t.alice,
            &format!(r#"{{"gracePeriodSeconds": {bad}}}"#),
        )
        .await;
        assert!(res.error(400).starts_with("gracePeriodSeconds:"), "{bad}");
    }
}

#[tokio::test]
async fn revoked_and_expired_tokens_cannot_be_rotated() {
    let t = app().await;
    let (id, _) = make(&t, "rev", "").await;
    patch(
        &t.app,
        &format!("{BASE}/{id}"),
        &t.alice,
        r#"{"revoked": true}"#,
    )
    .await;
    let res = post(&t.app, &format!("{BASE}/{id}/rotate"), &t.alice, "").await;
    assert!(res.error(410).contains("revoked"));
    assert_eq!(res.body["code"], "token_revoked");

    let mut expired = NewToken::new("alice", "expired");
    expired.expires_at = Some(Utc::now() - chrono::Duration::hours(1));
    let (record, _) = t.tokens.issue(expired).await.unwrap();
    let res = post(
        &t.app,
        &format!("{BASE}/{}/rotate", record.id),
        &t.alice,
        "",
    )
    .await;
    assert!(res.error(409).contains("expired"));
    assert_eq!(res.body["code"], "token_expired");
    let view = get(&t.app, &format!("{BASE}/{}", record.id), &t.alice)
        .await
        .body;
    assert_eq!(view["expiryWarning"], "expired");
    assert_eq!(view["active"], false);
    assert_eq!(
        t.store.get(&record.id).await.unwrap().unwrap().hash,
        record.hash
    );
}

#[tokio::test]
async fn delete_removes_the_record_and_stops_the_token_at_once() {
    let t = app().await;
    let (id, secret) = make(&t, "d", "").await;
    let uri = format!("{BASE}/{id}");
    assert_eq!(hello(&t.app, &secret).await, StatusCode::OK);
    let res = call(&t.app, Method::DELETE, &uri, Some(&t.alice), None).await;
    assert_eq!(res.status, StatusCode::OK);
    assert_eq!(
        res.body,
        serde_json::json!({"message": "Personal access token revoked", "status": 200})
    );
    assert!(t.store.get(&id).await.unwrap().is_none());
    assert_eq!(hello(&t.app, &secret).await, StatusCode::UNAUTHORIZED);
    get(&t.app, &uri, &t.alice).await.error(404);
    call(&t.app, Method::DELETE, &uri, Some(&t.alice), None)
        .await
        .error(404);
}

#[tokio::test]
async fn a_token_may_revoke_itself() {
    let t = app().await;
    let res = get(&t.app, &format!("{BASE}/self"), &t.alice).await;
    let id = res.body["id"].as_str().unwrap();
    let res = patch(
        &t.app,
        &format!("{BASE}/{id}"),
        &t.alice,
        r#"{"revoked": true}"#,
    )
    .await;
    assert_eq!(res.status, StatusCode::OK);
    get(&t.app, BASE, &t.alice).await.error(401);
}

/// A store whose management operations fail while `down` is set; lookups keep working.
#[derive(Clone)]
struct FlakyStore {
    inner: tower_pat::MemoryStore,
    down: Arc<AtomicBool>,
}

impl FlakyStore {
    fn check(&self) -> Result<(), StoreError> {
        if self.down.load(Ordering::Relaxed) {
            return Err(StoreError::backend("connection refused"));
        }
        Ok(())
    }
}

#[async_trait::async_trait]
impl TokenLookup for FlakyStore {
    async fn find_by_hash(
        &self,
        hash: &tower_pat::TokenHash,
    ) -> Result<Option<tower_pat::TokenRecord>, StoreError> {
        self.inner.find_by_hash(hash).await
    }

    fn subscribe(&self, listener: std::sync::Weak<dyn tower_pat::store::ChangeListener>) -> bool {
        self.inner.subscribe(listener)
    }
}

#[async_trait::async_trait]
impl TokenStore for FlakyStore {
    async fn insert(&self, record: &tower_pat::TokenRecord) -> Result<(), StoreError> {
        self.check()?;
        self.inner.insert(record).await
    }
    async fn get(&self, id: &str) -> Result<Option<tower_pat::TokenRecord>, StoreError> {
        self.check()?;
        self.inner.get(id).await
    }
    async fn list(
        &self,
        query: &tower_pat::store::ListQuery,
    ) -> Result<tower_pat::store::Page, StoreError> {
        self.check()?;
        self.inner.list(query).await
    }
    async fn update(
        &self,
        id: &str,
        patch: &tower_pat::TokenPatch,
    ) -> Result<tower_pat::TokenRecord, StoreError> {
        self.check()?;
        self.inner.update(id, patch).await
    }
    async fn rotate(
        &self,
        id: &str,
        rotation: &tower_pat::Rotation,
    ) -> Result<tower_pat::TokenRecord, StoreError> {
        self.check()?;
        self.inner.rotate(id, rotation).await
    }
    async fn revoke(
        &self,
        id: &str,
        at: DateTime<Utc>,
    ) -> Result<Option<tower_pat::TokenRecord>, StoreError> {
        self.check()?;
        self.inner.revoke(id, at).await
    }
    async fn delete(&self, id: &str) -> Result<Option<tower_pat::TokenRecord>, StoreError> {
        self.check()?;
        self.inner.delete(id).await
    }
    async fn count_by_subject(&self, subject: &str) -> Result<u64, StoreError> {
        self.check()?;
        self.inner.count_by_subject(subject).await
    }
}

#[tokio::test]
async fn a_failing_store_is_a_500_that_names_no_internals() {
    let store = FlakyStore {
        inner: tower_pat::MemoryStore::new(),
        down: Arc::new(AtomicBool::new(false)),
    };
    let tokens = tower_pat::Tokens::new(store.clone());
    let layer = tokens.layer().build();
    let new = NewToken::new("alice", "a")
        .scopes(["personalAccessToken:*"])
        .unwrap();
    let (record, secret) = tokens.issue(new).await.unwrap();
    let secret = secret.expose_secret();
    let app = axum::Router::new().nest(
        BASE,
        tower_pat::admin::router(tower_pat::admin::AdminConfig::new(&tokens, &layer).unwrap()),
    );
    assert_eq!(get(&app, BASE, secret).await.status, StatusCode::OK);
    store.down.store(true, Ordering::Relaxed);
    for res in [
        get(&app, BASE, secret).await,
        get(&app, &format!("{BASE}/{}", record.id), secret).await,
        post(
            &app,
            BASE,
            secret,
            r#"{"name": "b", "userAwareTokenNeverExpires": true}"#,
        )
        .await,
        call(
            &app,
            Method::DELETE,
            &format!("{BASE}/{}", record.id),
            Some(secret),
            None,
        )
        .await,
    ] {
        let msg = res.error(500);
        assert!(!msg.contains("connection refused"), "{msg}");
        assert_eq!(res.body["code"], "server_error");
    }
}

#[tokio::test]
async fn behind_an_app_wide_layer_the_second_pass_is_a_cache_hit() {
    let tokens = tower_pat::Tokens::new(tower_pat::MemoryStore::new());
    let layer = tokens.layer().build();
    let secret = issue(&tokens, "alice", &["personalAccessToken:read"]).await;
    let config = tower_pat::admin::AdminConfig::new(&tokens, &layer).unwrap();
    let app = axum::Router::new()
        .nest(BASE, tower_pat::admin::router(config))
        .layer(layer.clone());
    for _ in 0..3 {
        let res = get(&app, &format!("{BASE}/self"), &secret).await;
        assert_eq!(res.status, StatusCode::OK, "{}", res.text);
    }
    assert_eq!(layer.store_lookups(), 1);
}

/// A NUL byte (`%00`) in a token id or a filter matches no token, whatever the store: 404 or an
/// empty list, as for any other unknown value. Never a 500: PostgreSQL refuses the character in
/// text, and that refusal is no store failure.
async fn a_nul_byte_matches_no_token(tokens: Tokens) {
    let layer = tokens.layer().build();
    let app = axum::Router::new().nest(
        BASE,
        tower_pat::admin::router(tower_pat::admin::AdminConfig::new(&tokens, &layer).unwrap()),
    );
    let reader = issue(&tokens, "bob", &["personalAccessToken:read"]).await;
    let admin = issue(&tokens, "root", &["personalAccessToken:*"]).await;
    for (uri, token) in [
        (format!("{BASE}?search=%00"), &reader),
        (format!("{BASE}?search=seed%00"), &reader),
        (format!("{BASE}?ownerId=%00"), &admin),
        (format!("{BASE}?ownerId=bob%00"), &admin),
    ] {
        let res = get(&app, &uri, token).await;
        assert_eq!(res.status, StatusCode::OK, "{uri}: {}", res.text);
        assert!(names(&res).is_empty(), "{uri}: {}", res.text);
    }
    let id = format!("{BASE}/%00");
    for res in [
        get(&app, &id, &reader).await,
        patch(&app, &id, &admin, r#"{"name": "x"}"#).await,
        post(&app, &format!("{id}/rotate"), &admin, "").await,
        call(&app, Method::DELETE, &id, Some(&admin), None).await,
    ] {
        res.error(404);
        assert_eq!(res.body["code"], "not_found", "{}", res.text);
    }
}

#[tokio::test]
async fn a_nul_byte_matches_no_token_in_memory() {
    a_nul_byte_matches_no_token(Tokens::new(tower_pat::MemoryStore::new())).await;
}

#[cfg(feature = "sqlite")]
#[tokio::test]
async fn a_nul_byte_matches_no_token_in_sqlite() {
    let store = tower_pat::SqliteStore::in_memory().await.unwrap();
    a_nul_byte_matches_no_token(Tokens::new(store)).await;
}

#[cfg(feature = "postgres")]
#[tokio::test]
async fn a_nul_byte_matches_no_token_in_postgres() {
    let Some(db) = common::pg::TestDb::create("admin_manage_nul").await else {
        return;
    };
    let store = tower_pat::PostgresStore::builder()
        .connect_with(db.options.clone())
        .await
        .unwrap();
    a_nul_byte_matches_no_token(Tokens::new(store.clone())).await;
    store.pool().close().await;
}
