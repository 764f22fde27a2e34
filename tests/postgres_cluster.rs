//! Two "nodes" over one PostgreSQL database: two `PatAuthLayer`s, each with its own cache and its
//! own `PostgresStore`. Node B reaches the database through a TCP proxy the test can cut, to see
//! the change feed drop and come back, and the database become unreachable.
//!
//! Needs `DATABASE_URL`; without it every test returns at once and one line says so.
#![cfg(feature = "postgres")]

mod common;

use std::io::Write;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use chrono::{TimeDelta, Utc};
use http::{StatusCode, header};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tower_pat::store::PostgresStore;
use tower_pat::{
    CacheConfig, NewToken, PatAuthLayer, Rotation, ScopeSet, TokenHasher, TokenLookup, TokenPatch,
    TokenRecord, TokenStore, Tokens,
};

use common::pg::TestDb;

const WHAT: &str = "postgres_cluster";

/// What the proxy does with the bytes it carries.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Mode {
    /// Forwards everything.
    Up,
    /// Closes every connection it carries and drops new ones as soon as they arrive.
    Cut,
    /// A silent partition: every socket stays open, but no byte moves in either direction, and a
    /// new connection is accepted and then held, not forwarded.
    Frozen,
    /// A NAT or load balancer that forgot its flows: the connections numbered below this stay
    /// open and carry nothing, newer ones work.
    Stranded(u64),
}

impl Mode {
    /// Whether connection `id` may move bytes now; `None` when it must close.
    fn flows(self, id: u64) -> Option<bool> {
        match self {
            Mode::Up => Some(true),
            Mode::Cut => None,
            Mode::Frozen => Some(false),
            Mode::Stranded(below) => Some(id >= below),
        }
    }
}

/// A TCP proxy on 127.0.0.1 to the database that the test can cut, freeze or strand.
struct Proxy {
    port: u16,
    mode: Arc<watch::Sender<Mode>>,
    /// How many connections it has accepted: the next one's number.
    accepted: Arc<AtomicU64>,
    task: tokio::task::JoinHandle<()>,
}

/// Waits until connection `id` may move bytes: `false` when it must close instead.
async fn may_flow(mode: &mut watch::Receiver<Mode>, id: u64) -> bool {
    match mode.wait_for(|m| m.flows(id) != Some(false)).await {
        Ok(m) => m.flows(id).is_some(),
        Err(_) => false,
    }
}

/// Copies one direction of connection `id`, moving no byte while the mode says it must not.
async fn pump(
    mut from: tokio::net::tcp::OwnedReadHalf,
    mut to: tokio::net::tcp::OwnedWriteHalf,
    mut mode: watch::Receiver<Mode>,
    id: u64,
) {
    let mut buf = vec![0u8; 16 * 1024];
    loop {
        if !may_flow(&mut mode, id).await {
            return;
        }
        let n = tokio::select! {
            read = from.read(&mut buf) => match read {
                Ok(0) | Err(_) => return,
                Ok(n) => n,
            },
            // Look at the mode again: a freeze stops the reading too.
            _ = mode.changed() => continue,
        };
        // What was read just before a freeze waits for the thaw.
        if !may_flow(&mut mode, id).await || to.write_all(&buf[..n]).await.is_err() {
            return;
        }
    }
}

impl Proxy {
    async fn start(target: String) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let mode = Arc::new(watch::Sender::new(Mode::Up));
        let accepted = Arc::new(AtomicU64::new(0));
        let (state, count) = (Arc::clone(&mode), Arc::clone(&accepted));
        let task = tokio::spawn(async move {
            loop {
                let Ok((inbound, _)) = listener.accept().await else {
                    continue;
                };
                let id = count.fetch_add(1, Ordering::SeqCst);
                let mut mode = state.subscribe();
                if mode.borrow().flows(id).is_none() {
                    drop(inbound);
                    continue;
                }
                let target = target.clone();
                tokio::spawn(async move {
                    // A frozen proxy holds a new connection without connecting it.
                    if !may_flow(&mut mode, id).await {
                        return;
                    }
                    let Ok(outbound) = TcpStream::connect(&target).await else {
                        return;
                    };
                    let (in_read, in_write) = inbound.into_split();
                    let (out_read, out_write) = outbound.into_split();
                    tokio::join!(
                        pump(in_read, out_write, mode.clone(), id),
                        pump(out_read, in_write, mode, id),
                    );
                });
            }
        });
        Self {
            port,
            mode,
            accepted,
            task,
        }
    }

    /// Closes every connection through the proxy and refuses new ones.
    fn cut(&self) {
        self.mode.send_replace(Mode::Cut);
    }

    /// Stops every byte, keeping every socket open; new connections are accepted and held.
    fn freeze(&self) {
        self.mode.send_replace(Mode::Frozen);
    }

    /// The connections open now carry nothing from here on; new ones work.
    fn strand_open_connections(&self) {
        let below = self.accepted.load(Ordering::SeqCst);
        self.mode.send_replace(Mode::Stranded(below));
    }

    /// Forwards again: held and frozen connections resume, new ones are forwarded.
    fn restore(&self) {
        self.mode.send_replace(Mode::Up);
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
    tokens: Tokens,
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

    /// Issues a token of `alice` with scope `api` through this node's handle.
    async fn issue(&self, name: &str, expires_in: Option<TimeDelta>) -> (TokenRecord, String) {
        let mut new = NewToken::new("alice", name).scopes(["api"]).unwrap();
        if let Some(d) = expires_in {
            new = new.expires_at(Utc::now() + d);
        }
        let (record, secret) = self.tokens.issue(new).await.unwrap();
        (record, secret.expose_secret().to_owned())
    }
}

/// Node A, straight to the database.
async fn node_a(db: &TestDb) -> Node {
    let store = PostgresStore::builder()
        .connect_with(db.options.clone())
        .await
        .unwrap();
    let tokens = Tokens::new(store.clone());
    let layer = tokens.layer().build();
    Node {
        store,
        tokens,
        layer,
    }
}

/// Node B: pool and listener through `pool_port` and `listener_port`, a heartbeat each second.
async fn node_b(db: &TestDb, pool_port: u16, listener_port: u16, cache: CacheConfig) -> Node {
    let store = PostgresStore::builder()
        .acquire_timeout(Duration::from_millis(300))
        .reconnect_backoff(Duration::from_millis(20), Duration::from_millis(200))
        .heartbeat(HEARTBEAT, HEARTBEAT)
        .listener_options(db.via(listener_port))
        .connect_with(db.via(pool_port))
        .await
        .unwrap();
    let tokens = Tokens::new(store.clone());
    let layer = tokens
        .layer()
        .cache(cache)
        .unavailable_retry_after(7)
        .build();
    Node {
        store,
        tokens,
        layer,
    }
}

/// Node B's heartbeat interval and timeout in these tests.
const HEARTBEAT: Duration = Duration::from_secs(1);

/// How long node B may take to notice a silent feed: a heartbeat interval, then its timeout.
const HEARTBEAT_BOUND: Duration = Duration::from_secs(2);

/// Scheduling and query time on top of a bound (a lookup through a frozen proxy takes the 300 ms
/// acquire timeout to fail).
const SLACK: Duration = Duration::from_millis(1500);

fn long_ttl() -> CacheConfig {
    CacheConfig::default().ttl(Duration::from_secs(600))
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

/// The database unreachable for node B's queries (its pool behind the cut proxy), its change feed
/// still connected: an uncached token is 503 with `Retry-After`, a cached one past its TTL keeps
/// working (stale-if-error: B would still hear a revocation), an expired cached one is 401, and a
/// revocation B heard before the outage is still enforced.
#[tokio::test]
async fn with_the_database_unreachable_node_b_serves_what_it_knows() {
    let Some(db) = TestDb::create(WHAT).await else {
        return;
    };
    let proxy = Proxy::start(db.server_addr()).await;
    let a = node_a(&db).await;
    let cache = CacheConfig::default()
        .ttl(Duration::from_millis(200))
        .stale_if_error(Duration::from_secs(60));
    let b = node_b(&db, proxy.port, port(&db), cache).await;

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

/// Issue 9 item 13, as the holder of a leaked token sees it. Node B's whole path to the database
/// goes silent: the proxy keeps every socket open and moves no byte. The token is revoked through
/// node A. B cannot hear of it, so it must stop vouching for the token within its heartbeat
/// (interval + timeout) plus the TTL, whatever `stale_if_error` says (5 min here, the default);
/// it cannot look the token up either, so it answers 503. Meanwhile `max_staleness()` says B is
/// behind, more and more; once the network is back, B's feed reconnects, the staleness returns to
/// zero and the token is refused as revoked.
#[tokio::test]
async fn a_silent_partition_stops_node_b_accepting_a_revoked_token_within_heartbeat_plus_ttl() {
    let Some(db) = TestDb::create(WHAT).await else {
        return;
    };
    let proxy = Proxy::start(db.server_addr()).await;
    let a = node_a(&db).await;
    let ttl = Duration::from_secs(2);
    let cache = CacheConfig::default().ttl(ttl);
    let b = node_b(&db, proxy.port, proxy.port, cache).await;
    let (record, token) = a.issue("leaked", None).await;
    assert_eq!(b.code(&token).await, StatusCode::OK);
    assert_eq!(b.layer.max_staleness(), Duration::ZERO);

    proxy.freeze();
    let revoked_at = Instant::now();
    a.store
        .revoke(&record.id, Utc::now())
        .await
        .unwrap()
        .unwrap();
    let bound = HEARTBEAT_BOUND + ttl;
    let refused = wait_for(bound + SLACK, async || {
        b.code(&token).await != StatusCode::OK
    })
    .await;
    assert!(
        refused.is_some(),
        "node B still accepts the revoked token {:?} after the revocation (heartbeat + TTL = {bound:?})",
        revoked_at.elapsed()
    );
    let _ = writeln!(
        std::io::stderr(),
        "silent partition: node B stopped accepting the revoked token {:?} after the revocation \
         (heartbeat + TTL = {bound:?})",
        revoked_at.elapsed()
    );
    assert_eq!(
        b.code(&token).await,
        StatusCode::SERVICE_UNAVAILABLE,
        "B can neither hear nor look up the token"
    );

    let staleness = b.layer.max_staleness();
    assert!(
        staleness > Duration::ZERO,
        "B reports itself fresh while it cannot hear a change"
    );
    assert!(!b.store.feed_connected(), "B reports its feed connected");
    let grew = wait_for(Duration::from_secs(1), async || {
        b.layer.max_staleness() > staleness
    })
    .await;
    assert!(grew.is_some(), "the staleness grows while frozen");

    proxy.restore();
    b.wait_feed(true).await;
    assert_eq!(b.code(&token).await, StatusCode::UNAUTHORIZED);
}

/// The store unreachable for node B's refreshes (its pool behind the frozen proxy) while the feed
/// is connected: the cached token keeps serving (stale-if-error), and `max_staleness()` says since
/// when B has been unable to confirm it, growing, back to zero once a refresh succeeds. A
/// revocation still arrives through the feed meanwhile and ends the stale serving of its token.
#[tokio::test]
async fn failing_refreshes_show_in_max_staleness_while_the_feed_is_connected() {
    let Some(db) = TestDb::create(WHAT).await else {
        return;
    };
    let proxy = Proxy::start(db.server_addr()).await;
    let a = node_a(&db).await;
    let cache = CacheConfig::default()
        .ttl(Duration::from_millis(200))
        .stale_if_error(Duration::from_secs(60));
    let b = node_b(&db, proxy.port, port(&db), cache).await;
    let (_, cached) = a.issue("cached", None).await;
    let (revoked_rec, revoked) = a.issue("revoked", None).await;
    assert_eq!(b.code(&cached).await, StatusCode::OK);
    assert_eq!(b.code(&revoked).await, StatusCode::OK);

    proxy.freeze();
    let seen = wait_for(Duration::from_secs(5), async || {
        b.code(&cached).await == StatusCode::OK && b.layer.max_staleness() > Duration::ZERO
    })
    .await;
    assert!(
        seen.is_some(),
        "max_staleness() stays zero while every refresh of a served entry fails"
    );
    assert!(b.store.feed_connected(), "the feed itself is fine");
    let staleness = b.layer.max_staleness();
    let grew = wait_for(Duration::from_secs(1), async || {
        b.layer.max_staleness() > staleness
    })
    .await;
    assert!(grew.is_some(), "the staleness grows while refreshes fail");

    // The feed carries the revocation: B drops the entry and, unable to look the token up,
    // answers 503.
    a.store.revoke(&revoked_rec.id, Utc::now()).await.unwrap();
    let heard = wait_for(Duration::from_secs(1), async || {
        b.code(&revoked).await != StatusCode::OK
    })
    .await;
    assert!(heard.is_some(), "the feed carries the revocation");
    assert_eq!(b.code(&revoked).await, StatusCode::SERVICE_UNAVAILABLE);

    proxy.restore();
    let recovered = wait_for(Duration::from_secs(5), async || {
        b.code(&cached).await == StatusCode::OK && b.layer.max_staleness() == Duration::ZERO
    })
    .await;
    assert!(
        recovered.is_some(),
        "a successful refresh ends the staleness"
    );
}

/// The most common silent drop: a NAT or load balancer forgets the listener's idle flow, while new
/// connections work. Node B's pool goes straight to the database and its TTL is 10 minutes: only
/// the feed can tell it of the revocation, whose notification went into the dead connection. B
/// must notice within the heartbeat, listen on a new connection and, having missed whatever was
/// sent meanwhile, drop its cache: the token is refused within the heartbeat.
#[tokio::test]
async fn a_stranded_listener_connection_is_replaced_and_the_missed_revocation_applies() {
    let Some(db) = TestDb::create(WHAT).await else {
        return;
    };
    let proxy = Proxy::start(db.server_addr()).await;
    let a = node_a(&db).await;
    let b = node_b(&db, port(&db), proxy.port, long_ttl()).await;
    let (record, token) = a.issue("leaked", None).await;
    assert_eq!(b.code(&token).await, StatusCode::OK);

    proxy.strand_open_connections();
    a.store.revoke(&record.id, Utc::now()).await.unwrap();
    let refused = wait_for(HEARTBEAT_BOUND + SLACK, async || {
        b.code(&token).await == StatusCode::UNAUTHORIZED
    })
    .await;
    assert!(
        refused.is_some(),
        "node B still accepts the revoked token past its heartbeat bound"
    );
    b.wait_feed(true).await;
}

/// A record made outside `Tokens` (a legacy import) may have an id with spaces: its revocation
/// still reaches node B. An id too long for a notification is refused at insert, not stored
/// unrevocable.
#[tokio::test]
async fn ids_with_spaces_are_invalidated_and_overlong_ids_refused() {
    let Some(db) = TestDb::create(WHAT).await else {
        return;
    };
    let a = node_a(&db).await;
    let b = node_b(&db, port(&db), port(&db), long_ttl()).await;
    let new = NewToken::new("alice", "legacy").scopes(["api"]).unwrap();
    let (mut record, secret) = a.tokens.mint(new, Utc::now());
    record.id = "legacy 42 x".to_owned();
    a.store.insert(&record).await.unwrap();
    let token = secret.expose_secret().to_owned();
    assert_eq!(b.code(&token).await, StatusCode::OK);
    a.store
        .revoke(&record.id, Utc::now())
        .await
        .unwrap()
        .unwrap();
    let revoked = wait_for(Duration::from_secs(1), async || {
        b.code(&token).await == StatusCode::UNAUTHORIZED
    })
    .await;
    assert!(revoked.is_some(), "node B still accepts the revoked token");

    let new = NewToken::new("alice", "long").scopes(["api"]).unwrap();
    let (mut long, _) = a.tokens.mint(new, Utc::now());
    long.id = "x".repeat(1025);
    assert!(a.store.insert(&long).await.is_err());
    assert_eq!(a.store.get(&long.id).await.unwrap(), None);
    long.id = "x".repeat(1024);
    a.store.insert(&long).await.unwrap();
    assert!(
        a.store
            .revoke(&long.id, Utc::now())
            .await
            .unwrap()
            .is_some()
    );
}

/// A silent partition shows in `max_staleness()` from node B's last confirmation: once the
/// heartbeat is overdue, while the feed still reads as connected (its timeout not yet over), and
/// after the heartbeat declares it down, never less than the time since B went silent. Before,
/// the figure read zero until the timeout and then counted from the moment it was noticed.
#[tokio::test]
async fn a_silent_partition_counts_in_max_staleness_from_the_last_confirmation() {
    let Some(db) = TestDb::create(WHAT).await else {
        return;
    };
    let proxy = Proxy::start(db.server_addr()).await;
    // Overdue 2 s after the last answered heartbeat (its interval and a second); declared down
    // only when the next heartbeat's 3 s timeout is over, 4 s after it.
    let store = PostgresStore::builder()
        .acquire_timeout(Duration::from_millis(300))
        .reconnect_backoff(Duration::from_millis(20), Duration::from_millis(200))
        .heartbeat(Duration::from_secs(1), Duration::from_secs(3))
        .listener_options(db.via(proxy.port))
        .connect_with(db.via(proxy.port))
        .await
        .unwrap();
    let layer = Tokens::new(store.clone()).layer().cache(long_ttl()).build();
    assert_eq!(layer.max_staleness(), Duration::ZERO);
    // A heartbeat has just been answered: the feed is confirmed on time.
    tokio::time::sleep(Duration::from_millis(1200)).await;
    assert_eq!(layer.max_staleness(), Duration::ZERO);

    proxy.freeze();
    let frozen = Instant::now();
    let overdue = wait_for(Duration::from_secs(4), async || {
        layer.max_staleness() > Duration::ZERO
    })
    .await;
    assert!(
        overdue.is_some(),
        "a silent feed never shows in max_staleness"
    );
    if store.feed_connected() {
        // Not yet declared down: already counted from before the silence.
        let silent_for = frozen.elapsed();
        assert!(
            layer.max_staleness() + Duration::from_millis(50) >= silent_for,
            "{:?} < {silent_for:?}",
            layer.max_staleness()
        );
    }
    let down = wait_for(Duration::from_secs(6), async || !store.feed_connected()).await;
    assert!(down.is_some(), "the heartbeat never declared the feed down");
    let silent_for = frozen.elapsed();
    let staleness = layer.max_staleness();
    assert!(
        staleness + Duration::from_millis(50) >= silent_for,
        "max_staleness {staleness:?} is less than the {silent_for:?} node B has been silent"
    );
    proxy.restore();
    let back = wait_for(Duration::from_secs(10), async || {
        layer.max_staleness() == Duration::ZERO
    })
    .await;
    assert!(back.is_some(), "the feed never came back");
}

/// A proxy that can make a listener deaf: it carries every byte both ways, except, while
/// `deaf` is set, the server's notification messages (`NotificationResponse`, type `A`), which it
/// drops, as a transaction-pooling PgBouncer does with a notification that arrives while no client
/// is linked to the server connection. The connection stays up and answers queries.
struct DeafProxy {
    port: u16,
    deaf: Arc<std::sync::atomic::AtomicBool>,
    task: tokio::task::JoinHandle<()>,
}

impl DeafProxy {
    async fn start(target: String) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let deaf = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let flag = Arc::clone(&deaf);
        let task = tokio::spawn(async move {
            while let Ok((inbound, _)) = listener.accept().await {
                let Ok(outbound) = TcpStream::connect(&target).await else {
                    continue;
                };
                let flag = Arc::clone(&flag);
                tokio::spawn(async move {
                    let (mut in_read, mut in_write) = inbound.into_split();
                    let (mut out_read, mut out_write) = outbound.into_split();
                    let up = async {
                        let _ = tokio::io::copy(&mut in_read, &mut out_write).await;
                    };
                    // Server to client: whole messages (a type byte, a 4-byte length counting
                    // itself, the body), so that a notification can be dropped. The connection
                    // must not use TLS (`sslmode=disable`), whose one-byte answer is not framed.
                    let down = async {
                        let mut pending = Vec::new();
                        let mut buf = vec![0u8; 16 * 1024];
                        loop {
                            let n = match out_read.read(&mut buf).await {
                                Ok(0) | Err(_) => return,
                                Ok(n) => n,
                            };
                            pending.extend_from_slice(&buf[..n]);
                            let mut forward = Vec::new();
                            while pending.len() >= 5 {
                                let len =
                                    u32::from_be_bytes(pending[1..5].try_into().unwrap()) as usize;
                                if pending.len() < 1 + len {
                                    break;
                                }
                                let message: Vec<u8> = pending.drain(..1 + len).collect();
                                if !(message[0] == b'A' && flag.load(Ordering::SeqCst)) {
                                    forward.extend_from_slice(&message);
                                }
                            }
                            if in_write.write_all(&forward).await.is_err() {
                                return;
                            }
                        }
                    };
                    tokio::join!(up, down);
                });
            }
        });
        Self { port, deaf, task }
    }

    fn deafen(&self, deaf: bool) {
        self.deaf.store(deaf, Ordering::SeqCst);
    }
}

impl Drop for DeafProxy {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// A listener that listens on another database than the one written to hears no change, and
/// used to look healthy for ever: connected, `max_staleness()` zero, while a revoked token served
/// until its TTL. The store now refuses to start: its first heartbeat, sent through the pool,
/// must be heard on the listener.
#[tokio::test]
async fn a_listener_that_cannot_hear_the_writes_is_refused_at_connect() {
    let Some(db) = TestDb::create(WHAT).await else {
        return;
    };
    let refused = PostgresStore::builder()
        .heartbeat(HEARTBEAT, HEARTBEAT)
        .listener_options(db.next_door())
        .connect_with(db.options.clone())
        .await;
    let Err(error) = refused else {
        panic!("a listener on another database was accepted");
    };
    let error = error.to_string();
    assert!(
        error.contains("did not hear a notification sent through the pool"),
        "{error}"
    );
    // A heartbeat the database refuses to send is refused with the database's reason.
    let refused = PostgresStore::builder()
        .channel("c".repeat(70))
        .heartbeat(HEARTBEAT, HEARTBEAT)
        .connect_with(db.options.clone())
        .await;
    let Err(error) = refused else {
        panic!("a channel the database cannot notify was accepted");
    };
    assert!(error.to_string().contains("too long"), "{error}");
    // The same listener on the written database starts.
    let store = PostgresStore::builder()
        .heartbeat(HEARTBEAT, HEARTBEAT)
        .listener_options(db.options.clone())
        .connect_with(db.options.clone())
        .await
        .unwrap();
    assert!(store.feed_connected());
}

/// Node B's listener stays connected and answers queries, but stops hearing notifications (a
/// pooler between it and the database dropping them). A `SELECT 1` heartbeat kept it "connected"
/// and `max_staleness()` zero, while the token revoked through node A served until its TTL (600 s
/// here). The heartbeat is now a notification sent through the pool, which the listener must
/// hear: within the heartbeat (interval + timeout) the feed is down and the staleness shows it,
/// and it stays down while the listener is deaf (a new listener must hear a heartbeat first).
/// Once it hears again, the caches are emptied and the revoked token is refused.
#[tokio::test]
async fn a_listener_that_stops_hearing_notifications_is_declared_down() {
    let Some(db) = TestDb::create(WHAT).await else {
        return;
    };
    let proxy = DeafProxy::start(db.server_addr()).await;
    let a = node_a(&db).await;
    let listener = db
        .via(proxy.port)
        .ssl_mode(sqlx::postgres::PgSslMode::Disable);
    let store = PostgresStore::builder()
        .reconnect_backoff(Duration::from_millis(20), Duration::from_millis(200))
        .heartbeat(HEARTBEAT, HEARTBEAT)
        .listener_options(listener)
        .connect_with(db.options.clone())
        .await
        .unwrap();
    let layer = Tokens::new(store.clone()).layer().cache(long_ttl()).build();
    let b = Node {
        tokens: Tokens::new(store.clone()),
        store,
        layer,
    };
    let (record, token) = a.issue("leaked", None).await;
    assert_eq!(b.code(&token).await, StatusCode::OK);
    // The proxy carries notifications while it is not deaf.
    let (heard, heard_token) = a.issue("heard", None).await;
    assert_eq!(b.code(&heard_token).await, StatusCode::OK);
    a.store
        .revoke(&heard.id, Utc::now())
        .await
        .unwrap()
        .unwrap();
    let refused = wait_for(Duration::from_secs(1), async || {
        b.code(&heard_token).await == StatusCode::UNAUTHORIZED
    })
    .await;
    assert!(refused.is_some(), "the revocation was not heard");
    assert_eq!(b.layer.max_staleness(), Duration::ZERO);

    proxy.deafen(true);
    a.store
        .revoke(&record.id, Utc::now())
        .await
        .unwrap()
        .unwrap();
    let noticed = wait_for(HEARTBEAT_BOUND + SLACK, async || {
        !b.store.feed_connected() && b.layer.max_staleness() > Duration::ZERO
    })
    .await;
    assert!(
        noticed.is_some(),
        "a deaf listener still reads as connected (max_staleness {:?})",
        b.layer.max_staleness()
    );
    // Reconnecting through the deaf proxy does not bring the feed back.
    tokio::time::sleep(HEARTBEAT_BOUND).await;
    assert!(!b.store.feed_connected(), "a deaf listener came back up");

    proxy.deafen(false);
    b.wait_feed(true).await;
    assert_eq!(b.code(&token).await, StatusCode::UNAUTHORIZED);
}

/// A listing (`GET /personal-access-tokens`, [`TokenStore::list`]) cancelled while its
/// `BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY` is in flight (the client hung up) must not
/// leave the pooled connection inside that transaction (sqlx 0.8.6 does: issue #4393; the store
/// runs each transaction in a task of its own): every later statement on that connection would
/// read one frozen snapshot, `find_by_hash` a token as it was before its revocation on node b.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_listing_cancelled_during_its_begin_leaves_no_pooled_connection_in_its_snapshot() {
    let Some(db) = TestDb::create(WHAT).await else {
        return;
    };
    let a = PostgresStore::builder()
        .max_connections(1)
        .connect_with(db.options.clone())
        .await
        .unwrap();
    let b = PostgresStore::builder()
        .connect_with(db.options.clone())
        .await
        .unwrap();
    let tokens = Tokens::new(b.clone());
    let mut stale = Vec::new();
    for round in 0..200u64 {
        let new = NewToken::new("alice", format!("l-{round}"))
            .scopes(["x:a"])
            .unwrap();
        let (record, _) = tokens.issue(new).await.unwrap();
        // A listing on node a, cancelled after a few hundred microseconds (a client hanging up).
        let budget = Duration::from_micros(50 + (round * 53) % 1500);
        let _ = tokio::time::timeout(budget, a.list(&tower_pat::store::ListQuery::default())).await;
        // Node a looks the token up (it is active), node b revokes it, node a looks it up again.
        let before = a.find_by_hash(&record.hash).await;
        b.revoke(&record.id, Utc::now()).await.unwrap().unwrap();
        let after = a.find_by_hash(&record.hash).await;
        if let (Ok(Some(_)), Ok(Some(r))) = (before, &after)
            && !r.is_revoked()
        {
            stale.push(round);
        }
        if let Ok(Some(r)) = a.get(&record.id).await
            && !r.is_revoked()
        {
            stale.push(round);
        }
    }
    assert!(
        stale.is_empty(),
        "node a read a token revoked on node b as active in rounds {stale:?}"
    );
}

/// End to end: node a's layer, its feed up, and `max_staleness()` zero, lets a token revoked on
/// node b through (200) after a listing was cancelled on node a, because its reload after the
/// revocation's notification reads the frozen snapshot.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_listing_cancelled_on_node_a_never_lets_a_token_revoked_on_node_b_through() {
    use axum::Router;
    use axum::routing;
    use http::StatusCode;
    use tower::ServiceExt;
    use tower_pat::Principal;

    let Some(db) = TestDb::create(WHAT).await else {
        return;
    };
    let a = PostgresStore::builder()
        .max_connections(1)
        .connect_with(db.options.clone())
        .await
        .unwrap();
    let b = PostgresStore::builder()
        .connect_with(db.options.clone())
        .await
        .unwrap();
    let tokens_a = Tokens::new(a.clone());
    let layer = tokens_a.layer().build();
    let app = Router::new()
        .route(
            "/hello",
            routing::get(|p: Principal| async move { p.subject().to_owned() }),
        )
        .layer(layer.clone());
    let hello = |secret: String| {
        let app = app.clone();
        async move {
            let req = http::Request::get("/hello")
                .header("authorization", format!("Bearer {secret}"))
                .body(axum::body::Body::empty())
                .unwrap();
            app.oneshot(req).await.unwrap().status()
        }
    };
    let tokens_b = Tokens::new(b.clone());
    let mut served = Vec::new();
    for round in 0..200u64 {
        let new = NewToken::new("alice", format!("l-{round}"))
            .scopes(["x:a"])
            .unwrap();
        let (record, secret) = tokens_b.issue(new).await.unwrap();
        let secret = secret.expose_secret().to_owned();
        let budget = Duration::from_micros(50 + (round * 53) % 1500);
        let _ = tokio::time::timeout(budget, a.list(&tower_pat::store::ListQuery::default())).await;
        if hello(secret.clone()).await != StatusCode::OK {
            // The new token not found through a frozen snapshot: not what this test counts.
            continue;
        }
        b.revoke(&record.id, Utc::now()).await.unwrap().unwrap();
        // Wait until node a's cache has heard of the revocation (its feed is up), so that the
        // next request reloads the token.
        tokio::time::sleep(Duration::from_millis(50)).await;
        let status = hello(secret).await;
        if status == StatusCode::OK && layer.max_staleness().is_zero() {
            served.push(round);
        }
    }
    assert!(
        served.is_empty(),
        "node a served a token revoked on node b, max_staleness() zero, in rounds {served:?}"
    );
}

/// Rotations and patches cancelled at random points (the future dropped, as when a client hangs
/// up) land whole or not at all, and leave no transaction open on a pooled connection: another
/// node's revocation is never blocked by a row lock, and sees every token issued since.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cancelled_rotation_or_patch_lands_whole_or_not_at_all_and_leaves_no_lock() {
    let Some(db) = TestDb::create(WHAT).await else {
        return;
    };
    let a = PostgresStore::builder()
        .max_connections(2)
        .connect_with(db.options.clone())
        .await
        .unwrap();
    let b = PostgresStore::builder()
        .connect_with(db.options.clone())
        .await
        .unwrap();
    let tokens = Tokens::new(a.clone());
    let hasher = TokenHasher::sha256();
    let (mut applied, mut dropped) = (0, 0);
    for round in 0..300u64 {
        let new = NewToken::new("alice", format!("c-{round}"))
            .scopes(["x:a", "x:b"])
            .unwrap();
        let (record, _) = tokens.issue(new).await.unwrap();
        let fresh = hasher.hash(&format!("pat_cancel_{round}_{}", common::rand_suffix()));
        let now = Utc::now();
        let rot = Rotation::new(record.hash, fresh, "pat_canc", now)
            .if_version(record.version)
            .grace_until(Some(now + chrono::Duration::hours(1)));
        let patch = TokenPatch::new(now)
            .if_version(record.version)
            .scopes(ScopeSet::parse(["x:a"]).unwrap())
            .disable();
        let budget = Duration::from_micros(200 + (round * 37) % 3000);
        let done = if round % 2 == 0 {
            tokio::time::timeout(budget, a.rotate(&record.id, &rot))
                .await
                .is_ok()
        } else {
            tokio::time::timeout(budget, a.update(&record.id, &patch))
                .await
                .is_ok()
        };
        if done {
            applied += 1;
        } else {
            dropped += 1;
        }
        // Another node revokes at once: never blocked by a lock the dropped write left behind.
        let revoked =
            tokio::time::timeout(Duration::from_secs(10), b.revoke(&record.id, Utc::now()))
                .await
                .expect("the revocation waited 10 s for a lock a dropped write left")
                .unwrap();
        let Some(revoked) = revoked else {
            let on_a = a.get(&record.id).await.unwrap().is_some();
            let on_b = b.get(&record.id).await.unwrap().is_some();
            let mut c = tower_pat::store::sqlx::ConnectOptions::connect(&db.options)
                .await
                .unwrap();
            let rows: Vec<(Option<String>, Option<String>)> = tower_pat::store::sqlx::query_as(
                "SELECT state, query FROM pg_stat_activity WHERE datname = current_database()",
            )
            .fetch_all(&mut c)
            .await
            .unwrap();
            panic!(
                "round {round} (done {done}): the token issued through node a is not there: on a {on_a}, on b {on_b}; sessions {rows:#?}"
            );
        };
        assert!(revoked.is_revoked());
        let stored = b.get(&record.id).await.unwrap().unwrap();
        if round % 2 == 0 {
            let rotated = stored.hash == fresh;
            assert!(rotated || stored.hash == record.hash);
            // Rotated: the old secret is in its grace period and recorded as superseded at its
            // end; not rotated: neither.
            assert_eq!(stored.previous_hash.is_some(), rotated, "half a rotation");
            let superseded = b.find_superseded(&record.hash).await.unwrap();
            assert_eq!(superseded.is_some(), rotated, "half a rotation (history)");
        } else {
            let patched = stored.disabled_at.is_some();
            assert_eq!(!stored.scopes.grants("x:b"), patched, "half a patch");
        }
        // The first node's pool still works (its connections came back).
        tokio::time::timeout(Duration::from_secs(10), a.get(&record.id))
            .await
            .expect("the first node's pool is stuck")
            .unwrap();
    }
    println!("{applied} completed, {dropped} dropped");
}
