//! `POST /personal-access-tokens`: every rule of creation, and each seed API's own request.

#[cfg(feature = "postgres")]
mod common;
mod support_admin;

use std::time::Duration;

use chrono::Utc;
use http::StatusCode;
use support_admin::*;
use tower_pat::TokenStore;
use tower_pat::Tokens;
use tower_pat::admin::{AdminConfig, ExpiryPolicy, TokenView};

#[tokio::test]
async fn create_answers_201_with_location_and_the_secret_once() {
    let t = app().await;
    let res = create(
        &t.app,
        &t.alice,
        &format!(r#"{{"name": "laptop", "expiresAt": "{}"}}"#, in_days(30)),
    )
    .await;
    let id = res.body["id"].as_str().unwrap();
    assert_eq!(res.headers["location"], format!("{BASE}/{id}"));
    assert_eq!(res.headers["cache-control"], "no-store");
    let secret = res.body["token"].as_str().unwrap();
    assert!(secret.starts_with("pat_"));
    assert_eq!(res.body["secret"], secret);
    assert_eq!(res.body["accessToken"], secret);
    assert!(secret.starts_with(res.body["start"].as_str().unwrap()));
    assert_eq!(res.body["subject"], "alice");
    assert_eq!(res.body["userId"], "alice");
    assert_eq!(res.body["type"], "personal");
    assert_eq!(res.body["active"], true);
    assert_eq!(res.body["scopes"], serde_json::json!([]));

    // The secret works, the store holds only its hash, and it is never shown again.
    assert_eq!(hello(&t.app, secret).await, StatusCode::OK);
    let stored = t.store.get(id).await.unwrap().unwrap();
    assert_eq!(stored.hash, t.layer.hasher().hash(secret));
    for uri in [format!("{BASE}/{id}"), BASE.to_owned()] {
        let res = get(&t.app, &uri, &t.alice).await;
        assert_eq!(res.status, StatusCode::OK);
        assert!(!res.text.contains(secret), "{}", res.text);
        assert!(!res.text.contains(&stored.hash.to_hex()));
        assert!(!res.text.contains("\"secret\"") && !res.text.contains("\"token\""));
    }
    // The Location is the token's URL.
    let res = get(&t.app, res.headers["location"].to_str().unwrap(), &t.alice).await;
    assert_eq!(res.body["name"], "laptop");
}

#[tokio::test]
async fn name_is_required_at_most_256_characters_trimmed_and_unique_per_subject() {
    let t = app().await;
    let body = |name: &str| format!(r#"{{"name": {name}, "userAwareTokenNeverExpires": true}}"#);
    let msg = post(
        &t.app,
        BASE,
        &t.alice,
        r#"{"userAwareTokenNeverExpires": true}"#,
    )
    .await
    .error(400)
    .to_owned();
    assert!(msg.starts_with("name:"), "{msg}");
    for bad in ["\"\"", "\"   \"", &format!("\"{}\"", "é".repeat(257))] {
        let res = post(&t.app, BASE, &t.alice, &body(bad)).await;
        assert!(res.error(400).starts_with("name:"), "{}", res.text);
    }
    // 256 characters as sent (the schema's maxLength, white space included), trimmed after.
    let long = "é".repeat(256);
    let res = create(&t.app, &t.alice, &body(&format!("\"{long}\""))).await;
    assert_eq!(res.body["name"], long);
    let padded = format!("\" {} \"", "é".repeat(254));
    let res = create(&t.app, &t.alice, &body(&padded)).await;
    assert_eq!(res.body["name"], "é".repeat(254));
    let res = post(&t.app, BASE, &t.alice, &body(&format!("\" {long}\""))).await;
    assert!(res.error(400).starts_with("name:"), "{}", res.text);

    create(&t.app, &t.alice, &body("\"ci\"")).await;
    let res = post(&t.app, BASE, &t.alice, &body("\" ci \"")).await;
    assert!(res.error(409).contains("name"));
    // Another subject may use the name.
    let bob = issue(&t.tokens, "bob", &["personalAccessToken:write"]).await;
    create(&t.app, &bob, &body("\"ci\"")).await;
}

#[tokio::test]
async fn scopes_never_exceed_the_creators() {
    let t = app().await;
    let res = create(
        &t.app,
        &t.alice,
        r#"{"name": "a", "scopes": ["personalAccessToken:read"], "userAwareTokenNeverExpires": true}"#,
    )
    .await;
    assert_eq!(
        res.body["scopes"],
        serde_json::json!(["personalAccessToken:read"])
    );
    let res = post(
        &t.app,
        BASE,
        &t.alice,
        r#"{"name": "b", "scopes": ["personalAccessToken:read", "repo:write"], "userAwareTokenNeverExpires": true}"#,
    )
    .await;
    let msg = res.error(403);
    assert!(
        msg.contains("repo:write") && !msg.contains("personalAccessToken:read"),
        "{msg}"
    );
    assert_eq!(res.body["code"], "insufficient_scope");
    assert_eq!(t.store.count_by_subject("alice").await.unwrap(), 2);

    // `*` covers anything, `resource:*` its own resource.
    let root = issue(&t.tokens, "root", &["*"]).await;
    create(
        &t.app,
        &root,
        r#"{"name": "c", "scopes": ["repo:write", "x:*"], "userAwareTokenNeverExpires": true}"#,
    )
    .await;
    let res = post(
        &t.app,
        BASE,
        &t.alice,
        r#"{"name": "d", "scopes": ["personalAccessToken:write", "*"], "userAwareTokenNeverExpires": true}"#,
    )
    .await;
    assert!(res.error(403).contains('*'));
}

#[tokio::test]
async fn the_default_policy_requires_an_expiry_or_the_acknowledgment() {
    let t = app().await;
    let res = post(&t.app, BASE, &t.alice, r#"{"name": "a"}"#).await;
    let msg = res.error(400);
    assert!(
        msg.contains("expiresAt") && msg.contains("userAwareTokenNeverExpires"),
        "{msg}"
    );
    let res = post(
        &t.app,
        BASE,
        &t.alice,
        r#"{"name": "a", "userAwareTokenNeverExpires": false}"#,
    )
    .await;
    res.error(400);

    let res = create(
        &t.app,
        &t.alice,
        r#"{"name": "a", "userAwareTokenNeverExpires": true}"#,
    )
    .await;
    assert!(res.body["expiresAt"].is_null());

    let past = (Utc::now() - chrono::Duration::seconds(1)).to_rfc3339();
    let res = post(
        &t.app,
        BASE,
        &t.alice,
        &format!(r#"{{"name": "b", "expiresAt": "{past}"}}"#),
    )
    .await;
    assert!(res.error(400).starts_with("expiresAt:"));
    assert_eq!(t.store.count_by_subject("alice").await.unwrap(), 2);
}

#[tokio::test]
async fn a_default_lifetime_and_a_maximum_lifetime() {
    let day = Duration::from_secs(86_400);
    let t = app_with(|c| {
        c.expiry_policy(ExpiryPolicy::DefaultLifetime(7 * day))
            .max_lifetime(30 * day)
    })
    .await;
    let before = Utc::now();
    let res = create(&t.app, &t.alice, r#"{"name": "a"}"#).await;
    let exp = time(&res.body["expiresAt"]);
    assert!(exp >= before + chrono::Duration::days(7));
    assert!(exp <= Utc::now() + chrono::Duration::days(7));
    assert_eq!(res.body["expiryWarning"], "expires-soon");

    let res = post(
        &t.app,
        BASE,
        &t.alice,
        &format!(r#"{{"name": "b", "expiresAt": "{}"}}"#, in_days(31)),
    )
    .await;
    assert!(res.error(400).starts_with("expiresAt:"));
    create(
        &t.app,
        &t.alice,
        &format!(r#"{{"name": "b", "expiresAt": "{}"}}"#, in_days(29)),
    )
    .await;
    // With a maximum lifetime, no token lives forever.
    let res = post(
        &t.app,
        BASE,
        &t.alice,
        r#"{"name": "c", "userAwareTokenNeverExpires": true}"#,
    )
    .await;
    assert!(res.error(400).starts_with("userAwareTokenNeverExpires:"));

    // A default lifetime longer than the maximum is cut to it.
    let t = app_with(|c| {
        c.expiry_policy(ExpiryPolicy::DefaultLifetime(90 * day))
            .max_lifetime(30 * day)
    })
    .await;
    let res = create(&t.app, &t.alice, r#"{"name": "a"}"#).await;
    assert!(time(&res.body["expiresAt"]) <= Utc::now() + chrono::Duration::days(30));
}

#[tokio::test]
async fn the_maximum_number_of_tokens_per_subject() {
    let t = app_with(|c| c.max_tokens_per_subject(3)).await;
    // alice already has her bootstrap token.
    for name in ["a", "b"] {
        create(
            &t.app,
            &t.alice,
            &format!(r#"{{"name": "{name}", "userAwareTokenNeverExpires": true}}"#),
        )
        .await;
    }
    let res = post(
        &t.app,
        BASE,
        &t.alice,
        r#"{"name": "c", "userAwareTokenNeverExpires": true}"#,
    )
    .await;
    res.error(403);
    assert_eq!(res.body["code"], "token_limit_reached");
    assert_eq!(t.store.count_by_subject("alice").await.unwrap(), 3);
}

#[tokio::test]
async fn ip_restrictions_in_every_form_and_bad_cidrs() {
    let t = app().await;
    let cases = [
        (r#""10.0.0.0/8""#, vec!["10.0.0.0/8"]),
        (
            r#""10.0.0.0/8, 2001:db8::/32,192.0.2.7""#,
            vec!["10.0.0.0/8", "2001:db8::/32", "192.0.2.7/32"],
        ),
        (r#"["10.1.2.3/8", "::1"]"#, vec!["10.0.0.0/8", "::1/128"]),
        (r#""""#, vec![]),
    ];
    for (i, (input, expected)) in cases.into_iter().enumerate() {
        let res = create(
            &t.app,
            &t.alice,
            &format!(
                r#"{{"name": "n{i}", "ipRestriction": {input}, "userAwareTokenNeverExpires": true}}"#
            ),
        )
        .await;
        assert_eq!(res.body["ipRestriction"], serde_json::json!(expected));
    }
    for bad in [
        r#""10.0.0.300/8""#,
        r#""10.0.0.0/33""#,
        r#"["10.0.0.0/8", "nope"]"#,
    ] {
        let res = post(
            &t.app,
            BASE,
            &t.alice,
            &format!(
                r#"{{"name": "x", "ipRestriction": {bad}, "userAwareTokenNeverExpires": true}}"#
            ),
        )
        .await;
        assert!(res.error(400).starts_with("ipRestriction:"), "{}", res.text);
    }
}

#[tokio::test]
async fn a_field_of_the_wrong_type_is_named() {
    let t = app().await;
    let cases = [
        (r#"{"name": 5}"#, "name"),
        (r#"{"description": ["x"]}"#, "description"),
        (r#"{"name": "a", "scopes": 5}"#, "scopes"),
        (r#"{"name": "a", "scope": [1]}"#, "scope"),
        (r#"{"name": "a", "scopes": ["bad scope\""]}"#, "scopes"),
        (r#"{"name": "a", "expiresAt": 1700000000}"#, "expiresAt"),
        (
            r#"{"name": "a", "expirationDate": "next week"}"#,
            "expirationDate",
        ),
        (r#"{"name": "a", "expireAt": true}"#, "expireAt"),
        (
            r#"{"name": "a", "userAwareTokenNeverExpires": "yes"}"#,
            "userAwareTokenNeverExpires",
        ),
        (r#"{"name": "a", "ipRestriction": 10}"#, "ipRestriction"),
        (r#"{"name": "a", "type": {"kind": "ci"}}"#, "type"),
        (r#"{"name": "a", "description": "b"}"#, "name"),
    ];
    for (body, field) in cases {
        let res = post(&t.app, BASE, &t.alice, body).await;
        let msg = res.error(400);
        assert!(msg.starts_with(&format!("{field}:")), "{body}: {msg}");
        assert_eq!(res.body["code"], "invalid_request");
    }
    for body in ["not json", "[1, 2]", "\"name\"", ""] {
        post(&t.app, BASE, &t.alice, body).await.error(400);
    }
    assert_eq!(t.store.count_by_subject("alice").await.unwrap(), 1);
}

#[tokio::test]
async fn server_set_fields_are_ignored() {
    let t = app().await;
    // `revoked: true` and `subject: "bob"` used to be ignored here too: they are refused now
    // (tests/admin_escalation.rs); `false` and the caller's own subject ask for nothing more.
    let res = create(
        &t.app,
        &t.alice,
        r#"{"name": "a", "userAwareTokenNeverExpires": true, "id": "mine", "secret": "pat_x",
            "token": "pat_y", "createdAt": "2001-01-01T00:00:00Z", "seenAt": "2001-01-01T00:00:00Z",
            "lastUsedAt": "2001-01-01T00:00:00Z", "revoked": false, "subject": "alice"}"#,
    )
    .await;
    assert_ne!(res.body["id"], "mine");
    assert_ne!(res.body["token"], "pat_x");
    assert_ne!(res.body["token"], "pat_y");
    assert!(time(&res.body["createdAt"]) > Utc::now() - chrono::Duration::minutes(1));
    assert!(res.body["seenAt"].is_null() && res.body["lastUsedAt"].is_null());
    assert_eq!(res.body["revoked"], false);
    assert_eq!(res.body["subject"], "alice");
}

#[tokio::test]
async fn token_creation_is_rate_limited_per_subject() {
    let t = app_with(|c| c.creation_rate_limit(2, Duration::from_secs(60))).await;
    let body = |n: u32| format!(r#"{{"name": "n{n}", "userAwareTokenNeverExpires": true}}"#);
    create(&t.app, &t.alice, &body(1)).await;
    create(&t.app, &t.alice, &body(2)).await;
    let res = post(&t.app, BASE, &t.alice, &body(3)).await;
    let retry = res.too_many();
    assert!((1..=60).contains(&retry));
    // Another subject has its own budget.
    let bob = issue(&t.tokens, "bob", &["personalAccessToken:write"]).await;
    create(&t.app, &bob, &body(3)).await;
    // Off: no limit.
    let t = app_with(|c| c.creation_rate_limit(0, Duration::from_secs(60))).await;
    for n in 0..40 {
        create(&t.app, &t.alice, &body(n)).await;
    }
}

#[tokio::test]
async fn creating_needs_the_write_scope_and_a_token() {
    let t = app().await;
    let reader = issue(&t.tokens, "alice", &["personalAccessToken:read"]).await;
    let body = r#"{"name": "a", "userAwareTokenNeverExpires": true}"#;
    let res = post(&t.app, BASE, &reader, body).await;
    res.error(403);
    assert!(
        res.headers["www-authenticate"]
            .to_str()
            .unwrap()
            .contains("scope=\"personalAccessToken:write\"")
    );
    let res = call(&t.app, http::Method::POST, BASE, None, Some(body)).await;
    res.error(401);
    let res = post(&t.app, BASE, "pat_notarealtoken", body).await;
    res.error(401);
    let writer = issue(&t.tokens, "alice", &["personalAccessToken:write"]).await;
    create(&t.app, &writer, body).await;
}

// ---- Each seed API's own request, unchanged. ----

#[tokio::test]
async fn sailpoint_requests() {
    let t = app().await;
    let res = create(
        &t.app,
        &t.alice,
        &format!(
            r#"{{"name": "NodeJS Integration", "scope": ["personalAccessToken:read"], "expirationDate": "{}"}}"#,
            in_days(60)
        ),
    )
    .await;
    assert_eq!(
        res.body["scopes"],
        serde_json::json!(["personalAccessToken:read"])
    );
    assert!(res.body["expiresAt"].is_string());
    let res = create(
        &t.app,
        &t.alice,
        r#"{"name": "Forever", "scope": ["personalAccessToken:read"], "userAwareTokenNeverExpires": true}"#,
    )
    .await;
    assert!(res.body["expiresAt"].is_null());
    // expirationDate null and no acknowledgment: SailPoint's required validation.
    let res = post(
        &t.app,
        BASE,
        &t.alice,
        r#"{"name": "Nope", "scope": null, "expirationDate": null}"#,
    )
    .await;
    assert!(res.error(400).contains("userAwareTokenNeverExpires"));
}

#[tokio::test]
async fn unleash_request() {
    let t = app().await;
    let res = create(
        &t.app,
        &t.alice,
        &format!(
            r#"{{"description": "my-token", "expiresAt": "{}"}}"#,
            in_days(10)
        ),
    )
    .await;
    assert_eq!(res.body["name"], "my-token");
    assert!(res.headers.contains_key("location"));
    let secret = res.body["secret"].as_str().unwrap();
    assert_eq!(hello(&t.app, secret).await, StatusCode::OK);
    assert!(res.body.get("seenAt").is_some_and(|v| v.is_null()));
    assert!(res.body["createdAt"].is_string());
}

#[tokio::test]
async fn avisi_request_with_a_default_lifetime_and_with_the_default_policy() {
    let avisi = r#"{"name": "ci", "ipRestriction": "127.0.0.1/32", "type": "service"}"#;
    let t = app_with(|c| {
        c.expiry_policy(ExpiryPolicy::DefaultLifetime(Duration::from_secs(
            90 * 86_400,
        )))
    })
    .await;
    let res = create(&t.app, &t.alice, avisi).await;
    let view: TokenView = serde_json::from_value(res.body.clone()).unwrap();
    assert_eq!(view.token_type, "service");
    assert_eq!(
        res.body["ipRestriction"],
        serde_json::json!(["127.0.0.1/32"])
    );
    assert!(view.expires_at.is_some() && view.active);
    // The test client is 127.0.0.1: the restriction lets it in.
    assert_eq!(
        hello(&t.app, res.body["token"].as_str().unwrap()).await,
        StatusCode::OK
    );

    let t = app().await;
    let res = post(&t.app, BASE, &t.alice, avisi).await;
    assert!(res.error(400).contains("userAwareTokenNeverExpires"));
}

#[tokio::test]
async fn cryptlex_requests() {
    let t = app().await;
    let res = create(
        &t.app,
        &t.alice,
        &format!(
            r#"{{"name": "string", "scopes": ["personalAccessToken:read"], "expiresAt": "{}"}}"#,
            in_days(5)
        ),
    )
    .await;
    let secret = res.body["accessToken"].as_str().unwrap().to_owned();
    let id = res.body["id"].as_str().unwrap();
    assert_eq!(get(&t.app, "/hello", &secret).await.status, StatusCode::OK);

    let res = patch(
        &t.app,
        &format!("{BASE}/{id}"),
        &t.alice,
        r#"{"revoked": true}"#,
    )
    .await;
    assert_eq!(res.status, StatusCode::OK, "{}", res.text);
    assert_eq!(res.body["revoked"], true);
    assert_eq!(res.body["active"], false);
    assert_eq!(hello(&t.app, &secret).await, StatusCode::UNAUTHORIZED);
}

#[tokio::test]
async fn the_201_and_a_later_get_show_the_same_times_to_the_microsecond() {
    // SQLite keeps microseconds; the clock and a client's expiresAt have nanoseconds. The record
    // answered at creation is truncated as the store keeps it, so both reads agree.
    let path = std::env::temp_dir().join(format!(
        "tower-pat-precision-{}-{}.db",
        std::process::id(),
        Utc::now().timestamp_nanos_opt().unwrap_or_default()
    ));
    let store = tower_pat::SqliteStore::open(&path).await.unwrap();
    let tokens = tower_pat::Tokens::new(store.clone());
    let layer = tokens.layer().build();
    let app = axum::Router::new().nest(
        BASE,
        tower_pat::admin::router(tower_pat::admin::AdminConfig::new(&tokens, &layer).unwrap()),
    );
    let alice = issue(&tokens, "alice", &["personalAccessToken:*"]).await;
    let res = create(
        &app,
        &alice,
        r#"{"name": "precise", "expiresAt": "2031-01-02T03:04:05.123456789Z"}"#,
    )
    .await;
    assert_eq!(res.status, StatusCode::CREATED);
    let id = res.body["id"].as_str().unwrap();
    let later = get(&app, &format!("{BASE}/{id}"), &alice).await;
    for field in ["createdAt", "updatedAt", "expiresAt"] {
        assert_eq!(res.body[field], later.body[field], "{field}");
    }
    assert_eq!(res.body["expiresAt"], "2031-01-02T03:04:05.123456Z");
    drop(store);
    for suffix in ["", "-wal", "-shm"] {
        let _ = std::fs::remove_file(format!("{}{suffix}", path.display()));
    }
}

/// Two servers over one SQLite file (each with its own management API and its own in-process
/// lock), creations racing on both: the subject never goes past the limit, because the limit is
/// a condition of the store's insert, not a count read before it.
#[cfg(feature = "sqlite")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_per_subject_limit_holds_across_servers() {
    use tower_pat::store::SqliteStore;
    let dir = std::env::temp_dir().join(format!("tower-pat-limit-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("tokens.db");
    let _ = std::fs::remove_file(&path);
    let mut nodes = Vec::new();
    for _ in 0..2 {
        let store = SqliteStore::open(&path).await.unwrap();
        let tokens = Tokens::new(store);
        let layer = tokens.layer().build();
        let config = AdminConfig::new(&tokens, &layer)
            .unwrap()
            .max_tokens_per_subject(4)
            .creation_rate_limit(1_000, std::time::Duration::from_secs(60));
        let app = axum::Router::new().nest(BASE, tower_pat::admin::router(config));
        nodes.push((app, tokens));
    }
    // alice's own token is the first of her four.
    let alice = issue(&nodes[0].1, "alice", &["personalAccessToken:*"]).await;
    let racers: Vec<_> = (0..12)
        .map(|i| {
            let app = nodes[i % 2].0.clone();
            let alice = alice.clone();
            tokio::spawn(async move {
                let body = format!(r#"{{"name": "r{i}", "userAwareTokenNeverExpires": true}}"#);
                post(&app, BASE, &alice, &body).await.status
            })
        })
        .collect();
    let mut created = 0;
    for racer in racers {
        match racer.await.unwrap() {
            StatusCode::CREATED => created += 1,
            StatusCode::FORBIDDEN => {}
            other => panic!("unexpected {other}"),
        }
    }
    assert_eq!(created, 3);
    assert_eq!(
        nodes[1].1.store().count_by_subject("alice").await.unwrap(),
        4
    );
    let _ = std::fs::remove_dir_all(dir);
}

/// Lifetimes too long to add to the current time (a configuration's `Duration::MAX`, a grace of
/// `u64::MAX` seconds) reach 9999-12-31T23:59:59Z, which every store keeps: not a store error on
/// every creation (PostgreSQL refuses times from the year 200 000 on), and not a maximum lifetime
/// that stops holding because it cannot be added.
async fn lifetimes_too_long_to_add(tokens: Tokens) {
    let layer = tokens.layer().build();
    let alice = issue(&tokens, "alice", &["personalAccessToken:*"]).await;
    let config = AdminConfig::new(&tokens, &layer)
        .unwrap()
        .expiry_policy(ExpiryPolicy::DefaultLifetime(Duration::MAX))
        .max_lifetime(Duration::MAX)
        .max_rotation_grace(Duration::MAX);
    let app = axum::Router::new()
        .nest(BASE, tower_pat::admin::router(config))
        .route(
            "/hello",
            axum::routing::get(|| async { "hello" }).layer(layer.clone()),
        );
    let latest: chrono::DateTime<Utc> = "9999-12-31T23:59:59Z".parse().unwrap();
    let res = create(&app, &alice, r#"{"name": "far"}"#).await;
    assert_eq!(time(&res.body["expiresAt"]), latest, "{}", res.text);
    let id = res.body["id"].as_str().unwrap().to_owned();
    let old = res.body["token"].as_str().unwrap().to_owned();
    let read = get(&app, &format!("{BASE}/{id}"), &alice).await;
    assert_eq!(time(&read.body["expiresAt"]), latest, "{}", read.text);
    assert_eq!(hello(&app, &old).await, StatusCode::OK);

    // The latest time may be asked for; a later one, in UTC, may not: not a microsecond after it,
    // not a year-9999 time whose offset puts it in the year 10000, by any write.
    let res = create(
        &app,
        &alice,
        r#"{"name": "last", "expiresAt": "9999-12-31T23:59:59Z"}"#,
    )
    .await;
    assert_eq!(time(&res.body["expiresAt"]), latest, "{}", res.text);
    for late in ["9999-12-31T23:59:59.000001Z", "9999-12-31T23:59:59-10:00"] {
        let body = format!(r#"{{"name": "later", "expiresAt": "{late}"}}"#);
        let res = post(&app, BASE, &alice, &body).await;
        assert_eq!(
            res.error(400),
            "expiresAt: must be at most 9999-12-31T23:59:59Z"
        );
        let body = format!(r#"{{"expiresAt": "{late}"}}"#);
        let res = patch(&app, &format!("{BASE}/{id}"), &alice, &body).await;
        assert_eq!(
            res.error(400),
            "expiresAt: must be at most 9999-12-31T23:59:59Z"
        );
        let res = post(&app, &format!("{BASE}/{id}/rotate"), &alice, &body).await;
        assert_eq!(
            res.error(400),
            "expiresAt: must be at most 9999-12-31T23:59:59Z"
        );
    }

    // The maximum, however long, still refuses a token that never expires.
    let res = post(
        &app,
        BASE,
        &alice,
        r#"{"name": "never", "userAwareTokenNeverExpires": true}"#,
    )
    .await;
    assert!(res.error(400).starts_with("userAwareTokenNeverExpires:"));

    // The longest grace there is: the rotation succeeds and the old secret keeps working.
    let res = post(
        &app,
        &format!("{BASE}/{id}/rotate"),
        &alice,
        &format!(r#"{{"gracePeriodSeconds": {}}}"#, u64::MAX),
    )
    .await;
    assert_eq!(res.status, StatusCode::CREATED, "{}", res.text);
    assert_eq!(time(&res.body["previousTokenValidUntil"]), latest);
    let new = res.body["token"].as_str().unwrap().to_owned();
    assert_ne!(new, old);
    assert_eq!(hello(&app, &new).await, StatusCode::OK);
    assert_eq!(hello(&app, &old).await, StatusCode::OK);
}

#[tokio::test]
async fn lifetimes_too_long_to_add_reach_the_latest_time_in_memory() {
    lifetimes_too_long_to_add(Tokens::new(tower_pat::MemoryStore::new())).await;
}

#[cfg(feature = "sqlite")]
#[tokio::test]
async fn lifetimes_too_long_to_add_reach_the_latest_time_in_sqlite() {
    let store = tower_pat::SqliteStore::in_memory().await.unwrap();
    lifetimes_too_long_to_add(Tokens::new(store)).await;
}

#[cfg(feature = "postgres")]
#[tokio::test]
async fn lifetimes_too_long_to_add_reach_the_latest_time_in_postgres() {
    let Some(db) = common::pg::TestDb::create("admin_create").await else {
        return;
    };
    let store = tower_pat::PostgresStore::builder()
        .connect_with(db.options.clone())
        .await
        .unwrap();
    lifetimes_too_long_to_add(Tokens::new(store.clone())).await;
    store.pool().close().await;
}

/// Without a maximum lifetime, an expiry after 9999-12-31T23:59:59Z in UTC (which no answer could
/// write in RFC 3339, and which expiry notices would never reach) is refused, not stored.
#[tokio::test]
async fn an_expiry_after_the_latest_time_is_refused_without_a_maximum_lifetime() {
    let t = app().await;
    let body = r#"{"name": "later", "expiresAt": "9999-12-31T23:59:59-10:00"}"#;
    let res = post(&t.app, BASE, &t.alice, body).await;
    assert_eq!(
        res.error(400),
        "expiresAt: must be at most 9999-12-31T23:59:59Z"
    );
    let res = create(
        &t.app,
        &t.alice,
        r#"{"name": "last", "expiresAt": "9999-12-31T23:59:59+00:00"}"#,
    )
    .await;
    assert_eq!(
        res.body["expiresAt"], "9999-12-31T23:59:59Z",
        "{}",
        res.text
    );
}
