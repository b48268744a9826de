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
    Resp { status: parts.status, headers: parts.headers, body }
}

pub fn request(method: Method, path: &str) -> http::request::Builder {
    Request::builder().method(method).uri(path).header("host", "localhost")
}

pub async fn get(addr: SocketAddr, path: &str) -> Resp {
    send(addr, request(Method::GET, path).body(Full::new(Bytes::new())).unwrap()).await
}

/// POSTs an `application/x-www-form-urlencoded` body built from `form`.
pub async fn post_form(addr: SocketAddr, path: &str, headers: &[(&str, &str)], form: &[(&str, &str)]) -> Resp {
    let body = form_urlencoded::Serializer::new(String::new()).extend_pairs(form).finish();
    let mut b = request(Method::POST, path).header("content-type", "application/x-www-form-urlencoded");
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
    let added = engine::clients::add(&registry, "test app", scopes, grants).await.expect("add client");
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

/// The path to the `gateway` binary built for these tests.
pub fn gateway_bin() -> PathBuf {
    let target = std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("../target"));
    // The test binary lives in target/<profile>/deps; the gateway in target/<profile>.
    let exe = std::env::current_exe().expect("current exe");
    let profile_dir = exe.parent().and_then(Path::parent).map(Path::to_path_buf);
    let candidates = [profile_dir.map(|d| d.join("gateway")), Some(target.join("debug").join("gateway"))];
    candidates
        .into_iter()
        .flatten()
        .find(|p| p.exists())
        .expect("the gateway binary (cargo builds it for the tests package: engine is a dependency with a bin)")
}
