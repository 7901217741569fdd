//! Traffic mirroring through the real gateway, against real primaries and mirrors that are
//! slow, refuse connections or fail.
#![allow(clippy::unwrap_used)]

use std::sync::atomic::Ordering;
use std::thread;
use std::time::{Duration, Instant};

use weir_tests::{
    client, free_port, send_body, wait_until, Closes, Gateway, RawUpstream, Upstream,
};

const WAIT: Duration = Duration::from_secs(10);

/// A route "r" to `app` that mirrors to `shadow` with the extra `mirror` keys.
fn mirrored(app: &Upstream, shadow: &str, mirror: &str) -> String {
    format!(
        "{}[[route]]\nname = \"r\"\n  [[route.backend]]\n  service = \"app\"\n  \
         [route.mirror]\n  service = \"{shadow}\"\n  {mirror}\n",
        app.service()
    )
}

fn mirror_count(gw: &Gateway, service: &str, result: &str) -> f64 {
    gw.metric(&format!(
        "weir_mirror_requests_total{{result=\"{result}\",service=\"{service}\"}}"
    ))
}

#[test]
fn the_mirror_gets_a_copy_with_shadow_host_and_body() {
    let (app, shadow) = (Upstream::start("app"), Upstream::start("shadow"));
    let gw = Gateway::start(&format!(
        "{}{}",
        mirrored(&app, "shadow", ""),
        shadow.service()
    ));
    let agent = client();
    let r = send_body(
        &agent,
        "POST",
        &gw.url("/orders?id=7"),
        &[
            ("host", "shop.example.com"),
            ("x-request-id", "mirror-test-1"),
        ],
        Some(b"{\"item\": 7}"),
    )
    .unwrap();
    assert_eq!((r.status, r.body.as_str()), (200, "app"));
    wait_until("the mirror's copy", WAIT, || shadow.hits() == 1);
    assert_eq!(
        shadow.last_header("host").as_deref(),
        Some("shop.example.com-shadow")
    );
    assert_eq!(shadow.last_header(":path").as_deref(), Some("/orders?id=7"));
    assert_eq!(
        shadow.last_header("x-request-id").as_deref(),
        Some("mirror-test-1")
    );
    assert_eq!(shadow.last_body(), b"{\"item\": 7}");
    assert_eq!(app.last_body(), b"{\"item\": 7}");
    assert_eq!(app.last_header("host").as_deref(), Some("shop.example.com"));
    wait_until("the success counted", WAIT, || {
        mirror_count(&gw, "shadow", "success") == 1.0
    });
}

#[test]
fn bodies_over_max_body_bytes_are_not_mirrored() {
    let (app, shadow) = (Upstream::start("app"), Upstream::start("shadow"));
    let gw = Gateway::start(&format!(
        "{}{}",
        mirrored(&app, "shadow", "max_body_bytes = 16"),
        shadow.service()
    ));
    let agent = client();
    let big = vec![b'x'; 1000];
    let r = send_body(&agent, "POST", &gw.url("/"), &[], Some(&big)).unwrap();
    assert_eq!(r.status, 200);
    assert_eq!(
        app.last_body().len(),
        1000,
        "the primary gets the whole body"
    );
    // A chunked body is only found too large as it streams.
    let chunked = weir_tests::raw_request(
        gw.port,
        b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n\
          14\r\n01234567890123456789\r\n0\r\n\r\n",
    );
    assert!(chunked.starts_with("HTTP/1.1 200"), "{chunked}");
    assert_eq!(app.last_body(), b"01234567890123456789");
    let small = send_body(&agent, "POST", &gw.url("/"), &[], Some(b"small")).unwrap();
    assert_eq!(small.status, 200);
    wait_until("the small body mirrored", WAIT, || shadow.hits() == 1);
    assert_eq!(shadow.last_body(), b"small");
    wait_until("two too_large counted", WAIT, || {
        mirror_count(&gw, "shadow", "too_large") == 2.0
    });
    assert_eq!(shadow.hits(), 1);
}

/// Sends `n` requests and returns the slowest time.
fn slowest_of(gw: &Gateway, n: usize) -> Duration {
    let agent = client();
    (0..n)
        .map(|i| {
            let start = Instant::now();
            let body = format!("request {i}");
            let r = send_body(&agent, "POST", &gw.url("/"), &[], Some(body.as_bytes())).unwrap();
            assert_eq!((r.status, r.body.as_str()), (200, "app"));
            start.elapsed()
        })
        .max()
        .unwrap()
}

#[test]
fn a_slow_mirror_changes_nothing_for_the_client() {
    let app = Upstream::start("app");
    let delay = Duration::from_secs(5);
    let shadow = Upstream::slow("shadow", delay);
    let gw = Gateway::start(&format!(
        "{}{}",
        mirrored(&app, "shadow", ""),
        shadow.service()
    ));
    // Each copy is held 5 s by the mirror; a client that waited on it would see that.
    let slowest = slowest_of(&gw, 20);
    assert!(slowest < delay / 4, "slowest request took {slowest:?}");
    wait_until("copies reached the slow mirror", WAIT, || {
        shadow.hits() >= 8
    });
}

#[test]
fn a_refusing_mirror_changes_nothing_for_the_client() {
    let app = Upstream::start("app");
    let gw = Gateway::start(&format!(
        "{}[[service]]\nname = \"shadow\"\nendpoints = [\"127.0.0.1:{}\"]\n",
        mirrored(&app, "shadow", ""),
        free_port()
    ));
    slowest_of(&gw, 20);
    assert_eq!(app.hits(), 20);
    wait_until("20 failures counted", WAIT, || {
        mirror_count(&gw, "shadow", "failure") == 20.0
    });
}

#[test]
fn a_failing_mirror_changes_nothing_for_the_client() {
    let app = Upstream::start("app");
    let shadow = Upstream::failing("shadow", 500);
    let gw = Gateway::start(&format!(
        "{}{}",
        mirrored(&app, "shadow", ""),
        shadow.service()
    ));
    slowest_of(&gw, 20);
    wait_until("20 failures counted", WAIT, || {
        mirror_count(&gw, "shadow", "failure") == 20.0
    });
    assert_eq!(shadow.hits(), 20);
}

#[test]
fn mirror_copies_in_flight_are_bounded_per_service() {
    let app = Upstream::start("app");
    let shadow = Upstream::slow("shadow", Duration::from_secs(5));
    let gw = Gateway::start(&format!(
        "{}[[service]]\nname = \"shadow\"\nendpoints = [\"{}\"]\n\
         connection_pool = {{ max_requests = 2 }}\n",
        mirrored(&app, "shadow", ""),
        shadow.addr
    ));
    slowest_of(&gw, 10);
    // The first two copies hold both places for 5 s; the other eight are dropped.
    assert_eq!(mirror_count(&gw, "shadow", "dropped"), 8.0);
    assert_eq!(
        gw.metric("weir_upstream_requests_active{service=\"shadow\"}"),
        2.0
    );
    wait_until("both copies reach the mirror", WAIT, || shadow.hits() == 2);
}

#[test]
fn a_percentage_of_requests_is_mirrored() {
    let (app, shadow) = (Upstream::start("app"), Upstream::start("shadow"));
    let gw = Gateway::start(&format!(
        "{}{}",
        mirrored(&app, "shadow", "percent = 25.0"),
        shadow.service()
    ));
    for _ in 0..400 {
        assert_eq!(gw.get("/", &[]).status, 200);
    }
    // Every copy was started before its primary finished; wait until all are done.
    wait_until("no copy in flight", WAIT, || {
        gw.metric("weir_upstream_requests_active{service=\"shadow\"}") == 0.0
    });
    let sent = mirror_count(&gw, "shadow", "success");
    assert!((98.0..=102.0).contains(&sent), "{sent} of 400 mirrored");
    assert_eq!(shadow.hits() as f64, sent);
}

#[test]
fn a_retried_request_is_mirrored_exactly_once() {
    let (bad, good) = (Upstream::failing("bad", 503), Upstream::start("good"));
    let shadow = Upstream::start("shadow");
    let gw = Gateway::start(&format!(
        "[[service]]\nname = \"app\"\nendpoints = [\"{}\", \"{}\"]\n{}\
         [[route]]\nname = \"r\"\n  [[route.backend]]\n  service = \"app\"\n  \
         [route.mirror]\n  service = \"shadow\"\n  \
         [route.retry]\n  non_idempotent = true\n  budget = {{ ratio = 1.0, min_per_second = 1000 }}\n",
        bad.addr,
        good.addr,
        shadow.service()
    ));
    let agent = client();
    for i in 0..10 {
        let body = format!("order number {i}");
        let r = send_body(
            &agent,
            "POST",
            &gw.url("/orders"),
            &[],
            Some(body.as_bytes()),
        )
        .unwrap();
        assert_eq!((r.status, r.body.as_str()), (200, "good"));
        // Every request went to bad first or second: half of them were retried with their body.
        wait_until("the copy", WAIT, || shadow.hits() == i + 1);
        assert_eq!(
            shadow.last_body(),
            body.as_bytes(),
            "the body once, not replayed"
        );
    }
    assert!(bad.hits() >= 5, "retries happened: {}", bad.hits());
    wait_until("no copy in flight", WAIT, || {
        gw.metric("weir_upstream_requests_active{service=\"shadow\"}") == 0.0
    });
    assert_eq!(shadow.hits(), 10);
}

/// An app, a raw shadow that `closes` as said, and a gateway whose route "r" mirrors to it.
fn shadowed(closes: Closes) -> (Upstream, RawUpstream, Gateway) {
    let app = Upstream::start("app");
    let shadow = RawUpstream::start(closes);
    let gw = Gateway::start(&format!(
        "{}{}",
        mirrored(&app, "shadow", ""),
        shadow.service("shadow", "")
    ));
    (app, shadow, gw)
}

/// A kept connection the shadow closed meanwhile (its keep-alive ran out) is found out before
/// a copy is written to it: a POST's copy too, which is not sent twice.
#[test]
fn copies_after_the_mirror_hung_up_still_arrive() {
    for method in ["GET", "POST"] {
        let (_app, shadow, gw) = shadowed(Closes::Silently);
        let agent = client();
        for i in 1..=5 {
            let r = weir_tests::send(&agent, method, &gw.url("/"), &[]).unwrap();
            assert_eq!(r.status, 200, "{method}");
            wait_until("the copy", WAIT, || {
                shadow.requests.load(Ordering::SeqCst) == i
            });
            // The gateway kept the connection for the next copy; the mirror has hung up on it.
            wait_until("the mirror's hang-up", WAIT, || {
                mirror_count(&gw, "shadow", "success") == i as f64
            });
        }
        // Each copy after the first found its connection closed and took a new one.
        assert_eq!(shadow.connections.load(Ordering::SeqCst), 5, "{method}");
        assert_eq!(mirror_count(&gw, "shadow", "failure"), 0.0, "{method}");
    }
}

/// A shadow that took a copy and closed without answering may have acted on it: a POST's
/// copy is not sent again (the shadow would act twice), a GET's is, on a new connection.
#[test]
fn an_unanswered_copy_is_sent_again_only_when_idempotent() {
    for (method, copies) in [("POST", 2), ("GET", 3)] {
        let (_app, shadow, gw) = shadowed(Closes::Unanswered);
        let agent = client();
        for i in 1..=2 {
            let r = weir_tests::send(&agent, method, &gw.url("/"), &[]).unwrap();
            assert_eq!(r.status, 200, "{method}");
            // The first copy is answered and its connection kept for the second.
            wait_until("the copy counted", WAIT, || {
                mirror_count(&gw, "shadow", "success") + mirror_count(&gw, "shadow", "failure")
                    == f64::from(i)
            });
        }
        assert_eq!(shadow.requests.load(Ordering::SeqCst), copies, "{method}");
        let failed = if method == "POST" { 1.0 } else { 0.0 };
        assert_eq!(mirror_count(&gw, "shadow", "failure"), failed, "{method}");
    }
}

#[test]
fn copies_share_connections_that_close_when_idle_or_unconfigured() {
    let app = Upstream::start("app");
    let shadow = RawUpstream::start(Closes::Never);
    let config = mirrored(&app, "shadow", "");
    let gw = Gateway::start(&format!("{config}{}", shadow.service("shadow", "")));
    for i in 1..=20 {
        assert_eq!(gw.get("/", &[]).status, 200);
        wait_until("the copy", WAIT, || {
            mirror_count(&gw, "shadow", "success") == i as f64
        });
    }
    assert_eq!(shadow.requests.load(Ordering::SeqCst), 20);
    assert_eq!(shadow.connections.load(Ordering::SeqCst), 1);
    assert_eq!(shadow.closed_by_gateway.load(Ordering::SeqCst), 0);

    // Without copies for the pool's idle_timeout, the connection is closed.
    let generation = gw.generation();
    gw.write_config(&format!(
        "{config}{}",
        shadow.service("shadow", "connection_pool = { idle_timeout = \"1s\" }\n")
    ));
    wait_until("the reload", WAIT, || gw.generation() > generation);
    // The service changed: its copies start afresh, and the old connection goes with it.
    wait_until("the old service's connection closed", WAIT, || {
        shadow.closed_by_gateway.load(Ordering::SeqCst) == 1
    });
    assert_eq!(gw.get("/", &[]).status, 200);
    wait_until("a copy on a new connection", WAIT, || {
        shadow.connections.load(Ordering::SeqCst) == 2
    });
    wait_until("closed after 1 s idle", WAIT, || {
        shadow.closed_by_gateway.load(Ordering::SeqCst) == 2
    });
}

/// 400 requests from 16 clients at once through a route mirrored to `shadow`; waits until
/// every copy is counted a success.
fn mirror_400_concurrent(shadow: &RawUpstream) -> Gateway {
    // The primary is a raw server too: tiny_http leaves some of 16 busy keep-alive
    // connections unread.
    let app = RawUpstream::start(Closes::Never);
    let gw = Gateway::start(&format!(
        "[[service]]\nname = \"app\"\nendpoints = [\"{}\"]\n\
         [[route]]\nname = \"r\"\n  [[route.backend]]\n  service = \"app\"\n  \
         [route.mirror]\n  service = \"shadow\"\n{}",
        app.addr,
        shadow.service("shadow", "")
    ));
    thread::scope(|s| {
        for _ in 0..16 {
            s.spawn(|| {
                let agent = client();
                for _ in 0..25 {
                    let r = weir_tests::send(&agent, "GET", &gw.url("/"), &[]).unwrap();
                    assert_eq!((r.status, r.body.as_str()), (200, "ok"));
                }
            });
        }
    });
    wait_until("no copy in flight", WAIT, || {
        gw.metric("weir_upstream_requests_active{service=\"shadow\"}") == 0.0
    });
    assert_eq!(mirror_count(&gw, "shadow", "failure"), 0.0);
    assert_eq!(mirror_count(&gw, "shadow", "success"), 400.0);
    gw
}

#[test]
fn copies_to_a_fast_mirror_are_pipelined() {
    let shadow = RawUpstream::start(Closes::Never);
    mirror_400_concurrent(&shadow);
    assert_eq!(shadow.requests.load(Ordering::SeqCst), 400);
    assert!(
        shadow.most_in_one_read.load(Ordering::SeqCst) >= 2,
        "no read carried more than one copy"
    );
}

#[test]
fn copies_after_a_connection_close_go_again_once() {
    // Closes every connection after its fifth answer, leaving the pipelined rest unanswered.
    let shadow = RawUpstream::start(Closes::After(5));
    mirror_400_concurrent(&shadow);
    // Exactly once each: none lost with the closed connections, none sent twice.
    assert_eq!(shadow.requests.load(Ordering::SeqCst), 400);
    assert!(shadow.connections.load(Ordering::SeqCst) >= 80);
}
