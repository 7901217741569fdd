//! The floor: a Pingora proxy that sends every request to one fixed peer and does nothing
//! else. Same allocator and runtime settings as weir-gateway, so the difference between the
//! two is Weir's own work.
//!
//! With `extras`, it also does the per-request work Weir does by default, written the plain
//! Pingora way: X-Forwarded-For, X-Forwarded-Proto and a new X-Request-Id upstream, the id
//! echoed in the response, and a 60 s idle timeout on pooled upstream connections. That is
//! the floor of a Pingora proxy with those features.
//!
//! Usage: bare-pingora LISTEN UPSTREAM [THREADS] [extras]

use std::cell::Cell;
use std::net::SocketAddr;
use std::time::Duration;

use async_trait::async_trait;
use pingora_core::server::configuration::{Opt, ServerConf};
use pingora_core::server::Server;
use pingora_core::upstreams::peer::HttpPeer;
use pingora_error::Result;
use pingora_http::{RequestHeader, ResponseHeader};
use pingora_proxy::{ProxyHttp, Session};

#[global_allocator]
static GLOBAL: weir_proxy::alloc::MiMalloc = weir_proxy::alloc::MiMalloc;

struct Bare {
    upstream: SocketAddr,
}

#[async_trait]
impl ProxyHttp for Bare {
    type CTX = ();

    fn new_ctx(&self) {}

    async fn upstream_peer(&self, _session: &mut Session, _ctx: &mut ()) -> Result<Box<HttpPeer>> {
        Ok(Box::new(HttpPeer::new(self.upstream, false, String::new())))
    }
}

struct BareWithExtras {
    upstream: SocketAddr,
}

#[async_trait]
impl ProxyHttp for BareWithExtras {
    /// The request id.
    type CTX = String;

    fn new_ctx(&self) -> String {
        String::new()
    }

    async fn request_filter(&self, _session: &mut Session, id: &mut String) -> Result<bool> {
        *id = uuid_v4();
        Ok(false)
    }

    async fn upstream_peer(
        &self,
        _session: &mut Session,
        _id: &mut String,
    ) -> Result<Box<HttpPeer>> {
        let mut peer = HttpPeer::new(self.upstream, false, String::new());
        peer.options.idle_timeout = Some(Duration::from_secs(60));
        Ok(Box::new(peer))
    }

    async fn upstream_request_filter(
        &self,
        session: &mut Session,
        upstream: &mut RequestHeader,
        id: &mut String,
    ) -> Result<()> {
        if let Some(client) = session.client_addr().and_then(|a| a.as_inet()) {
            upstream.append_header("x-forwarded-for", client.ip().to_string())?;
        }
        upstream.insert_header("x-forwarded-proto", "http")?;
        upstream.insert_header("x-request-id", id.as_str())
    }

    async fn response_filter(
        &self,
        _session: &mut Session,
        response: &mut ResponseHeader,
        id: &mut String,
    ) -> Result<()> {
        response.insert_header("x-request-id", id.as_str())
    }
}

/// A random UUID v4, from a per-thread xorshift (a stand-in for the `uuid` crate).
fn uuid_v4() -> String {
    thread_local!(static STATE: Cell<u64> = const { Cell::new(0x9E37_79B9_7F4A_7C15) });
    let next = || {
        STATE.with(|s| {
            let mut x = s.get();
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            s.set(x);
            x
        })
    };
    let (a, b) = (next(), next());
    format!(
        "{:08x}-{:04x}-4{:03x}-{:04x}-{:012x}",
        a >> 32,
        (a >> 16) & 0xffff,
        a & 0xfff,
        (b >> 48) & 0x3fff | 0x8000,
        b & 0xffff_ffff_ffff
    )
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let (Some(listen), Some(upstream)) = (args.get(1), args.get(2).and_then(|u| u.parse().ok()))
    else {
        eprintln!("usage: bare-pingora LISTEN UPSTREAM [THREADS] [extras]");
        std::process::exit(2);
    };
    let threads = args.get(3).and_then(|t| t.parse().ok()).unwrap_or(1);
    let conf = ServerConf {
        threads,
        work_stealing: false,
        grace_period_seconds: Some(0),
        graceful_shutdown_timeout_seconds: Some(0),
        ..ServerConf::default()
    };
    let mut server = Server::new_with_opt_and_conf(Opt::default(), conf);
    server.bootstrap();
    match args.get(4).map(String::as_str) {
        Some("extras") => serve(server, listen, BareWithExtras { upstream }),
        _ => serve(server, listen, Bare { upstream }),
    }
}

fn serve<P>(mut server: Server, listen: &str, app: P) -> !
where
    P: ProxyHttp + Send + Sync + 'static,
    P::CTX: Send + Sync,
{
    let mut proxy = pingora_proxy::http_proxy_service(&server.configuration, app);
    proxy.add_tcp(listen);
    server.add_service(proxy);
    server.run_forever()
}
