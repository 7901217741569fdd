//! Resilience through the real gateway: circuit breaking, against real upstreams.
#![allow(clippy::unwrap_used)]

use std::io::{Read, Write};
use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::thread;
use std::time::{Duration, Instant};

use weir_tests::{client, free_port, send, wait_until, Closes, Gateway, RawUpstream, Upstream};

#[test]
fn over_max_requests_the_answer_is_an_immediate_503_uo() {
    let stall = Duration::from_secs(3);
    let up = Upstream::slow("app", stall);
    let gw = Gateway::start(&format!(
        "[[service]]\nname = \"app\"\nendpoints = [\"{}\"]\nconnection_pool = {{ max_requests = 2 }}\n\
         [[route]]\nname = \"r\"\n  [[route.backend]]\n  service = \"app\"\n",
        up.addr
    ));
    // Two requests fill the service; each stalls at the upstream.
    let url = gw.url("/");
    let held: Vec<_> = (0..2)
        .map(|_| {
            let url = url.clone();
            thread::spawn(move || {
                let start = Instant::now();
                let r = send(&client(), "GET", &url, &[]).unwrap();
                (r.status, start.elapsed())
            })
        })
        .collect();
    wait_until(
        "both requests at the upstream",
        Duration::from_secs(10),
        || up.hits() == 2,
    );
    let start = Instant::now();
    let r = gw.get("/", &[]);
    let shed = start.elapsed();
    assert_eq!((r.status, r.body.as_str()), (503, "upstream overflow\n"));
    for h in held {
        let (status, took) = h.join().unwrap();
        assert_eq!(status, 200);
        // The saturated path waits for the upstream; the shed one must not.
        assert!(
            shed * 10 < took,
            "shed in {shed:?}, saturated took {took:?}"
        );
    }
    assert_eq!(up.hits(), 2, "the shed request never reached the upstream");
    wait_until("UO in the access log", Duration::from_secs(5), || {
        gw.access_log()
            .iter()
            .any(|l| l["flags"] == "UO" && l["status"] == 503)
    });
    // The places are given back: the service serves again.
    assert_eq!(gw.get("/", &[]).status, 200);
}

fn service(name: &str, endpoints: &[String], extra: &str) -> String {
    let list: Vec<String> = endpoints.iter().map(|e| format!("\"{e}\"")).collect();
    format!(
        "[[service]]\nname = \"{name}\"\nendpoints = [{}]\n{extra}\n",
        list.join(", ")
    )
}

/// A retry budget that never binds, for tests about something else.
const AMPLE: &str = "  budget = { ratio = 1.0, min_per_second = 1000 }\n";

/// A route "r" to service "app" with `extra` route keys (before any sub-table).
fn route(extra: &str) -> String {
    format!("[[route]]\nname = \"r\"\n{extra}\n  [[route.backend]]\n  service = \"app\"\n")
}

fn post(gw: &Gateway, body: &str) -> u16 {
    weir_tests::send_body(&client(), "POST", &gw.url("/"), &[], Some(body.as_bytes()))
        .unwrap()
        .status
}

#[test]
fn a_503_is_retried_on_another_endpoint() {
    let (bad, good) = (Upstream::failing("bad", 503), Upstream::start("good"));
    let gw = Gateway::start(&format!(
        "{}{}",
        service("app", &[bad.addr.to_string(), good.addr.to_string()], ""),
        route(&format!("  [route.retry]\n{AMPLE}"))
    ));
    for _ in 0..20 {
        let r = gw.get("/", &[]);
        assert_eq!((r.status, r.body.as_str()), (200, "good"));
    }
    assert!(bad.hits() >= 5, "round robin sent {} to bad", bad.hits());
    assert_eq!(good.hits(), 20);
    assert_eq!(
        gw.metric("weir_upstream_retries_total{reason=\"503\",service=\"app\"}"),
        bad.hits() as f64
    );
}

#[test]
fn a_post_is_retried_only_when_it_never_reached_the_upstream() {
    let (bad, good) = (Upstream::failing("bad", 503), Upstream::start("good"));
    let refused = format!("127.0.0.1:{}", weir_tests::free_port());
    let gw = Gateway::start(&format!(
        "{}{}{}[[route]]\nname = \"refusing\"\n  [[route.match]]\n  path = {{ prefix = \"/refused\" }}\n  \
         [[route.backend]]\n  service = \"refusing\"\n",
        service("app", &[bad.addr.to_string(), good.addr.to_string()], ""),
        service("refusing", &[refused, good.addr.to_string()], ""),
        route(&format!("  [route.retry]\n{AMPLE}"))
    ));
    let statuses: Vec<u16> = (0..10).map(|i| post(&gw, &format!("order {i}"))).collect();
    assert!(statuses.contains(&503), "{statuses:?}");
    assert_eq!(bad.hits(), statuses.iter().filter(|s| **s == 503).count());
    // A refused connection proves the POST never arrived: it is retried.
    let agent = client();
    for i in 0..10 {
        let r = weir_tests::send_body(
            &agent,
            "POST",
            &gw.url("/refused"),
            &[],
            Some(format!("pay {i}").as_bytes()),
        )
        .unwrap();
        assert_eq!(r.status, 200);
    }
    // Recovered connect failures leave no flag on the requests they delayed.
    wait_until("the access log", Duration::from_secs(5), || {
        gw.access_log()
            .iter()
            .filter(|l| l["path"] == "/refused")
            .count()
            == 10
    });
    assert!(gw
        .access_log()
        .iter()
        .filter(|l| l["path"] == "/refused")
        .all(|l| l["status"] == 200 && l["flags"] == ""));
}

#[test]
fn non_idempotent_true_retries_a_post_after_a_503() {
    let (bad, good) = (Upstream::failing("bad", 503), Upstream::start("good"));
    let gw = Gateway::start(&format!(
        "{}{}  [route.retry]\n  non_idempotent = true\n{AMPLE}",
        service("app", &[bad.addr.to_string(), good.addr.to_string()], ""),
        route("")
    ));
    for i in 0..10 {
        assert_eq!(post(&gw, &format!("order {i}")), 200);
    }
    assert_eq!(good.last_body(), b"order 9");
}

#[test]
fn resets_are_retried_only_when_listed() {
    let resetter = weir_tests::Resetter::start();
    let good = Upstream::start("good");
    let endpoints = [resetter.addr.to_string(), good.addr.to_string()];
    let gw = Gateway::start(&format!(
        "{}{}  [route.retry]\n  on = [\"reset\"]\n{AMPLE}",
        service("app", &endpoints, ""),
        route("")
    ));
    for _ in 0..10 {
        assert_eq!(gw.get("/", &[]).status, 200);
    }
    assert!(resetter.hits() >= 3);
    let gw = Gateway::start(&format!(
        "{}{}  [route.retry]\n  on = [\"503\"]\n",
        service("app", &endpoints, ""),
        route("")
    ));
    let statuses: Vec<u16> = (0..10).map(|_| gw.get("/", &[]).status).collect();
    assert!(statuses.contains(&502), "{statuses:?}");
}

#[test]
fn the_retry_budget_keeps_a_failing_upstream_from_being_stormed() {
    let bad = Upstream::failing("bad", 503);
    let gw = Gateway::start(&format!(
        "{}{}  [route.retry]\n  attempts = 5\n  on = [\"503\"]\n  backoff = \"1ms\"\n  \
         budget = {{ ratio = 0.2, min_per_second = 1 }}\n",
        service("app", &[bad.addr.to_string()], ""),
        route("")
    ));
    let start = Instant::now();
    let n = 200;
    for _ in 0..n {
        assert_eq!(gw.get("/", &[]).status, 503);
    }
    let seconds = start.elapsed().as_secs_f64();
    let received = bad.hits() as f64;
    // Without the budget: 6 tries per request, 1,200.
    let bound = (1.0 + 0.2) * n as f64 + 1.0 * seconds.ceil() + 1.0;
    assert!(
        received <= bound,
        "upstream got {received} for {n} requests in {seconds:.1}s (bound {bound})"
    );
    assert!(
        received > n as f64 * 1.1,
        "the budget still allows retries: {received}"
    );
    wait_until("URX in the access log", Duration::from_secs(5), || {
        gw.access_log().iter().any(|l| l["flags"] == "URX")
    });
}

#[test]
fn the_deadline_bounds_every_try_and_answers_504_dt() {
    let stall = Duration::from_secs(3);
    let slow = Upstream::slow("slow", stall);
    let gw = Gateway::start(&format!(
        "{}{}",
        service("app", &[slow.addr.to_string()], ""),
        route("timeout = \"400ms\"")
    ));
    let start = Instant::now();
    let r = gw.get("/", &[]);
    let took = start.elapsed();
    assert_eq!(r.status, 504);
    assert!(took < stall / 2, "took {took:?}");
    wait_until("DT in the access log", Duration::from_secs(5), || {
        gw.access_log()
            .iter()
            .any(|l| l["flags"] == "DT" && l["status"] == 504)
    });
}

#[test]
fn a_per_try_timeout_is_retried_elsewhere_and_is_504_ut_when_tries_run_out() {
    let stall = Duration::from_secs(3);
    let (slow, good) = (Upstream::slow("slow", stall), Upstream::start("good"));
    let gw = Gateway::start(&format!(
        "{}{}  [route.retry]\n  per_try_timeout = \"300ms\"\n  on = [\"gateway-error\"]\n{AMPLE}",
        service("app", &[slow.addr.to_string(), good.addr.to_string()], ""),
        route("timeout = \"10s\"")
    ));
    for _ in 0..4 {
        let start = Instant::now();
        assert_eq!(gw.get("/", &[]).body, "good");
        assert!(start.elapsed() < stall, "{:?}", start.elapsed());
    }
    assert!(slow.hits() >= 1);
    let gw = Gateway::start(&format!(
        "{}{}  [route.retry]\n  attempts = 0\n  per_try_timeout = \"300ms\"\n",
        service("app", &[slow.addr.to_string()], ""),
        route("")
    ));
    assert_eq!(gw.get("/", &[]).status, 504);
    wait_until("UT in the access log", Duration::from_secs(5), || {
        gw.access_log()
            .iter()
            .any(|l| l["flags"] == "UT" && l["status"] == 504)
    });
}

#[test]
fn max_connections_queue_up_to_max_pending_then_overflow() {
    let up = Upstream::slow("app", Duration::from_millis(1500));
    let gw = Gateway::start(&format!(
        "{}{}",
        service(
            "app",
            &[up.addr.to_string()],
            "connection_pool = { max_connections = 1, max_pending_requests = 1 }"
        ),
        route("")
    ));
    let url = gw.url("/");
    let held: Vec<_> = (0..2)
        .map(|_| {
            let url = url.clone();
            thread::spawn(move || send(&client(), "GET", &url, &[]).unwrap().status)
        })
        .collect();
    // One holds the connection, the other waits in line for it.
    wait_until("both requests in", Duration::from_secs(10), || {
        up.hits() == 1 && gw.metric("weir_upstream_requests_active{service=\"app\"}") == 2.0
    });
    let start = Instant::now();
    let r = gw.get("/", &[]);
    let shed = start.elapsed();
    assert_eq!((r.status, r.body.as_str()), (503, "upstream overflow\n"));
    assert!(shed < Duration::from_millis(1500), "shed after {shed:?}");
    for h in held {
        assert_eq!(
            h.join().unwrap(),
            200,
            "the queued request is served in turn"
        );
    }
    assert_eq!(up.hits(), 2);
}

/// A client that leaves while its request waits in line for a connection, or waits out a
/// retry's backoff, takes the request with it: no place in line kept, no upstream reached
/// (as Envoy cancels a pending request when its client resets).
#[test]
fn a_client_that_leaves_while_its_request_waits_takes_it_along() {
    let slow = Upstream::slow("slow", Duration::from_millis(1500));
    let bad = Upstream::failing("bad", 503);
    let gw = Gateway::start(&format!(
        "{}{}[[route]]\nname = \"retried\"\n  [[route.match]]\n  path = {{ prefix = \"/retried\" }}\n  \
         [[route.backend]]\n  service = \"bad\"\n  [route.retry]\n  backoff = \"10m\"\n{AMPLE}\
         [[route]]\nname = \"r\"\n  [[route.backend]]\n  service = \"slow\"\n",
        service(
            "slow",
            &[slow.addr.to_string()],
            "connection_pool = { max_connections = 1, max_pending_requests = 1 }"
        ),
        service("bad", &[bad.addr.to_string()], ""),
    ));
    // In line: one request holds the only connection, the next waits, and its client leaves.
    let url = gw.url("/first");
    let first = thread::spawn(move || send(&client(), "GET", &url, &[]).unwrap().status);
    wait_until("the first upstream", Duration::from_secs(10), || {
        slow.hits() == 1
    });
    let mut waiting = std::net::TcpStream::connect(("127.0.0.1", gw.port)).unwrap();
    waiting
        .write_all(b"GET /left HTTP/1.1\r\nHost: a\r\n\r\n")
        .unwrap();
    wait_until("the second in line", Duration::from_secs(10), || {
        gw.metric("weir_upstream_requests_active{service=\"slow\"}") == 2.0
    });
    drop(waiting);
    let left = |path: &str| {
        gw.access_log()
            .iter()
            .any(|l| l["path"] == path && l["flags"] == "DC")
    };
    wait_until("/left logged DC", Duration::from_secs(5), || left("/left"));
    // Its place in line is free again: the next request waits and is served, not 503 UO.
    assert_eq!(gw.get("/third", &[]).status, 200);
    assert_eq!(first.join().unwrap(), 200);
    assert_eq!(
        slow.hits(),
        2,
        "the request whose client left reached the upstream"
    );
    // A retry's backoff: the client leaves after the first try's 503.
    let mut retried = std::net::TcpStream::connect(("127.0.0.1", gw.port)).unwrap();
    retried
        .write_all(b"GET /retried HTTP/1.1\r\nHost: a\r\n\r\n")
        .unwrap();
    wait_until("the first try", Duration::from_secs(10), || bad.hits() == 1);
    drop(retried);
    wait_until("/retried logged DC", Duration::from_secs(5), || {
        left("/retried")
    });
    assert_eq!(bad.hits(), 1, "a retry went out for a client that had left");
    // The same over HTTP/2: curl gives up (and closes) while its request waits.
    let gives_up = |path: &str, after: &str| {
        let curl = std::process::Command::new("curl")
            .args([
                "-s",
                "-o",
                "/dev/null",
                "--http2-prior-knowledge",
                "-m",
                after,
            ])
            .arg(gw.url(path))
            .status()
            .unwrap();
        assert_eq!(
            curl.code(),
            Some(28),
            "{path}: curl gave up at its time limit"
        );
    };
    let url = gw.url("/first-h2");
    let first = thread::spawn(move || send(&client(), "GET", &url, &[]).unwrap().status);
    wait_until("the first upstream", Duration::from_secs(10), || {
        slow.hits() == 3
    });
    gives_up("/left-h2", "0.5");
    wait_until("/left-h2 logged DC", Duration::from_secs(5), || {
        left("/left-h2")
    });
    assert_eq!(first.join().unwrap(), 200);
    assert_eq!(
        slow.hits(),
        3,
        "an HTTP/2 request whose client left reached the upstream"
    );
    gives_up("/retried-h2", "0.5");
    wait_until("/retried-h2 logged DC", Duration::from_secs(5), || {
        left("/retried-h2")
    });
    assert_eq!(
        bad.hits(),
        2,
        "a retry went out for an HTTP/2 client that had left"
    );
}

#[test]
fn an_upstream_connection_is_reused_then_closed_after_idle_timeout() {
    let up = RawUpstream::start(Closes::Never);
    let idle = Duration::from_secs(1);
    // One thread: Pingora parks an idle connection's watcher on a random thread, and when a
    // request on the other thread takes the connection back at the moment the watcher lets it
    // go, Pingora cannot unwrap it ("failed to acquire reusable stream") and connects anew.
    let dir = tempfile::tempdir().unwrap();
    let (port, admin) = (free_port(), free_port());
    let config = dir.path().join("gateway.toml");
    let base = Gateway::base(port, admin).replace("threads = 2", "threads = 1");
    let pool = up.service("app", "connection_pool = { idle_timeout = \"1s\" }\n");
    std::fs::write(&config, format!("{base}{pool}{}", route(""))).unwrap();
    let gw = Gateway::start_on(dir, config, port, admin);
    // The idle timer starts when the gateway takes the connection back, a moment after the
    // client has its answer: so count from before the last request.
    let mut last = Instant::now();
    for n in 1..=3 {
        last = Instant::now();
        assert_eq!(gw.get("/", &[]).status, 200);
        gw.wait_logged(n);
    }
    assert_eq!(
        up.connections.load(Ordering::SeqCst),
        1,
        "kept alive and reused"
    );
    wait_until(
        "the idle connection closed",
        Duration::from_secs(10),
        || up.closed_by_gateway.load(Ordering::SeqCst) == 1,
    );
    let closed_after = last.elapsed();
    assert!(
        closed_after >= idle,
        "closed after {closed_after:?}, before idle_timeout"
    );
    // The next request opens a fresh connection.
    assert_eq!(gw.get("/", &[]).status, 200);
    assert_eq!(up.connections.load(Ordering::SeqCst), 2);
}

/// The listeners share one pool of upstream connections: a connection a request on one
/// listener used serves the next request on another.
#[test]
fn listeners_share_upstream_connections() {
    let up = RawUpstream::start(Closes::Never);
    let other = weir_tests::free_port();
    let gw = Gateway::start(&format!(
        "[[listener]]\nname = \"other\"\nlisten = \"127.0.0.1:{other}\"\n{}{}",
        up.service("app", ""),
        route("")
    ));
    assert_eq!(gw.get("/", &[]).status, 200);
    gw.wait_logged(1);
    let url = format!("http://127.0.0.1:{other}/");
    let reply = weir_tests::send_body(&client(), "GET", &url, &[], None).unwrap();
    assert_eq!(reply.status, 200);
    gw.wait_logged(2);
    assert_eq!(up.connections.load(Ordering::SeqCst), 1);
}

fn endpoint_states(gw: &Gateway) -> Vec<String> {
    let v: serde_json::Value =
        serde_json::from_str(&gw.admin_get("/endpoints").unwrap().body).unwrap();
    v["app"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| {
            format!(
                "{} {}",
                e["address"].as_str().unwrap(),
                e["state"].as_str().unwrap()
            )
        })
        .collect()
}

#[test]
fn consecutive_5xx_eject_an_endpoint_through_reloads_until_its_time_is_up() {
    let (bad, good) = (Upstream::failing("bad", 500), Upstream::start("good"));
    let config = |marker: &str| {
        format!(
            "{}{}[[route]]\nname = \"marker\"\ndirect_response = {{ status = 200, body = \"{marker}\" }}\n  \
             [[route.match]]\n  path = {{ exact = \"/marker\" }}\n",
            service(
                "app",
                &[bad.addr.to_string(), good.addr.to_string()],
                "[service.outlier_detection]\nconsecutive_5xx = 3\nbase_ejection_time = \"2s\"\nmax_ejection_percent = 50\n"
            ),
            route("  [route.retry]\n  attempts = 0\n")
        )
    };
    let gw = Gateway::start(&config("one"));
    let mut statuses = Vec::new();
    while bad.hits() < 3 {
        statuses.push(gw.get("/", &[]).status);
    }
    assert_eq!(statuses.iter().filter(|s| **s == 500).count(), 3);
    let ejected = format!("{} ejected", bad.addr);
    assert!(
        endpoint_states(&gw).contains(&ejected),
        "{:?}",
        endpoint_states(&gw)
    );
    assert_eq!(
        gw.metric("weir_outlier_ejections_total{service=\"app\"}"),
        1.0
    );
    // An unrelated reload keeps the service's state: still ejected.
    gw.write_config(&config("two"));
    wait_until("the reload", Duration::from_secs(5), || {
        gw.get("/marker", &[]).body == "two"
    });
    assert!(
        endpoint_states(&gw).contains(&ejected),
        "{:?}",
        endpoint_states(&gw)
    );
    for _ in 0..10 {
        assert_eq!(gw.get("/", &[]).status, 200);
    }
    assert_eq!(bad.hits(), 3, "no traffic while ejected");
    wait_until("the endpoint returns", Duration::from_secs(10), || {
        endpoint_states(&gw).contains(&format!("{} healthy", bad.addr))
    });
    wait_until("traffic again", Duration::from_secs(5), || {
        gw.get("/", &[]).status == 500
    });
    assert!(
        gw.stderr().contains("endpoint ejected"),
        "logged with its reason"
    );
}

#[test]
fn health_checks_take_failing_endpoints_out_and_503_uh_when_none_is_left() {
    let (bad, good) = (Upstream::failing("bad", 503), Upstream::start("good"));
    let checks = "[service.health_check]\npath = \"/healthz\"\ninterval = \"100ms\"\ntimeout = \"1s\"\nunhealthy_threshold = 2\n";
    let gw = Gateway::start(&format!(
        "{}{}{}[[route]]\nname = \"lonely\"\n  [[route.match]]\n  path = {{ prefix = \"/lonely\" }}\n  \
         [[route.backend]]\n  service = \"lonely\"\n",
        service("app", &[bad.addr.to_string(), good.addr.to_string()], checks),
        service("lonely", &[bad.addr.to_string()], checks),
        route("  [route.retry]\n  attempts = 0\n")
    ));
    wait_until("bad marked unhealthy", Duration::from_secs(10), || {
        endpoint_states(&gw).contains(&format!("{} unhealthy", bad.addr))
    });
    let before = bad.hits();
    for _ in 0..10 {
        assert_eq!(gw.get("/", &[]).body, "good");
    }
    let r = gw.get("/lonely", &[]);
    assert_eq!((r.status, r.body.as_str()), (503, "no healthy upstream\n"));
    // Only health checks reach bad now.
    assert!(bad.last_header(":path").as_deref() == Some("/healthz"));
    assert!(bad.hits() >= before);
    assert_eq!(
        gw.metric("weir_endpoints{service=\"app\",state=\"unhealthy\"}"),
        1.0
    );
}

/// Outlier detection that may not eject says why, once: a failing service would say it at
/// every few failures.
#[test]
fn a_held_back_ejection_is_logged_once_with_its_reason() {
    let bad = Upstream::failing("bad", 500);
    let gw = Gateway::start(&format!(
        "{}{}",
        service(
            "app",
            &[bad.addr.to_string()],
            "[service.outlier_detection]\nconsecutive_5xx = 2\nmax_ejection_percent = 100\n"
        ),
        route("  [route.retry]\n  attempts = 0\n")
    ));
    for _ in 0..10 {
        assert_eq!(gw.get("/", &[]).status, 500);
    }
    let held: Vec<String> = (gw.stderr().lines())
        .filter(|l| l.contains("not ejecting"))
        .map(String::from)
        .collect();
    assert_eq!(held.len(), 1, "{held:?}");
    assert!(
        held[0].contains("the last endpoint in is never ejected"),
        "{held:?}"
    );
}

/// An endpoint that is out leaves its turns to all the others, not to its neighbour in the
/// list (which would take twice its share, and could fall over in its turn).
#[test]
fn round_robin_spreads_an_unhealthy_endpoint_s_turns_evenly() {
    let (a, b, bad) = (
        Upstream::start("a"),
        Upstream::start("b"),
        Upstream::failing("bad", 503),
    );
    let checks = "[service.health_check]\npath = \"/healthz\"\ninterval = \"100ms\"\nunhealthy_threshold = 1\n";
    let endpoints = [a.addr, b.addr, bad.addr].map(|e| e.to_string());
    let gw = Gateway::start(&format!(
        "{}{}",
        service("app", &endpoints, checks),
        route("  [route.retry]\n  attempts = 0\n")
    ));
    wait_until("bad marked unhealthy", Duration::from_secs(10), || {
        endpoint_states(&gw).contains(&format!("{} unhealthy", bad.addr))
    });
    let bodies: Vec<String> = (0..30).map(|_| gw.get("/", &[]).body).collect();
    let count = |name: &str| bodies.iter().filter(|b| *b == name).count();
    assert_eq!(count("a") + count("b"), 30, "{bodies:?}");
    assert!(count("a").abs_diff(count("b")) <= 2, "{bodies:?}");
}

/// The share of `n` concurrent requests the slow endpoint got under `balancer`.
fn slow_share(balancer: &str) -> f64 {
    let slow = Upstream::slow("slow", Duration::from_millis(100));
    let fast: Vec<_> = (0..2)
        .map(|_| Upstream::slow("fast", Duration::from_millis(10)))
        .collect();
    let mut endpoints = vec![slow.addr.to_string()];
    endpoints.extend(fast.iter().map(|f| f.addr.to_string()));
    let gw = Gateway::start(&format!(
        "{}{}",
        service(
            "app",
            &endpoints,
            &format!("load_balancer = \"{balancer}\"")
        ),
        route("")
    ));
    let url = gw.url("/");
    let clients: Vec<_> = (0..6)
        .map(|_| {
            let url = url.clone();
            thread::spawn(move || {
                let agent = client();
                for _ in 0..30 {
                    assert_eq!(send(&agent, "GET", &url, &[]).unwrap().status, 200);
                }
            })
        })
        .collect();
    for c in clients {
        c.join().unwrap();
    }
    slow.hits() as f64 / 180.0
}

#[test]
fn least_request_sends_a_slow_endpoint_less_traffic_than_round_robin() {
    let rr = slow_share("round_robin");
    let lr = slow_share("least_request");
    assert!(
        lr < rr * 0.6,
        "slow endpoint's share: least_request {lr:.2}, round_robin {rr:.2}"
    );
}

#[test]
fn a_try_s_timeout_and_the_deadline_bound_the_connect() {
    let hole = weir_tests::BlackHole::start();
    // Each try gives up on the connect at its per-try timeout, not at connect_timeout (5s).
    let gw = Gateway::start(&format!(
        "{}{}  [route.retry]\n  attempts = 1\n  per_try_timeout = \"300ms\"\n{AMPLE}",
        service("app", &[hole.addr.to_string()], ""),
        route("")
    ));
    let start = Instant::now();
    assert_eq!(gw.get("/", &[]).status, 503);
    let took = start.elapsed();
    assert!(took < Duration::from_secs(3), "took {took:?}");
    wait_until("UF,URX in the access log", Duration::from_secs(5), || {
        gw.access_log().iter().any(|l| l["flags"] == "UF,URX")
    });
    // The route's timeout running out during a connect is the request's deadline: 504 DT.
    let gw = Gateway::start(&format!(
        "{}{}",
        service("app", &[hole.addr.to_string()], ""),
        route("timeout = \"500ms\"")
    ));
    let start = Instant::now();
    assert_eq!(gw.get("/", &[]).status, 504);
    assert!(
        start.elapsed() < Duration::from_secs(3),
        "{:?}",
        start.elapsed()
    );
    wait_until("DT in the access log", Duration::from_secs(5), || {
        gw.access_log().iter().any(|l| l["flags"] == "DT")
    });
}

/// An upstream that reads a request's head and answers with `response`, a byte at a time,
/// `gap` apart.
fn trickling(response: &'static [u8], gap: Duration) -> SocketAddr {
    weir_tests::raw_server(move |mut conn| {
        if !weir_tests::read_head(&mut conn) {
            return;
        }
        for byte in response {
            thread::sleep(gap);
            if conn.write_all(&[*byte]).is_err() {
                return;
            }
        }
    })
}

#[test]
fn a_trickled_head_is_504_dt_and_a_slow_upload_is_not_the_upstream_s_delay() {
    // The head comes a byte every 20ms, each read well inside the timeout: about 1s in all.
    let head = b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\nX-Padding: 0123456789\r\n\r\nabc";
    let slow_head = trickling(head, Duration::from_millis(20));
    let gw = Gateway::start(&format!(
        "{}{}",
        service("app", &[slow_head.to_string()], ""),
        route("timeout = \"300ms\"")
    ));
    let r = gw.get("/", &[]);
    assert_eq!(
        (r.status, r.body.as_str()),
        (504, "request deadline exceeded\n")
    );
    wait_until("DT in the access log", Duration::from_secs(5), || {
        gw.access_log().iter().any(|l| l["flags"] == "DT")
    });
    // An upload a byte every 100ms, 1s in all: the timeout starts once it is complete (as
    // Envoy's), and the upstream's prompt answer goes through.
    let app = Upstream::start("app");
    let gw = Gateway::start(&format!(
        "{}{}",
        app.service(),
        route("timeout = \"500ms\"")
    ));
    let mut conn = std::net::TcpStream::connect(("127.0.0.1", gw.port)).unwrap();
    conn.write_all(
        b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 10\r\nConnection: close\r\n\r\n",
    )
    .unwrap();
    for _ in 0..10 {
        thread::sleep(Duration::from_millis(100));
        conn.write_all(b"x").unwrap();
    }
    let mut reply = String::new();
    conn.read_to_string(&mut reply).unwrap();
    assert!(reply.starts_with("HTTP/1.1 200"), "{reply}");
}

#[test]
fn a_retry_with_no_time_left_is_504_dt_at_once_and_not_counted() {
    let bad = Upstream::failing("bad", 503);
    let gw = Gateway::start(&format!(
        "{}{}  [route.retry]\n  backoff = \"2s\"\n{AMPLE}",
        service("app", &[bad.addr.to_string()], ""),
        route("timeout = \"300ms\"")
    ));
    // A first retry waits a random time up to 2s: most would end past the deadline, and those
    // are not waited.
    let (n, mut late) = (12, 0);
    for _ in 0..n {
        let start = Instant::now();
        let status = gw.get("/", &[]).status;
        if status == 504 && start.elapsed() < Duration::from_millis(250) {
            late += 1;
        }
    }
    assert!(late >= 4, "{late} of {n} answered 504 DT at once");
    // Only the retries made are counted.
    let counted = gw.metric("weir_upstream_retries_total{reason=\"503\",service=\"app\"}");
    assert_eq!(counted as usize, bad.hits() - n, "{} hits", bad.hits());
}
