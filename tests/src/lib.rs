//! Test harness: real upstream servers and the real `weir-gateway` binary, each on its own
//! free ports, so tests run in parallel. Everything started here is killed on drop.
#![allow(clippy::unwrap_used, clippy::print_stdout)]

use std::fs;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant};

pub mod otlp;
pub mod tls;

/// A port nobody listens on right now, one this process has not handed out before, and one
/// below the kernel's ephemeral range. A port from `bind(0)` is an ephemeral one: before the
/// gateway binds it, any test's outgoing connection may take it as its local port and hold it
/// for as long as it stays open (the gateway then waits on "is in use").
pub fn free_port() -> u16 {
    static NEXT: Mutex<Option<u16>> = Mutex::new(None);
    let ephemeral = fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .ok()
        .and_then(|range| range.split_whitespace().next()?.parse::<u16>().ok())
        .unwrap_or(32768);
    // The half below the ephemeral range, from a start of this process's own, so that two
    // test processes rarely try the same ports.
    let span = ephemeral / 2;
    let mut next = NEXT.lock().unwrap();
    let offset = next.get_or_insert_with(|| (std::process::id() % u32::from(span)) as u16);
    for _ in 0..span {
        let port = ephemeral - span + *offset;
        *offset = (*offset + 1) % span;
        if TcpListener::bind(("127.0.0.1", port)).is_ok() {
            return port;
        }
    }
    panic!("no free port in {}..{ephemeral}", ephemeral - span);
}

/// Clients sending GETs to one URL without pause, each on its own keep-alive connection,
/// until stopped: an answer 200 with the expected body counts as served, anything else (with
/// a transport error) as failed and is printed.
pub struct Load {
    stop: Arc<AtomicBool>,
    served: Arc<AtomicUsize>,
    failed: Arc<AtomicUsize>,
    clients: Vec<thread::JoinHandle<()>>,
}

impl Load {
    pub fn start(url: &str, clients: usize, body: &str) -> Load {
        let stop = Arc::new(AtomicBool::new(false));
        let (served, failed) = (Arc::new(AtomicUsize::new(0)), Arc::new(AtomicUsize::new(0)));
        let clients = (0..clients)
            .map(|_| {
                let (stop, served, failed) = (stop.clone(), served.clone(), failed.clone());
                let (url, body) = (url.to_string(), body.to_string());
                thread::spawn(move || {
                    let agent = client();
                    while !stop.load(Ordering::Relaxed) {
                        match send(&agent, "GET", &url, &[]) {
                            Ok(r) if r.status == 200 && r.body == body => {
                                served.fetch_add(1, Ordering::Relaxed)
                            }
                            other => {
                                eprintln!("failed: {other:?}");
                                failed.fetch_add(1, Ordering::Relaxed)
                            }
                        };
                    }
                })
            })
            .collect();
        Load {
            stop,
            served,
            failed,
            clients,
        }
    }

    pub fn served(&self) -> usize {
        self.served.load(Ordering::Relaxed)
    }

    /// Stops and joins the clients: (served, failed).
    pub fn stop(mut self) -> (usize, usize) {
        self.stop.store(true, Ordering::Relaxed);
        for c in self.clients.drain(..) {
            c.join().unwrap();
        }
        (self.served(), self.failed.load(Ordering::Relaxed))
    }
}

impl Drop for Load {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}

/// Polls `cond` every 20 ms until it holds; panics with `what` after `timeout`.
pub fn wait_until(what: &str, timeout: Duration, mut cond: impl FnMut() -> bool) {
    let start = Instant::now();
    while !cond() {
        assert!(
            start.elapsed() < timeout,
            "timed out after {timeout:?} waiting for {what}"
        );
        thread::sleep(Duration::from_millis(20));
    }
}

/// A real HTTP/1.1 server that answers every request with its own name.
///
/// `GET /slow/<ms>` answers after `ms` milliseconds. The headers and body of the last request
/// are kept for inspection.
pub struct Upstream {
    pub name: String,
    pub addr: SocketAddr,
    server: Arc<tiny_http::Server>,
    hits: Arc<AtomicUsize>,
    last_headers: Arc<Mutex<Vec<(String, String)>>>,
    last_body: Arc<Mutex<Vec<u8>>>,
    workers: Vec<thread::JoinHandle<()>>,
}

impl Upstream {
    pub fn start(name: &str) -> Upstream {
        Upstream::start_with(name, 200, Duration::ZERO)
    }

    /// An upstream that answers every request with `status`.
    pub fn failing(name: &str, status: u16) -> Upstream {
        Upstream::start_with(name, status, Duration::ZERO)
    }

    /// An upstream that waits `delay` before every answer.
    pub fn slow(name: &str, delay: Duration) -> Upstream {
        Upstream::start_with(name, 200, delay)
    }

    /// An upstream on a given address, e.g. "127.0.0.2:8080".
    pub fn start_at(name: &str, addr: &str) -> Upstream {
        Upstream::serve(name, addr, 200, Duration::ZERO)
    }

    fn start_with(name: &str, status: u16, delay: Duration) -> Upstream {
        Upstream::serve(name, "127.0.0.1:0", status, delay)
    }

    fn serve(name: &str, addr: &str, status: u16, delay: Duration) -> Upstream {
        let server = Arc::new(tiny_http::Server::http(addr).unwrap());
        let addr = server.server_addr().to_ip().unwrap();
        let hits = Arc::new(AtomicUsize::new(0));
        let last_headers = Arc::new(Mutex::new(Vec::new()));
        let last_body = Arc::new(Mutex::new(Vec::new()));
        let workers = (0..8)
            .map(|_| {
                let (server, hits, last) = (server.clone(), hits.clone(), last_headers.clone());
                let last_body = last_body.clone();
                let name = name.to_string();
                thread::spawn(move || {
                    for mut req in server.incoming_requests() {
                        let mut seen: Vec<(String, String)> = req
                            .headers()
                            .iter()
                            .map(|h| {
                                (
                                    h.field.to_string().to_ascii_lowercase(),
                                    h.value.to_string(),
                                )
                            })
                            .collect();
                        seen.push((":path".into(), req.url().to_string()));
                        let mut body = Vec::new();
                        let _ = std::io::Read::read_to_end(req.as_reader(), &mut body);
                        // Recorded before counting, so a test that waits on hits() sees them.
                        *last.lock().unwrap() = seen;
                        *last_body.lock().unwrap() = body;
                        hits.fetch_add(1, Ordering::SeqCst);
                        thread::sleep(delay);
                        if let Some(ms) = req.url().strip_prefix("/slow/") {
                            thread::sleep(Duration::from_millis(ms.parse().unwrap_or(0)));
                        }
                        let header =
                            tiny_http::Header::from_bytes("x-upstream", name.as_bytes()).unwrap();
                        let _ = req.respond(
                            tiny_http::Response::from_string(name.clone())
                                .with_status_code(status)
                                .with_header(header),
                        );
                    }
                })
            })
            .collect();
        Upstream {
            name: name.to_string(),
            addr,
            server,
            hits,
            last_headers,
            last_body,
            workers,
        }
    }

    /// The body of the last request received.
    pub fn last_body(&self) -> Vec<u8> {
        self.last_body.lock().unwrap().clone()
    }

    /// Requests received so far.
    pub fn hits(&self) -> usize {
        self.hits.load(Ordering::SeqCst)
    }

    /// A header of the last request received; ":path" gives its path and query.
    pub fn last_header(&self, name: &str) -> Option<String> {
        self.last_headers
            .lock()
            .unwrap()
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.clone())
    }

    /// Every value of a header of the last request received, one per field.
    pub fn header_fields(&self, name: &str) -> Vec<String> {
        (self.last_headers.lock().unwrap().iter())
            .filter(|(k, _)| k == name)
            .map(|(_, v)| v.clone())
            .collect()
    }

    /// A `[[service]]` table named after this upstream.
    pub fn service(&self) -> String {
        format!(
            "[[service]]\nname = \"{}\"\nendpoints = [\"{}\"]\n",
            self.name, self.addr
        )
    }
}

impl Drop for Upstream {
    fn drop(&mut self) {
        for _ in &self.workers {
            self.server.unblock();
        }
        for w in self.workers.drain(..) {
            let _ = w.join();
        }
    }
}

/// A server that accepts connections, reads the request and closes without an answer: the
/// connection breaks before a response, which retry conditions call "reset".
pub struct Resetter {
    pub addr: SocketAddr,
    hits: Arc<AtomicUsize>,
    stop: Arc<std::sync::atomic::AtomicBool>,
    worker: Option<thread::JoinHandle<()>>,
}

impl Resetter {
    pub fn start() -> Resetter {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let hits = Arc::new(AtomicUsize::new(0));
        let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let worker = {
            let (hits, stop) = (hits.clone(), stop.clone());
            thread::spawn(move || {
                for conn in listener.incoming() {
                    if stop.load(Ordering::SeqCst) {
                        return;
                    }
                    let Ok(mut conn) = conn else { continue };
                    let mut buf = [0u8; 4096];
                    let _ = std::io::Read::read(&mut conn, &mut buf);
                    hits.fetch_add(1, Ordering::SeqCst);
                }
            })
        };
        Resetter {
            addr,
            hits,
            stop,
            worker: Some(worker),
        }
    }

    pub fn hits(&self) -> usize {
        self.hits.load(Ordering::SeqCst)
    }
}

impl Drop for Resetter {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        let _ = std::net::TcpStream::connect(self.addr);
        if let Some(w) = self.worker.take() {
            let _ = w.join();
        }
    }
}

/// A response, whatever its status.
#[derive(Debug)]
pub struct Reply {
    pub status: u16,
    pub body: String,
    pub headers: Vec<(String, String)>,
}

impl Reply {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }
}

/// A keep-alive HTTP client.
pub fn client() -> ureq::Agent {
    ureq::AgentBuilder::new()
        .timeout(Duration::from_secs(10))
        .build()
}

/// Sends a request; transport errors are `Err`, every status is `Ok`.
pub fn send(
    agent: &ureq::Agent,
    method: &str,
    url: &str,
    headers: &[(&str, &str)],
) -> Result<Reply, String> {
    send_body(agent, method, url, headers, None)
}

/// [`send`] with a body (sent with Content-Length).
pub fn send_body(
    agent: &ureq::Agent,
    method: &str,
    url: &str,
    headers: &[(&str, &str)],
    body: Option<&[u8]>,
) -> Result<Reply, String> {
    let mut req = agent.request(method, url);
    for (k, v) in headers {
        req = req.set(k, v);
    }
    let sent = match body {
        Some(body) => req.send_bytes(body),
        None => req.call(),
    };
    let resp = match sent {
        Ok(r) => r,
        Err(ureq::Error::Status(_, r)) => r,
        Err(e) => return Err(e.to_string()),
    };
    let status = resp.status();
    let headers = resp.headers_names().into_iter().map(|n| {
        let v = resp.header(&n).unwrap_or("").to_string();
        (n, v)
    });
    let headers = headers.collect();
    let body = resp.into_string().map_err(|e| e.to_string())?;
    Ok(Reply {
        status,
        body,
        headers,
    })
}

/// The path of a workspace binary, built by `cargo build --workspace` beside this test.
pub fn binary(name: &str) -> PathBuf {
    let exe = std::env::current_exe().unwrap();
    let dir = exe.parent().and_then(Path::parent).unwrap();
    let bin = dir.join(name);
    assert!(
        bin.exists(),
        "{} is missing: run `cargo build --workspace` first (scripts/test does)",
        bin.display()
    );
    bin
}

/// A running `weir-gateway` with one listener "web" and its admin listener on free ports.
pub struct Gateway {
    child: Child,
    pub port: u16,
    pub admin: u16,
    pub dir: tempfile::TempDir,
    /// The config file or directory the gateway was started on.
    pub config: PathBuf,
    agent: ureq::Agent,
}

impl Gateway {
    /// The `[runtime]`, `[admin]` and `[[listener]]` tables for these ports.
    pub fn base(port: u16, admin: u16) -> String {
        format!(
            "[runtime]\nthreads = 2\ngrace_period = \"5s\"\n[admin]\nlisten = \"127.0.0.1:{admin}\"\n\
             [[listener]]\nname = \"web\"\nlisten = \"127.0.0.1:{port}\"\n"
        )
    }

    /// Starts a gateway on `base()` followed by `config` (routes and services).
    pub fn start(config: &str) -> Gateway {
        Gateway::start_with_env(config, &[])
    }

    /// [`Gateway::start`], with these environment variables set for the gateway.
    pub fn start_with_env(config: &str, env: &[(&str, &str)]) -> Gateway {
        // A free port can be taken (by another process) before the gateway binds it;
        // the gateway then exits with "cannot bind", and new ports are tried.
        for _ in 0..3 {
            let dir = tempfile::tempdir().unwrap();
            let (port, admin) = (free_port(), free_port());
            let path = dir.path().join("gateway.toml");
            fs::write(&path, format!("{}{config}", Gateway::base(port, admin))).unwrap();
            match Gateway::try_start_on(dir, path, port, admin, env) {
                Err(e) if e.contains("cannot bind") => continue,
                started => return started.unwrap_or_else(|e| panic!("{e}")),
            }
        }
        panic!("weir-gateway found no free ports in three tries");
    }

    /// Starts a gateway on an existing config (file or directory) that uses these ports.
    pub fn start_on(dir: tempfile::TempDir, config: PathBuf, port: u16, admin: u16) -> Gateway {
        Gateway::try_start_on(dir, config, port, admin, &[]).unwrap_or_else(|e| panic!("{e}"))
    }

    /// A `weir-sidecar` on `config`, whose outbound listener is `port` (what [`Gateway::url`]
    /// and [`Gateway::get`] use) and admin listener `admin`.
    pub fn start_sidecar(
        dir: tempfile::TempDir,
        config: PathBuf,
        port: u16,
        admin: u16,
    ) -> Gateway {
        let child = proxy_command("weir-sidecar", &dir)
            .arg("--config")
            .arg(&config)
            .spawn()
            .unwrap();
        let sidecar = Gateway::spawned(child, dir, config, port, admin);
        sidecar.ready().unwrap_or_else(|e| panic!("{e}"))
    }

    /// [`Gateway::start_on`], with the reason as an error when it exits before it is ready.
    fn try_start_on(
        dir: tempfile::TempDir,
        config: PathBuf,
        port: u16,
        admin: u16,
        env: &[(&str, &str)],
    ) -> Result<Gateway, String> {
        let child = gateway_command(&dir)
            .envs(env.iter().copied())
            .arg("--config")
            .arg(&config)
            .spawn()
            .unwrap();
        Gateway::spawned(child, dir, config, port, admin).ready()
    }

    fn spawned(
        child: Child,
        dir: tempfile::TempDir,
        config: PathBuf,
        port: u16,
        admin: u16,
    ) -> Gateway {
        Gateway {
            child,
            port,
            admin,
            dir,
            config,
            agent: client(),
        }
    }

    /// Starts a gateway on `--config-git URL ARGS`, whose config in the repository uses these
    /// ports. Its checkout goes in its own directory (TMPDIR), deleted with it.
    pub fn start_git(url: &str, args: &[&str], port: u16, admin: u16) -> Gateway {
        let dir = tempfile::tempdir().unwrap();
        let child = gateway_command(&dir)
            .arg("--config-git")
            .arg(url)
            .args(args)
            .env("TMPDIR", dir.path())
            .spawn()
            .unwrap();
        let config = dir.path().to_path_buf();
        let gw = Gateway::spawned(child, dir, config, port, admin);
        gw.ready().unwrap_or_else(|e| panic!("{e}"))
    }

    /// Waits until `/ready` answers 200; the reason as an error when the gateway exits first.
    fn ready(mut self) -> Result<Gateway, String> {
        let gw = &mut self;
        let start = Instant::now();
        loop {
            if let Some(status) = gw.child.try_wait().unwrap() {
                let why = format!(
                    "the proxy exited with {status} before ready:\n{}",
                    gw.stderr()
                );
                return Err(why);
            }
            let ready = gw.admin_get("/ready");
            if matches!(&ready, Ok(r) if r.status == 200) {
                return Ok(self);
            }
            assert!(
                start.elapsed() < Duration::from_secs(20),
                "not ready in 20s (last /ready: {ready:?}):\n{}",
                gw.stderr()
            );
            thread::sleep(Duration::from_millis(20));
        }
    }

    /// Starts a gateway on this one's config with `--upgrade` and, once it waits for them, hands
    /// it this one's listening sockets (SIGQUIT): Pingora's graceful upgrade. This one then
    /// drains and exits.
    pub fn upgrade(&self) -> Gateway {
        let socket = private_dir().join(format!("upgrade-{}.sock", self.admin));
        // A file left by an earlier run would pass for the new gateway's socket.
        let _ = fs::remove_file(&socket);
        let dir = tempfile::tempdir().unwrap();
        let child = gateway_command(&dir)
            .arg("--config")
            .arg(&self.config)
            .arg("--upgrade")
            .spawn()
            .unwrap();
        wait_until(
            "the new gateway to wait for the sockets",
            Duration::from_secs(10),
            || socket.exists(),
        );
        self.signal("QUIT");
        Gateway::spawned(child, dir, self.config.clone(), self.port, self.admin)
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://127.0.0.1:{}{path}", self.port)
    }

    pub fn get(&self, path: &str, headers: &[(&str, &str)]) -> Reply {
        send(&self.agent, "GET", &self.url(path), headers).unwrap()
    }

    pub fn admin_get(&self, path: &str) -> Result<Reply, String> {
        send(
            &self.agent,
            "GET",
            &format!("http://127.0.0.1:{}{path}", self.admin),
            &[],
        )
    }

    /// The value of one series in admin `/metrics`, e.g.
    /// `weir_mirror_requests_total{result="dropped",service="shadow"}` (labels sorted by name,
    /// as Prometheus prints them); 0 when the series does not exist yet.
    pub fn metric(&self, series: &str) -> f64 {
        let text = self.admin_get("/metrics").unwrap().body;
        text.lines()
            .find_map(|l| l.strip_prefix(series)?.strip_prefix(' ')?.parse().ok())
            .unwrap_or(0.0)
    }

    /// Admin `/config` as JSON.
    pub fn status(&self) -> serde_json::Value {
        serde_json::from_str(&self.admin_get("/config").unwrap().body).unwrap()
    }

    pub fn generation(&self) -> u64 {
        self.status()["generation"].as_u64().unwrap()
    }

    /// Waits until admin `/config` reports a failed reload: its `last_error`.
    pub fn last_error(&self) -> String {
        wait_until("last_error", Duration::from_secs(5), || {
            !self.status()["last_error"].is_null()
        });
        self.status()["last_error"].as_str().unwrap().to_string()
    }

    /// Replaces the config file the way editors and `kubectl cp` do: write aside, rename over.
    pub fn write_config(&self, config: &str) {
        let tmp = self.dir.path().join(".gateway.toml.tmp");
        fs::write(
            &tmp,
            format!("{}{config}", Gateway::base(self.port, self.admin)),
        )
        .unwrap();
        fs::rename(&tmp, &self.config).unwrap();
    }

    /// Waits until the access log has `n` lines: the gateway is done with that many
    /// requests. (Pingora hands a request's upstream connection back to its pool just before
    /// the log line, and a moment after the client has its answer.)
    pub fn wait_logged(&self, n: usize) {
        wait_until("the access log lines", Duration::from_secs(10), || {
            self.access_log().len() >= n
        });
    }

    /// Access log lines so far, parsed.
    pub fn access_log(&self) -> Vec<serde_json::Value> {
        let text = fs::read_to_string(self.dir.path().join("stdout.log")).unwrap();
        text.lines()
            .filter_map(|l| serde_json::from_str(l).ok())
            .collect()
    }

    pub fn stderr(&self) -> String {
        fs::read_to_string(self.dir.path().join("stderr.log")).unwrap_or_default()
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Sends a signal by name ("TERM", "HUP", ...).
    pub fn signal(&self, name: &str) {
        let ok = Command::new("kill")
            .arg(format!("-{name}"))
            .arg(self.pid().to_string())
            .status()
            .unwrap();
        assert!(ok.success(), "kill -{name} failed");
    }

    /// Waits for the process to exit, up to `timeout`.
    pub fn wait_exit(&mut self, timeout: Duration) -> Option<std::process::ExitStatus> {
        let start = Instant::now();
        while start.elapsed() < timeout {
            if let Some(status) = self.child.try_wait().unwrap() {
                return Some(status);
            }
            thread::sleep(Duration::from_millis(20));
        }
        None
    }
}

impl Drop for Gateway {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        if thread::panicking() {
            println!("--- weir-gateway stderr ---\n{}", self.stderr());
            // The line count tells a client's retry (one line more) from the gateway's own.
            let log = self.access_log();
            let odd: Vec<String> = (log.iter())
                .filter(|l| l["status"] != 200 || l["flags"] != "")
                .take(20)
                .map(|l| l.to_string())
                .collect();
            println!(
                "--- weir-gateway access log: {} lines; not a plain 200: ---\n{}",
                log.len(),
                odd.join("\n")
            );
        }
    }
}

/// `weir-gateway`, its stdout and stderr in `dir`; the caller adds the arguments.
fn gateway_command(dir: &tempfile::TempDir) -> Command {
    proxy_command("weir-gateway", dir)
}

/// `bin` (weir-gateway or weir-sidecar), its stdout and stderr in `dir`.
fn proxy_command(bin: &str, dir: &tempfile::TempDir) -> Command {
    let stdout = fs::File::create(dir.path().join("stdout.log")).unwrap();
    let stderr = fs::File::create(dir.path().join("stderr.log")).unwrap();
    let mut command = Command::new(binary(bin));
    command.stdin(Stdio::null()).stdout(stdout).stderr(stderr);
    // Spans go to the collector every 100 ms, not the OTel SDK's default 5 s.
    command.env("OTEL_BSP_SCHEDULE_DELAY", "100");
    command
}

/// Sends raw bytes on a new connection and reads until the server closes it: for requests
/// an HTTP client would rewrite (dot segments) or follow (redirects).
pub fn raw_request(port: u16, request: &[u8]) -> String {
    use std::io::{Read, Write};
    let mut conn = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
    conn.write_all(request).unwrap();
    let mut reply = Vec::new();
    conn.read_to_end(&mut reply).unwrap();
    // Lossy: a binary body (say, one compressed by mistake) fails the caller's assert, which
    // shows it, rather than panicking here.
    String::from_utf8_lossy(&reply).into_owned()
}

/// Runs a workspace binary to completion: (exit code, stdout, stderr).
pub fn run(bin: &str, args: &[&str]) -> (i32, String, String) {
    let out = Command::new(binary(bin)).args(args).output().unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// The repository root, for tests of shipped configs.
pub fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .unwrap()
        .to_path_buf()
}

/// A server on a raw socket, for answers no real server gives (a trickled head, a body that
/// never ends, a header it should not send): each connection goes to `serve` on a thread of
/// its own. Its address.
pub fn raw_server(serve: impl Fn(std::net::TcpStream) + Clone + Send + 'static) -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    thread::spawn(move || {
        for conn in listener.incoming() {
            let Ok(conn) = conn else { return };
            let serve = serve.clone();
            thread::spawn(move || serve(conn));
        }
    });
    addr
}

/// Reads one request head off `conn`, a byte at a time so that nothing of the next request is
/// taken: false once the connection ends first.
pub fn read_head(conn: &mut std::net::TcpStream) -> bool {
    let mut head = Vec::new();
    let mut byte = [0; 1];
    while !head.ends_with(b"\r\n\r\n") {
        match conn.read(&mut byte) {
            Ok(1) => head.push(byte[0]),
            _ => return false,
        }
    }
    true
}

/// An address where a connect hangs: a listener that never accepts, its queue filled, so the
/// kernel drops further SYNs (as a host behind a firewall that drops them would).
pub struct BlackHole {
    pub addr: SocketAddr,
    _listener: TcpListener,
    _queued: Vec<std::net::TcpStream>,
}

impl BlackHole {
    pub fn start() -> BlackHole {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let mut queued = Vec::new();
        while let Ok(conn) = std::net::TcpStream::connect_timeout(&addr, Duration::from_millis(200))
        {
            queued.push(conn);
            assert!(queued.len() < 10_000, "the accept queue never filled");
        }
        BlackHole {
            addr,
            _listener: listener,
            _queued: queued,
        }
    }
}

/// How a `RawUpstream` ends its connections.
#[derive(Clone, Copy)]
pub enum Closes {
    /// Never: the gateway closes them.
    Never,
    /// After the first answer, without saying so (no `Connection: close`), as a server whose
    /// keep-alive ran out does.
    Silently,
    /// After this many answers, the last with `Connection: close`, leaving the requests after
    /// it unprocessed (RFC 9112 §9.6), as nginx does at its `keepalive_requests`.
    After(usize),
    /// On the second request, unanswered: counted (acted on), then the connection closed, as
    /// a server that crashed after the work.
    Unanswered,
}

/// An HTTP/1.1 server on a raw socket that answers `200 ok` to requests without bodies and
/// counts connections, requests, the most requests that came in one read (pipelined), and
/// each connection the gateway closes.
pub struct RawUpstream {
    pub addr: SocketAddr,
    pub connections: Arc<AtomicUsize>,
    pub requests: Arc<AtomicUsize>,
    pub most_in_one_read: Arc<AtomicUsize>,
    pub closed_by_gateway: Arc<AtomicUsize>,
}

impl RawUpstream {
    pub fn start(closes: Closes) -> RawUpstream {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let server = RawUpstream {
            addr: listener.local_addr().unwrap(),
            connections: Arc::default(),
            requests: Arc::default(),
            most_in_one_read: Arc::default(),
            closed_by_gateway: Arc::default(),
        };
        let (connections, requests) = (server.connections.clone(), server.requests.clone());
        let (most, closed) = (
            server.most_in_one_read.clone(),
            server.closed_by_gateway.clone(),
        );
        thread::spawn(move || {
            for conn in listener.incoming() {
                let Ok(mut conn) = conn else { return };
                connections.fetch_add(1, Ordering::SeqCst);
                let (requests, most, closed) = (requests.clone(), most.clone(), closed.clone());
                thread::spawn(move || {
                    let mut seen = Vec::new();
                    let mut buf = [0; 4096];
                    let mut answered = 0;
                    loop {
                        match conn.read(&mut buf) {
                            Ok(0) | Err(_) => {
                                closed.fetch_add(1, Ordering::SeqCst);
                                return;
                            }
                            Ok(n) => seen.extend_from_slice(&buf[..n]),
                        }
                        // Requests without bodies: each ends with an empty line.
                        let mut in_this_read = 0;
                        while let Some(end) = seen.windows(4).position(|w| w == b"\r\n\r\n") {
                            seen.drain(..end + 4);
                            in_this_read += 1;
                            answered += 1;
                            most.fetch_max(in_this_read, Ordering::SeqCst);
                            requests.fetch_add(1, Ordering::SeqCst);
                            if matches!(closes, Closes::Unanswered) && answered == 2 {
                                return;
                            }
                            let last = match closes {
                                Closes::Never | Closes::Unanswered => false,
                                Closes::Silently => true,
                                Closes::After(n) => answered == n,
                            };
                            let answer: &[u8] = if last && !matches!(closes, Closes::Silently) {
                                b"HTTP/1.1 200 OK\r\nconnection: close\r\ncontent-length: 2\r\n\r\nok"
                            } else {
                                b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok"
                            };
                            let _ = conn.write_all(answer);
                            if last {
                                return;
                            }
                        }
                    }
                });
            }
        });
        server
    }

    /// A `[[service]]` on this server, with `extra` lines.
    pub fn service(&self, name: &str, extra: &str) -> String {
        format!(
            "[[service]]\nname = \"{name}\"\nendpoints = [\"{}\"]\n{extra}",
            self.addr
        )
    }
}

/// A TCP relay to `target` that counts the connections it accepts: how many connections a
/// proxy opened, whatever it speaks over them. Given several targets, it takes them in turn,
/// as a layer-4 load balancer (a Kubernetes ClusterIP) in front of several servers does.
pub struct TcpRelay {
    pub port: u16,
    accepted: Arc<AtomicUsize>,
    stop: Arc<AtomicBool>,
}

impl TcpRelay {
    pub fn start(target: SocketAddr) -> TcpRelay {
        TcpRelay::round_robin(vec![target])
    }

    pub fn round_robin(targets: Vec<SocketAddr>) -> TcpRelay {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        let accepted = Arc::new(AtomicUsize::new(0));
        let stop = Arc::new(AtomicBool::new(false));
        let (count, stopping) = (accepted.clone(), stop.clone());
        thread::spawn(move || {
            for client in listener.incoming() {
                if stopping.load(Ordering::SeqCst) {
                    return;
                }
                let Ok(client) = client else { continue };
                let turn = count.fetch_add(1, Ordering::SeqCst);
                let target = targets[turn % targets.len()];
                let Ok(server) = std::net::TcpStream::connect(target) else {
                    continue;
                };
                for (mut from, mut to) in [
                    (client.try_clone().unwrap(), server.try_clone().unwrap()),
                    (server, client),
                ] {
                    thread::spawn(move || {
                        let _ = std::io::copy(&mut from, &mut to);
                        let _ = to.shutdown(std::net::Shutdown::Write);
                    });
                }
            }
        });
        TcpRelay {
            port,
            accepted,
            stop,
        }
    }

    /// Connections accepted so far.
    pub fn accepted(&self) -> usize {
        self.accepted.load(Ordering::SeqCst)
    }
}

impl Drop for TcpRelay {
    fn drop(&mut self) {
        // Wakes the accept loop so its thread ends.
        self.stop.store(true, Ordering::SeqCst);
        let _ = std::net::TcpStream::connect(("127.0.0.1", self.port));
    }
}

/// A private nginx (1 worker, in its own directory) serving `server` (the inside of a
/// `server { }` block, `{port}` standing for the port it gets); stopped when dropped.
pub struct Nginx {
    child: Child,
    pub port: u16,
    pub dir: tempfile::TempDir,
}

impl Nginx {
    pub fn start(server: &str) -> Nginx {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path().display();
        let port = free_port();
        for sub in ["client", "proxy", "fastcgi", "uwsgi", "scgi"] {
            fs::create_dir(dir.path().join(sub)).unwrap();
        }
        let conf = format!(
            "daemon off; worker_processes 1; pid {d}/nginx.pid; error_log {d}/error.log warn;\n\
             events {{ worker_connections 1024; }}\n\
             http {{\n  access_log {d}/access.log;\n\
             client_body_temp_path {d}/client; proxy_temp_path {d}/proxy; fastcgi_temp_path {d}/fastcgi;\n\
             uwsgi_temp_path {d}/uwsgi; scgi_temp_path {d}/scgi;\n\
             server {{\n{}\n}}\n}}\n",
            server.replace("{port}", &port.to_string())
        );
        let path = dir.path().join("nginx.conf");
        fs::write(&path, conf).unwrap();
        let child = Command::new("nginx")
            .arg("-c")
            .arg(&path)
            .arg("-p")
            .arg(dir.path())
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("nginx (scripts/test installs it)");
        let nginx = Nginx { child, port, dir };
        wait_until("nginx to listen", Duration::from_secs(10), || {
            std::net::TcpStream::connect(("127.0.0.1", port)).is_ok()
        });
        nginx
    }

    /// Its access log so far (nginx's default format).
    pub fn access_log(&self) -> String {
        fs::read_to_string(self.dir.path().join("access.log")).unwrap_or_default()
    }
}

impl Drop for Nginx {
    /// SIGTERM, so the master stops its worker before it exits (a SIGKILLed master leaves
    /// the worker running); SIGKILL only if it has not exited within 10 s.
    fn drop(&mut self) {
        let _ = Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status();
        let start = Instant::now();
        while start.elapsed() < Duration::from_secs(10) {
            if matches!(self.child.try_wait(), Ok(Some(_))) {
                return;
            }
            thread::sleep(Duration::from_millis(10));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// `curl` with these arguments: its stdout, or its stderr as the error.
pub fn curl(args: &[&str]) -> Result<String, String> {
    let out = Command::new("curl")
        .args(["-sS", "--max-time", "10"])
        .args(args)
        .output()
        .expect("curl (scripts/test installs it)");
    match out.status.success() {
        true => Ok(String::from_utf8_lossy(&out.stdout).into_owned()),
        false => Err(String::from_utf8_lossy(&out.stderr).into_owned()),
    }
}

/// Copies an example's `certs/` folder into `dir/certs`, so a test runs it as its README does.
pub fn copy_certs(example: &Path, dir: &Path) {
    fs::create_dir(dir.join("certs")).unwrap();
    for entry in fs::read_dir(example.join("certs")).unwrap() {
        let path = entry.unwrap().path();
        fs::copy(&path, dir.join("certs").join(path.file_name().unwrap())).unwrap();
    }
}

/// A Python server of the tests (tests/grpc/echo.py on Debian's python3-grpcio,
/// tests/h2/refuser.py on python3-h2, which scripts/test installs) on a free port, once it
/// accepts connections; stopped when dropped.
pub struct PythonServer {
    child: std::process::Child,
    pub port: u16,
}

impl PythonServer {
    /// `/usr/bin/python3 ARGS PORT`.
    pub fn start(args: &[&str]) -> PythonServer {
        let port = free_port();
        let child = std::process::Command::new("/usr/bin/python3")
            .args(args)
            .arg(port.to_string())
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::null())
            .spawn()
            .unwrap();
        let server = PythonServer { child, port };
        wait_until(&format!("{args:?}"), Duration::from_secs(20), || {
            std::net::TcpStream::connect(("127.0.0.1", server.port)).is_ok()
        });
        server
    }
}

impl Drop for PythonServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A file of the repository, as an argument.
pub fn script(path: &str) -> String {
    repo_root().join(path).display().to_string()
}

/// Runs tests/grpc/echo.py's h2c client (a real grpcio client, no TLS) against `port` with
/// `authority`, and checks that both its calls got through: the reply, and a failed call's
/// status with its message (carried in the trailers).
pub fn assert_grpc_h2c_calls(port: u16, authority: &str) {
    let out = Command::new("/usr/bin/python3")
        .args([
            &script("tests/grpc/echo.py"),
            "call-h2c",
            &port.to_string(),
            authority,
        ])
        .output()
        .unwrap();
    assert_eq!(
        String::from_utf8_lossy(&out.stdout),
        "say: olleh\nfail: NOT_FOUND nothing here\n",
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// The user's private directory where a proxy keeps its upgrade sockets and Git checkouts:
/// `$TMPDIR/weir-<uid>` (the uid read from a file this process creates).
pub fn private_dir() -> PathBuf {
    use std::os::unix::fs::MetadataExt;
    let uid = tempfile::tempfile().unwrap().metadata().unwrap().uid();
    std::env::temp_dir().join(format!("weir-{uid}"))
}
