//! The layer logs every refusal at debug on `tower_pat::auth` (reason, token id when the token
//! matched a record, client address) and every store failure at warn on `tower_pat::store` (the
//! lookups refused for want of a slot once a minute at most), and never a token or its hash.

mod common;

use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};

use chrono::Utc;
use common::*;
use http::StatusCode;
use tower_pat::record::parse_ip_net;
use tower_pat::{PatAuthLayer, ScopeSet, TokenStore, Tokens};
use tracing::field::{Field, Visit};
use tracing::span::{Attributes, Id, Record};
use tracing::{Event, Level, Metadata, Subscriber};

/// One captured event: level, target and every field as `name=value`.
#[derive(Debug, Clone)]
struct Captured {
    level: Level,
    target: String,
    fields: Vec<(String, String)>,
}

impl Captured {
    fn field(&self, name: &str) -> Option<&str> {
        self.fields
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.as_str())
    }
}

/// A subscriber that keeps every event.
#[derive(Clone, Default)]
struct Capture(Arc<Mutex<Vec<Captured>>>);

struct Fields<'a>(&'a mut Vec<(String, String)>);

impl Visit for Fields<'_> {
    fn record_str(&mut self, field: &Field, value: &str) {
        self.0.push((field.name().to_owned(), value.to_owned()));
    }
    fn record_debug(&mut self, field: &Field, value: &dyn std::fmt::Debug) {
        self.0.push((field.name().to_owned(), format!("{value:?}")));
    }
}

impl Subscriber for Capture {
    fn enabled(&self, _: &Metadata<'_>) -> bool {
        true
    }
    fn new_span(&self, _: &Attributes<'_>) -> Id {
        Id::from_u64(1)
    }
    fn record(&self, _: &Id, _: &Record<'_>) {}
    fn record_follows_from(&self, _: &Id, _: &Id) {}
    fn event(&self, event: &Event<'_>) {
        let mut fields = Vec::new();
        event.record(&mut Fields(&mut fields));
        self.0.lock().unwrap().push(Captured {
            level: *event.metadata().level(),
            target: event.metadata().target().to_owned(),
            fields,
        });
    }
    fn enter(&self, _: &Id) {}
    fn exit(&self, _: &Id) {}
}

impl Capture {
    fn take(&self) -> Vec<Captured> {
        std::mem::take(&mut *self.0.lock().unwrap())
    }
}

/// Every field of every event, for the "no secret" checks.
fn all_text(events: &[Captured]) -> String {
    format!("{events:?}")
}

#[tokio::test]
async fn refusals_log_the_reason_the_token_id_and_the_client_never_the_token() {
    let capture = Capture::default();
    let _guard = tracing::subscriber::set_default(capture.clone());

    let store = CountingStore::new();
    let (revoked_rec, revoked) = Tokens::new(store.inner.clone())
        .issue(new_token("alice", &["a:read"]))
        .await
        .unwrap();
    store
        .inner
        .revoke(&revoked_rec.id, Utc::now())
        .await
        .unwrap();
    let (restricted_rec, restricted) = Tokens::new(store.inner.clone())
        .issue(
            new_token("alice", &["a:read"])
                .ip_restriction([parse_ip_net("203.0.113.0/24").unwrap()]),
        )
        .await
        .unwrap();
    let (unscoped_rec, unscoped) = Tokens::new(store.inner.clone())
        .issue(new_token("alice", &[]))
        .await
        .unwrap();
    let layer = PatAuthLayer::builder(store.clone())
        .require_scopes(["a:read"])
        .build();
    let peer = Some("192.0.2.44:1234");
    let secrets = [&revoked, &restricted, &unscoped];

    let cases = [
        (None, "missing_credentials", None),
        (Some(revoked.expose_secret()), "revoked", None),
        (
            Some(restricted.expose_secret()),
            "ip_not_allowed",
            Some(restricted_rec.id.as_str()),
        ),
        (
            Some(unscoped.expose_secret()),
            "insufficient_scope",
            Some(unscoped_rec.id.as_str()),
        ),
        // Again, now from the cache.
        (
            Some(unscoped.expose_secret()),
            "insufficient_scope",
            Some(unscoped_rec.id.as_str()),
        ),
    ];
    for (token, reason, token_id) in cases {
        capture.take();
        let r = send(&layer, request(token, peer)).await;
        assert!(r.status.is_client_error(), "{reason}: {}", r.status);
        let events = capture.take();
        let refusals: Vec<_> = events
            .iter()
            .filter(|e| e.target == "tower_pat::auth")
            .collect();
        assert_eq!(refusals.len(), 1, "{reason}: {events:?}");
        let e = refusals[0];
        assert_eq!(e.level, Level::DEBUG);
        assert_eq!(e.field("reason"), Some(reason), "{e:?}");
        assert_eq!(
            e.field("status"),
            Some(r.status.as_u16().to_string().as_str())
        );
        assert_eq!(e.field("token_id"), token_id, "{e:?}");
        assert_eq!(e.field("client"), Some("192.0.2.44"), "{e:?}");
        let text = all_text(&events);
        for secret in secrets {
            assert!(!text.contains(secret.expose_secret()), "{text}");
        }
        for hash in [&revoked_rec.hash, &restricted_rec.hash, &unscoped_rec.hash] {
            assert!(!text.contains(&hash.to_hex()), "{text}");
        }
    }

    // verify() refusals take the same path.
    capture.take();
    let required = ScopeSet::parse(["b:write"]).unwrap();
    let err = layer
        .verify(unscoped.expose_secret(), None, &required)
        .await
        .unwrap_err();
    assert_eq!(err.status(), StatusCode::FORBIDDEN);
    let events = capture.take();
    let e = events
        .iter()
        .find(|e| e.target == "tower_pat::auth")
        .expect("a refusal event");
    assert_eq!(e.field("reason"), Some("insufficient_scope"));
    assert_eq!(e.field("token_id"), Some(unscoped_rec.id.as_str()));
    assert_eq!(e.field("client"), None);
    assert!(!all_text(&events).contains(unscoped.expose_secret()));

    // An accepted request logs no refusal.
    let (_, good) = Tokens::new(store.inner.clone())
        .issue(new_token("alice", &["a:read"]))
        .await
        .unwrap();
    capture.take();
    assert_eq!(send_token(&layer, &good).await.status, StatusCode::OK);
    assert!(capture.take().iter().all(|e| e.target != "tower_pat::auth"),);
}

#[tokio::test]
async fn a_store_failure_is_a_warning_on_tower_pat_store() {
    let capture = Capture::default();
    let _guard = tracing::subscriber::set_default(capture.clone());

    let store = CountingStore::new();
    let (rec, secret) = Tokens::new(store.inner.clone())
        .issue(new_token("alice", &[]))
        .await
        .unwrap();
    store.failing.store(true, Ordering::SeqCst);
    let layer = PatAuthLayer::builder(store.clone()).build();
    capture.take();
    let r = send(
        &layer,
        request(Some(secret.expose_secret()), Some("192.0.2.5:1")),
    )
    .await;
    assert_eq!(r.status, StatusCode::SERVICE_UNAVAILABLE);
    let events = capture.take();
    let warn = events
        .iter()
        .find(|e| e.target == "tower_pat::store")
        .unwrap_or_else(|| panic!("no store event: {events:?}"));
    assert_eq!(warn.level, Level::WARN);
    let refusal = events
        .iter()
        .find(|e| e.target == "tower_pat::auth")
        .expect("a refusal event");
    assert_eq!(refusal.field("reason"), Some("unavailable"));
    let text = all_text(&events);
    assert!(!text.contains(secret.expose_secret()), "{text}");
    assert!(!text.contains(&rec.hash.to_hex()), "{text}");
}

/// With the failure limit on, a request without a peer address (a server that does not record
/// it where the layer looks, such as tonic behind its own TLS) cannot be limited: named once per
/// layer at warn on `tower_pat::auth`, so that the operator learns the limit is off, not once
/// per request. A request with an address says nothing of the kind.
#[tokio::test]
async fn a_failure_limit_without_peer_addresses_is_named_once() {
    let capture = Capture::default();
    let _guard = tracing::subscriber::set_default(capture.clone());
    let unkeyed = |events: &[Captured]| {
        events
            .iter()
            .filter(|e| {
                e.level == Level::WARN
                    && e.target == "tower_pat::auth"
                    && e.field("message")
                        .is_some_and(|m| m.contains("no peer address"))
            })
            .count()
    };
    let store = CountingStore::new();
    let layer = PatAuthLayer::builder(store.clone())
        .limit_failures(3, std::time::Duration::from_secs(60))
        .build();
    let unknown = tower_pat::TokenFormat::new().generate();
    for _ in 0..2 {
        let r = send(
            &layer,
            request(Some(unknown.expose_secret()), Some("192.0.2.5:1")),
        )
        .await;
        assert_eq!(r.status, StatusCode::UNAUTHORIZED);
    }
    assert_eq!(unkeyed(&capture.take()), 0);
    // Unlimited: more unknown tokens than the limit, each looked up.
    let before = store.lookups.load(Ordering::SeqCst);
    for _ in 0..5 {
        let unknown = tower_pat::TokenFormat::new().generate();
        let r = send(&layer, request(Some(unknown.expose_secret()), None)).await;
        assert_eq!(r.status, StatusCode::UNAUTHORIZED);
    }
    assert_eq!(store.lookups.load(Ordering::SeqCst) - before, 5);
    assert_eq!(unkeyed(&capture.take()), 1);
}

/// One client sending random well-formed tokens (the checksum is public) past its lookup budget
/// cannot write a warning per request: the lookups that waited `lookup_wait` in vain for a slot
/// are one warning (on `tower_pat::store`) per minute at most, the next one counting those it did
/// not log; each of those requests is a refusal at debug, like any other. Before, 300 such
/// requests wrote about 290 warnings, with no store failure at all.
#[tokio::test]
async fn lookups_refused_for_want_of_a_slot_are_one_warning_a_minute() {
    const FLOOD: usize = 300;
    let capture = Capture::default();
    let _guard = tracing::subscriber::set_default(capture.clone());
    // A healthy store that takes 100 ms per lookup.
    let store = CountingStore::new();
    store.delay_ms.store(100, Ordering::SeqCst);
    let layer = PatAuthLayer::builder(store.clone())
        .cache(tower_pat::CacheConfig::default().lookup_wait(std::time::Duration::from_millis(20)))
        .build();
    let format = tower_pat::TokenFormat::new();
    let tokens: Vec<String> = (0..FLOOD)
        .map(|_| format.generate().expose_secret().to_owned())
        .collect();
    let tasks: Vec<_> = tokens
        .iter()
        .map(|token| {
            let (layer, token) = (layer.clone(), token.clone());
            tokio::spawn(async move {
                send(&layer, request(Some(&token), Some("198.51.100.7:4000")))
                    .await
                    .status
            })
        })
        .collect();
    let mut unavailable = 0;
    for t in tasks {
        if t.await.unwrap() == StatusCode::SERVICE_UNAVAILABLE {
            unavailable += 1;
        }
    }
    assert!(
        unavailable > FLOOD / 2,
        "the flood did not exceed the budget"
    );
    let events = capture.take();
    let warnings: Vec<_> = events.iter().filter(|e| e.level <= Level::WARN).collect();
    assert_eq!(
        warnings.len(),
        1,
        "{unavailable} requests answered 503: {warnings:?}"
    );
    assert_eq!(warnings[0].target, "tower_pat::store");
    assert_eq!(warnings[0].field("suppressed"), Some("0"));
    let refused = events
        .iter()
        .filter(|e| e.target == "tower_pat::auth" && e.field("reason") == Some("unavailable"))
        .count();
    assert_eq!(refused, unavailable, "each 503 is a refusal at debug");
    let text = all_text(&events);
    for token in &tokens {
        assert!(!text.contains(token.as_str()));
    }
}
