//! The admin listener (DESIGN.md §4): `/live`, `/ready`, `/config`, `/metrics`, and
//! `/endpoints` (every endpoint's state: healthy, ejected or unhealthy).

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use http::{Response, StatusCode};
use pingora_core::apps::http_app::ServeHttp;
use pingora_core::protocols::http::ServerSession;

use crate::reload::Reloader;

pub struct Admin {
    reloader: Arc<Reloader>,
    /// The proxy's listeners; ready means every one of them accepts connections.
    listeners: Vec<(String, SocketAddr)>,
}

impl Admin {
    pub fn new(reloader: Arc<Reloader>, listeners: Vec<(String, SocketAddr)>) -> Admin {
        Admin {
            reloader,
            listeners,
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
            let connect = tokio::net::TcpStream::connect(target);
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

#[async_trait]
impl ServeHttp for Admin {
    async fn response(&self, session: &mut ServerSession) -> Response<Vec<u8>> {
        let req = session.req_header();
        let (method, path) = (req.method.as_str().to_string(), req.uri.path().to_string());
        match (method.as_str(), path.as_str()) {
            ("GET", "/live") => text(StatusCode::OK, "live\n".into()),
            ("GET", "/ready") => match self.not_ready().await {
                None => text(StatusCode::OK, "ready\n".into()),
                Some(why) => text(
                    StatusCode::SERVICE_UNAVAILABLE,
                    format!("not ready: {why}\n"),
                ),
            },
            ("GET", "/config") => {
                let mut body =
                    serde_json::to_vec_pretty(&self.reloader.status()).unwrap_or_default();
                body.push(b'\n');
                reply(StatusCode::OK, "application/json", body)
            }
            ("GET", "/endpoints") => {
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
            ("GET", "/metrics") => reply(
                StatusCode::OK,
                "text/plain; version=0.0.4; charset=utf-8",
                self.metrics().into_bytes(),
            ),
            _ => text(
                StatusCode::NOT_FOUND,
                "not found; try /live, /ready, /config, /endpoints or /metrics\n".into(),
            ),
        }
    }
}

/// A listener bound to 0.0.0.0 or [::] is probed on loopback.
fn reachable(addr: SocketAddr) -> SocketAddr {
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
