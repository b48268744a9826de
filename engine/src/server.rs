//! The hyper servers: the public listener that runs policies, and the admin listener
//! (`/healthz`, `/readyz`, `/metrics`, `POST /reload`), which is never served publicly.

use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::ops::Deref;
use std::panic::AssertUnwindSafe;
use std::pin::Pin;
use std::sync::Arc;
use std::task::Poll;
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use filters::{Exchange, Response, json_response};
use futures_util::FutureExt;
use futures_util::future::{BoxFuture, Either};
use http::{HeaderValue, Method, Request, StatusCode, header};
use http_body_util::{BodyExt, Full};
use hyper::body::{Body as _, Incoming};
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use monitoring::Outcome;
use monitoring::clock::{Mark, Span};
use tokio::net::TcpListener;
use tokio::sync::{Semaphore, watch};

use crate::State;
use crate::chain::{ClientLabels, Finished, Walk};
use crate::config::Limits;
use crate::conn;
use crate::runtime::{Policy, RouteMatch, Runtime};

pub type Body = Full<Bytes>;

fn to_hyper(r: Response) -> http::Response<Body> {
    r.map(Full::new)
}

fn error(status: StatusCode, code: &str, description: &str) -> Response {
    json_response(
        status,
        &serde_json::json!({"error": code, "error_description": description}),
    )
}

/// Which listener a [`serve`] loop runs: `gateway_connections_open` counts the public
/// listener's connections only (admin scrapes would otherwise show up as client traffic).
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Listener {
    Public,
    Admin,
}

/// The gateway's state as one connection holds it: a handle of the connection's own around the
/// shared `Arc<State>`.
///
/// A request that waits keeps its handle until it ends. Cloning this one writes a reference
/// count that only the worker running the connection writes, where cloning the `Arc<State>`
/// would write the state's own count, a cache line every worker writes on every such request
/// (the refresh grant is one: its body is read in a request future).
#[derive(Clone)]
#[expect(
    clippy::redundant_allocation,
    reason = "the outer allocation is the connection's own reference count"
)]
pub struct ConnectionState(Arc<Arc<State>>);

impl ConnectionState {
    fn new(state: &Arc<State>) -> Self {
        ConnectionState(Arc::new(state.clone()))
    }
}

impl Deref for ConnectionState {
    type Target = Arc<State>;

    fn deref(&self) -> &Arc<State> {
        &self.0
    }
}

/// Accepts connections until `shutdown` flips, then drains: connections stop keep-alive,
/// in-flight requests finish, and after `drain` whatever is left is dropped.
pub async fn serve<S>(
    listener: TcpListener,
    kind: Listener,
    limits: Limits,
    mut shutdown: watch::Receiver<bool>,
    state: Arc<State>,
    handler: S,
) where
    S: Fn(&ConnectionState, Request<Incoming>, SocketAddr) -> Answer
        + Clone
        + Send
        + Sync
        + 'static,
{
    // The durations' clock calibrates once, before the first request rather than in it.
    monitoring::clock::calibrate();
    // No hyper timer: its header read timeout arms a timer per request; `HeadGuard` keeps one
    // per connection that ticks four times per timeout (see conn.rs).
    let head_timeout = Duration::from_secs(limits.header_read_timeout_secs.max(1));
    let mut http = hyper::server::conn::http1::Builder::new();
    http.max_headers(limits.max_headers)
        .max_header_size(limits.max_header_bytes)
        .max_buf_size(limits.max_header_bytes.max(8192) + limits.max_body_bytes.max(8192))
        .keep_alive(limits.keep_alive)
        // Public listener: hyper does not watch for the client's EOF while a request is in
        // flight. A client that shuts its write side after its request still gets the answer,
        // and a request whose client went away runs to its end or to the request timeout,
        // keeping its connection slot until then. Watching costs a read attempt for every
        // request not answered at once, and for a request with a body a fresh 8 KiB read
        // buffer, because the request still holds the old one (≈ 650 instructions per refresh
        // grant). The admin listener has no request timeout, so it keeps hyper's default: an
        // abandoned admin request is dropped.
        .half_close(kind == Listener::Public);
    let counts_connections = kind == Listener::Public;
    let mut connections = tokio::task::JoinSet::new();
    let slots = Arc::new(Semaphore::new(limits.max_connections.max(1)));
    loop {
        let permit = tokio::select! {
            p = slots.clone().acquire_owned() => p.expect("semaphore never closed"),
            _ = shutdown.changed() => break,
        };
        let (stream, peer) = tokio::select! {
            r = listener.accept() => match r {
                Ok(x) => x,
                Err(e) => {
                    // EMFILE and friends: back off instead of spinning.
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
            _ = shutdown.changed() => break,
        };
        let _ = stream.set_nodelay(true);
        let state2 = ConnectionState::new(&state);
        let h = handler.clone();
        let phase = Arc::new(conn::Phase::default());
        let served = phase.clone();
        let svc = service_fn(move |req| {
            served.request_started();
            // Not an async block: that would move the handler's future once more per request.
            // The state by reference: a handler that answers at once touches no reference
            // count (an `Arc` clone per request is two locked instructions and, for a shared
            // count, a cache line every worker writes).
            match h(&state2, req, peer) {
                // Answered already: the connection waits for its next head from here.
                Either::Left(answer) => {
                    served.request_done();
                    Either::Left(std::future::ready(Ok::<_, Infallible>(answer.into_inner())))
                }
                Either::Right(later) => {
                    let done = conn::Served(served.clone());
                    Either::Right(later.map(move |response| {
                        drop(done);
                        Ok::<_, Infallible>(response)
                    }))
                }
            }
        });
        let io = conn::HeadGuard::new(TokioIo::new(stream), phase, head_timeout);
        let conn = http.serve_connection(io, svc);
        let mon = counts_connections.then(|| state.monitoring.clone());
        let stop = shutdown.clone();
        // Reap finished connections so the set stays the size of the open ones.
        while connections.try_join_next().is_some() {}
        connections.spawn(async move {
            // Decremented on drop, also when the task is cancelled at the end of the drain.
            let _open = mon.as_deref().map(monitoring::Monitoring::connection);
            let ended = conn::until_drained(conn, stop, |c| c.graceful_shutdown()).await;
            if let Err(e) = ended {
                tracing::debug!(error = %e, %peer, "connection ended with an error");
            }
            drop(permit);
        });
    }
    drop(listener);
    let drain = Duration::from_secs(limits.drain_timeout_secs);
    let all_done = async { while connections.join_next().await.is_some() {} };
    match tokio::time::timeout(drain, all_done).await {
        Ok(()) => tracing::debug!("all connections drained"),
        Err(_) => tracing::warn!(?drain, "drain time over; closing remaining connections"),
    }
    // Whatever is left is closed now (dropping the task drops its socket), so that nothing
    // keeps running behind a gateway that has stopped.
    connections.shutdown().await;
}

/// The public listener's handler: route, read the body within its limit, run the chain.
///
/// A request without a body whose chain never waits (a liveness answer, a chain of `set_*`
/// nodes, a bearer check over the memory store) is answered before this returns: no request future is built, boxed or moved. Any
/// other request goes on in one boxed future ([`answer_later`]).
pub fn public(state: &ConnectionState, req: Request<Incoming>, _peer: SocketAddr) -> Answer {
    // A guard, not a clone: no shared reference count is written, by a request that waits
    // either (it keeps this guard, see `later`).
    let runtime = state.runtime.load();
    let (parts, body) = req.into_parts();
    let index = match route(&runtime, &parts) {
        Ok(i) => i,
        Err(response) => return Either::Left(std::future::ready(to_hyper(*response))),
    };
    let started = Mark::now();
    if body.is_end_stream() {
        let policy = &runtime.policies[index];
        // Not counted in flight: it holds its worker for microseconds and never waits, so no
        // scrape could see it pending (and the gauge is a cache line both workers write).
        let mut ex = Exchange::new(parts, Bytes::new());
        let mut walk = Walk::new(policy, started);
        // The walk and its service contexts' recording, as in the waiting path.
        let run = std::panic::catch_unwind(AssertUnwindSafe(|| {
            let finished = walk.run_now(policy, &mut ex)?;
            Some(Ending::of_walk(
                state,
                policy,
                &ex,
                &mut walk,
                Ok(finished),
                started,
            ))
        }));
        let ending = match run {
            Ok(Some(ending)) => ending,
            Err(_) => Ending::of_walk(state, policy, &ex, &mut walk, Err(Broke::Panic), started),
            Ok(None) => {
                let start = Start::Resume(Box::new(ex), walk);
                return later(state, runtime, index, start, started);
            }
        };
        return Either::Left(std::future::ready(conclude(policy, ending)));
    }
    let start = Start::Read(Box::new(Exchange::new(parts, Bytes::new())), body);
    later(state, runtime, index, start, started)
}

/// The request goes on in its future ([`answer_later`]), which owns what it needs: its
/// connection's handle on the state, and the runtime's guard. The guard is not turned into an
/// `Arc` (a count every worker writes): it holds one of arc-swap's per-thread slots, freed when
/// the request ends, in its first poll for a request that never waits. A thread with all its
/// slots taken by waiting requests (SQL stores under load) loads the next runtime with a clone,
/// as this did before for every request.
fn later(
    state: &ConnectionState,
    runtime: arc_swap::Guard<Arc<Runtime>>,
    index: usize,
    start: Start,
    started: Mark,
) -> Answer {
    Either::Right(Box::pin(answer_later(
        state.clone(),
        runtime,
        index,
        start,
        started,
    )))
}

/// What [`public`] returns: the answer itself, or the future that will give it.
pub type Answer =
    Either<std::future::Ready<http::Response<Body>>, BoxFuture<'static, http::Response<Body>>>;

/// The policy serving this request, or the 404/405 to send.
fn route(runtime: &Runtime, parts: &http::request::Parts) -> Result<usize, Box<Response>> {
    // The host is looked up only when some route needs it.
    let host = if runtime.router.routes_by_host() {
        parts
            .uri
            .host()
            .or_else(|| {
                parts
                    .headers
                    .get(header::HOST)
                    .and_then(|h| h.to_str().ok())
            })
            .map(strip_port)
    } else {
        None
    };
    match runtime.router.find(host, parts.uri.path(), &parts.method) {
        RouteMatch::Policy(i) => Ok(i),
        RouteMatch::NotFound => Err(Box::new(error(
            StatusCode::NOT_FOUND,
            "not_found",
            "no policy serves this path",
        ))),
        RouteMatch::MethodNotAllowed(allowed) => {
            let mut r = error(
                StatusCode::METHOD_NOT_ALLOWED,
                "method_not_allowed",
                "this path does not accept this method",
            );
            let allow = allowed
                .iter()
                .map(Method::as_str)
                .collect::<Vec<_>>()
                .join(", ");
            if let Ok(v) = HeaderValue::from_str(&allow) {
                r.headers_mut().insert(header::ALLOW, v);
            }
            Err(Box::new(r))
        }
    }
}

/// Where [`answer_later`] starts: a body to read, or a walk stopped at a node that must wait.
/// The exchange is boxed so that the request's future stays small (an inline `Exchange` is
/// over 500 bytes, and a future over about 1 KiB is allocated off glibc's fast path).
enum Start {
    Read(Box<Exchange>, Incoming),
    Resume(Box<Exchange>, Walk),
}

/// The rest of a request that has a body to read or a node that waits, under the request
/// timeout.
async fn answer_later(
    state: ConnectionState,
    runtime: arc_swap::Guard<Arc<Runtime>>,
    index: usize,
    start: Start,
    started: Mark,
) -> http::Response<Body> {
    let policy = &runtime.policies[index];
    let limits = &runtime.settings.limits;
    let _in_flight = state.monitoring.in_flight();
    // Timed from the request's first wait (see `within`).
    let timeout = Duration::from_secs(limits.request_timeout_secs.max(1));
    let max_body = limits.max_body_bytes;
    // The exchange and the walk live out here, borrowed by the timed work, so that a request
    // that runs out of time still records the nodes and service contexts it went through. The
    // walk starts once the body is in: a deadline that fires before it is the client's delay
    // (408), after it ours (504). One timer per request covers both, and only a request that
    // waits has one.
    let (mut ex, mut walk, mut body) = match start {
        Start::Resume(ex, walk) => (ex, Some(walk), None),
        Start::Read(ex, body) => (ex, None, Some(body)),
    };
    let done = {
        let work = async {
            if let Some(body) = body.take() {
                ex.body = read_body(body, max_body)
                    .await
                    .map_err(|r| Ending::early(r, started))?;
            }
            let walk = walk.get_or_insert_with(|| Walk::new(policy, Mark::now()));
            // The walk and its service contexts' recording; a panic in either is a 500.
            let run = AssertUnwindSafe(async {
                let finished = walk.run(policy, &mut ex).await;
                Ending::of_walk(&state, policy, &ex, walk, Ok(finished), started)
            })
            .catch_unwind()
            .await;
            Ok(run.unwrap_or_else(|_| {
                Ending::of_walk(&state, policy, &ex, walk, Err(Broke::Panic), started)
            }))
        };
        // Pinned here, not moved into `within`: an `async fn`'s argument is kept beside the
        // local it becomes, and the request's future would carry the work's state twice.
        within(std::pin::pin!(work), timeout).await
    };
    let ending = match (done, &mut walk) {
        (Some(Ok(ending) | Err(ending)), _) => ending,
        (None, None) => Ending::early(
            closing(error(
                StatusCode::REQUEST_TIMEOUT,
                "invalid_request",
                "the request body did not arrive in time",
            )),
            started,
        ),
        (None, Some(walk)) => {
            Ending::of_walk(&state, policy, &ex, walk, Err(Broke::Timeout), started)
        }
    };
    conclude(policy, ending)
}

/// `work`'s output, or `None` once `timeout` has passed since `work` first waited.
///
/// The timer is made on the first poll that finds `work` waiting. A request answered in its
/// first poll (the refresh grant over the memory store) arms no timer, reads no clock and
/// clones no tokio handle (a reference count every worker writes, with `timeout_at`'s timer
/// made up front). The synchronous part before the first wait, microseconds of nodes, is not
/// timed: a timer cannot interrupt it anyway.
async fn within<F: Future>(mut work: Pin<&mut F>, timeout: Duration) -> Option<F::Output> {
    let mut timer = std::pin::pin!(None::<tokio::time::Sleep>);
    std::future::poll_fn(|cx| {
        if let Poll::Ready(out) = work.as_mut().poll(cx) {
            return Poll::Ready(Some(out));
        }
        if timer.is_none() {
            timer.set(Some(tokio::time::sleep(timeout)));
        }
        match timer.as_mut().as_pin_mut() {
            Some(t) => t.poll(cx).map(|()| None),
            None => Poll::Pending,
        }
    })
    .await
}

/// The request body, within `max_body` bytes; or the answer to send instead.
///
/// Read frame by frame rather than through `Limited` and `collect`: a body that arrives in one
/// frame (a form posted with its length, the usual token request) is that frame's `Bytes` as
/// it is, with no queue of frames allocated and freed per request. Only a body in several
/// frames (chunked, or split across reads) is copied into one buffer.
async fn read_body(mut body: Incoming, max_body: usize) -> Result<Bytes, Response> {
    // The declared Content-Length, which hyper keeps as the body's exact size.
    if body
        .size_hint()
        .upper()
        .is_some_and(|n| n > max_body as u64)
    {
        return Err(too_large());
    }
    let mut first = Bytes::new();
    let mut joined: Option<BytesMut> = None;
    while let Some(frame) = body.frame().await {
        // Broken framing (a bad chunk size): nothing after it on this connection can be
        // trusted.
        let frame = frame.map_err(|_| {
            closing(error(
                StatusCode::BAD_REQUEST,
                "invalid_request",
                "the request body could not be read",
            ))
        })?;
        // Trailers are not part of the body.
        let Ok(data) = frame.into_data() else {
            continue;
        };
        if data.is_empty() {
            continue;
        }
        let read = joined.as_ref().map_or(first.len(), BytesMut::len);
        if data.len() > max_body - read {
            return Err(too_large());
        }
        match &mut joined {
            Some(all) => all.extend_from_slice(&data),
            None if first.is_empty() => first = data,
            None => {
                let mut all = BytesMut::with_capacity(first.len() + data.len());
                all.extend_from_slice(&first);
                all.extend_from_slice(&data);
                joined = Some(all);
            }
        }
    }
    Ok(joined.map_or(first, BytesMut::freeze))
}

/// How a walk broke off before its chain answered.
enum Broke {
    /// A node (or the recording after it) panicked: the panic hook has logged where.
    Panic,
    /// The request timeout passed while a node waited.
    Timeout,
}

impl Broke {
    fn response(&self) -> Response {
        match self {
            Broke::Panic => error(
                StatusCode::INTERNAL_SERVER_ERROR,
                "server_error",
                "the policy failed unexpectedly",
            ),
            Broke::Timeout => error(
                StatusCode::GATEWAY_TIMEOUT,
                "timeout",
                "the request took too long",
            ),
        }
    }
}

/// How a request ended, before it is counted and logged.
struct Ending {
    response: Response,
    outcome: Outcome,
    trail: Vec<u16>,
    client: monitoring::ClientLabel,
    elapsed: Span,
}

impl Ending {
    /// Answered before the chain ran (a body too large, too slow): no client known yet.
    fn early(response: Response, started: Mark) -> Self {
        let outcome = if response.status().is_server_error() {
            Outcome::Exception
        } else {
            Outcome::Failure
        };
        Ending {
            response,
            outcome,
            trail: Vec::new(),
            client: monitoring::ClientLabel::ANONYMOUS,
            elapsed: started.elapsed(),
        }
    }

    /// The end of a walk: the answer it finished with, or how it broke off (the node it was
    /// at is then recorded as an exception). Records the walk's service contexts.
    fn of_walk(
        state: &State,
        policy: &Policy,
        ex: &Exchange,
        walk: &mut Walk,
        run: Result<Finished, Broke>,
        started: Mark,
    ) -> Self {
        // The walk's last clock read is the end of its last node: no need for another.
        let end = match &run {
            Ok(_) => walk.last_mark(),
            Err(_) => {
                walk.interrupted(policy);
                None
            }
        }
        .unwrap_or_else(Mark::now);
        let mut clients = ClientLabels::new(ex, &state.monitoring);
        let (response, outcome, trail) = match run {
            Ok(f) => {
                walk.record(policy, &mut clients, f.outcome, started.until(end));
                (f.response, f.outcome, f.trail)
            }
            Err(broke) => {
                walk.record(policy, &mut clients, Outcome::Exception, started.until(end));
                (broke.response(), Outcome::Exception, walk.take_trail())
            }
        };
        // The client as the chain identified it (the policy's `monitoring.client_attribute`,
        // by default `authentication.subject.id`, which the OAuth filters set once the client
        // authenticated); resolved to a bounded label, so no raw value becomes a series. Only
        // the policy's own service context uses it.
        let client = if policy.metrics.is_some() {
            clients.of(&policy.client_attribute)
        } else {
            monitoring::ClientLabel::ANONYMOUS
        };
        Ending {
            response,
            outcome,
            trail,
            client,
            elapsed: started.until(end),
        }
    }
}

/// Counts the request in the policy's service context, writes its log line, and hands the
/// response to hyper.
fn conclude(policy: &Policy, ending: Ending) -> http::Response<Body> {
    // `None` when the policy's `monitoring.enabled` is false.
    if let Some(service) = &policy.metrics {
        service.record(ending.client, ending.outcome, ending.elapsed);
    }
    if tracing::enabled!(tracing::Level::INFO) {
        let nodes: Vec<&str> = ending
            .trail
            .iter()
            .map(|&i| &*policy.nodes[i as usize].name)
            .collect();
        tracing::info!(
            policy = %policy.name,
            nodes = %nodes.join(">"),
            status = ending.response.status().as_u16(),
            micros = ending.elapsed.as_duration().as_micros() as u64,
            "request"
        );
    }
    to_hyper(ending.response)
}

/// `host:port` -> `host`; `[v6]:port` -> `[v6]` (a bare `[v6]` stays whole).
fn strip_port(host: &str) -> &str {
    match host.strip_prefix('[') {
        Some(rest) => rest.find(']').map_or(host, |i| &host[..i + 2]),
        None => host.split_once(':').map_or(host, |(h, _)| h),
    }
}

fn too_large() -> Response {
    // The rest of the body is never read: the connection cannot carry another request.
    closing(error(
        StatusCode::PAYLOAD_TOO_LARGE,
        "invalid_request",
        "the request body is too large",
    ))
}

/// Asks hyper to close the connection after this response.
fn closing(mut r: Response) -> Response {
    r.headers_mut()
        .insert(header::CONNECTION, HeaderValue::from_static("close"));
    r
}

/// The admin listener's handler.
pub fn admin(state: &ConnectionState, req: Request<Incoming>, _peer: SocketAddr) -> Answer {
    Either::Right(Box::pin(admin_answer(Arc::clone(state), req)))
}

async fn admin_answer(state: Arc<State>, req: Request<Incoming>) -> http::Response<Body> {
    let r = match (req.method(), req.uri().path()) {
        (&Method::GET, "/healthz") => {
            json_response(StatusCode::OK, &serde_json::json!({"status": "ok"}))
        }
        (&Method::GET, "/readyz") => readyz(&state).await,
        (&Method::GET, "/metrics") => {
            let mut r = http::Response::new(Bytes::from(state.monitoring.render()));
            r.headers_mut().insert(
                header::CONTENT_TYPE,
                HeaderValue::from_static("text/plain; version=0.0.4; charset=utf-8"),
            );
            r
        }
        (&Method::POST, "/reload") => match crate::reload(&state).await {
            Ok(()) => json_response(StatusCode::OK, &serde_json::json!({"reloaded": true})),
            Err(errors) => json_response(
                StatusCode::UNPROCESSABLE_ENTITY,
                &serde_json::json!({
                    "reloaded": false,
                    "errors": errors.0.iter().map(ToString::to_string).collect::<Vec<_>>(),
                }),
            ),
        },
        (_, "/healthz" | "/readyz" | "/metrics" | "/reload") => error(
            StatusCode::METHOD_NOT_ALLOWED,
            "method_not_allowed",
            "wrong method",
        ),
        _ => error(StatusCode::NOT_FOUND, "not_found", "no such admin endpoint"),
    };
    to_hyper(r)
}

async fn readyz(state: &State) -> Response {
    let runtime = state.runtime.load_full();
    let mut down = Vec::new();
    for (name, h) in &runtime.stores {
        let ok = matches!(
            tokio::time::timeout(Duration::from_secs(2), h.store.ping()).await,
            Ok(Ok(()))
        );
        if !ok {
            down.push(name.clone());
        }
    }
    down.sort();
    if down.is_empty() {
        json_response(StatusCode::OK, &serde_json::json!({"ready": true}))
    } else {
        json_response(
            StatusCode::SERVICE_UNAVAILABLE,
            &serde_json::json!({"ready": false, "stores_unavailable": down}),
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Work done at its first poll makes no timer: outside any tokio runtime, where making one
    /// would panic, it still answers.
    #[test]
    fn work_done_at_once_arms_no_timer() {
        let work = std::pin::pin!(std::future::ready(7));
        let within = std::pin::pin!(within(work, Duration::from_secs(1)));
        let mut cx = std::task::Context::from_waker(std::task::Waker::noop());
        assert_eq!(within.poll(&mut cx), Poll::Ready(Some(7)));
    }

    /// Work that waits is cut `timeout` after its first wait, and not before.
    #[tokio::test(start_paused = true)]
    async fn work_that_waits_is_cut_at_the_timeout() {
        let started = tokio::time::Instant::now();
        let work = std::pin::pin!(std::future::pending::<()>());
        assert_eq!(within(work, Duration::from_secs(3)).await, None);
        assert_eq!(started.elapsed(), Duration::from_secs(3));
        let work = std::pin::pin!(tokio::time::sleep(Duration::from_secs(2)));
        assert_eq!(within(work, Duration::from_secs(3)).await, Some(()));
    }
}
