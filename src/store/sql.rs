//! What the SQL stores share: the column list, the listing query built from a [`ListQuery`], the
//! decoding of a row into a [`TokenRecord`] and the mapping of database errors to [`StoreError`].

use std::net::IpAddr;

use chrono::{DateTime, SubsecRound, TimeDelta, Utc};

use super::{LastUsedFilter, ListQuery, Page, SortKey, StoreError, TokenState};
use crate::record::{TokenRecord, parse_ip_net};
use crate::scope::ScopeSet;
use crate::token::TokenHash;

/// The table both SQL stores keep their records in.
pub(super) const TABLE: &str = "tower_pat_tokens";

/// The table of superseded secrets: `hash` (primary key), `token_id`, `superseded_at`.
pub(super) const SUPERSEDED: &str = "tower_pat_superseded";

/// The columns every query that returns records selects, in this order.
pub(super) const COLUMNS: &str = "id, subject, name, scopes, token_type, ip_restriction, \
     created_at, updated_at, expires_at, revoked_at, last_used_at, last_used_ips, \
     last_rotated_at, hash, start, previous_hash, previous_hash_until, version, disabled_at";

/// The differences between the SQL dialects that matter to [`list_sql`].
#[derive(Clone, Copy)]
pub(super) enum Dialect {
    #[cfg(feature = "sqlite")]
    Sqlite,
    #[cfg(feature = "postgres")]
    Postgres,
}

impl Dialect {
    /// The `n`th (1-based) bind parameter.
    fn placeholder(self, n: usize) -> String {
        match self {
            #[cfg(feature = "sqlite")]
            Self::Sqlite => format!("?{n}"),
            #[cfg(feature = "postgres")]
            Self::Postgres => format!("${n}"),
        }
    }

    /// A text column compared byte by byte, as Rust compares `String`s.
    fn bytewise(self, column: &str) -> String {
        match self {
            #[cfg(feature = "sqlite")]
            Self::Sqlite => format!("{column} COLLATE BINARY"),
            #[cfg(feature = "postgres")]
            Self::Postgres => format!("{column} COLLATE \"C\""),
        }
    }

    /// Whether `needle` occurs in `haystack`, as `str::contains` decides.
    fn contains(self, haystack: &str, needle: &str) -> String {
        match self {
            #[cfg(feature = "sqlite")]
            Self::Sqlite => format!("instr({haystack}, {needle}) > 0"),
            #[cfg(feature = "postgres")]
            Self::Postgres => format!("strpos({haystack}, {needle}) > 0"),
        }
    }
}

/// The columns the stores' `bind_record` binds, in this order, as parameters 1 to 18: every column
/// but the usage ones. An insert binds `last_used_at` and `last_used_ips` as 19 and 20.
const WRITTEN: [&str; 18] = [
    "id",
    "subject",
    "name",
    "name_lower",
    "scopes",
    "token_type",
    "ip_restriction",
    "created_at",
    "updated_at",
    "expires_at",
    "revoked_at",
    "last_rotated_at",
    "hash",
    "start",
    "previous_hash",
    "previous_hash_until",
    "version",
    "disabled_at",
];

/// The fixed statements of a store, in its dialect.
///
/// The management writes run in one transaction that holds the record's row (PostgreSQL:
/// [`get_for_update`](Self::get_for_update); SQLite: `BEGIN IMMEDIATE`, which holds the
/// database's write lock), checks it with [`check_writable`](super::write::check_writable), and
/// writes with [`patch`](Self::patch) or [`rotate`](Self::rotate). Those statements carry the same
/// conditions in their `WHERE` clause (the version read, not revoked, the hash replaced), so a
/// write never applies to a row other than the one checked, and they change only the columns they
/// name: nothing but a rotation writes `hash` or `previous_hash`, and nothing clears `revoked_at`.
#[derive(Debug)]
pub(super) struct Statements {
    /// `$1` = hash: the records whose current or previous hash it is.
    pub(super) find_by_hash: String,
    /// `$1` = id.
    pub(super) get: String,
    /// `$1` = id, locking the row until the end of the transaction where the dialect can.
    pub(super) get_for_update: String,
    /// Parameters 1–18 as `WRITTEN`, then `last_used_at`, `last_used_ips`.
    pub(super) insert: String,
    /// `$1` = id, `$2` = the version checked; `$3` name, `$4` its lowercase form, `$5` scopes,
    /// `$6` whether to set the expiry, `$7` the expiry, `$8` the IP restriction, each `NULL` to
    /// keep; `$9` = the time; `$10` whether to set `disabled_at`, `$11` its value. Returns the
    /// record, or nothing if the condition failed.
    pub(super) patch: String,
    /// `$1` = id, `$2` = the version checked, `$3` = the hash replaced; `$4` the new hash, `$5`
    /// its start, `$6` and `$7` the grace hash and its end (or `NULL`s), `$8` the time, `$9`
    /// whether to set the expiry, `$10` the expiry. Returns the record, or nothing if the
    /// condition failed.
    pub(super) rotate: String,
    /// `$1` = id, `$2` = time, `$3` = the version checked or `NULL` for none: revokes unless
    /// revoked (then bumping the version), returns the record; nothing if a version was given and
    /// the record, not revoked, has another.
    pub(super) revoke: String,
    /// `$1` = id, `$2` = the version checked or `NULL` for none: returns the deleted record;
    /// nothing if it has another version.
    pub(super) delete: String,
    /// `$1` = subject.
    pub(super) count_by_subject: String,
    /// `$1` = the cutoff (rounded up to the microsecond: [`ceil_micros`]), `$2` = the most
    /// records to remove: deletes records revoked or expired before the cutoff
    /// ([`TokenRecord::is_purgeable`]) and returns them. The condition is stated twice, in the
    /// subselect that picks the batch and on the row deleted, so a row changed in between is
    /// kept; PostgreSQL locks the batch `FOR UPDATE SKIP LOCKED`, so that purges on two nodes
    /// never pick the same row and a row another transaction holds is left for the next batch.
    pub(super) purge: String,
    /// `$1` = the claim's time, `$2` = it truncated to the microsecond, `$3` = the horizon
    /// (`at + lead`, truncated), `$4` = the most records to claim: stamps `expiring_notice_at`
    /// on records not revoked, expiring in `($2, $3]`, not yet claimed, and returns them. Like
    /// [`purge`](Self::purge), the condition is stated in the subselect and on the row written,
    /// and PostgreSQL locks the batch `FOR UPDATE SKIP LOCKED`.
    pub(super) claim_expiring: String,
    /// `$1` = the claim's time, `$2` = it truncated, `$3` = the most records to claim: stamps
    /// `expired_notice_at` on records not revoked, expired at `$2`, not yet claimed.
    pub(super) claim_expired: String,
    /// `$1` = token id, `$2` = the claim's time, truncated: clears `expiring_notice_at` if it
    /// is that claim's ([`TokenStore::release_expiry_notice`](crate::TokenStore::release_expiry_notice)).
    pub(super) release_expiring: String,
    /// The same for `expired_notice_at`.
    pub(super) release_expired: String,
    /// `$1` = hash, `$2` = the retention cutoff: the record the superseded secret belonged to,
    /// with `superseded_at`.
    pub(super) find_superseded: String,
    /// `$1` = hash, `$2` = token id, `$3` = when it stopped working: records a superseded
    /// secret, keeping the earlier time if it is known already.
    pub(super) supersede: String,
    /// `$1` = token id, `$2` = how many to keep, `$3` = the retention cutoff: drops the token's
    /// history beyond its newest `$2` entries and before the cutoff, and a bounded batch of
    /// every token's entries before the cutoff.
    pub(super) prune_superseded: String,
}

impl Statements {
    pub(super) fn new(d: Dialect) -> Self {
        let p = |n: usize| d.placeholder(n);
        let insert_cols = WRITTEN.join(", ") + ", last_used_at, last_used_ips";
        let insert_vals: Vec<String> = (1..=WRITTEN.len() + 2).map(p).collect();
        let get = format!("SELECT {COLUMNS} FROM {TABLE} WHERE id = {}", p(1));
        // The row checked, still writable.
        let checked = format!(
            "id = {} AND version = {} AND revoked_at IS NULL",
            p(1),
            p(2)
        );
        let qualified: Vec<String> = COLUMNS.split(", ").map(|c| format!("t.{c}")).collect();
        let least = match d {
            #[cfg(feature = "sqlite")]
            Dialect::Sqlite => "MIN",
            #[cfg(feature = "postgres")]
            Dialect::Postgres => "LEAST",
        };
        Self {
            find_superseded: format!(
                "SELECT {}, s.superseded_at AS superseded_at FROM {SUPERSEDED} s \
                 JOIN {TABLE} t ON t.id = s.token_id \
                 WHERE s.hash = {} AND s.superseded_at >= {}",
                qualified.join(", "),
                p(1),
                p(2)
            ),
            supersede: format!(
                "INSERT INTO {SUPERSEDED} (hash, token_id, superseded_at) VALUES ({}, {}, {}) \
                 ON CONFLICT (hash) DO UPDATE SET superseded_at = \
                 {least}({SUPERSEDED}.superseded_at, excluded.superseded_at)",
                p(1),
                p(2),
                p(3)
            ),
            prune_superseded: {
                let (id, keep, cutoff) = (p(1), p(2), p(3));
                // Other tokens' old entries: rows another rotation holds are left to it (no
                // waiting, so two rotations pruning at once never deadlock).
                let skip = match d {
                    #[cfg(feature = "sqlite")]
                    Dialect::Sqlite => "",
                    #[cfg(feature = "postgres")]
                    Dialect::Postgres => " FOR UPDATE SKIP LOCKED",
                };
                format!(
                    "DELETE FROM {SUPERSEDED} WHERE (token_id = {id} AND (superseded_at < {cutoff} \
                     OR hash NOT IN (SELECT hash FROM {SUPERSEDED} WHERE token_id = {id} \
                     ORDER BY superseded_at DESC, hash LIMIT {keep}))) \
                     OR hash IN (SELECT hash FROM {SUPERSEDED} WHERE superseded_at < {cutoff} \
                     LIMIT 100{skip})"
                )
            },
            find_by_hash: format!(
                "SELECT {COLUMNS} FROM {TABLE} WHERE hash = {0} OR previous_hash = {0}",
                p(1)
            ),
            get_for_update: match d {
                #[cfg(feature = "sqlite")]
                Dialect::Sqlite => get.clone(),
                #[cfg(feature = "postgres")]
                Dialect::Postgres => format!("{get} FOR UPDATE"),
            },
            get,
            insert: format!(
                "INSERT INTO {TABLE} ({insert_cols}) VALUES ({})",
                insert_vals.join(", ")
            ),
            patch: {
                let [
                    name,
                    lower,
                    scopes,
                    set_expiry,
                    expiry,
                    nets,
                    at,
                    set_disabled,
                    disabled,
                ] = [3, 4, 5, 6, 7, 8, 9, 10, 11].map(p);
                let reset_notices = reset_notices(&set_expiry, &expiry);
                format!(
                    "UPDATE {TABLE} SET \
                     name = COALESCE({name}, name), \
                     name_lower = COALESCE({lower}, name_lower), \
                     scopes = COALESCE({scopes}, scopes), \
                     expires_at = CASE WHEN {set_expiry} THEN {expiry} ELSE expires_at END, \
                     {reset_notices}\
                     ip_restriction = COALESCE({nets}, ip_restriction), \
                     disabled_at = CASE WHEN {set_disabled} THEN {disabled} ELSE disabled_at END, \
                     updated_at = {at}, \
                     version = version + 1 \
                     WHERE {checked} RETURNING {COLUMNS}"
                )
            },
            rotate: {
                let [old, hash, start, grace, grace_until, at, set_expiry, expiry] =
                    [3, 4, 5, 6, 7, 8, 9, 10].map(p);
                let reset_notices = reset_notices(&set_expiry, &expiry);
                format!(
                    "UPDATE {TABLE} SET \
                     hash = {hash}, \
                     start = {start}, \
                     previous_hash = {grace}, \
                     previous_hash_until = {grace_until}, \
                     last_rotated_at = {at}, \
                     updated_at = {at}, \
                     expires_at = CASE WHEN {set_expiry} THEN {expiry} ELSE expires_at END, \
                     {reset_notices}\
                     version = version + 1 \
                     WHERE {checked} AND hash = {old} RETURNING {COLUMNS}"
                )
            },
            revoke: format!(
                "UPDATE {TABLE} SET revoked_at = COALESCE(revoked_at, {1}), \
                 updated_at = CASE WHEN revoked_at IS NULL THEN {1} ELSE updated_at END, \
                 version = CASE WHEN revoked_at IS NULL THEN version + 1 ELSE version END \
                 WHERE id = {0} AND (revoked_at IS NOT NULL OR CAST({2} AS BIGINT) IS NULL \
                 OR version = CAST({2} AS BIGINT)) RETURNING {COLUMNS}",
                p(1),
                p(2),
                p(3)
            ),
            delete: format!(
                "DELETE FROM {TABLE} WHERE id = {0} AND (CAST({1} AS BIGINT) IS NULL \
                 OR version = CAST({1} AS BIGINT)) RETURNING {COLUMNS}",
                p(1),
                p(2)
            ),
            count_by_subject: format!("SELECT COUNT(*) FROM {TABLE} WHERE subject = {}", p(1)),
            purge: {
                let (cutoff, limit) = (p(1), p(2));
                let purgeable = format!("(revoked_at < {cutoff} OR expires_at < {cutoff})");
                let lock = match d {
                    #[cfg(feature = "sqlite")]
                    Dialect::Sqlite => "",
                    #[cfg(feature = "postgres")]
                    Dialect::Postgres => " FOR UPDATE SKIP LOCKED",
                };
                format!(
                    "DELETE FROM {TABLE} WHERE id IN \
                     (SELECT id FROM {TABLE} WHERE {purgeable} LIMIT {limit}{lock}) \
                     AND {purgeable} RETURNING {COLUMNS}"
                )
            },
            claim_expiring: {
                let (stamp, at, horizon, limit) = (p(1), p(2), p(3), p(4));
                let due = format!(
                    "(revoked_at IS NULL AND expiring_notice_at IS NULL \
                     AND expires_at > {at} AND expires_at <= {horizon})"
                );
                claim(d, "expiring_notice_at", &stamp, &due, &limit)
            },
            claim_expired: {
                let (stamp, at, limit) = (p(1), p(2), p(3));
                let due = format!(
                    "(revoked_at IS NULL AND expired_notice_at IS NULL \
                     AND expires_at <= {at})"
                );
                claim(d, "expired_notice_at", &stamp, &due, &limit)
            },
            release_expiring: release("expiring_notice_at", &p(1), &p(2)),
            release_expired: release("expired_notice_at", &p(1), &p(2)),
        }
    }

    /// The release of a `kind` notice claim ([`release_expiring`](Self::release_expiring) or
    /// [`release_expired`](Self::release_expired)).
    pub(super) fn release(&self, kind: super::NoticeKind) -> &str {
        match kind {
            super::NoticeKind::Expiring => &self.release_expiring,
            super::NoticeKind::Expired => &self.release_expired,
        }
    }
}

/// The assignments of a write that clear both expiry-notice claims when it moves the expiry later
/// (`set_expiry` true and `expiry` later than the stored one, no expiry counting as the latest:
/// [`expiry_extended`](super::expiry_extended)), so that the new expiry is noticed again. Both
/// columns are assigned from the row as it was before the write.
fn reset_notices(set_expiry: &str, expiry: &str) -> String {
    let changed = format!(
        "{set_expiry} AND expires_at IS NOT NULL AND ({expiry} IS NULL OR {expiry} > expires_at)"
    );
    format!(
        "expiring_notice_at = CASE WHEN {changed} THEN NULL ELSE expiring_notice_at END, \
         expired_notice_at = CASE WHEN {changed} THEN NULL ELSE expired_notice_at END, "
    )
}

/// A claim of one notice `column` at `stamp` on at most `limit` rows meeting `due`, soonest
/// expiry first: the condition checked again on the row written, the batch locked
/// `FOR UPDATE SKIP LOCKED` in PostgreSQL, so that concurrent claims never return one row twice.
///
/// The batch is picked once, in a materialized common table expression: PostgreSQL may run a
/// subselect of `IN` again for each row it joins, which with `SKIP LOCKED` picks more than
/// `limit` rows in all.
fn claim(d: Dialect, column: &str, stamp: &str, due: &str, limit: &str) -> String {
    let (materialized, lock) = match d {
        #[cfg(feature = "sqlite")]
        Dialect::Sqlite => ("", ""),
        #[cfg(feature = "postgres")]
        Dialect::Postgres => ("MATERIALIZED ", " FOR UPDATE SKIP LOCKED"),
    };
    format!(
        "WITH batch AS {materialized}\
         (SELECT id FROM {TABLE} WHERE {due} ORDER BY expires_at, id LIMIT {limit}{lock}) \
         UPDATE {TABLE} SET {column} = {stamp} WHERE id IN (SELECT id FROM batch) \
         AND {due} RETURNING {COLUMNS}"
    )
}

/// The release of the notice claim in `column` of the row `id`, made at `stamp`.
fn release(column: &str, id: &str, stamp: &str) -> String {
    format!("UPDATE {TABLE} SET {column} = NULL WHERE id = {id} AND {column} = {stamp}")
}

/// A value bound to the listing query.
pub(super) enum Param {
    Text(String),
    Time(DateTime<Utc>),
}

/// The parts of a listing query: `SELECT … WHERE {filter} ORDER BY {order} {page}`.
pub(super) struct ListSql {
    pub(super) filter: String,
    pub(super) order: String,
    pub(super) page: String,
    pub(super) params: Vec<Param>,
}

impl ListSql {
    /// The statement counting every match.
    pub(super) fn count(&self) -> String {
        format!("SELECT COUNT(*) FROM {TABLE} WHERE {}", self.filter)
    }

    /// The statement returning the page.
    pub(super) fn items(&self) -> String {
        format!(
            "SELECT {COLUMNS} FROM {TABLE} WHERE {} ORDER BY {} {}",
            self.filter, self.order, self.page
        )
    }
}

/// The SQL form of [`ListQuery::matches`] and [`ListQuery::compare`], with the same results: the
/// name search runs on a `name_lower` column the store fills with [`str::to_lowercase`], names and
/// ids sort byte by byte, and `NULL`s sort where `None` does.
pub(super) fn list_sql(query: &ListQuery, dialect: Dialect) -> ListSql {
    let mut filter = Vec::new();
    let mut params = Vec::new();
    let mut bind = |p: Param| {
        params.push(p);
        dialect.placeholder(params.len())
    };
    if let Some(subject) = &query.subject {
        filter.push(format!("subject = {}", bind(Param::Text(subject.clone()))));
    }
    if let Some(search) = &query.search {
        let needle = bind(Param::Text(search.to_lowercase()));
        filter.push(dialect.contains("name_lower", &needle));
    }
    match query.last_used {
        LastUsedFilter::Any => {}
        LastUsedFilter::Never => filter.push("last_used_at IS NULL".to_owned()),
        LastUsedFilter::Before(t) => {
            // Stored times have microsecond precision: `u < t` is `u < ceil(t)` for them.
            let t = bind(Param::Time(ceil_micros(t)));
            filter.push(format!("(last_used_at IS NULL OR last_used_at < {t})"));
        }
    }
    // Stored times have microsecond precision: `u > t` is `u > floor(t)` for them.
    if let Some(t) = query.last_used_after {
        let t = bind(Param::Time(crate::record::micros(t)));
        filter.push(format!("last_used_at > {t}"));
    }
    if let Some(t) = query.created_after {
        let t = bind(Param::Time(crate::record::micros(t)));
        filter.push(format!("created_at > {t}"));
    }
    if let Some(t) = query.created_before {
        let t = bind(Param::Time(ceil_micros(t)));
        filter.push(format!("created_at < {t}"));
    }
    if let Some(f) = query.state {
        // `expires_at <= at` is `expires_at < floor(at) + 1µs`, i.e. `expires_at <= floor(at)`.
        let at = bind(Param::Time(crate::record::micros(f.at)));
        filter.push(match f.state {
            TokenState::Revoked => "revoked_at IS NOT NULL".to_owned(),
            TokenState::Disabled => "(revoked_at IS NULL AND disabled_at IS NOT NULL)".to_owned(),
            TokenState::Expired => format!(
                "(revoked_at IS NULL AND disabled_at IS NULL AND expires_at IS NOT NULL \
                 AND expires_at <= {at})"
            ),
            TokenState::Active => format!(
                "(revoked_at IS NULL AND disabled_at IS NULL \
                 AND (expires_at IS NULL OR expires_at > {at}))"
            ),
        });
    }
    let filter = if filter.is_empty() {
        "1 = 1".to_owned()
    } else {
        filter.join(" AND ")
    };

    // `None` sorts first by last use and last by expiry, ascending; `descending` flips it all.
    let (key, nulls_first) = match query.sort {
        SortKey::CreatedAt => ("created_at".to_owned(), None),
        SortKey::Name => (dialect.bytewise("name"), None),
        SortKey::LastUsedAt => ("last_used_at".to_owned(), Some(true)),
        SortKey::ExpiresAt => ("expires_at".to_owned(), Some(false)),
    };
    let dir = if query.descending { "DESC" } else { "ASC" };
    let nulls = match nulls_first.map(|first| first != query.descending) {
        None => "",
        Some(true) => " NULLS FIRST",
        Some(false) => " NULLS LAST",
    };
    let order = format!("{key} {dir}{nulls}, {} {dir}", dialect.bytewise("id"));
    let page = format!(
        "LIMIT {} OFFSET {}",
        i64::try_from(query.limit).unwrap_or(i64::MAX),
        i64::try_from(query.offset).unwrap_or(i64::MAX)
    );
    ListSql {
        filter,
        order,
        page,
        params,
    }
}

/// A statement with its arguments, in a database's types.
pub(super) type Query<'q, DB> = sqlx::query::Query<'q, DB, <DB as sqlx::Database>::Arguments<'q>>;

/// Runs `work` (one or more transactions, from their `BEGIN` to their commit or rollback, and
/// what must follow a commit, such as announcing the change here) in a task of its own, which
/// the caller awaits: dropping the caller's future (a client hanging up, a timeout) cannot stop
/// it half way. sqlx 0.8.6 leaves a connection inside a transaction when the future awaiting its
/// `BEGIN` is dropped at the wrong moment (sqlx issues #4393 and #4385: the rollback guard does
/// nothing before the transaction depth is raised, and the pool's release check does not look
/// at the transaction status), and the pool hands that connection out again: a PostgreSQL
/// connection left in a `REPEATABLE READ` listing's snapshot then answers every later lookup
/// from that snapshot (a token revoked since reads as active), and one left in a write's
/// transaction runs later statements inside it, unseen by other connections and holding its
/// locks. A panic in the task is returned as a [`StoreError::Backend`].
pub(super) async fn in_task<T, F>(work: F) -> Result<T, StoreError>
where
    F: std::future::Future<Output = Result<T, StoreError>> + Send + 'static,
    T: Send + 'static,
{
    match tokio::spawn(work).await {
        Ok(result) => result,
        Err(e) => Err(StoreError::backend(std::io::Error::other(format!(
            "a store transaction's task failed: {e}"
        )))),
    }
}

/// A listing: the total and the page, in one transaction opened with `begin` (one snapshot for
/// both). `bind` binds [`ListSql::params`] in the store's types; `decode` reads a record.
pub(super) async fn list_page<DB: sqlx::Database>(
    pool: &sqlx::Pool<DB>,
    begin: &'static str,
    query: &ListQuery,
    dialect: Dialect,
    bind: for<'q> fn(Query<'q, DB>, &[Param]) -> Query<'q, DB>,
    decode: fn(&DB::Row) -> Result<TokenRecord, StoreError>,
) -> Result<Page, StoreError>
where
    for<'c> &'c mut DB::Connection: sqlx::Executor<'c, Database = DB>,
    for<'q> DB::Arguments<'q>: sqlx::IntoArguments<'q, DB>,
    i64: sqlx::Type<DB> + for<'r> sqlx::Decode<'r, DB>,
    usize: sqlx::ColumnIndex<DB::Row>,
{
    use sqlx::Row;
    let l = list_sql(query, dialect);
    let (count, items) = (l.count(), l.items());
    let mut tx = pool.begin_with(begin).await.map_err(store_error)?;
    let total: i64 = bind(sqlx::query(&count), &l.params)
        .fetch_one(&mut *tx)
        .await
        .and_then(|row| row.try_get(0))
        .map_err(store_error)?;
    let rows = bind(sqlx::query(&items), &l.params)
        .fetch_all(&mut *tx)
        .await
        .map_err(store_error)?;
    tx.commit().await.map_err(store_error)?;
    Ok(Page {
        items: rows.iter().map(decode).collect::<Result<_, _>>()?,
        total: u64::try_from(total).unwrap_or(0),
    })
}

/// The smallest microsecond-precision time not before `t`: for a stored time `u`, `u < t` is
/// `u < ceil_micros(t)`.
pub(super) fn ceil_micros(t: DateTime<Utc>) -> DateTime<Utc> {
    let down = t.trunc_subsecs(6);
    if down < t {
        down + TimeDelta::microseconds(1)
    } else {
        down
    }
}

/// A stored row in database-neutral types, before validation.
pub(super) struct RawRecord {
    pub(super) id: String,
    pub(super) subject: String,
    pub(super) name: String,
    pub(super) scopes: Vec<String>,
    pub(super) token_type: String,
    pub(super) ip_restriction: Vec<String>,
    pub(super) created_at: DateTime<Utc>,
    pub(super) updated_at: DateTime<Utc>,
    pub(super) expires_at: Option<DateTime<Utc>>,
    pub(super) revoked_at: Option<DateTime<Utc>>,
    pub(super) disabled_at: Option<DateTime<Utc>>,
    pub(super) last_used_at: Option<DateTime<Utc>>,
    pub(super) last_used_ips: Vec<String>,
    pub(super) last_rotated_at: Option<DateTime<Utc>>,
    pub(super) hash: Vec<u8>,
    pub(super) start: String,
    pub(super) previous_hash: Option<Vec<u8>>,
    pub(super) previous_hash_until: Option<DateTime<Utc>>,
    pub(super) version: i64,
}

impl RawRecord {
    /// Validates the row: a corrupt one is a backend error, never a half-read record.
    pub(super) fn into_record(self) -> Result<TokenRecord, StoreError> {
        let corrupt = |what: &str| {
            StoreError::backend(format!("stored token {} has an invalid {what}", self.id))
        };
        let hash = TokenHash::from_slice(&self.hash).ok_or_else(|| corrupt("hash"))?;
        let previous_hash = match (&self.previous_hash, self.previous_hash_until) {
            (Some(h), Some(until)) => Some((
                TokenHash::from_slice(h).ok_or_else(|| corrupt("previous hash"))?,
                until,
            )),
            _ => None,
        };
        let scopes = ScopeSet::parse(&self.scopes).map_err(|_| corrupt("scope"))?;
        let ip_restriction = self
            .ip_restriction
            .iter()
            .map(|s| parse_ip_net(s))
            .collect::<Result<_, _>>()
            .map_err(|_| corrupt("IP restriction"))?;
        let last_used_ips = self
            .last_used_ips
            .iter()
            .map(|s| s.parse::<IpAddr>())
            .collect::<Result<_, _>>()
            .map_err(|_| corrupt("last used address"))?;
        let version = u64::try_from(self.version).map_err(|_| corrupt("version"))?;
        Ok(TokenRecord {
            id: self.id,
            subject: self.subject,
            name: self.name,
            scopes,
            token_type: self.token_type,
            ip_restriction,
            created_at: self.created_at,
            updated_at: self.updated_at,
            expires_at: self.expires_at,
            revoked_at: self.revoked_at,
            disabled_at: self.disabled_at,
            last_used_at: self.last_used_at,
            last_used_ips,
            last_rotated_at: self.last_rotated_at,
            hash,
            start: self.start,
            previous_hash,
            version,
        })
    }
}

/// The scope strings of a set, as stored.
pub(super) fn scope_strings(scopes: &ScopeSet) -> Vec<String> {
    scopes.iter().map(|s| s.as_str().to_owned()).collect()
}

/// A version as stored (a signed 64-bit integer in both dialects).
pub(super) fn db_version(version: u64) -> Result<i64, StoreError> {
    i64::try_from(version).map_err(|_| StoreError::backend("a token version is out of range"))
}

/// Text forms of addresses or networks, as stored.
pub(super) fn to_strings<T: ToString>(items: &[T]) -> Vec<String> {
    items.iter().map(ToString::to_string).collect()
}

/// The first of the records in `rows` that answers to `hash` now
/// ([`TokenRecord::matches_hash`]).
pub(super) fn matching<R>(
    rows: &[R],
    decode: fn(&R) -> Result<TokenRecord, StoreError>,
    hash: &TokenHash,
) -> Result<Option<TokenRecord>, StoreError> {
    let now = Utc::now();
    for row in rows {
        let record = decode(row)?;
        if record.matches_hash(hash, now) {
            return Ok(Some(record));
        }
    }
    Ok(None)
}

/// A database error as a [`StoreError`]: a unique violation names the field (`id`, `hash`, or
/// `name` for the subject + name pair), anything else is a backend error.
pub(super) fn store_error(err: sqlx::Error) -> StoreError {
    if let sqlx::Error::Database(db) = &err
        && db.is_unique_violation()
    {
        // PostgreSQL names the constraint; SQLite names the columns in the message.
        let what = db.constraint().unwrap_or_else(|| db.message());
        let field = if what.contains("subject") {
            "name"
        } else if what.contains("hash") {
            "hash"
        } else {
            "id"
        };
        return StoreError::Conflict { field };
    }
    StoreError::backend(err)
}

/// A schema migration: its version and the statements that bring the schema to it.
pub(super) struct Migration {
    pub(super) version: i64,
    pub(super) sql: &'static str,
}

/// Which of `migrations` a schema at `current` still needs; an error if the schema is newer than
/// this library knows.
pub(super) fn pending(
    migrations: &'static [Migration],
    current: i64,
) -> Result<&'static [Migration], StoreError> {
    let known = migrations.last().map_or(0, |m| m.version);
    if current > known {
        return Err(StoreError::backend(format!(
            "the token schema is at version {current}, newer than this version of tower-pat \
             knows ({known})"
        )));
    }
    let done = migrations
        .iter()
        .take_while(|m| m.version <= current)
        .count();
    Ok(&migrations[done..])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ceil_micros_rounds_up_only_below_a_microsecond() {
        let t = DateTime::from_timestamp(1_700_000_000, 1_500).unwrap();
        assert_eq!(ceil_micros(t).timestamp_subsec_nanos(), 2_000);
        let exact = DateTime::from_timestamp(1_700_000_000, 2_000).unwrap();
        assert_eq!(ceil_micros(exact), exact);
    }
}
