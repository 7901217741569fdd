//! DNS discovery against a real DNS server (dnsmasq on a loopback port): endpoints follow the
//! answers without a config reload (none when the name has no address), and a failed lookup
//! keeps the last good set.
#![allow(clippy::unwrap_used)]

use std::fs;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use weir_tests::{free_port, wait_until, Gateway, Upstream};

/// dnsmasq answering from a hosts file with a TTL of 1 s; killed on drop.
struct Dnsmasq {
    child: Child,
    port: u16,
    hosts: PathBuf,
    _dir: tempfile::TempDir,
}

impl Dnsmasq {
    fn start(hosts: &str) -> Dnsmasq {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("hosts");
        fs::write(&path, hosts).unwrap();
        let port = free_port();
        // Debian puts it in /usr/sbin, which a non-root PATH may lack.
        let bin = ["/usr/sbin/dnsmasq", "/usr/bin/dnsmasq"]
            .into_iter()
            .find(|p| std::path::Path::new(p).exists())
            .unwrap_or("dnsmasq");
        let mut cmd = Command::new(bin);
        cmd.args([
            "--keep-in-foreground",
            "--conf-file=/dev/null",
            "--no-resolv",
            "--no-hosts",
            "--bind-interfaces",
            "--listen-address=127.0.0.1",
            "--local-ttl=1",
            // Authoritative for the test's domain: a name not in the hosts file is NXDOMAIN.
            "--local=/weir.test/",
            "--pid-file=",
            &format!("--port={port}"),
            &format!("--addn-hosts={}", path.display()),
        ]);
        // As root dnsmasq would drop to "nobody", who cannot read the private temp dir.
        if is_root() {
            cmd.arg("--user=root");
        }
        let child = cmd
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("dnsmasq (scripts/test installs dnsmasq-base)");
        Dnsmasq {
            child,
            port,
            hosts: path,
            _dir: dir,
        }
    }

    /// New answers: rewrite the hosts file and tell dnsmasq to read it again.
    fn answer(&self, hosts: &str) {
        fs::write(&self.hosts, hosts).unwrap();
        let ok = Command::new("kill")
            .args(["-HUP", &self.child.id().to_string()])
            .status()
            .unwrap();
        assert!(ok.success());
    }
}

impl Drop for Dnsmasq {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn is_root() -> bool {
    Command::new("id")
        .arg("-u")
        .output()
        .map(|o| o.stdout.starts_with(b"0\n"))
        .unwrap_or(false)
}

#[test]
fn endpoints_follow_dns_answers_without_a_reload_and_survive_a_dead_server() {
    let port = free_port();
    let a = Upstream::start_at("a", &format!("127.0.0.1:{port}"));
    let b = Upstream::start_at("b", &format!("127.0.0.2:{port}"));
    let mut dns = Dnsmasq::start("127.0.0.1 app.weir.test\n");

    let dir = tempfile::tempdir().unwrap();
    let (listen, admin) = (free_port(), free_port());
    let config = dir.path().join("gateway.toml");
    let base = Gateway::base(listen, admin).replace(
        "[runtime]\n",
        &format!("[runtime]\nnameservers = [\"127.0.0.1:{}\"]\n", dns.port),
    );
    fs::write(
        &config,
        format!(
            // With the root dot Kubernetes users write to skip the search domains.
            "{base}[[service]]\nname = \"app\"\ndns = \"app.weir.test.:{port}\"\n\
             [[route]]\nname = \"r\"\n  [[route.backend]]\n  service = \"app\"\n"
        ),
    )
    .unwrap();
    let gw = Gateway::start_on(dir, config, listen, admin);
    wait_until("the first answer", Duration::from_secs(10), || {
        gw.get("/", &[]).body == "a"
    });

    dns.answer("127.0.0.2 app.weir.test\n");
    wait_until("the new answer", Duration::from_secs(10), || {
        gw.get("/", &[]).body == "b"
    });
    assert_eq!(gw.generation(), 1, "no config reload was needed");

    // The name has no address any more (a headless service with no ready pod): no endpoints,
    // 503 UH, until it has one again.
    dns.answer("");
    wait_until("no endpoints", Duration::from_secs(10), || {
        gw.get("/", &[]).status == 503
    });
    assert_eq!(gw.get("/", &[]).body, "no healthy upstream\n");
    dns.answer("127.0.0.2 app.weir.test\n");
    wait_until("the address back", Duration::from_secs(10), || {
        gw.get("/", &[]).body == "b"
    });
    let before = a.hits();

    // The server goes away: lookups fail, the last good endpoints stay.
    let _ = dns.child.kill();
    let _ = dns.child.wait();
    wait_until("a failed lookup", Duration::from_secs(30), || {
        gw.stderr().contains("dns: lookup failed")
    });
    for _ in 0..5 {
        assert_eq!(gw.get("/", &[]).body, "b");
    }
    assert_eq!(a.hits(), before);
    assert!(b.hits() >= 6);
}
