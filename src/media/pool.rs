//! The bounded pool that decodes and preprocesses media: at most `workers` jobs at once, on
//! the blocking pool, so a 4K photo or a long video never holds an async worker (which
//! carries other clients' streams) nor the engine thread. `inline` runs jobs on the async
//! worker instead: only for measuring what the pool buys.

use tokio::sync::Semaphore;

/// A media job that panicked: a bug, reported as a server error.
#[derive(Debug, thiserror::Error)]
#[error("media job: {0}")]
pub struct JobFailed(String);

pub struct MediaPool {
    permits: Semaphore,
    inline: bool,
}

impl MediaPool {
    pub fn new(workers: usize, inline: bool) -> Self {
        Self {
            permits: Semaphore::new(workers.max(1)),
            inline,
        }
    }

    pub async fn run<T: Send + 'static>(&self, job: impl FnOnce() -> T + Send + 'static) -> Result<T, JobFailed> {
        if self.inline {
            return Ok(job());
        }
        let _permit = self
            .permits
            .acquire()
            .await
            .expect("the pool's semaphore is never closed. This is a bug.");
        tokio::task::spawn_blocking(job)
            .await
            .map_err(|e| JobFailed(e.to_string()))
    }
}
