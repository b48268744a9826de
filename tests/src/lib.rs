//! Helpers for the black-box tests: a policy folder in a temporary directory, a real engine on
//! 127.0.0.1:0, and a real HTTP/1.1 client (hyper's, over a fresh TCP connection).

#![forbid(unsafe_code)]

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use bytes::Bytes;
use http::{HeaderMap, Method, Request, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;

pub use engine::{Gateway, Options};

/// A policy folder in a temporary directory.
pub struct PolicyDir {
    pub dir: tempfile::TempDir,
}

impl PolicyDir {
    /// A folder holding `files` (name, YAML).
    pub fn new(files: &[(&str, &str)]) -> Self {
        let dir = tempfile::tempdir().expect("temp dir");
        let p = PolicyDir { dir };
        for (name, text) in files {
            p.write(name, text);
        }
        p
    }

    pub fn path(&self) -> &Path {
        self.dir.path()
    }

    pub fn write(&self, name: &str, text: &str) {
        std::fs::write(self.dir.path().join(name), text).expect("write policy file");
    }

    /// Starts a gateway on this folder, on ephemeral loopback ports.
    pub async fn start(&self) -> Gateway {
        self.start_with(&[]).await
    }

    pub async fn start_with(&self, extra_kinds: &'static [filters::Kind]) -> Gateway {
        let options = Options {
            policies: self.path().to_owned(),
            listen: Some("127.0.0.1:0".parse().unwrap()),
            admin: Some("127.0.0.1:0".parse().unwrap()),
            extra_kinds,
        };
        match Gateway::start(options).await {
            Ok(gw) => gw,
            Err(e) => panic!("gateway did not start: {e}"),
        }
    }

    pub fn registry_path(&self) -> PathBuf {
        self.path().join("state").join("clients.yaml")
    }
}

/// A response, fully read.
#[derive(Debug)]
pub struct Resp {
    pub status: StatusCode,
    pub headers: HeaderMap,
    pub body: Bytes,
}

impl Resp {
    pub fn json(&self) -> serde_json::Value {
        serde_json::from_slice(&self.body)
            .unwrap_or_else(|e| panic!("not JSON ({e}): {:?}", String::from_utf8_lossy(&self.body)))
    }

    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }

    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).and_then(|v| v.to_str().ok())
    }
}

/// Sends one request on a fresh connection.
pub async fn send(addr: SocketAddr, req: Request<Full<Bytes>>) -> Resp {
    let stream = TcpStream::connect(addr).await.expect("connect");
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .expect("handshake");
    tokio::spawn(conn);
    let resp = tokio::time::timeout(Duration::from_secs(30), sender.send_request(req))
        .await
        .expect("response within 30 s")
        .expect("response");
    let (parts, body) = resp.into_parts();
    let body = body.collect().await.expect("body").to_bytes();
    Resp {
        status: parts.status,
        headers: parts.headers,
        body,
    }
}

pub fn request(method: Method, path: &str) -> http::request::Builder {
    Request::builder()
        .method(method)
        .uri(path)
        .header("host", "localhost")
}

pub async fn get(addr: SocketAddr, path: &str) -> Resp {
    send(
        addr,
        request(Method::GET, path)
            .body(Full::new(Bytes::new()))
            .unwrap(),
    )
    .await
}

/// POSTs an `application/x-www-form-urlencoded` body built from `form`.
pub async fn post_form(
    addr: SocketAddr,
    path: &str,
    headers: &[(&str, &str)],
    form: &[(&str, &str)],
) -> Resp {
    let body = form_urlencoded::Serializer::new(String::new())
        .extend_pairs(form)
        .finish();
    let mut b =
        request(Method::POST, path).header("content-type", "application/x-www-form-urlencoded");
    for (k, v) in headers {
        b = b.header(*k, *v);
    }
    send(addr, b.body(Full::new(Bytes::from(body))).unwrap()).await
}

/// `Authorization: Basic ...` for a client id and secret (form-encoded first, RFC 6749 §2.3.1).
pub fn basic(id: &str, secret: &str) -> String {
    use base64::Engine as _;
    let enc = |s: &str| form_urlencoded::byte_serialize(s.as_bytes()).collect::<String>();
    format!(
        "Basic {}",
        base64::engine::general_purpose::STANDARD.encode(format!("{}:{}", enc(id), enc(secret)))
    )
}

/// Registers an application in the policy folder's registry; returns (id, secret).
pub async fn add_client(dir: &Path, scopes: &str, grants: &str) -> (String, String) {
    let registry = engine::clients::open(dir).await.expect("registry");
    let added = engine::clients::add(&registry, "test app", scopes, grants)
        .await
        .expect("add client");
    (added.app.client_id, added.secret)
}

/// The gateway settings most tests use: a memory store and a file registry under `state/`.
pub const SETTINGS: &str = "\
stores:
  tokens: { type: memory }
applications: { type: file, path: state/clients.yaml }
";

/// The default token endpoint policy, read from the repository's `policies/token.yaml`.
pub fn default_token_policy() -> String {
    std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("../policies/token.yaml"))
        .expect("policies/token.yaml")
}

/// A token endpoint that dispatches on grant_type (as policies/token.yaml does), with extra
/// YAML settings for each of the two grant nodes (indented for a node's body).
pub fn dispatch_policy(cc: &str, refresh: &str) -> String {
    format!(
        r#"
policies:
  - name: token
    route: {{ path: /oauth/token, methods: [POST] }}
    chain:
      - name: is-cc
        type: compare_attribute
        attribute: http.form.grant_type
        equals: client_credentials
        on_failure: refresh
      - name: cc
        type: client_credentials
        include_refresh_token: true
{cc}
      - name: refresh
        type: refresh_access_token
{refresh}
"#
    )
}

/// `POST /reload` on the admin listener.
pub async fn post_reload(gw: &Gateway) -> Resp {
    send(
        gw.admin_addr,
        request(Method::POST, "/reload")
            .body(Full::new(Bytes::new()))
            .unwrap(),
    )
    .await
}

/// The path to the `gateway` binary built for these tests.
pub fn gateway_bin() -> PathBuf {
    let target = std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("../target"));
    // The test binary lives in target/<profile>/deps; the gateway in target/<profile>.
    let exe = std::env::current_exe().expect("current exe");
    let profile_dir = exe.parent().and_then(Path::parent).map(Path::to_path_buf);
    let candidates = [
        profile_dir.map(|d| d.join("gateway")),
        Some(target.join("debug").join("gateway")),
    ];
    candidates
        .into_iter()
        .flatten()
        .find(|p| p.exists())
        .expect("the gateway binary (cargo builds it for the tests package: engine is a dependency with a bin)")
}

/// A request to `path` with a chosen `Host` header (the plain [`request`] says `localhost`).
pub fn request_with_host(method: Method, path: &str, host: &str) -> http::request::Builder {
    Request::builder()
        .method(method)
        .uri(path)
        .header("host", host)
}

/// Filter kinds for tests that embed the engine (`PolicyDir::start_with(test_kinds::KINDS)`):
/// `test_sleep` (`ms:`) sleeps then passes (and counts in `test.asked_now` how often the engine
/// asked it to answer without waiting), `test_panic` panics (`now: true`: without waiting,
/// as a node of a kind that never waits would).
pub mod test_kinds {
    use std::sync::Arc;
    use std::time::Duration;

    use async_trait::async_trait;
    use filters::registry::parse;
    use filters::{
        BuildContext, BuildError, Exchange, Filter, FilterError, Flow, Kind, SharedFilter,
    };

    pub static KINDS: &[Kind] = &[
        Kind {
            name: "test_sleep",
            build: build_sleep,
        },
        Kind {
            name: "test_panic",
            build: build_panic,
        },
    ];

    #[derive(serde::Deserialize)]
    #[serde(deny_unknown_fields)]
    struct SleepConfig {
        ms: u64,
    }

    struct Sleep(Duration);

    #[async_trait]
    impl Filter for Sleep {
        async fn on_request(&self, ex: &mut Exchange) -> Result<Flow, FilterError> {
            tokio::time::sleep(self.0).await;
            ex.set("test.slept_ms", self.0.as_millis().to_string());
            Ok(Flow::Pass)
        }

        /// Declines (it must wait), counting in `test.asked_now` how often it was asked.
        fn on_request_now(&self, ex: &mut Exchange) -> Option<Result<Flow, FilterError>> {
            let asked = ex
                .get("test.asked_now")
                .and_then(|n| n.parse::<u32>().ok())
                .unwrap_or(0);
            ex.set("test.asked_now", (asked + 1).to_string());
            None
        }
    }

    fn build_sleep(
        value: serde_yaml::Value,
        _cx: &BuildContext,
    ) -> Result<SharedFilter, BuildError> {
        let c: SleepConfig = parse(value)?;
        Ok(Arc::new(Sleep(Duration::from_millis(c.ms))))
    }

    #[derive(serde::Deserialize)]
    #[serde(deny_unknown_fields)]
    struct PanicConfig {
        /// Panic in `on_request_now` (a node that never waits) instead of `on_request`.
        #[serde(default)]
        now: bool,
    }

    struct Panic {
        now: bool,
    }

    #[async_trait]
    impl Filter for Panic {
        async fn on_request(&self, _ex: &mut Exchange) -> Result<Flow, FilterError> {
            panic!("test_panic filter: deliberate panic");
        }

        fn on_request_now(&self, _ex: &mut Exchange) -> Option<Result<Flow, FilterError>> {
            if self.now {
                panic!("test_panic filter: deliberate panic, without waiting");
            }
            None
        }
    }

    fn build_panic(
        value: serde_yaml::Value,
        _cx: &BuildContext,
    ) -> Result<SharedFilter, BuildError> {
        let c: PanicConfig = parse(value)?;
        Ok(Arc::new(Panic { now: c.now }))
    }
}

/// What a raw TCP exchange produced.
#[derive(Debug)]
pub struct RawReply {
    pub bytes: Vec<u8>,
    /// The server closed (EOF or reset) before the read window ended.
    pub closed: bool,
}

impl RawReply {
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.bytes).into_owned()
    }

    /// Status codes of every response in the reply, in order.
    pub fn statuses(&self) -> Vec<u16> {
        let t = self.text();
        let mut out = Vec::new();
        let mut rest = t.as_str();
        while let Some(i) = rest.find("HTTP/1.") {
            let s = &rest[i..];
            if let Some(code) = s.get(9..12).and_then(|c| c.parse().ok()) {
                out.push(code);
            }
            rest = &rest[i + 7..];
        }
        out
    }
}

/// Writes `bytes` on a fresh connection and reads until the server closes or `window` passes
/// without the connection closing.
pub async fn raw(addr: SocketAddr, bytes: &[u8], window: Duration) -> RawReply {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = TcpStream::connect(addr).await.expect("connect");
    let mut closed = s.write_all(bytes).await.is_err();
    let mut out = Vec::new();
    let deadline = tokio::time::Instant::now() + window;
    let mut buf = [0u8; 8192];
    while !closed {
        match tokio::time::timeout_at(deadline, s.read(&mut buf)).await {
            Err(_) => break,
            Ok(Ok(0)) | Ok(Err(_)) => closed = true,
            Ok(Ok(n)) => out.extend_from_slice(&buf[..n]),
        }
    }
    RawReply { bytes: out, closed }
}

/// A loopback address that was free a moment ago (bind :0, read the port, close).
pub fn free_addr() -> SocketAddr {
    let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind :0");
    l.local_addr().expect("local addr")
}

/// The `gateway` binary, built first (once per test process) so that it matches the sources:
/// `cargo test -p tests` builds only the engine's library, not its binary.
pub fn built_gateway_bin() -> PathBuf {
    static BUILT: std::sync::OnceLock<PathBuf> = std::sync::OnceLock::new();
    BUILT
        .get_or_init(|| {
            let exe = std::env::current_exe().expect("current exe");
            let release = exe
                .ancestors()
                .any(|a| a.file_name().is_some_and(|n| n == "release"));
            let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
            let mut cmd = std::process::Command::new(cargo);
            cmd.current_dir(Path::new(env!("CARGO_MANIFEST_DIR")).join(".."))
                .args(["build", "--quiet", "-p", "engine", "--bin", "gateway"]);
            if release {
                cmd.arg("--release");
            }
            let status = cmd
                .status()
                .expect("run cargo build for the gateway binary");
            assert!(
                status.success(),
                "cargo build -p engine --bin gateway failed"
            );
            gateway_bin()
        })
        .clone()
}

/// The `gateway` binary running on a policy folder, killed on drop if still running.
pub struct Running {
    pub child: std::process::Child,
    pub public: SocketAddr,
    pub admin: SocketAddr,
    /// The process's stdout and stderr (logs) go here.
    pub log: PathBuf,
    _log_dir: tempfile::TempDir,
}

impl Running {
    /// `gateway run --policies DIR --listen ... --admin ...` on free loopback ports; returns once
    /// the admin listener answers `/healthz`.
    pub async fn start(dir: &Path) -> Running {
        Running::start_with_env(dir, &[]).await
    }

    /// Like [`Running::start`], with extra environment variables (for `${VAR}` expansion).
    /// A port that [`free_addr`] found free can be taken by another test's socket before the
    /// binary binds it: then the binary exits at once, and it is started again on new ports.
    pub async fn start_with_env(dir: &Path, env: &[(&str, &str)]) -> Running {
        for _ in 0..5 {
            if let Some(r) = Running::try_start(dir, env).await {
                return r;
            }
        }
        panic!("gateway could not listen on a free port in five attempts")
    }

    /// One start; `None` when the binary could not bind one of its ports.
    async fn try_start(dir: &Path, env: &[(&str, &str)]) -> Option<Running> {
        let public = free_addr();
        let admin = free_addr();
        let log_dir = tempfile::tempdir().expect("temp dir");
        let log = log_dir.path().join("gateway.log");
        let file = std::fs::File::create(&log).expect("log file");
        let child = std::process::Command::new(built_gateway_bin())
            .arg("run")
            .arg("--policies")
            .arg(dir)
            .arg("--listen")
            .arg(public.to_string())
            .arg("--admin")
            .arg(admin.to_string())
            .env("RUST_LOG", "info")
            .envs(env.iter().copied())
            // The tracing subscriber writes to stdout; errors before it go to stderr.
            .stdout(file.try_clone().expect("log file"))
            .stderr(file)
            .spawn()
            .expect("spawn gateway");
        let mut r = Running {
            child,
            public,
            admin,
            log,
            _log_dir: log_dir,
        };
        let deadline = std::time::Instant::now() + Duration::from_secs(20);
        loop {
            if let Some(status) = r.child.try_wait().expect("try_wait") {
                let log = r.log_text();
                if log.contains("Address already in use") {
                    return None;
                }
                panic!("gateway exited early with {status}: {log}");
            }
            if TcpStream::connect(admin).await.is_ok() && TcpStream::connect(public).await.is_ok() {
                return Some(r);
            }
            assert!(
                std::time::Instant::now() < deadline,
                "gateway did not listen within 20 s: {}",
                r.log_text()
            );
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Sends a signal (`TERM`, `HUP`, `INT`) with kill(1).
    pub fn signal(&self, name: &str) {
        let ok = std::process::Command::new("kill")
            .arg("-s")
            .arg(name)
            .arg(self.pid().to_string())
            .status()
            .expect("run kill")
            .success();
        assert!(ok, "kill -s {name} failed");
    }

    /// The log so far, without terminal colour codes.
    pub fn log_text(&self) -> String {
        strip_ansi(&self.raw_log_text())
    }

    /// The log so far, byte for byte.
    pub fn raw_log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Waits for the process to exit, up to `limit`.
    pub async fn wait_exit(&mut self, limit: Duration) -> Option<std::process::ExitStatus> {
        let deadline = std::time::Instant::now() + limit;
        loop {
            if let Some(s) = self.child.try_wait().expect("try_wait") {
                return Some(s);
            }
            if std::time::Instant::now() >= deadline {
                return None;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// Removes ANSI escape sequences (`ESC [ ... letter`).
pub fn strip_ansi(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    let mut chars = s.chars().peekable();
    while let Some(c) = chars.next() {
        if c == '\u{1b}' && chars.peek() == Some(&'[') {
            chars.next();
            for d in chars.by_ref() {
                if d.is_ascii_alphabetic() {
                    break;
                }
            }
        } else {
            out.push(c);
        }
    }
    out
}
