//! Header changes, rewrites, redirects and fault injection through the real gateway.
#![allow(clippy::unwrap_used)]

use std::time::{Duration, Instant};

use weir_tests::{wait_until, Gateway, Upstream};

fn route_to(service: &str, extra: &str) -> String {
    format!("[[route]]\nname = \"r\"\n{extra}\n  [[route.backend]]\n  service = \"{service}\"\n")
}

#[test]
fn request_and_response_headers_are_set_added_and_removed() {
    let up = Upstream::start("app");
    let gw = Gateway::start(&format!(
        "{}{}",
        up.service(),
        route_to(
            "app",
            "[route.request_headers]\nset = { \"x-env\" = \"prod\" }\nadd = { \"x-seen-by\" = \"weir\" }\nremove = [\"x-debug\"]\n\
             [route.response_headers]\nset = { \"x-upstream\" = \"hidden\" }\nadd = { \"x-served-by\" = \"weir\" }\nremove = [\"server\"]"
        )
    ));
    let r = gw.get(
        "/",
        &[("x-env", "dev"), ("x-debug", "1"), ("x-seen-by", "edge")],
    );
    assert_eq!(r.status, 200);
    assert_eq!(up.last_header("x-env").as_deref(), Some("prod"));
    assert_eq!(up.last_header("x-debug"), None);
    assert!(up.last_header("x-seen-by").is_some());
    assert_eq!(r.header("x-upstream"), Some("hidden"));
    assert_eq!(r.header("x-served-by"), Some("weir"));
    assert_eq!(r.header("server"), None);
}

#[test]
fn path_prefix_and_host_are_rewritten() {
    let up = Upstream::start("reviews");
    let gw = Gateway::start(&format!(
        "{}[[route]]\nname = \"r\"\nrewrite = {{ path_prefix = \"/v2/\", host = \"reviews.internal\" }}\n\
         [[route.match]]\n  path = {{ prefix = \"/api/\" }}\n  [[route.backend]]\n  service = \"reviews\"\n",
        up.service()
    ));
    assert_eq!(gw.get("/api/items/7?x=1", &[]).status, 200);
    assert_eq!(up.last_header(":path").as_deref(), Some("/v2/items/7?x=1"));
    assert_eq!(up.last_header("host").as_deref(), Some("reviews.internal"));
}

#[test]
fn redirects_keep_what_they_do_not_change() {
    let gw = Gateway::start(
        "[[route]]\nname = \"moved\"\nredirect = { status = 308, scheme = \"https\", path = \"/new\" }\n",
    );
    // ureq follows redirects by default: ask on a raw connection.
    let reply = weir_tests::raw_request(
        gw.port,
        b"GET /old?q=1 HTTP/1.1\r\nHost: shop.example.com:8080\r\nConnection: close\r\n\r\n",
    );
    assert!(reply.starts_with("HTTP/1.1 308"), "{reply}");
    assert!(
        reply
            .to_ascii_lowercase()
            .contains("location: https://shop.example.com/new?q=1\r\n"),
        "{reply}"
    );
    // HTTP/1.0 may name no host: a new scheme has no host to go with (`https:///new` is no
    // URL), and a reference relative to the request's would keep the old scheme: 400.
    let reply = weir_tests::raw_request(gw.port, b"GET /old?q=1 HTTP/1.0\r\n\r\n");
    assert!(reply.starts_with("HTTP/1.1 400"), "{reply}");
    // An empty port is no port (RFC 3986 §3.2.3).
    let reply = weir_tests::raw_request(
        gw.port,
        b"GET /old HTTP/1.1\r\nHost: shop.example.com:\r\nConnection: close\r\n\r\n",
    );
    let location = "location: https://shop.example.com/new\r\n";
    assert!(reply.to_ascii_lowercase().contains(location), "{reply}");
    // A Host that is no host is not sent back as one (nginx answers it 400 too).
    for host in ["good.com/x", "a b", "good.com:abc"] {
        let request = format!("GET /old HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n");
        let reply = weir_tests::raw_request(gw.port, request.as_bytes());
        assert!(reply.starts_with("HTTP/1.1 400"), "{host}: {reply}");
        assert!(!reply.to_ascii_lowercase().contains("location:"), "{reply}");
    }
}

#[test]
fn aborts_honour_their_percentage_and_are_flagged() {
    let up = Upstream::start("app");
    let gw = Gateway::start(&format!(
        "{}{}",
        up.service(),
        route_to(
            "app",
            "[route.fault]\nabort = { status = 503, percent = 30.0 }"
        )
    ));
    let aborted = (0..2000).filter(|_| gw.get("/", &[]).status == 503).count();
    let share = aborted as f64 / 20.0;
    assert!(
        (28.0..=32.0).contains(&share),
        "aborted {share}% (want 30 ± 2)"
    );
    assert_eq!(up.hits(), 2000 - aborted);
    wait_until("FI in the access log", Duration::from_secs(5), || {
        gw.access_log()
            .iter()
            .filter(|l| l["flags"] == "FI" && l["status"] == 503)
            .count()
            == aborted
    });
    assert_eq!(
        gw.metric("weir_faults_injected_total{kind=\"abort\",route=\"r\"}"),
        aborted as f64
    );
}

#[test]
fn delays_hold_the_request_then_proxy_it() {
    let up = Upstream::start("app");
    let gw = Gateway::start(&format!(
        "{}{}",
        up.service(),
        route_to(
            "app",
            "[route.fault]\ndelay = { fixed = \"300ms\", percent = 100.0 }"
        )
    ));
    let start = Instant::now();
    let r = gw.get("/", &[]);
    assert_eq!((r.status, r.body.as_str()), (200, "app"));
    assert!(
        start.elapsed() >= Duration::from_millis(300),
        "{:?}",
        start.elapsed()
    );
    wait_until("FI in the access log", Duration::from_secs(5), || {
        gw.access_log()
            .iter()
            .any(|l| l["flags"] == "FI" && l["status"] == 200)
    });
    assert_eq!(
        gw.metric("weir_faults_injected_total{kind=\"delay\",route=\"r\"}"),
        1.0
    );
}

/// The counters of what a config can make happen are there at 0 from its load: an alert on
/// `increase()` would miss a first event that made its series appear.
#[test]
fn counters_of_what_the_config_can_do_start_at_zero() {
    let up = Upstream::start("app");
    let gw = Gateway::start(&format!(
        "{}[service.outlier_detection]\nconsecutive_5xx = 5\n{}",
        up.service(),
        route_to(
            "app",
            "[route.fault]\nabort = { status = 503, percent = 0.0 }\n[route.mirror]\nservice = \"app\""
        )
    ));
    let metrics = gw.admin_get("/metrics").unwrap().body;
    for series in [
        "weir_outlier_ejections_total{service=\"app\"} 0",
        "weir_faults_injected_total{kind=\"abort\",route=\"r\"} 0",
        "weir_mirror_requests_total{result=\"success\",service=\"app\"} 0",
        "weir_mirror_requests_total{result=\"dropped\",service=\"app\"} 0",
    ] {
        assert!(metrics.contains(series), "no {series:?} in:\n{metrics}");
    }
    assert!(
        !metrics.contains("kind=\"delay\""),
        "no delay is configured"
    );
}

/// A client that resets its connection before Weir's own answer (here a redirect) is written
/// is logged `DC`, as when its request was proxied, not as a 500 of Weir's.
#[test]
fn a_client_that_resets_before_weirs_own_answer_is_dc() {
    let gw = Gateway::start(
        "[[route]]\nname = \"go\"\nredirect = { status = 302, path = \"/elsewhere\" }\n",
    );
    // Each request is followed at once by a reset (SO_LINGER 0, then close).
    let reset = "import socket, struct, sys\n\
                 for _ in range(20):\n\
                 \x20   s = socket.create_connection(('127.0.0.1', int(sys.argv[1])))\n\
                 \x20   s.sendall(b'GET /go HTTP/1.1\\r\\nHost: x\\r\\n\\r\\n')\n\
                 \x20   s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack('ii', 1, 0))\n\
                 \x20   s.close()\n";
    let out = std::process::Command::new("/usr/bin/python3")
        .args(["-c", reset, &gw.port.to_string()])
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    wait_until("20 access log lines", Duration::from_secs(10), || {
        gw.access_log().len() == 20
    });
    let log = gw.access_log();
    // An answer that went out before its reset came is a 302 all the same.
    let dc = log.iter().filter(|l| l["flags"] == "DC").count();
    let sent = log
        .iter()
        .filter(|l| l["status"] == 302 && l["flags"] == "")
        .count();
    assert_eq!(dc + sent, 20, "{log:#?}");
    assert!(dc > 0, "no reset came before its answer: {log:#?}");
}

/// A delayed request that then fails keeps `FI` beside the failure's flags, so a search for
/// the delayed requests finds the failed ones too.
#[test]
fn a_delayed_request_that_fails_is_flagged_fi_too() {
    let dead = weir_tests::free_port();
    let gw = Gateway::start(&format!(
        "[[service]]\nname = \"dead\"\nendpoints = [\"127.0.0.1:{dead}\"]\n{}",
        route_to(
            "dead",
            "[route.fault]\ndelay = { fixed = \"10ms\", percent = 100.0 }"
        )
    ));
    assert_eq!(gw.get("/", &[]).status, 503);
    wait_until("the access log", Duration::from_secs(5), || {
        !gw.access_log().is_empty()
    });
    assert_eq!(gw.access_log()[0]["flags"], "FI,UF,URX");
}

#[test]
fn a_client_that_leaves_during_a_delay_takes_its_request_with_it() {
    use std::io::Write;
    let up = Upstream::start("app");
    let gw = Gateway::start(&format!(
        "{}{}",
        up.service(),
        route_to(
            "app",
            "[route.fault]\ndelay = { fixed = \"1s\", percent = 100.0 }"
        )
    ));
    let mut conn = std::net::TcpStream::connect(("127.0.0.1", gw.port)).unwrap();
    conn.write_all(b"GET /gone HTTP/1.1\r\nHost: a\r\n\r\n")
        .unwrap();
    std::thread::sleep(Duration::from_millis(100));
    drop(conn);
    wait_until("FI,DC in the access log", Duration::from_secs(5), || {
        gw.access_log()
            .iter()
            .any(|l| l["flags"] == "FI,DC" && l["path"] == "/gone")
    });
    // Logged once the client left, not at the end of the delay; and nothing went upstream.
    let log = gw.access_log();
    assert!(
        log[0]["duration_ms"].as_f64().unwrap() < 900.0,
        "{}",
        log[0]
    );
    assert_eq!(up.hits(), 0);
}

fn hashed_service(name: &str, endpoints: &[&Upstream], hash_on: &str) -> String {
    let eps: Vec<String> = endpoints
        .iter()
        .map(|u| format!("\"{}\"", u.addr))
        .collect();
    format!(
        "[[service]]\nname = \"{name}\"\nendpoints = [{}]\nload_balancer = \"consistent_hash\"\nhash_on = {hash_on}\n",
        eps.join(", ")
    )
}

#[test]
fn sticky_canary_keeps_each_user_on_one_version() {
    let (v1, v2) = (Upstream::start("v1"), Upstream::start("v2"));
    let gw = Gateway::start(&format!(
        "{}{}[[route]]\nname = \"split\"\n  [[route.backend]]\n  service = \"v1\"\n  weight = 50\n\
         [[route.backend]]\n  service = \"v2\"\n  weight = 50\n",
        hashed_service("v1", &[&v1], "{ header = \"x-user\" }"),
        hashed_service("v2", &[&v2], "{ header = \"x-user\" }"),
    ));
    let mut on_v2 = 0;
    for user in 0..40 {
        let id = format!("user-{user}");
        let first = gw.get("/", &[("x-user", &id)]).body;
        for _ in 0..5 {
            assert_eq!(gw.get("/", &[("x-user", &id)]).body, first, "{id} moved");
        }
        on_v2 += usize::from(first == "v2");
    }
    assert!(
        (8..=32).contains(&on_v2),
        "{on_v2} of 40 users on v2 (want about half)"
    );
}

#[test]
fn consistent_hash_keeps_a_cookie_on_one_endpoint() {
    let ups = [
        Upstream::start("a"),
        Upstream::start("b"),
        Upstream::start("c"),
    ];
    let gw = Gateway::start(&format!(
        "{}{}",
        hashed_service(
            "app",
            &[&ups[0], &ups[1], &ups[2]],
            "{ cookie = \"session\" }"
        ),
        route_to("app", "")
    ));
    let mut seen = std::collections::HashSet::new();
    for user in 0..30 {
        let cookie = format!("theme=dark; session=s{user}");
        let first = gw.get("/", &[("cookie", &cookie)]).body;
        for _ in 0..3 {
            assert_eq!(gw.get("/", &[("cookie", &cookie)]).body, first);
        }
        seen.insert(first);
    }
    assert_eq!(
        seen.len(),
        3,
        "30 sessions should reach every endpoint: {seen:?}"
    );
    // Without the cookie: round robin over all three.
    let spread: std::collections::HashSet<_> = (0..3).map(|_| gw.get("/", &[]).body).collect();
    assert_eq!(spread.len(), 3);
}
