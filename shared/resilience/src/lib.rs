//! weir-resilience: how a request picks an endpoint and what it does when that fails.
//!
//! - [`balancer`]: round robin, random, least request and consistent hash (a ketama ring,
//!   Pingora's own `pingora-ketama`) over the endpoints that are in; outlier ejection and
//!   health state per endpoint ([`endpoint`]);
//! - [`retry`]: retry conditions, backoff with full jitter, the per-service budget;
//! - [`limiter`]: circuit breaking on requests and connections.
//!
//! No I/O: the proxy runs the health checks and DNS lookups and reports here. Time is
//! `tokio::time::Instant`, so unit tests run on a paused clock.

pub mod balancer;
pub mod endpoint;
pub mod limiter;
pub mod retry;

pub use balancer::{Balancer, EndpointStatus, TryResult};
pub use endpoint::{Active, Endpoint};
pub use limiter::{ConnectionGate, Limiter, Overflow, Permit};
pub use retry::{Failure, RetryBudget};

use weir_config::{HashOn, LoadBalancer, Service};

/// What a consistent-hash service hashes on, if it is one.
pub fn hash_on(service: &Service) -> Option<&HashOn> {
    match &service.load_balancer {
        LoadBalancer::ConsistentHash(on) => Some(on),
        _ => None,
    }
}

/// The value of cookie `name` in a `Cookie` header.
pub fn cookie<'a>(header: &'a str, name: &str) -> Option<&'a str> {
    header.split(';').find_map(|pair| {
        let (k, v) = pair.trim().split_once('=')?;
        (k == name).then_some(v)
    })
}

/// A well-mixed 64-bit hash of a key (FNV-1a, then the splitmix64 finalizer), to turn a
/// sticky key into a split roll: the same user always gets the same roll.
pub fn roll(key: &[u8]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in key {
        h = (h ^ u64::from(*b)).wrapping_mul(0x0100_0000_01b3);
    }
    h = (h ^ (h >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    h = (h ^ (h >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    h ^ (h >> 31)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;
    use std::net::SocketAddr;
    use std::sync::atomic::Ordering;
    use std::time::Duration;
    use weir_config::{HealthCheck, OutlierDetection};

    pub(crate) fn service(n: usize, lb: LoadBalancer) -> Service {
        let endpoints = (0..n)
            .map(|i| SocketAddr::from(([10, 0, 0, i as u8 + 1], 80)))
            .collect();
        Service {
            name: "s".into(),
            endpoints,
            dns: None,
            load_balancer: lb,
            protocol: weir_config::UpstreamProtocol::Http1,
            connection_pool: Default::default(),
            outlier_detection: None,
            health_check: None,
            tls: None,
            proxy_protocol: None,
        }
    }

    fn hashed(n: usize) -> Balancer {
        Balancer::new(&service(n, LoadBalancer::ConsistentHash(HashOn::SourceIp)))
    }

    #[test]
    fn round_robin_visits_every_endpoint_in_turn() {
        let b = Balancer::new(&service(3, LoadBalancer::RoundRobin));
        let picks: Vec<_> = (0..6)
            .map(|_| b.pick(None, None).unwrap().addr.ip().to_string())
            .collect();
        assert_eq!(
            picks,
            ["10.0.0.1", "10.0.0.2", "10.0.0.3", "10.0.0.1", "10.0.0.2", "10.0.0.3"]
        );
    }

    /// Endpoints that are out leave their turns evenly to the others: the third of three
    /// (handing a turn to the next in the list would give the first two thirds) and the
    /// second and fourth of four (a turn handed by the counter modulo the count of those
    /// in would go to the third every time).
    #[test]
    fn the_turns_of_endpoints_that_are_out_are_spread_evenly() {
        for (n, out) in [(3, &[2][..]), (4, &[1, 3][..])] {
            for lb in [LoadBalancer::RoundRobin, LoadBalancer::Random] {
                let b = Balancer::new(&service(n, lb.clone()));
                for &i in out {
                    b.endpoints().endpoints[i]
                        .healthy
                        .store(false, Ordering::Release);
                }
                let mut hits = HashMap::<String, usize>::new();
                for _ in 0..4000 {
                    let ip = b.pick(None, None).unwrap().addr.ip().to_string();
                    *hits.entry(ip).or_default() += 1;
                }
                let hit = |ip: &str| hits.get(ip).copied().unwrap_or(0);
                let (first, other) = (hit("10.0.0.1"), hit("10.0.0.2") + hit("10.0.0.3"));
                assert_eq!((hits.len(), first + other), (2, 4000), "{lb:?}: {hits:?}");
                assert!(first.abs_diff(4000 / 2) < 150, "{lb:?} {out:?}: {hits:?}");
            }
        }
    }

    #[test]
    fn a_key_always_gets_the_same_endpoint() {
        let b = hashed(5);
        for user in 0..200 {
            let key = format!("user-{user}");
            let first = b.pick(Some(key.as_bytes()), None).unwrap().addr;
            assert!((0..5).all(|_| b.pick(Some(key.as_bytes()), None).unwrap().addr == first));
        }
    }

    /// Adding an endpoint to n moves about 1/(n+1) of the keys, and only to the new one.
    #[test]
    fn adding_an_endpoint_moves_about_one_nth_of_the_keys() {
        for n in [2, 4, 9, 19] {
            let (before, after) = (hashed(n), hashed(n + 1));
            let keys: Vec<String> = (0..20_000).map(|k| format!("user-{k}")).collect();
            let mut moved = 0;
            for key in &keys {
                let (a, b) = (
                    before.pick(Some(key.as_bytes()), None).unwrap().addr,
                    after.pick(Some(key.as_bytes()), None).unwrap().addr,
                );
                if a != b {
                    assert_eq!(
                        b.ip().to_string(),
                        format!("10.0.0.{}", n + 1),
                        "moved only to the new endpoint"
                    );
                    moved += 1;
                }
            }
            let share = moved as f64 / keys.len() as f64;
            let ideal = 1.0 / (n + 1) as f64;
            println!(
                "{n} -> {} endpoints: {:.1}% of keys moved (ideal {:.1}%)",
                n + 1,
                share * 100.0,
                ideal * 100.0
            );
            assert!(
                (ideal * 0.6..ideal * 1.4).contains(&share),
                "{n}: moved {share}, ideal {ideal}"
            );
        }
    }

    fn with_outliers(n: usize, od: OutlierDetection) -> Balancer {
        let mut s = service(n, LoadBalancer::RoundRobin);
        s.outlier_detection = Some(od);
        Balancer::new(&s)
    }

    fn states(b: &Balancer) -> Vec<&'static str> {
        b.statuses().iter().map(|s| s.state).collect()
    }

    #[tokio::test(start_paused = true)]
    async fn consecutive_5xx_eject_for_base_time_times_ejections() {
        let od = OutlierDetection {
            consecutive_5xx: 3,
            base_ejection_time: Duration::from_secs(30),
            max_ejection_time: Duration::from_secs(50),
            max_ejection_percent: 50,
            ..OutlierDetection::default()
        };
        let b = with_outliers(2, od);
        let bad = b.endpoints().endpoints[0].clone();
        assert_eq!(b.report(&bad, TryResult::Status(500)), None);
        assert_eq!(
            b.report(&bad, TryResult::Status(200)),
            None,
            "a success resets"
        );
        assert_eq!(b.report(&bad, TryResult::Status(500)), None);
        assert_eq!(b.report(&bad, TryResult::Status(502)), None);
        assert_eq!(
            b.report(&bad, TryResult::NoResponse),
            Some(Duration::from_secs(30))
        );
        assert_eq!(states(&b), ["ejected", "healthy"]);
        assert!((0..10).all(|_| b.pick(None, None).unwrap().addr != bad.addr));
        tokio::time::advance(Duration::from_secs(31)).await;
        assert_eq!(states(&b), ["healthy", "healthy"], "back after its time");
        for _ in 0..2 {
            b.report(&bad, TryResult::Status(503));
        }
        // The second ejection lasts 2 × 30 s, capped at max_ejection_time.
        assert_eq!(
            b.report(&bad, TryResult::Status(503)),
            Some(Duration::from_secs(50))
        );
    }

    #[tokio::test(start_paused = true)]
    async fn the_multiplier_decays_while_back_in_without_traffic() {
        let od = OutlierDetection {
            consecutive_5xx: 1,
            interval: Duration::from_secs(10),
            base_ejection_time: Duration::from_secs(30),
            max_ejection_time: Duration::from_secs(300),
            max_ejection_percent: 50,
            ..OutlierDetection::default()
        };
        let b = with_outliers(2, od);
        let bad = b.endpoints().endpoints[0].clone();
        let first = b.report(&bad, TryResult::Status(503));
        assert_eq!(first, Some(Duration::from_secs(30)));
        // Back in at 30 s; two intervals later, with no request meanwhile, the multiplier has
        // dropped from 1 by two (to no less than 0): the next ejection is the base time again.
        tokio::time::advance(Duration::from_secs(56)).await;
        let next = b.report(&bad, TryResult::Status(503));
        assert_eq!(next, Some(Duration::from_secs(30)));
    }

    #[tokio::test(start_paused = true)]
    async fn ejection_respects_max_percent_and_keeps_one_endpoint() {
        let od = OutlierDetection {
            consecutive_5xx: 1,
            max_ejection_percent: 50,
            ..OutlierDetection::default()
        };
        let b = with_outliers(4, od.clone());
        for e in b.endpoints().endpoints.iter() {
            b.report(e, TryResult::Status(500));
        }
        assert_eq!(states(&b).iter().filter(|s| **s == "ejected").count(), 2);
        let single = with_outliers(
            1,
            OutlierDetection {
                max_ejection_percent: 100,
                ..od
            },
        );
        let only = single.endpoints().endpoints[0].clone();
        assert_eq!(single.report(&only, TryResult::Status(500)), None);
        assert!(single.pick(None, None).is_some());
    }

    #[tokio::test(start_paused = true)]
    async fn health_checks_need_their_thresholds() {
        let hc = HealthCheck {
            path: "/healthz".into(),
            interval: Duration::from_secs(1),
            timeout: Duration::from_secs(1),
            healthy_threshold: 2,
            unhealthy_threshold: 3,
        };
        let b = Balancer::new(&service(2, LoadBalancer::RoundRobin));
        let e = b.endpoints().endpoints[0].clone();
        assert_eq!(b.record_check(&e, false, &hc), None);
        assert_eq!(b.record_check(&e, false, &hc), None);
        assert_eq!(b.record_check(&e, false, &hc), Some(false));
        assert_eq!(states(&b), ["unhealthy", "healthy"]);
        assert!((0..10).all(|_| b.pick(None, None).unwrap().addr != e.addr));
        assert_eq!(b.record_check(&e, true, &hc), None);
        assert_eq!(b.record_check(&e, true, &hc), Some(true));
        let other = b.endpoints().endpoints[1].clone();
        for _ in 0..3 {
            b.record_check(&e, false, &hc);
            b.record_check(&other, false, &hc);
        }
        assert!(b.pick(None, None).is_none(), "nothing healthy: UH");
    }

    #[test]
    fn a_retry_avoids_the_endpoint_that_failed() {
        for lb in [
            LoadBalancer::RoundRobin,
            LoadBalancer::Random,
            LoadBalancer::LeastRequest,
            LoadBalancer::ConsistentHash(HashOn::SourceIp),
        ] {
            let b = Balancer::new(&service(3, lb));
            let failed = b.pick(Some(b"user"), None).unwrap().addr;
            for _ in 0..20 {
                assert_ne!(b.pick(Some(b"user"), Some(failed)).unwrap().addr, failed);
            }
        }
        let one = Balancer::new(&service(1, LoadBalancer::RoundRobin));
        let only = one.pick(None, None).unwrap().addr;
        assert_eq!(one.pick(None, Some(only)).unwrap().addr, only);
    }

    #[test]
    fn least_request_prefers_the_less_busy_endpoint() {
        let b = Balancer::new(&service(2, LoadBalancer::LeastRequest));
        let busy = b.endpoints().endpoints[0].clone();
        let _held: Vec<_> = (0..5).map(|_| busy.begin()).collect();
        assert!((0..50).all(|_| b.pick(None, None).unwrap().addr != busy.addr));
    }

    #[test]
    fn dns_updates_keep_the_state_of_endpoints_that_stay() {
        let b = Balancer::new(&service(2, LoadBalancer::RoundRobin));
        let kept = b.endpoints().endpoints[1].clone();
        let _active = kept.begin();
        let new = SocketAddr::from(([10, 0, 0, 9], 80));
        assert!(b.set_endpoints(vec![new, kept.addr]));
        assert!(
            !b.set_endpoints(vec![kept.addr, new]),
            "same set, any order"
        );
        let set = b.endpoints();
        let again = set.endpoints.iter().find(|e| e.addr == kept.addr).unwrap();
        assert_eq!(again.active(), 1);
    }

    #[test]
    fn cookies_are_found_by_name() {
        assert_eq!(cookie("a=1; user=jason; b=2", "user"), Some("jason"));
        assert_eq!(cookie("username=x", "user"), None);
    }

    #[test]
    fn rolls_spread_evenly() {
        let low = (0..10_000)
            .filter(|i| roll(format!("user-{i}").as_bytes()) % 100 < 10)
            .count();
        assert!((800..1200).contains(&low), "{low}");
    }
}
