//! The per-subject limit on token creation (429 with `Retry-After`): a fixed window per subject.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// Subjects tracked before stale windows are swept.
const SWEEP_AT: usize = 10_000;

#[derive(Debug)]
pub(crate) struct CreationLimiter {
    max: u32,
    window: Duration,
    windows: Mutex<HashMap<String, (Instant, u32)>>,
}

impl CreationLimiter {
    pub(crate) fn new(max: u32, window: Duration) -> Self {
        Self {
            max,
            window,
            windows: Mutex::new(HashMap::new()),
        }
    }

    /// Counts one creation by `subject`; `Err(seconds)` until the window ends if it is one too
    /// many.
    pub(crate) fn check(&self, subject: &str, now: Instant) -> Result<(), u64> {
        let mut windows = self.windows.lock().unwrap_or_else(|e| e.into_inner());
        if windows.len() >= SWEEP_AT {
            windows.retain(|_, (start, _)| now.duration_since(*start) < self.window);
        }
        let (start, count) = windows.entry(subject.to_owned()).or_insert((now, 0));
        if now.duration_since(*start) >= self.window {
            *start = now;
            *count = 0;
        }
        if *count >= self.max {
            let left = self.window.saturating_sub(now.duration_since(*start));
            return Err(left.as_secs() + u64::from(left.subsec_nanos() > 0));
        }
        *count += 1;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fixed_window_per_subject() {
        let l = CreationLimiter::new(2, Duration::from_secs(60));
        let t = Instant::now();
        assert!(l.check("a", t).is_ok());
        assert!(l.check("a", t).is_ok());
        assert_eq!(l.check("a", t + Duration::from_secs(10)), Err(50));
        assert!(l.check("b", t).is_ok());
        assert!(l.check("a", t + Duration::from_secs(60)).is_ok());
    }
}
