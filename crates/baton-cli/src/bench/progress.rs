//! Progress on stderr: once a run has taken a second, one line per second with the
//! operations done so far.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio_util::sync::CancellationToken;

/// A counter of operations done, reported on stderr every second until dropped.
#[derive(Debug)]
pub(crate) struct Progress {
    done: Arc<AtomicU64>,
    stop: CancellationToken,
}

impl Progress {
    /// Start reporting `label` (e.g. `contended/baton`), out of `total` operations.
    pub(crate) fn start(label: String, total: u64, what: &'static str) -> Progress {
        let done = Arc::new(AtomicU64::new(0));
        let stop = CancellationToken::new();
        let (d, s) = (done.clone(), stop.clone());
        let started = Instant::now();
        tokio::spawn(async move {
            let mut tick = tokio::time::interval_at(
                tokio::time::Instant::now() + Duration::from_secs(1),
                Duration::from_secs(1),
            );
            loop {
                tokio::select! {
                    _ = s.cancelled() => return,
                    _ = tick.tick() => {}
                }
                crate::output::notice(&format!(
                    "bench {label}: {}/{total} {what}, {:.1} s",
                    d.load(Ordering::Relaxed),
                    started.elapsed().as_secs_f64()
                ));
            }
        });
        Progress { done, stop }
    }

    /// The operations done so far.
    pub(crate) fn done(&self) -> u64 {
        self.done.load(Ordering::Relaxed)
    }

    /// One more operation done.
    pub(crate) fn inc(&self) {
        self.done.fetch_add(1, Ordering::Relaxed);
    }
}

impl Drop for Progress {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}
