//! The validated config: every value parsed, every reference resolved, every default applied.
//!
//! Built only by [`crate::load`]; `Serialize` so that admin `/config` can show it.

use std::net::SocketAddr;
use std::path::PathBuf;
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
    /// Present only in a sidecar config.
    pub sidecar: Option<Sidecar>,
}

#[derive(Debug, Clone, Serialize)]
pub struct Runtime {
    /// Worker threads; 0 = one per core.
    pub threads: usize,
    #[serde(serialize_with = "as_str")]
    pub grace_period: Duration,
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
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Protocol {
    Http,
}

#[derive(Debug, Clone, Serialize)]
pub struct Listener {
    pub name: String,
    pub listen: SocketAddr,
    pub protocol: Protocol,
}

#[derive(Debug, Clone, Serialize)]
pub struct Route {
    pub name: String,
    /// Empty = attached to every listener.
    pub listeners: Vec<String>,
    /// Empty = any host.
    pub hosts: Vec<HostPattern>,
    /// Empty = match every request.
    pub matches: Vec<Match>,
    pub action: Action,
    pub rewrite: Option<Rewrite>,
    pub fault: Option<Fault>,
    pub mirror: Option<Mirror>,
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
    pub endpoints: Vec<SocketAddr>,
    pub load_balancer: LoadBalancer,
    pub connection_pool: ConnectionPool,
}

/// Limits and timeouts of the connections to one service.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ConnectionPool {
    pub max_requests: usize,
    #[serde(serialize_with = "as_str")]
    pub connect_timeout: Duration,
    #[serde(serialize_with = "as_str")]
    pub idle_timeout: Duration,
}

impl Default for ConnectionPool {
    fn default() -> Self {
        ConnectionPool {
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
    pub workload: Option<Workload>,
    pub inbound: Inbound,
    pub outbound: Outbound,
}

/// Paths only: key material is never loaded into, nor shown from, the config.
#[derive(Debug, Clone, Serialize)]
pub struct Workload {
    pub cert: PathBuf,
    pub key: PathBuf,
    pub trust_bundle: PathBuf,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Mtls {
    Strict,
    Permissive,
    Disable,
}

#[derive(Debug, Clone, Serialize)]
pub struct Inbound {
    pub listen: SocketAddr,
    pub app: SocketAddr,
    pub mtls: Mtls,
}

#[derive(Debug, Clone, Serialize)]
pub struct Outbound {
    pub listen: SocketAddr,
}

fn as_str<S: Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_str(&crate::duration::format(*d))
}
