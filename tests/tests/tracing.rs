//! OpenTelemetry tracing: the real gateway sends its spans over OTLP (HTTP and gRPC) to a
//! collector that decodes them with the OTLP protobuf types, and carries the trace upstream
//! in `traceparent` to a real HTTP server.
#![allow(clippy::unwrap_used)]

use std::time::Duration;

use weir_tests::otlp::Collector;
use weir_tests::tls::TestCa;
use weir_tests::{free_port, wait_until, Gateway, Upstream};

/// A caller's trace and span (W3C Trace Context).
const TRACE: &str = "4bf92f3577b34da6a3ce929d0e0e4736";
const CALLER_SPAN: &str = "00f067aa0ba902b7";

fn routes(upstream: &Upstream) -> String {
    format!(
        "[[route]]\nname = \"reviews\"\n  [[route.match]]\n  path = {{ prefix = \"/reviews\" }}\n  [[route.backend]]\n  service = \"reviews\"\n\
         [[route]]\nname = \"down\"\n  [[route.match]]\n  path = {{ prefix = \"/down\" }}\n  [[route.backend]]\n  service = \"down\"\n\
         [[service]]\nname = \"reviews\"\nendpoints = [\"{}\"]\n\
         [[service]]\nname = \"down\"\nendpoints = [\"127.0.0.1:{}\"]\n",
        upstream.addr,
        free_port()
    )
}

/// `traceparent` as the upstream received it: (trace id, parent id, flags).
fn traceparent(upstream: &Upstream) -> (String, String, String) {
    let value = upstream.last_header("traceparent").expect("no traceparent");
    let parts: Vec<&str> = value.split('-').collect();
    assert_eq!((parts.len(), parts[0]), (4, "00"), "{value}");
    (parts[1].into(), parts[2].into(), parts[3].into())
}

#[test]
fn spans_go_to_an_otlp_http_collector_and_the_trace_goes_upstream() {
    let collector = Collector::start();
    let upstream = Upstream::start("reviews");
    let gw = Gateway::start(&format!(
        "[telemetry.tracing]\notlp_endpoint = \"http://127.0.0.1:{}\"\n{}",
        collector.http_port,
        routes(&upstream)
    ));

    // A caller's sampled trace: Weir's span is its child, and the upstream's parent.
    let caller = format!("00-{TRACE}-{CALLER_SPAN}-01");
    let reply = gw.get("/reviews/1", &[("traceparent", &caller)]);
    assert_eq!(reply.status, 200);
    let (trace, parent, flags) = traceparent(&upstream);
    assert_eq!((trace.as_str(), flags.as_str()), (TRACE, "01"));
    assert_ne!(parent, CALLER_SPAN, "the upstream's parent is Weir's span");
    assert_eq!(
        upstream.last_header("tracestate"),
        None,
        "none came, none goes"
    );
    let span = collector.wait_for_span("the span of /reviews/1", |s| s.trace_id == TRACE);
    assert_eq!(span.parent_span_id, CALLER_SPAN);
    assert_eq!(span.span_id, parent);
    assert_eq!(span.name, "GET reviews");
    assert_eq!(span.kind, 2, "server");
    assert_eq!(span.service_name, "weir-gateway");
    assert_eq!(span.status_code, 0);
    for (key, value) in [
        ("http.request.method", "GET"),
        ("url.path", "/reviews/1"),
        ("http.response.status_code", "200"),
        ("network.protocol.version", "1.1"),
        ("weir.route", "reviews"),
        ("weir.service", "reviews"),
        ("weir.listener", "web"),
        ("weir.upstream", &upstream.addr.to_string()),
        ("weir.request_id", reply.header("x-request-id").unwrap()),
    ] {
        assert_eq!(span.attribute(key), Some(value), "{key} in {span:?}");
    }
    let export = &collector.exports()[0];
    assert_eq!(
        (
            export.via.as_str(),
            export.path.as_str(),
            export.content_type.as_str()
        ),
        ("http", "/v1/traces", "application/x-protobuf")
    );

    // No traceparent: a new trace, with Weir's span at its root.
    assert_eq!(gw.get("/reviews/2", &[]).status, 200);
    let (trace, parent, flags) = traceparent(&upstream);
    assert_eq!(flags, "01");
    let span = collector.wait_for_span("the span of /reviews/2", |s| s.trace_id == trace);
    assert_eq!(
        (span.span_id.as_str(), span.parent_span_id.as_str()),
        (parent.as_str(), "")
    );

    // A caller's `tracestate` goes on as it came.
    let state = [
        ("traceparent", caller.as_str()),
        ("tracestate", "congo=t61rcWkgMzE"),
    ];
    assert_eq!(gw.get("/reviews/state", &state).status, 200);
    assert_eq!(
        upstream.last_header("tracestate").as_deref(),
        Some("congo=t61rcWkgMzE")
    );

    // A B3 caller that left the decision to Weir (no `x-b3-sampled`): sampled at ratio 1.
    let deferred = "0af7651916cd43dd8448eb211c80319c";
    let b3 = [("x-b3-traceid", deferred), ("x-b3-spanid", CALLER_SPAN)];
    assert_eq!(gw.get("/reviews/3", &b3).status, 200);
    assert_eq!(upstream.last_header("x-b3-sampled").as_deref(), Some("1"));
    let span = collector.wait_for_span("the span of /reviews/3", |s| s.trace_id == deferred);
    assert_eq!(span.parent_span_id, CALLER_SPAN);

    // B3's "do not sample" sent alone, without ids: kept for the new trace, whatever the
    // ratio, and passed on.
    for deny in [("b3", "0"), ("x-b3-sampled", "0")] {
        assert_eq!(gw.get("/reviews/declined", &[deny]).status, 200);
        assert_eq!(traceparent(&upstream).2, "00", "{deny:?}");
        assert_eq!(upstream.last_header("x-b3-sampled").as_deref(), Some("0"));
    }

    // A method a client made up is no span name of its own (OTel's `_OTHER`).
    let reply = weir_tests::send(&weir_tests::client(), "FOO", &gw.url("/reviews/foo"), &[]);
    assert_eq!(reply.unwrap().status, 200);
    let span = collector.wait_for_span("the span of FOO", |s| {
        s.attribute("url.path") == Some("/reviews/foo")
    });
    assert_eq!(span.name, "HTTP reviews");
    assert_eq!(span.attribute("http.request.method"), Some("_OTHER"));
    assert_eq!(span.attribute("http.request.method_original"), Some("FOO"));

    // A failure is an error span, its flags in the description; the access log names the trace.
    assert_eq!(gw.get("/down", &[]).status, 503);
    let span = collector.wait_for_span("the span of /down", |s| {
        s.attribute("url.path") == Some("/down")
    });
    assert_eq!(span.status_code, 2, "error");
    assert_eq!(span.status_message, "status 503 (UF,URX)");
    assert_eq!(span.attribute("weir.flags"), Some("UF,URX"));
    // Spans are exported in the order they end: the declined ones would have come first.
    let declined =
        |s: &weir_tests::otlp::SpanSeen| s.attribute("url.path") == Some("/reviews/declined");
    assert!(!collector.spans().iter().any(declined));
    wait_until(
        "eight access log lines",
        std::time::Duration::from_secs(10),
        || gw.access_log().len() == 8,
    );
    let log = gw.access_log();
    assert_eq!(log[0]["trace_id"], TRACE);
    assert_eq!(log[7]["trace_id"], span.trace_id.as_str());
}

#[test]
fn grpc_export_and_parent_based_sampling() {
    let collector = Collector::start();
    let upstream = Upstream::start("reviews");
    let gw = Gateway::start(&format!(
        "[telemetry.tracing]\notlp_endpoint = \"http://127.0.0.1:{}\"\nprotocol = \"grpc\"\n\
         sample_ratio = 0.0\nservice_name = \"edge\"\n{}",
        collector.grpc_port,
        routes(&upstream)
    ));

    // Nothing samples a new trace at ratio 0, but it still goes upstream, marked unsampled,
    // and so does a caller's unsampled trace.
    assert_eq!(gw.get("/reviews/new", &[]).status, 200);
    let (unsampled, _, flags) = traceparent(&upstream);
    assert_eq!(flags, "00");
    let declined = "0af7651916cd43dd8448eb211c80319c";
    let caller = format!("00-{declined}-{CALLER_SPAN}-00");
    assert_eq!(
        gw.get("/reviews/declined", &[("traceparent", &caller)])
            .status,
        200
    );
    let (trace, parent, flags) = traceparent(&upstream);
    assert_eq!((trace.as_str(), flags.as_str()), (declined, "00"));
    assert_ne!(parent, CALLER_SPAN);

    // A caller's sampled trace is recorded whatever the ratio.
    let caller = format!("00-{TRACE}-{CALLER_SPAN}-01");
    assert_eq!(
        gw.get("/reviews/sampled", &[("traceparent", &caller)])
            .status,
        200
    );
    let span = collector.wait_for_span("the sampled span", |s| s.trace_id == TRACE);
    assert_eq!(span.service_name, "edge");
    assert_eq!(span.parent_span_id, CALLER_SPAN);
    // Spans are exported in the order they end: the two before it would have come first.
    let traces: Vec<String> = collector.spans().into_iter().map(|s| s.trace_id).collect();
    assert_eq!(
        traces,
        [TRACE],
        "only the sampled trace: not {unsampled} or {declined}"
    );
    let export = &collector.exports()[0];
    assert_eq!(
        (export.via.as_str(), export.path.as_str()),
        (
            "grpc",
            "/opentelemetry.proto.collector.trace.v1.TraceService/Export"
        )
    );
    let log = gw.access_log();
    assert!(
        log[0].get("trace_id").is_none(),
        "unsampled: no trace id in {}",
        log[0]
    );
}

#[test]
fn a_collector_that_is_down_costs_no_request() {
    let upstream = Upstream::start("reviews");
    let gw = Gateway::start(&format!(
        "[telemetry.tracing]\notlp_endpoint = \"http://127.0.0.1:{}\"\n{}",
        free_port(),
        routes(&upstream)
    ));
    for i in 0..20 {
        assert_eq!(gw.get(&format!("/reviews/{i}"), &[]).status, 200);
    }
    wait_until(
        "the export failure in the log",
        std::time::Duration::from_secs(20),
        || gw.stderr().contains("tracing: export failing"),
    );
    assert_eq!(gw.get("/reviews/after", &[]).status, 200);
}

/// Spans still queued when the gateway is told to stop are sent before it exits.
#[test]
fn queued_spans_are_sent_at_shutdown() {
    let collector = Collector::start();
    let upstream = Upstream::start("reviews");
    // The batch thread would wait ten minutes before sending.
    let mut gw = Gateway::start_with_env(
        &format!(
            "[telemetry.tracing]\notlp_endpoint = \"http://127.0.0.1:{}\"\n{}",
            collector.http_port,
            routes(&upstream)
        ),
        &[("OTEL_BSP_SCHEDULE_DELAY", "600000")],
    );
    assert_eq!(gw.get("/reviews/last", &[]).status, 200);
    assert!(collector.spans().is_empty(), "sent before the delay");
    gw.signal("TERM");
    let exit = gw.wait_exit(std::time::Duration::from_secs(20));
    assert!(exit.is_some_and(|s| s.success()), "{exit:?}");
    let span = collector.wait_for_span("the queued span", |s| {
        s.attribute("url.path") == Some("/reviews/last")
    });
    assert_eq!(span.attribute("http.response.status_code"), Some("200"));
}

/// An `https://` collector that requires a client certificate: spans go over TLS with Weir's
/// certificate, by OTLP/HTTP and OTLP/gRPC, the collector's verified against `ca` and the
/// endpoint's host, with a token from `OTEL_EXPORTER_OTLP_HEADERS`. Without `ca`, the system's
/// trust store (here `SSL_CERT_FILE`) decides.
/// A gateway that trusts another CA sends nothing, says why, and serves on.
#[test]
fn spans_go_to_a_collector_over_mutual_tls() {
    let (ca, clients) = (TestCa::new("collector-ca"), TestCa::new("clients-ca"));
    let collector = Collector::start_tls(&ca.server(&["localhost"]), Some(&clients.pem()));
    let upstream = Upstream::start("reviews");
    let files = tempfile::tempdir().unwrap();
    let file = |name: &str, text: &str| {
        let path = files.path().join(name);
        std::fs::write(&path, text).unwrap();
        path.to_str().unwrap().to_string()
    };
    let weir = clients.client("weir-gateway", &[]);
    let tls = format!(
        "  [telemetry.tracing.tls]\n  ca = \"{}\"\n  cert = \"{}\"\n  key = \"{}\"\n",
        file("ca.pem", &ca.pem()),
        file("weir.pem", &weir.cert),
        file("weir-key.pem", &weir.key),
    );
    let tracing = |port: u16, protocol: &str, tls: &str| {
        format!(
            "[telemetry.tracing]\notlp_endpoint = \"https://localhost:{port}\"\n\
             protocol = \"{protocol}\"\n{tls}{}",
            routes(&upstream)
        )
    };
    let sent_by = |collector: &Collector, path: &str| {
        collector.wait_for_span(path, |s| s.attribute("url.path") == Some(path));
        let export = (collector.exports().into_iter()).find(|e| {
            e.spans
                .iter()
                .any(|s| s.attribute("url.path") == Some(path))
        });
        let export = export.unwrap();
        (export.via, export.peer, export.authorization)
    };
    // A token for the collector, percent-encoded as the OTel variable wants it.
    let token = [("OTEL_EXPORTER_OTLP_HEADERS", "authorization=Bearer%20t0ken")];
    for (port, protocol, via) in [
        (collector.http_port, "http/protobuf", "http"),
        (collector.grpc_port, "grpc", "grpc"),
    ] {
        let gw = Gateway::start_with_env(&tracing(port, protocol, &tls), &token);
        let path = format!("/reviews/{via}");
        assert_eq!(gw.get(&path, &[]).status, 200);
        assert_eq!(
            sent_by(&collector, &path),
            (via.into(), "weir-gateway".into(), "Bearer t0ken".into())
        );
    }

    // No `ca`: the system's roots, which rustls-native-certs reads from SSL_CERT_FILE.
    let open = Collector::start_tls(&ca.server(&["localhost"]), None);
    let system = [("SSL_CERT_FILE", file("system.pem", &ca.pem()))];
    let system = system
        .iter()
        .map(|(k, v)| (*k, v.as_str()))
        .collect::<Vec<_>>();
    for (port, protocol) in [(open.http_port, "http/protobuf"), (open.grpc_port, "grpc")] {
        let gw = Gateway::start_with_env(&tracing(port, protocol, ""), &system);
        let path = format!("/reviews/system-{port}");
        assert_eq!(gw.get(&path, &[]).status, 200);
        assert_eq!(sent_by(&open, &path).1, "", "no client certificate");
        assert_eq!(sent_by(&open, &path).2, "", "no token");
    }

    // Trusting another CA: the handshake fails, so nothing is sent, and the log says why;
    // requests are served all the same.
    let other = TestCa::new("other-ca");
    let distrust = tls.replace(&file("ca.pem", &ca.pem()), &file("other.pem", &other.pem()));
    for (port, protocol) in [
        (collector.http_port, "http/protobuf"),
        (collector.grpc_port, "grpc"),
    ] {
        let gw = Gateway::start(&tracing(port, protocol, &distrust));
        let path = format!("/reviews/distrusted-{port}");
        assert_eq!(gw.get(&path, &[]).status, 200);
        wait_until(
            "the export failure in the log",
            Duration::from_secs(20),
            || gw.stderr().contains("tracing: export failing"),
        );
        let log = gw.stderr();
        assert!(
            log.contains("invalid peer certificate: UnknownIssuer"),
            "{protocol}: {log}"
        );
        assert_eq!(gw.get("/reviews/after", &[]).status, 200);
        assert!(
            !(collector.spans().iter()).any(|s| s.attribute("url.path") == Some(&path)),
            "a span went to a collector Weir does not trust"
        );
    }
}

/// A route's mirror copy belongs to the same trace: its `traceparent` names Weir's span, as
/// the request to the route's own service does.
#[test]
fn a_mirror_copy_carries_weirs_span() {
    let collector = Collector::start();
    let (upstream, shadow) = (Upstream::start("reviews"), Upstream::start("shadow"));
    let gw = Gateway::start(&format!(
        "[telemetry.tracing]\notlp_endpoint = \"http://127.0.0.1:{}\"\n\
         [[route]]\nname = \"reviews\"\n  [[route.backend]]\n  service = \"reviews\"\n  [route.mirror]\n  service = \"shadow\"\n{}{}",
        collector.http_port,
        upstream.service(),
        shadow.service(),
    ));
    let caller = format!("00-{TRACE}-{CALLER_SPAN}-01");
    assert_eq!(
        gw.get("/reviews/1", &[("traceparent", &caller)]).status,
        200
    );
    wait_until(
        "the mirror copy",
        std::time::Duration::from_secs(10),
        || shadow.last_header("traceparent").is_some(),
    );
    let (trace, parent, _) = traceparent(&upstream);
    assert_eq!(traceparent(&shadow), (trace, parent.clone(), "01".into()));
    let span = collector.wait_for_span("the span of /reviews/1", |s| s.trace_id == TRACE);
    assert_eq!(span.span_id, parent);
}

/// B3, the Zipkin headers Istio's Envoy sends and its apps forward, names the parent as
/// `traceparent` does, with the caller's sampling decision, and goes upstream beside it.
#[test]
fn b3_headers_name_the_parent_and_go_upstream() {
    let collector = Collector::start();
    let upstream = Upstream::start("reviews");
    let gw = Gateway::start(&format!(
        "[telemetry.tracing]\notlp_endpoint = \"http://127.0.0.1:{}\"\nsample_ratio = 0.0\n{}",
        collector.http_port,
        routes(&upstream)
    ));
    let b3 = |name: &str| upstream.last_header(name);

    // No decision from a B3 caller: Weir decides, at ratio 0 not to sample, and says so.
    let deferred = "0af7651916cd43dd8448eb211c80319c";
    let headers = [("x-b3-traceid", deferred), ("x-b3-spanid", CALLER_SPAN)];
    assert_eq!(gw.get("/reviews/deferred", &headers).status, 200);
    assert_eq!(b3("x-b3-traceid").as_deref(), Some(deferred));
    assert_eq!(b3("x-b3-sampled").as_deref(), Some("0"));
    assert_eq!(traceparent(&upstream).2, "00");

    // Multiple headers, sampled: Weir's span is the caller's child, recorded at ratio 0, and
    // the upstream's parent in both formats. The caller's own parent id does not go on.
    let headers = [
        ("x-b3-traceid", TRACE),
        ("x-b3-spanid", CALLER_SPAN),
        ("x-b3-sampled", "1"),
        ("x-b3-parentspanid", "00000000000000aa"),
    ];
    assert_eq!(gw.get("/reviews/multi", &headers).status, 200);
    let (trace, parent, flags) = traceparent(&upstream);
    assert_eq!((trace.as_str(), flags.as_str()), (TRACE, "01"));
    assert_eq!(
        (b3("x-b3-traceid"), b3("x-b3-spanid"), b3("x-b3-sampled")),
        (Some(TRACE.into()), Some(parent.clone()), Some("1".into()))
    );
    assert_eq!(b3("x-b3-parentspanid"), None);
    let span = collector.wait_for_span("the span of /reviews/multi", |s| s.trace_id == TRACE);
    assert_eq!(
        (span.span_id.as_str(), span.parent_span_id.as_str()),
        (parent.as_str(), CALLER_SPAN)
    );

    // The single `b3` header, a 64-bit trace id: read, and replaced by the multiple headers.
    let single = format!("a3ce929d0e0e4736-{CALLER_SPAN}-1");
    assert_eq!(gw.get("/reviews/single", &[("b3", &single)]).status, 200);
    let padded = "0000000000000000a3ce929d0e0e4736";
    assert_eq!(traceparent(&upstream).0, padded);
    assert_eq!(
        b3("b3"),
        None,
        "the caller's single header names the caller's span"
    );
    let span = collector.wait_for_span("the span of /reviews/single", |s| s.trace_id == padded);
    assert_eq!(span.parent_span_id, CALLER_SPAN);

    // Both formats, naming different traces: `traceparent` wins.
    let w3c = "4bf92f3577b34da6a3ce929d0e0e4737";
    let caller = format!("00-{w3c}-{CALLER_SPAN}-01");
    let headers = [
        ("x-b3-traceid", TRACE),
        ("x-b3-spanid", CALLER_SPAN),
        ("x-b3-sampled", "1"),
        ("traceparent", caller.as_str()),
    ];
    assert_eq!(gw.get("/reviews/both", &headers).status, 200);
    assert_eq!(b3("x-b3-traceid").as_deref(), Some(w3c));
    collector.wait_for_span("the span of /reviews/both", |s| s.trace_id == w3c);

    // B3's debug flag: sampled, and passed on.
    let debug = "4bf92f3577b34da6a3ce929d0e0e4738";
    let headers = [
        ("x-b3-traceid", debug),
        ("x-b3-spanid", CALLER_SPAN),
        ("x-b3-flags", "1"),
    ];
    assert_eq!(gw.get("/reviews/debug", &headers).status, 200);
    assert_eq!(b3("x-b3-flags").as_deref(), Some("1"));
    assert_eq!(traceparent(&upstream).2, "01");
    collector.wait_for_span("the span of /reviews/debug", |s| s.trace_id == debug);
    // The single header's debug flag `d` too.
    let single_debug = "4bf92f3577b34da6a3ce929d0e0e4739";
    let header = format!("{single_debug}-{CALLER_SPAN}-d");
    assert_eq!(gw.get("/reviews/d", &[("b3", &header)]).status, 200);
    assert_eq!(
        traceparent(&upstream),
        (
            single_debug.to_string(),
            traceparent(&upstream).1,
            "01".to_string()
        )
    );
    collector.wait_for_span("the span of /reviews/d", |s| s.trace_id == single_debug);

    // Spans are exported in the order they end: the deferred one would have come first.
    let traces: Vec<String> = collector.spans().into_iter().map(|s| s.trace_id).collect();
    assert_eq!(
        traces,
        [TRACE, padded, w3c, debug, single_debug],
        "not {deferred}"
    );

    // `x-b3-sampled: true`, which B3 asks to be taken as `1`: the caller's trace goes on.
    let truly = "4bf92f3577b34da6a3ce929d0e0e473a";
    let headers = [
        ("x-b3-traceid", truly),
        ("x-b3-spanid", CALLER_SPAN),
        ("x-b3-sampled", "true"),
    ];
    assert_eq!(gw.get("/reviews/true", &headers).status, 200);
    assert_eq!(traceparent(&upstream).0, truly);
    assert_eq!(traceparent(&upstream).2, "01");
    collector.wait_for_span("the span of /reviews/true", |s| s.trace_id == truly);

    // A decision to sample sent alone, without ids: a new trace, sampled at ratio 0, its span
    // a root.
    for (i, decision) in [
        ("b3", "1"),
        ("b3", "d"),
        ("x-b3-sampled", "1"),
        ("x-b3-flags", "1"),
    ]
    .into_iter()
    .enumerate()
    {
        let path = format!("/reviews/alone-{i}");
        assert_eq!(gw.get(&path, &[decision]).status, 200);
        let (trace, _, flags) = traceparent(&upstream);
        assert_eq!(flags, "01", "{decision:?}");
        let span = collector.wait_for_span(&format!("the span of {path}"), |s| {
            s.attribute("url.path") == Some(path.as_str())
        });
        assert_eq!((span.trace_id, span.parent_span_id), (trace, String::new()));
    }

    // Two `tracestate` fields are one list (W3C Trace Context §3.3.1), passed on whole.
    let caller = format!("00-{TRACE}-{CALLER_SPAN}-01");
    let request = format!(
        "GET /reviews/states HTTP/1.1\r\nHost: h\r\ntraceparent: {caller}\r\n\
         tracestate: congo=t61rcWkgMzE\r\ntracestate: rojo=00f067aa0ba902b7\r\n\
         Connection: close\r\n\r\n"
    );
    let reply = weir_tests::raw_request(gw.port, request.as_bytes());
    assert!(reply.starts_with("HTTP/1.1 200"), "{reply}");
    assert_eq!(
        upstream.last_header("tracestate").as_deref(),
        Some("congo=t61rcWkgMzE,rojo=00f067aa0ba902b7")
    );
}
