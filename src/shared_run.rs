//! One run of a job shared by every caller that asks for it while it is pending: a flood of
//! requests for the same work (a readiness probe, a forced usage flush) becomes one run at a
//! time, not a queue of runs and tasks.

use std::future::Future;
use std::sync::Mutex;

use tokio::sync::watch;

use crate::usage::lock;

/// The run pending, if any: callers join it through a `watch` receiver of its answer. The run
/// goes in a task of its own, so a caller that is dropped (a client that hangs up) cannot cancel
/// it and make the next caller start another.
#[derive(Debug)]
pub(crate) struct SharedRun<T> {
    pending: Mutex<Option<watch::Receiver<Option<T>>>>,
}

impl<T> Default for SharedRun<T> {
    fn default() -> Self {
        Self {
            pending: Mutex::new(None),
        }
    }
}

impl<T: Clone + Send + Sync + 'static> SharedRun<T> {
    /// The answer of the run pending, or of a new one.
    ///
    /// `start` is called when no run is pending, or when the pending run's task is gone without
    /// an answer (its runtime shut down): such a run is replaced, not waited for. It is called
    /// under the lock that makes the run the only one pending, and returns either `Err(answer)`,
    /// to answer at once without a run, or the run, which is spawned on the current runtime. The
    /// run calls [`close`](Self::close) when a caller arriving later must no longer join it (when
    /// it starts, or when its answer is stored elsewhere).
    ///
    /// `None` when the run's task ended without an answer.
    pub(crate) async fn join_or_start<R>(&self, start: impl FnOnce() -> Result<R, T>) -> Option<T>
    where
        R: Future<Output = T> + Send + 'static,
    {
        let mut answer = {
            let mut pending = lock(&self.pending);
            match &*pending {
                Some(answer) if answer.has_changed().is_ok() => answer.clone(),
                _ => {
                    let run = match start() {
                        Ok(run) => run,
                        Err(answer) => return Some(answer),
                    };
                    let (tell, answer) = watch::channel(None);
                    *pending = Some(answer.clone());
                    tokio::spawn(async move {
                        let _ = tell.send(Some(run.await));
                    });
                    answer
                }
            }
        };
        match answer.wait_for(Option::is_some).await {
            Ok(answer) => answer.clone(),
            Err(_) => None,
        }
    }

    /// Ends the pending run's joining: callers from now on start a run of their own.
    pub(crate) fn close(&self) {
        lock(&self.pending).take();
    }
}
