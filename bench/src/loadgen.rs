//! The load generator: a closed-loop HTTP/1.1 keep-alive client. `conns` connections each send
//! one request, wait for the whole response, and send the next one at once; every latency of the
//! measured window is kept (a sorted vector, so p50/p99 are exact). Closed-loop figures
//! understate the tail (coordinated omission), so they are always labelled "closed-loop, c=N".
//!
//! Refresh mode: each connection first gets a pair through a client_credentials grant, then
//! replays the refresh token it was just given, so every request consumes one token (a broken
//! chain is re-seeded and counted as an error).
//!
//! Several targets (the side-by-side runs): connection `i` goes to target `i % n`, every target
//! shares the one measured window, and each gets its own [`Outcome`].

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU8, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use bytes::{Buf, BytesMut};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

const WARMUP: u8 = 0;
const MEASURE: u8 = 1;
const STOP: u8 = 2;

/// The environment variable that hands `bench loadgen` its client secrets, one per line in the
/// order of its `--client-id`s: a command line is readable by every user of the machine.
pub const SECRETS_ENV: &str = "BENCH_CLIENT_SECRETS";

/// What every connection sends.
#[derive(Clone, Debug)]
pub enum Mode {
    /// `GET path` (ceiling, chain).
    Get { path: String },
    /// The refresh grant at `/oauth/token` with HTTP Basic client authentication.
    Refresh { client_id: String, secret: String },
}

/// One server the generator loads, and what its connections send.
#[derive(Clone, Debug)]
pub struct Target {
    pub addr: SocketAddr,
    pub mode: Mode,
}

#[derive(Clone, Debug)]
pub struct Spec {
    /// Connection `i` goes to `targets[i % targets.len()]`.
    pub targets: Vec<Target>,
    /// Connections in all, over every target.
    pub conns: usize,
    /// Tokio threads of the generator (1: a current-thread runtime).
    pub threads: usize,
    pub warmup: Duration,
    pub duration: Duration,
}

/// One run's figures (the measured window only).
#[derive(Clone, Debug, Default)]
pub struct Outcome {
    /// Completed 2xx responses inside the window.
    pub requests: u64,
    /// Non-2xx responses inside the window (any of them fails the run).
    pub non_2xx: u64,
    /// I/O errors, timeouts, closed connections (whole run).
    pub io_errors: u64,
    pub elapsed_secs: f64,
    pub p50_us: f64,
    pub p99_us: f64,
    pub max_us: f64,
}

impl Outcome {
    pub fn rps(&self) -> f64 {
        if self.elapsed_secs > 0.0 {
            self.requests as f64 / self.elapsed_secs
        } else {
            0.0
        }
    }

    pub fn to_json(&self) -> serde_json::Value {
        serde_json::json!({
            "requests": self.requests,
            "non_2xx": self.non_2xx,
            "io_errors": self.io_errors,
            "elapsed_secs": self.elapsed_secs,
            "p50_us": self.p50_us,
            "p99_us": self.p99_us,
            "max_us": self.max_us,
        })
    }

    pub fn from_json(v: &serde_json::Value) -> Outcome {
        let f = |k: &str| v[k].as_f64().unwrap_or(0.0);
        let u = |k: &str| v[k].as_u64().unwrap_or(0);
        Outcome {
            requests: u("requests"),
            non_2xx: u("non_2xx"),
            io_errors: u("io_errors"),
            elapsed_secs: f("elapsed_secs"),
            p50_us: f("p50_us"),
            p99_us: f("p99_us"),
            max_us: f("max_us"),
        }
    }
}

/// Per-connection tallies, merged at the end.
#[derive(Default)]
struct Tally {
    latencies_ns: Vec<u64>,
    ok: u64,
    non_2xx: u64,
    io_errors: u64,
}

/// Runs the load; one [`Outcome`] per target, in the order of `spec.targets`.
/// `on_phase("START" | "STOP")` is called when the measured window opens and closes, so that
/// the caller can sample the servers' CPU time at the same instants.
pub fn run(spec: &Spec, on_phase: impl Fn(&str)) -> anyhow::Result<Vec<Outcome>> {
    let rt = if spec.threads <= 1 {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?
    } else {
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(spec.threads)
            .enable_all()
            .build()?
    };
    rt.block_on(run_async(spec, on_phase))
}

async fn run_async(spec: &Spec, on_phase: impl Fn(&str)) -> anyhow::Result<Vec<Outcome>> {
    if spec.targets.is_empty() {
        bail!("the load generator needs at least one target");
    }
    let phase = Arc::new(AtomicU8::new(WARMUP));
    let mut tasks = Vec::with_capacity(spec.conns);
    for i in 0..spec.conns {
        let phase = phase.clone();
        let target = spec.targets[i % spec.targets.len()].clone();
        tasks.push((
            i % spec.targets.len(),
            tokio::spawn(async move { connection(target, phase).await }),
        ));
    }
    tokio::time::sleep(spec.warmup).await;
    phase.store(MEASURE, Ordering::SeqCst);
    let start = Instant::now();
    on_phase("START");
    tokio::time::sleep(spec.duration).await;
    phase.store(STOP, Ordering::SeqCst);
    let elapsed = start.elapsed();
    on_phase("STOP");

    let mut per_target: Vec<Tally> = spec.targets.iter().map(|_| Tally::default()).collect();
    for (target, t) in tasks {
        let t = t.await.context("load connection task")?;
        let all = &mut per_target[target];
        all.latencies_ns.extend_from_slice(&t.latencies_ns);
        all.ok += t.ok;
        all.non_2xx += t.non_2xx;
        all.io_errors += t.io_errors;
    }
    Ok(per_target
        .into_iter()
        .map(|all| all.outcome(elapsed))
        .collect())
}

impl Tally {
    fn outcome(mut self, elapsed: Duration) -> Outcome {
        self.latencies_ns.sort_unstable();
        let lat = &self.latencies_ns;
        let pct = |p: f64| -> f64 {
            if lat.is_empty() {
                return 0.0;
            }
            let i = ((lat.len() as f64 * p).ceil() as usize).clamp(1, lat.len());
            lat[i - 1] as f64 / 1000.0
        };
        Outcome {
            requests: self.ok,
            non_2xx: self.non_2xx,
            io_errors: self.io_errors,
            elapsed_secs: elapsed.as_secs_f64(),
            p50_us: pct(0.50),
            p99_us: pct(0.99),
            max_us: pct(1.0),
        }
    }
}

const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);

async fn connection(target: Target, phase: Arc<AtomicU8>) -> Tally {
    let mut tally = Tally {
        latencies_ns: Vec::with_capacity(1 << 14),
        ..Tally::default()
    };
    let auth = match &target.mode {
        Mode::Refresh { client_id, secret } => {
            use base64::Engine as _;
            base64::engine::general_purpose::STANDARD.encode(format!("{client_id}:{secret}"))
        }
        Mode::Get { .. } => String::new(),
    };
    let mut conn: Option<Conn> = None;
    let mut refresh_token: Option<String> = None;
    let mut req = Vec::with_capacity(512);
    while phase.load(Ordering::Relaxed) != STOP {
        if conn.is_none() {
            match TcpStream::connect(target.addr).await {
                Ok(s) => {
                    let _ = s.set_nodelay(true);
                    conn = Some(Conn::new(s));
                }
                Err(_) => {
                    tally.io_errors += 1;
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            }
        }
        let c = conn.as_mut().expect("connected above");
        req.clear();
        let seeding = match &target.mode {
            Mode::Get { path } => {
                req.extend_from_slice(b"GET ");
                req.extend_from_slice(path.as_bytes());
                req.extend_from_slice(b" HTTP/1.1\r\nHost: bench\r\n\r\n");
                false
            }
            Mode::Refresh { .. } => {
                let body = match &refresh_token {
                    Some(rt) => format!("grant_type=refresh_token&refresh_token={rt}"),
                    None => "grant_type=client_credentials&scope=read".to_owned(),
                };
                req.extend_from_slice(
                    format!(
                        "POST /oauth/token HTTP/1.1\r\nHost: bench\r\nAuthorization: Basic {auth}\r\n\
                         Content-Type: application/x-www-form-urlencoded\r\nContent-Length: {}\r\n\r\n{body}",
                        body.len()
                    )
                    .as_bytes(),
                );
                refresh_token.is_none()
            }
        };
        let started_in = phase.load(Ordering::Relaxed);
        let t0 = Instant::now();
        let res = tokio::time::timeout(REQUEST_TIMEOUT, c.exchange(&req)).await;
        let dt = t0.elapsed();
        // Seeding grants (client_credentials) are not the measured request.
        let counted = !seeding && started_in == MEASURE && phase.load(Ordering::Relaxed) == MEASURE;
        match res {
            Ok(Ok(resp)) => {
                let ok = (200..300).contains(&resp.status);
                if counted {
                    if ok {
                        tally.ok += 1;
                        tally.latencies_ns.push(dt.as_nanos() as u64);
                    } else {
                        tally.non_2xx += 1;
                    }
                } else if seeding && !ok {
                    tally.non_2xx += 1;
                }
                if let Mode::Refresh { .. } = target.mode {
                    // A failed refresh breaks the chain: the next request seeds a new one.
                    refresh_token = if ok {
                        json_string(&resp.body, "refresh_token")
                    } else {
                        None
                    };
                }
                if resp.close {
                    conn = None;
                }
            }
            Ok(Err(_)) | Err(_) => {
                tally.io_errors += 1;
                conn = None;
            }
        }
    }
    tally
}

/// The string value of `"key":"..."` in a flat JSON object (tokens are alphanumeric).
pub fn json_string(body: &[u8], key: &str) -> Option<String> {
    let text = std::str::from_utf8(body).ok()?;
    let pat = format!("\"{key}\":\"");
    let start = text.find(&pat)? + pat.len();
    let end = text[start..].find('"')? + start;
    Some(text[start..end].to_owned())
}

struct Conn {
    stream: TcpStream,
    buf: BytesMut,
}

pub struct Response {
    pub status: u16,
    pub body: Vec<u8>,
    pub close: bool,
}

impl Conn {
    fn new(stream: TcpStream) -> Self {
        Conn {
            stream,
            buf: BytesMut::with_capacity(16 * 1024),
        }
    }

    async fn exchange(&mut self, req: &[u8]) -> anyhow::Result<Response> {
        self.stream.write_all(req).await?;
        loop {
            if let Some((resp, used)) = parse_response(&self.buf)? {
                self.buf.advance(used);
                return Ok(resp);
            }
            if self.buf.capacity() - self.buf.len() < 4096 {
                self.buf.reserve(16 * 1024);
            }
            if self.stream.read_buf(&mut self.buf).await? == 0 {
                bail!("connection closed by the server");
            }
        }
    }
}

fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    hay.windows(needle.len()).position(|w| w == needle)
}

/// Parses one complete HTTP/1.1 response from the front of `buf`: `None` while incomplete,
/// otherwise the response and the bytes it used (Content-Length or chunked bodies).
pub fn parse_response(buf: &[u8]) -> anyhow::Result<Option<(Response, usize)>> {
    let Some(head_end) = find(buf, b"\r\n\r\n") else {
        return Ok(None);
    };
    let head = std::str::from_utf8(&buf[..head_end]).context("non-UTF-8 response head")?;
    let mut lines = head.split("\r\n");
    let status_line = lines.next().unwrap_or_default();
    let status: u16 = status_line
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .with_context(|| format!("bad status line {status_line:?}"))?;
    let mut length = None;
    let mut chunked = false;
    let mut close = false;
    for line in lines {
        let Some((name, value)) = line.split_once(':') else {
            continue;
        };
        let value = value.trim();
        if name.eq_ignore_ascii_case("content-length") {
            length = Some(value.parse::<usize>().context("bad content-length")?);
        } else if name.eq_ignore_ascii_case("transfer-encoding") {
            chunked = value.to_ascii_lowercase().contains("chunked");
        } else if name.eq_ignore_ascii_case("connection") {
            close = value.eq_ignore_ascii_case("close");
        }
    }
    let body_start = head_end + 4;
    if chunked {
        let mut body = Vec::new();
        let mut pos = body_start;
        loop {
            let Some(line_end) = find(&buf[pos..], b"\r\n") else {
                return Ok(None);
            };
            let size_text = std::str::from_utf8(&buf[pos..pos + line_end])?;
            let size = usize::from_str_radix(size_text.split(';').next().unwrap_or("").trim(), 16)
                .context("bad chunk size")?;
            let data = pos + line_end + 2;
            if size == 0 {
                // No trailers expected: the final CRLF follows at once.
                if buf.len() < data + 2 {
                    return Ok(None);
                }
                return Ok(Some((
                    Response {
                        status,
                        body,
                        close,
                    },
                    data + 2,
                )));
            }
            if buf.len() < data + size + 2 {
                return Ok(None);
            }
            body.extend_from_slice(&buf[data..data + size]);
            pos = data + size + 2;
        }
    }
    let len = length.unwrap_or(0);
    if buf.len() < body_start + len {
        return Ok(None);
    }
    Ok(Some((
        Response {
            status,
            body: buf[body_start..body_start + len].to_vec(),
            close,
        },
        body_start + len,
    )))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_content_length_and_pipelined_rest() {
        let raw = b"HTTP/1.1 200 OK\r\ncontent-length: 5\r\n\r\nhelloHTTP/1.1";
        let (r, used) = parse_response(raw).unwrap().unwrap();
        assert_eq!(
            (r.status, r.body.as_slice(), used),
            (200, &b"hello"[..], 43)
        );
        assert!(parse_response(&raw[..40]).unwrap().is_none());
    }

    #[test]
    fn parses_chunked() {
        let raw = b"HTTP/1.1 400 Bad\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n3\r\nabc\r\n2\r\nde\r\n0\r\n\r\n";
        let (r, used) = parse_response(raw).unwrap().unwrap();
        assert_eq!(
            (r.status, r.body.as_slice(), r.close),
            (400, &b"abcde"[..], true)
        );
        assert_eq!(used, raw.len());
        assert!(parse_response(&raw[..raw.len() - 1]).unwrap().is_none());
    }

    #[test]
    fn finds_the_refresh_token() {
        let body = br#"{"access_token":"a1","refresh_token":"Rt9","scope":"read"}"#;
        assert_eq!(json_string(body, "refresh_token").as_deref(), Some("Rt9"));
        assert_eq!(json_string(body, "nope"), None);
    }
}
