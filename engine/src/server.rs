//! The hyper servers: the public listener that runs policies, and the admin listener
//! (`/healthz`, `/readyz`, `/metrics`, `POST /reload`), which is never served publicly.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use filters::{Exchange, Response, json_response};
use futures_util::FutureExt;
use http::{HeaderValue, Method, Request, StatusCode, header};
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::{Body as _, Incoming};
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use monitoring::Outcome;
use tokio::net::TcpListener;
use tokio::sync::{Semaphore, watch};

use crate::State;
use crate::chain;
use crate::config::Limits;
use crate::conn;
use crate::runtime::RouteMatch;

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

/// Accepts connections until `shutdown` flips, then drains: connections stop keep-alive,
/// in-flight requests finish, and after `drain` whatever is left is dropped.
pub async fn serve<S, F>(
    listener: TcpListener,
    kind: Listener,
    limits: Limits,
    mut shutdown: watch::Receiver<bool>,
    state: Arc<State>,
    handler: S,
) where
    S: Fn(Arc<State>, Request<Incoming>, SocketAddr) -> F + Clone + Send + Sync + 'static,
    F: std::future::Future<Output = http::Response<Body>> + Send + 'static,
{
    // No hyper timer: its header read timeout arms a timer per request; `HeadGuard` keeps one
    // per connection (see conn.rs).
    let head_timeout = Duration::from_secs(limits.header_read_timeout_secs.max(1));
    let mut http = hyper::server::conn::http1::Builder::new();
    http.max_headers(limits.max_headers)
        .max_header_size(limits.max_header_bytes)
        .max_buf_size(limits.max_header_bytes.max(8192) + limits.max_body_bytes.max(8192))
        .keep_alive(limits.keep_alive);
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
        let state2 = state.clone();
        let h = handler.clone();
        let phase = Arc::new(conn::Phase::default());
        let served = phase.clone();
        let svc = service_fn(move |req| {
            served.request_started();
            let done = conn::Served(served.clone());
            let fut = h(state2.clone(), req, peer);
            async move {
                let response = fut.await;
                drop(done);
                Ok::<_, Infallible>(response)
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
pub async fn public(
    state: Arc<State>,
    req: Request<Incoming>,
    _peer: SocketAddr,
) -> http::Response<Body> {
    let runtime = state.runtime.load_full();
    let limits = &runtime.settings.limits;
    let (parts, body) = req.into_parts();
    let host = parts.uri.host().or_else(|| {
        parts
            .headers
            .get(header::HOST)
            .and_then(|h| h.to_str().ok())
    });
    let host = host.map(strip_port);
    let policy = match runtime.router.find(host, parts.uri.path(), &parts.method) {
        RouteMatch::Policy(i) => &runtime.policies[i],
        RouteMatch::NotFound => {
            return to_hyper(error(
                StatusCode::NOT_FOUND,
                "not_found",
                "no policy serves this path",
            ));
        }
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
            return to_hyper(r);
        }
    };
    let _in_flight = state.monitoring.in_flight();
    let started = tokio::time::Instant::now();
    let deadline = started + Duration::from_secs(limits.request_timeout_secs.max(1));
    let max_body = limits.max_body_bytes;
    // Set once the body is in: a deadline that fires before is the client's delay (408), after
    // it ours (504). One timer per request covers both.
    let body_read = std::sync::atomic::AtomicBool::new(false);
    let work = async {
        let declared = parts
            .headers
            .get(header::CONTENT_LENGTH)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse::<u64>().ok());
        if declared.is_some_and(|n| n > max_body as u64) {
            return Err((too_large(), monitoring::ClientLabel::ANONYMOUS));
        }
        let body = if body.is_end_stream() {
            // Most GETs: nothing to read, no collector to build.
            Bytes::new()
        } else {
            match Limited::new(body, max_body).collect().await {
                Ok(c) => c.to_bytes(),
                Err(e)
                    if e.downcast_ref::<http_body_util::LengthLimitError>()
                        .is_some() =>
                {
                    return Err((too_large(), monitoring::ClientLabel::ANONYMOUS));
                }
                Err(_) => {
                    // Broken framing (a bad chunk size): nothing after it on this connection
                    // can be trusted.
                    return Err((
                        closing(error(
                            StatusCode::BAD_REQUEST,
                            "invalid_request",
                            "the request body could not be read",
                        )),
                        monitoring::ClientLabel::ANONYMOUS,
                    ));
                }
            }
        };
        body_read.store(true, std::sync::atomic::Ordering::Relaxed);
        let mut ex = Exchange::new(parts, body);
        let run = std::panic::AssertUnwindSafe(chain::run(policy, &mut ex, &state.monitoring))
            .catch_unwind()
            .await;
        // The client as the chain identified it (the policy's `monitoring.client_attribute`,
        // by default `authentication.subject.id`, which the OAuth filters set once the client
        // authenticated); resolved to a bounded label, so no raw value becomes a series.
        let client = state
            .monitoring
            .client(ex.get(&policy.client_attribute).as_deref());
        match run {
            Ok(finished) => Ok((finished, client)),
            Err(_) => {
                // The panic hook has logged where it happened.
                Err((
                    error(
                        StatusCode::INTERNAL_SERVER_ERROR,
                        "server_error",
                        "the policy failed unexpectedly",
                    ),
                    client,
                ))
            }
        }
    };
    let (response, outcome, trail, client) = match tokio::time::timeout_at(deadline, work).await {
        Ok(Ok((f, client))) => (f.response, f.outcome, f.trail, client),
        Ok(Err((r, client))) => {
            let o = if r.status().is_server_error() {
                Outcome::Exception
            } else {
                Outcome::Failure
            };
            (r, o, Vec::new(), client)
        }
        Err(_) if !body_read.load(std::sync::atomic::Ordering::Relaxed) => (
            closing(error(
                StatusCode::REQUEST_TIMEOUT,
                "invalid_request",
                "the request body did not arrive in time",
            )),
            Outcome::Failure,
            Vec::new(),
            monitoring::ClientLabel::ANONYMOUS,
        ),
        Err(_) => (
            error(
                StatusCode::GATEWAY_TIMEOUT,
                "timeout",
                "the request took too long",
            ),
            Outcome::Exception,
            Vec::new(),
            monitoring::ClientLabel::ANONYMOUS,
        ),
    };
    let elapsed = started.elapsed();
    // `None` when the policy's `monitoring.enabled` is false.
    if let Some(service) = &policy.metrics {
        service.record(client, outcome, elapsed);
    }
    if tracing::enabled!(tracing::Level::INFO) {
        let nodes: Vec<&str> = trail
            .iter()
            .map(|&i| &*policy.nodes[i as usize].name)
            .collect();
        tracing::info!(
            policy = %policy.name,
            nodes = %nodes.join(">"),
            status = response.status().as_u16(),
            micros = elapsed.as_micros() as u64,
            "request"
        );
    }
    to_hyper(response)
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
pub async fn admin(
    state: Arc<State>,
    req: Request<Incoming>,
    _peer: SocketAddr,
) -> http::Response<Body> {
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
