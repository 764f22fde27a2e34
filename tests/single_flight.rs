//! Concurrent misses for one token make one store query.

mod common;

use std::sync::atomic::Ordering;

use common::*;
use tower_pat::PatAuthLayer;

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_thousand_concurrent_requests_make_one_lookup() {
    let store = CountingStore::new();
    let (_, secret) = issue(&store.inner, new_token("alice", &[])).await;
    store.delay_ms.store(100, Ordering::SeqCst);
    let layer = PatAuthLayer::builder(store.clone()).build();
    let statuses = concurrent_statuses(&layer, secret.expose_secret(), 1000).await;
    assert!(statuses.iter().all(|s| *s == 200));
    assert_eq!(store.lookups(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_misses_for_an_unknown_token_make_one_lookup() {
    let store = CountingStore::new();
    store.delay_ms.store(50, Ordering::SeqCst);
    let layer = PatAuthLayer::builder(store.clone()).build();
    let unknown = tower_pat::TokenFormat::new().generate();
    let statuses = concurrent_statuses(&layer, unknown.expose_secret(), 200).await;
    assert!(statuses.iter().all(|s| *s == 401));
    assert_eq!(store.lookups(), 1);
}
