//! Fixed-window counting per key: the failed-authentication limit per client network (past it, a
//! client gets 429 with `Retry-After` until its window ends) and the management API's
//! token-creation limit per subject.

use std::borrow::Borrow;
use std::hash::Hash;
use std::net::IpAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

/// Counts events per key within a window that starts at the key's first event; once `max` are
/// counted, the key is refused until its window ends. Bounded: keys are kept in a `moka` cache of
/// at most `capacity` entries that expire with their window, so nobody can grow it without limit.
pub(crate) struct WindowCounter<K> {
    max: u32,
    window: Duration,
    windows: moka::sync::Cache<K, Arc<Window>>,
}

struct Window {
    start: Instant,
    count: AtomicU32,
}

impl<K> std::fmt::Debug for WindowCounter<K> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WindowCounter")
            .field("max", &self.max)
            .field("window", &self.window)
            .finish_non_exhaustive()
    }
}

impl<K: Hash + Eq + Send + Sync + 'static> WindowCounter<K> {
    /// At most `max` events per key within `window`, tracking at most `capacity` keys.
    pub(crate) fn new(max: u32, window: Duration, capacity: u64) -> Self {
        let window = window.max(Duration::from_millis(1));
        Self {
            max: max.max(1),
            window,
            windows: moka::sync::Cache::builder()
                .max_capacity(capacity)
                .time_to_live(window)
                .build(),
        }
    }

    /// `Some(seconds until the key's window ends)` once `max` events were counted in it.
    pub(crate) fn blocked<Q>(&self, key: &Q) -> Option<u64>
    where
        K: Borrow<Q>,
        Q: Hash + Eq + ?Sized,
    {
        let w = self.windows.get(key)?;
        (w.count.load(Ordering::Relaxed) >= self.max).then(|| self.seconds_left(&w))
    }

    /// The whole seconds until `w` ends, at least one.
    fn seconds_left(&self, w: &Window) -> u64 {
        let left = self.window.saturating_sub(w.start.elapsed());
        (left.as_secs() + u64::from(left.subsec_nanos() > 0)).max(1)
    }

    /// The window of `key`, started now if it has none.
    fn window(&self, key: K) -> Arc<Window> {
        self.windows.get_with(key, || {
            Arc::new(Window {
                start: Instant::now(),
                count: AtomicU32::new(0),
            })
        })
    }

    /// Counts one event of `key`.
    pub(crate) fn count(&self, key: K) {
        self.window(key).count.fetch_add(1, Ordering::Relaxed);
    }

    /// Counts one event of `key` unless its window is full: `Err(seconds until it ends)` then.
    /// Check and count are one atomic step: requests at once cannot all pass a window with one
    /// event left.
    #[cfg_attr(not(feature = "admin"), allow(dead_code))]
    pub(crate) fn try_count(&self, key: K) -> Result<(), u64> {
        let w = self.window(key);
        w.count
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |n| {
                (n < self.max).then_some(n + 1)
            })
            .map(drop)
            .map_err(|_| self.seconds_left(&w))
    }
}

/// How many client networks the failure limit tracks at most: an attacker with many addresses
/// cannot grow it.
const FAILURE_LIMIT_CAPACITY: u64 = 100_000;

/// The failed-authentication limit: failures counted per client network, an IPv4 address per
/// `/v4_prefix` (default /32) and an IPv6 address per `/v6_prefix` (default /64: one host usually
/// holds a whole /64, so counting per /128 would give it 2^64 tries). IPv4-mapped IPv6 addresses
/// count as the IPv4 addresses they are.
#[derive(Debug)]
pub(crate) struct FailureLimit {
    counter: WindowCounter<IpAddr>,
    v4_prefix: u8,
    v6_prefix: u8,
}

impl FailureLimit {
    /// The default prefix lengths, IPv4 and IPv6.
    pub(crate) const DEFAULT_PREFIXES: (u8, u8) = (32, 64);

    /// At most `max` failures per network within `window`; prefixes longer than the address are
    /// clamped (33 is 32 for IPv4).
    pub(crate) fn new(max: u32, window: Duration, (v4_prefix, v6_prefix): (u8, u8)) -> Self {
        Self {
            counter: WindowCounter::new(max, window, FAILURE_LIMIT_CAPACITY),
            v4_prefix: v4_prefix.min(32),
            v6_prefix: v6_prefix.min(128),
        }
    }

    /// The network `ip` is counted in: its address with the host bits cleared.
    #[inline]
    fn key(&self, ip: IpAddr) -> IpAddr {
        crate::client_ip::network_key(ip, self.v4_prefix, self.v6_prefix)
    }

    /// `Some(seconds until the window ends)` while `ip`'s network is refused.
    #[inline]
    pub(crate) fn blocked(&self, ip: IpAddr) -> Option<u64> {
        self.counter.blocked(&self.key(ip))
    }

    /// Counts one failure of `ip`'s network.
    pub(crate) fn count(&self, ip: IpAddr) {
        self.counter.count(self.key(ip));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn failure_keys_are_networks() {
        let ip = |s: &str| s.parse::<IpAddr>().unwrap();
        let limit = FailureLimit::new(1, Duration::from_secs(60), FailureLimit::DEFAULT_PREFIXES);
        assert_eq!(limit.key(ip("192.0.2.7")), ip("192.0.2.7"));
        assert_eq!(limit.key(ip("::ffff:192.0.2.7")), ip("192.0.2.7"));
        assert_eq!(limit.key(ip("2001:db8:1:2:3:4:5:6")), ip("2001:db8:1:2::"));
        let limit = FailureLimit::new(1, Duration::from_secs(60), (0, 200));
        assert_eq!(limit.key(ip("192.0.2.7")), ip("0.0.0.0"));
        assert_eq!(limit.key(ip("2001:db8::1")), ip("2001:db8::1"));
        let limit = FailureLimit::new(1, Duration::from_secs(60), (24, 0));
        assert_eq!(limit.key(ip("192.0.2.7")), ip("192.0.2.0"));
        assert_eq!(limit.key(ip("2001:db8::1")), ip("::"));
    }

    #[test]
    fn fixed_window_per_key() {
        let c = WindowCounter::<String>::new(2, Duration::from_millis(300), 100);
        assert_eq!(c.try_count("a".to_owned()), Ok(()));
        assert_eq!(c.try_count("a".to_owned()), Ok(()));
        assert_eq!(c.try_count("a".to_owned()), Err(1));
        assert_eq!(c.blocked("b"), None);
        assert_eq!(c.try_count("b".to_owned()), Ok(()));
        std::thread::sleep(Duration::from_millis(350));
        assert_eq!(c.blocked("a"), None);
        assert_eq!(c.try_count("a".to_owned()), Ok(()));
    }

    /// Requests at once get no more than the window holds: each check is its count.
    #[test]
    fn concurrent_counts_never_pass_a_full_window() {
        let c = WindowCounter::<String>::new(50, Duration::from_secs(60), 100);
        let passed = std::sync::atomic::AtomicU32::new(0);
        let start = std::sync::Barrier::new(8);
        std::thread::scope(|s| {
            for _ in 0..8 {
                s.spawn(|| {
                    start.wait();
                    for _ in 0..100 {
                        if c.try_count("a".to_owned()).is_ok() {
                            passed.fetch_add(1, Ordering::Relaxed);
                        }
                    }
                });
            }
        });
        assert_eq!(passed.into_inner(), 50);
        assert_eq!(c.try_count("a".to_owned()), Err(60));
    }
}
