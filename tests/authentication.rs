//! Extraction, format check and lookup: who gets in and what the handler sees.

mod common;

use common::*;
use http::Request;
use http_body_util::Full;
use tower_pat::{MemoryStore, PatAuthLayer, ScopeSet, TokenFormat};

#[tokio::test]
async fn valid_token_reaches_the_handler_with_its_principal() {
    let store = MemoryStore::new();
    let (record, secret) = Tokens::new(store.clone())
        .issue(new_token("alice", &["repo:read", "repo:write"]))
        .await
        .unwrap();
    let layer = PatAuthLayer::builder(store).build();
    let reply = send_token(&layer, &secret).await;
    assert_eq!(reply.status, 200);
    assert_eq!(
        reply.body,
        format!("alice|repo:read repo:write|{}", record.id)
    );
}

#[tokio::test]
async fn no_credentials_get_a_bare_challenge() {
    let layer = PatAuthLayer::builder(MemoryStore::new())
        .realm("acme")
        .build();
    let reply = send(&layer, request(None, None)).await;
    assert_eq!(reply.status, 401);
    assert_eq!(reply.www_authenticate(), "Bearer realm=\"acme\"");
    assert!(!reply.www_authenticate().contains("error"));
    assert_eq!(reply.json()["status"], 401);
    assert_eq!(reply.headers["content-type"], "application/json");
}

#[tokio::test]
async fn malformed_and_bad_checksum_tokens_never_reach_the_store() {
    let store = CountingStore::new();
    let (_, secret) = Tokens::new(store.inner.clone())
        .issue(new_token("alice", &[]))
        .await
        .unwrap();
    let layer = PatAuthLayer::builder(store.clone()).build();
    let good = secret.expose_secret();
    let mut bad_checksum = good.to_owned();
    let last = if good.ends_with('A') { "B" } else { "A" };
    bad_checksum.replace_range(good.len() - 1.., last);
    for token in [
        "pat_short",
        "not-a-token-at-all",
        &bad_checksum,
        &good.replace("pat_", "xyz_"),
        &format!("{good}x"),
    ] {
        let reply = send(&layer, request(Some(token), None)).await;
        assert_eq!(reply.status, 401, "{token}");
        assert!(reply.www_authenticate().contains("error=\"invalid_token\""));
        assert_eq!(reply.json()["code"], "invalid_token");
    }
    assert_eq!(store.lookups(), 0);
    assert_eq!(layer.store_lookups(), 0);
}

#[tokio::test]
async fn unknown_well_formed_token_is_rejected_and_negatively_cached() {
    let store = CountingStore::new();
    let layer = PatAuthLayer::builder(store.clone()).build();
    let unknown = TokenFormat::new().generate();
    for _ in 0..3 {
        let reply = send(&layer, request(Some(unknown.expose_secret()), None)).await;
        assert_eq!(reply.status, 401);
        assert_eq!(reply.json()["code"], "invalid_token");
        assert_eq!(reply.json()["message"], "the access token is invalid");
    }
    assert_eq!(store.lookups(), 1, "the miss is cached");
}

#[tokio::test]
async fn cached_token_needs_no_further_lookups() {
    let store = CountingStore::new();
    let (_, secret) = Tokens::new(store.inner.clone())
        .issue(new_token("alice", &[]))
        .await
        .unwrap();
    let layer = PatAuthLayer::builder(store.clone()).build();
    for _ in 0..10 {
        let reply = send_token(&layer, &secret).await;
        assert_eq!(reply.status, 200);
    }
    assert_eq!(store.lookups(), 1);
    assert_eq!(layer.cached_tokens(), 1);
}

#[tokio::test]
async fn scheme_is_case_insensitive() {
    let store = MemoryStore::new();
    let (_, secret) = Tokens::new(store.clone())
        .issue(new_token("alice", &[]))
        .await
        .unwrap();
    let layer = PatAuthLayer::builder(store).build();
    for scheme in ["bearer", "BEARER", "BeArEr"] {
        let req = Request::builder()
            .header(
                "authorization",
                format!("{scheme} {}", secret.expose_secret()),
            )
            .body(Full::default())
            .unwrap();
        assert_eq!(send(&layer, req).await.status, 200, "{scheme}");
    }
}

#[tokio::test]
async fn two_different_credentials_are_an_invalid_request() {
    let store = MemoryStore::new();
    let (_, a) = Tokens::new(store.clone())
        .issue(new_token("alice", &[]))
        .await
        .unwrap();
    let (_, b) = Tokens::new(store.clone())
        .issue(new_token("bob", &[]))
        .await
        .unwrap();
    let layer = PatAuthLayer::builder(store)
        .accept_header(http::HeaderName::from_static("x-api-key"))
        .build();
    let req = Request::builder()
        .header("authorization", format!("Bearer {}", a.expose_secret()))
        .header("x-api-key", b.expose_secret())
        .body(Full::default())
        .unwrap();
    let reply = send(&layer, req).await;
    assert_eq!(reply.status, 400);
    assert!(
        reply
            .www_authenticate()
            .contains("error=\"invalid_request\"")
    );
    assert_eq!(reply.json()["code"], "invalid_request");

    // Two Authorization headers with different tokens, too.
    let req = Request::builder()
        .header("authorization", format!("Bearer {}", a.expose_secret()))
        .header("authorization", format!("Bearer {}", b.expose_secret()))
        .body(Full::default())
        .unwrap();
    assert_eq!(send(&layer, req).await.status, 400);

    // The same token twice is one credential.
    let req = Request::builder()
        .header("authorization", format!("Bearer {}", a.expose_secret()))
        .header("x-api-key", a.expose_secret())
        .body(Full::default())
        .unwrap();
    assert_eq!(send(&layer, req).await.status, 200);
}

/// RFC 9110 allows one `Authorization` field: a second one that is not the same token is a
/// second credential, whatever its scheme, also for a layer that passes foreign credentials on.
/// Were it ignored, a component behind the layer reading the first field (`Basic` bob) would
/// act for another identity than the handler's principal (alice).
#[tokio::test]
async fn a_second_authorization_header_of_another_scheme_is_a_second_credential() {
    let store = MemoryStore::new();
    let (_, secret) = Tokens::new(store.clone())
        .issue(new_token("alice", &[]))
        .await
        .unwrap();
    let bearer = format!("Bearer {}", secret.expose_secret());
    let token = format!("Token {}", secret.expose_secret());
    let two = |first: &str, second: &str| {
        Request::builder()
            .header("authorization", first)
            .header("authorization", second)
            .body(Full::default())
            .unwrap()
    };
    let token_scheme = PatAuthLayer::builder(store.clone())
        .accept_token_scheme()
        .build();
    for layer in [
        PatAuthLayer::builder(store.clone()).build(),
        PatAuthLayer::builder(store.clone())
            .pass_foreign_credentials()
            .build(),
        PatAuthLayer::builder(store.clone())
            .accept_raw_authorization()
            .build(),
        token_scheme.clone(),
    ] {
        // Another scheme, an empty value, a scheme without a credential.
        for other in ["Basic Ym9iOnBhc3N3b3Jk", "", "Bearer", "Token"] {
            for (first, second) in [(bearer.as_str(), other), (other, bearer.as_str())] {
                let reply = send(&layer, two(first, second)).await;
                assert_eq!(reply.status, 400, "{first:?} then {second:?}");
                assert_eq!(reply.json()["code"], "invalid_request");
            }
        }
        // Two values of another scheme are two credentials as well.
        let reply = send(&layer, two("Basic Ym9iOnBhc3N3b3Jk", "Basic YWxpY2U6eA==")).await;
        assert_eq!(reply.status, 400);
        // The same token twice is one credential, in any spelling the layer reads.
        assert_eq!(send(&layer, two(&bearer, &bearer)).await.status, 200);
        let lower = format!("bearer  {} ", secret.expose_secret());
        assert_eq!(send(&layer, two(&lower, &bearer)).await.status, 200);
    }
    assert_eq!(send(&token_scheme, two(&token, &bearer)).await.status, 200);
}

#[tokio::test]
async fn optional_sources_are_off_until_configured() {
    let store = MemoryStore::new();
    let (_, secret) = Tokens::new(store.clone())
        .issue(new_token("alice", &[]))
        .await
        .unwrap();
    let t = secret.expose_secret();
    let strict = PatAuthLayer::builder(store.clone()).build();
    let open = PatAuthLayer::builder(store)
        .accept_token_scheme()
        .accept_raw_authorization()
        .accept_header(http::HeaderName::from_static("private-token"))
        .accept_query_parameter()
        .build();
    let reqs = || {
        vec![
            Request::builder().header("authorization", format!("Token {t}")),
            Request::builder().header("authorization", t),
            Request::builder().header("private-token", t),
            Request::builder().uri(format!("/x?a=1&access_token={t}")),
        ]
    };
    for b in reqs() {
        let reply = send(&strict, b.body(Full::default()).unwrap()).await;
        assert_eq!(reply.status, 401);
        assert_eq!(reply.www_authenticate(), "Bearer realm=\"api\"");
    }
    for b in reqs() {
        assert_eq!(
            send(&open, b.body(Full::default()).unwrap()).await.status,
            200
        );
    }
}

#[tokio::test]
async fn anonymous_mode_lets_requests_without_credentials_through_only() {
    let store = MemoryStore::new();
    let layer = PatAuthLayer::builder(store).allow_anonymous().build();
    let reply = send(&layer, request(None, None)).await;
    assert_eq!(reply.status, 200);
    assert_eq!(reply.body, "anonymous");
    let bad = send(&layer, request(Some("pat_garbage"), None)).await;
    assert_eq!(bad.status, 401);
}

/// "A request with bad credentials is still refused": also a token in a spelling or source the
/// layer does not read, which would otherwise count as no credential at all and reach the
/// handler as anonymous (uncounted by the failure limit, and with the token in the request for
/// whatever behind reads it). A credential that is not one of the layer's tokens still counts
/// as none.
#[tokio::test]
async fn anonymous_mode_refuses_a_token_in_a_spelling_it_does_not_read() {
    let store = MemoryStore::new();
    let tokens = Tokens::new(store.clone());
    let (record, revoked) = tokens.issue(new_token("alice", &[])).await.unwrap();
    tokens.revoke(&record.id).await.unwrap();
    let revoked = revoked.expose_secret();
    let with = |value: &str| {
        let req = match value.strip_prefix('?') {
            Some(_) => Request::builder().uri(format!("/resource{value}")),
            None => Request::builder()
                .uri("/resource")
                .header("authorization", value),
        };
        req.body(Full::default()).unwrap()
    };
    for layer in [
        PatAuthLayer::builder(store.clone())
            .allow_anonymous()
            .build(),
        PatAuthLayer::builder(store.clone())
            .allow_anonymous()
            .pass_foreign_credentials()
            .build(),
    ] {
        assert_eq!(
            send(&layer, with(&format!("Bearer {revoked}")))
                .await
                .status,
            401
        );
        for value in [
            format!("Bearer\t{revoked}"),
            format!("Token {revoked}"),
            format!("Bearer  {}", revoked.to_uppercase()),
            format!("?access_token={revoked}"),
            format!("?%61ccess_token=%70at_{}", &revoked[4..]),
        ] {
            let reply = send(&layer, with(&value)).await;
            assert_eq!(
                reply.status, 401,
                "{value:?}: reached the handler as {:?}",
                reply.body
            );
        }
        // Nothing of the layer's: anonymous as before.
        let reply = send(&layer, with("Basic Ym9iOnBhc3N3b3Jk")).await;
        assert_eq!(reply.status, 200);
        assert_eq!(reply.body, "anonymous");
        assert_eq!(send(&layer, with("?access_token=abc")).await.status, 200);
    }
}

/// With the query source on, every key an application behind may read as `access_token` is a
/// credential: a second token behind a percent-encoded key, another letter case, a name PHP
/// renames to it or a `;` separator would otherwise be seen by the application and not by the
/// layer, which admitted the first token's principal.
#[tokio::test]
async fn a_second_token_under_any_spelling_of_the_query_key_is_a_second_credential() {
    let store = MemoryStore::new();
    let tokens = Tokens::new(store.clone());
    let (_, a) = tokens.issue(new_token("alice", &[])).await.unwrap();
    let (_, b) = tokens.issue(new_token("bob", &[])).await.unwrap();
    let (a, b) = (a.expose_secret(), b.expose_secret());
    let layer = PatAuthLayer::builder(store)
        .accept_query_parameter()
        .build();
    let get = |uri: &str, authorization: Option<&str>| {
        let mut req = Request::builder().uri(uri);
        if let Some(value) = authorization {
            req = req.header("authorization", value);
        }
        req.body(Full::default()).unwrap()
    };
    let bearer = format!("Bearer {a}");
    for key in [
        "access_token",
        "%61ccess_token",
        "access%5Ftoken",
        "ACCESS_TOKEN",
        "access.token",
        "access+token",
        "access[token",
        "+access_token",
        "access_token%00x",
    ] {
        for (uri, authorization) in [
            (format!("/r?access_token={a}&{key}={b}"), None),
            (format!("/r?{key}={b}&access_token={a}"), None),
            (format!("/r?x=1;{key}={b}&access_token={a}"), None),
            (format!("/r?{key}={b}"), Some(bearer.as_str())),
        ] {
            let reply = send(&layer, get(&uri, authorization)).await;
            assert_eq!(reply.status, 400, "{uri} {authorization:?}: {}", reply.body);
            assert_eq!(reply.json()["code"], "invalid_request");
        }
        // The same token under two spellings is one credential.
        assert_eq!(
            send(&layer, get(&format!("/r?access_token={a}&{key}={a}"), None))
                .await
                .status,
            200,
            "{key}"
        );
    }
    // Keys that are not it, and a `;` ending the value.
    for uri in [
        format!("/r?access_token={a}&access_tokens={b}&xaccess_token={b}&access[token]={b}"),
        format!("/r?access_token={a};x=1"),
    ] {
        assert_eq!(send(&layer, get(&uri, None)).await.status, 200, "{uri}");
    }
}

#[tokio::test]
async fn header_bytes_outside_ascii_are_an_invalid_request() {
    let layer = PatAuthLayer::builder(MemoryStore::new()).build();
    let req = Request::builder()
        .header(
            "authorization",
            http::HeaderValue::from_bytes(b"Bearer pat_\xff\xfe").unwrap(),
        )
        .body(Full::default())
        .unwrap();
    let reply = send(&layer, req).await;
    assert_eq!(reply.status, 400);
    assert_eq!(reply.json()["code"], "invalid_request");
}

#[tokio::test]
async fn errors_never_echo_the_token() {
    let store = MemoryStore::new();
    let layer = PatAuthLayer::builder(store).build();
    let unknown = TokenFormat::new().generate();
    let reply = send(&layer, request(Some(unknown.expose_secret()), None)).await;
    assert!(!reply.body.contains(unknown.expose_secret()));
    assert!(!reply.www_authenticate().contains(unknown.expose_secret()));
    assert!(!format!("{unknown:?}").contains(unknown.expose_secret()));
}

#[tokio::test]
async fn repeated_failures_from_one_client_are_throttled() {
    let store = CountingStore::new();
    let (_, secret) = Tokens::new(store.inner.clone())
        .issue(new_token("alice", &[]))
        .await
        .unwrap();
    let layer = PatAuthLayer::builder(store.clone())
        .limit_failures(3, std::time::Duration::from_secs(60))
        .build();
    let attacker = Some("203.0.113.66:4000");
    for _ in 0..3 {
        let guess = TokenFormat::new().generate();
        assert_eq!(
            send(&layer, request(Some(guess.expose_secret()), attacker))
                .await
                .status,
            401
        );
    }
    let reply = send(&layer, request(Some(secret.expose_secret()), attacker)).await;
    assert_eq!(reply.status, 429);
    assert_eq!(reply.headers["retry-after"], "60");
    assert_eq!(reply.json()["code"], "too_many_requests");
    // Another client is not affected, and the throttled requests cost no store query.
    let lookups = store.lookups();
    assert_eq!(
        send(
            &layer,
            request(Some(secret.expose_secret()), Some("192.0.2.1:1"))
        )
        .await
        .status,
        200
    );
    assert_eq!(store.lookups(), lookups + 1);
}

#[tokio::test]
async fn anonymous_mode_does_not_bypass_required_scopes() {
    // A token lacking the scope gets 403: a request with no token at all must not do better.
    let store = MemoryStore::new();
    let (_, unscoped) = Tokens::new(store.clone())
        .issue(new_token("alice", &["other:read"]))
        .await
        .unwrap();
    let (_, scoped) = Tokens::new(store.clone())
        .issue(new_token("bob", &["repo:read"]))
        .await
        .unwrap();
    let layer = PatAuthLayer::builder(store)
        .realm("acme")
        .require_scopes(["repo:read"])
        .allow_anonymous()
        .build();
    let reply = send(&layer, request(None, None)).await;
    assert_eq!(reply.status, 401, "{}", reply.body);
    assert_eq!(reply.www_authenticate(), "Bearer realm=\"acme\"");
    assert_eq!(send_token(&layer, &unscoped).await.status, 403);
    assert_eq!(send_token(&layer, &scoped).await.status, 200);
}

#[tokio::test]
async fn verify_applies_the_layers_rules_and_fails_closed_without_an_address() {
    use tower_pat::record::parse_ip_net;
    use tower_pat::{AuthError, ScopeSet, TokenStore};

    let store = MemoryStore::new();
    let net = parse_ip_net("203.0.113.0/24").unwrap();
    let (_, restricted) = Tokens::new(store.clone())
        .issue(new_token("alice", &["api:read", "deploy:write"]).ip_restriction([net]))
        .await
        .unwrap();
    let (record, open) = Tokens::new(store.clone())
        .issue(new_token("bob", &["api:read"]))
        .await
        .unwrap();
    let layer = PatAuthLayer::builder(store.clone())
        .require_scopes(["api:read"])
        .build();
    let none = ScopeSet::empty();
    let inside = Some("203.0.113.9".parse().unwrap());
    let outside = Some("198.51.100.1".parse().unwrap());

    // IP restriction: an unknown address fails closed.
    let t = restricted.expose_secret();
    assert_eq!(
        layer.verify(t, None, &none).await.err(),
        Some(AuthError::IpNotAllowed)
    );
    assert_eq!(
        layer.verify(t, outside, &none).await.err(),
        Some(AuthError::IpNotAllowed)
    );
    let mapped = Some("::ffff:203.0.113.9".parse().unwrap());
    assert_eq!(
        layer.verify(t, mapped, &none).await.unwrap().subject(),
        "alice"
    );
    assert_eq!(
        layer.verify(t, inside, &none).await.unwrap().subject(),
        "alice"
    );

    // The layer's scopes and the caller's.
    let deploy = ScopeSet::parse(["deploy:write"]).unwrap();
    assert!(layer.verify(t, inside, &deploy).await.is_ok());
    let o = open.expose_secret();
    assert_eq!(layer.verify(o, None, &none).await.unwrap().subject(), "bob");
    match layer.verify(o, None, &deploy).await {
        Err(AuthError::InsufficientScope(named)) => {
            assert_eq!(named.to_space_separated(), "api:read deploy:write");
        }
        other => panic!("{:?}", other.map(|p| p.subject().to_owned())),
    }
    let strict = PatAuthLayer::builder(store.clone())
        .require_scopes(["admin"])
        .build();
    assert!(matches!(
        strict.verify(o, None, &none).await,
        Err(AuthError::InsufficientScope(_))
    ));

    // Format, unknown, revoked.
    assert_eq!(
        layer.verify("pat_x", None, &none).await.err(),
        Some(AuthError::InvalidToken)
    );
    let unknown = TokenFormat::new().generate();
    assert_eq!(
        layer
            .verify(unknown.expose_secret(), None, &none)
            .await
            .err(),
        Some(AuthError::InvalidToken)
    );
    store.revoke(&record.id, chrono::Utc::now()).await.unwrap();
    assert_eq!(
        layer.verify(o, None, &none).await.err(),
        Some(AuthError::Revoked)
    );
}

#[tokio::test]
async fn verify_counts_failures_like_requests() {
    use tower_pat::{AuthError, ScopeSet};

    let store = MemoryStore::new();
    let (_, secret) = Tokens::new(store.clone())
        .issue(new_token("alice", &[]))
        .await
        .unwrap();
    let layer = PatAuthLayer::builder(store)
        .limit_failures(2, std::time::Duration::from_secs(60))
        .build();
    let none = ScopeSet::empty();
    let attacker = Some("2001:db8:1:2::1".parse().unwrap());
    for _ in 0..2 {
        let guess = TokenFormat::new().generate();
        assert_eq!(
            layer
                .verify(guess.expose_secret(), attacker, &none)
                .await
                .err(),
            Some(AuthError::InvalidToken)
        );
    }
    // The same /64, through verify or through a request.
    let neighbour = Some("2001:db8:1:2::99".parse().unwrap());
    assert!(matches!(
        layer.verify(secret.expose_secret(), neighbour, &none).await,
        Err(AuthError::TooManyAttempts { .. })
    ));
    let reply = send(
        &layer,
        request(Some(secret.expose_secret()), Some("[2001:db8:1:2::7]:1")),
    )
    .await;
    assert_eq!(reply.status, 429);
    assert!(
        layer
            .verify(secret.expose_secret(), None, &none)
            .await
            .is_ok()
    );
}

/// Requests at once get no more guesses than the failure limit: each store lookup counts as a
/// failure until it is answered, so a burst of 200 unknown tokens from one client (a list of
/// scraped tokens tested for life over one HTTP/2 connection) reaches the store 5 times, not
/// 160 (review), the rest answered 429; the same through `PatAuthLayer::verify`. And lookups in
/// progress only make a client's valid tokens wait: a burst of distinct valid tokens from one
/// client, more than the limit, is served.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_burst_of_guesses_gets_no_more_store_lookups_than_the_failure_limit() {
    use tower::{Layer, ServiceExt};
    const MAX: usize = 5;
    const BURST: usize = 200;
    let store = CountingStore::new();
    // A store on the network: 5 ms a lookup.
    store.delay_ms.store(5, std::sync::atomic::Ordering::SeqCst);
    let layer = PatAuthLayer::builder(store.clone())
        .limit_failures(MAX as u32, std::time::Duration::from_secs(60))
        .build();
    let svc = layer.clone().layer(echo_service());
    let statuses = |from: &'static str, tokens: Vec<String>| {
        let svc = svc.clone();
        async move {
            let tasks: Vec<_> = tokens
                .into_iter()
                .map(|token| {
                    let svc = svc.clone();
                    tokio::spawn(async move {
                        let req = request(Some(&token), Some(from));
                        svc.oneshot(req).await.unwrap().status().as_u16()
                    })
                })
                .collect();
            let mut statuses = Vec::new();
            for t in tasks {
                statuses.push(t.await.unwrap());
            }
            statuses
        }
    };
    let guesses = || -> Vec<String> {
        (0..BURST)
            .map(|_| TokenFormat::new().generate().expose_secret().to_owned())
            .collect()
    };
    let answered = statuses("203.0.113.66:4000", guesses()).await;
    let count = |code: u16| answered.iter().filter(|s| **s == code).count();
    assert_eq!((count(401), count(429)), (MAX, BURST - MAX), "{answered:?}");
    assert_eq!(store.lookups(), MAX);

    // Through verify, from another client.
    let client = Some("198.51.100.9".parse().unwrap());
    let tasks: Vec<_> = guesses()
        .into_iter()
        .map(|guess| {
            let layer = layer.clone();
            tokio::spawn(async move {
                let verified = layer.verify(&guess, client, &ScopeSet::empty()).await;
                verified.err().map(|e| e.status().as_u16())
            })
        })
        .collect();
    let mut verified = Vec::new();
    for t in tasks {
        verified.push(t.await.unwrap());
    }
    let count = |code: u16| verified.iter().filter(|s| **s == Some(code)).count();
    assert_eq!((count(401), count(429)), (MAX, BURST - MAX), "{verified:?}");
    assert_eq!(store.lookups(), 2 * MAX);

    // Valid tokens, three times the limit at once from one client: all served.
    let mut valid = Vec::new();
    for n in 0..3 * MAX {
        let (_, secret) = Tokens::new(store.inner.clone())
            .issue(new_token(&format!("user-{n}"), &[]))
            .await
            .unwrap();
        valid.push(secret.expose_secret().to_owned());
    }
    let answered = statuses("192.0.2.44:1", valid).await;
    assert!(answered.iter().all(|s| *s == 200), "{answered:?}");
}

/// A burst sent just before its network's window ends: the attempts in progress are answered
/// after the window expired and their failures count in the next one, so the requests waiting
/// must move to the next window too. Before, they kept taking attempts on the old window, whose
/// count never grew, until `lookup_wait`: all 300 guesses reached the store (review). At most
/// the two windows' room now.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_burst_at_the_end_of_a_window_gets_no_more_than_two_windows_of_lookups() {
    use std::sync::atomic::Ordering::SeqCst;
    use std::time::Duration;
    use tower::{Layer, ServiceExt};
    const MAX: usize = 5;
    const BURST: usize = 300;
    let store = CountingStore::new();
    store.delay_ms.store(40, SeqCst);
    let window = Duration::from_millis(400);
    let layer = PatAuthLayer::builder(store.clone())
        .limit_failures(MAX as u32, window)
        .build();
    let svc = layer.layer(echo_service());
    let from = "203.0.113.66:4000";
    let guess = || TokenFormat::new().generate().expose_secret().to_owned();
    // One failure opens the window.
    let first = svc.clone().oneshot(request(Some(&guess()), Some(from)));
    assert_eq!(first.await.unwrap().status(), 401);
    // The burst starts just before the window ends (the first lookup took 40 ms of it), and its
    // first lookups end after it; the later ones are quick.
    tokio::time::sleep(window - Duration::from_millis(60)).await;
    let before = store.lookups();
    let tasks: Vec<_> = (0..BURST)
        .map(|_| {
            let (svc, token) = (svc.clone(), guess());
            tokio::spawn(async move {
                let reply = svc.oneshot(request(Some(&token), Some(from))).await;
                reply.unwrap().status().as_u16()
            })
        })
        .collect();
    tokio::time::sleep(Duration::from_millis(10)).await;
    store.delay_ms.store(2, SeqCst);
    let mut answered = Vec::new();
    for t in tasks {
        answered.push(t.await.unwrap());
    }
    let lookups = store.lookups() - before;
    assert!(lookups <= 2 * MAX, "{lookups} lookups: {answered:?}");
    assert!(
        answered.iter().all(|s| *s == 401 || *s == 429),
        "{answered:?}"
    );
}

/// A network one failure from its limit has its valid tokens looked up one at a time; those
/// that wait longer than `lookup_wait` get 429 with `Retry-After: 1` (its own limit holds them
/// back), never 503, which would say the store is failing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn valid_tokens_of_a_network_near_its_limit_wait_or_get_429_never_503() {
    use std::time::Duration;
    use tower::{Layer, ServiceExt};
    const MAX: usize = 3;
    let store = CountingStore::new();
    let layer = PatAuthLayer::builder(store.clone())
        .limit_failures(MAX as u32, Duration::from_secs(60))
        .cache(tower_pat::CacheConfig::default().lookup_wait(Duration::from_millis(100)))
        .build();
    let svc = layer.layer(echo_service());
    let from = "192.0.2.44:1";
    for _ in 0..MAX - 1 {
        let guess = TokenFormat::new().generate();
        let reply = svc
            .clone()
            .oneshot(request(Some(guess.expose_secret()), Some(from)));
        assert_eq!(reply.await.unwrap().status(), 401);
    }
    let mut valid = Vec::new();
    for n in 0..40 {
        let (_, secret) = Tokens::new(store.inner.clone())
            .issue(new_token(&format!("user-{n}"), &[]))
            .await
            .unwrap();
        valid.push(secret.expose_secret().to_owned());
    }
    // 20 ms a lookup, one at a time: about five within the wait.
    store
        .delay_ms
        .store(20, std::sync::atomic::Ordering::SeqCst);
    let tasks: Vec<_> = valid
        .into_iter()
        .map(|token| {
            let svc = svc.clone();
            tokio::spawn(async move {
                let reply = svc.oneshot(request(Some(&token), Some(from))).await;
                let reply = reply.unwrap();
                let retry = reply.headers().get("retry-after").cloned();
                (reply.status().as_u16(), retry)
            })
        })
        .collect();
    let mut answered = Vec::new();
    for t in tasks {
        answered.push(t.await.unwrap());
    }
    assert!(answered.iter().any(|(s, _)| *s == 200), "{answered:?}");
    for (status, retry) in &answered {
        match status {
            200 => {}
            429 => assert_eq!(retry.as_ref().unwrap(), "1"),
            _ => panic!("{answered:?}"),
        }
    }
}

/// A network at its failure limit stays refused until its window ends, whatever other networks
/// do: the table of networks is bounded (100 000), but never forgets a live window for room.
/// Before, a flood of failures from more networks than that (two IPv6 /48s are 131 072 /64s)
/// evicted the blocked network's window, and it got a fresh `max_failures` guesses: cycling two
/// /48s gave unlimited guesses per window. While the table is full, the networks beyond it share
/// one window: a fresh network is limited like any other (its guesses reach the store at most
/// `max_failures` times), and a token the cache holds still gets in from it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flood_of_networks_neither_unblocks_a_blocked_one_nor_frees_a_new_one() {
    use std::net::{IpAddr, Ipv6Addr};
    use tower_pat::AuthError;

    const MAX_FAILURES: u32 = 3;
    let net = |a: u16, b: u16| IpAddr::V6(Ipv6Addr::new(0x2001, 0xdb8, a, b, 0, 0, 0, 1));
    let store = CountingStore::new();
    let (_, valid) = Tokens::new(store.inner.clone())
        .issue(new_token("alice", &[]))
        .await
        .unwrap();
    let layer = PatAuthLayer::builder(store.clone())
        .limit_failures(MAX_FAILURES, std::time::Duration::from_secs(600))
        .build();
    let none = ScopeSet::empty();
    let format = TokenFormat::new();
    // How many of `guesses` from `client` were judged (not refused with 429), and how many store
    // lookups they made.
    let judged = |client: IpAddr, guesses: Vec<String>| {
        let (layer, none, store) = (layer.clone(), none.clone(), store.clone());
        async move {
            let lookups = store.lookups();
            let mut judged = 0;
            for guess in guesses {
                match layer.verify(&guess, Some(client), &none).await {
                    Err(AuthError::TooManyAttempts { .. }) => {}
                    Err(_) => judged += 1,
                    Ok(_) => panic!("a random token was accepted"),
                }
            }
            (judged, store.lookups() - lookups)
        }
    };
    // `n` random well-formed tokens, each one the store must be asked about.
    let random = |n: usize| -> Vec<String> {
        (0..n)
            .map(|_| format.generate().expose_secret().to_owned())
            .collect()
    };
    // The valid token is cached (from no address: nothing counted).
    assert!(
        layer
            .verify(valid.expose_secret(), None, &none)
            .await
            .is_ok()
    );
    // The attacker's own network, blocked before the flood.
    let first = net(0xffff, 0);
    assert_eq!(judged(first, random(10)).await.0, MAX_FAILURES as usize);
    // 130 000 other /64s (two /48s), each failing to its limit (with one guess, which the
    // negative cache answers after the first time): the table is full.
    let guess = random(1);
    for a in 0..2u16 {
        for b in 0..65_000u16 {
            let guesses = vec![guess[0].clone(); MAX_FAILURES as usize];
            judged(net(a, b), guesses).await;
        }
    }
    // The network blocked before the flood is still blocked.
    assert_eq!(
        judged(first, random(50)).await,
        (0, 0),
        "the flood unblocked a blocked network"
    );
    // A fresh network is limited, not free: its guesses reach the store at most MAX_FAILURES
    // times (the shared window is likely full already).
    let fresh = net(0xfffe, 0);
    let (fresh_judged, fresh_lookups) = judged(fresh, random(50)).await;
    assert!(
        fresh_judged <= MAX_FAILURES as usize && fresh_lookups <= MAX_FAILURES as usize,
        "a new network had {fresh_judged} guesses judged ({fresh_lookups} store lookups) once \
         the table was full"
    );
    // A token the cache holds still gets in from it.
    assert!(
        layer
            .verify(valid.expose_secret(), Some(fresh), &none)
            .await
            .is_ok()
    );
}
