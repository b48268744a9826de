//! `gateway clients ...` through the real binary, against a running gateway that must see every
//! change without a restart.

use std::path::Path;
use std::process::Output;
use std::time::Duration;

use tests::{PolicyDir, Running, SETTINGS, basic, built_gateway_bin, post_form};

fn clients(dir: &Path, args: &[&str]) -> Output {
    std::process::Command::new(built_gateway_bin())
        .arg("clients")
        .args(args)
        .arg("--policies")
        .arg(dir)
        .env("RUST_LOG", "warn")
        .output()
        .expect("run gateway clients")
}

fn json(out: &Output) -> serde_json::Value {
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout)
        .unwrap_or_else(|e| panic!("{e}: {}", String::from_utf8_lossy(&out.stdout)))
}

async fn token_status(addr: std::net::SocketAddr, id: &str, secret: &str) -> u16 {
    post_form(
        addr,
        "/oauth/token",
        &[("authorization", &basic(id, secret))],
        &[("grant_type", "client_credentials")],
    )
    .await
    .status
    .as_u16()
}

/// The registry file is re-read at most once a second.
async fn settle() {
    tokio::time::sleep(Duration::from_millis(1200)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn add_list_disable_enable_rotate_through_the_binary() {
    let dir = PolicyDir::new(&[
        ("gateway.yaml", SETTINGS),
        ("token.yaml", &tests::default_token_policy()),
    ]);
    let gw = Running::start(dir.path()).await;

    let added = json(&clients(
        dir.path(),
        &[
            "add",
            "--name",
            "billing",
            "--scopes",
            "read write",
            "--grants",
            "client_credentials,refresh_token",
            "--json",
        ],
    ));
    let id = added["client_id"].as_str().unwrap().to_owned();
    let secret = added["client_secret"].as_str().unwrap().to_owned();
    assert!(secret.len() >= 43, "at least 256 bits of alphanumerics");
    assert_eq!(added["scopes"], serde_json::json!(["read", "write"]));
    let stored = std::fs::read_to_string(dir.registry_path()).unwrap();
    assert!(
        stored.contains(&id) && !stored.contains(&secret),
        "only the digest is written"
    );

    settle().await;
    assert_eq!(
        token_status(gw.public, &id, &secret).await,
        200,
        "a running gateway sees the new client"
    );

    let list = json(&clients(dir.path(), &["list", "--json"]));
    assert_eq!(list[0]["client_id"], id.as_str());
    assert_eq!(list[0]["enabled"], true);
    assert!(!String::from_utf8_lossy(&clients(dir.path(), &["list"]).stdout).contains(&secret));

    assert!(clients(dir.path(), &["disable", &id]).status.success());
    settle().await;
    assert_eq!(
        token_status(gw.public, &id, &secret).await,
        401,
        "a disabled client is refused"
    );
    assert!(clients(dir.path(), &["enable", &id]).status.success());

    let rotated = json(&clients(dir.path(), &["rotate-secret", &id, "--json"]));
    let new_secret = rotated["client_secret"].as_str().unwrap();
    assert_ne!(new_secret, secret);
    settle().await;
    assert_eq!(
        token_status(gw.public, &id, &secret).await,
        401,
        "the old secret stops working"
    );
    assert_eq!(token_status(gw.public, &id, new_secret).await, 200);
}

#[tokio::test]
async fn bad_arguments_fail_with_a_message_and_change_nothing() {
    let dir = PolicyDir::new(&[("gateway.yaml", SETTINGS)]);
    let out = clients(dir.path(), &["add", "--name", "x", "--grants", "password"]);
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("unknown grant type"),
        "{out:?}"
    );
    let out = clients(dir.path(), &["disable", "no-such-client"]);
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("no-such-client"),
        "{out:?}"
    );
    assert!(!dir.registry_path().exists(), "nothing was written");

    // A folder without `applications:` has no registry to manage.
    let bare = PolicyDir::new(&[("gateway.yaml", "listen: 127.0.0.1:8080\n")]);
    let out = clients(bare.path(), &["list"]);
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("applications"),
        "{out:?}"
    );
}
