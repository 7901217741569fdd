//! Endpoint choice for one service: the load balancers of DESIGN.md §3 over the endpoints
//! that are in (healthy and not ejected), plus the passive outlier detection that ejects
//! endpoints which keep failing.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use arc_swap::ArcSwap;
use pingora_ketama::{Bucket, Continuum};
use tokio::time::Instant;
use tracing::{info, warn};
use weir_config::{HealthCheck, LoadBalancer, OutlierDetection, Service};

use crate::endpoint::Endpoint;

/// The endpoint chooser of one service. Lock-free on the request path: atomics and an
/// `ArcSwap` of the endpoint set (which changes only when DNS answers change).
pub struct Balancer {
    service: String,
    set: ArcSwap<EndpointSet>,
    next: AtomicUsize,
    /// The turns of endpoints that were out, handed round the others.
    skipped: AtomicUsize,
    kind: LoadBalancer,
    outlier: Option<OutlierDetection>,
    /// Endpoints ejected now; while 0, picking never reads the clock.
    ejected: AtomicUsize,
    /// Serializes ejection decisions (rare), so two failures cannot both take the last place.
    ejecting: Mutex<()>,
    /// An ejection was held back by the limits and said so since the last ejection or return.
    held_back: AtomicBool,
    epoch: Instant,
}

/// The endpoints of a service at one time, with the hash ring over them.
pub struct EndpointSet {
    pub endpoints: Vec<Arc<Endpoint>>,
    ring: Option<(Continuum, HashMap<SocketAddr, usize>)>,
}

/// How one try to an endpoint ended, for outlier detection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TryResult {
    /// A response with this status.
    Status(u16),
    /// No response: connect failure, reset or timeout (counted as a gateway error, as Envoy
    /// counts locally originated failures).
    NoResponse,
}

/// An endpoint's state, for admin and metrics.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct EndpointStatus {
    pub address: SocketAddr,
    /// "healthy", "ejected" or "unhealthy".
    pub state: &'static str,
    pub active_requests: usize,
    pub ejections: u32,
    /// Milliseconds until an ejected endpoint returns.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub returns_in_ms: Option<u64>,
}

impl Balancer {
    pub fn new(service: &Service) -> Balancer {
        Balancer {
            service: service.name.clone(),
            set: ArcSwap::from_pointee(EndpointSet::new(
                &service.load_balancer,
                &service.endpoints,
                &[],
            )),
            next: AtomicUsize::new(0),
            skipped: AtomicUsize::new(0),
            kind: service.load_balancer.clone(),
            outlier: service.outlier_detection.clone(),
            ejected: AtomicUsize::new(0),
            ejecting: Mutex::new(()),
            held_back: AtomicBool::new(false),
            epoch: Instant::now(),
        }
    }

    /// The endpoints now.
    pub fn endpoints(&self) -> Arc<EndpointSet> {
        self.set.load_full()
    }

    /// Replaces the endpoints (DNS discovery), keeping the state of those that stay.
    /// Returns whether anything changed.
    pub fn set_endpoints(&self, mut addrs: Vec<SocketAddr>) -> bool {
        addrs.sort();
        addrs.dedup();
        let old = self.set.load_full();
        let mut current: Vec<SocketAddr> = old.endpoints.iter().map(|e| e.addr).collect();
        current.sort();
        if current == addrs {
            return false;
        }
        let set = EndpointSet::new(&self.kind, &addrs, &old.endpoints);
        let now = self.now_ms();
        let ejected = set.endpoints.iter().filter(|e| ejected_at(e, now)).count();
        self.set.store(Arc::new(set));
        self.ejected.store(ejected, Ordering::Release);
        true
    }

    /// The endpoint for a try: one that is in, not `avoid` (the endpoint the last try
    /// failed on) when another is in. `key` is the request's hash key (consistent_hash); a
    /// consistent-hash service without one falls back to round robin, as Envoy falls back to
    /// a random pick. `None` when no endpoint is in: 503 `UH`.
    pub fn pick(&self, key: Option<&[u8]>, avoid: Option<SocketAddr>) -> Option<Arc<Endpoint>> {
        let set = self.set.load();
        if set.endpoints.is_empty() {
            return None;
        }
        let now = (self.ejected.load(Ordering::Acquire) > 0).then(|| self.now_ms());
        self.choose(&set, key, |e| Some(e.addr) != avoid && self.is_in(e, now))
            .or_else(|| avoid.and_then(|_| self.choose(&set, key, |e| self.is_in(e, now))))
    }

    fn choose(
        &self,
        set: &EndpointSet,
        key: Option<&[u8]>,
        ok: impl Fn(&Endpoint) -> bool,
    ) -> Option<Arc<Endpoint>> {
        let eps = &set.endpoints;
        let n = eps.len();
        // The k-th of those that are ok. An endpoint that is out leaves its turns to all the
        // others in turn, not to its neighbour in the list (which would take twice its share):
        // the spread over the healthy of Envoy and nginx.
        let spread = |k: usize| {
            let m = eps.iter().filter(|e| ok(e)).count();
            let kth = (m > 0).then(|| eps.iter().filter(|e| ok(e)).nth(k % m));
            // Health may change between the two passes.
            kth.flatten()
                .or_else(|| eps.iter().find(|e| ok(e)))
                .cloned()
        };
        let at_or_spread = |i: usize, k: &dyn Fn() -> usize| {
            let e = &eps[i % n];
            if ok(e) {
                Some(e.clone())
            } else {
                spread(k())
            }
        };
        match (&self.kind, key, &set.ring) {
            (LoadBalancer::ConsistentHash(_), Some(key), Some((ring, index))) => ring
                .node_iter(key)
                .take(ring_len(n))
                .filter_map(|addr| index.get(addr).map(|&i| &eps[i]))
                .find(|e| ok(e))
                .cloned()
                .or_else(|| spread(0)),
            (LoadBalancer::Random, _, _) => {
                at_or_spread(fastrand::usize(..n), &|| fastrand::usize(..))
            }
            (LoadBalancer::LeastRequest, _, _) if n > 1 => {
                // Power of two choices, as Envoy's least_request with choice_count 2.
                let a = fastrand::usize(..n);
                let b = (a + 1 + fastrand::usize(..n - 1)) % n;
                let (a, b) = (&eps[a], &eps[b]);
                match (ok(a), ok(b)) {
                    (true, true) if b.active() < a.active() => Some(b.clone()),
                    (true, _) => Some(a.clone()),
                    (false, true) => Some(b.clone()),
                    (false, false) => spread(fastrand::usize(..)),
                }
            }
            _ => at_or_spread(self.next.fetch_add(1, Ordering::Relaxed), &|| {
                self.skipped.fetch_add(1, Ordering::Relaxed)
            }),
        }
    }

    /// Healthy, and not ejected at `now` (`None`: no endpoint is ejected).
    fn is_in(&self, e: &Endpoint, now: Option<u64>) -> bool {
        e.is_healthy() && now.is_none_or(|now| !self.still_ejected(e, now))
    }

    /// Whether `e` is ejected at `now`; an ejection that has run out ends here.
    fn still_ejected(&self, e: &Endpoint, now: u64) -> bool {
        let until = e.ejected_until.load(Ordering::Acquire);
        if until == 0 {
            return false;
        }
        if now < until {
            return true;
        }
        if e.ejected_until
            .compare_exchange(until, 0, Ordering::AcqRel, Ordering::Acquire)
            .is_ok()
        {
            // Back in since its time ran out, not since the first pick after that: the
            // multiplier decays for intervals without traffic too (as Envoy's).
            e.returned_at.store(until, Ordering::Release);
            e.consecutive_5xx.store(0, Ordering::Relaxed);
            e.consecutive_gateway_errors.store(0, Ordering::Relaxed);
            self.ejected.fetch_sub(1, Ordering::AcqRel);
            self.held_back.store(false, Ordering::Release);
            info!(service = %self.service, endpoint = %e.addr, "outlier detection: endpoint returned");
        }
        false
    }

    /// Records how a try ended (passive outlier detection). Returns the ejection time when
    /// this result ejected the endpoint.
    pub fn report(&self, e: &Endpoint, result: TryResult) -> Option<Duration> {
        let od = self.outlier.as_ref()?;
        let (is_5xx, is_gateway) = match result {
            TryResult::Status(s) => (s >= 500, matches!(s, 502..=504)),
            TryResult::NoResponse => (true, true),
        };
        let count = |counter: &std::sync::atomic::AtomicU32, hit: bool| {
            if hit {
                counter.fetch_add(1, Ordering::AcqRel) + 1
            } else {
                if counter.load(Ordering::Relaxed) != 0 {
                    counter.store(0, Ordering::Relaxed);
                }
                0
            }
        };
        let c5 = count(&e.consecutive_5xx, is_5xx);
        let cg = count(&e.consecutive_gateway_errors, is_gateway);
        let reason = if od.consecutive_5xx > 0 && c5 >= od.consecutive_5xx {
            format!("{c5} consecutive 5xx")
        } else if od.consecutive_gateway_errors > 0 && cg >= od.consecutive_gateway_errors {
            format!("{cg} consecutive gateway errors")
        } else {
            return None;
        };
        self.eject(e, od, &reason)
    }

    fn eject(&self, e: &Endpoint, od: &OutlierDetection, reason: &str) -> Option<Duration> {
        let _one = self.ejecting.lock().unwrap_or_else(|p| p.into_inner());
        let now = self.now_ms();
        if self.still_ejected(e, now) {
            return None;
        }
        let set = self.set.load();
        let n = set.endpoints.len();
        let out = set
            .endpoints
            .iter()
            .filter(|x| self.still_ejected(x, now))
            .count();
        // As Envoy: at least one endpoint may be ejected whatever the percentage, but here
        // never the last one in.
        let by_percent = (n * od.max_ejection_percent as usize / 100).max(1);
        let allowed = by_percent.min(n - 1);
        e.consecutive_5xx.store(0, Ordering::Relaxed);
        e.consecutive_gateway_errors.store(0, Ordering::Relaxed);
        if out >= allowed {
            // Said once until the ejections change: a failing service would say it at
            // every few failures.
            if !self.held_back.swap(true, Ordering::AcqRel) {
                let why = if by_percent > allowed {
                    "the last endpoint in is never ejected".to_string()
                } else {
                    format!(
                        "max_ejection_percent {} allows {allowed}",
                        od.max_ejection_percent
                    )
                };
                warn!(service = %self.service, endpoint = %e.addr, reason,
                      "outlier detection: not ejecting, {out} of {n} endpoints are out already and {why}");
            }
            return None;
        }
        self.held_back.store(false, Ordering::Release);
        // The multiplier drops by one for every interval the endpoint stayed in.
        let interval = od.interval.as_millis().max(1) as u64;
        let stayed = now.saturating_sub(e.returned_at.load(Ordering::Acquire)) / interval;
        let times = e
            .ejections
            .load(Ordering::Acquire)
            .saturating_sub(u32::try_from(stayed).unwrap_or(u32::MAX))
            + 1;
        e.ejections.store(times, Ordering::Release);
        let time = (od.base_ejection_time.saturating_mul(times)).min(od.max_ejection_time);
        let until = now.saturating_add(time.as_millis().max(1) as u64);
        e.ejected_until.store(until, Ordering::Release);
        self.ejected.fetch_add(1, Ordering::AcqRel);
        warn!(service = %self.service, endpoint = %e.addr, reason, ejection = times,
              "outlier detection: endpoint ejected for {}", weir_config::duration::format(time));
        Some(time)
    }

    /// Records an active health check of `e`. Returns the new state when it changed.
    pub fn record_check(&self, e: &Endpoint, passed: bool, hc: &HealthCheck) -> Option<bool> {
        let healthy = e.is_healthy();
        if passed == healthy {
            e.health_streak.store(0, Ordering::Relaxed);
            return None;
        }
        let streak = e.health_streak.fetch_add(1, Ordering::AcqRel) + 1;
        let threshold = if healthy {
            hc.unhealthy_threshold
        } else {
            hc.healthy_threshold
        };
        if streak < threshold {
            return None;
        }
        e.health_streak.store(0, Ordering::Relaxed);
        e.healthy.store(passed, Ordering::Release);
        let state = if passed { "healthy" } else { "unhealthy" };
        warn!(service = %self.service, endpoint = %e.addr, checks = streak,
              "health check: endpoint is {state}");
        Some(passed)
    }

    /// Every endpoint's state now.
    pub fn statuses(&self) -> Vec<EndpointStatus> {
        let now = self.now_ms();
        self.set
            .load()
            .endpoints
            .iter()
            .map(|e| {
                let ejected = self.still_ejected(e, now);
                let state = match (e.is_healthy(), ejected) {
                    (false, _) => "unhealthy",
                    (true, true) => "ejected",
                    (true, false) => "healthy",
                };
                EndpointStatus {
                    address: e.addr,
                    state,
                    active_requests: e.active(),
                    ejections: e.ejections.load(Ordering::Acquire),
                    returns_in_ms: ejected
                        .then(|| e.ejected_until.load(Ordering::Acquire).saturating_sub(now)),
                }
            })
            .collect()
    }

    /// Milliseconds since this balancer was made, never 0 (0 means "not ejected").
    fn now_ms(&self) -> u64 {
        Instant::now().duration_since(self.epoch).as_millis() as u64 + 1
    }
}

impl EndpointSet {
    /// The set for `addrs`, reusing the `Endpoint`s (and their state) of `old` that stay.
    fn new(kind: &LoadBalancer, addrs: &[SocketAddr], old: &[Arc<Endpoint>]) -> EndpointSet {
        let endpoints: Vec<Arc<Endpoint>> = addrs
            .iter()
            .map(|a| {
                old.iter()
                    .find(|e| e.addr == *a)
                    .cloned()
                    .unwrap_or_else(|| Arc::new(Endpoint::new(*a)))
            })
            .collect();
        let ring = matches!(kind, LoadBalancer::ConsistentHash(_)).then(|| {
            let buckets: Vec<Bucket> = addrs.iter().map(|e| Bucket::new(*e, 1)).collect();
            let index = addrs.iter().enumerate().map(|(i, a)| (*a, i)).collect();
            (Continuum::new(&buckets), index)
        });
        EndpointSet { endpoints, ring }
    }
}

/// How far along the ring to look for an endpoint that is in: far enough to pass every
/// endpoint's 160 points.
fn ring_len(n: usize) -> usize {
    n * 160
}

fn ejected_at(e: &Endpoint, now: u64) -> bool {
    let until = e.ejected_until.load(Ordering::Acquire);
    until != 0 && now < until
}
