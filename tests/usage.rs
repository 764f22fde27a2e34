//! Write-behind usage tracking: coalesced, batched, never on the request path, nothing lost.

mod common;

use std::net::IpAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use chrono::Utc;
use common::*;
use tower::{Layer, ServiceExt};
use tower_pat::store::ChangeListener;
use tower_pat::{
    MemoryStore, PatAuthLayer, StoreError, TokenHash, TokenLookup, TokenRecord, TokenStore,
    UsageConfig, UsageRecorder, UsageUpdate,
};

fn config(flush_ms: u64) -> UsageConfig {
    UsageConfig::default()
        .granularity(Duration::ZERO)
        .flush_interval(Duration::from_millis(flush_ms))
        .retry_backoff(Duration::from_millis(20))
        .max_retry_backoff(Duration::from_millis(200))
}

async fn wait_until(mut cond: impl FnMut() -> bool, limit: Duration) {
    let start = Instant::now();
    while !cond() {
        assert!(
            start.elapsed() < limit,
            "condition not met within {limit:?}"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

fn rows_for(store: &CountingStore, id: &str) -> Vec<UsageUpdate> {
    let batches = store.usage_batches.lock().unwrap();
    batches
        .iter()
        .flatten()
        .filter(|u| u.token_id == id)
        .cloned()
        .collect()
}

#[tokio::test]
async fn ten_thousand_requests_over_two_flushes_write_two_rows() {
    let store = CountingStore::new();
    let (record, secret) = Tokens::new(store.inner.clone())
        .issue(new_token("alice", &[]))
        .await
        .unwrap();
    let layer = PatAuthLayer::builder(store.clone())
        .track_usage(config(400))
        .build();
    let usage = layer.usage().unwrap().clone();
    let svc = layer.layer(echo_service());
    let t = secret.expose_secret();

    let mut phases = Vec::new();
    for _ in 0..2 {
        let flushes = usage.stats().flushes;
        let start = Utc::now();
        for _ in 0..5_000 {
            let res = svc
                .clone()
                .oneshot(request(Some(t), Some("192.0.2.1:1")))
                .await
                .unwrap();
            assert_eq!(res.status(), 200);
        }
        let end = Utc::now();
        phases.push((start, end));
        wait_until(|| usage.stats().flushes > flushes, Duration::from_secs(5)).await;
    }

    let rows = rows_for(&store, &record.id);
    assert_eq!(rows.len(), 2, "{rows:?}");
    for (row, (start, end)) in rows.iter().zip(&phases) {
        let slack = chrono::Duration::milliseconds(20); // the coarse clock's resolution
        assert!(row.last_used_at >= *start - slack && row.last_used_at <= *end + slack);
        assert_eq!(row.ips, vec!["192.0.2.1".parse::<IpAddr>().unwrap()]);
    }
    assert!(rows[1].last_used_at > rows[0].last_used_at);
    let stored = store.inner.get(&record.id).await.unwrap().unwrap();
    assert_eq!(stored.last_used_at, Some(rows[1].last_used_at));
    let stats = usage.stats();
    assert_eq!(stats.rows_written, 2);
    assert!(stats.marks >= 2);
}

#[tokio::test]
async fn granularity_limits_marks_and_principal_sees_fresh_time() {
    let store = CountingStore::new();
    let (record, secret) = Tokens::new(store.inner.clone())
        .issue(new_token("alice", &[]))
        .await
        .unwrap();
    let layer = PatAuthLayer::builder(store.clone())
        .track_usage(config(10_000).granularity(Duration::from_secs(60)))
        .build();
    for _ in 0..100 {
        assert_eq!(send_token(&layer, &secret).await.status, 200);
    }
    let usage = layer.usage().unwrap();
    assert_eq!(usage.stats().marks, 1);
    let principal = layer
        .verify(secret.expose_secret(), None, &tower_pat::ScopeSet::empty())
        .await
        .unwrap();
    let seen = principal.last_used_at().expect("marked in memory at once");
    assert!(Utc::now() - seen < chrono::Duration::seconds(5));
    // Nothing written yet, but the pending mark is visible.
    assert_eq!(
        store
            .inner
            .get(&record.id)
            .await
            .unwrap()
            .unwrap()
            .last_used_at,
        None
    );
    assert!(usage.pending(&record.id).is_some());
}

/// A store whose `record_usage` blocks until released.
#[derive(Clone)]
struct BlockingStore {
    inner: MemoryStore,
    gate: Arc<tokio::sync::Semaphore>,
    entered: Arc<AtomicUsize>,
}

impl BlockingStore {
    /// Closed: every `record_usage` blocks until `gate` gets permits.
    fn closed() -> Self {
        Self {
            inner: MemoryStore::new(),
            gate: Arc::new(tokio::sync::Semaphore::new(0)),
            entered: Arc::default(),
        }
    }
}

/// A recorder over `store` (closed) whose first `flush()`, of one mark, is stuck in the store.
async fn stuck_in_a_flush(
    store: &BlockingStore,
) -> (
    UsageRecorder,
    tokio::task::JoinHandle<Result<usize, StoreError>>,
) {
    let usage = UsageRecorder::new(store.clone(), config(3_600_000));
    usage.record("first", Utc::now(), None);
    let first = {
        let usage = usage.clone();
        tokio::spawn(async move { usage.flush().await })
    };
    wait_until(
        || store.entered.load(Ordering::SeqCst) == 1,
        Duration::from_secs(5),
    )
    .await;
    (usage, first)
}

#[async_trait]
impl TokenLookup for BlockingStore {
    async fn find_by_hash(&self, hash: &TokenHash) -> Result<Option<TokenRecord>, StoreError> {
        self.inner.find_by_hash(hash).await
    }
    async fn record_usage(&self, updates: &[UsageUpdate]) -> Result<(), StoreError> {
        self.entered.fetch_add(1, Ordering::SeqCst);
        let _permit = self.gate.acquire().await.unwrap();
        self.inner.record_usage(updates).await
    }
    fn subscribe(&self, l: std::sync::Weak<dyn ChangeListener>) -> bool {
        self.inner.subscribe(l)
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stuck_flush_never_delays_requests() {
    // The gate has no permits: record_usage blocks.
    let store = BlockingStore::closed();
    let (_, secret) = Tokens::new(store.inner.clone())
        .issue(new_token("alice", &[]))
        .await
        .unwrap();
    let layer = PatAuthLayer::builder(store.clone())
        .track_usage(config(50))
        .build();
    assert_eq!(send_token(&layer, &secret).await.status, 200);
    wait_until(
        || store.entered.load(Ordering::SeqCst) > 0,
        Duration::from_secs(5),
    )
    .await;
    // The flush is stuck (and stays stuck for 5 s); requests go on.
    let release = {
        let gate = Arc::clone(&store.gate);
        tokio::spawn(async move {
            tokio::time::sleep(Duration::from_secs(5)).await;
            gate.add_permits(1000);
        })
    };
    for _ in 0..1000 {
        assert_eq!(send_token(&layer, &secret).await.status, 200);
    }
    assert!(
        !release.is_finished(),
        "requests completed while the flush was still stuck"
    );
    release.abort();
}

#[tokio::test]
async fn shutdown_writes_what_is_pending() {
    let store = CountingStore::new();
    let (record, secret) = Tokens::new(store.inner.clone())
        .issue(new_token("alice", &[]))
        .await
        .unwrap();
    let layer = PatAuthLayer::builder(store.clone())
        .track_usage(config(3_600_000))
        .build();
    assert_eq!(
        send(
            &layer,
            request(Some(secret.expose_secret()), Some("198.51.100.4:1"))
        )
        .await
        .status,
        200
    );
    let usage = layer.usage().unwrap();
    assert_eq!(usage.stats().pending_tokens, 1);
    usage.shutdown().await;
    let stored = store.inner.get(&record.id).await.unwrap().unwrap();
    assert!(stored.last_used_at.is_some());
    assert_eq!(
        stored.last_used_ips,
        vec!["198.51.100.4".parse::<IpAddr>().unwrap()]
    );
    assert_eq!(usage.stats().pending_tokens, 0);
}

/// Fails `record_usage` a number of times, then succeeds.
#[derive(Clone, Default)]
struct FlakyStore {
    inner: MemoryStore,
    failures_left: Arc<AtomicUsize>,
    attempts: Arc<AtomicUsize>,
}

#[async_trait]
impl TokenLookup for FlakyStore {
    async fn find_by_hash(&self, hash: &TokenHash) -> Result<Option<TokenRecord>, StoreError> {
        self.inner.find_by_hash(hash).await
    }
    async fn record_usage(&self, updates: &[UsageUpdate]) -> Result<(), StoreError> {
        self.attempts.fetch_add(1, Ordering::SeqCst);
        if self
            .failures_left
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
            .is_ok()
        {
            return Err(StoreError::backend("database is down"));
        }
        self.inner.record_usage(updates).await
    }
}

#[tokio::test]
async fn three_failures_then_success_lose_no_mark() {
    let store = FlakyStore::default();
    store.failures_left.store(3, Ordering::SeqCst);
    let (a, _) = Tokens::new(store.inner.clone())
        .issue(new_token("alice", &[]))
        .await
        .unwrap();
    let (b, _) = Tokens::new(store.inner.clone())
        .issue(new_token("bob", &[]))
        .await
        .unwrap();
    let recorder = UsageRecorder::new(store.clone(), config(30));
    let t0 = Utc::now();
    recorder.record(&a.id, t0, Some("192.0.2.1".parse().unwrap()));
    recorder.record(&b.id, t0, None);
    // A newer mark arrives while the first batch keeps failing.
    tokio::time::sleep(Duration::from_millis(60)).await;
    let t1 = t0 + chrono::Duration::seconds(1);
    recorder.record(&a.id, t1, Some("192.0.2.2".parse().unwrap()));
    wait_until(|| recorder.stats().flushes >= 1, Duration::from_secs(5)).await;
    wait_until(
        || recorder.stats().pending_tokens == 0,
        Duration::from_secs(5),
    )
    .await;

    let stats = recorder.stats();
    assert_eq!(stats.retries, 3);
    assert_eq!(stats.dropped_marks, 0);
    let a = store.inner.get(&a.id).await.unwrap().unwrap();
    let b = store.inner.get(&b.id).await.unwrap().unwrap();
    assert_eq!(a.last_used_at, Some(t1));
    assert_eq!(
        a.last_used_ips,
        vec![
            "192.0.2.2".parse::<IpAddr>().unwrap(),
            "192.0.2.1".parse().unwrap()
        ]
    );
    assert_eq!(b.last_used_at, Some(t0));
}

#[tokio::test]
async fn late_and_retried_marks_never_move_last_used_back() {
    let store = MemoryStore::new();
    let (record, _) = Tokens::new(store.clone())
        .issue(new_token("alice", &[]))
        .await
        .unwrap();
    let recorder = UsageRecorder::new(store.clone(), config(3_600_000));
    let now = Utc::now();
    recorder.record(&record.id, now, None);
    recorder.record(&record.id, now - chrono::Duration::minutes(5), None); // out of order
    recorder.flush().await.unwrap();
    assert_eq!(
        store.get(&record.id).await.unwrap().unwrap().last_used_at,
        Some(now)
    );
    // A retried, older batch reaches the store late.
    let old = UsageUpdate::new(&record.id, now - chrono::Duration::hours(1), vec![]);
    store.record_usage(&[old]).await.unwrap();
    assert_eq!(
        store.get(&record.id).await.unwrap().unwrap().last_used_at,
        Some(now)
    );
}

#[tokio::test]
async fn pending_marks_are_bounded_during_an_outage() {
    let store = FlakyStore::default();
    store.failures_left.store(usize::MAX, Ordering::SeqCst);
    let recorder = UsageRecorder::new(store.clone(), config(20).max_pending_tokens(1_000));
    let now = Utc::now();
    for i in 0..100_000 {
        recorder.record(&format!("token-{i}"), now, None);
    }
    wait_until(
        || store.attempts.load(Ordering::SeqCst) >= 2,
        Duration::from_secs(5),
    )
    .await;
    let stats = recorder.stats();
    assert_eq!(stats.pending_tokens, 1_000);
    assert_eq!(stats.dropped_marks, 99_000);
    assert_eq!(stats.marks, 100_000);
}

/// A failed flush keeps its batch for the next one, which merges the marks made since into it:
/// the newest time wins, and the batch kept stays within `max_pending_tokens` (the tokens beyond
/// it are dropped and counted, not written, and do not push out the tokens it holds).
#[tokio::test]
async fn a_failed_batch_takes_the_marks_made_since_within_the_bound() {
    let store = FlakyStore::default();
    store.failures_left.store(1, Ordering::SeqCst);
    let tokens = Tokens::new(store.inner.clone());
    let mut ids = Vec::new();
    for name in ["a", "b", "c", "d"] {
        ids.push(tokens.issue(new_token(name, &[])).await.unwrap().0.id);
    }
    let recorder = UsageRecorder::new(store.clone(), config(3_600_000).max_pending_tokens(2));
    let t0 = Utc::now() - chrono::Duration::minutes(1);
    let t1 = t0 + chrono::Duration::seconds(30);
    recorder.record(&ids[0], t0, None);
    recorder.record(&ids[1], t0, None);
    assert!(recorder.flush().await.is_err());
    assert_eq!(recorder.stats().pending_tokens, 2);
    recorder.record(&ids[0], t1, None);
    recorder.record(&ids[0], t0 - chrono::Duration::hours(1), None); // late, older
    recorder.record(&ids[2], t1, None);
    recorder.record(&ids[3], t1, None);
    assert_eq!(recorder.pending(&ids[0]).map(|u| u.last_used_at), Some(t1));
    assert_eq!(recorder.pending(&ids[1]).map(|u| u.last_used_at), Some(t0));

    assert_eq!(recorder.flush().await.unwrap(), 2);
    let stats = recorder.stats();
    assert_eq!(stats.pending_tokens, 0);
    assert_eq!(stats.dropped_marks, 2, "{stats:?}");
    assert_eq!(store.attempts.load(Ordering::SeqCst), 2);
    let stored = |i: usize| {
        let store = store.inner.clone();
        let id = ids[i].clone();
        async move { store.get(&id).await.unwrap().unwrap().last_used_at }
    };
    assert_eq!(stored(0).await, Some(t1));
    assert_eq!(stored(1).await, Some(t0));
    assert_eq!(stored(2).await, None);
    assert_eq!(stored(3).await, None);
}

/// A shutdown whose flushes all fail counts every token whose marks it loses as dropped, those
/// of the batch a failed flush kept included, each token once.
#[tokio::test]
async fn shutdown_against_a_store_that_stays_down_counts_what_is_lost() {
    let store = FlakyStore::default();
    store.failures_left.store(usize::MAX, Ordering::SeqCst);
    let recorder = UsageRecorder::new(store.clone(), config(3_600_000));
    let now = Utc::now();
    recorder.record("token-a", now, None);
    recorder.record("token-b", now, None);
    assert!(recorder.flush().await.is_err());
    // Marked again after the failure, and a token marked only since.
    recorder.record("token-a", now, None);
    recorder.record("token-c", now, None);
    recorder.shutdown().await;
    let stats = recorder.stats();
    assert_eq!(stats.dropped_marks, 3, "{stats:?}");
    assert_eq!(stats.pending_tokens, 0, "{stats:?}");
    assert!(store.attempts.load(Ordering::SeqCst) >= 2);
}

/// `stats()` (every `/metrics` and `/readyz` of `patd`, no token needed) while flushes that fail
/// take the batch and merge into it: no lock-order deadlock between the two. Run on threads of
/// its own, so that a deadlock shows as a timeout here rather than a hung test.
#[test]
fn stats_during_failing_flushes_never_deadlock() {
    let (done, finished) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .unwrap();
        runtime.block_on(async {
            let store = FlakyStore::default();
            store.failures_left.store(usize::MAX, Ordering::SeqCst);
            let recorder = UsageRecorder::new(store.clone(), config(3_600_000));
            let now = Utc::now();
            let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
            let reader = {
                let recorder = recorder.clone();
                let stop = Arc::clone(&stop);
                std::thread::spawn(move || {
                    let mut reads = 0u64;
                    while !stop.load(Ordering::Relaxed) {
                        reads += recorder.stats().pending_tokens.min(1);
                    }
                    reads
                })
            };
            for round in 0..200 {
                for i in 0..200 {
                    recorder.record(&format!("token-{round}-{i}"), now, None);
                }
                assert!(recorder.flush().await.is_err());
            }
            stop.store(true, Ordering::Relaxed);
            assert!(reader.join().unwrap() > 0);
        });
        let _ = done.send(());
    });
    finished
        .recv_timeout(Duration::from_secs(60))
        .expect("stats() and a flush deadlocked (or the test took over 60 s)");
}

#[tokio::test]
async fn last_ips_keep_the_five_most_recent_distinct() {
    let store = CountingStore::new();
    let (record, secret) = Tokens::new(store.inner.clone())
        .issue(new_token("alice", &[]))
        .await
        .unwrap();
    let layer = PatAuthLayer::builder(store.clone())
        .track_usage(config(3_600_000))
        .build();
    for i in 1..=7 {
        for _ in 0..2 {
            let peer = format!("10.0.0.{i}:1000");
            assert_eq!(
                send(&layer, request(Some(secret.expose_secret()), Some(&peer)))
                    .await
                    .status,
                200
            );
        }
        tokio::time::sleep(Duration::from_millis(5)).await; // distinct coarse-clock times
    }
    layer.usage().unwrap().flush().await.unwrap();
    let stored = store.inner.get(&record.id).await.unwrap().unwrap();
    let expected: Vec<IpAddr> = (3..=7)
        .rev()
        .map(|i| format!("10.0.0.{i}").parse().unwrap())
        .collect();
    assert_eq!(stored.last_used_ips, expected);
}

#[tokio::test]
async fn management_api_shows_usage_not_yet_written() {
    use axum::body::Body;
    use http_body_util::BodyExt;
    use tower_pat::admin::{self, AdminConfig};

    let tokens = Tokens::new(MemoryStore::new());
    let (record, secret) = tokens
        .issue(new_token("alice", &["personalAccessToken:read"]))
        .await
        .unwrap();
    let layer = tokens
        .layer()
        .track_usage(config(3_600_000)) // nothing is flushed during the test
        .build();
    let app = admin::router(AdminConfig::new(&tokens, &layer).unwrap());
    let get = |path: &'static str| {
        let app = app.clone();
        let token = secret.expose_secret().to_owned();
        async move {
            let mut req = http::Request::builder()
                .uri(path)
                .header("authorization", format!("Bearer {token}"))
                .body(Body::empty())
                .unwrap();
            req.extensions_mut()
                .insert("192.0.2.44:1000".parse::<std::net::SocketAddr>().unwrap());
            let res = app.oneshot(req).await.unwrap();
            assert_eq!(res.status(), 200);
            let body = res.into_body().collect().await.unwrap().to_bytes();
            serde_json::from_slice::<serde_json::Value>(&body).unwrap()
        }
    };
    let me = get("/self").await;
    assert!(me["lastUsedAt"].is_string(), "{me}");
    assert_eq!(me["seenAt"], me["lastUsedAt"]);
    assert_eq!(me["lastUsedIps"], serde_json::json!(["192.0.2.44"]));
    let list = get("/").await;
    assert_eq!(list[0]["id"], record.id.as_str());
    assert!(list[0]["lastUsedAt"].is_string(), "{list}");
    // The store itself has not been written yet.
    assert_eq!(
        tokens.get(&record.id).await.unwrap().unwrap().last_used_at,
        None
    );
}

/// The admin list flushes before it filters on last use: a flush called while the flusher is
/// writing must wait for that write, and the batch being written still shows as pending.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flush_during_the_flushers_write_waits_for_it() {
    let store = BlockingStore::closed();
    let (record, _) = Tokens::new(store.inner.clone())
        .issue(new_token("alice", &[]))
        .await
        .unwrap();
    let usage = UsageRecorder::new(store.clone(), config(10));
    usage.record(&record.id, Utc::now(), None);
    // The flusher took the mark and is stuck writing it.
    wait_until(
        || store.entered.load(Ordering::SeqCst) > 0,
        Duration::from_secs(5),
    )
    .await;
    assert!(
        usage.pending(&record.id).is_some(),
        "a mark being written must still show as pending"
    );
    let flush = tokio::spawn({
        let usage = usage.clone();
        async move { usage.flush().await }
    });
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert!(
        !flush.is_finished(),
        "flush() returned while the flusher's write of an earlier mark was still under way"
    );
    store.gate.add_permits(1000);
    flush.await.unwrap().unwrap();
    let stored = store.inner.get(&record.id).await.unwrap().unwrap();
    assert!(
        stored.last_used_at.is_some(),
        "after flush() returns, the mark is in the store"
    );
    assert!(usage.pending(&record.id).is_none());
    usage.shutdown().await;
}

/// A caller that gives up on `flush()` (a dropped request future) loses no mark.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dropped_flush_loses_nothing() {
    let store = BlockingStore::closed();
    let (record, _) = Tokens::new(store.inner.clone())
        .issue(new_token("alice", &[]))
        .await
        .unwrap();
    // The interval is long: only the explicit flush writes.
    let usage = UsageRecorder::new(store.clone(), config(3_600_000));
    usage.record(&record.id, Utc::now(), None);
    let gave_up = tokio::time::timeout(Duration::from_millis(100), usage.flush()).await;
    assert!(
        gave_up.is_err(),
        "the store is blocked: the flush cannot finish"
    );
    assert_eq!(store.entered.load(Ordering::SeqCst), 1);
    store.gate.add_permits(1000);
    let inner = store.inner.clone();
    let id = record.id.clone();
    let start = Instant::now();
    loop {
        if inner
            .get(&id)
            .await
            .unwrap()
            .unwrap()
            .last_used_at
            .is_some()
        {
            break;
        }
        assert!(
            start.elapsed() < Duration::from_secs(5),
            "the mark of a dropped flush never reached the store"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    assert_eq!(usage.stats().dropped_marks, 0);
    usage.shutdown().await;
}

/// A flood of forced flushes (the management API flushes before each list sorted or filtered by
/// last use, which any token that may read its own tokens can ask for) while the store is slow:
/// the calls share one write in flight and one waiting. Before, each call spawned a task that
/// queued for a write of its own and outlived its caller, so a client that dropped its requests
/// grew the queue without bound.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flood_of_flushes_shares_one_write_at_a_time() {
    let store = BlockingStore::closed();
    let (usage, first) = stuck_in_a_flush(&store).await;
    let tasks = || {
        tokio::runtime::Handle::current()
            .metrics()
            .num_alive_tasks()
    };
    let before = tasks();
    // A thousand callers that give up (their request dropped), each after a mark of its own.
    for i in 0..1000 {
        usage.record(&format!("t{i}"), Utc::now(), None);
        let _ = tokio::time::timeout(Duration::from_millis(1), usage.flush()).await;
    }
    assert!(
        tasks() <= before + 1,
        "{} tasks alive after the flood, {before} before",
        tasks()
    );
    assert_eq!(store.entered.load(Ordering::SeqCst), 1);

    store.gate.add_permits(1_000_000);
    assert_eq!(first.await.unwrap().unwrap(), 1);
    // Every mark made before this call is written, by at most two more writes.
    usage.flush().await.unwrap();
    assert!(store.entered.load(Ordering::SeqCst) <= 3);
    assert_eq!(usage.stats().rows_written, 1001);
    assert_eq!(usage.stats().pending_tokens, 0);
}

/// A flush asked for on a runtime that shuts down before the flush starts does not break
/// `flush()` for good: the next call starts a flush of its own instead of waiting for an answer
/// that will never come.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flush_lost_with_its_runtime_is_replaced() {
    let store = BlockingStore::closed();
    let (usage, first) = stuck_in_a_flush(&store).await;
    // Another runtime asks for a flush, which queues behind the first, and then shuts down.
    let other = usage.clone();
    std::thread::spawn(move || {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async {
            let _ = tokio::time::timeout(Duration::from_millis(20), other.flush()).await;
        });
    })
    .join()
    .unwrap();
    store.gate.add_permits(1_000_000);
    first.await.unwrap().unwrap();
    usage.record("second", Utc::now(), None);
    assert_eq!(usage.flush().await.unwrap(), 1);
}

/// A store write that never returns (a connection black-holed mid-query) does not hold
/// `shutdown` past `max_retry_backoff`.
#[tokio::test]
async fn shutdown_returns_when_the_store_never_answers() {
    let store = BlockingStore::closed();
    let usage = UsageRecorder::new(store.clone(), config(20));
    usage.record("a", Utc::now(), None);
    wait_until(
        || store.entered.load(Ordering::SeqCst) > 0,
        Duration::from_secs(5),
    )
    .await;
    assert!(
        tokio::time::timeout(Duration::from_secs(5), usage.shutdown())
            .await
            .is_ok(),
        "shutdown waited for a write that never ends"
    );
}

/// A last use stored in the future (written by a node whose clock ran a year ahead) does not
/// stop this node from marking the token.
#[tokio::test]
async fn a_use_stored_in_the_future_does_not_stop_marking() {
    let store = CountingStore::new();
    let (record, secret) = Tokens::new(store.inner.clone())
        .issue(new_token("alice", &[]))
        .await
        .unwrap();
    store
        .inner
        .record_usage(&[UsageUpdate::new(
            &record.id,
            Utc::now() + chrono::TimeDelta::days(365),
            vec![],
        )])
        .await
        .unwrap();
    let layer = PatAuthLayer::builder(store.clone())
        .track_usage(config(3_600_000))
        .build();
    assert_eq!(send_token(&layer, &secret).await.status, 200);
    let usage = layer.usage().unwrap();
    assert_eq!(usage.stats().marks, 1);
    assert!(usage.pending(&record.id).is_some());
}

/// Two nodes flushing the same tokens at once, their batches in opposite orders, never
/// deadlock; a time more than a minute past the database's clock is stored as that.
#[cfg(feature = "postgres")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_flushes_in_opposite_orders_and_times_in_the_future() {
    let Some(db) = common::pg::TestDb::create("usage").await else {
        return;
    };
    let connect = || {
        tower_pat::PostgresStore::builder()
            .max_connections(4)
            .connect_with(db.options.clone())
    };
    let (a, b) = (connect().await.unwrap(), connect().await.unwrap());
    let tokens = Tokens::new(a.clone());
    let mut ids = Vec::new();
    for i in 0..200 {
        let (record, _) = tokens
            .issue(new_token(&format!("s{i}"), &[]))
            .await
            .unwrap();
        ids.push(record.id);
    }
    for round in 0..30 {
        let at = Utc::now();
        let asc: Vec<UsageUpdate> = ids
            .iter()
            .map(|id| UsageUpdate::new(id, at, vec![]))
            .collect();
        let desc: Vec<UsageUpdate> = asc.iter().rev().cloned().collect();
        let (x, y) = tokio::join!(a.record_usage(&asc), b.record_usage(&desc));
        x.unwrap_or_else(|e| panic!("round {round}: {e}"));
        y.unwrap_or_else(|e| panic!("round {round}: {e}"));
    }
    a.record_usage(&[UsageUpdate::new(
        &ids[0],
        Utc::now() + chrono::TimeDelta::days(365),
        vec![],
    )])
    .await
    .unwrap();
    let stored = a.get(&ids[0]).await.unwrap().unwrap().last_used_at.unwrap();
    assert!(
        stored <= Utc::now() + chrono::TimeDelta::minutes(2),
        "{stored}"
    );
    a.pool().close().await;
    b.pool().close().await;
}
