//! Policy validation: every error class with its file, line, column and YAML path, all
//! reported in one pass, through the library (`engine::check`) and the `gateway` binary.

use std::path::Path;
use std::time::{Duration, Instant};

use tests::*;

/// Line numbers matter: each mistake below is asserted at its exact position.
const A: &str = r#"listen: 127.0.0.1:0
limitz: 1
limits:
  max_body_bytez: 10
stores:
  tokens: { type: memory }
policies:
  - name: wrong-type
    route: { path: /a, methods: GET }
    chain: [{ name: r, type: set_response }]
  - name: unknown-kind
    route: { path: /b }
    chain:
      - name: x
        type: no_such_filter
  - name: dangling
    route: { path: /c }
    chain:
      - name: first
        type: compare_attribute
        attribute: http.path
        equals: /c
        on_failure: nowhere
  - name: loop
    route: { path: /d }
    chain:
      - name: one
        type: set_attribute
        attribute: a
        value: b
        on_success: two
      - name: two
        type: set_attribute
        attribute: a
        value: b
        on_success: one
  - name: dup-nodes
    route: { path: /e }
    chain:
      - { name: same, type: set_response }
      - { name: same, type: set_response }
  - name: shared
    route: { path: /f }
    chain: [{ name: r, type: set_response, status: 999 }]
  - name: env
    route: { path: /g }
    chain: [{ name: r, type: set_response, body: "${GATEWAY_TEST_SURELY_UNSET}" }]
  - name: tokenz
    route: { path: /h, methods: [POST] }
    chain:
      - name: refresh
        type: refresh_access_token
        access_token: { store: tokenz }
"#;

const B: &str = r#"listen: 127.0.0.1:1
policies:
  - name: shared
    route: { path: /other }
    chain: [{ name: r, type: set_response }]
"#;

const C_SYNTAX: &str = "policies:\n  - name: broken\n    route: { path: /x\n";

/// (file, line, column, path, a piece of the message)
const EXPECTED: &[(&str, usize, usize, &str, &str)] = &[
    ("a.yaml", 2, 1, "limitz", "unknown key `limitz`"),
    (
        "a.yaml",
        4,
        3,
        "limits.max_body_bytez",
        "unknown field `max_body_bytez`",
    ),
    (
        "a.yaml",
        9,
        24,
        "policies[0].route.methods",
        "invalid type: a string, expected a sequence",
    ),
    (
        "a.yaml",
        15,
        9,
        "policies[1].chain[0].type",
        "unknown filter type \"no_such_filter\"",
    ),
    (
        "a.yaml",
        23,
        9,
        "policies[2].chain[0].on_failure",
        "no node named \"nowhere\"",
    ),
    // The cycle is reported on the node where the loop starts (line 27; its column is
    // checked by block_sequence_items_are_located_at_their_first_key).
    (
        "a.yaml",
        27,
        0,
        "policies[3].chain[0]",
        "the chain loops: one -> two -> one",
    ),
    (
        "a.yaml",
        41,
        11,
        "policies[4].chain[1].name",
        "duplicate node name \"same\"",
    ),
    (
        "a.yaml",
        44,
        44,
        "policies[5].chain[0].status",
        "999 is not an HTTP status",
    ),
    (
        "a.yaml",
        47,
        44,
        "policies[6].chain[0].body",
        "environment variable GATEWAY_TEST_SURELY_UNSET is not set",
    ),
    (
        "a.yaml",
        53,
        25,
        "policies[7].chain[0].access_token.store",
        "no store named \"tokenz\"",
    ),
    ("b.yaml", 1, 1, "listen", "`listen` is already set at"),
    (
        "b.yaml",
        3,
        5,
        "policies[0].name",
        "duplicate policy name \"shared\"",
    ),
    ("c.yaml", 4, 0, "", "invalid YAML"),
];

fn invalid_dir() -> PolicyDir {
    PolicyDir::new(&[("a.yaml", A), ("b.yaml", B), ("c.yaml", C_SYNTAX)])
}

fn file_name(p: &Path) -> String {
    p.file_name().unwrap().to_string_lossy().into_owned()
}

#[tokio::test]
async fn every_error_class_is_reported_at_once_with_its_location() {
    let dir = invalid_dir();
    let errors = engine::check(dir.path())
        .await
        .expect_err("the set is invalid")
        .0;
    let listing = errors
        .iter()
        .map(ToString::to_string)
        .collect::<Vec<_>>()
        .join("\n");
    assert_eq!(
        errors.len(),
        EXPECTED.len(),
        "all errors at once:\n{listing}"
    );
    for (e, &(file, line, column, path, msg)) in errors.iter().zip(EXPECTED) {
        assert_eq!(file_name(&e.file), file, "{e}");
        assert_eq!(e.line, line, "{e}");
        if column != 0 {
            assert_eq!(e.column, column, "{e}");
        }
        assert_eq!(e.path, path, "{e}");
        assert!(e.message.contains(msg), "{e} should say {msg:?}");
    }
    // Errors that point at another place name it.
    let dup_listen = &errors[10];
    assert!(dup_listen.message.contains("a.yaml:1:1"), "{dup_listen}");
    let dup_node = &errors[6];
    assert!(dup_node.message.contains("a.yaml:40:11"), "{dup_node}");
    // Display reads like a compiler's: file:line:col: path: message.
    let first = errors[0].to_string();
    assert!(first.ends_with("a.yaml:2:1: limitz: unknown key `limitz`, expected one of: listen, admin, limits, stores, applications, policies"), "{first}");
}

/// Positions of a sequence item written as a block mapping (`- name: one`) should be the
/// item's first key, as `config::yaml`'s own unit test expects; they are the `:` after it.
#[tokio::test]
async fn block_sequence_items_are_located_at_their_first_key() {
    let dir = invalid_dir();
    let errors = engine::check(dir.path()).await.expect_err("invalid").0;
    let cycle = errors.iter().find(|e| e.message.contains("loops")).unwrap();
    assert_eq!((cycle.line, cycle.column), (27, 9), "{cycle}");
    let dup = errors
        .iter()
        .find(|e| e.message.contains("duplicate policy"))
        .unwrap();
    assert!(dup.message.contains("a.yaml:42:5"), "{dup}");
}

#[tokio::test]
async fn each_class_alone_is_caught() {
    // One mistake per folder, so that no error hides behind another.
    let cases: &[(&str, &str, &str)] = &[
        (
            "limits:\n  max_body_bytes: lots\n",
            "limits.max_body_bytes",
            "invalid type",
        ),
        (
            "policies:\n  - name: p\n    route: { path: /p }\n    chain: [{ name: r, type: set_response, bodyy: x }]\n",
            "policies[0].chain[0].bodyy",
            "unknown field `bodyy`",
        ),
        (
            "policies:\n  - name: p\n    route: { path: /p }\n    chain:\n      - { name: a, type: set_response, on_success: a }\n",
            "policies[0].chain[0]",
            "the chain loops: a -> a",
        ),
        (
            "policies:\n  - name: p\n    route: { path: p }\n    chain: [{ name: r, type: set_response }]\n",
            "policies[0].route.path",
            "must start with `/`",
        ),
        (
            "policies:\n  - name: p\n    route: { path: /p }\n    chain: []\n",
            "policies[0].chain",
            "at least one node",
        ),
        (
            "policies:\n  - name: p\n    route: { path: /p }\n    chain: [{ name: r, type: compare_attribute, attribute: x, matches: '(' }]\n",
            "policies[0].chain[0].matches",
            "invalid regular expression",
        ),
        // A misspelt `type` is named where it stands, not only missed on the node.
        (
            "policies:\n  - name: p\n    route: { path: /p }\n    chain:\n      - name: r\n        status: 200\n        tpye: set_response\n",
            "policies[0].chain[0].tpye",
            "is `tpye` a misspelt `type`?",
        ),
        // A setting that takes one of a few names, given something else, lists the names
        // (serde_yaml alone says `expected a Value::Tagged enum`, `expected variant identifier`).
        (
            "policies:\n  - name: p\n    route: { path: /p, methods: [POST] }\n    chain:\n      - name: r\n        type: refresh_access_token\n        application_validation: { client_credentials_in: true }\n",
            "policies[0].chain[0].application_validation.client_credentials_in",
            "invalid type: boolean `true`, expected one of `authorization_header`, `form_body`, `query_string`",
        ),
        (
            "stores:\n  tokens: { type: 1 }\n",
            "stores.tokens.type",
            "invalid type: integer `1`, expected `memory` or `sql`",
        ),
    ];
    for (yaml, path, msg) in cases {
        let dir = PolicyDir::new(&[("p.yaml", yaml)]);
        let errors = engine::check(dir.path()).await.expect_err(yaml).0;
        assert_eq!(errors.len(), 1, "{yaml}: {errors:?}");
        assert_eq!(errors[0].path, *path, "{}", errors[0]);
        assert!(errors[0].message.contains(msg), "{}", errors[0]);
    }
}

#[tokio::test]
async fn a_valid_set_and_env_defaults_pass() {
    let dir = PolicyDir::new(&[(
        "ok.yaml",
        "policies:\n  - name: p\n    route: { path: /p }\n    chain: [{ name: r, type: set_response, body: \"${GATEWAY_TEST_SURELY_UNSET:-fallback} ${http.query.a}\" }]\n",
    )]);
    let warnings = engine::check(dir.path()).await.expect("valid");
    assert!(warnings.is_empty(), "{warnings:?}");
    let gw = dir.start().await;
    let r = get(gw.public_addr, "/p?a=x").await;
    assert_eq!(r.text(), "fallback x");
    gw.shutdown().await;
    // The shipped default set is valid too.
    let shipped = Path::new(env!("CARGO_MANIFEST_DIR")).join("../policies");
    engine::check(&shipped).await.expect("policies/ is valid");
}

#[tokio::test]
async fn alias_bombs_are_refused_quickly() {
    let mut bomb = String::from("a0: &a0 [x, x, x, x, x, x, x, x, x, x]\n");
    for i in 1..12 {
        let p = i - 1;
        bomb.push_str(&format!(
            "a{i}: &a{i} [*a{p}, *a{p}, *a{p}, *a{p}, *a{p}, *a{p}, *a{p}, *a{p}, *a{p}, *a{p}]\n"
        ));
    }
    let dir = PolicyDir::new(&[("bomb.yaml", &bomb)]);
    let started = Instant::now();
    let errors = engine::check(dir.path()).await.expect_err("refused").0;
    assert!(
        started.elapsed() < Duration::from_secs(2),
        "took {:?}",
        started.elapsed()
    );
    assert_eq!(file_name(&errors[0].file), "bomb.yaml", "{}", errors[0]);
}

#[test]
fn gateway_check_exits_3_with_every_error_on_stderr_and_0_when_valid() {
    let dir = invalid_dir();
    let out = std::process::Command::new(built_gateway_bin())
        .arg("check")
        .arg(dir.path())
        .output()
        .expect("run gateway check");
    assert_eq!(out.status.code(), Some(3));
    let stderr = String::from_utf8_lossy(&out.stderr);
    for &(file, line, column, path, msg) in EXPECTED {
        let at = if column == 0 {
            format!("{file}:{line}:")
        } else {
            format!("{file}:{line}:{column}: {path}")
        };
        assert!(
            stderr.lines().any(|l| l.contains(&at) && l.contains(msg)),
            "missing {at} {msg:?} in:\n{stderr}"
        );
    }
    assert!(
        stderr.contains(&format!("{} errors", EXPECTED.len())),
        "{stderr}"
    );

    let ok = PolicyDir::new(&[(
        "ok.yaml",
        "policies:\n  - name: p\n    route: { path: /p }\n    chain: [{ name: r, type: set_response }]\n",
    )]);
    let out = std::process::Command::new(built_gateway_bin())
        .arg("check")
        .arg(ok.path())
        .output()
        .expect("run gateway check");
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stdout).contains("ok"));
}

#[tokio::test]
async fn gateway_run_refuses_an_invalid_set_without_listening() {
    let dir = invalid_dir();
    let public = free_addr();
    let admin = free_addr();
    let mut child = std::process::Command::new(built_gateway_bin())
        .arg("run")
        .arg("--policies")
        .arg(dir.path())
        .arg("--listen")
        .arg(public.to_string())
        .arg("--admin")
        .arg(admin.to_string())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("spawn");
    let deadline = Instant::now() + Duration::from_secs(15);
    let status = loop {
        if let Some(s) = child.try_wait().unwrap() {
            break s;
        }
        assert!(
            tokio::net::TcpStream::connect(public).await.is_err(),
            "an invalid set must not listen"
        );
        assert!(Instant::now() < deadline, "gateway run did not exit");
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    assert!(!status.success());
    assert_eq!(status.code(), Some(3));
    let out = child.wait_with_output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("nothing was started"), "{stderr}");
    assert!(
        stderr.contains("a.yaml:4:3: limits.max_body_bytez"),
        "{stderr}"
    );
    assert!(tokio::net::TcpStream::connect(public).await.is_err());
    assert!(tokio::net::TcpStream::connect(admin).await.is_err());
}
