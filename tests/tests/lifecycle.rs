//! Start, readiness, draining on SIGTERM or admin `POST /shutdown`, and graceful upgrade, of the
//! real binary.
#![allow(clippy::unwrap_used)]

use std::io::{Read, Write};
use std::net::TcpStream;
use std::thread;
use std::time::{Duration, Instant};

use weir_tests::{wait_until, Gateway, Load, Upstream};

#[test]
fn admin_answers_live_ready_and_config() {
    let gw = Gateway::start("[[route]]\nname = \"r\"\ndirect_response = { status = 204 }\n");
    assert_eq!(gw.admin_get("/live").unwrap().status, 200);
    assert_eq!(gw.admin_get("/ready").unwrap().status, 200);
    let status = gw.status();
    assert_eq!(status["generation"], 1);
    assert_eq!(status["revision"].as_str().unwrap().len(), 16);
    assert!(status["last_error"].is_null());
    assert_eq!(
        status["source"].as_str().unwrap(),
        gw.config.to_str().unwrap()
    );
    assert_eq!(status["config"]["routes"][0]["name"], "r");
    assert_eq!(gw.admin_get("/nope").unwrap().status, 404);
    // A known path with another method: 405, and the method it takes.
    let url = format!("http://127.0.0.1:{}/live", gw.admin);
    let reply = weir_tests::send(&weir_tests::client(), "POST", &url, &[]).unwrap();
    assert_eq!(
        (reply.status, reply.header("allow")),
        (405, Some("GET, HEAD"))
    );
    // HEAD is GET without the body.
    let head = weir_tests::raw_request(
        gw.admin,
        b"HEAD /ready HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n",
    );
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    assert!(
        head.to_ascii_lowercase().contains("content-length: 6\r\n"),
        "{head}"
    );
    assert!(head.ends_with("\r\n\r\n"), "{head}");
    let url = format!("http://127.0.0.1:{}/shutdown", gw.admin);
    let reply = weir_tests::send(&weir_tests::client(), "GET", &url, &[]).unwrap();
    assert_eq!((reply.status, reply.header("allow")), (405, Some("POST")));
}

/// A gateway with a request in flight, which its upstream answers after `ms` milliseconds:
/// the upstream, the gateway and the request's answer to come.
fn with_a_slow_request(ms: u64) -> (Upstream, Gateway, InFlight) {
    let up = Upstream::start("slow");
    let gw = Gateway::start(&format!(
        "{}[[route]]\nname = \"r\"\n  [[route.backend]]\n  service = \"slow\"\n",
        up.service()
    ));
    let in_flight = request_in_flight(&gw, &up, ms);
    (up, gw, in_flight)
}

/// A request through `gw` that `up` answers after `ms` milliseconds, once it reached `up`.
fn request_in_flight(gw: &Gateway, up: &Upstream, ms: u64) -> InFlight {
    let url = gw.url(&format!("/slow/{ms}"));
    let in_flight =
        thread::spawn(move || weir_tests::send(&weir_tests::client(), "GET", &url, &[]));
    wait_until(
        "the request to reach the upstream",
        Duration::from_secs(5),
        || up.hits() == 1,
    );
    in_flight
}

type InFlight = thread::JoinHandle<Result<weir_tests::Reply, String>>;

/// A request in flight when `stop` asks the gateway to stop finishes, then the gateway exits
/// with status 0, well within its grace period, and its listener is closed.
fn finishes_requests_in_flight_then_exits(stop: impl FnOnce(&Gateway)) {
    let (_up, mut gw, in_flight) = with_a_slow_request(1000);
    // A keep-alive connection waiting for its next request.
    let mut idle = TcpStream::connect(("127.0.0.1", gw.port)).unwrap();
    idle.write_all(b"GET /fast HTTP/1.1\r\nHost: a\r\n\r\n")
        .unwrap();
    assert!(weir_tests::read_head(&mut idle));
    idle.set_read_timeout(Some(Duration::from_secs(3))).unwrap();
    let sent = Instant::now();
    stop(&gw);
    // It is closed at once, before the request in flight is done; that one's answer says
    // `Connection: close`, so its client sends nothing into the close either.
    let mut rest = Vec::new();
    idle.read_to_end(&mut rest)
        .expect("the idle connection closed at the drain");
    assert!(!in_flight.is_finished(), "closed only when the drain ended");
    // Through the drain the admin listener stays open, as Envoy's: not ready, still scraped.
    wait_until("/ready to say draining", Duration::from_secs(5), || {
        gw.admin_get("/ready")
            .is_ok_and(|r| (r.status, r.body.as_str()) == (503, "not ready: draining\n"))
    });
    let metrics = gw.admin_get("/metrics").unwrap();
    assert_eq!(metrics.status, 200);
    assert!(
        metrics.body.contains("weir_config_generation"),
        "{}",
        metrics.body
    );
    let reply = in_flight.join().unwrap().unwrap();
    assert_eq!((reply.status, reply.body.as_str()), (200, "slow"));
    assert_eq!(reply.header("connection"), Some("close"));
    let status = gw
        .wait_exit(Duration::from_secs(4))
        .expect("exits well within the 5s grace period");
    assert!(status.success(), "{status}");
    eprintln!("exited {:?} after being asked", sent.elapsed());
    assert!(
        TcpStream::connect(("127.0.0.1", gw.port)).is_err(),
        "listener closed"
    );
}

/// A plain start writes nothing under `$TMPDIR` (a read-only root filesystem); SIGQUIT hands
/// the listeners over only to a socket in a directory of this user's alone, and with another
/// there it serves on.
#[test]
fn upgrades_go_through_a_private_directory_only() {
    use std::os::unix::fs::PermissionsExt;
    let route = "[[route]]\nname = \"r\"\ndirect_response = { status = 200, body = \"up\" }\n";
    let gw = Gateway::start_with_env(route, &[("TMPDIR", "/nonexistent/weir-test")]);
    assert_eq!(gw.get("/", &[]).body, "up");
    let tmp = tempfile::tempdir().unwrap();
    let shared = tmp
        .path()
        .join(weir_tests::private_dir().file_name().unwrap());
    std::fs::create_dir(&shared).unwrap();
    std::fs::set_permissions(&shared, std::fs::Permissions::from_mode(0o777)).unwrap();
    let tmpdir = tmp.path().to_str().unwrap();
    let gw = Gateway::start_with_env(route, &[("TMPDIR", tmpdir)]);
    gw.signal("QUIT");
    wait_until("the refusal logged", Duration::from_secs(5), || {
        gw.stderr()
            .contains("SIGQUIT: not handing the listeners over")
    });
    assert_eq!(gw.get("/", &[]).body, "up");
}

#[test]
fn sigterm_finishes_requests_in_flight_then_exits() {
    finishes_requests_in_flight_then_exits(|gw| gw.signal("TERM"));
}

#[test]
fn sigint_cuts_a_drain_short() {
    let (_up, mut gw, in_flight) = with_a_slow_request(4000);
    gw.signal("TERM");
    wait_until("the drain", Duration::from_secs(5), || {
        gw.admin_get("/ready").is_ok_and(|r| r.status == 503)
    });
    let asked = Instant::now();
    gw.signal("INT");
    let status = gw
        .wait_exit(Duration::from_secs(2))
        .expect("exits at once, not after the request in flight");
    assert!(status.success(), "{status}");
    assert!(asked.elapsed() < Duration::from_secs(2));
    assert!(in_flight.join().unwrap().is_err(), "the request was cut");
}

/// A request still in flight when the grace period is over is cut, and the gateway says so.
#[test]
fn the_end_of_the_grace_period_says_what_it_cut() {
    let up = Upstream::start("slow");
    let (port, admin) = (weir_tests::free_port(), weir_tests::free_port());
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("gateway.toml");
    let base =
        Gateway::base(port, admin).replace("grace_period = \"5s\"", "grace_period = \"300ms\"");
    std::fs::write(
        &config,
        format!(
            "{base}{}[[route]]\nname = \"r\"\n  [[route.backend]]\n  service = \"slow\"\n",
            up.service()
        ),
    )
    .unwrap();
    let mut gw = Gateway::start_on(dir, config, port, admin);
    let in_flight = request_in_flight(&gw, &up, 4000);
    gw.signal("TERM");
    let status = gw
        .wait_exit(Duration::from_secs(3))
        .expect("exits at the end of the grace period");
    assert!(status.success(), "{status}");
    assert!(in_flight.join().unwrap().is_err(), "the request was cut");
    let stderr = gw.stderr();
    assert!(
        stderr.contains("grace period over: exiting, cutting the requests in flight")
            && stderr.contains("in_flight=1"),
        "{stderr}"
    );
}

#[test]
fn post_shutdown_finishes_requests_in_flight_then_exits() {
    finishes_requests_in_flight_then_exits(|gw| {
        let admin = format!("http://127.0.0.1:{}/shutdown", gw.admin);
        let asked = weir_tests::send(&weir_tests::client(), "POST", &admin, &[]).unwrap();
        assert_eq!((asked.status, asked.body.as_str()), (202, "draining\n"));
    });
}

#[test]
fn post_shutdown_is_for_callers_on_loopback_only() {
    // This host's address on its way out (a UDP connect sends nothing).
    let probe = std::net::UdpSocket::bind("0.0.0.0:0").unwrap();
    probe
        .connect("1.1.1.1:9")
        .expect("this test needs a non-loopback address with a route");
    let outside = probe.local_addr().unwrap().ip();
    assert!(!outside.is_loopback(), "{outside}");
    // Admin on every address, as when it is opened for Prometheus.
    let (port, admin) = (weir_tests::free_port(), weir_tests::free_port());
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("gateway.toml");
    let base = Gateway::base(port, admin)
        .replace(&format!("127.0.0.1:{admin}"), &format!("0.0.0.0:{admin}"));
    std::fs::write(
        &config,
        format!("{base}[[route]]\nname = \"r\"\ndirect_response = {{ status = 200 }}\n"),
    )
    .unwrap();
    let mut gw = Gateway::start_on(dir, config, port, admin);
    let from_outside = format!("http://{outside}:{admin}/shutdown");
    let refused = weir_tests::send(&weir_tests::client(), "POST", &from_outside, &[]).unwrap();
    assert_eq!(refused.status, 403, "{}", refused.body);
    // Still serving, and GETs from that address still answered.
    assert_eq!(gw.get("/", &[]).status, 200);
    let metrics = format!("http://{outside}:{admin}/metrics");
    assert_eq!(
        (weir_tests::send(&weir_tests::client(), "GET", &metrics, &[]).unwrap()).status,
        200
    );
    let local = format!("http://127.0.0.1:{admin}/shutdown");
    let asked = weir_tests::send(&weir_tests::client(), "POST", &local, &[]).unwrap();
    assert_eq!(asked.status, 202);
    let status = gw.wait_exit(Duration::from_secs(4)).expect("exits");
    assert!(status.success(), "{status}");
}

#[test]
fn an_upgrade_under_load_loses_no_request() {
    let up = Upstream::start("app");
    let mut old = Gateway::start(&format!(
        "{}[[route]]\nname = \"r\"\n  [[route.backend]]\n  service = \"app\"\n",
        up.service()
    ));
    let load = Load::start(&old.url("/"), 4, "app");
    wait_until("load on the old gateway", Duration::from_secs(5), || {
        load.served() >= 50
    });
    let new = old.upgrade();
    let status = old
        .wait_exit(Duration::from_secs(20))
        .expect("the old gateway exits once it has handed its sockets over");
    assert!(status.success(), "{status}");
    let handed_over = load.served();
    wait_until("load on the new gateway", Duration::from_secs(5), || {
        load.served() >= handed_over + 100
    });
    let (served, failed) = load.stop();
    println!("{served} requests across the upgrade, {failed} failed");
    assert_eq!(failed, 0);
    assert!(new.access_log().len() >= 100, "the new gateway served them");
    assert_eq!(new.admin_get("/ready").unwrap().status, 200);
}

/// A gateway config on `port` and `admin` that answers 200 to everything, in a directory of
/// its own: the directory, and the file.
fn answering_config(port: u16, admin: u16) -> (tempfile::TempDir, std::path::PathBuf) {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("gateway.toml");
    let route = "[[route]]\nname = \"r\"\ndirect_response = { status = 200 }\n";
    std::fs::write(&config, format!("{}{route}", Gateway::base(port, admin))).unwrap();
    (dir, config)
}

/// `--upgrade` with no gateway to take over from says so at once.
#[test]
fn an_upgrade_with_nothing_to_take_over_says_so() {
    let (port, admin) = (weir_tests::free_port(), weir_tests::free_port());
    let (_dir, config) = answering_config(port, admin);
    let args = ["--upgrade", "--config", config.to_str().unwrap()];
    let (code, _, stderr) = weir_tests::run("weir-gateway", &args);
    assert_eq!(code, 1, "{stderr}");
    assert!(
        stderr.contains(&format!(
            "--upgrade: nothing answers on the admin address 127.0.0.1:{admin}"
        )),
        "{stderr}"
    );
}

#[test]
fn an_upgrade_applies_a_listener_change() {
    let route = "[[route]]\nname = \"r\"\ndirect_response = { status = 200, body = \"up\" }\n";
    let mut old = Gateway::start(route);
    // A second listener: refused by a reload, applied by an upgrade.
    let second = weir_tests::free_port();
    old.write_config(&format!(
        "[[listener]]\nname = \"second\"\nlisten = \"127.0.0.1:{second}\"\n{route}"
    ));
    wait_until("the reload refused", Duration::from_secs(5), || {
        old.status()["last_error"]
            .as_str()
            .is_some_and(|e| e.contains("listener \"second\" added; it applies only at start"))
    });
    let new = old.upgrade();
    old.wait_exit(Duration::from_secs(20))
        .expect("the old gateway exits");
    let url = format!("http://127.0.0.1:{second}/");
    let reply = weir_tests::send(&weir_tests::client(), "GET", &url, &[]).unwrap();
    assert_eq!((reply.status, reply.body.as_str()), (200, "up"));
    assert_eq!(new.get("/", &[]).body, "up");
    assert!(new.status()["last_error"].is_null());
}

#[test]
fn an_idle_gateway_exits_at_once_on_sigterm() {
    let mut gw = Gateway::start("[[route]]\nname = \"r\"\ndirect_response = { status = 200 }\n");
    let sent = Instant::now();
    gw.signal("TERM");
    let status = gw
        .wait_exit(Duration::from_secs(3))
        .expect("exits without waiting out the grace period");
    assert!(status.success());
    println!("idle exit took {:?}", sent.elapsed());
}

#[test]
fn a_taken_port_is_a_clear_error() {
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = taken.local_addr().unwrap().port();
    let (_dir, path) = answering_config(port, weir_tests::free_port());
    let (code, _, stderr) = weir_tests::run("weir-gateway", &["--config", path.to_str().unwrap()]);
    assert_eq!(code, 1, "{stderr}");
    assert!(
        stderr.contains(&format!("listener \"web\": cannot bind 127.0.0.1:{port}")),
        "{stderr}"
    );
}

/// Its stderr gone (a log shipper that died, a closed pipe): it logs nowhere and serves on, as
/// nginx does. tracing-subscriber's report of the failed write used to panic it.
#[test]
fn a_closed_stderr_is_no_end_of_the_gateway() {
    let dir = tempfile::tempdir().unwrap();
    let (port, admin) = (weir_tests::free_port(), weir_tests::free_port());
    let config = dir.path().join("gateway.toml");
    std::fs::write(&config, Gateway::base(port, admin)).unwrap();
    let mut child = std::process::Command::new(weir_tests::binary("weir-gateway"))
        .arg("--config")
        .arg(&config)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    drop(child.stderr.take());
    let ready = format!("http://127.0.0.1:{admin}/ready");
    wait_until("ready", Duration::from_secs(10), || {
        assert!(child.try_wait().unwrap().is_none(), "it exited");
        weir_tests::send(&weir_tests::client(), "GET", &ready, &[]).is_ok_and(|r| r.status == 200)
    });
    let url = format!("http://127.0.0.1:{port}/nothing");
    let reply = weir_tests::send(&weir_tests::client(), "GET", &url, &[]).unwrap();
    assert_eq!(reply.status, 404);
    assert!(child.try_wait().unwrap().is_none(), "it exited");
    let term = std::process::Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(term.success());
    assert_eq!(child.wait().unwrap().code(), Some(0));
}
