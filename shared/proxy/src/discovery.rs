//! Per-service background work: active health checks (`service.health_check`) and DNS
//! discovery (`service.dns`). Each runs as one task per service, started once for a service's
//! state and ended when that state is dropped (the service was changed or removed by a
//! reload), so an unchanged service keeps checking and resolving across reloads.

use std::future::Future;
use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Weak};
use std::time::Duration;

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
use crate::tls::{upstream_peer, UpstreamPeerTls};

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
                let (connector, path) = (self.connector.clone(), hc.path.clone());
                let idle = service.config.connection_pool.idle_timeout;
                let (tls, protocol) = (service.tls.clone(), service.config.protocol);
                let probe = move |addr| {
                    let peer = upstream_peer(tls.as_deref(), protocol, addr);
                    check(
                        connector.clone(),
                        peer,
                        tls.clone(),
                        addr,
                        path.clone(),
                        idle,
                    )
                };
                tokio::spawn(health_checks(Arc::downgrade(service), hc.clone(), probe));
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
/// A probe that has not answered within `timeout` failed.
async fn health_checks<P, F>(service: Weak<ServiceState>, hc: HealthCheck, probe: P)
where
    P: Fn(SocketAddr) -> F,
    F: Future<Output = bool> + Send + 'static,
{
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
            let check = tokio::time::timeout(hc.timeout, probe(e.addr));
            checks.spawn(Box::pin(
                async move { (i, matches!(check.await, Ok(true))) },
            ));
        }
        while let Some(Ok((i, passed))) = checks.join_next().await {
            state.balancer.record_check(&set.endpoints[i], passed, &hc);
        }
    }
}

/// One check: `GET path` answered with a 2xx (the caller bounds the time).
async fn check(
    connector: Arc<Connector>,
    peer: HttpPeer,
    tls: Option<Arc<UpstreamPeerTls>>,
    addr: SocketAddr,
    path: String,
    idle: Duration,
) -> bool {
    let Ok(mut req) = RequestHeader::build("GET", path.as_bytes(), None) else {
        return false;
    };
    // Over TLS the service's name, which its certificate and virtual hosts go by.
    let host = match peer.sni.as_str() {
        "" => addr.to_string(),
        sni => sni.to_string(),
    };
    let _ = req.insert_header("host", host);
    let _ = req.insert_header("user-agent", "weir-health-check");
    let to = Target {
        peer: &peer,
        tls: tls.as_deref(),
        addr,
    };
    matches!(exchange(&connector, to, req, idle).await, Ok(200..=299))
}

/// Where a health check goes.
struct Target<'a> {
    peer: &'a HttpPeer,
    tls: Option<&'a UpstreamPeerTls>,
    addr: SocketAddr,
}

/// Sends `header` on a connection from the pool, reads the answer to the end and gives the
/// connection back; returns the answer's status.
async fn exchange(
    connector: &Connector,
    to: Target<'_>,
    mut header: RequestHeader,
    idle_timeout: Duration,
) -> pingora_error::Result<u16> {
    let peer = to.peer;
    let (mut session, _reused) = connector.get_http_session(peer).await?;
    if let Some(tls) = to.tls {
        let ssl = session.digest().and_then(|d| d.ssl_digest.as_deref());
        tls.check_identity(to.addr, ssl).await?;
    }
    if session.as_http2().is_some() {
        // As Pingora's proxy sends it: the authority and scheme in the URI (its h2 client would
        // say `https` even over h2c), and no Host, which nginx refuses beside :authority.
        header.set_uri(h2_uri(&header, to.tls.is_some())?);
        header.remove_header("host");
    }
    session.write_request_header(Box::new(header)).await?;
    session.finish_request_body().await?;
    session.read_response_header().await?;
    let status = session.response_header().map_or(0, |h| h.status.as_u16());
    while session.read_response_body().await?.is_some() {}
    connector
        .release_http_session(session, peer, Some(idle_timeout))
        .await;
    Ok(status)
}

/// The absolute URI of an HTTP/2 request: its scheme, `Host` as the authority, its path.
fn h2_uri(header: &RequestHeader, tls: bool) -> pingora_error::Result<http::Uri> {
    use pingora_error::{ErrorType, OrErr};
    let host = header
        .headers
        .get("host")
        .map_or(&b""[..], |h| h.as_bytes());
    let path = header.uri.path_and_query().map_or("/", |p| p.as_str());
    http::Uri::builder()
        .scheme(if tls { "https" } else { "http" })
        .authority(host)
        .path_and_query(path)
        .build()
        .or_err(ErrorType::InvalidHTTPHeader, "health check URI")
}

/// Resolves `dns` again whenever its answer expires. An answer that the name has no address
/// (NXDOMAIN, or no A or AAAA record) empties the set, as Envoy's strict DNS does: a
/// Kubernetes headless service with no ready pod says so, and its pods' addresses go to other
/// pods. A lookup that fails (no answer, SERVFAIL) keeps the last good set.
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
            Err(e) if e.is_no_records_found() => {
                if state.balancer.set_endpoints(Vec::new()) {
                    warn!(service = %name, dns = %dns.name, "dns: the name has no address now; no endpoints");
                }
                RETRY_LOOKUP
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

#[cfg(test)]
mod tests {
    use std::collections::HashMap;
    use std::sync::Mutex;

    use tokio::time::{sleep_until, Instant};

    use super::*;

    #[derive(Clone, Copy)]
    enum Probe {
        Pass,
        Fail,
        Hang,
    }

    fn service() -> Arc<ServiceState> {
        let toml = r#"
            [[service]]
            name = "api"
            endpoints = ["127.0.0.1:1", "127.0.0.1:2", "127.0.0.1:3"]
            [service.health_check]
            path = "/healthz"
            interval = "5s"
            timeout = "1s"
            healthy_threshold = 2
            unhealthy_threshold = 3
        "#;
        let loaded = weir_config::parse("hc.toml", toml, weir_config::Role::Gateway).unwrap();
        Arc::new(ServiceState::new(&loaded.config.services[0]))
    }

    fn state(service: &ServiceState, port: u16) -> &'static str {
        let statuses = service.balancer.statuses();
        statuses
            .iter()
            .find(|s| s.address.port() == port)
            .unwrap()
            .state
    }

    /// With checks every 5 s, a 1 s timeout and thresholds 3 down / 2 up: an endpoint that
    /// starts failing at 0 s is out after the third check (10 s), one that hangs after the
    /// third check's timeout (11 s), and a recovered one is back after two passes.
    #[tokio::test(start_paused = true)]
    async fn health_check_timing() {
        let service = service();
        let hc = service.config.health_check.clone().unwrap();
        let behaviour: Arc<Mutex<HashMap<u16, Probe>>> = Arc::new(Mutex::new(HashMap::from([
            (1, Probe::Fail),
            (2, Probe::Pass),
            (3, Probe::Hang),
        ])));
        let probes = behaviour.clone();
        let probe = move |addr: SocketAddr| {
            let b = probes.lock().unwrap()[&addr.port()];
            async move {
                match b {
                    Probe::Pass => true,
                    Probe::Fail => false,
                    Probe::Hang => std::future::pending().await,
                }
            }
        };
        let start = Instant::now();
        let task = tokio::spawn(health_checks(Arc::downgrade(&service), hc, probe));
        let at = |ms: u64| sleep_until(start + Duration::from_millis(ms));

        at(9_900).await;
        assert_eq!(
            state(&service, 1),
            "healthy",
            "two failed checks are not enough"
        );
        at(10_100).await;
        assert_eq!(
            state(&service, 1),
            "unhealthy",
            "out after the third, at 10 s"
        );
        assert_eq!(
            state(&service, 3),
            "healthy",
            "the third hung check has not timed out"
        );
        at(11_100).await;
        assert_eq!(
            state(&service, 3),
            "unhealthy",
            "out when the third check timed out"
        );
        assert_eq!(state(&service, 2), "healthy");

        behaviour.lock().unwrap().insert(1, Probe::Pass);
        at(15_100).await;
        assert_eq!(state(&service, 1), "unhealthy", "one pass is not enough");
        at(20_100).await;
        assert_eq!(
            state(&service, 1),
            "healthy",
            "back after the second pass, at 20 s"
        );

        // The loop ends with its service.
        drop(service);
        at(25_100).await;
        assert!(task.is_finished());
    }
}
