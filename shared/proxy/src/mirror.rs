//! Traffic mirroring: a fire-and-forget copy of a request to another service.
//!
//! Pingora has no mirroring (its issue #266), so copies travel on tasks of their own, on
//! connections from Pingora's transport connector: the service's *lanes*. A lane is a
//! long-lived task that keeps one connection and carries copies on it, so a copy costs no
//! task, pool lookup or idle-connection watch of its own. A copy that finds no lane with room
//! starts one, so copies run as concurrently as they arrive, up to the service's
//! `max_requests`; a lane ends after the pool's `idle_timeout` without copies, or once its
//! service has left the config.
//!
//! While the shadow answers fast, a lane writes the copies that wait (up to `MAX_BATCH`) in
//! one go and then reads their answers in order (HTTP/1.1 pipelining): one send and one read
//! for many copies, where the send, on loopback, also pays the shadow's TCP receive. A slow
//! shadow gets one copy at a time per lane, so one slow answer holds up no other copy.
//!
//! The request's body reaches the lane from `request_body_filter` through a bounded channel;
//! the lane buffers at most `max_body_bytes`, then sends the copy and reads and drops the
//! answer. Nothing here can hold up, fail or change the client's request: every send is a
//! `try_send`, and a copy that cannot keep up is dropped and counted.

use std::collections::VecDeque;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};
use pingora_core::connectors::TransportConnector;
use pingora_core::protocols::http::v1::client::http_req_header_to_wire;
use pingora_core::protocols::Stream;
use pingora_http::RequestHeader;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::mpsc;
use weir_config::{ConnectionPool, Mirror, UpstreamProtocol};
use weir_resilience::{Active, Permit};

use crate::pipeline::Answer;
use crate::proxy;
use crate::snapshot::ServiceState;
use crate::tls::{upstream_peer, UpstreamPeerTls};

/// How long a copy may take, connect to last byte of the answer; then it is abandoned.
/// Envoy's default route timeout.
const MIRROR_TIMEOUT: Duration = Duration::from_secs(15);
/// Body chunks waiting for the lane; a copy whose lane falls this far behind is dropped.
const CHANNEL_CHUNKS: usize = 16;
/// Most copies a lane writes at once, before the first answer (HTTP/1.1 pipelining).
const MAX_BATCH: usize = 16;
/// A shadow that answers a batch slower than this per copy gets one copy at a time. Generous:
/// the time also holds the gateway's own queueing under load, a few milliseconds.
const FAST: Duration = Duration::from_millis(100);

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

/// `service`'s mirror series, each at 0 until its first copy.
pub(crate) fn start_counters(service: &str) {
    use Outcome::*;
    for outcome in [Success, Failure, Dropped, TooLarge] {
        let metrics = weir_telemetry::metrics();
        metrics
            .mirror_requests
            .with_label_values(&[service, outcome.label()]);
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
    connector: &Arc<TransportConnector>,
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
    // An HTTP/2 client names the host in the URI (:authority), not in Host; the copy is
    // HTTP/1.1, with Host and a path.
    if let Some(authority) = header.uri.authority().map(|a| a.to_string()) {
        if !header.headers.contains_key("host") {
            let _ = header.insert_header("host", authority);
        }
        let path = header.uri.path_and_query().map_or("/", |p| p.as_str());
        if let Ok(uri) = http::Uri::try_from(path) {
            header.set_uri(uri);
        }
    }
    let Some(endpoint) = service.balancer.pick(key.as_deref(), None) else {
        count(name, Outcome::Failure);
        return None;
    };
    // Envoy's convention: the copy's Host names the shadow, so the mirror can tell copies
    // from real traffic. An HTTP/1.0 request may have none: the endpoint's address stands
    // in, as for the primary.
    let host = match header.headers.get("host").and_then(|h| h.to_str().ok()) {
        Some(h) => match h.rsplit_once(':') {
            Some((name, port)) if port.bytes().all(|b| b.is_ascii_digit()) => {
                format!("{name}-shadow:{port}")
            }
            _ => format!("{h}-shadow"),
        },
        None => endpoint.addr.to_string(),
    };
    // Always a valid value: built from a valid one plus ASCII, or an address.
    let _ = header.insert_header("host", host);
    // The copy is the request as it goes to the primary, whose hop-by-hop headers Pingora
    // drops: a copy that kept `Upgrade` could tie its lane up in a tunnel.
    let _ = proxy::edit_request(&mut header, |parts| {
        proxy::strip_hop_by_hop(&mut parts.headers, &proxy::REQUEST_HOP_BY_HOP);
        Ok(())
    });
    // A copy goes out as HTTP/1.1 whatever the client spoke, so its connection is kept.
    header.set_version(http::Version::HTTP_11);
    let (body, tx) = if body_empty {
        (None, None)
    } else {
        let (tx, rx) = mpsc::channel(CHANNEL_CHUNKS);
        (Some(rx), Some(tx))
    };
    let copy = Copy {
        service: service.clone(),
        header,
        addr: endpoint.addr,
        _active: endpoint.begin(),
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
    /// Where it goes.
    addr: SocketAddr,
    /// Counts the copy active on its endpoint, from now on.
    _active: Active,
    /// The body still to come; `None` when there is none.
    body: Option<mpsc::Receiver<Chunk>>,
    max_body: usize,
    /// Holds a place under the service's `max_requests` until the copy is done, which also
    /// bounds the copies waiting for a lane.
    _permit: Permit,
}

impl Copy {
    fn done(self, outcome: Outcome) {
        count(&self.service.config.name, outcome);
    }
}

/// The lanes of one service, for the copies mirrored to it.
pub struct Lanes {
    tx: async_channel::Sender<Copy>,
    shared: Arc<Shared>,
}

/// What a service's lanes share.
struct Shared {
    /// The channel closes when the service, and so `Lanes::tx`, goes.
    rx: async_channel::Receiver<Copy>,
    /// Lanes waiting for a copy, counting those spawned and not yet running.
    idle: AtomicUsize,
    /// Copies a lane sends at once: `MAX_BATCH` while the shadow answers fast, else 1.
    batch: AtomicUsize,
    /// How long a lane waits for a copy before it ends (the pool's `idle_timeout`).
    idle_timeout: Duration,
    connect_timeout: Duration,
    /// The shadow service's TLS, if it has any.
    tls: Option<Arc<UpstreamPeerTls>>,
}

impl Lanes {
    pub fn new(pool: &ConnectionPool, tls: Option<Arc<UpstreamPeerTls>>) -> Lanes {
        let (tx, rx) = async_channel::unbounded();
        let shared = Shared {
            rx,
            idle: AtomicUsize::new(0),
            batch: AtomicUsize::new(1),
            idle_timeout: pool.idle_timeout,
            connect_timeout: pool.connect_timeout,
            tls,
        };
        Lanes {
            tx,
            shared: Arc::new(shared),
        }
    }

    /// Queues `copy`, and starts a lane if the idle ones cannot take all that waits.
    fn carry(&self, copy: Copy, connector: &Arc<TransportConnector>) {
        // Unbounded, but never long: every queued copy holds a `max_requests` permit. The
        // send cannot fail: `Shared::rx` keeps the channel open.
        let _ = self.tx.try_send(copy);
        // After the send, so that a lane giving up at this moment either sees the copy or
        // is no longer counted idle (see `lane`).
        let shared = &self.shared;
        let room = shared.idle.load(Ordering::SeqCst) * shared.batch.load(Ordering::Relaxed);
        if self.tx.len() > room {
            shared.idle.fetch_add(1, Ordering::SeqCst);
            // Boxed: tokio would otherwise move the whole future into the task.
            tokio::spawn(Box::pin(lane(shared.clone(), connector.clone())));
        }
    }
}

/// A lane's connection.
struct Conn {
    addr: SocketAddr,
    stream: Stream,
    /// Bytes read past the last answer.
    buf: BytesMut,
}

/// Carries copies until none comes for `idle_timeout` or the service is gone. Starts counted
/// idle.
async fn lane(shared: Arc<Shared>, connector: Arc<TransportConnector>) {
    let mut conn = None;
    // Copies taken from the queue and not sent yet.
    let mut taken = VecDeque::new();
    loop {
        if taken.is_empty() {
            let next = tokio::time::timeout(shared.idle_timeout, shared.rx.recv()).await;
            shared.idle.fetch_sub(1, Ordering::SeqCst);
            match next {
                Ok(Ok(copy)) => taken.push_back(copy),
                Ok(Err(_closed)) => return,
                // Idle: end, unless a copy came just now (`Lanes::carry` counted this lane).
                Err(_idle) if shared.rx.is_empty() => return,
                Err(_idle) => {}
            }
        }
        let max = shared.batch.load(Ordering::Relaxed);
        while taken.len() < max {
            match shared.rx.try_recv() {
                Ok(copy) => taken.push_back(copy),
                Err(_) => break,
            }
        }
        // A batch: the first copy, and those after it to the same endpoint.
        if let Some(first) = taken.front() {
            let addr = first.addr;
            let (batch, others): (Vec<_>, Vec<_>) = taken.drain(..).partition(|c| c.addr == addr);
            taken = others.into();
            let started = Instant::now();
            let sent = send_batch(&shared, &connector, &mut conn, addr, batch).await;
            // Pipelined answers come in order, so one slow answer holds up the rest of its
            // batch: batches only while the shadow is fast, and keeps its connections.
            let fast = started.elapsed() < FAST * sent.max(1) as u32;
            let batch = if fast && conn.is_some() { MAX_BATCH } else { 1 };
            shared.batch.store(batch, Ordering::Relaxed);
        }
        if taken.is_empty() {
            shared.idle.fetch_add(1, Ordering::SeqCst);
        }
    }
}

/// Sends `batch`, all to `addr`, as one write on the lane's connection, and reads the
/// answers; counts every copy. Returns how many were sent.
async fn send_batch(
    shared: &Shared,
    connector: &TransportConnector,
    conn: &mut Option<Conn>,
    addr: SocketAddr,
    batch: Vec<Copy>,
) -> usize {
    let mut wire = BytesMut::new();
    let mut sent = Vec::with_capacity(batch.len());
    // Where each sent copy starts in `wire`.
    let mut starts = Vec::with_capacity(batch.len());
    for mut copy in batch {
        let start = wire.len();
        let body = match copy.body.take() {
            None => Bytes::new(),
            Some(rx) => match collect(rx, copy.max_body).await {
                Ok(body) => {
                    let _ = copy
                        .header
                        .insert_header("content-length", body.len().to_string());
                    body
                }
                Err(outcome) => {
                    copy.done(outcome);
                    continue;
                }
            },
        };
        if !put_request(&mut wire, &copy.header, &body) {
            copy.done(Outcome::Failure);
            continue;
        }
        starts.push(start);
        sent.push(copy);
    }
    let n = sent.len();
    let mut answered = 0;
    let deadline = tokio::time::Instant::now() + MIRROR_TIMEOUT;
    while answered < n {
        let rest = &sent[answered..];
        let mut done = 0;
        let exchange = exchange(
            shared,
            connector,
            conn,
            addr,
            &wire[starts[answered]..],
            rest,
            &mut done,
        );
        let resend = tokio::time::timeout_at(deadline, exchange).await;
        answered += done;
        match resend {
            // The shadow closed the connection after an answer: it processed none of the
            // copies after it (RFC 9112 §9.6), so they go again on a new connection.
            Ok(Resend::Rest) => {}
            Ok(Resend::No) => break,
            Err(_timeout) => {
                *conn = None;
                break;
            }
        }
    }
    // Whatever did not get an answer failed.
    for copy in sent.drain(answered..) {
        copy.done(Outcome::Failure);
    }
    n
}

/// Whether the copies `exchange` left unanswered are to be sent again.
enum Resend {
    Rest,
    No,
}

/// Writes `wire` and reads an answer per copy in `sent`, counting each as it comes
/// (`answered` of them). A kept connection the shadow closed meanwhile fails before any
/// answer: then copies of idempotent requests go once more on a new connection.
async fn exchange(
    shared: &Shared,
    connector: &TransportConnector,
    conn: &mut Option<Conn>,
    addr: SocketAddr,
    wire: &[u8],
    sent: &[Copy],
    answered: &mut usize,
) -> Resend {
    let mut kept = conn.take().filter(|c| c.addr == addr);
    if let Some(c) = &mut kept {
        if !still_open(c).await {
            kept = None;
        }
    }
    let fresh_try = kept.is_none();
    let mut c = match kept {
        Some(c) => c,
        None => match connect(shared, connector, addr).await {
            Some(c) => c,
            None => return Resend::No,
        },
    };
    let mut first = write_and_read_first(&mut c, wire, sent).await;
    // No answer may also be a shadow that acted and then died: sent again only when that
    // would be harmless (RFC 9110 §9.2.2), as Pingora and Envoy repeat a request.
    let repeatable = sent.iter().all(|copy| copy.header.method.is_idempotent());
    if first == Err(Failed::Unseen) && !fresh_try && repeatable {
        c = match connect(shared, connector, addr).await {
            Some(c) => c,
            None => return Resend::No,
        };
        first = write_and_read_first(&mut c, wire, sent).await;
    }
    let Ok(mut answer) = first else {
        return Resend::No;
    };
    loop {
        let outcome = if answer.status < 500 {
            Outcome::Success
        } else {
            Outcome::Failure
        };
        count(&sent[*answered].service.config.name, outcome);
        *answered += 1;
        if *answered == sent.len() {
            // Kept for the next batch, unless the shadow closes it or sent more than asked.
            if !answer.close && c.buf.is_empty() {
                *conn = Some(c);
            }
            return Resend::No;
        }
        if answer.close {
            return Resend::Rest;
        }
        let head = sent[*answered].header.method == http::Method::HEAD;
        answer = match crate::pipeline::read_answer(&mut c.stream, &mut c.buf, head).await {
            Ok(a) => a,
            Err(_) => return Resend::No,
        };
    }
}

/// Whether a kept connection is still good for copies: the shadow has neither closed it (its
/// keep-alive ran out) nor sent anything unasked. Checked before writing, so that copies of
/// POSTs, which are not sent twice, seldom meet a closed connection.
async fn still_open(c: &mut Conn) -> bool {
    tokio::select! {
        biased;
        _ = c.stream.read_buf(&mut c.buf) => false,
        () = std::future::ready(()) => true,
    }
}

/// The first answer failed; `Unseen`: before the shadow sent a byte back (most often a kept
/// connection it had closed, though it may have acted on the copies).
#[derive(PartialEq)]
enum Failed {
    Unseen,
    Seen,
}

async fn write_and_read_first(c: &mut Conn, wire: &[u8], sent: &[Copy]) -> Result<Answer, Failed> {
    c.stream.write_all(wire).await.map_err(|_| Failed::Unseen)?;
    c.stream.flush().await.map_err(|_| Failed::Unseen)?;
    c.buf.reserve(4096);
    match c.stream.read_buf(&mut c.buf).await {
        Ok(0) | Err(_) => return Err(Failed::Unseen),
        Ok(_) => {}
    }
    let head = sent[0].header.method == http::Method::HEAD;
    crate::pipeline::read_answer(&mut c.stream, &mut c.buf, head)
        .await
        .map_err(|_| Failed::Seen)
}

async fn connect(
    shared: &Shared,
    connector: &TransportConnector,
    addr: SocketAddr,
) -> Option<Conn> {
    // Validation keeps mirrors off HTTP/2 services: copies are written as HTTP/1.1.
    let mut peer = upstream_peer(shared.tls.as_deref(), UpstreamProtocol::Http1, addr);
    peer.options.connection_timeout = Some(shared.connect_timeout);
    let stream = connector.new_stream(&peer).await.ok()?;
    if let Some(tls) = &shared.tls {
        let ssl = stream.get_ssl_digest();
        tls.check_identity(addr, ssl.as_deref()).await.ok()?;
    }
    Some(Conn {
        addr,
        stream,
        buf: BytesMut::new(),
    })
}

/// Appends a copy to the batch's bytes; `false` when its target cannot go on the wire.
fn put_request(wire: &mut BytesMut, header: &RequestHeader, body: &[u8]) -> bool {
    match http_req_header_to_wire(header) {
        Some(head) => {
            wire.extend_from_slice(&head);
            wire.extend_from_slice(body);
            true
        }
        None => false,
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
