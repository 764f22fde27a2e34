//! Fixed-window counting per key: the failed-authentication limit per client network (past it, a
//! client gets 429 with `Retry-After` until its window ends) and the management API's
//! token-creation and rotation limits.

use std::borrow::Borrow;
use std::hash::Hash;
use std::net::IpAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// Counts events per key within a window that starts at the key's first event; once `max` are
/// counted, the key is refused until its window ends, whatever other keys do. Bounded: keys are
/// kept in a `moka` cache whose entries expire with their window, at most `capacity` of them (an
/// exact count of their own, not moka's eventually consistent one), and never evicted for room:
/// while the table is full, a key without a window of its own counts in one shared overflow
/// window. So nobody can grow the table without limit, nor make it forget a key at its limit; keys
/// beyond the capacity get, all together, `max` events per window.
pub(crate) struct WindowCounter<K> {
    max: u32,
    window: Duration,
    capacity: u64,
    windows: moka::sync::Cache<K, Arc<Window>>,
    /// The windows in `windows`: counted up before one is inserted, down when moka removes one
    /// (its eviction listener, once per removed entry: they only expire), so never below the
    /// entries held.
    tracked: Arc<AtomicU64>,
    /// The window the keys share that found the table full, replaced once it has ended.
    overflow: Mutex<Arc<Window>>,
}

struct Window {
    start: Instant,
    /// The events counted (the low 32 bits) and the attempts in progress (the high 32 bits,
    /// [`WindowCounter::attempt`]), in one word so that each check and its change are one
    /// atomic step.
    state: AtomicU64,
    /// Woken when an attempt ends.
    ended: tokio::sync::Notify,
}

/// One attempt in progress.
const ATTEMPT: u64 = 1 << 32;

impl Window {
    fn new() -> Self {
        Self {
            start: Instant::now(),
            state: AtomicU64::new(0),
            ended: tokio::sync::Notify::new(),
        }
    }

    /// The events counted, and the attempts in progress.
    fn counts(state: u64) -> (u64, u64) {
        (state & (ATTEMPT - 1), state >> 32)
    }
}

/// An attempt in progress ([`WindowCounter::attempt`]): counted against its key's window as if
/// it had failed, until dropped.
pub(crate) struct Attempt {
    window: Arc<Window>,
}

impl Drop for Attempt {
    fn drop(&mut self) {
        self.window.state.fetch_sub(ATTEMPT, Ordering::AcqRel);
        self.window.ended.notify_waiters();
    }
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
    /// At most `max` events per key within `window`, tracking at most `capacity` keys (those
    /// beyond it share one window).
    pub(crate) fn new(max: u32, window: Duration, capacity: u64) -> Self {
        let window = window.max(Duration::from_millis(1));
        let tracked = Arc::new(AtomicU64::new(0));
        let removed = Arc::clone(&tracked);
        Self {
            max: max.max(1),
            window,
            capacity,
            // No size bound: moka would evict live windows for room, a blocked key with them.
            windows: moka::sync::Cache::builder()
                .time_to_live(window)
                .eviction_listener(move |_, _, _| {
                    let _ = removed.fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
                        Some(n.saturating_sub(1))
                    });
                })
                .build(),
            tracked,
            overflow: Mutex::new(Arc::new(Window::new())),
        }
    }

    /// `Some(seconds until the key's window ends)` once `max` events were counted in it. Only the
    /// key's own window: the overflow window refuses what would count in it (see
    /// [`Self::window`]), not the keys that share it.
    pub(crate) fn blocked<Q>(&self, key: &Q) -> Option<u64>
    where
        K: Borrow<Q>,
        Q: Hash + Eq + ?Sized,
    {
        let w = self.windows.get(key)?;
        let (counted, _) = Window::counts(w.state.load(Ordering::Acquire));
        (counted >= u64::from(self.max)).then(|| self.seconds_left(&w))
    }

    /// The whole seconds until `w` ends, at least one.
    fn seconds_left(&self, w: &Window) -> u64 {
        let left = self.window.saturating_sub(w.start.elapsed());
        (left.as_secs() + u64::from(left.subsec_nanos() > 0)).max(1)
    }

    /// The window of `key`, started now if it has none and the table has room; else the overflow
    /// window.
    fn window(&self, key: K) -> Arc<Window> {
        let own = self.windows.entry(key).or_optionally_insert_with(|| {
            self.tracked
                .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
                    (n < self.capacity).then_some(n + 1)
                })
                .ok()?;
            Some(Arc::new(Window::new()))
        });
        match own {
            Some(own) => own.into_value(),
            None => self.overflow(),
        }
    }

    /// The overflow window, a new one if the last has ended.
    #[cold]
    fn overflow(&self) -> Arc<Window> {
        let mut overflow = self.overflow.lock().unwrap_or_else(|e| e.into_inner());
        if overflow.start.elapsed() >= self.window {
            *overflow = Arc::new(Window::new());
        }
        Arc::clone(&overflow)
    }

    /// Counts one event of `key`.
    pub(crate) fn count(&self, key: K) {
        // Saturating: the count never carries into the attempts.
        let _ = self
            .window(key)
            .state
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |s| {
                (Window::counts(s).0 < ATTEMPT - 1).then_some(s + 1)
            });
    }

    /// Counts one event of `key` unless its window is full: `Err(seconds until it ends)` then.
    /// Check and count are one atomic step: requests at once cannot all pass a window with one
    /// event left.
    #[cfg_attr(not(feature = "admin"), allow(dead_code))]
    pub(crate) fn try_count(&self, key: K) -> Result<(), u64> {
        let w = self.window(key);
        w.state
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |s| {
                (Window::counts(s).0 < u64::from(self.max)).then_some(s + 1)
            })
            .map(drop)
            .map_err(|_| self.seconds_left(&w))
    }

    /// Starts an attempt of `key` whose failure would count ([`Self::count`], before the
    /// [`Attempt`] is dropped): attempts in progress count as failures, so that requests at once
    /// cannot all pass a window with one failure left. Waits while the failures and the attempts
    /// in progress reach `max` (one of them may succeed), in the key's current window (one that
    /// ends meanwhile hands the wait to the next); `Err(seconds until the window ends)` once the
    /// failures alone do.
    pub(crate) async fn attempt(&self, key: K) -> Result<Attempt, u64>
    where
        K: Clone,
    {
        let max = u64::from(self.max);
        loop {
            // The key's current window, each time: one that expired while this waited never
            // counts the failures of its attempts (they go to the next).
            let window = self.window(key.clone());
            let started = {
                let ended = window.ended.notified();
                let mut ended = std::pin::pin!(ended);
                ended.as_mut().enable();
                let started = window
                    .state
                    .fetch_update(Ordering::AcqRel, Ordering::Acquire, |s| {
                        let (counted, attempts) = Window::counts(s);
                        (counted + attempts < max).then_some(s + ATTEMPT)
                    });
                match started {
                    Ok(_) => true,
                    Err(s) if Window::counts(s).0 >= max => {
                        return Err(self.seconds_left(&window));
                    }
                    Err(_) => {
                        let left = self
                            .window
                            .saturating_sub(window.start.elapsed())
                            .max(Duration::from_millis(1));
                        let _ = tokio::time::timeout(left, ended).await;
                        false
                    }
                }
            };
            if started {
                return Ok(Attempt { window });
            }
        }
    }
}

/// How many client networks the failure limit tracks at most: an attacker with many addresses
/// cannot grow it (the networks beyond it share one window), nor make it forget one.
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

    /// Starts a store lookup of a token `ip` presented ([`WindowCounter::attempt`]): it counts
    /// as a failure of `ip`'s network until it ends, and a failure is counted before it ends.
    pub(crate) async fn attempt(&self, ip: IpAddr) -> Result<Attempt, u64> {
        self.counter.attempt(self.key(ip)).await
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

    /// A full table forgets no key before its window ends: a key at its limit stays refused
    /// whatever other keys do, and the keys beyond the capacity share one window (limited, not
    /// unlimited). Once the windows have ended, the table has room again.
    #[test]
    fn a_full_table_keeps_its_windows_and_the_others_share_one() {
        let c = WindowCounter::<u32>::new(1, Duration::from_millis(300), 2);
        assert_eq!(c.try_count(1), Ok(()));
        assert_eq!(c.try_count(1), Err(1));
        assert_eq!(c.try_count(2), Ok(()));
        // The table is full: the others count in the overflow window, one event for them all.
        assert_eq!(c.try_count(3), Ok(()));
        for key in 3..1_000 {
            assert_eq!(c.try_count(key), Err(1), "key {key}");
            c.count(key);
        }
        c.windows.run_pending_tasks();
        assert_eq!(c.blocked(&1), Some(1), "a key at its limit was forgotten");
        assert_eq!(c.try_count(1), Err(1));
        assert_eq!(c.tracked.load(Ordering::Acquire), 2);
        std::thread::sleep(Duration::from_millis(350));
        // The windows have ended and are counted out: new keys get windows of their own.
        c.windows.run_pending_tasks();
        assert_eq!(c.tracked.load(Ordering::Acquire), 0);
        assert_eq!(c.try_count(4), Ok(()));
        assert_eq!(c.try_count(5), Ok(()));
        assert_eq!(c.try_count(4), Err(1));
        assert_eq!(c.try_count(1), Ok(()));
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
