//! The management API never grants more than the caller has: not a scope it lacks,
//! not a later expiry, not a wider network; acting on a token needs every scope it holds; no field
//! a client sends is silently dropped when dropping it would grant more than asked; lists and
//! bodies are bounded. Each test is what an attacker (or a careless client) would try.

mod support_admin;

use std::time::Duration;

use chrono::{DateTime, Utc};
use http::{Method, StatusCode};
use support_admin::*;
use tower_pat::admin::ExpiryPolicy;
use tower_pat::record::parse_ip_net;
use tower_pat::{NewToken, TokenRecord, TokenStore};

const RW: &[&str] = &["personalAccessToken:read", "personalAccessToken:write"];

/// A token of `subject` inserted straight into the store: `scopes`, expiring `expires_in` from
/// now (never for `None`), restricted to `nets` (anywhere when empty).
async fn token(
    t: &TestApp,
    subject: &str,
    scopes: &[&str],
    expires_in: Option<chrono::Duration>,
    nets: &[&str],
) -> (TokenRecord, String) {
    use std::sync::atomic::{AtomicU64, Ordering};
    static N: AtomicU64 = AtomicU64::new(0);
    let name = format!("t-{}", N.fetch_add(1, Ordering::Relaxed));
    let mut new = NewToken::new(subject, name)
        .scopes(scopes)
        .unwrap()
        .ip_restriction(nets.iter().map(|n| parse_ip_net(n).unwrap()));
    new.expires_at = expires_in.map(|d| Utc::now() + d);
    let (record, secret) = t.tokens.issue(new).await.unwrap();
    (record, secret.expose_secret().to_owned())
}

/// `t` to the microsecond, as the stores keep times.
fn us(t: DateTime<Utc>) -> DateTime<Utc> {
    DateTime::from_timestamp_micros(t.timestamp_micros()).unwrap()
}

fn hours(h: i64) -> chrono::Duration {
    chrono::Duration::hours(h)
}

fn in_hours(h: i64) -> String {
    (Utc::now() + hours(h)).to_rfc3339()
}

fn in_minutes(m: i64) -> String {
    (Utc::now() + chrono::Duration::minutes(m)).to_rfc3339()
}

async fn delete(t: &TestApp, uri: &str, token: &str) -> Res {
    call(&t.app, Method::DELETE, uri, Some(token), None).await
}

async fn stored(t: &TestApp, id: &str) -> TokenRecord {
    t.store.get(id).await.unwrap().expect("the record exists")
}

fn assert_forbidden(res: &Res, code: &str, field: &str) {
    let msg = res.error(403);
    assert!(msg.starts_with(&format!("{field}:")), "{msg}");
    assert_eq!(res.body["code"], code, "{}", res.text);
    assert_eq!(res.headers["cache-control"], "no-store");
}

// ---- Item 2: every field of a create, PATCH or rotate is honoured or refused. ----

#[tokio::test]
async fn a_token_cannot_be_created_revoked_or_inactive() {
    let t = app().await;
    let before = t.store.count_by_subject("alice").await.unwrap();
    // Cryptlex's request, with `revoked: true`.
    let res = post(
        &t.app,
        BASE,
        &t.alice,
        &format!(
            r#"{{"name": "string", "revoked": true, "expiresAt": "{}", "scopes": ["x:read"]}}"#,
            in_days(5)
        ),
    )
    .await;
    assert_eq!(
        res.error(400),
        "revoked: a token cannot be created revoked",
        "{}",
        res.text
    );
    // Avisi's `active: false`.
    let res = post(
        &t.app,
        BASE,
        &t.alice,
        r#"{"name": "ci", "active": false, "userAwareTokenNeverExpires": true}"#,
    )
    .await;
    assert!(res.error(400).starts_with("active:"), "{}", res.text);
    assert_eq!(t.store.count_by_subject("alice").await.unwrap(), before);

    // The values that ask for nothing more are accepted, and mean what they say.
    let res = create(
        &t.app,
        &t.alice,
        r#"{"name": "ok", "revoked": false, "active": true, "userAwareTokenNeverExpires": true}"#,
    )
    .await;
    assert_eq!(res.body["active"], true);
    assert_eq!(
        hello(&t.app, res.body["token"].as_str().unwrap()).await,
        StatusCode::OK
    );
    for body in [
        r#"{"name": "x", "revoked": "yes"}"#,
        r#"{"name": "x", "active": 1}"#,
    ] {
        let res = post(&t.app, BASE, &t.alice, body).await;
        let field = if body.contains("revoked") {
            "revoked"
        } else {
            "active"
        };
        assert!(res.error(400).starts_with(&format!("{field}:")), "{body}");
    }
}

#[tokio::test]
async fn a_create_naming_another_subject_is_refused_not_rewritten() {
    let t = app().await;
    let admin = token(&t, "root", &["*"], None, &[]).await.1;
    for (field, caller) in [
        ("subject", &t.alice),
        ("userId", &t.alice),
        ("subject", &admin),
    ] {
        let res = post(
            &t.app,
            BASE,
            caller,
            &format!(r#"{{"name": "n", "{field}": "bob", "userAwareTokenNeverExpires": true}}"#),
        )
        .await;
        assert!(
            res.error(400).starts_with(&format!("{field}:")),
            "{}",
            res.text
        );
    }
    assert_eq!(t.store.count_by_subject("bob").await.unwrap(), 0);
    // Naming oneself is what happens anyway.
    let res = create(
        &t.app,
        &t.alice,
        r#"{"name": "n", "subject": "alice", "userId": "alice", "userAwareTokenNeverExpires": true}"#,
    )
    .await;
    assert_eq!(res.body["subject"], "alice");
}

#[tokio::test]
async fn unknown_fields_are_refused_and_server_set_ones_ignored() {
    let t = app().await;
    let before = t.store.count_by_subject("alice").await.unwrap();
    // A client spelling the restriction its own way would get an unrestricted token.
    for (body, field) in [
        (
            r#"{"name": "a", "ip_restriction": "10.0.0.0/8", "userAwareTokenNeverExpires": true}"#,
            "ip_restriction",
        ),
        (
            r#"{"name": "a", "expires_at": "2999-01-01T00:00:00Z", "userAwareTokenNeverExpires": true}"#,
            "expires_at",
        ),
        (
            r#"{"name": "a", "allowedIps": ["10.0.0.1"], "userAwareTokenNeverExpires": true}"#,
            "allowedIps",
        ),
    ] {
        let res = post(&t.app, BASE, &t.alice, body).await;
        assert!(
            res.error(400).starts_with(&format!("{field}:")),
            "{}",
            res.text
        );
    }
    assert_eq!(t.store.count_by_subject("alice").await.unwrap(), before);

    // What a client echoes back of a token it read is ignored (Unleash documents it so).
    let res = create(
        &t.app,
        &t.alice,
        r#"{"name": "a", "userAwareTokenNeverExpires": true, "id": "mine", "secret": "pat_x",
            "token": "pat_y", "accessToken": "pat_z", "createdAt": "2001-01-01T00:00:00Z",
            "updatedAt": "2001-01-01T00:00:00Z", "seenAt": "2001-01-01T00:00:00Z",
            "lastUsedAt": "2001-01-01T00:00:00Z", "lastUsedIps": ["192.0.2.1"],
            "lastRotatedAt": null, "start": "pat_abcd", "revokedAt": null,
            "expiryWarning": null}"#,
    )
    .await;
    assert_ne!(res.body["id"], "mine");
    assert!(res.body["lastUsedIps"].as_array().unwrap().is_empty());
}

#[tokio::test]
async fn patch_and_rotate_refuse_what_they_would_drop() {
    let t = app().await;
    let (target, _) = token(&t, "alice", &["x:read"], None, &[]).await;
    let uri = format!("{BASE}/{}", target.id);
    for (body, field) in [
        (r#"{"type": "service"}"#, "type"),
        (r#"{"active": "no"}"#, "active"),
        (r#"{"subject": "bob"}"#, "subject"),
        (r#"{"ip_restriction": "10.0.0.0/8"}"#, "ip_restriction"),
    ] {
        let res = patch(&t.app, &uri, &t.alice, body).await;
        assert!(
            res.error(400).starts_with(&format!("{field}:")),
            "{body}: {}",
            res.text
        );
    }
    assert_eq!(stored(&t, &target.id).await, target);
    // Values that change nothing are accepted.
    let res = patch(
        &t.app,
        &uri,
        &t.alice,
        r#"{"type": "personal", "active": true, "subject": "alice"}"#,
    )
    .await;
    assert_eq!(res.status, StatusCode::OK, "{}", res.text);

    // A rotation keeps name, scopes, type and networks: asking it to change them is refused,
    // not ignored (a rotation asked to narrow the scopes would hand out the broad secret).
    for (body, field) in [
        (r#"{"scopes": []}"#, "scopes"),
        (r#"{"ipRestriction": "10.0.0.1"}"#, "ipRestriction"),
        (r#"{"revoked": true}"#, "revoked"),
        (r#"{"active": false}"#, "active"),
        (r#"{"name": "other"}"#, "name"),
        (r#"{"gracePeriod": 60}"#, "gracePeriod"),
    ] {
        let res = post(&t.app, &format!("{uri}/rotate"), &t.alice, body).await;
        assert!(
            res.error(400).starts_with(&format!("{field}:")),
            "{body}: {}",
            res.text
        );
    }
    assert_eq!(stored(&t, &target.id).await.hash, target.hash);
}

// ---- Item 3: acting on a token needs every scope it holds. ----

#[tokio::test]
async fn a_narrow_token_cannot_rotate_a_broader_sibling() {
    let t = app().await;
    let narrow = token(&t, "alice", RW, None, &[]).await.1;
    let (root, root_secret) = token(&t, "alice", &["*"], None, &[]).await;
    let res = post(&t.app, &format!("{BASE}/{}/rotate", root.id), &narrow, "").await;
    assert_forbidden(&res, "insufficient_scope", "scopes");
    assert!(res.error(403).contains('*'), "{}", res.text);
    assert!(res.body.get("token").is_none());
    assert_eq!(stored(&t, &root.id).await.hash, root.hash);
    assert_eq!(hello(&t.app, &root_secret).await, StatusCode::OK);

    // `personalAccessToken:*` plus `x:*` (alice's bootstrap token) is not `*` either.
    let res = post(&t.app, &format!("{BASE}/{}/rotate", root.id), &t.alice, "").await;
    assert_forbidden(&res, "insufficient_scope", "scopes");
    // A resource wildcard needs the wildcard (or `*`), not one scope below it.
    let (xs, _) = token(&t, "alice", &["x:*"], None, &[]).await;
    let reader = token(&t, "alice", &[RW[0], RW[1], "x:read"], None, &[])
        .await
        .1;
    let res = post(&t.app, &format!("{BASE}/{}/rotate", xs.id), &reader, "").await;
    assert_forbidden(&res, "insufficient_scope", "scopes");
    // Holding it is enough.
    let res = post(&t.app, &format!("{BASE}/{}/rotate", xs.id), &t.alice, "").await;
    assert_eq!(res.status, StatusCode::CREATED, "{}", res.text);
}

#[tokio::test]
async fn a_narrow_token_cannot_patch_revoke_or_delete_a_broader_sibling() {
    let t = app().await;
    let narrow = token(&t, "alice", RW, None, &[]).await.1;
    let (root, root_secret) = token(&t, "alice", &["*"], None, &["127.0.0.1"]).await;
    let uri = format!("{BASE}/{}", root.id);
    for body in [
        r#"{"ipRestriction": null}"#.to_owned(),
        r#"{"ipRestriction": "0.0.0.0/0"}"#.to_owned(),
        format!(r#"{{"expiresAt": "{}"}}"#, in_days(3)),
        r#"{"name": "renamed"}"#.to_owned(),
        r#"{"scopes": ["personalAccessToken:read"]}"#.to_owned(),
        r#"{"revoked": true}"#.to_owned(),
    ] {
        let res = patch(&t.app, &uri, &narrow, &body).await;
        assert_forbidden(&res, "insufficient_scope", "scopes");
    }
    let res = delete(&t, &uri, &narrow).await;
    assert_forbidden(&res, "insufficient_scope", "scopes");
    assert_eq!(stored(&t, &root.id).await, root);
    assert_eq!(hello(&t.app, &root_secret).await, StatusCode::OK);
    // The `*` token itself may do all of it.
    let res = patch(&t.app, &uri, &root_secret, r#"{"name": "renamed"}"#).await;
    assert_eq!(res.status, StatusCode::OK, "{}", res.text);
}

#[tokio::test]
async fn the_admin_scope_reaches_other_subjects_never_scopes_the_caller_lacks() {
    let t = app().await;
    let admin = token(
        &t,
        "root",
        &[RW[0], RW[1], "personalAccessToken:admin"],
        None,
        &[],
    )
    .await
    .1;
    let (bobs_root, bobs_secret) = token(&t, "bob", &["*"], None, &[]).await;
    let uri = format!("{BASE}/{}", bobs_root.id);
    let res = post(&t.app, &format!("{uri}/rotate"), &admin, "").await;
    assert_forbidden(&res, "insufficient_scope", "scopes");
    assert!(res.body.get("token").is_none());
    let res = patch(&t.app, &uri, &admin, r#"{"expiresAt": null}"#).await;
    assert_forbidden(&res, "insufficient_scope", "scopes");
    let res = delete(&t, &uri, &admin).await;
    assert_forbidden(&res, "insufficient_scope", "scopes");
    assert_eq!(stored(&t, &bobs_root.id).await, bobs_root);
    assert_eq!(hello(&t.app, &bobs_secret).await, StatusCode::OK);

    // A token of bob's within the admin's scopes is the admin's to manage.
    let (bobs_reader, _) = token(&t, "bob", &["personalAccessToken:read"], None, &[]).await;
    let uri = format!("{BASE}/{}", bobs_reader.id);
    let res = post(&t.app, &format!("{uri}/rotate"), &admin, "").await;
    assert_eq!(res.status, StatusCode::CREATED, "{}", res.text);
    assert_eq!(res.body["subject"], "bob");
    assert_eq!(
        delete(&t, &uri, &admin).await.status,
        StatusCode::OK,
        "delete"
    );
}

// ---- Item 4: a child never outlives nor out-reaches its creator. ----

#[tokio::test]
async fn a_short_lived_restricted_token_cannot_mint_a_longer_lived_or_wider_child() {
    let t = app().await;
    let (parent, secret) = token(
        &t,
        "alice",
        &["personalAccessToken:*", "x:*"],
        Some(hours(1)),
        &["127.0.0.1"],
    )
    .await;
    assert_eq!(hello(&t.app, &secret).await, StatusCode::OK);
    let before = t.store.count_by_subject("alice").await.unwrap();

    // Never expiring, a year, a day: all outlive the parent.
    for body in [
        r#"{"name": "c", "userAwareTokenNeverExpires": true, "ipRestriction": "127.0.0.1"}"#
            .to_owned(),
        format!(
            r#"{{"name": "c", "expiresAt": "{}", "ipRestriction": "127.0.0.1"}}"#,
            in_days(365)
        ),
        format!(r#"{{"name": "c", "expiresAt": "{}"}}"#, in_hours(2)),
    ] {
        let res = post(&t.app, BASE, &secret, &body).await;
        assert_forbidden(&res, "forbidden", "expiresAt");
        assert!(
            res.error(403)
                .contains("a token cannot outlive the token that creates or changes it"),
            "{}",
            res.text
        );
    }
    // Anywhere, another network, a wider one (also written as IPv4-mapped IPv6).
    for nets in [
        r#""0.0.0.0/0""#,
        r#""10.0.0.1""#,
        r#""127.0.0.0/8""#,
        r#"["127.0.0.1", "10.0.0.1"]"#,
        r#""::/0""#,
        r#""::ffff:127.0.0.0/104""#,
    ] {
        let res = post(
            &t.app,
            BASE,
            &secret,
            &format!(
                r#"{{"name": "c", "expiresAt": "{}", "ipRestriction": {nets}}}"#,
                in_minutes(30)
            ),
        )
        .await;
        assert_forbidden(&res, "forbidden", "ipRestriction");
        assert!(
            res.error(403).contains("within the caller's networks"),
            "{}",
            res.text
        );
    }
    assert_eq!(t.store.count_by_subject("alice").await.unwrap(), before);

    // Within both ceilings: created. Without a restriction of its own the child inherits the
    // parent's; up to the parent's very expiry is fine.
    let res = create(
        &t.app,
        &secret,
        &format!(
            r#"{{"name": "inherits", "expiresAt": "{}", "scopes": ["x:read"]}}"#,
            in_minutes(30)
        ),
    )
    .await;
    assert_eq!(
        res.body["ipRestriction"],
        serde_json::json!(["127.0.0.1/32"])
    );
    let child = stored(&t, res.body["id"].as_str().unwrap()).await;
    assert_eq!(child.ip_restriction, parent.ip_restriction);
    let res = create(
        &t.app,
        &secret,
        &format!(
            r#"{{"name": "same", "expiresAt": "{}", "ipRestriction": "127.0.0.1"}}"#,
            parent.expires_at.unwrap().to_rfc3339()
        ),
    )
    .await;
    assert_eq!(time(&res.body["expiresAt"]), parent.expires_at.unwrap());
    assert_eq!(
        hello(&t.app, res.body["token"].as_str().unwrap()).await,
        StatusCode::OK
    );
    // The parent's address written as IPv4-mapped IPv6 is the same network.
    create(
        &t.app,
        &secret,
        &format!(
            r#"{{"name": "mapped", "expiresAt": "{}", "ipRestriction": "::ffff:127.0.0.1"}}"#,
            in_minutes(30)
        ),
    )
    .await;
}

#[tokio::test]
async fn a_default_lifetime_is_cut_to_the_callers_expiry() {
    let t = app_with(|c| {
        c.expiry_policy(ExpiryPolicy::DefaultLifetime(Duration::from_secs(
            90 * 86_400,
        )))
    })
    .await;
    let (parent, secret) = token(&t, "alice", RW, Some(hours(1)), &[]).await;
    let res = create(&t.app, &secret, r#"{"name": "defaulted"}"#).await;
    assert_eq!(time(&res.body["expiresAt"]), parent.expires_at.unwrap());
    // An explicit request beyond it is refused, not cut.
    let res = post(
        &t.app,
        BASE,
        &secret,
        &format!(r#"{{"name": "explicit", "expiresAt": "{}"}}"#, in_days(30)),
    )
    .await;
    assert_forbidden(&res, "forbidden", "expiresAt");
    let res = post(
        &t.app,
        BASE,
        &secret,
        r#"{"name": "explicit", "userAwareTokenNeverExpires": true}"#,
    )
    .await;
    assert_forbidden(&res, "forbidden", "expiresAt");
    // A never-expiring caller still gets the default lifetime.
    let res = create(&t.app, &t.alice, r#"{"name": "long"}"#).await;
    assert!(time(&res.body["expiresAt"]) > Utc::now() + chrono::Duration::days(89));
}

#[tokio::test]
async fn a_patch_only_narrows_the_callers_own_expiry_and_networks() {
    let t = app().await;
    let (me, secret) = token(&t, "alice", RW, Some(hours(1)), &["127.0.0.1"]).await;
    let uri = format!("{BASE}/{}", me.id);
    for body in [
        format!(r#"{{"expiresAt": "{}"}}"#, in_hours(2)),
        r#"{"expiresAt": null, "userAwareTokenNeverExpires": true}"#.to_owned(),
    ] {
        let res = patch(&t.app, &uri, &secret, &body).await;
        assert_forbidden(&res, "forbidden", "expiresAt");
    }
    for body in [
        r#"{"ipRestriction": null}"#,
        r#"{"ipRestriction": []}"#,
        r#"{"ipRestriction": "127.0.0.0/8"}"#,
        r#"{"ipRestriction": ["127.0.0.1", "192.0.2.0/24"]}"#,
    ] {
        let res = patch(&t.app, &uri, &secret, body).await;
        assert_forbidden(&res, "forbidden", "ipRestriction");
    }
    assert_eq!(stored(&t, &me.id).await, me);

    // Narrowing is fine.
    let sooner = Utc::now() + chrono::Duration::minutes(30);
    let res = patch(
        &t.app,
        &uri,
        &secret,
        &format!(
            r#"{{"expiresAt": "{}", "ipRestriction": "127.0.0.1/32"}}"#,
            sooner.to_rfc3339()
        ),
    )
    .await;
    assert_eq!(res.status, StatusCode::OK, "{}", res.text);
    assert_eq!(stored(&t, &me.id).await.expires_at, Some(us(sooner)));
    // And once narrowed, the old expiry is out of reach too.
    let res = patch(
        &t.app,
        &uri,
        &secret,
        &format!(
            r#"{{"expiresAt": "{}"}}"#,
            me.expires_at.unwrap().to_rfc3339()
        ),
    )
    .await;
    assert_forbidden(&res, "forbidden", "expiresAt");
}

#[tokio::test]
async fn a_patch_of_another_token_stays_within_the_callers_ceilings() {
    let t = app().await;
    let caller = token(&t, "alice", RW, Some(hours(1)), &["127.0.0.0/8"])
        .await
        .1;
    let (target, _) = token(
        &t,
        "alice",
        &[],
        Some(chrono::Duration::minutes(10)),
        &["127.0.0.1"],
    )
    .await;
    let uri = format!("{BASE}/{}", target.id);
    for (body, field) in [
        (
            r#"{"expiresAt": null, "userAwareTokenNeverExpires": true}"#.to_owned(),
            "expiresAt",
        ),
        (
            format!(r#"{{"expiresAt": "{}"}}"#, in_days(365)),
            "expiresAt",
        ),
        (
            r#"{"ipRestriction": "10.0.0.0/8"}"#.to_owned(),
            "ipRestriction",
        ),
        (r#"{"ipRestriction": null}"#.to_owned(), "ipRestriction"),
    ] {
        let res = patch(&t.app, &uri, &caller, &body).await;
        assert_forbidden(&res, "forbidden", field);
    }
    assert_eq!(stored(&t, &target.id).await, target);
    // Up to the caller's own ceilings: fine, even when that is more than the target had.
    let later: DateTime<Utc> = Utc::now() + chrono::Duration::minutes(50);
    let res = patch(
        &t.app,
        &uri,
        &caller,
        &format!(
            r#"{{"expiresAt": "{}", "ipRestriction": "127.0.0.0/8"}}"#,
            later.to_rfc3339()
        ),
    )
    .await;
    assert_eq!(res.status, StatusCode::OK, "{}", res.text);
    let after = stored(&t, &target.id).await;
    assert_eq!(after.expires_at, Some(us(later)));
    assert_eq!(after.ip_restriction, [parse_ip_net("127.0.0.0/8").unwrap()]);
    // A name needs no ceiling.
    let res = patch(&t.app, &uri, &caller, r#"{"name": "renamed"}"#).await;
    assert_eq!(res.status, StatusCode::OK, "{}", res.text);
}

#[tokio::test]
async fn a_rotation_never_hands_out_a_longer_lived_or_wider_secret() {
    let t = app().await;
    let caller = token(&t, "alice", RW, Some(hours(1)), &["127.0.0.1"])
        .await
        .1;
    // A sibling that never expires and works anywhere: its new secret would be both.
    let (wide, wide_secret) = token(&t, "alice", &[], None, &[]).await;
    let rotate = |id: &str| format!("{BASE}/{id}/rotate");
    let res = post(&t.app, &rotate(&wide.id), &caller, "").await;
    assert_forbidden(&res, "forbidden", "expiresAt");
    let res = post(
        &t.app,
        &rotate(&wide.id),
        &caller,
        &format!(r#"{{"expiresAt": "{}"}}"#, in_minutes(30)),
    )
    .await;
    assert_forbidden(&res, "forbidden", "ipRestriction");
    assert_eq!(stored(&t, &wide.id).await.hash, wide.hash);
    assert_eq!(hello(&t.app, &wide_secret).await, StatusCode::OK);

    // A sibling within the caller's networks: a rotation bringing its expiry within the caller's
    // is fine; keeping its never-expiring one, or asking for a year, is not.
    let (near, _) = token(&t, "alice", &[], None, &["127.0.0.1"]).await;
    for body in [
        String::new(),
        format!(r#"{{"expiresAt": "{}"}}"#, in_days(365)),
    ] {
        let res = post(&t.app, &rotate(&near.id), &caller, &body).await;
        assert_forbidden(&res, "forbidden", "expiresAt");
    }
    let res = post(
        &t.app,
        &rotate(&near.id),
        &caller,
        &format!(r#"{{"expiresAt": "{}"}}"#, in_minutes(30)),
    )
    .await;
    assert_eq!(res.status, StatusCode::CREATED, "{}", res.text);
    assert_eq!(
        hello(&t.app, res.body["token"].as_str().unwrap()).await,
        StatusCode::OK
    );
    // Its own token, as it is: nothing more than it has.
    let me = get(&t.app, &format!("{BASE}/self"), &caller).await;
    let res = post(
        &t.app,
        &rotate(me.body["id"].as_str().unwrap()),
        &caller,
        "",
    )
    .await;
    assert_eq!(res.status, StatusCode::CREATED, "{}", res.text);
}

/// A leap second (`…:59:60.9Z`, which RFC 3339 allows at the end of any minute) orders before the
/// next minute when parsed, but is 0.9 s after it once kept to the microsecond: written as the
/// `expiresAt` of a create, a PATCH or a rotation, it passed the check against a caller expiring
/// at that minute and was stored later than the caller's expiry. The value checked is now the
/// value kept: refused, and nothing stored outlives the caller.
#[tokio::test]
async fn a_leap_second_expiry_cannot_outlive_the_caller() {
    use chrono::DurationRound;
    let t = app().await;
    // A whole minute about two hours from now, and the leap second before it.
    let ceiling = (Utc::now() + hours(2))
        .duration_trunc(chrono::Duration::minutes(1))
        .unwrap();
    let leap = format!(
        "{}:60.900000Z",
        (ceiling - chrono::Duration::minutes(1)).format("%Y-%m-%dT%H:%M")
    );
    let body = |extra: &str| format!(r#"{{"expiresAt": "{leap}"{extra}}}"#);
    let caller = |name: &'static str| {
        let mut new = NewToken::new("alice", name).scopes(RW).unwrap();
        new.expires_at = Some(ceiling);
        t.tokens.issue(new)
    };

    let (_, secret) = caller("creator").await.unwrap();
    let res = post(
        &t.app,
        BASE,
        secret.expose_secret(),
        &body(r#", "name": "child", "scopes": ["personalAccessToken:read"]"#),
    )
    .await;
    assert_forbidden(&res, "forbidden", "expiresAt");

    let (me, secret) = caller("patcher").await.unwrap();
    let res = patch(
        &t.app,
        &format!("{BASE}/{}", me.id),
        secret.expose_secret(),
        &body(""),
    )
    .await;
    assert_forbidden(&res, "forbidden", "expiresAt");
    assert_eq!(stored(&t, &me.id).await.expires_at, Some(ceiling));

    let (me, secret) = caller("rotator").await.unwrap();
    let res = post(
        &t.app,
        &format!("{BASE}/{}/rotate", me.id),
        secret.expose_secret(),
        &body(""),
    )
    .await;
    assert_forbidden(&res, "forbidden", "expiresAt");
    assert_eq!(stored(&t, &me.id).await.expires_at, Some(ceiling));
}

#[tokio::test]
async fn a_secret_in_its_grace_period_cannot_mint_a_longer_lived_token() {
    let t = app().await;
    let (me, old) = token(&t, "alice", RW, None, &[]).await;
    let res = post(
        &t.app,
        &format!("{BASE}/{}/rotate", me.id),
        &t.alice,
        r#"{"gracePeriodSeconds": 600}"#,
    )
    .await;
    assert_eq!(res.status, StatusCode::CREATED, "{}", res.text);
    let new = res.body["token"].as_str().unwrap().to_owned();
    // The superseded secret works for ten more minutes, but manages nothing: it can neither mint
    // a child (whatever its lifetime) nor rotate its own token to get a fresh secret.
    assert_eq!(hello(&t.app, &old).await, StatusCode::OK);
    for body in [
        r#"{"name": "c", "userAwareTokenNeverExpires": true}"#.to_owned(),
        format!(r#"{{"name": "c", "expiresAt": "{}"}}"#, in_hours(1)),
        format!(r#"{{"name": "c", "expiresAt": "{}"}}"#, in_minutes(5)),
    ] {
        let res = post(&t.app, BASE, &old, &body).await;
        assert!(
            res.error(403).contains("replaced by a rotation"),
            "{}",
            res.text
        );
    }
    let rotate = format!("{BASE}/{}/rotate", me.id);
    let res = post(&t.app, &rotate, &old, "").await;
    assert!(
        res.error(403).contains("replaced by a rotation"),
        "{}",
        res.text
    );
    assert_eq!(stored(&t, &me.id).await.hash, t.layer.hasher().hash(&new));
    assert_eq!(hello(&t.app, &new).await, StatusCode::OK);
}

// ---- Item 15: bounded lists and bodies. ----

/// `n` distinct IPv4 addresses as a JSON array (13 to 14 bytes each).
fn cidrs(n: usize) -> String {
    let nets: Vec<String> = (0..n)
        .map(|i| format!(r#""10.{}.{}.{}""#, i >> 16, (i >> 8) & 255, i & 255))
        .collect();
    format!("[{}]", nets.join(","))
}

fn scope_list(n: usize) -> String {
    let s: Vec<String> = (0..n).map(|i| format!(r#""s{i}:read""#)).collect();
    format!("[{}]", s.join(","))
}

#[tokio::test]
async fn scopes_and_networks_are_capped_at_100_by_default() {
    let t = app().await;
    let root = token(&t, "alice", &["*"], None, &[]).await.1;
    let body = |scopes: usize, nets: usize| {
        format!(
            r#"{{"name": "n{scopes}-{nets}", "userAwareTokenNeverExpires": true, "scopes": {}, "ipRestriction": {}}}"#,
            scope_list(scopes),
            cidrs(nets)
        )
    };
    let res = post(&t.app, BASE, &root, &body(101, 1)).await;
    assert!(res.error(400).starts_with("scopes:"), "{}", res.text);
    let res = post(&t.app, BASE, &root, &body(1, 101)).await;
    assert!(res.error(400).starts_with("ipRestriction:"), "{}", res.text);
    // The field's alias is named as sent, and a comma-separated string counts the same.
    let res = post(
        &t.app,
        BASE,
        &root,
        &format!(
            r#"{{"name": "x", "userAwareTokenNeverExpires": true, "scope": {}}}"#,
            scope_list(101)
        ),
    )
    .await;
    assert!(res.error(400).starts_with("scope:"), "{}", res.text);
    let csv = (0..101)
        .map(|i| format!("10.0.{i}.1"))
        .collect::<Vec<_>>()
        .join(",");
    let res = post(
        &t.app,
        BASE,
        &root,
        &format!(
            r#"{{"name": "x", "userAwareTokenNeverExpires": true, "ipRestriction": "{csv}"}}"#
        ),
    )
    .await;
    assert!(res.error(400).starts_with("ipRestriction:"), "{}", res.text);

    let res = create(&t.app, &root, &body(100, 100)).await;
    let id = res.body["id"].as_str().unwrap().to_owned();
    assert_eq!(stored(&t, &id).await.scopes.len(), 100);
    assert_eq!(stored(&t, &id).await.ip_restriction.len(), 100);
    // PATCH has the same caps.
    let uri = format!("{BASE}/{id}");
    let res = patch(
        &t.app,
        &uri,
        &root,
        &format!(r#"{{"scopes": {}}}"#, scope_list(101)),
    )
    .await;
    assert!(res.error(400).starts_with("scopes:"), "{}", res.text);
    let res = patch(
        &t.app,
        &uri,
        &root,
        &format!(r#"{{"ipRestriction": {}}}"#, cidrs(101)),
    )
    .await;
    assert!(res.error(400).starts_with("ipRestriction:"), "{}", res.text);
    assert_eq!(stored(&t, &id).await.ip_restriction.len(), 100);
}

#[tokio::test]
async fn the_caps_are_configurable() {
    let t = app_with(|c| c.max_scopes_per_token(2).max_networks_per_token(3)).await;
    let body = |scopes: usize, nets: usize| {
        format!(
            r#"{{"name": "n{scopes}-{nets}", "userAwareTokenNeverExpires": true, "scopes": {}, "ipRestriction": {}}}"#,
            scope_list(scopes).replace("s", "x:s").replace(":read", ""),
            cidrs(nets)
        )
    };
    let res = post(&t.app, BASE, &t.alice, &body(3, 1)).await;
    assert!(res.error(400).starts_with("scopes:"), "{}", res.text);
    let res = post(&t.app, BASE, &t.alice, &body(1, 4)).await;
    assert!(res.error(400).starts_with("ipRestriction:"), "{}", res.text);
    create(&t.app, &t.alice, &body(2, 3)).await;
}

#[tokio::test]
async fn a_huge_body_is_refused_before_it_is_parsed() {
    let t = app().await;
    // The issue's 2 MB body of 120 000 CIDRs.
    let big = format!(
        r#"{{"name": "big", "userAwareTokenNeverExpires": true, "ipRestriction": {}}}"#,
        cidrs(120_000)
    );
    assert!(big.len() > 1_000_000);
    let res = post(&t.app, BASE, &t.alice, &big).await;
    res.error(413);
    assert_eq!(res.body["code"], "payload_too_large");
    assert_eq!(res.headers["cache-control"], "no-store");
    let (target, _) = token(&t, "alice", &[], None, &[]).await;
    let uri = format!("{BASE}/{}", target.id);
    patch(&t.app, &uri, &t.alice, &big).await.error(413);
    post(&t.app, &format!("{uri}/rotate"), &t.alice, &big)
        .await
        .error(413);
    assert_eq!(stored(&t, &target.id).await, target);

    // Configurable.
    let t = app_with(|c| c.max_body_bytes(100)).await;
    let res = post(
        &t.app,
        BASE,
        &t.alice,
        &format!(
            r#"{{"name": "{}", "userAwareTokenNeverExpires": true}}"#,
            "a".repeat(100)
        ),
    )
    .await;
    res.error(413);
    create(
        &t.app,
        &t.alice,
        r#"{"name": "small", "userAwareTokenNeverExpires": true}"#,
    )
    .await;
}
