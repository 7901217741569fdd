//! `tcp` and `tls` listeners: the real gateway forwards connections' bytes to real upstream
//! servers, split by weight, past a dead endpoint, and (tls) by the SNI of a real TLS
//! handshake that it passes through to the upstream unterminated.
#![allow(clippy::unwrap_used)]

use std::io::{Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::thread;
use std::time::{Duration, Instant};

use weir_tests::tls::{https_get, server_config, Issued, TestCa, TlsUpstream};
use weir_tests::{free_port, wait_until, Gateway};
use weir_tls::PeerIdentity;

/// A server that reads each connection to its end, answers `<name>:<what it read>` and
/// closes: a client sees the answer only if its half-close went through.
struct Echo {
    addr: SocketAddr,
}

impl Echo {
    fn start(name: &'static str) -> Echo {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        thread::spawn(move || {
            for tcp in listener.incoming() {
                let Ok(mut tcp) = tcp else { continue };
                thread::spawn(move || {
                    let mut got = Vec::new();
                    if tcp.read_to_end(&mut got).is_ok() {
                        let answer = [name.as_bytes(), b":", &got].concat();
                        let _ = tcp.write_all(&answer);
                    }
                });
            }
        });
        Echo { addr }
    }
}

/// [`Echo`] over TLS, serving `served` and, with `client_ca`, requiring a client certificate
/// that chains to it. Answers `<name>:<client's first URI SAN, or "-">:<what it read>`.
fn tls_echo(name: &'static str, served: &Issued, client_ca: Option<&str>) -> SocketAddr {
    let config = server_config(served, client_ca);
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    thread::spawn(move || {
        for tcp in listener.incoming() {
            let Ok(tcp) = tcp else { continue };
            let config = config.clone();
            thread::spawn(move || {
                let conn = rustls::ServerConnection::new(config).unwrap();
                let mut tls = rustls::StreamOwned::new(conn, tcp);
                let mut got = Vec::new();
                // The client's close_notify ends what it sends; the answer still goes back.
                if tls.read_to_end(&mut got).is_ok() {
                    let peer = (tls.conn.peer_certificates())
                        .and_then(|c| c.first())
                        .map(|c| PeerIdentity::of(c.as_ref()));
                    let uri = peer.and_then(|p| p.uris.first().cloned());
                    let head = format!("{name}:{}:", uri.as_deref().unwrap_or("-"));
                    let _ = tls.write_all(&[head.as_bytes(), &got].concat());
                    tls.conn.send_close_notify();
                    let _ = tls.flush();
                }
            });
        }
    });
    addr
}

/// Sends `what` on a new connection to `port`, closes its sending side and reads the answer
/// to its end.
fn exchange(port: u16, what: &str) -> String {
    let mut tcp = TcpStream::connect(("127.0.0.1", port)).unwrap();
    tcp.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    // The gateway may have closed already (nothing to forward to): then the answer is "".
    let _ = tcp.write_all(what.as_bytes());
    let _ = tcp.shutdown(Shutdown::Write);
    let mut answer = String::new();
    let _ = tcp.read_to_string(&mut answer);
    answer
}

fn tcp_listener(name: &str, port: u16, extra: &str) -> String {
    format!(
        "[[listener]]\nname = \"{name}\"\nlisten = \"127.0.0.1:{port}\"\nprotocol = \"tcp\"\n{extra}"
    )
}

#[test]
fn tcp_connections_are_split_by_weight_and_logged() {
    let (a, b) = (Echo::start("a"), Echo::start("b"));
    let port = free_port();
    let gw = Gateway::start(&format!(
        "{}[[route]]\nname = \"db\"\nlisteners = [\"db\"]\n\
         \x20 [[route.backend]]\n  service = \"a\"\n  [[route.backend]]\n  service = \"b\"\n\
         [[service]]\nname = \"a\"\nendpoints = [\"{}\"]\n\
         [[service]]\nname = \"b\"\nendpoints = [\"{}\"]\n",
        tcp_listener("db", port, ""),
        a.addr,
        b.addr
    ));
    let answers: Vec<String> = (0..40).map(|i| exchange(port, &format!("hi{i}"))).collect();
    for (i, answer) in answers.iter().enumerate() {
        assert!(
            [format!("a:hi{i}"), format!("b:hi{i}")].contains(answer),
            "{i}: {answer:?}"
        );
    }
    let to_a = answers.iter().filter(|a| a.starts_with("a:")).count();
    assert!(
        (1..40).contains(&to_a),
        "an even split sent {to_a} of 40 to a"
    );

    // One log line per connection, with its bytes both ways.
    let tcp_lines = || -> Vec<_> {
        let log = gw.access_log().into_iter();
        log.filter(|l| l["protocol"] == "TCP").collect()
    };
    wait_until("40 access log lines", Duration::from_secs(10), || {
        tcp_lines().len() == 40
    });
    let line = &tcp_lines()[0];
    assert_eq!(line["protocol"], "TCP");
    assert_eq!(line["listener"], "db");
    assert_eq!(line["route"], "db");
    assert_eq!(line["flags"], "");
    assert_eq!(line["bytes_received"], 3);
    assert_eq!(line["bytes_sent"], 5);
    let service = line["service"].as_str().unwrap();
    let upstream = if service == "a" { a.addr } else { b.addr };
    assert_eq!(line["upstream"], upstream.to_string());
    let series =
        "weir_tcp_connections_total{flags=\"\",listener=\"db\",route=\"db\",service=\"a\"}";
    assert_eq!(gw.metric(series), to_a as f64);
    let received = "weir_tcp_bytes_total{direction=\"received\",route=\"db\",service=\"a\"}";
    assert!(gw.metric(received) >= 3.0 * to_a as f64);
}

/// A long connection's bytes reach the metrics while it lasts (every 5 s), not as one step at
/// its end, and are counted once.
#[test]
fn a_long_connections_bytes_are_counted_while_it_lasts() {
    let a = Echo::start("a");
    let port = free_port();
    let gw = Gateway::start(&format!(
        "{}[[route]]\nname = \"db\"\nlisteners = [\"db\"]\n  [[route.backend]]\n  service = \"a\"\n\
         [[service]]\nname = \"a\"\nendpoints = [\"{}\"]\n",
        tcp_listener("db", port, ""),
        a.addr
    ));
    let series = |direction: &str| {
        gw.metric(&format!(
            "weir_tcp_bytes_total{{direction=\"{direction}\",route=\"db\",service=\"a\"}}"
        ))
    };
    let mut tcp = TcpStream::connect(("127.0.0.1", port)).unwrap();
    tcp.write_all(b"hello").unwrap();
    wait_until(
        "the open connection's bytes",
        Duration::from_secs(15),
        || series("received") == 5.0,
    );
    assert!(gw.access_log().is_empty(), "the connection has not ended");
    tcp.shutdown(Shutdown::Write).unwrap();
    let mut answer = String::new();
    tcp.read_to_string(&mut answer).unwrap();
    assert_eq!(answer, "a:hello");
    wait_until("the log line", Duration::from_secs(10), || {
        gw.access_log().len() == 1
    });
    assert_eq!((series("received"), series("sent")), (5.0, 7.0));
}

/// A connect failure tries another endpoint; with none left, the client's connection is
/// closed and logged `UF`. A connection with no byte either way for `idle_timeout` is closed
/// (`SI`).
#[test]
fn failed_connects_move_on_and_idle_connections_close() {
    let live = Echo::start("live");
    let dead = format!("127.0.0.1:{}", free_port());
    let (port, dead_port, idle_port) = (free_port(), free_port(), free_port());
    let route = |name: &str, service: &str| {
        format!(
            "[[route]]\nname = \"{name}\"\nlisteners = [\"{name}\"]\n  [[route.backend]]\n  service = \"{service}\"\n"
        )
    };
    let gw = Gateway::start(&format!(
        "{}{}{}{}{}{}\
         [[service]]\nname = \"half\"\nendpoints = [\"{dead}\", \"{}\"]\n\
         [[service]]\nname = \"gone\"\nendpoints = [\"{dead}\"]\n",
        tcp_listener("half", port, ""),
        tcp_listener("gone", dead_port, ""),
        tcp_listener("idle", idle_port, "idle_timeout = \"300ms\"\n"),
        route("half", "half"),
        route("gone", "gone"),
        route("idle", "half"),
        live.addr,
    ));
    for i in 0..10 {
        assert_eq!(exchange(port, &format!("x{i}")), format!("live:x{i}"));
    }
    assert_eq!(exchange(dead_port, "x"), "", "nothing to answer");
    wait_until("the UF line", Duration::from_secs(10), || {
        gw.access_log().iter().any(|l| l["flags"] == "UF")
    });
    let log = gw.access_log();
    let failed = log.iter().find(|l| l["flags"] == "UF").unwrap();
    assert_eq!(
        (&failed["route"], &failed["upstream"]),
        (&"gone".into(), &dead.clone().into())
    );

    // Idle: the echo waits for the client's end, the client sends nothing.
    let mut tcp = TcpStream::connect(("127.0.0.1", idle_port)).unwrap();
    tcp.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let opened = Instant::now();
    let mut rest = Vec::new();
    let _ = tcp.read_to_end(&mut rest);
    let took = opened.elapsed();
    assert!(
        took >= Duration::from_millis(300) && took < Duration::from_secs(10),
        "closed after {took:?}"
    );
    wait_until("the SI line", Duration::from_secs(10), || {
        gw.access_log().iter().any(|l| l["flags"] == "SI")
    });
}

/// TLS passes through by SNI: each client's handshake is with the upstream its SNI names
/// (the gateway holds no certificate at all), client certificates included; a name no
/// route takes, a client that sends no ClientHello, and one that sends plaintext get their
/// connections closed.
#[test]
fn tls_passes_through_by_sni() {
    let ca = TestCa::new("passthrough-ca");
    let a = TlsUpstream::start("a", &ca.server(&["a.example"]), None);
    let b = TlsUpstream::start("b", &ca.server(&["b.example"]), Some(&ca.pem()));
    let port = free_port();
    let gw = Gateway::start(&format!(
        "[[listener]]\nname = \"pass\"\nlisten = \"127.0.0.1:{port}\"\nprotocol = \"tls\"\nidle_timeout = \"500ms\"\n\
         [[route]]\nname = \"a\"\nlisteners = [\"pass\"]\nhosts = [\"a.example\"]\n  [[route.backend]]\n  service = \"a\"\n\
         [[route]]\nname = \"b\"\nlisteners = [\"pass\"]\nhosts = [\"*.b.example\", \"b.example\"]\n  [[route.backend]]\n  service = \"b\"\n\
         [[service]]\nname = \"a\"\nendpoints = [\"{}\"]\n\
         [[service]]\nname = \"b\"\nendpoints = [\"{}\"]\n",
        a.addr, b.addr
    ));
    let reply = https_get(port, "a.example", &ca.pem(), None, "/", &[]).unwrap();
    assert_eq!((reply.status, reply.body.as_str()), (200, "a"));
    assert_eq!(reply.served, ["a.example"], "a's own certificate");

    // b asks for a client certificate, end to end.
    let client = ca.client("frontend", &["spiffe://mesh.local/ns/web/sa/frontend"]);
    let reply = https_get(port, "b.example", &ca.pem(), Some(&client), "/", &[]).unwrap();
    assert_eq!(
        (reply.body.as_str(), reply.served.as_slice()),
        ("b", &["b.example".to_string()][..])
    );
    let peer = b.last_peer().unwrap();
    assert_eq!(peer.uris, ["spiffe://mesh.local/ns/web/sa/frontend"]);
    assert!(https_get(port, "b.example", &ca.pem(), None, "/", &[]).is_err());

    // No route for the name: closed before any handshake.
    let refused = https_get(port, "c.example", &ca.pem(), None, "/", &[]);
    assert!(refused.is_err(), "{:?}", refused.map(|r| r.body));
    wait_until("the NR line", Duration::from_secs(10), || {
        gw.access_log().iter().any(|l| l["flags"] == "NR")
    });
    let log = gw.access_log();
    let unrouted = log.iter().find(|l| l["flags"] == "NR").unwrap();
    assert_eq!(
        (&unrouted["protocol"], &unrouted["authority"]),
        (&"TLS".into(), &"c.example".into())
    );
    let passed = log.iter().find(|l| l["route"] == "a").unwrap();
    assert_eq!(passed["authority"], "a.example");
    assert!(passed["bytes_received"].as_u64().unwrap() > 100, "{passed}");

    // A client that never sends its ClientHello is closed after the idle timeout (here
    // shorter than the 15 s cap).
    let mut silent = TcpStream::connect(("127.0.0.1", port)).unwrap();
    silent
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    let opened = Instant::now();
    assert_eq!(silent.read(&mut [0; 1]).unwrap_or(0), 0);
    let took = opened.elapsed();
    assert!(
        took >= Duration::from_millis(500) && took < Duration::from_secs(10),
        "{took:?}"
    );

    // Plain bytes on a tls listener are not TLS: closed, nothing forwarded.
    assert_eq!(exchange(port, "GET / HTTP/1.1\r\n\r\n"), "");
    assert_eq!(a.hits() + b.hits(), 2);
    // Both are logged and counted as connections: the silent one idle (SI), the plain one
    // with nothing to route (NR, its bytes counted).
    wait_until(
        "the SI and plaintext lines",
        Duration::from_secs(10),
        || {
            let log = gw.access_log();
            let plain = |l: &&serde_json::Value| l["flags"] == "NR" && l["bytes_received"] == 18;
            log.iter().any(|l| l["flags"] == "SI") && log.iter().any(|l| plain(&l))
        },
    );
    let unrouted =
        "weir_tcp_connections_total{flags=\"NR\",listener=\"pass\",route=\"\",service=\"\"}";
    assert_eq!(gw.metric(unrouted), 2.0, "c.example and the plaintext");
}

/// SIGTERM: the listener stops taking connections, an open one carries on to its end (within
/// the grace period) and is logged, and then the gateway exits.
#[test]
fn a_drain_lets_open_connections_finish() {
    let echo = Echo::start("echo");
    let port = free_port();
    let mut gw = Gateway::start(&format!(
        "{}[[route]]\nname = \"db\"\nlisteners = [\"db\"]\n  [[route.backend]]\n  service = \"echo\"\n\
         [[service]]\nname = \"echo\"\nendpoints = [\"{}\"]\n",
        tcp_listener("db", port, ""),
        echo.addr
    ));
    let mut tcp = TcpStream::connect(("127.0.0.1", port)).unwrap();
    tcp.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    tcp.write_all(b"before").unwrap();
    wait_until("the connection in flight", Duration::from_secs(10), || {
        gw.metric("weir_downstream_connections_active{listener=\"db\"}") == 1.0
    });
    gw.signal("TERM");
    wait_until("the drain", Duration::from_secs(10), || {
        gw.stderr().contains("draining")
    });
    assert!(
        gw.wait_exit(Duration::from_millis(300)).is_none(),
        "exited with a connection open"
    );
    tcp.write_all(b" and after").unwrap();
    tcp.shutdown(Shutdown::Write).unwrap();
    let mut answer = String::new();
    tcp.read_to_string(&mut answer).unwrap();
    assert_eq!(answer, "echo:before and after");
    let exit = gw.wait_exit(Duration::from_secs(10));
    assert!(exit.is_some_and(|s| s.success()), "{exit:?}");
    let log = gw.access_log();
    let line = log.iter().find(|l| l["protocol"] == "TCP").unwrap();
    assert_eq!(line["bytes_received"], 16);
}

/// A tcp route to a service with `[service.tls]`: the client speaks plaintext, Weir
/// originates TLS (verifying the server against the service's CA and `sni`, presenting its
/// client certificate in mode mutual). A server Weir cannot verify gets nothing (`UF`).
#[test]
fn a_tcp_route_originates_tls_to_its_service() {
    let ca = TestCa::new("db-ca");
    let dir = tempfile::tempdir().unwrap();
    let file = |name: &str, text: &str| {
        let path = dir.path().join(name);
        std::fs::write(&path, text).unwrap();
        path.to_str().unwrap().to_string()
    };
    let secure = tls_echo("secure", &ca.server(&["db.internal"]), Some(&ca.pem()));
    let impostor = tls_echo(
        "impostor",
        &TestCa::new("other").server(&["db.internal"]),
        None,
    );
    let client = ca.client("gateway", &["spiffe://example.org/gateway"]);
    let tls = format!(
        "  [service.tls]\n  mode = \"mutual\"\n  sni = \"db.internal\"\n  ca = \"{}\"\n  cert = \"{}\"\n  key = \"{}\"\n",
        file("ca.pem", &ca.pem()),
        file("gw.pem", &client.cert),
        file("gw-key.pem", &client.key),
    );
    let (port, bad_port) = (free_port(), free_port());
    let gw = Gateway::start(&format!(
        "{}{}\
         [[route]]\nname = \"db\"\nlisteners = [\"db\"]\n  [[route.backend]]\n  service = \"db\"\n\
         [[route]]\nname = \"bad\"\nlisteners = [\"bad\"]\n  [[route.backend]]\n  service = \"bad\"\n\
         [[service]]\nname = \"db\"\nendpoints = [\"{secure}\"]\n{tls}\
         [[service]]\nname = \"bad\"\nendpoints = [\"{impostor}\"]\n{tls}",
        tcp_listener("db", port, ""),
        tcp_listener("bad", bad_port, ""),
    ));
    assert_eq!(
        exchange(port, "select 1"),
        "secure:spiffe://example.org/gateway:select 1"
    );
    assert_eq!(exchange(bad_port, "select 1"), "");
    wait_until("the UF line", Duration::from_secs(10), || {
        gw.access_log()
            .iter()
            .any(|l| l["route"] == "bad" && l["flags"] == "UF")
    });
}

/// `proxy_protocol = true` on a tcp listener: the header is read, not forwarded, and its
/// source is the client in the log. A service with `proxy_protocol = "v1"` gets a header of
/// its own, naming that client and the listener.
#[test]
fn a_proxy_protocol_header_is_taken_off_a_tcp_connection_and_sent_on() {
    let echo = Echo::start("echo");
    let (port, relay) = (free_port(), free_port());
    let gw = Gateway::start(&format!(
        "{}{}[[route]]\nname = \"db\"\nlisteners = [\"db\"]\n  [[route.backend]]\n  service = \"echo\"\n\
         [[route]]\nname = \"relay\"\nlisteners = [\"relay\"]\n  [[route.backend]]\n  service = \"told\"\n\
         [[service]]\nname = \"echo\"\nendpoints = [\"{}\"]\n\
         [[service]]\nname = \"told\"\nendpoints = [\"{}\"]\nproxy_protocol = \"v1\"\n",
        tcp_listener("db", port, "proxy_protocol = true\n"),
        tcp_listener("relay", relay, "proxy_protocol = true\n"),
        echo.addr,
        echo.addr,
    ));
    let from_v4 = "PROXY TCP4 203.0.113.7 10.0.0.1 56324 5432\r\n";
    assert_eq!(
        exchange(relay, &format!("{from_v4}select 1")),
        format!("echo:PROXY TCP4 203.0.113.7 127.0.0.1 56324 {relay}\r\nselect 1")
    );
    let header = "PROXY TCP6 2001:db8::7 2001:db8::1 4000 5432\r\n";
    assert_eq!(
        exchange(port, &format!("{header}select 1")),
        "echo:select 1"
    );
    assert_eq!(exchange(port, "select 1"), "", "no header, no connection");
    wait_until("the log line", Duration::from_secs(10), || {
        gw.access_log().iter().any(|l| l["route"] == "db")
    });
    let log = gw.access_log();
    let line = log.iter().find(|l| l["route"] == "db").unwrap();
    assert_eq!(
        (&line["client"], &line["bytes_received"]),
        (&"2001:db8::7".into(), &8.into())
    );
}

/// A ClientHello of 20 KB (a post-quantum key share and a long list of extensions get there),
/// in full 16 KiB records, sent in one write: routed by its SNI and forwarded whole.
#[test]
fn a_large_client_hello_in_full_records_passes_through() {
    let echo = Echo::start("echo");
    let port = free_port();
    let _gw = Gateway::start(&format!(
        "[[listener]]\nname = \"pass\"\nlisten = \"127.0.0.1:{port}\"\nprotocol = \"tls\"\n\
         [[route]]\nname = \"a\"\nlisteners = [\"pass\"]\nhosts = [\"a.example\"]\n  [[route.backend]]\n  service = \"echo\"\n\
         [[service]]\nname = \"echo\"\nendpoints = [\"{}\"]\n",
        echo.addr
    ));
    let ext = |kind: u16, body: &[u8]| {
        [
            &kind.to_be_bytes()[..],
            &(body.len() as u16).to_be_bytes(),
            body,
        ]
        .concat()
    };
    let name = b"a.example";
    let sni = [
        &(name.len() as u16 + 3).to_be_bytes()[..],
        &[0],
        &(name.len() as u16).to_be_bytes(),
        name,
    ]
    .concat();
    let extensions = [
        ext(0, &sni),
        ext(10, &[0, 2, 0, 0x1d]),       // supported groups: x25519
        ext(13, &[0, 2, 0x08, 0x04]),    // signature algorithms
        ext(0xfa0a, &vec![7u8; 20_000]), // an extension the server does not know
    ]
    .concat();
    let body = [
        &[3, 3][..],
        &[1; 32],            // random
        &[0],                // no session id
        &[0, 2, 0x13, 0x01], // TLS_AES_128_GCM_SHA256
        &[1, 0],             // null compression
        &(extensions.len() as u16).to_be_bytes(),
        &extensions,
    ]
    .concat();
    let hello = [&[1u8][..], &(body.len() as u32).to_be_bytes()[1..], &body].concat();
    let records: Vec<u8> = (hello.chunks(16_384))
        .flat_map(|part| [&[22, 3, 1][..], &(part.len() as u16).to_be_bytes(), part].concat())
        .collect();
    let mut client = TcpStream::connect(("127.0.0.1", port)).unwrap();
    client
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    client.write_all(&records).unwrap();
    client.shutdown(std::net::Shutdown::Write).unwrap();
    let mut answer = Vec::new();
    client.read_to_end(&mut answer).unwrap();
    assert_eq!(
        answer.len(),
        "echo:".len() + records.len(),
        "forwarded whole"
    );
    assert!(answer.ends_with(&records));
}
