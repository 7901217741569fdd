//! A listener's idle timeout: it closes a client connection that has had no request in flight
//! for `idle_timeout`.
//!
//! Pingora's HTTP/1 server has no such timeout: after a first request it waits for the next
//! one without a limit (it sets an HTTP/1.1 connection's keep-alive to "infinite"), and its
//! other timeouts are per read. So the proxy's hooks mark when a request starts and ends, and
//! one timer per connection, not per request, looks at the marks when it rings.
//!
//! Every wake of a connection's task polls this wrapper, so it costs next to nothing per poll:
//! the connection's mark sits in a plain thread-local while its task runs, and the timer is
//! polled only once it has rang (tokio's `Sleep` registers its waker again at every poll).

use std::cell::Cell;
use std::future::{poll_fn, Future};
use std::pin::pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::task::{Context, Poll, Wake, Waker};
use std::time::{Duration, Instant};

use tracing::debug;

/// Whether a client connection has a request in flight.
#[derive(Clone, Copy)]
enum Mark {
    /// This thread is not polling a listener's connection task: HTTP/2 requests run in tasks
    /// of their own.
    Outside,
    /// A request is in flight, or the connection is HTTP/2, whose server times idle
    /// connections out itself (`h2_idle_timeout`).
    Busy,
    IdleSince(Instant),
}

thread_local! {
    /// The mark of the connection whose task this thread is polling. Polls of tasks do not
    /// nest, so one slot per thread is enough.
    static CURRENT: Cell<Mark> = const { Cell::new(Mark::Outside) };
}

/// A request's headers are in (the proxy's first hook): the connection is busy. A no-op
/// outside a listener's connection task.
pub(crate) fn request_started() {
    CURRENT.with(|mark| {
        if !matches!(mark.get(), Mark::Outside) {
            mark.set(Mark::Busy);
        }
    });
}

/// The request was done at `now` (the proxy's last hook): idle from then on.
pub(crate) fn request_done(now: Instant) {
    CURRENT.with(|mark| {
        if !matches!(mark.get(), Mark::Outside) {
            mark.set(Mark::IdleSince(now));
        }
    });
}

/// The connection speaks HTTP/2: its server times it out itself.
pub(crate) fn multiplexed() {
    request_started();
}

/// The connection is forwarded as bytes (`stream.rs`), which time out by their own
/// `idle_timeout`, counted from the last byte either way.
pub(crate) fn spliced() {
    request_started();
}

/// Runs `serve`, a client connection's whole life, until it ends or the connection has had no
/// request in flight for `idle`.
pub(crate) async fn serve_until_idle(serve: impl Future<Output = ()>, idle: Duration) {
    let mut serve = pin!(serve);
    let mut mark = Mark::IdleSince(Instant::now());
    let mut timer = pin!(tokio::time::sleep(idle));
    // It starts rung, so the first poll arms the timer with the alarm's waker.
    let alarm = Arc::new(Alarm {
        rang: AtomicBool::new(true),
        task: Mutex::new(None),
    });
    let alarm_waker = Waker::from(alarm.clone());
    let mut task: Option<Waker> = None;
    poll_fn(|cx| {
        if !task.as_ref().is_some_and(|t| t.will_wake(cx.waker())) {
            task = Some(cx.waker().clone());
            *alarm.task.lock().unwrap_or_else(PoisonError::into_inner) = task.clone();
        }
        CURRENT.set(mark);
        let served = serve.as_mut().poll(cx);
        mark = CURRENT.replace(Mark::Outside);
        if served.is_ready() {
            return Poll::Ready(());
        }
        if alarm.rang.load(Ordering::Acquire) {
            // Cleared before the timer is polled: a ring from here on is seen next time.
            alarm.rang.store(false, Ordering::Relaxed);
            while timer
                .as_mut()
                .poll(&mut Context::from_waker(&alarm_waker))
                .is_ready()
            {
                let since = match mark {
                    Mark::IdleSince(since) if since.elapsed() >= idle => {
                        debug!("closing a client connection idle for {idle:?}");
                        return Poll::Ready(());
                    }
                    Mark::IdleSince(since) => since,
                    Mark::Busy | Mark::Outside => Instant::now(),
                };
                timer
                    .as_mut()
                    .reset(tokio::time::Instant::from_std(since + idle));
            }
        }
        Poll::Pending
    })
    .await
}

/// The idle timer's waker: it notes that the timer rang and wakes the connection's task.
struct Alarm {
    rang: AtomicBool,
    task: Mutex<Option<Waker>>,
}

impl Wake for Alarm {
    fn wake(self: Arc<Self>) {
        self.wake_by_ref();
    }

    fn wake_by_ref(self: &Arc<Self>) {
        self.rang.store(true, Ordering::Release);
        if let Some(task) = &*self.task.lock().unwrap_or_else(PoisonError::into_inner) {
            task.wake_by_ref();
        }
    }
}
