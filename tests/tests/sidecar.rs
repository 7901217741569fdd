//! Two real `weir-sidecar`s in a mesh: productpage's calls reviews through its outbound
//! listener; the mesh mTLS handshake (workload certificates made at test time, SPIFFE ids
//! checked both ways) reaches reviews' inbound listener, which checks policy and forwards to
//! the app, a real HTTP server.
#![allow(clippy::unwrap_used)]

use std::fs;
use std::path::Path;
use std::time::Duration;

use weir_tests::otlp::Collector;
use weir_tests::tls::{mesh_get, Issued, TestCa};
use weir_tests::{
    free_port, raw_request, script, wait_until, Gateway, PythonServer, TcpRelay, Upstream,
};

const PRODUCTPAGE: &str = "spiffe://mesh.local/ns/default/sa/productpage";
const REVIEWS: &str = "spiffe://mesh.local/ns/default/sa/reviews";
const RATINGS: &str = "spiffe://mesh.local/ns/default/sa/ratings";

/// Reviews' policies: no secrets to anyone; productpage may read reviews.
const POLICIES: &str = "\
  [[inbound.policy]]
  name = \"no-secrets\"
  action = \"deny\"
  paths = [\"/reviews/secret\", \"/reviews/a%2Fb\"]
  [[inbound.policy]]
  name = \"no-deletes\"
  action = \"deny\"
  methods = [\"DELETE\"]
  [[inbound.policy]]
  name = \"productpage-reads\"
  action = \"allow\"
  principals = [\"spiffe://mesh.local/ns/default/sa/productpage\"]
  methods = [\"GET\"]
  paths = [\"/reviews/*\"]
";

/// A sidecar config: runtime, admin, the workload files, inbound and outbound.
fn sidecar_config(admin: u16, inbound: u16, app: &str, outbound: u16, extra: &str) -> String {
    format!(
        "[runtime]\nthreads = 2\n[admin]\nlisten = \"127.0.0.1:{admin}\"\n\
         [workload]\ncert = \"workload.pem\"\nkey = \"workload-key.pem\"\ntrust_bundle = \"bundle.pem\"\n\
         [outbound]\nlisten = \"127.0.0.1:{outbound}\"\n\
         [inbound]\nlisten = \"127.0.0.1:{inbound}\"\napp = \"{app}\"\n{extra}"
    )
}

fn write_workload(dir: &Path, ca: &TestCa, workload: &Issued) {
    fs::write(dir.join("bundle.pem"), ca.pem()).unwrap();
    fs::write(dir.join("workload.pem"), &workload.cert).unwrap();
    fs::write(dir.join("workload-key.pem"), &workload.key).unwrap();
}

/// The sidecar of `identity`, with `config(admin, outbound)`.
fn sidecar(ca: &TestCa, identity: &str, config: impl Fn(u16, u16) -> String) -> Gateway {
    let dir = tempfile::tempdir().unwrap();
    write_workload(dir.path(), ca, &ca.workload(identity));
    let (admin, outbound) = (free_port(), free_port());
    let path = dir.path().join("sidecar.toml");
    fs::write(&path, config(admin, outbound)).unwrap();
    Gateway::start_sidecar(dir, path, outbound, admin)
}

/// Productpage's outbound routes: "reviews" to reviews' inbound port with its identity, and
/// "impostor" to the same port expecting ratings' identity.
fn productpage_routes(reviews_inbound: u16) -> String {
    let mut routes = String::new();
    for (name, identity) in [("reviews", REVIEWS), ("impostor", RATINGS)] {
        routes.push_str(&format!(
            "[[route]]\nname = \"{name}\"\nhosts = [\"{name}\"]\n  [[route.backend]]\n  service = \"{name}\"\n\
             [[service]]\nname = \"{name}\"\nendpoints = [\"127.0.0.1:{reviews_inbound}\"]\n\
             \x20 [service.tls]\n  mode = \"mesh\"\n  identities = [\"{identity}\"]\n"
        ));
    }
    routes
}

#[test]
fn a_call_crosses_the_mesh_with_mtls_identity_and_policy() {
    let ca = TestCa::new("mesh CA");
    let app = Upstream::start("reviews-app");
    let inbound = free_port();
    let app_addr = app.addr.to_string();
    let reviews = sidecar(&ca, REVIEWS, |admin, outbound| {
        sidecar_config(admin, inbound, &app_addr, outbound, POLICIES)
    });
    let productpage = sidecar(&ca, PRODUCTPAGE, |admin, outbound| {
        let routes = productpage_routes(inbound);
        sidecar_config(admin, free_port(), "127.0.0.1:1", outbound, &routes)
    });

    // Each policy's series is there at 0 from the start, for `increase()` to see its first.
    let metrics = reviews.admin_get("/metrics").unwrap().body;
    for policy in ["no-secrets", "no-deletes", "no-allow-matched"] {
        let series = format!("weir_authz_denied_total{{policy=\"{policy}\"}} 0");
        assert!(metrics.contains(&series), "no {series:?}");
    }

    // The app's plain call, carried over mesh mTLS; the app learns who called.
    let reply = productpage.get("/reviews/1", &[("host", "reviews")]);
    assert_eq!(reply.status, 200, "{}", reply.body);
    assert_eq!(app.hits(), 1);
    let xfcc = app.last_header("x-forwarded-client-cert").unwrap();
    assert!(xfcc.contains(&format!(";URI={PRODUCTPAGE}")), "{xfcc}");
    // `By` names the sidecar that checked the certificate, as Istio's do.
    assert!(xfcc.starts_with(&format!("By={REVIEWS};Hash=")), "{xfcc}");
    assert_eq!(app.last_header("host").as_deref(), Some("reviews"));

    // Policy, at reviews: a deny policy first, then the allow policies' conditions.
    let denied = productpage.get("/reviews/secret", &[("host", "reviews")]);
    assert_eq!(
        (denied.status, denied.body.as_str()),
        (403, "RBAC: access denied\n")
    );
    let denied = productpage.get("/admin", &[("host", "reviews")]);
    assert_eq!(denied.status, 403);
    assert_eq!(app.hits(), 1, "a denied request reached the app");
    assert_eq!(
        reviews.metric("weir_authz_denied_total{policy=\"no-secrets\"}"),
        1.0
    );
    assert_eq!(
        reviews.metric("weir_authz_denied_total{policy=\"no-allow-matched\"}"),
        1.0
    );
    let logged = |proxy: &Gateway, lines: usize| {
        wait_until("the access log", Duration::from_secs(10), || {
            proxy.access_log().len() >= lines
        });
        proxy.access_log()
    };
    let log = logged(&reviews, 3);
    let flags: Vec<_> = log
        .iter()
        .map(|l| l["flags"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(flags, ["", "AD", "AD"]);
    assert_eq!(log[0]["peer"], PRODUCTPAGE);

    // A server whose identity is not the service's: the handshake fails, 503 UF, and the
    // retries (on connect failures by default) fail the same way.
    let impostor = productpage.get("/reviews/1", &[("host", "impostor")]);
    assert_eq!(impostor.status, 503, "{}", impostor.body);
    assert_eq!(app.hits(), 1);
    let last = logged(&productpage, 4).pop().unwrap();
    assert_eq!(
        (last["route"].as_str(), last["flags"].as_str()),
        (Some("impostor"), Some("UF,URX"))
    );

    // Metrics name each side.
    let series = |proxy: &str, route: &str, service: &str, code: u16| {
        format!("weir_requests_total{{code=\"{code}\",flags=\"\",proxy=\"{proxy}\",route=\"{route}\",service=\"{service}\"}}")
    };
    assert_eq!(
        productpage.metric(&series("outbound", "reviews", "reviews", 200)),
        1.0
    );
    assert_eq!(
        reviews.metric(&series("inbound", "inbound", "inbound", 200)),
        1.0
    );

    // Strict mTLS: plaintext, a foreign CA's certificate and no certificate are refused in the
    // handshake; a mesh peer the policies do not name gets 403.
    let plain = raw_request(inbound, b"GET /reviews/1 HTTP/1.1\r\nHost: reviews\r\n\r\n");
    assert!(!plain.starts_with("HTTP/1.1 2"), "{plain}");
    let foreign = TestCa::new("foreign CA").workload(PRODUCTPAGE);
    let err = mesh_get(inbound, Some(&foreign), "/reviews/1")
        .err()
        .unwrap();
    assert!(
        err.contains("UnknownCA") || err.contains("BadCertificate"),
        "{err}"
    );
    let err = mesh_get(inbound, None, "/reviews/1").err().unwrap();
    assert!(err.contains("CertificateRequired"), "{err}");
    // Each refusal counted, by why.
    let refused = |reason: &str| {
        reviews.metric(&format!(
            "weir_downstream_tls_handshake_failures_total{{listener=\"inbound\",reason=\"{reason}\"}}"
        ))
    };
    wait_until("the refusals counted", Duration::from_secs(5), || {
        refused("no_certificate") == 1.0
    });
    assert_eq!((refused("not_tls"), refused("bad_certificate")), (1.0, 1.0));
    let reply = mesh_get(inbound, Some(&ca.workload(RATINGS)), "/reviews/1").unwrap();
    assert_eq!(reply.status, 403);
    assert_eq!(reply.served_ids, [REVIEWS]);
    let reply = mesh_get(inbound, Some(&ca.workload(PRODUCTPAGE)), "/reviews/1").unwrap();
    assert_eq!(reply.status, 200);
    assert_eq!(app.hits(), 2);

    // A method in lower case is the same method to a deny policy (an app may take it so).
    let reply = raw_request(
        productpage.port,
        b"delete /reviews/1 HTTP/1.1\r\nHost: reviews\r\nConnection: close\r\n\r\n",
    );
    assert!(reply.starts_with("HTTP/1.1 403"), "{reply}");
    assert_eq!(app.hits(), 2);
    assert_eq!(
        reviews.metric("weir_authz_denied_total{policy=\"no-deletes\"}"),
        1.0
    );

    // An escape is one character whatever the case of its hex digits (RFC 3986 §6.2.2.1):
    // an app that decodes `%2f` must not be reached past a deny of `%2F`.
    let reply = mesh_get(inbound, Some(&ca.workload(PRODUCTPAGE)), "/reviews/a%2fb").unwrap();
    assert_eq!(reply.status, 403);
    assert_eq!(app.hits(), 2);
    assert_eq!(
        reviews.metric("weir_authz_denied_total{policy=\"no-secrets\"}"),
        2.0
    );
}

/// Mid-way through a CA rotation: reviews trusts only the new CA, productpage's certificate
/// is still the old one's. Reviews refuses it in the handshake, which TLS 1.3 tells the caller
/// only at its first read: still a connect failure (503 UF, retried, the reason logged), not
/// the 502 of an upstream that broke off its answer.
#[test]
fn a_server_refusing_the_callers_certificate_is_a_connect_failure() {
    let (old_ca, new_ca) = (TestCa::new("old mesh CA"), TestCa::new("new mesh CA"));
    let app = Upstream::start("reviews-app");
    let inbound = free_port();
    let app_addr = app.addr.to_string();
    let _reviews = sidecar(&new_ca, REVIEWS, |admin, outbound| {
        sidecar_config(admin, inbound, &app_addr, outbound, "")
    });
    let dir = tempfile::tempdir().unwrap();
    write_workload(dir.path(), &old_ca, &old_ca.workload(PRODUCTPAGE));
    fs::write(
        dir.path().join("bundle.pem"),
        format!("{}{}", old_ca.pem(), new_ca.pem()),
    )
    .unwrap();
    let (admin, outbound) = (free_port(), free_port());
    let path = dir.path().join("sidecar.toml");
    let routes = productpage_routes(inbound);
    fs::write(
        &path,
        sidecar_config(admin, free_port(), "127.0.0.1:1", outbound, &routes),
    )
    .unwrap();
    let productpage = Gateway::start_sidecar(dir, path, outbound, admin);

    let reply = productpage.get("/reviews/1?token=s3cr3t", &[("host", "reviews")]);
    assert_eq!(
        (reply.status, reply.body.as_str()),
        (503, "upstream connect error\n")
    );
    assert_eq!(app.hits(), 0);
    wait_until("the access log", Duration::from_secs(10), || {
        !productpage.access_log().is_empty()
    });
    let last = productpage.access_log().pop().unwrap();
    assert_eq!(last["flags"], "UF,URX");
    let stderr = productpage.stderr();
    // Each failed try is logged with its reason, and without the query string.
    assert!(stderr.contains("UnknownCA"), "{stderr}");
    let id = last["request_id"].as_str().unwrap();
    assert!(
        stderr.contains(&format!(
            "GET /reviews/1, Host: reviews, x-request-id: {id}"
        )),
        "{stderr}"
    );
    assert!(!stderr.contains("s3cr3t"), "{stderr}");
}

/// The mesh CA also vouches for another trust domain's workloads (a root shared between
/// meshes): neither side takes them unless `trust_domains` names it, and a certificate with no
/// SPIFFE id is refused too, as Istio's sidecars do.
#[test]
fn peers_of_another_trust_domain_are_refused_unless_named() {
    let ca = TestCa::new("shared root");
    let foreign = "spiffe://other.mesh/ns/default/sa/reviews";
    let app = Upstream::start("reviews-app");
    let inbound = free_port();
    let app_addr = app.addr.to_string();
    let reviews = sidecar(&ca, REVIEWS, |admin, outbound| {
        sidecar_config(admin, inbound, &app_addr, outbound, "")
    });
    // Inbound: refused in the handshake.
    let stranger = ca.workload("spiffe://other.mesh/ns/default/sa/productpage");
    let err = mesh_get(inbound, Some(&stranger), "/reviews/1")
        .err()
        .unwrap();
    assert!(err.contains("CertificateUnknown"), "{err}");
    let nameless = ca.client("productpage", &[]);
    assert!(mesh_get(inbound, Some(&nameless), "/reviews/1").is_err());
    assert_eq!(app.hits(), 0);
    // Named in trust_domains, it is a peer.
    let generation = reviews.generation();
    let text = fs::read_to_string(&reviews.config).unwrap().replace(
        "trust_bundle = \"bundle.pem\"\n",
        "trust_bundle = \"bundle.pem\"\ntrust_domains = [\"other.mesh\"]\n",
    );
    let tmp = reviews.config.with_extension("tmp");
    fs::write(&tmp, &text).unwrap();
    fs::rename(&tmp, &reviews.config).unwrap();
    wait_until("the reload", Duration::from_secs(10), || {
        reviews.generation() > generation
    });
    let caller = weir_tests::tls::MeshClient::new(Some(&stranger));
    assert_eq!(caller.get(inbound, "/reviews/1").unwrap().status, 200);
    // Its session resumes while nothing changed, and not once the domain is dropped: a
    // resumed session skips the certificate's check.
    assert!(caller.get(inbound, "/reviews/1").unwrap().resumed);
    let generation = reviews.generation();
    fs::write(&tmp, text.replace("trust_domains = [\"other.mesh\"]\n", "")).unwrap();
    fs::rename(&tmp, &reviews.config).unwrap();
    wait_until("the reload", Duration::from_secs(10), || {
        reviews.generation() > generation
    });
    let refused = caller.get(inbound, "/reviews/1");
    assert!(refused.is_err(), "{:?}", refused.map(|r| r.resumed));

    // Outbound: a service without identities takes only the trust domain's servers.
    let other_inbound = free_port();
    let _other = sidecar(&ca, foreign, |admin, outbound| {
        sidecar_config(admin, other_inbound, &app_addr, outbound, "")
    });
    let productpage = sidecar(&ca, PRODUCTPAGE, |admin, outbound| {
        let routes = format!(
            "[[route]]\nname = \"other\"\n  [[route.backend]]\n  service = \"other\"\n\
             [[service]]\nname = \"other\"\nendpoints = [\"127.0.0.1:{other_inbound}\"]\n\
             \x20 [service.tls]\n  mode = \"mesh\"\n"
        );
        sidecar_config(admin, free_port(), "127.0.0.1:1", outbound, &routes)
    });
    let reply = productpage.get("/reviews/1", &[]);
    assert_eq!(reply.status, 503, "{}", reply.body);
    assert!(
        productpage
            .stderr()
            .contains("not in the trust domains [\"mesh.local\"]"),
        "{}",
        productpage.stderr()
    );
    assert_eq!(app.hits(), 2);
}

#[test]
fn policies_and_the_workload_certificate_reload_without_a_restart() {
    let ca = TestCa::new("mesh CA");
    let app = Upstream::start("reviews-app");
    let inbound = free_port();
    let app_addr = app.addr.to_string();
    let config =
        |admin, outbound, extra: &str| sidecar_config(admin, inbound, &app_addr, outbound, extra);
    let reviews = sidecar(&ca, REVIEWS, |admin, outbound| {
        config(admin, outbound, POLICIES)
    });
    let productpage = sidecar(&ca, PRODUCTPAGE, |admin, outbound| {
        let routes = productpage_routes(inbound);
        sidecar_config(admin, free_port(), "127.0.0.1:1", outbound, &routes)
    });
    let get = |path| productpage.get(path, &[("host", "reviews")]).status;
    assert_eq!(get("/reviews/secret"), 403);

    // Dropping the deny policy applies at once, on the same connections.
    let generation = reviews.generation();
    let allow_only = &POLICIES[POLICIES
        .find("  [[inbound.policy]]\n  name = \"productpage-reads\"")
        .unwrap()..];
    let tmp = reviews.config.with_extension("tmp");
    fs::write(&tmp, config(reviews.admin, reviews.port, allow_only)).unwrap();
    fs::rename(&tmp, &reviews.config).unwrap();
    wait_until("the reload", Duration::from_secs(10), || {
        reviews.generation() > generation
    });
    assert_eq!(get("/reviews/secret"), 200);

    // A renewed workload certificate (same identity) is served to new connections.
    let generation = reviews.generation();
    let before = mesh_get(inbound, Some(&ca.workload(PRODUCTPAGE)), "/reviews/1").unwrap();
    write_workload(reviews.config.parent().unwrap(), &ca, &ca.workload(REVIEWS));
    wait_until("the rotation", Duration::from_secs(10), || {
        reviews.generation() > generation
    });
    let after = mesh_get(inbound, Some(&ca.workload(PRODUCTPAGE)), "/reviews/1").unwrap();
    assert_eq!((before.status, after.status), (200, 200));
    assert_eq!(after.served_ids, [REVIEWS]);
    assert_ne!(
        before.served_hash, after.served_hash,
        "the renewed certificate is not served"
    );
    assert_eq!(get("/reviews/2"), 200);
}

/// examples/mesh as its README runs it (on free ports), with its committed certificates.
#[test]
fn the_mesh_example_works_as_its_readme_says() {
    let example = weir_tests::repo_root().join("examples/mesh");
    let app = Upstream::start("reviews-app");
    let ports: Vec<(String, String)> = ["15000", "15001", "15006", "15100", "15101", "15106"]
        .iter()
        .map(|p| (format!(":{p}\""), format!(":{}\"", free_port())))
        .collect();
    let port = |example: &str| -> u16 {
        let (_, ours) = ports.iter().find(|(p, _)| p.contains(example)).unwrap();
        ours.trim_matches(|c| c == ':' || c == '"').parse().unwrap()
    };
    let start = |name: &str, outbound: &str, admin: &str| {
        let dir = tempfile::tempdir().unwrap();
        weir_tests::copy_certs(&example, dir.path());
        let mut config = fs::read_to_string(example.join(format!("{name}.toml"))).unwrap();
        for (theirs, ours) in &ports {
            config = config.replace(theirs, ours);
        }
        let config = config.replace("127.0.0.1:9081", &app.addr.to_string());
        let path = dir.path().join(format!("{name}.toml"));
        fs::write(&path, config).unwrap();
        Gateway::start_sidecar(dir, path, port(outbound), port(admin))
    };
    let reviews = start("reviews", "15101", "15100");
    let productpage = start("productpage", "15001", "15000");

    let host = [("host", "reviews")];
    assert_eq!(productpage.get("/reviews/1", &host).status, 200);
    assert_eq!(productpage.get("/reviews/admin/users", &host).status, 403);
    let post = weir_tests::send(
        &weir_tests::client(),
        "POST",
        &productpage.url("/reviews/1"),
        &host,
    );
    assert_eq!(post.unwrap().status, 403);
    assert_eq!(app.hits(), 1);
    let plain = raw_request(
        port("15106"),
        b"GET /reviews/1 HTTP/1.1\r\nHost: reviews\r\n\r\n",
    );
    assert!(!plain.starts_with("HTTP/1.1 2"), "{plain}");
    let read = |name: &str| fs::read_to_string(example.join("certs").join(name)).unwrap();
    let workload = Issued {
        cert: read("productpage.pem"),
        key: read("productpage-key.pem"),
    };
    let reply = mesh_get(port("15106"), Some(&workload), "/reviews/1").unwrap();
    assert_eq!(reply.status, 200);
    assert_eq!(
        reviews.metric("weir_authz_denied_total{policy=\"no-admin\"}"),
        1.0
    );

    let config = example.join("reviews.toml");
    let (code, stdout, stderr) = weir_tests::run(
        "weir-sidecar",
        &[
            "explain",
            "--config",
            config.to_str().unwrap(),
            "--listener",
            "inbound",
            "--peer",
            PRODUCTPAGE,
            "POST",
            "http://reviews/reviews/1",
        ],
    );
    assert_eq!(code, 0, "{stderr}");
    assert!(
        stdout.contains(&format!(
            "authz:    denied for {PRODUCTPAGE} by \"no-allow-matched\" -> 403, flag AD"
        )),
        "{stdout}"
    );
    // A caller of another trust domain never reaches the policies.
    let explain = |peer: &str| {
        let args = [
            "explain",
            "--config",
            config.to_str().unwrap(),
            "--listener",
            "inbound",
        ];
        let request = ["--peer", peer, "GET", "http://reviews/reviews/1"];
        weir_tests::run("weir-sidecar", &[&args[..], &request].concat())
    };
    let (code, stdout, _) = explain("spiffe://other.mesh/ns/default/sa/productpage");
    assert_eq!(code, 0);
    assert!(
        stdout.contains("authz:    refused in the TLS handshake: peer identity spiffe://other.mesh/ns/default/sa/productpage is not in the trust domains [\"mesh.local\"]"),
        "{stdout}"
    );
}

/// `mtls = "permissive"`: one port serves mesh mTLS and plaintext; only mesh callers have an
/// identity, so policies can keep plaintext callers to public paths.
#[test]
fn a_permissive_inbound_serves_mesh_and_plaintext_callers_on_one_port() {
    let ca = TestCa::new("mesh CA");
    let app = Upstream::start("reviews-app");
    let inbound = free_port();
    let app_addr = app.addr.to_string();
    let policies = "mtls = \"permissive\"\n\
        \x20 [[inbound.policy]]\n  action = \"allow\"\n  principals = [\"*\"]\n\
        \x20 [[inbound.policy]]\n  action = \"allow\"\n  paths = [\"/public/*\"]\n";
    let reviews = sidecar(&ca, REVIEWS, |admin, outbound| {
        sidecar_config(admin, inbound, &app_addr, outbound, policies)
    });
    let productpage = sidecar(&ca, PRODUCTPAGE, |admin, outbound| {
        let routes = productpage_routes(inbound);
        sidecar_config(admin, free_port(), "127.0.0.1:1", outbound, &routes)
    });

    // Plaintext: served, without an identity; two requests on one keep-alive connection.
    let agent = weir_tests::client();
    let plain = format!("http://127.0.0.1:{inbound}/public/1");
    for _ in 0..2 {
        let reply = weir_tests::send(&agent, "GET", &plain, &[]).unwrap();
        assert_eq!(reply.status, 200);
        assert_eq!(app.last_header("x-forwarded-client-cert"), None);
    }
    let private = format!("http://127.0.0.1:{inbound}/reviews/1");
    assert_eq!(
        weir_tests::send(&agent, "GET", &private, &[])
            .unwrap()
            .status,
        403
    );

    // Mesh mTLS on the same port: the caller is known.
    for _ in 0..2 {
        let reply = productpage.get("/reviews/1", &[("host", "reviews")]);
        assert_eq!(reply.status, 200, "{}", reply.body);
        let xfcc = app.last_header("x-forwarded-client-cert").unwrap();
        assert!(xfcc.contains(&format!(";URI={PRODUCTPAGE}")), "{xfcc}");
        // How the caller came in: productpage's app called its sidecar in plain HTTP, and
        // the mTLS hop after does not change that.
        let proto = app.last_header("x-forwarded-proto");
        assert_eq!(proto.as_deref(), Some("http"));
    }
    // The edge's word on how the client came is kept across the mesh.
    let edge = [("host", "reviews"), ("x-forwarded-proto", "https")];
    let reply = productpage.get("/reviews/1", &edge);
    assert_eq!(reply.status, 200, "{}", reply.body);
    let proto = app.last_header("x-forwarded-proto");
    assert_eq!(proto.as_deref(), Some("https"));
    // A foreign certificate is still refused in the handshake.
    let foreign = TestCa::new("foreign CA").workload(PRODUCTPAGE);
    assert!(mesh_get(inbound, Some(&foreign), "/public/1").is_err());
    assert_eq!(app.hits(), 5);
    let log = {
        wait_until("the access log", Duration::from_secs(10), || {
            reviews.access_log().len() >= 6
        });
        reviews.access_log()
    };
    let peers: Vec<_> = log
        .iter()
        .map(|l| l["peer"].as_str().unwrap_or("-").to_string())
        .collect();
    assert_eq!(
        peers,
        ["-", "-", "-", PRODUCTPAGE, PRODUCTPAGE, PRODUCTPAGE]
    );

    // A request no route can take is the inbound side's in the metrics too.
    let reply = raw_request(
        inbound,
        b"GET /public/1 HTTP/1.1\r\nConnection: close\r\n\r\n",
    );
    assert!(reply.starts_with("HTTP/1.1 400"), "{reply}");
    let series = |proxy| {
        format!("weir_requests_total{{code=\"400\",flags=\"\",proxy=\"{proxy}\",route=\"\",service=\"\"}}")
    };
    wait_until("the 400 counted", Duration::from_secs(10), || {
        reviews.metric(&series("inbound")) == 1.0
    });
    assert_eq!(reviews.metric(&series("outbound")), 0.0);
}

/// The gateway holds a `[workload]` too: it calls a sidecar with strict mTLS as a member of
/// the mesh, and the sidecar's policies name it.
#[test]
fn a_gateway_with_a_workload_calls_into_the_mesh() {
    const GATEWAY: &str = "spiffe://mesh.local/ns/istio-system/sa/gateway";
    let ca = TestCa::new("mesh CA");
    let app = Upstream::start("reviews-app");
    let inbound = free_port();
    let app_addr = app.addr.to_string();
    let policy = format!(
        "  [[inbound.policy]]\n  action = \"allow\"\n  principals = [\"{GATEWAY}\"]\n  paths = [\"/reviews/*\"]\n"
    );
    let _reviews = sidecar(&ca, REVIEWS, |admin, outbound| {
        sidecar_config(admin, inbound, &app_addr, outbound, &policy)
    });
    let dir = tempfile::tempdir().unwrap();
    write_workload(dir.path(), &ca, &ca.workload(GATEWAY));
    let (port, admin) = (free_port(), free_port());
    let config = format!(
        "{}[workload]\ncert = \"workload.pem\"\nkey = \"workload-key.pem\"\ntrust_bundle = \"bundle.pem\"\n\
         [[route]]\nname = \"reviews\"\n  [[route.backend]]\n  service = \"reviews\"\n\
         [[service]]\nname = \"reviews\"\nendpoints = [\"127.0.0.1:{inbound}\"]\n\
         \x20 [service.tls]\n  mode = \"mesh\"\n  identities = [\"{REVIEWS}\"]\n",
        Gateway::base(port, admin)
    );
    let path = dir.path().join("gateway.toml");
    fs::write(&path, config).unwrap();
    let gateway = Gateway::start_on(dir, path, port, admin);

    assert_eq!(gateway.get("/reviews/1", &[]).status, 200);
    let xfcc = app.last_header("x-forwarded-client-cert").unwrap();
    assert!(xfcc.contains(&format!(";URI={GATEWAY}")), "{xfcc}");
    assert_eq!(gateway.get("/admin", &[]).status, 403);
    assert_eq!(app.hits(), 1);
}

/// Mesh connections are pooled: sequential calls share one connection (plus the one
/// handshake that learns the server's certificate), not a handshake each.
#[test]
fn mesh_connections_are_kept_alive_and_reused() {
    let ca = TestCa::new("mesh CA");
    let app = Upstream::start("reviews-app");
    let inbound = free_port();
    let app_addr = app.addr.to_string();
    let _reviews = sidecar(&ca, REVIEWS, |admin, outbound| {
        sidecar_config(admin, inbound, &app_addr, outbound, "")
    });
    let relay = TcpRelay::start(([127, 0, 0, 1], inbound).into());
    let productpage = sidecar(&ca, PRODUCTPAGE, |admin, outbound| {
        let routes = productpage_routes(relay.port);
        sidecar_config(admin, free_port(), "127.0.0.1:1", outbound, &routes)
    });
    for i in 0..20 {
        let reply = productpage.get(&format!("/reviews/{i}"), &[("host", "reviews")]);
        assert_eq!(reply.status, 200, "{}", reply.body);
    }
    assert_eq!(app.hits(), 20);
    // One connection and one identity check; a third if a request ever starts before the
    // previous one's connection is back in the pool.
    let accepted = relay.accepted();
    assert!(
        (2..=3).contains(&accepted),
        "{accepted} connections for 20 calls"
    );
}

/// A service address in front of two servers of one identity, each with a certificate of its
/// own (a Kubernetes ClusterIP over two pods): the identity check's own handshake can reach the
/// other server than the connection did, and the call must pass all the same.
#[test]
fn an_address_in_front_of_several_servers_passes_the_identity_check() {
    let ca = TestCa::new("mesh CA");
    let app = Upstream::start("reviews-app");
    let app_addr = app.addr.to_string();
    let (first, second) = (free_port(), free_port());
    let _pods: Vec<Gateway> = [first, second]
        .into_iter()
        .map(|inbound| {
            sidecar(&ca, REVIEWS, |admin, outbound| {
                sidecar_config(admin, inbound, &app_addr, outbound, "")
            })
        })
        .collect();
    // Taken in turn, a connection and the check after it never reach the same server.
    let address = TcpRelay::round_robin(vec![
        ([127, 0, 0, 1], first).into(),
        ([127, 0, 0, 1], second).into(),
    ]);
    let productpage = sidecar(&ca, PRODUCTPAGE, |admin, outbound| {
        let routes = productpage_routes(address.port);
        sidecar_config(admin, free_port(), "127.0.0.1:1", outbound, &routes)
    });
    for i in 0..4 {
        let reply = productpage.get(&format!("/reviews/{i}"), &[("host", "reviews")]);
        assert_eq!(reply.status, 200, "{}", reply.body);
    }
    assert_eq!(app.hits(), 4);
}

/// A mesh service with `protocol = "http2"`: the hop between the sidecars is HTTP/2 over mesh
/// mTLS (ALPN h2), with the identity checked all the same.
#[test]
fn the_mesh_hop_can_be_http2() {
    let ca = TestCa::new("mesh CA");
    let app = Upstream::start("reviews-app");
    let inbound = free_port();
    let app_addr = app.addr.to_string();
    let reviews = sidecar(&ca, REVIEWS, |admin, outbound| {
        sidecar_config(admin, inbound, &app_addr, outbound, "")
    });
    let productpage = sidecar(&ca, PRODUCTPAGE, |admin, outbound| {
        let routes = productpage_routes(inbound)
            .replace("endpoints = [", "protocol = \"http2\"\nendpoints = [");
        sidecar_config(admin, free_port(), "127.0.0.1:1", outbound, &routes)
    });
    let reply = productpage.get("/reviews/1", &[("host", "reviews")]);
    assert_eq!(reply.status, 200, "{}", reply.body);
    let xfcc = app.last_header("x-forwarded-client-cert").unwrap();
    assert!(xfcc.contains(&format!(";URI={PRODUCTPAGE}")), "{xfcc}");
    assert_eq!(
        productpage
            .get("/reviews/1", &[("host", "impostor")])
            .status,
        503
    );
    let log = {
        wait_until("the access log", Duration::from_secs(10), || {
            reviews.access_log().len() == 1
        });
        reviews.access_log()
    };
    assert_eq!(log[0]["protocol"], "HTTP/2", "{}", log[0]);
}

/// One trace across the mesh: productpage's outbound span (a client span) is the parent of
/// reviews' inbound span (a server span, which names the caller's identity), and that is the
/// parent the app sees in `traceparent`.
#[test]
fn a_trace_follows_the_call_across_the_mesh() {
    let collector = Collector::start();
    let tracing = |name: &str| {
        format!(
            "[telemetry.tracing]\notlp_endpoint = \"http://127.0.0.1:{}\"\nservice_name = \"{name}\"\n",
            collector.http_port
        )
    };
    let ca = TestCa::new("mesh CA");
    let app = Upstream::start("reviews-app");
    let inbound = free_port();
    let app_addr = app.addr.to_string();
    let _reviews = sidecar(&ca, REVIEWS, |admin, outbound| {
        let extra = format!("{POLICIES}{}", tracing("reviews"));
        sidecar_config(admin, inbound, &app_addr, outbound, &extra)
    });
    let productpage = sidecar(&ca, PRODUCTPAGE, |admin, outbound| {
        let extra = format!("{}{}", productpage_routes(inbound), tracing("productpage"));
        sidecar_config(admin, free_port(), "127.0.0.1:1", outbound, &extra)
    });

    let reply = productpage.get("/reviews/1", &[("host", "reviews")]);
    assert_eq!(reply.status, 200, "{}", reply.body);
    let traceparent = app.last_header("traceparent").unwrap();
    let parts: Vec<&str> = traceparent.split('-').collect();
    let (trace, parent) = (parts[1], parts[2]);
    let server = collector.wait_for_span("reviews' span", |s| s.service_name == "reviews");
    let client = collector.wait_for_span("productpage's span", |s| s.service_name == "productpage");
    assert_eq!(
        (client.trace_id.as_str(), server.trace_id.as_str()),
        (trace, trace)
    );
    assert_eq!(
        client.parent_span_id, "",
        "the trace starts at productpage's sidecar"
    );
    assert_eq!(server.parent_span_id, client.span_id);
    assert_eq!(server.span_id, parent);
    assert_eq!((client.kind, server.kind), (3, 2), "client, then server");
    assert_eq!(client.name, "GET reviews");
    assert_eq!(client.attribute("weir.listener"), Some("outbound"));
    assert_eq!(server.name, "GET inbound");
    assert_eq!(server.attribute("weir.listener"), Some("inbound"));
    assert_eq!(server.attribute("weir.peer"), Some(PRODUCTPAGE));
    assert_eq!(server.attribute("weir.upstream"), Some(app_addr.as_str()));
}

/// gRPC across the mesh: a real gRPC client sends plaintext HTTP/2 (h2c) to its sidecar's
/// outbound listener, the mesh hop is HTTP/2 over mutual TLS, and the other sidecar speaks
/// h2c to a real gRPC server (`app_protocol = "http2"`). The status and message of a failed
/// call come back in the trailers.
#[test]
fn grpc_crosses_the_mesh() {
    let server = PythonServer::start(&[&script("tests/grpc/echo.py"), "serve"]);
    let ca = TestCa::new("mesh CA");
    let inbound = free_port();
    let _reviews = sidecar(&ca, REVIEWS, |admin, outbound| {
        let app = format!("127.0.0.1:{}", server.port);
        let extra = "app_protocol = \"http2\"\n";
        sidecar_config(admin, inbound, &app, outbound, extra)
    });
    let productpage = sidecar(&ca, PRODUCTPAGE, |admin, outbound| {
        let routes = format!(
            "[[route]]\nname = \"echo\"\nhosts = [\"echo\"]\n  [[route.backend]]\n  service = \"echo\"\n\
             [[service]]\nname = \"echo\"\nendpoints = [\"127.0.0.1:{inbound}\"]\nprotocol = \"http2\"\n\
             \x20 [service.tls]\n  mode = \"mesh\"\n  identities = [\"{REVIEWS}\"]\n"
        );
        sidecar_config(admin, free_port(), "127.0.0.1:1", outbound, &routes)
    });
    weir_tests::assert_grpc_h2c_calls(productpage.port, "echo");
    wait_until("two access log lines", Duration::from_secs(10), || {
        productpage.access_log().len() == 2
    });
    let log = productpage.access_log();
    assert_eq!(log[0]["protocol"], "HTTP/2", "{}", log[0]);
}
