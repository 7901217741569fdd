//! HTTP/2 against the real binary: clients that offer h2 on an https listener (curl), and
//! services with `protocol = "http2"` (nginx, as h2c and over TLS).
#![allow(clippy::unwrap_used)]

use std::fs;
use std::time::Duration;

use weir_tests::tls::TestCa;
use weir_tests::{curl, free_port, script, wait_until, Gateway, Nginx, PythonServer, Upstream};

/// nginx answering with the protocol it was spoken to in, and a health check path.
const PROTOCOL_ECHO: &str = "
  location = /healthz { return 200 \"ok\\n\"; }
  location / { return 200 \"$server_protocol $host $request_uri\\n\"; }";

/// A gateway whose listener "web" is https with a certificate for a.example (under `ca`),
/// then `extra`.
fn https_gateway(ca: &TestCa, extra: &str) -> Gateway {
    let dir = tempfile::tempdir().unwrap();
    let pair = ca.server(&["a.example"]);
    fs::write(dir.path().join("a.pem"), &pair.cert).unwrap();
    fs::write(dir.path().join("a-key.pem"), &pair.key).unwrap();
    fs::write(dir.path().join("ca.pem"), ca.pem()).unwrap();
    let (port, admin) = (free_port(), free_port());
    let config = format!(
        "{}protocol = \"https\"\n  [[listener.certificate]]\n  cert = \"a.pem\"\n  key = \"a-key.pem\"\n{extra}",
        Gateway::base(port, admin)
    );
    let path = dir.path().join("gateway.toml");
    fs::write(&path, config).unwrap();
    Gateway::start_on(dir, path, port, admin)
}

/// `curl --http2` to the gateway's https listener as a.example: the HTTP version curl got,
/// then the body.
fn h2_get(gw: &Gateway, path: &str) -> String {
    let ca = gw.dir.path().join("ca.pem");
    let resolve = format!("a.example:{}:127.0.0.1", gw.port);
    let url = format!("https://a.example:{}{path}", gw.port);
    let ca = ca.to_str().unwrap();
    curl(&[
        "--http2",
        "--cacert",
        ca,
        "--resolve",
        &resolve,
        "-w",
        "HTTP/%{http_version} %{http_code}\n",
        &url,
    ])
    .unwrap()
}

#[test]
fn clients_that_offer_h2_get_it_and_http1_upstreams_still_get_http1() {
    let ca = TestCa::new("weir test CA");
    let (app, shadow) = (Upstream::start("app"), Upstream::start("shadow"));
    let routes = format!(
        "{}{}[[route]]\nname = \"app\"\n  [[route.backend]]\n  service = \"app\"\n  [route.mirror]\n  service = \"shadow\"\n",
        app.service(),
        shadow.service()
    );
    let gw = https_gateway(&ca, &routes);
    let out = h2_get(&gw, "/x?y=1");
    assert!(out.ends_with("HTTP/2 200\n"), "{out}");
    // The app speaks HTTP/1.1: Host comes from :authority.
    let authority = format!("a.example:{}", gw.port);
    assert_eq!(app.last_header("host").as_deref(), Some(authority.as_str()));
    assert_eq!(app.last_header(":path").as_deref(), Some("/x?y=1"));
    assert_eq!(
        app.last_header("x-forwarded-proto").as_deref(),
        Some("https")
    );
    // The mirror copy is HTTP/1.1 too, with the shadow's Host and the path.
    wait_until("the mirror copy", Duration::from_secs(10), || {
        shadow.hits() == 1
    });
    let shadow_host = format!("a.example-shadow:{}", gw.port);
    assert_eq!(
        shadow.last_header("host").as_deref(),
        Some(shadow_host.as_str())
    );
    assert_eq!(shadow.last_header(":path").as_deref(), Some("/x?y=1"));
    // A client without h2 still gets HTTP/1.1.
    let resolve = format!("a.example:{}:127.0.0.1", gw.port);
    let ca_path = gw.dir.path().join("ca.pem");
    let url = format!("https://a.example:{}/", gw.port);
    let out = curl(&[
        "--http1.1",
        "--cacert",
        ca_path.to_str().unwrap(),
        "--resolve",
        &resolve,
        "-o",
        "/dev/null",
        "-w",
        "%{http_version}",
        &url,
    ])
    .unwrap();
    assert_eq!(out, "1.1");
}

#[test]
fn a_service_with_protocol_http2_is_spoken_to_in_h2c_or_h2_over_tls() {
    let ca = TestCa::new("weir test CA");
    // h2c: nginx's prior-knowledge HTTP/2 on a plain port.
    let h2c = Nginx::start(&format!("listen 127.0.0.1:{{port}} http2;{PROTOCOL_ECHO}"));
    // h2 over TLS, chosen by ALPN.
    let dir = tempfile::tempdir().unwrap();
    let pair = ca.server(&["backend.internal"]);
    fs::write(dir.path().join("b.pem"), &pair.cert).unwrap();
    fs::write(dir.path().join("b-key.pem"), &pair.key).unwrap();
    let tls = Nginx::start(&format!(
        "listen 127.0.0.1:{{port}} ssl http2;\n  ssl_certificate {0}/b.pem; ssl_certificate_key {0}/b-key.pem;{PROTOCOL_ECHO}",
        dir.path().display()
    ));
    fs::write(dir.path().join("ca.pem"), ca.pem()).unwrap();
    let config = format!(
        "[[route]]\nname = \"h2c\"\nhosts = [\"h2c.example\"]\n  [[route.backend]]\n  service = \"h2c\"\n\
         [[route]]\nname = \"h2\"\nhosts = [\"h2.example\"]\n  [[route.backend]]\n  service = \"h2\"\n\
         [[service]]\nname = \"h2c\"\nendpoints = [\"127.0.0.1:{}\"]\nprotocol = \"http2\"\n\
         \x20 [service.health_check]\n  path = \"/healthz\"\n  interval = \"100ms\"\n\
         [[service]]\nname = \"h2\"\nendpoints = [\"127.0.0.1:{}\"]\nprotocol = \"http2\"\n\
         \x20 [service.tls]\n  ca = \"{}/ca.pem\"\n  sni = \"backend.internal\"\n",
        h2c.port,
        tls.port,
        dir.path().display()
    );
    let gw = Gateway::start(&config);
    let reply = gw.get("/a", &[("host", "h2c.example")]);
    assert_eq!(
        (reply.status, reply.body.as_str()),
        (200, "HTTP/2.0 h2c.example /a\n")
    );
    let reply = gw.get("/b", &[("host", "h2.example")]);
    assert_eq!(
        (reply.status, reply.body.as_str()),
        (200, "HTTP/2.0 h2.example /b\n")
    );
    // Health checks speak the service's protocol too.
    wait_until("an HTTP/2 health check", Duration::from_secs(10), || {
        h2c.access_log().contains("\"GET /healthz HTTP/2.0\" 200")
    });
}

#[test]
fn h2_end_to_end_from_client_to_service() {
    let ca = TestCa::new("weir test CA");
    let h2c = Nginx::start(&format!("listen 127.0.0.1:{{port}} http2;{PROTOCOL_ECHO}"));
    let config = format!(
        "[[route]]\nname = \"h2c\"\n  [[route.backend]]\n  service = \"h2c\"\n\
         [[service]]\nname = \"h2c\"\nendpoints = [\"127.0.0.1:{}\"]\nprotocol = \"http2\"\n",
        h2c.port
    );
    let gw = https_gateway(&ca, &config);
    let out = h2_get(&gw, "/grpc.Service/Method");
    assert_eq!(out, "HTTP/2.0 a.example /grpc.Service/Method\nHTTP/2 200\n");
}

/// gRPC through the gateway: HTTP/2 from a real gRPC client over TLS to a real gRPC server
/// over h2c, the status and message of a failed call carried in the trailers.
#[test]
fn grpc_calls_pass_with_their_status_in_the_trailers() {
    let server = PythonServer::start(&[&script("tests/grpc/echo.py"), "serve"]);
    let ca = TestCa::new("weir test CA");
    let config = format!(
        "[[route]]\nname = \"echo\"\n  [[route.match]]\n  path = {{ prefix = \"/test.Echo/\" }}\n  [[route.backend]]\n  service = \"echo\"\n\
         [[service]]\nname = \"echo\"\nendpoints = [\"127.0.0.1:{}\"]\nprotocol = \"http2\"\n",
        server.port
    );
    let gw = https_gateway(&ca, &config);
    let (stdout, stderr) = grpc_client(&gw, "call");
    assert_eq!(
        stdout, "say: olleh\nfail: NOT_FOUND nothing here\n",
        "{stderr}"
    );
}

/// A plaintext listener takes h2c as well as HTTP/1.1, told apart by a connection's first
/// bytes: a gRPC client without TLS gets HTTP/2 all the way, and HTTP/1.1 requests on the
/// same port, a POST (which starts with "P", as the preface does) too, still get HTTP/1.1.
#[test]
fn a_plaintext_listener_takes_h2c_and_http1_on_one_port() {
    let server = PythonServer::start(&[&script("tests/grpc/echo.py"), "serve"]);
    let app = Upstream::start("app");
    let gw = Gateway::start(&format!(
        "[[route]]\nname = \"echo\"\n  [[route.match]]\n  path = {{ prefix = \"/test.Echo/\" }}\n  [[route.backend]]\n  service = \"echo\"\n\
         [[route]]\nname = \"app\"\n  [[route.backend]]\n  service = \"app\"\n\
         [[service]]\nname = \"echo\"\nendpoints = [\"127.0.0.1:{}\"]\nprotocol = \"http2\"\n{}",
        server.port,
        app.service(),
    ));
    weir_tests::assert_grpc_h2c_calls(gw.port, "a.example");
    let client = weir_tests::client();
    let post = weir_tests::send_body(&client, "POST", &gw.url("/form"), &[], Some(b"x")).unwrap();
    assert_eq!((post.status, post.body.as_str()), (200, "app"));
    let logged = |route: &str, protocol: &str| {
        gw.access_log()
            .iter()
            .any(|l| l["route"] == route && l["protocol"] == protocol)
    };
    wait_until("both protocols logged", Duration::from_secs(10), || {
        logged("echo", "HTTP/2") && logged("app", "HTTP/1.1")
    });
}

/// Runs tests/grpc/echo.py's client `mode` against the gateway over TLS (for `a.example`,
/// with the CA that [`https_gateway`] wrote): its stdout, and its stderr to explain a failure.
fn grpc_client(gw: &Gateway, mode: &str) -> (String, String) {
    let ca_path = gw.dir.path().join("ca.pem");
    let out = std::process::Command::new("/usr/bin/python3")
        .args([
            &script("tests/grpc/echo.py"),
            mode,
            &gw.port.to_string(),
            ca_path.to_str().unwrap(),
            "a.example",
        ])
        .output()
        .unwrap();
    let text = |bytes: &[u8]| String::from_utf8_lossy(bytes).into_owned();
    (text(&out.stdout), text(&out.stderr))
}

/// An HTTP/2 upstream that refuses a stream (RST_STREAM with REFUSED_STREAM) did not process
/// the request, so `refused-stream` (on by default) retries it, a POST too; without the
/// condition the client gets the failure.
#[test]
fn a_refused_stream_is_retried_even_for_a_post() {
    let server = PythonServer::start(&[&script("tests/h2/refuser.py")]);
    let gw = Gateway::start(&format!(
        "[[route]]\nname = \"default\"\n  [[route.match]]\n  path = {{ prefix = \"/refuse-once/default/\" }}\n  [[route.backend]]\n  service = \"h2\"\n\
         [[route]]\nname = \"strict\"\n  [[route.match]]\n  path = {{ prefix = \"/refuse-once/strict/\" }}\n  [[route.backend]]\n  service = \"h2\"\n\
         \x20 [route.retry]\n  on = [\"503\"]\n\
         [[service]]\nname = \"h2\"\nendpoints = [\"127.0.0.1:{}\"]\nprotocol = \"http2\"\n",
        server.port
    ));
    let post = |path: &str| {
        weir_tests::send_body(
            &weir_tests::client(),
            "POST",
            &gw.url(path),
            &[],
            Some(b"order"),
        )
        .unwrap()
    };
    let reply = post("/refuse-once/default/1");
    assert_eq!(
        (reply.status, reply.body.as_str()),
        (200, "answered /refuse-once/default/1")
    );
    let retries = "weir_upstream_retries_total{reason=\"refused-stream\",service=\"h2\"}";
    assert_eq!(gw.metric(retries), 1.0);
    let reply = post("/refuse-once/strict/1");
    assert_eq!(
        (reply.status, reply.body.as_str()),
        (502, "upstream connection error\n")
    );
    assert_eq!(gw.metric(retries), 1.0);
}

/// A gRPC call that fails with a status `route.retry.on` names (here `unavailable`, in a
/// trailers-only response) is retried, though gRPC calls are POSTs; without the condition
/// the client gets the status.
#[test]
fn a_grpc_status_named_in_retry_on_is_retried() {
    let server = PythonServer::start(&[&script("tests/grpc/echo.py"), "serve"]);
    let ca = TestCa::new("weir test CA");
    let config = format!(
        "[[route]]\nname = \"retrying\"\n  [[route.match]]\n  path = {{ prefix = \"/test.Echo/\" }}\n  [[route.backend]]\n  service = \"echo\"\n\
         \x20 [route.retry]\n  on = [\"unavailable\", \"connect-failure\"]\n\
         [[route]]\nname = \"plain\"\n  [[route.match]]\n  path = {{ prefix = \"/test.Plain/\" }}\n  [[route.backend]]\n  service = \"echo\"\n\
         [[service]]\nname = \"echo\"\nendpoints = [\"127.0.0.1:{}\"]\nprotocol = \"http2\"\n",
        server.port
    );
    let gw = https_gateway(&ca, &config);
    let (stdout, stderr) = grpc_client(&gw, "flaky");
    assert_eq!(
        stdout, "echo: first\nplain: UNAVAILABLE try again\n",
        "{stderr}"
    );
    let retries = "weir_upstream_retries_total{reason=\"unavailable\",service=\"echo\"}";
    assert_eq!(gw.metric(retries), 1.0);
}
