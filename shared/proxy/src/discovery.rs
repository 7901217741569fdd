//! Per-service background work: active health checks (`service.health_check`) and DNS
//! discovery (`service.dns`). Each runs as one task per service, started once for a service's
//! state and ended when that state is dropped (the service was changed or removed by a
//! reload), so an unchanged service keeps checking and resolving across reloads.

use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Weak};
use std::time::Duration;

use bytes::Bytes;
use hickory_resolver::config::{ConnectionConfig, NameServerConfig, ResolverConfig};
use hickory_resolver::net::runtime::TokioRuntimeProvider;
use hickory_resolver::TokioResolver;
use pingora_core::connectors::http::Connector;
use pingora_core::upstreams::peer::HttpPeer;
use pingora_http::RequestHeader;
use tokio::task::JoinSet;
use tracing::{error, info, warn};
use weir_config::{Dns, HealthCheck};

use crate::snapshot::{ServiceState, Snapshot};

/// Re-resolution bounds: a TTL of 0 does not spin, a long one still notices changes.
const MIN_TTL: Duration = Duration::from_secs(1);
const MAX_TTL: Duration = Duration::from_secs(300);
/// After a failed lookup (the last good endpoints stay).
const RETRY_LOOKUP: Duration = Duration::from_secs(2);

pub struct Discovery {
    connector: Arc<Connector>,
    resolver: Option<Arc<TokioResolver>>,
}

impl Discovery {
    /// `nameservers` empty: the system's resolver configuration.
    pub fn new(nameservers: &[SocketAddr]) -> Discovery {
        let resolver = match resolver(nameservers) {
            Ok(r) => Some(Arc::new(r)),
            Err(e) => {
                error!("no DNS resolver ({e}); services with dns = ... get no endpoints");
                None
            }
        };
        Discovery {
            connector: Arc::new(Connector::new(None)),
            resolver,
        }
    }

    /// Starts the tasks of every service of `snapshot` that has none running yet.
    pub fn start(&self, snapshot: &Snapshot) {
        for service in snapshot.services.values() {
            if service.tasks_started.swap(true, Ordering::AcqRel) {
                continue;
            }
            if let Some(hc) = &service.config.health_check {
                let task =
                    health_checks(self.connector.clone(), Arc::downgrade(service), hc.clone());
                tokio::spawn(task);
            }
            if let Some(dns) = &service.config.dns {
                let task = resolve(self.resolver.clone(), Arc::downgrade(service), dns.clone());
                tokio::spawn(task);
            }
        }
    }
}

fn resolver(nameservers: &[SocketAddr]) -> Result<TokioResolver, String> {
    let builder = if nameservers.is_empty() {
        TokioResolver::builder_tokio().map_err(|e| e.to_string())?
    } else {
        let servers = nameservers
            .iter()
            .map(|a| {
                let mut udp = ConnectionConfig::udp();
                udp.port = a.port();
                let mut tcp = ConnectionConfig::tcp();
                tcp.port = a.port();
                NameServerConfig::new(a.ip(), true, vec![udp, tcp])
            })
            .collect();
        let config = ResolverConfig::from_parts(None, vec![], servers);
        TokioResolver::builder_with_config(config, TokioRuntimeProvider::default())
    };
    builder.build().map_err(|e| e.to_string())
}

/// Checks every endpoint each `interval`, all at once, and feeds the results to the balancer.
async fn health_checks(connector: Arc<Connector>, service: Weak<ServiceState>, hc: HealthCheck) {
    let mut tick = tokio::time::interval(hc.interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        let Some(state) = service.upgrade() else {
            return;
        };
        let set = state.balancer.endpoints();
        let mut checks = JoinSet::new();
        for (i, e) in set.endpoints.iter().enumerate() {
            let (connector, hc, addr) = (connector.clone(), hc.clone(), e.addr);
            let idle = state.config.connection_pool.idle_timeout;
            checks.spawn(async move { (i, check(&connector, addr, &hc, idle).await) });
        }
        while let Some(Ok((i, passed))) = checks.join_next().await {
            state.balancer.record_check(&set.endpoints[i], passed, &hc);
        }
    }
}

/// One check: `GET path` answered with a 2xx within `timeout`.
async fn check(connector: &Connector, addr: SocketAddr, hc: &HealthCheck, idle: Duration) -> bool {
    let Ok(mut req) = RequestHeader::build("GET", hc.path.as_bytes(), None) else {
        return false;
    };
    let _ = req.insert_header("host", addr.to_string());
    let _ = req.insert_header("user-agent", "weir-health-check");
    let mut peer = HttpPeer::new(addr, false, String::new());
    peer.options.connection_timeout = Some(hc.timeout);
    let exchange = crate::client::exchange(connector, &peer, req, Bytes::new(), idle);
    matches!(
        tokio::time::timeout(hc.timeout, exchange).await,
        Ok(Ok(200..=299))
    )
}

/// Resolves `dns` again whenever its answer expires; a failed lookup keeps the last good set.
async fn resolve(resolver: Option<Arc<TokioResolver>>, service: Weak<ServiceState>, dns: Dns) {
    let Some(resolver) = resolver else {
        return;
    };
    loop {
        let lookup = resolver.lookup_ip(dns.name.as_str()).await;
        let Some(state) = service.upgrade() else {
            return;
        };
        let name = &state.config.name;
        let wait = match lookup {
            Ok(answer) => {
                let addrs: Vec<SocketAddr> = answer
                    .iter()
                    .map(|ip| SocketAddr::new(ip, dns.port))
                    .collect();
                if state.balancer.set_endpoints(addrs.clone()) {
                    info!(service = %name, dns = %dns.name, endpoints = ?addrs, "dns: endpoints changed");
                }
                answer
                    .valid_until()
                    .saturating_duration_since(std::time::Instant::now())
                    .clamp(MIN_TTL, MAX_TTL)
            }
            Err(e) => {
                warn!(service = %name, dns = %dns.name, "dns: lookup failed: {e}; keeping the last endpoints");
                RETRY_LOOKUP
            }
        };
        drop(state);
        tokio::time::sleep(wait).await;
    }
}
