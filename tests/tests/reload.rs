//! Hot reload against the real binary: file edits, bad files, symlink swaps, SIGHUP, load.
#![allow(clippy::unwrap_used)]

use std::fs;
use std::os::unix::fs::symlink;
use std::time::{Duration, Instant};

use weir_tests::{free_port, wait_until, Gateway, Load, Upstream};

fn hello(body: &str) -> String {
    format!(
        "[[route]]\nname = \"hello\"\ndirect_response = {{ status = 200, body = \"{body}\" }}\n"
    )
}

#[test]
fn a_new_route_is_live_within_two_seconds() {
    let up = Upstream::start("new");
    let gw = Gateway::start(&hello("old"));
    assert_eq!(gw.get("/new", &[]).body, "old");
    let routes = format!(
        "{}{}[[route]]\nname = \"new\"\n  [[route.match]]\n  path = {{ prefix = \"/new\" }}\n  [[route.backend]]\n  service = \"new\"\n",
        up.service(),
        hello("old")
    );
    let changed = Instant::now();
    gw.write_config(&routes);
    wait_until("the new route", Duration::from_secs(2), || {
        gw.get("/new", &[]).body == "new"
    });
    println!("new route live after {:?}", changed.elapsed());
    assert_eq!(gw.generation(), 2);
}

#[test]
fn an_invalid_reload_keeps_the_old_config_serving() {
    let gw = Gateway::start(&hello("good"));
    gw.write_config(&format!(
        "{}[[route]]\nname = \"broken\"\n  [[route.backend]]\n  service = \"paymnts\"\n",
        hello("bad")
    ));
    let err = gw.last_error();
    assert!(
        err.contains("gateway.toml:15: route \"broken\" backend[0]: unknown service \"paymnts\""),
        "{err}"
    );
    assert_eq!(gw.status()["generation"], 1);
    assert_eq!(gw.get("/", &[]).body, "good");
    assert!(
        gw.stderr().contains("unknown service \\\"paymnts\\\"")
            || gw.stderr().contains("unknown service \"paymnts\"")
    );

    // A good file afterwards clears the error.
    gw.write_config(&hello("fixed"));
    wait_until("the fixed config", Duration::from_secs(5), || {
        gw.get("/", &[]).body == "fixed"
    });
    assert!(gw.status()["last_error"].is_null());
}

#[test]
fn fifty_reloads_under_load_lose_no_request() {
    let up = Upstream::start("app");
    let config = |n: usize| {
        format!(
            "{}[[route]]\nname = \"app-{n}\"\n  [[route.match]]\n  path = {{ prefix = \"/\" }}\n  [[route.backend]]\n  service = \"app\"\n",
            up.service()
        )
    };
    let gw = Gateway::start(&config(0));
    let load = Load::start(&gw.url("/"), 4, "app");
    for n in 1..=50 {
        gw.write_config(&config(n));
        wait_until("reload", Duration::from_secs(5), || {
            gw.generation() == n as u64 + 1
        });
    }
    let (ok, failed) = load.stop();
    println!("{ok} requests served across 50 reloads, {failed} failed");
    assert!(ok > 200, "too few requests to mean anything: {ok}");
    assert_eq!(failed, 0);
}

/// Kubernetes mounts a ConfigMap as `file -> ..data/file`, `..data -> ..<timestamp>/`, and
/// swaps `..data` atomically on update.
#[test]
fn a_configmap_symlink_swap_is_picked_up() {
    let dir = tempfile::tempdir().unwrap();
    let mount = dir.path().to_path_buf();
    let (port, admin) = (free_port(), free_port());
    let version = |name: &str, body: &str| {
        let d = mount.join(name);
        fs::create_dir(&d).unwrap();
        fs::write(
            d.join("gateway.toml"),
            format!("{}{}", Gateway::base(port, admin), hello(body)),
        )
        .unwrap();
    };
    version("..2026_01_01_v1", "v1");
    symlink("..2026_01_01_v1", mount.join("..data")).unwrap();
    symlink("..data/gateway.toml", mount.join("gateway.toml")).unwrap();
    let gw = Gateway::start_on(dir, mount.join("gateway.toml"), port, admin);
    assert_eq!(gw.get("/", &[]).body, "v1");

    version("..2026_01_02_v2", "v2");
    symlink("..2026_01_02_v2", mount.join("..data_tmp")).unwrap();
    fs::rename(mount.join("..data_tmp"), mount.join("..data")).unwrap();
    wait_until("the swapped config", Duration::from_secs(3), || {
        gw.get("/", &[]).body == "v2"
    });
}

/// A config file that is a link to a file elsewhere (`/etc/weir/gateway.toml ->
/// /srv/configs/prod.toml`): an edit of the target is a change of the config.
#[test]
fn an_edit_where_a_link_points_is_picked_up() {
    let dir = tempfile::tempdir().unwrap();
    let (port, admin) = (free_port(), free_port());
    let (etc, srv) = (dir.path().join("etc"), dir.path().join("srv"));
    fs::create_dir(&etc).unwrap();
    fs::create_dir(&srv).unwrap();
    let target = srv.join("prod.toml");
    let write = |body: &str| {
        fs::write(
            &target,
            format!("{}{}", Gateway::base(port, admin), hello(body)),
        )
        .unwrap();
    };
    write("before");
    symlink(&target, etc.join("gateway.toml")).unwrap();
    let gw = Gateway::start_on(dir, etc.join("gateway.toml"), port, admin);
    assert_eq!(gw.get("/", &[]).body, "before");
    write("after");
    wait_until("the edited target", Duration::from_secs(3), || {
        gw.get("/", &[]).body == "after"
    });
}

#[test]
fn a_config_directory_reloads_when_a_file_is_added() {
    let dir = tempfile::tempdir().unwrap();
    let (port, admin) = (free_port(), free_port());
    let conf = dir.path().join("conf.d");
    fs::create_dir(&conf).unwrap();
    fs::write(conf.join("00-base.toml"), Gateway::base(port, admin)).unwrap();
    fs::write(conf.join("10-hello.toml"), hello("one file")).unwrap();
    let gw = Gateway::start_on(dir, conf.clone(), port, admin);
    assert_eq!(gw.get("/", &[]).body, "one file");
    fs::write(
        conf.join("20-more.toml"),
        "[[route]]\nname = \"more\"\ndirect_response = { status = 200, body = \"two files\" }\n  [[route.match]]\n  path = { exact = \"/more\" }\n",
    )
    .unwrap();
    wait_until("the added file", Duration::from_secs(3), || {
        gw.get("/more", &[]).body == "two files"
    });

    // The directory replaced whole (as a deploy tool renames a new one in): seen, and edits
    // in the new one are seen after it.
    let next = conf.with_file_name("conf.next");
    fs::create_dir(&next).unwrap();
    fs::write(next.join("00-base.toml"), Gateway::base(port, admin)).unwrap();
    fs::write(next.join("10-hello.toml"), hello("new directory")).unwrap();
    fs::rename(&conf, conf.with_file_name("conf.old")).unwrap();
    fs::rename(&next, &conf).unwrap();
    wait_until("the new directory", Duration::from_secs(3), || {
        gw.get("/", &[]).body == "new directory"
    });
    fs::write(conf.join("10-hello.toml"), hello("edited in it")).unwrap();
    wait_until(
        "an edit in the new directory",
        Duration::from_secs(3),
        || gw.get("/", &[]).body == "edited in it",
    );
}

/// A config directory away for longer than the reload's quiet time (two renames with a pause
/// between them), naming files beside it by `../`: the watch stays, so the directory put back
/// and edits in it are seen (they were not, until SIGHUP).
#[test]
fn a_directory_away_for_a_while_is_still_watched_with_files_named_beside_it() {
    let dir = tempfile::tempdir().unwrap();
    let (port, admin) = (free_port(), free_port());
    let certs = dir.path().join("certs");
    fs::create_dir(&certs).unwrap();
    let ca = weir_tests::tls::TestCa::new("beside");
    fs::write(certs.join("ca.pem"), ca.pem()).unwrap();
    let conf = dir.path().join("conf");
    let base = format!(
        "{}[[service]]\nname = \"s\"\nendpoints = [\"127.0.0.1:1\"]\n  [service.tls]\n  \
         sni = \"s.example\"\n  ca = \"../certs/ca.pem\"\n",
        Gateway::base(port, admin)
    );
    let fill = |at: &std::path::Path, body: &str| {
        fs::create_dir_all(at).unwrap();
        fs::write(at.join("00-base.toml"), &base).unwrap();
        fs::write(at.join("10-hello.toml"), hello(body)).unwrap();
    };
    fill(&conf, "first");
    let gw = Gateway::start_on(dir, conf.clone(), port, admin);
    assert_eq!(gw.get("/", &[]).body, "first");
    let away = conf.with_file_name("conf.old");
    fs::rename(&conf, &away).unwrap();
    wait_until("the directory missed", Duration::from_secs(5), || {
        gw.last_error().contains("conf")
    });
    fill(&away, "back");
    fs::rename(&away, &conf).unwrap();
    wait_until("the directory back", Duration::from_secs(5), || {
        gw.get("/", &[]).body == "back"
    });
    fs::write(conf.join("10-hello.toml"), hello("edited")).unwrap();
    wait_until("an edit in it", Duration::from_secs(5), || {
        gw.get("/", &[]).body == "edited"
    });
}

#[test]
fn sighup_reloads_and_keeps_running() {
    let gw = Gateway::start(&hello("before"));
    gw.signal("HUP");
    wait_until("SIGHUP in the log", Duration::from_secs(5), || {
        gw.stderr().contains("SIGHUP")
    });
    assert_eq!(gw.get("/", &[]).body, "before");
    gw.write_config(&hello("after"));
    gw.signal("HUP");
    wait_until("the new body", Duration::from_secs(5), || {
        gw.get("/", &[]).body == "after"
    });
}

#[test]
fn a_listener_change_is_refused_until_restart() {
    let gw = Gateway::start(&hello("kept"));
    let moved_to = free_port();
    let moved = format!(
        "[admin]\nlisten = \"127.0.0.1:{}\"\n[[listener]]\nname = \"web\"\nlisten = \"127.0.0.1:{moved_to}\"\n{}",
        gw.admin,
        hello("new")
    );
    std::fs::write(gw.dir.path().join(".tmp.toml"), moved).unwrap();
    std::fs::rename(gw.dir.path().join(".tmp.toml"), &gw.config).unwrap();
    let err = gw.last_error();
    let said = format!(
        "listener \"web\" listen changed (\"127.0.0.1:{}\" -> \"127.0.0.1:{moved_to}\"); it \
         applies only at start",
        gw.port
    );
    assert!(err.starts_with(&said), "{err}");
    assert_eq!(gw.get("/", &[]).body, "kept");
}
