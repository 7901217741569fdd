//! Circuit breaking on concurrency: at most `max` holders at once, lock-free.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

/// Counts holders of a scarce thing (requests in flight to a service) against a limit.
#[derive(Debug)]
pub struct Limiter {
    active: AtomicUsize,
    max: usize,
}

/// One unit of a [`Limiter`], given back on drop.
#[derive(Debug)]
pub struct Permit(Arc<Limiter>);

impl Limiter {
    pub fn new(max: usize) -> Arc<Limiter> {
        Arc::new(Limiter {
            active: AtomicUsize::new(0),
            max,
        })
    }

    /// A permit, or `None` when `max` are out: the caller sheds the work at once.
    pub fn try_acquire(self: &Arc<Self>) -> Option<Permit> {
        let before = self.active.fetch_add(1, Ordering::AcqRel);
        if before >= self.max {
            self.active.fetch_sub(1, Ordering::AcqRel);
            return None;
        }
        Some(Permit(self.clone()))
    }

    /// Permits out now.
    pub fn active(&self) -> usize {
        self.active.load(Ordering::Acquire).min(self.max)
    }
}

impl Drop for Permit {
    fn drop(&mut self) {
        self.0.active.fetch_sub(1, Ordering::AcqRel);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sheds_over_the_limit_and_recovers() {
        let limiter = Limiter::new(2);
        let a = limiter.try_acquire().expect("first");
        let _b = limiter.try_acquire().expect("second");
        assert!(limiter.try_acquire().is_none());
        assert_eq!(limiter.active(), 2);
        drop(a);
        assert!(limiter.try_acquire().is_some());
    }
}
