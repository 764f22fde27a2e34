//! The SQLite cross-process change feed: two `SqliteStore` handles on one file (each with its own
//! cache, as two servers), and a second *process* (this test binary re-run as a child) revoking on
//! the same file. A revocation made elsewhere must reach a running layer within 1 s.
#![cfg(feature = "sqlite")]

mod common;

use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use chrono::Utc;
use http::StatusCode;
use sqlx::{ConnectOptions, Connection};
use tower_pat::store::SqliteStore;
use tower_pat::store::sqlite::CHANGE_LOG_KEEP;
use tower_pat::{CacheConfig, NewToken, PatAuthLayer, TokenPatch, TokenRecord, TokenStore, Tokens};

/// Set in the child process: `<database path> <token id>` to revoke.
const CHILD_ENV: &str = "TOWER_PAT_FEED_CHILD_REVOKE";

/// One server: its own handle on the file, its own cache.
struct Node {
    store: SqliteStore,
    tokens: Tokens,
    layer: PatAuthLayer,
}

impl Node {
    async fn open(path: &Path) -> Self {
        Self::with_store(SqliteStore::open(path).await.unwrap())
    }

    fn with_store(store: SqliteStore) -> Self {
        let tokens = Tokens::new(store.clone());
        let layer = tokens
            .layer()
            .cache(CacheConfig::default().ttl(Duration::from_secs(600)))
            .build();
        Self {
            store,
            tokens,
            layer,
        }
    }

    async fn code(&self, token: &str) -> StatusCode {
        common::send(&self.layer, common::request(Some(token), None))
            .await
            .status
    }

    async fn issue(&self, name: &str) -> (TokenRecord, String) {
        let new = NewToken::new("alice", name).scopes(["api"]).unwrap();
        let (record, secret) = self.tokens.issue(new).await.unwrap();
        (record, secret.expose_secret().to_owned())
    }

    /// A token this node has verified and cached (a second check makes no store lookup).
    async fn cached(&self, name: &str) -> (TokenRecord, String) {
        let (record, token) = self.issue(name).await;
        assert_eq!(self.code(&token).await, StatusCode::OK);
        let lookups = self.layer.store_lookups();
        assert_eq!(self.code(&token).await, StatusCode::OK);
        assert_eq!(self.layer.store_lookups(), lookups, "served from the cache");
        (record, token)
    }
}

/// Polls `cond` every millisecond for at most `limit`; how long it took, or `None`.
async fn wait_for(limit: Duration, mut cond: impl AsyncFnMut() -> bool) -> Option<Duration> {
    let start = Instant::now();
    while start.elapsed() < limit {
        if cond().await {
            return Some(start.elapsed());
        }
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    None
}

fn db(dir: &Path) -> PathBuf {
    dir.join("tokens.db")
}

/// A plain connection to the file, as another program would have.
async fn raw(path: &Path) -> sqlx::SqliteConnection {
    sqlx::sqlite::SqliteConnectOptions::new()
        .filename(path)
        .busy_timeout(Duration::from_secs(5))
        .connect()
        .await
        .unwrap()
}

async fn log_rows(path: &Path) -> i64 {
    let mut c = raw(path).await;
    let n = sqlx::query_scalar("SELECT COUNT(*) FROM tower_pat_changes")
        .fetch_one(&mut c)
        .await
        .unwrap();
    c.close().await.unwrap();
    n
}

fn spread(what: &str, mut times: Vec<Duration>) {
    times.sort();
    let _ = writeln!(
        std::io::stderr(),
        "{what} ({} runs): min {:?}, median {:?}, max {:?}",
        times.len(),
        times[0],
        times[times.len() / 2],
        times[times.len() - 1]
    );
}

/// Not a test of its own: the child process's body. Without the variable it does nothing.
#[tokio::test]
async fn child_revoke() {
    let Ok(arg) = std::env::var(CHILD_ENV) else {
        return;
    };
    let (path, id) = arg.rsplit_once(' ').unwrap();
    let store = SqliteStore::open(path).await.unwrap();
    store.revoke(id, Utc::now()).await.unwrap().unwrap();
    store.close().await;
}

#[tokio::test]
async fn a_revocation_by_another_process_reaches_a_running_server_within_a_second() {
    let dir = common::tempdir();
    let path = db(&dir);
    let server = Node::open(&path).await;
    let mut times = Vec::new();
    for i in 0..5 {
        let (record, token) = server.cached(&format!("t{i}")).await;
        let status = std::process::Command::new(std::env::current_exe().unwrap())
            .args(["--exact", "child_revoke", "--test-threads=1", "--quiet"])
            .env(CHILD_ENV, format!("{} {}", path.display(), record.id))
            .stdout(std::process::Stdio::null())
            .status()
            .unwrap();
        assert!(status.success(), "the child process failed");
        // The child has committed and exited: from here the server has 1 s.
        let revoked = wait_for(Duration::from_secs(1), async || {
            server.code(&token).await == StatusCode::UNAUTHORIZED
        })
        .await;
        times.push(
            revoked.expect("the server still accepts a token revoked by another process after 1 s"),
        );
    }
    assert!(server.store.feed_connected());
    spread("SQLite revocation, child process exit -> first 401", times);
}

#[tokio::test]
async fn a_revocation_through_another_handle_reaches_this_one_within_a_second() {
    let dir = common::tempdir();
    let path = db(&dir);
    let a = Node::open(&path).await;
    let b = Node::open(&path).await;
    let mut times = Vec::new();
    for i in 0..5 {
        let (record, token) = b.cached(&format!("r{i}")).await;
        let start = Instant::now();
        a.tokens.revoke(&record.id).await.unwrap().unwrap();
        let revoked = wait_for(Duration::from_secs(1), async || {
            b.code(&token).await == StatusCode::UNAUTHORIZED
        })
        .await;
        assert!(revoked.is_some(), "B accepts a token A revoked after 1 s");
        times.push(start.elapsed());
    }
    // An update (here: the scopes) drops B's cached entry too: B looks the token up again.
    let (record, token) = b.cached("upd").await;
    let before = b.layer.store_lookups();
    let patch = TokenPatch::new(Utc::now()).scopes(common::scopes(&["other"]));
    a.store.update(&record.id, &patch).await.unwrap();
    assert!(
        wait_for(Duration::from_secs(1), async || {
            b.code(&token).await;
            b.layer.store_lookups() > before
        })
        .await
        .is_some(),
        "B still serves its cached entry 1 s after A updated the record"
    );
    let (record, token) = b.cached("del").await;
    a.tokens.delete(&record.id).await.unwrap().unwrap();
    assert!(
        wait_for(Duration::from_secs(1), async || b.code(&token).await
            == StatusCode::UNAUTHORIZED)
        .await
        .is_some(),
        "B accepts a token A deleted after 1 s"
    );
    spread(
        "SQLite revocation, handle A revoke call -> first 401 on B",
        times,
    );
}

/// A revocation whose future is dropped after its commit and before it was announced (the client
/// went away, a timeout fired) still reaches the writing handle's own cache: the poller announces
/// the handle's own change-log rows too. Before, it skipped them, and the token stayed admitted
/// here for the cache's TTL while the database said revoked.
#[tokio::test]
async fn a_revocation_dropped_after_its_commit_still_reaches_the_writers_cache() {
    use std::future::Future;
    use std::task::{Context, Poll, Waker};
    let dir = common::tempdir();
    let b = Node::open(&db(&dir)).await;
    let mut dropped_after_commit = 0;
    for attempt in 0..20 {
        let (record, token) = b.cached(&format!("dropped-{attempt}")).await;
        let mut revoke = Box::pin(b.store.revoke(&record.id, Utc::now()));
        let mut cx = Context::from_waker(Waker::noop());
        // Poll the revocation only until the database shows it, then drop it unpolled: it is
        // then parked at (or before) its commit's acknowledgement, never at its announcement.
        let committed = loop {
            if let Poll::Ready(done) = revoke.as_mut().poll(&mut cx) {
                done.unwrap();
                break false;
            }
            tokio::time::sleep(Duration::from_micros(200)).await;
            let stored = b.store.get(&record.id).await.unwrap().unwrap();
            if stored.is_revoked() {
                break true;
            }
        };
        drop(revoke);
        if !committed {
            // It completed (and announced) before the database was seen revoked: try again.
            continue;
        }
        dropped_after_commit += 1;
        let refused = wait_for(Duration::from_secs(2), async || {
            b.code(&token).await == StatusCode::UNAUTHORIZED
        })
        .await;
        assert!(
            refused.is_some(),
            "a committed revocation whose future was dropped was never applied to this cache"
        );
    }
    assert!(
        dropped_after_commit > 0,
        "no revocation was dropped between its commit and its announcement"
    );
}

/// A revocation by A racing B's cache fill of the same token: whichever order they land in, B
/// refuses the token within 1 s of the revocation and never accepts it again.
#[tokio::test]
async fn a_revocation_racing_a_cache_fill_in_the_other_handle_is_never_undone() {
    let dir = common::tempdir();
    let path = db(&dir);
    let a = Node::open(&path).await;
    let b = Node::open(&path).await;
    for i in 0..20 {
        let (record, token) = a.issue(&format!("race{i}")).await;
        let fill = async {
            for _ in 0..5 {
                b.code(&token).await;
            }
        };
        let revoke = async {
            tokio::time::sleep(Duration::from_micros(200 * (i % 5))).await;
            a.tokens.revoke(&record.id).await.unwrap().unwrap();
        };
        tokio::join!(fill, revoke);
        let refused = wait_for(Duration::from_secs(1), async || {
            b.code(&token).await == StatusCode::UNAUTHORIZED
        })
        .await;
        assert!(
            refused.is_some(),
            "round {i}: B accepts a revoked token after 1 s"
        );
        for _ in 0..5 {
            assert_eq!(b.code(&token).await, StatusCode::UNAUTHORIZED, "round {i}");
        }
    }
}

/// A poll that fails (here another program renamed the change log away) marks B's feed down:
/// `max_staleness` grows and a revocation B could not hear about is applied once the feed is back,
/// since B then drops everything it cached.
#[tokio::test]
async fn a_failing_poll_marks_the_feed_down_and_recovery_drops_the_cache() {
    let dir = common::tempdir();
    let path = db(&dir);
    let b = Node::open(&path).await;
    let (record, token) = b.cached("down").await;
    assert_eq!(b.layer.max_staleness(), Duration::ZERO);

    let mut other = raw(&path).await;
    sqlx::query("ALTER TABLE tower_pat_changes RENAME TO tower_pat_changes_away")
        .execute(&mut other)
        .await
        .unwrap();
    assert!(
        wait_for(Duration::from_secs(1), async || !b.store.feed_connected())
            .await
            .is_some(),
        "the feed still reports connected 1 s after its polls started failing"
    );
    let before = b.layer.max_staleness();
    tokio::time::sleep(Duration::from_millis(50)).await;
    assert!(b.layer.max_staleness() > before && before > Duration::ZERO);
    // A revocation written behind the log's back (no change-log row): B cannot hear of it.
    sqlx::query("UPDATE tower_pat_tokens SET revoked_at = ?1 WHERE id = ?2")
        .bind(Utc::now().timestamp_micros())
        .bind(&record.id)
        .execute(&mut other)
        .await
        .unwrap();

    sqlx::query("ALTER TABLE tower_pat_changes_away RENAME TO tower_pat_changes")
        .execute(&mut other)
        .await
        .unwrap();
    assert!(
        wait_for(Duration::from_secs(1), async || b.store.feed_connected())
            .await
            .is_some(),
        "the feed did not come back"
    );
    assert_eq!(b.layer.max_staleness(), Duration::ZERO);
    assert_eq!(
        b.code(&token).await,
        StatusCode::UNAUTHORIZED,
        "a token cached before the outage was served after it"
    );
}

/// A flood of management writes keeps the change log at `CHANGE_LOG_KEEP` rows, and B, polling
/// behind it, still ends up refusing a token revoked at the end of the flood.
#[tokio::test]
async fn a_flood_of_writes_keeps_the_change_log_bounded() {
    let dir = common::tempdir();
    let path = db(&dir);
    let a = Node::open(&path).await;
    let b = Node::open(&path).await;
    let (record, _) = a.issue("flood").await;
    let writes = usize::try_from(CHANGE_LOG_KEEP).unwrap() + 300;
    for i in 0..writes {
        let patch = TokenPatch::new(Utc::now()).name(format!("flood{i}"));
        a.store.update(&record.id, &patch).await.unwrap();
    }
    assert_eq!(log_rows(&path).await, CHANGE_LOG_KEEP);
    let (victim, token) = b.cached("victim").await;
    a.tokens.revoke(&victim.id).await.unwrap().unwrap();
    assert!(
        wait_for(Duration::from_secs(1), async || b.code(&token).await
            == StatusCode::UNAUTHORIZED)
        .await
        .is_some(),
        "B accepts a token revoked after a flood"
    );
    assert!(b.store.feed_connected());
}

/// A poller that fell more than `CHANGE_LOG_KEEP` rows behind cannot know what it missed: it
/// reloads its caches. Here B polls every 4 s; meanwhile a token it cached is revoked behind the
/// log's back and a flood pushes the log past B's last row.
#[tokio::test]
async fn a_poller_that_falls_behind_the_pruned_log_drops_its_cache() {
    let dir = common::tempdir();
    let path = db(&dir);
    let a = Node::open(&path).await;
    let b = Node::with_store(
        SqliteStore::open_with_poll_interval(&path, Duration::from_secs(4))
            .await
            .unwrap(),
    );
    let (victim, token) = b.cached("victim").await;
    let (record, _) = a.issue("flood").await;
    let start = Instant::now();
    let mut other = raw(&path).await;
    sqlx::query("UPDATE tower_pat_tokens SET revoked_at = ?1 WHERE id = ?2")
        .bind(Utc::now().timestamp_micros())
        .bind(&victim.id)
        .execute(&mut other)
        .await
        .unwrap();
    for i in 0..usize::try_from(CHANGE_LOG_KEEP).unwrap() + 50 {
        let patch = TokenPatch::new(Utc::now()).name(format!("flood{i}"));
        a.store.update(&record.id, &patch).await.unwrap();
    }
    if start.elapsed() > Duration::from_secs(3) {
        let _ = writeln!(
            std::io::stderr(),
            "skipped: the flood took {:?}, longer than B's poll interval",
            start.elapsed()
        );
        return;
    }
    assert_eq!(b.code(&token).await, StatusCode::OK, "B has not polled yet");
    assert!(
        wait_for(Duration::from_secs(5), async || b.code(&token).await
            == StatusCode::UNAUTHORIZED)
        .await
        .is_some(),
        "B kept serving a cached token after missing pruned changes"
    );
    assert!(b.store.feed_connected());
}

/// A listener that panics on every event.
struct Panicky;

impl tower_pat::store::ChangeListener for Panicky {
    fn on_event(&self, _: &tower_pat::store::StoreEvent) {
        panic!("a buggy listener");
    }
}

/// A subscribed listener that panics neither kills the poller nor keeps the event from the
/// others: revocations made elsewhere still reach this handle's layer, and the feed stays live.
#[tokio::test]
async fn a_panicking_listener_does_not_stop_the_feed() {
    use tower_pat::TokenLookup;
    let dir = common::tempdir();
    let path = db(&dir);
    let a = Node::open(&path).await;
    let b = Node::open(&path).await;
    let panicky: std::sync::Arc<dyn tower_pat::store::ChangeListener> =
        std::sync::Arc::new(Panicky);
    b.store.subscribe(std::sync::Arc::downgrade(&panicky));
    for i in 0..3 {
        let (record, token) = b.cached(&format!("p{i}")).await;
        a.tokens.revoke(&record.id).await.unwrap().unwrap();
        let revoked = wait_for(Duration::from_secs(2), async || {
            b.code(&token).await == StatusCode::UNAUTHORIZED
        })
        .await;
        assert!(
            revoked.is_some(),
            "B accepts a revoked token: its feed died"
        );
        assert!(b.store.feed_connected());
    }
}

/// A store opened on a runtime that is then shut down (opened at start-up on a runtime of its
/// own, served from another) has lost its poller: the feed reads as disconnected, so the layer
/// counts staleness and serves nothing on trust, instead of reading as connected while no change
/// is heard.
#[test]
fn a_poller_dropped_with_its_runtime_reads_as_disconnected() {
    let dir = common::tempdir();
    let path = db(&dir);
    let opening = tokio::runtime::Runtime::new().unwrap();
    let store = opening.block_on(SqliteStore::open(&path)).unwrap();
    assert!(store.feed_connected());
    drop(opening);
    assert!(!store.feed_connected(), "a dead poller reads as connected");
    let serving = tokio::runtime::Runtime::new().unwrap();
    serving.block_on(async {
        let node = Node::with_store(store);
        let (_, token) = node.issue("t").await;
        // The store itself still answers; only the feed is gone, and the layer knows it.
        assert_eq!(node.code(&token).await, StatusCode::OK);
        assert!(node.layer.max_staleness() > Duration::ZERO);
    });
}
