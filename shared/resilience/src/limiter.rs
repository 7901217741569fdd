//! Circuit breaking on concurrency (DESIGN.md `service.connection_pool`): requests in
//! flight against `max_requests` ([`Limiter`], lock-free), and connections in use against
//! `max_connections` with a bounded queue of `max_pending_requests` ([`ConnectionGate`]).

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use tokio::sync::{OwnedSemaphorePermit, Semaphore};

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

/// Connections in use to a service. A try takes one for as long as it holds its connection
/// (with HTTP/1.1 a try uses a connection of its own); when all are taken, up to
/// `max_pending` tries wait in line, and any more overflow.
#[derive(Debug)]
pub struct ConnectionGate {
    connections: Arc<Semaphore>,
    pending: AtomicUsize,
    max_pending: usize,
}

/// The queue was full: 503 `UO`.
#[derive(Debug, PartialEq, Eq)]
pub struct Overflow;

impl ConnectionGate {
    pub fn new(max_connections: usize, max_pending: usize) -> ConnectionGate {
        ConnectionGate {
            connections: Arc::new(Semaphore::new(max_connections.min(Semaphore::MAX_PERMITS))),
            pending: AtomicUsize::new(0),
            max_pending,
        }
    }

    /// A free connection place now, without waiting (the common case, and no future).
    pub fn try_acquire(&self) -> Option<OwnedSemaphorePermit> {
        self.connections.clone().try_acquire_owned().ok()
    }

    /// A connection place: at once when one is free (no lock), else after waiting in line.
    /// The caller bounds the wait (the request's deadline); dropping the future leaves the
    /// line.
    pub async fn acquire(&self) -> Result<OwnedSemaphorePermit, Overflow> {
        if let Some(permit) = self.try_acquire() {
            return Ok(permit);
        }
        if self.pending.fetch_add(1, Ordering::AcqRel) >= self.max_pending {
            self.pending.fetch_sub(1, Ordering::AcqRel);
            return Err(Overflow);
        }
        let _in_line = InLine(&self.pending);
        self.connections
            .clone()
            .acquire_owned()
            .await
            .map_err(|_| Overflow)
    }

    /// Tries waiting for a connection now.
    pub fn pending(&self) -> usize {
        self.pending.load(Ordering::Acquire)
    }
}

struct InLine<'a>(&'a AtomicUsize);

impl Drop for InLine<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn waits_in_a_bounded_line_then_overflows() {
        let gate = Arc::new(ConnectionGate::new(1, 1));
        let first = gate.acquire().await.expect("a free connection");
        let waiting = tokio::spawn({
            let gate = gate.clone();
            async move { gate.acquire().await.map(|_| ()) }
        });
        while gate.pending() == 0 {
            tokio::task::yield_now().await;
        }
        assert_eq!(gate.acquire().await.err(), Some(Overflow));
        drop(first);
        assert_eq!(waiting.await.unwrap(), Ok(()));
        assert_eq!(gate.pending(), 0);
    }

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
