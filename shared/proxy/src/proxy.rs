//! The Pingora `ProxyHttp` both binaries run. Each phase asks the snapshot what to do; the
//! policy lives in weir-routing and weir-config, and errors become statuses in one place,
//! [`WeirProxy::fail_to_proxy`].

use std::borrow::Cow;
use std::future::Future;
use std::io::Write as _;
use std::net::{IpAddr, SocketAddr};
use std::pin::Pin;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use async_trait::async_trait;
use bytes::Bytes;
use http::header::Entry as HeaderEntry;
use http::{HeaderName, HeaderValue, Version};
use pingora_core::connectors::TransportConnector;
use pingora_core::modules::http::HttpModules;
use pingora_core::protocols::tls::SslDigest;
use pingora_core::protocols::Digest;
use pingora_core::upstreams::peer::HttpPeer;
use pingora_error::{Error, ErrorSource, ErrorType, OrErr, Result};
use pingora_http::authority::raw_target_authority;
use pingora_http::{RequestHeader, ResponseHeader};
use pingora_proxy::{FailToProxy, ProxyHttp, Session};
use tokio::sync::OwnedSemaphorePermit;
use tokio::time::Instant as Clock;
use weir_config::{Action, HashOn, HeaderOps, PathMatch, Redirect};
use weir_resilience::retry::{backoff, retriable};
use weir_resilience::{Active, Failure, Permit, TryResult};
use weir_routing::{CompiledRoute, Request};

use crate::capture;
use crate::connection;
use crate::mirror::{self, MirrorBody};
use crate::reload::Reloader;
use crate::snapshot::{ServiceState, Snapshot};
use weir_telemetry::access_log::{AccessLog, Bytes as BodyBytes, Entry};
use weir_telemetry::otel::{RequestSpan, Tracer};

const X_FORWARDED_FOR: HeaderName = HeaderName::from_static("x-forwarded-for");
const X_FORWARDED_PROTO: HeaderName = HeaderName::from_static("x-forwarded-proto");
const X_REQUEST_ID: HeaderName = HeaderName::from_static("x-request-id");
/// Envoy's header for the client certificate of an mTLS connection.
const X_FORWARDED_CLIENT_CERT: HeaderName = HeaderName::from_static("x-forwarded-client-cert");
const KEEP_ALIVE: HeaderName = HeaderName::from_static("keep-alive");
const PROXY_CONNECTION: HeaderName = HeaderName::from_static("proxy-connection");

/// The hop-by-hop headers of a response (RFC 9110 §7.6.1) that no proxy passes on, beside
/// those its `Connection` names. (Pingora writes the client's `Connection` and framing
/// itself, over HTTP/1.1 and HTTP/2.)
const RESPONSE_HOP_BY_HOP: [HeaderName; 3] = [KEEP_ALIVE, PROXY_CONNECTION, http::header::UPGRADE];

/// The same for a request Weir sends itself (a mirror's copy), as Pingora strips the primary's.
pub(crate) const REQUEST_HOP_BY_HOP: [HeaderName; 9] = [
    http::header::CONNECTION,
    KEEP_ALIVE,
    PROXY_CONNECTION,
    http::header::PROXY_AUTHORIZATION,
    http::header::TE,
    http::header::TRAILER,
    http::header::TRANSFER_ENCODING,
    http::header::UPGRADE,
    HeaderName::from_static("http2-settings"),
];

pub struct WeirProxy {
    reloader: Arc<Reloader>,
    /// Listener names and addresses, to tell which listener a connection came in on.
    listeners: Vec<(String, SocketAddr)>,
    access_log: Arc<AccessLog>,
    /// `None`: tracing off.
    tracer: Option<Tracer>,
    in_flight: Arc<AtomicUsize>,
    /// Mirror copies' own connection pool.
    mirror_connector: Arc<TransportConnector>,
}

impl WeirProxy {
    pub fn new(
        reloader: Arc<Reloader>,
        listeners: Vec<(String, SocketAddr)>,
        access_log: Arc<AccessLog>,
        tracer: Option<Tracer>,
        in_flight: Arc<AtomicUsize>,
    ) -> Self {
        WeirProxy {
            reloader,
            listeners,
            access_log,
            tracer,
            in_flight,
            mirror_connector: Arc::new(TransportConnector::new(None)),
        }
    }

    /// Whether a failed try is tried again (DESIGN.md `route.retry`): tries left, a listed
    /// condition, a method safe to repeat (or a failure that provably never reached the
    /// upstream), the body still buffered, time left, and the service's budget.
    fn should_retry(&self, session: &Session, ctx: &mut Ctx, failure: Failure) -> bool {
        let (Some(route), Some(service)) = (&ctx.route, &ctx.service) else {
            return false;
        };
        let policy = &route.config.retry;
        if !retriable(&policy.on, failure) {
            return false;
        }
        if ctx.tries > policy.attempts {
            if policy.attempts > 0 {
                ctx.flags = "URX";
            }
            return false;
        }
        if failure.needs_idempotent_method()
            && !policy.non_idempotent
            && !session.req_header().method.is_idempotent()
        {
            return false;
        }
        if session.as_ref().retry_buffer_truncated() || past(ctx.deadline) {
            return false;
        }
        let wait = backoff(policy.backoff, ctx.tries);
        ctx.backoff = Some(wait);
        if ctx.deadline.is_some_and(|d| Clock::now() + wait >= d) {
            // No time for it: `upstream_peer` answers 504 DT at once, and a retry never made
            // neither spends the budget nor counts.
            return true;
        }
        if !service.budget.try_withdraw(&policy.budget) {
            ctx.flags = "URX";
            return false;
        }
        weir_telemetry::metrics()
            .upstream_retries
            .with_label_values(&[service.config.name.as_str(), &failure.reason()])
            .inc();
        true
    }

    /// Tells outlier detection how the current try ended.
    fn report(&self, ctx: &Ctx, result: TryResult) {
        if let (Some(service), Some(active)) = (&ctx.service, &ctx.endpoint) {
            if service.balancer.report(active.endpoint(), result).is_some() {
                weir_telemetry::metrics()
                    .outlier_ejections
                    .with_label_values(&[service.config.name.as_str()])
                    .inc();
            }
        }
    }

    /// Starts the route's mirror copy of this request (DESIGN.md `route.mirror`).
    fn start_mirror(
        &self,
        session: &mut Session,
        ctx: &mut Ctx,
        mirror: &weir_config::Mirror,
        service: &Arc<ServiceState>,
    ) -> Result<()> {
        let mut header = session.req_header().clone();
        let tracer = self.tracer.as_ref();
        prepare_upstream(&mut header, Downstream::of(session), None, tracer, ctx)?;
        let key = weir_resilience::hash_on(&service.config).and_then(|on| hash_key(session, on));
        let body_len = session
            .req_header()
            .headers
            .get("content-length")
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse().ok());
        let body_empty = session.is_body_empty();
        ctx.mirror = mirror::start(
            &self.mirror_connector,
            mirror,
            service,
            header,
            key,
            body_len,
            body_empty,
        );
        Ok(())
    }

    fn listener(&self, session: &Session) -> usize {
        if self.listeners.len() <= 1 {
            return 0;
        }
        let local = session.server_addr().and_then(|a| a.as_inet());
        local
            .and_then(|local| {
                self.listeners.iter().position(|(_, l)| {
                    l.port() == local.port() && (l.ip().is_unspecified() || l.ip() == local.ip())
                })
            })
            .unwrap_or(0)
    }

    /// The name of the listener that took the request (the sidecar's are "outbound" and
    /// "inbound").
    fn listener_name(&self, ctx: &Ctx) -> &str {
        (self.listeners.get(ctx.listener)).map_or("outbound", |(n, _)| n.as_str())
    }
}

/// Per-request state. Dropping it marks the request finished (for draining).
pub struct Ctx {
    snapshot: Option<Arc<Snapshot>>,
    listener: usize,
    route: Option<Arc<CompiledRoute>>,
    /// The match block of `route` that matched, for the path rewrite.
    block: Option<usize>,
    service: Option<Arc<ServiceState>>,
    /// The request's place under its service's `max_requests`.
    permit: Option<Permit>,
    /// The body's way to the mirror copy, while the body is still coming.
    mirror: Option<MirrorBody>,
    /// The try in flight: its endpoint (counted for least_request and outlier detection)
    /// and its place under the service's `max_connections`.
    endpoint: Option<Active>,
    connection: Option<OwnedSemaphorePermit>,
    upstream: Option<SocketAddr>,
    /// Tries made so far (upstream_peer calls).
    tries: u32,
    /// When `route.timeout` runs out.
    deadline: Option<Clock>,
    /// The wait before the retry `should_retry` granted.
    backoff: Option<Duration>,
    /// upstream_response_filter turned a response into a retry.
    status_retry: bool,
    /// A fault delay held the request back: `FI` goes with whatever flags come after.
    delayed: bool,
    /// Response flag for the access log: "NR", "UF", ... or "" when none.
    flags: &'static str,
    /// Sent upstream and back to the client; a `HeaderValue` so each use is a refcount.
    request_id: HeaderValue,
    /// The request's span, when tracing is on.
    span: Option<RequestSpan>,
    started: Instant,
    _in_flight: InFlight,
}

impl Ctx {
    /// No route took the request, and it went on to where a captured connection was going.
    fn passed_through(&self) -> bool {
        self.route.is_none() && self.upstream.is_some()
    }
}

/// Where the sidecar's outbound listener sends a request no route takes: the address the app
/// called, when the connection was captured and `[outbound] passthrough` is on.
fn passthrough(session: &Session, snapshot: &Snapshot, listener: &str) -> Option<SocketAddr> {
    let sidecar = snapshot.config.sidecar.as_ref()?;
    if listener != "outbound" || !sidecar.outbound.passthrough {
        return None;
    }
    capture::original_dst(session.digest()?.socket_digest.as_deref()?)
}

/// Plain HTTP/1.1 to `dst`, with the timeouts of a service's default connection pool.
fn passthrough_peer(dst: SocketAddr) -> HttpPeer {
    let pool = weir_config::ConnectionPool::default();
    let mut peer = HttpPeer::new(dst, false, String::new());
    peer.options.connection_timeout = Some(pool.connect_timeout);
    peer.options.idle_timeout = Some(pool.idle_timeout);
    peer
}

/// One request (or `tcp`/`tls` connection) in flight, counted out when dropped: a drain
/// waits for none to be left.
pub(crate) struct InFlight(Arc<AtomicUsize>);

impl InFlight {
    pub(crate) fn begin(count: &Arc<AtomicUsize>) -> InFlight {
        count.fetch_add(1, Ordering::AcqRel);
        InFlight(count.clone())
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

#[async_trait]
impl ProxyHttp for WeirProxy {
    type CTX = Ctx;

    /// None: Pingora's default is a response compression module, disabled, that every
    /// request still builds and calls. Weir does not compress (Envoy's default either).
    fn init_downstream_modules(&self, _modules: &mut HttpModules) {}

    fn new_ctx(&self) -> Ctx {
        keep_timer_wheel_warm();
        Ctx {
            snapshot: None,
            listener: 0,
            route: None,
            block: None,
            service: None,
            permit: None,
            mirror: None,
            endpoint: None,
            connection: None,
            upstream: None,
            tries: 0,
            deadline: None,
            backoff: None,
            status_retry: false,
            delayed: false,
            flags: "",
            request_id: HeaderValue::from_static(""),
            span: None,
            started: Instant::now(),
            _in_flight: InFlight::begin(&self.in_flight),
        }
    }

    async fn request_filter(&self, session: &mut Session, ctx: &mut Ctx) -> Result<bool> {
        // Pipelined requests are answered in order, as nginx, HAProxy and Envoy answer them;
        // Pingora's default closes the connection after the first and drops the others.
        session.set_pipelining_enabled(true);
        // A client that stops reading its answer would hold the request's places (the
        // service's `max_requests`, an upstream connection) for good: nginx's send_timeout.
        session.set_write_timeout(Some(STREAM_IDLE));
        connection::request_started();
        let snapshot = self.reloader.snapshot();
        ctx.listener = self.listener(session);
        let listener = self.listener_name(ctx);
        if let Some(path) = weir_routing::normalize_path(session.req_header().uri.path()) {
            set_path(session.req_header_mut(), &path)?;
        }
        let req = session.req_header();
        if let Some(tracer) = &self.tracer {
            // The sidecar's outbound side calls out for its app; everywhere else Weir serves.
            let client = listener == "outbound" && snapshot.config.sidecar.is_some();
            ctx.span = Some(tracer.request_span(&req.headers, client));
        }
        ctx.request_id = match req.headers.get(X_REQUEST_ID) {
            // Kept for tracing across hops, but only a sane one: it reaches logs and upstreams.
            Some(id)
                if (1..=128).contains(&id.len())
                    && id.as_bytes().iter().all(u8::is_ascii_graphic) =>
            {
                id.clone()
            }
            _ => new_request_id(),
        };
        // RFC 9112 §3.2: an HTTP/1.1 request without Host gets 400 (nginx and HAProxy answer
        // so); forwarded, it would reach the upstream without one.
        let no_host = req.version == Version::HTTP_11
            && req.uri.authority().is_none()
            && !req.headers.contains_key(http::header::HOST);
        if no_host {
            ctx.snapshot = Some(snapshot);
            let body = Bytes::from_static(b"missing host header\n");
            respond(session, ctx, 400, body, None).await?;
            return Ok(true);
        }
        if !host_is_valid(req) {
            ctx.snapshot = Some(snapshot);
            let body = Bytes::from_static(b"bad host header\n");
            respond(session, ctx, 400, body, None).await?;
            return Ok(true);
        }
        if !target_is_valid(req) {
            ctx.snapshot = Some(snapshot);
            let body = Bytes::from_static(b"bad request target\n");
            respond(session, ctx, 400, body, None).await?;
            return Ok(true);
        }
        if !session.as_mut().is_body_empty() {
            if !transfer_coding_known(session.req_header()) {
                ctx.snapshot = Some(snapshot);
                let body = Bytes::from_static(b"transfer coding not implemented\n");
                respond(session, ctx, 501, body, None).await?;
                return Ok(true);
            }
            one_content_length(session.req_header_mut());
        }
        let split_cookies = |s: &Session| {
            let cookies = s.req_header().headers.get_all(http::header::COOKIE);
            cookies.iter().nth(1).is_some()
        };
        if session.is_http2() && split_cookies(session) {
            // Cookie fields an HTTP/2 client split (RFC 9113 §8.2.3) are one header to a
            // match, as Envoy joins them before routing, and to the upstream.
            edit_request(session.req_header_mut(), |parts| {
                join_cookies(&mut parts.headers)
            })?;
        }
        let req = session.req_header();
        let found = snapshot.table(listener).and_then(|table| {
            let host = match table.has_hosts() {
                true => host_of(req),
                false => Cow::Borrowed(""),
            };
            let view = HeaderView(req);
            let request = Request {
                method: req.method.as_str(),
                host: &host,
                path: req.uri.path(),
                query: req.uri.query(),
                headers: &view,
            };
            table.find(&request).map(|f| (f.route.clone(), f.block))
        });
        ctx.snapshot = Some(snapshot.clone());
        let Some((route, block)) = found else {
            if let Some(dst) = passthrough(session, &snapshot, listener) {
                ctx.upstream = Some(dst);
                return Ok(false);
            }
            ctx.flags = "NR";
            respond(session, ctx, 404, Bytes::from_static(b"no route\n"), None).await?;
            return Ok(true);
        };
        ctx.route = Some(route.clone());
        ctx.block = block;
        if let Some(policies) = snapshot.policies_of(&route) {
            let downstream = Downstream::of(session);
            let peer = downstream.peer().and_then(|p| p.identity.uris.first());
            let req = session.req_header();
            let verdict = weir_routing::authz::authorize(
                policies,
                peer.map(String::as_str),
                req.method.as_str(),
                req.uri.path(),
            );
            if let Err(policy) = verdict {
                ctx.flags = "AD";
                weir_telemetry::metrics()
                    .authz_denied
                    .with_label_values(&[policy])
                    .inc();
                let body = Bytes::from_static(b"RBAC: access denied\n");
                respond(session, ctx, 403, body, None).await?;
                return Ok(true);
            }
        }
        // Faults as Envoy applies them: the delay first, then the abort.
        if let Some(fault) = &route.config.fault {
            if let Some(delay) = fault
                .delay
                .as_ref()
                .filter(|d| route.delay_sampler.pick(d.percent))
            {
                (ctx.flags, ctx.delayed) = ("FI", true);
                count_fault(&route, "delay");
                // Boxed, as `respond` is.
                let delay = tokio::time::sleep(delay.fixed);
                Box::pin(unless_client_leaves(session, delay)).await?;
            }
            if let Some(abort) = fault
                .abort
                .as_ref()
                .filter(|a| route.abort_sampler.pick(a.percent))
            {
                ctx.flags = "FI";
                count_fault(&route, "abort");
                respond(
                    session,
                    ctx,
                    abort.status,
                    Bytes::from_static(b"fault filter abort\n"),
                    None,
                )
                .await?;
                return Ok(true);
            }
        }
        match (&route.config.action, &route.split) {
            (Action::DirectResponse { status, body }, _) => {
                respond(session, ctx, *status, Bytes::from(body.clone()), None).await?;
                Ok(true)
            }
            (Action::Redirect(r), _) => {
                let scheme = Downstream::of(session).scheme();
                match redirect_location(session.req_header(), r, scheme) {
                    Some(location) => {
                        respond(session, ctx, r.status, Bytes::new(), Some(location)).await?
                    }
                    // A Host that is no host (`a b`, `good.com/x`) is not sent back as one.
                    None => {
                        respond(session, ctx, 400, Bytes::from_static(b"bad host\n"), None).await?
                    }
                }
                Ok(true)
            }
            (Action::Backends(_), Some(split)) => {
                let services = snapshot.services_of(&route);
                // Sticky canaries: when the split's first service hashes on part of the
                // request, that key, not chance, picks the backend, so a user stays on one
                // version (and, shifting weight toward the last backend, keeps moving users
                // one way only).
                let sticky = services
                    .backends
                    .first()
                    .and_then(|s| weir_resilience::hash_on(&s.config))
                    .and_then(|on| hash_key(session, on));
                let roll = sticky
                    .as_deref()
                    .map_or_else(|| fastrand::u64(..), weir_resilience::roll);
                let Some(service) = services.backends.get(split.pick(roll)).cloned() else {
                    return Err(Error::explain(ErrorType::InternalError, "unknown service"));
                };
                // Circuit breaking: over `max_requests` the answer is an immediate 503.
                let Some(permit) = service.requests.try_acquire() else {
                    ctx.flags = "UO";
                    ctx.service = Some(service);
                    let body = Bytes::from_static(b"upstream overflow\n");
                    respond(session, ctx, 503, body, None).await?;
                    return Ok(true);
                };
                ctx.permit = Some(permit);
                let policy = &route.config.retry;
                if policy.attempts > 0 {
                    service.budget.deposit(&policy.budget);
                }
                // The route's timeout starts once the request is complete (Envoy's): now, or at
                // the end of its body (`request_body_filter`), so a slow upload is not counted
                // against the upstream, nor its prompt answer thrown away.
                if session.as_mut().is_body_empty() {
                    ctx.deadline = route.config.timeout.map(|t| Clock::now() + t);
                }
                ctx.service = Some(service);
                if let (Some(m), Some(shadow)) = (&route.config.mirror, &services.mirror) {
                    if route.mirror_sampler.pick(m.percent) {
                        self.start_mirror(session, ctx, m, shadow)?;
                    }
                }
                Ok(false)
            }
            (Action::Backends(_), None) => unreachable!("a route with backends always has a split"),
        }
    }

    async fn upstream_peer(&self, session: &mut Session, ctx: &mut Ctx) -> Result<Box<HttpPeer>> {
        let (Some(service), Some(route)) = (ctx.service.clone(), ctx.route.clone()) else {
            if let (None, Some(dst)) = (&ctx.route, ctx.upstream) {
                return Ok(Box::new(passthrough_peer(dst)));
            }
            return Err(Error::explain(
                ErrorType::InternalError,
                "route chose no service",
            ));
        };
        ctx.tries += 1;
        if ctx.tries > 1 {
            // Pingora's own retry of a stale pooled connection has no wait granted: its own.
            let wait = (ctx.backoff.take())
                .unwrap_or_else(|| backoff(route.config.retry.backoff, ctx.tries - 1));
            if ctx.deadline.is_some_and(|d| Clock::now() + wait >= d) {
                return Err(fail_with(ctx, 504, "DT"));
            }
            // Boxed, as `respond` is: retries are rare.
            let backoff = tokio::time::sleep(wait);
            Box::pin(unless_client_leaves(session, backoff)).await?;
        }
        // A retry goes elsewhere when it can; the last try's places are given back first.
        let avoid = ctx.endpoint.take().map(|a| a.endpoint().addr);
        ctx.connection = None;
        let key = weir_resilience::hash_on(&service.config).and_then(|on| hash_key(session, on));
        let Some(endpoint) = service.balancer.pick(key.as_deref(), avoid) else {
            return Err(fail_with(ctx, 503, "UH"));
        };
        let place = match service.connections.try_acquire() {
            Some(place) => place,
            // Boxed, as `respond` is: waiting for a connection is rare.
            None => match Box::pin(unless_client_leaves(
                session,
                wait_for_place(&service, ctx.deadline),
            ))
            .await?
            {
                Ok(place) => place,
                Err((status, flags)) => return Err(fail_with(ctx, status, flags)),
            },
        };
        ctx.connection = Some(place);
        ctx.upstream = Some(endpoint.addr);
        ctx.endpoint = Some(endpoint.begin());
        if let Some(mirror) = &mut ctx.mirror {
            mirror.new_try();
        }
        let mut peer = service.peer(endpoint.addr);
        let pool = &service.config.connection_pool;
        let left = ctx
            .deadline
            .map(|d| d.saturating_duration_since(Clock::now()));
        let per_try = route.config.retry.per_try_timeout;
        let try_timeout = match (per_try, left) {
            (Some(p), Some(l)) => Some(p.min(l)),
            (p, l) => p.or(l),
        };
        // The connect is part of the try: bounded by its timeout too.
        let connect_timeout = match try_timeout {
            Some(t) => pool.connect_timeout.min(t),
            None => pool.connect_timeout,
        };
        // The TCP connect, and with the TLS handshake the whole of it (as Envoy's
        // connect_timeout), bounded the same.
        peer.options.connection_timeout = Some(connect_timeout);
        peer.options.total_connection_timeout = Some(connect_timeout);
        // An upstream that stops reading the request would otherwise hold both connections,
        // the client's gone or not, for good (Envoy's stream_idle_timeout bounds it too); and
        // once the write gives up, Pingora waits for an answer, so a request with a body waits
        // as long at most for each read. One without (a long poll) waits as long as it takes.
        let body = !session.is_body_empty();
        peer.options.read_timeout = try_timeout.or(body.then_some(STREAM_IDLE));
        peer.options.write_timeout = try_timeout.or(Some(STREAM_IDLE));
        peer.options.idle_timeout = Some(pool.idle_timeout);
        Ok(Box::new(peer))
    }

    async fn request_body_filter(
        &self,
        _session: &mut Session,
        body: &mut Option<Bytes>,
        end_of_stream: bool,
        ctx: &mut Ctx,
    ) -> Result<()> {
        if let Some(mirror) = &mut ctx.mirror {
            if !mirror.feed(body.as_ref(), end_of_stream) {
                ctx.mirror = None;
            }
        }
        if end_of_stream && ctx.deadline.is_none() {
            let timeout = ctx.route.as_ref().and_then(|r| r.config.timeout);
            ctx.deadline = timeout.map(|t| Clock::now() + t);
        }
        Ok(())
    }

    /// Mode mesh: the connection's server must carry one of the service's identities before
    /// the request goes out on it. Reused connections too: Pingora shares a new HTTP/2
    /// connection before this check has passed on it (a lookup once it has).
    async fn connected_to_upstream(
        &self,
        _session: &mut Session,
        _reused: bool,
        _peer: &HttpPeer,
        #[cfg(unix)] _fd: std::os::unix::io::RawFd,
        #[cfg(windows)] _sock: std::os::windows::io::RawSocket,
        digest: Option<&Digest>,
        ctx: &mut Ctx,
    ) -> Result<()> {
        let (Some(service), Some(addr)) = (&ctx.service, ctx.upstream) else {
            return Ok(());
        };
        let Some(tls) = &service.tls else {
            return Ok(());
        };
        let ssl = digest.and_then(|d| d.ssl_digest.as_deref());
        tls.check_identity(addr, ssl).await.map_err(Error::into_up)
    }

    async fn upstream_request_filter(
        &self,
        session: &mut Session,
        upstream: &mut RequestHeader,
        ctx: &mut Ctx,
    ) -> Result<()> {
        // HTTP/1.0 may leave out Host, which the HTTP/1.1 request upstream needs: an
        // absolute URI's authority, else the endpoint's address, stands in (as nginx sends its
        // upstream's).
        let req = session.req_header();
        let default_host = match req.version {
            Version::HTTP_10 if !req.headers.contains_key(http::header::HOST) => {
                match raw_target_authority(req.raw_path()).authority() {
                    Some(authority) => Some(HeaderValue::from_bytes(authority)),
                    None => ctx.upstream.map(|a| HeaderValue::from_str(&a.to_string())),
                }
                .transpose()
                .or_err(ErrorType::InvalidHTTPHeader, "bad host")?
            }
            _ => None,
        };
        let tracer = self.tracer.as_ref();
        prepare_upstream(upstream, Downstream::of(session), default_host, tracer, ctx)
    }

    /// Outlier detection sees every response; a retriable one becomes a retry.
    async fn upstream_response_filter(
        &self,
        session: &mut Session,
        response: &mut ResponseHeader,
        ctx: &mut Ctx,
    ) -> Result<()> {
        let status = response.status.as_u16();
        if status < 200 {
            // A switch the client never asked for would leave it waiting on a tunnel that
            // never opens: the upstream is wrong, 502 (as Envoy answers).
            let asked = session
                .req_header()
                .headers
                .contains_key(http::header::UPGRADE);
            if status == 101 && !asked {
                return Error::e_explain(ErrorType::InvalidHTTPHeader, "101 to no Upgrade")
                    .map_err(|e| e.into_up());
            }
            return Ok(());
        }
        if status > 599 {
            // No HTTP status (RFC 9110 §15): the upstream is broken, 502 as Envoy answers.
            return Error::e_explain(ErrorType::InvalidHTTPHeader, "status over 599")
                .map_err(|e| e.into_up());
        }
        // An upstream may send its head a byte at a time, each read inside its timeout.
        if past(ctx.deadline) {
            return Err(Error::explain(ErrorType::ReadTimedout, "request deadline"));
        }
        self.report(ctx, TryResult::Status(status));
        let on = ctx.route.as_ref().map(|r| &r.config.retry.on);
        // A failed gRPC call is an HTTP 200 with its status in `grpc-status`: in the headers
        // when it failed before any message (a trailers-only response), the only case a
        // retry can still take back, as in Envoy.
        let grpc = on
            .filter(|on| !on.grpc.is_empty())
            .and_then(|_| grpc_status(response));
        let failure = grpc.map_or(Failure::Status(status), Failure::Grpc);
        if on.is_some_and(|on| retriable(on, failure)) && self.should_retry(session, ctx, failure) {
            ctx.status_retry = true;
            let mut e = Error::explain(ErrorType::HTTPStatus(status), "retrying");
            e.set_retry(true);
            return Err(e);
        }
        Ok(())
    }

    /// The deadline also bounds a response that is already streaming.
    fn upstream_response_body_filter(
        &self,
        _session: &mut Session,
        _body: &mut Option<Bytes>,
        _end_of_stream: bool,
        ctx: &mut Ctx,
    ) -> Result<Option<Duration>> {
        if past(ctx.deadline) {
            return Err(Error::explain(ErrorType::ReadTimedout, "request deadline"));
        }
        Ok(None)
    }

    async fn response_filter(
        &self,
        session: &mut Session,
        response: &mut ResponseHeader,
        ctx: &mut Ctx,
    ) -> Result<()> {
        let ops = ctx.route.as_ref().map(|r| &r.config.response_headers);
        let upgraded = response.status == http::StatusCode::SWITCHING_PROTOCOLS;
        // No framing where there is no content (RFC 9110 §8.6: an HTTP/2 client takes a 204's
        // Content-Length as a malformed stream), nor chunks for an HTTP/1.0 client, which
        // cannot read them (RFC 9112 §6.1): its body ends when the connection closes.
        let close_delimited = session.req_header().version == Version::HTTP_10
            && response
                .headers
                .contains_key(http::header::TRANSFER_ENCODING);
        if close_delimited || session.is_process_shutting_down() {
            // Pingora says keep-alive or close before it frames the body: say close. And
            // once the process drains, the connection closes after this answer: a client told
            // so sends no request into the close (Pingora tells only requests that start
            // after the drain began).
            session.set_keepalive(None);
        }
        let unframed = response.status == http::StatusCode::NO_CONTENT || close_delimited;
        // A proxy sends its own HTTP version (RFC 9110 §6.2), as nginx and Envoy do: an
        // HTTP/1.0 upstream's status line would tell an HTTP/1.1 client the connection ends.
        if response.version < Version::HTTP_11 {
            response.set_version(Version::HTTP_11);
        }
        edit_response(response, |headers| {
            if !upgraded {
                strip_hop_by_hop(headers, &RESPONSE_HOP_BY_HOP);
            }
            if unframed {
                headers.remove(http::header::TRANSFER_ENCODING);
                headers.remove(http::header::CONTENT_LENGTH);
            }
            headers.insert(X_REQUEST_ID, ctx.request_id.clone());
            ops.map_or(Ok(()), |ops| apply_header_ops(headers, ops))
        })
    }

    /// Failures that carry a flag are in the access log already.
    fn suppress_error_log(&self, _session: &Session, ctx: &Ctx, _error: &Error) -> bool {
        !ctx.flags.is_empty()
    }

    /// The request in Pingora's error log (a failed try): as the access log has it, without
    /// the query string, which may carry secrets, and with the request id that finds its
    /// access log line.
    fn request_summary(&self, session: &Session, ctx: &Ctx) -> String {
        let req = session.req_header();
        let host = (req
            .headers
            .get(http::header::HOST)
            .and_then(|h| h.to_str().ok()))
        .or_else(|| req.uri.authority().map(|a| a.as_str()))
        .unwrap_or("");
        let id = ctx.request_id.to_str().unwrap_or("");
        format!(
            "{} {}, Host: {host}, x-request-id: {id}",
            req.method,
            req.uri.path()
        )
    }

    fn fail_to_connect(
        &self,
        session: &mut Session,
        _peer: &HttpPeer,
        ctx: &mut Ctx,
        mut e: Box<Error>,
    ) -> Box<Error> {
        self.report(ctx, TryResult::NoResponse);
        let retry = self.should_retry(session, ctx, Failure::ConnectFailure);
        // A connect failure that a retry recovers from is no flag of the request's.
        if !retry {
            ctx.flags = with_exhausted("UF", ctx.flags);
        }
        e.set_retry(retry);
        e
    }

    fn error_while_proxy(
        &self,
        _peer: &HttpPeer,
        session: &mut Session,
        mut e: Box<Error>,
        ctx: &mut Ctx,
        client_reused: bool,
    ) -> Box<Error> {
        if std::mem::take(&mut ctx.status_retry) {
            return e;
        }
        if e.esource() != &ErrorSource::Upstream || session.response_written().is_some() {
            e.set_retry(false);
            return e;
        }
        let failure = match e.etype() {
            _ if certificate_refused(&e) => Failure::ConnectFailure,
            ErrorType::ReadTimedout | ErrorType::WriteTimedout => Failure::Timeout,
            // A mesh identity check: the request was not sent.
            ErrorType::TLSHandshakeFailure | ErrorType::ConnectTimedout => Failure::ConnectFailure,
            ErrorType::H2Error if refused_stream(&e) => Failure::RefusedStream,
            _ => Failure::Reset,
        };
        // A pooled connection the upstream had closed says nothing about the endpoint.
        if !client_reused {
            self.report(ctx, TryResult::NoResponse);
        }
        let retry = self.should_retry(session, ctx, failure);
        if !retry
            && session.req_header().method.is_idempotent()
            && !session.as_ref().retry_buffer_truncated()
        {
            // Pingora's own rule: a stale keep-alive connection is retried on a fresh one.
            e.retry.decide_reuse(client_reused);
        } else {
            e.set_retry(retry);
        }
        e
    }

    /// The one place where errors become statuses and flags.
    async fn fail_to_proxy(&self, session: &mut Session, e: &Error, ctx: &mut Ctx) -> FailToProxy {
        use ErrorType::*;
        let (code, flags, body): (u16, &'static str, &'static [u8]) = match e.etype() {
            HTTPStatus(code) => (*code, ctx.flags, flag_body(ctx.flags)),
            // Whichever wait ran out (a connect, a read, a write), it ran out with the route's
            // timeout: the whole request is late.
            ConnectTimedout | TLSHandshakeTimedout | ReadTimedout | WriteTimedout
                if past(ctx.deadline) =>
            {
                (504, "DT", b"request deadline exceeded\n")
            }
            ConnectTimedout | ConnectRefused | ConnectNoRoute | ConnectError | BindError
            | SocketError | TLSHandshakeFailure | TLSHandshakeTimedout | InvalidCert
            | HandshakeError => (503, "UF", b"upstream connect error\n"),
            _ if e.esource() == &ErrorSource::Upstream && certificate_refused(e) => {
                (503, "UF", b"upstream connect error\n")
            }
            ReadTimedout | WriteTimedout if e.esource() == &ErrorSource::Upstream => {
                (504, "UT", b"upstream timeout\n")
            }
            // A client that stalls its body, or stops reading the answer.
            ReadTimedout | WriteTimedout if e.esource() == &ErrorSource::Downstream => {
                (408, "SI", b"request timeout\n")
            }
            // An HTTP/2 client that resets its stream fails the write as an H2Error.
            ReadError | WriteError | ConnectionClosed | H2Error
                if e.esource() == &ErrorSource::Downstream =>
            {
                (0, "DC", b"")
            }
            _ => match e.esource() {
                ErrorSource::Upstream => (502, "UC", b"upstream connection error\n"),
                ErrorSource::Downstream => (400, "", b"bad request\n"),
                _ => (500, "", b"internal error\n"),
            },
        };
        ctx.flags = with_exhausted(flags, ctx.flags);
        if code > 0 && session.response_written().is_none() {
            // The connection closes after this answer (`can_reuse_downstream` below): say so.
            session.set_keepalive(None);
            let _ = respond(session, ctx, code, Bytes::from_static(body), None).await;
        }
        FailToProxy {
            error_code: code,
            can_reuse_downstream: false,
        }
    }

    async fn logging(&self, session: &mut Session, _e: Option<&Error>, ctx: &mut Ctx) {
        let now = Instant::now();
        connection::request_done(now);
        if ctx.delayed {
            ctx.flags = after_delay(ctx.flags);
        }
        // An interim answer (100 Continue) alone is no status: the client left before one.
        let status = (session.response_written())
            .map(|r| r.status.as_u16())
            .filter(|&s| s >= 200 || s == 101)
            .unwrap_or(0);
        let took = now - ctx.started;
        let listener = self.listener_name(ctx);
        match &ctx.snapshot {
            Some(snapshot) if ctx.passed_through() => {
                snapshot.record_passthrough(status, ctx.flags, took);
            }
            Some(snapshot) => {
                let (route, service) = (ctx.route.as_deref(), ctx.service.as_ref());
                snapshot.record_request(listener, route, service, status, ctx.flags, took);
            }
            // Ended before routing began (an error in an earlier phase).
            None => (self.reloader.snapshot())
                .record_request(listener, None, None, status, ctx.flags, took),
        }
        let span = ctx.span.take();
        if !self.access_log.enabled() && span.is_none() {
            return;
        }
        let trace_id = span.as_ref().and_then(RequestSpan::trace_id);
        let downstream = Downstream::of(session);
        let req = session.req_header();
        let authority = authority_of(req);
        let entry = Entry {
            request_id: ctx.request_id.to_str().unwrap_or(""),
            listener: self.listener_name(ctx),
            client: client_ip(session),
            method: req.method.as_str(),
            protocol: match req.version {
                Version::HTTP_2 => "HTTP/2",
                Version::HTTP_10 => "HTTP/1.0",
                Version::HTTP_09 => "HTTP/0.9",
                Version::HTTP_3 => "HTTP/3",
                _ => "HTTP/1.1",
            },
            authority,
            path: req.uri.path(),
            status,
            flags: ctx.flags,
            route: ctx.route.as_ref().map(|r| r.config.name.as_str()),
            service: match &ctx.service {
                Some(s) => Some(s.config.name.as_str()),
                None => ctx.passed_through().then_some(capture::PASSTHROUGH),
            },
            upstream: ctx.upstream,
            duration: took,
            generation: ctx.snapshot.as_ref().map_or(0, |s| s.generation),
            peer: downstream.peer().map(|p| p.identity.principal()),
            trace_id: trace_id.as_deref(),
            // Body bytes, as Envoy's `%BYTES_RECEIVED%` and `%BYTES_SENT%` count them for HTTP.
            bytes: Some(BodyBytes {
                received: session.body_bytes_read() as u64,
                sent: session.body_bytes_sent() as u64,
            }),
        };
        if self.access_log.enabled() {
            self.access_log.write(&entry);
        }
        if let Some(span) = span {
            span.end(&entry);
        }
    }
}

/// Keeps one short timer pending on this thread's runtime, started by its first request.
///
/// The pool's idle timers (`idle_timeout`, 60 s) run on tokio's wheel (see `server.rs`). Tokio
/// wakes its driver, with a `write` syscall, whenever a timer is armed earlier than the
/// driver's next planned wake-up, and with no timer pending that is every one: a keep-alive
/// connection's idle timer is armed at each release and dropped at each reuse. A pending
/// 1 s tick makes those arms free.
fn keep_timer_wheel_warm() {
    thread_local!(static WARM: std::cell::Cell<bool> = const { std::cell::Cell::new(false) });
    if WARM.get() {
        return;
    }
    if let Ok(runtime) = tokio::runtime::Handle::try_current() {
        WARM.set(true);
        runtime.spawn(async {
            let mut tick = tokio::time::interval(Duration::from_secs(1));
            loop {
                tick.tick().await;
            }
        });
    }
}

/// Who sent the request, and over what: read from the session where needed, not kept in
/// `Ctx`, which Pingora's futures move by value at every step.
struct Downstream<'a> {
    client: Option<IpAddr>,
    /// The connection's TLS: version, cipher and the client certificate's identity.
    tls: Option<&'a SslDigest>,
}

impl Downstream<'_> {
    fn of(session: &Session) -> Downstream<'_> {
        Downstream {
            client: client_ip(session),
            tls: session.digest().and_then(|d| d.ssl_digest.as_deref()),
        }
    }

    fn scheme(&self) -> &'static str {
        if self.tls.is_some() {
            "https"
        } else {
            "http"
        }
    }

    fn peer(&self) -> Option<&crate::tls::TlsPeer> {
        self.tls.and_then(crate::tls::tls_peer)
    }
}

/// The request as it goes upstream (to the chosen service or a mirror): `default_host` when
/// it has no Host, forwarding headers, the route's rewrite and request header changes.
fn prepare_upstream(
    upstream: &mut RequestHeader,
    downstream: Downstream<'_>,
    default_host: Option<HeaderValue>,
    tracer: Option<&Tracer>,
    ctx: &Ctx,
) -> Result<()> {
    let route = ctx.route.as_ref().map(|r| &r.config);
    edit_request(upstream, |parts| {
        let headers = &mut parts.headers;
        headers.reserve(3);
        if let Some(host) = default_host {
            headers.insert(http::header::HOST, host);
        }
        // Edge proxy: append the peer to X-Forwarded-For, say how the client reached us.
        if let Some(ip) = downstream.client {
            let mut text = [0; IP_TEXT_MAX];
            let ip = ip_text(ip, &mut text);
            // One lookup for both reading the prior value and replacing it; one allocation
            // for the value (a `Vec` of exact size becomes `Bytes` without another).
            let entry = headers.entry(X_FORWARDED_FOR);
            let xff = match &entry {
                // Repeated headers are one list (RFC 9110 §5.3): every hop so far is kept.
                HeaderEntry::Occupied(prior) => {
                    let mut list = Vec::with_capacity(prior.iter().map(|v| v.len() + 2).sum());
                    for hop in prior.iter().filter(|v| !v.is_empty()) {
                        list.extend_from_slice(hop.as_bytes());
                        list.extend_from_slice(b", ");
                    }
                    list.extend_from_slice(ip);
                    Bytes::from(list)
                }
                HeaderEntry::Vacant(_) => Bytes::copy_from_slice(ip),
            };
            let xff = HeaderValue::from_maybe_shared(xff)
                .or_err(ErrorType::InvalidHTTPHeader, "bad x-forwarded-for")?;
            match entry {
                HeaderEntry::Occupied(mut prior) => {
                    prior.insert(xff);
                }
                HeaderEntry::Vacant(place) => {
                    place.insert(xff);
                }
            }
        }
        // The edge says how the client reached it. Inside the mesh a sidecar keeps what the
        // edge said (its own hop is mTLS whatever the client used), as Istio's do; an app
        // that redirects http to https must see the client's scheme.
        let sidecar = ctx
            .snapshot
            .as_ref()
            .is_some_and(|s| s.config.sidecar.is_some());
        if !(sidecar && headers.contains_key(X_FORWARDED_PROTO)) {
            let proto = HeaderValue::from_static(downstream.scheme());
            headers.insert(X_FORWARDED_PROTO, proto);
        }
        headers.insert(X_REQUEST_ID, ctx.request_id.clone());
        // Only Weir says who the client certificate named: a client's own claim is dropped
        // (Envoy's SANITIZE_SET).
        headers.remove(X_FORWARDED_CLIENT_CERT);
        if let Some(forwarded) = downstream.peer().and_then(|p| p.forwarded.clone()) {
            headers.insert(X_FORWARDED_CLIENT_CERT, forwarded);
        }
        if let (Some(tracer), Some(span)) = (tracer, &ctx.span) {
            tracer.inject(span, headers);
        }
        let Some(r) = route else {
            return Ok(());
        };
        if let Some(host) = r.rewrite.as_ref().and_then(|w| w.host.as_deref()) {
            headers.insert(http::header::HOST, header_value(host)?);
        }
        apply_header_ops(headers, &r.request_headers)
    })?;
    let Some(r) = route else {
        return Ok(());
    };
    if let Some(prefix) = r.rewrite.as_ref().and_then(|w| w.path_prefix.as_ref()) {
        let matched = ctx.block.and_then(|b| r.matches[b].path.as_ref());
        let rest = match matched {
            Some(PathMatch::Prefix(p)) => upstream.uri.path().get(p.len()..).unwrap_or(""),
            _ => "",
        };
        let path = format!("{prefix}{rest}");
        set_path(upstream, &path)?;
    }
    Ok(())
}

/// `wait` (an injected delay, a retry's backoff, a place in line for a connection), cut short
/// when the client leaves: its request goes no further, takes no place in line and reaches no
/// upstream (as with Envoy's fault filter and connection pool queue). A request is watched
/// when its body is empty or all read (as before every retry): an HTTP/1 socket can then be
/// read without taking body bytes (a pipelined next request's are kept for it), and an
/// HTTP/2 stream's reset, or its connection's close, ends the wait.
async fn unless_client_leaves<T>(
    session: &mut Session,
    wait: impl Future<Output = T>,
) -> Result<T> {
    let downstream = session.as_mut();
    let watched = downstream.is_body_empty() || downstream.is_body_done();
    if !watched {
        return Ok(wait.await);
    }
    tokio::pin!(wait);
    tokio::select! {
        out = &mut wait => Ok(out),
        gone = downstream.read_body_or_idle(true) => match gone {
            Err(e) => Err(e.into_down()),
            // Only a close ends the idle read; nothing else comes here.
            Ok(_) => Ok(wait.await),
        },
    }
}

/// Whether the upstream refused this proxy's certificate: TLS 1.3 finishes the client's side
/// of the handshake before the server checks its certificate (RFC 8446 §4.4.2), so the
/// server's alert arrives at the first read, after the request was written, which the
/// upstream never took. A connect failure all the same, as Envoy counts it.
fn certificate_refused(e: &Error) -> bool {
    matches!(
        crate::tls::rustls_error(e),
        Some(weir_tls::rustls::Error::AlertReceived(_))
    )
}

/// RFC 9112 §3.2: a request with more than one Host, or a Host that is no URI authority (a
/// space, a `/`, a second name after ", ", a port that is not digits), gets 400, as from
/// nginx: passed on, Weir's routing and the upstream could each read another host from it.
fn host_is_valid(req: &RequestHeader) -> bool {
    let mut hosts = req.headers.get_all(http::header::HOST).iter();
    let Some(host) = hosts.next() else {
        return true;
    };
    let host = host.as_bytes();
    let authority = |b: &u8| b.is_ascii_alphanumeric() || b"-._~%!$&'()*+,;=:[]".contains(b);
    // A name, or an IPv6 address in brackets; then nothing, or `:` and the port's digits.
    let end = match host.first() {
        Some(b'[') => host.iter().position(|&b| b == b']').map(|i| i + 1),
        _ => Some(host.iter().position(|&b| b == b':').unwrap_or(host.len())),
    };
    let Some((name, rest)) = end.map(|end| host.split_at(end)) else {
        return false;
    };
    let brackets = name.iter().filter(|&&b| b == b'[' || b == b']').count();
    let name_ok = brackets == 0 || (brackets == 2 && name.starts_with(b"["));
    let port_ok = match rest.split_first() {
        None => true,
        Some((b':', port)) => port.iter().all(u8::is_ascii_digit),
        Some(_) => false,
    };
    hosts.next().is_none() && host.iter().all(authority) && name_ok && port_ok
}

/// Whether the request's body comes in a transfer coding Weir can pass on: none, or `chunked`
/// alone. Pingora would take `gzip, chunked` apart, drop the gzip and send the body on as if
/// plain: corrupted. Such a request gets 501 (RFC 9112 §6.1), as from nginx and Envoy.
fn transfer_coding_known(req: &RequestHeader) -> bool {
    (req.headers.get_all(http::header::TRANSFER_ENCODING).iter())
        .all(|v| v.as_bytes().trim_ascii().eq_ignore_ascii_case(b"chunked"))
}

/// `Content-Length: 5,5`, or the field twice with one value (Pingora refuses differing ones):
/// the length alone, as RFC 9110 §8.6 allows, since a strict upstream refuses the list.
fn one_content_length(req: &mut RequestHeader) {
    let lengths = req.headers.get_all(http::header::CONTENT_LENGTH);
    let mut values = lengths.iter();
    let Some(first) = values.next() else { return };
    if values.next().is_none() && !first.as_bytes().contains(&b',') {
        return;
    }
    let first = first
        .as_bytes()
        .split(|&b| b == b',')
        .next()
        .unwrap_or_default();
    if let Ok(length) = HeaderValue::from_bytes(first.trim_ascii()) {
        let _ = req.insert_header(http::header::CONTENT_LENGTH, length);
    }
}

/// How long a write may wait for its reader (the upstream reading a request, the client its
/// answer), and a request with a body for each read of its answer, when no timeout is
/// tighter: Envoy's stream_idle_timeout.
const STREAM_IDLE: Duration = Duration::from_secs(300);

/// Whether the route's timeout has run out.
fn past(deadline: Option<Clock>) -> bool {
    deadline.is_some_and(|d| Clock::now() >= d)
}

/// The flags of a failure that used up the retries: its own flag and `URX`, as Envoy logs
/// `UF,URX`.
fn with_exhausted(flag: &'static str, so_far: &str) -> &'static str {
    match (flag, so_far) {
        (_, so_far) if !so_far.ends_with("URX") => flag,
        ("UF", _) => "UF,URX",
        ("UC", _) => "UC,URX",
        ("UT", _) => "UT,URX",
        _ => flag,
    }
}

/// The flags of a request an injected delay held back: `FI` first, then whatever came after
/// it (a client that left, an upstream that failed), as Envoy logs `DI` beside the others, so
/// that a search for `FI` finds the delayed requests that failed too.
fn after_delay(flags: &'static str) -> &'static str {
    match flags {
        "" | "FI" => "FI",
        "DC" => "FI,DC",
        "DT" => "FI,DT",
        "UF" => "FI,UF",
        "UF,URX" => "FI,UF,URX",
        "UC" => "FI,UC",
        "UC,URX" => "FI,UC,URX",
        "UT" => "FI,UT",
        "UT,URX" => "FI,UT,URX",
        "URX" => "FI,URX",
        "UH" => "FI,UH",
        "UO" => "FI,UO",
        "SI" => "FI,SI",
        other => other,
    }
}

/// HTTP/2 may split `Cookie` into one field per cookie; an HTTP/1.1 server may read only the
/// first, so they go on as one, joined by "; " (RFC 9113 §8.2.3), as Envoy sends them.
fn join_cookies(headers: &mut http::HeaderMap) -> Result<()> {
    let HeaderEntry::Occupied(mut cookies) = headers.entry(http::header::COOKIE) else {
        return Ok(());
    };
    if cookies.iter().nth(1).is_none() {
        return Ok(());
    }
    let joined = (cookies.iter().map(|v| v.as_bytes()))
        .collect::<Vec<_>>()
        .join(&b"; "[..]);
    let joined = HeaderValue::from_maybe_shared(Bytes::from(joined))
        .or_err(ErrorType::InvalidHTTPHeader, "bad cookie")?;
    cookies.insert(joined);
    Ok(())
}

/// Edits a request's headers as plain `http` parts. Pingora's parsed headers keep a second,
/// case-preserving map that every insert pays for (a name parse and an allocation); the
/// parts take constant names. Header names then go out in canonical case, as Envoy sends
/// them. Moving the parts out and back copies nothing; a target that is not UTF-8 keeps its
/// raw bytes.
pub(crate) fn edit_request(
    req: &mut RequestHeader,
    edit: impl FnOnce(&mut http::request::Parts) -> Result<()>,
) -> Result<()> {
    let raw = (!req.raw_path_is_utf8()).then(|| req.raw_path().to_vec());
    let empty = RequestHeader::from(http::Request::new(()).into_parts().0);
    let mut parts: http::request::Parts = std::mem::replace(req, empty).into();
    let edited = edit(&mut parts);
    *req = parts.into();
    if let Some(raw) = raw {
        req.set_raw_path(&raw)?;
    }
    edited
}

/// [`edit_request`] for a response.
fn edit_response(
    resp: &mut ResponseHeader,
    edit: impl FnOnce(&mut http::HeaderMap) -> Result<()>,
) -> Result<()> {
    let empty = ResponseHeader::from(http::Response::new(()).into_parts().0);
    let mut parts: http::response::Parts = std::mem::replace(resp, empty).into();
    let edited = edit(&mut parts.headers);
    *resp = parts.into();
    edited
}

/// Drops the headers `Connection` names, then `also`.
pub(crate) fn strip_hop_by_hop(headers: &mut http::HeaderMap, also: &[HeaderName]) {
    // One look at each of the message's few headers first: most carry none of these but a
    // `Connection` of keep-alive or close (which names no other header), and a lookup per
    // name would cost more than the look.
    let any = headers.iter().any(|(name, value)| {
        also.contains(name)
            || (name == http::header::CONNECTION && connection_names(value).next().is_some())
    });
    if !any {
        return;
    }
    let connection = headers.get_all(http::header::CONNECTION);
    if connection
        .iter()
        .any(|v| connection_names(v).next().is_some())
    {
        let names: Vec<HeaderName> = (connection.iter().flat_map(connection_names))
            .filter_map(|token| HeaderName::from_bytes(token).ok())
            .collect();
        for name in names {
            headers.remove(name);
        }
    }
    for name in also {
        headers.remove(name);
    }
}

/// The header names a `Connection` value lists, but for keep-alive and close.
fn connection_names(value: &HeaderValue) -> impl Iterator<Item = &[u8]> {
    (value
        .as_bytes()
        .split(|&b| b == b',')
        .map(<[u8]>::trim_ascii))
    .filter(|token| {
        !token.is_empty()
            && !token.eq_ignore_ascii_case(b"keep-alive")
            && !token.eq_ignore_ascii_case(b"close")
    })
}

/// Applies a route's header changes: remove, then set, then add. The names and values were
/// checked when the config was loaded.
fn apply_header_ops(headers: &mut http::HeaderMap, ops: &HeaderOps) -> Result<()> {
    for name in &ops.remove {
        headers.remove(name.as_str());
    }
    for (name, value) in &ops.set {
        headers.insert(header_name(name)?, header_value(value)?);
    }
    for (name, value) in &ops.add {
        headers.append(header_name(name)?, header_value(value)?);
    }
    Ok(())
}

fn header_name(name: &str) -> Result<HeaderName> {
    HeaderName::from_bytes(name.as_bytes()).or_err(ErrorType::InvalidHTTPHeader, "header name")
}

fn header_value(value: &str) -> Result<HeaderValue> {
    HeaderValue::from_str(value).or_err(ErrorType::InvalidHTTPHeader, "header value")
}

/// Waits in the service's bounded line for a place under `max_connections`, until the
/// request's deadline; a failure is the status and flags to answer with.
async fn wait_for_place(
    service: &ServiceState,
    deadline: Option<Clock>,
) -> std::result::Result<OwnedSemaphorePermit, (u16, &'static str)> {
    let place = service.connections.acquire();
    let place = match deadline {
        Some(d) => tokio::time::timeout_at(d, place)
            .await
            .map_err(|_| (504, "DT"))?,
        None => place.await,
    };
    place.map_err(|_| (503, "UO"))
}

/// A response's `grpc-status`, when it has one and it is not OK.
fn grpc_status(response: &ResponseHeader) -> Option<u8> {
    let value = response.headers.get("grpc-status")?.to_str().ok()?;
    value.parse().ok().filter(|&code| code != 0)
}

/// An HTTP/2 upstream reset the stream with REFUSED_STREAM: it did not process the request
/// (RFC 9113 §8.7), so even a POST may go again.
fn refused_stream(e: &Error) -> bool {
    let cause = e.root_cause().downcast_ref::<h2::Error>();
    cause.is_some_and(|h2| h2.is_remote() && h2.reason() == Some(h2::Reason::REFUSED_STREAM))
}

/// A failure the proxy answers itself, with `flags`; `fail_to_proxy` writes the answer.
fn fail_with(ctx: &mut Ctx, status: u16, flags: &'static str) -> Box<Error> {
    ctx.flags = flags;
    Error::explain(ErrorType::HTTPStatus(status), flags)
}

/// The body of the proxy's own answer for a flag.
fn flag_body(flags: &str) -> &'static [u8] {
    match flags {
        "UH" => b"no healthy upstream\n",
        "UO" => b"upstream overflow\n",
        "DT" => b"request deadline exceeded\n",
        _ => b"",
    }
}

fn count_fault(route: &CompiledRoute, kind: &str) {
    weir_telemetry::metrics()
        .faults_injected
        .with_label_values(&[route.config.name.as_str(), kind])
        .inc();
}

/// Writes a complete response from the proxy itself (no route, direct response, redirect,
/// fault, errors), with the route's response header changes when there is a route.
///
/// Boxed, because it is the rare branch of `request_filter`, whose future Pingora allocates
/// for every request: inline, this state (Pingora's write futures) would make that
/// allocation, and the copy into it, a kilobyte bigger on every request.
fn respond<'a>(
    session: &'a mut Session,
    ctx: &'a Ctx,
    status: u16,
    body: Bytes,
    location: Option<String>,
) -> Pin<Box<dyn Future<Output = Result<()>> + Send + 'a>> {
    Box::pin(respond_now(session, ctx, status, body, location))
}

async fn respond_now(
    session: &mut Session,
    ctx: &Ctx,
    status: u16,
    body: Bytes,
    location: Option<String>,
) -> Result<()> {
    let mut resp = ResponseHeader::build_no_case(status, Some(5))?;
    let ops = ctx.route.as_ref().map(|r| &r.config.response_headers);
    // 204 and 304 carry no content, so no length either (RFC 9110 §8.6).
    let content = !matches!(status, 204 | 304);
    edit_response(&mut resp, |headers| {
        if content {
            headers.insert(http::header::CONTENT_LENGTH, HeaderValue::from(body.len()));
        }
        if content && !body.is_empty() {
            let text = HeaderValue::from_static("text/plain; charset=utf-8");
            headers.insert(http::header::CONTENT_TYPE, text);
        }
        if let Some(location) = location {
            headers.insert(http::header::LOCATION, header_value(&location)?);
        }
        headers.insert(X_REQUEST_ID, ctx.request_id.clone());
        ops.map_or(Ok(()), |ops| apply_header_ops(headers, ops))
    })?;
    // The answer to HEAD has the headers of GET's and no body; Pingora leaves it out on
    // HTTP/1.1 but would send it as DATA on HTTP/2, a malformed stream (RFC 9113 §8.1.1).
    let empty = body.is_empty() || !content || session.req_header().method == http::Method::HEAD;
    if session.is_process_shutting_down() {
        session.set_keepalive(None); // as in `response_filter`
    }
    // A write that fails is the client's doing (it left, or reset the stream): `DC`, as for a
    // proxied answer, not the 500 of an error of unknown source.
    let header = session.write_response_header(Box::new(resp), false).await;
    header.map_err(|e| e.into_down())?;
    // A body write always ends it, empty or not: Pingora's header write never ends an
    // HTTP/2 stream, and on the error path (`fail_to_proxy`) a stream not ended is reset.
    let body = if empty { Bytes::new() } else { body };
    let written = session.write_response_body(Some(body), true).await;
    written.map_err(|e| e.into_down())
}

/// The Location of a redirect: each part from the config, else from the request; the query
/// is kept. `None` when the request's host, needed, is no URL authority.
fn redirect_location(req: &RequestHeader, r: &Redirect, request_scheme: &str) -> Option<String> {
    let scheme = r.scheme.as_deref().unwrap_or(request_scheme);
    let host = match &r.host {
        Some(host) => host.clone(),
        None => {
            let host = (req.uri.authority().map(|a| a.as_str()))
                .or_else(|| (req.headers.get(http::header::HOST)).and_then(|h| h.to_str().ok()))
                .unwrap_or("");
            // An empty port (`good.com:`) is no port (RFC 3986 §3.2.3).
            let host = host.strip_suffix(':').unwrap_or(host);
            if !host.is_empty() {
                let authority = host.parse::<http::uri::Authority>().ok()?;
                // `http` takes any port text; a port is digits.
                if authority.port().is_none() && authority.as_str() != authority.host() {
                    return None;
                }
            }
            // A new scheme means a new default port: drop the one the request named.
            match (&r.scheme, host.rsplit_once(':')) {
                (Some(_), Some((name, port)))
                    if !port.is_empty()
                        && port.bytes().all(|b| b.is_ascii_digit())
                        && (!name.contains(':') || name.ends_with(']')) =>
                {
                    name.to_string()
                }
                _ => host.to_string(),
            }
        }
    };
    let path = r.path.as_deref().unwrap_or(req.uri.path());
    // No host at all (HTTP/1.0 may send none): a reference relative to the request's own,
    // since `https:///new` is no URL; but one relative to the request's scheme would send
    // the client back the way it came, again and again.
    let origin = match host.is_empty() {
        true if scheme != request_scheme => return None,
        true => String::new(),
        false => format!("{scheme}://{host}"),
    };
    Some(match req.uri.query() {
        Some(q) => format!("{origin}{path}?{q}"),
        None => format!("{origin}{path}"),
    })
}

/// The bytes a consistent-hash service hashes for this request, if the request has them.
fn hash_key(session: &Session, on: &HashOn) -> Option<Vec<u8>> {
    let headers = &session.req_header().headers;
    match on {
        HashOn::Header(name) => headers.get(name.as_str()).map(|v| v.as_bytes().to_vec()),
        HashOn::Cookie(name) => headers
            .get_all("cookie")
            .iter()
            .filter_map(|v| v.to_str().ok())
            .find_map(|c| weir_resilience::cookie(c, name))
            .map(|v| v.as_bytes().to_vec()),
        HashOn::SourceIp => client_ip(session).map(|ip| match ip {
            IpAddr::V4(v4) => v4.octets().to_vec(),
            IpAddr::V6(v6) => v6.octets().to_vec(),
        }),
    }
}

/// Replaces the path of the request URI, keeping its query.
fn set_path(req: &mut RequestHeader, path: &str) -> Result<()> {
    let path_and_query = match req.uri.query() {
        Some(q) => format!("{path}?{q}"),
        None => path.to_string(),
    };
    let mut parts = req.uri.clone().into_parts();
    parts.path_and_query = Some(path_and_query.parse().map_err(|_| {
        Error::explain(ErrorType::InvalidHTTPHeader, "bad path after normalization")
    })?);
    let uri = http::Uri::from_parts(parts)
        .map_err(|_| Error::explain(ErrorType::InvalidHTTPHeader, "bad URI after normalization"))?;
    req.set_uri(uri);
    Ok(())
}

/// The request's host, lower case, without port: from the URI (HTTP/2, absolute form) or Host.
/// Borrowed unless it has upper-case letters; empty when it is not visible ASCII.
/// The authority as the client sent it, port and all (the URI's, else `Host`), for the
/// access log: Envoy's `%REQ(:AUTHORITY)%`.
fn authority_of(req: &RequestHeader) -> &str {
    let sent = match req.uri.authority() {
        Some(authority) => Some(authority.as_str().as_bytes()),
        None => match req.headers.get(http::header::HOST) {
            Some(host) => Some(host.as_bytes()),
            None => raw_target_authority(req.raw_path()).authority(),
        },
    };
    sent.and_then(|a| std::str::from_utf8(a).ok()).unwrap_or("")
}

fn host_of(req: &RequestHeader) -> Cow<'_, str> {
    let raw = match req.uri.host() {
        Some(host) => host.as_bytes(),
        None => match req.headers.get(http::header::HOST) {
            Some(host) => host.as_bytes(),
            // HTTP/1.0 with an absolute URI and no Host (Pingora keeps the authority off `uri`).
            None => raw_target_authority(req.raw_path())
                .authority()
                .unwrap_or_default(),
        },
    };
    let host = match raw.strip_prefix(b"[") {
        Some(v6) => v6.split(|&b| b == b']').next().unwrap_or(v6),
        None => raw
            .iter()
            .rposition(|&b| b == b':')
            .map_or(raw, |colon| &raw[..colon]),
    };
    if !host.iter().all(u8::is_ascii_graphic) {
        return Cow::Borrowed("");
    }
    // A fully qualified name's root dot (`api.example.com.`) names the same host, as nginx
    // takes it.
    let host = host.strip_suffix(b".").unwrap_or(host);
    let host = std::str::from_utf8(host).unwrap_or_default();
    if host.bytes().any(|b| b.is_ascii_uppercase()) {
        Cow::Owned(host.to_ascii_lowercase())
    } else {
        Cow::Borrowed(host)
    }
}

/// RFC 9112 §3.2: a request target is a path (`/x`), an absolute URI (`http://a/x`), `*` (for
/// OPTIONS) or, for CONNECT, a host and port. Pingora would send anything else upstream as
/// `/`, the rest of it lost; nginx answers 400, and so does Weir.
fn target_is_valid(req: &RequestHeader) -> bool {
    let target = req.raw_path();
    target.first() == Some(&b'/')
        || req.method == http::Method::CONNECT
        || (target == b"*" && req.method == http::Method::OPTIONS)
        || raw_target_authority(target).authority().is_some()
}

fn client_ip(session: &Session) -> Option<IpAddr> {
    session
        .client_addr()
        .and_then(|a| a.as_inet())
        .map(|a| a.ip())
}

/// A random UUID v4, as Envoy generates for `x-request-id`. Its bytes are shared, so the
/// copies sent upstream and back to the client are refcounts.
fn new_request_id() -> HeaderValue {
    const HEX: &[u8; 16] = b"0123456789abcdef";
    let mut bytes = fastrand::u128(..).to_be_bytes();
    bytes[6] = bytes[6] & 0x0f | 0x40; // version 4
    bytes[8] = bytes[8] & 0x3f | 0x80; // variant 10
    let mut id = [0u8; 36];
    let mut at = 0;
    for (i, b) in bytes.into_iter().enumerate() {
        if matches!(i, 4 | 6 | 8 | 10) {
            id[at] = b'-';
            at += 1;
        }
        id[at] = HEX[usize::from(b >> 4)];
        id[at + 1] = HEX[usize::from(b & 0xf)];
        at += 2;
    }
    HeaderValue::from_maybe_shared(Bytes::from_owner(id)).expect("hex digits and dashes")
}

/// The longest text of an IP address (IPv6 with an embedded IPv4 address).
const IP_TEXT_MAX: usize = 45;

/// An IP address as text, written into `buf`: no allocation. IPv4, the common case, without
/// the formatting machinery, which costs more than the rest of the X-Forwarded-For header.
fn ip_text(ip: IpAddr, buf: &mut [u8; IP_TEXT_MAX]) -> &[u8] {
    let IpAddr::V4(v4) = ip else {
        let mut rest = &mut buf[..];
        // Cannot fail: the text fits.
        let _ = write!(rest, "{ip}");
        let len = IP_TEXT_MAX - rest.len();
        return &buf[..len];
    };
    let mut len = 0;
    let mut push = |b: u8| {
        buf[len] = b;
        len += 1;
    };
    for (i, octet) in v4.octets().into_iter().enumerate() {
        if i > 0 {
            push(b'.');
        }
        if octet >= 100 {
            push(b'0' + octet / 100);
        }
        if octet >= 10 {
            push(b'0' + octet / 10 % 10);
        }
        push(b'0' + octet % 10);
    }
    &buf[..len]
}

struct HeaderView<'a>(&'a RequestHeader);

impl weir_routing::Headers for HeaderView<'_> {
    fn get(&self, name: &str) -> Option<&str> {
        let headers = &self.0.headers;
        // A lookup by `&str` parses and hashes the name; a request's few headers are
        // cheaper to scan (in order, so the first value wins as with `get`).
        let value = if headers.len() <= 8 {
            headers
                .iter()
                .find(|(k, _)| k.as_str() == name)
                .map(|(_, v)| v)
        } else {
            headers.get(name)
        };
        match value {
            Some(v) => v.to_str().ok(),
            // An HTTP/2 request's Host is its `:authority`, which Pingora keeps in the URI.
            None if name == "host" => self.0.uri.authority().map(|a| a.as_str()),
            None => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn request_ids_are_uuid_v4() {
        let id = new_request_id();
        let id = id.to_str().unwrap();
        assert_eq!(id.len(), 36);
        assert_eq!(&id[14..15], "4");
        assert!(matches!(&id[19..20], "8" | "9" | "a" | "b"), "{id}");
        assert_ne!(id, new_request_id());
    }

    #[test]
    fn ip_text_matches_display() {
        for ip in [
            "0.0.0.0",
            "1.2.3.4",
            "10.99.100.255",
            "127.0.0.1",
            "::1",
            "fe80::1",
            "ffff:ffff:ffff:ffff:ffff:ffff:255.255.255.255",
        ] {
            let ip: IpAddr = ip.parse().unwrap();
            assert_eq!(
                ip_text(ip, &mut [0; IP_TEXT_MAX]),
                ip.to_string().as_bytes()
            );
        }
    }

    #[test]
    fn host_drops_port_and_case() {
        let mut req = RequestHeader::build("GET", b"/", None).unwrap();
        req.insert_header("host", "WWW.Example.com:8080").unwrap();
        assert_eq!(host_of(&req), "www.example.com");
        req.insert_header("host", "[::1]:8080").unwrap();
        assert_eq!(host_of(&req), "::1");
        req.insert_header("host", "example.com").unwrap();
        assert_eq!(host_of(&req), "example.com");
        req.insert_header("host", "ex ample.com").unwrap();
        assert_eq!(host_of(&req), "");
    }
}
