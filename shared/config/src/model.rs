//! The validated config: every value parsed, every reference resolved, every default applied.
//!
//! Built only by [`crate::load`]; `Serialize` so that admin `/config` can show it.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use serde::{Serialize, Serializer};

/// Which binary reads the config: the sidecar accepts `[workload]`, `[inbound]`, `[outbound]`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    Gateway,
    Sidecar,
}

#[derive(Debug, Clone, Serialize)]
pub struct Config {
    pub runtime: Runtime,
    pub admin: Admin,
    pub telemetry: Telemetry,
    pub listeners: Vec<Listener>,
    /// In declaration order: files sorted by name, then position in the file.
    pub routes: Vec<Route>,
    pub services: Vec<Service>,
    /// The mesh identity: the sidecar's, or the gateway's when it calls services with
    /// `tls.mode = "mesh"`.
    pub workload: Option<Workload>,
    /// Present only in a sidecar config.
    pub sidecar: Option<Sidecar>,
}

#[derive(Debug, Clone, Serialize)]
pub struct Runtime {
    /// Worker threads; 0 = one per core.
    pub threads: usize,
    #[serde(serialize_with = "as_str")]
    pub grace_period: Duration,
    /// DNS servers for `service.dns`; empty = the system's.
    pub nameservers: Vec<SocketAddr>,
}

#[derive(Debug, Clone, Serialize)]
pub struct Admin {
    pub listen: SocketAddr,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum AccessLog {
    Stdout,
    Off,
    File(PathBuf),
}

#[derive(Debug, Clone, Serialize)]
pub struct Telemetry {
    pub access_log: AccessLog,
    /// `None`: tracing off.
    pub tracing: Option<Tracing>,
}

/// `[telemetry.tracing]`: a span per request, sent to an OpenTelemetry collector.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Tracing {
    /// Where spans go: for `http/protobuf` the full URL (`/v1/traces` added to a bare
    /// address), for `grpc` the collector's address.
    pub otlp_endpoint: String,
    pub protocol: OtlpProtocol,
    /// Share of new traces recorded; a caller's sampling decision (`traceparent`) is kept.
    pub sample_ratio: f64,
    pub service_name: String,
    /// `Some` exactly when the endpoint is `https://`.
    pub tls: Option<CollectorTls>,
}

/// `[telemetry.tracing.tls]`: how to reach an `https://` collector. The collector's
/// certificate is verified against the endpoint's host.
#[derive(Debug, Clone, Serialize)]
pub struct CollectorTls {
    /// `None` = the system's trust store.
    pub ca: Option<PathBuf>,
    pub cert: Option<PathBuf>,
    pub key: Option<PathBuf>,
    /// The CA certificates in DER.
    #[serde(skip)]
    pub roots: Vec<Vec<u8>>,
    #[serde(skip)]
    pub client: Option<weir_tls::KeyPair>,
}

impl PartialEq for CollectorTls {
    fn eq(&self, other: &CollectorTls) -> bool {
        let client = |t: &CollectorTls| t.client.as_ref().map(|c| (c.chain.clone(), c.key.clone()));
        (&self.ca, &self.cert, &self.key, &self.roots)
            == (&other.ca, &other.cert, &other.key, &other.roots)
            && client(self) == client(other)
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub enum OtlpProtocol {
    #[serde(rename = "http/protobuf")]
    HttpProtobuf,
    #[serde(rename = "grpc")]
    Grpc,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Protocol {
    Http,
    Https,
    /// Bytes forwarded to the one route's backends, unread.
    Tcp,
    /// TLS passed through unterminated, routed by the SNI of its ClientHello.
    Tls,
}

impl Protocol {
    /// `tcp` and `tls` listeners carry streams of bytes, not HTTP requests.
    pub fn is_stream(self) -> bool {
        matches!(self, Protocol::Tcp | Protocol::Tls)
    }
}

#[derive(Debug, Clone, Serialize)]
pub struct Listener {
    pub name: String,
    pub listen: SocketAddr,
    pub protocol: Protocol,
    /// `https` only.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tls: Option<ListenerTls>,
    /// A client connection without a request in flight this long is closed: between
    /// keep-alive requests, and while a request's headers trickle in (slowloris). On `tcp`
    /// and `tls` listeners: without a byte either way.
    #[serde(serialize_with = "as_str")]
    pub idle_timeout: Duration,
    /// Client connections open at once; one more is closed on arrival. A reload changes it.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub max_connections: Option<usize>,
    /// Each connection opens with a PROXY protocol header, whose source is the client.
    pub proxy_protocol: bool,
}

impl Listener {
    /// Envoy's default is an hour; nginx keeps a connection 75 s, over the 60 s for which
    /// clients' pools (Weir's `idle_timeout` among them) keep theirs, so the client closes first.
    pub const DEFAULT_IDLE_TIMEOUT: Duration = Duration::from_secs(75);
    /// On `tcp` and `tls` listeners: no byte either way this long. Envoy's TCP proxy's
    /// default; a database connection may well sit idle for minutes.
    pub const DEFAULT_STREAM_IDLE_TIMEOUT: Duration = Duration::from_secs(3600);
}

/// What an https listener serves and asks of clients. Swapped by a reload, like routes.
#[derive(Debug, Clone, Serialize)]
pub struct ListenerTls {
    /// At least one; chosen by SNI (weir_tls::CertificateTable::select).
    pub certificates: Vec<ServerCertificate>,
    pub client_auth: Option<ClientAuth>,
    /// The sidecar's `mtls = "permissive"`: a connection that does not open with a TLS
    /// handshake is served in plaintext.
    pub also_plaintext: bool,
}

#[derive(Debug, Clone, Serialize)]
pub struct ServerCertificate {
    /// Lower case, exact or "*.suffix"; empty = any name.
    pub hosts: Vec<String>,
    pub cert: PathBuf,
    pub key: PathBuf,
    /// When the leaf expires, RFC 3339 (also `weir_tls_cert_expiry_timestamp_seconds`).
    pub not_after: String,
    /// The parsed chain and key; never shown.
    #[serde(skip)]
    pub pair: weir_tls::KeyPair,
}

/// mTLS termination: a client certificate is required and must chain to `ca`.
#[derive(Debug, Clone, Serialize)]
pub struct ClientAuth {
    pub ca: PathBuf,
    #[serde(skip)]
    pub verifier: Arc<dyn weir_tls::rustls::server::danger::ClientCertVerifier>,
    /// A hash of the CAs: a TLS session resumes only under the trust that verified it.
    #[serde(skip)]
    pub trust: u64,
}

#[derive(Debug, Clone, Serialize)]
pub struct Route {
    pub name: String,
    /// Empty = attached to every listener.
    pub listeners: Vec<String>,
    /// The sidecar's: a TCP route for captured connections to these addresses (then it has
    /// no listeners, hosts or HTTP keys).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub destinations: Vec<SocketAddr>,
    /// Empty = any host.
    pub hosts: Vec<HostPattern>,
    /// Empty = match every request.
    pub matches: Vec<Match>,
    pub action: Action,
    pub rewrite: Option<Rewrite>,
    pub fault: Option<Fault>,
    pub mirror: Option<Mirror>,
    /// Bound on the whole request, all tries included.
    #[serde(serialize_with = "as_opt_str")]
    pub timeout: Option<Duration>,
    pub retry: Retry,
    pub request_headers: HeaderOps,
    pub response_headers: HeaderOps,
    /// Where the route was declared, for `explain`: "routes.toml:12".
    pub origin: String,
}

#[derive(Debug, Clone, Serialize)]
pub struct Rewrite {
    /// Replaces the prefix (or exact path) the winning match block matched.
    pub path_prefix: Option<String>,
    pub host: Option<String>,
}

#[derive(Debug, Clone, Serialize)]
pub struct Retry {
    /// Retries after the first try; 0 = none.
    pub attempts: u32,
    #[serde(serialize_with = "as_opt_str")]
    pub per_try_timeout: Option<Duration>,
    pub on: RetryOn,
    pub non_idempotent: bool,
    #[serde(serialize_with = "as_str")]
    pub backoff: Duration,
    pub budget: Budget,
}

impl Default for Retry {
    fn default() -> Self {
        Retry {
            attempts: 2,
            per_try_timeout: None,
            on: RetryOn {
                connect_failure: true,
                refused_stream: true,
                statuses: vec![503],
                ..RetryOn::default()
            },
            non_idempotent: false,
            backoff: Duration::from_millis(25),
            budget: Budget::default(),
        }
    }
}

/// When a try is retried (DESIGN.md `route.retry.on`, after Envoy's `retry_on`).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct RetryOn {
    pub connect_failure: bool,
    pub refused_stream: bool,
    /// Reset, closed or timed out before a response.
    pub reset: bool,
    /// Any 5xx, and every failure without a response.
    pub any_5xx: bool,
    /// 502, 503, 504, and every failure without a response.
    pub gateway_error: bool,
    /// 409.
    pub retriable_4xx: bool,
    pub statuses: Vec<u16>,
    /// gRPC status codes, by their names in [`GRPC_RETRY_ON`].
    pub grpc: Vec<u8>,
}

/// The gRPC retry conditions, as Envoy and Istio name them, and their status codes.
pub const GRPC_RETRY_ON: [(&str, u8); 5] = [
    ("cancelled", 1),
    ("deadline-exceeded", 4),
    ("resource-exhausted", 8),
    ("internal", 13),
    ("unavailable", 14),
];

#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct Budget {
    pub ratio: f64,
    pub min_per_second: u32,
}

impl Default for Budget {
    fn default() -> Self {
        Budget {
            ratio: 0.2,
            min_per_second: 10,
        }
    }
}

#[derive(Debug, Clone, Serialize)]
pub struct Mirror {
    pub service: String,
    pub percent: f64,
    pub max_body_bytes: u64,
}

#[derive(Debug, Clone, Serialize)]
pub struct Fault {
    /// Delay and share of requests (0-100) it applies to.
    pub delay: Option<Delay>,
    pub abort: Option<Abort>,
}

#[derive(Debug, Clone, Serialize)]
pub struct Delay {
    #[serde(serialize_with = "as_str")]
    pub fixed: Duration,
    pub percent: f64,
}

#[derive(Debug, Clone, Serialize)]
pub struct Abort {
    pub status: u16,
    pub percent: f64,
}

/// Header changes; names lower case, names and values checked at load.
#[derive(Debug, Clone, Default, Serialize)]
pub struct HeaderOps {
    pub set: Vec<(String, String)>,
    pub add: Vec<(String, String)>,
    pub remove: Vec<String>,
}

impl HeaderOps {
    pub fn is_empty(&self) -> bool {
        self.set.is_empty() && self.add.is_empty() && self.remove.is_empty()
    }
}

/// A host pattern, lowercased, without port.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum HostPattern {
    Exact(String),
    /// "*.example.com" is stored as ".example.com".
    Suffix(String),
}

#[derive(Debug, Clone, Serialize)]
pub struct Match {
    pub path: Option<PathMatch>,
    /// Upper case; empty = any method.
    pub methods: Vec<String>,
    /// Lower-case header names, sorted.
    pub headers: Vec<(String, ValueMatch)>,
    pub query: Vec<(String, ValueMatch)>,
}

#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum PathMatch {
    Exact(String),
    Prefix(String),
    Regex(Pattern),
}

#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum ValueMatch {
    Exact(String),
    Prefix(String),
    Regex(Pattern),
    Present(bool),
}

/// A regular expression that must match the whole value (as in Envoy's `safe_regex`).
#[derive(Debug, Clone)]
pub struct Pattern {
    /// The pattern as written in the config.
    pub source: String,
    /// Compiled once at load, anchored at both ends.
    pub regex: regex::Regex,
}

impl Pattern {
    pub fn is_match(&self, value: &str) -> bool {
        self.regex.is_match(value)
    }
}

impl Serialize for Pattern {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.source)
    }
}

#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Action {
    /// A weighted split; the weights sum to more than 0 (a weight of 0 is never picked).
    Backends(Vec<Backend>),
    DirectResponse {
        status: u16,
        body: String,
    },
    Redirect(Redirect),
}

#[derive(Debug, Clone, Serialize)]
pub struct Redirect {
    pub status: u16,
    pub scheme: Option<String>,
    pub host: Option<String>,
    pub path: Option<String>,
}

#[derive(Debug, Clone, Serialize)]
pub struct Backend {
    pub service: String,
    pub weight: u32,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Service {
    pub name: String,
    /// Static endpoints; empty when `dns` is set.
    pub endpoints: Vec<SocketAddr>,
    pub dns: Option<Dns>,
    pub load_balancer: LoadBalancer,
    pub protocol: UpstreamProtocol,
    pub connection_pool: ConnectionPool,
    pub outlier_detection: Option<OutlierDetection>,
    pub health_check: Option<HealthCheck>,
    /// TLS origination; `None` = plaintext.
    pub tls: Option<UpstreamTls>,
    /// Connections of `tcp` and `tls` listeners open with a PROXY protocol header naming the
    /// client; `None` = no header.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub proxy_protocol: Option<ProxyVersion>,
}

/// The version of the PROXY protocol header sent to a service.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum ProxyVersion {
    /// Text: `PROXY TCP4 <client> <server> <ports>`.
    V1,
    /// Binary.
    V2,
}

/// What the proxy speaks to a service's endpoints.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum UpstreamProtocol {
    Http1,
    /// h2c (prior knowledge) on plaintext, ALPN h2 over TLS; needed for gRPC.
    Http2,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum TlsMode {
    /// Verify the server's certificate.
    Simple,
    /// Also present a client certificate.
    Mutual,
    /// The sidecar's mesh mTLS: present the workload certificate, verify the server's SPIFFE
    /// id under the trust bundle.
    Mesh,
}

/// `[service.tls]`: how to reach the endpoints over TLS.
#[derive(Debug, Clone, Serialize)]
pub struct UpstreamTls {
    pub mode: TlsMode,
    /// `None` = the system's trust store.
    pub ca: Option<PathBuf>,
    pub cert: Option<PathBuf>,
    pub key: Option<PathBuf>,
    /// Sent as SNI and (but in mode mesh) verified in the server's certificate; never empty.
    pub sni: String,
    /// mesh only: the SPIFFE ids accepted from the server; empty = any of `trust_domains`.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub identities: Vec<String>,
    /// mesh only: [`Workload::trust_domains`].
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub trust_domains: Vec<String>,
    /// The CA certificates in DER.
    #[serde(skip)]
    pub roots: Vec<Vec<u8>>,
    /// mutual only.
    #[serde(skip)]
    pub client: Option<weir_tls::KeyPair>,
    /// A hash of the files' contents: a rotated file makes a different service (new pool).
    #[serde(skip)]
    pub fingerprint: u64,
}

impl Eq for UpstreamTls {}

impl PartialEq for UpstreamTls {
    fn eq(&self, other: &UpstreamTls) -> bool {
        (
            self.mode,
            &self.ca,
            &self.cert,
            &self.key,
            &self.sni,
            &self.identities,
            self.fingerprint,
        ) == (
            other.mode,
            &other.ca,
            &other.cert,
            &other.key,
            &other.sni,
            &other.identities,
            other.fingerprint,
        )
    }
}

/// `dns = "name:port"`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Dns {
    pub name: String,
    pub port: u16,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct OutlierDetection {
    /// 0 = off.
    pub consecutive_5xx: u32,
    /// 0 = off.
    pub consecutive_gateway_errors: u32,
    /// An endpoint's ejection count drops by one for every interval it stays in.
    #[serde(serialize_with = "as_str")]
    pub interval: Duration,
    #[serde(serialize_with = "as_str")]
    pub base_ejection_time: Duration,
    #[serde(serialize_with = "as_str")]
    pub max_ejection_time: Duration,
    pub max_ejection_percent: u32,
}

impl Default for OutlierDetection {
    fn default() -> Self {
        OutlierDetection {
            consecutive_5xx: 5,
            consecutive_gateway_errors: 0,
            interval: Duration::from_secs(10),
            base_ejection_time: Duration::from_secs(30),
            max_ejection_time: Duration::from_secs(300),
            max_ejection_percent: 10,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct HealthCheck {
    pub path: String,
    #[serde(serialize_with = "as_str")]
    pub interval: Duration,
    #[serde(serialize_with = "as_str")]
    pub timeout: Duration,
    pub healthy_threshold: u32,
    pub unhealthy_threshold: u32,
}

/// Limits and timeouts of the connections to one service.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ConnectionPool {
    pub max_connections: usize,
    pub max_pending_requests: usize,
    pub max_requests: usize,
    #[serde(serialize_with = "as_str")]
    pub connect_timeout: Duration,
    #[serde(serialize_with = "as_str")]
    pub idle_timeout: Duration,
}

impl Default for ConnectionPool {
    fn default() -> Self {
        ConnectionPool {
            max_connections: 1024,
            max_pending_requests: 1024,
            max_requests: 1024,
            connect_timeout: Duration::from_secs(5),
            idle_timeout: Duration::from_secs(60),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum LoadBalancer {
    RoundRobin,
    Random,
    /// Power of two choices over the requests in flight per endpoint.
    LeastRequest,
    /// Ketama ring over the endpoints, keyed by part of the request.
    ConsistentHash(HashOn),
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum HashOn {
    /// Lower-case header name.
    Header(String),
    Cookie(String),
    SourceIp,
}

#[derive(Debug, Clone, Serialize)]
pub struct Sidecar {
    pub inbound: Inbound,
    pub outbound: Outbound,
}

/// The workload's mesh identity. The sidecar serves it on its inbound listener (whose client CA
/// is the trust bundle); both binaries present it to services with `tls.mode = "mesh"`. Never
/// shown but by path.
#[derive(Debug, Clone, Serialize)]
pub struct Workload {
    pub cert: PathBuf,
    pub key: PathBuf,
    pub trust_bundle: PathBuf,
    /// The certificate's SPIFFE id.
    pub identity: String,
    /// Whose peers are accepted: the identity's trust domain, then `trust_domains`' others.
    pub trust_domains: Vec<String>,
    /// When the certificate expires, RFC 3339.
    pub not_after: String,
    #[serde(skip)]
    pub pair: weir_tls::KeyPair,
    /// The trust bundle's certificates in DER.
    #[serde(skip)]
    pub roots: Vec<Vec<u8>>,
    /// Requires a client certificate that chains to the trust bundle.
    #[serde(skip)]
    pub verifier: Arc<dyn weir_tls::rustls::server::danger::ClientCertVerifier>,
    /// A hash of the three files' contents.
    #[serde(skip)]
    pub fingerprint: u64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Mtls {
    Strict,
    /// Mesh mTLS, or plaintext (without an identity) from callers outside the mesh.
    Permissive,
    Disable,
}

/// The name of the sidecar's inbound listener, and of its route and service to the app.
pub const INBOUND: &str = "inbound";

/// The inbound side: the listener (named "inbound") in front of the app, which is reached
/// through the route and the service both named "inbound".
#[derive(Debug, Clone, Serialize)]
pub struct Inbound {
    pub listen: SocketAddr,
    pub app: SocketAddr,
    /// HTTP/1.1, or h2c for gRPC apps.
    pub app_protocol: UpstreamProtocol,
    pub mtls: Mtls,
    /// The app's ports that speak TCP other than HTTP (a database, a broker): captured
    /// connections to them are forwarded to the app's port as bytes, after the mTLS.
    pub tcp_ports: Vec<u16>,
    /// The inbound listener's `idle_timeout` and `max_connections` (see [`Listener`]).
    #[serde(serialize_with = "as_str")]
    pub idle_timeout: Duration,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub max_connections: Option<usize>,
    /// In declaration order; see [`Policy`].
    pub policies: Vec<Policy>,
}

/// What refused a request that no allow policy matched, in `weir_authz_denied_total{policy}`;
/// so no policy may take this name.
pub const NO_ALLOW: &str = "no-allow-matched";

/// The `service` label and log field of the sidecar's captured calls that went on to their
/// original destination: Istio's name for it, which its dashboards know. Reserved.
pub const PASSTHROUGH: &str = "PassthroughCluster";

/// One `[[inbound.policy]]`. A request matches when every field given matches it. Deny
/// policies are checked first; then, if any allow policy exists, a request must match one.
#[derive(Debug, Clone, Serialize)]
pub struct Policy {
    pub name: String,
    pub action: PolicyAction,
    /// SPIFFE ids, or "*" for any verified peer; empty = anyone, with a certificate or not.
    pub principals: Vec<String>,
    /// Upper case; empty = any.
    pub methods: Vec<String>,
    /// Exact, "prefix*" or "*suffix"; empty = any.
    pub paths: Vec<String>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum PolicyAction {
    Allow,
    Deny,
}

/// The outbound listener (named "outbound"): the app's calls, routed by `[[route]]`.
#[derive(Debug, Clone, Serialize)]
pub struct Outbound {
    pub listen: SocketAddr,
    /// The outbound listener's `idle_timeout` and `max_connections` (see [`Listener`]).
    #[serde(serialize_with = "as_str")]
    pub idle_timeout: Duration,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub max_connections: Option<usize>,
    /// With traffic capture: a call no route takes goes on to the address the app called
    /// (Istio's `ALLOW_ANY`), HTTP and any other TCP alike; off, HTTP gets 404 `NR` and other
    /// TCP is closed (Istio's `REGISTRY_ONLY`).
    pub passthrough: bool,
}

fn as_str<S: Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_str(&crate::duration::format(*d))
}

fn as_opt_str<S: Serializer>(d: &Option<Duration>, s: S) -> Result<S::Ok, S::Error> {
    match d {
        Some(d) => as_str(d, s),
        None => s.serialize_none(),
    }
}
