//! The background task of a periodic job ([retention](crate::retention), [expiry
//! notices](crate::notices)): a run at once, then one every interval, until shutdown or until
//! the job's state is dropped.

use std::future::Future;
use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;

use tokio::sync::watch;

use crate::usage::lock;

/// The stop signal and the task of one periodic job, kept in the job's shared state: dropping it
/// aborts the task.
#[derive(Debug)]
pub(crate) struct Periodic {
    /// Set to `true` to stop the task (and a run in progress, where it checks
    /// [`stopping`](Self::stopping)).
    stop: watch::Sender<bool>,
    task: Mutex<Option<tokio::task::JoinHandle<()>>>,
}

impl Periodic {
    pub(crate) fn new() -> Self {
        Self {
            stop: watch::channel(false).0,
            task: Mutex::new(None),
        }
    }

    /// Whether [`shutdown`](Self::shutdown) was called.
    pub(crate) fn stopping(&self) -> bool {
        *self.stop.borrow()
    }

    /// Starts the task on the current Tokio runtime: `run` at once, then every `interval` (at
    /// least 1 ms), each time with the state upgraded from `state`, until shutdown or until the
    /// state is gone. Between runs the task holds the state weakly; no lock is held across an
    /// `.await`.
    ///
    /// # Panics
    ///
    /// Outside a Tokio runtime.
    pub(crate) fn start<S, F, Fut>(&self, state: Weak<S>, interval: Duration, run: F)
    where
        S: Send + Sync + 'static,
        F: Fn(Arc<S>) -> Fut + Send + 'static,
        Fut: Future<Output = ()> + Send,
    {
        let mut stop = self.stop.subscribe();
        let task = tokio::spawn(async move {
            let mut tick = tokio::time::interval(interval.max(Duration::from_millis(1)));
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tokio::select! {
                    _ = tick.tick() => {}
                    _ = stop.wait_for(|s| *s) => return,
                }
                let Some(state) = state.upgrade() else {
                    return;
                };
                if *stop.borrow() {
                    return;
                }
                run(state).await;
            }
        });
        *lock(&self.task) = Some(task);
    }

    /// Stops the task: a run in progress ends where it checks [`stopping`](Self::stopping);
    /// this returns once the task has ended.
    pub(crate) async fn shutdown(&self) {
        self.stop.send_replace(true);
        let task = lock(&self.task).take();
        if let Some(task) = task {
            let _ = task.await;
        }
    }
}

impl Drop for Periodic {
    fn drop(&mut self) {
        if let Some(task) = lock(&self.task).take() {
            task.abort();
        }
    }
}
