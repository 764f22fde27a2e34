//! The store conformance suite, `tower_pat::store::conformance` (feature `test-util`), run against
//! every store of this crate: `MemoryStore`, `SqliteStore` (feature `sqlite`, in memory and in a
//! file) and `PostgresStore` (feature `postgres`, with `DATABASE_URL`; each test in a database of
//! its own). One test per check and store, so a failure names both. Then the tests that only
//! concern one store (reopening a file, schema upgrades).

mod common;

use chrono::{DateTime, SubsecRound, Utc};
use tower_pat::{MemoryStore, NewToken, TokenLookup, TokenPatch, TokenRecord, TokenStore, Tokens};

fn now() -> DateTime<Utc> {
    Utc::now().trunc_subsecs(6)
}

fn token(subject: &str, name: &str) -> TokenRecord {
    let new = NewToken::new(subject, name).scopes(["repo:read"]).unwrap();
    // A record made as the handle makes them, without storing it: each test inserts it itself.
    Tokens::new(MemoryStore::new()).mint(new, now()).0
}

#[cfg(feature = "test-util")]
mod suite {
    use tower_pat::MemoryStore;
    use tower_pat::store::conformance;

    macro_rules! for_each_store {
        ($($test:ident),* $(,)?) => {
            /// Every check of the public suite has a test here, and nothing else: a check added
            /// to the module without a test here fails this.
            #[test]
            fn every_check_is_run() {
                assert_eq!(conformance::CHECKS, [$(stringify!($test)),*]);
            }

            mod memory {
                use super::{MemoryStore, conformance};
                $(
                    #[tokio::test]
                    async fn $test() {
                        conformance::$test(MemoryStore::new()).await;
                    }
                )*
            }

            #[cfg(feature = "sqlite")]
            mod sqlite {
                use super::conformance;
                use tower_pat::store::SqliteStore;
                $(
                    #[tokio::test]
                    async fn $test() {
                        conformance::$test(SqliteStore::in_memory().await.unwrap()).await;
                    }
                )*
            }

            #[cfg(feature = "sqlite")]
            mod sqlite_file {
                use super::conformance;
                use crate::common::tempdir;
                use tower_pat::store::SqliteStore;
                $(
                    #[tokio::test]
                    async fn $test() {
                        let dir = tempdir();
                        let store = SqliteStore::open(dir.join("tokens.db")).await.unwrap();
                        conformance::$test(store.clone()).await;
                        store.close().await;
                        let _ = std::fs::remove_dir_all(dir);
                    }
                )*
            }

            #[cfg(feature = "postgres")]
            mod postgres {
                use super::conformance;
                use super::super::common;
                use tower_pat::store::PostgresStore;
                $(
                    #[tokio::test]
                    async fn $test() {
                        let Some(db) = common::pg::TestDb::create("store_conformance").await else {
                            return;
                        };
                        let store = PostgresStore::builder()
                            .connect_with(db.options.clone())
                            .await
                            .unwrap();
                        conformance::$test(store.clone()).await;
                        store.pool().close().await;
                        drop(store);
                        drop(db);
                    }
                )*
            }

            /// The same on a database whose default isolation is REPEATABLE READ (a role's or
            /// database's setting the store does not control): every write still behaves.
            #[cfg(feature = "postgres")]
            mod postgres_repeatable_read {
                use super::conformance;
                use super::super::common;
                use tower_pat::store::PostgresStore;
                $(
                    #[tokio::test]
                    async fn $test() {
                        let Some(db) = common::pg::TestDb::create("store_conformance").await else {
                            return;
                        };
                        let options = db
                            .options
                            .clone()
                            .options([("default_transaction_isolation", "repeatable\\ read")]);
                        let store = PostgresStore::builder()
                            .connect_with(options)
                            .await
                            .unwrap();
                        conformance::$test(store.clone()).await;
                        store.pool().close().await;
                        drop(store);
                        drop(db);
                    }
                )*
            }
        };
    }

    for_each_store!(
        insert_and_get_round_trip,
        uniqueness,
        lookup_by_hash,
        revoked_and_expired_are_found,
        previous_hash_only_within_grace,
        update_changes_only_the_named_fields,
        update_never_clears_a_revocation,
        disable_and_enable,
        stale_writes_change_nothing,
        writes_on_the_condition_of_an_unexpired_token,
        rotate_replaces_the_secret,
        rotate_never_restores_a_replaced_hash,
        rotate_refuses_a_revoked_token,
        versions_count_management_writes,
        revoke_keeps_the_first_time,
        delete_removes,
        conditional_revoke_and_delete,
        texts_with_a_nul_match_nothing,
        insert_below_holds_the_limit_under_concurrency,
        caller_guard_conditions_writes,
        caller_guards_of_tokens_acting_on_each_other,
        caller_guard_conditions_revocations_and_deletions,
        usage_is_monotonic,
        usage_keeps_newest_addresses_capped,
        list_matches_the_reference,
        purge_removes_only_old_revoked_and_expired,
        purge_respects_the_limit,
        purge_keeps_what_changed_after_the_cutoff,
        expiry_notices_are_claimed_once,
        expiry_notices_respect_the_limit,
        expiry_notices_return_when_the_expiry_changes,
        expiry_notices_with_a_lead_too_long_to_add,
        expiry_notice_claims_are_taken_back,
        superseded_secrets_are_remembered,
        superseded_history_is_bounded_and_forgotten,
    );

    /// The suite catches a store that breaks a rule, and says which: a memory store with one
    /// flaw per test, each run through the check that covers it.
    mod flawed {
        use std::sync::Weak;

        use async_trait::async_trait;
        use chrono::{DateTime, Utc};
        use tower_pat::store::{ChangeListener, ListQuery, Page, conformance};
        use tower_pat::{
            MemoryStore, Rotation, StoreError, TokenHash, TokenLookup, TokenPatch, TokenRecord,
            TokenStore, UsageUpdate,
        };

        #[derive(Clone, Copy, PartialEq, Eq)]
        enum Flaw {
            /// `update` of a revoked record answers with the record instead of `Revoked`.
            UpdatesRevoked,
            /// `update` ignores `if_version`.
            IgnoresVersion,
            /// `rotate` ignores `old_hash`.
            IgnoresOldHash,
            /// `subscribe` says yes and then publishes nothing.
            Silent,
        }

        struct Flawed(MemoryStore, Flaw);

        fn store(flaw: Flaw) -> Flawed {
            Flawed(MemoryStore::new(), flaw)
        }

        #[async_trait]
        impl TokenLookup for Flawed {
            async fn find_by_hash(
                &self,
                hash: &TokenHash,
            ) -> Result<Option<TokenRecord>, StoreError> {
                self.0.find_by_hash(hash).await
            }
            async fn record_usage(&self, updates: &[UsageUpdate]) -> Result<(), StoreError> {
                self.0.record_usage(updates).await
            }
            fn subscribe(&self, listener: Weak<dyn ChangeListener>) -> bool {
                self.1 == Flaw::Silent || self.0.subscribe(listener)
            }
        }

        #[async_trait]
        impl TokenStore for Flawed {
            async fn insert(&self, record: &TokenRecord) -> Result<(), StoreError> {
                self.0.insert(record).await
            }
            async fn get(&self, id: &str) -> Result<Option<TokenRecord>, StoreError> {
                self.0.get(id).await
            }
            async fn list(&self, query: &ListQuery) -> Result<Page, StoreError> {
                self.0.list(query).await
            }
            async fn update(
                &self,
                id: &str,
                patch: &TokenPatch,
            ) -> Result<TokenRecord, StoreError> {
                let mut patch = patch.clone();
                match (self.1, self.0.get(id).await?) {
                    (Flaw::UpdatesRevoked, Some(r)) if r.revoked_at.is_some() => return Ok(r),
                    (Flaw::IgnoresVersion, _) => patch.if_version = None,
                    _ => {}
                }
                self.0.update(id, &patch).await
            }
            async fn rotate(
                &self,
                id: &str,
                rotation: &Rotation,
            ) -> Result<TokenRecord, StoreError> {
                let mut rotation = rotation.clone();
                if let (Flaw::IgnoresOldHash, Some(r)) = (self.1, self.0.get(id).await?) {
                    rotation.old_hash = r.hash;
                }
                self.0.rotate(id, &rotation).await
            }
            async fn revoke(
                &self,
                id: &str,
                at: DateTime<Utc>,
            ) -> Result<Option<TokenRecord>, StoreError> {
                self.0.revoke(id, at).await
            }
            async fn delete(&self, id: &str) -> Result<Option<TokenRecord>, StoreError> {
                self.0.delete(id).await
            }
            async fn count_by_subject(&self, subject: &str) -> Result<u64, StoreError> {
                self.0.count_by_subject(subject).await
            }
        }

        #[tokio::test]
        #[should_panic(expected = "update of a revoked record must fail with StoreError::Revoked")]
        async fn an_update_of_a_revoked_record_is_caught() {
            conformance::run_all(|| async { store(Flaw::UpdatesRevoked) }).await;
        }

        #[tokio::test]
        #[should_panic(expected = "update with an old if_version must fail with Stale")]
        async fn an_ignored_version_is_caught() {
            conformance::run_all(|| async { store(Flaw::IgnoresVersion) }).await;
        }

        #[tokio::test]
        #[should_panic(
            expected = "rotate whose old_hash is no longer the record's hash must fail with Stale"
        )]
        async fn a_rotation_from_a_replaced_hash_is_caught() {
            conformance::rotate_never_restores_a_replaced_hash(store(Flaw::IgnoresOldHash)).await;
        }

        #[tokio::test]
        #[should_panic(expected = "must publish Changed")]
        async fn a_store_without_events_is_caught() {
            conformance::revoke_keeps_the_first_time(store(Flaw::Silent)).await;
        }
    }

    /// `run_all` runs on a fresh store per check (the checks reuse names and would conflict on a
    /// shared one) and passes on the memory store.
    #[tokio::test]
    async fn run_all_passes_on_the_memory_store() {
        let mut made = 0;
        conformance::run_all(|| {
            made += 1;
            async { MemoryStore::new() }
        })
        .await;
        assert_eq!(made, conformance::CHECKS.len());
    }
}

/// Tokens in a SQLite file survive closing and reopening it; migrations run once.
#[cfg(feature = "sqlite")]
#[tokio::test]
async fn sqlite_file_survives_reopen() {
    use tower_pat::store::SqliteStore;
    let dir = common::tempdir();
    let path = dir.join("tokens.db");
    let r = token("alice", "ci");
    {
        let store = SqliteStore::open(&path).await.unwrap();
        store.insert(&r).await.unwrap();
        store.close().await;
    }
    let store = SqliteStore::open(&path).await.unwrap();
    assert_eq!(store.find_by_hash(&r.hash).await.unwrap(), Some(r.clone()));
    assert_eq!(store.count_by_subject("alice").await.unwrap(), 1);
    store.close().await;
    let _ = std::fs::remove_dir_all(dir);
}

/// A file from before the history of superseded secrets (schema 5) gains it on open: a rotation
/// then records the replaced hash, and deleting the token removes it (the trigger).
#[cfg(feature = "sqlite")]
#[tokio::test]
async fn sqlite_schema_6_gains_the_superseded_history() {
    use tower_pat::Rotation;
    use tower_pat::store::SqliteStore;
    use tower_pat::store::sqlx::{ConnectOptions, Executor};
    let dir = common::tempdir();
    let path = dir.join("tokens.db");
    let r = token("alice", "ci");
    {
        let store = SqliteStore::open(&path).await.unwrap();
        store.insert(&r).await.unwrap();
        store.close().await;
    }
    let mut conn = tower_pat::store::sqlx::sqlite::SqliteConnectOptions::new()
        .filename(&path)
        .connect()
        .await
        .unwrap();
    conn.execute(
        "DROP TRIGGER tower_pat_superseded_forget; \
         DROP TABLE tower_pat_superseded; \
         DELETE FROM tower_pat_schema_version WHERE version > 6;",
    )
    .await
    .unwrap();
    drop(conn);

    let store = SqliteStore::open(&path).await.unwrap();
    let new = token("alice", "other").hash;
    store
        .rotate(&r.id, &Rotation::new(r.hash, new, "pat_new", now()))
        .await
        .unwrap();
    assert!(store.find_superseded(&r.hash).await.unwrap().is_some());
    store.delete(&r.id).await.unwrap();
    assert_eq!(store.find_superseded(&r.hash).await.unwrap(), None);
    store.close().await;
    let _ = std::fs::remove_dir_all(dir);
}

/// A database at schema version 1 (before `version`) gets the column on open, its records at 0,
/// and conditional writes work on them.
#[cfg(feature = "sqlite")]
#[tokio::test]
async fn sqlite_schema_1_gains_versions() {
    use tower_pat::store::SqliteStore;
    use tower_pat::store::sqlx::{self, ConnectOptions, Executor};
    let dir = common::tempdir();
    let path = dir.join("tokens.db");
    let r = token("alice", "ci");
    {
        let store = SqliteStore::open(&path).await.unwrap();
        store.insert(&r).await.unwrap();
        store.close().await;
    }
    // Back to schema 1.
    let mut conn = sqlx::sqlite::SqliteConnectOptions::new()
        .filename(&path)
        .connect()
        .await
        .unwrap();
    conn.execute(
        "ALTER TABLE tower_pat_tokens DROP COLUMN version; \
         ALTER TABLE tower_pat_tokens DROP COLUMN disabled_at; \
         ALTER TABLE tower_pat_tokens DROP COLUMN expiring_notice_at; \
         ALTER TABLE tower_pat_tokens DROP COLUMN expired_notice_at; \
         DROP TABLE tower_pat_changes; \
         DELETE FROM tower_pat_schema_version WHERE version >= 2;",
    )
    .await
    .unwrap();
    drop(conn);

    let store = SqliteStore::open(&path).await.unwrap();
    assert_eq!(store.get(&r.id).await.unwrap(), Some(r.clone()));
    let patch = TokenPatch::new(now()).if_version(0).name("renamed");
    assert_eq!(store.update(&r.id, &patch).await.unwrap().version, 1);
    store.close().await;
    let _ = std::fs::remove_dir_all(dir);
}

/// The same on PostgreSQL.
#[cfg(feature = "postgres")]
#[tokio::test]
async fn postgres_schema_1_gains_versions() {
    use tower_pat::store::PostgresStore;
    use tower_pat::store::sqlx::Executor;
    let Some(db) = common::pg::TestDb::create("store_conformance").await else {
        return;
    };
    let r = token("alice", "ci");
    {
        let store = PostgresStore::builder()
            .connect_with(db.options.clone())
            .await
            .unwrap();
        store.insert(&r).await.unwrap();
        store
            .pool()
            .execute(
                "ALTER TABLE tower_pat_tokens DROP COLUMN version; \
                 ALTER TABLE tower_pat_tokens DROP COLUMN disabled_at; \
                 ALTER TABLE tower_pat_tokens DROP COLUMN expiring_notice_at; \
                 ALTER TABLE tower_pat_tokens DROP COLUMN expired_notice_at; \
                 DELETE FROM tower_pat_schema_version WHERE version >= 2;",
            )
            .await
            .unwrap();
        store.pool().close().await;
    }
    let store = PostgresStore::builder()
        .connect_with(db.options.clone())
        .await
        .unwrap();
    assert_eq!(store.get(&r.id).await.unwrap(), Some(r.clone()));
    let patch = TokenPatch::new(now()).if_version(0).name("renamed");
    assert_eq!(store.update(&r.id, &patch).await.unwrap().version, 1);
    store.pool().close().await;
}

/// A history or retention kept "forever" (`Duration::MAX`, ten thousand years) reaches back past
/// what PostgreSQL can represent: rotations, reuse lookups and purges still work, and keep
/// everything.
#[cfg(feature = "postgres")]
#[tokio::test]
async fn postgres_keeps_forever_without_failing() {
    use std::time::Duration;
    use tower_pat::RetentionConfig;
    use tower_pat::store::{PostgresStore, SupersededHistory};
    let Some(db) = common::pg::TestDb::create("store_conformance").await else {
        return;
    };
    for (i, retention) in [Duration::MAX, Duration::from_secs(10_000 * 366 * 86_400)]
        .into_iter()
        .enumerate()
    {
        let store = PostgresStore::builder()
            .connect_with(db.options.clone())
            .await
            .unwrap()
            .superseded_history(SupersededHistory::default().retention(retention));
        let tokens = Tokens::new(store.clone());
        let (record, old) = tokens
            .issue(
                NewToken::new("alice", format!("ci{i}"))
                    .scopes(["repo:read"])
                    .unwrap(),
            )
            .await
            .unwrap();
        let rotated = tokens.rotate(&record.id, Duration::ZERO).await;
        assert!(rotated.is_ok(), "{retention:?}: {rotated:?}");
        let hash = tokens.hasher().hash(old.expose_secret());
        let found = store.find_superseded(&hash).await.unwrap();
        assert_eq!(found.map(|s| s.record.id), Some(record.id.clone()));
        store.revoke(&record.id, now()).await.unwrap();
        let report = tokens
            .retention(RetentionConfig::default().max_age(retention))
            .build()
            .run_once()
            .await
            .unwrap()
            .unwrap();
        assert_eq!(report.count, 0);
        assert!(store.get(&record.id).await.unwrap().is_some());
        store.pool().close().await;
    }
}

/// Times written outside this crate as `infinity` (a DBA's "never") are made finite by migration
/// 7, so the token can be looked up, listed and revoked; none can be written after it.
#[cfg(feature = "postgres")]
#[tokio::test]
async fn postgres_schema_7_makes_every_time_finite() {
    use tower_pat::store::sqlx::{self, Executor};
    use tower_pat::store::{ListQuery, PostgresStore};
    let Some(db) = common::pg::TestDb::create("store_conformance").await else {
        return;
    };
    let (forever, revoked) = (token("alice", "forever"), token("alice", "revoked"));
    {
        let store = PostgresStore::builder()
            .connect_with(db.options.clone())
            .await
            .unwrap();
        store.insert(&forever).await.unwrap();
        store.insert(&revoked).await.unwrap();
        store
            .pool()
            .execute(
                "ALTER TABLE tower_pat_tokens DROP CONSTRAINT tower_pat_tokens_finite_times; \
                 ALTER TABLE tower_pat_superseded DROP CONSTRAINT tower_pat_superseded_finite_time; \
                 DELETE FROM tower_pat_schema_version WHERE version >= 7;",
            )
            .await
            .unwrap();
        let q = "UPDATE tower_pat_tokens SET expires_at = 'infinity', last_used_at = 'infinity', \
                 last_rotated_at = '250000-01-01' WHERE id = $1";
        sqlx::query(q)
            .bind(&forever.id)
            .execute(store.pool())
            .await
            .unwrap();
        let q = "UPDATE tower_pat_tokens SET revoked_at = '-infinity' WHERE id = $1";
        sqlx::query(q)
            .bind(&revoked.id)
            .execute(store.pool())
            .await
            .unwrap();
        store.pool().close().await;
    }
    let store = PostgresStore::builder()
        .connect_with(db.options.clone())
        .await
        .unwrap();
    let got = store.get(&forever.id).await.unwrap().unwrap();
    assert_eq!(got.expires_at, None, "infinity is no expiry");
    assert!(got.last_used_at.is_some());
    assert!(got.last_rotated_at.is_some_and(|t| t <= Utc::now()));
    assert!(store.get(&revoked.id).await.unwrap().unwrap().is_revoked());
    assert_eq!(store.list(&ListQuery::default()).await.unwrap().total, 2);
    assert!(store.revoke(&forever.id, now()).await.unwrap().is_some());
    for time in ["infinity", "-infinity", "250000-01-01"] {
        let q = format!("UPDATE tower_pat_tokens SET expires_at = '{time}' WHERE id = $1");
        let refused = sqlx::query(&q)
            .bind(&forever.id)
            .execute(store.pool())
            .await;
        assert!(refused.is_err(), "{time} was written after migration 7");
    }
    store.pool().close().await;
}

/// The options of the `postgres_repeatable_read` suite do set the isolation level (else that
/// suite would test nothing more than `postgres`).
#[cfg(feature = "postgres")]
#[tokio::test]
async fn postgres_repeatable_read_options_take_effect() {
    use tower_pat::store::PostgresStore;
    let Some(db) = common::pg::TestDb::create("store_conformance").await else {
        return;
    };
    let options = db
        .options
        .clone()
        .options([("default_transaction_isolation", "repeatable\\ read")]);
    let store = PostgresStore::builder()
        .connect_with(options)
        .await
        .unwrap();
    let isolation: String =
        tower_pat::store::sqlx::query_scalar("SHOW default_transaction_isolation")
            .fetch_one(store.pool())
            .await
            .unwrap();
    assert_eq!(isolation, "repeatable read");
    store.pool().close().await;
}
