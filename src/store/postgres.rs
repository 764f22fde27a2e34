//! [`PostgresStore`]: many gateway nodes over one PostgreSQL database, each told of the others'
//! changes at once (feature `postgres`; `postgres-tls` adds TLS with rustls).
//!
//! # Schema
//!
//! One table, `tower_pat_tokens`, created by the migrations the store applies when it connects
//! (in one transaction, under an advisory lock so that nodes starting together do not race; the
//! applied versions are recorded in `tower_pat_schema_version`):
//!
//! | column | type | |
//! | --- | --- | --- |
//! | `id` | `text` | primary key |
//! | `subject`, `name` | `text` | unique together (`tower_pat_tokens_subject_name_key`) |
//! | `name_lower` | `text` | `name` lowercased by Rust, for the case-insensitive search |
//! | `scopes`, `ip_restriction`, `last_used_ips` | `text[]` | arrays, not child tables: they are small and always read whole |
//! | `token_type`, `start` | `text` | |
//! | `created_at`, `updated_at`, `expires_at`, `revoked_at`, `last_used_at`, `last_rotated_at`, `previous_hash_until` | `timestamptz` | microsecond precision |
//! | `hash` | `bytea` | 32 bytes, unique index (`tower_pat_tokens_hash_key`) |
//! | `previous_hash` | `bytea` | partial index, during a rotation grace period |
//! | `version` | `bigint` | management writes so far ([`TokenRecord::version`]; migration 2) |
//! | `disabled_at` | `timestamptz` | while the token is disabled (migration 3) |
//!
//! Migration 4 adds partial indexes on `revoked_at` and `expires_at`, for
//! [`purge`](TokenStore::purge).
//!
//! Migration 5 adds `expiring_notice_at` and `expired_notice_at` (`timestamptz`, nullable): when
//! the `personalAccessToken.expiring` and `.expired` notices were claimed
//! ([`claim_expiry_notices`](TokenStore::claim_expiry_notices), `FOR UPDATE SKIP LOCKED`, so that
//! nodes claiming at once never claim one token twice); a write that changes the expiry clears
//! both.
//!
//! Migration 6 adds `tower_pat_superseded` (`hash` `bytea` primary key, `token_id` indexed and
//! referencing the token `ON DELETE CASCADE`, `superseded_at` `timestamptz` indexed): the
//! secrets rotations replaced, for [`find_superseded`](TokenLookup::find_superseded). A rotation
//! writes and prunes it in its own transaction ([`PostgresStore::superseded_history`]).
//!
//! Migration 7 makes every time finite and before the year 200 000 (a `CHECK`; sqlx cannot
//! decode `infinity`, nor a year past chrono's 262 142): an `expires_at` of `infinity` (or later)
//! written outside this crate becomes NULL (no expiry), any other such time the time of the
//! migration.
//!
//! [`record_usage`](TokenLookup::record_usage) writes a whole batch in one `UPDATE … FROM
//! unnest(…)` statement: `last_used_at` becomes the later of the stored and the given time, and
//! the address lists merge newest first, without repeats, at most
//! [`MAX_LAST_USED_IPS`] ([`TokenRecord::apply_usage`]'s rule).
//!
//! # Change feed
//!
//! Every [`update`](TokenStore::update), [`rotate`](TokenStore::rotate),
//! [`revoke`](TokenStore::revoke), [`delete`](TokenStore::delete) and
//! [`purge`](TokenStore::purge) sends, in the same transaction, `NOTIFY <channel>` with the
//! payload `<id> <hex hash>` for each hash the record answered to before the change (its hash and,
//! during a grace period, its previous hash). PostgreSQL delivers it when the transaction commits.
//! The change is also published to this process's caches before the call returns.
//!
//! Each store runs a listener task, spawned when it connects, on a connection of its own (not one
//! of the pool's: [`PostgresStoreBuilder::listener_options`] may point it elsewhere, e.g. past a
//! transaction-pooling PgBouncer, which cannot carry `LISTEN`). It publishes
//! [`StoreEvent::Changed`] for every notification. When its connection drops it publishes
//! [`StoreEvent::Disconnected`], reconnects with exponential backoff, and once it listens again
//! publishes [`StoreEvent::Reconnected`]: the caches then drop every entry loaded before, since a
//! change may have gone unseen meanwhile (a notification sent while no listener was listening is
//! lost; one sent after the new `LISTEN` is handled after the announcement).
//!
//! A connection can also die without closing: a partition that keeps sockets open, a NAT or load
//! balancer that forgets the flow. Nothing then arrives, and nothing fails. And a listener can be
//! connected and answer queries yet hear nothing: one that listens on another database or server
//! than the writes go to (a typo, a stale address after a failover), or one behind a
//! transaction-pooling proxy, which drops a notification arriving while no client is linked to
//! its server connection. So every `interval` the listener sends a heartbeat: `SELECT 1` on its
//! own connection, and beside it `pg_notify(<channel>, 'tower-pat-heartbeat <uuid>/<n>')` sent
//! through the pool, where the writes go. The query must be answered and the notification heard
//! within `timeout` ([`PostgresStoreBuilder::heartbeat`], 2 s and 2 s by default), or the
//! connection is declared dead: a silent or deaf feed is announced as
//! [`StoreEvent::Disconnected`] at most `interval + timeout` (4 s) after it went so. PostgreSQL
//! delivers notifications in the order their transactions committed, so a heartbeat heard proves
//! that every change committed before it was sent has been heard: that is the confirmation
//! `max_staleness` counts from. A new listener must hear one heartbeat before the feed counts as
//! up, so a store whose listener cannot hear the writes fails to connect, with an error that
//! says so. (Every node hears every node's heartbeats, a few bytes each, and ignores them; a node
//! of a version before this heartbeat logs a warning for each, `ignoring a notification that is
//! not <id> <hex hash>`, until it is upgraded too. If the pool cannot send a heartbeat, or sends
//! it too late in the timeout for its delivery to be judged, nothing is confirmed and the
//! listener stays; sqlx offers no TCP keepalive setting, and the heartbeat does not need one.)
//!
//! # How long a change can go unseen
//!
//! - Feed connected: a change reaches every node's caches as soon as PostgreSQL delivers the
//!   notification (milliseconds).
//! - Feed down, noticed at once (the connection closed) or within `interval + timeout` (silent):
//!   while it is down, a cached entry serves until its TTL and no longer (`stale_if_error` applies
//!   only while the feed is connected); past its TTL it is looked up again, and a node that cannot
//!   reach the database either answers 503. A change made elsewhere during a partition is thus
//!   honoured on the cut-off node within the heartbeat (`interval + timeout`) plus the cache TTL:
//!   4 s + 60 s with the defaults, never the TTL plus `stale_if_error`.
//! - When the feed is back, every cached entry is dropped.
//!
//! [`PatAuthLayer::max_staleness`] tells, at every moment, how far behind a node may be: the time
//! since its feed last confirmed it had heard everything (the last heartbeat answered), once the
//! next confirmation is overdue (a second after the heartbeat interval) or the feed is down, or
//! since the store queries that keep failing began (at most the TTL plus `stale_if_error`); zero
//! when the feed confirms on time and the store answers
//! ([`feed_unconfirmed_since`](TokenLookup::feed_unconfirmed_since)).
//!
//! Notifications carry the token's id and the hex of the hash it answered to (what the other
//! nodes' caches are indexed by). `LISTEN` needs no privilege: any role that can connect to the
//! database can read them, even without `SELECT` on the tables. Give the database to the service
//! alone, or configure a pepper ([`TokenHasher::with_pepper`](crate::TokenHasher::with_pepper)),
//! which makes the hashes keyed.
//!
//! # Concurrent writes
//!
//! [`update`](TokenStore::update) and [`rotate`](TokenStore::rotate) run in one transaction that
//! locks the record's row (`SELECT … FOR UPDATE`), checks it, and writes it with one conditional
//! `UPDATE` (same version, not revoked, and for a rotation the same hash). A revocation from
//! another node therefore lands either before (the write is refused with
//! [`StoreError::Revoked`]) or after (and stays): it is never undone, and a hash rotated away is
//! never written back.
//!
//! # Cancellation
//!
//! Every transaction (the writes, the listing's snapshot, the usage flush, the notice claims,
//! the migrations) runs from its `BEGIN` to its commit or rollback, and the announcement of the
//! change here after it, in a task of its own that the caller awaits: a caller dropped midway
//! (a client hanging up, a timeout around the call) does not stop it, and a write lands whole
//! or not at all. This also guards against sqlx 0.8.6 returning a connection to the pool inside
//! a transaction when the future awaiting its `BEGIN` is dropped (sqlx issues #4393, #4385): a
//! connection left in a listing's `REPEATABLE READ` snapshot would answer later lookups from it,
//! a token revoked since as active. The protection is the store's own, so it holds as well for
//! a pool passed to [`PostgresStoreBuilder::with_pool`]; sqlx does not expose a connection's
//! transaction status, so the pool is given no check of its own on release. Code of yours that
//! shares that pool and drops transactions midway is exposed to the sqlx bug still.
//!
//! # Failure
//!
//! A query that fails, or waits longer than the pool's acquire timeout
//! ([`PostgresStoreBuilder::acquire_timeout`], default 5 s) for a connection, is a
//! [`StoreError::Backend`]. The layer answers a cache miss it could not look up with 503 and
//! `Retry-After`, and, while the change feed is connected, keeps serving cached tokens for
//! `stale_if_error`, still enforcing expiry and every revocation it heard of. With the feed down
//! too (the database unreachable, or this node cut off), cached tokens serve until their TTL.
//!
//! [`PatAuthLayer::max_staleness`]: crate::PatAuthLayer::max_staleness
//! [`StoreEvent::Changed`]: super::StoreEvent::Changed
//! [`StoreEvent::Disconnected`]: super::StoreEvent::Disconnected
//! [`StoreEvent::Reconnected`]: super::StoreEvent::Reconnected

use std::str::FromStr;
use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock, Weak};
use std::time::Duration;

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use sqlx::postgres::{
    PgArguments, PgConnectOptions, PgListener, PgPool, PgPoolOptions, PgRow, Postgres,
};
use sqlx::{Executor, Row};

use super::sql::{
    self, Dialect, Migration, Param, RawRecord, Statements, TABLE, in_task, scope_strings,
    store_error, to_strings,
};
use super::write::{CallerGuard, check_writable};
use super::{
    ChangeHub, ChangeListener, HistorySetting, ListQuery, NoticeKind, Page, Rotation, StoreError,
    StoreEvent, SupersededHistory, SupersededSecret, TokenLookup, TokenPatch, TokenStore,
    superseded_by,
};
use crate::record::UsageUpdate;
use crate::record::{MAX_LAST_USED_IPS, TokenRecord};
use crate::scope::ScopeSet;
use crate::token::TokenHash;

const MIGRATIONS: &[Migration] = &[
    Migration {
        version: 1,
        sql: r"
CREATE TABLE tower_pat_tokens (
    id text NOT NULL,
    subject text NOT NULL,
    name text NOT NULL,
    name_lower text NOT NULL,
    scopes text[] NOT NULL,
    token_type text NOT NULL,
    ip_restriction text[] NOT NULL,
    created_at timestamptz NOT NULL,
    updated_at timestamptz NOT NULL,
    expires_at timestamptz,
    revoked_at timestamptz,
    last_used_at timestamptz,
    last_used_ips text[] NOT NULL DEFAULT '{}',
    last_rotated_at timestamptz,
    hash bytea NOT NULL,
    start text NOT NULL,
    previous_hash bytea,
    previous_hash_until timestamptz,
    CONSTRAINT tower_pat_tokens_pkey PRIMARY KEY (id),
    CONSTRAINT tower_pat_tokens_hash_key UNIQUE (hash),
    CONSTRAINT tower_pat_tokens_subject_name_key UNIQUE (subject, name)
);
CREATE INDEX tower_pat_tokens_previous_hash_idx ON tower_pat_tokens (previous_hash)
    WHERE previous_hash IS NOT NULL;
CREATE INDEX tower_pat_tokens_subject_created_idx ON tower_pat_tokens (subject, created_at);
",
    },
    Migration {
        version: 2,
        sql: "ALTER TABLE tower_pat_tokens ADD COLUMN version bigint NOT NULL DEFAULT 0;",
    },
    Migration {
        version: 3,
        sql: "ALTER TABLE tower_pat_tokens ADD COLUMN disabled_at timestamptz;",
    },
    Migration {
        version: 4,
        sql: r"
CREATE INDEX IF NOT EXISTS tower_pat_tokens_revoked_at_idx ON tower_pat_tokens (revoked_at)
    WHERE revoked_at IS NOT NULL;
CREATE INDEX IF NOT EXISTS tower_pat_tokens_expires_at_idx ON tower_pat_tokens (expires_at)
    WHERE expires_at IS NOT NULL;
",
    },
    Migration {
        version: 5,
        sql: r"
ALTER TABLE tower_pat_tokens ADD COLUMN expiring_notice_at timestamptz;
ALTER TABLE tower_pat_tokens ADD COLUMN expired_notice_at timestamptz;
",
    },
    Migration {
        version: 6,
        sql: r"
CREATE TABLE IF NOT EXISTS tower_pat_superseded (
    hash bytea NOT NULL,
    token_id text NOT NULL,
    superseded_at timestamptz NOT NULL,
    CONSTRAINT tower_pat_superseded_pkey PRIMARY KEY (hash),
    CONSTRAINT tower_pat_superseded_token_id_fkey FOREIGN KEY (token_id)
        REFERENCES tower_pat_tokens (id) ON DELETE CASCADE
);
CREATE INDEX IF NOT EXISTS tower_pat_superseded_token_id_idx ON tower_pat_superseded (token_id);
CREATE INDEX IF NOT EXISTS tower_pat_superseded_time_idx ON tower_pat_superseded (superseded_at);
",
    },
    // Every time finite, and within what chrono can hold. sqlx panics decoding `infinity` (a
    // DBA's "never") or a year past 262 142, which made such a token unrevocable (the
    // revocation decodes the row before its commit) and its lookups and list pages fail. An
    // `expires_at` of `infinity` (or from the year 200 000 on) is what no expiry means, NULL; any other
    // such time becomes now (still revoked, disabled, or at the end of a grace period: nothing
    // is granted that was not).
    Migration {
        version: 7,
        sql: r"
DO $$
DECLARE
    col text;
    tokens_check text := 'true';
BEGIN
    UPDATE tower_pat_tokens SET expires_at = NULL
        WHERE expires_at >= '200000-01-01';
    UPDATE tower_pat_tokens SET expires_at = 'epoch' WHERE expires_at = '-infinity';
    FOREACH col IN ARRAY ARRAY['created_at', 'updated_at', 'expires_at', 'revoked_at',
        'disabled_at', 'last_used_at', 'last_rotated_at', 'previous_hash_until',
        'expiring_notice_at', 'expired_notice_at']
    LOOP
        EXECUTE format('UPDATE tower_pat_tokens SET %1$I = now() '
            'WHERE %1$I = ''-infinity'' OR %1$I >= ''200000-01-01''', col);
        tokens_check := tokens_check
            || format(' AND %1$I > ''-infinity'' AND %1$I < ''200000-01-01''', col);
    END LOOP;
    UPDATE tower_pat_superseded SET superseded_at = now()
        WHERE superseded_at = '-infinity' OR superseded_at >= '200000-01-01';
    ALTER TABLE tower_pat_tokens DROP CONSTRAINT IF EXISTS tower_pat_tokens_finite_times;
    EXECUTE 'ALTER TABLE tower_pat_tokens ADD CONSTRAINT tower_pat_tokens_finite_times CHECK ('
        || tokens_check || ')';
    ALTER TABLE tower_pat_superseded
        DROP CONSTRAINT IF EXISTS tower_pat_superseded_finite_time;
    ALTER TABLE tower_pat_superseded ADD CONSTRAINT tower_pat_superseded_finite_time
        CHECK (superseded_at > '-infinity' AND superseded_at < '200000-01-01');
END
$$;
",
    },
];

/// The advisory lock key under which migrations run ("tower_pa").
const MIGRATION_LOCK: i64 = 0x746f_7765_725f_7061;

/// The first key of the advisory lock a creation takes on its subject ("tpat"; the second key
/// is the subject's `hashtext`): [`TokenStore::insert_below`].
const SUBJECT_LOCK_CLASS: i32 = 0x7470_6174;

/// The default `NOTIFY` channel.
pub const DEFAULT_CHANNEL: &str = "tower_pat_changes";

/// A store in PostgreSQL, shared by many processes, with a change feed over `LISTEN`/`NOTIFY`.
/// See the [module docs](self) for the schema and how the feed works.
///
/// ```no_run
/// use tower_pat::PatAuthLayer;
/// use tower_pat::store::PostgresStore;
///
/// # async fn run() -> Result<(), tower_pat::StoreError> {
/// let url = std::env::var("DATABASE_URL").unwrap_or_default();
/// let store = PostgresStore::connect(&url).await?;
/// let layer = PatAuthLayer::builder(store.clone()).build();
/// # let _ = layer;
/// # Ok(())
/// # }
/// ```
///
/// Cloning gives another handle to the same pool and feed; the listener task stops when the last
/// handle is dropped.
#[derive(Clone, Debug)]
pub struct PostgresStore {
    inner: Arc<Shared>,
}

#[derive(Debug)]
struct Shared {
    pool: PgPool,
    hub: ChangeHub,
    sql: Statements,
    channel: String,
    /// Whether the listener is connected and listening.
    feed_up: AtomicBool,
    /// The Unix ms at which the last answered heartbeat was sent (or the listener connected):
    /// every change committed before it has been heard. What `max_staleness` counts from.
    confirmed_ms: AtomicI64,
    /// When that answer came ([`mono_ms`](crate::cache::mono_ms)): the next heartbeat is sent an
    /// interval later, so its answer is overdue after the interval and a second.
    answered_mono_ms: AtomicI64,
    /// The heartbeat interval and a second, in ms.
    overdue_after_ms: i64,
    /// Held while the feed state changes and is announced, and while a listener subscribes, so
    /// that a new listener learns of an ongoing outage exactly once.
    feed_lock: Mutex<()>,
    listener_task: OnceLock<tokio::task::AbortHandle>,
    history: HistorySetting,
}

impl Drop for Shared {
    fn drop(&mut self) {
        if let Some(task) = self.listener_task.get() {
            task.abort();
        }
    }
}

/// Configures and connects a [`PostgresStore`].
#[derive(Clone)]
#[must_use]
pub struct PostgresStoreBuilder {
    channel: String,
    max_connections: u32,
    acquire_timeout: Duration,
    listener_options: Option<PgConnectOptions>,
    backoff: (Duration, Duration),
    heartbeat: Heartbeat,
}

/// How the listener checks that its connection still carries bytes.
#[derive(Clone, Copy, Debug)]
struct Heartbeat {
    interval: Duration,
    timeout: Duration,
}

/// The default heartbeat interval.
pub const DEFAULT_HEARTBEAT_INTERVAL: Duration = Duration::from_secs(2);

/// The default heartbeat timeout.
pub const DEFAULT_HEARTBEAT_TIMEOUT: Duration = Duration::from_secs(2);

impl std::fmt::Debug for PostgresStoreBuilder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Not the listener's options: they may hold a password.
        f.debug_struct("PostgresStoreBuilder")
            .field("channel", &self.channel)
            .field("max_connections", &self.max_connections)
            .field("acquire_timeout", &self.acquire_timeout)
            .field("separate_listener", &self.listener_options.is_some())
            .field("backoff", &self.backoff)
            .field("heartbeat", &self.heartbeat)
            .finish()
    }
}

impl Default for PostgresStoreBuilder {
    fn default() -> Self {
        Self {
            channel: DEFAULT_CHANNEL.to_owned(),
            max_connections: 10,
            acquire_timeout: Duration::from_secs(5),
            listener_options: None,
            backoff: (Duration::from_millis(100), Duration::from_secs(5)),
            heartbeat: Heartbeat {
                interval: DEFAULT_HEARTBEAT_INTERVAL,
                timeout: DEFAULT_HEARTBEAT_TIMEOUT,
            },
        }
    }
}

impl PostgresStoreBuilder {
    /// The `NOTIFY` channel (default [`DEFAULT_CHANNEL`]); every node of one deployment must use
    /// the same.
    pub fn channel(mut self, channel: impl Into<String>) -> Self {
        self.channel = channel.into();
        self
    }

    /// The pool size (default 10). Ignored by [`with_pool`](Self::with_pool).
    pub fn max_connections(mut self, n: u32) -> Self {
        self.max_connections = n.max(1);
        self
    }

    /// How long a query waits for a connection, and the listener for its own, before failing
    /// (default 5 s). Keep it short: a lookup that cannot get a connection is a 503 for a token
    /// that is not cached. Ignored by [`with_pool`](Self::with_pool) for the pool.
    pub fn acquire_timeout(mut self, timeout: Duration) -> Self {
        self.acquire_timeout = timeout;
        self
    }

    /// Where the listener connects, if not where the pool does: `LISTEN` needs a session, which a
    /// transaction-pooling proxy does not keep. A URL parses into options:
    /// `"postgres://…".parse::<PgConnectOptions>()`. It must reach the database the pool writes
    /// to: connecting fails if the listener does not hear a heartbeat sent through the pool.
    pub fn listener_options(mut self, options: PgConnectOptions) -> Self {
        self.listener_options = Some(options);
        self
    }

    /// The listener's reconnect delays: the first retry waits `min`, each next one twice as long,
    /// at most `max` (defaults 100 ms and 5 s).
    pub fn reconnect_backoff(mut self, min: Duration, max: Duration) -> Self {
        self.backoff = (min, max.max(min));
        self
    }

    /// How often the listener checks its connection, and how long it waits for the answer
    /// (defaults [`DEFAULT_HEARTBEAT_INTERVAL`] and [`DEFAULT_HEARTBEAT_TIMEOUT`], 2 s each).
    ///
    /// A connection that stops carrying bytes without closing (a silent partition, a NAT or load
    /// balancer that forgot the flow), or stops hearing notifications, is declared dead, and the
    /// caches told, at most `interval + timeout` after it went silent: 4 s by default. Each check
    /// is one `SELECT 1` on the listener's connection and one `pg_notify` sent through the pool,
    /// which the listener must hear (see [the module](self)). Both are at least 1 ms; a timeout
    /// shorter than the database's round trip under load makes the feed flap, and every
    /// reconnection empties the caches.
    pub fn heartbeat(mut self, interval: Duration, timeout: Duration) -> Self {
        let min = Duration::from_millis(1);
        self.heartbeat = Heartbeat {
            interval: interval.max(min),
            timeout: timeout.max(min),
        };
        self
    }

    /// Connects to a `postgres://` URL (as in `DATABASE_URL`).
    pub async fn connect(self, url: &str) -> Result<PostgresStore, StoreError> {
        let options = PgConnectOptions::from_str(url).map_err(StoreError::backend)?;
        self.connect_with(options).await
    }

    /// Connects with explicit options.
    pub async fn connect_with(
        self,
        options: PgConnectOptions,
    ) -> Result<PostgresStore, StoreError> {
        let pool = PgPoolOptions::new()
            .max_connections(self.max_connections)
            .acquire_timeout(self.acquire_timeout)
            .connect_with(options)
            .await
            .map_err(store_error)?;
        self.with_pool(pool).await
    }

    /// Uses an existing pool; the listener connects with the pool's options (or the
    /// [`listener_options`](Self::listener_options)) on a connection of its own.
    pub async fn with_pool(self, pool: PgPool) -> Result<PostgresStore, StoreError> {
        migrate(&pool).await?;
        let listen_options = match self.listener_options {
            Some(options) => options,
            None => (*pool.connect_options()).clone(),
        };
        let feed = Feed {
            options: listen_options,
            pool: pool.clone(),
            channel: self.channel.clone(),
            nonce: crate::record::new_id(),
            beats: AtomicU64::new(0),
            timeout: self.acquire_timeout,
            backoff: self.backoff,
            heartbeat: self.heartbeat,
        };
        let listener = feed.listen().await.map_err(store_error)?;
        let inner = Arc::new(Shared {
            pool,
            hub: ChangeHub::new(),
            sql: Statements::new(Dialect::Postgres),
            channel: self.channel,
            feed_up: AtomicBool::new(true),
            confirmed_ms: AtomicI64::new(crate::cache::now_ms()),
            answered_mono_ms: AtomicI64::new(crate::cache::mono_ms()),
            overdue_after_ms: i64::try_from(
                self.heartbeat
                    .interval
                    .saturating_add(Duration::from_secs(1))
                    .as_millis(),
            )
            .unwrap_or(i64::MAX),
            feed_lock: Mutex::new(()),
            listener_task: OnceLock::new(),
            history: HistorySetting::default(),
        });
        let ended = super::FeedTaskGuard::new(Arc::downgrade(&inner), Shared::feed_ended);
        let task = tokio::spawn(feed.run(Arc::downgrade(&inner), listener, ended));
        let _ = inner.listener_task.set(task.abort_handle());
        Ok(PostgresStore { inner })
    }
}

impl PostgresStore {
    /// Connects to a `postgres://` URL with the default settings, applies the migrations and
    /// starts listening for changes.
    pub async fn connect(url: &str) -> Result<Self, StoreError> {
        Self::builder().connect(url).await
    }

    /// A builder for other settings.
    pub fn builder() -> PostgresStoreBuilder {
        PostgresStoreBuilder::default()
    }

    /// Keeps `history` of superseded secrets from now on (default [`SupersededHistory::default`]),
    /// for every handle to this store: what later rotations through it record and prune, and how
    /// far back [`find_superseded`](TokenLookup::find_superseded) looks. Give every node the same.
    #[must_use]
    pub fn superseded_history(self, history: SupersededHistory) -> Self {
        self.inner.history.set(history);
        self
    }

    /// The connection pool.
    pub fn pool(&self) -> &PgPool {
        &self.inner.pool
    }

    /// Whether the change feed is connected and listening right now: false from the moment its
    /// connection closes or misses a heartbeat (see [`PostgresStoreBuilder::heartbeat`]) until it
    /// listens again.
    pub fn feed_connected(&self) -> bool {
        self.inner.feed_up.load(Ordering::Acquire)
    }
}

impl PostgresStore {
    /// The record `id`, its row locked until the transaction ends.
    async fn locked(
        &self,
        tx: &mut sqlx::Transaction<'static, Postgres>,
        id: &str,
    ) -> Result<Option<TokenRecord>, StoreError> {
        sqlx::query(&self.inner.sql.get_for_update)
            .bind(id)
            .fetch_optional(&mut **tx)
            .await
            .map_err(store_error)?
            .as_ref()
            .map(decode)
            .transpose()
    }

    /// [`locked`](Self::locked) record `id`, and with `guard` the caller's row locked too
    /// (`FOR SHARE`: the caller's own requests on other tokens need not wait for each other) and
    /// checked, in the same transaction, until it ends. The two rows are locked in the order of
    /// their ids, whichever is the caller: two tokens acting on each other at once then wait for
    /// each other instead of deadlocking. A deadlock with some other writer all the same is
    /// [`StoreError::CallerChanged`] (nothing written: retry), not a backend failure.
    async fn locked_guarded(
        &self,
        tx: &mut sqlx::Transaction<'static, Postgres>,
        id: &str,
        guard: Option<&CallerGuard>,
    ) -> Result<Option<TokenRecord>, StoreError> {
        let Some(guard) = guard else {
            return self.locked(tx, id).await;
        };
        if guard.id == id {
            let old = self.locked(tx, id).await.map_err(deadlock_retry)?;
            guard.check(old.as_ref())?;
            return Ok(old);
        }
        if guard.id.as_str() < id {
            self.check_caller(tx, guard).await?;
            self.locked(tx, id).await.map_err(deadlock_retry)
        } else {
            let old = self.locked(tx, id).await.map_err(deadlock_retry)?;
            self.check_caller(tx, guard).await?;
            Ok(old)
        }
    }

    /// Locks the caller's row `FOR SHARE` until the transaction ends, and checks `guard`
    /// against it.
    async fn check_caller(
        &self,
        tx: &mut sqlx::Transaction<'static, Postgres>,
        guard: &CallerGuard,
    ) -> Result<(), StoreError> {
        let current = if storable(&guard.id) {
            sqlx::query(&format!("{} FOR SHARE", self.inner.sql.get))
                .bind(&guard.id)
                .fetch_optional(&mut **tx)
                .await
                .map_err(store_error)
                .map_err(deadlock_retry)?
                .as_ref()
                .map(decode)
                .transpose()?
        } else {
            None
        };
        guard.check(current.as_ref())
    }

    /// Commits a conditional write of `old` that returned `row` (none: its condition failed, which
    /// the row lock makes impossible, so a [`StoreError::Stale`]), notifying the other nodes of
    /// every hash `old` answered to in the same transaction, and announces the change here.
    async fn commit_write(
        &self,
        mut tx: sqlx::Transaction<'static, Postgres>,
        old: &TokenRecord,
        row: Option<PgRow>,
    ) -> Result<TokenRecord, StoreError> {
        let new = decode(row.as_ref().ok_or(StoreError::Stale)?)?;
        self.inner
            .notify(&mut *tx, std::slice::from_ref(old))
            .await?;
        tx.commit().await.map_err(store_error)?;
        self.inner.hub.announce(old);
        Ok(new)
    }

    /// [`change_returning`](Self::change_returning) of the statement `q` makes for the version
    /// of record `id`, read with its row locked, if `covering` grants every scope it holds (a revoked
    /// one, whatever it holds, when `revoked_passes`) and, with `guard`, the caller's row (locked
    /// with it, [`locked_guarded`](Self::locked_guarded)) is still the version named; `None` for
    /// no such record, [`StoreError::Stale`] for a scope `covering` does not grant,
    /// [`StoreError::CallerChanged`] for a caller that changed.
    async fn change_if_covered<'q>(
        &self,
        id: &str,
        covering: &ScopeSet,
        revoked_passes: bool,
        guard: Option<&CallerGuard>,
        q: impl FnOnce(i64) -> Query<'q>,
    ) -> Result<Option<TokenRecord>, StoreError> {
        if !storable(id) {
            // No such record; a guard is still checked first, as for a stored id.
            if let Some(guard) = guard {
                let mut tx = self.begin_write().await?;
                self.check_caller(&mut tx, guard).await?;
            }
            return Ok(None);
        }
        let mut tx = self.begin_write().await?;
        let Some(old) = self.locked_guarded(&mut tx, id, guard).await? else {
            return Ok(None);
        };
        let passes = covering.grants_all(&old.scopes) || (revoked_passes && old.is_revoked());
        if !passes {
            return Err(StoreError::Stale);
        }
        let q = q(sql::db_version(old.version)?);
        self.change_in(tx, q)
            .await?
            .map(Some)
            .ok_or(StoreError::Stale)
    }

    /// Runs a statement that changes one record and returns it (its hashes unchanged), notifies
    /// the other nodes in the same transaction, and announces the change here once committed.
    async fn change_returning(&self, q: Query<'_>) -> Result<Option<TokenRecord>, StoreError> {
        let tx = self.begin_write().await?;
        self.change_in(tx, q).await
    }

    /// [`change_returning`](Self::change_returning) within `tx`.
    async fn change_in(
        &self,
        mut tx: sqlx::Transaction<'static, Postgres>,
        q: Query<'_>,
    ) -> Result<Option<TokenRecord>, StoreError> {
        let row = q.fetch_optional(&mut *tx).await.map_err(store_error)?;
        let Some(record) = row.as_ref().map(decode).transpose()? else {
            return Ok(None);
        };
        self.inner
            .notify(&mut *tx, std::slice::from_ref(&record))
            .await?;
        tx.commit().await.map_err(store_error)?;
        self.inner.hub.announce(&record);
        Ok(Some(record))
    }
}

impl Shared {
    /// Sets and announces the feed's state.
    fn feed_state(&self, up: bool) {
        let _guard = self.feed_lock.lock().unwrap_or_else(|e| e.into_inner());
        if up {
            // Listening again, and the caches about to be emptied: nothing older is relied on.
            self.confirmed(crate::cache::now_ms());
        }
        self.feed_up.store(up, Ordering::Release);
        self.hub.publish(if up {
            &StoreEvent::Reconnected
        } else {
            &StoreEvent::Disconnected
        });
    }

    /// A confirmation that every change committed before `sent` (Unix ms) has been heard,
    /// arriving now.
    fn confirmed(&self, sent: i64) {
        self.confirmed_ms.store(sent, Ordering::Release);
        self.answered_mono_ms
            .store(crate::cache::mono_ms(), Ordering::Release);
    }

    /// The feed task ended while the store lives ([`FeedTaskGuard`](super::FeedTaskGuard)):
    /// announced as a disconnection, unless the feed was already down.
    fn feed_ended(&self) {
        let _guard = self.feed_lock.lock().unwrap_or_else(|e| e.into_inner());
        if self.feed_up.swap(false, Ordering::AcqRel) {
            self.hub.publish(&StoreEvent::Disconnected);
        }
    }

    /// A notification from another node (or this one: an invalidation twice is harmless).
    fn notified(&self, payload: &str) {
        // The hash is the last word: an id may hold spaces (records made outside `Tokens`).
        match payload
            .rsplit_once(' ')
            .and_then(|(id, hex)| Some((id, TokenHash::from_hex(hex)?)))
        {
            Some((id, hash)) => self.hub.changed(id, hash),
            // Another node's heartbeat (or one of this node's that came too late).
            None if payload.starts_with(HEARTBEAT_PREFIX) => {}
            None => tracing::warn!(
                channel = %self.channel,
                "ignoring a notification that is not `<id> <hex hash>`"
            ),
        }
    }

    /// Sends the notifications for a change to each record of `olds`, within the change's
    /// transaction: one per hash it answered to.
    async fn notify<'e, E>(&self, executor: E, olds: &[TokenRecord]) -> Result<(), StoreError>
    where
        E: Executor<'e, Database = Postgres>,
    {
        let payloads: Vec<String> = olds
            .iter()
            .flat_map(|old| {
                std::iter::once(old.hash)
                    .chain(old.previous_hash.map(|(h, _)| h))
                    .map(|h| format!("{} {}", old.id, h.to_hex()))
            })
            .collect();
        sqlx::query("SELECT pg_notify($1, p) FROM unnest($2::text[]) AS p")
            .bind(&self.channel)
            .bind(payloads)
            .execute(executor)
            .await
            .map_err(store_error)?;
        Ok(())
    }
}

/// The listener's settings.
struct Feed {
    options: PgConnectOptions,
    /// The store's pool: heartbeats are sent where the writes go.
    pool: PgPool,
    channel: String,
    /// This store's heartbeats' mark (a random UUID), so that it waits for its own.
    nonce: String,
    /// Heartbeats sent so far.
    beats: AtomicU64,
    timeout: Duration,
    backoff: (Duration, Duration),
    heartbeat: Heartbeat,
}

/// How a heartbeat's payload starts: `tower-pat-heartbeat <store's UUID>/<n>`. Its last word is
/// never the hex of a hash, so no node reads it as a change.
const HEARTBEAT_PREFIX: &str = "tower-pat-heartbeat ";

/// How a [heartbeat](Feed::heartbeat) went.
enum Beat {
    /// The listener heard it: every change committed before it was sent has been heard.
    Heard,
    /// The pool could not send it (its error, if it failed), or not early enough in the timeout
    /// for its delivery to be judged (the database unreachable from the pool, the pool busy):
    /// nothing is confirmed, and nothing is known about the listener's hearing.
    NotSent(Option<sqlx::Error>),
    /// Sent through the pool, but the listener did not hear it in time: its connection is silent,
    /// or it listens where the writes are not heard (another database or server, a
    /// transaction-pooling proxy that drops notifications).
    Unheard,
    /// The listener's connection closed, failed, or did not answer in time (silent).
    Failed,
    /// The store is gone.
    StoreGone,
}

/// Why [`Feed::serve`] returned.
enum Ended {
    /// The connection closed, failed or missed a heartbeat.
    Dropped,
    /// The store is gone: nobody listens any more.
    StoreGone,
}

impl Feed {
    /// A listener on a connection of its own, listening. Bounded in time: a connection accepted by
    /// a silent network would otherwise hang here.
    async fn listen(&self) -> Result<PgListener, sqlx::Error> {
        let pool = PgPoolOptions::new()
            .max_connections(1)
            .min_connections(0)
            .idle_timeout(None)
            .max_lifetime(None)
            .acquire_timeout(self.timeout)
            .connect_lazy_with(self.options.clone());
        let listen = async {
            let mut listener = PgListener::connect_with(&pool).await?;
            // Reconnection is ours, so that the caches hear of every drop.
            listener.eager_reconnect(false);
            listener.ignore_pool_close_event(true);
            listener.listen(&self.channel).await?;
            Ok::<_, sqlx::Error>(listener)
        };
        let mut listener =
            tokio::time::timeout(self.timeout.saturating_add(self.heartbeat.timeout), listen)
                .await
                .unwrap_or_else(|_| {
                    Err(sqlx::Error::Io(std::io::Error::new(
                        std::io::ErrorKind::TimedOut,
                        "no answer to LISTEN",
                    )))
                })?;
        // Listening is not hearing: a listener on another database, or behind a proxy that drops
        // notifications, would wait forever and look healthy. One heartbeat must come through
        // before the feed counts as up. (What else arrives meanwhile is dropped: the caches are
        // empty, or about to be emptied by `Reconnected`.)
        match self.heartbeat(&mut listener, None).await {
            Beat::Heard => Ok(listener),
            Beat::NotSent(Some(e)) => Err(e),
            Beat::NotSent(None) => Err(feed_error(
                "the pool could not send the change feed's first heartbeat in time",
            )),
            Beat::Unheard => Err(feed_error(
                "the change feed's listener did not hear a notification sent through the pool: \
                 it listens on another database or server than the writes go to, or behind a \
                 transaction-pooling proxy (point `listener_options` at the database itself)",
            )),
            Beat::Failed | Beat::StoreGone => Err(feed_error(
                "the change feed's connection failed or fell silent during its first heartbeat",
            )),
        }
    }

    /// A heartbeat, all within the heartbeat's timeout from now: `SELECT 1` on the listener's
    /// connection, which must answer (a silent connection does not), and beside it a
    /// notification sent through the pool (`pg_notify` on the channel, in a transaction of its
    /// own), which the listener must then hear. Notifications arriving meanwhile go to `store`
    /// (none: dropped).
    ///
    /// PostgreSQL delivers notifications in the order their transactions committed, so hearing
    /// it proves what the `SELECT 1` alone could not: that every change committed before it was
    /// sent, by any node writing where this pool writes, has been heard. A listener on another
    /// database or server, or behind a proxy that drops notifications, answers the `SELECT 1`
    /// but never hears it.
    async fn heartbeat(&self, listener: &mut PgListener, store: Option<&Weak<Shared>>) -> Beat {
        let n = self.beats.fetch_add(1, Ordering::Relaxed);
        let payload = format!("{HEARTBEAT_PREFIX}{}/{n}", self.nonce);
        let send = sqlx::query("SELECT pg_notify($1, $2)")
            .bind(&self.channel)
            .bind(&payload)
            .execute(&self.pool);
        tokio::pin!(send);
        let deadline = tokio::time::sleep(self.heartbeat.timeout);
        tokio::pin!(deadline);
        let deadline_at = tokio::time::Instant::now() + self.heartbeat.timeout;
        // `None` while the send is pending, then when it was sent, or how it failed.
        let mut sent: Option<Result<tokio::time::Instant, sqlx::Error>> = None;
        let on_sent = |result: Result<_, sqlx::Error>| {
            Some(
                result
                    .map(|_| tokio::time::Instant::now())
                    .inspect_err(|e| {
                        tracing::debug!(error = %e, "token change feed heartbeat not sent");
                    }),
            )
        };
        {
            // Notifications arriving meanwhile are buffered by sqlx and read below.
            let ping = listener.execute(sqlx::raw_sql("SELECT 1"));
            tokio::pin!(ping);
            loop {
                tokio::select! {
                    answer = &mut ping => match answer {
                        Ok(_) => break,
                        Err(e) => {
                            tracing::warn!(error = %e, "token change feed heartbeat failed");
                            return Beat::Failed;
                        }
                    },
                    result = &mut send, if sent.is_none() => sent = on_sent(result),
                    () = &mut deadline => {
                        tracing::warn!(
                            timeout = ?self.heartbeat.timeout,
                            "token change feed heartbeat unanswered; the connection is silent"
                        );
                        return Beat::Failed;
                    }
                }
            }
        }
        loop {
            if let Some(Err(e)) = sent {
                return Beat::NotSent(Some(e));
            }
            tokio::select! {
                result = &mut send, if sent.is_none() => sent = on_sent(result),
                received = listener.try_recv() => match received {
                    Ok(Some(n)) if n.payload() == payload => return Beat::Heard,
                    Ok(Some(n)) => match store.map(Weak::upgrade) {
                        Some(Some(s)) => s.notified(n.payload()),
                        Some(None) => return Beat::StoreGone,
                        None => {}
                    },
                    Ok(None) => {
                        tracing::warn!("token change feed connection closed");
                        return Beat::Failed;
                    }
                    Err(e) => {
                        tracing::warn!(error = %e, "token change feed failed");
                        return Beat::Failed;
                    }
                },
                () = &mut deadline => {
                    // Unheard only if it was sent early enough to have been delivered: a pool
                    // that sends it at the last moment says nothing about the listener.
                    let margin = self.heartbeat.timeout / 4;
                    return match sent {
                        Some(Ok(at)) if deadline_at.saturating_duration_since(at) >= margin => {
                            Beat::Unheard
                        }
                        _ => Beat::NotSent(None),
                    };
                }
            }
        }
    }

    /// The listener task: notifications to the hub; drops, reconnections and their announcements.
    /// `_ended` is an argument, not a local: a task dropped before its first poll drops it too.
    async fn run(
        self,
        store: Weak<Shared>,
        mut listener: PgListener,
        _ended: super::FeedTaskGuard<Shared>,
    ) {
        loop {
            let ended = self.serve(&store, &mut listener).await;
            // What the connection delivered before it ended still counts.
            while let Some(n) = listener.next_buffered() {
                match store.upgrade() {
                    Some(s) => s.notified(n.payload()),
                    None => return,
                }
            }
            // A connection that missed a heartbeat is dropped with its query unanswered: sqlx
            // then waits for it in the background until the socket fails or answers.
            drop(listener);
            let store_alive = match (ended, store.upgrade()) {
                (Ended::Dropped, Some(s)) => {
                    s.feed_state(false);
                    true
                }
                _ => false,
            };
            if !store_alive {
                return;
            }
            tracing::warn!("token change feed disconnected; reconnecting");
            let mut delay = self.backoff.0;
            listener = loop {
                match self.listen().await {
                    Ok(l) => break l,
                    Err(e) => tracing::debug!(error = %e, "token change feed reconnect failed"),
                }
                if store.strong_count() == 0 {
                    return;
                }
                tokio::time::sleep(delay).await;
                delay = (delay * 2).min(self.backoff.1);
            };
            // Listening again: whatever was sent meanwhile is lost, so the caches drop everything
            // (`StoreEvent::Reconnected`). Notifications sent from now on reach the new listener
            // and are handled after this announcement, by this task.
            match store.upgrade() {
                Some(s) => s.feed_state(true),
                None => return,
            }
            tracing::info!("token change feed reconnected");
        }
    }

    /// Hands notifications to the hub until the connection ends. Every `interval` a
    /// [heartbeat](Self::heartbeat) is sent through the pool, and must be heard on the listener
    /// within `timeout`: a silent connection leaves `try_recv` pending forever, and a deaf one
    /// (listening where the writes are not heard) receives nothing while looking healthy.
    /// Notifications keep being handed over while a heartbeat is awaited.
    async fn serve(&self, store: &Weak<Shared>, listener: &mut PgListener) -> Ended {
        let beat = tokio::time::sleep(self.heartbeat.interval);
        tokio::pin!(beat);
        loop {
            tokio::select! {
                received = listener.try_recv() => match received {
                    Ok(Some(n)) => match store.upgrade() {
                        Some(s) => s.notified(n.payload()),
                        None => return Ended::StoreGone,
                    },
                    Ok(None) => {
                        tracing::warn!("token change feed connection closed");
                        return Ended::Dropped;
                    }
                    Err(e) => {
                        tracing::warn!(error = %e, "token change feed failed");
                        return Ended::Dropped;
                    }
                },
                () = &mut beat => {
                    let sent = crate::cache::now_ms();
                    match self.heartbeat(listener, Some(store)).await {
                        Beat::Heard => match store.upgrade() {
                            Some(s) => s.confirmed(sent),
                            None => return Ended::StoreGone,
                        },
                        // Nothing confirmed: the next confirmation goes overdue, and the caches
                        // stop serving past the TTL, until a heartbeat is heard again.
                        Beat::NotSent(_) => {}
                        Beat::Unheard => {
                            tracing::warn!(
                                timeout = ?self.heartbeat.timeout,
                                "token change feed heartbeat sent through the pool but not heard \
                                 on the listener: it no longer hears the database's notifications"
                            );
                            return Ended::Dropped;
                        }
                        Beat::Failed => return Ended::Dropped,
                        Beat::StoreGone => return Ended::StoreGone,
                    }
                    if store.strong_count() == 0 {
                        return Ended::StoreGone;
                    }
                    beat.set(tokio::time::sleep(self.heartbeat.interval));
                }
            }
        }
    }
}

/// A deadlock PostgreSQL broke by failing this transaction (SQLSTATE `40P01`) as
/// [`StoreError::CallerChanged`]: nothing was written, and the request may be sent again.
fn deadlock_retry(err: StoreError) -> StoreError {
    match &err {
        StoreError::Backend(e)
            if e.downcast_ref::<sqlx::Error>().is_some_and(
                |e| matches!(e, sqlx::Error::Database(db) if db.code().as_deref() == Some("40P01")),
            ) =>
        {
            StoreError::CallerChanged
        }
        _ => err,
    }
}

/// A change-feed failure, as the sqlx error [`Feed::listen`] returns.
fn feed_error(message: &'static str) -> sqlx::Error {
    sqlx::Error::Io(std::io::Error::other(message))
}

/// A transaction on `pool`, READ COMMITTED whatever the database's or role's default (see
/// [`PostgresStore::begin_write`]): the migrations and every write.
async fn begin_write(pool: &PgPool) -> Result<sqlx::Transaction<'static, Postgres>, StoreError> {
    pool.begin_with("BEGIN ISOLATION LEVEL READ COMMITTED")
        .await
        .map_err(store_error)
}

/// Applies the pending migrations in one transaction, one node at a time, in a task of its own
/// ([`in_task`]).
async fn migrate(pool: &PgPool) -> Result<(), StoreError> {
    let pool = pool.clone();
    in_task(async move { migrate_tx(&pool).await }).await
}

/// [`migrate`]'s transaction.
async fn migrate_tx(pool: &PgPool) -> Result<(), StoreError> {
    // A node that waited for the lock must read the version the one before it wrote.
    let mut tx = begin_write(pool).await?;
    sqlx::query("SELECT pg_advisory_xact_lock($1)")
        .bind(MIGRATION_LOCK)
        .execute(&mut *tx)
        .await
        .map_err(store_error)?;
    (&mut *tx)
        .execute(sqlx::raw_sql(
            "CREATE TABLE IF NOT EXISTS tower_pat_schema_version (
            version bigint NOT NULL PRIMARY KEY,
            applied_at timestamptz NOT NULL DEFAULT now()
        )",
        ))
        .await
        .map_err(store_error)?;
    let current: i64 = sqlx::query_scalar(
        "SELECT COALESCE(MAX(version), 0)::bigint FROM tower_pat_schema_version",
    )
    .fetch_one(&mut *tx)
    .await
    .map_err(store_error)?;
    for m in sql::pending(MIGRATIONS, current)? {
        (&mut *tx)
            .execute(sqlx::raw_sql(m.sql))
            .await
            .map_err(store_error)?;
        sqlx::query("INSERT INTO tower_pat_schema_version (version) VALUES ($1)")
            .bind(m.version)
            .execute(&mut *tx)
            .await
            .map_err(store_error)?;
    }
    tx.commit().await.map_err(store_error)
}

type Query<'q> = sqlx::query::Query<'q, Postgres, PgArguments>;

/// The longest token id stored: every change of a token is announced to the other nodes as
/// `<id> <hex hash>` in a `NOTIFY`, whose payload PostgreSQL limits to 8 000 bytes. A longer id
/// could be inserted but never revoked.
const MAX_ID_LEN: usize = 1024;

/// Whether PostgreSQL can hold `text`: it refuses the NUL character in text (`invalid byte
/// sequence for encoding "UTF8": 0x00`), so no stored id, subject or name contains one. An id,
/// subject or search text with a NUL (`%00` in a URL) therefore matches no row: the methods
/// answer as for one that matches nothing, without a query, rather than with the database's
/// error (a backend error, a 500 from the management API).
fn storable(text: &str) -> bool {
    !text.contains('\0')
}

/// Binds `$1`–`$17`: every column but the usage ones.
fn bind_record<'q>(q: Query<'q>, r: &'q TokenRecord) -> Result<Query<'q>, StoreError> {
    if r.id.len() > MAX_ID_LEN {
        return Err(StoreError::backend(
            "a token id is longer than 1 024 bytes: its change could not be announced",
        ));
    }
    Ok(q.bind(&r.id)
        .bind(&r.subject)
        .bind(&r.name)
        .bind(r.name.to_lowercase())
        .bind(scope_strings(&r.scopes))
        .bind(&r.token_type)
        .bind(to_strings(&r.ip_restriction))
        .bind(r.created_at)
        .bind(r.updated_at)
        .bind(r.expires_at)
        .bind(r.revoked_at)
        .bind(r.last_rotated_at)
        .bind(r.hash.as_bytes().as_slice())
        .bind(&r.start)
        .bind(r.previous_hash.map(|(h, _)| h.as_bytes().to_vec()))
        .bind(r.previous_hash.map(|(_, until)| until))
        .bind(sql::db_version(r.version)?)
        .bind(r.disabled_at))
}

fn bind_params<'q>(mut q: Query<'q>, params: &[Param]) -> Query<'q> {
    for p in params {
        q = match p {
            Param::Text(s) => q.bind(s.clone()),
            Param::Time(t) => q.bind(*t),
        };
    }
    q
}

fn decode(row: &PgRow) -> Result<TokenRecord, StoreError> {
    fn get<'r, T: sqlx::Decode<'r, Postgres> + sqlx::Type<Postgres>>(
        row: &'r PgRow,
        col: &str,
    ) -> Result<T, StoreError> {
        row.try_get(col).map_err(store_error)
    }
    RawRecord {
        id: get(row, "id")?,
        subject: get(row, "subject")?,
        name: get(row, "name")?,
        scopes: get(row, "scopes")?,
        token_type: get(row, "token_type")?,
        ip_restriction: get(row, "ip_restriction")?,
        created_at: get(row, "created_at")?,
        updated_at: get(row, "updated_at")?,
        expires_at: get(row, "expires_at")?,
        revoked_at: get(row, "revoked_at")?,
        last_used_at: get(row, "last_used_at")?,
        last_used_ips: get(row, "last_used_ips")?,
        last_rotated_at: get(row, "last_rotated_at")?,
        hash: get(row, "hash")?,
        start: get(row, "start")?,
        previous_hash: get(row, "previous_hash")?,
        previous_hash_until: get(row, "previous_hash_until")?,
        version: get(row, "version")?,
        disabled_at: get(row, "disabled_at")?,
    }
    .into_record()
}

#[async_trait]
impl TokenLookup for PostgresStore {
    fn feed_unconfirmed_since(&self) -> Option<i64> {
        let inner = &self.inner;
        let answered = inner.answered_mono_ms.load(Ordering::Acquire);
        let overdue = crate::cache::mono_ms().saturating_sub(answered) > inner.overdue_after_ms;
        (overdue || !inner.feed_up.load(Ordering::Acquire))
            .then(|| inner.confirmed_ms.load(Ordering::Acquire))
    }

    async fn find_by_hash(&self, hash: &TokenHash) -> Result<Option<TokenRecord>, StoreError> {
        let rows = sqlx::query(&self.inner.sql.find_by_hash)
            .bind(hash.as_bytes().as_slice())
            .fetch_all(&self.inner.pool)
            .await
            .map_err(store_error)?;
        sql::matching(&rows, decode, hash)
    }

    async fn record_usage(&self, updates: &[UsageUpdate]) -> Result<(), StoreError> {
        let (this, updates) = (self.clone(), updates.to_vec());
        in_task(async move { this.record_usage_tx(&updates).await }).await
    }

    fn subscribe(&self, listener: Weak<dyn ChangeListener>) -> bool {
        let _guard = self
            .inner
            .feed_lock
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        self.inner.hub.subscribe(listener.clone());
        if !self.inner.feed_up.load(Ordering::Acquire)
            && let Some(l) = listener.upgrade()
        {
            l.on_event(&StoreEvent::Disconnected);
        }
        true
    }

    async fn find_superseded(
        &self,
        hash: &TokenHash,
    ) -> Result<Option<SupersededSecret>, StoreError> {
        let cutoff = self.inner.history.get().cutoff(Utc::now());
        let row = sqlx::query(&self.inner.sql.find_superseded)
            .bind(hash.as_bytes().as_slice())
            .bind(cutoff)
            .fetch_optional(&self.inner.pool)
            .await
            .map_err(store_error)?;
        let Some(row) = row else { return Ok(None) };
        let at: DateTime<Utc> = row.try_get("superseded_at").map_err(store_error)?;
        Ok(Some(SupersededSecret::new(decode(&row)?, at)))
    }
}

impl PostgresStore {
    /// A transaction for a write, READ COMMITTED whatever the database's or role's default:
    /// every conditional write here locks the rows it checks (`FOR UPDATE`, an advisory lock)
    /// and must then read what the transaction before it committed. Under REPEATABLE READ it
    /// would read its snapshot instead, or fail with a serialization error where a revocation
    /// meets a concurrent usage flush.
    async fn begin_write(&self) -> Result<sqlx::Transaction<'static, Postgres>, StoreError> {
        begin_write(&self.inner.pool).await
    }

    /// [`insert_below`](TokenStore::insert_below), and with `caller` its [`CallerGuard`]
    /// checked with the caller's row locked in the same transaction.
    async fn insert_below_if(
        &self,
        record: &TokenRecord,
        max: u64,
        caller: Option<&CallerGuard>,
    ) -> Result<bool, StoreError> {
        // A lock per subject for the transaction: creations for one subject on every node take
        // turns between the count and the insert; other subjects' do not wait.
        // The count must see what the previous holder of the lock committed, which a snapshot
        // taken at the lock (REPEATABLE READ) would not: `begin_write` is READ COMMITTED.
        let mut tx = self.begin_write().await?;
        sqlx::query("SELECT pg_advisory_xact_lock($1, hashtext($2))")
            .bind(SUBJECT_LOCK_CLASS)
            .bind(&record.subject)
            .execute(&mut *tx)
            .await
            .map_err(store_error)?;
        // Then the caller's row (no write takes a subject's lock while it holds a row's).
        if let Some(guard) = caller {
            self.check_caller(&mut tx, guard).await?;
        }
        let n: i64 = sqlx::query_scalar(&self.inner.sql.count_by_subject)
            .bind(&record.subject)
            .fetch_one(&mut *tx)
            .await
            .map_err(store_error)?;
        if u64::try_from(n).unwrap_or(0) >= max {
            return Ok(false);
        }
        self.insert_in(&mut *tx, record).await?;
        tx.commit().await.map_err(store_error)?;
        Ok(true)
    }

    /// Inserts `record` through `executor` (the pool, or a transaction).
    async fn insert_in<'e, E>(&self, executor: E, record: &TokenRecord) -> Result<(), StoreError>
    where
        E: Executor<'e, Database = Postgres>,
    {
        bind_record(sqlx::query(&self.inner.sql.insert), record)?
            .bind(record.last_used_at)
            .bind(to_strings(&record.last_used_ips))
            .execute(executor)
            .await
            .map_err(store_error)?;
        Ok(())
    }
}

#[async_trait]
impl TokenStore for PostgresStore {
    async fn insert(&self, record: &TokenRecord) -> Result<(), StoreError> {
        self.insert_in(&self.inner.pool, record).await
    }

    async fn get(&self, id: &str) -> Result<Option<TokenRecord>, StoreError> {
        if !storable(id) {
            return Ok(None);
        }
        sqlx::query(&self.inner.sql.get)
            .bind(id)
            .fetch_optional(&self.inner.pool)
            .await
            .map_err(store_error)?
            .as_ref()
            .map(decode)
            .transpose()
    }

    async fn list(&self, query: &ListQuery) -> Result<Page, StoreError> {
        let (this, query) = (self.clone(), query.clone());
        in_task(async move { this.list_tx(&query).await }).await
    }

    async fn update(&self, id: &str, patch: &TokenPatch) -> Result<TokenRecord, StoreError> {
        let (this, id, patch) = (self.clone(), id.to_owned(), patch.clone());
        in_task(async move { this.update_tx(&id, &patch).await }).await
    }

    async fn rotate(&self, id: &str, rotation: &Rotation) -> Result<TokenRecord, StoreError> {
        let (this, id, rotation) = (self.clone(), id.to_owned(), rotation.clone());
        in_task(async move { this.rotate_tx(&id, &rotation).await }).await
    }

    async fn revoke(&self, id: &str, at: DateTime<Utc>) -> Result<Option<TokenRecord>, StoreError> {
        let (this, id) = (self.clone(), id.to_owned());
        in_task(async move { this.revoke_tx(&id, at).await }).await
    }

    async fn delete(&self, id: &str) -> Result<Option<TokenRecord>, StoreError> {
        let (this, id) = (self.clone(), id.to_owned());
        in_task(async move { this.delete_tx(&id).await }).await
    }

    async fn revoke_if_covered(
        &self,
        id: &str,
        at: DateTime<Utc>,
        covering: &ScopeSet,
    ) -> Result<Option<TokenRecord>, StoreError> {
        let (this, id, covering) = (self.clone(), id.to_owned(), covering.clone());
        in_task(async move { this.revoke_if_covered_tx(&id, at, &covering, None).await }).await
    }

    async fn revoke_if_covered_guarded(
        &self,
        id: &str,
        at: DateTime<Utc>,
        covering: &ScopeSet,
        caller: &CallerGuard,
    ) -> Result<Option<TokenRecord>, StoreError> {
        let (this, id, covering, caller) = (
            self.clone(),
            id.to_owned(),
            covering.clone(),
            caller.clone(),
        );
        in_task(async move {
            this.revoke_if_covered_tx(&id, at, &covering, Some(&caller))
                .await
        })
        .await
    }

    async fn delete_if_covered(
        &self,
        id: &str,
        covering: &ScopeSet,
    ) -> Result<Option<TokenRecord>, StoreError> {
        let (this, id, covering) = (self.clone(), id.to_owned(), covering.clone());
        in_task(async move { this.delete_if_covered_tx(&id, &covering, None).await }).await
    }

    async fn delete_if_covered_guarded(
        &self,
        id: &str,
        covering: &ScopeSet,
        caller: &CallerGuard,
    ) -> Result<Option<TokenRecord>, StoreError> {
        let (this, id, covering, caller) = (
            self.clone(),
            id.to_owned(),
            covering.clone(),
            caller.clone(),
        );
        in_task(async move {
            this.delete_if_covered_tx(&id, &covering, Some(&caller))
                .await
        })
        .await
    }

    async fn insert_below(&self, record: &TokenRecord, max: u64) -> Result<bool, StoreError> {
        let (this, record) = (self.clone(), record.clone());
        in_task(async move { this.insert_below_if(&record, max, None).await }).await
    }

    async fn insert_below_guarded(
        &self,
        record: &TokenRecord,
        max: u64,
        caller: &CallerGuard,
    ) -> Result<bool, StoreError> {
        let (this, record, caller) = (self.clone(), record.clone(), caller.clone());
        in_task(async move { this.insert_below_if(&record, max, Some(&caller)).await }).await
    }

    fn checks_caller_guard(&self) -> bool {
        true
    }

    async fn count_by_subject(&self, subject: &str) -> Result<u64, StoreError> {
        if !storable(subject) {
            return Ok(0);
        }
        let n: i64 = sqlx::query_scalar(&self.inner.sql.count_by_subject)
            .bind(subject)
            .fetch_one(&self.inner.pool)
            .await
            .map_err(store_error)?;
        Ok(u64::try_from(n).unwrap_or(0))
    }

    async fn purge(
        &self,
        cutoff: DateTime<Utc>,
        limit: usize,
    ) -> Result<Vec<TokenRecord>, StoreError> {
        let this = self.clone();
        in_task(async move { this.purge_tx(cutoff, limit).await }).await
    }

    async fn claim_expiry_notices(
        &self,
        kind: NoticeKind,
        at: DateTime<Utc>,
        lead: Duration,
        limit: usize,
    ) -> Result<Vec<TokenRecord>, StoreError> {
        let this = self.clone();
        in_task(async move { this.claim_expiry_notices_tx(kind, at, lead, limit).await }).await
    }

    async fn release_expiry_notice(
        &self,
        kind: NoticeKind,
        id: &str,
        at: DateTime<Utc>,
    ) -> Result<bool, StoreError> {
        let done = sqlx::query(self.inner.sql.release(kind))
            .bind(id)
            .bind(crate::record::micros(at))
            .execute(&self.inner.pool)
            .await
            .map_err(store_error)?;
        Ok(done.rows_affected() > 0)
    }
}

/// The transactions of the [`TokenStore`] methods, each run to its end by
/// [`in_task`](sql::in_task) in a task of its own (see there).
impl PostgresStore {
    async fn record_usage_tx(&self, updates: &[UsageUpdate]) -> Result<(), StoreError> {
        if updates.is_empty() {
            return Ok(());
        }
        // In the order of the ids, and locked in that order first: two nodes flushing the same
        // tokens (each batch in its own order) then wait for each other instead of deadlocking,
        // whatever plan the update gets.
        let mut updates: Vec<&UsageUpdate> = updates.iter().collect();
        updates.sort_unstable_by(|a, b| a.token_id.cmp(&b.token_id));
        let ids: Vec<&str> = updates.iter().map(|u| u.token_id.as_str()).collect();
        let times: Vec<DateTime<Utc>> = updates.iter().map(|u| u.last_used_at).collect();
        let ips: Vec<String> = updates
            .iter()
            .map(|u| to_strings(&u.ips).join(" "))
            .collect();
        // The merge is TokenRecord::apply_usage's: the later time wins; the addresses of the
        // later mark come first, then the others, without repeats, at most MAX_LAST_USED_IPS.
        // A time more than a minute past the database's clock (a node whose clock runs ahead)
        // is taken as that: it could never be corrected later, the later time winning.
        let statement = format!(
            "UPDATE {TABLE} AS t SET
                last_used_at = GREATEST(t.last_used_at, u.at),
                last_used_ips = ARRAY(
                    SELECT m.ip FROM (
                        SELECT x.ip, MIN(x.ord) AS ord
                        FROM unnest(CASE WHEN t.last_used_at IS NULL OR u.at >= t.last_used_at
                                         THEN u.ips || t.last_used_ips
                                         ELSE t.last_used_ips || u.ips END)
                             WITH ORDINALITY AS x(ip, ord)
                        GROUP BY x.ip
                    ) AS m
                    ORDER BY m.ord
                    LIMIT {MAX_LAST_USED_IPS})
            FROM (
                SELECT v.id, LEAST(v.at, now() + interval '1 minute') AS at,
                       string_to_array(v.ips, ' ') AS ips
                FROM unnest($1::text[], $2::timestamptz[], $3::text[]) AS v(id, at, ips)
            ) AS u
            WHERE t.id = u.id"
        );
        let mut tx = self.begin_write().await?;
        sqlx::query(&format!(
            "SELECT 1 FROM {TABLE} WHERE id = ANY($1::text[]) ORDER BY id FOR UPDATE"
        ))
        .bind(&ids)
        .execute(&mut *tx)
        .await
        .map_err(store_error)?;
        sqlx::query(&statement)
            .bind(ids)
            .bind(times)
            .bind(ips)
            .execute(&mut *tx)
            .await
            .map_err(store_error)?;
        tx.commit().await.map_err(store_error)
    }

    async fn list_tx(&self, query: &ListQuery) -> Result<Page, StoreError> {
        let texts = [query.subject.as_deref(), query.search.as_deref()];
        if !texts.into_iter().flatten().all(storable) {
            return Ok(Page::default());
        }
        sql::list_page::<Postgres>(
            &self.inner.pool,
            "BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY",
            query,
            Dialect::Postgres,
            bind_params,
            decode,
        )
        .await
    }

    async fn update_tx(&self, id: &str, patch: &TokenPatch) -> Result<TokenRecord, StoreError> {
        if !storable(id) {
            return Err(StoreError::NotFound);
        }
        let mut tx = self.begin_write().await?;
        let old = self
            .locked_guarded(&mut tx, id, patch.if_caller.as_ref())
            .await?;
        let old = check_writable(old.as_ref(), patch.if_version, None, patch.if_unexpired)?;
        if patch.is_empty() {
            return Ok(old.clone());
        }
        let row = sqlx::query(&self.inner.sql.patch)
            .bind(id)
            .bind(sql::db_version(old.version)?)
            .bind(patch.name.as_deref())
            .bind(patch.name.as_deref().map(str::to_lowercase))
            .bind(patch.scopes.as_ref().map(scope_strings))
            .bind(patch.expires_at.is_some())
            .bind(patch.expires_at.flatten())
            .bind(patch.ip_restriction.as_deref().map(to_strings))
            .bind(patch.at)
            .bind(patch.disabled_at.is_some())
            .bind(patch.disabled_at.flatten())
            .fetch_optional(&mut *tx)
            .await
            .map_err(store_error)?;
        self.commit_write(tx, old, row).await
    }

    async fn rotate_tx(&self, id: &str, rotation: &Rotation) -> Result<TokenRecord, StoreError> {
        if !storable(id) {
            return Err(StoreError::NotFound);
        }
        let mut tx = self.begin_write().await?;
        let old = self
            .locked_guarded(&mut tx, id, rotation.if_caller.as_ref())
            .await?;
        let old = check_writable(
            old.as_ref(),
            rotation.if_version,
            Some(&rotation.old_hash),
            rotation.if_unexpired,
        )?;
        let grace = rotation.grace_until.map(|until| (rotation.old_hash, until));
        let row = sqlx::query(&self.inner.sql.rotate)
            .bind(id)
            .bind(sql::db_version(old.version)?)
            .bind(rotation.old_hash.as_bytes().as_slice())
            .bind(rotation.new_hash.as_bytes().as_slice())
            .bind(&rotation.new_start)
            .bind(grace.map(|(h, _)| h.as_bytes().to_vec()))
            .bind(grace.map(|(_, until)| until))
            .bind(rotation.at)
            .bind(rotation.expires_at.is_some())
            .bind(rotation.expires_at.flatten())
            .fetch_optional(&mut *tx)
            .await
            .map_err(store_error)?;
        if row.is_some() {
            let history = self.inner.history.get();
            for (hash, at) in superseded_by(old, rotation) {
                sqlx::query(&self.inner.sql.supersede)
                    .bind(hash.as_bytes().as_slice())
                    .bind(id)
                    .bind(at)
                    .execute(&mut *tx)
                    .await
                    .map_err(store_error)?;
            }
            sqlx::query(&self.inner.sql.prune_superseded)
                .bind(id)
                .bind(i64::from(history.max_per_token))
                .bind(history.cutoff(rotation.at))
                .execute(&mut *tx)
                .await
                .map_err(store_error)?;
        }
        self.commit_write(tx, old, row).await
    }

    async fn revoke_tx(
        &self,
        id: &str,
        at: DateTime<Utc>,
    ) -> Result<Option<TokenRecord>, StoreError> {
        if !storable(id) {
            return Ok(None);
        }
        let q = sqlx::query(&self.inner.sql.revoke)
            .bind(id)
            .bind(at)
            .bind(None::<i64>);
        self.change_returning(q).await
    }

    async fn delete_tx(&self, id: &str) -> Result<Option<TokenRecord>, StoreError> {
        if !storable(id) {
            return Ok(None);
        }
        self.change_returning(
            sqlx::query(&self.inner.sql.delete)
                .bind(id)
                .bind(None::<i64>),
        )
        .await
    }

    async fn revoke_if_covered_tx(
        &self,
        id: &str,
        at: DateTime<Utc>,
        covering: &ScopeSet,
        guard: Option<&CallerGuard>,
    ) -> Result<Option<TokenRecord>, StoreError> {
        self.change_if_covered(id, covering, true, guard, |version| {
            sqlx::query(&self.inner.sql.revoke)
                .bind(id)
                .bind(at)
                .bind(Some(version))
        })
        .await
    }

    async fn delete_if_covered_tx(
        &self,
        id: &str,
        covering: &ScopeSet,
        guard: Option<&CallerGuard>,
    ) -> Result<Option<TokenRecord>, StoreError> {
        self.change_if_covered(id, covering, false, guard, |version| {
            sqlx::query(&self.inner.sql.delete)
                .bind(id)
                .bind(Some(version))
        })
        .await
    }

    async fn purge_tx(
        &self,
        cutoff: DateTime<Utc>,
        limit: usize,
    ) -> Result<Vec<TokenRecord>, StoreError> {
        if limit == 0 {
            return Ok(Vec::new());
        }
        let mut tx = self.begin_write().await?;
        let rows = sqlx::query(&self.inner.sql.purge)
            .bind(sql::ceil_micros(cutoff))
            .bind(i64::try_from(limit).unwrap_or(i64::MAX))
            .fetch_all(&mut *tx)
            .await
            .map_err(store_error)?;
        let removed = rows.iter().map(decode).collect::<Result<Vec<_>, _>>()?;
        if removed.is_empty() {
            return Ok(removed);
        }
        self.inner.notify(&mut *tx, &removed).await?;
        tx.commit().await.map_err(store_error)?;
        for r in &removed {
            self.inner.hub.announce(r);
        }
        Ok(removed)
    }

    async fn claim_expiry_notices_tx(
        &self,
        kind: NoticeKind,
        at: DateTime<Utc>,
        lead: Duration,
        limit: usize,
    ) -> Result<Vec<TokenRecord>, StoreError> {
        if limit == 0 {
            return Ok(Vec::new());
        }
        let limit = i64::try_from(limit).unwrap_or(i64::MAX);
        let at = crate::record::micros(at);
        let q = match kind {
            NoticeKind::Expiring => sqlx::query(&self.inner.sql.claim_expiring)
                .bind(at)
                .bind(at)
                .bind(crate::record::micros(crate::record::after(at, lead)))
                .bind(limit),
            NoticeKind::Expired => sqlx::query(&self.inner.sql.claim_expired)
                .bind(at)
                .bind(at)
                .bind(limit),
        };
        let mut tx = self.begin_write().await?;
        let rows = q.fetch_all(&mut *tx).await.map_err(store_error)?;
        tx.commit().await.map_err(store_error)?;
        rows.iter().map(decode).collect()
    }
}
