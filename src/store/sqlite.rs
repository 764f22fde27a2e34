//! [`SqliteStore`]: the embedded, durable store (feature `sqlite`, on by default).
//!
//! # Schema
//!
//! One table, `tower_pat_tokens` (a `STRICT` table), created by the migrations this module applies
//! on open, in one transaction, recorded in `tower_pat_schema_version`:
//!
//! | column | type | |
//! | --- | --- | --- |
//! | `id` | `TEXT` | primary key |
//! | `subject`, `name` | `TEXT` | unique together |
//! | `name_lower` | `TEXT` | `name` lowercased by Rust, for the case-insensitive search |
//! | `scopes`, `ip_restriction`, `last_used_ips` | `TEXT` | space-separated lists |
//! | `token_type`, `start` | `TEXT` | |
//! | `created_at`, `updated_at`, `expires_at`, `revoked_at`, `last_used_at`, `last_rotated_at`, `previous_hash_until` | `INTEGER` | Unix microseconds |
//! | `hash` | `BLOB` | 32 bytes, unique |
//! | `previous_hash` | `BLOB` | indexed, during a rotation grace period |
//! | `version` | `INTEGER` | management writes so far ([`TokenRecord::version`]; migration 2) |
//! | `disabled_at` | `INTEGER` | Unix microseconds, while the token is disabled (migration 4) |
//!
//! Migration 5 adds partial indexes on `revoked_at` and `expires_at`, for
//! [`purge`](TokenStore::purge).
//!
//! Migration 6 adds `expiring_notice_at` and `expired_notice_at` (`INTEGER`, Unix microseconds,
//! nullable): when the `personalAccessToken.expiring` and `.expired` notices were claimed
//! ([`claim_expiry_notices`](TokenStore::claim_expiry_notices)); a write that changes the expiry
//! clears both.
//!
//! Migration 7 adds `tower_pat_superseded` (`hash` `BLOB` primary key, `token_id`, indexed, and
//! `superseded_at`, Unix microseconds, indexed): the secrets rotations replaced, for
//! [`find_superseded`](TokenLookup::find_superseded). A rotation writes and prunes it in its own
//! transaction ([`SqliteStore::superseded_history`]); a trigger removes a token's rows when the
//! token is deleted or purged.
//!
//! and the change log `tower_pat_changes` (migration 3): `seq` (`INTEGER PRIMARY KEY
//! AUTOINCREMENT`), `token_id`, `hash` (the hash the change invalidates), `origin` (a random tag
//! of the handle that wrote it) and `at` (Unix microseconds).
//!
//! Times are kept to the microsecond (like PostgreSQL's `timestamptz`): a record read back has its
//! times truncated to whole microseconds.
//!
//! # Connections
//!
//! The file is opened in WAL mode with `synchronous = NORMAL`: readers never wait for the writer.
//! Writes go through one connection, so they never conflict with each other; reads through a small
//! pool of read-only connections. Another process may open the same file (SQLite's locks and a
//! 5 s busy timeout keep it consistent), and hears this one's changes through the change feed.
//!
//! # Change feed
//!
//! A change made through the store ([`update`](TokenStore::update),
//! [`rotate`](TokenStore::rotate), [`revoke`](TokenStore::revoke),
//! [`delete`](TokenStore::delete), [`purge`](TokenStore::purge)) is published to the caches subscribed to it before the call
//! returns, as [`MemoryStore`](super::MemoryStore) does.
//!
//! Changes made by another handle or process on the same file arrive through the change log:
//! each of those writes appends, in its own transaction, one `tower_pat_changes` row per hash it
//! invalidates, and prunes the log to its last [`CHANGE_LOG_KEEP`] rows. A store opened on a file
//! runs a poller on a read-only connection of its own: every [`DEFAULT_POLL_INTERVAL`] (100 ms;
//! [`SqliteStore::open_with_poll_interval`]) it reads `PRAGMA data_version`, which changes only
//! when another connection committed, and then the rows past the last one it saw, publishing
//! [`StoreEvent::Changed`] for those another handle wrote (its own were announced at commit). A
//! revocation by another process is therefore refused within about one interval.
//!
//! A poll that fails or takes over 1 s marks the feed down ([`StoreEvent::Disconnected`],
//! [`SqliteStore::feed_connected`] false): the caches stop serving on trust past their TTL, as for
//! a lost PostgreSQL feed. The next successful poll publishes [`StoreEvent::Reconnected`] and the
//! caches drop everything loaded before. A poller that finds rows it never saw already pruned (it
//! fell more than [`CHANGE_LOG_KEEP`] rows behind) does the same. An in-memory store has no
//! poller: no other connection can reach it.
//!
//! # Concurrent writes
//!
//! [`update`](TokenStore::update) and [`rotate`](TokenStore::rotate) run in one `BEGIN
//! IMMEDIATE` transaction: it takes the database's write lock (waiting for another process's
//! writer, up to the busy timeout), reads and checks the record, and writes it with one
//! conditional `UPDATE`. A revocation by another process therefore lands either before (the
//! write is refused with [`StoreError::Revoked`]) or after (and stays): it is never undone.
//!
//! # Cancellation
//!
//! Every transaction runs from its `BEGIN` to its commit or rollback, and the announcement of
//! the change after it, in a task of its own that the caller awaits: a caller dropped midway (a
//! client hanging up, a timeout around the call) does not stop it, and a write lands whole or
//! not at all. sqlx 0.8.6 rolls back a `BEGIN` whose caller is gone while the worker runs it,
//! but not one dropped in the check that follows a custom `BEGIN IMMEDIATE`, which would leave
//! the writer connection holding the database's write lock.
//!
//! # Failure
//!
//! A failed query is a [`StoreError::Backend`]; the layer answers a cache miss it could not look
//! up with 503 and keeps serving cached tokens for `stale_if_error`.

use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicI64, Ordering};
use std::sync::{Arc, Mutex, OnceLock, Weak};
use std::time::Duration;

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use sqlx::sqlite::{
    SqliteArguments, SqliteConnectOptions, SqliteJournalMode, SqlitePool, SqlitePoolOptions,
    SqliteRow, SqliteSynchronous,
};
use sqlx::{Executor, Row, Sqlite};

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
use crate::record::{TokenRecord, merge_usage};
use crate::scope::ScopeSet;
use crate::token::TokenHash;

const MIGRATIONS: &[Migration] = &[
    Migration {
        version: 1,
        sql: r"
CREATE TABLE tower_pat_tokens (
    id TEXT NOT NULL PRIMARY KEY,
    subject TEXT NOT NULL,
    name TEXT NOT NULL,
    name_lower TEXT NOT NULL,
    scopes TEXT NOT NULL,
    token_type TEXT NOT NULL,
    ip_restriction TEXT NOT NULL,
    created_at INTEGER NOT NULL,
    updated_at INTEGER NOT NULL,
    expires_at INTEGER,
    revoked_at INTEGER,
    last_used_at INTEGER,
    last_used_ips TEXT NOT NULL DEFAULT '',
    last_rotated_at INTEGER,
    hash BLOB NOT NULL UNIQUE,
    start TEXT NOT NULL,
    previous_hash BLOB,
    previous_hash_until INTEGER,
    UNIQUE (subject, name)
) STRICT;
CREATE INDEX tower_pat_tokens_previous_hash ON tower_pat_tokens (previous_hash)
    WHERE previous_hash IS NOT NULL;
CREATE INDEX tower_pat_tokens_subject_created ON tower_pat_tokens (subject, created_at);
",
    },
    Migration {
        version: 2,
        sql: "ALTER TABLE tower_pat_tokens ADD COLUMN version INTEGER NOT NULL DEFAULT 0;",
    },
    Migration {
        version: 3,
        sql: r"
CREATE TABLE tower_pat_changes (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    token_id TEXT NOT NULL,
    hash BLOB NOT NULL,
    origin INTEGER NOT NULL,
    at INTEGER NOT NULL
) STRICT;
",
    },
    Migration {
        version: 4,
        sql: "ALTER TABLE tower_pat_tokens ADD COLUMN disabled_at INTEGER;",
    },
    Migration {
        version: 5,
        sql: r"
CREATE INDEX IF NOT EXISTS tower_pat_tokens_revoked_at ON tower_pat_tokens (revoked_at)
    WHERE revoked_at IS NOT NULL;
CREATE INDEX IF NOT EXISTS tower_pat_tokens_expires_at ON tower_pat_tokens (expires_at)
    WHERE expires_at IS NOT NULL;
",
    },
    Migration {
        version: 6,
        sql: r"
ALTER TABLE tower_pat_tokens ADD COLUMN expiring_notice_at INTEGER;
ALTER TABLE tower_pat_tokens ADD COLUMN expired_notice_at INTEGER;
",
    },
    Migration {
        version: 7,
        sql: r"
CREATE TABLE IF NOT EXISTS tower_pat_superseded (
    hash BLOB NOT NULL PRIMARY KEY,
    token_id TEXT NOT NULL,
    superseded_at INTEGER NOT NULL
) STRICT;
CREATE INDEX IF NOT EXISTS tower_pat_superseded_token_id ON tower_pat_superseded (token_id);
CREATE INDEX IF NOT EXISTS tower_pat_superseded_time ON tower_pat_superseded (superseded_at);
CREATE TRIGGER IF NOT EXISTS tower_pat_superseded_forget AFTER DELETE ON tower_pat_tokens
BEGIN
    DELETE FROM tower_pat_superseded WHERE token_id = OLD.id;
END;
",
    },
];

/// How many change-log rows are kept: older ones are pruned by the write that adds a new one. A
/// poller that falls further behind than this treats its feed as interrupted (its caches reload).
pub const CHANGE_LOG_KEEP: i64 = 1_000;

/// How often a [`SqliteStore`] opened on a file checks for other connections' writes, by default.
pub const DEFAULT_POLL_INTERVAL: Duration = Duration::from_millis(100);

/// How long one poll may take before the feed counts as down.
const POLL_TIMEOUT: Duration = Duration::from_secs(1);

/// A store in one SQLite file: tokens survive restarts. See the [module docs](self) for the schema.
///
/// ```no_run
/// use tower_pat::PatAuthLayer;
/// use tower_pat::store::SqliteStore;
///
/// # async fn run() -> Result<(), tower_pat::StoreError> {
/// let store = SqliteStore::open("tower-pat.db").await?;
/// let layer = PatAuthLayer::builder(store.clone()).build();
/// # let _ = layer;
/// # Ok(())
/// # }
/// ```
///
/// Cloning gives another handle to the same database and change feed.
///
/// On Unix, a database file that [`open`](Self::open) creates is readable and writable by its
/// owner only (mode 0600, whatever the umask): it holds the tokens' hashes, subjects, scopes and
/// IP restrictions. SQLite gives the `-wal` and `-shm` files it creates beside it the same
/// permissions. A file that already exists keeps its own.
#[derive(Clone, Debug)]
pub struct SqliteStore {
    inner: Arc<Shared>,
}

#[derive(Debug)]
struct Shared {
    /// Read-only connections (the writer itself for an in-memory database).
    reader: SqlitePool,
    /// The one connection that writes.
    writer: SqlitePool,
    hub: ChangeHub,
    sql: Statements,
    /// Tags this handle's change-log rows. Its poller announces them all the same: a write
    /// whose future was dropped between its commit and its announcement (a client gone, a
    /// timeout) is then still applied to this process's caches within a poll. The tag is kept
    /// for the row format that older versions of this crate read.
    origin: i64,
    /// Whether the cross-process feed is polling successfully (always true in memory).
    feed_up: AtomicBool,
    /// The Unix ms at which the last successful poll started: every change committed before it
    /// has been heard. What `max_staleness` counts from.
    confirmed_ms: AtomicI64,
    /// When that poll ended ([`mono_ms`](crate::cache::mono_ms)).
    polled_mono_ms: AtomicI64,
    /// How long after a poll ended the next one's end is overdue (the poll interval and a
    /// second); 0 for an in-memory database, which has no poller.
    overdue_after_ms: AtomicI64,
    /// Held while the feed state changes and is announced, and while a listener subscribes.
    feed_lock: Mutex<()>,
    poller: OnceLock<tokio::task::AbortHandle>,
    history: HistorySetting,
}

impl Drop for Shared {
    fn drop(&mut self) {
        if let Some(task) = self.poller.get() {
            task.abort();
        }
    }
}

/// Creates the database file at `path` if it does not exist, with mode 0600 (Unix only), before
/// SQLite opens it: SQLite would create it with the process umask (0644 under the common 022,
/// readable by every local user), and gives its `-wal` and `-shm` files the main file's
/// permissions. An empty file is an empty database to SQLite. Names SQLite does not read as a
/// file (`:memory:`, `file:` URIs, the empty name) are left to it.
fn create_private(path: &Path) -> Result<(), StoreError> {
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        let name = path.as_os_str().as_encoded_bytes();
        if name.is_empty() || name == b":memory:" || name.starts_with(b"file:") {
            return Ok(());
        }
        match std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(path)
        {
            Ok(_) => {}
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
            Err(e) => return Err(StoreError::backend(e)),
        }
    }
    #[cfg(not(unix))]
    let _ = path;
    Ok(())
}

/// How many tokens' usage one write transaction of [`SqliteStore::record_usage`] merges.
const USAGE_CHUNK: usize = 500;

impl SqliteStore {
    /// Opens (creating it if missing) the database file at `path`, applies the migrations and
    /// starts the cross-process change feed, polling every [`DEFAULT_POLL_INTERVAL`].
    pub async fn open(path: impl AsRef<Path>) -> Result<Self, StoreError> {
        Self::open_with_poll_interval(path, DEFAULT_POLL_INTERVAL).await
    }

    /// [`open`](Self::open), checking for other connections' writes every `interval` (at least
    /// 10 ms). Each check is one `PRAGMA data_version` on the feed's own read-only connection; the
    /// change log is read only when it changed.
    pub async fn open_with_poll_interval(
        path: impl AsRef<Path>,
        interval: Duration,
    ) -> Result<Self, StoreError> {
        create_private(path.as_ref())?;
        let base = SqliteConnectOptions::new()
            .filename(path)
            .busy_timeout(Duration::from_secs(5));
        let writer = SqlitePoolOptions::new()
            .max_connections(1)
            .connect_with(
                base.clone()
                    .create_if_missing(true)
                    .journal_mode(SqliteJournalMode::Wal)
                    .synchronous(SqliteSynchronous::Normal),
            )
            .await
            .map_err(store_error)?;
        migrate(&writer).await?;
        let read_only = base.read_only(true);
        let reader = SqlitePoolOptions::new()
            .max_connections(4)
            .connect_with(read_only.clone())
            .await
            .map_err(store_error)?;
        let mut feed = Feed {
            options: read_only,
            conn: None,
            data_version: None,
            last: 0,
        };
        feed.last = feed.start().await.map_err(store_error)?;
        let store = Self::from_pools(reader, writer);
        let interval = interval.max(Duration::from_millis(10));
        let overdue = interval.saturating_add(Duration::from_secs(1)).as_millis();
        store.inner.overdue_after_ms.store(
            i64::try_from(overdue).unwrap_or(i64::MAX),
            Ordering::Release,
        );
        store
            .inner
            .confirmed_ms
            .store(crate::cache::now_ms(), Ordering::Release);
        store
            .inner
            .polled_mono_ms
            .store(crate::cache::mono_ms(), Ordering::Release);
        let ended = super::FeedTaskGuard::new(Arc::downgrade(&store.inner), |s: &Shared| {
            s.feed_state(false);
        });
        let task = tokio::spawn(feed.run(Arc::downgrade(&store.inner), interval, ended));
        let _ = store.inner.poller.set(task.abort_handle());
        Ok(store)
    }

    /// Whether the cross-process change feed is working right now: false from a failed poll until
    /// the next successful one (always true for [`in_memory`](Self::in_memory), which no other
    /// connection can reach).
    pub fn feed_connected(&self) -> bool {
        self.inner.feed_up.load(Ordering::Acquire)
    }

    /// A database in memory, gone when the last handle is dropped: for tests.
    pub async fn in_memory() -> Result<Self, StoreError> {
        // One connection that never closes: the database lives as long as it does.
        let pool = SqlitePoolOptions::new()
            .min_connections(1)
            .max_connections(1)
            .idle_timeout(None)
            .max_lifetime(None)
            .connect_with(SqliteConnectOptions::new().in_memory(true))
            .await
            .map_err(store_error)?;
        migrate(&pool).await?;
        Ok(Self::from_pools(pool.clone(), pool))
    }

    fn from_pools(reader: SqlitePool, writer: SqlitePool) -> Self {
        Self {
            inner: Arc::new(Shared {
                reader,
                writer,
                hub: ChangeHub::new(),
                sql: Statements::new(Dialect::Sqlite),
                origin: origin(),
                feed_up: AtomicBool::new(true),
                confirmed_ms: AtomicI64::new(crate::cache::now_ms()),
                polled_mono_ms: AtomicI64::new(crate::cache::mono_ms()),
                overdue_after_ms: AtomicI64::new(0),
                feed_lock: Mutex::new(()),
                poller: OnceLock::new(),
                history: HistorySetting::default(),
            }),
        }
    }

    /// Keeps `history` of superseded secrets from now on (default [`SupersededHistory::default`]),
    /// for every handle to this store: what later rotations through it record and prune, and how
    /// far back [`find_superseded`](TokenLookup::find_superseded) looks.
    #[must_use]
    pub fn superseded_history(self, history: SupersededHistory) -> Self {
        self.inner.history.set(history);
        self
    }

    /// Closes the connections; later calls fail with [`StoreError::Backend`].
    pub async fn close(&self) {
        self.inner.reader.close().await;
        self.inner.writer.close().await;
    }
}

impl SqliteStore {
    /// A transaction holding the database's write lock (waiting up to the busy timeout for
    /// another process's writer): what it reads stays true until it commits.
    /// One token's usage merged into its row (a row deleted meanwhile is skipped): the two
    /// usage columns only, within the caller's write transaction.
    async fn record_one_usage(
        &self,
        tx: &mut sqlx::Transaction<'static, Sqlite>,
        u: &UsageUpdate,
    ) -> Result<(), StoreError> {
        let row = sqlx::query(&format!(
            "SELECT last_used_at, last_used_ips FROM {TABLE} WHERE id = ?1"
        ))
        .bind(&u.token_id)
        .fetch_optional(&mut **tx)
        .await
        .map_err(store_error)?;
        let Some(row) = row else { return Ok(()) };
        let mut last_used_at = opt_time(row.try_get("last_used_at").map_err(store_error)?)?;
        let ips: String = row.try_get("last_used_ips").map_err(store_error)?;
        let mut ips = ips
            .split_ascii_whitespace()
            .filter_map(|s| s.parse().ok())
            .collect();
        merge_usage(&mut last_used_at, &mut ips, u);
        sqlx::query(&format!(
            "UPDATE {TABLE} SET last_used_at = ?2, last_used_ips = ?3 WHERE id = ?1"
        ))
        .bind(&u.token_id)
        .bind(last_used_at.map(micros))
        .bind(to_strings(&ips).join(" "))
        .execute(&mut **tx)
        .await
        .map_err(store_error)?;
        Ok(())
    }

    /// [`insert_below`](TokenStore::insert_below), and with `caller` its
    /// [`CallerGuard`] checked under the same write lock.
    async fn insert_below_if(
        &self,
        record: &TokenRecord,
        max: u64,
        caller: Option<&CallerGuard>,
    ) -> Result<bool, StoreError> {
        // The write lock first: no other connection, in this process or another, can insert
        // between the count and the insert, nor change the caller between its check and the
        // insert.
        let mut tx = self.begin_write().await?;
        check_caller(&mut tx, &self.inner.sql, caller).await?;
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

    async fn begin_write(&self) -> Result<sqlx::Transaction<'static, Sqlite>, StoreError> {
        self.inner
            .writer
            .begin_with("BEGIN IMMEDIATE")
            .await
            .map_err(store_error)
    }

    /// Commits a conditional write of `old` that returned `row` (none: its condition failed, which
    /// the lock makes impossible, so a [`StoreError::Stale`]), and announces the change.
    async fn commit_write(
        &self,
        mut tx: sqlx::Transaction<'static, Sqlite>,
        old: &TokenRecord,
        row: Option<SqliteRow>,
    ) -> Result<TokenRecord, StoreError> {
        let new = decode(row.as_ref().ok_or(StoreError::Stale)?)?;
        self.log_change(&mut tx, std::slice::from_ref(old)).await?;
        tx.commit().await.map_err(store_error)?;
        self.inner.hub.announce(old);
        Ok(new)
    }

    /// [`change_returning`](Self::change_returning) of the statement `q` makes for the version
    /// of record `id`, read under the write lock, if `covering` grants every scope it holds (a revoked
    /// one, whatever it holds, when `revoked_passes`) and, with `guard`, the caller's record is
    /// still the version named (checked first, under the same lock); `None` for no such record,
    /// [`StoreError::Stale`] for a scope `covering` does not grant,
    /// [`StoreError::CallerChanged`] for a caller that changed.
    async fn change_if_covered<'q>(
        &self,
        id: &str,
        covering: &ScopeSet,
        revoked_passes: bool,
        guard: Option<&CallerGuard>,
        q: impl FnOnce(i64) -> Query<'q>,
    ) -> Result<Option<TokenRecord>, StoreError> {
        let mut tx = self.begin_write().await?;
        check_caller(&mut tx, &self.inner.sql, guard).await?;
        let Some(old) = locked(&mut tx, &self.inner.sql, id).await? else {
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

    /// Runs a statement that changes one record and returns it (its hashes unchanged), logs the
    /// change in the same transaction, and announces it once committed.
    async fn change_returning(&self, q: Query<'_>) -> Result<Option<TokenRecord>, StoreError> {
        let tx = self.begin_write().await?;
        self.change_in(tx, q).await
    }

    /// [`change_returning`](Self::change_returning) within `tx`.
    async fn change_in(
        &self,
        mut tx: sqlx::Transaction<'static, Sqlite>,
        q: Query<'_>,
    ) -> Result<Option<TokenRecord>, StoreError> {
        let row = q.fetch_optional(&mut *tx).await.map_err(store_error)?;
        let Some(record) = row.as_ref().map(decode).transpose()? else {
            return Ok(None);
        };
        self.log_change(&mut tx, std::slice::from_ref(&record))
            .await?;
        tx.commit().await.map_err(store_error)?;
        self.inner.hub.announce(&record);
        Ok(Some(record))
    }

    /// Appends to the change log, within a write's transaction, every hash the records in `olds`
    /// answered to (what [`ChangeHub::announce`] publishes here), and prunes the log to its last
    /// [`CHANGE_LOG_KEEP`] rows.
    async fn log_change(
        &self,
        tx: &mut sqlx::Transaction<'static, Sqlite>,
        olds: &[TokenRecord],
    ) -> Result<(), StoreError> {
        let at = Utc::now().timestamp_micros();
        for old in olds {
            for hash in std::iter::once(old.hash).chain(old.previous_hash.map(|(h, _)| h)) {
                sqlx::query(
                    "INSERT INTO tower_pat_changes (token_id, hash, origin, at) \
                     VALUES (?1, ?2, ?3, ?4)",
                )
                .bind(&old.id)
                .bind(hash.as_bytes().as_slice())
                .bind(self.inner.origin)
                .bind(at)
                .execute(&mut **tx)
                .await
                .map_err(store_error)?;
            }
        }
        sqlx::query(
            "DELETE FROM tower_pat_changes
             WHERE seq <= (SELECT MAX(seq) FROM tower_pat_changes) - ?1",
        )
        .bind(CHANGE_LOG_KEEP)
        .execute(&mut **tx)
        .await
        .map_err(store_error)?;
        Ok(())
    }
}

/// A random tag for one handle's change-log rows.
fn origin() -> i64 {
    let mut b = [0u8; 8];
    getrandom::fill(&mut b).expect("the operating system CSPRNG failed");
    i64::from_ne_bytes(b)
}

impl Shared {
    /// Sets and announces the feed's state, if it changed.
    fn feed_state(&self, up: bool) {
        let _guard = self.feed_lock.lock().unwrap_or_else(|e| e.into_inner());
        let was = self.feed_up.swap(up, Ordering::AcqRel);
        if was != up {
            self.hub.publish(if up {
                &StoreEvent::Reconnected
            } else {
                &StoreEvent::Disconnected
            });
        }
    }
}

/// The cross-process change feed: its own read-only connection, which checks `PRAGMA
/// data_version` (it changes when any other connection, in this process or another, commits)
/// and then reads the change-log rows past the last one it saw.
struct Feed {
    options: SqliteConnectOptions,
    conn: Option<sqlx::SqliteConnection>,
    data_version: Option<i64>,
    /// The last change-log row seen.
    last: i64,
}

/// What one poll found.
enum Polled {
    /// Nothing new.
    Quiet,
    /// Rows past the last one seen: `(token id, hash)`.
    Changes(Vec<(String, TokenHash)>),
    /// Rows were pruned before this feed read them: changes may have been missed.
    Missed,
}

impl Feed {
    /// Opens the feed's connection and returns the newest change-log row.
    async fn start(&mut self) -> Result<i64, sqlx::Error> {
        use sqlx::ConnectOptions;
        let mut conn = self.options.connect().await?;
        let last = sqlx::query_scalar("SELECT COALESCE(MAX(seq), 0) FROM tower_pat_changes")
            .fetch_one(&mut conn)
            .await?;
        self.conn = Some(conn);
        Ok(last)
    }

    /// One check, on the feed's connection (reopened if a check failed: it is dropped then).
    async fn poll(&mut self) -> Result<Polled, sqlx::Error> {
        use sqlx::ConnectOptions;
        let mut conn = match self.conn.take() {
            Some(c) => c,
            None => {
                self.data_version = None;
                self.options.connect().await?
            }
        };
        let polled = self.poll_on(&mut conn).await;
        if polled.is_ok() {
            self.conn = Some(conn);
        }
        polled
    }

    async fn poll_on(&mut self, conn: &mut sqlx::SqliteConnection) -> Result<Polled, sqlx::Error> {
        let version: i64 = sqlx::query_scalar("PRAGMA data_version")
            .fetch_one(&mut *conn)
            .await?;
        if self.data_version == Some(version) {
            return Ok(Polled::Quiet);
        }
        // One statement, one snapshot: the rows and the oldest row kept.
        let rows = sqlx::query(
            "SELECT seq, token_id, hash, (SELECT MIN(seq) FROM tower_pat_changes) AS oldest
             FROM tower_pat_changes WHERE seq > ?1 ORDER BY seq",
        )
        .bind(self.last)
        .fetch_all(&mut *conn)
        .await?;
        self.data_version = Some(version);
        let Some(first) = rows.first() else {
            return Ok(Polled::Quiet);
        };
        let oldest: i64 = first.try_get("oldest")?;
        let missed = oldest > self.last + 1;
        let mut changes = Vec::with_capacity(rows.len());
        for row in &rows {
            self.last = row.try_get("seq")?;
            let hash: Vec<u8> = row.try_get("hash")?;
            match <[u8; 32]>::try_from(hash.as_slice()) {
                Ok(h) => changes.push((row.try_get("token_id")?, TokenHash::from_bytes(h))),
                Err(_) => tracing::warn!("ignoring a change-log row whose hash is not 32 bytes"),
            }
        }
        Ok(if missed {
            Polled::Missed
        } else {
            Polled::Changes(changes)
        })
    }

    /// Polls every `interval` until the store is dropped.
    /// `_ended` is an argument, not a local: a task dropped before its first poll drops it too.
    async fn run(
        mut self,
        store: Weak<Shared>,
        interval: Duration,
        _ended: super::FeedTaskGuard<Shared>,
    ) {
        let mut tick = tokio::time::interval(interval);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tick.tick().await;
            let started = crate::cache::now_ms();
            let polled = tokio::time::timeout(POLL_TIMEOUT, self.poll()).await;
            let Some(shared) = store.upgrade() else {
                return;
            };
            match polled {
                Ok(Ok(polled)) => {
                    shared.confirmed_ms.store(started, Ordering::Release);
                    shared
                        .polled_mono_ms
                        .store(crate::cache::mono_ms(), Ordering::Release);
                    let was_down = !shared.feed_up.load(Ordering::Acquire);
                    match polled {
                        Polled::Quiet => {}
                        Polled::Changes(changes) => {
                            // This handle's own writes too: announced when they committed, unless
                            // the writing future was dropped in between (the commit completes
                            // on the connection's worker all the same). Twice is harmless.
                            for (id, hash) in changes {
                                shared.hub.changed(&id, hash);
                            }
                        }
                        Polled::Missed => {
                            tracing::warn!(
                                "token change feed fell behind the change log; caches reload"
                            );
                            shared.feed_state(false);
                            shared.feed_state(true);
                            continue;
                        }
                    }
                    if was_down {
                        shared.feed_state(true);
                    }
                }
                Ok(Err(e)) => {
                    tracing::warn!(error = %e, "token change feed poll failed");
                    shared.feed_state(false);
                }
                Err(_) => {
                    tracing::warn!("token change feed poll timed out");
                    shared.feed_state(false);
                }
            }
        }
    }
}

/// Applies the pending migrations in one transaction, in a task of its own ([`in_task`]).
async fn migrate(pool: &SqlitePool) -> Result<(), StoreError> {
    let pool = pool.clone();
    in_task(async move { migrate_tx(&pool).await }).await
}

/// [`migrate`]'s transaction.
async fn migrate_tx(pool: &SqlitePool) -> Result<(), StoreError> {
    let mut tx = pool
        .begin_with("BEGIN IMMEDIATE")
        .await
        .map_err(store_error)?;
    (&mut *tx)
        .execute(sqlx::raw_sql(
            "CREATE TABLE IF NOT EXISTS tower_pat_schema_version (
            version INTEGER NOT NULL PRIMARY KEY,
            applied_at INTEGER NOT NULL
        )",
        ))
        .await
        .map_err(store_error)?;
    let current: i64 =
        sqlx::query_scalar("SELECT COALESCE(MAX(version), 0) FROM tower_pat_schema_version")
            .fetch_one(&mut *tx)
            .await
            .map_err(store_error)?;
    for m in sql::pending(MIGRATIONS, current)? {
        (&mut *tx)
            .execute(sqlx::raw_sql(m.sql))
            .await
            .map_err(store_error)?;
        sqlx::query("INSERT INTO tower_pat_schema_version (version, applied_at) VALUES (?1, ?2)")
            .bind(m.version)
            .bind(Utc::now().timestamp_micros())
            .execute(&mut *tx)
            .await
            .map_err(store_error)?;
    }
    tx.commit().await.map_err(store_error)
}

type Query<'q> = sqlx::query::Query<'q, Sqlite, SqliteArguments<'q>>;

/// The record `id` as stored, read within a write transaction.
async fn locked(
    tx: &mut sqlx::Transaction<'static, Sqlite>,
    sql: &Statements,
    id: &str,
) -> Result<Option<TokenRecord>, StoreError> {
    sqlx::query(&sql.get_for_update)
        .bind(id)
        .fetch_optional(&mut **tx)
        .await
        .map_err(store_error)?
        .as_ref()
        .map(decode)
        .transpose()
}

/// Checks `guard` (if any) against the caller's record as the transaction reads it, under the
/// write lock `BEGIN IMMEDIATE` took: it holds until the write commits.
async fn check_caller(
    tx: &mut sqlx::Transaction<'static, Sqlite>,
    sql: &Statements,
    guard: Option<&CallerGuard>,
) -> Result<(), StoreError> {
    if let Some(guard) = guard {
        guard.check(locked(tx, sql, &guard.id).await?.as_ref())?;
    }
    Ok(())
}

fn micros(t: DateTime<Utc>) -> i64 {
    t.timestamp_micros()
}

fn time(micros: i64) -> Result<DateTime<Utc>, StoreError> {
    DateTime::from_timestamp_micros(micros)
        .ok_or_else(|| StoreError::backend(format!("stored time {micros} is out of range")))
}

fn opt_time(micros: Option<i64>) -> Result<Option<DateTime<Utc>>, StoreError> {
    micros.map(time).transpose()
}

fn words(s: &str) -> Vec<String> {
    s.split_ascii_whitespace().map(str::to_owned).collect()
}

/// Binds `?1`–`?18`: every column but the usage ones.
fn bind_record<'q>(q: Query<'q>, r: &'q TokenRecord) -> Result<Query<'q>, StoreError> {
    Ok(q.bind(&r.id)
        .bind(&r.subject)
        .bind(&r.name)
        .bind(r.name.to_lowercase())
        .bind(scope_strings(&r.scopes).join(" "))
        .bind(&r.token_type)
        .bind(to_strings(&r.ip_restriction).join(" "))
        .bind(micros(r.created_at))
        .bind(micros(r.updated_at))
        .bind(r.expires_at.map(micros))
        .bind(r.revoked_at.map(micros))
        .bind(r.last_rotated_at.map(micros))
        .bind(r.hash.as_bytes().as_slice())
        .bind(&r.start)
        .bind(r.previous_hash.map(|(h, _)| h.as_bytes().to_vec()))
        .bind(r.previous_hash.map(|(_, until)| micros(until)))
        .bind(sql::db_version(r.version)?)
        .bind(r.disabled_at.map(micros)))
}

fn decode(row: &SqliteRow) -> Result<TokenRecord, StoreError> {
    let get_time = |col: &str| row.try_get::<i64, _>(col).map_err(store_error);
    let get_opt_time = |col: &str| row.try_get::<Option<i64>, _>(col).map_err(store_error);
    let get_text = |col: &str| row.try_get::<String, _>(col).map_err(store_error);
    RawRecord {
        id: get_text("id")?,
        subject: get_text("subject")?,
        name: get_text("name")?,
        scopes: words(&get_text("scopes")?),
        token_type: get_text("token_type")?,
        ip_restriction: words(&get_text("ip_restriction")?),
        created_at: time(get_time("created_at")?)?,
        updated_at: time(get_time("updated_at")?)?,
        expires_at: opt_time(get_opt_time("expires_at")?)?,
        revoked_at: opt_time(get_opt_time("revoked_at")?)?,
        last_used_at: opt_time(get_opt_time("last_used_at")?)?,
        last_used_ips: words(&get_text("last_used_ips")?),
        last_rotated_at: opt_time(get_opt_time("last_rotated_at")?)?,
        hash: row.try_get("hash").map_err(store_error)?,
        start: get_text("start")?,
        previous_hash: row.try_get("previous_hash").map_err(store_error)?,
        previous_hash_until: opt_time(get_opt_time("previous_hash_until")?)?,
        version: get_time("version")?,
        disabled_at: opt_time(get_opt_time("disabled_at")?)?,
    }
    .into_record()
}

fn bind_params<'q>(mut q: Query<'q>, params: &[Param]) -> Query<'q> {
    for p in params {
        q = match p {
            Param::Text(s) => q.bind(s.clone()),
            Param::Time(t) => q.bind(micros(*t)),
        };
    }
    q
}

#[async_trait]
impl TokenLookup for SqliteStore {
    fn feed_unconfirmed_since(&self) -> Option<i64> {
        let inner = &self.inner;
        let overdue_after = inner.overdue_after_ms.load(Ordering::Acquire);
        if overdue_after == 0 {
            return None;
        }
        let polled = inner.polled_mono_ms.load(Ordering::Acquire);
        let overdue = crate::cache::mono_ms().saturating_sub(polled) > overdue_after;
        (overdue || !inner.feed_up.load(Ordering::Acquire))
            .then(|| inner.confirmed_ms.load(Ordering::Acquire))
    }

    async fn find_by_hash(&self, hash: &TokenHash) -> Result<Option<TokenRecord>, StoreError> {
        let rows = sqlx::query(&self.inner.sql.find_by_hash)
            .bind(hash.as_bytes().as_slice())
            .fetch_all(&self.inner.reader)
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
            .bind(micros(cutoff))
            .fetch_optional(&self.inner.reader)
            .await
            .map_err(store_error)?;
        let Some(row) = row else { return Ok(None) };
        let at = time(row.try_get("superseded_at").map_err(store_error)?)?;
        Ok(Some(SupersededSecret::new(decode(&row)?, at)))
    }
}

impl SqliteStore {
    /// Inserts `record` through `executor` (the pool, or a transaction).
    async fn insert_in<'e, E>(&self, executor: E, record: &TokenRecord) -> Result<(), StoreError>
    where
        E: Executor<'e, Database = Sqlite>,
    {
        bind_record(sqlx::query(&self.inner.sql.insert), record)?
            .bind(record.last_used_at.map(micros))
            .bind(to_strings(&record.last_used_ips).join(" "))
            .execute(executor)
            .await
            .map_err(store_error)?;
        Ok(())
    }
}

#[async_trait]
impl TokenStore for SqliteStore {
    async fn insert(&self, record: &TokenRecord) -> Result<(), StoreError> {
        self.insert_in(&self.inner.writer, record).await
    }

    async fn get(&self, id: &str) -> Result<Option<TokenRecord>, StoreError> {
        sqlx::query(&self.inner.sql.get)
            .bind(id)
            .fetch_optional(&self.inner.reader)
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
        let n: i64 = sqlx::query_scalar(&self.inner.sql.count_by_subject)
            .bind(subject)
            .fetch_one(&self.inner.reader)
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
        let (this, id) = (self.clone(), id.to_owned());
        in_task(async move { this.release_expiry_notice_tx(kind, &id, at).await }).await
    }
}

/// The transactions of the [`TokenStore`] methods, each run to its end by
/// [`in_task`](sql::in_task) in a task of its own (see there).
impl SqliteStore {
    async fn record_usage_tx(&self, updates: &[UsageUpdate]) -> Result<(), StoreError> {
        if updates.is_empty() {
            return Ok(());
        }
        // In chunks, each its own write transaction: a batch after an outage can hold many
        // thousands of tokens, and a revocation (from this process or another) waits for the
        // chunk in progress only. A chunk written twice (the batch retried after a later chunk
        // failed) changes nothing: the merge keeps the later time and each address once.
        for chunk in updates.chunks(USAGE_CHUNK) {
            let mut tx = self.begin_write().await?;
            for u in chunk {
                self.record_one_usage(&mut tx, u).await?;
            }
            tx.commit().await.map_err(store_error)?;
        }
        Ok(())
    }

    async fn list_tx(&self, query: &ListQuery) -> Result<Page, StoreError> {
        sql::list_page::<Sqlite>(
            &self.inner.reader,
            "BEGIN",
            query,
            Dialect::Sqlite,
            bind_params,
            decode,
        )
        .await
    }

    async fn update_tx(&self, id: &str, patch: &TokenPatch) -> Result<TokenRecord, StoreError> {
        let mut tx = self.begin_write().await?;
        check_caller(&mut tx, &self.inner.sql, patch.if_caller.as_ref()).await?;
        let old = locked(&mut tx, &self.inner.sql, id).await?;
        let old = check_writable(old.as_ref(), patch.if_version, None, patch.if_unexpired)?;
        if patch.is_empty() {
            return Ok(old.clone());
        }
        let row = sqlx::query(&self.inner.sql.patch)
            .bind(id)
            .bind(sql::db_version(old.version)?)
            .bind(patch.name.as_deref())
            .bind(patch.name.as_deref().map(str::to_lowercase))
            .bind(patch.scopes.as_ref().map(|s| scope_strings(s).join(" ")))
            .bind(patch.expires_at.is_some())
            .bind(patch.expires_at.flatten().map(micros))
            .bind(
                patch
                    .ip_restriction
                    .as_ref()
                    .map(|n| to_strings(n).join(" ")),
            )
            .bind(micros(patch.at))
            .bind(patch.disabled_at.is_some())
            .bind(patch.disabled_at.flatten().map(micros))
            .fetch_optional(&mut *tx)
            .await
            .map_err(store_error)?;
        self.commit_write(tx, old, row).await
    }

    async fn rotate_tx(&self, id: &str, rotation: &Rotation) -> Result<TokenRecord, StoreError> {
        let mut tx = self.begin_write().await?;
        check_caller(&mut tx, &self.inner.sql, rotation.if_caller.as_ref()).await?;
        let old = locked(&mut tx, &self.inner.sql, id).await?;
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
            .bind(grace.map(|(_, until)| micros(until)))
            .bind(micros(rotation.at))
            .bind(rotation.expires_at.is_some())
            .bind(rotation.expires_at.flatten().map(micros))
            .fetch_optional(&mut *tx)
            .await
            .map_err(store_error)?;
        if row.is_some() {
            let history = self.inner.history.get();
            for (hash, at) in superseded_by(old, rotation) {
                sqlx::query(&self.inner.sql.supersede)
                    .bind(hash.as_bytes().as_slice())
                    .bind(id)
                    .bind(micros(at))
                    .execute(&mut *tx)
                    .await
                    .map_err(store_error)?;
            }
            sqlx::query(&self.inner.sql.prune_superseded)
                .bind(id)
                .bind(i64::from(history.max_per_token))
                .bind(micros(history.cutoff(rotation.at)))
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
        let q = sqlx::query(&self.inner.sql.revoke)
            .bind(id)
            .bind(micros(at))
            .bind(None::<i64>);
        self.change_returning(q).await
    }

    async fn delete_tx(&self, id: &str) -> Result<Option<TokenRecord>, StoreError> {
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
        let at = micros(at);
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
            .bind(micros(sql::ceil_micros(cutoff)))
            .bind(i64::try_from(limit).unwrap_or(i64::MAX))
            .fetch_all(&mut *tx)
            .await
            .map_err(store_error)?;
        let removed = rows.iter().map(decode).collect::<Result<Vec<_>, _>>()?;
        if removed.is_empty() {
            return Ok(removed);
        }
        self.log_change(&mut tx, &removed).await?;
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
        let q = match kind {
            NoticeKind::Expiring => sqlx::query(&self.inner.sql.claim_expiring)
                .bind(micros(at))
                .bind(micros(at))
                .bind(micros(crate::record::after(at, lead)))
                .bind(limit),
            NoticeKind::Expired => sqlx::query(&self.inner.sql.claim_expired)
                .bind(micros(at))
                .bind(micros(at))
                .bind(limit),
        };
        let mut tx = self.begin_write().await?;
        let rows = q.fetch_all(&mut *tx).await.map_err(store_error)?;
        tx.commit().await.map_err(store_error)?;
        rows.iter().map(decode).collect()
    }

    async fn release_expiry_notice_tx(
        &self,
        kind: NoticeKind,
        id: &str,
        at: DateTime<Utc>,
    ) -> Result<bool, StoreError> {
        let q = sqlx::query(self.inner.sql.release(kind))
            .bind(id)
            .bind(micros(at));
        let mut tx = self.begin_write().await?;
        let done = q.execute(&mut *tx).await.map_err(store_error)?;
        tx.commit().await.map_err(store_error)?;
        Ok(done.rows_affected() > 0)
    }
}
