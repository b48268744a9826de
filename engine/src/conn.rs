//! Per-connection guards, kept out of the per-request path.
//!
//! [`HeadGuard`] bounds the time a connection may take to send a request head, counted from the
//! moment it starts waiting for one: a new connection, or a keep-alive connection whose chain
//! has answered (the answer's write counts in that time, so a client that stops reading its
//! answer is cut too). Slow headers (slowloris) and idle keep-alive connections are both cut at
//! `header_read_timeout_secs`. hyper's own `header_read_timeout` does the same but allocates,
//! registers and cancels a timer for every request; here each connection owns one timer, and a
//! request only moves its deadline later, which tokio does without touching the timer wheel
//! (unless the previous deadline already fired, after a request longer than the timeout).
//! While a request is being served (its body read, its chain run) the guard is off: the request
//! timeout bounds that part.
//!
//! [`until_drained`] asks a connection to finish gracefully once the listener shuts down,
//! looking at the shutdown signal with one atomic load per poll instead of polling a watch
//! future on every wake-up.

use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};
use std::task::{Context, Poll};
use std::time::Duration;

use hyper::rt::{Read, ReadBufCursor, Write};
use tokio::sync::watch;
use tokio::time::{Instant, Sleep};

/// Which phase a connection is in, shared by its I/O and its service: odd while a request is
/// served (from its head to its chain's answer), even otherwise (writing the answer, waiting
/// for the next head). Incremented at both edges, so each wait has a
/// number of its own and the guard knows when to start a new deadline.
#[derive(Default)]
pub struct Phase(AtomicU32);

impl Phase {
    /// A request head arrived and its service started.
    pub fn request_started(&self) {
        self.0.fetch_add(1, Ordering::Relaxed);
    }

    /// The service answered: the connection waits for its next head.
    pub fn request_done(&self) {
        self.0.fetch_add(1, Ordering::Relaxed);
    }

    fn current(&self) -> u32 {
        self.0.load(Ordering::Relaxed)
    }
}

/// Calls [`Phase::request_done`] when the service's future ends, also when it is dropped
/// before answering.
pub struct Served(pub Arc<Phase>);

impl Drop for Served {
    fn drop(&mut self) {
        self.0.request_done();
    }
}

/// I/O that fails a read with `TimedOut` once a request head has been awaited longer than the
/// timeout. hyper then closes the connection.
pub struct HeadGuard<T> {
    io: T,
    phase: Arc<Phase>,
    timeout: Duration,
    timer: Pin<Box<Sleep>>,
    /// The phase the timer's deadline belongs to.
    armed_for: Option<u32>,
}

impl<T> HeadGuard<T> {
    pub fn new(io: T, phase: Arc<Phase>, timeout: Duration) -> Self {
        HeadGuard {
            io,
            phase,
            timeout,
            timer: Box::pin(tokio::time::sleep(timeout)),
            armed_for: None,
        }
    }
}

impl<T> HeadGuard<T> {
    /// Ready once the connection has waited for a request head longer than the timeout. The
    /// first call of a wait starts its deadline and registers the task with the timer; the
    /// answer's write is such a call, because hyper may not read again before it is woken.
    fn head_overdue(&mut self, cx: &mut Context<'_>) -> Poll<()> {
        let phase = self.phase.current();
        if phase % 2 == 1 {
            // A request is being served; the request timeout covers its body.
            return Poll::Pending;
        }
        if self.armed_for != Some(phase) {
            self.armed_for = Some(phase);
            self.timer.as_mut().reset(Instant::now() + self.timeout);
        }
        // Polled every time, not only when armed: a poll can be refused by tokio's cooperative
        // budget before it registers the task, and the timer must always have a waker.
        self.timer.as_mut().poll(cx)
    }
}

impl<T: Read + Unpin> Read for HeadGuard<T> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: ReadBufCursor<'_>,
    ) -> Poll<io::Result<()>> {
        let this = &mut *self;
        let read = Pin::new(&mut this.io).poll_read(cx, buf);
        if read.is_ready() {
            return read;
        }
        match this.head_overdue(cx) {
            Poll::Ready(()) => Poll::Ready(Err(io::Error::new(
                io::ErrorKind::TimedOut,
                "no request head within the header read timeout",
            ))),
            Poll::Pending => Poll::Pending,
        }
    }
}

impl<T: Write + Unpin> Write for HeadGuard<T> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let _ = self.head_overdue(cx);
        Pin::new(&mut self.io).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_shutdown(cx)
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let _ = self.head_overdue(cx);
        Pin::new(&mut self.io).poll_write_vectored(cx, bufs)
    }
}

/// Runs a connection future until it ends, calling `graceful` on it once `shutdown` changes (or
/// its sender is gone). The first poll registers the task for the signal; later polls only read
/// its version.
pub async fn until_drained<F: Future>(
    conn: F,
    shutdown: watch::Receiver<bool>,
    graceful: impl Fn(Pin<&mut F>),
) -> F::Output {
    let mut conn = std::pin::pin!(conn);
    let mut signal_rx = shutdown.clone();
    // Unconstrained: polled once, this poll must never be refused by tokio's cooperative
    // budget, or the task would not be registered for the signal.
    let mut signal = std::pin::pin!(tokio::task::unconstrained(signal_rx.changed()));
    let mut registered = false;
    let mut draining = false;
    std::future::poll_fn(|cx| {
        if !draining {
            let stop = if registered {
                shutdown.has_changed().unwrap_or(true)
            } else {
                registered = true;
                signal.as_mut().poll(cx).is_ready()
            };
            if stop {
                draining = true;
                graceful(conn.as_mut());
            }
        }
        conn.as_mut().poll(cx)
    })
    .await
}
