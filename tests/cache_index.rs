//! The cache finds hits by a keyed PRF of the token, not by its SHA-256: what an attacker could
//! try against that index, and the coarse clock that enforces expiry on a hit.

mod common;

use std::time::{Duration, Instant};

use chrono::Utc;
use common::*;
use tower_pat::{
    CacheConfig, MemoryStore, PatAuthLayer, TokenFormat, TokenHasher, TokenPatch, TokenStore,
};

/// The token with its character at `i` replaced by another base62 character.
fn with_char(token: &str, i: usize, c: char) -> String {
    let mut t: Vec<char> = token.chars().collect();
    t[i] = c;
    t.into_iter().collect()
}

#[tokio::test]
async fn near_misses_of_a_cached_token_never_hit_and_malformed_ones_never_reach_the_store() {
    let store = CountingStore::new();
    let (_, secret) = Tokens::new(store.inner.clone())
        .issue(new_token("alice", &[]))
        .await
        .unwrap();
    let layer = PatAuthLayer::builder(store.clone()).build();
    assert_eq!(send_token(&layer, &secret).await.status, 200);
    assert_eq!((layer.cached_tokens(), store.lookups()), (1, 1));
    let token = secret.expose_secret();
    let last = token.len() - 1;
    let flip = |c: char| if c == 'a' { 'b' } else { 'a' };
    let malformed = [
        // The checksum no longer matches.
        with_char(token, 10, flip(token.chars().nth(10).unwrap())),
        with_char(token, last, flip(token.chars().nth(last).unwrap())),
        // Letter case, a suffix, a cut, another prefix.
        token.to_uppercase(),
        format!("{token}a"),
        token[..last].to_owned(),
        format!("Pat_{}", &token[4..]),
    ];
    for bad in &malformed {
        let reply = send(&layer, request(Some(bad), None)).await;
        assert_eq!(reply.status, 401, "{bad:?}");
        assert_eq!(reply.json()["message"], "the access token is invalid");
    }
    assert_eq!(
        store.lookups(),
        1,
        "a malformed token is refused before any store query, whatever the cache holds"
    );
    // A well-formed token the store does not know is a miss: one store query, then remembered.
    let unknown = TokenFormat::new().generate();
    for _ in 0..3 {
        assert_eq!(send_token(&layer, &unknown).await.status, 401);
    }
    assert_eq!(store.lookups(), 2);
    assert_eq!(layer.cached_tokens(), 1, "refusals add no positive entry");
    // The cached token still hits.
    assert_eq!(send_token(&layer, &secret).await.status, 200);
    assert_eq!(store.lookups(), 2);
}

#[tokio::test]
async fn two_layers_never_share_entries() {
    // Each layer draws its own PRF key: a token cached by one is a miss in the other, and a
    // revocation seen by one (the store's events reach both) leaves neither serving it.
    let store = CountingStore::new();
    let (record, secret) = Tokens::new(store.inner.clone())
        .issue(new_token("alice", &[]))
        .await
        .unwrap();
    let a = PatAuthLayer::builder(store.clone()).build();
    let b = PatAuthLayer::builder(store.clone()).build();
    assert_eq!(send_token(&a, &secret).await.status, 200);
    assert_eq!(send_token(&a, &secret).await.status, 200);
    assert_eq!(store.lookups(), 1);
    assert_eq!(send_token(&b, &secret).await.status, 200);
    assert_eq!(
        store.lookups(),
        2,
        "the second layer looked the token up itself"
    );
    store.inner.revoke(&record.id, Utc::now()).await.unwrap();
    assert_eq!(send_token(&a, &secret).await.status, 401);
    assert_eq!(send_token(&b, &secret).await.status, 401);
    assert_eq!((a.cached_tokens(), b.cached_tokens()), (0, 0));
}

#[tokio::test]
async fn a_token_stored_under_an_older_pepper_is_cached_and_still_revoked_at_once() {
    // The cache entry is found by the PRF; the store event names the hash under the old pepper:
    // the index from stored hash to entry must find it.
    let store = MemoryStore::new();
    let old = Tokens::new(store.clone()).with_hasher(TokenHasher::with_pepper("old"));
    let (record, secret) = old.issue(new_token("alice", &[])).await.unwrap();
    let layer = PatAuthLayer::builder(store.clone())
        .hasher(TokenHasher::with_pepper("new").with_previous_peppers(["old"]))
        .build();
    assert_eq!(send_token(&layer, &secret).await.status, 200);
    assert_eq!(send_token(&layer, &secret).await.status, 200);
    assert_eq!(layer.cached_tokens(), 1);
    store.revoke(&record.id, Utc::now()).await.unwrap();
    let reply = send_token(&layer, &secret).await;
    assert_eq!(reply.status, 401);
    assert_eq!(reply.json()["message"], "the access token has been revoked");
    assert_eq!(layer.cached_tokens(), 0);
}

/// A refusal that can be undone, of a token stored under an older pepper's hash, does not outlive
/// the change that undoes it: disabled then enabled, the token works again at once, though the
/// store's events name the old pepper's hash. (An expiry is remembered: the management API gives
/// an expired token no new expiry.)
#[tokio::test]
async fn an_undone_refusal_of_a_token_under_an_older_pepper_is_not_remembered() {
    let store = MemoryStore::new();
    let old = Tokens::new(store.clone()).with_hasher(TokenHasher::with_pepper("old"));
    let (record, secret) = old.issue(new_token("alice", &[])).await.unwrap();
    let layer = PatAuthLayer::builder(store.clone())
        .hasher(TokenHasher::with_pepper("new").with_previous_peppers(["old"]))
        .cache(CacheConfig::default().negative_ttl(Duration::from_secs(600)))
        .build();
    assert_eq!(send_token(&layer, &secret).await.status, 200);
    let disable = TokenPatch::new(Utc::now()).disable();
    store.update(&record.id, &disable).await.unwrap();
    let reply = send_token(&layer, &secret).await;
    assert_eq!(reply.status, 401);
    assert_eq!(reply.json()["message"], "the access token is disabled");
    let enable = TokenPatch::new(Utc::now()).enable();
    store.update(&record.id, &enable).await.unwrap();
    assert_eq!(
        send_token(&layer, &secret).await.status,
        200,
        "enabled again"
    );

    // Expired, it is remembered: a flood of the old secret costs no lookup per request.
    let past =
        TokenPatch::new(Utc::now()).expires_at(Some(Utc::now() - chrono::Duration::seconds(1)));
    store.update(&record.id, &past).await.unwrap();
    assert_eq!(send_token(&layer, &secret).await.status, 401);
    let lookups = layer.store_lookups();
    for _ in 0..20 {
        assert_eq!(send_token(&layer, &secret).await.status, 401);
    }
    assert_eq!(layer.store_lookups(), lookups, "answered from the cache");
}

#[tokio::test]
async fn a_flood_of_distinct_valid_looking_tokens_adds_no_positive_entry() {
    let store = CountingStore::new();
    let layer = PatAuthLayer::builder(store.clone()).build();
    let format = TokenFormat::new();
    for _ in 0..200 {
        assert_eq!(send_token(&layer, &format.generate()).await.status, 401);
    }
    assert_eq!(layer.cached_tokens(), 0);
}

#[tokio::test]
async fn the_coarse_clock_refuses_a_cached_token_within_a_tick_of_its_expiry() {
    // The hot path reads CLOCK_REALTIME_COARSE (one kernel tick of resolution, at most 10 ms, and
    // never ahead of the real time): no request that ended before the expiry is refused, every
    // request that started 15 ms after it is. Both bounds hold however the test thread is scheduled: a request is processed
    // after it starts and before it ends.
    let store = CountingStore::new();
    let expires = Utc::now() + chrono::Duration::milliseconds(400);
    let (_, secret) = Tokens::new(store.inner.clone())
        .issue(new_token("alice", &[]).expires_at(expires))
        .await
        .unwrap();
    let layer = PatAuthLayer::builder(store.clone())
        .cache(CacheConfig::default().ttl(Duration::from_secs(3600)))
        .build();
    let deadline = Instant::now() + Duration::from_millis(700);
    let (mut served, mut refused) = (0, 0);
    while Instant::now() < deadline {
        let started = Utc::now();
        let status = send_token(&layer, &secret).await.status;
        let ended = Utc::now();
        match status.as_u16() {
            200 => {
                served += 1;
                assert!(
                    started < expires + chrono::Duration::milliseconds(15),
                    "served a request that started {} ms after the expiry",
                    (started - expires).num_milliseconds()
                );
            }
            401 => {
                refused += 1;
                if refused == 1 {
                    assert_eq!(store.lookups(), 1, "the first refusal came from the clock");
                }
                // Expiry is compared in whole milliseconds.
                assert!(
                    ended >= expires - chrono::Duration::milliseconds(1),
                    "refused a request that ended {} ms before the expiry",
                    (expires - ended).num_milliseconds()
                );
            }
            other => panic!("unexpected status {other}"),
        }
        if started > expires + chrono::Duration::milliseconds(15) {
            assert_eq!(status, 401, "a request 15 ms past the expiry is refused");
        }
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    assert!(
        served > 10 && refused > 10,
        "{served} served, {refused} refused"
    );
    // The entry the clock refused is dropped, and the next request's lookup remembers the
    // refusal: every later one is answered from the negative cache.
    assert_eq!(store.lookups(), 2, "one load, one lookup after the expiry");
}
