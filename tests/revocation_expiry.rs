//! Revocation and expiry are enforced on every request, also while the token is cached.

mod common;

use std::time::Duration;

use chrono::Utc;
use common::*;
use tower_pat::{CacheConfig, MemoryStore, PatAuthLayer, TokenPatch, TokenStore};

#[tokio::test]
async fn revoked_token_is_refused_on_the_very_next_request() {
    let store = CountingStore::new();
    let (record, secret) = Tokens::new(store.inner.clone())
        .issue(new_token("alice", &[]))
        .await
        .unwrap();
    let layer = PatAuthLayer::builder(store.clone()).build();
    assert_eq!(send_token(&layer, &secret).await.status, 200);
    assert_eq!(layer.cached_tokens(), 1);

    store.inner.revoke(&record.id, Utc::now()).await.unwrap();

    let reply = send_token(&layer, &secret).await;
    assert_eq!(reply.status, 401);
    assert_eq!(reply.json()["message"], "the access token has been revoked");
    assert!(reply.www_authenticate().contains("error=\"invalid_token\""));
}

#[tokio::test]
async fn deleted_token_is_refused_on_the_very_next_request() {
    let store = MemoryStore::new();
    let (record, secret) = Tokens::new(store.clone())
        .issue(new_token("alice", &[]))
        .await
        .unwrap();
    let layer = PatAuthLayer::builder(store.clone()).build();
    assert_eq!(send_token(&layer, &secret).await.status, 200);
    store.delete(&record.id).await.unwrap();
    let reply = send_token(&layer, &secret).await;
    assert_eq!(reply.status, 401);
    assert_eq!(reply.json()["message"], "the access token is invalid");
}

#[tokio::test]
async fn expired_token_is_refused() {
    let store = MemoryStore::new();
    let (_, secret) = Tokens::new(store.clone())
        .issue(new_token("alice", &[]).expires_at(Utc::now() - chrono::Duration::seconds(1)))
        .await
        .unwrap();
    let layer = PatAuthLayer::builder(store).build();
    let reply = send_token(&layer, &secret).await;
    assert_eq!(reply.status, 401);
    assert_eq!(reply.json()["message"], "the access token has expired");
}

#[tokio::test]
async fn token_expiring_while_cached_is_refused_from_then_on() {
    let store = CountingStore::new();
    let expires = Utc::now() + chrono::Duration::milliseconds(600);
    let (_, secret) = Tokens::new(store.inner.clone())
        .issue(new_token("alice", &[]).expires_at(expires))
        .await
        .unwrap();
    // A long TTL: only the clock can end the entry.
    let layer = PatAuthLayer::builder(store.clone())
        .cache(CacheConfig::default().ttl(Duration::from_secs(3600)))
        .build();
    assert_eq!(send_token(&layer, &secret).await.status, 200);
    tokio::time::sleep(Duration::from_millis(700)).await;
    let reply = send_token(&layer, &secret).await;
    assert_eq!(reply.status, 401);
    assert_eq!(reply.json()["message"], "the access token has expired");
    assert_eq!(
        store.lookups(),
        1,
        "expiry came from the clock, not the store"
    );
}

#[tokio::test]
async fn entry_is_refreshed_in_the_background_after_the_ttl() {
    // No change feed: only the refresh can bring the cache news of a change.
    let store = CountingStore {
        no_feed: true,
        ..CountingStore::new()
    };
    let (record, secret) = Tokens::new(store.inner.clone())
        .issue(new_token("alice", &["a"]))
        .await
        .unwrap();
    let layer = PatAuthLayer::builder(store.clone())
        .cache(CacheConfig::default().ttl(Duration::from_millis(200)))
        .build();
    assert_eq!(send_token(&layer, &secret).await.status, 200);
    let patch = TokenPatch::new(Utc::now()).scopes(scopes(&["b"]));
    store.inner.update(&record.id, &patch).await.unwrap();
    // Within the TTL the cached entry is used as it is.
    assert!(send_token(&layer, &secret).await.body.contains("|a|"));
    tokio::time::sleep(Duration::from_millis(300)).await;
    // Past the TTL: still served from the cache while one refresh runs.
    let reply = send_token(&layer, &secret).await;
    assert_eq!(reply.status, 200);
    assert!(reply.body.contains("|a|"), "{}", reply.body);
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert_eq!(store.lookups(), 2);
    // The refresh brought the change.
    let reply = send_token(&layer, &secret).await;
    assert!(reply.body.contains("|b|"), "{}", reply.body);
    assert_eq!(store.lookups(), 2);
}

#[tokio::test]
async fn store_outage_on_a_miss_is_503_never_401() {
    let store = CountingStore::new();
    let (_, secret) = Tokens::new(store.inner.clone())
        .issue(new_token("alice", &[]))
        .await
        .unwrap();
    store
        .failing
        .store(true, std::sync::atomic::Ordering::SeqCst);
    let layer = PatAuthLayer::builder(store.clone()).build();
    let reply = send_token(&layer, &secret).await;
    assert_eq!(reply.status, 503);
    assert_eq!(reply.headers["retry-after"], "5");
    assert_eq!(reply.json()["code"], "temporarily_unavailable");
    // The failure is not cached: once the store is back the token works.
    store
        .failing
        .store(false, std::sync::atomic::Ordering::SeqCst);
    assert_eq!(send_token(&layer, &secret).await.status, 200);
}

#[tokio::test]
async fn cached_token_survives_a_store_outage_within_stale_if_error() {
    let store = CountingStore::new();
    let (_, secret) = Tokens::new(store.inner.clone())
        .issue(new_token("alice", &[]))
        .await
        .unwrap();
    let layer = PatAuthLayer::builder(store.clone())
        .cache(
            CacheConfig::default()
                .ttl(Duration::from_millis(100))
                .stale_if_error(Duration::from_millis(600)),
        )
        .build();
    assert_eq!(send_token(&layer, &secret).await.status, 200);
    store
        .failing
        .store(true, std::sync::atomic::Ordering::SeqCst);
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(send_token(&layer, &secret).await.status, 200);
    tokio::time::sleep(Duration::from_millis(600)).await;
    // Past ttl + stale_if_error: the entry must be reloaded, and the store is down.
    assert_eq!(send_token(&layer, &secret).await.status, 503);
}
