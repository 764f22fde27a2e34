//! Fixed-window counting per key: the failed-authentication limit per client address (DESIGN.md
//! §3: 429 with `Retry-After`) and the management API's token-creation limit per subject.

use std::borrow::Borrow;
use std::hash::Hash;
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
        (w.count.load(Ordering::Relaxed) >= self.max).then(|| {
            let left = self.window.saturating_sub(w.start.elapsed());
            (left.as_secs() + u64::from(left.subsec_nanos() > 0)).max(1)
        })
    }

    /// Counts one event of `key`.
    pub(crate) fn count(&self, key: K) {
        self.windows
            .get_with(key, || {
                Arc::new(Window {
                    start: Instant::now(),
                    count: AtomicU32::new(0),
                })
            })
            .count
            .fetch_add(1, Ordering::Relaxed);
    }

    /// Counts one event of `key` unless its window is full: `Err(seconds until it ends)` then.
    #[cfg_attr(not(feature = "admin"), allow(dead_code))]
    pub(crate) fn try_count(&self, key: K) -> Result<(), u64> {
        match self.blocked(&key) {
            Some(secs) => Err(secs),
            None => {
                self.count(key);
                Ok(())
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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
}
