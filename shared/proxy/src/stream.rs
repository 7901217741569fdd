//! `tcp` and `tls` listeners: each connection's bytes go to a backend of its route as they
//! come. A `tcp` listener has one route; a `tls` one reads the ClientHello's SNI to pick the
//! route by `hosts` and passes the TLS through unterminated, so the handshake, the
//! certificate and the keys are the upstream's, end to end (Istio's `PASSTHROUGH`, nginx's
//! `ssl_preread`, HAProxy's `req.ssl_sni`).
//!
//! A `tcp` route's service with `[service.tls]` is reached over TLS that Weir originates.
//!
//! The backend is picked as for a request (weights, then the service's balancer, health and
//! outlier state); a failed connect tries another endpoint. The connection ends when both
//! sides have closed, or when no byte has moved either way for the listener's
//! `idle_timeout`; then it gets one access log line and its metrics. A drain (SIGTERM) waits
//! for open connections to end, up to the grace period.

use std::net::{IpAddr, SocketAddr};
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use pingora_core::apps::ServerApp;
use pingora_core::protocols::l4::socket::SocketAddr as PeerAddr;
use pingora_core::protocols::Stream;
use pingora_core::server::ShutdownWatch;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;
use tracing::{debug, warn};
use weir_config::HashOn;
use weir_resilience::TryResult;
use weir_routing::{CompiledRoute, HeaderList, Request};
use weir_telemetry::access_log::{AccessLog, Bytes, Entry};
use weir_tls::rustls::pki_types::ServerName;

use crate::capture;
use crate::proxy::InFlight;
use crate::proxy_protocol;
use crate::reload::Reloader;
use crate::server::OpenConnections;
use crate::snapshot::{ServiceState, Snapshot};

/// A ClientHello is at most a few KiB; more without one is not TLS worth waiting for.
const MAX_HELLO: usize = 64 * 1024;

/// How long a `tls` listener waits for a ClientHello (at most the listener's `idle_timeout`):
/// Envoy's listener filter timeout, so a client that connects and says nothing is not held
/// for the hour a quiet database connection may take.
const HELLO_WAIT: Duration = Duration::from_secs(15);

/// Endpoints tried for one connection before giving up (`UF`).
const CONNECT_TRIES: usize = 3;

/// A `tcp` or `tls` listener.
pub(crate) struct Passthrough {
    pub reloader: Arc<Reloader>,
    pub listener: String,
    /// `tls`: route by the ClientHello's SNI.
    pub sni: bool,
    /// A PROXY protocol header comes first, from the load balancer in front.
    pub proxy_protocol: bool,
    pub idle_timeout: Duration,
    pub open: OpenConnections,
    pub access_log: Arc<AccessLog>,
    /// Open connections count as requests in flight: a drain waits for them to end, up to
    /// the grace period.
    pub in_flight: Arc<AtomicUsize>,
}

#[async_trait]
impl ServerApp for Passthrough {
    async fn process_new(
        self: &Arc<Self>,
        stream: Stream,
        _shutdown: &ShutdownWatch,
    ) -> Option<Stream> {
        let Some(_open) = self.open.admit(&stream) else {
            debug!("closing a connection over the listener's max_connections");
            return None;
        };
        let _in_flight = InFlight::begin(&self.in_flight);
        // Boxed: the copy's buffers and state stay off the listener's task until used.
        Box::pin(self.forward(stream)).await;
        None
    }
}

/// What one connection did, for its log line and metrics.
#[derive(Default)]
struct Outcome {
    sni: Option<String>,
    route: Option<String>,
    service: Option<Arc<ServiceState>>,
    upstream: Option<SocketAddr>,
    flags: &'static str,
    generation: u64,
    /// Captured, and sent on to where it was going (`capture::PASSTHROUGH`).
    passthrough: bool,
    /// The caller's SPIFFE id (or certificate subject), on the sidecar's inbound side.
    peer: Option<String>,
}

impl Outcome {
    /// The connection's route and service, as its metrics and log line name them.
    fn labels(&self) -> (Option<&str>, Option<&str>) {
        let service = match &self.service {
            Some(s) => Some(s.config.name.as_str()),
            None => self.passthrough.then_some(capture::PASSTHROUGH),
        };
        (self.route.as_deref(), service)
    }
}

impl Passthrough {
    async fn forward(&self, mut client: Stream) {
        let start = Instant::now();
        if self.proxy_protocol {
            let peer = proxy_protocol::peer(&client);
            client = match proxy_protocol::accept(client).await {
                Ok(client) => client,
                Err(e) => return proxy_protocol::refused(&self.listener, peer, &e),
            };
        }
        let digest = client.get_socket_digest();
        let inet = |a: Option<&PeerAddr>| a.and_then(|a| a.as_inet()).copied();
        let client_addr = digest.as_ref().and_then(|d| inet(d.peer_addr()));
        let local_addr = digest.as_ref().and_then(|d| inet(d.local_addr()));
        let client_ip = client_addr.map(|a| a.ip());
        let mut outcome = Outcome::default();
        let traffic = Traffic::default();
        let mut hello = Vec::new();
        if self.sni {
            let wait = self.idle_timeout.min(HELLO_WAIT);
            let read = tokio::time::timeout(wait, read_sni(&mut client, &mut hello)).await;
            let read = read.unwrap_or_else(|_| Err(("SI", format!("no ClientHello in {wait:?}"))));
            traffic
                .received
                .fetch_add(hello.len() as u64, Ordering::Relaxed);
            match read {
                Ok(sni) => outcome.sni = sni,
                // Logged and counted like any connection, so a client speaking plain HTTP to
                // this port shows up.
                Err((flags, e)) => {
                    debug!(listener = %self.listener, "closing a connection: {e}");
                    outcome.flags = flags;
                    outcome.generation = self.reloader.snapshot().generation;
                    return self.record(client_ip, &outcome, &traffic, start.elapsed());
                }
            }
        }
        let upstream = {
            let snapshot = self.reloader.snapshot();
            outcome.generation = snapshot.generation;
            match self.route(&snapshot, outcome.sni.as_deref()) {
                Some(route) => {
                    connect(&snapshot, &route, client_addr, local_addr, &mut outcome).await
                }
                None => {
                    outcome.flags = "NR";
                    None
                }
            }
        };
        if let Some(mut upstream) = upstream {
            let replayed = upstream.io.write_all(&hello).await.is_ok();
            if replayed
                && splice(
                    &mut client,
                    &mut upstream.io,
                    self.idle_timeout,
                    &traffic,
                    &outcome,
                )
                .await
            {
                outcome.flags = "SI";
            }
        }
        self.record(client_ip, &outcome, &traffic, start.elapsed());
    }

    /// The route for the connection: by SNI on `tls` listeners.
    fn route(&self, snapshot: &Snapshot, sni: Option<&str>) -> Option<Arc<CompiledRoute>> {
        let host = sni.unwrap_or_default().to_ascii_lowercase();
        let request = Request {
            method: "",
            host: &host,
            path: "/",
            query: None,
            headers: &HeaderList(&[]),
        };
        let found = snapshot.table(&self.listener)?.find(&request)?;
        Some(found.route.clone())
    }

    fn record(&self, client: Option<IpAddr>, o: &Outcome, traffic: &Traffic, took: Duration) {
        let protocol = if self.sni { "TLS" } else { "TCP" };
        let log = &self.access_log;
        record(log, &self.listener, protocol, client, o, traffic, took);
    }
}

/// The sidecar's captured TCP (`capture`), forwarded as bytes: on the outbound listener, a
/// connection to a route's `destinations`, or one that does not open like HTTP; on the inbound
/// listener, one to the app's `tcp_ports`.
pub(crate) struct CapturedTcp {
    pub reloader: Arc<Reloader>,
    pub idle_timeout: Duration,
    pub access_log: Arc<AccessLog>,
    pub in_flight: Arc<AtomicUsize>,
}

impl CapturedTcp {
    /// Outbound: where a captured connection was going, when a route takes that destination: such a
    /// connection is forwarded before its first byte (the server may speak first).
    pub(crate) fn routed(&self, client: &Stream) -> Option<SocketAddr> {
        let snapshot = self.reloader.snapshot();
        if snapshot.destinations.is_empty() {
            return None;
        }
        let dst = capture::original_dst(&*client.get_socket_digest()?)?;
        snapshot.destinations.contains_key(&dst).then_some(dst)
    }

    /// Outbound: forwards a connection the app made to `dst`: to the backend of the route that takes
    /// `dst`, else (with `passthrough`) to `dst` itself.
    pub(crate) async fn forward(&self, mut client: Stream, dst: SocketAddr) {
        let start = Instant::now();
        let _in_flight = InFlight::begin(&self.in_flight);
        let client_addr = client
            .get_socket_digest()
            .and_then(|d| d.peer_addr().and_then(|a| a.as_inet()).copied());
        let snapshot = self.reloader.snapshot();
        let mut outcome = Outcome {
            generation: snapshot.generation,
            upstream: Some(dst),
            ..Outcome::default()
        };
        let route = snapshot.destinations.get(&dst).cloned();
        let passthrough =
            (snapshot.config.sidecar.as_ref()).is_some_and(|s| s.outbound.passthrough);
        let traffic = Traffic::default();
        let idle = self.idle_timeout;
        outcome.flags = match route {
            Some(route) => {
                // The PROXY header, if the service asks for one, names the address called.
                let connected = connect(&snapshot, &route, client_addr, Some(dst), &mut outcome);
                let upstream = connected.await;
                drop(snapshot);
                match upstream {
                    Some(mut upstream) => idle_flag(
                        splice(&mut client, &mut upstream.io, idle, &traffic, &outcome).await,
                    ),
                    None => outcome.flags,
                }
            }
            None if passthrough => {
                drop(snapshot);
                outcome.passthrough = true;
                relay(&mut client, dst, idle, &traffic, &outcome).await
            }
            None => "NR",
        };
        let took = start.elapsed();
        let client_ip = client_addr.map(|a| a.ip());
        record(
            &self.access_log,
            "outbound",
            "TCP",
            client_ip,
            &outcome,
            &traffic,
            took,
        );
    }
}

impl CapturedTcp {
    /// Inbound: the port a captured connection was for, when it is one of the app's
    /// `tcp_ports`.
    pub(crate) fn app_port(&self, client: &Stream) -> Option<u16> {
        let snapshot = self.reloader.snapshot();
        let ports = &snapshot.config.sidecar.as_ref()?.inbound.tcp_ports;
        if ports.is_empty() {
            return None;
        }
        let port = capture::original_dst(&*client.get_socket_digest()?)?.port();
        ports.contains(&port).then_some(port)
    }

    /// Inbound: after the mesh mTLS (or in plaintext, as `mtls` allows), the policies are
    /// checked against the caller's identity and the bytes go to the app's address on `port`.
    pub(crate) async fn forward_to_app(&self, mut client: Stream, port: u16) {
        let start = Instant::now();
        let _in_flight = InFlight::begin(&self.in_flight);
        let client_ip = (client.get_socket_digest())
            .and_then(|d| d.peer_addr().and_then(|a| a.as_inet()).map(|a| a.ip()));
        let ssl = client.get_ssl_digest();
        let peer = ssl.as_deref().and_then(crate::tls::tls_peer);
        let principal = peer.map(|p| p.identity.principal().to_owned());
        let snapshot = self.reloader.snapshot();
        let Some(sidecar) = &snapshot.config.sidecar else {
            return;
        };
        let app = SocketAddr::new(sidecar.inbound.app.ip(), port);
        let mut outcome = Outcome {
            generation: snapshot.generation,
            route: Some(weir_config::INBOUND.to_owned()),
            service: snapshot.services.get(weir_config::INBOUND).cloned(),
            upstream: Some(app),
            peer: principal,
            ..Outcome::default()
        };
        let verdict = weir_routing::authz::authorize_connection(
            &sidecar.inbound.policies,
            peer.and_then(|p| p.identity.uris.first())
                .map(String::as_str),
        );
        let traffic = Traffic::default();
        outcome.flags = match verdict {
            Err(policy) => {
                let metrics = weir_telemetry::metrics();
                metrics.authz_denied.with_label_values(&[policy]).inc();
                "AD"
            }
            Ok(()) => {
                drop(snapshot);
                relay(&mut client, app, self.idle_timeout, &traffic, &outcome).await
            }
        };
        let took = start.elapsed();
        record(
            &self.access_log,
            "inbound",
            "TCP",
            client_ip,
            &outcome,
            &traffic,
            took,
        );
    }
}

/// Connects to `addr` in plaintext (within a service's default `connect_timeout`) and copies
/// both ways until `splice` ends: the connection's flag, `UF`, `SI` or none.
async fn relay(
    client: &mut Stream,
    addr: SocketAddr,
    idle: Duration,
    traffic: &Traffic,
    o: &Outcome,
) -> &'static str {
    let timeout = weir_config::ConnectionPool::default().connect_timeout;
    match tokio::time::timeout(timeout, open(addr, None, None)).await {
        Ok(Ok(mut upstream)) => idle_flag(splice(client, &mut upstream, idle, traffic, o).await),
        _ => "UF",
    }
}

/// The flag of a connection that `splice` ended: `SI` when it went idle.
fn idle_flag(idled: bool) -> &'static str {
    match idled {
        true => "SI",
        false => "",
    }
}

/// A connection's access log line and its `weir_tcp_*` metrics.
fn record(
    access_log: &AccessLog,
    listener: &str,
    protocol: &'static str,
    client: Option<IpAddr>,
    o: &Outcome,
    traffic: &Traffic,
    took: Duration,
) {
    let (route, service) = o.labels();
    let bytes = Bytes {
        received: traffic.received.load(Ordering::Relaxed),
        sent: traffic.sent.load(Ordering::Relaxed),
    };
    let metrics = weir_telemetry::metrics();
    let (route_label, service_label) = (route.unwrap_or(""), service.unwrap_or(""));
    metrics
        .tcp_connections
        .with_label_values(&[listener, route_label, service_label, o.flags])
        .inc();
    traffic.tell(o);
    if !access_log.enabled() {
        return;
    }
    access_log.write(&Entry {
        request_id: "",
        listener,
        client,
        method: "",
        protocol,
        authority: o.sni.as_deref().unwrap_or_default(),
        path: "",
        status: 0,
        flags: o.flags,
        route,
        service,
        upstream: o.upstream,
        duration: took,
        generation: o.generation,
        peer: o.peer.as_deref(),
        trace_id: None,
        bytes: Some(bytes),
    });
}

/// A connection to an endpoint of `route`'s backend; `None` with the reason in
/// `outcome.flags`. `client` and `listener`: the two ends of the client's connection, for
/// hashing and a PROXY header.
async fn connect(
    snapshot: &Snapshot,
    route: &CompiledRoute,
    client: Option<SocketAddr>,
    listener: Option<SocketAddr>,
    outcome: &mut Outcome,
) -> Option<Upstream> {
    outcome.route = Some(route.config.name.clone());
    let key = client.map(|client| match client.ip() {
        IpAddr::V4(v4) => v4.octets().to_vec(),
        IpAddr::V6(v6) => v6.octets().to_vec(),
    });
    let service = backend(snapshot, route, key.as_deref())?;
    outcome.service = Some(service.clone());
    // Circuit breaking: a connection takes one of the service's `max_connections`.
    let Some(place) = service.connections.try_acquire() else {
        outcome.flags = "UO";
        return None;
    };
    let key = key.filter(|_| sticky(&service));
    // `[service.tls]` on a tcp route: Weir originates TLS, verifying `sni`.
    let tls = match service.stream_tls() {
        None => None,
        Some(Ok(config)) => {
            let sni = service.config.tls.as_ref().map_or("", |t| t.sni.as_str());
            let name = ServerName::try_from(sni.to_owned()).ok()?;
            Some((TlsConnector::from(config.clone()), name))
        }
        Some(Err(e)) => {
            warn!(service = %service.config.name, "cannot originate TLS: {e}");
            outcome.flags = "UF";
            return None;
        }
    };
    let proxy_header = (service.config.proxy_protocol)
        .zip(client.zip(listener))
        .map(|(version, (client, listener))| proxy_protocol::header(version, client, listener));
    let timeout = service.config.connection_pool.connect_timeout;
    let mut avoid = None;
    for _ in 0..CONNECT_TRIES {
        let Some(endpoint) = service.balancer.pick(key.as_deref(), avoid) else {
            outcome.flags = "UH";
            return None;
        };
        outcome.upstream = Some(endpoint.addr);
        let active = endpoint.begin();
        // The handshake too, as for requests (Envoy's connect_timeout).
        let opening = open(endpoint.addr, proxy_header.as_deref(), tls.as_ref());
        let connected = tokio::time::timeout(timeout, opening).await;
        // A connection made counts as a success for outlier detection, a failed one as a
        // gateway error, as for requests.
        let result = match &connected {
            Ok(Ok(_)) => TryResult::Status(200),
            _ => TryResult::NoResponse,
        };
        if service.balancer.report(&endpoint, result).is_some() {
            weir_telemetry::metrics()
                .outlier_ejections
                .with_label_values(&[service.config.name.as_str()])
                .inc();
        }
        match connected {
            Ok(Ok(io)) => {
                outcome.flags = "";
                return Some(Upstream {
                    io,
                    _active: active,
                    _place: place,
                });
            }
            Ok(Err(e)) => debug!(upstream = %endpoint.addr, "connect failed: {e}"),
            Err(_) => debug!(upstream = %endpoint.addr, "connect timed out"),
        }
        outcome.flags = "UF";
        avoid = Some(endpoint.addr);
    }
    None
}

/// The backend `route`'s weights pick; a consistent-hash service on `source_ip` keeps a client
/// on one backend.
fn backend(
    snapshot: &Snapshot,
    route: &CompiledRoute,
    key: Option<&[u8]>,
) -> Option<Arc<ServiceState>> {
    let services = snapshot.services_of(route);
    let roll = match (services.backends.first(), key) {
        (Some(first), Some(key)) if sticky(first) => weir_resilience::roll(key),
        _ => fastrand::u64(..),
    };
    let split = route.split.as_ref()?;
    services.backends.get(split.pick(roll)).cloned()
}

fn sticky(service: &ServiceState) -> bool {
    matches!(
        weir_resilience::hash_on(&service.config),
        Some(HashOn::SourceIp)
    )
}

/// A connection to `addr` that starts with `proxy_header`, then over TLS with `tls`.
async fn open(
    addr: SocketAddr,
    proxy_header: Option<&[u8]>,
    tls: Option<&(TlsConnector, ServerName<'static>)>,
) -> std::io::Result<Box<dyn Io>> {
    let mut tcp = TcpStream::connect(addr).await?;
    tcp.set_nodelay(true)?;
    if let Some(header) = proxy_header {
        tcp.write_all(header).await?;
    }
    Ok(match tls {
        Some((connector, name)) => Box::new(connector.connect(name.clone(), tcp).await?),
        None => Box::new(tcp),
    })
}

/// A byte stream to an upstream, plaintext or TLS.
trait Io: AsyncRead + AsyncWrite + Unpin + Send {}

impl<T: AsyncRead + AsyncWrite + Unpin + Send> Io for T {}

/// A connection to an endpoint, holding its place in the service's `max_connections` and
/// its count of active connections (least-request balancing) while it lasts.
struct Upstream {
    io: Box<dyn Io>,
    _active: weir_resilience::Active,
    _place: tokio::sync::OwnedSemaphorePermit,
}

/// Reads the client's first TLS records until they hold its ClientHello, keeping every byte
/// in `seen` to replay upstream; the SNI, if the client sent one. Else the connection's flag
/// (`DC` the client left, `NR` no TLS to route) and why.
async fn read_sni(
    client: &mut Stream,
    seen: &mut Vec<u8>,
) -> Result<Option<String>, (&'static str, String)> {
    let mut buf = [0u8; 4096];
    loop {
        let n = (client.read(&mut buf).await).map_err(|e| ("DC", e.to_string()))?;
        if n == 0 {
            return Err(("DC", "closed before its ClientHello".into()));
        }
        seen.extend_from_slice(&buf[..n]);
        match client_hello_sni(seen) {
            Hello::Incomplete if seen.len() > MAX_HELLO => {
                return Err(("NR", "no ClientHello in its first 64 KiB".into()))
            }
            Hello::Incomplete => {}
            Hello::Sni(name) => return Ok(name),
            Hello::NotTls(why) => return Err(("NR", format!("not a TLS ClientHello: {why}"))),
        }
    }
}

/// What the first bytes of a connection say, read as TLS.
#[derive(Debug, PartialEq)]
enum Hello {
    Incomplete,
    /// A ClientHello, with its server name if it names one.
    Sni(Option<String>),
    NotTls(&'static str),
}

/// The server name of the ClientHello at the start of `bytes` (RFC 8446 §4.1.2, RFC 6066 §3),
/// read as a passthrough proxy must: any version, any extensions, judging nothing it does not
/// route by (rustls's server-side parser refused TLS 1.0 and 1.1, and hellos without
/// `signature_algorithms`, which the server behind may well take). The hello may span records.
fn client_hello_sni(bytes: &[u8]) -> Hello {
    // The handshake messages, taken out of their records.
    let mut message = Vec::new();
    let mut rest = bytes;
    loop {
        let Some(header) = rest.get(..5) else {
            return Hello::Incomplete;
        };
        if header[0] != 22 || header[1] != 3 {
            return Hello::NotTls("not a TLS handshake record");
        }
        let len = usize::from(u16::from_be_bytes([header[3], header[4]]));
        let Some(fragment) = rest.get(5..5 + len) else {
            return Hello::Incomplete;
        };
        message.extend_from_slice(fragment);
        rest = &rest[5 + len..];
        if message.len() >= 4 {
            if message[0] != 1 {
                return Hello::NotTls("the first handshake message is no ClientHello");
            }
            let body = usize::from(message[1]) << 16 | usize::from(message[2]) << 8;
            let body = body | usize::from(message[3]);
            if message.len() >= 4 + body {
                let hello = &message[4..4 + body];
                return match server_name(hello) {
                    Some(name) => Hello::Sni(name),
                    None => Hello::NotTls("a malformed ClientHello"),
                };
            }
        }
    }
}

/// The server name in a ClientHello's body; `None` when the body is malformed.
fn server_name(hello: &[u8]) -> Option<Option<String>> {
    let mut r = Reader(hello);
    r.take(2 + 32)?; // legacy_version, random
    let session = r.u8()?;
    r.take(session)?;
    let suites = r.u16()?;
    r.take(suites)?;
    let compression = r.u8()?;
    r.take(compression)?;
    if r.0.is_empty() {
        return Some(None); // no extensions (SSL 3.0-style hello)
    }
    let extensions = r.u16()?;
    let mut ext = Reader(r.take(extensions)?);
    while !ext.0.is_empty() {
        let kind = ext.u16()?;
        let len = ext.u16()?;
        let data = ext.take(len)?;
        if kind != 0 {
            continue;
        }
        // server_name_list: the first host_name (type 0) entry.
        let mut list = Reader(data);
        let list_len = list.u16()?;
        let mut names = Reader(list.take(list_len)?);
        while !names.0.is_empty() {
            let name_type = names.u8()?;
            let len = names.u16()?;
            let name = names.take(len)?;
            if name_type == 0 {
                return Some(Some(String::from_utf8_lossy(name).into_owned()));
            }
        }
    }
    Some(None)
}

/// Big-endian fields off the front of a byte slice.
struct Reader<'a>(&'a [u8]);

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Option<&'a [u8]> {
        let (taken, rest) = (self.0.get(..n)?, self.0.get(n..)?);
        self.0 = rest;
        Some(taken)
    }

    fn u8(&mut self) -> Option<usize> {
        self.take(1).map(|b| usize::from(b[0]))
    }

    fn u16(&mut self) -> Option<usize> {
        self.take(2)
            .map(|b| usize::from(u16::from_be_bytes([b[0], b[1]])))
    }
}

/// Bytes moved and when last, shared by both directions of one connection.
#[derive(Default)]
struct Traffic {
    /// From the client.
    received: AtomicU64,
    /// To the client.
    sent: AtomicU64,
    /// Milliseconds from `since` to the last byte read on either side.
    last: AtomicU64,
    /// Of `received` and `sent`, what `weir_tcp_bytes_total` has been told.
    told: [AtomicU64; 2],
}

/// How often a long connection's bytes are added to `weir_tcp_bytes_total` while it lasts
/// (Envoy flushes its stats every 5 s).
const TELL_EVERY: Duration = Duration::from_secs(5);

impl Traffic {
    /// Adds the bytes moved since the last call to `weir_tcp_bytes_total`.
    fn tell(&self, o: &Outcome) {
        let (route, service) = o.labels();
        let (route, service) = (route.unwrap_or(""), service.unwrap_or(""));
        let moved = [("received", &self.received), ("sent", &self.sent)];
        for ((direction, count), told) in moved.into_iter().zip(&self.told) {
            let count = count.load(Ordering::Relaxed);
            let before = told.swap(count, Ordering::Relaxed);
            if count > before {
                (weir_telemetry::metrics().tcp_bytes)
                    .with_label_values(&[route, service, direction])
                    .inc_by(count - before);
            }
        }
    }
}

/// Copies both ways until both sides have closed (each side's close passed on to the other
/// as a half-close) or until no byte has moved for `idle`: then `true`. The bytes are told to
/// the metrics every [`TELL_EVERY`] meanwhile.
async fn splice(
    client: &mut Stream,
    upstream: &mut Box<dyn Io>,
    idle: Duration,
    t: &Traffic,
    o: &Outcome,
) -> bool {
    let since = Instant::now();
    let mut client = Counted {
        io: client,
        count: &t.received,
        traffic: t,
        since,
    };
    let mut upstream = Counted {
        io: upstream,
        count: &t.sent,
        traffic: t,
        since,
    };
    let copy = tokio::io::copy_bidirectional(&mut client, &mut upstream);
    tokio::pin!(copy);
    loop {
        let quiet = since
            .elapsed()
            .saturating_sub(Duration::from_millis(t.last.load(Ordering::Relaxed)));
        let Some(left) = idle.checked_sub(quiet).filter(|l| !l.is_zero()) else {
            return true;
        };
        tokio::select! {
            done = &mut copy => {
                if let Err(e) = done {
                    debug!("connection ended: {e}");
                }
                return false;
            }
            _ = tokio::time::sleep(left.min(TELL_EVERY)) => t.tell(o),
        }
    }
}

/// One side of a spliced connection: counts what is read from it into `count`, and stamps
/// the traffic's last activity.
struct Counted<'a, S> {
    io: &'a mut S,
    count: &'a AtomicU64,
    traffic: &'a Traffic,
    since: Instant,
}

impl<S: AsyncRead + Unpin> AsyncRead for Counted<'_, S> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let this = self.get_mut();
        let before = buf.filled().len();
        let polled = Pin::new(&mut *this.io).poll_read(cx, buf);
        let n = (buf.filled().len() - before) as u64;
        if n > 0 {
            this.count.fetch_add(n, Ordering::Relaxed);
            let now = this.since.elapsed().as_millis() as u64;
            this.traffic.last.store(now, Ordering::Relaxed);
        }
        polled
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Counted<'_, S> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut *self.get_mut().io).poll_write(cx, buf)
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut *self.get_mut().io).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut *self.get_mut().io).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A ClientHello of TLS `minor` version (1: TLS 1.0) with only the extensions given, in one
    /// record.
    fn hello(minor: u8, sni: Option<&str>) -> Vec<u8> {
        let mut body = vec![3, minor];
        body.extend([0; 32]); // random
        body.extend([0, 0, 2, 0, 0x2f, 1, 0]); // no session, one suite, null compression
        if let Some(name) = sni {
            let n = name.len();
            let mut ext = vec![0, 0];
            ext.extend(u16::try_from(n + 5).unwrap().to_be_bytes());
            ext.extend(u16::try_from(n + 3).unwrap().to_be_bytes());
            ext.push(0);
            ext.extend(u16::try_from(n).unwrap().to_be_bytes());
            ext.extend(name.as_bytes());
            body.extend(u16::try_from(ext.len()).unwrap().to_be_bytes());
            body.extend(ext);
        }
        let mut message = vec![1, 0];
        message.extend(u16::try_from(body.len()).unwrap().to_be_bytes());
        message.extend(body);
        let mut record = vec![22, 3, minor];
        record.extend(u16::try_from(message.len()).unwrap().to_be_bytes());
        record.extend(message);
        record
    }

    #[test]
    fn any_client_hello_names_its_server() {
        // TLS 1.0 with no signature_algorithms: a server behind may take it; not ours to judge.
        let old = hello(1, Some("b.example.com"));
        assert_eq!(
            client_hello_sni(&old),
            Hello::Sni(Some("b.example.com".into()))
        );
        assert_eq!(client_hello_sni(&hello(3, None)), Hello::Sni(None));
        // Byte by byte, it is incomplete until its last byte.
        for end in 0..old.len() {
            assert_eq!(client_hello_sni(&old[..end]), Hello::Incomplete, "{end}");
        }
        // Split over two records.
        let (head, body) = old[5..].split_at(20);
        let mut split = vec![22, 3, 1, 0, 20];
        split.extend(head);
        split.extend([22, 3, 1]);
        split.extend(u16::try_from(body.len()).unwrap().to_be_bytes());
        split.extend(body);
        assert_eq!(
            client_hello_sni(&split),
            Hello::Sni(Some("b.example.com".into()))
        );
        assert!(matches!(
            client_hello_sni(b"GET / HTTP/1.1\r\n"),
            Hello::NotTls(_)
        ));
        let mut cut = old.clone();
        cut[44] = 0xff; // the cipher suites' length, past the end
        assert!(matches!(client_hello_sni(&cut), Hello::NotTls(_)));
    }

    /// A real client's hello (rustls, TLS 1.3 and 1.2 offered).
    #[test]
    fn a_rustls_client_hello_names_its_server() {
        use weir_tls::rustls;
        let roots = rustls::RootCertStore::empty();
        let config = rustls::ClientConfig::builder_with_provider(weir_tls::provider())
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_root_certificates(roots)
            .with_no_client_auth();
        let name = rustls::pki_types::ServerName::try_from("a.example").unwrap();
        let mut client = rustls::ClientConnection::new(Arc::new(config), name).unwrap();
        let mut bytes = Vec::new();
        client.write_tls(&mut bytes).unwrap();
        assert_eq!(
            client_hello_sni(&bytes),
            Hello::Sni(Some("a.example".into()))
        );
    }
}
