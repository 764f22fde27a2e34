//! Retention: revoked and expired records older than a configurable age are removed by a
//! background task, one batch at a time, with one event per run.
//!
//! A record is removed once it has been revoked for longer than [`RetentionConfig::max_age`] (30
//! days by default), or expired for that long ([`TokenRecord::is_purgeable`](crate::TokenRecord::is_purgeable) at `now - max_age`).
//! An active token is never removed, however old, and neither is a disabled one that has not
//! expired; a zero `max_age` keeps every record forever (the task does nothing).
//!
//! Every [`RetentionConfig::interval`] (1 hour by default; the first run starts at once) the task
//! calls [`TokenStore::purge`] with the run's cutoff, [`RetentionConfig::batch_size`] records at a
//! time ([`RetentionConfig::pause`] apart), until a batch comes back short. Each batch is one
//! conditional, atomic statement, so a record that changes meanwhile (revoked only now, its
//! expiry extended) is judged as it is when it is deleted, and several nodes purging one
//! PostgreSQL database at once never remove a record twice nor count it twice. A removed record
//! is dropped from every cache, in this process and, through the store's change feed, in the
//! others, like a deleted one.
//!
//! After each run, one event (feature `admin`: [`RetentionBuilder::events`] sends a
//! [`PurgeEvent`](crate::admin::PurgeEvent), `personalAccessToken.purged` with `{count, cutoff}`,
//! to a [`TokenEvents`](crate::admin::TokenEvents) sink such as a webhook) and one log line: the
//! count and the cutoff, never a token, an id or a hash. A run that fails (the store is down, or
//! does not [support](crate::StoreError::Unsupported) `purge`) is logged as a warning on
//! `tower_pat::store`, counted in [`RetentionStats::errors`], and retried at the next interval;
//! if it removed some batches before failing, its event carries what it removed.
//!
//! ```
//! use std::time::Duration;
//! use tower_pat::retention::RetentionConfig;
//! use tower_pat::{MemoryStore, Tokens};
//!
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() -> Result<(), tower_pat::StoreError> {
//! let tokens = Tokens::new(MemoryStore::new());
//! let retention = tokens
//!     .retention(RetentionConfig::default().max_age(Duration::from_secs(7 * 24 * 3600)))
//!     .spawn();
//! // ... serve ...
//! let report = retention.run_once().await?.expect("retention is on");
//! assert_eq!(report.count, 0);
//! retention.shutdown().await;
//! # Ok(())
//! # }
//! ```

use std::fmt;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use chrono::{DateTime, Utc};

use crate::periodic::Periodic;
use crate::store::{StoreError, TokenStore};

/// The default [`RetentionConfig::max_age`]: 30 days.
pub const DEFAULT_MAX_AGE: Duration = Duration::from_secs(30 * 24 * 3600);

/// The default [`RetentionConfig::batch_size`]: 500 records (with a grace hash each, the 1,000
/// rows the SQLite change log keeps, so that other processes hear of every one).
pub const DEFAULT_BATCH_SIZE: usize = 500;

/// The default [`RetentionConfig::interval`]: 1 hour.
pub const DEFAULT_INTERVAL: Duration = Duration::from_secs(3600);

/// The default [`RetentionConfig::pause`]: 100 ms, the SQLite change feed's poll interval.
pub const DEFAULT_PAUSE: Duration = Duration::from_millis(100);

/// Settings of [`Retention`], built from [`RetentionConfig::default`] with the setters below
/// (each names its default).
///
/// ```
/// use std::time::Duration;
/// use tower_pat::retention::RetentionConfig;
///
/// let config = RetentionConfig::default().max_age(Duration::ZERO); // keep everything
/// assert!(!config.is_enabled());
/// assert_eq!(RetentionConfig::default().batch_size, 500);
/// ```
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct RetentionConfig {
    /// How long a record is kept once revoked or expired. Zero keeps every record forever.
    /// Default 30 days.
    pub max_age: Duration,
    /// How many records one [`TokenStore::purge`] call removes at most. Default 500.
    pub batch_size: usize,
    /// How often a run starts. Default 1 hour.
    pub interval: Duration,
    /// The wait after a full batch, before the next one. It lets other writers in (SQLite has one
    /// writer at a time) and lets other processes' change-feed pollers read the batch's change-log
    /// rows before the log is pruned (a poller that falls behind makes its caches drop every
    /// entry). Default 100 ms.
    pub pause: Duration,
}

impl Default for RetentionConfig {
    fn default() -> Self {
        Self {
            max_age: DEFAULT_MAX_AGE,
            batch_size: DEFAULT_BATCH_SIZE,
            interval: DEFAULT_INTERVAL,
            pause: DEFAULT_PAUSE,
        }
    }
}

impl RetentionConfig {
    /// How long a record is kept once revoked or expired; zero keeps every record. Default 30
    /// days.
    #[must_use]
    pub fn max_age(mut self, max_age: Duration) -> Self {
        self.max_age = max_age;
        self
    }

    /// How many records one batch removes at most (at least 1). Default 500.
    #[must_use]
    pub fn batch_size(mut self, batch_size: usize) -> Self {
        self.batch_size = batch_size.max(1);
        self
    }

    /// How often a run starts (at least 1 ms). Default 1 hour.
    #[must_use]
    pub fn interval(mut self, interval: Duration) -> Self {
        self.interval = interval.max(Duration::from_millis(1));
        self
    }

    /// The wait after a full batch, before the next one (zero: none). Default 100 ms.
    #[must_use]
    pub fn pause(mut self, pause: Duration) -> Self {
        self.pause = pause;
        self
    }

    /// Whether records are ever removed: `max_age` is not zero.
    pub fn is_enabled(&self) -> bool {
        !self.max_age.is_zero()
    }

    /// The cutoff of a run at `now`: records revoked or expired before it are removed. `None`
    /// when retention is off; never before the Unix epoch (an older cutoff, or an age too large
    /// to subtract, removes nothing and asks the store nothing: PostgreSQL could not represent
    /// it).
    pub fn cutoff(&self, now: DateTime<Utc>) -> Option<DateTime<Utc>> {
        if !self.is_enabled() {
            return None;
        }
        Some(
            chrono::Duration::from_std(self.max_age)
                .ok()
                .and_then(|age| now.checked_sub_signed(age))
                .map_or(DateTime::UNIX_EPOCH, |c| c.max(DateTime::UNIX_EPOCH)),
        )
    }
}

/// What one run removed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub struct PurgeReport {
    /// How many records the run removed.
    pub count: u64,
    /// Records revoked or expired before this time were removed.
    pub cutoff: DateTime<Utc>,
    /// How many [`TokenStore::purge`] calls the run made.
    pub batches: u64,
    /// When the run ended.
    pub finished_at: DateTime<Utc>,
}

/// Counters of a [`Retention`], for metrics.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct RetentionStats {
    /// Runs that completed.
    pub runs: u64,
    /// Records removed, in all runs (failed ones included).
    pub purged: u64,
    /// Runs that failed (each retried at the next interval).
    pub errors: u64,
}

/// Called after every run with what it removed.
type OnRun = Arc<dyn Fn(&PurgeReport) + Send + Sync>;

/// Configures a [`Retention`]: from [`Tokens::retention`](crate::Tokens::retention) or
/// [`Retention::builder`]; [`spawn`](Self::spawn) starts the background task,
/// [`build`](Self::build) makes a handle that purges only when asked
/// ([`Retention::run_once`]).
#[must_use]
pub struct RetentionBuilder {
    store: Arc<dyn TokenStore>,
    config: RetentionConfig,
    on_run: Vec<OnRun>,
}

impl fmt::Debug for RetentionBuilder {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RetentionBuilder")
            .field("config", &self.config)
            .field("on_run", &self.on_run.len())
            .finish_non_exhaustive()
    }
}

impl RetentionBuilder {
    /// Sends a [`PurgeEvent`](crate::admin::PurgeEvent) to `sink` after every run (with
    /// [`TokenEvents::publish_purge`](crate::admin::TokenEvents::publish_purge)), for example
    /// to the management API's [`WebhookSink`](crate::admin::WebhookSink).
    #[cfg(feature = "admin")]
    pub fn events(self, sink: impl crate::admin::TokenEvents) -> Self {
        let sink = Arc::new(sink);
        self.on_run(move |report| {
            sink.publish_purge(crate::admin::PurgeEvent::new(
                report.count,
                report.cutoff,
                report.finished_at,
            ));
        })
    }

    /// Calls `f` after every run with what it removed (also after a run that failed part way,
    /// with what it removed before failing). Called on the task that ran the purge: return
    /// quickly.
    pub fn on_run(mut self, f: impl Fn(&PurgeReport) + Send + Sync + 'static) -> Self {
        self.on_run.push(Arc::new(f));
        self
    }

    /// A handle that purges only when [`run_once`](Retention::run_once) is called: for the CLI
    /// and for tests.
    pub fn build(self) -> Retention {
        Retention {
            shared: Arc::new(Shared {
                store: self.store,
                config: self.config,
                on_run: self.on_run,
                periodic: Periodic::new(),
                runs: AtomicU64::new(0),
                purged: AtomicU64::new(0),
                errors: AtomicU64::new(0),
            }),
        }
    }

    /// Starts the background task on the current Tokio runtime: a run at once, then one every
    /// [`interval`](RetentionConfig::interval). With a zero `max_age` no task is started. The
    /// task stops at [`Retention::shutdown`], or when every handle is dropped.
    ///
    /// # Panics
    ///
    /// Outside a Tokio runtime.
    pub fn spawn(self) -> Retention {
        let retention = self.build();
        let shared = &retention.shared;
        if !shared.config.is_enabled() {
            tracing::info!("token retention is off (max_age = 0): records are kept forever");
            return retention;
        }
        shared.periodic.start(
            Arc::downgrade(shared),
            shared.config.interval,
            |shared| async move {
                // Logged and counted by `run`; retried at the next tick.
                let _ = shared.run(true).await;
            },
        );
        retention
    }
}

/// The retention task's handle: runs on demand, counters, shutdown. Clones share the task.
///
/// See the [module docs](self) for what it removes and when.
#[derive(Clone, Debug)]
pub struct Retention {
    shared: Arc<Shared>,
}

struct Shared {
    store: Arc<dyn TokenStore>,
    config: RetentionConfig,
    on_run: Vec<OnRun>,
    /// The background task; [`Periodic::stopping`] ends a run in progress between two batches.
    periodic: Periodic,
    runs: AtomicU64,
    purged: AtomicU64,
    errors: AtomicU64,
}

impl fmt::Debug for Shared {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Retention")
            .field("config", &self.config)
            .finish_non_exhaustive()
    }
}

impl Retention {
    /// A builder over `store` (the handle's usual entry is
    /// [`Tokens::retention`](crate::Tokens::retention)).
    pub fn builder(store: Arc<dyn TokenStore>, config: RetentionConfig) -> RetentionBuilder {
        RetentionBuilder {
            store,
            config,
            on_run: Vec::new(),
        }
    }

    /// The settings.
    pub fn config(&self) -> &RetentionConfig {
        &self.shared.config
    }

    /// Runs one pass now, beside the background task if there is one (the store keeps two
    /// passes from removing one record twice): batch after batch until one comes back short,
    /// then the event and the log line. `Ok(None)` when retention is off (zero `max_age`).
    ///
    /// # Errors
    /// The store's error: [`StoreError::Unsupported`] for a store without
    /// [`purge`](TokenStore::purge), [`StoreError::Backend`] when it fails. Batches removed
    /// before the failure stay removed, and are reported in the run's event.
    pub async fn run_once(&self) -> Result<Option<PurgeReport>, StoreError> {
        self.shared.run(false).await
    }

    /// The counters.
    pub fn stats(&self) -> RetentionStats {
        let s = &self.shared;
        RetentionStats {
            runs: s.runs.load(Ordering::Relaxed),
            purged: s.purged.load(Ordering::Relaxed),
            errors: s.errors.load(Ordering::Relaxed),
        }
    }

    /// Stops the background task: a run in progress ends after its current batch (and sends its
    /// event); this returns once the task has ended. Later [`run_once`](Self::run_once) calls
    /// still work.
    pub async fn shutdown(&self) {
        self.shared.periodic.shutdown().await;
    }
}

impl Shared {
    /// One run; the task's (`stoppable`) ends early, between two batches, at shutdown.
    async fn run(&self, stoppable: bool) -> Result<Option<PurgeReport>, StoreError> {
        let Some(cutoff) = self.config.cutoff(Utc::now()) else {
            return Ok(None);
        };
        let limit = self.config.batch_size.max(1);
        let mut count = 0u64;
        let mut batches = 0u64;
        // Nothing is revoked or expired before the Unix epoch (an age that reaches back to it):
        // no store call, which might not represent an older time anyway.
        let result = loop {
            if cutoff <= DateTime::UNIX_EPOCH {
                break Ok(());
            }
            match self.store.purge(cutoff, limit).await {
                Ok(removed) => {
                    batches += 1;
                    count += removed.len() as u64;
                    self.purged
                        .fetch_add(removed.len() as u64, Ordering::Relaxed);
                    if removed.len() < limit || (stoppable && self.periodic.stopping()) {
                        break Ok(());
                    }
                    if !self.config.pause.is_zero() {
                        tokio::time::sleep(self.config.pause).await;
                    }
                }
                Err(e) => break Err(e),
            }
        };
        let report = PurgeReport {
            count,
            cutoff,
            batches,
            finished_at: Utc::now(),
        };
        match result {
            Ok(()) => {
                self.runs.fetch_add(1, Ordering::Relaxed);
                if count > 0 {
                    tracing::info!(
                        target: "tower_pat::retention",
                        count,
                        %cutoff,
                        batches,
                        "removed tokens revoked or expired before the cutoff"
                    );
                } else {
                    tracing::debug!(target: "tower_pat::retention", %cutoff, "nothing to remove");
                }
                self.announce(&report);
                Ok(Some(report))
            }
            Err(e) => {
                self.errors.fetch_add(1, Ordering::Relaxed);
                tracing::warn!(
                    target: "tower_pat::store",
                    error = %e,
                    removed = count,
                    "token retention run failed; will retry at the next interval"
                );
                if count > 0 {
                    self.announce(&report);
                }
                Err(e)
            }
        }
    }

    fn announce(&self, report: &PurgeReport) {
        for f in &self.on_run {
            f(report);
        }
    }
}
