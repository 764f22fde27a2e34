//! Two "nodes" over one PostgreSQL database: two `PatAuthLayer`s, each with its own cache and its
//! own `PostgresStore`. Node B reaches the database through a TCP proxy the test can cut, to see
//! the change feed drop and come back, and the database become unreachable.
//!
//! Needs `DATABASE_URL`; without it every test returns at once and one line says so.
#![cfg(feature = "postgres")]

mod common;

use std::io::Write;
use std::sync::Arc;
use std::time::{Duration, Instant};

use chrono::{TimeDelta, Utc};
use http::{StatusCode, header};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tower_pat::store::PostgresStore;
use tower_pat::{CacheConfig, NewToken, PatAuthLayer, ScopeSet, TokenRecord, TokenStore};

use common::pg::TestDb;

const WHAT: &str = "postgres_cluster";

/// A TCP proxy on 127.0.0.1 to the database. While cut, it closes every connection it carries
/// and drops new ones as soon as they arrive.
struct Proxy {
    port: u16,
    up: Arc<watch::Sender<bool>>,
    task: tokio::task::JoinHandle<()>,
}

impl Proxy {
    async fn start(target: String) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let up = Arc::new(watch::Sender::new(true));
        let state = Arc::clone(&up);
        let task = tokio::spawn(async move {
            loop {
                let Ok((mut inbound, _)) = listener.accept().await else {
                    continue;
                };
                let mut up = state.subscribe();
                if !*up.borrow() {
                    drop(inbound);
                    continue;
                }
                let target = target.clone();
                tokio::spawn(async move {
                    let Ok(mut outbound) = TcpStream::connect(&target).await else {
                        return;
                    };
                    tokio::select! {
                        _ = tokio::io::copy_bidirectional(&mut inbound, &mut outbound) => {}
                        _ = up.wait_for(|up| !*up) => {}
                    }
                });
            }
        });
        Self { port, up, task }
    }

    /// Closes every connection through the proxy and refuses new ones.
    fn cut(&self) {
        self.up.send_replace(false);
    }

    fn restore(&self) {
        self.up.send_replace(true);
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.cut();
        self.task.abort();
    }
}

/// One node: its store and its layer.
struct Node {
    store: PostgresStore,
    layer: PatAuthLayer,
}

impl Node {
    async fn status(&self, token: &str) -> (StatusCode, http::HeaderMap) {
        let reply = common::send(&self.layer, common::request(Some(token), None)).await;
        (reply.status, reply.headers)
    }

    /// Waits (at most 5 s) until the layer sees the store's feed connected (`max_staleness` zero)
    /// or disconnected.
    async fn wait_feed(&self, connected: bool) {
        let seen = wait_for(Duration::from_secs(5), async || {
            (self.layer.max_staleness() == Duration::ZERO) == connected
        })
        .await;
        assert!(
            seen.is_some(),
            "the feed never became connected = {connected}"
        );
        assert_eq!(self.store.feed_connected(), connected);
    }

    async fn code(&self, token: &str) -> StatusCode {
        self.status(token).await.0
    }

    /// Issues a token with the node's format and hasher and stores it through this node.
    async fn issue(&self, name: &str, expires_in: Option<TimeDelta>) -> (TokenRecord, String) {
        let mut new = NewToken::new("alice", name, ScopeSet::parse(["api"]).unwrap());
        if let Some(d) = expires_in {
            new = new.expires_at(Utc::now() + d);
        }
        let (record, secret) = new.issue(self.layer.format(), self.layer.hasher(), Utc::now());
        self.store.insert(&record).await.unwrap();
        (record, secret.expose_secret().to_owned())
    }
}

/// Node A, straight to the database.
async fn node_a(db: &TestDb) -> Node {
    let store = PostgresStore::builder()
        .connect_with(db.options.clone())
        .await
        .unwrap();
    let layer = PatAuthLayer::builder(store.clone()).build();
    Node { store, layer }
}

/// Node B: pool and listener through `pool_port` and `listener_port`.
async fn node_b(db: &TestDb, pool_port: u16, listener_port: u16, cache: CacheConfig) -> Node {
    let store = PostgresStore::builder()
        .acquire_timeout(Duration::from_millis(300))
        .reconnect_backoff(Duration::from_millis(20), Duration::from_millis(200))
        .listener_options(db.via(listener_port))
        .connect_with(db.via(pool_port))
        .await
        .unwrap();
    let layer = PatAuthLayer::builder(store.clone())
        .cache(cache)
        .unavailable_retry_after(7)
        .build();
    Node { store, layer }
}

fn long_ttl() -> CacheConfig {
    CacheConfig {
        ttl: Duration::from_secs(600),
        ..CacheConfig::default()
    }
}

/// Polls `cond` every millisecond for at most `limit`; how long it took, or `None` if it never held.
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

fn port(db: &TestDb) -> u16 {
    db.options.get_port()
}

#[tokio::test]
async fn a_revocation_through_node_a_reaches_node_b_within_a_second() {
    let Some(db) = TestDb::create(WHAT).await else {
        return;
    };
    let a = node_a(&db).await;
    let b = node_b(&db, port(&db), port(&db), long_ttl()).await;
    assert_eq!(b.layer.max_staleness(), Duration::ZERO);

    let mut times = Vec::new();
    for i in 0..5 {
        let (record, token) = a.issue(&format!("t{i}"), None).await;
        assert_eq!(b.code(&token).await, StatusCode::OK);
        let lookups = b.layer.store_lookups();
        assert_eq!(b.code(&token).await, StatusCode::OK);
        assert_eq!(
            b.layer.store_lookups(),
            lookups,
            "node B serves from its cache"
        );

        let start = Instant::now();
        a.store
            .revoke(&record.id, Utc::now())
            .await
            .unwrap()
            .unwrap();
        let revoked = wait_for(Duration::from_secs(1), async || {
            b.code(&token).await == StatusCode::UNAUTHORIZED
        })
        .await;
        assert!(
            revoked.is_some(),
            "node B still accepts a revoked token after 1 s"
        );
        times.push(start.elapsed());
    }
    times.sort();
    // Straight to stderr, so that the figure shows in a normal (captured) test run.
    let _ = writeln!(
        std::io::stderr(),
        "revocation propagation A -> B (revoke call to first 401 on B, 5 runs): \
         min {:?}, median {:?}, max {:?}",
        times[0],
        times[2],
        times[4]
    );
}

/// The whole of node B behind the proxy: while it is cut, B serves its cache and misses A's
/// revocation; once it is back, B has dropped what it cached and rejects the token.
#[tokio::test]
async fn a_revocation_missed_while_node_b_was_cut_off_applies_once_it_is_back() {
    let Some(db) = TestDb::create(WHAT).await else {
        return;
    };
    let proxy = Proxy::start(db.server_addr()).await;
    let a = node_a(&db).await;
    let b = node_b(&db, proxy.port, proxy.port, long_ttl()).await;
    let (record, token) = a.issue("ci", None).await;
    assert_eq!(b.code(&token).await, StatusCode::OK);
    assert!(b.store.feed_connected());
    assert_eq!(b.layer.max_staleness(), Duration::ZERO);

    proxy.cut();
    b.wait_feed(false).await;
    let before = b.layer.max_staleness();
    tokio::time::sleep(Duration::from_millis(50)).await;
    assert!(
        b.layer.max_staleness() > before,
        "the staleness grows while the feed is down"
    );

    a.store.revoke(&record.id, Utc::now()).await.unwrap();
    // B cannot have heard of it: its cached entry still serves.
    assert_eq!(b.code(&token).await, StatusCode::OK);

    proxy.restore();
    b.wait_feed(true).await;
    assert_eq!(b.code(&token).await, StatusCode::UNAUTHORIZED);
}

/// Only node B's listener behind the proxy, its pool straight to the database: a token B loads
/// while its feed is down is dropped on reconnect too, since a change to it may have gone unheard.
#[tokio::test]
async fn entries_loaded_while_the_feed_was_down_are_dropped_on_reconnect() {
    let Some(db) = TestDb::create(WHAT).await else {
        return;
    };
    let proxy = Proxy::start(db.server_addr()).await;
    let a = node_a(&db).await;
    let b = node_b(&db, port(&db), proxy.port, long_ttl()).await;
    let (before_rec, before) = a.issue("before", None).await;
    let (during_rec, during) = a.issue("during", None).await;
    assert_eq!(b.code(&before).await, StatusCode::OK);

    proxy.cut();
    b.wait_feed(false).await;
    // The database is reachable: B loads the second token now.
    assert_eq!(b.code(&during).await, StatusCode::OK);
    a.store.revoke(&before_rec.id, Utc::now()).await.unwrap();
    a.store.revoke(&during_rec.id, Utc::now()).await.unwrap();
    assert_eq!(
        b.code(&before).await,
        StatusCode::OK,
        "unheard while cut off"
    );
    assert_eq!(
        b.code(&during).await,
        StatusCode::OK,
        "unheard while cut off"
    );

    proxy.restore();
    b.wait_feed(true).await;
    assert_eq!(b.code(&before).await, StatusCode::UNAUTHORIZED);
    assert_eq!(b.code(&during).await, StatusCode::UNAUTHORIZED);
}

/// The database unreachable from node B: an uncached token is 503 with `Retry-After`, a cached
/// one past its TTL keeps working (stale-if-error), an expired cached one is 401, and a revocation
/// B heard before the outage is still enforced.
#[tokio::test]
async fn with_the_database_unreachable_node_b_serves_what_it_knows() {
    let Some(db) = TestDb::create(WHAT).await else {
        return;
    };
    let proxy = Proxy::start(db.server_addr()).await;
    let a = node_a(&db).await;
    let cache = CacheConfig {
        ttl: Duration::from_millis(200),
        stale_if_error: Duration::from_secs(60),
        ..CacheConfig::default()
    };
    let b = node_b(&db, proxy.port, proxy.port, cache).await;

    let (_, cached) = a.issue("cached", None).await;
    let (_, expiring) = a
        .issue("expiring", Some(TimeDelta::milliseconds(1500)))
        .await;
    let (revoked_rec, revoked) = a.issue("revoked", None).await;
    let (_, uncached) = a.issue("uncached", None).await;
    for t in [&cached, &expiring, &revoked] {
        assert_eq!(b.code(t).await, StatusCode::OK);
    }
    a.store.revoke(&revoked_rec.id, Utc::now()).await.unwrap();
    let heard = wait_for(Duration::from_secs(1), async || {
        b.code(&revoked).await == StatusCode::UNAUTHORIZED
    })
    .await;
    assert!(heard.is_some(), "node B heard of the revocation");

    proxy.cut();
    tokio::time::sleep(Duration::from_millis(300)).await; // past the TTL
    let lookups = b.layer.store_lookups();

    let (status, headers) = b.status(&uncached).await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(headers[header::RETRY_AFTER], "7");
    assert!(
        b.layer.store_lookups() > lookups,
        "the miss went to the store"
    );

    assert_eq!(b.code(&cached).await, StatusCode::OK, "stale-if-error");
    assert_eq!(b.code(&cached).await, StatusCode::OK, "stale-if-error");
    assert_eq!(b.code(&revoked).await, StatusCode::UNAUTHORIZED);
    assert!(b.layer.max_staleness() > Duration::ZERO);

    let expired = wait_for(Duration::from_secs(3), async || {
        b.code(&expiring).await == StatusCode::UNAUTHORIZED
    })
    .await;
    assert!(expired.is_some(), "the expired cached token is refused");
    assert_eq!(b.code(&cached).await, StatusCode::OK, "stale-if-error");

    proxy.restore();
    let recovered = wait_for(Duration::from_secs(5), async || {
        b.code(&uncached).await == StatusCode::OK
    })
    .await;
    assert!(recovered.is_some(), "node B looks tokens up again");
    assert_eq!(b.code(&revoked).await, StatusCode::UNAUTHORIZED);
}
