//! Traffic capture (docs/sidecar.md): two pods, each a network namespace of its own joined to
//! the other by a veth pair, each with its `weir-sidecar` behind the rules that
//! `weir-sidecar iptables` prints, applied with the real `iptables-restore`. The apps (curl,
//! Python servers) call each other by address and know nothing of the sidecars.
//!
//! Needs root (network namespaces and iptables), as CI and this machine have.
#![allow(clippy::unwrap_used, clippy::print_stdout)]

use std::fs;
use std::io::Write;
use std::process::{Child, Command, Output, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use weir_tests::tls::TestCa;
use weir_tests::{binary, repo_root, run, script, wait_until};

const PRODUCTPAGE: &str = "spiffe://mesh.local/ns/default/sa/productpage";
const REVIEWS: &str = "spiffe://mesh.local/ns/default/sa/reviews";
/// The group the sidecars run as, which their rules leave uncaptured.
const PROXY_GID: u32 = 1337;
/// Pod b's address; pod a is 10.77.0.1.
const POD_B: &str = "10.77.0.2";

/// A pod: a network namespace, its end of the veth pair, and what runs in it. Dropping it
/// stops its processes and deletes the namespace (and with it the veth pair).
struct Pod {
    ns: String,
    dir: tempfile::TempDir,
    children: Vec<Child>,
}

/// Two pods, a at 10.77.0.1 and b at 10.77.0.2, named after this process so tests running
/// at once never share one.
fn pods() -> (Pod, Pod) {
    static NEXT: AtomicUsize = AtomicUsize::new(0);
    // Interface names have at most 15 characters.
    let id = format!(
        "w{}x{}",
        std::process::id(),
        NEXT.fetch_add(1, Ordering::Relaxed)
    );
    let pod = |side: &str| {
        let ns = format!("{id}{side}");
        sh(&format!("ip netns add {ns}"));
        Pod {
            ns,
            dir: tempfile::tempdir().unwrap(),
            children: Vec::new(),
        }
    };
    let (a, b) = (pod("a"), pod("b"));
    sh(&format!(
        "ip link add {a} netns {a} type veth peer name {b} netns {b}",
        a = a.ns,
        b = b.ns
    ));
    for (pod, ip) in [(&a, "10.77.0.1"), (&b, POD_B)] {
        let ns = &pod.ns;
        sh(&format!(
            "ip -n {ns} addr add {ip}/24 dev {ns} && ip -n {ns} link set {ns} up && \
             ip -n {ns} link set lo up"
        ));
    }
    (a, b)
}

/// Runs a shell command on the host; panics with its output when it fails.
fn sh(command: &str) {
    let out = Command::new("sh").args(["-c", command]).output().unwrap();
    assert!(out.status.success(), "{command}: {}", text(&out));
}

fn text(out: &Output) -> String {
    let stdout = String::from_utf8_lossy(&out.stdout);
    format!("{stdout}{}", String::from_utf8_lossy(&out.stderr))
}

impl Pod {
    /// `program` inside the pod.
    fn command(&self, program: &str) -> Command {
        let mut command = Command::new("ip");
        command.args(["netns", "exec", &self.ns, program]);
        command.stdin(Stdio::null());
        command
    }

    /// Runs `program ARGS` in the pod to the end.
    fn run(&self, program: &str, args: &[&str]) -> Output {
        self.command(program).args(args).output().unwrap()
    }

    /// Starts `program ARGS` in the pod, its output in `name`.log; stopped with the pod.
    fn start(&mut self, name: &str, mut command: Command) {
        let log = fs::File::create(self.dir.path().join(format!("{name}.log"))).unwrap();
        command.stdout(log.try_clone().unwrap()).stderr(log);
        self.children.push(command.spawn().unwrap());
    }

    /// A Python HTTP server serving `files` (name, content) on `port` of every address.
    fn http_server(&mut self, port: u16, files: &[(&str, &str)]) {
        let root = self.dir.path().join(format!("www{port}"));
        fs::create_dir(&root).unwrap();
        for (name, content) in files {
            fs::write(root.join(name), content).unwrap();
        }
        let mut server = self.command("python3");
        server.args(["-m", "http.server", &port.to_string(), "-d"]);
        server.arg(&root);
        self.start(&format!("http{port}"), server);
        let url = format!("http://127.0.0.1:{port}/{}", files[0].0);
        wait_until("the app server", Duration::from_secs(20), || {
            self.run("curl", &["-sf", &url]).status.success()
        });
    }

    /// tests/capture/echo.py on `port`: a TCP server that sends back what it reads.
    fn echo_server(&mut self, port: u16) {
        let mut echo = self.command("python3");
        echo.args([&script("tests/capture/echo.py"), &port.to_string()]);
        self.start(&format!("echo{port}"), echo);
        wait_until("the echo server", Duration::from_secs(20), || {
            let ss = self.run("ss", &["-Htln", &format!("sport = :{port}")]);
            !ss.stdout.is_empty()
        });
    }

    /// Writes the pod's sidecar config (with `identity`'s workload certificate from `ca`),
    /// applies the capture rules `weir-sidecar iptables ARGS` prints for it, and starts the
    /// sidecar (see [`Pod::proxy`]).
    fn sidecar(&mut self, ca: &TestCa, identity: &str, config: &str, args: &[&str]) {
        let config = self.proxy_config(ca, identity, config);
        let config = config.to_str().unwrap();
        let (code, rules, err) = run(
            "weir-sidecar",
            &[&["--config", config, "iptables"], args].concat(),
        );
        assert_eq!(code, 0, "weir-sidecar iptables: {err}");
        let mut restore = self.command("iptables-restore");
        restore.arg("--noflush").stdin(Stdio::piped());
        let mut restore = restore.spawn().unwrap();
        let mut stdin = restore.stdin.take().unwrap();
        stdin.write_all(rules.as_bytes()).unwrap();
        drop(stdin);
        let applied = restore.wait().unwrap().success();
        assert!(applied, "iptables-restore refused:\n{rules}");
        self.proxy("weir-sidecar", config);
    }

    /// Writes `config` after the admin listener and `identity`'s workload files (made by
    /// `ca`) to the pod's proxy.toml.
    fn proxy_config(&self, ca: &TestCa, identity: &str, config: &str) -> std::path::PathBuf {
        let dir = self.dir.path();
        let workload = ca.workload(identity);
        fs::write(dir.join("bundle.pem"), ca.pem()).unwrap();
        fs::write(dir.join("workload.pem"), &workload.cert).unwrap();
        fs::write(dir.join("workload-key.pem"), &workload.key).unwrap();
        let path = dir.join("proxy.toml");
        let text = format!(
            "[admin]\nlisten = \"127.0.0.1:15000\"\n[workload]\ncert = \"workload.pem\"\n\
             key = \"workload-key.pem\"\ntrust_bundle = \"bundle.pem\"\n{config}"
        );
        fs::write(&path, text).unwrap();
        path
    }

    /// Starts `bin` (weir-sidecar or weir-gateway) on `config` in group [`PROXY_GID`], which
    /// the capture rules leave alone, once its admin `/ready` answers.
    fn proxy(&mut self, bin: &str, config: &str) {
        let dir = self.dir.path();
        let mut proxy = self.command(binary(bin).to_str().unwrap());
        std::os::unix::process::CommandExt::gid(&mut proxy, PROXY_GID);
        proxy.args(["--config", config]);
        let stdout = fs::File::create(dir.join("access.log")).unwrap();
        let stderr = fs::File::create(dir.join("proxy.err")).unwrap();
        self.children
            .push(proxy.stdout(stdout).stderr(stderr).spawn().unwrap());
        wait_until("the proxy to be ready", Duration::from_secs(20), || {
            let ready = self.curl(&["http://127.0.0.1:15000/ready"]);
            ready.is_ok_and(|r| r.starts_with("200"))
        });
    }

    /// `curl ARGS` in the pod: the status code, a space, then the body; the error when curl
    /// failed.
    fn curl(&self, args: &[&str]) -> Result<String, String> {
        let curl = [&["-sS", "--max-time", "10", "-w", "\n%{http_code}"], args].concat();
        let out = self.run("curl", &curl);
        if !out.status.success() {
            return Err(text(&out));
        }
        let stdout = String::from_utf8_lossy(&out.stdout);
        let (body, code) = stdout.rsplit_once('\n').unwrap();
        Ok(format!("{code} {body}"))
    }

    /// Sends the bytes `hex` on a TCP connection to `addr` from the pod, half-closes, and
    /// returns what came back before the server closed, in hex (tests/capture/echo.py `send`).
    fn tcp_exchange(&self, addr: &str, hex: &str) -> String {
        let out = self.run(
            "python3",
            &[&script("tests/capture/echo.py"), "send", addr, hex],
        );
        assert!(out.status.success(), "echo.py send: {}", text(&out));
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// [`Pod::tcp_exchange`] a byte at a time, `pause` seconds apart, each echo read before
    /// the next byte (tests/capture/echo.py `drip`).
    fn run_drip(&self, addr: &str, hex: &str, pause: f64) -> String {
        let echo = script("tests/capture/echo.py");
        let out = self.run("python3", &[&echo, "drip", addr, hex, &pause.to_string()]);
        assert!(out.status.success(), "echo.py drip: {}", text(&out));
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// The sidecar's access log lines, parsed, once there are `n`.
    fn access_log(&self, n: usize) -> Vec<serde_json::Value> {
        let read = || -> Vec<serde_json::Value> {
            let text = fs::read_to_string(self.dir.path().join("access.log")).unwrap();
            text.lines()
                .filter_map(|l| serde_json::from_str(l).ok())
                .collect()
        };
        wait_until("the access log lines", Duration::from_secs(10), || {
            read().len() >= n
        });
        read()
    }

    /// One series of the sidecar's admin `/metrics`; 0 when it does not exist.
    fn metric(&self, series: &str) -> f64 {
        let text = self.curl(&["http://127.0.0.1:15000/metrics"]).unwrap();
        text.lines()
            .find_map(|l| l.strip_prefix(series)?.strip_prefix(' ')?.parse().ok())
            .unwrap_or(0.0)
    }
}

impl Drop for Pod {
    fn drop(&mut self) {
        for child in &mut self.children {
            let _ = child.kill();
            let _ = child.wait();
        }
        if std::thread::panicking() {
            for name in ["access.log", "proxy.err"] {
                let text = fs::read_to_string(self.dir.path().join(name)).unwrap_or_default();
                println!("--- pod {} {name} ---\n{text}", self.ns);
            }
        }
        let _ = Command::new("ip").args(["netns", "del", &self.ns]).status();
    }
}

/// Reviews lets productpage call it.
const PRODUCTPAGE_MAY_CALL: &str = "[[inbound.policy]]\nname = \"productpage\"\naction = \"allow\"\n\
                                    principals = [\"spiffe://mesh.local/ns/default/sa/productpage\"]\n";

/// Pod b's TCP app on port 7000 (an echo server), taken by its capture, and pod a's route to
/// it over the mesh by its address.
const ECHO_ROUTE: &str = "[[route]]\nname = \"echo\"\ndestinations = [\"10.77.0.2:7000\"]\n\
                          [[route.backend]]\nservice = \"echo\"\n\
                          [[service]]\nname = \"echo\"\nendpoints = [\"10.77.0.2:7000\"]\n\
                          [service.tls]\nmode = \"mesh\"\n\
                          identities = [\"spiffe://mesh.local/ns/default/sa/reviews\"]\n";

/// Pod a (productpage) calls reviews in pod b by b's address. `a_outbound` opens a's sidecar
/// config (its `[outbound]` table), `a_routes` ends it; `b_inbound` ends b's `[inbound]`
/// table (its keys, then its policies). Pod b serves reviews on 9080 behind its sidecar
/// (strict mTLS), echoes TCP on 7000 and 7001, and, on a port its capture leaves alone (it
/// takes only the app's), serves an outside HTTP server on 8081. Pod a leaves its calls to
/// port 7001 uncaptured.
fn mesh(ca: &TestCa, a_outbound: &str, a_routes: &str, b_inbound: &str) -> (Pod, Pod) {
    let (mut a, mut b) = pods();
    b.http_server(9080, &[("reviews.txt", "reviews of the app\n")]);
    b.http_server(8081, &[("outside.txt", "outside the mesh\n")]);
    b.echo_server(7000);
    b.echo_server(7001);
    let reviews = format!("[inbound]\napp = \"127.0.0.1:9080\"\nmtls = \"strict\"\n{b_inbound}");
    b.sidecar(ca, REVIEWS, &reviews, &[]);
    let productpage = format!(
        "{a_outbound}\n[inbound]\napp = \"127.0.0.1:8080\"\n\
         [[route]]\nname = \"reviews\"\nhosts = [\"reviews\"]\n  [[route.backend]]\n  service = \"reviews\"\n\
         [[service]]\nname = \"reviews\"\nendpoints = [\"{POD_B}:9080\"]\n  [service.tls]\n  mode = \"mesh\"\n  \
         identities = [\"{REVIEWS}\"]\n{a_routes}"
    );
    let uncaptured = ["--exclude-outbound-ports", "7001"];
    a.sidecar(ca, PRODUCTPAGE, &productpage, &uncaptured);
    (a, b)
}

#[test]
fn captured_calls_go_through_the_sidecars_and_unknown_destinations_pass_through() {
    let ca = TestCa::new("mesh CA");
    let (a, b) = mesh(&ca, "", "", PRODUCTPAGE_MAY_CALL);
    // Pod a's app calls reviews by pod b's address, in plaintext: its sidecar catches the
    // call, routes it by Host and carries it over mesh mTLS, which b's sidecar catches on the
    // app's port, checks and hands to the app. (Uncaptured, the plaintext call would hit b's
    // strict inbound and fail.)
    let url = format!("http://{POD_B}:9080/reviews.txt");
    let reply = a.curl(&["-H", "Host: reviews", &url]).unwrap();
    assert_eq!(reply, "200 reviews of the app\n");
    let out = &a.access_log(1)[0];
    assert_eq!(out["listener"], "outbound");
    assert_eq!(out["route"], "reviews");
    assert_eq!(out["upstream"], format!("{POD_B}:9080"));
    let into = &b.access_log(1)[0];
    assert_eq!(into["listener"], "inbound");
    assert_eq!(into["peer"], PRODUCTPAGE);
    assert_eq!(into["request_id"], out["request_id"]);

    // A host no route names: on to where the app was calling (Istio's PassthroughCluster).
    let reply = a
        .curl(&[&format!("http://{POD_B}:8081/outside.txt")])
        .unwrap();
    assert_eq!(reply, "200 outside the mesh\n");
    let passed = &a.access_log(2)[1];
    assert_eq!(passed["route"], serde_json::Value::Null);
    assert_eq!(passed["service"], "PassthroughCluster");
    assert_eq!(passed["upstream"], format!("{POD_B}:8081"));
    let requests = "weir_requests_total{code=\"200\",flags=\"\",proxy=\"outbound\",route=\"\",\
                    service=\"PassthroughCluster\"}";
    assert_eq!(a.metric(requests), 1.0);
    // The same over h2c (HTTP/2 without TLS, as gRPC clients send it), on HTTP/1.1 onward.
    let url = format!("http://{POD_B}:8081/outside.txt");
    let h2c = a.curl(&["--http2-prior-knowledge", &url]).unwrap();
    assert_eq!(h2c, "200 outside the mesh\n");
    let passed = &a.access_log(3)[2];
    assert_eq!(passed["protocol"], "HTTP/2");
    assert_eq!(passed["service"], "PassthroughCluster");

    // An excluded port: straight there, no log line (the next line is the next call's).
    let echoed = a.tcp_exchange(&format!("{POD_B}:7001"), "0070696e67");
    assert_eq!(echoed, "0070696e67");
    // Not HTTP (a 0x00 byte, then "ping"): the bytes go on as they come.
    let echoed = a.tcp_exchange(&format!("{POD_B}:7000"), "0070696e67");
    assert_eq!(echoed, "0070696e67");
    let tcp = &a.access_log(4)[3];
    assert_eq!(tcp["protocol"], "TCP");
    assert_eq!(tcp["service"], "PassthroughCluster");
    assert_eq!(tcp["upstream"], format!("{POD_B}:7000"));
    assert_eq!(tcp["bytes_received"], 5);
    assert_eq!(tcp["bytes_sent"], 5);
    let connections = "weir_tcp_connections_total{flags=\"\",listener=\"outbound\",route=\"\",\
                       service=\"PassthroughCluster\"}";
    assert_eq!(a.metric(connections), 1.0);
}

#[test]
fn with_passthrough_off_captured_calls_only_reach_routed_services() {
    let ca = TestCa::new("mesh CA");
    let off = "[outbound]\npassthrough = false\n";
    let (a, _b) = mesh(&ca, off, "", PRODUCTPAGE_MAY_CALL);
    let url = format!("http://{POD_B}:9080/reviews.txt");
    assert_eq!(
        a.curl(&["-H", "Host: reviews", &url]).unwrap(),
        "200 reviews of the app\n"
    );
    let reply = a
        .curl(&[&format!("http://{POD_B}:8081/outside.txt")])
        .unwrap();
    assert_eq!(reply, "404 no route\n");
    assert_eq!(a.access_log(2)[1]["flags"], "NR");
    // Other TCP is closed unanswered.
    assert_eq!(a.tcp_exchange(&format!("{POD_B}:7000"), "0070696e67"), "");
    let refused = &a.access_log(3)[2];
    assert_eq!(refused["protocol"], "TCP");
    assert_eq!(refused["flags"], "NR");
    assert_eq!(refused["bytes_received"], 0);
}

/// TCP to a mesh service, by the address the app called: mesh mTLS from a's sidecar, which b's
/// sidecar catches on the app's TCP port, checks (the caller's identity against b's
/// policies) and forwards to the app as bytes.
#[test]
fn tcp_to_a_mesh_service_goes_over_mtls_by_original_destination() {
    let ca = TestCa::new("mesh CA");
    let a_idle = "[outbound]\nidle_timeout = \"1s\"\n";
    let b_inbound = format!("tcp_ports = [7000]\nidle_timeout = \"1s\"\n{PRODUCTPAGE_MAY_CALL}");
    let (a, b) = mesh(&ca, a_idle, ECHO_ROUTE, &b_inbound);
    let echo = format!("{POD_B}:7000");
    assert_eq!(a.tcp_exchange(&echo, "0070696e67"), "0070696e67");
    let out = &a.access_log(1)[0];
    assert_eq!(out["protocol"], "TCP");
    assert_eq!(out["route"], "echo");
    assert_eq!(out["service"], "echo");
    assert_eq!(out["upstream"], echo);
    let into = &b.access_log(1)[0];
    assert_eq!(into["listener"], "inbound");
    assert_eq!(into["protocol"], "TCP");
    assert_eq!(into["peer"], PRODUCTPAGE);
    assert_eq!(into["upstream"], "127.0.0.1:7000");
    assert_eq!(into["bytes_received"], 5);
    assert_eq!(into["bytes_sent"], 5);
    // Bytes that keep coming keep the connection: both listeners' idle timeouts are 1 s,
    // and the exchange lasts 2.4 s.
    assert_eq!(a.run_drip(&echo, "01020304", 0.6), "01020304");
}

/// A deny policy's principals refuse a TCP connection whatever its HTTP fields (paths here)
/// say: Istio's rule, closed both ways.
#[test]
fn a_deny_policy_refuses_tcp_by_principal() {
    let ca = TestCa::new("mesh CA");
    let deny = "tcp_ports = [7000]\n[[inbound.policy]]\nname = \"no-admin\"\naction = \"deny\"\n\
                principals = [\"spiffe://mesh.local/ns/default/sa/productpage\"]\n\
                paths = [\"/admin*\"]\n";
    let (a, b) = mesh(&ca, "", ECHO_ROUTE, deny);
    assert_eq!(a.tcp_exchange(&format!("{POD_B}:7000"), "0070696e67"), "");
    let refused = &b.access_log(1)[0];
    assert_eq!(refused["flags"], "AD");
    assert_eq!(refused["peer"], PRODUCTPAGE);
    assert_eq!(
        b.metric("weir_authz_denied_total{policy=\"no-admin\"}"),
        1.0
    );
    // HTTP outside /admin is not denied.
    let url = format!("http://{POD_B}:9080/reviews.txt");
    let reply = a.curl(&["-H", "Host: reviews", &url]).unwrap();
    assert_eq!(reply, "200 reviews of the app\n");
}

/// examples/capture/run, as its README shows it: the apps' three calls get through, and each
/// sidecar logs what its README says.
#[test]
fn the_capture_example_runs_as_its_readme_says() {
    let bin = binary("weir-sidecar");
    let out = Command::new("bash")
        .arg(repo_root().join("examples/capture/run"))
        .env("WEIR_BIN", bin.parent().unwrap())
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{}", text(&out));
    let review = "{\"reviews\": [\"an extremely entertaining play\"]}\n";
    assert_eq!(stdout.matches(review).count(), 2, "{stdout}");
    assert!(stdout.contains("(echoed back)\nping\n"), "{stdout}");
    let lines: Vec<serde_json::Value> = (stdout.lines())
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter(|l| l.get("listener").is_some())
        .collect();
    let seen: Vec<(String, String, String)> = (lines.iter())
        .map(|l| {
            let field = |k: &str| l[k].as_str().unwrap_or("-").to_string();
            (field("listener"), field("service"), field("peer"))
        })
        .collect();
    let expected = [
        ("outbound", "reviews", "-"),
        ("outbound", "PassthroughCluster", "-"),
        ("outbound", "echo", "-"),
        ("inbound", "inbound", PRODUCTPAGE),
        ("inbound", "inbound", PRODUCTPAGE),
    ];
    let expected: Vec<(String, String, String)> = (expected.iter())
        .map(|(a, b, c)| (a.to_string(), b.to_string(), c.to_string()))
        .collect();
    assert_eq!(seen, expected, "{stdout}");
}

/// A gateway's `tcp` route to a mesh service: mesh mTLS with the gateway's workload
/// certificate to a sidecar's `tcp_ports` (Istio's ingress gateway with `ISTIO_MUTUAL`), and
/// a server with another identity than the service's refused before a byte is sent.
#[test]
fn a_gateway_tcp_route_reaches_a_mesh_tcp_port() {
    const GATEWAY: &str = "spiffe://mesh.local/ns/istio-system/sa/gateway";
    const RATINGS: &str = "spiffe://mesh.local/ns/default/sa/ratings";
    let ca = TestCa::new("mesh CA");
    let (mut a, mut b) = pods();
    b.echo_server(7000);
    let reviews = format!(
        "[inbound]\napp = \"127.0.0.1:9080\"\ntcp_ports = [7000]\n\
         [[inbound.policy]]\nname = \"gateway\"\naction = \"allow\"\nprincipals = [\"{GATEWAY}\"]\n"
    );
    b.sidecar(&ca, REVIEWS, &reviews, &[]);
    let route = |name: &str, port: u16, identity: &str| {
        format!(
            "[[listener]]\nname = \"{name}\"\nlisten = \"127.0.0.1:{port}\"\nprotocol = \"tcp\"\n\
             [[route]]\nname = \"{name}\"\nlisteners = [\"{name}\"]\n  [[route.backend]]\n  service = \"{name}\"\n\
             [[service]]\nname = \"{name}\"\nendpoints = [\"{POD_B}:7000\"]\n  [service.tls]\n  mode = \"mesh\"\n  \
             identities = [\"{identity}\"]\n"
        )
    };
    let gateway = format!(
        "{}{}",
        route("echo", 6000, REVIEWS),
        route("wrong", 6001, RATINGS)
    );
    let config = a.proxy_config(&ca, GATEWAY, &gateway);
    a.proxy("weir-gateway", config.to_str().unwrap());
    assert_eq!(a.tcp_exchange("127.0.0.1:6000", "0070696e67"), "0070696e67");
    let out = &a.access_log(1)[0];
    assert_eq!(
        (&out["listener"], &out["service"]),
        (&"echo".into(), &"echo".into())
    );
    let into = &b.access_log(1)[0];
    assert_eq!(into["protocol"], "TCP");
    assert_eq!(into["peer"], GATEWAY);
    // Reviews is not ratings: the handshake fails on the gateway's side, nothing reaches b's
    // app.
    assert_eq!(a.tcp_exchange("127.0.0.1:6001", "0070696e67"), "");
    let refused = &a.access_log(2)[1];
    assert_eq!(
        (&refused["service"], &refused["flags"]),
        (&"wrong".into(), &"UF".into())
    );
    assert_eq!(
        b.metric(
            "weir_tcp_bytes_total{direction=\"received\",route=\"inbound\",service=\"inbound\"}"
        ),
        5.0
    );
}

#[test]
fn iptables_rules_are_the_sidecars_only() {
    let (code, _, err) = run(
        "weir-gateway",
        &["--config", &script("config/gateway.toml"), "iptables"],
    );
    assert_eq!(code, 2);
    assert!(err.contains("weir-sidecar iptables"), "{err}");
}
