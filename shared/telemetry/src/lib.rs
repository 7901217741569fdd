//! weir-telemetry: what Weir tells operators.
//!
//! - [`metrics`]: the Prometheus families of DESIGN.md §5, one registry per process;
//! - [`access_log`]: one JSON line per request, written off the request path.

pub mod access_log;
pub mod metrics;

pub use metrics::metrics;
