//! Routing, branching on success/failure paths, templates, panic isolation and the admin
//! listener, against a real engine on 127.0.0.1:0.

use std::time::Duration;

use bytes::Bytes;
use http::{Method, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper_util::rt::TokioIo;
use tests::*;

const ROUTES: &str = r#"
policies:
  - name: exact
    route: { path: /api/users, methods: [GET] }
    chain: [{ name: r, type: set_response, body: exact }]
  - name: prefix-short
    route: { prefix: /api }
    chain: [{ name: r, type: set_response, body: prefix-api }]
  - name: prefix-long
    route: { prefix: /api/users }
    chain: [{ name: r, type: set_response, body: prefix-api-users }]
  - name: host-specific
    route: { prefix: /h, host: api.example }
    chain: [{ name: r, type: set_response, body: host-api }]
  - name: host-any
    route: { prefix: /h }
    chain: [{ name: r, type: set_response, body: host-any }]
  - name: host-only
    route: { path: /only-host, host: only.example }
    chain: [{ name: r, type: set_response, body: only }]
  - name: v6
    route: { path: /v6, host: "[::1]" }
    chain: [{ name: r, type: set_response, body: v6 }]
  - name: writes
    route: { path: /submit, methods: [POST, put] }
    chain: [{ name: r, type: set_response, status: 201, body: created }]
"#;

async fn get_host(addr: std::net::SocketAddr, path: &str, host: &str) -> Resp {
    send(
        addr,
        request_with_host(Method::GET, path, host)
            .body(Full::new(Bytes::new()))
            .unwrap(),
    )
    .await
}

#[tokio::test]
async fn exact_beats_prefix_and_longest_prefix_wins() {
    let dir = PolicyDir::new(&[("routes.yaml", ROUTES)]);
    let gw = dir.start().await;
    let a = gw.public_addr;
    for (path, want) in [
        ("/api/users", "exact"),
        ("/api/users?x=1", "exact"),
        ("/api/users/7", "prefix-api-users"),
        ("/api/users/", "prefix-api-users"),
        ("/api/other", "prefix-api"),
        ("/api", "prefix-api"),
    ] {
        let r = get(a, path).await;
        assert_eq!(r.status, StatusCode::OK, "{path}");
        assert_eq!(r.text(), want, "{path}");
    }
    // The exact route takes only GET: a POST falls through to the longest prefix.
    let r = post_form(a, "/api/users", &[], &[("a", "1")]).await;
    assert_eq!(r.text(), "prefix-api-users");
    gw.shutdown().await;
}

#[tokio::test]
async fn host_matching() {
    let dir = PolicyDir::new(&[("routes.yaml", ROUTES)]);
    let gw = dir.start().await;
    let a = gw.public_addr;
    assert_eq!(get_host(a, "/h/x", "api.example").await.text(), "host-api");
    // Case-insensitive, port ignored.
    assert_eq!(
        get_host(a, "/h/x", "API.Example:8080").await.text(),
        "host-api"
    );
    assert_eq!(
        get_host(a, "/h/x", "other.example").await.text(),
        "host-any"
    );
    assert_eq!(get(a, "/h").await.text(), "host-any");
    assert_eq!(
        get_host(a, "/only-host", "only.example").await.text(),
        "only"
    );
    let r = get_host(a, "/only-host", "else.example").await;
    assert_eq!(r.status, StatusCode::NOT_FOUND);
    // IPv6 literals keep their colons; only the port goes.
    assert_eq!(get_host(a, "/v6", "[::1]:8080").await.text(), "v6");
    assert_eq!(get_host(a, "/v6", "[::1]").await.text(), "v6");
    assert_eq!(
        get_host(a, "/v6", "[::2]:8080").await.status,
        StatusCode::NOT_FOUND
    );
    gw.shutdown().await;
}

#[tokio::test]
async fn no_route_is_404_json_and_wrong_method_is_405_with_allow() {
    let dir = PolicyDir::new(&[("routes.yaml", ROUTES)]);
    let gw = dir.start().await;
    let a = gw.public_addr;
    let r = get(a, "/nowhere").await;
    assert_eq!(r.status, StatusCode::NOT_FOUND);
    assert_eq!(r.header("content-type"), Some("application/json"));
    assert_eq!(r.json()["error"], "not_found");

    let r = get(a, "/submit").await;
    assert_eq!(r.status, StatusCode::METHOD_NOT_ALLOWED);
    assert_eq!(r.json()["error"], "method_not_allowed");
    let allow: Vec<String> = r
        .header("allow")
        .expect("Allow header")
        .split(',')
        .map(|s| s.trim().to_owned())
        .collect();
    assert_eq!(allow, ["POST", "PUT"]);

    let r = post_form(a, "/submit", &[], &[]).await;
    assert_eq!(r.status, StatusCode::CREATED);
    assert_eq!(r.text(), "created");
    let r = send(
        a,
        request(Method::PUT, "/submit")
            .body(Full::new(Bytes::new()))
            .unwrap(),
    )
    .await;
    assert_eq!(
        r.status,
        StatusCode::CREATED,
        "methods are case-insensitive in YAML"
    );
    gw.shutdown().await;
}

const BRANCH: &str = r#"
policies:
  - name: branch
    route: { path: /branch }
    chain:
      - name: check-role
        type: compare_attribute
        attribute: http.header.x-role
        one_of: [admin, ops]
        on_failure: denied
      - name: mark
        type: set_attribute
        attribute: who
        value: "role=${http.header.x-role}"
        on_success: answer
      - name: skipped
        type: set_header
        header: x-skipped
        value: "yes"
      - name: answer
        type: set_response
        status: 200
        headers: { x-who: "${who}" }
        body: "ok ${who} q=${http.query.a} f=${http.form.b}"
      - name: denied
        type: set_response
        status: 403
        content_type: application/json
        body: '{"denied":"${failure.reason}","role":"${http.header.x-role}"}'
  - name: headers
    route: { path: /headers }
    chain:
      - name: echo
        type: set_header
        header: x-echo
        value: "in=${http.header.x-in}"
      - name: const
        type: set_header
        header: x-const
        value: fixed
      - name: numeric-id
        type: compare_attribute
        attribute: http.query.id
        matches: "^[0-9]+$"
      - name: answer
        type: set_response
        body: "id=${http.query.id}"
"#;

#[tokio::test]
async fn failure_path_success_edges_and_templates() {
    let dir = PolicyDir::new(&[("branch.yaml", BRANCH)]);
    let gw = dir.start().await;
    let a = gw.public_addr;

    // Success path: `mark` jumps over `skipped` straight to `answer`.
    let r = post_form(
        a,
        "/branch?a=qv",
        &[("x-role", "ops")],
        &[("b", "form value")],
    )
    .await;
    assert_eq!(r.status, StatusCode::OK);
    assert_eq!(r.text(), "ok role=ops q=qv f=form value");
    assert_eq!(r.header("x-who"), Some("role=ops"));
    assert_eq!(
        r.header("x-skipped"),
        None,
        "on_success must skip the `skipped` node"
    );

    // Failure path: compare_attribute fails over to `denied`, which sees failure.reason.
    let r = post_form(a, "/branch", &[("x-role", "guest")], &[]).await;
    assert_eq!(r.status, StatusCode::FORBIDDEN);
    let j = r.json();
    assert_eq!(j["denied"], "http.header.x-role did not match", "{j}");
    assert_eq!(j["role"], "guest");

    // A missing attribute fails too.
    let r = get(a, "/branch").await;
    assert_eq!(r.status, StatusCode::FORBIDDEN);
    assert_eq!(r.json()["denied"], "http.header.x-role did not match");
    gw.shutdown().await;
}

#[tokio::test]
async fn set_header_and_own_failure_response() {
    let dir = PolicyDir::new(&[("branch.yaml", BRANCH)]);
    let gw = dir.start().await;
    let a = gw.public_addr;
    let r = send(
        a,
        request(Method::GET, "/headers?id=42")
            .header("x-in", "hello")
            .body(Full::new(Bytes::new()))
            .unwrap(),
    )
    .await;
    assert_eq!(r.status, StatusCode::OK);
    assert_eq!(r.text(), "id=42");
    assert_eq!(r.header("x-echo"), Some("in=hello"));
    assert_eq!(r.header("x-const"), Some("fixed"));

    // No failure edge: compare_attribute's own 403 JSON.
    let r = get(a, "/headers?id=4x2").await;
    assert_eq!(r.status, StatusCode::FORBIDDEN);
    assert_eq!(r.json()["error"], "forbidden");
    gw.shutdown().await;
}

const PANIC: &str = r#"
policies:
  - name: boom
    route: { path: /panic }
    chain:
      - { name: explode, type: test_panic }
      - { name: never, type: set_response, body: unreachable }
  - name: boom-now
    route: { path: /panic-now }
    chain:
      - { name: first, type: set_attribute, attribute: a, value: "1" }
      - { name: explode, type: test_panic, now: true }
      - { name: never, type: set_response, body: unreachable }
  - name: fine
    route: { path: /ok }
    chain: [{ name: r, type: set_response, body: fine }]
"#;

#[tokio::test]
async fn a_panicking_filter_yields_500_and_the_server_keeps_serving() {
    let dir = PolicyDir::new(&[("p.yaml", PANIC)]);
    let gw = dir.start_with(test_kinds::KINDS).await;
    let a = gw.public_addr;
    // A panic while the chain waits, and one in a node that answers without waiting (the
    // request is then answered without a future): both are a 500.
    for path in ["/panic", "/panic-now"] {
        let r = get(a, path).await;
        assert_eq!(r.status, StatusCode::INTERNAL_SERVER_ERROR, "{path}");
        assert_eq!(r.header("content-type"), Some("application/json"));
        assert_eq!(r.json()["error"], "server_error");
    }
    let r = get(a, "/ok").await;
    assert_eq!(r.status, StatusCode::OK);
    assert_eq!(r.text(), "fine");

    // The same keep-alive connection survives the panic.
    let stream = tokio::net::TcpStream::connect(a).await.unwrap();
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .unwrap();
    tokio::spawn(conn);
    for (path, status) in [
        ("/panic", 500),
        ("/ok", 200),
        ("/panic-now", 500),
        ("/ok", 200),
    ] {
        sender.ready().await.expect("connection still open");
        let resp = sender
            .send_request(
                request(Method::GET, path)
                    .body(Full::new(Bytes::new()))
                    .unwrap(),
            )
            .await
            .expect("response on the same connection");
        assert_eq!(resp.status().as_u16(), status, "{path}");
        resp.into_body().collect().await.unwrap();
    }
    gw.shutdown().await;
}

const ADMIN: &str = r#"
stores:
  tokens: { type: memory }
policies:
  - name: catch-all
    route: { prefix: /zzz }
    chain: [{ name: r, type: set_response, body: public }]
  - name: who
    service: who-service
    route: { path: /who }
    chain:
      - name: subject
        type: set_attribute
        attribute: authentication.subject.id
        value: "${http.header.x-client}"
      - name: nap
        type: test_sleep
        ms: 0
      - name: answer
        type: set_response
        body: "hi"
  - name: nap-once
    route: { path: /nap-once }
    chain:
      - { name: before, type: set_attribute, attribute: a, value: "1" }
      - { name: nap, type: test_sleep, ms: 0 }
      - { name: answer, type: set_response, body: "asked ${test.asked_now} a=${a}" }
  - name: slow
    route: { path: /slow }
    chain:
      - { name: nap, type: test_sleep, ms: 600 }
      - { name: answer, type: set_response, body: "slept ${test.slept_ms}" }
"#;

#[tokio::test]
async fn admin_endpoints_exist_only_on_the_admin_listener() {
    let dir = PolicyDir::new(&[("a.yaml", ADMIN)]);
    let gw = dir.start_with(test_kinds::KINDS).await;
    let r = get(gw.admin_addr, "/healthz").await;
    assert_eq!(r.status, StatusCode::OK);
    let r = get(gw.admin_addr, "/readyz").await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text());
    assert_eq!(r.json()["ready"], true);
    let r = get(gw.admin_addr, "/metrics").await;
    assert_eq!(r.status, StatusCode::OK);
    assert!(r.header("content-type").unwrap().starts_with("text/plain"));
    let text = r.text();
    assert!(text.contains("gateway_requests_in_flight"), "{text}");
    assert!(text.contains("gateway_connections_open"), "{text}");
    let r = get(gw.admin_addr, "/nope").await;
    assert_eq!(r.status, StatusCode::NOT_FOUND);
    // Policies are not served on the admin listener.
    assert_eq!(
        get(gw.admin_addr, "/zzz").await.status,
        StatusCode::NOT_FOUND
    );

    for path in ["/healthz", "/readyz", "/metrics", "/reload"] {
        let r = get(gw.public_addr, path).await;
        assert_eq!(
            r.status,
            StatusCode::NOT_FOUND,
            "{path} on the public listener"
        );
        assert_eq!(r.json()["error"], "not_found");
        let r = post_form(gw.public_addr, path, &[], &[]).await;
        assert_eq!(
            r.status,
            StatusCode::NOT_FOUND,
            "POST {path} on the public listener"
        );
    }
    // /reload takes POST only.
    assert_eq!(
        get(gw.admin_addr, "/reload").await.status,
        StatusCode::METHOD_NOT_ALLOWED
    );
    gw.shutdown().await;
}

fn metric_value(text: &str, series: &str) -> Option<f64> {
    text.lines()
        .find(|l| l.starts_with(series) && l[series.len()..].starts_with(' '))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
}

/// A node that must wait is asked once whether it can answer at once (it declines), then
/// awaited: the engine does not ask it again when the request goes on in its future.
#[tokio::test]
async fn a_waiting_node_is_asked_once_then_awaited() {
    let dir = PolicyDir::new(&[("a.yaml", ADMIN)]);
    let gw = dir.start_with(test_kinds::KINDS).await;
    let r = get(gw.public_addr, "/nap-once").await;
    assert_eq!(r.status, StatusCode::OK);
    assert_eq!(r.text(), "asked 1 a=1");
    gw.shutdown().await;
}

#[tokio::test]
async fn metrics_count_services_by_client_and_track_in_flight() {
    let dir = PolicyDir::new(&[("a.yaml", ADMIN)]);
    let gw = dir.start_with(test_kinds::KINDS).await;
    gw.state.monitoring.set_known_clients(vec!["app-1".into()]);
    let a = gw.public_addr;
    for client in ["app-1", "app-1", "stranger"] {
        let r = send(
            a,
            request(Method::GET, "/who")
                .header("x-client", client)
                .body(Full::new(Bytes::new()))
                .unwrap(),
        )
        .await;
        assert_eq!(r.status, StatusCode::OK);
    }
    let r = get(a, "/who").await;
    assert_eq!(r.status, StatusCode::OK);

    let text = get(gw.admin_addr, "/metrics").await.text();
    let series = |client: &str| {
        format!(
            r#"gateway_service_requests_total{{client="{client}",outcome="success",service="who-service"}}"#
        )
    };
    assert_eq!(metric_value(&text, &series("app-1")), Some(2.0), "{text}");
    assert_eq!(metric_value(&text, &series("other")), Some(1.0), "{text}");
    assert_eq!(
        metric_value(&text, &series("anonymous")),
        Some(1.0),
        "{text}"
    );

    // In flight: one slow request is counted while it runs, and not after.
    let slow = tokio::spawn(async move { get(a, "/slow").await });
    let mut seen = None;
    for _ in 0..40 {
        tokio::time::sleep(Duration::from_millis(10)).await;
        let t = get(gw.admin_addr, "/metrics").await.text();
        let v = metric_value(&t, "gateway_requests_in_flight");
        if v == Some(1.0) {
            seen = v;
            let conns = metric_value(&t, "gateway_connections_open").unwrap_or(0.0);
            assert!(conns >= 1.0, "open connections while one request runs: {t}");
            break;
        }
    }
    assert_eq!(
        seen,
        Some(1.0),
        "in-flight gauge never showed the slow request"
    );
    let r = slow.await.unwrap();
    assert_eq!(r.text(), "slept 600");
    // The client side closed; the server notices promptly.
    let mut last = None;
    for _ in 0..50 {
        let t = get(gw.admin_addr, "/metrics").await.text();
        last = metric_value(&t, "gateway_requests_in_flight");
        if last == Some(0.0) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_eq!(last, Some(0.0));
    gw.shutdown().await;
}
