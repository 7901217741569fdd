//! Traffic mirroring: a fire-and-forget copy of a request to another service.
//!
//! Pingora has no mirroring (its issue #266), so copies travel on tasks of their own on
//! Pingora's HTTP/1 connector: the service's *lanes*. A lane is a long-lived task that keeps
//! one connection and carries copies one after another, so a copy costs no task, pool lookup
//! or idle-connection watch of its own. A copy that finds no idle lane starts one, so copies
//! run as concurrently as they arrive, up to the service's `max_requests`; a lane ends after
//! the pool's `idle_timeout` without copies, or once its service has left the config.
//!
//! The request's body reaches the lane from `request_body_filter` through a bounded channel;
//! the lane buffers at most `max_body_bytes`, then sends the copy and reads and drops the
//! answer. Nothing here can hold up, fail or change the client's request: every send is a
//! `try_send`, and a copy that cannot keep up is dropped and counted.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use pingora_core::connectors::http::v1::Connector;
use pingora_core::protocols::http::v1::client::HttpSession;
use pingora_core::upstreams::peer::HttpPeer;
use pingora_error::RetryType;
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
    let (body, tx) = if body_empty {
        (None, None)
    } else {
        let (tx, rx) = mpsc::channel(CHANNEL_CHUNKS);
        (Some(rx), Some(tx))
    };
    let copy = Copy {
        service: service.clone(),
        header,
        key,
        body,
        max_body: usize::try_from(mirror.max_body_bytes).unwrap_or(usize::MAX),
        _permit: permit,
    };
    service.mirror_lanes.carry(copy, connector);
    tx.map(|tx| MirrorBody {
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

/// A copy waiting for a lane: owns everything it needs, so the client's request can finish
/// first.
struct Copy {
    service: Arc<ServiceState>,
    header: RequestHeader,
    key: Option<Vec<u8>>,
    /// The body still to come; `None` when there is none.
    body: Option<mpsc::Receiver<Chunk>>,
    max_body: usize,
    /// Holds a place under the service's `max_requests` until the copy is done, which also
    /// bounds the copies waiting for a lane.
    _permit: Permit,
}

/// The lanes of one service, for the copies mirrored to it.
pub struct Lanes {
    tx: async_channel::Sender<Copy>,
    /// Kept for the lanes to come; the channel closes when the service (and so `tx`) goes.
    rx: async_channel::Receiver<Copy>,
    /// Lanes waiting for a copy, counting those spawned and not yet running.
    idle: Arc<AtomicUsize>,
    /// How long a lane waits for a copy before it ends (the pool's `idle_timeout`).
    idle_timeout: Duration,
}

impl Lanes {
    pub fn new(idle_timeout: Duration) -> Lanes {
        let (tx, rx) = async_channel::unbounded();
        Lanes {
            tx,
            rx,
            idle: Arc::new(AtomicUsize::new(0)),
            idle_timeout,
        }
    }

    /// Queues `copy` and starts a lane if more copies wait than lanes do.
    fn carry(&self, copy: Copy, connector: &Arc<Connector>) {
        // Unbounded, but never long: every queued copy holds a `max_requests` permit. The
        // send cannot fail: `self.rx` keeps the channel open.
        let _ = self.tx.try_send(copy);
        // After the send, so that a lane giving up at this moment either sees the copy or
        // is no longer counted idle (see `lane`).
        if self.tx.len() > self.idle.load(Ordering::SeqCst) {
            self.idle.fetch_add(1, Ordering::SeqCst);
            let lane = lane(
                self.rx.clone(),
                self.idle.clone(),
                connector.clone(),
                self.idle_timeout,
            );
            // Boxed: the lane's future (Pingora's connector inside) is many kilobytes, and
            // tokio would otherwise move all of it into the task.
            tokio::spawn(Box::pin(lane));
        }
    }
}

/// A lane's connection, kept for the next copy, and the endpoint it leads to.
struct Held {
    peer: HttpPeer,
    session: HttpSession,
}

/// Carries copies until none comes for `idle_timeout` or the service is gone. Starts counted
/// idle.
async fn lane(
    rx: async_channel::Receiver<Copy>,
    idle: Arc<AtomicUsize>,
    connector: Arc<Connector>,
    idle_timeout: Duration,
) {
    let mut held = None;
    loop {
        let next = tokio::time::timeout(idle_timeout, rx.recv()).await;
        idle.fetch_sub(1, Ordering::SeqCst);
        match next {
            Ok(Ok(copy)) => {
                let service = copy.service.clone();
                let outcome =
                    tokio::time::timeout(MIRROR_TIMEOUT, copy.send(&connector, &mut held))
                        .await
                        .unwrap_or_else(|_| {
                            held = None;
                            Outcome::Failure
                        });
                count(&service.config.name, outcome);
            }
            Ok(Err(_closed)) => return,
            // Idle: end, unless a copy came just now (`Lanes::carry` counted this lane idle).
            Err(_timeout) if rx.is_empty() => return,
            Err(_timeout) => {}
        }
        idle.fetch_add(1, Ordering::SeqCst);
    }
}

impl Copy {
    async fn send(self, connector: &Connector, held: &mut Option<Held>) -> Outcome {
        let Copy {
            service,
            mut header,
            key,
            body,
            max_body,
            _permit,
        } = self;
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
        // The lane's connection if it leads to this endpoint; else back to the pool with it.
        let (peer, kept) = match held.take() {
            Some(h) if h.peer._address.as_inet() == Some(&endpoint.addr) => {
                (h.peer, Some(h.session))
            }
            other => {
                if let Some(h) = other {
                    let idle = Some(pool.idle_timeout);
                    connector
                        .release_http_session(h.session, &h.peer, idle)
                        .await;
                }
                let mut peer = HttpPeer::new(endpoint.addr, false, String::new());
                peer.options.connection_timeout = Some(pool.connect_timeout);
                (peer, None)
            }
        };
        let result = match kept {
            Some(session) => {
                // The shadow may have closed the kept connection meanwhile: then the copy
                // fails before the shadow saw it, and goes once more on a new connection.
                let again = header.clone();
                match exchange(session, header, &body, &peer).await {
                    Err(e)
                        if matches!(e.retry, RetryType::ReusedOnly | RetryType::Decided(true)) =>
                    {
                        new_exchange(connector, again, &body, &peer).await
                    }
                    done => done,
                }
            }
            None => new_exchange(connector, header, &body, &peer).await,
        };
        match result {
            Ok((status, next)) => {
                *held = next.map(|session| Held { peer, session });
                if status < 500 {
                    Outcome::Success
                } else {
                    Outcome::Failure
                }
            }
            Err(_) => Outcome::Failure,
        }
    }
}

/// One exchange on `session`: the answer's status and the connection, if it can carry another.
async fn exchange(
    mut session: HttpSession,
    header: RequestHeader,
    body: &Bytes,
    peer: &HttpPeer,
) -> pingora_error::Result<(u16, Option<HttpSession>)> {
    let status = crate::client::exchange_on(&mut session, header, body.clone()).await?;
    session.respect_keepalive();
    let next = session.reuse().await;
    Ok((
        status,
        next.map(|stream| HttpSession::new_with_options(stream, peer)),
    ))
}

/// An exchange on a connection from the pool (which holds connections lanes gave back), or
/// a new one.
async fn new_exchange(
    connector: &Connector,
    header: RequestHeader,
    body: &Bytes,
    peer: &HttpPeer,
) -> pingora_error::Result<(u16, Option<HttpSession>)> {
    let (session, _reused) = connector.get_http_session(peer).await?;
    exchange(session, header, body, peer).await
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
