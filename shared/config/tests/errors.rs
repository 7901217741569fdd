//! The config language's errors: each names its file, line and path, and all come at once.
#![allow(clippy::unwrap_used)]

use std::fs;
use std::path::Path;
use std::time::Duration;

use weir_config::{load, parse, Role};

fn errors(text: &str) -> Vec<String> {
    match parse("gw.toml", text, Role::Gateway) {
        Ok(_) => panic!("expected errors for:\n{text}"),
        Err(e) => e.0.iter().map(|e| e.to_string()).collect(),
    }
}

const SERVICE: &str = "[[service]]\nname = \"reviews\"\nendpoints = [\"127.0.0.1:9081\"]\n";

#[test]
fn every_error_is_reported_with_file_line_and_path() {
    let text = format!(
        "{SERVICE}\
[[route]]
name = \"web\"
  [[route.match]]
  path = {{ regex = \"/api/(\" }}
  [[route.match]]
  path = {{ regex = \"/a)|(/b\" }}
  [[route.backend]]
  service = \"reviews\"
  [[route.backend]]
  service = \"paymnts\"

[runtime]
grace_period = \"10 seconds\"
colour = \"blue\"

[[listener]]
name = \"web\"
listen = \"localhost:80\"
idle_timeout = \"0s\"
max_connections = 0
"
    );
    let errs = errors(&text);
    assert_eq!(
        errs,
        [
            "gw.toml:7: route \"web\" match[0]: path: bad regex \"/api/(\": unclosed group",
            "gw.toml:9: route \"web\" match[1]: path: bad regex \"/a)|(/b\": unopened group",
            "gw.toml:13: route \"web\" backend[1]: unknown service \"paymnts\"",
            "gw.toml:16: [runtime]: grace_period: bad duration \"10 seconds\": unknown unit \" seconds\" (ms, s, m, h)",
            "gw.toml:17: [runtime]: unknown key \"colour\"",
            "gw.toml:21: listener \"web\": bad address \"localhost:80\": expected ip:port, such as \"127.0.0.1:8080\"",
            "gw.toml:22: listener \"web\": idle_timeout must be more than 0",
            "gw.toml:23: listener \"web\": max_connections must be at least 1",
        ]
    );
}

#[test]
fn weights_summing_to_zero_and_missing_actions_are_errors() {
    let text = format!(
        "{SERVICE}\
[[route]]
name = \"zero\"
  [[route.backend]]
  service = \"reviews\"
  weight = 0
[[route]]
name = \"nothing\"
[[route]]
name = \"both\"
direct_response = {{ status = 200 }}
  [[route.backend]]
  service = \"reviews\"
"
    );
    let errs = errors(&text);
    assert_eq!(errs.len(), 3, "{errs:#?}");
    assert!(
        errs[0].starts_with("gw.toml:6: route \"zero\": backend weights sum to 0"),
        "{}",
        errs[0]
    );
    assert!(
        errs[1].starts_with("gw.toml:9: route \"nothing\": needs [[route.backend]]"),
        "{}",
        errs[1]
    );
    assert!(
        errs[2].starts_with("gw.toml:11: route \"both\": has more than one of"),
        "{}",
        errs[2]
    );
}

#[test]
fn header_and_host_values_are_checked() {
    let text = format!(
        "{SERVICE}\
[[route]]
name = \"r\"
hosts = [\"ok.example.com\", \"bad host:80\"]
direct_response = {{ status = 700 }}
  [[route.match]]
  headers = {{ \"bad header\" = {{ exact = \"x\" }}, \"x-two\" = {{ exact = \"a\", prefix = \"b\" }} }}
  path = {{ prefix = \"no-slash\" }}
  [[route.match]]
  headers = {{ \"x\" = {{ present = false }}, \"X\" = {{ present = true }} }}
  query = {{ \"variant\" = {{}} }}
"
    );
    let errs = errors(&text).join("\n");
    for want in [
        "gw.toml:6: route \"r\" hosts[1]: bad host \"bad host:80\"",
        "gw.toml:7: route \"r\": status 700 is not a final HTTP status",
        "route \"r\" match[0]: bad header name \"bad header\"",
        "route \"r\" match[0]: header \"x-two\": needs exactly one of exact, prefix, regex or present",
        "route \"r\" match[1]: header \"x\" is matched twice (also as \"X\")",
        "route \"r\" match[1]: query \"variant\": needs exactly one of exact, prefix, regex or present",
        "route \"r\" match[0]: path \"no-slash\" must start with \"/\"",
    ] {
        assert!(errs.contains(want), "missing {want:?} in:\n{errs}");
    }
}

#[test]
fn syntax_errors_give_the_line() {
    let errs = errors("[[route]]\nname = \"a\"\nhosts = [\"x\"\n");
    assert_eq!(errs.len(), 1);
    assert!(errs[0].starts_with("gw.toml:3: "), "{}", errs[0]);
    // A key given twice is named, as is a table declared twice.
    let errs = errors("[[route]]\nname = \"a\"\nname = \"b\"\n");
    assert_eq!(errs, ["gw.toml:3: duplicate key \"name\""]);
    let errs = errors("[admin]\nlisten = \"127.0.0.1:1\"\n[admin]\n");
    assert_eq!(errs, ["gw.toml:3: duplicate key \"admin\""]);
}

#[test]
fn a_route_to_a_service_with_errors_is_no_unknown_service() {
    let text = "[[service]]\nname = \"bad\"\nendpoints = [\"nowhere\"]\n\
                [[route]]\nname = \"r\"\n  [[route.backend]]\n  service = \"bad\"\n  \
                [[route.backend]]\n  service = \"none\"\n";
    assert_eq!(
        errors(text),
        [
            "gw.toml:3: service \"bad\" endpoints[0]: bad address \"nowhere\": expected ip:port, such as \"127.0.0.1:8080\"",
            "gw.toml:9: route \"r\" backend[1]: unknown service \"none\"",
        ]
    );
}

#[test]
fn a_value_of_the_wrong_type_names_its_key() {
    let text = format!(
        "{SERVICE}\
[[route]]
name = \"web\"
retry = {{ attempts = -1 }}
"
    );
    assert_eq!(
        errors(&text),
        ["gw.toml:6: route \"web\" retry.attempts: invalid value: integer `-1`, expected u32"]
    );
    let text = format!("{SERVICE}[[listener]]\nname = \"edge\"\nlisten = 8080\n");
    assert_eq!(
        errors(&text),
        ["gw.toml:6: listener \"edge\" listen: invalid type: integer `8080`, expected a string"]
    );
    assert_eq!(
        errors("[runtime]\nthreads = \"2\"\n"),
        ["gw.toml:2: [runtime] threads: invalid type: string \"2\", expected usize"]
    );
}

#[test]
fn a_directory_is_merged_in_name_order_and_duplicates_name_both_files() {
    let dir = tempfile::tempdir().unwrap();
    write(dir.path(), "10-services.toml", SERVICE);
    write(
        dir.path(),
        "20-routes.toml",
        "[[route]]\nname = \"a\"\n[[route.backend]]\nservice = \"reviews\"\n",
    );
    write(dir.path(), ".hidden.toml", "this is not toml");
    write(dir.path(), "notes.txt", "ignored");
    let loaded = load(dir.path(), Role::Gateway).unwrap();
    assert_eq!(loaded.files.len(), 2);
    assert_eq!(loaded.config.routes[0].name, "a");
    assert!(loaded.config.routes[0].origin.ends_with("20-routes.toml:1"));

    write(
        dir.path(),
        "30-more.toml",
        "[[service]]\nname = \"reviews\"\nendpoints = [\"127.0.0.1:1\"]\n",
    );
    let errs = load(dir.path(), Role::Gateway).unwrap_err().0;
    assert_eq!(errs.len(), 1, "{errs:?}");
    let msg = errs[0].to_string();
    assert!(
        msg.contains("30-more.toml:2: service \"reviews\": duplicate name"),
        "{msg}"
    );
    assert!(
        msg.contains("10-services.toml:1") && msg.contains("30-more.toml:1"),
        "{msg}"
    );
}

#[test]
fn sidecar_sections_belong_to_the_sidecar() {
    let text = "[inbound]\napp = \"127.0.0.1:8080\"\nmtls = \"disable\"\n";
    let errs = errors(text);
    assert_eq!(errs, ["gw.toml:1: [inbound]: [inbound] is a weir-sidecar section; weir-gateway does not accept it"]);
    let sidecar = parse("sc.toml", text, Role::Sidecar).unwrap();
    let inbound = &sidecar.config.sidecar.unwrap().inbound;
    assert_eq!(inbound.app.to_string(), "127.0.0.1:8080");
    assert_eq!(inbound.listen.to_string(), "0.0.0.0:15006");
}

#[test]
fn two_listeners_never_share_a_port() {
    // Pingora would hand both the same socket: the admin API would answer a share of the
    // public listener's connections.
    let text = format!(
        "{SERVICE}\
[admin]
listen = \"127.0.0.1:8080\"
[[listener]]
name = \"web\"
listen = \"127.0.0.1:8080\"
[[listener]]
name = \"all\"
listen = \"0.0.0.0:8443\"
[[listener]]
name = \"local\"
listen = \"127.0.0.1:8443\"
[[listener]]
name = \"v6\"
listen = \"[::1]:8080\"
"
    );
    assert_eq!(
        errors(&text),
        [
            "gw.toml:8: listener \"web\": listen 127.0.0.1:8080 takes the port of 127.0.0.1:8080 of [admin] (gw.toml:5); each listener needs its own",
            "gw.toml:14: listener \"local\": listen 127.0.0.1:8443 takes the port of 0.0.0.0:8443 of listener \"all\" (gw.toml:11); each listener needs its own",
        ]
    );
    // A default address clashes too; the error points at the address the user set.
    let text = format!("{SERVICE}[[listener]]\nname = \"web\"\nlisten = \"127.0.0.1:9901\"\n");
    assert_eq!(
        errors(&text),
        ["gw.toml:6: listener \"web\": listen 127.0.0.1:9901 takes the port of 127.0.0.1:9901, [admin]'s default; each listener needs its own"]
    );
    let sidecar = "[inbound]\napp = \"127.0.0.1:8080\"\nmtls = \"disable\"\n[outbound]\nlisten = \"127.0.0.1:15006\"\n";
    match parse("sc.toml", sidecar, Role::Sidecar) {
        Ok(_) => panic!("outbound on the inbound listener's default port was accepted"),
        Err(e) => assert_eq!(
            e.0[0].to_string(),
            "sc.toml:5: [outbound]: listen 127.0.0.1:15006 takes the port of 0.0.0.0:15006, [inbound]'s default; each listener needs its own"
        ),
    }
}

#[test]
fn defaults_apply_and_revision_follows_content() {
    let a = parse("gw.toml", SERVICE, Role::Gateway).unwrap();
    assert_eq!(a.config.runtime.grace_period.as_secs(), 10);
    assert_eq!(a.config.admin.listen.to_string(), "127.0.0.1:9901");
    let same = parse("gw.toml", SERVICE, Role::Gateway).unwrap();
    let other = parse("gw.toml", &format!("{SERVICE}\n"), Role::Gateway).unwrap();
    assert_eq!(a.revision, same.revision);
    assert_ne!(a.revision, other.revision);
}

fn write(dir: &Path, name: &str, text: &str) {
    fs::write(dir.join(name), text).unwrap();
}

#[test]
fn empty_lists_are_errors_not_wildcards() {
    let text = format!(
        "{SERVICE}[[route]]\nname = \"r\"\nhosts = []\nlisteners = []\n  [[route.match]]\n  methods = []\n  [[route.backend]]\n  service = \"reviews\"\n"
    );
    let errs = errors(&text).join("\n");
    for want in [
        "gw.toml:6: route \"r\": hosts is empty; leave the key out to match any host",
        "gw.toml:7: route \"r\": listeners is empty; leave the key out to match every listener",
        "gw.toml:9: route \"r\" match[0]: methods is empty; leave the key out to match any method",
    ] {
        assert!(errs.contains(want), "missing {want:?} in:\n{errs}");
    }
}

#[test]
fn a_broken_file_does_not_cause_false_errors_elsewhere() {
    let dir = tempfile::tempdir().unwrap();
    write(
        dir.path(),
        "a-services.toml",
        "[[service]]\nname = \"reviews\"\nendpoints = [\"127.0.0.1:1\"\n",
    );
    write(
        dir.path(),
        "b-routes.toml",
        "[[route]]\nname = \"a\"\n[[route.backend]]\nservice = \"reviews\"\n",
    );
    let errs = load(dir.path(), Role::Gateway).unwrap_err().0;
    assert_eq!(errs.len(), 1, "{errs:?}");
    assert!(errs[0].file.ends_with("a-services.toml"));
}

#[test]
fn a_toml_entry_that_is_no_readable_file_is_an_error_not_skipped() {
    let dir = tempfile::tempdir().unwrap();
    write(dir.path(), "a.toml", SERVICE);
    std::os::unix::fs::symlink(dir.path().join("gone.toml"), dir.path().join("b.toml")).unwrap();
    fs::create_dir(dir.path().join("c.toml")).unwrap();
    // A FIFO would never end: not read (the load would hang).
    let fifo = std::process::Command::new("mkfifo")
        .arg(dir.path().join("d.toml"))
        .status()
        .unwrap();
    assert!(fifo.success());
    let errs = load(dir.path(), Role::Gateway).unwrap_err().0;
    let files: Vec<_> = errs.iter().map(|e| e.file.file_name().unwrap()).collect();
    assert_eq!(files, ["b.toml", "c.toml", "d.toml"], "{errs:?}");
    assert!(
        errs.iter().all(|e| e.message.starts_with("cannot read")),
        "{errs:?}"
    );
}

#[test]
fn a_missing_or_empty_source_is_an_error_not_a_panic() {
    let dir = tempfile::tempdir().unwrap();
    for role in [Role::Gateway, Role::Sidecar] {
        let errs = load(dir.path(), role).unwrap_err().0;
        assert!(errs[0].message.contains("no *.toml files"), "{errs:?}");
        let errs = load(&dir.path().join("missing.toml"), role).unwrap_err().0;
        assert!(errs[0].message.starts_with("cannot read"), "{errs:?}");
    }
}

#[test]
fn header_changes_rewrites_redirects_and_faults_are_checked_at_load() {
    let text = format!(
        "{SERVICE}[[route]]
name = \"r\"
rewrite = {{ path_prefix = \"/v2/\" }}
  [[route.match]]
  path = {{ regex = \"/api/.*\" }}
  [[route.backend]]
  service = \"reviews\"
  [route.request_headers]
  set = {{ \"x-bad\" = \"line\\nbreak\", \"bad name\" = \"v\", \"x-a\" = \"1\", \"X-A\" = \"2\", \"connection\" = \"close\" }}
  [route.response_headers]
  add = {{ \"upgrade\" = \"h2c\" }}
  remove = [\"te\"]
  [route.fault]
  abort = {{ status = 503, percent = 150.0 }}
  delay = {{ percent = 10.0 }}
[[route]]
name = \"moved\"
redirect = {{ status = 200 }}
[[route]]
name = \"all\"
rewrite = {{ path_prefix = \"/v2/\" }}
  [[route.backend]]
  service = \"reviews\"
"
    );
    let errs = errors(&text).join("\n");
    for want in [
        "route \"r\" rewrite: path_prefix needs every [[route.match]] to match the path by prefix or exact",
        "route \"all\" rewrite: path_prefix replaces what the route's [[route.match]] matched by prefix or exact path, and the route has no [[route.match]]",
        "route \"r\": request_headers.set: \"x-bad\": bad value \"line\\nbreak\"",
        "route \"r\": request_headers.set: bad header name \"bad name\"",
        "route \"r\": request_headers.set: \"x-a\" is set twice (also as \"X-A\")",
        "route \"r\": request_headers.set: \"connection\" cannot be changed here: a hop-by-hop header",
        "route \"r\": response_headers.add: \"upgrade\" cannot be changed here: a hop-by-hop header",
        "route \"r\" fault abort: percent 150 is not between 0 and 100",
        "route \"r\" fault delay: delay needs fixed",
        "route \"moved\" redirect: status 200: expected 301, 302, 303, 307 or 308",
    ] {
        assert!(errs.contains(want), "missing {want:?} in:\n{errs}");
    }
    // Removing a hop-by-hop header is no change: the proxy drops them anyway.
    assert!(!errs.contains("\"te\""), "{errs}");
}

#[test]
fn load_balancers_are_checked() {
    let text = "[[service]]\nname = \"a\"\nendpoints = [\"127.0.0.1:1\"]\nload_balancer = \"consistent_hash\"\n\
                [[service]]\nname = \"b\"\nendpoints = [\"127.0.0.1:1\"]\nload_balancer = \"consistent_hash\"\nhash_on = \"cookie\"\n\
                [[service]]\nname = \"c\"\nendpoints = [\"127.0.0.1:1\"]\nhash_on = \"source_ip\"\n\
                [[service]]\nname = \"d\"\nendpoints = [\"127.0.0.1:1\"]\nload_balancer = \"fastest\"\n\
                [[service]]\nname = \"f\"\nendpoints = [\"127.0.0.1:1\"]\nload_balancer = \"consistent_hash\"\nhash_on = { cookie = \"session id;x\" }\n";
    let errs = errors(text).join("\n");
    for want in [
        "gw.toml:1: service \"a\": consistent_hash needs hash_on",
        "gw.toml:9: service \"b\": hash_on needs exactly one of",
        "gw.toml:13: service \"c\": hash_on applies only to load_balancer = \"consistent_hash\"",
        "gw.toml:17: service \"d\": load_balancer \"fastest\": expected",
        "gw.toml:22: service \"f\": hash_on: bad cookie name \"session id;x\"",
    ] {
        assert!(errs.contains(want), "missing {want:?} in:\n{errs}");
    }
    let ok = "[[service]]\nname = \"a\"\nendpoints = [\"127.0.0.1:1\"]\nload_balancer = \"consistent_hash\"\nhash_on = { header = \"X-User\" }\n";
    let loaded = parse("gw.toml", ok, Role::Gateway).unwrap();
    assert_eq!(
        loaded.config.services[0].load_balancer,
        weir_config::LoadBalancer::ConsistentHash(weir_config::HashOn::Header("x-user".into()))
    );
}

#[test]
fn mirrors_and_connection_pools_are_checked() {
    let text = "[[service]]\nname = \"a\"\nendpoints = [\"127.0.0.1:1\"]\n\
                connection_pool = { max_requests = 0, connect_timeout = \"0s\", idle_timeout = \"soon\" }\n\
                [[route]]\nname = \"r\"\n  [[route.backend]]\n  service = \"a\"\n  \
                [route.mirror]\n  service = \"shadow\"\n  percent = 101.0\n\
                [[route]]\nname = \"d\"\ndirect_response = { status = 200 }\n  \
                [route.mirror]\n  service = \"a\"\n";
    let errs = errors(text).join("\n");
    for want in [
        "gw.toml:4: service \"a\": max_requests must be at least 1",
        "gw.toml:4: service \"a\": connect_timeout must be more than 0",
        "gw.toml:4: service \"a\": idle_timeout: bad duration \"soon\"",
        "gw.toml:10: route \"r\" mirror: unknown service \"shadow\"",
        "gw.toml:15: route \"d\": mirror applies only to routes with [[route.backend]]",
    ] {
        assert!(errs.contains(want), "missing {want:?} in:\n{errs}");
    }
    let ok = "[[service]]\nname = \"a\"\nendpoints = [\"127.0.0.1:1\"]\n\
              [[route]]\nname = \"r\"\n  [[route.backend]]\n  service = \"a\"\n  \
              [route.mirror]\n  service = \"a\"\n";
    let loaded = parse("gw.toml", ok, Role::Gateway).unwrap();
    let mirror = loaded.config.routes[0].mirror.as_ref().unwrap();
    assert_eq!((mirror.percent, mirror.max_body_bytes), (100.0, 65536));
    assert_eq!(loaded.config.services[0].connection_pool.max_requests, 1024);
}

#[test]
fn resilience_keys_are_checked() {
    let text = "[[service]]\nname = \"a\"\nendpoints = [\"127.0.0.1:1\"]\ndns = \"a.example:80\"\n\
                [[service]]\nname = \"b\"\ndns = \"no port\"\n\
                [[service]]\nname = \"c\"\nendpoints = [\"127.0.0.1:1\"]\n\
                [service.outlier_detection]\nmax_ejection_percent = 150\nbase_ejection_time = \"1m\"\nmax_ejection_time = \"10s\"\n\
                [service.health_check]\ninterval = \"0s\"\nunhealthy_threshold = 0\n\
                [[route]]\nname = \"r\"\ntimeout = \"soon\"\n  [[route.backend]]\n  service = \"c\"\n  \
                [route.retry]\n  on = [\"5xx\", \"sometimes\", 700]\n  budget = { ratio = -1.0 }\n";
    let errs = errors(text).join("\n");
    for want in [
        "gw.toml:1: service \"a\": has both endpoints and dns; choose one",
        "gw.toml:7: service \"b\": bad dns \"no port\": expected name:port",
        "gw.toml:12: service \"c\": max_ejection_percent 150 is over 100",
        "gw.toml:14: service \"c\": max_ejection_time is shorter than base_ejection_time",
        "service \"c\": missing required key \"path\"",
        "gw.toml:20: route \"r\": timeout: bad duration \"soon\"",
        "gw.toml:24: route \"r\" retry on[1]: unknown retry condition \"sometimes\"",
        "gw.toml:24: route \"r\" retry on[2]: status 700 is not between 100 and 599",
        "route \"r\" retry: budget ratio -1 is not between 0 and 10",
    ] {
        assert!(errs.contains(want), "missing {want:?} in:\n{errs}");
    }
    let ok = "[[service]]\nname = \"a\"\ndns = \"Reviews.default.svc:9080\"\nload_balancer = \"least_request\"\n\
              [service.outlier_detection]\n[service.health_check]\npath = \"/healthz\"\n\
              [[route]]\nname = \"r\"\n  [[route.backend]]\n  service = \"a\"\n";
    let loaded = parse("gw.toml", ok, Role::Gateway).unwrap();
    let (s, r) = (&loaded.config.services[0], &loaded.config.routes[0]);
    assert_eq!(s.dns.as_ref().unwrap().name, "reviews.default.svc");
    assert_eq!(s.outlier_detection.as_ref().unwrap().consecutive_5xx, 5);
    assert_eq!(s.health_check.as_ref().unwrap().unhealthy_threshold, 3);
    assert_eq!(r.retry.attempts, 2);
    assert_eq!(r.retry.on.statuses, [503]);
    assert!(r.retry.on.connect_failure && !r.retry.non_idempotent);
    assert_eq!(r.timeout, None);
    let grpc = ok.replace(
        "  service = \"a\"\n",
        "  service = \"a\"\n  [route.retry]\n  on = [\"unavailable\", \"resource-exhausted\", 503]\n",
    );
    let loaded = parse("gw.toml", &grpc, Role::Gateway).unwrap();
    let on = &loaded.config.routes[0].retry.on;
    assert_eq!(
        (on.grpc.as_slice(), on.statuses.as_slice()),
        (&[14, 8][..], &[503][..])
    );
}

#[test]
fn tls_settings_are_checked_and_their_files_read_relative_to_the_config() {
    let dir = tempfile::tempdir().unwrap();
    let key = rcgen::KeyPair::generate().unwrap();
    let cert = rcgen::CertificateParams::new(vec!["a.example".to_string()])
        .unwrap()
        .self_signed(&key)
        .unwrap();
    write(dir.path(), "a.pem", &cert.pem());
    write(dir.path(), "a-key.pem", &key.serialize_pem());
    let listener =
        |extra: &str| format!("[[listener]]\nname = \"web\"\nlisten = \"127.0.0.1:8443\"\n{extra}");
    let good = listener(
        "protocol = \"https\"\n  [[listener.certificate]]\n  cert = \"a.pem\"\n  key = \"a-key.pem\"\n",
    );
    write(dir.path(), "gw.toml", &good);
    let loaded = load(&dir.path().join("gw.toml"), Role::Gateway).unwrap();
    let tls = loaded.config.listeners[0].tls.as_ref().unwrap();
    assert_eq!(tls.certificates[0].cert, dir.path().join("a.pem"));
    assert_eq!(loaded.material.len(), 2);
    // A host two certificates claim is an error: the second would never be served for it.
    let twice = listener(
        "protocol = \"https\"\n  [[listener.certificate]]\n  cert = \"a.pem\"\n  key = \"a-key.pem\"\n  \
         hosts = [\"a.example\"]\n  [[listener.certificate]]\n  cert = \"a.pem\"\n  key = \"a-key.pem\"\n  \
         hosts = [\"b.example\", \"a.example\"]\n[admin]\nlisten = \"[::ffff:127.0.0.1]:8443\"\n",
    );
    write(dir.path(), "twice.toml", &twice);
    let errs = load(&dir.path().join("twice.toml"), Role::Gateway).unwrap_err();
    let errs: Vec<String> = errs.0.iter().map(|e| e.message.clone()).collect();
    assert!(
        errs.contains(&"host \"a.example\" is already another certificate's".to_string()),
        "{errs:?}"
    );
    // An IPv4-mapped address is the IPv4 one: the admin listener would never bind.
    assert!(errs.iter().any(|e| e.contains("8443")), "{errs:?}");
    // Nor two without hosts (each takes any name), nor one naming a host twice.
    let pair = "  [[listener.certificate]]\n  cert = \"a.pem\"\n  key = \"a-key.pem\"\n";
    let twice = listener(&format!(
        "protocol = \"https\"\n{pair}{pair}{pair}  hosts = [\"c.example\", \"c.example\"]\n"
    ));
    write(dir.path(), "twice.toml", &twice);
    let errs = load(&dir.path().join("twice.toml"), Role::Gateway).unwrap_err();
    let errs: Vec<String> = errs.0.iter().map(|e| e.message.clone()).collect();
    assert_eq!(
        errs,
        [
            "another certificate has no hosts (it takes any name)",
            "a host is named twice"
        ],
        "{errs:?}"
    );
    // The revision follows the certificate's contents, not only the config's.
    write(dir.path(), "a.pem", &cert.pem().replace("\n", "\r\n"));
    let rotated = load(&dir.path().join("gw.toml"), Role::Gateway).unwrap();
    assert_ne!(loaded.revision, rotated.revision);

    let bad = format!(
        "{}{SERVICE}  [service.tls]\n  mode = \"mesh\"\n\
         [[service]]\nname = \"api\"\nendpoints = [\"10.0.0.1:443\"]\n  [service.tls]\n  cert = \"a.pem\"\n\
         [[listener]]\nname = \"plain\"\nlisten = \"127.0.0.1:8080\"\n  [[listener.certificate]]\n  cert = \"a.pem\"\n  key = \"a-key.pem\"\n",
        listener("protocol = \"https\"\n  [[listener.certificate]]\n  cert = \"missing.pem\"\n  key = \"a-key.pem\"\n  [listener.client_auth]\n"),
    );
    write(dir.path(), "gw.toml", &bad);
    let errs: Vec<String> = load(&dir.path().join("gw.toml"), Role::Gateway)
        .unwrap_err()
        .0
        .iter()
        .map(|e| e.to_string())
        .collect();
    let file = dir.path().join("gw.toml").display().to_string();
    let missing = dir.path().join("missing.pem").display().to_string();
    assert_eq!(
        errs,
        [
            format!("{file}:6: listener \"web\" certificate[0]: cannot read {missing}: No such file or directory (os error 2)"),
            format!("{file}:8: listener \"web\": missing required key \"ca\""),
            format!("{file}:13: service \"reviews\": mode \"mesh\" needs [workload], the certificate this proxy presents in the mesh"),
            format!("{file}:17: service \"api\": missing required key \"sni\": the endpoints are addresses, so there is no name to send and to verify the server's certificate against"),
            format!("{file}:18: service \"api\": cert is for mode \"mutual\" only"),
            format!("{file}:22: listener \"plain\": certificates need protocol = \"https\""),
        ]
    );
}

/// A mesh CA and a workload certificate under it, as PEM files in `dir`.
fn mesh_files(dir: &Path, spiffe: &[&str]) {
    mesh_files_for(dir, spiffe, Vec::new());
}

/// The workload files, the certificate with `spiffe` URIs and the extended key usage `eku`
/// (none: no extension).
fn mesh_files_for(dir: &Path, spiffe: &[&str], eku: Vec<rcgen::ExtendedKeyUsagePurpose>) {
    use rcgen::{BasicConstraints, CertificateParams, IsCa, KeyPair, SanType};
    let ca_key = KeyPair::generate().unwrap();
    let mut ca = CertificateParams::new(Vec::<String>::new()).unwrap();
    ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    let ca_cert = ca.self_signed(&ca_key).unwrap();
    let key = KeyPair::generate().unwrap();
    let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
    params.subject_alt_names = (spiffe.iter())
        .map(|uri| SanType::URI((*uri).try_into().unwrap()))
        .collect();
    params.extended_key_usages = eku;
    let cert = params.signed_by(&key, &ca_cert, &ca_key).unwrap();
    write(dir, "bundle.pem", &ca_cert.pem());
    write(dir, "workload.pem", &cert.pem());
    write(dir, "workload-key.pem", &key.serialize_pem());
}

const WORKLOAD: &str = "[workload]\ncert = \"workload.pem\"\nkey = \"workload-key.pem\"\ntrust_bundle = \"bundle.pem\"\n";

fn sidecar_errors(dir: &Path, text: &str) -> Vec<String> {
    write(dir, "sc.toml", text);
    match load(&dir.join("sc.toml"), Role::Sidecar) {
        Ok(_) => panic!("expected errors for:\n{text}"),
        Err(e) => e.0.iter().map(|e| e.to_string()).collect(),
    }
}

#[test]
fn a_sidecar_is_two_listeners_a_route_to_the_app_and_mesh_services() {
    let dir = tempfile::tempdir().unwrap();
    mesh_files(
        dir.path(),
        &["spiffe://mesh.local/ns/default/sa/productpage"],
    );
    let text = format!(
        "{WORKLOAD}\
[inbound]
app = \"127.0.0.1:8080\"
  [[inbound.policy]]
  action = \"allow\"
  principals = [\"spiffe://mesh.local/ns/default/sa/gateway\"]
  methods = [\"get\"]
  paths = [\"/reviews/*\"]
[[route]]
name = \"reviews\"
hosts = [\"reviews\"]
  [[route.backend]]
  service = \"reviews\"
[[service]]
name = \"reviews\"
endpoints = [\"10.0.0.7:15006\"]
  [service.tls]
  mode = \"mesh\"
  identities = [\"spiffe://mesh.local/ns/default/sa/reviews\"]
"
    );
    write(dir.path(), "sc.toml", &text);
    let loaded = load(&dir.path().join("sc.toml"), Role::Sidecar).unwrap();
    let config = &loaded.config;
    let workload = config.workload.as_ref().unwrap();
    assert_eq!(
        workload.identity,
        "spiffe://mesh.local/ns/default/sa/productpage"
    );
    let names: Vec<_> = config.listeners.iter().map(|l| l.name.as_str()).collect();
    assert_eq!(names, ["outbound", "inbound"]);
    let inbound = &config.listeners[1];
    assert_eq!(inbound.listen.to_string(), "0.0.0.0:15006");
    // Both listeners keep idle client connections nginx's 75 s unless told otherwise.
    let idle: Vec<_> = config.listeners.iter().map(|l| l.idle_timeout).collect();
    assert_eq!(idle, [Duration::from_secs(75); 2]);
    let tls = inbound.tls.as_ref().unwrap();
    assert_eq!(tls.certificates[0].cert, dir.path().join("workload.pem"));
    assert_eq!(
        tls.client_auth.as_ref().unwrap().ca,
        dir.path().join("bundle.pem")
    );
    let routes: Vec<_> = config
        .routes
        .iter()
        .map(|r| (r.name.as_str(), r.listeners.clone()))
        .collect();
    assert_eq!(
        routes,
        [
            ("reviews", vec!["outbound".to_string()]),
            ("inbound", vec!["inbound".to_string()])
        ]
    );
    assert_eq!(config.routes[1].retry.attempts, 0);
    let app = config
        .services
        .iter()
        .find(|s| s.name == "inbound")
        .unwrap();
    assert_eq!(app.endpoints[0].to_string(), "127.0.0.1:8080");
    let mesh = config.services[0].tls.as_ref().unwrap();
    assert_eq!(mesh.sni, "reviews");
    assert_eq!(
        mesh.cert.as_deref(),
        Some(dir.path().join("workload.pem").as_path())
    );
    let policy = &config.sidecar.as_ref().unwrap().inbound.policies[0];
    assert_eq!(
        (policy.name.as_str(), policy.methods.as_slice()),
        ("inbound.policy[0]", &["GET".to_string()][..])
    );
    // Three files read, once each.
    assert_eq!(loaded.material.len(), 3);
}

#[test]
fn a_workload_and_its_peers_are_named_by_one_well_formed_spiffe_id() {
    let dir = tempfile::tempdir().unwrap();
    let workload = dir.path().join("workload.pem").display().to_string();
    let base = format!("{WORKLOAD}[inbound]\napp = \"127.0.0.1:8080\"\n");
    let two = ["spiffe://mesh.local/sa/a", "spiffe://mesh.local/sa/b"];
    mesh_files(dir.path(), &two);
    let errs = sidecar_errors(dir.path(), &base).join("\n");
    assert!(
        errs.contains(&format!("{workload}: 2 spiffe:// URI SANs; a workload certificate names its workload with exactly one")),
        "{errs}"
    );
    mesh_files(dir.path(), &["spiffe://Mesh.local/sa/a/"]);
    let errs = sidecar_errors(dir.path(), &base).join("\n");
    assert!(
        errs.contains(&format!(
            "{workload}: bad SPIFFE id \"spiffe://Mesh.local/sa/a/\""
        )),
        "{errs}"
    );
    use rcgen::ExtendedKeyUsagePurpose::{ClientAuth, ServerAuth};
    for (eku, lacks) in [
        (vec![ServerAuth], "clientAuth"),
        (vec![ClientAuth], "serverAuth"),
    ] {
        mesh_files_for(dir.path(), &["spiffe://mesh.local/sa/a"], eku);
        let errs = sidecar_errors(dir.path(), &base).join("\n");
        let want = format!("{workload}: its extended key usage lacks {lacks}");
        assert!(errs.contains(&want), "missing {want:?} in:\n{errs}");
    }
    mesh_files_for(
        dir.path(),
        &["spiffe://mesh.local/sa/a"],
        vec![ServerAuth, ClientAuth],
    );
    let loaded = load(&dir.path().join("sc.toml"), Role::Sidecar);
    assert!(loaded.is_ok(), "{:?}", loaded.err());
    mesh_files(dir.path(), &["spiffe://mesh.local/sa/a"]);
    let text = format!(
        "{base}  [[inbound.policy]]\n  action = \"allow\"\n  principals = [\"spiffe://\", \"spiffe://mesh.local/ns/../sa\"]\n\
         [[service]]\nname = \"peer\"\nendpoints = [\"127.0.0.1:1\"]\n  [service.tls]\n  mode = \"mesh\"\n  identities = [\"spiffe://mesh.local/sa/b\", \"spiffe://\"]\n"
    );
    let errs = sidecar_errors(dir.path(), &text).join("\n");
    for bad in [
        "principals[0]: principal \"spiffe://\": expected a spiffe:// id",
        "principals[1]: principal \"spiffe://mesh.local/ns/../sa\": expected a spiffe:// id",
        "identities[1]: identity \"spiffe://\": expected a spiffe:// id",
    ] {
        assert!(errs.contains(bad), "missing {bad:?} in:\n{errs}");
    }
    assert!(!errs.contains("identities[0]"), "{errs}");
}

/// The certificate must be one the bundle vouches for, as the peers check it; the trust
/// domains accepted are the workload's own and those listed.
#[test]
fn a_workload_is_vouched_for_by_its_bundle_and_names_its_trust_domains() {
    let dir = tempfile::tempdir().unwrap();
    let base = format!("{WORKLOAD}[inbound]\napp = \"127.0.0.1:8080\"\n");
    mesh_files(dir.path(), &["spiffe://mesh.local/sa/a"]);
    let bundle = fs::read_to_string(dir.path().join("bundle.pem")).unwrap();
    // A new CA's certificate, written before the new bundle.
    let other = tempfile::tempdir().unwrap();
    mesh_files(other.path(), &["spiffe://mesh.local/sa/a"]);
    for file in ["workload.pem", "workload-key.pem"] {
        fs::copy(other.path().join(file), dir.path().join(file)).unwrap();
    }
    let errs = sidecar_errors(dir.path(), &base).join("\n");
    let want = format!(
        "{}: not vouched for by the trust bundle {}: invalid peer certificate: ",
        dir.path().join("workload.pem").display(),
        dir.path().join("bundle.pem").display()
    );
    assert!(errs.contains(&want), "missing {want:?} in:\n{errs}");
    // Both CAs in the bundle, as mid-way through a rotation: fine.
    let both = format!(
        "{bundle}{}",
        fs::read_to_string(other.path().join("bundle.pem")).unwrap()
    );
    write(dir.path(), "bundle.pem", &both);
    let text = base.replace(
        "trust_bundle = \"bundle.pem\"\n",
        "trust_bundle = \"bundle.pem\"\ntrust_domains = [\"other.mesh\", \"Bad Domain\"]\n",
    );
    let errs = sidecar_errors(dir.path(), &text).join("\n");
    assert_eq!(
        errs,
        format!(
            "{}:5: [workload] trust_domains[1]: bad trust domain \"Bad Domain\": expected a name in lower case, such as \"mesh.local\"",
            dir.path().join("sc.toml").display()
        )
    );
    let text = text.replace(", \"Bad Domain\"", "");
    write(dir.path(), "sc.toml", &text);
    let loaded = load(&dir.path().join("sc.toml"), Role::Sidecar).unwrap();
    let workload = loaded.config.workload.as_ref().unwrap();
    assert_eq!(workload.trust_domains, ["mesh.local", "other.mesh"]);
}

#[test]
fn sidecar_mistakes_are_named_with_their_place() {
    let dir = tempfile::tempdir().unwrap();
    mesh_files(dir.path(), &[]);
    let file = dir.path().join("sc.toml").display().to_string();
    let workload = dir.path().join("workload.pem").display().to_string();
    let errs = sidecar_errors(
        dir.path(),
        &format!(
            "{WORKLOAD}\
[inbound]
app = \"127.0.0.1:8080\"
mtls = \"permissive\"
[[listener]]
name = \"web\"
listen = \"127.0.0.1:8080\"
[[route]]
name = \"inbound\"
  [[route.backend]]
  service = \"app\"
[[service]]
name = \"app\"
endpoints = [\"127.0.0.1:1\"]
  [service.tls]
  mode = \"mesh\"
  ca = \"bundle.pem\"
  identities = [\"reviews\"]
"
        ),
    );
    assert_eq!(
        errs,
        [
            format!("{file}:2: [workload]: {workload}: no spiffe:// URI SAN; a workload certificate names its workload, such as spiffe://mesh.local/ns/default/sa/reviews"),
            format!("{file}:8: [[listener]] is weir-gateway's; weir-sidecar listens on [inbound] and [outbound]"),
            format!("{file}:12: route name \"inbound\" is the sidecar's own (its route and service to the app); choose another"),
            format!("{file}:20: service \"app\": mode \"mesh\" uses [workload]'s certificate and trust bundle; leave out ca"),
            format!("{file}:21: service \"app\" identities[0]: identity \"reviews\": expected a spiffe:// id (a trust domain, then a path of letters, digits, '.', '-' and '_' segments)"),
        ]
    );
    // The name of the calls passed through is the sidecar's too.
    let errs = sidecar_errors(
        dir.path(),
        "[inbound]\napp = \"127.0.0.1:8080\"\nmtls = \"disable\"\n\
         [[service]]\nname = \"PassthroughCluster\"\nendpoints = [\"127.0.0.1:1\"]\n",
    );
    assert_eq!(errs, [format!("{file}:5: the name \"PassthroughCluster\" names the calls the sidecar passes through in its metrics and log; choose another")]);
    // Strict (the default) without [workload].
    let errs = sidecar_errors(dir.path(), "[inbound]\napp = \"127.0.0.1:8080\"\n");
    assert_eq!(errs, [format!("{file}:1: [inbound]: mtls = \"strict\" (the default) needs [workload], the mesh certificate to serve and the trust bundle to check callers with; or set mtls = \"disable\"")]);
    // Set, it is named at its line.
    let errs = sidecar_errors(
        dir.path(),
        "[inbound]\napp = \"127.0.0.1:8080\"\nmtls = \"permissive\"\n",
    );
    assert!(
        errs[0].starts_with(&format!("{file}:3: [inbound]: mtls = \"permissive\" needs")),
        "{errs:?}"
    );
    let errs = sidecar_errors(
        dir.path(),
        "[inbound]\napp = \"127.0.0.1:8080\"\nmtls = \"disable\"\nidle_timeout = \"0s\"\n\
         [outbound]\nidle_timeout = \"soon\"\nmax_connections = 0\n",
    );
    assert_eq!(
        errs,
        [
            format!("{file}:4: [inbound]: idle_timeout must be more than 0"),
            format!(
                "{file}:6: [outbound]: idle_timeout: bad duration \"soon\": expected a number then ms, s, m or h"
            ),
            format!("{file}:7: [outbound]: max_connections must be at least 1"),
        ]
    );
    let errs = sidecar_errors(
        dir.path(),
        "\
[inbound]
app = \"127.0.0.1:8080\"
mtls = \"disable\"
  [[inbound.policy]]
  action = \"permit\"
  principals = [\"productpage\"]
  paths = [\"/a*b\", \"reviews\"]
  [[inbound.policy]]
  methods = []
  [[inbound.policy]]
  action = \"deny\"
  methods = [\"*\"]
",
    );
    let f = dir.path().join("sc.toml").display().to_string();
    assert_eq!(
        errs,
        [
            format!("{f}:5: [inbound] policy[0]: action \"permit\": expected \"allow\" or \"deny\""),
            format!("{f}:6: [inbound] policy[0] principals[0]: principal \"productpage\": expected a spiffe:// id (a trust domain, then a path of letters, digits, '.', '-' and '_' segments) or \"*\""),
            format!("{f}:6: [inbound] policy[0]: principals need mtls = \"strict\" or \"permissive\": over plaintext no caller has an identity"),
            format!("{f}:7: [inbound] policy[0] paths[0]: path \"/a*b\": expected an exact path \"/a\", a prefix \"/a/*\", a suffix \"*.json\" or \"*\""),
            format!("{f}:7: [inbound] policy[0] paths[1]: path \"reviews\": expected an exact path \"/a\", a prefix \"/a/*\", a suffix \"*.json\" or \"*\""),
            format!("{f}:8: [inbound] policy[1]: missing required key \"action\" (\"allow\" or \"deny\")"),
            format!("{f}:9: [inbound] policy[1]: methods is empty; leave the key out to match any method"),
            format!("{f}:12: [inbound] policy[2] methods[0]: \"*\" is no method: leave `methods` out to match any method"),
        ]
    );
}

#[test]
fn a_service_protocol_is_http1_or_http2_and_mirrors_stay_on_http1() {
    let text = "[[service]]\nname = \"grpc\"\nendpoints = [\"127.0.0.1:9090\"]\nprotocol = \"http2\"\n\
                [[service]]\nname = \"old\"\nendpoints = [\"127.0.0.1:9091\"]\nprotocol = \"h3\"\n\
                [[route]]\nname = \"r\"\n  [[route.backend]]\n  service = \"old\"\n  [route.mirror]\n  service = \"grpc\"\n";
    assert_eq!(
        errors(text),
        [
            "gw.toml:8: service \"old\": protocol \"h3\": expected \"http1\" or \"http2\"",
            "gw.toml:14: route \"r\" mirror: mirror copies are sent as HTTP/1.1, and service \"grpc\" has protocol = \"http2\"",
        ]
    );
    let ok = parse(
        "gw.toml",
        &text[..text.find("[[service]]\nname = \"old\"").unwrap()],
        Role::Gateway,
    )
    .unwrap();
    assert_eq!(
        ok.config.services[0].protocol,
        weir_config::UpstreamProtocol::Http2
    );
}

#[test]
fn tracing_settings_are_checked_and_defaulted() {
    let text =
        "[telemetry.tracing]\notlp_endpoint = \"grpc://collector:4318\"\nsample_ratio = 1.5\n\
                protocol = \"thrift\"\nservice_nmae = \"x\"\n";
    assert_eq!(
        errors(text),
        [
            "gw.toml:2: [telemetry.tracing]: otlp_endpoint \"grpc://collector:4318\" is not http://host:port or https://host:port",
            "gw.toml:3: [telemetry.tracing]: sample_ratio 1.5 is not between 0.0 and 1.0",
            "gw.toml:5: [telemetry.tracing]: unknown key \"service_nmae\"",
        ]
    );
    // Credentials in the URL would never be sent, and the message must not repeat them.
    assert_eq!(
        errors("[telemetry.tracing]\notlp_endpoint = \"http://u:s3cret@otel:4318/v1/traces\"\n"),
        ["gw.toml:2: [telemetry.tracing]: otlp_endpoint \"http://***@otel:4318/v1/traces\": credentials in the URL are not sent; give them in OTEL_EXPORTER_OTLP_HEADERS (telemetry.md)"]
    );
    assert_eq!(
        errors("[telemetry.tracing]\nprotocol = \"thrift\"\n"),
        ["gw.toml:2: [telemetry.tracing]: unknown OTLP protocol \"thrift\": expected \"http/protobuf\" or \"grpc\""]
    );

    let tracing = |text: &str, role| {
        let loaded = parse("t.toml", text, role).unwrap_or_else(|e| panic!("{e}"));
        let t = loaded.config.telemetry.tracing.unwrap();
        (t.otlp_endpoint, t.protocol, t.sample_ratio, t.service_name)
    };
    use weir_config::OtlpProtocol::{Grpc, HttpProtobuf};
    // The default: a local collector over OTLP/HTTP, all new traces, the binary's name.
    assert_eq!(
        tracing("[telemetry.tracing]\n", Role::Gateway),
        (
            "http://127.0.0.1:4318/v1/traces".into(),
            HttpProtobuf,
            1.0,
            "weir-gateway".into()
        )
    );
    // Port 4317 is gRPC's; a path is kept as written.
    assert_eq!(
        tracing(
            "[telemetry.tracing]\notlp_endpoint = \"http://otel:4317\"\n",
            Role::Gateway
        )
        .1,
        Grpc
    );
    let text = "[telemetry.tracing]\notlp_endpoint = \"http://otel:80/otlp/v1/traces\"\nsample_ratio = 0.1\n\
                [inbound]\nlisten = \"127.0.0.1:15006\"\napp = \"127.0.0.1:8080\"\nmtls = \"disable\"\n";
    assert_eq!(
        tracing(text, Role::Sidecar),
        (
            "http://otel:80/otlp/v1/traces".into(),
            HttpProtobuf,
            0.1,
            "weir-sidecar".into()
        )
    );
}

#[test]
fn an_https_collector_takes_a_ca_and_a_client_certificate() {
    let dir = tempfile::tempdir().unwrap();
    let key = rcgen::KeyPair::generate().unwrap();
    let cert = rcgen::CertificateParams::new(vec!["weir".to_string()])
        .unwrap()
        .self_signed(&key)
        .unwrap();
    write(dir.path(), "ca.pem", &cert.pem());
    write(dir.path(), "weir.pem", &cert.pem());
    write(dir.path(), "weir-key.pem", &key.serialize_pem());
    let load_text = |text: &str| {
        write(dir.path(), "gw.toml", text);
        load(&dir.path().join("gw.toml"), Role::Gateway)
    };
    let tracing = "[telemetry.tracing]\notlp_endpoint = \"https://otel.example:4318\"\n";

    // https alone: the system's roots, no client certificate.
    let loaded = load_text(tracing).unwrap();
    let t = loaded.config.telemetry.tracing.unwrap();
    assert_eq!(t.otlp_endpoint, "https://otel.example:4318/v1/traces");
    let tls = t.tls.unwrap();
    assert_eq!((tls.ca, tls.client.is_some()), (None, false));

    // Files relative to the config; the certificate checked against its key.
    let text = format!(
        "{tracing}  [telemetry.tracing.tls]\n  ca = \"ca.pem\"\n  cert = \"weir.pem\"\n  key = \"weir-key.pem\"\n"
    );
    let tls = load_text(&text)
        .unwrap()
        .config
        .telemetry
        .tracing
        .unwrap()
        .tls
        .unwrap();
    assert_eq!(tls.ca, Some(dir.path().join("ca.pem")));
    assert_eq!((tls.roots.len(), tls.client.is_some()), (1, true));

    let errors = |text: &str| -> Vec<String> {
        let errors = load_text(text).unwrap_err().0;
        let dir = format!("{}/", dir.path().display());
        errors
            .iter()
            .map(|e| e.to_string().replace(&dir, ""))
            .collect()
    };
    assert_eq!(
        errors(&format!(
            "{tracing}  [telemetry.tracing.tls]\n  ca = \"weir-key.pem\"\n  cert = \"weir.pem\"\n"
        )),
        [
            "gw.toml:3: [telemetry.tracing.tls]: missing required key \"key\"",
            "gw.toml:4: [telemetry.tracing.tls]: weir-key.pem: no certificate found in PEM",
        ]
    );
    assert_eq!(
        errors(&format!(
            "{tracing}  [telemetry.tracing.tls]\n  cert = \"ca.pem\"\n  key = \"missing.pem\"\n"
        )),
        ["gw.toml:5: [telemetry.tracing.tls]: cannot read missing.pem: No such file or directory (os error 2)"]
    );
    assert_eq!(
        errors(
            "[telemetry.tracing]\notlp_endpoint = \"http://otel:4318\"\n  [telemetry.tracing.tls]\n  ca = \"ca.pem\"\n"
        ),
        ["gw.toml:3: [telemetry.tracing.tls]: tls is for an https:// otlp_endpoint"]
    );
}

#[test]
fn routes_on_tcp_and_tls_listeners_forward_bytes_only() {
    let listeners = "[[listener]]\nname = \"web\"\nlisten = \"127.0.0.1:8080\"\n\
                     [[listener]]\nname = \"db\"\nlisten = \"127.0.0.1:5432\"\nprotocol = \"tcp\"\n\
                     [[listener]]\nname = \"pass\"\nlisten = \"127.0.0.1:8443\"\nprotocol = \"tls\"\n";
    let services = "[[service]]\nname = \"pg\"\nendpoints = [\"10.0.0.1:5432\"]\n\
                    [[service]]\nname = \"api\"\nendpoints = [\"10.0.0.2:443\"]\n  [service.tls]\n  sni = \"api\"\n";
    let good = format!(
        "{listeners}{services}[[route]]\nname = \"pg\"\nlisteners = [\"db\"]\n  [[route.backend]]\n  service = \"pg\"\n\
         [[route]]\nname = \"any\"\n  [[route.backend]]\n  service = \"pg\"\n\
         [[route]]\nname = \"sni\"\nlisteners = [\"pass\"]\nhosts = [\"*.example.com\"]\n  [[route.backend]]\n  service = \"pg\"\n"
    );
    let loaded = parse("gw.toml", &good, Role::Gateway).unwrap_or_else(|e| panic!("{e}"));
    let c = &loaded.config;
    assert_eq!(c.listeners[1].protocol, weir_config::Protocol::Tcp);
    assert_eq!(c.listeners[1].idle_timeout, Duration::from_secs(3600));
    assert_eq!(c.listeners[0].idle_timeout, Duration::from_secs(75));
    let backends = |i: usize| match &c.routes[i].action {
        weir_config::Action::Backends(b) => b.len(),
        _ => 0,
    };
    assert_eq!((backends(0), backends(2)), (1, 1));
    let bad = format!(
        "{listeners}{services}[[route]]\nname = \"pg\"\nlisteners = [\"db\", \"web\"]\nhosts = [\"db.local\"]\n\
         timeout = \"1s\"\n  [[route.match]]\n  path = {{ prefix = \"/\" }}\n  [[route.backend]]\n  service = \"api\"\n"
    );
    assert_eq!(
        errors(&bad),
        [
            "gw.toml:22: route \"pg\": a route on tcp or tls listeners cannot also take http or https ones",
            "gw.toml:23: route \"pg\": hosts match the SNI of tls listeners; a tcp listener has no name to match",
            "gw.toml:24: route \"pg\": timeout applies to HTTP routes, not to a route on tcp or tls listeners",
            "gw.toml:25: route \"pg\": match applies to HTTP routes, not to a route on tcp or tls listeners",
        ]
    );
    let on_tls = format!(
        "{listeners}{services}[[route]]\nname = \"api\"\nlisteners = [\"pass\"]\n  [[route.backend]]\n  service = \"api\"\n"
    );
    assert_eq!(
        errors(&on_tls),
        ["gw.toml:23: route \"api\" backend[0]: service \"api\" has [service.tls]: a route on a tls listener passes the client's TLS through as it is"]
    );
    // A PROXY header goes to a service only from tcp and tls routes, and never with health
    // checks, which would go without one.
    let proxied = format!(
        "{listeners}[[service]]\nname = \"pg\"\nendpoints = [\"10.0.0.1:5432\"]\nproxy_protocol = \"v3\"\n\
         [[service]]\nname = \"told\"\nendpoints = [\"10.0.0.1:5433\"]\nproxy_protocol = \"v2\"\n\
         \x20 [service.health_check]\n  path = \"/\"\n\
         [[route]]\nname = \"web\"\n  [[route.backend]]\n  service = \"told\"\n"
    );
    assert_eq!(
        errors(&proxied),
        [
            "gw.toml:15: service \"pg\": proxy_protocol \"v3\": expected \"v1\" or \"v2\"",
            "gw.toml:20: service \"told\": health checks are sent without a PROXY header, which this service expects",
            "gw.toml:24: route \"web\" backend[0]: service \"told\" has proxy_protocol, which only routes on tcp and tls listeners send",
        ]
    );
    assert_eq!(
        errors("[[listener]]\nname = \"x\"\nlisten = \"127.0.0.1:1\"\nprotocol = \"udp\"\n"),
        ["gw.toml:4: listener \"x\": protocol \"udp\": expected \"http\", \"https\", \"tcp\" or \"tls\""]
    );
}

#[test]
fn the_app_protocol_is_http1_or_http2() {
    let sidecar = |app_protocol: &str| {
        let text = format!(
            "[inbound]\nlisten = \"127.0.0.1:15006\"\napp = \"127.0.0.1:8080\"\nmtls = \"disable\"\n{app_protocol}"
        );
        parse("s.toml", &text, Role::Sidecar)
    };
    let config = |loaded: Result<weir_config::Loaded, _>| loaded.unwrap().config;
    use weir_config::UpstreamProtocol::{Http1, Http2};
    let app = |c: weir_config::Config| {
        c.services
            .iter()
            .find(|s| s.name == "inbound")
            .unwrap()
            .protocol
    };
    assert_eq!(app(config(sidecar(""))), Http1);
    assert_eq!(app(config(sidecar("app_protocol = \"http2\"\n"))), Http2);
    let errs: Vec<String> = match sidecar("app_protocol = \"grpc\"\n") {
        Ok(_) => panic!("app_protocol grpc accepted"),
        Err(e) => e.0.iter().map(|e| e.to_string()).collect(),
    };
    assert_eq!(
        errs,
        ["s.toml:5: [inbound]: app_protocol \"grpc\": expected \"http1\" or \"http2\""]
    );
}

#[test]
fn sidecar_tcp_routes_take_destinations_and_the_app_tcp_ports() {
    let redis = "[[service]]\nname = \"redis\"\nendpoints = [\"10.0.0.9:6379\"]\n";
    let good = format!(
        "[inbound]\napp = \"127.0.0.1:8080\"\nmtls = \"disable\"\ntcp_ports = [6379]\n\
         [[route]]\nname = \"redis\"\ndestinations = [\"10.96.0.5:6379\"]\n  [[route.backend]]\n  service = \"redis\"\n{redis}"
    );
    let loaded = parse("sc.toml", &good, Role::Sidecar).unwrap_or_else(|e| panic!("{e}"));
    let c = &loaded.config;
    assert_eq!(c.sidecar.as_ref().unwrap().inbound.tcp_ports, [6379]);
    let route = c.routes.iter().find(|r| r.name == "redis").unwrap();
    assert_eq!(route.destinations, ["10.96.0.5:6379".parse().unwrap()]);
    assert!(route.listeners.is_empty(), "{:?}", route.listeners);
    let bad = format!(
        "[inbound]\napp = \"127.0.0.1:8080\"\nmtls = \"disable\"\ntcp_ports = [8080, 0, 6379, 6379, 9901, 15006, 15001]\n\
         [[route]]\nname = \"redis\"\nlisteners = [\"outbound\"]\ndestinations = [\"redis:6379\", \"10.96.0.5:6379\"]\n\
         hosts = [\"redis\"]\ntimeout = \"1s\"\n  [[route.backend]]\n  service = \"redis\"\n{redis}"
    );
    let sidecar_errors = |text: &str| match parse("sc.toml", text, Role::Sidecar) {
        Ok(_) => panic!("expected errors for:\n{text}"),
        Err(e) => e.0.iter().map(|e| e.to_string()).collect::<Vec<_>>(),
    };
    assert_eq!(
        sidecar_errors(&bad),
        [
            "sc.toml:4: [inbound] tcp_ports[0]: port 8080 is the app's HTTP port; tcp_ports are its other ones",
            "sc.toml:4: [inbound] tcp_ports[1]: port 0 is not 1-65535",
            "sc.toml:4: [inbound] tcp_ports[3]: port 6379 is listed twice",
            "sc.toml:4: [inbound] tcp_ports[4]: port 9901 is the sidecar's own [admin] listener",
            "sc.toml:4: [inbound] tcp_ports[5]: port 15006 is the sidecar's own [inbound] listener",
            "sc.toml:4: [inbound] tcp_ports[6]: port 15001 is the sidecar's own [outbound] listener",
            "sc.toml:7: route \"redis\": a route with destinations takes captured connections on the outbound listener; leave out listeners",
            "sc.toml:8: route \"redis\" destinations[0]: destination \"redis:6379\" is not an address and port, such as \"10.96.0.5:6379\"",
            "sc.toml:9: route \"redis\": a route with destinations matches a connection's original address; it has no name to match hosts against",
            "sc.toml:10: route \"redis\": timeout applies to HTTP routes, not to a route with destinations",
        ]
    );
    let twice = format!(
        "{good}[[route]]\nname = \"cache\"\ndestinations = [\"10.96.0.5:6379\"]\n  [[route.backend]]\n  service = \"redis\"\n"
    );
    assert_eq!(
        sidecar_errors(&twice),
        ["sc.toml:15: route \"cache\" destinations[0]: destination 10.96.0.5:6379 is route \"redis\"'s too; each has one route"]
    );
    let on_gateway = format!(
        "[[route]]\nname = \"redis\"\ndestinations = [\"10.96.0.5:6379\"]\n  [[route.backend]]\n  service = \"redis\"\n{redis}"
    );
    assert_eq!(
        errors(&on_gateway),
        ["gw.toml:3: route \"redis\": destinations route the sidecar's captured TCP connections; a gateway routes TCP by listener (protocol = \"tcp\")"]
    );
}

/// Values that would crash, hang or loop the proxy later are refused at load, each named.
#[test]
fn values_the_proxy_could_not_run_with_are_refused() {
    let text = format!(
        "{SERVICE}\
[[route]]
name = \"framing\"
  [route.request_headers]
  set = {{ \"content-length\" = \"5\" }}
  remove = [\"host\"]
  [route.response_headers]
  add = {{ \"transfer-encoding\" = \"chunked\" }}
  [[route.backend]]
  service = \"reviews\"
[[route]]
name = \"informational\"
direct_response = {{ status = 101 }}
[[route]]
name = \"no-content\"
direct_response = {{ status = 204, body = \"x\" }}
[[route]]
name = \"wild\"
redirect = {{ host = \"*.example.com\" }}
[[route]]
name = \"port\"
redirect = {{ host = \"a.example.com:99999\" }}
[[service]]
name = \"zero\"
endpoints = [\"127.0.0.1:0\"]
  [service.outlier_detection]
  base_ejection_time = \"18446744073709551615ms\"
[runtime]
threads = 5000
[telemetry]
access_log = \"\"
[[listener]]
name = \"web\"
listen = \"127.0.0.1:0\"
[[route]]
name = \"empty-host\"
rewrite = {{ host = \"\" }}
  [[route.backend]]
  service = \"reviews\"
[[route]]
name = \"spaced-host\"
rewrite = {{ host = \"a b:80\" }}
  [[route.backend]]
  service = \"reviews\"
[[route]]
name = \"v6\"
redirect = {{ host = \"[2001:db8::1]:8443\" }}
[[route]]
name = \"bad-v6\"
rewrite = {{ host = \"[2001:db8::g]\" }}
  [[route.backend]]
  service = \"reviews\"
"
    );
    let errs = errors(&text).join("\n");
    for want in [
        "gw.toml:7: route \"framing\": request_headers.set: \"content-length\" cannot be changed here: the proxy frames the body itself",
        "gw.toml:8: route \"framing\": request_headers.remove[0]: \"host\" cannot be changed here: a request has exactly one Host",
        "gw.toml:10: route \"framing\": response_headers.add: \"transfer-encoding\" cannot be changed here",
        "gw.toml:15: route \"informational\": status 101 is not a final HTTP status (200-599)",
        "gw.toml:18: route \"no-content\": a 204 response has no body",
        "gw.toml:21: route \"wild\" redirect: bad host \"*.example.com\"",
        "gw.toml:24: route \"port\" redirect: bad host \"a.example.com:99999\"",
        "gw.toml:27: service \"zero\" endpoints[0]: bad address \"127.0.0.1:0\": port 0 names no port",
        "gw.toml:29: service \"zero\": base_ejection_time: bad duration \"18446744073709551615ms\": too large (at most 8760h)",
        "gw.toml:31: [runtime]: 5000 threads: at most 1024",
        "gw.toml:33: [telemetry]: empty: \"stdout\", \"off\" or a file's path",
        "gw.toml:36: listener \"web\": bad address \"127.0.0.1:0\": port 0 names no port",
        "gw.toml:39: route \"empty-host\" rewrite: host must not be empty",
        "gw.toml:44: route \"spaced-host\" rewrite: bad host \"a b:80\": expected a name or [IPv6 address], with a port",
        "gw.toml:52: route \"bad-v6\" rewrite: bad host \"[2001:db8::g]\"",
    ] {
        assert!(errs.contains(want), "missing {want:?} in:\n{errs}");
    }
    assert!(!errs.contains("route \"v6\""), "{errs}");
}

#[test]
fn a_sidecar_app_on_its_own_listener_and_a_device_as_a_file_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let text = "[inbound]\napp = \"127.0.0.1:15006\"\nmtls = \"disable\"\n";
    let errs = sidecar_errors(dir.path(), text).join("\n");
    assert!(
        errs.contains("sc.toml:2: [inbound]: app 127.0.0.1:15006 is the sidecar's own"),
        "{errs}"
    );
    // A policy's name is its metric series.
    let text = "[inbound]\napp = \"127.0.0.1:8080\"\nmtls = \"disable\"\n\
                [[inbound.policy]]\nname = \"p\"\naction = \"deny\"\npaths = [\"/a\"]\n\
                [[inbound.policy]]\nname = \"p\"\naction = \"deny\"\npaths = [\"/b\"]\n\
                [[inbound.policy]]\nname = \"\"\naction = \"deny\"\npaths = [\"/c\"]\n\
                [[inbound.policy]]\nname = \"no-allow-matched\"\naction = \"deny\"\npaths = [\"/d\"]\n";
    let errs = sidecar_errors(dir.path(), text).join("\n");
    assert!(
        errs.contains(":17: [inbound] policy[3]: policy name \"no-allow-matched\" is taken"),
        "{errs}"
    );
    assert!(
        errs.contains(":9: [inbound] policy[1]: policy name \"p\" is taken"),
        "{errs}"
    );
    assert!(
        errs.contains(":13: [inbound] policy[2]: name must not be empty"),
        "{errs}"
    );
    // A FIFO or a device never ends; reading one would hang the load.
    let text = "[workload]\ncert = \"/dev/zero\"\nkey = \"/dev/zero\"\ntrust_bundle = \".\"\n\
                [inbound]\napp = \"127.0.0.1:8080\"\n";
    let errs = sidecar_errors(dir.path(), text).join("\n");
    assert!(
        errs.contains("cannot read /dev/zero: not a regular file"),
        "{errs}"
    );
    assert!(errs.contains(": not a regular file"), "{errs}");
}

/// A listener with errors of its own still counts as declared: the routes naming it are not
/// also told of an unknown listener (a certificate missing mid-rotation would say so of each).
#[test]
fn a_broken_listener_is_no_unknown_listener() {
    let text = "[[listener]]\nname = \"web\"\nlisten = \"127.0.0.1:99999\"\n\
                [[route]]\nname = \"r\"\nlisteners = [\"web\", \"nowhere\"]\n\
                direct_response = { status = 200 }\n";
    let errs = errors(text);
    assert_eq!(
        errs,
        [
            "gw.toml:3: listener \"web\": bad address \"127.0.0.1:99999\": expected ip:port, such as \"127.0.0.1:8080\"",
            "gw.toml:6: route \"r\" listeners[1]: unknown listener \"nowhere\"",
        ]
    );
}

/// Weir answers a direct response or a redirect itself: what concerns the request sent
/// upstream would silently do nothing there.
#[test]
fn upstream_keys_on_a_route_weir_answers_are_errors() {
    let text = "[[route]]\nname = \"r\"\ntimeout = \"100ms\"\n\
                direct_response = { status = 200 }\n\
                  [route.retry]\n  attempts = 5\n\
                  [route.request_headers]\n  set = { x-a = \"b\" }\n\
                  [route.response_headers]\n  set = { x-c = \"d\" }\n";
    assert_eq!(
        errors(text),
        [
            "gw.toml:3: route \"r\": timeout applies only to routes with [[route.backend]]",
            "gw.toml:5: route \"r\": retry applies only to routes with [[route.backend]]",
            "gw.toml:7: route \"r\": request_headers applies only to routes with [[route.backend]]",
        ]
    );
}

/// A request's header value that is not visible ASCII counts as absent to a match, so a
/// pattern that is not could never match.
#[test]
fn a_header_match_on_a_value_no_request_can_have_is_an_error() {
    let text = "[[route]]\nname = \"r\"\ndirect_response = { status = 200 }\n\
                  [[route.match]]\n  headers = { x-v = { exact = \"café\" }, x-w = { prefix = \"a b\" } }\n";
    assert_eq!(
        errors(text),
        ["gw.toml:5: route \"r\" match[0]: header \"x-v\" value \"café\": a header value matched must be visible ASCII (a request's other values count as absent)"]
    );
}

/// Two places setting the Host upstream: one would silently win.
#[test]
fn a_host_set_twice_is_an_error() {
    let text = format!(
        "{SERVICE}[[route]]\nname = \"r\"\nrewrite = {{ host = \"a.internal\" }}\n\
           [[route.backend]]\n  service = \"reviews\"\n\
           [route.request_headers]\n  set = {{ Host = \"b.internal\" }}\n"
    );
    assert_eq!(
        errors(&text),
        ["gw.toml:9: route \"r\": host is set here and by rewrite.host: set it in one place"]
    );
}

/// A path is matched as the proxy forwards it: normalized, without its query, percent-encoded.
/// A pattern no such path can meet is an error, not a route (or a deny policy) that never
/// applies.
#[test]
fn a_path_no_request_can_have_is_an_error() {
    let route = |name: &str, path: &str| {
        format!(
            "[[route]]\nname = \"{name}\"\ndirect_response = {{ status = 200 }}\n  [[route.match]]\n  path = {path}\n"
        )
    };
    let text = [
        route("tilde", r#"{ exact = "/%7Euser" }"#),
        route("dots", r#"{ prefix = "/a/../b" }"#),
        route("query", r#"{ exact = "/q?b=1" }"#),
        route("space", r#"{ exact = "/sp ace" }"#),
        route("utf8", r#"{ prefix = "/zürich" }"#),
        route("open-end", r#"{ prefix = "/a/." }"#),
        route("encoded", r#"{ prefix = "/z%C3%BCrich/%2F" }"#),
        route("lower-hex", r#"{ exact = "/a%2fb" }"#),
        route("regex-hex", r#"{ regex = "/files/a%2fb" }"#),
    ]
    .concat();
    let errs = errors(&text);
    assert_eq!(errs.len(), 7, "{errs:#?}");
    for (name, why) in [
        (
            "tilde",
            "escaped letters, digits and \"-._~\" are matched decoded",
        ),
        (
            "dots",
            "\".\" and \"..\" segments are removed before matching",
        ),
        ("query", "the query is no part of the path"),
        (
            "space",
            "a request sends spaces and non-ASCII characters percent-encoded",
        ),
        (
            "utf8",
            "a request sends spaces and non-ASCII characters percent-encoded",
        ),
        (
            "lower-hex",
            "escapes are matched with upper-case hex digits",
        ),
        (
            "regex-hex",
            "escapes are matched with upper-case hex digits",
        ),
    ] {
        assert!(
            errs.iter().any(
                |e| e.contains(&format!("route \"{name}\" match[0]: path ")) && e.contains(why)
            ),
            "{name}: {errs:#?}"
        );
    }

    let dir = tempfile::tempdir().unwrap();
    mesh_files(dir.path(), &["spiffe://mesh.local/sa/a"]);
    let text = format!(
        "{WORKLOAD}[inbound]\napp = \"127.0.0.1:8080\"\n  [[inbound.policy]]\n  action = \"deny\"\n  \
         paths = [\"/admin/*\", \"/a/../admin*\", \"*/./x\", \"/api/c%2fd\"]\n"
    );
    let errs = sidecar_errors(dir.path(), &text).join("\n");
    assert!(
        errs.contains("paths[1]: path \"/a/../admin*\" can never match"),
        "{errs}"
    );
    assert!(
        errs.contains("paths[2]: path \"*/./x\" can never match"),
        "{errs}"
    );
    assert!(
        errs.contains(
            "paths[3]: path \"/api/c%2fd\" can never match: escapes are matched with upper-case"
        ),
        "{errs}"
    );
    assert!(!errs.contains("paths[0]"), "{errs}");
}

/// The access log is opened at start: `validate` says now what the start would.
#[test]
fn an_access_log_that_cannot_be_opened_is_an_error() {
    let dir = tempfile::tempdir().unwrap();
    for (path, why) in [
        (dir.path().display().to_string(), "is a directory"),
        (
            dir.path()
                .join("no/such/dir/access.log")
                .display()
                .to_string(),
            "its directory does not exist",
        ),
        ("stderr".to_string(), "would be a file of that name"),
        ("STDOUT".to_string(), "would be a file of that name"),
        ("OFF".to_string(), "would be a file of that name"),
    ] {
        let text = format!("[telemetry]\naccess_log = \"{path}\"\n");
        let errs = errors(&text);
        let want = format!("gw.toml:2: [telemetry]: access_log {path:?}: {why}");
        assert!(errs.len() == 1 && errs[0].starts_with(&want), "{errs:?}");
    }
}

/// A value of neither accepted form says what the forms are, not serde's enum name.
#[test]
fn a_value_of_no_accepted_form_says_the_forms() {
    // A table with a key of its own too (serde_ignored does not look inside this one).
    for hash_on in ["5", "{ header = \"x-user\", extra = 1 }"] {
        let text = format!("{SERVICE}hash_on = {hash_on}\n");
        assert_eq!(
            errors(&text),
            ["gw.toml:4: service \"reviews\" hash_on: expected \"source_ip\", { header = \"x-user\" } or { cookie = \"user\" }"]
        );
    }
    let text = format!(
        "{SERVICE}[[route]]\nname = \"r\"\n  [[route.backend]]\n  service = \"reviews\"\n  [route.retry]\n  on = [true]\n"
    );
    let errs = errors(&text);
    assert_eq!(errs.len(), 1, "{errs:?}");
    assert!(
        errs[0].ends_with("route \"r\" retry.on: expected a retry condition: a name such as \"5xx\" or \"unavailable\", or a status code such as 503"),
        "{errs:?}"
    );
}

/// A DNS name with its root dot (`name.svc.cluster.local.`) is a name; the SNI sent is the
/// name without it (RFC 6066 §3).
#[test]
fn a_dns_name_may_end_with_its_root_dot() {
    let text = "[[service]]\nname = \"s\"\ndns = \"reviews.default.svc.cluster.local.:443\"\n\
                  [service.tls]\n  mode = \"simple\"\n";
    let loaded = parse("gw.toml", text, Role::Gateway).unwrap();
    let service = &loaded.config.services[0];
    let tls = service.tls.as_ref().unwrap();
    assert_eq!(tls.sni, "reviews.default.svc.cluster.local");
}

/// Each health check interval probes every endpoint: "1ms" (for "1s") would flood them.
#[test]
fn a_health_check_interval_under_100ms_is_an_error() {
    let text =
        format!("{SERVICE}  [service.health_check]\n  path = \"/h\"\n  interval = \"1ms\"\n");
    assert_eq!(
        errors(&text),
        ["gw.toml:6: service \"reviews\": health_check interval 1ms: at least 100ms, each probing every endpoint"]
    );
}

/// An empty path is said to be one, not read as the config's own directory.
#[test]
fn an_empty_pem_path_is_said_so() {
    let text = format!(
        "{SERVICE}  [service.tls]\n  mode = \"simple\"\n  sni = \"reviews\"\n  ca = \"\"\n"
    );
    assert_eq!(
        errors(&text),
        ["gw.toml:7: service \"reviews\": empty: expected a PEM file's path"]
    );
}

/// A bad `sni` names the key, and asks for what it takes: a host name, no wildcard.
#[test]
fn a_bad_sni_names_the_key() {
    for sni in ["bad sni", "", "*.example.com"] {
        let text = format!("{SERVICE}  [service.tls]\n  mode = \"simple\"\n  sni = \"{sni}\"\n");
        assert_eq!(
            errors(&text),
            [format!("gw.toml:6: service \"reviews\": sni {sni:?}: expected a host name such as \"reviews.default.svc\"")]
        );
    }
}

/// A principal of a trust domain the workload does not take could never match: its callers
/// are refused in the handshake. Named in `trust_domains`, it can.
#[test]
fn a_principal_of_an_untrusted_trust_domain_is_an_error() {
    let dir = tempfile::tempdir().unwrap();
    mesh_files(dir.path(), &["spiffe://mesh.local/sa/a"]);
    let policy =
        "[inbound]\napp = \"127.0.0.1:8080\"\n  [[inbound.policy]]\n  action = \"allow\"\n  \
                  principals = [\"spiffe://mesh.local/sa/b\", \"spiffe://other.mesh/sa/c\"]\n";
    let errs = sidecar_errors(dir.path(), &format!("{WORKLOAD}{policy}"));
    assert_eq!(errs.len(), 1, "{errs:#?}");
    assert!(
        errs[0].contains("principals[1]: principal \"spiffe://other.mesh/sa/c\": trust domain \"other.mesh\" is not the workload's"),
        "{errs:#?}"
    );
    let trusting = format!("{WORKLOAD}trust_domains = [\"other.mesh\"]\n{policy}");
    write(dir.path(), "sc.toml", &trusting);
    load(&dir.path().join("sc.toml"), Role::Sidecar).unwrap();
}
