//! What the gateway passes on between client and upstream, header by header: hop-by-hop
//! headers stay with their hop (RFC 9110 §7.6.1), lists stay whole, and the host a request
//! names is the one it is routed by.
#![allow(clippy::unwrap_used)]

use std::io::Write;
use std::process::Command;
use std::time::Duration;

use weir_tests::{raw_request, raw_server, read_head, script, wait_until, Gateway, Upstream};

const WAIT: Duration = Duration::from_secs(10);

/// An upstream that answers every request with `response`, and its `[[service]]` "raw".
fn answering(response: &'static [u8]) -> String {
    let addr = raw_server(
        move |mut conn| {
            while read_head(&mut conn) && conn.write_all(response).is_ok() {}
        },
    );
    format!("[[service]]\nname = \"raw\"\nendpoints = [\"{addr}\"]\n")
}

fn route_to(service: &str) -> String {
    format!("[[route]]\nname = \"r\"\n  [[route.backend]]\n  service = \"{service}\"\n")
}

#[test]
fn hop_by_hop_response_headers_stay_with_their_hop() {
    let gw = Gateway::start(&format!(
        "{}{}",
        answering(
            b"HTTP/1.1 200 OK\r\nConnection: keep-alive, X-Secret\r\nX-Secret: s\r\n\
              Keep-Alive: timeout=5\r\nProxy-Connection: keep-alive\r\nX-Kept: yes\r\n\
              Content-Length: 2\r\n\r\nok"
        ),
        route_to("raw")
    ));
    let reply = gw.get("/", &[]);
    assert_eq!((reply.status, reply.body.as_str()), (200, "ok"));
    assert_eq!(
        reply.header("x-kept"),
        Some("yes"),
        "an end-to-end header is kept"
    );
    for hop in ["x-secret", "keep-alive", "proxy-connection"] {
        assert_eq!(reply.header(hop), None, "{hop} passed on");
    }
    // The client's own connection header is Pingora's, for this hop.
    assert_eq!(reply.header("connection"), Some("keep-alive"));
}

#[test]
fn every_x_forwarded_for_hop_is_kept() {
    let app = Upstream::start("app");
    let gw = Gateway::start(&format!("{}{}", app.service(), route_to("app")));
    let reply = raw_request(
        gw.port,
        b"GET / HTTP/1.1\r\nHost: a\r\nX-Forwarded-For: 1.1.1.1\r\n\
          X-Forwarded-For: 2.2.2.2, 3.3.3.3\r\nConnection: close\r\n\r\n",
    );
    assert!(reply.starts_with("HTTP/1.1 200"), "{reply}");
    assert_eq!(
        app.header_fields("x-forwarded-for"),
        ["1.1.1.1, 2.2.2.2, 3.3.3.3, 127.0.0.1"]
    );
}

#[test]
fn an_http10_absolute_uri_is_routed_by_its_host() {
    let app = Upstream::start("app");
    let gw = Gateway::start(&format!(
        "[[route]]\nname = \"secret\"\nhosts = [\"secret.internal\"]\n\
         direct_response = {{ status = 200, body = \"secret\" }}\n{}{}",
        app.service(),
        route_to("app")
    ));
    let reply = raw_request(gw.port, b"GET http://secret.internal/x HTTP/1.0\r\n\r\n");
    assert!(reply.ends_with("secret"), "{reply}");
    // Without an authority, the endpoint's address stands in for the missing Host.
    let reply = raw_request(gw.port, b"GET /x HTTP/1.0\r\n\r\n");
    assert!(reply.starts_with("HTTP/1.1 200"), "{reply}");
    assert_eq!(app.last_header("host"), Some(app.addr.to_string()));
}

#[test]
fn http2_cookie_fields_reach_an_http1_upstream_as_one() {
    let app = Upstream::start("app");
    let gw = Gateway::start(&format!("{}{}", app.service(), route_to("app")));
    let out = Command::new("/usr/bin/python3")
        .args([&script("tests/h2/cookies.py"), &gw.port.to_string(), "/c"])
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_eq!(
        stdout.trim(),
        "200",
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(app.header_fields("cookie"), ["a=1; b=2"]);

    // A match sees them joined too, and the `:authority` as the Host, as over HTTP/1.1.
    let gw = Gateway::start(&format!(
        "{}{}[[route]]\nname = \"by-cookie\"\ndirect_response = {{ status = 201 }}\n\
         \x20 [[route.match]]\n  path = {{ prefix = \"/c\" }}\n  headers = {{ cookie = {{ regex = \".*b=2.*\" }} }}\n\
         [[route]]\nname = \"by-host\"\ndirect_response = {{ status = 202 }}\n\
         \x20 [[route.match]]\n  path = {{ prefix = \"/h\" }}\n  headers = {{ host = {{ exact = \"cookies.test\" }} }}\n",
        app.service(),
        route_to("app")
    ));
    for (path, status) in [("/c", "201"), ("/h", "202")] {
        let out = Command::new("/usr/bin/python3")
            .args([&script("tests/h2/cookies.py"), &gw.port.to_string(), path])
            .output()
            .unwrap();
        assert_eq!(
            String::from_utf8_lossy(&out.stdout).trim(),
            status,
            "{path}"
        );
    }
}

#[test]
fn a_mirror_copy_drops_hop_by_hop_headers_and_gets_a_host() {
    let (app, shadow) = (Upstream::start("app"), Upstream::start("shadow"));
    let gw = Gateway::start(&format!(
        "{}{}[[route]]\nname = \"r\"\n  [[route.backend]]\n  service = \"app\"\n\
         [route.mirror]\n  service = \"shadow\"\n",
        app.service(),
        shadow.service()
    ));
    let reply = raw_request(
        gw.port,
        b"GET /m HTTP/1.0\r\nConnection: X-Secret\r\nX-Secret: s\r\nKeep-Alive: 1\r\n\
          Upgrade: websocket\r\nX-Kept: yes\r\n\r\n",
    );
    assert!(reply.starts_with("HTTP/1.1 200"), "{reply}");
    wait_until("the mirror's copy", WAIT, || shadow.hits() == 1);
    for upstream in [&app, &shadow] {
        assert_eq!(upstream.last_header("x-kept").as_deref(), Some("yes"));
        for hop in ["x-secret", "keep-alive", "upgrade"] {
            assert_eq!(
                upstream.last_header(hop),
                None,
                "{hop} reached {}",
                upstream.name
            );
        }
        let connection = upstream.last_header("connection").unwrap_or_default();
        assert!(
            !connection.to_ascii_lowercase().contains("secret"),
            "{connection}"
        );
    }
    assert_eq!(shadow.last_header("host"), Some(shadow.addr.to_string()));
}

#[test]
fn a_target_that_is_no_path_nor_uri_is_refused() {
    let app = Upstream::start("app");
    let gw = Gateway::start(&format!("{}{}", app.service(), route_to("app")));
    let reply = raw_request(
        gw.port,
        b"GET secret.internal/x HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n",
    );
    assert!(reply.starts_with("HTTP/1.1 400"), "{reply}");
    assert!(reply.ends_with("bad request target\n"), "{reply}");
    assert_eq!(app.hits(), 0);
    let reply = raw_request(
        gw.port,
        b"OPTIONS * HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n",
    );
    assert!(reply.starts_with("HTTP/1.1 200"), "{reply}");
}

#[test]
fn a_switch_of_protocols_nobody_asked_for_is_a_bad_gateway() {
    let gw = Gateway::start(&format!(
        "{}{}",
        answering(b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: x\r\nConnection: upgrade\r\n\r\n"),
        route_to("raw")
    ));
    let reply = gw.get("/", &[]);
    assert_eq!(reply.status, 502, "{}", reply.body);
}

#[test]
fn a_status_over_599_is_a_bad_gateway() {
    let gw = Gateway::start(&format!(
        "{}{}",
        answering(b"HTTP/1.1 999 Whatever\r\nContent-Length: 2\r\n\r\nok"),
        route_to("raw")
    ));
    let reply = raw_request(
        gw.port,
        b"GET / HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n",
    );
    assert!(reply.starts_with("HTTP/1.1 502"), "{reply}");
}

#[test]
fn an_answer_before_closing_says_close() {
    let gw = Gateway::start(&format!(
        "{}{}",
        answering(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"),
        route_to("raw")
    ));
    let reply = raw_request(
        gw.port,
        b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\nxx\r\n0\r\n\r\n",
    );
    assert!(reply.starts_with("HTTP/1.1 400"), "{reply}");
    let lower = reply.to_ascii_lowercase();
    assert!(lower.contains("connection: close\r\n"), "{reply}");
}

/// The head of a raw reply, in lower case, and its body.
fn split(reply: &str) -> (String, &str) {
    let (head, body) = reply.split_once("\r\n\r\n").unwrap_or((reply, ""));
    (head.to_ascii_lowercase(), body)
}

#[test]
fn an_http10_client_gets_a_chunked_answer_as_plain_bytes() {
    let gw = Gateway::start(&format!(
        "{}{}",
        answering(
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n6\r\n weir!\r\n0\r\n\r\n"
        ),
        route_to("raw")
    ));
    let reply = raw_request(gw.port, b"GET / HTTP/1.0\r\nHost: a\r\n\r\n");
    let (head, body) = split(&reply);
    assert!(head.starts_with("http/1.1 200"), "{reply}");
    assert!(!head.contains("transfer-encoding"), "{reply}");
    assert_eq!(body, "hello weir!");
    // Its body ends with the connection, so one that asked to keep it is told it closes.
    let reply = raw_request(
        gw.port,
        b"GET / HTTP/1.0\r\nHost: a\r\nConnection: keep-alive\r\n\r\n",
    );
    let (head, body) = split(&reply);
    assert!(head.lines().any(|l| l == "connection: close"), "{reply}");
    assert_eq!(body, "hello weir!");
    // An HTTP/1.1 client still gets chunks, and keeps its connection.
    let reply = raw_request(
        gw.port,
        b"GET / HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n",
    );
    let (head, body) = split(&reply);
    assert!(head.contains("transfer-encoding: chunked"), "{reply}");
    assert!(body.ends_with("\r\n0\r\n\r\n"), "{reply}");
}

/// A client that leaves after the upstream's `100 Continue`, before any final answer, is
/// logged with no status (`0`, `DC`), not as a 100.
#[test]
fn an_interim_answer_alone_is_no_status() {
    use std::io::Read;
    let addr = raw_server(|mut conn| {
        if read_head(&mut conn) {
            let _ = conn.write_all(b"HTTP/1.1 100 Continue\r\n\r\n");
            let _ = conn.read(&mut [0; 16]);
        }
    });
    let gw = Gateway::start(&format!(
        "[[service]]\nname = \"raw\"\nendpoints = [\"{addr}\"]\n{}",
        route_to("raw")
    ));
    let mut conn = std::net::TcpStream::connect(("127.0.0.1", gw.port)).unwrap();
    conn.write_all(
        b"POST /expect HTTP/1.1\r\nHost: a\r\nExpect: 100-continue\r\nContent-Length: 5\r\n\r\n",
    )
    .unwrap();
    let mut interim = [0; 12];
    conn.read_exact(&mut interim).unwrap();
    assert_eq!(&interim, b"HTTP/1.1 100");
    drop(conn);
    gw.wait_logged(1);
    let line = &gw.access_log()[0];
    assert_eq!(
        (line["status"].as_u64(), line["flags"].as_str()),
        (Some(0), Some("DC")),
        "{line}"
    );
}

/// A length repeated (`5,5`, or the field twice) goes upstream once: a strict upstream
/// refuses the list (RFC 9110 §8.6 lets a proxy pass the one value on).
#[test]
fn a_repeated_content_length_goes_upstream_once() {
    let app = Upstream::start("app");
    let gw = Gateway::start(&format!("{}{}", app.service(), route_to("app")));
    for length in [
        "Content-Length: 5,5\r\n",
        "Content-Length: 5\r\nContent-Length: 5\r\n",
    ] {
        let request =
            format!("POST / HTTP/1.1\r\nHost: a\r\n{length}Connection: close\r\n\r\nabcde");
        let reply = raw_request(gw.port, request.as_bytes());
        assert!(reply.starts_with("HTTP/1.1 200"), "{reply}");
        assert_eq!(app.header_fields("content-length"), ["5"], "{length:?}");
        assert_eq!(app.last_body(), b"abcde");
    }
}

#[test]
fn an_http10_upstream_is_answered_in_the_proxys_own_version() {
    let gw = Gateway::start(&format!(
        "{}{}",
        answering(b"HTTP/1.0 200 OK\r\nContent-Length: 2\r\n\r\nok"),
        route_to("raw")
    ));
    // Two requests on one connection: the first answer must not end it (RFC 9110 §6.2, a
    // proxy sends its own version; HTTP/1.0 would tell the client the connection closes).
    let reply = raw_request(
        gw.port,
        b"GET / HTTP/1.1\r\nHost: a\r\n\r\nGET / HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n",
    );
    assert_eq!(reply.matches("HTTP/1.1 200 OK\r\n").count(), 2, "{reply}");
    assert!(!reply.contains("HTTP/1.0"), "{reply}");
}

#[test]
fn no_content_has_no_length_and_head_over_http2_has_no_body() {
    let gw = Gateway::start(&format!(
        "{}{}[[route]]\nname = \"teapot\"\ndirect_response = {{ status = 418, body = \"teapot\\n\" }}\n  \
         [[route.match]]\n  path = {{ exact = \"/teapot\" }}\n\
         [[route]]\nname = \"none\"\ndirect_response = {{ status = 204 }}\n  \
         [[route.match]]\n  path = {{ exact = \"/none\" }}\n\
         [[route]]\nname = \"abort\"\n  [[route.match]]\n  path = {{ exact = \"/abort\" }}\n  \
         [[route.backend]]\n  service = \"raw\"\n  [route.fault]\n  abort = {{ status = 204 }}\n",
        answering(b"HTTP/1.1 204 No Content\r\nContent-Length: 10\r\n\r\n"),
        route_to("raw")
    ));
    // A fault's 204 has no content, so no type for it either.
    let reply = raw_request(
        gw.port,
        b"GET /abort HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n",
    );
    let (head, _) = split(&reply);
    assert!(head.starts_with("http/1.1 204"), "{reply}");
    assert!(!head.contains("content-type"), "{reply}");
    let url = |path: &str| gw.url(path);
    // Weir's own 204, and an upstream's that claimed a length: neither says one, so an HTTP/2
    // client takes both.
    let reply = raw_request(
        gw.port,
        b"GET /none HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n",
    );
    let (head, _) = split(&reply);
    assert!(head.starts_with("http/1.1 204"), "{reply}");
    assert!(!head.contains("content-length"), "{reply}");
    for path in ["/none", "/upstream"] {
        let out = weir_tests::curl(&["--http2-prior-knowledge", "-i", &url(path)]);
        let out = out.unwrap_or_else(|e| panic!("{path}: {e}"));
        assert!(out.starts_with("HTTP/2 204"), "{path}: {out}");
        assert!(
            !out.to_ascii_lowercase().contains("content-length"),
            "{out}"
        );
    }
    // HEAD to a direct response over HTTP/2: GET's headers, no DATA.
    let out = weir_tests::curl(&["--http2-prior-knowledge", "-I", &url("/teapot")]);
    let out = out.unwrap_or_else(|e| panic!("HEAD over h2: {e}"));
    assert!(out.starts_with("HTTP/2 418"), "{out}");
    assert!(out.contains("content-length: 7"), "{out}");
    // And to an answer of the error path (an upstream that is not there).
    let dead = weir_tests::free_port();
    let gw = Gateway::start(&format!(
        "[[service]]\nname = \"dead\"\nendpoints = [\"127.0.0.1:{dead}\"]\n{}",
        route_to("dead")
    ));
    let out = weir_tests::curl(&["--http2-prior-knowledge", "-I", &gw.url("/")]);
    let out = out.unwrap_or_else(|e| panic!("HEAD over h2 to a 503: {e}"));
    assert!(out.starts_with("HTTP/2 503"), "{out}");
}

/// An upstream that answers with a body far longer than any client here reads, and its
/// `[[service]]` "endless".
fn endless() -> String {
    let addr = raw_server(|mut conn| {
        let head = b"HTTP/1.1 200 OK\r\nContent-Length: 1000000000\r\n\r\n";
        if read_head(&mut conn) && conn.write_all(head).is_ok() {
            while conn.write_all(&[b'x'; 65536]).is_ok() {}
        }
    });
    format!("[[service]]\nname = \"endless\"\nendpoints = [\"{addr}\"]\n")
}

#[test]
fn a_client_that_leaves_mid_download_is_dc_on_http1_and_http2() {
    let gw = Gateway::start(&format!("{}{}", endless(), route_to("endless")));
    for protocol in ["--http1.1", "--http2-prior-knowledge"] {
        let out = Command::new("curl")
            .args([
                "-s",
                "-o",
                "/dev/null",
                protocol,
                "--limit-rate",
                "1M",
                "-m",
                "1",
            ])
            .arg(gw.url("/"))
            .status()
            .unwrap();
        assert_eq!(
            out.code(),
            Some(28),
            "{protocol}: curl gave up at its time limit"
        );
    }
    wait_until("both downloads logged DC", WAIT, || {
        let log = gw.access_log();
        let dc = |protocol: &str| {
            log.iter()
                .any(|l| l["protocol"] == protocol && l["status"] == 200 && l["flags"] == "DC")
        };
        dc("HTTP/1.1") && dc("HTTP/2")
    });
}

#[test]
fn a_body_in_a_coding_other_than_chunked_is_501() {
    let app = Upstream::start("app");
    let gw = Gateway::start(&format!("{}{}", app.service(), route_to("app")));
    let reply = raw_request(
        gw.port,
        b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: gzip, chunked\r\nConnection: close\r\n\r\n\
          5\r\nxxxxx\r\n0\r\n\r\n",
    );
    assert!(reply.starts_with("HTTP/1.1 501"), "{reply}");
    assert_eq!(app.hits(), 0);
    // chunked alone passes.
    let reply = raw_request(
        gw.port,
        b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: Chunked\r\nConnection: close\r\n\r\n\
          5\r\nxxxxx\r\n0\r\n\r\n",
    );
    assert!(reply.starts_with("HTTP/1.1 200"), "{reply}");
    assert_eq!(app.hits(), 1);
}
