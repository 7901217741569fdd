//! Resilience through the real gateway: circuit breaking, against real upstreams.
#![allow(clippy::unwrap_used)]

use std::thread;
use std::time::{Duration, Instant};

use weir_tests::{client, send, wait_until, Gateway, Upstream};

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
