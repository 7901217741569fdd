//! The command line both binaries share (DESIGN.md §6).
#![allow(clippy::print_stdout)]

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use clap::{CommandFactory, FromArgMatches, Parser, Subcommand};
use weir_config::{Action, Role};
use weir_routing::{HeaderList, Request, RouteTable, Verdict};

use crate::git::GitSource;

/// `println!` that ends the process quietly, as a Unix tool does, when stdout is gone
/// (`weir-gateway explain ... | head`): Rust ignores SIGPIPE, and `println!` panics instead.
macro_rules! say {
    ($($arg:tt)*) => {{
        use std::io::Write as _;
        if writeln!(std::io::stdout(), $($arg)*).is_err() {
            std::process::exit(141); // 128 + SIGPIPE, what the shell reports for one
        }
    }};
}
use crate::reload::Reloader;

#[derive(Parser)]
#[command(version, about = "Weir: a service-mesh data plane on Pingora")]
struct Cli {
    /// Config file, or directory of *.toml files (default: config/gateway.toml or config/sidecar.toml).
    #[arg(long, global = true, value_name = "PATH")]
    config: Option<PathBuf>,
    /// Read the config from this Git repository instead (any URL `git fetch` takes), polled
    /// for new commits.
    #[arg(long, value_name = "URL", conflicts_with = "config")]
    config_git: Option<String>,
    // The --git-* options mean nothing without a repository. Their defaults are applied in
    // `serve`, not by clap, which does not hold an option with a default to its `requires`;
    // and `conflicts_with` too, as clap waives a requirement whose arg conflicts with one given.
    /// The branch or tag of --config-git to serve [default: main].
    #[arg(
        long,
        value_name = "REF",
        requires = "config_git",
        conflicts_with = "config"
    )]
    git_ref: Option<String>,
    /// The config file or directory inside the repository [default: .].
    #[arg(
        long,
        value_name = "PATH",
        value_parser = in_repository,
        requires = "config_git",
        conflicts_with = "config"
    )]
    git_path: Option<PathBuf>,
    /// How often to fetch the ref, e.g. 15s or 1m [default: 15s].
    #[arg(long, value_name = "DURATION", value_parser = poll_period, requires = "config_git", conflicts_with = "config")]
    git_poll: Option<Duration>,
    /// Take the listening sockets over from the proxy running on the same admin address
    /// (Pingora's graceful upgrade): start this one, then send the old one SIGQUIT.
    #[arg(long)]
    upgrade: bool,
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Subcommand)]
enum Command {
    /// Check a config: print every error with file:line; exit 1 if there is any.
    Validate,
    /// Show which route a request would take, why the others did not, and what applies.
    Explain {
        /// HTTP method, e.g. GET.
        method: String,
        /// Full URL, e.g. http://reviews.example.com/api/x?variant=b
        url: String,
        /// A request header, "name: value"; repeatable.
        #[arg(short = 'H', long = "header", value_name = "HEADER")]
        headers: Vec<String>,
        /// Listener to route on (default: the one whose port the URL names, else the first).
        #[arg(long)]
        listener: Option<String>,
        /// The sidecar's inbound: the caller's SPIFFE id, for `[[inbound.policy]]`
        /// (default: a caller without a certificate).
        #[arg(long, value_name = "SPIFFE_ID")]
        peer: Option<String>,
    },
    /// The sidecar's traffic capture: print the iptables rules (`iptables-restore` input)
    /// that send the pod's TCP connections through its listeners.
    Iptables {
        /// The group the sidecar runs as; its own connections are not captured.
        #[arg(long, value_name = "GID", default_value_t = 1337)]
        proxy_gid: u32,
        /// Outbound ports not to capture, comma-separated: server-first protocols (MySQL,
        /// SMTP), whose first bytes come from the server.
        #[arg(long, value_name = "PORTS", value_delimiter = ',')]
        exclude_outbound_ports: Vec<u16>,
    },
}

/// A `--git-poll`: 100ms at least, as each poll runs git (and logs a failed fetch).
fn poll_period(text: &str) -> Result<Duration, String> {
    let period = weir_config::duration::parse_period(text)?;
    match period >= Duration::from_millis(100) {
        true => Ok(period),
        false => Err(format!("{text:?}: at least 100ms (each poll runs git)")),
    }
}

/// A `--git-path`: relative, and never out of the repository through `..` (a leading `/`, a
/// typo, would serve a file of the host's under the commit's name).
fn in_repository(text: &str) -> Result<PathBuf, String> {
    let path = PathBuf::from(text);
    let inside = path.components().all(|c| {
        matches!(
            c,
            std::path::Component::Normal(_) | std::path::Component::CurDir
        )
    });
    match inside {
        true => Ok(path),
        false => Err("a path inside the repository, such as gw or gw/gateway.toml".into()),
    }
}

/// Entry point of `weir-gateway` and `weir-sidecar`.
pub fn main(role: Role) -> ExitCode {
    // Named for the binary (`--version` said weir-proxy, the crate this is in).
    let name = match role {
        Role::Gateway => "weir-gateway",
        Role::Sidecar => "weir-sidecar",
    };
    let mut command = Cli::command().name(name);
    if role == Role::Gateway {
        // Traffic capture, and the inbound policies `--peer` is checked against, are the
        // sidecar's.
        command = command.mut_subcommand("iptables", |c| c.hide(true));
        command = command.mut_subcommand("explain", |c| c.mut_arg("peer", |a| a.hide(true)));
    }
    let matches = command.get_matches();
    let cli = Cli::from_arg_matches(&matches).unwrap_or_else(|e| e.exit());
    let default = match role {
        Role::Gateway => "config/gateway.toml",
        Role::Sidecar => "config/sidecar.toml",
    };
    let path = cli.config.clone().unwrap_or_else(|| PathBuf::from(default));
    match cli.command {
        Some(_) if cli.config_git.is_some() => {
            eprintln!("validate, explain and iptables read files: use --config PATH on a checkout");
            ExitCode::from(2)
        }
        Some(Command::Validate) => validate(&path, role),
        Some(Command::Explain {
            method,
            url,
            headers,
            listener,
            peer,
        }) => {
            if role == Role::Gateway && peer.is_some() {
                eprintln!("--peer is the sidecar's: a gateway has no [[inbound.policy]] to check");
                return ExitCode::from(2);
            }
            let request = (method.as_str(), url.as_str(), &headers[..]);
            explain(&path, role, request, listener.as_deref(), peer.as_deref())
        }
        Some(Command::Iptables {
            proxy_gid,
            exclude_outbound_ports,
        }) => {
            let options = crate::capture::RuleOptions {
                proxy_gid,
                exclude_outbound_ports,
            };
            iptables(&path, role, &options)
        }
        None => serve(&cli, &path, role),
    }
}

fn iptables(path: &Path, role: Role, options: &crate::capture::RuleOptions) -> ExitCode {
    let loaded = match weir_config::load(path, role) {
        Ok(l) => l,
        Err(errors) => {
            eprintln!("{errors}");
            return ExitCode::FAILURE;
        }
    };
    let Some(sidecar) = &loaded.config.sidecar else {
        eprintln!("traffic capture is the sidecar's: run `weir-sidecar iptables`");
        return ExitCode::from(2);
    };
    let inbound = sidecar.inbound.listen;
    if inbound.ip().is_loopback() {
        eprintln!(
            "warning: [inbound] listen = \"{inbound}\" is on loopback: REDIRECT delivers the \
             pod's inbound connections to its own address, which this listener never takes; \
             listen on 0.0.0.0 (sidecar.md)"
        );
    }
    say!("{}", crate::capture::rules(sidecar, options).trim_end());
    ExitCode::SUCCESS
}

fn serve(cli: &Cli, path: &Path, role: Role) -> ExitCode {
    hold_sighup();
    crate::init_tracing();
    let git = match &cli.config_git {
        None => None,
        // One checkout per process: an upgrade's new process must not pull the old one's away.
        Some(url) => {
            let root = match crate::private_dir() {
                Ok(dir) => dir.join(format!("git-{}", std::process::id())),
                Err(e) => {
                    eprintln!("error: {e:#}; not starting");
                    return ExitCode::FAILURE;
                }
            };
            let git_ref = cli.git_ref.as_deref().unwrap_or("main");
            let git_path = cli.git_path.as_deref().unwrap_or(Path::new("."));
            let poll = cli.git_poll.unwrap_or(Duration::from_secs(15));
            match GitSource::fetch_first(url, git_ref, git_path, poll, &root) {
                Ok(source) => Some(Arc::new(source)),
                Err(e) => {
                    eprintln!("error: {e:#}; not starting");
                    return ExitCode::FAILURE;
                }
            }
        }
    };
    let loaded = match &git {
        None => Reloader::new(path, role),
        Some(git) => {
            let path = git.config_path();
            let checkout = git.checkout();
            Reloader::from_source(&path, role, git.describe(), Some((&checkout, git.commit())))
        }
    };
    let reloader = match loaded {
        Ok(r) => r,
        Err(errors) => {
            match &git {
                Some(git) => {
                    let checkout = format!("{}/", git.checkout().display());
                    let commit = git.commit();
                    let at = &commit[..commit.len().min(12)];
                    eprintln!(
                        "{}",
                        errors.to_string().replace(&checkout, &format!("{at}:"))
                    );
                    git.remove_checkout();
                }
                None => eprintln!("{errors}"),
            }
            let source = git.map_or_else(|| path.display().to_string(), |g| g.describe());
            eprintln!("{source}: {} error(s); not starting", errors.0.len());
            return ExitCode::FAILURE;
        }
    };
    match crate::server::run(reloader, git.clone(), cli.upgrade) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            if let Some(git) = git {
                git.remove_checkout();
            }
            ExitCode::FAILURE
        }
    }
}

/// SIGHUP's default action ends the process, and the control task listens for it only once
/// the server runs: a reloader's `kill -HUP` during a start, a first Git fetch or an upgrade's
/// wait for the sockets would kill it. Taken over first thing, it is a reload, or nothing yet
/// (tokio keeps a signal's handler for the life of the process once it has one).
fn hold_sighup() {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_io()
        .build();
    match runtime {
        Ok(runtime) => runtime.block_on(async {
            if let Err(e) = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup()) {
                eprintln!("warning: cannot take SIGHUP over: {e}");
            }
        }),
        Err(e) => eprintln!("warning: cannot take SIGHUP over: {e}"),
    }
}

fn validate(path: &Path, role: Role) -> ExitCode {
    match weir_config::load(path, role) {
        // A start would refuse it: so does `validate`.
        Ok(loaded) if loaded.config.listeners.is_empty() => {
            eprintln!("{}: {}", path.display(), crate::server::NO_LISTENER);
            ExitCode::FAILURE
        }
        Ok(loaded) => {
            let c = &loaded.config;
            say!(
                "{}: ok ({} files, {} listeners, {} routes, {} services)",
                path.display(),
                loaded.files.len(),
                c.listeners.len(),
                c.routes.len(),
                c.services.len()
            );
            ExitCode::SUCCESS
        }
        Err(errors) => {
            eprintln!("{errors}");
            eprintln!("{}: {} error(s)", path.display(), errors.0.len());
            ExitCode::FAILURE
        }
    }
}

/// `request`: method, URL and "name: value" headers.
fn explain(
    path: &Path,
    role: Role,
    (method, url, headers): (&str, &str, &[String]),
    listener: Option<&str>,
    peer: Option<&str>,
) -> ExitCode {
    let loaded = match weir_config::load(path, role) {
        Ok(l) => l,
        Err(errors) => {
            eprintln!("{errors}");
            return ExitCode::FAILURE;
        }
    };
    let config = &loaded.config;
    let uri: http::Uri = match url.parse::<http::Uri>() {
        Ok(u) if u.scheme().is_some() || url.starts_with('/') => u,
        Ok(_) => {
            eprintln!("bad URL {url:?}: expected a full URL (http://host/path) or a path (/path)");
            return ExitCode::FAILURE;
        }
        Err(e) => {
            eprintln!(
                "bad URL {url:?}: {e}; expected a full URL (http://host/path) or a path (/path)"
            );
            return ExitCode::FAILURE;
        }
    };
    let mut pairs = Vec::new();
    for h in headers {
        match h.split_once(':') {
            Some((k, v)) => pairs.push((k.trim().to_ascii_lowercase(), v.trim().to_string())),
            None => {
                eprintln!("bad header {h:?}: expected \"name: value\"");
                return ExitCode::FAILURE;
            }
        }
    }
    let names: Vec<String> = config.listeners.iter().map(|l| l.name.clone()).collect();
    let by_port = uri
        .port_u16()
        .and_then(|p| config.listeners.iter().find(|l| l.listen.port() == p))
        .map(|l| l.name.clone());
    let Some(listener) = listener
        .map(str::to_string)
        .or(by_port)
        .or_else(|| names.first().cloned())
    else {
        eprintln!("the config has no listener to route on");
        return ExitCode::FAILURE;
    };
    if !names.contains(&listener) {
        eprintln!("no listener named {listener:?} (have: {names:?})");
        return ExitCode::FAILURE;
    }
    let table = RouteTable::new(config, &listener);
    // As the proxy sees it: the URL's authority is the Host (an HTTP/2 request's
    // `:authority` is too), unless a Host header is given.
    if let (Some(authority), false) = (uri.authority(), pairs.iter().any(|(k, _)| k == "host")) {
        pairs.push(("host".into(), authority.to_string()));
    }
    let host_header = pairs
        .iter()
        .find(|(k, _)| k == "host")
        .map(|(_, v)| v.clone());
    let authority = host_header.as_deref().or(uri.host()).unwrap_or("");
    let host = match authority.strip_prefix('[') {
        Some(v6) => v6.split(']').next().unwrap_or(v6),
        None => authority.split(':').next().unwrap_or(""),
    }
    .to_ascii_lowercase();
    let header_refs: Vec<(&str, &str)> = pairs
        .iter()
        .map(|(k, v)| (k.as_str(), v.as_str()))
        .collect();
    // As the proxy sees them: the method as sent (methods are case-sensitive), the path
    // normalized.
    if http::Method::from_bytes(method.as_bytes()).is_err() {
        eprintln!("bad method {method:?}");
        return ExitCode::FAILURE;
    }
    let path = weir_routing::normalize_path(uri.path());
    let path = path.as_deref().unwrap_or(uri.path());
    let req = Request {
        method,
        host: &host,
        path,
        query: uri.query(),
        headers: &HeaderList(&header_refs),
    };

    say!("request:  {method} {url}  (listener {listener:?}, host {host:?})");
    // A tcp or tls listener forwards bytes: only the host (a tls listener's SNI) counts.
    let stream = (config.listeners.iter())
        .find(|l| l.name == listener)
        .is_some_and(|l| l.protocol.is_stream());
    let candidates = table.explain(&req);
    match table.find(&req) {
        None if stream => say!("route:    none -> the connection is closed, flag NR"),
        None => match &config.sidecar {
            Some(s) if listener == "outbound" && s.outbound.passthrough => say!(
                "route:    none -> a captured call goes on to the address the app called \
                 (PassthroughCluster); an uncaptured one gets 404, flag NR"
            ),
            _ => say!("route:    none -> 404, flag NR"),
        },
        Some(found) => {
            let r = &found.route.config;
            let block = found
                .block
                .map_or("no match blocks".to_string(), |b| format!("match[{b}]"));
            say!("route:    {:?} ({}), {block}", r.name, r.origin);
            let peer = peer.filter(|p| !p.is_empty());
            let strict = |s: &weir_config::Sidecar| s.inbound.mtls == weir_config::Mtls::Strict;
            if let (Some(sidecar), true) = (&config.sidecar, listener == "inbound") {
                let policies = &sidecar.inbound.policies;
                let who = peer.unwrap_or("a caller without a certificate");
                let verdict = weir_routing::authz::authorize(policies, peer, method, path);
                // A caller of another trust domain (or with no SPIFFE id) is refused in the
                // handshake, as one without a certificate is under strict mTLS.
                let foreign = peer.zip(config.workload.as_ref()).and_then(|(id, w)| {
                    let identity = weir_tls::PeerIdentity {
                        uris: vec![id.to_string()],
                        ..Default::default()
                    };
                    weir_tls::mesh::peer_id(&identity, &w.trust_domains).err()
                });
                match verdict {
                    // The handshake refuses it before any policy is looked at.
                    _ if peer.is_none() && strict(sidecar) => say!(
                        "authz:    a caller without a certificate is refused in the TLS \
                         handshake (mtls = \"strict\"); name one with --peer SPIFFE_ID"
                    ),
                    _ if foreign.is_some() => say!(
                        "authz:    refused in the TLS handshake: {}",
                        foreign.unwrap_or_default()
                    ),
                    Ok(()) if policies.is_empty() => say!("authz:    allowed (no policy)"),
                    Ok(()) => say!("authz:    allowed for {who}"),
                    Err(policy) => {
                        say!("authz:    denied for {who} by {policy:?} -> 403, flag AD");
                    }
                }
            }
            match &r.action {
                Action::Redirect(rd) => say!(
                    "action:   redirect {} to scheme {}, host {}, path {} (query kept)",
                    rd.status,
                    rd.scheme.as_deref().unwrap_or("(same)"),
                    rd.host.as_deref().unwrap_or("(same)"),
                    rd.path.as_deref().unwrap_or("(same)")
                ),
                Action::DirectResponse { status, body } => {
                    say!(
                        "action:   direct response {status}, {} byte body",
                        body.len()
                    )
                }
                Action::Backends(backends) => {
                    let total: u64 = backends.iter().map(|b| u64::from(b.weight)).sum();
                    say!("action:   split between {} backend(s)", backends.len());
                    for b in backends {
                        let share = 100.0 * f64::from(b.weight) / total as f64;
                        let how = config
                            .services
                            .iter()
                            .find(|s| s.name == b.service)
                            .map(describe_service)
                            .unwrap_or_default();
                        say!(
                            "            {}  weight {}  ({share:.1}%)  {how}",
                            b.service,
                            b.weight
                        );
                    }
                }
            }
            match stream {
                // Bytes, not requests: the method and path play no part, nor HTTP's policies.
                true => say!(
                    "connect:  a tcp/tls listener: the connection's bytes go to the backend; a \
                     failed connect tries another endpoint, up to three"
                ),
                false => describe_policies(r),
            }
        }
    }
    say!("candidates, in precedence order:");
    for c in &candidates {
        let block = c.block.map_or(String::new(), |b| format!(" match[{b}]"));
        let name = format!("{:?}{block}", c.route.config.name);
        match &c.verdict {
            Verdict::Wins => say!("  wins      {name}"),
            Verdict::Shadowed => say!("  shadowed  {name}: matches too, but lower precedence"),
            Verdict::NoMatch(why) => say!("  no match  {name}: {why}"),
        }
    }
    ExitCode::SUCCESS
}

/// "round robin over 10.0.0.1:80, 10.0.0.2:80", "least request over dns reviews:9080", ...,
/// then how TLS reaches them: "; mutual TLS to payments.internal (CA certs/ca.pem)".
fn describe_service(s: &weir_config::Service) -> String {
    use weir_config::{HashOn, LoadBalancer};
    let how = match &s.load_balancer {
        LoadBalancer::RoundRobin => "round robin".to_string(),
        LoadBalancer::Random => "random".to_string(),
        LoadBalancer::LeastRequest => "least request".to_string(),
        LoadBalancer::ConsistentHash(HashOn::Header(h)) => format!("consistent hash on header {h}"),
        LoadBalancer::ConsistentHash(HashOn::Cookie(c)) => format!("consistent hash on cookie {c}"),
        LoadBalancer::ConsistentHash(HashOn::SourceIp) => {
            "consistent hash on source ip".to_string()
        }
    };
    let over = match &s.dns {
        Some(dns) => format!("dns {}:{}", dns.name, dns.port),
        None => s
            .endpoints
            .iter()
            .map(|e| e.to_string())
            .collect::<Vec<_>>()
            .join(", "),
    };
    let tls = match &s.tls {
        None => String::new(),
        Some(t) if t.mode == weir_config::TlsMode::Mesh => {
            let ids = match t.identities.is_empty() {
                true => "any mesh identity".to_string(),
                false => t.identities.join(", "),
            };
            format!("; mesh mTLS, accepting {ids}")
        }
        Some(t) => {
            let mode = match t.mode {
                weir_config::TlsMode::Mutual => "mutual TLS",
                _ => "TLS",
            };
            let ca =
                t.ca.as_ref()
                    .map_or("the system's".to_string(), |c| c.display().to_string());
            format!("; {mode} to {} (CA {ca})", t.sni)
        }
    };
    let http2 = match s.protocol {
        weir_config::UpstreamProtocol::Http2 => ", HTTP/2",
        weir_config::UpstreamProtocol::Http1 => "",
    };
    format!("{how} over {over}{http2}{tls}")
}

/// What else the route does to a matching request: deadline, retries, faults, mirror,
/// rewrites, header changes.
fn describe_policies(r: &weir_config::Route) {
    use weir_config::duration::format;
    if let Some(t) = r.timeout {
        say!(
            "timeout:  {} for the whole request, retries included (504 DT)",
            format(t)
        );
    }
    if matches!(r.action, weir_config::Action::Backends(_)) {
        let rt = &r.retry;
        if rt.attempts == 0 {
            say!("retry:    off");
        } else {
            let on = &rt.on;
            let mut conds: Vec<String> = [
                (on.connect_failure, "connect-failure"),
                (on.refused_stream, "refused-stream"),
                (on.reset, "reset"),
                (on.any_5xx, "5xx"),
                (on.gateway_error, "gateway-error"),
                (on.retriable_4xx, "retriable-4xx"),
            ]
            .iter()
            .filter(|(set, _)| *set)
            .map(|(_, name)| name.to_string())
            .collect();
            conds.extend(on.statuses.iter().map(|c| c.to_string()));
            let grpc = weir_config::GRPC_RETRY_ON
                .iter()
                .filter(|(_, code)| on.grpc.contains(code));
            conds.extend(grpc.map(|(name, _)| format!("grpc {name}")));
            let per_try = rt
                .per_try_timeout
                .map(|t| format!(", {} per try", format(t)))
                .unwrap_or_default();
            say!(
                "retry:    up to {} on {}{per_try}; backoff {}; {} (budget {} of requests + {}/s)",
                rt.attempts,
                conds.join(", "),
                format(rt.backoff),
                if rt.non_idempotent {
                    "any method"
                } else {
                    "POST and other non-idempotent methods only if the request never reached the upstream"
                },
                rt.budget.ratio,
                rt.budget.min_per_second
            );
        }
    }
    if let Some(f) = &r.fault {
        if let Some(d) = &f.delay {
            let fixed = weir_config::duration::format(d.fixed);
            say!(
                "fault:    delay {fixed} for {}% of requests (flag FI)",
                d.percent
            );
        }
        if let Some(a) = &f.abort {
            say!(
                "fault:    abort with {} for {}% of requests (flag FI)",
                a.status,
                a.percent
            );
        }
    }
    if let Some(m) = &r.mirror {
        say!(
            "mirror:   {}% of requests copied to service {:?} (Host + \"-shadow\", bodies up to {} bytes)",
            m.percent, m.service, m.max_body_bytes
        );
    }
    if let Some(rw) = &r.rewrite {
        if let Some(p) = &rw.path_prefix {
            say!("rewrite:  matched path prefix -> {p:?}");
        }
        if let Some(h) = &rw.host {
            say!("rewrite:  Host -> {h:?}");
        }
    }
    for (label, ops) in [
        ("request", &r.request_headers),
        ("response", &r.response_headers),
    ] {
        for (k, v) in &ops.set {
            say!("{label} header: set {k}: {v}");
        }
        for (k, v) in &ops.add {
            say!("{label} header: add {k}: {v}");
        }
        for k in &ops.remove {
            say!("{label} header: remove {k}");
        }
    }
}
