//! Routing through the real gateway to real upstreams.
#![allow(clippy::unwrap_used)]

use weir_tests::{Gateway, Upstream};

fn backend(service: &str) -> String {
    format!("  [[route.backend]]\n  service = \"{service}\"\n")
}

#[test]
fn routes_on_header_method_query_and_host() {
    let (a, b, c, d, e) = (
        Upstream::start("by-header"),
        Upstream::start("by-method"),
        Upstream::start("by-query"),
        Upstream::start("by-host"),
        Upstream::start("default"),
    );
    let gw = Gateway::start(&format!(
        "{}{}{}{}{}\
[[route]]
name = \"header\"
  [[route.match]]
  headers = {{ \"x-user\" = {{ exact = \"jason\" }} }}
{}
[[route]]
name = \"method\"
  [[route.match]]
  methods = [\"DELETE\"]
{}
[[route]]
name = \"query\"
  [[route.match]]
  query = {{ \"variant\" = {{ exact = \"b\" }} }}
{}
[[route]]
name = \"host\"
hosts = [\"*.example.com\"]
{}
[[route]]
name = \"default\"
{}",
        a.service(),
        b.service(),
        c.service(),
        d.service(),
        e.service(),
        backend("by-header"),
        backend("by-method"),
        backend("by-query"),
        backend("by-host"),
        backend("default"),
    ));
    assert_eq!(gw.get("/", &[("x-user", "jason")]).body, "by-header");
    assert_eq!(gw.get("/", &[("x-user", "other")]).body, "default");
    let agent = weir_tests::client();
    assert_eq!(
        weir_tests::send(&agent, "DELETE", &gw.url("/"), &[])
            .unwrap()
            .body,
        "by-method"
    );
    assert_eq!(gw.get("/?variant=b", &[]).body, "by-query");
    assert_eq!(gw.get("/?variant=a", &[]).body, "default");
    assert_eq!(gw.get("/", &[("host", "shop.example.com")]).body, "by-host");
    // A fully qualified name, root dot and all, is the same host.
    assert_eq!(
        gw.get("/", &[("host", "shop.example.com.")]).body,
        "by-host"
    );
    assert_eq!(gw.get("/", &[("host", "example.org")]).body, "default");
}

#[test]
fn precedence_does_not_depend_on_declaration_order() {
    let (exact, prefix, any) = (
        Upstream::start("exact"),
        Upstream::start("prefix"),
        Upstream::start("any"),
    );
    // Declared from least to most specific: precedence must still pick the most specific.
    let gw = Gateway::start(&format!(
        "{}{}{}\
[[route]]
name = \"any\"
{}
[[route]]
name = \"prefix\"
  [[route.match]]
  path = {{ prefix = \"/api/\" }}
{}
[[route]]
name = \"exact\"
  [[route.match]]
  path = {{ exact = \"/api/health\" }}
{}",
        exact.service(),
        prefix.service(),
        any.service(),
        backend("any"),
        backend("prefix"),
        backend("exact"),
    ));
    assert_eq!(gw.get("/api/health", &[]).body, "exact");
    assert_eq!(gw.get("/api/users", &[]).body, "prefix");
    assert_eq!(gw.get("/other", &[]).body, "any");
}

#[test]
fn weighted_split_is_within_five_points_over_2000_requests() {
    let (v1, v2) = (Upstream::start("v1"), Upstream::start("v2"));
    let gw = Gateway::start(&format!(
        "{}{}[[route]]\nname = \"split\"\n  [[route.backend]]\n  service = \"v1\"\n  weight = 70\n\
         [[route.backend]]\n  service = \"v2\"\n  weight = 30\n",
        v1.service(),
        v2.service()
    ));
    let mut v2_count = 0;
    for _ in 0..2000 {
        let r = gw.get("/", &[]);
        assert_eq!(r.status, 200);
        if r.body == "v2" {
            v2_count += 1;
        }
    }
    let share = v2_count as f64 / 20.0;
    assert!(
        (25.0..=35.0).contains(&share),
        "v2 got {share}% (want 30 ± 5)"
    );
    assert_eq!(v1.hits() + v2.hits(), 2000);
}

#[test]
fn no_route_is_404_with_flag_nr() {
    let up = Upstream::start("api");
    let gw = Gateway::start(&format!(
        "{}[[route]]\nname = \"api\"\n  [[route.match]]\n  path = {{ prefix = \"/api/\" }}\n{}",
        up.service(),
        backend("api")
    ));
    let r = gw.get("/nothing-here", &[]);
    assert_eq!(r.status, 404);
    assert!(r.header("x-request-id").is_some());
    weir_tests::wait_until("access log line", std::time::Duration::from_secs(5), || {
        gw.access_log()
            .iter()
            .any(|l| l["status"] == 404 && l["flags"] == "NR" && l["path"] == "/nothing-here")
    });
    assert_eq!(up.hits(), 0);
    // The authority as the client sent it, port and all.
    let log = gw.access_log();
    assert_eq!(log[0]["authority"], format!("127.0.0.1:{}", gw.port));
}

/// The access log counts the bodies each way, as Envoy's `%BYTES_RECEIVED%` and
/// `%BYTES_SENT%` do for HTTP.
#[test]
fn the_access_log_counts_body_bytes() {
    let up = Upstream::start("api");
    let gw = Gateway::start(&format!(
        "{}[[route]]\nname = \"api\"\n{}",
        up.service(),
        backend("api")
    ));
    let url = gw.url("/x");
    let r = weir_tests::send_body(&weir_tests::client(), "POST", &url, &[], Some(b"hello"));
    assert_eq!(r.unwrap().body, "api");
    weir_tests::wait_until("access log line", std::time::Duration::from_secs(5), || {
        !gw.access_log().is_empty()
    });
    let line = &gw.access_log()[0];
    assert_eq!(
        (line["bytes_received"].as_u64(), line["bytes_sent"].as_u64()),
        (Some(5), Some(3)),
        "{line}"
    );
}

#[test]
fn direct_response_answers_without_upstream() {
    let gw = Gateway::start(
        "[[route]]\nname = \"teapot\"\ndirect_response = { status = 418, body = \"short and stout\\n\" }\n",
    );
    let r = gw.get("/", &[]);
    assert_eq!((r.status, r.body.as_str()), (418, "short and stout\n"));
}

#[test]
fn dead_upstream_is_a_fast_503_with_flags_uf_urx() {
    let dead = weir_tests::free_port();
    let gw = Gateway::start(&format!(
        "[[service]]\nname = \"dead\"\nendpoints = [\"127.0.0.1:{dead}\"]\n[[route]]\nname = \"r\"\n{}",
        backend("dead")
    ));
    let start = std::time::Instant::now();
    let r = gw.get("/", &[]);
    assert_eq!(r.status, 503);
    assert!(
        start.elapsed() < std::time::Duration::from_secs(3),
        "took {:?}",
        start.elapsed()
    );
    weir_tests::wait_until(
        "UF,URX in access log",
        std::time::Duration::from_secs(5),
        || {
            gw.access_log()
                .iter()
                .any(|l| l["status"] == 503 && l["flags"] == "UF,URX")
        },
    );
}

#[test]
fn forwarded_headers_and_request_id_are_set() {
    let up = Upstream::start("echo");
    let gw = Gateway::start(&format!(
        "{}[[route]]\nname = \"r\"\n{}",
        up.service(),
        backend("echo")
    ));

    let r = gw.get("/", &[]);
    assert_eq!(
        up.last_header("x-forwarded-for").as_deref(),
        Some("127.0.0.1")
    );
    assert_eq!(up.last_header("x-forwarded-proto").as_deref(), Some("http"));
    let generated = up.last_header("x-request-id").unwrap();
    assert_eq!(generated.len(), 36, "{generated}");
    assert_eq!(r.header("x-request-id"), Some(generated.as_str()));

    gw.get(
        "/",
        &[
            ("x-forwarded-for", "203.0.113.7"),
            ("x-request-id", "abc-123"),
        ],
    );
    assert_eq!(
        up.last_header("x-forwarded-for").as_deref(),
        Some("203.0.113.7, 127.0.0.1")
    );
    assert_eq!(up.last_header("x-request-id").as_deref(), Some("abc-123"));
    // Requests on one keep-alive connection reach the upstream over a pooled connection.
    assert_eq!(up.hits(), 2);
}

#[test]
fn encodings_pass_through_untouched() {
    let up = Upstream::start("plain-text-long-enough-to-compress");
    let gw = Gateway::start(&format!(
        "{}[[route]]\nname = \"r\"\n{}",
        up.service(),
        backend("plain-text-long-enough-to-compress")
    ));
    let reply = weir_tests::raw_request(
        gw.port,
        b"GET / HTTP/1.1\r\nHost: h\r\nAccept-Encoding: gzip\r\nConnection: close\r\n\r\n",
    );
    // Weir compresses nothing (no Pingora compression module): the client's Accept-Encoding
    // is the upstream's to honour, and the body comes back as the upstream sent it.
    assert_eq!(up.last_header("accept-encoding").as_deref(), Some("gzip"));
    assert!(
        reply.ends_with("\r\n\r\nplain-text-long-enough-to-compress"),
        "{reply}"
    );
    assert!(
        !reply.to_ascii_lowercase().contains("content-encoding"),
        "{reply}"
    );
}

#[test]
fn dot_segments_cannot_escape_a_prefix() {
    let (public, admin) = (Upstream::start("public"), Upstream::start("admin"));
    let gw = Gateway::start(&format!(
        "{}{}[[route]]\nname = \"public\"\n  [[route.match]]\n  path = {{ prefix = \"/public/\" }}\n{}\
         [[route]]\nname = \"admin\"\n  [[route.match]]\n  path = {{ prefix = \"/admin\" }}\n{}",
        public.service(),
        admin.service(),
        backend("public"),
        backend("admin"),
    ));
    // ureq would normalize the path itself: send the raw request line.
    let reply = weir_tests::raw_request(
        gw.port,
        b"GET /public/%2e%2e/admin/x?q=1 HTTP/1.1\r\nHost: h\r\nConnection: close\r\n\r\n",
    );
    assert!(reply.ends_with("admin"), "{reply}");
    assert_eq!(admin.last_header(":path").as_deref(), Some("/admin/x?q=1"));
    assert_eq!(public.hits(), 0);
    // An escaped letter is the letter (RFC 3986 §6.2.2.2), as the app would decode it; an
    // escaped slash stays one, its hex digits upper-cased (§6.2.2.1).
    let reply = weir_tests::raw_request(
        gw.port,
        b"GET /%61dmin/%7Ey%2fz HTTP/1.1\r\nHost: h\r\nConnection: close\r\n\r\n",
    );
    assert!(reply.ends_with("admin"), "{reply}");
    assert_eq!(admin.last_header(":path").as_deref(), Some("/admin/~y%2Fz"));
    // A backslash is a slash, as an app written for Windows takes it.
    let reply = weir_tests::raw_request(
        gw.port,
        b"GET /public\\..\\admin\\y HTTP/1.1\r\nHost: h\r\nConnection: close\r\n\r\n",
    );
    assert!(reply.ends_with("admin"), "{reply}");
    assert_eq!(admin.last_header(":path").as_deref(), Some("/admin/y"));
    assert_eq!(public.hits(), 0);
}

#[test]
fn pipelined_requests_are_answered_in_order() {
    let (first, third) = (Upstream::start("first-up"), Upstream::start("third-up"));
    let gw = Gateway::start(&format!(
        "{}{}[[route]]\nname = \"first\"\n  [[route.match]]\n  path = {{ exact = \"/1\" }}\n{}\
         [[route]]\nname = \"second\"\ndirect_response = {{ status = 200, body = \"second-direct\" }}\n  \
         [[route.match]]\n  path = {{ exact = \"/2\" }}\n\
         [[route]]\nname = \"third\"\n  [[route.match]]\n  path = {{ exact = \"/3\" }}\n{}",
        first.service(),
        third.service(),
        backend("first-up"),
        backend("third-up"),
    ));
    // All three in one write, before any answer: Pingora alone would answer the first, close
    // the connection and drop the others.
    let reply = weir_tests::raw_request(
        gw.port,
        b"GET /1 HTTP/1.1\r\nHost: h\r\n\r\nGET /2 HTTP/1.1\r\nHost: h\r\n\r\n\
          GET /3 HTTP/1.1\r\nHost: h\r\nConnection: close\r\n\r\n",
    );
    let at = |body: &str| {
        reply
            .find(body)
            .unwrap_or_else(|| panic!("{body} in {reply}"))
    };
    assert!(at("first-up") < at("second-direct"), "{reply}");
    assert!(at("second-direct") < at("third-up"), "{reply}");
    assert_eq!(reply.matches("HTTP/1.1 200").count(), 3, "{reply}");
}

#[test]
fn host_is_required_of_http11_and_supplied_for_http10() {
    let up = Upstream::start("up");
    let gw = Gateway::start(&format!(
        "{}[[route]]\nname = \"all\"\n  [[route.match]]\n  path = {{ prefix = \"/\" }}\n{}",
        up.service(),
        backend("up"),
    ));
    // RFC 9112 §3.2: 400, and the upstream never sees it.
    let reply = weir_tests::raw_request(gw.port, b"GET / HTTP/1.1\r\nConnection: close\r\n\r\n");
    assert!(reply.starts_with("HTTP/1.1 400"), "{reply}");
    assert!(reply.ends_with("missing host header\n"), "{reply}");
    // So is one with two Hosts, or with a Host that is no authority (§3.2); ports, IPv6
    // literals, an empty port and a root dot are hosts all the same.
    for (host, status) in [
        ("Host: a.example\r\nHost: b.example", 400),
        ("Host: a.example, b.example", 400),
        ("Host: a.example/x", 400),
        ("Host: a.example:abc", 400),
        ("Host: [::1]x", 400),
        ("Host: a]b", 400),
        ("Host: a.example:8080", 200),
        ("Host: [::1]:8080", 200),
        ("Host: [::1]", 200),
        ("Host: a.example:", 200),
        ("Host: A.Example.", 200),
    ] {
        let request = format!("GET / HTTP/1.1\r\n{host}\r\nConnection: close\r\n\r\n");
        let reply = weir_tests::raw_request(gw.port, request.as_bytes());
        let want = format!("HTTP/1.1 {status}");
        assert!(reply.starts_with(&want), "{host}: {reply}");
    }
    assert_eq!(up.hits(), 5);
    // HTTP/1.0 may leave Host out; the request upstream is HTTP/1.1 and carries the endpoint.
    let reply = weir_tests::raw_request(gw.port, b"GET /old HTTP/1.0\r\n\r\n");
    assert!(reply.starts_with("HTTP/1.1 200"), "{reply}");
    assert_eq!(up.last_header("host"), Some(up.addr.to_string()));
    assert_eq!(up.last_header(":path").as_deref(), Some("/old"));
}
