//! Raw -> validated: every check runs and every error is kept, each with its place.

use std::collections::{HashMap, HashSet};
use std::hash::{Hash, Hasher};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use crate::model::*;
use crate::raw::*;
use crate::source::{keys, ConfigError, Seg, Sources};
use weir_tls::mesh::spiffe_id_ok;

/// A certificate, key or CA file the config names, and its contents.
pub type Material = (PathBuf, Vec<u8>);

/// What routes on `tcp` and `tls` listeners are checked against.
struct Streams<'a> {
    /// The `tcp` and `tls` listeners, by name.
    listeners: HashMap<&'a str, Protocol>,
    /// Services that originate TLS, and how.
    tls_services: HashMap<&'a str, TlsMode>,
}

/// Checks and merges the raw files (in `sources` order) into one [`Config`].
pub fn validate(
    sources: &Sources,
    raws: Vec<(usize, RawFile)>,
    role: Role,
) -> Result<(Config, Vec<Material>), Vec<ConfigError>> {
    let mut v = Checker {
        sources,
        errors: Vec::new(),
        listening: Vec::new(),
        material: Vec::new(),
        workload: None,
        workload_declared: false,
        http2_services: HashSet::new(),
        proxied_services: HashSet::new(),
    };
    let config = v.config(raws, role);
    if v.errors.is_empty() {
        Ok((config, v.material))
    } else {
        Err(v.errors)
    }
}

struct Checker<'a> {
    sources: &'a Sources,
    errors: Vec<ConfigError>,
    /// Addresses listened on so far: where each was set (`None` for a default) and whose.
    listening: Vec<(Option<At>, String, SocketAddr)>,
    /// The PEM files read, with their contents, for the revision.
    material: Vec<Material>,
    /// The sidecar's `[workload]`, for services with `tls.mode = "mesh"`.
    workload: Option<Workload>,
    /// Whether `[workload]` is there at all (a broken one is reported once, by itself).
    workload_declared: bool,
    /// Services with `protocol = "http2"`, which a mirror cannot copy to.
    http2_services: HashSet<String>,
    /// Services with `proxy_protocol`, which only `tcp` and `tls` routes can send to.
    proxied_services: HashSet<String>,
}

/// Where a value sits: file number, key path, readable path.
#[derive(Clone)]
struct At {
    file: usize,
    key: Vec<Seg>,
    label: String,
}

impl At {
    /// The last key's name: what a message about the value there calls it.
    fn name(&self) -> &str {
        let last = self.key.iter().rev().find_map(|s| match s {
            Seg::Key(k) => Some(k.as_str()),
            Seg::Index(_) => None,
        });
        last.unwrap_or("")
    }

    fn key(&self, seg: impl Into<Seg>) -> At {
        let mut key = self.key.clone();
        key.push(seg.into());
        At {
            file: self.file,
            key,
            label: self.label.clone(),
        }
    }

    /// A table that also shows in the readable path: `retry`.
    fn table(&self, name: &str) -> At {
        let mut at = self.key(name);
        at.label = format!("{} {name}", self.label);
        at
    }

    /// A step that also shows in the readable path: `backend[1]`.
    fn item(&self, name: &str, index: usize) -> At {
        let mut at = self.key(name).key(index);
        at.label = format!("{} {name}[{index}]", self.label);
        at
    }
}

impl Checker<'_> {
    fn fail(&mut self, at: &At, message: impl Into<String>) {
        let e = self
            .sources
            .error(at.file, &at.key, at.label.clone(), message.into());
        self.errors.push(e);
    }

    fn config(&mut self, raws: Vec<(usize, RawFile)>, role: Role) -> Config {
        let mut runtime = None;
        let mut admin = None;
        let mut telemetry = None;
        let mut workload = None;
        let mut inbound = None;
        let mut outbound = None;
        let mut listeners = Vec::new();
        let mut routes = Vec::new();
        let mut services = Vec::new();

        for (file, raw) in raws {
            let top = |name: &str| At {
                file,
                key: keys![name],
                label: format!("[{name}]"),
            };
            self.single(&mut runtime, raw.runtime, top("runtime"));
            self.single(&mut admin, raw.admin, top("admin"));
            self.single(&mut telemetry, raw.telemetry, top("telemetry"));
            self.single(&mut workload, raw.workload, top("workload"));
            self.single(&mut inbound, raw.inbound, top("inbound"));
            self.single(&mut outbound, raw.outbound, top("outbound"));
            let each = |name: &str, i: usize| At {
                file,
                key: keys![name, i],
                label: String::new(),
            };
            listeners.extend(
                raw.listener
                    .into_iter()
                    .enumerate()
                    .map(|(i, l)| (each("listener", i), l)),
            );
            routes.extend(
                raw.route
                    .into_iter()
                    .enumerate()
                    .map(|(i, r)| (each("route", i), r)),
            );
            services.extend(
                raw.service
                    .into_iter()
                    .enumerate()
                    .map(|(i, s)| (each("service", i), s)),
            );
        }

        // Before the sidecar's ports, which must not reach it.
        let admin = Admin {
            listen: self.listen_or(
                admin.and_then(|(at, a)| Some(at.key("listen")).zip(a.listen)),
                "[admin]",
                default_admin(),
            ),
        };
        // First: services with mode = "mesh" use it.
        self.workload_declared = workload.is_some();
        let workload = workload.and_then(|(at, w)| self.workload(&at, w, role));
        self.workload.clone_from(&workload);
        // Every listener declared, valid or not: a route naming one with errors of its own is
        // not also told of an "unknown listener".
        let declared_listeners: HashSet<String> = (listeners.iter())
            .filter_map(|(_, l)| l.name.clone())
            .collect();
        let (listeners, sidecar) = match role {
            Role::Gateway => {
                let places = [
                    inbound.as_ref().map(|(at, _)| at),
                    outbound.as_ref().map(|(at, _)| at),
                ];
                for at in places.into_iter().flatten() {
                    self.fail(
                        at,
                        format!(
                            "{} is a weir-sidecar section; weir-gateway does not accept it",
                            at.label
                        ),
                    );
                }
                let listeners = self.named("listener", listeners, |v, at, l| v.listener(at, l));
                (listeners, None)
            }
            Role::Sidecar => {
                for (at, _) in &listeners {
                    self.fail(
                        at,
                        "[[listener]] is weir-gateway's; weir-sidecar listens on [inbound] and \
                         [outbound]",
                    );
                }
                let (sidecar, at) = self.sidecar(inbound, outbound);
                self.app_route(at, &sidecar, &mut routes, &mut services);
                (
                    sidecar_listeners(&sidecar, workload.as_ref()),
                    Some(sidecar),
                )
            }
        };
        // Every service declared, valid or not: a route to one with errors of its own (or
        // whose [workload] is broken) is not also an "unknown service".
        let declared: HashSet<String> = (services.iter())
            .filter_map(|(_, s)| s.name.clone())
            .collect();
        let services = self.named("service", services, |v, at, s| v.service(at, s));
        let listener_names: HashSet<&str> = (listeners.iter().map(|l| l.name.as_str()))
            .chain(declared_listeners.iter().map(String::as_str))
            .collect();
        let service_names: HashSet<&str> = declared.iter().map(String::as_str).collect();
        let streams = Streams {
            listeners: (listeners.iter())
                .filter(|l| l.protocol.is_stream())
                .map(|l| (l.name.as_str(), l.protocol))
                .collect(),
            tls_services: (services.iter())
                .filter_map(|s| Some((s.name.as_str(), s.tls.as_ref()?.mode)))
                .collect(),
        };
        let mut destinations = HashMap::new();
        let routes = self.named("route", routes, |v, at, r| {
            // The sidecar's own route alone takes the inbound listener.
            let inbound = sidecar.is_some() && r.name() != Some(INBOUND);
            let mut listeners = listener_names.clone();
            if inbound {
                listeners.remove(INBOUND);
            }
            if r.destinations.is_some() {
                v.destination_route(at, &r, sidecar.is_some());
            } else if r
                .listeners
                .iter()
                .flatten()
                .any(|l| streams.listeners.contains_key(l.as_str()))
            {
                v.stream_route(at, &r, &streams);
            } else {
                v.no_proxy_header(at, &r);
            }
            let route = v.route(at, r, &listeners, &service_names)?;
            for (i, d) in route.destinations.iter().enumerate() {
                match destinations.insert(*d, route.name.clone()) {
                    Some(other) => v.fail(
                        &at.item("destinations", i),
                        format!("destination {d} is route {other:?}'s too; each has one route"),
                    ),
                    None => continue,
                }
            }
            Some(route)
        });

        let runtime = runtime.map(|(at, r)| self.runtime(&at, r));
        let telemetry = telemetry.map(|(at, t)| self.telemetry(&at, t, role));
        Config {
            runtime: runtime.unwrap_or(Runtime {
                threads: 0,
                grace_period: Duration::from_secs(10),
                nameservers: Vec::new(),
            }),
            admin,
            telemetry: telemetry.unwrap_or(Telemetry {
                access_log: AccessLog::Stdout,
                tracing: None,
            }),
            listeners,
            routes,
            services,
            workload,
            sidecar,
        }
    }

    /// A section such as `[runtime]` may appear in one file only.
    fn single<T>(&mut self, slot: &mut Option<(At, T)>, value: Option<T>, at: At) {
        let Some(value) = value else { return };
        if let Some((first, _)) = slot {
            let first = self.sources.place(first.file, &first.key);
            self.fail(&at, format!("defined twice, first at {first}"));
            return;
        }
        *slot = Some((at, value));
    }

    /// Validates named items, reporting missing and duplicate names.
    fn named<R, T>(
        &mut self,
        kind: &str,
        items: Vec<(At, R)>,
        mut check: impl FnMut(&mut Self, &At, R) -> Option<T>,
    ) -> Vec<T>
    where
        R: HasName,
    {
        let mut seen: HashMap<String, At> = HashMap::new();
        let mut out = Vec::new();
        for (mut at, raw) in items {
            let Some(name) = raw.name().map(str::to_string) else {
                at.label = format!("{kind}[{}]", self.sources.place(at.file, &at.key));
                self.fail(&at, "missing required key \"name\"");
                continue;
            };
            at.label = format!("{kind} {name:?}");
            if name.is_empty() {
                self.fail(&at.key("name"), "name must not be empty");
                continue;
            }
            if let Some(first) = seen.get(&name) {
                let first = self.sources.place(first.file, &first.key);
                let here = self.sources.place(at.file, &at.key);
                self.fail(
                    &at.key("name"),
                    format!("duplicate name, defined at {first} and {here}"),
                );
                continue;
            }
            seen.insert(name, at.clone());
            if let Some(item) = check(self, &at, raw) {
                out.push(item);
            }
        }
        out
    }

    fn runtime(&mut self, at: &At, r: RawRuntime) -> Runtime {
        let grace_period = r
            .grace_period
            .map(|d| self.duration(&at.key("grace_period"), &d))
            .unwrap_or(Some(Duration::from_secs(10)))
            .unwrap_or_default();
        let nameservers = r
            .nameservers
            .unwrap_or_default()
            .iter()
            .enumerate()
            .filter_map(|(i, n)| self.addr(&at.item("nameservers", i), n))
            .collect();
        let threads = r.threads.unwrap_or(0);
        if threads > MAX_THREADS {
            let at = at.key("threads");
            self.fail(&at, format!("{threads} threads: at most {MAX_THREADS}"));
        }
        Runtime {
            threads: threads.min(MAX_THREADS),
            grace_period,
            nameservers,
        }
    }

    fn telemetry(&mut self, at: &At, t: RawTelemetry, role: Role) -> Telemetry {
        let access_log = match t.access_log.as_deref() {
            None | Some("stdout") => AccessLog::Stdout,
            Some("off") => AccessLog::Off,
            Some("") => {
                let at = at.key("access_log");
                self.fail(&at, "empty: \"stdout\", \"off\" or a file's path");
                AccessLog::Off
            }
            Some(path) => {
                // Opened at start, from the working directory (a Git checkout is temporary):
                // `validate` says now what the start would.
                let file = PathBuf::from(path);
                let dir = file.parent().filter(|d| !d.as_os_str().is_empty());
                let why = if file.is_dir() {
                    Some("is a directory")
                } else if dir.is_some_and(|d| !d.is_dir()) {
                    Some("its directory does not exist")
                } else if ["stdout", "stderr", "off"]
                    .iter()
                    .any(|s| path.eq_ignore_ascii_case(s))
                {
                    // Only "stdout" itself is the stream; a file named like one is a slip.
                    Some("would be a file of that name: write \"stdout\", \"off\", \"/dev/stderr\", or \"./stderr\" for such a file")
                } else {
                    None
                };
                if let Some(why) = why {
                    self.fail(&at.key("access_log"), format!("access_log {path:?}: {why}"));
                }
                AccessLog::File(file)
            }
        };
        let at = At {
            label: "[telemetry.tracing]".to_string(),
            ..at.key("tracing")
        };
        let tracing = t.tracing.map(|r| self.tracing(&at, r, role));
        Telemetry {
            access_log,
            tracing,
        }
    }

    fn tracing(&mut self, at: &At, mut t: RawTracing, role: Role) -> Tracing {
        let endpoint =
            (t.otlp_endpoint.clone()).unwrap_or_else(|| "http://127.0.0.1:4318".to_string());
        // http[s]://host:port[/path]
        let (scheme, rest) = match endpoint.split_once("://") {
            Some((scheme @ ("http" | "https"), rest)) => (scheme, rest),
            _ => ("http", ""),
        };
        let (authority, path) = rest.split_at(rest.find('/').unwrap_or(rest.len()));
        let port = (authority.rsplit_once(':'))
            .filter(|(host, _)| !host.is_empty())
            .and_then(|(_, port)| port.parse::<u16>().ok());
        let tls = t.tls.take();
        if let Some((_, host)) = authority.rsplit_once('@') {
            // Said without them: this message goes to logs.
            let e = format!(
                "otlp_endpoint \"{scheme}://***@{host}{path}\": credentials in the URL are not \
                 sent; give them in OTEL_EXPORTER_OTLP_HEADERS (telemetry.md)"
            );
            self.fail(&at.key("otlp_endpoint"), e);
            return self.tracing_settings(at, t, String::new(), OtlpProtocol::HttpProtobuf, role);
        }
        let Some(port) = port else {
            self.fail(
                &at.key("otlp_endpoint"),
                format!("otlp_endpoint {endpoint:?} is not http://host:port or https://host:port"),
            );
            return self.tracing_settings(at, t, endpoint, OtlpProtocol::HttpProtobuf, role);
        };
        let protocol = match t.protocol.as_deref() {
            None if port == 4317 => OtlpProtocol::Grpc,
            None | Some("http/protobuf") => OtlpProtocol::HttpProtobuf,
            Some("grpc") => OtlpProtocol::Grpc,
            Some(other) => {
                self.fail(
                    &at.key("protocol"),
                    format!(
                        "unknown OTLP protocol {other:?}: expected \"http/protobuf\" or \"grpc\""
                    ),
                );
                OtlpProtocol::HttpProtobuf
            }
        };
        let otlp_endpoint = match (protocol, path) {
            (OtlpProtocol::HttpProtobuf, "" | "/") => format!("{scheme}://{authority}/v1/traces"),
            _ => endpoint.clone(),
        };
        let mut tracing = self.tracing_settings(at, t, otlp_endpoint, protocol, role);
        let at = At {
            label: "[telemetry.tracing.tls]".to_string(),
            ..at.key("tls")
        };
        tracing.tls = match (scheme, tls) {
            ("https", tls) => self.collector_tls(&at, tls.unwrap_or_default()),
            (_, Some(_)) => {
                self.fail(&at, "tls is for an https:// otlp_endpoint");
                None
            }
            (_, None) => None,
        };
        tracing
    }

    /// `[telemetry.tracing.tls]`: the CA to trust (default: the system's), and a client
    /// certificate for a collector that asks for one.
    fn collector_tls(&mut self, at: &At, t: RawCollectorTls) -> Option<CollectorTls> {
        let ca = t.ca.and_then(|path| self.ca_bundle(&at.key("ca"), &path));
        let client = match (t.cert, t.key) {
            (None, None) => None,
            (cert, key) => Some(self.client_pair(at, cert, key)?),
        };
        let (ca, roots) = ca.map_or((None, Vec::new()), |(ca, roots)| (Some(ca), roots));
        let (cert, key, client) = match client {
            Some((cert, key, pair)) => (Some(cert), Some(key), Some(pair)),
            None => (None, None, None),
        };
        Some(CollectorTls {
            ca,
            cert,
            key,
            roots,
            client,
        })
    }

    /// The rest of `[telemetry.tracing]`, once the endpoint is read.
    fn tracing_settings(
        &mut self,
        at: &At,
        t: RawTracing,
        otlp_endpoint: String,
        protocol: OtlpProtocol,
        role: Role,
    ) -> Tracing {
        let sample_ratio = t.sample_ratio.unwrap_or(1.0);
        if !(0.0..=1.0).contains(&sample_ratio) {
            self.fail(
                &at.key("sample_ratio"),
                format!("sample_ratio {sample_ratio} is not between 0.0 and 1.0"),
            );
        }
        if t.service_name.as_deref() == Some("") {
            self.fail(&at.key("service_name"), "service_name must not be empty");
        }
        let service_name = t.service_name.unwrap_or_else(|| {
            match role {
                Role::Gateway => "weir-gateway",
                Role::Sidecar => "weir-sidecar",
            }
            .to_string()
        });
        Tracing {
            otlp_endpoint,
            protocol,
            sample_ratio,
            service_name,
            tls: None,
        }
    }

    fn listener(&mut self, at: &At, l: RawListener) -> Option<Listener> {
        let listen = match l.listen {
            Some(s) => self.listen(&at.key("listen"), &s),
            None => {
                self.fail(at, "missing required key \"listen\"");
                None
            }
        };
        let protocol = match l.protocol.as_deref() {
            None | Some("http") => Some(Protocol::Http),
            Some("https") => Some(Protocol::Https),
            Some("tcp") => Some(Protocol::Tcp),
            Some("tls") => Some(Protocol::Tls),
            Some(other) => {
                self.fail(
                    &at.key("protocol"),
                    format!("protocol {other:?}: expected \"http\", \"https\", \"tcp\" or \"tls\""),
                );
                None
            }
        };
        let tls = match protocol {
            Some(Protocol::Https) => Some(self.listener_tls(at, l.certificate, l.client_auth)?),
            _ => {
                if !l.certificate.is_empty() {
                    self.fail(
                        &at.key("certificate"),
                        "certificates need protocol = \"https\"",
                    );
                }
                if l.client_auth.is_some() {
                    self.fail(
                        &at.key("client_auth"),
                        "client_auth needs protocol = \"https\"",
                    );
                }
                None
            }
        };
        let idle_timeout = self.positive(
            at,
            "idle_timeout",
            l.idle_timeout,
            match protocol {
                Some(p) if p.is_stream() => Listener::DEFAULT_STREAM_IDLE_TIMEOUT,
                _ => Listener::DEFAULT_IDLE_TIMEOUT,
            },
        );
        let max_connections = self.count(at, "max_connections", l.max_connections, 1);
        Some(Listener {
            name: l.name?,
            listen: listen?,
            protocol: protocol?,
            tls,
            idle_timeout,
            max_connections,
            proxy_protocol: l.proxy_protocol.unwrap_or(false),
        })
    }

    fn listener_tls(
        &mut self,
        at: &At,
        certificates: Vec<RawCertificate>,
        client_auth: Option<RawClientAuth>,
    ) -> Option<ListenerTls> {
        if certificates.is_empty() {
            self.fail(
                at,
                "protocol \"https\" needs at least one [[listener.certificate]] with cert and key",
            );
            return None;
        }
        let before = self.errors.len();
        let mut claimed = HashSet::new();
        let certificates: Vec<_> = certificates
            .into_iter()
            .enumerate()
            .filter_map(|(i, c)| {
                let at = at.item("certificate", i);
                let certificate = self.certificate(&at, c)?;
                // A host two certificates claim would go to the first alone (Envoy refuses
                // such filter chains; nginx warns of a conflicting server name); so would a
                // second certificate without hosts (for any name).
                let mine: HashSet<&String> = certificate.hosts.iter().collect();
                if mine.len() < certificate.hosts.len() {
                    self.fail(&at.key("hosts"), "a host is named twice");
                }
                let any = String::new();
                let hosts = match certificate.hosts.is_empty() {
                    true => vec![&any],
                    false => mine.into_iter().collect(),
                };
                for host in hosts {
                    if !claimed.insert(host.clone()) {
                        let e = match host.is_empty() {
                            true => "another certificate has no hosts (it takes any name)".into(),
                            false => format!("host {host:?} is already another certificate's"),
                        };
                        self.fail(&at.key("hosts"), e);
                    }
                }
                Some(certificate)
            })
            .collect();
        let client_auth = client_auth.and_then(|c| {
            let at = at.key("client_auth");
            let (ca, pem) = self.required_pem(&at, "ca", c.ca)?;
            let verifier = weir_tls::roots(&pem).and_then(weir_tls::client_verifier);
            match verifier {
                Ok(verifier) => Some(ClientAuth {
                    ca,
                    verifier,
                    trust: trust(&pem),
                }),
                Err(e) => {
                    self.fail(&at.key("ca"), format!("{}: {e}", ca.display()));
                    None
                }
            }
        });
        (self.errors.len() == before).then_some(ListenerTls {
            certificates,
            client_auth,
            also_plaintext: false,
        })
    }

    fn certificate(&mut self, at: &At, c: RawCertificate) -> Option<ServerCertificate> {
        let hosts: Vec<String> = c
            .hosts
            .unwrap_or_default()
            .iter()
            .enumerate()
            .filter_map(|(i, h)| {
                self.host(&at.item("hosts", i), h)?;
                Some(h.to_ascii_lowercase())
            })
            .collect();
        let cert = self.required_pem(at, "cert", c.cert);
        let key = self.required_pem(at, "key", c.key);
        let ((cert, cert_pem), (key, key_pem)) = (cert?, key?);
        match weir_tls::key_pair(&cert_pem, &key_pem) {
            Ok(pair) => Some(ServerCertificate {
                hosts,
                not_after: timestamp(pair.not_after),
                cert,
                key,
                pair,
            }),
            Err(e) => {
                self.fail(
                    &at.key("cert"),
                    format!("{} with {}: {e}", cert.display(), key.display()),
                );
                None
            }
        }
    }

    /// A required key naming a PEM file: its path and contents.
    fn required_pem(
        &mut self,
        at: &At,
        key: &str,
        path: Option<String>,
    ) -> Option<(PathBuf, Vec<u8>)> {
        match path {
            Some(path) => self.pem(&at.key(key), &path),
            None => {
                self.fail(at, format!("missing required key {key:?}"));
                None
            }
        }
    }

    /// Reads the PEM file at `path`, relative to the directory of the file that names it, and
    /// keeps its contents for the revision: a rotated certificate is a changed config.
    fn pem(&mut self, at: &At, path: &str) -> Option<(PathBuf, Vec<u8>)> {
        if path.is_empty() {
            self.fail(at, "empty: expected a PEM file's path");
            return None;
        }
        let declared_in = self.sources.files.get(at.file).map(|f| f.path.as_path());
        let dir = declared_in
            .and_then(|f| f.parent())
            .unwrap_or(std::path::Path::new(""));
        let full = dir.join(path);
        // Only a regular file, and not a huge one: a device or a FIFO would never end.
        let read = std::fs::metadata(&full).and_then(|m| match m.is_file() {
            true if m.len() <= MAX_PEM_BYTES => std::fs::read(&full),
            true => Err(std::io::Error::other("larger than 1 MiB")),
            false => Err(std::io::Error::other("not a regular file")),
        });
        match read {
            Ok(bytes) => {
                self.material.push((full.clone(), bytes.clone()));
                Some((full, bytes))
            }
            Err(e) => {
                self.fail(at, format!("cannot read {}: {e}", full.display()));
                None
            }
        }
    }

    /// A PEM bundle of CA certificates: its path and the certificates in DER.
    fn ca_bundle(&mut self, at: &At, path: &str) -> Option<(PathBuf, Vec<Vec<u8>>)> {
        let (ca, pem) = self.pem(at, path)?;
        match weir_tls::certificates(&pem) {
            Ok(certs) => Some((ca, certs.iter().map(|c| c.to_vec()).collect())),
            Err(e) => {
                self.fail(at, format!("{}: {e}", ca.display()));
                None
            }
        }
    }

    /// The `cert` and `key` a client presents, both required and checked to belong together.
    fn client_pair(
        &mut self,
        at: &At,
        cert: Option<String>,
        key: Option<String>,
    ) -> Option<(PathBuf, PathBuf, weir_tls::KeyPair)> {
        let cert = self.required_pem(at, "cert", cert);
        let key = self.required_pem(at, "key", key);
        let ((cert, cert_pem), (key, key_pem)) = (cert?, key?);
        match weir_tls::key_pair(&cert_pem, &key_pem) {
            Ok(pair) => Some((cert, key, pair)),
            Err(e) => {
                let place = format!("{} with {}", cert.display(), key.display());
                self.fail(&at.key("cert"), format!("{place}: {e}"));
                None
            }
        }
    }

    fn upstream_tls(
        &mut self,
        at: &At,
        t: RawUpstreamTls,
        service: &str,
        dns: Option<&Dns>,
    ) -> Option<UpstreamTls> {
        let mode = match t.mode.as_deref() {
            None | Some("simple") => TlsMode::Simple,
            Some("mutual") => TlsMode::Mutual,
            Some("mesh") => return self.mesh_tls(at, t, service),
            Some(other) => {
                self.fail(
                    &at.key("mode"),
                    format!("mode {other:?}: expected \"simple\", \"mutual\" or \"mesh\""),
                );
                return None;
            }
        };
        if t.identities.is_some() {
            self.fail(
                &at.key("identities"),
                "identities are for mode \"mesh\" only",
            );
        }
        let before = self.errors.len();
        let sni = match (t.sni, dns) {
            (Some(sni), _) => {
                self.sni(&at.key("sni"), &sni);
                sni.to_ascii_lowercase()
            }
            // SNI is the name without its root dot (RFC 6066 §3).
            (None, Some(dns)) => dns.name.trim_end_matches('.').to_string(),
            (None, None) => {
                self.fail(
                    at,
                    "missing required key \"sni\": the endpoints are addresses, so there is no \
                     name to send and to verify the server's certificate against",
                );
                String::new()
            }
        };
        let mut fingerprint = std::collections::hash_map::DefaultHasher::new();
        let ca = t.ca.and_then(|path| self.ca_bundle(&at.key("ca"), &path));
        ca.as_ref().map(|(_, roots)| roots).hash(&mut fingerprint);
        let client = match mode {
            TlsMode::Simple => {
                for (key, given) in [("cert", &t.cert), ("key", &t.key)] {
                    if given.is_some() {
                        self.fail(&at.key(key), format!("{key} is for mode \"mutual\" only"));
                    }
                }
                None
            }
            TlsMode::Mutual | TlsMode::Mesh => {
                let client = self.client_pair(at, t.cert, t.key)?;
                (&client.2.chain, &client.2.key).hash(&mut fingerprint);
                Some(client)
            }
        };
        if self.errors.len() > before {
            return None;
        }
        let (ca, roots) = ca.map_or((None, Vec::new()), |(ca, roots)| (Some(ca), roots));
        let (cert, key, client) = match client {
            Some((cert, key, pair)) => (Some(cert), Some(key), Some(pair)),
            None => (None, None, None),
        };
        Some(UpstreamTls {
            mode,
            ca,
            cert,
            key,
            sni,
            identities: Vec::new(),
            trust_domains: Vec::new(),
            roots,
            client,
            fingerprint: fingerprint.finish(),
        })
    }

    /// `mode = "mesh"`: the sidecar's workload certificate and trust bundle; the server is
    /// accepted by its SPIFFE id, so the SNI (default: the service's name) is only sent.
    fn mesh_tls(&mut self, at: &At, t: RawUpstreamTls, service: &str) -> Option<UpstreamTls> {
        let before = self.errors.len();
        for (key, given) in [("ca", &t.ca), ("cert", &t.cert), ("key", &t.key)] {
            if given.is_some() {
                let e = format!(
                    "mode \"mesh\" uses [workload]'s certificate and trust bundle; leave out {key}"
                );
                self.fail(&at.key(key), e);
            }
        }
        self.not_empty(at, "identities", t.identities.as_ref(), "any mesh identity");
        let identities = t.identities.unwrap_or_default();
        for (i, id) in identities.iter().enumerate() {
            if !spiffe_id_ok(id) {
                let e = format!("identity {id:?}: expected a spiffe:// id{SPIFFE_ID}");
                self.fail(&at.item("identities", i), e);
            }
        }
        let sni = t.sni.unwrap_or_else(|| service.to_ascii_lowercase());
        if !self.sni(&at.key("sni"), &sni) {
            return None;
        }
        let Some(workload) = self.workload.clone() else {
            if self.workload_declared {
                return None; // reported at [workload]
            }
            self.fail(
                &at.key("mode"),
                "mode \"mesh\" needs [workload], the certificate this proxy presents in the mesh",
            );
            return None;
        };
        let mut fingerprint = std::collections::hash_map::DefaultHasher::new();
        (workload.fingerprint, &identities).hash(&mut fingerprint);
        (self.errors.len() == before).then(|| UpstreamTls {
            mode: TlsMode::Mesh,
            ca: Some(workload.trust_bundle),
            cert: Some(workload.cert),
            key: Some(workload.key),
            sni,
            identities,
            trust_domains: workload.trust_domains,
            roots: workload.roots,
            client: Some(workload.pair),
            fingerprint: fingerprint.finish(),
        })
    }

    fn service(&mut self, at: &At, s: RawService) -> Option<Service> {
        let dns = match (&s.endpoints, s.dns) {
            (None, None) => {
                self.fail(
                    at,
                    "needs endpoints = [\"ip:port\", ...] or dns = \"name:port\"",
                );
                return None;
            }
            (Some(_), Some(_)) => {
                self.fail(at, "has both endpoints and dns; choose one");
                return None;
            }
            (None, Some(dns)) => Some(self.dns(&at.key("dns"), &dns)?),
            (Some(_), None) => None,
        };
        let raw = s.endpoints.unwrap_or_default();
        if raw.is_empty() && dns.is_none() {
            self.fail(&at.key("endpoints"), "needs at least one endpoint");
        }
        let endpoints: Vec<_> = raw
            .iter()
            .enumerate()
            .filter_map(|(i, e)| self.addr(&at.item("endpoints", i), e))
            .collect();
        let load_balancer = self.load_balancer(at, s.load_balancer.as_deref(), s.hash_on);
        let protocol = match s.protocol.as_deref() {
            None | Some("http1") => UpstreamProtocol::Http1,
            Some("http2") => {
                self.http2_services
                    .insert(s.name.clone().unwrap_or_default());
                UpstreamProtocol::Http2
            }
            Some(other) => {
                let e = format!("protocol {other:?}: expected \"http1\" or \"http2\"");
                self.fail(&at.key("protocol"), e);
                UpstreamProtocol::Http1
            }
        };
        let connection_pool = s
            .connection_pool
            .map(|p| self.connection_pool(&at.key("connection_pool"), p))
            .unwrap_or_default();
        let outlier_detection = s
            .outlier_detection
            .map(|o| self.outlier_detection(&at.key("outlier_detection"), o));
        let health_check = s
            .health_check
            .and_then(|h| self.health_check(&at.key("health_check"), h));
        let tls = match s.tls {
            Some(t) => {
                let name = s.name.as_deref().unwrap_or_default();
                Some(self.upstream_tls(&at.key("tls"), t, name, dns.as_ref())?)
            }
            None => None,
        };
        let proxy_protocol = match s.proxy_protocol.as_deref() {
            None => None,
            Some("v1") => Some(ProxyVersion::V1),
            Some("v2") => Some(ProxyVersion::V2),
            Some(other) => {
                let e = format!("proxy_protocol {other:?}: expected \"v1\" or \"v2\"");
                self.fail(&at.key("proxy_protocol"), e);
                None
            }
        };
        if proxy_protocol.is_some() {
            let name = s.name.clone().unwrap_or_default();
            self.proxied_services.insert(name);
            if health_check.is_some() {
                let e = "health checks are sent without a PROXY header, which this service expects";
                self.fail(&at.key("health_check"), e);
            }
        }
        let load_balancer = load_balancer?;
        (endpoints.len() == raw.len() && (!raw.is_empty() || dns.is_some())).then(|| Service {
            name: s.name.unwrap_or_default(),
            endpoints,
            dns,
            load_balancer,
            protocol,
            connection_pool,
            outlier_detection,
            health_check,
            tls,
            proxy_protocol,
        })
    }

    fn dns(&mut self, at: &At, text: &str) -> Option<Dns> {
        let parsed = text
            .rsplit_once(':')
            .and_then(|(name, port)| Some((name, port.parse::<u16>().ok()?)));
        match parsed {
            // A root dot (`name.svc.cluster.local.`) asks the resolver for that name alone,
            // without the search domains: Kubernetes users write it to save lookups.
            Some((name, port))
                if port > 0
                    && self
                        .host(at, name.strip_suffix('.').unwrap_or(name))
                        .is_some() =>
            {
                Some(Dns {
                    name: name.to_ascii_lowercase(),
                    port,
                })
            }
            _ => {
                self.fail(
                    at,
                    format!("bad dns {text:?}: expected name:port, such as \"reviews.default.svc.cluster.local:9080\""),
                );
                None
            }
        }
    }

    /// A duration key that must be more than 0, else `default`.
    /// An optional count that, given, must be at least `min`; `None` when absent or wrong.
    fn count(&mut self, at: &At, key: &str, value: Option<u64>, min: u64) -> Option<usize> {
        match value {
            Some(n) if n < min => {
                self.fail(&at.key(key), format!("{key} must be at least {min}"));
                None
            }
            n => n.map(|n| usize::try_from(n).unwrap_or(usize::MAX)),
        }
    }

    fn positive(
        &mut self,
        at: &At,
        key: &str,
        text: Option<String>,
        default: Duration,
    ) -> Duration {
        let Some(d) = text.and_then(|t| self.duration(&at.key(key), &t)) else {
            return default;
        };
        if d.is_zero() {
            self.fail(&at.key(key), format!("{key} must be more than 0"));
        }
        d
    }

    fn outlier_detection(&mut self, at: &At, o: RawOutlierDetection) -> OutlierDetection {
        let d = OutlierDetection::default();
        let max_ejection_percent = o.max_ejection_percent.unwrap_or(d.max_ejection_percent);
        if max_ejection_percent > 100 {
            self.fail(
                &at.key("max_ejection_percent"),
                format!("max_ejection_percent {max_ejection_percent} is over 100"),
            );
        }
        let out = OutlierDetection {
            consecutive_5xx: o.consecutive_5xx.unwrap_or(d.consecutive_5xx),
            consecutive_gateway_errors: o
                .consecutive_gateway_errors
                .unwrap_or(d.consecutive_gateway_errors),
            interval: self.positive(at, "interval", o.interval, d.interval),
            base_ejection_time: self.positive(
                at,
                "base_ejection_time",
                o.base_ejection_time,
                d.base_ejection_time,
            ),
            max_ejection_time: self.positive(
                at,
                "max_ejection_time",
                o.max_ejection_time,
                d.max_ejection_time,
            ),
            max_ejection_percent,
        };
        if out.max_ejection_time < out.base_ejection_time {
            self.fail(
                &at.key("max_ejection_time"),
                "max_ejection_time is shorter than base_ejection_time",
            );
        }
        out
    }

    fn health_check(&mut self, at: &At, h: RawHealthCheck) -> Option<HealthCheck> {
        let Some(path) = h.path else {
            self.fail(
                at,
                "missing required key \"path\", e.g. path = \"/healthz\"",
            );
            return None;
        };
        self.uri_path(&at.key("path"), &path);
        let threshold = |v: &mut Self, key: &str, value: Option<u32>, default: u32| {
            let n = value.unwrap_or(default);
            if n == 0 {
                v.fail(&at.key(key), format!("{key} must be at least 1"));
            }
            n
        };
        let healthy_threshold = threshold(self, "healthy_threshold", h.healthy_threshold, 2);
        let unhealthy_threshold = threshold(self, "unhealthy_threshold", h.unhealthy_threshold, 3);
        let interval = self.positive(at, "interval", h.interval, Duration::from_secs(5));
        // Each interval probes every endpoint: a typo ("1ms" for "1s") would flood them.
        if interval < HEALTH_CHECK_MIN_INTERVAL {
            self.fail(
                &at.key("interval"),
                format!(
                    "health_check interval {interval:?}: at least 100ms, each probing every endpoint"
                ),
            );
        }
        Some(HealthCheck {
            path,
            interval,
            timeout: self.positive(at, "timeout", h.timeout, Duration::from_secs(1)),
            healthy_threshold,
            unhealthy_threshold,
        })
    }

    fn connection_pool(&mut self, at: &At, p: RawConnectionPool) -> ConnectionPool {
        let d = ConnectionPool::default();
        let mut limit = |key: &str, value: Option<u64>, default: usize, min: u64| {
            self.count(at, key, value, min).unwrap_or(default)
        };
        let max_connections = limit("max_connections", p.max_connections, d.max_connections, 1);
        let max_pending_requests = limit(
            "max_pending_requests",
            p.max_pending_requests,
            d.max_pending_requests,
            0,
        );
        let max_requests = limit("max_requests", p.max_requests, d.max_requests, 1);
        ConnectionPool {
            max_connections,
            max_pending_requests,
            max_requests,
            connect_timeout: self.positive(
                at,
                "connect_timeout",
                p.connect_timeout,
                d.connect_timeout,
            ),
            idle_timeout: self.positive(at, "idle_timeout", p.idle_timeout, d.idle_timeout),
        }
    }

    fn load_balancer(
        &mut self,
        at: &At,
        kind: Option<&str>,
        hash_on: Option<RawHashOn>,
    ) -> Option<LoadBalancer> {
        let here = at.key("load_balancer");
        let balancer = match kind {
            None | Some("round_robin") => LoadBalancer::RoundRobin,
            Some("random") => LoadBalancer::Random,
            Some("consistent_hash") => {
                let hash_on = match hash_on {
                    Some(RawHashOn::Name(name)) if name == "source_ip" => Some(HashOn::SourceIp),
                    Some(RawHashOn::Table(RawHashOnTable {
                        header: Some(h),
                        cookie: None,
                    })) => {
                        let lower = h.to_ascii_lowercase();
                        if !http_header_name_ok(&lower) {
                            self.fail(
                                &at.key("hash_on"),
                                format!("hash_on: bad header name {h:?}"),
                            );
                        }
                        Some(HashOn::Header(lower))
                    }
                    Some(RawHashOn::Table(RawHashOnTable {
                        header: None,
                        cookie: Some(c),
                    })) if !c.is_empty() => {
                        // A cookie's name is a token (RFC 6265 §4.1.1); no other is ever found.
                        if !http_header_name_ok(&c) {
                            self.fail(
                                &at.key("hash_on"),
                                format!("hash_on: bad cookie name {c:?}"),
                            );
                        }
                        Some(HashOn::Cookie(c))
                    }
                    None => {
                        self.fail(at, "consistent_hash needs hash_on");
                        None
                    }
                    Some(_) => {
                        self.fail(
                            &at.key("hash_on"),
                            "hash_on needs exactly one of { header = \"...\" }, { cookie = \"...\" } or \"source_ip\"",
                        );
                        None
                    }
                };
                return hash_on.map(LoadBalancer::ConsistentHash);
            }
            Some("least_request") => LoadBalancer::LeastRequest,
            Some(other) => {
                self.fail(&here, format!("load_balancer {other:?}: expected \"round_robin\", \"random\", \"least_request\" or \"consistent_hash\""));
                return None;
            }
        };
        if hash_on.is_some() {
            self.fail(
                &at.key("hash_on"),
                "hash_on applies only to load_balancer = \"consistent_hash\"",
            );
        }
        Some(balancer)
    }

    fn route(
        &mut self,
        at: &At,
        r: RawRoute,
        listeners: &HashSet<&str>,
        services: &HashSet<&str>,
    ) -> Option<Route> {
        let before = self.errors.len();
        self.not_empty(at, "listeners", r.listeners.as_ref(), "every listener");
        self.not_empty(at, "hosts", r.hosts.as_ref(), "any host");
        let route_listeners = r.listeners.unwrap_or_default();
        self.not_empty(at, "destinations", r.destinations.as_ref(), "no address");
        let destinations = (r.destinations.iter().flatten().enumerate())
            .filter_map(|(i, d)| match d.parse() {
                Ok(addr) => Some(addr),
                Err(_) => {
                    let e = format!(
                        "destination {d:?} is not an address and port, such as \"10.96.0.5:6379\""
                    );
                    self.fail(&at.item("destinations", i), e);
                    None
                }
            })
            .collect();
        for (i, name) in route_listeners.iter().enumerate() {
            if !listeners.contains(name.as_str()) {
                self.fail(
                    &at.item("listeners", i),
                    format!("unknown listener {name:?}"),
                );
            }
        }
        let hosts: Vec<_> = r
            .hosts
            .unwrap_or_default()
            .iter()
            .enumerate()
            .filter_map(|(i, h)| self.host(&at.item("hosts", i), h))
            .collect();
        let matches: Vec<_> = r
            .matches
            .into_iter()
            .enumerate()
            .filter_map(|(i, m)| self.matcher(&at.item("match", i), m))
            .collect();
        let chosen = [
            !r.backend.is_empty(),
            r.direct_response.is_some(),
            r.redirect.is_some(),
        ];
        let action = match chosen.iter().filter(|&&c| c).count() {
            0 => {
                self.fail(at, "needs [[route.backend]], direct_response or redirect");
                None
            }
            1 => match (r.direct_response, r.redirect) {
                (Some(d), _) => self.direct_response(&at.key("direct_response"), d),
                (_, Some(rd)) => self.redirect(&at.table("redirect"), rd),
                _ => self.backends(at, r.backend, services),
            },
            _ => {
                self.fail(at, "has more than one of [[route.backend]], direct_response and redirect; choose one");
                None
            }
        };
        let rewrite = r
            .rewrite
            .and_then(|rw| self.rewrite(&at.table("rewrite"), rw, &matches));
        if rewrite.is_some() && !matches!(action, Some(Action::Backends(_))) {
            self.fail(
                &at.key("rewrite"),
                "rewrite applies only to routes with [[route.backend]]",
            );
        }
        let fault = r.fault.and_then(|f| self.fault(&at.table("fault"), f));
        let mirror = r
            .mirror
            .and_then(|m| self.mirror(&at.table("mirror"), m, services));
        let timeout = r
            .timeout
            .map(|t| self.positive(at, "timeout", Some(t), Duration::ZERO));
        let retry_given = r.retry.is_some();
        let retry = r
            .retry
            .map(|rt| self.retry(&at.table("retry"), rt))
            .unwrap_or_default();
        // What concerns the request sent upstream; Weir itself answers the others.
        let upstream_only = [
            ("mirror", mirror.is_some()),
            ("timeout", timeout.is_some()),
            ("retry", retry_given),
            ("request_headers", r.request_headers.is_some()),
        ];
        for (key, given) in upstream_only {
            if given && action.is_some() && !matches!(action, Some(Action::Backends(_))) {
                self.fail(
                    &at.key(key),
                    format!("{key} applies only to routes with [[route.backend]]"),
                );
            }
        }
        let request_headers = self.header_ops(&at.key("request_headers"), r.request_headers, true);
        let sets_host = request_headers.set.iter().any(|(name, _)| name == "host");
        if sets_host && rewrite.as_ref().is_some_and(|rw| rw.host.is_some()) {
            self.fail(
                &at.key("request_headers"),
                "host is set here and by rewrite.host: set it in one place",
            );
        }
        let response_headers =
            self.header_ops(&at.key("response_headers"), r.response_headers, false);
        let origin = self.sources.place(at.file, &at.key);
        (self.errors.len() == before).then(|| Route {
            name: r.name.unwrap_or_default(),
            listeners: route_listeners,
            destinations,
            hosts,
            matches,
            action: action.expect("no error means an action"),
            rewrite,
            fault,
            mirror,
            timeout,
            retry,
            request_headers,
            response_headers,
            origin,
        })
    }

    /// A route on `tcp` or `tls` listeners forwards bytes: it takes backends, and (on `tls`)
    /// hosts to match the SNI, and none of the HTTP keys.
    fn stream_route(&mut self, at: &At, r: &RawRoute, streams: &Streams) {
        let named = r.listeners.iter().flatten();
        let mut protocols = named.clone().map(|l| streams.listeners.get(l.as_str()));
        if protocols.any(|p| p.is_none()) {
            self.fail(
                &at.key("listeners"),
                "a route on tcp or tls listeners cannot also take http or https ones",
            );
        }
        if r.hosts.is_some()
            && named
                .clone()
                .any(|l| streams.listeners.get(l.as_str()) == Some(&Protocol::Tcp))
        {
            self.fail(
                &at.key("hosts"),
                "hosts match the SNI of tls listeners; a tcp listener has no name to match",
            );
        }
        self.no_http_keys(at, r, "a route on tcp or tls listeners");
        // A tcp route may originate TLS; a tls route's bytes are TLS already.
        let on_tls =
            (named.clone()).any(|l| streams.listeners.get(l.as_str()) == Some(&Protocol::Tls));
        for (i, b) in r.backend.iter().enumerate() {
            let Some(name) = b.service.as_deref() else {
                continue;
            };
            let why = match streams.tls_services.get(name) {
                Some(_) if on_tls => {
                    "a route on a tls listener passes the client's TLS through as it is"
                }
                _ => continue,
            };
            let e = format!("service {name:?} has [service.tls]: {why}");
            self.fail(&at.item("backend", i), e);
        }
    }

    /// A route with `destinations` takes the sidecar's captured TCP connections to those
    /// addresses: backends only, on no listener of its own.
    fn destination_route(&mut self, at: &At, r: &RawRoute, sidecar: bool) {
        if !sidecar {
            self.fail(
                &at.key("destinations"),
                "destinations route the sidecar's captured TCP connections; a gateway routes \
                 TCP by listener (protocol = \"tcp\")",
            );
        }
        if r.listeners.is_some() {
            self.fail(
                &at.key("listeners"),
                "a route with destinations takes captured connections on the outbound \
                 listener; leave out listeners",
            );
        }
        if r.hosts.is_some() {
            self.fail(
                &at.key("hosts"),
                "a route with destinations matches a connection's original address; it has \
                 no name to match hosts against",
            );
        }
        self.no_http_keys(at, r, "a route with destinations");
    }

    /// `what` forwards bytes: none of the HTTP keys apply to it.
    fn no_http_keys(&mut self, at: &At, r: &RawRoute, what: &str) {
        let http_only = [
            ("match", !r.matches.is_empty()),
            ("direct_response", r.direct_response.is_some()),
            ("redirect", r.redirect.is_some()),
            ("rewrite", r.rewrite.is_some()),
            ("fault", r.fault.is_some()),
            ("mirror", r.mirror.is_some()),
            ("timeout", r.timeout.is_some()),
            ("retry", r.retry.is_some()),
            ("request_headers", r.request_headers.is_some()),
            ("response_headers", r.response_headers.is_some()),
        ];
        for (key, given) in http_only {
            if given {
                let e = format!("{key} applies to HTTP routes, not to {what}");
                self.fail(&at.key(key), e);
            }
        }
    }

    /// An HTTP route's services take no PROXY header: Pingora opens and pools their
    /// connections, and a pooled connection carries many clients' requests.
    fn no_proxy_header(&mut self, at: &At, r: &RawRoute) {
        let backends = r
            .backend
            .iter()
            .enumerate()
            .map(|(i, b)| (at.item("backend", i), b.service.as_deref()));
        let mirror = r
            .mirror
            .iter()
            .map(|m| (at.key("mirror"), m.service.as_deref()));
        for (at, service) in backends.chain(mirror) {
            if let Some(name) = service.filter(|s| self.proxied_services.contains(*s)) {
                let e = format!(
                    "service {name:?} has proxy_protocol, which only routes on tcp and tls listeners send"
                );
                self.fail(&at, e);
            }
        }
    }

    fn retry(&mut self, at: &At, r: RawRetry) -> Retry {
        let d = Retry::default();
        let on = match r.on {
            None => d.on,
            Some(list) => {
                let mut on = RetryOn::default();
                for (i, cond) in list.into_iter().enumerate() {
                    match cond {
                        RawRetryOn::Status(code @ 100..=599) => on.statuses.push(code),
                        RawRetryOn::Name(name) => match name.as_str() {
                            "connect-failure" => on.connect_failure = true,
                            "refused-stream" => on.refused_stream = true,
                            "reset" => on.reset = true,
                            "5xx" => on.any_5xx = true,
                            "gateway-error" => on.gateway_error = true,
                            "retriable-4xx" => on.retriable_4xx = true,
                            other => match (other.parse::<u16>(), grpc_code(other)) {
                                (Ok(code @ 100..=599), _) => on.statuses.push(code),
                                (_, Some(code)) => on.grpc.push(code),
                                _ => self.fail(
                                    &at.item("on", i),
                                    format!("unknown retry condition {other:?}: expected connect-failure, refused-stream, reset, 5xx, gateway-error, retriable-4xx, a status code, or a gRPC status: cancelled, deadline-exceeded, internal, resource-exhausted or unavailable"),
                                ),
                            },
                        },
                        RawRetryOn::Status(code) => self.fail(
                            &at.item("on", i),
                            format!("status {code} is not between 100 and 599"),
                        ),
                    }
                }
                on
            }
        };
        let budget = match r.budget {
            None => d.budget,
            Some(b) => {
                let ratio = b.ratio.unwrap_or(d.budget.ratio);
                if !(0.0..=10.0).contains(&ratio) {
                    self.fail(
                        &at.key("budget"),
                        format!("budget ratio {ratio} is not between 0 and 10"),
                    );
                }
                Budget {
                    ratio,
                    min_per_second: b.min_per_second.unwrap_or(d.budget.min_per_second),
                }
            }
        };
        let attempts = r.attempts.unwrap_or(d.attempts);
        if attempts > 10 {
            self.fail(
                &at.key("attempts"),
                format!("attempts {attempts} is over 10 (tries beyond are not made)"),
            );
        }
        Retry {
            attempts,
            per_try_timeout: r
                .per_try_timeout
                .map(|t| self.positive(at, "per_try_timeout", Some(t), Duration::ZERO)),
            on,
            non_idempotent: r.non_idempotent.unwrap_or(false),
            backoff: self.positive(at, "backoff", r.backoff, d.backoff),
            budget,
        }
    }

    fn mirror(&mut self, at: &At, m: RawMirror, services: &HashSet<&str>) -> Option<Mirror> {
        let percent = self.percent(&at.key("percent"), m.percent);
        let service = match m.service {
            None => {
                self.fail(at, "missing required key \"service\"");
                return None;
            }
            Some(s) if !services.contains(s.as_str()) => {
                self.fail(&at.key("service"), format!("unknown service {s:?}"));
                return None;
            }
            Some(s) if self.http2_services.contains(&s) => {
                let e = format!(
                    "mirror copies are sent as HTTP/1.1, and service {s:?} has protocol = \"http2\""
                );
                self.fail(&at.key("service"), e);
                return None;
            }
            Some(s) => s,
        };
        Some(Mirror {
            service,
            percent,
            max_body_bytes: m.max_body_bytes.unwrap_or(65536),
        })
    }

    fn redirect(&mut self, at: &At, r: RawRedirect) -> Option<Action> {
        let status = r.status.unwrap_or(301);
        if ![301, 302, 303, 307, 308].contains(&status) {
            self.fail(
                &at.key("status"),
                format!("status {status}: expected 301, 302, 303, 307 or 308"),
            );
        }
        if let Some(scheme) = &r.scheme {
            if scheme != "http" && scheme != "https" {
                self.fail(
                    &at.key("scheme"),
                    format!("scheme {scheme:?}: expected \"http\" or \"https\""),
                );
            }
        }
        if let Some(host) = &r.host {
            if !self.authority(&at.key("host"), host) {
                return None;
            }
        }
        if let Some(path) = &r.path {
            self.uri_path(&at.key("path"), path);
        }
        Some(Action::Redirect(Redirect {
            status,
            scheme: r.scheme,
            host: r.host,
            path: r.path,
        }))
    }

    /// A prefix rewrite replaces what the winning block's path matched, so every block must
    /// match the path by prefix or exactly.
    fn rewrite(&mut self, at: &At, r: RawRewrite, matches: &[Match]) -> Option<Rewrite> {
        if let Some(prefix) = &r.path_prefix {
            self.uri_path(&at.key("path_prefix"), prefix);
            let by_prefix =
                |m: &Match| matches!(m.path, Some(PathMatch::Prefix(_) | PathMatch::Exact(_)));
            if matches.is_empty() {
                self.fail(
                    &at.key("path_prefix"),
                    "path_prefix replaces what the route's [[route.match]] matched by prefix or \
                     exact path, and the route has no [[route.match]]",
                );
            } else if !matches.iter().all(by_prefix) {
                self.fail(
                    &at.key("path_prefix"),
                    "path_prefix needs every [[route.match]] to match the path by prefix or exact",
                );
            }
        }
        if let Some(host) = &r.host {
            let at = at.key("host");
            if host.is_empty() {
                self.fail(&at, "host must not be empty");
            } else {
                self.authority(&at, host);
            }
        }
        Some(Rewrite {
            path_prefix: r.path_prefix,
            host: r.host,
        })
    }

    fn fault(&mut self, at: &At, f: RawFault) -> Option<Fault> {
        let delay = f.delay.and_then(|d| {
            let here = at.table("delay");
            let percent = self.percent(&here.key("percent"), d.percent);
            let fixed = match d.fixed {
                Some(text) => self.duration(&here.key("fixed"), &text),
                None => {
                    self.fail(&here, "delay needs fixed, e.g. fixed = \"2s\"");
                    None
                }
            };
            Some(Delay {
                fixed: fixed?,
                percent,
            })
        });
        let abort = f.abort.and_then(|a| {
            let here = at.table("abort");
            let percent = self.percent(&here.key("percent"), a.percent);
            match a.status {
                Some(status @ 200..=599) => Some(Abort { status, percent }),
                Some(status) => {
                    self.fail(
                        &here.key("status"),
                        format!("status {status}: expected 200-599"),
                    );
                    None
                }
                None => {
                    self.fail(&here, "abort needs a status");
                    None
                }
            }
        });
        Some(Fault { delay, abort })
    }

    fn percent(&mut self, at: &At, percent: Option<f64>) -> f64 {
        let p = percent.unwrap_or(100.0);
        if !(0.0..=100.0).contains(&p) {
            self.fail(at, format!("percent {p} is not between 0 and 100"));
        }
        p
    }

    fn header_ops(&mut self, at: &At, ops: Option<RawHeaderOps>, request: bool) -> HeaderOps {
        let Some(ops) = ops else {
            return HeaderOps::default();
        };
        let mut out = HeaderOps::default();
        // Messages name the field: `request_headers.set`, `response_headers.remove[0]`.
        let mut check = |here: &At, field: String, name: &str, kind: &str| {
            let lower = name.to_ascii_lowercase();
            if !http_header_name_ok(&lower) {
                self.fail(here, format!("{field}: bad header name {name:?}"));
            } else if let Some(why) = not_editable(&lower, kind, request) {
                self.fail(
                    here,
                    format!("{field}: {lower:?} cannot be changed here: {why}"),
                );
            } else {
                return Some(lower);
            }
            None
        };
        let mut edits = Vec::new();
        for (kind, pairs) in [("set", ops.set), ("add", ops.add)] {
            for (name, value) in pairs {
                let here = at.key(kind).key(name.as_str());
                let field = format!("{}.{kind}", at.name());
                if let Some(lower) = check(&here, field.clone(), &name, kind) {
                    edits.push((here, field, kind, name, lower, value));
                }
            }
        }
        for (i, name) in ops.remove.into_iter().enumerate() {
            let here = at.key("remove").key(i);
            let field = format!("{}.remove[{i}]", at.name());
            if let Some(lower) = check(&here, field, &name, "remove") {
                out.remove.push(lower);
            }
        }
        let mut set = HashMap::new();
        for (here, field, kind, name, lower, value) in edits {
            // TOML keys differ by case, header names do not: one value would be lost.
            let twice = (kind == "set").then(|| set.insert(lower.clone(), name.clone()));
            if let Some(Some(before)) = twice {
                let e = format!("{field}: {name:?} is set twice (also as {before:?})");
                self.fail(&here, e);
            } else if self.header_value(&here, &format!("{field}: {lower:?}"), &value) {
                let list = if kind == "set" {
                    &mut out.set
                } else {
                    &mut out.add
                };
                list.push((lower, value));
            }
        }
        out
    }

    /// Visible ASCII, spaces and tabs; no CR or LF (which would split the header). `what`
    /// names the header in the message.
    fn header_value(&mut self, at: &At, what: &str, value: &str) -> bool {
        let ok = value
            .bytes()
            .all(|b| b == b'\t' || (b' '..=b'~').contains(&b));
        if !ok {
            let e = format!("{what}: bad value {value:?}: only visible ASCII, spaces and tabs");
            self.fail(at, e);
        }
        ok
    }

    fn uri_path(&mut self, at: &At, path: &str) {
        let ok = path.starts_with('/')
            && path
                .bytes()
                .all(|b| (b'!'..=b'~').contains(&b) && b != b'?' && b != b'#');
        if !ok {
            let e = format!(
                "{}: bad path {path:?}: must start with \"/\", without spaces, '?' or '#'",
                at.name()
            );
            self.fail(at, e);
        }
    }

    fn direct_response(&mut self, at: &At, d: RawDirectResponse) -> Option<Action> {
        let status = match d.status {
            Some(s @ 200..=599) => s,
            Some(s) => {
                self.fail(
                    &at.key("status"),
                    format!("status {s} is not a final HTTP status (200-599)"),
                );
                return None;
            }
            None => {
                self.fail(at, "direct_response needs a status");
                return None;
            }
        };
        let body = d.body.unwrap_or_default();
        if matches!(status, 204 | 304) && !body.is_empty() {
            let at = at.key("body");
            self.fail(&at, format!("a {status} response has no body"));
        }
        Some(Action::DirectResponse { status, body })
    }

    fn backends(
        &mut self,
        at: &At,
        raw: Vec<RawBackend>,
        services: &HashSet<&str>,
    ) -> Option<Action> {
        let mut out = Vec::new();
        let mut total: u64 = 0;
        for (i, b) in raw.into_iter().enumerate() {
            let here = at.item("backend", i);
            let weight = b.weight.unwrap_or(1);
            total += u64::from(weight);
            match b.service {
                None => self.fail(&here, "missing required key \"service\""),
                Some(s) if !services.contains(s.as_str()) => {
                    self.fail(&here.key("service"), format!("unknown service {s:?}"))
                }
                Some(service) => out.push(Backend { service, weight }),
            }
        }
        if total == 0 {
            self.fail(
                &at.key("backend"),
                "backend weights sum to 0; at least one must be > 0",
            );
        }
        Some(Action::Backends(out))
    }

    /// A host a redirect or rewrite sends, with a port or not; false, with an error, if it is
    /// none.
    fn authority(&mut self, at: &At, host: &str) -> bool {
        // A name, or an IPv6 address in brackets as in a URL (RFC 3986 §3.2.2).
        let (name_ok, port) = match host.strip_prefix('[').and_then(|h| h.split_once(']')) {
            Some((ip, rest)) => (
                ip.parse::<std::net::Ipv6Addr>().is_ok()
                    && (rest.is_empty() || rest.starts_with(':')),
                rest.strip_prefix(':'),
            ),
            None => match host.rsplit_once(':') {
                Some((name, port)) => (host_name_ok(name), Some(port)),
                None => (host_name_ok(host), None),
            },
        };
        let port_ok = port.is_none_or(|p| p.parse::<u16>().is_ok_and(|p| p > 0));
        if !(name_ok && port_ok) {
            self.fail(at, format!("bad host {host:?}: expected a name or [IPv6 address], with a port or not, such as \"example.com:8443\""));
            return false;
        }
        true
    }

    /// The name sent as SNI: a host name, no wildcard.
    fn sni(&mut self, at: &At, sni: &str) -> bool {
        let ok = !sni.starts_with("*.") && host_name_ok(&sni.to_ascii_lowercase());
        if !ok {
            let e = format!("sni {sni:?}: expected a host name such as \"reviews.default.svc\"");
            self.fail(at, e);
        }
        ok
    }

    fn host(&mut self, at: &At, h: &str) -> Option<HostPattern> {
        let h = h.to_ascii_lowercase();
        let (pattern, name) = match h.strip_prefix("*.") {
            Some(rest) => (HostPattern::Suffix(format!(".{rest}")), rest),
            None => (HostPattern::Exact(h.clone()), h.as_str()),
        };
        if !host_name_ok(name) {
            self.fail(at, format!("bad host {h:?}: expected a name such as \"example.com\" or \"*.example.com\" (no port)"));
            return None;
        }
        Some(pattern)
    }

    fn matcher(&mut self, at: &At, m: RawMatch) -> Option<Match> {
        let before = self.errors.len();
        let path = m.path.and_then(|p| {
            let at = at.key("path");
            match self.value_match(&at, p, false, "path")? {
                ValueMatch::Exact(s) => Some(PathMatch::Exact(s)),
                ValueMatch::Prefix(s) => Some(PathMatch::Prefix(s)),
                ValueMatch::Regex(r) => Some(PathMatch::Regex(r)),
                ValueMatch::Present(_) => None,
            }
        });
        if let Some(PathMatch::Exact(p) | PathMatch::Prefix(p)) = &path {
            let part = match path {
                Some(PathMatch::Prefix(_)) => PathPart::Start,
                _ => PathPart::Whole,
            };
            if !p.starts_with('/') {
                self.fail(&at.key("path"), format!("path {p:?} must start with \"/\""));
            } else if let Some(why) = unmatchable_path(p, part) {
                self.fail(
                    &at.key("path"),
                    format!("path {p:?} can never match: {why}"),
                );
            }
        }
        // A regex sees the normalized path too: an escape it spells as no such path has it
        // (`%2f`, `%7E`) can never match there.
        if let Some(PathMatch::Regex(r)) = &path {
            if let Some(why) = escape_problem(&r.source) {
                let e = format!("path regex {:?} can never match: {why}", r.source);
                self.fail(&at.key("path").key("regex"), e);
            }
        }
        self.not_empty(at, "methods", m.methods.as_ref(), "any method");
        let mut methods = Vec::new();
        for (i, method) in m.methods.unwrap_or_default().into_iter().enumerate() {
            let upper = method.to_ascii_uppercase();
            if method == "*" {
                self.fail(&at.item("methods", i), ANY_METHOD);
            } else if upper.is_empty()
                || !upper.bytes().all(|b| b.is_ascii_alphabetic() || b == b'-')
            {
                self.fail(&at.item("methods", i), format!("bad method {method:?}"));
            }
            methods.push(upper);
        }
        let mut headers = Vec::new();
        let mut spelled = HashMap::new();
        for (name, cond) in m.headers {
            let here = at.key("headers").key(name.as_str());
            let lower = name.to_ascii_lowercase();
            let what = format!("header {name:?}");
            // TOML keys differ by case, header names do not.
            if let Some(before) = spelled.insert(lower.clone(), name.clone()) {
                self.fail(
                    &here,
                    format!("{what} is matched twice (also as {before:?})"),
                );
            } else if http_header_name_ok(&lower) {
                // A request's value that is not visible ASCII (with spaces) counts as absent,
                // so such a pattern could never match.
                let text = [&cond.exact, &cond.prefix].into_iter().flatten().next();
                if let Some(text) = text.filter(|t| {
                    !t.bytes()
                        .all(|b| b == b' ' || b == b'\t' || b.is_ascii_graphic())
                }) {
                    self.fail(&here, format!("header {name:?} value {text:?}: a header value matched must be visible ASCII (a request's other values count as absent)"));
                } else if let Some(v) = self.value_match(&here, cond, true, &what) {
                    headers.push((lower, v));
                }
            } else {
                self.fail(&here, format!("bad header name {name:?}"));
            }
        }
        headers.sort_by(|a, b| a.0.cmp(&b.0));
        let mut query = Vec::new();
        for (name, cond) in m.query {
            let here = at.key("query").key(name.as_str());
            if let Some(v) = self.value_match(&here, cond, true, &format!("query {name:?}")) {
                query.push((name, v));
            }
        }
        (self.errors.len() == before).then_some(Match {
            path,
            methods,
            headers,
            query,
        })
    }

    /// Exactly one of exact, prefix, regex (and, where allowed, present).
    fn value_match(
        &mut self,
        at: &At,
        m: RawStringMatch,
        allow_present: bool,
        what: &str,
    ) -> Option<ValueMatch> {
        let set = [
            m.exact.is_some(),
            m.prefix.is_some(),
            m.regex.is_some(),
            m.present.is_some(),
        ];
        let kinds = if allow_present {
            "exact, prefix, regex or present"
        } else {
            "exact, prefix or regex"
        };
        if set.iter().filter(|&&s| s).count() != 1 || (!allow_present && m.present.is_some()) {
            self.fail(at, format!("{what}: needs exactly one of {kinds}"));
            return None;
        }
        if let Some(s) = m.exact {
            return Some(ValueMatch::Exact(s));
        }
        if let Some(s) = m.prefix {
            return Some(ValueMatch::Prefix(s));
        }
        if let Some(p) = m.present {
            return Some(ValueMatch::Present(p));
        }
        let source = m.regex?;
        // Parsed alone first: wrapped, "/a)|(/b" would pass as `^(?:/a)|(/b)$`, which matches
        // every path that starts with "/a".
        let alone = regex_syntax::Parser::new()
            .parse(&source)
            .map_err(|e| e.to_string());
        let wrapped = |_| regex::Regex::new(&format!("^(?:{source})$")).map_err(|e| e.to_string());
        match alone.and_then(wrapped) {
            Ok(regex) => Some(ValueMatch::Regex(Pattern { source, regex })),
            Err(detail) => {
                let detail = detail.lines().last().unwrap_or("").trim();
                let detail = detail.strip_prefix("error: ").unwrap_or(detail);
                self.fail(
                    &at.key("regex"),
                    format!("{what}: bad regex {source:?}: {detail}"),
                );
                None
            }
        }
    }

    /// The sidecar's sections, and the place of `[inbound]` (where its own route and service
    /// are said to be declared).
    fn sidecar(
        &mut self,
        inbound: Option<(At, RawInbound)>,
        outbound: Option<(At, RawOutbound)>,
    ) -> (Sidecar, At) {
        let (in_at, raw_in) =
            inbound.unwrap_or_else(|| (absent_section("inbound"), RawInbound::default()));
        let listen = self.listen_or(
            Some(in_at.key("listen")).zip(raw_in.listen),
            "[inbound]",
            SocketAddr::from(([0, 0, 0, 0], 15006)),
        );
        let app = match raw_in.app {
            Some(s) => self.addr(&in_at.key("app"), &s),
            None => {
                self.fail(
                    &in_at,
                    "missing required key \"app\" (the local application's address)",
                );
                None
            }
        };
        let mut tcp_ports = Vec::new();
        for (i, port) in raw_in.tcp_ports.iter().flatten().enumerate() {
            let at = in_at.item("tcp_ports", i);
            match u16::try_from(*port) {
                Ok(0) | Err(_) => self.fail(&at, format!("port {port} is not 1-65535")),
                Ok(p) if app.is_some_and(|a| a.port() == p) => self.fail(
                    &at,
                    format!("port {p} is the app's HTTP port; tcp_ports are its other ones"),
                ),
                Ok(p) if tcp_ports.iter().any(|(_, q)| *q == p) => {
                    self.fail(&at, format!("port {p} is listed twice"))
                }
                Ok(p) => tcp_ports.push((at, p)),
            }
        }
        let app_protocol = match raw_in.app_protocol.as_deref() {
            None | Some("http1") => UpstreamProtocol::Http1,
            Some("http2") => UpstreamProtocol::Http2,
            Some(other) => {
                let e = format!("app_protocol {other:?}: expected \"http1\" or \"http2\"");
                self.fail(&in_at.key("app_protocol"), e);
                UpstreamProtocol::Http1
            }
        };
        let mtls = match raw_in.mtls.as_deref() {
            None | Some("strict") => Some(Mtls::Strict),
            Some("permissive") => Some(Mtls::Permissive),
            Some("disable") => Some(Mtls::Disable),
            Some(other) => {
                let e =
                    format!("mtls {other:?}: expected \"strict\", \"permissive\" or \"disable\"");
                self.fail(&in_at.key("mtls"), e);
                None
            }
        };
        if mtls.is_some_and(|m| m != Mtls::Disable) && !self.workload_declared {
            // At the `mtls` line when it is set.
            self.fail(
                &in_at.key("mtls"),
                format!(
                    "mtls = {:?}{} needs [workload], the mesh certificate to serve and the \
                     trust bundle to check callers with; or set mtls = \"disable\"",
                    raw_in.mtls.as_deref().unwrap_or("strict"),
                    if raw_in.mtls.is_none() {
                        " (the default)"
                    } else {
                        ""
                    },
                ),
            );
        }
        let in_idle = self.positive(
            &in_at,
            "idle_timeout",
            raw_in.idle_timeout,
            Listener::DEFAULT_IDLE_TIMEOUT,
        );
        let in_max = self.count(&in_at, "max_connections", raw_in.max_connections, 1);
        let mut policies: Vec<Policy> = Vec::new();
        for (i, raw) in raw_in.policy.into_iter().enumerate() {
            let at = in_at.item("policy", i);
            let Some(policy) = self.policy(&at, i, raw, mtls) else {
                continue;
            };
            // A policy's name is its `weir_authz_denied_total` series: one per policy.
            if policies.iter().any(|p| p.name == policy.name) || policy.name == NO_ALLOW {
                let name = &policy.name;
                self.fail(&at.key("name"), format!("policy name {name:?} is taken"));
            }
            policies.push(policy);
        }
        let (out_at, raw_out) =
            outbound.unwrap_or_else(|| (absent_section("outbound"), RawOutbound::default()));
        let out_listen = self.listen_or(
            Some(out_at.key("listen")).zip(raw_out.listen),
            "[outbound]",
            SocketAddr::from(([127, 0, 0, 1], 15001)),
        );
        let out_idle = self.positive(
            &out_at,
            "idle_timeout",
            raw_out.idle_timeout,
            Listener::DEFAULT_IDLE_TIMEOUT,
        );
        let out_max = self.count(&out_at, "max_connections", raw_out.max_connections, 1);
        // The app on one of the sidecar's own ports would send each request round the sidecar
        // until its connections ran out.
        // A TCP port on one of them would open the admin API (and its /shutdown) to callers.
        if let Some(app) = app {
            let listening = self.listening.clone();
            let own = |addr| listening.iter().find(|(_, _, a)| clash(*a, addr)).cloned();
            if let Some((_, owner, _)) = own(app) {
                let at = in_at.key("app");
                self.fail(
                    &at,
                    format!("app {app} is the sidecar's own {owner} listener"),
                );
            }
            for (at, port) in &tcp_ports {
                if let Some((_, owner, _)) = own(SocketAddr::new(app.ip(), *port)) {
                    self.fail(
                        at,
                        format!("port {port} is the sidecar's own {owner} listener"),
                    );
                }
            }
        }
        let sidecar = Sidecar {
            inbound: Inbound {
                listen,
                app: app.unwrap_or(SocketAddr::from(([127, 0, 0, 1], 8080))),
                app_protocol,
                mtls: mtls.unwrap_or(Mtls::Strict),
                tcp_ports: tcp_ports.into_iter().map(|(_, p)| p).collect(),
                idle_timeout: in_idle,
                max_connections: in_max,
                policies,
            },
            outbound: Outbound {
                listen: out_listen,
                idle_timeout: out_idle,
                max_connections: out_max,
                passthrough: raw_out.passthrough.unwrap_or(true),
            },
        };
        (sidecar, in_at)
    }

    /// The sidecar's own route and service to the app, named "inbound" (so the name is taken),
    /// declared at `at`; the user's routes attach to the outbound listener.
    fn app_route(
        &mut self,
        at: At,
        sidecar: &Sidecar,
        routes: &mut Vec<(At, RawRoute)>,
        services: &mut Vec<(At, RawService)>,
    ) {
        // A user's route or service of that name would shadow the app.
        let items = routes.iter().map(|(at, r)| (at, "route", r.name()));
        let items = items.chain(services.iter().map(|(at, s)| (at, "service", s.name())));
        let taken: Vec<(At, &str)> = items
            .filter(|(_, _, name)| *name == Some(INBOUND))
            .map(|(at, kind, _)| (at.key("name"), kind))
            .collect();
        for (at, kind) in taken {
            self.fail(
                &at,
                format!(
                    "{kind} name \"inbound\" is the sidecar's own (its route and service to \
                     the app); choose another"
                ),
            );
        }
        // The service label of captured calls that went on to where the app called.
        let passthrough = services
            .iter()
            .filter(|(_, s)| s.name() == Some(PASSTHROUGH));
        let taken: Vec<At> = passthrough.map(|(at, _)| at.key("name")).collect();
        for at in taken {
            self.fail(
                &at,
                "the name \"PassthroughCluster\" names the calls the sidecar passes through \
                 in its metrics and log; choose another",
            );
        }
        routes.retain(|(_, r)| r.name() != Some(INBOUND));
        services.retain(|(_, s)| s.name() != Some(INBOUND));
        // A route with `destinations` is on no listener: the original address picks it.
        for (_, r) in routes.iter_mut().filter(|(_, r)| r.destinations.is_none()) {
            r.listeners.get_or_insert_with(|| vec![OUTBOUND.into()]);
        }
        // The app is a service, and every request on the inbound listener takes one route to
        // it: metrics, limits, timeouts and the access log work as they do outbound.
        services.push((
            at.clone(),
            RawService {
                name: Some(INBOUND.into()),
                endpoints: Some(vec![sidecar.inbound.app.to_string()]),
                protocol: Some(
                    match sidecar.inbound.app_protocol {
                        UpstreamProtocol::Http1 => "http1",
                        UpstreamProtocol::Http2 => "http2",
                    }
                    .into(),
                ),
                ..RawService::default()
            },
        ));
        routes.push((
            at,
            RawRoute {
                name: Some(INBOUND.into()),
                listeners: Some(vec![INBOUND.into()]),
                backend: vec![RawBackend {
                    service: Some(INBOUND.into()),
                    weight: None,
                }],
                // No retries: the app is one hop away (Istio's inbound does not retry either).
                retry: Some(RawRetry {
                    attempts: Some(0),
                    ..RawRetry::default()
                }),
                ..RawRoute::default()
            },
        ));
    }

    fn workload(&mut self, at: &At, w: RawWorkload, role: Role) -> Option<Workload> {
        let cert = self.required_pem(at, "cert", w.cert);
        let key = self.required_pem(at, "key", w.key);
        let bundle = self.required_pem(at, "trust_bundle", w.trust_bundle);
        let ((cert, cert_pem), (key, key_pem), (trust_bundle, bundle_pem)) = (cert?, key?, bundle?);
        let pair = weir_tls::key_pair(&cert_pem, &key_pem)
            .map_err(|e| {
                let e = format!("{} with {}: {e}", cert.display(), key.display());
                self.fail(&at.key("cert"), e);
            })
            .ok()?;
        let uris = weir_tls::PeerIdentity::of(&pair.chain[0]).uris;
        let spiffe: Vec<String> = (uris.into_iter())
            .filter(|u| u.starts_with("spiffe://"))
            .collect();
        // An X.509-SVID names exactly one workload (X509-SVID spec §2).
        let identity = match &spiffe[..] {
            [id] if spiffe_id_ok(id) => id.clone(),
            [id] => {
                let e = format!("{}: bad SPIFFE id {id:?}{SPIFFE_ID}", cert.display());
                self.fail(&at.key("cert"), e);
                return None;
            }
            [] => {
                let e = format!(
                    "{}: no spiffe:// URI SAN; a workload certificate names its workload, such \
                     as spiffe://mesh.local/ns/default/sa/reviews",
                    cert.display()
                );
                self.fail(&at.key("cert"), e);
                return None;
            }
            ids => {
                let e = format!(
                    "{}: {} spiffe:// URI SANs; a workload certificate names its workload with \
                     exactly one, such as spiffe://mesh.local/ns/default/sa/reviews",
                    cert.display(),
                    ids.len()
                );
                self.fail(&at.key("cert"), e);
                return None;
            }
        };
        let serves = role == Role::Sidecar;
        if let Some(usage) = weir_tls::mesh_usage_missing(&pair.chain[0], serves) {
            let needs = match serves {
                true => {
                    "a sidecar's serves the mesh and calls it: it needs serverAuth and clientAuth"
                }
                false => "a gateway's calls the mesh: it needs clientAuth",
            };
            let e = format!(
                "{}: its extended key usage lacks {usage}; {needs}",
                cert.display()
            );
            self.fail(&at.key("cert"), e);
            return None;
        }
        // The workload's own trust domain, then any others whose peers it accepts (Istio's
        // trust domain aliases, for a mesh that shares its CA with another).
        let own = weir_tls::mesh::trust_domain(&identity).unwrap_or_default();
        let mut trust_domains = vec![own.to_string()];
        for (i, domain) in w.trust_domains.into_iter().flatten().enumerate() {
            if !trust_domain_ok(&domain) {
                let e = format!(
                    "bad trust domain {domain:?}: expected a name in lower case, such as \"mesh.local\""
                );
                self.fail(&at.item("trust_domains", i), e);
            } else if !trust_domains.contains(&domain) {
                trust_domains.push(domain);
            }
        }
        let bundle = weir_tls::certificates(&bundle_pem).and_then(|certs| {
            let roots = weir_tls::roots(&bundle_pem)?;
            let verifier = weir_tls::mesh::client_verifier(roots.clone(), trust_domains.clone())?;
            Ok((certs.iter().map(|c| c.to_vec()).collect(), roots, verifier))
        });
        let (roots, store, verifier) = bundle
            .map_err(|e| {
                let e = format!("{}: {e}", trust_bundle.display());
                self.fail(&at.key("trust_bundle"), e);
            })
            .ok()?;
        // Peers check the certificate against the same bundle: one it does not vouch for
        // (a new CA's certificate written before the new bundle) would fail every handshake.
        if let Err(e) = weir_tls::chains_to(&pair.chain, store) {
            let e = format!(
                "{}: not vouched for by the trust bundle {}: {e}",
                cert.display(),
                trust_bundle.display()
            );
            self.fail(&at.key("cert"), e);
            return None;
        }
        let mut fingerprint = std::collections::hash_map::DefaultHasher::new();
        (&cert_pem, &key_pem, &bundle_pem, &trust_domains).hash(&mut fingerprint);
        Some(Workload {
            cert,
            key,
            trust_bundle,
            identity,
            trust_domains,
            not_after: timestamp(pair.not_after),
            pair,
            roots,
            verifier,
            fingerprint: fingerprint.finish(),
        })
    }

    fn policy(
        &mut self,
        at: &At,
        index: usize,
        p: RawPolicy,
        mtls: Option<Mtls>,
    ) -> Option<Policy> {
        let before = self.errors.len();
        let action = match p.action.as_deref() {
            Some("allow") => Some(PolicyAction::Allow),
            Some("deny") => Some(PolicyAction::Deny),
            Some(other) => {
                let e = format!("action {other:?}: expected \"allow\" or \"deny\"");
                self.fail(&at.key("action"), e);
                None
            }
            None => {
                self.fail(
                    at,
                    "missing required key \"action\" (\"allow\" or \"deny\")",
                );
                None
            }
        };
        self.not_empty(at, "principals", p.principals.as_ref(), "anyone");
        self.not_empty(at, "methods", p.methods.as_ref(), "any method");
        self.not_empty(at, "paths", p.paths.as_ref(), "any path");
        let principals = p.principals.unwrap_or_default();
        for (i, principal) in principals.iter().enumerate() {
            if principal != "*" && !spiffe_id_ok(principal) {
                let e =
                    format!("principal {principal:?}: expected a spiffe:// id{SPIFFE_ID} or \"*\"");
                self.fail(&at.item("principals", i), e);
                continue;
            }
            // A caller of a trust domain the workload does not take never gets this far.
            let domain = weir_tls::mesh::trust_domain(principal).unwrap_or_default();
            let trusted = self.workload.as_ref().map(|w| &w.trust_domains);
            if principal != "*" && trusted.is_some_and(|t| !t.iter().any(|d| d == domain)) {
                let e = format!(
                    "principal {principal:?}: trust domain {domain:?} is not the workload's \
                     (add it to [workload] trust_domains): its callers are refused in the handshake"
                );
                self.fail(&at.item("principals", i), e);
            }
        }
        if !principals.is_empty() && mtls == Some(Mtls::Disable) {
            self.fail(
                &at.key("principals"),
                "principals need mtls = \"strict\" or \"permissive\": over plaintext no caller \
                 has an identity",
            );
        }
        let methods = p.methods.unwrap_or_default();
        for (i, method) in methods.iter().enumerate() {
            if method == "*" {
                self.fail(&at.item("methods", i), ANY_METHOD);
            } else if !http_header_name_ok(method) {
                self.fail(&at.item("methods", i), format!("bad method {method:?}"));
            }
        }
        let paths = p.paths.unwrap_or_default();
        for (i, path) in paths.iter().enumerate() {
            let ok = match (path.strip_prefix('*'), path.strip_suffix('*')) {
                _ if path == "*" => true,
                (Some(suffix), _) => !suffix.is_empty() && !suffix.contains('*'),
                (None, Some(prefix)) => prefix.starts_with('/') && !prefix.contains('*'),
                (None, None) => path.starts_with('/') && !path.contains('*'),
            };
            if !ok {
                let e = format!(
                    "path {path:?}: expected an exact path \"/a\", a prefix \"/a/*\", a suffix \
                     \"*.json\" or \"*\""
                );
                self.fail(&at.item("paths", i), e);
                continue;
            }
            let (text, part) = match (path.strip_prefix('*'), path.strip_suffix('*')) {
                (Some(suffix), _) => (suffix, PathPart::End),
                (None, Some(prefix)) => (prefix, PathPart::Start),
                (None, None) => (path.as_str(), PathPart::Whole),
            };
            if let Some(why) = unmatchable_path(text, part) {
                let e = format!("path {path:?} can never match: {why}");
                self.fail(&at.item("paths", i), e);
            }
        }
        if p.name.as_deref() == Some("") {
            self.fail(&at.key("name"), "name must not be empty");
        }
        (self.errors.len() == before).then(|| Policy {
            name: p.name.unwrap_or_else(|| format!("inbound.policy[{index}]")),
            action: action.unwrap_or(PolicyAction::Deny),
            principals,
            methods: methods.iter().map(|m| m.to_ascii_uppercase()).collect(),
            paths,
        })
    }

    /// An explicit empty list is a mistake, not a wildcard: say how to get the wildcard.
    fn not_empty<T>(&mut self, at: &At, key: &str, list: Option<&Vec<T>>, wildcard: &str) {
        if list.is_some_and(|l| l.is_empty()) {
            self.fail(
                &at.key(key),
                format!("{key} is empty; leave the key out to match {wildcard}"),
            );
        }
    }

    /// A duration at `at`; an error names its key.
    fn duration(&mut self, at: &At, text: &str) -> Option<Duration> {
        crate::duration::parse(text)
            .map_err(|e| self.fail(at, format!("{}: {e}", at.name())))
            .ok()
    }

    /// An address to listen on, at `at`, that no other listener of this config takes.
    fn listen(&mut self, at: &At, text: &str) -> Option<SocketAddr> {
        let addr = self.addr(at, text)?;
        self.listens(Some(at), &at.label, addr).then_some(addr)
    }

    /// The address set at `at`, or else `default`; either must be no other listener's.
    fn listen_or(
        &mut self,
        set: Option<(At, String)>,
        owner: &str,
        default: SocketAddr,
    ) -> SocketAddr {
        match set {
            Some((at, text)) => self.listen(&at, &text).unwrap_or(default),
            None => {
                self.listens(None, owner, default);
                default
            }
        }
    }

    /// Records that `owner` listens on `addr`, set at `at` (`None`: by default); false, with
    /// an error, when an earlier listener takes the same port. Pingora would not refuse the
    /// second: it hands both the same socket, and each answers a share of the other's
    /// connections (the admin API on a public port, or another listener's routes).
    fn listens(&mut self, at: Option<&At>, owner: &str, addr: SocketAddr) -> bool {
        let earlier = self.listening.iter().find(|(_, _, a)| clash(*a, addr));
        let Some((first_at, first_owner, first)) = earlier.cloned() else {
            self.listening.push((at.cloned(), owner.to_string(), addr));
            return true;
        };
        // The error goes where the user set an address; a default is named as such.
        let (place, mine, theirs) = match (at, first_at) {
            (Some(at), Some(f)) => {
                let there = self.sources.place(f.file, &f.key);
                (
                    at.clone(),
                    addr,
                    format!("{first} of {first_owner} ({there})"),
                )
            }
            (Some(at), None) => (
                at.clone(),
                addr,
                format!("{first}, {first_owner}'s default"),
            ),
            (None, Some(f)) => (f, first, format!("{addr}, {owner}'s default")),
            // Weir's own defaults never clash.
            (None, None) => return true,
        };
        self.fail(
            &place,
            format!("listen {mine} takes the port of {theirs}; each listener needs its own"),
        );
        false
    }

    fn addr(&mut self, at: &At, text: &str) -> Option<SocketAddr> {
        match text.parse::<SocketAddr>() {
            Ok(addr) if addr.port() == 0 => {
                self.fail(at, format!("bad address {text:?}: port 0 names no port"));
                None
            }
            Ok(addr) => Some(addr),
            Err(_) => {
                self.fail(
                    at,
                    format!("bad address {text:?}: expected ip:port, such as \"127.0.0.1:8080\""),
                );
                None
            }
        }
    }
}

/// Why a route's header changes may not touch `name` (lower case), if they may not: the
/// message's framing is the proxy's to write, and an HTTP/1.1 request has exactly one Host.
fn not_editable(name: &str, kind: &str, request: bool) -> Option<&'static str> {
    match name {
        "content-length" | "transfer-encoding" => {
            Some("the proxy frames the body itself, and a wrong length would hang or cut it")
        }
        "host" if request && kind != "set" => {
            Some("a request has exactly one Host; set it, or use rewrite.host")
        }
        "connection" | "keep-alive" | "proxy-connection" | "te" | "trailer" | "upgrade"
            if kind != "remove" =>
        {
            Some("a hop-by-hop header belongs to one connection, and the proxy writes its own")
        }
        _ => None,
    }
}

/// The largest certificate, key or CA bundle read: a big CA bundle is a few hundred KiB.
const MAX_PEM_BYTES: u64 = 1 << 20;

/// More worker threads than any machine has cores; each holds a runtime and its file
/// descriptors, so a typo of many more would fail at start.
const MAX_THREADS: usize = 1024;

/// A hash of the CAs that verify client certificates ([`ClientAuth::trust`]).
fn trust(cas: &impl Hash) -> u64 {
    let mut hasher = std::collections::hash_map::DefaultHasher::new();
    cas.hash(&mut hasher);
    hasher.finish()
}

/// Whether two listening addresses take the same port: the same address, or the same port with
/// either one on every interface (`0.0.0.0`, `[::]`).
fn clash(a: SocketAddr, b: SocketAddr) -> bool {
    // `[::ffff:127.0.0.1]` is 127.0.0.1 to the kernel.
    let (a_ip, b_ip) = (a.ip().to_canonical(), b.ip().to_canonical());
    a.port() == b.port() && (a_ip == b_ip || a_ip.is_unspecified() || b_ip.is_unspecified())
}

/// The sidecar's listener for the app's calls, which user routes attach to.
const OUTBOUND: &str = "outbound";

/// Where a sidecar section the config leaves out is reported: by its name, in the first file.
fn absent_section(name: &str) -> At {
    At {
        file: 0,
        key: keys![name],
        label: format!("[{name}]"),
    }
}

/// The sidecar's two listeners: outbound (first: `explain`'s default), and inbound (with the
/// workload's certificate, requiring one from the mesh, under `mtls = "strict"`; plaintext
/// too under "permissive").
fn sidecar_listeners(sidecar: &Sidecar, workload: Option<&Workload>) -> Vec<Listener> {
    let tls = match (workload, sidecar.inbound.mtls) {
        (Some(w), mtls @ (Mtls::Strict | Mtls::Permissive)) => Some(ListenerTls {
            certificates: vec![ServerCertificate {
                hosts: Vec::new(),
                cert: w.cert.clone(),
                key: w.key.clone(),
                not_after: w.not_after.clone(),
                pair: w.pair.clone(),
            }],
            client_auth: Some(ClientAuth {
                ca: w.trust_bundle.clone(),
                verifier: w.verifier.clone(),
                // The trust domains too: a session made under a domain since removed must not
                // resume with the identity it gave.
                trust: trust(&(&w.roots, &w.trust_domains)),
            }),
            also_plaintext: mtls == Mtls::Permissive,
        }),
        _ => None,
    };
    let inbound = Listener {
        name: INBOUND.into(),
        listen: sidecar.inbound.listen,
        protocol: match tls {
            Some(_) => Protocol::Https,
            None => Protocol::Http,
        },
        tls,
        idle_timeout: sidecar.inbound.idle_timeout,
        max_connections: sidecar.inbound.max_connections,
        proxy_protocol: false,
    };
    let outbound = Listener {
        name: OUTBOUND.into(),
        listen: sidecar.outbound.listen,
        protocol: Protocol::Http,
        tls: None,
        idle_timeout: sidecar.outbound.idle_timeout,
        max_connections: sidecar.outbound.max_connections,
        proxy_protocol: false,
    };
    vec![outbound, inbound]
}

/// A gRPC retry condition's status code.
fn grpc_code(name: &str) -> Option<u8> {
    GRPC_RETRY_ON
        .iter()
        .find(|(n, _)| *n == name)
        .map(|&(_, code)| code)
}

fn default_admin() -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], 9901))
}

/// What [`spiffe_id_ok`] takes, for messages.
const SPIFFE_ID: &str =
    " (a trust domain, then a path of letters, digits, '.', '-' and '_' segments)";

/// A DNS name or IPv4 address: dot-separated labels of letters, digits, `-` and `_`.
fn host_name_ok(name: &str) -> bool {
    !name.is_empty()
        && name.split('.').all(|label| {
            !label.is_empty()
                && (label.bytes()).all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
        })
}

/// The shortest health check interval.
const HEALTH_CHECK_MIN_INTERVAL: Duration = Duration::from_millis(100);

/// Which part of a request's path a pattern is.
/// `methods = ["*"]`, Istio's way to say any method, would be a method named `*` here.
const ANY_METHOD: &str = "\"*\" is no method: leave `methods` out to match any method";

#[derive(Clone, Copy, PartialEq)]
enum PathPart {
    Whole,
    Start,
    End,
}

/// Why no request's path could ever be `p` (or start or end with it, as `part` says): a
/// request's path is matched as the proxy forwards it, normalized (escaped unreserved
/// characters decoded, dot segments removed, backslashes as slashes), without its query, and
/// with spaces and non-ASCII characters percent-encoded. A route or policy that cannot match
/// is a mistake that would pass unseen, worst in a deny policy.
fn unmatchable_path(p: &str, part: PathPart) -> Option<&'static str> {
    if p.bytes().any(|b| !(b'!'..=b'~').contains(&b)) {
        return Some("a request sends spaces and non-ASCII characters percent-encoded (\"%20\", \"%C3%BC\"): write them so");
    }
    if p.contains(['?', '#']) {
        return Some("the query is no part of the path: match it with `query`");
    }
    if p.contains('\\') {
        return Some("a backslash is matched as a slash: write \"/\"");
    }
    if let Some(why) = escape_problem(p) {
        return Some(why);
    }
    // A segment cut by the pattern's open end may be the start (or end) of a longer one.
    let segments: Vec<&str> = p.split('/').collect();
    let whole = |i: usize| match part {
        PathPart::Whole => true,
        PathPart::Start => i + 1 < segments.len(),
        PathPart::End => i > 0,
    };
    let dots = (segments.iter().enumerate()).any(|(i, s)| (*s == "." || *s == "..") && whole(i));
    dots.then_some("\".\" and \"..\" segments are removed before matching")
}

/// Why a path written with escapes as `p` writes them could never be a normalized one: an
/// escaped unreserved character (decoded there) or lower-case hex digits (upper-cased there).
fn escape_problem(p: &str) -> Option<&'static str> {
    let bytes = p.as_bytes();
    let escapes = (0..bytes.len()).filter_map(|i| {
        let hex = (bytes.get(i + 1..i + 3))
            .filter(|hex| bytes[i] == b'%' && hex.iter().all(u8::is_ascii_hexdigit))?;
        Some((
            hex,
            u8::from_str_radix(std::str::from_utf8(hex).ok()?, 16).ok()?,
        ))
    });
    for (hex, byte) in escapes {
        if byte.is_ascii_alphanumeric() || b"-._~".contains(&byte) {
            return Some("escaped letters, digits and \"-._~\" are matched decoded (\"%7E\" as \"~\"): write them so");
        }
        if hex.iter().any(u8::is_ascii_lowercase) {
            return Some("escapes are matched with upper-case hex digits (\"%2F\", not \"%2f\"): write them so");
        }
    }
    None
}

/// A SPIFFE trust domain: lower-case letters, digits, `.`, `-` and `_` (SPIFFE-ID §2.1).
fn trust_domain_ok(domain: &str) -> bool {
    !domain.is_empty()
        && (domain.bytes())
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b"._-".contains(&b))
}

fn http_header_name_ok(name: &str) -> bool {
    !name.is_empty()
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b))
}

trait HasName {
    fn name(&self) -> Option<&str>;
}

macro_rules! has_name {
    ($($t:ty),*) => { $(impl HasName for $t { fn name(&self) -> Option<&str> { self.name.as_deref() } })* };
}
has_name!(RawListener, RawRoute, RawService);

/// Seconds since the Unix epoch as RFC 3339.
fn timestamp(secs: i64) -> String {
    chrono::DateTime::from_timestamp(secs, 0).map_or_else(
        || secs.to_string(),
        |t| t.to_rfc3339_opts(chrono::SecondsFormat::Secs, true),
    )
}
