//! Config from a Git repository (`--config-git`), served by a real `git daemon` that the test
//! pushes commits to.
#![allow(clippy::unwrap_used)]

use std::fs;
use std::net::TcpStream;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use weir_tests::tls::{https_get, TestCa};
use weir_tests::{free_port, run, wait_until, Gateway};

/// `git daemon` serving one repository, `config.git`, which accepts pushes; killed when dropped.
struct GitServer {
    daemon: Child,
    url: String,
    /// The working copy commits are made in.
    work: std::path::PathBuf,
    _dir: tempfile::TempDir,
}

fn git(dir: &Path, args: &[&str]) -> String {
    let out = Command::new("git")
        .current_dir(dir)
        .args(args)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "git {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

impl GitServer {
    fn start() -> GitServer {
        let dir = tempfile::tempdir().unwrap();
        let served = dir.path().join("served");
        fs::create_dir(&served).unwrap();
        git(&served, &["init", "--quiet", "--bare", "config.git"]);
        let port = free_port();
        // git-daemon itself, not `git daemon`, which runs it as a child of its own: killing
        // that wrapper would leave the daemon running.
        let exec_path = git(Path::new("."), &["--exec-path"]);
        let daemon = Command::new(Path::new(&exec_path).join("git-daemon"))
            .arg("--reuseaddr")
            .arg("--export-all")
            .arg("--enable=receive-pack")
            .arg("--listen=127.0.0.1")
            .arg(format!("--port={port}"))
            .arg(format!("--base-path={}", served.display()))
            .arg(&served)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        wait_until("git daemon to listen", Duration::from_secs(10), || {
            TcpStream::connect(("127.0.0.1", port)).is_ok()
        });
        let work = dir.path().join("work");
        fs::create_dir(&work).unwrap();
        git(&work, &["init", "--quiet", "--initial-branch=prod"]);
        git(&work, &["config", "user.email", "ops@example.com"]);
        git(&work, &["config", "user.name", "ops"]);
        GitServer {
            daemon,
            url: format!("git://127.0.0.1:{port}/config.git"),
            work,
            _dir: dir,
        }
    }

    /// Commits `text` as `gw/gateway.toml` on branch prod and pushes it; the commit's id.
    fn push(&self, text: &str) -> String {
        fs::create_dir_all(self.work.join("gw")).unwrap();
        fs::write(self.work.join("gw/gateway.toml"), text).unwrap();
        git(&self.work, &["add", "."]);
        git(&self.work, &["commit", "--quiet", "--message", "config"]);
        git(&self.work, &["push", "--quiet", &self.url, "prod"]);
        git(&self.work, &["rev-parse", "HEAD"])
    }

    /// Moves branch prod to `commit`, as a force-push of a revert would.
    fn force(&self, commit: &str) {
        let refspec = format!("{commit}:refs/heads/prod");
        git(
            &self.work,
            &["push", "--quiet", "--force", &self.url, &refspec],
        );
    }
}

impl Drop for GitServer {
    fn drop(&mut self) {
        let _ = self.daemon.kill();
        let _ = self.daemon.wait();
    }
}

/// The test repository's branch and config directory, fetched every 200 ms.
const PROD_POLLED: [&str; 6] = [
    "--git-ref",
    "prod",
    "--git-path",
    "gw",
    "--git-poll",
    "200ms",
];

fn hello(port: u16, admin: u16, body: &str) -> String {
    format!(
        "{}[[route]]\nname = \"hello\"\ndirect_response = {{ status = 200, body = \"{body}\" }}\n",
        Gateway::base(port, admin)
    )
}

#[test]
fn pushed_commits_are_served_and_bad_ones_kept_out() {
    let server = GitServer::start();
    let (port, admin) = (free_port(), free_port());
    let first = server.push(&hello(port, admin, "one"));
    let gw = Gateway::start_git(&server.url, &PROD_POLLED, port, admin);
    assert_eq!(gw.get("/", &[]).body, "one");
    let status = gw.status();
    assert_eq!(status["revision"], first.as_str());
    assert!(
        status["source"].as_str().unwrap().contains(&server.url),
        "{status}"
    );

    let second = server.push(&hello(port, admin, "two"));
    wait_until("the second commit", Duration::from_secs(10), || {
        gw.get("/", &[]).body == "two"
    });
    let status = gw.status();
    assert_eq!(
        (status["generation"].as_u64(), status["revision"].as_str()),
        (Some(2), Some(second.as_str()))
    );
    assert_eq!(
        gw.metric(&format!(
            "weir_config_info{{revision=\"{second}\",source=\"{}\"}}",
            status["source"].as_str().unwrap()
        )),
        1.0
    );

    // A commit that does not validate is reported, by commit and path in the repository,
    // and kept out.
    let bad = server.push(&format!(
        "{}colour = \"blue\"\n",
        hello(port, admin, "three")
    ));
    wait_until("the bad commit reported", Duration::from_secs(10), || {
        gw.status()["last_error"]
            .as_str()
            .is_some_and(|e| e.contains("unknown key \"colour\""))
    });
    let reported = gw.status()["last_error"].as_str().unwrap().to_string();
    assert!(
        reported.starts_with(&format!("{}:gw/gateway.toml:", &bad[..12])),
        "{reported}"
    );
    assert_eq!(gw.get("/", &[]).body, "two");
    assert_eq!(gw.status()["revision"], second.as_str());

    // The server gone: the gateway says so and serves on.
    drop(server);
    wait_until("a failed fetch logged", Duration::from_secs(10), || {
        gw.stderr().contains("git: fetching")
    });
    // And counted, for an alert on a gateway serving a stale config.
    assert!(gw.metric("weir_config_fetch_failures_total") >= 1.0);
    assert_eq!(gw.get("/", &[]).body, "two");
}

/// The checkout (and the upgrade socket) live in a directory of the user's alone: in a shared
/// `/tmp` another user could otherwise plant the checkout directory first and serve their own
/// config, or bind the upgrade socket and be handed the listeners.
#[test]
fn the_checkout_is_in_a_directory_of_the_user_s_alone() {
    use std::os::unix::fs::{MetadataExt, PermissionsExt};
    let server = GitServer::start();
    let (port, admin) = (free_port(), free_port());
    server.push(&hello(port, admin, "one"));
    let gw = Gateway::start_git(&server.url, &PROD_POLLED, port, admin);
    let name = weir_tests::private_dir();
    let name = name.file_name().unwrap();
    let private = gw.dir.path().join(name);
    let meta = fs::symlink_metadata(&private).unwrap();
    assert_eq!(meta.mode() & 0o777, 0o700);
    let checkout = private.join(format!("git-{}", gw.pid()));
    assert!(checkout.join("current/gw/gateway.toml").exists());
    drop(gw);
    // A start with this TMPDIR that fails: its stderr.
    let fails = |tmp: &Path| {
        let out = Command::new(weir_tests::binary("weir-gateway"))
            .args(["--config-git", &server.url])
            .args(PROD_POLLED)
            .env("TMPDIR", tmp)
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
        assert_eq!(out.status.code(), Some(1), "{stderr}");
        stderr
    };
    // One that others may write in is refused, not used.
    let tmp = tempfile::tempdir().unwrap();
    let shared = tmp.path().join(name);
    fs::create_dir(&shared).unwrap();
    fs::set_permissions(&shared, fs::Permissions::from_mode(0o777)).unwrap();
    let stderr = fails(tmp.path());
    assert!(
        stderr.contains("is not a directory of this user's alone"),
        "{stderr}"
    );
    assert_eq!(fs::read_dir(&shared).unwrap().count(), 0, "it was used");
    // A start that fails after the fetch (its port taken) leaves no checkout behind.
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = taken.local_addr().unwrap().port();
    server.push(&hello(port, free_port(), "two"));
    let tmp = tempfile::tempdir().unwrap();
    let stderr = fails(tmp.path());
    let left: Vec<_> = fs::read_dir(tmp.path().join(name)).unwrap().collect();
    assert!(left.is_empty(), "{left:?} left behind: {stderr}");
}

/// A refused commit is refused whenever the ref comes to it, its errors shown; a ref moved back
/// from it to the commit serving clears them; SIGHUP tries it again (a file it names may have
/// come since, as cert-manager writes certificates after the commit that names them).
#[test]
fn a_refused_commit_is_said_while_the_ref_is_at_it_and_retried_at_sighup() {
    let server = GitServer::start();
    let (port, admin) = (free_port(), free_port());
    let good = server.push(&hello(port, admin, "one"));
    let gw = Gateway::start_git(&server.url, &PROD_POLLED, port, admin);
    let error = || gw.status()["last_error"].as_str().map(String::from);
    let bad = server.push(&format!("{}colour = 1\n", hello(port, admin, "bad")));
    wait_until("the bad commit refused", Duration::from_secs(10), || {
        error().is_some_and(|e| e.contains("colour"))
    });
    server.force(&good);
    wait_until("the error cleared", Duration::from_secs(10), || {
        error().is_none()
    });
    server.force(&bad);
    wait_until("refused again", Duration::from_secs(10), || {
        error().is_some_and(|e| e.contains("colour"))
    });
    assert_eq!(gw.get("/", &[]).body, "one");
    // A commit that names a file not written yet: refused, then served at SIGHUP once it is.
    let files = tempfile::tempdir().unwrap();
    let later = files.path().join("later-ca.pem");
    let waiting = server.push(&format!(
        "{}[[service]]\nname = \"later\"\nendpoints = [\"127.0.0.1:1\"]\n  [service.tls]\n  sni = \"later.example\"\n  ca = \"{}\"\n",
        hello(port, admin, "two"),
        later.display()
    ));
    wait_until("the commit refused", Duration::from_secs(10), || {
        error().is_some_and(|e| e.contains("later-ca.pem"))
    });
    fs::write(&later, TestCa::new("later CA").pem()).unwrap();
    gw.signal("HUP");
    wait_until("served after SIGHUP", Duration::from_secs(10), || {
        gw.get("/", &[]).body == "two"
    });
    assert_eq!(gw.status()["revision"], waiting.as_str());
    assert_eq!(error(), None);
}

#[test]
fn an_unreachable_repository_is_a_clear_error_at_start() {
    let url = format!("git://127.0.0.1:{}/config.git", free_port());
    let (code, _, stderr) = run("weir-gateway", &["--config-git", &url]);
    assert_eq!(code, 1, "{stderr}");
    assert!(stderr.contains(&format!("fetching {url} main")), "{stderr}");
    // A ref or URL is never taken for one of git's options.
    let dir = tempfile::tempdir().unwrap();
    let pwned = dir.path().join("pwned");
    let option = format!("--upload-pack=touch {};git-upload-pack", pwned.display());
    let (as_ref, as_url) = (
        format!("--git-ref={option}"),
        format!("--config-git={option}"),
    );
    for args in [
        ["--config-git", &url, &as_ref],
        ["--git-ref", "main", &as_url],
    ] {
        let (code, _, stderr) = run("weir-gateway", &args);
        assert_eq!(code, 1, "{stderr}");
        assert!(!pwned.exists(), "{args:?} ran a command");
    }
    // The config path is in the repository.
    for path in ["/etc/weir", "gw/../../etc"] {
        let (code, _, stderr) = run("weir-gateway", &["--config-git", &url, "--git-path", path]);
        assert_eq!(code, 2, "{stderr}");
        assert!(stderr.contains("a path inside the repository"), "{stderr}");
    }
    // A URL's credentials are never shown.
    let url = url.replace("git://", "git://deploy:s3cr3t@");
    let (code, _, stderr) = run("weir-gateway", &["--config-git", &url]);
    assert_eq!(code, 1, "{stderr}");
    assert!(stderr.contains("fetching git://***@127.0.0.1:"), "{stderr}");
    assert!(!stderr.contains("s3cr3t"), "{stderr}");
}

/// A certificate the config names by an absolute path, outside the repository, is rotated
/// under the same commit: the next poll serves the new one, as a file config would.
#[test]
fn a_certificate_rotated_outside_the_repository_is_served() {
    let ca = TestCa::new("weir test CA");
    let certs = tempfile::tempdir().unwrap();
    let write_pair = |names: &[&str]| {
        let pair = ca.server(names);
        fs::write(certs.path().join("a.pem"), &pair.cert).unwrap();
        fs::write(certs.path().join("a-key.pem"), &pair.key).unwrap();
    };
    write_pair(&["a.example"]);
    let server = GitServer::start();
    let (port, admin) = (free_port(), free_port());
    let dir = certs.path().display();
    let config = |body: &str| {
        format!(
            "{}protocol = \"https\"\n  [[listener.certificate]]\n  cert = \"{dir}/a.pem\"\n  \
             key = \"{dir}/a-key.pem\"\n[[route]]\nname = \"hello\"\n\
             direct_response = {{ status = 200, body = \"{body}\" }}\n",
            Gateway::base(port, admin)
        )
    };
    let commit = server.push(&config("one"));
    let gw = Gateway::start_git(&server.url, &PROD_POLLED, port, admin);
    let ca_pem = ca.pem();
    let served = || https_get(port, "a.example", &ca_pem, None, "/", &[]).map(|r| r.served);
    assert_eq!(served().unwrap(), ["a.example"]);

    write_pair(&["a.example", "rotated.example"]);
    wait_until("the rotated certificate", Duration::from_secs(10), || {
        served().is_ok_and(|names| names.contains(&"rotated.example".to_string()))
    });
    let status = gw.status();
    assert_eq!(
        (status["generation"].as_u64(), status["revision"].as_str()),
        (Some(2), Some(commit.as_str()))
    );

    // A refused commit on the branch does not hold a rotation up: it reloads under the commit
    // serving.
    server.push("colour = \"blue\"\n");
    wait_until("the bad commit reported", Duration::from_secs(10), || {
        gw.status()["last_error"]
            .as_str()
            .is_some_and(|e| e.contains("unknown key \"colour\""))
    });
    write_pair(&["a.example", "again.example"]);
    wait_until(
        "the certificate rotated again",
        Duration::from_secs(10),
        || served().is_ok_and(|names| names.contains(&"again.example".to_string())),
    );
    let status = gw.status();
    assert_eq!(status["revision"], commit.as_str());
    // The ref still names the refused commit: `/config` still says why it does not serve.
    let refused = |status: &serde_json::Value| {
        status["last_error"]
            .as_str()
            .is_some_and(|e| e.contains("unknown key \"colour\""))
    };
    assert!(refused(&status), "{status}");
    // Until the ref moves on to a good commit.
    let good = server.push(&config("two"));
    wait_until("the good commit", Duration::from_secs(10), || {
        gw.status()["revision"] == good.as_str()
    });
    assert!(!refused(&gw.status()), "{}", gw.status());
}

/// A Git server that accepts and then never answers: each fetch gives up after the poll
/// period (here the least, 5 s), and the next one, the server back, serves the new commit.
#[test]
fn a_git_server_that_stops_answering_holds_nothing_up() {
    use std::io::{Read, Write};
    use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
    use std::sync::Arc;
    let server = GitServer::start();
    let daemon = server
        .url
        .trim_start_matches("git://")
        .split('/')
        .next()
        .unwrap()
        .to_string();
    // A relay in front of the daemon, which can be told to swallow connections instead.
    let hang = Arc::new(AtomicBool::new(false));
    let swallowed = Arc::new(AtomicUsize::new(0));
    let counting = swallowed.clone();
    let relay = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let relay_port = relay.local_addr().unwrap().port();
    let swallowing = hang.clone();
    std::thread::spawn(move || {
        let mut held = Vec::new();
        for client in relay.incoming() {
            let Ok(client) = client else { return };
            if swallowing.load(Ordering::SeqCst) {
                held.push(client);
                counting.fetch_add(1, Ordering::SeqCst);
                continue;
            }
            let Ok(daemon) = TcpStream::connect(&daemon) else {
                continue;
            };
            for (mut from, mut to) in [
                (client.try_clone().unwrap(), daemon.try_clone().unwrap()),
                (daemon, client),
            ] {
                std::thread::spawn(move || {
                    let mut buf = [0; 8192];
                    while let Ok(n @ 1..) = from.read(&mut buf) {
                        if to.write_all(&buf[..n]).is_err() {
                            break;
                        }
                    }
                    let _ = to.shutdown(std::net::Shutdown::Write);
                });
            }
        }
    });
    let (port, admin) = (free_port(), free_port());
    server.push(&hello(port, admin, "one"));
    let url = format!("git://127.0.0.1:{relay_port}/config.git");
    let mut gw = Gateway::start_git(&url, &PROD_POLLED, port, admin);
    assert_eq!(gw.get("/", &[]).body, "one");

    hang.store(true, Ordering::SeqCst);
    server.push(&hello(port, admin, "two"));
    wait_until("a fetch given up", Duration::from_secs(15), || {
        gw.stderr().contains("no answer in 5s")
    });
    assert_eq!(gw.get("/", &[]).body, "one");
    hang.store(false, Ordering::SeqCst);
    wait_until(
        "the new commit, the server back",
        Duration::from_secs(15),
        || gw.get("/", &[]).body == "two",
    );

    // A SIGTERM while a fetch hangs drains at once: the fetch does not give up first.
    hang.store(true, Ordering::SeqCst);
    let before = swallowed.load(Ordering::SeqCst);
    wait_until("a fetch hanging", Duration::from_secs(5), || {
        swallowed.load(Ordering::SeqCst) > before
    });
    let given_up = gw.stderr().matches("no answer in 5s").count();
    gw.signal("TERM");
    let status = gw.wait_exit(Duration::from_secs(15));
    assert!(status.is_some_and(|s| s.success()), "{status:?}");
    let stderr = gw.stderr();
    assert!(stderr.contains("drained; exiting"), "{stderr}");
    assert_eq!(
        stderr.matches("no answer in 5s").count(),
        given_up,
        "{stderr}"
    );
}

#[test]
fn a_zero_poll_period_is_refused() {
    let (code, _, stderr) = run(
        "weir-gateway",
        &[
            "--config-git",
            "git://127.0.0.1:1/x.git",
            "--git-poll",
            "0s",
        ],
    );
    assert_eq!(code, 2, "{stderr}");
    assert!(stderr.contains("must be more than 0"), "{stderr}");
    // Nor one that would run git hundreds of times a second.
    let args = [
        "--config-git",
        "git://127.0.0.1:1/x.git",
        "--git-poll",
        "1ms",
    ];
    let (code, _, stderr) = run("weir-gateway", &args);
    assert_eq!(code, 2, "{stderr}");
    assert!(stderr.contains("at least 100ms"), "{stderr}");
}
