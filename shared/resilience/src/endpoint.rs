//! One endpoint of a service and the state that decides whether it gets traffic: requests in
//! flight (least_request), outlier ejection and active health. All atomics: the request path
//! reads them without a lock.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;

#[derive(Debug)]
pub struct Endpoint {
    pub addr: SocketAddr,
    /// Requests in flight to this endpoint.
    active: AtomicUsize,
    pub(crate) consecutive_5xx: AtomicU32,
    pub(crate) consecutive_gateway_errors: AtomicU32,
    /// Milliseconds after the balancer's epoch when the ejection ends; 0 = not ejected.
    pub(crate) ejected_until: AtomicU64,
    /// Ejections so far, less one per `interval` spent back in: the ejection multiplier.
    pub(crate) ejections: AtomicU32,
    /// When the endpoint last came back (ms after the epoch), to decay `ejections`.
    pub(crate) returned_at: AtomicU64,
    /// Set by active health checks; true until a check says otherwise.
    pub(crate) healthy: AtomicBool,
    /// Consecutive check results that disagree with `healthy`.
    pub(crate) health_streak: AtomicU32,
}

impl Endpoint {
    pub fn new(addr: SocketAddr) -> Endpoint {
        Endpoint {
            addr,
            active: AtomicUsize::new(0),
            consecutive_5xx: AtomicU32::new(0),
            consecutive_gateway_errors: AtomicU32::new(0),
            ejected_until: AtomicU64::new(0),
            ejections: AtomicU32::new(0),
            returned_at: AtomicU64::new(0),
            healthy: AtomicBool::new(true),
            health_streak: AtomicU32::new(0),
        }
    }

    /// Marks a request in flight to this endpoint until the returned guard drops.
    pub fn begin(self: &Arc<Self>) -> Active {
        self.active.fetch_add(1, Ordering::Relaxed);
        Active(self.clone())
    }

    pub fn active(&self) -> usize {
        self.active.load(Ordering::Relaxed)
    }

    pub fn is_healthy(&self) -> bool {
        self.healthy.load(Ordering::Relaxed)
    }
}

/// A request in flight to an endpoint (see [`Endpoint::begin`]).
#[derive(Debug)]
pub struct Active(Arc<Endpoint>);

impl Active {
    pub fn endpoint(&self) -> &Arc<Endpoint> {
        &self.0
    }
}

impl Drop for Active {
    fn drop(&mut self) {
        self.0.active.fetch_sub(1, Ordering::Relaxed);
    }
}
