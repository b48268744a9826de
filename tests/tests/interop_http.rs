//! Clients no one here wrote: `curl` and Python's `http.client` against the running `gateway`
//! binary (a GET route, a POST form with a failure path, keep-alive, chunked bodies, limits),
//! plus `${ENV}` expansion from the real process environment.

use std::path::Path;
use std::process::Command;

use tests::*;

const POLICIES: &str = r#"
policies:
  - name: hello
    route: { path: /hello, methods: [GET] }
    chain:
      - name: r
        type: set_response
        content_type: text/plain
        headers: { x-q: "${http.query.name}" }
        body: "hello ${http.query.name}"
  - name: form
    route: { path: /form, methods: [POST] }
    chain:
      - name: need-b
        type: compare_attribute
        attribute: http.form.b
        matches: "^.+$"
        on_failure: missing
      - name: ok
        type: set_response
        status: 201
        content_type: application/json
        body: '{"a":"${http.form.a}","b":"${http.form.b}"}'
      - name: missing
        type: set_response
        status: 400
        content_type: application/json
        body: '{"error":"missing b"}'
  - name: env
    route: { path: /env }
    chain: [{ name: r, type: set_response, body: "${GATEWAY_TEST_GREETING}" }]
"#;

fn curl(args: &[&str]) -> (String, String) {
    let out = Command::new("curl")
        .args(["-sS", "--max-time", "10"])
        .args(args)
        .output()
        .expect("curl is installed");
    assert!(
        out.status.success(),
        "curl {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    (
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[tokio::test]
async fn curl_against_the_binary() {
    let dir = PolicyDir::new(&[("p.yaml", POLICIES)]);
    let gw = Running::start_with_env(dir.path(), &[("GATEWAY_TEST_GREETING", "from env")]).await;
    let base = format!("http://{}", gw.public);

    // GET with headers shown.
    let (out, _) = tokio::task::spawn_blocking({
        let u = format!("{base}/hello?name=curl");
        move || curl(&["-i", &u])
    })
    .await
    .unwrap();
    let out = out.replace("\r\n", "\n");
    assert!(out.starts_with("HTTP/1.1 200"), "{out}");
    assert!(out.to_ascii_lowercase().contains("\nx-q: curl\n"), "{out}");
    assert!(out.ends_with("\n\nhello curl"), "{out}");

    let base2 = base.clone();
    tokio::task::spawn_blocking(move || {
        let base = base2;
        // POST form, the success path and the failure path; status printed by -w.
        let (out, _) = curl(&[
            "-w",
            "\n%{http_code}",
            "--data-urlencode",
            "a=x y",
            "--data-urlencode",
            "b=1&2",
            &format!("{base}/form"),
        ]);
        assert_eq!(out, "{\"a\":\"x y\",\"b\":\"1&2\"}\n201");
        let (out, _) = curl(&["-w", "\n%{http_code}", "-d", "a=1", &format!("{base}/form")]);
        assert_eq!(out, "{\"error\":\"missing b\"}\n400");

        // Two URLs in one invocation share the connection.
        let (out, err) = curl(&[
            "-v",
            &format!("{base}/hello?name=one"),
            &format!("{base}/hello?name=two"),
        ]);
        assert_eq!(out, "hello onehello two");
        assert!(
            err.contains("Re-using existing connection")
                || err.contains("Reusing existing connection"),
            "{err}"
        );

        // Wrong method, 405 with Allow; no route, 404 JSON.
        let (out, _) = curl(&["-i", "-X", "DELETE", &format!("{base}/hello")]);
        let out = out.replace("\r\n", "\n").to_ascii_lowercase();
        assert!(out.starts_with("http/1.1 405"), "{out}");
        assert!(out.contains("\nallow: get\n"), "{out}");
        let (out, _) = curl(&["-w", "\n%{http_code}", &format!("{base}/nowhere")]);
        assert!(
            out.ends_with("\n404") && out.contains("\"not_found\""),
            "{out}"
        );

        // 100 KB form (curl sends Expect: 100-continue): refused with 413 before the upload.
        let big = tempfile::NamedTempFile::new().unwrap();
        std::fs::write(big.path(), format!("b={}", "x".repeat(100 * 1024))).unwrap();
        let (out, _) = curl(&[
            "-w",
            "\n%{http_code}",
            "--data-binary",
            &format!("@{}", big.path().display()),
            &format!("{base}/form"),
        ]);
        assert!(out.ends_with("\n413"), "{out}");

        // `${GATEWAY_TEST_GREETING}` came from the process environment.
        let (out, _) = curl(&[&format!("{base}/env")]);
        assert_eq!(out, "from env");
    })
    .await
    .unwrap();

    // Each request's log line names the policy, the nodes it passed through and the status.
    let log = gw.log_text();
    assert!(
        log.lines().any(|l| l.contains("policy=form")
            && l.contains("nodes=need-b>missing")
            && l.contains("status=400")),
        "{log}"
    );
    assert!(
        log.lines().any(|l| l.contains("policy=form")
            && l.contains("nodes=need-b>ok")
            && l.contains("status=201")),
        "{log}"
    );
}

#[tokio::test]
async fn python_http_client_against_the_binary() {
    let dir = PolicyDir::new(&[("p.yaml", POLICIES)]);
    let gw = Running::start_with_env(dir.path(), &[("GATEWAY_TEST_GREETING", "x")]).await;
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/interop_http.py");
    let python = std::env::var("GATEWAY_TEST_PYTHON").unwrap_or_else(|_| "python3".into());
    let addr = gw.public;
    let out = tokio::task::spawn_blocking(move || {
        Command::new(python)
            .arg(script)
            .arg(addr.ip().to_string())
            .arg(addr.port().to_string())
            .output()
            .expect("python3 is installed")
    })
    .await
    .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stdout}{stderr}");
    assert_eq!(stdout.trim(), "ok");
}

#[tokio::test]
async fn logs_written_to_a_file_have_no_colour_codes() {
    let dir = PolicyDir::new(&[("p.yaml", POLICIES)]);
    let gw = Running::start_with_env(dir.path(), &[("GATEWAY_TEST_GREETING", "x")]).await;
    assert_eq!(get(gw.public, "/hello?name=log").await.text(), "hello log");
    let log = gw.raw_log_text();
    assert!(log.contains("policy"), "{log}");
    assert!(!log.contains('\u{1b}'), "{log:?}");
}
