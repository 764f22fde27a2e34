//! The verification cache in front of the store (DESIGN.md §2 step 4).
//!
//! - Positive entries: [`Principal`]s in a `DashMap` keyed by the token hash itself, hashed with the
//!   digest's own first eight bytes (the key is already uniformly random, and only tokens that
//!   exist in the store get in, so no one can flood it).
//! - Negative entries (unknown, revoked or expired tokens) in a bounded `moka` cache with a short
//!   TTL: an attacker can create those, so they get admission control and a hard bound.
//! - Concurrent misses for one hash make one store query (single-flight); a bounded number of
//!   lookups run at once, the excess waits and then gets 503.
//! - A positive entry is fresh for `ttl`; after it, the next request refreshes it in the background
//!   while the entry keeps serving, for at most `stale_if_error` more (one refresh at a time, retried
//!   each second while the store fails). Older entries are reloaded before use.
//! - Store events drop entries at once: in this process through the store's [`ChangeHub`], in
//!   others through the store's change feed.
//!
//! [`ChangeHub`]: crate::store::ChangeHub

use std::collections::{HashMap, HashSet};
use std::hash::{BuildHasherDefault, Hasher};
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use dashmap::DashMap;
use tokio::sync::{OnceCell, Semaphore};

use crate::principal::{Entry, Principal};
use crate::scope::ScopeSet;
use crate::store::{ChangeListener, StoreEvent, TokenLookup};
use crate::token::{TokenHash, TokenHasher};

/// Unix time in milliseconds from the coarse clock (`CLOCK_REALTIME_COARSE` on Linux: a few
/// nanoseconds, a few milliseconds of resolution).
#[inline]
pub(crate) fn now_ms() -> i64 {
    coarsetime::Clock::now_since_epoch().as_millis() as i64
}

/// How many distinct scope sets [`Cache::shared_scopes`] remembers.
const MAX_SHARED_SCOPE_SETS: usize = 1024;

/// How long a retried background refresh waits after a failed one.
const REFRESH_RETRY_MS: i64 = 1_000;

/// The verification cache's settings.
#[derive(Clone, Debug)]
pub struct CacheConfig {
    /// How long a positive entry is used without asking the store again. Default 60 s.
    pub ttl: Duration,
    /// How long past `ttl` an entry keeps serving while its background refresh fails (the store is
    /// down). Expiry and known revocations are still enforced. Default 5 min; zero disables the
    /// background refresh: entries past `ttl` are reloaded before use.
    pub stale_if_error: Duration,
    /// How long an unknown, revoked or expired token is remembered. Default 10 s.
    pub negative_ttl: Duration,
    /// How many negative entries are kept at most. Default 100 000.
    pub negative_capacity: u64,
    /// How many store lookups may run at once. Default 64.
    pub max_concurrent_lookups: usize,
    /// How long a lookup waits for one of those slots before the request gets 503. Default 1 s.
    pub lookup_wait: Duration,
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
        }
    }
}

/// Why a token is known not to work.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Negative {
    Unknown,
    Revoked,
    Expired,
}

/// The result of a cache probe or a load.
#[derive(Clone)]
pub(crate) enum Outcome {
    Found(Principal),
    Rejected(Negative),
    Unavailable,
}

/// The digest is uniformly random: its first eight bytes are the hash.
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

type Flights = HashMap<TokenHash, Arc<OnceCell<Outcome>>>;

pub(crate) struct Cache {
    positive: DashMap<TokenHash, Principal, BuildHasherDefault<DigestHasher>>,
    negative: moka::sync::Cache<TokenHash, Negative>,
    flights: Mutex<Flights>,
    scope_sets: Mutex<HashSet<ScopeSet>>,
    /// Bumped by every invalidation: a load that started before one does not cache its result.
    epoch: AtomicU64,
    lookups: Semaphore,
    lookup: Arc<dyn TokenLookup>,
    hasher: TokenHasher,
    ttl_ms: i64,
    stale_ms: i64,
    config: CacheConfig,
    has_feed: std::sync::atomic::AtomicBool,
    /// Unix ms since which the change feed is disconnected; 0 while connected.
    disconnected_since: AtomicI64,
    store_lookups: AtomicU64,
    /// A test hook run just before a load or refresh caches what the store answered.
    insert_hook: std::sync::OnceLock<InsertHook>,
}

type InsertHook = Box<dyn Fn() + Send + Sync>;

impl Cache {
    pub(crate) fn new(
        lookup: Arc<dyn TokenLookup>,
        hasher: TokenHasher,
        config: CacheConfig,
    ) -> Arc<Self> {
        let negative = moka::sync::Cache::builder()
            .max_capacity(config.negative_capacity)
            .time_to_live(config.negative_ttl.max(Duration::from_millis(1)))
            .build();
        let cache = Arc::new(Self {
            positive: DashMap::default(),
            negative,
            flights: Mutex::default(),
            scope_sets: Mutex::default(),
            epoch: AtomicU64::new(0),
            lookups: Semaphore::new(config.max_concurrent_lookups.max(1)),
            lookup,
            hasher,
            ttl_ms: duration_ms(config.ttl),
            stale_ms: duration_ms(config.stale_if_error),
            config,
            has_feed: false.into(),
            disconnected_since: AtomicI64::new(0),
            store_lookups: AtomicU64::new(0),
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

    pub(crate) fn config(&self) -> &CacheConfig {
        &self.config
    }

    pub(crate) fn len(&self) -> usize {
        self.positive.len()
    }

    pub(crate) fn store_lookups(&self) -> u64 {
        self.store_lookups.load(Ordering::Relaxed)
    }

    pub(crate) fn lookups_in_flight(&self) -> usize {
        self.flights.lock().unwrap_or_else(|e| e.into_inner()).len()
    }

    pub(crate) fn set_insert_hook(&self, hook: InsertHook) -> bool {
        self.insert_hook.set(hook).is_ok()
    }

    fn run_insert_hook(&self) {
        if let Some(hook) = self.insert_hook.get() {
            hook();
        }
    }

    /// The hot path: a probe of the positive map, then of the negative cache. `None` is a miss.
    /// Triggers a background refresh of an entry past its TTL.
    #[inline]
    pub(crate) fn probe(self: &Arc<Self>, hash: &TokenHash, now: i64) -> Option<Outcome> {
        if let Some(p) = self.positive.get(hash) {
            let refresh_at = p.value().0.refresh_at_ms.load(Ordering::Relaxed);
            let principal = p.value().clone();
            // The shard's read lock ends here: the stale path may need its write lock.
            drop(p);
            if now < refresh_at {
                return Some(Outcome::Found(principal));
            }
            return self.probe_stale(principal, now, refresh_at);
        }
        self.negative.get(hash).map(Outcome::Rejected)
    }

    #[cold]
    fn probe_stale(
        self: &Arc<Self>,
        principal: Principal,
        now: i64,
        refresh_at: i64,
    ) -> Option<Outcome> {
        let entry = &principal.0;
        let hard_limit = entry.loaded_ms.saturating_add(self.ttl_ms + self.stale_ms);
        if self.stale_ms == 0 || now >= hard_limit {
            // Too old to serve: reload before use.
            self.positive
                .remove_if(&entry.key, |_, v| Arc::ptr_eq(&v.0, entry));
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
        Some(Outcome::Found(principal))
    }

    async fn refresh(self: Arc<Self>, stale: Principal) {
        let key = stale.0.key;
        let epoch = self.epoch.load(Ordering::Acquire);
        // Refreshes share the lookup slots, but never wait: the store is busy enough already.
        let Ok(_permit) = self.lookups.try_acquire() else {
            return;
        };
        let token_hashes = [stale.0.stored_hash()];
        match self.fetch(&key, &token_hashes).await {
            Ok(outcome) => {
                if self.epoch.load(Ordering::Acquire) != epoch {
                    return;
                }
                self.run_insert_hook();
                match outcome {
                    Outcome::Found(fresh) => {
                        fresh.0.last_mark_ms.fetch_max(
                            stale.0.last_mark_ms.load(Ordering::Relaxed),
                            Ordering::Relaxed,
                        );
                        self.positive.insert(key, fresh);
                    }
                    Outcome::Rejected(n) => {
                        self.positive.remove(&key);
                        self.negative.insert(key, n);
                    }
                    Outcome::Unavailable => {}
                }
            }
            Err(()) => {
                tracing::warn!(token_id = %stale.token_id(), "token refresh failed; serving the cached entry");
            }
        }
    }

    /// The miss path: one store query per hash however many requests wait for it.
    pub(crate) async fn load(self: Arc<Self>, key: TokenHash, previous: Vec<TokenHash>) -> Outcome {
        let flight = {
            let mut flights = self.flights.lock().unwrap_or_else(|e| e.into_inner());
            Arc::clone(flights.entry(key).or_default())
        };
        let outcome = flight
            .get_or_init(|| async {
                // A flight that finished just before this one started may have filled the cache.
                if let Some(hit) = self.probe(&key, now_ms()) {
                    return hit;
                }
                self.load_uncached(key, &previous).await
            })
            .await
            .clone();
        let mut flights = self.flights.lock().unwrap_or_else(|e| e.into_inner());
        if flights.get(&key).is_some_and(|f| Arc::ptr_eq(f, &flight)) {
            flights.remove(&key);
        }
        outcome
    }

    async fn load_uncached(&self, key: TokenHash, previous: &[TokenHash]) -> Outcome {
        let epoch = self.epoch.load(Ordering::Acquire);
        let permit = tokio::time::timeout(self.config.lookup_wait, self.lookups.acquire()).await;
        let Ok(Ok(_permit)) = permit else {
            tracing::warn!("too many concurrent token lookups; answering 503");
            return Outcome::Unavailable;
        };
        let outcome = match self.fetch(&key, previous).await {
            Ok(o) => o,
            Err(()) => return Outcome::Unavailable,
        };
        if self.epoch.load(Ordering::Acquire) == epoch {
            self.run_insert_hook();
            match &outcome {
                Outcome::Found(p) => {
                    self.positive.insert(key, p.clone());
                }
                Outcome::Rejected(n) => self.negative.insert(key, *n),
                Outcome::Unavailable => {}
            }
        }
        outcome
    }

    /// Queries the store for `key`, then for each of `previous` (older peppers). `Err` when the
    /// store failed.
    async fn fetch(&self, key: &TokenHash, previous: &[TokenHash]) -> Result<Outcome, ()> {
        for hash in std::iter::once(key).chain(previous.iter().filter(|h| *h != key)) {
            self.store_lookups.fetch_add(1, Ordering::Relaxed);
            let found = self.lookup.find_by_hash(hash).await.map_err(|e| {
                tracing::warn!(error = %e, "token lookup failed");
            })?;
            let Some(mut record) = found else { continue };
            if record.is_revoked() {
                return Ok(Outcome::Rejected(Negative::Revoked));
            }
            let via_previous = record.hash != *hash;
            record.scopes = self.shared_scopes(std::mem::take(&mut record.scopes));
            let now = now_ms();
            let entry = Entry::new(record, *key, via_previous, now, self.ttl_ms);
            // The entry's expiry is the token's, or the end of the rotation grace period.
            if entry.expires_ms <= now {
                return Ok(Outcome::Rejected(Negative::Expired));
            }
            return Ok(Outcome::Found(Principal(Arc::new(entry))));
        }
        Ok(Outcome::Rejected(Negative::Unknown))
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

    /// Drops a positive entry that expired while cached and remembers why.
    pub(crate) fn expire(&self, principal: &Principal) {
        let key = principal.0.key;
        self.positive
            .remove_if(&key, |_, v| Arc::ptr_eq(&v.0, &principal.0));
        self.negative.insert(key, Negative::Expired);
    }

    /// Drops everything cached for this hash or id.
    pub(crate) fn invalidate(&self, id: &str, hash: &TokenHash) {
        self.epoch.fetch_add(1, Ordering::AcqRel);
        let removed = self.positive.remove(hash).is_some();
        self.negative.invalidate(hash);
        if !removed && self.hasher.has_previous() {
            // Cached under the current pepper's hash while stored under an older one.
            self.positive.retain(|_, p| p.token_id() != id);
        }
    }

    /// Drops every entry.
    pub(crate) fn clear(&self) {
        self.epoch.fetch_add(1, Ordering::AcqRel);
        self.positive.clear();
        self.negative.invalidate_all();
    }

    /// How old the oldest state this cache may act on can be, as far as it knows: zero while the
    /// store's change feed is connected; the time since it dropped (at most the TTL plus
    /// `stale_if_error`) while it is down; the TTL plus `stale_if_error` for a store without a feed.
    pub(crate) fn max_staleness(&self) -> Duration {
        let bound = self.config.ttl + self.config.stale_if_error;
        if !self.has_feed.load(Ordering::Relaxed) {
            return bound;
        }
        match self.disconnected_since.load(Ordering::Relaxed) {
            0 => Duration::ZERO,
            since => Duration::from_millis((now_ms() - since).max(0) as u64).min(bound),
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

fn duration_ms(d: Duration) -> i64 {
    i64::try_from(d.as_millis()).unwrap_or(i64::MAX / 4)
}
