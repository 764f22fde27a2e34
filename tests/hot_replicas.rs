//! Hot tokens on many threads: each thread serves a token it sees often from a replica of its own
//! (see `cache.rs`, module `hot`), without the shared map. The replicas must never outlive what
//! they copy: a revocation, an expiry, a refresh and the usage mark work as they do for the map.
//!
//! Every thread here sends far more than the 16 hits in a row that make a replica.

mod common;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use chrono::Utc;
use common::*;
use http::StatusCode;
use tower::Layer;
use tower_pat::{CacheConfig, PatAuthLayer, UsageConfig};

const THREADS: usize = 4;

/// Runs `f` on `THREADS` threads at once, each with a runtime of its own (a Tokio worker each),
/// and returns what they return.
fn on_threads<T: Send>(f: impl Fn(usize) -> T + Sync) -> Vec<T> {
    std::thread::scope(|s| {
        let handles: Vec<_> = (0..THREADS)
            .map(|t| {
                let f = &f;
                s.spawn(move || f(t))
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    })
}

/// On `THREADS` threads: `first`, then (all threads done with it) `between` on this thread, then
/// `second` on the same threads, with the replicas `first` made. What each thread's calls returned.
fn two_phases<A: Send, B: Send>(
    first: impl Fn() -> A + Sync,
    between: impl FnOnce(),
    second: impl Fn() -> B + Sync,
) -> Vec<(A, B)> {
    let done = std::sync::Barrier::new(THREADS + 1);
    let go = std::sync::Barrier::new(THREADS + 1);
    std::thread::scope(|s| {
        let threads: Vec<_> = (0..THREADS)
            .map(|_| {
                s.spawn(|| {
                    let a = first();
                    done.wait();
                    go.wait();
                    (a, second())
                })
            })
            .collect();
        done.wait();
        between();
        go.wait();
        threads.into_iter().map(|t| t.join().unwrap()).collect()
    })
}

/// A runtime for this thread (a Tokio worker of its own).
fn thread_runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap()
}

/// `n` requests with `token` from this thread, their statuses.
fn hammer(layer: &PatAuthLayer, token: &str, n: usize) -> Vec<StatusCode> {
    let rt = thread_runtime();
    let svc = layer.layer(echo_service());
    rt.block_on(async {
        let mut out = Vec::with_capacity(n);
        for _ in 0..n {
            out.push(call(&svc, request(Some(token), None)).await.status);
        }
        out
    })
}

#[test]
fn a_revocation_stops_every_threads_replica_at_once() {
    let rt = tokio::runtime::Runtime::new().unwrap();
    let store = CountingStore::new();
    let tokens = Tokens::new(store.inner.clone());
    let (record, secret) = rt.block_on(tokens.issue(new_token("alice", &[]))).unwrap();
    let layer = PatAuthLayer::builder(store.clone()).build();
    let token = secret.expose_secret();
    let results = two_phases(
        || hammer(&layer, token, 200),
        || {
            assert_eq!(
                store.lookups(),
                1,
                "every thread's hits came from the cache"
            );
            rt.block_on(tokens.revoke(&record.id)).unwrap();
        },
        || hammer(&layer, token, 20),
    );
    for (before, after) in results {
        assert!(before.iter().all(|s| *s == StatusCode::OK));
        // Each thread's first request after the revocation returned is refused, and the rest.
        assert!(
            after.iter().all(|s| *s == StatusCode::UNAUTHORIZED),
            "{after:?}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_request_that_starts_after_a_revocation_returned_is_admitted() {
    let store = CountingStore::new();
    let tokens = Tokens::new(store.inner.clone());
    let layer = PatAuthLayer::builder(store.clone()).build();
    for round in 0..10 {
        let (record, secret) = tokens.issue(new_token("alice", &[])).await.unwrap();
        let token = secret.expose_secret().to_owned();
        let revoked = Arc::new(AtomicBool::new(false));
        let admitted_after = Arc::new(AtomicUsize::new(0));
        let revoker = {
            let (tokens, revoked, id) = (tokens.clone(), Arc::clone(&revoked), record.id.clone());
            std::thread::spawn(move || {
                // Long enough for every thread to serve the token from its replica.
                std::thread::sleep(Duration::from_millis(20 + 7 * round));
                let rt = thread_runtime();
                rt.block_on(tokens.revoke(&id)).unwrap();
                revoked.store(true, Ordering::SeqCst);
            })
        };
        on_threads(|_| {
            let rt = thread_runtime();
            let svc = layer.layer(echo_service());
            rt.block_on(async {
                // Until this thread has seen 50 refusals.
                let mut mine = 0;
                while mine < 50 {
                    let after = revoked.load(Ordering::SeqCst);
                    let status = call(&svc, request(Some(&token), None)).await.status;
                    match status {
                        StatusCode::OK if after => {
                            admitted_after.fetch_add(1, Ordering::SeqCst);
                        }
                        StatusCode::OK => {}
                        StatusCode::UNAUTHORIZED => mine += 1,
                        other => panic!("unexpected {other}"),
                    }
                }
            });
        });
        revoker.join().unwrap();
        assert_eq!(
            admitted_after.load(Ordering::SeqCst),
            0,
            "round {round}: a request that started after the revocation returned was admitted"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn threads_serving_one_hot_token_mark_its_usage_once() {
    let store = CountingStore::new();
    let (_, secret) = Tokens::new(store.inner.clone())
        .issue(new_token("alice", &[]))
        .await
        .unwrap();
    let layer = PatAuthLayer::builder(store.clone())
        .track_usage(
            UsageConfig::default()
                .granularity(Duration::from_secs(60))
                .flush_interval(Duration::from_secs(3600)),
        )
        .build();
    let token = secret.expose_secret();
    for statuses in on_threads(|_| hammer(&layer, token, 300)) {
        assert!(statuses.iter().all(|s| *s == StatusCode::OK));
    }
    assert_eq!(layer.usage().unwrap().stats().marks, 1);
    // The principal handed out (a replica, on this thread after enough hits) sees the mark.
    for _ in 0..40 {
        let p = layer
            .verify(token, None, &tower_pat::ScopeSet::empty())
            .await
            .unwrap();
        let seen = p
            .last_used_at()
            .expect("the mark is visible through any principal");
        assert!(Utc::now() - seen < chrono::Duration::seconds(5));
    }
}

#[test]
fn a_hot_token_stops_working_when_it_expires() {
    let rt = tokio::runtime::Runtime::new().unwrap();
    let store = CountingStore::new();
    let expires = Utc::now() + chrono::Duration::milliseconds(1_500);
    let (_, secret) = rt
        .block_on(
            Tokens::new(store.inner.clone()).issue(new_token("alice", &[]).expires_at(expires)),
        )
        .unwrap();
    let layer = PatAuthLayer::builder(store.clone()).build();
    let token = secret.expose_secret();
    let results = two_phases(
        || hammer(&layer, token, 100),
        || {
            let wait = (expires - Utc::now()).to_std().unwrap_or_default();
            std::thread::sleep(wait + Duration::from_millis(30));
        },
        || hammer(&layer, token, 20),
    );
    for (before, after) in results {
        assert!(before.iter().all(|s| *s == StatusCode::OK));
        assert!(
            after.iter().all(|s| *s == StatusCode::UNAUTHORIZED),
            "{after:?}"
        );
    }
}

/// Without a change feed the cache hears of nothing: a revocation counts from the entry's next
/// refresh, one TTL after it was loaded, replicas included.
#[test]
fn without_a_feed_a_replica_goes_back_to_the_store_after_the_ttl() {
    let rt = tokio::runtime::Runtime::new().unwrap();
    let store = CountingStore {
        no_feed: true,
        ..CountingStore::new()
    };
    let tokens = Tokens::new(store.inner.clone());
    let (record, secret) = rt.block_on(tokens.issue(new_token("alice", &[]))).unwrap();
    let layer = PatAuthLayer::builder(store.clone())
        .cache(
            CacheConfig::default()
                .ttl(Duration::from_millis(300))
                .stale_if_error(Duration::from_secs(5)),
        )
        .build();
    let token = secret.expose_secret();
    let revoked_at = std::sync::OnceLock::new();
    let results = two_phases(
        || hammer(&layer, token, 100),
        || {
            rt.block_on(tokens.revoke(&record.id)).unwrap();
            revoked_at.set(Instant::now()).unwrap();
        },
        || {
            // Until refused: within the TTL and a refresh.
            let rt = thread_runtime();
            let svc = layer.layer(echo_service());
            let since = *revoked_at.get().unwrap();
            rt.block_on(async {
                loop {
                    let status = call(&svc, request(Some(token), None)).await.status;
                    if status == StatusCode::UNAUTHORIZED {
                        return since.elapsed();
                    }
                    assert_eq!(status, StatusCode::OK);
                    assert!(since.elapsed() < Duration::from_secs(3), "still admitted");
                    tokio::time::sleep(Duration::from_millis(2)).await;
                }
            })
        },
    );
    for (before, waited) in results {
        assert!(before.iter().all(|s| *s == StatusCode::OK));
        assert!(
            waited < Duration::from_secs(2),
            "refused only after {waited:?}"
        );
    }
}
