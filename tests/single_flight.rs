//! Concurrent misses for one token make one store query.

mod common;

use std::sync::atomic::Ordering;

use common::*;
use tower::{Layer, ServiceExt};
use tower_pat::PatAuthLayer;

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_thousand_concurrent_requests_make_one_lookup() {
    let store = CountingStore::new();
    let (_, secret) = issue(&store.inner, new_token("alice", &[])).await;
    store.delay_ms.store(100, Ordering::SeqCst);
    let layer = PatAuthLayer::builder(store.clone()).build();
    let svc = layer.layer(echo_service());
    let token = secret.expose_secret().to_owned();
    let tasks: Vec<_> = (0..1000)
        .map(|_| {
            let svc = svc.clone();
            let token = token.clone();
            tokio::spawn(async move {
                svc.oneshot(request(Some(&token), None))
                    .await
                    .unwrap()
                    .status()
            })
        })
        .collect();
    for t in tasks {
        assert_eq!(t.await.unwrap(), 200);
    }
    assert_eq!(store.lookups(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_misses_for_an_unknown_token_make_one_lookup() {
    let store = CountingStore::new();
    store.delay_ms.store(50, Ordering::SeqCst);
    let layer = PatAuthLayer::builder(store.clone()).build();
    let svc = layer.layer(echo_service());
    let token = tower_pat::TokenFormat::new()
        .generate()
        .expose_secret()
        .to_owned();
    let tasks: Vec<_> = (0..200)
        .map(|_| {
            let svc = svc.clone();
            let token = token.clone();
            tokio::spawn(async move {
                svc.oneshot(request(Some(&token), None))
                    .await
                    .unwrap()
                    .status()
            })
        })
        .collect();
    for t in tasks {
        assert_eq!(t.await.unwrap(), 401);
    }
    assert_eq!(store.lookups(), 1);
}
