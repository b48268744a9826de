//! The OAuth token endpoint end to end: the default `policies/token.yaml` (client credentials
//! and the refresh grant, dispatched through the policy graph) on a real engine, plus custom
//! filter settings.

use std::collections::HashSet;
use std::sync::Arc;

use serde_json::Value;
use tests::{
    PolicyDir, Resp, SETTINGS, add_client, basic, default_token_policy, dispatch_policy, post_form,
};

const TOKEN: &str = "/oauth/token";

struct Setup {
    dir: PolicyDir,
    gw: tests::Gateway,
    id: String,
    secret: String,
}

impl Setup {
    async fn new(scopes: &str) -> Setup {
        Self::with_policy(
            &default_token_policy(),
            scopes,
            "client_credentials,refresh_token",
        )
        .await
    }

    async fn with_policy(policy: &str, scopes: &str, grants: &str) -> Setup {
        let dir = PolicyDir::new(&[("gateway.yaml", SETTINGS), ("token.yaml", policy)]);
        let (id, secret) = add_client(dir.path(), scopes, grants).await;
        let gw = dir.start().await;
        Setup {
            dir,
            gw,
            id,
            secret,
        }
    }

    fn auth(&self) -> String {
        basic(&self.id, &self.secret)
    }

    async fn post(&self, form: &[(&str, &str)]) -> Resp {
        post_form(
            self.gw.public_addr,
            TOKEN,
            &[("authorization", &self.auth())],
            form,
        )
        .await
    }

    /// A first pair through client credentials.
    async fn first_pair(&self, scope: &str) -> Value {
        let r = self
            .post(&[("grant_type", "client_credentials"), ("scope", scope)])
            .await;
        assert_eq!(r.status, 200, "{}", r.text());
        r.json()
    }

    async fn refresh(&self, rt: &str, scope: Option<&str>) -> Resp {
        let mut form = vec![("grant_type", "refresh_token"), ("refresh_token", rt)];
        if let Some(s) = scope {
            form.push(("scope", s));
        }
        self.post(&form).await
    }

    fn store(&self) -> store::SharedStore {
        self.gw.state.runtime.load().stores["tokens"].store.clone()
    }
}

fn assert_no_store(r: &Resp) {
    assert_eq!(r.header("cache-control"), Some("no-store"), "{r:?}");
    assert_eq!(r.header("pragma"), Some("no-cache"), "{r:?}");
}

fn assert_error(r: &Resp, status: u16, code: &str) {
    assert_eq!(r.status, status, "{}", r.text());
    assert_eq!(r.json()["error"], code, "{}", r.text());
    assert_eq!(r.header("content-type"), Some("application/json"));
    assert_no_store(r);
}

fn s<'a>(v: &'a Value, k: &str) -> &'a str {
    v[k].as_str()
        .unwrap_or_else(|| panic!("{k} missing in {v}"))
}

#[tokio::test]
async fn refresh_issues_a_new_pair_with_the_documented_defaults() {
    let t = Setup::new("read write").await;
    let first = t.first_pair("read write").await;
    let r = t.refresh(s(&first, "refresh_token"), None).await;
    assert_eq!(r.status, 200, "{}", r.text());
    assert_no_store(&r);
    let v = r.json();
    assert_eq!(s(&v, "access_token").len(), 54);
    assert_eq!(s(&v, "refresh_token").len(), 46);
    assert!(
        s(&v, "access_token")
            .chars()
            .all(|c| c.is_ascii_alphanumeric())
    );
    assert_eq!(v["token_type"], "Bearer");
    assert_eq!(v["expires_in"], 3600);
    assert_eq!(
        v["scope"], "read write",
        "an omitted scope means the original one"
    );
    assert_ne!(s(&v, "access_token"), s(&first, "access_token"));
    assert_ne!(s(&v, "refresh_token"), s(&first, "refresh_token"));

    // The new access token is live in the store, under its digest, with the grant.
    let at = t
        .store()
        .access_token(&t.store().token_digest(s(&v, "access_token")), store::now())
        .await
        .unwrap();
    let at = at.expect("new access token stored");
    assert_eq!(at.grant.client_id, t.id);
    assert_eq!(at.expires_at - at.issued_at, 3600);

    // The new refresh token works in turn.
    let again = t.refresh(s(&v, "refresh_token"), None).await;
    assert_eq!(again.status, 200, "{}", again.text());
}

#[tokio::test]
async fn custom_settings_and_no_new_refresh_token() {
    let policy = dispatch_policy(
        "",
        r#"        access_token: { store: tokens, expiry_secs: 120, length: 30, type: DPoP, metadata: { Department: Engineering, Client: "${oauth.client_id}" } }
        refresh_token: { generate: false }"#,
    );
    let t = Setup::with_policy(&policy, "read", "client_credentials,refresh_token").await;
    let first = t.first_pair("read").await;
    let rt = s(&first, "refresh_token").to_owned();
    let r = t.refresh(&rt, None).await;
    assert_eq!(r.status, 200, "{}", r.text());
    let v = r.json();
    assert_eq!(s(&v, "access_token").len(), 30);
    assert_eq!(v["token_type"], "DPoP");
    assert_eq!(v["expires_in"], 120);
    assert!(
        v.get("refresh_token").is_none(),
        "generate: false issues no refresh token: {v}"
    );

    // Metadata is stored with the token and can be read back.
    let at = t
        .store()
        .access_token(&t.store().token_digest(s(&v, "access_token")), store::now())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(
        at.grant.metadata.get("Department").map(String::as_str),
        Some("Engineering")
    );
    assert_eq!(at.grant.metadata.get("Client"), Some(&t.id));

    // The presented refresh token was removed even though no new one was generated.
    let again = t.refresh(&rt, None).await;
    assert_error(&again, 400, "invalid_grant");
}

#[tokio::test]
async fn errors_have_their_rfc_status_and_headers() {
    let t = Setup::new("read").await;
    let addr = t.gw.public_addr;
    let first = t.first_pair("read").await;
    let rt = s(&first, "refresh_token");

    // invalid_request: missing refresh_token, repeated parameters, missing grant_type.
    assert_error(
        &t.post(&[("grant_type", "refresh_token")]).await,
        400,
        "invalid_request",
    );
    let r = t
        .post(&[
            ("grant_type", "refresh_token"),
            ("refresh_token", rt),
            ("refresh_token", rt),
        ])
        .await;
    assert_error(&r, 400, "invalid_request");
    assert_error(&t.post(&[("scope", "read")]).await, 400, "invalid_request");

    // unsupported_grant_type.
    assert_error(
        &t.post(&[("grant_type", "password")]).await,
        400,
        "unsupported_grant_type",
    );

    // invalid_client with the Basic challenge when the header was used (and when it is missing).
    let r = post_form(
        addr,
        TOKEN,
        &[("authorization", &basic(&t.id, "wrong"))],
        &[("grant_type", "refresh_token"), ("refresh_token", rt)],
    )
    .await;
    assert_error(&r, 401, "invalid_client");
    assert!(r.header("www-authenticate").unwrap().starts_with("Basic"));
    let r = post_form(
        addr,
        TOKEN,
        &[],
        &[("grant_type", "refresh_token"), ("refresh_token", rt)],
    )
    .await;
    assert_error(&r, 401, "invalid_client");
    assert!(r.header("www-authenticate").is_some());
    let r = post_form(
        addr,
        TOKEN,
        &[("authorization", "Basic !!notbase64")],
        &[("grant_type", "refresh_token"), ("refresh_token", rt)],
    )
    .await;
    assert_error(&r, 401, "invalid_client");

    // invalid_request: a second authentication method beside the header (RFC 6749 §2.3), or
    // the header twice (the first one is not silently taken).
    let auth = t.auth();
    let form = [("grant_type", "refresh_token"), ("refresh_token", rt)];
    let in_query = format!("{TOKEN}?client_id={}&client_secret={}", t.id, t.secret);
    let r = post_form(addr, &in_query, &[("authorization", &auth)], &form).await;
    assert_error(&r, 400, "invalid_request");
    let other = basic("someone-else", "x");
    let twice = [("authorization", auth.as_str()), ("authorization", &other)];
    let r = post_form(addr, TOKEN, &twice, &form).await;
    assert_error(&r, 400, "invalid_request");
    // A secret counts as sent whichever of its occurrences carries it: an empty first one does
    // not hide a second, in the form or in the query.
    let hidden = [
        ("grant_type", "refresh_token"),
        ("refresh_token", rt),
        ("client_secret", ""),
        ("client_secret", t.secret.as_str()),
    ];
    let r = post_form(addr, TOKEN, &[("authorization", &auth)], &hidden).await;
    assert_error(&r, 400, "invalid_request");
    let in_query = format!("{TOKEN}?client_secret=&client_secret={}", t.secret);
    let r = post_form(addr, &in_query, &[("authorization", &auth)], &form).await;
    assert_error(&r, 400, "invalid_request");

    // invalid_grant: unknown token.
    assert_error(
        &t.refresh("no-such-token-0123456789012345678901234", None)
            .await,
        400,
        "invalid_grant",
    );

    // invalid_scope: widening.
    assert_error(
        &t.refresh(rt, Some("read admin")).await,
        400,
        "invalid_scope",
    );

    // A failed attempt changed nothing: the token still works.
    assert_eq!(t.refresh(rt, None).await.status, 200);

    // Not a form at all.
    let r = tests::send(
        addr,
        tests::request(http::Method::POST, TOKEN)
            .header("content-type", "application/json")
            .header("authorization", t.auth())
            .body(http_body_util::Full::new(bytes::Bytes::from_static(
                b"{\"grant_type\":\"refresh_token\"}",
            )))
            .unwrap(),
    )
    .await;
    assert_eq!(r.status, 400);
    assert_no_store(&r);
}

#[tokio::test]
async fn unauthorized_client_and_disabled_client() {
    let t = Setup::new("read").await;
    // A client registered without the refresh grant.
    let (id, secret) = add_client(t.dir.path(), "read", "client_credentials").await;
    let registry = engine::clients::open(t.dir.path()).await.unwrap();
    // The gateway rereads the registry file within a second.
    tokio::time::sleep(std::time::Duration::from_millis(1100)).await;
    let r = post_form(
        t.gw.public_addr,
        TOKEN,
        &[("authorization", &basic(&id, &secret))],
        &[("grant_type", "client_credentials")],
    )
    .await;
    assert_eq!(
        r.status,
        200,
        "a client added while the gateway runs is seen: {}",
        r.text()
    );
    assert!(
        r.json().get("refresh_token").is_none(),
        "no refresh token for a client without the refresh grant"
    );
    let first = t.first_pair("read").await;
    let r = post_form(
        t.gw.public_addr,
        TOKEN,
        &[("authorization", &basic(&id, &secret))],
        &[
            ("grant_type", "refresh_token"),
            ("refresh_token", s(&first, "refresh_token")),
        ],
    )
    .await;
    assert_error(&r, 400, "unauthorized_client");

    registry.set_enabled(&t.id, false).await.unwrap();
    tokio::time::sleep(std::time::Duration::from_millis(1100)).await;
    assert_error(
        &t.post(&[("grant_type", "client_credentials")]).await,
        401,
        "invalid_client",
    );
}

#[tokio::test]
async fn another_clients_refresh_token_is_invalid_grant_and_stays_valid() {
    let t = Setup::new("read").await;
    let first = t.first_pair("read").await;
    let rt = s(&first, "refresh_token");
    let (id2, secret2) = add_client(t.dir.path(), "read", "client_credentials,refresh_token").await;
    tokio::time::sleep(std::time::Duration::from_millis(1100)).await;
    let r = post_form(
        t.gw.public_addr,
        TOKEN,
        &[("authorization", &basic(&id2, &secret2))],
        &[("grant_type", "refresh_token"), ("refresh_token", rt)],
    )
    .await;
    assert_error(&r, 400, "invalid_grant");
    assert_eq!(
        t.refresh(rt, None).await.status,
        200,
        "the owner can still use it"
    );
}

#[tokio::test]
async fn scope_narrowing_is_allowed_and_widening_refused() {
    let t = Setup::new("read write admin").await;
    let first = t.first_pair("read write").await;
    let r = t.refresh(s(&first, "refresh_token"), Some("read")).await;
    assert_eq!(r.status, 200, "{}", r.text());
    let v = r.json();
    assert_eq!(v["scope"], "read");
    let at = t
        .store()
        .access_token(&t.store().token_digest(s(&v, "access_token")), store::now())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(
        at.grant.scope, "read",
        "the access token carries the narrowed scope"
    );
    // Widening beyond the original grant fails even though the client is registered for it.
    let r = t.refresh(s(&v, "refresh_token"), Some("read admin")).await;
    assert_error(&r, 400, "invalid_scope");
    // RFC 6749 §6: the new refresh token's scope is the presented one's, so the next refresh
    // without a scope gets the original grant back.
    let r = t.refresh(s(&v, "refresh_token"), None).await;
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.json()["scope"], "read write");
}

#[tokio::test]
async fn credentials_in_form_body_and_query_string() {
    for (location, in_query) in [("form_body", false), ("query_string", true)] {
        let validation = format!(
            "        application_validation: {{ client_credentials_in: {location}, client_id_field: app, client_secret_field: key }}"
        );
        let policy = dispatch_policy(&validation, &validation);
        let t = Setup::with_policy(&policy, "read", "client_credentials,refresh_token").await;
        let creds = [("app", t.id.as_str()), ("key", t.secret.as_str())];
        let path = if in_query {
            format!("{TOKEN}?app={}&key={}", t.id, t.secret)
        } else {
            TOKEN.to_owned()
        };
        let mut form = vec![("grant_type", "client_credentials")];
        if !in_query {
            form.extend(creds);
        }
        let r = post_form(t.gw.public_addr, &path, &[], &form).await;
        assert_eq!(r.status, 200, "{location}: {}", r.text());
        let rt = r.json()["refresh_token"].as_str().unwrap().to_owned();
        let mut form = vec![
            ("grant_type", "refresh_token"),
            ("refresh_token", rt.as_str()),
        ];
        if !in_query {
            form.extend(creds);
        }
        let r = post_form(t.gw.public_addr, &path, &[], &form).await;
        assert_eq!(r.status, 200, "{location}: {}", r.text());

        // Wrong secret in this location: 401 without a Basic challenge.
        let bad = if in_query {
            format!("{TOKEN}?app={}&key=nope", t.id)
        } else {
            TOKEN.to_owned()
        };
        let mut form = vec![("grant_type", "client_credentials")];
        if !in_query {
            form.extend([("app", t.id.as_str()), ("key", "nope")]);
        }
        let r = post_form(t.gw.public_addr, &bad, &[], &form).await;
        // RFC 6749 §5.2: a 400 unless the client used the Authorization header (a 401 must
        // carry a challenge, RFC 7235 §3.1, and there is no HTTP scheme for these).
        assert_error(&r, 400, "invalid_client");
        assert!(r.header("www-authenticate").is_none());

        // The Authorization header alone, where this endpoint reads another location: 401 with
        // a challenge, since the client used the header.
        let auth = t.auth();
        let header = [("authorization", auth.as_str())];
        let grant = [("grant_type", "client_credentials")];
        let r = post_form(t.gw.public_addr, TOKEN, &header, &grant).await;
        assert_error(&r, 401, "invalid_client");
        assert!(r.header("www-authenticate").unwrap().starts_with("Basic"));

        // Two methods at once (RFC 6749 §2.3): the header beside this location's credentials,
        // or a secret in the other location beside them, is invalid_request, never ignored.
        let mut form = vec![("grant_type", "client_credentials")];
        if !in_query {
            form.extend(creds);
        }
        let r = post_form(t.gw.public_addr, &path, &header, &form).await;
        assert_error(&r, 400, "invalid_request");
        let (elsewhere_path, elsewhere_form) = if in_query {
            (path.clone(), [("key", "other")])
        } else {
            (format!("{TOKEN}?key=other"), [("key", t.secret.as_str())])
        };
        let mut form = vec![("grant_type", "client_credentials")];
        form.extend(elsewhere_form);
        if !in_query {
            form.push(("app", t.id.as_str()));
        }
        let r = post_form(t.gw.public_addr, &elsewhere_path, &[], &form).await;
        assert_error(&r, 400, "invalid_request");

        // The query-string location is accepted with a warning from `gateway check`.
        let warnings = engine::check(t.dir.path()).await.unwrap();
        assert_eq!(
            warnings
                .iter()
                .any(|w| w.message.contains("RFC 6749 §2.3.1")),
            in_query,
            "{location}: {warnings:?}"
        );
    }
}

#[tokio::test]
async fn reuse_revokes_the_whole_family_and_takes_the_failure_path() {
    let policy = dispatch_policy(
        "",
        r#"        on_failure: why
      - name: why
        type: set_response
        status: 400
        content_type: application/json
        body: '{"error":"invalid_grant","reason":"${failure.reason}","reuse":"${refresh.reuse_detected}"}'"#,
    );
    let t = Setup::with_policy(&policy, "read", "client_credentials,refresh_token").await;
    let first = t.first_pair("read").await;
    let rt0 = s(&first, "refresh_token").to_owned();
    let r1 = t.refresh(&rt0, None).await.json();
    let at1 = s(&r1, "access_token").to_owned();
    let rt1 = s(&r1, "refresh_token").to_owned();

    // Reuse of rt0: failure path with the reason, and the family is revoked.
    let r = t.refresh(&rt0, None).await;
    assert_eq!(r.status, 400);
    assert_eq!(r.json()["reason"], "reuse_detected");
    assert_eq!(r.json()["reuse"], "true");
    assert!(
        t.store()
            .access_token(&t.store().token_digest(&at1), store::now())
            .await
            .unwrap()
            .is_none(),
        "access token of the family revoked"
    );
    let r = t.refresh(&rt1, None).await;
    assert_eq!(r.status, 400);
    assert_eq!(
        r.json()["reason"],
        "invalid_grant",
        "the live refresh token of the family is revoked too"
    );
}

#[tokio::test]
async fn a_lost_response_is_replayed_inside_the_grace_window_only_for_the_previous_token() {
    let policy = dispatch_policy("", "        refresh_token: { reuse_grace_secs: 30 }");
    let t = Setup::with_policy(&policy, "read", "client_credentials,refresh_token").await;
    let first = t.first_pair("read").await;
    let rt0 = s(&first, "refresh_token").to_owned();
    let r1 = t.refresh(&rt0, None).await;
    assert_eq!(r1.status, 200);
    // The client lost r1 and retries with rt0: it gets the very same pair, no new tokens.
    let retry = t.refresh(&rt0, None).await;
    assert_eq!(retry.status, 200, "{}", retry.text());
    assert_eq!(retry.json(), r1.json());
    assert_no_store(&retry);

    // Once rt1 has been used, rt0 is two generations old: reuse, family revoked.
    let rt1 = s(&r1.json(), "refresh_token").to_owned();
    let r2 = t.refresh(&rt1, None).await;
    assert_eq!(r2.status, 200);
    let r = t.refresh(&rt0, None).await;
    assert_error(&r, 400, "invalid_grant");
    let rt2 = s(&r2.json(), "refresh_token").to_owned();
    assert_error(&t.refresh(&rt2, None).await, 400, "invalid_grant");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn of_fifty_concurrent_refreshes_exactly_one_succeeds() {
    let t = Arc::new(Setup::new("read").await);
    let first = t.first_pair("read").await;
    let rt = s(&first, "refresh_token").to_owned();
    let mut tasks = Vec::new();
    for _ in 0..50 {
        let t = t.clone();
        let rt = rt.clone();
        tasks.push(tokio::spawn(async move { t.refresh(&rt, None).await }));
    }
    let mut ok = 0;
    let mut codes = HashSet::new();
    for task in tasks {
        let r = task.await.unwrap();
        if r.status == 200 {
            ok += 1;
        } else {
            assert_eq!(r.status, 400, "{}", r.text());
            codes.insert(r.json()["error"].as_str().unwrap().to_owned());
        }
    }
    assert_eq!(ok, 1, "exactly one winner");
    assert_eq!(codes, HashSet::from(["invalid_grant".to_owned()]));
}

#[tokio::test]
async fn tokens_are_never_stored_or_logged_in_the_clear() {
    let t = Setup::new("read").await;
    let first = t.first_pair("read").await;
    // The registry file holds the secret's digest only.
    let registry = std::fs::read_to_string(t.dir.registry_path()).unwrap();
    assert!(!registry.contains(&t.secret));
    // The store is keyed by digest: looking up the raw token's bytes as a digest finds nothing,
    // the digest finds it.
    let at = s(&first, "access_token");
    assert!(
        t.store()
            .access_token(&t.store().token_digest(at), store::now())
            .await
            .unwrap()
            .is_some()
    );
    // /metrics never carries a token or a secret.
    let metrics = tests::get(t.gw.admin_addr, "/metrics").await.text();
    assert!(!metrics.contains(at));
    assert!(!metrics.contains(&t.secret));
}

#[tokio::test]
async fn metadata_round_trips_to_downstream_attributes_through_a_bearer_check() {
    let policy = dispatch_policy(
        "        access_token: { metadata: { Department: Engineering } }",
        "        access_token: { metadata: { Department: Research, Via: \"${http.header.x-via}\" } }",
    );
    let api = r#"
policies:
  - name: api
    route: { path: /api/me, methods: [GET] }
    chain:
      - name: check
        type: validate_access_token
        required_scopes: [read]
      - name: answer
        type: set_response
        body: '${oauth.client_id}|${oauth.scope}|${oauth.token.metadata.Department}|${oauth.token.metadata.Via}'
"#;
    let t = Setup::with_policy(&policy, "read write", "client_credentials,refresh_token").await;
    t.dir.write("api.yaml", api);
    t.gw.reload().await.unwrap();
    let first = t.first_pair("read").await;
    let call = |token: String| {
        let addr = t.gw.public_addr;
        async move {
            let mut b = tests::request(http::Method::GET, "/api/me");
            if !token.is_empty() {
                b = b.header("authorization", token);
            }
            tests::send(
                addr,
                b.body(http_body_util::Full::new(bytes::Bytes::new()))
                    .unwrap(),
            )
            .await
        }
    };
    let r = call(format!("Bearer {}", s(&first, "access_token"))).await;
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.text(), format!("{}|read|Engineering|", t.id));

    // After a refresh, the refresh filter's metadata wins over the original (token values win).
    let r = post_form(
        t.gw.public_addr,
        TOKEN,
        &[("authorization", &t.auth()), ("x-via", "edge-7")],
        &[
            ("grant_type", "refresh_token"),
            ("refresh_token", s(&first, "refresh_token")),
        ],
    )
    .await;
    assert_eq!(r.status, 200, "{}", r.text());
    let r = call(format!("Bearer {}", s(&r.json(), "access_token"))).await;
    assert_eq!(r.text(), format!("{}|read|Research|edge-7", t.id));

    // RFC 6750 answers: no token, unknown token, insufficient scope.
    let r = call(String::new()).await;
    assert_eq!(r.status, 401);
    assert!(
        r.header("www-authenticate")
            .unwrap()
            .starts_with("Bearer realm=")
    );
    let r = call("Bearer nope".into()).await;
    assert_eq!(r.status, 401);
    assert!(
        r.header("www-authenticate")
            .unwrap()
            .contains("error=\"invalid_token\"")
    );
    let narrow = t.first_pair("write").await;
    let r = call(format!("Bearer {}", s(&narrow, "access_token"))).await;
    assert_eq!(r.status, 403);
    assert!(
        r.header("www-authenticate")
            .unwrap()
            .contains("insufficient_scope")
    );
}
