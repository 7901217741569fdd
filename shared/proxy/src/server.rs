//! Wiring a Pingora server from a loaded config: the proxy, the admin listener, reload on
//! file change or SIGHUP, and a drain on SIGTERM or admin `POST /shutdown`, bounded by
//! `runtime.grace_period`.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context};
use async_trait::async_trait;
use pingora_core::apps::{HttpServerOptions, ServerApp};
use pingora_core::listeners::tls::Acceptor;
use pingora_core::listeners::{L4BufferSettings, ListenerConfig};
use pingora_core::protocols::l4::stream::Stream as L4Stream;
use pingora_core::protocols::{Stream, ALPN};
use pingora_core::server::configuration::{Opt, ServerConf};
use pingora_core::server::{
    RunArgs, Server, ShutdownSignal, ShutdownSignalWatch, ShutdownWatch, UnixShutdownSignalWatch,
};
use pingora_core::services::background::{background_service, BackgroundService};
use pingora_core::services::listening::Service;
use pingora_core::services::ServiceReadyNotifier;
use pingora_proxy::HttpProxy;
use prometheus::{IntCounter, IntGauge};
use tokio::signal::unix::{signal, SignalKind};
use tokio::sync::Notify;
use tracing::{debug, error, info, warn};

use crate::admin::{Admin, AdminService};
use crate::capture;
use crate::connection;
use crate::discovery::Discovery;
use crate::git::GitSource;
use crate::proxy::WeirProxy;
use crate::proxy_protocol;
use crate::reload::{Outcome, Reloader};
use crate::stream::{CapturedTcp, Passthrough};
use crate::tls;
use weir_config::{Protocol, INBOUND};
use weir_telemetry::access_log::AccessLog;
use weir_telemetry::otel::Tracing;

/// How long the config's files must be quiet before a reload.
const RELOAD_QUIET: Duration = Duration::from_millis(200);

/// Runs the gateway until SIGTERM or `POST /shutdown` (drain) or SIGINT (exit at once).
/// With `upgrade`, it first takes the listening sockets over from the gateway running on the
/// same admin address, once that one gets SIGQUIT.
/// Why a gateway config without listeners does not start (nor pass `validate`).
pub(crate) const NO_LISTENER: &str = "the config has no [[listener]]; nothing to serve";

pub fn run(reloader: Reloader, git: Option<Arc<GitSource>>, upgrade: bool) -> anyhow::Result<()> {
    let reloader = Arc::new(reloader);
    let snapshot = reloader.snapshot();
    let config = &snapshot.config;
    let listeners: Vec<(String, SocketAddr)> = config
        .listeners
        .iter()
        .map(|l| (l.name.clone(), l.listen))
        .collect();
    if listeners.is_empty() {
        bail!("{}: {NO_LISTENER}", reloader.source());
    }
    // An upgrade takes its sockets from the gateway serving on the same admin address; with
    // none there, Pingora would wait 5 s and say only "EAGAIN".
    let admin = crate::admin::reachable(config.admin.listen);
    if upgrade && std::net::TcpStream::connect_timeout(&admin, Duration::from_secs(1)).is_err() {
        bail!(
            "--upgrade: nothing answers on the admin address {admin}, so there is no gateway \
             to take the listening sockets over from; start without --upgrade"
        );
    }
    // Pingora panics in a service thread when it cannot bind; check first and say which. (An
    // upgrade is handed the sockets, which its predecessor holds.)
    let named = listeners
        .iter()
        .map(|(name, addr)| (format!("listener {name:?}"), *addr));
    for (what, addr) in named
        .chain([("[admin]".to_string(), config.admin.listen)])
        .filter(|_| !upgrade)
    {
        std::net::TcpListener::bind(addr).with_context(|| format!("{what}: cannot bind {addr}"))?;
    }

    let threads = match config.runtime.threads {
        0 => std::thread::available_parallelism().map_or(1, |n| n.get()),
        n => n,
    };
    let grace = config.runtime.grace_period;
    let conf = ServerConf {
        threads,
        // One single-threaded runtime per thread: measured ~15% faster (PERF-NOTES.md).
        work_stealing: false,
        // Pingora sleeps this long after SIGTERM, a backstop: the drain (`Control::drain`)
        // exits once idle, or at `grace` saying what it cut.
        grace_period_seconds: Some(grace.as_secs_f64().ceil() as u64 + 1),
        graceful_shutdown_timeout_seconds: Some(1),
        // Timers of a second or more on tokio's wheel, not Pingora's "fast" timer manager.
        // Each upstream connection's idle timer is armed at every release and almost always
        // dropped at the next reuse; tokio removes a dropped timer, while Pingora's keeps
        // its entry until the deadline. Measured in docs/benchmarks.md.
        fast_timeout_to_tokio_threshold_seconds: Some(0),
        upgrade_sock: upgrade_socket(config.admin.listen, upgrade)?
            .to_string_lossy()
            .into_owned(),
        ..ServerConf::default()
    };
    let opt = Opt {
        upgrade,
        ..Opt::default()
    };
    let mut server = Server::new_with_opt_and_conf(opt, conf);
    server.bootstrap();

    let in_flight = Arc::new(AtomicUsize::new(0));
    let access_log = Arc::new(AccessLog::open(&config.telemetry.access_log).with_context(
        || match &config.telemetry.access_log {
            weir_config::AccessLog::File(path) => {
                format!("opening the access log {}", path.display())
            }
            _ => "opening the access log".to_string(),
        },
    )?);
    let (tracing, tracer) = match &config.telemetry.tracing {
        Some(c) => weir_telemetry::otel::start(c)
            .map(|(tracing, tracer)| (Some(Arc::new(tracing)), Some(tracer)))
            .map_err(|e| anyhow::anyhow!("[telemetry.tracing]: {e}"))?,
        None => (None, None),
    };
    let new_proxy = |h2c: bool, idle_timeout: Duration| {
        let app = WeirProxy::new(
            reloader.clone(),
            listeners.clone(),
            access_log.clone(),
            tracer.clone(),
            in_flight.clone(),
        );
        let mut proxy = pingora_proxy::http_proxy(&server.configuration, app);
        let mut options = HttpServerOptions::default();
        options.h2c = h2c;
        options.h2_idle_timeout = Some(idle_timeout);
        proxy.server_options = Some(options);
        Arc::new(proxy)
    };
    // Each listener is a service of its own that reads a connection's first bytes: plaintext
    // listeners take HTTP/2 without TLS (h2c) as well as HTTP/1.1, as Envoy's do, since gRPC
    // clients send it; the sidecar's permissive ones take TLS and plaintext. The listeners
    // share their proxies, and so their pools of upstream connections (each HttpProxy has
    // its own), unless their idle timeouts differ (Pingora's HTTP/2 server takes it per proxy).
    let mut proxies = HashMap::new();
    let (mut services, mut streams) = (Vec::new(), Vec::new());
    for (index, listener) in config.listeners.iter().enumerate() {
        let metrics = weir_telemetry::metrics();
        let open = OpenConnections {
            reloader: reloader.clone(),
            index,
            active: metrics
                .downstream_connections_active
                .with_label_values(&[&listener.name]),
            rejected: (metrics.downstream_connections_rejected)
                .with_label_values(&[&listener.name]),
        };
        let name = format!("weir-{}", listener.name);
        let endpoint = ListenerConfig::tcp(listener.listen.to_string());
        let tls = match listener.protocol {
            Protocol::Https => Some(tls::listener_acceptor(&reloader, index)?),
            Protocol::Http => None,
            Protocol::Tcp | Protocol::Tls => {
                let app = Passthrough {
                    reloader: reloader.clone(),
                    listener: listener.name.clone(),
                    sni: listener.protocol == Protocol::Tls,
                    proxy_protocol: listener.proxy_protocol,
                    idle_timeout: listener.idle_timeout,
                    open,
                    access_log: access_log.clone(),
                    in_flight: in_flight.clone(),
                };
                let mut service = Service::new(name, app);
                service.add_listener(endpoint);
                streams.push(service);
                continue;
            }
        };
        let plaintext = tls.is_none() || listener.tls.as_ref().is_some_and(|t| t.also_plaintext);
        let idle_timeout = listener.idle_timeout;
        let (http1, h2c) = proxies
            .entry(idle_timeout)
            .or_insert_with(|| {
                (
                    new_proxy(false, idle_timeout),
                    new_proxy(true, idle_timeout),
                )
            })
            .clone();
        let sidecar = config.sidecar.is_some();
        let captured_tcp = || CapturedTcp {
            reloader: reloader.clone(),
            idle_timeout,
            access_log: access_log.clone(),
            in_flight: in_flight.clone(),
        };
        let app = Sniffing {
            listener: listener.name.clone(),
            http1,
            h2c,
            plaintext,
            proxy_protocol: listener.proxy_protocol,
            idle_timeout,
            tls,
            open,
            captured_tcp: (sidecar && listener.name == "outbound").then(captured_tcp),
            inbound_tcp: (sidecar && listener.name == INBOUND).then(captured_tcp),
        };
        let mut service = Service::new(name, app);
        // No L4 read buffer on plaintext listeners: Pingora's HTTP/1 session reads into its
        // own buffers, so the default 64 KiB BufReader only adds a copy per read and 64 KiB
        // per idle keep-alive connection. TLS keeps it: rustls reads whole records.
        service.add_listener(match listener.protocol {
            Protocol::Http => endpoint.l4_buffer(L4BufferSettings::default().read(0)),
            _ => endpoint,
        });
        services.push(service);
    }
    // /ready connects to each HTTP listener. Not to tcp and tls ones: each probe would open
    // a connection upstream; the admin service starts after every listener has, all the same.
    let probed = (config.listeners.iter())
        .filter(|l| !l.protocol.is_stream())
        .map(|l| (l.name.clone(), l.listen))
        .collect();
    let shutdown = Arc::new(Notify::new());
    let upgrading = Arc::new(AtomicBool::new(false));
    let admin = AdminService::new(
        Admin::new(reloader.clone(), probed, shutdown.clone()),
        config.admin.listen,
        upgrading.clone(),
    );

    let control = server.add_service(background_service(
        "control",
        Control {
            reloader: reloader.clone(),
            in_flight,
            access_log,
            tracing: tracing.clone(),
            grace,
            nameservers: config.runtime.nameservers.clone(),
            git,
        },
    ));
    let admin = server.add_service(admin);
    // /ready answers only once SIGHUP is handled and the listeners have started.
    admin.add_dependency(&control);
    for service in services {
        admin.add_dependency(server.add_service(service));
    }
    for service in streams {
        admin.add_dependency(server.add_service(service));
    }
    info!(generation = snapshot.generation, revision = %snapshot.revision, threads, "starting");
    drop(snapshot);
    server.run(RunArgs {
        shutdown_signal: Box::new(ShutdownRequests {
            admin: shutdown,
            upgrading,
        }),
    });
    if let Some(tracing) = tracing {
        tracing.shutdown();
    }
    std::process::exit(0)
}

/// A listener: it looks at each connection's first bytes, once, to tell what it speaks, and
/// closes a connection that stays without a request in flight for `idle_timeout`.
/// - With `tls`, a connection that opens with a TLS handshake record is TLS (ALPN then says
///   h2 or HTTP/1.1); any other is closed, unless `plaintext` (the sidecar's
///   `mtls = "permissive"`).
/// - A plaintext connection that opens with the HTTP/2 preface is HTTP/2 (h2c), anything else
///   HTTP/1.
///
/// Pingora's listeners are TLS or plaintext, its own h2c option waits for 24 bytes (the
/// preface's length) at the start of every connection, which hangs a shorter HTTP/1 request,
/// and its HTTP/1 timeout is per read, which a client that sends a byte now and then never
/// meets (slowloris); so each listener is a service of its own that hands the connection to
/// the proxy that speaks its protocol.
struct Sniffing {
    /// The listener's name.
    listener: String,
    http1: Arc<HttpProxy<WeirProxy>>,
    h2c: Arc<HttpProxy<WeirProxy>>,
    tls: Option<Acceptor>,
    plaintext: bool,
    /// A PROXY protocol header comes first, from the load balancer in front.
    proxy_protocol: bool,
    idle_timeout: Duration,
    open: OpenConnections,
    /// The sidecar's outbound listener: captured connections that do not open like HTTP.
    captured_tcp: Option<CapturedTcp>,
    /// The sidecar's inbound listener: captured connections to the app's `tcp_ports`.
    inbound_tcp: Option<CapturedTcp>,
}

/// The first byte of a TLS connection: a handshake record (RFC 8446, §5.1).
const TLS_HANDSHAKE: u8 = 0x16;

/// The start of the HTTP/2 connection preface, "PRI * HTTP/2.0..." (RFC 9113, §3.4); no
/// HTTP/1 method starts so.
const H2_PREFACE_START: &[u8; 3] = b"PRI";

#[async_trait]
impl ServerApp for Sniffing {
    async fn process_new(
        self: &Arc<Self>,
        stream: Stream,
        shutdown: &ShutdownWatch,
    ) -> Option<Stream> {
        let Some(_open) = self.open.admit(&stream) else {
            debug!("closing a connection over the listener's max_connections");
            return None;
        };
        connection::serve_until_idle(self.serve(stream, shutdown), self.idle_timeout).await;
        None
    }

    /// At the drain, once the listener has stopped, as Pingora's own HTTP services do:
    /// keep-alive connections waiting for their next request close, and the answers still to
    /// come say `Connection: close`.
    async fn cleanup(&self) {
        self.http1.cleanup().await;
        self.h2c.cleanup().await;
    }
}

/// A listener's open client connections (`weir_downstream_connections_active`), held under its
/// `max_connections`, which the serving config gives, so a reload changes it. As Envoy's
/// connection limit does, one connection too many is closed on arrival, before a byte is read.
pub(crate) struct OpenConnections {
    reloader: Arc<Reloader>,
    index: usize,
    active: IntGauge,
    rejected: IntCounter,
}

impl OpenConnections {
    /// Counts a new connection in until it ends, or `None`: the listener is full.
    pub(crate) fn admit(&self, stream: &Stream) -> Option<Open<'_>> {
        self.active.inc();
        let open = Open(&self.active);
        let max = self.reloader.snapshot().config.listeners[self.index].max_connections;
        // Counted in first, so two connections arriving at once never both fit in one place.
        if max.is_some_and(|max| usize::try_from(self.active.get()).unwrap_or(0) > max) {
            let digest = stream.get_socket_digest();
            let peer = digest
                .as_deref()
                .and_then(|d| d.peer_addr()?.as_inet().copied());
            if !peer.is_some_and(|p| crate::admin::is_probe(p.port())) {
                self.rejected.inc();
            }
            return None;
        }
        Some(open)
    }
}

/// One open connection, counted out when dropped.
pub(crate) struct Open<'a>(&'a IntGauge);

impl Drop for Open<'_> {
    fn drop(&mut self) {
        self.0.dec();
    }
}

impl Sniffing {
    async fn serve(self: &Arc<Self>, mut stream: Stream, shutdown: &ShutdownWatch) {
        if self.proxy_protocol {
            let peer = proxy_protocol::peer(&stream);
            stream = match proxy_protocol::accept(stream).await {
                Ok(stream) => stream,
                Err(e) => return proxy_protocol::refused(&self.listener, peer, &e),
            };
        }
        if let Some(tcp) = &self.captured_tcp {
            if let Some(dst) = tcp.routed(&stream) {
                connection::spliced();
                // Boxed: the copy's buffers and state stay off the listener's task until used.
                return Box::pin(tcp.forward(stream, dst)).await;
            }
        }
        let tcp_port = self
            .inbound_tcp
            .as_ref()
            .and_then(|tcp| tcp.app_port(&stream));
        if let (Some(tcp), Some(port), None) = (&self.inbound_tcp, tcp_port, &self.tls) {
            // Plaintext only (mtls = "disable"): nothing to read first; the app may speak
            // first.
            connection::spliced();
            return Box::pin(tcp.forward_to_app(stream, port)).await;
        }
        let mut first = [0u8; 1];
        let mut stopping = shutdown.clone();
        let peeked = tokio::select! {
            peeked = stream.try_peek(&mut first) => peeked,
            _ = stopping.changed() => return,
        };
        if !matches!(peeked, Ok(true)) {
            return; // closed before its first byte
        }
        if let Some(tcp) =
            (self.captured_tcp.as_ref()).filter(|_| !capture::opens_like_http(first[0]))
        {
            let digest = stream.get_socket_digest();
            if let Some(dst) = digest.as_deref().and_then(capture::original_dst) {
                connection::spliced();
                return Box::pin(tcp.forward(stream, dst)).await;
            }
        }
        let mut proxy = &self.http1;
        match &self.tls {
            Some(tls) if first[0] == TLS_HANDSHAKE => {
                // The listener hands over its TCP stream, boxed; the handshake wants it
                // unboxed.
                let Ok(tcp) = stream.into_any().downcast::<L4Stream>() else {
                    return;
                };
                // Boxed: the handshake's state is kilobytes, which every connection's future
                // would otherwise reserve, plaintext ones and idle ones too.
                stream = match Box::pin(tls.tls_handshake(*tcp)).await {
                    Ok(tls) => Box::new(tls),
                    Err(e) => {
                        // Counted, not logged above debug: a port open to the world sees
                        // scanners all day.
                        let reason = tls::handshake_failure(&e);
                        (weir_telemetry::metrics().downstream_tls_handshake_failures)
                            .with_label_values(&[&self.listener, reason])
                            .inc();
                        debug!(listener = %self.listener, reason, "TLS handshake failed: {e}");
                        return;
                    }
                };
                if stream.selected_alpn_proto() == Some(ALPN::H2) {
                    connection::multiplexed();
                }
            }
            Some(_) if !self.plaintext => {
                (weir_telemetry::metrics().downstream_tls_handshake_failures)
                    .with_label_values(&[&self.listener, "not_tls"])
                    .inc();
                debug!("closing a connection that did not open with a TLS handshake");
                return;
            }
            _ if first[0] == H2_PREFACE_START[0] => {
                // "P": the preface, or PUT, POST, PATCH... which are at least 3 bytes long.
                let mut start = [0u8; 3];
                if matches!(stream.try_peek(&mut start).await, Ok(true))
                    && &start == H2_PREFACE_START
                {
                    proxy = &self.h2c;
                    connection::multiplexed();
                }
            }
            _ => {}
        }
        if let (Some(tcp), Some(port)) = (&self.inbound_tcp, tcp_port) {
            connection::spliced();
            return Box::pin(tcp.forward_to_app(stream, port)).await;
        }
        // The keep-alive loop Pingora's own service would run.
        let mut next = proxy.process_new(stream, shutdown).await;
        while let Some(stream) = next {
            next = proxy.process_new(stream, shutdown).await;
        }
    }
}

/// Where an upgrading gateway waits for its predecessor's listening sockets (SIGQUIT sends them
/// there): one path per admin port, which no two gateways on a host share, so an upgrade finds
/// its predecessor and no other; in the user's private directory, where no other user can
/// bind it first.
fn upgrade_socket(admin: SocketAddr, upgrade: bool) -> anyhow::Result<PathBuf> {
    // Made (and checked) by the process that binds the socket; SIGQUIT checks it again
    // before the listeners go there (`ShutdownRequests`).
    let dir = match upgrade {
        true => crate::private_dir()?,
        false => crate::private_dir_path(),
    };
    Ok(dir.join(format!("upgrade-{}.sock", admin.port())))
}

/// Pingora's signals (SIGTERM drains, SIGINT exits at once, SIGQUIT hands the listeners to
/// an upgrade), and admin `POST /shutdown`, which drains as SIGTERM does.
struct ShutdownRequests {
    admin: Arc<Notify>,
    /// Set on SIGQUIT, for the admin listener, which a drain leaves open but an upgrade does not.
    upgrading: Arc<AtomicBool>,
}

#[async_trait]
impl ShutdownSignalWatch for ShutdownRequests {
    async fn recv(&self) -> ShutdownSignal {
        loop {
            let signal = tokio::select! {
                signal = UnixShutdownSignalWatch.recv() => signal,
                () = self.admin.notified() => ShutdownSignal::GracefulTerminate,
            };
            if matches!(signal, ShutdownSignal::GracefulUpgrade) {
                // The listening sockets go only to a socket in a directory of this user's alone.
                if let Err(e) = crate::check_private_dir(&crate::private_dir_path()) {
                    error!("SIGQUIT: not handing the listeners over: {e:#}; serving on");
                    continue;
                }
                self.upgrading.store(true, Ordering::Relaxed);
            }
            return signal;
        }
    }
}

/// The control task: reloads on file changes (debounced) and on SIGHUP, runs the services'
/// health checks and DNS lookups, and after SIGTERM ends the process as soon as the requests
/// in flight are done. (Pingora itself would stop
/// accepting and then sleep the whole grace period.)
struct Control {
    reloader: Arc<Reloader>,
    in_flight: Arc<AtomicUsize>,
    access_log: Arc<AccessLog>,
    /// Spans still queued are sent before the drain exits.
    tracing: Option<Arc<Tracing>>,
    grace: Duration,
    /// For the DNS resolver of `service.dns`.
    nameservers: Vec<SocketAddr>,
    /// With `--config-git`: the checkout, fetched at every poll.
    git: Option<Arc<GitSource>>,
}

#[async_trait]
impl BackgroundService for Control {
    async fn start_with_ready_notifier(
        &self,
        mut shutdown: ShutdownWatch,
        ready: ServiceReadyNotifier,
    ) {
        let mut hangup = match signal(SignalKind::hangup()) {
            Ok(s) => s,
            Err(e) => {
                error!("cannot handle SIGHUP: {e}");
                return;
            }
        };
        let (tx, mut changed) = tokio::sync::mpsc::channel::<()>(1);
        // Held, not read: dropping it stops the watch.
        let mut _watcher = self.watch(&tx);
        // Health checks and DNS lookups run on this runtime, beside the reloads.
        let discovery = Discovery::new(&self.nameservers);
        discovery.start(&self.reloader.snapshot());
        ready.notify_ready();
        // Without Git the poll branch is off; its period only has to be a valid one.
        let period = self.git.as_ref().map_or(RELOAD_QUIET, |git| git.poll);
        let mut poll = tokio::time::interval_at(tokio::time::Instant::now() + period, period);
        poll.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            // A new commit checked out for this reload.
            let mut fetched = None;
            let why = tokio::select! {
                Some(()) = changed.recv() => {
                    // Editors and ConfigMap swaps come in bursts: wait for quiet.
                    while let Ok(Some(())) = tokio::time::timeout(RELOAD_QUIET, changed.recv()).await {}
                    "file change"
                }
                Some(()) = hangup.recv() => {
                    fetched = tokio::select! {
                        fetched = self.fetch(true) => fetched,
                        _ = shutdown.changed() => return self.drain().await,
                    };
                    "SIGHUP"
                }
                _ = poll.tick(), if self.git.is_some() => {
                    // A Git server that does not answer holds a fetch up to its timeout; a
                    // SIGTERM meanwhile drains at once, leaving the fetch behind.
                    fetched = tokio::select! {
                        fetched = self.fetch(false) => fetched,
                        _ = shutdown.changed() => return self.drain().await,
                    };
                    if fetched.is_none() {
                        continue;
                    }
                    "git commit"
                }
                _ = shutdown.changed() => return self.drain().await,
            };
            // Reading and compiling the config blocks; keep it off this runtime's thread.
            let reloader = self.reloader.clone();
            let outcome = match tokio::task::spawn_blocking(move || reloader.reload()).await {
                Ok(outcome) => outcome,
                Err(e) => {
                    error!("reload task failed: {e}");
                    Outcome::Failed
                }
            };
            match outcome {
                Outcome::Applied { generation } => {
                    info!(trigger = why, generation, "reload applied");
                    discovery.start(&self.reloader.snapshot());
                }
                Outcome::Unchanged => info!(trigger = why, "reload: config unchanged"),
                Outcome::Failed => {}
            }
            // Anew after every reload, whatever came of it: what triggered it may be a config
            // directory replaced whole, which the old watch no longer sees.
            _watcher = self.watch(&tx);
            if let Some(commit) = fetched {
                self.settle(&commit, &outcome);
            }
        }
    }
}

impl Control {
    /// Watches the config's files and the certificates and keys it names. A Git checkout
    /// changes only when the poll swaps it, and reloads then: with Git, only the files the
    /// config names outside it are watched (a certificate that cert-manager rotates).
    fn watch(&self, tx: &tokio::sync::mpsc::Sender<()>) -> Option<weir_config::Watcher> {
        let mut material = self.reloader.snapshot().material.clone();
        let config = match &self.git {
            Some(git) => {
                material.retain(|file| !git.holds(file));
                None
            }
            None => Some(self.reloader.path()),
        };
        if config.is_none() && material.is_empty() {
            return None;
        }
        let tx = tx.clone();
        match weir_config::watch(config, &material, move || {
            let _ = tx.try_send(());
        }) {
            Ok(watcher) => Some(watcher),
            Err(e) => {
                let path = self.reloader.path().display();
                warn!("cannot watch {path} or the files it names: {e}; reload with SIGHUP");
                None
            }
        }
    }

    /// With `--config-git`, fetches the ref: the commit checked out for the reload, if it
    /// moved (a refused one `again`, for SIGHUP). A failed fetch keeps the checkout and the
    /// config serving.
    async fn fetch(&self, again: bool) -> Option<String> {
        let git = self.git.clone()?;
        match tokio::task::spawn_blocking(move || git.sync(again)).await {
            Ok(Ok(Some(commit))) => {
                info!(commit, "git: the ref moved; commit checked out");
                self.reloader.set_commit(commit.clone());
                Some(commit)
            }
            Ok(Ok(None)) => None,
            Ok(Err(e)) => {
                weir_telemetry::metrics().config_fetch_failures.inc();
                warn!("git: {e:#}; still serving the last good config");
                None
            }
            Err(e) => {
                error!("git fetch task failed: {e}");
                None
            }
        }
    }

    /// After the reload of a fetched commit: a refused one is put aside, and the config
    /// serving is read from its own commit again.
    fn settle(&self, commit: &str, outcome: &Outcome) {
        let Some(git) = &self.git else { return };
        let applied = !matches!(outcome, Outcome::Failed);
        git.settle(commit, applied);
        self.reloader.set_refused(!applied);
        if !applied {
            warn!(commit, "git: this commit's config was refused; serving the last good one until the ref moves (or SIGHUP tries it again)");
            self.reloader.set_commit(git.commit());
        }
    }

    async fn drain(&self) {
        info!(in_flight = self.in_flight.load(Ordering::Acquire), grace = ?self.grace, "draining");
        // SIGINT still exits at once, as nginx's stop cuts its graceful quit short.
        let mut interrupt = signal(SignalKind::interrupt()).ok();
        let interrupted = async {
            match &mut interrupt {
                Some(sigint) => sigint.recv().await,
                None => std::future::pending().await,
            }
        };
        tokio::pin!(interrupted);
        let over = tokio::time::sleep(self.grace);
        tokio::pin!(over);
        while self.in_flight.load(Ordering::Acquire) > 0 {
            tokio::select! {
                () = tokio::time::sleep(Duration::from_millis(10)) => {}
                () = &mut over => {
                    warn!(in_flight = self.in_flight.load(Ordering::Acquire), grace = ?self.grace, "grace period over: exiting, cutting the requests in flight (raise runtime.grace_period if they should finish)");
                    break;
                }
                _ = &mut interrupted => {
                    warn!(in_flight = self.in_flight.load(Ordering::Acquire), "SIGINT: exiting without waiting for the requests in flight");
                    break;
                }
            }
        }
        self.access_log.wait_written(Duration::from_secs(1));
        if let Some(tracing) = &self.tracing {
            tracing.shutdown();
        }
        if let Some(git) = &self.git {
            git.remove_checkout();
        }
        info!("drained; exiting");
        std::process::exit(0);
    }
}
