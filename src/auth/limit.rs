//! Throttling of clients that keep presenting bad tokens (DESIGN.md §3: 429 with `Retry-After`).

use std::net::IpAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

/// Counts failed authentications per client address in a bounded cache; a client over the limit
/// is refused with 429 until its window ends.
#[derive(Clone)]
pub(crate) struct FailureLimiter {
    max_failures: u32,
    retry_after_secs: u64,
    counts: moka::sync::Cache<IpAddr, Arc<AtomicU32>>,
}

impl std::fmt::Debug for FailureLimiter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FailureLimiter")
            .field("max_failures", &self.max_failures)
            .field("retry_after_secs", &self.retry_after_secs)
            .finish_non_exhaustive()
    }
}

impl FailureLimiter {
    /// At most `max_failures` failures per client address within `window` (counted from the
    /// first), tracking at most 100 000 addresses.
    pub(crate) fn new(max_failures: u32, window: Duration) -> Self {
        Self {
            max_failures: max_failures.max(1),
            retry_after_secs: window.as_secs().max(1),
            counts: moka::sync::Cache::builder()
                .max_capacity(100_000)
                .time_to_live(window.max(Duration::from_millis(1)))
                .build(),
        }
    }

    /// `Some(retry_after_secs)` when the client is over the limit.
    pub(crate) fn blocked(&self, ip: Option<IpAddr>) -> Option<u64> {
        let count = self.counts.get(&ip?)?;
        (count.load(Ordering::Relaxed) >= self.max_failures).then_some(self.retry_after_secs)
    }

    /// Counts one failed authentication of the client.
    pub(crate) fn failed(&self, ip: Option<IpAddr>) {
        if let Some(ip) = ip {
            self.counts
                .get_with(ip, || Arc::new(AtomicU32::new(0)))
                .fetch_add(1, Ordering::Relaxed);
        }
    }
}
