//! Retention (`tower_pat::retention`): revoked and expired records older than `max_age` are
//! removed in batches by a background task, with one event per run; everything else is kept.
//! Run on the memory store, SQLite (two handles on one file, as two servers) and PostgreSQL (two
//! nodes over one database, with `DATABASE_URL`; skipped with a note without it).

mod common;

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use chrono::{DateTime, TimeDelta, Utc};
use http::StatusCode;
use tower_pat::retention::{PurgeReport, RetentionConfig};
use tower_pat::store::{ChangeListener, ListQuery, Page};
use tower_pat::{
    CacheConfig, MemoryStore, NewToken, PatAuthLayer, Rotation, StoreError, TokenHash, TokenLookup,
    TokenPatch, TokenRecord, TokenSecret, TokenStore, Tokens, UsageUpdate,
};

const DAY: Duration = Duration::from_secs(24 * 3600);

/// Polls `cond` every 5 ms for at most `limit`; whether it became true.
async fn wait_for(limit: Duration, mut cond: impl FnMut() -> bool) -> bool {
    let start = Instant::now();
    while start.elapsed() < limit {
        if cond() {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    cond()
}

fn days(n: i64) -> TimeDelta {
    TimeDelta::days(n)
}

/// Issues `name` for alice, created at `created`, expiring at `expires` (never: `None`).
async fn issue(
    tokens: &Tokens,
    name: &str,
    created: DateTime<Utc>,
    expires: Option<DateTime<Utc>>,
) -> (TokenRecord, TokenSecret) {
    let mut new = NewToken::new("alice", name).scopes(["api"]).unwrap();
    if let Some(at) = expires {
        new = new.expires_at(at);
    }
    tokens.issue_at(new, created).await.unwrap()
}

/// A layer over the handle whose cache keeps entries, positive and negative, for 10 minutes: only
/// store events drop them.
fn layer(tokens: &Tokens) -> PatAuthLayer {
    tokens
        .layer()
        .cache(
            CacheConfig::default()
                .ttl(Duration::from_secs(600))
                .negative_ttl(Duration::from_secs(600)),
        )
        .build()
}

/// The layer's answer to `secret`: status and JSON message.
async fn answer(layer: &PatAuthLayer, secret: &TokenSecret) -> (StatusCode, String) {
    let reply = common::send_token(layer, secret).await;
    let message = if reply.status == StatusCode::OK {
        String::new()
    } else {
        reply.json()["message"]
            .as_str()
            .unwrap_or_default()
            .to_owned()
    };
    (reply.status, message)
}

// ---------------------------------------------------------------------------------------------
// The happy path, on every store

/// Old revoked and old expired records go; a recent revocation, an active token (however old)
/// and a disabled one that has not expired stay. The layer refuses the purged, serves the kept.
async fn purges_old_revoked_and_expired(tokens: Tokens) {
    let layer = layer(&tokens);
    let now = Utc::now();
    let long_ago = now - days(400);
    let (old_revoked, old_revoked_secret) = issue(&tokens, "old-revoked", long_ago, None).await;
    tokens
        .store()
        .revoke(&old_revoked.id, now - days(31))
        .await
        .unwrap();
    let (old_expired, old_expired_secret) =
        issue(&tokens, "old-expired", long_ago, Some(now - days(45))).await;
    let (recent, _) = issue(&tokens, "recently-revoked", long_ago, None).await;
    tokens
        .store()
        .revoke(&recent.id, now - days(29))
        .await
        .unwrap();
    let (active, active_secret) = issue(&tokens, "active", long_ago, None).await;
    let (disabled, _) = issue(&tokens, "disabled", long_ago, Some(now + days(1))).await;
    tokens
        .store()
        .update(&disabled.id, &TokenPatch::new(long_ago).disable())
        .await
        .unwrap();

    let retention = tokens.retention(RetentionConfig::default()).build();
    let report = retention
        .run_once()
        .await
        .unwrap()
        .expect("retention is on");
    assert_eq!(report.count, 2, "{report:?}");
    let expected_cutoff = now - days(30);
    assert!(
        (report.cutoff - expected_cutoff).abs() < TimeDelta::minutes(1),
        "{report:?}"
    );
    for gone in [&old_revoked, &old_expired] {
        assert_eq!(tokens.get(&gone.id).await.unwrap(), None, "{}", gone.name);
    }
    for kept in [&recent, &active, &disabled] {
        assert!(
            tokens.get(&kept.id).await.unwrap().is_some(),
            "{} was purged",
            kept.name
        );
    }
    assert_eq!(
        answer(&layer, &active_secret).await,
        (StatusCode::OK, String::new())
    );
    for secret in [&old_revoked_secret, &old_expired_secret] {
        assert_eq!(
            answer(&layer, secret).await,
            (
                StatusCode::UNAUTHORIZED,
                "the access token is invalid".to_owned()
            )
        );
    }
    let stats = retention.stats();
    assert_eq!((stats.runs, stats.purged, stats.errors), (1, 2, 0));

    // Nothing left to remove.
    let again = retention.run_once().await.unwrap().unwrap();
    assert_eq!(again.count, 0);
    assert_eq!(
        tokens.list(&ListQuery::default()).await.unwrap().total,
        3,
        "the kept records are all still listed"
    );
}

#[tokio::test]
async fn purges_old_revoked_and_expired_in_memory() {
    purges_old_revoked_and_expired(Tokens::new(MemoryStore::new())).await;
}

#[cfg(feature = "sqlite")]
#[tokio::test]
async fn purges_old_revoked_and_expired_in_sqlite() {
    let dir = common::tempdir();
    let store = tower_pat::SqliteStore::open(dir.join("tokens.db"))
        .await
        .unwrap();
    purges_old_revoked_and_expired(Tokens::new(store.clone())).await;
    store.close().await;
    let _ = std::fs::remove_dir_all(dir);
}

#[cfg(feature = "postgres")]
#[tokio::test]
async fn purges_old_revoked_and_expired_in_postgres() {
    let Some(db) = common::pg::TestDb::create("retention").await else {
        return;
    };
    let store = tower_pat::PostgresStore::builder()
        .connect_with(db.options.clone())
        .await
        .unwrap();
    purges_old_revoked_and_expired(Tokens::new(store.clone())).await;
    store.pool().close().await;
}

// ---------------------------------------------------------------------------------------------
// What is never removed

/// An attacker who can wait cannot get an active token purged: ten years old, never expiring,
/// never used, with the shortest retention there is, it keeps working. So does a disabled one
/// that has not expired (enabling it must bring it back).
#[tokio::test]
async fn an_active_token_is_never_purged_however_old() {
    let tokens = Tokens::new(MemoryStore::new());
    let layer = layer(&tokens);
    let decade_ago = Utc::now() - days(3650);
    let (_, secret) = issue(&tokens, "ancient", decade_ago, None).await;
    let (far, far_secret) = issue(
        &tokens,
        "far-expiry",
        decade_ago,
        Some(Utc::now() + days(3650)),
    )
    .await;
    let (disabled, disabled_secret) = issue(&tokens, "disabled", decade_ago, None).await;
    tokens
        .store()
        .update(&disabled.id, &TokenPatch::new(decade_ago).disable())
        .await
        .unwrap();

    let retention = tokens
        .retention(RetentionConfig::default().max_age(Duration::from_millis(1)))
        .build();
    for _ in 0..3 {
        assert_eq!(retention.run_once().await.unwrap().unwrap().count, 0);
    }
    assert_eq!(answer(&layer, &secret).await.0, StatusCode::OK);
    assert_eq!(answer(&layer, &far_secret).await.0, StatusCode::OK);
    assert!(tokens.get(&far.id).await.unwrap().is_some());
    tokens
        .store()
        .update(&disabled.id, &TokenPatch::new(Utc::now()).enable())
        .await
        .unwrap();
    assert_eq!(answer(&layer, &disabled_secret).await.0, StatusCode::OK);
}

/// A token revoked just after the cutoff survives the run; one revoked just before it does not.
/// Revoking the survivor again with an older time does not move it into the window: the first
/// revocation time is kept.
#[tokio::test]
async fn a_token_revoked_just_after_the_cutoff_survives() {
    let tokens = Tokens::new(MemoryStore::new());
    let now = Utc::now();
    let cutoff = now - days(30);
    let (after, _) = issue(&tokens, "after", now - days(60), None).await;
    let (before, _) = issue(&tokens, "before", now - days(60), None).await;
    let store = tokens.store();
    store
        .revoke(&after.id, cutoff + TimeDelta::seconds(5))
        .await
        .unwrap();
    store.revoke(&after.id, cutoff - days(10)).await.unwrap();
    store
        .revoke(&before.id, cutoff - TimeDelta::seconds(5))
        .await
        .unwrap();

    let report = tokens
        .retention(RetentionConfig::default())
        .build()
        .run_once()
        .await
        .unwrap()
        .unwrap();
    assert_eq!(report.count, 1);
    assert!(tokens.get(&after.id).await.unwrap().is_some());
    assert_eq!(tokens.get(&before.id).await.unwrap(), None);
}

/// A zero `max_age` keeps everything: `run_once` says retention is off, the spawned task runs
/// nothing and sends no event.
#[tokio::test]
async fn zero_keeps_everything() {
    let tokens = Tokens::new(MemoryStore::new());
    let now = Utc::now();
    let (revoked, _) = issue(&tokens, "revoked", now - days(4000), None).await;
    tokens
        .store()
        .revoke(&revoked.id, now - days(3999))
        .await
        .unwrap();
    let (expired, _) = issue(&tokens, "expired", now - days(4000), Some(now - days(3999))).await;

    let runs = Arc::new(AtomicU64::new(0));
    let counted = Arc::clone(&runs);
    let config = RetentionConfig::default()
        .max_age(Duration::ZERO)
        .interval(Duration::from_millis(10));
    let retention = tokens
        .retention(config)
        .on_run(move |_| {
            counted.fetch_add(1, Ordering::SeqCst);
        })
        .spawn();
    assert_eq!(retention.run_once().await.unwrap(), None);
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert_eq!(runs.load(Ordering::SeqCst), 0);
    assert_eq!(retention.stats().runs, 0);
    for r in [&revoked, &expired] {
        assert!(tokens.get(&r.id).await.unwrap().is_some());
    }
}

// ---------------------------------------------------------------------------------------------
// Caches: a purged token is dropped everywhere at once

/// `b`'s layer caches a token issued through `a`, which then expires. The cached entry answers
/// "expired" by the clock and is dropped; the next request's lookup remembers the refusal, and
/// later ones are answered from `b`'s cache without a lookup. Purging the token through `a` drops
/// that from `b`'s cache (through the store's change feed when `a` and `b` are two handles): `b`
/// looks it up again and finds nothing.
async fn purge_reaches_a_cache_that_held_it(a: &Tokens, b: &Tokens, same_process: bool) {
    let layer_b = layer(b);
    let expires = Utc::now() + TimeDelta::milliseconds(1200);
    let (record, secret) = issue(a, "short-lived", Utc::now(), Some(expires)).await;
    assert_eq!(answer(&layer_b, &secret).await.0, StatusCode::OK);
    assert!(layer_b.stats().cached_tokens >= 1);
    tokio::time::sleep(Duration::from_millis(1300)).await;
    let expired = (
        StatusCode::UNAUTHORIZED,
        "the access token has expired".to_owned(),
    );
    let lookups = layer_b.store_lookups();
    assert_eq!(answer(&layer_b, &secret).await, expired);
    assert_eq!(
        layer_b.store_lookups(),
        lookups,
        "the clock refused the cached entry"
    );
    assert_eq!(answer(&layer_b, &secret).await, expired);
    assert_eq!(
        layer_b.store_lookups(),
        lookups + 1,
        "one lookup, which remembers the refusal"
    );
    let lookups = layer_b.store_lookups();
    assert_eq!(answer(&layer_b, &secret).await, expired);
    assert_eq!(
        layer_b.store_lookups(),
        lookups,
        "the expired token is answered from b's cache"
    );

    let report = a
        .retention(RetentionConfig::default().max_age(Duration::from_millis(1)))
        .build()
        .run_once()
        .await
        .unwrap()
        .unwrap();
    assert_eq!(report.count, 1);
    assert_eq!(a.get(&record.id).await.unwrap(), None);
    // The layer remembers the expired token (as a positive or a negative entry) until told: the
    // answer changes from "expired" to "invalid" (an unknown token) when the purge reaches it.
    let invalid = (
        StatusCode::UNAUTHORIZED,
        "the access token is invalid".to_owned(),
    );
    let start = Instant::now();
    let mut last = answer(&layer_b, &secret).await;
    if same_process {
        assert_eq!(
            last, invalid,
            "in-process the purge drops the entry before it returns"
        );
    }
    while last != invalid && start.elapsed() < Duration::from_secs(2) {
        tokio::time::sleep(Duration::from_millis(5)).await;
        last = answer(&layer_b, &secret).await;
    }
    assert_eq!(
        last, invalid,
        "the purge must drop the token from b's cache"
    );
    let _ = std::io::Write::write_fmt(
        &mut std::io::stderr(),
        format_args!("purge reached the other cache in {:?}\n", start.elapsed()),
    );
    assert!(layer_b.store_lookups() > lookups, "b looked it up again");
}

#[tokio::test]
async fn a_purged_token_leaves_the_cache_in_memory() {
    let tokens = Tokens::new(MemoryStore::new());
    purge_reaches_a_cache_that_held_it(&tokens, &tokens, true).await;
}

/// Two servers on one SQLite file: the purge reaches the other's cache through the change log.
#[cfg(feature = "sqlite")]
#[tokio::test]
async fn a_purged_token_leaves_another_nodes_cache_over_sqlite() {
    let dir = common::tempdir();
    let path = dir.join("tokens.db");
    let a = tower_pat::SqliteStore::open(&path).await.unwrap();
    let b = tower_pat::SqliteStore::open(&path).await.unwrap();
    purge_reaches_a_cache_that_held_it(&Tokens::new(a.clone()), &Tokens::new(b.clone()), false)
        .await;
    a.close().await;
    b.close().await;
    let _ = std::fs::remove_dir_all(dir);
}

#[cfg(feature = "postgres")]
async fn pg_nodes(db: &common::pg::TestDb) -> (tower_pat::PostgresStore, tower_pat::PostgresStore) {
    let connect = || {
        tower_pat::PostgresStore::builder()
            .max_connections(4)
            .connect_with(db.options.clone())
    };
    (connect().await.unwrap(), connect().await.unwrap())
}

/// Two nodes over one PostgreSQL database: the purge reaches the other's cache through `NOTIFY`.
#[cfg(feature = "postgres")]
#[tokio::test]
async fn a_purged_token_leaves_another_nodes_cache_over_postgres() {
    let Some(db) = common::pg::TestDb::create("retention").await else {
        return;
    };
    let (a, b) = pg_nodes(&db).await;
    purge_reaches_a_cache_that_held_it(&Tokens::new(a.clone()), &Tokens::new(b.clone()), false)
        .await;
    a.pool().close().await;
    b.pool().close().await;
}

/// Two nodes purging one PostgreSQL database at once, in small batches: every purgeable record
/// is removed once and counted once (the counts of both runs add up to exactly the records
/// removed), and each record is returned by one `purge` call only.
#[cfg(feature = "postgres")]
#[tokio::test]
async fn concurrent_purgers_over_postgres_never_purge_or_count_twice() {
    let Some(db) = common::pg::TestDb::create("retention").await else {
        return;
    };
    let (a, b) = pg_nodes(&db).await;
    let (ta, tb) = (Tokens::new(a.clone()), Tokens::new(b.clone()));
    let now = Utc::now();
    let long_ago = now - days(100);
    let mut purgeable = std::collections::BTreeSet::new();
    for i in 0..240 {
        let expires = (i % 2 == 0).then_some(now - days(50));
        let (r, _) = issue(&ta, &format!("old-{i}"), long_ago, expires).await;
        if expires.is_none() {
            ta.store().revoke(&r.id, now - days(40)).await.unwrap();
        }
        purgeable.insert(r.id);
    }
    for i in 0..10 {
        issue(&ta, &format!("active-{i}"), long_ago, None).await;
    }

    let config = RetentionConfig::default()
        .batch_size(7)
        .pause(Duration::ZERO);
    let (ra, rb) = (
        ta.retention(config.clone()).build(),
        tb.retention(config).build(),
    );
    let (x, y) = tokio::join!(ra.run_once(), rb.run_once());
    let (x, y) = (x.unwrap().unwrap(), y.unwrap().unwrap());
    assert_eq!(x.count + y.count, 240, "{x:?} {y:?}");
    assert_eq!(ra.stats().purged + rb.stats().purged, 240);
    assert_eq!(ta.list(&ListQuery::default()).await.unwrap().total, 10);

    // The store calls themselves: disjoint batches.
    let cutoff = now - days(30);
    let mut more = std::collections::BTreeSet::new();
    for i in 0..120 {
        let (r, _) = issue(&ta, &format!("more-{i}"), long_ago, Some(now - days(50))).await;
        more.insert(r.id);
    }
    async fn drain(store: &tower_pat::PostgresStore, cutoff: DateTime<Utc>) -> Vec<String> {
        let mut ids = Vec::new();
        loop {
            let batch = store.purge(cutoff, 5).await.unwrap();
            ids.extend(batch.iter().map(|r| r.id.clone()));
            if batch.len() < 5 {
                return ids;
            }
        }
    }
    let (ia, ib) = tokio::join!(drain(&a, cutoff), drain(&b, cutoff));
    let total = ia.len() + ib.len();
    let union: std::collections::BTreeSet<String> = ia.into_iter().chain(ib).collect();
    assert_eq!(total, 120, "no record returned twice");
    assert_eq!(union, more);
    a.pool().close().await;
    b.pool().close().await;
}

/// A row another transaction holds (an update in progress on another node) is skipped, not
/// waited for: the purge returns at once with the others. When that transaction extends the
/// token's expiry, the next purge keeps it.
#[cfg(feature = "postgres")]
#[tokio::test]
async fn a_locked_row_is_skipped_and_judged_again_after_its_change() {
    use tower_pat::store::sqlx;
    let Some(db) = common::pg::TestDb::create("retention").await else {
        return;
    };
    let (a, _b) = pg_nodes(&db).await;
    let tokens = Tokens::new(a.clone());
    let now = Utc::now();
    let (held, _) = issue(&tokens, "held", now - days(90), Some(now - days(60))).await;
    let (other, _) = issue(&tokens, "other", now - days(90), Some(now - days(60))).await;

    let mut tx = a.pool().begin().await.unwrap();
    sqlx::query("SELECT id FROM tower_pat_tokens WHERE id = $1 FOR UPDATE")
        .bind(&held.id)
        .execute(&mut *tx)
        .await
        .unwrap();
    let retention = tokens.retention(RetentionConfig::default()).build();
    let report = tokio::time::timeout(Duration::from_secs(2), retention.run_once())
        .await
        .expect("the purge must not wait for a locked row")
        .unwrap()
        .unwrap();
    assert_eq!(report.count, 1);
    assert_eq!(tokens.get(&other.id).await.unwrap(), None);
    sqlx::query("UPDATE tower_pat_tokens SET expires_at = $2 WHERE id = $1")
        .bind(&held.id)
        .bind(now + days(10))
        .execute(&mut *tx)
        .await
        .unwrap();
    tx.commit().await.unwrap();
    assert_eq!(retention.run_once().await.unwrap().unwrap().count, 0);
    assert!(tokens.get(&held.id).await.unwrap().is_some());
    a.pool().close().await;
}

// ---------------------------------------------------------------------------------------------
// The background task and its events

/// The spawned task runs at once and then every interval, batch after batch until a batch comes
/// back short; one `on_run` call per run, with that run's count. It stops at `shutdown`.
#[tokio::test]
async fn the_task_purges_in_batches_with_one_report_per_run() {
    let tokens = Tokens::new(MemoryStore::new());
    let now = Utc::now();
    for i in 0..5 {
        let (r, _) = issue(&tokens, &format!("old-{i}"), now - days(90), None).await;
        tokens.store().revoke(&r.id, now - days(60)).await.unwrap();
    }
    issue(&tokens, "active", now - days(90), None).await;
    let reports: Arc<Mutex<Vec<PurgeReport>>> = Arc::default();
    let seen = Arc::clone(&reports);
    let retention = tokens
        .retention(
            RetentionConfig::default()
                .batch_size(2)
                .interval(Duration::from_millis(30)),
        )
        .on_run(move |r| seen.lock().unwrap().push(*r))
        .spawn();
    assert!(wait_for(Duration::from_secs(5), || retention.stats().runs >= 3).await);
    retention.shutdown().await;
    let runs = retention.stats().runs;
    let reports = reports.lock().unwrap().clone();
    assert_eq!(reports.len() as u64, runs, "one report per run");
    assert_eq!(reports[0].count, 5, "the first run removes everything");
    assert_eq!(
        reports[0].batches, 3,
        "2 + 2 + 1: until a batch comes back short"
    );
    assert!(reports[1..].iter().all(|r| r.count == 0));
    assert_eq!(tokens.list(&ListQuery::default()).await.unwrap().total, 1);

    tokio::time::sleep(Duration::from_millis(100)).await;
    assert_eq!(retention.stats().runs, runs, "no run after shutdown");

    // `run_once` still works after shutdown, every batch of it.
    for i in 0..3 {
        let (r, _) = issue(&tokens, &format!("later-{i}"), now - days(90), None).await;
        tokens.store().revoke(&r.id, now - days(60)).await.unwrap();
    }
    let report = retention.run_once().await.unwrap().unwrap();
    assert_eq!((report.count, report.batches), (3, 2));
    assert_eq!(tokens.list(&ListQuery::default()).await.unwrap().total, 1);
}

/// An age too large to subtract from now removes nothing and asks the store nothing.
#[tokio::test]
async fn an_enormous_max_age_removes_nothing() {
    let tokens = Tokens::new(MemoryStore::new());
    let (r, _) = issue(&tokens, "old", Utc::now() - days(3650), None).await;
    tokens
        .store()
        .revoke(&r.id, Utc::now() - days(3650))
        .await
        .unwrap();
    let report = tokens
        .retention(RetentionConfig::default().max_age(Duration::MAX))
        .build()
        .run_once()
        .await
        .unwrap()
        .unwrap();
    assert_eq!((report.count, report.batches), (0, 0));
    assert!(tokens.get(&r.id).await.unwrap().is_some());
}

/// Dropping every handle stops the task.
#[tokio::test]
async fn dropping_the_handle_stops_the_task() {
    let tokens = Tokens::new(MemoryStore::new());
    let runs = Arc::new(AtomicU64::new(0));
    let counted = Arc::clone(&runs);
    let retention = tokens
        .retention(RetentionConfig::default().interval(Duration::from_millis(10)))
        .on_run(move |_| {
            counted.fetch_add(1, Ordering::SeqCst);
        })
        .spawn();
    assert!(wait_for(Duration::from_secs(5), || runs.load(Ordering::SeqCst) >= 2).await);
    drop(retention);
    tokio::time::sleep(Duration::from_millis(30)).await;
    let after_drop = runs.load(Ordering::SeqCst);
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert_eq!(runs.load(Ordering::SeqCst), after_drop);
}

/// One signed webhook delivery per run, `personalAccessToken.purged` with the run's count and
/// cutoff, naming no token: no id, no name, no subject, no hash, no secret.
#[cfg(feature = "admin")]
#[tokio::test]
async fn one_signed_event_per_run_with_the_count_and_no_secret() {
    use axum::Router;
    use axum::body::Bytes;
    use axum::extract::State;
    use axum::routing::post;
    use http::HeaderMap;
    use tokio::sync::mpsc;
    use tower_pat::admin::{
        EVENT_HEADER, EventKind, PurgeEvent, SIGNATURE_HEADER, TIMESTAMP_HEADER, WebhookSink,
        verify_signature,
    };

    async fn hook(
        State(tx): State<mpsc::UnboundedSender<(HeaderMap, Bytes)>>,
        headers: HeaderMap,
        body: Bytes,
    ) -> StatusCode {
        let _ = tx.send((headers, body));
        StatusCode::OK
    }
    let (tx, mut rx) = mpsc::unbounded_channel();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}/hook", listener.local_addr().unwrap());
    let app = Router::new().route("/hook", post(hook)).with_state(tx);
    tokio::spawn(async move { axum::serve(listener, app).await });
    const KEY: &[u8] = b"retention webhook key";
    let sink = WebhookSink::builder(&url, KEY).unwrap().spawn();

    let tokens = Tokens::new(MemoryStore::new());
    let now = Utc::now();
    let mut purged = Vec::new();
    for i in 0..3 {
        let (r, secret) = issue(&tokens, &format!("old-{i}"), now - days(90), None).await;
        tokens.store().revoke(&r.id, now - days(60)).await.unwrap();
        purged.push((r, secret));
    }
    let retention = tokens
        .retention(RetentionConfig::default())
        .events(sink.clone())
        .build();
    let first = retention.run_once().await.unwrap().unwrap();
    let second = retention.run_once().await.unwrap().unwrap();

    let mut received = Vec::new();
    for _ in 0..2 {
        let (headers, body) = tokio::time::timeout(Duration::from_secs(10), rx.recv())
            .await
            .expect("a delivery per run")
            .unwrap();
        assert_eq!(headers[EVENT_HEADER], "personalAccessToken.purged");
        verify_signature(
            KEY,
            headers[TIMESTAMP_HEADER].as_bytes(),
            &body,
            headers[SIGNATURE_HEADER].as_bytes(),
            Utc::now(),
            Duration::from_secs(300),
        )
        .expect("a correctly signed delivery");
        let text = std::str::from_utf8(&body).unwrap();
        for (r, secret) in &purged {
            for never in [
                r.id.as_str(),
                r.name.as_str(),
                r.subject.as_str(),
                &r.hash.to_hex(),
                secret.expose_secret(),
            ] {
                assert!(!text.contains(never), "{text} contains {never}");
            }
        }
        let value: serde_json::Value = serde_json::from_slice(&body).unwrap();
        assert_eq!(value["event"], "personalAccessToken.purged");
        assert!(value["triggeredAt"].is_string());
        let data: Vec<&String> = value["data"].as_object().unwrap().keys().collect();
        assert_eq!(data, ["count", "cutoff"]);
        let event: PurgeEvent = serde_json::from_slice(&body).unwrap();
        assert_eq!(event.event, EventKind::Purged);
        received.push(event);
    }
    assert_eq!(received[0].data.count, 3);
    assert_eq!(received[0].data.cutoff, first.cutoff);
    assert_eq!(received[1].data.count, 0);
    assert_eq!(received[1].data.cutoff, second.cutoff);
    assert!(
        tokio::time::timeout(Duration::from_millis(200), rx.recv())
            .await
            .is_err(),
        "exactly one event per run"
    );
}

/// The OpenAPI document lists the purge event and its payload.
#[cfg(feature = "admin")]
#[test]
fn the_openapi_document_lists_the_purge_event() {
    let doc = serde_json::to_value(tower_pat::admin::openapi()).unwrap();
    let schemas = &doc["components"]["schemas"];
    let kinds = serde_json::to_string(&schemas["EventKind"]).unwrap();
    assert!(kinds.contains("personalAccessToken.purged"), "{kinds}");
    let props = |name: &str| -> Vec<String> {
        let mut keys: Vec<String> = schemas[name]["properties"]
            .as_object()
            .unwrap_or_else(|| panic!("{name} is not in the document"))
            .keys()
            .cloned()
            .collect();
        keys.sort();
        keys
    };
    assert_eq!(props("PurgeEvent"), ["data", "event", "triggeredAt"]);
    assert_eq!(props("PurgeSummary"), ["count", "cutoff"]);
}

// ---------------------------------------------------------------------------------------------
// Stores that cannot purge, or fail

/// A `MemoryStore` whose `purge` fails while `failing` is set.
#[derive(Clone, Default)]
struct Flaky {
    inner: MemoryStore,
    failing: Arc<AtomicBool>,
}

#[async_trait]
impl TokenLookup for Flaky {
    async fn find_by_hash(&self, hash: &TokenHash) -> Result<Option<TokenRecord>, StoreError> {
        self.inner.find_by_hash(hash).await
    }

    async fn record_usage(&self, updates: &[UsageUpdate]) -> Result<(), StoreError> {
        self.inner.record_usage(updates).await
    }

    fn subscribe(&self, listener: Weak<dyn ChangeListener>) -> bool {
        self.inner.subscribe(listener)
    }
}

#[async_trait]
impl TokenStore for Flaky {
    async fn insert(&self, record: &TokenRecord) -> Result<(), StoreError> {
        self.inner.insert(record).await
    }

    async fn get(&self, id: &str) -> Result<Option<TokenRecord>, StoreError> {
        self.inner.get(id).await
    }

    async fn list(&self, query: &ListQuery) -> Result<Page, StoreError> {
        self.inner.list(query).await
    }

    async fn update(&self, id: &str, patch: &TokenPatch) -> Result<TokenRecord, StoreError> {
        self.inner.update(id, patch).await
    }

    async fn rotate(&self, id: &str, rotation: &Rotation) -> Result<TokenRecord, StoreError> {
        self.inner.rotate(id, rotation).await
    }

    async fn revoke(&self, id: &str, at: DateTime<Utc>) -> Result<Option<TokenRecord>, StoreError> {
        self.inner.revoke(id, at).await
    }

    async fn delete(&self, id: &str) -> Result<Option<TokenRecord>, StoreError> {
        self.inner.delete(id).await
    }

    async fn count_by_subject(&self, subject: &str) -> Result<u64, StoreError> {
        self.inner.count_by_subject(subject).await
    }

    async fn purge(
        &self,
        cutoff: DateTime<Utc>,
        limit: usize,
    ) -> Result<Vec<TokenRecord>, StoreError> {
        if self.failing.load(Ordering::SeqCst) {
            return Err(StoreError::backend("the database is down"));
        }
        self.inner.purge(cutoff, limit).await
    }
}

/// Someone else's store, written before `purge` existed: everything delegated to a `MemoryStore`
/// but `purge`, which keeps the trait's default.
#[derive(Clone, Default)]
struct Legacy(MemoryStore);

#[async_trait]
impl TokenLookup for Legacy {
    async fn find_by_hash(&self, hash: &TokenHash) -> Result<Option<TokenRecord>, StoreError> {
        self.0.find_by_hash(hash).await
    }
}

#[async_trait]
impl TokenStore for Legacy {
    async fn insert(&self, record: &TokenRecord) -> Result<(), StoreError> {
        self.0.insert(record).await
    }

    async fn get(&self, id: &str) -> Result<Option<TokenRecord>, StoreError> {
        self.0.get(id).await
    }

    async fn list(&self, query: &ListQuery) -> Result<Page, StoreError> {
        self.0.list(query).await
    }

    async fn update(&self, id: &str, patch: &TokenPatch) -> Result<TokenRecord, StoreError> {
        self.0.update(id, patch).await
    }

    async fn rotate(&self, id: &str, rotation: &Rotation) -> Result<TokenRecord, StoreError> {
        self.0.rotate(id, rotation).await
    }

    async fn revoke(&self, id: &str, at: DateTime<Utc>) -> Result<Option<TokenRecord>, StoreError> {
        self.0.revoke(id, at).await
    }

    async fn delete(&self, id: &str) -> Result<Option<TokenRecord>, StoreError> {
        self.0.delete(id).await
    }

    async fn count_by_subject(&self, subject: &str) -> Result<u64, StoreError> {
        self.0.count_by_subject(subject).await
    }
    // No `purge`: the trait's default.
}

/// A store that does not implement `purge` gets a clear error, no panic: from `run_once`, and
/// from the task, which counts it and tries again at the next interval; nothing is removed.
#[tokio::test]
async fn a_store_without_purge_gives_a_clear_error() {
    let store = Legacy::default();
    let tokens = Tokens::new(store.clone());
    let now = Utc::now();
    let (r, _) = issue(&tokens, "old", now - days(90), None).await;
    tokens.store().revoke(&r.id, now - days(60)).await.unwrap();

    let retention = tokens
        .retention(RetentionConfig::default().interval(Duration::from_millis(10)))
        .spawn();
    let err = retention.run_once().await.unwrap_err();
    assert!(
        matches!(err, StoreError::Unsupported { operation: "purge" }),
        "{err:?}"
    );
    assert_eq!(err.to_string(), "this token store does not support purge");
    assert!(wait_for(Duration::from_secs(5), || retention.stats().errors >= 3).await);
    assert_eq!(retention.stats().runs, 0);
    assert_eq!(retention.stats().purged, 0);
    assert!(tokens.get(&r.id).await.unwrap().is_some());
    retention.shutdown().await;
}

/// A store that fails is retried at the next interval; once it answers, the records go.
#[tokio::test]
async fn a_failing_store_is_retried_at_the_next_interval() {
    let failing = Arc::new(AtomicBool::new(true));
    let store = Flaky {
        inner: MemoryStore::new(),
        failing: Arc::clone(&failing),
    };
    let tokens = Tokens::new(store);
    let now = Utc::now();
    let (r, _) = issue(&tokens, "old", now - days(90), Some(now - days(40))).await;

    let retention = tokens
        .retention(RetentionConfig::default().interval(Duration::from_millis(20)))
        .spawn();
    assert!(wait_for(Duration::from_secs(5), || retention.stats().errors >= 2).await);
    assert!(tokens.get(&r.id).await.unwrap().is_some());
    failing.store(false, Ordering::SeqCst);
    assert!(wait_for(Duration::from_secs(5), || retention.stats().purged == 1).await);
    assert_eq!(tokens.get(&r.id).await.unwrap(), None);
    retention.shutdown().await;
}

/// The defaults the docs promise.
#[test]
fn defaults() {
    let c = RetentionConfig::default();
    assert_eq!(c.max_age, 30 * DAY);
    assert_eq!(c.batch_size, 500);
    assert_eq!(c.interval, Duration::from_secs(3600));
    assert_eq!(c.pause, Duration::from_millis(100));
    assert!(c.is_enabled());
    let now = Utc::now();
    assert_eq!(c.cutoff(now), Some(now - days(30)));
    assert_eq!(c.clone().max_age(Duration::ZERO).cutoff(now), None);
    assert_eq!(
        c.clone().max_age(Duration::MAX).cutoff(now),
        Some(DateTime::<Utc>::UNIX_EPOCH)
    );
    // Ten thousand years: representable by chrono, not by PostgreSQL.
    assert_eq!(
        c.max_age(Duration::from_secs(10_000 * 366 * 86_400))
            .cutoff(now),
        Some(DateTime::<Utc>::UNIX_EPOCH)
    );
}

/// The migrations add the indexes the purge statement reads (SQLite migration 5, PostgreSQL
/// migration 4), and the purge's lookup uses them rather than scanning the table.
#[cfg(feature = "sqlite")]
#[tokio::test]
async fn sqlite_migration_5_indexes_revocation_and_expiry() {
    use tower_pat::store::sqlx::{self, ConnectOptions};
    let dir = common::tempdir();
    let path = dir.join("tokens.db");
    let store = tower_pat::SqliteStore::open(&path).await.unwrap();
    store.close().await;
    let mut conn = sqlx::sqlite::SqliteConnectOptions::new()
        .filename(&path)
        .connect()
        .await
        .unwrap();
    let version: i64 = sqlx::query_scalar("SELECT MAX(version) FROM tower_pat_schema_version")
        .fetch_one(&mut conn)
        .await
        .unwrap();
    assert!(version >= 5, "{version}");
    let mut indexes: Vec<String> = sqlx::query_scalar(
        "SELECT name FROM sqlite_master WHERE type = 'index' AND name LIKE '%_at'",
    )
    .fetch_all(&mut conn)
    .await
    .unwrap();
    indexes.sort();
    assert_eq!(
        indexes,
        ["tower_pat_tokens_expires_at", "tower_pat_tokens_revoked_at"]
    );
    let plan: Vec<String> = sqlx::query(
        "EXPLAIN QUERY PLAN SELECT id FROM tower_pat_tokens \
         WHERE (revoked_at < 1 OR expires_at < 1) LIMIT 10",
    )
    .fetch_all(&mut conn)
    .await
    .unwrap()
    .iter()
    .map(|row| sqlx::Row::get::<String, _>(row, "detail"))
    .collect();
    let plan = plan.join("; ");
    assert!(
        plan.contains("tower_pat_tokens_revoked_at")
            && plan.contains("tower_pat_tokens_expires_at"),
        "{plan}"
    );
    drop(conn);
    let _ = std::fs::remove_dir_all(dir);
}

#[cfg(feature = "postgres")]
#[tokio::test]
async fn postgres_migration_4_indexes_revocation_and_expiry() {
    use tower_pat::store::sqlx;
    let Some(db) = common::pg::TestDb::create("retention").await else {
        return;
    };
    let (a, _b) = pg_nodes(&db).await;
    let version: i64 = sqlx::query_scalar("SELECT MAX(version) FROM tower_pat_schema_version")
        .fetch_one(a.pool())
        .await
        .unwrap();
    assert!(version >= 4, "{version}");
    let mut indexes: Vec<String> = sqlx::query_scalar(
        "SELECT indexname::text FROM pg_indexes WHERE tablename = 'tower_pat_tokens' \
         AND indexname IN ('tower_pat_tokens_revoked_at_idx', 'tower_pat_tokens_expires_at_idx')",
    )
    .fetch_all(a.pool())
    .await
    .unwrap();
    indexes.sort();
    assert_eq!(
        indexes,
        [
            "tower_pat_tokens_expires_at_idx",
            "tower_pat_tokens_revoked_at_idx"
        ]
    );
    a.pool().close().await;
}
