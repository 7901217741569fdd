//! OpenTelemetry tracing (DESIGN.md `[telemetry.tracing]`): one span per request, sent in
//! batches over OTLP.
//!
//! A request's span is a child of the caller's when its `traceparent` (W3C Trace Context) or
//! its B3 headers (Zipkin's, which Istio's Envoy sends and its apps forward) name one, and the
//! caller's sampling decision is kept; a new trace, or a B3 caller that left the decision to
//! Weir, is sampled at `sample_ratio`. The request goes upstream with both `traceparent` and
//! B3 headers naming Weir's span, sampled or not, so the trace carries on across the hop
//! whichever the app forwards. The span ends with the same facts as the access log line
//! ([`Entry`]), which gains the trace id.
//!
//! Spans are queued for the SDK's batch thread, never sent on the request path; when the
//! queue is full (the collector is down or slow) new spans are dropped.

use std::borrow::Cow;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use http::{HeaderMap, HeaderName, HeaderValue};
use opentelemetry::propagation::{Extractor, TextMapCompositePropagator, TextMapPropagator};
use opentelemetry::trace::{
    Span as _, SpanContext, SpanKind, Status, TraceContextExt, TraceFlags, Tracer as _,
};
use opentelemetry::{Context, KeyValue};
use opentelemetry_otlp::SpanExporter as OtlpExporter;
use opentelemetry_sdk::error::OTelSdkResult;
use opentelemetry_sdk::propagation::TraceContextPropagator;
use opentelemetry_sdk::trace::{
    Sampler, SamplingDecision, SamplingResult, SdkTracer, SdkTracerProvider, ShouldSample, Span,
    SpanData, SpanExporter,
};
use opentelemetry_sdk::Resource;
use tracing::{info, warn};
use weir_config::Tracing as Config;

use crate::access_log::Entry;

/// The tracer provider, its batch thread and, for gRPC, the runtime its client runs on.
/// [`Tracing::shutdown`] sends what is queued.
pub struct Tracing {
    provider: SdkTracerProvider,
    shut: AtomicBool,
    /// gRPC only: tonic's connection lives on a runtime, which the batch thread has not.
    _runtime: Option<tokio::runtime::Runtime>,
}

/// What the proxy holds to start spans: cheap to clone.
#[derive(Clone)]
pub struct Tracer {
    tracer: SdkTracer,
    /// B3 first, then W3C: the last that finds its headers names the parent, so `traceparent`
    /// wins when a request has both.
    propagator: Arc<TextMapCompositePropagator>,
    /// Decides for a B3 caller that sent no `x-b3-sampled`, as for a new trace.
    ratio: Sampler,
}

/// One request's span; boxed, as the SDK's span is large and the proxy's per-request state
/// holds it.
pub struct RequestSpan(Box<Span>);

/// Starts tracing: the exporter, the batch thread and the sampler.
pub fn start(config: &Config) -> Result<(Tracing, Tracer), String> {
    let (exporter, runtime) = crate::otlp::exporter(config)
        .map_err(|e| format!("OTLP exporter for {}: {e}", config.otlp_endpoint))?;
    let exporter = Reported {
        inner: exporter,
        endpoint: config.otlp_endpoint.clone(),
        failing: AtomicBool::new(false),
    };
    let provider = SdkTracerProvider::builder()
        .with_batch_exporter(exporter)
        .with_sampler(CallerFirst(Sampler::ParentBased(Box::new(
            Sampler::TraceIdRatioBased(config.sample_ratio),
        ))))
        .with_resource(
            Resource::builder_empty()
                .with_service_name(config.service_name.clone())
                .build(),
        )
        .build();
    let tracer = Tracer {
        tracer: opentelemetry::trace::TracerProvider::tracer(&provider, "weir"),
        propagator: Arc::new(TextMapCompositePropagator::new(vec![
            // Both forms read (`b3` single and `x-b3-*`), and the single form's debug `d`.
            Box::new(opentelemetry_propagator_b3::Propagator::with_encoding(
                opentelemetry_propagator_b3::B3Encoding::SingleAndMultiHeader,
            )),
            Box::new(TraceContextPropagator::new()),
        ])),
        ratio: Sampler::TraceIdRatioBased(config.sample_ratio),
    };
    info!(endpoint = %config.otlp_endpoint, protocol = ?config.protocol, "tracing to OTLP");
    let tracing = Tracing {
        provider,
        shut: AtomicBool::new(false),
        _runtime: runtime,
    };
    Ok((tracing, tracer))
}

impl Tracing {
    /// Sends the spans still queued (waiting up to 2 s), as the process exits. Later calls
    /// do nothing.
    pub fn shutdown(&self) {
        if self.shut.swap(true, Ordering::AcqRel) {
            return;
        }
        if let Err(e) = self.provider.shutdown_with_timeout(Duration::from_secs(2)) {
            warn!("tracing: spans lost at shutdown: {e}");
        }
    }
}

impl Tracer {
    /// The span of a request that came with `headers`. `client`: the sidecar's outbound
    /// side, which calls out for its app (Envoy's egress span); elsewhere Weir serves.
    pub fn request_span(&self, headers: &HeaderMap, client: bool) -> RequestSpan {
        let parent = self.decide(self.propagator.extract(&Headers::new(headers)), headers);
        let kind = match client {
            true => SpanKind::Client,
            false => SpanKind::Server,
        };
        let span = self
            .tracer
            .span_builder("request")
            .with_kind(kind)
            .start_with_context(&self.tracer, &parent);
        RequestSpan(Box::new(span))
    }

    /// The B3 decisions the parent-based sampler would misread, made here as Envoy makes
    /// them: a parent that leaves sampling to the callee (no `x-b3-sampled`: the propagator
    /// marks it "deferred") is decided by the trace id at `sample_ratio`; one with the debug
    /// flag is sampled; and a decision sent alone, without ids (`b3: 0`, `b3: 1`, `b3: d`,
    /// `x-b3-sampled`, `x-b3-flags: 1`), which the propagator drops, holds for the new trace.
    fn decide(&self, parent: Context, headers: &HeaderMap) -> Context {
        let remote = parent.span().span_context().clone();
        let flags = remote.trace_flags();
        let (trace, span, sampled) = if !remote.is_valid() {
            return match b3_decision_alone(headers) {
                Some(sampled) => Context::new().with_value(CallerDecision(sampled)),
                None => parent,
            };
        } else if flags & B3_DEBUG == B3_DEBUG {
            (remote.trace_id(), remote.span_id(), true)
        } else if flags & B3_DEFERRED == B3_DEFERRED {
            let decision = self.ratio.should_sample(
                None,
                remote.trace_id(),
                "request",
                &SpanKind::Server,
                &[],
                &[],
            );
            let sampled = decision.decision == SamplingDecision::RecordAndSample;
            (remote.trace_id(), remote.span_id(), sampled)
        } else {
            return parent;
        };
        let flags = (flags & B3_DEBUG).with_sampled(sampled);
        Context::new().with_remote_span_context(SpanContext::new(
            trace,
            span,
            flags,
            true,
            remote.trace_state().clone(),
        ))
    }

    /// Sets `traceparent` (and `tracestate`) and the multiple B3 headers to name `span`,
    /// replacing the caller's: B3 headers Weir does not write (the single `b3`, the parent id)
    /// are removed, so none of them names the caller's span to the app.
    ///
    /// Written here rather than by the propagators, which would parse each header's name and
    /// copy its value (three allocations a header, on every request tracing is on for, sampled
    /// or not), and send an empty `tracestate`. The formats are W3C's and B3's, as the
    /// propagators write them; the propagators still read them.
    pub fn inject(&self, span: &RequestSpan, headers: &mut HeaderMap) {
        let context = span.0.span_context();
        for name in REPLACED {
            headers.remove(name);
        }
        let (trace, id) = (context.trace_id(), context.span_id());
        let sampled = context.is_sampled();
        let flags = if sampled { "01" } else { "00" };
        set(headers, TRACEPARENT, format!("00-{trace}-{id}-{flags}"));
        let state = context.trace_state().header();
        if !state.is_empty() {
            set(headers, TRACESTATE, state);
        }
        set(headers, X_B3_TRACEID, trace.to_string());
        set(headers, X_B3_SPANID, id.to_string());
        if context.trace_flags() & B3_DEBUG == B3_DEBUG {
            headers.insert(X_B3_FLAGS, HeaderValue::from_static("1"));
        } else {
            let sampled = HeaderValue::from_static(if sampled { "1" } else { "0" });
            headers.insert(X_B3_SAMPLED, sampled);
        }
    }
}

/// A B3 sampling decision sent without trace ids, for a new trace: `b3: 0`, `1` or `d`
/// (debug, so sampled), `x-b3-flags: 1`, or `x-b3-sampled` alone.
fn b3_decision_alone(headers: &HeaderMap) -> Option<bool> {
    let value = |name: &str| headers.get(name).map(|v| v.as_bytes());
    match value("b3") {
        Some(b"0") => return Some(false),
        Some(b"1" | b"d") => return Some(true),
        _ => {}
    }
    if headers.contains_key(X_B3_TRACEID) {
        return None;
    }
    if value("x-b3-flags") == Some(b"1") {
        return Some(true);
    }
    sampled_state(value("x-b3-sampled")?).map(|sampled| sampled == "1")
}

/// `x-b3-sampled` as the propagator reads it: `1` or `0`, also when written `true` or `false`
/// (B3 asks for both to be taken; the propagator takes `true` only when it writes no single
/// header, and then drops the caller's trace).
fn sampled_state(value: &[u8]) -> Option<&'static str> {
    match value {
        b"1" => Some("1"),
        b"0" => Some("0"),
        v if v.eq_ignore_ascii_case(b"true") => Some("1"),
        v if v.eq_ignore_ascii_case(b"false") => Some("0"),
        _ => None,
    }
}

/// A new trace's sampling decision that a caller sent without trace ids.
#[derive(Clone, Copy, Debug)]
struct CallerDecision(bool);

/// The sampler: a [`CallerDecision`] in the parent context holds, else `sample_ratio` for a
/// new trace and the parent's decision for a continued one.
#[derive(Clone, Debug)]
struct CallerFirst(Sampler);

impl ShouldSample for CallerFirst {
    fn should_sample(
        &self,
        parent: Option<&Context>,
        trace_id: opentelemetry::trace::TraceId,
        name: &str,
        kind: &SpanKind,
        attributes: &[KeyValue],
        links: &[opentelemetry::trace::Link],
    ) -> SamplingResult {
        match parent.and_then(Context::get::<CallerDecision>) {
            Some(&CallerDecision(sampled)) => SamplingResult {
                decision: match sampled {
                    true => SamplingDecision::RecordAndSample,
                    false => SamplingDecision::Drop,
                },
                attributes: Vec::new(),
                trace_state: Default::default(),
            },
            None => (self.0).should_sample(parent, trace_id, name, kind, attributes, links),
        }
    }
}

/// Inserts a header whose value Weir formatted (hex digits and dashes, or a `tracestate` that
/// was read from a header), without copying it.
fn set(headers: &mut HeaderMap, name: HeaderName, value: String) {
    if let Ok(value) = HeaderValue::try_from(value) {
        headers.insert(name, value);
    }
}

const TRACEPARENT: HeaderName = HeaderName::from_static("traceparent");
const TRACESTATE: HeaderName = HeaderName::from_static("tracestate");
const X_B3_TRACEID: HeaderName = HeaderName::from_static("x-b3-traceid");
const X_B3_SPANID: HeaderName = HeaderName::from_static("x-b3-spanid");
const X_B3_SAMPLED: HeaderName = HeaderName::from_static("x-b3-sampled");
const X_B3_FLAGS: HeaderName = HeaderName::from_static("x-b3-flags");

/// The methods of RFC 9110 and PATCH (RFC 5789), as OTel's HTTP conventions know them.
const KNOWN_METHODS: [&str; 9] = [
    "GET", "HEAD", "POST", "PUT", "DELETE", "CONNECT", "OPTIONS", "TRACE", "PATCH",
];

/// B3's debug flag ("sampled, and record everything"), as its propagator marks it.
const B3_DEBUG: TraceFlags = TraceFlags::new(0x04);

/// The B3 propagator's mark of a parent that sent no sampling decision.
const B3_DEFERRED: TraceFlags = TraceFlags::new(0x02);

/// Trace headers a caller may send that [`Tracer::inject`] may not overwrite.
const REPLACED: [HeaderName; 5] = [
    TRACESTATE,
    HeaderName::from_static("b3"),
    HeaderName::from_static("x-b3-parentspanid"),
    X_B3_SAMPLED,
    X_B3_FLAGS,
];

impl RequestSpan {
    /// The trace id as 32 hex digits, for the access log; `None` when the span is not
    /// sampled (its trace goes nowhere).
    pub fn trace_id(&self) -> Option<String> {
        let context = self.0.span_context();
        context.is_sampled().then(|| context.trace_id().to_string())
    }

    /// Ends the span with what the access log says of the request: HTTP semantic
    /// conventions where they have a name, `weir.*` for the rest.
    pub fn end(mut self, entry: &Entry) {
        let span = &mut *self.0;
        if !span.is_recording() {
            return;
        }
        // A method a client made up is `_OTHER` (span name `HTTP`), as OTel's HTTP conventions
        // say: a name for each would have no bound.
        let known = KNOWN_METHODS.contains(&entry.method);
        let method = if known { entry.method } else { "HTTP" };
        span.update_name(match entry.route {
            Some(route) => Cow::Owned(format!("{method} {route}")),
            None => Cow::Owned(method.to_string()),
        });
        let mut attributes = vec![
            KeyValue::new(
                "http.request.method",
                if known { entry.method } else { "_OTHER" }.to_string(),
            ),
            KeyValue::new("url.path", entry.path.to_string()),
            KeyValue::new("server.address", host_part(entry.authority).to_string()),
            KeyValue::new(
                "network.protocol.version",
                entry.protocol.trim_start_matches("HTTP/"),
            ),
            KeyValue::new("weir.listener", entry.listener.to_string()),
            KeyValue::new("weir.request_id", entry.request_id.to_string()),
            KeyValue::new("weir.config_generation", entry.generation as i64),
        ];
        let optional = [
            entry.client.map(|ip| ("client.address", ip.to_string())),
            entry.route.map(|r| ("weir.route", r.to_string())),
            entry.service.map(|s| ("weir.service", s.to_string())),
            entry.upstream.map(|a| ("weir.upstream", a.to_string())),
            entry.peer.map(|p| ("weir.peer", p.to_string())),
            (!entry.flags.is_empty()).then(|| ("weir.flags", entry.flags.to_string())),
            (!known).then(|| ("http.request.method_original", entry.method.to_string())),
        ];
        attributes.extend(
            optional
                .into_iter()
                .flatten()
                .map(|(k, v)| KeyValue::new(k, v)),
        );
        if entry.status > 0 {
            attributes.push(KeyValue::new(
                "http.response.status_code",
                i64::from(entry.status),
            ));
        }
        if let Some(bytes) = entry.bytes {
            attributes.push(KeyValue::new(
                "http.request.body.size",
                bytes.received as i64,
            ));
            attributes.push(KeyValue::new("http.response.body.size", bytes.sent as i64));
        }
        span.set_attributes(attributes);
        // As OTel's HTTP conventions: a 5xx is an error, and so is no response at all.
        if entry.status == 0 || entry.status >= 500 {
            let description = match entry.flags {
                "" => format!("status {}", entry.status),
                flags => format!("status {} ({flags})", entry.status),
            };
            span.set_status(Status::error(description));
        }
        span.end();
    }
}

/// The OTLP exporter, saying in the log when export starts failing and when it recovers
/// (the SDK itself is silent), not once per batch.
#[derive(Debug)]
struct Reported {
    inner: OtlpExporter,
    endpoint: String,
    failing: AtomicBool,
}

impl SpanExporter for Reported {
    async fn export(&self, batch: Vec<SpanData>) -> OTelSdkResult {
        let result = self.inner.export(batch).await;
        let failed = result.is_err();
        if self.failing.swap(failed, Ordering::Relaxed) != failed {
            match &result {
                Err(e) => warn!(endpoint = %self.endpoint, "tracing: export failing: {e}"),
                Ok(()) => info!(endpoint = %self.endpoint, "tracing: export recovered"),
            }
        }
        result
    }

    fn shutdown_with_timeout(&self, timeout: Duration) -> OTelSdkResult {
        self.inner.shutdown_with_timeout(timeout)
    }

    fn set_resource(&mut self, resource: &Resource) {
        self.inner.set_resource(resource);
    }
}

/// A request's headers as the propagators read them: `x-b3-sampled` as `1` or `0`
/// ([`sampled_state`]), and several `tracestate` fields as one list, as W3C Trace Context
/// (§3.3.1) has them combined.
struct Headers<'a> {
    map: &'a HeaderMap,
    tracestate: Option<String>,
}

impl<'a> Headers<'a> {
    fn new(map: &'a HeaderMap) -> Headers<'a> {
        let states = map.get_all(TRACESTATE);
        let tracestate = (states.iter().nth(1).is_some()).then(|| {
            let states = states.iter().filter_map(|v| v.to_str().ok());
            states.collect::<Vec<_>>().join(",")
        });
        Headers { map, tracestate }
    }
}

impl Extractor for Headers<'_> {
    fn get(&self, key: &str) -> Option<&str> {
        let value = self.map.get(key)?;
        match key {
            "x-b3-sampled" => sampled_state(value.as_bytes()).or(value.to_str().ok()),
            "tracestate" => self.tracestate.as_deref().or(value.to_str().ok()),
            _ => value.to_str().ok(),
        }
    }

    fn keys(&self) -> Vec<&str> {
        self.map.keys().map(HeaderName::as_str).collect()
    }
}

/// The host of an authority, for `server.address` (OpenTelemetry keeps the port apart, and an
/// IPv6 address without its brackets).
fn host_part(authority: &str) -> &str {
    if let Some(v6) = authority.strip_prefix('[') {
        return v6.split(']').next().unwrap_or(v6);
    }
    match authority.rsplit_once(':') {
        Some((host, port)) if port.bytes().all(|b| b.is_ascii_digit()) => host,
        _ => authority,
    }
}

#[cfg(test)]
mod tests {
    use super::host_part;

    #[test]
    fn the_server_address_is_the_host_without_its_port() {
        for (authority, host) in [
            ("localhost:8080", "localhost"),
            ("example.com", "example.com"),
            ("[::1]:443", "::1"),
            ("10.0.0.1", "10.0.0.1"),
        ] {
            assert_eq!(host_part(authority), host);
        }
    }
}
