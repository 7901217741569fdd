//! The access log: one JSON object per line, to stdout or a file.

use std::fs::OpenOptions;
use std::io::{BufWriter, Write};
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{sync_channel, Receiver, SyncSender, TryRecvError};
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde::Serialize;
use weir_config::AccessLog as Target;

/// Lines waiting for the writer thread; beyond this, lines are dropped (and counted) rather
/// than making requests wait on a slow disk or a blocked stdout.
const BACKLOG: usize = 16 * 1024;

/// Requests hand their line to a writer thread: no lock and no write syscall on the request
/// path.
pub struct AccessLog {
    lines: Option<SyncSender<Vec<u8>>>,
    /// Lines queued but not yet written and flushed.
    pending: Arc<AtomicU64>,
}

/// One request, as logged.
#[derive(Serialize)]
pub struct Entry<'a> {
    pub request_id: &'a str,
    pub listener: &'a str,
    pub client: Option<IpAddr>,
    pub method: &'a str,
    /// "HTTP/1.1", "HTTP/2", ... as Envoy's `%PROTOCOL%`.
    pub protocol: &'static str,
    pub authority: &'a str,
    /// Without the query string, which may carry secrets.
    pub path: &'a str,
    /// 0 when no response was sent (the client went away).
    pub status: u16,
    /// Response flags (DESIGN.md §3): "NR", "UF", ... or "".
    pub flags: &'a str,
    pub route: Option<&'a str>,
    pub service: Option<&'a str>,
    pub upstream: Option<SocketAddr>,
    #[serde(rename = "duration_ms", serialize_with = "millis")]
    pub duration: Duration,
    /// The config generation that served the request.
    pub generation: u64,
    /// The client certificate's identity on an mTLS listener: its SPIFFE id (first URI
    /// SAN), else its subject.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub peer: Option<&'a str>,
    /// The OpenTelemetry trace this request was recorded in, when tracing is on and sampled
    /// it.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub trace_id: Option<&'a str>,
    /// Bytes received from the client and sent to it: a connection's, on `tcp` and `tls`
    /// listeners; the bodies', for HTTP.
    #[serde(flatten)]
    pub bytes: Option<Bytes>,
}

/// A connection's byte counts, both ways.
#[derive(Debug, Clone, Copy, Default, Serialize)]
pub struct Bytes {
    #[serde(rename = "bytes_received")]
    pub received: u64,
    #[serde(rename = "bytes_sent")]
    pub sent: u64,
}

impl AccessLog {
    pub fn open(target: &Target) -> std::io::Result<AccessLog> {
        let out: Box<dyn Write + Send> = match target {
            Target::Off => {
                return Ok(AccessLog {
                    lines: None,
                    pending: Arc::default(),
                })
            }
            Target::Stdout => Box::new(std::io::stdout()),
            Target::File(path) => {
                Box::new(OpenOptions::new().create(true).append(true).open(path)?)
            }
        };
        let (tx, rx) = sync_channel(BACKLOG);
        let pending = Arc::new(AtomicU64::new(0));
        let written = pending.clone();
        std::thread::Builder::new()
            .name("access-log".into())
            .spawn(move || write_lines(rx, BufWriter::with_capacity(64 * 1024, out), &written))?;
        Ok(AccessLog {
            lines: Some(tx),
            pending,
        })
    }

    pub fn enabled(&self) -> bool {
        self.lines.is_some()
    }

    pub fn write(&self, entry: &Entry<'_>) {
        let Some(lines) = &self.lines else { return };
        let Ok(mut line) = serde_json::to_vec(&entry) else {
            return;
        };
        line.push(b'\n');
        self.pending.fetch_add(1, Ordering::AcqRel);
        if lines.try_send(line).is_err() {
            self.pending.fetch_sub(1, Ordering::AcqRel);
            lost(1);
        }
    }

    /// Waits until every queued line is written, at most `timeout` (before the process exits).
    pub fn wait_written(&self, timeout: Duration) {
        let start = Instant::now();
        while self.pending.load(Ordering::Acquire) > 0 && start.elapsed() < timeout {
            std::thread::sleep(Duration::from_millis(5));
        }
    }
}

/// Writes lines as they come and flushes whenever the queue is empty, so a quiet log is
/// never held back and a busy one is written in large blocks.
fn write_lines(
    rx: Receiver<Vec<u8>>,
    mut out: BufWriter<Box<dyn Write + Send>>,
    pending: &AtomicU64,
) {
    while let Ok(line) = rx.recv() {
        let mut n = 1;
        let mut failed = out.write_all(&line).is_err();
        let open = loop {
            match rx.try_recv() {
                Ok(line) => {
                    n += 1;
                    failed |= out.write_all(&line).is_err();
                }
                Err(TryRecvError::Empty) => break true,
                Err(TryRecvError::Disconnected) => break false,
            }
        };
        // A full disk or a closed stdout must not stop the proxy: the lines are lost, and
        // counted (those of a batch that failed: which of them got out is not known).
        failed |= out.flush().is_err();
        if failed {
            lost(n);
        }
        pending.fetch_sub(n, Ordering::AcqRel);
        if !open {
            return;
        }
    }
}

/// Counts lost lines (`weir_access_log_dropped_total`), and says so once in the log.
fn lost(lines: u64) {
    static SAID: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);
    crate::metrics().access_log_dropped.inc_by(lines);
    if !SAID.swap(true, Ordering::Relaxed) {
        tracing::warn!(
            "access log: lines lost (its writer cannot keep up, or cannot write); counted in \
             weir_access_log_dropped_total"
        );
    }
}

fn millis<S: serde::Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_f64((d.as_secs_f64() * 1e6).round() / 1e3)
}
