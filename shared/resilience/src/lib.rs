//! weir-resilience: how a request picks an endpoint of a service.
//!
//! For now the load balancers of DESIGN.md §3 (round robin, random and consistent hash, a
//! ketama ring, Pingora's own `pingora-ketama`) and the concurrency [`Limiter`] of circuit
//! breaking. Retries, budgets and outlier detection will live here too.

mod limiter;
pub use limiter::{Limiter, Permit};

use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};

use pingora_ketama::{Bucket, Continuum};
use weir_config::{HashOn, LoadBalancer, Service};

/// The endpoint chooser of one service. Lock-free: an atomic counter or a read-only ring.
pub struct Balancer {
    endpoints: Vec<SocketAddr>,
    next: AtomicUsize,
    kind: Kind,
}

enum Kind {
    RoundRobin,
    Random,
    Ring(Continuum),
}

impl Balancer {
    pub fn new(service: &Service) -> Balancer {
        let kind = match &service.load_balancer {
            LoadBalancer::RoundRobin => Kind::RoundRobin,
            LoadBalancer::Random => Kind::Random,
            LoadBalancer::ConsistentHash(_) => Kind::Ring(ring(&service.endpoints)),
        };
        Balancer {
            endpoints: service.endpoints.clone(),
            next: AtomicUsize::new(0),
            kind,
        }
    }

    /// The endpoint for a request. `key` is the request's hash key (see [`hash_on`]); a
    /// consistent-hash service without one falls back to round robin, as Envoy falls back to
    /// a random pick.
    pub fn pick(&self, key: Option<&[u8]>) -> SocketAddr {
        match (&self.kind, key) {
            (Kind::Ring(ring), Some(key)) => ring.node(key).unwrap_or(self.endpoints[0]),
            (Kind::Random, _) => self.endpoints[fastrand::usize(..self.endpoints.len())],
            _ => self.endpoints[self.next.fetch_add(1, Ordering::Relaxed) % self.endpoints.len()],
        }
    }
}

fn ring(endpoints: &[SocketAddr]) -> Continuum {
    let buckets: Vec<Bucket> = endpoints.iter().map(|e| Bucket::new(*e, 1)).collect();
    Continuum::new(&buckets)
}

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

    fn service(n: usize, lb: LoadBalancer) -> Service {
        let endpoints = (0..n)
            .map(|i| SocketAddr::from(([10, 0, 0, i as u8 + 1], 80)))
            .collect();
        Service {
            name: "s".into(),
            endpoints,
            load_balancer: lb,
            connection_pool: Default::default(),
        }
    }

    fn hashed(n: usize) -> Balancer {
        Balancer::new(&service(n, LoadBalancer::ConsistentHash(HashOn::SourceIp)))
    }

    #[test]
    fn round_robin_visits_every_endpoint_in_turn() {
        let b = Balancer::new(&service(3, LoadBalancer::RoundRobin));
        let picks: Vec<_> = (0..6).map(|_| b.pick(None).ip().to_string()).collect();
        assert_eq!(
            picks,
            ["10.0.0.1", "10.0.0.2", "10.0.0.3", "10.0.0.1", "10.0.0.2", "10.0.0.3"]
        );
    }

    #[test]
    fn a_key_always_gets_the_same_endpoint() {
        let b = hashed(5);
        for user in 0..200 {
            let key = format!("user-{user}");
            let first = b.pick(Some(key.as_bytes()));
            assert!((0..5).all(|_| b.pick(Some(key.as_bytes())) == first));
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
                    before.pick(Some(key.as_bytes())),
                    after.pick(Some(key.as_bytes())),
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
