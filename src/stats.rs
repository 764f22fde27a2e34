//! The layer's counters ([`PatAuthLayer::stats`](crate::PatAuthLayer::stats)): requests by
//! outcome, cache hits and misses, store lookups and their latency, cache sizes, usage tracking
//! and the change feed's state, as one snapshot for metrics.
//!
//! The request path counts with relaxed atomic adds into one of as many cache-line-sized shards
//! as the machine has cores (at least 16), picked per thread: two cores serving requests do not
//! write to the same cache line (as long as the threads that count are no more than the shards:
//! a Tokio runtime's workers), so counting adds no traffic between cores. A snapshot sums the
//! shards; it is exact for every request that finished before it started, and each counter is
//! monotonic.

use std::cell::Cell;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::Duration;

use crate::auth::AuthError;
use crate::usage::UsageStats;

/// The fewest and the most shards the counters are spread over: a power of two, the number of
/// cores rounded up, within these.
const MIN_SHARDS: usize = 16;
const MAX_SHARDS: usize = 1024;

/// What the request path counts.
#[derive(Clone, Copy, Debug)]
#[repr(usize)]
pub(crate) enum Counter {
    /// Admitted from the positive cache.
    OkHit,
    /// Admitted after a store lookup.
    OkMiss,
    /// Let through without credentials (an optional layer) or with a foreign credential.
    Anonymous,
    /// A positive cache entry whose token was then refused (expired, address, scope).
    HitRefused,
    /// Answered by the negative cache.
    NegativeHit,
    /// Sent to the store.
    Miss,
    Missing,
    Invalid,
    Revoked,
    Disabled,
    Expired,
    IpDenied,
    ScopeDenied,
    Limited,
    Unavailable,
}

const COUNTERS: usize = Counter::Unavailable as usize + 1;

/// One shard: a cache line pair of its own (adjacent-line prefetch pulls lines in pairs).
#[repr(align(128))]
#[derive(Default)]
struct Shard([AtomicU64; COUNTERS]);

/// The upper bounds of the store lookup latency buckets, in microseconds (the last bucket, to
/// infinity, is implicit).
pub const LOOKUP_LATENCY_BOUNDS_US: [u64; 10] = [
    100, 250, 500, 1_000, 2_500, 5_000, 10_000, 50_000, 250_000, 1_000_000,
];

/// The counters of one layer.
pub(crate) struct Stats {
    shards: Box<[Shard]>,
    /// Store lookup latency: one count per bucket (the last is +Inf), and the sum in µs.
    latency: [AtomicU64; LOOKUP_LATENCY_BOUNDS_US.len() + 1],
    latency_sum_us: AtomicU64,
    lookup_failures: AtomicU64,
}

impl Default for Stats {
    fn default() -> Self {
        Self {
            shards: (0..shard_count()).map(|_| Shard::default()).collect(),
            latency: Default::default(),
            latency_sum_us: AtomicU64::new(0),
            lookup_failures: AtomicU64::new(0),
        }
    }
}

impl std::fmt::Debug for Stats {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Stats").finish_non_exhaustive()
    }
}

/// How many shards a layer's counters have: the cores, rounded up to a power of two, at least
/// [`MIN_SHARDS`].
fn shard_count() -> usize {
    // Asked once per process: on Linux it reads the cgroup's CPU quota from files.
    static COUNT: std::sync::OnceLock<usize> = std::sync::OnceLock::new();
    *COUNT.get_or_init(|| {
        std::thread::available_parallelism()
            .map_or(MIN_SHARDS, std::num::NonZero::get)
            .next_power_of_two()
            .clamp(MIN_SHARDS, MAX_SHARDS)
    })
}

/// This thread's ordinal among the threads that counted, assigned on first use: its shard is
/// the ordinal modulo the shard count.
fn shard_index() -> usize {
    static NEXT: AtomicUsize = AtomicUsize::new(0);
    thread_local! {
        static SHARD: Cell<usize> = const { Cell::new(usize::MAX) };
    }
    SHARD.with(|s| {
        let i = s.get();
        if i != usize::MAX {
            return i;
        }
        let i = NEXT.fetch_add(1, Ordering::Relaxed);
        s.set(i);
        i
    })
}

impl Stats {
    /// Counts one `counter`.
    #[inline]
    pub(crate) fn add(&self, counter: Counter) {
        // The shard count is a power of two.
        let shard = shard_index() & (self.shards.len() - 1);
        self.shards[shard].0[counter as usize].fetch_add(1, Ordering::Relaxed);
    }

    /// Counts a refusal by its reason.
    #[inline]
    pub(crate) fn refused(&self, err: &AuthError) {
        self.add(match err {
            AuthError::MissingCredentials | AuthError::CredentialNotAccepted(_) => Counter::Missing,
            AuthError::InvalidRequest(_) | AuthError::InvalidToken => Counter::Invalid,
            AuthError::Revoked => Counter::Revoked,
            AuthError::Disabled => Counter::Disabled,
            AuthError::Expired => Counter::Expired,
            AuthError::IpNotAllowed => Counter::IpDenied,
            AuthError::InsufficientScope(_) => Counter::ScopeDenied,
            AuthError::TooManyAttempts { .. } => Counter::Limited,
            AuthError::Unavailable { .. } => Counter::Unavailable,
        });
    }

    /// Records one store lookup's latency, and whether it failed.
    pub(crate) fn lookup(&self, took: Duration, failed: bool) {
        let us = u64::try_from(took.as_micros()).unwrap_or(u64::MAX);
        let bucket = LOOKUP_LATENCY_BOUNDS_US
            .iter()
            .position(|&b| us <= b)
            .unwrap_or(LOOKUP_LATENCY_BOUNDS_US.len());
        self.latency[bucket].fetch_add(1, Ordering::Relaxed);
        self.latency_sum_us.fetch_add(us, Ordering::Relaxed);
        if failed {
            self.lookup_failures.fetch_add(1, Ordering::Relaxed);
        }
    }

    fn sum(&self, counter: Counter) -> u64 {
        self.shards
            .iter()
            .map(|s| s.0[counter as usize].load(Ordering::Relaxed))
            .fold(0, u64::wrapping_add)
    }

    /// The counters' part of a snapshot.
    pub(crate) fn snapshot(&self) -> (Outcomes, CacheCounts, LookupLatency, u64) {
        let c = |counter| self.sum(counter);
        let outcomes = Outcomes {
            ok: c(Counter::OkHit) + c(Counter::OkMiss),
            anonymous: c(Counter::Anonymous),
            missing: c(Counter::Missing),
            invalid: c(Counter::Invalid),
            revoked: c(Counter::Revoked),
            disabled: c(Counter::Disabled),
            expired: c(Counter::Expired),
            ip_denied: c(Counter::IpDenied),
            scope_denied: c(Counter::ScopeDenied),
            limited: c(Counter::Limited),
            unavailable: c(Counter::Unavailable),
        };
        let cache = CacheCounts {
            hits: c(Counter::OkHit) + c(Counter::HitRefused) + c(Counter::NegativeHit),
            negative_hits: c(Counter::NegativeHit),
            misses: c(Counter::Miss),
        };
        let latency = LookupLatency {
            bounds_us: &LOOKUP_LATENCY_BOUNDS_US,
            counts: self
                .latency
                .iter()
                .map(|b| b.load(Ordering::Relaxed))
                .collect(),
            sum_us: self.latency_sum_us.load(Ordering::Relaxed),
        };
        (
            outcomes,
            cache,
            latency,
            self.lookup_failures.load(Ordering::Relaxed),
        )
    }
}

/// Requests (and [`verify`](crate::PatAuthLayer::verify) calls) by outcome.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct Outcomes {
    /// Admitted with a principal.
    pub ok: u64,
    /// Let through without a principal: no credentials on an optional layer
    /// ([`allow_anonymous`](crate::PatAuthLayerBuilder::allow_anonymous)), or a foreign credential
    /// ([`pass_foreign_credentials`](crate::PatAuthLayerBuilder::pass_foreign_credentials)).
    pub anonymous: u64,
    /// Refused: no credentials where the layer reads them (401).
    pub missing: u64,
    /// Refused: an unknown or malformed token, or a malformed request (401 or 400).
    pub invalid: u64,
    /// Refused: a revoked token (401).
    pub revoked: u64,
    /// Refused: a disabled token (401).
    pub disabled: u64,
    /// Refused: an expired token (401).
    pub expired: u64,
    /// Refused: a client address outside the token's IP restriction (403).
    pub ip_denied: u64,
    /// Refused: a required scope missing (403), the layer's own or those of a `verify` call.
    pub scope_denied: u64,
    /// Refused by the failure limit (429).
    pub limited: u64,
    /// Refused because the store could not be reached (503).
    pub unavailable: u64,
}

/// The cache's answers.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct CacheCounts {
    /// Tokens the cache answered for, positively or from the negative cache.
    pub hits: u64,
    /// Of those, answered by the negative cache (a token known to be unknown, revoked or expired).
    pub negative_hits: u64,
    /// Tokens that needed a store lookup (concurrent requests for one token share it).
    pub misses: u64,
}

/// The latency of store lookups as a histogram.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct LookupLatency {
    /// The upper bound of each bucket in microseconds; `counts` has one more, to infinity.
    pub bounds_us: &'static [u64],
    /// How many lookups fell in each bucket (not cumulative).
    pub counts: Vec<u64>,
    /// The sum of all lookups' latencies, in microseconds.
    pub sum_us: u64,
}

/// The state of the store's change feed, as the layer's cache knows it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum FeedState {
    /// The store has no change feed: only the cache TTL bounds how long a change goes unseen.
    None,
    /// Connected: changes made elsewhere reach the cache as they happen.
    Connected,
    /// Disconnected for this long: no entry serves past its TTL until it is back.
    Disconnected(Duration),
}

/// A snapshot of a layer's counters ([`PatAuthLayer::stats`](crate::PatAuthLayer::stats)).
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub struct AuthStats {
    /// Requests by outcome.
    pub outcomes: Outcomes,
    /// Cache hits and misses.
    pub cache: CacheCounts,
    /// Store queries made (a token is looked up once per pepper it may be hashed under).
    pub store_lookups: u64,
    /// Store queries that failed.
    pub store_lookup_failures: u64,
    /// The latency of store queries.
    pub lookup_latency: LookupLatency,
    /// Tokens in the positive cache now.
    pub cached_tokens: u64,
    /// Entries in the negative cache now (approximate: expired entries leave lazily).
    pub negative_entries: u64,
    /// Store lookups in flight now.
    pub lookups_in_flight: u64,
    /// Usage tracking, when on.
    pub usage: Option<UsageStats>,
    /// The change feed.
    pub feed: FeedState,
    /// Rotated-out secrets presented and reported (see [`crate::reuse`]); always 0 while
    /// detection is off (no [`on_reuse`](crate::PatAuthLayerBuilder::on_reuse) hook and no
    /// [`ReusePolicy::RevokeFamily`](crate::ReusePolicy::RevokeFamily)).
    pub reused_secrets: u64,
}

#[cfg(test)]
mod tests {
    use super::{Counter, MIN_SHARDS, Stats, shard_count};

    #[test]
    fn a_shard_per_core_and_every_count_kept() {
        let n = shard_count();
        assert!(n.is_power_of_two() && n >= MIN_SHARDS);
        let cores = std::thread::available_parallelism().map_or(1, std::num::NonZero::get);
        assert!(n >= cores);
        // More threads than shards: they share shards, and no count is lost.
        let stats = Stats::default();
        std::thread::scope(|s| {
            for _ in 0..n + 3 {
                s.spawn(|| {
                    for _ in 0..1_000 {
                        stats.add(Counter::OkHit);
                    }
                });
            }
        });
        assert_eq!(stats.sum(Counter::OkHit), (n as u64 + 3) * 1_000);
    }
}
