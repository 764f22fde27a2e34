//! `max_staleness()` and serving past the TTL, over an in-memory store whose failures and change
//! feed the test controls (issue 9 item 13; the PostgreSQL side is in `postgres_cluster.rs`).

mod common;

use std::sync::Weak;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use async_trait::async_trait;
use tower_pat::store::{ChangeHub, ChangeListener, StoreEvent};
use tower_pat::{
    CacheConfig, PatAuthLayer, StoreError, TokenHash, TokenLookup, TokenRecord, UsageUpdate,
};

use common::{CountingStore, Tokens, new_token, send_token};

/// Polls `cond` every millisecond for at most `limit`; whether it held.
async fn wait_for(limit: Duration, mut cond: impl AsyncFnMut() -> bool) -> bool {
    let start = Instant::now();
    while start.elapsed() < limit {
        if cond().await {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    false
}

/// A [`CountingStore`] whose change feed is a hub the test publishes on, as a networked store's
/// listener would: `Disconnected`, `Reconnected`.
#[derive(Clone, Default)]
struct FeedStore {
    inner: CountingStore,
    feed: std::sync::Arc<ChangeHub>,
}

#[async_trait]
impl TokenLookup for FeedStore {
    async fn find_by_hash(&self, hash: &TokenHash) -> Result<Option<TokenRecord>, StoreError> {
        self.inner.find_by_hash(hash).await
    }

    async fn record_usage(&self, updates: &[UsageUpdate]) -> Result<(), StoreError> {
        self.inner.record_usage(updates).await
    }

    fn subscribe(&self, listener: Weak<dyn ChangeListener>) -> bool {
        self.feed.subscribe(listener);
        true
    }
}

fn short_ttl() -> CacheConfig {
    CacheConfig::default()
        .ttl(Duration::from_millis(100))
        .stale_if_error(Duration::from_secs(60))
}

/// The feed is connected but every refresh fails: the entry serves on (stale-if-error), and
/// `max_staleness()` says for how long the store has not answered, growing, until it answers.
#[tokio::test]
async fn failing_refreshes_raise_max_staleness_until_the_store_answers() {
    let store = CountingStore::new();
    let (_, secret) = Tokens::new(store.inner.clone())
        .issue(new_token("alice", &[]))
        .await
        .unwrap();
    let layer = PatAuthLayer::builder(store.clone())
        .cache(short_ttl())
        .build();
    assert_eq!(send_token(&layer, &secret).await.status, 200);
    assert_eq!(layer.max_staleness(), Duration::ZERO);

    store.failing.store(true, Ordering::SeqCst);
    let stale = wait_for(Duration::from_secs(3), async || {
        send_token(&layer, &secret).await.status == 200 && layer.max_staleness() > Duration::ZERO
    })
    .await;
    assert!(
        stale,
        "max_staleness() stays zero while the refreshes of a served entry fail"
    );
    let seen = layer.max_staleness();
    assert!(
        wait_for(Duration::from_secs(1), async || layer.max_staleness()
            > seen)
        .await,
        "the staleness grows"
    );

    store.failing.store(false, Ordering::SeqCst);
    let fresh = wait_for(Duration::from_secs(3), async || {
        send_token(&layer, &secret).await.status == 200 && layer.max_staleness() == Duration::ZERO
    })
    .await;
    assert!(fresh, "a refresh the store answers ends the staleness");
}

/// While the feed is down the node cannot hear a revocation: an entry serves until its TTL, not a
/// moment past it on trust (`stale_if_error` does not apply), so with the store failing too the
/// token gets 503. Once the feed is back (the cache emptied) and the store answers, it works
/// again and the staleness is zero.
#[tokio::test]
async fn no_entry_is_served_past_its_ttl_while_the_feed_is_down() {
    let store = FeedStore::default();
    let (_, secret) = Tokens::new(store.inner.inner.clone())
        .issue(new_token("alice", &[]))
        .await
        .unwrap();
    let layer = PatAuthLayer::builder(store.clone())
        .cache(short_ttl())
        .build();
    assert_eq!(send_token(&layer, &secret).await.status, 200);

    store.inner.failing.store(true, Ordering::SeqCst);
    store.feed.publish(&StoreEvent::Disconnected);
    assert_eq!(
        send_token(&layer, &secret).await.status,
        200,
        "within its TTL the entry serves on"
    );
    let refused = wait_for(Duration::from_secs(1), async || {
        send_token(&layer, &secret).await.status == 503
    })
    .await;
    assert!(
        refused,
        "a cached token is served past its TTL although no revocation can be heard"
    );
    assert!(layer.max_staleness() > Duration::ZERO);

    store.inner.failing.store(false, Ordering::SeqCst);
    store.feed.publish(&StoreEvent::Reconnected);
    assert_eq!(layer.max_staleness(), Duration::ZERO);
    assert_eq!(send_token(&layer, &secret).await.status, 200);
}
