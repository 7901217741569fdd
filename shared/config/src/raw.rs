//! The raw form of the config language: exactly what TOML deserializes into.
//!
//! Only these types derive `Deserialize`. Nothing here is checked yet: durations, addresses,
//! regexes and references are plain strings until [`crate::validate`] turns them into
//! [`crate::Config`]. Unknown keys are not rejected by serde but collected by the loader, so
//! that every one of them is reported with its line instead of only the first.

use std::collections::BTreeMap;

use serde::Deserialize;

/// One config file. A directory of files is merged from several of these.
#[derive(Debug, Default, Deserialize)]
#[serde(default)]
pub struct RawFile {
    /// Process settings, read at start only.
    pub runtime: Option<RawRuntime>,
    /// The admin HTTP listener.
    pub admin: Option<RawAdmin>,
    /// Access log and tracing.
    pub telemetry: Option<RawTelemetry>,
    /// `[[listener]]` tables.
    pub listener: Vec<RawListener>,
    /// `[[route]]` tables.
    pub route: Vec<RawRoute>,
    /// `[[service]]` tables.
    pub service: Vec<RawService>,
    /// This proxy's mesh identity (the sidecar's workload; the gateway's for mode "mesh").
    pub workload: Option<RawWorkload>,
    /// Sidecar only: the inbound listener in front of the local app.
    pub inbound: Option<RawInbound>,
    /// Sidecar only: the outbound listener the app sends its calls to.
    pub outbound: Option<RawOutbound>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(default)]
pub struct RawRuntime {
    /// Worker threads of the proxy; 0 = one per core.
    pub threads: Option<usize>,
    /// How long SIGTERM waits for requests in flight, e.g. "10s".
    pub grace_period: Option<String>,
    /// DNS servers ("ip:port") for `service.dns`; default: the system's (/etc/resolv.conf).
    pub nameservers: Option<Vec<String>>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(default)]
pub struct RawAdmin {
    /// Address of the admin listener, e.g. "127.0.0.1:9901".
    pub listen: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(default)]
pub struct RawTelemetry {
    /// "stdout", "off" or a file path.
    pub access_log: Option<String>,
    /// `[telemetry.tracing]`: absent = tracing off.
    pub tracing: Option<RawTracing>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(default)]
pub struct RawTracing {
    /// The collector, e.g. "http://127.0.0.1:4318".
    pub otlp_endpoint: Option<String>,
    /// "http/protobuf" or "grpc"; default: "grpc" on port 4317, else "http/protobuf".
    pub protocol: Option<String>,
    /// Share of new traces recorded, 0.0 to 1.0; default 1.0.
    pub sample_ratio: Option<f64>,
    /// The `service.name` of the spans; default: the binary's name.
    pub service_name: Option<String>,
    /// `https://` endpoints: whom to trust, and the certificate to present if any.
    pub tls: Option<RawCollectorTls>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(default)]
pub struct RawCollectorTls {
    /// PEM bundle of the CAs the collector's certificate must chain to; default: the system's.
    pub ca: Option<String>,
    /// A client certificate chain and key, PEM, for a collector that requires one.
    pub cert: Option<String>,
    pub key: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(default)]
pub struct RawListener {
    /// Unique name, referenced by `route.listeners`.
    pub name: Option<String>,
    /// Socket address to bind, e.g. "0.0.0.0:8080".
    pub listen: Option<String>,
    /// "http" (default) or "https".
    pub protocol: Option<String>,
    /// https only: the certificates, chosen by SNI.
    pub certificate: Vec<RawCertificate>,
    /// https only: require client certificates signed by this CA (mTLS).
    pub client_auth: Option<RawClientAuth>,
    /// How long a client connection may be without a request in flight; default "75s".
    pub idle_timeout: Option<String>,
    /// Each connection opens with a PROXY protocol header (v1 or v2) naming the client.
    pub proxy_protocol: Option<bool>,
    /// Client connections open at once; default no limit.
    pub max_connections: Option<u64>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(default)]
pub struct RawCertificate {
    /// Names this certificate serves: exact or "*.suffix"; absent = any name.
    pub hosts: Option<Vec<String>>,
    /// PEM certificate chain, leaf first; relative to the file that names it.
    pub cert: Option<String>,
    /// PEM private key.
    pub key: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(default)]
pub struct RawClientAuth {
    /// PEM bundle of the CAs client certificates must chain to.
    pub ca: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(default)]
pub struct RawRoute {
    /// Unique name, used in logs, metrics and `explain`.
    pub name: Option<String>,
    /// Listeners this route is attached to; absent = every listener.
    pub listeners: Option<Vec<String>>,
    /// Sidecar only: the original destinations ("10.96.0.5:6379") of captured TCP
    /// connections this route takes.
    pub destinations: Option<Vec<String>>,
    /// Hosts: exact names or "*.suffix"; absent = any host.
    pub hosts: Option<Vec<String>>,
    /// A fixed answer instead of backends.
    pub direct_response: Option<RawDirectResponse>,
    /// A redirect instead of backends.
    pub redirect: Option<RawRedirect>,
    /// Path prefix and Host rewritten before the request goes upstream.
    pub rewrite: Option<RawRewrite>,
    /// Injected delays and aborts.
    pub fault: Option<RawFault>,
    /// A fire-and-forget copy of requests to another service.
    pub mirror: Option<RawMirror>,
    /// Bound on the whole request, retries included, e.g. "15s"; default none.
    pub timeout: Option<String>,
    /// Retry policy; absent = the defaults.
    pub retry: Option<RawRetry>,
    /// Changes to the request headers sent upstream.
    pub request_headers: Option<RawHeaderOps>,
    /// Changes to the response headers sent to the client.
    pub response_headers: Option<RawHeaderOps>,
    /// Match blocks; any one may match; none = match everything.
    #[serde(rename = "match")]
    pub matches: Vec<RawMatch>,
    /// Weighted split between services.
    pub backend: Vec<RawBackend>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(default)]
pub struct RawDirectResponse {
    /// HTTP status, 100-599.
    pub status: Option<u16>,
    /// Response body; default empty.
    pub body: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(default)]
pub struct RawRedirect {
    /// 301 (default), 302, 303, 307 or 308.
    pub status: Option<u16>,
    /// "http" or "https"; default: the request's.
    pub scheme: Option<String>,
    /// Default: the request's host.
    pub host: Option<String>,
    /// Default: the request's path; the query is always kept.
    pub path: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(default)]
pub struct RawRewrite {
    /// Replaces the path prefix (or exact path) that matched.
    pub path_prefix: Option<String>,
    /// Replaces the Host header.
    pub host: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(default)]
pub struct RawRetry {
    /// Retries after the first try; 0 disables; default 2.
    pub attempts: Option<u32>,
    /// Bound on each try; default none; always capped by what is left of `timeout`.
    pub per_try_timeout: Option<String>,
    /// Conditions; default ["connect-failure", "refused-stream", "503"].
    pub on: Option<Vec<RawRetryOn>>,
    /// Retry non-idempotent methods after they may have reached the upstream; default false.
    pub non_idempotent: Option<bool>,
    /// Base of exponential backoff with full jitter; default "25ms".
    pub backoff: Option<String>,
    /// Retries per service stay under ratio × requests + min_per_second.
    pub budget: Option<RawBudget>,
}

/// A retry condition: a name ("5xx", ...) or a status code.
#[derive(Debug, Deserialize)]
#[serde(
    untagged,
    expecting = "expected a retry condition: a name such as \"5xx\" or \"unavailable\", or a status code such as 503"
)]
pub enum RawRetryOn {
    Status(u16),
    Name(String),
}

#[derive(Debug, Default, Deserialize)]
#[serde(default)]
pub struct RawBudget {
    /// Default 0.2.
    pub ratio: Option<f64>,
    /// Default 10.
    pub min_per_second: Option<u32>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(default)]
pub struct RawMirror {
    /// Name of the `[[service]]` that gets the copies.
    pub service: Option<String>,
    /// Share of requests copied, 0-100; default 100.
    pub percent: Option<f64>,
    /// A request with a larger body is not mirrored; default 65536.
    pub max_body_bytes: Option<u64>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(default)]
pub struct RawFault {
    pub delay: Option<RawDelay>,
    pub abort: Option<RawAbort>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(default)]
pub struct RawDelay {
    /// How long, e.g. "2s".
    pub fixed: Option<String>,
    /// Share of requests delayed, 0-100; default 100.
    pub percent: Option<f64>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(default)]
pub struct RawAbort {
    /// Status answered instead of proxying.
    pub status: Option<u16>,
    /// Share of requests aborted, 0-100; default 100.
    pub percent: Option<f64>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(default)]
pub struct RawHeaderOps {
    /// Header -> value, replacing any value present.
    pub set: BTreeMap<String, String>,
    /// Header -> value, added beside any value present.
    pub add: BTreeMap<String, String>,
    /// Headers removed.
    pub remove: Vec<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(default)]
pub struct RawMatch {
    /// One of exact, prefix, regex.
    pub path: Option<RawStringMatch>,
    /// Allowed methods; absent = any.
    pub methods: Option<Vec<String>>,
    /// Header name -> condition; all must hold.
    pub headers: BTreeMap<String, RawStringMatch>,
    /// Query parameter name -> condition; all must hold.
    pub query: BTreeMap<String, RawStringMatch>,
}

/// A condition on a string: exactly one of the fields is set.
#[derive(Debug, Default, Deserialize)]
#[serde(default)]
pub struct RawStringMatch {
    pub exact: Option<String>,
    pub prefix: Option<String>,
    pub regex: Option<String>,
    /// Headers and query only: the value is present (true) or absent (false).
    pub present: Option<bool>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(default)]
pub struct RawBackend {
    /// Name of a `[[service]]`.
    pub service: Option<String>,
    /// Relative weight; default 1.
    pub weight: Option<u32>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(default)]
pub struct RawService {
    /// Unique name, referenced by `route.backend.service`.
    pub name: Option<String>,
    /// Static "ip:port" endpoints.
    pub endpoints: Option<Vec<String>>,
    /// Instead of endpoints: "name:port", resolved and re-resolved on TTL.
    pub dns: Option<String>,
    /// "round_robin" (default), "random", "least_request" or "consistent_hash".
    pub load_balancer: Option<String>,
    /// "http1" (default) or "http2" (h2c on plaintext, ALPN h2 over TLS).
    pub protocol: Option<String>,
    /// consistent_hash only: what to hash.
    pub hash_on: Option<RawHashOn>,
    /// Connection limits and timeouts (circuit breaking).
    pub connection_pool: Option<RawConnectionPool>,
    /// Passive ejection of failing endpoints.
    pub outlier_detection: Option<RawOutlierDetection>,
    /// Active HTTP health checks.
    pub health_check: Option<RawHealthCheck>,
    /// TLS to the endpoints; absent = plaintext.
    pub tls: Option<RawUpstreamTls>,
    /// "v1" or "v2": connections of tcp and tls listeners open with a PROXY protocol header.
    pub proxy_protocol: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(default)]
pub struct RawUpstreamTls {
    /// "simple" (verify the server) or "mutual" (also present a certificate).
    pub mode: Option<String>,
    /// PEM bundle of the CAs the server's certificate must chain to; default: the system's.
    pub ca: Option<String>,
    /// mutual only: the client certificate chain and key, PEM.
    pub cert: Option<String>,
    pub key: Option<String>,
    /// The name sent as SNI and verified in the server's certificate.
    pub sni: Option<String>,
    /// mesh only: the SPIFFE ids accepted from the server.
    pub identities: Option<Vec<String>>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(default)]
pub struct RawOutlierDetection {
    pub consecutive_5xx: Option<u32>,
    pub consecutive_gateway_errors: Option<u32>,
    pub interval: Option<String>,
    pub base_ejection_time: Option<String>,
    pub max_ejection_time: Option<String>,
    pub max_ejection_percent: Option<u32>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(default)]
pub struct RawHealthCheck {
    pub path: Option<String>,
    pub interval: Option<String>,
    pub timeout: Option<String>,
    pub healthy_threshold: Option<u32>,
    pub unhealthy_threshold: Option<u32>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(default)]
pub struct RawConnectionPool {
    /// Connections to the service at once; requests beyond wait (pending); default 1024.
    pub max_connections: Option<u64>,
    /// Requests waiting for a connection; beyond -> 503 UO; default 1024.
    pub max_pending_requests: Option<u64>,
    /// Concurrent requests (mirror copies included); over it -> 503 UO; default 1024.
    pub max_requests: Option<u64>,
    /// Default "5s".
    pub connect_timeout: Option<String>,
    /// How long an idle upstream connection is pooled; default "60s".
    pub idle_timeout: Option<String>,
}

/// `hash_on = { header = "x-user" }`, `{ cookie = "user" }` or `"source_ip"`.
#[derive(Debug, Deserialize)]
#[serde(
    untagged,
    expecting = "expected \"source_ip\", { header = \"x-user\" } or { cookie = \"user\" }"
)]
pub enum RawHashOn {
    Name(String),
    Table(RawHashOnTable),
}

/// Its own unknown keys refused here: serde_ignored, which finds the others, does not see
/// inside an untagged enum.
#[derive(Debug, Default, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RawHashOnTable {
    pub header: Option<String>,
    pub cookie: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(default)]
pub struct RawWorkload {
    pub cert: Option<String>,
    pub key: Option<String>,
    pub trust_bundle: Option<String>,
    pub trust_domains: Option<Vec<String>>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(default)]
pub struct RawInbound {
    pub listen: Option<String>,
    pub app: Option<String>,
    /// "http1" (default) or "http2" (h2c): how the sidecar speaks to the app.
    pub app_protocol: Option<String>,
    pub mtls: Option<String>,
    /// The app's ports that speak TCP other than HTTP, taken by traffic capture.
    pub tcp_ports: Option<Vec<u64>>,
    pub idle_timeout: Option<String>,
    pub max_connections: Option<u64>,
    /// Authorization of the requests to the app.
    pub policy: Vec<RawPolicy>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(default)]
pub struct RawPolicy {
    /// For `weir_authz_denied_total{policy}` and the logs; default `inbound.policy[N]`.
    pub name: Option<String>,
    /// "allow" or "deny".
    pub action: Option<String>,
    /// Peer SPIFFE ids; "*" = any verified peer; absent = anyone.
    pub principals: Option<Vec<String>>,
    /// Absent = any method.
    pub methods: Option<Vec<String>>,
    /// Exact, "prefix*" or "*suffix"; absent = any path.
    pub paths: Option<Vec<String>>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(default)]
pub struct RawOutbound {
    pub listen: Option<String>,
    pub idle_timeout: Option<String>,
    pub max_connections: Option<u64>,
    /// Captured calls no route takes go to their original destination (default true).
    pub passthrough: Option<bool>,
}
