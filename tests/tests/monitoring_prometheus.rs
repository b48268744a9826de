//! The monitoring checked for real: `promtool check metrics` on a scrape of the running
//! gateway, then a real Prometheus (Debian's `prometheus` package) scraping the gateway's admin
//! listener every second while traffic flows, and every PromQL expression of the shipped
//! Grafana dashboard (`monitoring::dashboard_queries()`) evaluated through Prometheus's HTTP
//! API: each must succeed and return data.
//!
//! Needs `prometheus` and `promtool` on PATH (scripts/test installs Debian's package); the test
//! fails, never skips, when they are missing.

use std::io::Write as _;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::Method;
use http_body_util::Full;
use serde_json::Value;
use tests::*;

const TOKEN: &str = "/oauth/token";

/// serviceA then serviceB on nodes, inside the composite `checkout` declared on the policy, so
/// that the dashboard's composite panel has data. `x-a: ok` / `x-b: ok` make each step pass.
const SHOP: &str = r#"
policies:
  - name: shop
    route: { path: /checkout, methods: [GET] }
    monitoring: { composite: checkout }
    chain:
      - name: identify
        type: set_attribute
        attribute: authentication.subject.id
        value: "${http.header.x-client}"
      - name: step-a
        service: serviceA
        type: compare_attribute
        attribute: http.header.x-a
        equals: ok
      - name: step-b
        service: serviceB
        type: compare_attribute
        attribute: http.header.x-b
        equals: ok
      - name: done
        type: set_response
        body: done
"#;

/// The path of a required external tool; fails (never skips) when it is missing.
fn require_tool(name: &str) -> PathBuf {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .map(|d| d.join(name))
        .find(|p| p.is_file())
        .unwrap_or_else(|| {
            panic!(
                "`{name}` is not on PATH: this test needs Debian's `prometheus` package \
                 (promtool and a real Prometheus); scripts/test installs it \
                 (apt-get install prometheus)"
            )
        })
}

/// A Prometheus server, killed (by its own pid) when dropped, also when the test panics.
struct Prometheus {
    child: Child,
    addr: SocketAddr,
    log: PathBuf,
    _dir: tempfile::TempDir,
}

impl Prometheus {
    /// Starts Prometheus on a free loopback port, scraping `target` every second, and waits
    /// until it is ready.
    async fn start(bin: &Path, target: SocketAddr) -> Prometheus {
        let dir = tempfile::tempdir().expect("temp dir");
        let config = dir.path().join("prometheus.yml");
        std::fs::write(
            &config,
            format!(
                "global:\n  scrape_interval: 1s\n  scrape_timeout: 1s\n  evaluation_interval: 1s\n\
                 scrape_configs:\n  - job_name: gateway\n    metrics_path: /metrics\n    \
                 static_configs:\n      - targets: [\"{target}\"]\n"
            ),
        )
        .expect("write prometheus.yml");
        let data = dir.path().join("data");
        let log = dir.path().join("prometheus.log");
        let addr = free_addr();
        let child = Command::new(bin)
            .arg(format!("--config.file={}", config.display()))
            .arg(format!("--storage.tsdb.path={}", data.display()))
            .arg(format!("--web.listen-address={addr}"))
            .arg("--log.level=warn")
            .current_dir(dir.path())
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).expect("log file"))
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {}: {e}", bin.display()));
        let mut p = Prometheus {
            child,
            addr,
            log,
            _dir: dir,
        };
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if let Some(status) = p.child.try_wait().expect("try_wait") {
                panic!("prometheus exited early with {status}:\n{}", p.log_text());
            }
            if tokio::net::TcpStream::connect(addr).await.is_ok()
                && get(addr, "/-/ready").await.status == 200
            {
                return p;
            }
            assert!(
                Instant::now() < deadline,
                "prometheus was not ready within 20 s:\n{}",
                p.log_text()
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// `GET /api/v1/query?query=EXPR`: the whole JSON answer.
    async fn query(&self, expr: &str) -> Value {
        let q: String = form_urlencoded::byte_serialize(expr.as_bytes()).collect();
        let r = get(self.addr, &format!("/api/v1/query?query={q}")).await;
        let v: Value = serde_json::from_slice(&r.body).unwrap_or_else(|e| {
            panic!(
                "prometheus answered {} with non-JSON ({e}) for {expr}: {}",
                r.status,
                r.text()
            )
        });
        v
    }

    /// The first value of an instant vector query, if any.
    async fn scalar(&self, expr: &str) -> Option<f64> {
        let v = self.query(expr).await;
        v["data"]["result"][0]["value"][1]
            .as_str()
            .and_then(|s| s.parse().ok())
    }
}

impl Drop for Prometheus {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// A registered client on the default token endpoint, the `checkout` composite, and traffic.
struct Traffic {
    addr: SocketAddr,
    id: String,
    secret: String,
}

impl Traffic {
    async fn token(&self, auth: &str, form: &[(&str, &str)]) -> Resp {
        post_form(self.addr, TOKEN, &[("authorization", auth)], form).await
    }

    async fn checkout(&self, a: &str, b: &str) -> Resp {
        send(
            self.addr,
            request(Method::GET, "/checkout")
                .header("x-client", self.id.as_str())
                .header("x-a", a)
                .header("x-b", b)
                .body(Full::new(Bytes::new()))
                .unwrap(),
        )
        .await
    }

    /// One round: client credentials, a refresh, a reused refresh token, a bad secret, an
    /// unsupported grant, and the composite passing and failing.
    async fn round(&self) {
        let auth = basic(&self.id, &self.secret);
        let r = self
            .token(&auth, &[("grant_type", "client_credentials")])
            .await;
        assert_eq!(r.status, 200, "{}", r.text());
        let rt = r.json()["refresh_token"]
            .as_str()
            .expect("refresh_token")
            .to_owned();
        let refresh = [("grant_type", "refresh_token"), ("refresh_token", &rt)];
        let r = self.token(&auth, &refresh).await;
        assert_eq!(r.status, 200, "{}", r.text());
        let r = self.token(&auth, &refresh).await;
        assert_eq!(r.status, 400, "reuse: {}", r.text());
        let r = self
            .token(
                &basic(&self.id, "wrong-secret"),
                &[("grant_type", "client_credentials")],
            )
            .await;
        assert_eq!(r.status, 401, "{}", r.text());
        let r = self.token(&auth, &[("grant_type", "password")]).await;
        assert_eq!(r.status, 400, "{}", r.text());
        assert_eq!(self.checkout("ok", "ok").await.status, 200);
        assert_eq!(self.checkout("ok", "no").await.status, 403);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "external: needs Debian's prometheus; scripts/test runs it"]
async fn external_prometheus_scrapes_the_gateway_and_every_dashboard_query_has_data() {
    let prometheus_bin = require_tool("prometheus");
    let promtool = require_tool("promtool");

    let dir = PolicyDir::new(&[
        ("gateway.yaml", SETTINGS),
        ("token.yaml", &default_token_policy()),
        ("shop.yaml", SHOP),
    ]);
    let (id, secret) = add_client(dir.path(), "read", "client_credentials,refresh_token").await;
    let gw = dir.start().await;
    let traffic = Traffic {
        addr: gw.public_addr,
        id,
        secret,
    };
    // Every family has series before the first scrape.
    traffic.round().await;

    // 1. promtool: no complaints about the exposition.
    let scrape = get(gw.admin_addr, "/metrics").await;
    assert_eq!(scrape.status, 200);
    let mut check = Command::new(&promtool)
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("run promtool");
    check
        .stdin
        .take()
        .expect("stdin")
        .write_all(&scrape.body)
        .expect("feed promtool");
    let out = check.wait_with_output().expect("promtool output");
    let complaints = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        out.status.success() && complaints.trim().is_empty(),
        "promtool check metrics complained ({}):\n{complaints}",
        out.status
    );

    // 2. A real Prometheus scraping the admin listener every second.
    let prom = Prometheus::start(&prometheus_bin, gw.admin_addr).await;
    let scrapes = "count_over_time(up{job=\"gateway\"}[5m])";
    let first = Instant::now();
    // Traffic keeps flowing until at least 2 scrapes happened after the first round (the
    // series created by it are then in 2 samples, which rate() needs).
    loop {
        traffic.round().await;
        let n = prom.scalar(scrapes).await.unwrap_or(0.0);
        if n >= 3.0 {
            break;
        }
        assert!(
            first.elapsed() < Duration::from_secs(20),
            "prometheus scraped the gateway {n} times in 20 s:\n{}\ntargets: {}",
            prom.log_text(),
            get(prom.addr, "/api/v1/targets").await.text()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert_eq!(
        prom.scalar("up{job=\"gateway\"}").await,
        Some(1.0),
        "the last scrape of the gateway failed: {}",
        get(prom.addr, "/api/v1/targets").await.text()
    );

    // 3. Every dashboard query: success and data.
    let queries = monitoring::dashboard_queries();
    assert!(
        queries.len() >= 10,
        "the dashboard has only {} queries",
        queries.len()
    );
    let mut failures = Vec::new();
    for expr in &queries {
        // A query that has no data yet may only be waiting for the next scrape.
        let deadline = Instant::now() + Duration::from_secs(5);
        let verdict = loop {
            let v = prom.query(expr).await;
            let result = v["data"]["result"].as_array().cloned().unwrap_or_default();
            let numbers = result
                .iter()
                .filter_map(|s| s["value"][1].as_str())
                .filter(|x| x.parse::<f64>().is_ok_and(|f| !f.is_nan()))
                .count();
            let problem = if v["status"] != "success" {
                Some(format!("status {}: {v}", v["status"]))
            } else if v["data"]["resultType"] != "vector" {
                Some(format!("result type {}: {v}", v["data"]["resultType"]))
            } else if result.is_empty() {
                Some("empty result".to_owned())
            } else if numbers == 0 {
                Some(format!("every value is NaN: {v}"))
            } else {
                None
            };
            match problem {
                None => {
                    eprintln!("{expr}\n  -> {} series, e.g. {}", result.len(), result[0]);
                    break None;
                }
                Some(p) if Instant::now() >= deadline => break Some(p),
                Some(_) => {
                    traffic.round().await;
                    tokio::time::sleep(Duration::from_millis(250)).await;
                }
            }
        };
        if let Some(p) = verdict {
            failures.push(format!("  {expr}\n    -> {p}"));
        }
    }
    assert!(
        failures.is_empty(),
        "{} of {} dashboard queries have no data:\n{}",
        failures.len(),
        queries.len(),
        failures.join("\n")
    );
    drop(prom);
    gw.shutdown().await;
}
