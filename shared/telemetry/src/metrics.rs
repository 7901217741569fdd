//! Prometheus metrics (DESIGN.md §5). Labels hold only names from the config and fixed words,
//! never a path, an address or an error message, so their cardinality is bounded by the config.
//!
//! One registry per process, reached through [`metrics()`]: the proxy, the reloader and the
//! mirror tasks all count into it, and admin `/metrics` renders it.

use std::sync::{LazyLock, PoisonError, RwLock};
use std::time::Duration;

use prometheus::{
    Histogram, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge, IntGaugeVec, Opts,
    Registry, TextEncoder,
};

/// Upper bounds of `weir_request_duration_seconds`: from half a millisecond, where a proxied
/// request on one host lands, to a minute.
const DURATION_BUCKETS: [f64; 16] = [
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
    60.0,
];

pub struct Metrics {
    registry: Registry,
    /// `proxy` (gateway, inbound, outbound), `route`, `service`, `code`, `flags`; route and
    /// service are "" when the request had none (404 `NR`, a direct response). Counted through
    /// [`RequestSeries`].
    pub requests: IntCounterVec,
    /// `proxy`, `route`, `service`: from the request's first byte read to its last logged.
    pub request_duration: HistogramVec,
    /// `service`, `result`: success, failure, dropped (in-flight limit or slow reader),
    /// too_large (body over max_body_bytes).
    pub mirror_requests: IntCounterVec,
    /// `route`, `kind`: delay, abort.
    pub faults_injected: IntCounterVec,
    /// `policy`: the sidecar's inbound requests refused by a deny policy, or by none of the
    /// allow policies (`no-allow-matched`).
    pub authz_denied: IntCounterVec,
    /// `service`, `reason`: connect-failure, reset, timeout or the status retried.
    pub upstream_retries: IntCounterVec,
    /// `service`.
    pub outlier_ejections: IntCounterVec,
    /// `service`, `state`: healthy, ejected, unhealthy; set at scrape time.
    pub endpoints: IntGaugeVec,
    /// `service`: requests to the service in flight, mirror copies included.
    pub upstream_requests_active: IntGaugeVec,
    /// `listener`: client connections open.
    pub downstream_connections_active: IntGaugeVec,
    /// `listener`: client connections closed on arrival, the listener having its
    /// `max_connections` open.
    pub downstream_connections_rejected: IntCounterVec,
    /// `listener`: connections closed for a missing or bad PROXY protocol header.
    pub downstream_proxy_protocol_errors: IntCounterVec,
    /// `listener`, `route`, `service`, `flags`: connections a `tcp` or `tls` listener took,
    /// counted when they close.
    pub tcp_connections: IntCounterVec,
    /// `route`, `service`, `direction` (received from clients, sent to them): bytes of those.
    pub tcp_bytes: IntCounterVec,
    /// `result`: success, failure.
    pub config_reloads: IntCounterVec,
    pub config_generation: IntGauge,
    pub access_log_dropped: IntCounter,
    /// `--config-git` fetches that failed: a gateway serving a stale config is alerted on.
    pub config_fetch_failures: IntCounter,
    pub downstream_tls_handshake_failures: IntCounterVec,
    /// `source`, `revision`; one series, replaced on every reload.
    pub config_info: IntGaugeVec,
    /// `cert`: the certificate file as the config names it; when its leaf expires.
    pub tls_cert_expiry: IntGaugeVec,
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
        let requests = counter(
            "weir_requests_total",
            "Requests by proxy, route, service, status code and response flags.",
            &["proxy", "route", "service", "code", "flags"],
        );
        let request_duration = HistogramVec::new(
            HistogramOpts::new(
                "weir_request_duration_seconds",
                "Request duration by proxy, route and service.",
            )
            .buckets(DURATION_BUCKETS.to_vec()),
            &["proxy", "route", "service"],
        )
        .expect("valid metric");
        registry
            .register(Box::new(request_duration.clone()))
            .expect("unique metric");
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
        let authz_denied = counter(
            "weir_authz_denied_total",
            "Inbound requests refused by authorization policy (403 AD).",
            &["policy"],
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
        let downstream_connections_active = gauges(
            "weir_downstream_connections_active",
            "Client connections open, by listener.",
            &["listener"],
        );
        let tcp_connections = counter(
            "weir_tcp_connections_total",
            "Connections of tcp and tls listeners, counted when they close, by listener, route, service and response flags.",
            &["listener", "route", "service", "flags"],
        );
        let tcp_bytes = counter(
            "weir_tcp_bytes_total",
            "Bytes of tcp and tls listeners' connections: received from clients, sent to them.",
            &["route", "service", "direction"],
        );
        let downstream_connections_rejected = counter(
            "weir_downstream_connections_rejected_total",
            "Client connections closed on arrival because the listener had max_connections open.",
            &["listener"],
        );
        let downstream_proxy_protocol_errors = counter(
            "weir_downstream_proxy_protocol_errors_total",
            "Client connections closed on a proxy_protocol listener for a missing, malformed \
             or late PROXY header.",
            &["listener"],
        );
        let config_reloads = counter(
            "weir_config_reloads_total",
            "Config reloads by result.",
            &["result"],
        );
        // At 0 from the start: the first failed reload then counts as an increase, which
        // `increase()` and `rate()` alerts see (a series born at 1 they do not).
        for result in ["success", "failure"] {
            config_reloads.with_label_values(&[result]);
        }
        let downstream_tls_handshake_failures = counter(
            "weir_downstream_tls_handshake_failures_total",
            "Client TLS handshakes that failed: no_certificate (one required), bad_certificate \
             (it did not verify: CA, dates, SPIFFE id), not_tls (plaintext where TLS is \
             required), other.",
            &["listener", "reason"],
        );
        let access_log_dropped = IntCounter::new(
            "weir_access_log_dropped_total",
            "Access log lines lost: the writer could not keep up, or writing failed (a full \
             disk, a closed stdout).",
        )
        .expect("valid metric");
        registry
            .register(Box::new(access_log_dropped.clone()))
            .expect("unique metric");
        let config_fetch_failures = IntCounter::new(
            "weir_config_fetch_failures_total",
            "Fetches of the --config-git ref that failed (the server down or silent, the ref \
             gone); the config serving stays.",
        )
        .expect("valid metric");
        registry
            .register(Box::new(config_fetch_failures.clone()))
            .expect("unique metric");
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
        let tls_cert_expiry = gauges(
            "weir_tls_cert_expiry_timestamp_seconds",
            "When each certificate the config names expires, in seconds since the Unix epoch.",
            &["cert"],
        );
        Metrics {
            registry,
            requests,
            request_duration,
            mirror_requests,
            faults_injected,
            authz_denied,
            upstream_retries,
            outlier_ejections,
            endpoints,
            upstream_requests_active,
            downstream_connections_active,
            downstream_connections_rejected,
            downstream_proxy_protocol_errors,
            tcp_connections,
            tcp_bytes,
            config_reloads,
            config_generation,
            access_log_dropped,
            config_fetch_failures,
            downstream_tls_handshake_failures,
            config_info,
            tls_cert_expiry,
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

    /// Replaces the expiry series with the certificates of the serving config.
    pub fn certificates_applied<'a>(&self, certs: impl IntoIterator<Item = (&'a str, i64)>) {
        self.tls_cert_expiry.reset();
        for (cert, not_after) in certs {
            self.tls_cert_expiry
                .with_label_values(&[cert])
                .set(not_after);
        }
    }

    /// The Prometheus text exposition format.
    pub fn render(&self) -> String {
        TextEncoder::new()
            .encode_to_string(&self.registry.gather())
            .unwrap_or_default()
    }
}

/// The request series of one proxy, route and service, resolved once: a request then pays
/// an atomic add or two, not a hash of five labels and a map lookup per family.
pub struct RequestSeries {
    labels: [String; 3],
    duration: Histogram,
    /// `weir_requests_total` by code and flags, added as they first occur (a route sees few).
    outcomes: RwLock<Vec<(u16, &'static str, IntCounter)>>,
}

impl RequestSeries {
    pub fn new(proxy: &str, route: &str, service: &str) -> RequestSeries {
        RequestSeries {
            duration: metrics()
                .request_duration
                .with_label_values(&[proxy, route, service]),
            labels: [proxy.into(), route.into(), service.into()],
            outcomes: RwLock::default(),
        }
    }

    /// Counts one request; `code` is 0 when no response was sent (the client went away).
    pub fn record(&self, code: u16, flags: &'static str, took: Duration) {
        self.duration.observe(took.as_secs_f64());
        let known = self.outcomes.read().unwrap_or_else(PoisonError::into_inner);
        if let Some((.., counter)) = known.iter().find(|(c, f, _)| *c == code && *f == flags) {
            counter.inc();
            return;
        }
        drop(known);
        let [proxy, route, service] = &self.labels;
        let counter = metrics().requests.with_label_values(&[
            proxy.as_str(),
            route,
            service,
            &code.to_string(),
            flags,
        ]);
        counter.inc();
        (self
            .outcomes
            .write()
            .unwrap_or_else(PoisonError::into_inner))
        .push((code, flags, counter));
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
        let series = RequestSeries::new("gateway", "web", "api");
        for code in [200, 200, 503] {
            series.record(
                code,
                if code == 503 { "UF" } else { "" },
                Duration::from_millis(2),
            );
        }
        let text = m.render();
        let ok = r#"weir_requests_total{code="200",flags="",proxy="gateway",route="web",service="api"} 2"#;
        let uf = r#"weir_requests_total{code="503",flags="UF",proxy="gateway",route="web",service="api"} 1"#;
        assert!(text.contains(ok) && text.contains(uf), "{text}");
        let le = r#"weir_request_duration_seconds_bucket{proxy="gateway",route="web",service="api",le="0.0025"} 3"#;
        assert!(text.contains(le), "{text}");
        assert!(
            text.contains(r#"weir_config_info{revision="abc",source="config/gateway.toml"} 1"#),
            "{text}"
        );
    }
}
