//! TLS against the real binary, with real handshakes and certificates made at test time:
//! https listeners (a certificate per name, rotation, client certificates) and TLS to services.
#![allow(clippy::unwrap_used)]

use std::fs;
use std::path::Path;
use std::time::Duration;

use weir_tests::tls::{https_get, https_get_after, Issued, TestCa, TlsClient, TlsUpstream};
use weir_tests::{free_port, raw_request, wait_until, Gateway, Upstream};

/// Writes `issued` as `<name>.pem` and `<name>-key.pem` in `dir`.
fn write_pair(dir: &Path, name: &str, issued: &Issued) {
    fs::write(dir.join(format!("{name}.pem")), &issued.cert).unwrap();
    fs::write(dir.join(format!("{name}-key.pem")), &issued.key).unwrap();
}

/// A gateway whose listener "web" is https with the certificate pairs `names` (each written
/// by the caller as `<name>.pem` and `<name>-key.pem` in `dir`, served for `hosts`), then
/// `extra` (client_auth, routes, services).
fn https_gateway(dir: tempfile::TempDir, certificates: &[(&str, &str)], extra: &str) -> Gateway {
    let (port, admin) = (free_port(), free_port());
    let mut config = format!(
        "[runtime]\nthreads = 2\n[admin]\nlisten = \"127.0.0.1:{admin}\"\n\
         [[listener]]\nname = \"web\"\nlisten = \"127.0.0.1:{port}\"\nprotocol = \"https\"\n"
    );
    for (name, hosts) in certificates {
        config.push_str(&format!(
            "  [[listener.certificate]]\n  hosts = [{hosts}]\n  cert = \"{name}.pem\"\n  key = \"{name}-key.pem\"\n"
        ));
    }
    config.push_str(extra);
    let path = dir.path().join("gateway.toml");
    fs::write(&path, config).unwrap();
    Gateway::start_on(dir, path, port, admin)
}

/// A CA, and a gateway serving its certificate for a.example that answers "hi" to everything.
fn hello_over_https() -> (TestCa, Gateway) {
    let ca = TestCa::new("weir test CA");
    let dir = tempfile::tempdir().unwrap();
    write_pair(dir.path(), "a", &ca.server(&["a.example"]));
    let hello = "[[route]]\nname = \"hello\"\ndirect_response = { status = 200, body = \"hi\" }\n";
    let gw = https_gateway(dir, &[("a", "\"a.example\"")], hello);
    (ca, gw)
}

#[test]
fn an_https_listener_serves_each_name_its_certificate() {
    let ca = TestCa::new("weir test CA");
    let up = Upstream::start("app");
    let dir = tempfile::tempdir().unwrap();
    write_pair(dir.path(), "a", &ca.server(&["a.example"]));
    write_pair(dir.path(), "b", &ca.server(&["*.b.example"]));
    let routes = format!(
        "{}[[route]]\nname = \"app\"\n  [[route.backend]]\n  service = \"app\"\n",
        up.service()
    );
    let certs = [("a", "\"a.example\""), ("b", "\"*.b.example\"")];
    let gw = https_gateway(dir, &certs, &routes);
    let ca_pem = ca.pem();

    // Without client certificates, a client's own x-forwarded-client-cert is dropped.
    let forged = [(
        "x-forwarded-client-cert",
        "URI=spiffe://mesh.local/ns/x/sa/admin",
    )];
    let a = https_get(gw.port, "a.example", &ca_pem, None, "/x", &forged).unwrap();
    assert_eq!((a.status, a.body.as_str()), (200, "app"));
    assert_eq!(a.served, ["a.example"]);
    assert_eq!(
        up.last_header("x-forwarded-proto").as_deref(),
        Some("https")
    );
    assert_eq!(up.last_header("x-forwarded-client-cert"), None);
    let b = https_get(gw.port, "api.b.example", &ca_pem, None, "/", &[]).unwrap();
    assert_eq!((b.status, b.served), (200, vec!["*.b.example".to_string()]));
    // A name no certificate has gets the first one, which the client refuses by name.
    let err = https_get(gw.port, "c.example", &ca_pem, None, "/", &[]).err();
    assert!(
        err.as_deref()
            .is_some_and(|e| e.contains("not valid for name")),
        "{err:?}"
    );
    // Plain HTTP on the https port gets no answer.
    let plain = raw_request(gw.port, b"GET / HTTP/1.1\r\nHost: a.example\r\n\r\n");
    assert!(!plain.contains("HTTP/1.1"), "{plain:?}");

    // Each certificate's expiry is a metric; /config shows it, and never the key.
    let cert = gw.config.parent().unwrap().join("a.pem");
    let series = format!(
        "weir_tls_cert_expiry_timestamp_seconds{{cert=\"{}\"}}",
        cert.display()
    );
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap();
    assert!(gw.metric(&series) > now.as_secs_f64(), "{series}");
    let status = gw.status().to_string();
    assert!(status.contains("not_after"), "{status}");
    assert!(
        !status.contains("PRIVATE KEY") && !status.contains("BEGIN"),
        "{status}"
    );
}

#[test]
fn a_rotated_certificate_is_served_without_a_restart() {
    let (ca, gw) = hello_over_https();
    let ca_pem = ca.pem();
    let served = || https_get(gw.port, "a.example", &ca_pem, None, "/", &[]).map(|r| r.served);
    assert_eq!(served().unwrap(), ["a.example"]);

    // cert-manager, or an operator, writes a new pair over the old one.
    let dir = gw.config.parent().unwrap().to_path_buf();
    write_pair(&dir, "a", &ca.server(&["a.example", "rotated.example"]));
    wait_until("the new certificate", Duration::from_secs(5), || {
        served().is_ok_and(|names| names.contains(&"rotated.example".to_string()))
    });
    assert_eq!(gw.generation(), 2);

    // A key that is not the certificate's is refused with its place, and the last good pair
    // keeps serving.
    fs::write(dir.join("a-key.pem"), ca.server(&["other"]).key).unwrap();
    wait_until("last_error", Duration::from_secs(5), || {
        !gw.status()["last_error"].is_null()
    });
    let status = gw.status();
    let error = status["last_error"].as_str().unwrap();
    // Line 11 is the pair's `cert = "a.pem"`.
    assert!(
        error.contains("gateway.toml:11: listener \"web\" certificate[0]"),
        "{error}"
    );
    assert!(
        error.contains("the private key is not the certificate's"),
        "{error}"
    );
    assert_eq!(status["generation"], 2);
    assert!(served().unwrap().contains(&"rotated.example".to_string()));
}

/// Two https listeners declared the other way round: the same listeners, so the reload
/// applies, and each serves its own certificate on (they are served by their place in the
/// list, which the reload keeps).
#[test]
fn listeners_declared_in_another_order_reload_and_keep_their_certificates() {
    let ca = TestCa::new("weir test CA");
    let dir = tempfile::tempdir().unwrap();
    write_pair(dir.path(), "a", &ca.server(&["a.example"]));
    write_pair(dir.path(), "b", &ca.server(&["b.example"]));
    let (port_a, port_b, admin) = (free_port(), free_port(), free_port());
    let listener = |name: &str, port: u16| {
        format!(
            "[[listener]]\nname = \"{name}\"\nlisten = \"127.0.0.1:{port}\"\nprotocol = \"https\"\n\
             \x20 [[listener.certificate]]\n  cert = \"{name}.pem\"\n  key = \"{name}-key.pem\"\n"
        )
    };
    let config = |first: &str, second: &str, body: &str| {
        format!(
            "[runtime]\nthreads = 2\n[admin]\nlisten = \"127.0.0.1:{admin}\"\n{first}{second}\
             [[route]]\nname = \"hello\"\ndirect_response = {{ status = 200, body = \"{body}\" }}\n"
        )
    };
    let (a, b) = (listener("a", port_a), listener("b", port_b));
    let path = dir.path().join("gateway.toml");
    fs::write(&path, config(&a, &b, "one")).unwrap();
    let gw = Gateway::start_on(dir, path, port_a, admin);
    let ca_pem = ca.pem();
    let get = |port, name| https_get(port, name, &ca_pem, None, "/", &[]).unwrap();
    assert_eq!(get(port_b, "b.example").served, ["b.example"]);

    let tmp = gw.config.with_extension("tmp");
    fs::write(&tmp, config(&b, &a, "two")).unwrap();
    fs::rename(&tmp, &gw.config).unwrap();
    wait_until("the reload", Duration::from_secs(10), || {
        gw.generation() == 2
    });
    assert!(gw.status()["last_error"].is_null(), "{}", gw.status());
    for (port, name) in [(port_a, "a.example"), (port_b, "b.example")] {
        let reply = get(port, name);
        assert_eq!(
            (reply.served, reply.body.as_str()),
            (vec![name.to_string()], "two")
        );
    }
}

/// A resumed TLS session skips the client certificate's check, so a session from before a
/// reload that turned `client_auth` on must not resume after it.
#[test]
fn a_session_from_before_client_auth_does_not_get_past_it() {
    let (ca, gw) = hello_over_https();
    let client = TlsClient::new(&ca.pem(), None);
    assert_eq!(client.get(gw.port, "a.example", "/").unwrap().status, 200);
    // Sessions resume while nothing changed, so the check below can fail.
    assert!(client.get(gw.port, "a.example", "/").unwrap().resumed);

    let config = fs::read_to_string(&gw.config).unwrap();
    let dir = gw.config.parent().unwrap();
    fs::write(dir.join("ca.pem"), ca.pem()).unwrap();
    let with_auth = config.replace(
        "[[route]]",
        "  [listener.client_auth]\n  ca = \"ca.pem\"\n[[route]]",
    );
    fs::write(&gw.config, with_auth).unwrap();
    wait_until("client_auth on", Duration::from_secs(5), || {
        gw.generation() == 2
    });
    let refused = client.get(gw.port, "a.example", "/");
    assert!(
        refused.is_err(),
        "{:?}",
        refused.map(|r| (r.status, r.resumed))
    );
    // A client with a certificate gets in, and then resumes too.
    let issued = ca.client("frontend", &["spiffe://mesh.local/ns/web/sa/frontend"]);
    let client = TlsClient::new(&ca.pem(), Some(&issued));
    assert_eq!(client.get(gw.port, "a.example", "/").unwrap().status, 200);
    assert!(client.get(gw.port, "a.example", "/").unwrap().resumed);
}

#[test]
fn client_certificates_are_required_verified_and_forwarded() {
    let ca = TestCa::new("weir test CA");
    let clients = TestCa::new("clients CA");
    let stranger = TestCa::new("someone else's CA");
    let up = Upstream::start("app");
    let dir = tempfile::tempdir().unwrap();
    write_pair(dir.path(), "a", &ca.server(&["a.example"]));
    fs::write(dir.path().join("clients.pem"), clients.pem()).unwrap();
    let config = format!(
        "  [listener.client_auth]\n  ca = \"clients.pem\"\n{}\
         [[route]]\nname = \"app\"\n  [[route.backend]]\n  service = \"app\"\n",
        up.service()
    );
    let gw = https_gateway(dir, &[("a", "\"a.example\"")], &config);
    let ca_pem = ca.pem();
    let id = "spiffe://mesh.local/ns/web/sa/frontend";
    let get = |client: Option<&Issued>, headers: &[(&str, &str)]| {
        https_get(gw.port, "a.example", &ca_pem, client, "/", headers)
    };

    let none = get(None, &[]);
    assert!(
        none.is_err(),
        "no client certificate: {:?}",
        none.map(|r| r.status)
    );
    let foreign = get(Some(&stranger.client("intruder", &[id])), &[]);
    assert!(
        foreign.is_err(),
        "a foreign CA's client: {:?}",
        foreign.map(|r| r.status)
    );
    assert_eq!(up.hits(), 0);

    let client = clients.client("frontend", &[id]);
    let forged = [(
        "x-forwarded-client-cert",
        "URI=spiffe://mesh.local/ns/x/sa/admin",
    )];
    let reply = get(Some(&client), &forged).unwrap();
    assert_eq!((reply.status, reply.body.as_str()), (200, "app"));
    let xfcc = up.last_header("x-forwarded-client-cert").unwrap();
    assert!(xfcc.starts_with("Hash="), "{xfcc}");
    assert!(xfcc.contains("Subject=\"CN=frontend\""), "{xfcc}");
    assert!(xfcc.ends_with(&format!(";URI={id}")), "{xfcc}");
    assert!(
        !xfcc.contains("sa/admin"),
        "the client's own header went through: {xfcc}"
    );
    wait_until("the access log line", Duration::from_secs(5), || {
        gw.access_log().iter().any(|l| l["peer"] == id)
    });
}

#[test]
fn services_are_reached_over_tls_with_a_client_certificate_and_health_checks() {
    let upstream_ca = TestCa::new("upstreams CA");
    let gateway_ca = TestCa::new("gateway clients CA");
    let id = "spiffe://mesh.local/ns/edge/sa/gateway";
    let secure = TlsUpstream::start(
        "secure",
        &upstream_ca.server(&["app.internal"]),
        Some(&gateway_ca.pem()),
    );
    let files = tempfile::tempdir().unwrap();
    let file = |name: &str, text: &str| {
        let path = files.path().join(name);
        fs::write(&path, text).unwrap();
        path.display().to_string()
    };
    let ca = file("upstreams.pem", &upstream_ca.pem());
    let other_ca = file("other.pem", &TestCa::new("not the upstreams' CA").pem());
    let client = gateway_ca.client("gateway", &[id]);
    let (cert, key) = (
        file("gw.pem", &client.cert),
        file("gw-key.pem", &client.key),
    );
    let service = |name: &str, tls: &str| {
        format!(
            "[[service]]\nname = \"{name}\"\nendpoints = [\"{}\"]\n  [service.tls]\n{tls}",
            secure.addr
        )
    };
    let route = |name: &str| {
        format!(
            "[[route]]\nname = \"{name}\"\n  [[route.match]]\n  path = {{ prefix = \"/{name}\" }}\n  [[route.backend]]\n  service = \"{name}\"\n"
        )
    };
    let mutual = format!(
        "  mode = \"mutual\"\n  ca = \"{ca}\"\n  cert = \"{cert}\"\n  key = \"{key}\"\n  sni = \"app.internal\"\n"
    );
    let config = [
        service("mutual", &mutual),
        "  [service.health_check]\n  path = \"/healthz\"\n  interval = \"100ms\"\n".into(),
        service("wrong-ca", &format!("  ca = \"{other_ca}\"\n  cert = \"{cert}\"\n  key = \"{key}\"\n  mode = \"mutual\"\n  sni = \"app.internal\"\n")),
        service("wrong-name", &mutual.replace("app.internal", "db.internal")),
        route("mutual"),
        route("wrong-ca"),
        route("wrong-name"),
    ]
    .concat();
    let gw = Gateway::start(&config);

    // Health checks speak TLS with the client certificate too: the upstream counts requests
    // only after a full handshake, and none has been sent yet.
    wait_until("TLS health checks", Duration::from_secs(5), || {
        secure.hits() >= 3
    });
    assert_eq!(secure.last_header("host").as_deref(), Some("app.internal"));

    let reply = gw.get("/mutual", &[]);
    assert_eq!((reply.status, reply.body.as_str()), (200, "secure"));
    let peer = secure
        .last_peer()
        .expect("the gateway's client certificate");
    assert_eq!(peer.uris, [id]);
    assert_eq!(
        secure.last_header("x-forwarded-proto").as_deref(),
        Some("http")
    );

    // A new client certificate, written where the config points (outside its directory), is
    // presented on new connections without a restart.
    let renewed = "spiffe://mesh.local/ns/edge/sa/gateway-renewed";
    let client = gateway_ca.client("gateway", &[renewed]);
    fs::write(&key, &client.key).unwrap();
    fs::write(&cert, &client.cert).unwrap();
    wait_until(
        "the renewed client certificate",
        Duration::from_secs(5),
        || {
            gw.get("/mutual", &[]).status == 200
                && secure.last_peer().is_some_and(|p| p.uris == [renewed])
        },
    );

    // A server the CA does not vouch for, or with another name, is never sent the request.
    for path in ["/wrong-ca", "/wrong-name"] {
        let reply = gw.get(path, &[]);
        assert_eq!(reply.status, 503, "{path}: {}", reply.body);
    }
    let refused = || {
        let log = gw.access_log();
        let lines = log.iter().filter(|l| l["route"] != "mutual");
        lines
            .map(|l| l["flags"].as_str().unwrap().to_string())
            .collect::<Vec<_>>()
    };
    wait_until(
        "the refused requests' log lines",
        Duration::from_secs(5),
        || refused().len() == 2,
    );
    let flags = refused();
    assert!(flags.iter().all(|f| f.contains("UF")), "{flags:?}");

    // Mirror copies to a TLS service go over TLS, with the client certificate.
    let shadow = TlsUpstream::start(
        "shadow",
        &upstream_ca.server(&["app.internal"]),
        Some(&gateway_ca.pem()),
    );
    let app = Upstream::start("app");
    let shadow_service = format!(
        "[[service]]\nname = \"shadow\"\nendpoints = [\"{}\"]\n  [service.tls]\n{mutual}",
        shadow.addr
    );
    let mirrored = format!(
        "{config}{}{shadow_service}[[route]]\nname = \"mirrored\"\n  [[route.match]]\n  path = {{ prefix = \"/mirrored\" }}\n  [[route.backend]]\n  service = \"app\"\n  [route.mirror]\n  service = \"shadow\"\n",
        app.service()
    );
    gw.write_config(&mirrored);
    wait_until("the mirrored route", Duration::from_secs(5), || {
        gw.get("/mirrored", &[]).body == "app"
    });
    wait_until("the copy over TLS", Duration::from_secs(5), || {
        shadow.hits() >= 1
    });
    assert_eq!(
        shadow.last_header("host").as_deref(),
        Some(format!("127.0.0.1-shadow:{}", gw.port).as_str())
    );
    assert_eq!(
        shadow.last_peer().map(|p| p.uris),
        Some(vec![renewed.to_string()])
    );
}

#[test]
fn an_upgrade_serves_the_https_listener_on() {
    let (ca, mut old) = hello_over_https();
    let ca_pem = ca.pem();
    let new = old.upgrade();
    old.wait_exit(Duration::from_secs(20))
        .expect("the old gateway exits");
    // The socket the old process bound now does TLS in the new one.
    let reply = https_get(new.port, "a.example", &ca_pem, None, "/", &[]).unwrap();
    assert_eq!((reply.status, reply.body.as_str()), (200, "hi"));
    assert_eq!(reply.served, ["a.example"]);
}

/// examples/tls as its README runs it (on free ports), with its committed certificates.
#[test]
fn the_tls_example_works_as_its_readme_says() {
    let example = weir_tests::repo_root().join("examples/tls");
    let dir = tempfile::tempdir().unwrap();
    weir_tests::copy_certs(&example, dir.path());
    let (plain, public, internal, admin) = (free_port(), free_port(), free_port(), free_port());
    let config = fs::read_to_string(example.join("gateway.toml"))
        .unwrap()
        .replace(":8080", &format!(":{plain}"))
        .replace("localhost:8443\"", &format!("localhost:{public}\""))
        .replace(":8443", &format!(":{public}"))
        .replace(":8444", &format!(":{internal}"))
        .replace(":9901", &format!(":{admin}"));
    let path = dir.path().join("gateway.toml");
    fs::write(&path, config).unwrap();
    let read = |name: &str| fs::read_to_string(example.join("certs").join(name)).unwrap();
    let ca = read("ca.pem");
    let client = Issued {
        cert: read("client.pem"),
        key: read("client-key.pem"),
    };
    let gw = Gateway::start_on(dir, path, plain, admin);

    let redirect = raw_request(
        plain,
        b"GET /x HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n",
    );
    assert!(
        redirect.starts_with("HTTP/1.1 301")
            && redirect.contains(&format!("https://localhost:{public}/x")),
        "{redirect}"
    );
    let hello = https_get(public, "localhost", &ca, None, "/", &[]).unwrap();
    assert_eq!(hello.body, "hello over TLS\n");
    assert!(https_get(internal, "localhost", &ca, None, "/", &[]).is_err());
    let verified = https_get(internal, "localhost", &ca, Some(&client), "/", &[]).unwrap();
    assert_eq!(verified.body, "hello, verified client\n");
    wait_until("the access log's peer", Duration::from_secs(5), || {
        gw.access_log()
            .iter()
            .any(|l| l["peer"] == "spiffe://example.local/ns/demo/sa/curl")
    });
}

/// `proxy_protocol = true` on an https listener: the load balancer's header comes before the
/// TLS handshake, and its source is the client; a connection without one is closed.
#[test]
fn a_proxy_protocol_header_comes_before_the_tls_handshake() {
    let ca = TestCa::new("weir test CA");
    let dir = tempfile::tempdir().unwrap();
    write_pair(dir.path(), "a", &ca.server(&["a.example"]));
    let (port, admin) = (free_port(), free_port());
    let config = format!(
        "[runtime]\nthreads = 2\n[admin]\nlisten = \"127.0.0.1:{admin}\"\n\
         [[listener]]\nname = \"web\"\nlisten = \"127.0.0.1:{port}\"\nprotocol = \"https\"\nproxy_protocol = true\n\
         \x20 [[listener.certificate]]\n  cert = \"a.pem\"\n  key = \"a-key.pem\"\n\
         [[route]]\nname = \"hello\"\ndirect_response = {{ status = 200, body = \"hi\" }}\n"
    );
    let path = dir.path().join("gateway.toml");
    fs::write(&path, config).unwrap();
    let gw = Gateway::start_on(dir, path, port, admin);
    let header = b"PROXY TCP4 203.0.113.7 10.0.0.1 56324 443\r\n";
    let reply = https_get_after(header, port, "a.example", &ca.pem(), "/").unwrap();
    assert_eq!((reply.status, reply.body.as_str()), (200, "hi"));
    gw.wait_logged(1);
    assert_eq!(gw.access_log()[0]["client"], "203.0.113.7");
    assert!(https_get(port, "a.example", &ca.pem(), None, "/", &[]).is_err());
}
