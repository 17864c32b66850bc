//! A local deadline that can be read without a lock, so that every `is_lost()` can compare
//! it with the clock: a holder learns that its hold stopped being certain at once, not only
//! when the background task that watches the deadline next runs.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use tokio::time::Instant;

/// `d` from now, on tokio's clock; a duration too long for the clock to add (a timeout of
/// `Duration::MAX`, say) gives a century from now, which no wait outlives.
#[cfg_attr(not(feature = "redis"), allow(dead_code))]
pub(crate) fn after(d: Duration) -> Instant {
    let now = Instant::now();
    now.checked_add(d)
        .unwrap_or_else(|| now + Duration::from_secs(100 * 365 * 86_400))
}

/// A deadline on the monotonic clock, stored as nanoseconds after a base instant that has
/// already passed when the deadline is made.
///
/// A deadline before the base is stored as the base itself: a later instant, but one that has
/// passed too, so the deadline counts as passed either way.
#[derive(Debug)]
pub(crate) struct LocalDeadline {
    base: Instant,
    nanos: AtomicU64,
}

impl LocalDeadline {
    /// A deadline at `at`, counted from `base`, which must not be later than now (the start
    /// of the acquire or grant that set the first deadline).
    pub(crate) fn new(base: Instant, at: Instant) -> Self {
        debug_assert!(base <= Instant::now());
        let d = LocalDeadline {
            base,
            nanos: AtomicU64::new(0),
        };
        d.set(at);
        d
    }

    fn offset(&self, at: Instant) -> u64 {
        // Saturating: a deadline hundreds of years away is as good as any.
        u64::try_from(at.saturating_duration_since(self.base).as_nanos()).unwrap_or(u64::MAX)
    }

    /// The deadline.
    pub(crate) fn get(&self) -> Instant {
        self.base + Duration::from_nanos(self.nanos.load(Ordering::Acquire))
    }

    /// Move the deadline to `at`, earlier or later.
    pub(crate) fn set(&self, at: Instant) {
        self.nanos.store(self.offset(at), Ordering::Release);
    }

    /// Move the deadline to `at` if that is later.
    pub(crate) fn push(&self, at: Instant) {
        self.nanos.fetch_max(self.offset(at), Ordering::AcqRel);
    }

    /// True if the deadline is now or past.
    pub(crate) fn passed(&self) -> bool {
        Instant::now() >= self.get()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn set_push_and_clamp() {
        let t0 = Instant::now();
        let d = LocalDeadline::new(t0, t0 + Duration::from_secs(10));
        assert_eq!(d.get(), t0 + Duration::from_secs(10));
        assert!(!d.passed());
        d.push(t0 + Duration::from_secs(5));
        assert_eq!(
            d.get(),
            t0 + Duration::from_secs(10),
            "push never moves it earlier"
        );
        d.push(t0 + Duration::from_secs(20));
        assert_eq!(d.get(), t0 + Duration::from_secs(20));
        d.set(t0 + Duration::from_secs(12));
        assert_eq!(d.get(), t0 + Duration::from_secs(12));
        d.set(t0);
        assert_eq!(d.get(), t0);
        assert!(d.passed());
        // Before the base: stored as the base, which has passed as well.
        let late = LocalDeadline::new(t0, t0 - Duration::from_secs(1));
        assert_eq!(late.get(), t0);
        assert!(late.passed());
    }
}
