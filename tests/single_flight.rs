//! Concurrent misses for one token make one store query.

mod common;

use std::sync::atomic::Ordering;

use common::*;
use tower_pat::PatAuthLayer;

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_thousand_concurrent_requests_make_one_lookup() {
    let store = CountingStore::new();
    let (_, secret) = Tokens::new(store.inner.clone())
        .issue(new_token("alice", &[]))
        .await
        .unwrap();
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

/// Polls a future once, as a client that disconnects right after sending would.
fn poll_once<F: std::future::Future>(fut: std::pin::Pin<&mut F>) -> std::task::Poll<F::Output> {
    fut.poll(&mut std::task::Context::from_waker(std::task::Waker::noop()))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dropped_waiter_does_not_cancel_the_lookup_for_the_others() {
    use tower::{Layer, Service, ServiceExt};
    let store = CountingStore::new();
    let (_, secret) = Tokens::new(store.inner.clone())
        .issue(new_token("alice", &[]))
        .await
        .unwrap();
    store.delay_ms.store(200, Ordering::SeqCst);
    let layer = PatAuthLayer::builder(store.clone()).build();
    let mut svc = layer.layer(echo_service());

    // The first request starts the lookup, a second one joins it, then the first goes away.
    let first = svc
        .ready()
        .await
        .unwrap()
        .call(request(Some(secret.expose_secret()), Some("192.0.2.1:1")));
    let mut first = Box::pin(first);
    assert!(poll_once(first.as_mut()).is_pending());
    let second = svc
        .ready()
        .await
        .unwrap()
        .call(request(Some(secret.expose_secret()), Some("192.0.2.2:1")));
    let mut second = Box::pin(second);
    assert!(poll_once(second.as_mut()).is_pending());
    assert_eq!(layer.lookups_in_flight(), 1);
    drop(first);

    let res = tokio::time::timeout(std::time::Duration::from_secs(5), second)
        .await
        .expect("the remaining waiter gets its answer")
        .unwrap();
    assert_eq!(res.status(), 200);
    // The lookup the first request started was not cancelled and restarted for the second.
    assert_eq!(store.lookups(), 1);
    assert_eq!(layer.lookups_in_flight(), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_dropped_mid_lookup_leaves_no_flight_and_no_slot_behind() {
    use tower::{Layer, Service, ServiceExt};
    let store = CountingStore::new();
    let (_, secret) = Tokens::new(store.inner.clone())
        .issue(new_token("alice", &[]))
        .await
        .unwrap();
    // One lookup slot: if the dropped request kept it, the next lookup could never run.
    let layer = PatAuthLayer::builder(store.clone())
        .cache(
            tower_pat::CacheConfig::default()
                .max_concurrent_lookups(1)
                .lookup_wait(std::time::Duration::from_millis(500)),
        )
        .build();
    let mut svc = layer.layer(echo_service());

    store.delay_ms.store(60_000, Ordering::SeqCst);
    let unknown = tower_pat::TokenFormat::new().generate();
    let hanging = svc
        .ready()
        .await
        .unwrap()
        .call(request(Some(unknown.expose_secret()), Some("192.0.2.1:1")));
    let mut hanging = Box::pin(hanging);
    assert!(poll_once(hanging.as_mut()).is_pending());
    assert_eq!(layer.lookups_in_flight(), 1);
    drop(hanging);
    assert_eq!(layer.lookups_in_flight(), 0);

    store.delay_ms.store(0, Ordering::SeqCst);
    let reply = send(
        &layer,
        request(Some(secret.expose_secret()), Some("192.0.2.1:1")),
    )
    .await;
    assert_eq!(reply.status, 200);
    assert_eq!(layer.lookups_in_flight(), 0);
}
