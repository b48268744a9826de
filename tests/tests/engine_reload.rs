//! Hot reload: `POST /reload` on the admin listener and SIGHUP to the binary; a valid set is
//! swapped in (requests in flight finish on the old one, token stores survive), an invalid set
//! is refused and the old one keeps serving.

use std::sync::Arc;
use std::time::Duration;

use http::StatusCode;
use tests::*;

const V1: &str = r#"
policies:
  - name: old
    route: { path: /old }
    chain:
      - { name: nap, type: test_sleep, ms: 800 }
      - { name: answer, type: set_response, body: "old v1" }
  - name: a
    route: { path: /a }
    chain: [{ name: r, type: set_response, body: "a v1" }]
"#;

const V2: &str = r#"
policies:
  - name: old
    route: { path: /old }
    chain: [{ name: answer, type: set_response, body: "old v2" }]
  - name: a
    route: { path: /a }
    chain: [{ name: r, type: set_response, body: "a v2" }]
  - name: new
    route: { path: /new }
    chain: [{ name: r, type: set_response, body: "new route" }]
"#;

#[tokio::test]
async fn reload_swaps_in_a_valid_set_and_in_flight_requests_finish_on_the_old_one() {
    let dir = PolicyDir::new(&[("p.yaml", V1)]);
    let gw = dir.start_with(test_kinds::KINDS).await;
    let a = gw.public_addr;
    assert_eq!(get(a, "/new").await.status, StatusCode::NOT_FOUND);

    let in_flight = tokio::spawn(async move { get(a, "/old").await });
    tokio::time::sleep(Duration::from_millis(150)).await;
    dir.write("p.yaml", V2);
    let r = tests::post_reload(&gw).await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text());
    assert_eq!(r.json()["reloaded"], true);

    let r = get(a, "/new").await;
    assert_eq!((r.status, r.text().as_str()), (StatusCode::OK, "new route"));
    assert_eq!(get(a, "/a").await.text(), "a v2");
    assert_eq!(get(a, "/old").await.text(), "old v2");
    let old = in_flight.await.unwrap();
    assert_eq!(
        (old.status, old.text().as_str()),
        (StatusCode::OK, "old v1"),
        "the request in flight finishes on the set it started with"
    );
    let metrics = get(gw.admin_addr, "/metrics").await.text();
    assert!(
        metrics.contains(r#"gateway_policy_reloads_total{result="ok"} 1"#),
        "{metrics}"
    );
    gw.shutdown().await;
}

#[tokio::test]
async fn an_invalid_set_is_refused_with_422_and_the_old_set_keeps_serving() {
    let dir = PolicyDir::new(&[("p.yaml", V2)]);
    let gw = dir.start_with(test_kinds::KINDS).await;
    let a = gw.public_addr;
    dir.write(
        "p.yaml",
        "policies:\n  - name: a\n    route: { path: /a }\n    chain: [{ name: r, type: set_responze }]\n",
    );
    dir.write("q.yaml", "limits: { max_body_bytez: 1 }\n");
    let r = tests::post_reload(&gw).await;
    assert_eq!(r.status, StatusCode::UNPROCESSABLE_ENTITY);
    let j = r.json();
    assert_eq!(j["reloaded"], false);
    let errors: Vec<String> = j["errors"]
        .as_array()
        .expect("errors array")
        .iter()
        .map(|e| e.as_str().unwrap().to_owned())
        .collect();
    assert_eq!(errors.len(), 2, "{errors:?}");
    assert!(
        errors[0].contains("p.yaml:4:")
            && errors[0].contains("unknown filter type \"set_responze\""),
        "{errors:?}"
    );
    assert!(
        errors[1].contains("q.yaml:1:") && errors[1].contains("limits.max_body_bytez"),
        "{errors:?}"
    );
    // The previous set still answers, all of it.
    assert_eq!(get(a, "/a").await.text(), "a v2");
    assert_eq!(get(a, "/new").await.text(), "new route");
    // The library call reports the same.
    assert_eq!(gw.reload().await.expect_err("invalid").0.len(), 2);
    let metrics = get(gw.admin_addr, "/metrics").await.text();
    assert!(
        metrics.contains(r#"gateway_policy_reloads_total{result="error"} 2"#),
        "{metrics}"
    );

    // Fixing the folder makes the next reload succeed.
    std::fs::remove_file(dir.path().join("q.yaml")).unwrap();
    dir.write("p.yaml", V1);
    assert_eq!(tests::post_reload(&gw).await.status, StatusCode::OK);
    assert_eq!(get(a, "/a").await.text(), "a v1");
    assert_eq!(get(a, "/new").await.status, StatusCode::NOT_FOUND);
    gw.shutdown().await;
}

fn token_set(store_line: &str) -> String {
    format!(
        "stores:\n  tokens: {store_line}\napplications: {{ type: file, path: state/clients.yaml }}\n"
    )
}

#[tokio::test]
async fn token_stores_and_their_tokens_survive_a_reload() {
    let dir = PolicyDir::new(&[
        ("gateway.yaml", &token_set("{ type: memory }")),
        ("token.yaml", &default_token_policy()),
    ]);
    let (id, secret) = add_client(dir.path(), "", "client_credentials,refresh_token").await;
    let gw = dir.start().await;
    let a = gw.public_addr;
    let auth = basic(&id, &secret);
    let r = post_form(
        a,
        "/oauth/token",
        &[("authorization", &auth)],
        &[("grant_type", "client_credentials")],
    )
    .await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.status);
    let refresh = r.json()["refresh_token"]
        .as_str()
        .expect("a refresh token")
        .to_owned();

    let before = gw.state.runtime.load().stores["tokens"].clone();
    // A change elsewhere in the set: the store's settings are unchanged, so it is reused.
    dir.write(
        "extra.yaml",
        "policies:\n  - name: extra\n    route: { path: /extra }\n    chain: [{ name: r, type: set_response, body: extra }]\n",
    );
    gw.reload().await.expect("valid reload");
    let after = gw.state.runtime.load().stores["tokens"].clone();
    assert!(Arc::ptr_eq(&before, &after), "the store handle is reused");
    assert!(Arc::ptr_eq(&before.store, &after.store), "the same store");
    assert_eq!(get(a, "/extra").await.text(), "extra");

    // The token issued before the reload still refreshes.
    let r = post_form(
        a,
        "/oauth/token",
        &[("authorization", &auth)],
        &[("grant_type", "refresh_token"), ("refresh_token", &refresh)],
    )
    .await;
    assert_eq!(r.status, StatusCode::OK, "refresh after reload");
    assert!(r.json()["access_token"].is_string());

    // Changed store settings open a new store.
    dir.write(
        "gateway.yaml",
        &token_set("{ type: memory, max_tokens: 5000 }"),
    );
    gw.reload().await.expect("valid reload");
    let changed = gw.state.runtime.load().stores["tokens"].clone();
    assert!(
        !Arc::ptr_eq(&before.store, &changed.store),
        "new settings, new store"
    );
    gw.shutdown().await;
}

#[tokio::test]
async fn sighup_reloads_the_running_binary() {
    let v = |body: &str| {
        format!(
            "policies:\n  - name: v\n    route: {{ path: /v }}\n    chain: [{{ name: r, type: set_response, body: \"{body}\" }}]\n"
        )
    };
    let dir = PolicyDir::new(&[("p.yaml", &v("one"))]);
    let mut gw = Running::start(dir.path()).await;
    assert_eq!(get(gw.public, "/v").await.text(), "one");

    dir.write("p.yaml", &v("two"));
    gw.signal("HUP");
    let mut body = String::new();
    for _ in 0..100 {
        body = get(gw.public, "/v").await.text();
        if body == "two" {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(body, "two", "SIGHUP did not reload: {}", gw.log_text());

    // An invalid set on SIGHUP: refused, logged, the process keeps serving the last good set.
    dir.write("p.yaml", "policies: [ {\n");
    gw.signal("HUP");
    let mut logged = false;
    for _ in 0..100 {
        if gw.log_text().contains("reload refused") {
            logged = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(logged, "{}", gw.log_text());
    assert!(gw.child.try_wait().unwrap().is_none(), "still running");
    assert_eq!(get(gw.public, "/v").await.text(), "two");
    let r = get(gw.admin, "/metrics").await.text();
    assert!(
        r.contains(r#"gateway_policy_reloads_total{result="error"} 1"#),
        "{r}"
    );

    gw.signal("TERM");
    let status = gw.wait_exit(Duration::from_secs(10)).await.expect("exits");
    assert!(status.success(), "{status}");
}
