//! Prometheus metrics (DESIGN.md §5). Labels hold only names from the config and fixed words,
//! never a path, an address or an error message, so their cardinality is bounded by the config.
//!
//! One registry per process, reached through [`metrics()`]: the proxy, the reloader and the
//! mirror tasks all count into it, and admin `/metrics` renders it.

use std::sync::LazyLock;

use prometheus::{IntCounterVec, IntGauge, IntGaugeVec, Opts, Registry, TextEncoder};

pub struct Metrics {
    registry: Registry,
    /// `service`, `result`: success, failure, dropped (in-flight limit or slow reader),
    /// too_large (body over max_body_bytes).
    pub mirror_requests: IntCounterVec,
    /// `route`, `kind`: delay, abort.
    pub faults_injected: IntCounterVec,
    /// `service`, `reason`: connect-failure, reset, timeout or the status retried.
    pub upstream_retries: IntCounterVec,
    /// `service`.
    pub outlier_ejections: IntCounterVec,
    /// `service`, `state`: healthy, ejected, unhealthy; set at scrape time.
    pub endpoints: IntGaugeVec,
    /// `service`: requests to the service in flight, mirror copies included.
    pub upstream_requests_active: IntGaugeVec,
    /// `result`: success, failure.
    pub config_reloads: IntCounterVec,
    pub config_generation: IntGauge,
    /// `source`, `revision`; one series, replaced on every reload.
    pub config_info: IntGaugeVec,
}

static METRICS: LazyLock<Metrics> = LazyLock::new(Metrics::new);

/// The process's metrics.
pub fn metrics() -> &'static Metrics {
    &METRICS
}

impl Metrics {
    fn new() -> Metrics {
        let registry = Registry::new();
        let counter = |name: &str, help: &str, labels: &[&str]| {
            let c = IntCounterVec::new(Opts::new(name, help), labels).expect("valid metric");
            registry
                .register(Box::new(c.clone()))
                .expect("unique metric");
            c
        };
        let gauges = |name: &str, help: &str, labels: &[&str]| {
            let g = IntGaugeVec::new(Opts::new(name, help), labels).expect("valid metric");
            registry
                .register(Box::new(g.clone()))
                .expect("unique metric");
            g
        };
        let mirror_requests = counter(
            "weir_mirror_requests_total",
            "Mirror copies by outcome.",
            &["service", "result"],
        );
        let faults_injected = counter(
            "weir_faults_injected_total",
            "Injected delays and aborts.",
            &["route", "kind"],
        );
        let upstream_retries = counter(
            "weir_upstream_retries_total",
            "Retries by service and reason.",
            &["service", "reason"],
        );
        let outlier_ejections = counter(
            "weir_outlier_ejections_total",
            "Endpoints ejected by outlier detection.",
            &["service"],
        );
        let endpoints = gauges(
            "weir_endpoints",
            "Endpoints by state.",
            &["service", "state"],
        );
        let upstream_requests_active = gauges(
            "weir_upstream_requests_active",
            "Requests in flight to a service, mirror copies included.",
            &["service"],
        );
        let config_reloads = counter(
            "weir_config_reloads_total",
            "Config reloads by result.",
            &["result"],
        );
        let config_generation = IntGauge::new(
            "weir_config_generation",
            "Generation of the serving config.",
        )
        .expect("valid metric");
        registry
            .register(Box::new(config_generation.clone()))
            .expect("unique metric");
        let config_info = gauges(
            "weir_config_info",
            "The serving config's source and revision.",
            &["source", "revision"],
        );
        Metrics {
            registry,
            mirror_requests,
            faults_injected,
            upstream_retries,
            outlier_ejections,
            endpoints,
            upstream_requests_active,
            config_reloads,
            config_generation,
            config_info,
        }
    }

    /// Records that the config at `source` with `revision` now serves as `generation`.
    pub fn config_applied(&self, source: &str, revision: &str, generation: u64) {
        self.config_generation
            .set(i64::try_from(generation).unwrap_or(i64::MAX));
        self.config_info.reset();
        self.config_info
            .with_label_values(&[source, revision])
            .set(1);
    }

    /// The Prometheus text exposition format.
    pub fn render(&self) -> String {
        TextEncoder::new()
            .encode_to_string(&self.registry.gather())
            .unwrap_or_default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_labelled_counters() {
        let m = metrics();
        m.mirror_requests
            .with_label_values(&["shadow", "dropped"])
            .inc();
        m.config_applied("config/gateway.toml", "abc", 3);
        let text = m.render();
        assert!(
            text.contains(r#"weir_mirror_requests_total{result="dropped",service="shadow"} 1"#),
            "{text}"
        );
        assert!(text.contains("weir_config_generation 3"), "{text}");
        assert!(
            text.contains(r#"weir_config_info{revision="abc",source="config/gateway.toml"} 1"#),
            "{text}"
        );
    }
}
