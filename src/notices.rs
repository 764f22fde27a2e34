//! Expiry notices: `personalAccessToken.expiring` once per token a configurable time before it
//! expires (7 days by default), and `personalAccessToken.expired` once it has expired, sent by a
//! background task through the management API's [`TokenEvents`](crate::admin::TokenEvents)
//! sinks (feature `admin`), such as the signed webhook.
//!
//! Every [`ExpiryNoticeConfig::interval`] (15 minutes by default; the first run starts at once)
//! the task claims the due notices with [`TokenStore::claim_expiry_notices`],
//! [`ExpiryNoticeConfig::batch_size`] tokens at a time until a batch comes back short, first the
//! `expiring` ones (not revoked, expiring within [`ExpiryNoticeConfig::lead`]), then the
//! `expired` ones (not revoked, `expiresAt` passed), and sends one
//! [`TokenEvent`](crate::admin::TokenEvent) per claimed token: the token's view, never its
//! secret nor its hash. A disabled token is noticed like an active one; a revoked one, or one
//! that never expires, never is.
//!
//! The claim is recorded in the store in the same statement that picks the tokens, so a notice
//! is sent once in all, however many runs and however many nodes share the store (SQLite file or
//! PostgreSQL database). A notice that a sink cannot take at once (the webhook's alerts queue is
//! half full, the other half kept for the alerts that cannot wait, such as revocations:
//! [`TokenEvents::try_publish`](crate::admin::TokenEvents::try_publish) answers `false`)
//! is not lost: its claim is taken back
//! ([`TokenStore::release_expiry_notice`], conditional on being this run's claim), the run
//! claims no more of that kind, and a later run sends it. (With several sinks, one that took it
//! gets it again then.) Otherwise a notice is sent at most once: a process that stops between
//! the claim and the delivery loses that notice (the webhook retries a delivery that fails,
//! within its bounds), and so does a sink that drops what it cannot queue, or a store that
//! cannot take a claim back.
//! When a token's expiry moves later (an update, or a rotation with a new expiry), both notices
//! are due again, for the new expiry. Moving it earlier does not make them due again: the
//! holder was told already, and a token allowed to change its own expiry could otherwise shorten
//! it by a second before every run and have an `expiring` alert sent each time (a token cannot
//! extend itself past its own expiry).
//!
//! A token that has been expired a long time when the task first runs (the store upgraded to a
//! version with notices) is sent its `expired` notice then, once. A run that fails (the store is
//! down, or does not [support](crate::StoreError::Unsupported) the claim) is logged as a warning
//! on `tower_pat::store`, counted in [`ExpiryNoticeStats::errors`] and retried at the next
//! interval.
//!
//! ```
//! use std::time::Duration;
//! use tower_pat::notices::ExpiryNoticeConfig;
//! use tower_pat::{MemoryStore, Tokens};
//!
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() -> Result<(), tower_pat::StoreError> {
//! let tokens = Tokens::new(MemoryStore::new());
//! let notices = tokens
//!     .expiry_notices(ExpiryNoticeConfig::default().lead(Duration::from_secs(3 * 24 * 3600)))
//!     .on_notice(|kind, record, _at| println!("{kind:?}: {}", record.id))
//!     .spawn();
//! // ... serve ...
//! let report = notices.run_once().await?.expect("notices are on");
//! assert_eq!(report.expiring + report.expired, 0);
//! notices.shutdown().await;
//! # Ok(())
//! # }
//! ```

use std::fmt;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use chrono::{DateTime, Utc};

use crate::periodic::Periodic;
use crate::record::TokenRecord;
use crate::store::{StoreError, TokenStore};

pub use crate::store::NoticeKind;

/// The default [`ExpiryNoticeConfig::lead`]: 7 days.
pub const DEFAULT_LEAD: Duration = Duration::from_secs(7 * 24 * 3600);

/// The default [`ExpiryNoticeConfig::interval`]: 15 minutes.
pub const DEFAULT_INTERVAL: Duration = Duration::from_secs(15 * 60);

/// The default [`ExpiryNoticeConfig::batch_size`]: 100 tokens.
pub const DEFAULT_BATCH_SIZE: usize = 100;

/// Settings of [`ExpiryNotices`], built from [`ExpiryNoticeConfig::default`] with the setters
/// below (each names its default).
///
/// ```
/// use tower_pat::notices::ExpiryNoticeConfig;
///
/// let config = ExpiryNoticeConfig::default().enabled(false);
/// assert!(!config.enabled);
/// assert_eq!(ExpiryNoticeConfig::default().lead.as_secs(), 7 * 24 * 3600);
/// ```
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct ExpiryNoticeConfig {
    /// Whether notices are sent at all. Default `true`.
    pub enabled: bool,
    /// How long before its expiry a token gets its `expiring` notice. Zero sends none (the
    /// `expired` notices are still sent). Default 7 days.
    pub lead: Duration,
    /// How often a run starts. Default 15 minutes.
    pub interval: Duration,
    /// How many tokens one claim takes at most. Default 100.
    pub batch_size: usize,
}

impl Default for ExpiryNoticeConfig {
    fn default() -> Self {
        Self {
            enabled: true,
            lead: DEFAULT_LEAD,
            interval: DEFAULT_INTERVAL,
            batch_size: DEFAULT_BATCH_SIZE,
        }
    }
}

impl ExpiryNoticeConfig {
    /// Whether notices are sent at all. Default `true`.
    #[must_use]
    pub fn enabled(mut self, enabled: bool) -> Self {
        self.enabled = enabled;
        self
    }

    /// How long before its expiry a token gets its `expiring` notice (zero: none). Default 7
    /// days.
    #[must_use]
    pub fn lead(mut self, lead: Duration) -> Self {
        self.lead = lead;
        self
    }

    /// How often a run starts (at least 1 ms). Default 15 minutes.
    #[must_use]
    pub fn interval(mut self, interval: Duration) -> Self {
        self.interval = interval.max(Duration::from_millis(1));
        self
    }

    /// How many tokens one claim takes at most (at least 1). Default 100.
    #[must_use]
    pub fn batch_size(mut self, batch_size: usize) -> Self {
        self.batch_size = batch_size.max(1);
        self
    }
}

/// What one run sent.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub struct NoticeReport {
    /// How many `expiring` notices the run sent (a notice a sink could not take, left for a
    /// later run, does not count).
    pub expiring: u64,
    /// How many `expired` notices the run sent (likewise).
    pub expired: u64,
    /// The time the run judged expiry at.
    pub at: DateTime<Utc>,
}

/// Counters of an [`ExpiryNotices`], for metrics.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct ExpiryNoticeStats {
    /// Runs that completed.
    pub runs: u64,
    /// `expiring` notices sent, in all runs.
    pub expiring: u64,
    /// `expired` notices sent, in all runs.
    pub expired: u64,
    /// Runs that failed (each retried at the next interval).
    pub errors: u64,
}

/// Called with every notice claimed; `false` when a sink could not take it (it is then left for
/// a later run).
type OnNotice = Arc<dyn Fn(NoticeKind, &TokenRecord, DateTime<Utc>) -> bool + Send + Sync>;

/// Configures an [`ExpiryNotices`]: from [`Tokens::expiry_notices`](crate::Tokens::expiry_notices)
/// or [`ExpiryNotices::builder`]; [`spawn`](Self::spawn) starts the background task,
/// [`build`](Self::build) makes a handle that runs only when asked
/// ([`ExpiryNotices::run_once`]).
#[must_use]
pub struct ExpiryNoticeBuilder {
    store: Arc<dyn TokenStore>,
    config: ExpiryNoticeConfig,
    on_notice: Vec<OnNotice>,
}

impl fmt::Debug for ExpiryNoticeBuilder {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ExpiryNoticeBuilder")
            .field("config", &self.config)
            .field("on_notice", &self.on_notice.len())
            .finish_non_exhaustive()
    }
}

impl ExpiryNoticeBuilder {
    /// Sends a [`TokenEvent`](crate::admin::TokenEvent) of kind
    /// [`EventKind::Expiring`](crate::admin::EventKind::Expiring) or
    /// [`EventKind::Expired`](crate::admin::EventKind::Expired) to `sink` for every notice, with
    /// the token's view at the run's time, for example to the management API's
    /// [`WebhookSink`](crate::admin::WebhookSink). Events are handed over with
    /// [`try_publish`](crate::admin::TokenEvents::try_publish): a notice the sink cannot take at
    /// once is left for a later run (see the [module docs](self)).
    #[cfg(feature = "admin")]
    pub fn events(mut self, sink: impl crate::admin::TokenEvents) -> Self {
        use crate::admin::{EventKind, TokenEvent, TokenView};
        let sink = Arc::new(sink);
        self.on_notice.push(Arc::new(move |kind, record, at| {
            let kind = match kind {
                NoticeKind::Expiring => EventKind::Expiring,
                NoticeKind::Expired => EventKind::Expired,
            };
            sink.try_publish(TokenEvent::new(kind, TokenView::new(record, at), at))
        }));
        self
    }

    /// Calls `f` with every notice claimed: its kind, the token as stored, and the time the run
    /// judged expiry at. Called on the task that ran the claim: return quickly.
    pub fn on_notice(
        mut self,
        f: impl Fn(NoticeKind, &TokenRecord, DateTime<Utc>) + Send + Sync + 'static,
    ) -> Self {
        self.on_notice.push(Arc::new(move |kind, record, at| {
            f(kind, record, at);
            true
        }));
        self
    }

    /// A handle that runs only when [`run_once`](ExpiryNotices::run_once) is called: for the CLI
    /// and for tests.
    pub fn build(self) -> ExpiryNotices {
        ExpiryNotices {
            shared: Arc::new(Shared {
                store: self.store,
                config: self.config,
                on_notice: self.on_notice,
                periodic: Periodic::new(),
                runs: AtomicU64::new(0),
                expiring: AtomicU64::new(0),
                expired: AtomicU64::new(0),
                errors: AtomicU64::new(0),
            }),
        }
    }

    /// Starts the background task on the current Tokio runtime: a run at once, then one every
    /// [`interval`](ExpiryNoticeConfig::interval). When notices are disabled no task is started.
    /// The task stops at [`ExpiryNotices::shutdown`], or when every handle is dropped.
    ///
    /// # Panics
    ///
    /// Outside a Tokio runtime.
    pub fn spawn(self) -> ExpiryNotices {
        let notices = self.build();
        let shared = &notices.shared;
        if !shared.config.enabled {
            tracing::info!("token expiry notices are off");
            return notices;
        }
        shared.periodic.start(
            Arc::downgrade(shared),
            shared.config.interval,
            |shared| async move {
                // Logged and counted by `run`; retried at the next tick.
                let _ = shared.run(true).await;
            },
        );
        notices
    }
}

/// The expiry-notice task's handle: runs on demand, counters, shutdown. Clones share the task.
///
/// See the [module docs](self) for what it sends and when.
#[derive(Clone, Debug)]
pub struct ExpiryNotices {
    shared: Arc<Shared>,
}

struct Shared {
    store: Arc<dyn TokenStore>,
    config: ExpiryNoticeConfig,
    on_notice: Vec<OnNotice>,
    /// The background task; [`Periodic::stopping`] ends a run in progress between two batches.
    periodic: Periodic,
    runs: AtomicU64,
    expiring: AtomicU64,
    expired: AtomicU64,
    errors: AtomicU64,
}

impl fmt::Debug for Shared {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ExpiryNotices")
            .field("config", &self.config)
            .finish_non_exhaustive()
    }
}

impl ExpiryNotices {
    /// A builder over `store` (the handle's usual entry is
    /// [`Tokens::expiry_notices`](crate::Tokens::expiry_notices)).
    pub fn builder(store: Arc<dyn TokenStore>, config: ExpiryNoticeConfig) -> ExpiryNoticeBuilder {
        ExpiryNoticeBuilder {
            store,
            config,
            on_notice: Vec::new(),
        }
    }

    /// The settings.
    pub fn config(&self) -> &ExpiryNoticeConfig {
        &self.shared.config
    }

    /// Runs one pass now, beside the background task if there is one (the store's claim keeps two
    /// passes from sending one notice twice): the `expiring` notices, then the `expired` ones,
    /// batch after batch. `Ok(None)` when notices are disabled.
    ///
    /// # Errors
    /// The store's error: [`StoreError::Unsupported`] for a store without
    /// [`claim_expiry_notices`](TokenStore::claim_expiry_notices), [`StoreError::Backend`] when
    /// it fails. Notices claimed before the failure have been sent.
    pub async fn run_once(&self) -> Result<Option<NoticeReport>, StoreError> {
        self.shared.run(false).await
    }

    /// The counters.
    pub fn stats(&self) -> ExpiryNoticeStats {
        let s = &self.shared;
        ExpiryNoticeStats {
            runs: s.runs.load(Ordering::Relaxed),
            expiring: s.expiring.load(Ordering::Relaxed),
            expired: s.expired.load(Ordering::Relaxed),
            errors: s.errors.load(Ordering::Relaxed),
        }
    }

    /// Stops the background task: a run in progress ends after its current batch (whose notices
    /// are sent); this returns once the task has ended. Later [`run_once`](Self::run_once) calls
    /// still work.
    pub async fn shutdown(&self) {
        self.shared.periodic.shutdown().await;
    }
}

impl Shared {
    /// One run; the task's (`stoppable`) ends early, between two batches, at shutdown.
    async fn run(&self, stoppable: bool) -> Result<Option<NoticeReport>, StoreError> {
        if !self.config.enabled {
            return Ok(None);
        }
        let at = Utc::now();
        let mut report = NoticeReport {
            expiring: 0,
            expired: 0,
            at,
        };
        let mut result = Ok(());
        let mut kinds = vec![NoticeKind::Expired];
        if !self.config.lead.is_zero() {
            kinds.insert(0, NoticeKind::Expiring);
        }
        'kinds: for kind in kinds {
            match self.claim_all(kind, at, stoppable).await {
                Ok(n) => self.count(&mut report, kind, n),
                Err((n, e)) => {
                    self.count(&mut report, kind, n);
                    result = Err(e);
                    break 'kinds;
                }
            }
        }
        match result {
            Ok(()) => {
                self.runs.fetch_add(1, Ordering::Relaxed);
                if report.expiring + report.expired > 0 {
                    tracing::info!(
                        target: "tower_pat::notices",
                        expiring = report.expiring,
                        expired = report.expired,
                        "sent token expiry notices"
                    );
                }
                Ok(Some(report))
            }
            Err(e) => {
                self.errors.fetch_add(1, Ordering::Relaxed);
                tracing::warn!(
                    target: "tower_pat::store",
                    error = %e,
                    expiring = report.expiring,
                    expired = report.expired,
                    "token expiry notice run failed; will retry at the next interval"
                );
                Err(e)
            }
        }
    }

    fn count(&self, report: &mut NoticeReport, kind: NoticeKind, n: u64) {
        let (field, counter) = match kind {
            NoticeKind::Expiring => (&mut report.expiring, &self.expiring),
            NoticeKind::Expired => (&mut report.expired, &self.expired),
        };
        *field += n;
        counter.fetch_add(n, Ordering::Relaxed);
    }

    /// Claims and sends every `kind` notice due at `at`, batch after batch: how many were sent,
    /// also when a claim failed. Once a sink cannot take a notice, the claims of that one and of
    /// the rest of its batch are taken back and the run claims no more of this kind: a later run
    /// sends them.
    async fn claim_all(
        &self,
        kind: NoticeKind,
        at: DateTime<Utc>,
        stoppable: bool,
    ) -> Result<u64, (u64, StoreError)> {
        let limit = self.config.batch_size.max(1);
        let mut sent = 0u64;
        loop {
            let claimed = self
                .store
                .claim_expiry_notices(kind, at, self.config.lead, limit)
                .await
                .map_err(|e| (sent, e))?;
            let mut full = None;
            for (i, record) in claimed.iter().enumerate() {
                // Every sink is called, also after one could not take it.
                let mut taken = true;
                for f in &self.on_notice {
                    taken &= f(kind, record, at);
                }
                if !taken {
                    full = Some(i);
                    break;
                }
                sent += 1;
            }
            if let Some(first) = full {
                self.release(kind, &claimed[first..], at).await;
                return Ok(sent);
            }
            if claimed.len() < limit || (stoppable && self.periodic.stopping()) {
                return Ok(sent);
            }
        }
    }

    /// Takes back this run's `kind` claims of `records`, whose notices were not sent. One the
    /// store cannot take back is lost, with a warning.
    #[cold]
    async fn release(&self, kind: NoticeKind, records: &[TokenRecord], at: DateTime<Utc>) {
        tracing::info!(
            target: "tower_pat::notices",
            ?kind,
            deferred = records.len(),
            "a sink could not take every token expiry notice; the rest are left for the next run"
        );
        for record in records {
            if let Err(e) = self.store.release_expiry_notice(kind, &record.id, at).await {
                tracing::warn!(
                    target: "tower_pat::store",
                    ?kind,
                    token_id = %record.id,
                    error = %e,
                    "could not take back an expiry notice claim; that notice is lost"
                );
            }
        }
    }
}
