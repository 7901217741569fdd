//! `validate` and `explain`, and every shipped config.
#![allow(clippy::unwrap_used)]

use std::fs;
use std::path::Path;

use weir_tests::{repo_root, run};

#[test]
fn validate_reports_every_error_with_file_and_line() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("gw.toml");
    fs::write(
        &path,
        "[[service]]\nname = \"payments\"\nendpoints = [\"127.0.0.1:9\"]\n\
         [[route]]\nname = \"web\"\ntimeoutt = \"5s\"\n  [[route.backend]]\n  service = \"paymnts\"\n",
    )
    .unwrap();
    let (code, stdout, stderr) = run(
        "weir-gateway",
        &["validate", "--config", path.to_str().unwrap()],
    );
    assert_eq!(code, 1, "{stdout}{stderr}");
    let file = path.display();
    assert!(
        stderr.contains(&format!(
            "{file}:6: route \"web\": unknown key \"timeoutt\""
        )),
        "{stderr}"
    );
    assert!(
        stderr.contains(&format!(
            "{file}:8: route \"web\" backend[0]: unknown service \"paymnts\""
        )),
        "{stderr}"
    );
    assert!(stderr.contains("2 error(s)"), "{stderr}");
}

#[test]
fn validate_accepts_a_good_config() {
    let path = repo_root().join("config/gateway.toml");
    let (code, stdout, stderr) = run(
        "weir-gateway",
        &["validate", "--config", path.to_str().unwrap()],
    );
    assert_eq!(code, 0, "{stderr}");
    assert!(stdout.contains(": ok ("), "{stdout}");
    // One a start would refuse, `validate` refuses too, naming the file.
    let dir = tempfile::tempdir().unwrap();
    let bare = dir.path().join("gw.toml");
    std::fs::write(&bare, "[admin]\nlisten = \"127.0.0.1:9901\"\n").unwrap();
    for args in [&["validate", "--config"][..], &["--config"]] {
        let args = [args, &[bare.to_str().unwrap()]].concat();
        let (code, _, stderr) = run("weir-gateway", &args);
        assert_eq!(code, 1, "{args:?}: {stderr}");
        let said = format!("{}: the config has no [[listener]]", bare.display());
        assert!(stderr.contains(&said), "{args:?}: {stderr}");
    }
}

#[test]
fn explain_names_the_winner_the_losers_and_the_split() {
    let path = repo_root().join("config/gateway.toml");
    let args = [
        "explain",
        "--config",
        path.to_str().unwrap(),
        "GET",
        "http://localhost:8080/shop",
        "-H",
        "x-version: v2",
    ];
    let (code, stdout, stderr) = run("weir-gateway", &args);
    assert_eq!(code, 0, "{stderr}");
    assert!(stdout.contains("route:    \"demo-v2-testers\""), "{stdout}");
    assert!(stdout.contains("demo-v2  weight 1  (100.0%)"), "{stdout}");
    assert!(
        stdout.contains("no match  \"hello\" match[0]: path \"/shop\" is not \"/hello\""),
        "{stdout}"
    );
    assert!(stdout.contains("shadowed  \"demo\" match[0]"), "{stdout}");

    let args = [
        "explain",
        "--config",
        path.to_str().unwrap(),
        "GET",
        "http://localhost:8080/shop",
    ];
    let (_, stdout, _) = run("weir-gateway", &args);
    assert!(stdout.contains("route:    \"demo\""), "{stdout}");
    assert!(stdout.contains("demo-v1  weight 90  (90.0%)"), "{stdout}");
    assert!(
        stdout.contains("no match  \"demo-v2-testers\" match[0]: header x-version: absent"),
        "{stdout}"
    );
}

#[test]
fn explain_shows_the_mirror_and_faults_that_would_apply() {
    let config = repo_root().join("examples/mirroring/gateway.toml");
    let args = [
        "explain",
        "--config",
        config.to_str().unwrap(),
        "GET",
        "http://localhost:8080/",
    ];
    let (code, stdout, stderr) = run("weir-gateway", &args);
    assert_eq!(code, 0, "{stderr}");
    assert!(
        stdout.contains("mirror:   100% of requests copied to service \"shop-v2\""),
        "{stdout}"
    );
    let config = repo_root().join("examples/fault-injection/gateway.toml");
    let args = [
        "explain",
        "--config",
        config.to_str().unwrap(),
        "GET",
        "http://localhost:8080/",
        "-H",
        "x-chaos: on",
    ];
    let (_, stdout, _) = run("weir-gateway", &args);
    assert!(
        stdout.contains("fault:    delay 2s for 50% of requests (flag FI)"),
        "{stdout}"
    );
    assert!(
        stdout.contains("fault:    abort with 503 for 10% of requests (flag FI)"),
        "{stdout}"
    );
    assert!(
        stdout.contains("response header: set x-chaos: applied"),
        "{stdout}"
    );
}

#[test]
fn explain_says_how_tls_and_http2_reach_a_service() {
    let dir = tempfile::tempdir().unwrap();
    let ca = weir_tests::tls::TestCa::new("upstreams CA");
    let client = ca.client("gateway", &[]);
    fs::write(dir.path().join("ca.pem"), ca.pem()).unwrap();
    fs::write(dir.path().join("gw.pem"), &client.cert).unwrap();
    fs::write(dir.path().join("gw-key.pem"), &client.key).unwrap();
    let path = dir.path().join("gw.toml");
    fs::write(
        &path,
        "[[listener]]\nname = \"web\"\nlisten = \"127.0.0.1:8080\"\n\
         [[service]]\nname = \"payments\"\nendpoints = [\"10.0.3.7:8443\"]\nprotocol = \"http2\"\n  [service.tls]\n  \
         mode = \"mutual\"\n  ca = \"ca.pem\"\n  cert = \"gw.pem\"\n  key = \"gw-key.pem\"\n  sni = \"payments.internal\"\n\
         [[route]]\nname = \"pay\"\n  [[route.backend]]\n  service = \"payments\"\n",
    )
    .unwrap();
    let args = [
        "explain",
        "--config",
        path.to_str().unwrap(),
        "GET",
        "http://x/",
    ];
    let (code, stdout, stderr) = run("weir-gateway", &args);
    assert_eq!(code, 0, "{stderr}");
    let ca_path = dir.path().join("ca.pem");
    let expected = format!(
        "round robin over 10.0.3.7:8443, HTTP/2; mutual TLS to payments.internal (CA {})",
        ca_path.display()
    );
    assert!(stdout.contains(&expected), "{stdout}");
}

#[test]
fn explain_says_when_nothing_matches() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("gw.toml");
    fs::write(
        &path,
        "[[listener]]\nname = \"web\"\nlisten = \"127.0.0.1:8080\"\n\
         [[route]]\nname = \"api\"\nhosts = [\"api.example.com\"]\ndirect_response = { status = 200 }\n",
    )
    .unwrap();
    let args = [
        "explain",
        "--config",
        path.to_str().unwrap(),
        "POST",
        "http://www.example.com/",
    ];
    let (code, stdout, _) = run("weir-gateway", &args);
    assert_eq!(code, 0);
    assert!(
        stdout.contains("route:    none -> 404, flag NR"),
        "{stdout}"
    );
    assert!(
        stdout.contains(
            "no match  \"api\": host \"www.example.com\" is not one of [\"api.example.com\"]"
        ),
        "{stdout}"
    );
    // The URL's host is the Host header a match sees, as the proxy sees an HTTP/2 request's
    // `:authority` (and an HTTP/1.1 client sends it).
    fs::write(
        &path,
        "[[listener]]\nname = \"web\"\nlisten = \"127.0.0.1:8080\"\n\
         [[route]]\nname = \"h1\"\ndirect_response = { status = 200 }\n\
         \x20 [[route.match]]\n  headers = { host = { regex = \"h[0-9]+\\\\.example\" } }\n",
    )
    .unwrap();
    let h1 = [&args[..4], &["http://h1.example/"]].concat();
    let (code, stdout, stderr) = run("weir-gateway", &h1);
    assert_eq!(code, 0, "{stderr}");
    assert!(stdout.contains("route:    \"h1\""), "{stdout}");
    // Neither a URL nor a path (a forgotten scheme): said, not routed as host "www.example.com".
    let args = [&args[..4], &["www.example.com"]].concat();
    let (code, _, stderr) = run("weir-gateway", &args);
    assert_eq!(code, 1, "{stderr}");
    assert!(
        stderr.contains("bad URL \"www.example.com\": expected a full URL"),
        "{stderr}"
    );
    // A host and port without the scheme does not parse at all; the hint comes all the same.
    let args = [&args[..4], &["localhost:8080/x"]].concat();
    let (code, _, stderr) = run("weir-gateway", &args);
    assert_eq!(code, 1, "{stderr}");
    assert!(
        stderr.contains("expected a full URL (http://host/path)"),
        "{stderr}"
    );
    // `--peer` is the sidecar's: refused on the gateway, not silently ignored.
    let args = [&args[..4], &["/x", "--peer", "spiffe://mesh.local/sa/a"]].concat();
    let (code, _, stderr) = run("weir-gateway", &args);
    assert_eq!(code, 2, "{stderr}");
    assert!(stderr.contains("--peer is the sidecar's"), "{stderr}");
}

/// `explain ... | head -1`: a reader that stops early ends the command quietly, with the
/// status a shell reports for SIGPIPE, not with a panic.
#[test]
fn a_closed_stdout_ends_the_command_quietly() {
    let (reader, writer) = std::io::pipe().unwrap();
    drop(reader);
    let config = repo_root().join("config/gateway.toml");
    let out = std::process::Command::new(weir_tests::binary("weir-gateway"))
        .args(["explain", "--config", config.to_str().unwrap()])
        .args(["GET", "http://localhost:8080/"])
        .stdout(writer)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(141), "{stderr}");
    assert!(!stderr.contains("panicked"), "{stderr}");
}

/// The sidecar's explain says where a captured call that no route takes goes.
#[test]
fn the_sidecar_explains_a_call_no_route_takes() {
    let config = repo_root().join("config/sidecar.toml");
    let args = [
        "explain",
        "--config",
        config.to_str().unwrap(),
        "GET",
        "http://elsewhere/",
    ];
    let (code, stdout, stderr) = run("weir-sidecar", &args);
    assert_eq!(code, 0, "{stderr}");
    assert!(stdout.contains("route:    none -> a captured call goes on to the address the app called (PassthroughCluster)"), "{stdout}");
}

#[test]
fn the_sidecar_validates_its_own_sections() {
    let path = repo_root().join("config/sidecar.toml");
    let (code, stdout, stderr) = run(
        "weir-sidecar",
        &["validate", "--config", path.to_str().unwrap()],
    );
    assert_eq!(code, 0, "{stdout}{stderr}");
    let (code, _, stderr) = run(
        "weir-gateway",
        &["validate", "--config", path.to_str().unwrap()],
    );
    assert_eq!(code, 1);
    assert!(
        stderr.contains("[inbound] is a weir-sidecar section"),
        "{stderr}"
    );
}

/// Every config shipped under config/ and examples/ is valid for the binary it is meant for.
#[test]
fn every_shipped_config_validates() {
    let root = repo_root();
    let mut checked = 0;
    for dir in ["config", "examples"] {
        for path in toml_files(&root.join(dir)) {
            let text = fs::read_to_string(&path).unwrap();
            let bin = if text.contains("[inbound]") || path.ends_with("sidecar.toml") {
                "weir-sidecar"
            } else {
                "weir-gateway"
            };
            let (code, stdout, stderr) =
                run(bin, &["validate", "--config", path.to_str().unwrap()]);
            assert_eq!(code, 0, "{}: {stdout}{stderr}", path.display());
            checked += 1;
        }
    }
    assert!(checked >= 2, "found only {checked} configs");
}

fn toml_files(dir: &Path) -> Vec<std::path::PathBuf> {
    let mut out = Vec::new();
    for entry in fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            out.extend(toml_files(&path));
        } else if path.extension().is_some_and(|e| e == "toml") {
            out.push(path);
        }
    }
    out
}

/// `explain` sees a request as the proxy does: the path without dot segments, the method as
/// sent (methods are case-sensitive, so `get` is not `GET`).
#[test]
fn explain_normalizes_the_path_and_keeps_the_method_as_sent() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("gw.toml");
    fs::write(
        &path,
        "[[listener]]\nname = \"web\"\nlisten = \"127.0.0.1:8080\"\n\
         [[route]]\nname = \"hello\"\ndirect_response = { status = 200 }\n  [[route.match]]\n  \
         path = { exact = \"/hello\" }\n  methods = [\"GET\"]\n\
         [[route]]\nname = \"default\"\ndirect_response = { status = 404 }\n",
    )
    .unwrap();
    let explain = |method: &str, url: &str| {
        let config = path.to_str().unwrap();
        run(
            "weir-gateway",
            &["explain", "--config", config, method, url],
        )
    };
    let (code, stdout, _) = explain("GET", "http://x/a/../hello");
    assert_eq!(code, 0);
    assert!(stdout.contains("route:    \"hello\""), "{stdout}");
    let (_, stdout, _) = explain("get", "http://x/hello");
    assert!(stdout.contains("route:    \"default\""), "{stdout}");
    let (code, _, stderr) = explain("G ET", "http://x/hello");
    assert_eq!(code, 1);
    assert!(stderr.contains("bad method \"G ET\""), "{stderr}");
}

#[test]
fn git_options_without_a_repository_are_refused() {
    let (code, _, stderr) = run(
        "weir-gateway",
        &[
            "--config",
            "config/gateway.toml",
            "--git-ref",
            "prod",
            "validate",
        ],
    );
    assert_eq!(code, 2, "{stderr}");
    assert!(
        stderr.contains("cannot be used with '--git-ref"),
        "{stderr}"
    );
}

/// SIGHUP while a new process waits for its predecessor's sockets (here a stand-in answers
/// on the admin address, and never sends them) is no end of it: it goes on to give up on the
/// upgrade as it would have.
#[test]
fn sighup_before_the_server_runs_ends_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let (port, admin) = (weir_tests::free_port(), weir_tests::free_port());
    let config = dir.path().join("gateway.toml");
    std::fs::write(&config, weir_tests::Gateway::base(port, admin)).unwrap();
    let _predecessor = std::net::TcpListener::bind(("127.0.0.1", admin)).unwrap();
    let mut child = std::process::Command::new(weir_tests::binary("weir-gateway"))
        .arg("--config")
        .arg(&config)
        .arg("--upgrade")
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut stderr = child.stderr.take().unwrap();
    // Once it says it is waiting for the sockets, it has long taken SIGHUP over.
    let mut seen = String::new();
    let mut buf = [0; 4096];
    while !seen.contains("transfer") {
        let n = std::io::Read::read(&mut stderr, &mut buf).unwrap();
        assert!(n > 0, "{seen}");
        seen.push_str(&String::from_utf8_lossy(&buf[..n]));
    }
    let hup = std::process::Command::new("kill")
        .args(["-HUP", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(hup.success());
    std::thread::spawn(move || std::io::copy(&mut stderr, &mut std::io::sink()));
    let status = child.wait().unwrap();
    assert_eq!(status.code(), Some(1), "{status}: not ended by the signal");
}

#[test]
fn explain_speaks_of_the_handshake_and_of_bytes_where_they_decide() {
    let mesh = repo_root().join("examples/mesh/reviews.toml");
    let mesh = mesh.to_str().unwrap();
    let (code, stdout, stderr) = run(
        "weir-sidecar",
        &[
            "explain",
            "--config",
            mesh,
            "GET",
            "http://reviews:15106/reviews/1",
        ],
    );
    assert_eq!(code, 0, "{stderr}");
    assert!(
        stdout.contains("a caller without a certificate is refused in the TLS handshake"),
        "{stdout}"
    );
    assert!(!stdout.contains("403"), "{stdout}");
    let tcp = repo_root().join("examples/passthrough/gateway.toml");
    let tcp = tcp.to_str().unwrap();
    let (code, stdout, stderr) = run(
        "weir-gateway",
        &["explain", "--config", tcp, "GET", "http://x:9000/"],
    );
    assert_eq!(code, 0, "{stderr}");
    assert!(stdout.contains("connect:  a tcp/tls listener"), "{stdout}");
    assert!(!stdout.contains("retry:"), "{stdout}");
    let (_, stdout, _) = run(
        "weir-gateway",
        &["explain", "--config", tcp, "GET", "https://nobody:9443/"],
    );
    assert!(
        stdout.contains("none -> the connection is closed, flag NR"),
        "{stdout}"
    );
    // A loopback inbound listener cannot take what the capture redirects: said, not hidden.
    let (code, _, stderr) = run("weir-sidecar", &["iptables", "--config", mesh]);
    assert_eq!(code, 0, "{stderr}");
    assert!(stderr.contains("is on loopback"), "{stderr}");
}

#[test]
fn each_binary_says_its_own_name() {
    for bin in ["weir-gateway", "weir-sidecar"] {
        let (code, stdout, _) = run(bin, &["--version"]);
        assert_eq!(code, 0);
        assert!(stdout.starts_with(&format!("{bin} ")), "{stdout}");
    }
    // And offers only its own subcommands: traffic capture is the sidecar's.
    let offers_iptables = |bin| run(bin, &["--help"]).1.contains("iptables");
    assert!(!offers_iptables("weir-gateway"));
    assert!(offers_iptables("weir-sidecar"));
}

/// The retry line names every condition, gRPC statuses too.
#[test]
fn explain_names_the_retry_conditions() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("gw.toml");
    fs::write(
        &path,
        "[[listener]]\nname = \"web\"\nlisten = \"127.0.0.1:8080\"\n\
         [[service]]\nname = \"grpc\"\nendpoints = [\"127.0.0.1:9090\"]\n\
         [[route]]\nname = \"r\"\n  [[route.backend]]\n  service = \"grpc\"\n\
         \x20 [route.retry]\n  on = [\"unavailable\", 503, \"reset\"]\n",
    )
    .unwrap();
    let args = ["explain", "--config", path.to_str().unwrap(), "POST", "/x"];
    let (code, stdout, stderr) = run("weir-gateway", &args);
    assert_eq!(code, 0, "{stderr}");
    assert!(
        stdout.contains("retry:    up to 2 on reset, 503, grpc unavailable;"),
        "{stdout}"
    );
}
