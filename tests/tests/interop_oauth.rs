//! Interop with an OAuth client library nobody here wrote: Python's authlib (installed by
//! `scripts/test` into a virtualenv whose interpreter is in GATEWAY_TEST_PYTHON) fetches a
//! token with client credentials and refreshes it, with `client_secret_basic` and
//! `client_secret_post`.

use tests::{PolicyDir, SETTINGS, add_client};

fn python() -> String {
    std::env::var("GATEWAY_TEST_PYTHON").unwrap_or_else(|_| {
        panic!("GATEWAY_TEST_PYTHON is not set: run scripts/test, which installs authlib into a virtualenv")
    })
}

async fn authlib_round_trip(method: &str, credentials_in: &str) {
    let policy = tests::default_token_policy().replace(
        "client_credentials_in: authorization_header",
        &format!("client_credentials_in: {credentials_in}"),
    );
    let dir = PolicyDir::new(&[("gateway.yaml", SETTINGS), ("token.yaml", &policy)]);
    let (id, secret) =
        add_client(dir.path(), "read write", "client_credentials,refresh_token").await;
    let gw = dir.start().await;
    let url = format!("http://{}/oauth/token", gw.public_addr);
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/py/authlib_refresh.py");
    let out = tokio::process::Command::new(python())
        .args([script, &url, &id, &secret, method])
        .output()
        .await
        .expect("run python");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "authlib ({method}) failed: {stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let seen: serde_json::Value = serde_json::from_str(stdout.trim()).expect("script output");
    assert_eq!(seen["access_len"], 54);
    assert_eq!(seen["refresh_len"], 46);
    assert_eq!(seen["reuse_error"], "invalid_grant");
    gw.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "external: needs GATEWAY_TEST_PYTHON (authlib); scripts/test sets it"]
async fn external_authlib_client_secret_basic() {
    authlib_round_trip("client_secret_basic", "authorization_header").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "external: needs GATEWAY_TEST_PYTHON (authlib); scripts/test sets it"]
async fn external_authlib_client_secret_post() {
    authlib_round_trip("client_secret_post", "form_body").await;
}
