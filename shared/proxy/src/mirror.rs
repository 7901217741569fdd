//! Traffic mirroring: a fire-and-forget copy of a request to another service.
//!
//! Pingora has no mirroring (its issue #266), so a copy is a task of its own on Pingora's HTTP
//! connector. The request's body reaches it from `request_body_filter` through a bounded
//! channel; the task buffers at most `max_body_bytes`, then sends the copy and reads and drops
//! the answer. Nothing here can hold up, fail or change the client's request: every send is a
//! `try_send`, and a copy that cannot keep up is dropped and counted.

use std::sync::Arc;
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use pingora_core::connectors::http::Connector;
use pingora_core::upstreams::peer::HttpPeer;
use pingora_http::RequestHeader;
use tokio::sync::mpsc;
use weir_config::Mirror;
use weir_resilience::Permit;

use crate::snapshot::ServiceState;

/// How long a copy may take, connect to last byte of the answer; then it is abandoned.
/// Envoy's default route timeout.
const MIRROR_TIMEOUT: Duration = Duration::from_secs(15);
/// Body chunks waiting for the task; a copy whose task falls this far behind is dropped.
const CHANNEL_CHUNKS: usize = 16;

/// What `request_body_filter` holds of a copy whose body is still coming.
pub struct MirrorBody {
    tx: mpsc::Sender<Chunk>,
    /// Bytes handed to the copy so far.
    forwarded: usize,
    /// Position in the body stream of the current try: on a retry Pingora replays the body
    /// from its start, and those bytes must not reach the copy twice.
    position: usize,
}

enum Chunk {
    Data(Bytes),
    End,
}

/// Why a copy was not sent, or how it went; the `result` label.
#[derive(Clone, Copy)]
enum Outcome {
    Success,
    Failure,
    Dropped,
    TooLarge,
}

impl Outcome {
    fn label(self) -> &'static str {
        match self {
            Outcome::Success => "success",
            Outcome::Failure => "failure",
            Outcome::Dropped => "dropped",
            Outcome::TooLarge => "too_large",
        }
    }
}

fn count(service: &str, outcome: Outcome) {
    weir_telemetry::metrics()
        .mirror_requests
        .with_label_values(&[service, outcome.label()])
        .inc();
}

/// Starts a copy of a request whose upstream header is `header`. `body_len` is the declared
/// length (`None` when chunked) and `body_empty` says there is no body at all. Returns the
/// body's channel when the body is still to come.
pub fn start(
    connector: &Arc<Connector>,
    mirror: &Mirror,
    service: &Arc<ServiceState>,
    mut header: RequestHeader,
    key: Option<Vec<u8>>,
    body_len: Option<u64>,
    body_empty: bool,
) -> Option<MirrorBody> {
    let name = &service.config.name;
    if body_len.is_some_and(|len| len > mirror.max_body_bytes) {
        count(name, Outcome::TooLarge);
        return None;
    }
    let Some(permit) = service.requests.try_acquire() else {
        count(name, Outcome::Dropped);
        return None;
    };
    // Envoy's convention: the copy's Host names the shadow, so the mirror can tell copies
    // from real traffic.
    let host = header
        .headers
        .get("host")
        .and_then(|h| h.to_str().ok())
        .map(|h| match h.rsplit_once(':') {
            Some((name, port)) if port.bytes().all(|b| b.is_ascii_digit()) => {
                format!("{name}-shadow:{port}")
            }
            _ => format!("{h}-shadow"),
        });
    if let Some(host) = host {
        // Always a valid value: built from a valid one plus ASCII.
        let _ = header.insert_header("host", host);
    }
    header.remove_header("transfer-encoding");
    let copy = Copy {
        connector: connector.clone(),
        service: service.clone(),
        header,
        key,
        max_body: usize::try_from(mirror.max_body_bytes).unwrap_or(usize::MAX),
        _permit: permit,
    };
    // Boxed: the copy's future (Pingora's connector inside) is many kilobytes, and tokio
    // would otherwise move all of it into and out of the task at every stage change.
    if body_empty {
        tokio::spawn(Box::pin(copy.run(None)));
        return None;
    }
    let (tx, rx) = mpsc::channel(CHANNEL_CHUNKS);
    tokio::spawn(Box::pin(copy.run(Some(rx))));
    Some(MirrorBody {
        tx,
        forwarded: 0,
        position: 0,
    })
}

impl MirrorBody {
    /// A new try of the primary request starts; its body starts again at byte 0.
    pub fn new_try(&mut self) {
        self.position = 0;
    }

    /// Hands the part of `chunk` the copy has not seen yet. `false` when the copy is over (it
    /// fell behind, or this was the end of the body): drop the `MirrorBody` then.
    pub fn feed(&mut self, chunk: Option<&Bytes>, end: bool) -> bool {
        if let Some(chunk) = chunk {
            let start = self.position;
            self.position += chunk.len();
            if self.position > self.forwarded {
                let fresh = chunk.slice(self.forwarded.saturating_sub(start)..);
                self.forwarded = self.position;
                if self.tx.try_send(Chunk::Data(fresh)).is_err() {
                    return false;
                }
            }
        }
        if end {
            let _ = self.tx.try_send(Chunk::End);
            return false;
        }
        true
    }
}

/// A copy on its way: owns everything it needs, so the client's request can finish first.
struct Copy {
    connector: Arc<Connector>,
    service: Arc<ServiceState>,
    header: RequestHeader,
    key: Option<Vec<u8>>,
    max_body: usize,
    /// Holds a place under the service's `max_requests` until the copy is done.
    _permit: Permit,
}

impl Copy {
    async fn run(self, body: Option<mpsc::Receiver<Chunk>>) {
        let Copy {
            connector,
            service,
            header,
            key,
            max_body,
            _permit,
        } = self;
        let send = send(&connector, &service, header, key, max_body, body);
        let outcome = tokio::time::timeout(MIRROR_TIMEOUT, send)
            .await
            .unwrap_or(Outcome::Failure);
        count(&service.config.name, outcome);
    }
}

async fn send(
    connector: &Connector,
    service: &ServiceState,
    mut header: RequestHeader,
    key: Option<Vec<u8>>,
    max_body: usize,
    body: Option<mpsc::Receiver<Chunk>>,
) -> Outcome {
    let body = match body {
        None => Bytes::new(),
        Some(rx) => match collect(rx, max_body).await {
            Ok(body) => {
                let _ = header.insert_header("content-length", body.len().to_string());
                body
            }
            Err(outcome) => return outcome,
        },
    };
    let pool = &service.config.connection_pool;
    let Some(endpoint) = service.balancer.pick(key.as_deref(), None) else {
        return Outcome::Failure;
    };
    let _active = endpoint.begin();
    let mut peer = HttpPeer::new(endpoint.addr, false, String::new());
    peer.options.connection_timeout = Some(pool.connect_timeout);
    match crate::client::exchange(connector, &peer, header, body, pool.idle_timeout).await {
        Ok(status) if status < 500 => Outcome::Success,
        _ => Outcome::Failure,
    }
}

/// The whole body, or why the copy is off: it grew past `max`, or the primary request ended
/// before its body did (the client went away, or the primary never reached an upstream).
async fn collect(mut rx: mpsc::Receiver<Chunk>, max: usize) -> std::result::Result<Bytes, Outcome> {
    let mut body = BytesMut::new();
    loop {
        match rx.recv().await {
            Some(Chunk::Data(data)) => {
                if body.len() + data.len() > max {
                    return Err(Outcome::TooLarge);
                }
                body.extend_from_slice(&data);
            }
            Some(Chunk::End) => return Ok(body.freeze()),
            None => return Err(Outcome::Dropped),
        }
    }
}
