//! Write-behind of usage: when and from where each token was last used, without a write on the
//! request path.
//!
//! The layer marks a token after a successful check: a relaxed atomic load on its cache entry, and
//! only when the last mark is older than [`UsageConfig::granularity`] does the mark reach the
//! [`UsageRecorder`]. There it is coalesced: one pending entry per token (the latest time and the
//! last few distinct client addresses), however many requests arrive. A background task hands the
//! whole batch to [`TokenLookup::record_usage`] every [`UsageConfig::flush_interval`], at most one
//! row per token per flush.
//!
//! ## How fresh is `lastUsedAt`?
//!
//! In the store, at most `flush_interval + granularity` old (11 s with the defaults) while the store
//! is healthy; in this process, [`Principal::last_used_at`](crate::Principal::last_used_at) is exact
//! to the granularity. Lower both for fresher data at the cost of more writes: the write rate is at
//! most one row per active token per `max(flush_interval, granularity)`. For comparison, GitLab
//! updates a personal access token's `last_used_at` at most once every 10 minutes, and Unleash
//! flushes its `seenAt` marks every 3 minutes (it is a "seen recently" signal, not an audit log).
//!
//! ## Failures
//!
//! A failed flush keeps its batch and retries with exponential backoff (capped); marks made
//! meanwhile merge into it when the retry starts (the later time wins, `lastUsedAt` never moves
//! backwards), so that marking never waits for a merge. Both the marks pending and the batch kept
//! are bounded by [`UsageConfig::max_pending_tokens`]: beyond it, marks of tokens not yet pending
//! are dropped and counted ([`UsageStats::dropped_marks`]), so an outage cannot exhaust memory.
//! Requests never wait for a flush.
//!
//! ## Shutdown
//!
//! Call [`UsageRecorder::shutdown`] before exiting: it flushes what is pending. A recorder dropped
//! with marks pending logs how many were lost.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;

use chrono::{DateTime, Utc};
use tokio::sync::Notify;

pub use crate::record::UsageUpdate;
use crate::store::TokenLookup;

/// Settings of the [`UsageRecorder`], built from [`UsageConfig::default`] with the setters below
/// (each names its default):
///
/// ```
/// use std::time::Duration;
/// use tower_pat::UsageConfig;
///
/// let config = UsageConfig::default().flush_interval(Duration::from_secs(30));
/// assert_eq!(config.flush_interval, Duration::from_secs(30));
/// assert_eq!(config.granularity, Duration::from_secs(1)); // the default
/// ```
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct UsageConfig {
    /// A token marked less than this long ago is not marked again. Default 1 s.
    pub granularity: Duration,
    /// How often pending marks are written. Default 10 s.
    pub flush_interval: Duration,
    /// How many tokens may have marks pending at once, and how many a failed flush keeps to
    /// write again. Default 100 000.
    pub max_pending_tokens: usize,
    /// The first wait after a failed flush; it doubles up to `max_retry_backoff`. Default 500 ms.
    pub retry_backoff: Duration,
    /// The longest wait between retries. Default 30 s.
    pub max_retry_backoff: Duration,
}

impl Default for UsageConfig {
    fn default() -> Self {
        Self {
            granularity: Duration::from_secs(1),
            flush_interval: Duration::from_secs(10),
            max_pending_tokens: 100_000,
            retry_backoff: Duration::from_millis(500),
            max_retry_backoff: Duration::from_secs(30),
        }
    }
}

impl UsageConfig {
    /// A token marked less than this long ago is not marked again. Default 1 s.
    #[must_use]
    pub fn granularity(mut self, granularity: Duration) -> Self {
        self.granularity = granularity;
        self
    }

    /// How often pending marks are written. Default 10 s.
    #[must_use]
    pub fn flush_interval(mut self, flush_interval: Duration) -> Self {
        self.flush_interval = flush_interval;
        self
    }

    /// How many tokens may have marks pending at once, and how many a failed flush keeps to
    /// write again. Default 100 000.
    #[must_use]
    pub fn max_pending_tokens(mut self, max_pending_tokens: usize) -> Self {
        self.max_pending_tokens = max_pending_tokens;
        self
    }

    /// The first wait after a failed flush; it doubles up to `max_retry_backoff`. Default 500 ms.
    #[must_use]
    pub fn retry_backoff(mut self, retry_backoff: Duration) -> Self {
        self.retry_backoff = retry_backoff;
        self
    }

    /// The longest wait between retries. Default 30 s.
    #[must_use]
    pub fn max_retry_backoff(mut self, max_retry_backoff: Duration) -> Self {
        self.max_retry_backoff = max_retry_backoff;
        self
    }
}

/// Counters of the [`UsageRecorder`], for metrics.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct UsageStats {
    /// Marks received.
    pub marks: u64,
    /// Successful flushes (of a non-empty batch).
    pub flushes: u64,
    /// Rows handed to the store in successful flushes.
    pub rows_written: u64,
    /// Failed flushes, each retried.
    pub retries: u64,
    /// Marks dropped because `max_pending_tokens` was reached or the recorder was shut down.
    pub dropped_marks: u64,
    /// Tokens with marks not yet in the store: pending, and in the batch being written or kept
    /// by a failed flush (a token in both counts twice).
    pub pending_tokens: u64,
}

/// Coalesces usage marks in memory and writes them behind, in batches.
///
/// Created by [`PatAuthLayerBuilder::track_usage`](crate::PatAuthLayerBuilder::track_usage) and
/// reached with [`PatAuthLayer::usage`](crate::PatAuthLayer::usage); or created directly with
/// [`UsageRecorder::new`] to record usage of tokens checked elsewhere. Clones share the state.
#[derive(Clone, Debug)]
pub struct UsageRecorder {
    shared: Arc<Shared>,
}

struct Shared {
    pending: Mutex<HashMap<String, UsageUpdate>>,
    /// The batch a flush is writing now, or that a failed flush keeps for the next one: still
    /// shown by `pending()` until the store has it.
    writing: Mutex<HashMap<String, UsageUpdate>>,
    /// One flush at a time: a `flush()` called while the flusher writes waits for that write, so
    /// that when it returns every mark made before the call is in the store.
    flush_lock: tokio::sync::Mutex<()>,
    /// The next flush `flush()` asked for and that has not started: every call before it starts
    /// shares it, so a flood of calls is one write at a time and one task, not a queue of both.
    next: crate::shared_run::SharedRun<FlushResult>,
    lookup: Arc<dyn TokenLookup>,
    config: UsageConfig,
    granularity_ms: i64,
    wake: Arc<Notify>,
    closed: AtomicBool,
    done: Notify,
    finished: AtomicBool,
    marks: AtomicU64,
    flushes: AtomicU64,
    rows_written: AtomicU64,
    retries: AtomicU64,
    dropped: AtomicU64,
}

impl std::fmt::Debug for Shared {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("UsageRecorder")
            .field("config", &self.config)
            .finish_non_exhaustive()
    }
}

impl UsageRecorder {
    /// A recorder writing to `lookup`, with its flusher task spawned on the current Tokio runtime.
    ///
    /// # Panics
    ///
    /// Outside a Tokio runtime.
    pub fn new<L: TokenLookup>(lookup: L, config: UsageConfig) -> Self {
        Self::from_arc(Arc::new(lookup), config)
    }

    pub(crate) fn from_arc(lookup: Arc<dyn TokenLookup>, config: UsageConfig) -> Self {
        let handle = tokio::runtime::Handle::try_current()
            .expect("usage tracking needs a Tokio runtime: build the layer inside one");
        let shared = Arc::new(Shared {
            pending: Mutex::default(),
            writing: Mutex::default(),
            flush_lock: tokio::sync::Mutex::new(()),
            next: crate::shared_run::SharedRun::default(),
            lookup,
            granularity_ms: i64::try_from(config.granularity.as_millis()).unwrap_or(i64::MAX),
            config,
            wake: Arc::new(Notify::new()),
            closed: AtomicBool::new(false),
            done: Notify::new(),
            finished: AtomicBool::new(false),
            marks: AtomicU64::new(0),
            flushes: AtomicU64::new(0),
            rows_written: AtomicU64::new(0),
            retries: AtomicU64::new(0),
            dropped: AtomicU64::new(0),
        });
        handle.spawn(flusher(
            Arc::downgrade(&shared),
            Arc::clone(&shared.wake),
            shared.config.clone(),
        ));
        Self { shared }
    }

    /// The settings.
    pub fn config(&self) -> &UsageConfig {
        &self.shared.config
    }

    #[inline]
    pub(crate) fn granularity_ms(&self) -> i64 {
        self.shared.granularity_ms
    }

    /// Records that `token_id` was used at `at` from `ip`. Cheap: a short lock and, the first time a
    /// token is marked between two flushes, one small allocation.
    pub fn record(&self, token_id: &str, at: DateTime<Utc>, ip: Option<IpAddr>) {
        let s = &self.shared;
        s.marks.fetch_add(1, Ordering::Relaxed);
        if s.closed.load(Ordering::Relaxed) {
            s.dropped.fetch_add(1, Ordering::Relaxed);
            return;
        }
        let ips = ip.as_slice();
        let mut pending = lock(&s.pending);
        if let Some(entry) = pending.get_mut(token_id) {
            entry.merge(at, ips);
        } else if pending.len() < s.config.max_pending_tokens {
            pending.insert(
                token_id.to_owned(),
                UsageUpdate::new(token_id, at, ips.to_vec()),
            );
        } else {
            s.dropped.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// What is pending for a token and not yet written, if anything: merge it into a stored record
    /// with [`TokenRecord::apply_usage`](crate::TokenRecord::apply_usage) to show fresh data.
    ///
    /// This includes a batch a flush is writing at this moment.
    pub fn pending(&self, token_id: &str) -> Option<UsageUpdate> {
        let s = &self.shared;
        // `pending` first, then `writing`: a flush moves a batch from one to the other while
        // holding `writing`, so a mark is seen in one of them or is already in the store.
        let queued = lock(&s.pending).get(token_id).cloned();
        let writing = lock(&s.writing).get(token_id).cloned();
        match (queued, writing) {
            (Some(mut a), Some(b)) => {
                a.merge(b.last_used_at, &b.ips);
                Some(a)
            }
            (a, b) => a.or(b),
        }
    }

    /// Writes everything pending now, without waiting for the interval, and returns the number of
    /// tokens written. If the flusher is writing at that moment, this waits for its write first:
    /// when it returns `Ok`, every mark made before the call is in the store. The write runs in a
    /// task of its own, so dropping this future loses nothing. On failure the marks stay pending
    /// for the next attempt.
    ///
    /// Calls made before a requested flush starts share it: however many come at once (the
    /// management API flushes before a list sorted or filtered by last use), there is at most one
    /// write in flight and one waiting, and each call gets that flush's result.
    ///
    /// # Errors
    /// The store's error.
    pub async fn flush(&self) -> Result<usize, crate::StoreError> {
        let result = self
            .shared
            .next
            .join_or_start(|| {
                let shared = Arc::clone(&self.shared);
                Ok(async move {
                    let _one_at_a_time = shared.flush_lock.lock().await;
                    // Started: a call from now on may come after the batch is taken, so it asks
                    // for a flush of its own.
                    shared.next.close();
                    shared.flush_locked().await.map_err(Arc::new)
                })
            })
            .await;
        match result {
            Some(Ok(written)) => Ok(written),
            Some(Err(e)) => Err(e.shared()),
            None => Err(crate::StoreError::backend(
                "the usage flush task ended without an answer",
            )),
        }
    }

    /// Stops the flusher after writing everything pending (retrying with backoff for at most one
    /// `max_retry_backoff`). Marks made after this are dropped and counted.
    ///
    /// Returns within twice the retry window (`max_retry_backoff`, at least a second: one for a
    /// write already in flight, one for the final flush's attempts) even if a store write never
    /// returns (a connection black-holed mid-query): the marks not written are then reported as
    /// possibly lost, in the log, and the write goes on in its task.
    pub async fn shutdown(&self) {
        let s = &self.shared;
        s.closed.store(true, Ordering::SeqCst);
        let done = s.done.notified();
        tokio::pin!(done);
        done.as_mut().enable();
        s.wake.notify_one();
        if s.finished.load(Ordering::SeqCst) {
            return;
        }
        let window = s
            .config
            .max_retry_backoff
            .max(s.config.retry_backoff)
            .max(Duration::from_secs(1));
        if tokio::time::timeout(window.saturating_mul(2), done)
            .await
            .is_err()
        {
            let unwritten = {
                // `writing` before `pending`, as a flush takes them.
                let writing = lock(&s.writing);
                distinct_tokens(&lock(&s.pending), &writing)
            };
            tracing::warn!(
                target: "tower_pat::store",
                unwritten,
                "usage flush at shutdown: the store has not answered in time; \
                 {unwritten} tokens' marks may be lost"
            );
        }
    }

    /// The counters.
    pub fn stats(&self) -> UsageStats {
        let s = &self.shared;
        // One lock at a time: `lock(a).len() + lock(b).len()` would hold `a` while taking `b`
        // (a temporary lives to the end of its statement), against a flush that takes
        // `writing` before `pending`: a deadlock.
        let pending = lock(&s.pending).len();
        let pending = pending + lock(&s.writing).len();
        UsageStats {
            marks: s.marks.load(Ordering::Relaxed),
            flushes: s.flushes.load(Ordering::Relaxed),
            rows_written: s.rows_written.load(Ordering::Relaxed),
            retries: s.retries.load(Ordering::Relaxed),
            dropped_marks: s.dropped.load(Ordering::Relaxed),
            pending_tokens: pending as u64,
        }
    }
}

/// The result of a flush, shared by the calls that asked for it.
type FlushResult = Result<usize, Arc<crate::StoreError>>;

impl Shared {
    async fn flush(&self) -> Result<usize, crate::StoreError> {
        let _one_at_a_time = self.flush_lock.lock().await;
        self.flush_locked().await
    }

    /// The flush, with `flush_lock` held by the caller.
    async fn flush_locked(&self) -> Result<usize, crate::StoreError> {
        let batch: Vec<UsageUpdate> = {
            let mut writing = lock(&self.writing);
            // `pending` is held for the swap alone: marking never waits for a merge.
            let taken = std::mem::take(&mut *lock(&self.pending));
            if writing.is_empty() {
                *writing = taken;
            } else {
                // The batch of a failed flush, written again with the marks made since merged
                // in (newest wins), at most `max_pending_tokens` tokens.
                for (token_id, update) in taken {
                    if let Some(entry) = writing.get_mut(&token_id) {
                        entry.merge(update.last_used_at, &update.ips);
                    } else if writing.len() < self.config.max_pending_tokens {
                        writing.insert(token_id, update);
                    } else {
                        self.dropped.fetch_add(1, Ordering::Relaxed);
                    }
                }
            }
            writing.values().cloned().collect()
        };
        if batch.is_empty() {
            return Ok(0);
        }
        let result = self.lookup.record_usage(&batch).await;
        match result {
            Ok(()) => {
                lock(&self.writing).clear();
                self.flushes.fetch_add(1, Ordering::Relaxed);
                self.rows_written
                    .fetch_add(batch.len() as u64, Ordering::Relaxed);
                Ok(batch.len())
            }
            Err(e) => {
                self.retries.fetch_add(1, Ordering::Relaxed);
                tracing::warn!(target: "tower_pat::store", error = %e, rows = batch.len(), "usage flush failed; will retry");
                // The batch stays in `writing` (and in `pending()`'s answers) for the next flush,
                // which merges the marks made meanwhile into it: not here, under the lock that
                // marking takes, where 100 000 tokens after an outage would stall every mark.
                Err(e)
            }
        }
    }
}

/// The tokens with marks in `pending` or in `writing` (the batch a flush writes or kept), each
/// once.
fn distinct_tokens(
    pending: &HashMap<String, UsageUpdate>,
    writing: &HashMap<String, UsageUpdate>,
) -> usize {
    writing.len()
        + pending
            .keys()
            .filter(|id| !writing.contains_key(*id))
            .count()
}

/// A std mutex's guard, through poisoning (the maps stay consistent: no code panics holding them).
pub(crate) fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

impl Drop for Shared {
    fn drop(&mut self) {
        let pending = self.pending.get_mut().unwrap_or_else(|e| e.into_inner());
        let writing = self.writing.get_mut().unwrap_or_else(|e| e.into_inner());
        let lost = distinct_tokens(pending, writing);
        if lost > 0 {
            tracing::warn!(
                lost,
                "usage recorder dropped without shutdown(): {lost} tokens' usage marks were not written"
            );
        }
    }
}

/// The background task: flush every interval, retry failures with backoff, final flush on
/// shutdown. It holds the recorder weakly between flushes, so dropping every handle stops it (and
/// the recorder's `Drop` reports what was lost).
async fn flusher(weak: Weak<Shared>, wake: Arc<Notify>, config: UsageConfig) {
    let interval = config.flush_interval.max(Duration::from_millis(1));
    let first_backoff = config.retry_backoff.max(Duration::from_millis(1));
    let max_backoff = config.max_retry_backoff.max(first_backoff);
    let mut wait = interval;
    let mut backoff = first_backoff;
    loop {
        tokio::select! {
            () = tokio::time::sleep(wait) => {}
            () = wake.notified() => {}
        }
        let Some(shared) = weak.upgrade() else { return };
        if shared.closed.load(Ordering::SeqCst) {
            shared.final_flush(first_backoff, max_backoff).await;
            return;
        }
        if shared.flush().await.is_ok() {
            wait = interval;
            backoff = first_backoff;
        } else {
            wait = backoff;
            backoff = (backoff * 2).min(max_backoff);
        }
    }
}

impl Shared {
    /// The flush at shutdown, retried with backoff for at most `max_backoff` in all.
    async fn final_flush(&self, first_backoff: Duration, max_backoff: Duration) {
        let deadline = tokio::time::Instant::now() + max_backoff;
        let mut backoff = first_backoff;
        while self.flush().await.is_err() && tokio::time::Instant::now() + backoff < deadline {
            tokio::time::sleep(backoff).await;
            backoff = (backoff * 2).min(max_backoff);
        }
        let lost = {
            // The batch a failed flush kept, and the marks made since (a token in both is one).
            let writing = std::mem::take(&mut *lock(&self.writing));
            let pending = std::mem::take(&mut *lock(&self.pending));
            distinct_tokens(&pending, &writing)
        };
        if lost > 0 {
            tracing::warn!(
                lost,
                "usage flush at shutdown failed: {lost} tokens' marks lost"
            );
            self.dropped.fetch_add(lost as u64, Ordering::Relaxed);
        }
        self.finished.store(true, Ordering::SeqCst);
        self.done.notify_waiters();
    }
}
