//! Where tokens live: the read path the layer needs ([`TokenLookup`]), the management operations
//! ([`TokenStore`]), the change feed that keeps every cache honest ([`ChangeHub`]), and the stores.
//!
//! The stores: [`MemoryStore`] (tests, ephemeral setups), `SqliteStore` (module `sqlite`, feature
//! `sqlite`, the durable default: one file) and `PostgresStore` (module `postgres`, feature
//! `postgres`: many nodes over one database, changes broadcast with `LISTEN`/`NOTIFY`). Their
//! module docs give the schema, the change feed and the failure behaviour.
//!
//! Bring your own database by implementing [`TokenLookup`] (and [`TokenStore`] for the management
//! API). A store error is never read as "invalid token": a cache miss whose lookup fails is
//! answered 503.

#[cfg(feature = "test-util")]
pub mod conformance;
mod memory;
#[cfg(feature = "postgres")]
pub mod postgres;
#[cfg(any(feature = "sqlite", feature = "postgres"))]
mod sql;
#[cfg(feature = "sqlite")]
pub mod sqlite;
mod write;

use std::fmt;
use std::sync::{RwLock, Weak};

use async_trait::async_trait;
use chrono::{DateTime, Utc};

pub use memory::MemoryStore;
#[cfg(feature = "postgres")]
pub use postgres::{PostgresStore, PostgresStoreBuilder};
#[cfg(feature = "sqlite")]
pub use sqlite::SqliteStore;
/// The `sqlx` version the SQL stores are built on, for building pools and options to hand them.
#[cfg(any(feature = "sqlite", feature = "postgres"))]
pub use sqlx;
pub use write::{CallerGuard, Rotation, TokenPatch};

use crate::record::TokenRecord;
use crate::record::UsageUpdate;
use crate::scope::ScopeSet;
use crate::token::TokenHash;

/// Why a store operation failed.
#[derive(Debug)]
#[non_exhaustive]
pub enum StoreError {
    /// No record has that id.
    NotFound,
    /// A uniqueness rule was broken: `field` is `name` (per subject), `hash` or `id`.
    Conflict {
        /// The field whose value is already taken.
        field: &'static str,
    },
    /// The token is revoked: a management write other than a revocation or a deletion is refused.
    Revoked,
    /// The record changed since the caller read it (another version, or for a rotation another
    /// hash): read it again and retry.
    Stale,
    /// The token has expired, and the write was made on the condition that it had not
    /// ([`TokenPatch::if_unexpired`], [`Rotation::if_unexpired`]).
    Expired,
    /// The token that makes the write (the management API's caller) changed, or is gone, since
    /// its ceilings were checked ([`CallerGuard`]): nothing was written. Send the request again.
    CallerChanged,
    /// The backend failed or could not be reached.
    Backend(Box<dyn std::error::Error + Send + Sync>),
    /// The store does not implement this operation (for example
    /// [`TokenStore::purge`] on a store written before it existed).
    Unsupported {
        /// The operation, such as `purge`.
        operation: &'static str,
    },
}

impl StoreError {
    /// Wraps a backend error.
    pub fn backend(err: impl Into<Box<dyn std::error::Error + Send + Sync>>) -> Self {
        Self::Backend(err.into())
    }

    /// The same error for one more caller of an operation whose result is shared: each variant
    /// as it is, a backend error as its message.
    pub(crate) fn shared(&self) -> Self {
        match self {
            Self::NotFound => Self::NotFound,
            Self::Conflict { field } => Self::Conflict { field },
            Self::Revoked => Self::Revoked,
            Self::Stale => Self::Stale,
            Self::Expired => Self::Expired,
            Self::CallerChanged => Self::CallerChanged,
            Self::Backend(e) => Self::backend(e.to_string()),
            Self::Unsupported { operation } => Self::Unsupported { operation },
        }
    }
}

impl fmt::Display for StoreError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::NotFound => f.write_str("no such token"),
            Self::Conflict { field } => write!(f, "a token with this {field} already exists"),
            Self::Revoked => f.write_str("the token is revoked; it cannot be changed"),
            Self::Stale => f.write_str("the token changed meanwhile: read it again and retry"),
            Self::Expired => f.write_str("the token has expired; it cannot be changed so"),
            Self::CallerChanged => {
                f.write_str("the token making the change changed meanwhile: retry")
            }
            Self::Backend(e) => write!(f, "token store unavailable: {e}"),
            Self::Unsupported { operation } => {
                write!(f, "this token store does not support {operation}")
            }
        }
    }
}

impl std::error::Error for StoreError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            Self::Backend(e) => Some(&**e),
            _ => None,
        }
    }
}

/// What changed in a store, as seen by the caches that listen to it.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum StoreEvent {
    /// The record with this id and (previous) hash changed: revoked, deleted, rotated or updated.
    /// Caches drop what they hold for it.
    Changed {
        /// The record's id.
        id: String,
        /// The hash the record had before the change.
        hash: TokenHash,
    },
    /// The feed lost its connection: changes made elsewhere may be missed until
    /// [`StoreEvent::Reconnected`].
    Disconnected,
    /// The feed is back. Everything cached before the matching [`StoreEvent::Disconnected`] must be
    /// reloaded, since a change may have been missed in between.
    Reconnected,
}

/// Something that wants store events: the verification cache implements it.
pub trait ChangeListener: Send + Sync {
    /// Called for every event, synchronously, from the thread that publishes it. Keep it short.
    fn on_event(&self, event: &StoreEvent);
}

/// A synchronous fan-out of [`StoreEvent`]s to weakly held listeners. Stores embed one: a change
/// made through this process's store reaches this process's caches before the call returns.
#[derive(Default)]
pub struct ChangeHub {
    listeners: RwLock<Vec<Weak<dyn ChangeListener>>>,
}

impl fmt::Debug for ChangeHub {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let n = self.listeners.read().map_or(0, |l| l.len());
        f.debug_struct("ChangeHub").field("listeners", &n).finish()
    }
}

impl ChangeHub {
    /// An empty hub.
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds a listener; it is dropped from the hub once its last strong reference is gone.
    pub fn subscribe(&self, listener: Weak<dyn ChangeListener>) {
        let mut l = self.listeners.write().unwrap_or_else(|e| e.into_inner());
        l.retain(|w| w.strong_count() > 0);
        l.push(listener);
    }

    /// Delivers `event` to every live listener. A listener that panics is logged and passed
    /// over: the others still get the event, and the store's feed task that publishes it goes on
    /// (a panic through it would end the feed while the store still read as connected).
    pub fn publish(&self, event: &StoreEvent) {
        let listeners = self.listeners.read().unwrap_or_else(|e| e.into_inner());
        for listener in listeners.iter().filter_map(Weak::upgrade) {
            let delivered = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                listener.on_event(event);
            }));
            if delivered.is_err() {
                tracing::error!(
                    target: "tower_pat::store",
                    "a store event listener panicked; the event still goes to the others"
                );
            }
        }
    }

    /// Publishes [`StoreEvent::Changed`] for a record.
    pub fn changed(&self, id: &str, hash: TokenHash) {
        self.publish(&StoreEvent::Changed {
            id: id.to_owned(),
            hash,
        });
    }

    /// Publishes [`StoreEvent::Changed`] for every hash a record answered to before a change: its
    /// hash and, during a rotation grace period, its previous hash.
    pub fn announce(&self, old: &TokenRecord) {
        self.changed(&old.id, old.hash);
        if let Some((h, _)) = old.previous_hash {
            self.changed(&old.id, h);
        }
    }
}

/// Held by a store's change feed task: when the task ends while its store lives (its future
/// dropped by a panic, or by the runtime that ran it shutting down), `ended` marks the feed
/// down, so that the caches stop serving on trust and `max_staleness` counts, instead of a dead
/// feed reading as connected. A task that returns because its store is gone does nothing.
#[cfg(any(feature = "sqlite", feature = "postgres"))]
pub(crate) struct FeedTaskGuard<T> {
    store: Weak<T>,
    ended: fn(&T),
}

#[cfg(any(feature = "sqlite", feature = "postgres"))]
impl<T> FeedTaskGuard<T> {
    pub(crate) fn new(store: Weak<T>, ended: fn(&T)) -> Self {
        Self { store, ended }
    }
}

#[cfg(any(feature = "sqlite", feature = "postgres"))]
impl<T> Drop for FeedTaskGuard<T> {
    fn drop(&mut self) {
        if let Some(store) = self.store.upgrade() {
            if std::thread::panicking() {
                tracing::error!(
                    target: "tower_pat::store",
                    "the token change feed task panicked: changes made elsewhere are no longer \
                     heard, and the feed reads as disconnected"
                );
            } else {
                // The runtime is shutting down (at a program's exit, the usual case).
                tracing::debug!(
                    target: "tower_pat::store",
                    "the token change feed task was dropped with its runtime; the feed reads \
                     as disconnected"
                );
            }
            (self.ended)(&store);
        }
    }
}

/// The read path: what [`PatAuthLayer`](crate::PatAuthLayer) needs from a store.
#[async_trait]
pub trait TokenLookup: Send + Sync + 'static {
    /// The record whose current hash is `hash`, or whose previous hash is `hash` while its rotation
    /// grace period lasts; revoked and expired records are returned too (the layer names the reason).
    async fn find_by_hash(&self, hash: &TokenHash) -> Result<Option<TokenRecord>, StoreError>;

    /// Applies a batch of usage marks, at most one per token. `last_used_at` must never move
    /// backwards (apply the later of the stored and the given time), and the address list keeps the
    /// newest first: [`TokenRecord::apply_usage`] is the rule. Marks for unknown ids are ignored.
    ///
    /// The default does nothing, for stores that do not track usage.
    async fn record_usage(&self, updates: &[UsageUpdate]) -> Result<(), StoreError> {
        let _ = updates;
        Ok(())
    }

    /// Registers a cache for change events. Returns `true` if the store delivers them (changes made
    /// through it, and for shared stores changes made by other processes), `false` if it has no
    /// change feed, in which case only the cache TTL bounds how long a change goes unseen.
    fn subscribe(&self, listener: Weak<dyn ChangeListener>) -> bool {
        let _ = listener;
        false
    }

    /// Since when (Unix milliseconds) a change made elsewhere may have gone unseen by this
    /// store's change feed, once that is longer than the feed takes to confirm itself: the time
    /// of its last confirmation that it had heard everything (a PostgreSQL heartbeat answered, an
    /// SQLite poll done) while the next one is overdue or the feed is down. `None` while the feed
    /// confirms on time, and for a store without a change feed (the default).
    ///
    /// The layer's [`max_staleness`](crate::PatAuthLayer::max_staleness) counts from it, so a
    /// feed that falls silent shows there from its last confirmation, not only from the moment a
    /// heartbeat declares it down.
    fn feed_unconfirmed_since(&self) -> Option<i64> {
        None
    }

    /// The token a rotation took `hash` away from, if `hash` is in the store's history of
    /// superseded secrets ([`SupersededHistory`]: a bounded number per token, for a limited
    /// time), with the record as it is now. A hash still answering through
    /// [`find_by_hash`](Self::find_by_hash) (the current one, or one in its grace period) may be
    /// in the history too: callers ask only after `find_by_hash` found nothing.
    ///
    /// The layer asks on a cache miss of an unknown token, and only when
    /// [reuse detection](crate::reuse) is on. The default answers `Ok(None)`: a store that keeps
    /// no history compiles and simply never detects reuse.
    async fn find_superseded(
        &self,
        hash: &TokenHash,
    ) -> Result<Option<SupersededSecret>, StoreError> {
        let _ = hash;
        Ok(None)
    }
}

/// A secret a rotation replaced, as [`TokenLookup::find_superseded`] finds it.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct SupersededSecret {
    /// The token the secret belonged to, as it is now: its secret is the one the rotation made
    /// (or a later one).
    pub record: TokenRecord,
    /// When the secret stopped working: the rotation, or the end of its grace period (cut short
    /// if another rotation came first).
    pub superseded_at: DateTime<Utc>,
}

impl SupersededSecret {
    /// The secret of `record` that stopped working at `superseded_at`.
    pub fn new(record: TokenRecord, superseded_at: DateTime<Utc>) -> Self {
        Self {
            record,
            superseded_at,
        }
    }
}

/// How much history of superseded secrets a store keeps, for [reuse detection](crate::reuse):
/// every [`rotate`](TokenStore::rotate) records the hash it replaces, in the same transaction,
/// and drops the token's entries beyond the newest `max_per_token` and those older than
/// `retention`. Deleting (or purging) a token removes its history.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub struct SupersededHistory {
    /// How many superseded secrets are kept per token, newest first. Default 10; zero keeps none.
    pub max_per_token: u32,
    /// How long a superseded secret is remembered after it stopped working. Default 30 days.
    pub retention: std::time::Duration,
}

impl Default for SupersededHistory {
    fn default() -> Self {
        Self {
            max_per_token: 10,
            retention: std::time::Duration::from_secs(30 * 24 * 3600),
        }
    }
}

impl SupersededHistory {
    /// How many superseded secrets are kept per token. Default 10.
    #[must_use]
    pub fn max_per_token(mut self, n: u32) -> Self {
        self.max_per_token = n;
        self
    }

    /// How long a superseded secret is remembered. Default 30 days.
    #[must_use]
    pub fn retention(mut self, retention: std::time::Duration) -> Self {
        self.retention = retention;
        self
    }

    /// The oldest `superseded_at` still remembered at `now`: never before the Unix epoch (a
    /// longer retention keeps everything a store holds, and PostgreSQL cannot represent a time
    /// before 4713 BC: such a cutoff would fail the rotation it is pruned in).
    pub(crate) fn cutoff(&self, now: DateTime<Utc>) -> DateTime<Utc> {
        chrono::Duration::from_std(self.retention)
            .ok()
            .and_then(|r| now.checked_sub_signed(r))
            .map_or(DateTime::UNIX_EPOCH, |c| c.max(DateTime::UNIX_EPOCH))
    }
}

/// A store's [`SupersededHistory`] setting, changeable on a shared handle.
#[derive(Debug)]
pub(crate) struct HistorySetting {
    max_per_token: std::sync::atomic::AtomicU32,
    retention_ms: std::sync::atomic::AtomicU64,
}

impl Default for HistorySetting {
    fn default() -> Self {
        let s = Self {
            max_per_token: 0.into(),
            retention_ms: 0.into(),
        };
        s.set(SupersededHistory::default());
        s
    }
}

impl HistorySetting {
    pub(crate) fn set(&self, h: SupersededHistory) {
        use std::sync::atomic::Ordering::Relaxed;
        self.max_per_token.store(h.max_per_token, Relaxed);
        let ms = u64::try_from(h.retention.as_millis()).unwrap_or(u64::MAX);
        self.retention_ms.store(ms, Relaxed);
    }

    pub(crate) fn get(&self) -> SupersededHistory {
        use std::sync::atomic::Ordering::Relaxed;
        SupersededHistory {
            max_per_token: self.max_per_token.load(Relaxed),
            retention: std::time::Duration::from_millis(self.retention_ms.load(Relaxed)),
        }
    }
}

/// The history entries a rotation of `old` by `rotation` writes: the hash it replaces (stopping
/// at the end of the grace period, if any) and an earlier grace hash, which stops now.
pub(crate) fn superseded_by(
    old: &TokenRecord,
    rotation: &Rotation,
) -> impl Iterator<Item = (TokenHash, DateTime<Utc>)> {
    let replaced = (
        rotation.old_hash,
        rotation.grace_until.unwrap_or(rotation.at).max(rotation.at),
    );
    let earlier = old
        .previous_hash
        .filter(|(h, _)| *h != rotation.old_hash)
        .map(|(h, until)| (h, until.min(rotation.at)));
    std::iter::once(replaced).chain(earlier)
}

/// The management operations, on top of the read path.
///
/// Every write is conditional and atomic: [`update`](Self::update) and [`rotate`](Self::rotate)
/// apply only to a record that exists, is not revoked and is still the version (and for a
/// rotation, the hash) the caller read, checked and written under one lock or in one statement.
/// Nothing but [`rotate`](Self::rotate) writes `hash` and `previous_hash`, and no write ever
/// clears `revoked_at`: a revocation is permanent and a secret rotated away never comes back,
/// whatever the writes it races.
///
/// Implementations publish [`StoreEvent::Changed`] for every hash the record answered to before
/// the change (its hash and its grace hash, if any) from `update`, `rotate`, `revoke`, `delete`
/// and `purge`, so that caches drop the entry at once.
#[async_trait]
pub trait TokenStore: TokenLookup {
    /// Inserts a new record. Fails with [`StoreError::Conflict`] if the id, the hash, or the name for
    /// this subject is taken.
    async fn insert(&self, record: &TokenRecord) -> Result<(), StoreError>;

    /// The record with this id.
    async fn get(&self, id: &str) -> Result<Option<TokenRecord>, StoreError>;

    /// A page of records matching `query`, and how many match in all.
    async fn list(&self, query: &ListQuery) -> Result<Page, StoreError>;

    /// Changes the fields `patch` names, atomically, and returns the record after the change:
    /// `updated_at` becomes `patch.at` and the [`version`](TokenRecord::version) goes up by one.
    /// Never writes `revoked_at`, `hash`, `previous_hash`, `start` or the usage fields.
    ///
    /// Fails, changing nothing, with [`StoreError::NotFound`] for an unknown id,
    /// [`StoreError::Revoked`] for a revoked record, [`StoreError::Stale`] if
    /// [`if_version`](TokenPatch::if_version) is not the stored version,
    /// [`StoreError::Expired`] with [`if_unexpired`](TokenPatch::if_unexpired) for a record
    /// expired now, and [`StoreError::Conflict`] (`name`) for a name another token of the subject
    /// has. An empty patch checks the same conditions and returns the record unchanged.
    async fn update(&self, id: &str, patch: &TokenPatch) -> Result<TokenRecord, StoreError>;

    /// Replaces the record's secret, atomically, and returns the record after the change: `hash`
    /// and `start` become the new ones, `previous_hash` becomes `(old_hash, grace_until)` (or none
    /// without a grace period: an earlier grace hash never survives a rotation),
    /// `last_rotated_at` and `updated_at` become `rotation.at`, the expiry changes if the rotation
    /// says so, and the [`version`](TokenRecord::version) goes up by one.
    ///
    /// A store that answers [`find_superseded`](TokenLookup::find_superseded) records, in the same
    /// write, the hashes the rotation takes away (`old_hash`, superseded at the end of its grace
    /// period or now; an earlier grace hash, now at the latest) and keeps the token's history
    /// within its [`SupersededHistory`].
    ///
    /// Fails, changing nothing, with [`StoreError::NotFound`], [`StoreError::Revoked`],
    /// [`StoreError::Stale`] if `old_hash` is not the record's current hash or
    /// [`if_version`](Rotation::if_version) not its version, [`StoreError::Expired`] with
    /// [`if_unexpired`](Rotation::if_unexpired) for a record expired now, and
    /// [`StoreError::Conflict`] (`hash`) if another record has the new hash.
    async fn rotate(&self, id: &str, rotation: &Rotation) -> Result<TokenRecord, StoreError>;

    /// Marks the record revoked at `at` (kept if already revoked: `revoked_at` is set once and
    /// never cleared) and returns it, `None` if unknown. The
    /// [`version`](TokenRecord::version) goes up only when this call revokes it.
    async fn revoke(&self, id: &str, at: DateTime<Utc>) -> Result<Option<TokenRecord>, StoreError>;

    /// Removes the record and returns it, `None` if unknown.
    async fn delete(&self, id: &str) -> Result<Option<TokenRecord>, StoreError>;

    /// [`revoke`](Self::revoke), on the condition that `covering` grants every scope the record
    /// holds ([`ScopeSet::grants_all`]; the caller's scopes: acting on a token needs every scope
    /// it holds): one conditional, atomic write, so that a token given a scope the caller lacks
    /// after the caller's check is not revoked on the strength of that check. Nothing else is a
    /// condition: a rename, a rotation or a change of scopes within `covering` in between (which
    /// the token's own holder can make at will) never makes a revocation fail. A revoked record
    /// is returned as it is, whatever its scopes.
    ///
    /// # Errors
    /// [`StoreError::Stale`] if the record holds a scope `covering` does not grant (nothing
    /// changes); [`StoreError::Unsupported`] from the default implementation, for stores written
    /// before it existed (the management API then revokes without the condition).
    async fn revoke_if_covered(
        &self,
        id: &str,
        at: DateTime<Utc>,
        covering: &ScopeSet,
    ) -> Result<Option<TokenRecord>, StoreError> {
        let _ = (id, at, covering);
        Err(StoreError::Unsupported {
            operation: "revoke_if_covered",
        })
    }

    /// [`delete`](Self::delete), on the condition that `covering` grants every scope the record
    /// holds, like [`revoke_if_covered`](Self::revoke_if_covered) (a revoked record too).
    ///
    /// # Errors
    /// [`StoreError::Stale`] if the record holds a scope `covering` does not grant (nothing is
    /// removed); [`StoreError::Unsupported`] from the default implementation (the management API
    /// then deletes without the condition).
    async fn delete_if_covered(
        &self,
        id: &str,
        covering: &ScopeSet,
    ) -> Result<Option<TokenRecord>, StoreError> {
        let _ = (id, covering);
        Err(StoreError::Unsupported {
            operation: "delete_if_covered",
        })
    }

    /// [`revoke_if_covered`](Self::revoke_if_covered), on the further condition `caller`: the
    /// token that revokes the record is still the version whose scopes `covering` are (and that
    /// was found active and allowed to act), checked in the same atomic write, so that a token
    /// narrowed, disabled, rotated, revoked or deleted meanwhile never revokes a token on the
    /// strength of what it was. Checked first: a caller that changed fails even on a record
    /// already revoked, or gone.
    ///
    /// # Errors
    /// Those of [`revoke_if_covered`](Self::revoke_if_covered); [`StoreError::CallerChanged`] if
    /// the caller's record is gone or has another version (nothing changes);
    /// [`StoreError::Unsupported`] from the default implementation, for stores written before it
    /// existed (the management API then reads the caller again right before the revocation: a
    /// narrower window, not none).
    async fn revoke_if_covered_guarded(
        &self,
        id: &str,
        at: DateTime<Utc>,
        covering: &ScopeSet,
        caller: &CallerGuard,
    ) -> Result<Option<TokenRecord>, StoreError> {
        let _ = (id, at, covering, caller);
        Err(StoreError::Unsupported {
            operation: "revoke_if_covered_guarded",
        })
    }

    /// [`delete_if_covered`](Self::delete_if_covered), on the further condition `caller`, as
    /// [`revoke_if_covered_guarded`](Self::revoke_if_covered_guarded).
    ///
    /// # Errors
    /// Those of [`delete_if_covered`](Self::delete_if_covered); [`StoreError::CallerChanged`] if
    /// the caller's record is gone or has another version (nothing is removed);
    /// [`StoreError::Unsupported`] from the default implementation (the management API then
    /// reads the caller again right before the deletion: a narrower window, not none).
    async fn delete_if_covered_guarded(
        &self,
        id: &str,
        covering: &ScopeSet,
        caller: &CallerGuard,
    ) -> Result<Option<TokenRecord>, StoreError> {
        let _ = (id, covering, caller);
        Err(StoreError::Unsupported {
            operation: "delete_if_covered_guarded",
        })
    }

    /// How many records the subject has (revoked and expired ones included).
    async fn count_by_subject(&self, subject: &str) -> Result<u64, StoreError>;

    /// [`insert`](Self::insert), on the condition that the record's subject has fewer than `max`
    /// records ([`count_by_subject`](Self::count_by_subject)): one conditional, atomic write, so
    /// that concurrent creations (through the management API of several nodes or processes over
    /// one store) never take a subject past `max`. `Ok(false)`, inserting nothing, when the
    /// subject has `max` or more. ([`Tokens::issue`](crate::Tokens::issue), and so
    /// `patd token create`, the operator's tool, applies no limit.)
    ///
    /// # Errors
    /// Those of [`insert`](Self::insert); [`StoreError::Unsupported`] from the default
    /// implementation, for stores written before it existed (the management API then counts and
    /// inserts one creation at a time in its own process only).
    async fn insert_below(&self, record: &TokenRecord, max: u64) -> Result<bool, StoreError> {
        let _ = (record, max);
        Err(StoreError::Unsupported {
            operation: "insert_below",
        })
    }

    /// [`insert_below`](Self::insert_below), on the further condition `caller`: the token that
    /// creates the record is still the version whose ceilings the new record was checked
    /// against, checked in the same atomic write, so that a token narrowed meanwhile never mints
    /// a child with what it lost.
    ///
    /// # Errors
    /// Those of [`insert_below`](Self::insert_below); [`StoreError::CallerChanged`] if the
    /// caller's record is gone or has another version (nothing is inserted);
    /// [`StoreError::Unsupported`] from the default implementation (the management API then
    /// reads the caller again right before the insert: a narrower window, not none).
    async fn insert_below_guarded(
        &self,
        record: &TokenRecord,
        max: u64,
        caller: &CallerGuard,
    ) -> Result<bool, StoreError> {
        let _ = (record, max, caller);
        Err(StoreError::Unsupported {
            operation: "insert_below_guarded",
        })
    }

    /// Whether [`update`](Self::update) and [`rotate`](Self::rotate) check
    /// [`TokenPatch::if_caller`] and [`Rotation::if_caller`] in their atomic write. `false` from
    /// the default implementation, for stores written before the guard existed, which would
    /// ignore it: the management API then reads the caller again right before the write (a
    /// narrower window, not none). A store (or a wrapper around one) returns `true` only if it
    /// checks both.
    ///
    /// (The guarded creation, revocation and deletion,
    /// [`insert_below_guarded`](Self::insert_below_guarded),
    /// [`revoke_if_covered_guarded`](Self::revoke_if_covered_guarded) and
    /// [`delete_if_covered_guarded`](Self::delete_if_covered_guarded), say so each by not being
    /// [`StoreError::Unsupported`]: a wrapper must forward them too.)
    fn checks_caller_guard(&self) -> bool {
        false
    }

    /// Removes at most `limit` records that are revoked since before `cutoff` or expired before
    /// it ([`TokenRecord::is_purgeable`]), and returns them: one batch of
    /// [retention](crate::retention). A record that is active, or disabled but not expired, is
    /// never removed, however old; nor is one revoked at or after `cutoff`.
    ///
    /// Each batch is one conditional, atomic write: the condition is checked where the record is
    /// deleted (one `DELETE … WHERE id IN (SELECT … LIMIT n) AND <condition>` in the SQL stores,
    /// under the write lock in memory), so a record whose expiry was extended, or that is revoked
    /// only now, is kept. Concurrent purges (other nodes of a shared store) never remove, nor
    /// return, one record twice. Like [`delete`](Self::delete), the store publishes
    /// [`StoreEvent::Changed`] for every hash a removed record answered to, here and through its
    /// change feed.
    ///
    /// # Errors
    /// [`StoreError::Unsupported`] from the default implementation, for stores that do not
    /// implement it (retention then reports the error and removes nothing);
    /// [`StoreError::Backend`] if the store fails, in which case nothing of the batch is removed.
    async fn purge(
        &self,
        cutoff: DateTime<Utc>,
        limit: usize,
    ) -> Result<Vec<TokenRecord>, StoreError> {
        let _ = (cutoff, limit);
        Err(StoreError::Unsupported { operation: "purge" })
    }

    /// Claims at most `limit` tokens due the `kind` notice at `at` ([`NoticeKind::is_due`] with
    /// `lead`, which only [`NoticeKind::Expiring`] reads) whose notice has not been claimed yet,
    /// records the claim, and returns them: one batch of
    /// [expiry notices](crate::notices), soonest expiry first.
    ///
    /// The claim is one conditional, atomic write (one `UPDATE … WHERE id IN (SELECT … LIMIT n)
    /// AND <condition> RETURNING …` in the SQL stores, under the write lock in memory), so
    /// concurrent claims (other nodes of a shared store) never return one token twice: each
    /// notice is sent once in all. A claim is no management write: it changes neither the
    /// version nor `updated_at`, and announces nothing. An [`update`](Self::update) or a
    /// [`rotate`](Self::rotate) that changes the expiry clears both claims in the same statement,
    /// so a token extended is noticed again as its new expiry comes near; one that sets the same
    /// expiry clears nothing.
    ///
    /// # Errors
    /// [`StoreError::Unsupported`] from the default implementation, for stores that do not
    /// implement it (the notice task then reports the error and sends nothing);
    /// [`StoreError::Backend`] if the store fails, in which case nothing is claimed.
    async fn claim_expiry_notices(
        &self,
        kind: NoticeKind,
        at: DateTime<Utc>,
        lead: std::time::Duration,
        limit: usize,
    ) -> Result<Vec<TokenRecord>, StoreError> {
        let _ = (kind, at, lead, limit);
        Err(StoreError::Unsupported {
            operation: "claim_expiry_notices",
        })
    }

    /// Takes back the `kind` notice claim of token `id` made by the
    /// [`claim_expiry_notices`](Self::claim_expiry_notices) at `at`, if it is still that claim:
    /// the notice could not be sent (its sink's queue was full), and becomes due again for a
    /// later claim. One conditional write (the claim's time compared to the microsecond): a claim
    /// made since (after a change of the expiry cleared this one) is kept. Returns whether a
    /// claim was taken back. Like a claim, no management write.
    ///
    /// # Errors
    /// [`StoreError::Unsupported`] from the default implementation, for stores written before
    /// it existed (the notice task then logs the notice as lost, as it was before);
    /// [`StoreError::Backend`] if the store fails.
    async fn release_expiry_notice(
        &self,
        kind: NoticeKind,
        id: &str,
        at: DateTime<Utc>,
    ) -> Result<bool, StoreError> {
        let _ = (kind, id, at);
        Err(StoreError::Unsupported {
            operation: "release_expiry_notice",
        })
    }
}

/// Whether a write that changes a token's expiry from `old` to `new` clears its expiry-notice
/// claims, so that both notices are due again for the new expiry: only when it moves the expiry
/// later (to none, or from a time to a later one). Moving it earlier, or giving an expiry to a
/// token that had none (it had no claim), clears nothing: the holder was told already, and a
/// write-scoped token that could shorten its own expiry again and again (a token can never
/// extend itself past its own expiry) would otherwise send an `expiring` alert on every notice
/// run. The memory store's rule, and the reference for the SQL stores.
pub fn expiry_extended(old: Option<DateTime<Utc>>, new: Option<DateTime<Utc>>) -> bool {
    match (old, new) {
        (Some(old), Some(new)) => new > old,
        (Some(_), None) => true,
        (None, _) => false,
    }
}

/// Which expiry notice [`TokenStore::claim_expiry_notices`] claims: each is sent once per token
/// (and again after its expiry moves later, [`expiry_extended`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum NoticeKind {
    /// The token expires soon: within the lead time of the claim.
    Expiring,
    /// The token has expired.
    Expired,
}

impl NoticeKind {
    /// Whether `record` is due this notice at `at` with `lead` ahead (the notice not sent yet
    /// aside): not revoked, and for [`Expiring`](Self::Expiring) expiring after `at` and at or
    /// before `at + lead` (for a lead too long to add, at or before 9999-12-31T23:59:59Z, the
    /// latest expiry the management API writes), for [`Expired`](Self::Expired) expired at `at`
    /// (`expires_at <= at`). A
    /// disabled token is noticed like an active one; a token that never expires never is. The
    /// memory store's rule, and the reference for the SQL stores.
    pub fn is_due(
        self,
        record: &TokenRecord,
        at: DateTime<Utc>,
        lead: std::time::Duration,
    ) -> bool {
        let Some(expires_at) = record.expires_at else {
            return false;
        };
        if record.is_revoked() {
            return false;
        }
        match self {
            Self::Expiring => expires_at > at && expires_at <= crate::record::after(at, lead),
            Self::Expired => expires_at <= at,
        }
    }
}

/// Which records [`TokenStore::list`] returns, in which order: built from
/// [`ListQuery::default`] (every record, oldest first, 50 at a time) or
/// [`ListQuery::for_subject`] with the setters below, for example
/// `ListQuery::for_subject("alice").search("ci").limit(10)`.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct ListQuery {
    /// Only this subject's records; `None` for all.
    pub subject: Option<String>,
    /// Only records whose name contains this text (case-insensitive).
    pub search: Option<String>,
    /// A filter on the last use.
    pub last_used: LastUsedFilter,
    /// Only records used after this time (never-used ones excluded).
    pub last_used_after: Option<DateTime<Utc>>,
    /// Only records created after this time.
    pub created_after: Option<DateTime<Utc>>,
    /// Only records created before this time.
    pub created_before: Option<DateTime<Utc>>,
    /// Only records in this state at its time.
    pub state: Option<StateFilter>,
    /// The order.
    pub sort: SortKey,
    /// Reverse the order.
    pub descending: bool,
    /// How many matching records to skip.
    pub offset: u64,
    /// How many to return at most.
    pub limit: u64,
}

impl Default for ListQuery {
    fn default() -> Self {
        Self {
            subject: None,
            search: None,
            last_used: LastUsedFilter::Any,
            last_used_after: None,
            created_after: None,
            created_before: None,
            state: None,
            sort: SortKey::CreatedAt,
            descending: false,
            offset: 0,
            limit: 50,
        }
    }
}

impl ListQuery {
    /// Only this subject's records. Default: all subjects.
    #[must_use]
    pub fn subject(mut self, subject: impl Into<String>) -> Self {
        self.subject = Some(subject.into());
        self
    }

    /// Only records whose name contains this text (case-insensitive). Default: no filter.
    #[must_use]
    pub fn search(mut self, search: impl Into<String>) -> Self {
        self.search = Some(search.into());
        self
    }

    /// A filter on the last use. Default [`LastUsedFilter::Any`].
    #[must_use]
    pub fn last_used(mut self, last_used: LastUsedFilter) -> Self {
        self.last_used = last_used;
        self
    }

    /// Only records used after `t` (never-used ones excluded). Default: no filter.
    #[must_use]
    pub fn last_used_after(mut self, t: DateTime<Utc>) -> Self {
        self.last_used_after = Some(t);
        self
    }

    /// Only records created after `t`. Default: no filter.
    #[must_use]
    pub fn created_after(mut self, t: DateTime<Utc>) -> Self {
        self.created_after = Some(t);
        self
    }

    /// Only records created before `t`. Default: no filter.
    #[must_use]
    pub fn created_before(mut self, t: DateTime<Utc>) -> Self {
        self.created_before = Some(t);
        self
    }

    /// Only records in `state` at `at` (expiry is judged at `at`). Default: every state.
    #[must_use]
    pub fn state(mut self, state: TokenState, at: DateTime<Utc>) -> Self {
        self.state = Some(StateFilter { state, at });
        self
    }

    /// The order. Default [`SortKey::CreatedAt`].
    #[must_use]
    pub fn sort(mut self, sort: SortKey) -> Self {
        self.sort = sort;
        self
    }

    /// Reverse the order. Default `false`.
    #[must_use]
    pub fn descending(mut self, descending: bool) -> Self {
        self.descending = descending;
        self
    }

    /// How many matching records to skip. Default 0.
    #[must_use]
    pub fn offset(mut self, offset: u64) -> Self {
        self.offset = offset;
        self
    }

    /// How many to return at most. Default 50.
    #[must_use]
    pub fn limit(mut self, limit: u64) -> Self {
        self.limit = limit;
        self
    }
}

impl ListQuery {
    /// All records of one subject, oldest first, 50 at a time.
    pub fn for_subject(subject: impl Into<String>) -> Self {
        Self {
            subject: Some(subject.into()),
            ..Self::default()
        }
    }

    /// Whether `record` passes the filters (not the paging). The memory store's rule, and the
    /// reference for the SQL stores.
    pub fn matches(&self, record: &TokenRecord) -> bool {
        self.subject.as_deref().is_none_or(|s| s == record.subject)
            && self
                .search
                .as_deref()
                .is_none_or(|q| record.name.to_lowercase().contains(&q.to_lowercase()))
            && match self.last_used {
                LastUsedFilter::Any => true,
                LastUsedFilter::Never => record.last_used_at.is_none(),
                LastUsedFilter::Before(t) => record.last_used_at.is_none_or(|u| u < t),
            }
            && self
                .last_used_after
                .is_none_or(|t| record.last_used_at.is_some_and(|u| u > t))
            && self.created_after.is_none_or(|t| record.created_at > t)
            && self.created_before.is_none_or(|t| record.created_at < t)
            && self
                .state
                .is_none_or(|f| TokenState::of(record, f.at) == f.state)
    }

    /// The order of two records under this query: the sort key, then the id. A never-used token
    /// sorts before every used one by `lastUsedAt`; a never-expiring one after every expiring one by
    /// `expiresAt`. `descending` reverses the whole order.
    pub fn compare(&self, a: &TokenRecord, b: &TokenRecord) -> std::cmp::Ordering {
        let by_key = match self.sort {
            SortKey::CreatedAt => a.created_at.cmp(&b.created_at),
            SortKey::Name => a.name.cmp(&b.name),
            SortKey::LastUsedAt => a.last_used_at.cmp(&b.last_used_at),
            SortKey::ExpiresAt => match (a.expires_at, b.expires_at) {
                (Some(x), Some(y)) => x.cmp(&y),
                (None, None) => std::cmp::Ordering::Equal,
                (None, Some(_)) => std::cmp::Ordering::Greater,
                (Some(_), None) => std::cmp::Ordering::Less,
            },
        };
        let ord = by_key.then_with(|| a.id.cmp(&b.id));
        if self.descending { ord.reverse() } else { ord }
    }
}

/// The state of a token at a time: exactly one of these.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum TokenState {
    /// Usable: neither revoked, disabled nor expired.
    Active,
    /// Revoked (for good), whatever else holds.
    Revoked,
    /// Disabled and not revoked.
    Disabled,
    /// Expired, and neither revoked nor disabled.
    Expired,
}

impl TokenState {
    /// The state of `record` at `at`: revoked before disabled before expired.
    pub fn of(record: &TokenRecord, at: DateTime<Utc>) -> Self {
        if record.is_revoked() {
            Self::Revoked
        } else if record.is_disabled() {
            Self::Disabled
        } else if record.is_expired_at(at) {
            Self::Expired
        } else {
            Self::Active
        }
    }
}

/// A [`TokenState`] filter and the time it is judged at.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StateFilter {
    /// The state records must be in.
    pub state: TokenState,
    /// The time expiry is judged at (usually now).
    pub at: DateTime<Utc>,
}

/// A filter on when a token was last used.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum LastUsedFilter {
    /// No filter.
    #[default]
    Any,
    /// Tokens never used.
    Never,
    /// Tokens not used since this time (never-used ones included).
    Before(DateTime<Utc>),
}

/// The sort keys of [`ListQuery`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum SortKey {
    /// Creation time.
    #[default]
    CreatedAt,
    /// Name.
    Name,
    /// Last use.
    LastUsedAt,
    /// Expiry.
    ExpiresAt,
}

/// One page of a listing, as a store returns it ([`Page::new`]).
#[derive(Debug, Clone, Default)]
#[non_exhaustive]
pub struct Page {
    /// The records of this page.
    pub items: Vec<TokenRecord>,
    /// How many records match the query in all.
    pub total: u64,
}

impl Page {
    /// A page of `items` out of `total` matching records.
    pub fn new(items: Vec<TokenRecord>, total: u64) -> Self {
        Self { items, total }
    }
}

#[async_trait]
impl<T: TokenLookup + ?Sized> TokenLookup for std::sync::Arc<T> {
    async fn find_by_hash(&self, hash: &TokenHash) -> Result<Option<TokenRecord>, StoreError> {
        (**self).find_by_hash(hash).await
    }

    async fn record_usage(&self, updates: &[UsageUpdate]) -> Result<(), StoreError> {
        (**self).record_usage(updates).await
    }

    fn subscribe(&self, listener: Weak<dyn ChangeListener>) -> bool {
        (**self).subscribe(listener)
    }

    fn feed_unconfirmed_since(&self) -> Option<i64> {
        (**self).feed_unconfirmed_since()
    }

    async fn find_superseded(
        &self,
        hash: &TokenHash,
    ) -> Result<Option<SupersededSecret>, StoreError> {
        (**self).find_superseded(hash).await
    }
}
