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
//!
//! Times are kept to the microsecond (like PostgreSQL's `timestamptz`): a record read back has its
//! times truncated to whole microseconds.
//!
//! # Connections
//!
//! The file is opened in WAL mode with `synchronous = NORMAL`: readers never wait for the writer.
//! Writes go through one connection, so they never conflict with each other; reads through a small
//! pool of read-only connections. Another process may open the same file (SQLite's locks and a
//! 5 s busy timeout keep it consistent), but it will not hear this one's changes: its caches see
//! them when their TTL runs out.
//!
//! # Change feed
//!
//! A change made through the store ([`update`](TokenStore::update),
//! [`rotate`](TokenStore::rotate), [`revoke`](TokenStore::revoke),
//! [`delete`](TokenStore::delete)) is published to the caches subscribed to it before the call
//! returns, as [`MemoryStore`](super::MemoryStore) does.
//!
//! # Concurrent writes
//!
//! [`update`](TokenStore::update) and [`rotate`](TokenStore::rotate) run in one `BEGIN
//! IMMEDIATE` transaction: it takes the database's write lock (waiting for another process's
//! writer, up to the busy timeout), reads and checks the record, and writes it with one
//! conditional `UPDATE`. A revocation by another process therefore lands either before (the
//! write is refused with [`StoreError::Revoked`]) or after (and stays): it is never undone.
//!
//! # Failure
//!
//! A failed query is a [`StoreError::Backend`]; the layer answers a cache miss it could not look
//! up with 503 and keeps serving cached tokens for `stale_if_error`.

use std::path::Path;
use std::sync::{Arc, Weak};
use std::time::Duration;

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use sqlx::sqlite::{
    SqliteArguments, SqliteConnectOptions, SqliteJournalMode, SqlitePool, SqlitePoolOptions,
    SqliteRow, SqliteSynchronous,
};
use sqlx::{Row, Sqlite};

use super::sql::{
    self, Dialect, Migration, Param, RawRecord, Statements, TABLE, scope_strings, store_error,
    to_strings,
};
use super::write::check_writable;
use super::{
    ChangeHub, ChangeListener, ListQuery, Page, Rotation, StoreError, TokenLookup, TokenPatch,
    TokenStore,
};
use crate::record::UsageUpdate;
use crate::record::{TokenRecord, merge_usage};
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
];

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
}

impl SqliteStore {
    /// Opens (creating it if missing) the database file at `path` and applies the migrations.
    pub async fn open(path: impl AsRef<Path>) -> Result<Self, StoreError> {
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
        let reader = SqlitePoolOptions::new()
            .max_connections(4)
            .connect_with(base.read_only(true))
            .await
            .map_err(store_error)?;
        Ok(Self::from_pools(reader, writer))
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
            }),
        }
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
        tx: sqlx::Transaction<'static, Sqlite>,
        old: &TokenRecord,
        row: Option<SqliteRow>,
    ) -> Result<TokenRecord, StoreError> {
        let new = decode(row.as_ref().ok_or(StoreError::Stale)?)?;
        tx.commit().await.map_err(store_error)?;
        self.inner.hub.announce(old);
        Ok(new)
    }

    /// Runs a statement that changes one record and returns it (its hashes unchanged), and
    /// announces the change.
    async fn change_returning(&self, q: Query<'_>) -> Result<Option<TokenRecord>, StoreError> {
        let row = q
            .fetch_optional(&self.inner.writer)
            .await
            .map_err(store_error)?;
        let record = row.as_ref().map(decode).transpose()?;
        if let Some(r) = &record {
            self.inner.hub.announce(r);
        }
        Ok(record)
    }
}

/// Applies the pending migrations in one transaction.
async fn migrate(pool: &SqlitePool) -> Result<(), StoreError> {
    let mut tx = pool
        .begin_with("BEGIN IMMEDIATE")
        .await
        .map_err(store_error)?;
    sqlx::raw_sql(
        "CREATE TABLE IF NOT EXISTS tower_pat_schema_version (
            version INTEGER NOT NULL PRIMARY KEY,
            applied_at INTEGER NOT NULL
        )",
    )
    .execute(&mut *tx)
    .await
    .map_err(store_error)?;
    let current: i64 =
        sqlx::query_scalar("SELECT COALESCE(MAX(version), 0) FROM tower_pat_schema_version")
            .fetch_one(&mut *tx)
            .await
            .map_err(store_error)?;
    for m in sql::pending(MIGRATIONS, current)? {
        sqlx::raw_sql(m.sql)
            .execute(&mut *tx)
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

/// Binds `?1`–`?17`: every column but the usage ones.
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
        .bind(sql::db_version(r.version)?))
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
    async fn find_by_hash(&self, hash: &TokenHash) -> Result<Option<TokenRecord>, StoreError> {
        let rows = sqlx::query(&self.inner.sql.find_by_hash)
            .bind(hash.as_bytes().as_slice())
            .fetch_all(&self.inner.reader)
            .await
            .map_err(store_error)?;
        sql::matching(&rows, decode, hash)
    }

    async fn record_usage(&self, updates: &[UsageUpdate]) -> Result<(), StoreError> {
        if updates.is_empty() {
            return Ok(());
        }
        let mut tx = self.inner.writer.begin().await.map_err(store_error)?;
        for u in updates {
            let row = sqlx::query(&format!(
                "SELECT last_used_at, last_used_ips FROM {TABLE} WHERE id = ?1"
            ))
            .bind(&u.token_id)
            .fetch_optional(&mut *tx)
            .await
            .map_err(store_error)?;
            let Some(row) = row else { continue };
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
            .execute(&mut *tx)
            .await
            .map_err(store_error)?;
        }
        tx.commit().await.map_err(store_error)
    }

    fn subscribe(&self, listener: Weak<dyn ChangeListener>) -> bool {
        self.inner.hub.subscribe(listener);
        true
    }
}

#[async_trait]
impl TokenStore for SqliteStore {
    async fn insert(&self, record: &TokenRecord) -> Result<(), StoreError> {
        bind_record(sqlx::query(&self.inner.sql.insert), record)?
            .bind(record.last_used_at.map(micros))
            .bind(to_strings(&record.last_used_ips).join(" "))
            .execute(&self.inner.writer)
            .await
            .map_err(store_error)?;
        Ok(())
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

    async fn update(&self, id: &str, patch: &TokenPatch) -> Result<TokenRecord, StoreError> {
        let mut tx = self.begin_write().await?;
        let old = locked(&mut tx, &self.inner.sql, id).await?;
        let old = check_writable(old.as_ref(), patch.if_version, None)?;
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
            .fetch_optional(&mut *tx)
            .await
            .map_err(store_error)?;
        self.commit_write(tx, old, row).await
    }

    async fn rotate(&self, id: &str, rotation: &Rotation) -> Result<TokenRecord, StoreError> {
        let mut tx = self.begin_write().await?;
        let old = locked(&mut tx, &self.inner.sql, id).await?;
        let old = check_writable(old.as_ref(), rotation.if_version, Some(&rotation.old_hash))?;
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
        self.commit_write(tx, old, row).await
    }

    async fn revoke(&self, id: &str, at: DateTime<Utc>) -> Result<Option<TokenRecord>, StoreError> {
        let q = sqlx::query(&self.inner.sql.revoke)
            .bind(id)
            .bind(micros(at));
        self.change_returning(q).await
    }

    async fn delete(&self, id: &str) -> Result<Option<TokenRecord>, StoreError> {
        self.change_returning(sqlx::query(&self.inner.sql.delete).bind(id))
            .await
    }

    async fn count_by_subject(&self, subject: &str) -> Result<u64, StoreError> {
        let n: i64 = sqlx::query_scalar(&self.inner.sql.count_by_subject)
            .bind(subject)
            .fetch_one(&self.inner.reader)
            .await
            .map_err(store_error)?;
        Ok(u64::try_from(n).unwrap_or(0))
    }
}
