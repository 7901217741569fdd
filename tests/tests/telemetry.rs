//! Request metrics (DESIGN.md §5) through the real gateway, read from admin `/metrics` and
//! scraped by a real Prometheus server.
#![allow(clippy::unwrap_used)]

use std::fs;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use weir_tests::{client, free_port, wait_until, Gateway, Upstream};

/// Routes "api" (`/api/` to service "api") and "teapot" (`/tea`, a direct 418); the rest 404.
fn routes(up: &Upstream) -> String {
    format!(
        "{}[[route]]\nname = \"api\"\n  [[route.match]]\n  path = {{ prefix = \"/api/\" }}\n  \
         [[route.backend]]\n  service = \"api\"\n\
         [[route]]\nname = \"teapot\"\n\
         direct_response = {{ status = 418, body = \"short and stout\\n\" }}\n  \
         [[route.match]]\n  path = {{ exact = \"/tea\" }}\n",
        up.service()
    )
}

#[test]
fn requests_are_counted_by_route_service_code_and_flags() {
    let up = Upstream::start("api");
    let gw = Gateway::start(&routes(&up));
    for path in ["/api/a", "/api/b", "/api/c", "/nowhere", "/nowhere", "/tea"] {
        gw.get(path, &[]);
    }
    // Counted when the request is logged, just after its response went out.
    let ok =
        r#"weir_requests_total{code="200",flags="",proxy="gateway",route="api",service="api"}"#;
    wait_until("3 requests of route api", Duration::from_secs(5), || {
        gw.metric(ok) == 3.0
    });
    let nr = r#"weir_requests_total{code="404",flags="NR",proxy="gateway",route="",service=""}"#;
    let tea =
        r#"weir_requests_total{code="418",flags="",proxy="gateway",route="teapot",service=""}"#;
    wait_until("the 404s and the 418", Duration::from_secs(5), || {
        gw.metric(nr) == 2.0 && gw.metric(tea) == 1.0
    });
    let api = r#"{proxy="gateway",route="api",service="api""#;
    assert_eq!(
        gw.metric(&format!("weir_request_duration_seconds_count{api}}}")),
        3.0
    );
    assert_eq!(
        gw.metric(&format!(
            "weir_request_duration_seconds_bucket{api},le=\"+Inf\"}}"
        )),
        3.0
    );
    let took = gw.metric(&format!("weir_request_duration_seconds_sum{api}}}"));
    assert!(took > 0.0 && took < 30.0, "sum of durations {took} s");

    // A reload compiles new routes; their requests count on in the same series.
    gw.write_config(&format!("{}[[route]]\nname = \"new\"\ndirect_response = {{ status = 204 }}\n  [[route.match]]\n  path = {{ exact = \"/new\" }}\n", routes(&up)));
    wait_until("reload", Duration::from_secs(5), || gw.generation() == 2);
    assert_eq!(gw.get("/api/d", &[]).status, 200);
    wait_until(
        "the 4th request of route api",
        Duration::from_secs(5),
        || gw.metric(ok) == 4.0,
    );
}

/// A Prometheus server scraping one gateway; killed when dropped.
struct Prometheus {
    child: Child,
    port: u16,
    _dir: tempfile::TempDir,
}

impl Prometheus {
    /// Runs on examples/prometheus/prometheus.yml, with the gateway's admin on `admin`.
    fn start(admin: u16) -> Prometheus {
        let dir = tempfile::tempdir().unwrap();
        let example = concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../examples/prometheus/prometheus.yml"
        );
        let example = fs::read_to_string(example).unwrap();
        assert!(example.contains("127.0.0.1:9901"), "{example}");
        let config = dir.path().join("prometheus.yml");
        fs::write(
            &config,
            example.replace("127.0.0.1:9901", &format!("127.0.0.1:{admin}")),
        )
        .unwrap();
        let port = free_port();
        let log = fs::File::create(dir.path().join("prometheus.log")).unwrap();
        let child = Command::new("prometheus")
            .arg(format!("--config.file={}", config.display()))
            .arg(format!(
                "--storage.tsdb.path={}",
                dir.path().join("data").display()
            ))
            .arg(format!("--web.listen-address=127.0.0.1:{port}"))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("prometheus is missing: scripts/test installs it (Debian package prometheus)");
        Prometheus {
            child,
            port,
            _dir: dir,
        }
    }

    /// The value of an instant query that returns one series, if it returns one.
    fn query(&self, query: &str) -> Option<String> {
        let url = format!("http://127.0.0.1:{}/api/v1/query", self.port);
        let body = client()
            .get(&url)
            .query("query", query)
            .call()
            .ok()?
            .into_string()
            .ok()?;
        let reply: serde_json::Value = serde_json::from_str(&body).ok()?;
        let result = reply["data"]["result"].as_array()?;
        match result.as_slice() {
            [one] => one["value"][1].as_str().map(str::to_string),
            _ => None,
        }
    }
}

impl Drop for Prometheus {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[test]
fn prometheus_scrapes_the_request_metrics() {
    let up = Upstream::start("api");
    let gw = Gateway::start(&routes(&up));
    for _ in 0..5 {
        assert_eq!(gw.get("/api/x", &[]).status, 200);
    }
    let prometheus = Prometheus::start(gw.admin);
    wait_until(
        "Prometheus to scrape 5 requests of route api",
        Duration::from_secs(30),
        || {
            let found = prometheus.query(r#"weir_requests_total{route="api",code="200"}"#);
            found.as_deref() == Some("5")
        },
    );
    // The histogram is usable as Prometheus users use it.
    let p99 = prometheus
        .query(r#"histogram_quantile(0.99, weir_request_duration_seconds_bucket{route="api"})"#)
        .unwrap();
    let p99: f64 = p99.parse().unwrap();
    assert!(p99 > 0.0 && p99 <= 60.0, "p99 {p99} s");

    // Failed reloads are counted from 0, so the first one is an increase an alert sees.
    let failures = r#"weir_config_reloads_total{result="failure"}"#;
    wait_until("failed reloads at 0", Duration::from_secs(30), || {
        prometheus.query(failures).as_deref() == Some("0")
    });
    gw.write_config(&format!("{}colour = \"blue\"\n", routes(&up)));
    wait_until(
        "an increase of failed reloads",
        Duration::from_secs(30),
        || {
            let increase = prometheus.query(&format!("increase({failures}[5m])"));
            increase.is_some_and(|v| v.parse::<f64>().is_ok_and(|v| v > 0.0))
        },
    );
}

/// Access log lines that cannot be written (here a full disk: `/dev/full`) are lost without
/// holding a request up, and counted, and the log says so once.
#[test]
fn lost_access_log_lines_are_counted() {
    let up = Upstream::start("api");
    let gw = Gateway::start(&format!(
        "[telemetry]\naccess_log = \"/dev/full\"\n{}",
        routes(&up)
    ));
    for _ in 0..3 {
        assert_eq!(gw.get("/api/x", &[]).status, 200);
    }
    wait_until("the lines counted lost", Duration::from_secs(10), || {
        gw.metric("weir_access_log_dropped_total") >= 1.0
    });
    let stderr = gw.stderr();
    assert_eq!(
        stderr.matches("access log: lines lost").count(),
        1,
        "{stderr}"
    );
}
