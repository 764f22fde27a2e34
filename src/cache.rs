//! The verification cache in front of the store: what a request needs to know about a token, without a store query on a hit.
//!
//! - Positive entries: [`Principal`]s in a `DashMap` keyed by a slot, a 128-bit keyed PRF of
//!   the token (SipHash-2-4-128, a random key per cache), hashed with its own first eight bytes (it
//!   is uniformly random, and only tokens that exist in the store get in, so no one can flood it).
//!   A hit computes no SHA-256 and no checksum: see the [crate docs](crate#the-cache-index-and-what-it-reveals).
//!   An index from the hash the store found each token under to its slot lets store events (which
//!   name hashes) drop entries.
//! - A thread that hits one entry many times in a row serves it from a replica of its own, until
//!   the entry leaves the map (module `hot` below): one busy token on many cores writes no memory
//!   that other cores write.
//! - Negative entries are keyed by the token's hash, probed only after a positive miss and the
//!   format check.
//! - Negative entries (unknown, revoked or expired tokens) in a bounded `moka` cache with a short
//!   TTL: an attacker can create those, so they get admission control and a hard bound.
//! - Concurrent misses for one hash make one store query (single-flight), run in its own task: a
//!   request that goes away (client disconnect, outer timeout) leaves the query to the others
//!   waiting for it, and the last one to go cancels it and leaves nothing behind.
//! - A bounded number of lookups run at once, the excess waits and then gets 503. Since anyone can
//!   make well-formed tokens (the checksum is public), each client address has a small budget of
//!   its own in front of those slots, and clients whose lookups recently found nothing share a
//!   small pool of their own instead: a flood of random tokens does not starve valid ones.
//! - A positive entry is fresh for `ttl`; after it, the next request refreshes it in the background
//!   while the entry keeps serving, for at most `stale_if_error` more (one refresh at a time, retried
//!   each second while the store fails). Older entries are reloaded before use, and so is every
//!   entry past `ttl` while the store's change feed is down: a revocation could go unheard.
//! - Store events drop entries at once: in this process through the store's [`ChangeHub`], in
//!   others through the store's change feed.
//!
//! [`ChangeHub`]: crate::store::ChangeHub

use std::collections::{HashMap, HashSet};
use std::hash::{BuildHasherDefault, Hasher};
use std::net::IpAddr;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use dashmap::DashMap;
use tokio::sync::{AcquireError, OwnedSemaphorePermit, Semaphore, watch};
use tokio::task::AbortHandle;

use crate::client_ip::ClientAddr;
use crate::principal::{Entry, Principal, RETIRED};
use crate::reuse::ReuseDetection;
use crate::scope::ScopeSet;
use crate::store::{ChangeListener, StoreError, StoreEvent, TokenLookup};
use crate::token::{TokenHash, TokenHasher};

/// Unix time in milliseconds from the coarse wall clock: `CLOCK_REALTIME_COARSE` through the
/// vDSO on Linux (a few nanoseconds, no system call; it advances once per kernel tick, 1–10 ms),
/// `SystemTime::now()` elsewhere. Expiry is enforced against it, so to within one tick.
#[inline]
pub(crate) fn now_ms() -> i64 {
    #[cfg(target_os = "linux")]
    {
        let t = rustix::time::clock_gettime(rustix::time::ClockId::RealtimeCoarse);
        // `tv_nsec` is an `i64` on some targets, a `c_long` on others.
        #[allow(clippy::useless_conversion)]
        let nanos = i64::from(t.tv_nsec);
        t.tv_sec.saturating_mul(1_000) + nanos / 1_000_000
    }
    #[cfg(not(target_os = "linux"))]
    {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
    }
}

/// Milliseconds on a clock that never steps back and that a step of the wall clock (NTP) does
/// not move, but that counts the time the machine was suspended (`CLOCK_BOOTTIME` on Linux: a
/// connection may have died during a suspend, and a deadline must have passed on resume;
/// `Instant` elsewhere). For deadlines, not on the request path.
#[cfg(any(feature = "sqlite", feature = "postgres"))]
pub(crate) fn mono_ms() -> i64 {
    #[cfg(target_os = "linux")]
    {
        let t = rustix::time::clock_gettime(rustix::time::ClockId::Boottime);
        #[allow(clippy::useless_conversion)]
        let nanos = i64::from(t.tv_nsec);
        t.tv_sec.saturating_mul(1_000) + nanos / 1_000_000
    }
    #[cfg(not(target_os = "linux"))]
    {
        static START: std::sync::OnceLock<std::time::Instant> = std::sync::OnceLock::new();
        let start = *START.get_or_init(std::time::Instant::now);
        i64::try_from(start.elapsed().as_millis()).unwrap_or(i64::MAX)
    }
}

/// Where a token's positive entry lives: a 128-bit keyed PRF (SipHash-2-4-128) of the token,
/// under a key drawn from the OS CSPRNG when the cache is made, which never leaves it. See
/// [the crate docs](crate#the-cache-index-and-what-it-reveals) for why this is as strong as a
/// probe keyed by the SHA-256 digest, and what a memory dump reveals.
///
/// Two `u64`s rather than a `u128`: 8-byte alignment keeps the map's buckets at 24 bytes (a
/// `u128` would pad them to 32).
#[derive(Clone, Copy, PartialEq, Eq)]
pub(crate) struct Slot([u64; 2]);

impl Slot {
    /// A made-up slot, for tests.
    #[cfg(test)]
    pub(crate) fn test(n: u128) -> Self {
        Self([n as u64, (n >> 64) as u64])
    }
}

impl std::hash::Hash for Slot {
    /// The PRF output is uniformly random: its low 64 bits are the map's hash.
    #[inline]
    fn hash<H: Hasher>(&self, state: &mut H) {
        state.write_u64(self.0[0]);
    }
}

/// The PRF, keyed. Its `Debug` prints no key material.
struct SlotKey(siphasher::sip128::SipHasher24);

impl SlotKey {
    fn random() -> Self {
        let mut key = [0u8; 16];
        getrandom::fill(&mut key).expect("the operating system CSPRNG failed");
        Self(siphasher::sip128::SipHasher24::new_with_key(&key))
    }

    /// One pass over the token's bytes from the keyed initial state (no incremental buffering).
    #[inline]
    fn slot(&self, token: &[u8]) -> Slot {
        let h = self.0.hash(token);
        Slot([h.h1, h.h2])
    }
}

impl std::fmt::Debug for SlotKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("SlotKey(..)")
    }
}

/// How many distinct scope sets [`Cache::shared_scopes`] remembers.
const MAX_SHARED_SCOPE_SETS: usize = 1024;

/// How long a retried background refresh waits after a failed one.
const REFRESH_RETRY_MS: i64 = 1_000;

/// The verification cache's settings, built from [`CacheConfig::default`] with the setters below
/// (each names its default):
///
/// ```
/// use std::time::Duration;
/// use tower_pat::{CacheConfig, MemoryStore, Tokens};
///
/// let tokens = Tokens::new(MemoryStore::new());
/// let config = CacheConfig::default()
///     .ttl(Duration::from_secs(30))
///     .negative_ttl(Duration::from_secs(5));
/// let layer = tokens.layer().cache(config).build();
/// assert_eq!(layer.cache_config().ttl, Duration::from_secs(30));
/// assert_eq!(layer.cache_config().max_concurrent_lookups, 64); // the default
/// ```
///
/// # Store lookups under a flood
///
/// Anyone can make well-formed tokens (the checksum is public), and each unknown one costs a store
/// lookup. Three settings keep a flood of them from starving the lookups of valid tokens:
///
/// - each client (its address; IPv6 per /64) has at most `max_lookups_per_client` lookups running
///   or queued for a shared slot; its further misses wait on that budget of its own, not in the
///   shared queue;
/// - a client whose lookup found nothing within the last `negative_ttl` is a *suspect*: its
///   lookups, also those already queued, run in a pool of `suspect_lookups` slots of their own;
/// - everyone else shares the `max_concurrent_lookups` slots.
///
/// Each wait ends in 503 after `lookup_wait`. Tested: during a flood of 4 000 random tokens against
/// a store answering in 20 ms, 100 valid uncached tokens from other addresses all get 200 within
/// 2 s, whether the flood comes from 4 addresses, 1 000 addresses or 4 000 addresses of one IPv6
/// /64.
///
/// What remains: until one of its lookups has been answered, an address is not a suspect, so an
/// attacker with *A* addresses (IPv6: *A* /64 networks) can put between *A* and *A* ×
/// `max_lookups_per_client` lookups in the shared queue ahead of valid tokens, once per address per
/// `negative_ttl`; valid tokens then wait about that many × the store's latency ÷
/// `max_concurrent_lookups`, and get 503 when that exceeds `lookup_wait` (with the defaults and a
/// 20 ms store, 3 200 queued lookups fill the 1 s wait). Suspects share their pool, including a valid
/// client behind the same address as an attacker (a NAT), until `negative_ttl` after the
/// attacker's last unknown token. Requests without a client address (no peer address in the
/// request extensions; [`PatAuthLayer::verify`](crate::PatAuthLayer::verify) without one) have no
/// budget and are never suspects. At most `negative_capacity` suspects are remembered; past that,
/// moka's admission policy picks which.
#[derive(Clone, Debug)]
#[non_exhaustive]
pub struct CacheConfig {
    /// How long a positive entry is used without asking the store again. Default 60 s.
    pub ttl: Duration,
    /// How long past `ttl` an entry keeps serving while its background refresh fails (the store is
    /// down). Expiry and known revocations are still enforced. Only while the store's change feed
    /// is connected (or the store has none): a node that can hear no revocation does not serve an
    /// entry past `ttl`. Default 5 min; zero disables the background refresh: entries past `ttl`
    /// are reloaded before use.
    pub stale_if_error: Duration,
    /// How long an unknown, revoked or expired token is remembered. Default 10 s.
    pub negative_ttl: Duration,
    /// How many negative entries are kept at most. Default 100 000.
    pub negative_capacity: u64,
    /// How many store lookups may run at once. Default 64.
    pub max_concurrent_lookups: usize,
    /// How long a lookup waits for one of those slots (and for its client's own budget, below)
    /// before the request gets 503. Default 1 s.
    pub lookup_wait: Duration,
    /// How many store lookups one client may have running or waiting for a shared slot at once;
    /// its further misses wait for one of these, then get 503, without taking a shared slot. The
    /// client is the address the layer reads for the failure limit (IPv6 counted per /64).
    /// Requests without a known address have no such budget. Default 8.
    pub max_lookups_per_client: usize,
    /// How long a store lookup (a miss, or an entry's background refresh) may take before it
    /// counts as a store failure: the requests waiting for it get 503 with `Retry-After`, and
    /// its slot is free again. A query on a connection that went silent (a partition that keeps
    /// the socket open) would otherwise hold its slot, and every request for that token, until
    /// TCP gives up, minutes later. Each store query of a lookup has this long (a lookup under
    /// [older peppers](crate::TokenHasher::with_previous_peppers) makes one per pepper), and so
    /// has each query of the [reuse](crate::reuse) check of an unknown token, which holds the
    /// lookup's slots until it ends; a request waits no longer than this for that check, which
    /// goes on in the background. Default 5 s; keep it above the store's slowest answer.
    pub lookup_timeout: Duration,
    /// How many store lookups the clients share that presented an unknown token within the last
    /// `negative_ttl` (at most `negative_capacity` clients remembered): their lookups run in this
    /// pool instead of the `max_concurrent_lookups` slots, so that a flood of random tokens is
    /// confined once each of its addresses has had one lookup answered. Default 8.
    pub suspect_lookups: usize,
}

impl Default for CacheConfig {
    fn default() -> Self {
        Self {
            ttl: Duration::from_secs(60),
            stale_if_error: Duration::from_secs(300),
            negative_ttl: Duration::from_secs(10),
            negative_capacity: 100_000,
            max_concurrent_lookups: 64,
            lookup_wait: Duration::from_secs(1),
            max_lookups_per_client: 8,
            suspect_lookups: 8,
            lookup_timeout: Duration::from_secs(5),
        }
    }
}

impl CacheConfig {
    /// How long a positive entry is used without asking the store again. Default 60 s.
    #[must_use]
    pub fn ttl(mut self, ttl: Duration) -> Self {
        self.ttl = ttl;
        self
    }

    /// How long past `ttl` an entry keeps serving while its background refresh fails (the store is
    /// down). Expiry and known revocations are still enforced. Only while the store's change feed
    /// is connected (or the store has none): a node that can hear no revocation does not serve an
    /// entry past `ttl`. Default 5 min; zero disables the background refresh: entries past `ttl`
    /// are reloaded before use.
    #[must_use]
    pub fn stale_if_error(mut self, stale_if_error: Duration) -> Self {
        self.stale_if_error = stale_if_error;
        self
    }

    /// How long an unknown, revoked or expired token is remembered. Default 10 s.
    #[must_use]
    pub fn negative_ttl(mut self, negative_ttl: Duration) -> Self {
        self.negative_ttl = negative_ttl;
        self
    }

    /// How many negative entries are kept at most. Default 100 000.
    #[must_use]
    pub fn negative_capacity(mut self, negative_capacity: u64) -> Self {
        self.negative_capacity = negative_capacity;
        self
    }

    /// How many store lookups may run at once. Default 64.
    #[must_use]
    pub fn max_concurrent_lookups(mut self, max_concurrent_lookups: usize) -> Self {
        self.max_concurrent_lookups = max_concurrent_lookups;
        self
    }

    /// How long a lookup waits for one of those slots (and for its client's own budget, below)
    /// before the request gets 503. Default 1 s.
    #[must_use]
    pub fn lookup_wait(mut self, lookup_wait: Duration) -> Self {
        self.lookup_wait = lookup_wait;
        self
    }

    /// How long a store lookup may take before it counts as a store failure (503 with
    /// `Retry-After` for the requests waiting for it). Default 5 s. See
    /// [`lookup_timeout`](Self#structfield.lookup_timeout).
    #[must_use]
    pub fn lookup_timeout(mut self, lookup_timeout: Duration) -> Self {
        self.lookup_timeout = lookup_timeout;
        self
    }

    /// How many store lookups one client may have running or waiting for a shared slot at once;
    /// its further misses wait for one of these, then get 503, without taking a shared slot. The
    /// client is the address the layer reads for the failure limit (IPv6 counted per /64).
    /// Requests without a known address have no such budget. Default 8.
    #[must_use]
    pub fn max_lookups_per_client(mut self, max_lookups_per_client: usize) -> Self {
        self.max_lookups_per_client = max_lookups_per_client;
        self
    }

    /// How many store lookups the clients share that presented an unknown token within the last
    /// `negative_ttl` (at most `negative_capacity` clients remembered): their lookups run in this
    /// pool instead of the `max_concurrent_lookups` slots, so that a flood of random tokens is
    /// confined once each of its addresses has had one lookup answered. Default 8.
    #[must_use]
    pub fn suspect_lookups(mut self, suspect_lookups: usize) -> Self {
        self.suspect_lookups = suspect_lookups;
        self
    }
}

/// Why a token is known not to work.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Negative {
    Unknown,
    Revoked,
    Disabled,
    Expired,
}

/// The result of a cache probe or a load.
#[derive(Clone)]
pub(crate) enum Outcome {
    Found(Principal),
    Rejected(Negative),
    Unavailable,
}

/// For keys that are uniformly random (slots, digests): their first eight bytes are the hash.
#[derive(Default)]
pub(crate) struct DigestHasher(u64);

impl Hasher for DigestHasher {
    #[inline]
    fn write(&mut self, bytes: &[u8]) {
        for &b in bytes.iter().take(8) {
            self.0 = (self.0 << 8) | u64::from(b);
        }
    }
    #[inline]
    fn write_u64(&mut self, n: u64) {
        self.0 = n;
    }
    #[inline]
    fn finish(&self) -> u64 {
        self.0
    }
}

/// The store lookups in flight (single-flight).
#[derive(Default)]
struct Flights {
    /// Every lookup in flight, by id.
    all: HashMap<u64, Flight>,
    /// The one a new request for a hash joins: started since the last invalidation. An older one
    /// keeps its waiters but takes no new ones (its answer may predate the invalidation).
    current: HashMap<TokenHash, u64>,
    next_id: u64,
}

impl Flights {
    /// Removes flight `id`, and makes it no longer the one to join for its hash.
    fn remove(&mut self, id: u64) -> Option<Flight> {
        let flight = self.all.remove(&id)?;
        if self.current.get(&flight.key) == Some(&id) {
            self.current.remove(&flight.key);
        }
        Some(flight)
    }
}

/// How many stripes the invalidation epochs have: an event about one token stops the loads in
/// flight of about one token in this many from caching.
const EPOCH_STRIPES: usize = 4096;

/// The stripe of the invalidation epochs `hash` falls in.
fn epoch_stripe(hash: &TokenHash) -> usize {
    // The digest's bytes are uniform: bytes 4 and 5 of its first eight (which key the index).
    let stripe = hash.prefix_u64().rotate_right(32) as usize;
    stripe % EPOCH_STRIPES
}

/// What a load read of the invalidation epochs of its hashes before it started
/// ([`Cache::epoch`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Epoch(u64);

/// One store lookup, shared by every request waiting for its token.
struct Flight {
    key: TokenHash,
    /// The epochs of the lookup's hashes when it started.
    epoch: Epoch,
    /// The lookup's answer, once it has one.
    answer: watch::Receiver<Option<Outcome>>,
    /// How many requests wait for the answer.
    waiters: usize,
    /// The task running the lookup: cancelled when the last waiter goes away.
    task: AbortHandle,
}

/// A request's place in a [`Flight`]. Dropping it (the request finished or went away) leaves the
/// flight; the last one out removes the flight and cancels its lookup.
struct Waiter<'a> {
    cache: &'a Cache,
    id: u64,
}

impl Drop for Waiter<'_> {
    fn drop(&mut self) {
        let mut flights = self.cache.flights.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(flight) = flights.all.get_mut(&self.id) {
            flight.waiters -= 1;
            if flight.waiters == 0
                && let Some(flight) = flights.remove(self.id)
            {
                flight.task.abort();
            }
        }
    }
}

/// A client's own lookup budget, shared by its lookups in flight.
struct ClientBudget {
    budget: Arc<Budget>,
    /// Lookups holding or waiting for one of its slots: the budget is dropped when none are left.
    users: usize,
}

struct Budget {
    slots: Arc<Semaphore>,
    /// Wakes the client's lookups queued for a shared slot when one of its lookups found nothing:
    /// they move to the suspects' pool.
    suspected: tokio::sync::Notify,
}

/// The lookup slots a store lookup holds: its client's own (when it has a client address) and one
/// of the shared pool or the suspects' pool.
type LookupPermits = (Option<OwnedSemaphorePermit>, OwnedSemaphorePermit);

/// A lookup's use of its client's [`ClientBudget`], released on drop (owned: a reuse detection
/// that outlives its request keeps it, see [`Cache::detect_reuse`]).
struct ClientUse {
    cache: Arc<Cache>,
    client: IpAddr,
    budget: Arc<Budget>,
}

impl Drop for ClientUse {
    fn drop(&mut self) {
        let mut clients = self.cache.clients.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(budget) = clients.get_mut(&self.client) {
            budget.users -= 1;
            if budget.users == 0 {
                clients.remove(&self.client);
            }
        }
    }
}

/// How often at most a cache warns that lookups waited `lookup_wait` in vain for a slot: one
/// client sending random well-formed tokens past its budget could otherwise write a warning per
/// request. Each such request is a refusal at debug too.
const BUSY_WARNING_INTERVAL: Duration = Duration::from_secs(60);

/// A warning logged at most once per interval, which counts the occurrences it did not log.
#[derive(Debug)]
struct Throttled {
    /// What [`Self::next`] is measured from (a monotonic clock: a wall clock set back would
    /// silence the warning).
    since: std::time::Instant,
    /// Milliseconds after `since` before which no warning is due.
    next: AtomicU64,
    /// Occurrences not logged since the last warning.
    suppressed: AtomicU64,
}

impl Throttled {
    fn new() -> Self {
        Self {
            since: std::time::Instant::now(),
            next: AtomicU64::new(0),
            suppressed: AtomicU64::new(0),
        }
    }

    /// Whether this occurrence is to be logged, at most one per `interval`: if so, how many were
    /// not since the last one that was.
    fn due(&self, interval: Duration) -> Option<u64> {
        let ms = |d: Duration| u64::try_from(d.as_millis()).unwrap_or(u64::MAX);
        let now = ms(self.since.elapsed());
        let next = self.next.load(Ordering::Relaxed);
        if now >= next
            && self
                .next
                .compare_exchange(
                    next,
                    now.saturating_add(ms(interval)),
                    Ordering::Relaxed,
                    Ordering::Relaxed,
                )
                .is_ok()
        {
            Some(self.suppressed.swap(0, Ordering::Relaxed))
        } else {
            self.suppressed.fetch_add(1, Ordering::Relaxed);
            None
        }
    }
}

pub(crate) struct Cache {
    /// This cache among all in the process: what its threads' hot replicas (module `hot`) are
    /// keyed by.
    id: u64,
    /// The positive entries, by [`Slot`]: a hit computes no SHA-256.
    positive: DashMap<Slot, Principal, BuildHasherDefault<DigestHasher>>,
    /// The slot of each positive entry by the first eight bytes of the hash the store found it
    /// under (what store events name). Changed only under the positive map's shard lock of the
    /// slot, so that it always agrees with the map: see [`Self::remember`] and
    /// [`Self::invalidate`].
    index: DashMap<u64, Slot, BuildHasherDefault<DigestHasher>>,
    /// How many times two cached tokens' hashes shared their first eight bytes (about once in
    /// 2^64 / n² at n tokens): from then on, an invalidation also scans the map.
    index_collisions: AtomicU64,
    slot_key: SlotKey,
    negative: moka::sync::Cache<TokenHash, Negative>,
    flights: Mutex<Flights>,
    scope_sets: Mutex<HashSet<ScopeSet>>,
    /// Epochs per stripe of hashes ([`EPOCH_STRIPES`]), each bumped by every invalidation of a
    /// hash in its stripe (and all by a clear): a load that started before one of its hashes was
    /// invalidated does not cache its result. Striped, so that a flood of events about one token
    /// (renaming it in a loop) does not keep every other token's loads from caching.
    epochs: Box<[AtomicU64]>,
    lookups: Arc<Semaphore>,
    /// Each client's lookup budget, while it has lookups in flight.
    clients: Mutex<HashMap<IpAddr, ClientBudget>>,
    /// Clients whose last lookups found nothing, for `negative_ttl`.
    suspects: moka::sync::Cache<IpAddr, ()>,
    /// The lookup slots of [`Self::suspects`].
    suspect_lookups: Arc<Semaphore>,
    lookup: Arc<dyn TokenLookup>,
    /// Rotation reuse detection, on the miss path of unknown tokens (see [`crate::reuse`]).
    reuse: Option<Arc<ReuseDetection>>,
    hasher: TokenHasher,
    ttl_ms: i64,
    stale_ms: i64,
    config: CacheConfig,
    has_feed: std::sync::atomic::AtomicBool,
    /// Unix ms since which the change feed is disconnected; 0 while connected.
    disconnected_since: AtomicI64,
    /// Positive: the Unix ms at which the first store query that failed since the store last
    /// answered was sent. Otherwise minus the Unix ms at which the last query the store answered
    /// was sent, or the cache was cleared (a failure of a query sent before that is old news).
    failing_since: AtomicI64,
    store_lookups: AtomicU64,
    /// The warning that lookups waited in vain for a slot, once per [`BUSY_WARNING_INTERVAL`].
    busy_warning: Throttled,
    /// The layer's counters ([`crate::PatAuthLayer::stats`]).
    pub(crate) stats: crate::stats::Stats,
    /// A test hook run just before a load or refresh caches what the store answered.
    insert_hook: std::sync::OnceLock<InsertHook>,
}

type InsertHook = Box<dyn Fn() + Send + Sync>;

impl Cache {
    pub(crate) fn new(
        lookup: Arc<dyn TokenLookup>,
        hasher: TokenHasher,
        config: CacheConfig,
        reuse: Option<ReuseDetection>,
    ) -> Arc<Self> {
        let negative = moka::sync::Cache::builder()
            .max_capacity(config.negative_capacity)
            .time_to_live(config.negative_ttl.max(Duration::from_millis(1)))
            .build();
        let suspects = moka::sync::Cache::builder()
            .max_capacity(config.negative_capacity)
            .time_to_live(config.negative_ttl.max(Duration::from_millis(1)))
            .build();
        static NEXT_ID: AtomicU64 = AtomicU64::new(1);
        let cache = Arc::new(Self {
            id: NEXT_ID.fetch_add(1, Ordering::Relaxed),
            positive: DashMap::default(),
            index: DashMap::default(),
            index_collisions: AtomicU64::new(0),
            slot_key: SlotKey::random(),
            negative,
            flights: Mutex::default(),
            scope_sets: Mutex::default(),
            epochs: (0..EPOCH_STRIPES).map(|_| AtomicU64::new(0)).collect(),
            lookups: Arc::new(Semaphore::new(permits(config.max_concurrent_lookups))),
            clients: Mutex::default(),
            suspects,
            suspect_lookups: Arc::new(Semaphore::new(permits(config.suspect_lookups))),
            lookup,
            reuse: reuse.map(Arc::new),
            hasher,
            ttl_ms: duration_ms(config.ttl),
            stale_ms: duration_ms(config.stale_if_error),
            config,
            has_feed: false.into(),
            disconnected_since: AtomicI64::new(0),
            failing_since: AtomicI64::new(0),
            store_lookups: AtomicU64::new(0),
            busy_warning: Throttled::new(),
            stats: crate::stats::Stats::default(),
            insert_hook: std::sync::OnceLock::new(),
        });
        let weak = Arc::downgrade(&cache);
        let has_feed = cache.lookup.subscribe(weak);
        cache.has_feed.store(has_feed, Ordering::Relaxed);
        cache
    }

    pub(crate) fn hasher(&self) -> &TokenHasher {
        &self.hasher
    }

    /// The slot of `token`'s positive entry.
    #[inline]
    pub(crate) fn slot(&self, token: &[u8]) -> Slot {
        self.slot_key.slot(token)
    }

    pub(crate) fn config(&self) -> &CacheConfig {
        &self.config
    }

    pub(crate) fn len(&self) -> usize {
        self.positive.len()
    }

    /// Entries in the negative cache (approximate: moka evicts lazily).
    pub(crate) fn negative_len(&self) -> u64 {
        self.negative.entry_count()
    }

    /// The change feed's state.
    pub(crate) fn feed_state(&self) -> crate::stats::FeedState {
        use crate::stats::FeedState;
        if !self.has_feed.load(Ordering::Relaxed) {
            return FeedState::None;
        }
        match self.disconnected_since.load(Ordering::Acquire) {
            0 => FeedState::Connected,
            since => FeedState::Disconnected(Duration::from_millis(
                u64::try_from(now_ms() - since).unwrap_or(0).max(1),
            )),
        }
    }

    /// Rotated-out secrets reported by this cache's reuse detection.
    pub(crate) fn reused_secrets(&self) -> u64 {
        self.reuse.as_ref().map_or(0, |r| r.reported())
    }

    pub(crate) fn store_lookups(&self) -> u64 {
        self.store_lookups.load(Ordering::Relaxed)
    }

    pub(crate) fn lookups_in_flight(&self) -> usize {
        self.flights
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .all
            .len()
    }

    /// How many clients have lookups in flight (each has a budget while it does).
    #[cfg(test)]
    fn clients_in_flight(&self) -> usize {
        self.clients.lock().unwrap_or_else(|e| e.into_inner()).len()
    }

    pub(crate) fn set_insert_hook(&self, hook: InsertHook) -> bool {
        self.insert_hook.set(hook).is_ok()
    }

    fn run_insert_hook(&self) {
        if let Some(hook) = self.insert_hook.get() {
            hook();
        }
    }

    /// The hot path: this thread's replica of a hot token, else a probe of the positive map.
    /// `None` is a miss (also for an entry too old to serve). Triggers a background refresh of an
    /// entry past its TTL.
    #[inline]
    pub(crate) fn probe(self: &Arc<Self>, slot: Slot, now: i64) -> Option<Principal> {
        hot::probe(self.id, slot, now, || self.probe_map(slot, now))
    }

    /// [`probe`](Self::probe) of the positive map: `Hit::Fresh` counts towards a hot replica.
    #[inline]
    fn probe_map(self: &Arc<Self>, slot: Slot, now: i64) -> Option<hot::Hit> {
        let p = self.positive.get(&slot)?;
        let refresh_at = p.value().0.refresh_at_ms.load(Ordering::Acquire);
        let principal = p.value().clone();
        // The shard's read lock ends here: the stale path may need its write lock.
        drop(p);
        if now < refresh_at {
            return Some(hot::Hit::Fresh(principal));
        }
        self.probe_stale(principal, now, refresh_at)
            .map(hot::Hit::Stale)
    }

    /// The negative cache's answer for a token the positive map does not hold, by its hash.
    #[inline]
    pub(crate) fn probe_negative(&self, hash: &TokenHash) -> Option<Negative> {
        self.negative.get(hash)
    }

    #[cold]
    fn probe_stale(
        self: &Arc<Self>,
        principal: Principal,
        now: i64,
        refresh_at: i64,
    ) -> Option<Principal> {
        let entry = &principal.0;
        if refresh_at == RETIRED {
            // Dropped from the map since this request found it there.
            return None;
        }
        let hard_limit = entry.loaded_ms.saturating_add(self.ttl_ms + self.stale_ms);
        if self.stale_ms == 0
            || now >= hard_limit
            // The feed is down (or overdue): a revocation could be missed, so no serving on trust
            // past the TTL.
            || self.disconnected_since.load(Ordering::Acquire) != 0
            || self.lookup.feed_unconfirmed_since().is_some()
        {
            // Too old to serve: reload before use.
            self.evict(entry);
            return None;
        }
        // One refresh at a time: whoever moves `refresh_at` runs it.
        if entry
            .refresh_at_ms
            .compare_exchange(
                refresh_at,
                // Retried each second while the store fails, never past the hard limit.
                (now + REFRESH_RETRY_MS).min(hard_limit),
                Ordering::AcqRel,
                Ordering::Relaxed,
            )
            .is_ok()
            && let Ok(rt) = tokio::runtime::Handle::try_current()
        {
            let cache = Arc::clone(self);
            let stale = principal.clone();
            rt.spawn(async move { cache.refresh(stale).await });
        }
        Some(principal)
    }

    /// Removes `entry` from the positive map (if it is still the one there) and from the index.
    fn evict(&self, entry: &Arc<Entry>) {
        if let dashmap::Entry::Occupied(o) = self.positive.entry(entry.slot)
            && Arc::ptr_eq(&o.get().0, entry)
        {
            // Under the slot's shard lock, like every change of the index.
            self.unindex(entry.hash, entry.slot);
            o.remove().0.retire();
        }
    }

    /// Drops the index's pointer from `hash` to `slot`. Call only under `slot`'s shard lock of
    /// the positive map.
    fn unindex(&self, hash: TokenHash, slot: Slot) {
        self.index.remove_if(&hash.prefix_u64(), |_, s| *s == slot);
    }

    async fn refresh(self: Arc<Self>, stale: Principal) {
        let entry = &stale.0;
        let epoch = self.epoch(&entry.hash, &[]);
        // Refreshes share the lookup slots, but never wait: the store is busy enough already.
        let Ok(_permit) = self.lookups.try_acquire() else {
            return;
        };
        // The hash the store found the token under: the secret that was presented.
        match self.fetch(entry.slot, &entry.hash, &[]).await {
            Ok((outcome, _)) => {
                // The last use marked on the stale entry carries over to the fresh one: before it
                // goes in, and again after, for a mark made on the old entry meanwhile.
                let carry_mark = || {
                    if let Outcome::Found(fresh) = &outcome {
                        let marked = stale.0.last_mark_ms.load(Ordering::Relaxed);
                        fresh.0.last_mark_ms.fetch_max(marked, Ordering::Relaxed);
                    }
                };
                carry_mark();
                if let Outcome::Rejected(_) = outcome {
                    self.evict(entry);
                }
                self.remember(entry.slot, entry.hash, &[], &outcome, epoch);
                carry_mark();
            }
            Err(()) => {
                tracing::warn!(target: "tower_pat::store", token_id = %stale.token_id(), "token refresh failed; serving the cached entry");
            }
        }
    }

    /// The miss path: one store query per hash however many requests wait for it. `client` is the
    /// request's client address: its limit key for the lookup budget (see [`CacheConfig`]), its
    /// address for a [reuse](crate::reuse) report.
    ///
    /// The query runs in a task of its own: a request dropped while it waits leaves its flight,
    /// the query goes on for the others, and the last one to leave cancels it (releasing its
    /// slots) and removes the flight. A request never joins a flight that started before an
    /// invalidation: its answer may predate the change.
    pub(crate) async fn load(
        self: Arc<Self>,
        slot: Slot,
        key: TokenHash,
        previous: Vec<TokenHash>,
        client: ClientAddr,
    ) -> Outcome {
        let Some((mut answer, _waiter)) = self.join(slot, key, previous, client) else {
            return Outcome::Unavailable;
        };
        let outcome = match answer.wait_for(Option::is_some).await {
            Ok(outcome) => outcome.clone(),
            // The lookup's task is gone without an answer (it panicked).
            Err(_) => None,
        };
        outcome.unwrap_or(Outcome::Unavailable)
    }

    /// Joins the flight for `key`, starting it if there is none. `None` outside a Tokio runtime.
    fn join(
        self: &Arc<Self>,
        slot: Slot,
        key: TokenHash,
        previous: Vec<TokenHash>,
        client: ClientAddr,
    ) -> Option<(watch::Receiver<Option<Outcome>>, Waiter<'_>)> {
        let mut flights = self.flights.lock().unwrap_or_else(|e| e.into_inner());
        let epoch = self.epoch(&key, &previous);
        let joinable = flights.current.get(&key).copied().filter(|id| {
            flights.all.get(id).is_some_and(|f| {
                // Not one that started before an invalidation of its hashes (a flight's
                // `previous` are the key's, so its epoch reads the same stripes), nor one whose
                // task died (a
                // finished task has removed its flight, unless it panicked).
                f.epoch == epoch && !f.task.is_finished()
            })
        });
        let (answer, id) = match joinable.and_then(|id| Some((id, flights.all.get_mut(&id)?))) {
            Some((id, flight)) => {
                flight.waiters += 1;
                (flight.answer.clone(), id)
            }
            None => {
                let Ok(runtime) = tokio::runtime::Handle::try_current() else {
                    tracing::error!("token lookup outside a Tokio runtime; answering 503");
                    return None;
                };
                let id = flights.next_id;
                flights.next_id += 1;
                let (tx, answer) = watch::channel(None);
                // Spawned under the lock: the flight is in the table before its task can end.
                let task = runtime
                    .spawn(Arc::clone(self).fly(id, slot, key, epoch, previous, client, tx))
                    .abort_handle();
                let flight = Flight {
                    key,
                    epoch,
                    answer: answer.clone(),
                    waiters: 1,
                    task,
                };
                flights.all.insert(id, flight);
                flights.current.insert(key, id);
                (answer, id)
            }
        };
        Some((answer, Waiter { cache: self, id }))
    }

    /// A flight's task: looks the token up, retires the flight, then hands out the answer.
    #[allow(clippy::too_many_arguments)]
    async fn fly(
        self: Arc<Self>,
        id: u64,
        slot: Slot,
        key: TokenHash,
        epoch: Epoch,
        previous: Vec<TokenHash>,
        client: ClientAddr,
        answer: watch::Sender<Option<Outcome>>,
    ) {
        // A flight that finished just before this one started may have filled the cache.
        let cached = match self.probe(slot, now_ms()) {
            Some(hit) => Some(Outcome::Found(hit)),
            None => self.probe_negative(&key).map(Outcome::Rejected),
        };
        let outcome = match cached {
            Some(outcome) => outcome,
            None => {
                self.load_uncached(slot, key, &previous, epoch, client)
                    .await
            }
        };
        self.flights
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(id);
        answer.send_replace(Some(outcome));
    }

    /// Looks `key` up in the store and caches the answer, unless an invalidation of `key` or of
    /// one of `previous` came after `epoch` (read before the lookup started).
    async fn load_uncached(
        self: &Arc<Self>,
        slot: Slot,
        key: TokenHash,
        previous: &[TokenHash],
        epoch: Epoch,
        address: ClientAddr,
    ) -> Outcome {
        let client = address.limit_key().map(client_key);
        // Declared before the permits, dropped after them.
        let budget = client.map(|c| self.client_budget(c));
        let slots = tokio::time::timeout(self.config.lookup_wait, async {
            let shared_pool = || Arc::clone(&self.lookups).acquire_owned();
            let suspect_pool = || Arc::clone(&self.suspect_lookups).acquire_owned();
            let Some(budget) = &budget else {
                return Ok::<_, AcquireError>((None, shared_pool().await?));
            };
            let own = Arc::clone(&budget.budget.slots).acquire_owned().await?;
            let suspect = || client.is_some_and(|c| self.suspects.contains_key(&c));
            // Registered before the check, so that no verdict falls in between.
            let suspected = budget.budget.suspected.notified();
            let mut suspected = std::pin::pin!(suspected);
            suspected.as_mut().enable();
            let shared = if suspect() {
                suspect_pool().await?
            } else {
                tokio::select! {
                    biased;
                    shared = shared_pool() => shared?,
                    // Another of this client's lookups found nothing while this one queued.
                    () = suspected => suspect_pool().await?,
                }
            };
            Ok((Some(own), shared))
        })
        .await;
        let Ok(Ok(permits)) = slots else {
            // Once a minute at most: a client can make this happen at will.
            if let Some(suppressed) = self.busy_warning.due(BUSY_WARNING_INTERVAL) {
                tracing::warn!(
                    target: "tower_pat::store",
                    suppressed,
                    "too many concurrent token lookups (or one client's lookup budget full); \
                     answering 503 (warned once a minute at most: `suppressed` counts the \
                     others since the last warning)"
                );
            }
            return Outcome::Unavailable;
        };
        let (outcome, under_key) = match self.fetch(slot, &key, previous).await {
            Ok(o) => o,
            Err(()) => return Outcome::Unavailable,
        };
        if let Some(c) = &budget
            && let Outcome::Rejected(Negative::Unknown) = outcome
        {
            self.suspects.insert(c.client, ());
            c.budget.suspected.notify_waiters();
        }
        // A disabled record stored under an older pepper's hash is not remembered under `key`:
        // the event that enables it again names the other hash, and could not reach it. Revoked
        // is for good, and expired nearly so (the management API gives an expired token no new
        // expiry); both are remembered, so that a flood of one old secret costs one lookup per
        // negative TTL. A principal is indexed by the hash it was found under.
        let reversible = matches!(outcome, Outcome::Rejected(Negative::Disabled));
        if under_key || !reversible {
            self.remember(slot, key, previous, &outcome, epoch);
        }
        // After the answer is remembered: a revocation the policy makes invalidates the token's
        // current hashes, never this one's negative entry, which keeps a flood of the same dead
        // secret to one history lookup per negative TTL.
        if let (Some(reuse), Outcome::Rejected(Negative::Unknown)) = (&self.reuse, &outcome) {
            // The detection holds this lookup's slots and client budget until it ends.
            self.detect_reuse(reuse, key, previous, address.ip(), (permits, budget))
                .await;
        }
        outcome
    }

    /// Looks an unknown token's hashes up in the store's history of superseded secrets (see
    /// [`crate::reuse`]), in a task of its own: a presenter that goes away (which cancels the
    /// lookup) cannot cancel the report or the revocation. The task holds `held`, the lookup's
    /// slots and its client's budget, until the history has answered: a presenter that goes away
    /// does not get them back early, so detections stay within the same bounds as lookups. Each
    /// history query has `lookup_timeout`, like a lookup's: one that takes longer is a store
    /// failure, so a store that hangs keeps the slots no longer than it would a lookup's.
    #[cold]
    async fn detect_reuse(
        self: &Arc<Self>,
        reuse: &Arc<ReuseDetection>,
        key: TokenHash,
        previous: &[TokenHash],
        client: Option<IpAddr>,
        held: (LookupPermits, Option<ClientUse>),
    ) {
        let hashes: Vec<TokenHash> = std::iter::once(key)
            .chain(previous.iter().copied().filter(|h| *h != key))
            .collect();
        let (cache, reuse) = (Arc::clone(self), Arc::clone(reuse));
        let detection = tokio::spawn(async move {
            let sent = now_ms();
            let (queries, found) = reuse
                .find(&*cache.lookup, &hashes, cache.config.lookup_timeout)
                .await;
            // The history has answered (or failed): the slots go back, the permits before the
            // client's budget (the tuple's order). A report goes on without them.
            drop(held);
            cache.store_lookups.fetch_add(queries, Ordering::Relaxed);
            match found {
                Ok(found) => {
                    cache.store_answered(sent);
                    if let Some(found) = found {
                        reuse.apply(found, client).await;
                    }
                }
                Err(e) => {
                    tracing::warn!(target: "tower_pat::store", error = %e, "superseded secret lookup failed");
                    cache.store_failed(sent);
                }
            }
        });
        // A panic of the hook leaves nothing to undo. The request (and those joined to it) waits
        // for the detection no longer than a lookup may take: the task goes on without it, so a
        // report or a revocation under way is not cut short by a slow store.
        let _ = tokio::time::timeout(self.config.lookup_timeout, detection).await;
    }

    /// Registers a lookup of `client` with the client's budget, creating it if needed.
    fn client_budget(self: &Arc<Self>, client: IpAddr) -> ClientUse {
        let mut clients = self.clients.lock().unwrap_or_else(|e| e.into_inner());
        let entry = clients.entry(client).or_insert_with(|| ClientBudget {
            budget: Arc::new(Budget {
                slots: Arc::new(Semaphore::new(permits(self.config.max_lookups_per_client))),
                suspected: tokio::sync::Notify::new(),
            }),
            users: 0,
        });
        entry.users += 1;
        ClientUse {
            cache: Arc::clone(self),
            client,
            budget: Arc::clone(&entry.budget),
        }
    }

    /// Caches what the store answered for the token in `slot` (looked up under `key`, then
    /// `previous`) by a load or refresh that started at `epoch` ([`Self::epoch`] of the same
    /// hashes), unless an invalidation of one of them came since: the invalidation always wins.
    /// A record found is found under one of them, and the events about it name every hash it
    /// answered to.
    fn remember(
        &self,
        slot: Slot,
        key: TokenHash,
        previous: &[TokenHash],
        outcome: &Outcome,
        epoch: Epoch,
    ) {
        self.run_insert_hook();
        match outcome {
            Outcome::Found(p) => {
                // Under the slot's shard write lock: the index entry, then the epoch, then the
                // entry. An invalidation bumps the epoch, then reads the index, then takes this
                // lock to remove the entry: either it bumped before the check below (nothing is
                // cached), or its index read comes after the index write below and finds the
                // entry, which it removes after this lock is released. No request can see the
                // entry after an invalidation returned.
                let slot_entry = self.positive.entry(slot);
                let hash = p.0.hash;
                let prefix = hash.prefix_u64();
                let indexed = match self.index.entry(prefix) {
                    dashmap::Entry::Vacant(v) => {
                        v.insert(slot);
                        true
                    }
                    dashmap::Entry::Occupied(o) if *o.get() == slot => false,
                    dashmap::Entry::Occupied(_) => {
                        // Another cached token's hash starts with the same eight bytes.
                        self.index_collisions.fetch_add(1, Ordering::SeqCst);
                        false
                    }
                };
                // Pairs with the fence in `bump`, as in the negative branch below: the index write
                // above comes before the epochs read here.
                std::sync::atomic::fence(Ordering::SeqCst);
                if self.epoch(&key, previous) != epoch {
                    if indexed {
                        self.index.remove_if(&prefix, |_, s| *s == slot);
                    }
                    return;
                }
                match slot_entry {
                    dashmap::Entry::Occupied(mut old) => {
                        if old.get().0.hash != hash {
                            self.unindex(old.get().0.hash, slot);
                        }
                        // The replaced entry's replicas stop serving: the next hit finds this one.
                        old.insert(p.clone()).0.retire();
                    }
                    dashmap::Entry::Vacant(v) => {
                        v.insert(p.clone());
                    }
                }
            }
            Outcome::Rejected(n) => {
                // The negative cache has no such lock: insert, then take the entry back if an
                // invalidation came in between (another load's newer entry may go with it: it is
                // looked up again). The fences pair with the one in `bump`: either this load
                // sees the new epoch, or that invalidation sees this entry.
                self.negative.insert(key, *n);
                std::sync::atomic::fence(Ordering::SeqCst);
                if self.epoch(&key, previous) != epoch {
                    self.negative.invalidate(&key);
                }
            }
            Outcome::Unavailable => {}
        }
    }

    /// Queries the store for `key`, then for each of `previous` (older peppers). `Err` when the
    /// store failed; with the outcome, whether it came from a record found under `key` (not under
    /// an older pepper's hash: store events about that record name the other hash).
    async fn fetch(
        &self,
        slot: Slot,
        key: &TokenHash,
        previous: &[TokenHash],
    ) -> Result<(Outcome, bool), ()> {
        for hash in std::iter::once(key).chain(previous.iter().filter(|h| *h != key)) {
            let under_key = hash == key;
            self.store_lookups.fetch_add(1, Ordering::Relaxed);
            let sent = now_ms();
            let started = std::time::Instant::now();
            let timeout = self.config.lookup_timeout;
            let found = tokio::time::timeout(timeout, self.lookup.find_by_hash(hash))
                .await
                .unwrap_or_else(|_| {
                    Err(StoreError::backend(format!(
                        "the store did not answer a token lookup within {timeout:?}"
                    )))
                });
            self.stats.lookup(started.elapsed(), found.is_err());
            let found = found.map_err(|e| {
                tracing::warn!(target: "tower_pat::store", error = %e, "token lookup failed");
                self.store_failed(sent);
            })?;
            self.store_answered(sent);
            let Some(mut record) = found else { continue };
            if record.is_revoked() {
                return Ok((Outcome::Rejected(Negative::Revoked), under_key));
            }
            if record.is_disabled() {
                return Ok((Outcome::Rejected(Negative::Disabled), under_key));
            }
            record.scopes = self.shared_scopes(std::mem::take(&mut record.scopes));
            let now = now_ms();
            let entry = Entry::new(record, slot, *hash, now, self.ttl_ms);
            // The entry's expiry is the token's, or the end of the rotation grace period.
            if entry.expires_ms <= now {
                return Ok((Outcome::Rejected(Negative::Expired), under_key));
            }
            return Ok((Outcome::Found(Principal(Arc::new(entry))), under_key));
        }
        Ok((Outcome::Rejected(Negative::Unknown), true))
    }

    /// The one copy of this scope set the cache's entries share: tokens mostly have one of a few
    /// scope sets, and a set is a few allocations. Bounded: past [`MAX_SHARED_SCOPE_SETS`] distinct
    /// sets the table starts over (entries keep theirs).
    fn shared_scopes(&self, scopes: ScopeSet) -> ScopeSet {
        let mut sets = self.scope_sets.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(shared) = sets.get(&scopes) {
            return shared.clone();
        }
        if sets.len() >= MAX_SHARED_SCOPE_SETS {
            sets.clear();
        }
        sets.insert(scopes.clone());
        scopes
    }

    /// Drops a positive entry that expired while cached. Nothing is remembered in its place: the
    /// request that noticed may have read the entry before an invalidation (a later expiry set
    /// meanwhile), and a negative entry written after that invalidation would refuse the token
    /// until it timed out. The next request looks the token up, and a refusal found so is
    /// remembered under the epoch check of every load ([`remember`](Self::remember)).
    pub(crate) fn expire(&self, principal: &Principal) {
        self.evict(Entry::origin(&principal.0));
    }

    /// Drops everything cached for the record with this id, which the store found under `hash`
    /// (events name every hash a record answered to).
    pub(crate) fn invalidate(&self, id: &str, hash: &TokenHash) {
        self.bump(Some(hash));
        self.negative.invalidate(hash);
        // Copied out: no index lock is held while a shard lock of the map is taken.
        let slot = self.index.get(&hash.prefix_u64()).map(|s| *s);
        if let Some(slot) = slot
            && let dashmap::Entry::Occupied(o) = self.positive.entry(slot)
            && o.get().0.hash == *hash
        {
            self.unindex(*hash, slot);
            o.remove().0.retire();
        }
        if self.index_collisions.load(Ordering::SeqCst) != 0 {
            // An entry may be missing from the index: look at them all.
            self.positive.retain(|_, p| {
                let keep = p.0.hash != *hash && p.token_id() != id;
                if !keep {
                    p.0.retire();
                }
                keep
            });
        }
    }

    /// Tells loads in flight for `hash` (every load with `None`) that their answer may be
    /// outdated: see [`Self::remember`].
    fn bump(&self, hash: Option<&TokenHash>) {
        match hash {
            Some(hash) => {
                self.epochs[epoch_stripe(hash)].fetch_add(1, Ordering::SeqCst);
            }
            None => {
                for stripe in &*self.epochs {
                    stripe.fetch_add(1, Ordering::SeqCst);
                }
            }
        }
        std::sync::atomic::fence(Ordering::SeqCst);
    }

    /// The epoch of a load of `key` (then `previous`): the sum of the epochs of their stripes,
    /// which changes whenever one of them is bumped (each only grows).
    fn epoch(&self, key: &TokenHash, previous: &[TokenHash]) -> Epoch {
        Epoch(
            std::iter::once(key)
                .chain(previous)
                .map(|h| self.epochs[epoch_stripe(h)].load(Ordering::SeqCst))
                .fold(0, u64::wrapping_add),
        )
    }

    /// Drops every entry.
    pub(crate) fn clear(&self) {
        self.bump(None);
        // The index first: an entry cached after the map's shard was cleared keeps its index
        // entry (written after this, under that shard's lock).
        self.index.clear();
        self.positive.retain(|_, p| {
            p.0.retire();
            false
        });
        self.negative.invalidate_all();
        // Nothing is left that a failed refresh could not confirm.
        self.failing_since.store(-now_ms(), Ordering::Release);
    }

    /// A store query sent at `sent` failed: the store is failing since then, unless it has
    /// answered a later query (or the cache was cleared) since.
    fn store_failed(&self, sent: i64) {
        let _ = self
            .failing_since
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |f| {
                (f <= 0 && sent >= -f).then_some(sent.max(1))
            });
    }

    /// The store answered a query sent at `sent`: it is not failing, unless a later query failed.
    fn store_answered(&self, sent: i64) {
        let _ = self
            .failing_since
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |f| {
                // Failing since `f`, or last answered at `-f`: only a later query counts.
                let later = if f > 0 { sent > f } else { sent > -f };
                later.then_some(-sent)
            });
    }

    /// How old the oldest state this cache may act on can be, as far as it knows: zero while the
    /// store's change feed is connected and its queries succeed; the time since the feed dropped,
    /// or since the first of the store queries that keep failing was sent, whichever is longer
    /// (at most the TTL plus `stale_if_error`); the TTL plus `stale_if_error` for a store without
    /// a feed.
    pub(crate) fn max_staleness(&self) -> Duration {
        let bound = self.config.ttl + self.config.stale_if_error;
        if !self.has_feed.load(Ordering::Relaxed) {
            return bound;
        }
        let disconnected = self.disconnected_since.load(Ordering::Acquire);
        let failing = self.failing_since.load(Ordering::Acquire);
        // The feed's last confirmation, once the next is overdue (before a heartbeat declares
        // the feed down, and earlier than the moment it does).
        let unconfirmed = self.lookup.feed_unconfirmed_since().unwrap_or(0);
        let since = [disconnected, failing, unconfirmed]
            .into_iter()
            .filter(|&t| t > 0)
            .min();
        match since {
            None => Duration::ZERO,
            // At least 1 ms: the coarse clock may not have ticked since, and zero means fresh.
            Some(since) => Duration::from_millis((now_ms() - since).max(1) as u64).min(bound),
        }
    }
}

impl ChangeListener for Cache {
    fn on_event(&self, event: &StoreEvent) {
        match event {
            StoreEvent::Changed { id, hash } => self.invalidate(id, hash),
            StoreEvent::Disconnected => {
                let _ = self.disconnected_since.compare_exchange(
                    0,
                    now_ms(),
                    Ordering::AcqRel,
                    Ordering::Relaxed,
                );
            }
            StoreEvent::Reconnected => {
                // Every entry loaded before the feed was back may have missed a change: those
                // loaded before the drop, and those loaded during it (the store may have been
                // reachable while the feed was not). The epoch bump in `clear` also keeps loads
                // in flight from caching. Cleared first, so that whoever sees the feed connected
                // sees the cache emptied.
                self.clear();
                self.disconnected_since.store(0, Ordering::Release);
            }
        }
    }
}

/// Hot replicas: each thread's copies of the few tokens it serves most, so that a token that
/// makes most of the traffic (a service account, a CI system) costs no write to memory that other
/// cores write.
///
/// A hit in the shared map writes two cache lines every core serving the token also writes: the
/// `DashMap` shard's reader count and the entry's reference count. With one hot token on many
/// cores those lines move between the cores on every request. A thread that hits the same entry
/// [`PROMOTE_AFTER`] times in a row on one of its [`WAYS`] ways makes a replica of it: a copy with
/// a reference count of its own, which only this thread writes. Its later hits of that token go
/// to the replica without the map: one thread-local lookup, one *read* of the cache entry's
/// `refresh_at_ms` (a line other cores only read, so it stays in every core's cache), one
/// increment of the replica's count.
///
/// Revocation: every path that drops an entry from the map ([`Cache::invalidate`],
/// [`Cache::clear`], eviction, replacement by a refresh) [retires](Entry::retire) it before it
/// returns, and a replica serves only while its origin's `refresh_at_ms` is in the future, which a
/// retired entry's never is. So a replica stops serving exactly when its entry leaves the map,
/// and it also goes back to the map when the entry is due for a refresh (the map path triggers
/// it). The usage mark is the origin's: one mark per token per granularity, whichever thread
/// serves it.
///
/// Cost: a thread-local lookup on every hit; a replica (the entry's allocations, copied) per
/// thread per hot token, once per entry (each refresh loads a new entry, whose replicas are made
/// again after [`PROMOTE_AFTER`] hits). A replica keeps its origin's memory until the way is
/// reused, at most [`WAYS`] entries per thread.
mod hot {
    use std::cell::RefCell;
    use std::sync::Arc;
    use std::sync::atomic::Ordering;

    use super::Slot;
    use crate::principal::{Entry, Principal, RETIRED};

    /// The replicas a thread keeps, one per way, the way chosen by the slot.
    pub(super) const WAYS: usize = 8;
    /// How many map hits in a row of one token on one way make a replica of it.
    pub(super) const PROMOTE_AFTER: u32 = 16;

    struct Way {
        /// The replica, and the cache it belongs to.
        hot: Option<(u64, Principal)>,
        /// The token last hit in the map on this way (cache, slot), and how many times in a row.
        candidate: (u64, Slot),
        count: u32,
    }

    impl Way {
        const EMPTY: Way = Way {
            hot: None,
            candidate: (0, Slot([0; 2])),
            count: 0,
        };
    }

    thread_local! {
        static WAYS_OF_THREAD: RefCell<[Way; WAYS]> = const { RefCell::new([const { Way::EMPTY }; WAYS]) };
    }

    #[inline]
    fn way(slot: Slot) -> usize {
        // The map hashes with the low word: the high one picks the way.
        (slot.0[1] % WAYS as u64) as usize
    }

    /// What the shared map answered.
    pub(super) enum Hit {
        /// An entry not due for a refresh: it counts towards a replica.
        Fresh(Principal),
        /// An entry served while it is refreshed (or due for it): not copied.
        Stale(Principal),
    }

    /// The probe of cache `cache` for `slot` at `now`: this thread's replica of the token, if it
    /// has one and the cache entry it copies is still in the map and not due for a refresh; else
    /// `map`'s answer, whose fresh hits count towards a replica (one made after
    /// [`PROMOTE_AFTER`] hits in a row on the way). One thread-local access either way.
    #[inline]
    pub(super) fn probe(
        cache: u64,
        slot: Slot,
        now: i64,
        map: impl FnOnce() -> Option<Hit>,
    ) -> Option<Principal> {
        let mut map = Some(map);
        let local = WAYS_OF_THREAD.try_with(|ways| {
            let Ok(mut ways) = ways.try_borrow_mut() else {
                return None;
            };
            let way = &mut ways[way(slot)];
            if let Some((id, replica)) = &way.hot
                && *id == cache
                && replica.0.slot == slot
            {
                // SeqCst, like the store in `Entry::retire` (a plain load on x86 either way).
                let refresh_at = Entry::origin(&replica.0)
                    .refresh_at_ms
                    .load(Ordering::SeqCst);
                if now < refresh_at {
                    return Some(Some(replica.clone()));
                }
                if refresh_at == RETIRED {
                    // Its entry left the map: nothing of the token stays in this thread.
                    way.hot = None;
                }
            }
            let hit = map.take()?()?;
            let principal = match hit {
                Hit::Fresh(principal) => principal,
                Hit::Stale(principal) => return Some(Some(principal)),
            };
            if way.candidate != (cache, slot) {
                way.candidate = (cache, slot);
                way.count = 1;
            } else {
                way.count += 1;
                if way.count >= PROMOTE_AFTER {
                    way.count = 0;
                    promote(way, cache, &principal);
                }
            }
            Some(Some(principal))
        });
        match (local, map) {
            (Ok(Some(answer)), _) => answer,
            // No thread-local state (the thread is ending, or a nested probe): the map alone.
            (_, Some(map)) => match map()? {
                Hit::Fresh(principal) | Hit::Stale(principal) => Some(principal),
            },
            // The map was asked and missed.
            (_, None) => None,
        }
    }

    /// This thread's replica of `slot` in cache `cache`, if it would serve at `now` (tests).
    #[cfg(test)]
    pub(super) fn get(cache: u64, slot: Slot, now: i64) -> Option<Principal> {
        probe(cache, slot, now, || None)
    }

    #[cold]
    #[inline(never)]
    fn promote(way: &mut Way, cache: u64, principal: &Principal) {
        let replica = Principal(Arc::new(Entry::replicate(&principal.0)));
        // The old replica (and its origin) are dropped here, on the thread that made them.
        way.hot = Some((cache, replica));
    }
}

/// A semaphore size from a setting: at least one, at most what a semaphore holds.
fn permits(n: usize) -> usize {
    n.clamp(1, Semaphore::MAX_PERMITS)
}

/// The key a client's lookup budget is kept under: its network as the failure limit counts it by
/// default (an IPv4 address, an IPv6 /64: what one subscriber usually gets).
fn client_key(ip: IpAddr) -> IpAddr {
    let (v4, v6) = crate::auth::limit::FailureLimit::DEFAULT_PREFIXES;
    crate::client_ip::network_key(ip, v4, v6)
}

fn duration_ms(d: Duration) -> i64 {
    i64::try_from(d.as_millis()).unwrap_or(i64::MAX / 4)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::record::TokenRecord;

    /// A store whose lookups never answer.
    struct Hanging;

    #[async_trait::async_trait]
    impl TokenLookup for Hanging {
        async fn find_by_hash(&self, _: &TokenHash) -> Result<Option<TokenRecord>, StoreError> {
            std::future::pending().await
        }
    }

    /// A store that knows no token.
    struct Empty;

    #[async_trait::async_trait]
    impl TokenLookup for Empty {
        async fn find_by_hash(&self, _: &TokenHash) -> Result<Option<TokenRecord>, StoreError> {
            Ok(None)
        }
    }

    fn cache(lookup: impl TokenLookup) -> Arc<Cache> {
        Cache::new(
            Arc::new(lookup),
            TokenHasher::default(),
            CacheConfig::default(),
            None,
        )
    }

    fn addr(ip: Option<IpAddr>) -> ClientAddr {
        ClientAddr::from_ip(ip)
    }

    fn hash(n: u8) -> TokenHash {
        TokenHasher::default().hash(&format!("token-{n}"))
    }

    /// A positive entry for a record found under `hash`, cached in `slot`, as a load makes it.
    fn found(slot: Slot, hash: TokenHash, id: &str) -> Outcome {
        let (mut record, _) = crate::record::NewToken::new("alice", id).build(
            &crate::TokenFormat::new(),
            &TokenHasher::sha256(),
            chrono::Utc::now(),
        );
        record.id = id.to_owned();
        record.hash = hash;
        Outcome::Found(Principal(Arc::new(Entry::new(
            record,
            slot,
            hash,
            now_ms(),
            60_000,
        ))))
    }

    /// Caches `outcome` as a load that started now would.
    fn cache_now(cache: &Cache, slot: Slot, outcome: &Outcome) {
        let key = match outcome {
            Outcome::Found(p) => p.0.hash,
            _ => hash(0),
        };
        cache.remember(slot, key, &[], outcome, cache.epoch(&key, &[]));
    }

    fn cached(cache: &Arc<Cache>, slot: Slot) -> bool {
        cache.probe(slot, now_ms()).is_some()
    }

    #[test]
    fn slots_are_keyed_per_cache_and_differ_per_token() {
        let (a, b) = (cache(Empty), cache(Empty));
        let token = "pat_0123456789abcdefghijABCDEFGHIJ0123";
        assert!(a.slot(token.as_bytes()) == a.slot(token.as_bytes()));
        // Another cache draws another key: the same token lands elsewhere.
        assert!(a.slot(token.as_bytes()) != b.slot(token.as_bytes()));
        // Near misses (one character, a suffix, the letter case) land elsewhere.
        for other in [
            "pat_0123456789abcdefghijABCDEFGHIJ0124",
            "pat_0123456789abcdefghijABCDEFGHIJ0123 ",
            "PAT_0123456789abcdefghijABCDEFGHIJ0123",
            "pat_0123456789abcdefghijABCDEFGHIJ012",
        ] {
            assert!(
                a.slot(token.as_bytes()) != a.slot(other.as_bytes()),
                "{other}"
            );
        }
        assert_eq!(format!("{:?}", a.slot_key), "SlotKey(..)");
    }

    #[test]
    fn an_invalidation_finds_the_entry_through_the_index() {
        let cache = cache(Empty);
        let (slot, h) = (Slot::test(7), hash(7));
        cache_now(&cache, slot, &found(slot, h, "t7"));
        assert!(cached(&cache, slot));
        // An event for another hash leaves it.
        cache.invalidate("t8", &hash(8));
        assert!(cached(&cache, slot));
        cache.invalidate("t7", &h);
        assert!(!cached(&cache, slot));
        assert_eq!(cache.index.len(), 0, "the index entry goes with it");
    }

    #[test]
    fn a_load_that_started_before_an_invalidation_caches_nothing_and_indexes_nothing() {
        let cache = cache(Empty);
        let (slot, h) = (Slot::test(3), hash(3));
        let epoch = cache.epoch(&h, &[]);
        cache.invalidate("t3", &h);
        cache.remember(slot, h, &[], &found(slot, h, "t3"), epoch);
        assert!(!cached(&cache, slot));
        assert_eq!(cache.index.len(), 0);
    }

    /// Invalidations are striped by hash: one of a hash in another stripe leaves a load free to
    /// cache (positive and negative), one of a hash in the same stripe, of one of the load's
    /// older pepper hashes, or a clear does not.
    #[test]
    fn an_invalidation_holds_back_only_the_loads_of_its_stripe() {
        let cache = cache(Empty);
        let (slot, h) = (Slot::test(1), hash(1));
        let other = (2..100)
            .map(hash)
            .find(|o| epoch_stripe(o) != epoch_stripe(&h))
            .unwrap();
        let mut neighbour = *h.as_bytes();
        neighbour[31] ^= 1;
        let neighbour = TokenHash::from_bytes(neighbour);
        assert_eq!(epoch_stripe(&neighbour), epoch_stripe(&h));
        let previous = (100..200)
            .map(hash)
            .find(|p| epoch_stripe(p) != epoch_stripe(&h))
            .unwrap();
        let unknown = hash(201);

        let epoch = cache.epoch(&h, &[]);
        cache.invalidate("other", &other);
        cache.remember(slot, h, &[], &found(slot, h, "t1"), epoch);
        assert!(
            cached(&cache, slot),
            "another stripe's event held the load back"
        );
        let epoch = cache.epoch(&unknown, &[]);
        cache.invalidate("other", &other);
        let unknown_outcome = Outcome::Rejected(Negative::Unknown);
        cache.remember(Slot::test(2), unknown, &[], &unknown_outcome, epoch);
        assert!(cache.probe_negative(&unknown).is_some());

        // Held back: the same stripe, an older pepper's hash, a clear.
        let cases: [(&str, &dyn Fn()); 3] = [
            ("same stripe", &|| cache.invalidate("n", &neighbour)),
            ("previous", &|| cache.invalidate("p", &previous)),
            ("clear", &|| cache.clear()),
        ];
        for (what, invalidate) in cases {
            cache.invalidate("t1", &h);
            let epoch = cache.epoch(&h, &[previous]);
            invalidate();
            cache.remember(slot, h, &[previous], &found(slot, h, "t1"), epoch);
            assert!(!cached(&cache, slot), "{what}");
            // The same for a refusal under `h`.
            let epoch = cache.epoch(&h, &[previous]);
            invalidate();
            cache.remember(slot, h, &[previous], &unknown_outcome, epoch);
            assert!(cache.probe_negative(&h).is_none(), "{what}");
        }
    }

    #[test]
    fn hashes_sharing_their_first_eight_bytes_are_still_invalidated() {
        let cache = cache(Empty);
        let mut bytes = *hash(1).as_bytes();
        let first = TokenHash::from_bytes(bytes);
        bytes[31] ^= 1;
        let second = TokenHash::from_bytes(bytes);
        assert_eq!(first.prefix_u64(), second.prefix_u64());
        let (s1, s2) = (Slot::test(11), Slot::test(12));
        cache_now(&cache, s1, &found(s1, first, "one"));
        cache_now(&cache, s2, &found(s2, second, "two"));
        assert!(cached(&cache, s1) && cached(&cache, s2));
        // The second is not in the index: its invalidation scans the map.
        cache.invalidate("two", &second);
        assert!(cached(&cache, s1));
        assert!(!cached(&cache, s2));
        cache.invalidate("one", &first);
        assert!(!cached(&cache, s1));
    }

    /// A request that read an entry, then noticed it expired after an invalidation (the token was
    /// given a later expiry meanwhile), leaves no refusal behind: the next request asks the store.
    #[test]
    fn an_expiry_noticed_after_an_invalidation_remembers_no_refusal() {
        let cache = cache(Empty);
        let (slot, h) = (Slot::test(31), hash(31));
        cache_now(&cache, slot, &found(slot, h, "t31"));
        let Some(p) = cache.probe(slot, now_ms()) else {
            panic!("cached")
        };
        cache.invalidate("t31", &h);
        cache.expire(&p);
        assert!(
            cache.probe_negative(&h).is_none(),
            "a stale refusal was kept"
        );
        assert!(!cached(&cache, slot));
        // Without an invalidation, too: a refusal is only remembered by a load.
        cache_now(&cache, slot, &found(slot, h, "t31"));
        let p = cache.probe(slot, now_ms()).expect("cached");
        cache.expire(&p);
        assert!(cache.probe_negative(&h).is_none());
        assert!(!cached(&cache, slot));
    }

    #[test]
    fn evicted_and_cleared_entries_leave_no_index_behind() {
        let cache = cache(Empty);
        for n in 0..10u8 {
            let slot = Slot::test(u128::from(n));
            cache_now(&cache, slot, &found(slot, hash(n), &format!("t{n}")));
        }
        assert_eq!(cache.index.len(), 10);
        let Some(p) = cache.probe(Slot::test(4), now_ms()) else {
            panic!("cached")
        };
        cache.expire(&p);
        assert_eq!((cache.len(), cache.index.len()), (9, 9));
        cache.clear();
        assert_eq!((cache.len(), cache.index.len()), (0, 0));
    }

    /// Hits `slot` until this thread serves it from a replica; the replica.
    fn promoted(cache: &Arc<Cache>, slot: Slot) -> Principal {
        for _ in 0..hot::PROMOTE_AFTER {
            assert!(cached(cache, slot));
        }
        let replica = hot::get(cache.id, slot, now_ms()).expect("a replica after enough hits");
        let origin = cache.positive.get(&slot).expect("cached").0.clone();
        assert!(!Arc::ptr_eq(&replica.0, &origin), "a copy of its own");
        assert!(Arc::ptr_eq(Entry::origin(&replica.0), &origin));
        replica
    }

    #[test]
    fn a_replica_serves_until_its_entry_leaves_the_map_by_any_path() {
        let cache = cache(Empty);
        let now = now_ms;
        let (slot, h) = (Slot::test(21), hash(21));
        let fill = || cache_now(&cache, slot, &found(slot, h, "t21"));
        // An invalidation through the index.
        fill();
        promoted(&cache, slot);
        cache.invalidate("t21", &h);
        assert!(hot::get(cache.id, slot, now()).is_none());
        assert!(!cached(&cache, slot));
        // Clearing (the change feed came back).
        fill();
        promoted(&cache, slot);
        cache.clear();
        assert!(hot::get(cache.id, slot, now()).is_none());
        assert!(!cached(&cache, slot));
        // Expiry noticed on a replica drops the map's entry.
        fill();
        let replica = promoted(&cache, slot);
        cache.expire(&replica);
        assert!(hot::get(cache.id, slot, now()).is_none());
        assert!(!cached(&cache, slot));
        // A refresh replacing the entry: the next hit gets the new one.
        fill();
        promoted(&cache, slot);
        cache_now(&cache, slot, &found(slot, h, "t21-new"));
        assert!(hot::get(cache.id, slot, now()).is_none());
        assert_eq!(cache.probe(slot, now()).unwrap().token_id(), "t21-new");
        // Due for a refresh: back to the map (which starts the refresh).
        promoted(&cache, slot);
        let due = cache
            .positive
            .get(&slot)
            .unwrap()
            .0
            .refresh_at_ms
            .load(Ordering::SeqCst);
        assert!(hot::get(cache.id, slot, due).is_none());
        assert!(hot::get(cache.id, slot, due - 1).is_some());
        // Another cache's replica in this thread's way is not this cache's.
        let other = self::cache(Empty);
        assert!(hot::get(other.id, slot, now()).is_none());
    }

    #[test]
    fn an_invalidation_by_scan_retires_replicas_too() {
        let cache = cache(Empty);
        let mut bytes = *hash(2).as_bytes();
        let first = TokenHash::from_bytes(bytes);
        bytes[31] ^= 1;
        let second = TokenHash::from_bytes(bytes);
        let (s1, s2) = (Slot::test(31), Slot::test(32));
        cache_now(&cache, s1, &found(s1, first, "one"));
        cache_now(&cache, s2, &found(s2, second, "two"));
        promoted(&cache, s2);
        cache.invalidate("two", &second);
        assert!(hot::get(cache.id, s2, now_ms()).is_none());
        assert!(!cached(&cache, s2));
    }

    #[test]
    fn a_replica_is_served_for_its_own_slot_only_and_let_go_when_retired() {
        let cache = cache(Empty);
        // Two slots on the same way (high words 3 and 11), differing in both words.
        let (a, b) = (Slot([5, 3]), Slot([6, 11]));
        cache_now(&cache, a, &found(a, hash(51), "a"));
        promoted(&cache, a);
        assert!(
            hot::get(cache.id, b, now_ms()).is_none(),
            "not cached at all"
        );
        cache_now(&cache, b, &found(b, hash(52), "b"));
        assert_eq!(cache.probe(b, now_ms()).unwrap().token_id(), "b");
        // `b`'s hits took the way over as its candidate; `a`'s replica is still `a`'s.
        assert_eq!(cache.probe(a, now_ms()).unwrap().token_id(), "a");
        // Once `a` is retired, the first probe that finds its replica lets it go: only this
        // test's reference to the entry is left.
        let origin = cache.positive.get(&a).unwrap().0.clone();
        cache.invalidate("a", &hash(51));
        assert!(cache.probe(a, now_ms()).is_none());
        assert_eq!(Arc::strong_count(&origin), 1);
    }

    #[test]
    fn tokens_taking_turns_on_a_way_make_no_replica() {
        let cache = cache(Empty);
        // Slot::test puts every slot on way 0.
        let slots: Vec<Slot> = (40..44).map(Slot::test).collect();
        for (n, slot) in slots.iter().enumerate() {
            let n = u8::try_from(40 + n).unwrap();
            cache_now(&cache, *slot, &found(*slot, hash(n), &format!("t{n}")));
        }
        for _ in 0..100 {
            for slot in &slots {
                assert!(cached(&cache, *slot));
            }
        }
        for slot in &slots {
            assert!(hot::get(cache.id, *slot, now_ms()).is_none());
        }
    }

    #[tokio::test]
    async fn abandoned_lookups_leave_no_flight_no_client_budget_and_no_task() {
        let cache = cache(Hanging);
        let metrics = tokio::runtime::Handle::current().metrics();
        let client = Some("192.0.2.1".parse().unwrap());
        for n in 0..20 {
            let load = Arc::clone(&cache).load(
                Slot::test(u128::from(n)),
                hash(n),
                Vec::new(),
                addr(client),
            );
            let mut load = Box::pin(load);
            let poll = load
                .as_mut()
                .poll(&mut std::task::Context::from_waker(std::task::Waker::noop()));
            assert!(poll.is_pending());
            // Let the lookup start: it takes its client's budget and a slot.
            tokio::task::yield_now().await;
            assert_eq!(cache.lookups_in_flight(), 1);
            assert_eq!(cache.clients_in_flight(), 1);
            drop(load);
            assert_eq!(cache.lookups_in_flight(), 0);
        }
        // The aborted tasks release their budgets as the runtime drops them (bounded wait).
        for _ in 0..100 {
            if metrics.num_alive_tasks() == 0 {
                break;
            }
            tokio::task::yield_now().await;
        }
        assert_eq!(metrics.num_alive_tasks(), 0);
        assert_eq!(cache.clients_in_flight(), 0);
        assert_eq!(
            cache.lookups.available_permits(),
            CacheConfig::default().max_concurrent_lookups
        );
    }

    #[tokio::test]
    async fn an_unknown_token_makes_its_client_a_suspect_and_the_budget_goes_away() {
        let cache = cache(Empty);
        let client: IpAddr = "2001:db8:1:2:3:4:5:6".parse().unwrap();
        let outcome = Arc::clone(&cache)
            .load(Slot::test(1), hash(1), Vec::new(), addr(Some(client)))
            .await;
        assert!(matches!(outcome, Outcome::Rejected(Negative::Unknown)));
        assert!(cache.suspects.contains_key(&client_key(client)));
        assert_eq!(cache.clients_in_flight(), 0);
        assert_eq!(cache.lookups_in_flight(), 0);
    }

    /// A store whose first lookup panics.
    #[derive(Default)]
    struct PanicsOnce(std::sync::atomic::AtomicBool);

    #[async_trait::async_trait]
    impl TokenLookup for PanicsOnce {
        async fn find_by_hash(&self, _: &TokenHash) -> Result<Option<TokenRecord>, StoreError> {
            assert!(self.0.swap(true, Ordering::SeqCst), "a store bug");
            Ok(None)
        }
    }

    #[tokio::test]
    async fn a_lookup_whose_store_panics_answers_unavailable_and_leaves_nothing_behind() {
        let cache = cache(PanicsOnce::default());
        let first = Arc::clone(&cache)
            .load(Slot::test(1), hash(1), Vec::new(), addr(None))
            .await;
        assert!(matches!(first, Outcome::Unavailable));
        assert_eq!(cache.lookups_in_flight(), 0);
        let second = Arc::clone(&cache)
            .load(Slot::test(1), hash(1), Vec::new(), addr(None))
            .await;
        assert!(matches!(second, Outcome::Rejected(Negative::Unknown)));
    }

    #[test]
    fn clients_are_counted_by_ipv4_address_and_ipv6_slash_64() {
        let key = |s: &str| client_key(s.parse().unwrap());
        assert_eq!(key("192.0.2.1"), key("192.0.2.1"));
        assert_ne!(key("192.0.2.1"), key("192.0.2.2"));
        assert_eq!(key("::ffff:192.0.2.1"), key("192.0.2.1"));
        assert_eq!(
            key("2001:db8:1:2::1"),
            key("2001:db8:1:2:ffff:ffff:ffff:ffff")
        );
        assert_eq!(key("2001:db8:1:2::1"), key("2001:db8:1:2::"));
        assert_ne!(key("2001:db8:1:2::1"), key("2001:db8:1:3::1"));
    }
}
