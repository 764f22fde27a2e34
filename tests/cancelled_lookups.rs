//! Requests dropped while their token is being looked up (client disconnects, outer timeouts)
//! leave nothing behind: no single-flight entry, no memory.
//!
//! Alone in its test binary: it measures the process's resident memory.

mod common;

use std::future::Future;
use std::pin::{Pin, pin};
use std::sync::atomic::Ordering;
use std::task::{Context, Poll, Waker};
use std::time::Duration;

use common::*;
use tower::{Layer, Service, ServiceExt};
use tower_pat::{PatAuthLayer, TokenFormat};

/// How many requests the measured round drops. A million takes minutes in an unoptimised test
/// build on a shared two-core machine; 200 000 runs in seconds and, at the 180 bytes a dropped
/// request used to leak, would grow the heap by 36 MB, far above the bound asserted below.
const DROPPED: usize = 200_000;
/// Requests dropped before measuring, so that allocator pools and the runtime's queues are warm.
const WARMUP: usize = 20_000;
/// Resident-memory growth tolerated over the measured round.
const MAX_GROWTH: usize = 8 << 20;

fn poll_once<F: Future>(fut: Pin<&mut F>) -> Poll<F::Output> {
    fut.poll(&mut Context::from_waker(Waker::noop()))
}

/// Resident set size of this process, from `/proc/self/statm`.
fn rss_bytes() -> usize {
    let statm = std::fs::read_to_string("/proc/self/statm").expect("/proc/self/statm");
    let pages: usize = statm.split_whitespace().nth(1).unwrap().parse().unwrap();
    pages * 4096
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dropped_requests_leave_no_flight_and_no_memory_behind() {
    let store = CountingStore::new();
    // Every lookup hangs: each request is still waiting for the store when it is dropped.
    store.delay_ms.store(600_000, Ordering::SeqCst);
    let layer = PatAuthLayer::builder(store.clone()).build();
    let svc = layer.layer(echo_service());
    let format = TokenFormat::new();
    let runtime = tokio::runtime::Handle::current().metrics();
    let tasks_before = runtime.num_alive_tasks();

    let round = |n: usize| {
        let mut svc = svc.clone();
        let format = format.clone();
        async move {
            for i in 0..n {
                // A distinct random token each time: one flight per request.
                let token = format.generate();
                let peer = format!("198.51.100.{}:443", i % 200);
                let fut = svc
                    .ready()
                    .await
                    .unwrap()
                    .call(request(Some(token.expose_secret()), Some(&peer)));
                let mut fut = pin!(fut);
                assert!(poll_once(fut.as_mut()).is_pending());
                if i % 1024 == 0 {
                    tokio::task::yield_now().await;
                }
            }
        }
    };
    // Whatever the dropped requests started must be gone: the runtime's tasks back to where they
    // were (bounded wait).
    let settle = || async {
        for _ in 0..2_000 {
            if runtime.num_alive_tasks() <= tasks_before {
                break;
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        assert!(
            runtime.num_alive_tasks() <= tasks_before,
            "tasks left behind"
        );
    };

    round(WARMUP).await;
    settle().await;
    assert_eq!(layer.lookups_in_flight(), 0);
    let before = rss_bytes();

    round(DROPPED).await;
    settle().await;
    let after = rss_bytes();
    assert_eq!(layer.lookups_in_flight(), 0, "single-flight entries leaked");
    let growth = after.saturating_sub(before);
    eprintln!(
        "{DROPPED} dropped requests: RSS {} -> {} KiB (+{} KiB), {} store lookups started",
        before / 1024,
        after / 1024,
        growth / 1024,
        store.lookups()
    );
    assert!(
        growth <= MAX_GROWTH,
        "RSS grew by {growth} bytes over {DROPPED} dropped requests"
    );
}
