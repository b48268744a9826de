//! Per-connection guards, kept out of the per-request path.
//!
//! [`HeadGuard`] bounds the time a connection may take to send a request head, counted from the
//! moment it starts waiting for one: a new connection, or a keep-alive connection whose chain
//! has answered (the answer's write counts in that time, so a client that stops reading its
//! answer is cut too, a blocked write failing like a read). Slow headers (slowloris) and idle
//! keep-alive connections are both cut between `header_read_timeout_secs` and about a quarter
//! more (a tick is re-armed from when it ran, so a late wake-up delays the cut a little but
//! never counts twice). While a request is being served (its body read, its chain run) the
//! guard is off: the request timeout bounds that part.
//!
//! hyper's own `header_read_timeout` arms, registers and cancels a timer for every request;
//! moving one timer's deadline per request still reads the clock and updates the timer each
//! time. Here the clock is not read per request at all: each connection owns one timer that
//! ticks every quarter of the timeout, and a tick cuts the connection when it has been waiting
//! for the same head since [`TICKS`] ticks before. Requests only bump the [`Phase`] counter
//! the ticks compare. The price: every open connection is woken [`TICKS`] times per timeout
//! (at the defaults, 10,000 connections and 10 s, up to 4,000 wake-ups a second in all), where
//! the old guard's one deadline fired only for a connection that was really cut.
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
/// for the next head). Incremented at both edges, so each wait has a number of its own and
/// the guard's ticks see when one started.
///
/// Everything that touches it runs in its connection's task (hyper calls the service and
/// drops its future there, and polls the guard's I/O there), so there is one writer at a
/// time and a step is a load and a store: no locked instruction per request edge.
#[derive(Default)]
pub struct Phase(AtomicU32);

impl Phase {
    /// A request head arrived and its service started.
    pub fn request_started(&self) {
        self.step();
    }

    /// The service answered: the connection waits for its next head.
    pub fn request_done(&self) {
        self.step();
    }

    fn step(&self) {
        self.0.store(
            self.0.load(Ordering::Relaxed).wrapping_add(1),
            Ordering::Relaxed,
        );
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

/// Ticks per timeout: a connection waiting for a head is cut after `TICKS` ticks with no
/// request, i.e. between the timeout and `(TICKS + 1) / TICKS` of it.
pub const TICKS: u32 = 4;

/// I/O that fails a read with `TimedOut` once a request head has been awaited longer than the
/// timeout. hyper then closes the connection.
pub struct HeadGuard<T> {
    io: T,
    phase: Arc<Phase>,
    tick: Duration,
    timer: Pin<Box<Sleep>>,
    /// The phase the last tick saw, and how many ticks in a row have seen it while waiting.
    seen: u32,
    quiet: u32,
    /// The timer has been polled since its deadline was set, so it holds this task's waker.
    registered: bool,
}

impl<T> HeadGuard<T> {
    pub fn new(io: T, phase: Arc<Phase>, timeout: Duration) -> Self {
        let tick = (timeout / TICKS).max(Duration::from_millis(1));
        HeadGuard {
            io,
            seen: phase.current(),
            phase,
            tick,
            timer: Box::pin(tokio::time::sleep(tick)),
            quiet: 0,
            registered: false,
        }
    }

    /// Ready once the connection has waited for the same request head through [`TICKS`]
    /// ticks. Between ticks this is one check of the timer's state, no clock read.
    fn head_overdue(&mut self, cx: &mut Context<'_>) -> Poll<()> {
        loop {
            if self.registered && !self.timer.is_elapsed() {
                return Poll::Pending;
            }
            // Unconstrained: tokio's cooperative budget must never refuse this poll, or the
            // timer would be left without a waker and the connection never cut.
            let fired = Pin::new(&mut tokio::task::unconstrained(self.timer.as_mut()))
                .poll(cx)
                .is_ready();
            if !fired {
                self.registered = true;
                return Poll::Pending;
            }
            let phase = self.phase.current();
            if phase.is_multiple_of(2) && phase == self.seen {
                self.quiet = self.quiet.saturating_add(1);
                if self.quiet >= TICKS {
                    return Poll::Ready(());
                }
            } else {
                // A request started or ended since the last tick (or one is being served,
                // which the request timeout covers): the wait starts over.
                self.seen = phase;
                self.quiet = 0;
            }
            self.timer.as_mut().reset(Instant::now() + self.tick);
            self.registered = false;
        }
    }
}

/// Why a blocked write of an answer fails: the client has not read it for the timeout (a
/// client that pipelines requests and stops reading would otherwise hold its connection, since
/// hyper does not read while its write buffer is full).
const UNREAD: &str = "the answer was not read within the header read timeout";

impl<T> HeadGuard<T> {
    /// `TimedOut` once the head (or the answer's reading) is overdue; the I/O itself is pending.
    fn cut_if_overdue<R>(&mut self, cx: &mut Context<'_>, why: &str) -> Poll<io::Result<R>> {
        match self.head_overdue(cx) {
            Poll::Ready(()) => Poll::Ready(Err(io::Error::new(io::ErrorKind::TimedOut, why))),
            Poll::Pending => Poll::Pending,
        }
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
        this.cut_if_overdue(cx, "no request head within the header read timeout")
    }
}

impl<T: Write + Unpin> Write for HeadGuard<T> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = &mut *self;
        let written = Pin::new(&mut this.io).poll_write(cx, buf);
        if written.is_ready() {
            return written;
        }
        this.cut_if_overdue(cx, UNREAD)
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
        let this = &mut *self;
        let written = Pin::new(&mut this.io).poll_write_vectored(cx, bufs);
        if written.is_ready() {
            return written;
        }
        this.cut_if_overdue(cx, UNREAD)
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

#[cfg(test)]
mod tests {
    use super::*;
    use hyper_util::rt::TokioIo;

    /// Runs guarded I/O that only the guard can end, and returns how long it took the guard to
    /// cut it with `TimedOut`.
    async fn cut_after<T: std::fmt::Debug>(io: impl Future<Output = io::Result<T>>) -> Duration {
        let started = Instant::now();
        // A guard that lost its timer's waker would hang here: fail instead.
        let result = tokio::time::timeout(Duration::from_secs(600), io)
            .await
            .expect("the guard never woke up to cut the connection");
        let e = result.expect_err("the peer does nothing: only the guard ends the I/O");
        assert_eq!(e.kind(), io::ErrorKind::TimedOut);
        started.elapsed()
    }

    /// Reads from a guarded stream whose peer never writes, until the guard cuts it.
    async fn time_to_cut(guard: &mut HeadGuard<TokioIo<tokio::io::DuplexStream>>) -> Duration {
        let mut bytes = [std::mem::MaybeUninit::<u8>::uninit(); 16];
        cut_after(std::future::poll_fn(|cx| {
            let mut buf = hyper::rt::ReadBuf::uninit(&mut bytes);
            Pin::new(&mut *guard).poll_read(cx, buf.unfilled())
        }))
        .await
    }

    /// A wait that the guard cut within its bounds: the timeout, and a tick more at most.
    fn assert_cut_in_time(waited: Duration, timeout: Duration) {
        assert!(
            waited >= timeout && waited <= timeout + timeout / TICKS,
            "cut after {waited:?} of waiting, timeout {timeout:?}"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_silent_connection_is_cut_between_the_timeout_and_a_quarter_more() {
        let (_peer, io) = tokio::io::duplex(64);
        let timeout = Duration::from_secs(8);
        let mut guard = HeadGuard::new(TokioIo::new(io), Arc::new(Phase::default()), timeout);
        assert_cut_in_time(time_to_cut(&mut guard).await, timeout);
    }

    #[tokio::test(start_paused = true)]
    async fn an_answer_the_client_does_not_read_is_cut_like_a_silent_head() {
        // The peer never reads: once the pipe's 64 bytes are full, the write blocks.
        let (_peer, io) = tokio::io::duplex(64);
        let timeout = Duration::from_secs(8);
        let phase = Arc::new(Phase::default());
        let mut guard = HeadGuard::new(TokioIo::new(io), phase.clone(), timeout);
        phase.request_started();
        phase.request_done();
        let answer = [b'x'; 1024];
        let mut sent = 0;
        let took = cut_after(std::future::poll_fn(|cx| {
            loop {
                match Pin::new(&mut guard).poll_write(cx, &answer[sent..]) {
                    Poll::Ready(Ok(n)) => sent += n,
                    other => return other,
                }
            }
        }))
        .await;
        assert_eq!(sent, 64, "what fitted was written");
        assert_cut_in_time(took, timeout);
    }

    #[tokio::test(start_paused = true)]
    async fn requests_restart_the_wait_and_a_served_request_is_never_cut() {
        let (_peer, io) = tokio::io::duplex(64);
        let timeout = Duration::from_secs(8);
        let phase = Arc::new(Phase::default());
        let mut guard = HeadGuard::new(TokioIo::new(io), phase.clone(), timeout);
        let activity = async {
            // A request every 5 s for 40 s (five timeouts), then one served for 20 s.
            for _ in 0..8 {
                tokio::time::sleep(Duration::from_secs(5)).await;
                phase.request_started();
                phase.request_done();
            }
            phase.request_started();
            tokio::time::sleep(Duration::from_secs(20)).await;
            phase.request_done();
            Instant::now()
        };
        let start = Instant::now();
        let (took, last) = tokio::join!(time_to_cut(&mut guard), activity);
        let since_last = (start + took) - last;
        assert!(
            took > Duration::from_secs(60),
            "cut while busy, after {took:?}"
        );
        assert_cut_in_time(since_last, timeout);
    }
}
