//! A flood of random well-formed tokens (the checksum is public, so each costs a store query)
//! must not starve the lookups of valid tokens from other clients.

mod common;

use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use common::*;
use http::StatusCode;
use tower::{Layer, ServiceExt};
use tower_pat::{PatAuthLayer, TokenFormat};

/// Random well-formed tokens in flight at once.
const FLOOD: usize = 4_000;
/// Valid, uncached tokens sent during the flood, each from its own address.
const VALID: usize = 100;
/// What the store takes per lookup.
const STORE_DELAY_MS: u64 = 20;

struct Result {
    /// Valid tokens answered 200 within 2 s.
    valid_ok: usize,
    /// Statuses of the valid tokens that were not.
    valid_failed: Vec<Option<StatusCode>>,
    flood_refused: usize,
    flood_unavailable: usize,
    elapsed: Duration,
}

/// Sends [`FLOOD`] random tokens, the `i`th from `attacker(i)`, waits until they are in flight,
/// then sends [`VALID`] valid uncached tokens from other addresses.
async fn flood(what: &str, attacker: impl Fn(usize) -> String) -> Result {
    // One flood at a time: the two tests would otherwise share the machine's cores.
    static ONE_AT_A_TIME: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());
    let _one = ONE_AT_A_TIME.lock().await;
    let store = CountingStore::new();
    let mut secrets = Vec::with_capacity(VALID);
    for _ in 0..VALID {
        secrets.push(
            Tokens::new(store.inner.clone())
                .issue(new_token("alice", &[]))
                .await
                .unwrap()
                .1,
        );
    }
    store.delay_ms.store(STORE_DELAY_MS, Ordering::SeqCst);
    let layer = PatAuthLayer::builder(store.clone()).build();
    let svc = layer.layer(echo_service());
    let format = TokenFormat::new();
    let junk: Vec<_> = (0..FLOOD).map(|_| format.generate()).collect();

    let flood: Vec<_> = junk
        .into_iter()
        .enumerate()
        .map(|(i, token)| {
            let peer = attacker(i);
            let svc = svc.clone();
            tokio::spawn(async move {
                svc.oneshot(request(Some(token.expose_secret()), Some(&peer)))
                    .await
                    .unwrap()
                    .status()
            })
        })
        .collect();
    // The flood is in flight once most of its lookups are started or queued (bounded wait).
    let deadline = Instant::now() + Duration::from_secs(10);
    while layer.lookups_in_flight() < FLOOD / 2 && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    assert!(
        layer.lookups_in_flight() >= FLOOD / 2,
        "the flood never got in flight"
    );

    let start = Instant::now();
    let valid: Vec<_> = secrets
        .iter()
        .enumerate()
        .map(|(i, secret)| {
            let peer = format!("192.0.2.{}:5000", i + 1);
            let token = secret.expose_secret().to_owned();
            let svc = svc.clone();
            tokio::spawn(async move {
                let res = tokio::time::timeout(
                    Duration::from_secs(2),
                    svc.oneshot(request(Some(&token), Some(&peer))),
                )
                .await;
                res.ok().map(|r| r.unwrap().status())
            })
        })
        .collect();
    let mut result = Result {
        valid_ok: 0,
        valid_failed: Vec::new(),
        flood_refused: 0,
        flood_unavailable: 0,
        elapsed: Duration::ZERO,
    };
    for v in valid {
        match v.await.unwrap() {
            Some(StatusCode::OK) => result.valid_ok += 1,
            other => result.valid_failed.push(other),
        }
    }
    result.elapsed = start.elapsed();
    for f in flood {
        match f.await.unwrap() {
            StatusCode::UNAUTHORIZED => result.flood_refused += 1,
            StatusCode::SERVICE_UNAVAILABLE => result.flood_unavailable += 1,
            other => panic!("a random token got {other}"),
        }
    }
    eprintln!(
        "{what}: {}/{VALID} valid tokens got 200 within 2 s (all answered \
         after {:?}; failures: {:?}); flood: {} refused, {} unavailable; {} store lookups",
        result.valid_ok,
        result.elapsed,
        result.valid_failed,
        result.flood_refused,
        result.flood_unavailable,
        store.lookups()
    );
    result
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn valid_tokens_get_through_a_flood_from_a_few_addresses() {
    let result = flood("4 attacker addresses", |i| {
        format!("10.66.0.{}:4000", i % 4 + 1)
    })
    .await;
    assert!(
        result.valid_ok * 100 >= VALID * 95,
        "only {}/{VALID} valid tokens got through",
        result.valid_ok
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn valid_tokens_get_through_a_flood_from_many_addresses() {
    // Four tokens per address: each address's first answer confines the rest.
    let result = flood("1000 attacker addresses", |i| {
        let n = i % 1000;
        format!("10.66.{}.{}:4000", n / 250, n % 250 + 1)
    })
    .await;
    assert!(
        result.valid_ok * 100 >= VALID * 95,
        "only {}/{VALID} valid tokens got through",
        result.valid_ok
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn valid_tokens_get_through_a_flood_from_every_address_of_an_ipv6_subnet() {
    // An IPv6 subscriber has a /64 or more: its addresses share one budget.
    let result = flood("4000 addresses in one /64", |i| {
        format!("[2001:db8:66:1::{:x}]:4000", i + 1)
    })
    .await;
    assert!(
        result.valid_ok * 100 >= VALID * 95,
        "only {}/{VALID} valid tokens got through",
        result.valid_ok
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_with_many_uncached_tokens_waits_for_its_budget_rather_than_failing() {
    let store = CountingStore::new();
    let mut secrets = Vec::new();
    for _ in 0..20 {
        secrets.push(
            Tokens::new(store.inner.clone())
                .issue(new_token("ci", &[]))
                .await
                .unwrap()
                .1,
        );
    }
    store.delay_ms.store(10, Ordering::SeqCst);
    let layer = PatAuthLayer::builder(store.clone())
        .cache(tower_pat::CacheConfig::default().max_lookups_per_client(2))
        .build();
    let svc = layer.layer(echo_service());
    let tasks: Vec<_> = secrets
        .iter()
        .map(|secret| {
            let svc = svc.clone();
            let token = secret.expose_secret().to_owned();
            tokio::spawn(async move {
                svc.oneshot(request(Some(&token), Some("192.0.2.7:1")))
                    .await
                    .unwrap()
                    .status()
            })
        })
        .collect();
    for t in tasks {
        assert_eq!(t.await.unwrap(), StatusCode::OK);
    }
    assert_eq!(store.lookups(), 20);
    assert_eq!(layer.lookups_in_flight(), 0);
}

#[tokio::test]
async fn a_client_that_sent_an_unknown_token_still_gets_in_with_a_valid_one() {
    let store = CountingStore::new();
    let (_, secret) = Tokens::new(store.inner.clone())
        .issue(new_token("alice", &[]))
        .await
        .unwrap();
    let layer = PatAuthLayer::builder(store.clone()).build();
    let typo = TokenFormat::new().generate();
    let peer = Some("192.0.2.8:1");
    assert_eq!(
        send(&layer, request(Some(typo.expose_secret()), peer))
            .await
            .status,
        401
    );
    // Now a suspect: its lookups run in the suspects' pool, which is idle.
    assert_eq!(
        send(&layer, request(Some(secret.expose_secret()), peer))
            .await
            .status,
        200
    );
}

/// A store query that never answers (its connection went silent mid-query, in a partition that
/// keeps the socket open) held its lookup slot, and every request for that token joined it and
/// waited, until TCP gave up minutes later. A lookup now counts as a store failure after
/// `lookup_timeout`: every request waiting for it gets 503 with `Retry-After`, and once the
/// store answers again the token is accepted.
#[tokio::test]
async fn a_lookup_the_store_never_answers_fails_after_the_lookup_timeout() {
    let store = CountingStore::new();
    let (_, secret) = Tokens::new(store.inner.clone())
        .issue(new_token("alice", &[]))
        .await
        .unwrap();
    let layer = PatAuthLayer::builder(store.clone())
        .cache(tower_pat::CacheConfig::default().lookup_timeout(Duration::from_millis(200)))
        .build();
    store.delay_ms.store(3_600_000, Ordering::SeqCst);
    // A hang guard, not a speed measure.
    let (first, joined) = tokio::time::timeout(Duration::from_secs(30), async {
        tokio::join!(send_token(&layer, &secret), send_token(&layer, &secret))
    })
    .await
    .expect("a lookup the store never answers held its requests");
    for reply in [first, joined] {
        assert_eq!(reply.status, StatusCode::SERVICE_UNAVAILABLE);
        assert!(reply.headers.contains_key(http::header::RETRY_AFTER));
    }
    store.delay_ms.store(0, Ordering::SeqCst);
    assert_eq!(send_token(&layer, &secret).await.status, StatusCode::OK);
}

/// The same for the reuse check of an unknown token (`find_superseded`, with reuse detection
/// on): a history query the store never answered held the request and everything joined to it.
/// The request now waits no longer than `lookup_timeout`, and is answered as an unknown token.
#[tokio::test]
async fn a_reuse_check_the_store_never_answers_does_not_hold_the_request() {
    let store = CountingStore::new();
    let tokens = Tokens::new(store.clone());
    let (record, old) = tokens.issue(new_token("alice", &[])).await.unwrap();
    tokens.rotate(&record.id, Duration::ZERO).await.unwrap();
    let layer = tokens
        .layer()
        .cache(tower_pat::CacheConfig::default().lookup_timeout(Duration::from_millis(200)))
        .on_reuse(|_| {})
        .build();
    store.superseded_delay_ms.store(3_600_000, Ordering::SeqCst);
    // A hang guard, not a speed measure.
    let reply = tokio::time::timeout(Duration::from_secs(30), send_token(&layer, &old))
        .await
        .expect("a reuse check the store never answers held the request");
    assert_eq!(reply.status, StatusCode::UNAUTHORIZED);
}

/// `patd`'s `[cache] lookup_timeout` reaches the layer it builds: with 200 ms, a lookup the
/// store never answers is a 503 (a layer left at the 5 s default would outlast the guard's
/// second).
#[cfg(feature = "gateway")]
#[tokio::test]
async fn patds_lookup_timeout_reaches_its_layer() {
    use tower_pat::gateway::{config::Config, serve};
    let store = CountingStore::new();
    let tokens = Tokens::new(store.clone());
    let (_, secret) = tokens.issue(new_token("alice", &[])).await.unwrap();
    let set = ["cache.lookup_timeout=\"200ms\"".to_owned()];
    let layer = serve::layer(&Config::load(None, Vec::new(), &set).unwrap(), &tokens);
    store.delay_ms.store(3_600_000, Ordering::SeqCst);
    // A hang guard, not a speed measure: the configured timeout against the default's 5 s.
    let reply = tokio::time::timeout(Duration::from_secs(2), send_token(&layer, &secret))
        .await
        .expect("patd's layer did not take [cache] lookup_timeout");
    assert_eq!(reply.status, StatusCode::SERVICE_UNAVAILABLE);
}
