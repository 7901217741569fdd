//! An OTLP trace receiver for the tracing tests: tests/otlp/collector.py (OTLP/HTTP, and
//! OTLP/gRPC on a real gRPC server) hands over each export request as it arrived; here it is
//! decoded with the OTLP protobuf types.

use std::collections::BTreeMap;
use std::io::BufRead;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::Duration;

use opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceRequest;
use opentelemetry_proto::tonic::common::v1::any_value::Value;
use opentelemetry_proto::tonic::common::v1::AnyValue;
use prost::Message;

use crate::tls::Issued;
use crate::{free_port, repo_root, wait_until};

/// The collector process; killed on drop.
pub struct Collector {
    child: Child,
    /// With TLS: its certificate, key and client CA files.
    _files: Option<tempfile::TempDir>,
    pub http_port: u16,
    pub grpc_port: u16,
    exports: Arc<Mutex<Vec<Export>>>,
}

/// One export request as it arrived.
#[derive(Debug, Clone)]
pub struct Export {
    /// "http" or "grpc".
    pub via: String,
    pub path: String,
    pub content_type: String,
    /// With a client CA: the common name of the client's certificate.
    pub peer: String,
    /// The `authorization` header (gRPC: metadata) that came with it.
    pub authorization: String,
    pub spans: Vec<SpanSeen>,
}

/// A span as the collector decoded it; ids in lowercase hex, attribute values as text.
#[derive(Debug, Clone)]
pub struct SpanSeen {
    pub service_name: String,
    pub trace_id: String,
    pub span_id: String,
    /// "" for a root span.
    pub parent_span_id: String,
    pub name: String,
    /// OTLP's SpanKind: 2 server, 3 client.
    pub kind: i32,
    pub attributes: BTreeMap<String, String>,
    /// OTLP's StatusCode: 0 unset, 2 error.
    pub status_code: i32,
    pub status_message: String,
}

impl SpanSeen {
    pub fn attribute(&self, key: &str) -> Option<&str> {
        self.attributes.get(key).map(String::as_str)
    }
}

impl Collector {
    pub fn start() -> Collector {
        Collector::spawn(None)
    }

    /// A collector that serves TLS only, with `served`; with `client_ca` (PEM) it requires a
    /// client certificate that chains to it.
    pub fn start_tls(served: &Issued, client_ca: Option<&str>) -> Collector {
        let dir = tempfile::tempdir().unwrap();
        let file = |name: &str, text: &str| {
            let path = dir.path().join(name);
            std::fs::write(&path, text).unwrap();
            path.to_str().unwrap().to_string()
        };
        let mut args = vec![
            "tls".to_string(),
            file("collector.pem", &served.cert),
            file("collector-key.pem", &served.key),
        ];
        args.extend(client_ca.map(|ca| file("clients-ca.pem", ca)));
        let mut collector = Collector::spawn(Some(args));
        collector._files = Some(dir);
        collector
    }

    fn spawn(tls: Option<Vec<String>>) -> Collector {
        let (http_port, grpc_port) = (free_port(), free_port());
        let mut child = Command::new("/usr/bin/python3")
            .arg(repo_root().join("tests/otlp/collector.py"))
            .args([http_port.to_string(), grpc_port.to_string()])
            .args(tls.into_iter().flatten())
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .spawn()
            .unwrap();
        let stdout = child.stdout.take().unwrap();
        let exports = Arc::new(Mutex::new(Vec::new()));
        let seen = exports.clone();
        thread::spawn(move || {
            for line in std::io::BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                seen.lock().unwrap().push(decode(&line));
            }
        });
        let collector = Collector {
            child,
            _files: None,
            http_port,
            grpc_port,
            exports,
        };
        wait_until("the OTLP collector", Duration::from_secs(20), || {
            [http_port, grpc_port]
                .iter()
                .all(|p| std::net::TcpStream::connect(("127.0.0.1", *p)).is_ok())
        });
        collector
    }

    pub fn exports(&self) -> Vec<Export> {
        self.exports.lock().unwrap().clone()
    }

    pub fn spans(&self) -> Vec<SpanSeen> {
        self.exports().into_iter().flat_map(|e| e.spans).collect()
    }

    /// Waits (up to 20 s) for a span that `pick` accepts, and returns it.
    pub fn wait_for_span(&self, what: &str, pick: impl Fn(&SpanSeen) -> bool) -> SpanSeen {
        let mut found = None;
        wait_until(what, Duration::from_secs(20), || {
            found = self.spans().into_iter().find(|s| pick(s));
            found.is_some()
        });
        found.unwrap()
    }
}

impl Drop for Collector {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn decode(line: &str) -> Export {
    let v: serde_json::Value = serde_json::from_str(line).unwrap();
    let text = |k: &str| v[k].as_str().unwrap_or_default().to_string();
    let body = unhex(&text("body"));
    let request = ExportTraceServiceRequest::decode(body.as_slice()).unwrap();
    let mut spans = Vec::new();
    for resource_spans in request.resource_spans {
        let service_name = resource_spans
            .resource
            .iter()
            .flat_map(|r| &r.attributes)
            .find(|kv| kv.key == "service.name")
            .map(|kv| value_text(kv.value.as_ref()))
            .unwrap_or_default();
        for span in resource_spans.scope_spans.into_iter().flat_map(|s| s.spans) {
            let status = span.status.unwrap_or_default();
            spans.push(SpanSeen {
                service_name: service_name.clone(),
                trace_id: hex(&span.trace_id),
                span_id: hex(&span.span_id),
                parent_span_id: hex(&span.parent_span_id),
                name: span.name,
                kind: span.kind,
                attributes: (span.attributes.iter())
                    .map(|kv| (kv.key.clone(), value_text(kv.value.as_ref())))
                    .collect(),
                status_code: status.code,
                status_message: status.message,
            });
        }
    }
    Export {
        via: text("via"),
        path: text("path"),
        content_type: text("content_type"),
        peer: text("peer"),
        authorization: text("authorization"),
        spans,
    }
}

fn value_text(value: Option<&AnyValue>) -> String {
    match value.and_then(|v| v.value.as_ref()) {
        Some(Value::StringValue(s)) => s.clone(),
        Some(Value::IntValue(i)) => i.to_string(),
        Some(Value::BoolValue(b)) => b.to_string(),
        Some(Value::DoubleValue(d)) => d.to_string(),
        other => format!("{other:?}"),
    }
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn unhex(text: &str) -> Vec<u8> {
    (0..text.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&text[i..i + 2], 16).unwrap())
        .collect()
}
