//! weir-telemetry: what Weir tells operators.
//!
//! - [`metrics`]: the Prometheus families of DESIGN.md §5, one registry per process;
//! - [`access_log`]: one JSON line per request, written off the request path;
//! - [`otel`]: a span per request, sent to an OpenTelemetry collector over OTLP ([`otlp`]: the exporter, HTTP or gRPC,
//!   plaintext or TLS).

pub mod access_log;
pub mod metrics;
pub mod otel;
mod otlp;

pub use metrics::metrics;
