//! The compiled config that requests read: one immutable [`Snapshot`] per generation.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::AtomicBool;
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use pingora_core::upstreams::peer::HttpPeer;
use weir_config::{Action, Config, Loaded, Policy, Role, Service, TlsMode};
use weir_resilience::{Balancer, ConnectionGate, Limiter, RetryBudget};
use weir_routing::{CompiledRoute, RouteTable};
use weir_telemetry::metrics::RequestSeries;
use weir_tls::rustls::ClientConfig;
use weir_tls::CertificateTable;

use crate::mirror::Lanes;
use crate::tls::{upstream_peer, UpstreamPeerTls};

/// Everything a request needs, compiled once per reload and never mutated.
pub struct Snapshot {
    pub generation: u64,
    pub revision: String,
    /// The hash of the files' contents ([`weir_config::Loaded::contents`]).
    pub contents: String,
    /// RFC 3339 time of the load.
    pub loaded_at: String,
    pub config: Arc<Config>,
    /// The certificate, key and CA files the config names, watched like its own files.
    pub material: Vec<std::path::PathBuf>,
    /// Route table per listener name, in listener order (a handful: a scan beats hashing).
    pub tables: Vec<(String, RouteTable)>,
    pub services: HashMap<String, Arc<ServiceState>>,
    /// Per route, by [`CompiledRoute::order`]: the services it sends to, resolved here so a
    /// request looks up no names.
    pub routes: Vec<RouteServices>,
    /// The certificates of each https listener, by listener index (`None` for plain http);
    /// the listeners' TLS resolves each handshake's certificate here.
    pub certificates: Vec<Option<CertificateTable>>,
    /// The `proxy` label of the request metrics: "gateway", or the sidecar's "outbound"
    /// (and "inbound" for its route to the app).
    proxy: &'static str,
    /// The sidecar's route to the app, by [`CompiledRoute::order`].
    inbound: Option<usize>,
    /// The sidecar's TCP routes, by the original destinations they take (`destinations`).
    pub destinations: HashMap<SocketAddr, Arc<CompiledRoute>>,
    /// The request series of requests no route took (400, 404 `NR`): `proxy`'s, then the
    /// sidecar's inbound side's.
    unrouted: [OnceLock<RequestSeries>; 2],
    /// The sidecar's: requests no route took that went on to their original destination.
    passthrough: OnceLock<RequestSeries>,
}

/// The services of one route's backends (in backend order) and of its mirror.
pub struct RouteServices {
    pub backends: Vec<Arc<ServiceState>>,
    pub mirror: Option<Arc<ServiceState>>,
    /// The route's request series per backend, then one for requests that reached no service
    /// (a direct response, a fault's abort); each made at its first request, so a big config
    /// costs a pointer per slot until traffic comes.
    series: Vec<OnceLock<Box<RequestSeries>>>,
}

/// A service with the runtime state that outlives reloads while its definition is unchanged.
pub struct ServiceState {
    pub config: Service,
    pub balancer: Balancer,
    /// Requests in flight (mirror copies included) against `connection_pool.max_requests`.
    pub requests: Arc<Limiter>,
    /// Connections in use against `max_connections`, with the pending line.
    pub connections: ConnectionGate,
    pub budget: RetryBudget,
    /// The tasks that carry copies of requests mirrored to this service.
    pub mirror_lanes: Lanes,
    /// Whether this service's health checks and DNS lookups run (they start once, and stop
    /// when the service is dropped).
    pub tasks_started: AtomicBool,
    /// `[service.tls]` in Pingora's types; `None` = plaintext.
    pub tls: Option<Arc<UpstreamPeerTls>>,
    /// `[service.tls]` as a rustls config, for connections of `tcp` listeners; made at the
    /// first one.
    stream_tls: OnceLock<Result<Arc<ClientConfig>, String>>,
}

impl ServiceState {
    /// Fresh state: every endpoint in, nothing in flight, an empty budget.
    pub fn new(s: &Service) -> ServiceState {
        let tls = s
            .tls
            .as_ref()
            .map(|t| Arc::new(UpstreamPeerTls::new(t, s.connection_pool.connect_timeout)));
        ServiceState {
            config: s.clone(),
            balancer: Balancer::new(s),
            requests: Limiter::new(s.connection_pool.max_requests),
            connections: ConnectionGate::new(
                s.connection_pool.max_connections,
                s.connection_pool.max_pending_requests,
            ),
            budget: RetryBudget::default(),
            mirror_lanes: Lanes::new(&s.connection_pool, tls.clone()),
            tasks_started: AtomicBool::new(false),
            tls,
            stream_tls: OnceLock::new(),
        }
    }

    /// With `[service.tls]`, how a TCP connection (of a `tcp` listener, or captured)
    /// originates TLS: the service's CA (else the system's roots) and client certificate, the
    /// name checked `sni`; in mode mesh, the workload certificate, and the server's SPIFFE id
    /// checked against `identities`.
    pub fn stream_tls(&self) -> Option<Result<&Arc<ClientConfig>, &str>> {
        let tls = self.config.tls.as_ref()?;
        let made = self.stream_tls.get_or_init(|| {
            let roots = weir_tls::trusted(&tls.roots)?;
            match (tls.mode, &tls.client) {
                (TlsMode::Mesh, Some(workload)) => weir_tls::mesh::client_config(
                    workload,
                    roots,
                    &tls.identities,
                    &tls.trust_domains,
                ),
                (_, client) => Ok(Arc::new(weir_tls::client_config(roots, client.as_ref())?)),
            }
        });
        Some(made.as_ref().map_err(String::as_str))
    }

    /// The peer for a try to `addr`, with this service's TLS if it has any.
    pub fn peer(&self, addr: std::net::SocketAddr) -> HttpPeer {
        upstream_peer(self.tls.as_deref(), self.config.protocol, addr)
    }
}

/// The counters of what the config can make happen, each at 0 before its first event:
/// `increase()` over a series that appears with its first event misses that event (an
/// alert on the first ejection of a service would never fire).
fn start_counters(config: &weir_config::Config) {
    let metrics = weir_telemetry::metrics();
    for service in &config.services {
        if service.outlier_detection.is_some() {
            metrics
                .outlier_ejections
                .with_label_values(&[&service.name]);
        }
    }
    for route in &config.routes {
        if let Some(fault) = &route.fault {
            for (kind, set) in [
                ("delay", fault.delay.is_some()),
                ("abort", fault.abort.is_some()),
            ] {
                if set {
                    metrics
                        .faults_injected
                        .with_label_values(&[&route.name, kind]);
                }
            }
        }
        if let Some(mirror) = &route.mirror {
            crate::mirror::start_counters(&mirror.service);
        }
    }
    let policies = config.sidecar.iter().flat_map(|s| &s.inbound.policies);
    for policy in policies {
        let name = match policy.action {
            weir_config::PolicyAction::Deny => &policy.name,
            weir_config::PolicyAction::Allow => weir_config::NO_ALLOW,
        };
        metrics.authz_denied.with_label_values(&[name]);
    }
}

impl Snapshot {
    /// Compiles `loaded`, keeping the state of services whose definition did not change.
    pub fn compile(
        loaded: Loaded,
        role: Role,
        generation: u64,
        previous: Option<&Snapshot>,
    ) -> Snapshot {
        let config = loaded.config;
        let services: HashMap<String, Arc<ServiceState>> = config
            .services
            .iter()
            .map(|s| {
                let kept = previous
                    .and_then(|p| p.services.get(&s.name))
                    .filter(|old| old.config == *s)
                    .cloned();
                let state = kept.unwrap_or_else(|| Arc::new(ServiceState::new(s)));
                (s.name.clone(), state)
            })
            .collect();
        // Validation guarantees every name resolves. Were one missing, the route gets no
        // backends at all (its requests fail as `unknown service`) rather than a list whose
        // positions no longer match the split's weights.
        let routes = config
            .routes
            .iter()
            .map(|r| {
                let backends = match &r.action {
                    Action::Backends(b) => b
                        .iter()
                        .map(|b| services.get(&b.service).cloned())
                        .collect::<Option<Vec<_>>>()
                        .unwrap_or_default(),
                    _ => Vec::new(),
                };
                RouteServices {
                    series: (0..=backends.len()).map(|_| OnceLock::new()).collect(),
                    backends,
                    mirror: r
                        .mirror
                        .as_ref()
                        .and_then(|m| services.get(&m.service).cloned()),
                }
            })
            .collect();
        let tables = config
            .listeners
            .iter()
            .map(|l| (l.name.clone(), RouteTable::new(&config, &l.name)))
            .collect();
        let destinations = (config.routes.iter().enumerate())
            .flat_map(|(order, r)| {
                let route = Arc::new(CompiledRoute::new(r.clone(), order));
                r.destinations.iter().map(move |d| (*d, route.clone()))
            })
            .collect();
        let inbound = match role {
            Role::Gateway => None,
            Role::Sidecar => config.routes.iter().position(|r| r.name == "inbound"),
        };
        start_counters(&config);
        Snapshot {
            certificates: crate::tls::certificate_tables(&config),
            generation,
            revision: loaded.revision,
            contents: loaded.contents,
            loaded_at: chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Millis, true),
            config: Arc::new(config),
            material: loaded.material,
            tables,
            services,
            routes,
            proxy: match role {
                Role::Gateway => "gateway",
                Role::Sidecar => "outbound",
            },
            inbound,
            destinations,
            unrouted: Default::default(),
            passthrough: OnceLock::new(),
        }
    }

    /// The authorization policies `route` checks: the sidecar's `[[inbound.policy]]` on its
    /// route to the app; none elsewhere.
    pub fn policies_of(&self, route: &CompiledRoute) -> Option<&[Policy]> {
        let sidecar = self.config.sidecar.as_ref()?;
        (self.inbound == Some(route.order)).then_some(&sidecar.inbound.policies[..])
    }

    /// Counts a finished request in `weir_requests_total` and `weir_request_duration_seconds`
    /// under its route and the service it went to; `code` is 0 when none was sent.
    pub fn record_request(
        &self,
        listener: &str,
        route: Option<&CompiledRoute>,
        service: Option<&Arc<ServiceState>>,
        code: u16,
        flags: &'static str,
        took: Duration,
    ) {
        // Counted by the side that took the request, routed or not (a 400 on the inbound side
        // is the inbound side's).
        let inbound = self.inbound.is_some() && listener == "inbound";
        let proxy = if inbound { "inbound" } else { self.proxy };
        let Some(route) = route else {
            let series = self.unrouted[usize::from(inbound)]
                .get_or_init(|| RequestSeries::new(proxy, "", ""));
            return series.record(code, flags, took);
        };
        let services = self.services_of(route);
        let slot = match service {
            Some(s) => services.backends.iter().position(|b| Arc::ptr_eq(b, s)),
            None => Some(services.backends.len()),
        };
        let name = service.map_or("", |s| s.config.name.as_str());
        let new = || Box::new(RequestSeries::new(proxy, &route.config.name, name));
        match slot.and_then(|i| services.series.get(i)) {
            Some(series) => series.get_or_init(new).record(code, flags, took),
            // Not one of the route's backends in this snapshot: counted all the same.
            None => new().record(code, flags, took),
        }
    }

    /// A request that went on to its original destination (see `capture`).
    pub fn record_passthrough(&self, code: u16, flags: &'static str, took: Duration) {
        let series = (self.passthrough)
            .get_or_init(|| RequestSeries::new(self.proxy, "", crate::capture::PASSTHROUGH));
        series.record(code, flags, took);
    }

    pub fn table(&self, listener: &str) -> Option<&RouteTable> {
        self.tables
            .iter()
            .find(|(name, _)| name == listener)
            .map(|(_, t)| t)
    }

    /// The services `route` sends to.
    pub fn services_of(&self, route: &CompiledRoute) -> &RouteServices {
        static NONE: RouteServices = RouteServices {
            backends: Vec::new(),
            mirror: None,
            series: Vec::new(),
        };
        self.routes.get(route.order).unwrap_or(&NONE)
    }
}
