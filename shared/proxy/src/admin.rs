//! The admin listener (DESIGN.md §4): `/live`, `/ready`, `/config`, `/metrics`,
//! `/endpoints` (every endpoint's state: healthy, ejected or unhealthy) and
//! `POST /shutdown`.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use http::{Method, Response, StatusCode};
use pingora_core::apps::{HttpPersistentSettings, HttpServerApp, ReusedHttpStream};
use pingora_core::protocols::http::ServerSession;
use pingora_core::server::{ListenFds, ShutdownWatch};
use pingora_core::services::listening;
use tokio::sync::Notify;
use tracing::{info, warn};

use crate::reload::Reloader;

pub struct Admin {
    reloader: Arc<Reloader>,
    /// The proxy's listeners; ready means every one of them accepts connections.
    listeners: Vec<(String, SocketAddr)>,
    /// Told by `POST /shutdown`, once its answer is sent: the server then drains as on SIGTERM.
    shutdown: Arc<Notify>,
    /// Set when the drain begins; `/ready` then answers 503.
    draining: Arc<AtomicBool>,
}

impl Admin {
    pub fn new(
        reloader: Arc<Reloader>,
        listeners: Vec<(String, SocketAddr)>,
        shutdown: Arc<Notify>,
    ) -> Admin {
        Admin {
            reloader,
            listeners,
            shutdown,
            draining: Arc::default(),
        }
    }

    /// The Prometheus text, with the gauges that are read from the snapshot at scrape time
    /// (so the request path pays nothing for them) brought up to date first.
    fn metrics(&self) -> String {
        let metrics = weir_telemetry::metrics();
        let snapshot = self.reloader.snapshot();
        metrics.upstream_requests_active.reset();
        metrics.endpoints.reset();
        for (name, service) in &snapshot.services {
            let active = i64::try_from(service.requests.active()).unwrap_or(i64::MAX);
            metrics
                .upstream_requests_active
                .with_label_values(&[name.as_str()])
                .set(active);
            let statuses = service.balancer.statuses();
            for state in ["healthy", "ejected", "unhealthy"] {
                let n = statuses.iter().filter(|s| s.state == state).count();
                metrics
                    .endpoints
                    .with_label_values(&[name.as_str(), state])
                    .set(i64::try_from(n).unwrap_or(i64::MAX));
            }
        }
        metrics.render()
    }

    /// `None` when every listener accepts a connection, else the first that does not.
    async fn not_ready(&self) -> Option<String> {
        for (name, addr) in &self.listeners {
            let target = reachable(*addr);
            let connect = async {
                let socket = match target {
                    SocketAddr::V4(_) => tokio::net::TcpSocket::new_v4()?,
                    SocketAddr::V6(_) => tokio::net::TcpSocket::new_v6()?,
                };
                socket.bind(SocketAddr::new(target.ip(), 0))?;
                probing_from(socket.local_addr()?.port());
                socket.connect(target).await
            };
            match tokio::time::timeout(Duration::from_secs(1), connect).await {
                Ok(Ok(_)) => {}
                _ => {
                    return Some(format!(
                        "listener {name:?} ({addr}) is not accepting connections"
                    ))
                }
            }
        }
        None
    }
}

/// What a request to the admin listener asks for.
enum Ask {
    Answer(Response<Vec<u8>>),
    /// `POST /shutdown` from this host: answered, then the drain begins.
    Shutdown,
}

impl Admin {
    async fn ask(&self, session: &ServerSession) -> Ask {
        let req = session.req_header();
        // HEAD is GET without the body (RFC 9110 §9.3.2), which Pingora leaves out.
        let method = match req.method {
            Method::HEAD => &Method::GET,
            ref other => other,
        };
        let answer = match (method, req.uri.path()) {
            (&Method::GET, "/live") => text(StatusCode::OK, "live\n".into()),
            (&Method::GET, "/ready") if self.draining.load(Ordering::Relaxed) => text(
                StatusCode::SERVICE_UNAVAILABLE,
                "not ready: draining\n".into(),
            ),
            (&Method::GET, "/ready") => match self.not_ready().await {
                None => text(StatusCode::OK, "ready\n".into()),
                Some(why) => text(
                    StatusCode::SERVICE_UNAVAILABLE,
                    format!("not ready: {why}\n"),
                ),
            },
            (&Method::GET, "/config") => {
                let mut body =
                    serde_json::to_vec_pretty(&self.reloader.status()).unwrap_or_default();
                body.push(b'\n');
                reply(StatusCode::OK, "application/json", body)
            }
            (&Method::GET, "/endpoints") => {
                let snapshot = self.reloader.snapshot();
                let endpoints: std::collections::BTreeMap<_, _> = snapshot
                    .services
                    .iter()
                    .map(|(name, s)| (name, s.balancer.statuses()))
                    .collect();
                let mut body = serde_json::to_vec_pretty(&endpoints).unwrap_or_default();
                body.push(b'\n');
                reply(StatusCode::OK, "application/json", body)
            }
            (&Method::GET, "/metrics") => reply(
                StatusCode::OK,
                "text/plain; version=0.0.4; charset=utf-8",
                self.metrics().into_bytes(),
            ),
            (&Method::POST, "/shutdown") => {
                let client = session.client_addr().and_then(|a| a.as_inet()).copied();
                // Canonical: on a dual-stack [::] listener, 127.0.0.1 comes as ::ffff:127.0.0.1.
                if client.is_some_and(|c| c.ip().to_canonical().is_loopback()) {
                    return Ask::Shutdown;
                }
                // Admin may listen beyond loopback for /metrics; stopping stays local.
                warn!(?client, "POST /shutdown refused: not from this host");
                text(
                    StatusCode::FORBIDDEN,
                    "shutdown is for callers on this host only\n".into(),
                )
            }
            // A known path asked with another method: 405 and the one it takes (RFC 9110 §15.5.6).
            (_, "/live" | "/ready" | "/config" | "/endpoints" | "/metrics") => allow("GET, HEAD"),
            (_, "/shutdown") => allow("POST"),
            _ => text(
                StatusCode::NOT_FOUND,
                "not found; try GET /live, /ready, /config, /endpoints, /metrics or POST /shutdown\n"
                    .into(),
            ),
        };
        Ask::Answer(answer)
    }
}

/// The admin listener as a Pingora service that stays open through a drain, as Envoy's admin
/// does: `/metrics` can still be scraped and `/ready` answers 503 until the process ends. An
/// upgrade (SIGQUIT, `upgrading` set) closes it at once, so the new process answers alone.
pub struct AdminService {
    inner: listening::Service<Admin>,
    draining: Arc<AtomicBool>,
    upgrading: Arc<AtomicBool>,
}

impl AdminService {
    pub fn new(admin: Admin, listen: SocketAddr, upgrading: Arc<AtomicBool>) -> AdminService {
        let draining = admin.draining.clone();
        let mut inner = listening::Service::new("weir-admin".to_string(), admin);
        inner.add_tcp(&listen.to_string());
        inner.threads = Some(1);
        AdminService {
            inner,
            draining,
            upgrading,
        }
    }
}

#[async_trait]
impl pingora_core::services::Service for AdminService {
    async fn start_service(
        &mut self,
        fds: Option<ListenFds>,
        mut shutdown: ShutdownWatch,
        listeners_per_fd: usize,
    ) {
        // The listener follows this watch instead of the server's.
        let (close, closed) = tokio::sync::watch::channel(false);
        let (draining, upgrading) = (self.draining.clone(), self.upgrading.clone());
        tokio::spawn(async move {
            let _ = shutdown.wait_for(|&down| down).await;
            draining.store(true, Ordering::Relaxed);
            if upgrading.load(Ordering::Relaxed) {
                let _ = close.send(true);
            }
            // Holds `close`: were it dropped, the listener would take that as a shutdown.
            std::future::pending::<()>().await
        });
        self.inner
            .start_service(fds, closed, listeners_per_fd)
            .await;
    }

    fn name(&self) -> &str {
        self.inner.name()
    }

    fn threads(&self) -> Option<usize> {
        self.inner.threads()
    }

    fn listen_addresses(&self) -> Option<Vec<String>> {
        self.inner.listen_addresses()
    }
}

/// Pingora's `ServeHttp`, plus one step after the answer is sent: a shutdown starts only then,
/// so its caller always gets its answer before the process ends.
#[async_trait]
impl HttpServerApp for Admin {
    async fn process_new_http(
        self: &Arc<Self>,
        mut http: ServerSession,
        shutdown: &ShutdownWatch,
    ) -> Option<ReusedHttpStream> {
        if !matches!(http.read_request().await, Ok(true)) {
            return None;
        }
        let (answer, stop) = match self.ask(&http).await {
            Ask::Answer(answer) => (answer, false),
            Ask::Shutdown => (text(StatusCode::ACCEPTED, "draining\n".into()), true),
        };
        let closing = stop || *shutdown.borrow();
        http.set_keepalive(if closing { None } else { Some(60) });
        let (parts, body) = answer.into_parts();
        let written = match http.write_response_header(Box::new(parts.into())).await {
            Ok(()) => http.write_response_body(body.into(), true).await.map(drop),
            Err(e) => Err(e),
        };
        if let Err(e) = written {
            warn!("admin: cannot answer {}: {e}", http.request_summary());
        }
        let settings = HttpPersistentSettings::for_session(&http);
        let reused = http.finish().await.ok().flatten();
        if stop {
            info!("POST /shutdown: draining");
            self.shutdown.notify_one();
            return None;
        }
        reused.map(|s| ReusedHttpStream::from_reusable_stream(s, settings))
    }
}

/// The local ports of `/ready`'s recent probes, with when each was made: a probe of a full
/// listener is closed on arrival like any connection over `max_connections`, but it is no
/// client turned away. The listener takes it after the probe is done, so a port is kept a
/// while (the kernel does not give it to another connection that soon).
static PROBES: std::sync::Mutex<Vec<(u16, std::time::Instant)>> = std::sync::Mutex::new(Vec::new());

/// How long a probe's port is known as one.
const PROBE_KEPT: Duration = Duration::from_secs(10);

/// Whether a connection from this port is `/ready`'s.
pub(crate) fn is_probe(port: u16) -> bool {
    let probes = PROBES.lock().unwrap_or_else(|e| e.into_inner());
    (probes.iter()).any(|(p, at)| *p == port && at.elapsed() < PROBE_KEPT)
}

fn probing_from(port: u16) {
    let mut probes = PROBES.lock().unwrap_or_else(|e| e.into_inner());
    probes.retain(|(_, at)| at.elapsed() < PROBE_KEPT);
    probes.push((port, std::time::Instant::now()));
}

/// A listener bound to 0.0.0.0 or [::] is probed on loopback.
pub(crate) fn reachable(addr: SocketAddr) -> SocketAddr {
    match addr.ip() {
        IpAddr::V4(ip) if ip.is_unspecified() => {
            SocketAddr::new(Ipv4Addr::LOCALHOST.into(), addr.port())
        }
        IpAddr::V6(ip) if ip.is_unspecified() => {
            SocketAddr::new(Ipv6Addr::LOCALHOST.into(), addr.port())
        }
        _ => addr,
    }
}

fn allow(method: &'static str) -> Response<Vec<u8>> {
    let mut resp = text(
        StatusCode::METHOD_NOT_ALLOWED,
        format!("method not allowed; this path takes {method}\n"),
    );
    let allow = http::HeaderValue::from_static(method);
    resp.headers_mut().insert(http::header::ALLOW, allow);
    resp
}

fn text(status: StatusCode, body: String) -> Response<Vec<u8>> {
    reply(status, "text/plain; charset=utf-8", body.into_bytes())
}

fn reply(status: StatusCode, content_type: &str, body: Vec<u8>) -> Response<Vec<u8>> {
    let mut resp = Response::new(body);
    *resp.status_mut() = status;
    if let Ok(v) = content_type.parse() {
        resp.headers_mut().insert(http::header::CONTENT_TYPE, v);
    }
    let len = resp.body().len();
    resp.headers_mut()
        .insert(http::header::CONTENT_LENGTH, len.into());
    resp
}
